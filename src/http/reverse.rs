//! Reverse tunnels (`envctl reverse`): a service on the host made reachable
//! inside a VM that has no network device. The host keeps a few requests
//! `CONNECT 127.0.0.1:PORT` with `Envd-Tunnel: listen` waiting; envd listens
//! on the guest's 127.0.0.1:PORT and answers one waiting request (200) for
//! each connection a guest client makes there, whose bytes then go through
//! that tunnel. Every connection is still opened by the host, under envd's
//! token and the same address policy as forward tunnels; a guest connection
//! that arrives while no request waits stays in the listener's backlog.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::StatusCode;
use tokio::net::{TcpListener, TcpStream};

use super::Rest;

/// The request header that turns a CONNECT into a reverse tunnel.
pub const HEADER: &str = "envd-tunnel";
/// Addresses listened on at once.
const MAX_LISTENERS: usize = 64;
/// Requests waiting on one address at once.
const MAX_WAITING: usize = 256;
/// How long a listener stays after its last waiting request went away: the
/// host asks again after each connection, and a guest client connecting in
/// between waits in the backlog instead of being refused.
const LINGER: Duration = Duration::from_secs(10);

/// Whether `value` (of [`HEADER`]) asks for a reverse tunnel.
pub fn asked(value: &http::HeaderValue) -> bool {
    value.as_bytes().eq_ignore_ascii_case(b"listen")
}

struct Shared {
    listener: TcpListener,
    /// Changed under the list's lock only.
    state: Mutex<State>,
}

struct State {
    /// Requests waiting on the listener.
    waiting: usize,
    /// When the last waiting request went.
    idle_since: Instant,
    /// A task waits to remove the listener once it has been idle for
    /// [`LINGER`] (one per listener, however often requests come and go).
    lingering: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The addresses listened on (at most [`MAX_LISTENERS`]: a list is enough).
static LISTENERS: Mutex<Vec<(SocketAddr, Arc<Shared>)>> = Mutex::new(Vec::new());

fn listeners() -> MutexGuard<'static, Vec<(SocketAddr, Arc<Shared>)>> {
    lock(&LISTENERS)
}

/// One waiting request; the last to leave sets the listener's linger going.
struct Waiting {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Waiting {
    fn enter(addr: SocketAddr) -> Result<Waiting, Rest> {
        let mut list = listeners();
        let shared = match list.iter().find(|(a, _)| *a == addr) {
            Some((_, s)) => s.clone(),
            None => {
                if list.len() >= MAX_LISTENERS {
                    return Err(Rest::http(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{MAX_LISTENERS} reverse tunnel addresses are in use already"),
                    ));
                }
                let s = Arc::new(Shared {
                    listener: bind(addr)?,
                    state: Mutex::new(State {
                        waiting: 0,
                        idle_since: Instant::now(),
                        lingering: false,
                    }),
                });
                list.push((addr, s.clone()));
                tracing::debug!(%addr, "reverse tunnel: listening");
                s
            }
        };
        let mut state = lock(&shared.state);
        if state.waiting >= MAX_WAITING {
            return Err(Rest::http(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_WAITING} requests wait on {addr} already"),
            ));
        }
        state.waiting += 1;
        drop(state);
        Ok(Waiting { addr, shared })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let _list = listeners();
        let mut state = lock(&self.shared.state);
        state.waiting -= 1;
        if state.waiting > 0 {
            return;
        }
        state.idle_since = Instant::now();
        if state.lingering {
            return;
        }
        // Outside a runtime (envd shutting down) the listener goes with envd.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        state.lingering = true;
        runtime.spawn(linger(self.addr, Arc::downgrade(&self.shared)));
    }
}

/// Removes the listener once no request has waited on it for [`LINGER`],
/// or ends when one waits again.
async fn linger(addr: SocketAddr, shared: Weak<Shared>) {
    loop {
        let until = {
            let mut list = listeners();
            let Some(s) = shared.upgrade() else {
                return;
            };
            let mut state = lock(&s.state);
            if state.waiting > 0 {
                state.lingering = false;
                return;
            }
            let until = state.idle_since + LINGER;
            if Instant::now() >= until {
                list.retain(|(_, l)| !Arc::ptr_eq(l, &s));
                tracing::debug!(%addr, "reverse tunnel: no longer listening");
                return;
            }
            until
        };
        tokio::time::sleep_until(until.into()).await;
    }
}

/// A listening socket on `addr` (std's bind sets `SO_REUSEADDR`, so the
/// address is free again at once after a previous listener, but never
/// shared with a live one).
fn bind(addr: SocketAddr) -> Result<TcpListener, Rest> {
    let bound = std::net::TcpListener::bind(addr).and_then(|l| {
        l.set_nonblocking(true)?;
        TcpListener::from_std(l)
    });
    bound.map_err(|e| {
        let status = if e.kind() == std::io::ErrorKind::AddrInUse {
            StatusCode::CONFLICT
        } else {
            StatusCode::BAD_GATEWAY
        };
        Rest::http(status, format!("cannot listen on {addr} in the VM: {e}"))
    })
}

/// Waits for the next guest connection to `addr` (listening there first if
/// no request does yet). Dropped before one comes, it takes none.
pub async fn accept(addr: SocketAddr) -> Result<TcpStream, Rest> {
    let waiting = Waiting::enter(addr)?;
    let (stream, _) = waiting
        .shared
        .listener
        .accept()
        .await
        .map_err(|e| Rest::http(StatusCode::BAD_GATEWAY, format!("{addr}: accept: {e}")))?;
    Ok(stream)
}
