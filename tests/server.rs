//! What every listener offers besides the services: gRPC reflection (what
//! `grpcurl -plaintext HOST:PORT list` uses) and the standard health service.

mod common;

use common::*;
use futures_util::StreamExt;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test]
async fn reflection_lists_every_service_on_tcp_and_unix() {
    let envd = Envd::start(&[]);
    for url in [&envd.tcp, &envd.unix] {
        let ch = envd::client::dial(url).await.unwrap();
        let mut r = ServerReflectionClient::new(ch);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut s = r
            .server_reflection_info(futures_util::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let Some(MessageResponse::ListServicesResponse(list)) =
            s.next().await.unwrap().unwrap().message_response
        else {
            panic!("no service list");
        };
        let mut names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        names.sort();
        for want in [
            "envd.transfer.Transfer",
            "filesystem.Filesystem",
            "grpc.health.v1.Health",
            "process.Process",
        ] {
            assert!(
                names.iter().any(|n| n == want),
                "{want} missing from {names:?} on {url}"
            );
        }
    }
}

#[tokio::test]
async fn health_reports_serving() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let envd = Envd::start(&[]);
    let mut h = HealthClient::new(envd::client::dial(&envd.tcp).await.unwrap());
    for service in ["", "process.Process", "filesystem.Filesystem"] {
        let r = h
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.status, 1, "{service:?} is not SERVING");
    }
}

/// envd's stderr on a terminal (as on a VM's serial console) whose output
/// is stopped (XOFF): every write to it blocks, as on a console nobody
/// drains. Requests must go on, lines beyond the queue are dropped and
/// counted, and once the terminal runs again the queued lines come out.
#[tokio::test]
async fn a_stopped_console_does_not_stall_requests() {
    use envd::proto::process::process_client::ProcessClient;
    use nix::sys::termios::{tcflow, FlowArg};
    use std::io::Read;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    let pty = nix::pty::openpty(None, None).unwrap();
    let mut child = std::process::Command::new(binary())
        .args(["--listen", "tcp://127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(pty.slave.try_clone().unwrap()))
        .spawn()
        .unwrap();
    let seen = Arc::new(Mutex::new(String::new()));
    let seen2 = seen.clone();
    let mut master = std::fs::File::from(pty.master);
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen2
                .lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    // Without the colour escapes a terminal gets.
    let text = || {
        let raw = seen.lock().unwrap().clone();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' {
                for e in chars.by_ref() {
                    if e == 'm' {
                        break;
                    }
                }
            } else {
                out.push(ch);
            }
        }
        out
    };
    assert!(
        eventually(Duration::from_secs(20), || text().contains("envd ready")).await,
        "{}",
        text()
    );
    let url = text()
        .split_whitespace()
        .find_map(|w| w.strip_prefix("url=").map(str::to_owned))
        .unwrap();
    let mut c = ProcessClient::new(envd::client::dial(&url).await.unwrap());

    tcflow(&pty.slave, FlowArg::TCOOFF).unwrap();
    // More Starts (each logs a line) than the queue holds.
    let all = async {
        for _ in 0..400 {
            assert_eq!(run(&mut c, cmd("/bin/true", &[])).await.end().exit_code, 0);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), all)
        .await
        .expect("requests stalled behind a stopped console");
    let before = text().matches("process started").count();
    tcflow(&pty.slave, FlowArg::TCOON).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || text()
            .contains("log lines dropped"))
        .await,
        "{}",
        text()
    );
    let after = text().matches("process started").count();
    assert!(after > before, "queued lines came out: {before} -> {after}");
    assert!(after < 400, "lines beyond the queue were dropped: {after}");
    let _ = child.kill();
    let _ = child.wait();
}
