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
//! next image, which drains them on; a crash closes them.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use tokio::net::unix::pipe;

use crate::handover::carry::Kept;

/// Pipes kept at most (each is one fd and one idle task).
pub const MAX_LINGERING: usize = 4096;

/// Largest amount moved to `/dev/null` in one call.
const SPLICE_MAX: usize = 1 << 20;

static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// The kept pipes' fds, for a live upgrade to carry. A drain takes its fd
/// out under this lock before it closes it, so whoever holds the lock sees
/// only open fds.
static KEPT: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

fn kept() -> std::sync::MutexGuard<'static, Vec<RawFd>> {
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

/// Keeps `rx` open and drains it until its writers are gone; or, over the
/// [`limit`], closes it.
pub fn linger(rx: pipe::Receiver) {
    let max = limit();
    let taken = LINGERING.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < max).then_some(n + 1)
    });
    if taken.is_err() {
        tracing::debug!("output pipe closed after the end: too many kept");
        return;
    }
    let fd = rx.as_raw_fd();
    kept().push(fd);
    tokio::spawn(async move {
        drain(&rx).await;
        {
            let mut k = kept();
            k.retain(|&f| f != fd);
            drop(rx);
        }
        LINGERING.fetch_sub(1, Ordering::AcqRel);
    });
}

/// Duplicates of the kept pipes for the next image; their numbers.
pub fn carry(into: &mut Kept) -> Vec<i32> {
    kept()
        .iter()
        .map(|&fd| into.keep(Some(fd)))
        .filter(|&n| n >= 0)
        .collect()
}

/// Keeps the pipes a previous image kept (carried by a live upgrade).
/// Anything that is not the read end of a pipe is closed.
pub fn adopt(fds: Vec<OwnedFd>) {
    let total = fds.len();
    let mut taken = 0;
    for fd in fds {
        match pipe::Receiver::from_owned_fd(fd) {
            Ok(rx) => {
                taken += 1;
                linger(rx);
            }
            Err(e) => tracing::warn!(error = %e, "handover: a kept pipe is not one; closed"),
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
