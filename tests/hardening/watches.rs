//! Watches: one inotify instance, bounded events and directories.

use super::*;

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
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = seen.clone();
    let reader = tokio::spawn(async move {
        loop {
            match w.next().await {
                Some(Ok(r)) => match r.event {
                    Some(W::Filesystem(ev)) if ev.name.ends_with("/again/file") => {
                        return Ok(counted.load(std::sync::atomic::Ordering::SeqCst))
                    }
                    _ => {
                        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                },
                Some(Err(status)) => return Err(status),
                None => panic!("the watch ended"),
            }
        }
    });
    // Until the watch has passed on `n` more events (a batch's), at most
    // 10 s: its queue holds ~1 MiB of events (~250 of these paths), so the
    // batches go at the pace the watch follows, however busy the machine.
    let passed_on = |n: u64| {
        let seen = seen.clone();
        async move {
            let want = seen.load(std::sync::atomic::Ordering::SeqCst) + n;
            let deadline = Instant::now() + Duration::from_secs(10);
            while seen.load(std::sync::atomic::Ordering::SeqCst) < want && Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    // Each directory watched (its creation passed on) before it goes.
    for batch in 0..120 {
        let dirs: Vec<_> = (0..50)
            .map(|i| deep.join(format!("{stem}{batch}-{i}")))
            .collect();
        for d in &dirs {
            std::fs::create_dir(d).unwrap();
        }
        passed_on(50).await;
        for d in &dirs {
            std::fs::remove_dir(d).unwrap();
        }
        passed_on(50).await;
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
