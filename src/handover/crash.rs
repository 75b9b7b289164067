//! Crash re-adoption under systemd: envd keeps what a restarted envd needs in
//! systemd's file-descriptor store (`FDSTORE=1`): its listeners, every
//! command's output pipes or pty master, stdin and a pidfd, plus two memfds:
//! a state record (the same `State` message a live upgrade hands over, with
//! fds named instead of numbered), rewritten whenever the set of commands or
//! the `/init` state changes, and an offset table in shared memory where each
//! command's output log publishes its end offset on every append.
//!
//! After `kill -9`, systemd restarts envd and hands the store back
//! (`$LISTEN_FDS`, `$LISTEN_FDNAMES`); envd takes the commands over from
//! there: output continues at the offset where the old envd stopped reading
//! (what it had read but not delivered is reported as `output_lost` on
//! re-attach; what was written meanwhile waits in the pipe), input and
//! signals work (signals through the pidfd's process), and exit statuses come
//! from [`super::exits`].

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prost::Message;

use super::carry::Claimed;
use super::incoming::Incoming;
use super::memfd;
use super::tails::{self, Tails};
use crate::auth::Auth;
use crate::defaults::Defaults;
use crate::process::started::{CrashEntry, Input, Process};
use crate::process::ProcessService;
use crate::proto::envd::handover::{InitState, KeptPipe, Listener, State};

pub const STATE_NAME: &str = "envd-state";
pub const OFFSETS_NAME: &str = "envd-offsets";
/// Commands with an offset slot (later ones are still served, but a crash
/// loses where their output stood).
const SLOTS: usize = 4096;
/// Bytes before the encoded state: its length and hash. The state is
/// written to one of two places in turn, and only once it is whole does the
/// header (one 16-byte write) switch to it: an envd killed in the middle of a
/// rewrite leaves the previous record readable. (Rewriting in place lost
/// every command to a crash that landed mid-write.)
const HEADER: u64 = 16;
/// Largest state record written or read back.
const MAX_STATE: u64 = 64 << 20;
/// Where the second place starts; the first is at [`HEADER`]. The memfd is
/// sparse: the gap costs nothing.
const SECOND: u64 = HEADER + MAX_STATE;
/// The top bit of the header's length word: the record is in the second
/// place. (Records written before there were two places never set it.)
const IN_SECOND: u64 = 1 << 63;

/// How long after a change the record is rewritten: a burst of starts and
/// ends goes into one rewrite.
const COALESCE: Duration = Duration::from_millis(5);
/// The least time between two rewrites. A rewrite encodes every command
/// known, exit records included (up to 256 ended ones, each with its
/// config): under back-to-back Starts, a rewrite per Start cost envd more
/// CPU than the Start itself. A command started just before a crash is in
/// the record at most this much later.
const MIN_GAP: Duration = Duration::from_millis(25);

static RECORD: OnceLock<Arc<CrashRecord>> = OnceLock::new();

#[derive(Debug)]
pub struct CrashRecord {
    state: File,
    /// Whether the header points at the second place (see [`HEADER`]).
    in_second: std::sync::atomic::AtomicBool,
    /// Held for a whole rewrite: the writer task and [`write_now`] (on the
    /// thread of a filesystem call) both write.
    writing: Mutex<()>,
    /// Two words per slot: the command's seq + 1 (0: free), its end offset.
    offsets: &'static [AtomicU64],
    /// The newest output of each command, in a pool of rings (none if the
    /// memory for it could not be had).
    tails: Option<Tails>,
    free: Mutex<Vec<u32>>,
    dirty: tokio::sync::Notify,
    process: Arc<ProcessService>,
    auth: Arc<Auth>,
    defaults: Arc<Defaults>,
    listeners: Vec<(String, RawFd)>,
    exe: String,
}

/// The store name of a command's output fds (pipes or pty master) and its
/// pidfd, which go in one message and leave in one.
fn group_name(seq: u64) -> String {
    format!("c{seq}")
}

/// The store name of a command's stdin: closing stdin removes it alone.
fn stdin_name(seq: u64) -> String {
    format!("c{seq}i")
}

