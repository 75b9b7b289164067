//! How many transfers run at once, each way.
//!
//! A download or an upload holds one of the blocking threads filesystem
//! work may hold ([`super::pool`], 384) for as long as its client takes:
//! its reader waits for the client to take the next chunk, its writer for
//! the client to send one. Nothing bounded how many: 400 uploads that sent
//! their first KiB and then nothing left no thread for any other filesystem
//! call (a `Stat` waited for as long as they did), and 400 downloads not
//! read took envd to 1.3 GiB. Now at most 64 of each run at
//! once, so together they hold at most 128 of the 384 threads. A transfer
//! beyond waits for a slot [`WAIT`] at most, holding no file, and is then
//! refused (`RESOURCE_EXHAUSTED`; REST: 503). Most transfers take their
//! slot for a moment, so a thousand asked for at once run in turn.
//!
//! An upload whose client has sent nothing for [`STALL`] gives its slot up
//! when others want one (they wait, or were turned away within that time):
//! it ends with `DEADLINE_EXCEEDED` and leaves nothing. So clients that
//! stall cannot keep the upload slots from the others for long; alone, a
//! slow client is never cut. A download over HTTP/1.x whose client took
//! nothing for [`STALL`] gives way on the same terms, and its connection is
//! closed, which frees what it held ([`crate::backlog`]). Over HTTP/2
//! hyper asks such a stream for nothing more, so it cannot end itself, and
//! ended without its connection it would keep the chunk hyper holds (up to
//! 1 MiB) while its slot went to another: its connection is closed instead,
//! once every answer on it is held back ([`crate::connections::HeldBack`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::quota::LastRefusal;
use crate::status::{Code, Error, Result};

/// How long a transfer waits for its slots.
pub const WAIT: Duration = Duration::from_secs(10);
/// A transfer that makes no progress this long gives its slot up to others.
pub const STALL: Duration = Duration::from_secs(30);
/// How often a waiting transfer looks whether it is stalled.
pub const STALL_STEP: Duration = Duration::from_secs(1);

/// One direction's slots.
pub struct Slots {
    sem: Semaphore,
    max: u32,
    /// What runs in them, for messages ("downloads").
    what: &'static str,
    /// Transfers waiting for slots now.
    waiting: AtomicUsize,
    /// When one was last turned away.
    turned_away: LastRefusal,
}

/// Downloads (`GET /files`, `ReadFile`); a gzip one takes 4 (its encoder
/// holds ~300 KiB).
pub static DOWNLOADS: Slots = Slots::new(64, "downloads (a gzip one counts 4)");
/// Uploads (`POST /files`, `WriteFile`), one per request.
pub static UPLOADS: Slots = Slots::new(64, "uploads");

/// A transfer's place among those that run at once.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] SemaphorePermit<'static>);

impl Slots {
    const fn new(max: u32, what: &'static str) -> Slots {
        Slots {
            sem: Semaphore::const_new(max as usize),
            max,
            what,
            waiting: AtomicUsize::new(0),
            turned_away: LastRefusal::new(),
        }
    }

    /// Waits (at most [`WAIT`]) for `n` slots.
    pub async fn take(&'static self, n: u32) -> Result<Slot> {
        if let Ok(permit) = self.sem.try_acquire_many(n) {
            return Ok(Slot(permit));
        }
        // Counted as waiting until this returns or its caller goes away.
        struct Waiting<'a>(&'a AtomicUsize);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let waiting = Waiting(&self.waiting);
        let got = tokio::time::timeout(WAIT, self.sem.acquire_many(n)).await;
        drop(waiting);
        match got {
            Ok(Ok(permit)) => Ok(Slot(permit)),
            _ => {
                self.turned_away.mark();
                Err(self.refusal())
            }
        }
    }

    /// Whether a transfer stalled for [`STALL`] is to give its slot up (an
    /// upload here, a download through [`crate::backlog::wanted`]): another
    /// waits for one, or was turned away within that time.
    pub fn wanted(&self) -> bool {
        self.waiting.load(Ordering::Acquire) > 0 || self.turned_away.within(STALL)
    }

    /// How an upload that gave its slot up ends.
    pub fn stalled(&self) -> Error {
        Error::new(
            Code::DeadlineExceeded,
            format!(
                "nothing moved for {} s while other {} waited for a place: ended to make room",
                STALL.as_secs(),
                self.what
            ),
        )
    }

    #[cold]
    fn refusal(&self) -> Error {
        Error::new(
            Code::ResourceExhausted,
            format!(
                "envd is running as many {} as it runs at once ({}) and none ended \
                 within {} s: retry later",
                self.what,
                self.max,
                WAIT.as_secs()
            ),
        )
    }
}
