//! fork + exec of one command, with everything allocated before the fork.
//!
//! envd is multi-threaded, so between fork and exec the child may only make
//! async-signal-safe calls: no allocation, no locks, no NSS. [`Prepared`] holds
//! every C string, pointer array and group list, built in the parent; the child
//! only runs raw syscalls on them. The child:
//! - resets its signal mask and every disposition (envd ignores SIGPIPE),
//! - becomes a session and process-group leader (`setsid`), so signals and
//!   timeouts reach the whole group,
//! - takes the pty slave as controlling terminal, or the pipes, as fds 0-2,
//! - closes every other fd (no envd fd leaks into a child),
//! - drops to the user (`setgroups`, `setgid`, `setuid`), then `chdir`s as that
//!   user, then `execve`s. If exec fails it writes a shell-style message to its
//!   stderr and exits 127 (not found) or 126 (cannot execute).

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

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
        })
    }

    /// Forks and execs. Returns the child's pid (also its pgid and sid).
    pub fn fork_exec(&self) -> io::Result<i32> {
        // SAFETY: fork is called with all data prepared; the child branch only
        // runs `child_after_fork`, which makes async-signal-safe calls only and
        // never returns.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            // SAFETY: we are the freshly forked child.
            0 => unsafe { self.child_after_fork() },
            pid => Ok(pid),
        }
    }

    /// The child side. Never returns.
    ///
    /// # Safety
    /// Must only be called in the child right after `fork`.
    unsafe fn child_after_fork(&self) -> ! {
        // SAFETY (whole block): only async-signal-safe libc calls on data built
        // before the fork; pointers stay valid because `self` is alive until
        // exec or _exit.
        unsafe {
            let mut empty: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut empty);
            libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
            let mut dfl: libc::sigaction = std::mem::zeroed();
            dfl.sa_sigaction = libc::SIG_DFL;
            for sig in 1..libc::SIGRTMAX() {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::sigaction(sig, &dfl, std::ptr::null_mut());
                }
            }

            libc::setsid();
            let s = &self.stdio;
            if s.controlling_tty {
                libc::ioctl(s.stdin.as_raw_fd(), libc::TIOCSCTTY, 0);
            }
            // envd keeps fds 0-2 open (see main), so these sources are >= 3.
            libc::dup2(s.stdin.as_raw_fd(), 0);
            libc::dup2(s.stdout.as_raw_fd(), 1);
            libc::dup2(s.stderr.as_raw_fd(), 2);
            if libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) != 0 {
                for fd in 3..4096 {
                    libc::close(fd);
                }
            }

            if let Some(c) = &self.creds {
                if libc::setgroups(c.groups.len(), c.groups.as_ptr()) != 0
                    || libc::setgid(c.gid) != 0
                    || libc::setuid(c.uid) != 0
                {
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

/// Writes `prefix`, the current errno's text and a newline to fd 2, then exits.
///
/// # Safety
/// Child-after-fork only; async-signal-safe calls.
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
/// Child-after-fork only; `write(2)` is async-signal-safe.
unsafe fn write_all(mut buf: &[u8]) {
    while !buf.is_empty() {
        // SAFETY: buf is a valid slice for its length.
        let n = unsafe { libc::write(2, buf.as_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        buf = &buf[n as usize..];
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
