//! The Connect protocol (unary, server- and client-streaming; JSON and binary
//! proto; HTTP/1.1 and HTTP/2) over the same service logic as gRPC. Only
//! framing, codecs and error rendering live here; every RPC is the service's.

pub mod codec;
pub mod envelope;
mod routes;

use std::future::Future;
use std::io::Read;
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use prost::{Message, Name};
use tokio::time::Instant;

pub use codec::Codec;
use envelope::{end_frame, frame_with, EnvelopeReader, FLAG_COMPRESSED, FLAG_END};
pub use routes::{is_connect_path, ConnectRouter};

use crate::request_body::RequestBody;
use crate::status::{Code, Error, Result};

pub use crate::wire::HttpBody;

/// Largest request message accepted (as for gRPC).
pub const MAX_MESSAGE: usize = crate::wire::MAX_DECODE;

/// The shape of an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Unary,
    ServerStream,
    ClientStream,
}

/// What a request said about framing: codec and request compression.
#[derive(Debug, Clone, Copy)]
pub struct Wire {
    pub codec: Codec,
    /// The request body (unary) or its compressed envelopes (streams) are gzip.
    pub gzip: bool,
    pub deadline: Option<Instant>,
}

impl Wire {
    /// Reads content type, protocol version and compression; a mismatch is an
    /// error response already.
    pub fn from_headers(
        kind: Kind,
        headers: &HeaderMap,
    ) -> std::result::Result<Wire, Box<Response<HttpBody>>> {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::trim)
        };
        let ct = header("content-type").unwrap_or("");
        let base = ct
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let codec = match (kind, base.as_str()) {
            (Kind::Unary, "application/json")
            | (Kind::ServerStream | Kind::ClientStream, "application/connect+json") => Codec::Json,
            (Kind::Unary, "application/proto")
            | (Kind::ServerStream | Kind::ClientStream, "application/connect+proto") => {
                Codec::Proto
            }
            _ => {
                let want = if kind == Kind::Unary {
                    "application/json or application/proto"
                } else {
                    "application/connect+json or application/connect+proto"
                };
                let e = Error::invalid(format!(
                    "unsupported content-type {ct:?}; this method takes {want}"
                ));
                let mut r = unary_error(&e);
                *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
                return Err(Box::new(r));
            }
        };
        let fail = |e: Error| {
            Box::new(if kind == Kind::Unary {
                unary_error(&e)
            } else {
                stream_error(codec, &e)
            })
        };
        if let Some(v) = header("connect-protocol-version") {
            if v != "1" {
                return Err(fail(Error::invalid(format!(
                    "connect-protocol-version {v:?} is not supported (1 is)"
                ))));
            }
        }
        let enc_header = if kind == Kind::Unary {
            "content-encoding"
        } else {
            "connect-content-encoding"
        };
        let gzip = match header(enc_header).map(str::to_ascii_lowercase).as_deref() {
            None | Some("identity") | Some("") => false,
            Some("gzip") => true,
            Some(other) => {
                return Err(fail(Error::new(
                    Code::Unimplemented,
                    format!("{enc_header} {other:?} is not supported (gzip and identity are)"),
                )))
            }
        };
        Ok(Wire {
            codec,
            gzip,
            deadline: None,
        })
    }
}

fn json_response(
    status: StatusCode,
    content_type: &'static str,
    body: Vec<u8>,
) -> Response<HttpBody> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(HttpBody::new(Full::new(Bytes::from(body))))
        .expect("static response parts are valid")
}

/// A unary error: Connect's HTTP status and `{"code","message"}`.
pub fn unary_error(e: &Error) -> Response<HttpBody> {
    let body = serde_json::json!({"code": e.code.connect_name(), "message": e.message});
    json_response(
        e.code.http_status(),
        "application/json",
        body.to_string().into_bytes(),
    )
}

fn stream_content_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Json => "application/connect+json",
        Codec::Proto => "application/connect+proto",
    }
}

