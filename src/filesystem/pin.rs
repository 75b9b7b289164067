//! Where a change envd makes as root lands.
//!
//! envd writes, creates, moves and removes as root on a caller's behalf, in
//! directories that code in the sandbox may change while it does so. Two
//! rules keep that code from steering envd's changes:
//!
//! - **Pinned directories.** A path is walked one component at a time, each
//!   an `openat(O_PATH | O_NOFOLLOW)` relative to the directory before it, and
//!   the change is then made through the last directory's open fd. A
//!   directory swapped for a symlink after the walk redirects nothing.
//! - **A user's symlink leads only to what that user owns.** A symlink owned
//!   by root (the image's own, such as `/bin -> usr/bin`), or by envd's own
//!   user, is followed anywhere. One owned by any other user is followed only when what it
//!   leads to (a directory, a file, or for a file not made yet the directory
//!   it will be made in) is owned by the same user; otherwise the change is
//!   refused with `PERMISSION_DENIED`. So a process running as `user` cannot
//!   plant `~/out.txt -> /etc/passwd` and have the host's next upload replace
//!   a root file and give it to `user`.
//! - **What envd makes, it holds.** A directory or file it creates is opened
//!   at once (`O_NOFOLLOW`; `O_EXCL` for a file; a new directory must be
//!   empty) and given its owner and mode only through that fd; a tree it
//!   removes must be the directory it looked at. A process that trades the
//!   new name for a root directory of the same directory between two calls
//!   (inotify tells it when) gets nothing of root's.
//!
//! Reads are not walked this way (what they return goes to the caller),
//! except compose's sources: their bytes go into a file given to the user,
//! so `~/part2 -> /etc/shadow` must not be read.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use crate::status::{Error, Result};
use crate::users::User;

/// Symlinks followed in one walk: as many as the kernel follows.
const MAX_LINK_HOPS: usize = 40;

/// A directory held open, and the path it was reached by (for messages).
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    shown: PathBuf,
}

impl Dir {
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The directory as the walk reached it (symlinks resolved).
    pub fn shown(&self) -> &Path {
        &self.shown
    }

    /// `name` inside this directory, for messages.
    pub fn shown_of(&self, name: &OsStr) -> PathBuf {
        self.shown.join(name)
    }

    /// A path to `name` inside this directory that the kernel resolves
    /// through the open fd (a `/proc` magic link), never through the
    /// directories above it: for calls that only take paths.
    pub fn path_of(&self, name: &OsStr) -> PathBuf {
        fd_path(self.fd(), name)
    }
}

/// `name` inside the directory open at `dir`, as a path the kernel resolves
/// through the fd (`/proc/self/fd/N/name`).
pub fn fd_path(dir: BorrowedFd<'_>, name: &OsStr) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    p.push(name);
    p
}

/// Where a write lands: a name in a pinned directory, and the regular file
/// there now, if any.
#[derive(Debug)]
pub struct Target {
    pub dir: Dir,
    pub name: OsString,
    pub existing: Option<std::fs::Metadata>,
}

impl Target {
    pub fn shown(&self) -> PathBuf {
        self.dir.shown_of(&self.name)
    }
}

/// Opens the directory `path`, following symlinks by this module's rules.
/// With `create`, missing directories are made (0755) and given to that
/// user; returns whether `path` itself was made.
pub fn open_dir(path: &Path, create: Option<&User>) -> Result<(Dir, bool)> {
    let mut walk = Walk::new(create)?;
    walk.queue_path(path);
    walk.run()?;
    Ok((walk.cur, walk.made))
}

/// The parent of `path`, opened as [`open_dir`] does, and the last name.
/// The last component itself is not looked at.
pub fn parent(path: &Path, create: Option<&User>) -> Result<(Dir, OsString)> {
    let name = match path.components().next_back() {
        Some(Component::Normal(n)) => n.to_os_string(),
        _ => {
            return Err(Error::invalid(format!(
                "'{}' names no entry in a directory",
                path.display()
            )))
        }
    };
    let (dir, _) = open_dir(path.parent().unwrap_or(Path::new("/")), create)?;
    Ok((dir, name))
}

