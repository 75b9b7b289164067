//! Streamed file transfer (envd.transfer): bounded chunks out, atomic
//! replace in. Memory stays bounded whatever the file size.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

use super::entry::{entry_info, set_metadata, Names};
use super::ops::chown_file;
use super::pin;
use super::staged::{open_in_place, overwrite, Published, Staged};
use crate::proto::transfer::write_file_request::Message;
use crate::proto::transfer::{ReadFileResponse, WriteFileRequest, WriteFileResponse, WriteHeader};
use crate::status::{Error, Result};
use crate::users::User;

/// Mode of new files when the request names none (0666 less umask 022).
const DEFAULT_MODE: u32 = 0o644;

pub type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadFileResponse>> + Send>>;

/// Chunks in flight between the disk thread and the network, each way.
pub(super) const PIPELINE: usize = 2;

/// A file opened for reading, with the size it had when opened.
#[derive(Debug)]
pub struct OpenedFile {
    pub file: std::fs::File,
    pub size: u64,
    /// Its bytes are made by the kernel as they are read (`/proc`, `/sys`,
    /// ...): `size` says nothing of how many there are.
    pub generated: bool,
}

/// Opens `path` for reading. The open never blocks (`O_NONBLOCK`: a FIFO
/// without a writer would hang a thread forever) and only regular files are
/// accepted (a FIFO, device or socket may block or never end). Size and
/// content then come from the same open file, so a concurrent replace of the
/// path cannot mix one file's length with another's bytes.
pub fn open_regular(path: &Path) -> Result<OpenedFile> {
    open_regular_io(path).map_err(|e| file_error(path, &e))
}

/// An error opening `path` as a regular file: one that is not (our
/// `InvalidInput`, which says so) is the caller's, else the OS's.
fn file_error(path: &Path, e: &std::io::Error) -> Error {
    match e.raw_os_error() {
        None if e.kind() == std::io::ErrorKind::InvalidInput => Error::invalid(e.to_string()),
        _ => Error::io(path.display(), e),
    }
}

/// [`open_regular`] with `io::Error`s (a non-regular file is `InvalidInput`).
pub fn open_regular_io(path: &Path) -> std::io::Result<OpenedFile> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    let ft = meta.file_type();
    let refused = if ft.is_dir() {
        format!("'{}' is a directory", path.display())
    } else if !ft.is_file() {
        format!(
            "'{}' is not a regular file (a {}); only regular files can be read",
            path.display(),
            kind_name(&ft)
        )
    } else {
        let generated = generated(&file, meta.len());
        return Ok(OpenedFile {
            file,
            size: meta.len(),
            generated,
        });
    };
    Err(std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        refused,
    ))
}

/// Whether `file`, of `size` bytes by its inode, is one of the kernel's
/// own (proc, sysfs, cgroup, debugfs, tracefs, securityfs, configfs), made
/// as it is read: those give a size of 0 or one page whatever they hold
/// (`/proc/meminfo` 0, `/sys/class/net/lo/address` 4,096 for 18 bytes).
/// Only such sizes are checked, so other files cost no `fstatfs`.
pub fn generated(file: &std::fs::File, size: u64) -> bool {
    (size == 0 || size == 4096) && kernel_made(file)
}

/// Whether `fd` is on one of the file systems whose files the kernel makes
/// (see [`generated`]).
fn kernel_made<Fd: std::os::fd::AsFd>(fd: Fd) -> bool {
    nix::sys::statfs::fstatfs(fd).is_ok_and(|st| {
        #[allow(clippy::unnecessary_cast)] // `i64` on glibc, `u64` on musl
        let magic = st.filesystem_type().0 as i64;
        matches!(
            magic,
            0x9FA0 // proc
                | 0x6265_6572 // sysfs
                | 0x6367_7270 // cgroup2
                | 0x0027_E0EB // cgroup
                | 0x6462_6720 // debugfs
                | 0x7472_6163 // tracefs
                | 0x7363_6673 // securityfs
                | 0x6265_6570 // configfs
        )
    })
}

/// What a non-regular file is, for messages.
pub fn kind_name(ft: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if ft.is_fifo() {
        "FIFO"
    } else if ft.is_char_device() {
        "character device"
    } else if ft.is_block_device() {
        "block device"
    } else if ft.is_socket() {
        "socket"
    } else if ft.is_symlink() {
        "symlink"
    } else if ft.is_dir() {
        "directory"
    } else {
        "regular file"
    }
}

/// Opens `path` off the async workers (see [`open_regular`]).
pub async fn open_for_read(path: PathBuf) -> Result<OpenedFile> {
    super::pool::run(move || open_regular(&path)).await?
}

