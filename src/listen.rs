//! Listener URLs (`tcp://`, `unix://`, `vsock://`) and accepting connections
//! on any of them as one kind of byte stream.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::PathBuf;
use std::str::FromStr;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// Mode of a Unix socket envd creates: owner (normally root) only.
pub const UNIX_SOCKET_MODE: u32 = 0o600;

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenUrl {
    /// `tcp://HOST:PORT` (port 0 picks a free port).
    Tcp(String),
    /// `unix:///absolute/path`
    Unix(PathBuf),
    /// `vsock://CID:PORT`; CID `-1` means any (the guest side).
    Vsock { cid: u32, port: u32 },
}

impl FromStr for ListenUrl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (scheme, rest) = s.split_once("://").ok_or_else(|| {
            format!("'{s}': expected tcp://HOST:PORT, unix:///PATH or vsock://CID:PORT")
        })?;
        match scheme {
            "tcp" => {
                let (host, port) = rest
                    .rsplit_once(':')
                    .ok_or_else(|| format!("'{s}': missing :PORT"))?;
                if host.is_empty() {
                    return Err(format!(
                        "'{s}': missing host (use 0.0.0.0 for all interfaces)"
                    ));
                }
                port.parse::<u16>()
                    .map_err(|_| format!("'{s}': bad port '{port}'"))?;
                Ok(ListenUrl::Tcp(rest.to_owned()))
            }
            "unix" => {
                if !rest.starts_with('/') {
                    return Err(format!(
                        "'{s}': the socket path must be absolute (unix:///path)"
                    ));
                }
                Ok(ListenUrl::Unix(PathBuf::from(rest)))
            }
            "vsock" => {
                let (cid, port) = rest
                    .split_once(':')
                    .ok_or_else(|| format!("'{s}': expected vsock://CID:PORT"))?;
                let cid = if cid == "-1" {
                    VMADDR_CID_ANY
                } else {
                    cid.parse().map_err(|_| format!("'{s}': bad CID '{cid}'"))?
                };
                let port = port
                    .parse()
                    .map_err(|_| format!("'{s}': bad port '{port}'"))?;
                Ok(ListenUrl::Vsock { cid, port })
            }
            other => Err(format!(
                "'{s}': unknown scheme '{other}' (tcp, unix or vsock)"
            )),
        }
    }
}

impl fmt::Display for ListenUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenUrl::Tcp(a) => write!(f, "tcp://{a}"),
            ListenUrl::Unix(p) => write!(f, "unix://{}", p.display()),
            ListenUrl::Vsock { cid, port } if *cid == VMADDR_CID_ANY => {
                write!(f, "vsock://-1:{port}")
            }
            ListenUrl::Vsock { cid, port } => write!(f, "vsock://{cid}:{port}"),
        }
    }
}

/// The URL a socket is bound to, written as envd would have been asked for
/// it (`tcp://` from its address, `unix://` from its path, `vsock://`): how a
/// restarted envd recognises its listeners in the service manager's store
/// when the record that named them is lost. `None` for anything else.
pub fn bound_url(fd: std::os::fd::BorrowedFd<'_>) -> Option<ListenUrl> {
    use nix::sys::socket::{getsockname, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    if let Some(a) = addr.as_vsock_addr() {
        return Some(ListenUrl::Vsock {
            cid: a.cid(),
            port: a.port(),
        });
    }
    if let Some(a) = addr.as_unix_addr() {
        return a.path().map(|p| ListenUrl::Unix(p.to_owned()));
    }
    // IPv4 or IPv6, read by std (through a duplicate of the fd).
    let tcp = std::net::TcpListener::from(fd.try_clone_to_owned().ok()?);
    tcp.local_addr().ok().map(|a| ListenUrl::Tcp(a.to_string()))
}

/// The writing half of a connection wrapper that changes only its reads or
/// its close: `poll_write`, `poll_write_vectored`, `is_write_vectored` and
/// `poll_flush` go to the wrapped connection, the field `inner`.
macro_rules! delegate_writes {
    () => {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }

        fn poll_write_vectored(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            bufs: &[std::io::IoSlice<'_>],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
        }

        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }

        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
    };
}
pub(crate) use delegate_writes;

/// The reading half of a connection wrapper that changes only its writes
/// or its close: `poll_read` goes to the wrapped connection, `inner`.
macro_rules! delegate_reads {
    () => {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    };
}
pub(crate) use delegate_reads;

/// Any accepted connection.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// What it is, to tell a plain socket from a wrapper.
    fn as_any(&self) -> &dyn std::any::Any;
    /// The connection itself, to take a plain socket out of it.
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {
    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
    fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send> {
        self
    }
}

/// A connection, as a relay may take it.
pub enum Socket {
    /// A plain TCP or vsock socket, out of tokio's reactor (non-blocking).
    Plain(std::os::fd::OwnedFd),
    /// Anything else (a Unix socket behind its `:authority` fix, a test's
    /// stream), as it was.
    Other(Box<dyn Conn>),
}

/// Takes the socket out of a plain TCP or vsock connection, for a relay that
/// moves bytes in the kernel.
pub fn into_socket(conn: Box<dyn Conn>) -> io::Result<Socket> {
    use std::os::fd::OwnedFd;
    let mismatch = || io::Error::other("connection type changed while taken");
    // Through the box: `Box<dyn Conn>` is itself a `Conn`.
    let any = (*conn).as_any();
    if any.is::<tokio::net::TcpStream>() {
        let s = conn
            .into_any()
            .downcast::<tokio::net::TcpStream>()
            .map_err(|_| mismatch())?;
        return Ok(Socket::Plain(OwnedFd::from(s.into_std()?)));
    }
    if any.is::<tokio_vsock::VsockStream>() {
        let s = conn
            .into_any()
            .downcast::<tokio_vsock::VsockStream>()
            .map_err(|_| mismatch())?;
        return Ok(Socket::Plain(OwnedFd::from(*s)));
    }
    Ok(Socket::Other(conn))
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
    Vsock(VsockListener),
}

