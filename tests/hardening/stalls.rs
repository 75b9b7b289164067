//! Stalled mounts, orphan storms and a VM out of tasks.

use super::*;

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

    /// The tasks in the cgroup now.
    fn tasks(&self) -> usize {
        std::fs::read_to_string(self.0.join("pids.current"))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
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

/// Caps envd's tasks at a moment when it has no blocking thread: only its
/// main thread, its async workers and its log writer. Idle blocking threads exit after a
/// second, but anything that mounts on the machine (other tests do) makes
/// envd read the mount table on one: so rather than wait a fixed time, this
/// waits until only those threads are left, caps, and counts again, and
/// starts over if a blocking thread slipped in between.
async fn hold_without_blocking_threads(cap: &PidsCap, pid: u32) {
    let floor = 2 + std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        assert!(
            Instant::now() < deadline,
            "envd kept more than its {floor} threads (main, workers, log) for a minute: {}",
            threads()
        );
        if threads() > floor {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        cap.hold(pid);
        if threads() <= floor && cap.tasks() <= floor {
            return;
        }
        cap.release();
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
    hold_without_blocking_threads(&cap, e.pid()).await;

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

// envd's log goes wherever its stderr leads: journald's socket under
// systemd, a pipe under a supervisor. A reader that stops reading (journald
// busy with a flood from the sandbox, a supervisor stopped) fills that
// buffer, and a log line written in place then waited on an async worker;
// with both workers waiting, envd answered nothing. Lines that would wait
// now go to a bounded queue and a thread of their own; a line that finds the
// queue full is dropped and counted.
#[tokio::test]
async fn a_log_pipe_that_is_not_read_does_not_stall_envd() {
    // A pipe of the default size: 16 pages, each taking one of the ~2.2 KiB
    // lines below (two do not fit in a page), so it is full with 35 KiB
    // unread of its 64 KiB. (Room reckoned in bytes, size less unread,
    // would take it for free.)
    let (rx, tx) = std::io::pipe().unwrap();
    log_reader_stops(std::process::Stdio::from(tx), Box::new(rx)).await;
}

#[tokio::test]
async fn a_log_socket_that_is_not_read_does_not_stall_envd() {
    let (rx, tx) = std::os::unix::net::UnixStream::pair().unwrap();
    // As small a send buffer as the kernel allows.
    nix::sys::socket::setsockopt(&tx, nix::sys::socket::sockopt::SndBuf, &4096).unwrap();
    let tx: std::os::fd::OwnedFd = tx.into();
    log_reader_stops(std::process::Stdio::from(tx), Box::new(rx)).await;
}

/// envd with `stderr` (whose other end is `reader`), read until envd is
/// ready and then not for 300 Starts.
async fn log_reader_stops(stderr: std::process::Stdio, reader: Box<dyn Read + Send>) {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut command = std::process::Command::new(binary());
    command
        .args(["--listen", "tcp://127.0.0.1:0"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(stderr);
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = Kill(command.spawn().unwrap());
    // The test's own copy of the write end must not keep the reader from
    // its end of file.
    drop(command);
    let mut lines = std::io::BufReader::new(reader);
    let mut tcp = None;
    let mut line = String::new();
    while lines.read_line(&mut line).unwrap() > 0 {
        if let Some(u) = listening_url(&line) {
            tcp = Some(u.to_owned());
        }
        if line.contains("envd ready") {
            break;
        }
        line.clear();
    }
    let tcp = tcp.expect("envd's TCP listener");
    // From here on nobody reads envd's stderr. Each Start logs a line of
    // about 2 KiB (its command's path): 300 of them are more than the
    // buffer and the queue hold.
    let path = format!("/bin/{}true", "./".repeat(1000));
    let mut c = envd::proto::process::process_client::ProcessClient::new(
        envd::client::dial(&tcp).await.unwrap(),
    );
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..300 {
            let o = run_within(&mut c, cmd(&path, &[]), Duration::from_secs(10)).await;
            assert_eq!(o.end().exit_code, 0, "Start {i}");
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "Starts stopped being answered once envd's stderr was full"
    );
    let r = request(&tcp, "GET", "/health", &[], b"");
    assert_eq!(r.status, 204);
    // Read again: the lines queued come out, and the count of those dropped.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        let mut line = String::new();
        while lines.read_line(&mut line).unwrap_or(0) > 0 {
            text.push_str(&line);
            if line.contains("log lines dropped") {
                break;
            }
            line.clear();
        }
        let _ = tx.send(text);
    });
    // One more line for the writer to take after the drops.
    run(&mut c, cmd("/bin/true", &[])).await;
    let text = rx.recv_timeout(Duration::from_secs(20));
    drop(child);
    let text = text.unwrap_or_else(|_| rx.recv().unwrap());
    assert!(
        text.contains("log lines dropped"),
        "no count of the dropped lines in:\n{}",
        &text[text.len().saturating_sub(2000)..]
    );
}

/// systemd's notify socket full and not read (systemd busy or stopped, or
/// flooded by any process in the VM, which may send to it): under crash
/// records each Start stores its command's fds there and each end removes
/// them, more than the socket's queue holds (10 datagrams by the kernel's
/// default, 512 under systemd). No call may wait for systemd.
#[tokio::test]
async fn a_notify_socket_that_is_not_read_does_not_stall_envd() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    let e = Envd::start_after(&[], &format!("export NOTIFY_SOCKET='{}'", path.display()));
    let mut c = e.client().await;
    // Enough to fill the socket's queue: what follows waits in envd's.
    for _ in 0..20 {
        run_within(&mut c, cmd("/bin/true", &[]), Duration::from_secs(10)).await;
    }
    // A command's stdin, whose copy for the store is still queued, sees the
    // end of its input when its client closes it, without systemd.
    let (mut s, mut o) = started(&mut c, cmd("cat", &[])).await;
    c.close_stdin(CloseStdinRequest {
        process: by_pid(o.pid),
    })
    .await
    .expect("CloseStdin");
    tokio::time::timeout(
        Duration::from_secs(10),
        read_until(&mut s, &mut o, |o| o.end.is_some()),
    )
    .await
    .expect("cat never saw the end of its input while systemd did not read");
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        for i in 0..300 {
            let o = run_within(&mut c, cmd("/bin/true", &[]), Duration::from_secs(10)).await;
            assert_eq!(o.end().exit_code, 0, "Start {i}");
        }
    })
    .await;
    assert!(
        all.is_ok(),
        "Starts stopped being answered once systemd's notify socket was full"
    );
    healthy(&e);
    assert!(e.logged("systemd does not read its notify socket"));
    // Read now: what was queued comes out, in order (no command's store
    // after its removal).
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut removed = std::collections::HashSet::new();
    let mut buf = vec![0u8; 4096];
    let mut stored_after_removal = Vec::new();
    let mut last = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        // Any fds that came along are closed with the message (recv
        // without room for them).
        let Ok(n) = socket.recv(&mut buf) else { break };
        last = String::from_utf8_lossy(&buf[..n]).into_owned();
        let name = last.lines().find_map(|l| l.strip_prefix("FDNAME="));
        match (last.lines().next(), name) {
            (Some("FDSTOREREMOVE=1"), Some(n)) => {
                removed.insert(n.to_owned());
            }
            // A command's names (`c...`); envd's own are removed before
            // they are stored, for a previous life's.
            (Some("FDSTORE=1"), Some(n)) if n.starts_with('c') && removed.contains(n) => {
                stored_after_removal.push(n.to_owned());
            }
            _ => {}
        }
        if removed.len() > 320 {
            break;
        }
    }
    assert!(
        stored_after_removal.is_empty(),
        "stored after their removal: {stored_after_removal:?}"
    );
    assert!(
        removed.len() > 320,
        "{} removals came out; the last message: {last:?}",
        removed.len()
    );
    healthy(&e);
}

