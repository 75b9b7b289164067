//! The one owner of every child wait in envd.
//!
//! envd never uses `tokio::process` or `std::process::Child::wait`: every
//! child is started by [`Reaper::spawn`] and reaped here by `waitpid(-1)` on
//! SIGCHLD. envd is a child subreaper, so processes orphaned by a command are
//! re-parented to envd and reaped here too (and the same loop serves envd as
//! PID 1). Spawning holds the waiter lock across clone and registration, so a
//! child that exits at once cannot be reaped before its waiter exists.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

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
    waiters: Mutex<HashMap<i32, watch::Sender<Option<ExitStatus>>>>,
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
                    waiters.insert(pid, tx);
                    (pid, rx)
                })
                .collect()
        };
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    break;
                }
            }
        });
        Ok((reaper, adopted))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, watch::Sender<Option<ExitStatus>>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds off reaping and spawning while `f` runs (a live upgrade takes its
    /// snapshot and re-executes inside: no status can be consumed meanwhile).
    pub fn paused<T>(&self, f: impl FnOnce() -> T) -> T {
        let _held = self.lock();
        f()
    }

    /// Runs `start` (which must return the new child's pid) with reaping held
    /// off, and registers the child so its exit status is delivered to the
    /// returned receiver.
    pub fn spawn<F>(&self, start: F) -> io::Result<(i32, ExitWatch)>
    where
        F: FnOnce() -> io::Result<i32>,
    {
        let mut waiters = self.lock();
        let pid = start()?;
        let (tx, rx) = watch::channel(None);
        waiters.insert(pid, tx);
        Ok((pid, rx))
    }

    /// Collects every exited child; delivers statuses of registered ones.
    fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, ExitStatus::Exited(code)),
                Ok(WaitStatus::Signaled(pid, sig, core_dumped)) => (
                    pid,
                    ExitStatus::Signaled {
                        signal: sig as i32,
                        core_dumped,
                    },
                ),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "waitpid failed");
                    return;
                }
            };
            match waiters.remove(&pid.as_raw()) {
                Some(tx) => {
                    tx.send_replace(Some(status));
                }
                None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped orphan"),
            }
        }
    }
}
