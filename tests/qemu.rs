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

/// Held while a VM runs (see its uses).
static VM_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

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
    // One VM at a time: TCG VMs booting side by side on a 2-core machine
    // took longer than the boot timeouts.
    let _one_vm = VM_LOCK.lock().await;
    let a = vm::assets().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let initrd = vm::initramfs(&a, dir.path(), &a.envd, &[]);
    let append = format!("{} envd.listen=vsock://-1:{}", vm::modules_arg(), vm::PORT);
    let mut vm = vm::Vm::boot(&a, dir.path(), &initrd, &append, None, 256);
    let ch = match envd::client::wait_ready(&vm.url(), Duration::from_secs(180)).await {
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

    // As PID 1, envd turned on the kernel's link protections (as systemd would).
    let o = run(
        &mut p,
        sh("cd /proc/sys/fs && cat protected_hardlinks protected_symlinks protected_fifos protected_regular"),
    )
    .await;
    // The kernel leaves at least the last two off by default.
    assert_eq!(o.out(), "1\n1\n1\n1\n");

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
    p.send_signal(signal_pid(o.pid, Signal::Sigterm, false))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    assert_eq!(o.end().status, "signal: terminated");
    let probe = format!("test -e /proc/{grandchild} && echo alive || echo gone");
    let out = settles(&mut p, &probe, "gone\n").await;
    assert_eq!(out, "gone\n", "the grandchild survived or is a zombie");

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
    let zombies = "grep -l '^State:.Z' /proc/[0-9]*/status 2>/dev/null | wc -l";
    let out = settles(&mut p, zombies, "0\n").await;
    assert_eq!(out.trim(), "0", "zombies left");

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

    live_upgrade_proof(&vm.url(), &a.envd).await;
    let mut p = ProcessClient::new(envd::client::dial(&vm.url()).await.unwrap());

    tunnels_into_a_vm_without_network(&vm.url()).await;
    a_host_service_through_reverse_tunnels(&vm.url()).await;

    // busybox: a shell variable fed from a pipe.
    let hog = "x=$(head -c 268435456 /dev/zero | tr '\\0' a)";
    resource_control_proof(&vm.url(), true, hog).await;

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
    // The localhost forwarder scanned listeners through sock_diag (the
    // modules loaded by `envd.modules=`), not by reading /proc/net/tcp.
    assert!(!console.contains("no sock_diag"), "{console}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_restarts_envd_and_the_client_reconnects() {
    if let Some(why) = skip_reason() {
        skip("systemd_restarts_envd", &why);
        return;
    }
    // One VM at a time: TCG VMs booting side by side on a 2-core machine
    // took longer than the boot timeouts.
    let _one_vm = VM_LOCK.lock().await;
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
    // On a disk root, a command whose code pages are evicted near its limit
    // thrashes for minutes before the OOM killer acts; perl allocates in one
    // tight loop.
    let hog = "exec perl -e '$x = \"a\" x (256 << 20)'";
    resource_control_proof(&url, false, hog).await;

    // A user process that must survive envd's restart (KillMode=process).
    let o = run(&mut p, sh("sleep 1000 >/dev/null 2>&1 & echo $!")).await;
    let sleeper = o.out().trim().to_owned();

    // Commands envd must take over after its crash: a counter (followed by
    // a client), a shell on a pty, a stdin reader, a sleeper.
    let mut counter = sh("i=0; while [ $i -lt 600 ]; do echo $i; i=$((i+1)); sleep 0.01; done");
    counter.tag = Some("cr-counter".into());
    let (s, o) = started(&mut p, counter).await;
    let follower = follow(s, o);
    let mut shell = cmd("/bin/sh", &[]);
    shell.tag = Some("cr-pty".into());
    shell.pty = Some(Pty {
        size: Some(pty::Size { cols: 80, rows: 24 }),
    });
    let (_t, shell_o) = started(&mut p, shell).await;
    let mut reader = sh("read l; echo got $l; exit 6");
    reader.tag = Some("cr-reader".into());
    let (_r, reader_o) = started(&mut p, reader).await;
    let mut napper = cmd("sleep", &["1000"]);
    napper.tag = Some("cr-sleeper".into());
    let (_n, _) = started(&mut p, napper).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

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

    // The restarted envd took the commands over from systemd's fd store.
    let o = follower.await.unwrap();
    let rest = rest_from(&url, "cr-counter", o.stdout.len() as u64).await;
    assert_eq!(
        rest.start.as_ref().unwrap().output_lost,
        Some(0),
        "output lost across the crash"
    );
    assert_counter(
        &format!("{}{}", o.out(), rest.out()),
        600,
        "counter across kill -9",
    );
    assert_eq!(rest.end().exit_code, 0, "{:?}", rest.end());
    let mut p = ProcessClient::new(envd::client::dial(&url).await.unwrap());
    send_input(
        &mut p,
        shell_o.pid,
        pty_input(b"echo crash-$((6*7)); exit 5\n"),
    )
    .await
    .expect("pty input after the crash");
    let shell = rest_from(&url, "cr-pty", 0).await;
    assert!(
        String::from_utf8_lossy(&shell.pty).contains("crash-42"),
        "{:?}",
        String::from_utf8_lossy(&shell.pty)
    );
    assert_eq!(shell.end().exit_code, 5, "{:?}", shell.end());
    send_input(&mut p, reader_o.pid, stdin_input(b"x\n"))
        .await
        .expect("stdin after the crash");
    let read = rest_from(&url, "cr-reader", 0).await;
    assert_eq!(read.out(), "got x\n");
    assert_eq!(read.end().exit_code, 6, "{:?}", read.end());
    p.send_signal(SendSignalRequest {
        process: by_tag("cr-sleeper"),
        signal: Signal::Sigterm as i32,
        descendants: false,
    })
    .await
    .expect("signal after the crash");
    let napped = rest_from(&url, "cr-sleeper", 0).await;
    assert_eq!(
        napped.end().status,
        "signal: terminated",
        "{:?}",
        napped.end()
    );
    eprintln!("kill -9: envd re-adopted 4 commands (output, pty, stdin, signal, exit statuses)");

    live_upgrade_proof(&url, &a.envd).await;
    sdk_suites_through_the_proxy(&url).await;
}

/// The official Python and JS SDK suites (tests/sdk/), unchanged but for
/// where their working directory is, against envd in the VM through
/// `envctl proxy` over vsock.
async fn sdk_suites_through_the_proxy(url: &str) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".cache/sdk-venv/bin/python");
    let js = root.join("tests/sdk/js");
    let bound = proxy_to(url).await;
    let sdk_url = bound.replace("tcp://", "http://");
    let mut suites: Vec<(String, Vec<String>, std::path::PathBuf)> = Vec::new();
    if python.exists() {
        suites.push((
            python.display().to_string(),
            vec!["tests/sdk/python_suite.py".into()],
            root.to_path_buf(),
        ));
    } else {
        skip(
            "SDK suites in the VM (Python)",
            "no SDK virtualenv; make sdk-deps",
        );
    }
    if js.join("node_modules/e2b").exists()
        && std::process::Command::new("node")
            .arg("--version")
            .output()
            .is_ok()
    {
        suites.push(("node".into(), vec!["suite.mjs".into()], js));
    } else {
        skip(
            "SDK suites in the VM (JS)",
            "node or its modules missing; make sdk-deps",
        );
    }
    for (i, (program, args, cwd)) in suites.into_iter().enumerate() {
        let sdk_url = sdk_url.clone();
        let t0 = Instant::now();
        let out = tokio::task::spawn_blocking(move || {
            std::process::Command::new(&program)
                .args(&args)
                .arg(&sdk_url)
                .arg(format!("/tmp/sdk-suite-{i}"))
                .env("ENVD_SDK_REMOTE", "1")
                .current_dir(cwd)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(" passed, 0 failed"),
            "SDK suite through the proxy:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        eprintln!(
            "SDK suite {i} through envctl proxy into the VM: {} ({:.0} s)",
            stdout.lines().last().unwrap_or(""),
            t0.elapsed().as_secs_f64()
        );
    }
}

