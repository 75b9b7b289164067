//! Resource control on the host: every command in a cgroup of its own
//! (under a cgroup the test owns), kills that reach the whole tree, the
//! deadline kill, usage in `end` and `List`, limits refused clearly where
//! they cannot apply. Limits and OOM kills themselves need controllers the
//! host's hybrid hierarchy lacks: the QEMU suite proves those.

mod common;

use std::time::Duration;

use common::cgroup::TestCgroup;
use common::*;
use envd::proto::process::*;
use tonic::Code;

fn alive(pid: u32) -> bool {
    // A zombie awaiting its reaper is as good as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}

fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_owned))
        .unwrap_or_default()
}

/// A command whose grandchild escapes its process group and session
/// (`setsid`), ignores SIGTERM, and prints its pid.
fn escaping_tree() -> StartRequest {
    sh("setsid sh -c 'trap \"\" TERM; echo $$; exec sleep 1000' & wait")
}

/// The test's cgroup, or a return (with the skip said) from the function
/// it is in: `()` from a test, `None` from a helper.
macro_rules! need_cgroups {
    ($name:expr) => {{
        if !is_root() {
            skip($name, "creating cgroups needs root");
            return Default::default();
        }
        match TestCgroup::create($name) {
            Some(cg) => cg,
            None => {
                skip_on_this_machine($name, "no writable cgroup v2 hierarchy with cgroup.freeze");
                return Default::default();
            }
        }
    }};
}

#[tokio::test]
async fn every_command_has_its_own_cgroup_and_a_tree_kill_leaves_nothing() {
    let cg = need_cgroups!("tree_kill");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let (mut s, mut o) = started(&mut c, escaping_tree()).await;
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild: u32 = o.out().trim().parse().unwrap();
    let (leader, escaped) = (cgroup_of(o.pid), cgroup_of(grandchild));
    assert!(leader.contains("/user/cmd-"), "{leader}");
    assert_eq!(leader, escaped, "setsid does not leave the cgroup");
    let (_s2, o2) = started(&mut c, sh("sleep 1000")).await;
    assert_ne!(cgroup_of(o2.pid), leader, "one cgroup per command");

    // A group kill (E2B's) misses the escaped grandchild...
    c.send_signal(signal_pid(o.pid, Signal::Sigkill, false))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert!(
        alive(grandchild),
        "the escaped grandchild outlives a group kill"
    );

    // ...a kill with descendants does not.
    let (mut s, mut o) = started(&mut c, escaping_tree()).await;
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild2: u32 = o.out().trim().parse().unwrap();
    c.send_signal(signal_pid(o.pid, Signal::Sigkill, true))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert!(
        eventually(Duration::from_secs(5), || !alive(grandchild2)).await,
        "the grandchild survived a kill with descendants"
    );
    // The first tree's leftover keeps its cgroup until it ends; then the
    // cgroup goes.
    let leftover_cgroup = cg.0.join(
        leader
            .rsplit('/')
            .next()
            .map(|n| format!("user/{n}"))
            .unwrap(),
    );
    assert!(leftover_cgroup.exists());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(grandchild).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    );
    assert!(
        eventually(Duration::from_secs(10), || !leftover_cgroup.exists()).await,
        "an empty cgroup was not removed"
    );
    kill(&mut c, o2.pid).await;
}

// Signals other than SIGKILL reach the cgroup through its process list
// (`cgroup.kill` kills only), read a line at a time on a blocking thread.
#[tokio::test]
async fn other_signals_with_descendants_reach_the_whole_cgroup() {
    let cg = need_cgroups!("signal_tree");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let (mut s, mut o) =
        started(&mut c, sh("setsid sh -c 'echo $$; exec sleep 1000' & wait")).await;
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let escaped: u32 = o.out().trim().parse().unwrap();
    c.send_signal(signal_pid(o.pid, Signal::Sigterm, true))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert!(
        eventually(Duration::from_secs(5), || !alive(escaped)).await,
        "the process outside the command's group survived SIGTERM with descendants"
    );
}

