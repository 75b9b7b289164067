//! Streamed file transfer (envd.transfer): bounded chunks out, atomic
//! replace in. Memory stays bounded whatever the file size.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::BytesMut;
use futures_util::{Stream, StreamExt};

use super::entry::{entry_info, Names};
use super::ops::{chown_to, ensure_dir, sibling_temp};
use crate::proto::transfer::write_file_request::Message;
use crate::proto::transfer::{ReadFileResponse, WriteFileRequest, WriteFileResponse, WriteHeader};
use crate::status::{Error, Result};
use crate::users::User;

/// Largest chunk sent by ReadFile.
pub const READ_CHUNK: usize = 1 << 20;
/// Mode of new files when the request names none (0666 less umask 022).
const DEFAULT_MODE: u32 = 0o644;

pub type ReadStream = Pin<Box<dyn Stream<Item = Result<ReadFileResponse>> + Send>>;

/// Chunks in flight between the disk thread and the network, each way.
const PIPELINE: usize = 2;

/// Opens `path` and streams `length` bytes (default: all) from `offset`. A
/// blocking thread reads ahead at most `PIPELINE` chunks.
pub async fn read_file(path: PathBuf, offset: u64, length: Option<u64>) -> Result<ReadStream> {
    let opened = path.clone();
    let file = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        let file = std::fs::File::open(&opened).map_err(|e| Error::io(opened.display(), &e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(opened.display(), &e))?;
        if meta.is_dir() {
            return Err(Error::invalid(format!(
                "'{}' is a directory",
                opened.display()
            )));
        }
        Ok(file)
    })
    .await
    .map_err(|e| Error::internal(format!("open task failed: {e}")))??;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<ReadFileResponse>>(PIPELINE);
    tokio::task::spawn_blocking(move || {
        use std::os::unix::fs::FileExt;
        let mut pos = offset;
        let mut remaining = length.unwrap_or(u64::MAX);
        while remaining > 0 {
            let want = READ_CHUNK.min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let mut buf = BytesMut::zeroed(want);
            let mut filled = 0;
            while filled < want {
                match file.read_at(&mut buf[filled..], pos + filled as u64) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        let _ = tx.blocking_send(Err(Error::io(path.display(), &e)));
                        return;
                    }
                }
            }
            if filled == 0 {
                return;
            }
            buf.truncate(filled);
            pos += filled as u64;
            remaining -= filled as u64;
            if tx
                .blocking_send(Ok(ReadFileResponse { data: buf.freeze() }))
                .is_err()
            {
                return; // the client went away
            }
        }
    });
    Ok(Box::pin(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
    })))
}

/// Receives a header then data chunks. `resolve` maps the header's path.
pub async fn write_file<S>(
    mut input: S,
    user: &User,
    resolve: impl FnOnce(&str) -> Result<PathBuf>,
) -> Result<WriteFileResponse>
where
    S: Stream<Item = Result<WriteFileRequest>> + Unpin,
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
    let path = resolve(&header.path)?;
    if let Some(parent) = path.parent() {
        ensure_dir(parent, user)?;
    }
    let existing = std::fs::metadata(&path).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Error::invalid(format!(
            "'{}' is a directory",
            path.display()
        )));
    }
    let mode = header
        .mode
        .map(|m| m & 0o7777)
        .or_else(|| existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    if header.append {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode)
            .open(&path)
            .map_err(|e| Error::io(path.display(), &e))?;
        if existing.is_none() {
            chown_to(&path, user)?;
        }
        copy_in(&mut input, f, &path).await?;
    } else {
        // Removed on any failure, and also when the client goes away and
        // this future is dropped mid-upload.
        let tmp = TempFile(Some(sibling_temp(&path)));
        replace(&mut input, tmp.path(), &path, mode, user).await?;
        tmp.keep();
    }
    Ok(WriteFileResponse {
        entry: Some(entry_info(&path, &path, &mut Names::default())?),
    })
}

/// Writes everything into `tmp`, gives it its mode and owner, and renames it
/// over `path`.
async fn replace<S>(input: &mut S, tmp: &Path, path: &Path, mode: u32, user: &User) -> Result<()>
where
    S: Stream<Item = Result<WriteFileRequest>> + Unpin,
{
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), &e))?;
    let f = copy_in(input, f, path).await?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(tmp.display(), &e))?;
    drop(f);
    chown_to(tmp, user)?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(format!("replace {}", path.display()), &e))
}

/// Streams the data messages into `file` through a blocking writer thread,
/// with at most `PIPELINE` chunks in flight.
async fn copy_in<S>(input: &mut S, file: std::fs::File, path: &Path) -> Result<std::fs::File>
where
    S: Stream<Item = Result<WriteFileRequest>> + Unpin,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(PIPELINE);
    let shown = path.display().to_string();
    let writer = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        use std::io::Write;
        let mut file = file;
        while let Some(chunk) = rx.blocking_recv() {
            file.write_all(&chunk)
                .map_err(|e| Error::io(format!("write {shown}"), &e))?;
        }
        Ok(file)
    });
    let mut failed = None;
    while let Some(msg) = input.next().await {
        match msg.map(|m| m.message) {
            Ok(Some(Message::Data(data))) => {
                if tx.send(data).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Ok(Some(Message::Header(_))) => {
                failed = Some(Error::invalid("WriteFile may carry only one header"));
                break;
            }
            Ok(None) => {}
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    drop(tx);
    let written = writer
        .await
        .map_err(|e| Error::internal(format!("write task failed: {e}")))?;
    match failed {
        Some(e) => Err(e),
        None => written,
    }
}

/// A temporary file that is deleted on drop unless kept.
struct TempFile(Option<PathBuf>);

impl TempFile {
    fn path(&self) -> &Path {
        self.0.as_deref().unwrap_or(Path::new(""))
    }

    /// It has been renamed into place: nothing to delete.
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}
