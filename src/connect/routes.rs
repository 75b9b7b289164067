//! Connect dispatch: one table of routes, one line per RPC. Each route ties
//! its path to its call kind, request and response types (names from
//! `prost::Name`) and handler, so a mismatch cannot compile.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use prost::{Message, Name};

use super::{client_stream, server_stream, unary, unary_error, BoxStream, HttpBody, Kind, Wire};
use crate::defaults::Defaults;
use crate::filesystem::FilesystemService;
use crate::ports::api::PortsService;
use crate::process::ProcessService;
use crate::proto::filesystem::filesystem_server::SERVICE_NAME as FILESYSTEM;
use crate::proto::ports::ports_server::SERVICE_NAME as PORTS;
use crate::proto::ports::{ListPortsRequest, WatchPortsRequest};
use crate::proto::process::process_server::SERVICE_NAME as PROCESS;
use crate::proto::process::*;
use crate::proto::transfer::transfer_server::SERVICE_NAME as TRANSFER;
use crate::proto::transfer::*;
use crate::request::RequestContext;
use crate::request_body::RequestBody;
use crate::status::{Code, Error, Result};

/// What a route's handler can reach.
#[derive(Debug)]
struct Services {
    process: Arc<ProcessService>,
    fs: Arc<FilesystemService>,
    ports: Arc<PortsService>,
}

type Svc = Arc<Services>;
type Reply = Pin<Box<dyn Future<Output = Response<HttpBody>> + Send>>;
type Call = Box<dyn Fn(Svc, Wire, RequestContext, RequestBody) -> Reply + Send + Sync>;

/// One RPC: its call kind, whether the request deadline bounds the call, and
/// how to call it.
struct Route {
    kind: Kind,
    deadline_bounds_call: bool,
    call: Call,
}

impl Route {
    /// The request deadline does not bound the call itself (Start: it bounds
    /// the process, and so the stream, instead).
    fn unbounded(mut self) -> Self {
        self.deadline_bounds_call = false;
        self
    }
}

fn unary_route<Req, Resp, Fut>(
    f: impl Fn(Svc, RequestContext, Req) -> Fut + Send + Sync + Copy + 'static,
) -> Route
where
    Req: Message + Default + Name + Send + 'static,
    Resp: Message + Name + 'static,
    Fut: Future<Output = Result<Resp>> + Send + 'static,
{
    Route {
        kind: Kind::Unary,
        deadline_bounds_call: true,
        call: Box::new(move |svc, wire, ctx, body| {
            let answer = ctx.answer.clone();
            Box::pin(unary(wire, body, answer, move |req| f(svc, ctx, req)))
        }),
    }
}

fn server_stream_route<Req, Resp, Fut>(
    f: impl Fn(Svc, RequestContext, Req) -> Fut + Send + Sync + Copy + 'static,
) -> Route
where
    Req: Message + Default + Name + Send + 'static,
    Resp: Message + Name + 'static,
    Fut: Future<Output = Result<BoxStream<Resp>>> + Send + 'static,
{
    Route {
        kind: Kind::ServerStream,
        deadline_bounds_call: true,
        call: Box::new(move |svc, wire, ctx, body| {
            Box::pin(server_stream(wire, body, move |req| f(svc, ctx, req)))
        }),
    }
}

fn client_stream_route<Req, Resp, Fut>(
    f: impl Fn(Svc, RequestContext, BoxStream<Req>) -> Fut + Send + Sync + Copy + 'static,
) -> Route
where
    Req: Message + Default + Name + Send + 'static,
    Resp: Message + Name + Send + 'static,
    Fut: Future<Output = Result<Resp>> + Send + 'static,
{
    Route {
        kind: Kind::ClientStream,
        deadline_bounds_call: true,
        call: Box::new(move |svc, wire, ctx, body| {
            Box::pin(client_stream(wire, body, move |input| f(svc, ctx, input)))
        }),
    }
}

/// Wraps process events in a response type.
fn events<T: Send + 'static>(
    s: crate::process::events::EventStream,
    wrap: fn(ProcessEvent) -> T,
) -> BoxStream<T> {
    Box::pin(s.map(move |r| r.map(wrap)))
}

