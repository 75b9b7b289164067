//! Reaching into a VM without a network: `envctl proxy` (any TCP client to
//! envd over envd's transport), HTTP CONNECT tunnels to the VM's loopback,
//! and `envctl forward` on top of them. Here the "VM" is the host, reached
//! over envd's Unix socket.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::http::request;
use common::*;

/// Starts `envctl --url <url> <args>`; returns it and the address it
/// printed ("... tcp://ADDR to ..." or "forwarding ADDR to ...").
fn envctl(url: &str, args: &[&str], token: Option<&str>) -> (Child, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_envctl"));
    cmd.arg("--url").arg(url);
    if let Some(t) = token {
        cmd.arg("--token").arg(t);
    }
    let mut child = cmd
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .split_whitespace()
        .find_map(|w| {
            let w = w.trim_start_matches("tcp://");
            w.parse::<std::net::SocketAddr>()
                .ok()
                .map(|a| a.to_string())
        })
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    (child, addr)
}

/// A server on 127.0.0.1 (the "guest's" loopback) that runs `serve` on a
/// thread of its own for each connection; its port.
fn server(serve: fn(TcpStream)) -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || serve(c));
        }
    });
    port
}

/// An echo server on the "guest's" loopback.
fn echo_server() -> u16 {
    server(|mut c| {
        let mut r = c.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut c);
    })
}

