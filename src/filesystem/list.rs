//! ListDir: a depth-limited, lexical, depth-first walk that never descends
//! through symlinks (so it cannot loop), skips entries that vanish mid-walk,
//! and reports paths under the requested (unresolved) path.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::entry::{from_metadata, Names};
use crate::proto::filesystem::EntryInfo;
use crate::status::{Error, Result};

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
    // Depth-first, in name order, without recursion: each frame holds a
    // directory's remaining entries (reversed, so `pop` yields name order).
    let mut stack =
        vec![Frame::read(real, shown, levels).map_err(|e| Error::io(real.display(), &e))?];
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
        out.push(from_metadata(&path, &shown_child, &meta, &mut names));
        let below = top.levels - 1;
        if below > 0 && meta.is_dir() && seen.insert((meta.dev(), meta.ino())) {
            // Vanished or unreadable below the root: skipped.
            if let Ok(frame) = Frame::read(&path, &shown_child, below) {
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
}

impl Frame {
    fn read(real: &Path, shown: &Path, levels: u32) -> std::io::Result<Frame> {
        let mut entries: Vec<_> = std::fs::read_dir(real)?.filter_map(|e| e.ok()).collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.file_name()));
        Ok(Frame {
            shown: shown.to_path_buf(),
            levels,
            entries,
        })
    }
}
