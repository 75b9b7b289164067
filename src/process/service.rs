//! `process.Process` logic, written once against the prost types. Protocol
//! adapters (gRPC, Connect) parse a [`RequestContext`] and call in.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};

use super::events::{self, EventStream};
use super::output::{Budget, OutputLog};
use super::prepare;
use super::reaper::Reaper;
use super::started::{description_cost, Process, DESCRIPTIONS, DESCRIPTIONS_MAX};
use super::supervise::supervise;
use super::table::ProcessTable;
use crate::defaults::Defaults;
use crate::proto::process::process_event::StartEvent;
use crate::proto::process::process_input::Input as InputKind;
use crate::proto::process::stream_input_request::Event as InputEvent;
use crate::proto::process::*;
use crate::quota::Held;
use crate::request::RequestContext;
use crate::status::{Code, Error, Result};

/// Tunables of the process service.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Output retained per process for re-attach (bytes).
    pub output_buffer: usize,
    /// Output retained by all processes together (bytes).
    pub output_budget: u64,
    /// How long an ended process stays visible to `Connect`.
    pub exit_retention: Duration,
    /// At most this many ended processes are kept.
    pub max_exit_records: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            output_buffer: 1 << 20,
            output_budget: 32 << 20,
            exit_retention: Duration::from_secs(60),
            max_exit_records: 256,
        }
    }
}

#[derive(Debug)]
pub struct ProcessService {
    /// The workload cgroups, once set up (none outside a VM or without v2).
    cgroups: std::sync::OnceLock<Arc<crate::cgroups::Cgroups>>,
    table: Arc<ProcessTable>,
    reaper: Arc<Reaper>,
    defaults: Arc<Defaults>,
    settings: Settings,
    budget: Arc<Budget>,
    seq: AtomicU64,
}

impl ProcessService {
    pub fn new(reaper: Arc<Reaper>, defaults: Arc<Defaults>, settings: Settings) -> Self {
        Self {
            cgroups: std::sync::OnceLock::new(),
            table: Arc::new(ProcessTable::new(
                settings.exit_retention,
                settings.max_exit_records,
            )),
            reaper,
            defaults,
            budget: Budget::new(settings.output_budget),
            settings,
            seq: AtomicU64::new(0),
        }
    }

    /// Puts every later command in the workload cgroups.
    pub fn use_cgroups(&self, cgroups: Arc<crate::cgroups::Cgroups>) {
        let _ = self.cgroups.set(cgroups);
    }

    /// The command's own cgroup, under ptys or user; none for the
    /// orchestrator's `_system` commands or when envd manages no cgroups (a
    /// request with limits is then refused: they would be ignored).
    fn leaf_for(&self, req: &StartRequest, seq: u64) -> Result<Option<crate::cgroups::leaf::Leaf>> {
        use crate::cgroups::{limits, Kind, SYSTEM_TAG};
        let wants_limits = req.limits.as_ref().is_some_and(limits::any);
        let Some(cg) = self.cgroups.get() else {
            if wants_limits {
                return Err(Error::precondition(
                    "limits need resource control, which is off: envd manages no cgroups here \
                     (not in a VM, no cgroup v2, or -no-cgroups)",
                ));
            }
            return Ok(None);
        };
        if req.tag.as_deref() == Some(SYSTEM_TAG) {
            if wants_limits {
                return Err(Error::invalid(
                    "a _system command runs in envd's cgroup: no limits",
                ));
            }
            return Ok(None);
        }
        let kind = if req.pty.is_some() {
            Kind::Pty
        } else {
            Kind::User
        };
        cg.new_leaf(kind, seq, req.limits.as_ref()).map(Some)
    }

    pub(super) fn table(&self) -> &Arc<ProcessTable> {
        &self.table
    }

    pub(super) fn settings(&self) -> &Settings {
        &self.settings
    }

