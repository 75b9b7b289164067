//! process.Process against the real envd binary over real sockets.

mod common;

use std::time::{Duration, Instant};

use common::*;
use envd::proto::process::*;
use futures_util::StreamExt;
use tonic::Code;

#[tokio::test]
async fn start_streams_start_data_then_one_end() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let o = run(&mut c, sh("echo out; echo err >&2; exit 3")).await;
    assert!(o.pid > 1);
    assert_eq!(o.out(), "out\n");
    assert_eq!(o.err(), "err\n");
    assert!(
        o.order.starts_with('s') && o.order.ends_with('e'),
        "order {}",
        o.order
    );
    assert_eq!(o.order.matches('e').count(), 1);
    let end = o.end();
    assert_eq!(
        (end.exit_code, end.exited, end.status.as_str()),
        (3, true, "exit status 3")
    );
}

#[tokio::test]
async fn unix_socket_listener_serves_and_is_private() {
    let envd = Envd::start(&[]);
    let path = envd.unix.strip_prefix("unix://").unwrap();
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let mut c = envd.unix_client().await;
    let o = run(&mut c, cmd("echo", &["over", "unix"])).await;
    assert_eq!(o.out(), "over unix\n");
}

/// Commands start with no signal ignored or blocked, whatever envd ignores
/// (SIGPIPE, which Rust ignores, here SIGQUIT, inherited ignored, and under
/// this test harness signal 32, which glibc's `posix_spawn` hands over
/// ignored) or handles. The kernel defaults the handled ones
/// (`CLONE_CLEAR_SIGHAND`), the child the ignored ones; on kernels without
/// it, the child all of them. (Before 2026-12-05 children kept real-time
/// signals envd had inherited ignored.)
#[tokio::test]
async fn commands_start_with_default_signal_dispositions() {
    let envd = Envd::start_after(&[], "trap '' QUIT");
    let mask = |status: &str, key: &str| {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    let own = std::fs::read_to_string(format!("/proc/{}/status", envd.pid())).unwrap();
    let quit_and_pipe = (1 << (libc::SIGQUIT - 1)) | (1 << (libc::SIGPIPE - 1));
    assert_eq!(
        mask(&own, "SigIgn:") & quit_and_pipe,
        quit_and_pipe,
        "{own}"
    );
    let mut c = envd.client().await;
    for req in [cmd("cat", &["/proc/self/status"]), {
        let mut r = cmd("cat", &["/proc/self/status"]);
        r.pty = Some(Pty {
            size: Some(pty::Size { cols: 80, rows: 24 }),
        });
        r
    }] {
        let pty = req.pty.is_some();
        let o = run(&mut c, req).await;
        let out = String::from_utf8_lossy(if pty { &o.pty } else { &o.stdout }).into_owned();
        assert_eq!(mask(&out, "SigIgn:"), 0, "pty {pty}: {out}");
        assert_eq!(mask(&out, "SigBlk:"), 0, "pty {pty}: {out}");
    }
}

#[tokio::test]
async fn no_output_is_lost_before_start_event() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    // Output produced immediately, and more than a pipe holds.
    let o = run(&mut c, sh("head -c 300000 /dev/zero | tr '\\0' a")).await;
    assert_eq!(o.stdout.len(), 300000);
}

#[tokio::test]
async fn exec_failures_end_like_a_shell() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let o = run(&mut c, cmd("no-such-command-envd", &[])).await;
    assert_eq!(o.end().exit_code, 127);
    assert!(
        o.err().contains("no-such-command-envd: command not found"),
        "{}",
        o.err()
    );

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("not-exec");
    std::fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
    let o = run(&mut c, cmd(f.to_str().unwrap(), &[])).await;
    assert_eq!(o.end().exit_code, 126);
    assert!(o.err().contains("Permission denied"), "{}", o.err());
}

#[tokio::test]
async fn signal_endings_use_go_wording() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    for (sig, status) in [
        (Signal::Sigkill, "signal: killed"),
        (Signal::Sigterm, "signal: terminated"),
        (Signal::Sigusr1, "signal: user defined signal 1"),
    ] {
        let (mut s, mut o) = started(&mut c, cmd("sleep", &["30"])).await;
        c.send_signal(SendSignalRequest {
            descendants: false,
            process: by_pid(o.pid),
            signal: sig as i32,
        })
        .await
        .unwrap();
        read_until(&mut s, &mut o, |o| o.end.is_some()).await;
        let end = o.end();
        assert_eq!(
            (end.exit_code, end.exited, end.status.as_str()),
            (-1, false, status)
        );
    }
}

