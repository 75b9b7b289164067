//! Blocking threads that the OS may refuse.
//!
//! tokio's `spawn_blocking` panics ("OS can't spawn worker thread") when
//! the OS refuses a new thread and no blocking thread is left to take the
//! work. Idle blocking threads exit after a second, so in a VM where
//! sandboxed code has taken every task the kernel allows (a fork bomb
//! reaching `kernel.threads-max`, a few thousand in a small VM, or a pids
//! limit), every call that needs one would lose its connection without an
//! answer. Here that refusal is `RESOURCE_EXHAUSTED`, said in the log at most
//! every ten seconds rather than as a panic with a backtrace each time.

use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Once};

use crate::status::{Code, Error};

/// Seconds between two log lines about refused threads.
const LOG_EVERY: u64 = 10;

thread_local! {
    /// Set while this thread asks tokio for a blocking thread: a panic then
    /// is the refusal, answered as an error, not printed.
    static ASKING: Cell<bool> = const { Cell::new(false) };
}

/// Installs, once, a panic hook that stays quiet about refused threads and
/// hands every other panic to the hook that was there before.
fn quiet_refusals() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !ASKING.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

fn refused(payload: &(dyn std::any::Any + Send)) -> Error {
    let why = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("the OS refused a thread");
    // Said at most once per LOG_EVERY: a fork bomb's callers retry often.
    static SAID_AT: AtomicU64 = AtomicU64::new(0);
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    // + LOG_EVERY: the first refusal is said too.
    let now = START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_secs()
        + LOG_EVERY;
    let last = SAID_AT.load(Ordering::Relaxed);
    if now >= last.saturating_add(LOG_EVERY)
        && SAID_AT
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        tracing::warn!(
            why,
            "envd cannot start a thread: the VM is out of tasks (pids or threads)"
        );
    }
    Error::new(
        Code::ResourceExhausted,
        format!(
            "envd cannot start a thread ({why}): the VM is out of processes or threads; \
             end some (e.g. SendSignal with descendants) and retry"
        ),
    )
}

/// Work for a blocking thread, type-erased: one task type for all of envd's
/// (each distinct task type costs kilobytes of code).
pub type Job = Box<dyn FnOnce() + Send>;

/// The job has not started; it has started (or finished); it must not start.
const PENDING: u8 = 0;
const STARTED: u8 = 1;
const CANCELLED: u8 = 2;

/// Hands `job` to a blocking thread, without waiting for it. An error if
/// the OS refuses a thread and none is free: `job` then never runs.
///
/// A refused job stays in tokio's queue and would run whenever a thread
/// next starts, after its caller was told it failed: it is cancelled,
/// unless a busy thread took it meanwhile (then it runs, and this is Ok).
pub fn launch(job: Job) -> Result<(), Error> {
    let state = Arc::new(AtomicU8::new(PENDING));
    let guarded = {
        let state = state.clone();
        move || {
            let take =
                state.compare_exchange(PENDING, STARTED, Ordering::AcqRel, Ordering::Acquire);
            if take.is_ok() {
                job();
            }
        }
    };
    quiet_refusals();
    ASKING.with(|a| a.set(true));
    let spawned = std::panic::catch_unwind(AssertUnwindSafe(|| {
        // Detached: whoever needs the job's result has it sent.
        drop(tokio::task::spawn_blocking(guarded));
    }));
    ASKING.with(|a| a.set(false));
    match spawned {
        Ok(()) => Ok(()),
        Err(payload) => {
            let cancel =
                state.compare_exchange(PENDING, CANCELLED, Ordering::AcqRel, Ordering::Acquire);
            match cancel {
                Ok(_) => Err(refused(payload.as_ref())),
                Err(_) => Ok(()),
            }
        }
    }
}

/// Runs `f` on a blocking thread and waits for it. Errors: no thread
/// (`RESOURCE_EXHAUSTED`; `f` never runs), or `f` panicked (`INTERNAL`,
/// naming `what`).
pub async fn run<F, R>(what: &'static str, f: F) -> Result<R, Error>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    launch(Box::new(move || {
        let _ = tx.send(f());
    }))?;
    rx.await
        .map_err(|_| Error::internal(format!("{what} failed: it panicked")))
}
