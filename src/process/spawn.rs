//! Starting one command (clone + exec), with everything allocated beforehand.
//!
//! envd is multi-threaded and the child shares its memory until exec, so the
//! child may only make async-signal-safe calls: no allocation, no locks, no NSS. [`Prepared`] holds
//! every C string, pointer array and group list, built in the parent; the child
//! only runs raw syscalls on them. The child:
//! - resets the signal dispositions envd ignores (SIGPIPE, and any it
//!   inherited ignored), the kernel having reset those envd handles (`clone3`
//!   with `CLONE_CLEAR_SIGHAND`; on older kernels the child resets every
//!   one), then its mask,
//! - becomes a session and process-group leader (`setsid`), so signals and
//!   timeouts reach the whole group,
//! - takes the pty slave as controlling terminal, or the pipes, as fds 0-2,
//! - closes every other fd (no envd fd leaks into a child),
//! - resets its OOM score to 0 when envd's own is adjusted (systemd gives envd
//!   -1000; its commands must stay killable),
//! - drops to the user (`setgroups`, `setgid`, `setuid`), then `chdir`s as that
//!   user, then `execve`s. If exec fails it writes a shell-style message to its
//!   stderr and exits 127 (not found) or 126 (cannot execute).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::dispositions;
use crate::status::{Error, Result};

/// Credentials to switch to in the child.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub uid: libc::uid_t,
    pub gid: libc::gid_t,
    pub groups: Vec<libc::gid_t>,
}

/// The child's fds 0, 1 and 2, and whether fd 0 is a controlling terminal.
#[derive(Debug)]
pub struct ChildStdio {
    pub stdin: OwnedFd,
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
    pub controlling_tty: bool,
}

/// Everything the child needs, built in the parent.
#[derive(Debug)]
pub struct Prepared {
    program: CString,
    _argv: Vec<CString>,
    argv_ptrs: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp_ptrs: Vec<*const libc::c_char>,
    cwd: CString,
    creds: Option<Credentials>,
    stdio: ChildStdio,
    msg_not_found: Vec<u8>,
    msg_no_exec: Vec<u8>,
    msg_no_cwd: Vec<u8>,
    msg_no_creds: Vec<u8>,
    /// envd's own OOM score is not 0 (e.g. -1000 under systemd): reset the
    /// child's to 0 so the kernel may pick it over envd.
    reset_oom: bool,
    /// The open-file limit envd started with (envd raises its own).
    nofile: Option<libc::rlimit>,
    /// The directory of the cgroup the child is born in (see
    /// `crate::cgroups`).
    cgroup: Option<OwnedFd>,
    /// Set when `clone3` could not be used (`clone` was): the child resets
    /// every signal and joins its cgroup by itself.
    plain_clone: std::cell::Cell<bool>,
    /// The signals envd ignores (see [`dispositions::ignored`]).
    ignored: u64,
}

/// Whether envd's `oom_score_adj` differs from the default 0.
fn own_oom_score_adjusted() -> bool {
    static ADJUSTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ADJUSTED.get_or_init(|| {
        std::fs::read_to_string("/proc/self/oom_score_adj").is_ok_and(|v| v.trim() != "0")
    })
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct,
// which are never mutated after construction; moving the struct between
// threads does not move the heap buffers they point to.
unsafe impl Send for Prepared {}

fn cstring(what: &str, s: impl Into<Vec<u8>>) -> Result<CString> {
    CString::new(s).map_err(|_| Error::invalid(format!("{what} contains a NUL byte")))
}

/// Finds `cmd` on `path` (a `PATH` value) as a shell would. A name with a `/`
/// is used as is. When nothing executable is found, returns the first
/// non-executable match (exec then fails with 126) or the bare name (127).
pub fn resolve_program(cmd: &str, path: &str) -> Vec<u8> {
    if cmd.contains('/') {
        return cmd.as_bytes().to_vec();
    }
    let mut fallback = None;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let candidate = Path::new(dir).join(cmd);
        if let Ok(meta) = std::fs::metadata(&candidate) {
            if meta.is_file() && meta.permissions().mode() & 0o111 != 0 {
                return candidate.into_os_string().into_vec();
            }
            fallback.get_or_insert(candidate);
        }
    }
    fallback.map_or_else(
        || cmd.as_bytes().to_vec(),
        |p| p.into_os_string().into_vec(),
    )
}

use std::os::unix::ffi::OsStringExt;

