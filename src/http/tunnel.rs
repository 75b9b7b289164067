//! HTTP `CONNECT` tunnels into the VM (`envctl forward`, `curl
//! --proxytunnel`): a client that holds envd's access token asks for
//! `CONNECT 127.0.0.1:PORT`, envd connects there inside the VM and, once the
//! answer is 200, carries bytes both ways. HTTP/1.1 (one tunnel per
//! connection) and HTTP/2 (many tunnels over one connection, each a stream).
//! Only destinations the policy allows (default: guest loopback), named by
//! IP address or `localhost` (no DNS lookups on a client's behalf). With
//! `Envd-Tunnel: listen` the tunnel goes the other way: envd listens on the
//! address and answers with the next guest connection there
//! ([`super::reverse`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use super::{empty, Rest, RestResult};
use crate::connections::InFlight;
use crate::request_body::RequestBody;

/// How long connecting to the destination may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Tunnels open at once (each holds two sockets and either two pipes to
/// splice through or two 8 KiB relay buffers).
pub const MAX_TUNNELS: usize = 1024;

fn slots() -> &'static Arc<tokio::sync::Semaphore> {
    static SLOTS: std::sync::OnceLock<Arc<tokio::sync::Semaphore>> = std::sync::OnceLock::new();
    SLOTS.get_or_init(|| Arc::new(tokio::sync::Semaphore::new(MAX_TUNNELS)))
}

/// Keeps the connection counted as busy while a tunnel lives (the server
/// puts one in each CONNECT request's extensions).
#[derive(Clone, Default)]
pub struct TunnelGuard(pub Arc<Mutex<Option<InFlight>>>);

/// Which destinations tunnels may reach.
#[derive(Debug, Clone)]
pub struct TunnelPolicy {
    /// Any address at all (`--tunnel-any`); otherwise loopback only.
    pub any: bool,
}

impl TunnelPolicy {
    fn allows(&self, ip: IpAddr) -> bool {
        self.any || ip.is_loopback()
    }
}

/// `CONNECT host:port`.
pub async fn handle(req: Request<RequestBody>, policy: &TunnelPolicy) -> RestResult {
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| Rest::http(StatusCode::BAD_REQUEST, "CONNECT needs host:port"))?;
    let port = authority
        .port_u16()
        .filter(|p| *p != 0)
        .ok_or_else(|| Rest::http(StatusCode::BAD_REQUEST, "CONNECT needs a port"))?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.parse::<IpAddr>().map_err(|_| {
            Rest::http(
                StatusCode::BAD_REQUEST,
                format!("CONNECT {host}: name an IP address or localhost"),
            )
        })?
    };
    if !policy.allows(ip) {
        return Err(Rest::http(
            StatusCode::FORBIDDEN,
            format!("CONNECT to {ip} is not allowed: tunnels reach the VM's loopback only"),
        ));
    }
    let dest = SocketAddr::new(ip, port);
    let slot = slots().clone().try_acquire_owned().map_err(|_| {
        Rest::http(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_TUNNELS} tunnels are open already; close one or retry later"),
        )
    })?;
    let listen = req
        .headers()
        .get(super::reverse::HEADER)
        .is_some_and(super::reverse::asked);
    let stream = if listen {
        // A reverse tunnel: the next guest connection to `dest`.
        super::reverse::accept(dest).await?
    } else {
        tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(dest))
            .await
            .map_err(|_| {
                Rest::http(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!("{dest}: connect timed out"),
                )
            })?
            .map_err(|e| Rest::http(StatusCode::BAD_GATEWAY, format!("{dest}: {e}")))?
    };
    let _ = stream.set_nodelay(true);
    let guard = req
        .extensions()
        .get::<TunnelGuard>()
        .and_then(|g| g.0.lock().unwrap_or_else(|e| e.into_inner()).take());
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let _busy = guard;
        let _slot = slot;
        let upgraded = match upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(%dest, error = %e, "tunnel: upgrade failed");
                return;
            }
        };
        if let Err(e) = carry(upgraded, stream).await {
            tracing::debug!(%dest, error = %e, "tunnel ended with an error");
        }
    });
    tracing::debug!(%dest, "tunnel open");
    Ok(empty(StatusCode::OK))
}

/// Carries a tunnel's bytes. An HTTP/1.1 tunnel over a plain TCP or vsock
/// connection is spliced socket to socket in the kernel; an HTTP/2 tunnel (a
/// stream of a shared connection) or any other is relayed through buffers.
async fn carry(
    upgraded: hyper::upgrade::Upgraded,
    stream: tokio::net::TcpStream,
) -> std::io::Result<(u64, u64)> {
    use crate::listen::{into_socket, Socket};
    use crate::relay::splice;
    use tokio::io::AsyncWriteExt;

    let parts = match hyper_util::server::conn::auto::upgrade::downcast::<crate::server::ServedIo>(
        upgraded,
    ) {
        Ok(parts) => parts,
        Err(upgraded) => return crate::relay::relay(TokioIo::new(upgraded), stream).await,
    };
    // Out of its lingering wrapper: a tunnel half-closes and reads on.
    let mut conn = parts.io.into_inner().into_inner().into_inner();
    match splice::Pipes::new() {
        Ok(pipes) => match into_socket(conn)? {
            Socket::Plain(client) => {
                let server = std::os::fd::OwnedFd::from(stream.into_std()?);
                return splice::relay(client, server, pipes, &parts.read_buf).await;
            }
            Socket::Other(c) => conn = c,
        },
        Err(e) => tracing::debug!(error = %e, "tunnel: no pipes to splice through"),
    }
    let mut stream = stream;
    stream.write_all(&parts.read_buf).await?;
    let (up, down) = crate::relay::relay(conn, stream).await?;
    Ok((up + parts.read_buf.len() as u64, down))
}
