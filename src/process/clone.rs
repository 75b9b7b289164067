//! The two ways a child is cloned. Both share envd's memory and suspend the
//! calling thread until the child has exec'd or exited (`CLONE_VM |
//! CLONE_VFORK`, as `posix_spawn` does), and run `entry(arg)` on `stack`.
//! Both have the kernel write the child's pid to `parent_tid` when it
//! allocates it, before the child runs (`CLONE_PARENT_SETTID`): the reaper
//! tells a child reaped before its clone returned by it.
//!
//! - [`clone3`]: the child is born with every signal envd handles back at
//!   its default (`CLONE_CLEAR_SIGHAND`, Linux 5.5), so it need not reset
//!   them one system call each; and, given a cgroup, born in it
//!   (`CLONE_INTO_CGROUP`, Linux 5.7), so not one instruction of it runs
//!   outside.
//! - [`plain`]: libc's `clone`, for older kernels; the child then resets its
//!   signals and joins its cgroup itself.

use std::io;

/// `CLONE_CLEAR_SIGHAND` from `linux/sched.h`.
const CLONE_CLEAR_SIGHAND: u64 = 0x1_0000_0000;
/// `CLONE_INTO_CGROUP` from `linux/sched.h`.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// The child's entry: never returns (it execs or exits).
pub type Entry = extern "C" fn(*mut libc::c_void) -> libc::c_int;

/// `struct clone_args` of `linux/sched.h` (version 2, with `cgroup`).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// libc's `clone` on `stack_top` (16-byte aligned).
///
/// # Safety
/// `entry` must only make async-signal-safe calls and never return; `arg`,
/// `parent_tid` and the stack must stay valid until this returns
/// (CLONE_VFORK).
pub unsafe fn plain(
    entry: Entry,
    stack_top: *mut libc::c_void,
    arg: *mut libc::c_void,
    parent_tid: *mut libc::pid_t,
) -> io::Result<i32> {
    let no_tls: *mut libc::c_void = std::ptr::null_mut();
    let no_child_tid: *mut libc::pid_t = std::ptr::null_mut();
    // SAFETY: the caller's contract; the variadic arguments are the ones
    // CLONE_PARENT_SETTID reads (parent_tid) and two unused ones.
    let pid = unsafe {
        libc::clone(
            entry,
            stack_top,
            libc::CLONE_VM | libc::CLONE_VFORK | libc::CLONE_PARENT_SETTID | libc::SIGCHLD,
            arg,
            parent_tid,
            no_tls,
            no_child_tid,
        )
    };
    if pid == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(pid)
    }
}

/// `clone3` with `CLONE_CLEAR_SIGHAND`, into the cgroup open at `cgroup`
/// if one is given, on the stack `[stack_base, stack_base + stack_len)`
/// (page aligned). An error means no child was created (e.g.
/// `ENOSYS`/`E2BIG`/`EINVAL` on kernels without `clone3` or one of the
/// flags).
///
/// # Safety
/// As [`plain`].
#[cfg(target_arch = "x86_64")]
pub unsafe fn clone3(
    entry: Entry,
    stack_base: *mut libc::c_void,
    stack_len: usize,
    cgroup: Option<libc::c_int>,
    arg: *mut libc::c_void,
    parent_tid: *mut libc::pid_t,
) -> io::Result<i32> {
    let (into, cgroup) = match cgroup {
        Some(fd) => (
            CLONE_INTO_CGROUP,
            u64::try_from(fd).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?,
        ),
        None => (0, 0),
    };
    let args = CloneArgs {
        flags: u64::from(libc::CLONE_VM.unsigned_abs())
            | u64::from(libc::CLONE_VFORK.unsigned_abs())
            | u64::from(libc::CLONE_PARENT_SETTID.unsigned_abs())
            | CLONE_CLEAR_SIGHAND
            | into,
        parent_tid: parent_tid as u64,
        exit_signal: u64::from(libc::SIGCHLD.unsigned_abs()),
        stack: stack_base as u64,
        stack_size: stack_len as u64,
        cgroup,
        ..Default::default()
    };
    let ret: i64;
    // SAFETY: the raw clone3 system call. In the parent it returns the pid
    // (or -errno) in rax. In the child (rax = 0) the kernel has switched to
    // the new stack, whose top is 16-byte aligned, so `call` enters `entry`
    // with the ABI's alignment; r12 and r13 survive the syscall, rcx and r11
    // are clobbered by it. `entry` never returns (ud2 guards it). The parent
    // path touches no stack; `args` lives in this frame until the syscall,
    // which (CLONE_VFORK) returns after the child exec'd or exited.
    unsafe {
        std::arch::asm!(
            "syscall",
            "test rax, rax",
            "jnz 2f",
            "xor ebp, ebp",
            "mov rdi, r12",
            "call r13",
            "ud2",
            "2:",
            inlateout("rax") libc::SYS_clone3 => ret,
            in("rdi") std::ptr::addr_of!(args),
            in("rsi") std::mem::size_of::<CloneArgs>(),
            in("r12") arg,
            in("r13") entry,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    if ret < 0 {
        let errno = i32::try_from(-ret).unwrap_or(libc::EINVAL);
        return Err(io::Error::from_raw_os_error(errno));
    }
    i32::try_from(ret).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Without the assembly above, every child resets its own signals and joins
/// its cgroup itself.
#[cfg(not(target_arch = "x86_64"))]
pub unsafe fn clone3(
    _entry: Entry,
    _stack_base: *mut libc::c_void,
    _stack_len: usize,
    _cgroup: Option<libc::c_int>,
    _arg: *mut libc::c_void,
    _parent_tid: *mut libc::pid_t,
) -> io::Result<i32> {
    Err(io::Error::from_raw_os_error(libc::ENOSYS))
}
