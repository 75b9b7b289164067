//! Regression tests for the hardening issue: each test reproduces one way a
//! caller or a process inside the sandbox could crash envd, exhaust it or
//! corrupt data, against the real binary over real sockets.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{addr, post_json, request, Reply};
use common::*;
use envd::proto::filesystem::*;
use envd::proto::process::*;
use envd::proto::transfer::ReadFileRequest;
use futures_util::StreamExt;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// envd still answers `/health` (and so has not crashed or stalled).
fn healthy(e: &Envd) {
    let r = request(&e.tcp, "GET", "/health", &[], b"");
    assert_eq!(r.status, 204, "envd no longer answers /health");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A new empty directory `name` in a temporary directory (kept while the
/// returned guard lives).
fn empty_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::create_dir(&path).unwrap();
    (dir, path)
}

/// `Connect` to `pid` from offset 0, read until `until` holds.
async fn replay(
    c: &mut envd::proto::process::process_client::ProcessClient<tonic::transport::Channel>,
    pid: u32,
    until: impl Fn(&Outcome) -> bool,
) -> Outcome {
    let mut s = c
        .connect(ConnectRequest {
            process: by_pid(pid),
            resume_offset: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, until).await;
    o
}

/// fds of `pid` whose link target contains `what`.
fn fds_like(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains(what))
        .count()
}

/// A chain of `levels` nested directories `d/d/d/...` under `root`.
fn deep_chain(root: &Path, levels: usize) -> PathBuf {
    let mut p = root.to_path_buf();
    for _ in 0..levels {
        p.push("d");
    }
    std::fs::create_dir_all(&p).unwrap();
    std::fs::write(p.join("leaf"), b"x").unwrap();
    p
}

/// Deep enough to overflow a worker's stack when walked recursively
/// (~1,750 levels did), shallow enough for paths under PATH_MAX.
const DEEP: usize = 1_950;

// Defect 1: trees of any depth are walked without recursion.
#[tokio::test]
async fn deep_trees_do_not_crash_watch_list_remove_or_move() {
    let e = Envd::start(&[]);
    let mut fs = e.fs().await;
    let dir = tempfile::tempdir().unwrap();
    let watched = dir.path().join("w");
    std::fs::create_dir(&watched).unwrap();
    let mut stream = watch(&mut fs, &watched, true).await;
    let poller = create_watcher(&mut fs, &watched, true).await.unwrap();

    // A sandboxed process moves a deep tree into the watched directory.
    let outside = dir.path().join("t");
    deep_chain(&outside, DEEP);
    std::fs::rename(&outside, watched.join("t")).unwrap();
    // The watch scans the new tree; the last event is the deepest leaf.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut seen_leaf = false;
    while !seen_leaf && Instant::now() < deadline {
        let item = tokio::time::timeout(Duration::from_secs(30), stream.next()).await;
        match item {
            Ok(Some(Ok(r))) => {
                if let Some(watch_dir_response::Event::Filesystem(ev)) = r.event {
                    seen_leaf = ev.name.ends_with("/leaf");
                }
            }
            other => panic!("watch stream ended: {other:?}"),
        }
    }
    assert!(seen_leaf, "the deep leaf was never reported");
    healthy(&e);
    // The polling watcher scans the same tree; it gets there too.
    let mut polled = 0;
    for _ in 0..300 {
        polled += poll_watcher(&mut fs, &poller)
            .await
            .expect("polling watcher survives")
            .len();
        if polled > DEEP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(polled > DEEP, "the polling watcher saw {polled} events");

    // ListDir with an unbounded depth.
    let listed = fs
        .list_dir(ListDirRequest {
            path: s(&watched),
            depth: u32::MAX,
        })
        .await
        .expect("ListDir")
        .into_inner();
    assert_eq!(listed.entries.len(), DEEP + 2); // t, DEEP-1 more d, leaf... + t itself

    // Remove the whole tree.
    fs.remove(RemoveRequest {
        path: s(&watched.join("t")),
    })
    .await
    .expect("Remove");
    assert!(!watched.join("t").exists());
    healthy(&e);
}

// Defect 1 (move): a deep tree across filesystems is copied iteratively.
// Defect 7: a pre-1970 mtime is copied, not a panic, and no temp file stays.
#[tokio::test]
async fn cross_filesystem_move_of_deep_trees_and_old_files() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("tmpfs");
    let Some(_tmpfs) = Tmpfs::mount("cross_filesystem_move", &mnt, "size=64m") else {
        return;
    };
    let e = Envd::start(&[]);
    let mut fs = e.fs().await;
    let src = dir.path().join("tree");
    deep_chain(&src, 1_500);
    let old = src.join("old");
    std::fs::write(&old, b"1969").unwrap();
    let status = std::process::Command::new("touch")
        .args(["-m", "-d", "1969-07-20 20:17:00 UTC"])
        .arg(&old)
        .status()
        .unwrap();
    assert!(status.success());
    let dst = mnt.join("moved");
    fs.r#move(MoveRequest {
        source: s(&src),
        destination: s(&dst),
    })
    .await
    .expect("Move across filesystems");
    assert!(!src.exists());
    let m = std::fs::metadata(dst.join("old")).unwrap();
    assert!(m.mtime() < 0, "mtime not preserved: {}", m.mtime());
    let leftovers: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "moved")
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
    healthy(&e);
}

