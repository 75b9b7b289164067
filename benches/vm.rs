//! `make bench` in a QEMU microVM (TCG) over hybrid vsock, when QEMU is
//! available: boot-to-ready, Start(/bin/true) round trip beside a raw vsock
//! echo round trip, and 64 MiB transfers beside a raw vsock stream.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../tests/vm/mod.rs"]
mod vm;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::*;
use envd::proto::process::process_client::ProcessClient;
use envd::proto::transfer::transfer_client::TransferClient;
use envd::proto::transfer::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB64: usize = 64 << 20;

/// Raw peers (mode, port, argument): vsock echo and a 64 MiB source, and
/// the guest TCP server's echo and 64 MiB source that forwards reach.
const ROUND_TRIP_AND_FORWARD_PEERS: [(&str, &str, &str); 4] = [
    ("echo", "5001", ""),
    ("source", "5003", "67108864"),
    ("tcp-echo", "6001", ""),
    ("tcp-source", "6003", "67108864"),
];
/// Raw peers for the transfer baselines: a sink, and a sink and a source
/// through a guest file.
const TRANSFER_PEERS: [(&str, &str, &str); 3] = [
    ("sink", "5002", ""),
    ("file-sink", "5004", "/tmp/raw.bin"),
    ("file-source", "5005", "/tmp/raw.bin"),
];

