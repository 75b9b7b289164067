//! Reading a whole request body into memory, bounded three ways: per request
//! (a size limit), in total (one budget shared by every body being read, so
//! many slow uploads cannot add up), and in time (a body must arrive within
//! the body timeout, `--body-timeout`, 30 s by default).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use crate::status::{Code, Error};

/// A buffered body must be complete within this time unless set otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

static TIMEOUT_MS: AtomicU64 = AtomicU64::new(30_000);

/// Sets the body timeout (from `--body-timeout`).
pub fn set_timeout(t: Duration) {
    TIMEOUT_MS.store(
        u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1),
        Ordering::Relaxed,
    );
}

/// The body timeout: also how long a streamed message, once begun and
/// charged to the budget, has to arrive whole.
pub fn timeout() -> Duration {
    Duration::from_millis(TIMEOUT_MS.load(Ordering::Relaxed))
}

/// Bytes of request bodies being buffered at once, across all requests.
pub const TOTAL_BUDGET: usize = 64 << 20;

fn budget() -> &'static Semaphore {
    static BUDGET: OnceLock<Semaphore> = OnceLock::new();
    BUDGET.get_or_init(|| Semaphore::new(TOTAL_BUDGET))
}

/// Why a body could not be read. Each protocol answers these in its own
/// way (REST: 413, 503, 408; Connect through [`Error`]).
#[derive(Debug)]
pub enum BodyError {
    /// Over the per-request limit (bytes).
    TooLarge(usize),
    /// The shared budget is spent: too many bodies in flight.
    Busy,
    /// It did not arrive within the body timeout.
    Timeout(Duration),
    /// The transport failed mid-body.
    Read(String),
}

impl From<BodyError> for Error {
    fn from(e: BodyError) -> Self {
        let message = e.to_string();
        let code = match e {
            BodyError::TooLarge(_) | BodyError::Busy => Code::ResourceExhausted,
            BodyError::Timeout(_) => Code::DeadlineExceeded,
            BodyError::Read(_) => Code::InvalidArgument,
        };
        Error::new(code, message)
    }
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::TooLarge(limit) => {
                write!(f, "the request body exceeds the limit of {limit} bytes")
            }
            BodyError::Busy => {
                f.write_str("envd is receiving too many request bodies at once; retry shortly")
            }
            BodyError::Timeout(t) => write!(f, "the request body did not arrive within {t:?}"),
            BodyError::Read(e) => write!(f, "reading the request body: {e}"),
        }
    }
}

/// Reads `body` to its end: at most `limit` bytes, within the body timeout,
/// within the shared budget.
///
/// A body refused for its size is read on and thrown
/// away (up to [`DRAIN_MAX`] bytes, within [`DRAIN_TIME`]) before the
/// error goes back. Over HTTP/1.1 a server that answers while the client
/// is still sending must close the connection, and the client's next write
/// meets a reset that can take the answer with it: the caller would see a
/// broken pipe instead of the reason. Drained, the answer arrives and the
/// connection stays open for the next request.
pub async fn read_to_end<B>(mut body: B, limit: usize) -> std::result::Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let t = timeout();
    let result = tokio::time::timeout(t, read(&mut body, limit))
        .await
        .unwrap_or(Err(BodyError::Timeout(t)));
    // Not when the shared budget is spent: envd is then flooded with
    // bodies, and answering at once frees the connection soonest.
    if let Err(BodyError::TooLarge(_)) = result {
        drain(&mut body).await;
    }
    result
}

/// Reads what is left of a refused body and throws it away, so that the
/// answer reaches an HTTP/1.1 client still sending it (see
/// [`read_to_end`]): [`DRAIN_MAX`] bytes within [`DRAIN_TIME`] at most.
pub async fn drain<B>(body: &mut B)
where
    B: Body<Data = Bytes> + Unpin,
{
    let _ = tokio::time::timeout(DRAIN_TIME, discard(body, DRAIN_MAX)).await;
}

/// A streamed call's message (a Connect envelope, a native gRPC message)
/// that is not all there yet: charged to the shared budget for its whole
/// length while this lives, and due whole by [`MessageCharge::by`] (the body
/// timeout from its start), as a buffered body is.
pub struct MessageCharge {
    held: tokio::sync::SemaphorePermit<'static>,
    /// When the message must be whole.
    pub by: tokio::time::Instant,
}

impl MessageCharge {
    /// Charges a message of `len` bytes; `RESOURCE_EXHAUSTED` when the budget
    /// is spent.
    pub fn begin(len: usize) -> Result<Self, Error> {
        let n = u32::try_from(len).map_err(|_| BodyError::Busy)?;
        let held = budget().try_acquire_many(n).map_err(|_| BodyError::Busy)?;
        Ok(MessageCharge {
            held,
            by: tokio::time::Instant::now() + timeout(),
        })
    }

    /// The bytes charged.
    pub fn bytes(&self) -> usize {
        self.held.num_permits()
    }

    /// What a call whose message missed [`MessageCharge::by`] is told.
    pub fn late() -> Error {
        Error::new(
            Code::DeadlineExceeded,
            format!("a message did not arrive whole within {:?}", timeout()),
        )
    }
}

/// Whether most of the shared budget is spent: envd is being flooded with
/// bodies, and closing a connection then frees it soonest.
pub fn flooded() -> bool {
    budget().available_permits() < TOTAL_BUDGET / 2
}

/// How much of a refused body is read and thrown away before answering.
pub const DRAIN_MAX: u64 = 16 << 20;

/// How long a refused body is read before answering anyway.
pub const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads and drops `body` until its end or `max` bytes, whichever is first.
/// A body declared longer than `max` is not read at all: the answer goes at
/// once and the connection closes.
async fn discard<B>(body: &mut B, max: u64)
where
    B: Body<Data = Bytes> + Unpin,
{
    if body.size_hint().lower() > max {
        return;
    }
    let mut seen = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            seen += data.len() as u64;
            if seen > max {
                return;
            }
        }
    }
}

