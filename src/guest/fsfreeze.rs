//! `FIFREEZE` / `FITHAW` of the root filesystem, for E2B's filesystem-only
//! pause: writes are flushed and blocked until the thaw. Both are idempotent
//! (freezing a frozen filesystem and thawing a thawed one succeed).

use std::os::fd::AsRawFd;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from `linux/fs.h`.
const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;

/// Freezes (or thaws) the filesystem mounted at `mountpoint`.
pub fn set_frozen(mountpoint: &str, freeze: bool) -> std::io::Result<()> {
    let dir = std::fs::File::open(mountpoint)?;
    let request = if freeze { FIFREEZE } else { FITHAW };
    // SAFETY: the ioctl takes an int argument it ignores; the fd is open.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request, 0) };
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match (freeze, e.raw_os_error()) {
        // Already frozen / not frozen: the wanted state holds.
        (true, Some(libc::EBUSY)) | (false, Some(libc::EINVAL)) => Ok(()),
        _ => Err(e),
    }
}