/// A streaming response that carries only an error (HTTP 200, end-stream).
pub fn stream_error(codec: Codec, e: &Error) -> Response<HttpBody> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", stream_content_type(codec))
        .body(HttpBody::new(Full::new(end_frame(Some(e)))))
        .expect("static response parts are valid")
}

/// Decompresses a gzip message, refusing more than [`MAX_MESSAGE`] bytes.
pub fn gunzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::invalid(format!("bad gzip data: {e}")))?;
    if out.len() > MAX_MESSAGE {
        return Err(too_big(out.len()));
    }
    Ok(out)
}

fn too_big(len: usize) -> Error {
    Error::new(
        Code::ResourceExhausted,
        format!("message of {len} bytes exceeds the limit of {MAX_MESSAGE} bytes"),
    )
}

async fn with_deadline<T>(
    deadline: Option<Instant>,
    f: impl Future<Output = Result<T>>,
) -> Result<T> {
    match deadline {
        None => f.await,
        Some(at) => tokio::time::timeout_at(at, f).await.unwrap_or_else(|_| {
            Err(Error::new(
                Code::DeadlineExceeded,
                "the request deadline passed",
            ))
        }),
    }
}

/// Unary: one message in, one out.
///
/// The encoded answer is counted in `answer` (see [`crate::answers`]) in
/// place of what building it counted, or refused if it does not fit.
pub async fn unary<Req, Resp, F, Fut>(
    wire: Wire,
    body: RequestBody,
    answer: crate::answers::Share,
    f: F,
) -> Response<HttpBody>
where
    Req: Message + Default + Name,
    Resp: Message + Name + 'static,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<Resp>>,
{
    let result = async {
        let raw = crate::body::read_to_end(body, MAX_MESSAGE).await?;
        let raw = if wire.gzip {
            Bytes::from(gunzip(&raw)?)
        } else {
            raw
        };
        let req: Req = codec::decode(wire.codec, &Req::full_name(), &raw)?;
        let resp = with_deadline(wire.deadline, f(req)).await?;
        // The message goes before its encoding is counted.
        codec::encode(wire.codec, &Resp::full_name(), &resp)
    }
    .await;
    unary_answer(wire.codec, &answer, result)
}

/// A unary call's answer once encoded (or failed), its length counted in
/// `answer`. Apart from [`unary`], whose copies per RPC it would enlarge.
#[inline(never)]
fn unary_answer(
    codec: Codec,
    answer: &crate::answers::Share,
    result: Result<Vec<u8>>,
) -> Response<HttpBody> {
    match result.and_then(|bytes| answer.settle(bytes.len()).map(|()| bytes)) {
        Ok(bytes) => json_response(
            StatusCode::OK,
            match codec {
                Codec::Json => "application/json",
                Codec::Proto => "application/proto",
            },
            bytes,
        ),
        Err(e) => unary_error(&e),
    }
}

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T>> + Send>>;

/// Decodes one envelope's payload.
fn decode_envelope<Req: Message + Default>(
    wire: Wire,
    name: &str,
    flags: u8,
    payload: &[u8],
) -> Result<Req> {
    if flags & FLAG_COMPRESSED != 0 {
        if !wire.gzip {
            return Err(Error::invalid(
                "compressed envelope without connect-content-encoding",
            ));
        }
        codec::decode(wire.codec, name, &gunzip(payload)?)
    } else {
        codec::decode(wire.codec, name, payload)
    }
}

/// The request messages of a streaming call, decoded as they arrive.
fn request_stream<Req>(wire: Wire, body: RequestBody) -> BoxStream<Req>
where
    Req: Message + Default + Name + Send + 'static,
{
    let name = Req::full_name();
    let reader = EnvelopeReader::new(body, MAX_MESSAGE);
    Box::pin(futures_util::stream::unfold(
        Some((reader, name)),
        move |state| async move {
            let (mut reader, name) = state?;
            loop {
                return match reader.next().await {
                    Ok(None) => None,
                    Ok(Some((flags, _))) if flags & FLAG_END != 0 => continue,
                    Ok(Some((flags, payload))) => Some((
                        decode_envelope(wire, &name, flags, &payload),
                        Some((reader, name)),
                    )),
                    Err(e) => Some((Err(e), None)),
                };
            }
        },
    ))
}

