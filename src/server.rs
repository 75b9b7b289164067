//! One router for every listener: the gRPC services plus health and
//! reflection, served over HTTP/2 (and HTTP/1.1, for the Connect adapter to
//! come) on any accepted connection.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tonic::service::Routes;

use crate::filesystem::FilesystemService;
use crate::grpc::filesystem::FilesystemGrpc;
use crate::grpc::process::ProcessGrpc;
use crate::listen::Listener;
use crate::process::ProcessService;
use crate::proto::filesystem::filesystem_server::FilesystemServer;
use crate::proto::process::process_server::ProcessServer;
use crate::proto::transfer::transfer_server::TransferServer;

/// HTTP/2 flow-control windows: large enough for full-speed output streams.
const STREAM_WINDOW: u32 = 2 << 20;
const CONNECTION_WINDOW: u32 = 4 << 20;
/// Concurrent RPCs per connection.
const MAX_STREAMS: u32 = 1024;

/// Builds the router with every service.
pub async fn routes(
    process: Arc<ProcessService>,
    filesystem: Arc<FilesystemService>,
) -> Result<Routes, String> {
    let fs = FilesystemGrpc::new(filesystem, process.defaults().clone());
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<ProcessServer<ProcessGrpc>>().await;
    health
        .set_serving::<FilesystemServer<FilesystemGrpc>>()
        .await;
    health.set_serving::<TransferServer<FilesystemGrpc>>().await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .map_err(|e| format!("reflection: {e}"))?;
    Ok(Routes::new(ProcessGrpc::server(process))
        .add_service(fs.filesystem_server())
        .add_service(fs.transfer_server())
        .add_service(health_svc)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare())
}

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http2()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_frame_size(256 * 1024);
    b
}

/// Accepts connections forever; each is served on its own task.
pub async fn serve(listener: Listener, url: String, routes: Routes) {
    let builder = http_builder();
    loop {
        match listener.accept().await {
            Ok(conn) => {
                let svc = TowerToHyperService::new(routes.clone());
                let builder = builder.clone();
                tokio::spawn(async move {
                    if let Err(e) = builder.serve_connection(TokioIo::new(conn), svc).await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Err(e) => {
                // E.g. EMFILE: back off instead of spinning.
                tracing::warn!(url, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}