/// E2B's orchestrator drives envd in the systemd VM as it drives upstream's:
/// `-version`, `/init` with every field, `/health`, `/freeze`, `/fsfreeze`,
/// `/fsthaw`, `/unfreeze`, `/init` again after the "resume", each effect
/// checked inside the guest; then a server on the guest's 127.0.0.1 is
/// reached from the host through the guest's network address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2b_orchestrator_contract_in_the_systemd_vm() {
    const NAME: &str = "e2b_orchestrator_contract_in_the_systemd_vm";
    if let Some(why) = skip_reason() {
        return skip(NAME, &why);
    }
    // One VM at a time: TCG VMs booting side by side on a 2-core machine
    // took longer than the boot timeouts.
    let _one_vm = VM_LOCK.lock().await;
    let a = vm::assets().unwrap();
    let Some(rootfs) = vm::debian_rootfs() else {
        return skip(NAME, "no cached Debian rootfs (tests/vm/setup.sh makes it)");
    };
    let dir = tempfile::tempdir().unwrap();
    // The guest is 10.0.2.15 on QEMU's user network; envd forwards there.
    let unit = "[Service]\nExecStart=\nExecStart=/usr/bin/envd --vm --mmds-address off \
                --forward-address 10.0.2.15 --listen vsock://-1:49983 --listen tcp://0.0.0.0:49983\n";
    let network = "[Match]\nName=en* eth*\n[Network]\nAddress=10.0.2.15/24\nGateway=10.0.2.2\n";
    let img = vm::systemd_image_with(
        &a,
        &rootfs,
        dir.path(),
        &[
            ("/etc/systemd/system/envd.service.d/e2b.conf", unit),
            ("/etc/systemd/network/10-eth.network", network),
            (
                "/etc/systemd/system/sysinit.target.wants/systemd-networkd.service",
                "symlink:/lib/systemd/system/systemd-networkd.service",
            ),
        ],
    );
    let initrd = vm::switch_root_initramfs(&a, dir.path());
    let (rest_port, fwd_port) = (vm::free_port(), vm::free_port());
    let nic = format!(
        "user,model=virtio-net-pci,hostfwd=tcp:127.0.0.1:{rest_port}-:49983,hostfwd=tcp:127.0.0.1:{fwd_port}-:8000"
    );
    let vm = vm::Vm::boot_with_nic(&a, dir.path(), &initrd, "", Some(&img), 512, &nic);
    let ch = match envd::client::wait_ready(&vm.url(), Duration::from_secs(120)).await {
        Ok(ch) => ch,
        Err(e) => panic!("{e}\nconsole:\n{}", vm.console()),
    };
    let mut p = ProcessClient::new(ch);
    let rest = format!("tcp://127.0.0.1:{rest_port}");
    // The orchestrator reaches envd over the VM's network.
    let t0 = Instant::now();
    while !tcp_health(rest_port) {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "no network\n{}",
            vm.console()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The template builder: `envd -version`, the same as the host's binary.
    let o = run(&mut p, cmd("/usr/bin/envd", &["-version"])).await;
    let host = std::process::Command::new(binary())
        .arg("-version")
        .output()
        .unwrap();
    assert_eq!(o.out(), String::from_utf8_lossy(&host.stdout));

    // /init with every field the orchestrator sends (no NFS server here).
    let now = prost_types::Timestamp::from(std::time::SystemTime::now()).to_string();
    let cert =
        "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydA==\n-----END CERTIFICATE-----\n";
    let init = |ts: &str| {
        serde_json::json!({
            "accessToken": "tok", "envVars": {"TEAM": "e2b"}, "defaultUser": "root",
            "timestamp": ts, "hyperloopIP": "10.0.2.2", "caBundle": cert, "lifecycleID": "l1",
        })
        .to_string()
    };
    let r = common::http::post_json(&rest, "/init", &init(&now));
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("x-envd-version").unwrap(), o.out().trim());
    assert_eq!(
        common::http::request(&rest, "GET", "/health", &[], b"").status,
        204
    );
    let auth = [("x-access-token", "tok")];
    let post = |path: &str| common::http::request(&rest, "POST", path, &auth, b"");
    let system = |script: &str| {
        let mut r = sh(script);
        r.tag = Some("_system".into());
        with_meta(r, &[("x-access-token", "tok")])
    };
    let o = run(
        &mut p,
        system("cat /run/e2b/.E2B_SANDBOX; echo; grep events.e2b.local /etc/hosts; echo $E2B_EVENTS_ADDRESS $TEAM; grep -c MIIBszCC /etc/ssl/certs/ca-certificates.crt"),
    )
    .await;
    assert_eq!(
        o.out(),
        "true\n10.0.2.2\tevents.e2b.local\nhttp://10.0.2.2 e2b\n1\n",
        "{}",
        o.err()
    );

    // A workload in the user cgroup, ticking.
    let work = with_meta(
        sh("while :; do echo x >> /var/tmp/ticks; sleep 0.05; done"),
        &[("x-access-token", "tok")],
    );
    let (_work_stream, work) = started(&mut p, work).await;
    let o = run(&mut p, system(&format!("cat /proc/{}/cgroup", work.pid))).await;
    assert!(o.out().starts_with("0::/user/cmd-"), "{}", o.out());
    let ticks = || async {
        let o = run(
            &mut ProcessClient::new(envd::client::dial(&vm.url()).await.unwrap()),
            system("sleep 0.5; wc -l < /var/tmp/ticks; sleep 0.5; wc -l < /var/tmp/ticks"),
        )
        .await;
        let n: Vec<u64> = o.out().lines().map(|l| l.trim().parse().unwrap()).collect();
        n[1] > n[0]
    };
    assert!(ticks().await, "the workload runs");

    // Pause: freeze the workload, then the root filesystem.
    let r = common::http::request(&rest, "POST", "/freeze?maxWaitMs=3000", &auth, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["frozen"], 2, "{}", r.text());
    assert!(!ticks().await, "a frozen workload does not run");
    assert_eq!(post("/fsfreeze").status, 204);
    // A write to the frozen root filesystem waits for the thaw.
    let mut writer = p
        .start(system("echo x > /var/tmp/probe && echo written"))
        .await
        .unwrap()
        .into_inner();
    let mut wo = Outcome::default();
    let early = tokio::time::timeout(
        Duration::from_millis(800),
        read_until(&mut writer, &mut wo, |o| o.end.is_some()),
    )
    .await;
    assert!(
        early.is_err(),
        "a write went through a frozen filesystem: {}",
        wo.out()
    );
    assert_eq!(post("/fsthaw").status, 204);
    read_until(&mut writer, &mut wo, |o| o.end.is_some()).await;
    assert_eq!(wo.out(), "written\n");
    // Pause failed: roll back.
    assert_eq!(post("/unfreeze").status, 204);
    assert!(ticks().await, "thawed by /unfreeze");
    // Resume: the snapshot kept the frozen state; /init thaws it.
    let r = common::http::request(&rest, "POST", "/freeze?maxWaitMs=3000", &auth, b"");
    assert_eq!(r.status, 200);
    assert!(!ticks().await);
    let later = prost_types::Timestamp::from(std::time::SystemTime::now()).to_string();
    let r = common::http::request(
        &rest,
        "POST",
        "/init",
        &[
            ("content-type", "application/json"),
            ("x-access-token", "tok"),
        ],
        init(&later).as_bytes(),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(ticks().await, "thawed by the resume's /init");
    let o = run(&mut p, system("grep -c events.e2b.local /etc/hosts; grep -c MIIBszCC /etc/ssl/certs/ca-certificates.crt")).await;
    assert_eq!(o.out(), "1\n1\n", "every /init effect happens once");

    // Port forwarding: a server on the guest's 127.0.0.1:8000 (another envd)
    // answers on 10.0.2.15:8000, which QEMU forwards from the host.
    let server = with_meta(
        cmd(
            "/usr/bin/envd",
            &["--not-vm", "--listen", "tcp://127.0.0.1:8000"],
        ),
        &[("x-access-token", "tok")],
    );
    let (_server_stream, server) = started(&mut p, server).await;
    let t0 = Instant::now();
    while !tcp_health(fwd_port) {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "127.0.0.1:8000 never forwarded"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut kill_req = signal_pid(server.pid, Signal::Sigkill, false);
    p.send_signal(with_meta(kill_req.clone(), &[("x-access-token", "tok")]))
        .await
        .unwrap();
    let t0 = Instant::now();
    while tcp_health(fwd_port) {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "still forwarded after the server died"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    kill_req.process = by_pid(work.pid);
    let _ = p
        .send_signal(with_meta(kill_req, &[("x-access-token", "tok")]))
        .await;
}

/// Whether `GET /health` on 127.0.0.1:`port` answers 204 (no panic on a
/// refused or reset connection).
fn tcp_health(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    buf.starts_with(b"HTTP/1.1 204")
}

/// Runs `script` in the guest every 200 ms until it prints `want` (at most
/// 20 s: under TCG a guest slows down a lot when other VMs share the host's
/// cores); returns the last output. For effects that follow an event, like
/// a killed process's reaping.
async fn settles(
    p: &mut ProcessClient<tonic::transport::Channel>,
    script: &str,
    want: &str,
) -> String {
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let out = run(p, sh(script)).await.out();
        if out == want || Instant::now() >= until {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Resource control inside a VM (cgroup v2 with its controllers): a tree
/// kill nothing escapes (also by deadline), a memory limit ending in
/// `oom_killed`, a CPU quota, a fork bomb held by pids.max while envd keeps
/// answering; with `exhaust`, an unlimited command eating the VM's memory is
/// reported as OOM-killed and envd survives.
async fn resource_control_proof(url: &str, exhaust: bool, hog: &str) {
    let dial = || async { ProcessClient::new(envd::client::dial(url).await.unwrap()) };
    let mut p = dial().await;
    let limited = |script: &str, limits: ResourceLimits| {
        let mut r = sh(script);
        r.limits = Some(limits);
        r
    };
    let alive = |pid: String| async move {
        let o = run(
            &mut dial().await,
            sh(&format!(
                "kill -0 {pid} 2>/dev/null && echo alive || echo gone"
            )),
        )
        .await;
        o.out().trim() == "alive"
    };

    // Tree kill: a setsid grandchild ignoring SIGTERM dies with its command.
    let tree = "setsid sh -c 'trap \"\" TERM; echo $$; exec sleep 1000' & wait";
    let (mut s, mut o) = started(&mut p, sh(tree)).await;
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild = o.out().trim().to_owned();
    p.send_signal(signal_pid(o.pid, Signal::Sigkill, true))
        .await
        .unwrap();
    read_until(&mut s, &mut o, |o| o.end.is_some()).await;
    let t0 = Instant::now();
    while alive(grandchild.clone()).await {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "grandchild survived the tree kill"
        );
    }
    // The same through the deadline.
    let mut req = tonic::Request::new(sh(tree));
    req.metadata_mut()
        .insert("grpc-timeout", "3S".parse().unwrap());
    let mut s = p.start(req).await.unwrap().into_inner();
    let mut o = Outcome::default();
    read_until(&mut s, &mut o, |o| o.out().ends_with('\n')).await;
    let grandchild = o.out().trim().to_owned();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let t0 = Instant::now();
    while alive(grandchild.clone()).await {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "grandchild survived the deadline"
        );
    }

    eprintln!("tree kills done");
    // 64 MiB limit, 256 MiB wanted: OOM, reported as such.
    let mem = ResourceLimits {
        memory_max: Some(64 << 20),
        swap_max: Some(0),
        ..Default::default()
    };
    let o = run(&mut p, limited(&format!("{hog}; echo survived"), mem)).await;
    assert_eq!(
        o.end().oom_killed,
        Some(true),
        "end: {:?}; out: {}",
        o.end(),
        o.out()
    );
    assert!(!o.out().contains("survived"));
    let peak = o.end().usage.as_ref().unwrap().memory_peak_bytes;
    assert!(peak <= 65 << 20 && peak > 32 << 20, "peak {peak}");

    eprintln!("OOM under a limit done");
    // 0.25 cores for 2 s of spinning: about 0.5 s of CPU.
    let cpu = ResourceLimits {
        cpu: Some(0.25),
        ..Default::default()
    };
    let o = run(
        &mut p,
        limited("timeout 2 sh -c 'while :; do :; done'; true", cpu),
    )
    .await;
    let u = o.end().usage.as_ref().unwrap();
    let used = u.cpu_user_usec + u.cpu_system_usec;
    eprintln!("0.25 cores for 2 s: {:.2} s of CPU", used as f64 / 1e6);
    assert!((250_000..900_000).contains(&used), "CPU {used} µs");

    // A fork bomb held at 16 processes; envd answers throughout. The
    // command's own shell execs its sleep: a fork after the bomb's start
    // could find the 16 taken (it did in a guest slowed by a loaded host),
    // and the command would end before it is listed.
    let pids = ResourceLimits {
        pids_max: Some(16),
        ..Default::default()
    };
    let (_bomb_stream, bomb) = started(
        &mut p,
        limited("b() { b | b & }; b & exec sleep 1000", pids),
    )
    .await;
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let t = Instant::now();
        let list = p.list(ListRequest {}).await.unwrap().into_inner();
        slowest = slowest.max(t.elapsed());
        let mine = list.processes.iter().find(|x| x.pid == bomb.pid);
        assert!(mine.is_some(), "the bomb's command is listed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "List during a fork bomb (pids.max 16): slowest {:.0} ms",
        slowest.as_secs_f64() * 1000.0
    );
    assert!(
        slowest < Duration::from_secs(1),
        "envd answered in {slowest:?}"
    );
    p.send_signal(signal_pid(bomb.pid, Signal::Sigkill, true))
        .await
        .unwrap();

    if exhaust {
        // No limit of its own: the VM's memory runs out; the command is the
        // one the OOM killer takes, and envd is still here.
        // Under TCG with other VMs on the same cores, filling the memory
        // through a pipe has taken over a minute: a longer deadline here.
        let began = Instant::now();
        let fill = sh("x=$(head -c 4294967296 /dev/zero | tr '\\0' a); echo survived");
        let o = run_within(&mut p, fill, Duration::from_secs(240)).await;
        eprintln!(
            "VM memory exhausted in {:.1} s",
            began.elapsed().as_secs_f64()
        );
        assert_eq!(o.end().oom_killed, Some(true), "end: {:?}", o.end());
        let o = run(&mut dial().await, sh("echo still here")).await;
        assert_eq!(o.out(), "still here\n");
    }
}

/// The PID 1 VM has no network device: a web server inside is reached from
/// the host through `envctl forward`'s tunnels (HTTP CONNECT to envd over
/// hybrid vsock), and the official Python SDK through `envctl proxy`.
async fn tunnels_into_a_vm_without_network(url: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut p = ProcessClient::new(envd::client::dial(url).await.unwrap());
    // busybox httpd on the guest's loopback, serving 64 MiB of random bytes.
    let o = run(
        &mut p,
        sh("rm -f /tmp/big.bin; mkdir -p /tmp/www && echo hello > /tmp/www/index.html && head -c 67108864 /dev/urandom > /tmp/www/big && sha256sum /tmp/www/big"),
    )
    .await;
    let want = o
        .out()
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no checksum: {} {}", o.out(), o.err()))
        .to_owned();
    let _ = p
        .start(sh("exec httpd -f -p 127.0.0.1:8080 -h /tmp/www"))
        .await
        .unwrap();
    let target: envd::client::Target = url.parse().unwrap();
    let host_port = vm::free_port();
    let spec: envd::client::forward::Spec = format!("{host_port}:8080").parse().unwrap();
    tokio::spawn(envd::client::forward::serve(
        spec,
        std::sync::Arc::new(target),
        None,
    ));
    let get = |path: &'static str| async move {
        for _ in 0..100 {
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", host_port)).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let req = format!("GET {path} HTTP/1.0\r\nHost: vm\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_err() {
                continue;
            }
            let mut all = Vec::new();
            if s.read_to_end(&mut all).await.is_err() || all.is_empty() {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            return all.split_off(at);
        }
        panic!("{path}: never answered through the forward");
    };
    assert_eq!(get("/index.html").await, b"hello\n");
    // 50 connections at once.
    let pages: Vec<_> = (0..50).map(|_| tokio::spawn(get("/index.html"))).collect();
    for page in pages {
        assert_eq!(page.await.unwrap(), b"hello\n");
    }
    // 64 MiB, checked.
    let t = Instant::now();
    let big = get("/big").await;
    let secs = t.elapsed().as_secs_f64();
    use sha2::Digest;
    let got: String = sha2::Sha256::digest(&big)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(big.len(), 64 << 20);
    assert_eq!(got, want, "64 MiB through the forward came back changed");
    eprintln!(
        "64 MiB through envctl forward (hybrid vsock, TCG): {:.1} MiB/s",
        64.0 / secs
    );

    // The official Python SDK through `envctl proxy`.
    let python =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/sdk-venv/bin/python");
    if !python.exists() {
        return skip(
            "tunnels_into_a_vm_without_network (SDK part)",
            "no SDK virtualenv; make sdk-deps",
        );
    }
    // The SDK runs `/bin/bash -l -c`: busybox's sh stands in for it.
    run(
        &mut p,
        sh("printf '#!/bin/sh\\nexec /bin/sh \"$@\"\\n' > /bin/bash && chmod +x /bin/bash"),
    )
    .await;
    let bound = proxy_to(url).await;
    reflection_lists_envd_services(&bound).await;
    let sdk_url = bound.replace("tcp://", "http://");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg("tests/sdk/vm_smoke.py")
            .arg(&sdk_url)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("4 passed, 0 failed"),
        "SDK through the proxy:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The other way in the PID 1 VM, which has no network device: a web server
/// on the host reached by `wget` in the guest at 127.0.0.1:9090, through
/// `envctl reverse`'s tunnels (all opened by the host, over hybrid vsock),
/// once and by 20 fetches at once, each 256 KiB and checked.
async fn a_host_service_through_reverse_tunnels(url: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let page: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
    let page = std::sync::Arc::new(page);
    let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let host_port = server.local_addr().unwrap().port();
    let served = page.clone();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = server.accept().await {
            let page = served.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let answer = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n", page.len());
                let _ = c.write_all(answer.as_bytes()).await;
                let _ = c.write_all(&page).await;
            });
        }
    });
    let target: envd::client::Target = url.parse().unwrap();
    let spec: envd::client::reverse::Spec = format!("9090:{host_port}").parse().unwrap();
    tokio::spawn(envd::client::reverse::serve(
        spec,
        std::sync::Arc::new(target),
        None,
    ));
    use sha2::Digest;
    let want: String = sha2::Sha256::digest(page.as_slice())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut p = ProcessClient::new(envd::client::dial(url).await.unwrap());
    // Until the first waiting tunnel has reached envd, nothing listens.
    let fetch = "for i in $(seq 100); do wget -q -O /tmp/host.page http://127.0.0.1:9090/ && exec sha256sum /tmp/host.page; sleep 0.2; done; exit 1";
    let o = run(&mut p, sh(fetch)).await;
    assert!(o.out().starts_with(&want), "{} {}", o.out(), o.err());
    let many =
        "for i in $(seq 20); do (wget -q -O - http://127.0.0.1:9090/ | sha256sum) & done; wait";
    let o = run(&mut p, sh(many)).await;
    let out = o.out();
    let sums: Vec<&str> = out.lines().collect();
    assert_eq!(sums.len(), 20, "{out} {}", o.err());
    assert!(sums.iter().all(|l| l.starts_with(&want)), "{out}");
}

