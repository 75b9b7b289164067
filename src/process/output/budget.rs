//! The output budget all logs share.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::OutputLog;

/// Output a log keeps even when the shared budget is exceeded.
pub const FLOOR: u64 = 64 * 1024;

/// Output retained by all logs together (bytes plus [`CHUNK_COST`](super::chunks::CHUNK_COST) per
/// chunk), and its limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    /// What ended processes' logs count of `used` (the cost of every log
    /// whose `finished` is set): at most half of `max`, so that output kept
    /// for re-attaching to ended commands never presses the running ones by
    /// itself. A finished log changes only by [`Inner::drop_oldest`](super::chunks::Inner::drop_oldest).
    ended: AtomicU64,
    /// Ended logs, oldest first: the oldest give their output up first.
    ended_logs: Mutex<VecDeque<std::sync::Weak<OutputLog>>>,
    max: u64,
}

impl Budget {
    pub fn new(max: u64) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            ended_logs: Mutex::default(),
            max,
        })
    }

    /// What all logs count now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// What ended logs count now.
    pub(super) fn ended(&self) -> u64 {
        self.ended.load(Ordering::Relaxed)
    }

    /// Counts `cost` more for a log (among the ended logs' too, if `ended`).
    pub(super) fn add(&self, cost: u64, ended: bool) {
        self.used.fetch_add(cost, Ordering::Relaxed);
        if ended {
            self.ended.fetch_add(cost, Ordering::Relaxed);
        }
    }

    /// Counts `cost` less for a log (among the ended logs' too, if `ended`).
    pub(super) fn sub(&self, cost: u64, ended: bool) {
        self.used.fetch_sub(cost, Ordering::Relaxed);
        if ended {
            self.ended.fetch_sub(cost, Ordering::Relaxed);
        }
    }

    /// Counts what a log that just ended costs among the ended logs' (it
    /// was counted among all logs' as it grew).
    pub(super) fn count_ended(&self, cost: u64) {
        self.ended.fetch_add(cost, Ordering::Relaxed);
    }

    pub(super) fn over(&self) -> bool {
        self.used() > self.max
    }

    fn ended_over(&self) -> bool {
        self.ended() > self.max / 2
    }

    /// Counts `log` (just ended) among the ended logs, and while they keep
    /// more than half the budget, drops the read output of the oldest,
    /// then if need be the oldest output of `log` itself.
    pub(super) fn admit_ended(&self, log: &Arc<OutputLog>) {
        let mut logs = self.ended_logs.lock().unwrap_or_else(|e| e.into_inner());
        if logs.len() >= 512 {
            logs.retain(|w| w.strong_count() > 0);
        }
        logs.push_back(Arc::downgrade(log));
        while self.ended_over() && logs.len() > 1 {
            if let Some(old) = logs.pop_front().and_then(|w| w.upgrade()) {
                old.lock().drop_oldest(self, |_| true);
            }
        }
        if self.ended_over() {
            let mut g = log.lock();
            let others = self.ended() - g.cost();
            g.drop_oldest(self, |g| others + g.cost() > self.max / 2);
        }
    }
}
