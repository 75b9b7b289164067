//! The outgoing side of a live upgrade (see the module documentation of
//! [`crate::handover`]).

use std::ffi::{CString, OsString};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;

use super::carry::Kept;
use super::incoming::{Report, ENV_FD};
use super::{memfd, parse_check_line, quiesce, CHECK_FLAG, SCHEMA};
use crate::auth::Auth;
use crate::defaults::Defaults;
use crate::filesystem::FilesystemService;
use crate::http::init::InitState;
use crate::process::ProcessService;
use crate::proto::envd::handover::{InitState as InitImage, Listener, State};
use crate::status::{Error, Result};

/// How long the new binary gets to answer `--handover-check`.
const CHECK_TIMEOUT: Duration = Duration::from_secs(20);
/// How long output pumps get to reach their safe point.
const QUIESCE_LIMIT: Duration = Duration::from_secs(2);

/// Which program the next image runs.
#[derive(Debug)]
pub enum Image {
    /// The program file envd was started from (re-read: it may have been
    /// replaced on disk since).
    OnDisk,
    /// An uploaded binary, in a memfd.
    Uploaded(OwnedFd),
}

#[derive(Debug)]
pub struct Upgrader {
    process: Arc<ProcessService>,
    filesystem: Arc<FilesystemService>,
    defaults: Arc<Defaults>,
    auth: Arc<Auth>,
    init: Arc<InitState>,
    listeners: Mutex<Vec<(String, RawFd)>>,
    /// The on-disk program (carried, so a memfd image still knows it).
    exe: PathBuf,
    busy: tokio::sync::Mutex<()>,
    /// What this image took over from the previous one, if anything.
    report: Mutex<Option<Report>>,
}

impl Upgrader {
    pub fn new(
        process: Arc<ProcessService>,
        filesystem: Arc<FilesystemService>,
        defaults: Arc<Defaults>,
        auth: Arc<Auth>,
        init: Arc<InitState>,
        exe: PathBuf,
    ) -> Arc<Upgrader> {
        Arc::new(Upgrader {
            process,
            filesystem,
            defaults,
            auth,
            init,
            listeners: Mutex::new(Vec::new()),
            exe,
            busy: tokio::sync::Mutex::new(()),
            report: Mutex::new(None),
        })
    }

    /// A listener the next image takes over (its fd stays open as long as
    /// envd serves it).
    pub fn add_listener(&self, url: String, fd: RawFd) {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((url, fd));
    }

