//! The newest output of each command, in shared memory that
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
//! Per ring: a header of [`HEADER_WORDS`] words (owner, the lowest offset
//! the ring still holds, a count of journal entries, then a journal of where
//! each run of one source began) and a ring of [`RING`] bytes. Written only
//! under the command's log lock, in an order that leaves a consistent part
//! readable whenever envd is killed: a journal entry before the count that
//! publishes it; the ring's new lowest offset before the bytes that
//! overwrite older ones; the end offset (the offset table's) last.
//!
//! There are [`RINGS`] rings, which bounds the shared memory to 16 MiB
//! however many commands run. A command keeps its ring while it runs and
//! then as long as its exit record, unless a starting command needs a ring
//! and none is free: then the oldest ended command's ring is taken (its
//! output would be reported lost after a crash). A ring given up returns its
//! pages to the kernel.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::process::output::Source;
use crate::proto::envd::handover::Chunk;

pub const NAME: &str = "envd-tails";
/// Rings: commands that can have one at a time.
pub const RINGS: u32 = 256;
/// Bytes of output each ring keeps.
pub const RING: u64 = 64 * 1024;
/// Words of a ring's header.
const HEADER_WORDS: usize = 32;
const OWNER: usize = 0;
const LOW: usize = 1;
const COUNT: usize = 2;
const JOURNAL: usize = 3;
/// Journal entries per ring: where the last runs of one source began.
const ENTRIES: u64 = (HEADER_WORDS - JOURNAL) as u64;
/// Where the rings start: after every ring's header, page aligned.
const RINGS_AT: u64 = RINGS as u64 * HEADER_WORDS as u64 * 8;
const SIZE: u64 = RINGS_AT + RINGS as u64 * RING;

/// The shared memory of all rings.
#[derive(Debug)]
pub struct Tails {
    file: File,
    words: &'static [AtomicU64],
    rings: *mut u8,
    pool: Mutex<Pool>,
}

/// Which rings are free, and which ended commands hold one (oldest first,
/// with their seq).
#[derive(Debug)]
struct Pool {
    free: Vec<u32>,
    ended: VecDeque<(u32, u64)>,
}

// SAFETY: `rings` points into a mapping that lives as long as envd; each
// ring is written only through its `Tail`, under the owning log's lock, and
// read only by a later envd.
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
        Ok(Tails {
            file,
            words,
            rings,
            pool: Mutex::new(Pool {
                free: (0..RINGS).rev().collect(),
                ended: VecDeque::new(),
            }),
        })
    }

    pub fn fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A ring for command `seq`, to hold its output from offset `from` on
    /// (what its log holds from there is recorded next): a free one, or the
    /// oldest ended command's; none while every ring is a running command's.
    pub fn claim(&self, seq: u64, from: u64) -> Option<Tail> {
        let mut pool = self.pool();
        let index = match pool.free.pop() {
            Some(i) => i,
            // An entry whose command no longer owns the ring is stale.
            None => loop {
                let (i, owner) = pool.ended.pop_front()?;
                if self.owned_by(i, owner) {
                    break i;
                }
            },
        };
        let header = self.header(index)?;
        // Under the pool's lock: the command it was taken from no longer
        // owns it when its `release` looks.
        header[OWNER].store(0, Ordering::Release);
        drop(pool);
        header[LOW].store(from, Ordering::Release);
        header[COUNT].store(0, Ordering::Release);
        header[OWNER].store(seq + 1, Ordering::Release);
        let at = usize::try_from(u64::from(index) * RING).ok()?;
        Some(Tail {
            header,
            // SAFETY: index < RINGS, so the ring lies within the mapping.
            ring: unsafe { self.rings.add(at) },
            index,
        })
    }

    /// Command `seq`, which holds ring `index`, ended: it keeps the ring
    /// until it is forgotten or a starting command needs one.
    pub fn ended(&self, index: u32, seq: u64) {
        let mut pool = self.pool();
        if self.owned_by(index, seq) && !pool.ended.iter().any(|&(i, _)| i == index) {
            pool.ended.push_back((index, seq));
        }
    }

    /// Command `seq` is forgotten: ring `index`, if still its, is free again
    /// and its pages go back to the kernel.
    pub fn release(&self, index: u32, seq: u64) {
        let mut pool = self.pool();
        // Under the pool's lock: a claim cannot take it meanwhile.
        if !self.owned_by(index, seq) {
            return;
        }
        pool.ended.retain(|&(i, _)| i != index);
        let Some(header) = self.header(index) else {
            return;
        };
        header[OWNER].store(0, Ordering::Release);
        // Before it is free: a hole punched later would zero what its next
        // command had written.
        if header[COUNT].swap(0, Ordering::AcqRel) > 0 {
            self.punch(index);
        }
        pool.free.push(index);
    }

    fn owned_by(&self, index: u32, seq: u64) -> bool {
        self.header(index)
            .is_some_and(|h| h[OWNER].load(Ordering::Acquire) == seq + 1)
    }

    /// Gives ring `index`'s pages back to the kernel.
    fn punch(&self, index: u32) {
        let at = RINGS_AT + u64::from(index) * RING;
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

    fn header(&self, index: u32) -> Option<&'static [AtomicU64]> {
        if index >= RINGS {
            return None;
        }
        let at = index as usize * HEADER_WORDS;
        self.words.get(at..at + HEADER_WORDS)
    }
}

