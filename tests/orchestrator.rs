//! envd as E2B's host side drives it (the template builder and the
//! orchestrator, e2b-dev/infra): Go-style flags, the version it claims and
//! what that claim promises, `/init` with every field, MMDS, and the guest
//! side effects, seen in a `--guest-root` directory instead of the real `/`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::http::{post_json, request, Reply};
use common::mmds::{token_hash, FakeMmds};
use common::*;

const CERT: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBszCCAVmgAwIBAgIUQ2VydA==\n-----END CERTIFICATE-----\n";

fn claimed_version() -> (u32, u32, u32) {
    let out = Command::new(binary()).arg("-version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let v: Vec<u32> = text.trim().split('.').map(|p| p.parse().unwrap()).collect();
    assert_eq!(v.len(), 3, "-version printed {text:?}");
    (v[0], v[1], v[2])
}

/// envd in a sandbox VM (`--vm`) whose system is `root`; without cgroups
/// unless `extra` names a `--cgroup-root` (never the machine's own).
fn vm_envd(root: &std::path::Path, mmds: Option<&FakeMmds>, extra: &[&str]) -> Envd {
    let root = root.to_str().unwrap().to_owned();
    let mmds = mmds.map_or("off".to_owned(), |m| m.addr.clone());
    let mut args = vec!["--vm", "--guest-root", &root, "--mmds-address", &mmds];
    if !extra.contains(&"--cgroup-root") {
        args.push("--no-cgroups");
    }
    if !extra.contains(&"--forward-address") {
        args.extend(["--forward-address", "off"]);
    }
    args.extend_from_slice(extra);
    Envd::start(&args)
}

/// RFC 3339 for `secs` seconds ago.
fn ago(secs: u64) -> String {
    let t = std::time::SystemTime::now() - Duration::from_secs(secs);
    prost_types::Timestamp::from(t).to_string()
}

fn get(url: &str, path: &str, token: Option<&str>) -> Reply {
    let h: Vec<(&str, &str)> = token.map(|t| ("x-access-token", t)).into_iter().collect();
    request(url, "GET", path, &h, b"")
}

fn envs(url: &str, token: Option<&str>) -> serde_json::Value {
    let r = get(url, "/envs", token);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

#[test]
fn go_style_flags_work_as_upstream() {
    let (v0, v1, v2) = claimed_version();
    assert!((v0, v1, v2) >= (0, 6, 2), "claims {v0}.{v1}.{v2}");
    // envd's own version stays visible.
    let own = Command::new(binary()).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&own.stdout).starts_with("envd "));
    let commit = Command::new(binary()).arg("-commit").output().unwrap();
    assert!(commit.status.success());
    // -port N listens on all addresses, as upstream.
    let (mut child, urls, _log) = spawn(&[
        "-port".into(),
        "0".into(),
        "-isnotfc".into(),
        "-verbose".into(),
        "-cgroup-root=/sys/fs/cgroup".into(),
        "-no-cgroups".into(),
    ])
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        urls.iter().any(|u| u.starts_with("tcp://0.0.0.0:")),
        "{urls:?}"
    );
    let bad = Command::new(binary())
        .args(["-port", "http"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("-port"));
}

#[test]
fn start_command_runs_once_envd_serves() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("started");
    let cmd = format!("echo $0 > {}", marker.display());
    if !std::path::Path::new("/bin/bash").exists() {
        return skip(
            "start_command_runs_once_envd_serves",
            "/bin/bash is missing",
        );
    }
    let envd = Envd::start(&["-cmd", &cmd]);
    let mut ok = false;
    for _ in 0..200 {
        if std::fs::read_to_string(&marker).is_ok_and(|t| t.contains("bash")) {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ok, "-cmd did not run");
    // It is a process like any other, with upstream's tag.
    let list = post_json(&envd.tcp, "/process.Process/List", "{}");
    assert_eq!(list.status, 200);
    drop(envd);
}

