//! A raw peer for the VM benchmarks (the baseline envd is compared with):
//! `vsock_peer echo PORT` echoes; `sink PORT` reads until EOF and answers
//! the byte count (8 bytes, big-endian); `source PORT BYTES` writes BYTES
//! bytes to each connection. On vsock; with a `tcp-` prefix (`tcp-echo`,
//! `tcp-source`) on TCP 127.0.0.1:PORT instead, for the forwarding benchmark.
//! `file-sink PORT PATH` is `sink` writing what it reads to PATH, and
//! `file-source PORT PATH` sends PATH's bytes: the honest baselines for
//! envd's file transfers, which also touch the guest's file.
//! `drain-tcp PORT` is a client: it reads 127.0.0.1:PORT to EOF and prints
//! the byte count and the seconds it took (what the guest's loopback TCP
//! alone carries, the floor under a forwarded stream).
//! Writes are at most 16 KiB (vsock pitfall).

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

/// File reads and writes of the file modes.
const FILE_BLOCK: usize = 1 << 20;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let port: u32 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(5000);
    let arg = args.get(3).cloned().unwrap_or_default();
    let bytes: u64 = arg.parse().unwrap_or(0);
    if mode == "drain-tcp" {
        let port = u16::try_from(port).unwrap_or(6000);
        let t = std::time::Instant::now();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf).await? {
                0 => break,
                k => n += k as u64,
            }
        }
        println!("{n} {}", t.elapsed().as_secs_f64());
        return Ok(());
    }
    if let Some(m) = mode.strip_prefix("tcp-") {
        let m = m.to_owned();
        let port = u16::try_from(port).unwrap_or(6000);
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        loop {
            let (s, _) = listener.accept().await?;
            let _ = s.set_nodelay(true);
            tokio::spawn(serve(s, m.clone(), bytes, arg.clone()));
        }
    }
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
    loop {
        let (s, _) = listener.accept().await?;
        tokio::spawn(serve(s, mode.clone(), bytes, arg.clone()));
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    mode: String,
    bytes: u64,
    path: String,
) {
    let mut buf = vec![0u8; 16 * 1024];
    match mode.as_str() {
        "echo" => loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        },
        "sink" => {
            let mut len = [0u8; 8];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            let want = u64::from_be_bytes(len);
            let mut total = 0u64;
            while total < want {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => total += n as u64,
                }
            }
            let _ = s.write_all(&total.to_be_bytes()).await;
        }
        "source" => {
            let mut left = bytes;
            while left > 0 {
                let n = usize::try_from(left).map_or(buf.len(), |l| l.min(buf.len()));
                if s.write_all(&buf[..n]).await.is_err() {
                    return;
                }
                left -= n as u64;
            }
        }
        "file-sink" => {
            let mut len = [0u8; 8];
            if s.read_exact(&mut len).await.is_err() {
                return;
            }
            // Plain blocking file I/O in 1 MiB writes (as envd's transfers
            // write): the peer serves one transfer at a time.
            let Ok(mut f) = std::fs::File::create(&path) else {
                return;
            };
            let want = u64::from_be_bytes(len);
            let mut total = 0u64;
            let mut block = vec![0u8; FILE_BLOCK];
            let mut filled = 0;
            while total < want {
                match s.read(&mut block[filled..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        filled += n;
                        total += n as u64;
                        if filled == block.len() || total >= want {
                            if std::io::Write::write_all(&mut f, &block[..filled]).is_err() {
                                return;
                            }
                            filled = 0;
                        }
                    }
                }
            }
            let _ = s.write_all(&total.to_be_bytes()).await;
        }
        "file-source" => {
            let Ok(mut f) = std::fs::File::open(&path) else {
                return;
            };
            let mut block = vec![0u8; FILE_BLOCK];
            loop {
                match std::io::Read::read(&mut f, &mut block) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        for piece in block[..n].chunks(buf.len()) {
                            if s.write_all(piece).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        }
        _ => {}
    }
}