/// The file `path` leads to: where a write lands (as E2B does, through a
/// symlink at `path` to its final target), or the file compose reads and
/// gives to the user, by this module's rules. The target must be a regular
/// file or not exist yet: envd never replaces a device, FIFO, socket or
/// directory. With `create`, the missing parents of `path` (not of a
/// symlink's target) are made for that user.
pub fn file_target(path: &Path, create: Option<&User>) -> Result<Target> {
    let (dir, mut name) = parent(path, create)?;
    let mut walk = Walk::at(dir);
    // Owners of the symlinks followed at the last component: what they lead
    // to must be theirs.
    let mut owners: Vec<(u32, PathBuf)> = Vec::new();
    loop {
        let shown = walk.cur.shown_of(&name);
        let fd = match open_at(walk.cur.fd(), &name) {
            Ok(fd) => fd,
            Err(Errno::ENOENT) => {
                let dir_uid = walk.cur_uid()?;
                for (uid, link) in &owners {
                    check_owner(*uid, link, dir_uid, walk.cur.shown())?;
                }
                return Ok(Target {
                    dir: walk.cur,
                    name,
                    existing: None,
                });
            }
            Err(e) => return Err(Error::io(shown.display(), &e.into())),
        };
        let st = nix::sys::stat::fstat(&fd).map_err(|e| Error::io(shown.display(), &e.into()))?;
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            let target = walk.link_target(&fd, &shown)?;
            let Some(Component::Normal(last)) = target.components().next_back() else {
                return Err(Error::invalid(format!(
                    "'{}' is a symlink to a directory",
                    shown.display()
                )));
            };
            let last = last.to_os_string();
            if !trusted(st.st_uid) {
                owners.push((st.st_uid, shown));
            }
            walk.queue_path(target.parent().unwrap_or(Path::new("")));
            walk.run()?;
            name = last;
            continue;
        }
        let meta = std::fs::File::from(fd)
            .metadata()
            .map_err(|e| Error::io(shown.display(), &e))?;
        let ft = meta.file_type();
        if ft.is_dir() {
            return Err(Error::invalid(format!(
                "'{}' is a directory",
                shown.display()
            )));
        }
        if !ft.is_file() {
            return Err(Error::invalid(format!(
                "'{}' is a {}; only regular files are written or composed",
                shown.display(),
                super::transfer::kind_name(&ft)
            )));
        }
        for (uid, link) in &owners {
            check_owner(*uid, link, meta.uid(), &shown)?;
        }
        return Ok(Target {
            dir: walk.cur,
            name,
            existing: Some(meta),
        });
    }
}

/// One step of a walk.
enum Step {
    /// Go back to `/` (an absolute symlink target).
    Root,
    Name(OsString),
    /// A symlink owned by `uid` led here: where the walk is must be `uid`'s.
    Owner {
        uid: u32,
        link: PathBuf,
    },
}

struct Walk<'a> {
    cur: Dir,
    steps: VecDeque<Step>,
    hops: usize,
    create: Option<&'a User>,
    /// The last directory entered was made by this walk.
    made: bool,
}

impl<'a> Walk<'a> {
    fn new(create: Option<&'a User>) -> Result<Walk<'a>> {
        let mut walk = Walk::at(root()?);
        walk.create = create;
        Ok(walk)
    }

    /// A walk from `dir` that makes nothing.
    fn at(dir: Dir) -> Walk<'a> {
        Walk {
            cur: dir,
            steps: VecDeque::new(),
            hops: 0,
            create: None,
            made: false,
        }
    }

    /// Queues `path`'s components in front of what is queued (an absolute
    /// path restarts at `/`).
    fn queue_path(&mut self, path: &Path) {
        let mut steps = Vec::new();
        for c in path.components() {
            match c {
                Component::RootDir => steps.push(Step::Root),
                Component::CurDir | Component::Prefix(_) => {}
                Component::ParentDir => steps.push(Step::Name(OsString::from(".."))),
                Component::Normal(n) => steps.push(Step::Name(n.to_os_string())),
            }
        }
        for s in steps.into_iter().rev() {
            self.steps.push_front(s);
        }
    }

    fn run(&mut self) -> Result<()> {
        while let Some(step) = self.steps.pop_front() {
            match step {
                Step::Root => {
                    self.cur = root()?;
                    self.made = false;
                }
                Step::Owner { uid, link } => {
                    let here = self.cur_uid()?;
                    check_owner(uid, &link, here, self.cur.shown())?;
                }
                Step::Name(name) => self.enter(name)?,
            }
        }
        Ok(())
    }

    fn cur_uid(&self) -> Result<u32> {
        nix::sys::stat::fstat(self.cur.fd())
            .map(|st| st.st_uid)
            .map_err(|e| Error::io(self.cur.shown.display(), &e.into()))
    }

