//! The envd binary: flags, logging, listeners, then serve until told to stop.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::signal::unix::{signal, Signal, SignalKind};

use envd::auth::Auth;
use envd::config::Config;
use envd::connections::Connections;
use envd::defaults::Defaults;
use envd::filesystem::FilesystemService;
use envd::goflags::Invocation;
use envd::listen::Listener;
use envd::process::{ProcessService, Reaper};
use envd::users::User;
use envd::{init, logging, sd, server};

/// How long an idle blocking thread lives (tokio's default is 10 s).
const BLOCKING_KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The static (musl) build uses mimalloc: musl's allocator has one global lock
/// and maps/unmaps every large buffer, which made transfers 3-5x slower.
#[cfg(target_env = "musl")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Freed memory goes back to the OS after 50 ms instead of mimalloc's default
/// 1 s: long enough that buffers in flight are reused (0 ms halved transfer
/// throughput), short enough that peak RSS follows what is really in flight.
fn tune_allocator() {
    #[cfg(target_env = "musl")]
    const PURGE_DELAY_MS: std::ffi::c_long = 50;
    // `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (the bindings
    // name only some options; `mi_option_eager_commit_delay` = 14 precedes it).
    #[cfg(target_env = "musl")]
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    #[cfg(target_env = "musl")]
    // SAFETY: setting a documented mimalloc option to a valid value; it is
    // read whenever mimalloc decides to purge.
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS)
    };
}

fn main() -> ExitCode {
    tune_allocator();
    if std::env::args().nth(1).as_deref() == Some(envd::handover::CHECK_FLAG) {
        println!("{}", envd::handover::check_line());
        return ExitCode::SUCCESS;
    }
    let pid1 = init::is_pid1();
    // A live upgrade's next image: the machine is set up already.
    let handover = envd::handover::incoming::take_env();
    if pid1 && handover.is_none() {
        init::mount_basics();
        init::protect_links();
        init::loopback_up();
    }
    sd::take_env();
    ensure_std_fds();
    let start = envd::config::Start::detect(pid1);
    let (cfg, modules) = if pid1 {
        // No flags reach PID 1: options come from the kernel command line.
        let (args, modules) = init::cmdline();
        let argv = std::iter::once("envd".to_owned()).chain(args);
        let cfg = Config::try_parse_from(argv).unwrap_or_else(|e| {
            eprintln!("envd(init): bad envd.* options ({e}); using defaults");
            Config::parse_from(["envd", "--listen", init::PID1_DEFAULT_LISTEN])
        });
        (cfg, modules)
    } else {
        match envd::goflags::translate(std::env::args().skip(1).collect()) {
            Ok(Invocation::Serve(args)) => {
                let argv = std::iter::once("envd".to_owned()).chain(args);
                (Config::parse_from(argv), Vec::new())
            }
            Ok(Invocation::PrintVersion) => {
                println!("{}", envd::compat::claimed_text());
                return ExitCode::SUCCESS;
            }
            Ok(Invocation::PrintCommit) => {
                println!("{}", option_env!("ENVD_COMMIT").unwrap_or("unknown"));
                return ExitCode::SUCCESS;
            }
            Err(e) => {
                eprintln!("envd: {e}");
                return ExitCode::from(2);
            }
        }
    };
    logging::init(&cfg);
    if pid1 {
        tracing::info!("running as PID 1");
        if handover.is_none() {
            init::load_modules(&modules);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // An idle blocking thread (Starts and filesystem work run on them)
        // exits after a second, not tokio's ten: its stack and heap go back
        // soon after a burst.
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .on_thread_park(envd::memory::on_worker_park)
        .on_thread_stop(envd::memory::on_thread_stop)
        .build()
    {
        Ok(rt) => rt,
        Err(e) if pid1 => {
            eprintln!("envd(init): cannot start the async runtime: {e}");
            init::power_off(Duration::from_secs(5));
        }
        Err(e) => {
            eprintln!("envd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(run(cfg, start, handover))
    }));
    if pid1 {
        match &result {
            Ok(Ok(())) => init::power_off(Duration::from_secs(5)),
            Ok(Err(e)) => tracing::error!("{e}"),
            Err(_) => tracing::error!("envd panicked"),
        }
        // A fresh image of envd keeps the machine and its commands alive
        // (they are its children still, and reaped as orphans); only after
        // repeated failures does the machine power off.
        init::reexec_or_power_off();
    }
    let code = match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("{e}");
            eprintln!("envd: {e}");
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::FAILURE,
    };
    logging::flush();
    code
}

/// fds 0-2 must be open so that no pipe or socket envd creates lands on them
/// (children get their stdio by dup2 onto 0-2).
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on any integer is harmless; it only reports EBADF.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            // SAFETY: opening /dev/null with a static C string; the lowest
            // free fd is the one just found closed.
            unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
        }
    }
}

