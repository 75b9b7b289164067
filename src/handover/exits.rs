//! Exit statuses of processes envd did not start in this life (commands
//! re-adopted after a crash): envd is no longer their parent, so it cannot
//! wait for them. Two sources, best first:
//! - `PIDFD_GET_INFO` with `PIDFD_INFO_EXIT` (Linux 6.15+): the status kept
//!   with the pidfd, even after another process reaped it;
//! - the kernel's process-event connector (netlink, `PROC_EVENT_EXIT`,
//!   needs CAP_NET_ADMIN), which reports every exit as it happens.
//!
//! A command that ended while envd was down, on a kernel without the first,
//! has no status to recover: its `end` then says so.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::sync::{oneshot, watch};

use crate::process::reaper::{ExitStatus, ExitWatch};

/// How long an exit seen on the pidfd waits for the connector's report.
const CONNECTOR_GRACE: Duration = Duration::from_millis(500);

type Waiters = Arc<Mutex<HashMap<i32, oneshot::Sender<i32>>>>;

/// The connector listener, started once on first use; `None` if the kernel
/// or envd's privileges do not allow it.
fn connector() -> Option<&'static Waiters> {
    static C: OnceLock<Option<Waiters>> = OnceLock::new();
    C.get_or_init(|| match start_connector() {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::info!(error = %e, "process-event connector unavailable; exit statuses of re-adopted commands need Linux 6.15+");
            None
        }
    })
    .as_ref()
}

/// The exit watch of re-adopted process `pid` (its pidfd `pidfd`).
pub fn watch_exit(pid: u32, pidfd: &OwnedFd) -> ExitWatch {
    let (tx, rx) = watch::channel(None);
    let Ok(raw) = i32::try_from(pid) else {
        return rx;
    };
    let reported = connector().map(|w| {
        let (otx, orx) = oneshot::channel();
        w.lock().unwrap_or_else(|e| e.into_inner()).insert(raw, otx);
        orx
    });
    let dup = match pidfd.try_clone() {
        Ok(d) => d,
        Err(_) => return rx,
    };
    tokio::spawn(async move {
        // SAFETY: `dup` is an open pidfd the AsyncFd owns; an OwnedFd always
        // returns the same fd until the AsyncFd is dropped.
        if let Ok(afd) = unsafe { AsyncFd::register(dup) } {
            let _ = afd.readable().await;
            let status = match exit_info(afd.get_ref()) {
                Some(s) => Some(s),
                None => match reported {
                    Some(r) => tokio::time::timeout(CONNECTOR_GRACE, r)
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(decode),
                    None => None,
                },
            };
            if let Some(w) = connector() {
                w.lock().unwrap_or_else(|e| e.into_inner()).remove(&raw);
            }
            if let Some(s) = status {
                tx.send_replace(Some(s));
            }
            // Else the sender drops: the status is unknown, and says so.
        }
    });
    rx
}

/// A wait status (`exit_code` of the kernel) as envd's [`ExitStatus`].
fn decode(status: i32) -> ExitStatus {
    if libc::WIFSIGNALED(status) {
        ExitStatus::Signaled {
            signal: libc::WTERMSIG(status),
            core_dumped: libc::WCOREDUMP(status),
        }
    } else {
        ExitStatus::Exited(libc::WEXITSTATUS(status))
    }
}

/// `struct pidfd_info` (Linux 6.15 uapi), the fields envd reads.
#[repr(C)]
#[derive(Default)]
struct PidfdInfo {
    mask: u64,
    cgroupid: u64,
    pid: u32,
    tgid: u32,
    ppid: u32,
    ruid: u32,
    rgid: u32,
    euid: u32,
    egid: u32,
    suid: u32,
    sgid: u32,
    fsuid: u32,
    fsgid: u32,
    exit_code: i32,
    coredump_mask: u32,
    spare: u32,
}

const PIDFD_INFO_EXIT: u64 = 1 << 3;
/// `_IOWR(0xFF, 11, struct pidfd_info)`, in the libc's request type (an
/// unsigned long on glibc, an int on musl).
const PIDFD_GET_INFO_BITS: u32 = (3 << 30) | (72 << 16) | (0xFF << 8) | 11;
#[cfg(target_env = "musl")]
const PIDFD_GET_INFO: libc::Ioctl = i32::from_ne_bytes(PIDFD_GET_INFO_BITS.to_ne_bytes());
#[cfg(not(target_env = "musl"))]
const PIDFD_GET_INFO: libc::Ioctl = PIDFD_GET_INFO_BITS as libc::Ioctl;

/// The exit status kept with a pidfd, where the kernel keeps it.
fn exit_info(pidfd: &OwnedFd) -> Option<ExitStatus> {
    let mut info = PidfdInfo {
        mask: PIDFD_INFO_EXIT,
        ..Default::default()
    };
    // SAFETY: PIDFD_GET_INFO reads and writes one `struct pidfd_info`, which
    // `info` is (72 bytes, repr(C)); an older kernel fails with ENOTTY.
    let rc = unsafe { libc::ioctl(pidfd.as_raw_fd(), PIDFD_GET_INFO, &mut info) };
    (rc == 0 && info.mask & PIDFD_INFO_EXIT != 0).then(|| decode(info.exit_code))
}

