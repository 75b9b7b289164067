//! `make bench` soak: envd under sustained load stays flat. Figures are
//! printed beside baselines from the same run; nothing here fails on a figure,
//! only on a broken invariant (a failed call, a zombie).
//!
//! 1. `SOAK_STARTS` (default 100,000) Start(/bin/true) from 8 concurrent
//!    clients: spawns/s beside bare fork/exec/wait from 8 threads; RSS, fds
//!    and zombies at the start, middle and end.
//! 2. 1,000 concurrent long-running processes, each with an attached stream.
//! 3. 1,000 concurrent connections, each making a call.

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::procfs::zombie_children;
use common::*;
use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::*;
use tonic::transport::Channel;

const CLIENTS: usize = 8;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn snapshot(label: &str, pid: u32) {
    println!(
        "  {label:<8} RSS {:>7.1} MiB   fds {:>5}   zombies {}",
        rss_kib(pid) as f64 / 1024.0,
        fds(pid),
        zombie_children(pid)
    );
}

fn bare_spawn_rate(n: usize) -> f64 {
    let t = Instant::now();
    let per = n / CLIENTS;
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..per {
                    assert!(Command::new("/bin/true").status().unwrap().success());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (per * CLIENTS) as f64 / t.elapsed().as_secs_f64()
}

async fn client(url: &str) -> ProcessClient<Channel> {
    ProcessClient::new(envd::client::dial(url).await.unwrap())
}

async fn starts(e: &Envd, total: usize) -> f64 {
    let done = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut c = client(&e.tcp).await;
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while done.fetch_add(1, Ordering::Relaxed) < total {
                let o = run(&mut c, cmd("/bin/true", &[])).await;
                assert_eq!(o.end().exit_code, 0);
            }
        }));
    }
    let pid = e.pid();
    let monitor = tokio::spawn({
        let done = done.clone();
        async move {
            let mut reported = false;
            while done.load(Ordering::Relaxed) < total {
                if !reported && done.load(Ordering::Relaxed) >= total / 2 {
                    snapshot("middle", pid);
                    reported = true;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    for t in tasks {
        t.await.unwrap();
    }
    monitor.abort();
    total as f64 / t.elapsed().as_secs_f64()
}

async fn long_running(e: &Envd, n: usize) {
    let before_rss = rss_kib(e.pid());
    let t = Instant::now();
    let mut c = client(&e.tcp).await;
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        let (s, o) = started(&mut c, sh("while :; do echo tick; sleep 5; done")).await;
        streams.push((s, o.pid));
    }
    let elapsed = t.elapsed();
    let rss = rss_kib(e.pid());
    println!(
        "  {n} processes with attached streams started in {:.2} s; envd RSS {:.1} MiB (+{:.1} KiB per process), fds {}",
        elapsed.as_secs_f64(),
        rss as f64 / 1024.0,
        (rss.saturating_sub(before_rss)) as f64 / n as f64,
        fds(e.pid())
    );
    for (_, pid) in &streams {
        kill(&mut c, *pid).await;
    }
    drop(streams);
    tokio::time::sleep(Duration::from_secs(2)).await;
    snapshot("after", e.pid());
}

async fn connections(e: &Envd, n: usize) {
    let before = rss_kib(e.pid());
    let t = Instant::now();
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let mut c = client(&e.tcp).await;
        c.list(ListRequest {}).await.expect("List");
        clients.push(c);
    }
    let rss = rss_kib(e.pid());
    println!(
        "  {n} connections open, one call each, in {:.2} s; envd RSS {:.1} MiB (+{:.1} KiB per connection), fds {}",
        t.elapsed().as_secs_f64(),
        rss as f64 / 1024.0,
        rss.saturating_sub(before) as f64 / n as f64,
        fds(e.pid())
    );
    drop(clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    snapshot("after", e.pid());
}

#[tokio::main]
async fn main() {
    if std::env::args().any(|a| a == "--test" || a == "--list") {
        return; // `cargo test --benches` probing
    }
    envd::limits::raise_nofile(); // 1,000 connections need the fds
    let total: usize = std::env::var("SOAK_STARTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let e = Envd::start(&[]);
    println!("soak: {} (ENVD_BIN or the debug build)", binary());

    println!("1. {total} Start(/bin/true), {CLIENTS} concurrent clients");
    let bare = bare_spawn_rate((total / 10).max(CLIENTS * 100));
    snapshot("start", e.pid());
    let rate = starts(&e, total).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    snapshot("end", e.pid());
    println!(
        "  envd {rate:.0} spawns/s vs bare fork/exec/wait {bare:.0}/s from {CLIENTS} threads: {:.2}x",
        rate / bare
    );
    assert_eq!(zombie_children(e.pid()), 0, "zombies left behind");

    println!("2. 1000 concurrent long-running processes with attached output streams");
    long_running(&e, 1000).await;
    assert_eq!(zombie_children(e.pid()), 0, "zombies left behind");

    println!("3. 1000 concurrent connections");
    connections(&e, 1000).await;
}
