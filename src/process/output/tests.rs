use super::*;
use std::time::Duration;

fn end() -> EndEvent {
    EndEvent {
        exit_code: 0,
        exited: true,
        status: "exit status 0".into(),
        error: None,
        ..Default::default()
    }
}

/// An ended log is compacted: a replay from any offset gives the same
/// bytes, sources and offsets, in reads of at most 64 KiB.
#[tokio::test]
async fn finishing_compacts_and_replays_the_same_output() {
    let log = OutputLog::new(1 << 20, Budget::new(u64::MAX));
    let mut want = Vec::new();
    for i in 0..40u8 {
        let source = if i % 8 == 7 {
            Source::Stderr
        } else {
            Source::Stdout
        };
        let data = vec![i; 3000 + usize::from(i) * 1000];
        want.push((source, data.clone()));
        log.append(source, Bytes::from(data)).await;
    }
    log.finish(end());
    assert!(
        log.lock().chunks.len() < 12,
        "{} chunks",
        log.lock().chunks.len()
    );
    for from in [0u64, 1, 4999, 100_000] {
        let (mut sub, at, lost) = log.subscribe_from(from).unwrap();
        assert_eq!((at, lost), (from, 0));
        let mut got: Vec<(Source, Vec<u8>)> = Vec::new();
        while let Next::Data(src, b) = sub.next().await {
            assert!(b.len() <= READ_MAX);
            match got.last_mut() {
                Some((s, v)) if *s == src => v.extend_from_slice(&b),
                _ => got.push((src, b.to_vec())),
            }
        }
        // The expected stream from `from`, runs of one source joined.
        let mut expect: Vec<(Source, Vec<u8>)> = Vec::new();
        let mut skip = usize::try_from(from).unwrap();
        for (src, d) in &want {
            let d = if skip >= d.len() {
                skip -= d.len();
                continue;
            } else {
                let rest = &d[skip..];
                skip = 0;
                rest
            };
            match expect.last_mut() {
                Some((s, v)) if s == src => v.extend_from_slice(d),
                _ => expect.push((*src, d.to_vec())),
            }
        }
        assert!(got == expect, "replay from {from} differs");
    }
}

/// Appends `n` one-byte outputs, stdout and stderr by turns (which
/// cannot merge).
async fn append_alternating(log: &OutputLog, n: usize) {
    for i in 0..n {
        let source = if i % 2 == 0 {
            Source::Stdout
        } else {
            Source::Stderr
        };
        log.append(source, Bytes::from_static(b"c")).await;
    }
}

/// Appends of a few bytes merge per source; when sources alternate (no
/// merging) the chunk count is bounded, and a reader sees every byte in
/// order either way.
#[tokio::test]
async fn tiny_appends_merge_and_the_chunk_count_is_bounded() {
    let log = OutputLog::new(1 << 20, Budget::new(u64::MAX));
    let mut sub = log.subscribe_live();
    for _ in 0..100_000 {
        log.append(Source::Stdout, Bytes::from_static(b"ab")).await;
        // The reader keeps up, so nothing is dropped for it.
        while let Some(Next::Data(..)) = sub.try_next() {}
    }
    // 200,000 bytes in chunks of up to MERGE_MAX.
    assert!(log.lock().chunks.len() <= 200_000 / MERGE_MAX + 1);
    assert_eq!(log.lock().retained(), 200_000);
    drop(sub);
    append_alternating(&log, 100_000).await;
    assert!(log.lock().chunks.len() <= max_chunks(1 << 20));
    let (mut sub, at, lost) = log.subscribe_from(0).unwrap();
    assert!(lost > 0 && at == lost);
    let mut n = 0u64;
    while let Some(Next::Data(..)) = sub.try_next() {
        n += 1;
    }
    assert_eq!(n, log.lock().chunks.len() as u64);
}

/// Chunks count against the shared budget too: many logs of one-byte
/// chunks (8,192 each, 8 KiB of bytes) are trimmed once their chunks
/// exceed it, though their bytes alone would not.
#[tokio::test]
async fn the_shared_budget_counts_chunks() {
    let budget = Budget::new(1 << 20);
    let logs: Vec<_> = (0..50)
        .map(|_| OutputLog::new(4 << 20, budget.clone()))
        .collect();
    for log in &logs {
        append_alternating(log, 8192).await;
    }
    let chunks: usize = logs.iter().map(|l| l.lock().chunks.len()).sum();
    assert!(chunks < 50 * 1024, "{chunks} chunks kept");
    assert!(budget.used() < 2 << 20, "{} counted", budget.used());
    drop(logs);
    assert_eq!(budget.used(), 0);
}

#[tokio::test]
async fn drops_oldest_without_subscribers_and_reports_loss() {
    let log = OutputLog::new(10, Budget::new(u64::MAX));
    for i in 0..5u8 {
        log.append(Source::Stdout, Bytes::from(vec![i; 4])).await;
    }
    // 20 bytes written, capacity 10: the oldest chunks are gone.
    let (mut sub, at, lost) = log.subscribe_from(0).unwrap();
    assert_eq!(at, 12);
    assert_eq!(lost, 12);
    assert_eq!(
        sub.next().await,
        Next::Data(Source::Stdout, Bytes::from(vec![3; 4]))
    );
    assert!(log.subscribe_from(21).is_err());
}

