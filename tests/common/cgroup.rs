//! A cgroup v2 directory a test owns, for envd's `--cgroup-root`: under the
//! unified hierarchy (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a
//! hybrid machine), removed with everything in it when dropped.

use std::time::Duration;

/// A cgroup v2 directory of the test's own (under the unified hierarchy),
/// removed with everything in it at the end.
pub struct TestCgroup(pub std::path::PathBuf);

impl TestCgroup {
    pub fn create(name: &str) -> Option<TestCgroup> {
        let base = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(std::path::PathBuf::from)
            .find(|b| b.join("cgroup.procs").is_file() && b.join("cgroup.max.depth").is_file())?;
        let dir = base.join(format!("envd-test-{name}-{}", std::process::id()));
        std::fs::create_dir(&dir).ok()?;
        dir.join("cgroup.freeze")
            .is_file()
            .then_some(TestCgroup(dir))
    }
}

impl TestCgroup {
    /// The flags of an envd in a VM (no MMDS, no forwarding) managing its
    /// cgroups here.
    pub fn envd_args(&self) -> Vec<String> {
        [
            "--vm",
            "--mmds-address",
            "off",
            "--forward-address",
            "off",
            "--guest-root",
            std::env::temp_dir().to_str().unwrap(),
            "--cgroup-root",
            self.0.to_str().unwrap(),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// envd with [`TestCgroup::envd_args`].
    pub fn envd(&self) -> super::Envd {
        let args = self.envd_args();
        super::Envd::start(&args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// The cgroup directory of a command envd started (its leaf under
    /// `user/`), from `/proc/<pid>/cgroup`.
    pub fn leaf_of(&self, pid: u32) -> std::path::PathBuf {
        let path = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let path = path
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .unwrap_or_default();
        self.0
            .join("user")
            .join(path.rsplit('/').next().unwrap_or_default())
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("cgroup.kill"), "1");
        // Deepest first: leaves, their parents, the root.
        let mut dirs = vec![];
        for parent in ["user", "ptys"] {
            let p = self.0.join(parent);
            if let Ok(rd) = std::fs::read_dir(&p) {
                dirs.extend(rd.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
            dirs.push(p);
        }
        dirs.push(self.0.clone());
        for d in dirs {
            let _ = std::fs::write(d.join("cgroup.freeze"), "0");
            for _ in 0..100 {
                if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
