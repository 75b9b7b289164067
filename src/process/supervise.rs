//! Supervision: the tasks that run alongside a process: output pumps (fd → output log) and
//! the supervisor (exit status, deadline kill, drain, `end`, table update).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::unix::pipe;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::exit::end_event;
use super::output::{OutputLog, Source};
use super::pty::Pty;
use super::reaper::ExitStatus;
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
async fn exited_and_idle(exited: &mut watch::Receiver<bool>) {
    if exited.wait_for(|e| *e).await.is_err() {
        std::future::pending::<()>().await;
    }
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
/// process has exited and the fd stayed silent for `DRAIN_IDLE`.
async fn pump(
    mut reader: OutputReader,
    source: Source,
    log: Arc<OutputLog>,
    mut exited: watch::Receiver<bool>,
) {
    let mut buf = BytesMut::new();
    loop {
        let read = tokio::select! {
            r = reader.read(&mut buf) => r,
            () = exited_and_idle(&mut exited) => break,
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
}

/// Starts the pumps and the supervisor of a just-spawned process.
pub fn supervise(
    process: Arc<Process>,
    fds: OutputFds,
    exit: oneshot::Receiver<ExitStatus>,
    deadline: Option<Instant>,
    table: Arc<ProcessTable>,
) {
    let log = process.output.clone();
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
        .map(|(reader, source)| {
            tokio::spawn(pump(
                reader,
                source,
                log.clone(),
                process.exited.subscribe(),
            ))
        })
        .collect();
    tokio::spawn(await_end(process, pumps, exit, deadline, table));
}

async fn await_end(
    process: Arc<Process>,
    pumps: Vec<JoinHandle<()>>,
    mut exit: oneshot::Receiver<ExitStatus>,
    deadline: Option<Instant>,
    table: Arc<ProcessTable>,
) {
    let pid = process.pid;
    let status = match deadline {
        None => exit.await,
        Some(at) => tokio::select! {
            s = &mut exit => s,
            () = tokio::time::sleep_until(at) => {
                tracing::info!(pid, "process deadline reached; killing its cgroup and process group");
                process.kill_all();
                exit.await
            }
        },
    };
    // Exited: no longer listed or signalable; the pumps start their drain.
    process.exited.send_replace(true);
    table.mark_ended(&process);
    for p in pumps {
        let _ = p.await;
    }
    process.release_input().await;
    let mut end = match status {
        Ok(s) => end_event(s),
        Err(_) => crate::proto::process::process_event::EndEvent {
            exit_code: -1,
            exited: false,
            status: "unknown".into(),
            error: Some("exit status was lost".into()),
            ..Default::default()
        },
    };
    if let Some(leaf) = &process.leaf {
        end.oom_killed = Some(leaf.oom_killed());
        end.usage = Some(leaf.usage());
        leaf.remove_when_empty();
    }
    tracing::debug!(pid, status = %end.status, "process ended");
    process.output.finish(end);
}
