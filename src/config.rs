//! Command-line flags and their defaults, in one struct.

use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::listen::ListenUrl;

/// Defaults live with what they configure (`Settings::default()` of each
/// service); the flags take them from there.
fn process_defaults() -> crate::process::Settings {
    crate::process::Settings::default()
}

fn fs_defaults() -> crate::filesystem::Settings {
    crate::filesystem::Settings::default()
}

/// The listener used when no `--listen` is given: loopback only.
pub const DEFAULT_LISTEN: &str = "tcp://127.0.0.1:49983";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// envd: the in-VM agent serving the process and filesystem services.
#[derive(Debug, Parser)]
#[command(
    name = "envd",
    version,
    after_help = "Upstream envd's Go-style flags are accepted too: -version (prints the \
E2B envd version envd claims), -commit, -port N (= --listen tcp://0.0.0.0:N), -isnotfc \
(= --not-vm), -cgroup-root DIR, -no-cgroups, -verbose (logs always go to stderr), -cmd CMD \
(= --start-cmd)."
)]
pub struct Config {
    /// Where to listen; repeatable. tcp://HOST:PORT, unix:///PATH (a stale
    /// socket file is replaced; the socket gets mode 0600) or vsock://CID:PORT
    /// (CID -1 = any, the guest side). Default: tcp://127.0.0.1:49983.
    #[arg(long = "listen", value_name = "URL")]
    pub listen: Vec<ListenUrl>,