    pub(super) fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    pub(super) fn next_seq(&self) -> u64 {
        self.seq.load(Ordering::Relaxed)
    }

    /// Numbering continues after the commands a previous image started.
    pub(super) fn bump_seq(&self, at_least: u64) {
        self.seq.fetch_max(at_least, Ordering::Relaxed);
    }

    /// The reaper every child is started and reaped through.
    pub fn reaper(&self) -> &Arc<Reaper> {
        &self.reaper
    }

    /// Whether `pid` is a running command envd started.
    pub fn is_command(&self, pid: u32) -> bool {
        self.table.running().iter().any(|p| p.pid == pid)
    }

    /// Whether commands get cgroups of their own (resource control is on).
    pub fn resource_control(&self) -> bool {
        self.cgroups.get().is_some()
    }

    /// Starts a command; its lifetime is bounded by the request deadline.
    /// The look at its working directory, the program's PATH search and the
    /// clone (which returns only once the child has exec'd) touch the
    /// caller's paths: on a stalled mount (a FUSE or NFS server that stopped
    /// answering) each waits for as long as the mount does, which on an
    /// async worker would stall all of envd. So while the VM has a mount
    /// that may stall ([`super::stall`]), everything up to the registration
    /// runs on a blocking thread; a caller that goes away meanwhile leaves
    /// the command registered and supervised, as one that goes away later
    /// does. Otherwise it runs here.
    pub async fn start(
        self: &Arc<Self>,
        ctx: &RequestContext,
        req: StartRequest,
    ) -> Result<EventStream> {
        if !super::stall::may_stall() {
            return self.start_here(ctx, req);
        }
        let (svc, ctx) = (self.clone(), ctx.clone());
        crate::threads::run("start", move || svc.start_here(&ctx, req)).await?
    }

    /// [`ProcessService::start`]'s work, on the calling thread.
    fn start_here(&self, ctx: &RequestContext, req: StartRequest) -> Result<EventStream> {
        let described = self.describe(&req)?;
        let workdir = self.defaults.workdir();
        let mut launch =
            prepare::prepare(&req, &ctx.user, &self.defaults.envs(), workdir.as_deref())?;
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        let leaf = self.leaf_for(&req, seq)?;
        if let Some(l) = &leaf {
            let dir = l
                .dir_fd()
                .map_err(|e| Error::io(format!("open cgroup {}", l.path().display()), &e));
            match dir {
                Ok(dir) => launch.prepared.join_cgroup(dir),
                Err(e) => {
                    l.retire();
                    return Err(e);
                }
            }
        }
        let config = req.process.unwrap_or_default();
        let output = OutputLog::new(self.settings.output_buffer, self.budget.clone());
        // Subscribed before the child exists: no early output is missed.
        let sub = output.subscribe_live();
        let spawned = self.reaper.spawn(|slot| launch.prepared.spawn(slot));
        let (pid, status) = match spawned {
            Ok(s) => s,
            Err(e) => {
                if let Some(l) = &leaf {
                    l.retire();
                }
                return Err(Error::io(format!("start '{}'", config.cmd), &e));
            }
        };
        // Closes the child's ends of the pipes / the pty slave in envd.
        drop(launch.prepared);
        let fds = match &launch.output {
            super::supervise::OutputFds::Pipes { stdout, stderr } => {
                super::started::OutputFdRecord::new(
                    Some(std::os::fd::AsRawFd::as_raw_fd(stdout)),
                    Some(std::os::fd::AsRawFd::as_raw_fd(stderr)),
                )
            }
            super::supervise::OutputFds::Pty(_) => super::started::OutputFdRecord::default(),
        };
        // A spawned child's pid is positive.
        let pid = pid.unsigned_abs();
        tracing::info!(pid, cmd = %config.cmd, user = %ctx.user.name, tag = ?req.tag, "process started");
        let process = Arc::new(Process {
            pid,
            tag: req.tag,
            config,
            seq,
            output,
            input: launch.input,
            exited: super::flag::Flag::new(false),
            leaf,
            status,
            fds,
            recovered: false,
            deadline: ctx.deadline,
            pidfd: Default::default(),
            crash: Default::default(),
            described,
        });
        self.table.insert(process.clone());
        crate::handover::crash::started(&process);
        supervise(process, launch.output, ctx.deadline, self.table.clone());
        Ok(events::stream(start_event(pid), sub, ctx.keepalive, None))
    }