    /// Steps into `name`: a directory is entered, a symlink expanded in
    /// front of the queue, a missing directory made when allowed.
    fn enter(&mut self, name: OsString) -> Result<()> {
        if name == ".." {
            let fd = nix::fcntl::openat(
                self.cur.fd(),
                OsStr::new(".."),
                OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| Error::io(self.cur.shown.display(), &e.into()))?;
            let mut shown = self.cur.shown.clone();
            shown.pop();
            self.cur = Dir { fd, shown };
            self.made = false;
            return Ok(());
        }
        let shown = self.cur.shown_of(&name);
        // Twice at most: a directory made concurrently is opened on the
        // second pass.
        for _ in 0..2 {
            // Most components are plain directories: one `openat` says so.
            // A symlink or any other file is `ENOTDIR` here (`O_NOFOLLOW`),
            // then opened as itself and looked at.
            let fd = match open_dir_at(self.cur.fd(), &name) {
                Ok(fd) => {
                    self.cur = Dir { fd, shown };
                    self.made = false;
                    return Ok(());
                }
                Err(Errno::ENOTDIR) => open_at(self.cur.fd(), &name),
                Err(e) => Err(e),
            };
            let fd = match fd {
                Ok(fd) => fd,
                Err(Errno::ENOENT) if self.create.is_some() => {
                    if let Some(fd) = self.make(&name, &shown)? {
                        self.cur = Dir { fd, shown };
                        self.made = true;
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(Error::io(shown.display(), &e.into())),
            };
            let st =
                nix::sys::stat::fstat(&fd).map_err(|e| Error::io(shown.display(), &e.into()))?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFDIR => {
                    self.cur = Dir { fd, shown };
                    self.made = false;
                }
                libc::S_IFLNK => {
                    let target = self.link_target(&fd, &shown)?;
                    if !trusted(st.st_uid) {
                        self.steps.push_front(Step::Owner {
                            uid: st.st_uid,
                            link: shown,
                        });
                    }
                    self.queue_path(&target);
                }
                _ => {
                    return Err(Error::invalid(format!(
                        "'{}' exists and is not a directory",
                        shown.display()
                    )))
                }
            }
            return Ok(());
        }
        Err(Error::io(
            shown.display(),
            &std::io::Error::from_raw_os_error(libc::ENOENT),
        ))
    }

    /// Makes directory `name` for the walk's user and returns it open;
    /// `None` if it appeared meanwhile. It is opened without following a
    /// link and must be empty, and is given to the user through that fd: a
    /// directory of root's that a process swapped in under the name between
    /// the `mkdirat` and the open (in a directory the user owns) must not be
    /// handed to the user with its contents.
    fn make(&self, name: &OsStr, shown: &Path) -> Result<Option<OwnedFd>> {
        match nix::sys::stat::mkdirat(self.cur.fd(), name, Mode::from_bits_truncate(0o755)) {
            Ok(()) => {}
            Err(Errno::EEXIST) => return Ok(None),
            Err(Errno::ENOTDIR) => {
                return Err(Error::invalid(format!(
                    "cannot create '{}': a parent is not a directory",
                    shown.display()
                )))
            }
            Err(e) => {
                return Err(Error::io(
                    format!("create directory {}", shown.display()),
                    &e.into(),
                ))
            }
        }
        let made = super::tree::open_made_dir(self.cur.fd(), name).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::new(
                    crate::status::Code::FailedPrecondition,
                    format!("'{}': {e}", shown.display()),
                )
            } else {
                Error::io(shown.display(), &e)
            }
        })?;
        if let Some(user) = self.create {
            if nix::unistd::geteuid().is_root() {
                nix::unistd::fchown(
                    &made,
                    Some(nix::unistd::Uid::from_raw(user.uid)),
                    Some(nix::unistd::Gid::from_raw(user.gid)),
                )
                .map_err(|e| Error::io(format!("chown {}", shown.display()), &e.into()))?;
            }
        }
        Ok(Some(
            made.as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io(shown.display(), &e))?,
        ))
    }

    /// The target of the symlink open at `fd`, counting the hop.
    fn link_target(&mut self, fd: &OwnedFd, shown: &Path) -> Result<PathBuf> {
        self.hops += 1;
        if self.hops > MAX_LINK_HOPS {
            return Err(Error::invalid(format!(
                "'{}': too many levels of symbolic links",
                shown.display()
            )));
        }
        nix::fcntl::readlinkat(fd, OsStr::new(""))
            .map(PathBuf::from)
            .map_err(|e| Error::io(shown.display(), &e.into()))
    }
}

fn root() -> Result<Dir> {
    // openat, not open: musl's open() follows O_CLOEXEC with an fcntl.
    let fd = nix::fcntl::openat(
        nix::fcntl::AT_FDCWD,
        OsStr::new("/"),
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::io("/", &e.into()))?;
    Ok(Dir {
        fd,
        shown: PathBuf::from("/"),
    })
}

