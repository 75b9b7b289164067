//! What envd does to the guest system for E2B's orchestrator: the sandbox's
//! identity (`E2B_*` variables and `/run/e2b` files, from MMDS), the events
//! host, the CA trust store and NFS volumes. Only in a sandbox VM (`--vm`):
//! elsewhere envd never touches the system it runs on.
//!
//! Paths are under `--guest-root` (default `/`), so tests can watch every
//! effect without root or a VM.

pub mod fsfreeze;
pub mod hosts;
pub mod mmds;
pub mod trust;
pub mod volumes;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::defaults::Defaults;
use crate::process::ProcessService;

/// Where upstream keeps the sandbox's identity files.
pub const RUN_DIR: &str = "run/e2b";

/// How long MMDS is polled after start and after each `/init`.
const MMDS_POLL_WINDOW: Duration = Duration::from_secs(60);

/// Sets up what envd does for the guest system per `cfg`: the workload
/// cgroups and their freezer, the sandbox's identity, port forwarding.
pub fn start(
    cfg: &crate::config::Config,
    start: crate::config::Start,
    defaults: Arc<Defaults>,
    process: Arc<ProcessService>,
) -> Result<Arc<Guest>, String> {
    let in_vm = cfg.in_vm(start);
    let cgroups = if in_vm && !cfg.no_cgroups {
        crate::cgroups::Cgroups::setup(&cfg.cgroup_root, cfg.default_limits()?).map(Arc::new)
    } else {
        None
    };
    if let Some(cg) = &cgroups {
        process.use_cgroups(cg.clone());
    }
    let freezer =
        crate::cgroups::freeze::Freezer::new(cgroups, Duration::from_secs(cfg.thaw_watchdog));
    let guest = Guest::new(
        cfg.guest_root.clone(),
        in_vm,
        cfg.mmds(),
        defaults,
        process,
        freezer,
    );
    guest.boot();
    if let Some(address) = cfg.forward_address()?.filter(|_| in_vm) {
        let own_ports = cfg
            .listeners(start)
            .iter()
            .filter_map(|l| match l {
                crate::listen::ListenUrl::Tcp(hp) => hp.rsplit(':').next()?.parse().ok(),
                _ => None,
            })
            .collect();
        crate::ports::start(address, own_ports);
    }
    if cfg.resume_handover {
        tracing::warn!("-resume-handover: envd has no live-upgrade handover; starting fresh");
    }
    Ok(guest)
}

#[derive(Debug)]
pub struct Guest {
    root: PathBuf,
    in_vm: bool,
    mmds: Option<String>,
    defaults: Arc<Defaults>,
    process: Arc<ProcessService>,
    volumes: tokio::sync::Mutex<volumes::Ledger>,
    polling: std::sync::atomic::AtomicBool,
    freezer: Arc<crate::cgroups::freeze::Freezer>,
    /// One `/fsfreeze` or `/fsthaw` at a time.
    fs_lock: tokio::sync::Mutex<()>,
}

impl Guest {
    pub fn new(
        root: PathBuf,
        in_vm: bool,
        mmds: Option<String>,
        defaults: Arc<Defaults>,
        process: Arc<ProcessService>,
        freezer: Arc<crate::cgroups::freeze::Freezer>,
    ) -> Arc<Self> {
        Arc::new(Self {
            root,
            in_vm,
            mmds: mmds.filter(|_| in_vm),
            defaults,
            process,
            volumes: Default::default(),
            polling: Default::default(),
            freezer,
            fs_lock: Default::default(),
        })
    }

    /// The workload freezer (`/freeze`, `/unfreeze`, thaw on `/init`).
    pub fn freezer(&self) -> &Arc<crate::cgroups::freeze::Freezer> {
        &self.freezer
    }

    pub fn fs_lock(&self) -> &tokio::sync::Mutex<()> {
        &self.fs_lock
    }

    pub fn in_vm(&self) -> bool {
        self.in_vm
    }

    pub fn uses_mmds(&self) -> bool {
        self.mmds.is_some()
    }

    pub fn process(&self) -> &ProcessService {
        &self.process
    }

