//! Polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher): each
//! buffers at most `capacity` events and [`MAX_BYTES`] of them; when full,
//! further events are counted as lost and the next poll says so. Watchers
//! nobody polls for `idle` are removed.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prost::Message;
use tokio::time::Instant;

use super::watch::{watch_dir, WatchOptions};
use crate::proto::filesystem::FilesystemEvent;
use crate::quota::Quota;
use crate::status::{Code, Error, Result};

/// Most encoded bytes of events one watcher buffers: well within what one
/// GetWatcherEvents answer may carry (16 MiB), and a bound on what a watcher
/// nobody polls holds (its events' names and entries may be kilobytes each).
const MAX_BYTES: usize = 4 << 20;
/// Most bytes of events all polling watchers together buffer.
const MAX_BYTES_TOTAL: usize = 64 << 20;

/// Bytes of events buffered by all polling watchers.
static BUFFERED_TOTAL: Quota = Quota::new(MAX_BYTES_TOTAL);

/// An event's share of [`MAX_BYTES`]: its encoding, field key and length.
fn cost(ev: &FilesystemEvent) -> usize {
    ev.encoded_len() + 4
}

#[derive(Debug)]
pub struct Watchers {
    map: Mutex<HashMap<String, Arc<Polled>>>,
    capacity: usize,
    idle: Duration,
}

#[derive(Debug)]
struct Polled {
    /// Shared with the filling task, which holds only a `Weak`.
    state: Arc<Mutex<PollState>>,
    task: tokio::task::JoinHandle<()>,
    /// What it watches (a live upgrade re-arms it from these).
    root: PathBuf,
    opts: WatchOptions,
}

#[derive(Debug)]
struct PollState {
    events: VecDeque<FilesystemEvent>,
    /// What `events` costs (see [`cost`]).
    bytes: usize,
    lost: u64,
    error: Option<Error>,
    last_poll: Instant,
}

impl Drop for Polled {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PollState {
    /// Buffers `ev` if this watcher and all of them together have room.
    fn buffer(&mut self, ev: FilesystemEvent, capacity: usize) -> bool {
        let n = cost(&ev);
        if self.events.len() >= capacity || self.bytes + n > MAX_BYTES {
            return false;
        }
        if !BUFFERED_TOTAL.try_take(n) {
            return false;
        }
        self.bytes += n;
        self.events.push_back(ev);
        true
    }

