//! The static binary's size budget. `make test` builds it (`make static`)
//! and sets ENVD_STATIC; without it this check skips with a reason.

/// Recorded budget for the static musl release binary (target: <= 8 MiB).
/// Raise it deliberately, in the same commit as what made it grow.
#[path = "common/skip.rs"]
mod skip;

/// 7,000,000 until the E2B drop-in (guest system, cgroups, freezer, port
/// forwarding, MMDS): 7,098,408 bytes with it; 7,327,912 with resource
/// control, CONNECT tunnels and the Ports service; 7,738,216 with live
/// upgrade and crash re-adoption (handover state, fd store, exit watchers);
/// 7,807,912 with spliced tunnels (hyper-util's upgrade downcast, the splice
/// relay) and SIMD base64 (an AVX2 and an SSE4.1 path), less 20 KB of proto
/// comments dropped from the embedded descriptors; 7,857,192 with grown
/// pipes and merged output chunks, Connect proto output framed without a
/// copy, and listings and watch queues bounded by bytes (2026-12-04);
/// 7,873,640 with watched paths, ended and attached output and waiting
/// input bounded, and the sock_diag listener scan (later that day);
/// 7,898,216 with root's filesystem changes walked from pinned directory fds
/// with the owner rule for users' symlinks, and PID 1's link protections;
/// 7,902,312 with process descriptions bounded and the ports bookkeeping
/// in sets; 7,910,504 (one 8 KiB step) with tree walks that stop with their
/// caller, envd's own gRPC deadlines and the move-into-itself check;
/// 7,939,176 with Starts on a blocking thread and the reaper's pid slots
/// (a task type of tokio's blocking pool per closure is most of it);
/// 7,955,624 with the mount-table watch that keeps Starts in place while no
/// mount may stall; 7,935,208 with one type-erased job for the filesystem
/// pool (2026-12-05); 7,951,656 with src/threads.rs (a refused thread is an
/// error: catch_unwind, the quiet panic hook, a cancel flag per job), the
/// mount table and port scans off the async workers, SendSignal's kills
/// on a blocking thread and the reaper's batches; 7,968,040 with each
/// connection's idle check as a task of its own and the blocking threads'
/// stop hook; 7,984,552 (two 4 KiB steps for the freeze around a tree
/// signal, one for the crash record's two places and taking listeners back
/// by address) on 2026-12-05; 7,988,776 with a command's fds stored under
/// one name and told apart by pipe inode; 8,001,064 (three 4 KiB steps)
/// with the hidden temporaries handed to the next image (the registry, the
/// state field, the removal on a launched thread) later that day; 7,997,032
/// after the type-erased removal job; 8,021,736 (six 4 KiB steps) with
/// reverse tunnels (the listening side of CONNECT: its list of listeners,
/// the waiting requests, the linger task) on 2026-12-05; 8,029,928 (two
/// 4 KiB steps) with the crash record's output tails (the ring and its
/// recovery) and pumps that reserve room before they read, the next day;
/// 8,042,216 (three more 4 KiB steps) with the rings as a pool that exit
/// records keep until a starting command needs one (the pool, its lookup
/// by owner, the slot freed when a record is forgotten). A sorted list
/// instead of the owner map came out 4 KiB larger. 8,046,312 (one 4 KiB
/// step) with rings for taken-over exit records; the lingering close and
/// the drained bodies before it fit in the same pages. 8,050,408 (one 4 KiB
/// step) with the ninth session's hardening: the copy, the made directories
/// and the removals through fds, the log's escaping, and the temporaries'
/// device and inode in the record. 8,070,888 (five 4 KiB steps) with request
/// bodies read on in the background when a handler drops them early: about
/// 16 KiB of symbols, mostly tokio's task code for the drain's own future
/// type (raw poll, harness, drop of its cell) and the body type's `Drop`.
/// 8,074,984 (one 4 KiB step) with a body of declared length copied into
/// one buffer as it arrives. 8,083,240 (two 4 KiB steps) with the log's
/// outbox (a line in place where it cannot wait, the pipe opened anew) and a
/// chunked body gathered in blocks, on 2026-12-06; 8,091,432 (two more)
/// with the multipart parser's guard and streamed messages charged to the
/// body budget (Connect envelopes, the gRPC framing), the same day;
/// 8,095,528 (one more) with such a message's deadline. 8,111,912 (four
/// 4 KiB steps; 13 KB of code) with output pipes kept open for background
/// jobs after a command's end (their own task, the splice into /dev/null)
/// and the pump's bounded drain after the exit. 8,116,136 (one more) with
/// those pipes carried by a live upgrade; 8,124,328 (two more) with them in
/// systemd's fd store for a crash, by name. 8,136,808 (three more) with
/// systemd's notifications sent without waiting or queued for a thread.
/// 8,181,928 (eleven more) with large answers counted in a budget of their
/// own from building to reading (a share per request, the metered body, a
/// listing's count and its second try alone) and listings and watcher
/// events written as JSON item by item; 8,173,736 (two fewer) with the
/// Connect unary adapter's tail in one function rather than in its copy
/// for each RPC. 8,181,992 (two more) with downloads' chunks that grow as
/// the client takes them and give their share back when dropped, and the
/// downloads' slots.
/// 8,190,248 (two more) with requests in flight bounded and uploads given
/// slots of their own; 8,198,504 (two more) with a stalled upload giving
/// its slot up to others; 8,202,600 (one more) with an HTTP/1.x answer
/// asked for more only while little of it waits for the socket, and
/// 8,202,664 with such an answer giving way when it stalls; 8,202,728
/// with the account databases read by envd instead of libc; 8,210,920 (one
/// 8 KiB step) with mount points written in place and empty paths refused
/// for Remove and Move; 8,206,824 (one fewer) with an empty path meaning the
/// default workdir; 8,227,304 (five more) with a mount point's copy on a
/// filesystem thread (a new `pool::run` call: with the copy on the async
/// worker instead, it stays 8,206,824); 8,231,400 (one more) with kernel
/// files (a sysctl, a cgroup knob) written in place; 8,239,592 (one more,
/// with less code) after the review's mends: the filesystem service holds
/// the defaults, and one opener for every write in place; 8,247,784 (one
/// more) with tree signals followed to what a process that held the signal
/// back forks before it takes it; 8,243,688 (one fewer) with one reader of
/// `cgroup.procs` for the passes and the following.
const BUDGET: u64 = 8_248_000;

#[test]
fn static_binary_within_budget() {
    let Some(path) = std::env::var_os("ENVD_STATIC").filter(|v| !v.is_empty()) else {
        skip::skip(
            "static_binary_within_budget",
            "ENVD_STATIC is not set (make test sets it after make static)",
        );
        return;
    };
    let size = std::fs::metadata(&path).expect("the static binary").len();
    eprintln!("static envd: {size} bytes (budget {BUDGET})");
    assert!(
        size <= BUDGET,
        "envd grew to {size} bytes, past its budget of {BUDGET}"
    );
    let file = std::process::Command::new("file").arg(&path).output();
    if let Ok(out) = file {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("static"), "not statically linked: {text}");
    }
}