async fn read<B>(body: &mut B, limit: usize) -> std::result::Result<Bytes, BodyError>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    // A body that declares its length over the limit is refused before any
    // of it is held.
    if body.size_hint().lower() > limit as u64 {
        return Err(BodyError::TooLarge(limit));
    }
    // A body of a declared length that comes in pieces is copied into one
    // buffer of that length as it arrives, and the budget is charged for all
    // of it with its first bytes. Its chunks are let go at once: kept, they
    // pin the pieces of the connection's read buffers they were split from,
    // which the budget does not count and which leave the heap fragmented
    // (after 64 one-MiB bodies, 24-30 MiB stayed once their connections had
    // closed; 6-8 MiB copied). A body of unknown length (chunked, or HTTP/2
    // without a length) is copied into blocks as it arrives (see [`Blocks`])
    // and joined once at its end.
    let declared = body.size_hint().exact();
    // At most `limit`, checked above.
    let declared_len = declared.map_or(0, |n| usize::try_from(n).unwrap_or(limit));
    let mut whole: Option<BytesMut> = None;
    let mut pieces = Blocks::default();
    let mut total = 0usize;
    let mut held = None::<tokio::sync::SemaphorePermit<'static>>;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| BodyError::Read(e.to_string()))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if total + data.len() > limit {
            return Err(BodyError::TooLarge(limit));
        }
        let due = (total + data.len()).max(declared_len);
        let charged = held.as_ref().map_or(0, |h| h.num_permits());
        if due > charged {
            let n = u32::try_from(due - charged).map_err(|_| BodyError::TooLarge(limit))?;
            let permit = budget().try_acquire_many(n).map_err(|_| BodyError::Busy)?;
            match &mut held {
                Some(h) => h.merge(permit),
                None => held = Some(permit),
            }
        }
        total += data.len();
        match &mut whole {
            Some(buf) => buf.extend_from_slice(&data),
            // The first piece of a declared body that is not all there.
            None if declared.is_some() && pieces.is_empty() && data.len() != declared_len => {
                let mut buf = BytesMut::with_capacity(due);
                buf.extend_from_slice(&data);
                whole = Some(buf);
            }
            // The whole body at once, or one of unknown length.
            None => pieces.add(data),
        }
    }
    match whole {
        Some(buf) => Ok(buf.freeze()),
        None => Ok(pieces.join()),
    }
}

/// Largest and smallest block a body of unknown length is gathered in.
const BLOCK: usize = 64 << 10;
const FIRST_BLOCK: usize = 4 << 10;

/// A body of unknown length as it arrives. Its first piece is kept as it
/// came (a body that arrives whole is never copied); from the second on,
/// every byte is copied into blocks, each allocated whole and filled before
/// the next, the first 4 KiB and each as large as the body so far, up to 64
/// KiB: what is held is the body and at most one block's room. Kept as they
/// came, the pieces cost a `Bytes` each (32 bytes) and a hold on the
/// connection's read buffer they were split from, none of which the budget
/// counts: a body sent in chunks of one byte cost envd 38 times its size
/// (2 MiB of bodies, +78 MiB).
#[derive(Default)]
struct Blocks {
    /// The body's one piece while it has only one, as it came.
    only: Option<Bytes>,
    any: bool,
    full: Vec<Bytes>,
    filling: BytesMut,
    /// Bytes copied into blocks.
    copied: usize,
}

impl Blocks {
    fn is_empty(&self) -> bool {
        !self.any
    }

    fn add(&mut self, data: Bytes) {
        if !self.any {
            self.any = true;
            self.only = Some(data);
            return;
        }
        if let Some(first) = self.only.take() {
            self.copy(&first);
        }
        self.copy(&data);
    }

    fn copy(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            if self.filling.capacity() == 0 {
                let size = self.copied.clamp(FIRST_BLOCK, BLOCK);
                self.filling = BytesMut::with_capacity(size);
            }
            let room = self.filling.capacity() - self.filling.len();
            let (now, rest) = data.split_at(room.min(data.len()));
            self.filling.extend_from_slice(now);
            self.copied += now.len();
            data = rest;
            if self.filling.len() == self.filling.capacity() {
                self.full.push(std::mem::take(&mut self.filling).freeze());
            }
        }
    }

    /// The body in one buffer.
    fn join(self) -> Bytes {
        if let Some(only) = self.only {
            return only;
        }
        let mut buf = BytesMut::with_capacity(self.copied);
        for b in &self.full {
            buf.extend_from_slice(b);
        }
        buf.extend_from_slice(&self.filling);
        buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_join_what_came_in_order() {
        assert_eq!(Blocks::default().join(), Bytes::new());
        let mut one = Blocks::default();
        let piece = Bytes::from(vec![7u8; 100]);
        one.add(piece.clone());
        // One piece is given back as it came, not copied.
        assert_eq!(one.join().as_ptr(), piece.as_ptr());
        let mut many = Blocks::default();
        let mut expect = Vec::new();
        for i in 0..70_000usize {
            let data: Vec<u8> = (0..i % 7)
                .map(|j| u8::try_from((i + j) % 251).unwrap())
                .collect();
            expect.extend_from_slice(&data);
            many.add(Bytes::from(data));
        }
        // Blocks grow from 4 KiB to 64 KiB, each filled before the next.
        assert!(many.full.iter().all(|b| b.len() <= BLOCK));
        assert!(many.filling.capacity() <= BLOCK);
        assert_eq!(many.copied, expect.len());
        assert_eq!(many.join(), expect);
    }
}
