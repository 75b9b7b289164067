//! The process service's part of a live upgrade: every command envd knows,
//! written into the handover state (its fds kept open across exec), and
//! taken back by the next image, which supervises them as if it had started
//! them.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::output::{LogImage, OutputLog, Source};
use super::pty::Pty;
use super::reaper::{ExitStatus, ExitWatch};
use super::service::ProcessService;
use super::started::{description_cost, Input, OutputFdRecord, Process, StdinPipe, DESCRIPTIONS};
use super::supervise::{supervise, OutputFds};
use crate::handover::carry::{Claimed, Kept};
use crate::proto::envd::handover::{Chunk, Command};

/// `Command.input`.
const INPUT_PIPE: u32 = 0;
const INPUT_PTY: u32 = 1;
const INPUT_NONE: u32 = 2;

/// What both a handover and a crash record say of a command: who it is,
/// how its input works, its cgroup and time left; no fds (-1) and no output.
/// `with_config`: its config too (only `List` reads a config, and only a
/// running command's).
fn identity(p: &Process, retention: Option<Duration>, with_config: bool) -> Command {
    Command {
        pid: p.pid,
        tag: p.tag.clone(),
        config: with_config.then(|| p.config.clone()),
        seq: p.seq,
        stdout_fd: -1,
        stderr_fd: -1,
        stdin_fd: -1,
        pty_fd: -1,
        pidfd: -1,
        input: match p.input {
            Input::Pipe(_) => INPUT_PIPE,
            Input::Pty(_) => INPUT_PTY,
            Input::Null => INPUT_NONE,
        },
        retention_ms: retention.map_or(0, millis),
        cgroup: p
            .leaf
            .as_ref()
            .map(|l| l.path().display().to_string())
            .unwrap_or_default(),
        deadline_ms: p.deadline.map_or(0, |d| {
            millis(d.saturating_duration_since(Instant::now())).max(1)
        }),
        ..Default::default()
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ProcessService {
    /// Wakes every output producer (a quiesce began: none may keep waiting
    /// on a reader).
    pub fn wake_outputs(&self) {
        for (p, _) in self.table().all() {
            p.output.wake();
        }
    }

    /// Every command, for the handover state. Must run with the reaper paused
    /// and the pumps parked; fds to carry are duplicated into `kept`.
    pub fn handover_image(&self, kept: &mut Kept) -> (Vec<Command>, u64) {
        let mut out = Vec::new();
        for (p, retention) in self.table().all() {
            let log = p.output.image();
            let status = *p.status.borrow();
            let mut c = Command {
                log_start: log.start,
                log_end: log.end,
                chunks: log
                    .chunks
                    .into_iter()
                    .map(|(offset, source, data)| Chunk {
                        offset,
                        source: Source::code(source),
                        data,
                    })
                    .collect(),
                end: log.finished.clone(),
                ..identity(&p, retention, true)
            };
            match status {
                Some(ExitStatus::Exited(code)) => c.exit_code = Some(code),
                Some(ExitStatus::Signaled {
                    signal,
                    core_dumped,
                }) => {
                    c.exit_signal = Some(signal);
                    c.core_dumped = core_dumped;
                }
                None => {}
            }
            if log.finished.is_none() {
                // Still running or draining: its fds go along.
                let [stdout, stderr] = p.fds.get();
                c.stdout_fd = kept.keep(stdout);
                c.stderr_fd = kept.keep(stderr);
                match &p.input {
                    Input::Pipe(stdin) => c.stdin_fd = stdin.with_fd(|fd| kept.keep(fd)),
                    Input::Pty(_) => c.pty_fd = kept.keep(p.pty().ok().map(|pty| pty.raw_fd())),
                    Input::Null => {}
                }
            }
            out.push(c);
        }
        (out, self.next_seq())
    }

    /// Every command for a crash record: identities and offsets, no output
    /// and no fds (those are named in the fd store).
    pub fn crash_image(&self) -> Vec<Command> {
        self.table()
            .all()
            .into_iter()
            .map(|(p, retention)| {
                let (log_end, end) = p.output.image_end();
                // An exit record goes without the config: the record is
                // rewritten often, and ended commands are most of it.
                let with_config = end.is_none();
                let crash = p.crash.get().copied().unwrap_or_default();
                Command {
                    log_start: log_end,
                    log_end,
                    end,
                    offset_slot: crash.slot.unwrap_or(u32::MAX),
                    stdout_ino: crash.pipes[0],
                    stderr_ino: crash.pipes[1],
                    ..identity(&p, retention, with_config)
                }
            })
            .collect()
    }

    /// Running commands.
    pub fn running(&self) -> Vec<Arc<Process>> {
        self.table().running()
    }

    /// Ended commands whose exit records are kept, oldest first.
    pub fn ended_records(&self) -> Vec<Arc<Process>> {
        let all = self.table().all().into_iter();
        all.filter_map(|(p, left)| left.map(|_| p)).collect()
    }

    pub fn next_seq_public(&self) -> u64 {
        self.next_seq()
    }

    /// The pids of running commands in a handover state (to register with
    /// the reaper before it first reaps).
    pub fn handover_pids(commands: &[Command]) -> Vec<i32> {
        commands
            .iter()
            .filter(|c| c.end.is_none() && c.exit_code.is_none() && c.exit_signal.is_none())
            .filter_map(|c| i32::try_from(c.pid).ok())
            .collect()
    }

    /// Takes over the commands of a previous envd image. `exits` are the
    /// reaper's watches of the running ones. Returns how many could not be
    /// taken over (each is logged).
    pub fn adopt(
        &self,
        commands: Vec<Command>,
        next_seq: u64,
        exits: &mut std::collections::HashMap<i32, ExitWatch>,
        claimed: &mut Claimed,
        recovered: bool,
    ) -> usize {
        self.bump_seq(next_seq);
        let mut failed = 0;
        for c in commands {
            let pid = c.pid;
            if let Err(e) = self.adopt_one(c, exits, claimed, recovered) {
                tracing::error!(pid, error = %e, "handover: command not taken over");
                failed += 1;
            }
        }
        failed
    }

    fn adopt_one(
        &self,
        c: Command,
        exits: &mut std::collections::HashMap<i32, ExitWatch>,
        claimed: &mut Claimed,
        recovered: bool,
    ) -> Result<(), String> {
        let pid = c.pid;
        // After a crash, the pidfd is what makes the pid safe to use.
        let pidfd = match claimed.take(c.pidfd) {
            Some(fd) => Some(fd),
            None if recovered && c.end.is_none() => {
                return Err("no pidfd was kept for it".into());
            }
            None => None,
        };
        let chunks = c
            .chunks
            .into_iter()
            .filter_map(|ch| Some((ch.offset, Source::from_code(ch.source)?, ch.data)))
            .collect();
        let finished = c.end.clone();
        let output = OutputLog::restore(
            self.settings().output_buffer,
            self.budget().clone(),
            LogImage {
                start: c.log_start,
                end: c.log_end,
                chunks,
                finished: finished.clone(),
            },
        );
        let leaf = (!c.cgroup.is_empty())
            .then(|| crate::cgroups::leaf::Leaf::adopt(c.cgroup.clone().into()))
            .flatten();
        let known = match (c.exit_code, c.exit_signal) {
            (Some(code), _) => Some(ExitStatus::Exited(code)),
            (None, Some(signal)) => Some(ExitStatus::Signaled {
                signal,
                core_dumped: c.core_dumped,
            }),
            (None, None) => None,
        };
        // Counted whatever the bound: it was admitted by the image before.
        let described = DESCRIPTIONS.hold(description_cost(c.tag.as_deref(), c.config.as_ref()));
        if finished.is_some() {
            // An exit record: no fds, no tasks.
            let p = Arc::new(Process {
                pid,
                tag: c.tag,
                config: c.config.unwrap_or_default(),
                seq: c.seq,
                output,
                input: Input::Null,
                exited: super::flag::Flag::new(true),
                leaf,
                status: tokio::sync::watch::channel(known).1,
                fds: OutputFdRecord::default(),
                recovered: false,
                deadline: None,
                pidfd: Default::default(),
                crash: Default::default(),
                described,
            });
            self.table()
                .insert_ended(p, Duration::from_millis(c.retention_ms));
            return Ok(());
        }
        let status = match (known, &pidfd) {
            (Some(s), _) => tokio::sync::watch::channel(Some(s)).1,
            (None, Some(fd)) if recovered => crate::handover::exits::watch_exit(pid, fd),
            (None, _) => i32::try_from(pid)
                .ok()
                .and_then(|p| exits.remove(&p))
                .ok_or("not registered with the reaper")?,
        };
        let take = |claimed: &mut Claimed, fd: i32| -> Option<OwnedFd> { claimed.take(fd) };
        let (input, output_fds, record) = if c.input == INPUT_PTY {
            let master = take(claimed, c.pty_fd).ok_or("its pty was not carried")?;
            let pty = Arc::new(Pty::adopt(master).map_err(|e| format!("pty: {e}"))?);
            (
                Input::Pty(std::sync::Mutex::new(Some(pty.clone()))),
                OutputFds::Pty(pty),
                OutputFdRecord::default(),
            )
        } else {
            let rx = |fd: Option<OwnedFd>, what: &str| -> Result<pipe::Receiver, String> {
                let fd = fd.ok_or_else(|| format!("its {what} was not carried"))?;
                pipe::Receiver::from_owned_fd(fd).map_err(|e| format!("{what}: {e}"))
            };
            let stdout = rx(take(claimed, c.stdout_fd), "stdout")?;
            let stderr = rx(take(claimed, c.stderr_fd), "stderr")?;
            let record = OutputFdRecord::new(Some(stdout.as_raw_fd()), Some(stderr.as_raw_fd()));
            let input = match (c.input, take(claimed, c.stdin_fd)) {
                (INPUT_PIPE, Some(fd)) => Input::Pipe(StdinPipe::from_sender(
                    pipe::Sender::from_owned_fd(fd).map_err(|e| format!("stdin: {e}"))?,
                )),
                (INPUT_PIPE, None) => Input::Pipe(StdinPipe::closed()),
                _ => Input::Null,
            };
            (input, OutputFds::Pipes { stdout, stderr }, record)
        };
        let deadline = (c.deadline_ms > 0)
            .then(|| Instant::now().checked_add(Duration::from_millis(c.deadline_ms)))
            .flatten();
        let p = Arc::new(Process {
            pid,
            tag: c.tag,
            config: c.config.unwrap_or_default(),
            seq: c.seq,
            output,
            input,
            exited: super::flag::Flag::new(false),
            leaf,
            status,
            fds: record,
            recovered,
            deadline,
            pidfd: Default::default(),
            crash: Default::default(),
            described,
        });
        if let Some(fd) = pidfd {
            let _ = p.pidfd.set(fd);
        }
        self.table().insert(p.clone());
        supervise(p, output_fds, deadline, self.table().clone());
        Ok(())
    }
}
