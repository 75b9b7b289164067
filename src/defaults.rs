//! Defaults that apply to every request and can change at run time
//! (the E2B `/init` endpoint sets them): default user and global environment.

use std::collections::BTreeMap;
use std::sync::RwLock;

#[derive(Debug)]
pub struct Defaults {
    user: RwLock<String>,
    workdir: RwLock<Option<String>>,
    envs: RwLock<BTreeMap<String, String>>,
    /// envd's own variables (`E2B_SANDBOX`, `E2B_SANDBOX_ID`, ...): above the
    /// `/init` ones, which cannot replace or remove them.
    internal: RwLock<BTreeMap<String, String>>,
}

impl Defaults {
    pub fn new(user: String) -> Self {
        Self {
            user: RwLock::new(user),
            workdir: RwLock::new(None),
            envs: RwLock::new(BTreeMap::new()),
            internal: RwLock::new(BTreeMap::new()),
        }
    }

    pub fn user(&self) -> String {
        self.user.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_user(&self, user: String) {
        *self.user.write().unwrap_or_else(|e| e.into_inner()) = user;
    }

    /// Working directory of processes started without `cwd` (default: home).
    pub fn workdir(&self) -> Option<String> {
        self.workdir
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_workdir(&self, dir: Option<String>) {
        *self.workdir.write().unwrap_or_else(|e| e.into_inner()) = dir;
    }

    /// The global environment added to every process (below the request's
    /// own): the `/init` variables, then envd's own over them.
    pub fn envs(&self) -> BTreeMap<String, String> {
        let mut all = self.envs.read().unwrap_or_else(|e| e.into_inner()).clone();
        let internal = self.internal.read().unwrap_or_else(|e| e.into_inner());
        all.extend(internal.iter().map(|(k, v)| (k.clone(), v.clone())));
        all
    }

    /// Sets one of envd's own variables.
    pub fn set_internal(&self, name: &str, value: String) {
        self.internal
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), value);
    }

    /// The `/init` variables alone (envd's own are set again at start).
    pub fn init_envs(&self) -> BTreeMap<String, String> {
        self.envs.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set_envs(&self, envs: BTreeMap<String, String>) {
        *self.envs.write().unwrap_or_else(|e| e.into_inner()) = envs;
    }
}
