//! A command's own cgroup: created (with its limits) before the command is
//! born into it, killed as a whole, read for usage and OOM kills when the
//! command ends, and removed once nothing is left in it.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::spare::Spares;
use super::tree_signal::own_freeze;

use crate::proto::process::ResourceUsage;

#[derive(Debug, Clone)]
pub struct Leaf {
    pub(super) dir: PathBuf,
    /// The spares of the workload cgroup it is in, refilled when it retires
    /// (none for a leaf a previous image made).
    spares: Option<Arc<Spares>>,
    /// How many tree signals hold the leaf frozen (`tree_signal::Hold`): the last one
    /// to end thaws it.
    pub(super) holders: Arc<std::sync::Mutex<u32>>,
}

impl Leaf {
    pub(super) fn new(dir: PathBuf, spares: Option<Arc<Spares>>) -> Leaf {
        Leaf {
            dir,
            spares,
            holders: Arc::default(),
        }
    }

    /// A leaf a previous envd image created (live upgrade, crash recovery):
    /// only a directory that really is a cgroup.
    ///
    /// A leaf the previous image froze to signal it (`tree_signal::Hold`) and could not
    /// thaw (it crashed in between) is thawed: envd freezes leaves for
    /// nothing else.
    pub fn adopt(dir: PathBuf) -> Option<Leaf> {
        if !(dir.is_absolute() && dir.join("cgroup.procs").is_file()) {
            return None;
        }
        if own_freeze(&dir) == Some(true) {
            tracing::warn!(cgroup = %dir.display(), "an adopted command's cgroup was frozen; thawed");
            let _ = std::fs::write(dir.join("cgroup.freeze"), "0");
        }
        Some(Leaf::new(dir, None))
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The directory fd a child is born in (`clone3`'s `cgroup`).
    pub fn dir_fd(&self) -> std::io::Result<OwnedFd> {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(&self.dir)
            .map(OwnedFd::from)
    }

    /// SIGKILL to every process in the cgroup (`cgroup.kill`, Linux 5.14;
    /// before it, each listed process).
    pub fn kill(&self) -> std::io::Result<()> {
        match std::fs::write(self.dir.join("cgroup.kill"), "1") {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.signal(nix::sys::signal::Signal::SIGKILL)
            }
            r => r,
        }
    }

    /// Whether the OOM killer killed anything in the cgroup, and what the
    /// cgroup used: a command's end report.
    pub fn end_report(&self) -> (bool, ResourceUsage) {
        match Files::open(&self.dir) {
            Some(f) => (f.oom_killed(), f.usage()),
            None => (false, ResourceUsage::default()),
        }
    }

    /// What the cgroup used (what the kernel reports; zero for what it
    /// does not).
    pub fn usage(&self) -> ResourceUsage {
        Files::open(&self.dir)
            .map(|f| f.usage())
            .unwrap_or_default()
    }

    /// When the leaf is done with (its command's end is published, or the
    /// Start failed before a command ran in it): removes the cgroup once it
    /// is empty and makes a spare for a later command, both in the
    /// background behind the work that is ready now (e.g. the `end` event on
    /// its way out).
    pub fn retire(&self) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            me.remove_when_empty();
            if let Some(s) = &me.spares {
                s.refill();
            }
        });
    }

    /// Removes the cgroup once it is empty (at once if it is), in the
    /// background: a command's orphans keep theirs alive until they end.
    fn remove_when_empty(&self) {
        if std::fs::remove_dir(&self.dir).is_ok() {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            loop {
                tokio::time::sleep(pause).await;
                match std::fs::remove_dir(&me.dir) {
                    Ok(()) => return,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                    Err(_) => pause = (pause * 2).min(Duration::from_secs(5)),
                }
            }
        });
    }
}

/// Longest cgroup file read (io.stat grows with the devices).
const MAX_FILE: usize = 64 * 1024;

/// A cgroup's files, opened relative to one directory fd: no path walk
/// and no extra system calls per file (a Start's end reads five).
pub(super) struct Files(OwnedFd);

impl Files {
    pub(super) fn open(dir: &Path) -> Option<Files> {
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
        // openat, not open: musl's open() follows O_CLOEXEC with an fcntl.
        nix::fcntl::openat(nix::fcntl::AT_FDCWD, dir, flags, Mode::empty())
            .ok()
            .map(Files)
    }

    pub(super) fn read(&self, name: &str) -> Option<String> {
        let fd = nix::fcntl::openat(
            &self.0,
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .ok()?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match nix::unistd::read(&fd, &mut buf) {
                Ok(0) => break,
                Ok(n) if out.len() + n <= MAX_FILE => out.extend_from_slice(&buf[..n]),
                Ok(_) => return None,
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return None,
            }
        }
        String::from_utf8(out).ok()
    }

    fn number(&self, name: &str) -> Option<u64> {
        self.read(name)?.trim().parse().ok()
    }

    fn oom_killed(&self) -> bool {
        let Some(events) = self.read("memory.events") else {
            return false;
        };
        ["oom_kill", "oom_group_kill"]
            .iter()
            .any(|k| keyed(&events, k).is_some_and(|n| n > 0))
    }

    fn usage(&self) -> ResourceUsage {
        let cpu = self.read("cpu.stat").unwrap_or_default();
        let (read, write) = io_bytes(&self.read("io.stat").unwrap_or_default());
        ResourceUsage {
            memory_peak_bytes: self.number("memory.peak").unwrap_or(0),
            memory_current_bytes: self.number("memory.current").unwrap_or(0),
            cpu_user_usec: keyed(&cpu, "user_usec").unwrap_or(0),
            cpu_system_usec: keyed(&cpu, "system_usec").unwrap_or(0),
            io_read_bytes: read,
            io_write_bytes: write,
        }
    }
}

/// The value of `key` in `key value` lines (memory.events, cpu.stat).
pub(super) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// rbytes and wbytes summed over the devices of io.stat.
fn io_bytes(text: &str) -> (u64, u64) {
    let mut sum = (0u64, 0u64);
    for word in text.split_whitespace() {
        if let Some(v) = word
            .strip_prefix("rbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            sum.0 = sum.0.saturating_add(v);
        } else if let Some(v) = word
            .strip_prefix("wbytes=")
            .and_then(|v| v.parse::<u64>().ok())
        {
            sum.1 = sum.1.saturating_add(v);
        }
    }
    sum
}
