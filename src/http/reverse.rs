//! Reverse tunnels (`envctl reverse`): a service on the host made reachable
//! inside a VM that has no network device. The host keeps a few requests
//! `CONNECT 127.0.0.1:PORT` with `Envd-Tunnel: listen` waiting; envd listens
//! on the guest's 127.0.0.1:PORT and answers one waiting request (200) for
//! each connection a guest client makes there, whose bytes then go through
//! that tunnel. Every connection is still opened by the host, under envd's
//! token and the same address policy as forward tunnels; a guest connection
//! that arrives while no request waits stays in the listener's backlog.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

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
    /// Requests waiting on it; changed under the list's lock only.
    waiting: AtomicUsize,
}

/// The addresses listened on (at most [`MAX_LISTENERS`]: a list is enough).
static LISTENERS: Mutex<Vec<(SocketAddr, Arc<Shared>)>> = Mutex::new(Vec::new());

fn listeners() -> MutexGuard<'static, Vec<(SocketAddr, Arc<Shared>)>> {
    LISTENERS.lock().unwrap_or_else(|e| e.into_inner())
}

fn find(list: &[(SocketAddr, Arc<Shared>)], addr: SocketAddr) -> Option<usize> {
    list.iter().position(|(a, _)| *a == addr)
}

/// One waiting request; leaving schedules the listener's removal once no
/// request waits on it any more.
struct Waiting {
    addr: SocketAddr,
    shared: Arc<Shared>,
}

impl Waiting {
    fn enter(addr: SocketAddr) -> Result<Waiting, Rest> {
        let mut list = listeners();
        let shared = match find(&list, addr) {
            Some(i) => list[i].1.clone(),
            None => {
                if list.len() >= MAX_LISTENERS {
                    return Err(Rest::http(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!("{MAX_LISTENERS} reverse tunnel addresses are in use already"),
                    ));
                }
                let listener = bind(addr)?;
                let s = Arc::new(Shared {
                    listener,
                    waiting: AtomicUsize::new(0),
                });
                list.push((addr, s.clone()));
                tracing::debug!(%addr, "reverse tunnel: listening");
                s
            }
        };
        if shared.waiting.load(Ordering::Relaxed) >= MAX_WAITING {
            return Err(Rest::http(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{MAX_WAITING} requests wait on {addr} already"),
            ));
        }
        shared.waiting.fetch_add(1, Ordering::Relaxed);
        Ok(Waiting { addr, shared })
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        let _list = listeners();
        if self.shared.waiting.fetch_sub(1, Ordering::Relaxed) != 1 {
            return;
        }
        let (addr, shared) = (self.addr, Arc::downgrade(&self.shared));
        // Outside a runtime (envd shutting down) the listener goes with envd.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            tokio::time::sleep(LINGER).await;
            let mut list = listeners();
            let idle = find(&list, addr).filter(|&i| {
                let s = &list[i].1;
                shared.upgrade().is_some_and(|w| Arc::ptr_eq(s, &w))
                    && s.waiting.load(Ordering::Relaxed) == 0
            });
            if let Some(i) = idle {
                list.swap_remove(i);
                tracing::debug!(%addr, "reverse tunnel: no longer listening");
            }
        });
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