// A command whose processes keep replacing themselves (each forks a child
// and exits at once, as a daemon that re-spawns itself does) is on a new pid
// by the time its old one is signalled: SIGTERM with descendants must still
// leave nothing running in its cgroup. Without the freeze, eight such
// lineages outran the signal passes in about one round of three here; five
// rounds must all end empty.
#[tokio::test]
async fn sigterm_with_descendants_catches_processes_that_keep_forking() {
    let cg = need_cgroups!("signal_forkers");
    let envd = cg.envd();
    let mut c = envd.client().await;
    for round in 0..5 {
        let (mut s, mut o) = started(
            &mut c,
            sh("for i in 1 2 3 4 5 6 7 8; do perl -e 'while (1) { exit if fork }' & done; echo; exec sleep 1000"),
        )
        .await;
        read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
        let leaf = cg.leaf_of(o.pid);
        assert!(
            eventually(Duration::from_secs(5), || procs_in(&leaf) >= 9).await,
            "the forkers did not start: {} processes",
            procs_in(&leaf)
        );
        let left = sigterm_tree_until_empty(&mut c, &leaf, o.pid).await;
        assert!(
            left.is_ok(),
            "round {round}: {left:?} processes still forking after SIGTERM with descendants"
        );
        read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    }
}

// A process that has the tree's signal blocked when it comes, and forks
// before it takes it, has a child born without it (perl, glibc's
// posix_spawn and others block every signal around a fork; the forkers
// above escaped so now and then): envd follows the signal to what such a
// process forks meanwhile. Here the holder waits until SIGTERM is pending,
// then forks and unblocks it (and dies of it); the child, in a session of
// its own that the process group kill does not reach, unblocks it too and
// sleeps on.
#[tokio::test]
async fn sigterm_with_descendants_reaches_children_forked_while_it_was_blocked() {
    let cg = need_cgroups!("held_back");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let holder = r#"
        use POSIX;
        my $t = POSIX::SigSet->new(SIGTERM);
        sigprocmask(SIG_BLOCK, $t);
        $| = 1;
        print "ready\n";
        my $p = POSIX::SigSet->new;
        until (sigpending($p) && $p->ismember(SIGTERM)) { select(undef, undef, undef, 0.005) }
        if (fork) { sigprocmask(SIG_UNBLOCK, $t); sleep 100 }
        else { sigprocmask(SIG_UNBLOCK, $t); exec "sleep", "1000" }
    "#;
    let (mut s, mut o) = started(
        &mut c,
        sh(&format!("setsid perl -e '{holder}' & exec sleep 1000")),
    )
    .await;
    read_until(&mut s, &mut o, |o| o.out().contains("ready")).await;
    let leaf = cg.leaf_of(o.pid);
    let left = sigterm_tree_until_empty(&mut c, &leaf, o.pid).await;
    assert!(
        left.is_ok(),
        "{left:?} processes left: the child forked while SIGTERM was held back did not get it"
    );
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
}

// A process that blocks the signal for good is followed for a bounded time
// only: the call answers, and the process (which never takes it) lives on.
#[tokio::test]
async fn a_signal_blocked_for_good_does_not_hold_the_call() {
    let cg = need_cgroups!("blocked_for_good");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let blocker = r#"
        use POSIX;
        sigprocmask(SIG_BLOCK, POSIX::SigSet->new(SIGTERM));
        $| = 1;
        print "ready\n";
        sleep 1000
    "#;
    let (mut s, mut o) = started(&mut c, sh(&format!("exec perl -e '{blocker}'"))).await;
    read_until(&mut s, &mut o, |o| o.out().contains("ready")).await;
    let leaf = cg.leaf_of(o.pid);
    let sent = tokio::time::timeout(
        Duration::from_secs(10),
        c.send_signal(signal_pid(o.pid, Signal::Sigterm, true)),
    )
    .await;
    let alive = std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap_or_default();
    let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
    sent.expect("the signal call did not answer within 10 s")
        .unwrap();
    assert_eq!(
        alive.trim(),
        o.pid.to_string(),
        "the blocker should live on"
    );
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
}

// A process that exits with the signal still blocked stays a zombie,
// showing it pending and blocked, until its parent reaps it (here never:
// its parent execs a sleep). Such a process holds nothing back: the call
// answers without following it for the full second.
#[tokio::test]
async fn a_zombie_that_held_the_signal_back_is_not_followed() {
    let exits = "my $p = POSIX::SigSet->new;
        until (sigpending($p) && $p->ismember(28)) { select(undef, undef, undef, 0.005) }
        POSIX::_exit(0)";
    let command = format!("perl -e '{HOLDS_WINCH} {exits}' & exec sleep 1000");
    let Some(took) = winch_to_a_holder("zombie_holder", &command, |_| true).await else {
        return;
    };
    assert!(
        took < Duration::from_millis(900),
        "the call took {took:?}: it followed a zombie"
    );
}

