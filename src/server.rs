//! One router for every listener: native gRPC (tonic, HTTP/2), the Connect
//! protocol and the REST endpoints, on the same port, routed by content type
//! and path; access control and CORS in front of all three.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tonic::service::Routes;
use tower::ServiceExt;

use crate::auth::{refusal, Auth, Verdict, TOKEN_HEADER};
use crate::backlog::Counted;
use crate::connect::{is_connect_path, ConnectRouter};
use crate::connections::{Connections, Tracked};
use crate::defaults::Defaults;
use crate::filesystem::FilesystemService;
use crate::grpc::filesystem::FilesystemGrpc;
use crate::grpc::process::ProcessGrpc;
use crate::http::{Access, Rest, RestRouter};
use crate::listen::Listener;
use crate::process::ProcessService;
use crate::proto::filesystem::filesystem_server::FilesystemServer;
use crate::proto::process::process_server::ProcessServer;
use crate::proto::transfer::transfer_server::TransferServer;
use crate::request_body::RequestBody;
use crate::status::{Code, Error};
use crate::wire::HttpBody;
use crate::wire::{CONNECTION_WINDOW, MAX_FRAME, STREAM_WINDOW};

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
        defaults: Arc<Defaults>,
        auth: Arc<Auth>,
        init: Arc<crate::http::init::InitState>,
        upgrader: Arc<crate::handover::Upgrader>,
    ) -> Result<Router, String> {
        let ports = Arc::new(crate::ports::api::PortsService::new(process.clone()));
        Ok(Router {
            grpc: grpc_routes(
                process.clone(),
                filesystem.clone(),
                ports.clone(),
                defaults.clone(),
            )
            .await?,
            connect: Arc::new(ConnectRouter::new(
                process,
                filesystem,
                ports,
                defaults.clone(),
            )),
            rest: Arc::new(RestRouter::new(defaults, auth.clone(), init, upgrader)),
            auth,
        })
    }

    /// Routes one request. Its answer's share of the budget for large
    /// answers ([`crate::answers`]) goes with the request and is kept with
    /// the answer's body until that is sent or dropped.
    pub async fn handle(&self, mut req: Request<RequestBody>) -> Response<HttpBody> {
        let answer = crate::answers::Share::default();
        req.extensions_mut().insert(answer.clone());
        self.route(req).await.map(|body| answer.keep_with(body))
    }

    async fn route(&self, req: Request<RequestBody>) -> Response<HttpBody> {
        if req.method() == http::Method::OPTIONS {
            return preflight(&req);
        }
        let grpc = req
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/grpc"));
        let path = req.uri().path();
        let connect = !grpc && is_connect_path(path);
        let access = if grpc || connect {
            Access::Token
        } else {
            RestRouter::access(req.method(), path)
        };
        // Beyond the requests envd serves at once, answered at once; `/health`
        // still says envd is alive: it is, and busy.
        let crowded = req
            .extensions()
            .get::<crate::connections::Crowded>()
            .filter(|_| path != "/health")
            .map(|c| c.0);
        let presented = req.headers().get(TOKEN_HEADER).map(HeaderValue::as_bytes);
        // With no token shown, a signed URL may stand in for it (checked by
        // the REST router); a wrong token is never rescued by a signature.
        let verdict = match (crowded, access, self.auth.check_token(presented)) {
            (Some(max), ..) => Err(crowded_error(max)),
            (None, Access::Open, _) => Ok(false),
            (None, _, Verdict::Allowed) => Ok(false),
            (None, Access::TokenOrSignature, Verdict::Missing) => Ok(true),
            (None, _, v) => Err(refusal(v)),
        };
        let mut response = match verdict {
            Err(e) if grpc => grpc_error(e),
            Err(e) if connect => crate::connect::unary_error(&e),
            Err(e) if crowded.is_some() => Rest::busy(e.message).response(),
            Err(e) => Rest::from(e).response(),
            Ok(_) if grpc => self.grpc_call(req).await,
            Ok(_) if connect => self.connect.handle(req).await,
            Ok(signed) => self.rest.handle(req, signed).await,
        };
        cors(&mut response);
        response
    }

    /// A native gRPC call, ended at its `grpc-timeout` as gRPC servers do:
    /// a unary or client-streaming call is dropped then (and with it any walk
    /// it started), a server stream has its headers by then. (Start's
    /// deadline bounds its process instead; the service applies it.) A
    /// malformed header is left for the service to refuse.
    async fn grpc_call(&self, req: Request<RequestBody>) -> Response<HttpBody> {
        let deadline = crate::request::deadline(req.headers()).ok().flatten();
        let call = self
            .grpc
            .clone()
            .oneshot(req.map(crate::grpc::charge::Charged::new));
        let answered = match deadline {
            None => call.await,
            Some(at) => match tokio::time::timeout_at(at, call).await {
                Ok(r) => r,
                Err(_) => {
                    return grpc_error(Error::new(
                        Code::DeadlineExceeded,
                        "the request deadline passed",
                    ))
                }
            },
        };
        match answered {
            Ok(r) => r,
            Err(never) => match never {},
        }
    }
}

