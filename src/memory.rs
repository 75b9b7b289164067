//! `POST /collapse`: envd's own anonymous memory folded into 2 MiB
//! transparent hugepages (`MADV_COLLAPSE`) just before a snapshot, so a
//! resumed VM faults in fewer distinct frames to run envd. Best effort: what
//! the kernel refuses is counted as skipped.

use std::time::Instant;

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
    fn collapsing_envds_heap_reports_what_it_did() {
        // A 16 MiB heap block so there is something to fold.
        let block = vec![1u8; 16 << 20];
        let r = super::collapse_self().unwrap();
        assert!(r.regions >= 1 && r.chunks >= 1, "{r:?}");
        assert_eq!(r.chunks, r.collapsed + r.already_huge + r.skipped, "{r:?}");
        assert_eq!(block.iter().map(|&b| u64::from(b)).sum::<u64>(), 16 << 20);
    }
}