// A process that stops itself with the signal blocked cannot fork before
// a SIGCONT: it is not followed either.
#[tokio::test]
async fn a_stopped_process_that_holds_the_signal_back_is_not_followed() {
    let command = format!("exec perl -e '{HOLDS_WINCH} kill \"STOP\", $$; sleep 1000'");
    let stopped = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|st| st.rsplit(')').next()?.trim_start().chars().next())
            == Some('T')
    };
    let Some(took) = winch_to_a_holder("stopped_holder", &command, stopped).await else {
        return;
    };
    assert!(
        took < Duration::from_millis(900),
        "the call took {took:?}: it followed a stopped process"
    );
}

/// Perl that blocks SIGWINCH (28: the sleeps beside it ignore it, so the
/// tree stays) and says "ready".
const HOLDS_WINCH: &str = r#"use POSIX;
    sigprocmask(SIG_BLOCK, POSIX::SigSet->new(28));
    $| = 1;
    print "ready\n";"#;

/// Starts `command` in a cgroup of its own, waits for "ready" and for
/// `idle(pid)`, sends SIGWINCH to its tree and kills what is left: how long
/// the call took (`None`: skipped here).
async fn winch_to_a_holder(
    name: &str,
    command: &str,
    idle: impl Fn(u32) -> bool,
) -> Option<Duration> {
    let cg = need_cgroups!(name);
    let envd = cg.envd();
    let mut c = envd.client().await;
    let (mut s, mut o) = started(&mut c, sh(command)).await;
    read_until(&mut s, &mut o, |o| o.out().contains("ready")).await;
    let leaf = cg.leaf_of(o.pid);
    assert!(eventually(Duration::from_secs(5), || idle(o.pid)).await);
    let started_at = std::time::Instant::now();
    c.send_signal(signal_pid(o.pid, Signal::Sigwinch, true))
        .await
        .unwrap();
    let took = started_at.elapsed();
    let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    Some(took)
}

/// How many processes are in the cgroup `leaf`.
fn procs_in(leaf: &std::path::Path) -> usize {
    std::fs::read_to_string(leaf.join("cgroup.procs"))
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// Sends SIGTERM to `pid`'s tree and waits up to 3 s for its cgroup `leaf`
/// to empty; how many processes were left if it did not (they are killed:
/// nothing is left running whatever the outcome).
async fn sigterm_tree_until_empty(
    c: &mut process_client::ProcessClient<tonic::transport::Channel>,
    leaf: &std::path::Path,
    pid: u32,
) -> Result<(), usize> {
    c.send_signal(signal_pid(pid, Signal::Sigterm, true))
        .await
        .unwrap();
    let emptied = eventually(Duration::from_secs(3), || procs_in(leaf) == 0).await;
    let left = procs_in(leaf);
    let _ = std::fs::write(leaf.join("cgroup.kill"), "1");
    if emptied {
        Ok(())
    } else {
        Err(left)
    }
}

// Stopping and continuing a whole tree works through the freeze that tree
// signals take: stopped processes count as frozen, and SIGCONT reaches them.
// Each goes out beside seven SIGWINCHes to the same tree at once: they share
// the leaf's freeze, and the last to end thaws it.
#[tokio::test]
async fn sigstop_and_sigcont_with_descendants_pause_and_resume_the_tree() {
    let cg = need_cgroups!("stop_cont");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let (mut s, mut o) = started(
        &mut c,
        // Sleepers, not shell loops: a shell's vfork waits (state D) for a
        // child stopped before its exec, and would never show as stopped.
        sh("setsid sleep 1000 & sleep 1000 & echo; exec sleep 1000"),
    )
    .await;
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let leaf = cg.leaf_of(o.pid);
    // The state of each process in the cgroup (R, S, T, ...).
    let states = || -> Vec<char> {
        std::fs::read_to_string(leaf.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
            .filter_map(|st| st.rsplit(')').next()?.trim_start().chars().next())
            .collect()
    };
    assert!(eventually(Duration::from_secs(5), || states().len() >= 3).await);
    // `sig` to the tree, beside seven SIGWINCHes (ignored by default) to it.
    let at_once = |sig: Signal| {
        let calls = (0..8).map(|i| {
            let mut c = c.clone();
            let sig = if i == 3 { sig } else { Signal::Sigwinch };
            async move { c.send_signal(signal_pid(o.pid, sig, true)).await }
        });
        futures_util::future::join_all(calls)
    };
    for r in at_once(Signal::Sigstop).await {
        r.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || states()
            .iter()
            .all(|&s| s == 'T'))
        .await,
        "not all stopped: {:?}",
        states()
    );
    for r in at_once(Signal::Sigcont).await {
        r.unwrap();
    }
    assert!(
        eventually(Duration::from_secs(5), || {
            let now = states();
            !now.is_empty() && now.iter().all(|&s| s != 'T')
        })
        .await,
        "still stopped: {:?}",
        states()
    );
    assert_eq!(
        std::fs::read_to_string(leaf.join("cgroup.freeze"))
            .unwrap()
            .trim(),
        "0",
        "left frozen"
    );
    c.send_signal(signal_pid(o.pid, Signal::Sigkill, true))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
}

#[tokio::test]
async fn the_deadline_kills_the_whole_tree() {
    let cg = need_cgroups!("deadline_tree");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let mut req = tonic::Request::new(escaping_tree());
    req.metadata_mut()
        .insert("grpc-timeout", "1500m".parse().unwrap());
    let mut s = c.start(req).await.unwrap().into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild: u32 = o.out().trim().parse().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !alive(grandchild)).await,
        "the setsid grandchild outlived the deadline"
    );
}

