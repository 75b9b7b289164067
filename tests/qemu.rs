//! envd inside a QEMU microVM (TCG), driven from the host over hybrid vsock
//! with envd's client library. Needs root and tests/vm/setup.sh (make
//! qemu-test and make test run it); skips with a printed reason otherwise.

mod common;
mod vm;

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use common::*;
use envd::proto::filesystem::filesystem_client::FilesystemClient;
use envd::proto::filesystem::*;
use envd::proto::process::process_client::ProcessClient;
use envd::proto::process::*;
use envd::proto::transfer::transfer_client::TransferClient;
use envd::proto::transfer::*;
use futures_util::StreamExt;

fn skip_reason() -> Option<String> {
    if !is_root() {
        return Some("needs root".into());
    }
    vm::assets().err()
}

fn digest(chunks: &[Vec<u8>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for c in chunks {
        c.hash(&mut h);
    }
    h.finish()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envd_as_pid1_in_an_initramfs_vm() {
    if let Some(why) = skip_reason() {
        skip("envd_as_pid1_in_an_initramfs_vm", &why);
        return;
    }
    let a = vm::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = vm::initramfs(&a, dir.path(), &a.envd, &[]);
    let append = format!("{} envd.listen=vsock://-1:{}", vm::modules_arg(), vm::PORT);
    let mut vm = vm::Vm::boot(&a, dir.path(), &initrd, &append, None, 256);
    let ch = match envd::client::wait_ready(&vm.url(), Duration::from_secs(90)).await {
        Ok(ch) => ch,
        Err(e) => panic!(
            "{e}\nconsole:\n{}\nqemu:\n{}",
            vm.console(),
            std::fs::read_to_string(dir.path().join("qemu.log")).unwrap_or_default()
        ),
    };
    eprintln!(
        "envd reachable {:.2} s after QEMU start",
        vm.started.elapsed().as_secs_f64()
    );
    let mut p = ProcessClient::new(ch.clone());

    // Exit codes, stdout/stderr, and envd really is PID 1.
    let o = run(
        &mut p,
        sh("echo out; echo err >&2; cat /proc/1/comm; exit 3"),
    )
    .await;
    assert_eq!(o.out(), "out\ninit\n");
    assert_eq!(o.err(), "err\n");
    assert_eq!(o.end().exit_code, 3);

    // stdin.
    let (mut s, mut o) = started(&mut p, cmd("cat", &[])).await;
    let input = Some(ProcessInput {
        input: Some(process_input::Input::Stdin(b"via vsock\n".to_vec().into())),
    });
    p.send_input(SendInputRequest {
        process: by_pid(o.pid),
        input,
    })
    .await
    .unwrap();
    p.close_stdin(CloseStdinRequest {
        process: by_pid(o.pid),
    })
    .await
    .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert_eq!(o.out(), "via vsock\n");

    // pty.
    let mut req = sh("stty size; tty");
    req.pty = Some(Pty {
        size: Some(pty::Size {
            cols: 100,
            rows: 30,
        }),
    });
    let o = run(&mut p, req).await;
    let text = String::from_utf8_lossy(&o.pty);
    assert!(
        text.contains("30 100") && text.contains("/dev/pts/"),
        "{text}"
    );

    // Signals and a group kill that reaches a grandchild.
    let mut s = p
        .start(sh("sleep 300 & echo $!; wait"))
        .await
        .unwrap()
        .into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild = o.out().trim().to_owned();
    p.send_signal(SendSignalRequest {
        process: by_pid(o.pid),
        signal: Signal::Sigterm as i32,
    })
    .await
    .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert_eq!(o.end().status, "signal: terminated");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let o = run(
        &mut p,
        sh(&format!(
            "test -e /proc/{grandchild} && echo alive || echo gone"
        )),
    )
    .await;
    assert_eq!(o.out(), "gone\n", "the grandchild survived or is a zombie");

    // Re-attach without loss.
    let mut s = p
        .start(sh(
            "i=0; while [ $i -lt 5000 ]; do i=$((i+1)); echo line$i; done; sleep 1",
        ))
        .await
        .unwrap()
        .into_inner();
    let mut first = Outcome::default();
    read_until(&mut s, &mut first, |o| o.stdout.len() > 2000).await;
    drop(s);
    let offset = first.stdout.len() as u64;
    let rest = collect(
        p.connect(ConnectRequest {
            process: by_pid(first.pid),
            resume_offset: Some(offset),
        })
        .await
        .unwrap()
        .into_inner(),
    )
    .await;
    let mut all = first.stdout.clone();
    all.extend_from_slice(&rest.stdout);
    let expected: String = (1..=5000).map(|i| format!("line{i}\n")).collect();
    assert_eq!(String::from_utf8(all).unwrap(), expected);

    // Orphans are reaped by PID 1: no zombie after a command leaves a child.
    run(&mut p, sh("sleep 0.2 >/dev/null 2>&1 &")).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let o = run(
        &mut p,
        sh("grep -l '^State:.Z' /proc/[0-9]*/status 2>/dev/null | wc -l"),
    )
    .await;
    assert_eq!(o.out().trim(), "0", "zombies left");

    // Files: write, read, list, watch, and 64 MiB each way with checksums.
    let mut fs = FilesystemClient::new(ch.clone());
    let mut w = fs
        .watch_dir(WatchDirRequest {
            path: "/tmp".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(matches!(
        w.next().await.unwrap().unwrap().event,
        Some(watch_dir_response::Event::Start(_))
    ));
    let mut t = TransferClient::new(ch.clone());
    let chunks: Vec<Vec<u8>> = (0..64u8)
        .map(|i| vec![i.wrapping_mul(37); 1 << 20])
        .collect();
    let upload = futures_util::stream::iter(
        std::iter::once(WriteFileRequest {
            message: Some(write_file_request::Message::Header(WriteHeader {
                path: "/tmp/big.bin".into(),
                ..Default::default()
            })),
        })
        .chain(chunks.clone().into_iter().map(|c| WriteFileRequest {
            message: Some(write_file_request::Message::Data(c.into())),
        })),
    );
    let t0 = Instant::now();
    let e = t
        .write_file(upload)
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let up = t0.elapsed();
    assert_eq!(e.size, 64 << 20);
    let t0 = Instant::now();
    let mut got = Vec::new();
    let mut rs = t
        .read_file(ReadFileRequest {
            path: "/tmp/big.bin".into(),
            offset: None,
            length: None,
        })
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = rs.next().await {
        got.extend_from_slice(&m.unwrap().data);
    }
    let down = t0.elapsed();
    let got: Vec<Vec<u8>> = got.chunks(1 << 20).map(<[u8]>::to_vec).collect();
    assert_eq!(digest(&got), digest(&chunks), "64 MiB round trip differs");
    eprintln!(
        "64 MiB over hybrid vsock: write {:.0} MiB/s, read {:.0} MiB/s",
        64.0 / up.as_secs_f64(),
        64.0 / down.as_secs_f64()
    );
    let mut created = false;
    while !created {
        let msg = tokio::time::timeout(Duration::from_secs(10), w.next())
            .await
            .expect("no watch event")
            .unwrap()
            .unwrap();
        if let Some(watch_dir_response::Event::Filesystem(ev)) = msg.event {
            created = ev.name == "big.bin" && ev.r#type == EventType::Create as i32;
        }
    }
    let names: Vec<String> = fs
        .list_dir(ListDirRequest {
            path: "/tmp".into(),
            depth: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(names.contains(&"big.bin".to_owned()), "{names:?}");

    // Clean power-off on SIGTERM to PID 1 (busybox's `poweroff` sends SIGUSR2).
    let _ = p.start(sh("sleep 1000")).await.unwrap();
    let _ = p.start(sh("kill -TERM 1")).await;
    assert!(
        vm.wait_exit(Duration::from_secs(60)),
        "the VM did not power off\n{}",
        vm.console()
    );
    let console = vm.console();
    assert!(console.contains("powering off"), "{console}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_restarts_envd_and_the_client_reconnects() {
    if let Some(why) = skip_reason() {
        skip("systemd_restarts_envd", &why);
        return;
    }
    let a = vm::assets().unwrap();
    let Some(rootfs) = vm::debian_rootfs() else {
        skip(
            "systemd_restarts_envd",
            "no cached Debian rootfs (tests/vm/setup.sh makes it)",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let img = vm::systemd_image(&a, &rootfs, dir.path());
    let initrd = vm::switch_root_initramfs(&a, dir.path());
    let vm = vm::Vm::boot(&a, dir.path(), &initrd, "", Some(&img), 512);
    let url = vm.url();
    let ready = |timeout| envd::client::wait_ready(&url, timeout);
    let ch = match ready(Duration::from_secs(120)).await {
        Ok(ch) => ch,
        Err(e) => panic!("{e}\nconsole:\n{}", vm.console()),
    };
    eprintln!(
        "envd (systemd service) reachable {:.2} s after QEMU start",
        vm.started.elapsed().as_secs_f64()
    );
    let mut p = ProcessClient::new(ch);
    let o = run(&mut p, sh("echo $PPID; systemctl is-active envd; env")).await;
    let out = o.out();
    let lines: Vec<&str> = out.lines().collect();
    let old_pid: u32 = lines[0].parse().unwrap();
    assert_eq!(lines[1], "active");
    assert!(
        !o.out().contains("NOTIFY_SOCKET") && !o.out().contains("WATCHDOG_"),
        "systemd variables leaked: {}",
        o.out()
    );
    // A user process that must survive envd's restart (KillMode=process).
    let o = run(&mut p, sh("sleep 1000 >/dev/null 2>&1 & echo $!")).await;
    let sleeper = o.out().trim().to_owned();

    // kill -9 envd from inside the guest; its stream breaks.
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        p.start(sh(&format!("kill -9 {old_pid}"))),
    )
    .await;
    // Until a different envd answers: right after the kill the old one may
    // still accept a connection, and the restarted one needs a moment.
    let t0 = Instant::now();
    let probe = format!("echo $PPID; systemctl show -p NRestarts --value envd; kill -0 {sleeper} && echo sleeper-alive");
    let o = loop {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "envd not restarted\n{}",
            vm.console()
        );
        let Ok(ch) = ready(Duration::from_secs(10)).await else {
            continue;
        };
        let mut p = ProcessClient::new(ch);
        let attempt = tokio::time::timeout(Duration::from_secs(10), async {
            let s = p.start(sh(&probe)).await.ok()?.into_inner();
            let mut o = Outcome::default();
            let mut s = s;
            while let Some(item) = s.next().await {
                o.record(item.ok()?.event?);
            }
            o.end.is_some().then_some(o)
        })
        .await;
        match attempt {
            Ok(Some(o))
                if o.out().lines().next().and_then(|l| l.parse::<u32>().ok()) != Some(old_pid) =>
            {
                break o
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    eprintln!(
        "a new envd answered {:.2} s after kill -9",
        t0.elapsed().as_secs_f64()
    );
    let out = o.out();
    let lines: Vec<&str> = out.lines().collect();
    assert_ne!(
        lines[0].parse::<u32>().unwrap(),
        old_pid,
        "same envd pid after kill -9"
    );
    assert!(
        lines[1].parse::<u32>().unwrap() >= 1,
        "NRestarts: {}",
        lines[1]
    );
    assert_eq!(
        lines.get(2).copied(),
        Some("sleeper-alive"),
        "the user process died with envd"
    );
}
