//! Logging setup: `tracing` to stderr, text or JSON. Input bytes and tokens
//! are never logged at info level or above.
//!
//! A line carries strings a caller chose (a command, a path), so every
//! control character in it but its final newline is written escaped (`\n`,
//! `\x1b`, `\u009b`, ...): a command named `a\n<a forged line>` cannot add a line to
//! the log, nor an escape sequence drive the console. For the same reason
//! text lines have no colours (envd's own escape sequences would be
//! escaped too).
//!
//! When stderr is a terminal (as PID 1, the VM's serial console) lines are
//! written by a thread of their own: an emulated UART takes about half a
//! millisecond for a line, which would otherwise sit on the path of every
//! request that logs (a Start's `process started`). The queue is bounded;
//! a line that finds it full is dropped and counted, never waited for.
//! Elsewhere (a pipe, journald's socket, a file) lines are written in place.

use std::collections::VecDeque;
use std::io::{IsTerminal, Write};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Lines queued for the terminal at most.
const QUEUE: usize = 256;
/// Bytes queued for the terminal at most (a log line may carry a caller's
/// long string; a stalled console must not make envd hold them all).
const QUEUE_BYTES: usize = 256 * 1024;
/// A longer line is cut to this length (marked) before it is queued.
const MAX_LINE: usize = 16 * 1024;
/// How a cut line ends.
const CUT: &[u8] = b" [cut]\n";
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
        LogFormat::Text => builder.with_ansi(false).init(),
    }
}

/// Waits (at most a second) until the queued lines are out: before envd
/// exits, powers off or replaces its image.
pub fn flush() {
    let Some(c) = CONSOLE.get() else {
        return;
    };
    let Ok(q) = c.queue.lock() else {
        return;
    };
    let _ = c
        .changed
        .wait_timeout_while(q, FLUSH_WAIT, |q| !q.lines.is_empty() || q.writing);
}

static CONSOLE: OnceLock<Console> = OnceLock::new();

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    /// Bytes in `lines`.
    bytes: usize,
    /// A line is being written (taken off the queue, not out yet).
    writing: bool,
    dropped: u64,
}

impl Queue {
    /// Queues `line` (cut to [`MAX_LINE`]) unless the queue is full, in lines
    /// or bytes; a line that does not fit is counted as dropped.
    fn admit(&mut self, mut line: Vec<u8>) -> bool {
        if line.len() > MAX_LINE {
            let mut at = MAX_LINE - CUT.len();
            // Not inside a UTF-8 sequence.
            while at > 0 && line[at] & 0xC0 == 0x80 {
                at -= 1;
            }
            line.truncate(at);
            line.extend_from_slice(CUT);
        }
        if self.lines.len() >= QUEUE || self.bytes + line.len() > QUEUE_BYTES {
            self.dropped += 1;
            return false;
        }
        self.bytes += line.len();
        self.lines.push_back(line);
        true
    }

    /// The next line and how many were dropped since the last one taken.
    fn take(&mut self) -> Option<(Vec<u8>, u64)> {
        let line = self.lines.pop_front()?;
        self.bytes -= line.len();
        Some((line, std::mem::take(&mut self.dropped)))
    }
}

struct Console {
    queue: Mutex<Queue>,
    /// Rung when a line is queued and when the writer has written one.
    changed: Condvar,
}

impl Console {
    /// The writer thread; `None` (write in place) if it cannot start.
    fn start() -> Option<&'static Console> {
        let console = CONSOLE.get_or_init(|| Console {
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        std::thread::Builder::new()
            .name("envd-log".into())
            .spawn(move || console.write_out())
            .ok()?;
        Some(console)
    }

    fn push(&self, line: Vec<u8>) {
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        if q.admit(line) {
            drop(q);
            self.changed.notify_all();
        }
    }

    fn write_out(&self) {
        let mut err = std::io::stderr();
        loop {
            let Ok(q) = self.queue.lock() else {
                return;
            };
            let Ok(mut q) = self.changed.wait_while(q, |q| q.lines.is_empty()) else {
                return;
            };
            let Some((line, lost)) = q.take() else {
                continue;
            };
            q.writing = true;
            drop(q);
            if lost > 0 {
                let _ = writeln!(err, "envd: {lost} log lines dropped (console too slow)");
            }
            let _ = err.write_all(&line);
            if let Ok(mut q) = self.queue.lock() {
                q.writing = false;
            }
            self.changed.notify_all();
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
        Line {
            to: *self,
            text: Vec::new(),
        }
    }
}

/// One log line on its way out: gathered, then written escaped (see the
/// module) when the formatter is done with it.
struct Line {
    to: Writer,
    text: Vec<u8>,
}

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.text.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        if self.text.is_empty() {
            return;
        }
        let line = escape_controls(std::mem::take(&mut self.text));
        match self.to {
            Writer::InPlace => {
                let _ = std::io::stderr().write_all(&line);
            }
            Writer::Queued(c) => c.push(line),
        }
    }
}

