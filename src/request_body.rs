//! The request body every handler gets: hyper's, read to its end in the
//! background when a handler drops it unread over HTTP/1.1.
//!
//! hyper closes an HTTP/1.1 connection whose request body was dropped before
//! its end (unless the rest is already there), and its answer does not say
//! so: no `connection: close`. A client that reuses the connection then loses
//! the request it sends on it next. Answers given before the body ends are
//! common: a refused token, an unknown path, an upload to a path that cannot
//! be written, a streaming call whose one message came before the body's last
//! chunk (the Python SDK sends that chunk late under load).
//!
//! So a body dropped early is read on and thrown away (16 MiB within 2 s at
//! most, as [`crate::body::drain`]) and the connection serves the next
//! request. Each drain holds its connection's read buffer (up to about
//! 400 KiB while a client sends fast), so at most [`MAX_DRAINS`] run at once,
//! and none while envd is flooded with bodies (most of the shared body
//! budget spent). A body not drained (beyond those, or declared longer than
//! 16 MiB) is not read: the answer then says `connection: close`, when it is
//! not already on its way.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::quota::Quota;

/// Bodies drained at once, at most.
pub const MAX_DRAINS: usize = 16;

/// The drains running now, each holding one place until it ends.
static DRAINS: Quota = Quota::new(MAX_DRAINS);

/// A request's body (see the module's notes).
pub struct RequestBody {
    /// `None` once its end has been read.
    inner: Option<Incoming>,
    /// HTTP/1.x only: set when the body was dropped unread and too long to
    /// drain, so that the connection will close.
    closing: Option<Arc<AtomicBool>>,
}

/// Tells the server whether the connection closes after the answer.
pub struct Closing(Option<Arc<AtomicBool>>);

impl Closing {
    /// True when the request's body was left unread and is not drained.
    pub fn is_set(&self) -> bool {
        self.0.as_ref().is_some_and(|c| c.load(Ordering::Acquire))
    }
}

impl RequestBody {
    /// Wraps `inner`; `http1` says whether its connection is HTTP/1.x.
    pub fn new(inner: Incoming, http1: bool) -> (Self, Closing) {
        let closing = (http1 && !inner.is_end_stream()).then(|| Arc::new(AtomicBool::new(false)));
        let handle = Closing(closing.clone());
        (
            RequestBody {
                inner: Some(inner),
                closing,
            },
            handle,
        )
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            this.inner = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

impl Drop for RequestBody {
    fn drop(&mut self) {
        let (Some(mut body), Some(closing)) = (self.inner.take(), self.closing.take()) else {
            return;
        };
        if body.is_end_stream() {
            return;
        }
        let runtime = tokio::runtime::Handle::try_current();
        let slot = (body.size_hint().lower() <= crate::body::DRAIN_MAX && !crate::body::flooded())
            .then(|| DRAINS.try_hold(1))
            .flatten();
        match (runtime, slot) {
            (Ok(rt), Some(slot)) => {
                rt.spawn(async move {
                    crate::body::drain(&mut body).await;
                    drop(slot);
                });
            }
            _ => closing.store(true, Ordering::Release),
        }
    }
}
