//! A loopback TCP relay in front of envd that a test can cut, so envd sees
//! what a client that vanishes looks like on the wire: the connection closes
//! with its HTTP/2 streams still open (no END_STREAM, no RST_STREAM).
//! Dropping a tonic call cannot show that: the body pipe task may still end
//! the request stream cleanly.

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub struct CutRelay {
    /// `tcp://127.0.0.1:PORT` to dial instead of envd.
    pub url: String,
    cut: watch::Sender<bool>,
}

impl CutRelay {
    /// Relays every connection made to `url` on to `target` (`tcp://…`).
    pub async fn start(target: &str) -> CutRelay {
        let target = target.trim_start_matches("tcp://").to_owned();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("tcp://{}", listener.local_addr().unwrap());
        let (cut, cut_rx) = watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let mut upstream = TcpStream::connect(&target).await.unwrap();
                let mut cut_rx = cut_rx.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = cut_rx.wait_for(|c| *c) => {}
                    }
                    // Both sockets are dropped here, mid-stream.
                });
            }
        });
        CutRelay { url, cut }
    }

    /// Closes every relayed connection at once.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }
}