/// A streamed message's envelope: in binary protobuf, a process's output
/// event is a short head followed by the output itself (not copied); any
/// other message is one buffer.
fn envelope<M: Message + 'static>(
    codec: Codec,
    name: &str,
    msg: &M,
) -> Result<(Bytes, Option<Bytes>)> {
    if codec == Codec::Proto {
        if let Some((head, output)) = codec::framed_output_event(msg) {
            return Ok((head, Some(output)));
        }
    }
    frame_with(0, |out| codec::encode_into(codec, name, msg, out)).map(|b| (b, None))
}

/// Streams responses as envelopes; an error ends the stream in its trailer.
fn stream_response<Resp>(wire: Wire, responses: BoxStream<Resp>) -> Response<HttpBody>
where
    Resp: Message + Name + 'static,
{
    let codec = wire.codec;
    let deadline = wire.deadline;
    let name = Resp::full_name();
    let frames = futures_util::stream::unfold(Some(responses), move |s| {
        let name = name.clone();
        async move {
            let mut s = s?;
            let next = match deadline {
                None => s.next().await,
                Some(at) => tokio::time::timeout_at(at, s.next())
                    .await
                    .unwrap_or_else(|_| {
                        Some(Err(Error::new(
                            Code::DeadlineExceeded,
                            "the stream deadline passed",
                        )))
                    }),
            };
            let (parts, rest) = match next {
                None => ((end_frame(None), None), None),
                Some(Ok(msg)) => match envelope(codec, &name, &msg) {
                    Ok(parts) => (parts, Some(s)),
                    Err(e) => ((end_frame(Some(&e)), None), None),
                },
                Some(Err(e)) => ((end_frame(Some(&e)), None), None),
            };
            Some((parts, rest))
        }
    })
    .flat_map(|(first, second)| {
        let frames = std::iter::once(first).chain(second);
        futures_util::stream::iter(
            frames.map(|b| Ok::<_, std::convert::Infallible>(Frame::data(b))),
        )
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", stream_content_type(codec))
        .body(HttpBody::new(StreamBody::new(frames)))
        .expect("static response parts are valid")
}

/// Server streaming: one message in, a stream out.
pub async fn server_stream<Req, Resp, F, Fut>(
    wire: Wire,
    body: RequestBody,
    f: F,
) -> Response<HttpBody>
where
    Req: Message + Default + Name + Send + 'static,
    Resp: Message + Name + 'static,
    F: FnOnce(Req) -> Fut,
    Fut: Future<Output = Result<BoxStream<Resp>>>,
{
    let mut input = request_stream::<Req>(wire, body);
    let req = match input.next().await {
        Some(Ok(r)) => r,
        Some(Err(e)) => return stream_error(wire.codec, &e),
        None => {
            return stream_error(
                wire.codec,
                &Error::invalid(format!("missing the {} message", Req::full_name())),
            )
        }
    };
    match f(req).await {
        Ok(s) => stream_response(wire, s),
        Err(e) => stream_error(wire.codec, &e),
    }
}

/// Client streaming: a stream in, one message out (as a stream response).
pub async fn client_stream<Req, Resp, F, Fut>(
    wire: Wire,
    body: RequestBody,
    f: F,
) -> Response<HttpBody>
where
    Req: Message + Default + Name + Send + 'static,
    Resp: Message + Name + Send + 'static,
    F: FnOnce(BoxStream<Req>) -> Fut,
    Fut: Future<Output = Result<Resp>>,
{
    let input = request_stream::<Req>(wire, body);
    let result = with_deadline(wire.deadline, f(input)).await;
    let once: BoxStream<Resp> = Box::pin(futures_util::stream::iter([result]));
    stream_response(
        Wire {
            deadline: None,
            ..wire
        },
        once,
    )
}
