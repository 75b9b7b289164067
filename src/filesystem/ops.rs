//! Filesystem mutations with E2B's rules: directories created for a user are
//! owned by that user; move falls back to copy + remove across filesystems;
//! remove is `rm -rf` and succeeds on a missing path.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::status::{Code, Error, Result};
use crate::users::User;

/// Gives a path envd created to the user (only when envd is root; otherwise
/// envd can only create files as itself).
pub fn chown_to(path: &Path, user: &User) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(user.uid), Some(user.gid))
        .map_err(|e| Error::io(format!("chown {}", path.display()), &e))
}

/// Creates `dir` and any missing parents (mode 0755); each directory created
/// here is owned by `user`. Returns whether `dir` itself was created.
pub fn ensure_dir(dir: &Path, user: &User) -> Result<bool> {
    // Walk up to the deepest existing ancestor, then create downwards.
    let mut missing = Vec::new();
    let mut at = dir;
    loop {
        match std::fs::symlink_metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => match std::fs::metadata(at) {
                Ok(m) if m.is_dir() => break,
                _ => {
                    return Err(Error::invalid(format!(
                        "'{}' exists and is not a directory",
                        at.display()
                    )))
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => missing.push(at),
            Err(e) => return Err(Error::io(at.display(), &e)),
        }
        match at.parent() {
            Some(p) => at = p,
            None => break,
        }
    }
    let mut created = false;
    for d in missing.into_iter().rev() {
        created = match std::fs::DirBuilder::new().mode(0o755).create(d) {
            Ok(()) => {
                chown_to(d, user)?;
                true
            }
            // Created concurrently by someone else: fine.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && d.is_dir() => false,
            Err(e) => return Err(mkdir_error(d, &e)),
        };
    }
    Ok(created)
}

fn mkdir_error(dir: &Path, e: &io::Error) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOTDIR) => Error::invalid(format!(
            "cannot create '{}': a parent is not a directory",
            dir.display()
        )),
        _ => Error::io(format!("create directory {}", dir.display()), e),
    }
}

/// MakeDir: ALREADY_EXISTS if the directory is there already.
pub fn make_dir(dir: &Path, user: &User) -> Result<()> {
    if ensure_dir(dir, user)? {
        Ok(())
    } else {
        Err(Error::new(
            Code::AlreadyExists,
            format!("directory '{}' already exists", dir.display()),
        ))
    }
}

/// Move: rename, creating the destination's parents; across filesystems,
/// copy (preserving modes, owners, times and links) then remove the source.
pub fn move_path(src: &Path, dst: &Path, user: &User) -> Result<()> {
    std::fs::symlink_metadata(src).map_err(|e| Error::io(format!("move {}", src.display()), &e))?;
    if let Some(parent) = dst.parent() {
        ensure_dir(parent, user)?;
    }
    match std::fs::rename(src, dst) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            let tmp = sibling_temp(dst);
            let copied = super::tree::copy_tree(src, &tmp);
            if let Err(e) = copied {
                let _ = remove_path(&tmp);
                return Err(Error::io(
                    format!("copy {} to {}", src.display(), dst.display()),
                    &e,
                ));
            }
            std::fs::rename(&tmp, dst).map_err(|e| {
                let _ = remove_path(&tmp);
                Error::io(format!("move into place {}", dst.display()), &e)
            })?;
            remove_path(src)
        }
        Err(e) => Err(Error::io(
            format!("move {} to {}", src.display(), dst.display()),
            &e,
        )),
    }
}

/// Prefix and suffix of envd's temporary files (see [`sibling_temp`]).
const TEMP_PREFIX: &str = ".envd-";
const TEMP_SUFFIX: &str = ".tmp";

/// A hidden, unique name in the same directory as `path`. Its length is fixed
/// (22 bytes) and independent of the target's name, so every legal target
/// name, up to 255 bytes, has a temporary sibling.
pub fn sibling_temp(path: &Path) -> PathBuf {
    let unique = crate::ids::random_id(12);
    path.with_file_name(format!("{TEMP_PREFIX}{unique}{TEMP_SUFFIX}"))
}

/// Whether a file name is one made by [`sibling_temp`].
pub fn is_sibling_temp(name: &[u8]) -> bool {
    name.len() == TEMP_PREFIX.len() + 12 + TEMP_SUFFIX.len()
        && name.starts_with(TEMP_PREFIX.as_bytes())
        && name.ends_with(TEMP_SUFFIX.as_bytes())
}

/// `rm -rf`: a missing path is success; a symlink is removed, not followed.
/// Directory trees of any depth are removed iteratively.
pub fn remove_path(path: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => super::tree::remove_dir_tree(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), &e)),
    }
}
