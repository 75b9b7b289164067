//! The envd binary: flags, logging, listeners, then serve until told to stop.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};

use envd::auth::Auth;
use envd::config::Config;
use envd::defaults::Defaults;
use envd::filesystem::FilesystemService;
use envd::listen::Listener;
use envd::process::{ProcessService, Reaper};
use envd::users::User;
use envd::{logging, server};

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
    ensure_std_fds();
    let cfg = Config::parse();
    logging::init(&cfg);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envd: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("envd: {e}");
            ExitCode::FAILURE
        }
    }
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

async fn run(cfg: Config) -> Result<(), String> {
    let reaper = Reaper::start().map_err(|e| format!("cannot start the child reaper: {e}"))?;
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
        defaults,
        cfg.process_settings(),
    ));
    let filesystem = Arc::new(FilesystemService::new(cfg.filesystem_settings()));
    let auth = Arc::new(Auth::new(cfg.access_token()?));
    let router = server::Router::new(process, filesystem, auth).await?;

    let mut bound = Vec::new();
    for url in cfg.listeners() {
        let listener = Listener::bind(&url)
            .await
            .map_err(|e| format!("cannot listen on {url}: {e}"))?;
        let local = listener.local_url(&url);
        tracing::info!(url = %local, "listening");
        bound.push((listener, local));
    }
    for (listener, local) in bound {
        tokio::spawn(server::serve(listener, local, router.clone()));
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), "envd ready");

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    Ok(())
}