#[tokio::test]
async fn environment_is_clean_with_envs_and_cwd() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut req = cmd("/usr/bin/env", &[]);
    req.process
        .as_mut()
        .unwrap()
        .envs
        .insert("FOO".into(), "bar baz".into());
    let o = run(&mut c, req).await;
    let mut keys: Vec<&str> = o
        .out()
        .lines()
        .map(|l| l.split('=').next().unwrap())
        .map(|s| Box::leak(s.to_owned().into_boxed_str()) as &str)
        .collect();
    keys.sort();
    // E2B_SANDBOX: envd's own variable, as upstream sets it for every command.
    assert_eq!(
        keys,
        ["E2B_SANDBOX", "FOO", "HOME", "LOGNAME", "PATH", "USER"]
    );
    assert!(o.out().contains("FOO=bar baz\n"));

    let dir = tempfile::tempdir().unwrap();
    let mut req = cmd("pwd", &[]);
    req.process.as_mut().unwrap().cwd = Some(dir.path().to_str().unwrap().into());
    let o = run(&mut c, req).await;
    assert_eq!(
        o.out().trim(),
        std::fs::canonicalize(dir.path()).unwrap().to_str().unwrap()
    );

    let mut req = cmd("pwd", &[]);
    req.process.as_mut().unwrap().cwd = Some("/no/such/dir".into());
    let err = c.start(req).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("/no/such/dir"), "{}", err.message());
}

const TEST_USER: &str = "envdtest";
const TEST_GROUP: &str = "envdtestgrp";

fn ensure_test_user() {
    let ok = |c: &mut std::process::Command| c.status().map(|s| s.success()).unwrap_or(false);
    if nix::unistd::User::from_name(TEST_USER)
        .ok()
        .flatten()
        .is_none()
    {
        ok(std::process::Command::new("groupadd")
            .arg("-f")
            .arg(TEST_GROUP));
        assert!(
            ok(std::process::Command::new("useradd")
                .args(["-m", "-s", "/bin/sh", "-G", TEST_GROUP, TEST_USER])),
            "useradd failed"
        );
    }
}

#[tokio::test]
async fn user_switching_with_groups() {
    if !is_root() {
        skip(
            "user_switching_with_groups",
            "needs root to create a user and switch to it",
        );
        return;
    }
    ensure_test_user();
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let o = run(
        &mut c,
        as_user(sh("id -un; id -Gn; echo $HOME; pwd"), TEST_USER),
    )
    .await;
    let lines: Vec<&str> = o
        .stdout
        .split(|b| *b == b'\n')
        .map(|l| std::str::from_utf8(l).unwrap())
        .collect();
    assert_eq!(lines[0], TEST_USER);
    assert!(
        lines[1].split(' ').any(|g| g == TEST_GROUP),
        "groups: {}",
        lines[1]
    );
    assert_eq!(lines[2], format!("/home/{TEST_USER}"));
    assert_eq!(lines[3], format!("/home/{TEST_USER}"));

    // No header: the default user (root).
    let o = run(&mut c, cmd("id", &["-u"])).await;
    assert_eq!(o.out(), "0\n");

    let err = c
        .start(as_user(cmd("id", &[]), "no-such-user-envd"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("no-such-user-envd"));
}

#[tokio::test]
async fn stdin_pipe_send_input_and_close() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let (mut s, mut o) = started(&mut c, cmd("cat", &[])).await;
    send_input(&mut c, o.pid, stdin_input(b"hello\n"))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.out() == "hello\n").await;
    c.close_stdin(CloseStdinRequest {
        process: by_pid(o.pid),
    })
    .await
    .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert_eq!(o.end().exit_code, 0);
    // Ended: further calls say NOT_FOUND.
    assert_eq!(
        code(
            c.close_stdin(CloseStdinRequest {
                process: by_pid(o.pid)
            })
            .await
        ),
        Code::NotFound
    );
}

