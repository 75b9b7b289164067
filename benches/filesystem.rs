//! `make bench`: filesystem figures beside baselines measured in the same run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::procfs::status_kib;
use common::*;
use envd::proto::filesystem::watch_dir_response::Event as WEvent;
use envd::proto::filesystem::*;
use envd::proto::transfer::write_file_request::Message;
use envd::proto::transfer::*;
use futures_util::StreamExt;

const GIB: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

async fn bench_list(envd: &Envd, root: &Path) {
    let dir = root.join("list10k");
    std::fs::create_dir(&dir).unwrap();
    for i in 0..10_000 {
        std::fs::write(dir.join(format!("file-{i:05}")), "").unwrap();
    }
    let mut fs = envd.fs().await;
    let req = || ListDirRequest {
        path: dir.to_str().unwrap().into(),
        depth: 1,
    };
    assert_eq!(
        fs.list_dir(req()).await.unwrap().into_inner().entries.len(),
        10_000
    );
    let mut times = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let n = fs.list_dir(req()).await.unwrap().into_inner().entries.len();
        times.push(t.elapsed());
        assert_eq!(n, 10_000);
    }
    let t = Instant::now();
    let mut raw = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        std::hint::black_box(e.unwrap().metadata().unwrap().len());
        raw += 1;
    }
    let raw_t = t.elapsed();
    assert_eq!(raw, 10_000);
    println!(
        "ListDir 10,000 entries       median {:>8.2} ms  (raw readdir+lstat in-process: {:.2} ms)",
        median(times).as_secs_f64() * 1e3,
        raw_t.as_secs_f64() * 1e3
    );
}

async fn bench_watch(envd: &Envd, root: &Path) {
    let dir = root.join("watch10k");
    std::fs::create_dir(&dir).unwrap();
    let mut fs = envd.fs().await;
    let mut s = fs
        .watch_dir(WatchDirRequest {
            path: dir.to_str().unwrap().into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        s.next().await.unwrap().unwrap().event,
        Some(WEvent::Start(_))
    ));
    let d = dir.clone();
    let writer = std::thread::spawn(move || {
        let mut created = HashMap::new();
        for i in 0..10_000 {
            let name = format!("f{i}");
            created.insert(name.clone(), Instant::now());
            std::fs::File::create(d.join(&name)).unwrap();
        }
        created
    });
    let mut received = HashMap::new();
    let mut overflow = None;
    while received.len() < 10_000 {
        match tokio::time::timeout(Duration::from_secs(10), s.next()).await {
            Ok(Some(Ok(msg))) => {
                if let Some(WEvent::Filesystem(e)) = msg.event {
                    if e.r#type == EventType::Create as i32 {
                        received.entry(e.name).or_insert_with(Instant::now);
                    }
                }
            }
            Ok(Some(Err(st))) => {
                overflow = Some(format!("{:?}: {}", st.code(), st.message()));
                break;
            }
            _ => break,
        }
    }
    let created = writer.join().unwrap();
    let lat: Vec<Duration> = received
        .iter()
        .filter_map(|(n, t)| created.get(n).map(|c| t.duration_since(*c)))
        .collect();
    println!(
        "watch 10,000 creates         delivered {:>5}  median latency {:>7.2} ms  {}",
        received.len(),
        median(lat).as_secs_f64() * 1e3,
        overflow.map_or("(no overflow)".into(), |o| format!(
            "then ended explicitly: {o}"
        ))
    );
}

/// Raw baseline: the same bytes through a Unix socket into / out of a file.
fn raw_copy(root: &Path, block: &[u8]) -> (f64, f64) {
    let path = root.join("raw.bin");
    let (mut a, mut b) = UnixStream::pair().unwrap();
    let p = path.clone();
    let t = Instant::now();
    let sink = std::thread::spawn(move || {
        let mut f = std::fs::File::create(p).unwrap();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = b.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            f.write_all(&buf[..n]).unwrap();
        }
    });
    for _ in 0..GIB / CHUNK {
        a.write_all(block).unwrap();
    }
    drop(a);
    sink.join().unwrap();
    let up = GIB as f64 / t.elapsed().as_secs_f64();

    let (mut a, mut b) = UnixStream::pair().unwrap();
    let t = Instant::now();
    let src = std::thread::spawn(move || {
        let mut f = std::fs::File::open(path).unwrap();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            b.write_all(&buf[..n]).unwrap();
        }
    });
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = a.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    src.join().unwrap();
    assert_eq!(total, GIB);
    (up, GIB as f64 / t.elapsed().as_secs_f64())
}

