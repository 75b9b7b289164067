//! Signals a process holds back. A tree signal that reaches a process with
//! it blocked stays pending, and a child the process forks before it takes
//! the signal is born without it (a new process's pending set is empty).
//! perl, glibc's `posix_spawn` and others block every signal around a
//! fork, so a process that forks in a loop is often inside that window
//! when the tree's signal comes, and its next child runs on unsignalled.
//! [`Status`] tells such a process (and a new one's parent) from
//! `/proc/PID/status`.

use std::io::Read;

use nix::sys::signal::Signal;

/// Longest `/proc/PID/status` read (about 1.5 KiB on Linux 6).
const MAX_STATUS: usize = 8 * 1024;

/// What `/proc/PID/status` says of a process's signals and parent.
pub struct Status {
    pub parent: i32,
    /// It cannot fork now: it has exited (a zombie keeps what was pending
    /// until it is reaped), or it is stopped (until a SIGCONT nobody may
    /// send).
    idle: bool,
    /// Pending for the process or its main thread.
    pending: u64,
    /// Blocked by its main thread.
    blocked: u64,
}

impl Status {
    /// `None` once the process is gone.
    pub fn read(pid: i32) -> Option<Status> {
        let mut buf = [0u8; MAX_STATUS];
        let mut file = std::fs::File::open(format!("/proc/{pid}/status")).ok()?;
        let mut len = 0;
        while len < buf.len() {
            match file.read(&mut buf[len..]) {
                Ok(0) => break,
                Ok(n) => len += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
        let text = std::str::from_utf8(&buf[..len]).ok()?;
        let field = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .map(str::trim)
        };
        let mask = |key: &str| u64::from_str_radix(field(key)?, 16).ok();
        Some(Status {
            parent: field("PPid")?.parse().ok()?,
            idle: field("State")?.starts_with(['Z', 'X', 'T', 't']),
            pending: mask("SigPnd")? | mask("ShdPnd")?,
            blocked: mask("SigBlk")?,
        })
    }

    /// Whether `sig` waits, pending and blocked, for the process to take it.
    pub fn holds_back(&self, sig: Signal) -> bool {
        let bit = u32::try_from(sig as i32)
            .ok()
            .and_then(|s| s.checked_sub(1))
            .and_then(|s| 1u64.checked_shl(s))
            .unwrap_or(0);
        !self.idle && self.pending & self.blocked & bit != 0
    }
}

/// Whether `pid` is alive and holds `sig` back.
pub fn holds_back(pid: i32, sig: Signal) -> bool {
    Status::read(pid).is_some_and(|s| s.holds_back(sig))
}
