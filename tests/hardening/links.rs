//! Symlinks planted or swapped in by the sandbox's user.

use super::*;

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

/// [`root_and_user_dirs`] with a tmpfs mounted beside them: a Move from it
/// into the user's home crosses file systems. Fields drop in order: envd,
/// then the tmpfs, then the directory holding it.
struct CrossScene {
    e: Envd,
    mnt: PathBuf,
    etc: PathBuf,
    home: PathBuf,
    _tmpfs: Tmpfs,
    _dir: tempfile::TempDir,
}

fn cross_scene(test: &str, size: &str) -> Option<CrossScene> {
    let (e, dir, etc, home) = root_and_user_dirs(test)?;
    let mnt = dir.path().join("tmpfs");
    let tmpfs = Tmpfs::mount(test, &mnt, size)?;
    Some(CrossScene {
        e,
        mnt,
        etc,
        home,
        _tmpfs: tmpfs,
        _dir: dir,
    })
}

/// Root's `path` gets `mode`.
fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode)).unwrap();
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

/// Swaps every envd temporary (`.envd-*`) in `dir` with a fresh link of the
/// user's to `to`, and back, until `stop`: a user redirecting the name a
/// cross-filesystem Move copies into. Returns the swaps made.
fn steer_temporaries(
    dir: PathBuf,
    to: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    static LINKS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    std::thread::spawn(move || {
        let mut swaps = 0u32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            for entry in std::fs::read_dir(&dir).unwrap().flatten() {
                let name = entry.file_name();
                if !name.as_bytes().starts_with(b".envd-") {
                    continue;
                }
                let n = LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let link = dir.join(format!("steer{n}"));
                user_link(&to, &link);
                if exchange(&entry.path(), &link).is_ok() {
                    swaps += 1;
                    std::thread::sleep(Duration::from_micros(200));
                    let _ = exchange(&entry.path(), &link);
                }
            }
        }
        swaps
    })
}

// A cross-filesystem Move copies into a temporary beside the destination,
// in a directory the user owns, then gives each copy its source's owner and
// mode. The user swaps the temporary for a link to a root directory again
// and again: nothing may be made there, and no root file may get the
// source's mode (a chmod through the link would make it the user's to
// write).
#[tokio::test]
async fn a_moves_copy_cannot_be_steered_by_its_destination() {
    let Some(scene) = cross_scene(
        "a_moves_copy_cannot_be_steered_by_its_destination",
        "size=256m",
    ) else {
        return;
    };
    let (e, mnt, etc, home) = (&scene.e, &scene.mnt, &scene.etc, &scene.home);
    let shadow = etc.join("shadow");
    std::fs::write(&shadow, b"root's").unwrap();
    set_mode(&shadow, 0o600);
    let root_dir = etc.join("d");
    std::fs::create_dir(&root_dir).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut fs = e.fs().await;
    let mut swaps = 0;
    let mut answers = std::collections::BTreeMap::new();
    for round in 0..6 {
        // A tree (its directories are made by path, before the fix) and a
        // single large file (its mode was set by path after its bytes).
        let src = mnt.join(format!("src{round}"));
        let single = round % 2 == 1;
        if single {
            let f = std::fs::File::create(&src).unwrap();
            f.set_len(48 << 20).unwrap();
            std::os::unix::fs::chown(&src, Some(NOBODY), Some(NOBODY)).unwrap();
            std::fs::set_permissions(&src, std::os::unix::fs::PermissionsExt::from_mode(0o666))
                .unwrap();
        } else {
            user_entry(&src, None);
            // Mostly directories: a swap in place when one is made leaks it.
            for d in 0..400 {
                user_entry(&src.join(format!("d{d}")), None);
                user_entry(&src.join(format!("d{d}/f")), Some(b"user's"));
            }
        }
        // A file is swapped for a link to root's file, a tree for a link to
        // root's directory.
        let to = if single {
            shadow.clone()
        } else {
            root_dir.clone()
        };
        stop.store(false, std::sync::atomic::Ordering::Relaxed);
        let steering = steer_temporaries(home.clone(), to, stop.clone());
        let r = fs
            .r#move(MoveRequest {
                source: s(&src),
                destination: s(&home.join(format!("moved{round}"))),
            })
            .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        swaps += steering.join().unwrap();
        if let Err(status) = &r {
            // A copy that was swapped away is not moved into place, and the
            // source stays.
            if status.code() == tonic::Code::FailedPrecondition {
                assert!(src.exists(), "the source was removed: {status:?}");
            }
        }
        *answers
            .entry(r.map_or_else(|s| format!("{:?}", s.code()), |_| "Ok".into()))
            .or_insert(0) += 1;
    }
    println!("{swaps} swaps; answers: {answers:?}");
    let made: Vec<_> = std::fs::read_dir(&root_dir).unwrap().flatten().collect();
    assert!(
        made.is_empty(),
        "{} entries made in root's directory",
        made.len()
    );
    let mode = std::fs::metadata(&shadow).unwrap().mode() & 0o7777;
    assert_eq!(mode, 0o600, "root's file was given the source's mode");
    assert_eq!(std::fs::read(&shadow).unwrap(), b"root's");
    assert!(swaps > 0, "the user never caught a temporary to swap");
    healthy(e);
}