// Defect 2: /init with a wrong token is refused before its body is read; an
// unproven caller may send only a small body; bodies have a time limit.
#[test]
fn init_checks_the_token_before_the_body_and_bounds_it() {
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "secret").unwrap();
    let tf = s(token_file.path());
    let e = Envd::start(&["--access-token-file", &tf, "--body-timeout", "2"]);
    // Announce 1 MiB, send none of it: the answer must not wait for it.
    let mut c = TcpStream::connect(addr(&e.tcp)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(
        b"POST /init HTTP/1.1\r\nhost: envd\r\nx-access-token: wrong\r\ncontent-length: 1048576\r\n\r\n",
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 401"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    // No token shown: a body above 16 KiB is refused.
    let big = format!(
        r#"{{"accessToken":"secret","envVars":{{"A":"{}"}}}}"#,
        "x".repeat(20_000)
    );
    let r = post_json(&e.tcp, "/init", &big);
    assert_eq!(r.status, 413, "{}", r.text());

    // A body that never completes times out.
    let t = Instant::now();
    let mut c = TcpStream::connect(addr(&e.tcp)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    c.write_all(
        b"POST /init HTTP/1.1\r\nhost: envd\r\nx-access-token: secret\r\ncontent-length: 100\r\n\r\n{",
    )
    .unwrap();
    let n = c.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    assert!(t.elapsed() < Duration::from_secs(15));
    healthy(&e);
}

// Defect 2: many slow unauthenticated bodies cannot add up.
#[test]
fn slow_bodies_share_one_budget() {
    let e = Envd::start(&["--body-timeout", "60"]);
    let before = rss_kib(e.pid());
    let body = vec![b' '; (1 << 20) - 1];
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..150 {
        let mut c = TcpStream::connect(addr(&e.tcp)).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        // A refused body is answered and its connection closed mid-write.
        let _ = c
            .write_all(b"POST /init HTTP/1.1\r\nhost: envd\r\ncontent-length: 1048576\r\n\r\n")
            .and_then(|()| c.write_all(&body));
        held.push(c);
    }
    std::thread::sleep(Duration::from_millis(500));
    for c in &mut held {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 12];
        if let Ok(n) = c.read(&mut buf) {
            if buf[..n].starts_with(b"HTTP/1.1 503") {
                refused += 1;
            }
        }
    }
    let grown_mib = rss_kib(e.pid()).saturating_sub(before) / 1024;
    assert!(refused > 0, "no body was refused by the shared budget");
    assert!(grown_mib < 110, "RSS grew by {grown_mib} MiB");
    drop(held);
    healthy(&e);
}

// Defect 3: envd raises its own soft fd limit; commands get the original.
#[tokio::test]
async fn envd_raises_its_fd_limit_but_not_its_commands() {
    let e = Envd::start_with_ulimit(&[], "-Sn 256");
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", e.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let soft: u64 = line.split_whitespace().nth(3).unwrap().parse().unwrap();
    let hard: u64 = line.split_whitespace().nth(4).unwrap().parse().unwrap();
    assert_eq!(soft, hard, "soft limit not raised: {line}");

    let mut c = e.client().await;
    let o = run(&mut c, sh("ulimit -Sn")).await;
    assert_eq!(
        o.out().trim(),
        "256",
        "commands must keep the original limit"
    );
}

// Defect 3: idle and half-sent connections cannot exhaust fds, even when
// the hard limit is low.
#[tokio::test]
async fn idle_connections_cannot_exhaust_fds() {
    let e = Envd::start_with_ulimit(&["--idle-timeout", "2"], "-n 256");
    // Far more idle connections (some with half a request) than fds.
    let mut idle = Vec::new();
    for i in 0..400u32 {
        let Ok(mut c) = TcpStream::connect(addr(&e.tcp)) else {
            break;
        };
        if i.is_multiple_of(2) {
            let _ = c.write_all(b"GET /health HTTP/1.1\r\nhost: en");
        }
        idle.push(c);
    }
    // envd still answers, on a new connection and with a command.
    std::thread::sleep(Duration::from_millis(200));
    let log = e.log.lock().unwrap().clone();
    let refused = log.iter().filter(|l| l.contains("refused")).count();
    let accept_failed = log.iter().filter(|l| l.contains("accept failed")).count();
    eprintln!(
        "refused {refused}, accept failed {accept_failed}, open fds {}",
        fds_like(e.pid(), "")
    );
    healthy(&e);
    let mut c = e.client().await;
    assert_eq!(run(&mut c, sh("echo ok")).await.out(), "ok\n");

    // A half-sent request is closed after the idle timeout.
    let mut slow = TcpStream::connect(addr(&e.tcp)).unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nhost: en").unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = slow.read(&mut buf).unwrap_or(0);
    assert!(
        n == 0 || !buf.starts_with(b"HTTP/1.1 2"),
        "served a half request"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "half request kept open"
    );
}

// Defect 4: size and content of a download come from the same file.
#[test]
fn downloads_during_atomic_replace_are_never_mixed() {
    let e = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("f");
    std::fs::write(&target, vec![b'a'; 1_000]).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let dir = dir.path().to_path_buf();
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (b, n) = if i.is_multiple_of(2) {
                    (b'b', 3_000)
                } else {
                    (b'a', 1_000)
                };
                let tmp = dir.join(format!("tmp{i}"));
                std::fs::write(&tmp, vec![b; n]).unwrap();
                std::fs::rename(&tmp, dir.join("f")).unwrap();
                i += 1;
            }
        })
    };
    let q = format!("/files?path={}", s(&target));
    for _ in 0..1_500 {
        let r = request(&e.tcp, "GET", &q, &[], b"");
        assert_eq!(r.status, 200);
        let ok = r.body == vec![b'a'; 1_000] || r.body == vec![b'b'; 3_000];
        assert!(ok, "mixed download: {} bytes", r.body.len());
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().unwrap();
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

// Defects 5 and 6: special files are refused, never opened blocking, never
// replaced; writes go through symlinks; compose takes regular files only.
#[tokio::test]
async fn special_files_are_refused_and_symlinks_written_through() {
    let e = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    mkfifo(&fifo);
    let q = format!("/files?path={}", s(&fifo));
    // Many at once: none may hang a thread.
    let handles: Vec<_> = (0..64)
        .map(|_| {
            let (u, q) = (e.tcp.clone(), q.clone());
            std::thread::spawn(move || request(&u, "GET", &q, &[], b"").status)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), 400);
    }
    let mut t = e.transfer().await;
    let r = t
        .read_file(ReadFileRequest {
            path: s(&fifo),
            ..Default::default()
        })
        .await;
    assert_eq!(code(r), tonic::Code::InvalidArgument);

    // Upload onto the FIFO: refused, the FIFO stays.
    let r = upload(&e, &s(&fifo), b"x");
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    if is_root() {
        let dev = dir.path().join("null");
        nix::sys::stat::mknod(
            &dev,
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
        let r = upload(&e, &s(&dev), b"x");
        assert_eq!(r.status, 400, "{}", r.text());
        assert!(std::fs::symlink_metadata(&dev)
            .unwrap()
            .file_type()
            .is_char_device());
    } else {
        skip("device-node part", "needs root for mknod");
    }

    // Upload onto a symlink writes through it.
    let real = dir.path().join("real");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("link");
    std::os::unix::fs::symlink("real", &link).unwrap();
    let up = format!("/files?path={}", s(&link));
    let r = request(
        &e.tcp,
        "POST",
        &up,
        &[("content-type", "application/octet-stream")],
        b"new",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&real).unwrap(), b"new");

    // Compose: non-regular sources and source == destination are 400, and
    // nothing is deleted.
    let compose = |sources: &[&Path], dest: &Path| {
        let body = serde_json::json!({
            "source_paths": sources.iter().map(|p| s(p)).collect::<Vec<_>>(),
            "destination": s(dest),
        });
        post_json(&e.tcp, "/files/compose", &body.to_string())
    };
    let r = compose(&[&real, &fifo], &dir.path().join("c"));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = compose(&[&real, Path::new("/dev/zero")], &dir.path().join("c"));
    assert_eq!(r.status, 400, "{}", r.text());
    let r = compose(&[&real], &real);
    assert_eq!(r.status, 400, "{}", r.text());
    let r = compose(&[&real], &link);
    assert_eq!(r.status, 400, "{}", r.text());
    // Every source is held open until the copy: their number is bounded.
    let many: Vec<&Path> = std::iter::repeat_n(real.as_path(), 1001).collect();
    let r = compose(&many, &dir.path().join("c"));
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(real.exists() && fifo.exists());
    // A good compose answers with E2B's shape.
    let other = dir.path().join("other");
    std::fs::write(&other, b"+").unwrap();
    let dest = dir.path().join("c");
    let r = compose(&[&real, &other], &dest);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json(),
        serde_json::json!({"path": s(&dest), "name": "c", "type": "file"})
    );
    assert_eq!(std::fs::read(&dest).unwrap(), b"new+");
    healthy(&e);
}

fn upload(e: &Envd, path_query: &str, body: &[u8]) -> Reply {
    request(
        &e.tcp,
        "POST",
        &format!("/files?path={path_query}"),
        &[("content-type", "application/octet-stream")],
        body,
    )
}