/// envd reads and writes its ends of the stdio pipes without blocking, but
/// the child's ends are ordinary blocking pipes: a program that writes to a
/// full stdout must wait, not fail with EAGAIN.
#[tokio::test]
async fn the_childs_stdio_pipes_are_blocking() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    // O_NONBLOCK is 04000 in the octal `flags:` line of the shell's fdinfo.
    let script = "for fd in 0 1 2; do \
        f=$(sed -n 's/^flags:[[:space:]]*//p' /proc/$$/fdinfo/$fd); \
        [ $(( 0$f & 04000 )) -eq 0 ] && echo \"$fd blocking\" || echo \"$fd non-blocking\"; \
        done";
    let (s, _) = started(&mut c, cmd("sh", &["-c", script])).await;
    let o = collect(s).await;
    assert_eq!(o.out(), "0 blocking\n1 blocking\n2 blocking\n");
    assert_eq!(o.end().exit_code, 0);
}

/// A command that writes only to stderr, through the smallest log, to a
/// client that reads slowly: the idle stdout reader must never hold room
/// the stderr reader needs (it would wait forever for output that never
/// comes, and the stream would stall).
#[tokio::test]
async fn one_busy_stream_of_two_is_never_stalled_by_the_idle_one() {
    let envd = Envd::start(&["--output-buffer", "65536"]);
    let mut c = envd.client().await;
    let (mut s, mut o) = started(&mut c, sh("head -c 3000000 /dev/zero >&2")).await;
    tokio::time::timeout(Duration::from_secs(20), async {
        use futures_util::StreamExt;
        while let Some(item) = s.next().await {
            o.record(item.unwrap().event());
            // Slow: the log is full between reads.
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    })
    .await
    .expect("the stderr stream stalled");
    assert_eq!(o.stderr.len(), 3_000_000);
    assert!(o.stdout.is_empty());
    assert_eq!(o.end().exit_code, 0);
}

#[tokio::test]
async fn close_stdin_is_idempotent_and_input_after_close_fails() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut s = c.start(sh("cat; sleep 5")).await.unwrap().into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.pid != 0).await;
    for _ in 0..2 {
        c.close_stdin(CloseStdinRequest {
            process: by_pid(o.pid),
        })
        .await
        .unwrap();
    }
    let r = send_input(&mut c, o.pid, stdin_input(b"x")).await;
    assert_eq!(code(r), Code::FailedPrecondition);
    kill(&mut c, o.pid).await;
}

#[tokio::test]
async fn stdin_false_is_dev_null() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut req = sh("cat; echo done; sleep 5");
    req.stdin = Some(false);
    let mut s = c.start(req).await.unwrap().into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.out() == "done\n").await;
    let r = send_input(&mut c, o.pid, stdin_input(b"x")).await;
    assert_eq!(code(r), Code::FailedPrecondition);
    assert_eq!(
        code(
            c.close_stdin(CloseStdinRequest {
                process: by_pid(o.pid)
            })
            .await
        ),
        Code::FailedPrecondition
    );
    kill(&mut c, o.pid).await;
}

#[tokio::test]
async fn stream_input_requires_start_first() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let (mut s, mut o) = started(&mut c, cmd("cat", &[])).await;
    use stream_input_request::{DataEvent, Event, StartEvent};
    let data = |b: &str| StreamInputRequest {
        event: Some(Event::Data(DataEvent {
            input: Some(ProcessInput {
                input: Some(process_input::Input::Stdin(b.as_bytes().to_vec().into())),
            }),
        })),
    };
    // Data before start.
    let r = c
        .stream_input(futures_util::stream::iter(vec![data("x")]))
        .await;
    assert_eq!(code(r), Code::InvalidArgument);
    // Start, keepalive, data in order.
    let msgs = vec![
        StreamInputRequest {
            event: Some(Event::Start(StartEvent {
                process: by_pid(o.pid),
            })),
        },
        StreamInputRequest {
            event: Some(Event::Keepalive(Default::default())),
        },
        data("one\n"),
        data("two\n"),
    ];
    c.stream_input(futures_util::stream::iter(msgs))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.out() == "one\ntwo\n").await;
    c.close_stdin(CloseStdinRequest {
        process: by_pid(o.pid),
    })
    .await
    .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
}