/// Bytes per second as MiB per second.
fn mib(bytes_per_s: f64) -> f64 {
    bytes_per_s / f64::from(1u32 << 20)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn raw(vm: &vm::Vm, port: u32) -> tokio::net::UnixStream {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = tokio::net::UnixStream::connect(vm.dir.join("vsock.sock")).await {
            if envd::client::hybrid_handshake(&mut s, port).await.is_ok() {
                return s;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "vsock peer on port {port} never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run under `cargo bench` / `make bench` only");
        return;
    }
    println!("== envd in a QEMU microVM (TCG) over hybrid vsock");
    if !is_root() {
        println!("skipped: needs root");
        return;
    }
    let a = match vm::assets() {
        Ok(a) => a,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    let peer = PathBuf::from(std::env::var("VSOCK_PEER").unwrap_or_default());
    if !peer.exists() {
        println!("skipped: VSOCK_PEER (the static vsock_peer example) is not set");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The initramfs with the raw peer beside envd.
    let initrd = vm::initramfs(&a, dir.path(), &a.envd, &[]);
    let extra = dir.path().join("initramfs/bin/vsock-peer");
    std::fs::copy(&peer, &extra).unwrap();
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {0}/initramfs && find . -print0 | cpio --null -o -H newc --quiet | gzip -1 > {1}",
            dir.path().display(),
            initrd.display()
        ))
        .status()
        .unwrap();
    assert!(status.success());
    let append = format!("{} envd.listen=vsock://-1:{}", vm::modules_arg(), vm::PORT);
    let vm = vm::Vm::boot(&a, dir.path(), &initrd, &append, None, 256);
    let ch = envd::client::wait_ready(&vm.url(), Duration::from_secs(90))
        .await
        .unwrap();
    println!(
        "boot to ready (QEMU start -> first successful RPC): {:.2} s",
        vm.started.elapsed().as_secs_f64()
    );
    let mut p = ProcessClient::new(ch.clone());
    let _peers = start_peers(&mut p, &ROUND_TRIP_AND_FORWARD_PEERS).await;
    let transfer_peers = start_peers(&mut p, &TRANSFER_PEERS).await;
    // One peer process serves every file transfer: its CPU is the baseline's.
    let file_peers = (transfer_peers[1].1.pid, transfer_peers[2].1.pid);

    start_rows(&vm, &mut p, "1 vCPU").await;
    // `ENVD_BENCH_ONLY=start`: only the boot and the Start row above.
    if std::env::var("ENVD_BENCH_ONLY").as_deref() == Ok("start") {
        return;
    }

    // 64 MiB each way: envd Transfer vs the raw peer.
    let block = vec![0x5au8; 1 << 20];
    let raw_up = send_64mib(&mut raw(&vm, 5002).await, &block).await;
    let mut source = raw(&vm, 5003).await;
    let t = Instant::now();
    assert_eq!(drain(&mut source).await, MIB64);
    let raw_down = MIB64 as f64 / t.elapsed().as_secs_f64();

    // The honest baselines: the same raw streams, into and out of a file in
    // the guest (what envd's transfers do), with the peer's CPU in the guest.
    let cpu0 = guest_cpu_ticks(&mut p, file_peers.0).await;
    let raw_file_up = send_64mib(&mut raw(&vm, 5004).await, &block).await;
    let cpu1 = guest_cpu_ticks(&mut p, file_peers.0).await;
    let cpu2 = guest_cpu_ticks(&mut p, file_peers.1).await;
    let mut fsource = raw(&vm, 5005).await;
    let t = Instant::now();
    assert_eq!(drain(&mut fsource).await, MIB64);
    let raw_file_down = MIB64 as f64 / t.elapsed().as_secs_f64();
    let cpu3 = guest_cpu_ticks(&mut p, file_peers.1).await;
    let raw_cpu = (cpu1 - cpu0, cpu3 - cpu2);
    // The guest's /tmp is RAM: room for one 64 MiB file at a time.
    run(&mut p, cmd("/bin/rm", &["-f", "/tmp/raw.bin"])).await;

    let mut tr = TransferClient::new(ch);
    let e0 = guest_cpu_ticks(&mut p, 1).await;
    let header = WriteFileRequest {
        message: Some(write_file_request::Message::Header(WriteHeader {
            path: "/tmp/bench.bin".into(),
            ..Default::default()
        })),
    };
    let chunk = bytes::Bytes::from(block);
    let data = (0..64).map(move |_| WriteFileRequest {
        message: Some(write_file_request::Message::Data(chunk.clone())),
    });
    let t = Instant::now();
    tr.write_file(futures_util::stream::iter(
        std::iter::once(header).chain(data),
    ))
    .await
    .unwrap();
    let up = MIB64 as f64 / t.elapsed().as_secs_f64();
    let e1 = guest_cpu_ticks(&mut p, 1).await;
    let t = Instant::now();
    let mut s = tr
        .read_file(ReadFileRequest {
            path: "/tmp/bench.bin".into(),
            offset: None,
            length: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = s.next().await {
        n += m.unwrap().data.len();
    }
    assert_eq!(n, MIB64);
    let down = MIB64 as f64 / t.elapsed().as_secs_f64();
    let e2 = guest_cpu_ticks(&mut p, 1).await;
    // Guest CPU seconds per GiB from clock ticks (10 ms) over 64 MiB.
    let per_gib = |ticks: u64| ticks as f64 / 100.0 * 16.0;
    println!(
        "raw vsock stream 64 MiB        host->guest {:>6.0} MiB/s  guest->host {:>6.0} MiB/s (no file)",
        mib(raw_up),
        mib(raw_down)
    );
    println!(
        "raw vsock stream + guest file  write {:>6.0} MiB/s  read {:>6.0} MiB/s; peer CPU {:.2} / {:.2} s per GiB",
        mib(raw_file_up),
        mib(raw_file_down),
        per_gib(raw_cpu.0),
        per_gib(raw_cpu.1)
    );
    println!(
        "envd Transfer 64 MiB           write {:>6.0} MiB/s = {:.2}x  read {:>6.0} MiB/s = {:.2}x the raw stream + file (target >= 0.7x); envd CPU {:.2} / {:.2} s per GiB",
        mib(up),
        up / raw_file_up,
        mib(down),
        down / raw_file_down,
        per_gib(e1 - e0),
        per_gib(e2 - e1)
    );

    forward_rows(&vm, &mut p, "1 vCPU").await;

    // Live upgrade in place (envd is PID 1 here) with the peers running.
    let (rtt, gap, _) = common::downtime::measure(&vm.url()).await;
    println!(
        "live upgrade (PID 1)           longest gap between /health answers {:>6.1} ms = {:.0}x a round trip ({:.2} ms)",
        gap.as_secs_f64() * 1e3,
        gap.as_secs_f64() / rtt.as_secs_f64(),
        rtt.as_secs_f64() * 1e3
    );
    drop(vm);

    // The same forward on two vCPUs (QEMU runs each in its own host thread):
    // the guest's server and envd no longer share one emulated CPU.
    let dir2 = tempfile::tempdir().unwrap();
    let shape = vm::Shape {
        mem_mb: 256,
        cpus: 2,
        nic: "none",
    };
    let vm = vm::Vm::boot_shaped(&a, dir2.path(), &initrd, &append, None, &shape);
    let ch = envd::client::wait_ready(&vm.url(), Duration::from_secs(90))
        .await
        .unwrap();
    let mut p = ProcessClient::new(ch);
    let _peers = start_peers(&mut p, &ROUND_TRIP_AND_FORWARD_PEERS).await;
    start_rows(&vm, &mut p, "2 vCPUs").await;
    forward_rows(&vm, &mut p, "2 vCPUs").await;
    drop(vm);

    sdk_through_proxy_vs_network(&a).await;
}

/// Starts one raw peer per (mode, port, argument) in the guest; their
/// streams and start outcomes (the streams keep them attached).
async fn start_peers(
    p: &mut ProcessClient<tonic::transport::Channel>,
    list: &[(&str, &str, &str)],
) -> Vec<(
    tonic::Streaming<envd::proto::process::StartResponse>,
    Outcome,
)> {
    let mut peers = Vec::new();
    for (mode, port, arg) in list {
        peers.push(started(p, cmd("/bin/vsock-peer", &[mode, port, arg])).await);
    }
    peers
}

/// Start(/bin/true)->end from the host beside its baseline in the same
/// guest: a bare spawn inside the guest plus a raw vsock echo (the peer on
/// 5001 echoes).
async fn start_rows(vm: &vm::Vm, p: &mut ProcessClient<tonic::transport::Channel>, label: &str) {
    run(p, cmd("/bin/true", &[])).await;
    let starts: Vec<Duration> = {
        let mut v = Vec::new();
        for _ in 0..50 {
            let t = Instant::now();
            let o = run(p, cmd("/bin/true", &[])).await;
            v.push(t.elapsed());
            assert_eq!(o.end().exit_code, 0);
        }
        v
    };
    let mut echo = raw(vm, 5001).await;
    let mut buf = [0u8; 64];
    let echoes: Vec<Duration> = {
        let mut v = Vec::new();
        for _ in 0..200 {
            let t = Instant::now();
            echo.write_all(&[7u8; 64]).await.unwrap();
            echo.read_exact(&mut buf).await.unwrap();
            v.push(t.elapsed());
        }
        v
    };
    // In-guest context: what a bare spawn of /bin/true costs inside the guest
    // (a shell loop of 21 spawns minus one of 1, over 20).
    let loop_of = |n: u32| format!("i=0; while [ $i -lt {n} ]; do /bin/true; i=$((i+1)); done");
    let t = Instant::now();
    run(p, sh(&loop_of(1))).await;
    let one = t.elapsed();
    let t = Instant::now();
    run(p, sh(&loop_of(21))).await;
    let guest_spawn = t.elapsed().saturating_sub(one) / 20;
    let (st, ec) = (median(starts), median(echoes));
    let base = guest_spawn + ec;
    println!(
        "[{label}] Start(/bin/true)->end  median {:>8.2} ms = {:.2}x a bare spawn inside the guest ({:.2} ms) + a raw 64 B vsock echo ({:.3} ms) (target <= 1.5x)",
        st.as_secs_f64() * 1e3,
        st.as_secs_f64() / base.as_secs_f64(),
        guest_spawn.as_secs_f64() * 1e3,
        ec.as_secs_f64() * 1e3,
    );
}

/// Port forwarding (the HTTP CONNECT tunnel `envctl forward` opens per
/// connection) beside raw vsock in `vm`, whose peers serve vsock echo on
/// 5001 and 64 MiB on 5003, TCP echo on 6001 and 64 MiB on 6003: setup + a
/// 64 B round trip, and 64 MiB from the guest's TCP server, in interleaved
/// rounds; then the guest's loopback TCP alone.
async fn forward_rows(vm: &vm::Vm, p: &mut ProcessClient<tonic::transport::Channel>, label: &str) {
    let target: envd::client::Target = vm.url().parse().unwrap();
    let mut buf = [0u8; 64];
    let mut raw_setups = Vec::new();
    let mut fwd_setups = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let mut s = raw(vm, 5001).await;
        s.write_all(&[1u8; 64]).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        raw_setups.push(t.elapsed());
        let t = Instant::now();
        let (mut s, early) = envd::client::forward::open(&target, 6001, None)
            .await
            .unwrap();
        assert!(early.is_empty());
        s.write_all(&[1u8; 64]).await.unwrap();
        s.read_exact(&mut buf).await.unwrap();
        fwd_setups.push(t.elapsed());
    }
    let (rs, fs) = (median(raw_setups), median(fwd_setups));
    // Three interleaved rounds of 64 MiB: raw vsock, then the forward.
    let mut raw_times = Vec::new();
    let mut fwd_times = Vec::new();
    for _ in 0..3 {
        let mut source = raw(vm, 5003).await;
        let t = Instant::now();
        assert_eq!(drain(&mut source).await, MIB64);
        raw_times.push(t.elapsed());
        let t = Instant::now();
        let (mut s, early) = envd::client::forward::open(&target, 6003, None)
            .await
            .unwrap();
        let got = early.len() + drain(&mut s).await;
        fwd_times.push(t.elapsed());
        assert_eq!(got, MIB64);
    }
    let rate = |d: Duration| MIB64 as f64 / d.as_secs_f64();
    let (raw_down, fwd_down) = (rate(median(raw_times)), rate(median(fwd_times)));
    // The floor under a forward: the same 64 MiB read by a process in the
    // guest over its loopback TCP, no vsock at all.
    let o = run(p, cmd("/bin/vsock-peer", &["drain-tcp", "6003"])).await;
    let line = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut f = line.split_whitespace();
    let n: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
    let secs: f64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN);
    assert_eq!(n, MIB64 as u64, "{line}");
    let loopback = MIB64 as f64 / secs;
    println!(
        "[{label}] raw vsock 64 MiB guest->host {:>6.0} MiB/s (median of 3); guest loopback TCP alone {:>6.0} MiB/s = {:.2}x raw vsock",
        mib(raw_down),
        mib(loopback),
        loopback / raw_down
    );
    println!(
        "[{label}] forward: connect + 64 B echo  median {:>6.2} ms = {:.2}x raw vsock ({:.2} ms); 64 MiB guest->host {:>6.0} MiB/s = {:.2}x raw vsock (median of 3, interleaved; target >= 0.8x), = {:.2}x the guest's loopback TCP alone",
        fs.as_secs_f64() * 1e3,
        fs.as_secs_f64() / rs.as_secs_f64(),
        rs.as_secs_f64() * 1e3,
        mib(fwd_down),
        fwd_down / raw_down,
        fwd_down / loopback
    );
}

/// utime + stime (clock ticks) of a guest process, read through envd.
async fn guest_cpu_ticks(p: &mut ProcessClient<tonic::transport::Channel>, pid: u32) -> u64 {
    let o = run(p, cmd("/bin/cat", &[&format!("/proc/{pid}/stat")])).await;
    common::procfs::stat_cpu_ticks(&o.out())
}

/// 64 MiB to a raw `sink`-style peer (the length first, the byte count
/// back); bytes per second.
async fn send_64mib(s: &mut tokio::net::UnixStream, block: &[u8]) -> f64 {
    let t = Instant::now();
    s.write_all(&(MIB64 as u64).to_be_bytes()).await.unwrap();
    for _ in 0..MIB64 / block.len() {
        s.write_all(block).await.unwrap();
    }
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    let rate = MIB64 as f64 / t.elapsed().as_secs_f64();
    assert_eq!(usize::try_from(u64::from_be_bytes(count)).unwrap(), MIB64);
    rate
}

/// Reads `s` to its end; the byte count.
async fn drain<R: tokio::io::AsyncRead + Unpin>(s: &mut R) -> usize {
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            return got;
        }
        got += n;
    }
}

