//! Large answers, bounded together while they are built and until their
//! callers have read them.
//!
//! A unary answer is built whole (a listing's entries, then its encoding)
//! and then waits in envd until its caller reads it. A caller that asked
//! for sixty listings of a big directory and read none held envd at 3.5 GiB
//! and growing (each a 32 MiB JSON answer, plus the entries while they were
//! encoded), and nothing bounded how many. Now every request has a
//! [`Share`] of one budget, [`MAX`] bytes for all answers together: a
//! listing grows its share as it reads entries, the Connect adapter sets it
//! to the encoded answer's length, and it is given back when the answer's
//! body is dropped (sent, or its caller gone). An answer that does not fit
//! is refused with `RESOURCE_EXHAUSTED`; answers under [`SMALL`] are never
//! counted, so only large answers can be refused, never the small calls
//! that keep a sandbox going.
//!
//! So that the body is dropped when the answer has been written rather than
//! when the HTTP layer has taken it whole into its buffers, a counted
//! answer's body hands its data on in pieces of [`PIECE`] bytes (slices of
//! the same buffer, no copy): hyper asks for the next one only when it has
//! room.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::pieces::Pieces;
use crate::quota::{LastRefusal, Quota};
use crate::status::{Code, Error, Result};
use crate::wire::HttpBody;

/// Bytes of answers held at once, all callers together.
pub const MAX: usize = 64 << 20;
/// Answers smaller than this are not counted.
pub const SMALL: usize = 64 << 10;
/// The pieces a counted answer's body is handed on in.
const PIECE: usize = 64 << 10;

static HELD: Quota = Quota::new(MAX);
/// When an answer was last refused for want of room.
static REFUSED: LastRefusal = LastRefusal::new();

/// Whether an answer was refused for want of room within `d`: answers
/// held for callers that stopped reading are then in the way.
pub fn wanted_within(d: std::time::Duration) -> bool {
    REFUSED.within(d)
}

/// What one request holds of [`MAX`] for its answer; clones share it, and
/// it is given back when the last is dropped.
#[derive(Debug, Clone, Default)]
pub struct Share(Arc<Counted>);

#[derive(Debug, Default)]
struct Counted(AtomicUsize);

impl Drop for Counted {
    fn drop(&mut self) {
        HELD.give(*self.0.get_mut());
    }
}

impl Share {
    /// Holds `n` bytes in all from now on (more or fewer than before; none
    /// under [`SMALL`]). An error when more do not fit, and then what was
    /// held stays held.
    pub fn hold(&self, n: usize) -> Result<()> {
        self.set(n, false)
    }

    /// The answer is encoded, `n` bytes: they are held from now on. If
    /// building it held nothing, they must fit ([`Share::hold`]); if it did,
    /// what it took is gone from where it was (a watcher's buffered events)
    /// and its encoding is held whether it fits or not.
    pub fn settle(&self, n: usize) -> Result<()> {
        self.set(n, self.held() > 0)
    }

    /// Holds `n` bytes in all (none under [`SMALL`]); more than before
    /// only if they fit, unless `forced`.
    #[inline(never)]
    fn set(&self, n: usize, forced: bool) -> Result<()> {
        let n = if n < SMALL { 0 } else { n };
        let had = self.held();
        if n > had {
            if forced {
                HELD.take(n - had);
            } else if n > MAX {
                // Never to fit, however long it waited.
                return Err(Error::new(
                    Code::ResourceExhausted,
                    format!(
                        "this answer alone would hold more than the {} MiB envd gives all \
                         answers together: ask for less (fewer levels, a subdirectory)",
                        MAX >> 20
                    ),
                ));
            } else if !HELD.try_take(n - had) {
                REFUSED.mark();
                return Err(Error::new(
                    Code::ResourceExhausted,
                    format!(
                        "envd already holds {} MiB of answers that are being built or that \
                         their callers have not read yet; this one ({} KiB) must wait: retry, \
                         or ask for less (fewer levels, a subdirectory)",
                        MAX >> 20,
                        n >> 10
                    ),
                ));
            }
        } else {
            HELD.give(had - n);
        }
        self.0 .0.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.0 .0.load(Ordering::Relaxed)
    }

    /// `body`, holding this share until it is sent or dropped, when
    /// anything is held; else `body` as it is (streams, small answers).
    pub fn keep_with(self, body: HttpBody) -> HttpBody {
        if self.held() == 0 {
            return body;
        }
        HttpBody::new(Metered {
            inner: Pieces::new(body, PIECE),
            share: Some(self),
        })
    }
}

/// Bytes held by all answers now.
#[cfg(test)]
fn held_now() -> usize {
    HELD.used()
}

/// A counted answer's body: its data in pieces, its share given back at the
/// end.
struct Metered {
    inner: Pieces<HttpBody>,
    share: Option<Share>,
}

impl Body for Metered {
    type Data = Bytes;
    type Error = <HttpBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<std::result::Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None | Some(Err(_)))) {
            self.share = None;
        }
        r
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

    // The only test of the shared budget in this binary.
    #[test]
    fn a_share_grows_shrinks_and_gives_back() {
        let a = Share::default();
        a.hold(100).unwrap();
        assert_eq!(a.held(), 0, "small answers are not counted");
        a.hold(1 << 20).unwrap();
        let b = a.clone();
        b.hold(512 << 10).unwrap();
        assert_eq!(a.held(), 512 << 10, "clones share it");
        let c = Share::default();
        let refused = c.hold(MAX).unwrap_err();
        assert_eq!(refused.code, Code::ResourceExhausted);
        assert!(refused.message.contains("retry"), "{}", refused.message);
        assert_eq!(c.held(), 0);
        let never = c.hold(MAX + 1).unwrap_err();
        assert!(never.message.contains("alone"), "{}", never.message);
        assert_eq!(c.held(), 0);
        drop(a);
        assert_eq!(held_now(), 512 << 10, "the clone still holds it");
        drop(b);
        assert_eq!(held_now(), 0);
        c.hold(MAX).unwrap();
    }
}
