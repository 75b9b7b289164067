//! `POST /init`: the orchestrator's initialisation. All fields optional:
//! `accessToken` (set, or clear when absent), `envVars` (replace the global
//! set), `defaultUser`, `defaultWorkdir`, `timestamp` (set the clock when it is
//! more than 50 ms behind or 5 s ahead).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::{empty, Rest, RestResult, ENVD_VERSION};
use crate::auth::{Auth, Verdict, TOKEN_HEADER};
use crate::defaults::Defaults;
use crate::status::Error;
use crate::users::User;

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct InitRequest {
    access_token: Option<String>,
    env_vars: Option<BTreeMap<String, String>>,
    default_user: Option<String>,
    default_workdir: Option<String>,
    timestamp: Option<String>,
}

/// Largest `/init` body from a caller that has shown no token yet although
/// one is set (the body must then carry the current token).
const UNPROVEN_LIMIT: usize = 16 << 10;
/// Largest `/init` body otherwise.
const LIMIT: usize = 1 << 20;

pub async fn handle(req: Request<Incoming>, defaults: &Defaults, auth: &Auth) -> RestResult {
    // Once a token is set, only its holder may re-initialise: by header, or by
    // sending the same token again in the body. A wrong header is refused
    // before any of the body is read; without one, only a small body is read.
    let by_header = match req.headers().get(TOKEN_HEADER) {
        Some(v) if auth.is_set() => match auth.check_token(Some(v.as_bytes())) {
            Verdict::Allowed => true,
            _ => return Err(unauthorized()),
        },
        _ => false,
    };
    let limit = if auth.is_set() && !by_header {
        UNPROVEN_LIMIT
    } else {
        LIMIT
    };
    let body = super::read_json_body(req.into_body(), limit).await?;
    let init: InitRequest = if body.iter().all(u8::is_ascii_whitespace) {
        InitRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Rest::from(Error::invalid(format!("bad JSON: {e}"))))?
    };
    if auth.is_set() && !by_header {
        let by_body = init
            .access_token
            .as_deref()
            .is_some_and(|t| auth.check_token(Some(t.as_bytes())) == Verdict::Allowed);
        if !by_body {
            return Err(unauthorized());
        }
    }
    if let Some(envs) = &init.env_vars {
        validate_envs(envs)?;
    }
    if let Some(user) = init.default_user.as_deref().filter(|u| !u.is_empty()) {
        User::lookup(user)
            .map_err(|e| Rest::from(Error::invalid(format!("defaultUser: {}", e.message))))?;
        defaults.set_user(user.to_owned());
    }
    if let Some(dir) = init.default_workdir.filter(|d| !d.is_empty()) {
        defaults.set_workdir(Some(dir));
    }
    if let Some(envs) = init.env_vars {
        defaults.set_envs(envs);
    }
    if let Some(ts) = init.timestamp.as_deref() {
        sync_clock(ts)?;
    }
    auth.set(init.access_token);
    tracing::info!(token_set = auth.is_set(), "initialised by /init");
    let mut r = empty(StatusCode::NO_CONTENT);
    r.headers_mut()
        .insert("x-envd-version", ENVD_VERSION.parse().expect("valid"));
    Ok(r)
}

fn unauthorized() -> Rest {
    Rest::from(Error::unauthenticated(
        "unauthorized: /init needs the current access token",
    ))
}

/// Names must be non-empty, without `=` or NUL; values without NUL (execve
/// could not pass them, and every later Start would fail).
fn validate_envs(envs: &BTreeMap<String, String>) -> Result<(), Rest> {
    for (k, v) in envs {
        let bad = if k.is_empty() {
            Some("an empty name")
        } else if k.contains('=') {
            Some("'=' in its name")
        } else if k.contains('\0') || v.contains('\0') {
            Some("a NUL byte")
        } else {
            None
        };
        if let Some(why) = bad {
            return Err(Rest::from(Error::invalid(format!(
                "envVars: variable {k:?} has {why}"
            ))));
        }
    }
    Ok(())
}

/// Sets the wall clock to `ts` (RFC 3339) when it is > 50 ms behind or > 5 s ahead.
fn sync_clock(ts: &str) -> Result<(), Rest> {
    let t: prost_types::Timestamp = ts
        .parse()
        .map_err(|_| Rest::from(Error::invalid(format!("timestamp {ts:?} is not RFC 3339"))))?;
    let target = UNIX_EPOCH
        .checked_add(Duration::new(
            u64::try_from(t.seconds).unwrap_or(0),
            u32::try_from(t.nanos).unwrap_or(0).min(999_999_999),
        ))
        .ok_or_else(|| Rest::from(Error::invalid(format!("timestamp {ts:?} is out of range"))))?;
    let now = SystemTime::now();
    let behind = target.duration_since(now).unwrap_or_default();
    let ahead = now.duration_since(target).unwrap_or_default();
    if behind <= Duration::from_millis(50) && ahead <= Duration::from_secs(5) {
        return Ok(());
    }
    let spec = nix::sys::time::TimeSpec::new(t.seconds, i64::from(t.nanos));
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec) {
        Ok(()) => tracing::info!(?behind, ?ahead, "clock set by /init"),
        Err(e) => tracing::warn!(error = %e, "cannot set the clock"),
    }
    Ok(())
}
