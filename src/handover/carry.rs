//! File descriptors across exec: the outgoing image duplicates each fd it
//! carries to a number that survives exec (no `FD_CLOEXEC`) and writes the
//! number into the state; the incoming image claims each number once, marks it
//! close-on-exec again and owns it.

use std::collections::HashSet;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Carried fds get numbers from here up, clear of the stdio fds.
const FLOOR: RawFd = 64;

/// The outgoing side: duplicates that stay open until exec (or are closed
/// when this is dropped, if the exec never happens).
#[derive(Debug, Default)]
pub struct Kept(Vec<OwnedFd>);

impl Kept {
    /// Duplicates `fd` without close-on-exec; returns its number, or -1 for
    /// none or on failure (logged: that fd is then not carried).
    pub fn keep(&mut self, fd: Option<RawFd>) -> i32 {
        let Some(fd) = fd else { return -1 };
        // SAFETY: F_DUPFD only reads `fd` (the caller guarantees it is open
        // for the duration of the call) and returns a new fd we then own.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD, FLOOR) };
        if dup < 0 {
            tracing::warn!(fd, error = %std::io::Error::last_os_error(), "handover: cannot keep fd");
            return -1;
        }
        // SAFETY: `dup` was just returned by F_DUPFD, so it is open and ours.
        self.0.push(unsafe { OwnedFd::from_raw_fd(dup) });
        dup
    }

    /// Keeps an fd envd owns (a memfd, a listener).
    pub fn keep_fd(&mut self, fd: &impl AsRawFd) -> i32 {
        self.keep(Some(fd.as_raw_fd()))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The incoming side: each carried number is claimed at most once.
#[derive(Debug)]
pub struct Claimed {
    taken: HashSet<RawFd>,
    floor: RawFd,
}

impl Default for Claimed {
    fn default() -> Self {
        Self::with_floor(FLOOR)
    }
}

impl Claimed {
    /// Claims numbers from `floor` up (systemd hands its store over from 3).
    pub fn with_floor(floor: RawFd) -> Claimed {
        Claimed {
            taken: HashSet::new(),
            floor,
        }
    }

    /// Whether `fd` was claimed.
    pub fn has(&self, fd: RawFd) -> bool {
        self.taken.contains(&fd)
    }

    /// Takes ownership of carried fd `fd` (close-on-exec again). `None` for
    /// -1, a number claimed before, one below the carry floor, or one that is
    /// not open.
    pub fn take(&mut self, fd: i32) -> Option<OwnedFd> {
        if fd < self.floor || !self.taken.insert(fd) {
            return None;
        }
        // SAFETY: F_SETFD on any integer is harmless: it fails with EBADF
        // when `fd` is not open.
        if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
            return None;
        }
        // SAFETY: `fd` is open, was left to this image by the previous one
        // for exactly this purpose, and is claimed only once (the set above).
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }
}