#[tokio::test]
async fn pty_size_resize_and_input() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut req = sh("tty; stty size; echo ready; read line; echo got $line; \
        trap 'stty size; echo WINCH; exit 0' WINCH; echo armed; while :; do sleep 0.05; done");
    req.pty = Some(Pty {
        size: Some(pty::Size {
            cols: 100,
            rows: 30,
        }),
    });
    let mut s = c.start(req).await.unwrap().into_inner();
    let mut o = Outcome::default();
    let text = |o: &Outcome| String::from_utf8_lossy(&o.pty).into_owned();
    read_until(&mut s, &mut o, |o| text(o).contains("ready")).await;
    assert!(text(&o).contains("/dev/pts/"), "{}", text(&o));
    assert!(text(&o).contains("30 100"), "{}", text(&o));
    send_input(&mut c, o.pid, pty_input(b"hello\n"))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| text(o).contains("armed")).await;
    assert!(text(&o).contains("got hello"), "{}", text(&o));
    c.update(UpdateRequest {
        process: by_pid(o.pid),
        pty: Some(Pty {
            size: Some(pty::Size {
                cols: 120,
                rows: 40,
            }),
        }),
    })
    .await
    .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    let t = text(&o);
    assert!(
        t.contains("40 120\r\nWINCH"),
        "no SIGWINCH or wrong size: {t}"
    );
    assert_eq!(o.end().exit_code, 0);
    assert!(o.stdout.is_empty() && o.stderr.is_empty());

    // Resizing a non-pty process is refused.
    let (_stream, o) = started(&mut c, cmd("sleep", &["5"])).await;
    let r = c
        .update(UpdateRequest {
            process: by_pid(o.pid),
            pty: Some(Pty {
                size: Some(pty::Size { cols: 1, rows: 1 }),
            }),
        })
        .await;
    assert_eq!(code(r), Code::FailedPrecondition);
    kill(&mut c, o.pid).await;
}

#[tokio::test]
async fn list_and_connect_with_many_tags() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut pids = Vec::new();
    let mut streams = Vec::new();
    for i in 0..6 {
        let mut req = sh("echo tick; sleep 30");
        req.tag = Some(format!("tag-{i}"));
        let (s, o) = started(&mut c, req).await;
        pids.push(o.pid);
        streams.push(s);
    }
    let untagged = c.start(cmd("sleep", &["30"])).await.unwrap().into_inner();
    let list = c.list(ListRequest {}).await.unwrap().into_inner().processes;
    assert_eq!(list.len(), 7);
    for (i, pid) in pids.iter().enumerate() {
        let info = list.iter().find(|p| p.pid == *pid).expect("listed");
        assert_eq!(info.tag.as_deref(), Some(format!("tag-{i}").as_str()));
        assert_eq!(info.config.as_ref().unwrap().cmd, "/bin/sh");
    }
    // Every tag resolves to its own process, whatever the iteration order.
    for (i, pid) in pids.iter().enumerate() {
        let mut s = c
            .connect(ConnectRequest {
                process: by_tag(&format!("tag-{i}")),
                resume_offset: None,
            })
            .await
            .unwrap()
            .into_inner();
        let first = s.next().await.unwrap().unwrap().event.unwrap();
        match first.event.unwrap() {
            process_event::Event::Start(st) => assert_eq!(st.pid, *pid),
            other => panic!("first event {other:?}"),
        }
    }
    let r = c
        .connect(ConnectRequest {
            process: by_tag("nope"),
            resume_offset: None,
        })
        .await;
    assert_eq!(code(r), Code::NotFound);
    for pid in &pids {
        kill(&mut c, *pid).await;
    }
    drop((streams, untagged));
}

fn proc_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(") ").next()?.chars().next()
}

#[tokio::test]
async fn kill_reaches_the_whole_group_and_orphans_are_reaped() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let mut s = c
        .start(sh("sleep 300 & echo $!; wait"))
        .await
        .unwrap()
        .into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild: u32 = o.out().trim().parse().unwrap();
    assert!(proc_state(grandchild).is_some());
    kill(&mut c, o.pid).await;
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    // Killed, re-parented to envd (a subreaper) and reaped: no zombie left.
    while proc_state(grandchild).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proc_state(grandchild), None, "grandchild still exists");

    // A command that leaves a background child behind: it is reaped too.
    let o = run(&mut c, sh("sleep 0.3 >/dev/null 2>&1 & echo $!")).await;
    let orphan: u32 = o.out().trim().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_state(orphan).is_some() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(proc_state(orphan), None, "orphan was not reaped");
}

