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

/// Work for a blocking thread, type-erased: one task type for all of it
/// (each distinct task type costs kilobytes of code).
type Job = Box<dyn FnOnce() + Send>;

async fn run_job(job: Job) -> Result<(), JoinError> {
    let share = THREADS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    tokio::task::spawn_blocking(move || {
        let _share = share;
        job();
    })
    .await
}

/// Runs `f` on a blocking thread once filesystem work may take another.
/// The thread's share goes back when `f` returns, not when the caller gives
/// up: a thread stuck on a mount stays counted. An error: `f` panicked.
pub async fn run<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, JoinError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    run_job(Box::new(move || {
        let _ = tx.send(f());
    }))
    .await?;
    Ok(rx.await.expect("a job that returned has sent its result"))
}

/// As [`run`], for callers that do not wait: `f` runs even if the handle is
/// dropped.
pub fn spawn(f: impl FnOnce() + Send + 'static) -> JoinHandle<Result<(), JoinError>> {
    tokio::spawn(run_job(Box::new(f)))
}
