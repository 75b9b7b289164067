//! The orchestrator's pause endpoints (upstream's `x-internal` routes):
//! `/freeze` and `/unfreeze` (the workload cgroups), `/fsfreeze` and
//! `/fsthaw` (the root filesystem), `/collapse` (envd's own heap). Freezing
//! anything is refused outside a sandbox VM, so a developer's machine is
//! never frozen.

use std::time::Duration;

use http::StatusCode;

use super::{empty, json, Query, Rest, RestResult};
use crate::guest::{fsfreeze, Guest};

/// The filesystem a filesystem-only snapshot keeps.
const ROOTFS: &str = "/";

fn refuse_outside_vm(guest: &Guest, what: &str) -> Result<(), Rest> {
    if guest.in_vm() {
        Ok(())
    } else {
        Err(Rest::http(
            StatusCode::FORBIDDEN,
            format!("{what} is refused: envd is not in a sandbox VM (start it with --vm)"),
        ))
    }
}

/// `POST /freeze?maxWaitMs=N&mode=legacy|hierarchy&maxCgroups=N`: 200 with
/// a `FreezeResult` when `maxWaitMs` > 0, else 204. envd freezes the legacy
/// set (user and ptys) in either mode and says so in `mode`.
pub async fn freeze(guest: &Guest, q: &Query) -> RestResult {
    refuse_outside_vm(guest, "/freeze")?;
    let wait_ms = match q.get("maxWaitMs").filter(|v| !v.is_empty()) {
        None => 0,
        Some(v) => v.parse::<u64>().map_err(|_| {
            Rest::http(
                StatusCode::BAD_REQUEST,
                format!("Invalid format for parameter maxWaitMs: {v:?}"),
            )
        })?,
    };
    let result = guest.freezer().freeze(Duration::from_millis(wait_ms)).await;
    if wait_ms == 0 {
        return Ok(no_store(empty(StatusCode::NO_CONTENT)));
    }
    Ok(no_store(json(StatusCode::OK, &result)))
}

/// `POST /unfreeze`: thaws the workload.
pub async fn unfreeze(guest: &Guest) -> RestResult {
    refuse_outside_vm(guest, "/unfreeze")?;
    guest
        .freezer()
        .thaw()
        .await
        .map_err(|e| Rest::http(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(no_store(empty(StatusCode::NO_CONTENT)))
}

/// `POST /fsfreeze` and `POST /fsthaw`.
pub async fn fsfreeze(guest: &Guest, freeze: bool) -> RestResult {
    let what = if freeze { "/fsfreeze" } else { "/fsthaw" };
    refuse_outside_vm(guest, what)?;
    let _one_at_a_time = guest.fs_lock().lock().await;
    crate::threads::run("fsfreeze", move || fsfreeze::set_frozen(ROOTFS, freeze))
        .await
        .map_err(Rest::from)?
        .map_err(|e| Rest::http(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}")))?;
    tracing::info!(
        "{what}: root filesystem {}",
        if freeze { "frozen" } else { "thawed" }
    );
    Ok(no_store(empty(StatusCode::NO_CONTENT)))
}

/// `POST /collapse`: a `CollapseResult`.
pub async fn collapse() -> RestResult {
    let result = crate::threads::run("collapse", crate::memory::collapse_self)
        .await
        .map_err(Rest::from)?
        .map_err(|e| Rest::http(StatusCode::INTERNAL_SERVER_ERROR, format!("/collapse: {e}")))?;
    tracing::info!(?result, "envd heap collapsed");
    Ok(no_store(json(StatusCode::OK, &result)))
}

fn no_store(mut r: http::Response<crate::wire::HttpBody>) -> http::Response<crate::wire::HttpBody> {
    r.headers_mut()
        .insert("cache-control", "no-store".parse().expect("valid"));
    r
}
