//! A lingering close: when envd closes a connection, it first says so (a
//! FIN), then reads and drops what the client still sends, until the client
//! closes too, goes quiet or runs out of time.
//!
//! An HTTP/1.1 server may answer before it has read the request's body (a
//! wrong token, an unknown path, a refused upload), and must then close the
//! connection. Closed with unread bytes in it, a socket is reset, and the
//! reset breaks the client's next write and can throw away the answer
//! before the client reads it: Node's `fetch` (the JS SDK's) then fails
//! with `EPIPE` instead of reporting a 401. Lingering, the client finishes
//! its write, reads the answer, and sees the end.
//!
//! Bounded by [`QUIET`] without data and [`LINGER`] in all. Most closes
//! cost one read: the client has closed already.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The longest a close waits for the client.
pub const LINGER: Duration = Duration::from_secs(10);
/// A client that sends nothing for this long is not waited for.
pub const QUIET: Duration = Duration::from_secs(1);

/// Bytes read and dropped per read while lingering.
const SCRATCH: usize = 16 << 10;
/// Reads per poll before other tasks get a turn.
const READS_PER_POLL: usize = 16;

/// A connection whose `poll_shutdown` lingers (see the module).
pub struct Lingering<T> {
    inner: T,
    state: State,
}

enum State {
    Open,
    /// Our side is shut; the client's bytes are dropped until `until`, or
    /// until `quiet` passes without any.
    Draining {
        until: Instant,
        quiet: Pin<Box<Sleep>>,
    },
    Closed,
}

impl<T> Lingering<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            state: State::Open,
        }
    }

    /// The connection itself (a tunnel takes it over, and closes it its
    /// own way: half-closed, still reading).
    pub fn into_inner(self) -> T {
        self.inner
    }
}

impl<T: AsyncRead + Unpin> Lingering<T> {
    /// Drops the client's bytes until its end, quiet or the deadline.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let State::Draining { until, quiet } = &mut self.state else {
            return Poll::Ready(());
        };
        let mut scratch = [0u8; SCRATCH];
        for _ in 0..READS_PER_POLL {
            if Instant::now() >= *until {
                return Poll::Ready(());
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let next = (Instant::now() + QUIET).min(*until);
                    quiet.as_mut().reset(next);
                }
                // The client's end, or an error: nothing more to wait for.
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => return quiet.as_mut().poll(cx),
            }
        }
        // A client that keeps sending gets its turn later, like any task.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Lingering<T> {
    crate::listen::delegate_reads!();
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Lingering<T> {
    crate::listen::delegate_writes!();

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let State::Open = this.state {
            let shut = ready!(Pin::new(&mut this.inner).poll_shutdown(cx));
            if shut.is_err() {
                this.state = State::Closed;
                return Poll::Ready(shut);
            }
            let now = Instant::now();
            this.state = State::Draining {
                until: now + LINGER,
                quiet: Box::pin(tokio::time::sleep_until(now + QUIET)),
            };
        }
        ready!(this.poll_drain(cx));
        this.state = State::Closed;
        Poll::Ready(Ok(()))
    }
}
