//! Live-upgrade downtime as a client sees it: a prober asks `/health` on a
//! fresh connection over and over while envd upgrades in place; the downtime
//! is the longest gap between two answers (the last answer of the old image
//! and the first of the new one).
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn health(target: &envd::client::Target) -> bool {
    let Ok(mut s) = target.connect().await else {
        return false;
    };
    if s.write_all(b"GET /health HTTP/1.1\r\nhost: envd\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 204")
}

/// (median `/health` round trip, longest gap between answers during one
/// in-place upgrade, the upgrade's report).
pub async fn measure(url: &str) -> (Duration, Duration, envd::client::upgrade::Upgraded) {
    let target: envd::client::Target = url.parse().unwrap();
    let mut rtts = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        assert!(health(&target).await, "envd does not answer /health");
        rtts.push(t.elapsed());
    }
    rtts.sort();
    let rtt = rtts[rtts.len() / 2];
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (target, stop) = (target.clone(), stop.clone());
        tokio::spawn(async move {
            let mut answers = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                if health(&target).await {
                    answers.push(Instant::now());
                }
            }
            answers
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let up = envd::client::upgrade::upgrade(&target, b"", None, Duration::from_secs(120))
        .await
        .unwrap_or_else(|e| panic!("upgrade: {e}"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = prober.await.unwrap();
    let gap = answers
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    (rtt, gap, up)
}
