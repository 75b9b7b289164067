//! `make bench`: process service figures, each beside a baseline measured in
//! the same run, printed as ratios. Not a test: it never fails on a figure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::procfs::{cpu_ticks, status_kib};
use common::*;
use futures_util::StreamExt;

const SPAWNS: usize = 300;
/// Seconds each idle-CPU figure is measured over.
const IDLE_SECS: u64 = 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn envd_spawn(url: &str) -> Duration {
    let mut c = envd::proto::process::process_client::ProcessClient::new(
        envd::client::dial(url).await.unwrap(),
    );
    // Warm up the connection.
    run(&mut c, cmd("/bin/true", &[])).await;
    let mut times = Vec::with_capacity(SPAWNS);
    for _ in 0..SPAWNS {
        let t = Instant::now();
        let o = run(&mut c, cmd("/bin/true", &[])).await;
        times.push(t.elapsed());
        assert_eq!(o.end().exit_code, 0);
    }
    median(times)
}

/// envd's CPU (ms per s) over `secs` seconds, with a Ports.Watch stream
/// open when `watch` (measured in steady state: the first scan looks up the
/// owner of every listener, a walk of /proc/*/fd; later scans only of new
/// ones).
async fn envd_cpu(envd: &Envd, secs: u64, watch: bool) -> f64 {
    use envd::proto::ports::ports_client::PortsClient;
    use envd::proto::ports::WatchPortsRequest;
    let mut drain = None;
    if watch {
        let mut c = PortsClient::new(envd::client::dial(&envd.unix).await.unwrap());
        let mut s = c.watch(WatchPortsRequest {}).await.unwrap().into_inner();
        drain = Some(tokio::spawn(
            async move { while s.next().await.is_some() {} },
        ));
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let t0 = cpu_ticks(envd.pid());
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let per_s = (cpu_ticks(envd.pid()) - t0) as f64 * 10.0 / secs as f64;
    if let Some(d) = drain {
        d.abort();
    }
    per_s
}

/// envd's CPU over `secs` seconds with a Ports.Watch stream open while
/// `pairs` loopback connections are open in the machine, beside what one
/// read of `/proc/net/tcp` (every socket, which the scan used to read each
/// second) takes here then.
async fn busy_machine_ports_watch(envd: &Envd, pairs: usize, secs: u64) -> (f64, Duration) {
    envd::limits::raise_nofile();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let at = l.local_addr().unwrap();
    let mut held = Vec::with_capacity(pairs * 2);
    for _ in 0..pairs {
        held.push(std::net::TcpStream::connect(at).unwrap());
        held.push(l.accept().unwrap().0);
    }
    let t = Instant::now();
    let table = std::fs::read("/proc/net/tcp").unwrap();
    let proc_read = t.elapsed();
    assert!(table.len() > pairs * 100, "the table lists the connections");
    let watching = envd_cpu(envd, secs, true).await;
    drop(held);
    (watching, proc_read)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run under `cargo bench` / `make bench` only");
        return;
    }
    let envd = Envd::start(&[]);

    println!("== envd process benchmarks (medians of {SPAWNS} runs; ratios vs. a baseline from this run; Start and streaming figures: the efficiency bench)");
    // Spawn with a cgroup of its own per command (resource control) beside
    // the same envd build without it, both in this run.
    match common::cgroup::TestCgroup::create("bench") {
        Some(cg) if is_root() => {
            let placed = cg.envd();
            let unix = envd_spawn(&envd.unix).await;
            let with_cg = envd_spawn(&placed.unix).await;
            println!(
                "Start(/bin/true)  in its own cgroup    {:>8.0} us  = {:.2}x without (target <= 1.2x)",
                us(with_cg),
                us(with_cg) / us(unix)
            );
        }
        _ => println!(
            "Start in its own cgroup: skipped (needs root and a writable cgroup v2 hierarchy)"
        ),
    }

    // Live upgrade in place while 20 commands run (10 of them printing).
    let mut c = envd::proto::process::process_client::ProcessClient::new(
        envd::client::dial(&envd.unix).await.unwrap(),
    );
    let mut busy = Vec::new();
    for i in 0..20 {
        let script = if i % 2 == 0 {
            "while :; do echo tick; sleep 0.01; done"
        } else {
            "sleep 600"
        };
        busy.push(started(&mut c, sh(script)).await);
    }
    let (rtt, gap, up) = common::downtime::measure(&envd.tcp).await;
    println!("live upgrade      /health round trip   {:>8.0} us", us(rtt));
    println!(
        "live upgrade      longest gap between answers {:>6.1} ms = {:.0}x a round trip (target <= 50 ms), 20 commands carried; client saw {} ms after the upload",
        gap.as_secs_f64() * 1e3,
        gap.as_secs_f64() / rtt.as_secs_f64(),
        up.downtime.as_millis()
    );
    for (_, o) in &busy {
        kill(&mut c, o.pid).await;
    }
    drop(busy);
    let idle = envd_cpu(&envd, IDLE_SECS, false).await;
    let watching = envd_cpu(&envd, IDLE_SECS, true).await;
    println!(
        "idle CPU          no stream / Ports.Watch open  {idle:.1} / {watching:.1} ms per s (1 scan of the listening sockets per s; over {IDLE_SECS} s, one 10 ms clock tick = {:.1} ms per s)",
        10.0 / IDLE_SECS as f64
    );
    let pairs = 8_000;
    let (busy_watch, proc_read) = busy_machine_ports_watch(&envd, pairs, IDLE_SECS).await;
    println!(
        "busy CPU          Ports.Watch open, {pairs} loopback connections  {busy_watch:.1} ms per s (sock_diag: listeners only); one read of /proc/net/tcp then {:.1} ms",
        proc_read.as_secs_f64() * 1e3
    );
    println!(
        "peak RSS          envd (VmHWM)         {:>8} KiB",
        status_kib(envd.pid(), "VmHWM:")
    );
}