/// Every feature the claimed version promises works, probed on the binary:
/// a claim that outruns the implementation fails here.
#[test]
fn the_claimed_version_keeps_its_promises() {
    let claimed = claimed_version();
    let dir = tempfile::tempdir().unwrap();
    let envd = vm_envd(dir.path(), None, &[]);
    let url = envd.tcp.clone();
    // (version, what it promises, probe)
    type Probe = fn(&str, &std::path::Path);
    let gates: &[((u32, u32, u32), &str, Probe)] = &[
        ((0, 5, 13), "caBundle", |url, root| {
            let body = serde_json::json!({ "caBundle": CERT }).to_string();
            let r = post_json(url, "/init", &body);
            assert_eq!(r.status, 204, "{}", r.text());
            let bundle = root.join("etc/ssl/certs/ca-certificates.crt");
            assert!(std::fs::read_to_string(bundle)
                .unwrap()
                .contains("MIIBszCC"));
        }),
        ((0, 5, 14), "volumeMounts", |url, _| {
            // Read and acted on, never ignored: a bad volume is refused.
            let body = r#"{"volumeMounts":[{"nfs_target":"nohost","path":"/mnt/v"}]}"#;
            let r = post_json(url, "/init", body);
            assert_eq!(r.status, 400, "{}", r.text());
            assert!(r.text().contains("volumeMounts"), "{}", r.text());
        }),
        ((0, 6, 2), "X-Metadata-* on uploads", |url, root| {
            let path = root.join("meta.txt");
            let q = format!("/files?path={}", path.display());
            let r = request(
                url,
                "POST",
                &q,
                &[
                    ("content-type", "application/octet-stream"),
                    ("x-metadata-owner", "alice"),
                ],
                b"x",
            );
            assert_eq!(r.status, 200, "{}", r.text());
            assert_eq!(r.json()[0]["metadata"]["owner"], "alice");
        }),
        ((0, 6, 3), "/freeze and /unfreeze", |url, _| {
            let r = request(
                url,
                "POST",
                "/freeze?maxWaitMs=100&mode=hierarchy",
                &[],
                b"",
            );
            assert_eq!(r.status, 200, "{}", r.text());
            let result = r.json();
            assert_eq!(result["mode"], "legacy");
            assert_eq!(result["requested"], 2);
            let r = request(url, "POST", "/freeze", &[], b"");
            assert_eq!(r.status, 204, "{}", r.text());
            assert_eq!(request(url, "POST", "/unfreeze", &[], b"").status, 204);
        }),
        ((0, 6, 5), "/collapse", |url, _| {
            let r = request(url, "POST", "/collapse", &[], b"");
            assert_eq!(r.status, 200, "{}", r.text());
            let c = r.json();
            let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("{k} in {c}"));
            assert_eq!(
                n("chunks"),
                n("collapsed") + n("alreadyHuge") + n("skipped")
            );
        }),
        ((0, 6, 6), "/fsfreeze and /fsthaw", |url, _| {
            // Never FIFREEZE the machine running the tests: thawing a thawed
            // filesystem is the harmless half; /fsfreeze itself is exercised
            // in the QEMU VM.
            let r = request(url, "POST", "/fsthaw", &[], b"");
            assert_eq!(r.status, 204, "{}", r.text());
        }),
        ((0, 6, 12), "/upgrade", |url, _| {
            // The route exists and checks the binary before anything else
            // (tests/upgrade.rs performs real upgrades).
            let zeros = "0".repeat(64);
            let r = request(
                url,
                "POST",
                "/upgrade",
                &[("x-envd-upgrade-sha256", zeros.as_str())],
                b"not the binary",
            );
            assert_eq!(r.status, 400, "{}", r.text());
        }),
    ];
    let mut probed = 0;
    for (version, what, probe) in gates {
        if *version <= claimed {
            eprintln!("claimed {claimed:?} promises {what} ({version:?}): probing");
            probe(&url, dir.path());
            probed += 1;
        }
    }
    assert!(
        probed >= 3,
        "the claim covers at least caBundle, volumes, metadata"
    );
    // /init and /metrics tell the same version as -version.
    let r = post_json(&url, "/init", "{}");
    let text = format!("{}.{}.{}", claimed.0, claimed.1, claimed.2);
    assert_eq!(r.header("x-envd-version"), Some(text.as_str()));
    let m = get(&url, "/metrics", None).json();
    assert_eq!(m["e2b_envd_version"], text.as_str());
    assert_eq!(m["envd_version"], env!("CARGO_PKG_VERSION"));
}