// Large listings are built one at a time, for the budget's sake. One that
// reached a stalled mount waits there, holding its turn for as long as its
// caller waits (no deadline: for ever), and every other large listing
// waited behind it. A listing now waits its turn 10 s at most, and then is
// built beside it.
#[test]
fn a_large_listing_stuck_on_a_stalled_mount_does_not_hold_up_others() {
    const TEST: &str = "a_large_listing_stuck_on_a_stalled_mount_does_not_hold_up_others";
    let e = Envd::start(&[]);
    let tmp = tempfile::tempdir().unwrap();
    // 12,000 entries of 160-character names: past the 4 MiB above which a
    // listing is built alone.
    let big = |name: &str| {
        let dir = tmp.path().join(name);
        std::fs::create_dir(&dir).unwrap();
        let stem = "f".repeat(150);
        for i in 0..12_000 {
            std::fs::File::create(dir.join(format!("{stem}{i:010}"))).unwrap();
        }
        dir
    };
    let (stuck, other) = (big("stuck"), big("other"));
    // Listed last, after every file: the listing has its turn by then.
    let Some(mount) = StalledMount::mount(TEST, &stuck.join("zz")) else {
        return;
    };
    // Its caller waits without a deadline, for as long as it takes.
    let mut stuck_call = list_unread(&e, &stuck);
    std::thread::sleep(Duration::from_secs(2));
    stuck_call.set_nonblocking(true).unwrap();
    let mut head = [0u8; 12];
    assert!(
        stuck_call.read(&mut head).is_err(),
        "the listing of the stalled mount did not wait"
    );
    let (url, body) = (
        e.tcp.clone(),
        format!(r#"{{"path":"{}"}}"#, other.display()),
    );
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(post_json(&url, "/filesystem.Filesystem/ListDir", &body).status);
    });
    // Within the helper's own 30 s read timeout.
    let answered = rx.recv_timeout(Duration::from_secs(25));
    drop(mount);
    assert_eq!(
        answered.ok(),
        Some(200),
        "a large listing waited behind one stuck on a stalled mount"
    );
    // Aborted, the mount fails the stuck listing, which then answers.
    stuck_call.set_nonblocking(false).unwrap();
    stuck_call
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stuck_call.read_exact(&mut head).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 "));
    healthy(&e);
}

