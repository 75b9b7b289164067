//! Exit statuses and signals as clients see them: Go-style status text
//! (`exit status 1`, `signal: killed`) and the `Signal` enum's Linux numbers.

use nix::sys::signal::Signal as NixSignal;

use super::reaper::ExitStatus;
use crate::proto::process::process_event::EndEvent;
use crate::proto::process::Signal;
use crate::status::{Error, Result};

/// The `end` event for an exit status, worded as E2B's (Go) envd words it.
pub fn end_event(status: ExitStatus) -> EndEvent {
    match status {
        ExitStatus::Exited(code) => EndEvent {
            exit_code: code,
            exited: true,
            status: format!("exit status {code}"),
            error: None,
            ..Default::default()
        },
        ExitStatus::Signaled {
            signal,
            core_dumped,
        } => EndEvent {
            exit_code: -1,
            exited: false,
            status: format!(
                "signal: {}{}",
                signal_text(signal),
                if core_dumped { " (core dumped)" } else { "" }
            ),
            error: None,
            signal: Some(signal),
            ..Default::default()
        },
    }
}

/// Go's `syscall.Signal.String()` on Linux.
fn signal_text(sig: i32) -> String {
    let s = match sig {
        1 => "hangup",
        2 => "interrupt",
        3 => "quit",
        4 => "illegal instruction",
        5 => "trace/breakpoint trap",
        6 => "aborted",
        7 => "bus error",
        8 => "floating point exception",
        9 => "killed",
        10 => "user defined signal 1",
        11 => "segmentation fault",
        12 => "user defined signal 2",
        13 => "broken pipe",
        14 => "alarm clock",
        15 => "terminated",
        16 => "stack fault",
        17 => "child exited",
        18 => "continued",
        19 => "stopped (signal)",
        20 => "stopped",
        21 => "stopped (tty input)",
        22 => "stopped (tty output)",
        23 => "urgent I/O condition",
        24 => "CPU time limit exceeded",
        25 => "file size limit exceeded",
        26 => "virtual timer expired",
        27 => "profiling timer expired",
        28 => "window changed",
        29 => "I/O possible",
        30 => "power failure",
        31 => "bad system call",
        n => return format!("signal {n}"),
    };
    s.to_owned()
}

/// The request's signal value → a signal to deliver.
pub fn to_signal(value: i32) -> Result<NixSignal> {
    match Signal::try_from(value) {
        Ok(Signal::Unspecified) | Err(_) => Err(Error::invalid(format!(
            "unknown signal value {value}; use a Signal enum value such as SIGNAL_SIGTERM (15)"
        ))),
        // Enum values are Linux signal numbers by construction.
        Ok(s) => NixSignal::try_from(s as i32)
            .map_err(|_| Error::invalid(format!("signal {value} is not supported here"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_text() {
        assert_eq!(end_event(ExitStatus::Exited(1)).status, "exit status 1");
        let e = end_event(ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        });
        assert_eq!(
            (e.exit_code, e.exited, e.status.as_str()),
            (-1, false, "signal: killed")
        );
    }

    #[test]
    fn signals() {
        assert_eq!(to_signal(15).unwrap(), NixSignal::SIGTERM);
        assert_eq!(to_signal(28).unwrap(), NixSignal::SIGWINCH);
        assert!(to_signal(0).is_err());
        assert!(to_signal(4).is_err());
        assert!(to_signal(999).is_err());
    }
}
