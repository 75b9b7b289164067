//! Filesystem mutations with E2B's rules: directories created for a user are
//! owned by that user; move falls back to copy + remove across filesystems;
//! remove is `rm -rf` and succeeds on a missing path.

use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
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
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(false),
        Ok(_) => match std::fs::metadata(dir) {
            Ok(m) if m.is_dir() => return Ok(false),
            _ => {
                return Err(Error::invalid(format!(
                    "'{}' exists and is not a directory",
                    dir.display()
                )))
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dir.display(), &e)),
    }
    if let Some(parent) = dir.parent() {
        ensure_dir(parent, user)?;
    }
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => {
            chown_to(dir, user)?;
            Ok(true)
        }
        // Created concurrently by someone else: fine.
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && dir.is_dir() => Ok(false),
        Err(e) => Err(mkdir_error(dir, &e)),
    }
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
            let copied = copy_tree(src, &tmp);
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

/// A hidden, unique name in the same directory as `path`.
pub fn sibling_temp(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map_or_else(|| "x".into(), |n| n.to_string_lossy().into_owned());
    let unique = crate::ids::random_id(12);
    path.with_file_name(format!(".{name}.envd-{unique}.tmp"))
}

/// Whether a file name is one made by [`sibling_temp`].
pub fn is_sibling_temp(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp") && name.contains(".envd-")
}

/// Recursive copy that keeps symlinks as links and preserves mode, owner and
/// modification time.
fn copy_tree(src: &Path, dst: &Path) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        std::os::unix::fs::symlink(std::fs::read_link(src)?, dst)?;
    } else if ft.is_dir() {
        std::fs::DirBuilder::new().mode(0o700).create(dst)?;
        for entry in std::fs::read_dir(src)? {
            let entry = entry?;
            copy_tree(&entry.path(), &dst.join(entry.file_name()))?;
        }
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    } else {
        std::fs::copy(src, dst)?;
    }
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    if !ft.is_symlink() {
        let mtime = std::time::UNIX_EPOCH
            + std::time::Duration::new(meta.mtime() as u64, meta.mtime_nsec() as u32);
        let f = std::fs::File::open(dst)?;
        f.set_modified(mtime)?;
    }
    Ok(())
}

/// `rm -rf`: a missing path is success; a symlink is removed, not followed.
pub fn remove_path(path: &Path) -> Result<()> {
    let r = match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) => Err(e),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), &e)),
    }
}
