//! Signals to a command's whole tree: every process in its leaf, with the
//! leaf frozen meanwhile ([`Hold`]), each once, and after the thaw what a
//! process that held the signal back forks before it takes it
//! ([`super::held_back`]). SIGKILL goes through `cgroup.kill` instead
//! ([`Leaf::kill`]).

use std::path::Path;
use std::time::Duration;

use super::held_back;
use super::leaf::{keyed, Files, Leaf};

/// Passes over `cgroup.procs` a signal other than SIGKILL makes at most.
const SIGNAL_PASSES: usize = 8;
/// The longest a signal waits for its cgroup to freeze. A process in an
/// uninterruptible sleep (a stalled mount) keeps a cgroup from freezing
/// for as long as it sleeps; the signal then goes out to what is listed.
const FREEZE_WAIT: Duration = Duration::from_millis(100);
/// How much longer a freeze not complete by [`FREEZE_WAIT`] is waited for,
/// after the first signal passes, for a last round.
const LATE_FREEZE_WAIT: Duration = Duration::from_secs(1);
/// The longest a signal follows processes that hold it back after the
/// thaw ([`Leaf::follow`]).
const FOLLOW_WAIT: Duration = Duration::from_secs(1);
/// How many of the processes it signalled a signal checks for holding it
/// back, while the leaf is frozen (a `/proc/PID/status` read each, 10–30 µs
/// here).
const MAX_CHECKED: usize = 4096;
/// How many `/proc/PID/status` reads following a signal makes at most (a
/// command can make thousands of processes that hold a signal back for
/// good); [`FOLLOW_WAIT`] bounds them sooner.
const MAX_FOLLOW_READS: u32 = 32 * 1024;

impl Leaf {
    /// `sig` to every process in the cgroup, each once. The cgroup is
    /// frozen meanwhile ([`Hold`]): a process that forks and exits in a loop
    /// is on a new pid by the time its old one is signalled, and escaped the
    /// passes below about one time in three; frozen, nothing in the cgroup
    /// forks, and each process takes its signal as it thaws, before it runs
    /// again (or at once, when the signal kills it). `cgroup.procs` is read a
    /// line at a time (a command that forks a hundred thousand processes
    /// makes it megabytes long), and read again while a pass finds processes
    /// it had not signalled (children forked during a pass, where the freeze
    /// did not complete), at most [`SIGNAL_PASSES`] times; and once more
    /// when a freeze that was late completes. A process that had the signal
    /// blocked is followed after the thaw ([`Leaf::follow`]). Blocking: a
    /// kill per process, up to [`FREEZE_WAIT`] for the freeze, where it was
    /// late up to [`LATE_FREEZE_WAIT`] more, and up to [`FOLLOW_WAIT`] for
    /// processes that hold the signal back.
    pub fn signal(&self, sig: nix::sys::signal::Signal) -> std::io::Result<()> {
        let mut sent = std::collections::HashSet::new();
        let holding = {
            let held = Hold::freeze(self);
            self.signal_passes(sig, &mut sent)?;
            // A freeze not complete by FREEZE_WAIT (a loaded machine) let
            // processes that were not frozen yet fork past the passes: once
            // it completes, one more round catches what they started.
            if held.ours && !held.wait_frozen(Duration::ZERO) && held.wait_frozen(LATE_FREEZE_WAIT)
            {
                self.signal_passes(sig, &mut sent)?;
            }
            sent.iter()
                .take(MAX_CHECKED)
                .copied()
                .filter(|&pid| held_back::holds_back(pid, sig))
                .collect::<std::collections::HashSet<i32>>()
        };
        if !holding.is_empty() {
            self.follow(sig, &mut sent, holding)?;
        }
        Ok(())
    }

