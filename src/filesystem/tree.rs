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
use std::os::unix::fs::MetadataExt;

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
fn open_dir_at<P: ?Sized + nix::NixPath>(parent: impl AsFd, name: &P) -> nix::Result<Dir> {
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

/// Removes the entry `name` of the directory open at `parent` (`rm -r` if
/// it is a directory), only if it is the file `expect` (device, inode) when
/// given. A directory's removal descends with `openat(O_NOFOLLOW)` relative
/// to each parent's open fd, so a concurrent rename or symlink swap cannot
/// redirect it outside the tree, and the directory it opens must be the one
/// it looked at: what a process swaps in under the name meanwhile (a root
/// directory of the user's, for one) is left alone, with an error. Stops
/// with an error when `stop` says so, leaving the rest.
pub fn remove_entry_at(
    parent: BorrowedFd,
    name: &std::ffi::OsStr,
    expect: Option<Identity>,
    stop: &Stop,
) -> io::Result<()> {
    let name = c_name(name)?;
    let st = nix::sys::stat::fstatat(parent, name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)?;
    let seen = identity(st);
    if expect.is_some_and(|e| e != seen) {
        return Err(replaced(&name));
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Ok(nix::unistd::unlinkat(
            parent,
            name.as_c_str(),
            UnlinkatFlags::NoRemoveDir,
        )?);
    }
    let top = open_dir_at(parent, name.as_c_str())?;
    if identity(nix::sys::stat::fstat(&top)?) != seen {
        return Err(replaced(&name));
    }
    // Each frame: an open directory and its name in the frame below.
    let mut stack: Vec<(Dir, CString)> = vec![(top, name)];
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
                Some((above, _)) => unlink_at(above, &name, UnlinkatFlags::RemoveDir)?,
                None => nix::unistd::unlinkat(parent, name.as_c_str(), UnlinkatFlags::RemoveDir)?,
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
            match open_dir_at(dir.as_fd(), name.as_c_str()) {
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

/// The error for an entry that is no longer the file it was.
fn replaced(name: &CStr) -> io::Error {
    io::Error::other(format!(
        "'{}' was replaced by another file meanwhile; it is left as it is",
        name.to_string_lossy()
    ))
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

/// What a copy's attributes go onto: an entry it made, held open (a
/// directory or a regular file), or a symlink it made, by its name in the
/// directory open at the first fd (a symlink cannot be opened for this).
enum Made<'a> {
    Open(BorrowedFd<'a>),
    Link(BorrowedFd<'a>, &'a CStr),
}

/// Owner (when root), mode and times of `meta` onto what the copy made. The
/// owner goes first: a chown clears the set-user-ID and set-group-ID bits
/// that the mode then sets again (as `cp -a` does). Nothing here resolves a
/// path: what a process in the sandbox renames meanwhile is not followed.
fn copy_attributes(made: Made, meta: &std::fs::Metadata) -> io::Result<()> {
    let owner = nix::unistd::geteuid().is_root().then(|| {
        (
            Some(nix::unistd::Uid::from_raw(meta.uid())),
            Some(nix::unistd::Gid::from_raw(meta.gid())),
        )
    });
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    match made {
        Made::Open(fd) => {
            if let Some((uid, gid)) = owner {
                nix::unistd::fchown(fd, uid, gid)?;
            }
            nix::sys::stat::fchmod(fd, Mode::from_bits_truncate(meta.mode() & 0o7777))?;
            // Any time the filesystem stored, pre-1970 included, is valid.
            nix::sys::stat::futimens(fd, &atime, &mtime)?;
        }
        Made::Link(dir, name) => {
            if let Some((uid, gid)) = owner {
                nix::unistd::fchownat(dir, name, uid, gid, AtFlags::AT_SYMLINK_NOFOLLOW)?;
            }
            nix::sys::stat::utimensat(
                dir,
                name,
                &atime,
                &mtime,
                nix::sys::stat::UtimensatFlags::NoFollowSymlink,
            )?;
        }
    }
    Ok(())
}

/// Opens the directory `name` that the caller has just made in the
/// directory open at `parent`, never through a symlink, and only while it
/// is still empty. Whoever makes a directory for root to change (give an
/// owner, a mode, contents) opens it this way: a link put in its place
/// between the two calls is refused (`O_NOFOLLOW`), and so is any directory
/// with entries (`AlreadyExists`), such as a root directory that a user
/// traded in under the name in a directory it owns, which would otherwise
/// be handed to the user with its contents. An empty one gives nobody
/// anything. The owner is not checked: on a file system that maps root to
/// another user (NFS `root_squash`) envd's own new directory is not root's
/// either.
pub fn open_made_dir<P: ?Sized + nix::NixPath>(parent: BorrowedFd, name: &P) -> io::Result<Dir> {
    let mut dir = open_dir_at(parent, name)?;
    // The iterator rewinds the directory when dropped.
    let full = dir
        .iter()
        .any(|e| e.map_or(true, |e| !is_dot(e.file_name())));
    if full {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a directory with entries was put in its place while it was made",
        ));
    }
    Ok(dir)
}

/// Makes the directory `name` in the directory open at `parent` (0700 until
/// its attributes are copied) and opens it ([`open_made_dir`]: below the
/// copy's top only envd may change anything, so only the top can be traded).
/// `made` is told which directory it is once it has passed, for an undo to
/// remove that one only: a refused one may be a root directory.
fn make_dir_at(parent: BorrowedFd, name: &CStr, made: &mut dyn FnMut(Identity)) -> io::Result<Dir> {
    nix::sys::stat::mkdirat(parent, name, Mode::S_IRWXU)?;
    let dir = open_made_dir(parent, name)?;
    made(identity(nix::sys::stat::fstat(&dir)?));
    Ok(dir)
}

/// Copies one non-directory, the entry `name` of the source directory open
/// at `dir` (`meta` is what `lstat` saw), to the new entry `dst_name` of the
/// directory open at `dst`: a regular file's bytes, a symlink as a link.
/// Anything else (device, FIFO, socket) is refused: reading it could block
/// forever or never end. The file is opened without following a symlink
/// and must be the one `lstat` saw: an entry swapped for a link to a root
/// file since must not be read into a copy that gets the entry's owner and
/// mode. The new file is made with `O_EXCL | O_NOFOLLOW` and given its
/// attributes through its own fd.
fn copy_leaf(
    dir: BorrowedFd,
    name: &CStr,
    dst: BorrowedFd,
    dst_name: &CStr,
    meta: &std::fs::Metadata,
    made: &mut dyn FnMut(Identity),
) -> io::Result<()> {
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = nix::fcntl::readlinkat(dir, name)?;
        nix::unistd::symlinkat(target.as_os_str(), dst, dst_name)?;
        made(identity(nix::sys::stat::fstatat(
            dst,
            dst_name,
            AtFlags::AT_SYMLINK_NOFOLLOW,
        )?));
        copy_attributes(Made::Link(dst, dst_name), meta)
    } else if ft.is_file() {
        let (from, _) =
            super::pin::open_seen(dir, std::ffi::OsStr::from_bytes(name.to_bytes()), meta)?;
        let to = nix::fcntl::openat(
            dst,
            dst_name,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )?;
        let mut to = std::fs::File::from(to);
        made(identity(nix::sys::stat::fstat(&to)?));
        // The size `lstat` saw, not until end of file: a file that a process
        // keeps appending to would otherwise never finish copying.
        io::copy(&mut io::Read::take(from, meta.len()), &mut to)?;
        copy_attributes(Made::Open(to.as_fd()), meta)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "'{}' is not a regular file, directory or symlink",
                name.to_string_lossy()
            ),
        ))
    }
}

