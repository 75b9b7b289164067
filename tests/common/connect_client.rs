//! A minimal Connect client over one keep-alive HTTP/1.1 connection, as the
//! E2B SDKs talk to envd: server-streaming calls in JSON or binary envelopes.
//! Benchmarks use it so that every Connect row goes through the same client.
#![allow(dead_code)]

use bytes::{Buf, Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

pub struct ConnectClient {
    send: SendRequest<Full<Bytes>>,
}

/// How a streamed call's messages are encoded.
#[derive(Clone, Copy, Debug)]
pub enum Codec {
    Json,
    Proto,
}

impl Codec {
    fn content_type(self) -> &'static str {
        match self {
            Codec::Json => "application/connect+json",
            Codec::Proto => "application/connect+proto",
        }
    }
}

impl ConnectClient {
    /// Connects to `tcp://HOST:PORT`.
    pub async fn dial(url: &str) -> ConnectClient {
        let addr = url.strip_prefix("tcp://").expect("tcp:// url");
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s))
            .await
            .unwrap();
        tokio::spawn(conn);
        ConnectClient { send }
    }

    /// One server-streaming call; `on_message` sees each message's payload.
    /// Returns the end-of-stream envelope's payload (`{}` when all is well).
    pub async fn stream(
        &mut self,
        method: &str,
        codec: Codec,
        request: &[u8],
        mut on_message: impl FnMut(&[u8]),
    ) -> Bytes {
        let mut body = BytesMut::with_capacity(5 + request.len());
        body.extend_from_slice(&[0]);
        body.extend_from_slice(&u32::try_from(request.len()).unwrap().to_be_bytes());
        body.extend_from_slice(request);
        let req = hyper::Request::post(format!("/{method}"))
            .header("host", "envd")
            .header("content-type", codec.content_type())
            .body(Full::new(body.freeze()))
            .unwrap();
        self.send.ready().await.unwrap();
        let resp = self.send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        let mut body = resp.into_body();
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                buf.extend_from_slice(&data);
            }
            while buf.len() >= 5 {
                let len =
                    usize::try_from(u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]])).unwrap();
                if buf.len() < 5 + len {
                    break;
                }
                let flags = buf[0];
                buf.advance(5);
                let msg = buf.split_to(len).freeze();
                if flags & 2 != 0 {
                    return msg;
                }
                on_message(&msg);
            }
        }
        panic!("{method}: the stream ended without an end-of-stream envelope");
    }
}

/// Bytes of output in one Connect JSON `process.StartResponse` carrying a
/// data event, from the length of its base64 text (without decoding it).
/// The closing quote is found with `memchr`: a byte-at-a-time scan of each
/// message's text kept the bench's client busy 80% of a JSON stream, so the
/// row measured the client as much as envd.
pub fn json_output_len(msg: &[u8]) -> usize {
    const KEYS: [&[u8]; 2] = [b"\"stdout\":\"", b"\"stderr\":\""];
    for key in KEYS {
        if let Some(at) = find(msg, key) {
            let text = &msg[at + key.len()..];
            let end = memchr::memchr(b'"', text).unwrap();
            let pad = text[..end].iter().rev().take_while(|&&b| b == b'=').count();
            return end / 4 * 3 - pad;
        }
    }
    0
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    memchr::memmem::find(hay, needle)
}