    /// Log filter: a level (error, warn, info, debug, trace) or a tracing
    /// directive such as "envd=debug". Overrides RUST_LOG. Default: info.
    #[arg(long, value_name = "FILTER")]
    pub log_level: Option<String>,

    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Recent output kept per process for re-attach without loss (bytes;
    /// at least 65536).
    #[arg(long, value_name = "BYTES", default_value_t = process_defaults().output_buffer as u64,
          value_parser = clap::value_parser!(u64).range(65536..=(1u64 << 32)))]
    pub output_buffer: u64,

    /// Output kept by all processes together (bytes). Beyond it, each
    /// process's oldest unread output is dropped down to 64 KiB and
    /// re-attaching clients are told how much was lost.
    #[arg(long, value_name = "BYTES", default_value_t = process_defaults().output_budget,
          value_parser = clap::value_parser!(u64).range(65536..=(1u64 << 40)))]
    pub output_budget: u64,

    /// How long an ended process stays available to Connect (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = process_defaults().exit_retention.as_secs())]
    pub exit_retention: u64,

    /// Events buffered per polling watcher (CreateWatcher); beyond it events
    /// are dropped and the next GetWatcherEvents reports how many.
    #[arg(long, value_name = "EVENTS", default_value_t = fs_defaults().watcher_buffer as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub watcher_buffer: u64,

    /// Polling watchers nobody polls for this long are removed (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = fs_defaults().watcher_idle.as_secs())]
    pub watcher_idle_timeout: u64,

    /// Connections open at once. At the cap the longest-idle connection is
    /// closed to admit a new one. Also bounded by half the open-file limit.
    /// Requests in flight at once (HTTP/2 carries many on one connection)
    /// are bounded by the same number; beyond, a request is answered at
    /// once with RESOURCE_EXHAUSTED (`/health` still answers).
    #[arg(long, value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(16..=1_000_000))]
    pub max_connections: u64,

    /// A connection with no request in flight for this long is closed
    /// (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = 120,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: u64,

    /// A request body envd buffers (Connect unary calls, /init, compose)
    /// must arrive within this time (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::body::DEFAULT_TIMEOUT.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout: u64,

    /// Directory watches at once (WatchDir streams and polling watchers
    /// together); beyond it, RESOURCE_EXHAUSTED. All share one inotify
    /// instance.
    #[arg(long, value_name = "N", default_value_t = crate::filesystem::inotify::DEFAULT_MAX_WATCHES as u64,
          value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pub max_watches: u64,

    /// Require this access token (read from the file, trailing newline
    /// removed) on every request but GET /health, as if set by /init.
    #[arg(long, value_name = "PATH")]
    pub access_token_file: Option<std::path::PathBuf>,

    /// User for requests that name none (no `authorization: Basic` header).
    /// Default: the user envd runs as (root in a VM).
    #[arg(long, value_name = "USER")]
    pub default_user: Option<String>,

    /// envd runs inside a sandbox VM: it may change the guest system (the
    /// clock, /etc/hosts, the CA trust store, NFS mounts, /run/e2b) and asks
    /// the VM's metadata service (MMDS) who it is. Default: on as PID 1 or
    /// when systemd starts envd with no --listen (E2B's unit), else off.
    #[arg(long)]
    pub vm: bool,

    /// envd runs on a developer's machine or in a container, not in a
    /// sandbox VM (upstream's `-isnotfc`); the opposite of --vm.
    #[arg(long)]
    pub not_vm: bool,

    /// Firecracker MMDS address (host or host:port) for the sandbox's
    /// identity and the hash that authorises a new access token on resume;
    /// "off" disables it. Used only with --vm.
    #[arg(long, value_name = "ADDR", default_value = "169.254.169.254")]
    pub mmds_address: String,

    /// Servers listening on 127.0.0.1, ::1 or :: inside the VM are made
    /// reachable on this address at the same port (upstream forwards to
    /// 169.254.0.21 with socat); "off" disables it. Used only with --vm.
    #[arg(long, value_name = "IP", default_value = crate::ports::DEFAULT_ADDRESS)]
    pub forward_address: String,

    /// Run this shell command (`/bin/bash -l -c CMD`, as root, tag
    /// "startCmd") once envd is serving (upstream's `-cmd`).
    #[arg(long, value_name = "CMD")]
    pub start_cmd: Option<String>,

    /// cgroup v2 mount point (upstream's `-cgroup-root`): in a VM, commands
    /// run in its `user` and `ptys` cgroups (upstream's layout) so /freeze
    /// can stop them.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    pub cgroup_root: std::path::PathBuf,

    /// Do not manage cgroups (upstream's `-no-cgroups`).
    #[arg(long)]
    pub no_cgroups: bool,

    /// Memory limit of each command that sets none (bytes; needs cgroups).
    #[arg(long, value_name = "BYTES")]
    pub default_memory_max: Option<u64>,

    /// CPU quota of each command that sets none (cores, e.g. 0.5).
    #[arg(long, value_name = "CORES")]
    pub default_cpu: Option<f64>,

    /// Process limit of each command that sets none.
    #[arg(long, value_name = "N")]
    pub default_pids_max: Option<u32>,

    /// A `/freeze` no thaw follows within this long is undone (seconds).
    #[arg(long, value_name = "SECONDS", default_value_t = crate::cgroups::freeze::DEFAULT_WATCHDOG.as_secs(),
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub thaw_watchdog: u64,

    /// Upstream's internal live-upgrade flag. envd has no handover yet: it
    /// starts fresh and says so in its log.
    #[arg(long, hide = true)]
    pub resume_handover: bool,

    /// Prefix for every guest system path envd writes on /init (/etc/hosts,
    /// the trust store, /run/e2b). For tests; default "/".
    #[arg(long, hide = true, value_name = "DIR", default_value = "/")]
    pub guest_root: std::path::PathBuf,
}

/// The listener of upstream envd, used when systemd starts envd with no
/// --listen (E2B's unit runs `/usr/bin/envd` bare).
pub const UPSTREAM_LISTEN: &str = "tcp://0.0.0.0:49983";

/// How envd was started, as far as defaults care.
#[derive(Debug, Clone, Copy, Default)]
pub struct Start {
    pub pid1: bool,
    /// A systemd service (`INVOCATION_ID` is set for every service process).
    pub systemd: bool,
}

impl Start {
    pub fn detect(pid1: bool) -> Self {
        Self {
            pid1,
            systemd: std::env::var_os("INVOCATION_ID").is_some(),
        }
    }
}

impl Config {
    /// Started bare by a service manager: as upstream envd is by E2B's unit.
    fn bare_service(&self, start: Start) -> bool {
        start.systemd && !start.pid1 && self.listen.is_empty()
    }

    pub fn listeners(&self, start: Start) -> Vec<ListenUrl> {
        if !self.listen.is_empty() {
            return self.listen.clone();
        }
        let url = if self.bare_service(start) {
            UPSTREAM_LISTEN
        } else {
            DEFAULT_LISTEN
        };
        vec![url.parse().expect("the default listen URLs are valid")]
    }

