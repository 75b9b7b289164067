//! TCP listeners: what upstream's scanner finds with gopsutil, without
//! walking every process's fds. Asked of the kernel's socket diagnostics
//! ([`super::diag`]), which walk only listening sockets; where those are
//! missing (a kernel without `inet_diag`), read from `/proc/net/tcp` and
//! `/proc/net/tcp6`, which list every socket. A listener is known by its
//! socket inode (a restarted server is a new listener).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A listening socket worth forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Listener {
    pub ip: IpAddr,
    pub port: u16,
    pub inode: u64,
}

/// Most listeners one scan reports (a process in the guest controls how
/// many sockets exist).
pub const MAX_LISTENERS: usize = 4096;
/// Largest `/proc/net/tcp*` read per scan.
const MAX_TABLE: u64 = 16 << 20;

/// Listeners on 127.0.0.1, ::1 or the IPv6 wildcard `::` (upstream's filter:
/// frameworks often bind `::`, which is dual-stack).
pub fn loopback_listeners() -> Vec<Listener> {
    let mut out = listeners();
    out.retain(|l| wanted(l.ip));
    out
}

/// Every listening TCP socket (IPv4 and IPv6), sorted.
pub fn listeners() -> Vec<Listener> {
    let mut out = super::diag::listeners(MAX_LISTENERS * 2).unwrap_or_else(|| {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            tracing::info!(
                "no sock_diag for TCP (inet_diag/tcp_diag not loaded?): listeners are read \
                 from /proc/net/tcp, which lists every socket"
            );
        });
        from_proc_net()
    });
    out.sort();
    out.dedup();
    out.truncate(MAX_LISTENERS);
    out
}

/// Every listening TCP socket, from `/proc/net/tcp*`.
pub(super) fn from_proc_net() -> Vec<Listener> {
    let mut out = Vec::new();
    for (path, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = read_bounded(path) else {
            continue;
        };
        out.extend(parse(&text, v6));
    }
    out
}

/// The pids owning `inodes` (socket inodes), from `/proc/*/fd`. Bounded:
/// at most `MAX_PROCS` processes, `MAX_FDS` descriptors per process and
/// `MAX_LINKS` descriptors in all per call (a guest with many processes and
/// fds costs a bounded scan; owners not found by then are reported as 0).
pub fn owners(inodes: &[u64]) -> std::collections::HashMap<u64, u32> {
    const MAX_PROCS: usize = 8192;
    const MAX_FDS: usize = 4096;
    const MAX_LINKS: usize = 65_536;
    let mut links = 0usize;
    let mut found = std::collections::HashMap::new();
    if inodes.is_empty() {
        return found;
    }
    // Up to 65,536 links against up to 4,096 inodes: a set, not a scan.
    let inodes: std::collections::HashSet<u64> = inodes.iter().copied().collect();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in procs.flatten().take(MAX_PROCS) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten().take(MAX_FDS) {
            links += 1;
            if links > MAX_LINKS {
                return found;
            }
            let Ok(link) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok());
            if let Some(i) = inode.filter(|i| inodes.contains(i)) {
                found.entry(i).or_insert(pid);
            }
        }
        if found.len() == inodes.len() {
            break;
        }
    }
    found
}

/// The session of `pid` (field 6 of /proc/PID/stat).
pub fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(3)?
        .parse()
        .ok()
}

fn read_bounded(path: &str) -> std::io::Result<String> {
    use std::io::Read;
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_TABLE)
        .read_to_string(&mut s)?;
    Ok(s)
}

fn wanted(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4 == Ipv4Addr::LOCALHOST,
        IpAddr::V6(v6) => v6 == Ipv6Addr::LOCALHOST || v6.is_unspecified(),
    }
}

/// Rows in state LISTEN (0A) of a `/proc/net/tcp*` table.
fn parse(text: &str, v6: bool) -> Vec<Listener> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 10 || cols[3] != "0A" {
            continue;
        }
        let Some((addr, port)) = cols[1].split_once(':') else {
            continue;
        };
        let (Ok(port), Ok(inode)) = (u16::from_str_radix(port, 16), cols[9].parse::<u64>()) else {
            continue;
        };
        let Some(ip) = parse_ip(addr, v6) else {
            continue;
        };
        out.push(Listener { ip, port, inode });
    }
    out
}

/// The kernel prints the address as 32-bit words of its network-order
/// bytes read in host order: the word's native bytes are the address bytes.
fn parse_ip(hex: &str, v6: bool) -> Option<IpAddr> {
    let word = |s: &str| u32::from_str_radix(s, 16).ok().map(u32::to_ne_bytes);
    if !v6 {
        if hex.len() != 8 {
            return None;
        }
        return Some(IpAddr::V4(Ipv4Addr::from(word(hex)?)));
    }
    if hex.len() != 32 {
        return None;
    }
    let mut bytes = [0u8; 16];
    for i in 0..4 {
        bytes[i * 4..i * 4 + 4].copy_from_slice(&word(hex.get(i * 8..i * 8 + 8)?)?);
    }
    Some(IpAddr::V6(Ipv6Addr::from(bytes)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_rows() {
        let v4 = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0\n\
   1: 0100007F:1F91 0100007F:9999 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0 100 0 0 10 0\n\
   2: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12347 1 0 100 0 0 10 0\n";
        let got = parse(v4, false);
        assert_eq!(got.len(), 2);
        assert_eq!(
            got[0],
            Listener {
                ip: "127.0.0.1".parse().unwrap(),
                port: 8080,
                inode: 12345
            }
        );
        assert!(!wanted(got[1].ip), "0.0.0.0 already reaches every address");
        let v6 = "  sl  local_address                         remote_address                        st\n\
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 777 1\n";
        let got = parse(v6, true);
        assert_eq!(got[0].ip, "::1".parse::<IpAddr>().unwrap());
        assert_eq!(got[0].port, 3000);
        assert!(wanted(got[0].ip));
    }
}
