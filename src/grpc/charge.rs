//! A native gRPC call's request body, its messages charged to the shared
//! body budget (`crate::body`) while they arrive.
//!
//! tonic gathers each message whole before it decodes it: up to 4 MiB, on
//! every stream of every connection, outside any budget. [`Charged`] reads
//! the gRPC framing (`[flags u8][length u32 BE][message]`) as the body
//! passes through it unchanged. A message not all there at the end of a
//! frame holds the budget for its whole length until its last byte has gone
//! to tonic, which then decodes it; one that comes whole in a frame is
//! already held by that frame and is not charged. Refused, the call ends
//! with `RESOURCE_EXHAUSTED`, as a Connect call's message does
//! (`crate::connect::envelope`). Charged, a message must arrive within the
//! body timeout (else `DEADLINE_EXCEEDED`), so that a stalled one cannot keep
//! its part of the budget from every other call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::body::MessageCharge;

/// Where the body is in the framing.
enum Framing {
    /// In a message's prefix: the bytes of it seen so far.
    Prefix([u8; 5], usize),
    /// In a message of this length: its bytes still to come.
    Message { len: usize, left: usize },
}

pub struct Charged<B> {
    inner: B,
    framing: Framing,
    /// The charge of a message in reading, and its deadline's timer.
    held: Option<(MessageCharge, Pin<Box<tokio::time::Sleep>>)>,
}

impl<B> Charged<B> {
    pub fn new(inner: B) -> Self {
        Charged {
            inner,
            framing: Framing::Prefix([0; 5], 0),
            held: None,
        }
    }

    /// Follows the framing through `data`; an error if a message's charge
    /// is refused.
    fn follow(&mut self, mut data: &[u8]) -> Result<(), tonic::Status> {
        while !data.is_empty() {
            match &mut self.framing {
                Framing::Prefix(prefix, seen) => {
                    let n = (5 - *seen).min(data.len());
                    prefix[*seen..*seen + n].copy_from_slice(&data[..n]);
                    *seen += n;
                    data = &data[n..];
                    if *seen == 5 {
                        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
                        let len = usize::try_from(len).unwrap_or(usize::MAX);
                        self.framing = Framing::Message { len, left: len };
                    }
                }
                Framing::Message { left, .. } => {
                    let n = (*left).min(data.len());
                    *left -= n;
                    data = &data[n..];
                }
            }
            if matches!(self.framing, Framing::Message { left: 0, .. }) {
                // All of it has gone to tonic.
                self.held = None;
                self.framing = Framing::Prefix([0; 5], 0);
            }
        }
        // A message that goes on past this frame: charged until it ends.
        // (tonic refuses one over its limit itself.)
        if let Framing::Message { len, .. } = self.framing {
            if self.held.is_none() && len <= crate::wire::MAX_DECODE {
                let charge = MessageCharge::begin(len).map_err(tonic::Status::from)?;
                let by = Box::pin(tokio::time::sleep_until(charge.by));
                self.held = Some((charge, by));
            }
        }
        Ok(())
    }
}

impl<B> Body for Charged<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {
                if let Some((_, by)) = &mut this.held {
                    if by.as_mut().poll(cx).is_ready() {
                        let late = tonic::Status::from(MessageCharge::late());
                        return Poll::Ready(Some(Err(Box::new(late))));
                    }
                }
                return Poll::Pending;
            }
        };
        if let Some(data) = frame.data_ref() {
            if let Err(refused) = this.follow(data) {
                return Poll::Ready(Some(Err(Box::new(refused))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(len: usize) -> Vec<u8> {
        let mut f = vec![0u8];
        f.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes());
        f.resize(5 + len, 7);
        f
    }

    #[tokio::test]
    async fn a_message_is_charged_from_the_frame_it_goes_on_past_to_its_end() {
        let mut c = Charged::new(http_body_util::Empty::<Bytes>::new());
        // Messages whole in their frame: never charged.
        c.follow(&[frame(10), frame(70_000)].concat()).unwrap();
        assert!(c.held.is_none());
        // A message in pieces: charged once its length is known, for all of
        // it, until its last byte.
        let m = frame(100_000);
        c.follow(&m[..4]).unwrap();
        assert!(c.held.is_none(), "not before its length is known");
        c.follow(&m[4..m.len() - 1]).unwrap();
        assert_eq!(c.held.as_ref().map(|(p, _)| p.bytes()), Some(100_000));
        // Its last byte, with the next message's first.
        c.follow(&[m[m.len() - 1], 0]).unwrap();
        assert!(c.held.is_none());
        assert!(matches!(c.framing, Framing::Prefix(_, 1)));
        // A small one in pieces is charged too.
        let small = frame(10);
        c.follow(&small[1..8]).unwrap();
        assert_eq!(c.held.as_ref().map(|(p, _)| p.bytes()), Some(10));
        c.follow(&small[8..]).unwrap();
        assert!(c.held.is_none());
    }
}
