//! Reading a whole request body into memory, bounded three ways: per request
//! (a size limit), in total (one budget shared by every body being read, so
//! many slow uploads cannot add up), and in time (a body must arrive within
//! [`BODY_TIMEOUT`]).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;
use tokio::sync::Semaphore;

use crate::status::{Code, Error, Result};

/// A buffered body must be complete within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Bytes of request bodies being buffered at once, across all requests.
pub const TOTAL_BUDGET: usize = 64 << 20;

fn budget() -> &'static Semaphore {
    static BUDGET: OnceLock<Semaphore> = OnceLock::new();
    BUDGET.get_or_init(|| Semaphore::new(TOTAL_BUDGET))
}

/// Reads `body` to its end: at most `limit` bytes, within [`BODY_TIMEOUT`],
/// within the shared budget.
pub async fn read_to_end<B>(body: B, limit: usize) -> Result<Bytes>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    match tokio::time::timeout(BODY_TIMEOUT, read(body, limit)).await {
        Ok(r) => r,
        Err(_) => Err(Error::new(
            Code::DeadlineExceeded,
            format!(
                "the request body did not arrive within {} s",
                BODY_TIMEOUT.as_secs()
            ),
        )),
    }
}

async fn read<B>(mut body: B, limit: usize) -> Result<Bytes>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = BytesMut::new();
    let mut held = None::<tokio::sync::SemaphorePermit<'static>>;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Error::invalid(format!("reading the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        if buf.len() + data.len() > limit {
            return Err(too_big(limit));
        }
        let n = u32::try_from(data.len()).map_err(|_| too_big(limit))?;
        let permit = budget().try_acquire_many(n).map_err(|_| {
            Error::new(
                Code::ResourceExhausted,
                "envd is receiving too many request bodies at once; retry shortly",
            )
        })?;
        match &mut held {
            Some(h) => h.merge(permit),
            None => held = Some(permit),
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// A body over its size limit.
pub fn too_big(limit: usize) -> Error {
    Error::new(
        Code::ResourceExhausted,
        format!("the request body exceeds the limit of {limit} bytes"),
    )
}