async fn run(cfg: Config, start: envd::config::Start, handover: Option<i32>) -> Result<(), String> {
    let pid1 = start.pid1;
    // Signal handlers first: a caller may be served (and signal envd, e.g.
    // SIGHUP to upgrade) as soon as a listener is up, and a signal that
    // arrives before its handler would act by default (SIGHUP kills).
    let mut signals = Signals::install().map_err(|e| e.to_string())?;
    let (before, nofile) = envd::limits::raise_nofile();
    let conns = Connections::new(cfg.conn_limits(nofile));
    tokio::spawn(envd::memory::give_back_when_quiet());
    envd::process::stall::watch();
    tracing::info!(
        nofile_before = before,
        nofile,
        max_connections = conns.limits().max,
        "open-file limit"
    );
    envd::body::set_timeout(Duration::from_secs(cfg.body_timeout));
    envd::filesystem::inotify::Hub::global()
        .set_max(usize::try_from(cfg.max_watches).unwrap_or(usize::MAX));
    // A live upgrade's state, or else what a crashed envd left in systemd's
    // fd store.
    let mut incoming = match handover {
        Some(fd) => Some(envd::handover::incoming::Incoming::load(fd)),
        None => envd::handover::crash::recover(),
    };
    let adopt = incoming.as_ref().map(|i| i.pids()).unwrap_or_default();
    let (reaper, mut exits) = Reaper::start_adopting(&adopt)
        .map_err(|e| format!("cannot start the child reaper: {e}"))?;
    let default_user = match &cfg.default_user {
        Some(u) => {
            User::lookup(u).map_err(|e| format!("--default-user: {e}"))?;
            u.clone()
        }
        None => User::current().map_err(|e| e.to_string())?.name,
    };
    let defaults = Arc::new(Defaults::new(default_user));
    let process = Arc::new(ProcessService::new(
        reaper,
        defaults.clone(),
        cfg.process_settings(),
    ));
    let filesystem = Arc::new(FilesystemService::new(
        cfg.filesystem_settings(),
        defaults.clone(),
    ));
    let auth = Arc::new(Auth::new(cfg.access_token()?));
    let in_vm = cfg.in_vm(start);
    let guest = envd::guest::start(&cfg, start, defaults.clone(), process.clone())?;
    let init_state = Arc::new(envd::http::init::InitState::new(guest));
    let exe = incoming
        .as_ref()
        .map(|i| i.state.exe_path.clone())
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| "/proc/self/exe".into());
    let upgrader = envd::handover::Upgrader::new(
        process.clone(),
        filesystem.clone(),
        defaults.clone(),
        auth.clone(),
        init_state.clone(),
        exe,
    );
    if let Some(inc) = incoming.as_mut() {
        take_over(
            inc,
            &process,
            &filesystem,
            &defaults,
            &auth,
            &init_state,
            &mut exits,
        )
        .await;
        upgrader.set_report(inc.report.clone());
    }
    let router = server::Router::new(
        process.clone(),
        filesystem,
        defaults.clone(),
        auth.clone(),
        init_state,
        upgrader.clone(),
    )
    .await?;

    for url in cfg.listeners(start) {
        let carried = incoming.as_mut().and_then(|i| i.listener(&url.to_string()));
        listen(url, carried, pid1, &router, &conns, &upgrader).await?;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        e2b_version = envd::compat::claimed_text(),
        in_vm,
        "envd ready"
    );
    // Start-up work is done: its heap and code pages need not stay resident.
    envd::memory::give_back();
    if let Some(inc) = incoming.as_mut() {
        inc.drop_unused_listeners();
        inc.release_unclaimed_store_fds();
    }
    envd::handover::crash::enable(
        process.clone(),
        auth,
        defaults,
        upgrader.listeners(),
        upgrader.exe().display().to_string(),
    );
    if let Some(inc) = incoming.as_mut() {
        let r = &inc.report;
        tracing::info!(
            from = %r.from_version,
            commands = r.procs,
            failed = r.procs_failed,
            ended = r.retained,
            watchers = r.watchers,
            lost = ?r.lost,
            "took over from the previous envd image"
        );
    }
    // The start command runs once per boot, not again after a live upgrade.
    if let Some(cmd) = cfg.start_cmd.as_ref().filter(|_| incoming.is_none()) {
        if let Err(e) = process.start_command(cmd).await {
            tracing::error!(error = %e.message, "-cmd: cannot start the command");
        }
    }
    sd::ready();

    signals.until_shutdown(pid1, &upgrader).await;
    sd::stopping();
    Ok(())
}