/// Follows a Start/Connect stream until it ends or breaks (an upgrade or a
/// crash of envd breaks it).
fn follow(
    mut s: tonic::Streaming<StartResponse>,
    mut o: Outcome,
) -> tokio::task::JoinHandle<Outcome> {
    tokio::spawn(async move {
        while let Some(Ok(item)) = s.next().await {
            o.record(item.event());
        }
        o
    })
}

/// The rest of a command's output from `offset`, to its end.
async fn rest_from(url: &str, tag: &str, offset: u64) -> Outcome {
    let mut p = ProcessClient::new(envd::client::dial(url).await.unwrap());
    resume_tag(&mut p, tag, offset).await
}

/// Counter lines 0..n with neither gap nor duplicate.
fn assert_counter(all: &str, n: u32, what: &str) {
    let nums: Vec<u32> = all
        .lines()
        .map(|l| l.trim().parse().unwrap_or(u32::MAX))
        .collect();
    assert_eq!(nums, (0..n).collect::<Vec<_>>(), "{what}: gap or duplicate");
}

/// 64 MiB written to `path` (1 MiB chunks of a known pattern).
async fn upload_64mib(url: String, path: &'static str) -> Result<(), tonic::Status> {
    let mut t = TransferClient::new(envd::client::dial(&url).await.unwrap());
    let upload = futures_util::stream::iter(
        std::iter::once(WriteFileRequest {
            message: Some(write_file_request::Message::Header(WriteHeader {
                path: path.into(),
                ..Default::default()
            })),
        })
        .chain((0..64u8).map(|i| WriteFileRequest {
            message: Some(write_file_request::Message::Data(
                vec![i.wrapping_mul(37); 1 << 20].into(),
            )),
        })),
    );
    t.write_file(upload).await.map(|_| ())
}

