//! `envctl proxy`: any TCP (or Unix socket) client on the host reaches envd
//! in a VM that may have no network at all: each accepted connection is
//! carried over a new connection to envd (vsock, hybrid vsock, Unix or TCP),
//! byte for byte in both directions (see `crate::relay`: a client's
//! half-close reaches envd; envd closing ends the client's connection).

use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};

use super::Target;
use crate::listen::Conn;

/// Connections carried at once; beyond it new ones wait to be accepted.
const MAX_CONNECTIONS: usize = 1024;

/// Where the proxy listens.
pub enum Local {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Local {
    /// Binds `url` (`tcp://HOST:PORT` or `unix:///PATH`).
    pub async fn bind(url: &str) -> Result<(Local, String), String> {
        if let Some(addr) = url.strip_prefix("tcp://") {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("cannot listen on {url}: {e}"))?;
            let bound = format!("tcp://{}", l.local_addr().map_err(|e| e.to_string())?);
            Ok((Local::Tcp(l), bound))
        } else if let Some(path) = url.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
            let l = UnixListener::bind(path).map_err(|e| format!("cannot listen on {url}: {e}"))?;
            Ok((Local::Unix(l), url.to_owned()))
        } else {
            Err(format!("'{url}': the proxy listens on tcp:// or unix://"))
        }
    }

    async fn accept(&self) -> std::io::Result<Box<dyn Conn>> {
        Ok(match self {
            Local::Tcp(l) => {
                let (s, _) = l.accept().await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Local::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// Serves until the process ends.
pub async fn serve(local: Local, target: Target) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let target = Arc::new(target);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut inbound = match local.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "proxy: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let target = target.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut outbound = match target.connect().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "proxy: cannot reach envd");
                    return;
                }
            };
            if let Err(e) = crate::relay::relay(&mut inbound, &mut outbound).await {
                tracing::debug!(error = %e, "proxy: connection ended with an error");
            }
        });
    }
}