    /// After the thaw, while processes that were signalled hold the signal
    /// back (blocked: see [`held_back`]), what they fork gets it too, as a
    /// group signal reaches a child forked while it is being sent: a new
    /// process in the cgroup whose parent held it back, or whose parent is
    /// gone (envd adopted it; a process that forks and exits, as it takes
    /// the signal, leaves its child so). Ends with one more round once none
    /// holds it back, or after [`FOLLOW_WAIT`] (a process may block a
    /// signal for good).
    fn follow(
        &self,
        sig: nix::sys::signal::Signal,
        sent: &mut std::collections::HashSet<i32>,
        mut holding: std::collections::HashSet<i32>,
    ) -> std::io::Result<()> {
        let me = nix::unistd::getpid().as_raw();
        let started = std::time::Instant::now();
        let mut pause = Duration::from_micros(50);
        let mut last = false;
        // Every process that held the signal back: what one forked before
        // it took the signal is found after it did.
        let mut held = holding.clone();
        let mut reads = MAX_FOLLOW_READS;
        let mut status = |pid: i32| {
            reads = reads.checked_sub(1)?;
            held_back::Status::read(pid)
        };
        loop {
            let listed = self.each_listed(|pid| {
                if sent.contains(&pid) {
                    return;
                }
                let Some(new) = status(pid) else {
                    return;
                };
                if new.parent == me || held.contains(&new.parent) {
                    sent.insert(pid);
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    holding.insert(pid);
                }
            })?;
            if !listed {
                return Ok(());
            }
            holding.retain(|&pid| status(pid).is_some_and(|s| s.holds_back(sig)));
            held.extend(&holding);
            if last || started.elapsed() >= FOLLOW_WAIT {
                return Ok(());
            }
            if holding.is_empty() {
                // What a process forked just before it took the signal is
                // listed by now (a fork returns once its child is in the
                // cgroup): one more round finds it.
                last = true;
                continue;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }

    /// Reads `cgroup.procs` and signals each process not in `sent`, again
    /// while a pass finds such processes, at most [`SIGNAL_PASSES`] times.
    fn signal_passes(
        &self,
        sig: nix::sys::signal::Signal,
        sent: &mut std::collections::HashSet<i32>,
    ) -> std::io::Result<()> {
        for _ in 0..SIGNAL_PASSES {
            let mut fresh = false;
            let listed = self.each_listed(|pid| {
                if sent.insert(pid) {
                    fresh = true;
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                }
            })?;
            if !listed || !fresh {
                break;
            }
        }
        Ok(())
    }

    /// Calls `each` with every pid in `cgroup.procs`, read a line at a time
    /// (a command that forks a hundred thousand processes makes it
    /// megabytes long); `false` when the cgroup is gone ([`gone`]).
    fn each_listed(&self, mut each: impl FnMut(i32)) -> std::io::Result<bool> {
        use std::io::BufRead;
        let procs = match std::fs::File::open(self.dir.join("cgroup.procs")) {
            Err(e) if gone(&e) => return Ok(false),
            r => r?,
        };
        for line in std::io::BufReader::new(procs).lines() {
            let line = match line {
                Err(e) if gone(&e) => return Ok(false),
                r => r?,
            };
            if let Ok(pid) = line.trim().parse::<i32>() {
                each(pid);
            }
        }
        Ok(true)
    }
}

/// Whether a cgroup file's error says the cgroup is gone (or going): it has
/// nothing left to signal. A signal that kills (even a frozen process dies
/// of one at once) can end the command, and its leaf be removed, between
/// two passes.
fn gone(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENODEV)
}

/// A leaf frozen for as long as this lives (`cgroup.freeze`), and thawed
/// when the last of the tree signals holding it at once ends. Nothing when
/// the kernel has no cgroup freezer, or when the leaf was frozen already by
/// something else (it stays as it was).
struct Hold<'a> {
    leaf: &'a Leaf,
    ours: bool,
}

/// Whether the leaf itself is frozen (its own `cgroup.freeze`, not an
/// ancestor's); `None` without a cgroup freezer.
pub(super) fn own_freeze(dir: &Path) -> Option<bool> {
    std::fs::read(dir.join("cgroup.freeze"))
        .ok()
        .map(|v| v.starts_with(b"1"))
}

impl Hold<'_> {
    fn freeze(leaf: &Leaf) -> Hold<'_> {
        let dir = &leaf.dir;
        let ours = {
            let mut holders = leaf.holders.lock().unwrap_or_else(|e| e.into_inner());
            let ours = *holders > 0
                || (own_freeze(dir) == Some(false)
                    && std::fs::write(dir.join("cgroup.freeze"), "1").is_ok());
            if ours {
                *holders += 1;
            }
            ours
        };
        let held = Hold { leaf, ours };
        if !ours {
            return held;
        }
        held.wait_frozen(FREEZE_WAIT);
        held
    }

    /// Waits up to `limit` (zero: looks once) for every process in the leaf
    /// to reach the kernel's freezer (`cgroup.events`, read through one
    /// directory fd); whether they did.
    fn wait_frozen(&self, limit: Duration) -> bool {
        let files = Files::open(&self.leaf.dir);
        let frozen = || {
            files
                .as_ref()
                .and_then(|f| f.read("cgroup.events"))
                .is_some_and(|e| keyed(&e, "frozen") == Some(1))
        };
        let started = std::time::Instant::now();
        let mut pause = Duration::from_micros(50);
        loop {
            if frozen() {
                return true;
            }
            if started.elapsed() >= limit {
                return false;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(5));
        }
    }
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        if !self.ours {
            return;
        }
        // The thaw happens under the lock: a signal that comes meanwhile
        // waits for it, then freezes the leaf afresh.
        let mut holders = self.leaf.holders.lock().unwrap_or_else(|e| e.into_inner());
        *holders = holders.saturating_sub(1);
        if *holders == 0 {
            let file = self.leaf.dir.join("cgroup.freeze");
            if let Err(e) = std::fs::write(&file, "0") {
                tracing::warn!(file = %file.display(), error = %e, "cannot thaw a command's cgroup");
            }
        }
    }
}
