//! Which build of envd is running: its version plus a fingerprint of the
//! program file (size and a hash of its last 64 KiB), so two builds of one
//! version (or a binary with bytes appended) tell apart after a live upgrade.

use std::io::{Read, Seek, SeekFrom};
use std::sync::LazyLock;

use sha2::{Digest, Sha256};

const TAIL: u64 = 64 << 10;

static BUILD: LazyLock<String> = LazyLock::new(|| {
    let version = env!("CARGO_PKG_VERSION");
    match fingerprint() {
        Ok(f) => format!("{version}+{f}"),
        Err(_) => version.to_owned(),
    }
});

fn fingerprint() -> std::io::Result<String> {
    let mut f = std::fs::File::open("/proc/self/exe")?;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(size.saturating_sub(TAIL)))?;
    let mut tail = Vec::new();
    f.take(TAIL).read_to_end(&mut tail)?;
    let hash = Sha256::digest(&tail);
    let hex: String = hash[..6].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{size}.{hex}"))
}

/// e.g. `0.1.0+7331520.1a2b3c4d5e6f`.
pub fn build_id() -> &'static str {
    &BUILD
}
