//! Supervision: the one task that runs alongside a process: its output pumps (fd → output log) and
//! the supervisor (exit status, deadline kill, drain, `end`, table update).

use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::exit::end_event;
use super::output::Source;
use super::pty::Pty;
use super::reaper::{ExitStatus, ExitWatch};
use super::started::Process;
use super::table::ProcessTable;

/// Most bytes read at once from a pipe or pty: the size of the buffers
/// reads go into once a pipe has grown to [`GROWN_PIPE`].
pub const PIPE_READ_CHUNK: usize = 256 * 1024;
/// The size of read buffers before that (a default pipe holds 64 KiB), and
/// of a pty's scratch buffer.
const READ_CHUNK: usize = 64 * 1024;
/// A read goes into the free room of the current buffer while that room is
/// at least this large; only then is a new buffer taken. Chunks split off
/// one buffer share it, so a read of a few bytes holds a few bytes of it,
/// not a buffer of its own.
const MIN_ROOM: usize = 16 * 1024;
/// What a pipe that a command fills faster than envd reads it grows to
/// (`F_SETPIPE_SZ`; Linux's default `pipe-max-size`): the command runs
/// ahead by that much instead of by a default pipe's 64 KiB, and each read
/// takes up to [`PIPE_READ_CHUNK`]. Pipe pages exist only while they hold
/// output, and they are charged to the writing command's memory cgroup.
const GROWN_PIPE: libc::c_int = 1 << 20;

/// After the process exits, output is read until EOF; if a descendant keeps
/// the pipe or pty open, reading stops once it stays silent this long...
pub const DRAIN_IDLE: Duration = Duration::from_millis(500);
/// ...or, for a descendant that never goes quiet, this long after the exit,
/// once what the fd held at the exit has been read (nothing the command
/// itself wrote is left behind). The pipe is then kept open
/// ([`super::linger`]): the descendant goes on writing, unread.
pub const DRAIN_MAX: Duration = Duration::from_secs(2);

/// Output fds of a started process, on envd's side.
#[derive(Debug)]
pub enum OutputFds {
    Pipes {
        stdout: pipe::Receiver,
        stderr: pipe::Receiver,
    },
    Pty(Arc<Pty>),
}

/// Reading after the process exited: when to stop.
struct Drain {
    /// Bytes the fd held at the exit, not read yet.
    owed: usize,
    /// The last read, or the exit.
    last: Instant,
    /// [`DRAIN_MAX`] after the exit.
    cap: Instant,
}

impl Drain {
    fn new(owed: usize) -> Drain {
        let now = Instant::now();
        Drain {
            owed,
            last: now,
            cap: now + DRAIN_MAX,
        }
    }

    fn took(&mut self, n: usize) {
        self.owed = self.owed.saturating_sub(n);
        self.last = Instant::now();
    }

    fn stop_at(&self) -> Instant {
        let idle = self.last + DRAIN_IDLE;
        if self.owed == 0 {
            idle.min(self.cap)
        } else {
            idle
        }
    }
}

/// One output fd of a process, read in chunks of at most [`PIPE_READ_CHUNK`].
enum OutputReader {
    /// The pipe, and whether it has been grown to [`GROWN_PIPE`].
    Pipe(pipe::Receiver, bool),
    /// The pty and a scratch buffer, zeroed once (the pty reads into a
    /// slice; output is usually a few bytes at a time).
    Pty(Arc<Pty>, Box<[u8]>),
}

impl OutputReader {
    /// Bytes one read takes at most: [`READ_CHUNK`] while `small` (all
    /// output logs together are over their budget: every stalled stream
    /// holds a buffer or two).
    fn want(&self, small: bool) -> usize {
        match self {
            OutputReader::Pipe(_, true) if !small => PIPE_READ_CHUNK,
            _ => READ_CHUNK,
        }
    }

    /// Waits until there is output to read, or its end.
    async fn readable(&self) -> std::io::Result<()> {
        match self {
            OutputReader::Pipe(rx, _) => rx.readable().await,
            OutputReader::Pty(pty, _) => pty.readable().await,
        }
    }

    /// Bytes waiting to be read (`FIONREAD`), if the kernel says.
    fn available(&self) -> Option<usize> {
        let fd = match self {
            OutputReader::Pipe(rx, _) => rx.as_raw_fd(),
            OutputReader::Pty(pty, _) => pty.raw_fd(),
        };
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which is
        // valid for the call; `fd` is open for as long as `self` is.
        let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
        (r == 0).then(|| usize::try_from(n).unwrap_or(0))
    }