    /// Holds the new process's description against [`DESCRIPTIONS`], making
    /// room by forgetting ended processes (oldest first) if it must and
    /// that can; refused when running ones hold the bound.
    fn describe(&self, req: &StartRequest) -> Result<Held> {
        let n = description_cost(req.tag.as_deref(), req.process.as_ref());
        if let Some(h) = DESCRIPTIONS.try_hold(n) {
            return Ok(h);
        }
        // Only when forgetting them all would make room: running processes
        // holding the bound are no reason to lose exits.
        let fits = |used: usize| used + n <= DESCRIPTIONS_MAX;
        if fits(
            DESCRIPTIONS
                .used()
                .saturating_sub(self.table.ended_described()),
        ) {
            self.table.forget_ended_until(|| fits(DESCRIPTIONS.used()));
        }
        DESCRIPTIONS.try_hold(n).ok_or_else(|| {
            Error::new(
                Code::ResourceExhausted,
                format!(
                    "the processes envd knows hold {} MiB of commands, arguments, environments \
                     and tags, the most they may; this one adds {n} bytes",
                    DESCRIPTIONS_MAX >> 20
                ),
            )
        })
    }

    /// Re-attaches to a process: live output (E2B), or replay from an offset.
    /// An ended process replays its retained output and its `end`.
    pub fn connect(&self, ctx: &RequestContext, req: ConnectRequest) -> Result<EventStream> {
        let p = self.table.find_any(req.process.as_ref())?;
        let (sub, start) = match req.resume_offset {
            Some(offset) => {
                let (sub, at, lost) = p.output.subscribe_from(offset)?;
                let mut start = start_event(p.pid);
                start.output_offset = Some(at);
                start.output_lost = Some(lost);
                (sub, start)
            }
            None if p.is_running() => (p.output.subscribe_live(), start_event(p.pid)),
            None => (p.output.subscribe_retained(), start_event(p.pid)),
        };
        Ok(events::stream(start, sub, ctx.keepalive, ctx.deadline))
    }

    /// The running commands; the answer is counted in the request's share
    /// of the answers' budget ([`crate::answers`]).
    pub fn list(&self, ctx: &RequestContext) -> Result<ListResponse> {
        let list = ListResponse {
            processes: self
                .table
                .running()
                .into_iter()
                .map(|p| ProcessInfo {
                    config: Some(p.config.clone()),
                    pid: p.pid,
                    tag: p.tag.clone(),
                    usage: p.leaf.as_ref().map(|l| l.usage()),
                })
                .collect(),
            resource_control: self.resource_control(),
        };
        ctx.answer.hold(prost::Message::encoded_len(&list))?;
        Ok(list)
    }

    pub fn update(&self, req: UpdateRequest) -> Result<UpdateResponse> {
        let p = self.table.find_running(req.process.as_ref())?;
        if let Some(pty) = req.pty {
            let size = pty
                .size
                .ok_or_else(|| Error::invalid("pty.size (cols, rows) is required to resize"))?;
            p.resize(size.cols, size.rows)?;
        }
        Ok(UpdateResponse {})
    }

