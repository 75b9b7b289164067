//! Where log lines leave envd: stderr, written so that no line waits for its
//! reader on a request's path.
//!
//! Under systemd stderr is journald's socket, under a supervisor a pipe,
//! as PID 1 the VM's serial console. A reader may stop reading (journald
//! busy with a flood from the sandbox, a supervisor stopped): a line written
//! in place then waited on an async worker, and with both workers waiting
//! envd answered nothing. An emulated UART takes about half a millisecond
//! for each line, which would sit on the path of every request that logs (a
//! Start's `process started`).
//!
//! So a line is written in place only where that cannot wait: on a socket
//! with `MSG_DONTWAIT`, into a pipe through a non-blocking description of
//! its own, or to a file or `/dev/null`. What such a write leaves (all of a
//! line on a full pipe or socket, or the rest of one), every line for a
//! terminal, and every line while earlier ones are queued (which keeps the
//! order) is queued for a thread of its own, which writes with blocking
//! writes. The queue is bounded; a line that finds it full is dropped and
//! counted, never waited for. Handing every line to the thread cost a Start
//! about 1.5 context switches more.

use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{open, OFlag};
use nix::sys::socket::{send, MsgFlags};
use nix::sys::stat::{fstat, Mode, SFlag};

/// Lines queued at most.
const QUEUE: usize = 256;
/// Bytes queued at most (a log line may carry a caller's long string; a
/// stalled reader must not make envd hold them all).
const QUEUE_BYTES: usize = 256 * 1024;
/// A longer line is cut to this length (marked).
const MAX_LINE: usize = 16 * 1024;
/// How a cut line ends.
const CUT: &[u8] = b" [cut]\n";
/// How long [`flush`] waits for the queue to drain.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

static OUTBOX: OnceLock<Outbox> = OnceLock::new();

/// Waits (at most [`FLUSH_WAIT`]) until the queued lines are out.
pub(super) fn flush() {
    let Some(o) = OUTBOX.get() else {
        return;
    };
    let Ok(q) = o.queue.lock() else {
        return;
    };
    let _ = o
        .changed
        .wait_timeout_while(q, FLUSH_WAIT, |q| !q.lines.is_empty() || q.writing);
}

/// What stderr is, as far as a write to it may wait.
#[derive(Debug)]
enum Sink {
    /// Written with `MSG_DONTWAIT`: journald's stream, a socket pair.
    Socket,
    /// Written through this non-blocking description of the same pipe.
    /// Its own: setting `O_NONBLOCK` on stderr's would change it for every
    /// process that shares it (a shell, a supervisor). Whether a pipe has
    /// room cannot be told from outside (it counts pages, not bytes: 16
    /// lines of 2.2 KiB fill a 64 KiB pipe).
    Pipe(OwnedFd),
    /// Always queued: a terminal is slow even when it has room, and a pipe
    /// that could not be opened again (no `/proc`, no reader left).
    Queued,
    /// Written in place: a file, `/dev/null`, or what `fstat` cannot tell.
    Other,
}

