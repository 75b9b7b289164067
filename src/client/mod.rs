//! Host-side client: dial envd and get a gRPC channel for the generated
//! clients (`ProcessClient::new(channel)`, `FilesystemClient`, ...).
//!
//! URLs:
//! - `tcp://HOST:PORT`, `unix:///path`;
//! - `vsock://CID:PORT`: kernel AF_VSOCK (the host side of a VM);
//! - `hvsock:///path/to/vsock.sock:PORT`: Firecracker / Cloud Hypervisor /
//!   vhost-device-vsock "hybrid vsock": connect to the Unix socket, send
//!   `CONNECT <port>\n`, expect `OK <n>\n`, then speak HTTP/2 on the stream.

use std::io;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};

pub mod forward;
pub mod proxy;
pub mod reverse;
pub mod upgrade;

use crate::wire::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

/// Where envd is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    Unix(PathBuf),
    Vsock { cid: u32, port: u32 },
    Hybrid { socket: PathBuf, port: u32 },
}

impl std::str::FromStr for Target {
    type Err = String;

    fn from_str(url: &str) -> Result<Self, String> {
        let bad = |what: &str| format!("'{url}': {what}");
        if let Some(addr) = url.strip_prefix("tcp://") {
            Ok(Target::Tcp(addr.to_owned()))
        } else if let Some(path) = url.strip_prefix("unix://") {
            Ok(Target::Unix(PathBuf::from(path)))
        } else if let Some(rest) = url.strip_prefix("vsock://") {
            let (cid, port) = rest
                .split_once(':')
                .ok_or_else(|| bad("expected vsock://CID:PORT"))?;
            Ok(Target::Vsock {
                cid: cid.parse().map_err(|_| bad("bad CID"))?,
                port: port.parse().map_err(|_| bad("bad port"))?,
            })
        } else if let Some(rest) = url.strip_prefix("hvsock://") {
            let (path, port) = rest
                .rsplit_once(':')
                .ok_or_else(|| bad("expected hvsock:///path/vsock.sock:PORT"))?;
            Ok(Target::Hybrid {
                socket: PathBuf::from(path),
                port: port.parse().map_err(|_| bad("bad port"))?,
            })
        } else {
            Err(bad("expected tcp://, unix://, vsock:// or hvsock://"))
        }
    }
}

impl Target {
    /// One new byte stream to envd (TCP with Nagle off; hybrid vsock after
    /// its handshake).
    pub async fn connect(&self) -> io::Result<Box<dyn crate::listen::Conn>> {
        Ok(match self {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Target::Unix(path) => Box::new(UnixStream::connect(path).await?),
            Target::Vsock { cid, port } => Box::new(
                tokio_vsock::VsockStream::connect(tokio_vsock::VsockAddr::new(*cid, *port)).await?,
            ),
            Target::Hybrid { socket, port } => {
                let mut s = UnixStream::connect(socket).await?;
                hybrid_handshake(&mut s, *port).await?;
                Box::new(s)
            }
        })
    }
}

/// The hybrid-vsock handshake on a connected Unix socket.
pub async fn hybrid_handshake(s: &mut UnixStream, port: u32) -> io::Result<()> {
    s.write_all(format!("CONNECT {port}\n").as_bytes()).await?;
    let mut line = Vec::with_capacity(16);
    let mut byte = [0u8; 1];
    // Byte by byte: anything after the newline belongs to the stream.
    while line.last() != Some(&b'\n') {
        if s.read(&mut byte).await? == 0 || line.len() > 64 {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionRefused,
                "hybrid vsock: no OK (is the guest listening?)",
            ));
        }
        line.push(byte[0]);
    }
    if line.starts_with(b"OK ") {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("hybrid vsock: {:?}", String::from_utf8_lossy(&line).trim()),
        ))
    }
}

/// `ADDR:PORT` as given, or a bare `PORT` on 127.0.0.1 (the host side of
/// `envctl forward` and `envctl reverse` specs).
fn on_loopback_unless_named(addr: &str) -> String {
    if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("127.0.0.1:{addr}")
    }
}

/// Dials envd at `url`.
pub async fn dial(url: &str) -> Result<Channel, String> {
    let target: Target = url.parse()?;
    let endpoint = Endpoint::from_static("http://envd")
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    let connector = tower::service_fn(move |_: http::Uri| {
        let target = target.clone();
        async move { Ok::<_, io::Error>(TokioIo::new(target.connect().await?)) }
    });
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("cannot connect to {url}: {e}"))
}

/// Dials until envd answers a health check (a VM booting), or `timeout`.
pub async fn wait_ready(url: &str, timeout: Duration) -> Result<Channel, String> {
    let start = Instant::now();
    loop {
        let attempt = async {
            let ch = dial(url).await?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
            health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(ch)
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(ch)) => return Ok(ch),
            Ok(Err(e)) if start.elapsed() >= timeout => {
                return Err(format!("envd not ready at {url} after {timeout:?}: {e}"))
            }
            Err(_) if start.elapsed() >= timeout => {
                return Err(format!("envd not ready at {url} after {timeout:?}"))
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
