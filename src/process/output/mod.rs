//! A process's output history: a bounded log of chunks with absolute byte
//! offsets, read by any number of subscribers, ended by the process's `end`.
//!
//! Offsets count every output byte of the process (stdout, stderr and pty
//! together) from 0, in the order envd read them. The log keeps the most recent
//! `capacity` bytes (plus at most one read chunk), so a client that re-attaches
//! can resume from an offset without loss, or learn exactly how much is gone.
//!
//! Back-pressure: a producer never lets an *attached* subscriber fall more than
//! `capacity` bytes behind; it waits instead, which in turn stops reading the
//! pipe and so blocks the child's `write()`. With no subscriber attached the
//! producer never waits and the oldest output is dropped.
//!
//! All logs together also share one [`Budget`]: while the total retained
//! exceeds it, a producer trims its own log's oldest (already read) output
//! down to [`FLOOR`], so many unattached processes cannot add up to unbounded
//! memory. Dropped output is reported on re-attach as `output_lost`, as for
//! the per-process cap.

mod budget;
mod chunks;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use crate::proto::process::process_event::EndEvent;
use crate::status::{Error, Result};

pub use budget::{Budget, FLOOR};
use chunks::{compact, max_chunks, Chunk, Inner, MERGE_MAX, READ_MAX};

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    Pty,
}

impl Source {
    /// Its number in a handover or crash record.
    pub fn code(self) -> u32 {
        match self {
            Source::Stdout => 0,
            Source::Stderr => 1,
            Source::Pty => 2,
        }
    }

    pub fn from_code(code: u32) -> Option<Source> {
        match code {
            0 => Some(Source::Stdout),
            1 => Some(Source::Stderr),
            2 => Some(Source::Pty),
            _ => None,
        }
    }
}

/// Where a log publishes what it appends for a crash record: shared memory
/// that outlives envd in systemd's fd store.
#[derive(Debug)]
pub struct Mirror {
    /// The end offset.
    pub end: &'static AtomicU64,
    /// The newest bytes, if the command has a ring.
    pub tail: Option<crate::handover::tails::Tail>,
}

/// A log's content, carried across a live upgrade.
#[derive(Debug, Default)]
pub struct LogImage {
    pub start: u64,
    pub end: u64,
    pub chunks: Vec<(u64, Source, Bytes)>,
    pub finished: Option<EndEvent>,
}

/// See the module documentation.
#[derive(Debug)]
pub struct OutputLog {
    inner: Mutex<Inner>,
    capacity: u64,
    budget: Arc<Budget>,
    /// Bumped on every change; producers and subscribers wait on it.
    changed: watch::Sender<()>,
    /// Where appends are published for a crash record.
    mirror: std::sync::OnceLock<Mirror>,
}

/// What a subscriber reads next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    Data(Source, Bytes),
    End(EndEvent),
}

impl OutputLog {
    pub fn new(capacity: usize, budget: Arc<Budget>) -> Arc<OutputLog> {
        Arc::new(OutputLog {
            inner: Mutex::new(Inner::default()),
            capacity: capacity as u64,
            budget,
            changed: watch::Sender::new(()),
            mirror: std::sync::OnceLock::new(),
        })
    }

    /// Largest chunk appends are merged into: [`MERGE_MAX`], or less for a
    /// small capacity, so that dropping the oldest chunk drops little.
    fn merge_max(&self) -> usize {
        usize::try_from(self.capacity / 16).map_or(MERGE_MAX, |m| m.min(MERGE_MAX))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_replace(());
    }

    /// Appends output, waiting while an attached subscriber is too far behind
    /// (the pumps reserve and commit themselves; this is for tests).
    #[cfg(test)]
    pub async fn append(&self, source: Source, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let room = self.reserve(data.len(), true).await;
        self.commit(room, source, data);
    }

