//! Listening TCP sockets from the kernel's socket diagnostics (netlink
//! `NETLINK_SOCK_DIAG`, what `ss -lt` asks): asked for listeners only, the
//! kernel walks its table of listening sockets and nothing else, where
//! `/proc/net/tcp` prints every socket there is. With 55,000 loopback
//! connections open, one read of `/proc/net/tcp` took 146–215 ms and 12 MB of
//! text, and the scanner reads it every second.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, OwnedFd};

use nix::sys::socket::{
    recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr, SockFlag,
    SockProtocol, SockType,
};
use nix::sys::time::TimeVal;

use super::scan::Listener;

/// `SOCK_DIAG_BY_FAMILY` of `linux/sock_diag.h`.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// `TCP_LISTEN` of the kernel's TCP states.
const TCP_LISTEN: u32 = 10;
/// `AF_INET`, `AF_INET6` and `IPPROTO_TCP` as the request's bytes.
const INET: u8 = 2;
const INET6: u8 = 10;
const TCP: u8 = 6;
/// `struct nlmsghdr`.
const HEADER: usize = 16;
/// `struct inet_diag_req_v2`.
const REQUEST: usize = 56;
/// `struct inet_diag_msg`.
const MESSAGE: usize = 72;

/// Every listening TCP socket (IPv4 and IPv6), at most `max`; `None` when
/// the kernel cannot answer (no `inet_diag`), so the caller reads
/// `/proc/net/tcp*` instead.
pub fn listeners(max: usize) -> Option<Vec<Listener>> {
    let mut out = Vec::new();
    for family in [INET, INET6] {
        dump(family, &mut out, max)?;
    }
    Some(out)
}

/// One family's listeners, on a socket of its own (a dump cut short at
/// `max` leaves nothing behind for the next).
fn dump(family: u8, out: &mut Vec<Listener>, max: usize) -> Option<()> {
    let fd: OwnedFd = socket(
        AddressFamily::Netlink,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkSockDiag,
    )
    .ok()?;
    // A kernel that never answers must not hold the scanner.
    setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(1, 0)).ok()?;
    sendto(
        fd.as_raw_fd(),
        &request(family),
        &NetlinkAddr::new(0, 0),
        MsgFlags::empty(),
    )
    .ok()?;
    let v6 = family == INET6;
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()).ok()?;
        match parse(buf.get(..n)?, v6, out, max)? {
            true => return Some(()),
            false if n == 0 => return None,
            false => {}
        }
    }
}

/// A dump request for `family`'s TCP sockets in state LISTEN.
fn request(family: u8) -> [u8; HEADER + REQUEST] {
    let mut m = [0u8; HEADER + REQUEST];
    const LEN: u32 = 72;
    const _: () = assert!(LEN as usize == HEADER + REQUEST);
    m[0..4].copy_from_slice(&LEN.to_ne_bytes());
    m[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m[HEADER] = family;
    m[HEADER + 1] = TCP;
    m[HEADER + 4..HEADER + 8].copy_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
    m
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Adds the listeners of one datagram of netlink messages to `out` (up to
/// `max`). `Some(true)` once the dump is complete (or `max` reached),
/// `Some(false)` when more datagrams follow, `None` on an error message or
/// a malformed one.
fn parse(mut b: &[u8], v6: bool, out: &mut Vec<Listener>, max: usize) -> Option<bool> {
    while b.len() >= HEADER {
        let len = usize::try_from(u32_at(b, 0)?).ok()?;
        if len < HEADER || len > b.len() {
            return None;
        }
        match u16_at(b, 4)? {
            NLMSG_DONE => return Some(true),
            NLMSG_ERROR => return None,
            SOCK_DIAG_BY_FAMILY => {
                let m = b.get(HEADER..len)?;
                if m.len() < MESSAGE {
                    return None;
                }
                // idiag_sport is in network byte order; the source address
                // is its network-order bytes.
                let port = u16::from_be_bytes([m[4], m[5]]);
                let ip = if v6 {
                    let bytes: [u8; 16] = m[8..24].try_into().ok()?;
                    IpAddr::V6(Ipv6Addr::from(bytes))
                } else {
                    IpAddr::V4(Ipv4Addr::new(m[8], m[9], m[10], m[11]))
                };
                let inode = u64::from(u32_at(m, 68)?);
                out.push(Listener { ip, port, inode });
                if out.len() >= max {
                    return Some(true);
                }
            }
            _ => {}
        }
        // Messages are 4-byte aligned.
        let next = (len + 3) & !3;
        b = b.get(next.min(b.len())..)?;
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(HEADER + body.len()).unwrap().to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    fn listener(port: u16, addr: &[u8], inode: u32) -> Vec<u8> {
        let mut d = vec![0u8; MESSAGE];
        d[0] = INET;
        d[1] = 10; // TCP_LISTEN
        d[4..6].copy_from_slice(&port.to_be_bytes());
        d[8..8 + addr.len()].copy_from_slice(addr);
        d[68..72].copy_from_slice(&inode.to_ne_bytes());
        message(SOCK_DIAG_BY_FAMILY, &d)
    }

    #[test]
    fn parses_listeners_until_done_and_refuses_garbage() {
        let mut b = listener(8080, &[127, 0, 0, 1], 77);
        b.extend(listener(22, &[0, 0, 0, 0], 78));
        let mut out = Vec::new();
        assert_eq!(parse(&b, false, &mut out, 100), Some(false));
        assert_eq!(
            out,
            [
                Listener {
                    ip: "127.0.0.1".parse().unwrap(),
                    port: 8080,
                    inode: 77
                },
                Listener {
                    ip: "0.0.0.0".parse().unwrap(),
                    port: 22,
                    inode: 78
                }
            ]
        );
        assert_eq!(
            parse(&message(NLMSG_DONE, &[0; 4]), false, &mut out, 100),
            Some(true)
        );
        assert_eq!(
            parse(&message(NLMSG_ERROR, &[0; 20]), false, &mut out, 100),
            None
        );
        // Cut at `max`.
        let mut few = Vec::new();
        assert_eq!(parse(&b, false, &mut few, 1), Some(true));
        assert_eq!(few.len(), 1);
        // A length past the datagram, or a short message: refused.
        let mut bad = listener(1, &[127, 0, 0, 1], 1);
        bad[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(parse(&bad, false, &mut Vec::new(), 100), None);
        assert_eq!(
            parse(
                &message(SOCK_DIAG_BY_FAMILY, &[0; 8]),
                false,
                &mut Vec::new(),
                100
            ),
            None
        );
        let v6 = listener(3000, &Ipv6Addr::LOCALHOST.octets(), 9);
        let mut out = Vec::new();
        parse(&v6, true, &mut out, 100);
        assert_eq!(out[0].ip, IpAddr::V6(Ipv6Addr::LOCALHOST));
    }

    /// The kernel's answer holds a listener this test opens, as
    /// `/proc/net/tcp` does.
    #[test]
    fn finds_a_real_listener_like_proc_net_tcp() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let Some(found) = listeners(1 << 20) else {
            eprintln!("SKIP: no sock_diag in this kernel");
            return;
        };
        let mine: Vec<_> = found.iter().filter(|x| x.port == port).collect();
        assert_eq!(mine.len(), 1, "{found:?}");
        assert_eq!(mine[0].ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
        let from_proc = super::super::scan::from_proc_net();
        assert!(from_proc.contains(mine[0]), "{from_proc:?}");
    }
}
