//! Crash re-adoption: envd keeps its commands' fds in the service manager's
//! fd store; after `kill -9`, a restarted envd takes them over. Driven here
//! by a stand-in for systemd's notify/fd-store protocol (tests/common/
//! fdstore.rs); the QEMU test does it under the real systemd.

mod common;

use std::time::Duration;

use common::fdstore::FdStore;
use common::*;
use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::{ListRequest, SendSignalRequest, Signal};

/// The restarted envd, ended with the test (a `Child` alone is not).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// envd's arguments in these tests: one listener on a free loopback port.
fn loopback_args() -> Vec<String> {
    vec!["--listen".to_owned(), "tcp://127.0.0.1:0".to_owned()]
}

async fn client(url: &str) -> ProcessClient<tonic::transport::Channel> {
    ProcessClient::new(envd::client::dial(url).await.unwrap())
}

/// The first envd of a test, on a free loopback port, once it keeps crash
/// records (its first record is in the store: commands started before that
/// are in the record only if still running then): it, its URL and a client.
async fn first_envd(
    store: &FdStore,
    args: &[String],
) -> (KillOnDrop, String, ProcessClient<tonic::transport::Channel>) {
    let (first, urls, _log) = store.spawn(args);
    let first = KillOnDrop(first);
    let url = urls[0].clone();
    let c = client(&url).await;
    let on = || store.names().iter().any(|n| n == "envd-state");
    assert!(
        eventually(Duration::from_secs(10), on).await,
        "no crash record"
    );
    (first, url, c)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_envd_takes_over_the_commands_of_a_killed_one() {
    let store = FdStore::new();
    let args = loopback_args();
    let (mut first, url, mut c) = first_envd(&store, &args).await;

    let mut counter = sh("i=0; while [ $i -lt 120 ]; do echo $i; i=$((i+1)); sleep 0.02; done");
    counter.tag = Some("counter".into());
    let (mut live, _) = started(&mut c, counter).await;
    let mut reader = sh("read line; echo got $line; exit 7");
    reader.tag = Some("reader".into());
    let (_r, reader_o) = started(&mut c, reader).await;
    let mut sleeper = cmd("sleep", &["60"]);
    sleeper.tag = Some("sleeper".into());
    let (_s, _) = started(&mut c, sleeper).await;
    let mut quick = sh("sleep 0.3; exit 4");
    quick.tag = Some("quick".into());
    let (_q, _) = started(&mut c, quick).await;
    // One that ends before the crash: an exit record.
    let mut early = sh("echo early; exit 3");
    early.tag = Some("early".into());
    let (mut early_s, mut early_o) = started(&mut c, early).await;
    read_until(&mut early_s, &mut early_o, |o| o.end.is_some()).await;

    // One whose output envd reads and no client takes before the crash.
    let mut unread = sh("for i in 1 2 3; do echo out $i; echo err $i >&2; done; sleep 3");
    unread.tag = Some("unread".into());
    let (_u, _) = started(&mut c, unread).await;

    // The store holds the listener, the record and each command's fds.
    assert!(
        eventually(Duration::from_secs(5), || {
            store.names().iter().any(|n| n == "envd-state") && store.command_fds('p') >= 4
        })
        .await,
        "fd store: {:?}",
        store.names()
    );
    // A client follows the counter; envd is killed outright meanwhile.
    let mut o = Outcome::default();
    read_until(&mut live, &mut o, |o| o.out().lines().count() >= 20).await;
    let follower = tokio::spawn(async move {
        use futures_util::StreamExt;
        while let Some(Ok(item)) = live.next().await {
            o.record(item.event());
        }
        o
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _ = first.0.kill();
    let _ = first.0.wait();
    let o = follower.await.unwrap();
    let seen = o.out().len() as u64;
    // Meanwhile the counter writes into its pipe and `quick` ends.
    tokio::time::sleep(Duration::from_millis(600)).await;

    let (second, urls2, log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    assert_eq!(urls2[0], url, "the listener was not taken over");
    let mut c = client(&url).await;
    let listed = c.list(ListRequest {}).await.unwrap().into_inner().processes;
    let tags: Vec<_> = listed.iter().filter_map(|p| p.tag.clone()).collect();
    for t in ["counter", "reader", "sleeper"] {
        assert!(
            tags.iter().any(|x| x == t),
            "{t} not re-adopted: {tags:?}\n{}",
            log2.lock().unwrap().join("\n")
        );
    }

    // Output continues from where the client stopped: no gap, no duplicate.
    let rest = resume_tag(&mut c, "counter", seen).await;
    assert_eq!(
        rest.start.as_ref().unwrap().output_lost,
        Some(0),
        "output lost"
    );
    let all = format!("{}{}", o.out(), rest.out());
    let nums: Vec<u32> = all.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(
        nums,
        (0..120).collect::<Vec<_>>(),
        "counter across the crash"
    );

    // What the killed envd had read and delivered to nobody was kept in
    // the crash record's output tails: all of it, each byte from its pipe.
    let kept = resume_tag(&mut c, "unread", 0).await;
    assert_eq!(
        kept.start.as_ref().unwrap().output_lost,
        Some(0),
        "output read before the crash was lost"
    );
    assert_eq!(kept.out(), "out 1\nout 2\nout 3\n");
    assert_eq!(
        String::from_utf8_lossy(&kept.stderr),
        "err 1\nerr 2\nerr 3\n"
    );

    // Input and signals reach re-adopted commands; exits are reported.
    send_input(&mut c, reader_o.pid, stdin_input(b"again\n"))
        .await
        .expect("stdin after the crash");
    let read = resume_tag(&mut c, "reader", 0).await;
    assert!(read.out().contains("got again"), "{:?}", read.out());
    let end = read.end();
    // Exact where the kernel tells (pidfd exit info, or the process-event
    // connector as root); otherwise the end says the status is unknown.
    assert!(
        end.exit_code == 7
            || end
                .error
                .as_deref()
                .unwrap_or("")
                .contains("exit status lost"),
        "{end:?}"
    );
    println!("reader's end after re-adoption: {end:?}");

    c.send_signal(SendSignalRequest {
        process: by_tag("sleeper"),
        signal: Signal::Sigterm as i32,
        descendants: false,
    })
    .await
    .expect("signal after the crash");
    let slept = resume_tag(&mut c, "sleeper", 0).await;
    let end = slept.end();
    assert!(
        end.status == "signal: terminated"
            || end
                .error
                .as_deref()
                .unwrap_or("")
                .contains("exit status lost"),
        "{end:?}"
    );
    // A command's stdin in the store must not keep it from seeing EOF.
    let mut cat = cmd("cat", &[]);
    cat.tag = Some("cat".into());
    let (mut cat_s, cat_o) = started(&mut c, cat).await;
    assert!(eventually(Duration::from_secs(5), || store.command_fds('i') >= 1).await);
    c.close_stdin(envd::proto::process::CloseStdinRequest {
        process: by_pid(cat_o.pid),
    })
    .await
    .expect("CloseStdin");
    let mut cat_o = cat_o;
    tokio::time::timeout(
        Duration::from_secs(10),
        read_until(&mut cat_s, &mut cat_o, |o| o.end.is_some()),
    )
    .await
    .expect("cat never saw the end of its input");
    assert_eq!(cat_o.end().exit_code, 0);

    // `quick` ended while envd was down: never a made-up status.
    let quick = resume_tag(&mut c, "quick", 0).await;
    let end = quick.end();
    assert!(
        end.exit_code == 4
            || end
                .error
                .as_deref()
                .unwrap_or("")
                .contains("exit status lost"),
        "{end:?}"
    );
    println!("quick's end (ended while envd was down): {end:?}");
    // The exit record of a command that ended before the crash, with its
    // output (its ring stays as long as the record).
    let early = resume_tag(&mut c, "early", 0).await;
    assert_eq!(early.end().exit_code, 3, "{:?}", early.end());
    assert_eq!(early.start.as_ref().unwrap().output_lost, Some(0));
    assert_eq!(early.out(), "early\n");

    // A pty command's fds leave the store when it ends, as a pipe one's do.
    let mut tty = sh("sleep 0.3");
    tty.pty = Some(envd::proto::process::Pty {
        size: Some(envd::proto::process::pty::Size { cols: 80, rows: 24 }),
    });
    let (mut tty_s, mut tty_o) = started(&mut c, tty).await;
    let tty_names = |s: &FdStore| s.command_fds('t');
    assert!(
        eventually(Duration::from_secs(5), || tty_names(&store) == 1).await,
        "{:?}",
        store.names()
    );
    read_until(&mut tty_s, &mut tty_o, |o| o.end.is_some()).await;
    assert!(
        eventually(Duration::from_secs(5), || tty_names(&store) == 0).await,
        "{:?}",
        store.names()
    );
    // Ended commands leave the store.
    assert!(
        eventually(Duration::from_secs(5), || !store
            .names()
            .iter()
            .any(|n| n.starts_with(&format!("c{}", 1)) && n.ends_with('i')))
        .await,
        "{:?}",
        store.names()
    );
}

/// Output that envd read survives a second crash that comes before anyone
/// re-attached: the envd that took the command over starts the command's
/// ring with the output it got back.
/// A background job left by an ended command keeps the pipe it writes to
/// across an envd crash: the pipe is in the fd store (`k<seq>o`, `k<seq>e`),
/// the restarted envd drains it on, so the job's next write is no `SIGPIPE`;
/// once the job is gone the store lets the pipes go.
#[tokio::test(flavor = "multi_thread")]
async fn background_jobs_keep_their_pipe_across_a_crash() {
    let store = FdStore::new();
    let args = loopback_args();
    let (mut first, _url, mut c) = first_envd(&store, &args).await;
    let job = BackgroundJob::new();
    assert_eq!(run(&mut c, job.command()).await.out(), "started\n");
    let kept = || store.names().iter().filter(|n| n.starts_with('k')).count();
    assert!(
        eventually(Duration::from_secs(5), || kept() == 2).await,
        "fd store: {:?}",
        store.names()
    );
    let _ = first.0.kill();
    let _ = first.0.wait();

    let (second, _, log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    let took = || {
        log2.lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("kept pipes drained on"))
    };
    assert!(
        eventually(Duration::from_secs(10), took).await,
        "no kept pipe taken over:\n{}",
        log2.lock().unwrap().join("\n")
    );
    assert!(
        job.release().await,
        "the job died writing to its stdout/stderr after the crash"
    );
    assert!(
        eventually(Duration::from_secs(10), || kept() == 0).await,
        "kept pipes stayed in the store: {:?}",
        store.names()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn output_survives_a_second_crash_after_a_takeover() {
    let store = FdStore::new();
    let args = loopback_args();
    let (mut envd, url, mut c) = first_envd(&store, &args).await;
    let mut said = sh("echo one; echo two >&2; sleep 30");
    said.tag = Some("said".into());
    let (mut s, mut o) = started(&mut c, said).await;
    read_until(&mut s, &mut o, |o| {
        !o.stdout.is_empty() && !o.stderr.is_empty()
    })
    .await;
    // And one that ended before the first crash: its exit record, taken
    // over, keeps its output through the second too.
    let mut ended = sh("echo three; echo four >&2");
    ended.tag = Some("ended".into());
    let (mut es, mut eo) = started(&mut c, ended).await;
    read_until(&mut es, &mut eo, |o| o.end.is_some()).await;
    for _ in 0..2 {
        // The record is rewritten a few milliseconds after a Start or a
        // takeover.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _ = envd.0.kill();
        let _ = envd.0.wait();
        let (next, _, _) = store.spawn(&args);
        envd = KillOnDrop(next);
        let mut c = client(&url).await;
        let listed = c.list(ListRequest {}).await.unwrap().into_inner().processes;
        assert!(listed.iter().any(|p| p.tag.as_deref() == Some("said")));
    }
    let mut c = client(&url).await;
    let mut s = c
        .connect(envd::proto::process::ConnectRequest {
            process: by_tag("said"),
            resume_offset: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.start.is_some()).await;
    assert_eq!(
        o.start.as_ref().unwrap().output_lost,
        Some(0),
        "output lost to the second crash"
    );
    read_until(&mut s, &mut o, |o| {
        !o.stdout.is_empty() && !o.stderr.is_empty()
    })
    .await;
    assert_eq!(
        (o.out().as_str(), o.stderr.as_slice()),
        ("one\n", &b"two\n"[..])
    );
    let ended = resume_tag(&mut c, "ended", 0).await;
    assert_eq!(
        ended.start.as_ref().unwrap().output_lost,
        Some(0),
        "an ended command's output lost to the second crash"
    );
    assert_eq!(
        (ended.out(), ended.err()),
        ("three\n".into(), "four\n".into())
    );
    c.send_signal(SendSignalRequest {
        process: by_tag("said"),
        signal: Signal::Sigkill as i32,
        descendants: false,
    })
    .await
    .unwrap();
}

/// A client that stops reading holds a fast writer back (back-pressure):
/// envd's log fills, then its pump stops reading the pipe. Whatever envd
/// has read by then is in the log (or reported lost), never only in a
/// pump's hands: after a kill -9, the output that comes back at the
/// resume offset is the writer's own bytes at that offset.
#[tokio::test(flavor = "multi_thread")]
async fn output_held_back_by_a_slow_client_survives_a_crash_without_a_gap() {
    let store = FdStore::new();
    let args = loopback_args();
    let (mut first, url, mut c) = first_envd(&store, &args).await;
    const LINES: u32 = 1_500_000;
    let mut writer = cmd("seq", &["1", &LINES.to_string()]);
    writer.tag = Some("writer".into());
    // Started and then not read: the client's window and envd's log fill.
    let (stream, _) = started(&mut c, writer).await;
    let mut stalled = 0;
    let mut last = 0;
    while stalled < 5 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let end = store_end(&store);
        stalled = if end == last { stalled + 1 } else { 0 };
        last = end;
    }
    let _ = first.0.kill();
    let _ = first.0.wait();
    drop(stream);

    let (second, _urls2, _log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    let mut c = client(&url).await;
    let rest = resume_tag(&mut c, "writer", 0).await;
    let start = rest.start.as_ref().unwrap();
    let at = usize::try_from(start.output_offset.unwrap()).unwrap();
    assert_eq!(start.output_lost, Some(at as u64));
    assert_eq!(rest.end().exit_code, 0, "{:?}", rest.end());
    let all: String = (1..=LINES).map(|i| format!("{i}\n")).collect();
    assert!(at > 0 && at < all.len(), "resumed at {at} of {}", all.len());
    let got = rest.out();
    assert_eq!(got.len(), all.len() - at, "output from {at}: a gap or more");
    assert!(
        got == all[at..],
        "output from {at} is not the writer's: first difference at {:?}",
        got.bytes().zip(all[at..].bytes()).position(|(a, b)| a != b)
    );
}

/// A command's slot in the crash record (and its output ring) stays as long
/// as its exit record, and is free again once the record is forgotten.
#[tokio::test(flavor = "multi_thread")]
async fn a_forgotten_exit_record_gives_its_slot_back() {
    let store = FdStore::new();
    let mut args = loopback_args();
    args.extend(["--exit-retention".to_owned(), "1".to_owned()]);
    let (_envd, _, mut c) = first_envd(&store, &args).await;
    let (s, _) = started(&mut c, sh("echo x")).await;
    assert_eq!(collect(s).await.out(), "x\n");
    let held = || {
        (
            owned(&store, "envd-offsets", 16),
            owned(&store, "envd-tails", 256),
        )
    };
    assert_eq!(
        held(),
        (1, 1),
        "the slot or ring went with the command's end"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Expired records are forgotten when the table is next looked at.
    c.list(ListRequest {}).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || held() == (0, 0)).await,
        "a forgotten exit record kept its slot or ring: {:?}",
        held()
    );
}

/// Entries of a crash record's table (`name`, entries of `stride` bytes that
/// start with their owner word) that a command owns, among the first 64.
fn owned(store: &FdStore, name: &str, stride: usize) -> usize {
    store
        .with_fd(name, |fd| {
            let mut table = vec![0u8; 64 * stride];
            let n = nix::sys::uio::pread(fd, &mut table, 0).unwrap_or(0);
            table[..n]
                .chunks_exact(stride)
                .filter(|entry| entry[..8] != [0; 8])
                .count()
        })
        .unwrap_or(0)
}

/// The end offset the crash record's offset table publishes for the first
/// slot (the test's only command).
fn store_end(store: &FdStore) -> u64 {
    store
        .with_fd("envd-offsets", |fd| {
            let mut w = [0u8; 8];
            match nix::sys::uio::pread(fd, &mut w, 8) {
                Ok(8) => u64::from_ne_bytes(w),
                _ => 0,
            }
        })
        .unwrap_or(0)
}

/// A SendSignal with descendants freezes the command's cgroup while it
/// signals; an envd killed in between leaves it frozen, and the envd that
/// takes over thaws it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cgroup_left_frozen_by_a_killed_envd_is_thawed_on_takeover() {
    const NAME: &str = "frozen_takeover";
    if !is_root() {
        return skip(NAME, "creating cgroups needs root");
    }
    let Some(cg) = common::cgroup::TestCgroup::create(NAME) else {
        return skip_on_this_machine(NAME, "no writable cgroup v2 hierarchy with cgroup.freeze");
    };
    let store = FdStore::new();
    let mut args = loopback_args();
    args.extend(cg.envd_args());
    let (first, urls, _log) = store.spawn(&args);
    let mut first = KillOnDrop(first);
    let mut c = client(&urls[0]).await;
    let mut ticker = sh("while :; do echo tick; sleep 0.05; done");
    ticker.tag = Some("ticker".into());
    let (_t, o) = started(&mut c, ticker).await;
    let leaf = cg.leaf_of(o.pid);
    assert!(
        eventually(Duration::from_secs(5), || store.command_fds('p') >= 1).await,
        "fd store: {:?}",
        store.names()
    );
    // The record is rewritten a few milliseconds after a Start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    // As if envd died between the freeze and the thaw.
    std::fs::write(leaf.join("cgroup.freeze"), "1").unwrap();
    let _ = first.0.kill();
    let _ = first.0.wait();

    let (second, urls2, log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    let mut c = client(&urls2[0]).await;
    let listed = c.list(ListRequest {}).await.unwrap().into_inner().processes;
    assert!(
        listed.iter().any(|p| p.tag.as_deref() == Some("ticker")),
        "ticker not re-adopted\n{}",
        log2.lock().unwrap().join("\n")
    );
    let thawed = || {
        std::fs::read_to_string(leaf.join("cgroup.events"))
            .is_ok_and(|e| e.lines().any(|l| l == "frozen 0"))
    };
    assert!(
        eventually(Duration::from_secs(5), thawed).await,
        "the re-adopted command's cgroup stayed frozen"
    );
    let ticks = |o: &Outcome| o.out().matches("tick").count();
    let mut resumed = c
        .connect(envd::proto::process::ConnectRequest {
            process: by_tag("ticker"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Outcome::default();
    tokio::time::timeout(
        Duration::from_secs(10),
        read_until(&mut resumed, &mut seen, |o| ticks(o) >= 3),
    )
    .await
    .expect("the re-adopted command does not run");
    c.send_signal(SendSignalRequest {
        process: by_tag("ticker"),
        signal: Signal::Sigkill as i32,
        descendants: true,
    })
    .await
    .unwrap();
}

/// A Move across file systems copies into a hidden directory beside its
/// destination and renames it into place. An envd killed in the middle of
/// the copy left that copy there for good; the envd that takes over removes
/// it (the crash record lists the temporaries in flight).
#[tokio::test(flavor = "multi_thread")]
async fn a_move_cut_by_a_crash_leaves_no_copy_behind() {
    move_cut_by_a_crash("move_crash", Kill::OnceListed).await;
}

/// Killed the moment the copy appears beside its destination, well within
/// the 5 ms after which a paced rewrite would list it (envds before
/// 2026-12-05 listed it that way and left this copy behind): the record
/// lists a temporary before it exists.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_killed_as_its_copy_appears_leaves_no_copy_behind() {
    move_cut_by_a_crash("move_crash_at_once", Kill::AsItAppears).await;
}

/// A copy left by a crash, which a process in the sandbox then trades for a
/// directory of root's before the next envd starts: the record says which
/// file the copy was, and the next envd removes only that.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_traded_after_a_crash_is_not_what_is_removed() {
    move_cut_by_a_crash("move_crash_traded", Kill::Traded).await;
}

/// When the Move's envd is killed.
#[derive(Clone, Copy, PartialEq)]
enum Kill {
    /// Once the crash record lists the copy.
    OnceListed,
    /// As soon as the copy is seen in the destination's directory.
    AsItAppears,
    /// Once the crash record says which file the copy is; the copy is then
    /// renamed away and a root directory put under its name.
    Traded,
}

async fn move_cut_by_a_crash(test: &str, when: Kill) {
    use envd::proto::filesystem::filesystem_client::FilesystemClient;
    let Some(mv) = CrossFsMove::new(test, 400) else {
        return;
    };
    let mv = std::sync::Arc::new(mv);
    let hidden = || mv.hidden();

    let store = FdStore::new();
    let args = loopback_args();
    let (first, urls, _log) = store.spawn(&args);
    let mut first = KillOnDrop(first);
    let mut fs = FilesystemClient::new(envd::client::dial(&urls[0]).await.unwrap());
    // Crash records are on once the first record is stored.
    assert!(
        eventually(Duration::from_secs(20), || record(&store).is_some()).await,
        "no crash record"
    );
    let request = mv.request();
    let since = std::time::Instant::now();
    let call = tokio::spawn(async move { fs.r#move(request).await });
    match when {
        Kill::OnceListed | Kill::Traded => {
            // Traded: once the record has the copy's device and inode.
            let listed = |r: &envd::proto::envd::handover::State| {
                r.temporaries
                    .iter()
                    .any(|t| when != Kill::Traded || t.contains('\0'))
            };
            assert!(
                eventually(Duration::from_secs(20), || record(&store)
                    .is_some_and(|r| listed(&r)))
                .await,
                "no copy in the record"
            );
            let _ = first.0.kill();
        }
        Kill::AsItAppears => {
            let (watched, pid) = (mv.clone(), first.0.id());
            let seen = tokio::task::spawn_blocking(move || {
                let until = std::time::Instant::now() + Duration::from_secs(20);
                while watched.hidden().is_empty() {
                    if std::time::Instant::now() > until {
                        return false;
                    }
                }
                kill_now(pid);
                true
            })
            .await
            .unwrap();
            assert!(seen, "no copy appeared");
        }
    }
    println!("killed {:?} after the Move", since.elapsed());
    let _ = first.0.wait();
    assert!(
        call.await.unwrap().is_err(),
        "the move finished before the kill"
    );
    let left = hidden();
    assert!(!left.is_empty(), "the copy is gone before the restart");
    if when == Kill::Traded {
        let name = mv.dst.join(&left[0]);
        std::fs::rename(&name, mv.dst.join("away")).unwrap();
        std::fs::create_dir(&name).unwrap();
        std::fs::write(name.join("key"), b"root's").unwrap();
        let (second, _, log2) = store.spawn(&args);
        let _second = KillOnDrop(second);
        // The next envd tries the name and leaves what is there now (with a
        // warning), or removes it.
        let tried =
            || {
                !name.join("key").exists()
                    || log2.lock().unwrap().iter().any(|l| {
                        l.contains("temporaries the previous envd left are not all removed")
                    })
            };
        assert!(
            eventually(Duration::from_secs(20), tried).await,
            "the next envd did not try the copy's name"
        );
        assert!(
            name.join("key").exists(),
            "the directory traded in under the copy's name was removed"
        );
        assert!(mv.tree.join("d399/f99").exists(), "the source is untouched");
        return;
    }

    let (second, _, log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    assert!(
        eventually(Duration::from_secs(20), || hidden().is_empty()).await,
        "left behind: {left:?}\n{}",
        log2.lock().unwrap().join("\n")
    );
    assert!(mv.tree.join("d399/f99").exists(), "the source is untouched");
    assert!(!mv.dst.join("tree").exists());
}

/// SIGKILL to `pid`, from whichever thread saw the moment.
fn kill_now(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// The state record in `store`, as the last envd wrote it (none before the
/// first).
fn record(store: &FdStore) -> Option<envd::proto::envd::handover::State> {
    use prost::Message;
    store.with_fd("envd-state", |fd| {
        let mut head = [0u8; 16];
        nix::sys::uio::pread(fd, &mut head, 0).unwrap();
        let word = u64::from_le_bytes(head[..8].try_into().unwrap());
        let at = if word >> 63 == 1 { 16 + (64 << 20) } else { 16 };
        let mut bytes = vec![0u8; usize::try_from(word & !(1 << 63)).unwrap()];
        nix::sys::uio::pread(fd, &mut bytes, at).unwrap();
        envd::proto::envd::handover::State::decode(bytes.as_slice()).unwrap()
    })
}

/// 64-bit FNV-1a, the crash record's checksum.
fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// envds before 2026-12-05 stored each of a command's fds under a name of its
/// own (`c<seq>o`, `e`, `i`, `t`, `p`) and kept no pipe inodes. A store and
/// record in that shape (made here from a current one) is taken over, and
/// the old names leave the store with the command.
#[tokio::test(flavor = "multi_thread")]
async fn a_record_that_names_each_fd_is_taken_over() {
    use prost::Message;
    let store = FdStore::new();
    let args = loopback_args();
    let (first, urls, _log) = store.spawn(&args);
    let mut first = KillOnDrop(first);
    let mut c = client(&urls[0]).await;
    let mut echo = sh("read line; echo got $line; echo to stderr >&2");
    echo.tag = Some("echo".into());
    let (_e, echo_o) = started(&mut c, echo).await;
    assert!(eventually(Duration::from_secs(5), || store.command_fds('o') == 2).await);
    // The record is rewritten a few milliseconds after a Start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = first.0.kill();
    let _ = first.0.wait();

    // The record as an older envd wrote it: in the first place, one name
    // per fd, no inodes.
    let mut state = record(&store).unwrap();
    let cmd = state
        .commands
        .iter_mut()
        .find(|c| c.pid == echo_o.pid)
        .unwrap();
    let (seq, inos) = (cmd.seq, (cmd.stdout_ino, cmd.stderr_ino));
    assert!(inos.0 != 0 && inos.1 != 0, "{cmd:?}");
    for (name, what) in [
        (&mut cmd.stdout_name, 'o'),
        (&mut cmd.stderr_name, 'e'),
        (&mut cmd.stdin_name, 'i'),
        (&mut cmd.pty_name, 't'),
        (&mut cmd.pidfd_name, 'p'),
    ] {
        *name = format!("c{seq}{what}");
    }
    (cmd.stdout_ino, cmd.stderr_ino) = (0, 0);
    let bytes = state.encode_to_vec();
    store
        .with_fd("envd-state", |fd| {
            nix::sys::uio::pwrite(fd, &bytes, 16).unwrap();
            let mut head = [0u8; 16];
            head[..8].copy_from_slice(&(bytes.len() as u64).to_le_bytes());
            head[8..].copy_from_slice(&fnv(&bytes).to_le_bytes());
            nix::sys::uio::pwrite(fd, &head, 0).unwrap();
        })
        .unwrap();
    let group = format!("c{seq}");
    store.rename(|n, fd| {
        if n != group {
            return None;
        }
        let st = nix::sys::stat::fstat(fd).unwrap();
        let what = match st.st_mode & libc::S_IFMT {
            libc::S_IFIFO if st.st_ino == inos.0 => 'o',
            libc::S_IFIFO if st.st_ino == inos.1 => 'e',
            libc::S_IFCHR => 't',
            _ => 'p',
        };
        Some(format!("c{seq}{what}"))
    });
    let old_names = |s: &FdStore| {
        s.names()
            .into_iter()
            .filter(|n| n.starts_with(&group))
            .collect::<Vec<_>>()
    };
    let mut was = old_names(&store);
    was.sort();
    assert_eq!(
        was,
        ["c0e", "c0i", "c0o", "c0p"].map(|n| n.replace("c0", &group))
    );

    let (second, urls2, log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    assert_eq!(urls2[0], urls[0]);
    let mut c = client(&urls2[0]).await;
    send_input(&mut c, echo_o.pid, stdin_input(b"again\n"))
        .await
        .expect("stdin after the takeover");
    let o = resume_tag(&mut c, "echo", 0).await;
    assert_eq!(
        (o.out().as_str(), o.err().as_str()),
        ("got again\n", "to stderr\n"),
        "{}",
        log2.lock().unwrap().join("\n")
    );
    assert!(
        eventually(Duration::from_secs(5), || old_names(&store).is_empty()).await,
        "{:?}\n{}",
        store.names(),
        log2.lock().unwrap().join("\n")
    );
}

/// The store never holds a state record that is not whole: an envd killed
/// right after it started (before its record was first rewritten) is taken
/// over like any other, listener included.
#[tokio::test(flavor = "multi_thread")]
async fn an_envd_killed_right_after_start_up_is_taken_over() {
    for _ in 0..3 {
        let store = FdStore::new();
        let args = loopback_args();
        let (first, urls, _log) = store.spawn(&args);
        let mut first = KillOnDrop(first);
        // Killed as soon as its record is in the store (before a fix of
        // 2026-12-05 the record went in empty, and was written 5 ms later).
        let since = std::time::Instant::now();
        while !store.names().iter().any(|n| n == "envd-state") {
            assert!(since.elapsed() < Duration::from_secs(5), "no record stored");
            std::thread::sleep(Duration::from_micros(200));
        }
        let _ = first.0.kill();
        let _ = first.0.wait();
        let (second, urls2, log2) = store.spawn(&args);
        let _second = KillOnDrop(second);
        let log = log2.lock().unwrap().join("\n");
        assert_eq!(urls2[0], urls[0], "the listener was not taken over\n{log}");
        assert!(!log.contains("unreadable"), "{log}");
        let mut c = client(&urls2[0]).await;
        c.list(ListRequest {}).await.unwrap();
    }
}

/// A record the next envd cannot read (here overwritten; in life, one left
/// by a newer envd after a downgrade) loses its commands, but not envd's
/// listeners: the store still holds them, so on a fixed port a fresh bind
/// would find the address taken.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreadable_record_still_gives_the_listeners_back() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("tcp://127.0.0.1:{port}");
    let store = FdStore::new();
    let args = vec!["--listen".to_owned(), url.clone()];
    let (first, _, _log) = store.spawn(&args);
    let mut first = KillOnDrop(first);
    let mut c = client(&url).await;
    let (_s, lost) = started(&mut c, cmd("sleep", &["1000"])).await;
    let command_fds = |s: &FdStore| s.names().iter().filter(|n| n.starts_with('c')).count();
    // The record too: a command's fds can go in before the first record
    // does (envd's start-up stores the running commands, then writes it).
    let stored = || store.names().iter().any(|n| n == "envd-state") && command_fds(&store) >= 3;
    assert!(eventually(Duration::from_secs(5), stored).await);
    let _ = first.0.kill();
    let _ = first.0.wait();
    store
        .with_fd("envd-state", |fd| {
            nix::sys::uio::pwrite(fd, &[0xa5; 16], 0).unwrap();
        })
        .unwrap();
    let (second, urls2, log2) = store.spawn(&args);
    let _second = KillOnDrop(second);
    let log = log2.lock().unwrap().join("\n");
    assert!(log.contains("unreadable"), "{log}");
    assert_eq!(urls2.first(), Some(&url), "{log}");
    let mut c = client(&url).await;
    c.list(ListRequest {}).await.unwrap();
    // The lost command's fds leave the store (they would fill it up).
    assert!(
        eventually(Duration::from_secs(5), || command_fds(&store) == 0).await,
        "{:?}",
        store.names()
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(lost.pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
}
