//! One process envd started: identity, output log, input side and lifecycle
//! flags. Shared (`Arc`) by the table, the RPCs and its own I/O tasks.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

use super::output::{OutputLog, Source};
use super::pty::Pty;
use super::reaper::ExitWatch;
use crate::proto::process::ProcessConfig;
use crate::status::{Error, Result};

/// A stdin pipe. Writers take turns on `writer`; closing does not wait for
/// a writer blocked on a child that never reads: it raises `closed`, which
/// makes the writer give up, then drops the pipe.
#[derive(Debug)]
pub struct StdinPipe {
    writer: Mutex<Option<Writer>>,
    closed: super::flag::Flag,
    /// The pipe's fd while it is open (what a live upgrade carries).
    raw: std::sync::Mutex<Option<RawFd>>,
}

/// envd's end of a stdin pipe. Most commands never get input, so the fd
/// joins tokio's reactor only at the first write: no registration, no
/// readiness events and no deregistration for the others.
#[derive(Debug)]
enum Writer {
    Idle(OwnedFd),
    Ready(pipe::Sender),
}

impl StdinPipe {
    /// envd's (write) end of a new pipe.
    pub fn new(fd: OwnedFd) -> Self {
        Self::with_writer(fd.as_raw_fd(), Writer::Idle(fd))
    }

    /// A pipe already registered with the reactor (carried by a live upgrade).
    pub fn from_sender(tx: pipe::Sender) -> Self {
        Self::with_writer(tx.as_raw_fd(), Writer::Ready(tx))
    }

    fn with_writer(raw: RawFd, w: Writer) -> Self {
        Self {
            writer: Mutex::new(Some(w)),
            closed: super::flag::Flag::new(false),
            raw: std::sync::Mutex::new(Some(raw)),
        }
    }

    /// A stdin that was closed before a live upgrade.
    pub fn closed() -> Self {
        Self {
            writer: Mutex::new(None),
            closed: super::flag::Flag::new(true),
            raw: std::sync::Mutex::new(None),
        }
    }

    /// Runs `f` on the open pipe's fd (it stays open meanwhile).
    pub fn with_fd<T>(&self, f: impl FnOnce(Option<RawFd>) -> T) -> T {
        f(*self.raw.lock().unwrap_or_else(|e| e.into_inner()))
    }

    async fn write(&self, pid: u32, data: &[u8]) -> Result<()> {
        let closed_err = || Error::precondition(format!("stdin of process {pid} is closed"));
        let mut guard = tokio::select! {
            g = self.writer.lock() => g,
            () = self.closed.wait() => return Err(closed_err()),
        };
        if let Some(Writer::Idle(_)) = guard.as_ref() {
            if let Some(Writer::Idle(fd)) = guard.take() {
                // Checked: the fd may be one a live upgrade carried.
                match pipe::Sender::from_owned_fd(fd) {
                    Ok(tx) => *guard = Some(Writer::Ready(tx)),
                    Err(e) => {
                        *self.raw.lock().unwrap_or_else(|e| e.into_inner()) = None;
                        return Err(Error::io(format!("stdin of process {pid}"), &e));
                    }
                }
            }
        }
        let Some(Writer::Ready(w)) = guard.as_mut() else {
            return Err(closed_err());
        };
        tokio::select! {
            r = w.write_all(data) => r.map_err(|e| Error::io(format!("write to stdin of process {pid}"), &e)),
            () = self.closed.wait() => Err(Error::precondition(format!(
                "stdin of process {pid} was closed while this input was being written \
                 (the process was not reading it); part of it may have been delivered"
            ))),
        }
    }

    async fn close(&self) {
        self.closed.set();
        let mut w = self.writer.lock().await;
        *self.raw.lock().unwrap_or_else(|e| e.into_inner()) = None;
        w.take();
    }
}

/// Where input to the process goes.
#[derive(Debug)]
pub enum Input {
    Pipe(StdinPipe),
    /// The pty master; `None` once the process has ended.
    Pty(std::sync::Mutex<Option<Arc<Pty>>>),
    /// Started with `stdin=false`: stdin is /dev/null.
    Null,
}

