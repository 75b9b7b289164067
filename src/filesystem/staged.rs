//! A file written beside its target and put in the target's place by one
//! rename, so that the target never shows a partial write (uploads, compose).
//!
//! Where the file system can (`O_TMPFILE`: ext4, xfs, btrfs, tmpfs, ...),
//! the file has no name until it is complete: it gets a hidden name
//! ([`sibling_temp_name`]) only for the moment between `linkat` and the
//! rename. Whatever ends envd mid-write (a crash, `kill -9`, the exec of a
//! live upgrade) leaves nothing behind, because the kernel frees an unnamed
//! file with its last descriptor. Elsewhere (NFS, FUSE, 9p, overlayfs before
//! Linux 6.6) the file is a hidden sibling from the start: removed when the
//! write fails or is dropped, and registered ([`super::hidden`]) so that the
//! next envd image removes it if this one dies with it.
//!
//! No rename may replace a mount point: a target that a file is
//! bind-mounted on (`EBUSY`) is overwritten in place instead, as E2B's envd
//! writes every file, from the finished file. Only a failure within that
//! copy (a full disk) can leave such a target partly written.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use nix::unistd::UnlinkatFlags;

use super::hidden::Registered;
use super::ops::sibling_temp_name;
use super::pin;

/// A file being written for a target in a pinned directory; see the module.
/// Dropped before [`Staged::publish`], it leaves nothing behind.
pub struct Staged {
    /// The hidden name the file has had from the start; `None` while it has
    /// no name (`O_TMPFILE`).
    named: Option<Named>,
}

/// The hidden sibling of a file system without `O_TMPFILE`.
struct Named {
    name: OsString,
    /// Its path through the pinned directory's fd (see [`pin::Dir::path_of`]).
    path: PathBuf,
    _registered: Registered,
}

impl Staged {
    /// A new empty file (mode `mode` less the umask, owned by envd) in `dir`,
    /// open for writing (and reading, for [`overwrite`]).
    pub fn create(dir: &pin::Dir, mode: u32) -> std::io::Result<(Staged, File)> {
        let mode = Mode::from_bits_truncate(mode);
        let flags = OFlag::O_RDWR | OFlag::O_CLOEXEC;
        match nix::fcntl::openat(dir.fd(), ".", flags | OFlag::O_TMPFILE, mode) {
            Ok(fd) => return Ok((Staged { named: None }, File::from(fd))),
            // The file system (or a kernel before 3.11, which takes the
            // flag for O_DIRECTORY) has no unnamed files.
            Err(Errno::EOPNOTSUPP | Errno::EISDIR | Errno::EINVAL) => {}
            Err(e) => return Err(e.into()),
        }
        let name = sibling_temp_name();
        // Registered before it exists (see [`Registered`]).
        let registered = Registered::new(dir.shown_of(&name));
        let fd = nix::fcntl::openat(
            dir.fd(),
            name.as_os_str(),
            flags | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW,
            mode,
        )?;
        registered.made(super::tree::identity(nix::sys::stat::fstat(&fd)?));
        let named = Named {
            path: dir.path_of(&name),
            _registered: registered,
            name,
        };
        Ok((Staged { named: Some(named) }, File::from(fd)))
    }

    /// Puts the finished `file` (the one [`Staged::create`] gave) in place
    /// of `name` in `dir`, replacing what is there; see [`Published`].
    pub fn publish(
        mut self,
        file: &File,
        dir: &pin::Dir,
        name: &std::ffi::OsStr,
    ) -> std::io::Result<Published> {
        let hidden = match self.named.take() {
            // Unregistered here: the rename follows at once.
            Some(n) => n.name,
            None => {
                let hidden = sibling_temp_name();
                link_unnamed(file, dir, &hidden)?;
                hidden
            }
        };
        let renamed = nix::fcntl::renameat(dir.fd(), hidden.as_os_str(), dir.fd(), name);
        if renamed.is_err() {
            let _ = nix::unistd::unlinkat(dir.fd(), hidden.as_os_str(), UnlinkatFlags::NoRemoveDir);
        }
        match renamed {
            Ok(()) => Ok(Published::Replaced),
            Err(Errno::EBUSY) => {
                open_in_place(dir, name, OFlag::empty(), Mode::empty()).map(Published::MountPoint)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// How [`Staged::publish`] put a file in place.
#[derive(Debug)]
pub enum Published {
    /// Renamed to the target's name, at once.
    Replaced,
    /// The target is a mount point, which no rename replaces: here it is,
    /// open for writing, for [`overwrite`] (the finished file has no name
    /// left; its descriptor still reads it).
    /// The caller then gives it the owner, mode and attributes it gave the
    /// finished file.
    MountPoint(File),
}

/// Opens the regular file `name` in `dir` for writing in place (not
/// truncated; `extra` adds flags, such as `O_APPEND` or `O_CREAT` with
/// `mode`), without following a symlink or waiting (a FIFO). Another kind of
/// file is `InvalidInput`, saying which.
pub fn open_in_place(
    dir: &pin::Dir,
    name: &std::ffi::OsStr,
    extra: OFlag,
    mode: Mode,
) -> std::io::Result<File> {
    let flags = OFlag::O_WRONLY
        | OFlag::O_NOFOLLOW
        | OFlag::O_NONBLOCK
        | OFlag::O_NOCTTY
        | OFlag::O_CLOEXEC;
    let target = File::from(nix::fcntl::openat(dir.fd(), name, flags | extra, mode)?);
    let kind = target.metadata()?.file_type();
    if !kind.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "'{}' is a {}; envd writes only regular files",
                dir.shown_of(name).display(),
                super::transfer::kind_name(&kind)
            ),
        ));
    }
    Ok(target)
}

/// Truncates `target` and copies the finished `file` into it
/// (`copy_file_range` where the file systems allow).
pub fn overwrite(file: &File, target: &File) -> std::io::Result<()> {
    target.set_len(0)?;
    let mut from = file;
    from.seek(SeekFrom::Start(0))?;
    std::io::copy(&mut from, &mut &*target)?;
    Ok(())
}

/// Gives an `O_TMPFILE` file the name `hidden` in `dir`: through its
/// `/proc/self/fd` link (any user), else with `AT_EMPTY_PATH` (which needs
/// CAP_DAC_READ_SEARCH) where `/proc` is not mounted.
fn link_unnamed(file: &File, dir: &pin::Dir, hidden: &OsString) -> std::io::Result<()> {
    let link = format!("/proc/self/fd/{}", file.as_raw_fd());
    let by_proc = nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        link.as_str(),
        dir.fd(),
        hidden.as_os_str(),
        AtFlags::AT_SYMLINK_FOLLOW,
    );
    match by_proc {
        Err(Errno::ENOENT) => Ok(nix::unistd::linkat(
            file,
            "",
            dir.fd(),
            hidden.as_os_str(),
            AtFlags::AT_EMPTY_PATH,
        )?),
        r => Ok(r?),
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if let Some(n) = self.named.take() {
            let _ = std::fs::remove_file(&n.path);
        }
    }
}