fn sha256_of_upload() -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for i in 0..64u8 {
        h.update(vec![i.wrapping_mul(37); 1 << 20]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Live upgrade inside a VM to a different build (the VM's binary with
/// bytes appended) while a command streams, a 64 MiB upload runs and a
/// polling watcher holds an event: the output has no gap, the upload either
/// completes or fails cleanly and succeeds when retried, the watcher keeps
/// its event, exit statuses are exact.
async fn live_upgrade_proof(url: &str, binary: &std::path::Path) {
    let target: envd::client::Target = url.parse().unwrap();
    let ch = envd::client::dial(url).await.unwrap();
    let mut p = ProcessClient::new(ch.clone());
    run(&mut p, sh("rm -f /tmp/big.bin; mkdir -p /tmp/upw")).await;
    let mut counter = sh("i=0; while [ $i -lt 600 ]; do echo $i; i=$((i+1)); sleep 0.01; done");
    counter.tag = Some("up-counter".into());
    let (s, o) = started(&mut p, counter).await;
    let follower = follow(s, o);
    let mut reader = sh("read l; echo got $l; exit 9");
    reader.tag = Some("up-reader".into());
    let (_r, reader_o) = started(&mut p, reader).await;
    let mut fs = FilesystemClient::new(ch.clone());
    let watcher = fs
        .create_watcher(CreateWatcherRequest {
            path: "/tmp/upw".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .watcher_id;
    run(&mut p, sh("touch /tmp/upw/before")).await;

    let upload = tokio::spawn(upload_64mib(url.to_owned(), "/tmp/up.bin"));
    tokio::time::sleep(Duration::from_millis(700)).await;
    let mut bytes = std::fs::read(binary).unwrap();
    bytes.extend_from_slice(b"\nenvd, upgraded inside a VM\n");
    let up = envd::client::upgrade::upgrade(&target, &bytes, None, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("live upgrade in the VM: {e}"));
    assert_ne!(up.before, up.after, "the new build did not take over");
    eprintln!(
        "live upgrade in the VM: {} -> {}, envd answered again {} ms after the upload",
        up.before,
        up.after,
        up.downtime.as_millis()
    );
    match upload.await.unwrap() {
        Ok(()) => eprintln!("the 64 MiB upload completed across the upgrade"),
        Err(e) => {
            eprintln!("the 64 MiB upload failed cleanly ({}); retrying", e.code());
            upload_64mib(url.to_owned(), "/tmp/up.bin")
                .await
                .expect("retried upload");
        }
    }
    let mut p = ProcessClient::new(envd::client::dial(url).await.unwrap());
    let o = run(
        &mut p,
        sh("sha256sum /tmp/up.bin; ls -a /tmp | grep -c '^.envd-' ; rm -f /tmp/up.bin"),
    )
    .await;
    let out = o.out();
    assert!(
        out.starts_with(&sha256_of_upload()),
        "upload content: {out}"
    );
    assert_eq!(
        out.lines().nth(1),
        Some("0"),
        "temporary upload files left: {out}"
    );

    let o = follower.await.unwrap();
    let rest = rest_from(url, "up-counter", o.stdout.len() as u64).await;
    assert_eq!(rest.start.as_ref().unwrap().output_lost, Some(0));
    assert_counter(
        &format!("{}{}", o.out(), rest.out()),
        600,
        "counter across the live upgrade",
    );
    assert_eq!(rest.end().exit_code, 0);

    send_input(&mut p, reader_o.pid, stdin_input(b"up\n"))
        .await
        .expect("stdin after the upgrade");
    let read = rest_from(url, "up-reader", 0).await;
    assert_eq!(read.out(), "got up\n");
    assert_eq!(read.end().exit_code, 9, "exit status across the upgrade");

    let mut fs = FilesystemClient::new(envd::client::dial(url).await.unwrap());
    run(&mut p, sh("touch /tmp/upw/after")).await;
    let mut names = Vec::new();
    let t0 = Instant::now();
    while !(names.iter().any(|n| n == "before") && names.iter().any(|n| n == "after")) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "watcher events: {names:?}"
        );
        let evs = fs
            .get_watcher_events(GetWatcherEventsRequest {
                watcher_id: watcher.clone(),
            })
            .await
            .expect("the watcher survived the upgrade")
            .into_inner()
            .events;
        names.extend(evs.into_iter().map(|e| e.name));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What `grpcurl list` does, through `url` (the proxy): gRPC server
/// reflection names envd's services, and describes one of them.
async fn reflection_lists_envd_services(url: &str) {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    let mut r = ServerReflectionClient::new(envd::client::dial(url).await.unwrap());
    let ask = |m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    };
    let mut answers = r
        .server_reflection_info(futures_util::stream::iter(vec![
            ask(MessageRequest::ListServices(String::new())),
            ask(MessageRequest::FileContainingSymbol(
                "process.Process".into(),
            )),
        ]))
        .await
        .expect("reflection through the proxy")
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no service list");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "process.Process",
        "filesystem.Filesystem",
        "envd.ports.Ports",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} not listed: {names:?}"
        );
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("no descriptor for process.Process");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    eprintln!(
        "gRPC reflection through envctl proxy: {} services",
        names.len()
    );
}