#[tokio::test]
async fn shared_budget_trims_to_the_floor_and_is_returned() {
    let budget = Budget::new(3 * FLOOR);
    let logs: Vec<_> = (0..4)
        .map(|_| OutputLog::new(4 * usize::try_from(FLOOR).unwrap(), budget.clone()))
        .collect();
    for log in &logs {
        for _ in 0..4 {
            log.append(
                Source::Stdout,
                Bytes::from(vec![0; usize::try_from(FLOOR).unwrap()]),
            )
            .await;
        }
    }
    // Over budget: later logs were trimmed to the floor.
    assert!(budget.used() <= 3 * FLOOR + 4 * FLOOR, "{}", budget.used());
    let (_, at, lost) = logs[3].subscribe_from(0).unwrap();
    assert_eq!((at, lost), (3 * FLOOR, 3 * FLOOR));
    drop(logs);
    assert_eq!(budget.used(), 0);
}

/// Ended logs keep at most half the budget together (the oldest give
/// their output up first), so they never press running logs by
/// themselves; their share is given back when they go.
#[tokio::test]
async fn ended_logs_keep_half_the_budget() {
    let kib = |n: usize| Bytes::from(vec![0; n << 10]);
    let budget = Budget::new(1 << 20);
    let mut ended = Vec::new();
    for _ in 0..8 {
        let log = OutputLog::new(1 << 20, budget.clone());
        for _ in 0..4 {
            log.append(Source::Stdout, kib(64)).await;
        }
        log.finish(end());
        ended.push(log);
    }
    let kept = budget.ended();
    assert!(kept <= 512 << 10, "ended logs keep {kept}");
    assert_eq!(kept, budget.used());
    // The newest keep their output; the oldest gave theirs up.
    let (_, at, lost) = ended[7].subscribe_from(0).unwrap();
    assert_eq!((at, lost), (0, 0));
    let (_, _, lost) = ended[0].subscribe_from(0).unwrap();
    assert_eq!(lost, 256 << 10);
    assert!(!budget.over());
    // A running log still has the other half unpressed.
    let running = OutputLog::new(1 << 20, budget.clone());
    let mut sub = running.subscribe_live();
    for _ in 0..6 {
        running.append(Source::Stdout, kib(64)).await;
    }
    assert!(!running.pressed());
    while let Some(Next::Data(..)) = sub.try_next() {}
    drop(ended);
    assert_eq!(budget.ended(), 0);
    assert_eq!(budget.used(), running.lock().cost());
}

#[tokio::test]
async fn resume_mid_chunk_and_end() {
    let log = OutputLog::new(100, Budget::new(u64::MAX));
    log.append(Source::Stdout, Bytes::from_static(b"hello"))
        .await;
    log.append(Source::Stderr, Bytes::from_static(b"world"))
        .await;
    log.finish(end());
    let (mut sub, at, lost) = log.subscribe_from(3).unwrap();
    assert_eq!((at, lost), (3, 0));
    assert_eq!(
        sub.next().await,
        Next::Data(Source::Stdout, Bytes::from_static(b"lo"))
    );
    assert_eq!(
        sub.next().await,
        Next::Data(Source::Stderr, Bytes::from_static(b"world"))
    );
    assert_eq!(sub.next().await, Next::End(end()));
}

#[tokio::test]
async fn slow_subscriber_applies_back_pressure() {
    let log = OutputLog::new(8, Budget::new(u64::MAX));
    let mut sub = log.subscribe_live();
    log.append(Source::Stdout, Bytes::from_static(b"12345678"))
        .await;
    let producer = {
        let log = log.clone();
        tokio::spawn(async move { log.append(Source::Stdout, Bytes::from_static(b"9")).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        !producer.is_finished(),
        "producer must wait for the subscriber"
    );
    assert_eq!(
        sub.next().await,
        Next::Data(Source::Stdout, Bytes::from_static(b"12345678"))
    );
    producer.await.unwrap();
    assert_eq!(
        sub.next().await,
        Next::Data(Source::Stdout, Bytes::from_static(b"9"))
    );
    drop(sub);
    // Detached: the producer no longer waits.
    log.append(Source::Stdout, Bytes::from_static(b"abcdefghij"))
        .await;
}

/// Room reserved for a read counts as output an attached subscriber has
/// not read: two pumps of one log cannot together run further ahead than
/// the capacity, and room given back unused lets the other go on.
#[tokio::test]
async fn reserved_room_counts_against_a_slow_subscriber() {
    let log = OutputLog::new(256 << 10, Budget::new(u64::MAX));
    let mut sub = log.subscribe_live();
    log.append(Source::Stdout, Bytes::from(vec![1; 100 << 10]))
        .await;
    // 156 KiB of room left; a pump wanting 128 KiB gets it.
    let first = log.reserve(128 << 10, false).await;
    assert_eq!(first.bytes(), 128 << 10);
    // 28 KiB left, less than a quarter of the capacity: a second waits.
    let second = tokio::time::timeout(Duration::from_millis(100), log.reserve(64 << 10, false));
    assert!(second.await.is_err(), "room granted beyond the capacity");
    // The first read only 10 KiB: what it did not use is room again (146
    // KiB), and the second gets what it wants.
    log.commit(first, Source::Stderr, Bytes::from(vec![2; 10 << 10]));
    assert_eq!(log.image_end().0, 110 << 10);
    let second = tokio::time::timeout(Duration::from_millis(100), log.reserve(64 << 10, false))
        .await
        .expect("room after the first gave back what it did not use");
    assert_eq!(second.bytes(), 64 << 10);
    drop(second);
    // Reading catches the subscriber up: a whole append fits again.
    while let Some(Next::Data(..)) = sub.try_next() {}
    let whole = log.reserve(300 << 10, true).await;
    assert_eq!(
        whole.bytes(),
        300 << 10,
        "a caught-up subscriber holds nothing back"
    );
}
