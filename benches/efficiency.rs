//! `make bench`: what envd costs per call and at rest, each figure beside a
//! baseline measured in the same run. Every Connect row goes through one
//! client (keep-alive HTTP/1.1, as the SDKs use), every gRPC row through
//! tonic; rounds are interleaved so that the machine's noise hits all rows
//! alike, and the spread between rounds is printed as the noise.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::connect_client::{json_output_len, Codec, ConnectClient};
use common::procfs::{cpu_ticks, status_kib};
use common::*;
use envd::proto::process::process_event::{data_event::Output, Event};
use envd::proto::process::StartResponse;
use futures_util::StreamExt;
use prost::Message;

/// Start calls per row and round.
const CALLS: usize = 500;
const ROUNDS: usize = 4;
const STREAM_BYTES: u64 = 512 << 20;
const STREAM_ROUNDS: usize = 3;
/// How long envd gets to give memory back after a burst.
const SETTLE: Duration = Duration::from_secs(2);

#[derive(Default)]
struct Row {
    times: Vec<Duration>,
    /// CPU ticks (10 ms) of the measured process over this row's calls.
    ticks: u64,
    /// Median of each round, for the spread.
    round_medians: Vec<Duration>,
}

impl Row {
    fn add_round(&mut self, mut t: Vec<Duration>, ticks: u64) {
        t.sort();
        self.round_medians.push(t[t.len() / 2]);
        self.times.extend(t);
        self.ticks += ticks;
    }
    fn median_us(&self) -> f64 {
        let mut v = self.times.clone();
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e6
    }
    fn cpu_ms_per_call(&self) -> f64 {
        self.ticks as f64 * 10.0 / self.times.len() as f64
    }
    /// (max - min) / median of the round medians, in percent.
    fn spread(&self) -> f64 {
        let min = self.round_medians.iter().min().unwrap().as_secs_f64();
        let max = self.round_medians.iter().max().unwrap().as_secs_f64();
        (max - min) / (self.median_us() / 1e6) * 100.0
    }
}

/// CPU time of the calling thread, for the bare baseline's parent side.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(
        u64::try_from(ts.tv_sec).unwrap(),
        u32::try_from(ts.tv_nsec).unwrap(),
    )
}

fn memory(pid: u32) -> String {
    format!(
        "{:>6} KiB ({} anon + {} file-backed, {} threads)",
        status_kib(pid, "VmRSS:"),
        status_kib(pid, "RssAnon:"),
        status_kib(pid, "RssFile:"),
        status_kib(pid, "Threads:"),
    )
}

/// fork/exec/wait of /bin/true from one thread; (times, parent CPU).
fn bare_spawns(n: usize) -> (Vec<Duration>, Duration) {
    std::thread::spawn(move || {
        let cpu = thread_cpu();
        let times = (0..n)
            .map(|_| {
                let t = Instant::now();
                assert!(Command::new("/bin/true").status().unwrap().success());
                t.elapsed()
            })
            .collect();
        (times, thread_cpu() - cpu)
    })
    .join()
    .unwrap()
}

const TRUE_JSON: &[u8] = br#"{"process":{"cmd":"/bin/true"}}"#;

async fn connect_starts(c: &mut ConnectClient, codec: Codec, n: usize) -> Vec<Duration> {
    let req = match codec {
        Codec::Json => TRUE_JSON.to_vec(),
        Codec::Proto => cmd("/bin/true", &[]).encode_to_vec(),
    };
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut ended = false;
        let trailer = c
            .stream("process.Process/Start", codec, &req, |m| match codec {
                Codec::Json => ended |= m.windows(6).any(|w| w == b"\"end\":"),
                Codec::Proto => {
                    let r = StartResponse::decode(m).unwrap();
                    if let Some(Event::End(e)) = r.event.and_then(|e| e.event) {
                        assert_eq!(e.exit_code, 0);
                        ended = true;
                    }
                }
            })
            .await;
        times.push(t.elapsed());
        assert!(ended && trailer.as_ref() == b"{}", "{trailer:?}");
    }
    times
}

async fn grpc_starts(
    c: &mut envd::proto::process::process_client::ProcessClient<tonic::transport::Channel>,
    n: usize,
) -> Vec<Duration> {
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let o = run(c, cmd("/bin/true", &[])).await;
        times.push(t.elapsed());
        assert_eq!(o.end().exit_code, 0);
    }
    times
}

