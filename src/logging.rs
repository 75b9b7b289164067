//! Logging setup: `tracing` to stderr, text or JSON. Input bytes and tokens
//! are never logged at info level or above.
//!
//! When stderr is a terminal (as PID 1, the VM's serial console) lines are
//! written by a thread of their own: an emulated UART takes about half a
//! millisecond for a line, which would otherwise sit on the path of every
//! request that logs (a Start's `process started`). The queue is bounded;
//! a line that finds it full is dropped and counted, never waited for.
//! Elsewhere (a pipe, journald's socket, a file) lines are written in place.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::OnceLock;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Lines queued for the terminal at most.
const QUEUE: usize = 256;
/// How long [`flush`] waits for the queue to drain.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

pub fn init(cfg: &Config) {
    let filter = match &cfg.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|e| {
        eprintln!("envd: bad log filter ({e}); using 'info'");
        EnvFilter::new("info")
    });
    let terminal = std::io::stderr().is_terminal();
    let writer = if terminal {
        Console::start().map_or(Writer::InPlace, Writer::Queued)
    } else {
        Writer::InPlace
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match cfg.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_ansi(terminal).init(),
    }
}

/// Waits (at most a second) until the queued lines are out: before envd
/// exits, powers off or replaces its image.
pub fn flush() {
    let Some(console) = CONSOLE.get() else {
        return;
    };
    let (done, wait) = sync_channel(1);
    if console.tx.send(Item::Flush(done)).is_ok() {
        let _ = wait.recv_timeout(FLUSH_WAIT);
    }
}

static CONSOLE: OnceLock<Console> = OnceLock::new();

enum Item {
    Line(Vec<u8>),
    Flush(SyncSender<()>),
}

struct Console {
    tx: SyncSender<Item>,
    dropped: AtomicU64,
}

impl Console {
    /// The writer thread; `None` (write in place) if it cannot start.
    fn start() -> Option<&'static Console> {
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("envd-log".into())
            .spawn(move || write_out(&rx))
            .ok()?;
        Some(CONSOLE.get_or_init(|| Console {
            tx,
            dropped: AtomicU64::new(0),
        }))
    }
}

fn write_out(rx: &Receiver<Item>) {
    let mut err = std::io::stderr();
    while let Ok(item) = rx.recv() {
        match item {
            Item::Line(line) => {
                if let Some(c) = CONSOLE.get() {
                    let lost = c.dropped.swap(0, Ordering::Relaxed);
                    if lost > 0 {
                        let _ = writeln!(err, "envd: {lost} log lines dropped (console too slow)");
                    }
                }
                let _ = err.write_all(&line);
            }
            Item::Flush(done) => {
                let _ = done.try_send(());
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Writer {
    InPlace,
    Queued(&'static Console),
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        match self {
            Writer::InPlace => Line::InPlace(std::io::stderr()),
            Writer::Queued(c) => Line::Queued(c, Vec::new()),
        }
    }
}

/// One log line on its way out.
enum Line {
    InPlace(std::io::Stderr),
    Queued(&'static Console, Vec<u8>),
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Line::InPlace(e) => e.write(buf),
            Line::Queued(_, line) => {
                line.extend_from_slice(buf);
                Ok(buf.len())
            }
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Line::InPlace(e) => e.write_all(buf),
            Line::Queued(..) => self.write(buf).map(drop),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Line::InPlace(e) => e.flush(),
            Line::Queued(..) => Ok(()),
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if let Line::Queued(c, line) = self {
            if line.is_empty() {
                return;
            }
            match c.tx.try_send(Item::Line(std::mem::take(line))) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) => {
                    c.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Err(TrySendError::Disconnected(_)) => {}
            }
        }
    }
}