/// What envds before 2026-12-05 named each output fd and pidfd (`c<seq>`
/// and one of these): removed when a command is taken over, so that its fds
/// can go in again under [`group_name`] (the store keeps an open file under
/// the first name it was stored with).
const OLD_NAMES: [char; 4] = ['o', 'e', 't', 'p'];

/// Starts keeping crash records, if systemd supervises envd (not as PID 1:
/// a crash of PID 1 is a kernel panic, handled by re-executing instead).
pub fn enable(
    process: Arc<ProcessService>,
    auth: Arc<Auth>,
    defaults: Arc<Defaults>,
    listeners: Vec<(String, RawFd)>,
    exe: String,
) {
    if !crate::sd::supervised() || crate::init::is_pid1() {
        return;
    }
    match CrashRecord::new(process, auth, defaults, listeners, exe) {
        Ok(r) => {
            let r = Arc::new(r);
            if RECORD.set(r.clone()).is_ok() {
                // Commands taken over (from a crash or a live upgrade): their
                // fds go in again under this envd's names.
                for p in r.process.running() {
                    remove_old_names(p.seq);
                    r.started(&p);
                    // Its end may have come before the store did.
                    if !p.is_running() {
                        remove_names(&p, false);
                    }
                }
                // Exit records taken over keep their output through another
                // crash: each gets a slot and a ring as a command does
                // (after the running ones, oldest first, so that the newest
                // keep theirs when rings run short).
                for p in r.process.ended_records() {
                    r.register(&p, [None, None]);
                    r.ring_ended(&p);
                }
                // The store never holds a record that is not whole: the
                // first one is written before the memfd goes in.
                let stored = r
                    .write()
                    .and_then(|()| crate::sd::store_fd(STATE_NAME, r.state.as_raw_fd()));
                if let Err(e) = stored {
                    tracing::warn!(error = %e, "crash records off: the record is not stored");
                    return;
                }
                r.clone().spawn_writer();
                tracing::info!(
                    "crash records on: commands survive an envd crash (systemd fd store)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "crash records off: cannot set up the fd store"),
    }
}

/// A command started (or was taken over): its fds go to the store.
pub fn started(p: &Arc<Process>) {
    if let Some(r) = RECORD.get() {
        r.started(p);
    }
}

/// A command's `end` is final: its fds leave the store. Also before crash
/// records are on: a command taken over can end before [`enable`], and its
/// fds are in the store under the previous envd's names.
pub fn ended(p: &Process) {
    match RECORD.get() {
        Some(r) => r.ended(p),
        None if crate::sd::supervised() => remove_names(p, true),
        None => {}
    }
}

/// A command in the record is forgotten (its exit record went): its slot
/// and its ring are free again.
pub fn forgotten(entry: &CrashEntry, seq: u64) {
    if let Some(r) = RECORD.get() {
        r.forgotten(entry, seq);
    }
}

/// Removes a command's fds from the store: its names, and with `old` those
/// an older envd gave them ([`OLD_NAMES`]).
fn remove_names(p: &Process, old: bool) {
    crate::sd::remove_fds(&group_name(p.seq));
    if matches!(p.input, Input::Pipe(_)) {
        crate::sd::remove_fds(&stdin_name(p.seq));
    }
    if old {
        remove_old_names(p.seq);
    }
}

/// Removes the names an older envd gave a command's fds ([`OLD_NAMES`]).
fn remove_old_names(seq: u64) {
    for what in OLD_NAMES {
        crate::sd::remove_fds(&format!("c{seq}{what}"));
    }
}

/// A pipe kept for a background job after its command's end
/// ([`crate::process::linger`]) was closed (its writers are gone): its
/// store entry goes.
pub fn pipe_unkept(name: &str) {
    if crate::sd::supervised() {
        crate::sd::remove_fds(name);
    }
}

/// A command's stdin was closed: the store's copy of the pipe must go too,
/// or the command would never see end of input.
pub fn stdin_closed(p: &Process) {
    if RECORD.get().is_some() {
        crate::sd::remove_fds(&stdin_name(p.seq));
    }
}

/// A hidden temporary is about to be made (`filesystem::hidden`): the
/// record is rewritten here and now, before the file exists, so that a crash
/// at any moment after it leaves the next envd the name to remove. Not paced
/// like a command's start: temporaries are rare (a cross-filesystem Move, an
/// upload where the file system has no `O_TMPFILE`), each a whole file's
/// work, and called on the filesystem call's own thread.
pub fn write_now() {
    if let Some(r) = RECORD.get() {
        if let Err(e) = r.write() {
            tracing::warn!(error = %e, "crash record not written");
        }
    }
}

/// Something in the record changed (`/init`, a temporary gone).
pub fn changed() {
    if let Some(r) = RECORD.get() {
        r.dirty.notify_one();
    }
}

impl CrashRecord {
    fn new(
        process: Arc<ProcessService>,
        auth: Arc<Auth>,
        defaults: Arc<Defaults>,
        listeners: Vec<(String, RawFd)>,
        exe: String,
    ) -> std::io::Result<CrashRecord> {
        let state = memfd::create(c"envd-state")?;
        let (table, ptr) = memfd::mapped(c"envd-offsets", SLOTS * 2 * 8)?;
        // SAFETY: `ptr` is a live, page-aligned mapping of SLOTS * 2
        // u64-sized, zeroed words, valid for the rest of envd's life, and
        // only accessed as atomics.
        let offsets: &'static [AtomicU64] =
            unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), SLOTS * 2) };
        // A previous life's record and listeners go; this one's come in.
        crate::sd::remove_fds(STATE_NAME);
        crate::sd::remove_fds(OFFSETS_NAME);
        crate::sd::store_fd(OFFSETS_NAME, table.as_raw_fd())?;
        crate::sd::remove_fds(tails::NAME);
        let tails = Tails::new()
            .and_then(|t| crate::sd::store_fd(tails::NAME, t.fd()).map(|()| t))
            .inspect_err(|e| tracing::warn!(error = %e, "crash records keep no output tails"))
            .ok();
        for (i, (_, fd)) in listeners.iter().enumerate() {
            let n = format!("l{i}");
            crate::sd::remove_fds(&n);
            crate::sd::store_fd(&n, *fd)?;
        }
        Ok(CrashRecord {
            state,
            in_second: std::sync::atomic::AtomicBool::new(true),
            writing: Mutex::new(()),
            offsets,
            tails,
            free: Mutex::new((0..u32::try_from(SLOTS).unwrap_or(0)).rev().collect()),
            dirty: tokio::sync::Notify::new(),
            process,
            auth,
            defaults,
            listeners,
            exe,
        })
    }

    /// One message stores the command's output fds and pidfd, and one more
    /// its stdin (a message costs envd a system call and systemd a wake-up;
    /// there were four per Start, and four more at the end).
    fn started(&self, p: &Arc<Process>) {
        if p.pidfd.get().is_none() {
            if let Ok(fd) = pidfd_open(p.pid) {
                let _ = p.pidfd.set(fd);
            }
        }
        let store = |name: String, fds: &[RawFd]| {
            if fds.is_empty() {
                return;
            }
            // WouldBlock: systemd does not read; the outbox says so.
            match crate::sd::store_fds(&name, fds) {
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    tracing::warn!(pid = p.pid, error = %e, "fd store refused a command's fds");
                }
                _ => {}
            }
        };
        let [stdout, stderr] = p.fds.get();
        let pty = match &p.input {
            Input::Pty(_) => p.pty().ok().map(|t| t.raw_fd()),
            _ => None,
        };
        let pidfd = p.pidfd.get().map(AsRawFd::as_raw_fd);
        let group: Vec<RawFd> = [stdout, stderr, pty, pidfd].into_iter().flatten().collect();
        store(group_name(p.seq), &group);
        if let Input::Pipe(stdin) = &p.input {
            stdin.with_fd(|fd| store(stdin_name(p.seq), fd.as_slice()));
        }
        self.register(p, [stdout, stderr]);
        self.dirty.notify_one();
    }

    /// Gives a command its slot in the offset table and its output ring,
    /// once (start-up may see a command twice), with its stdout and stderr
    /// fds as stored (none for an exit record).
    fn register(&self, p: &Arc<Process>, [stdout, stderr]: [Option<RawFd>; 2]) {
        if p.crash.get().is_none() {
            let slot = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut ring = None;
            if let Some(slot) = slot {
                let i = usize::try_from(slot).unwrap_or(0) * 2;
                self.offsets[i].store(p.seq + 1, Ordering::Release);
                let tails = self.tails.as_ref();
                p.output.mirror_to(&self.offsets[i + 1], |from| {
                    let tail = tails.and_then(|t| t.claim(p.seq, from));
                    ring = tail.as_ref().map(tails::Tail::index);
                    tail
                });
            }
            let _ = p.crash.set(CrashEntry {
                slot,
                ring,
                pipes: [inode(stdout), inode(stderr)],
            });
        }
    }

    fn ended(&self, p: &Process) {
        // Not stored by this envd: a command taken over that ended before
        // `enable` stored it again, under the previous envd's names.
        remove_names(p, p.crash.get().is_none());
        // Only now: the store keeps one entry per open file, and a pipe kept
        // for a background job was in the command's group until here.
        crate::process::linger::with_kept_of(p.seq, |name, fd| {
            match crate::sd::store_fd(name, fd) {
                Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => {
                    tracing::warn!(name, error = %e, "fd store refused a kept pipe");
                }
                _ => {}
            }
        });
        self.ring_ended(p);
        self.dirty.notify_one();
    }

    /// An ended command keeps its slot and ring while its exit record
    /// lives ([`forgotten`]): the output a client had not taken when it
    /// ended survives a crash too (unless a starting command needs the ring
    /// first).
    fn ring_ended(&self, p: &Process) {
        if let (Some(t), Some(ring)) = (&self.tails, p.crash.get().and_then(|c| c.ring)) {
            t.ended(ring, p.seq);
        }
    }

    fn forgotten(&self, entry: &CrashEntry, seq: u64) {
        if let (Some(t), Some(ring)) = (&self.tails, entry.ring) {
            t.release(ring, seq);
        }
        let Some(slot) = entry.slot else {
            return;
        };
        let i = usize::try_from(slot).unwrap_or(0) * 2;
        self.offsets[i].store(0, Ordering::Release);
        self.free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot);
    }

    /// Rewrites the record after each change: [`COALESCE`] after it, and
    /// at least [`MIN_GAP`] after the previous rewrite.
    fn spawn_writer(self: Arc<Self>) {
        tokio::spawn(async move {
            let mut last: Option<tokio::time::Instant> = None;
            loop {
                self.dirty.notified().await;
                let soon = tokio::time::Instant::now() + COALESCE;
                let at = last.map_or(soon, |l| soon.max(l + MIN_GAP));
                tokio::time::sleep_until(at).await;
                if let Err(e) = self.write() {
                    tracing::warn!(error = %e, "crash record not written");
                }
                last = Some(tokio::time::Instant::now());
            }
        });
    }

    /// Writes the record to the place the header does not point at, then
    /// points the header at it (see [`HEADER`]). One writer at a time: the
    /// first write in [`enable`], the writer task, [`write_now`].
    fn write(&self) -> std::io::Result<()> {
        let _one = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = self.record().encode_to_vec();
        let len = bytes.len() as u64;
        if len > MAX_STATE {
            return Err(std::io::Error::other(format!(
                "a record of {len} bytes is over {MAX_STATE}"
            )));
        }
        let second = !self.in_second.load(Ordering::Relaxed);
        let (at, flag) = if second {
            (SECOND, IN_SECOND)
        } else {
            (HEADER, 0)
        };
        self.state.write_all_at(&bytes, at)?;
        let mut head = [0u8; 16];
        head[..8].copy_from_slice(&(len | flag).to_le_bytes());
        head[8..].copy_from_slice(&fnv(&bytes).to_le_bytes());
        self.state.write_all_at(&head, 0)?;
        self.in_second.store(second, Ordering::Relaxed);
        Ok(())
    }

    fn record(&self) -> State {
        let commands = self
            .process
            .crash_image()
            .into_iter()
            .map(|mut c| {
                let seq = c.seq;
                if c.end.is_none() {
                    let group = group_name(seq);
                    // A pipe is told apart by its inode: none known, no name.
                    let named = |ino: u64| {
                        if ino == 0 {
                            String::new()
                        } else {
                            group.clone()
                        }
                    };
                    c.stdout_name = named(c.stdout_ino);
                    c.stderr_name = named(c.stderr_ino);
                    c.pty_name.clone_from(&group);
                    c.pidfd_name = group;
                    c.stdin_name = stdin_name(seq);
                }
                c
            })
            .collect();
        State {
            schema: super::SCHEMA,
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            listeners: self
                .listeners
                .iter()
                .enumerate()
                .map(|(i, (url, _))| Listener {
                    url: url.clone(),
                    fd: -1,
                    fd_name: format!("l{i}"),
                })
                .collect(),
            commands,
            init: Some(InitState {
                access_token: self.auth.current(),
                default_user: self.defaults.user(),
                default_workdir: self.defaults.workdir(),
                env_vars: self.defaults.init_envs().into_iter().collect(),
                last_init_ns: None,
            }),
            watchers: Vec::new(),
            next_seq: self.process.next_seq_public(),
            crash_record: true,
            exe_path: self.exe.clone(),
            temporaries: crate::filesystem::hidden::list(),
            // In the store under their own names, found by those after a
            // crash (`recover`): the record is not rewritten for them.
            kept_pipes: Vec::new(),
        }
    }
}

