//! envctl: the host-side CLI for envd, over tcp://, unix://, vsock:// or
//! hybrid vsock (hvsock:///path/vsock.sock:PORT).

use std::io::{IsTerminal, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use envd::proto::filesystem::filesystem_client::FilesystemClient;
use envd::proto::filesystem::{watch_dir_response, ListDirRequest, StatRequest, WatchDirRequest};
use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::process_event::{data_event::Output, Event};
use envd::proto::process::*;
use envd::proto::transfer::transfer_client::TransferClient;
use envd::proto::transfer::{write_file_request, ReadFileRequest, WriteFileRequest, WriteHeader};
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
        return proxy(&cli.url, listen).await;
    }
    if let Cmd::Forward { specs } = &cli.cmd {
        return forward(&cli.url, specs, cli.token.clone()).await;
    }
    if let Cmd::Upgrade { binary, timeout } = &cli.cmd {
        return upgrade(&cli.url, binary.as_deref(), cli.token.as_deref(), *timeout).await;
    }
    let channel = match envd::client::wait_ready(&cli.url, Duration::from_secs(cli.wait)).await {
        Ok(c) => c,
        Err(e) => {
            eprintln!("envctl: {e}");
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
            eprintln!("envctl: {e}");
            ExitCode::from(1)
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

/// `envctl proxy`: runs until interrupted.
async fn proxy(url: &str, listen: &str) -> ExitCode {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .try_init();
    let target: envd::client::Target = match url.parse() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("envctl: {e}");
            return ExitCode::from(2);
        }
    };
    match envd::client::proxy::Local::bind(listen).await {
        Ok((local, bound)) => {
            eprintln!("envctl: proxying {bound} to {url}");
            envd::client::proxy::serve(local, target).await;
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("envctl: {e}");
            ExitCode::from(2)
        }
    }
}

/// `envctl ports`: one line per listening port; with `follow`, `+`/`-`
/// lines as they come and go.
async fn ports(ctx: &Ctx, follow: bool) -> Result<u8, String> {
    use envd::proto::ports::port_event::Event as PortEv;
    use envd::proto::ports::ports_client::PortsClient;
    use envd::proto::ports::{ListPortsRequest, Port, WatchPortsRequest};
    let line = |sign: &str, p: &Port| {
        let owner = p
            .command_pid
            .map_or_else(String::new, |c| format!(" (command {c})"));
        println!(
            "{sign}{} {}:{} pid {}{owner}",
            p.protocol, p.address, p.port, p.pid
        );
    };
    let mut c = PortsClient::new(ctx.channel.clone());
    if !follow {
        let list = c
            .list(ctx.req(ListPortsRequest {}))
            .await
            .map_err(|s| s.message().to_owned())?;
        for p in &list.into_inner().ports {
            line("", p);
        }
        return Ok(0);
    }
    let mut s = c
        .watch(ctx.req(WatchPortsRequest {}))
        .await
        .map_err(|s| s.message().to_owned())?
        .into_inner();
    while let Some(ev) = s.next().await {
        match ev.map_err(|s| s.message().to_owned())?.event {
            Some(PortEv::Added(p)) => line("+", &p),
            Some(PortEv::Removed(p)) => line("-", &p),
            _ => {}
        }
    }
    Ok(0)
}