impl Prepared {
    pub fn new(
        cmd: &str,
        program: Vec<u8>,
        args: &[String],
        envs: &[(String, String)],
        cwd: &Path,
        creds: Option<Credentials>,
        stdio: ChildStdio,
    ) -> Result<Prepared> {
        let program = cstring("cmd", program)?;
        let mut argv = vec![cstring("cmd", cmd)?];
        for a in args {
            argv.push(cstring("argument", a.as_str())?);
        }
        let mut envp = Vec::with_capacity(envs.len());
        for (k, v) in envs {
            if k.is_empty() || k.contains('=') {
                return Err(Error::invalid(format!(
                    "environment variable name {k:?} is empty or contains '='"
                )));
            }
            envp.push(cstring("environment variable", format!("{k}={v}"))?);
        }
        let ptrs = |v: &Vec<CString>| -> Vec<*const libc::c_char> {
            v.iter()
                .map(|c| c.as_ptr())
                .chain([std::ptr::null()])
                .collect()
        };
        let cwd_c = cstring("cwd", OsStr::as_bytes(cwd.as_os_str()))?;
        Ok(Prepared {
            argv_ptrs: ptrs(&argv),
            envp_ptrs: ptrs(&envp),
            program,
            _argv: argv,
            _envp: envp,
            cwd: cwd_c,
            creds,
            stdio,
            msg_not_found: format!("envd: {cmd}: command not found\n").into_bytes(),
            msg_no_exec: format!("envd: {cmd}: cannot execute: ").into_bytes(),
            msg_no_cwd: format!("envd: cannot enter {}: ", cwd.display()).into_bytes(),
            msg_no_creds: b"envd: cannot switch user: ".to_vec(),
            reset_oom: own_oom_score_adjusted(),
            nofile: crate::limits::child_nofile(),
            cgroup: None,
            plain_clone: std::cell::Cell::new(false),
            ignored: dispositions::ignored(),
        })
    }

    /// The child is born in the cgroup whose directory this is.
    pub fn join_cgroup(&mut self, dir: OwnedFd) {
        self.cgroup = Some(dir);
    }

    /// Starts the child and execs. Returns its pid (also its pgid and sid).
    ///
    /// Uses `clone(CLONE_VM | CLONE_VFORK)` on a private stack, as
    /// `posix_spawn` does: nothing of envd's memory is copied or marked
    /// copy-on-write, and this thread waits only until the child has exec'd
    /// (or failed). All signals are blocked around the clone so no handler of
    /// envd's can run in the child before it resets them. The kernel writes
    /// the child's pid into `pid_slot` as it allocates it (see
    /// [`super::reaper::Reaper::spawn`]).
    pub fn spawn(&self, pid_slot: &std::sync::atomic::AtomicI32) -> io::Result<i32> {
        let stack = ChildStack::take()?;
        // SAFETY: an all-zero sigset_t is a valid (empty) set.
        let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pthread_sigmask only affects this thread.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        }
        // `child_entry` runs on `stack` (mapped, with a guard page, alive until
        // the clone returns, which with CLONE_VFORK is after the child exec'd
        // or exited); it only makes async-signal-safe raw syscalls on `self`.
        // The kernel writes `pid_slot`, borrowed for the whole call.
        let arg = (self as *const Prepared).cast_mut().cast();
        let parent_tid = pid_slot.as_ptr();
        let cgroup = self.cgroup.as_ref().map(AsRawFd::as_raw_fd);
        self.plain_clone.set(false);
        // SAFETY: see above; `self` outlives the call.
        let cloned = unsafe {
            super::clone::clone3(child_entry, stack.base, stack.len, cgroup, arg, parent_tid)
        };
        let result = cloned.or_else(|e| {
            tracing::debug!(error = %e, "clone3 failed; the child resets its signals and joins its cgroup");
            self.plain_clone.set(true);
            // SAFETY: as above.
            unsafe { super::clone::plain(child_entry, stack.top(), arg, parent_tid) }
        });
        // SAFETY: restores this thread's previous mask.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
        stack.give_back();
        result
    }

    /// The child side, in order: signals, cgroup, session and stdio, other fds,
    /// limits, OOM score, priorities, credentials, working directory, exec. Never
    /// returns.
    ///
    /// # Safety
    /// Must only run in the cloned child. It shares envd's memory, so it
    /// writes nothing but its own stack, makes only async-signal-safe calls
    /// on data built before the clone (alive: the parent is suspended by
    /// CLONE_VFORK until exec or exit), and changes credentials with raw
    /// syscalls (libc's wrappers would signal envd's threads to change theirs).
    unsafe fn child_after_clone(&self) -> ! {
        // SAFETY: we are the cloned child (this function's contract), which
        // is each step's only requirement; `self` outlives the exec.
        unsafe {
            if self.plain_clone.get() {
                dispositions::reset_in_child(dispositions::ALL);
                if let Some(dir) = &self.cgroup {
                    child::join_cgroup(dir.as_raw_fd());
                }
            } else {
                dispositions::reset_in_child(self.ignored);
            }
            child::session_and_stdio(&self.stdio);
            child::close_other_fds();
            if let Some(lim) = &self.nofile {
                child::restore_nofile(lim);
            }
            if self.reset_oom {
                child::reset_oom_score();
            }
            child::reset_priority();
            if let Some(c) = &self.creds {
                if !child::become_user(c) {
                    fail(&self.msg_no_creds, 126);
                }
            }
            if libc::chdir(self.cwd.as_ptr()) != 0 {
                fail(&self.msg_no_cwd, 126);
            }
            libc::execve(
                self.program.as_ptr(),
                self.argv_ptrs.as_ptr(),
                self.envp_ptrs.as_ptr(),
            );
            if *libc::__errno_location() == libc::ENOENT {
                write_all(&self.msg_not_found);
                libc::_exit(127);
            }
            fail(&self.msg_no_exec, 126)
        }
    }
}