    /// The listeners served, by URL.
    pub fn listeners(&self) -> Vec<(String, RawFd)> {
        self.listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_report(&self, r: Report) {
        *self.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
    }

    /// What this image took over at start (for `/init`'s `X-Envd-Handover`).
    pub fn report(&self) -> Option<Report> {
        self.report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn exe(&self) -> &PathBuf {
        &self.exe
    }

    /// One upgrade at a time: held from before a binary is received (so
    /// concurrent uploads cannot pile up in memory) until the exec.
    pub fn begin(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        self.busy
            .try_lock()
            .map_err(|_| Error::precondition("an upgrade is already in progress"))
    }

    /// Replaces envd's program image with `image`, handing everything over.
    /// Returns only if the upgrade did not happen (the old image carries on).
    pub async fn upgrade(&self, image: Image) -> Result<std::convert::Infallible> {
        let one = self.begin()?;
        self.upgrade_holding(one, image).await
    }

    /// [`Upgrader::upgrade`] with the guard of [`Upgrader::begin`] held.
    pub async fn upgrade_holding(
        &self,
        _one: tokio::sync::MutexGuard<'_, ()>,
        image: Image,
    ) -> Result<std::convert::Infallible> {
        let (exec_path, check_path) = match &image {
            Image::OnDisk => (self.exe.clone(), self.exe.clone()),
            Image::Uploaded(fd) => (
                PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd())),
                PathBuf::from(format!(
                    "/proc/{}/fd/{}",
                    std::process::id(),
                    fd.as_raw_fd()
                )),
            ),
        };
        let version = self.check(&check_path).await?;
        tracing::info!(to = %version, program = %exec_path.display(), "live upgrade: handing over");
        let last_init = self.init.hold().await;
        crate::sd::reloading();
        let process = self.process.clone();
        if !quiesce::begin(QUIESCE_LIMIT, || process.wake_outputs()).await {
            quiesce::end();
            crate::sd::ready();
            return Err(Error::precondition(
                "output pumps did not stop in time; the upgrade was called off",
            ));
        }
        // What is queued for systemd (a command's store or removal) would
        // die with this image. Not waited for beyond a second: systemd may
        // not be reading at all.
        let flushing = std::time::Instant::now();
        while !crate::sd::flush(std::time::Duration::ZERO) {
            if flushing.elapsed() >= std::time::Duration::from_secs(1) {
                tracing::warn!("live upgrade: notifications for systemd still queued are lost");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        let started = std::time::Instant::now();
        let result = self
            .process
            .reaper()
            .paused(QUIESCE_LIMIT, || {
                let mut kept = Kept::default();
                let state = self.state(&mut kept, *last_init);
                let bytes = state.encode_to_vec();
                let fd = memfd::with(c"envd-handover", &bytes)
                    .map_err(|e| Error::io("write the handover state", &e))?;
                let state_fd = kept.keep_fd(&fd);
                if state_fd < 0 {
                    return Err(Error::internal("cannot keep the handover state open"));
                }
                tracing::info!(
                    commands = state.commands.len(),
                    fds = kept.len(),
                    bytes = bytes.len(),
                    snapshot_us = started.elapsed().as_micros(),
                    "live upgrade: executing the new image"
                );
                let _ = std::io::stderr().flush();
                exec(&exec_path, state_fd)
            })
            .await;
        // Only a failed exec (or a spawn that would not finish) gets here.
        drop(last_init);
        quiesce::end();
        crate::sd::ready();
        let e = match result {
            Some(result) => result
                .err()
                .unwrap_or_else(|| Error::internal("exec returned")),
            None => Error::precondition(
                "a command's start did not finish in time (its working directory or program \
                 may be on a stalled mount); the upgrade was called off",
            ),
        };
        tracing::error!(error = %e.message, "live upgrade failed; the old image carries on");
        Err(e)
    }

    /// Runs `path --handover-check`: the binary must run here and read the
    /// state this image writes.
    async fn check(&self, path: &std::path::Path) -> Result<String> {
        let shown = path.display().to_string();
        let run = self
            .process
            .run_system(&[shown.as_str(), CHECK_FLAG], CHECK_TIMEOUT)
            .await
            .map_err(|e| {
                Error::precondition(format!(
                    "the new binary cannot be started here ({}); the old image carries on",
                    e.message
                ))
            })?;
        let parsed = parse_check_line(&run.output).filter(|_| run.exit_code == 0);
        let Some((reads, version)) = parsed else {
            return Err(Error::precondition(format!(
                "the new binary is not an envd that supports live upgrade (exit code {}, said {:?}); \
                 the old image carries on",
                run.exit_code,
                run.output.chars().take(200).collect::<String>()
            )));
        };
        if reads < SCHEMA {
            return Err(Error::precondition(format!(
                "downgrade refused: the new binary (envd {version}) reads handover schemas up to \
                 {reads}, and this envd writes schema {SCHEMA}"
            )));
        }
        Ok(version)
    }

    fn state(&self, kept: &mut Kept, last_init: Option<i128>) -> State {
        let listeners = self
            .listeners
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(url, fd)| Listener {
                url: url.clone(),
                fd: kept.keep(Some(*fd)),
                fd_name: String::new(),
            })
            .collect();
        let (commands, next_seq) = self.process.handover_image(kept);
        State {
            schema: SCHEMA,
            from_version: env!("CARGO_PKG_VERSION").to_owned(),
            listeners,
            commands,
            init: Some(InitImage {
                access_token: self.auth.current(),
                default_user: self.defaults.user(),
                default_workdir: self.defaults.workdir(),
                env_vars: self.defaults.init_envs().into_iter().collect(),
                last_init_ns: last_init.and_then(|t| i64::try_from(t).ok()),
            }),
            watchers: self.filesystem.watchers_image(),
            next_seq,
            crash_record: false,
            exe_path: self.exe.display().to_string(),
            temporaries: crate::filesystem::hidden::list(),
            kept_pipes: crate::process::linger::carry(kept),
        }
    }
}

/// execve of `path` with envd's own arguments and environment, plus the
/// state fd and the systemd variables. Returns only on failure.
fn exec(path: &std::path::Path, state_fd: i32) -> Result<()> {
    let cstr = |b: Vec<u8>| CString::new(b).map_err(|_| Error::internal("NUL in an argument"));
    let prog = cstr(path.as_os_str().to_owned().into_vec())?;
    let argv: Vec<CString> = std::env::args_os()
        .map(|a| cstr(a.into_vec()))
        .collect::<Result<_>>()?;
    let mut env: Vec<(OsString, OsString)> =
        std::env::vars_os().filter(|(k, _)| k != ENV_FD).collect();
    env.extend(
        crate::sd::exec_env()
            .into_iter()
            .map(|(k, v)| (k.into(), v.into())),
    );
    env.push((ENV_FD.into(), state_fd.to_string().into()));
    let envp: Vec<CString> = env
        .into_iter()
        .map(|(k, v)| {
            let mut kv = k.into_vec();
            kv.push(b'=');
            kv.extend(v.into_vec());
            cstr(kv)
        })
        .collect::<Result<_>>()?;
    let mut argv_p: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_p.push(std::ptr::null());
    let mut envp_p: Vec<*const libc::c_char> = envp.iter().map(|e| e.as_ptr()).collect();
    envp_p.push(std::ptr::null());
    crate::logging::flush();
    // SAFETY: every pointer is to a NUL-terminated string kept alive by
    // `prog`, `argv` and `envp` for the duration of the call, and both arrays
    // end with NULL. On success the call does not return.
    unsafe { libc::execve(prog.as_ptr(), argv_p.as_ptr(), envp_p.as_ptr()) };
    Err(Error::io(
        format!("execute {}", path.display()),
        &std::io::Error::last_os_error(),
    ))
}
