//! A command's limits (`StartRequest.limits`, or envd's defaults) as the
//! cgroup files that carry them. Bad values are INVALID_ARGUMENT; a limit
//! the hierarchy cannot carry (its controller is not enabled) is
//! FAILED_PRECONDITION, never silently dropped.

use std::path::Path;

use crate::proto::process::ResourceLimits;
use crate::status::{Error, Result};

/// The CPU period cpu.max is written with (µs).
const CPU_PERIOD_US: u64 = 100_000;
/// Smallest memory limit accepted (a shell needs more than this anyway).
const MIN_MEMORY: u64 = 1 << 20;

/// Whether `limits` asks for anything.
pub fn any(limits: &ResourceLimits) -> bool {
    limits.memory_max.is_some()
        || limits.swap_max.is_some()
        || limits.cpu.is_some()
        || limits.pids_max.is_some()
        || limits.io_weight.is_some()
}

/// `request` over `defaults`, field by field.
pub fn merged(request: Option<&ResourceLimits>, defaults: &ResourceLimits) -> ResourceLimits {
    let r = request.cloned().unwrap_or_default();
    ResourceLimits {
        memory_max: r.memory_max.or(defaults.memory_max),
        swap_max: r.swap_max.or(defaults.swap_max),
        cpu: r.cpu.or(defaults.cpu),
        pids_max: r.pids_max.or(defaults.pids_max),
        io_weight: r.io_weight.or(defaults.io_weight),
    }
}

/// The (file, value, controller) writes for `limits`, checked.
pub fn files(limits: &ResourceLimits) -> Result<Vec<(&'static str, String, &'static str)>> {
    let mut out = Vec::new();
    if let Some(m) = limits.memory_max {
        if m < MIN_MEMORY {
            return Err(Error::invalid(format!(
                "limits.memory_max must be at least {MIN_MEMORY} bytes"
            )));
        }
        out.push(("memory.max", m.to_string(), "memory"));
    }
    if let Some(s) = limits.swap_max {
        out.push(("memory.swap.max", s.to_string(), "memory"));
    }
    if let Some(c) = limits.cpu {
        if !c.is_finite() || c <= 0.0 || c > 4096.0 {
            return Err(Error::invalid(
                "limits.cpu must be a number of cores in (0, 4096]",
            ));
        }
        let quota = cpu_quota(c);
        out.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}"), "cpu"));
    }
    if let Some(p) = limits.pids_max {
        if p == 0 {
            return Err(Error::invalid("limits.pids_max must be at least 1"));
        }
        out.push(("pids.max", p.to_string(), "pids"));
    }
    if let Some(w) = limits.io_weight {
        if !(1..=10_000).contains(&w) {
            return Err(Error::invalid("limits.io_weight must be in 1..=10000"));
        }
        out.push(("io.weight", format!("default {w}"), "io"));
    }
    Ok(out)
}

/// µs of CPU per period for `cores` (checked to be in (0, 4096]): at least
/// 1 ms, as the kernel requires.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn cpu_quota(cores: f64) -> u64 {
    // In range by the caller's check: at most 4.1e8, positive.
    ((cores * 100_000.0).round() as u64).max(1000)
}

/// Writes the limits into `leaf`.
pub fn apply(leaf: &Path, writes: &[(&'static str, String, &'static str)]) -> Result<()> {
    for (file, value, controller) in writes {
        std::fs::write(leaf.join(file), value).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::precondition(format!(
                    "{file} cannot be set: the {controller} controller is not available to envd's \
                     cgroups (cgroup.subtree_control of {})",
                    leaf.parent()
                        .map_or_else(String::new, |p| p.display().to_string())
                ))
            } else {
                Error::precondition(format!("{file} = {value:?} was refused: {e}"))
            }
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_become_cgroup_files() {
        let l = ResourceLimits {
            memory_max: Some(64 << 20),
            swap_max: Some(0),
            cpu: Some(0.25),
            pids_max: Some(16),
            io_weight: Some(50),
        };
        let f = files(&l).unwrap();
        let get = |name: &str| f.iter().find(|(n, _, _)| *n == name).unwrap().1.clone();
        assert_eq!(get("memory.max"), "67108864");
        assert_eq!(get("cpu.max"), "25000 100000");
        assert_eq!(get("pids.max"), "16");
        assert_eq!(get("io.weight"), "default 50");
        for bad in [
            ResourceLimits {
                cpu: Some(0.0),
                ..Default::default()
            },
            ResourceLimits {
                cpu: Some(f64::NAN),
                ..Default::default()
            },
            ResourceLimits {
                pids_max: Some(0),
                ..Default::default()
            },
            ResourceLimits {
                memory_max: Some(10),
                ..Default::default()
            },
            ResourceLimits {
                io_weight: Some(0),
                ..Default::default()
            },
        ] {
            assert!(files(&bad).is_err(), "{bad:?}");
        }
        let d = ResourceLimits {
            pids_max: Some(100),
            cpu: Some(1.0),
            ..Default::default()
        };
        let m = merged(
            Some(&ResourceLimits {
                cpu: Some(0.5),
                ..Default::default()
            }),
            &d,
        );
        assert_eq!((m.cpu, m.pids_max), (Some(0.5), Some(100)));
    }
}
