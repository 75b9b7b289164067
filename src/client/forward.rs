//! `envctl forward`: a host port that reaches a port on the VM's loopback,
//! through envd over any transport (vsock included): each connection opens
//! its own HTTP/1.1 `CONNECT 127.0.0.1:PORT` tunnel to envd.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::Target;
use crate::listen::Conn;

/// Largest answer head envd sends to a CONNECT.
const MAX_HEAD: usize = 8192;
/// Tunnels carried at once per forward.
const MAX_CONNECTIONS: usize = 1024;

/// One `[HOST_ADDR:]HOST_PORT:GUEST_PORT` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub listen: String,
    pub guest_port: u16,
}

impl std::str::FromStr for Spec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (host_part, guest) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("'{s}': expected [HOST_ADDR:]HOST_PORT:GUEST_PORT"))?;
        let guest_port: u16 = guest
            .parse()
            .map_err(|_| format!("'{s}': bad guest port"))?;
        Ok(Spec {
            listen: super::on_loopback_unless_named(host_part),
            guest_port,
        })
    }
}

/// Why a tunnel did not open.
#[derive(Debug)]
pub enum Refused {
    /// envd answered with this status; the status line.
    Status(u16, String),
    /// envd could not be reached, or the exchange broke off.
    Failed(String),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Status(_, line) => write!(f, "envd refused the tunnel: {line}"),
            Refused::Failed(e) => f.write_str(e),
        }
    }
}

/// Opens a tunnel to `127.0.0.1:port` in the VM: the stream after envd's
/// 200, and any bytes of the guest's that came with the answer.
pub async fn open(
    target: &Target,
    port: u16,
    token: Option<&str>,
) -> Result<(Box<dyn Conn>, Vec<u8>), String> {
    tunnel(target, port, token, false)
        .await
        .map_err(|e| e.to_string())
}

/// Asks envd for a tunnel to the VM's `127.0.0.1:port`, or with `listen`
/// for the next guest connection to it (a reverse tunnel, see
/// `crate::http::reverse`; the answer comes when one arrives).
pub async fn tunnel(
    target: &Target,
    port: u16,
    token: Option<&str>,
    listen: bool,
) -> Result<(Box<dyn Conn>, Vec<u8>), Refused> {
    let failed = |e: std::io::Error| Refused::Failed(e.to_string());
    let mut s = target
        .connect()
        .await
        .map_err(|e| Refused::Failed(format!("cannot reach envd: {e}")))?;
    let mut head = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n");
    if let Some(t) = token {
        head.push_str(&format!("X-Access-Token: {t}\r\n"));
    }
    if listen {
        head.push_str(&format!("{}: listen\r\n", crate::http::reverse::HEADER));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.map_err(failed)?;
    let mut buf = Vec::with_capacity(512);
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > MAX_HEAD {
            return Err(Refused::Failed(
                "envd's answer to CONNECT is too long".into(),
            ));
        }
        let mut chunk = [0u8; 1024];
        let n = s.read(&mut chunk).await.map_err(failed)?;
        if n == 0 {
            return Err(Refused::Failed(
                "envd closed the connection before answering CONNECT".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let status_line = String::from_utf8_lossy(&buf[..end]);
    let first = status_line.lines().next().unwrap_or("").to_owned();
    match first.split_whitespace().nth(1).map(str::parse::<u16>) {
        Some(Ok(200)) => Ok((s, buf.split_off(end))),
        Some(Ok(code)) => Err(Refused::Status(code, first)),
        _ => Err(Refused::Failed(format!(
            "envd's answer to CONNECT: {first}"
        ))),
    }
}

/// Serves one forward until the process ends.
pub async fn serve(spec: Spec, target: Arc<Target>, token: Option<String>) -> Result<(), String> {
    let listener = TcpListener::bind(&spec.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", spec.listen))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    eprintln!(
        "envctl: forwarding {local} to the VM's 127.0.0.1:{}",
        spec.guest_port
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let token = token.map(Arc::new);
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (mut client, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "forward: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = client.set_nodelay(true);
        let (target, token) = (target.clone(), token.clone());
        let port = spec.guest_port;
        tokio::spawn(async move {
            let _permit = permit;
            match open(&target, port, token.as_deref().map(String::as_str)).await {
                Ok((mut tunnel, early)) => {
                    if !early.is_empty() && client.write_all(&early).await.is_err() {
                        return;
                    }
                    let _ = crate::relay::relay(&mut client, &mut tunnel).await;
                }
                Err(e) => eprintln!("envctl: forward to port {port}: {e}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Spec;

    #[test]
    fn specs() {
        let s: Spec = "8080:80".parse().unwrap();
        assert_eq!((s.listen.as_str(), s.guest_port), ("127.0.0.1:8080", 80));
        let s: Spec = "0.0.0.0:8080:3000".parse().unwrap();
        assert_eq!(s.listen, "0.0.0.0:8080");
        assert!("80".parse::<Spec>().is_err());
        assert!("a:b".parse::<Spec>().is_err());
    }
}