/// The steps of the cloned child. Every function here is unsafe for the same
/// reason: it may only run in the child between clone and exec, and makes only
/// async-signal-safe calls.
mod child {
    use std::os::fd::AsRawFd;

    use super::{ChildStdio, Credentials};

    /// A new session (and the pty as controlling terminal), then stdio.
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn session_and_stdio(s: &ChildStdio) {
        // SAFETY: the fds are open (owned by `s`, alive until exec); envd
        // keeps fds 0-2 open (see main), so these sources are >= 3.
        unsafe {
            libc::setsid();
            if s.controlling_tty {
                libc::ioctl(s.stdin.as_raw_fd(), libc::TIOCSCTTY, 0);
            }
            libc::dup2(s.stdin.as_raw_fd(), 0);
            libc::dup2(s.stdout.as_raw_fd(), 1);
            libc::dup2(s.stderr.as_raw_fd(), 2);
        }
    }

    /// Closes every fd above stdio (envd's sockets, pipes, files).
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn close_other_fds() {
        // SAFETY: closing fds affects only this process's table (the child
        // has its own: no CLONE_FILES).
        unsafe {
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }
        }
    }

    /// Back to the open-file limit envd was given (it raised its own).
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn restore_nofile(lim: &libc::rlimit) {
        // SAFETY: prlimit on ourselves (pid 0) reads one rlimit.
        unsafe {
            libc::syscall(
                libc::SYS_prlimit64,
                0,
                libc::RLIMIT_NOFILE,
                std::ptr::from_ref(lim),
                std::ptr::null_mut::<libc::rlimit>(),
            );
        }
    }

    /// OOM score 0, so the kernel may pick the command over envd. Raising
    /// the score needs no privilege; done before the uid changes, while
    /// /proc/self is still writable by us.
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn reset_oom_score() {
        // SAFETY: a static C string path; the fd is ours and closed here.
        // (openat: musl's open() follows O_CLOEXEC with an fcntl.)
        unsafe {
            let fd = libc::openat(
                libc::AT_FDCWD,
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
            }
        }
    }

    /// Moves this process into the cgroup whose directory is `dir` (writing
    /// "0" to `cgroup.procs` names the writer), where `clone3` could not
    /// create it there. A failure leaves it in envd's cgroup.
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn join_cgroup(dir: libc::c_int) {
        // SAFETY: openat on an fd we own with a static C string; the new fd
        // is written once and closed.
        unsafe {
            let fd = libc::openat(
                dir,
                c"cgroup.procs".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
        }
    }

    /// CPU nice 0 and the default I/O class, whatever envd runs with (E2B's
    /// unit gives envd nice -20 and realtime I/O). Raising the nice value
    /// needs no privilege; lowering it (envd niced up) only works as root,
    /// and a failure leaves envd's.
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn reset_priority() {
        const IOPRIO_WHO_PROCESS: libc::c_long = 1;
        // SAFETY: plain syscalls on this process (who = 0), no memory passed.
        unsafe {
            libc::setpriority(libc::PRIO_PROCESS, 0, 0);
            // Class NONE, level 0: I/O priority follows the CPU nice value.
            libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, 0, 0);
        }
    }

    /// Groups, gid, uid: raw syscalls for this thread only. False on failure.
    ///
    /// # Safety
    /// Only in the cloned child.
    pub unsafe fn become_user(c: &Credentials) -> bool {
        let (uid, gid) = (libc::c_long::from(c.uid), libc::c_long::from(c.gid));
        // SAFETY: the group list is a valid slice for its length.
        unsafe {
            libc::syscall(libc::SYS_setgroups, c.groups.len(), c.groups.as_ptr()) == 0
                && libc::syscall(libc::SYS_setresgid, gid, gid, gid) == 0
                && libc::syscall(libc::SYS_setresuid, uid, uid, uid) == 0
        }
    }
}