async fn bench_transfer(root: &Path) {
    let envd = Envd::start(&[]);
    let block = vec![0x5au8; CHUNK];
    let (raw_up, raw_down) = raw_copy(root, &block);
    // Idle as issue 14 measures it: settled, then again 2 s after the burst.
    tokio::time::sleep(SETTLE).await;
    let idle = status_kib(envd.pid(), "VmRSS:");
    std::fs::remove_file(root.join("raw.bin")).unwrap();
    let mut t = envd.transfer().await;
    let path = root.join("envd.bin");
    let header = WriteFileRequest {
        message: Some(Message::Header(WriteHeader {
            path: path.to_str().unwrap().into(),
            mode: None,
            append: false,
        })),
    };
    let chunk = bytes::Bytes::from(block);
    let chunks = (0..GIB / CHUNK).map(move |_| WriteFileRequest {
        message: Some(Message::Data(chunk.clone())),
    });
    let upload = futures_util::stream::iter(std::iter::once(header).chain(chunks));
    let after = |label: &'static str| {
        let pid = envd.pid();
        async move {
            tokio::time::sleep(SETTLE).await;
            let rss = status_kib(pid, "VmRSS:");
            println!(
                "envd RSS 2 s after {label}: {rss} KiB ({} anon + {} file-backed) = {:+} KiB over idle ({idle} KiB) (target <= +1 MiB)",
                status_kib(pid, "RssAnon:"),
                status_kib(pid, "RssFile:"),
                i128::from(rss) - i128::from(idle)
            );
        }
    };

    let start = Instant::now();
    t.write_file(upload).await.unwrap();
    let up = GIB as f64 / start.elapsed().as_secs_f64();
    after("the 1 GiB write, connection open").await;
    let start = Instant::now();
    let mut s = t
        .read_file(ReadFileRequest {
            path: path.to_str().unwrap().into(),
            offset: None,
            length: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut total = 0;
    while let Some(m) = s.next().await {
        total += m.unwrap().data.len();
    }
    assert_eq!(total, GIB);
    let down = GIB as f64 / start.elapsed().as_secs_f64();
    std::fs::remove_file(&path).unwrap();
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "raw copy via Unix socket     write {:>6.0} MiB/s  read {:>6.0} MiB/s",
        mib(raw_up),
        mib(raw_down)
    );
    println!(
        "envd Transfer over Unix      write {:>6.0} MiB/s = {:.2}x  read {:>6.0} MiB/s = {:.2}x (target >= 0.8x)",
        mib(up),
        up / raw_up,
        mib(down),
        down / raw_down
    );
    println!(
        "envd peak RSS (VmHWM) over the 1 GiB write+read: {:.1} MiB (target <= 32 MiB)",
        status_kib(envd.pid(), "VmHWM:") as f64 / 1024.0
    );
    after("the read too, connection open").await;
    drop(t);
    after("both, connection closed").await;
}

/// Quiet time before memory figures (issue 14's "within 2 s").
const SETTLE: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run under `cargo bench` / `make bench` only");
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("envd-bench-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap();
    println!("== envd filesystem benchmarks");
    let envd = Envd::start(&[]);
    bench_list(&envd, dir.path()).await;
    bench_watch(&envd, dir.path()).await;
    drop(envd);
    // Transfers go to tmpfs when there is one: the figure is about envd's
    // transfer overhead, not the disk's write-back throttling.
    let shm = Path::new("/dev/shm");
    let tdir = if shm.is_dir() {
        tempfile::Builder::new()
            .prefix("envd-bench-")
            .tempdir_in(shm)
            .unwrap()
    } else {
        tempfile::Builder::new()
            .prefix("envd-bench-")
            .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
            .unwrap()
    };
    println!("(transfers in {})", tdir.path().display());
    bench_transfer(tdir.path()).await;
}
