//! Whole-tree operations (remove, copy) as iterative walks: a tree's depth is
//! controlled by whoever runs code in the sandbox, so no walk recurses on the
//! call stack. Depth costs heap (one small frame per level) and one open
//! directory per level: both walks go through directory fds, never through a
//! path a process could swap for a symlink on the way. A directory's width
//! costs nothing: its entries are read as the walk goes, never gathered. And
//! since the same code can grow a tree as fast as it is walked, each walk
//! checks a [`Stop`] at every entry.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::dir::{Dir, OwningIter, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::unistd::UnlinkatFlags;

use super::stop::Stop;

fn is_dot(name: &CStr) -> bool {
    matches!(name.to_bytes(), b"." | b"..")
}

/// Opens directory `name` inside `parent` without following a symlink, so a
/// directory swapped for a link mid-walk is never entered.
fn open_dir_at(parent: impl AsFd, name: &CStr) -> nix::Result<Dir> {
    Dir::openat(
        parent,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

fn is_dir_at(parent: impl AsFd, name: &CStr, hint: Option<Type>) -> nix::Result<bool> {
    match hint {
        Some(t) => Ok(t == Type::Directory),
        None => {
            let st = nix::sys::stat::fstatat(parent, name, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            Ok(SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR)
        }
    }
}

/// `rm -r` of the directory `root` (which must not be a symlink): every
/// descent is an `openat(O_NOFOLLOW)` relative to the parent's open fd, so a
/// concurrent rename or symlink swap cannot redirect it outside the tree.
/// Stops with an error when `stop` says so, leaving the rest.
pub fn remove_dir_tree(root: &Path, stop: &Stop) -> io::Result<()> {
    let top = Dir::open(
        root,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // Each frame: an open directory and its name in the frame below.
    let mut stack: Vec<(Dir, CString)> = vec![(top, CString::default())];
    while let Some((dir, _)) = stack.last_mut() {
        // A batch of entries from the directory's beginning (the iterator
        // rewinds when dropped); what earlier passes removed is gone from it.
        let mut batch = Vec::with_capacity(REMOVE_BATCH);
        for entry in dir.iter() {
            let entry = entry?;
            if !is_dot(entry.file_name()) {
                batch.push((entry.file_name().to_owned(), entry.file_type()));
                if batch.len() == REMOVE_BATCH {
                    break;
                }
            }
        }
        if batch.is_empty() {
            // Empty: remove it from its parent.
            let (done, name) = stack.pop().expect("the loop saw a frame");
            drop(done);
            match stack.last() {
                Some((parent, _)) => unlink_at(parent, &name, UnlinkatFlags::RemoveDir)?,
                None => std::fs::remove_dir(root)?,
            }
            continue;
        }
        let mut subdir = None;
        for (name, hint) in batch {
            stop.check()?;
            if is_dir_at(dir.as_fd(), &name, hint)? {
                subdir = Some(name);
                break;
            }
            unlink_at(dir, &name, UnlinkatFlags::NoRemoveDir)?;
        }
        if let Some(name) = subdir {
            match open_dir_at(dir.as_fd(), &name) {
                Ok(child) => stack.push((child, name)),
                // Replaced by a non-directory meanwhile: remove that instead.
                Err(Errno::ENOTDIR | Errno::ELOOP) => {
                    unlink_at(dir, &name, UnlinkatFlags::NoRemoveDir)?
                }
                Err(Errno::ENOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// Entries read per pass over a directory being emptied.
const REMOVE_BATCH: usize = 256;

/// `unlinkat`, where an entry already gone is success.
fn unlink_at(dir: &Dir, name: &CStr, flags: UnlinkatFlags) -> io::Result<()> {
    match nix::unistd::unlinkat(dir.as_fd(), name, flags) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Sets `path`'s modification time to that of `meta` (not following a
/// symlink). Any time the filesystem stored, pre-1970 included, is valid.
fn copy_mtime(path: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &atime,
        &mtime,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

/// Mode, owner (when root) and times of `src`'s metadata onto `dst`.
fn copy_attributes(dst: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    if !meta.file_type().is_symlink() {
        std::fs::set_permissions(dst, std::fs::Permissions::from_mode(meta.mode() & 0o7777))?;
    }
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::lchown(dst, Some(meta.uid()), Some(meta.gid()))?;
    }
    copy_mtime(dst, meta)
}

/// Copies one non-directory, the entry `name` of the source directory open
/// at `dir` (`meta` is what `lstat` saw): a regular file's bytes, a symlink
/// as a link. Anything else (device, FIFO, socket) is refused: reading it
/// could block forever or never end. The file is opened without following a
/// symlink and must be the one `lstat` saw: an entry swapped for a link to
/// a root file since must not be read into a copy that gets the entry's
/// owner and mode.
fn copy_leaf(dir: BorrowedFd, name: &CStr, dst: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = nix::fcntl::readlinkat(dir, name)?;
        std::os::unix::fs::symlink(target, dst)?;
    } else if ft.is_file() {
        let (from, _) =
            super::pin::open_seen(dir, std::ffi::OsStr::from_bytes(name.to_bytes()), meta)?;
        let mut to = std::fs::File::create_new(dst)?;
        // The size `lstat` saw, not until end of file: a file that a process
        // keeps appending to would otherwise never finish copying.
        io::copy(&mut io::Read::take(from, meta.len()), &mut to)?;
    } else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{}' is not a regular file, directory or symlink",
                name.to_string_lossy()
            ),
        ));
    }
    copy_attributes(dst, meta)
}

/// `lstat` of the entry `name` of the directory open at `dir`.
fn lstat_at(dir: BorrowedFd, name: &CStr) -> io::Result<std::fs::Metadata> {
    let name = std::ffi::OsStr::from_bytes(name.to_bytes());
    std::fs::symlink_metadata(super::pin::fd_path(dir, name))
}

/// Copies the tree at `src` to the new path `dst`, keeping symlinks as links
/// and preserving modes, owners and modification times. Iterative; a
/// directory's attributes are applied once its contents are in. The source
/// is read through open directory fds, each entered with `O_NOFOLLOW`: a
/// directory inside it swapped for a symlink mid-copy is never followed.
/// Each file gets the bytes its size said when it was reached. Stops with
/// an error when `stop` says so; `stop.visited()` then bounds what was made.
pub fn copy_tree(src: &Path, dst: &Path, stop: &Stop) -> io::Result<()> {
    let meta = std::fs::symlink_metadata(src)?;
    let (parent, name) = match (src.parent(), src.file_name()) {
        (Some(p), Some(n)) => (p, n),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    let parent = Dir::open(
        parent,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let name =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    if !meta.is_dir() {
        return copy_leaf(parent.as_fd(), &name, dst, &meta);
    }
    /// A directory being copied: its entries are read one at a time, as the
    /// copy reaches them (a directory of millions of entries costs no more).
    struct Frame {
        src: OwningIter,
        dst: PathBuf,
        meta: std::fs::Metadata,
    }
    let open = |parent: BorrowedFd, name: &CStr, dst: PathBuf, meta| -> io::Result<Frame> {
        let src = open_dir_at(parent, name)?.into_iter();
        std::fs::DirBuilder::new().mode(0o700).create(&dst)?;
        Ok(Frame { src, dst, meta })
    };
    stop.check()?;
    let mut stack = vec![open(parent.as_fd(), &name, dst.to_path_buf(), meta)?];
    while let Some(top) = stack.last_mut() {
        let name = match top.src.next() {
            Some(entry) => entry?.file_name().to_owned(),
            None => {
                let done = stack.pop().expect("the loop saw a frame");
                copy_attributes(&done.dst, &done.meta)?;
                continue;
            }
        };
        if is_dot(&name) {
            continue;
        }
        stop.check()?;
        let d = top.dst.join(std::ffi::OsStr::from_bytes(name.to_bytes()));
        let meta = match lstat_at(borrow_dir(&top.src), &name) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // vanished
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            let frame = open(borrow_dir(&top.src), &name, d, meta)?;
            stack.push(frame);
        } else {
            copy_leaf(borrow_dir(&top.src), &name, &d, &meta)?;
        }
    }
    Ok(())
}

/// The directory fd a copy frame reads from.
fn borrow_dir(iter: &OwningIter) -> BorrowedFd<'_> {
    use std::os::fd::AsRawFd;
    // SAFETY: the fd belongs to the `Dir` inside `iter`, which closes it only
    // when dropped; the returned borrow cannot outlive `iter`.
    unsafe { BorrowedFd::borrow_raw(iter.as_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain of `depth` nested directories under `root`, built with
    /// relative paths so it may exceed PATH_MAX.
    fn deep_tree(root: &Path, depth: usize) {
        let mut dir = std::fs::File::open(root).unwrap();
        for _ in 0..depth {
            nix::sys::stat::mkdirat(dir.as_fd(), "d", Mode::from_bits_truncate(0o755)).unwrap();
            std::fs::write(
                format!("/proc/self/fd/{}/f", {
                    use std::os::fd::AsRawFd;
                    dir.as_raw_fd()
                }),
                b"x",
            )
            .unwrap();
            let fd = nix::fcntl::openat(
                dir.as_fd(),
                "d",
                OFlag::O_RDONLY | OFlag::O_DIRECTORY,
                Mode::empty(),
            )
            .unwrap();
            dir = std::fs::File::from(fd);
        }
    }

    #[test]
    fn removes_a_tree_deeper_than_path_max() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("t");
        std::fs::create_dir(&root).unwrap();
        deep_tree(&root, 3000);
        remove_dir_tree(&root, &Stop::after(u64::MAX)).unwrap();
        assert!(!root.exists());
    }

    #[test]
    fn copies_deep_trees_and_old_times() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("s");
        std::fs::create_dir(&src).unwrap();
        let mut p = src.clone();
        for _ in 0..1500 {
            p.push("d");
        }
        std::fs::create_dir_all(&p).unwrap();
        let f = src.join("old");
        std::fs::write(&f, b"1969").unwrap();
        let t = TimeSpec::new(-86_400 * 365, 0);
        nix::sys::stat::utimensat(
            nix::fcntl::AT_FDCWD,
            &f,
            &t,
            &t,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
        let dst = tmp.path().join("c");
        copy_tree(&src, &dst, &Stop::after(u64::MAX)).unwrap();
        assert_eq!(std::fs::read(dst.join("old")).unwrap(), b"1969");
        assert_eq!(
            std::fs::metadata(dst.join("old")).unwrap().mtime(),
            -86_400 * 365
        );
        let mut q = dst.clone();
        for _ in 0..1500 {
            q.push("d");
        }
        assert!(q.is_dir());
    }
}
