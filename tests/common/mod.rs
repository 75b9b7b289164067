//! Test harness: starts the real `envd` binary on a temporary Unix socket and
//! an ephemeral loopback TCP port, and offers small helpers over the tonic
//! client. Shared by the integration test files.
#![allow(dead_code)]

pub mod cgroup;
pub mod connect_client;
pub mod cut;
pub mod downtime;
pub mod fdstore;
pub mod http;
pub mod mmds;
pub mod procfs;
pub mod skip;

#[allow(unused_imports)]
pub use skip::{skip, skip_on_this_machine};

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envd::proto::filesystem::filesystem_client::FilesystemClient;
use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::process_event::{data_event::Output, EndEvent, Event};
use envd::proto::process::*;
use envd::proto::transfer::transfer_client::TransferClient;
use futures_util::{Stream, StreamExt};
use tonic::transport::Channel;

/// How envd is started, beyond its arguments.
enum Launch<'a> {
    /// Shell commands run first, in the shell that execs envd.
    Prelude(&'a str),
    /// A command that execs envd.
    Wrapper(&'a [&'a str]),
    /// Another envd binary than [`binary`].
    Binary(&'a str),
}

pub struct Envd {
    child: Child,
    pub tcp: String,
    pub unix: String,
    pub log: Log,
    _dir: tempfile::TempDir,
}

impl Envd {
    /// Starts envd with a Unix and a TCP listener plus `extra` flags.
    pub fn start(extra: &[&str]) -> Envd {
        Self::start_with(extra, None)
    }

    /// Like [`Envd::start`], after `ulimit <ulimit>` in the shell that
    /// execs envd (e.g. "-Sn 256": soft open-file limit 256).
    pub fn start_with_ulimit(extra: &[&str], ulimit: &str) -> Envd {
        Self::start_with(extra, Some(Launch::Prelude(&format!("ulimit {ulimit}"))))
    }

    /// Like [`Envd::start`], after `prelude` in the shell that execs envd
    /// (e.g. "trap '' QUIT": envd inherits SIGQUIT ignored).
    pub fn start_after(extra: &[&str], prelude: &str) -> Envd {
        Self::start_with(extra, Some(Launch::Prelude(prelude)))
    }

    /// Like [`Envd::start`], run by `wrapper` (a command that execs its
    /// arguments, e.g. `unshare --mount`: envd in a mount namespace of its
    /// own, which the test may change with `nsenter`).
    pub fn start_in(wrapper: &[&str], extra: &[&str]) -> Envd {
        Self::start_with(extra, Some(Launch::Wrapper(wrapper)))
    }

    /// Like [`Envd::start`], with the static release build `make test`
    /// made (`ENVD_STATIC`) where there is one: what a measure of envd's
    /// memory should see, since glibc's allocator (the test build's) keeps
    /// freed memory in ways musl's does not. Else the test build.
    pub fn start_static(extra: &[&str]) -> Envd {
        match std::env::var("ENVD_STATIC").ok().filter(|v| !v.is_empty()) {
            Some(path) => Self::start_with(extra, Some(Launch::Binary(&path))),
            None => Self::start(extra),
        }
    }

