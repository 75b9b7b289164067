//! `process.Process/Start` and `/Connect` over native gRPC, served beside
//! tonic rather than through it. tonic encodes every message into a buffer
//! of its own, so each output chunk would be copied once more on its way
//! out; here an output event goes out as a short head followed by the output
//! itself, as Connect's binary streams send it (a gRPC message prefix is a
//! Connect envelope's). What a client sees is what tonic gives: the same
//! request checks, one status mapping ([`crate::status`] through
//! `tonic::Status`), `grpc-status` in the trailers, or a trailers-only
//! response when the call fails before its first event.

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::StreamBody;
use hyper::body::Incoming;
use prost::{Message, Name};
use tonic::Status;

use crate::connect::envelope::{EnvelopeReader, FLAG_COMPRESSED};
use crate::connect::Codec;
use crate::defaults::Defaults;
use crate::process::events::EventStream;
use crate::process::ProcessService;
use crate::proto::process::{
    ConnectRequest, ConnectResponse, ProcessEvent, StartRequest, StartResponse,
};
use crate::request::RequestContext;
use crate::status::Code;
use crate::wire::HttpBody;

const START: &str = "/process.Process/Start";
const CONNECT: &str = "/process.Process/Connect";

/// Whether `path` is served here rather than by tonic.
pub fn serves(path: &str) -> bool {
    path == START || path == CONNECT
}

/// Answers one `Start` or `Connect` call.
pub async fn handle(
    svc: &ProcessService,
    defaults: &Defaults,
    req: Request<Incoming>,
) -> Response<HttpBody> {
    match call(svc, defaults, req).await {
        Ok(r) => r,
        Err(status) => super::trailers_only(&status),
    }
}

async fn call(
    svc: &ProcessService,
    defaults: &Defaults,
    req: Request<Incoming>,
) -> Result<Response<HttpBody>, Status> {
    let (parts, body) = req.into_parts();
    if let Some(enc) = parts.headers.get("grpc-encoding") {
        if enc != "identity" {
            return Err(Status::unimplemented(format!(
                "Content is compressed with `{}` which isn't supported",
                String::from_utf8_lossy(enc.as_bytes())
            )));
        }
    }
    let mut reader = EnvelopeReader::new(body, crate::wire::MAX_DECODE);
    let (flags, payload) = match reader.next().await {
        Ok(Some(m)) => m,
        Ok(None) => return Err(Status::internal("Missing request message.")),
        // As tonic reports an oversized message.
        Err(e) if e.code == Code::ResourceExhausted => return Err(Status::out_of_range(e.message)),
        Err(e) => return Err(e.into()),
    };
    if flags & FLAG_COMPRESSED != 0 {
        return Err(Status::internal(
            "protocol error: received message with compressed-flag but no grpc-encoding was specified",
        ));
    }
    let ctx = RequestContext::from_headers(&parts.headers, defaults)?;
    Ok(if parts.uri.path() == START {
        let events = svc.start(&ctx, decode::<StartRequest>(&payload)?)?;
        respond(events, |e| StartResponse { event: Some(e) })
    } else {
        let events = svc.connect(&ctx, decode::<ConnectRequest>(&payload)?)?;
        respond(events, |e| ConnectResponse { event: Some(e) })
    })
}

fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, Status> {
    M::decode(payload)
        .map_err(|e| Status::internal(format!("failed to decode Protobuf message: {e}")))
}

/// The response: each event as its frames, then the status in trailers.
fn respond<M>(events: EventStream, wrap: fn(ProcessEvent) -> M) -> Response<HttpBody>
where
    M: Message + Name + 'static,
{
    let name = M::full_name();
    let frames = futures_util::stream::unfold(Some(events), move |events| {
        let name = name.clone();
        async move {
            let mut events = events?;
            let (frames, rest) = match events.next().await {
                None => (vec![trailers(None)], None),
                Some(Ok(e)) => {
                    match crate::connect::message_frames(Codec::Proto, &name, &wrap(e)) {
                        Ok((head, output)) => {
                            let frames = std::iter::once(head).chain(output).map(Frame::data);
                            (frames.collect(), Some(events))
                        }
                        Err(e) => (vec![trailers(Some(e.into()))], None),
                    }
                }
                Some(Err(e)) => (vec![trailers(Some(e.into()))], None),
            };
            Some((frames, rest))
        }
    })
    .flat_map(|frames| {
        futures_util::stream::iter(frames.into_iter().map(Ok::<_, std::convert::Infallible>))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc")
        .body(HttpBody::new(StreamBody::new(frames)))
        .expect("static response parts are valid")
}

/// The trailers that end a stream: `grpc-status: 0`, or the error's status.
fn trailers(error: Option<Status>) -> Frame<Bytes> {
    let status = error.unwrap_or_else(|| Status::ok(""));
    let mut h = HeaderMap::new();
    if status.add_header(&mut h).is_err() {
        h.insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::Internal as i32),
        );
    }
    Frame::trailers(h)
}
