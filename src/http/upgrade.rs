//! `POST /upgrade`: E2B's live-upgrade trigger (envd 0.6.12). The body is the
//! new envd binary (empty: re-execute the program envd was started from);
//! `X-Envd-Upgrade-Sha256`, when sent, must be its lowercase hex SHA-256.
//! On success envd replaces its image and never answers (the connection
//! drops, which E2B's orchestrator takes as the swap); any refusal is
//! answered with an error and the old image carries on.
//!
//! The binary is kept in a memfd, never written to the guest's disk, so
//! upstream's `X-Envd-Upgrade-Bin` path is accepted and ignored.

use std::io::Write;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use super::{Rest, RestResult};
use crate::handover::{memfd, Image, Upgrader};
use crate::request_body::RequestBody;

/// Largest binary accepted.
pub const MAX_BINARY: u64 = 256 << 20;
/// The whole binary must arrive within this time.
const BODY_TIMEOUT: Duration = Duration::from_secs(300);
pub const SHA256_HEADER: &str = "x-envd-upgrade-sha256";

pub async fn handle(req: Request<RequestBody>, upgrader: &Upgrader) -> RestResult {
    let one = upgrader
        .begin()
        .map_err(|e| Rest::http(StatusCode::CONFLICT, e.message))?;
    let want = match req.headers().get(SHA256_HEADER) {
        None => None,
        Some(v) => Some(parse_sha256(v.as_bytes()).ok_or_else(|| {
            Rest::http(
                StatusCode::BAD_REQUEST,
                "X-Envd-Upgrade-Sha256 must be 64 lowercase hex digits",
            )
        })?),
    };
    let image = tokio::time::timeout(BODY_TIMEOUT, receive(req.into_body(), want))
        .await
        .map_err(|_| {
            Rest::http(
                StatusCode::REQUEST_TIMEOUT,
                format!("the binary did not arrive within {BODY_TIMEOUT:?}"),
            )
        })??;
    match upgrader.upgrade_holding(one, image).await {
        Ok(never) => match never {},
        Err(e) => Err(Rest::from(e)),
    }
}

/// The body into a memfd, checked against `want`.
async fn receive(mut body: RequestBody, want: Option<[u8; 32]>) -> Result<Image, Rest> {
    let mut file = memfd::create(c"envd-upgrade")
        .map_err(|e| Rest::from(crate::status::Error::io("create a memfd", &e)))?;
    let mut hash = Sha256::new();
    let mut total = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| Rest::http(StatusCode::BAD_REQUEST, format!("reading the binary: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len() as u64;
        if total > MAX_BINARY {
            return Err(Rest::http(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the binary exceeds {MAX_BINARY} bytes"),
            ));
        }
        hash.update(&data);
        file.write_all(&data)
            .map_err(|e| Rest::from(crate::status::Error::io("store the binary", &e)))?;
    }
    if let Some(want) = want {
        if hash.finalize().as_slice() != want {
            return Err(Rest::http(
                StatusCode::BAD_REQUEST,
                "the binary does not match X-Envd-Upgrade-Sha256",
            ));
        }
    }
    if total == 0 {
        return Ok(Image::OnDisk);
    }
    Ok(Image::Uploaded(file.into()))
}

fn parse_sha256(v: &[u8]) -> Option<[u8; 32]> {
    if v.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; 32];
    for (i, pair) in v.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sha256_header() {
        let ok = "00ff".repeat(16);
        assert_eq!(super::parse_sha256(ok.as_bytes()).unwrap()[1], 0xff);
        for bad in ["", "00", &"0F".repeat(32), &"g0".repeat(32)] {
            assert!(super::parse_sha256(bad.as_bytes()).is_none(), "{bad}");
        }
    }
}
