//! Turns a `StartRequest` into a prepared clone/exec: user, environment,
//! working directory, program path and stdio (pipes or a pty).

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::Mode;
use tokio::net::unix::pipe;

use super::pty::Pty;
use super::spawn::{resolve_program, ChildStdio, Credentials, Prepared};
use super::started::Input;
use super::supervise::OutputFds;
use crate::paths;
use crate::proto::process::StartRequest;
use crate::status::{Error, Result};
use crate::users::User;

/// PATH for children when envd itself has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Terminal size when a pty is asked for without one.
const DEFAULT_PTY: (u32, u32) = (80, 24);

/// A command ready to start, and envd's ends of its stdio.
#[derive(Debug)]
pub struct Launch {
    pub prepared: Prepared,
    pub input: Input,
    pub output: OutputFds,
}

pub fn prepare(
    req: &StartRequest,
    user: &User,
    global_envs: &BTreeMap<String, String>,
    default_workdir: Option<&str>,
) -> Result<Launch> {
    let config = req
        .process
        .as_ref()
        .ok_or_else(|| Error::invalid("process (cmd, args, envs, cwd) is required"))?;
    if config.cmd.is_empty() {
        return Err(Error::invalid("process.cmd is empty"));
    }
    let cwd = working_dir(
        config
            .cwd
            .as_deref()
            .filter(|c| !c.is_empty())
            .or(default_workdir),
        user,
    )?;
    let envs = environment(user, global_envs, &config.envs);
    let path = envs
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map_or(DEFAULT_PATH, |(_, v)| v.as_str());
    let program = resolve_program(&config.cmd, path);
    let creds = credentials(user)?;

    let (stdio, input, output) = match &req.pty {
        Some(pty) => {
            let (cols, rows) = pty.size.map_or(DEFAULT_PTY, |s| (s.cols, s.rows));
            let (master, slave) = Pty::open(cols, rows)?;
            let master = Arc::new(master);
            let dup = |fd: &OwnedFd| {
                fd.try_clone()
                    .map_err(|e| Error::io("duplicate pty fd", &e))
            };
            let stdio = ChildStdio {
                stdin: dup(&slave)?,
                stdout: dup(&slave)?,
                stderr: slave,
                controlling_tty: true,
            };
            (
                stdio,
                Input::Pty(std::sync::Mutex::new(Some(master.clone()))),
                OutputFds::Pty(master),
            )
        }
        None => {
            let (out_r, out_w) = new_pipe(End::Read)?;
            let (err_r, err_w) = new_pipe(End::Read)?;
            let (stdin, input) = if req.stdin.unwrap_or(true) {
                let (r, w) = new_pipe(End::Write)?;
                (r, Input::Pipe(super::started::StdinPipe::new(w)))
            } else {
                // openat: musl's open() follows O_CLOEXEC with an fcntl
                // of its own (for kernels before 2.6.23), one system call
                // more per Start.
                let null = openat(
                    AT_FDCWD,
                    "/dev/null",
                    OFlag::O_RDONLY | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                .map_err(Error::from)?;
                (null, Input::Null)
            };
            let rx = |fd| {
                pipe::Receiver::from_owned_fd_unchecked(fd)
                    .map_err(|e| Error::io("output pipe", &e))
            };
            let output = OutputFds::Pipes {
                stdout: rx(out_r)?,
                stderr: rx(err_r)?,
            };
            let stdio = ChildStdio {
                stdin,
                stdout: out_w,
                stderr: err_w,
                controlling_tty: false,
            };
            (stdio, input, output)
        }
    };
    let prepared = Prepared::new(
        &config.cmd,
        program,
        &config.args,
        &envs,
        &cwd,
        creds,
        stdio,
    )?;
    Ok(Launch {
        prepared,
        input,
        output,
    })
}

/// Which end of a pipe envd keeps.
enum End {
    Read,
    Write,
}

/// A pipe `(read, write)` whose `envd`'s end is non-blocking (as tokio
/// needs it) and whose child's end is blocking (as programs expect their
/// stdio): both are made so at once, without tokio's checks of an fd of
/// unknown kind (an fstat and two fcntls per pipe on every Start).
fn new_pipe(envd: End) -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| Error::io("create pipe", &e.into()))?;
    let child = match envd {
        End::Read => &w,
        End::Write => &r,
    };
    // F_SETFL with no flags clears O_NONBLOCK (the access mode is not a
    // status flag: it stays).
    nix::fcntl::fcntl(child, nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()))
        .map_err(|e| Error::io("create pipe", &e.into()))?;
    Ok((r, w))
}

/// `cwd` as given (E2B path rules; else the default workdir), or the user's
/// home (or `/` without one).
fn working_dir(cwd: Option<&str>, user: &User) -> Result<PathBuf> {
    // One stat of the directory used (the home is the common case).
    let (dir, meta) = match cwd {
        Some(c) if !c.is_empty() => {
            let dir = paths::resolve(c, user)?;
            let meta = std::fs::metadata(&dir);
            (dir, meta)
        }
        _ => match std::fs::metadata(&user.home) {
            Ok(m) if m.is_dir() => (user.home.clone(), Ok(m)),
            _ => (PathBuf::from("/"), std::fs::metadata("/")),
        },
    };
    match meta {
        Ok(m) if m.is_dir() => {
            check_searchable(&dir, &m, user)?;
            Ok(dir)
        }
        Ok(_) => Err(Error::invalid(format!(
            "cwd '{}' is not a directory",
            dir.display()
        ))),
        Err(_) => Err(Error::invalid(format!(
            "cwd '{}' does not exist",
            dir.display()
        ))),
    }
}

/// The user must be able to enter the directory (checked from mode bits; the
/// child's own `chdir` as the user is the final word).
fn check_searchable(dir: &Path, m: &std::fs::Metadata, user: &User) -> Result<()> {
    if user.uid == 0 {
        return Ok(());
    }
    let mode = m.mode();
    let ok = if m.uid() == user.uid {
        mode & 0o100 != 0
    } else if user.groups.contains(&m.gid()) || m.gid() == user.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    };
    if ok {
        Ok(())
    } else {
        Err(Error::permission(format!(
            "user '{}' cannot enter cwd '{}'",
            user.name,
            dir.display()
        )))
    }
}

/// A clean base (PATH, HOME, USER, LOGNAME), then the global environment, then
/// the request's `envs`. Later entries win.
fn environment(
    user: &User,
    global: &BTreeMap<String, String>,
    request: &std::collections::HashMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned());
    env.insert("PATH".into(), path);
    env.insert("HOME".into(), user.home.to_string_lossy().into_owned());
    env.insert("USER".into(), user.name.clone());
    env.insert("LOGNAME".into(), user.name.clone());
    env.extend(global.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(request.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.into_iter().collect()
}

/// Credentials for the child: always set when envd is root; when envd is not
/// root it can only start processes as itself.
fn credentials(user: &User) -> Result<Option<Credentials>> {
    let me = nix::unistd::geteuid().as_raw();
    if me == 0 {
        return Ok(Some(Credentials {
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
        }));
    }
    if user.uid == me {
        return Ok(None);
    }
    Err(Error::permission(format!(
        "envd runs as uid {me} and cannot start processes as user '{}'",
        user.name
    )))
}
