//! One inotify instance (through `notify`) shared by every watch envd runs.
//!
//! The kernel limits inotify instances per user (`max_user_instances`, 128 by
//! default) and envd usually runs as the same user as the sandbox's code; one
//! instance per watch let 128 idle watchers break `inotify_init()` in the
//! user's own programs. Here each directory has one kernel watch however many
//! subscriptions want it (reference counted), events are routed to the
//! subscriptions watching the event's directory, and the number of
//! subscriptions is capped.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use notify::{INotifyWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::quota::Quota;
use crate::status::{Code, Error, Result};

/// Raw notify events queued per subscription between notify's thread and the
/// subscription's translator. When full, the subscription is marked as
/// having lost events.
const RAW_QUEUE: usize = 16 * 1024;
/// Bytes of raw events (their paths, plus [`EVENT_COST`] each) queued per
/// subscription at most, and for all subscriptions together: an event's
/// paths may be 4 KiB each, and a watch whose client does not read must not
/// make envd hold 16,384 of them (8 such watches took envd to 542 MiB).
const RAW_BYTES: usize = 1 << 20;
const RAW_BYTES_TOTAL: usize = 32 << 20;
/// What a queued event costs beyond its paths.
const EVENT_COST: usize = 96;

/// Raw event bytes queued by all subscriptions.
static QUEUED_TOTAL: Quota = Quota::new(RAW_BYTES_TOTAL);

/// What all subscriptions' watched directories may cost together: a path is
/// held three times (here once, shared by the two tables, and twice inside
/// notify), plus [`DIR_COST`] of map entries. The kernel bounds the number of
/// watches (`max_user_watches`, ~190,000 on a 24 GiB host), not their paths'
/// length: 20,000 directories with 3.8 KiB paths cost envd 304 MiB before
/// this bound.
const WATCHED_BYTES_TOTAL: usize = 64 << 20;
const DIR_COST: usize = 256;

/// Bytes of watched directories held by all subscriptions.
static WATCHED_TOTAL: Quota = Quota::new(WATCHED_BYTES_TOTAL);

fn dir_cost(dir: &Path) -> usize {
    3 * dir.as_os_str().len() + DIR_COST
}

fn cost(ev: &RawEvent) -> usize {
    EVENT_COST
        + ev.as_ref()
            .map_or(0, |e| e.paths.iter().map(|p| p.as_os_str().len()).sum())
}

/// Default cap on concurrent subscriptions (WatchDir streams and polling
/// watchers together).
pub const DEFAULT_MAX_WATCHES: usize = 256;

pub type RawEvent = notify::Result<notify::Event>;

#[derive(Default)]
struct Table {
    /// Watched directory → the subscriptions that asked for it.
    dirs: HashMap<Arc<Path>, HashSet<u64>>,
    subs: HashMap<u64, Sink>,
}

impl Table {
    /// Takes subscription `id` off `dir`'s users; true when nobody watches
    /// `dir` any more (its entry is gone).
    fn drop_user(&mut self, dir: &Path, id: u64) -> bool {
        let Some(users) = self.dirs.get_mut(dir) else {
            return false;
        };
        users.remove(&id);
        if !users.is_empty() {
            return false;
        }
        self.dirs.remove(dir);
        true
    }
}

struct Sink {
    tx: mpsc::Sender<RawEvent>,
    overflow: Arc<AtomicBool>,
    /// Bytes of this subscription's events in its queue.
    queued: Arc<Quota>,
    /// This subscription's directories (each counted in [`WATCHED_TOTAL`]).
    dirs: HashSet<Arc<Path>>,
}

impl Sink {
    /// Queues `ev`, or marks the subscription as having lost events when
    /// its queue (by count or bytes) or all queues together are full.
    fn deliver(&self, ev: RawEvent) {
        let n = cost(&ev);
        // Counted before sending, so the receiver never releases more than
        // was counted.
        if self.queued.try_take_both(&QUEUED_TOTAL, n) {
            if self.tx.try_send(ev).is_ok() {
                return;
            }
            release(&self.queued, n);
        }
        self.overflow.store(true, Ordering::Relaxed);
    }
}

fn release(queued: &Quota, n: usize) {
    queued.give(n);
    QUEUED_TOTAL.give(n);
}

/// A subscription's queue of raw events, on the receiving side: taking an
/// event releases its bytes, and so does dropping the queue.
pub struct RawEvents {
    rx: mpsc::Receiver<RawEvent>,
    queued: Arc<Quota>,
}