    /// Takes every buffered event.
    fn take(&mut self) -> Vec<FilesystemEvent> {
        BUFFERED_TOTAL.give(std::mem::take(&mut self.bytes));
        self.events.drain(..).collect()
    }
}

impl Drop for PollState {
    fn drop(&mut self) {
        BUFFERED_TOTAL.give(self.bytes);
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watchers {
    /// Creates the registry and its sweeper (must run inside the runtime).
    pub fn new(capacity: usize, idle: Duration) -> Arc<Watchers> {
        let w = Arc::new(Watchers {
            map: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            idle,
        });
        let weak = Arc::downgrade(&w);
        tokio::spawn(async move {
            let period = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(30));
            loop {
                tokio::time::sleep(period).await;
                let Some(w) = weak.upgrade() else { return };
                w.sweep();
            }
        });
        w
    }

    fn sweep(&self) {
        let now = Instant::now();
        lock(&self.map).retain(|id, p| {
            let keep = now.duration_since(lock(&p.state).last_poll) < self.idle;
            if !keep {
                tracing::info!(watcher = %id, "removing a watcher nobody polled");
            }
            keep
        });
    }

    pub async fn create(&self, root: PathBuf, opts: WatchOptions) -> Result<String> {
        let id = format!("w{}", crate::ids::random_id(20));
        self.arm(id.clone(), root, opts, VecDeque::new(), 0).await?;
        Ok(id)
    }

    /// Arms watcher `id` with events already pending (a new one has none).
    async fn arm(
        &self,
        id: String,
        root: PathBuf,
        opts: WatchOptions,
        pending: VecDeque<FilesystemEvent>,
        lost: u64,
    ) -> Result<()> {
        let mut watch = watch_dir(root.clone(), opts.clone()).await?;
        let bytes = pending.iter().map(cost).sum();
        // Events carried over from a previous image: counted whatever the
        // total (they were within it there).
        BUFFERED_TOTAL.take(bytes);
        let state = Arc::new(Mutex::new(PollState {
            bytes,
            events: pending,
            lost,
            error: None,
            last_poll: Instant::now(),
        }));
        let capacity = self.capacity;
        let sink = Arc::downgrade(&state);
        let task = tokio::spawn(async move {
            while let Some(item) = watch.events.recv().await {
                let Some(state) = sink.upgrade() else { return };
                let mut s = lock(&state);
                match item {
                    Ok(ev) => {
                        if !s.buffer(ev, capacity) {
                            s.lost += 1;
                        }
                    }
                    Err(e) => {
                        s.error = Some(e);
                        return;
                    }
                }
            }
        });
        let polled = Arc::new(Polled {
            state,
            task,
            root,
            opts,
        });
        lock(&self.map).insert(id, polled);
        Ok(())
    }

    /// Every watcher with its pending events, for a live upgrade.
    pub fn image(&self) -> Vec<crate::proto::envd::handover::Watcher> {
        lock(&self.map)
            .iter()
            .map(|(id, p)| {
                let s = lock(&p.state);
                crate::proto::envd::handover::Watcher {
                    id: id.clone(),
                    path: p.root.display().to_string(),
                    recursive: p.opts.recursive,
                    include_entry: p.opts.include_entry,
                    allow_network_mounts: p.opts.allow_network_mounts,
                    pending: s.events.iter().cloned().collect(),
                    lost: s.lost,
                }
            })
            .collect()
    }

    /// Re-arms the watchers of a previous envd image under their ids.
    /// Returns how many could not be (their directory is gone, ...).
    pub async fn restore(&self, watchers: Vec<crate::proto::envd::handover::Watcher>) -> usize {
        let mut failed = 0;
        for w in watchers {
            let opts = WatchOptions {
                recursive: w.recursive,
                include_entry: w.include_entry,
                allow_network_mounts: w.allow_network_mounts,
            };
            let pending: VecDeque<_> = w.pending.into_iter().take(self.capacity).collect();
            if let Err(e) = self
                .arm(w.id.clone(), PathBuf::from(&w.path), opts, pending, w.lost)
                .await
            {
                tracing::warn!(watcher = %w.id, error = %e.message, "handover: watcher not re-armed");
                failed += 1;
            }
        }
        failed
    }

    /// Returns and clears the buffered events. If events were dropped since
    /// the last poll, this poll fails with DATA_LOSS saying how many (the
    /// buffered events stay for the next poll).
    ///
    /// The events' encoding is counted in `answer` before they are taken:
    /// refused there, they stay buffered.
    pub fn poll(&self, id: &str, answer: &crate::answers::Share) -> Result<Vec<FilesystemEvent>> {
        let p = lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| unknown(id))?;
        let mut s = lock(&p.state);
        s.last_poll = Instant::now();
        if s.lost > 0 {
            let lost = std::mem::take(&mut s.lost);
            return Err(Error::new(
                Code::DataLoss,
                format!(
                    "watcher {id}: {lost} events were dropped because its buffer ({} events or {} MiB, \
                     {} MiB for all watchers) was full; the buffered events are returned by the next call",
                    self.capacity,
                    MAX_BYTES >> 20,
                    MAX_BYTES_TOTAL >> 20
                ),
            ));
        }
        if s.events.is_empty() {
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
        }
        answer.hold(s.bytes)?;
        Ok(s.take())
    }

    pub fn remove(&self, id: &str) -> Result<()> {
        lock(&self.map)
            .remove(id)
            .map(|_| ())
            .ok_or_else(|| unknown(id))
    }
}

fn unknown(id: &str) -> Error {
    Error::not_found(format!(
        "watcher '{id}' not found (removed, or not polled for too long)"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watcher's buffer stops at its byte bound, and every byte it counted
    /// toward all watchers' total is given back when polled or dropped.
    #[test]
    fn buffered_bytes_are_bounded_and_given_back() {
        let total = || BUFFERED_TOTAL.used();
        let start = total();
        let mut s = PollState {
            events: VecDeque::new(),
            bytes: 0,
            lost: 0,
            error: None,
            last_poll: Instant::now(),
        };
        let ev = FilesystemEvent {
            name: "n".repeat(4000),
            r#type: 1,
            entry: None,
        };
        let mut kept = 0;
        while s.buffer(ev.clone(), usize::MAX) {
            kept += 1;
        }
        assert_eq!(kept, MAX_BYTES / cost(&ev));
        assert_eq!(total() - start, kept * cost(&ev));
        assert_eq!(s.take().len(), kept);
        assert_eq!(total(), start);
        assert!(s.buffer(ev.clone(), 1));
        assert!(!s.buffer(ev, 1), "the count bound holds too");
        drop(s);
        assert_eq!(total(), start);
    }
}
