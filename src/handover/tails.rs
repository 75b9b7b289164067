//! The newest output of each running command, in shared memory that
//! outlives envd in systemd's fd store: a crash record's output tails.
//!
//! The offset table ([`super::crash`]) tells a restarted envd where the old
//! one stopped reading each command's pipes. What the old envd had read but
//! not yet delivered to a client would be lost with its heap (a client
//! following a stream is usually a line or a few behind). So each log also
//! copies what it appends into a ring here, and the next envd puts the ring's
//! bytes back into the log: a client that re-attaches at the offset it had
//! reached loses nothing.
//!
//! Per slot: a header of [`HEADER_WORDS`] words (owner, the lowest offset
//! the ring still holds, a count of journal entries, then a journal of where
//! each run of one source began) and a ring of [`RING`] bytes. Written only
//! under the command's log lock, in an order that leaves a consistent part
//! readable whenever envd is killed: a journal entry before the count that
//! publishes it; the ring's new lowest offset before the bytes that
//! overwrite older ones; the end offset (the offset table's) last.
//!
//! Only the first [`TAIL_SLOTS`] slots have a ring, which bounds the shared
//! memory to 16 MiB however many commands run; a freed slot's ring pages go
//! back to the kernel.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::process::output::Source;
use crate::proto::envd::handover::Chunk;

pub const NAME: &str = "envd-tails";
/// Slots (of the offset table's) that have a ring.
pub const TAIL_SLOTS: u32 = 256;
/// Bytes of output each ring keeps.
pub const RING: u64 = 64 * 1024;
/// Words of a slot's header.
const HEADER_WORDS: usize = 32;
const OWNER: usize = 0;
const LOW: usize = 1;
const COUNT: usize = 2;
const JOURNAL: usize = 3;
/// Journal entries per slot: where the last runs of one source began.
const ENTRIES: u64 = (HEADER_WORDS - JOURNAL) as u64;
/// Where the rings start: after every slot's header, page aligned.
const RINGS_AT: u64 = TAIL_SLOTS as u64 * HEADER_WORDS as u64 * 8;
const SIZE: u64 = RINGS_AT + TAIL_SLOTS as u64 * RING;

/// The shared memory of all rings.
#[derive(Debug)]
pub struct Tails {
    file: File,
    words: &'static [AtomicU64],
    rings: *mut u8,
}

// SAFETY: `rings` points into a mapping that lives as long as envd; each
// slot's ring is written only through its `Tail`, under the owning log's
// lock, and read only by a later envd.
unsafe impl Send for Tails {}
// SAFETY: as for Send.
unsafe impl Sync for Tails {}

impl Tails {
    pub fn new() -> std::io::Result<Tails> {
        let len = usize::try_from(SIZE).map_err(std::io::Error::other)?;
        let (file, ptr) = super::memfd::mapped(c"envd-tails", len)?;
        let headers = usize::try_from(RINGS_AT / 8).unwrap_or(0);
        // SAFETY: the mapping starts with RINGS_AT bytes of zeroed, aligned
        // words and lives for the rest of envd's life; they are only
        // accessed as atomics.
        let words = unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), headers) };
        // SAFETY: RINGS_AT is within the mapping of SIZE bytes.
        let rings = unsafe { ptr.add(headers * 8) };
        Ok(Tails { file, words, rings })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    /// The ring of `slot` for command `seq`, to hold its output from offset
    /// `from` on (what its log holds from there is recorded next); none
    /// beyond [`TAIL_SLOTS`].
    pub fn claim(&self, slot: u32, seq: u64, from: u64) -> Option<Tail> {
        let header = self.header(slot)?;
        header[OWNER].store(0, Ordering::Release);
        header[LOW].store(from, Ordering::Release);
        header[COUNT].store(0, Ordering::Release);
        header[OWNER].store(seq + 1, Ordering::Release);
        let at = usize::try_from(u64::from(slot) * RING).ok()?;
        Some(Tail {
            header,
            // SAFETY: slot < TAIL_SLOTS, so the ring lies within the mapping.
            ring: unsafe { self.rings.add(at) },
        })
    }

    /// Gives `slot` up: its ring's pages go back to the kernel.
    pub fn free(&self, slot: u32) {
        let Some(header) = self.header(slot) else {
            return;
        };
        header[OWNER].store(0, Ordering::Release);
        if header[COUNT].swap(0, Ordering::AcqRel) == 0 {
            return;
        }
        let at = RINGS_AT + u64::from(slot) * RING;
        // SAFETY: punches a hole in our own memfd, within its size; the
        // pages read back as zeros, which nothing relies on.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                libc::off_t::try_from(at).unwrap_or(0),
                libc::off_t::try_from(RING).unwrap_or(0),
            )
        };
        if r != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "tail ring not given back");
        }
    }

    fn header(&self, slot: u32) -> Option<&'static [AtomicU64]> {
        if slot >= TAIL_SLOTS {
            return None;
        }
        let at = slot as usize * HEADER_WORDS;
        self.words.get(at..at + HEADER_WORDS)
    }
}