#[derive(Debug)]
pub struct Process {
    pub pid: u32,
    pub tag: Option<String>,
    pub config: ProcessConfig,
    /// Start order, to break ties between equal tags or reused pids.
    pub seq: u64,
    pub output: Arc<OutputLog>,
    pub input: Input,
    /// Becomes true when the process (the group leader) has exited.
    pub exited: super::flag::Flag,
    /// The command's own cgroup, when envd manages cgroups.
    pub leaf: Option<crate::cgroups::leaf::Leaf>,
    /// The exit status, once reaped.
    pub status: ExitWatch,
    /// envd's output fds while they are open.
    pub fds: OutputFdRecord,
    /// Re-adopted after envd crashed: envd is no longer its parent.
    pub recovered: bool,
    /// When the request that started it ends its life (killed then).
    pub deadline: Option<tokio::time::Instant>,
    /// A pidfd of the process (crash records and re-adopted commands).
    pub pidfd: std::sync::OnceLock<std::os::fd::OwnedFd>,
    /// What the crash record keeps of it beside its stored fds.
    pub crash: std::sync::OnceLock<CrashEntry>,
    /// Its share of [`DESCRIPTIONS`] (`tag` and `config`), while it is known.
    pub described: crate::quota::Held,
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Some(entry) = self.crash.get() {
            crate::handover::crash::forgotten(entry, self.seq);
        }
    }
}

/// What the crash record keeps of a command beside its stored fds.
#[derive(Debug, Clone, Copy, Default)]
pub struct CrashEntry {
    /// Its slot in the offset table (none while the table is full).
    pub slot: Option<u32>,
    /// Its output ring (none while every ring is a running command's).
    pub ring: Option<u32>,
    /// The inode numbers of its stdout and stderr pipes (0: none): they tell
    /// the two apart in the store, where a command's fds share one name.
    pub pipes: [u64; 2],
}

/// What the descriptions of all processes envd knows (command, arguments,
/// environment, working directory and tag: what `List` and `Connect` give
/// back) may hold together. A Start request may carry 4 MiB of them, kept
/// while the command runs and as long as its exit is, so without this bound
/// 1,000 `sleep`s with 4 MiB tags would hold 4 GiB.
pub const DESCRIPTIONS_MAX: usize = 64 << 20;
pub static DESCRIPTIONS: crate::quota::Quota = crate::quota::Quota::new(DESCRIPTIONS_MAX);

/// What a process's description costs against [`DESCRIPTIONS`]: its bytes,
/// plus the strings' own overhead, plus a fixed share for the record.
pub fn description_cost(tag: Option<&str>, config: Option<&ProcessConfig>) -> usize {
    const STRING: usize = 24;
    let mut n = 256 + tag.map_or(0, |t| t.len() + STRING);
    if let Some(c) = config {
        n += c.cmd.len() + STRING;
        n += c.cwd.as_ref().map_or(0, |d| d.len() + STRING);
        n += c.args.iter().map(|a| a.len() + STRING).sum::<usize>();
        n += c
            .envs
            .iter()
            .map(|(k, v)| k.len() + v.len() + 2 * STRING + 16)
            .sum::<usize>();
    }
    n
}

/// The output pipes' fds by number, while their pumps hold them open.
#[derive(Debug, Default)]
pub struct OutputFdRecord(std::sync::Mutex<[Option<RawFd>; 2]>);

impl OutputFdRecord {
    pub fn new(stdout: Option<RawFd>, stderr: Option<RawFd>) -> Self {
        Self(std::sync::Mutex::new([stdout, stderr]))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, [Option<RawFd>; 2]> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pump of `source` is about to close its fd.
    pub fn forget(&self, source: Source) {
        match source {
            Source::Stdout => self.lock()[0] = None,
            Source::Stderr => self.lock()[1] = None,
            Source::Pty => {}
        }
    }

    /// The open (stdout, stderr) fds.
    pub fn get(&self) -> [Option<RawFd>; 2] {
        *self.lock()
    }
}

impl Process {
    pub fn is_running(&self) -> bool {
        !self.exited.is_set()
    }

    fn ensure_running(&self) -> Result<()> {
        if self.is_running() {
            Ok(())
        } else {
            Err(Error::not_found(format!("process {} has ended", self.pid)))
        }
    }

    /// Delivers `sig` to the process's whole process group.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        self.ensure_running()?;
        self.ensure_same_process()?;
        kill_group(self.pid, sig)
    }

    /// A re-adopted command is not envd's child, so its pid could in theory
    /// be recycled: its pidfd must still name a live process.
    fn ensure_same_process(&self) -> Result<()> {
        let Some(fd) = self.pidfd.get().filter(|_| self.recovered) else {
            return Ok(());
        };
        // SAFETY: pidfd_send_signal with signal 0 only checks that the
        // process behind the open pidfd exists.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                fd.as_raw_fd(),
                0,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc != 0 {
            return Err(Error::not_found(format!("process {} has ended", self.pid)));
        }
        Ok(())
    }

