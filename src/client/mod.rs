//! Host-side client: dial envd at a URL and get a gRPC channel for the
//! generated clients (`ProcessClient::new(channel)`).

use std::io;
use std::path::PathBuf;

use hyper_util::rt::TokioIo;
use tokio::net::{TcpStream, UnixStream};
use tonic::transport::{Channel, Endpoint};

/// Flow-control windows matching the server's, for full-speed streams.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Larger HTTP/2 frames: fewer frames per MiB of output or file data.
const MAX_FRAME: u32 = 256 * 1024;

/// Dials `tcp://HOST:PORT` or `unix:///path`.
pub async fn dial(url: &str) -> Result<Channel, String> {
    let endpoint = Endpoint::from_static("http://envd")
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME);
    let fail = |e: tonic::transport::Error| format!("cannot connect to {url}: {e}");
    if let Some(addr) = url.strip_prefix("tcp://") {
        let addr = addr.to_owned();
        endpoint
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let addr = addr.clone();
                async move {
                    let s = TcpStream::connect(addr).await?;
                    s.set_nodelay(true)?;
                    Ok::<_, io::Error>(TokioIo::new(s))
                }
            }))
            .await
            .map_err(fail)
    } else if let Some(path) = url.strip_prefix("unix://") {
        let path = PathBuf::from(path);
        endpoint
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move { Ok::<_, io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
            }))
            .await
            .map_err(fail)
    } else {
        Err(format!("'{url}': expected tcp://HOST:PORT or unix:///PATH"))
    }
}
