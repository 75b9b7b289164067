//! The shape every long-lived response stream shares (`Start`, `Connect`,
//! `WatchDir`): a first item once the work is set up, then the source's
//! items, with a keepalive item whenever the source stays quiet for the
//! keepalive interval, until the source ends (an error ends it too) or the
//! deadline passes (which ends it with DEADLINE_EXCEEDED).

use std::pin::Pin;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::time::Instant;

use crate::status::{Code, Error, Result};

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send>>;

/// How a stream is paced and bounded.
#[derive(Debug, Clone, Copy)]
pub struct Pacing<T> {
    /// Sent whenever the source is quiet this long.
    pub keepalive: Duration,
    pub keepalive_item: fn() -> T,
    /// When the stream ends with DEADLINE_EXCEEDED, and what it says.
    pub deadline: Option<Instant>,
    pub deadline_message: &'static str,
}

/// `first`, then `source` paced by `pacing` (see the module documentation).
/// `source` must be cancel-safe to poll (a stream that keeps its progress,
/// like `unfold` or a channel): a keepalive interrupts a pending `next()`.
pub fn framed<T, S>(first: T, source: S, pacing: Pacing<T>) -> BoxStream<T>
where
    T: Send + 'static,
    S: Stream<Item = Result<T>> + Send + Unpin + 'static,
{
    let state = (Some(first), Some(source));
    Box::pin(futures_util::stream::unfold(
        state,
        move |(first, source)| async move {
            let mut source = source?;
            if let Some(first) = first {
                return Some((Ok(first), (None, Some(source))));
            }
            let deadline = async {
                match pacing.deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                item = source.next() => match item {
                    Some(Ok(item)) => Some((Ok(item), (None, Some(source)))),
                    Some(Err(e)) => Some((Err(e), (None, None))),
                    None => None,
                },
                () = tokio::time::sleep(pacing.keepalive) => {
                    Some((Ok((pacing.keepalive_item)()), (None, Some(source))))
                }
                () = deadline => Some((
                    Err(Error::new(Code::DeadlineExceeded, pacing.deadline_message)),
                    (None, None),
                )),
            }
        },
    ))
}
