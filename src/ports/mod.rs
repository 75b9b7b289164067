//! Localhost port forwarding, as upstream envd does it with one `socat` per
//! port, done natively: every second envd scans for servers listening on
//! 127.0.0.1, ::1 or :: inside the VM and makes each reachable on the VM's
//! external address (upstream: 169.254.0.21) at the same port; forwarding
//! stops when the server goes away. Only in a sandbox VM. Bounded: at most
//! 512 ports and 2,048 connections at once (each costs envd descriptors).

pub mod api;
mod diag;
pub mod scan;

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinSet;

use scan::Listener;

/// upstream's external address for forwarded ports.
pub const DEFAULT_ADDRESS: &str = "169.254.0.21";
/// How often listeners are scanned (upstream: 1 s).
pub const SCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Ports forwarded at once (each holds a listening socket of envd's).
const MAX_FORWARDS: usize = 512;
/// Connections all forwarded ports carry at once (two sockets each).
const MAX_CONNECTIONS: usize = 2048;

/// Starts the forwarder: from `address` to loopback. Runs until envd exits.
pub fn start(address: IpAddr, own_ports: Vec<u16>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        let mut forwards: HashMap<Listener, Forward> = HashMap::new();
        // Listeners that could not be forwarded (the port is taken on the
        // external address, e.g. by a `::` server itself): not retried.
        let mut refused: HashSet<Listener> = HashSet::new();
        let mut tick = tokio::time::interval(SCAN_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            // Sorted: a lookup is a binary search (thousands of listeners,
            // and as many refused, must not cost their product each second).
            // On a blocking thread: where the kernel lacks sock_diag, the
            // scan reads `/proc/net/tcp*`, which sandboxed code can make
            // megabytes long (27,000 connections: 478 ms).
            let Ok(now) = crate::threads::run("listener scan", scan::loopback_listeners).await
            else {
                continue;
            };
            let listening = |l: &Listener| now.binary_search(l).is_ok();
            forwards.retain(|l, _| listening(l));
            refused.retain(listening);
            let mut forwarded_ports: HashSet<u16> = forwards.keys().map(|f| f.port).collect();
            for l in now.iter().copied() {
                if own_ports.contains(&l.port)
                    || forwards.len() >= MAX_FORWARDS
                    || forwards.contains_key(&l)
                    || refused.contains(&l)
                    || forwarded_ports.contains(&l.port)
                {
                    continue;
                }
                match Forward::open(address, l, slots.clone()).await {
                    Ok(f) => {
                        tracing::info!(port = l.port, backend = %l.ip, %address, "forwarding a localhost port");
                        forwards.insert(l, f);
                        forwarded_ports.insert(l.port);
                    }
                    Err(e) => {
                        tracing::debug!(port = l.port, error = %e, "port not forwarded");
                        refused.insert(l);
                    }
                }
            }
        }
    });
}

/// One forwarded port: its accept loop and connections, all aborted on drop.
struct Forward {
    tasks: JoinSet<()>,
}

impl Forward {
    async fn open(
        address: IpAddr,
        l: Listener,
        slots: Arc<tokio::sync::Semaphore>,
    ) -> std::io::Result<Forward> {
        let bind = SocketAddr::new(address, l.port);
        let socket = match address {
            IpAddr::V4(_) => TcpSocket::new_v4()?,
            IpAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(bind)?;
        let listener = socket.listen(128)?;
        // A `::` server accepts IPv4 too: reach it on 127.0.0.1, which needs
        // no `::1 localhost` in /etc/hosts.
        let backend = match l.ip {
            IpAddr::V6(v6) if v6 == Ipv6Addr::LOCALHOST => SocketAddr::new(l.ip, l.port),
            _ => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), l.port),
        };
        let mut tasks = JoinSet::new();
        tasks.spawn(accept_loop(listener, backend, slots));
        Ok(Forward { tasks })
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

async fn accept_loop(
    listener: TcpListener,
    backend: SocketAddr,
    slots: Arc<tokio::sync::Semaphore>,
) {
    let mut conns = JoinSet::new();
    loop {
        // Finished connections are collected as we go.
        while conns.try_join_next().is_some() {}
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (mut inbound, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(error = %e, "forwarded port: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        conns.spawn(async move {
            let _permit = permit;
            let Ok(mut outbound) = TcpStream::connect(backend).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        });
    }
}