/// One command's ring.
#[derive(Debug)]
pub struct Tail {
    header: &'static [AtomicU64],
    ring: *mut u8,
}

// SAFETY: see `Tails`: the ring is written only under the owning log's lock.
unsafe impl Send for Tail {}
// SAFETY: as for Send.
unsafe impl Sync for Tail {}

impl Tail {
    /// Copies output appended at `offset` into the ring. The caller holds the
    /// log's lock and publishes the new end offset after this.
    pub fn record(&self, offset: u64, source: Source, data: &[u8]) {
        let count = self.header[COUNT].load(Ordering::Acquire);
        let last = (count > 0).then(|| self.entry(count - 1));
        if last.is_none_or(|w| w & 3 != u64::from(source.code())) {
            let slot = JOURNAL + usize::try_from(count % ENTRIES).unwrap_or(0);
            self.header[slot].store(offset << 2 | u64::from(source.code()), Ordering::Release);
            self.header[COUNT].store(count + 1, Ordering::Release);
        }
        let len = data.len() as u64;
        let end = offset + len;
        let low = end.saturating_sub(RING);
        if low > self.header[LOW].load(Ordering::Acquire) {
            self.header[LOW].store(low, Ordering::Release);
        }
        let skip = usize::try_from(len.saturating_sub(RING)).unwrap_or(0);
        let mut bytes = &data[skip..];
        let ring = usize::try_from(RING).unwrap_or(0);
        let mut at = usize::try_from((offset + skip as u64) % RING).unwrap_or(0);
        while !bytes.is_empty() {
            let n = bytes.len().min(ring - at);
            // SAFETY: `at + n <= RING`, within this slot's ring; the source
            // is a live slice that cannot overlap shared memory of ours.
            unsafe {
                std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ring.add(at), n);
            }
            bytes = &bytes[n..];
            at = 0;
        }
    }

    fn entry(&self, i: u64) -> u64 {
        let slot = JOURNAL + usize::try_from(i % ENTRIES).unwrap_or(0);
        self.header[slot].load(Ordering::Acquire)
    }
}

