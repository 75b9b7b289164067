//! One router for every listener: native gRPC (tonic, HTTP/2), the Connect
//! protocol and the REST endpoints, on the same port, routed by content type
//! and path; access control and CORS in front of all three.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::auth::{Auth, Verdict, TOKEN_HEADER};
use crate::connect::{is_connect_path, ConnectRouter, HttpBody};
use crate::connections::{Connections, Tracked};
use crate::filesystem::FilesystemService;
use crate::grpc::filesystem::FilesystemGrpc;
use crate::grpc::process::ProcessGrpc;
use crate::h2::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};
use crate::http::{query, Rest, RestRouter};
use crate::listen::Listener;
use crate::process::ProcessService;
use crate::proto::filesystem::filesystem_server::FilesystemServer;
use crate::proto::process::process_server::ProcessServer;
use crate::proto::transfer::transfer_server::TransferServer;
use crate::status::Error;

/// Concurrent RPCs per connection.
const MAX_STREAMS: u32 = 1024;

/// Everything a request can reach.
#[derive(Clone)]
pub struct Router {
    grpc: Routes,
    connect: Arc<ConnectRouter>,
    rest: Arc<RestRouter>,
    auth: Arc<Auth>,
}

impl Router {
    pub async fn new(
        process: Arc<ProcessService>,
        filesystem: Arc<FilesystemService>,
        auth: Arc<Auth>,
    ) -> Result<Router, String> {
        let defaults = process.defaults().clone();
        Ok(Router {
            grpc: grpc_routes(process.clone(), filesystem.clone()).await?,
            connect: Arc::new(ConnectRouter::new(process, filesystem, defaults.clone())),
            rest: Arc::new(RestRouter::new(defaults, auth.clone())),
            auth,
        })
    }

    /// Routes one request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        if req.method() == http::Method::OPTIONS {
            return preflight(&req);
        }
        let grpc = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let path = req.uri().path().to_owned();
        let connect = !grpc && is_connect_path(&path);
        let mut response = match self.authorize(&req, &path) {
            Err(e) if grpc => grpc_error(e),
            Err(e) if connect => crate::connect::unary_error(&e),
            Err(e) => Rest::from(e).response(),
            Ok(()) if grpc => match self.grpc.clone().oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            },
            Ok(()) if connect => self.connect.handle(req).await,
            Ok(()) => self.rest.handle(req).await,
        };
        cors(&mut response);
        response
    }

    /// Token (or, for `/files`, signature) checks. `GET /health` is open;
    /// `/init` authenticates itself.
    fn authorize(&self, req: &Request<Incoming>, path: &str) -> Result<(), Error> {
        let method = req.method();
        if (path == "/health" && (method == http::Method::GET || method == http::Method::HEAD))
            || (path == "/init" && method == http::Method::POST)
        {
            return Ok(());
        }
        let presented = req.headers().get(TOKEN_HEADER).map(HeaderValue::as_bytes);
        let verdict = self.auth.check_token(presented);
        let files =
            path == "/files" && (method == http::Method::GET || method == http::Method::POST);
        let verdict = match verdict {
            // A signed URL stands in for the token on /files (but a wrong
            // token is never rescued by a signature).
            Verdict::Missing if files => self.signature_verdict(req),
            v => v,
        };
        match verdict {
            Verdict::Allowed => Ok(()),
            Verdict::Missing => Err(Error::unauthenticated(
                "unauthorized access, please provide a valid access token (X-Access-Token) or method signing if supported",
            )),
            Verdict::Rejected => Err(Error::unauthenticated("invalid access token or signature")),
        }
    }

    fn signature_verdict(&self, req: &Request<Incoming>) -> Verdict {
        let q = query(req);
        let Some(signature) = q.get("signature") else {
            return Verdict::Missing;
        };
        let op = if req.method() == http::Method::GET {
            "read"
        } else {
            "write"
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        self.auth.check_signature(
            &q.get("path").unwrap_or_default(),
            op,
            &q.get("username").unwrap_or_default(),
            &signature,
            q.get("signature_expiration").as_deref(),
            now,
        )
    }
}