impl Listener {
    pub async fn bind(url: &ListenUrl) -> io::Result<Listener> {
        match url {
            ListenUrl::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr.as_str()).await?)),
            ListenUrl::Unix(path) => {
                remove_stale_socket(path)?;
                let l = UnixListener::bind(path)?;
                restrict_socket(path)?;
                Ok(Listener::Unix(l))
            }
            ListenUrl::Vsock { cid, port } => Ok(Listener::Vsock(VsockListener::bind(
                VsockAddr::new(*cid, *port),
            )?)),
        }
    }

    /// A listening socket a previous envd image bound (live upgrade): only
    /// one of the kind `url` names that is listening.
    pub fn adopt(url: &ListenUrl, fd: std::os::fd::OwnedFd) -> io::Result<Listener> {
        let domain = sockopt_int(&fd, libc::SO_DOMAIN)?;
        let listening = sockopt_int(&fd, libc::SO_ACCEPTCONN)? != 0;
        let family_ok = match url {
            ListenUrl::Tcp(_) => domain == libc::AF_INET || domain == libc::AF_INET6,
            ListenUrl::Unix(_) => domain == libc::AF_UNIX,
            ListenUrl::Vsock { .. } => domain == libc::AF_VSOCK,
        };
        if !family_ok || !listening {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the carried fd is not a listening socket for {url}"),
            ));
        }
        Ok(match url {
            ListenUrl::Tcp(_) => {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                Listener::Tcp(TcpListener::from_std(l)?)
            }
            ListenUrl::Unix(_) => {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                Listener::Unix(UnixListener::from_std(l)?)
            }
            ListenUrl::Vsock { .. } => {
                nix::fcntl::fcntl(
                    &fd,
                    nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
                )
                .map_err(io::Error::from)?;
                Listener::Vsock(VsockListener::from(fd))
            }
        })
    }

    /// The socket's fd (open for as long as the listener lives).
    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Vsock(l) => l.as_raw_fd(),
        }
    }

    /// The URL actually bound (with the real port when port 0 was asked).
    /// Written as [`ListenUrl`] writes it, as [`bound_url`] does.
    pub fn local_url(&self, asked: &ListenUrl) -> String {
        let bound = match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| ListenUrl::Tcp(a.to_string())),
            Listener::Vsock(l) => l.local_addr().ok().map(|a| ListenUrl::Vsock {
                cid: a.cid(),
                port: a.port(),
            }),
            Listener::Unix(_) => None,
        };
        bound.as_ref().unwrap_or(asked).to_string()
    }

    pub async fn accept(&self) -> io::Result<Box<dyn Conn>> {
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            // gRPC clients that send the socket path as :authority (see
            // `unix_authority`) are served too.
            Listener::Unix(l) => Box::new(crate::unix_authority::AuthorityFix::new(
                l.accept().await?.0,
            )),
            Listener::Vsock(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// An integer `SOL_SOCKET` option of `fd`.
fn sockopt_int(fd: &std::os::fd::OwnedFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    use std::os::fd::AsRawFd;
    let mut v: libc::c_int = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: getsockopt writes at most `len` bytes to `v`, a live c_int,
    // and updates `len`; the fd is open for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            std::ptr::from_mut(&mut v).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

/// Gives the socket file envd just bound at `path` [`UNIX_SOCKET_MODE`]. The
/// path is opened without following a symlink and must be a socket: if its
/// directory is writable by others, a link swapped in after the bind must not
/// steer the chmod onto another file.
fn restrict_socket(path: &std::path::Path) -> io::Result<()> {
    use nix::fcntl::OFlag;
    let fd = nix::fcntl::open(
        path,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let st = nix::sys::stat::fstat(&fd)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the socket's path was replaced right after it was bound",
        ));
    }
    // An O_PATH fd takes no fchmod; its /proc link leads to the socket file
    // itself. Without /proc (PID 1 before it is mounted), the path.
    let mode = std::fs::Permissions::from_mode(UNIX_SOCKET_MODE);
    let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    match std::fs::set_permissions(by_fd, mode.clone()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => std::fs::set_permissions(path, mode),
        r => r,
    }
}

/// A leftover socket file from an earlier run is replaced; any other file at
/// that path is an error (envd never deletes what it did not create).
fn remove_stale_socket(path: &std::path::Path) -> io::Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path),
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "the path exists and is not a socket",
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_urls() {
        assert_eq!(
            "tcp://127.0.0.1:49983".parse(),
            Ok(ListenUrl::Tcp("127.0.0.1:49983".into()))
        );
        assert_eq!(
            "unix:///run/envd.sock".parse(),
            Ok(ListenUrl::Unix("/run/envd.sock".into()))
        );
        assert_eq!(
            "vsock://-1:49983".parse(),
            Ok(ListenUrl::Vsock {
                cid: VMADDR_CID_ANY,
                port: 49983
            })
        );
        assert_eq!(
            "vsock://-1:49983".parse::<ListenUrl>().unwrap().to_string(),
            "vsock://-1:49983"
        );
        for bad in [
            "127.0.0.1:1",
            "tcp://:1",
            "tcp://h:x",
            "unix://rel",
            "vsock://a:1",
            "http://x:1",
        ] {
            assert!(bad.parse::<ListenUrl>().is_err(), "{bad} accepted");
        }
    }
}
