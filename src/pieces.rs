//! A body whose data frames are handed on in pieces of at most a given
//! size: slices of the same buffer, no copy. The HTTP layer then asks for
//! the next piece only when it has room for it, so a frame's buffer is held
//! by the body until its last piece is taken, not queued whole at once.

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

pub struct Pieces<B> {
    inner: B,
    /// What is left of the data frame being handed on.
    rest: Bytes,
    max: usize,
}

impl<B> Pieces<B> {
    /// `inner`'s data in pieces of at most `max` bytes.
    pub fn new(inner: B, max: usize) -> Self {
        Pieces {
            inner,
            rest: Bytes::new(),
            max,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Pieces<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                // A frame that fits (and any that is not data) goes on as it is.
                Some(Ok(frame)) if frame.data_ref().is_none_or(|d| d.len() <= this.max) => {
                    return Poll::Ready(Some(Ok(frame)));
                }
                Some(Ok(frame)) => this.rest = frame.into_data().unwrap_or_default(),
                end => return Poll::Ready(end),
            }
        }
        let n = this.rest.len().min(this.max);
        Poll::Ready(Some(Ok(Frame::data(this.rest.split_to(n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + rest);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}
