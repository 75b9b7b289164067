//! Firecracker's metadata service (MMDS), as E2B's orchestrator fills it:
//! the sandbox's identity and the hash of the access token a resumed (or
//! forked) sandbox may be re-initialised with. IMDSv2-style: `PUT
//! /latest/api/token` for a session token, then `GET /` with it.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;

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
        Method::PUT,
        "/latest/api/token",
        &[("x-metadata-token-ttl-seconds", "60")],
    )
    .await?;
    let token =
        String::from_utf8(token.to_vec()).map_err(|_| "MMDS token is not text".to_owned())?;
    if token.trim().is_empty() {
        return Err("MMDS token is empty".into());
    }
    let body = call(
        addr,
        Method::GET,
        "/",
        &[
            ("x-metadata-token", token.trim()),
            ("accept", "application/json"),
        ],
    )
    .await?;
    serde_json::from_slice(&body).map_err(|e| format!("MMDS answer is not the expected JSON: {e}"))
}

async fn call(
    addr: &str,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<Bytes, String> {
    let authority = if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("{addr}:80")
    };
    let stream = tokio::time::timeout(
        REQUEST_TIMEOUT,
        tokio::net::TcpStream::connect(authority.as_str()),
    )
    .await
    .map_err(|_| format!("MMDS at {authority}: connect timed out"))?
    .map_err(|e| format!("MMDS at {authority}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("MMDS at {authority}: {e}"))?;
    let conn = tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| format!("MMDS request: {e}"))?;
    let result = async {
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, sender.send_request(req))
            .await
            .map_err(|_| format!("MMDS at {authority}: no answer"))?
            .map_err(|e| format!("MMDS at {authority}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!(
                "MMDS at {authority}: {path} answered {}",
                resp.status()
            ));
        }
        let body = Limited::new(resp.into_body(), MAX_ANSWER);
        tokio::time::timeout(REQUEST_TIMEOUT, body.collect())
            .await
            .map_err(|_| format!("MMDS at {authority}: answer too slow"))?
            .map(|b| b.to_bytes())
            .map_err(|e| format!("MMDS at {authority}: {e}"))
    }
    .await;
    conn.abort();
    result
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