/// 64-bit FNV-1a: detects a record torn by a crash mid-write.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| std::io::Error::other("fd out of range"))?;
    // SAFETY: `fd` was just returned by pidfd_open and is ours.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The record a crashed envd left in the fd store, if systemd handed one
/// over: commands with their fds by number, ready to be taken over.
pub fn recover() -> Option<Incoming> {
    // A name can hold several fds (a command's output fds and pidfd).
    let mut fds: HashMap<&str, Vec<RawFd>> = HashMap::new();
    for (n, fd) in crate::sd::listen_fds() {
        fds.entry(n.as_str()).or_default().push(*fd);
    }
    let state_fd = *fds.get(STATE_NAME)?.first()?;
    let mut claimed = Claimed::with_floor(3);
    let loaded = read_state(&mut claimed, state_fd).map(|mut state| {
        // A memfd the record keeps beside it.
        let mut memfd = |name: &str| {
            let fd = *fds.get(name)?.first()?;
            claimed.take(fd).map(File::from)
        };
        let table = memfd(OFFSETS_NAME);
        let ring = memfd(tails::NAME);
        let owners = ring.as_ref().map(tails::owners).unwrap_or_default();
        let named = |n: &str| fds.get(n).map_or(&[][..], Vec::as_slice);
        for c in &mut state.commands {
            c.stdout_fd = pick(named(&c.stdout_name), Kind::Pipe(c.stdout_ino));
            c.stderr_fd = pick(named(&c.stderr_name), Kind::Pipe(c.stderr_ino));
            c.stdin_fd = pick(named(&c.stdin_name), Kind::Pipe(0));
            c.pty_fd = pick(named(&c.pty_name), Kind::Pty);
            c.pidfd = pick(named(&c.pidfd_name), Kind::Pidfd);
            if let Some(end) = table
                .as_ref()
                .and_then(|t| slot_end(t, c.offset_slot, c.seq))
            {
                c.log_start = end;
                c.log_end = end;
                // What the crashed envd had read but not delivered.
                if let Some((from, chunks)) = ring.as_ref().and_then(|r| {
                    let index = *owners.get(&c.seq)?;
                    tails::read(r, index, c.seq, end)
                }) {
                    c.log_start = from;
                    c.chunks = chunks;
                }
            }
        }
        for l in &mut state.listeners {
            l.fd = named(&l.fd_name).first().copied().unwrap_or(-1);
        }
        state
    });
    let mut incoming = Incoming::from_read(loaded, claimed, "the crashed envd's record");
    // Kept pipes are known by their names alone (the record is not
    // rewritten for them).
    incoming.state.kept_pipes = crate::sd::listen_fds()
        .iter()
        .filter(|(n, _)| crate::process::linger::is_store_name(n))
        .map(|(n, fd)| KeptPipe {
            fd: *fd,
            fd_name: n.clone(),
        })
        .collect();
    if incoming.report.failed {
        // The commands are lost with the record, but not the listeners: the
        // store still holds them, and a fresh bind of the same address would
        // fail for as long as it does (envd could not start again).
        incoming.state.listeners = stored_listeners(&fds);
        // What it cannot take over leaves the store (the lost commands'
        // fds), as after a readable record.
        incoming.state.crash_record = true;
    }
    Some(incoming)
}

