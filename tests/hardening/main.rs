//! Regression tests for the hardening issue: each test reproduces one way a
//! caller or a process inside the sandbox could crash envd, exhaust it or
//! corrupt data, against the real binary over real sockets.

mod answers;
#[path = "../common/mod.rs"]
mod common;
mod files;
mod links;
mod processes;
mod requests;
mod stalls;
mod trees;
mod watches;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::{addr, post_json, request, Reply};
use common::*;
use envd::proto::filesystem::*;
use envd::proto::process::*;
use envd::proto::transfer::ReadFileRequest;
use futures_util::StreamExt;

fn s(p: &Path) -> String {
    p.display().to_string()
}

/// envd still answers `/health` (and so has not crashed or stalled).
fn healthy(e: &Envd) {
    let r = request(&e.tcp, "GET", "/health", &[], b"");
    assert_eq!(r.status, 204, "envd no longer answers /health");
}

fn rss_kib(pid: u32) -> u64 {
    common::procfs::status_kib(pid, "VmRSS:")
}

/// The anonymous part of `pid`'s resident memory (heap and stacks, not the
/// binary's pages), in KiB.
fn anon_kib(pid: u32) -> u64 {
    common::procfs::status_kib(pid, "RssAnon:")
}

/// A new empty directory `name` in a temporary directory (kept while the
/// returned guard lives).
fn empty_dir(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::create_dir(&path).unwrap();
    (dir, path)
}

/// A Connect JSON ListDir of `dir` sent on a new connection whose receive
/// buffer is as small as the kernel allows (the answer stays in envd).
fn list_unread(e: &Envd, dir: &Path) -> TcpStream {
    let c = TcpStream::connect(addr(&e.tcp)).unwrap();
    nix::sys::socket::setsockopt(&c, nix::sys::socket::sockopt::RcvBuf, &4096).unwrap();
    let body = format!(r#"{{"path":"{}","depth":1}}"#, dir.display());
    (&c).write_all(
        format!(
            "POST /filesystem.Filesystem/ListDir HTTP/1.1\r\nhost: envd\r\n\
             content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .unwrap();
    c
}

/// fds of `pid` whose link target contains `what`.
fn fds_like(pid: u32, what: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|t| t.to_string_lossy().contains(what))
        .count()
}

fn upload(e: &Envd, path_query: &str, body: &[u8]) -> Reply {
    request(
        &e.tcp,
        "POST",
        &format!("/files?path={path_query}"),
        &[("content-type", "application/octet-stream")],
        body,
    )
}

/// What [`Envd::start_in`] runs envd in for [`bind_in`]: a mount namespace
/// of its own.
const OWN_MOUNTS: &[&str] = &["unshare", "--mount", "--propagation", "private"];

/// Bind-mounts `from` on `onto` in the mount namespace of `e` (started in
/// [`OWN_MOUNTS`]): only envd and what it starts see the mount.
fn bind_in(e: &Envd, from: &Path, onto: &Path) {
    let status = std::process::Command::new("nsenter")
        .args(["-t", &e.pid().to_string(), "-m", "mount", "--bind"])
        .arg(from)
        .arg(onto)
        .status()
        .unwrap();
    assert!(status.success(), "cannot mount {from:?} on {onto:?}");
}

fn entries(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir).ok().map(|d| d.count())
}
