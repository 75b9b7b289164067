//! What a multipart upload's parser may hold while it looks for something.
//!
//! `multer` keeps every byte it reads in one buffer until it finds what it
//! looks for: the first boundary, then each part's headers up to their blank
//! line. A body whose headers never end grew that buffer for as long as the
//! client sent (and each look scanned all of it again). [`Heads`] stands
//! between the body and the parser: while the parser looks for a part
//! (between [`Heads::looking`] and [`Heads::found`]), it hands over one
//! piece at a time, so that the parser looks after each, and refuses the
//! body once [`HEAD_MAX`] bytes have gone by without a part beginning.
//! Parts are read to their end by the caller before the next is looked for,
//! so what goes by meanwhile is a boundary and headers.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;

/// Most bytes read between the end of one part and the start of the next
/// one's data: its boundary and its headers (and, before the first part,
/// the preamble), and one piece of what follows them.
pub const HEAD_MAX: u64 = 1 << 20;

/// Shared by the caller and the body it gave the parser.
#[derive(Default)]
pub struct Heads {
    looking: AtomicBool,
    since: AtomicU64,
    /// A piece went to the parser since it last had to look at it.
    handed: AtomicBool,
}

impl Heads {
    /// The parser starts looking for the next part.
    pub fn looking(&self) {
        self.since.store(0, Ordering::Relaxed);
        self.handed.store(false, Ordering::Relaxed);
        self.looking.store(true, Ordering::Relaxed);
    }

    /// The parser found it (or gave up).
    pub fn found(&self) {
        self.looking.store(false, Ordering::Relaxed);
    }

    /// `body`, held to these bounds.
    pub fn guard<S>(self: &Arc<Self>, body: S) -> Guarded<S> {
        Guarded {
            body,
            heads: self.clone(),
        }
    }
}

pub struct Guarded<S> {
    body: S,
    heads: Arc<Heads>,
}

impl<S> Stream for Guarded<S>
where
    S: Stream<Item = std::io::Result<Bytes>> + Unpin,
{
    type Item = std::io::Result<Bytes>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Guarded { body, heads } = self.get_mut();
        let looking = heads.looking.load(Ordering::Relaxed);
        // The parser reads on while pieces are there: made to look after
        // each one, it finds a part's headers in the piece that ends them.
        if looking && heads.handed.swap(false, Ordering::Relaxed) {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let next = Pin::new(body).poll_next(cx);
        if let Poll::Ready(Some(Ok(piece))) = &next {
            if looking {
                heads.handed.store(true, Ordering::Relaxed);
                let len = u64::try_from(piece.len()).unwrap_or(u64::MAX);
                let since = heads
                    .since
                    .fetch_add(len, Ordering::Relaxed)
                    .saturating_add(len);
                if since > HEAD_MAX + len {
                    return Poll::Ready(Some(Err(std::io::Error::other(format!(
                        "no part began within {HEAD_MAX} bytes (a boundary and a part's headers)"
                    )))));
                }
            }
        }
        next
    }
}
