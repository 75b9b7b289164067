//! What an HTTP/1.x connection's answer has handed to hyper and is not on
//! the socket yet, kept small.
//!
//! hyper queues an answer's body for the socket up to ~400 KB a connection
//! before it stops asking the body for more. A client that asks for a
//! stream (a command's output, a watch, a download) and reads nothing kept
//! that much in envd on every such connection: 300 of them, unread, took
//! envd to +163-177 MiB (19 of them the output logs' floors). Now a
//! connection counts the body bytes handed to hyper and the bytes written
//! to its socket, and an answer's body is asked for its next piece (of at
//! most [`PIECE`]) only while no more than [`LIMIT`] of them wait (then
//! woken when the socket has taken all but [`RESUME`]). What stays in envd
//! for a client that does not read is that and the frame being handed on:
//! +53-66 MiB.
//!
//! An answer that has had no room while its socket took nothing for
//! [`STALL`] (30 s) gives way when others want what it may hold ([`wanted`]: a
//! download's slot, a share of the large answers' budget, a place among the
//! requests in flight): it ends with an error, and hyper closes the
//! connection, which frees all of it. Alone, a slow client is never cut.
//!
//! HTTP/2 multiplexes answers on one socket, each under its own flow
//! control, so a per-connection count would let one stalled stream stop the
//! others. It needs none: h2 takes a stream's next frame only once the last
//! is on its way, and 600 unread streams cost what their logs hold and
//! ~20 KiB each. A stalled HTTP/2 answer is asked for nothing more, so it
//! cannot end itself; a connection all of whose answers are held back by
//! their client is closed instead ([`crate::connections::HeldBack`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite};

/// Body bytes a connection may have waiting in hyper for its socket before
/// the answer is asked for more.
pub const LIMIT: usize = 64 << 10;
/// The largest piece an answer's data is handed on in (HTTP/1.x): with
/// [`LIMIT`] waiting, hyper's queue stays under its own limit (~400 KB), so
/// hyper keeps asking the answer for more, which is when a stall is seen.
/// Smaller pieces cost throughput (64 KiB: 1 GiB downloads ~8% slower over
/// TCP), not memory: a piece is a slice of its frame.
pub const PIECE: usize = 256 << 10;
/// A paused answer is woken when no more than this waits.
const RESUME: u64 = LIMIT as u64 / 2;
/// An answer that has had no room this long gives way to others that want
/// what it may hold ([`wanted`]): the uploads' limit.
pub use crate::filesystem::slots::{STALL, STALL_STEP};

/// Whether others want what an answer whose client stopped reading may
/// hold: a download's slot, a share of the large answers' budget, or its
/// place among the requests in flight (each refused or waited for within
/// [`STALL`]).
pub fn wanted() -> bool {
    crate::filesystem::slots::DOWNLOADS.wanted()
        || crate::answers::wanted_within(STALL)
        || crate::connections::crowded_within(STALL)
}

/// A holder's progress count (bytes its socket took, frames its answers
/// handed on), watched for the stall rule: whether it has stood still for
/// [`STALL`] while others want what the holder keeps ([`wanted`]).
#[derive(Debug, Default)]
pub struct Standstill {
    /// Since when the count has not moved, and what it was then.
    since: Option<(tokio::time::Instant, u64)>,
}

impl Standstill {
    /// Looks at the count now (the first look starts the clock); whether
    /// the holder is to give way.
    pub fn gives_way(&mut self, progress: u64) -> bool {
        match self.since {
            Some((at, was)) if was == progress => at.elapsed() >= STALL && wanted(),
            _ => {
                self.since = Some((tokio::time::Instant::now(), progress));
                false
            }
        }
    }

    /// Not stalled (it has room, or nothing to hand on): the next look
    /// starts the clock again.
    pub fn reset(&mut self) {
        self.since = None;
    }
}

/// How an answer that gave way ends: on HTTP/1.x hyper then closes its
/// connection, which is what frees what it held (the client is not
/// reading, so nothing else could reach it).
#[cold]
pub fn stalled() -> tonic::Status {
    tonic::Status::deadline_exceeded(format!(
        "the client took nothing of this answer for {} s while others waited for what it \
         holds: ended to make room",
        STALL.as_secs()
    ))
}

/// One connection's count (see the module).
#[derive(Debug, Default)]
pub struct Backlog {
    /// Body bytes handed to hyper, never less than `written` before a
    /// hand-over (the heads and chunk sizes hyper adds are not counted).
    handed: AtomicU64,
    /// Bytes written to the socket.
    written: AtomicU64,
    /// The answer waiting for room.
    waiting: AtomicWaker,
}

impl Backlog {
    fn waits(&self) -> u64 {
        let written = self.written.load(Ordering::Acquire);
        self.handed.load(Ordering::Acquire).saturating_sub(written)
    }

    /// Ready while fewer than [`LIMIT`] bytes wait for the socket; else the
    /// task is woken when the socket has taken all but [`RESUME`].
    pub fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waits() <= LIMIT as u64 {
            return Poll::Ready(());
        }
        self.waiting.register(cx.waker());
        if self.waits() <= LIMIT as u64 {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// Bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// `n` body bytes handed to hyper.
    pub fn handed(&self, n: usize) {
        // Heads and chunk sizes are written but never handed: count from
        // what was written when nothing of the body waits.
        let base = self
            .handed
            .load(Ordering::Acquire)
            .max(self.written.load(Ordering::Acquire));
        self.handed.store(base + n as u64, Ordering::Release);
    }

    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::AcqRel);
        if self.waits() <= RESUME {
            self.waiting.wake();
        }
    }
}

/// A connection whose writes are counted in its [`Backlog`].
pub struct Counted<T> {
    inner: T,
    conn: Arc<crate::connections::Conn>,
}

impl<T> Counted<T> {
    pub fn new(inner: T, conn: Arc<crate::connections::Conn>) -> Self {
        Counted { inner, conn }
    }

    /// The connection itself (a tunnel takes it over).
    pub fn into_inner(self) -> T {
        self.inner
    }

    fn count(&self, r: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = r {
            self.conn.backlog.wrote(n);
        }
        r
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    crate::listen::delegate_reads!();
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.count(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.count(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
