//! What a request carries besides its message: who asks, how often they want
//! keepalives, and until when. Parsed from HTTP headers (gRPC metadata and
//! Connect headers are both plain headers), so every protocol adapter shares it.

use std::time::Duration;

use base64::Engine;
use http::HeaderMap;
use tokio::time::Instant;

use crate::defaults::Defaults;
use crate::status::{Error, Result};
use crate::users::User;

/// The keepalive interval when the client does not ask for one (E2B's default).
pub const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(90);

/// Per-request facts shared by all services.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub user: User,
    pub keepalive: Duration,
    /// From `connect-timeout-ms` or `grpc-timeout` (the earlier of the two).
    pub deadline: Option<Instant>,
    /// What the answer holds of the budget for large answers (a listing
    /// grows it as it reads; see [`crate::answers`]).
    pub answer: crate::answers::Share,
}

impl RequestContext {
    /// The context of a request with `headers`, whose answer is counted in
    /// `answer` (the share the router gave the request).
    pub fn from_headers(
        headers: &HeaderMap,
        defaults: &Defaults,
        answer: crate::answers::Share,
    ) -> Result<Self> {
        let user = match headers.get(http::header::AUTHORIZATION) {
            Some(v) => User::lookup(&basic_user(v.as_bytes())?)?,
            None => User::lookup(&defaults.user())?,
        };
        Ok(Self {
            user,
            keepalive: keepalive(headers)?,
            deadline: deadline(headers)?,
            answer,
        })
    }
}

/// When the request's time budget runs out (see [`timeout`]); a timeout too
/// far away to represent is no deadline at all.
pub fn deadline(headers: &HeaderMap) -> Result<Option<Instant>> {
    Ok(timeout(headers)?.and_then(|t| Instant::now().checked_add(t)))
}

/// `Authorization: Basic base64("<user>:<ignored>")` → user name.
fn basic_user(value: &[u8]) -> Result<String> {
    let bad = || Error::unauthenticated("authorization header is not 'Basic base64(user:)'");
    let text = std::str::from_utf8(value).map_err(|_| bad())?;
    let (scheme, b64) = text.trim().split_once(' ').ok_or_else(bad)?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(bad());
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let name = raw.split_once(':').map_or(raw.as_str(), |(u, _)| u);
    Ok(name.to_owned())
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.trim()))
            .map_err(|_| Error::invalid(format!("header {name} is not ASCII"))),
    }
}

/// `keepalive-ping-interval: <seconds>`, a positive integer.
fn keepalive(headers: &HeaderMap) -> Result<Duration> {
    const NAME: &str = "keepalive-ping-interval";
    let Some(v) = header_str(headers, NAME)? else {
        return Ok(DEFAULT_KEEPALIVE);
    };
    match v.parse::<u64>() {
        Ok(secs) if secs > 0 && secs <= 86_400 => Ok(Duration::from_secs(secs)),
        _ => Err(Error::invalid(format!(
            "{NAME} must be a whole number of seconds between 1 and 86400, got {v:?}"
        ))),
    }
}

/// The request's time budget: `connect-timeout-ms` (Connect) and `grpc-timeout`
/// (gRPC). `connect-timeout-ms: 0` means no limit, as E2B's SDKs use it.
fn timeout(headers: &HeaderMap) -> Result<Option<Duration>> {
    let connect = match header_str(headers, "connect-timeout-ms")? {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(ms) => Some(Duration::from_millis(ms)),
            Err(_) => {
                return Err(Error::invalid(format!(
                    "connect-timeout-ms must be a whole number of milliseconds, got {v:?}"
                )))
            }
        },
    };
    let grpc = match header_str(headers, "grpc-timeout")? {
        None => None,
        Some(v) => Some(
            parse_grpc_timeout(v)
                .ok_or_else(|| Error::invalid(format!("grpc-timeout is malformed: {v:?}")))?,
        ),
    };
    Ok(match (connect, grpc) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// gRPC's `TimeoutValue TimeoutUnit`: up to 8 digits and one of H M S m u n.
fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (digits, unit) = v.split_at(v.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn basic_auth_user() {
        // base64("user:")
        assert_eq!(basic_user(b"Basic dXNlcjo=").unwrap(), "user");
        assert!(basic_user(b"Bearer abc").is_err());
        assert!(basic_user(b"Basic !!!").is_err());
    }

    #[test]
    fn keepalive_validation() {
        assert_eq!(keepalive(&headers(&[])).unwrap(), DEFAULT_KEEPALIVE);
        let ok = headers(&[("keepalive-ping-interval", "5")]);
        assert_eq!(keepalive(&ok).unwrap(), Duration::from_secs(5));
        for bad in ["0", "-1", "abc", ""] {
            let h = headers(&[("keepalive-ping-interval", bad)]);
            assert!(keepalive(&h).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn timeouts() {
        assert_eq!(timeout(&headers(&[])).unwrap(), None);
        let h = headers(&[("connect-timeout-ms", "0")]);
        assert_eq!(timeout(&h).unwrap(), None);
        let h = headers(&[("connect-timeout-ms", "1500"), ("grpc-timeout", "1S")]);
        assert_eq!(timeout(&h).unwrap(), Some(Duration::from_secs(1)));
        assert!(timeout(&headers(&[("grpc-timeout", "10x")])).is_err());
        assert!(timeout(&headers(&[("connect-timeout-ms", "soon")])).is_err());
    }
}
