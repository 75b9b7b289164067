//! The Ports service (`envd.ports.Ports`): the TCP ports listening in the VM,
//! listed or watched. A Watch stream scans `/proc/net/tcp{,6}` once a second
//! while it is open (microseconds each); with no stream open nothing runs.
//! Owners are looked up once per new listener.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::scan::{self, Listener};
use crate::process::ProcessService;
use crate::proto::ports::port_event::{Event, KeepAlive};
use crate::proto::ports::*;
use crate::status::{Code, Error, Result};
use crate::streams::{framed, BoxStream, Pacing};

/// Watch streams open at once.
const MAX_WATCHES: usize = 64;
const SCAN_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct PortsService {
    process: Arc<ProcessService>,
    watches: Arc<AtomicUsize>,
}

impl PortsService {
    pub fn new(process: Arc<ProcessService>) -> Self {
        Self {
            process,
            watches: Arc::new(AtomicUsize::new(0)),
        }
    }

    pub async fn list(&self) -> Result<ListPortsResponse> {
        let now = described(self.process.clone(), BTreeMap::new()).await?;
        Ok(ListPortsResponse {
            ports: now.into_values().collect(),
        })
    }

    /// Current ports as `added`, then changes.
    pub fn watch(&self, keepalive: Duration) -> Result<BoxStream<PortEvent>> {
        if self.watches.fetch_add(1, Ordering::AcqRel) >= MAX_WATCHES {
            self.watches.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::new(
                Code::ResourceExhausted,
                format!("at most {MAX_WATCHES} port watches at once"),
            ));
        }
        let slot = WatchSlot(self.watches.clone());
        let process = self.process.clone();
        let state = (
            slot,
            BTreeMap::<Listener, Port>::new(),
            VecDeque::new(),
            true,
        );
        let source = Box::pin(futures_util::stream::unfold(
            state,
            move |(slot, mut known, mut queue, first)| {
                let process = process.clone();
                async move {
                    let mut first = first;
                    while queue.is_empty() {
                        if !first {
                            tokio::time::sleep(SCAN_EVERY).await;
                        }
                        first = false;
                        let now = match described(process.clone(), known.clone()).await {
                            Ok(n) => n,
                            Err(e) => return Some((Err(e), (slot, known, queue, first))),
                        };
                        for (l, p) in &known {
                            if !now.contains_key(l) {
                                queue.push_back(Event::Removed(p.clone()));
                            }
                        }
                        for (l, p) in &now {
                            if !known.contains_key(l) {
                                queue.push_back(Event::Added(p.clone()));
                            }
                        }
                        known = now;
                    }
                    let ev = queue.pop_front().map(|e| PortEvent { event: Some(e) })?;
                    Some((Ok(ev), (slot, known, queue, first)))
                }
            },
        ));
        let keep = || PortEvent {
            event: Some(Event::Keepalive(KeepAlive {})),
        };
        let pacing = Pacing {
            keepalive,
            keepalive_item: keep,
            deadline: None,
            deadline_message: "",
        };
        // The first item is a keepalive: the stream is set up.
        Ok(framed(keep(), source, pacing))
    }
}

/// Counts a Watch stream while it lives.
struct WatchSlot(Arc<AtomicUsize>);

impl Drop for WatchSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The listeners now, described; those in `known` keep their description
/// (no owner lookup for them again).
async fn described(
    process: Arc<ProcessService>,
    known: BTreeMap<Listener, Port>,
) -> Result<BTreeMap<Listener, Port>> {
    crate::threads::run("port scan", move || {
        let now = scan::listeners();
        let fresh: Vec<u64> = now
            .iter()
            .filter(|l| !known.contains_key(l))
            .map(|l| l.inode)
            .collect();
        let owners = scan::owners(&fresh);
        now.into_iter()
            .map(|l| {
                let port = known.get(&l).cloned().unwrap_or_else(|| {
                    let pid = owners.get(&l.inode).copied().unwrap_or(0);
                    let command_pid = (pid != 0)
                        .then(|| scan::session_of(pid))
                        .flatten()
                        .filter(|sid| process.is_command(*sid));
                    Port {
                        protocol: if l.ip.is_ipv4() { "tcp" } else { "tcp6" }.into(),
                        address: l.ip.to_string(),
                        port: u32::from(l.port),
                        pid,
                        command_pid,
                    }
                });
                (l, port)
            })
            .collect()
    })
    .await
}
