//! Quiescing envd's data movers before a live upgrade: output pumps stop at a
//! point where no byte is held in envd's hands (everything read is in the
//! output log; everything unread stays in the kernel's pipe or pty), and the
//! accept loops stop taking connections (new ones wait in the listen backlog
//! for the next image). A failed upgrade resumes them where they stopped.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::LazyLock;
use std::time::Duration;

use tokio::sync::watch;

static REQUESTED: LazyLock<watch::Sender<bool>> = LazyLock::new(|| watch::Sender::new(false));
/// The same as a plain flag, for the per-append check.
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Pumps running, and pumps parked at a safe point.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// Whether a quiesce is in progress (producers then never wait on readers).
pub fn requested() -> bool {
    ACTIVE.load(Ordering::Acquire)
}

/// Resolves once a quiesce is requested.
pub async fn until_requested() {
    let mut rx = REQUESTED.subscribe();
    let _ = rx.wait_for(|q| *q).await;
}

/// Parks the caller (a pump at its safe point) until the quiesce is lifted.
pub async fn park() {
    PARKED.fetch_add(1, Ordering::SeqCst);
    let mut rx = REQUESTED.subscribe();
    let _ = rx.wait_for(|q| !*q).await;
    PARKED.fetch_sub(1, Ordering::SeqCst);
}

/// Counts a running pump for as long as the guard lives.
pub struct PumpGuard(());

impl PumpGuard {
    pub fn new() -> PumpGuard {
        LIVE.fetch_add(1, Ordering::SeqCst);
        PumpGuard(())
    }
}

impl Default for PumpGuard {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PumpGuard {
    fn drop(&mut self) {
        LIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Requests a quiesce and waits (at most `limit`) until every pump is parked.
/// Returns whether they all were.
pub async fn begin(limit: Duration, wake: impl Fn()) -> bool {
    ACTIVE.store(true, Ordering::Release);
    REQUESTED.send_replace(true);
    // Producers waiting on a slow reader re-check and finish their append.
    wake();
    let until = tokio::time::Instant::now() + limit;
    loop {
        if PARKED.load(Ordering::SeqCst) >= LIVE.load(Ordering::SeqCst) {
            return true;
        }
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

/// Lifts the quiesce (the upgrade did not happen): everything resumes.
pub fn end() {
    ACTIVE.store(false, Ordering::Release);
    REQUESTED.send_replace(false);
}

/// Resolves once no quiesce is in progress (accept loops wait here: new
/// connections queue in the backlog for the next image meanwhile).
pub async fn until_lifted() {
    let mut rx = REQUESTED.subscribe();
    let _ = rx.wait_for(|q| !*q).await;
}
