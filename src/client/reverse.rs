//! `envctl reverse`: a service on the host (a package cache, a model
//! server) reachable on the VM's loopback, through envd over any transport
//! (vsock included). A few reverse tunnels wait at envd at all times (see
//! `crate::http::reverse`); each guest connection takes one, and a new one
//! takes its place.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::forward::{tunnel, Refused};
use super::Target;

/// Tunnels waiting at envd per spec: guest connections made at once beyond
/// these wait (in the guest's listen backlog) until one is replaced.
const WAITING: usize = 4;
/// Guest connections carried at once per spec.
const MAX_CONNECTIONS: usize = 1024;
/// The pause before asking again after envd could not be reached.
const RETRY: Duration = Duration::from_secs(1);

/// One `GUEST_PORT:[HOST_ADDR:]HOST_PORT` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub guest_port: u16,
    pub host: String,
}

impl std::str::FromStr for Spec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}': expected GUEST_PORT:[HOST_ADDR:]HOST_PORT");
        let (guest, host) = s.split_once(':').ok_or_else(bad)?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        if guest_port == 0 {
            return Err(bad());
        }
        Ok(Spec {
            guest_port,
            host: super::on_loopback_unless_named(host),
        })
    }
}

/// Serves one spec until the process ends; an error when envd refuses it
/// (the guest port is taken, or not allowed).
pub async fn serve(spec: Spec, target: Arc<Target>, token: Option<String>) -> Result<(), String> {
    eprintln!(
        "envctl: the VM's 127.0.0.1:{} reaches {} on the host",
        spec.guest_port, spec.host
    );
    let spec = Arc::new(spec);
    let token = token.map(Arc::new);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let mut waiters = tokio::task::JoinSet::new();
    for _ in 0..WAITING {
        let (spec, target, token, slots) =
            (spec.clone(), target.clone(), token.clone(), slots.clone());
        waiters
            .spawn(async move { wait_and_carry(&spec, &target, token.as_deref(), &slots).await });
    }
    match waiters.join_next().await {
        Some(Ok(Err(e))) => Err(e),
        Some(Err(e)) => Err(e.to_string()),
        Some(Ok(Ok(()))) | None => Ok(()),
    }
}

/// Keeps one tunnel waiting at envd; each guest connection it brings is
/// carried to the host service on a task of its own.
async fn wait_and_carry(
    spec: &Spec,
    target: &Target,
    token: Option<&String>,
    slots: &Arc<tokio::sync::Semaphore>,
) -> Result<(), String> {
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (guest, early) =
            match tunnel(target, spec.guest_port, token.map(String::as_str), true).await {
                Ok(t) => t,
                // The guest port is taken, not allowed, or the token wrong.
                Err(Refused::Status(code, line)) if (400..500).contains(&code) => {
                    return Err(format!("envd refused port {}: {line}", spec.guest_port));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reverse: no tunnel; asking again");
                    tokio::time::sleep(RETRY).await;
                    continue;
                }
            };
        let host = spec.host.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut service = match TcpStream::connect(&host).await {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("envctl: reverse to {host}: {e}");
                    return;
                }
            };
            let _ = service.set_nodelay(true);
            if !early.is_empty() && service.write_all(&early).await.is_err() {
                return;
            }
            let _ = crate::relay::relay(guest, service).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::Spec;

    #[test]
    fn specs() {
        let s: Spec = "3128:8080".parse().unwrap();
        assert_eq!((s.guest_port, s.host.as_str()), (3128, "127.0.0.1:8080"));
        let s: Spec = "3128:10.0.0.5:3142".parse().unwrap();
        assert_eq!(s.host, "10.0.0.5:3142");
        assert!("3128".parse::<Spec>().is_err());
        assert!("0:80".parse::<Spec>().is_err());
        assert!("x:80".parse::<Spec>().is_err());
    }
}
