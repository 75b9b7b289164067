//! envd's own memory: freed memory given back once a burst is over, and
//! `POST /collapse`: envd's anonymous memory folded into 2 MiB transparent
//! hugepages (`MADV_COLLAPSE`) just before a snapshot, so a resumed VM faults
//! in fewer distinct frames to run envd. Best effort: what the kernel refuses
//! is counted as skipped.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// Wakes the janitor: rung only by the first [`freed`] after a give-back.
static FREED: LazyLock<Notify> = LazyLock::new(Notify::new);
/// Set by [`freed`], cleared by a give-back.
static DIRTY: AtomicBool = AtomicBool::new(false);
/// When [`freed`] was last called, in milliseconds since [`EPOCH`]: the
/// janitor gives back [`QUIET_MS`] after it.
static LAST_FREED: AtomicU64 = AtomicU64::new(0);
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Empty tasks spawned after a give-back, to bring idle workers round.
const WAKE_WORKERS: usize = 4;
/// Quiet time after the last [`freed`] before memory is given back: a
/// little longer than an idle blocking thread lives (1 s), so that the
/// threads a burst used have exited (freeing their heaps, and touching code
/// pages on the way out) before the give-back, not after it.
const QUIET_MS: u64 = 1250;

/// Says that memory was freed (a command ended, a connection closed); it
/// goes back to the OS once envd is quiet. A clock read and two atomic
/// operations in a burst: only the first call after a give-back wakes the
/// janitor.
pub fn freed() {
    LAST_FREED.store(millis(), Ordering::Relaxed);
    if !DIRTY.swap(true, Ordering::AcqRel) {
        FREED.notify_one();
    }
}

/// Calls [`freed`] when dropped: held by work whose end frees memory.
pub struct FreedOnDrop;

impl Drop for FreedOnDrop {
    fn drop(&mut self) {
        freed();
    }
}

/// Runs for envd's lifetime: after each burst of work, once [`QUIET_MS`] has
/// passed without another [`freed`], asks the allocator to return what it
/// keeps for reuse. mimalloc purges freed pages only when the heap that owns
/// them allocates again, so threads that go idle right after a burst would
/// hold them for good. Idle envd never wakes up for this.
pub async fn give_back_when_quiet() {
    loop {
        FREED.notified().await;
        // Until QUIET_MS has passed since the latest `freed`, however late in
        // a wait it came (a fixed sleep that restarts on activity gave back
        // up to twice that after a burst).
        loop {
            let due = LAST_FREED.load(Ordering::Relaxed).saturating_add(QUIET_MS);
            let now = millis();
            if now >= due {
                break;
            }
            tokio::time::sleep(Duration::from_millis(due - now)).await;
        }
        // Cleared first: a `freed` from now on rings again.
        DIRTY.store(false, Ordering::Release);
        give_back();
        // Idle workers wake for these, run them, park again and collect.
        for _ in 0..WAKE_WORKERS {
            tokio::spawn(async {});
        }
    }
}

/// Milliseconds since [`EPOCH`] (a monotonic clock).
fn millis() -> u64 {
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Bumped by every give-back: each runtime worker then gives back its own
/// heap the next time it goes idle (mimalloc's heaps are per thread).
static GENERATION: AtomicU64 = AtomicU64::new(0);

thread_local! {
    static SEEN: Cell<u64> = const { Cell::new(0) };
}

/// The runtime's `on_thread_park` hook: a worker going idle after a
/// give-back collects its own heap, once. Otherwise one atomic load.
pub fn on_worker_park() {
    let generation = GENERATION.load(Ordering::Relaxed);
    SEEN.with(|seen| {
        if seen.get() != generation {
            seen.set(generation);
            collect_this_thread();
        }
    });
}

/// The runtime's `on_thread_stop` hook: a blocking thread leaving after
/// its keep-alive gives back what its heap holds free (a transfer's buffers
/// were allocated there) before its heap is abandoned, which may be after
/// the janitor's give-back has run.
pub fn on_thread_stop() {
    collect_this_thread();
}

fn collect_this_thread() {
    #[cfg(target_env = "musl")]
    // SAFETY: mi_collect only walks and purges mimalloc's own free lists
    // (this thread's heap and the shared arenas); callable at any time.
    unsafe {
        libmimalloc_sys::mi_collect(true)
    };
}

/// Gives freed heap memory back to the OS and unmaps envd's clean code
/// pages (see [`drop_clean_code_pages`]).
pub fn give_back() {
    GENERATION.fetch_add(1, Ordering::Relaxed);
    collect_this_thread();
    drop_clean_code_pages();
}

/// Unmaps envd's own clean, read-only file pages (code and read-only data)
/// from its address space. They stay in the page cache, and whatever runs
/// next faults back only what it touches, so code that ran once (start-up,
/// a rare request) stops counting in envd's resident set. A read-only
/// mapping of envd's file with any anonymous (copied-on-write, e.g.
/// relocated) page is left alone: dropping it would bring back the file's
/// original bytes.
pub fn drop_clean_code_pages() {
    let Ok(exe) = std::fs::read_link("/proc/self/exe") else {
        return;
    };
    let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") else {
        return;
    };
    for (start, end) in clean_file_mappings(&smaps, &exe.to_string_lossy()) {
        // SAFETY: MADV_DONTNEED on a private, read-only file mapping without
        // anonymous pages only drops page-table entries; the next access
        // faults the same bytes back in from the file. The range is one
        // whole mapping of ours.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// (start, end) of every non-writable mapping of `path` whose pages are all
/// the file's own (smaps `Anonymous: 0 kB`).
fn clean_file_mappings(smaps: &str, path: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                let perms = words.next().unwrap_or("");
                let file = words.nth(3).unwrap_or("");
                current = (file == path && !perms.contains('w')).then_some((a, b));
                continue;
            }
        }
        if first == "Anonymous:" {
            if let Some(range) = current.take() {
                if words.next() == Some("0") {
                    out.push(range);
                }
            }
        }
    }
    out
}