#[tokio::test]
async fn end_and_list_report_usage() {
    let cg = need_cgroups!("usage");
    let envd = cg.envd();
    let mut c = envd.client().await;
    // Half a second of CPU in user space, counted by the process's own CPU
    // time (a loop bounded by the clock got less than 0.3 s of CPU when the
    // machine was busy).
    let o = run(&mut c, cmd("perl", &["-e", "1 while (times)[0] < 0.5"])).await;
    let end = o.end();
    let usage = end.usage.as_ref().expect("usage in end");
    let cpu = usage.cpu_user_usec + usage.cpu_system_usec;
    assert!((300_000..5_000_000).contains(&cpu), "CPU time {cpu} µs");
    assert_eq!(end.oom_killed, Some(false));
    let (_s, live) = started(&mut c, sh("sleep 1000")).await;
    let list = c.list(ListRequest {}).await.unwrap().into_inner();
    let info = list.processes.iter().find(|p| p.pid == live.pid).unwrap();
    assert!(info.usage.is_some(), "List shows usage");
    assert!(list.resource_control);
    let m = common::http::request(&envd.tcp, "GET", "/metrics", &[], b"").json();
    assert_eq!(m["resource_control"], true);
    assert!(m["envd_rss_bytes"].as_u64().unwrap() > 0);
    kill(&mut c, live.pid).await;
}

#[tokio::test]
async fn limits_are_never_silently_ignored() {
    // Without resource control: refused.
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut req = sh("true");
    req.limits = Some(ResourceLimits {
        memory_max: Some(64 << 20),
        ..Default::default()
    });
    let err = c
        .start(req.clone())
        .await
        .expect_err("limits without cgroups");
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(
        err.message().contains("resource control"),
        "{}",
        err.message()
    );
    // Bad values: refused as such.
    let mut bad = sh("true");
    bad.limits = Some(ResourceLimits {
        cpu: Some(-1.0),
        ..Default::default()
    });
    let cg = need_cgroups!("limits");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let err = c.start(bad).await.expect_err("negative cpu");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    // A controller the hierarchy lacks: a clear FAILED_PRECONDITION, or (on
    // a machine whose hierarchy has it) the limit holds.
    match c.start(req).await {
        Err(e) => {
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
            assert!(e.message().contains("memory"), "{}", e.message());
        }
        Ok(s) => {
            let o = collect(s.into_inner()).await;
            assert_eq!(o.end().exit_code, 0);
        }
    }
}

/// How many of `leaves` were made ahead (`cmd-<pid>-pN`).
fn made_ahead(leaves: &[String]) -> usize {
    leaves.iter().filter(|n| n.contains("-p")).count()
}

