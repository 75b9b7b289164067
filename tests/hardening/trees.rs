//! Trees of any depth, trees that grow while envd walks them, and moves across mounts.

use super::*;

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
        // A walk that reached the tree's end as its deadline passed (the
        // stop is seen at the next entry) leaves nothing to check: like one
        // that finished first, it is tried again, larger. A walk that never
        // stops ends every try that way, and fails below.
        if cut_off && entries(&dir).is_some() {
            left_alone(&dir, what);
            return;
        }
        println!("{what}: envd finished by the deadline (try {attempt}); again, larger");
    }
    panic!(
        "{what}: every walk finished by its deadline or went on until the tree was gone: \
         the trees did not outgrow envd, or envd does not stop"
    );
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
        // 409: the walk emptied a directory and a file appeared in it
        // before its `rmdir` (as `rm -r` reports it), so envd finished.
        let not_empty = r.status == 409 && r.text().contains("Directory not empty");
        assert!(
            matches!(r.status, 200 | 504) || not_empty,
            "{} {}",
            r.status,
            r.text()
        );
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