/// Watches `dir` (inotify) and trades each new entry whose name starts with
/// `prefix` for `with` (`RENAME_EXCHANGE`) the moment it appears, then back,
/// until `stop`: a user racing the two system calls between envd making a
/// directory and giving it its owner. Returns the trades made.
fn trade_new_entries(
    dir: PathBuf,
    prefix: &'static [u8],
    with: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        // SAFETY: plain inotify calls on an fd this thread owns.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK) };
        assert!(fd >= 0);
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
        // SAFETY: as above; `c` outlives the call.
        let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_CREATE) };
        assert!(wd >= 0);
        let mut buf = [0u8; 4096];
        let mut trades = 0u32;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            // SAFETY: reads into our buffer.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            let Ok(n) = usize::try_from(n) else {
                std::thread::yield_now();
                continue;
            };
            // Each event: wd, mask, cookie, len (4 bytes each), then the
            // name, NUL-padded to `len`.
            let mut off = 0;
            while off + 16 <= n {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap());
                let raw = &buf[off + 16..off + 16 + len as usize];
                let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
                off += 16 + len as usize;
                if name.starts_with(prefix) {
                    let made = dir.join(std::ffi::OsStr::from_bytes(name));
                    if exchange(&made, &with).is_ok() {
                        trades += 1;
                        let _ = exchange(&made, &with);
                    }
                }
            }
        }
        // SAFETY: closing our own fd.
        unsafe { libc::close(fd) };
        trades
    })
}

// A walk that makes a missing directory for the user gives it to the user,
// and a cross-filesystem Move gives its copy the source's owner. The user
// watches its home and trades each new directory (or envd's temporary) for
// a root directory of its home the moment it appears: neither chown may
// land on that.
#[tokio::test]
async fn directories_made_for_the_user_cannot_be_traded_for_roots() {
    let Some(scene) = cross_scene(
        "directories_made_for_the_user_cannot_be_traded_for_roots",
        "size=16m",
    ) else {
        return;
    };
    let (e, mnt, home) = (&scene.e, &scene.mnt, &scene.home);
    let secret = home.join("secret");
    std::fs::create_dir(&secret).unwrap();
    set_mode(&secret, 0o700);
    std::fs::write(secret.join("key"), b"root's").unwrap();
    // Root's directory is followed by an fd, wherever the trades leave it: it
    // must stay root's, in place in the tree, with its file.
    let held = std::fs::File::open(&secret).unwrap();
    let intact = |when: &str| {
        let m = held.metadata().unwrap();
        assert_eq!(
            m.uid(),
            0,
            "root's directory was given to the user by {when}"
        );
        assert!(m.nlink() > 0, "root's directory was removed by {when}");
        let key = nix::fcntl::openat(
            &held,
            "key",
            nix::fcntl::OFlag::O_RDONLY,
            nix::sys::stat::Mode::empty(),
        );
        assert!(key.is_ok(), "root's file was removed by {when}");
    };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each phase runs again (three rounds at most) while the user has caught
    // nothing yet: on a loaded machine its thread can miss a whole round.
    let mut made_trades = 0;
    for round in 0..3 {
        stop.store(false, std::sync::atomic::Ordering::Relaxed);
        let trading = trade_new_entries(home.clone(), b"m", secret.clone(), stop.clone());
        let mut answers = std::collections::BTreeMap::new();
        for i in round * 2000..(round + 1) * 2000 {
            let r = upload(
                e,
                &format!("{}&username=nobody", s(&home.join(format!("m{i}/f")))),
                b"host's",
            );
            *answers.entry(r.status).or_insert(0) += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        made_trades += trading.join().unwrap();
        println!("uploads: {made_trades} trades; answers by status: {answers:?}");
        intact("an upload");
        if made_trades > 0 {
            break;
        }
    }

    let mut fs = e.fs().await;
    let mut move_trades = 0;
    for round in 0..3 {
        stop.store(false, std::sync::atomic::Ordering::Relaxed);
        let trading = trade_new_entries(home.clone(), b".envd-", secret.clone(), stop.clone());
        let mut answers = std::collections::BTreeMap::new();
        for i in round * 1000..(round + 1) * 1000 {
            let src = mnt.join(format!("t{i}"));
            user_entry(&src, None);
            let r = fs
                .r#move(MoveRequest {
                    source: s(&src),
                    destination: s(&home.join(format!("moved{i}"))),
                })
                .await;
            *answers
                .entry(r.map_or_else(|s| format!("{:?}", s.code()), |_| "Ok".into()))
                .or_insert(0) += 1;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        move_trades += trading.join().unwrap();
        println!("moves: {move_trades} trades; answers: {answers:?}");
        intact("a Move's copy");
        if move_trades > 0 {
            break;
        }
    }
    assert!(
        made_trades > 0 && move_trades > 0,
        "the user never caught a new entry"
    );
    healthy(e);
}