    /// Delivers `sig` to everything the command started: its cgroup (SIGKILL
    /// through `cgroup.kill`) and its process group. Without a cgroup, the
    /// process group only.
    pub fn signal_descendants(&self, sig: Signal) -> Result<()> {
        self.ensure_running()?;
        self.ensure_same_process()?;
        if let Some(leaf) = &self.leaf {
            let sent = if sig == Signal::SIGKILL {
                leaf.kill()
            } else {
                leaf.signal(sig)
            };
            sent.map_err(|e| Error::io(format!("signal cgroup {}", leaf.path().display()), &e))?;
        }
        match kill_group(self.pid, sig) {
            // The cgroup kill may have ended the group already.
            Err(e) if self.leaf.is_some() && e.code == crate::status::Code::NotFound => Ok(()),
            r => r,
        }
    }

    /// Kills everything the command started (its cgroup, else its group).
    pub fn kill_all(&self) {
        if let Some(leaf) = &self.leaf {
            if let Err(e) = leaf.kill() {
                tracing::warn!(pid = self.pid, error = %e, "cgroup kill failed");
            }
        }
        if let Err(e) = kill_group(self.pid, Signal::SIGKILL) {
            tracing::debug!(pid = self.pid, error = %e, "group kill");
        }
    }

    pub async fn write_stdin(&self, data: &[u8]) -> Result<()> {
        self.ensure_running()?;
        match &self.input {
            Input::Pipe(stdin) => stdin.write(self.pid, data).await,
            Input::Pty(_) => Err(Error::precondition(format!(
                "process {} runs on a pty: send pty input instead of stdin",
                self.pid
            ))),
            Input::Null => Err(self.no_stdin()),
        }
    }

    pub async fn write_pty(&self, data: &[u8]) -> Result<()> {
        self.ensure_running()?;
        match &self.input {
            Input::Pty(_) => self
                .pty()?
                .write_all(data)
                .await
                .map_err(|e| Error::io(format!("write to pty of process {}", self.pid), &e)),
            _ => Err(self.no_pty()),
        }
    }

    /// Closes stdin (EOF for the child). Idempotent.
    pub async fn close_stdin(&self) -> Result<()> {
        self.ensure_running()?;
        match &self.input {
            Input::Pipe(stdin) => {
                stdin.close().await;
                crate::handover::crash::stdin_closed(self);
                Ok(())
            }
            Input::Pty(_) => Err(Error::precondition(format!(
                "process {} runs on a pty, which has no separate stdin; send Ctrl-D (0x04) as pty input",
                self.pid
            ))),
            Input::Null => Err(self.no_stdin()),
        }
    }

    pub fn resize(&self, cols: u32, rows: u32) -> Result<()> {
        self.ensure_running()?;
        match &self.input {
            Input::Pty(_) => self.pty()?.resize(cols, rows),
            _ => Err(self.no_pty()),
        }
    }

    /// Why the exit status is unknown, for `end.error`.
    pub fn status_lost_reason(&self) -> String {
        if self.recovered {
            "exit status lost: envd restarted while the command ran, and only its parent \
             can learn how it ended"
                .into()
        } else {
            "exit status was lost".into()
        }
    }

    pub(crate) fn pty(&self) -> Result<Arc<Pty>> {
        match &self.input {
            Input::Pty(pty) => pty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
                .ok_or_else(|| Error::not_found(format!("process {} has ended", self.pid))),
            _ => Err(self.no_pty()),
        }
    }

    /// Closes envd's input side once the process has ended and its output
    /// is drained, so a retained exit record holds no fds.
    pub async fn release_input(&self) {
        match &self.input {
            Input::Pipe(stdin) => stdin.close().await,
            Input::Pty(pty) => {
                pty.lock().unwrap_or_else(|e| e.into_inner()).take();
            }
            Input::Null => {}
        }
    }

    fn no_stdin(&self) -> Error {
        Error::precondition(format!(
            "process {} was started without stdin (stdin=false)",
            self.pid
        ))
    }

    fn no_pty(&self) -> Error {
        Error::precondition(format!("process {} does not run on a pty", self.pid))
    }
}

/// Signals process group `pgid` (never 0 or 1: that would hit envd or everyone).
pub fn kill_group(pgid: u32, sig: Signal) -> Result<()> {
    let pgid = i32::try_from(pgid)
        .ok()
        .filter(|p| *p > 1)
        .ok_or_else(|| Error::internal(format!("refusing to signal process group {pgid}")))?;
    killpg(Pid::from_raw(pgid), sig).map_err(|e| match e {
        nix::errno::Errno::ESRCH => Error::not_found(format!("process group {pgid} has ended")),
        e => Error::io(format!("signal process group {pgid}"), &e.into()),
    })
}
