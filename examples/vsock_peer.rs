//! A raw vsock peer for the VM benchmarks (the baseline envd is compared
//! with): `vsock_peer echo PORT` echoes; `sink PORT` reads until EOF and
//! answers the byte count (8 bytes, big-endian); `source PORT BYTES` writes
//! BYTES bytes to each connection. Writes are at most 16 KiB (vsock pitfall).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_vsock::{VsockAddr, VsockListener, VMADDR_CID_ANY};

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).cloned().unwrap_or_default();
    let port: u32 = args.get(2).and_then(|p| p.parse().ok()).unwrap_or(5000);
    let bytes: u64 = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(0);
    let listener = VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, port))?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let mode = mode.clone();
        tokio::spawn(async move {
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
                _ => {}
            }
        });
    }
}
