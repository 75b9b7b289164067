//! NFS volumes (`volumeMounts` on `/init`), mounted as upstream mounts them
//! and remembered in a ledger: a mount already in place for the same
//! `lifecycleID` is kept on every later `/init` (each resume sends them
//! again); a new lifecycle remounts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::process::ProcessService;

/// upstream's NFS options.
pub const NFS_OPTIONS: &str =
    "fg,hard,sync,rsize=1048576,wsize=1048576,tcp,port=2049,nfsvers=3,noacl,noac,lookupcache=none";
/// At most this many volumes per `/init`.
pub const MAX_VOLUMES: usize = 64;
/// One `mount` may take this long.
const MOUNT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
pub struct VolumeMount {
    pub nfs_target: String,
    pub path: String,
}

/// What envd mounted: path → (target, lifecycle).
#[derive(Debug, Default)]
pub struct Ledger(HashMap<PathBuf, (String, Option<String>)>);

/// Checks the request before anything is mounted.
pub fn validate(mounts: &[VolumeMount]) -> Result<(), String> {
    if mounts.len() > MAX_VOLUMES {
        return Err(format!(
            "volumeMounts: at most {MAX_VOLUMES} volumes, got {}",
            mounts.len()
        ));
    }
    for m in mounts {
        let path = Path::new(&m.path);
        if !path.is_absolute() || m.path.contains('\0') || m.path == "/" {
            return Err(format!(
                "volumeMounts: path {:?} must be an absolute directory other than /",
                m.path
            ));
        }
        let target_ok = m.nfs_target.split_once(':').is_some_and(|(host, export)| {
            !host.is_empty() && export.starts_with('/') && !host.starts_with('-')
        }) && !m.nfs_target.contains(['\0', ',', ' ']);
        if !target_ok {
            return Err(format!(
                "volumeMounts: nfs_target {:?} is not HOST:/EXPORT",
                m.nfs_target
            ));
        }
    }
    Ok(())
}

impl Ledger {
    /// Mounts what is not mounted yet for this lifecycle.
    pub async fn apply(
        &mut self,
        process: &Arc<ProcessService>,
        lifecycle: Option<&str>,
        mounts: &[VolumeMount],
    ) -> Result<(), String> {
        for m in mounts {
            let path = PathBuf::from(&m.path);
            let wanted = (m.nfs_target.clone(), lifecycle.map(str::to_owned));
            let ours = self.0.get(&path) == Some(&wanted);
            let (dir, shown) = (path.clone(), m.path.clone());
            // On a blocking thread: the old volume's NFS server may have
            // stopped answering, and a look at its mount point then waits.
            let to_mount = crate::threads::run("volume mount", move || -> Result<bool, String> {
                let mounted = crate::init::is_mounted(&shown);
                if mounted && ours {
                    return Ok(false);
                }
                if mounted {
                    // Another lifecycle's mount (a fork, a new volume): replace it.
                    nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH).map_err(|e| {
                        format!("volumeMounts: unmounting the old volume at {shown}: {e}")
                    })?;
                }
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("volumeMounts: creating {shown}: {e}"))?;
                Ok(true)
            })
            .await
            .map_err(|e| format!("volumeMounts: {}", e.message))??;
            if !to_mount {
                continue;
            }
            let run = process
                .run_system(
                    &[
                        "mount",
                        "-t",
                        "nfs",
                        "-o",
                        NFS_OPTIONS,
                        &m.nfs_target,
                        &m.path,
                    ],
                    MOUNT_TIMEOUT,
                )
                .await
                .map_err(|e| format!("volumeMounts: cannot run mount: {}", e.message))?;
            if run.exit_code != 0 {
                return Err(format!(
                    "volumeMounts: mounting {} at {} failed (exit {}): {}",
                    m.nfs_target, m.path, run.exit_code, run.output
                ));
            }
            self.0.insert(path, wanted);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(t: &str, p: &str) -> VolumeMount {
        VolumeMount {
            nfs_target: t.into(),
            path: p.into(),
        }
    }

    #[test]
    fn requests_are_checked() {
        assert!(validate(&[v("10.0.0.1:/vol", "/mnt/data")]).is_ok());
        for bad in [
            v("10.0.0.1:/vol", "relative"),
            v("10.0.0.1:/vol", "/"),
            v("nohost", "/mnt"),
            v(":/x", "/mnt"),
            v("-o:/x", "/mnt"),
            v("h:/x,exec", "/mnt"),
        ] {
            assert!(validate(std::slice::from_ref(&bad)).is_err(), "{bad:?}");
        }
    }
}