fn head_args() -> Vec<String> {
    vec!["-c".into(), STREAM_BYTES.to_string(), "/dev/zero".into()]
}

fn bare_pipe() -> Duration {
    let t = Instant::now();
    let mut child = Command::new("head")
        .args(head_args())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    child.wait().unwrap();
    assert_eq!(total, STREAM_BYTES);
    t.elapsed()
}

/// A stdout stream's wall time and its number of output messages.
type Streamed = (Duration, u64);

async fn connect_stream(c: &mut ConnectClient, codec: Codec) -> Streamed {
    let args = head_args();
    let req = match codec {
        Codec::Json => format!(
            r#"{{"process":{{"cmd":"head","args":["{}","{}","{}"]}}}}"#,
            args[0], args[1], args[2]
        )
        .into_bytes(),
        Codec::Proto => cmd("head", &["-c", &args[1], "/dev/zero"]).encode_to_vec(),
    };
    let t = Instant::now();
    let (mut total, mut messages) = (0u64, 0u64);
    c.stream("process.Process/Start", codec, &req, |m| {
        let n = match codec {
            Codec::Json => json_output_len(m) as u64,
            Codec::Proto => {
                let r = StartResponse::decode(m).unwrap();
                match r.event.and_then(|e| e.event) {
                    Some(Event::Data(d)) => match d.output {
                        Some(Output::Stdout(b)) => b.len() as u64,
                        _ => 0,
                    },
                    _ => 0,
                }
            }
        };
        total += n;
        messages += u64::from(n > 0);
    })
    .await;
    assert_eq!(total, STREAM_BYTES);
    (t.elapsed(), messages)
}

