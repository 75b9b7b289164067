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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::watch;

use crate::proto::process::process_event::EndEvent;
use crate::status::{Error, Result};

/// Which output a chunk came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Stdout,
    Stderr,
    Pty,
}

#[derive(Debug)]
struct Chunk {
    offset: u64,
    source: Source,
    data: Bytes,
}

impl Chunk {
    fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

#[derive(Debug, Default)]
struct Inner {
    chunks: VecDeque<Chunk>,
    /// Offset of the oldest retained byte.
    start: u64,
    /// Offset one past the newest byte.
    end: u64,
    /// Subscriber id → offset of the next byte it will read.
    cursors: HashMap<u64, u64>,
    next_id: u64,
    finished: Option<EndEvent>,
}

impl Inner {
    fn retained(&self) -> u64 {
        self.end - self.start
    }
    /// What the log counts against the shared [`Budget`]: its bytes plus
    /// [`CHUNK_COST`] per chunk.
    fn cost(&self) -> u64 {
        self.retained() + self.chunks.len() as u64 * CHUNK_COST
    }
    fn slowest(&self) -> Option<u64> {
        self.cursors.values().copied().min()
    }
    /// Whether the log holds more than `capacity` bytes, or more chunks than
    /// a log of that capacity may.
    fn exceeds(&self, capacity: u64) -> bool {
        self.retained() > capacity || self.chunks.len() > max_chunks(capacity)
    }
    /// Chunks holding bytes at or after `cursor`.
    fn unread_chunks(&self, cursor: u64) -> usize {
        self.chunks.len() - self.chunks.partition_point(|c| c.end() <= cursor)
    }
    /// Appends `data` at the end: into the newest chunk when both are from
    /// the same source and together at most `merge_max` (a small copy),
    /// else as a chunk of its own. Output written a few bytes at a time thus
    /// costs about its size, not one chunk per write.
    fn push(&mut self, source: Source, data: Bytes, merge_max: usize) {
        let offset = self.end;
        self.end += data.len() as u64;
        if let Some(last) = self.chunks.back_mut() {
            if last.source == source && last.data.len() + data.len() <= merge_max {
                let mut merged = Vec::with_capacity(last.data.len() + data.len());
                merged.extend_from_slice(&last.data);
                merged.extend_from_slice(&data);
                last.data = Bytes::from(merged);
                return;
            }
        }
        self.chunks.push_back(Chunk {
            offset,
            source,
            data,
        });
    }
    /// Drops the oldest chunks while `too_much` holds, never one that a
    /// subscriber has not read yet.
    fn drop_oldest(&mut self, budget: &Budget, too_much: impl Fn(&Inner) -> bool) {
        let slowest = self.slowest().unwrap_or(u64::MAX);
        while too_much(self) {
            match self.chunks.front() {
                Some(c) if c.end() <= slowest => {
                    let freed = c.data.len() as u64 + CHUNK_COST;
                    self.start = c.end();
                    self.chunks.pop_front();
                    budget.used.fetch_sub(freed, Ordering::Relaxed);
                    if self.finished.is_some() {
                        budget.ended.fetch_sub(freed, Ordering::Relaxed);
                    }
                }
                _ => break,
            }
        }
    }
}

/// Largest chunk that appends of one source are merged into.
const MERGE_MAX: usize = 4 * 1024;
/// Retained bytes per chunk a log may hold at most, on average: the chunk
/// count is bounded by `capacity / BYTES_PER_CHUNK`, so that output whose
/// writes alternate between stdout and stderr a byte at a time (which
/// cannot merge) still costs memory in proportion to the capacity.
const BYTES_PER_CHUNK: u64 = 256;
/// What a chunk costs beyond its bytes, as the shared budget counts it (its
/// entry in the log, the `Bytes` handle, the allocator's rounding): so that
/// many logs of tiny chunks stay within the budget too.
const CHUNK_COST: u64 = 64;

/// Most chunks a log of `capacity` bytes holds (see [`BYTES_PER_CHUNK`]).
fn max_chunks(capacity: u64) -> usize {
    usize::try_from(capacity / BYTES_PER_CHUNK).map_or(usize::MAX, |n| n.max(64))
}

/// Largest chunk [`compact`] makes.
const COMPACT_MAX: usize = 1 << 20;
/// Most bytes one subscriber read hands out (what a pump reads at most), so
/// compacted chunks do not make larger messages.
const READ_MAX: usize = super::supervise::PIPE_READ_CHUNK;

/// Copies runs of adjacent chunks of one source into single buffers of up to
/// [`COMPACT_MAX`]. Each chunk a pump read holds a share of a read buffer
/// (64 or 256 KiB) from wherever the allocator had room; an ended log keeps
/// its chunks for a while, and scattered across the heap they kept many of
/// its pages resident after a burst. Offsets are unchanged.
fn compact(chunks: &mut VecDeque<Chunk>) {
    if chunks.len() < 2 {
        return;
    }
    let old: Vec<Chunk> = chunks.drain(..).collect();
    let mut i = 0;
    while i < old.len() {
        let (offset, source) = (old[i].offset, old[i].source);
        let mut len = old[i].data.len();
        let mut j = i + 1;
        while j < old.len()
            && old[j].source == source
            && old[j].offset == offset + len as u64
            && len + old[j].data.len() <= COMPACT_MAX
        {
            len += old[j].data.len();
            j += 1;
        }
        let mut data = Vec::with_capacity(len);
        for c in &old[i..j] {
            data.extend_from_slice(&c.data);
        }
        chunks.push_back(Chunk {
            offset,
            source,
            data: Bytes::from(data),
        });
        i = j;
    }
}

/// Output a log keeps even when the shared budget is exceeded.
pub const FLOOR: u64 = 64 * 1024;

/// Output retained by all logs together (bytes plus [`CHUNK_COST`] per
/// chunk), and its limit.
#[derive(Debug)]
pub struct Budget {
    used: AtomicU64,
    /// What ended processes' logs count of `used` (the cost of every log
    /// whose `finished` is set): at most half of `max`, so that output kept
    /// for re-attaching to ended commands never presses the running ones by
    /// itself. A finished log changes only by [`Inner::drop_oldest`].
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

