//! A count of bytes held against a fixed limit, taken and given back by
//! whoever holds them: the queues that must not grow without bound (watch
//! events per subscription and for all of them, polling watchers' buffers,
//! input waiting for a process to read it) share this one check.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Quota {
    used: AtomicUsize,
    max: usize,
}

impl Quota {
    pub const fn new(max: usize) -> Quota {
        Quota {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes `n` if they fit under the limit; says whether they did.
    pub fn try_take(&self, n: usize) -> bool {
        if self.used.fetch_add(n, Ordering::Relaxed) + n > self.max {
            self.used.fetch_sub(n, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Takes `n` from both quotas, or from neither.
    pub fn try_take_both(&self, other: &Quota, n: usize) -> bool {
        if !self.try_take(n) {
            return false;
        }
        if !other.try_take(n) {
            self.give(n);
            return false;
        }
        true
    }

    /// Counts `n` as held whatever the limit (units already held elsewhere,
    /// such as state carried over from a previous envd image).
    pub fn take(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    /// Gives back `n` taken before.
    pub fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Units held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` if they fit, given back when the returned hold is dropped
    /// (so also when the future holding it is cancelled).
    pub fn try_hold(&'static self, n: usize) -> Option<Held> {
        self.try_take(n).then(|| Held { quota: self, n })
    }

    /// Holds `n` whatever the limit (see [`Quota::take`]) until the hold is
    /// dropped.
    pub fn hold(&'static self, n: usize) -> Held {
        self.take(n);
        Held { quota: self, n }
    }
}

/// Units taken from a [`Quota`] until dropped.
#[derive(Debug)]
pub struct Held {
    quota: &'static Quota,
    n: usize,
}

impl Held {
    /// The units held.
    pub fn units(&self) -> usize {
        self.n
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.quota.give(self.n);
    }
}

/// When something was last refused, to tell whether others want what a
/// stalled holder keeps (see [`crate::filesystem::slots`] and
/// [`crate::backlog`]).
#[derive(Debug)]
pub struct LastRefusal(std::sync::Mutex<Option<std::time::Instant>>);

impl LastRefusal {
    pub const fn new() -> LastRefusal {
        LastRefusal(std::sync::Mutex::new(None))
    }

    /// Something was refused now.
    pub fn mark(&self) {
        *self.lock() = Some(std::time::Instant::now());
    }

    /// Whether something was refused within `d`.
    pub fn within(&self, d: std::time::Duration) -> bool {
        self.lock().is_some_and(|at| at.elapsed() < d)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::time::Instant>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for LastRefusal {
    fn default() -> Self {
        LastRefusal::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_up_to_the_limit_and_both_or_neither() {
        let (a, b) = (Quota::new(10), Quota::new(4));
        assert!(a.try_take(6));
        assert!(!a.try_take(5));
        assert_eq!(a.used(), 6);
        assert!(a.try_take_both(&b, 4));
        assert_eq!((a.used(), b.used()), (10, 4));
        a.give(4);
        assert!(!a.try_take_both(&b, 1), "b is full");
        assert_eq!((a.used(), b.used()), (6, 4));
    }

    #[test]
    fn a_hold_gives_back_when_dropped() {
        static Q: Quota = Quota::new(10);
        let h = Q.try_hold(7).unwrap();
        assert!(Q.try_hold(4).is_none());
        assert_eq!(Q.used(), 7, "a refused hold gives nothing back");
        drop(h);
        assert_eq!(Q.used(), 0);
    }
}
