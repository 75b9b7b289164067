//! How a notification reaches systemd without a request waiting for it.
//!
//! `$NOTIFY_SOCKET` is a datagram socket that systemd reads in its event
//! loop. Its queue is short (`net.unix.max_dgram_qlen`: 512 under systemd,
//! 10 by the kernel's default), and any process in the VM may send to it, so
//! it can be full: systemd busy or stopped, or a flood from the sandbox. A
//! blocking send then waited on an async worker, and under crash records a
//! command's start and end each send a few: with both workers waiting, envd
//! answered nothing, `/health` included.
//!
//! So a notification is sent in place with `MSG_DONTWAIT` while nothing is
//! queued, and otherwise queued, in order, for a thread of its own that
//! sends with blocking sends (started the first time one is needed). A
//! queued message keeps its own copies of its fds, since the caller closes
//! its copies when it likes. The queue is bounded in messages and in fds; a
//! message that finds it full is dropped and counted, never waited for (a
//! command's fds dropped so are not in the store: a crash loses the
//! command, which keeps running).

use std::collections::VecDeque;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};

/// Messages queued at most (each a line or two of text).
const QUEUE: usize = 4096;
/// Fds held by queued messages at most (copies: each takes one of envd's
/// open files until systemd has it).
const QUEUE_FDS: usize = 256;
/// Seconds between two log lines about dropped messages.
const LOG_EVERY: u64 = 10;

#[derive(Default)]
struct Queue {
    messages: VecDeque<(String, Vec<OwnedFd>)>,
    fds: usize,
    /// The thread holds a message taken off the queue and is sending it:
    /// nothing may overtake it.
    sending: bool,
    thread: bool,
    dropped: u64,
    said_at: Option<std::time::Instant>,
}

pub(super) struct Outbox {
    socket: UnixDatagram,
    to: UnixAddr,
    queue: Mutex<Queue>,
    changed: Condvar,
}

impl Outbox {
    pub(super) fn new(socket: UnixDatagram, to: UnixAddr) -> Outbox {
        Outbox {
            socket,
            to,
            queue: Mutex::default(),
            changed: Condvar::new(),
        }
    }

    /// Sends `state` with `fds` now, or queues it behind those before it.
    /// An error when it was neither sent nor queued.
    pub(super) fn send(&'static self, state: &str, fds: &[RawFd]) -> std::io::Result<()> {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.messages.is_empty() && !q.sending {
            match self.send_now(state, fds, MsgFlags::MSG_DONTWAIT) {
                Err(Errno::EAGAIN) => {}
                done => return done.map_err(std::io::Error::from),
            }
        }
        if let Some(name) = removed_name(state) {
            // What is still queued under that name never reaches systemd:
            // its copies close now (a command's stdin, closed by its
            // client, must not wait for systemd to see end of input). The
            // removal still goes, for what was sent before.
            let mut freed = 0;
            q.messages.retain(|(m, fds)| {
                let gone = stored_name(m) == Some(name);
                if gone {
                    freed += fds.len();
                }
                !gone
            });
            q.fds -= freed;
        }
        let refused = if q.messages.len() >= QUEUE || q.fds + fds.len() > QUEUE_FDS {
            "the queue is full".to_owned()
        } else {
            match fds
                .iter()
                .map(|fd| {
                    // SAFETY: the caller's fd is open for the length of this
                    // call; it is only duplicated here.
                    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
                    fd.try_clone_to_owned()
                })
                .collect::<std::io::Result<Vec<OwnedFd>>>()
            {
                Ok(copies) if q.thread || self.start_thread() => {
                    q.thread = true;
                    q.fds += copies.len();
                    q.messages.push_back((state.to_owned(), copies));
                    self.changed.notify_all();
                    say(&mut q);
                    return Ok(());
                }
                Ok(_) => "no thread to send it".to_owned(),
                Err(e) => format!("its fds could not be kept ({e})"),
            }
        };
        q.dropped += 1;
        say(&mut q);
        Err(std::io::Error::new(
            std::io::ErrorKind::WouldBlock,
            format!("systemd's notify socket is full and {refused}"),
        ))
    }

    /// Waits at most `limit` until every queued message is sent; whether it
    /// was.
    pub(super) fn flush(&self, limit: Duration) -> bool {
        let q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        let (q, _) = self
            .changed
            .wait_timeout_while(q, limit, |q| !q.messages.is_empty() || q.sending)
            .unwrap_or_else(|e| e.into_inner());
        q.messages.is_empty() && !q.sending
    }

    fn send_now(&self, state: &str, fds: &[RawFd], flags: MsgFlags) -> nix::Result<()> {
        let iov = [std::io::IoSlice::new(state.as_bytes())];
        let rights = [ControlMessage::ScmRights(fds)];
        // No control message at all when there are no fds.
        let cmsg: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
        sendmsg(
            self.socket.as_fd().as_raw_fd(),
            &iov,
            cmsg,
            flags,
            Some(&self.to),
        )
        .map(drop)
    }

    fn start_thread(&'static self) -> bool {
        std::thread::Builder::new()
            .name("envd-sd-notify".into())
            .stack_size(64 * 1024)
            .spawn(move || self.run())
            .inspect_err(|e| tracing::warn!(error = %e, "no thread for systemd notifications"))
            .is_ok()
    }

    /// The thread: sends what is queued, in order, waiting as long as
    /// systemd takes.
    fn run(&self) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let Some((state, fds)) = q.messages.pop_front() else {
                q = self.changed.wait(q).unwrap_or_else(|e| e.into_inner());
                continue;
            };
            q.sending = true;
            drop(q);
            let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
            let sent = loop {
                match self.send_now(&state, &raw, MsgFlags::empty()) {
                    Err(Errno::EINTR) => continue,
                    r => break r,
                }
            };
            if let Err(e) = sent {
                tracing::warn!(error = %e, "sd_notify failed");
            }
            let held = fds.len();
            drop(fds);
            q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
            q.sending = false;
            q.fds -= held;
            self.changed.notify_all();
        }
    }
}

/// Says, at most every [`LOG_EVERY`] seconds, that messages wait or were
/// dropped.
fn say(q: &mut Queue) {
    let now = std::time::Instant::now();
    if q.said_at
        .is_some_and(|t| now.duration_since(t).as_secs() < LOG_EVERY)
    {
        return;
    }
    q.said_at = Some(now);
    tracing::warn!(
        queued = q.messages.len(),
        dropped = q.dropped,
        "systemd does not read its notify socket: notifications wait for it (a command \
         whose fds were dropped is not in the fd store: an envd crash would lose it)"
    );
}

/// The name an `FDSTOREREMOVE` message removes.
fn removed_name(state: &str) -> Option<&str> {
    state
        .strip_prefix("FDSTOREREMOVE=1\n")?
        .strip_prefix("FDNAME=")
}

/// The name an `FDSTORE` message stores under.
fn stored_name(state: &str) -> Option<&str> {
    state.strip_prefix("FDSTORE=1\n")?.strip_prefix("FDNAME=")
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        assert_eq!(
            super::removed_name("FDSTOREREMOVE=1\nFDNAME=c1i"),
            Some("c1i")
        );
        assert_eq!(super::stored_name("FDSTORE=1\nFDNAME=c1"), Some("c1"));
        assert_eq!(super::stored_name("FDSTOREREMOVE=1\nFDNAME=c1"), None);
        assert_eq!(super::removed_name("READY=1"), None);
    }
}
