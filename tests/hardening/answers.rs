//! Large answers: built whole and held until their callers read them, so
//! they share one budget (`src/answers.rs`).

use super::*;

/// A directory of `n` files with names of 200 characters: its listing is
/// about `n` × 640 bytes of JSON (19 MB for 30,000).
fn big_dir(n: usize) -> (tempfile::TempDir, PathBuf) {
    let (guard, dir) = empty_dir("big");
    let stem = "n".repeat(190);
    for i in 0..n {
        std::fs::File::create(dir.join(format!("{stem}{i:010}"))).unwrap();
    }
    (guard, dir)
}

fn list_json(e: &Envd, dir: &Path) -> Reply {
    post_json(
        &e.tcp,
        "/filesystem.Filesystem/ListDir",
        &format!(r#"{{"path":"{}","depth":1}}"#, dir.display()),
    )
}

// Sixteen callers ask for a listing of 19 MB and read none of it. Each
// answer was held whole (with the entries while they were encoded, a JSON
// listing cost envd about 11 times its size at its peak): envd grew by
// 3.5 GiB with sixty such callers. Now the answers share 64 MiB: those
// beyond it are refused, and the budget comes back once they are read.
// Measured on the static build where there is one: under load, the test
// build's glibc kept up to 206 MiB where musl's allocator peaked at 67–72.
#[test]
fn large_answers_not_read_share_one_budget() {
    let e = Envd::start_static(&[]);
    let (_guard, dir) = big_dir(30_000);
    let before = anon_kib(e.pid());
    let mut held: Vec<TcpStream> = (0..16).map(|_| list_unread(&e, &dir)).collect();
    let (mut answered, mut refused, mut peak) = (0, 0, 0);
    for c in &mut held {
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        match &head {
            b"HTTP/1.1 200" => answered += 1,
            b"HTTP/1.1 429" => refused += 1,
            other => panic!("{}", String::from_utf8_lossy(other)),
        }
        peak = peak.max(anon_kib(e.pid()).saturating_sub(before) / 1024);
    }
    println!("{answered} answered, {refused} refused; envd grew by {peak} MiB at most");
    assert!(peak < 200, "envd grew by {peak} MiB");
    assert!(answered > 0, "no listing was answered");
    assert!(refused > 0, "no listing was refused");
    healthy(&e);
    // Which listings were answered depends on timing, and two held may
    // leave room for a third: hold more, unread, until one is refused.
    for _ in 0..4 {
        let mut c = list_unread(&e, &dir);
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut head = [0u8; 12];
        c.read_exact(&mut head).unwrap();
        if &head != b"HTTP/1.1 200" {
            break;
        }
        held.push(c);
    }
    // Refused, with a reason.
    let r = list_json(&e, &dir);
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r.text().contains("have not read yet"), "{}", r.text());
    // Read (here: gone), the answers give their share back.
    drop(held);
    let r = list_json(&e, &dir);
    assert_eq!(r.status, 200, "{}", &r.text()[..r.text().len().min(300)]);
    assert_eq!(r.text().matches("\"name\"").count(), 30_000);
}

// Large listings asked for side by side, by callers that read them, are
// all answered: built one at a time, each has the budget to itself (side
// by side, each growing its count, they ran it out half-way and were all
// refused).
#[test]
fn large_listings_side_by_side_are_all_answered() {
    let e = Envd::start(&[]);
    let (_guard, dir) = big_dir(30_000);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let calls: Vec<_> = (0..4).map(|_| s.spawn(|| list_json(&e, &dir))).collect();
        calls
            .into_iter()
            .map(|c| {
                let r = c.join().unwrap();
                if r.status == 200 {
                    assert_eq!(r.text().matches("\"name\"").count(), 30_000);
                }
                r.status
            })
            .collect()
    });
    assert_eq!(statuses, [200; 4]);
}

// Native gRPC answers count too, until their callers read them: listings
// whose HTTP/2 streams are not read (a window of 64 KiB) hold the budget,
// so a Connect listing is refused, and the budget comes back with their
// connection.
#[tokio::test]
async fn grpc_answers_not_read_count_too() {
    use http_body_util::Full;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use prost::Message;
    let e = Envd::start(&[]);
    let (_guard, dir) = big_dir(30_000);
    let tcp = tokio::net::TcpStream::connect(addr(&e.tcp)).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let message = ListDirRequest {
        path: dir.display().to_string(),
        depth: 1,
    }
    .encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    let (mut unread, mut refused) = (Vec::new(), 0);
    for _ in 0..4 {
        let req = ::http::Request::post(format!(
            "http://{}/filesystem.Filesystem/ListDir",
            addr(&e.tcp)
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(bytes::Bytes::from(framed.clone())))
        .unwrap();
        let r = send.send_request(req).await.unwrap();
        // Refused: a trailers-only answer with RESOURCE_EXHAUSTED (8).
        match r
            .headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
        {
            Some(code) if code == "8" => refused += 1,
            Some(other) => panic!("grpc-status {other}"),
            None => unread.push(r),
        }
    }
    assert!(!unread.is_empty(), "no gRPC listing was answered");
    assert!(refused > 0, "no gRPC listing was refused");
    let r = list_json(&e, &dir);
    assert_eq!(r.status, 429, "{}", r.text());
    drop(unread);
    drop(send);
    driver.abort();
    let answered = {
        let mut status = 0;
        for _ in 0..50 {
            status = list_json(&e, &dir).status;
            if status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        status
    };
    assert_eq!(answered, 200, "the budget did not come back");
}

// A listing whose entries alone take more than the whole budget in memory
// (200,000 short names: under the 16 MiB a response may carry, but ~5 times
// that as entries before they are encoded) can never be answered. It was
// refused as if other answers held the budget, telling the caller to retry.
#[test]
fn a_listing_larger_than_the_budget_is_not_told_to_retry() {
    let e = Envd::start(&[]);
    let (_guard, dir) = empty_dir("short-names");
    for i in 0..200_000 {
        std::fs::File::create(dir.join(i.to_string())).unwrap();
    }
    let r = list_json(&e, &dir);
    assert_eq!(r.status, 429, "{}", &r.text()[..r.text().len().min(300)]);
    assert!(!r.text().contains("retry"), "{}", r.text());
    let why = r.text();
    assert!(
        why.contains("ask for less") || why.contains("fewer levels"),
        "{why}"
    );
    healthy(&e);
}