/// Leaf names in `parent` (the user or ptys cgroup).
fn leaves(parent: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(parent)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Whether this machine's kernel gives `parent`'s leaves a pids controller
/// (envd then writes `pids.max`; without one, a Start with `pids_max` is
/// refused).
fn pids_max_works(parent: &std::path::Path) -> bool {
    std::fs::read_to_string(parent.join("cgroup.subtree_control"))
        .is_ok_and(|c| c.split_whitespace().any(|n| n == "pids"))
}

/// Sends a Start that envd must refuse after taking one of `parent`'s spare
/// leaves, and waits until that leaf is gone and a new spare stands in its
/// place. The refusal retires the leaf in the background: a later Start
/// sent before that finished would find one spare fewer, or (the refill
/// coming after it) one more than the test expects.
async fn refused_start(
    c: &mut process_client::ProcessClient<tonic::transport::Channel>,
    parent: &std::path::Path,
    req: StartRequest,
) -> tonic::Status {
    let before = leaves(parent);
    let err = c.start(req).await.expect_err("a Start envd must refuse");
    assert!(
        eventually(Duration::from_secs(5), || {
            let now = leaves(parent);
            now != before && made_ahead(&now) == 2 && now.len() == 2
        })
        .await,
        "after a refused Start: {:?} (before it: {before:?})",
        leaves(parent)
    );
    err
}

#[tokio::test]
async fn leaves_are_made_ahead_and_each_serves_one_command() {
    let cg = need_cgroups!("spares");
    let envd = cg.envd();
    let mut c = envd.client().await;
    let user = cg.0.join("user");
    // Spares wait before any command.
    assert_eq!(made_ahead(&leaves(&user)), 2, "{:?}", leaves(&user));
    let spares = leaves(&user);

    // A command takes one; its end makes another; the used leaf goes.
    let o = run(&mut c, cmd("/bin/cat", &["/proc/self/cgroup"])).await;
    let used = o.out().trim().rsplit('/').next().unwrap().to_owned();
    assert!(spares.contains(&used), "{used} not one of {spares:?}");
    assert!(
        eventually(Duration::from_secs(5), || {
            let now = leaves(&user);
            !now.contains(&used) && made_ahead(&now) == 2
        })
        .await,
        "after the end: {:?} (used {used})",
        leaves(&user)
    );

    // A Start that fails after taking a spare (a pids.max the kernel
    // refuses, or a pids controller the machine lacks) gives its leaf back
    // the same way: removed, and a spare made in its place.
    for _ in 0..3 {
        let mut refused = sh("true");
        refused.limits = Some(ResourceLimits {
            pids_max: Some(1_000_000_000),
            ..Default::default()
        });
        let err = refused_start(&mut c, &user, refused).await;
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    }

    // More commands at once than spares: each gets a leaf of its own, the
    // later ones made on the spot; limits hold on either kind (where this
    // machine lets envd write pids.max at all). Five, not three: the
    // project's CI twice saw a third spare ready in time for the third
    // (leaves p0, p7, p6), which at most two spares plus one late refill
    // cannot cover for five.
    let mut limited = sh("sleep 1000");
    limited.limits = Some(ResourceLimits {
        pids_max: Some(50),
        ..Default::default()
    });
    let mut live = Vec::new();
    let limits_work = if pids_max_works(&user) {
        let (_, o) = started(&mut c, limited.clone()).await;
        live.push(o.pid);
        true
    } else {
        let err = refused_start(&mut c, &user, limited.clone()).await;
        assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
        false
    };
    for _ in 0..5 {
        let req = if limits_work {
            limited.clone()
        } else {
            sh("sleep 1000")
        };
        live.push(started(&mut c, req).await.1.pid);
    }
    let groups: Vec<String> = live.iter().map(|p| cgroup_of(*p)).collect();
    let distinct: std::collections::HashSet<&String> = groups.iter().collect();
    assert_eq!(distinct.len(), live.len(), "{groups:?}");
    assert!(
        groups.iter().any(|g| !g.contains("-p")),
        "the later leaves are made on the spot: {groups:?}"
    );
    for g in &groups {
        let name = g.trim().rsplit('/').next().unwrap();
        let pids_max = user.join(name).join("pids.max");
        if pids_max.exists() {
            assert_eq!(
                std::fs::read_to_string(&pids_max).unwrap().trim(),
                "50",
                "{g}"
            );
        }
    }
    for pid in live {
        kill(&mut c, pid).await;
    }
}

#[tokio::test]
async fn spares_go_when_envd_stops() {
    let cg = need_cgroups!("spares_stop");
    let envd = cg.envd();
    let user = cg.0.join("user");
    assert_eq!(made_ahead(&leaves(&user)), 2, "{:?}", leaves(&user));
    let pid = nix::unistd::Pid::from_raw(i32::try_from(envd.pid()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || !alive(envd.pid())).await,
        "envd did not stop on SIGTERM"
    );
    assert_eq!(made_ahead(&leaves(&user)), 0, "{:?}", leaves(&user));
}
