//! User accounts: lookup by name, home directory and group memberships.

use std::ffi::CString;
use std::path::PathBuf;

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
    pub fn lookup(name: &str) -> Result<User> {
        if name.is_empty() || name.contains('\0') {
            return Err(Error::unauthenticated(format!(
                "invalid user name {name:?}"
            )));
        }
        let pw = nix::unistd::User::from_name(name)
            .map_err(|e| Error::internal(format!("looking up user '{name}': {e}")))?
            .ok_or_else(|| Error::unauthenticated(format!("unknown user '{name}'")))?;
        Ok(Self::from_passwd(pw))
    }

    /// The user envd itself runs as.
    pub fn current() -> Result<User> {
        let uid = Uid::effective();
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