impl Sink {
    fn of_stderr() -> Sink {
        let err = std::io::stderr();
        let Ok(st) = fstat(err.as_fd()) else {
            return Sink::Other;
        };
        let kind = SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT;
        if kind == SFlag::S_IFSOCK {
            Sink::Socket
        } else if kind == SFlag::S_IFIFO {
            // Opening a pipe through /proc opens it anew, as a FIFO; with
            // O_NONBLOCK that open does not wait for a reader either.
            open(
                "/proc/self/fd/2",
                OFlag::O_WRONLY | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_or(Sink::Queued, Sink::Pipe)
        } else if std::io::IsTerminal::is_terminal(&err) {
            Sink::Queued
        } else {
            Sink::Other
        }
    }
}

/// How an attempt to write a line in place went.
enum InPlace {
    /// All of it is out (or the write failed, and a retry would too).
    Done,
    /// The first `n` bytes are out; the rest must wait.
    Part(usize),
    /// Nothing is out; all of it must wait.
    Wait,
}

impl InPlace {
    /// From a write that does not wait.
    fn of(written: nix::Result<usize>, len: usize) -> InPlace {
        match written {
            Ok(n) if n >= len => InPlace::Done,
            Ok(n) => InPlace::Part(n),
            Err(Errno::EAGAIN | Errno::EINTR) => InPlace::Wait,
            // The reader is gone: lost, as a blocking write's would be.
            Err(_) => InPlace::Done,
        }
    }
}

/// Writes `line` to stderr as far as `sink` takes it without waiting.
fn in_place(sink: &Sink, line: &[u8]) -> InPlace {
    match sink {
        Sink::Queued => InPlace::Wait,
        Sink::Other => {
            let _ = std::io::stderr().write_all(line);
            InPlace::Done
        }
        Sink::Socket => {
            let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
            InPlace::of(send(libc::STDERR_FILENO, line, flags), line.len())
        }
        Sink::Pipe(fd) => InPlace::of(nix::unistd::write(fd, line), line.len()),
    }
}

/// `line` cut to [`MAX_LINE`] (marked, never inside a UTF-8 sequence).
fn cut(mut line: Vec<u8>) -> Vec<u8> {
    if line.len() > MAX_LINE {
        let mut at = MAX_LINE - CUT.len();
        while at > 0 && line[at] & 0xC0 == 0x80 {
            at -= 1;
        }
        line.truncate(at);
        line.extend_from_slice(CUT);
    }
    line
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// Bytes in `lines`.
    bytes: usize,
    /// A line is being written (taken off the queue, not out yet).
    writing: bool,
    dropped: u64,
}

impl Queue {
    /// Queues `line` unless the queue is full, in lines or bytes; a line
    /// that does not fit is counted as dropped.
    fn admit(&mut self, line: Vec<u8>) -> bool {
        if self.lines.len() >= QUEUE || self.bytes + line.len() > QUEUE_BYTES {
            self.dropped += 1;
            return false;
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        true
    }

    /// The next line and how many were dropped since the last one taken.
    fn take(&mut self) -> Option<(Vec<u8>, u64)> {
        let line = self.lines.pop_front()?;
        self.bytes -= line.len();
        Some((line, std::mem::take(&mut self.dropped)))
    }

    /// Nothing queued or on its way: a new line may go out in place.
    fn idle(&self) -> bool {
        self.lines.is_empty() && !self.writing
    }
}

pub(super) struct Outbox {
    sink: Sink,
    queue: Mutex<Queue>,
    /// Rung when a line is queued and when the writer has written one.
    changed: Condvar,
}

impl Outbox {
    /// The outbox and its writer thread; `None` (write in place) if the
    /// thread cannot start.
    pub(super) fn start() -> Option<&'static Outbox> {
        let outbox = OUTBOX.get_or_init(|| Outbox {
            sink: Sink::of_stderr(),
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        std::thread::Builder::new()
            .name("envd-log".into())
            .spawn(move || outbox.write_out())
            .ok()?;
        Some(outbox)
    }

    pub(super) fn push(&self, line: Vec<u8>) {
        let mut line = cut(line);
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        // Under the lock: a line written in place cannot pass one queued.
        if q.idle() {
            match in_place(&self.sink, &line) {
                InPlace::Done => return,
                InPlace::Part(n) => {
                    line.drain(..n);
                }
                InPlace::Wait => {}
            }
        }
        if q.admit(line) {
            drop(q);
            self.changed.notify_all();
        }
    }

    fn write_out(&self) {
        let mut err = std::io::stderr();
        loop {
            let Ok(q) = self.queue.lock() else {
                return;
            };
            let Ok(mut q) = self.changed.wait_while(q, |q| q.lines.is_empty()) else {
                return;
            };
            let Some((line, lost)) = q.take() else {
                continue;
            };
            q.writing = true;
            drop(q);
            if lost > 0 {
                let _ = writeln!(
                    err,
                    "envd: {lost} log lines dropped (their reader was too slow)"
                );
            }
            let _ = err.write_all(&line);
            if let Ok(mut q) = self.queue.lock() {
                q.writing = false;
            }
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_queue_is_bounded_in_lines_and_bytes() {
        let mut q = Queue::default();
        // A caller's long string: cut, marked, still one line.
        assert!(q.admit(cut(vec![b'x'; 1 << 20])));
        let (line, lost) = q.take().unwrap();
        assert_eq!((line.len(), lost), (MAX_LINE, 0));
        assert!(line.ends_with(CUT));
        // A cut never splits a UTF-8 sequence.
        assert!(q.admit(cut("é".repeat(MAX_LINE).into_bytes())));
        let (line, _) = q.take().unwrap();
        let text = &line[..line.len() - CUT.len()];
        assert!(std::str::from_utf8(text).is_ok());
        // Long lines fill the byte bound before the line bound.
        let mut queued = 0;
        while q.admit(cut(vec![b'y'; 1 << 20])) {
            queued += 1;
        }
        assert_eq!(queued, QUEUE_BYTES / MAX_LINE);
        assert!(q.bytes <= QUEUE_BYTES);
        // Short lines meet the line bound.
        let mut q = Queue::default();
        for _ in 0..QUEUE + 10 {
            q.admit(b"short\n".to_vec());
        }
        assert_eq!((q.lines.len(), q.dropped), (QUEUE, 10));
        let (_, lost) = q.take().unwrap();
        assert_eq!((lost, q.dropped, q.bytes), (10, 0, (QUEUE - 1) * 6));
    }
}
