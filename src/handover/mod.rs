//! Live upgrade: envd replaces its own program image in place (execve, same
//! PID), so it stays the parent and reaper of every command, and hands the
//! next image everything a client can observe.
//!
//! The sequence ([`Upgrader::upgrade`]):
//! 1. the new binary is asked which handover schemas it reads
//!    (`--handover-check`); one that does not run, or cannot read this
//!    image's state (a downgrade across a schema change), is refused and
//!    the old image carries on;
//! 2. accept loops and output pumps stop at a safe point ([`quiesce`]):
//!    nothing read is held outside the output logs, nothing unread leaves
//!    the kernel's pipes; connections queue in the listen backlog;
//! 3. with the reaper paused (no status consumed, no child spawned), the
//!    state ([`crate::proto::envd::handover::State`]) is written to a memfd,
//!    every fd that matters is kept open across exec ([`carry`]), and envd
//!    execs the new image with `ENVD_HANDOVER_FD` naming the memfd;
//! 4. the new image ([`incoming`]) takes the state before it serves a
//!    request: listeners, commands (with their output logs and exit
//!    statuses), polling watchers, `/init` state.
//!
//! Streams open during the swap end; clients re-attach with `resume_offset`.

pub mod carry;
pub mod crash;
pub mod exits;
pub mod incoming;
pub mod memfd;
pub mod quiesce;
pub mod tails;
pub mod upgrader;

pub use upgrader::{Image, Upgrader};

/// The handover format this envd writes, and the newest it reads.
pub const SCHEMA: u32 = 1;

/// The flag that makes envd print what it reads and exit (see `check_line`).
pub const CHECK_FLAG: &str = "--handover-check";

/// What `envd --handover-check` prints: the newest schema it reads, and its
/// build.
pub fn check_line() -> String {
    format!("envd-handover {SCHEMA} {}", crate::build_id::build_id())
}

/// Parses [`check_line`]'s output: (newest schema, version).
pub fn parse_check_line(out: &str) -> Option<(u32, String)> {
    let line = out.lines().find(|l| l.starts_with("envd-handover "))?;
    let mut it = line.split_whitespace().skip(1);
    let schema = it.next()?.parse().ok()?;
    let version = it.next().unwrap_or("unknown").to_owned();
    Some((schema, version))
}