/// What a stored fd of a command is.
#[derive(Clone, Copy)]
enum Kind {
    /// A pipe; with its inode number, that pipe (0: the one pipe there is).
    Pipe(u64),
    /// A pty master (a character device).
    Pty,
    /// A pidfd: neither a pipe nor a character device.
    Pidfd,
}

/// The fd of `kind` among those stored under one name (-1: none).
fn pick(fds: &[RawFd], kind: Kind) -> RawFd {
    let fits = |fd: RawFd| {
        // The fd was handed to this process by the service manager and stays
        // open at least until it is claimed.
        let Some(st) = fstat(fd) else {
            return false;
        };
        let format = st.st_mode & libc::S_IFMT;
        match kind {
            Kind::Pipe(ino) => format == libc::S_IFIFO && (ino == 0 || st.st_ino == ino),
            Kind::Pty => format == libc::S_IFCHR,
            Kind::Pidfd => format != libc::S_IFIFO && format != libc::S_IFCHR,
        }
    };
    fds.iter().copied().find(|&fd| fits(fd)).unwrap_or(-1)
}

/// The inode number of an open fd (0: none, or not known).
fn inode(fd: Option<RawFd>) -> u64 {
    fd.and_then(fstat).map_or(0, |st| st.st_ino)
}

/// `fstat` of `fd`, which the caller knows to be open for the duration of
/// the call (a command's output fd, or one the service manager handed over).
fn fstat(fd: RawFd) -> Option<nix::sys::stat::FileStat> {
    // SAFETY: open for the duration of the call (see above); borrowed for
    // the fstat only.
    let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    nix::sys::stat::fstat(borrowed).ok()
}