fn connect(envd: &str, dest: &str, token: Option<&str>) -> (TcpStream, String) {
    let mut s = TcpStream::connect(envd.trim_start_matches("tcp://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("x-access-token: {t}\r\n"))
        .unwrap_or_default();
    write!(s, "CONNECT {dest} HTTP/1.1\r\nhost: {dest}\r\n{auth}\r\n").unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

/// A loopback port that refuses connections, held for as long as the
/// returned socket lives: bound, never listening. A port merely freed after a
/// bind can be taken again before it is used, by another test's listener or
/// by the connection to it itself (a loopback connect whose ephemeral source
/// port is its destination connects to itself), and then it answers.
fn refused_port() -> (tokio::net::TcpSocket, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let port = socket.local_addr().unwrap().port();
    (socket, port)
}

#[test]
fn connect_tunnels_reach_the_vms_loopback_only() {
    let port = echo_server();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "secret").unwrap();
    let envd = Envd::start(&["--access-token-file", token_file.path().to_str().unwrap()]);
    let (mut s, head) = connect(&envd.tcp, &format!("127.0.0.1:{port}"), Some("secret"));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    s.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    // No token, another host, a closed port, a name: refused, each clearly.
    let (_, head) = connect(&envd.tcp, &format!("127.0.0.1:{port}"), None);
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    let (_, head) = connect(&envd.tcp, "10.1.2.3:80", Some("secret"));
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (_held, closed) = refused_port();
    let (_, head) = connect(&envd.tcp, &format!("127.0.0.1:{closed}"), Some("secret"));
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    let (_, head) = connect(&envd.tcp, "example.com:80", Some("secret"));
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
fn eventually_sync(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Pipe ends envd holds open (a spliced tunnel holds two pipes: four).
fn pipes_of(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|l| l.to_string_lossy().starts_with("pipe:"))
        .count()
}

/// Bytes sent in the same packet as the CONNECT head, then a half-close:
/// the guest's server sees all of them in order and its EOF, and its answer
/// (sent after that EOF) still reaches the client. Over TCP (spliced in the
/// kernel: envd holds two more pipes while the tunnel lives) and over the
/// Unix socket (relayed through buffers).
#[test]
fn tunnels_carry_early_bytes_and_a_half_close() {
    // Reads to EOF, then answers with what it got and closes.
    let port = server(|mut c| {
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        c.write_all(b"got:").unwrap();
        c.write_all(&got).unwrap();
    });
    let envd = Envd::start(&[]);
    let head = format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n\r\nearly|");
    let want = "got:early|late";

    let before = pipes_of(envd.pid());
    let mut s = TcpStream::connect(envd.tcp.trim_start_matches("tcp://")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let back = early_bytes_then_half_close(
        &mut s,
        &head,
        |s| s.shutdown(std::net::Shutdown::Write).unwrap(),
        || {
            assert!(
                eventually_sync(Duration::from_secs(5), || pipes_of(envd.pid())
                    == before + 4),
                "a spliced tunnel holds two pipes (four ends): {} ends before, {} now",
                before,
                pipes_of(envd.pid())
            );
        },
    );
    assert_eq!(back, want);
    assert!(
        eventually_sync(Duration::from_secs(5), || pipes_of(envd.pid()) == before),
        "the ended tunnel's pipes stay open"
    );

    let path = envd.unix.trim_start_matches("unix://").to_owned();
    let mut u = std::os::unix::net::UnixStream::connect(path).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let back = early_bytes_then_half_close(
        &mut u,
        &head,
        |u| u.shutdown(std::net::Shutdown::Write).unwrap(),
        || {},
    );
    assert_eq!(back, want);
}

/// Sends `head` (a CONNECT with bytes after it), expects 200, runs
/// `while_open`, sends "late", half-closes with `shut` and returns all that
/// came back.
fn early_bytes_then_half_close<S: Read + Write>(
    s: &mut S,
    head: &str,
    shut: impl FnOnce(&S),
    while_open: impl FnOnce(),
) -> String {
    s.write_all(head.as_bytes()).unwrap();
    let answer = String::from_utf8(common::http::read_head(s)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    while_open();
    s.write_all(b"late").unwrap();
    shut(s);
    let mut back = Vec::new();
    s.read_to_end(&mut back).unwrap();
    String::from_utf8_lossy(&back).into_owned()
}

/// `n` connections to `addr` at once, each sending `len` bytes of its own
/// value while it reads them back from an echo behind the tunnel.
fn echo_at_once(addr: &str, n: u8, len: usize) {
    let workers: Vec<_> = (0..n)
        .map(|i| {
            let addr = addr.to_owned();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let msg = vec![i; len];
                let mut w = s.try_clone().unwrap();
                let sender = std::thread::spawn(move || w.write_all(&msg).unwrap());
                let mut back = vec![0u8; len];
                s.read_exact(&mut back).unwrap();
                sender.join().unwrap();
                assert!(
                    back.iter().all(|b| *b == i),
                    "connection {i} came back changed"
                );
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
}

#[test]
fn forward_carries_many_connections_and_large_streams() {
    let port = echo_server();
    let envd = Envd::start(&[]);
    // Over TCP, where envd splices each tunnel socket to socket.
    let (mut fwd, addr) = envctl(&envd.tcp, &["forward", &format!("0:{port}")], None);
    // 50 connections at once.
    echo_at_once(&addr, 50, 64 << 10);
    // 64 MiB through one tunnel, checked.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut sum = 0u64;
        for i in 0..1024u32 {
            let chunk: Vec<u8> = (0..65536u32).map(|j| (i ^ j).to_le_bytes()[0]).collect();
            sum = chunk
                .iter()
                .fold(sum, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(*b)));
            w.write_all(&chunk).unwrap();
        }
        sum
    });
    let mut sum = 0u64;
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while got < 64 << 20 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the tunnel closed after {got} bytes");
        sum = buf[..n]
            .iter()
            .fold(sum, |a, b| a.wrapping_mul(31).wrapping_add(u64::from(*b)));
        got += n;
    }
    assert_eq!(sum, sender.join().unwrap(), "64 MiB came back changed");
    let _ = fwd.kill();
    let _ = fwd.wait();
}

/// A service on the host reached from the "guest's" loopback through
/// `envctl reverse` (over envd's Unix socket): 20 connections at once, each
/// echoed whole, more than the tunnels waiting at envd; a guest port that
/// is taken makes `envctl reverse` fail with envd's answer; and the
/// listener goes once no tunnel waits on it.
#[test]
fn reverse_tunnels_reach_a_host_service_from_the_vms_loopback() {
    let service = echo_server();
    let envd = Envd::start(&[]);
    let guest_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let spec = format!("{guest_port}:{service}");
    let (mut rev, addr) = envctl(&envd.unix, &["reverse", &spec], None);
    assert_eq!(addr, format!("127.0.0.1:{guest_port}"));
    // Listening once the first waiting tunnel has reached envd.
    assert!(
        eventually_sync(Duration::from_secs(10), || TcpStream::connect(&addr)
            .is_ok()),
        "envd never listened on {addr}"
    );
    echo_at_once(&addr, 20, 256 << 10);
    // A port the "guest" already uses.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    let out = Command::new(env!("CARGO_BIN_EXE_envctl"))
        .args([
            "--url",
            &envd.unix,
            "reverse",
            &format!("{taken_port}:{service}"),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("409"), "{err}");
    // Without waiting tunnels the listener goes (after its linger).
    let _ = rev.kill();
    let _ = rev.wait();
    assert!(
        eventually_sync(Duration::from_secs(20), || TcpStream::connect(&addr)
            .is_err()),
        "envd still listens on {addr}"
    );
}

/// The loopback ports `pid` listens on (its sockets in `/proc/net/tcp` in
/// the LISTEN state): envd's own, not whoever else holds a port.
fn listening_ports_of(pid: u32) -> std::collections::HashSet<u16> {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, port) = f.get(1)?.split_once(':')?;
            let listen = addr == "0100007F" && f.get(3) == Some(&"0A");
            (listen && inodes.contains(*f.get(9)?)).then(|| u16::from_str_radix(port, 16).ok())?
        })
        .collect()
}

/// Reverse tunnels are bounded: at most 256 requests wait on one address,
/// and envd listens on at most 64 addresses; past either, a clear 503.
/// (Ports come from binding port 0 and letting go, so another test may take
/// one first: envd's own listening sockets are what is counted.)
#[test]
fn reverse_tunnels_are_bounded() {
    let envd = Envd::start(&[]);
    let free_port = || {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    // Sends a reverse request for `port`; the connection, left waiting.
    let ask = |port: u16| {
        let mut s = TcpStream::connect(envd.tcp.trim_start_matches("tcp://")).unwrap();
        write!(
            s,
            "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nEnvd-Tunnel: listen\r\n\r\n"
        )
        .unwrap();
        s
    };
    // envd's answer on `s` within `limit` (empty: none yet, it waits).
    let answer = |s: &mut TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut head = vec![0u8; 1024];
        match s.read(&mut head) {
            Ok(n) => String::from_utf8_lossy(&head[..n]).into_owned(),
            Err(_) => String::new(),
        }
    };
    let listened = |ports: &[u16]| {
        let mine = listening_ports_of(envd.pid());
        ports.iter().filter(|p| mine.contains(p)).count()
    };
    // One address envd listens on, with a request waiting there.
    let mut held = Vec::new();
    let port = (0..20)
        .find_map(|_| {
            let p = free_port();
            held.push(ask(p));
            eventually_sync(Duration::from_secs(2), || listened(&[p]) == 1).then_some(p)
        })
        .expect("envd never listened on an address asked for");
    held.extend((1..256).map(|_| ask(port)));
    // More, until envd refuses one: the 257th, or a few later if some of the
    // first were still on their way in.
    let refused = loop {
        let mut s = ask(port);
        let a = answer(&mut s, Duration::from_millis(500));
        if !a.is_empty() {
            break a;
        }
        held.push(s);
        assert!(
            held.len() <= 320,
            "more than 256 requests wait on one address"
        );
    };
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("256 requests wait"), "{refused}");
    // Exactly 256 wait; any other was refused the same way (sent at once,
    // the requests reach envd in no set order).
    let mut waiting = 0;
    for s in &mut held {
        let a = answer(s, Duration::from_millis(10));
        if a.is_empty() {
            waiting += 1;
        } else {
            assert!(a.contains("256 requests wait"), "{a}");
        }
    }
    assert_eq!(waiting, 256, "requests waiting on one address");

    // Addresses until envd listens on 64 (asking again for any whose port
    // someone else took first), then one more.
    let mut asked = vec![port];
    for _ in 0..10 {
        let have = listened(&asked);
        if have >= 64 {
            break;
        }
        for _ in have..64 {
            // A port let go can come back from the next bind: each address
            // is counted once.
            let p = std::iter::repeat_with(free_port)
                .find(|p| !asked.contains(p))
                .unwrap();
            held.push(ask(p));
            asked.push(p);
        }
        eventually_sync(Duration::from_secs(5), || listened(&asked) >= 64);
    }
    assert_eq!(listened(&asked), 64, "envd does not listen on 64 addresses");
    let fresh = std::iter::repeat_with(free_port)
        .find(|p| !asked.contains(p))
        .unwrap();
    let mut one_more = ask(fresh);
    let a = answer(&mut one_more, Duration::from_secs(10));
    assert!(a.starts_with("HTTP/1.1 503"), "{a}");
    assert!(a.contains("64 reverse tunnel addresses"), "{a}");
    drop(held);
}