/// `lstat` of the entry `name` of the directory open at `dir`.
fn lstat_at(dir: BorrowedFd, name: &CStr) -> io::Result<std::fs::Metadata> {
    let name = std::ffi::OsStr::from_bytes(name.to_bytes());
    std::fs::symlink_metadata(super::pin::fd_path(dir, name))
}

/// Which file an entry is: (device, inode).
pub type Identity = (u64, u64);

pub fn identity(st: nix::sys::stat::FileStat) -> Identity {
    (st.st_dev, st.st_ino)
}

/// A name as the `*at` calls take it.
fn c_name(name: &std::ffi::OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Copies the entry `src_name` of the directory open at `src_dir` to the new
/// entry `dst_name` of the directory open at `dst_dir`, keeping symlinks as
/// links and preserving modes, owners and modification times. Iterative; a
/// directory's attributes are applied once its contents are in. Both trees
/// are reached only through open directory fds, each entered with
/// `O_NOFOLLOW`: a directory swapped for a symlink mid-copy, on either side,
/// is never followed, and nothing the copy makes or changes is reached by a
/// path. Each file gets the bytes its size said when it was reached. Stops
/// with an error when `stop` says so; `stop.visited()` then bounds what was
/// made. `made` is told which file the copy's top is as soon as it exists
/// (an unfinished copy too), for the caller to check that the name still
/// leads to it before it moves the copy into place or removes it again.
pub fn copy_tree(
    src_dir: BorrowedFd,
    src_name: &std::ffi::OsStr,
    dst_dir: BorrowedFd,
    dst_name: &std::ffi::OsStr,
    stop: &Stop,
    made: &mut dyn FnMut(Identity),
) -> io::Result<()> {
    let (src_name, dst_name) = (c_name(src_name)?, c_name(dst_name)?);
    let meta = lstat_at(src_dir, &src_name)?;
    if !meta.is_dir() {
        return copy_leaf(src_dir, &src_name, dst_dir, &dst_name, &meta, made);
    }
    /// A directory being copied: its entries are read one at a time, as the
    /// copy reaches them (a directory of millions of entries costs no more).
    struct Frame {
        src: OwningIter,
        dst: Dir,
        meta: std::fs::Metadata,
    }
    /// Opens the source directory and makes its copy; `made` as above.
    fn open(
        src: BorrowedFd,
        src_name: &CStr,
        dst: BorrowedFd,
        dst_name: &CStr,
        meta: std::fs::Metadata,
        made: &mut dyn FnMut(Identity),
    ) -> io::Result<Frame> {
        let src = open_dir_at(src, src_name)?.into_iter();
        let dst = make_dir_at(dst, dst_name, made)?;
        Ok(Frame { src, dst, meta })
    }
    stop.check()?;
    let mut stack = vec![open(src_dir, &src_name, dst_dir, &dst_name, meta, made)?];
    while let Some(top) = stack.last_mut() {
        let name = match top.src.next() {
            Some(entry) => entry?.file_name().to_owned(),
            None => {
                let done = stack.pop().expect("the loop saw a frame");
                copy_attributes(Made::Open(done.dst.as_fd()), &done.meta)?;
                continue;
            }
        };
        if is_dot(&name) {
            continue;
        }
        stop.check()?;
        let meta = match lstat_at(borrow_dir(&top.src), &name) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // vanished
            Err(e) => return Err(e),
        };
        if meta.is_dir() {
            let frame = open(
                borrow_dir(&top.src),
                &name,
                top.dst.as_fd(),
                &name,
                meta,
                &mut |_| {},
            )?;
            stack.push(frame);
        } else {
            copy_leaf(
                borrow_dir(&top.src),
                &name,
                top.dst.as_fd(),
                &name,
                &meta,
                &mut |_| {},
            )?;
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
    use std::path::Path;

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
        let top = std::fs::File::open(tmp.path()).unwrap();
        remove_entry_at(top.as_fd(), "t".as_ref(), None, &Stop::after(u64::MAX)).unwrap();
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
        let top = std::fs::File::open(tmp.path()).unwrap();
        copy_tree(
            top.as_fd(),
            "s".as_ref(),
            top.as_fd(),
            "c".as_ref(),
            &Stop::after(u64::MAX),
            &mut |_| {},
        )
        .unwrap();
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
