//! User accounts: lookup by name, home directory and group memberships.

mod db;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use nix::unistd::Uid;

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
        let mut cache = Cache::current();
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
        match db::account(Path::new(db::PASSWD), db::Key::Name(name)) {
            Ok(Some(a)) => Ok(Self::from_account(a)),
            // A minimal image (an initramfs) may have no /etc/passwd, and
            // one that cannot be read must not lock root out: root still
            // exists.
            Ok(None) | Err(_) if name == "root" => Ok(Self::bare_root()),
            Ok(None) => Err(Error::unauthenticated(format!("unknown user '{name}'"))),
            Err(e) => Err(Error::internal(format!("looking up user '{name}': {e}"))),
        }
    }

    /// Root when the account database does not know it.
    fn bare_root() -> User {
        let home = if Path::new("/root").is_dir() {
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
        let a = db::account(Path::new(db::PASSWD), db::Key::Uid(uid.as_raw()))
            .map_err(|e| Error::internal(format!("looking up uid {uid}: {e}")))?
            .ok_or_else(|| Error::internal(format!("uid {uid} has no passwd entry")))?;
        Ok(Self::from_account(a))
    }

    fn from_account(a: db::Account) -> User {
        let groups = db::groups(Path::new(db::GROUP), &a.name, a.gid);
        User {
            name: a.name,
            uid: a.uid,
            gid: a.gid,
            home: a.home,
            groups,
        }
    }
}

/// The name of the account `uid`, if `/etc/passwd` (a regular file) has
/// one. Cached as lookups by name are.
pub fn user_name(uid: u32) -> Option<String> {
    let mut cache = Cache::current();
    remembered(&mut cache.user_names, uid, || {
        db::account(Path::new(db::PASSWD), db::Key::Uid(uid))
            .ok()
            .flatten()
            .map(|a| a.name)
    })
}

/// The name of group `gid`, if `/etc/group` (a regular file) has one.
pub fn group_name(gid: u32) -> Option<String> {
    let mut cache = Cache::current();
    remembered(&mut cache.group_names, gid, || {
        db::group_name(Path::new(db::GROUP), gid)
    })
}

/// `map[id]`, looked up by `load` (and kept, while the map has room) the
/// first time.
fn remembered(
    map: &mut BTreeMap<u32, Option<String>>,
    id: u32,
    load: impl FnOnce() -> Option<String>,
) -> Option<String> {
    if let Some(name) = map.get(&id) {
        return name.clone();
    }
    let name = load();
    if map.len() < CACHE_MAX {
        map.insert(id, name.clone());
    }
    name
}

/// At most this many users are cached (and as many user and group names).
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
        DbStamp([of(db::PASSWD), of(db::GROUP)])
    }
}

#[derive(Debug, Default)]
struct Cache {
    stamp: DbStamp,
    users: BTreeMap<String, User>,
    /// Names of uids and gids (`EntryInfo`'s owner and group); `None`: none.
    user_names: BTreeMap<u32, Option<String>>,
    group_names: BTreeMap<u32, Option<String>>,
}

impl Cache {
    /// The cache, emptied first if the databases changed since it was filled.
    fn current() -> std::sync::MutexGuard<'static, Cache> {
        let stamp = DbStamp::now();
        let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
        if cache.stamp != stamp {
            *cache = Cache {
                stamp,
                ..Cache::default()
            };
        }
        cache
    }
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    stamp: DbStamp([None, None]),
    users: BTreeMap::new(),
    user_names: BTreeMap::new(),
    group_names: BTreeMap::new(),
});
