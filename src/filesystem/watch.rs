//! Directory watches on inotify (through `notify`), shared by the WatchDir
//! stream and the polling watchers.
//!
//! Recursion is managed here rather than by notify: every directory gets its
//! own non-recursive watch, and a directory that appears later is first
//! watched and then scanned, with a synthetic CREATE for everything already in
//! it, so files created inside a new directory before its watch was armed are
//! not lost (duplicates of the overlap are dropped). All watches share one
//! inotify instance ([`super::inotify`]). A kernel queue overflow
//! or a full internal queue ends the watch with DATA_LOSS; hitting the inotify
//! limits is RESOURCE_EXHAUSTED naming the limit.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use notify::event::{EventKind, ModifyKind, RenameMode};
use tokio::sync::mpsc;

use super::entry::{entry_info, Names};
use super::inotify::{Hub, RawEvent, RawEvents, Subscription};
use crate::proto::filesystem::{EventType, FilesystemEvent};
use crate::status::{Code, Error, Result};

/// Translated events queued for the consumer (stream or polling buffer).
/// A name may be 4 KiB, so this is up to ~256 KiB for a client that does
/// not read.
const OUT_QUEUE: usize = 64;
/// Raw events translated per trip to a blocking thread.
const BATCH: usize = 256;
/// Bytes of events (names, plus [`EVENT_COST`] each) one trip may produce:
/// a new directory tree is announced whole, and one larger than this ends
/// the watch with DATA_LOSS (rescan) rather than being held in memory.
const BATCH_BYTES: usize = 16 << 20;
/// What an event costs beyond its name.
const EVENT_COST: usize = 64;
/// Bytes of paths remembered as announced by a scan (so that their real
/// CREATE is dropped) before the memory is cleared (which at worst lets a
/// duplicate CREATE through).
const SYNTHESIZED_BYTES: usize = 1 << 20;
/// Bytes of paths of directories found by a scan and not yet watched: the
/// watches themselves are bounded by the hub, this bounds the walk towards
/// them (a directory may hold millions of subdirectories).
const PENDING_BYTES: usize = 16 << 20;

#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub recursive: bool,
    pub include_entry: bool,
    pub allow_network_mounts: bool,
}

/// What a watch yields: events, then possibly one error that ends it.
pub type WatchItem = Result<FilesystemEvent>;

/// An armed watch. Dropping it stops watching.
pub struct DirWatch {
    pub events: mpsc::Receiver<WatchItem>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for DirWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirWatch").finish_non_exhaustive()
    }
}

