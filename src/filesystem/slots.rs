//! How many transfers run at once, each way.
//!
//! A download or an upload holds one of the blocking threads filesystem
//! work may hold ([`super::pool`], 384) for as long as its client takes:
//! its reader waits for the client to take the next chunk, its writer for
//! the client to send one. Nothing bounded how many: 400 uploads that sent
//! their first KiB and then nothing left no thread for any other filesystem
//! call (a `Stat` waited for as long as they did), and 400 downloads not
//! read took envd to 1.3 GiB. Now at most [`Slots::max`] of each run at
//! once, so together they hold at most 128 of the 384 threads. A transfer
//! beyond waits for a slot [`WAIT`] at most, holding no file, and is then
//! refused (`RESOURCE_EXHAUSTED`; REST: 503). Most transfers take their
//! slot for a moment, so a thousand asked for at once run in turn.

use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};

use crate::status::{Code, Error, Result};

/// How long a transfer waits for its slots.
pub const WAIT: Duration = Duration::from_secs(10);

/// One direction's slots.
pub struct Slots {
    sem: Semaphore,
    max: u32,
    /// What runs in them, for messages ("downloads").
    what: &'static str,
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
        }
    }

    /// How many run at once.
    pub fn max(&self) -> u32 {
        self.max
    }

    /// Waits (at most [`WAIT`]) for `n` slots.
    pub async fn take(&'static self, n: u32) -> Result<Slot> {
        match tokio::time::timeout(WAIT, self.sem.acquire_many(n)).await {
            Ok(Ok(permit)) => Ok(Slot(permit)),
            _ => Err(Error::new(
                Code::ResourceExhausted,
                format!(
                    "envd is running as many {} as it runs at once ({}) and none ended \
                     within {} s: retry later",
                    self.what,
                    self.max,
                    WAIT.as_secs()
                ),
            )),
        }
    }
}
