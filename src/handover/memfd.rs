//! Anonymous in-memory files (memfd): the handover state and an uploaded
//! binary live in them, so a live upgrade writes nothing to the guest's disk
//! (which may be read-only, full, or frozen by `/fsfreeze`).

use std::ffi::CStr;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};

/// A new memfd (close-on-exec; what crosses an exec is a kept duplicate).
pub fn create(name: &CStr) -> io::Result<File> {
    // SAFETY: `name` is a valid NUL-terminated string for the duration of
    // the call; the returned fd is new and owned by the File.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by memfd_create, so it is open and ours.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// A new memfd of `len` zeroed bytes, mapped shared and read-write for the
/// rest of envd's life (never unmapped): memory that a later envd finds in
/// the fd store. The mapping is page aligned.
pub fn mapped(name: &CStr, len: usize) -> io::Result<(File, *mut u8)> {
    let file = create(name)?;
    file.set_len(len as u64)?;
    // SAFETY: maps `len` bytes of a memfd of exactly that size, shared,
    // read-write, at an address the kernel picks; nothing else is mapped
    // over it, and it is never unmapped.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok((file, ptr.cast()))
}

/// A memfd holding `bytes`.
pub fn with(name: &CStr, bytes: &[u8]) -> io::Result<File> {
    let mut f = create(name)?;
    f.write_all(bytes)?;
    Ok(f)
}

/// Reads a whole memfd (at most `limit` bytes) from its start.
pub fn read_all(fd: OwnedFd, limit: u64) -> io::Result<Vec<u8>> {
    let mut f = File::from(fd);
    let len = f.seek(SeekFrom::End(0))?;
    if len > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{len} bytes, more than the {limit} allowed"),
        ));
    }
    f.seek(SeekFrom::Start(0))?;
    let mut buf = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    f.take(limit).read_to_end(&mut buf)?;
    Ok(buf)
}