// Anything root in the VM may put a FIFO in place of `/etc/passwd` or
// `/etc/group`. envd looked users up through libc, which opened the file
// and waited for a writer on the async worker, holding the lookup cache's
// lock: the request, and every one after it, hung. Now the databases are
// read only as regular files: root is still root (as with no database at
// all), another user gets an error that names the file, at once.
#[tokio::test]
async fn account_databases_swapped_for_fifos_do_not_hang_requests() {
    const TEST: &str = "account_databases_swapped_for_fifos_do_not_hang_requests";
    if !is_root() {
        skip(TEST, "needs root to mount over /etc/passwd in a namespace");
        return;
    }
    // In a mount namespace of its own: the FIFOs cover the files for envd only.
    let e = Envd::start_in(OWN_MOUNTS, &[]);
    let mut c = e.client().await;
    let limit = Duration::from_secs(10);
    let o = run_within(&mut c, cmd("id", &["-u"]), limit).await;
    assert_eq!(o.out().trim(), "0");

    let dir = tempfile::tempdir().unwrap();
    for db in ["passwd", "group"] {
        let fifo = dir.path().join(db);
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
        bind_in(&e, &fifo, &Path::new("/etc").join(db));
    }

    let o = tokio::time::timeout(limit, run_within(&mut c, cmd("id", &["-u"]), limit))
        .await
        .expect("a lookup of root waited on the FIFO");
    assert_eq!(o.out().trim(), "0", "root without a readable database");
    let refused = tokio::time::timeout(limit, c.start(as_user(cmd("id", &["-u"]), "nobody")))
        .await
        .expect("a lookup of another user waited on the FIFO");
    let e2 = refused.expect_err("nobody is not known without a database");
    assert!(
        e2.message().contains("/etc/passwd") && e2.message().contains("FIFO"),
        "{e2:?}"
    );
    // Owner names of entries came from the same lookups (on the
    // filesystem threads, each stuck for good): shown as numbers now.
    let mut fs = e.fs().await;
    let stat = tokio::time::timeout(limit, fs.stat(StatRequest { path: "/".into() }))
        .await
        .expect("a Stat waited on the FIFO")
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!((stat.owner.as_str(), stat.group.as_str()), ("0", "0"));
    let o = run_within(&mut c, cmd("true", &[]), limit).await;
    assert_eq!(o.end().exit_code, 0);
}