impl Drop for DirWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Validates `root` and arms the watch on a blocking thread (arming a large
/// tree walks all of it); events flow once this returns.
pub async fn watch_dir(root: PathBuf, opts: WatchOptions) -> Result<DirWatch> {
    let (tr, events) = super::pool::run(move || arm(root, opts)).await??;
    let (tx, rx) = mpsc::channel(OUT_QUEUE);
    let task = tokio::spawn(tr.run(events, tx));
    Ok(DirWatch { events: rx, task })
}

fn arm(root: PathBuf, opts: WatchOptions) -> Result<(Translator, RawEvents)> {
    let meta = std::fs::metadata(&root).map_err(|e| Error::io(root.display(), &e))?;
    if !meta.is_dir() {
        return Err(Error::invalid(format!(
            "'{}' is not a directory",
            root.display()
        )));
    }
    if !opts.allow_network_mounts {
        if let Some(fs) = network_fs(&root) {
            return Err(Error::precondition(format!(
                "'{}' is on a {fs} network filesystem, where inotify misses remote changes; \
                 set allow_network_mounts to watch it anyway",
                root.display()
            )));
        }
    }
    let (sub, events) = Hub::global().subscribe()?;
    let mut tr = Translator {
        root: root.clone(),
        opts,
        sub,
        synthesized: HashSet::new(),
        synthesized_bytes: 0,
        out_bytes: 0,
        names: Names::default(),
    };
    if !tr.add_tree(&root, false, &mut Vec::new())? {
        return Err(Error::not_found(format!(
            "'{}' does not exist",
            root.display()
        )));
    }
    Ok((tr, events))
}

struct Translator {
    root: PathBuf,
    opts: WatchOptions,
    sub: Subscription,
    /// Paths announced by a scan; their real CREATE (if any) is dropped.
    synthesized: HashSet<PathBuf>,
    synthesized_bytes: usize,
    /// Bytes of events produced in the current trip (see [`BATCH_BYTES`]).
    out_bytes: usize,
    names: Names,
}

impl Translator {
    /// Translates batches of raw events on a blocking thread (translation
    /// stats files and may scan new directory trees) and forwards them.
    async fn run(mut self, mut raw: RawEvents, tx: mpsc::Sender<WatchItem>) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            if raw.recv_many(&mut batch, BATCH).await == 0 {
                return;
            }
            if self.sub.overflow.load(Ordering::Relaxed) {
                let _ = tx.send(Err(lost())).await;
                return;
            }
            let work = std::mem::take(&mut batch);
            let joined = super::pool::run(move || {
                self.out_bytes = 0;
                let mut out = Vec::new();
                let mut failed = None;
                for res in work {
                    if let Err(e) = self.translate(res, &mut out) {
                        failed = Some(e);
                        break;
                    }
                }
                (self, out, failed)
            })
            .await;
            let (tr, out, failed) = match joined {
                Ok(translated) => translated,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            self = tr;
            for ev in out {
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            if let Some(e) = failed {
                let _ = tx.send(Err(e)).await;
                return;
            }
        }
    }

    fn translate(&mut self, res: RawEvent, out: &mut Vec<FilesystemEvent>) -> Result<()> {
        let ev = res.map_err(|e| notify_error(&e, &self.root))?;
        if ev.need_rescan() {
            return Err(lost());
        }
        // An atomic upload (envd's temporary file renamed over the target)
        // replaced the target's content: report it written, as an in-place
        // write would be.
        if let EventKind::Modify(ModifyKind::Name(RenameMode::Both)) = ev.kind {
            if let [from, to] = ev.paths.as_slice() {
                if is_envd_temp(from) && !is_envd_temp(to) && self.covers(to) {
                    let ev = self.event(to, EventType::Write);
                    self.emit(out, ev)?;
                }
            }
            return Ok(());
        }
        let kind = match ev.kind {
            EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To)) => {
                EventType::Create
            }
            EventKind::Modify(ModifyKind::Data(_)) => EventType::Write,
            EventKind::Modify(ModifyKind::Metadata(_)) => EventType::Chmod,
            EventKind::Modify(ModifyKind::Name(RenameMode::From)) => EventType::Rename,
            EventKind::Remove(_) => EventType::Remove,
            _ => return Ok(()),
        };
        for path in ev.paths {
            if is_envd_temp(&path) || is_unnamed(&path) || !self.covers(&path) {
                continue; // envd's own temporary files are not the user's
            }
            if kind == EventType::Create && self.synthesized.remove(&path) {
                continue;
            }
            let is_new_dir = kind == EventType::Create
                && self.opts.recursive
                && std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir());
            let ev = self.event(&path, kind);
            self.emit(out, ev)?;
            if is_new_dir {
                // A directory already gone again needs no watch.
                self.add_tree(&path, true, out)?;
            }
        }
        Ok(())
    }

    /// Adds `ev` to this trip's output, or fails the watch with DATA_LOSS
    /// once the trip's output exceeds [`BATCH_BYTES`].
    fn emit(&mut self, out: &mut Vec<FilesystemEvent>, ev: FilesystemEvent) -> Result<()> {
        self.out_bytes += ev.name.len() + EVENT_COST;
        if self.out_bytes > BATCH_BYTES {
            return Err(lost());
        }
        out.push(ev);
        Ok(())
    }

    /// Whether `path` is inside this watch (the hub also routes events on a
    /// watched directory itself, which may be another watch's root).
    fn covers(&self, path: &Path) -> bool {
        path.starts_with(&self.root)
    }

    fn event(&mut self, path: &Path, kind: EventType) -> FilesystemEvent {
        let name = path
            .strip_prefix(&self.root)
            .unwrap_or(path)
            .to_string_lossy()
            .into_owned();
        let entry = if self.opts.include_entry
            && matches!(
                kind,
                EventType::Create | EventType::Write | EventType::Chmod
            ) {
            entry_info(path, path, &mut self.names).ok()
        } else {
            None
        };
        FilesystemEvent {
            name,
            r#type: kind as i32,
            entry,
        }
    }

    /// Watches `top` (and, when recursive, every directory below it, not
    /// through symlinks), iteratively: the tree's depth is not bounded by
    /// anything envd controls. With `announce`, entries found are reported as
    /// CREATE events (in name order within each directory): they appeared
    /// before their directory was watched. envd's own temporary files are
    /// neither announced nor entered. A directory is read entry by entry:
    /// only subdirectories still to be watched are held, at most
    /// [`PENDING_BYTES`] of their paths. `Ok(false)` if `top` vanished
    /// before it was watched.
    fn add_tree(
        &mut self,
        top: &Path,
        announce: bool,
        out: &mut Vec<FilesystemEvent>,
    ) -> Result<bool> {
        let mut pending = vec![top.to_path_buf()];
        let mut pending_bytes = 0;
        while let Some(dir) = pending.pop() {
            pending_bytes -= if dir == top { 0 } else { dir.as_os_str().len() };
            if !self.sub.watch(&dir)? {
                if dir == top {
                    return Ok(false);
                }
                continue; // vanished meanwhile
            }
            if !self.opts.recursive && !announce {
                continue;
            }
            let Ok(rd) = std::fs::read_dir(&dir) else {
                continue; // vanished meanwhile
            };
            let announced = out.len();
            let mut subdirs = Vec::new();
            for e in rd.filter_map(|e| e.ok()) {
                let path = e.path();
                if is_envd_temp(&path) {
                    continue;
                }
                if announce {
                    self.remember_synthesized(&path);
                    let ev = self.event(&path, EventType::Create);
                    self.emit(out, ev)?;
                }
                if self.opts.recursive && e.file_type().is_ok_and(|t| t.is_dir()) {
                    pending_bytes += path.as_os_str().len();
                    if pending_bytes > PENDING_BYTES {
                        return Err(Error::new(
                            Code::ResourceExhausted,
                            format!(
                                "'{}' holds more directories than one watch can follow \
                                 (their paths pass {} MiB); watch a smaller tree",
                                top.display(),
                                PENDING_BYTES >> 20
                            ),
                        ));
                    }
                    subdirs.push(path);
                }
            }
            out[announced..].sort_by(|a, b| a.name.cmp(&b.name));
            // Popped in name order.
            subdirs.sort_unstable_by(|a, b| b.cmp(a));
            pending.extend(subdirs);
        }
        Ok(true)
    }

    /// Remembers `path` as announced, so that its real CREATE is dropped.
    fn remember_synthesized(&mut self, path: &Path) {
        let len = path.as_os_str().len();
        if self.synthesized_bytes + len > SYNTHESIZED_BYTES {
            self.synthesized.clear();
            self.synthesized_bytes = 0;
        }
        if self.synthesized.insert(path.to_path_buf()) {
            self.synthesized_bytes += len;
        }
    }
}

