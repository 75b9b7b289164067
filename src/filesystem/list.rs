//! ListDir: a depth-limited, lexical, depth-first walk that never descends
//! through symlinks (so it cannot loop), skips entries that vanish mid-walk,
//! and reports paths under the requested (unresolved) path.
//!
//! A listing is bounded by what one response may carry: it stops with
//! `RESOURCE_EXHAUSTED` once its entries would encode to more than
//! [`crate::wire::MAX_ENCODE`], or once it has read more directory entries
//! than could ever fit there, rather than building a response no client
//! could receive (a directory of 300,000 files took envd to 745 MiB).

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::entry::{from_metadata, Names};
use super::stop::Stop;
use prost::Message;

use crate::proto::filesystem::EntryInfo;
use crate::status::{Code, Error, Result};

/// Most encoded bytes of entries one listing holds.
const MAX_LISTING: usize = crate::wire::MAX_ENCODE;
/// Most directory entries one listing reads: every entry encodes to more
/// than 32 bytes (its name, path, type, mode, permissions, owner, group and
/// times), so more could never fit in [`MAX_LISTING`].
const MAX_READ: usize = MAX_LISTING / 32;

/// The answer to a listing that outgrew [`MAX_LISTING`] after reading
/// `read` directory entries.
fn too_large(shown: &Path, read: usize) -> Error {
    Error::new(
        Code::ResourceExhausted,
        format!(
            "listing '{}' exceeds the {} MiB a response may carry (stopped after reading {read} entries): list fewer levels or a subdirectory",
            shown.display(),
            MAX_LISTING >> 20
        ),
    )
}

/// What a directory entry read but not listed yet counts (the entry in its
/// frame and its name's own allocation).
const DIRENT_COST: usize = 96;
/// What the allocator adds to each string of a listed entry.
const ALLOC_OVERHEAD: usize = 16;
/// A listing counts its cost in steps of this many bytes.
const COST_STEP: usize = 1 << 20;
/// A listing that holds more than this is built alone (see [`ALONE`]).
const ALONE_ABOVE: usize = 4 << 20;

/// Large listings are built one at a time. Built side by side, each
/// growing its count in the answers' budget, they could all run it out
/// half-way and all be refused (sixty listings of a big directory at once:
/// none answered), where one at a time each is built whole while the
/// budget lasts. Smaller listings are not held up by them.
pub static ALONE: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(1);
/// How long a large listing waits for [`ALONE`] before it is built anyway
/// (beside the one that holds it). The permit is for fairness, the budget
/// is the bound: a listing stuck on a stalled mount, whose caller waits
/// without a deadline, must not hold every other large listing up.
pub const ALONE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// A listing's outcome.
pub enum Listing {
    Done(Vec<EntryInfo>),
    /// It grew past [`ALONE_ABOVE`] before it was done: list again once
    /// [`ALONE`] allows.
    Large,
}

/// What a listing holds, counted in its answer's share ([`crate::answers`])
/// as it grows: the directory entries read and not yet listed, and the
/// entries listed (each a struct and strings of its own in memory, 3–4
/// times its encoding, until it is encoded).
struct Cost<'a> {
    answer: &'a crate::answers::Share,
    /// Built under [`ALONE`]: no bound but the budget's.
    alone: bool,
    stop: &'a Stop,
    pending: usize,
    encoded: usize,
    listed: usize,
    counted: usize,
}

/// What a listed entry takes in memory.
fn in_memory(e: &EntryInfo) -> usize {
    let strings = [&e.name, &e.path, &e.permissions, &e.owner, &e.group]
        .into_iter()
        .chain(e.symlink_target.as_ref())
        .chain(e.metadata.iter().flat_map(|(k, v)| [k, v]));
    std::mem::size_of::<EntryInfo>()
        + strings
            .map(|s| s.capacity() + ALLOC_OVERHEAD)
            .sum::<usize>()
}

