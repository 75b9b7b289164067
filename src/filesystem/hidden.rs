//! envd's hidden temporaries in flight: the named file of an upload on a
//! file system without unnamed files ([`super::staged`]) and the copy a
//! cross-file-system Move makes before its rename. Each is registered by its
//! real path while it exists. The next envd image (a live upgrade's, or the
//! one systemd starts after a crash, through the crash record) is handed the
//! list and removes them: the image that was filling them cannot.
//!
//! A temporary is registered by name before it exists, and by which file it
//! is (device, inode) as soon as it does: the next image removes that file
//! only. A process that traded a root directory of its own directory in
//! under the temporary's name, between the crash and the cleanup, keeps it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::ops::{is_sibling_temp, remove_path_seen};
use super::stop::Stop;
use super::tree::Identity;

/// Most entries the removal of one left-over temporary walks. A copy is
/// visible in its directory, so code in the sandbox could keep adding to it.
const MAX_ENTRIES: u64 = 10_000_000;

/// The temporaries in flight, and which file each is once made.
static LIVE: LazyLock<Mutex<HashMap<PathBuf, Option<Identity>>>> = LazyLock::new(Default::default);

fn live() -> MutexGuard<'static, HashMap<PathBuf, Option<Identity>>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary registered while this lives. Made before the temporary
/// itself: under systemd the crash record lists it before it exists (a
/// rewrite paced as a command's start is would leave it out for up to 25 ms).
#[derive(Debug)]
pub struct Registered(PathBuf);

impl Registered {
    pub fn new(path: PathBuf) -> Registered {
        live().insert(path.clone(), None);
        crate::handover::crash::write_now();
        Registered(path)
    }

    /// The temporary now exists and is the file `id`.
    pub fn made(&self, id: Identity) {
        if let Some(seen) = live().get_mut(&self.0) {
            *seen = Some(id);
        }
        crate::handover::crash::write_now();
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        live().remove(&self.0);
        crate::handover::crash::changed();
    }
}

/// The temporaries in flight, for the next image: each path, followed once
/// it is made by a NUL and `device:inode`. A path cannot hold a NUL, and an
/// image from before this form takes such an entry for no temporary of its
/// own and leaves it (what it left before the form existed, it removes).
pub fn list() -> Vec<String> {
    live()
        .iter()
        .filter_map(|(p, id)| {
            let p = p.to_str()?;
            Some(match id {
                Some((dev, ino)) => format!("{p}\0{dev}:{ino}"),
                None => p.to_owned(),
            })
        })
        .collect()
}

/// An entry of [`list`]: the path, and which file it is if that was known.
fn parse(entry: &str) -> (PathBuf, Option<Identity>) {
    match entry.split_once('\0') {
        Some((path, id)) => {
            let id = id
                .split_once(':')
                .and_then(|(d, i)| Some((d.parse().ok()?, i.parse().ok()?)));
            // A malformed identity names no file: nothing is removed.
            (
                PathBuf::from(path),
                Some(id.unwrap_or((u64::MAX, u64::MAX))),
            )
        }
        None => (PathBuf::from(entry), None),
    }
}

/// Removes, in the background, what a previous image left: only absolute
/// paths whose last component is one of envd's temporary names.
pub fn remove_left(paths: Vec<String>) {
    let paths: Vec<(PathBuf, Option<Identity>)> = paths
        .iter()
        .map(|e| parse(e))
        .filter(|(p, _)| is_ours(p))
        .collect();
    if paths.is_empty() {
        return;
    }
    // One start-up job: launched on a blocking thread of its own, without a
    // task to await it.
    let removal = crate::threads::launch(Box::new(move || {
        let kept = paths
            .iter()
            .filter(|(p, id)| remove_path_seen(p, *id, &Stop::after(MAX_ENTRIES)).is_err())
            .count();
        if kept > 0 {
            tracing::warn!(
                kept,
                "temporaries the previous envd left are not all removed"
            );
        }
    }));
    if removal.is_err() {
        tracing::warn!("temporaries the previous envd left are not removed: no thread");
    }
}

fn is_ours(p: &Path) -> bool {
    p.is_absolute()
        && p.file_name()
            .is_some_and(|n| is_sibling_temp(n.as_encoded_bytes()))
}