/// envd's named temporary files (see `ops::sibling_temp_name`).
fn is_envd_temp(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| super::ops::is_sibling_temp(n.as_encoded_bytes()))
}

/// Whether an event's path is the kernel's placeholder for an unnamed file
/// (`O_TMPFILE`: envd's uploads until their rename, see `staged`, or any
/// program's): `#` and the inode number, and no entry of that name exists.
/// Only such names cost an `lstat`.
fn is_unnamed(path: &Path) -> bool {
    let Some(name) = path.file_name().map(|n| n.as_encoded_bytes()) else {
        return false;
    };
    let placeholder = name.len() > 1
        && name.len() <= 21
        && name[0] == b'#'
        && name[1..].iter().all(u8::is_ascii_digit);
    placeholder
        && std::fs::symlink_metadata(path).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
}

fn lost() -> Error {
    Error::new(
        Code::DataLoss,
        "the inotify event queue overflowed; events were lost (watch again and rescan)",
    )
}

fn read_limit(name: &str) -> String {
    std::fs::read_to_string(format!("/proc/sys/fs/inotify/{name}"))
        .map_or_else(|_| "?".into(), |s| s.trim().to_owned())
}

pub(super) fn notify_error(e: &notify::Error, path: &Path) -> Error {
    match &e.kind {
        notify::ErrorKind::MaxFilesWatch => Error::new(
            Code::ResourceExhausted,
            format!(
                "inotify watch limit reached while watching '{}' (fs.inotify.max_user_watches = {})",
                path.display(),
                read_limit("max_user_watches")
            ),
        ),
        notify::ErrorKind::Io(io) if io.raw_os_error() == Some(libc::EMFILE) => Error::new(
            Code::ResourceExhausted,
            format!(
                "inotify instance limit reached (fs.inotify.max_user_instances = {})",
                read_limit("max_user_instances")
            ),
        ),
        notify::ErrorKind::Io(io) => Error::io(format!("watch {}", path.display()), io),
        notify::ErrorKind::PathNotFound => Error::not_found(format!("'{}' does not exist", path.display())),
        _ => Error::internal(format!("watch {}: {e}", path.display())),
    }
}

/// The network filesystem `path` is on, if any.
fn network_fs(path: &Path) -> Option<&'static str> {
    let st = nix::sys::statfs::statfs(path).ok()?;
    let magic = st.filesystem_type().0 as i64;
    Some(match magic {
        0x6969 => "NFS",
        0x517B => "SMB",
        0xFF53_4D42 => "CIFS",
        0xFE53_4D42 => "SMB2",
        0x6573_5546 => "FUSE",
        0x0102_1997 => "9P",
        0x00C3_6400 => "Ceph",
        _ => return None,
    })
}
