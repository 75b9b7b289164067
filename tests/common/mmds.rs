//! A stand-in for Firecracker's MMDS on loopback, as E2B's orchestrator fills
//! it: `PUT /latest/api/token` gives a session token, `GET /` with it the
//! JSON document. The document can change while envd runs (a resume).

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

const SESSION: &str = "mmds-session-token";

pub struct FakeMmds {
    /// `127.0.0.1:PORT`, for `--mmds-address`.
    pub addr: String,
    doc: Arc<Mutex<serde_json::Value>>,
}

impl FakeMmds {
    pub fn start(doc: serde_json::Value) -> FakeMmds {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let doc = Arc::new(Mutex::new(doc));
        let d = doc.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut s) = conn else { continue };
                let mut raw = Vec::new();
                let mut buf = [0u8; 4096];
                while !raw.windows(4).any(|w| w == b"\r\n\r\n") && raw.len() < 65536 {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => raw.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
                let first = head.lines().next().unwrap_or("").to_owned();
                let (status, body) = if first.starts_with("put /latest/api/token")
                    && head.contains("x-metadata-token-ttl-seconds:")
                {
                    ("200 OK", SESSION.to_owned())
                } else if first.starts_with("get / ")
                    && head.contains(&format!("x-metadata-token: {SESSION}"))
                {
                    ("200 OK", d.lock().unwrap().to_string())
                } else {
                    ("401 Unauthorized", String::new())
                };
                let _ = write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        FakeMmds { addr, doc }
    }

    pub fn set(&self, key: &str, value: &str) {
        self.doc.lock().unwrap()[key] = serde_json::Value::String(value.to_owned());
    }
}

/// `sha512_hex(token)`, as E2B puts access tokens in MMDS.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha512};
    Sha512::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
