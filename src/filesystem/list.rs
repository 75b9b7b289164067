//! ListDir: a depth-limited, lexical, depth-first walk that never descends
//! through symlinks (so it cannot loop), skips entries that vanish mid-walk,
//! and reports paths under the requested (unresolved) path.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

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
    walk(real, shown, depth.max(1), &mut names, &mut seen, &mut out)?;
    Ok(out)
}

fn walk(
    real: &Path,
    shown: &Path,
    levels: u32,
    names: &mut Names,
    seen: &mut HashSet<(u64, u64)>,
    out: &mut Vec<EntryInfo>,
) -> Result<()> {
    let rd = match std::fs::read_dir(real) {
        Ok(rd) => rd,
        // Vanished or unreadable below the root: skip it.
        Err(_) if !out.is_empty() || levels == 0 => return Ok(()),
        Err(e) => return Err(Error::io(real.display(), &e)),
    };
    let mut entries: Vec<_> = rd.filter_map(|e| e.ok()).collect();
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // vanished
        };
        let shown_child = shown.join(e.file_name());
        out.push(from_metadata(&path, &shown_child, &meta, names));
        if levels > 1 && meta.is_dir() && seen.insert((meta.dev(), meta.ino())) {
            walk(&path, &shown_child, levels - 1, names, seen, out)?;
        }
    }
    Ok(())
}