/// Entry point of the cloned child.
extern "C" fn child_entry(arg: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `arg` is the `&Prepared` passed by `spawn`, alive while the
    // parent is suspended; we are the cloned child.
    unsafe { (*(arg as *const Prepared)).child_after_clone() }
}

/// The cloned child's stack: private anonymous memory with a guard page.
struct ChildStack {
    base: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is owned by the struct and not tied to any thread.
unsafe impl Send for ChildStack {}

/// One spare stack: spawns are serialised by the reaper's lock, so one is
/// enough to avoid an mmap/munmap per spawn.
static SPARE_STACK: std::sync::Mutex<Option<ChildStack>> = std::sync::Mutex::new(None);

impl ChildStack {
    const SIZE: usize = 128 * 1024;
    const GUARD: usize = 4096;

    fn take() -> io::Result<ChildStack> {
        let spare = SPARE_STACK.lock().unwrap_or_else(|e| e.into_inner()).take();
        spare.map_or_else(ChildStack::new, Ok)
    }

    fn give_back(self) {
        let mut spare = SPARE_STACK.lock().unwrap_or_else(|e| e.into_inner());
        if spare.is_none() {
            *spare = Some(self);
        }
    }

    fn new() -> io::Result<ChildStack> {
        let len = Self::SIZE + Self::GUARD;
        // SAFETY: anonymous private mapping, no fd; checked for MAP_FAILED.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let stack = ChildStack { base, len };
        // SAFETY: the lowest page of our own mapping becomes the guard.
        if unsafe { libc::mprotect(base, Self::GUARD, libc::PROT_NONE) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(stack)
    }

    /// The highest address (stacks grow down), 16-byte aligned.
    fn top(&self) -> *mut libc::c_void {
        // SAFETY: one past the end of our mapping; mmap returns page-aligned
        // memory, so the end is 16-byte aligned.
        unsafe { self.base.cast::<u8>().add(self.len).cast() }
    }
}

impl Drop for ChildStack {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the mapping created in `new`.
        unsafe { libc::munmap(self.base, self.len) };
    }
}

/// Writes `prefix`, the current errno's text and a newline to fd 2, then exits.
///
/// # Safety
/// Cloned child only; async-signal-safe calls.
unsafe fn fail(prefix: &[u8], code: i32) -> ! {
    // SAFETY: errno location is thread-local and valid; strerror is not
    // async-signal-safe, so a fixed table of the likely errnos is used.
    unsafe {
        let errno = *libc::__errno_location();
        write_all(prefix);
        let text: &[u8] = match errno {
            libc::EACCES => b"Permission denied\n",
            libc::ENOENT => b"No such file or directory\n",
            libc::ENOTDIR => b"Not a directory\n",
            libc::ENOEXEC => b"Exec format error\n",
            libc::EPERM => b"Operation not permitted\n",
            libc::ETXTBSY => b"Text file busy\n",
            libc::E2BIG => b"Argument list too long\n",
            libc::ENOMEM => b"Out of memory\n",
            libc::EISDIR => b"Is a directory\n",
            _ => b"error\n",
        };
        write_all(text);
        libc::_exit(code)
    }
}

/// # Safety
/// Cloned child only; `write(2)` is async-signal-safe.
unsafe fn write_all(mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        match usize::try_from(n) {
            Ok(n) if n > 0 => buf = &buf[n.min(buf.len())..],
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_resolution() {
        assert_eq!(resolve_program("/bin/sh", "/nowhere"), b"/bin/sh".to_vec());
        assert_eq!(resolve_program("./x", "/bin"), b"./x".to_vec());
        let sh = resolve_program("sh", "/nowhere:/bin:/usr/bin");
        assert!(sh.ends_with(b"/sh") && sh.starts_with(b"/"));
        assert_eq!(
            resolve_program("no-such-cmd-xyz", "/bin:/usr/bin"),
            b"no-such-cmd-xyz".to_vec()
        );
    }
}
