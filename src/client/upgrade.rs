//! `envctl upgrade`: uploads a new envd binary to `POST /upgrade`, then
//! waits until envd answers again and reports which build it is.

use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Target;

/// The largest answer read from envd here.
const MAX_ANSWER: usize = 64 << 10;

/// How an upgrade went.
#[derive(Debug)]
pub struct Upgraded {
    pub before: String,
    pub after: String,
    /// From the end of the upload to the first answer of the new image.
    pub downtime: Duration,
}

/// One HTTP/1.1 exchange on a fresh connection; `Ok(None)` when envd closed
/// it without answering (what a live upgrade does).
async fn exchange(
    target: &Target,
    head: &str,
    body: &[u8],
) -> std::io::Result<Option<(u16, String)>> {
    let mut s = target.connect().await?;
    s.write_all(head.as_bytes()).await?;
    s.write_all(body).await?;
    s.flush().await?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk).await {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_ANSWER {
                    break;
                }
            }
            Err(e) if buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e),
        }
    }
    if buf.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok(Some((status, body)))
}

fn head(method: &str, path: &str, token: Option<&str>, extra: &str) -> String {
    let mut h = format!("{method} {path} HTTP/1.1\r\nHost: envd\r\nConnection: close\r\n{extra}");
    if let Some(t) = token {
        h.push_str(&format!("X-Access-Token: {t}\r\n"));
    }
    h.push_str("\r\n");
    h
}

/// The build envd reports on `/health` (its `X-Envd-Build`).
pub async fn build(target: &Target) -> Result<String, String> {
    let mut s = target
        .connect()
        .await
        .map_err(|e| format!("cannot reach envd: {e}"))?;
    s.write_all(head("GET", "/health", None, "").as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = Vec::new();
    s.take(MAX_ANSWER as u64)
        .read_to_end(&mut buf)
        .await
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&buf);
    text.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-envd-build")
                .then(|| v.trim().to_owned())
        })
        .ok_or_else(|| "envd did not say which build it is (not an envd with live upgrade?)".into())
}

/// Uploads `binary` (empty: re-execute envd's own program file) and waits
/// up to `wait` for the new image to answer.
pub async fn upgrade(
    target: &Target,
    binary: &[u8],
    token: Option<&str>,
    wait: Duration,
) -> Result<Upgraded, String> {
    let before = build(target).await?;
    let sha: String = Sha256::digest(binary)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let extra = format!(
        "Content-Length: {}\r\nContent-Type: application/octet-stream\r\nX-Envd-Upgrade-Sha256: {sha}\r\n",
        binary.len()
    );
    let answer = exchange(target, &head("POST", "/upgrade", token, &extra), binary)
        .await
        .map_err(|e| format!("upload failed: {e}"))?;
    let sent = Instant::now();
    if let Some((status, body)) = answer {
        return Err(format!(
            "envd refused the upgrade ({status}): {}",
            body.trim()
        ));
    }
    let deadline = sent + wait;
    loop {
        if let Ok(after) = build(target).await {
            return Ok(Upgraded {
                before,
                after,
                downtime: sent.elapsed(),
            });
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "envd did not answer within {wait:?} after the upgrade"
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}