/// What part of an open file to stream, and how.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadPlan {
    pub offset: u64,
    /// Bytes to read (default: to the end).
    pub length: Option<u64>,
    /// The length was promised to the client (e.g. as Content-Length): a
    /// file that ends early (truncated meanwhile) ends the stream with an
    /// error rather than silently short.
    pub exact: bool,
    /// Compress the bytes with gzip (on the disk thread).
    pub gzip: bool,
}

/// ReadFile: opens `path` and streams `length` bytes (default: to the end)
/// from `offset`.
/// Waits for its slot first ([`super::download::slot`]).
pub async fn read_file(path: PathBuf, offset: u64, length: Option<u64>) -> Result<ReadStream> {
    let slot = super::download::slot(false).await?;
    let opened = open_for_read(path.clone()).await?;
    let plan = ReadPlan {
        offset,
        length,
        ..Default::default()
    };
    Ok(super::download::stream_file(opened, path, plan, slot))
}

/// What to write where. Shared by gRPC WriteFile and HTTP `POST /files`.
#[derive(Debug, Clone, Default)]
pub struct WriteSpec {
    pub path: PathBuf,
    /// Permission bits (default: those of the file replaced, else 0644).
    pub mode: Option<u32>,
    /// Append in place instead of replacing atomically.
    pub append: bool,
    /// The bytes are gzip-compressed; store them decompressed.
    pub gzip: bool,
    /// `user.e2b.*` attributes to set (replacing) on the file.
    pub metadata: Option<Vec<(String, String)>>,
}

/// Receives a header then data chunks. `resolve` maps the header's path.
pub async fn write_file<S>(
    mut input: S,
    user: &User,
    resolve: impl FnOnce(&str) -> Result<PathBuf>,
) -> Result<WriteFileResponse>
where
    S: Stream<Item = Result<WriteFileRequest>> + Unpin + Send,
{
    let header: WriteHeader = match input.next().await.transpose()?.and_then(|m| m.message) {
        Some(Message::Header(h)) => h,
        Some(Message::Data(_)) => {
            return Err(Error::invalid(
                "the first WriteFile message must be the header",
            ))
        }
        None => return Err(Error::invalid("WriteFile ended before its header")),
    };
    let spec = WriteSpec {
        path: resolve(&header.path)?,
        mode: header.mode,
        append: header.append,
        ..Default::default()
    };
    let slot = super::slots::UPLOADS.take(1).await?;
    let data = input.filter_map(|m| async move {
        match m.map(|m| m.message) {
            Ok(Some(Message::Data(d))) => Some(Ok(d)),
            Ok(Some(Message::Header(_))) => {
                Some(Err(Error::invalid("WriteFile may carry only one header")))
            }
            Ok(None) => None,
            Err(e) => Some(Err(e)),
        }
    });
    let path = write_bytes(spec, user, Box::pin(data), &slot).await?;
    Ok(WriteFileResponse {
        entry: Some(entry_info(&path, &path, &mut Names::default())?),
    })
}

/// Writes a stream of bytes to `spec.path`: parents created for the user,
/// ownership to the user, and (unless appending) an atomic replace through a
/// temporary file beside the target, removed on any failure or cancellation
/// (a target that is a mount point is overwritten from the finished file:
/// see [`Staged`]).
/// A symlink at the path is written through, by [`super::pin`]'s rules, and
/// everything after the walk happens through the pinned directory. Returns
/// the path written. Its caller holds an upload's slot
/// ([`super::slots::UPLOADS`]): the writer holds a thread until the data ends.
pub async fn write_bytes<S>(
    spec: WriteSpec,
    user: &User,
    data: S,
    _slot: &super::slots::Slot,
) -> Result<PathBuf>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let target = pin::file_target(&spec.path, Some(user))?;
    let shown = target.shown();
    let mode = spec
        .mode
        .map(|m| m & 0o7777)
        .or_else(|| target.existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    // Written in place: an append, and a file the kernel makes
    // (`/proc/sys/...`, `/sys/...`, a cgroup's knobs), which cannot be
    // replaced, nor can a file be made beside it; it is written as a shell's
    // `>` writes it, and keeps the owner and mode the kernel gives it.
    let in_place = if spec.append {
        Some(open_append(&target, mode, user)?)
    } else if target.existing.is_some() && kernel_made(target.dir.fd()) {
        let f = open_in_place(&target.dir, &target.name, OFlag::empty(), Mode::empty())
            .map_err(|e| file_error(&shown, &e))?;
        Some(f)
    } else {
        None
    };
    if let Some(f) = in_place {
        let f = copy_in(data, f, &shown, spec.gzip).await?;
        if let Some(meta) = &spec.metadata {
            set_metadata(&f, &shown, meta)?;
        }
        return Ok(shown);
    }
    // Nothing is left behind on any failure, nor when the client goes away
    // and this future is dropped mid-upload (before `target`'s directory is
    // closed), nor when envd dies mid-upload where the file system has
    // unnamed files ([`Staged`]).
    let (staged, f) = Staged::create(&target.dir, 0o600)
        .map_err(|e| Error::io(format!("create a file beside {}", shown.display()), &e))?;
    let f = copy_in(data, f, &shown, spec.gzip).await?;
    let finish = |f: &std::fs::File| -> Result<()> {
        // The owner first: a chown clears the set-user-ID and set-group-ID
        // bits that the mode asks for.
        chown_file(f, user, &shown)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| Error::io(shown.display(), &e))?;
        if let Some(meta) = &spec.metadata {
            set_metadata(f, &shown, meta)?;
        }
        Ok(())
    };
    finish(&f)?;
    let published = staged
        .publish(&f, &target.dir, &target.name)
        .map_err(|e| Error::io(format!("replace {}", shown.display()), &e))?;
    if let Published::MountPoint(t) = published {
        // On a filesystem thread: the file may be large.
        let t = super::pool::run(move || overwrite(&f, &t).map(|()| t))
            .await?
            .map_err(|e| Error::io(format!("write {}", shown.display()), &e))?;
        finish(&t)?;
    }
    Ok(shown)
}

