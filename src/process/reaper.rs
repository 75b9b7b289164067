//! The one owner of every child wait in envd.
//!
//! envd never uses `tokio::process` or `std::process::Child::wait`: every
//! child is started by [`Reaper::spawn`] and reaped here by `waitpid(-1)` on
//! SIGCHLD. envd is a child subreaper, so processes orphaned by a command are
//! re-parented to envd and reaped here too (and the same loop serves envd as
//! PID 1).
//!
//! A clone may take long (it returns once the child has exec'd, and the
//! child's working directory or program may lie on a stalled mount), so no
//! lock is held across it. Instead each spawn under way has a slot the
//! kernel writes the child's pid into when it allocates it
//! (`CLONE_PARENT_SETTID`, before the child runs): a child that exits at once
//! and is reaped before its spawn has registered it leaves its status in
//! that slot. A pid reaped before the kernel wrote it into a slot is an
//! older process's, not that child's.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// Children reaped in one go before the reaper yields its worker.
const REAP_BATCH: usize = 256;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Exited(i32),
    Signaled { signal: i32, core_dumped: bool },
}

/// Where a child's exit status appears (`None` while it runs). Anyone holding
/// one can read the status at any time, so a live upgrade never loses a status
/// that was reaped but not yet handled.
pub type ExitWatch = watch::Receiver<Option<ExitStatus>>;

#[derive(Debug, Default)]
pub struct Reaper {
    waiters: Mutex<Waiters>,
    /// Spawns hold it shared across their clone; [`Reaper::paused`] holds it
    /// exclusively, so that no child appears while it runs.
    gate: std::sync::RwLock<()>,
}

#[derive(Debug, Default)]
struct Waiters {
    /// Registered children, by pid.
    by_pid: HashMap<i32, watch::Sender<Option<ExitStatus>>>,
    /// Spawns under way: the slot the kernel writes the child's pid into,
    /// and the child's status if it was reaped before it was registered.
    spawning: Vec<(Arc<AtomicI32>, Option<ExitStatus>)>,
}

impl Reaper {
    /// Makes envd a subreaper and starts reaping on SIGCHLD. Must run inside
    /// the tokio runtime, before any child is spawned.
    pub fn start() -> io::Result<Arc<Reaper>> {
        Ok(Self::start_adopting(&[])?.0)
    }

    /// As [`Reaper::start`], registering first the children a previous envd
    /// image started (a live upgrade keeps the PID, so they are still ours and
    /// their exit statuses wait as zombies until reaped here).
    pub fn start_adopting(pids: &[i32]) -> io::Result<(Arc<Reaper>, HashMap<i32, ExitWatch>)> {
        if nix::unistd::getpid().as_raw() != 1 {
            nix::sys::prctl::set_child_subreaper(true).map_err(io::Error::from)?;
        }
        let reaper = Arc::new(Reaper::default());
        let adopted = {
            let mut waiters = reaper.lock();
            pids.iter()
                .map(|&pid| {
                    let (tx, rx) = watch::channel(None);
                    waiters.by_pid.insert(pid, tx);
                    (pid, rx)
                })
                .collect()
        };
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                // Orphans reparented to envd in a storm can keep zombies
                // coming as fast as they are reaped: the worker and the
                // waiters' lock are given up between batches.
                while r.reap_batch(REAP_BATCH) {
                    tokio::task::yield_now().await;
                }
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok((reaper, adopted))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds off reaping and spawning while `f` runs (a live upgrade takes its
    /// snapshot and re-executes inside: no status can be consumed meanwhile).
    /// Waits at most `wait` for spawns under way to finish; `None` if they
    /// did not (a clone can wait on a stalled mount), and `f` did not run.
    pub async fn paused<T>(&self, wait: Duration, f: impl FnOnce() -> T) -> Option<T> {
        let until = tokio::time::Instant::now() + wait;
        // Tried, never waited for: this runs on an async worker.
        let _no_spawns = loop {
            match self.gate.try_write() {
                Ok(g) => break g,
                Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if tokio::time::Instant::now() >= until {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let _held = self.lock();
        Some(f())
    }

    /// Runs `start`, which must clone the new child writing its pid into the
    /// given slot (`CLONE_PARENT_SETTID`) and return that pid, and registers
    /// the child so that its exit status is delivered to the returned
    /// receiver. Blocks for as long as the clone does: on a blocking thread
    /// whenever the clone may wait on a stalled mount (see
    /// [`super::stall`]).
    pub fn spawn<F>(&self, start: F) -> io::Result<(i32, ExitWatch)>
    where
        F: FnOnce(&AtomicI32) -> io::Result<i32>,
    {
        let _gate = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let slot = Arc::new(AtomicI32::new(0));
        self.lock().spawning.push((slot.clone(), None));
        let started = start(&slot);
        let mut waiters = self.lock();
        let at = waiters
            .spawning
            .iter()
            .position(|(s, _)| Arc::ptr_eq(s, &slot))
            .expect("a spawn's slot stays until the spawn takes it back");
        let (_, reaped) = waiters.spawning.swap_remove(at);
        let pid = started?;
        let (tx, rx) = watch::channel(reaped);
        if reaped.is_none() {
            waiters.by_pid.insert(pid, tx);
        }
        Ok((pid, rx))
    }

    /// Collects exited children, at most `max`, and delivers statuses of
    /// registered ones; true if it stopped at `max` (more may be waiting).
    fn reap_batch(&self, max: usize) -> bool {
        let mut waiters = self.lock();
        for _ in 0..max {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, core_dumped)) => (
                    pid,
                    ExitStatus::Signaled {
                        signal: sig as i32,
                        core_dumped,
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return false,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return false;
                }
            };
            let pid = pid.as_raw();
            if let Some(tx) = waiters.by_pid.remove(&pid) {
                tx.send_replace(Some(status));
            } else if let Some((_, reaped)) = waiters
                .spawning
                .iter_mut()
                .find(|(slot, _)| slot.load(Ordering::Acquire) == pid)
            {
                // Exited before its spawn registered it.
                *reaped = Some(status);
            } else {
                tracing::debug!(pid, ?status, "reaped orphan");
            }
        }
        true
    }
}
