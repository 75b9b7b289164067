//! Every open connection, so that none can hold envd's resources for free.
//!
//! A connection is *idle* while it has no request in flight (a request is in
//! flight from its headers until its response body is finished or dropped).
//! Idle connections are closed after the idle timeout; HTTP/1.1 headers must
//! arrive within the header timeout (hyper enforces it). The number of open
//! connections is capped: at the cap, or when `accept` fails for lack of file
//! descriptors, the longest-idle connection is closed to make room, so envd
//! keeps answering however many idle connections a caller opens. With no
//! idle connection to close, a new connection is refused.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backlog::Standstill;
use crate::pieces::Pieces;
use crate::wire::HttpBody;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Connections open at once.
    pub max: usize,
    /// Requests in flight at once, all connections together (HTTP/2 lets
    /// each carry many): `--max-connections`, whatever the fd limit.
    pub requests: usize,
    /// An idle connection is closed after this long.
    pub idle: Duration,
}

#[derive(Debug)]
pub struct Connections {
    limits: ConnLimits,
    open: Mutex<HashMap<u64, Arc<Conn>>>,
    next_id: AtomicU64,
    /// Connections told to close that have not closed yet.
    closing: AtomicUsize,
    /// Requests in flight on all connections together.
    requests: Arc<AtomicUsize>,
}

/// One open connection's state.
#[derive(Debug)]
pub struct Conn {
    id: u64,
    in_flight: AtomicUsize,
    /// When it last became idle.
    idle_since: Mutex<Instant>,
    /// Told to close (evicted to make room, or idle too long).
    pub close: Notify,
    /// Already chosen for eviction (never chosen twice).
    evicted: AtomicBool,
    /// Requests begun on it so far.
    requests: AtomicU64,
    /// Requests in flight on all connections, and how many may be.
    all_in_flight: Arc<AtomicUsize>,
    max_in_flight: usize,
    /// HTTP/1.x: what its answers have handed to hyper and not written yet.
    pub backlog: crate::backlog::Backlog,
    /// HTTP/2: answers whose client has not taken their last frame yet
    /// (hyper asks an answer for more only once its client's window has
    /// room), and data frames its answers have handed on so far.
    held: AtomicUsize,
    moved: AtomicU64,
    /// Closed because every answer on it was held back (see [`HeldBack`]).
    cut: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Connections {
    pub fn new(limits: ConnLimits) -> Arc<Connections> {
        Arc::new(Connections {
            limits,
            open: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            closing: AtomicUsize::new(0),
            requests: Arc::default(),
        })
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Registers a new connection, closing the longest-idle one if envd is at
    /// its cap. `None`: at the cap with nothing idle; refuse it.
    pub fn admit(self: &Arc<Self>) -> Option<Registered> {
        let mut open = lock(&self.open);
        let closing = self.closing.load(Ordering::Acquire);
        if open.len().saturating_sub(closing) >= self.limits.max {
            // Evicted connections close promptly (they are idle); allow a
            // little headroom while they do, never more.
            let headroom = self.limits.max / 8 + 1;
            if closing >= headroom || !self.evict_idlest(&open) {
                return None;
            }
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let conn = Arc::new(Conn {
            id,
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            close: Notify::new(),
            evicted: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            all_in_flight: self.requests.clone(),
            max_in_flight: self.limits.requests,
            backlog: crate::backlog::Backlog::default(),
            held: AtomicUsize::new(0),
            moved: AtomicU64::new(0),
            cut: AtomicBool::new(false),
        });
        open.insert(id, conn.clone());
        Some(Registered {
            set: self.clone(),
            conn,
        })
    }

    /// Closes the longest-idle connection (after `accept` ran out of fds).
    pub fn evict_one(&self) -> bool {
        self.evict_idlest(&lock(&self.open))
    }

    fn evict_idlest(&self, open: &HashMap<u64, Arc<Conn>>) -> bool {
        let victim = open
            .values()
            .filter(|c| {
                c.in_flight.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Relaxed)
            })
            .min_by_key(|c| *lock(&c.idle_since));
        match victim {
            Some(c) => {
                c.evicted.store(true, Ordering::Relaxed);
                self.closing.fetch_add(1, Ordering::AcqRel);
                c.close.notify_one();
                true
            }
            None => false,
        }
    }

    pub fn count(&self) -> usize {
        lock(&self.open).len()
    }
}

/// A connection's registration; dropping it unregisters.
#[derive(Debug)]
pub struct Registered {
    set: Arc<Connections>,
    pub conn: Arc<Conn>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.set.open).remove(&self.conn.id);
        if self.conn.evicted.load(Ordering::Relaxed) {
            self.set.closing.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Conn {
    /// Marks a request in flight until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.all_in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// Whether a request has ever begun on it (else there is no client
    /// state to say goodbye to: it can simply be dropped).
    pub fn ever_used(&self) -> bool {
        self.requests.load(Ordering::Relaxed) > 0
    }

    /// Whether it was closed because every answer on it was held back.
    pub fn was_cut(&self) -> bool {
        self.cut.load(Ordering::Acquire)
    }

    /// How long it has been idle (zero while a request is in flight).
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        lock(&self.idle_since).elapsed()
    }
}

/// HTTP/2's stall rule, checked by a connection's watcher now and then. A
/// stalled HTTP/2 answer is never asked for more, so it cannot end itself
/// as an HTTP/1.x answer does (`Tracked`); and a stream cannot be reset
/// from outside hyper. So the rule is the connection's: when every request
/// in flight on it is an answer whose client has not taken its last frame
/// (a client that stopped reading its socket, or that opens no window for
/// any of them), and none has moved for [`STALL`](crate::backlog::STALL),
/// while others want what they may hold ([`crate::backlog::wanted`]), the
/// connection is closed, which ends them all. Nothing on it could move
/// anyway; a connection with one answer still flowing, a request still
/// coming in or a tunnel is left alone.
#[derive(Debug, Default)]
pub struct HeldBack {
    /// The frames its answers handed on, while every request in flight is
    /// held back.
    still: Standstill,
}

impl HeldBack {
    /// Whether `conn` is to be cut now (and marks it so).
    pub fn check(&mut self, conn: &Conn) -> bool {
        let in_flight = conn.in_flight.load(Ordering::Acquire);
        if in_flight == 0 || conn.held.load(Ordering::Acquire) < in_flight {
            self.still.reset();
            return false;
        }
        let cut = self.still.gives_way(conn.moved.load(Ordering::Acquire));
        if cut {
            conn.cut.store(true, Ordering::Release);
        }
        cut
    }
}

/// A request in flight.
#[derive(Debug)]
pub struct InFlight(Arc<Conn>);

impl InFlight {
    /// When more requests are in flight than envd serves at once
    /// ([`ConnLimits::requests`]), this one's limit: it is to be answered at
    /// once (see [`Crowded`]).
    pub fn crowded(&self) -> Option<Crowded> {
        let max = self.0.max_in_flight;
        let crowded = self.0.all_in_flight.load(Ordering::Acquire) > max;
        if crowded {
            CROWDED.mark();
        }
        crowded.then_some(Crowded(max))
    }
}

/// When a request was last refused for the requests in flight.
static CROWDED: crate::quota::LastRefusal = crate::quota::LastRefusal::new();

/// Whether a request was refused for the requests in flight within `d`.
pub fn crowded_within(d: Duration) -> bool {
    CROWDED.within(d)
}

/// Marks a request that came while envd had more in flight than it serves
/// at once. Each request in flight costs envd memory whoever holds it open
/// (about 12 KiB for an attached output stream: its HTTP/2 stream, its
/// futures, tonic's buffer), and a client could hold four million
/// (connections times streams).
#[derive(Debug, Clone, Copy)]
pub struct Crowded(pub usize);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.all_in_flight.fetch_sub(1, Ordering::AcqRel);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *lock(&self.0.idle_since) = Instant::now();
        }
    }
}