impl Cost<'_> {
    /// Counts what is held now, if it has outgrown what was counted (in
    /// steps). An error when the answers' budget cannot take it, or the
    /// caller has gone away; `false` when the listing is to be built alone
    /// and is not.
    fn check(&mut self) -> Result<bool> {
        self.stop.check().map_err(|e| Error::io("listing", &e))?;
        let cost = self.pending * DIRENT_COST + self.listed;
        if cost > ALONE_ABOVE && !self.alone {
            return Ok(false);
        }
        if cost > self.counted && cost >= crate::answers::SMALL {
            // A step ahead, but never past the budget for what fits in it.
            self.counted = (cost + COST_STEP).min(crate::answers::MAX).max(cost);
            self.answer.hold(self.counted)?;
        }
        Ok(true)
    }
}

/// Lists `shown` (resolved to `real`) to `depth` levels (0 means 1),
/// counting what it holds in `answer`; `alone` under [`ALONE`].
pub fn list_dir(
    real: &Path,
    shown: &Path,
    depth: u32,
    answer: &crate::answers::Share,
    alone: bool,
    stop: &Stop,
) -> Result<Listing> {
    let meta = std::fs::metadata(real).map_err(|e| Error::io(real.display(), &e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(format!(
            "'{}' is not a directory",
            shown.display()
        )));
    }
    let mut out = Vec::new();
    let mut names = Names::default();
    let mut seen = HashSet::from([(meta.dev(), meta.ino())]);
    let levels = depth.max(1);
    let mut read_left = MAX_READ;
    let mut cost = Cost {
        answer,
        alone,
        stop,
        pending: 0,
        encoded: 0,
        listed: 0,
        counted: 0,
    };
    // Depth-first, in name order, without recursion: each frame holds a
    // directory's remaining entries (reversed, so `pop` yields name order).
    let Some(root) = Frame::read(real, shown, levels, &mut read_left, &mut cost)? else {
        return Ok(Listing::Large);
    };
    if root.truncated {
        return Err(too_large(shown, MAX_READ - read_left));
    }
    let mut stack = vec![root];
    while let Some(top) = stack.last_mut() {
        let Some(e) = top.entries.pop() else {
            stack.pop();
            continue;
        };
        cost.pending -= 1;
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // vanished
        };
        let shown_child = top.shown.join(e.file_name());
        let entry = from_metadata(&path, &shown_child, &meta, &mut names);
        // The entry, its field key and its length.
        cost.encoded += entry.encoded_len() + 4;
        if cost.encoded > MAX_LISTING {
            return Err(too_large(shown, MAX_READ - read_left));
        }
        cost.listed += in_memory(&entry);
        if !cost.check()? {
            return Ok(Listing::Large);
        }
        out.push(entry);
        let below = top.levels - 1;
        if below > 0 && meta.is_dir() && seen.insert((meta.dev(), meta.ino())) {
            // Vanished or unreadable below the root: skipped (the budget's
            // refusal is not).
            match Frame::read(&path, &shown_child, below, &mut read_left, &mut cost) {
                Ok(None) => return Ok(Listing::Large),
                Ok(Some(frame)) if frame.truncated => {
                    return Err(too_large(shown, MAX_READ - read_left));
                }
                Ok(Some(frame)) => stack.push(frame),
                Err(e) if e.code == Code::ResourceExhausted || cost.stop.check().is_err() => {
                    return Err(e)
                }
                Err(_) => {}
            }
        }
    }
    Ok(Listing::Done(out))
}

/// One directory being listed.
struct Frame {
    shown: PathBuf,
    /// Levels still to list, this one included.
    levels: u32,
    entries: Vec<std::fs::DirEntry>,
    /// The directory had more entries than `left` allowed reading.
    truncated: bool,
}

impl Frame {
    /// Reads a directory's entries, at most `left` of them (counted down),
    /// counting them in `cost`; `None` when the listing is to be built
    /// alone and is not.
    fn read(
        real: &Path,
        shown: &Path,
        levels: u32,
        left: &mut usize,
        cost: &mut Cost,
    ) -> Result<Option<Frame>> {
        let mut entries = Vec::new();
        let mut truncated = false;
        let dir = std::fs::read_dir(real).map_err(|e| Error::io(real.display(), &e))?;
        for e in dir.flatten() {
            if *left == 0 {
                truncated = true;
                break;
            }
            *left -= 1;
            entries.push(e);
            cost.pending += 1;
            if !cost.check()? {
                return Ok(None);
            }
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
        Ok(Some(Frame {
            shown: shown.to_path_buf(),
            levels,
            entries,
            truncated,
        }))
    }
}