/// `text` with every control character escaped but a final newline (see
/// [`escape_controls_into`]). Nearly every line has none: it is then given
/// back as it is, not copied.
fn escape_controls(text: Vec<u8>) -> Vec<u8> {
    let (body, end) = match text.split_last() {
        Some((b'\n', body)) => (body, &b"\n"[..]),
        _ => (&text[..], &b""[..]),
    };
    // 0xc2 leads every C1 control (and other characters, which the full
    // pass leaves as they are).
    if !body.iter().any(|&b| b < 0x20 || b == 0x7f || b == 0xc2) {
        return text;
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    escape_controls_into(body, &mut out);
    out.extend_from_slice(end);
    out
}

/// A string from envd or the guest (a file name, a command, an error naming
/// a path) as a terminal may safely show it: [`escape_controls_into`] on
/// all of it. For `envctl`, whose listings would otherwise hand the host's
/// terminal whatever escape sequences code in the sandbox put in a name.
pub fn shown(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = Vec::with_capacity(text.len() + 8);
    escape_controls_into(text.as_bytes(), &mut out);
    std::borrow::Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// Appends `text` to `out` with every control character escaped: C0 controls
/// and DEL as `\n`, `\r`, `\t` or `\xNN`, and the C1 controls (U+0080 to
/// U+009F, which some terminals obey as escape sequences) as `\u00NN`, which
/// also keeps a JSON line valid (serde escapes C0 controls itself but passes
/// C1 through). Other bytes pass as they are.
fn escape_controls_into(text: &[u8], out: &mut Vec<u8>) {
    let mut i = 0;
    while i < text.len() {
        let b = text[i];
        match b {
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f | 0x7f => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            0xc2 if text.get(i + 1).is_some_and(|c| (0x80..=0x9f).contains(c)) => {
                out.extend_from_slice(format!("\\u00{:02x}", text[i + 1]).as_bytes());
                i += 1;
            }
            _ => out.push(b),
        }
        i += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_but_the_final_newline() {
        let line = "INFO process started cmd=a\n2026 INFO forged\r\x1b[2J\u{9b}1m\tok é\n";
        let out = String::from_utf8(escape_controls(line.as_bytes().to_vec())).unwrap();
        assert_eq!(
            out,
            "INFO process started cmd=a\\n2026 INFO forged\\r\\x1b[2J\\u009b1m\\tok é\n"
        );
        assert_eq!(out.matches('\n').count(), 1);
        // A line without a newline gets none.
        assert_eq!(escape_controls(b"a\x07".to_vec()), b"a\\x07");
        // Lines without control characters pass as they are, a £ (0xc2 0xa3,
        // not a C1 control) too.
        for clean in ["plain line\n", "\u{a3}5 \u{e9}t\u{e9}\n", "no newline"] {
            assert_eq!(escape_controls(clean.as_bytes().to_vec()), clean.as_bytes());
        }
        // A JSON line stays JSON: serde escapes C0 itself, and C1 comes out
        // as a JSON escape.
        let json = serde_json::json!({"cmd": "a\n\u{9b}b"}).to_string() + "\n";
        let back: serde_json::Value =
            serde_json::from_slice(&escape_controls(json.into_bytes())).unwrap();
        assert_eq!(back["cmd"], "a\n\u{9b}b");
        // What envctl shows: every control character, a final newline too.
        assert_eq!(shown("ok é"), "ok é");
        assert_eq!(shown("\x1b]0;x\x07\n"), "\\x1b]0;x\\x07\\n");
    }

    #[test]
    fn the_console_queue_is_bounded_in_lines_and_bytes() {
        let mut q = Queue::default();
        // A caller's long string: cut, marked, still one line.
        assert!(q.admit(vec![b'x'; 1 << 20]));
        let (line, lost) = q.take().unwrap();
        assert_eq!((line.len(), lost), (MAX_LINE, 0));
        assert!(line.ends_with(CUT));
        // A cut never splits a UTF-8 sequence.
        assert!(q.admit("é".repeat(MAX_LINE).into_bytes()));
        let (line, _) = q.take().unwrap();
        let text = &line[..line.len() - CUT.len()];
        assert!(std::str::from_utf8(text).is_ok());
        // Long lines fill the byte bound before the line bound.
        let mut queued = 0;
        while q.admit(vec![b'y'; 1 << 20]) {
            queued += 1;
        }
        assert_eq!(queued, QUEUE_BYTES / MAX_LINE);
        assert!(q.bytes <= QUEUE_BYTES);
        // Short lines meet the line bound.
        let mut q = Queue::default();
        for _ in 0..QUEUE + 10 {
            q.admit(b"short\n".to_vec());
        }
        assert_eq!((q.lines.len(), q.dropped), (QUEUE, 10));
        let (_, lost) = q.take().unwrap();
        assert_eq!((lost, q.dropped, q.bytes), (10, 0, (QUEUE - 1) * 6));
    }
}