#[test]
fn proxy_lets_any_tcp_client_reach_envd() {
    let envd = Envd::start(&[]);
    let (mut proxy, addr) = envctl(
        &envd.unix,
        &["proxy", "--listen", "tcp://127.0.0.1:0"],
        None,
    );
    let url = format!("tcp://{addr}");
    // REST and Connect (HTTP/1.1), as the SDKs speak them.
    assert_eq!(request(&url, "GET", "/health", &[], b"").status, 204);
    let r = common::http::post_json(&url, "/process.Process/List", "{}");
    assert_eq!(r.status, 200, "{}", r.text());
    // Native gRPC (HTTP/2) too.
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ch = envd::client::dial(&url).await.unwrap();
        let mut c = envd::proto::process::process_client::ProcessClient::new(ch);
        let o = run(&mut c, sh("echo through the proxy")).await;
        assert_eq!(o.out(), "through the proxy\n");
    });
    let _ = proxy.kill();
    let _ = proxy.wait();
}

#[tokio::test]
async fn many_tunnels_share_one_http2_connection() {
    use http_body_util::Empty;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let port = echo_server();
    let envd = Envd::start(&[]);
    let sender = common::http::http2::<Empty<bytes::Bytes>>(&envd.tcp).await;
    let mut tasks = Vec::new();
    for i in 0..10u8 {
        let mut sender = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = ::http::Request::builder()
                .method(::http::Method::CONNECT)
                .uri(format!("127.0.0.1:{port}"))
                .body(Empty::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
            io.write_all(&[i; 1000]).await.unwrap();
            let mut back = [0u8; 1000];
            io.read_exact(&mut back).await.unwrap();
            assert!(back.iter().all(|b| *b == i));
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("an HTTP/2 tunnel hung")
            .unwrap();
    }
    // Reverse tunnels over the same connection: five requests wait at envd,
    // five "guest" clients connect to the port envd listens on, and each
    // answered tunnel (this test playing the host service) echoes.
    let guest = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut hosts = Vec::new();
    for _ in 0..5 {
        let mut sender = sender.clone();
        hosts.push(tokio::spawn(async move {
            let req = ::http::Request::builder()
                .method(::http::Method::CONNECT)
                .uri(format!("127.0.0.1:{guest}"))
                .header("envd-tunnel", "listen")
                .body(Empty::new())
                .unwrap();
            let resp = sender.send_request(req).await.unwrap();
            assert_eq!(resp.status(), 200);
            let mut io = TokioIo::new(hyper::upgrade::on(resp).await.unwrap());
            let mut got = [0u8; 1000];
            io.read_exact(&mut got).await.unwrap();
            io.write_all(&got).await.unwrap();
            // Ended, not dropped (a dropped HTTP/2 stream is reset, and
            // what it had not sent yet with it); then the guest's end.
            io.shutdown().await.unwrap();
            let mut rest = Vec::new();
            io.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
        }));
    }
    let mut guests = Vec::new();
    for i in 0..5u8 {
        guests.push(tokio::spawn(async move {
            let mut s = loop {
                match tokio::net::TcpStream::connect(("127.0.0.1", guest)).await {
                    Ok(s) => break s,
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            };
            s.write_all(&[i; 1000]).await.unwrap();
            let mut back = [0u8; 1000];
            s.read_exact(&mut back).await.unwrap();
            assert!(back.iter().all(|b| *b == i), "guest client {i}");
        }));
    }
    for t in guests.into_iter().chain(hosts) {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("an HTTP/2 reverse tunnel hung")
            .unwrap();
    }
}

#[tokio::test]
async fn ports_are_listed_and_watched_with_their_owners() {
    use envd::proto::ports::port_event::Event as PortEv;
    use envd::proto::ports::ports_client::PortsClient;
    use envd::proto::ports::{ListPortsRequest, WatchPortsRequest};
    use futures_util::StreamExt;
    let envd = Envd::start(&[]);
    let ch = envd::client::dial(&envd.tcp).await.unwrap();
    let mut ports = PortsClient::new(ch.clone());
    let mut watch = ports
        .watch(WatchPortsRequest {})
        .await
        .unwrap()
        .into_inner();
    // A server of the test's own: listed with this process as its owner.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = u32::from(server.local_addr().unwrap().port());
    let added = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = watch.next().await {
            if let Some(PortEv::Added(p)) = ev.unwrap().event {
                if p.port == port {
                    return p;
                }
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("no `added` for the new port");
    assert_eq!(added.address, "127.0.0.1");
    assert_eq!(added.pid, std::process::id());
    assert_eq!(added.command_pid, None, "not an envd command");
    drop(server);
    let removed = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(ev) = watch.next().await {
            if let Some(PortEv::Removed(p)) = ev.unwrap().event {
                if p.port == port {
                    return p;
                }
            }
        }
        panic!("the watch ended");
    })
    .await
    .expect("no `removed` once the server closed");
    assert_eq!(removed.pid, std::process::id());

    // A server started through envd belongs to that command.
    let mut c = envd::proto::process::process_client::ProcessClient::new(ch);
    let (mut s, mut o) = started(
        &mut c,
        cmd(
            &binary(),
            &["--listen", "tcp://127.0.0.1:0", "--log-format", "text"],
        ),
    )
    .await;
    read_until(&mut s, &mut o, |o| o.err().contains("listening")).await;
    let text = o.err();
    let port: u32 = text
        .split("url=tcp://127.0.0.1:")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|p| p.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok())
        .unwrap_or_else(|| panic!("no port in {text}"));
    let list = ports.list(ListPortsRequest {}).await.unwrap().into_inner();
    let mine = list.ports.iter().find(|p| p.port == port).expect("listed");
    assert_eq!(mine.command_pid, Some(o.pid));
    kill(&mut c, o.pid).await;
}