/// Opens the entry `name` of the directory open at `dir` for reading, never
/// through a symlink and never blocking, and only if it is still the regular
/// file `seen` (what an earlier `lstat` or walk saw): an entry swapped for a
/// link to a root file meanwhile must not be read into something the user
/// gets. Anything else is `InvalidInput`. Returns the file and what its fd
/// says now (the size it has at open).
pub fn open_seen(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    seen: &std::fs::Metadata,
) -> std::io::Result<(std::fs::File, std::fs::Metadata)> {
    let fd = nix::fcntl::openat(
        dir,
        name,
        OFlag::O_RDONLY
            | OFlag::O_NOFOLLOW
            | OFlag::O_NONBLOCK
            | OFlag::O_NOCTTY
            | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let file = std::fs::File::from(fd);
    let now = file.metadata()?;
    if !now.is_file() || (now.dev(), now.ino()) != (seen.dev(), seen.ino()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("'{}' changed while it was opened", name.to_string_lossy()),
        ));
    }
    Ok((file, now))
}

/// The directory `name`, never through a symlink (`ENOTDIR` for a symlink
/// or any other file).
fn open_dir_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// The entry `name` itself (a symlink is not followed), without opening it
/// for I/O: no FIFO blocks, no device is touched.
fn open_at(dir: BorrowedFd<'_>, name: &OsStr) -> nix::Result<OwnedFd> {
    nix::fcntl::openat(
        dir,
        name,
        OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Whether a symlink owned by `uid` may lead anywhere: root's, and envd's own
/// when envd is not root (a link envd's user made steers envd to nowhere
/// that user could not go).
fn trusted(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// A symlink owned by `uid` at `link` led to `here`, owned by `owner`.
fn check_owner(uid: u32, link: &Path, owner: u32, here: &Path) -> Result<()> {
    if uid == owner {
        return Ok(());
    }
    Err(Error::permission(format!(
        "'{}' is a symlink owned by uid {uid}; it leads to '{}', owned by uid {owner}: \
         envd follows a symlink owned by a user other than root only to what that user owns",
        link.display(),
        here.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Code;
    use std::os::unix::fs::symlink;

    #[test]
    fn links_are_followed_physically_to_the_final_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("sub/deeper")).unwrap();
        std::fs::write(d.join("c"), b"x").unwrap();
        // `..` after a link is the link target's parent, as the kernel has it.
        symlink("sub/deeper", d.join("down")).unwrap();
        symlink("../../b", d.join("sub/deeper/up")).unwrap();
        symlink("c", d.join("b")).unwrap();
        let t = file_target(&d.join("down/up"), None).unwrap();
        assert_eq!(t.name, "c");
        assert!(t.existing.is_some());
        assert_eq!(
            std::fs::canonicalize(t.dir.path_of(OsStr::new(""))).unwrap(),
            std::fs::canonicalize(d).unwrap()
        );
        // A dangling link leads to where the file would be made.
        symlink("sub/new", d.join("dangling")).unwrap();
        let t = file_target(&d.join("dangling"), None).unwrap();
        assert_eq!((t.name.to_str(), t.existing.is_none()), (Some("new"), true));
        assert!(t.shown().ends_with("sub/new"));
    }

    #[test]
    fn loops_and_non_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        symlink("b", d.join("a")).unwrap();
        symlink("a", d.join("b")).unwrap();
        let e = file_target(&d.join("a"), None).unwrap_err();
        assert_eq!(e.code, Code::InvalidArgument, "{e:?}");
        assert!(e.message.contains("too many levels"), "{e:?}");
        let e = open_dir(&d.join("a/x"), None).unwrap_err();
        assert!(e.message.contains("too many levels"), "{e:?}");
        std::fs::write(d.join("f"), b"").unwrap();
        let e = open_dir(&d.join("f/x"), None).unwrap_err();
        assert!(e.message.contains("is not a directory"), "{e:?}");
        let e = file_target(d, None).unwrap_err();
        assert!(e.message.contains("is a directory"), "{e:?}");
        assert_eq!(
            parent(Path::new("/"), None).unwrap_err().code,
            Code::InvalidArgument
        );
    }

    #[test]
    fn missing_directories_are_made_once() {
        let dir = tempfile::tempdir().unwrap();
        let user = User::current().unwrap();
        let deep = dir.path().join("a/b/c");
        let e = open_dir(&deep, None).unwrap_err();
        assert_eq!(e.code, Code::NotFound, "{e:?}");
        assert!(open_dir(&deep, Some(&user)).unwrap().1, "made");
        assert!(!open_dir(&deep, Some(&user)).unwrap().1, "already there");
        assert!(deep.is_dir());
    }
}
