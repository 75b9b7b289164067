//! The cgroups envd puts commands in. Under the cgroup v2 root, as upstream
//! lays them out: `user` for commands and `ptys` for terminals, with
//! upstream's weights and memory limits, so the workload can be frozen before
//! a snapshot (`freeze.rs`) while envd and its I/O pumps keep running. In
//! them, every command gets a leaf of its own (`leaf.rs`), created with its
//! limits (`limits.rs`) before the command is born into it: killed as a
//! whole, read for usage and OOM kills, removed when empty. Leaves with the
//! default limits are made ahead (`spare.rs`), off the Start's path.
//!
//! A command with the tag `_system` (the orchestrator's own shells) stays in
//! envd's cgroup and is never frozen.

pub mod freeze;
mod held_back;
pub mod leaf;
pub mod limits;
pub mod spare;
mod tree_signal;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use spare::Spares;

/// The tag that keeps a command out of the workload cgroups.
pub const SYSTEM_TAG: &str = "_system";

/// Which workload cgroup a command goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User = 0,
    Pty = 1,
}

impl Kind {
    pub const ALL: [Kind; 2] = [Kind::User, Kind::Pty];

    pub fn dir(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Pty => "ptys",
        }
    }
}

#[derive(Debug)]
pub struct Cgroups {
    root: PathBuf,
    /// Limits of commands that bring none.
    defaults: crate::proto::process::ResourceLimits,
    /// Leaves made ahead, per [`Kind`] (none when the defaults cannot be
    /// written).
    spares: [Option<Arc<Spares>>; 2],
}

impl Cgroups {
    /// Creates (or reuses) the workload cgroups under `root`, a cgroup v2
    /// mount (or a directory of one). `None` when `root` is not cgroup v2 or
    /// cannot be written: commands then stay in envd's cgroup.
    pub fn setup(root: &Path, defaults: crate::proto::process::ResourceLimits) -> Option<Cgroups> {
        if !root.join("cgroup.controllers").is_file() {
            tracing::info!(root = %root.display(), "no cgroup v2 there: commands stay in envd's cgroup");
            return None;
        }
        // Controllers for the children; each may be missing (best effort).
        enable_controllers(root);
        let memory_max = memory_limit();
        for kind in Kind::ALL {
            let dir = root.join(kind.dir());
            if let Err(e) = std::fs::create_dir_all(&dir) {
                tracing::warn!(cgroup = %dir.display(), error = %e, "cannot create the workload cgroup");
                return None;
            }
            let (cpu, io) = match kind {
                Kind::User => ("50", "default 10"),
                Kind::Pty => ("200", "default 50"),
            };
            let mut settings = vec![("cpu.weight", cpu.to_owned()), ("io.weight", io.to_owned())];
            // memory.max only: upstream also sets memory.high to the same
            // value, which throttles a command for seconds per allocation
            // near the limit (nothing to reclaim without swap) instead of
            // letting the OOM killer end it.
            if let Some(m) = memory_max {
                settings.push(("memory.max", m.to_string()));
            }
            for (file, value) in settings {
                // Absent controllers simply lack the file.
                let _ = std::fs::write(dir.join(file), value);
            }
            // The leaves' controllers.
            enable_controllers(&dir);
            remove_empty_leaves(&dir);
        }
        let writes = limits::files(&defaults).ok();
        let spares = Kind::ALL.map(|kind| {
            let s = Spares::new(root.join(kind.dir()), writes.clone()?);
            s.refill();
            Some(s)
        });
        tracing::info!(root = %root.display(), "commands run in the user and ptys cgroups");
        Some(Cgroups {
            root: root.to_owned(),
            defaults,
            spares,
        })
    }

    pub fn path(&self, kind: Kind) -> PathBuf {
        self.root.join(kind.dir())
    }

    /// A new leaf for one command (`seq` makes its name unique), with the
    /// command's limits over envd's defaults.
    pub fn new_leaf(
        &self,
        kind: Kind,
        seq: u64,
        limits: Option<&crate::proto::process::ResourceLimits>,
    ) -> crate::status::Result<leaf::Leaf> {
        let merged = limits::merged(limits, &self.defaults);
        let writes = limits::files(&merged)?;
        let spares = self.spares[kind as usize].clone();
        // A spare carries the defaults already: only a command's own limits
        // are written into it.
        let (dir, write) = match spares.as_ref().and_then(|s| s.take()) {
            Some(dir) => (dir, limits.is_some()),
            None => {
                // envd's pid in the name: a restarted envd's numbering starts
                // again, and a leftover of the previous one may still hold
                // its leaf.
                let dir = self
                    .path(kind)
                    .join(format!("cmd-{}-{seq}", std::process::id()));
                std::fs::create_dir(&dir).map_err(|e| {
                    crate::status::Error::io(format!("create cgroup {}", dir.display()), &e)
                })?;
                (dir, true)
            }
        };
        let leaf = leaf::Leaf::new(dir, spares);
        if write {
            if let Err(e) = limits::apply(leaf.path(), &writes) {
                leaf.retire();
                return Err(e);
            }
        }
        Ok(leaf)
    }
}

/// Enables the controllers limits use for `dir`'s children, one at a time
/// (each may be missing from the hierarchy).
fn enable_controllers(dir: &Path) {
    for c in ["+cpu", "+memory", "+io", "+pids"] {
        let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
    }
}

/// Leaves a previous envd left behind, empty now.
fn remove_empty_leaves(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with("cmd-") {
            let _ = std::fs::remove_dir(e.path());
        }
    }
}

/// upstream's memory limit for the workload: total memory less an eighth,
/// at most 128 MiB held back for envd and the system.
fn memory_limit() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let total = kib.checked_mul(1024)?;
    Some(total - (total / 8).min(128 << 20))
}