    fn start_with(extra: &[&str], launch: Option<Launch<'_>>) -> Envd {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("envd.sock");
        let unix = format!("unix://{}", sock.display());
        let mut args = vec![
            "--listen".to_owned(),
            unix.clone(),
            "--listen".into(),
            "tcp://127.0.0.1:0".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let cmd = match launch {
            None => {
                let mut c = Command::new(binary());
                c.args(&args);
                c
            }
            Some(Launch::Binary(b)) => {
                let mut c = Command::new(b);
                c.args(&args);
                c
            }
            Some(Launch::Wrapper(w)) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(binary()).args(&args);
                c
            }
            Some(Launch::Prelude(u)) => {
                let mut c = Command::new("/bin/sh");
                c.arg("-c")
                    .arg(format!("{u} && exec \"$0\" \"$@\""))
                    .arg(binary())
                    .args(&args);
                c
            }
        };
        let (child, urls, log) =
            spawn_command(cmd).unwrap_or_else(|e| panic!("envd did not start: {e}"));
        let tcp = urls
            .iter()
            .find(|u| u.starts_with("tcp://"))
            .cloned()
            .expect("tcp listener");
        Envd {
            child,
            tcp,
            unix,
            log,
            _dir: dir,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether envd logged a line containing `needle` so far.
    pub fn logged(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub async fn client(&self) -> ProcessClient<Channel> {
        ProcessClient::new(envd::client::dial(&self.tcp).await.unwrap())
    }

    pub async fn unix_client(&self) -> ProcessClient<Channel> {
        ProcessClient::new(envd::client::dial(&self.unix).await.unwrap())
    }

    pub async fn fs(&self) -> FilesystemClient<Channel> {
        FilesystemClient::new(envd::client::dial(&self.unix).await.unwrap())
    }

    pub async fn transfer(&self) -> TransferClient<Channel> {
        TransferClient::new(envd::client::dial(&self.unix).await.unwrap())
    }
}

impl Drop for Envd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The envd under test: `ENVD_BIN` if set (e.g. the static release build
/// for benchmarks), else the binary cargo built for this test run.
pub fn binary() -> String {
    std::env::var("ENVD_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_envd").to_owned())
}

/// Spawns envd with `args`; waits for "envd ready". Returns the child, the
/// bound listener URLs and its log lines so far (kept up to date).
/// envd's log lines, kept up to date by a reader thread.
pub type Log = Arc<Mutex<Vec<String>>>;

pub fn spawn(args: &[String]) -> Result<(Child, Vec<String>, Log), String> {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    spawn_command(cmd)
}

/// Like [`spawn`], for a command prepared by the caller (e.g. a wrapper that
/// sets limits before it execs envd).
pub fn spawn_command(mut cmd: Command) -> Result<(Child, Vec<String>, Log), String> {
    let mut child = cmd
        .env(
            "RUST_LOG",
            std::env::var("ENVD_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let log2 = log.clone();
    std::thread::spawn(move || {
        let mut urls = Vec::new();
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(u) = listening_url(&line) {
                urls.push(u.to_owned());
            }
            if line.contains("envd ready") {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Ok(urls.clone()));
                }
            }
            log2.lock().unwrap().push(line);
        }
        if let Some(tx) = tx.take() {
            let _ = tx.send(Err(log2.lock().unwrap().join("\n")));
        }
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(Ok(urls)) => Ok((child, urls, log)),
        Ok(Err(log)) => {
            let _ = child.wait();
            Err(format!("envd exited early:\n{log}"))
        }
        Err(_) => {
            let _ = child.kill();
            Err("envd not ready within 20 s".into())
        }
    }
}

/// The URL an envd log line saying it is listening names.
pub fn listening_url(line: &str) -> Option<&str> {
    if !line.contains("listening") {
        return None;
    }
    line.split_whitespace().find_map(|w| w.strip_prefix("url="))
}

pub fn cmd(cmd: &str, args: &[&str]) -> StartRequest {
    StartRequest {
        process: Some(ProcessConfig {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn sh(script: &str) -> StartRequest {
    cmd("/bin/sh", &["-c", script])
}

pub fn by_pid(pid: u32) -> Option<ProcessSelector> {
    Some(ProcessSelector {
        selector: Some(process_selector::Selector::Pid(pid)),
    })
}

/// `sig` to process `pid`: its group, or with `descendants` its whole tree.
pub fn signal_pid(pid: u32, sig: Signal, descendants: bool) -> SendSignalRequest {
    SendSignalRequest {
        process: by_pid(pid),
        signal: sig as i32,
        descendants,
    }
}

pub fn by_tag(tag: &str) -> Option<ProcessSelector> {
    Some(ProcessSelector {
        selector: Some(process_selector::Selector::Tag(tag.into())),
    })
}

/// A request with extra metadata.
pub fn with_meta<T>(msg: T, meta: &[(&'static str, &str)]) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    for (k, v) in meta {
        req.metadata_mut().insert(*k, v.parse().unwrap());
    }
    req
}

/// `authorization: Basic base64("<user>:")`
pub fn as_user<T>(msg: T, user: &str) -> tonic::Request<T> {
    use base64::Engine;
    let v = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
    );
    with_meta(msg, &[("authorization", &v)])
}

/// Everything a Start/Connect stream said.
#[derive(Debug, Default)]
pub struct Outcome {
    pub pid: u32,
    pub start: Option<process_event::StartEvent>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub pty: Vec<u8>,
    pub keepalives: usize,
    pub end: Option<EndEvent>,
    /// Event kinds in order: 's' start, 'd' data, 'k' keepalive, 'e' end.
    pub order: String,
}

impl Outcome {
    pub fn out(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn err(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
    pub fn end(&self) -> &EndEvent {
        self.end.as_ref().expect("stream had no end event")
    }
    pub fn record(&mut self, ev: ProcessEvent) {
        match ev.event.expect("event without content") {
            Event::Start(s) => {
                self.pid = s.pid;
                self.start = Some(s);
                self.order.push('s');
            }
            Event::Data(d) => {
                match d.output.expect("data without output") {
                    Output::Stdout(b) => self.stdout.extend_from_slice(&b),
                    Output::Stderr(b) => self.stderr.extend_from_slice(&b),
                    Output::Pty(b) => self.pty.extend_from_slice(&b),
                }
                self.order.push('d');
            }
            Event::Keepalive(_) => {
                self.keepalives += 1;
                self.order.push('k');
            }
            Event::End(e) => {
                self.end = Some(e);
                self.order.push('e');
            }
        }
    }
}

pub trait HasEvent {
    fn event(self) -> ProcessEvent;
}
impl HasEvent for StartResponse {
    fn event(self) -> ProcessEvent {
        self.event.expect("response without event")
    }
}
impl HasEvent for ConnectResponse {
    fn event(self) -> ProcessEvent {
        self.event.expect("response without event")
    }
}

/// How long [`collect`] and [`run`] wait for a stream's end.
const STREAM_DEADLINE: Duration = Duration::from_secs(60);

/// Reads a stream to its end ([`STREAM_DEADLINE`] at most).
pub async fn collect<T: HasEvent>(
    s: impl Stream<Item = Result<T, tonic::Status>> + Unpin,
) -> Outcome {
    collect_within(s, STREAM_DEADLINE).await
}

/// Like [`collect`] with a deadline of `limit`, for commands whose run time
/// under TCG depends on the machine's load (e.g. filling a VM's memory).
pub async fn collect_within<T: HasEvent>(
    s: impl Stream<Item = Result<T, tonic::Status>> + Unpin,
    limit: Duration,
) -> Outcome {
    tokio::time::timeout(limit, collect_inner(s))
        .await
        .unwrap_or_else(|_| panic!("stream did not end within {limit:?}"))
}

async fn collect_inner<T: HasEvent>(
    mut s: impl Stream<Item = Result<T, tonic::Status>> + Unpin,
) -> Outcome {
    let mut o = Outcome::default();
    while let Some(item) = s.next().await {
        o.record(item.expect("stream error").event());
    }
    o
}

/// Runs a command to completion over `client`.
pub async fn run(
    client: &mut ProcessClient<Channel>,
    req: impl tonic::IntoRequest<StartRequest>,
) -> Outcome {
    run_within(client, req, STREAM_DEADLINE).await
}

/// [`run`] with a deadline of `limit` for the whole run.
pub async fn run_within(
    client: &mut ProcessClient<Channel>,
    req: impl tonic::IntoRequest<StartRequest>,
    limit: Duration,
) -> Outcome {
    let s = client.start(req).await.expect("Start failed").into_inner();
    collect_within(s, limit).await
}

/// A process's output from `offset` to its end (Connect with
/// `resume_offset`), selected by tag, over `c`.
pub async fn resume_tag(c: &mut ProcessClient<Channel>, tag: &str, offset: u64) -> Outcome {
    let s = c
        .connect(ConnectRequest {
            process: by_tag(tag),
            resume_offset: Some(offset),
        })
        .await
        .expect("Connect")
        .into_inner();
    collect(s).await
}

/// Starts `envctl proxy`'s logic in this process: a loopback TCP listener
/// whose connections are carried to envd at `url`. Returns its tcp:// URL.
pub async fn proxy_to(url: &str) -> String {
    let (local, bound) = envd::client::proxy::Local::bind("tcp://127.0.0.1:0")
        .await
        .unwrap();
    tokio::spawn(envd::client::proxy::serve(local, url.parse().unwrap()));
    bound
}

/// Reads events until `pred` holds on the outcome so far (30 s at most).
pub async fn read_until<T: HasEvent>(
    s: &mut (impl Stream<Item = Result<T, tonic::Status>> + Unpin),
    o: &mut Outcome,
    pred: impl Fn(&Outcome) -> bool,
) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !pred(o) {
            let item = s
                .next()
                .await
                .expect("stream ended early")
                .expect("stream error");
            o.record(item.event());
        }
    })
    .await
    .expect("condition not reached within 30 s");
}

/// A command that leaves a background job holding its stdout and stderr and
/// ends at once: the job waits for [`BackgroundJob::release`], then writes a
/// line to each and leaves a mark file, if it is still alive.
pub struct BackgroundJob {
    dir: tempfile::TempDir,
}

impl BackgroundJob {
    pub fn new() -> BackgroundJob {
        BackgroundJob {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn command(&self) -> StartRequest {
        sh(&format!(
            "(while [ ! -e {go} ]; do sleep 0.05; done; echo late; echo late >&2; \
              echo alive > {mark}) & echo started",
            go = self.dir.path().join("go").display(),
            mark = self.mark().display()
        ))
    }

    fn mark(&self) -> std::path::PathBuf {
        self.dir.path().join("alive")
    }

    /// Whether the job has written (it has not before its release).
    pub fn wrote(&self) -> bool {
        std::fs::read_to_string(self.mark()).is_ok_and(|t| t == "alive\n")
    }

    /// Lets the job write; whether it lived through it (10 s at most).
    pub async fn release(&self) -> bool {
        std::fs::write(self.dir.path().join("go"), b"").unwrap();
        eventually(Duration::from_secs(10), || self.wrote()).await
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes; returns
/// whether it held. For effects envd produces after answering (cleanup
/// after a client vanishes), whose timing depends on the machine's load.
pub async fn eventually(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> tonic::Code {
    r.expect_err("expected an error").code()
}

/// A tmpfs mounted for a test, unmounted on drop. `None` (after printing why)
/// when mounting is not possible here (not root, no mount permission).
pub struct Tmpfs(pub std::path::PathBuf);

impl Tmpfs {
    pub fn mount(test: &str, at: &std::path::Path, options: &str) -> Option<Tmpfs> {
        if !is_root() {
            skip(test, "needs root to mount a tmpfs");
            return None;
        }
        std::fs::create_dir_all(at).ok()?;
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(at)
            .status();
        if !ok.map(|s| s.success()).unwrap_or(false) {
            skip(test, "cannot mount a tmpfs here");
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A tree of small files on a tmpfs of its own, and an empty destination
/// directory on another file system: a Move from one to the other copies.
pub struct CrossFsMove {
    pub tree: std::path::PathBuf,
    pub dst: std::path::PathBuf,
    // Unmounted before the directory holding it goes.
    _src: Tmpfs,
    _dir: tempfile::TempDir,
}

impl CrossFsMove {
    /// `dirs` directories of 100 one-byte files each: enough entries that
    /// the copy takes a while (each file costs an open, a copy, a chmod, a
    /// chown and a utimes). `None` (skipped) where no tmpfs can be mounted.
    pub fn new(test: &str, dirs: usize) -> Option<CrossFsMove> {
        let dir = tempfile::tempdir().unwrap();
        // A page per file.
        let size = format!("size={}m", dirs * 100 * 4 / 1024 + 64);
        let src = Tmpfs::mount(test, &dir.path().join("src"), &size)?;
        let tree = dir.path().join("src/tree");
        for d in 0..dirs {
            let sub = tree.join(format!("d{d}"));
            std::fs::create_dir_all(&sub).unwrap();
            for f in 0..100 {
                std::fs::write(sub.join(format!("f{f}")), b"x").unwrap();
            }
        }
        let dst = dir.path().join("dst");
        std::fs::create_dir(&dst).unwrap();
        Some(CrossFsMove {
            tree,
            dst,
            _src: src,
            _dir: dir,
        })
    }

    /// The Move of the tree into the destination directory.
    pub fn request(&self) -> envd::proto::filesystem::MoveRequest {
        envd::proto::filesystem::MoveRequest {
            source: self.tree.to_str().unwrap().to_owned(),
            destination: self.dst.join("tree").to_str().unwrap().to_owned(),
        }
    }

    /// The names of envd's hidden temporaries (`.envd-*`) in the
    /// destination directory.
    pub fn hidden(&self) -> Vec<String> {
        std::fs::read_dir(&self.dst)
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".envd-"))
            .collect()
    }
}

/// Starts a process and reads its stream up to the `start` event.
pub async fn started(
    c: &mut ProcessClient<Channel>,
    req: impl tonic::IntoRequest<StartRequest>,
) -> (tonic::Streaming<StartResponse>, Outcome) {
    let mut s = c.start(req).await.expect("Start failed").into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.pid != 0).await;
    (s, o)
}

/// SIGKILLs a process group by pid.
pub async fn kill(c: &mut ProcessClient<Channel>, pid: u32) {
    c.send_signal(SendSignalRequest {
        descendants: false,
        process: by_pid(pid),
        signal: Signal::Sigkill as i32,
    })
    .await
    .expect("SendSignal failed");
}

/// `ProcessInput` of stdin bytes.
pub fn stdin_input(data: &[u8]) -> Option<ProcessInput> {
    Some(ProcessInput {
        input: Some(process_input::Input::Stdin(data.to_vec().into())),
    })
}

/// `ProcessInput` of pty bytes.
pub fn pty_input(data: &[u8]) -> Option<ProcessInput> {
    Some(ProcessInput {
        input: Some(process_input::Input::Pty(data.to_vec().into())),
    })
}

/// SendInput of `input` to `pid`.
pub async fn send_input(
    c: &mut ProcessClient<Channel>,
    pid: u32,
    input: Option<ProcessInput>,
) -> Result<tonic::Response<SendInputResponse>, tonic::Status> {
    c.send_input(SendInputRequest {
        process: by_pid(pid),
        input,
    })
    .await
}

type FsClient = FilesystemClient<Channel>;

/// A WatchDir stream, armed: its `start` event has been read.
pub async fn watch(
    fs: &mut FsClient,
    path: &std::path::Path,
    recursive: bool,
) -> tonic::Streaming<envd::proto::filesystem::WatchDirResponse> {
    use envd::proto::filesystem::{watch_dir_response::Event as W, WatchDirRequest};
    let mut s = fs
        .watch_dir(WatchDirRequest {
            path: path.display().to_string(),
            recursive,
            include_entry: true,
            allow_network_mounts: false,
        })
        .await
        .expect("WatchDir")
        .into_inner();
    match s
        .next()
        .await
        .expect("watch stream")
        .expect("watch event")
        .event
    {
        Some(W::Start(_)) => s,
        other => panic!("first watch event {other:?}"),
    }
}

/// CreateWatcher on `path`: the watcher id, or the error.
pub async fn create_watcher(
    fs: &mut FsClient,
    path: &std::path::Path,
    recursive: bool,
) -> Result<String, tonic::Status> {
    fs.create_watcher(envd::proto::filesystem::CreateWatcherRequest {
        path: path.display().to_string(),
        recursive,
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().watcher_id)
}

/// GetWatcherEvents: the events, or the error.
pub async fn poll_watcher(
    fs: &mut FsClient,
    id: &str,
) -> Result<Vec<envd::proto::filesystem::FilesystemEvent>, tonic::Status> {
    fs.get_watcher_events(envd::proto::filesystem::GetWatcherEventsRequest {
        watcher_id: id.to_owned(),
    })
    .await
    .map(|r| r.into_inner().events)
}
