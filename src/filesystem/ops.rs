//! Filesystem mutations with E2B's rules: directories created for a user are
//! owned by that user; move falls back to copy + remove across filesystems;
//! remove is `rm -rf` and succeeds on a missing path.

use std::io;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::AtFlags;

use super::pin;
use super::stop::Stop;

use crate::status::{Code, Error, Result};
use crate::users::User;

/// Gives a file envd made to the user (only when envd is root; otherwise
/// envd can only make files as itself). `shown` names it in messages.
pub fn chown_file(file: &std::fs::File, user: &User, shown: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(user.uid), Some(user.gid))
        .map_err(|e| Error::io(format!("chown {}", shown.display()), &e))
}

/// MakeDir: ALREADY_EXISTS if the directory is there already. Missing
/// directories are made (0755) and given to `user`; see [`pin`] for the
/// symlinks followed on the way.
pub fn make_dir(dir: &Path, user: &User) -> Result<()> {
    if pin::open_dir(dir, Some(user))?.1 {
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
/// Both parents are pinned ([`pin`]); the entries themselves are moved, not
/// followed. A copy or removal stops early when `stop` says so; an
/// unfinished copy is removed again, within as many entries as it made.
pub fn move_path(src: &Path, dst: &Path, user: &User, stop: &Stop) -> Result<()> {
    let (sdir, sname) = pin::parent(src, None)?;
    let seen = nix::sys::stat::fstatat(sdir.fd(), sname.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
        .map_err(|e| Error::io(format!("move {}", src.display()), &e.into()))?;
    let (ddir, dname) = pin::parent(dst, Some(user))?;
    let moved = nix::fcntl::renameat(sdir.fd(), sname.as_os_str(), ddir.fd(), dname.as_os_str());
    match moved {
        Ok(()) => Ok(()),
        Err(Errno::EXDEV) => {
            // rename(2) refuses a directory into itself on one filesystem;
            // across a mount inside it, the copy would copy its own output
            // without end.
            if seen.st_mode & libc::S_IFMT == libc::S_IFDIR
                && within(ddir.fd(), (seen.st_dev, seen.st_ino))
                    .map_err(|e| Error::io(format!("move to {}", dst.display()), &e))?
            {
                return Err(Error::invalid(format!(
                    "cannot move '{}' into itself ('{}')",
                    src.display(),
                    dst.display()
                )));
            }
            let tmp_name = sibling_temp_name();
            // Until the rename: if envd dies meanwhile, the next image
            // removes the copy.
            let registered = super::hidden::Registered::new(ddir.shown_of(&tmp_name));
            let mut made = None;
            let copied =
                super::tree::copy_tree(sdir.fd(), &sname, ddir.fd(), &tmp_name, stop, &mut |id| {
                    made = Some(id);
                    registered.made(id);
                });
            // What the copy made is at most what it visited: removing it
            // again takes no more, however the caller or the tree behaves.
            // Only the copy goes: what a process swapped in under its name
            // (a root directory of the user's, for one) is left alone.
            let undo = |made: Option<super::tree::Identity>| {
                if let Some(made) = made {
                    let _ = super::tree::remove_entry_at(
                        ddir.fd(),
                        &tmp_name,
                        Some(made),
                        &Stop::after(stop.visited() + 1),
                    );
                }
            };
            if let Err(e) = copied {
                undo(made);
                return Err(Error::io(
                    format!("copy {} to {}", src.display(), dst.display()),
                    &e,
                ));
            }
            // The name must still lead to the copy: a process that swapped
            // something else in would have that moved into place, and the
            // source removed.
            let there = nix::sys::stat::fstatat(
                ddir.fd(),
                tmp_name.as_os_str(),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map(super::tree::identity);
            if made.is_none() || there.ok() != made {
                undo(made);
                return Err(Error::new(
                    Code::FailedPrecondition,
                    format!(
                        "the copy of {} was replaced in {} before it was moved into place; the source is left as it was",
                        src.display(),
                        ddir.shown().display()
                    ),
                ));
            }
            nix::fcntl::renameat(
                ddir.fd(),
                tmp_name.as_os_str(),
                ddir.fd(),
                dname.as_os_str(),
            )
            .map_err(|e| {
                undo(made);
                Error::io(format!("move into place {}", dst.display()), &e.into())
            })?;
            drop(registered);
            // The source as it was seen, not whatever has its name now.
            super::tree::remove_entry_at(sdir.fd(), &sname, Some(super::tree::identity(seen)), stop)
                .map_err(|e| Error::io(format!("remove {}", src.display()), &e))
        }
        Err(e) => Err(Error::io(
            format!("move {} to {}", src.display(), dst.display()),
            &e.into(),
        )),
    }
}

/// Whether the directory open at `dir` is the directory `ancestor` (device,
/// inode) or lies below it: its parents are followed up (`..`, across mount
/// points) to the root. Depth is the caller's to choose, so the climb is
/// bounded.
fn within(dir: std::os::fd::BorrowedFd, ancestor: (u64, u64)) -> io::Result<bool> {
    use nix::fcntl::OFlag;
    use std::os::fd::AsFd;
    const MAX_CLIMB: usize = 1 << 16;
    let id = |st: nix::sys::stat::FileStat| (st.st_dev, st.st_ino);
    let mut here = id(nix::sys::stat::fstat(dir)?);
    let mut cur: Option<std::os::fd::OwnedFd> = None;
    for _ in 0..MAX_CLIMB {
        if here == ancestor {
            return Ok(true);
        }
        let from = cur.as_ref().map_or(dir, |f| f.as_fd());
        let up = nix::fcntl::openat(
            from,
            "..",
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            nix::sys::stat::Mode::empty(),
        )?;
        let above = id(nix::sys::stat::fstat(&up)?);
        if above == here {
            return Ok(false); // the root
        }
        (here, cur) = (above, Some(up));
    }
    Err(io::Error::other(format!(
        "more than {MAX_CLIMB} directories deep"
    )))
}

/// Prefix and suffix of envd's temporary files (see [`sibling_temp`]).
const TEMP_PREFIX: &str = ".envd-";
const TEMP_SUFFIX: &str = ".tmp";

/// A hidden, unique name for a temporary file beside a target. Its length is
/// fixed (22 bytes) and independent of the target's name, so every legal
/// target name, up to 255 bytes, has a temporary sibling.
pub fn sibling_temp_name() -> std::ffi::OsString {
    let unique = crate::ids::random_id(12);
    format!("{TEMP_PREFIX}{unique}{TEMP_SUFFIX}").into()
}

/// Whether a file name is one made by [`sibling_temp_name`].
pub fn is_sibling_temp(name: &[u8]) -> bool {
    name.len() == TEMP_PREFIX.len() + 12 + TEMP_SUFFIX.len()
        && name.starts_with(TEMP_PREFIX.as_bytes())
        && name.ends_with(TEMP_SUFFIX.as_bytes())
}

/// `rm -rf`: a missing path (or parent) is success; a symlink is removed,
/// not followed. Directory trees of any depth are removed iteratively, until
/// `stop` says otherwise. The parent is pinned ([`pin`]).
pub fn remove_path(path: &Path, stop: &Stop) -> Result<()> {
    remove_path_seen(path, None, stop)
}

/// [`remove_path`] of the file `expect` (device, inode) only, when given:
/// whatever else has its name now is left alone (with an error).
pub fn remove_path_seen(
    path: &Path,
    expect: Option<super::tree::Identity>,
    stop: &Stop,
) -> Result<()> {
    let r = match pin::parent(path, None) {
        Ok((dir, name)) => super::tree::remove_entry_at(dir.fd(), &name, expect, stop),
        Err(e) if e.code == Code::NotFound => Ok(()),
        Err(e) => return Err(e),
    };
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", path.display()), &e)),
    }
}
