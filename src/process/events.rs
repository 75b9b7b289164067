//! The event stream of `Start` and `Connect`: `start` first, then data and
//! keepalives, then exactly one `end`. Dropping the stream (client gone) only
//! detaches; the process keeps running.

use std::time::Duration;

use futures_util::Stream;
use tokio::time::Instant;

use super::output::{Next, Source, Subscription};
use crate::proto::process::process_event::{
    data_event::Output, DataEvent, Event, KeepAlive, StartEvent,
};
use crate::proto::process::ProcessEvent;
use crate::status::Result;
use crate::streams::{framed, BoxStream, Pacing};

pub type EventStream = BoxStream<ProcessEvent>;

fn event(e: Event) -> ProcessEvent {
    ProcessEvent { event: Some(e) }
}

/// A subscription's output as events, ending after the `end` event.
fn output_events(sub: Subscription) -> impl Stream<Item = Result<ProcessEvent>> + Send + Unpin {
    Box::pin(futures_util::stream::unfold(Some(sub), |sub| async move {
        let mut sub = sub?;
        Some(match sub.next().await {
            Next::Data(source, bytes) => {
                let output = match source {
                    Source::Stdout => Output::Stdout(bytes),
                    Source::Stderr => Output::Stderr(bytes),
                    Source::Pty => Output::Pty(bytes),
                };
                let data = DataEvent {
                    output: Some(output),
                };
                (Ok(event(Event::Data(data))), Some(sub))
            }
            Next::End(end) => (Ok(event(Event::End(end))), None),
        })
    }))
}

/// Builds the stream. `deadline` bounds the stream only (not the process).
pub fn stream(
    start: StartEvent,
    sub: Subscription,
    keepalive: Duration,
    deadline: Option<Instant>,
) -> EventStream {
    let pacing = Pacing {
        keepalive,
        keepalive_item: || event(Event::Keepalive(KeepAlive {})),
        deadline,
        deadline_message: "stream deadline exceeded; the process keeps running",
    };
    framed(event(Event::Start(start)), output_events(sub), pacing)
}
