//! A relay between two plain sockets that moves bytes in the kernel:
//! `splice(2)` from one socket into a pipe and from the pipe into the other,
//! so no byte is copied into envd's memory and each system call moves up to
//! a pipe's worth (64 KiB) instead of a user buffer's. Same ending rules as
//! [`super::relay`]. A direction whose socket type cannot splice (`EINVAL`)
//! moves its bytes with read/write instead.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{OFlag, SpliceFFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Most bytes asked of one splice: a default pipe's capacity.
const CHUNK: usize = 64 * 1024;
/// The read/write fallback's buffer.
const COPY_BUF: usize = 16 * 1024;

/// A pipe (both ends non-blocking, close-on-exec) to splice through.
#[derive(Debug)]
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    pub fn new() -> io::Result<Self> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)?;
        Ok(Self { r, w })
    }
}

/// The two pipes a relay needs, made before the sockets are taken out of
/// tokio, so that running out of fds leaves the plain relay possible.
#[derive(Debug)]
pub struct Pipes {
    up: Pipe,
    down: Pipe,
}

impl Pipes {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            up: Pipe::new()?,
            down: Pipe::new()?,
        })
    }
}

/// One splice between a pipe and a socket (no offsets), never blocking.
fn splice(from: &OwnedFd, to: &OwnedFd, len: usize) -> io::Result<usize> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    Ok(nix::fcntl::splice(from, None, to, None, len, flags)?)
}

/// Runs `op` on `fd` once it is ready for `interest`, again after each
/// `EAGAIN` (which clears the readiness).
async fn when_ready<T>(
    fd: &AsyncFd<OwnedFd>,
    interest: Interest,
    mut op: impl FnMut(&OwnedFd) -> io::Result<T>,
) -> io::Result<T> {
    loop {
        let mut ready = fd.ready(interest).await?;
        if let Ok(r) = ready.try_io(|f| op(f.get_ref())) {
            return r;
        }
    }
}

async fn write_all(dst: &AsyncFd<OwnedFd>, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = when_ready(dst, Interest::WRITABLE, |fd| {
            Ok(nix::unistd::write(fd, buf)?)
        })
        .await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        buf = &buf[n..];
    }
    Ok(())
}

/// Moves bytes from `src` to `dst` until `src` ends; the count moved.
async fn pump(src: &AsyncFd<OwnedFd>, dst: &AsyncFd<OwnedFd>, pipe: &Pipe) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        // The pipe is empty here, so EAGAIN can only mean `src` has nothing.
        let n = match when_ready(src, Interest::READABLE, |fd| splice(fd, &pipe.w, CHUNK)).await {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && total == 0 => {
                return copy(src, dst).await;
            }
            r => r?,
        };
        if n == 0 {
            return Ok(total);
        }
        let mut left = n;
        while left > 0 {
            // The pipe holds `left` bytes, so EAGAIN can only mean `dst` is full.
            let m = when_ready(dst, Interest::WRITABLE, |fd| splice(&pipe.r, fd, left)).await?;
            if m == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= m;
        }
        total += n as u64;
    }
}

/// The read/write fallback of [`pump`].
async fn copy(src: &AsyncFd<OwnedFd>, dst: &AsyncFd<OwnedFd>) -> io::Result<u64> {
    let mut buf = vec![0u8; COPY_BUF];
    let mut total = 0u64;
    loop {
        let n = when_ready(src, Interest::READABLE, |fd| {
            Ok(nix::unistd::read(fd, &mut buf)?)
        })
        .await?;
        if n == 0 {
            return Ok(total);
        }
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
    }
}

fn shutdown_write(fd: &AsyncFd<OwnedFd>) {
    // Failure (the peer is gone already) is moot: the relay ends anyway.
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Write);
}

/// Relays between the sockets `client` and `server` (non-blocking, out of
/// any reactor) until the server side ends; `early` (bytes the client sent
/// before the relay began) goes to the server first. Returns the bytes
/// carried client → server and server → client.
pub async fn relay(
    client: OwnedFd,
    server: OwnedFd,
    pipes: Pipes,
    early: &[u8],
) -> io::Result<(u64, u64)> {
    let both = Interest::READABLE | Interest::WRITABLE;
    // SAFETY: both are open sockets the AsyncFds own; an OwnedFd returns the
    // same fd until its AsyncFd is dropped.
    let client =
        unsafe { AsyncFd::register_with_interest(client, both) }.map_err(io::Error::from)?;
    // SAFETY: as above.
    let server =
        unsafe { AsyncFd::register_with_interest(server, both) }.map_err(io::Error::from)?;
    write_all(&server, early).await?;
    let up = async {
        let n = pump(&client, &server, &pipes.up).await?;
        shutdown_write(&server);
        Ok::<u64, io::Error>(n + early.len() as u64)
    };
    let down = async {
        let n = pump(&server, &client, &pipes.down).await?;
        shutdown_write(&client);
        Ok::<u64, io::Error>(n)
    };
    super::both_ways(up, down).await
}
