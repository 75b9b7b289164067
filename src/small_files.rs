//! Small files of the guest's system that envd reads whole (the account
//! databases, `/etc/hosts`, the CA bundle). Anything in the VM that is root
//! can put something else in their place, so a read is bounded: only a
//! regular file is read (opened without blocking: a FIFO without a writer
//! would hang the caller's thread forever, a device such as `/dev/zero`
//! would never end), and no more than the caller's limit of it.

use std::io::Read;
use std::path::Path;

/// `path`'s bytes, if it is a regular file of at most `max` bytes; a FIFO,
/// device, socket or directory, or a larger file, is `InvalidInput` with a
/// message that names it.
pub fn read(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let opened = crate::filesystem::transfer::open_regular_io(path)?;
    let mut bytes = Vec::new();
    opened.file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("'{}' is larger than {max} bytes", path.display()),
        ));
    }
    Ok(bytes)
}

/// [`read`], as text (not UTF-8 is `InvalidData`).
pub fn read_text(path: &Path, max: u64) -> std::io::Result<String> {
    String::from_utf8(read(path, max)?).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("'{}' is not UTF-8 text", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_limit_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "12345").unwrap();
        assert_eq!(read(&file, 5).unwrap(), b"12345");
        let e = read(&file, 4).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("larger than 4 bytes"), "{e}");

        // Neither waits for a writer nor reads forever.
        let fifo = dir.path().join("p");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = read(&fifo, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        let e = read(Path::new("/dev/zero"), 1 << 20).unwrap_err();
        assert!(e.to_string().contains("character device"), "{e}");
        assert_eq!(
            read(&dir.path().join("none"), 1).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