fn grpc_error(e: Error) -> Response<HttpBody> {
    let (parts, ()) = tonic::Status::from(e).into_http::<()>().into_parts();
    Response::from_parts(parts, HttpBody::default())
}

/// CORS as E2B's envd does it: any origin, the usual methods, any header.
fn cors(r: &mut Response<HttpBody>) {
    let h = r.headers_mut();
    h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
    h.insert(
        "access-control-expose-headers",
        HeaderValue::from_static(
            "Grpc-Status, Grpc-Message, Grpc-Status-Details-Bin, Connect-Protocol-Version, Location, Cache-Control, X-Content-Type-Options, X-Envd-Version",
        ),
    );
}

fn preflight(req: &Request<Incoming>) -> Response<HttpBody> {
    let mut r = Response::builder()
        .status(StatusCode::NO_CONTENT)
        .header(
            "access-control-allow-methods",
            "HEAD, GET, POST, PUT, PATCH, DELETE",
        )
        .header("access-control-max-age", "7200");
    if let Some(h) = req.headers().get("access-control-request-headers") {
        r = r.header("access-control-allow-headers", h.clone());
    }
    let mut r = r
        .body(HttpBody::default())
        .expect("static response parts are valid");
    cors(&mut r);
    r
}

/// The gRPC services, health and reflection.
async fn grpc_routes(
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
    // envd's packages and the health service, for `grpcurl list` and friends.
    let descriptors = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = descriptors()
        .build_v1()
        .map_err(|e| format!("reflection: {e}"))?;
    let reflection_v1alpha = descriptors()
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

/// An HTTP/1.1 request's headers must arrive within this time.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection asked to close (idle: no request in flight) gets this long
/// to say goodbye (HTTP/2 GOAWAY) before it is dropped; one that has not even
/// finished its first request head is dropped then too.
const CLOSE_GRACE: Duration = Duration::from_millis(250);

fn http_builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    b.http2()
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .max_frame_size(MAX_FRAME);
    b
}

/// Accepts connections forever; each is served on its own task, tracked by
/// `conns` (cap, idle timeout, eviction).
pub async fn serve(listener: Listener, url: String, router: Router, conns: Arc<Connections>) {
    let builder = http_builder();
    loop {
        let conn = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                // Out of fds (EMFILE/ENFILE): close the longest-idle
                // connection and retry; otherwise back off briefly.
                let freed = matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
                    && conns.evict_one();
                tracing::warn!(url, error = %e, freed, "accept failed");
                let pause = if freed { 10 } else { 100 };
                tokio::time::sleep(Duration::from_millis(pause)).await;
                continue;
            }
        };
        let Some(reg) = conns.admit() else {
            tracing::warn!(
                url,
                open = conns.count(),
                "connection refused: at the connection cap and none is idle"
            );
            drop(conn);
            continue;
        };
        let router = router.clone();
        let builder = builder.clone();
        let idle = conns.limits().idle;
        tokio::spawn(async move {
            let tracked = reg.conn.clone();
            let svc = hyper::service::service_fn(move |req| {
                let router = router.clone();
                let guard = tracked.begin();
                async move {
                    let response = router.handle(req).await;
                    Ok::<_, Infallible>(response.map(|b| HttpBody::new(Tracked::new(b, guard))))
                }
            });
            let served = builder.serve_connection(TokioIo::new(conn), svc);
            tokio::pin!(served);
            let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
            loop {
                tokio::select! {
                    r = served.as_mut() => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        return;
                    }
                    () = reg.conn.close.notified() => break,
                    () = tokio::time::sleep(tick) => {
                        if reg.conn.idle_for() >= idle {
                            break;
                        }
                    }
                }
            }
            // Idle too long or evicted: GOAWAY / close, then drop it. One
            // that never completed a request head is just dropped.
            if reg.conn.ever_used() {
                served.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(CLOSE_GRACE, served).await;
            }
        });
    }
}
