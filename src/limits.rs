//! envd's own resource limits: the open-file limit is raised to the hard
//! limit at start-up (as systemd advises for services that need many fds),
//! while commands get the soft limit envd was started with, since many
//! programs still use `select()` and break with fds above 1023.

use std::sync::OnceLock;

/// The soft `RLIMIT_NOFILE` envd was started with, once it has been raised.
static ORIGINAL: OnceLock<libc::rlimit> = OnceLock::new();

/// Raises the soft open-file limit to the hard limit. Returns (before, now).
pub fn raise_nofile() -> (u64, u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return (0, 0);
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit from the struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            let _ = ORIGINAL.set(lim);
            return (before, raised.rlim_cur);
        }
    }
    (before, before)
}

/// The current soft open-file limit.
pub fn nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

/// The limit a command should get back, if envd raised its own.
pub fn child_nofile() -> Option<libc::rlimit> {
    ORIGINAL.get().copied()
}
