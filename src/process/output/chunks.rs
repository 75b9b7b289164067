//! The chunks a log holds, their accounting and their compaction.

use std::collections::{HashMap, VecDeque};

use bytes::Bytes;

use super::{Budget, Source};
use crate::proto::process::process_event::EndEvent;

#[derive(Debug)]
pub(super) struct Chunk {
    pub(super) offset: u64,
    pub(super) source: Source,
    pub(super) data: Bytes,
}

impl Chunk {
    pub(super) fn end(&self) -> u64 {
        self.offset + self.data.len() as u64
    }
}

#[derive(Debug, Default)]
pub(super) struct Inner {
    pub(super) chunks: VecDeque<Chunk>,
    /// Offset of the oldest retained byte.
    pub(super) start: u64,
    /// Offset one past the newest byte.
    pub(super) end: u64,
    /// Subscriber id → offset of the next byte it will read.
    pub(super) cursors: HashMap<u64, u64>,
    pub(super) next_id: u64,
    pub(super) finished: Option<EndEvent>,
    /// Bytes producers may still append without waiting, and in how many
    /// reads ([`super::Reserved`]).
    pub(super) reserved: u64,
    pub(super) reservations: usize,
}

impl Inner {
    pub(super) fn retained(&self) -> u64 {
        self.end - self.start
    }
    /// What the log counts against the shared [`Budget`]: its bytes plus
    /// [`CHUNK_COST`] per chunk.
    pub(super) fn cost(&self) -> u64 {
        self.retained() + self.chunks.len() as u64 * CHUNK_COST
    }
    pub(super) fn slowest(&self) -> Option<u64> {
        self.cursors.values().copied().min()
    }
    /// Whether the log holds more than `capacity` bytes, or more chunks than
    /// a log of that capacity may.
    pub(super) fn exceeds(&self, capacity: u64) -> bool {
        self.retained() > capacity || self.chunks.len() > max_chunks(capacity)
    }
    /// Chunks holding bytes at or after `cursor`.
    pub(super) fn unread_chunks(&self, cursor: u64) -> usize {
        self.chunks.len() - self.chunks.partition_point(|c| c.end() <= cursor)
    }
    /// Appends `data` at the end: into the newest chunk when both are from
    /// the same source and together at most `merge_max` (a small copy),
    /// else as a chunk of its own. Output written a few bytes at a time thus
    /// costs about its size, not one chunk per write.
    pub(super) fn push(&mut self, source: Source, data: Bytes, merge_max: usize) {
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
    pub(super) fn drop_oldest(&mut self, budget: &Budget, too_much: impl Fn(&Inner) -> bool) {
        let slowest = self.slowest().unwrap_or(u64::MAX);
        while too_much(self) {
            match self.chunks.front() {
                Some(c) if c.end() <= slowest => {
                    let freed = c.data.len() as u64 + CHUNK_COST;
                    self.start = c.end();
                    self.chunks.pop_front();
                    budget.sub(freed, self.finished.is_some());
                }
                _ => break,
            }
        }
    }
}

/// Largest chunk that appends of one source are merged into.
pub(super) const MERGE_MAX: usize = 4 * 1024;
/// Retained bytes per chunk a log may hold at most, on average: the chunk
/// count is bounded by `capacity / BYTES_PER_CHUNK`, so that output whose
/// writes alternate between stdout and stderr a byte at a time (which
/// cannot merge) still costs memory in proportion to the capacity.
const BYTES_PER_CHUNK: u64 = 256;
/// What a chunk costs beyond its bytes, as the shared budget counts it (its
/// entry in the log, the `Bytes` handle, the allocator's rounding): so that
/// many logs of tiny chunks stay within the budget too.
pub(super) const CHUNK_COST: u64 = 64;

/// Most chunks a log of `capacity` bytes holds (see [`BYTES_PER_CHUNK`]).
pub(super) fn max_chunks(capacity: u64) -> usize {
    usize::try_from(capacity / BYTES_PER_CHUNK).map_or(usize::MAX, |n| n.max(64))
}

/// Largest chunk [`compact`] makes.
const COMPACT_MAX: usize = 1 << 20;
/// Most bytes one subscriber read hands out (what a pump reads at most), so
/// compacted chunks do not make larger messages.
pub(super) const READ_MAX: usize = crate::process::supervise::PIPE_READ_CHUNK;

/// Copies runs of adjacent chunks of one source into single buffers of up to
/// [`COMPACT_MAX`]. Each chunk a pump read holds a share of a read buffer
/// (64 or 256 KiB) from wherever the allocator had room; an ended log keeps
/// its chunks for a while, and scattered across the heap they kept many of
/// its pages resident after a burst. Offsets are unchanged.
pub(super) fn compact(chunks: &mut VecDeque<Chunk>) {
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
