//! envctl: the host-side CLI for envd, over tcp://, unix://, vsock:// or
//! hybrid vsock (hvsock:///path/vsock.sock:PORT).

mod copy;
mod exec;
mod tunnels;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use envd::logging::shown;
use envd::proto::filesystem::filesystem_client::FilesystemClient;
use envd::proto::filesystem::{watch_dir_response, ListDirRequest, StatRequest, WatchDirRequest};
use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::*;
use futures_util::StreamExt;
use tonic::transport::Channel;

#[derive(Parser)]
#[command(name = "envctl", version, about = "Drive envd from the host")]
struct Cli {
    /// envd's address: tcp://HOST:PORT, unix:///PATH, vsock://CID:PORT or
    /// hvsock:///PATH/vsock.sock:PORT (Firecracker-style hybrid vsock).
    #[arg(long, env = "ENVD_URL", default_value = "tcp://127.0.0.1:49983")]
    url: String,
    /// Act as this user inside the VM.
    #[arg(long)]
    user: Option<String>,
    /// Access token (X-Access-Token).
    #[arg(long, env = "ENVD_ACCESS_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Wait up to this many seconds for envd to answer (a booting VM).
    #[arg(long, default_value_t = 10)]
    wait: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a command, stream its output, exit with its exit code.
    Run {
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Run a command on a pty (interactive with -it).
    Exec {
        #[arg(short = 'i')]
        interactive: bool,
        #[arg(short = 't')]
        tty: bool,
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// Copy a file: `cp LOCAL :REMOTE` uploads, `cp :REMOTE LOCAL` downloads.
    Cp { from: String, to: String },
    /// List a directory.
    Ls {
        path: String,
        #[arg(long, default_value_t = 1)]
        depth: u32,
    },
    /// Show an entry.
    Stat { path: String },
    /// Print filesystem events under a directory until interrupted.
    Watch {
        path: String,
        #[arg(short, long)]
        recursive: bool,
    },
    /// List running processes.
    Ps,
    /// Carry TCP (or Unix socket) connections on the host to envd at --url,
    /// e.g. over vsock to a VM without a network: point the E2B SDKs, grpcurl
    /// or a browser at the --listen address.
    Proxy {
        /// Where to accept connections: tcp://HOST:PORT or unix:///PATH.
        #[arg(long, default_value = "tcp://127.0.0.1:49983")]
        listen: String,
    },
    /// List the TCP ports listening in the VM (-f: follow changes).
    Ports {
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Make ports on the VM's loopback reachable on the host: each
    /// [HOST_ADDR:]HOST_PORT:GUEST_PORT, through envd (HTTP CONNECT).
    Forward {
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Make services on the host reachable on the VM's loopback: each
    /// GUEST_PORT:[HOST_ADDR:]HOST_PORT, through envd (reverse tunnels, all
    /// opened by the host).
    Reverse {
        #[arg(required = true)]
        specs: Vec<String>,
    },
    /// Live-upgrade envd: upload BINARY (none: envd re-executes its own
    /// program file), wait until the new image answers, print its build.
    /// Commands keep running; clients re-attach with a resume offset.
    Upgrade {
        binary: Option<std::path::PathBuf>,
        /// Wait this many seconds for the new image to answer.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Signal a process group (default SIGKILL).
    Kill {
        pid: u32,
        #[arg(long, default_value = "SIGKILL")]
        signal: String,
        /// Everything the command started (its cgroup), not only its group.
        #[arg(long)]
        tree: bool,
    },
}

/// Who envctl acts as: the request headers every call carries.
#[derive(Clone)]
struct Identity {
    user: Option<String>,
    token: Option<String>,
}

impl Identity {
    /// `msg` with `authorization: Basic` (the user) and `x-access-token`.
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        use base64::Engine;
        let mut r = tonic::Request::new(msg);
        if let Some(u) = &self.user {
            let v = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:"))
            );
            if let Ok(v) = v.parse() {
                r.metadata_mut().insert("authorization", v);
            }
        }
        if let Some(t) = self.token.as_ref().and_then(|t| t.parse().ok()) {
            r.metadata_mut().insert("x-access-token", t);
        }
        r
    }
}

struct Ctx {
    channel: Channel,
    id: Identity,
}

impl Ctx {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        self.id.req(msg)
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Cmd::Proxy { listen } = &cli.cmd {
        return tunnels::proxy(&cli.url, listen).await;
    }
    if let Cmd::Forward { specs } = &cli.cmd {
        return tunnels::forward(&cli.url, specs, cli.token.clone()).await;
    }
    if let Cmd::Reverse { specs } = &cli.cmd {
        return tunnels::reverse(&cli.url, specs, cli.token.clone()).await;
    }
    if let Cmd::Upgrade { binary, timeout } = &cli.cmd {
        return upgrade(&cli.url, binary.as_deref(), cli.token.as_deref(), *timeout).await;
    }
    let channel = match envd::client::wait_ready(&cli.url, Duration::from_secs(cli.wait)).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("envctl: {}", shown(&e.to_string()));
            return ExitCode::from(2);
        }
    };
    let ctx = Ctx {
        channel,
        id: Identity {
            user: cli.user,
            token: cli.token,
        },
    };
    match dispatch(&ctx, cli.cmd).await {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("envctl: {}", shown(&e));
            ExitCode::from(1)
        }
    }
}

