//! A one-way flag (false → true) that tasks can wait for: an atomic and a
//! `Notify` inline in its owner, where a `watch` channel would allocate
//! ~400 bytes of shared state that every retained exit record kept.

use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::Notify;

#[derive(Debug, Default)]
pub struct Flag {
    set: AtomicBool,
    notify: Notify,
}

impl Flag {
    pub fn new(set: bool) -> Self {
        Self {
            set: AtomicBool::new(set),
            notify: Notify::new(),
        }
    }

    /// Sets the flag and wakes every waiter.
    pub fn set(&self) {
        self.set.store(true, Ordering::Release);
        self.notify.notify_waiters();
    }

    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    /// Resolves once the flag is set (at once if it is).
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Registered before the check: a `set` after it wakes us.
            notified.as_mut().enable();
            if self.is_set() {
                return;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_wake_when_set_and_later_waits_return_at_once() {
        let f = Arc::new(Flag::new(false));
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let f = f.clone();
                tokio::spawn(async move { f.wait().await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!f.is_set());
        f.set();
        for w in waiters {
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("a waiter was not woken")
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(1), f.wait())
            .await
            .expect("a set flag must not block");
        assert!(Flag::new(true).is_set());
    }
}
