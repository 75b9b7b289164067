//! `POST /init`: the orchestrator's initialisation, sent on every start and
//! resume, as upstream envd 0.6.13 takes it. All fields optional:
//! `accessToken` (set, or clear when absent), `envVars` (replace the `/init`
//! variables), `defaultUser`, `defaultWorkdir`, `timestamp` (in a VM, set the
//! clock when > 50 ms behind or > 5 s ahead; an `/init` older than one already
//! applied changes nothing), `hyperloopIP`, `caBundle`, `volumeMounts` +
//! `lifecycleID`. Every effect is idempotent: resumes repeat them all.
//!
//! Who may call it: the holder of the current token (header or body), a
//! caller whose token hashes to MMDS's `accessTokenHash` (a resumed or
//! forked sandbox gets a new token that way), or anyone while no token is set
//! and MMDS has no hash.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, StatusCode};

use super::{empty, Rest, RestResult};
use crate::auth::{Auth, Verdict, TOKEN_HEADER};
use crate::defaults::Defaults;
use crate::guest::{mmds, trust, volumes, Guest};
use crate::request_body::RequestBody;
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
    #[serde(rename = "hyperloopIP")]
    hyperloop_ip: Option<String>,
    ca_bundle: Option<String>,
    volume_mounts: Option<Vec<volumes::VolumeMount>>,
    #[serde(rename = "lifecycleID")]
    lifecycle_id: Option<String>,
}

/// Largest `/init` body from a caller that has shown no token yet although
/// one is set (the body must then carry the current token).
const UNPROVEN_LIMIT: usize = 16 << 10;
/// Largest `/init` body otherwise (a CA bundle fits).
const LIMIT: usize = 1 << 20;

/// What `/init` keeps between calls.
#[derive(Debug)]
pub struct InitState {
    guest: Arc<Guest>,
    /// One `/init` at a time; holds the newest timestamp applied (ns).
    last: tokio::sync::Mutex<Option<i128>>,
}

impl InitState {
    pub fn new(guest: Arc<Guest>) -> Self {
        Self {
            guest,
            last: tokio::sync::Mutex::new(None),
        }
    }

    pub fn guest(&self) -> &Guest {
        &self.guest
    }

    /// Holds off every `/init` while the guard lives (a live upgrade takes
    /// its snapshot meanwhile); the guard holds the newest timestamp applied.
    pub async fn hold(&self) -> tokio::sync::MutexGuard<'_, Option<i128>> {
        self.last.lock().await
    }

    /// The newest timestamp a previous envd image applied.
    pub fn restore_last(&self, ns: Option<i64>) {
        if let Ok(mut last) = self.last.try_lock() {
            *last = ns.map(i128::from);
        }
    }
}