/// Runs a command that talks to envd over the dialed channel; returns the
/// exit code.
async fn dispatch(ctx: &Ctx, cmd: Cmd) -> Result<u8, String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match cmd {
        Cmd::Run { command } => exec::run(ctx, command, None).await,
        Cmd::Exec {
            interactive,
            tty,
            command,
        } => {
            let size = if tty {
                Some(exec::terminal_size())
            } else {
                None
            };
            if interactive && tty {
                exec::interactive(ctx, command, size.unwrap_or((80, 24))).await
            } else {
                exec::run(ctx, command, size).await
            }
        }
        Cmd::Cp { from, to } => copy::copy(ctx, &from, &to).await,
        Cmd::Ls { path, depth } => {
            // As large a listing as envd sends (tonic's default is 4 MiB).
            let mut fs = FilesystemClient::new(ctx.channel.clone())
                .max_decoding_message_size(envd::wire::MAX_ENCODE);
            let entries = fs
                .list_dir(ctx.req(ListDirRequest { path, depth }))
                .await
                .map_err(status)?
                .into_inner()
                .entries;
            for e in entries {
                println!(
                    "{} {:>8} {:<8} {:<8} {}",
                    shown(&e.permissions),
                    e.size,
                    shown(&e.owner),
                    shown(&e.group),
                    shown(&e.path)
                );
            }
            Ok(0)
        }
        Cmd::Stat { path } => {
            let mut fs = FilesystemClient::new(ctx.channel.clone());
            let e = fs
                .stat(ctx.req(StatRequest { path }))
                .await
                .map_err(status)?
                .into_inner()
                .entry
                .unwrap_or_default();
            println!("{e:#?}");
            Ok(0)
        }
        Cmd::Watch { path, recursive } => {
            let mut fs = FilesystemClient::new(ctx.channel.clone());
            let mut s = fs
                .watch_dir(ctx.req(WatchDirRequest {
                    path,
                    recursive,
                    ..Default::default()
                }))
                .await
                .map_err(status)?
                .into_inner();
            while let Some(msg) = s.next().await {
                if let Some(watch_dir_response::Event::Filesystem(e)) = msg.map_err(status)?.event {
                    let kind = envd::proto::filesystem::EventType::try_from(e.r#type)
                        .map_or("?".into(), |t| t.as_str_name().to_owned());
                    println!("{kind} {}", shown(&e.name));
                }
            }
            Ok(0)
        }
        Cmd::Ps => {
            let mut p = ProcessClient::new(ctx.channel.clone());
            for info in p
                .list(ctx.req(ListRequest {}))
                .await
                .map_err(status)?
                .into_inner()
                .processes
            {
                let c = info.config.unwrap_or_default();
                println!(
                    "{:>7} {:<12} {} {}",
                    info.pid,
                    shown(&info.tag.unwrap_or_default()),
                    shown(&c.cmd),
                    shown(&c.args.join(" "))
                );
            }
            Ok(0)
        }
        Cmd::Proxy { .. } | Cmd::Forward { .. } | Cmd::Reverse { .. } | Cmd::Upgrade { .. } => {
            Err("runs before dialing".into())
        }
        Cmd::Ports { follow } => tunnels::ports(ctx, follow).await,
        Cmd::Kill { pid, signal, tree } => {
            let sig = parse_signal(&signal).ok_or_else(|| format!("unknown signal {signal:?}"))?;
            let mut p = ProcessClient::new(ctx.channel.clone());
            p.send_signal(ctx.req(SendSignalRequest {
                process: Some(ProcessSelector {
                    selector: Some(process_selector::Selector::Pid(pid)),
                }),
                signal: sig as i32,
                descendants: tree,
            }))
            .await
            .map_err(status)?;
            Ok(0)
        }
    }
}

/// `envctl upgrade`.
async fn upgrade(
    url: &str,
    binary: Option<&std::path::Path>,
    token: Option<&str>,
    timeout: u64,
) -> ExitCode {
    let result = async {
        let target: envd::client::Target = url.parse()?;
        let bytes = match binary {
            Some(p) => std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()))?,
            None => Vec::new(),
        };
        envd::client::upgrade::upgrade(&target, &bytes, token, Duration::from_secs(timeout)).await
    }
    .await;
    match result {
        Ok(u) => {
            println!(
                "upgraded envd: {} -> {} (answered again {} ms after the upload)",
                u.before,
                u.after,
                u.downtime.as_millis()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("envctl: {e}");
            ExitCode::from(1)
        }
    }
}

/// `TERM`, `SIGTERM`, `SIGNAL_SIGTERM` or `15`.
fn parse_signal(s: &str) -> Option<Signal> {
    if let Ok(n) = s.parse::<i32>() {
        return Signal::try_from(n)
            .ok()
            .filter(|s| *s != Signal::Unspecified);
    }
    let upper = s.to_ascii_uppercase();
    let bare = upper
        .trim_start_matches("SIGNAL_")
        .trim_start_matches("SIG");
    Signal::from_str_name(&format!("SIGNAL_SIG{bare}"))
}
