//! The event stream of `Start` and `Connect`: `start` first, then data and
//! keepalives, then exactly one `end`. Dropping the stream (client gone) only
//! detaches; the process keeps running.

use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;
use tokio::time::Instant;

use super::output::{Next, Source, Subscription};
use crate::proto::process::process_event::{
    data_event::Output, DataEvent, Event, KeepAlive, StartEvent,
};
use crate::proto::process::ProcessEvent;
use crate::status::{Code, Error, Result};

pub type EventStream = Pin<Box<dyn Stream<Item = Result<ProcessEvent>> + Send>>;

struct State {
    start: Option<StartEvent>,
    sub: Subscription,
    keepalive: Duration,
    deadline: Option<Instant>,
    done: bool,
}

fn event(e: Event) -> ProcessEvent {
    ProcessEvent { event: Some(e) }
}

/// Builds the stream. `deadline` bounds the stream only (not the process).
pub fn stream(
    start: StartEvent,
    sub: Subscription,
    keepalive: Duration,
    deadline: Option<Instant>,
) -> EventStream {
    let state = State {
        start: Some(start),
        sub,
        keepalive,
        deadline,
        done: false,
    };
    Box::pin(futures_util::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        if let Some(start) = st.start.take() {
            return Some((Ok(event(Event::Start(start))), st));
        }
        let deadline = async {
            match st.deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let item = tokio::select! {
            next = st.sub.next() => Ok(match next {
                Next::Data(source, bytes) => event(Event::Data(DataEvent {
                    output: Some(match source {
                        Source::Stdout => Output::Stdout(bytes),
                        Source::Stderr => Output::Stderr(bytes),
                        Source::Pty => Output::Pty(bytes),
                    }),
                })),
                Next::End(end) => {
                    st.done = true;
                    event(Event::End(end))
                }
            }),
            () = tokio::time::sleep(st.keepalive) => Ok(event(Event::Keepalive(KeepAlive {}))),
            () = deadline => {
                st.done = true;
                Err(Error::new(Code::DeadlineExceeded, "stream deadline exceeded; the process keeps running"))
            }
        };
        Some((item, st))
    }))
}
