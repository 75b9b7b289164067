//! User accounts: lookup by name, home directory and group memberships.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::SystemTime;

use nix::unistd::{Gid, Uid};

use crate::status::{Error, Result};

/// A resolved local user, with everything a child process needs to become it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    /// Supplementary groups, including the primary group.
    pub groups: Vec<u32>,
}

impl User {
    /// Looks a user up by name. An unknown user is `UNAUTHENTICATED`, as in E2B.
    /// Results are cached until `/etc/passwd` or `/etc/group` changes.
    pub fn lookup(name: &str) -> Result<User> {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::unauthenticated(format!(
                "invalid user name {name:?}"
            )));
        }
        let stamp = DbStamp::now();
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if cache.stamp != stamp {
            cache.stamp = stamp;
            cache.users.clear();
        }
        if let Some(u) = cache.users.get(name) {
            return Ok(u.clone());
        }
        let user = Self::lookup_uncached(name)?;
        if cache.users.len() < CACHE_MAX {
            cache.users.insert(name.to_owned(), user.clone());
        }
        Ok(user)
    }

    fn lookup_uncached(name: &str) -> Result<User> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(pw)) => Ok(Self::from_passwd(pw)),
            // A minimal image (an initramfs) may have no /etc/passwd: root
            // still exists.
            Ok(None) | Err(_) if name == "root" => Ok(Self::bare_root()),
            Ok(None) => Err(Error::unauthenticated(format!("unknown user '{name}'"))),
            Err(e) => Err(Error::internal(format!("looking up user '{name}': {e}"))),
        }
    }

    /// Root when the account database does not know it.
    fn bare_root() -> User {
        let home = if std::path::Path::new("/root").is_dir() {
            "/root"
        } else {
            "/"
        };
        User {
            name: "root".into(),
            uid: 0,
            gid: 0,
            home: PathBuf::from(home),
            groups: vec![0],
        }
    }

    /// The user envd itself runs as.
    pub fn current() -> Result<User> {
        let uid = Uid::effective();
        if uid.is_root() {
            return Self::lookup("root");
        }
        let pw = nix::unistd::User::from_uid(uid)
            .map_err(|e| Error::internal(format!("looking up uid {uid}: {e}")))?
            .ok_or_else(|| Error::internal(format!("uid {uid} has no passwd entry")))?;
        Ok(Self::from_passwd(pw))
    }

    fn from_passwd(pw: nix::unistd::User) -> User {
        let groups = CString::new(pw.name.as_str())
            .ok()
            .and_then(|c| nix::unistd::getgrouplist(&c, pw.gid).ok())
            .map(|gs| gs.into_iter().map(Gid::as_raw).collect())
            .unwrap_or_else(|| vec![pw.gid.as_raw()]);
        User {
            name: pw.name,
            uid: pw.uid.as_raw(),
            gid: pw.gid.as_raw(),
            home: pw.dir,
            groups,
        }
    }
}

/// At most this many users are cached.
const CACHE_MAX: usize = 256;

/// Change times of the account databases; a different stamp empties the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct DbStamp([Option<(SystemTime, u64)>; 2]);

impl DbStamp {
    fn now() -> Self {
        let of = |p: &str| {
            std::fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, std::os::unix::fs::MetadataExt::ino(&m))))
        };
        DbStamp([of("/etc/passwd"), of("/etc/group")])
    }
}

#[derive(Debug, Default)]
struct Cache {
    stamp: DbStamp,
    users: BTreeMap<String, User>,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    stamp: DbStamp([None, None]),
    users: BTreeMap::new(),
});