/// `cmd &` in a shell: the command's `end` does not wait for the background
/// job, and the job is not killed by it. It goes on writing to the pipe it
/// inherited (envd keeps that open, unread), so its next line is no
/// `SIGPIPE`. (Before 2026-12-06 envd closed the pipe 500 ms after the
/// job's last line, and the job died at its next one.)
#[tokio::test]
async fn background_jobs_outlive_the_end_and_keep_writing() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let job = BackgroundJob::new();
    let o = run_within(&mut c, job.command(), Duration::from_secs(10)).await;
    assert_eq!(o.out(), "started\n");
    assert_eq!(o.end().exit_code, 0);
    // The job is still waiting: the end did not wait for it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!job.wrote());
    assert!(
        job.release().await,
        "the background job died writing to its stdout/stderr"
    );
}

/// A background job that never goes quiet holds the command's `end` back
/// 2 s at most (it used to hold it for as long as the job wrote, as in
/// upstream envd); everything the command itself wrote is still delivered,
/// to a client that reads slowly too, with more than 2 s of the command's
/// output still in the pipe when it exits.
#[tokio::test]
async fn a_chatty_background_job_does_not_hold_the_end() {
    let envd = Envd::start(&["--output-buffer", "65536"]);
    // A small stream window, and a small output log: envd takes in little
    // of what nobody has read yet.
    let channel = tonic::transport::Endpoint::from_shared(envd.tcp.replace("tcp://", "http://"))
        .unwrap()
        .initial_stream_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut c = process_client::ProcessClient::new(channel);
    // The job writes 'x' lines every 10 ms for up to 60 s; the command
    // writes 1.5 MB of 'a' and exits with much of it still in the pipe.
    let script = "(i=0; while [ $i -lt 6000 ]; do echo x; i=$((i+1)); sleep 0.01; done) & \
                  echo $! >&2; head -c 1500000 /dev/zero | tr '\\0' a";
    let mut s = c.start(sh(script)).await.unwrap().into_inner();
    let began = Instant::now();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.err().ends_with('\n')).await;
    let job: i32 = o.err().trim().parse().unwrap();
    // About 250 KB/s until 300 ms after the command exited (envd sees the
    // exit at its next read), then nothing for 3 s, then as fast as it
    // comes.
    let mut exited = None;
    let mut paused = false;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(item) = s.next().await {
            let ev = item.expect("stream error").event.unwrap();
            let len = match &ev.event {
                Some(process_event::Event::Data(d)) => match &d.output {
                    Some(process_event::data_event::Output::Stdout(b)) => b.len(),
                    _ => 0,
                },
                _ => 0,
            };
            o.record(ev);
            if paused {
                continue;
            }
            tokio::time::sleep(Duration::from_micros(len as u64 * 4)).await;
            match exited {
                None if proc_state(o.pid).is_none() => exited = Some(Instant::now()),
                Some(at) if at.elapsed() > Duration::from_millis(300) => {
                    paused = true;
                    tokio::time::sleep(Duration::from_secs(3)).await;
                }
                _ => {}
            }
        }
    })
    .await;
    assert!(
        paused,
        "the command did not exit before its output was read"
    );
    let took = began.elapsed();
    // SAFETY: kill(2) with a pid and a signal; no memory is involved.
    unsafe { libc::kill(job, libc::SIGKILL) };
    assert!(ended.is_ok(), "no end within 30 s: the job holds it");
    assert_eq!(o.end().exit_code, 0);
    let a = o.stdout.iter().filter(|&&b| b == b'a').count();
    assert_eq!(a, 1_500_000, "the command's own output was cut short");
    assert!(o.stdout.iter().all(|&b| matches!(b, b'a' | b'x' | b'\n')));
    assert!(took < Duration::from_secs(25), "took {took:?}");
}

#[tokio::test]
async fn own_session_and_no_leaked_fds() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let o = run(&mut c, cmd("/bin/ls", &["/proc/self/fd"])).await;
    let fds: Vec<u32> = o
        .out()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(fds.iter().all(|fd| *fd <= 3), "leaked fds: {fds:?}");
    let o = run(&mut c, sh("cat /proc/$$/stat")).await;
    let stat = o.out();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    // fields[2] = pgrp, fields[3] = session
    assert_eq!(fields[2].parse::<u32>().unwrap(), o.pid);
    assert_eq!(fields[3].parse::<u32>().unwrap(), o.pid);
}

