//! The envctl CLI against the real envd.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;

fn envctl(envd: &Envd, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_envctl"))
        .arg("--url")
        .arg(&envd.unix)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn run_exits_with_the_commands_code_and_streams_output() {
    let envd = Envd::start(&[]);
    let out = envctl(
        &envd,
        &["run", "sh", "-c", "echo out; echo err >&2; exit 5"],
    );
    assert_eq!(out.status.code(), Some(5));
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    // Any signal, like a shell: 128 + its number.
    for (sig, n) in [("TERM", 15), ("INT", 2), ("USR1", 10), ("KILL", 9)] {
        let script = format!("kill -{sig} $$");
        let out = envctl(&envd, &["run", "sh", "-c", &script]);
        assert_eq!(out.status.code(), Some(128 + n), "SIG{sig}");
    }
}

#[test]
fn cp_both_ways_ls_stat_ps_kill() {
    let envd = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.bin");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&src, &data).unwrap();
    let remote = format!(":{}/remote/copy.bin", dir.path().display());
    assert!(envctl(&envd, &["cp", src.to_str().unwrap(), &remote])
        .status
        .success());
    let back = dir.path().join("back.bin");
    assert!(envctl(&envd, &["cp", &remote, back.to_str().unwrap()])
        .status
        .success());
    assert_eq!(std::fs::read(&back).unwrap(), data);
    let ls = envctl(&envd, &["ls", &format!("{}/remote", dir.path().display())]);
    assert!(String::from_utf8_lossy(&ls.stdout).contains("copy.bin"));
    let stat = envctl(&envd, &["stat", &remote[1..]]);
    assert!(String::from_utf8_lossy(&stat.stdout).contains("3000000"));
    assert!(
        !envctl(&envd, &["cp", "a", "b"]).status.success(),
        "cp with no remote side must fail"
    );

    let mut sleeper = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["--url", &envd.unix, "run", "sleep", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = (0..100)
        .find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(50));
            let ps = String::from_utf8_lossy(&envctl(&envd, &["ps"]).stdout).into_owned();
            ps.lines()
                .find(|l| l.contains("sleep"))
                .map(|l| l.split_whitespace().next().unwrap().to_owned())
        })
        .expect("sleep not listed by ps");
    assert!(envctl(&envd, &["kill", &pid, "--signal", "TERM"])
        .status
        .success());
    assert_eq!(sleeper.wait().unwrap().code(), Some(128 + 15));
}

#[test]
fn exec_on_a_pty() {
    let envd = Envd::start(&[]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args(["--url", &envd.unix, "exec", "-i", "-t", "sh"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"tty; exit 7\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("/dev/pts/"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

// Names come from the sandbox: a file named with an escape sequence (here
// one that sets the terminal's title and rings its bell, and a newline)
// must reach the host's terminal escaped, not obeyed.
#[test]
fn listings_show_control_characters_escaped() {
    let envd = Envd::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let name = "evil\x1b]0;owned\x07\nname";
    std::fs::write(dir.path().join(name), b"x").unwrap();
    let ls = envctl(&envd, &["ls", dir.path().to_str().unwrap()]);
    assert!(ls.status.success());
    let out = String::from_utf8_lossy(&ls.stdout).into_owned();
    assert!(
        !out.contains('\x1b') && !out.contains('\x07'),
        "raw control characters reached the terminal: {out:?}"
    );
    assert!(
        out.contains("evil\\x1b]0;owned\\x07\\nname"),
        "the name is not shown escaped: {out:?}"
    );
    assert_eq!(
        out.lines().count(),
        1,
        "a name's newline made a line: {out:?}"
    );
    // An error naming such a path is escaped too.
    let missing = dir.path().join("gone\x1b[2J");
    let stat = envctl(&envd, &["stat", missing.to_str().unwrap()]);
    assert!(!stat.status.success());
    let err = String::from_utf8_lossy(&stat.stderr).into_owned();
    assert!(
        !err.contains('\x1b') && err.contains("gone\\x1b[2J"),
        "{err:?}"
    );
}