    /// Whether envd may act on the guest system (see `--vm`).
    pub fn in_vm(&self, start: Start) -> bool {
        if self.not_vm {
            return false;
        }
        self.vm || start.pid1 || self.bare_service(start)
    }

    /// Limits of commands that set none (checked like a request's).
    pub fn default_limits(&self) -> Result<crate::proto::process::ResourceLimits, String> {
        let limits = crate::proto::process::ResourceLimits {
            memory_max: self.default_memory_max,
            cpu: self.default_cpu,
            pids_max: self.default_pids_max,
            ..Default::default()
        };
        crate::cgroups::limits::files(&limits)
            .map_err(|e| format!("--default-*: {}", e.message))?;
        Ok(limits)
    }

    /// The port-forwarding address, unless disabled.
    pub fn forward_address(&self) -> Result<Option<std::net::IpAddr>, String> {
        if self.forward_address == "off" {
            return Ok(None);
        }
        self.forward_address.parse().map(Some).map_err(|_| {
            format!(
                "--forward-address {:?} is not an IP address",
                self.forward_address
            )
        })
    }

    /// The MMDS address, unless disabled.
    pub fn mmds(&self) -> Option<String> {
        (self.mmds_address != "off" && !self.mmds_address.is_empty())
            .then(|| self.mmds_address.clone())
    }

    /// The access token from `--access-token-file`, if given.
    pub fn access_token(&self) -> Result<Option<String>, String> {
        let Some(path) = &self.access_token_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--access-token-file {}: {e}", path.display()))?;
        let token = text.trim_end_matches(['\r', '\n']).to_owned();
        if token.is_empty() {
            return Err(format!(
                "--access-token-file {}: the file is empty",
                path.display()
            ));
        }
        Ok(Some(token))
    }

    pub fn filesystem_settings(&self) -> crate::filesystem::Settings {
        crate::filesystem::Settings {
            watcher_buffer: usize::try_from(self.watcher_buffer).unwrap_or(usize::MAX),
            watcher_idle: Duration::from_secs(self.watcher_idle_timeout.max(1)),
        }
    }

    /// Connection limits; the cap never exceeds half the open-file limit
    /// `nofile` (each connection is one fd; commands and files need others).
    pub fn conn_limits(&self, nofile: u64) -> crate::connections::ConnLimits {
        let by_fds = (nofile / 2).max(16);
        crate::connections::ConnLimits {
            max: usize::try_from(self.max_connections.min(by_fds)).unwrap_or(usize::MAX),
            requests: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
            idle: Duration::from_secs(self.idle_timeout),
        }
    }

    pub fn process_settings(&self) -> crate::process::Settings {
        crate::process::Settings {
            output_buffer: usize::try_from(self.output_buffer).unwrap_or(usize::MAX),
            output_budget: self.output_budget,
            exit_retention: Duration::from_secs(self.exit_retention),
            ..process_defaults()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("envd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_follow_how_envd_was_started() {
        let shell = Start::default();
        let bare_unit = Start {
            pid1: false,
            systemd: true,
        };
        let pid1 = Start {
            pid1: true,
            systemd: false,
        };
        // A developer's shell: loopback, not a VM.
        assert_eq!(cfg(&[]).listeners(shell)[0].to_string(), DEFAULT_LISTEN);
        assert!(!cfg(&[]).in_vm(shell));
        // E2B's unit runs /usr/bin/envd bare: upstream's listener, a VM.
        assert_eq!(
            cfg(&[]).listeners(bare_unit)[0].to_string(),
            UPSTREAM_LISTEN
        );
        assert!(cfg(&[]).in_vm(bare_unit));
        // A unit with its own listeners says --vm itself.
        let listed = cfg(&["--listen", "tcp://127.0.0.1:1"]);
        assert!(!listed.in_vm(bare_unit));
        assert!(cfg(&[]).in_vm(pid1));
        assert!(!cfg(&["--not-vm"]).in_vm(pid1));
        assert!(cfg(&["--vm"]).in_vm(shell));
    }
}
