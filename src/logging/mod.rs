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
//! No log line waits for stderr's reader on a request's path: lines go out
//! through [`outbox`], which writes a line in place only where that cannot
//! wait, and otherwise queues it (bounded) for a thread of its own.

mod outbox;

use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};
use outbox::Outbox;

pub fn init(cfg: &Config) {
    let filter = match &cfg.log_level {
        Some(level) => EnvFilter::try_new(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")),
    }
    .unwrap_or_else(|e| {
        eprintln!("envd: bad log filter ({e}); using 'info'");
        EnvFilter::new("info")
    });
    let writer = Outbox::start().map_or(Writer::InPlace, Writer::Queued);
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
    outbox::flush();
}

#[derive(Clone, Copy)]
enum Writer {
    InPlace,
    Queued(&'static Outbox),
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
}
