//! The incoming side of a live upgrade: at start, before anything is served,
//! the new image reads the state the previous one left in a memfd and takes
//! over what it names. Whatever cannot be taken over is logged and counted in
//! the [`Report`]; envd starts regardless (an agent that serves with less
//! beats no agent).

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use prost::Message;
use serde::Serialize;

use super::carry::Claimed;
use super::SCHEMA;
use crate::proto::envd::handover::State;

/// Names the memfd holding the state (set only for the exec).
pub const ENV_FD: &str = "ENVD_HANDOVER_FD";
/// Largest state read (output logs are bounded by the output budget).
const MAX_STATE: u64 = 1 << 30;

/// What a handover carried and how taking it over went. Shaped like E2B's
/// `X-Envd-Handover` header (`failed`, `procs`, `procs_failed`, `retained`,
/// `retained_failed`, `watchers`, `watchers_failed`), plus envd's own fields.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub failed: bool,
    pub procs: usize,
    pub procs_failed: usize,
    pub retained: usize,
    pub retained_failed: usize,
    pub watchers: usize,
    pub watchers_failed: usize,
    pub from_version: String,
    /// What was lost, in words, when anything was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<String>,
}

/// Reads and removes `ENVD_HANDOVER_FD`. Call before any thread exists.
pub fn take_env() -> Option<i32> {
    let v = std::env::var(ENV_FD).ok()?;
    // SAFETY: single-threaded at this point (start of main).
    unsafe { std::env::remove_var(ENV_FD) };
    v.parse().ok()
}

/// A handover being taken over.
#[derive(Debug)]
pub struct Incoming {
    pub state: State,
    pub claimed: Claimed,
    pub report: Report,
}

impl Incoming {
    /// Reads the state behind `fd`. An unreadable state yields an empty one
    /// and a report saying so.
    pub fn load(fd: i32) -> Incoming {
        let mut claimed = Claimed::default();
        let read = claimed
            .take(fd)
            .ok_or_else(|| format!("fd {fd} is not open"))
            .and_then(decode);
        Incoming::from_read(read, claimed, "the previous envd's state")
    }

    /// An `Incoming` from a state read from `what`; an unreadable one gives
    /// an empty state and a report saying what was lost.
    pub fn from_read(read: Result<State, String>, claimed: Claimed, what: &str) -> Incoming {
        match read {
            Ok(state) => {
                let report = Report {
                    from_version: state.from_version.clone(),
                    ..Report::default()
                };
                Incoming {
                    state,
                    claimed,
                    report,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} is unreadable: starting without it");
                Incoming {
                    state: State::default(),
                    claimed,
                    report: Report {
                        failed: true,
                        lost: Some(format!(
                            "{what} could not be read ({e}): its commands keep running but are \
                             not known to this envd"
                        )),
                        ..Report::default()
                    },
                }
            }
        }
    }

    /// Takes the carried listener for `url`, if there is one.
    pub fn listener(&mut self, url: &str) -> Option<OwnedFd> {
        let pos = self.state.listeners.iter().position(|l| l.url == url)?;
        let l = self.state.listeners.swap_remove(pos);
        self.claimed.take(l.fd)
    }

    /// Closes carried listeners no longer configured.
    pub fn drop_unused_listeners(&mut self) {
        for l in std::mem::take(&mut self.state.listeners) {
            tracing::info!(url = %l.url, "handover: listener no longer configured; closed");
            drop(self.claimed.take(l.fd));
        }
    }

    /// After a crash: systemd's fds that were not taken over (commands that
    /// could not be, stale entries) are closed and leave the store.
    pub fn release_unclaimed_store_fds(&mut self) {
        if !self.state.crash_record {
            return;
        }
        for (name, fd) in crate::sd::listen_fds() {
            if !self.claimed.has(*fd) {
                if let Some(f) = self.claimed.take(*fd) {
                    drop(f);
                    crate::sd::remove_fds(name);
                    tracing::info!(fd = %name, "fd store: entry not taken over; removed");
                }
            }
        }
    }

    /// The exit watches handed to the reaper, by pid, filled by the caller.
    pub fn pids(&self) -> Vec<i32> {
        crate::process::ProcessService::handover_pids(&self.state.commands)
    }

    /// Takes over the commands. Panics while doing so are caught: envd then
    /// runs without them and says so.
    pub fn adopt_commands(
        &mut self,
        process: &crate::process::ProcessService,
        exits: &mut HashMap<i32, crate::process::reaper::ExitWatch>,
    ) {
        let commands = std::mem::take(&mut self.state.commands);
        let total = commands.len();
        let ended = commands.iter().filter(|c| c.end.is_some()).count();
        let next_seq = self.state.next_seq;
        let recovered = self.state.crash_record;
        let claimed = &mut self.claimed;
        let adopted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            process.adopt(commands, next_seq, exits, claimed, recovered)
        }));
        self.report.procs = total - ended;
        self.report.retained = ended;
        match adopted {
            Ok(failed) => {
                self.report.procs_failed = failed;
                if failed > 0 {
                    self.report.lost = Some(format!(
                        "{failed} of {total} commands could not be taken over (see envd's log)"
                    ));
                }
            }
            Err(_) => {
                self.report.failed = true;
                self.report.procs_failed = total - ended;
                self.report.retained_failed = ended;
                self.report.lost = Some(
                    "taking over the commands failed (envd panicked); they keep running but \
                     are not known to this envd"
                        .into(),
                );
            }
        }
    }

    /// Drains on the pipes the previous image kept for background jobs.
    pub fn adopt_kept_pipes(&mut self) {
        let pipes = std::mem::take(&mut self.state.kept_pipes)
            .into_iter()
            .filter_map(|k| Some((self.claimed.take(k.fd)?, k.fd_name)))
            .collect();
        crate::process::linger::adopt(pipes);
    }
}

fn decode(fd: OwnedFd) -> Result<State, String> {
    let bytes = super::memfd::read_all(fd, MAX_STATE).map_err(|e| e.to_string())?;
    let state = State::decode(bytes.as_slice()).map_err(|e| e.to_string())?;
    if state.schema > SCHEMA {
        return Err(format!(
            "it has schema {}, and this envd reads schemas up to {SCHEMA}",
            state.schema
        ));
    }
    Ok(state)
}
