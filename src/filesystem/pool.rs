//! The blocking threads filesystem work may hold at once.
//!
//! Filesystem work runs on tokio's blocking threads (512 at most). A call on
//! a stalled mount (a FUSE or NFS server that stopped answering) holds its
//! thread until the mount answers, whatever became of its caller, so enough
//! of them would leave no thread for anything else: Starts while such a
//! mount exists, the ports scan, `/freeze`. Filesystem work therefore holds
//! at most [`MAX`] of them; beyond, calls wait for one without holding any.

use tokio::sync::Semaphore;

use crate::status::Result;

/// Blocking threads filesystem work may hold; the other 128 of tokio's
/// stay for the rest.
pub const MAX: usize = 384;

static THREADS: Semaphore = Semaphore::const_new(MAX);

/// Runs `f` on a blocking thread once filesystem work may take another.
/// The thread's share goes back when `f` returns, not when the caller gives
/// up: a thread stuck on a mount stays counted. Errors: `f` panicked, or
/// the OS refused a thread (see [`crate::threads`]).
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let share = THREADS
        .acquire()
        .await
        .expect("the semaphore is never closed");
    crate::threads::run("filesystem work", move || {
        let _share = share;
        f()
    })
    .await
}
