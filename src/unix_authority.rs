//! Lets gRPC clients that send a Unix socket's path as HTTP/2 `:authority`
//! (grpc-core in Python, C++, Ruby and C#; grpc-java; grpcurl) talk to envd.
//!
//! The HTTP/2 server (hyper's h2) rejects such an authority as malformed and
//! resets every stream with PROTOCOL_ERROR; upstream declines to relax that
//! (hyperium/h2#487). Over a Unix socket the authority means nothing, so on
//! Unix-socket connections only, this wrapper rewrites the inbound header
//! blocks: each one is decoded (HPACK, with the client's dynamic table) and
//! re-encoded as plain literals without indexing, with an `:authority` that
//! is not a valid URI authority replaced by `localhost`. Re-encoding every
//! block keeps the server's decoder state trivially consistent (its dynamic
//! table stays empty). Everything else (HTTP/1.1, other frames, the write
//! side) passes through untouched.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// Largest header block accepted (a request's headers, all frames).
const MAX_BLOCK: usize = 64 * 1024;
/// Frames envd emits carry at most this much (HTTP/2's minimum max size).
const OUT_FRAME: usize = 16 * 1024;
/// The dynamic table size envd's HTTP/2 server announces (h2's default).
const TABLE_SIZE: usize = 4096;

enum Mode {
    /// Deciding between HTTP/2 (the preface) and anything else.
    Sniff,
    Passthrough,
    Frames,
}

/// A header block being collected (HEADERS plus CONTINUATIONs).
struct Block {
    stream: u32,
    flags: u8,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// See the module documentation.
pub struct AuthorityFix<S> {
    inner: S,
    mode: Mode,
    /// Bytes read from `inner`, not yet processed.
    input: BytesMut,
    /// Processed bytes, ready for the reader.
    output: BytesMut,
    /// Payload bytes of a passed-through frame still to copy.
    passing: usize,
    block: Option<Block>,
    decoder: hpack::Decoder<'static>,
    eof: bool,
}

impl<S> AuthorityFix<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            mode: Mode::Sniff,
            input: BytesMut::new(),
            output: BytesMut::new(),
            passing: 0,
            block: None,
            decoder: hpack::Decoder::new(),
            eof: false,
        }
    }

    /// Moves what can be processed from `input` to `output`.
    fn process(&mut self) -> io::Result<()> {
        loop {
            match self.mode {
                Mode::Sniff => {
                    let n = self.input.len().min(PREFACE.len());
                    if self.input[..n] != PREFACE[..n] {
                        self.mode = Mode::Passthrough;
                    } else if n == PREFACE.len() {
                        self.output.put(self.input.split_to(n));
                        self.mode = Mode::Frames;
                    } else {
                        return Ok(()); // need more of the preface
                    }
                }
                Mode::Passthrough => {
                    let all = self.input.split();
                    self.output.put(all);
                    return Ok(());
                }
                Mode::Frames => {
                    if self.passing > 0 {
                        let n = self.passing.min(self.input.len());
                        if n == 0 {
                            return Ok(());
                        }
                        self.output.put(self.input.split_to(n));
                        self.passing -= n;
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER {
                        return Ok(());
                    }
                    let h = &self.input[..FRAME_HEADER];
                    let len = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    let (kind, flags) = (h[3], h[4]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    if kind != HEADERS && kind != CONTINUATION {
                        if self.block.is_some() {
                            return Err(protocol(
                                "a header block was interrupted by another frame",
                            ));
                        }
                        self.output.put(self.input.split_to(FRAME_HEADER));
                        self.passing = len;
                        continue;
                    }
                    if self.input.len() < FRAME_HEADER + len {
                        if len > MAX_BLOCK + 256 {
                            return Err(protocol("header frame too large"));
                        }
                        return Ok(()); // wait for the whole frame
                    }
                    self.input.advance(FRAME_HEADER);
                    let payload = self.input.split_to(len);
                    self.header_frame(kind, flags, stream, &payload)?;
                }
            }
        }
    }

    fn header_frame(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) -> io::Result<()> {
        let fragment = match (kind, self.block.as_mut()) {
            (HEADERS, None) => {
                let mut p = payload;
                let mut pad = 0;
                if flags & PADDED != 0 {
                    let (&n, rest) = p
                        .split_first()
                        .ok_or_else(|| protocol("empty padded frame"))?;
                    pad = usize::from(n);
                    p = rest;
                }
                let priority = if flags & PRIORITY != 0 {
                    let (prio, rest) = p
                        .split_at_checked(5)
                        .ok_or_else(|| protocol("short priority field"))?;
                    p = rest;
                    Some(<[u8; 5]>::try_from(prio).expect("five bytes"))
                } else {
                    None
                };
                let body = p
                    .get(
                        ..p.len()
                            .checked_sub(pad)
                            .ok_or_else(|| protocol("bad padding"))?,
                    )
                    .ok_or_else(|| protocol("bad padding"))?;
                self.block = Some(Block {
                    stream,
                    flags,
                    priority,
                    fragment: Vec::new(),
                });
                body
            }
            (CONTINUATION, Some(b)) if b.stream == stream => payload,
            _ => return Err(protocol("unexpected header frame")),
        };
        let block = self.block.as_mut().expect("set above");
        if block.fragment.len() + fragment.len() > MAX_BLOCK {
            return Err(protocol("header block too large"));
        }
        block.fragment.extend_from_slice(fragment);
        if flags & END_HEADERS != 0 {
            let block = self.block.take().expect("set above");
            self.emit(block)?;
        }
        Ok(())
    }

    /// Decodes a complete block and writes it back out, re-encoded.
    fn emit(&mut self, block: Block) -> io::Result<()> {
        check_block(&block.fragment)?;
        let decoder = &mut self.decoder;
        let fields = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            decoder.decode(&block.fragment)
        }))
        .map_err(|_| protocol("undecodable header block"))?
        .map_err(|e| protocol(&format!("bad header block: {e:?}")))?;
        let mut encoded = Vec::with_capacity(block.fragment.len() * 2);
        if let Some(p) = block.priority {
            encoded.extend_from_slice(&p);
        }
        for (name, value) in &fields {
            let value: &[u8] = if name == b":authority" && !valid_authority(value) {
                b"localhost"
            } else {
                value
            };
            encode_literal(&mut encoded, name, value);
        }
        let mut rest = &encoded[..];
        let mut first = true;
        loop {
            let n = rest.len().min(OUT_FRAME);
            let (chunk, tail) = rest.split_at(n);
            let last = tail.is_empty();
            let (kind, mut flags) = if first {
                (HEADERS, block.flags & (END_STREAM | PRIORITY))
            } else {
                (CONTINUATION, 0)
            };
            if last {
                flags |= END_HEADERS;
            }
            let len = u32::try_from(n).expect("at most OUT_FRAME");
            self.output.put_slice(&len.to_be_bytes()[1..]);
            self.output.put_u8(kind);
            self.output.put_u8(flags);
            self.output.put_u32(block.stream);
            self.output.put_slice(chunk);
            rest = tail;
            first = false;
            if last {
                return Ok(());
            }
        }
    }
}

