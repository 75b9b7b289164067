//! The official E2B SDKs (Python e2b==2.63.0, JS e2b@2.51.0) in debug mode
//! against the real envd. `make test` installs them (`make sdk-deps`).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run_suite(program: &str, args: &[&str], cwd: &Path, envd: &Envd) {
    let work = tempfile::Builder::new()
        .prefix("envd-sdk-")
        .tempdir()
        .unwrap();
    let url = envd.tcp.replace("tcp://", "http://");
    let out = Command::new(program)
        .args(args)
        .arg(&url)
        .arg(work.path())
        .current_dir(cwd)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{program} suite failed:\n{stdout}\nenvd log:\n{}",
        envd.log.lock().unwrap().join("\n")
    );
    assert!(stdout.contains(" passed, 0 failed"), "{stdout}");
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn python_sdk_suite() {
    let python = root().join(".cache/sdk-venv/bin/python");
    if !python.exists() {
        skip(
            "python_sdk_suite",
            "no SDK virtualenv; run `make sdk-deps` (make test does)",
        );
        return;
    }
    let envd = Envd::start(&[]);
    run_suite(
        python.to_str().unwrap(),
        &["tests/sdk/python_suite.py"],
        root(),
        &envd,
    );
}

#[test]
fn js_sdk_suite() {
    let js = root().join("tests/sdk/js");
    if !js.join("node_modules/e2b").exists()
        || Command::new("node").arg("--version").output().is_err()
    {
        skip(
            "js_sdk_suite",
            "node or tests/sdk/js/node_modules missing; run `make sdk-deps` (make test does)",
        );
        return;
    }
    let envd = Envd::start(&[]);
    run_suite("node", &["suite.mjs"], &js, &envd);
}

/// grpc-core sends a Unix socket's path as `:authority`; envd must serve it.
#[test]
fn grpcio_over_unix_socket() {
    let python = root().join(".cache/sdk-venv/bin/python");
    let has_grpc = python.exists()
        && Command::new(&python)
            .args(["-c", "import grpc"])
            .status()
            .is_ok_and(|s| s.success());
    if !has_grpc {
        skip(
            "grpcio_over_unix_socket",
            "no grpcio in the SDK virtualenv; run `make sdk-deps` (make test does)",
        );
        return;
    }
    let envd = Envd::start(&[]);
    let file = tempfile::NamedTempFile::new().unwrap();
    let out = Command::new(&python)
        .arg("tests/sdk/grpcio_unix.py")
        .arg(&envd.unix)
        .arg(file.path())
        .current_dir(root())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("3 passed, 0 failed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
