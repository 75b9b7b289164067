//! A tiny raw HTTP/1.1 client for protocol tests: full control of the bytes
//! sent (bad framing included), responses read to EOF and de-chunked.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
    /// Connect envelopes of a streaming reply: (flags, payload).
    pub fn envelopes(&self) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut b = &self.body[..];
        while b.len() >= 5 {
            let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
            out.push((b[0], b[5..5 + len].to_vec()));
            b = &b[5 + len..];
        }
        assert!(b.is_empty(), "trailing bytes after envelopes");
        out
    }
}

/// `tcp://127.0.0.1:port` → `127.0.0.1:port`
pub fn addr(url: &str) -> &str {
    url.strip_prefix("tcp://").unwrap()
}

/// Sends a request (`Connection: close` is added) and reads the reply.
pub fn request(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    request_paused(url, method, path, headers, body, None)
}

/// As [`request`], but with a pause of 300 ms after the first `pause_at`
/// bytes of the body: a server that answers before reading the rest must
/// still let the client send it and read the answer.
pub fn request_paused(
    url: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    pause_at: Option<usize>,
) -> Reply {
    let mut s = TcpStream::connect(addr(url)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nhost: envd\r\nconnection: close\r\n");
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v == &"chunked");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !chunked {
        head.push_str(&format!("content-length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    if chunked {
        if !body.is_empty() {
            s.write_all(format!("{:x}\r\n", body.len()).as_bytes())
                .unwrap();
            s.write_all(body).unwrap();
            s.write_all(b"\r\n").unwrap();
        }
        s.write_all(b"0\r\n\r\n").unwrap();
    } else {
        let (first, rest) = body.split_at(pause_at.unwrap_or(body.len()));
        s.write_all(first).unwrap();
        if !rest.is_empty() {
            std::thread::sleep(Duration::from_millis(300));
            s.write_all(rest).unwrap();
        }
    }
    read_reply(&mut s)
}

/// POSTs a JSON body.
pub fn post_json(url: &str, path: &str, body: &str) -> Reply {
    request(
        url,
        "POST",
        path,
        &[("content-type", "application/json")],
        body.as_bytes(),
    )
}

/// Reads a reply's head, up to and with its blank line, a byte at a time
/// (what follows stays unread); the connection must not end before it.
pub fn read_head(s: &mut impl Read) -> Vec<u8> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "connection closed mid-head");
        head.push(byte[0]);
    }
    head
}

pub fn read_reply(s: &mut TcpStream) -> Reply {
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    parse(&raw)
}

pub fn parse(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no header end");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"))
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line_end = b.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(
            std::str::from_utf8(&b[..line_end])
                .unwrap()
                .split(';')
                .next()
                .unwrap()
                .trim(),
            16,
        )
        .unwrap();
        b = &b[line_end + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// One Connect envelope.
pub fn envelope(flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut v = vec![flags];
    v.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// An HTTP/2 connection (prior knowledge) to envd's TCP listener `url`,
/// driven in the background; requests go through the returned sender.
pub async fn http2<B>(url: &str) -> hyper::client::conn::http2::SendRequest<B>
where
    B: http_body::Body + Unpin + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = tokio::net::TcpStream::connect(addr(url)).await.unwrap();
    let (send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    send
}
