//! The account databases, `/etc/passwd` and `/etc/group`, read by envd
//! itself: files only, as musl's libc reads them (the static build never
//! had NSS), but through [`crate::small_files`]. The libc lookups opened the
//! files blocking and read them to their end: a FIFO put in place of
//! `/etc/passwd` by anything root in the VM hung the request that looked a
//! user up, and every request after it on the cache's lock.

use std::path::{Path, PathBuf};

pub const PASSWD: &str = "/etc/passwd";
pub const GROUP: &str = "/etc/group";
/// Largest account database read (100,000 accounts take about 6 MB).
const MAX_DB: u64 = 16 << 20;
/// Most groups a user is given (the kernel's `NGROUPS_MAX`).
const MAX_GROUPS: usize = 65_536;

/// One `/etc/passwd` entry, as much of it as envd uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// Which account to find.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Name(&'a str),
    Uid(u32),
}

/// The first account in `passwd` that matches `key`; `None` if there is
/// none or the file does not exist.
pub fn account(passwd: &Path, key: Key<'_>) -> std::io::Result<Option<Account>> {
    let text = match read(passwd) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    Ok(text.lines().filter_map(parse_account).find(|a| match key {
        Key::Name(n) => a.name == n,
        Key::Uid(u) => a.uid == u,
    }))
}

/// `gid` and every group in `group` that lists `name` as a member, in file
/// order, each once: what `getgrouplist` gives. Only `gid` if the file
/// cannot be read.
pub fn groups(group: &Path, name: &str, gid: u32) -> Vec<u32> {
    let mut out = vec![gid];
    // What `out` holds, for the check each line makes: a file of 65,536
    // groups naming the user cost a scan of `out` per line (~2e9 steps).
    let mut seen = std::collections::HashSet::from([gid]);
    let text = match read(group) {
        Ok(t) => t,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(error = %e, "groups of {name:?}: only the primary group");
            }
            return out;
        }
    };
    for line in text.lines() {
        let mut f = line.split(':');
        let (Some(_), Some(_), Some(id), Some(members)) = (f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else { continue };
        if members.split(',').any(|m| m == name) && !seen.contains(&id) {
            if out.len() == MAX_GROUPS {
                break;
            }
            seen.insert(id);
            out.push(id);
        }
    }
    out
}

/// The name of group `gid` in `group`, if it lists one.
pub fn group_name(group: &Path, gid: u32) -> Option<String> {
    let text = read(group).ok()?;
    text.lines().find_map(|line| {
        let mut f = line.split(':');
        let name = f.next().filter(|n| !n.is_empty())?;
        let _password = f.next()?;
        (f.next()?.parse::<u32>().ok()? == gid).then(|| name.to_owned())
    })
}

fn read(path: &Path) -> std::io::Result<String> {
    // Not UTF-8 as a whole is read lossily: one bad line must not hide
    // every account.
    crate::small_files::read(path, MAX_DB).map(|b| {
        String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    })
}

/// `name:password:uid:gid:gecos:home:shell`; `None` for a malformed line
/// (or a NIS `+`/`-` entry), which lookups skip.
fn parse_account(line: &str) -> Option<Account> {
    let mut f = line.split(':');
    let name = f
        .next()
        .filter(|n| !n.is_empty() && !n.starts_with(['+', '-']))?;
    let _password = f.next()?;
    let uid = f.next()?.parse().ok()?;
    let gid = f.next()?.parse().ok()?;
    let _gecos = f.next()?;
    let home = f.next()?;
    Some(Account {
        name: name.to_owned(),
        uid,
        gid,
        home: PathBuf::from(home),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_and_groups_are_found_as_libc_finds_them() {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        std::fs::write(
            &passwd,
            "root:x:0:0:root:/root:/bin/sh\n\
             broken line\n\
             +nis::::::\n\
             user:x:1000:1000:A User,,,:/home/user:/bin/bash\n\
             user:x:1001:1001::/elsewhere:/bin/sh\n",
        )
        .unwrap();
        let user = account(&passwd, Key::Name("user")).unwrap().unwrap();
        assert_eq!(
            user,
            Account {
                name: "user".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/user".into()
            }
        );
        assert_eq!(account(&passwd, Key::Uid(0)).unwrap().unwrap().name, "root");
        assert_eq!(account(&passwd, Key::Name("nobody")).unwrap(), None);
        assert_eq!(account(&passwd, Key::Name("+nis")).unwrap(), None);
        assert_eq!(
            account(&dir.path().join("none"), Key::Uid(0)).unwrap(),
            None
        );
        // A line that is not UTF-8 hides no other.
        std::fs::write(
            &passwd,
            b"b\xffd:x:5:5::/h:/bin/sh\nuser:x:7:7::/u:/bin/sh\n",
        )
        .unwrap();
        assert_eq!(account(&passwd, Key::Name("user")).unwrap().unwrap().uid, 7);
        assert_eq!(
            account(&passwd, Key::Uid(5)).unwrap().unwrap().name,
            "b\u{fffd}d"
        );

        let group = dir.path().join("group");
        std::fs::write(
            &group,
            "root:x:0:\nsudo:x:27:user\nuser:x:1000:\ndocker:x:999:other,user\nbad\nagain:x:27:user\n",
        )
        .unwrap();
        assert_eq!(groups(&group, "user", 1000), vec![1000, 27, 999]);
        assert_eq!(groups(&group, "root", 0), vec![0]);
        assert_eq!(groups(&dir.path().join("none"), "user", 5), vec![5]);
        assert_eq!(group_name(&group, 999).as_deref(), Some("docker"));
        assert_eq!(group_name(&group, 27).as_deref(), Some("sudo"));
        assert_eq!(group_name(&group, 5), None);
    }

    #[test]
    fn a_fifo_in_place_of_the_database_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("passwd");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let e = account(&fifo, Key::Name("root")).unwrap_err();
        assert!(e.to_string().contains("FIFO"), "{e}");
        assert_eq!(groups(&fifo, "root", 7), vec![7]);
        assert_eq!(group_name(&fifo, 0), None);
    }
}