    /// Waits until output may be appended without letting an attached
    /// subscriber fall too far behind, and reserves room for it: `want`
    /// bytes, or with `whole` unset as many as there is room for, once that
    /// is at least a quarter of what a subscriber may lag (never a trickle of
    /// tiny reads). A pump reserves once its fd is readable and before it
    /// reads, and reads without waiting: whatever it reads goes into the log
    /// at once, never waiting in its hands (where a crash of envd would lose
    /// it without a trace), and no room stays reserved across a wait.
    pub async fn reserve(&self, want: usize, whole: bool) -> Reserved<'_> {
        let mut rx = self.changed.subscribe();
        loop {
            rx.mark_unchanged();
            if let Some(room) = self.try_reserve(want, whole) {
                return room;
            }
            if rx.changed().await.is_err() {
                return Reserved {
                    log: self,
                    bytes: 0,
                    held: false,
                };
            }
        }
    }

    /// [`Self::reserve`] without waiting: `None` if there is no room now.
    pub fn try_reserve(&self, want: usize, whole: bool) -> Option<Reserved<'_>> {
        let mut g = self.lock();
        let bytes = self.room(&g, want as u64, whole)?;
        Some(self.hold(&mut g, bytes))
    }

    /// Room for `bytes` whether or not there is any: a reader that expects
    /// its fd's end reads one byte to see it, rather than wait for room
    /// that a client that stopped reading may never make.
    pub fn overdraw(&self, bytes: usize) -> Reserved<'_> {
        let mut g = self.lock();
        self.hold(&mut g, bytes as u64)
    }

    fn hold(&self, g: &mut Inner, bytes: u64) -> Reserved<'_> {
        g.reserved += bytes;
        g.reservations += 1;
        Reserved {
            log: self,
            bytes: usize::try_from(bytes).unwrap_or(usize::MAX),
            held: true,
        }
    }

    /// What [`Self::reserve`] may grant now.
    fn room(&self, g: &Inner, want: u64, whole: bool) -> Option<u64> {
        // While a live upgrade quiesces, nobody will read again in this
        // image: appending beats holding bytes in a pump's hands.
        if crate::handover::quiesce::requested() {
            return Some(want);
        }
        let Some(c) = g.slowest() else {
            return Some(want);
        };
        if c == g.end && g.reservations == 0 {
            return Some(want);
        }
        // Over the shared budget, an attached subscriber may fall only
        // [`FLOOR`] behind: its unread bytes cannot be dropped, so many
        // attached clients that do not read would otherwise hold `capacity`
        // each (300 took envd to +547 MiB).
        let ahead = if self.budget.over() {
            FLOOR.min(self.capacity)
        } else {
            self.capacity
        };
        let room = ahead.saturating_sub(g.end - c + g.reserved);
        let least = if whole {
            want
        } else {
            want.min(ahead / 4).max(1)
        };
        let chunks = g.unread_chunks(c) + g.reservations;
        (room >= least && chunks < max_chunks(self.capacity)).then_some(room.min(want))
    }

    /// Appends what was read into `room` (at most its size), without
    /// waiting.
    pub fn commit(&self, mut room: Reserved<'_>, source: Source, data: Bytes) {
        let mut g = self.lock();
        room.release(&mut g);
        if data.is_empty() {
            drop(g);
            // The room given back may be what another reader waits for.
            self.notify();
            return;
        }
        let before = g.cost();
        let mirror = self.mirror.get();
        if let Some(t) = mirror.and_then(|m| m.tail.as_ref()) {
            t.record(g.end, source, &data);
        }
        g.push(source, data, self.merge_max());
        if let Some(m) = mirror {
            m.end.store(g.end, Ordering::Release);
        }
        self.budget.add(g.cost() - before, false);
        self.trim(&mut g);
        drop(g);
        self.notify();
    }

    /// Drops the oldest read output beyond the capacity, and beyond
    /// [`FLOOR`] while all logs together are over the budget.
    fn trim(&self, g: &mut Inner) {
        let floor = FLOOR.min(self.capacity);
        let budget = &self.budget;
        g.drop_oldest(budget, |g| {
            g.exceeds(self.capacity) || (budget.over() && g.exceeds(floor))
        });
    }

    /// Whether all logs together are over their shared budget.
    pub fn pressed(&self) -> bool {
        self.budget.over()
    }

    /// Publishes appends to `end` (and a ring, if `tail` gives one for the
    /// lowest offset it is to hold) from now on.
    pub fn mirror_to(
        &self,
        end: &'static AtomicU64,
        tail: impl FnOnce(u64) -> Option<crate::handover::tails::Tail>,
    ) {
        let g = self.lock();
        end.store(g.end, Ordering::Release);
        // The ring starts with the newest bytes the log holds: output that a
        // previous envd image read and no client has taken yet survives a
        // crash after a takeover or a live upgrade too.
        let from = g
            .end
            .saturating_sub(crate::handover::tails::RING)
            .max(g.start);
        let tail = tail(from);
        if let Some(t) = &tail {
            for c in g.chunks.iter().filter(|c| c.end() > from) {
                let skip = usize::try_from(from.saturating_sub(c.offset)).unwrap_or(0);
                t.record(c.offset + skip as u64, c.source, &c.data[skip..]);
            }
        }
        let _ = self.mirror.set(Mirror { end, tail });
    }

    /// Offset one past the newest byte, and the `end` once final.
    pub fn image_end(&self) -> (u64, Option<EndEvent>) {
        let g = self.lock();
        (g.end, g.finished.clone())
    }

    /// Wakes producers and subscribers to re-check (a quiesce began).
    pub fn wake(&self) {
        self.notify();
    }

    /// What the log holds, for a live upgrade.
    pub fn image(&self) -> LogImage {
        let g = self.lock();
        LogImage {
            start: g.start,
            end: g.end,
            chunks: g
                .chunks
                .iter()
                .map(|c| (c.offset, c.source, c.data.clone()))
                .collect(),
            finished: g.finished.clone(),
        }
    }

    /// A log holding what a previous envd image's log held. Chunks that do
    /// not line up with `start..end` are dropped (and so reported lost).
    pub fn restore(capacity: usize, budget: Arc<Budget>, image: LogImage) -> Arc<OutputLog> {
        let mut inner = Inner {
            start: image.end.min(image.start),
            end: image.end,
            finished: image.finished,
            ..Inner::default()
        };
        let mut next = None;
        for (offset, source, data) in image.chunks {
            let len = data.len() as u64;
            let contiguous = next.is_none_or(|n| n == offset);
            if data.is_empty() || !contiguous || offset.saturating_add(len) > image.end {
                continue;
            }
            if next.is_none() {
                inner.start = offset;
            }
            next = Some(offset + len);
            inner.chunks.push_back(Chunk {
                offset,
                source,
                data,
            });
        }
        if next != Some(inner.end) {
            // A gap at the end: keep nothing rather than a log with a hole.
            inner.chunks.clear();
            inner.start = inner.end;
        }
        let finished = inner.finished.is_some();
        budget.add(inner.cost(), finished);
        let log = Arc::new(OutputLog {
            inner: Mutex::new(inner),
            capacity: capacity as u64,
            budget,
            changed: watch::Sender::new(()),
            mirror: std::sync::OnceLock::new(),
        });
        if finished {
            log.budget.admit_ended(&log);
        }
        log
    }

    /// Marks the output complete; subscribers read `end` after the last byte.
    /// What stays retained is compacted first (see [`compact`]).
    pub fn finish(self: &Arc<Self>, end: EndEvent) {
        let mut g = self.lock();
        // An ended log appends no more, so it is trimmed here (and as its
        // subscribers read), or ended logs would keep `capacity` each
        // whatever the budget: as a running one would be, before compaction
        // (which makes chunks of up to 1 MiB that a trim could only drop
        // whole); then ended logs are held to half the budget, the oldest
        // giving way first.
        self.trim(&mut g);
        let before = g.cost();
        compact(&mut g.chunks);
        // Fewer chunks, the same bytes.
        self.budget.sub(before - g.cost(), false);
        g.finished = Some(end);
        self.budget.count_ended(g.cost());
        drop(g);
        self.budget.admit_ended(self);
        self.notify();
    }

    /// A subscriber for output from now on.
    pub fn subscribe_live(self: &Arc<Self>) -> Subscription {
        let mut g = self.lock();
        let at = g.end;
        self.register(&mut g, at)
    }

    /// A subscriber for everything still retained.
    pub fn subscribe_retained(self: &Arc<Self>) -> Subscription {
        let mut g = self.lock();
        let at = g.start;
        self.register(&mut g, at)
    }

    /// A subscriber from `offset`. Returns it with the offset it actually
    /// starts at and how many requested bytes were already dropped.
    pub fn subscribe_from(self: &Arc<Self>, offset: u64) -> Result<(Subscription, u64, u64)> {
        let mut g = self.lock();
        if offset > g.end {
            return Err(Error::invalid(format!(
                "resume offset {offset} is beyond the end of the output ({})",
                g.end
            )));
        }
        let at = offset.max(g.start);
        let lost = at - offset;
        Ok((self.register(&mut g, at), at, lost))
    }

    fn register(self: &Arc<Self>, g: &mut Inner, at: u64) -> Subscription {
        let id = g.next_id;
        g.next_id += 1;
        g.cursors.insert(id, at);
        Subscription {
            log: self.clone(),
            id,
            rx: self.changed.subscribe(),
        }
    }
}

