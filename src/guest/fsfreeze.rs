//! `FIFREEZE` / `FITHAW` of the root filesystem, for E2B's filesystem-only
//! pause: writes are flushed and blocked until the thaw. Both are idempotent
//! (freezing a frozen filesystem and thawing a thawed one succeed).

use std::os::fd::AsRawFd;

/// `_IOWR('X', 119, int)` and `_IOWR('X', 120, int)` from `linux/fs.h`
/// (the request type differs between glibc and musl; nix computes it).
fn request(freeze: bool) -> nix::sys::ioctl::ioctl_num_type {
    let int = std::mem::size_of::<libc::c_int>();
    if freeze {
        nix::request_code_readwrite!(b'X', 119, int)
    } else {
        nix::request_code_readwrite!(b'X', 120, int)
    }
}

/// Freezes (or thaws) the filesystem mounted at `mountpoint`.
pub fn set_frozen(mountpoint: &str, freeze: bool) -> std::io::Result<()> {
    let dir = std::fs::File::open(mountpoint)?;
    // SAFETY: the ioctl takes an int argument it ignores; the fd is open.
    let rc = unsafe { libc::ioctl(dir.as_raw_fd(), request(freeze), 0) };
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

#[cfg(test)]
mod tests {
    #[test]
    fn request_codes_are_linux_fs_h() {
        // `to_ne_bytes` compares the bits whatever the request type is.
        assert_eq!(
            super::request(true).to_ne_bytes()[..4],
            0xC004_5877u32.to_ne_bytes()
        );
        assert_eq!(
            super::request(false).to_ne_bytes()[..4],
            0xC004_5878u32.to_ne_bytes()
        );
    }
}
