//! Pseudo-terminals: a non-blocking master driven by the tokio reactor.
//!
//! The master fd is `O_NONBLOCK` inside an `AsyncFd`, so PTY output never ties
//! up a thread. A read that fails with `EIO` means every slave fd is closed:
//! that is end of output on Linux, not an error.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::pty::{openpty, Winsize};
use tokio::io::unix::AsyncFd;
use tokio::sync::Mutex;

use crate::status::{Error, Result};

#[derive(Debug)]
pub struct Pty {
    master: AsyncFd<OwnedFd>,
    write_lock: Mutex<()>,
}

fn winsize(cols: u32, rows: u32) -> Result<Winsize> {
    let check = |v: u32, what: &str| {
        u16::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| Error::invalid(format!("pty {what} must be 1..=65535, got {v}")))
    };
    Ok(Winsize {
        ws_col: check(cols, "cols")?,
        ws_row: check(rows, "rows")?,
        ws_xpixel: 0,
        ws_ypixel: 0,
    })
}

fn set_cloexec(fd: &OwnedFd) -> io::Result<()> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).map_err(io::Error::from)?;
    Ok(())
}

impl Pty {
    /// Opens a pty of the given size. Returns the master and the slave fd the
    /// child will use as its controlling terminal.
    pub fn open(cols: u32, rows: u32) -> Result<(Pty, OwnedFd)> {
        let ws = winsize(cols, rows)?;
        let pair = openpty(Some(&ws), None).map_err(Error::from)?;
        let io_err = |e: io::Error| Error::io("configure pty", &e);
        set_cloexec(&pair.master).map_err(io_err)?;
        set_cloexec(&pair.slave).map_err(io_err)?;
        let flags = fcntl(&pair.master, FcntlArg::F_GETFL).map_err(Error::from)?;
        fcntl(
            &pair.master,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(Error::from)?;
        let registered =
            // SAFETY: `pair.master` is an open fd that the AsyncFd owns; an
            // OwnedFd always returns the same fd until the AsyncFd is dropped.
            unsafe { AsyncFd::register(pair.master) };
        let master = registered.map_err(|e| io_err(io::Error::from(e)))?;
        Ok((
            Pty {
                master,
                write_lock: Mutex::new(()),
            },
            pair.slave,
        ))
    }

    /// A master fd a previous envd image opened (live upgrade).
    pub fn adopt(master: OwnedFd) -> io::Result<Pty> {
        let flags = fcntl(&master, FcntlArg::F_GETFL).map_err(io::Error::from)?;
        fcntl(
            &master,
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )
        .map_err(io::Error::from)?;
        // SAFETY: `master` is an open fd that the AsyncFd owns; an OwnedFd
        // always returns the same fd until the AsyncFd is dropped.
        let master = unsafe { AsyncFd::register(master) }.map_err(io::Error::from)?;
        Ok(Pty {
            master,
            write_lock: Mutex::new(()),
        })
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.master.get_ref().as_raw_fd()
    }

    /// Waits until the terminal has output, or its end, without reading.
    pub async fn readable(&self) -> io::Result<()> {
        // Dropped without clearing: the readiness stays for `try_read`.
        self.master.readable().await.map(drop)
    }

    /// Reads what is there without waiting (`WouldBlock` if nothing is);
    /// `Ok(0)` once the terminal is closed on the slave side (`EIO`).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.master.try_io(tokio::io::Interest::READABLE, |fd| {
            nix::unistd::read(fd, buf).map_err(io::Error::from)
        });
        match read {
            Err(e) if e.raw_os_error() == Some(libc::EIO) => Ok(0),
            r => r,
        }
    }

    /// Writes all of `data` to the terminal (the child's input).
    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        let _serialised = self.write_lock.lock().await;
        while !data.is_empty() {
            let mut guard = self.master.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => {}
            }
        }
        Ok(())
    }

    /// Sets the terminal size; the kernel sends SIGWINCH to the foreground group.
    pub fn resize(&self, cols: u32, rows: u32) -> Result<()> {
        let ws = winsize(cols, rows)?;
        // SAFETY: TIOCSWINSZ reads one `winsize` from the pointer, which points
        // to a live, initialised struct for the duration of the call; the fd is
        // an open pty master owned by `self`.
        let rc = unsafe { libc::ioctl(self.master.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        if rc != 0 {
            return Err(Error::io("resize pty", &io::Error::last_os_error()));
        }
        Ok(())
    }
}