async fn lines_output(
    c: &mut envd::proto::process::process_client::ProcessClient<tonic::transport::Channel>,
    n: u32,
) -> (u32, tonic::Streaming<StartResponse>) {
    let script = format!("i=0; while [ $i -lt {n} ]; do i=$((i+1)); echo line$i; done; sleep 1");
    let s = c.start(sh(&script)).await.unwrap().into_inner();
    (n, s)
}

fn expected_lines(n: u32) -> String {
    (1..=n).map(|i| format!("line{i}\n")).collect()
}

#[tokio::test]
async fn resume_after_dropped_stream_has_no_gap() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let (n, mut s) = lines_output(&mut c, 20000).await;
    let mut first = Outcome::default();
    read_until(&mut s, &mut first, |o| o.stdout.len() > 1000).await;
    drop(s); // the client goes away mid-stream; the process keeps running
    let offset = first.stdout.len() as u64;
    let rest = c
        .connect(ConnectRequest {
            process: by_pid(first.pid),
            resume_offset: Some(offset),
        })
        .await
        .unwrap()
        .into_inner();
    let rest = collect(rest).await;
    let start = rest.start.unwrap();
    assert_eq!(start.output_offset, Some(offset));
    assert_eq!(start.output_lost, Some(0));
    let mut all = first.stdout.clone();
    all.extend_from_slice(&rest.stdout);
    assert_eq!(String::from_utf8(all).unwrap(), expected_lines(n));
    assert_eq!(rest.end().exit_code, 0);

    // The ended process: a plain Connect replays the buffer and the end.
    let replay = collect(
        c.connect(ConnectRequest {
            process: by_pid(first.pid),
            resume_offset: None,
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    assert_eq!(replay.out(), expected_lines(n));
    assert_eq!(replay.end().status, "exit status 0");
}

#[tokio::test]
async fn resume_reports_lost_output() {
    let envd = Envd::start(&["--output-buffer", "65536"]);
    let mut c = envd.client().await;
    let mut s = c
        .start(sh("head -c 300000 /dev/zero; sleep 30"))
        .await
        .unwrap()
        .into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.pid != 0).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = c
        .connect(ConnectRequest {
            process: by_pid(o.pid),
            resume_offset: Some(0),
        })
        .await
        .unwrap()
        .into_inner();
    let mut r2 = Outcome::default();
    let mut r = r;
    read_until(&mut r, &mut r2, |o| {
        o.stdout.len() as u64 + o.start.as_ref().map_or(0, |s| s.output_offset.unwrap()) >= 300000
    })
    .await;
    let st = r2.start.unwrap();
    assert!(st.output_lost.unwrap() > 0, "nothing reported lost");
    assert_eq!(
        st.output_offset, st.output_lost,
        "offset = requested 0 + lost"
    );
    assert_eq!(st.output_offset.unwrap() + r2.stdout.len() as u64, 300000);
    // Beyond the end: refused.
    let bad = c
        .connect(ConnectRequest {
            process: by_pid(o.pid),
            resume_offset: Some(10_000_000),
        })
        .await;
    assert_eq!(code(bad), Code::InvalidArgument);
    kill(&mut c, o.pid).await;
}

#[tokio::test]
async fn timeout_kills_the_process_group() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let t0 = Instant::now();
    let o = run(
        &mut c,
        with_meta(sh("sleep 30 & sleep 30"), &[("connect-timeout-ms", "700")]),
    )
    .await;
    assert_eq!(o.end().status, "signal: killed");
    assert!(t0.elapsed() < Duration::from_secs(10));

    let mut req = tonic::Request::new(cmd("sleep", &["30"]));
    req.set_timeout(Duration::from_millis(700));
    let s = c.start(req).await.unwrap().into_inner();
    let mut o = Outcome::default();
    let mut s = s;
    // The gRPC deadline may end the stream on the client side first; the
    // process must be gone either way.
    while let Some(Ok(ev)) = s.next().await {
        o.record(ev.event.unwrap());
    }
    assert!(
        eventually(Duration::from_secs(10), || proc_state(o.pid).is_none()).await,
        "process outlived its deadline: {:?}",
        proc_state(o.pid)
    );
}

