//! Leaves made ahead of need. Creating a cgroup (and writing its limits) is
//! among the dearest steps of a Start in a VM: the kernel builds every
//! controller's files for it. A few empty leaves with envd's default limits
//! wait in each workload cgroup; a Start takes one, and a command's end (once
//! its `end` event is out) makes the next. A leaf is used once: it is never
//! handed to a second command, so its usage counters start at zero.
//!
//! Best effort: a spare that cannot be made is simply not there, and the
//! Start makes its leaf itself, as it would without spares.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Spares kept per workload cgroup.
const KEEP: usize = 2;
/// Names tried per spare when one is taken (a previous image of envd, with
/// the same pid after an in-place upgrade, may still use it).
const TRIES: usize = 8;

/// One workload cgroup's spares.
#[derive(Debug)]
pub struct Spares {
    /// The workload cgroup the spares are made in.
    parent: PathBuf,
    /// The default limits' files, written into each spare.
    writes: Vec<(&'static str, String, &'static str)>,
    ready: Mutex<Vec<PathBuf>>,
    next: AtomicU64,
}

impl Spares {
    pub fn new(parent: PathBuf, writes: Vec<(&'static str, String, &'static str)>) -> Arc<Self> {
        Arc::new(Self {
            parent,
            writes,
            ready: Mutex::new(Vec::with_capacity(KEEP)),
            next: AtomicU64::new(0),
        })
    }

    /// A spare leaf's directory, if one is ready.
    pub fn take(&self) -> Option<PathBuf> {
        self.ready.lock().ok()?.pop()
    }

    /// Makes spares until [`KEEP`] are ready (or making one fails).
    pub fn refill(&self) {
        while self.ready.lock().map_or(KEEP, |r| r.len()) < KEEP {
            let Some(dir) = self.make() else {
                return;
            };
            match self.ready.lock() {
                Ok(mut r) if r.len() < KEEP => r.push(dir),
                // Filled meanwhile (or poisoned): this one is not needed.
                _ => {
                    let _ = std::fs::remove_dir(&dir);
                    return;
                }
            }
        }
    }

    fn make(&self) -> Option<PathBuf> {
        for _ in 0..TRIES {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let dir = self.parent.join(format!("cmd-{}-p{n}", std::process::id()));
            match std::fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(_) => return None,
            }
            if super::limits::apply(&dir, &self.writes).is_err() {
                let _ = std::fs::remove_dir(&dir);
                return None;
            }
            return Some(dir);
        }
        None
    }
}

impl Drop for Spares {
    /// Spares left when envd ends normally are removed (a new envd removes
    /// what an upgrade or a crash left).
    fn drop(&mut self) {
        if let Ok(ready) = self.ready.get_mut() {
            for dir in ready.drain(..) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}