/// `bytes` of stdout through native gRPC; how long it took.
async fn grpc_stream(
    c: &mut envd::proto::process::process_client::ProcessClient<tonic::transport::Channel>,
    bytes: u64,
) -> Streamed {
    let t = Instant::now();
    let mut s = c
        .start(cmd("head", &["-c", &bytes.to_string(), "/dev/zero"]))
        .await
        .unwrap()
        .into_inner();
    let (mut total, mut messages) = (0u64, 0u64);
    while let Some(ev) = s.next().await {
        if let Some(Event::Data(d)) = ev.unwrap().event.unwrap().event {
            if let Some(Output::Stdout(b)) = d.output {
                total += b.len() as u64;
                messages += 1;
            }
        }
    }
    assert_eq!(total, bytes);
    (t.elapsed(), messages)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run under `cargo bench` / `make bench` only");
        return;
    }
    // `ENVD_BENCH_ONLY=memory`: only the back-to-idle figures.
    // `ENVD_BENCH_ONLY=stream`: only the stdout stream rows (`start`: only
    // the Start rows, below).
    match std::env::var("ENVD_BENCH_ONLY").as_deref() {
        Ok("memory") => {
            back_to_idle().await;
            return;
        }
        Ok("stream") => {
            let envd = Envd::start(&[]);
            let mut json = ConnectClient::dial(&envd.tcp).await;
            let mut proto = ConnectClient::dial(&envd.tcp).await;
            let mut grpc = envd.client().await;
            stream_rows(envd.pid(), &mut json, &mut proto, &mut grpc).await;
            return;
        }
        _ => {}
    }
    let envd = Envd::start(&[]);
    let pid = envd.pid();
    tokio::time::sleep(SETTLE).await;
    let idle_text = memory(pid);

    let mut json = ConnectClient::dial(&envd.tcp).await;
    let mut proto = ConnectClient::dial(&envd.tcp).await;
    // A second envd as systemd runs it with crash records on: every command's
    // fds go to the fd store (a stand-in that keeps them, as systemd does)
    // and the state record is rewritten as commands start and end.
    let store = common::fdstore::FdStore::new();
    let (mut stored_envd, stored_urls, _stored_log) =
        store.spawn(&["--listen".to_owned(), "tcp://127.0.0.1:0".to_owned()]);
    let stored_pid = stored_envd.id();
    let mut stored = ConnectClient::dial(&stored_urls[0]).await;
    let mut grpc = envd.client().await;
    // Warm up every connection.
    connect_starts(&mut json, Codec::Json, 5).await;
    connect_starts(&mut proto, Codec::Proto, 5).await;
    grpc_starts(&mut grpc, 5).await;

    let mut r_stored = Row::default();
    connect_starts(&mut stored, Codec::Proto, 5).await;
    let (mut bare, mut r_json, mut r_proto, mut r_grpc) = (
        Row::default(),
        Row::default(),
        Row::default(),
        Row::default(),
    );
    let mut bare_cpu = Duration::ZERO;
    for _ in 0..ROUNDS {
        let (t, cpu) = bare_spawns(CALLS);
        bare_cpu += cpu;
        bare.add_round(t, 0);
        let t0 = cpu_ticks(pid);
        let t = connect_starts(&mut json, Codec::Json, CALLS).await;
        r_json.add_round(t, cpu_ticks(pid) - t0);
        let t0 = cpu_ticks(pid);
        let t = connect_starts(&mut proto, Codec::Proto, CALLS).await;
        r_proto.add_round(t, cpu_ticks(pid) - t0);
        let t0 = cpu_ticks(stored_pid);
        let t = connect_starts(&mut stored, Codec::Proto, CALLS).await;
        r_stored.add_round(t, cpu_ticks(stored_pid) - t0);
        let t0 = cpu_ticks(pid);
        let t = grpc_starts(&mut grpc, CALLS).await;
        r_grpc.add_round(t, cpu_ticks(pid) - t0);
    }
    let calls = CALLS * ROUNDS;
    println!(
        "== envd efficiency ({calls} calls per row in {ROUNDS} interleaved rounds; spread = range of round medians)"
    );
    let base = bare.median_us();
    println!(
        "spawn /bin/true   bare fork/exec/wait    {base:>7.0} us  parent CPU {:.3} ms per spawn  (spread {:.0}%)",
        bare_cpu.as_secs_f64() * 1e3 / calls as f64,
        bare.spread()
    );
    for (name, row) in [
        ("Connect JSON ", &r_json),
        ("Connect proto", &r_proto),
        ("native gRPC  ", &r_grpc),
    ] {
        println!(
            "Start(/bin/true)  {name}          {:>7.0} us = {:.2}x bare (target <= 1.2x)  envd CPU {:.3} ms per call (target <= 0.10)  (spread {:.0}%)",
            row.median_us(),
            row.median_us() / base,
            row.cpu_ms_per_call(),
            row.spread()
        );
    }
    println!(
        "Start(/bin/true)  Connect proto, crash records on (systemd fd store stand-in) {:>7.0} us = {:.2}x bare  envd CPU {:.3} ms per call = {:.2}x the same without  (spread {:.0}%)",
        r_stored.median_us(),
        r_stored.median_us() / base,
        r_stored.cpu_ms_per_call(),
        r_stored.cpu_ms_per_call() / r_proto.cpu_ms_per_call(),
        r_stored.spread()
    );
    let _ = stored_envd.kill();
    let _ = stored_envd.wait();
    // `ENVD_BENCH_ONLY=start`: only the Start rows above.
    if std::env::var("ENVD_BENCH_ONLY").as_deref() == Ok("start") {
        return;
    }
    stream_rows(pid, &mut json, &mut proto, &mut grpc).await;
    println!("idle RSS          after start-up         {idle_text} (target <= 4 MiB)");
    println!(
        "peak RSS          (VmHWM)                {:>6} KiB",
        status_kib(pid, "VmHWM:")
    );
    drop(envd);
    back_to_idle().await;
}

