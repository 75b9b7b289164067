//! Firecracker's metadata service (MMDS), as E2B's orchestrator fills it:
//! the sandbox's identity and the hash of the access token a resumed (or
//! forked) sandbox may be re-initialised with. IMDSv2-style: `PUT
//! /latest/api/token` for a session token, then `GET /` with it.

use std::time::Duration;

/// One MMDS request may take this long, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest MMDS answer read.
const MAX_ANSWER: usize = 64 << 10;

/// What envd reads from MMDS (other fields are ignored).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct MmdsOpts {
    #[serde(rename = "instanceID")]
    pub instance_id: String,
    #[serde(rename = "envID")]
    pub env_id: String,
    #[serde(rename = "teamID")]
    pub team_id: String,
    /// The log collector's address; non-empty once the orchestrator has
    /// filled MMDS.
    pub address: String,
    /// `sha512_hex(token)` of the token `/init` may set (hash of "" allows
    /// clearing it); empty when MMDS carries none.
    pub access_token_hash: String,
}

/// Reads MMDS at `addr` (`host` or `host:port`).
pub async fn fetch(addr: &str) -> Result<MmdsOpts, String> {
    tokio::time::timeout(REQUEST_TIMEOUT * 2, fetch_inner(addr))
        .await
        .map_err(|_| format!("MMDS at {addr} did not answer in time"))?
}

async fn fetch_inner(addr: &str) -> Result<MmdsOpts, String> {
    let token = call(
        addr,
        "PUT",
        "/latest/api/token",
        &[("x-metadata-token-ttl-seconds", "60")],
    )
    .await?;
    let token = String::from_utf8(token).map_err(|_| "MMDS token is not text".to_owned())?;
    if token.trim().is_empty() {
        return Err("MMDS token is empty".into());
    }
    let body = call(
        addr,
        "GET",
        "/",
        &[
            ("x-metadata-token", token.trim()),
            ("accept", "application/json"),
        ],
    )
    .await?;
    serde_json::from_slice(&body).map_err(|e| format!("MMDS answer is not the expected JSON: {e}"))
}

/// One HTTP/1.0 exchange (the connection closes after it): MMDS answers
/// with a small body, so a bounded read to EOF is all the client needed.
async fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let authority = if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("{addr}:80")
    };
    let fail = |e: &dyn std::fmt::Display| format!("MMDS at {authority}: {e}");
    let mut stream = tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio::net::TcpStream::connect(authority.as_str()),
    )
    .await
    .map_err(|_| fail(&"connect timed out"))?
    .map_err(|e| fail(&e))?;
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: 0\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    let mut answer = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, async {
        stream.write_all(request.as_bytes()).await?;
        (&mut stream)
            .take(MAX_ANSWER as u64 + 1)
            .read_to_end(&mut answer)
            .await
    })
    .await
    .map_err(|_| fail(&"no answer in time"))?
    .map_err(|e| fail(&e))?;
    if answer.len() > MAX_ANSWER {
        return Err(fail(&"answer too large"));
    }
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| fail(&"malformed answer"))?;
    let head = String::from_utf8_lossy(&answer[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| fail(&"malformed status line"))?;
    if !(200..300).contains(&status) {
        return Err(fail(&format!("{path} answered {status}")));
    }
    let mut body = answer.split_off(split + 4);
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        if k.trim().eq_ignore_ascii_case("content-length") {
            v.trim().parse::<usize>().ok()
        } else {
            None
        }
    });
    if let Some(n) = length {
        body.truncate(n);
    }
    Ok(body)
}

/// `sha512_hex(token)`, as E2B hashes access tokens for MMDS.
pub fn token_hash(token: &str) -> String {
    use sha2::{Digest, Sha512};
    let digest = Sha512::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_hash_is_sha512_hex() {
        assert_eq!(
            super::token_hash(""),
            "cf83e1357eefb8bdf1542850d66d8007d620e4050b5715dc83f4a921d36ce9ce\
             47d0d13c5d85f2b0ff8318d2877eec2f63b931bd47417a81a538327af927da3e"
        );
    }
}