/// Opens the target for appending: never through a symlink, never a FIFO or
/// device put there since the walk; a file made here is given to the user.
fn open_append(target: &pin::Target, mode: u32, user: &User) -> Result<std::fs::File> {
    let shown = target.shown();
    let open = |extra: OFlag| {
        let mode = Mode::from_bits_truncate(mode);
        open_in_place(&target.dir, &target.name, OFlag::O_APPEND | extra, mode)
    };
    let failed = |e: std::io::Error| file_error(&shown, &e);
    let (f, made) = match open(OFlag::O_CREAT | OFlag::O_EXCL) {
        Ok(f) => (f, true),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
            (open(OFlag::empty()).map_err(failed)?, false)
        }
        Err(e) => return Err(failed(e)),
    };
    if made {
        chown_file(&f, user, &shown)?;
    }
    Ok(f)
}

/// Streams `data` into `file` through a blocking writer thread, with at most
/// `PIPELINE` chunks in flight; gzip data is decompressed on that thread.
async fn copy_in<S>(
    mut data: S,
    file: std::fs::File,
    path: &Path,
    gzip: bool,
) -> Result<std::fs::File>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(PIPELINE);
    let shown = path.display().to_string();
    let writer = super::pool::run(move || -> Result<std::fs::File> {
        use std::io::Write;
        // With gzip, an error that is not the OS's (ENOSPC and the like) is
        // the decoder's: bad input, including bytes after the gzip stream.
        let fail = |e: std::io::Error| {
            if gzip && e.raw_os_error().is_none() {
                Error::invalid(format!("upload to {shown} is not valid gzip: {e}"))
            } else {
                Error::io(format!("write {shown}"), &e)
            }
        };
        if gzip {
            let mut out = flate2::write::GzDecoder::new(file);
            while let Some(chunk) = rx.blocking_recv() {
                out.write_all(&chunk).map_err(fail)?;
            }
            out.finish().map_err(fail)
        } else {
            let mut file = file;
            while let Some(chunk) = rx.blocking_recv() {
                file.write_all(&chunk).map_err(fail)?;
            }
            Ok(file)
        }
    });
    // Fed from here while the writer runs, both in this task.
    let feed = async move {
        use super::slots::{STALL, STALL_STEP, UPLOADS};
        // Looked at once a step (not a timer per chunk): a stalled client
        // gives its slot up to others.
        let mut tick = tokio::time::interval(STALL_STEP);
        // Not a burst of ticks after a slow write: those are not the client's.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.reset();
        let (mut quiet, mut moved) = (std::time::Duration::ZERO, false);
        loop {
            let chunk = tokio::select! {
                chunk = data.next() => chunk,
                _ = tick.tick() => {
                    quiet = if moved { std::time::Duration::ZERO } else { quiet + STALL_STEP };
                    moved = false;
                    if quiet >= STALL && UPLOADS.wanted() {
                        return Some(UPLOADS.stalled());
                    }
                    continue;
                }
            };
            moved = true;
            match chunk {
                Some(Ok(bytes)) => {
                    if tx.send(bytes).await.is_err() {
                        return None; // the writer failed; its error is reported below
                    }
                }
                Some(Err(e)) => return Some(e),
                None => return None,
            }
        }
    };
    let (written, failed) = tokio::join!(writer, feed);
    // Its buffers go back to the OS once envd is quiet.
    crate::memory::freed();
    let written = written?;
    match failed {
        Some(e) => Err(e),
        None => written,
    }
}
