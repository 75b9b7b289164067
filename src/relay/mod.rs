//! Carrying bytes between a client and a server connection (tunnels, the
//! proxy, forwards). Both directions run at once; a client that finishes
//! sending half-closes the server side and the server may go on answering.
//! When the server side ends, the relay ends: the client connection is
//! closed whole, not half-closed, because some transports (hybrid vsock
//! through vhost-device-vsock) do not carry a half-close, and a client waiting
//! for EOF would then wait forever.

pub mod splice;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Relays until the server side ends (or either side fails). Returns the
/// bytes carried client → server and server → client.
pub async fn relay<C, S>(client: C, server: S) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut server_rx, mut server_tx) = tokio::io::split(server);
    let up = async {
        let n = tokio::io::copy(&mut client_rx, &mut server_tx).await?;
        server_tx.shutdown().await?;
        Ok::<u64, std::io::Error>(n)
    };
    let down = async {
        let n = tokio::io::copy(&mut server_rx, &mut client_tx).await?;
        client_tx.shutdown().await?;
        Ok::<u64, std::io::Error>(n)
    };
    both_ways(up, down).await
}

/// Runs the two directions of a relay at once until `down` (server →
/// client) ends; `up` ending first (a client's half-close) lets `down` go
/// on. Returns the bytes each carried.
async fn both_ways<U, D>(up: U, down: D) -> std::io::Result<(u64, u64)>
where
    U: std::future::Future<Output = std::io::Result<u64>>,
    D: std::future::Future<Output = std::io::Result<u64>>,
{
    tokio::pin!(up, down);
    let mut sent = None;
    loop {
        tokio::select! {
            r = &mut up, if sent.is_none() => sent = Some(r?),
            r = &mut down => return Ok((sent.unwrap_or(0), r?)),
        }
    }
}