/// `envctl forward`: every spec at once, until interrupted.
async fn forward(url: &str, specs: &[String], token: Option<String>) -> ExitCode {
    let parsed: Result<Vec<envd::client::forward::Spec>, String> =
        specs.iter().map(|s| s.parse()).collect();
    let target: Result<envd::client::Target, String> = url.parse();
    let (specs, target) = match (parsed, target) {
        (Ok(s), Ok(t)) => (s, std::sync::Arc::new(t)),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("envctl: {e}");
            return ExitCode::from(2);
        }
    };
    let mut tasks = tokio::task::JoinSet::new();
    for spec in specs {
        tasks.spawn(envd::client::forward::serve(
            spec,
            target.clone(),
            token.clone(),
        ));
    }
    while let Some(done) = tasks.join_next().await {
        if let Ok(Err(e)) = done {
            eprintln!("envctl: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::SUCCESS
}

async fn dispatch(ctx: &Ctx, cmd: Cmd) -> Result<u8, String> {
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match cmd {
        Cmd::Run { command } => run(ctx, command, None).await,
        Cmd::Exec {
            interactive,
            tty,
            command,
        } => {
            let size = if tty { Some(terminal_size()) } else { None };
            if interactive && tty {
                exec_interactive(ctx, command, size.unwrap_or((80, 24))).await
            } else {
                run(ctx, command, size).await
            }
        }
        Cmd::Cp { from, to } => copy(ctx, &from, &to).await,
        Cmd::Ls { path, depth } => {
            let mut fs = FilesystemClient::new(ctx.channel.clone());
            let entries = fs
                .list_dir(ctx.req(ListDirRequest { path, depth }))
                .await
                .map_err(status)?
                .into_inner()
                .entries;
            for e in entries {
                println!(
                    "{} {:>8} {:<8} {:<8} {}",
                    e.permissions, e.size, e.owner, e.group, e.path
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
                    println!("{kind} {}", e.name);
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
                    info.tag.unwrap_or_default(),
                    c.cmd,
                    c.args.join(" ")
                );
            }
            Ok(0)
        }
        Cmd::Proxy { .. } | Cmd::Forward { .. } | Cmd::Upgrade { .. } => {
            Err("runs before dialing".into())
        }
        Cmd::Ports { follow } => ports(ctx, follow).await,
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

fn config(command: Vec<String>) -> ProcessConfig {
    let mut it = command.into_iter();
    ProcessConfig {
        cmd: it.next().unwrap_or_default(),
        args: it.collect(),
        ..Default::default()
    }
}

/// Exit code of an end event: the code, or 128 + signal like a shell (from
/// the structured fields; 255 when envd could not tell).
fn exit_code(end: &process_event::EndEvent) -> u8 {
    let code = match (end.exited, end.signal) {
        (true, _) => end.exit_code,
        (false, Some(sig)) => 128 + sig,
        (false, None) => 255,
    };
    u8::try_from(code.clamp(0, 255)).unwrap_or(255)
}

/// Prints a process's output until its end; returns its exit code. With
/// `merged`, stderr goes to stdout too (a terminal session).
async fn follow<T>(
    mut s: tonic::Streaming<T>,
    event: fn(T) -> Option<ProcessEvent>,
    merged: bool,
) -> Result<u8, String> {
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    while let Some(msg) = s.next().await {
        let msg = msg.map_err(|e| e.message().to_owned())?;
        match event(msg).and_then(|e| e.event) {
            Some(Event::Data(d)) => match d.output {
                Some(Output::Stderr(b)) if !merged => {
                    let _ = err.write_all(&b);
                }
                Some(Output::Stdout(b) | Output::Pty(b) | Output::Stderr(b)) => {
                    let _ = out.write_all(&b);
                    let _ = out.flush();
                }
                None => {}
            },
            Some(Event::End(end)) => return Ok(exit_code(&end)),
            _ => {}
        }
    }
    Err("the stream ended without an end event".into())
}

async fn run(ctx: &Ctx, command: Vec<String>, pty: Option<(u32, u32)>) -> Result<u8, String> {
    let mut p = ProcessClient::new(ctx.channel.clone());
    let req = StartRequest {
        process: Some(config(command)),
        pty: pty.map(|(cols, rows)| Pty {
            size: Some(pty::Size { cols, rows }),
        }),
        stdin: Some(false),
        tag: None,
        limits: None,
    };
    let s = p
        .start(ctx.req(req))
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    follow(s, |m: StartResponse| m.event, false).await
}

fn terminal_size() -> (u32, u32) {
    // SAFETY: an all-zero winsize is a valid value.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    // SAFETY: TIOCGWINSZ writes one winsize into a valid struct.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut ws) } == 0;
    if ok && ws.ws_col > 0 && ws.ws_row > 0 {
        (u32::from(ws.ws_col), u32::from(ws.ws_row))
    } else {
        (80, 24)
    }
}

/// Interactive pty session: local terminal in raw mode, stdin streamed as
/// pty input, window size changes forwarded.
async fn exec_interactive(
    ctx: &Ctx,
    command: Vec<String>,
    (cols, rows): (u32, u32),
) -> Result<u8, String> {
    use nix::sys::termios;
    let stdin = std::io::stdin();
    let saved = if stdin.is_terminal() {
        termios::tcgetattr(&stdin).ok()
    } else {
        None
    };
    if let Some(t) = &saved {
        let mut raw = t.clone();
        termios::cfmakeraw(&mut raw);
        let _ = termios::tcsetattr(&stdin, termios::SetArg::TCSANOW, &raw);
    }
    let result = exec_session(ctx, command, cols, rows).await;
    if let Some(t) = &saved {
        let _ = termios::tcsetattr(std::io::stdin(), termios::SetArg::TCSANOW, t);
    }
    result
}

async fn exec_session(ctx: &Ctx, command: Vec<String>, cols: u32, rows: u32) -> Result<u8, String> {
    let mut p = ProcessClient::new(ctx.channel.clone());
    let req = StartRequest {
        process: Some(config(command)),
        pty: Some(Pty {
            size: Some(pty::Size { cols, rows }),
        }),
        ..Default::default()
    };
    let mut s = p
        .start(ctx.req(req))
        .await
        .map_err(|e| e.message().to_owned())?
        .into_inner();
    let pid = match s
        .next()
        .await
        .and_then(|m| m.ok())
        .and_then(|m| m.event)
        .and_then(|e| e.event)
    {
        Some(Event::Start(st)) => st.pid,
        _ => return Err("no start event".into()),
    };
    let sel = move || {
        Some(ProcessSelector {
            selector: Some(process_selector::Selector::Pid(pid)),
        })
    };
    // Keyboard → pty input.
    let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(16);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.blocking_send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    use stream_input_request::{DataEvent, Event as In, StartEvent};
    let first = StreamInputRequest {
        event: Some(In::Start(StartEvent { process: sel() })),
    };
    let data = tokio_stream_from(rx).map(|b| StreamInputRequest {
        event: Some(In::Data(DataEvent {
            input: Some(ProcessInput {
                input: Some(process_input::Input::Pty(b.into())),
            }),
        })),
    });
    let input = futures_util::stream::iter([first]).chain(data);
    let mut p2 = p.clone();
    let input_req = ctx.req(input);
    tokio::spawn(async move {
        let _ = p2.stream_input(input_req).await;
    });
    // Window size changes.
    let mut p3 = p.clone();
    let resize_req = move |cols, rows| UpdateRequest {
        process: sel(),
        pty: Some(Pty {
            size: Some(pty::Size { cols, rows }),
        }),
    };
    let id = ctx.id.clone();
    tokio::spawn(async move {
        let Ok(mut winch) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
        else {
            return;
        };
        while winch.recv().await.is_some() {
            let (c, r) = terminal_size();
            let _ = p3.update(id.req(resize_req(c, r))).await;
        }
    });
    follow(s, |m: StartResponse| m.event, true).await
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Progress on stderr for copies of 8 MiB and more, when it is a terminal.
struct Progress {
    total: Option<u64>,
    done: u64,
    shown: bool,
}

impl Progress {
    fn new(total: Option<u64>) -> Self {
        let shown = std::io::stderr().is_terminal() && total.is_none_or(|t| t >= 8 << 20);
        Self {
            total,
            done: 0,
            shown,
        }
    }
    fn add(&mut self, n: u64) {
        self.done += n;
        if self.shown {
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            match self.total {
                Some(t) if t > 0 => eprint!(
                    "\r{:8.1} / {:.1} MiB {:3}%",
                    mib(self.done),
                    mib(t),
                    self.done * 100 / t
                ),
                _ => eprint!("\r{:8.1} MiB", mib(self.done)),
            }
        }
    }
    fn finish(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

async fn copy(ctx: &Ctx, from: &str, to: &str) -> Result<u8, String> {
    let mut t = TransferClient::new(ctx.channel.clone());
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match (from.strip_prefix(':'), to.strip_prefix(':')) {
        (None, Some(remote)) => {
            let mut file = std::fs::File::open(from).map_err(|e| format!("{from}: {e}"))?;
            let size = file.metadata().ok().map(|m| m.len());
            let (tx, rx) = tokio::sync::mpsc::channel::<WriteFileRequest>(4);
            let header = WriteFileRequest {
                message: Some(write_file_request::Message::Header(WriteHeader {
                    path: remote.to_owned(),
                    ..Default::default()
                })),
            };
            tx.send(header).await.map_err(|e| e.to_string())?;
            let reader = std::thread::spawn(move || -> std::io::Result<()> {
                let mut progress = Progress::new(size);
                loop {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        progress.finish();
                        return Ok(());
                    }
                    buf.truncate(n);
                    progress.add(n as u64);
                    let msg = WriteFileRequest {
                        message: Some(write_file_request::Message::Data(buf.into())),
                    };
                    if tx.blocking_send(msg).is_err() {
                        return Ok(());
                    }
                }
            });
            let entry = t
                .write_file(ctx.req(tokio_stream_from(rx)))
                .await
                .map_err(status)?
                .into_inner()
                .entry
                .unwrap_or_default();
            reader
                .join()
                .map_err(|_| "reader panicked".to_owned())?
                .map_err(|e| e.to_string())?;
            eprintln!("{} bytes -> {}", entry.size, entry.path);
            Ok(0)
        }
        (Some(remote), None) => {
            let mut fs = FilesystemClient::new(ctx.channel.clone());
            let size = fs
                .stat(ctx.req(StatRequest {
                    path: remote.to_owned(),
                }))
                .await
                .ok()
                .and_then(|r| r.into_inner().entry)
                .and_then(|e| u64::try_from(e.size).ok());
            let mut s = t
                .read_file(ctx.req(ReadFileRequest {
                    path: remote.to_owned(),
                    offset: None,
                    length: None,
                }))
                .await
                .map_err(status)?
                .into_inner();
            let mut file = std::fs::File::create(to).map_err(|e| format!("{to}: {e}"))?;
            let mut progress = Progress::new(size);
            while let Some(chunk) = s.next().await {
                let data = chunk.map_err(status)?.data;
                file.write_all(&data).map_err(|e| format!("{to}: {e}"))?;
                progress.add(data.len() as u64);
            }
            progress.finish();
            Ok(0)
        }
        _ => Err("exactly one side of cp must be remote, written :PATH".into()),
    }
}