/// What the ring of `slot` holds of command `seq`'s output up to `end` (the
/// offset table's): the chunks, from the lowest offset still whole. Nothing
/// if the slot has no ring or was another command's.
pub fn read(file: &File, slot: u32, seq: u64, end: u64) -> Option<(u64, Vec<Chunk>)> {
    if slot >= TAIL_SLOTS {
        return None;
    }
    let mut raw = [0u8; HEADER_WORDS * 8];
    file.read_exact_at(&mut raw, u64::from(slot) * HEADER_WORDS as u64 * 8)
        .ok()?;
    let word = |i: usize| u64::from_ne_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or_default());
    if word(OWNER) != seq + 1 {
        return None;
    }
    let count = word(COUNT);
    // An entry being written when envd died overwrote the oldest one: that
    // one is not trusted either.
    let first = count.saturating_sub(ENTRIES - 1);
    let runs: Vec<(u64, u32)> = (first..count)
        .map(|i| {
            let w = word(JOURNAL + usize::try_from(i % ENTRIES).unwrap_or(0));
            (w >> 2, (w & 3) as u32)
        })
        .collect();
    let from = word(LOW).max(end.saturating_sub(RING)).max(runs.first()?.0);
    if from >= end || runs.windows(2).any(|w| w[0].0 > w[1].0) {
        return None;
    }
    let mut bytes = vec![0u8; usize::try_from(end - from).ok()?];
    let at = from % RING;
    let first_part = bytes.len().min(usize::try_from(RING - at).ok()?);
    let ring_at = RINGS_AT + u64::from(slot) * RING;
    file.read_exact_at(&mut bytes[..first_part], ring_at + at)
        .ok()?;
    file.read_exact_at(&mut bytes[first_part..], ring_at).ok()?;
    let mut chunks = Vec::new();
    for (i, &(start, source)) in runs.iter().enumerate() {
        let stop = runs.get(i + 1).map_or(end, |r| r.0).min(end);
        let start = start.max(from);
        if start >= stop {
            continue;
        }
        let data =
            bytes[usize::try_from(start - from).ok()?..usize::try_from(stop - from).ok()?].to_vec();
        chunks.push(Chunk {
            offset: start,
            source,
            data: data.into(),
        });
    }
    Some((from, chunks))
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    /// Writes a stream of chunks of varied sizes and sources through one
    /// ring, and after each one reads back what a crash would recover, both
    /// with the new end published and with the old one (envd killed between
    /// the copy and the publish).
    #[test]
    fn a_ring_gives_back_the_newest_output_with_its_sources() {
        let tails = Tails::new().unwrap();
        let tail = tails.claim(3, 41, 0).unwrap();
        let mut stream: Vec<(u8, Source)> = Vec::new();
        let sources = [Source::Stdout, Source::Stderr, Source::Stdout, Source::Pty];
        // `least`: bytes that must come back.
        let check = |stream: &[(u8, Source)], end: u64, least: u64| {
            let Some((from, chunks)) = read(&tails.file, 3, 41, end) else {
                assert_eq!(least, 0, "nothing came back of ..{end}");
                return;
            };
            assert!(end - from <= RING && end - from >= least, "{from}..{end}");
            let mut at = from;
            for c in &chunks {
                assert_eq!(c.offset, at);
                for (i, b) in c.data.iter().enumerate() {
                    let (want, source) = stream[(at as usize) + i];
                    assert_eq!(
                        (*b, c.source),
                        (want, source.code()),
                        "byte {}",
                        at as usize + i
                    );
                }
                at += c.data.len() as u64;
            }
            assert_eq!(at, end);
        };
        let mut seed = 7u64;
        let mut prev_len = 0usize;
        for round in 0..300u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let len = match round % 5 {
                0 => 1 + (seed >> 40) as usize % 16,
                1 => 1 + (seed >> 40) as usize % 3000,
                2 => 1 + (seed >> 40) as usize % (80 * 1024),
                _ => 1 + (seed >> 40) as usize % 300,
            };
            let source = sources[(seed >> 20) as usize % sources.len()];
            let offset = stream.len() as u64;
            let data: Vec<u8> = (0..len).map(|i| (seed >> 8) as u8 ^ i as u8).collect();
            tail.record(offset, source, &data);
            // Killed before the end was published: what the copy did not
            // overwrite comes back.
            let last = stream.len().saturating_sub(prev_len) as u64;
            check(&stream, offset, RING.saturating_sub(len as u64).min(last));
            stream.extend(data.iter().map(|&b| (b, source)));
            check(&stream, stream.len() as u64, (len as u64).min(RING));
            prev_len = offset as usize;
        }
        // Killed while writing a journal entry (the count not yet bumped):
        // it overwrote the oldest, which is not trusted.
        let count = tail.header[COUNT].load(Ordering::Acquire);
        assert!(count > ENTRIES, "the journal wrapped");
        let end = stream.len() as u64;
        tail.header[JOURNAL + (count % ENTRIES) as usize].store(end << 2 | 1, Ordering::Release);
        check(&stream, end, 1);
        // Another command's slot, or one given up, gives nothing back.
        assert!(read(&tails.file, 3, 40, stream.len() as u64).is_none());
        tails.free(3);
        assert!(read(&tails.file, 3, 41, stream.len() as u64).is_none());
        assert!(tails.claim(TAIL_SLOTS, 1, 0).is_none());
    }
}