impl Drop for OutputLog {
    fn drop(&mut self) {
        let g = self.lock();
        self.budget.sub(g.cost(), g.finished.is_some());
    }
}

/// Room reserved in a log ([`OutputLog::reserve`]); given back if dropped
/// unused.
#[derive(Debug)]
pub struct Reserved<'a> {
    log: &'a OutputLog,
    bytes: usize,
    /// Counted in the log's reservations until released.
    held: bool,
}

impl Reserved<'_> {
    /// How many bytes may be appended.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn release(&mut self, g: &mut Inner) {
        if self.held {
            g.reserved -= self.bytes as u64;
            g.reservations -= 1;
            self.held = false;
        }
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if self.held {
            let mut g = self.log.lock();
            self.release(&mut g);
            drop(g);
            self.log.notify();
        }
    }
}

/// A reader of an [`OutputLog`]. Dropping it detaches (and releases any
/// producer waiting on it).
#[derive(Debug)]
pub struct Subscription {
    log: Arc<OutputLog>,
    id: u64,
    rx: watch::Receiver<()>,
}

impl Subscription {
    /// The next chunk, or the end. Cancel-safe: the cursor only moves in the
    /// same poll that returns the data.
    pub async fn next(&mut self) -> Next {
        loop {
            self.rx.mark_unchanged();
            if let Some(next) = self.try_next() {
                return next;
            }
            if self.rx.changed().await.is_err() {
                // The log is gone; cannot happen while we hold an Arc to it.
                continue;
            }
        }
    }

    fn try_next(&mut self) -> Option<Next> {
        let mut g = self.log.lock();
        let cursor = *g.cursors.get(&self.id)?;
        if cursor < g.end {
            let cursor = cursor.max(g.start);
            let idx = g.chunks.partition_point(|c| c.end() <= cursor);
            let chunk = &g.chunks[idx];
            // Within the chunk, so below its (usize) length.
            let skip = usize::try_from(cursor - chunk.offset).unwrap_or(0);
            let take = (chunk.data.len() - skip).min(READ_MAX);
            let next = Next::Data(chunk.source, chunk.data.slice(skip..skip + take));
            let new_cursor = cursor + take as u64;
            g.cursors.insert(self.id, new_cursor);
            if g.finished.is_some() && self.log.budget.over() {
                self.log.trim(&mut g);
            }
            drop(g);
            self.log.notify();
            return Some(next);
        }
        g.finished.clone().map(Next::End)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.log.lock().cursors.remove(&self.id);
        self.log.notify();
    }
}