#[test]
fn init_as_the_orchestrator_sends_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::write(root.join("etc/hosts"), "127.0.0.1 localhost\n").unwrap();
    std::fs::write(
        root.join("etc/ssl/certs/ca-certificates.crt"),
        "SYSTEM CAS\n",
    )
    .unwrap();
    let mmds = FakeMmds::start(serde_json::json!({
        "instanceID": "sbx-1",
        "envID": "tpl-1",
        "teamID": "team-1",
        "address": "http://logs",
        "accessTokenHash": token_hash("tok-1"),
    }));
    let envd = vm_envd(root, Some(&mmds), &[]);
    let url = envd.tcp.clone();

    // Boot: the sandbox's identity from MMDS, as variables and files.
    let id_file = root.join("run/e2b/.E2B_SANDBOX_ID");
    let mut seen = false;
    for _ in 0..100 {
        if std::fs::read_to_string(&id_file).is_ok_and(|t| t == "sbx-1") {
            seen = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(seen, "no {}", id_file.display());
    assert_eq!(
        std::fs::read_to_string(root.join("run/e2b/.E2B_SANDBOX")).unwrap(),
        "true"
    );
    assert_eq!(
        std::fs::read_to_string(root.join("run/e2b/.E2B_TEMPLATE_ID")).unwrap(),
        "tpl-1"
    );
    let e = envs(&url, None);
    assert_eq!(e["E2B_SANDBOX"], "true");
    assert_eq!(e["E2B_SANDBOX_ID"], "sbx-1");

    // A token MMDS does not vouch for is refused, before anything changes.
    let wrong = serde_json::json!({"accessToken": "tok-x", "envVars": {"A": "1"}}).to_string();
    assert_eq!(post_json(&url, "/init", &wrong).status, 401);
    assert!(envs(&url, None).get("A").is_none());

    // The first /init, with every field. Timestamps are within the clock
    // tolerance (up to 5 s behind): this test must never set the clock.
    let t1 = &ago(4);
    let init = |token: &str, ts: &str, a: &str| {
        serde_json::json!({
            "accessToken": token,
            "envVars": {"A": a, "E2B_SANDBOX_ID": "spoofed"},
            "defaultUser": "root",
            "defaultWorkdir": "/tmp",
            "timestamp": ts,
            "hyperloopIP": "10.11.12.13",
            "caBundle": CERT,
            "lifecycleID": "life-1",
        })
        .to_string()
    };
    let r = post_json(&url, "/init", &init("tok-1", t1, "1"));
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert!(r.header("x-envd-version").is_some());
    // The token now guards everything but /health.
    assert_eq!(get(&url, "/envs", None).status, 401);
    assert_eq!(get(&url, "/health", None).status, 204);
    let e = envs(&url, Some("tok-1"));
    assert_eq!(e["A"], "1");
    assert_eq!(
        e["E2B_SANDBOX_ID"], "sbx-1",
        "envVars cannot replace envd's own"
    );
    assert_eq!(e["E2B_EVENTS_ADDRESS"], "http://10.11.12.13");
    let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
    assert!(hosts.starts_with("127.0.0.1 localhost\n"));
    assert!(hosts.contains("10.11.12.13\tevents.e2b.local"), "{hosts}");
    let ca =
        std::fs::read_to_string(root.join("usr/local/share/ca-certificates/e2b-ca.crt")).unwrap();
    assert_eq!(ca, CERT);

    // Resume: the same /init again (and again) changes nothing twice.
    let t2 = &ago(3);
    for _ in 0..2 {
        let r = post_json(&url, "/init", &init("tok-1", t2, "2"));
        assert_eq!(r.status, 204, "{}", r.text());
    }
    let hosts = std::fs::read_to_string(root.join("etc/hosts")).unwrap();
    assert_eq!(hosts.matches("events.e2b.local").count(), 1, "{hosts}");
    let bundle = std::fs::read_to_string(root.join("etc/ssl/certs/ca-certificates.crt")).unwrap();
    assert!(bundle.starts_with("SYSTEM CAS\n"));
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1, "{bundle}");
    assert_eq!(envs(&url, Some("tok-1"))["A"], "2");

    // A stale /init (older timestamp) is answered and ignored.
    let r = post_json(&url, "/init", &init("tok-1", t1, "stale"));
    assert_eq!(r.status, 204);
    assert_eq!(envs(&url, Some("tok-1"))["A"], "2");

    // A fork resumes with a new token: MMDS now vouches for it.
    mmds.set("accessTokenHash", &token_hash("tok-2"));
    let t3 = &ago(2);
    let r = request(
        &url,
        "POST",
        "/init",
        &[
            ("content-type", "application/json"),
            ("x-access-token", "tok-2"),
        ],
        init("tok-2", t3, "3").as_bytes(),
    );
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(get(&url, "/envs", Some("tok-1")).status, 401);
    assert_eq!(envs(&url, Some("tok-2"))["A"], "3");

    // Bad fields are refused whole: nothing of that /init is applied.
    let bad = serde_json::json!({
        "accessToken": "tok-2", "envVars": {"A": "4"}, "hyperloopIP": "not-an-ip"
    })
    .to_string();
    let r = post_json(&url, "/init", &bad);
    assert_eq!(r.status, 400);
    assert!(r.text().contains("hyperloopIP"), "{}", r.text());
    let bad = serde_json::json!({"accessToken": "tok-2", "caBundle": "<html>"}).to_string();
    assert_eq!(post_json(&url, "/init", &bad).status, 400);
    assert_eq!(envs(&url, Some("tok-2"))["A"], "3");
}