/// Runs the inbound rewrite over `input` as if it arrived in one read: the
/// bytes the server would see, or the error that closes the connection.
pub fn process_all(input: &[u8]) -> io::Result<Vec<u8>> {
    let mut fix = AuthorityFix::new(());
    fix.input.extend_from_slice(input);
    fix.process()?;
    Ok(fix.output.to_vec())
}

fn protocol(msg: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("HTTP/2 over Unix socket: {msg}"),
    )
}

/// Whether `v` parses as a URI authority (what h2 accepts).
fn valid_authority(v: &[u8]) -> bool {
    http::uri::Authority::try_from(v).is_ok()
}

/// Checks a header block's structure before the decoder sees it: every
/// integer and string length well-formed and inside the block, indexes not
/// 0, and dynamic table size updates only at the block's start and never
/// above what envd's server announced (the decoder would otherwise grow
/// without bound, and it panics on some malformed input).
fn check_block(block: &[u8]) -> io::Result<()> {
    let bad = || protocol("malformed header block");
    let mut at = 0;
    let mut fields = 0;
    while at < block.len() {
        let b = block[at];
        let int = |prefix| decode_int(&block[at..], prefix).ok_or_else(bad);
        if b & 0x80 != 0 {
            // Indexed field.
            let (index, used) = int(7)?;
            if index == 0 {
                return Err(bad());
            }
            at += used;
        } else if b & 0xe0 == 0x20 {
            // Dynamic table size update.
            let (size, used) = int(5)?;
            if fields > 0 || size > TABLE_SIZE as u64 {
                return Err(protocol("bad dynamic table size update"));
            }
            at += used;
            continue;
        } else {
            // Literal: with incremental indexing (6-bit index) or without /
            // never indexed (4-bit index); index 0 means a literal name.
            let prefix = if b & 0x40 != 0 { 6 } else { 4 };
            let (index, used) = int(prefix)?;
            at += used;
            if index == 0 {
                at = skip_string(block, at).ok_or_else(bad)?;
            }
            at = skip_string(block, at).ok_or_else(bad)?;
        }
        fields += 1;
    }
    Ok(())
}

/// The offset after the string literal at `at` (H bit, 7-bit length, bytes).
fn skip_string(block: &[u8], at: usize) -> Option<usize> {
    let (len, used) = decode_int(block.get(at..)?, 7)?;
    let end = at
        .checked_add(used)?
        .checked_add(usize::try_from(len).ok()?)?;
    (end <= block.len()).then_some(end)
}