/// Serves `url` on a listener carried over from the previous image, or else
/// a new one. As PID 1 a listener that cannot be bound yet is retried in the
/// background (the vsock device may appear later); otherwise it is fatal.
async fn listen(
    url: envd::listen::ListenUrl,
    carried: Option<std::os::fd::OwnedFd>,
    pid1: bool,
    router: &server::Router,
    conns: &Arc<Connections>,
    upgrader: &Arc<envd::handover::Upgrader>,
) -> Result<(), String> {
    let bound = match carried.map(|fd| Listener::adopt(&url, fd)) {
        Some(Ok(l)) => Ok(l),
        Some(Err(e)) => {
            tracing::warn!(%url, error = %e, "carried listener unusable; binding anew");
            Listener::bind(&url).await
        }
        None => Listener::bind(&url).await,
    };
    match bound {
        Ok(listener) => {
            let local = listener.local_url(&url);
            upgrader.add_listener(url.to_string(), listener.raw_fd());
            tracing::info!(url = %local, "listening");
            tokio::spawn(server::serve(
                listener,
                local,
                router.clone(),
                conns.clone(),
            ));
            Ok(())
        }
        Err(e) if pid1 => {
            tracing::error!(%url, error = %e, "cannot listen yet; retrying every second");
            tokio::spawn(bind_later(url, router.clone(), conns.clone()));
            Ok(())
        }
        Err(e) => Err(format!("cannot listen on {url}: {e}")),
    }
}

/// The signals envd acts on.
struct Signals {
    term: Signal,
    int: Signal,
    usr1: Signal,
    usr2: Signal,
    pwr: Signal,
    hup: Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            // As PID 1, busybox's `poweroff`/`halt` send SIGUSR2/SIGUSR1, and
            // the kernel SIGPWR: all mean shut down.
            usr1: signal(SignalKind::user_defined1())?,
            usr2: signal(SignalKind::user_defined2())?,
            pwr: signal(SignalKind::from_raw(libc::SIGPWR))?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns once envd is to shut down: SIGTERM or SIGINT, or as PID 1
    /// also SIGUSR1, SIGUSR2 and SIGPWR. SIGHUP starts a live upgrade.
    async fn until_shutdown(&mut self, pid1: bool, upgrader: &Arc<envd::handover::Upgrader>) {
        loop {
            let name = tokio::select! {
                _ = self.hup.recv() => {
                    // SIGHUP: live upgrade to the program file envd was
                    // started from (replace it on disk, then signal).
                    tracing::info!(program = %upgrader.exe().display(), "SIGHUP: live upgrade");
                    let u = upgrader.clone();
                    tokio::spawn(async move {
                        let Err(e) = u.upgrade(envd::handover::Image::OnDisk).await;
                        tracing::error!(error = %e.message, "SIGHUP: live upgrade refused");
                    });
                    continue;
                }
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.usr1.recv() => "SIGUSR1",
                _ = self.usr2.recv() => "SIGUSR2",
                _ = self.pwr.recv() => "SIGPWR",
            };
            if pid1 || matches!(name, "SIGTERM" | "SIGINT") {
                tracing::info!("{name}: shutting down");
                return;
            }
            tracing::info!("{name} ignored (not PID 1)");
        }
    }
}

/// Takes over what the previous envd image handed over: `/init` state,
/// commands, polling watchers.
async fn take_over(
    inc: &mut envd::handover::incoming::Incoming,
    process: &ProcessService,
    filesystem: &FilesystemService,
    defaults: &Defaults,
    auth: &Auth,
    init_state: &envd::http::init::InitState,
    exits: &mut std::collections::HashMap<i32, envd::process::reaper::ExitWatch>,
) {
    if let Some(i) = inc.state.init.take() {
        auth.set(i.access_token);
        if !i.default_user.is_empty() {
            defaults.set_user(i.default_user);
        }
        defaults.set_workdir(i.default_workdir);
        defaults.set_envs(i.env_vars.into_iter().collect());
        init_state.restore_last(i.last_init_ns);
    }
    inc.adopt_commands(process, exits);
    inc.adopt_kept_pipes();
    envd::filesystem::hidden::remove_left(std::mem::take(&mut inc.state.temporaries));
    let watchers = std::mem::take(&mut inc.state.watchers);
    inc.report.watchers = watchers.len();
    inc.report.watchers_failed = filesystem.restore_watchers(watchers).await;
}

async fn bind_later(url: envd::listen::ListenUrl, router: server::Router, conns: Arc<Connections>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Ok(listener) = Listener::bind(&url).await {
            let local = listener.local_url(&url);
            tracing::info!(url = %local, "listening");
            server::serve(listener, local, router, conns).await;
            return;
        }
    }
}
