//! `EntryInfo` for a path: type, size, mode, `ls -l` permissions, owner and
//! group names, mtime, `user.e2b.*` metadata, and symlink details.
//!
//! Names that are not valid UTF-8 are shown lossily (invalid bytes become
//! U+FFFD), since protobuf strings must be UTF-8; nothing panics on them.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::proto::filesystem::{EntryInfo, FileType};
use crate::status::{Error, Result};

/// Extended attributes with this prefix are the entry's metadata.
pub const XATTR_PREFIX: &str = "user.e2b.";

/// Caches uid/gid → name lookups for one request (ListDir of many entries).
#[derive(Debug, Default)]
pub struct Names {
    users: HashMap<u32, String>,
    groups: HashMap<u32, String>,
}

impl Names {
    fn user(&mut self, uid: u32) -> String {
        self.users
            .entry(uid)
            .or_insert_with(|| crate::users::user_name(uid).unwrap_or_else(|| uid.to_string()))
            .clone()
    }

    fn group(&mut self, gid: u32) -> String {
        self.groups
            .entry(gid)
            .or_insert_with(|| crate::users::group_name(gid).unwrap_or_else(|| gid.to_string()))
            .clone()
    }
}

/// The entry at `path` (not following a final symlink). `shown` is the path
/// reported to the client.
pub fn entry_info(path: &Path, shown: &Path, names: &mut Names) -> Result<EntryInfo> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path.display(), &e))?;
    Ok(from_metadata(path, shown, &meta, names))
}

/// Like [`entry_info`] with metadata already at hand.
pub fn from_metadata(path: &Path, shown: &Path, meta: &Metadata, names: &mut Names) -> EntryInfo {
    let is_symlink = meta.file_type().is_symlink();
    // For links, type and mode are the target's (as current E2B reports them).
    let (kind_meta, symlink_target) = if is_symlink {
        let target = std::fs::canonicalize(path)
            .or_else(|_| std::fs::read_link(path))
            .map(|t| t.to_string_lossy().into_owned())
            .ok();
        (std::fs::metadata(path).ok(), target)
    } else {
        (None, None)
    };
    let kind = kind_meta.as_ref().map_or(file_type(meta), file_type);
    let mode = kind_meta.as_ref().unwrap_or(meta).mode() & 0o7777;
    EntryInfo {
        name: shown
            .file_name()
            .map_or_else(|| shown.to_string_lossy(), |n| n.to_string_lossy())
            .into_owned(),
        r#type: if is_symlink && kind_meta.is_none() {
            FileType::Unspecified as i32
        } else {
            kind as i32
        },
        path: shown.to_string_lossy().into_owned(),
        size: i64::try_from(meta.size()).unwrap_or(i64::MAX),
        mode: mode & 0o777,
        permissions: permissions(meta.mode()),
        owner: names.user(meta.uid()),
        group: names.group(meta.gid()),
        modified_time: Some(prost_types::Timestamp {
            seconds: meta.mtime(),
            nanos: i32::try_from(meta.mtime_nsec()).unwrap_or(0),
        }),
        symlink_target,
        metadata: if is_symlink {
            HashMap::new()
        } else {
            metadata(path)
        },
        is_symlink,
    }
}

fn file_type(meta: &Metadata) -> FileType {
    let t = meta.file_type();
    if t.is_dir() {
        FileType::Directory
    } else if t.is_file() {
        FileType::File
    } else if t.is_symlink() {
        FileType::Symlink
    } else {
        FileType::Unspecified
    }
}

/// `ls -l`'s mode string: `-rw-r--r--`, `drwxr-xr-x`, `lrwxrwxrwx`, with
/// setuid/setgid/sticky as `s`/`S`, `t`/`T`.
pub fn permissions(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 's',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => '-',
    };
    let mut s = String::with_capacity(10);
    s.push(kind);
    let bit = |b: u32, c: char| if mode & b != 0 { c } else { '-' };
    let special = |x: u32, sp: u32, on: char, off: char| match (mode & x != 0, mode & sp != 0) {
        (true, true) => on,
        (false, true) => off,
        (true, false) => 'x',
        (false, false) => '-',
    };
    s.push(bit(0o400, 'r'));
    s.push(bit(0o200, 'w'));
    s.push(special(0o100, 0o4000, 's', 'S'));
    s.push(bit(0o040, 'r'));
    s.push(bit(0o020, 'w'));
    s.push(special(0o010, 0o2000, 's', 'S'));
    s.push(bit(0o004, 'r'));
    s.push(bit(0o002, 'w'));
    s.push(special(0o001, 0o1000, 't', 'T'));
    s
}

/// `user.e2b.*` extended attributes, prefix stripped; non-UTF-8 ones skipped.
fn metadata(path: &Path) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let Ok(cpath) = CString::new(path.as_os_str().as_bytes()) else {
        return out;
    };
    let mut names = vec![0u8; 4096];
    // SAFETY: the buffer is valid for its length; the path is NUL-terminated.
    let n = unsafe { libc::llistxattr(cpath.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    let Some(n) = usize::try_from(n).ok().filter(|n| *n > 0) else {
        return out;
    };
    names.truncate(n);
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let Some(key) = name.strip_prefix(XATTR_PREFIX) else {
            continue;
        };
        let Ok(cname) = CString::new(name) else {
            continue;
        };
        let mut value = vec![0u8; 4096];
        // SAFETY: as above; value buffer valid for its length.
        let len = unsafe {
            libc::lgetxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        let Ok(len) = usize::try_from(len) else {
            continue; // -1: gone meanwhile, or too large
        };
        value.truncate(len);
        if let Ok(v) = String::from_utf8(value) {
            out.insert(key.to_owned(), v);
        }
    }
    out
}

/// Sets `user.e2b.<key>` attributes on the open `file`; messages name
/// `shown`.
pub fn set_metadata(file: &std::fs::File, shown: &Path, meta: &[(String, String)]) -> Result<()> {
    use std::os::fd::AsRawFd;
    for (k, v) in meta {
        let cname = CString::new(format!("{XATTR_PREFIX}{k}"))
            .map_err(|_| Error::invalid(format!("metadata key {k:?} contains NUL")))?;
        // SAFETY: an open fd, a NUL-terminated name, and a value slice valid
        // for its length.
        let rc = unsafe {
            libc::fsetxattr(
                file.as_raw_fd(),
                cname.as_ptr(),
                v.as_ptr().cast(),
                v.len(),
                0,
            )
        };
        if rc != 0 {
            return Err(Error::io(
                format!("set metadata {k} on {}", shown.display()),
                &std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_style_permissions() {
        assert_eq!(permissions(libc::S_IFREG | 0o644), "-rw-r--r--");
        assert_eq!(permissions(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions(libc::S_IFLNK | 0o777), "lrwxrwxrwx");
        assert_eq!(permissions(libc::S_IFREG | 0o4755), "-rwsr-xr-x");
        assert_eq!(permissions(libc::S_IFDIR | 0o1777), "drwxrwxrwt");
        assert_eq!(permissions(libc::S_IFREG | 0o2644), "-rw-r-Sr--");
    }
}
