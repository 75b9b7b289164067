//! filesystem.Filesystem and envd.transfer.Transfer against the real binary.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use envd::proto::filesystem::watch_dir_response::Event as WEvent;
use envd::proto::filesystem::*;
use envd::proto::transfer::write_file_request::Message;
use envd::proto::transfer::*;
use futures_util::StreamExt;
use tonic::Code;

/// A scratch directory on the project's disk (tmpfs may lack user xattrs).
fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("envd-fs-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .unwrap()
}

fn s(p: &Path) -> String {
    p.to_str().unwrap().to_owned()
}

#[tokio::test]
async fn stat_entry_info_is_complete() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let f = dir.path().join("a.txt");
    std::fs::write(&f, "hello").unwrap();
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
    envd::filesystem::entry::set_metadata(
        &std::fs::File::open(&f).unwrap(),
        &f,
        &[("k".into(), "v".into())],
    )
    .unwrap();
    let e = fs
        .stat(StatRequest { path: s(&f) })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(e.name, "a.txt");
    assert_eq!(e.path, s(&f));
    assert_eq!(e.r#type, FileType::File as i32);
    assert_eq!(e.size, 5);
    assert_eq!(e.mode, 0o640);
    assert_eq!(e.permissions, "-rw-r-----");
    let me = nix::unistd::User::from_uid(nix::unistd::geteuid())
        .unwrap()
        .unwrap()
        .name;
    assert_eq!(e.owner, me);
    assert!(!e.group.is_empty());
    let mtime = std::fs::metadata(&f).unwrap().mtime();
    assert_eq!(e.modified_time.unwrap().seconds, mtime);
    assert_eq!(e.metadata.get("k").map(String::as_str), Some("v"));
    assert!(!e.is_symlink && e.symlink_target.is_none());

    let d = fs
        .stat(StatRequest {
            path: s(dir.path()),
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(d.r#type, FileType::Directory as i32);
    assert!(d.permissions.starts_with('d'));

    let r = fs
        .stat(StatRequest {
            path: s(&dir.path().join("missing")),
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    assert_eq!(
        code(
            fs.stat(StatRequest {
                path: "~root/x".into()
            })
            .await
        ),
        Code::InvalidArgument
    );
}

#[tokio::test]
async fn symlinks_to_file_dir_and_broken() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let root = dir.path();
    std::fs::write(root.join("file"), "x").unwrap();
    std::fs::create_dir(root.join("sub")).unwrap();
    std::os::unix::fs::symlink(root.join("file"), root.join("to-file")).unwrap();
    std::os::unix::fs::symlink(root.join("sub"), root.join("to-dir")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("broken")).unwrap();
    let stat = |p: PathBuf| {
        let mut fs = fs.clone();
        async move {
            fs.stat(StatRequest { path: s(&p) })
                .await
                .unwrap()
                .into_inner()
                .entry
                .unwrap()
        }
    };
    let canon = std::fs::canonicalize(root).unwrap();
    let e = stat(root.join("to-file")).await;
    assert!(e.is_symlink);
    assert_eq!(e.r#type, FileType::File as i32);
    assert_eq!(e.permissions, "lrwxrwxrwx");
    assert_eq!(
        e.symlink_target.as_deref(),
        Some(s(&canon.join("file")).as_str())
    );
    let e = stat(root.join("to-dir")).await;
    assert!(e.is_symlink);
    assert_eq!(e.r#type, FileType::Directory as i32);
    let e = stat(root.join("broken")).await;
    assert!(e.is_symlink);
    assert_eq!(
        e.symlink_target.as_deref(),
        Some(s(&root.join("nowhere")).as_str())
    );

    // Listing shows all three and does not descend into the linked directory.
    std::fs::write(root.join("sub/inner"), "y").unwrap();
    let list = fs
        .list_dir(ListDirRequest {
            path: s(root),
            depth: 3,
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let names: Vec<&str> = list
        .iter()
        .map(|e| e.path.strip_prefix(&s(root)).unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "/broken",
            "/file",
            "/sub",
            "/sub/inner",
            "/to-dir",
            "/to-file"
        ]
    );
}

#[tokio::test]
async fn list_dir_depth_and_errors() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let root = dir.path();
    std::fs::create_dir_all(root.join("a/b/c")).unwrap();
    std::fs::write(root.join("a/b/c/deep"), "").unwrap();
    std::fs::write(root.join("top"), "").unwrap();
    let list = |depth| {
        let mut fs = fs.clone();
        let p = s(root);
        async move {
            let entries = fs
                .list_dir(ListDirRequest {
                    path: p.clone(),
                    depth,
                })
                .await
                .unwrap()
                .into_inner()
                .entries;
            entries
                .into_iter()
                .map(|e| e.path.strip_prefix(&p).unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(list(0).await, ["/a", "/top"]);
    assert_eq!(list(1).await, ["/a", "/top"]);
    assert_eq!(list(2).await, ["/a", "/a/b", "/top"]);
    assert_eq!(
        list(10).await,
        ["/a", "/a/b", "/a/b/c", "/a/b/c/deep", "/top"]
    );
    let r = fs
        .list_dir(ListDirRequest {
            path: s(&root.join("top")),
            depth: 1,
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = fs
        .list_dir(ListDirRequest {
            path: s(&root.join("none")),
            depth: 1,
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    // A symlink loop as root.
    std::os::unix::fs::symlink(root.join("loop"), root.join("loop")).unwrap();
    let r = fs
        .list_dir(ListDirRequest {
            path: s(&root.join("loop")),
            depth: 1,
        })
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
}

#[tokio::test]
async fn make_dir_move_remove() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let root = dir.path();
    let deep = root.join("x/y/z");
    let e = fs
        .make_dir(MakeDirRequest { path: s(&deep) })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(e.r#type, FileType::Directory as i32);
    assert!(deep.is_dir());
    assert_eq!(
        code(fs.make_dir(MakeDirRequest { path: s(&deep) }).await),
        Code::AlreadyExists
    );
    std::fs::write(root.join("f"), "data").unwrap();
    assert_eq!(
        code(
            fs.make_dir(MakeDirRequest {
                path: s(&root.join("f"))
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            fs.make_dir(MakeDirRequest {
                path: s(&root.join("f/sub"))
            })
            .await
        ),
        Code::InvalidArgument
    );

    let dst = root.join("new/parent/g");
    let e = fs
        .r#move(MoveRequest {
            source: s(&root.join("f")),
            destination: s(&dst),
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(e.path, s(&dst));
    assert_eq!(std::fs::read_to_string(&dst).unwrap(), "data");
    assert!(!root.join("f").exists());
    let r = fs
        .r#move(MoveRequest {
            source: s(&root.join("f")),
            destination: s(&dst),
        })
        .await;
    assert_eq!(code(r), Code::NotFound);

    fs.remove(RemoveRequest {
        path: s(&root.join("x")),
    })
    .await
    .unwrap();
    assert!(!root.join("x").exists());
    // Removing what does not exist succeeds (E2B's SDKs rely on it).
    fs.remove(RemoveRequest {
        path: s(&root.join("x")),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn user_owns_what_it_creates_and_relative_paths_are_home() {
    if !is_root() {
        skip(
            "user_owns_what_it_creates",
            "needs root to create a user and chown",
        );
        return;
    }
    let user = "envdfsuser";
    if nix::unistd::User::from_name(user).ok().flatten().is_none() {
        assert!(std::process::Command::new("useradd")
            .args(["-m", user])
            .status()
            .unwrap()
            .success());
    }
    let pw = nix::unistd::User::from_name(user).unwrap().unwrap();
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let e = fs
        .make_dir(as_user(
            MakeDirRequest {
                path: "made/by/user".into(),
            },
            user,
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(e.path, format!("{}/made/by/user", pw.dir.display()));
    assert_eq!(e.owner, user);
    for p in ["made", "made/by", "made/by/user"] {
        assert_eq!(
            std::fs::metadata(pw.dir.join(p)).unwrap().uid(),
            pw.uid.as_raw()
        );
    }
    let e = fs
        .stat(as_user(
            StatRequest {
                path: "~/made".into(),
            },
            user,
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(e.path, format!("{}/made", pw.dir.display()));
    fs.remove(as_user(
        RemoveRequest {
            path: "~/made".into(),
        },
        user,
    ))
    .await
    .unwrap();
}

#[tokio::test]
async fn move_across_filesystems() {
    let dir = scratch();
    let mnt = dir.path().join("tmpfs");
    let Some(_tmpfs) = Tmpfs::mount("move_across_filesystems", &mnt, "size=64m") else {
        return;
    };
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let src = dir.path().join("tree");
    std::fs::create_dir_all(src.join("d")).unwrap();
    std::fs::write(src.join("d/file"), "cross").unwrap();
    std::fs::set_permissions(src.join("d/file"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("d/file", src.join("link")).unwrap();
    let dst = mnt.join("moved");
    fs.r#move(MoveRequest {
        source: s(&src),
        destination: s(&dst),
    })
    .await
    .unwrap();
    assert!(!src.exists());
    assert_eq!(
        std::fs::read_to_string(dst.join("d/file")).unwrap(),
        "cross"
    );
    assert_eq!(
        std::fs::metadata(dst.join("d/file")).unwrap().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_link(dst.join("link")).unwrap(),
        PathBuf::from("d/file")
    );
    // A symlink on its own moves as a link, and a single file keeps its mode.
    std::os::unix::fs::symlink("/nowhere", dir.path().join("alone")).unwrap();
    std::fs::write(dir.path().join("tool"), "#!/bin/sh\n").unwrap();
    std::fs::set_permissions(
        dir.path().join("tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    for name in ["alone", "tool"] {
        fs.r#move(MoveRequest {
            source: s(&dir.path().join(name)),
            destination: s(&mnt.join(name)),
        })
        .await
        .unwrap();
    }
    assert_eq!(
        std::fs::read_link(mnt.join("alone")).unwrap(),
        PathBuf::from("/nowhere")
    );
    assert_eq!(
        std::fs::metadata(mnt.join("tool")).unwrap().mode() & 0o7777,
        0o4755
    );
}

async fn next_fs_event(s: &mut tonic::Streaming<WatchDirResponse>) -> FilesystemEvent {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), s.next())
            .await
            .expect("no watch event within 10 s")
            .expect("watch stream ended")
            .expect("watch stream error");
        match msg.event.unwrap() {
            WEvent::Filesystem(e) => return e,
            WEvent::Keepalive(_) => {}
            WEvent::Start(_) => panic!("second start event"),
        }
    }
}

#[tokio::test]
async fn watch_reports_create_write_chmod_rename_remove() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let root = dir.path();
    let mut w = watch(&mut fs, root, false).await;
    let f = root.join("f");
    std::fs::write(&f, "1").unwrap();
    let mut seen = Vec::new();
    let want = |seen: &Vec<(String, i32)>, name: &str, t: EventType| {
        seen.iter().any(|(n, k)| n == name && *k == t as i32)
    };
    while !want(&seen, "f", EventType::Write) {
        let e = next_fs_event(&mut w).await;
        if e.r#type == EventType::Create as i32 {
            assert_eq!(e.entry.as_ref().unwrap().name, "f");
        }
        seen.push((e.name, e.r#type));
    }
    assert!(want(&seen, "f", EventType::Create));
    std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&f, root.join("g")).unwrap();
    std::fs::remove_file(root.join("g")).unwrap();
    while !want(&seen, "g", EventType::Remove) {
        let e = next_fs_event(&mut w).await;
        seen.push((e.name, e.r#type));
    }
    assert!(want(&seen, "f", EventType::Chmod), "{seen:?}");
    assert!(want(&seen, "f", EventType::Rename), "{seen:?}");
    assert!(want(&seen, "g", EventType::Create), "{seen:?}");
}

#[tokio::test]
async fn recursive_watch_sees_files_in_new_directories() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let root = dir.path();
    std::fs::create_dir(root.join("old")).unwrap();
    let mut w = watch(&mut fs, root, true).await;
    // A directory and files inside it at once, and deeper still.
    std::fs::create_dir_all(root.join("new/deeper")).unwrap();
    std::fs::write(root.join("new/inside"), "x").unwrap();
    std::fs::write(root.join("new/deeper/leaf"), "y").unwrap();
    std::fs::write(root.join("old/pre"), "z").unwrap();
    let mut created = std::collections::HashSet::new();
    for want in [
        "new",
        "new/deeper",
        "new/inside",
        "new/deeper/leaf",
        "old/pre",
    ] {
        while !created.contains(want) {
            let e = next_fs_event(&mut w).await;
            if e.r#type == EventType::Create as i32 {
                created.insert(e.name);
            }
        }
    }
}

#[tokio::test]
async fn watch_errors() {
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    std::fs::write(dir.path().join("file"), "").unwrap();
    let req = |p: PathBuf| WatchDirRequest {
        path: s(&p),
        recursive: false,
        include_entry: false,
        allow_network_mounts: false,
    };
    assert_eq!(
        code(fs.watch_dir(req(dir.path().join("none"))).await),
        Code::NotFound
    );
    assert_eq!(
        code(fs.watch_dir(req(dir.path().join("file"))).await),
        Code::InvalidArgument
    );
    let creq = CreateWatcherRequest {
        path: s(&dir.path().join("none")),
        ..Default::default()
    };
    assert_eq!(code(fs.create_watcher(creq).await), Code::NotFound);
    assert_eq!(
        code(
            fs.get_watcher_events(GetWatcherEventsRequest {
                watcher_id: "wnope".into()
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            fs.remove_watcher(RemoveWatcherRequest {
                watcher_id: "wnope".into()
            })
            .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn polling_watcher_events_and_overflow() {
    let envd = Envd::start(&["--watcher-buffer", "5"]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let id = create_watcher(&mut fs, dir.path(), false).await.unwrap();
    assert!(id.starts_with('w') && id.len() == 21, "{id}");
    std::fs::write(dir.path().join("one"), "").unwrap();
    let mut got = Vec::new();
    for _ in 0..50 {
        got.extend(
            fs.get_watcher_events(GetWatcherEventsRequest {
                watcher_id: id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .events,
        );
        if got.iter().any(|e| e.name == "one") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        got.iter()
            .any(|e| e.name == "one" && e.r#type == EventType::Create as i32),
        "{got:?}"
    );
    // Overflow the 5-event buffer.
    for i in 0..20 {
        std::fs::write(dir.path().join(format!("f{i}")), "").unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = fs
        .get_watcher_events(GetWatcherEventsRequest {
            watcher_id: id.clone(),
        })
        .await;
    let err = r.expect_err("overflow must be reported");
    assert_eq!(err.code(), Code::DataLoss);
    assert!(err.message().contains("dropped"), "{}", err.message());
    let kept = poll_watcher(&mut fs, &id).await.unwrap();
    assert_eq!(kept.len(), 5);
    fs.remove_watcher(RemoveWatcherRequest {
        watcher_id: id.clone(),
    })
    .await
    .unwrap();
    assert_eq!(
        code(
            fs.get_watcher_events(GetWatcherEventsRequest { watcher_id: id })
                .await
        ),
        Code::NotFound
    );
}

#[tokio::test]
async fn idle_watchers_are_removed() {
    let envd = Envd::start(&["--watcher-idle-timeout", "1"]);
    let mut fs = envd.fs().await;
    let dir = scratch();
    let id = create_watcher(&mut fs, dir.path(), false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(
        code(
            fs.get_watcher_events(GetWatcherEventsRequest { watcher_id: id })
                .await
        ),
        Code::NotFound
    );
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[0]
        })
        .collect()
}

fn header(path: &Path, append: bool) -> WriteFileRequest {
    header_with_mode(path, append, None)
}

fn header_with_mode(path: &Path, append: bool, mode: Option<u32>) -> WriteFileRequest {
    WriteFileRequest {
        message: Some(Message::Header(WriteHeader {
            path: s(path),
            mode,
            append,
        })),
    }
}

fn data(b: &[u8]) -> WriteFileRequest {
    WriteFileRequest {
        message: Some(Message::Data(b.to_vec().into())),
    }
}

#[tokio::test]
async fn streamed_256_mib_round_trip() {
    let envd = Envd::start(&[]);
    let mut t = envd.transfer().await;
    let dir = scratch();
    let path = dir.path().join("sub/big.bin");
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 256;
    let block = pattern(CHUNK, 7);
    // Chunk i is the block with i in its first 8 bytes: order and content matter.
    let chunk = move |i: usize| {
        let mut b = block.clone();
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
        b
    };
    let target = path.clone();
    let upload_chunk = chunk.clone();
    let upload = futures_util::stream::iter(0..=CHUNKS).map(move |i| {
        if i == 0 {
            header(&target, false)
        } else {
            data(&upload_chunk(i - 1))
        }
    });
    let e = t
        .write_file(upload)
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    assert_eq!(usize::try_from(e.size).unwrap(), CHUNK * CHUNKS);

    let mut rs = t
        .read_file(ReadFileRequest {
            path: s(&path),
            offset: None,
            length: None,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::with_capacity(2 * CHUNK);
    let (mut total, mut idx, mut same) = (0usize, 0usize, true);
    while let Some(msg) = rs.next().await {
        let d = msg.unwrap().data;
        assert!(d.len() <= 1 << 20, "chunk larger than 1 MiB");
        total += d.len();
        got.extend_from_slice(&d);
        while got.len() >= CHUNK {
            let rest = got.split_off(CHUNK);
            same &= got == chunk(idx);
            idx += 1;
            got = rest;
        }
    }
    assert_eq!(total, CHUNK * CHUNKS);
    assert!(same, "content differs");

    // Offset and length.
    let s2 = t
        .read_file(ReadFileRequest {
            path: s(&path),
            offset: Some(10),
            length: Some(5),
        })
        .await
        .unwrap()
        .into_inner();
    let parts: Vec<_> = s2.map(|m| m.unwrap().data).collect().await;
    assert_eq!(parts.concat(), chunk(0)[10..15].to_vec());
}

#[tokio::test]
async fn interrupted_write_keeps_old_content_and_leaves_nothing() {
    let envd = Envd::start(&[]);
    let t = envd.transfer().await;
    let dir = scratch();
    let path = dir.path().join("keep.txt");
    std::fs::write(&path, "old content").unwrap();
    // A client that sends a header and some data, then vanishes: its
    // connection closes with the upload's stream still open.
    let relay = common::cut::CutRelay::start(&envd.tcp).await;
    let t2 = transfer_client::TransferClient::new(envd::client::dial(&relay.url).await.unwrap());
    let (tx, call) = upload_under_way(&envd, t2, &path).await;
    relay.cut();
    let answer = call.await.unwrap();
    assert!(answer.is_err(), "a cut upload cannot succeed: {answer:?}");
    drop(tx);
    // envd removes its temporary file once it sees the stream reset; under a
    // loaded CI machine that can take longer than any fixed sleep.
    let names = || -> Vec<_> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    let cleaned = eventually(Duration::from_secs(20), || names().len() == 1).await;
    assert!(cleaned, "temporary files left: {:?}", names());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old content");

    // Errors: data before the header; a directory as target.
    let mut t = t;
    assert_eq!(
        code(
            t.write_file(futures_util::stream::iter(vec![data(b"x")]))
                .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            t.write_file(futures_util::stream::iter(vec![header(dir.path(), false)]))
                .await
        ),
        Code::InvalidArgument
    );
    let r = t
        .read_file(ReadFileRequest {
            path: s(dir.path()),
            offset: None,
            length: None,
        })
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    let r = t
        .read_file(ReadFileRequest {
            path: s(&dir.path().join("none")),
            offset: None,
            length: None,
        })
        .await;
    assert_eq!(code(r), Code::NotFound);

    // Append, and a mode for a new file.
    let p2 = dir.path().join("log");
    let h = header_with_mode(&p2, true, Some(0o600));
    t.write_file(futures_util::stream::iter(vec![h, data(b"a")]))
        .await
        .unwrap();
    t.write_file(futures_util::stream::iter(vec![
        header(&p2, true),
        data(b"b"),
    ]))
    .await
    .unwrap();
    assert_eq!(std::fs::read_to_string(&p2).unwrap(), "ab");
    assert_eq!(std::fs::metadata(&p2).unwrap().mode() & 0o777, 0o600);

    // A mode with the set-user-ID and set-group-ID bits is kept whole (the
    // file's chown to the user would clear them if it came last).
    let p3 = dir.path().join("tool");
    let h = header_with_mode(&p3, false, Some(0o6755));
    t.write_file(futures_util::stream::iter(vec![h, data(b"#!/bin/sh\n")]))
        .await
        .unwrap();
    assert_eq!(std::fs::metadata(&p3).unwrap().mode() & 0o7777, 0o6755);
}

type Call = tokio::task::JoinHandle<Result<tonic::Response<WriteFileResponse>, tonic::Status>>;

/// A WriteFile to `path` that has sent its header and 1 MiB, once envd has
/// its file open (so that whatever comes next lands mid-upload): the sender
/// of the rest, and the call.
async fn upload_under_way(
    envd: &Envd,
    mut t: transfer_client::TransferClient<tonic::transport::Channel>,
    path: &Path,
) -> (tokio::sync::mpsc::Sender<WriteFileRequest>, Call) {
    let (tx, rx) = tokio::sync::mpsc::channel::<WriteFileRequest>(4);
    let call = tokio::spawn(async move { t.write_file(tokio_stream_from(rx)).await });
    tx.send(header(path, false)).await.unwrap();
    tx.send(data(&vec![b'n'; 1 << 20])).await.unwrap();
    let dir = path.parent().unwrap();
    assert!(eventually(Duration::from_secs(20), || writing_into(envd.pid(), dir)).await);
    (tx, call)
}

/// Whether process `pid` has a file in `dir` open (a named one, or an
/// unnamed `O_TMPFILE` one, which shows as `dir/#inode (deleted)`).
fn writing_into(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .any(|target| target.parent() == Some(dir))
}

/// Whether the file system of `dir` has unnamed files (`O_TMPFILE`).
fn has_unnamed_files(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
        .is_ok()
}

// An upload that envd dies in the middle of (a crash, `kill -9`, the OOM
// killer) leaves nothing in the target's directory: the file being written
// has no name until it is complete. It used to stay there as a hidden
// `.envd-*.tmp` sibling for good, as big as what had arrived.
#[tokio::test]
async fn an_upload_cut_by_a_crash_of_envd_leaves_nothing() {
    let dir = scratch();
    if !has_unnamed_files(dir.path()) {
        eprintln!(
            "skipped: the file system of {} has no O_TMPFILE",
            dir.path().display()
        );
        return;
    }
    let envd = Envd::start(&[]);
    let t = envd.transfer().await;
    let path = dir.path().join("keep.txt");
    std::fs::write(&path, "old content").unwrap();
    let (_tx, call) = upload_under_way(&envd, t, &path).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(envd.pid()).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(call.await.unwrap().is_err(), "the upload cannot succeed");
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep.txt"], "left behind by the crash");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "old content");
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_util::Stream<Item = T> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn disk_full_is_resource_exhausted_and_leaves_nothing() {
    let dir = scratch();
    let mnt = dir.path().join("small");
    let Some(_tmpfs) = Tmpfs::mount("disk_full_is_resource_exhausted", &mnt, "size=1m") else {
        return;
    };
    let envd = Envd::start(&[]);
    let mut t = envd.transfer().await;
    let path = mnt.join("big");
    std::fs::write(&path, "previous").unwrap();
    let msgs = vec![
        header(&path, false),
        data(&vec![1u8; 1 << 20]),
        data(&vec![2u8; 1 << 20]),
    ];
    let err = t
        .write_file(futures_util::stream::iter(msgs))
        .await
        .expect_err("must not fit");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "previous");
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        1,
        "partial file left behind"
    );
}
