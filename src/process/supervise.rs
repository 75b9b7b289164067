//! Supervision: the tasks that run alongside a process: output pumps (fd → output log) and
//! the supervisor (exit status, deadline kill, drain, `end`, table update).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::exit::end_event;
use super::output::Source;
use super::pty::Pty;
use super::reaper::{ExitStatus, ExitWatch};
use super::started::Process;
use super::table::ProcessTable;

/// Bytes read per chunk from a pipe or pty.
pub const PIPE_READ_CHUNK: usize = 64 * 1024;

/// After the process exits, output is read until EOF; if a descendant keeps
/// the pipe or pty open, reading stops once it stays silent this long.
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);

/// Output fds of a started process, on envd's side.
#[derive(Debug)]
pub enum OutputFds {
    Pipes {
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
    Pty(Arc<Pty>),
}

/// Resolves once the process has exited and then `DRAIN_IDLE` has passed.
async fn exited_and_idle(exited: &super::flag::Flag) {
    exited.wait().await;
    tokio::time::sleep(DRAIN_IDLE).await;
}

/// One output fd of a process, read in chunks of at most [`PIPE_READ_CHUNK`].
enum OutputReader {
    Pipe(pipe::Receiver),
    /// The pty and a scratch buffer, zeroed once (the pty reads into a
    /// slice; output is usually a few bytes at a time).
    Pty(Arc<Pty>, Box<[u8]>),
}

impl OutputReader {
    /// Appends what is available to `buf`; `Ok(0)` at end of output.
    async fn read(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            OutputReader::Pipe(rx) => {
                buf.reserve(PIPE_READ_CHUNK);
                rx.read_buf(buf).await
            }
            OutputReader::Pty(pty, scratch) => {
                let n = pty.read(scratch).await?;
                buf.extend_from_slice(&scratch[..n]);
                Ok(n)
            }
        }
    }
}

/// Copies one output fd into the log until end of output, or until the
/// process has exited and the fd stayed silent for `DRAIN_IDLE`. A live
/// upgrade parks it between reads (both reads are cancel-safe: a byte is
/// either in `buf`, then appended, or still in the kernel).
async fn pump(mut reader: OutputReader, source: Source, process: Arc<Process>) {
    let _counted = crate::handover::quiesce::PumpGuard::new();
    let log = process.output.clone();
    let mut buf = BytesMut::new();
    // One registration for the pump's life (re-made after a park), not one
    // per read: streaming output reads in a tight loop.
    let mut quiesce = Box::pin(crate::handover::quiesce::until_requested());
    loop {
        let read = tokio::select! {
            biased;
            () = &mut quiesce => {
                crate::handover::quiesce::park().await;
                quiesce = Box::pin(crate::handover::quiesce::until_requested());
                continue;
            }
            r = reader.read(&mut buf) => r,
            () = exited_and_idle(&process.exited) => break,
        };
        match read {
            Ok(0) => break,
            Ok(_) => log.append(source, buf.split().freeze()).await,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::debug!(error = %e, ?source, "output read failed");
                break;
            }
        }
    }
    // The fd closes with `reader`: a live upgrade must no longer carry it.
    process.fds.forget(source);
}

/// Starts the pumps and the supervisor of a just-spawned process.
pub fn supervise(
    process: Arc<Process>,
    fds: OutputFds,
    deadline: Option<Instant>,
    table: Arc<ProcessTable>,
) {
    let readers = match fds {
        OutputFds::Pipes { stdout, stderr } => vec![
            (OutputReader::Pipe(stdout), Source::Stdout),
            (OutputReader::Pipe(stderr), Source::Stderr),
        ],
        OutputFds::Pty(pty) => {
            let scratch = vec![0; PIPE_READ_CHUNK].into_boxed_slice();
            vec![(OutputReader::Pty(pty, scratch), Source::Pty)]
        }
    };
    let pumps: Vec<JoinHandle<()>> = readers
        .into_iter()
        .map(|(reader, source)| tokio::spawn(pump(reader, source, process.clone())))
        .collect();
    tokio::spawn(await_end(process, pumps, deadline, table));
}

async fn await_end(
    process: Arc<Process>,
    pumps: Vec<JoinHandle<()>>,
    deadline: Option<Instant>,
    table: Arc<ProcessTable>,
) {
    let pid = process.pid;
    let mut exit = process.status.clone();
    let status = match deadline {
        None => reaped(&mut exit).await,
        Some(at) => tokio::select! {
            s = reaped(&mut exit) => s,
            () = tokio::time::sleep_until(at) => {
                tracing::info!(pid, "process deadline reached; killing its cgroup and process group");
                process.kill_all();
                reaped(&mut exit).await
            }
        },
    };
    // Exited: no longer listed or signalable; the pumps start their drain.
    process.exited.set();
    table.mark_ended(&process);
    for p in pumps {
        let _ = p.await;
    }
    process.release_input().await;
    let mut end = match status {
        Some(s) => end_event(s),
        None => crate::proto::process::process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some(process.status_lost_reason()),
            ..Default::default()
        },
    };
    if let Some(leaf) = &process.leaf {
        let (oom_killed, usage) = leaf.end_report();
        end.oom_killed = Some(oom_killed);
        end.usage = Some(usage);
    }
    tracing::debug!(pid, status = %end.status, "process ended");
    process.output.finish(end);
    if let Some(leaf) = &process.leaf {
        leaf.retire();
    }
    crate::handover::crash::ended(&process);
    crate::memory::freed();
}

/// The exit status once reaped; `None` when it can never be known (the
/// reaper is gone, or the process is not envd's child).
async fn reaped(exit: &mut ExitWatch) -> Option<ExitStatus> {
    if let Ok(s) = exit.wait_for(Option::is_some).await {
        return *s;
    }
    *exit.borrow()
}