#[test]
fn outside_a_vm_the_system_is_left_alone() {
    let envd = Envd::start(&[]);
    let url = envd.tcp.clone();
    assert_eq!(envs(&url, None)["E2B_SANDBOX"], "false");
    for (field, body) in [
        ("hyperloopIP", r#"{"hyperloopIP":"10.0.0.1"}"#.to_owned()),
        (
            "caBundle",
            serde_json::json!({ "caBundle": CERT }).to_string(),
        ),
        (
            "volumeMounts",
            r#"{"volumeMounts":[{"nfs_target":"10.0.0.1:/v","path":"/mnt/v"}]}"#.to_owned(),
        ),
    ] {
        let r = post_json(&url, "/init", &body);
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        assert!(r.text().contains("not in a sandbox VM"), "{}", r.text());
    }
}

/// Anything root in the VM may put a FIFO (or a device) where `/init`
/// rewrites `/etc/hosts` or the CA bundle: envd refused with the file named
/// instead of waiting on the FIFO for a writer on one of its workers (which
/// took the request, and two such took envd), or reading a device forever.
#[test]
fn init_refuses_system_files_that_are_not_files() {
    let root = tempfile::tempdir().unwrap();
    let certs = root.path().join("etc/ssl/certs");
    std::fs::create_dir_all(&certs).unwrap();
    let fifo = |p: &std::path::Path| {
        nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap()
    };
    fifo(&root.path().join("etc/hosts"));
    fifo(&certs.join("ca-certificates.crt"));
    let envd = vm_envd(root.path(), None, &[]);
    for (field, body) in [
        ("hyperloopIP", r#"{"hyperloopIP":"10.0.0.1"}"#.to_owned()),
        (
            "caBundle",
            serde_json::json!({ "caBundle": CERT }).to_string(),
        ),
        // Both at once, twice over: each would have held a worker.
        (
            "hyperloopIP",
            serde_json::json!({ "hyperloopIP": "10.0.0.2", "caBundle": CERT }).to_string(),
        ),
        (
            "hyperloopIP",
            serde_json::json!({ "hyperloopIP": "10.0.0.3", "caBundle": CERT }).to_string(),
        ),
    ] {
        let t = std::time::Instant::now();
        let r = post_json(&envd.tcp, "/init", &body);
        assert_eq!(r.status, 400, "{field}: {}", r.text());
        assert!(
            r.text().contains(field) && r.text().contains("not a regular file (a FIFO)"),
            "{}",
            r.text()
        );
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{field}: {:?}",
            t.elapsed()
        );
    }
    assert_eq!(get(&envd.tcp, "/health", None).status, 204);
    // Put back as files, the same fields work.
    std::fs::remove_file(root.path().join("etc/hosts")).unwrap();
    std::fs::remove_file(certs.join("ca-certificates.crt")).unwrap();
    let body = serde_json::json!({ "hyperloopIP": "10.0.0.4", "caBundle": CERT }).to_string();
    let r = post_json(&envd.tcp, "/init", &body);
    assert_eq!(r.status, 204, "{}", r.text());
    let hosts = std::fs::read_to_string(root.path().join("etc/hosts")).unwrap();
    assert!(hosts.contains("10.0.0.4\tevents.e2b.local"), "{hosts}");
}

#[test]
fn freezing_is_refused_outside_a_vm() {
    let envd = Envd::start(&[]);
    for p in ["/freeze", "/unfreeze", "/fsfreeze", "/fsthaw"] {
        let r = request(&envd.tcp, "POST", p, &[], b"");
        assert_eq!(r.status, 403, "{p}: {}", r.text());
        assert!(r.text().contains("not in a sandbox VM"), "{}", r.text());
    }
    // envd's own heap is envd's business anywhere.
    assert_eq!(
        request(&envd.tcp, "POST", "/collapse", &[], b"").status,
        200
    );
}

fn file_len(p: &std::path::Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[test]
fn freeze_stops_the_workload_and_init_or_the_watchdog_thaws_it() {
    const NAME: &str = "freeze_stops_the_workload_and_init_or_the_watchdog_thaws_it";
    if !is_root() {
        return skip(NAME, "creating cgroups needs root");
    }
    let Some(cg) = common::cgroup::TestCgroup::create("freeze") else {
        return skip_on_this_machine(NAME, "no writable cgroup v2 hierarchy with cgroup.freeze");
    };
    let dir = tempfile::tempdir().unwrap();
    let root = cg.0.to_str().unwrap().to_owned();
    let envd = vm_envd(
        dir.path(),
        None,
        &["--cgroup-root", &root, "--thaw-watchdog", "2"],
    );
    let out = dir.path().join("ticks");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = envd.client().await;
        let script = format!("while :; do echo x >> {}; sleep 0.02; done", out.display());
        let (_stream, o) = started(&mut c, sh(&script)).await;
        let pid = o.pid;
        // The command runs in envd's user cgroup.
        let membership = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
        assert!(
            membership.contains(&format!(
                "{}/user",
                cg.0.file_name().unwrap().to_str().unwrap()
            )),
            "{membership}"
        );

        let grows = |ms: u64| {
            let before = file_len(&out);
            std::thread::sleep(Duration::from_millis(ms));
            file_len(&out) > before
        };
        assert!(grows(300), "the workload runs");
        let r = request(&envd.tcp, "POST", "/freeze?maxWaitMs=2000", &[], b"");
        assert_eq!(r.status, 200, "{}", r.text());
        let res = r.json();
        assert_eq!(
            (res["frozen"].as_u64(), res["notFrozen"].as_u64()),
            (Some(2), Some(0)),
            "{res}"
        );
        assert!(!grows(300), "a frozen workload does not run");
        // envd and its _system commands keep running while frozen.
        let mut system = sh("echo alive");
        system.tag = Some("_system".into());
        assert_eq!(run(&mut c, system).await.out(), "alive\n");

        // The resume's /init thaws.
        assert_eq!(post_json(&envd.tcp, "/init", "{}").status, 204);
        assert!(grows(300), "thawed by /init");

        // A freeze nobody undoes is undone by the watchdog (2 s here).
        let r = request(&envd.tcp, "POST", "/freeze?maxWaitMs=2000", &[], b"");
        assert_eq!(r.status, 200);
        assert!(!grows(300));
        std::thread::sleep(Duration::from_secs(2));
        assert!(grows(300), "thawed by the watchdog");
        kill(&mut c, pid).await;
    });
}