impl RawEvents {
    /// Waits for events and moves up to `limit` of them into `batch`; 0
    /// once the subscription is gone.
    pub async fn recv_many(&mut self, batch: &mut Vec<RawEvent>, limit: usize) -> usize {
        let from = batch.len();
        let n = self.rx.recv_many(batch, limit).await;
        let bytes = batch[from..].iter().map(cost).sum();
        release(&self.queued, bytes);
        n
    }
}

impl Drop for RawEvents {
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(ev) = self.rx.try_recv() {
            release(&self.queued, cost(&ev));
        }
    }
}

/// The shared instance. Lock order: `watcher`, then `table`; notify's thread
/// (the event handler) takes only `table`.
pub struct Hub {
    table: Arc<Mutex<Table>>,
    watcher: Mutex<Option<INotifyWatcher>>,
    next_id: AtomicU64,
    max: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Hub {
    /// The process-wide hub.
    pub fn global() -> &'static Hub {
        static HUB: OnceLock<Hub> = OnceLock::new();
        HUB.get_or_init(|| Hub {
            table: Arc::default(),
            watcher: Mutex::new(None),
            next_id: AtomicU64::new(1),
            max: AtomicU64::new(DEFAULT_MAX_WATCHES as u64),
        })
    }

    /// Sets the cap on concurrent subscriptions.
    pub fn set_max(&self, max: usize) {
        self.max.store(max.max(1) as u64, Ordering::Relaxed);
    }

    /// A new subscription and the receiver of its raw events, or
    /// RESOURCE_EXHAUSTED at the cap.
    pub fn subscribe(&'static self) -> Result<(Subscription, RawEvents)> {
        let (tx, rx) = mpsc::channel(RAW_QUEUE);
        let overflow = Arc::new(AtomicBool::new(false));
        let queued = Arc::new(Quota::new(RAW_BYTES));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut t = lock(&self.table);
        let max = self.max.load(Ordering::Relaxed);
        if t.subs.len() as u64 >= max {
            return Err(Error::new(
                Code::ResourceExhausted,
                format!(
                    "envd already runs {max} watches (WatchDir streams and watchers); \
                     remove a watcher or end a stream first (--max-watches)"
                ),
            ));
        }
        t.subs.insert(
            id,
            Sink {
                tx,
                overflow: overflow.clone(),
                queued: queued.clone(),
                dirs: HashSet::new(),
            },
        );
        let sub = Subscription {
            hub: self,
            id,
            overflow,
        };
        Ok((sub, RawEvents { rx, queued }))
    }

    /// Runs `f` with the watcher, creating the inotify instance on first use.
    fn with_watcher<T>(
        &self,
        g: &mut Option<INotifyWatcher>,
        f: impl FnOnce(&mut INotifyWatcher) -> notify::Result<T>,
    ) -> notify::Result<T> {
        if g.is_none() {
            let table = self.table.clone();
            let handler = move |ev: RawEvent| dispatch(&table, ev);
            *g = Some(INotifyWatcher::new(handler, notify::Config::default())?);
        }
        f(g.as_mut().expect("created above"))
    }

