//! systemd integration without a dependency: `READY=1` on `$NOTIFY_SOCKET`
//! once every listener is bound, watchdog pings at half of `$WATCHDOG_USEC`,
//! and the file-descriptor store (`FDSTORE=1`, handed back as `$LISTEN_FDS`
//! after a restart). The variables are taken out of envd's environment at
//! start-up, so they never reach a child either way. Messages leave through
//! [`outbox`], which never waits for systemd.

mod outbox;

use std::os::unix::net::UnixDatagram;
use std::sync::OnceLock;
use std::time::Duration;

struct Notify {
    socket: String,
    watchdog: Option<Duration>,
    /// `$WATCHDOG_USEC` as given, for the next image of a live upgrade.
    watchdog_usec: Option<String>,
}

static NOTIFY: OnceLock<Option<Notify>> = OnceLock::new();
/// The fds systemd handed over at start (`$LISTEN_FDS`), by name.
static LISTEN: OnceLock<Vec<(String, std::os::fd::RawFd)>> = OnceLock::new();

/// Reads and removes the systemd variables. Call before any thread exists.
pub fn take_env() {
    let socket = std::env::var("NOTIFY_SOCKET").ok();
    let watchdog_usec = std::env::var("WATCHDOG_USEC").ok();
    let watchdog = watchdog_usec.as_deref().and_then(|u| u.parse::<u64>().ok());
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    let listen_for_us = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        == Some(std::process::id());
    let count: i32 = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|_| listen_for_us)
        .unwrap_or(0)
        .clamp(0, 65_536);
    let names = std::env::var("LISTEN_FDNAMES").unwrap_or_default();
    let mut names = names.split(':');
    let _ = LISTEN.set(
        (0..count)
            .map(|i| (names.next().unwrap_or("unknown").to_owned(), 3 + i))
            .collect(),
    );
    for v in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        // SAFETY: single-threaded at this point (start of main).
        unsafe { std::env::remove_var(v) };
    }
    let _ = NOTIFY.set(socket.map(|socket| Notify {
        socket,
        watchdog: watchdog.filter(|_| for_us).map(Duration::from_micros),
        watchdog_usec: watchdog_usec.filter(|_| for_us),
    }));
}

/// Whether a notify socket was given (systemd supervises envd).
pub fn supervised() -> bool {
    matches!(NOTIFY.get(), Some(Some(_)))
}

/// The fds systemd handed over at start, with their names.
pub fn listen_fds() -> &'static [(String, std::os::fd::RawFd)] {
    LISTEN.get().map_or(&[], Vec::as_slice)
}

/// Puts `fd` into systemd's file-descriptor store under `name` (systemd
/// keeps one entry per open file, so storing the same one again is a no-op).
pub fn store_fd(name: &str, fd: std::os::fd::RawFd) -> std::io::Result<()> {
    store_fds(name, &[fd])
}

/// Puts `fds` into the store, all under `name`, in one message.
pub fn store_fds(name: &str, fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    send_with_fds(&format!("FDSTORE=1\nFDNAME={name}"), fds)
}

/// Removes every fd stored under `name`.
pub fn remove_fds(name: &str) {
    send(&format!("FDSTOREREMOVE=1\nFDNAME={name}"));
}

/// The one socket envd sends its notifications from (a socket per message
/// cost two more system calls each, and a command's start and end send
/// eight or so under a crash record), with the address they go to; `None`
/// when systemd does not supervise envd or the socket cannot be made.
fn notifier() -> Option<&'static outbox::Outbox> {
    static SOCKET: OnceLock<Option<outbox::Outbox>> = OnceLock::new();
    SOCKET
        .get_or_init(|| {
            let Some(Some(n)) = NOTIFY.get() else {
                return None;
            };
            let addr = match n.socket.strip_prefix('@') {
                Some(name) => nix::sys::socket::UnixAddr::new_abstract(name.as_bytes()),
                None => nix::sys::socket::UnixAddr::new(n.socket.as_str()),
            };
            match (UnixDatagram::unbound(), addr) {
                (Ok(sock), Ok(addr)) => Some(outbox::Outbox::new(sock, addr)),
                (Err(e), _) => {
                    tracing::warn!(error = %e, "no socket for sd_notify");
                    None
                }
                (_, Err(e)) => {
                    tracing::warn!(socket = n.socket, error = %e, "bad NOTIFY_SOCKET");
                    None
                }
            }
        })
        .as_ref()
}

/// Sends `state` with `fds` now, or queues it (see [`outbox`]): never waits
/// for systemd.
fn send_with_fds(state: &str, fds: &[std::os::fd::RawFd]) -> std::io::Result<()> {
    match notifier() {
        Some(o) => o.send(state, fds),
        None => Ok(()),
    }
}

/// Waits at most `limit` until the notifications queued for systemd are
/// sent (before a live upgrade's exec, which would lose them); whether they
/// were.
pub fn flush(limit: Duration) -> bool {
    notifier().is_none_or(|o| o.flush(limit))
}

fn send(state: &str) {
    if let Err(e) = send_with_fds(state, &[]) {
        tracing::warn!(error = %e, "sd_notify failed");
    }
}

/// Tells systemd envd is ready, and starts watchdog pings if asked for.
pub fn ready() {
    send("READY=1");
    static PINGING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if let Some(Some(Notify {
        watchdog: Some(every),
        ..
    })) = NOTIFY.get()
    {
        if PINGING.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let period = *every / 2;
        tracing::info!(?period, "systemd watchdog enabled");
        tokio::spawn(async move {
            loop {
                send("WATCHDOG=1");
                tokio::time::sleep(period).await;
            }
        });
    }
}

/// Tells systemd envd is replacing its program image (live upgrade); the
/// next image says `READY=1` again. Its main PID does not change.
pub fn reloading() {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let usec = i128::from(now.tv_sec) * 1_000_000 + i128::from(now.tv_nsec) / 1000;
    send(&format!("RELOADING=1\nMONOTONIC_USEC={usec}"));
}

/// The systemd variables the next image of a live upgrade needs (they were
/// taken out of envd's environment at start).
pub fn exec_env() -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Some(Some(n)) = NOTIFY.get() {
        v.push(("NOTIFY_SOCKET".to_owned(), n.socket.clone()));
        if let Some(w) = &n.watchdog_usec {
            v.push(("WATCHDOG_USEC".to_owned(), w.clone()));
            v.push(("WATCHDOG_PID".to_owned(), std::process::id().to_string()));
        }
    }
    v
}

/// Tells systemd envd is stopping.
pub fn stopping() {
    send("STOPPING=1");
}