    /// At start: `E2B_SANDBOX` (and its file in a VM), then MMDS polling.
    pub fn boot(self: &Arc<Self>) {
        let flag = self.in_vm.to_string();
        self.defaults.set_internal("E2B_SANDBOX", flag.clone());
        if self.in_vm {
            self.write_run_file(".E2B_SANDBOX", &flag, 0o444);
            self.poll_mmds();
        }
    }

    /// Polls MMDS in the background until it answers with the sandbox's
    /// identity or the window passes (one poller at a time).
    pub fn poll_mmds(self: &Arc<Self>) {
        let Some(addr) = self.mmds.clone() else {
            return;
        };
        if self.polling.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + MMDS_POLL_WINDOW;
            let mut pause = Duration::from_millis(50);
            let mut last_error = String::new();
            while tokio::time::Instant::now() < deadline {
                match mmds::fetch(&addr).await {
                    Ok(opts) if !opts.address.is_empty() => {
                        me.apply_identity(&opts);
                        last_error.clear();
                        break;
                    }
                    Ok(_) => last_error = "MMDS is not filled in yet".into(),
                    Err(e) => last_error = e,
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            if !last_error.is_empty() {
                tracing::warn!(error = %last_error, "no sandbox identity from MMDS");
            }
            me.polling
                .store(false, std::sync::atomic::Ordering::Release);
        });
    }

    /// The MMDS access-token hash, read now (`None`: no MMDS or no hash).
    pub async fn mmds_token_hash(&self) -> Option<String> {
        let addr = self.mmds.as_deref()?;
        match mmds::fetch(addr).await {
            Ok(o) if !o.access_token_hash.is_empty() => Some(o.access_token_hash),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(error = %e, "MMDS not readable for /init");
                None
            }
        }
    }

    fn apply_identity(&self, opts: &mmds::MmdsOpts) {
        for (name, value) in [
            ("E2B_SANDBOX_ID", &opts.instance_id),
            ("E2B_TEMPLATE_ID", &opts.env_id),
            ("E2B_TEAM_ID", &opts.team_id),
        ] {
            self.defaults.set_internal(name, value.clone());
            self.write_run_file(&format!(".{name}"), value, 0o666);
        }
        tracing::info!(sandbox = %opts.instance_id, template = %opts.env_id, "sandbox identity from MMDS");
    }

    fn write_run_file(&self, name: &str, value: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.root.join(RUN_DIR);
        let path = dir.join(name);
        let result = std::fs::create_dir_all(&dir)
            .and_then(|()| {
                // A read-only file from an earlier boot is replaced, not written.
                let _ = std::fs::remove_file(&path);
                std::fs::write(&path, value)
            })
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)));
        if let Err(e) = result {
            tracing::warn!(path = %path.display(), error = %e, "cannot write sandbox file");
        }
    }

    fn refuse_outside_vm(&self, what: &str) -> Result<(), String> {
        if self.in_vm {
            Ok(())
        } else {
            Err(format!(
                "{what} changes the guest system, and envd is not in a sandbox VM \
                 (start it with --vm)"
            ))
        }
    }

    /// `hyperloopIP`: the events host entry and `E2B_EVENTS_ADDRESS`.
    pub fn set_events_address(&self, ip: std::net::IpAddr) -> Result<(), String> {
        self.refuse_outside_vm("hyperloopIP")?;
        let path = self.root.join("etc/hosts");
        hosts::point_events_host(&path, ip)
            .map_err(|e| format!("hyperloopIP: updating {}: {e}", path.display()))?;
        let shown = match ip {
            std::net::IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        self.defaults
            .set_internal("E2B_EVENTS_ADDRESS", format!("http://{shown}"));
        Ok(())
    }

    /// `caBundle`, already validated.
    pub fn install_ca(&self, pem: &str) -> Result<(), String> {
        self.refuse_outside_vm("caBundle")?;
        trust::install(&self.root, pem)
            .map(|changed| {
                if changed {
                    tracing::info!("sandbox CA installed");
                }
            })
            .map_err(|e| format!("caBundle: {e}"))
    }

    /// `volumeMounts` for `lifecycle`, already validated.
    pub async fn mount_volumes(
        &self,
        lifecycle: Option<&str>,
        mounts: &[volumes::VolumeMount],
    ) -> Result<(), String> {
        self.refuse_outside_vm("volumeMounts")?;
        let mut ledger = self.volumes.lock().await;
        ledger.apply(&self.process, lifecycle, mounts).await
    }
}