// The connector protocol (linux/connector.h, linux/cn_proc.h).
const NETLINK_CONNECTOR: i32 = 11;
const CN_IDX_PROC: u32 = 1;
const CN_VAL_PROC: u32 = 1;
const PROC_CN_MCAST_LISTEN: u32 = 1;
const PROC_EVENT_EXIT: u32 = 0x8000_0000;
const NLMSG_HDRLEN: usize = 16;
const CN_MSG_LEN: usize = 20;

fn start_connector() -> std::io::Result<Waiters> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            NETLINK_CONNECTOR,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and is ours.
    let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an all-zero sockaddr_nl is valid; fields are set below.
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = u16::try_from(libc::AF_NETLINK).unwrap_or(16);
    addr.nl_groups = CN_IDX_PROC;
    addr.nl_pid = 0;
    let len = u32::try_from(std::mem::size_of::<libc::sockaddr_nl>()).unwrap_or(12);
    // SAFETY: `addr` is a valid sockaddr_nl of `len` bytes.
    if unsafe { libc::bind(fd, std::ptr::from_ref(&addr).cast(), len) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // nlmsghdr + cn_msg + the listen op.
    let total = NLMSG_HDRLEN + CN_MSG_LEN + 4;
    let mut msg = Vec::with_capacity(total);
    msg.extend_from_slice(&u32::try_from(total).unwrap_or(40).to_ne_bytes());
    msg.extend_from_slice(&3u16.to_ne_bytes()); // NLMSG_DONE
    msg.extend_from_slice(&0u16.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&std::process::id().to_ne_bytes());
    msg.extend_from_slice(&CN_IDX_PROC.to_ne_bytes());
    msg.extend_from_slice(&CN_VAL_PROC.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // ack
    msg.extend_from_slice(&4u16.to_ne_bytes()); // len
    msg.extend_from_slice(&0u16.to_ne_bytes()); // flags
    msg.extend_from_slice(&PROC_CN_MCAST_LISTEN.to_ne_bytes());
    // SAFETY: sends `msg.len()` bytes from a live buffer on an open socket.
    if unsafe { libc::send(fd, msg.as_ptr().cast(), msg.len(), 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let waiters: Waiters = Arc::default();
    let w = waiters.clone();
    // SAFETY: `sock` is an open socket the AsyncFd owns; an OwnedFd always
    // returns the same fd until the AsyncFd is dropped.
    let afd = unsafe { AsyncFd::register(sock) }.map_err(std::io::Error::from)?;
    tokio::spawn(async move {
        let mut buf = vec![0u8; 8192];
        loop {
            let Ok(mut guard) = afd.readable().await else {
                return;
            };
            let n = match guard.try_io(|s| {
                // SAFETY: receives at most `buf.len()` bytes into `buf`.
                let n = unsafe { libc::recv(s.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(usize::try_from(n).unwrap_or(0))
                }
            }) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => continue,
                Ok(Err(_)) => return,
                Err(_would_block) => continue,
            };
            for (pid, code) in exits_in(&buf[..n]) {
                if let Some(tx) = w.lock().unwrap_or_else(|e| e.into_inner()).remove(&pid) {
                    let _ = tx.send(code);
                }
            }
        }
    });
    Ok(waiters)
}

/// (pid, wait status) of each process exit in a datagram from the connector.
fn exits_in(mut b: &[u8]) -> Vec<(i32, i32)> {
    let u32_at = |b: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(i..i + 4)?.try_into().ok()?))
    };
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let Some(len) = u32_at(b, 0).and_then(|l| usize::try_from(l).ok()) else {
            break;
        };
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        let ev = &b[NLMSG_HDRLEN..len];
        // proc_event after cn_msg: what, cpu, timestamp (8), then the exit data.
        let base = CN_MSG_LEN;
        if u32_at(ev, base) == Some(PROC_EVENT_EXIT) {
            let data = base + 16;
            let pid = u32_at(ev, data).and_then(|v| i32::try_from(v).ok());
            let tgid = u32_at(ev, data + 4).and_then(|v| i32::try_from(v).ok());
            let code = u32_at(ev, data + 8).map(|v| i32::from_ne_bytes(v.to_ne_bytes()));
            if let (Some(pid), Some(tgid), Some(code)) = (pid, tgid, code) {
                // Thread exits are reported too; only the process counts.
                if pid == tgid {
                    out.push((pid, code));
                }
            }
        }
        let aligned = (len + 3) & !3;
        b = b.get(aligned..).unwrap_or(&[]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn wait_statuses_decode() {
        assert_eq!(super::decode(7 << 8), super::ExitStatus::Exited(7));
        assert!(matches!(
            super::decode(9),
            super::ExitStatus::Signaled { signal: 9, .. }
        ));
    }
}
