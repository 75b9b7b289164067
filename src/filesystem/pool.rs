//! The blocking threads filesystem work may hold at once.
//!
//! Filesystem work runs on tokio's blocking threads (512 at most). A call on
//! a stalled mount (a FUSE or NFS server that stopped answering) holds its
//! thread until the mount answers, whatever became of its caller, so enough
//! of them would leave no thread for anything else: Starts while such a
//! mount exists, the ports scan, `/freeze`. Filesystem work therefore holds
//! at most [`MAX`] of them; beyond, calls wait for one without holding any.

use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinHandle};

/// Blocking threads filesystem work may hold; the other 128 of tokio's
/// stay for the rest.
pub const MAX: usize = 384;

static THREADS: Semaphore = Semaphore::const_new(MAX);

/// Runs `f` on a blocking thread once filesystem work may take another.
/// The thread's share goes back when `f` returns, not when the caller gives
/// up: a thread stuck on a mount stays counted.
pub async fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JoinError> {
    let share = THREADS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    tokio::task::spawn_blocking(move || {
        let _share = share;
        f()
    })
    .await
}

/// As [`run`], as a task of its own (for callers that do not wait).
pub fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T, JoinError>> {
    tokio::spawn(run(f))
}
