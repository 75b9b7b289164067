//! Connect streaming envelopes: `[flags u8][length u32 BE][message]`. Flag
//! 0x01 = compressed, 0x02 = end of stream (a JSON `{"error":…}` or `{}`).

use bytes::{Buf, Bytes, BytesMut};
use http_body::Body;
use http_body_util::BodyExt;

use crate::status::{Code, Error, Result};

pub const FLAG_COMPRESSED: u8 = 0x01;
pub const FLAG_END: u8 = 0x02;

/// Frames one message encoded in place by `encode` (which appends it to the
/// buffer after the prefix): one buffer, no copy of the message.
pub fn frame_with(flags: u8, encode: impl FnOnce(&mut Vec<u8>) -> Result<()>) -> Result<Bytes> {
    let mut b = vec![flags, 0, 0, 0, 0];
    encode(&mut b)?;
    let len = u32::try_from(b.len() - 5)
        .map_err(|_| Error::internal("a message of 4 GiB or more cannot be framed"))?;
    b[1..5].copy_from_slice(&len.to_be_bytes());
    Ok(Bytes::from(b))
}

/// The end-of-stream envelope: `{}` or `{"error":{"code","message"}}`.
pub fn end_frame(error: Option<&Error>) -> Bytes {
    let body = match error {
        None => serde_json::json!({}),
        Some(e) => {
            serde_json::json!({"error": {"code": e.code.connect_name(), "message": e.message}})
        }
    };
    frame_with(FLAG_END, |b| {
        serde_json::to_writer(b, &body).map_err(|e| Error::internal(e.to_string()))
    })
    .expect("a small JSON value always serialises and frames")
}

/// Reads envelopes from a request body, incrementally. A message that is not
/// all there yet is charged to the shared body budget (`crate::body`) for
/// its whole declared length until it is, and its buffer is made that size
/// at once: without, every stream could hold a message of up to `max` bytes
/// in reading (twice that in a doubled buffer), however many streams there
/// were. Charged, it must arrive within the body timeout, as a buffered
/// body must: a stalled message would otherwise keep its part of the
/// budget from every other call for as long as its stream stayed open.
pub struct EnvelopeReader<B> {
    body: B,
    buf: BytesMut,
    max: usize,
    done: bool,
    /// The charge of a message in reading.
    charged: Option<crate::body::MessageCharge>,
}

impl<B> EnvelopeReader<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    pub fn new(body: B, max: usize) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            max,
            done: false,
            charged: None,
        }
    }

    /// The next envelope's flags and payload; `None` at a clean end.
    pub async fn next(&mut self) -> Result<Option<(u8, Bytes)>> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]])
                    as usize;
                if len > self.max {
                    return Err(Error::new(
                        Code::ResourceExhausted,
                        format!(
                            "message of {len} bytes exceeds the limit of {} bytes",
                            self.max
                        ),
                    ));
                }
                if self.buf.len() >= 5 + len {
                    let flags = self.buf[0];
                    self.buf.advance(5);
                    let message = self.buf.split_to(len).freeze();
                    // Read: the handler holds it now.
                    self.charged = None;
                    return Ok(Some((flags, message)));
                }
                if self.charged.is_none() {
                    self.charged = Some(crate::body::MessageCharge::begin(len)?);
                    self.buf.reserve(5 + len - self.buf.len());
                }
            }
            if self.done {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::invalid(format!(
                        "truncated envelope: the body ended inside a message ({} bytes left over)",
                        self.buf.len()
                    )))
                };
            }
            let frame = match &self.charged {
                None => self.body.frame().await,
                Some(c) => tokio::time::timeout_at(c.by, self.body.frame())
                    .await
                    .map_err(|_| crate::body::MessageCharge::late())?,
            };
            match frame {
                None => self.done = true,
                Some(Err(e)) => {
                    return Err(Error::invalid(format!("reading the request body: {e}")))
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}
