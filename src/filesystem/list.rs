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

/// Lists `shown` (resolved to `real`) to `depth` levels (0 means 1).
pub fn list_dir(real: &Path, shown: &Path, depth: u32) -> Result<Vec<EntryInfo>> {
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
    let (mut encoded, mut read_left) = (0usize, MAX_READ);
    // Depth-first, in name order, without recursion: each frame holds a
    // directory's remaining entries (reversed, so `pop` yields name order).
    let root = Frame::read(real, shown, levels, &mut read_left)
        .map_err(|e| Error::io(real.display(), &e))?;
    if root.truncated {
        return Err(too_large(shown, MAX_READ - read_left));
    }
    let mut stack = vec![root];
    while let Some(top) = stack.last_mut() {
        let Some(e) = top.entries.pop() else {
            stack.pop();
            continue;
        };
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // vanished
        };
        let shown_child = top.shown.join(e.file_name());
        let entry = from_metadata(&path, &shown_child, &meta, &mut names);
        // The entry, its field key and its length.
        encoded += entry.encoded_len() + 4;
        if encoded > MAX_LISTING {
            return Err(too_large(shown, MAX_READ - read_left));
        }
        out.push(entry);
        let below = top.levels - 1;
        if below > 0 && meta.is_dir() && seen.insert((meta.dev(), meta.ino())) {
            // Vanished or unreadable below the root: skipped.
            if let Ok(frame) = Frame::read(&path, &shown_child, below, &mut read_left) {
                if frame.truncated {
                    return Err(too_large(shown, MAX_READ - read_left));
                }
                stack.push(frame);
            }
        }
    }
    Ok(out)
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
    /// Reads a directory's entries, at most `left` of them (counted down).
    fn read(real: &Path, shown: &Path, levels: u32, left: &mut usize) -> std::io::Result<Frame> {
        let mut entries = Vec::new();
        let mut truncated = false;
        for e in std::fs::read_dir(real)?.flatten() {
            if *left == 0 {
                truncated = true;
                break;
            }
            *left -= 1;
            entries.push(e);
        }
        entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
        Ok(Frame {
            shown: shown.to_path_buf(),
            levels,
            entries,
            truncated,
        })
    }
}
