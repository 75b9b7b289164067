//! `GET /metrics`: CPU, memory and root disk usage as E2B reports them.

use std::sync::Mutex;

use http::StatusCode;

use super::{json, Rest, RestResult};
use crate::status::Error;

#[derive(Debug, Default)]
pub struct Metrics {
    /// (busy, total) jiffies at the previous call.
    last_cpu: Mutex<Option<(u64, u64)>>,
}

fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn meminfo() -> Option<(u64, u64, u64)> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let get = |k: &str| -> Option<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    let total = get("MemTotal:")?;
    let available = get("MemAvailable:")?;
    let cache = get("Cached:").unwrap_or(0) + get("Buffers:").unwrap_or(0);
    Some((total, total.saturating_sub(available), cache))
}

impl Metrics {
    /// VM-wide figures, plus envd's own and whether commands run under
    /// resource control.
    pub fn handle(&self, resource_control: bool) -> RestResult {
        let fail = || Rest::from(Error::internal("cannot read system metrics"));
        let now = cpu_jiffies().ok_or_else(fail)?;
        let pct = {
            let mut last = self.last_cpu.lock().unwrap_or_else(|e| e.into_inner());
            let prev = last.replace(now).unwrap_or((0, 0));
            let (busy, total) = (now.0.saturating_sub(prev.0), now.1.saturating_sub(prev.1));
            if total == 0 {
                0.0
            } else {
                (busy as f64 * 10000.0 / total as f64).round() / 100.0
            }
        };
        let (mem_total, mem_used, mem_cache) = meminfo().ok_or_else(fail)?;
        let disk = nix::sys::statvfs::statvfs("/").map_err(|_| fail())?;
        let frag = disk.fragment_size();
        let disk_total = disk.blocks() * frag;
        let disk_used = disk_total.saturating_sub(disk.blocks_available() * frag);
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({
                "ts": ts,
                "cpu_count": std::thread::available_parallelism().map_or(1, |n| n.get()),
                "cpu_used_pct": pct,
                "mem_total": mem_total,
                "mem_used": mem_used,
                "mem_cache": mem_cache,
                "mem_total_mib": mem_total >> 20,
                "mem_used_mib": mem_used >> 20,
                "disk_used": disk_used,
                "disk_total": disk_total,
                // envd's own version, and the upstream one it claims.
                "envd_version": env!("CARGO_PKG_VERSION"),
                "envd_build": crate::build_id::build_id(),
                "e2b_envd_version": crate::compat::claimed_text(),
                "resource_control": resource_control,
                "envd_rss_bytes": own_rss(),
            }),
        ))
    }
}

/// envd's resident memory (bytes), from /proc/self/statm.
fn own_rss() -> u64 {
    let pages = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0);
    pages * 4096
}
