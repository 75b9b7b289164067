//! Freezing the workload cgroups before a snapshot (`POST /freeze`), thawing
//! them on `/unfreeze` and on every `/init` (the resume), and a watchdog that
//! thaws a freeze nobody undid, so a lost `/unfreeze` cannot leave the
//! sandbox frozen for good. One lock serialises all of them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Cgroups, Kind};

/// A freeze no thaw followed within this long is undone (upstream: 10 min).
pub const DEFAULT_WATCHDOG: Duration = Duration::from_secs(600);
/// The longest a `/freeze` waits for the workload to stop.
pub const MAX_WAIT: Duration = Duration::from_secs(60);

/// How many cgroups a legacy freeze covers ([`Kind::ALL`]).
const WORKLOAD_CGROUPS: u32 = 2;

/// Upstream's `FreezeResult` (legacy mode: the user and ptys cgroups).
#[derive(Debug, Default, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FreezeResult {
    pub mode: &'static str,
    pub requested: u32,
    pub frozen: u32,
    pub not_frozen: u32,
    pub failed: u32,
    pub vanished: u32,
    pub unobservable: u32,
    pub pre_frozen: u32,
    pub visited: u32,
    pub allowlisted: u32,
    pub truncated: bool,
    pub sweep_ms: u64,
    pub wait_ms: u64,
}

#[derive(Debug)]
pub struct Freezer {
    cgroups: Option<Arc<Cgroups>>,
    /// Serialises freeze and thaw; counts freezes for the watchdog.
    generation: tokio::sync::Mutex<u64>,
    watchdog: Duration,
}

impl Freezer {
    pub fn new(cgroups: Option<Arc<Cgroups>>, watchdog: Duration) -> Arc<Self> {
        Arc::new(Self {
            cgroups,
            generation: tokio::sync::Mutex::new(0),
            watchdog,
        })
    }

    /// Freezes the workload and waits up to `wait` for it to stop.
    pub async fn freeze(self: &Arc<Self>, wait: Duration) -> FreezeResult {
        let mut generation = self.generation.lock().await;
        *generation += 1;
        let mut result = FreezeResult {
            mode: "legacy",
            requested: WORKLOAD_CGROUPS,
            visited: WORKLOAD_CGROUPS,
            ..Default::default()
        };
        let Some(cg) = &self.cgroups else {
            result.unobservable = result.requested;
            return result;
        };
        let sweep = Instant::now();
        let mut pending = Vec::new();
        for kind in Kind::ALL {
            let dir = cg.path(kind);
            if frozen(&dir) == Some(true) {
                result.pre_frozen += 1;
            }
            match std::fs::write(dir.join("cgroup.freeze"), "1") {
                Ok(()) => pending.push(dir),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => result.vanished += 1,
                Err(e) => {
                    tracing::warn!(cgroup = kind.dir(), error = %e, "cannot freeze");
                    result.failed += 1;
                }
            }
        }
        result.sweep_ms = ms(sweep.elapsed());
        let waited = Instant::now();
        let deadline = waited + wait.min(MAX_WAIT);
        loop {
            pending.retain(|dir| frozen(dir) != Some(true));
            if pending.is_empty() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        result.wait_ms = ms(waited.elapsed());
        result.not_frozen = u32::try_from(pending.len()).unwrap_or(u32::MAX);
        result.frozen = result
            .requested
            .saturating_sub(result.not_frozen + result.failed + result.vanished);
        self.arm_watchdog(*generation);
        tracing::info!(?result, "workload frozen");
        result
    }

    /// Thaws the workload (a no-op when it is not frozen).
    pub async fn thaw(&self) -> Result<(), String> {
        let mut generation = self.generation.lock().await;
        *generation += 1;
        self.thaw_locked()
    }

    fn thaw_locked(&self) -> Result<(), String> {
        let Some(cg) = &self.cgroups else {
            return Ok(());
        };
        let mut errors = Vec::new();
        for kind in Kind::ALL {
            match std::fs::write(cg.path(kind).join("cgroup.freeze"), "0") {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => errors.push(format!("thaw {}: {e}", kind.dir())),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// After the window, thaws unless a later freeze or thaw happened.
    fn arm_watchdog(self: &Arc<Self>, armed: u64) {
        let me = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(me.watchdog).await;
            let generation = me.generation.lock().await;
            if *generation == armed {
                tracing::warn!(window = ?me.watchdog, "thaw watchdog: a freeze was never followed by a thaw; thawing");
                if let Err(e) = me.thaw_locked() {
                    tracing::error!(error = %e, "thaw watchdog failed");
                }
            }
        });
    }
}

/// `frozen` from `cgroup.events`; `None` when unreadable.
fn frozen(dir: &std::path::Path) -> Option<bool> {
    let events = std::fs::read_to_string(dir.join("cgroup.events")).ok()?;
    events
        .lines()
        .find_map(|l| l.strip_prefix("frozen "))
        .map(|v| v.trim() == "1")
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