/// A response body that keeps its request in flight until it is finished;
/// on HTTP/1.x it is asked for more only while its connection's
/// [`Backlog`](crate::backlog::Backlog) has room, and ends when its socket
/// has taken nothing for [`STALL`](crate::backlog::STALL) while others want
/// what it may hold ([`crate::backlog::wanted`]).
pub struct Tracked {
    /// Paced, in pieces of at most [`PIECE`](crate::backlog::PIECE), so
    /// that hyper's own queue never fills and it keeps asking, which is when
    /// a stall is seen.
    inner: Pieces<HttpBody>,
    guard: Option<InFlight>,
    paced: bool,
    /// HTTP/2: its last data frame is not taken yet (counted in its
    /// connection's `held` until it is asked for more, or dropped).
    held: bool,
    /// While it has no room: what its socket has taken, and when to look
    /// at it again.
    still: Standstill,
    look: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Tracked {
    /// `paced`: by its connection's backlog (HTTP/1.x).
    pub fn new(inner: HttpBody, guard: InFlight, paced: bool) -> Self {
        let piece = if paced {
            crate::backlog::PIECE
        } else {
            usize::MAX
        };
        Self {
            inner: Pieces::new(inner, piece),
            guard: Some(guard),
            paced,
            held: false,
            still: Standstill::default(),
            look: None,
        }
    }

    /// Counts it as held back (`true`: a data frame just handed on) or not.
    fn hold(&mut self, held: bool) {
        if held == self.held {
            return;
        }
        if let Some(InFlight(conn)) = &self.guard {
            if held {
                conn.held.fetch_add(1, Ordering::AcqRel);
                conn.moved.fetch_add(1, Ordering::AcqRel);
            } else {
                conn.held.fetch_sub(1, Ordering::AcqRel);
            }
            self.held = held;
        }
    }

    /// Ready when there is room for more; an error when it has waited for
    /// room long enough to give way.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        let Some(InFlight(conn)) = self.guard.as_ref().filter(|_| self.paced) else {
            return Poll::Ready(Ok(()));
        };
        if conn.backlog.poll_room(cx).is_ready() {
            self.still.reset();
            self.look = None;
            return Poll::Ready(Ok(()));
        }
        let look = self.look.get_or_insert_with(|| {
            // A slow client that takes something is not stalled.
            self.still.gives_way(conn.backlog.written());
            Box::pin(tokio::time::sleep(crate::backlog::STALL_STEP))
        });
        while look.as_mut().poll(cx).is_ready() {
            if self.still.gives_way(conn.backlog.written()) {
                return Poll::Ready(Err(crate::backlog::stalled()));
            }
            let next = Instant::now() + crate::backlog::STALL_STEP;
            look.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        // Asked for more: its client took the last frame.
        this.hold(false);
        if let Err(e) = std::task::ready!(this.poll_room(cx)) {
            this.guard = None;
            return Poll::Ready(Some(Err(e)));
        }
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => match (&this.guard, frame.data_ref()) {
                (Some(InFlight(conn)), Some(data)) if this.paced => {
                    conn.backlog.handed(data.len());
                }
                (Some(_), Some(_)) => this.hold(true),
                _ => {}
            },
            Poll::Ready(_) => this.guard = None,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.hold(false);
    }
}
