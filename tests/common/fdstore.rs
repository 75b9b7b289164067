//! A stand-in for systemd's side of the notify protocol, so envd's crash
//! re-adoption runs on a machine without systemd: it receives `FDSTORE=1`
//! (with the fds) and `FDSTOREREMOVE=1` on a datagram socket, keeps the fds
//! as systemd does (one entry per open file), and starts envd again with
//! them as `$LISTEN_FDS`/`$LISTEN_FDNAMES`. (The real systemd is driven by
//! the QEMU test.)
#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

pub struct FdStore {
    pub socket: std::path::PathBuf,
    entries: Arc<Mutex<Vec<(String, OwnedFd)>>>,
    _dir: tempfile::TempDir,
}

fn identity(fd: &OwnedFd) -> Option<(u64, u64)> {
    let st = nix::sys::stat::fstat(fd).ok()?;
    Some((st.st_dev, st.st_ino))
}

impl FdStore {
    pub fn new() -> FdStore {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("notify");
        let sock = UnixDatagram::bind(&socket).unwrap();
        let entries: Arc<Mutex<Vec<(String, OwnedFd)>>> = Arc::default();
        let e = entries.clone();
        std::thread::spawn(move || loop {
            let mut buf = vec![0u8; 4096];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 16]);
            let mut iov = [std::io::IoSliceMut::new(&mut buf)];
            let Ok(msg) = recvmsg::<UnixAddr>(
                sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            ) else {
                return;
            };
            let mut fds = Vec::new();
            for c in msg.cmsgs().into_iter().flatten() {
                if let ControlMessageOwned::ScmRights(v) = c {
                    for fd in v {
                        // SAFETY: received with SCM_RIGHTS: a new fd we own.
                        fds.push(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
                    }
                }
            }
            let n = msg.bytes;
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            let name = text
                .lines()
                .find_map(|l| l.strip_prefix("FDNAME="))
                .unwrap_or("stored")
                .to_owned();
            let mut store = e.lock().unwrap();
            if text.lines().any(|l| l == "FDSTOREREMOVE=1") {
                store.retain(|(n, _)| *n != name);
            } else if text.lines().any(|l| l == "FDSTORE=1") {
                for fd in fds {
                    let id = identity(&fd);
                    if !store.iter().any(|(_, f)| identity(f) == id) {
                        store.push((name.clone(), fd));
                    }
                }
            }
        });
        FdStore {
            socket,
            entries,
            _dir: dir,
        }
    }

    /// `f` of the stored fd named `name`, if there is one.
    pub fn with_fd<R>(&self, name: &str, f: impl FnOnce(&OwnedFd) -> R) -> Option<R> {
        let store = self.entries.lock().unwrap();
        store.iter().find(|(n, _)| n == name).map(|(_, fd)| f(fd))
    }

    /// How many stored fds of commands (names `c...`) are of `kind`: 'i'
    /// a pipe stored as stdin (its own name, `c<seq>i`), 'o' any other pipe
    /// (stdout, stderr), 't' a pty master, 'p' anything else (a pidfd).
    pub fn command_fds(&self, kind: char) -> usize {
        let store = self.entries.lock().unwrap();
        store
            .iter()
            .filter(|(n, _)| n.starts_with('c'))
            .filter(|(n, fd)| {
                let Ok(st) = nix::sys::stat::fstat(fd) else {
                    return false;
                };
                let found = match st.st_mode & libc::S_IFMT {
                    libc::S_IFIFO if n.ends_with('i') => 'i',
                    libc::S_IFIFO => 'o',
                    libc::S_IFCHR => 't',
                    _ => 'p',
                };
                found == kind
            })
            .count()
    }

    /// Renames each stored fd for which `rename` gives a new name.
    pub fn rename(&self, rename: impl Fn(&str, &OwnedFd) -> Option<String>) {
        for (n, fd) in self.entries.lock().unwrap().iter_mut() {
            if let Some(new) = rename(n, fd) {
                *n = new;
            }
        }
    }

    pub fn names(&self) -> Vec<String> {
        self.entries
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// envd with `args`, told about this store, and handed what it holds
    /// (the returned fds are the parent's copies, to close once spawned).
    pub fn command(&self, args: &[String]) -> (Command, Vec<i32>) {
        let store = self.entries.lock().unwrap();
        let names: Vec<String> = store.iter().map(|(n, _)| n.clone()).collect();
        let fds: Vec<i32> = store
            .iter()
            .map(|(_, f)| nix::unistd::dup(f).unwrap().into_raw_fd_compat())
            .collect();
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg("LISTEN_PID=$$ exec \"$0\" \"$@\"")
            .arg(super::binary())
            .args(args)
            .env("NOTIFY_SOCKET", &self.socket)
            .env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        if fds.is_empty() {
            cmd.env_remove("LISTEN_FDS").env_remove("LISTEN_FDNAMES");
        }
        let parent = fds.clone();
        let high: i32 = 1000;
        // SAFETY: between fork and exec only dup2/close/fcntl run, which are
        // async-signal-safe; `fds` is moved in and only read.
        unsafe {
            cmd.pre_exec(move || {
                for (i, fd) in fds.iter().enumerate() {
                    let i = i32::try_from(i).unwrap_or(0);
                    if libc::dup2(*fd, high + i) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, _) in fds.iter().enumerate() {
                    let i = i32::try_from(i).unwrap_or(0);
                    if libc::dup2(high + i, 3 + i) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::close(high + i);
                }
                Ok(())
            });
        }
        (cmd, parent)
    }

    pub fn spawn(&self, args: &[String]) -> (Child, Vec<String>, super::Log) {
        let (cmd, copies) = self.command(args);
        let r = super::spawn_command(cmd);
        for fd in copies {
            // SAFETY: closes the parent's own duplicates made above.
            unsafe { libc::close(fd) };
        }
        r.unwrap_or_else(|e| panic!("envd: {e}"))
    }
}

trait IntoRawCompat {
    fn into_raw_fd_compat(self) -> i32;
}

impl IntoRawCompat for OwnedFd {
    fn into_raw_fd_compat(self) -> i32 {
        std::os::fd::IntoRawFd::into_raw_fd(self)
    }
}
