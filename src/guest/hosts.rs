//! The `/etc/hosts` entry for E2B's event collector (`hyperloopIP` on
//! `/init`): `events.e2b.local` resolves to that address, and to nothing
//! else, however often it is set.

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

pub const EVENTS_HOST: &str = "events.e2b.local";

/// Largest hosts file envd rewrites (a process in the guest controls it).
const MAX_HOSTS: u64 = 4 << 20;

/// Points `events.e2b.local` at `ip` in the hosts file at `path`; returns
/// whether the file changed.
pub fn point_events_host(path: &Path, ip: IpAddr) -> std::io::Result<bool> {
    let text = match crate::small_files::read_text(path, MAX_HOSTS) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let wanted = format!("{ip}\t{EVENTS_HOST}");
    let new = rewrite(&text, &wanted);
    if new == text {
        return Ok(false);
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // In place, not by rename: /etc/hosts is often a bind mount. Opened
    // without waiting: a FIFO swapped in since the read must not hang it.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    f.write_all(new.as_bytes())?;
    Ok(true)
}

/// `text` without any other mention of the events host, with `wanted` as
/// its one line for it.
fn rewrite(text: &str, wanted: &str) -> String {
    let mut out = String::with_capacity(text.len() + wanted.len() + 1);
    let mut present = false;
    for line in text.lines() {
        let (data, comment) = match line.find('#') {
            Some(i) => line.split_at(i),
            None => (line, ""),
        };
        let mut words = data.split_whitespace();
        let addr = words.next();
        let names: Vec<&str> = words.collect();
        if !names.contains(&EVENTS_HOST) {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let rest: Vec<&str> = names.into_iter().filter(|n| *n != EVENTS_HOST).collect();
        let addr = addr.unwrap_or_default();
        if !present && rest.is_empty() && format!("{addr}\t{EVENTS_HOST}") == wanted {
            present = true;
            out.push_str(line);
            out.push('\n');
        } else if !rest.is_empty() {
            out.push_str(&format!("{addr}\t{}{comment}\n", rest.join(" ")));
        }
    }
    if !present {
        out.push_str(wanted);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_for_the_events_host() {
        let w = "10.0.0.1\tevents.e2b.local";
        assert_eq!(
            rewrite("127.0.0.1 localhost", w),
            format!("127.0.0.1 localhost\n{w}\n")
        );
        let before =
            "127.0.0.1 localhost\n10.9.9.9 events.e2b.local other # c\n1.1.1.1 events.e2b.local\n";
        let after = rewrite(before, w);
        assert_eq!(
            after,
            format!("127.0.0.1 localhost\n10.9.9.9\tother# c\n{w}\n")
        );
        assert_eq!(rewrite(&after, w), after, "idempotent");
    }
}
