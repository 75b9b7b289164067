//! `make bench`: E2B-compatibility figures (Python SDK round trip, `/files`
//! transfers) beside baselines measured in the same run.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;

const GIB: usize = 1 << 30;
const CHUNK: usize = 1 << 20;

fn mibs(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / (1 << 20) as f64
}

fn sdk_round_trip(envd: &Envd) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/sdk-venv/bin/python");
    if !python.exists() {
        println!("commands.run(\"true\") via Python SDK: skipped (no SDK venv; run make sdk-deps)");
        return;
    }
    let url = envd.tcp.replace("tcp://", "http://");
    let out = Command::new(python)
        .arg(root.join("tests/sdk/bench_run_true.py"))
        .arg(&url)
        .arg("50")
        .output()
        .unwrap();
    let us: f64 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(f64::NAN);
    // Baseline: what the SDK asks envd to run (`/bin/bash -l -c true`, a
    // login shell), spawned bare from this process with envd's clean
    // environment.
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    let mut bare: Vec<f64> = (0..50)
        .map(|_| {
            let t = Instant::now();
            Command::new("/bin/bash")
                .args(["-l", "-c", "true"])
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("HOME", &home)
                .env("USER", &user)
                .env("LOGNAME", &user)
                .status()
                .unwrap();
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    bare.sort_by(f64::total_cmp);
    let base = bare[bare.len() / 2];
    println!(
        "commands.run(\"true\") via Python SDK   median {us:>8.0} us = {:.2}x a bare `bash -l -c true` ({base:.0} us)",
        us / base
    );
}

/// Raw baseline over loopback TCP: the same bytes into / out of a file.
fn raw_copy(dir: &Path) -> (f64, f64) {
    let path = dir.join("raw.bin");
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let p = path.clone();
    let t = Instant::now();
    let sink = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut f = std::fs::File::create(p).unwrap();
        std::io::copy(&mut s, &mut f).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let block = vec![0x5au8; CHUNK];
    for _ in 0..GIB / CHUNK {
        c.write_all(&block).unwrap();
    }
    drop(c);
    sink.join().unwrap();
    let up = mibs(GIB, t.elapsed().as_secs_f64());

    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = Instant::now();
    let src = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        std::io::copy(&mut f, &mut s).unwrap();
        std::fs::remove_file(path).unwrap();
    });
    let mut c = TcpStream::connect(addr).unwrap();
    let n = std::io::copy(&mut c, &mut std::io::sink()).unwrap();
    src.join().unwrap();
    assert_eq!(usize::try_from(n).unwrap(), GIB);
    (up, mibs(GIB, t.elapsed().as_secs_f64()))
}

fn files_transfer(dir: &Path) {
    let (raw_up, raw_down) = raw_copy(dir);
    let envd = Envd::start(&[]);
    let target = dir.join("envd.bin");
    let addr = envd.tcp.strip_prefix("tcp://").unwrap().to_owned();
    let t = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "POST /files?path={} HTTP/1.1\r\nhost: envd\r\nconnection: close\r\ncontent-type: application/octet-stream\r\ncontent-length: {GIB}\r\n\r\n",
        target.display()
    )
    .unwrap();
    let block = vec![0x5au8; CHUNK];
    for _ in 0..GIB / CHUNK {
        s.write_all(&block).unwrap();
    }
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    let up = mibs(GIB, t.elapsed().as_secs_f64());

    let t = Instant::now();
    let mut s = TcpStream::connect(&addr).unwrap();
    write!(
        s,
        "GET /files?path={} HTTP/1.1\r\nhost: envd\r\nconnection: close\r\n\r\n",
        target.display()
    )
    .unwrap();
    let n = usize::try_from(std::io::copy(&mut s, &mut std::io::sink()).unwrap()).unwrap();
    assert!(n > GIB);
    let down = mibs(GIB, t.elapsed().as_secs_f64());
    std::fs::remove_file(&target).unwrap();
    let hwm = std::fs::read_to_string(format!("/proc/{}/status", envd.pid()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().to_owned()))
        .unwrap_or_default();
    println!("raw copy via loopback TCP             upload {raw_up:>6.0} MiB/s  download {raw_down:>6.0} MiB/s");
    println!(
        "/files octet-stream 1 GiB             upload {up:>6.0} MiB/s = {:.2}x  download {down:>6.0} MiB/s = {:.2}x (target >= 0.8x)",
        up / raw_up,
        down / raw_down
    );
    println!("envd peak RSS (VmHWM) over the /files transfers: {hwm} (target <= 32 MiB)");
}

/// One request on a kept-alive connection; the reply's status. Replies
/// must carry a `content-length` (envd's do for these).
fn round_trip(s: &mut std::io::BufReader<TcpStream>, req: &[u8]) -> u16 {
    use std::io::BufRead;
    s.get_mut().write_all(req).unwrap();
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    let status = line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut len = 0usize;
    loop {
        line.clear();
        s.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            assert!(!k.eq_ignore_ascii_case("transfer-encoding"), "{l}");
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap();
            }
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    status
}

fn median_us(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Small uploads, where the per-request work shows: a 4 KiB `POST /files`
/// five directories deep, beside a `/health` round trip on the same
/// connection (interleaved) and the same write + rename done in-process.
fn small_uploads(dir: &Path) {
    const N: usize = 2000;
    let envd = Envd::start(&[]);
    let addr = envd.tcp.strip_prefix("tcp://").unwrap().to_owned();
    let deep = dir.join("a/b/c/d");
    std::fs::create_dir_all(&deep).unwrap();
    let target = deep.join("small");
    let body = vec![0x5au8; 4096];
    let mut upload = format!(
        "POST /files?path={} HTTP/1.1\r\nhost: envd\r\ncontent-type: application/octet-stream\r\ncontent-length: {}\r\n\r\n",
        target.display(),
        body.len()
    )
    .into_bytes();
    upload.extend_from_slice(&body);
    let health = b"GET /health HTTP/1.1\r\nhost: envd\r\n\r\n";
    let conn = TcpStream::connect(&addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut s = std::io::BufReader::new(conn);
    let (mut up, mut rt, mut local) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..N {
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, &upload), 200);
        up.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        assert_eq!(round_trip(&mut s, health), 204);
        rt.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        let tmp = deep.join(format!(".local-{i}"));
        std::fs::write(&tmp, &body).unwrap();
        std::fs::rename(&tmp, deep.join("local")).unwrap();
        local.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let (up, rt, local) = (median_us(up), median_us(rt), median_us(local));
    println!(
        "/files 4 KiB upload, 5 dirs deep     median {up:>6.0} us = /health round trip {rt:.0} us + {:.0} us; the same write + rename in-process {local:.0} us ({N} each, interleaved)",
        up - rt
    );
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmarks run under `cargo bench` / `make bench` only");
        return;
    }
    println!("== envd E2B-compatibility benchmarks");
    let envd = Envd::start(&[]);
    sdk_round_trip(&envd);
    drop(envd);
    let shm = Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_path_buf()
    } else {
        Path::new(env!("CARGO_TARGET_TMPDIR")).to_path_buf()
    };
    let dir = tempfile::Builder::new()
        .prefix("envd-bench-")
        .tempdir_in(base)
        .unwrap();
    println!("(transfers in {})", dir.path().display());
    files_transfer(dir.path());
    small_uploads(dir.path());
}
