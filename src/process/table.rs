//! Which processes envd knows: running ones by pid and tag, and recently ended
//! ones (their buffered output and `end`) for a bounded time and count.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

use super::started::Process;
use crate::proto::process::process_selector::Selector;
use crate::proto::process::ProcessSelector;
use crate::status::{Error, Result};

#[derive(Debug)]
pub struct ProcessTable {
    inner: Mutex<Inner>,
    retention: Duration,
    max_ended: usize,
}

#[derive(Debug, Default)]
struct Inner {
    running: HashMap<u32, Arc<Process>>,
    /// Oldest first; each with the time it may be forgotten.
    ended: VecDeque<(Instant, Arc<Process>)>,
}

impl Inner {
    fn expire(&mut self, now: Instant, max_ended: usize) {
        while let Some((until, _)) = self.ended.front() {
            if *until <= now || self.ended.len() > max_ended {
                self.ended.pop_front();
            } else {
                break;
            }
        }
    }
}

impl ProcessTable {
    pub fn new(retention: Duration, max_ended: usize) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            retention,
            max_ended,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.expire(Instant::now(), self.max_ended);
        g
    }

    pub fn insert(&self, p: Arc<Process>) {
        let mut g = self.lock();
        // A reused pid replaces any exit record it had.
        g.ended.retain(|(_, e)| e.pid != p.pid);
        g.running.insert(p.pid, p);
    }

    /// Moves a process from running to ended (kept `retention` long).
    pub fn mark_ended(&self, p: &Arc<Process>) {
        let mut g = self.lock();
        if g.running.get(&p.pid).is_some_and(|r| Arc::ptr_eq(r, p)) {
            g.running.remove(&p.pid);
        }
        g.ended
            .push_back((far_or(Instant::now(), self.retention), p.clone()));
        g.expire(Instant::now(), self.max_ended);
    }

    /// What the ended processes' descriptions hold together.
    pub fn ended_described(&self) -> usize {
        self.lock()
            .ended
            .iter()
            .map(|(_, p)| p.described.units())
            .sum()
    }

    /// Forgets ended processes, oldest first, until `enough` says so or none
    /// is left (their output and descriptions go once nothing else holds
    /// them).
    pub fn forget_ended_until(&self, enough: impl Fn() -> bool) {
        loop {
            let oldest = self.lock().ended.pop_front();
            // Dropped outside the lock.
            if oldest.is_none() || enough() {
                return;
            }
        }
    }

    /// Every process known, with the time left before an ended one is
    /// forgotten (`None`: running).
    pub fn all(&self) -> Vec<(Arc<Process>, Option<Duration>)> {
        let g = self.lock();
        let now = Instant::now();
        let mut v: Vec<_> = g.running.values().map(|p| (p.clone(), None)).collect();
        v.extend(
            g.ended
                .iter()
                .map(|(until, p)| (p.clone(), Some(until.saturating_duration_since(now)))),
        );
        v.sort_by_key(|(p, _)| p.seq);
        v
    }

    /// An ended process carried over from a previous envd image.
    pub fn insert_ended(&self, p: Arc<Process>, keep: Duration) {
        let mut g = self.lock();
        g.ended
            .push_back((far_or(Instant::now(), keep.min(self.retention)), p));
        g.ended.make_contiguous().sort_by_key(|(until, _)| *until);
    }

    /// Running processes, oldest first.
    pub fn running(&self) -> Vec<Arc<Process>> {
        let mut v: Vec<_> = self.lock().running.values().cloned().collect();
        v.sort_by_key(|p| p.seq);
        v
    }

    /// A running process by selector.
    pub fn find_running(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Process>> {
        let g = self.lock();
        match selector(sel)? {
            Selector::Pid(pid) => g.running.get(pid).cloned(),
            Selector::Tag(tag) => newest(g.running.values(), tag),
        }
        .ok_or_else(|| not_found(sel))
    }

    /// A running process, or else a recently ended one.
    pub fn find_any(&self, sel: Option<&ProcessSelector>) -> Result<Arc<Process>> {
        if let Ok(p) = self.find_running(sel) {
            return Ok(p);
        }
        let g = self.lock();
        let ended = g.ended.iter().map(|(_, p)| p);
        match selector(sel)? {
            Selector::Pid(pid) => ended
                .filter(|p| p.pid == *pid)
                .max_by_key(|p| p.seq)
                .cloned(),
            Selector::Tag(tag) => newest(ended, tag),
        }
        .ok_or_else(|| not_found(sel))
    }
}

fn selector(sel: Option<&ProcessSelector>) -> Result<&Selector> {
    sel.and_then(|s| s.selector.as_ref())
        .ok_or_else(|| Error::invalid("process selector (pid or tag) is required"))
}

/// Tags need not be unique: the most recently started match wins.
fn newest<'a>(it: impl Iterator<Item = &'a Arc<Process>>, tag: &str) -> Option<Arc<Process>> {
    it.filter(|p| p.tag.as_deref() == Some(tag))
        .max_by_key(|p| p.seq)
        .cloned()
}

fn not_found(sel: Option<&ProcessSelector>) -> Error {
    match sel.and_then(|s| s.selector.as_ref()) {
        Some(Selector::Pid(pid)) => Error::not_found(format!("process with pid {pid} not found")),
        Some(Selector::Tag(tag)) => Error::not_found(format!("process with tag '{tag}' not found")),
        None => Error::invalid("process selector (pid or tag) is required"),
    }
}

/// `now + d`, or about a century ahead when that is not representable.
fn far_or(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}
