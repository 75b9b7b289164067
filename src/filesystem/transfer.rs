//! Streamed file transfer (envd.transfer): bounded chunks out, atomic
//! replace in. Memory stays bounded whatever the file size.

use std::io::SeekFrom;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;

use bytes::BytesMut;
use futures_util::{Stream, StreamExt};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

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

/// Opens `path` and streams `length` bytes (default: all) from `offset`.
pub async fn read_file(path: PathBuf, offset: u64, length: Option<u64>) -> Result<ReadStream> {
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| Error::io(path.display(), &e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| Error::io(path.display(), &e))?;
    if meta.is_dir() {
        return Err(Error::invalid(format!(
            "'{}' is a directory",
            path.display()
        )));
    }
    if offset > 0 {
        file.seek(SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::io(path.display(), &e))?;
    }
    let remaining = length.unwrap_or(u64::MAX);
    let state = (file, remaining, path, false);
    Ok(Box::pin(futures_util::stream::unfold(
        state,
        |(mut file, remaining, path, done)| async move {
            if done || remaining == 0 {
                return None;
            }
            let want = READ_CHUNK.min(usize::try_from(remaining).unwrap_or(usize::MAX));
            let mut buf = BytesMut::with_capacity(want);
            while buf.len() < want {
                match file.read_buf(&mut buf).await {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        return Some((Err(Error::io(path.display(), &e)), (file, 0, path, true)))
                    }
                }
            }
            if buf.is_empty() {
                return None;
            }
            let left = remaining - buf.len() as u64;
            let item = Ok(ReadFileResponse { data: buf.freeze() });
            Some((item, (file, left, path, false)))
        },
    )))
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
        let mut f = tokio::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(mode)
            .open(&path)
            .await
            .map_err(|e| Error::io(path.display(), &e))?;
        if existing.is_none() {
            chown_to(&path, user)?;
        }
        copy_in(&mut input, &mut f, &path).await?;
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
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .await
        .map_err(|e| Error::io(format!("create {}", tmp.display()), &e))?;
    copy_in(input, &mut f, path).await?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .await
        .map_err(|e| Error::io(tmp.display(), &e))?;
    drop(f);
    chown_to(tmp, user)?;
    std::fs::rename(tmp, path).map_err(|e| Error::io(format!("replace {}", path.display()), &e))
}

async fn copy_in<S>(input: &mut S, f: &mut tokio::fs::File, path: &Path) -> Result<()>
where
    S: Stream<Item = Result<WriteFileRequest>> + Unpin,
{
    while let Some(msg) = input.next().await.transpose()? {
        match msg.message {
            Some(Message::Data(data)) => f
                .write_all(&data)
                .await
                .map_err(|e| Error::io(format!("write {}", path.display()), &e))?,
            Some(Message::Header(_)) => {
                return Err(Error::invalid("WriteFile may carry only one header"))
            }
            None => {}
        }
    }
    f.flush()
        .await
        .map_err(|e| Error::io(format!("write {}", path.display()), &e))
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