#[tokio::test]
async fn keepalives_and_bad_interval() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    let o = run(
        &mut c,
        with_meta(cmd("sleep", &["2.5"]), &[("keepalive-ping-interval", "1")]),
    )
    .await;
    assert!(
        o.keepalives >= 2,
        "keepalives: {} ({})",
        o.keepalives,
        o.order
    );
    for bad in ["0", "-5", "soon"] {
        let r = c
            .start(with_meta(
                cmd("true", &[]),
                &[("keepalive-ping-interval", bad)],
            ))
            .await;
        assert_eq!(code(r), Code::InvalidArgument, "{bad}");
    }
    // Still serving.
    assert_eq!(run(&mut c, cmd("true", &[])).await.end().exit_code, 0);
}

#[tokio::test]
async fn fifty_concurrent_commands() {
    let envd = Envd::start(&[]);
    let c = envd.client().await;
    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let o = run(&mut c, sh(&format!("echo job{i}; exit {}", i % 7))).await;
            assert_eq!(o.out(), format!("job{i}\n"));
            assert_eq!(o.end().exit_code, i % 7);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[tokio::test]
async fn bad_input_gets_codes_and_server_keeps_serving() {
    let envd = Envd::start(&[]);
    let mut c = envd.client().await;
    assert_eq!(code(c.start(cmd("", &[])).await), Code::InvalidArgument);
    assert_eq!(
        code(c.start(StartRequest::default()).await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(c.start(cmd("echo", &["a\0b"])).await),
        Code::InvalidArgument
    );
    let mut req = cmd("true", &[]);
    req.process
        .as_mut()
        .unwrap()
        .envs
        .insert("A=B".into(), "x".into());
    assert_eq!(code(c.start(req).await), Code::InvalidArgument);
    let mut req = cmd("true", &[]);
    req.pty = Some(Pty {
        size: Some(pty::Size { cols: 0, rows: 10 }),
    });
    assert_eq!(code(c.start(req).await), Code::InvalidArgument);
    assert_eq!(
        code(
            c.connect(ConnectRequest {
                process: by_pid(999_999),
                resume_offset: None
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.connect(ConnectRequest {
                process: None,
                resume_offset: None
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.send_signal(SendSignalRequest {
                descendants: false,
                process: by_pid(999_999),
                signal: Signal::Sigterm as i32
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.send_signal(SendSignalRequest {
                descendants: false,
                process: by_pid(999_999),
                signal: 4
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.send_signal(SendSignalRequest {
                descendants: false,
                process: by_pid(999_999),
                signal: 0
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.send_input(SendInputRequest {
                process: by_pid(999_999),
                input: None
            })
            .await
        ),
        Code::NotFound
    );
    assert_eq!(
        code(
            c.update(UpdateRequest {
                process: None,
                pty: None
            })
            .await
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            c.start(with_meta(
                cmd("true", &[]),
                &[("authorization", "Bearer x")]
            ))
            .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            c.start(with_meta(cmd("true", &[]), &[("connect-timeout-ms", "x")]))
                .await
        ),
        Code::InvalidArgument
    );
    // Oversized message: over the 4 MiB limit.
    let big = "x".repeat(5 << 20);
    assert_eq!(code(c.start(cmd("echo", &[&big])).await), Code::OutOfRange);
    assert_eq!(
        c.list(ListRequest {})
            .await
            .unwrap()
            .into_inner()
            .processes
            .len(),
        0
    );
    assert_eq!(run(&mut c, cmd("echo", &["alive"])).await.out(), "alive\n");
}

#[tokio::test]
async fn bind_failure_names_the_url() {
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("tcp://{}", busy.local_addr().unwrap());
    let err = spawn(&["--listen".into(), url.clone()]).expect_err("envd must fail to start");
    assert!(err.contains(&format!("cannot listen on {url}")), "{err}");
}

#[tokio::test]
async fn vsock_listener_binds() {
    if !std::path::Path::new("/dev/vsock").exists() {
        skip_on_this_machine(
            "vsock_listener_binds",
            "/dev/vsock does not exist on this machine",
        );
        return;
    }
    let port = 40000 + std::process::id() % 20000;
    let url = format!("vsock://-1:{port}");
    match spawn(&["--listen".into(), url.clone()]) {
        Ok((mut child, urls, _)) => {
            assert_eq!(urls, vec![url]);
            let _ = child.kill();
            let _ = child.wait();
        }
        Err(e)
            if e.contains("cannot listen on")
                && (e.contains("Cannot assign")
                    || e.contains("not supported")
                    || e.contains("No such device")) =>
        {
            skip_on_this_machine(
                "vsock_listener_binds",
                &format!("no vsock transport here: {e}"),
            );
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn help_explains_every_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_envd"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--listen",
        "--log-level",
        "--log-format",
        "--output-buffer",
        "--exit-retention",
        "--default-user",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[tokio::test]
async fn children_get_a_normal_oom_score() {
    if !is_root() {
        skip(
            "children_get_a_normal_oom_score",
            "lowering envd's OOM score needs root",
        );
        return;
    }
    let envd = Envd::start(&[]);
    if let Err(e) = std::fs::write(format!("/proc/{}/oom_score_adj", envd.pid()), "-1000") {
        // Root in a container may lack the capability: the machine's limit.
        skip_on_this_machine(
            "children_get_a_normal_oom_score",
            &format!("cannot lower envd's OOM score here ({e}; needs CAP_SYS_RESOURCE)"),
        );
        return;
    }
    let mut c = envd.client().await;
    // A fresh envd reads its own score once, at its first spawn.
    let o = run(&mut c, cmd("cat", &["/proc/self/oom_score_adj"])).await;
    assert_eq!(o.out(), "0\n");
}

/// The benches' CPU figure of a process: its own utime + stime, whatever
/// its terminal (a daemon's tpgid is -1) and never its children's time.
#[test]
fn stat_cpu_ticks_reads_utime_and_stime_only() {
    let daemon = "77 (env d) S 1 77 77 0 -1 4194560 10 20 0 0 300 40 5000 6000 20 0 3 0";
    assert_eq!(common::procfs::stat_cpu_ticks(daemon), 340);
    let in_terminal = "77 (x) R 1 77 77 34816 77 4194560 10 20 0 0 7 8 900 900 20 0";
    assert_eq!(common::procfs::stat_cpu_ticks(in_terminal), 15);
}

/// `Start` and `Connect` over gRPC: every byte arrives in order in messages
/// tonic decodes, and the stream ends with the exit and a `grpc-status: 0`
/// trailer (tonic's client reports a stream without it as an error). Then
/// `Connect` replays the retained bytes; errors before the first event are
/// trailers-only statuses.
#[tokio::test]
async fn grpc_output_streams_arrive_whole_and_end_with_a_status() {
    async fn whole<T: HasEvent>(mut s: tonic::Streaming<T>) -> Outcome {
        let mut o = Outcome::default();
        while let Some(item) = s.next().await {
            o.record(item.expect("a clean end").event());
        }
        o
    }
    let e = Envd::start(&[]);
    let mut c = e.client().await;
    let want: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    let s = c.start(sh("seq 1 300000; echo done >&2")).await.unwrap();
    let o = whole(s.into_inner()).await;
    assert!(o.out() == want, "stdout differs ({} bytes)", o.stdout.len());
    assert_eq!((o.err().as_str(), o.end().exit_code), ("done\n", 0));
    let s = c
        .connect(ConnectRequest {
            process: by_pid(o.pid),
            resume_offset: Some(0),
        })
        .await
        .unwrap();
    let o = whole(s.into_inner()).await;
    // The newest 1 MiB (`--output-buffer`) is what a replay can give.
    assert!(
        o.stdout.len() >= 800_000,
        "replayed {} bytes",
        o.stdout.len()
    );
    assert!(want.as_bytes().ends_with(&o.stdout), "replay differs");
    assert_eq!(o.end().exit_code, 0);
    // Failures before the first event.
    let gone = ConnectRequest {
        process: by_pid(999_999),
        resume_offset: None,
    };
    assert_eq!(code(c.connect(gone).await), Code::NotFound);
    let gzip = with_meta(sh("true"), &[("grpc-encoding", "gzip")]);
    assert_eq!(code(c.start(gzip).await), Code::Unimplemented);
}