const HUGE: usize = 2 << 20;
/// `MADV_COLLAPSE` (Linux 6.1).
const MADV_COLLAPSE: libc::c_int = 25;
/// At most this many chunks per call (envd's heap is far smaller).
const MAX_CHUNKS: usize = 65_536;

/// Upstream's `CollapseResult`.
#[derive(Debug, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CollapseResult {
    pub regions: u32,
    pub chunks: u32,
    pub collapsed: u32,
    pub already_huge: u32,
    pub skipped: u32,
    pub elapsed_ms: u64,
}

/// Collapses envd's private anonymous writable mappings.
pub fn collapse_self() -> std::io::Result<CollapseResult> {
    let started = Instant::now();
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut result = CollapseResult::default();
    let mut total_chunks = 0usize;
    for (range, huge_kib) in anonymous_regions(&smaps) {
        let start = range.0.next_multiple_of(HUGE);
        let end = range.1 & !(HUGE - 1);
        if end <= start {
            continue;
        }
        result.regions += 1;
        let chunks = (end - start) / HUGE;
        let (mut done, mut refused) = (0usize, 0usize);
        for i in 0..chunks {
            if total_chunks >= MAX_CHUNKS {
                break;
            }
            total_chunks += 1;
            let addr = start + i * HUGE;
            // SAFETY: MADV_COLLAPSE only changes how an existing mapping of
            // ours is backed (same contents); the range lies inside it.
            let rc = unsafe { libc::madvise(addr as *mut libc::c_void, HUGE, MADV_COLLAPSE) };
            if rc == 0 {
                done += 1;
            } else {
                refused += 1;
            }
        }
        // Chunks that were huge already succeed too: told apart by the
        // region's AnonHugePages before the call.
        let already = (huge_kib * 1024 / HUGE).min(done);
        result.chunks += count(done + refused);
        result.already_huge += count(already);
        result.collapsed += count(done - already);
        result.skipped += count(refused);
    }
    result.elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(result)
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// (start, end) and `AnonHugePages` (KiB) of every private, writable,
/// anonymous mapping (the heap and anonymous mmaps; not files or stacks).
fn anonymous_regions(smaps: &str) -> Vec<((usize, usize), usize)> {
    let mut out: Vec<((usize, usize), usize)> = Vec::new();
    let mut current: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first
            .split_once('-')
            .filter(|(a, _)| a.bytes().all(|c| c.is_ascii_hexdigit()) && !a.is_empty())
        {
            let perms = words.next().unwrap_or("");
            let path = words.nth(3);
            current = None;
            if perms.starts_with("rw")
                && perms.ends_with('p')
                && matches!(path, None | Some("[heap]"))
            {
                if let (Ok(s), Ok(e)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    current = Some((s, e));
                    out.push(((s, e), 0));
                }
            }
        } else if first == "AnonHugePages:" && current.is_some() {
            if let (Some(last), Some(kib)) =
                (out.last_mut(), words.next().and_then(|v| v.parse().ok()))
            {
                last.1 = kib;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_clean_read_only_mappings_of_the_file_are_dropped() {
        let smaps = "\
1000-2000 r--p 00000000 fd:00 7 /bin/envd
Size:                  4 kB
Anonymous:             0 kB
2000-5000 r-xp 00001000 fd:00 7 /bin/envd
Anonymous:             0 kB
5000-6000 r--p 00004000 fd:00 7 /bin/envd
Anonymous:             4 kB
6000-7000 rw-p 00005000 fd:00 7 /bin/envd
Anonymous:             0 kB
7000-8000 r-xp 00000000 fd:00 9 /lib/other.so
Anonymous:             0 kB
8000-9000 r--p 00000000 00:00 0 
Anonymous:             0 kB
";
        assert_eq!(
            super::clean_file_mappings(smaps, "/bin/envd"),
            [(0x1000, 0x2000), (0x2000, 0x5000)]
        );
    }

    #[test]
    fn code_runs_on_after_its_pages_are_dropped() {
        super::drop_clean_code_pages();
        // Formatting goes through vtables and relocated read-only data.
        let text = format!("{:?} {}", Some(vec![1, 2]), 3.5f64);
        assert_eq!(text, "Some([1, 2]) 3.5");
        super::give_back();
    }

    #[test]
    fn collapsing_envds_heap_reports_what_it_did() {
        // A 16 MiB heap block so there is something to fold.
        let block = vec![1u8; 16 << 20];
        let r = super::collapse_self().unwrap();
        assert!(r.regions >= 1 && r.chunks >= 1, "{r:?}");
        assert_eq!(r.chunks, r.collapsed + r.already_huge + r.skipped, "{r:?}");
        assert_eq!(block.iter().map(|&b| u64::from(b)).sum::<u64>(), 16 << 20);
    }
}