/// Official Python SDK calls into the systemd VM through `envctl proxy`
/// (hybrid vsock) beside the same over the VM's TCP network (QEMU user-mode
/// networking with a host forward), same run.
async fn sdk_through_proxy_vs_network(a: &vm::Assets) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/sdk-venv/bin/python");
    let Some(rootfs) = vm::debian_rootfs() else {
        println!("SDK via proxy vs network: skipped (no cached Debian rootfs)");
        return;
    };
    if !python.exists() {
        println!("SDK via proxy vs network: skipped (no SDK virtualenv; make sdk-deps)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let network = "[Match]\nName=en* eth*\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n";
    let img = vm::systemd_image_with(
        a,
        &rootfs,
        dir.path(),
        &[
            ("/etc/systemd/network/10-eth.network", network),
            (
                "/etc/systemd/system/sysinit.target.wants/systemd-networkd.service",
                "symlink:/lib/systemd/system/systemd-networkd.service",
            ),
        ],
    );
    let initrd = vm::switch_root_initramfs(a, dir.path());
    let port = vm::free_port();
    let nic = format!("user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{port}-:49983");
    let vm = vm::Vm::boot_with_nic(a, dir.path(), &initrd, "", Some(&img), 512, &nic);
    if envd::client::wait_ready(&vm.url(), Duration::from_secs(180))
        .await
        .is_err()
    {
        println!("SDK via proxy vs network: skipped (the systemd VM did not come up)");
        return;
    }
    let net = format!("tcp://127.0.0.1:{port}");
    if envd::client::wait_ready(&net, Duration::from_secs(90))
        .await
        .is_err()
    {
        println!("SDK via proxy vs network: skipped (no network in the VM)");
        return;
    }
    let bound = common::proxy_to(&vm.url()).await;
    let median_us = |url: String, call: &'static str| {
        let python = python.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                let out = std::process::Command::new(python)
                    .args([
                        "tests/sdk/bench_run_true.py",
                        &url.replace("tcp://", "http://"),
                        "30",
                        call,
                    ])
                    .current_dir(env!("CARGO_MANIFEST_DIR"))
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<f64>()
                    .unwrap_or(f64::NAN)
            })
            .await
            .unwrap()
        }
    };
    // The login shell of commands.run dominates its call under TCG; a
    // small RPC and a 1 MiB read show the transports themselves.
    for (call, what) in [
        ("run", "commands.run(\"true\")"),
        ("list", "commands.list()"),
        ("read", "files.read(1 MiB)"),
    ] {
        // Interleaved rounds: proxy, network, proxy, network.
        let mut proxy = Vec::new();
        let mut network = Vec::new();
        for _ in 0..2 {
            proxy.push(median_us(bound.clone(), call).await);
            network.push(median_us(net.clone(), call).await);
        }
        let best = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        let (p, n) = (best(&proxy), best(&network));
        println!(
            "SDK {what:<22} in the systemd VM: via envctl proxy (vsock) {:>6.1} ms = {:.2}x via the VM's TCP network ({:.1} ms)",
            p / 1e3,
            p / n,
            n / 1e3
        );
    }
}
