//! Signal dispositions a command must not inherit from envd. A child is
//! cloned with `CLONE_CLEAR_SIGHAND` where the kernel has it, which defaults
//! every signal envd handles; an ignored signal stays ignored (across exec
//! too), so the child defaults those itself, before it unblocks its signals.
//! Through the raw system call: libc's `sigaction` refuses the signals it
//! keeps for itself (32-34), which envd may still have inherited ignored.

/// Every signal, as bits (bit `n - 1` for signal `n`, as `/proc` shows
/// them): what a child resets itself when the kernel could not.
pub const ALL: u64 = u64::MAX;

/// The kernel's `struct sigaction` (x86_64 and aarch64).
#[repr(C)]
#[derive(Default)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// `rt_sigaction(sig, act, old)`: the kernel's answer (0 or -1).
///
/// # Safety
/// `act` and `old` are null or valid for the call.
unsafe fn rt_sigaction(sig: i32, act: *const KernelSigaction, old: *mut KernelSigaction) -> i64 {
    // SAFETY: the caller's contract; the set size is the kernel's (8 bytes).
    unsafe { libc::syscall(libc::SYS_rt_sigaction, sig, act, old, 8usize) }
}

/// The signals envd ignores, as bits (bit `n - 1` for signal `n`): SIGPIPE
/// (Rust's runtime ignores it before `main`) and whatever envd inherited
/// ignored (glibc's `posix_spawn`, for one, hands its children signal 32
/// ignored). Read once, at the first spawn: envd ignores nothing later.
pub fn ignored() -> u64 {
    static IGNORED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *IGNORED.get_or_init(|| {
        let mut bits = 1u64 << (libc::SIGPIPE - 1);
        for sig in 1..=64 {
            let mut old = KernelSigaction::default();
            // SAFETY: a null action only queries; `old` is ours.
            let queried = unsafe { rt_sigaction(sig, std::ptr::null(), &mut old) } == 0;
            if queried && old.handler == libc::SIG_IGN {
                bits |= 1 << (sig - 1);
            }
        }
        bits
    })
}

/// Signals arrive blocked in the child (see `spawn::Prepared::spawn`):
/// defaults the dispositions of the signals in `which` (bit `n - 1` for
/// signal `n`) first, then unblocks, so no envd handler ever runs in the
/// child and nothing envd ignores stays ignored.
///
/// # Safety
/// Only in a cloned child before its exec: async-signal-safe system calls
/// only.
pub unsafe fn reset_in_child(which: u64) {
    let dfl = KernelSigaction::default();
    // SAFETY: `dfl` is SIG_DFL with no flags; the calls only change this
    // process's signal state (KILL and STOP are refused, harmlessly).
    unsafe {
        for sig in 1..=64 {
            if which & (1 << (sig - 1)) != 0 {
                rt_sigaction(sig, &dfl, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}
