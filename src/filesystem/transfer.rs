//! Streamed file transfer (envd.transfer): bounded chunks out, atomic
//! replace in. Memory stays bounded whatever the file size.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use futures_util::{Stream, StreamExt};

use super::entry::{entry_info, set_metadata, Names};
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
    let path = spec.path.clone();
    write_bytes(spec, user, Box::pin(data)).await?;
    Ok(WriteFileResponse {
        entry: Some(entry_info(&path, &path, &mut Names::default())?),
    })
}

/// Writes a stream of bytes to `spec.path`: parents created for the user,
/// ownership to the user, and (unless appending) an atomic replace through a
/// temporary file beside the target, removed on any failure or cancellation.
pub async fn write_bytes<S>(spec: WriteSpec, user: &User, data: S) -> Result<()>
where
    S: Stream<Item = Result<Bytes>> + Unpin,
{
    let path = &spec.path;
    if let Some(parent) = path.parent() {
        ensure_dir(parent, user)?;
    }
    let existing = std::fs::metadata(path).ok();
    if existing.as_ref().is_some_and(|m| m.is_dir()) {
        return Err(Error::invalid(format!(
            "'{}' is a directory",
            path.display()
        )));
    }
    let mode = spec
        .mode
        .map(|m| m & 0o7777)
        .or_else(|| existing.as_ref().map(|m| m.mode() & 0o7777))
        .unwrap_or(DEFAULT_MODE);
    if spec.append {
        let f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode)
            .open(path)
            .map_err(|e| Error::io(path.display(), &e))?;
        if existing.is_none() {
            chown_to(path, user)?;
        }
        copy_in(data, f, path, spec.gzip).await?;
        if let Some(meta) = &spec.metadata {
            set_metadata(path, meta)?;
        }
        return Ok(());
    }
    // Removed on any failure, and also when the client goes away and this
    // future is dropped mid-upload.
    let tmp = TempFile(Some(sibling_temp(path)));
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp.path())
        .map_err(|e| Error::io(format!("create {}", tmp.path().display()), &e))?;
    let f = copy_in(data, f, path, spec.gzip).await?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(tmp.path().display(), &e))?;
    drop(f);
    chown_to(tmp.path(), user)?;
    if let Some(meta) = &spec.metadata {
        set_metadata(tmp.path(), meta)?;
    }
    std::fs::rename(tmp.path(), path)
        .map_err(|e| Error::io(format!("replace {}", path.display()), &e))?;
    tmp.keep();
    Ok(())
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
    let writer = tokio::task::spawn_blocking(move || -> Result<std::fs::File> {
        use std::io::Write;
        let fail = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::InvalidInput
            | std::io::ErrorKind::InvalidData
            | std::io::ErrorKind::UnexpectedEof
                if gzip =>
            {
                Error::invalid(format!("upload to {shown} is not valid gzip: {e}"))
            }
            _ => Error::io(format!("write {shown}"), &e),
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
    let mut failed = None;
    while let Some(chunk) = data.next().await {
        match chunk {
            Ok(bytes) => {
                if tx.send(bytes).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
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