    pub async fn send_signal(&self, req: SendSignalRequest) -> Result<SendSignalResponse> {
        let sig = super::exit::to_signal(req.signal)?;
        let p = self.table.find_running(req.process.as_ref())?;
        if req.descendants {
            tracing::info!(pid = p.pid, signal = %sig, "signal to the command's cgroup and group");
            // SIGKILL is one write (`cgroup.kill`); another signal is a kill
            // per process in the cgroup, as many as the command forked, on
            // a blocking thread, or here when there is none to spare (a
            // fork bomb took them all: what such a signal is likely for).
            if sig == nix::sys::signal::Signal::SIGKILL {
                p.signal_descendants(sig)?;
            } else {
                let q = p.clone();
                match crate::threads::run("signal", move || q.signal_descendants(sig)).await {
                    Ok(sent) => sent?,
                    Err(e) if e.code == crate::status::Code::ResourceExhausted => {
                        p.signal_descendants(sig)?
                    }
                    Err(e) => return Err(e),
                }
            }
        } else {
            tracing::info!(pid = p.pid, signal = %sig, "signal to process group");
            p.signal(sig)?;
        }
        Ok(SendSignalResponse {})
    }

    pub async fn send_input(&self, req: SendInputRequest) -> Result<SendInputResponse> {
        let p = self.table.find_running(req.process.as_ref())?;
        write_input(&p, req.input).await?;
        Ok(SendInputResponse {})
    }

    /// Client-streamed input: `start{selector}` first, then data in order.
    pub async fn stream_input<S>(&self, mut input: S) -> Result<StreamInputResponse>
    where
        S: Stream<Item = Result<StreamInputRequest>> + Unpin,
    {
        let p = match input.next().await.transpose()?.and_then(|m| m.event) {
            Some(InputEvent::Start(s)) => self.table.find_running(s.process.as_ref())?,
            Some(_) => {
                return Err(Error::invalid(
                    "the first StreamInput message must be 'start'",
                ))
            }
            None => {
                return Err(Error::invalid(
                    "StreamInput ended before its 'start' message",
                ))
            }
        };
        while let Some(msg) = input.next().await.transpose()? {
            match msg.event {
                Some(InputEvent::Data(d)) => write_input(&p, d.input).await?,
                Some(InputEvent::Keepalive(_)) | None => {}
                Some(InputEvent::Start(_)) => {
                    return Err(Error::invalid(
                        "StreamInput may contain only one 'start' message",
                    ))
                }
            }
        }
        Ok(StreamInputResponse {})
    }

    pub async fn close_stdin(&self, req: CloseStdinRequest) -> Result<CloseStdinResponse> {
        let p = self.table.find_running(req.process.as_ref())?;
        p.close_stdin().await?;
        Ok(CloseStdinResponse {})
    }
}

fn start_event(pid: u32) -> StartEvent {
    StartEvent {
        pid,
        output_offset: None,
        output_lost: None,
    }
}

/// Input bytes that requests hold until their process reads them, for all
/// processes together. Each `SendInput` (or `StreamInput` message) holds
/// its data until written, and writes to one process wait in turn: 100
/// requests of 4 MB to a command that never reads took envd to +389 MiB.
const INPUT_WAITING_MAX: usize = 64 << 20;
static INPUT_WAITING: crate::quota::Quota = crate::quota::Quota::new(INPUT_WAITING_MAX);

async fn write_input(p: &Process, input: Option<ProcessInput>) -> Result<()> {
    let (data, pty) = match input.and_then(|i| i.input) {
        Some(InputKind::Stdin(data)) => (data, false),
        Some(InputKind::Pty(data)) => (data, true),
        None => return Err(Error::invalid("input (stdin or pty bytes) is required")),
    };
    let Some(_held) = INPUT_WAITING.try_hold(data.len()) else {
        return Err(Error::new(
            crate::status::Code::ResourceExhausted,
            format!(
                "{} MiB of input already wait for processes to read it; \
                 retry once they have read some",
                INPUT_WAITING_MAX >> 20
            ),
        ));
    };
    if pty {
        p.write_pty(&data).await
    } else {
        p.write_stdin(&data).await
    }
}