#[test]
fn localhost_servers_are_forwarded_to_the_external_address() {
    use std::io::{Read, Write};
    // The "external address" is 127.0.0.2 here (all of 127/8 is local).
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let echo = std::thread::spawn(move || {
        if let Ok((mut c, _)) = server.accept() {
            let mut buf = [0u8; 5];
            c.read_exact(&mut buf).unwrap();
            c.write_all(&buf).unwrap();
        }
        // The listener closes here: the server goes away.
    });
    let dir = tempfile::tempdir().unwrap();
    let _envd = vm_envd(dir.path(), None, &["--forward-address", "127.0.0.2"]);
    let external = format!("127.0.0.2:{port}");
    let mut conn = None;
    for _ in 0..100 {
        if let Ok(c) = std::net::TcpStream::connect(&external) {
            conn = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut conn = conn.expect("the localhost server never became reachable");
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    conn.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    conn.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"hello");
    echo.join().unwrap();
    // Gone server, gone forward (scans are 1 s apart).
    let mut stopped = false;
    for _ in 0..50 {
        if std::net::TcpStream::connect(&external).is_err() {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stopped, "still forwarding after the server went away");
}

#[test]
fn downloads_refuse_unacceptable_encodings() {
    let envd = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.txt");
    std::fs::write(&path, "hello").unwrap();
    let q = format!("/files?path={}", path.display());
    let r = request(
        &envd.tcp,
        "GET",
        &q,
        &[("accept-encoding", "br, identity;q=0")],
        b"",
    );
    assert_eq!(r.status, 406, "{}", r.text());
    let r = request(
        &envd.tcp,
        "GET",
        &q,
        &[("accept-encoding", "identity;q=0, gzip")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-encoding"), Some("gzip"));
    let r = request(&envd.tcp, "GET", &q, &[("accept-encoding", "br")], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "hello"));
}

#[test]
fn children_get_a_normal_nice_and_io_class() {
    if !is_root() {
        return skip(
            "children_get_a_normal_nice_and_io_class",
            "lowering a niced envd's children back to 0 needs root",
        );
    }
    if Command::new("ionice").arg("-V").output().is_err() {
        return skip(
            "children_get_a_normal_nice_and_io_class",
            "ionice is missing",
        );
    }
    // envd itself runs niced and in the idle I/O class, as E2B's unit sets it
    // (there: nice -20 and realtime I/O).
    let envd = Envd::start_with_ulimit(
        &[],
        "-Sn 4096 && renice -n 7 -p $$ >/dev/null && ionice -c 3 -p $$",
    );
    let own = std::fs::read_to_string(format!("/proc/{}/stat", envd.pid())).unwrap();
    let nice: i32 = own
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(16)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(nice, 7, "envd runs niced");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = rt.block_on(async {
        let mut c = envd.client().await;
        run(&mut c, sh("cut -d' ' -f19 /proc/self/stat; ionice -p $$")).await
    });
    let text = out.out();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("0"), "nice of a child: {text}");
    let io = lines.next().unwrap_or_default();
    assert!(!io.contains("idle"), "I/O class of a child: {io}");
}