/// One command's ring.
#[derive(Debug)]
pub struct Tail {
    header: &'static [AtomicU64],
    ring: *mut u8,
    index: u32,
}

// SAFETY: see `Tails`: the ring is written only under the owning log's lock.
unsafe impl Send for Tail {}
// SAFETY: as for Send.
unsafe impl Sync for Tail {}

impl Tail {
    /// Which ring it is.
    pub fn index(&self) -> u32 {
        self.index
    }

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
            // SAFETY: `at + n <= RING`, within this ring; the source
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

/// Which ring each command holds, by the command's seq, in a record's
/// rings (`file`).
pub fn owners(file: &File) -> HashMap<u64, u32> {
    let mut raw = vec![0u8; usize::try_from(RINGS_AT).unwrap_or(0)];
    if file.read_exact_at(&mut raw, 0).is_err() {
        return HashMap::new();
    }
    raw.chunks_exact(HEADER_WORDS * 8)
        .zip(0..RINGS)
        .filter_map(|(h, i)| {
            let owner = u64::from_ne_bytes(h[..8].try_into().ok()?);
            Some((owner.checked_sub(1)?, i))
        })
        .collect()
}

/// What ring `index` holds of command `seq`'s output up to `end` (the
/// offset table's): the chunks, from the lowest offset still whole. Nothing
/// if it was another command's.
pub fn read(file: &File, index: u32, seq: u64, end: u64) -> Option<(u64, Vec<Chunk>)> {
    if index >= RINGS {
        return None;
    }
    let mut raw = [0u8; HEADER_WORDS * 8];
    file.read_exact_at(&mut raw, u64::from(index) * HEADER_WORDS as u64 * 8)
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
    let ring_at = RINGS_AT + u64::from(index) * RING;
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
        let tail = tails.claim(41, 0).unwrap();
        let ring = tail.index();
        let mut stream: Vec<(u8, Source)> = Vec::new();
        let sources = [Source::Stdout, Source::Stderr, Source::Stdout, Source::Pty];
        // `least`: bytes that must come back.
        let check = |stream: &[(u8, Source)], end: u64, least: u64| {
            let Some((from, chunks)) = read(&tails.file, ring, 41, end) else {
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
        // Another command's ring, or one given up, gives nothing back.
        assert_eq!(owners(&tails.file).get(&41), Some(&ring));
        assert!(read(&tails.file, ring, 40, stream.len() as u64).is_none());
        tails.ended(ring, 41);
        tails.release(ring, 41);
        assert!(read(&tails.file, ring, 41, stream.len() as u64).is_none());
        assert!(owners(&tails.file).is_empty());
    }

    /// Every ring taken: ended commands keep theirs until a starting one
    /// needs it, the oldest first; running ones never give theirs up.
    #[test]
    fn starting_commands_take_the_rings_of_ended_ones() {
        let tails = Tails::new().unwrap();
        let held: Vec<Tail> = (0..u64::from(RINGS))
            .map(|seq| tails.claim(seq, 0).unwrap())
            .collect();
        assert!(
            tails.claim(1000, 0).is_none(),
            "a running command's ring taken"
        );
        tails.ended(held[7].index(), 7);
        tails.ended(held[3].index(), 3);
        // Said twice, it is still one ring to give up.
        tails.ended(held[3].index(), 3);
        let taken = tails.claim(1000, 0).unwrap();
        assert_eq!(taken.index(), held[7].index(), "not the oldest ended");
        // The command it was taken from is forgotten: the ring stays taken.
        tails.release(held[7].index(), 7);
        assert_eq!(owners(&tails.file).get(&1000), Some(&taken.index()));
        assert!(tails
            .claim(1001, 0)
            .is_some_and(|t| t.index() == held[3].index()));
        assert!(tails.claim(1002, 0).is_none());
        // A forgotten command's ring is free again.
        tails.release(held[9].index(), 9);
        assert!(tails
            .claim(1003, 0)
            .is_some_and(|t| t.index() == held[9].index()));
    }
}