/// The listeners in the store (`l0`, `l1`, ...), each with the URL of the
/// address it is bound to.
fn stored_listeners(
    fds: &HashMap<&str, Vec<RawFd>>,
) -> Vec<crate::proto::envd::handover::Listener> {
    fds.iter()
        .filter(|(name, _)| {
            name.strip_prefix('l')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|(name, v)| {
            let fd = *v.first()?;
            // SAFETY: the fd was handed to this process by the service
            // manager and stays open at least until it is claimed; it is only
            // borrowed for the getsockname.
            let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
            let url = crate::listen::bound_url(borrowed)?;
            Some(crate::proto::envd::handover::Listener {
                url: url.to_string(),
                fd,
                fd_name: (*name).to_owned(),
            })
        })
        .collect()
}

fn read_state(claimed: &mut Claimed, fd: RawFd) -> Result<State, String> {
    let file = File::from(claimed.take(fd).ok_or("the state fd is not open")?);
    let mut head = [0u8; 16];
    file.read_exact_at(&mut head, 0)
        .map_err(|e| e.to_string())?;
    let word = u64::from_le_bytes(head[..8].try_into().unwrap_or_default());
    let hash = u64::from_le_bytes(head[8..].try_into().unwrap_or_default());
    let (len, at) = if word & IN_SECOND != 0 {
        (word & !IN_SECOND, SECOND)
    } else {
        (word, HEADER)
    };
    if len > MAX_STATE {
        return Err(format!("a record of {len} bytes is implausible"));
    }
    let mut bytes = vec![0u8; usize::try_from(len).map_err(|e| e.to_string())?];
    file.read_exact_at(&mut bytes, at)
        .map_err(|e| e.to_string())?;
    if fnv(&bytes) != hash {
        return Err("the record was torn (envd died while writing it)".into());
    }
    let state = State::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    if state.schema > super::SCHEMA {
        return Err(format!("schema {} is newer than this envd", state.schema));
    }
    Ok(state)
}

/// The end offset in `slot`, if the slot still belongs to command `seq`.
fn slot_end(table: &File, slot: u32, seq: u64) -> Option<u64> {
    let mut w = [0u8; 16];
    table.read_exact_at(&mut w, u64::from(slot) * 16).ok()?;
    let owner = u64::from_ne_bytes(w[..8].try_into().ok()?);
    (owner == seq + 1).then(|| u64::from_ne_bytes(w[8..].try_into().unwrap_or_default()))
}
