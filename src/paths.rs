//! Path rules shared by every service (E2B's): `~` and `~/x` are the user's
//! home, relative paths are under the user's home, absolute paths are used as
//! given (lexically cleaned of `.` and `..`), `~other` is refused.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::status::{Error, Result};
use crate::users::User;

pub fn resolve(path: &str, user: &User) -> Result<PathBuf> {
    resolve_bytes(path.as_bytes(), user)
}

/// [`resolve`] for a path given as bytes (file names need not be UTF-8).
pub fn resolve_bytes(path: &[u8], user: &User) -> Result<PathBuf> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    if path.contains(&0) {
        return Err(Error::invalid(format!(
            "path {:?} contains a NUL byte",
            shown()
        )));
    }
    let os = |b: &[u8]| Path::new(OsStr::from_bytes(b)).to_path_buf();
    let joined = if path == b"~" {
        user.home.clone()
    } else if let Some(rest) = path.strip_prefix(b"~/") {
        user.home.join(os(rest))
    } else if path.starts_with(b"~") {
        return Err(Error::invalid(format!(
            "path '{}': only '~' (the requesting user's home) is supported",
            shown()
        )));
    } else if path.starts_with(b"/") {
        os(path)
    } else {
        user.home.join(os(path))
    };
    Ok(clean(&joined))
}

/// Removes `.` and resolves `..` lexically (never above `/`).
fn clean(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user() -> User {
        User {
            name: "u".into(),
            uid: 1000,
            gid: 1000,
            home: "/home/u".into(),
            groups: vec![1000],
        }
    }

    #[test]
    fn rules() {
        let u = user();
        assert_eq!(resolve("~", &u).unwrap(), PathBuf::from("/home/u"));
        assert_eq!(resolve("~/a/../b", &u).unwrap(), PathBuf::from("/home/u/b"));
        assert_eq!(resolve("x/y", &u).unwrap(), PathBuf::from("/home/u/x/y"));
        assert_eq!(resolve("", &u).unwrap(), PathBuf::from("/home/u"));
        assert_eq!(resolve("/etc/./x", &u).unwrap(), PathBuf::from("/etc/x"));
        assert_eq!(resolve("/../..", &u).unwrap(), PathBuf::from("/"));
        assert!(resolve("~root/x", &u).is_err());
        assert!(resolve("/a\0b", &u).is_err());
        assert_eq!(
            resolve_bytes(b"/tmp/\xff\xfe", &u)
                .unwrap()
                .as_os_str()
                .as_bytes(),
            b"/tmp/\xff\xfe"
        );
    }
}
