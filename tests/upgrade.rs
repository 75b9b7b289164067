//! Live upgrade against the real binary: envd re-executes itself (same PID)
//! while commands run, and everything a client can observe carries over.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::http::{addr, post_json, request};
use common::*;
use envd::proto::process::Signal;

/// POSTs `/upgrade` with `body` (and its SHA-256 unless `sha` overrides it);
/// `None` when envd closed the connection without answering (it exec'd),
/// else the refusal.
fn post_upgrade(url: &str, body: &[u8], sha: Option<&str>) -> Option<common::http::Reply> {
    post_upgrade_as(url, body, sha, None)
}

fn post_upgrade_as(
    url: &str,
    body: &[u8],
    sha: Option<&str>,
    token: Option<&str>,
) -> Option<common::http::Reply> {
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let sha = sha.unwrap_or(&digest);
    let mut s = TcpStream::connect(addr(url)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let token = token.map_or(String::new(), |t| format!("x-access-token: {t}\r\n"));
    let head = format!(
        "POST /upgrade HTTP/1.1\r\nhost: envd\r\nconnection: close\r\ncontent-length: {}\r\nx-envd-upgrade-sha256: {sha}\r\n{token}\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    // A refusal may come (and the connection close) before the whole body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    (!raw.is_empty()).then(|| common::http::parse(&raw))
}

/// Waits until envd answers `/health` again; returns its build.
fn build_after(url: &str) -> String {
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(addr(url)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nhost: envd\r\nconnection: close\r\n\r\n");
            let mut raw = Vec::new();
            let _ = s.read_to_end(&mut raw);
            if !raw.is_empty() {
                let r = common::http::parse(&raw);
                return r.header("x-envd-build").expect("x-envd-build").to_owned();
            }
        }
        assert!(
            Instant::now() < until,
            "envd did not answer after the upgrade"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn upgrade_in_place(url: &str) -> String {
    let refusal = post_upgrade(url, b"", None);
    assert!(
        refusal.is_none(),
        "upgrade refused: {:?}",
        refusal.map(|r| r.text())
    );
    build_after(url)
}

async fn resume_all(envd: &Envd, tag: &str) -> Outcome {
    resume_tag(&mut envd.client().await, tag, 0).await
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_keep_running_and_lose_no_output_across_a_live_upgrade() {
    let envd = Envd::start(&[]);
    let pid_before = envd.pid();
    let mut c = envd.client().await;
    // A counter every 10 ms; a stdin reader; a pty shell; one already ended.
    let mut counter = sh("i=0; while [ $i -lt 300 ]; do echo $i; i=$((i+1)); sleep 0.01; done");
    counter.tag = Some("counter".into());
    let (_s1, _) = started(&mut c, counter).await;
    let mut reader = sh("read line; echo got $line; exit 7");
    reader.tag = Some("reader".into());
    let (_s2, reader_o) = started(&mut c, reader).await;
    let mut pty = cmd("/bin/sh", &[]);
    pty.tag = Some("pty".into());
    pty.pty = Some(envd::proto::process::Pty {
        size: Some(envd::proto::process::pty::Size { cols: 80, rows: 24 }),
    });
    let (_s3, pty_o) = started(&mut c, pty).await;
    let mut sleeper = cmd("sleep", &["30"]);
    sleeper.tag = Some("sleeper".into());
    let (_s4, _) = started(&mut c, sleeper).await;
    let mut ended = sh("echo done; exit 3");
    ended.tag = Some("ended".into());
    let ended_o = run(&mut c, ended).await;
    assert_eq!(ended_o.end().exit_code, 3);

    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = envd.tcp.clone();
    tokio::task::spawn_blocking(move || upgrade_in_place(&url))
        .await
        .unwrap();
    assert_eq!(envd.pid(), pid_before);
    // The new image serves before it logs the takeover, and the log is read
    // by another thread: wait for the line rather than sample it once.
    assert!(
        eventually(Duration::from_secs(30), || envd
            .logged("took over from the previous envd image"))
        .await,
        "no takeover in the log"
    );

    let mut c = envd.client().await;
    // Input and signals reach the commands the old image started.
    send_input(&mut c, reader_o.pid, stdin_input(b"hello\n"))
        .await
        .expect("stdin after the upgrade");
    send_input(
        &mut c,
        pty_o.pid,
        pty_input(b"echo pty-$((40+2)); exit 5\n"),
    )
    .await
    .expect("pty input after the upgrade");

    // The counter's output has no gap and no duplicate; its end is exact.
    let counted = resume_all(&envd, "counter").await;
    let nums: Vec<u32> = counted
        .out()
        .lines()
        .map(|l| l.parse().expect("number"))
        .collect();
    assert_eq!(
        nums,
        (0..300).collect::<Vec<_>>(),
        "output gap or duplicate"
    );
    assert_eq!(counted.end().exit_code, 0);
    assert!(counted.end().exited);

    let read = resume_all(&envd, "reader").await;
    assert_eq!(read.out(), "got hello\n");
    assert_eq!(read.end().exit_code, 7, "exit status of an adopted command");

    let ended_again = resume_all(&envd, "ended").await;
    assert_eq!(ended_again.out(), "done\n");
    assert_eq!(ended_again.end().exit_code, 3, "exit record carried over");

    let shell = resume_all(&envd, "pty").await;
    let screen = String::from_utf8_lossy(&shell.pty).into_owned();
    assert!(screen.contains("pty-42"), "pty output: {screen:?}");
    assert_eq!(shell.end().exit_code, 5);

    c.send_signal(envd::proto::process::SendSignalRequest {
        process: by_tag("sleeper"),
        signal: Signal::Sigterm as i32,
        descendants: false,
    })
    .await
    .expect("signal after the upgrade");
    let slept = resume_all(&envd, "sleeper").await;
    assert_eq!(slept.end().status, "signal: terminated");
}

/// A background job left by an ended command still writes to the pipe it
/// inherited after a live upgrade: the new image drains the pipes the old one
/// kept for such jobs, so the job's write is no `SIGPIPE`.
#[tokio::test(flavor = "multi_thread")]
async fn background_jobs_keep_their_pipe_across_a_live_upgrade() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let job = BackgroundJob::new();
    assert_eq!(run(&mut c, job.command()).await.out(), "started\n");
    let url = envd.tcp.clone();
    tokio::task::spawn_blocking(move || upgrade_in_place(&url))
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || envd
            .logged("kept pipes drained on"))
        .await,
        "the new image took over no kept pipe"
    );
    assert!(
        job.release().await,
        "the job died writing to its stdout/stderr after the upgrade"
    );
}

// A Move across file systems copies into a hidden directory beside its
// destination. A live upgrade in the middle of the copy ends it (the thread
// copying dies with the old image) and used to leave the copy for good; the
// new image is handed the list of temporaries in flight and removes them.
#[tokio::test(flavor = "multi_thread")]
async fn a_move_cut_by_a_live_upgrade_leaves_no_copy_behind() {
    let Some(mv) = CrossFsMove::new("move_upgrade", 1000) else {
        return;
    };
    let envd = Envd::start(&[]);
    let mut fs = envd.fs().await;
    let request = mv.request();
    let call = tokio::spawn(async move { fs.r#move(request).await });
    assert!(
        eventually(Duration::from_secs(20), || !mv.hidden().is_empty()).await,
        "no copy under way"
    );
    let tcp = envd.tcp.clone();
    tokio::task::spawn_blocking(move || upgrade_in_place(&tcp))
        .await
        .unwrap();
    assert!(
        call.await.unwrap().is_err(),
        "the move finished before the upgrade"
    );
    assert!(
        eventually(Duration::from_secs(20), || mv.hidden().is_empty()).await,
        "left behind: {:?}",
        mv.hidden()
    );
    assert!(mv.tree.join("d999/f99").exists(), "the source is untouched");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uploaded_build_takes_over_token_environment_and_watchers() {
    let envd = Envd::start(&[]);
    let url = envd.tcp.clone();
    let token = "s3cret-token";
    let r = post_json(
        &url,
        "/init",
        &format!(r#"{{"accessToken":"{token}","envVars":{{"KEEP":"me"}}}}"#),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    let dir = tempfile::tempdir().unwrap();
    let mut fs = envd::proto::filesystem::filesystem_client::FilesystemClient::with_interceptor(
        envd::client::dial(&envd.tcp).await.unwrap(),
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("x-access-token", token.parse().unwrap());
            Ok(req)
        },
    );
    let id = fs
        .create_watcher(envd::proto::filesystem::CreateWatcherRequest {
            path: dir.path().display().to_string(),
            ..Default::default()
        })
        .await
        .expect("CreateWatcher")
        .into_inner()
        .watcher_id;
    std::fs::write(dir.path().join("before"), b"x").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A different build: the same binary with bytes appended.
    let mut binary = std::fs::read(binary()).unwrap();
    binary.extend_from_slice(b"\nanother build\n");
    let before = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || build_after(&url))
            .await
            .unwrap()
    };
    let after = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let r = post_upgrade(&url, b"", None).expect("an upgrade without the token");
            assert_eq!(r.status, 401, "{}", r.text());
            let r = post_upgrade_as(&url, &binary, None, Some(token));
            assert!(r.is_none(), "upload refused: {:?}", r.map(|r| r.text()));
            build_after(&url)
        })
        .await
        .unwrap()
    };
    assert_ne!(before, after, "the new build did not take over");

    // The token still guards envd; the /init environment is still there.
    let r = request(&url, "GET", "/envs", &[], b"");
    assert_eq!(r.status, 401, "token lost: {}", r.text());
    let r = request(&url, "GET", "/envs", &[("x-access-token", token)], b"");
    assert_eq!(r.json()["KEEP"], "me");
    // The handover is reported on /init, as E2B's orchestrator reads it.
    let r = post_json(&url, "/init", &format!(r#"{{"accessToken":"{token}"}}"#));
    let report: serde_json::Value =
        serde_json::from_str(r.header("x-envd-handover").expect("X-Envd-Handover")).unwrap();
    assert_eq!(report["failed"], false);
    assert_eq!(report["watchers"], 1);
    assert_eq!(report["watchers_failed"], 0);

    // The watcher kept its id, its unpolled event, and keeps watching.
    std::fs::write(dir.path().join("after"), b"y").unwrap();
    let mut fs = envd::proto::filesystem::filesystem_client::FilesystemClient::with_interceptor(
        envd::client::dial(&envd.tcp).await.unwrap(),
        move |mut req: tonic::Request<()>| {
            req.metadata_mut()
                .insert("x-access-token", token.parse().unwrap());
            Ok(req)
        },
    );
    let mut seen = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while !(seen.iter().any(|n| n == "before") && seen.iter().any(|n| n == "after")) {
        assert!(
            Instant::now() < until,
            "watcher events across the upgrade: {seen:?}"
        );
        let r = fs
            .get_watcher_events(envd::proto::filesystem::GetWatcherEventsRequest {
                watcher_id: id.clone(),
            })
            .await
            .expect("the watcher survives the upgrade under its id");
        seen.extend(r.into_inner().events.into_iter().map(|e| e.name));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_binary_that_cannot_take_over_is_refused_and_envd_carries_on() {
    let envd = Envd::start(&[]);
    let url = envd.tcp.clone();
    let mut c = envd.client().await;
    let mut sleeper = cmd("sleep", &["30"]);
    sleeper.tag = Some("sleeper".into());
    let (_s, o) = started(&mut c, sleeper).await;
    let cases: Vec<(&str, Vec<u8>, Option<&str>, &str)> = vec![
        ("garbage", b"not a program".to_vec(), None, "cannot"),
        (
            "an older envd",
            b"#!/bin/sh\necho envd-handover 0 0.0.1\n".to_vec(),
            None,
            "downgrade refused",
        ),
        (
            "a wrong checksum",
            b"whatever".to_vec(),
            Some("0000000000000000000000000000000000000000000000000000000000000000"),
            "does not match",
        ),
    ];
    for (what, body, sha, says) in cases {
        let url = url.clone();
        let says = says.to_owned();
        let r = tokio::task::spawn_blocking(move || post_upgrade(&url, &body, sha))
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{what}: envd exec'd it"));
        assert!(r.status >= 400, "{what}: {}", r.status);
        assert!(r.text().contains(&says), "{what}: {}", r.text());
    }
    // Still the same image, still serving, the command still known.
    assert!(!envd.logged("took over from the previous envd image"));
    let listed = c.list(envd::proto::process::ListRequest {}).await.unwrap();
    assert!(listed.into_inner().processes.iter().any(|p| p.pid == o.pid));
    kill(&mut c, o.pid).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_connection_is_refused_while_envd_upgrades() {
    let envd = Envd::start(&[]);
    let url = envd.tcp.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let prober = {
        let (url, stop) = (url.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut refused, mut dropped) = (0u32, 0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match TcpStream::connect(addr(&url)) {
                    Err(_) => refused += 1,
                    Ok(mut s) => {
                        let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                        let _ = s.write_all(
                            b"GET /health HTTP/1.1\r\nhost: envd\r\nconnection: close\r\n\r\n",
                        );
                        let mut raw = Vec::new();
                        let _ = s.read_to_end(&mut raw);
                        if raw.starts_with(b"HTTP/1.1 204") {
                            ok += 1;
                        } else {
                            dropped += 1;
                        }
                    }
                }
            }
            (ok, refused, dropped)
        })
    };
    let url2 = url.clone();
    tokio::task::spawn_blocking(move || {
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(100));
            upgrade_in_place(&url2);
        }
    })
    .await
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused, dropped) = prober.join().unwrap();
    println!("probes: {ok} answered, {refused} refused, {dropped} dropped mid-request");
    assert!(ok > 10, "too few probes answered: {ok}");
    assert_eq!(
        refused, 0,
        "connection attempts were refused during the swap"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_upgrades_to_the_program_file() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut sleeper = cmd("sleep", &["30"]);
    sleeper.tag = Some("hup".into());
    let (_s, o) = started(&mut c, sleeper).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(envd.pid()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || envd
            .logged("took over from the previous envd image"))
        .await,
        "SIGHUP did not upgrade"
    );
    let url = envd.tcp.clone();
    tokio::task::spawn_blocking(move || build_after(&url))
        .await
        .unwrap();
    let mut c = envd.client().await;
    let listed = c.list(envd::proto::process::ListRequest {}).await.unwrap();
    assert!(listed
        .into_inner()
        .processes
        .iter()
        .any(|p| p.pid == o.pid && p.tag.as_deref() == Some("hup")));
    kill(&mut c, o.pid).await;
    let end = resume_all(&envd, "hup").await;
    assert_eq!(end.end().status, "signal: killed");
}
