//! envd's hidden temporaries in flight: the named file of an upload on a
//! file system without unnamed files ([`super::staged`]) and the copy a
//! cross-file-system Move makes before its rename. Each is registered by its
//! real path while it exists. The next envd image (a live upgrade's, or the
//! one systemd starts after a crash, through the crash record) is handed the
//! list and removes them: the image that was filling them cannot.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::ops::{is_sibling_temp, remove_path};
use super::stop::Stop;

/// Most entries the removal of one left-over temporary walks. A copy is
/// visible in its directory, so code in the sandbox could keep adding to it.
const MAX_ENTRIES: u64 = 10_000_000;

static LIVE: LazyLock<Mutex<HashSet<PathBuf>>> = LazyLock::new(Default::default);

fn live() -> MutexGuard<'static, HashSet<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// A temporary registered while this lives. Made before the temporary
/// itself: under systemd the crash record lists it before it exists (a
/// rewrite paced as a command's start is would leave it out for up to 25 ms).
#[derive(Debug)]
pub struct Registered(PathBuf);

impl Registered {
    pub fn new(path: PathBuf) -> Registered {
        live().insert(path.clone());
        crate::handover::crash::write_now();
        Registered(path)
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        live().remove(&self.0);
        crate::handover::crash::changed();
    }
}

/// The temporaries in flight, for the next image.
pub fn list() -> Vec<String> {
    live()
        .iter()
        .filter_map(|p| p.to_str().map(str::to_owned))
        .collect()
}

/// Removes, in the background, what a previous image left: only absolute
/// paths whose last component is one of envd's temporary names.
pub fn remove_left(paths: Vec<String>) {
    let paths: Vec<PathBuf> = paths
        .into_iter()
        .map(PathBuf::from)
        .filter(|p| is_ours(p))
        .collect();
    if paths.is_empty() {
        return;
    }
    // One start-up job: launched on a blocking thread of its own, without a
    // task to await it.
    let removal = crate::threads::launch(Box::new(move || {
        let kept = paths
            .iter()
            .filter(|p| remove_path(p, &Stop::after(MAX_ENTRIES)).is_err())
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