/// Percent-encodes every byte but unreserved ASCII.
fn pct(b: &[u8]) -> String {
    b.iter()
        .map(|&c| {
            if c.is_ascii_alphanumeric() || b"-._~/".contains(&c) {
                char::from(c).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

// Defects 8 and 9, non-UTF-8 names, gzip junk.
#[test]
fn every_legal_name_uploads_and_downloads() {
    let e = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    // A name with a newline and control bytes.
    let odd = dir.path().join("a\nb\x01\"c");
    std::fs::write(&odd, b"odd").unwrap();
    let r = request(
        &e.tcp,
        "GET",
        &format!("/files?path={}", pct(odd.as_os_str().as_bytes())),
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, b"odd");
    let cd = r.header("content-disposition").unwrap();
    assert!(cd.contains("filename*=UTF-8''a%0Ab%01%22c"), "{cd}");

    // 233..=255-byte names (the temporary file used to be 23 bytes longer).
    for len in [233, 240, 255] {
        let name = "n".repeat(len);
        let p = dir.path().join(&name);
        let r = upload(&e, &pct(p.as_os_str().as_bytes()), b"long");
        assert_eq!(r.status, 200, "{len}: {}", r.text());
        assert_eq!(std::fs::read(&p).unwrap(), b"long");
    }

    // Non-UTF-8 names, both ways.
    let raw = [dir.path().as_os_str().as_bytes(), b"/\xff\xfe.bin"].concat();
    let p = Path::new(std::ffi::OsStr::from_bytes(&raw));
    let r = upload(&e, &pct(&raw), b"bytes");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read(p).unwrap(), b"bytes");
    let r = request(
        &e.tcp,
        "GET",
        &format!("/files?path={}", pct(&raw)),
        &[],
        b"",
    );
    assert_eq!((r.status, r.body.as_slice()), (200, &b"bytes"[..]));

    // gzip with trailing junk is bad input, not a server error.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(b"payload").unwrap();
    let mut body = gz.finish().unwrap();
    body.extend_from_slice(b"junk after the gzip stream");
    let p = dir.path().join("gz");
    let r = request(
        &e.tcp,
        "POST",
        &format!("/files?path={}", s(&p)),
        &[
            ("content-type", "application/octet-stream"),
            ("content-encoding", "gzip"),
        ],
        &body,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(!p.exists());
}

// Defect 10: CloseStdin does not wait behind a SendInput that is blocked on
// a child that never reads.
#[tokio::test]
async fn close_stdin_while_input_is_blocked() {
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let mut req = sh("sleep 30");
    req.stdin = Some(true);
    let (_stream, o) = started(&mut c, req).await;
    let pid = o.pid;
    let mut writer = e.client().await;
    let blocked =
        tokio::spawn(
            async move { send_input(&mut writer, pid, stdin_input(&[b'x'; 1 << 20])).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!blocked.is_finished(), "the pipe should be full");
    tokio::time::timeout(
        Duration::from_secs(5),
        c.close_stdin(CloseStdinRequest {
            process: by_pid(pid),
        }),
    )
    .await
    .expect("CloseStdin hung behind SendInput")
    .expect("CloseStdin failed");
    let r = tokio::time::timeout(Duration::from_secs(5), blocked)
        .await
        .expect("SendInput still blocked")
        .unwrap();
    assert_eq!(code(r), tonic::Code::FailedPrecondition);
    kill(&mut c, pid).await;
}

// Defect 12: a scan of a new directory does not show envd's temporary files.
// Nor does a watch show the kernel's `#<inode>` placeholder of an upload's
// unnamed file (`O_TMPFILE`) before its rename; a real file named so shows.
#[tokio::test]
async fn uploads_into_new_directories_show_no_temp_files() {
    let e = Envd::start(&[]);
    let mut fs = e.fs().await;
    let dir = tempfile::tempdir().unwrap();
    let mut stream = watch(&mut fs, dir.path(), true).await;
    for i in 0..10 {
        let p = dir.path().join(format!("new{i}/sub/file"));
        let r = upload(&e, &s(&p), b"data");
        assert_eq!(r.status, 200);
    }
    let r = upload(&e, &pct(s(&dir.path().join("#42")).as_bytes()), b"data");
    assert_eq!(r.status, 200);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let mut names = Vec::new();
    while let Ok(Some(Ok(r))) = tokio::time::timeout_at(deadline, stream.next()).await {
        if let Some(watch_dir_response::Event::Filesystem(ev)) = r.event {
            names.push(ev.name);
        }
    }
    assert!(names.iter().any(|n| n.ends_with("sub/file")), "{names:?}");
    assert!(names.iter().any(|n| n == "#42"), "{names:?}");
    let temps: Vec<_> = names
        .iter()
        .filter(|n| n.contains(".envd-") || (n.contains('#') && *n != "#42"))
        .collect();
    assert!(temps.is_empty(), "temporary files reported: {temps:?}");
}

// Bounds: all watches share one inotify instance and are capped.
#[tokio::test]
async fn watchers_share_one_inotify_instance_and_are_capped() {
    let e = Envd::start(&["--max-watches", "150"]);
    let mut fs = e.fs().await;
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for _ in 0..150 {
        ids.push(
            create_watcher(&mut fs, dir.path(), false)
                .await
                .expect("CreateWatcher"),
        );
    }
    assert_eq!(fds_like(e.pid(), "inotify"), 1);
    let r = create_watcher(&mut fs, dir.path(), false).await;
    assert_eq!(code(r), tonic::Code::ResourceExhausted);
    // Every watcher still sees events; removing one frees a slot.
    std::fs::write(dir.path().join("x"), b"1").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for id in [&ids[0], &ids[149]] {
        let evs = poll_watcher(&mut fs, id).await.unwrap();
        assert!(evs.iter().any(|e| e.name == "x"), "{evs:?}");
    }
    fs.remove_watcher(RemoveWatcherRequest {
        watcher_id: ids[0].clone(),
    })
    .await
    .unwrap();
    // The slot is released once the removed watcher's task has stopped.
    let mut freed = false;
    for _ in 0..40 {
        if create_watcher(&mut fs, dir.path(), false).await.is_ok() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(freed, "a slot was freed");
}

// Bounds: output kept for unattached processes has a global budget.
#[tokio::test]
async fn unattached_output_has_a_global_budget() {
    let e = Envd::start(&["--output-budget", "8388608"]);
    let mut c = e.client().await;
    let mut pids = Vec::new();
    for _ in 0..40 {
        let (stream, o) = started(&mut c, sh("head -c 2097152 /dev/zero; sleep 30")).await;
        drop(stream); // detached: output is retained for re-attach
        pids.push(o.pid);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_mib = rss_kib(e.pid()) / 1024;
    assert!(
        rss_mib < 60,
        "RSS {rss_mib} MiB with an 8 MiB output budget"
    );
    let mut lost_total = 0;
    for pid in &pids {
        let o = replay(&mut c, *pid, |o| o.start.is_some()).await;
        lost_total += o.start.as_ref().unwrap().output_lost.unwrap_or(0);
    }
    assert!(lost_total > 0, "nothing reported lost");
    for pid in pids {
        kill(&mut c, pid).await;
    }
}

// Bounds: output written a few bytes at a time costs envd memory in
// proportion to the bytes kept, not one read buffer per write. (Each `echo`
// was a chunk holding a 64 KiB buffer: 300,000 lines took envd to 260 MiB.)
#[tokio::test]
async fn tiny_writes_cost_memory_in_proportion_to_the_output() {
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let dir = tempfile::tempdir().unwrap();
    let idle = rss_kib(e.pid());
    // One source: 300,000 two-byte writes (600,000 bytes, under the 1 MiB
    // kept per process); then stdout and stderr alternating, which cannot
    // be merged. Each process stays alive, so nothing is compacted yet.
    let scripts = [
        "i=0; while [ $i -lt 300000 ]; do echo x; i=$((i+1)); done",
        "i=0; while [ $i -lt 150000 ]; do echo x; echo y >&2; i=$((i+1)); done",
    ];
    let mut pids = Vec::new();
    for (n, script) in scripts.iter().enumerate() {
        let done = dir.path().join(format!("done{n}"));
        let script = format!("{script}; touch {}; sleep 60", done.display());
        let (stream, o) = started(&mut c, sh(&script)).await;
        drop(stream); // detached: nobody reads, the log keeps what it may
        pids.push(o.pid);
        assert!(
            eventually(Duration::from_secs(120), || done.exists()).await,
            "writer {n} did not finish"
        );
    }
    let grown_mib = rss_kib(e.pid()).saturating_sub(idle) / 1024;
    assert!(grown_mib < 48, "envd grew by {grown_mib} MiB");
    // Merging lost nothing: the single-source output replays in full.
    let o = replay(&mut c, pids[0], |o| o.stdout.len() >= 600_000).await;
    assert_eq!(o.start.as_ref().unwrap().output_lost.unwrap_or(0), 0);
    assert!(o.stdout.iter().all(|&b| b == b'x' || b == b'\n'));
    assert_eq!(o.stdout.len(), 600_000);
    for pid in pids {
        kill(&mut c, pid).await;
    }
    healthy(&e);
}

// Bounds: a listing larger than a response may carry stops with
// RESOURCE_EXHAUSTED instead of being built whole (a directory of 300,000
// files took envd to 745 MiB over Connect JSON, which then answered with a
// 70 MB body; gRPC built it to fail encoding it).
#[tokio::test]
async fn oversized_listings_stop_early_with_a_clear_error() {
    let e = Envd::start(&[]);
    let (_dir, big) = empty_dir("big");
    // 40,000 entries of ~500 encoded bytes each: ~20 MB listed.
    let stem = "n".repeat(240);
    for i in 0..40_000 {
        std::fs::File::create(big.join(format!("{stem}{i:06}"))).unwrap();
    }
    let hwm = |pid| common::procfs::status_kib(pid, "VmHWM");
    let before = hwm(e.pid());
    let mut fs = e.fs().await;
    let err = fs
        .list_dir(ListDirRequest {
            path: s(&big),
            depth: 1,
        })
        .await
        .expect_err("a 20 MB listing");
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("exceeds the 16 MiB"),
        "{}",
        err.message()
    );
    let r = post_json(
        &e.tcp,
        "/filesystem.Filesystem/ListDir",
        &serde_json::json!({ "path": s(&big) }).to_string(),
    );
    assert_eq!(r.json()["code"], "resource_exhausted", "{}", r.text());
    let grown_mib = hwm(e.pid()).saturating_sub(before) / 1024;
    assert!(grown_mib < 100, "envd's peak grew by {grown_mib} MiB");
    // A small directory beside it still lists.
    let small = big.join("small");
    std::fs::create_dir(&small).unwrap();
    std::fs::File::create(small.join("a")).unwrap();
    let listed = fs
        .list_dir(ListDirRequest {
            path: s(&small),
            depth: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    healthy(&e);
}

// Bounds: watches whose clients do not read hold a bounded number of bytes
// of events, however long the paths (each queued up to 16,384 raw events of
// any size: 8 such watches and 30,000 files with 3 KiB paths took envd to
// 542 MiB). The lost events are reported as DATA_LOSS once read.
#[tokio::test]
async fn unread_watches_hold_bounded_event_bytes() {
    let e = Envd::start(&[]);
    let (_dir, root) = empty_dir("w");
    let mut streams = Vec::new();
    for _ in 0..8 {
        let mut fs = e.fs().await;
        streams.push(watch(&mut fs, &root, true).await);
    }
    let mut fs = e.fs().await;
    let poller = create_watcher(&mut fs, &root, true).await.unwrap();
    let before = rss_kib(e.pid());
    // 15 levels of 200-byte names, then 30,000 files with 200-byte names.
    let mut deep = root.clone();
    for _ in 0..15 {
        deep.push("d".repeat(200));
        std::fs::create_dir(&deep).unwrap();
        // Each level is watched before the next appears.
        std::thread::sleep(Duration::from_millis(20));
    }
    let stem = "f".repeat(200);
    for i in 0..30_000 {
        std::fs::File::create(deep.join(format!("{stem}{i}"))).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown_mib = rss_kib(e.pid()).saturating_sub(before) / 1024;
    println!("envd grew by {grown_mib} MiB with 8 unread watches");
    assert!(grown_mib < 64, "envd grew by {grown_mib} MiB");
    // A stream read now tells that events were lost.
    let mut s = streams.pop().unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match s.next().await {
                Some(Ok(_)) => continue,
                Some(Err(status)) => return Some(status.code()),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream neither ended nor failed");
    assert_eq!(ended, Some(tonic::Code::DataLoss));
    // The polling watcher buffered what one answer can carry (10,000
    // events of 3 KiB would not fit in 16 MiB): every poll answers, with
    // events or DATA_LOSS.
    let mut lost = false;
    for _ in 0..3 {
        match poll_watcher(&mut fs, &poller).await {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::DataLoss => lost = true,
            Err(status) => panic!("poll failed: {status:?}"),
        }
    }
    assert!(lost, "the polling watcher never reported its loss");
    healthy(&e);
}

// Bounds: /init refuses environment variables no process could get.
#[test]
fn init_validates_env_vars() {
    let e = Envd::start(&[]);
    for bad in [
        r#"{"envVars":{"":"x"}}"#,
        r#"{"envVars":{"A=B":"x"}}"#,
        r#"{"envVars":{"A":"x\u0000y"}}"#,
    ] {
        let r = post_json(&e.tcp, "/init", bad);
        assert_eq!(r.status, 400, "{bad}: {}", r.text());
    }
    // Nothing of the refused requests was applied (E2B_SANDBOX is envd's).
    let r = request(&e.tcp, "GET", "/envs", &[], b"");
    assert_eq!(r.json(), serde_json::json!({"E2B_SANDBOX": "false"}));
}

// A request timeout too large to represent is not a crash.
#[test]
fn huge_timeouts_are_no_deadline() {
    let e = Envd::start(&[]);
    let r = request(
        &e.tcp,
        "POST",
        "/process.Process/List",
        &[
            ("content-type", "application/json"),
            ("connect-timeout-ms", "18446744073709551615"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    healthy(&e);
}

// Found by the soak benchmark: ended processes kept their stdin pipe or pty
// master open while their exit record was retained (up to 256 fds).
#[tokio::test]
async fn ended_processes_hold_no_fds() {
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    run(&mut c, sh("true")).await;
    let before = fds_like(e.pid(), "");
    for i in 0..40u32 {
        let mut req = sh("echo done");
        req.stdin = Some(true);
        if i.is_multiple_of(4) {
            req.pty = Some(Pty {
                size: Some(pty::Size { cols: 80, rows: 24 }),
            });
        }
        let o = run(&mut c, req).await;
        assert_eq!(o.end().exit_code, 0);
    }
    // Closing is asynchronous after the end event: wait for it, bounded.
    let settled = eventually(Duration::from_secs(10), || {
        fds_like(e.pid(), "") <= before + 4
    })
    .await;
    let after = fds_like(e.pid(), "");
    assert!(settled, "fds grew from {before} to {after}");
}

// The answer to a multipart upload lists every file written: their number is
// bounded.
#[test]
fn multipart_uploads_write_a_bounded_number_of_files() {
    let e = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let mut body = Vec::new();
    for i in 0..10_001 {
        let part = format!(
            "--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{}/f{i}\"\r\n\r\nx\r\n",
            s(dir.path())
        );
        body.extend_from_slice(part.as_bytes());
    }
    body.extend_from_slice(b"--B--\r\n");
    let r = request(
        &e.tcp,
        "POST",
        "/files",
        &[("content-type", "multipart/form-data; boundary=B")],
        &body,
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("at most 10000 files"), "{}", r.text());
    healthy(&e);
}

/// 14 levels of 250-byte names under `root`, made: paths near 3.5 KiB.
fn long_path(root: &Path) -> PathBuf {
    let deep = root.join(vec!["d".repeat(250); 14].join("/"));
    std::fs::create_dir_all(&deep).unwrap();
    deep
}

// Bounds: what a recursive watch holds per directory is bounded by bytes,
// not only by the kernel's count of watches: long paths cost envd memory.
#[tokio::test]
async fn recursive_watches_of_many_long_directories_are_bounded() {
    let e = Envd::start(&[]);
    let (_dir, root) = empty_dir("w");
    // Directories with 200-byte names under a long path: each path near 3.8
    // KiB. 20,000 of them in one directory...
    let deep = long_path(&root);
    let wide = deep.join("wide");
    std::fs::create_dir_all(&wide).unwrap();
    let stem = "s".repeat(200);
    for i in 0..20_000 {
        std::fs::create_dir(wide.join(format!("{stem}{i}"))).unwrap();
    }
    // ...and 100 directories of 100 each.
    let spread = deep.join("spread");
    for i in 0..100 {
        for j in 0..100 {
            std::fs::create_dir_all(spread.join(format!("{stem}{i}/{j}"))).unwrap();
        }
    }
    let mut fs = e.fs().await;
    let before = rss_kib(e.pid());
    for top in [&wide, &spread] {
        let r = fs
            .watch_dir(WatchDirRequest {
                path: s(top),
                recursive: true,
                include_entry: false,
                allow_network_mounts: false,
            })
            .await;
        let status = match r {
            Ok(_) => panic!("a watch of {} was armed", s(top)),
            Err(status) => status,
        };
        assert_eq!(
            status.code(),
            tonic::Code::ResourceExhausted,
            "{}",
            status.message()
        );
        let grown_mib = rss_kib(e.pid()).saturating_sub(before) / 1024;
        let why = status.message().rsplit(';').next().unwrap_or_default();
        println!("refused ({why}): envd grew by {grown_mib} MiB");
        assert!(grown_mib < 100, "envd grew by {grown_mib} MiB");
    }
    // What the refused watches took is given back: a tree of 4,040 such
    // directories (~46 MiB of the 64 MiB) is watched.
    std::fs::remove_dir_all(&wide).unwrap();
    for i in 40..100 {
        std::fs::remove_dir_all(spread.join(format!("{stem}{i}"))).unwrap();
    }
    let mut w = watch(&mut fs, &spread, true).await;
    std::fs::write(spread.join(format!("{stem}0/0/f")), b"x").unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(30), w.next())
        .await
        .expect("no event")
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev.event, Some(watch_dir_response::Event::Filesystem(ref f)) if f.name.ends_with("/0/f")),
        "{ev:?}"
    );
    healthy(&e);
}

// Directories made and deleted under a recursive watch are forgotten when
// deleted: churn does not use up the watch's bounds, and a directory made
// again under the same name is watched again.
#[tokio::test]
async fn recursive_watches_forget_deleted_directories() {
    use envd::proto::filesystem::watch_dir_response::Event as W;
    let e = Envd::start(&[]);
    let (_dir, root) = empty_dir("w");
    let deep = long_path(&root);
    let mut fs = e.fs().await;
    let mut w = watch(&mut fs, &root, true).await;
    let stem = "s".repeat(200);
    // 6,000 directories of 3.8 KiB paths would cost ~68 MiB if remembered.
    let reader = tokio::spawn(async move {
        let mut seen = 0u64;
        loop {
            match w.next().await {
                Some(Ok(r)) => match r.event {
                    Some(W::Filesystem(ev)) if ev.name.ends_with("/again/file") => return Ok(seen),
                    _ => seen += 1,
                },
                Some(Err(status)) => return Err(status),
                None => panic!("the watch ended"),
            }
        }
    });
    // In batches the watch can follow (its queue holds ~1 MiB of events),
    // each watched before it goes.
    for batch in 0..120 {
        let dirs: Vec<_> = (0..50)
            .map(|i| deep.join(format!("{stem}{batch}-{i}")))
            .collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        for d in &dirs {
            std::fs::remove_dir(d).unwrap();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    let again = deep.join("again");
    for _ in 0..3 {
        std::fs::create_dir(&again).unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        std::fs::remove_dir(&again).unwrap();
    }
    std::fs::create_dir(&again).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(again.join("file"), b"x").unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the event in the directory made again never came")
        .unwrap()
        .expect("the watch failed");
    println!("{seen} events before the one awaited");
    healthy(&e);
}

/// Starts `script` over Connect (binary proto, HTTP/1.1) on a connection
/// of its own and reads only the response head: the stream stays attached
/// and unread while the socket is kept.
fn start_unread(e: &Envd, script: &str) -> TcpStream {
    use prost::Message;
    let mut s = TcpStream::connect(addr(&e.tcp)).unwrap();
    let body = common::http::envelope(0, &sh(script).encode_to_vec());
    let head = format!(
        "POST /process.Process/Start HTTP/1.1\r\nhost: envd\r\n\
         content-type: application/connect+proto\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(&body).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut b).unwrap();
        got.push(b[0]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    s
}

// Bounds: the shared output budget holds for output that attached clients
// do not read (it used to bound only unattached output: each stalled stream
// kept `--output-buffer` unread).
#[tokio::test]
async fn unread_attached_streams_hold_bounded_output() {
    let e = Envd::start(&[]);
    let idle = rss_kib(e.pid());
    let streams: Vec<TcpStream> = (0..300).map(|_| start_unread(&e, "exec yes")).collect();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let grown_mib = rss_kib(e.pid()).saturating_sub(idle) / 1024;
    println!("300 unread streams of `yes`: envd grew by {grown_mib} MiB");
    // Each stalled stream keeps up to 64 KiB unread in its log, a 64 KiB
    // read buffer and what hyper queues for the socket (~400 KB); before,
    // 1 MiB unread and 256 KiB buffers: +617 MiB.
    assert!(grown_mib < 320, "envd grew by {grown_mib} MiB");
    drop(streams);
    healthy(&e);
}

// Bounds: ended processes together keep at most half the output budget
// (each used to keep `--output-buffer` for `--exit-retention`, whatever the
// budget); the oldest give theirs up first.
#[tokio::test]
async fn ended_processes_keep_output_within_the_budget() {
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let idle = rss_kib(e.pid());
    let mut pids = Vec::new();
    for _ in 0..200 {
        let (mut stream, mut o) = started(&mut c, sh("head -c 1048576 /dev/zero")).await;
        read_until(&mut stream, &mut o, |o| o.end.is_some()).await;
        assert_eq!(o.stdout.len(), 1 << 20);
        pids.push(o.pid);
    }
    let grown_mib = rss_kib(e.pid()).saturating_sub(idle) / 1024;
    println!("200 ended processes of 1 MiB output: envd grew by {grown_mib} MiB");
    assert!(grown_mib < 64, "envd grew by {grown_mib} MiB");
    // The newest replays whole, the oldest gave its output up.
    for (pid, kept) in [(pids[199], 1 << 20), (pids[0], 0)] {
        let o = replay(&mut c, pid, |o| o.end.is_some()).await;
        let lost = o.start.as_ref().unwrap().output_lost.unwrap_or(0);
        assert_eq!((o.stdout.len(), lost), (kept, (1 << 20) - kept as u64));
    }
    healthy(&e);
}

// Bounds: input held for commands that do not read their stdin. Each
// SendInput holds its data until written; all of them together may hold 64
// MiB, beyond which a request is refused at once (100 concurrent requests of
// 4 MB took envd to +392 MiB, all held).
#[tokio::test]
async fn blocked_input_holds_bounded_memory() {
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let mut req = sh("sleep 600");
    req.stdin = Some(true);
    let (_stream, o) = started(&mut c, req.clone()).await;
    let pid = o.pid;
    let idle = rss_kib(e.pid());
    // One request at a time: one still unanswered after a while is held.
    let mut held = Vec::new();
    let refused = loop {
        assert!(held.len() <= 40, "{} requests of 4 MB held", held.len());
        let mut w = c.clone();
        let mut t = tokio::spawn(async move {
            send_input(&mut w, pid, stdin_input(&vec![b'x'; 4_000_000])).await
        });
        match tokio::time::timeout(Duration::from_secs(1), &mut t).await {
            Ok(r) => break r.unwrap(),
            Err(_) => held.push(t),
        }
    };
    let grown_mib = rss_kib(e.pid()).saturating_sub(idle) / 1024;
    println!(
        "{} requests of 4 MB held, envd grew by {grown_mib} MiB",
        held.len()
    );
    assert_eq!(code(refused), tonic::Code::ResourceExhausted);
    assert!(held.len() <= 16, "{} held", held.len());
    assert!(grown_mib < 128, "envd grew by {grown_mib} MiB");
    kill(&mut c, pid).await;
    for t in held {
        assert!(t.await.unwrap().is_err(), "input nobody read was delivered");
    }
    // What they held is given back.
    let (_stream, o) = started(&mut c, req).await;
    let mut w = e.client().await;
    let t = tokio::spawn(async move {
        send_input(&mut w, o.pid, stdin_input(&vec![b'y'; 4_000_000])).await
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    if t.is_finished() {
        panic!("input after the others ended: {:?}", t.await.unwrap());
    }
    kill(&mut c, o.pid).await;
    healthy(&e);
}

/// The user the planted-symlink tests play (`nobody`).
const NOBODY: u32 = 65534;

/// envd as root, and a scratch tree with `etc` (root's) and `home` (the
/// user's); `None` (with the skip printed) when the test is not root.
fn root_and_user_dirs(test: &str) -> Option<(Envd, tempfile::TempDir, PathBuf, PathBuf)> {
    if !is_root() {
        skip(test, "needs root to give symlinks to another user");
        return None;
    }
    let e = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let (etc, home) = (dir.path().join("etc"), dir.path().join("home"));
    std::fs::create_dir(&etc).unwrap();
    std::fs::create_dir(&home).unwrap();
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).unwrap();
    Some((e, dir, etc, home))
}

/// A symlink at `at` to `to`, owned by the user (as the user would make it).
fn user_link(to: &Path, at: &Path) {
    std::os::unix::fs::symlink(to, at).unwrap();
    std::os::unix::fs::lchown(at, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// A file (or, with `None`, a directory) of the user's at `at`.
fn user_entry(at: &Path, content: Option<&[u8]>) {
    match content {
        Some(c) => std::fs::write(at, c).unwrap(),
        None => std::fs::create_dir(at).unwrap(),
    }
    std::os::unix::fs::chown(at, Some(NOBODY), Some(NOBODY)).unwrap();
}

/// Trades the names of `a` and `b` atomically, as a racing user would.
fn exchange(a: &Path, b: &Path) -> nix::Result<()> {
    nix::fcntl::renameat2(
        nix::fcntl::AT_FDCWD,
        a,
        nix::fcntl::AT_FDCWD,
        b,
        nix::fcntl::RenameFlags::RENAME_EXCHANGE,
    )
}

// envd changes the filesystem as root. A process running as a user in the
// sandbox may plant symlinks where the host will write next; they must not
// steer envd's changes into what that user does not own.
#[tokio::test]
async fn planted_symlinks_cannot_steer_root_changes() {
    let Some((e, _dir, etc, home)) =
        root_and_user_dirs("planted_symlinks_cannot_steer_root_changes")
    else {
        return;
    };
    let passwd = etc.join("passwd");
    std::fs::write(&passwd, b"root's").unwrap();
    // What the user may plant: links to a root file, a root directory, and a
    // file not made yet in a root directory; and its own file.
    let plant = |name: &str, to: &Path| {
        let link = home.join(name);
        user_link(to, &link);
        link
    };
    let to_file = plant("out.txt", &passwd);
    let to_dir = plant("results", &etc);
    let to_new = plant("new.txt", &etc.join("new"));
    let mine = home.join("mine");
    user_entry(&mine, Some(b"user's"));

    for target in [
        to_file.clone(),
        to_dir.join("passwd"),
        to_dir.join("x"),
        to_new,
    ] {
        let r = upload(&e, &s(&target), b"host's");
        assert_eq!(
            r.status,
            403,
            "upload to {}: {}",
            target.display(),
            r.text()
        );
        assert!(
            r.text().contains("symlink owned by uid 65534"),
            "{}",
            r.text()
        );
    }
    let compose = serde_json::json!({
        "source_paths": [s(&mine)],
        "destination": s(&to_dir.join("c")),
    });
    let r = post_json(&e.tcp, "/files/compose", &compose.to_string());
    assert_eq!(r.status, 403, "{}", r.text());
    // A source through the user's link: its bytes would go into a file
    // given to the user.
    let compose = serde_json::json!({
        "source_paths": [s(&mine), s(&to_file)],
        "destination": s(&home.join("joined")),
    });
    let r = post_json(&e.tcp, "/files/compose", &compose.to_string());
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(!home.join("joined").exists());
    let mut fs = e.fs().await;
    let r = fs
        .make_dir(MakeDirRequest {
            path: s(&to_dir.join("sub")),
        })
        .await;
    assert_eq!(code(r), tonic::Code::PermissionDenied);
    let r = fs
        .r#move(MoveRequest {
            source: s(&mine),
            destination: s(&to_dir.join("moved")),
        })
        .await;
    assert_eq!(code(r), tonic::Code::PermissionDenied);
    let r = fs
        .remove(RemoveRequest {
            path: s(&to_dir.join("passwd")),
        })
        .await;
    assert_eq!(code(r), tonic::Code::PermissionDenied);
    let mut t = e.transfer().await;
    let append = envd::proto::transfer::WriteFileRequest {
        message: Some(envd::proto::transfer::write_file_request::Message::Header(
            envd::proto::transfer::WriteHeader {
                path: s(&to_file),
                mode: None,
                append: true,
            },
        )),
    };
    let r = t.write_file(futures_util::stream::iter(vec![append])).await;
    assert_eq!(code(r), tonic::Code::PermissionDenied);

    // Nothing of root's changed hands or content, and nothing was made.
    let names: Vec<_> = std::fs::read_dir(&etc)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("passwd")]);
    assert_eq!(std::fs::read(&passwd).unwrap(), b"root's");
    assert_eq!(std::fs::metadata(&passwd).unwrap().uid(), 0);
    assert_eq!(std::fs::read(&mine).unwrap(), b"user's");

    // A user's link to what the user owns is written through, as before.
    let to_mine = plant("to-mine", &mine);
    let r = upload(&e, &s(&to_mine), b"host's");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(std::fs::read(&mine).unwrap(), b"host's");
    assert!(std::fs::symlink_metadata(&to_mine).unwrap().is_symlink());
    assert_eq!(
        std::fs::metadata(&mine).unwrap().uid(),
        0,
        "given to the uploader"
    );
    healthy(&e);
}

// The race beside it: the user swaps a directory of the path for a symlink
// to a root directory, again and again, while the host uploads into it. What
// envd checked is what it writes into.
#[tokio::test]
async fn directories_swapped_for_symlinks_mid_write_redirect_nothing() {
    let Some((e, _dir, etc, home)) =
        root_and_user_dirs("directories_swapped_for_symlinks_mid_write_redirect_nothing")
    else {
        return;
    };
    user_entry(&home.join("d"), None);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (home, etc, stop) = (home.clone(), etc.clone(), stop.clone());
        std::thread::spawn(move || {
            let (d, link) = (home.join("d"), home.join("d.link"));
            // The user's link is made once, as the user's: root never owns it.
            user_link(&etc, &link);
            let mut swaps = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                // The directory and the link trade names, atomically.
                for _ in 0..2 {
                    exchange(&d, &link).unwrap();
                    std::thread::yield_now();
                }
                swaps += 1;
            }
            swaps
        })
    };
    let mut answers = std::collections::BTreeMap::new();
    for i in 0..400 {
        let r = upload(&e, &s(&home.join(format!("d/f{i}"))), b"host's");
        *answers.entry(r.status).or_insert(0) += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    let leaked: Vec<_> = std::fs::read_dir(&etc).unwrap().collect();
    assert!(
        leaked.is_empty(),
        "{} files written into root's directory",
        leaked.len()
    );
    // Both sides of the race were met: some uploads landed, some were refused.
    println!("{swaps} swaps; answers by status: {answers:?}");
    assert!(answers.get(&200).copied().unwrap_or(0) > 0, "{answers:?}");
    assert!(answers.keys().any(|&s| s != 200), "{answers:?}");
    healthy(&e);
}

// A Start may carry 4 MiB of command, arguments, environment and tag; envd
// keeps them while the command runs and while its exit is kept.
#[tokio::test]
async fn process_descriptions_are_bounded() {
    let e = Envd::start(&[]);
    let mut p = e.client().await;
    let before = rss_kib(e.pid());
    let big = |i: usize| {
        let mut r = cmd("sleep", &["60"]);
        r.tag = Some(format!("{i:04}").repeat(1 << 18)); // 1 MiB
        r
    };
    let mut pids = Vec::new();
    let refused = loop {
        match p.start(big(pids.len())).await {
            Ok(s) => {
                let mut s = s.into_inner();
                let mut o = Outcome::default();
                read_until(&mut s, &mut o, |o| o.pid != 0).await;
                pids.push(o.pid);
            }
            Err(status) => break status,
        }
        assert!(pids.len() <= 100, "100 commands with 1 MiB tags all kept");
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("64 MiB"),
        "{}",
        refused.message()
    );
    assert_eq!(pids.len(), 63, "1 MiB and a little more each, in 64 MiB");
    let grown = rss_kib(e.pid()).saturating_sub(before) / 1024;
    assert!(grown < 100, "envd grew by {grown} MiB");
    // Ended commands make room: the oldest exits are forgotten first.
    for pid in &pids {
        kill(&mut p, *pid).await;
    }
    // (Each kill is reaped a moment later.)
    let started = Instant::now();
    let s = loop {
        match p.start(big(0)).await {
            Ok(s) => break s,
            Err(e) if started.elapsed() < Duration::from_secs(10) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no room made by 63 ended commands: {e:?}"),
        }
    };
    let mut s = s.into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.pid != 0).await;
    kill(&mut p, o.pid).await;
    let mut known = 0;
    for pid in &pids {
        let r = p
            .connect(ConnectRequest {
                process: by_pid(*pid),
                resume_offset: None,
            })
            .await;
        known += usize::from(r.is_ok());
    }
    // One is enough; another may go while the first is still held by its
    // stream's last moments.
    assert!(
        (56..63).contains(&known),
        "{known} of 63 ended commands still known"
    );
    healthy(&e);
}

// A cross-filesystem Move copies the user's tree as root, then gives each
// copy the owner and mode its source had. The user swaps its files for links
// to a root-only file mid-copy: what `lstat` saw must be what is read.
#[tokio::test]
async fn files_swapped_for_links_mid_copy_are_not_read() {
    let Some((e, dir, etc, home)) =
        root_and_user_dirs("files_swapped_for_links_mid_copy_are_not_read")
    else {
        return;
    };
    let mnt = dir.path().join("tmpfs");
    let Some(_tmpfs) = Tmpfs::mount(
        "files_swapped_for_links_mid_copy_are_not_read",
        &mnt,
        "size=64m",
    ) else {
        return;
    };
    let secret = etc.join("shadow");
    std::fs::write(&secret, b"root's secret").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    const FILES: usize = 300;
    let mut found = 0;
    for round in 0..10 {
        let src = home.join(format!("tree{round}"));
        user_entry(&src, None);
        for i in 0..FILES {
            user_entry(&src.join(format!("f{i}")), Some(b"user's"));
            user_link(&secret, &src.join(format!("l{i}")));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let swapper = {
            let (src, stop) = (src.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for i in 0..FILES {
                        let swapped =
                            exchange(&src.join(format!("f{i}")), &src.join(format!("l{i}")));
                        if swapped.is_err() {
                            return; // moved away
                        }
                    }
                }
            })
        };
        let dst = mnt.join(format!("moved{round}"));
        let mut fs = e.fs().await;
        let _ = fs
            .r#move(MoveRequest {
                source: s(&src),
                destination: s(&dst),
            })
            .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swapper.join().unwrap();
        for entry in std::fs::read_dir(&dst).into_iter().flatten().flatten() {
            let m = std::fs::symlink_metadata(entry.path()).unwrap();
            if m.is_file() && std::fs::read(entry.path()).unwrap() == b"root's secret" {
                assert_eq!(
                    m.uid(),
                    0,
                    "root's secret copied into a file of uid {}",
                    m.uid()
                );
                found += 1;
            }
        }
    }
    assert_eq!(found, 0, "root's secret was read into the copy");
    healthy(&e);
}

/// Threads creating files in `dir` as fast as they can, until dropped.
struct Grower {
    go: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Grower {
    fn start(dir: &Path) -> Grower {
        use std::sync::atomic::{AtomicBool, Ordering};
        let go = std::sync::Arc::new(AtomicBool::new(true));
        let threads = (0..2)
            .map(|t| {
                let (go, dir) = (go.clone(), dir.to_path_buf());
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while go.load(Ordering::Relaxed) {
                        let _ = std::fs::File::create(dir.join(format!("w{t}-{n}")));
                        n += 1;
                    }
                })
            })
            .collect();
        Grower { go, threads }
    }

    fn stop(mut self) {
        self.go.store(false, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
    }
}

fn entries(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir).ok().map(|d| d.count())
}

/// Once the caller of a walk has given up, envd must leave `dir` alone:
/// what it holds now, it still holds a second later.
fn left_alone(dir: &Path, what: &str) {
    let before = entries(dir);
    assert!(before.is_some(), "{what}: the growing directory is gone");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        entries(dir),
        before,
        "{what}: envd went on walking the tree after its caller gave up"
    );
}

/// Walks trees that two threads fill as fast as they can, until one walk is
/// still going when its call's deadline passes (`walk` says whether it was),
/// trying larger trees when envd finished first; then checks that envd
/// leaves that tree alone.
async fn outrun<F, Fut>(parent: &Path, what: &str, mut walk: F)
where
    F: FnMut(PathBuf, usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for attempt in 0..6 {
        let dir = parent.join(format!("{what}-{attempt}"));
        std::fs::create_dir(&dir).unwrap();
        for i in 0..(2_000 << attempt) {
            std::fs::write(dir.join(format!("seed-{i}")), b"").unwrap();
        }
        let grower = Grower::start(&dir);
        let cut_off = walk(dir.clone(), attempt).await;
        std::thread::sleep(Duration::from_millis(200));
        grower.stop();
        if cut_off {
            left_alone(&dir, what);
            return;
        }
        println!("{what}: envd finished before the deadline (try {attempt}); again, larger");
    }
    panic!("{what}: every walk finished before its deadline: the trees did not outgrow envd");
}

// A Remove (or a cross-filesystem Move) of a tree that code in the sandbox
// grows as fast as envd removes it runs on a blocking thread, which a
// caller's deadline does not stop: it used to go on for as long as the
// growing did, and enough of them would take every blocking thread. The
// walk now stops once its caller has gone.
#[tokio::test]
async fn walks_over_growing_trees_stop_with_their_caller() {
    let e = Envd::start(&[]);
    let fs = e.fs().await;
    let tmp = tempfile::tempdir().unwrap();
    // Over Connect, with the deadline envd enforces itself.
    outrun(tmp.path(), "Remove", |dir, _| {
        let r = request(
            &e.tcp,
            "POST",
            "/filesystem.Filesystem/Remove",
            &[
                ("content-type", "application/json"),
                ("connect-timeout-ms", "800"),
            ],
            format!(r#"{{"path":"{}"}}"#, s(&dir)).as_bytes(),
        );
        assert!(matches!(r.status, 200 | 504), "{} {}", r.status, r.text());
        std::future::ready(r.status == 504)
    })
    .await;
    healthy(&e);

    let mnt = tmp.path().join("tmpfs");
    let Some(_tmpfs) = Tmpfs::mount("walks_over_growing_trees", &mnt, "size=256m") else {
        return;
    };
    // Over native gRPC, with the deadline the client sends (grpc-timeout).
    outrun(tmp.path(), "Move", |dir, attempt| {
        let mut req = tonic::Request::new(MoveRequest {
            source: s(&dir),
            destination: s(&mnt.join(format!("moved-{attempt}"))),
        });
        req.set_timeout(Duration::from_millis(800));
        let mut fs = fs.clone();
        async move { fs.r#move(req).await.is_err() }
    })
    .await;
    // Whatever became of the moves, no hidden temporary copy stays behind.
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with("moved-"))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
    healthy(&e);
}

// A cross-filesystem Move of a directory into a mount inside it: rename(2)
// refuses a directory into itself only on one filesystem, and the copy then
// copied its own output until the destination was full.
#[tokio::test]
async fn moves_into_a_mount_inside_the_source_are_refused() {
    let (_tmp, src) = empty_dir("src");
    std::fs::write(src.join("file"), b"kept").unwrap();
    let mnt = src.join("mnt");
    let Some(_tmpfs) = Tmpfs::mount("moves_into_a_mount_inside", &mnt, "size=16m") else {
        return;
    };
    let e = Envd::start(&[]);
    let mut fs = e.fs().await;
    let t = Instant::now();
    let r = fs
        .r#move(MoveRequest {
            source: s(&src),
            destination: s(&mnt.join("deeper/moved")),
        })
        .await;
    let err = r.expect_err("a directory moved into itself");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("into itself"), "{}", err.message());
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert_eq!(std::fs::read(src.join("file")).unwrap(), b"kept");
    let names: Vec<_> = std::fs::read_dir(&mnt)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n != "deeper")
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
    healthy(&e);
}

/// A FUSE mount whose server never answers: every access below it waits
/// (killably) until the mount is aborted, as under a stalled network mount.
struct StalledMount {
    at: PathBuf,
    device: Option<std::fs::File>,
}

impl StalledMount {
    fn mount(test: &str, at: &Path) -> Option<StalledMount> {
        use std::os::fd::AsRawFd;
        if !is_root() {
            skip(test, "needs root to mount FUSE");
            return None;
        }
        let Ok(device) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")
        else {
            skip_on_this_machine(test, "no /dev/fuse");
            return None;
        };
        std::fs::create_dir_all(at).unwrap();
        let options = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            device.as_raw_fd()
        );
        let flags = nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV;
        if let Err(e) = nix::mount::mount(
            Some("envd-stalled"),
            at,
            Some("fuse"),
            flags,
            Some(options.as_str()),
        ) {
            skip_on_this_machine(test, &format!("cannot mount FUSE: {e}"));
            return None;
        }
        Some(StalledMount {
            at: at.to_path_buf(),
            device: Some(device),
        })
    }
}

impl Drop for StalledMount {
    fn drop(&mut self) {
        // Closing the device aborts the connection: every waiter gets ENOTCONN.
        drop(self.device.take());
        let _ = nix::mount::umount2(&self.at, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Whether envd answers `/health` within `limit`.
fn answers_within(url: &str, limit: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect(addr(url)) else {
        return false;
    };
    s.set_read_timeout(Some(limit)).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nhost: envd\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 204")
}

// A Start whose working directory lies on a stalled mount (a FUSE or NFS
// server that stopped answering) waits in the kernel: in envd's look at the
// directory, then in the clone, which returns only once the child has
// exec'd. Those waits were on envd's async workers, so two such Starts (one
// in a one-vCPU guest) left envd answering nothing at all.
#[tokio::test]
async fn starts_on_a_stalled_mount_do_not_stall_envd() {
    let tmp = tempfile::tempdir().unwrap();
    let stalled = tmp.path().join("stalled");
    // Mounted after envd started: envd must notice the new mount (it runs
    // Starts in place while no mount may stall).
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let Some(mount) = StalledMount::mount("starts_on_a_stalled_mount", &stalled) else {
        return;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut waiting = Vec::new();
    for _ in 0..4 {
        let mut req = cmd("/bin/true", &[]);
        req.process.as_mut().unwrap().cwd = Some(s(&stalled));
        let mut c = c.clone();
        waiting.push(tokio::spawn(async move { c.start(req).await.is_ok() }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let still_answering = answers_within(&e.tcp, Duration::from_secs(3));
    let other = if still_answering {
        let o = tokio::time::timeout(Duration::from_secs(10), run(&mut c, cmd("/bin/true", &[])));
        o.await.ok().map(|o| o.end().exit_code)
    } else {
        None
    };
    drop(mount);
    assert!(
        still_answering,
        "envd stopped answering while Starts waited on a stalled mount"
    );
    assert_eq!(other, Some(0), "a Start elsewhere did not run to its end");
    // Aborted, the mount fails every access: the waiting Starts end.
    for w in waiting {
        tokio::time::timeout(Duration::from_secs(10), w)
            .await
            .expect("a Start still waits after its mount was aborted")
            .unwrap();
    }
    healthy(&e);
}

// Each filesystem call on a stalled mount holds a blocking thread until the
// mount answers, whatever became of its caller. tokio has 512; once calls
// had taken them all, nothing else that needs one could run: Starts (which
// take one while such a mount exists), the ports scan, /freeze. Filesystem
// work now holds at most 384 of them.
#[tokio::test]
async fn stuck_filesystem_calls_leave_threads_for_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let stalled = tmp.path().join("stalled");
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let fs = e.fs().await;
    let Some(mount) = StalledMount::mount("stuck_filesystem_calls_leave_threads", &stalled) else {
        return;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stuck = Vec::new();
    for i in 0..520 {
        let mut fs = fs.clone();
        let path = s(&stalled.join(format!("f{i}")));
        stuck.push(tokio::spawn(async move {
            let _ = fs.stat(StatRequest { path }).await;
        }));
    }
    // Let them take what threads they can.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = tokio::time::timeout(Duration::from_secs(10), run(&mut c, cmd("/bin/true", &[])))
        .await
        .ok()
        .map(|o| o.end().exit_code);
    drop(mount);
    assert_eq!(
        started,
        Some(0),
        "a Start found no blocking thread left by filesystem calls on a stalled mount"
    );
    for t in stuck {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("a Stat still waits after its mount was aborted")
            .unwrap();
    }
    healthy(&e);
}

// Orphans re-parented to envd (a subreaper, or PID 1) can exit faster than
// envd reaps them: here two thousand exit while envd is stopped, and it
// wakes to one merged SIGCHLD. The reaper takes them in batches, yielding
// its worker between them, and must come back for the rest without waiting
// for another signal.
#[tokio::test]
async fn orphan_storms_are_reaped_whole() {
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    // Each `(sleep 1 &)` leaves an orphan of envd's.
    let storm = format!(
        "kill -STOP {envd}; \
         for j in 1 2 3 4; do (for i in $(seq 500); do (sleep 1 &); done) & done; wait; \
         sleep 2; kill -CONT {envd}; echo made",
        envd = e.pid()
    );
    let o = run(&mut c, sh(&storm)).await;
    assert_eq!(o.end().exit_code, 0);
    assert!(o.out().contains("made"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut left = common::procfs::zombie_children(e.pid());
    while left > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        left = common::procfs::zombie_children(e.pid());
    }
    assert_eq!(left, 0, "orphans left unreaped after the storm");
    healthy(&e);
}

/// A pids cgroup (v1, or v2 where the pids controller is there) that caps
/// the tasks of what is moved into it; removed when dropped (after what was
/// in it has ended).
struct PidsCap(PathBuf);

impl PidsCap {
    fn create(name: &str) -> Option<PidsCap> {
        let unique = format!("envd-test-{name}-{}", std::process::id());
        let v1 = Path::new("/sys/fs/cgroup/pids");
        let v2 = Path::new("/sys/fs/cgroup");
        let base = if v1.join("tasks").is_file() {
            v1
        } else if std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .is_ok_and(|c| c.split_whitespace().any(|c| c == "pids"))
        {
            v2
        } else {
            return None;
        };
        let dir = base.join(unique);
        std::fs::create_dir(&dir).ok()?;
        Some(PidsCap(dir))
    }

    /// Moves `pid` (every thread of it) in and caps the cgroup at the tasks
    /// it has now: no further thread or process can start.
    fn hold(&self, pid: u32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
        let now = std::fs::read_to_string(self.0.join("pids.current")).unwrap();
        std::fs::write(self.0.join("pids.max"), now.trim()).unwrap();
    }

    fn release(&self) {
        std::fs::write(self.0.join("pids.max"), "max").unwrap();
    }
}

impl Drop for PidsCap {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("pids.max"), "max");
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// Sandboxed code that takes every task the kernel allows (a fork bomb
// reaching `kernel.threads-max`, a few thousand in a small VM) leaves envd
// unable to start a thread. tokio's spawn_blocking panics then, and every
// filesystem call lost its connection without an answer; the refused work
// stayed queued and ran once a thread could start again, long after its
// caller was told it failed.
#[tokio::test]
async fn calls_when_the_vm_is_out_of_tasks_get_an_answer() {
    if !is_root() {
        return skip("out_of_tasks", "a pids cgroup needs root");
    }
    let Some(cap) = PidsCap::create("out_of_tasks") else {
        return skip_on_this_machine("out_of_tasks", "no pids cgroup controller");
    };
    let tmp = tempfile::tempdir().unwrap();
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let mut fs = e.fs().await;
    fs.stat(StatRequest {
        path: s(tmp.path()),
    })
    .await
    .unwrap();
    // Idle blocking threads exit after a second: then none is left.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    cap.hold(e.pid());

    let refused = tmp.path().join("refused");
    let r = fs.make_dir(MakeDirRequest { path: s(&refused) }).await;
    let status = r.expect_err("a MakeDir ran without a thread to run on");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("cannot start a thread"),
        "{status:?}"
    );
    let r = c.start(cmd("/bin/true", &[])).await;
    assert!(r.is_err(), "a Start ran with no task to spare");
    healthy(&e);

    cap.release();
    fs.stat(StatRequest {
        path: s(tmp.path()),
    })
    .await
    .unwrap();
    run(&mut c, cmd("/bin/true", &[])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !refused.exists(),
        "a refused MakeDir ran once threads could start again"
    );
    drop(e);
}