    /// Appends what is there to `buf`, at most `limit` bytes, without
    /// waiting (`WouldBlock` if nothing is); `Ok(0)` at end of output.
    fn try_read(&mut self, buf: &mut BytesMut, limit: usize) -> std::io::Result<usize> {
        if buf.capacity() - buf.len() < MIN_ROOM {
            buf.reserve(limit.max(MIN_ROOM));
        }
        match self {
            OutputReader::Pipe(rx, grown) => {
                let spare = buf.capacity() - buf.len();
                let room = spare.min(limit);
                let n = rx.try_read_buf(&mut bytes::BufMut::limit(&mut *buf, room))?;
                // A read that filled the whole buffer: the pipe is busy.
                if n == spare && !*grown {
                    *grown = true;
                    grow(rx);
                }
                Ok(n)
            }
            OutputReader::Pty(pty, scratch) => {
                let room = scratch.len().min(limit);
                let n = pty.try_read(&mut scratch[..room])?;
                buf.extend_from_slice(&scratch[..n]);
                Ok(n)
            }
        }
    }
}

/// Grows a pipe that filled a whole read to [`GROWN_PIPE`]; where that is
/// refused (a lowered `pipe-max-size` or an exhausted per-user pipe budget
/// for an unprivileged envd) it stays as it was.
fn grow(rx: &pipe::Receiver) {
    use nix::fcntl::{fcntl, FcntlArg};
    if let Err(e) = fcntl(rx, FcntlArg::F_SETPIPE_SZ(GROWN_PIPE)) {
        tracing::debug!(error = %e, "pipe not grown");
    }
}

/// Moves what a readable fd holds into the log: waits for room, then reads
/// without waiting. The bytes read; `Ok(0)` at the end of output.
async fn take(
    reader: &mut OutputReader,
    log: &super::output::OutputLog,
    buf: &mut BytesMut,
    source: Source,
) -> std::io::Result<usize> {
    let want = reader.want(log.pressed());
    let room = match log.try_reserve(want, false) {
        Some(room) => room,
        // Readable with nothing in it: the end of output (or a stale
        // wake-up). One byte finds out, without waiting for room that a
        // client that stopped reading may never make (the command's end
        // would wait with it).
        None if reader.available() == Some(0) => log.overdraw(1),
        None => log.reserve(want, false).await,
    };
    let n = reader.try_read(buf, room.bytes())?;
    if n > 0 {
        log.commit(room, source, buf.split().freeze());
    }
    Ok(n)
}

/// Copies one output fd into the log until end of output, or until the
/// process has exited and [`Drain`] says to stop. A live upgrade parks it
/// between reads: a byte is either in the log or still in the kernel.
async fn pump(mut reader: OutputReader, source: Source, process: Arc<Process>) {
    let _counted = crate::handover::quiesce::PumpGuard::new();
    let log = process.output.clone();
    let mut buf = BytesMut::new();
    // One registration for the pump's life (re-made after a park), not one
    // per read: streaming output reads in a tight loop.
    let mut quiesce = Box::pin(crate::handover::quiesce::until_requested());
    let mut drain: Option<Drain> = None;
    let ended = loop {
        // Checked here, not only in the select below: an fd that is always
        // readable wins that. What the fd holds when the exit is seen may
        // be the command's own output.
        if drain.is_none() && process.exited.is_set() {
            drain = Some(Drain::new(reader.available().unwrap_or(0)));
        }
        if drain
            .as_ref()
            .is_some_and(|d| Instant::now() >= d.stop_at())
        {
            break false;
        }
        let stop_at = drain.as_ref().map(Drain::stop_at);
        // Output first, then room in the log, then the read, which takes
        // what is there at once: nothing read waits outside the log
        // (back-pressure waits with the bytes still in the kernel), and room
        // is held only for that read.
        let ready = tokio::select! {
            biased;
            () = &mut quiesce => {
                crate::handover::quiesce::park().await;
                quiesce = Box::pin(crate::handover::quiesce::until_requested());
                if let Some(d) = &mut drain {
                    d.took(0);
                }
                continue;
            }
            r = reader.readable() => r,
            () = process.exited.wait(), if drain.is_none() => continue,
            // An async block: no timer is made unless it is polled.
            () = async move {
                if let Some(at) = stop_at {
                    tokio::time::sleep_until(at).await;
                }
            }, if stop_at.is_some() => break false,
        };
        let taken = match ready {
            Ok(()) => take(&mut reader, &log, &mut buf, source).await,
            Err(e) => Err(e),
        };
        match taken {
            Ok(0) => break true,
            Ok(n) => {
                if let Some(d) = &mut drain {
                    d.took(n);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
                ) => {}
            Err(e) => {
                tracing::debug!(error = %e, ?source, "output read failed");
                break true;
            }
        }
    };
    // A live upgrade must no longer carry the fd: it closes with `reader`,
    // or, a pipe a descendant still holds, is kept unread.
    process.fds.forget(source);
    if let (false, OutputReader::Pipe(rx, _)) = (ended, reader) {
        super::linger::linger(rx, super::linger::store_name(process.seq, source));
    }
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
            (OutputReader::Pipe(stdout, false), Source::Stdout),
            (OutputReader::Pipe(stderr, false), Source::Stderr),
        ],
        OutputFds::Pty(pty) => {
            let scratch = vec![0; READ_CHUNK].into_boxed_slice();
            vec![(OutputReader::Pty(pty, scratch), Source::Pty)]
        }
    };
    // One task for the pumps and the supervisor: each further task spawned
    // per Start woke the other worker thread to steal it.
    let pumps = futures_util::future::join_all(
        readers
            .into_iter()
            .map(|(reader, source)| pump(reader, source, process.clone())),
    );
    tokio::spawn(await_end(process, pumps, deadline, table));
}

