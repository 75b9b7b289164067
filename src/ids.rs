//! Unguessable identifiers from the kernel's CSPRNG.

use std::io::Read;

/// `len` random lowercase letters and digits, uniformly distributed.
pub fn random_id(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    // 252 = 7 * 36: bytes at or above it are rejected so every symbol is
    // equally likely.
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        fill_random(&mut buf);
        for b in buf.iter().filter(|b| **b < 252) {
            if out.len() == len {
                break;
            }
            out.push(char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]));
        }
    }
    out
}

fn fill_random(buf: &mut [u8]) {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if usize::try_from(n).ok() == Some(buf.len()) {
        return;
    }
    // Kernels without getrandom(2): the device file.
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(buf).is_ok() {
            return;
        }
    }
    tracing::error!("no source of randomness; identifiers are weak");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let seed = seed.to_le_bytes();
    for (i, b) in buf.iter_mut().enumerate() {
        let salt = u8::try_from(i % 256).unwrap_or(0).wrapping_mul(151);
        *b = seed[i % seed.len()] ^ salt;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ids_are_alnum_and_distinct() {
        let a = super::random_id(20);
        let b = super::random_id(20);
        assert_eq!(a.len(), 20);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()));
        assert_ne!(a, b);
    }
}
