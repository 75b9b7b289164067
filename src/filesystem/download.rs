//! A file's bytes on their way to a client (`GET /files`, `ReadFile`),
//! bounded whoever reads them and however slowly.
//!
//! A download's chunks are read by a job of its own on the filesystem's
//! blocking threads, at most [`PIPELINE`] ahead of the network. They used
//! to be 1 MiB each however the client read, and nothing bounded how many
//! downloads ran: a client that asked for a large file and read none of it
//! held a thread and 4 MiB (the chunks hyper had taken, two queued, one
//! waiting to be), so 400 such clients took envd to 1.3 GiB and most of the
//! threads filesystem work may hold. Now:
//!
//! - **Chunks grow as the client takes them.** The first is
//!   [`FIRST_CHUNK`], each next one twice the last, up to [`MAX_CHUNK`];
//!   chunks over [`FREE_CHUNK`] come from [`LARGE`], shared by all
//!   downloads, and are [`FREE_CHUNK`] when it is spent. A fast download
//!   reaches 1 MiB chunks within seven. What a download nobody reads holds
//!   is then mostly the chunk hyper is writing to a socket that is full
//!   (on HTTP/1.x with at most 64 KiB more, [`crate::backlog`]) and the
//!   chunks waiting behind it.
//! - **Slots.** At most 64 downloads are sent at once, a gzip one counting
//!   [`GZIP_SLOTS`] ([`super::slots`]).
//!
//! Reading each chunk as a job of its own when the last was taken (no
//! thread held between chunks) cost 15–20% of a 1 GiB download's speed
//! (1,360–1,410 MiB/s against 1,580–1,780), so the job stays.

use bytes::{Bytes, BytesMut};
use std::path::PathBuf;

use super::slots::{Slot, DOWNLOADS};
use super::transfer::{OpenedFile, ReadPlan, ReadStream, PIPELINE};
use crate::proto::transfer::ReadFileResponse;
use crate::quota::{Held, Quota};
use crate::status::{Code, Error, Result};

/// A download's first chunk.
const FIRST_CHUNK: usize = 16 << 10;
/// Chunks up to this size are not counted in [`LARGE`].
const FREE_CHUNK: usize = 64 << 10;
/// The largest chunk (and `ReadFile` message).
pub const MAX_CHUNK: usize = 1 << 20;
/// Chunks over [`FREE_CHUNK`], all downloads together.
static LARGE: Quota = Quota::new(32 << 20);

/// What a gzip download counts of [`DOWNLOADS`].
const GZIP_SLOTS: u32 = 4;

/// Waits for a download's slots (see [`super::slots`]); `gzip` takes more.
pub async fn slot(gzip: bool) -> Result<Slot> {
    DOWNLOADS.take(if gzip { GZIP_SLOTS } else { 1 }).await
}

/// Streams part of `opened` (see [`ReadPlan`]) while `slot` is held.
pub fn stream_file(opened: OpenedFile, shown: PathBuf, plan: ReadPlan, slot: Slot) -> ReadStream {
    let mut reader = Reader {
        file: opened.file,
        shown,
        pos: plan.offset,
        remaining: plan.length.unwrap_or(u64::MAX),
        exact: plan.exact,
        gz: plan
            .gzip
            .then(|| flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast())),
        chunk: FIRST_CHUNK,
        done: false,
        _slot: slot,
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<ReadFileResponse>>(PIPELINE);
    // Told why when the reader cannot run (the OS refused a thread).
    let refused = tx.clone();
    let job = super::pool::run(move || {
        while let Some(chunk) = reader.next_chunk() {
            let failed = chunk.is_err();
            let sent = tx.blocking_send(chunk.map(|data| ReadFileResponse { data }));
            if sent.is_err() || failed {
                return; // the client went away, or the read failed
            }
        }
    });
    tokio::spawn(async move {
        if let Err(e) = job.await {
            let _ = refused.send(Err(e)).await;
        }
    });
    Box::pin(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}

/// What is left to send of a file, read with `pread`.
struct Reader {
    file: std::fs::File,
    shown: PathBuf,
    pos: u64,
    remaining: u64,
    /// The length was promised: a file that ends early is an error.
    exact: bool,
    gz: Option<flate2::write::GzEncoder<Vec<u8>>>,
    /// The next chunk's size.
    chunk: usize,
    done: bool,
    _slot: Slot,
}

/// A chunk's bytes with what they hold of [`LARGE`], given back when the
/// last reference to them is dropped (after hyper has written them).
struct Counted<T>(T, #[allow(dead_code)] Held);

impl<T: AsRef<[u8]>> AsRef<[u8]> for Counted<T> {
    fn as_ref(&self) -> &[u8] {
        self.0.as_ref()
    }
}

/// `data` as `Bytes`, holding `held` while it lives.
fn counted<T>(data: T, held: Option<Held>) -> Bytes
where
    T: AsRef<[u8]> + Send + 'static,
    Bytes: From<T>,
{
    match held {
        Some(held) => Bytes::from_owner(Counted(data, held)),
        None => Bytes::from(data),
    }
}

impl Reader {
    /// The next chunk (compressed if gzip), `None` at the end.
    fn next_chunk(&mut self) -> Option<Result<Bytes>> {
        use std::io::Write;
        loop {
            if self.done {
                return None;
            }
            let data = match self.read() {
                Ok(Some(data)) => data,
                Ok(None) => {
                    self.done = true;
                    let enc = self.gz.take()?;
                    return Some(enc.finish().map(Bytes::from).map_err(|e| self.failed(&e)));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let Some(enc) = self.gz.as_mut() else {
                return Some(Ok(data));
            };
            if let Err(e) = enc.write_all(&data) {
                self.done = true;
                return Some(Err(self.failed(&e)));
            }
            if !enc.get_ref().is_empty() {
                // Counted too, whether it fits or not (it is made): the
                // next chunks are then small until it is sent.
                let out = std::mem::take(enc.get_mut());
                let held = (out.len() > FREE_CHUNK).then(|| LARGE.hold(out.len()));
                return Some(Ok(counted(out, held)));
            }
        }
    }

    fn failed(&self, e: &std::io::Error) -> Error {
        Error::io(format!("compress {}", self.shown.display()), e)
    }

    /// Reads the next chunk: `None` at the end of what is to be sent.
    fn read(&mut self) -> Result<Option<Bytes>> {
        use std::os::unix::fs::FileExt;
        if self.remaining == 0 {
            return Ok(None);
        }
        let mut want = self
            .chunk
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        self.chunk = (self.chunk * 2).min(MAX_CHUNK);
        let held = (want > FREE_CHUNK).then(|| LARGE.try_hold(want)).flatten();
        if want > FREE_CHUNK && held.is_none() {
            want = FREE_CHUNK;
        }
        let mut buf = BytesMut::zeroed(want);
        let mut filled = 0;
        while filled < want {
            match self
                .file
                .read_at(&mut buf[filled..], self.pos + filled as u64)
            {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::io(self.shown.display(), &e)),
            }
        }
        if filled == 0 {
            if self.exact {
                return Err(Error::new(
                    Code::DataLoss,
                    format!("'{}' shrank while it was being read", self.shown.display()),
                ));
            }
            return Ok(None);
        }
        buf.truncate(filled);
        self.pos += filled as u64;
        self.remaining -= filled as u64;
        Ok(Some(counted(buf, held)))
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // Its buffers go back to the OS once envd is quiet.
        crate::memory::freed();
    }
}