    fn over(&self) -> bool {
        self.used() > self.max
    }

    fn ended_over(&self) -> bool {
        self.ended.load(Ordering::Relaxed) > self.max / 2
    }

    /// Counts `log` (just ended) among the ended logs, and while they keep
    /// more than half the budget, drops the read output of the oldest,
    /// then if need be the oldest output of `log` itself.
    fn admit_ended(&self, log: &Arc<OutputLog>) {
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
            let others = self.ended.load(Ordering::Relaxed) - g.cost();
            g.drop_oldest(self, |g| others + g.cost() > self.max / 2);
        }
    }
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
    /// Where the end offset is published for a crash record (shared memory
    /// that outlives envd in systemd's fd store).
    mirror: std::sync::OnceLock<&'static AtomicU64>,
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

    /// Appends output, waiting while an attached subscriber is too far behind.
    pub async fn append(&self, source: Source, data: Bytes) {
        if data.is_empty() {
            return;
        }
        let mut rx = self.changed.subscribe();
        loop {
            rx.mark_unchanged();
            {
                let mut g = self.lock();
                // While a live upgrade quiesces, nobody will read again in
                // this image: appending beats holding bytes in a pump's hands.
                let max_chunks = max_chunks(self.capacity);
                // Over the shared budget, an attached subscriber may fall
                // only [`FLOOR`] behind: its unread bytes cannot be dropped,
                // so many attached clients that do not read would otherwise
                // hold `capacity` each (300 took envd to +547 MiB).
                let ahead = if self.budget.over() {
                    FLOOR.min(self.capacity)
                } else {
                    self.capacity
                };
                let fits = match g.slowest() {
                    _ if crate::handover::quiesce::requested() => true,
                    None => true,
                    Some(c) => {
                        c == g.end
                            || (g.end - c + data.len() as u64 <= ahead
                                && g.unread_chunks(c) < max_chunks)
                    }
                };
                if fits {
                    let before = g.cost();
                    g.push(source, data, self.merge_max());
                    if let Some(m) = self.mirror.get() {
                        m.store(g.end, Ordering::Release);
                    }
                    self.budget
                        .used
                        .fetch_add(g.cost() - before, Ordering::Relaxed);
                    self.trim(&mut g);
                    drop(g);
                    self.notify();
                    return;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
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

    /// Publishes the end offset to `cell` from now on.
    pub fn mirror_to(&self, cell: &'static AtomicU64) {
        cell.store(self.lock().end, Ordering::Release);
        let _ = self.mirror.set(cell);
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
        budget.used.fetch_add(inner.cost(), Ordering::Relaxed);
        let finished = inner.finished.is_some();
        if finished {
            budget.ended.fetch_add(inner.cost(), Ordering::Relaxed);
        }
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
        self.budget
            .used
            .fetch_sub(before - g.cost(), Ordering::Relaxed);
        g.finished = Some(end);
        self.budget.ended.fetch_add(g.cost(), Ordering::Relaxed);
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
        self.budget.used.fetch_sub(g.cost(), Ordering::Relaxed);
        if g.finished.is_some() {
            self.budget.ended.fetch_sub(g.cost(), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn end() -> EndEvent {
        EndEvent {
            exit_code: 0,
            exited: true,
            status: "exit status 0".into(),
            error: None,
            ..Default::default()
        }
    }

    /// An ended log is compacted: a replay from any offset gives the same
    /// bytes, sources and offsets, in reads of at most 64 KiB.
    #[tokio::test]
    async fn finishing_compacts_and_replays_the_same_output() {
        let log = OutputLog::new(1 << 20, Budget::new(u64::MAX));
        let mut want = Vec::new();
        for i in 0..40u8 {
            let source = if i % 8 == 7 {
                Source::Stderr
            } else {
                Source::Stdout
            };
            let data = vec![i; 3000 + usize::from(i) * 1000];
            want.push((source, data.clone()));
            log.append(source, Bytes::from(data)).await;
        }
        log.finish(end());
        assert!(
            log.lock().chunks.len() < 12,
            "{} chunks",
            log.lock().chunks.len()
        );
        for from in [0u64, 1, 4999, 100_000] {
            let (mut sub, at, lost) = log.subscribe_from(from).unwrap();
            assert_eq!((at, lost), (from, 0));
            let mut got: Vec<(Source, Vec<u8>)> = Vec::new();
            while let Next::Data(src, b) = sub.next().await {
                assert!(b.len() <= READ_MAX);
                match got.last_mut() {
                    Some((s, v)) if *s == src => v.extend_from_slice(&b),
                    _ => got.push((src, b.to_vec())),
                }
            }
            // The expected stream from `from`, runs of one source joined.
            let mut expect: Vec<(Source, Vec<u8>)> = Vec::new();
            let mut skip = usize::try_from(from).unwrap();
            for (src, d) in &want {
                let d = if skip >= d.len() {
                    skip -= d.len();
                    continue;
                } else {
                    let rest = &d[skip..];
                    skip = 0;
                    rest
                };
                match expect.last_mut() {
                    Some((s, v)) if s == src => v.extend_from_slice(d),
                    _ => expect.push((*src, d.to_vec())),
                }
            }
            assert!(got == expect, "replay from {from} differs");
        }
    }

    /// Appends `n` one-byte outputs, stdout and stderr by turns (which
    /// cannot merge).
    async fn append_alternating(log: &OutputLog, n: usize) {
        for i in 0..n {
            let source = if i % 2 == 0 {
                Source::Stdout
            } else {
                Source::Stderr
            };
            log.append(source, Bytes::from_static(b"c")).await;
        }
    }

    /// Appends of a few bytes merge per source; when sources alternate (no
    /// merging) the chunk count is bounded, and a reader sees every byte in
    /// order either way.
    #[tokio::test]
    async fn tiny_appends_merge_and_the_chunk_count_is_bounded() {
        let log = OutputLog::new(1 << 20, Budget::new(u64::MAX));
        let mut sub = log.subscribe_live();
        for _ in 0..100_000 {
            log.append(Source::Stdout, Bytes::from_static(b"ab")).await;
            // The reader keeps up, so nothing is dropped for it.
            while let Some(Next::Data(..)) = sub.try_next() {}
        }
        // 200,000 bytes in chunks of up to MERGE_MAX.
        assert!(log.lock().chunks.len() <= 200_000 / MERGE_MAX + 1);
        assert_eq!(log.lock().retained(), 200_000);
        drop(sub);
        append_alternating(&log, 100_000).await;
        assert!(log.lock().chunks.len() <= max_chunks(1 << 20));
        let (mut sub, at, lost) = log.subscribe_from(0).unwrap();
        assert!(lost > 0 && at == lost);
        let mut n = 0u64;
        while let Some(Next::Data(..)) = sub.try_next() {
            n += 1;
        }
        assert_eq!(n, log.lock().chunks.len() as u64);
    }

    /// Chunks count against the shared budget too: many logs of one-byte
    /// chunks (8,192 each, 8 KiB of bytes) are trimmed once their chunks
    /// exceed it, though their bytes alone would not.
    #[tokio::test]
    async fn the_shared_budget_counts_chunks() {
        let budget = Budget::new(1 << 20);
        let logs: Vec<_> = (0..50)
            .map(|_| OutputLog::new(4 << 20, budget.clone()))
            .collect();
        for log in &logs {
            append_alternating(log, 8192).await;
        }
        let chunks: usize = logs.iter().map(|l| l.lock().chunks.len()).sum();
        assert!(chunks < 50 * 1024, "{chunks} chunks kept");
        assert!(budget.used() < 2 << 20, "{} counted", budget.used());
        drop(logs);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn drops_oldest_without_subscribers_and_reports_loss() {
        let log = OutputLog::new(10, Budget::new(u64::MAX));
        for i in 0..5u8 {
            log.append(Source::Stdout, Bytes::from(vec![i; 4])).await;
        }
        // 20 bytes written, capacity 10: the oldest chunks are gone.
        let (mut sub, at, lost) = log.subscribe_from(0).unwrap();
        assert_eq!(at, 12);
        assert_eq!(lost, 12);
        assert_eq!(
            sub.next().await,
            Next::Data(Source::Stdout, Bytes::from(vec![3; 4]))
        );
        assert!(log.subscribe_from(21).is_err());
    }

    #[tokio::test]
    async fn shared_budget_trims_to_the_floor_and_is_returned() {
        let budget = Budget::new(3 * FLOOR);
        let logs: Vec<_> = (0..4)
            .map(|_| OutputLog::new(4 * usize::try_from(FLOOR).unwrap(), budget.clone()))
            .collect();
        for log in &logs {
            for _ in 0..4 {
                log.append(
                    Source::Stdout,
                    Bytes::from(vec![0; usize::try_from(FLOOR).unwrap()]),
                )
                .await;
            }
        }
        // Over budget: later logs were trimmed to the floor.
        assert!(budget.used() <= 3 * FLOOR + 4 * FLOOR, "{}", budget.used());
        let (_, at, lost) = logs[3].subscribe_from(0).unwrap();
        assert_eq!((at, lost), (3 * FLOOR, 3 * FLOOR));
        drop(logs);
        assert_eq!(budget.used(), 0);
    }

    /// Ended logs keep at most half the budget together (the oldest give
    /// their output up first), so they never press running logs by
    /// themselves; their share is given back when they go.
    #[tokio::test]
    async fn ended_logs_keep_half_the_budget() {
        let kib = |n: usize| Bytes::from(vec![0; n << 10]);
        let budget = Budget::new(1 << 20);
        let mut ended = Vec::new();
        for _ in 0..8 {
            let log = OutputLog::new(1 << 20, budget.clone());
            for _ in 0..4 {
                log.append(Source::Stdout, kib(64)).await;
            }
            log.finish(end());
            ended.push(log);
        }
        let kept = budget.ended.load(Ordering::Relaxed);
        assert!(kept <= 512 << 10, "ended logs keep {kept}");
        assert_eq!(kept, budget.used());
        // The newest keep their output; the oldest gave theirs up.
        let (_, at, lost) = ended[7].subscribe_from(0).unwrap();
        assert_eq!((at, lost), (0, 0));
        let (_, _, lost) = ended[0].subscribe_from(0).unwrap();
        assert_eq!(lost, 256 << 10);
        assert!(!budget.over());
        // A running log still has the other half unpressed.
        let running = OutputLog::new(1 << 20, budget.clone());
        let mut sub = running.subscribe_live();
        for _ in 0..6 {
            running.append(Source::Stdout, kib(64)).await;
        }
        assert!(!running.pressed());
        while let Some(Next::Data(..)) = sub.try_next() {}
        drop(ended);
        assert_eq!(budget.ended.load(Ordering::Relaxed), 0);
        assert_eq!(budget.used(), running.lock().cost());
    }

    #[tokio::test]
    async fn resume_mid_chunk_and_end() {
        let log = OutputLog::new(100, Budget::new(u64::MAX));
        log.append(Source::Stdout, Bytes::from_static(b"hello"))
            .await;
        log.append(Source::Stderr, Bytes::from_static(b"world"))
            .await;
        log.finish(end());
        let (mut sub, at, lost) = log.subscribe_from(3).unwrap();
        assert_eq!((at, lost), (3, 0));
        assert_eq!(
            sub.next().await,
            Next::Data(Source::Stdout, Bytes::from_static(b"lo"))
        );
        assert_eq!(
            sub.next().await,
            Next::Data(Source::Stderr, Bytes::from_static(b"world"))
        );
        assert_eq!(sub.next().await, Next::End(end()));
    }

    #[tokio::test]
    async fn slow_subscriber_applies_back_pressure() {
        let log = OutputLog::new(8, Budget::new(u64::MAX));
        let mut sub = log.subscribe_live();
        log.append(Source::Stdout, Bytes::from_static(b"12345678"))
            .await;
        let producer = {
            let log = log.clone();
            tokio::spawn(async move { log.append(Source::Stdout, Bytes::from_static(b"9")).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !producer.is_finished(),
            "producer must wait for the subscriber"
        );
        assert_eq!(
            sub.next().await,
            Next::Data(Source::Stdout, Bytes::from_static(b"12345678"))
        );
        producer.await.unwrap();
        assert_eq!(
            sub.next().await,
            Next::Data(Source::Stdout, Bytes::from_static(b"9"))
        );
        drop(sub);
        // Detached: the producer no longer waits.
        log.append(Source::Stdout, Bytes::from_static(b"abcdefghij"))
            .await;
    }
}