/// An HPACK integer with an `prefix`-bit prefix: (value, bytes used).
fn decode_int(b: &[u8], prefix: u32) -> Option<(u64, usize)> {
    let max = (1u64 << prefix) - 1;
    let first = u64::from(*b.first()?) & max;
    if first < max {
        return Some((first, 1));
    }
    let mut value = max;
    for (i, &byte) in b.iter().enumerate().skip(1).take(8) {
        value = value.checked_add(u64::from(byte & 0x7f) << (7 * (i - 1)))?;
        if byte & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

/// An HPACK integer: `first` holds the representation's flag bits.
fn encode_int(out: &mut Vec<u8>, first: u8, prefix: u32, mut v: usize) {
    let max = (1usize << prefix) - 1;
    if v < max {
        out.push(first | u8::try_from(v).expect("below the prefix max"));
        return;
    }
    out.push(first | u8::try_from(max).expect("prefix max fits"));
    v -= max;
    while v >= 0x80 {
        out.push(u8::try_from(v & 0x7f).expect("seven bits") | 0x80);
        v >>= 7;
    }
    out.push(u8::try_from(v).expect("below 0x80"));
}

/// "Literal header field without indexing, new name", no Huffman coding.
fn encode_literal(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    encode_int(out, 0x00, 7, name.len());
    out.extend_from_slice(name);
    encode_int(out, 0x00, 7, value.len());
    out.extend_from_slice(value);
}

impl<S: AsyncRead + Unpin> AsyncRead for AuthorityFix<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if !this.output.is_empty() {
                let n = this.output.len().min(buf.remaining());
                buf.put_slice(&this.output.split_to(n));
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                return Poll::Ready(Ok(()));
            }
            // Fast path: bytes that pass through untouched go straight into
            // the caller's buffer.
            if this.input.is_empty() {
                let direct = match this.mode {
                    Mode::Passthrough => buf.remaining(),
                    Mode::Frames if this.passing > 0 => this.passing.min(buf.remaining()),
                    _ => 0,
                };
                if direct > 0 {
                    let mut limited = buf.take(direct);
                    let start = limited.filled().as_ptr();
                    ready!(Pin::new(&mut this.inner).poll_read(cx, &mut limited))?;
                    if limited.filled().as_ptr() != start {
                        return Poll::Ready(Err(io::Error::other("reader swapped its buffer")));
                    }
                    let n = limited.filled().len();
                    // SAFETY: `limited` wrote (initialised) exactly `n` bytes
                    // into `buf`'s unfilled part, which it borrows.
                    unsafe { buf.assume_init(n) };
                    buf.advance(n);
                    if matches!(this.mode, Mode::Frames) {
                        this.passing -= n;
                    }
                    return Poll::Ready(Ok(()));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            let mut rb = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut rb))?;
            if rb.filled().is_empty() {
                this.eof = true;
                // Whatever was held back (a partial preface) goes out as is.
                if !matches!(this.mode, Mode::Frames) {
                    let rest = this.input.split();
                    this.output.put(rest);
                }
                continue;
            }
            this.input.extend_from_slice(rb.filled());
            this.process()?;
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<S> {
    crate::listen::delegate_writes!();

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
        v.extend_from_slice(&[kind, flags]);
        v.extend_from_slice(&stream.to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    fn run(input: &[u8]) -> io::Result<Vec<u8>> {
        process_all(input)
    }

    #[test]
    fn rewrites_a_path_authority_and_keeps_the_rest() {
        let mut enc = hpack::Encoder::new();
        let block = enc.encode(vec![
            (&b":method"[..], &b"POST"[..]),
            (b":authority", b"/run/envd.sock"),
            (b":path", b"/x"),
        ]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 1, &block));
        input.extend(frame(0x0, 0x1, 1, b"data"));
        let out = run(&input).unwrap();
        assert!(out.starts_with(PREFACE));
        let rest = &out[PREFACE.len()..];
        let len = usize::from(rest[2]) | usize::from(rest[1]) << 8;
        assert_eq!(rest[3], HEADERS);
        assert_eq!(rest[4], END_HEADERS | END_STREAM);
        let fields = hpack::Decoder::new().decode(&rest[9..9 + len]).unwrap();
        assert_eq!(fields[1], (b":authority".to_vec(), b"localhost".to_vec()));
        assert_eq!(fields[2], (b":path".to_vec(), b"/x".to_vec()));
        assert_eq!(&rest[9 + len..], &frame(0x0, 0x1, 1, b"data")[..]);
    }

    #[test]
    fn http1_passes_through() {
        let req = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
        assert_eq!(run(req).unwrap(), req);
    }

    #[test]
    fn malformed_blocks_are_refused_before_decoding() {
        // Found by fuzzing: a size update after a field, with a truncated
        // integer, made the decoder panic.
        let crash = [
            0, 0, 16, 1, 37, 0, 0, 114, 0, 126, 0, 0, 0, 126, 0, 0, 4, 1, 0, 0, 0, 18, 1, 87, 63,
            0, 18, 255, 255, 255, 255, 255,
        ];
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&crash);
        assert!(run(&input).is_err());
        // A string longer than the block.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0x40, 0x05, b'a']));
        assert!(run(&input).is_err());
    }

    #[test]
    fn huge_table_size_updates_are_refused() {
        let mut block = Vec::new();
        encode_int(&mut block, 0x20, 5, 1 << 30);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        assert!(run(&input).is_err());
    }
}