/// The refusal of a request beyond those envd serves at once.
#[cold]
fn crowded_error(max: usize) -> Error {
    Error::new(
        Code::ResourceExhausted,
        format!(
            "envd has {max} requests in flight, as many as it serves at once: retry once some \
             have ended"
        ),
    )
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

fn preflight(req: &Request<RequestBody>) -> Response<HttpBody> {
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
    ports: Arc<crate::ports::api::PortsService>,
    defaults: Arc<Defaults>,
) -> Result<Routes, String> {
    let ports = crate::grpc::ports::PortsGrpc::server(ports, defaults.clone());
    let fs = FilesystemGrpc::new(filesystem, defaults.clone());
    let (health, health_svc) = tonic_health::server::health_reporter();
    health.set_serving::<ProcessServer<ProcessGrpc>>().await;
    health
        .set_serving::<FilesystemServer<FilesystemGrpc>>()
        .await;
    health.set_serving::<TransferServer<FilesystemGrpc>>().await;
    health
        .set_serving::<crate::proto::ports::ports_server::PortsServer<crate::grpc::ports::PortsGrpc>>()
        .await;
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
    Ok(Routes::new(ProcessGrpc::server(process, defaults))
        .add_service(fs.filesystem_server())
        .add_service(fs.transfer_server())
        .add_service(ports)
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

/// Tells `conn` to close once it has been idle for `idle`, or once every
/// answer on it has been held back by its client for long enough while
/// others want what they hold ([`crate::connections::HeldBack`]; HTTP/2).
/// Checked every quarter of `idle`, between 100 ms and 5 s.
async fn watch(conn: Arc<crate::connections::Conn>, idle: Duration) {
    let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    let mut held_back = crate::connections::HeldBack::default();
    loop {
        tokio::time::sleep(tick).await;
        if conn.idle_for() >= idle || held_back.check(&conn) {
            conn.close.notify_one();
            return;
        }
    }
}

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

/// A served connection as hyper holds it (a tunnel takes it back out).
pub type ServedIo = TokioIo<crate::linger::Lingering<Counted<Box<dyn crate::listen::Conn>>>>;

/// Accepts connections forever; each is served on its own task, tracked by
/// `conns` (cap, idle timeout, eviction).
pub async fn serve(listener: Listener, url: String, router: Router, conns: Arc<Connections>) {
    let builder = http_builder();
    loop {
        let accepted = tokio::select! {
            biased;
            () = crate::handover::quiesce::until_requested() => {
                crate::handover::quiesce::until_lifted().await;
                continue;
            }
            r = listener.accept() => r,
        };
        let conn = match accepted {
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
            // A closed connection's buffers go back to the OS once quiet.
            let _freed = crate::memory::FreedOnDrop;
            let tracked = reg.conn.clone();
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let (parts, body) = req.into_parts();
                let h1 = parts.version < http::Version::HTTP_2;
                let (body, closing) = RequestBody::new(body, h1);
                let mut req = Request::from_parts(parts, body);
                let router = router.clone();
                let guard = tracked.begin();
                if let Some(crowded) = guard.crowded() {
                    req.extensions_mut().insert(crowded);
                }
                if req.method() == http::Method::CONNECT {
                    // A tunnel keeps the connection busy for as long as it lives.
                    let busy = crate::http::tunnel::TunnelGuard(Arc::new(std::sync::Mutex::new(
                        Some(tracked.begin()),
                    )));
                    req.extensions_mut().insert(busy);
                }
                async move {
                    let mut response = router.handle(req).await;
                    if closing.is_set() {
                        // Its body is left unread: hyper closes the connection.
                        response.headers_mut().insert(
                            http::header::CONNECTION,
                            http::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, Infallible>(response.map(|b| HttpBody::new(Tracked::new(b, guard, h1))))
                }
            });
            let io = TokioIo::new(crate::linger::Lingering::new(Counted::new(
                conn,
                reg.conn.clone(),
            )));
            let served = builder.serve_connection_with_upgrades(io, svc);
            tokio::pin!(served);
            // The idle check is a task of its own, so that this one wakes
            // only for the connection's traffic: a timer here polled hyper's
            // connection every tick, faulting its code back in after the
            // janitor had dropped it.
            let watcher = tokio::spawn(watch(reg.conn.clone(), idle));
            tokio::select! {
                r = served.as_mut() => {
                    watcher.abort();
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = reg.conn.close.notified() => watcher.abort(),
            }
            if reg.conn.was_cut() {
                // Its client takes nothing: a GOAWAY would not get through.
                tracing::info!(
                    "connection closed: its client took nothing of any answer on it for {} s \
                     while others waited for what they hold",
                    crate::backlog::STALL.as_secs()
                );
                return;
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