async fn await_end(
    process: Arc<Process>,
    pumps: impl std::future::Future<Output = Vec<()>>,
    deadline: Option<Instant>,
    table: Arc<ProcessTable>,
) {
    let pid = process.pid;
    let mut exit = process.status.clone();
    let mut pumps = std::pin::pin!(pumps);
    let mut pumped = false;
    let reaping = async {
        match deadline {
            None => reaped(&mut exit).await,
            Some(at) => tokio::select! {
                s = reaped(&mut exit) => s,
                () = tokio::time::sleep_until(at) => {
                    tracing::info!(pid, "process deadline reached; killing its cgroup and process group");
                    process.kill_all();
                    reaped(&mut exit).await
                }
            },
        }
    };
    let mut reaping = std::pin::pin!(reaping);
    // The pumps run while the process does (they may finish first, at EOF).
    let status = loop {
        tokio::select! {
            s = &mut reaping => break s,
            _ = &mut pumps, if !pumped => pumped = true,
        }
    };
    // Exited: no longer listed or signalable; the pumps start their drain.
    process.exited.set();
    table.mark_ended(&process);
    if !pumped {
        pumps.await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::output::{Budget, OutputLog};

    /// A log held full by a subscriber that stopped reading, and a pipe at
    /// its end with nothing left in it: the end is seen at once, not after
    /// the subscriber reads again (it may never).
    #[tokio::test]
    async fn the_end_of_output_needs_no_room_in_the_log() {
        let log = OutputLog::new(64 << 10, Budget::new(u64::MAX));
        let stopped = log.subscribe_live();
        log.append(Source::Stdout, bytes::Bytes::from(vec![0; 56 << 10]))
            .await;
        let (mut tx, rx) = pipe::pipe().unwrap();
        let mut reader = OutputReader::Pipe(rx, false);
        let mut buf = BytesMut::new();
        // Some output first: it waits for room, as it must.
        tokio::io::AsyncWriteExt::write_all(&mut tx, &[1; 20 << 10])
            .await
            .unwrap();
        reader.readable().await.unwrap();
        let waits = tokio::time::timeout(
            Duration::from_millis(200),
            take(&mut reader, &log, &mut buf, Source::Stdout),
        );
        assert!(waits.await.is_err(), "output read with no room for it");
        // Once it is in (the subscriber read) and the writer is gone: the end.
        drop(stopped);
        let n = take(&mut reader, &log, &mut buf, Source::Stdout)
            .await
            .unwrap();
        assert_eq!(n, 20 << 10);
        let _stopped_again = log.subscribe_live();
        log.append(Source::Stdout, bytes::Bytes::from(vec![0; 56 << 10]))
            .await;
        drop(tx);
        reader.readable().await.unwrap();
        let end = tokio::time::timeout(
            Duration::from_secs(5),
            take(&mut reader, &log, &mut buf, Source::Stdout),
        );
        assert_eq!(end.await.expect("the end waited for room").unwrap(), 0);
    }
}
