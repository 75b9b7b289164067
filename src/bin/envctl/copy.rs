//! `envctl cp`: a file up to the VM or down from it (Transfer service).

use std::io::{IsTerminal, Read, Write};

use envd::proto::filesystem::filesystem_client::FilesystemClient;
use envd::proto::filesystem::StatRequest;
use envd::proto::transfer::transfer_client::TransferClient;
use envd::proto::transfer::{write_file_request, ReadFileRequest, WriteFileRequest, WriteHeader};
use futures_util::StreamExt;

use crate::exec::tokio_stream_from;
use crate::Ctx;

/// Progress on stderr for copies of 8 MiB and more, when it is a terminal.
struct Progress {
    total: Option<u64>,
    done: u64,
    shown: bool,
}

impl Progress {
    fn new(total: Option<u64>) -> Self {
        let shown = std::io::stderr().is_terminal() && total.is_none_or(|t| t >= 8 << 20);
        Self {
            total,
            done: 0,
            shown,
        }
    }
    fn add(&mut self, n: u64) {
        self.done += n;
        if self.shown {
            let mib = |b: u64| b as f64 / (1 << 20) as f64;
            match self.total {
                Some(t) if t > 0 => eprint!(
                    "\r{:8.1} / {:.1} MiB {:3}%",
                    mib(self.done),
                    mib(t),
                    self.done * 100 / t
                ),
                _ => eprint!("\r{:8.1} MiB", mib(self.done)),
            }
        }
    }
    fn finish(&self) {
        if self.shown {
            eprintln!();
        }
    }
}

/// `cp LOCAL :REMOTE` uploads, `cp :REMOTE LOCAL` downloads.
pub async fn copy(ctx: &Ctx, from: &str, to: &str) -> Result<u8, String> {
    let mut t = TransferClient::new(ctx.channel.clone());
    let status = |s: tonic::Status| format!("{:?}: {}", s.code(), s.message());
    match (from.strip_prefix(':'), to.strip_prefix(':')) {
        (None, Some(remote)) => {
            let mut file = std::fs::File::open(from).map_err(|e| format!("{from}: {e}"))?;
            let size = file.metadata().ok().map(|m| m.len());
            let (tx, rx) = tokio::sync::mpsc::channel::<WriteFileRequest>(4);
            let header = WriteFileRequest {
                message: Some(write_file_request::Message::Header(WriteHeader {
                    path: remote.to_owned(),
                    ..Default::default()
                })),
            };
            tx.send(header).await.map_err(|e| e.to_string())?;
            let reader = std::thread::spawn(move || -> std::io::Result<()> {
                let mut progress = Progress::new(size);
                loop {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        progress.finish();
                        return Ok(());
                    }
                    buf.truncate(n);
                    progress.add(n as u64);
                    let msg = WriteFileRequest {
                        message: Some(write_file_request::Message::Data(buf.into())),
                    };
                    if tx.blocking_send(msg).is_err() {
                        return Ok(());
                    }
                }
            });
            let entry = t
                .write_file(ctx.req(tokio_stream_from(rx)))
                .await
                .map_err(status)?
                .into_inner()
                .entry
                .unwrap_or_default();
            reader
                .join()
                .map_err(|_| "reader panicked".to_owned())?
                .map_err(|e| e.to_string())?;
            eprintln!(
                "{} bytes -> {}",
                entry.size,
                envd::logging::shown(&entry.path)
            );
            Ok(0)
        }
        (Some(remote), None) => {
            let mut fs = FilesystemClient::new(ctx.channel.clone());
            let size = fs
                .stat(ctx.req(StatRequest {
                    path: remote.to_owned(),
                }))
                .await
                .ok()
                .and_then(|r| r.into_inner().entry)
                .and_then(|e| u64::try_from(e.size).ok());
            let mut s = t
                .read_file(ctx.req(ReadFileRequest {
                    path: remote.to_owned(),
                    offset: None,
                    length: None,
                }))
                .await
                .map_err(status)?
                .into_inner();
            let mut file = std::fs::File::create(to).map_err(|e| format!("{to}: {e}"))?;
            let mut progress = Progress::new(size);
            while let Some(chunk) = s.next().await {
                let data = chunk.map_err(status)?.data;
                file.write_all(&data).map_err(|e| format!("{to}: {e}"))?;
                progress.add(data.len() as u64);
            }
            progress.finish();
            Ok(0)
        }
        _ => Err("exactly one side of cp must be remote, written :PATH".into()),
    }
}
