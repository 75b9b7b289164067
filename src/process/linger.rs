//! Output pipes that outlive their command's `end`.
//!
//! A command's `end` does not wait for a background descendant that keeps
//! stdout or stderr open (see `supervise.rs`). Closing envd's read end then
//! would make that descendant's next write fail with `EPIPE` and kill it
//! with `SIGPIPE`: `server &` in a shell would die at its first log line.
//! Instead the pipe is kept and what arrives is thrown away (spliced into
//! `/dev/null`, no copy) until the last writer closes it. Nobody can read
//! it any more: the command's stream has ended.
//!
//! At most [`MAX_LINGERING`] pipes are kept, and no more than an eighth of
//! envd's open-file limit (connections may take half); beyond that a pipe
//! is closed as before. A pty is not kept: its master closing is a hangup,
//! as when a terminal goes away. A live upgrade carries kept pipes to the
//! next image, which drains them on; with crash records on (under systemd)
//! they are in systemd's fd store too, and an envd restarted after a crash
//! drains them on.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::net::unix::pipe;

use super::output::Source;
use crate::handover::carry::Kept;
use crate::proto::envd::handover::KeptPipe;

/// Pipes kept at most (each is one fd and one idle task).
pub const MAX_LINGERING: usize = 4096;

/// Largest amount moved to `/dev/null` in one call.
const SPLICE_MAX: usize = 1 << 20;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// The kept pipes, for a live upgrade to carry: each one's fd and its name
/// in systemd's fd store. A drain takes its entry out under this lock before
/// it closes the fd, so whoever holds the lock sees only open fds.
static KEPT: Mutex<Vec<(RawFd, String)>> = Mutex::new(Vec::new());

fn kept() -> std::sync::MutexGuard<'static, Vec<(RawFd, String)>> {
    KEPT.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many pipes may be kept (see the module's note).
fn limit() -> usize {
    static LIMIT: OnceLock<usize> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        let by_fds = usize::try_from(crate::limits::nofile() / 8).unwrap_or(usize::MAX);
        MAX_LINGERING.min(by_fds)
    })
}

/// The name a kept pipe of command `seq` has in systemd's fd store.
pub fn store_name(seq: u64, source: Source) -> String {
    let which = if source == Source::Stderr { 'e' } else { 'o' };
    format!("k{seq}{which}")
}

/// Whether `name` is one [`store_name`] makes.
pub fn is_store_name(name: &str) -> bool {
    name.strip_prefix('k')
        .and_then(|n| n.strip_suffix(['o', 'e']))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Calls `f` with the store name and fd of each pipe kept for command
/// `seq`, with the lock held (so each fd is open meanwhile).
pub fn with_kept_of(seq: u64, mut f: impl FnMut(&str, RawFd)) {
    let kept = kept();
    // Every command's end asks; most find none kept, and no names are made.
    if kept.is_empty() {
        return;
    }
    let names = [
        store_name(seq, Source::Stdout),
        store_name(seq, Source::Stderr),
    ];
    for (fd, name) in kept.iter() {
        if names.contains(name) {
            f(name, *fd);
        }
    }
}

/// Keeps `rx`, the pipe a command's background job still holds, open and
/// drains it until its writers are gone; or, over the [`limit`], closes it.
/// With crash records on, the command's end puts it into systemd's fd store
/// as `name` ([`with_kept_of`]).
pub fn linger(rx: pipe::Receiver, name: String) {
    let max = limit();
    let taken = LINGERING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < max).then_some(n + 1)
    });
    if taken.is_err() {
        tracing::debug!("output pipe closed after the end: too many kept");
        crate::handover::crash::pipe_unkept(&name);
        return;
    }
    let fd = rx.as_raw_fd();
    kept().push((fd, name.clone()));
    tokio::spawn(async move {
        drain(&rx).await;
        {
            let mut k = kept();
            k.retain(|(f, _)| *f != fd);
            drop(rx);
        }
        crate::handover::crash::pipe_unkept(&name);
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Duplicates of the kept pipes for the next image.
pub fn carry(into: &mut Kept) -> Vec<KeptPipe> {
    kept()
        .iter()
        .filter_map(|(fd, name)| {
            let n = into.keep(Some(*fd));
            (n >= 0).then(|| KeptPipe {
                fd: n,
                fd_name: name.clone(),
            })
        })
        .collect()
}

/// Keeps the pipes a previous image kept (carried by a live upgrade, or
/// left in systemd's fd store by a crashed envd, where they stay under the
/// same names). Anything that is not the read end of a pipe is closed.
pub fn adopt(pipes: Vec<(OwnedFd, String)>) {
    let total = pipes.len();
    let mut taken = 0;
    for (fd, name) in pipes {
        match pipe::Receiver::from_owned_fd(fd) {
            Ok(rx) => {
                taken += 1;
                linger(rx, name);
            }
            Err(e) => {
                tracing::warn!(error = %e, "handover: a kept pipe is not one; closed");
                crate::handover::crash::pipe_unkept(&name);
            }
        }
    }
    if total > 0 {
        tracing::info!(taken, total, "handover: kept pipes drained on");
    }
}

async fn drain(rx: &pipe::Receiver) {
    loop {
        if rx.readable().await.is_err() {
            return;
        }
        match discard(rx) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
}

/// Throws away what the pipe holds (up to [`SPLICE_MAX`]); `Ok(0)` at its
/// end.
fn discard(rx: &pipe::Receiver) -> std::io::Result<usize> {
    rx.try_io(|| {
        if let Some(null) = dev_null() {
            use nix::fcntl::{splice, SpliceFFlags};
            match splice(
                rx,
                None,
                null,
                None,
                SPLICE_MAX,
                SpliceFFlags::SPLICE_F_NONBLOCK,
            ) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINVAL) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut scratch = [0u8; 16 * 1024];
        nix::unistd::read(rx, &mut scratch).map_err(Into::into)
    })
}

/// `/dev/null`, opened once; none where that is not the null device (a
/// file in its place would fill up): the pipe is read into a scratch
/// buffer instead.
fn dev_null() -> Option<std::os::fd::BorrowedFd<'static>> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    static NULL: OnceLock<Option<std::fs::File>> = OnceLock::new();
    NULL.get_or_init(|| {
        // Non-blocking: a FIFO in its place must not hold the open.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open("/dev/null")
            .ok()?;
        let m = f.metadata().ok()?;
        (m.file_type().is_char_device() && m.rdev() == libc::makedev(1, 3)).then_some(f)
    })
    .as_ref()
    .map(|f| f.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_names_are_told_from_others() {
        for (seq, source) in [
            (0, Source::Stdout),
            (17, Source::Stderr),
            (u64::MAX, Source::Pty),
        ] {
            assert!(is_store_name(&store_name(seq, source)));
        }
        assert_eq!(store_name(5, Source::Stderr), "k5e");
        for other in [
            "k",
            "ko",
            "kxo",
            "k1",
            "c1o",
            "k1i",
            "l0",
            "envd-state",
            "k-1o",
        ] {
            assert!(!is_store_name(other), "{other}");
        }
    }
}