    /// Watches `dir` for subscription `id`: `Ok(false)` if it vanished (or
    /// is no directory now), RESOURCE_EXHAUSTED when the watched paths of
    /// all subscriptions would pass [`WATCHED_BYTES_TOTAL`].
    fn add(&self, id: u64, dir: &Path) -> Result<bool> {
        let mut w = lock(&self.watcher);
        let (first, dir) = {
            let mut t = lock(&self.table);
            let t = &mut *t;
            let Some(sink) = t.subs.get_mut(&id) else {
                return Ok(true);
            };
            if sink.dirs.contains(dir) {
                return Ok(true); // this subscription has it already
            }
            if !WATCHED_TOTAL.try_take(dir_cost(dir)) {
                return Err(Error::new(
                    Code::ResourceExhausted,
                    format!(
                        "watching '{}' would take the directories envd watches past {} MiB \
                         of paths; watch fewer or smaller trees (or end other watches)",
                        dir.display(),
                        WATCHED_BYTES_TOTAL >> 20
                    ),
                ));
            }
            let dir: Arc<Path> = match t.dirs.get_key_value(dir) {
                Some((shared, _)) => shared.clone(),
                None => Arc::from(dir),
            };
            sink.dirs.insert(dir.clone());
            let users = t.dirs.entry(dir.clone()).or_default();
            users.insert(id);
            (users.len() == 1, dir)
        };
        if !first {
            return Ok(true);
        }
        let r = self.with_watcher(&mut w, |w| w.watch(&dir, RecursiveMode::NonRecursive));
        let Err(e) = r else {
            return Ok(true);
        };
        {
            let mut t = lock(&self.table);
            t.drop_user(&dir, id);
            if let Some(s) = t.subs.get_mut(&id) {
                if s.dirs.remove(&dir) {
                    WATCHED_TOTAL.give(dir_cost(&dir));
                }
            }
        }
        let vanished = match &e.kind {
            notify::ErrorKind::PathNotFound => true,
            notify::ErrorKind::Io(io) => {
                matches!(io.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR))
            }
            _ => false,
        };
        if vanished {
            return Ok(false);
        }
        Err(super::watch::notify_error(&e, &dir))
    }

    fn remove(&self, id: u64) {
        let mut w = lock(&self.watcher);
        let unused: Vec<Arc<Path>> = {
            let mut t = lock(&self.table);
            let Some(sink) = t.subs.remove(&id) else {
                return;
            };
            sink.dirs
                .into_iter()
                .filter(|d| {
                    WATCHED_TOTAL.give(dir_cost(d));
                    t.drop_user(d, id)
                })
                .collect()
        };
        if let Some(w) = w.as_mut() {
            for d in unused {
                // Already gone when the directory was deleted: fine.
                let _ = w.unwatch(&d);
            }
        }
    }
}

/// Routes one event (on notify's thread) to every subscription watching the
/// directory of one of its paths (or the path itself, for events on a watched
/// directory). Errors and queue overflows go to everyone.
fn dispatch(table: &Mutex<Table>, ev: RawEvent) {
    let mut t = lock(table);
    let event = match ev {
        // Opens and closes (notify watches them; every `read_dir` of a scan
        // is one) are nobody's event: queued, they filled a watch's queue
        // while it armed a large tree.
        Ok(e) if matches!(e.kind, notify::EventKind::Access(_)) => return,
        Ok(e) if !e.need_rescan() && !e.paths.is_empty() => e,
        other => {
            for sink in t.subs.values() {
                sink.deliver(clone_event(&other));
            }
            return;
        }
    };
    let mut targets: Vec<u64> = Vec::new();
    for p in &event.paths {
        for dir in [p.parent(), Some(p.as_path())].into_iter().flatten() {
            if let Some(users) = t.dirs.get(dir) {
                targets.extend(users.iter().copied());
            }
        }
    }
    targets.sort_unstable();
    targets.dedup();
    for id in targets {
        if let Some(sink) = t.subs.get(&id) {
            sink.deliver(Ok(event.clone()));
        }
    }
    // A deleted directory's watch is gone (notify dropped it too): forget
    // it, so that its bytes are given back and a directory made again under
    // the same name is watched afresh.
    if let notify::EventKind::Remove(_) = event.kind {
        for p in &event.paths {
            forget(&mut t, p);
        }
    }
}

/// Drops `dir` from the tables and every subscription that watched it.
fn forget(t: &mut Table, dir: &Path) {
    let Some(users) = t.dirs.remove(dir) else {
        return;
    };
    for id in users {
        if let Some(sink) = t.subs.get_mut(&id) {
            if sink.dirs.remove(dir) {
                WATCHED_TOTAL.give(dir_cost(dir));
            }
        }
    }
}

fn clone_event(ev: &RawEvent) -> RawEvent {
    match ev {
        Ok(e) => Ok(e.clone()),
        Err(e) => Err(notify::Error::generic(&e.to_string())),
    }
}

/// One consumer's view of the hub: the directories it watches (its raw
/// events arrive on the receiver `subscribe` returned). Dropping it releases
/// its watches.
pub struct Subscription {
    hub: &'static Hub,
    id: u64,
    /// Set when an event could not be queued (the consumer fell behind).
    pub overflow: Arc<AtomicBool>,
}

impl Subscription {
    /// Watches `dir` (not its subdirectories) for this subscription;
    /// `Ok(false)` if it vanished meanwhile.
    pub fn watch(&self, dir: &Path) -> Result<bool> {
        self.hub.add(self.id, dir)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        self.hub.remove(self.id);
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}
