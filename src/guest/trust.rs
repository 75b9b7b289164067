//! The sandbox's CA certificate (`caBundle` on `/init`, E2B's network rules
//! intercept TLS with it): installed as its own file and appended to the
//! system bundle between markers, so a later `/init` replaces it instead of
//! stacking copies.

use std::io::Write;
use std::path::Path;

/// Where Debian-style systems keep local CAs, and the combined bundle.
pub const LOCAL_CA: &str = "usr/local/share/ca-certificates/e2b-ca.crt";
pub const SYSTEM_BUNDLE: &str = "etc/ssl/certs/ca-certificates.crt";

const BEGIN_MARK: &str = "# envd: E2B sandbox CA (begin)\n";
const END_MARK: &str = "# envd: E2B sandbox CA (end)\n";
const BEGIN_CERT: &str = "-----BEGIN CERTIFICATE-----";
const END_CERT: &str = "-----END CERTIFICATE-----";
/// Largest system bundle envd rewrites.
const MAX_BUNDLE: u64 = 16 << 20;

/// Checks that `pem` is one or more PEM certificates and nothing else;
/// returns it normalised (blocks joined by newlines).
pub fn validate(pem: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = pem.trim();
    if rest.is_empty() {
        return Err("caBundle is empty".into());
    }
    while !rest.is_empty() {
        let Some(body) = rest.strip_prefix(BEGIN_CERT) else {
            return Err("caBundle must hold PEM certificates only".into());
        };
        let end = body
            .find(END_CERT)
            .ok_or_else(|| "caBundle: a certificate has no END line".to_owned())?;
        let inner = &body[..end];
        if !inner
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+/=\r\n\t ".contains(c))
        {
            return Err("caBundle: a certificate is not base64".into());
        }
        out.push_str(BEGIN_CERT);
        out.push_str(inner.trim_end());
        out.push('\n');
        out.push_str(END_CERT);
        out.push('\n');
        rest = body[end + END_CERT.len()..].trim_start();
    }
    Ok(out)
}

/// Installs `pem` (validated) under `root`; returns whether anything changed.
pub fn install(root: &Path, pem: &str) -> std::io::Result<bool> {
    let local = root.join(LOCAL_CA);
    let mut changed = write_if_different(&local, pem)?;
    let bundle = root.join(SYSTEM_BUNDLE);
    let current = match crate::small_files::read_text(&bundle, MAX_BUNDLE) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let mut next = without_block(&current);
    if !next.is_empty() && !next.ends_with('\n') {
        next.push('\n');
    }
    next.push_str(BEGIN_MARK);
    next.push_str(pem);
    next.push_str(END_MARK);
    changed |= write_if_different(&bundle, &next)?;
    Ok(changed)
}

fn without_block(text: &str) -> String {
    match (text.find(BEGIN_MARK), text.find(END_MARK)) {
        (Some(b), Some(e)) if b < e => {
            format!("{}{}", &text[..b], &text[e + END_MARK.len()..])
        }
        _ => text.to_owned(),
    }
}

fn write_if_different(path: &Path, text: &str) -> std::io::Result<bool> {
    if crate::small_files::read(path, MAX_BUNDLE).is_ok_and(|old| old == text.as_bytes()) {
        return Ok(false);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Beside the target, then renamed over it: readers never see half a bundle.
    // A new file (`O_EXCL`): never through a link left at its name.
    let tmp = path.with_extension("envd-tmp");
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)?
        .write_all(text.as_bytes())?;
    std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
    std::fs::rename(&tmp, path)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\nAAAA==\n-----END CERTIFICATE-----\n";

    #[test]
    fn pem_only() {
        assert_eq!(validate(CERT).unwrap(), CERT);
        assert!(validate("").is_err());
        assert!(validate("hello").is_err());
        assert!(validate(&format!("{CERT}junk")).is_err());
        assert!(
            validate("-----BEGIN CERTIFICATE-----\n<script>\n-----END CERTIFICATE-----").is_err()
        );
    }

    #[test]
    fn installs_once_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let bundle = dir.path().join(SYSTEM_BUNDLE);
        std::fs::create_dir_all(bundle.parent().unwrap()).unwrap();
        std::fs::write(&bundle, "SYSTEM\n").unwrap();
        assert!(install(dir.path(), CERT).unwrap());
        assert!(!install(dir.path(), CERT).unwrap(), "idempotent");
        let text = std::fs::read_to_string(&bundle).unwrap();
        assert!(text.starts_with("SYSTEM\n") && text.matches(BEGIN_CERT).count() == 1);
        let other = CERT.replace("AAAA", "BBBB");
        assert!(install(dir.path(), &other).unwrap());
        let text = std::fs::read_to_string(&bundle).unwrap();
        assert!(text.contains("BBBB") && !text.contains("AAAA"));
    }
}