/// Streams of stdout through each protocol beside a bare pipe read, in
/// interleaved rounds.
async fn stream_rows(
    pid: u32,
    json: &mut ConnectClient,
    proto: &mut ConnectClient,
    grpc: &mut envd::proto::process::process_client::ProcessClient<tonic::transport::Channel>,
) {
    let mut pipe = Vec::new();
    let (mut s_json, mut s_proto, mut s_grpc) = (Vec::new(), Vec::new(), Vec::new());
    let mut stream_ticks = [0u64; 3];
    // The client's own CPU (this thread runs the whole client): a row whose
    // client is busy nearly all the time measures the client, not envd.
    let mut client = [Duration::ZERO; 3];
    let mut messages = [0u64; 3];
    for _ in 0..STREAM_ROUNDS {
        pipe.push(bare_pipe());
        let (t0, c0) = (cpu_ticks(pid), thread_cpu());
        let (wall, m0) = connect_stream(json, Codec::Json).await;
        s_json.push(wall);
        let (t1, c1) = (cpu_ticks(pid), thread_cpu());
        let (wall, m1) = connect_stream(proto, Codec::Proto).await;
        s_proto.push(wall);
        let (t2, c2) = (cpu_ticks(pid), thread_cpu());
        let (wall, m2) = grpc_stream(grpc, STREAM_BYTES).await;
        s_grpc.push(wall);
        let (t3, c3) = (cpu_ticks(pid), thread_cpu());
        for (i, m) in [m0, m1, m2].into_iter().enumerate() {
            messages[i] += m;
        }
        for (i, d) in [t1 - t0, t2 - t1, t3 - t2].into_iter().enumerate() {
            stream_ticks[i] += d;
        }
        for (i, d) in [c1 - c0, c2 - c1, c3 - c2].into_iter().enumerate() {
            client[i] += d;
        }
    }
    let walls: Vec<f64> = [&s_json, &s_proto, &s_grpc]
        .iter()
        .map(|v| v.iter().map(Duration::as_secs_f64).sum())
        .collect();
    let mib_s = |mut v: Vec<Duration>| {
        v.sort();
        STREAM_BYTES as f64 / (1 << 20) as f64 / v[v.len() / 2].as_secs_f64()
    };
    let gib = (STREAM_BYTES as f64 * STREAM_ROUNDS as f64) / f64::from(1u32 << 30);
    let pipe = mib_s(pipe);
    println!(
        "stream stdout     bare pipe read         {pipe:>7.0} MiB/s  ({STREAM_ROUNDS} rounds of {} MiB)",
        STREAM_BYTES >> 20
    );
    for (i, (name, v, target)) in [
        ("Connect JSON ", s_json, 0.5),
        ("Connect proto", s_proto, 0.8),
        ("native gRPC  ", s_grpc, 0.8),
    ]
    .into_iter()
    .enumerate()
    {
        let r = mib_s(v);
        println!(
            "stream stdout     {name}          {r:>7.0} MiB/s = {:.2}x bare (target >= {target}x)  envd CPU {:.2} s per GiB; the client's {:.2} (busy {:.0}% of the row); {:.1} KiB per message",
            r / pipe,
            stream_ticks[i] as f64 / 100.0 / gib,
            client[i].as_secs_f64() / gib,
            client[i].as_secs_f64() / walls[i] * 100.0,
            (STREAM_BYTES * STREAM_ROUNDS as u64) as f64 / messages[i] as f64 / 1024.0
        );
    }
}

/// A fresh envd: idle, then 1,000 Starts, then a 1 GiB stdout stream, each
/// followed by [`SETTLE`] of quiet (the issue's definition), measured with
/// the client's connection still open and again once it has closed (what an
/// open connection keeps is the connection's own buffers).
async fn back_to_idle() {
    let envd = Envd::start(&[]);
    let pid = envd.pid();
    // Idle as the figures after each burst are taken: settled, after the
    // start-up's own memory was given back.
    tokio::time::sleep(SETTLE).await;
    let idle = status_kib(pid, "VmRSS:");
    let delta = |after: u64| i128::from(after) - i128::from(idle);
    let settled = || async {
        tokio::time::sleep(SETTLE).await;
        (status_kib(pid, "VmRSS:"), memory(pid))
    };
    println!("memory (a fresh envd, idle {idle} KiB)");
    let mut c = ConnectClient::dial(&envd.tcp).await;
    connect_starts(&mut c, Codec::Json, 1000).await;
    let (open, text) = settled().await;
    println!(
        "  2 s after 1,000 Starts, connection open     {text} = {:+} KiB (target <= +1 MiB)",
        delta(open)
    );
    drop(c);
    let (closed, text) = settled().await;
    println!(
        "  2 s after 1,000 Starts, connection closed   {text} = {:+} KiB (target <= +1 MiB)",
        delta(closed)
    );
    let mut g = envd.client().await;
    let (took, _) = grpc_stream(&mut g, 1 << 30).await;
    let peak = status_kib(pid, "VmHWM:");
    let (open, text) = settled().await;
    println!(
        "  2 s after 1 GiB of stdout ({:.1} s, gRPC), open {text} = {:+} KiB (target <= +1 MiB); peak {peak} KiB",
        took.as_secs_f64(),
        delta(open)
    );
    drop(g);
    let (closed, text) = settled().await;
    println!(
        "  2 s after 1 GiB of stdout, connection closed {text} = {:+} KiB (target <= +1 MiB)",
        delta(closed)
    );
}
