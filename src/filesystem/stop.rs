//! When a walk over a whole tree stops early.
//!
//! A `Remove` or a cross-filesystem `Move` walks a tree that code in the
//! sandbox may keep growing as fast as envd removes or copies it. Such a walk
//! runs on a blocking thread, which does not stop when the caller gives up
//! (its deadline passes, it disconnects): without a stop, the thread would
//! go on for as long as the growing went on, and enough of them would take
//! every blocking thread envd has. So a walk checks its [`Stop`] at each
//! entry: it stops once its caller has gone away, or once it has visited as
//! many entries as it was allowed.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Set when the caller a blocking walk works for has gone away.
#[derive(Debug, Clone, Default)]
pub struct Abandoned(Arc<AtomicBool>);

impl Abandoned {
    /// A guard that marks the walk abandoned when it is dropped: keep it in
    /// the caller's future, so that dropping the future (deadline,
    /// disconnect) stops the walk.
    pub fn guard(&self) -> AbandonOnDrop {
        AbandonOnDrop(self.0.clone())
    }

    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Marks its walk abandoned when dropped (see [`Abandoned::guard`]).
#[derive(Debug)]
pub struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The condition under which a tree walk stops, and the entries it has
/// visited so far.
#[derive(Debug)]
pub struct Stop {
    abandoned: Option<Abandoned>,
    /// Entries the walk may still visit (`u64::MAX`: no bound).
    allowed: u64,
    visited: AtomicU64,
}

impl Stop {
    /// Stops when `abandoned` is set.
    pub fn when(abandoned: Abandoned) -> Stop {
        Stop {
            abandoned: Some(abandoned),
            allowed: u64::MAX,
            visited: AtomicU64::new(0),
        }
    }

    /// Stops after `entries` entries.
    pub fn after(entries: u64) -> Stop {
        Stop {
            abandoned: None,
            allowed: entries,
            visited: AtomicU64::new(0),
        }
    }

    /// Entries visited so far.
    pub fn visited(&self) -> u64 {
        self.visited.load(Ordering::Relaxed)
    }

    /// Called by a walk before each entry: an error once it must stop.
    pub fn check(&self) -> io::Result<()> {
        if self.abandoned.as_ref().is_some_and(Abandoned::is_set) {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "stopped: the caller went away (deadline passed or disconnected) while the tree was being walked",
            ));
        }
        let visited = self.visited.fetch_add(1, Ordering::Relaxed);
        if visited >= self.allowed {
            return Err(io::Error::other(format!(
                "stopped after {} entries: the tree grew while it was being walked",
                self.allowed
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_when_abandoned_or_out_of_entries() {
        let a = Abandoned::default();
        let stop = Stop::when(a.clone());
        let guard = a.guard();
        for _ in 0..1000 {
            stop.check().unwrap();
        }
        drop(guard);
        assert_eq!(stop.check().unwrap_err().kind(), io::ErrorKind::TimedOut);

        let stop = Stop::after(3);
        for _ in 0..3 {
            stop.check().unwrap();
        }
        assert!(stop.check().is_err());
        assert_eq!(stop.visited(), 4);
    }
}