/// Every RPC envd serves over Connect.
fn routes() -> Vec<(String, Route)> {
    let path = |service: &str, method: &str| format!("/{service}/{method}");
    vec![
        (
            path(PROCESS, "List"),
            unary_route(|s, c, _: ListRequest| async move { s.process.list(&c) }),
        ),
        (
            path(PROCESS, "Start"),
            server_stream_route(|s, c, r| async move {
                Ok(events(s.process.start(&c, r).await?, |e| StartResponse {
                    event: Some(e),
                }))
            })
            .unbounded(),
        ),
        (
            path(PROCESS, "Connect"),
            server_stream_route(|s, c, r| async move {
                Ok(events(s.process.connect(&c, r)?, |e| ConnectResponse {
                    event: Some(e),
                }))
            }),
        ),
        (
            path(PROCESS, "Update"),
            unary_route(|s, _, r| async move { s.process.update(r) }),
        ),
        (
            path(PROCESS, "SendInput"),
            unary_route(|s, _, r| async move { s.process.send_input(r).await }),
        ),
        (
            path(PROCESS, "SendSignal"),
            unary_route(|s, _, r| async move { s.process.send_signal(r).await }),
        ),
        (
            path(PROCESS, "CloseStdin"),
            unary_route(|s, _, r| async move { s.process.close_stdin(r).await }),
        ),
        (
            path(PROCESS, "StreamInput"),
            client_stream_route(|s, _, input| async move { s.process.stream_input(input).await }),
        ),
        (
            path(FILESYSTEM, "Stat"),
            unary_route(|s, c, r| async move { s.fs.stat(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "MakeDir"),
            unary_route(|s, c, r| async move { s.fs.make_dir(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "Move"),
            unary_route(|s, c, r| async move { s.fs.move_entry(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "ListDir"),
            unary_route(|s, c, r| async move { s.fs.list_dir(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "Remove"),
            unary_route(|s, c, r| async move { s.fs.remove(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "WatchDir"),
            server_stream_route(|s, c, r| async move { s.fs.watch_dir(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "CreateWatcher"),
            unary_route(|s, c, r| async move { s.fs.create_watcher(&c, r).await }),
        ),
        (
            path(FILESYSTEM, "GetWatcherEvents"),
            unary_route(|s, c, r| async move { s.fs.get_watcher_events(&c, r) }),
        ),
        (
            path(FILESYSTEM, "RemoveWatcher"),
            unary_route(|s, _, r| async move { s.fs.remove_watcher(r) }),
        ),
        (
            path(TRANSFER, "ReadFile"),
            server_stream_route(
                |s, c, r: ReadFileRequest| async move { s.fs.read_file(&c, r).await },
            ),
        ),
        (
            path(TRANSFER, "WriteFile"),
            client_stream_route(|s, c, input| async move { s.fs.write_file(&c, input).await }),
        ),
        (
            path(PORTS, "List"),
            unary_route(|s, _, _: ListPortsRequest| async move { s.ports.list().await }),
        ),
        (
            path(PORTS, "Watch"),
            server_stream_route(
                |s, c, _: WatchPortsRequest| async move { s.ports.watch(c.keepalive) },
            ),
        ),
    ]
}

/// Whether a path belongs to one of envd's RPC services.
pub fn is_connect_path(path: &str) -> bool {
    [PROCESS, FILESYSTEM, TRANSFER, PORTS]
        .iter()
        .any(|service| {
            path.strip_prefix('/')
                .and_then(|p| p.strip_prefix(service))
                .is_some_and(|rest| rest.starts_with('/'))
        })
}

pub struct ConnectRouter {
    services: Svc,
    defaults: Arc<Defaults>,
    routes: HashMap<String, Route>,
}

impl std::fmt::Debug for ConnectRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectRouter")
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl ConnectRouter {
    pub fn new(
        process: Arc<ProcessService>,
        fs: Arc<FilesystemService>,
        ports: Arc<PortsService>,
        defaults: Arc<Defaults>,
    ) -> Self {
        super::codec::warm();
        Self {
            services: Arc::new(Services { process, fs, ports }),
            defaults,
            routes: routes().into_iter().collect(),
        }
    }

    pub async fn handle(&self, req: Request<RequestBody>) -> Response<HttpBody> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let Some(route) = self.routes.get(path) else {
            let mut r = unary_error(&Error::new(
                Code::Unimplemented,
                format!("unknown method {path}"),
            ));
            *r.status_mut() = StatusCode::NOT_FOUND;
            return r;
        };
        if parts.method != http::Method::POST {
            let mut r = unary_error(&Error::invalid(format!(
                "{path} takes POST, not {}",
                parts.method
            )));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            return r;
        }
        let kind = route.kind;
        let mut wire = match Wire::from_headers(kind, &parts.headers) {
            Ok(w) => w,
            Err(response) => return *response,
        };
        let answer = parts
            .extensions
            .get::<crate::answers::Share>()
            .cloned()
            .unwrap_or_default();
        let ctx = match RequestContext::from_headers(&parts.headers, &self.defaults, answer) {
            Ok(c) => c,
            Err(e) if kind == Kind::Unary => return unary_error(&e),
            Err(e) => return super::stream_error(wire.codec, &e),
        };
        if route.deadline_bounds_call {
            wire.deadline = ctx.deadline;
        }
        (route.call)(self.services.clone(), wire, ctx, body).await
    }
}