pub async fn handle(
    req: Request<RequestBody>,
    defaults: &Defaults,
    auth: &Auth,
    state: &InitState,
) -> RestResult {
    // A right header proves the caller; a wrong one is refused before any of
    // the body is read, unless MMDS may vouch for a new token.
    let by_header = match req.headers().get(TOKEN_HEADER) {
        Some(v) if auth.is_set() => match auth.check_token(Some(v.as_bytes())) {
            Verdict::Allowed => true,
            _ if state.guest.uses_mmds() => false,
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
    let timestamp = init.timestamp.as_deref().map(parse_timestamp).transpose()?;
    // Checked before the lock: a caller MMDS must vouch for (one fetch)
    // cannot hold up the orchestrator's own /init meanwhile.
    if !authorised(&init, by_header, auth, &state.guest).await {
        return Err(unauthorized());
    }
    let mut last = state.last.lock().await;
    // The resume: whatever was frozen for the snapshot runs again.
    if let Err(e) = state.guest.freezer().thaw().await {
        tracing::warn!(error = %e, "/init could not thaw the workload");
    }
    let stale = matches!((timestamp, *last), (Some((_, t)), Some(l)) if t <= l);
    if stale {
        tracing::info!("stale /init (older timestamp than one applied): nothing changed");
    } else {
        apply(init, defaults, auth, &state.guest, timestamp).await?;
        crate::handover::crash::changed();
        if let Some((_, t)) = timestamp {
            *last = Some(t);
        }
    }
    drop(last);
    state.guest.poll_mmds();
    let mut r = empty(StatusCode::NO_CONTENT);
    let h = r.headers_mut();
    h.insert(
        "x-envd-version",
        crate::compat::claimed_text().parse().expect("valid"),
    );
    h.insert("cache-control", "no-store".parse().expect("valid"));
    Ok(r)
}

async fn authorised(init: &InitRequest, by_header: bool, auth: &Auth, guest: &Guest) -> bool {
    if by_header {
        return true;
    }
    let token = init.access_token.as_deref();
    if auth.is_set()
        && token.is_some_and(|t| auth.check_token(Some(t.as_bytes())) == Verdict::Allowed)
    {
        return true;
    }
    match guest.mmds_token_hash().await {
        Some(hash) => mmds::token_hash(token.unwrap_or("")) == hash,
        // First initialisation: no token yet and nothing in MMDS.
        None => !auth.is_set(),
    }
}

/// Checks everything, then changes things: a bad field changes nothing.
async fn apply(
    init: InitRequest,
    defaults: &Defaults,
    auth: &Auth,
    guest: &Guest,
    timestamp: Option<(prost_types::Timestamp, i128)>,
) -> Result<(), Rest> {
    let invalid = |m: String| Rest::from(Error::invalid(m));
    if let Some(envs) = &init.env_vars {
        validate_envs(envs)?;
    }
    if let Some(user) = init.default_user.as_deref().filter(|u| !u.is_empty()) {
        User::lookup(user).map_err(|e| invalid(format!("defaultUser: {}", e.message)))?;
    }
    let hyperloop = init
        .hyperloop_ip
        .as_deref()
        .map(|ip| {
            ip.parse::<std::net::IpAddr>()
                .map_err(|_| invalid(format!("hyperloopIP {ip:?} is not an IP address")))
        })
        .transpose()?;
    let ca = init
        .ca_bundle
        .as_deref()
        .filter(|b| !b.trim().is_empty())
        .map(trust::validate)
        .transpose()
        .map_err(invalid)?;
    let mounts = init.volume_mounts.unwrap_or_default();
    volumes::validate(&mounts).map_err(invalid)?;

    if let Some((ts, _)) = timestamp.as_ref().filter(|_| guest.in_vm()) {
        sync_clock(ts);
    }
    if let Some(user) = init.default_user.filter(|u| !u.is_empty()) {
        defaults.set_user(user);
    }
    if let Some(dir) = init.default_workdir.filter(|d| !d.is_empty()) {
        defaults.set_workdir(Some(dir));
    }
    if let Some(envs) = init.env_vars {
        defaults.set_envs(envs);
    }
    auth.set(init.access_token);
    if let Some(ip) = hyperloop {
        guest.set_events_address(ip).map_err(invalid)?;
    }
    if let Some(pem) = ca {
        guest.install_ca(&pem).map_err(invalid)?;
    }
    if !mounts.is_empty() {
        guest
            .mount_volumes(init.lifecycle_id.as_deref(), &mounts)
            .await
            .map_err(invalid)?;
    }
    tracing::info!(token_set = auth.is_set(), "initialised by /init");
    Ok(())
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

/// An RFC 3339 timestamp, and the same in nanoseconds since the epoch.
fn parse_timestamp(ts: &str) -> Result<(prost_types::Timestamp, i128), Rest> {
    let t: prost_types::Timestamp = ts
        .parse()
        .map_err(|_| Rest::from(Error::invalid(format!("timestamp {ts:?} is not RFC 3339"))))?;
    let ns = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    Ok((t, ns))
}

/// Sets the wall clock to `t` when it is > 50 ms behind or > 5 s ahead.
fn sync_clock(t: &prost_types::Timestamp) {
    let Some(target) = UNIX_EPOCH.checked_add(Duration::new(
        u64::try_from(t.seconds).unwrap_or(0),
        u32::try_from(t.nanos).unwrap_or(0).min(999_999_999),
    )) else {
        return;
    };
    let now = SystemTime::now();
    let behind = target.duration_since(now).unwrap_or_default();
    let ahead = now.duration_since(target).unwrap_or_default();
    if behind <= Duration::from_millis(50) && ahead <= Duration::from_secs(5) {
        return;
    }
    let spec = nix::sys::time::TimeSpec::new(t.seconds, i64::from(t.nanos));
    match nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, spec) {
        Ok(()) => tracing::info!(?behind, ?ahead, "clock set by /init"),
        Err(e) => tracing::warn!(error = %e, "cannot set the clock"),
    }
}
