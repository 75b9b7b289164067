//! Connect dispatch: path → RPC of the shared service logic.

use std::sync::Arc;

use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;

use super::{client_stream, server_stream, unary, unary_error, BoxStream, HttpBody, Kind, Wire};
use crate::defaults::Defaults;
use crate::filesystem::FilesystemService;
use crate::process::ProcessService;
use crate::proto::process::*;
use crate::request::RequestContext;
use crate::status::{Code, Error};

const SERVICES: [&str; 3] = [
    "/process.Process/",
    "/filesystem.Filesystem/",
    "/envd.transfer.Transfer/",
];

/// Whether a path belongs to one of envd's RPC services.
pub fn is_connect_path(path: &str) -> bool {
    SERVICES.iter().any(|s| path.starts_with(s))
}

fn kind_of(path: &str) -> Option<Kind> {
    Some(match path {
        "/process.Process/Start"
        | "/process.Process/Connect"
        | "/filesystem.Filesystem/WatchDir"
        | "/envd.transfer.Transfer/ReadFile" => Kind::ServerStream,
        "/process.Process/StreamInput" | "/envd.transfer.Transfer/WriteFile" => Kind::ClientStream,
        "/process.Process/List"
        | "/process.Process/Update"
        | "/process.Process/SendInput"
        | "/process.Process/SendSignal"
        | "/process.Process/CloseStdin"
        | "/filesystem.Filesystem/Stat"
        | "/filesystem.Filesystem/MakeDir"
        | "/filesystem.Filesystem/Move"
        | "/filesystem.Filesystem/ListDir"
        | "/filesystem.Filesystem/Remove"
        | "/filesystem.Filesystem/CreateWatcher"
        | "/filesystem.Filesystem/GetWatcherEvents"
        | "/filesystem.Filesystem/RemoveWatcher" => Kind::Unary,
        _ => return None,
    })
}

#[derive(Debug)]
pub struct ConnectRouter {
    process: Arc<ProcessService>,
    fs: Arc<FilesystemService>,
    defaults: Arc<Defaults>,
}

impl ConnectRouter {
    pub fn new(
        process: Arc<ProcessService>,
        fs: Arc<FilesystemService>,
        defaults: Arc<Defaults>,
    ) -> Self {
        Self {
            process,
            fs,
            defaults,
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path();
        let Some(kind) = kind_of(path) else {
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
        let mut wire = match Wire::from_headers(kind, &parts.headers) {
            Ok(w) => w,
            Err(response) => return *response,
        };
        let ctx = match RequestContext::from_headers(&parts.headers, &self.defaults) {
            Ok(c) => c,
            Err(e) if kind == Kind::Unary => return unary_error(&e),
            Err(e) => return super::stream_error(wire.codec, &e),
        };
        // Unary calls are bounded here; Start bounds its process (and so its
        // stream) itself; other streams are bounded by the stream deadline.
        if path != "/process.Process/Start" {
            wire.deadline = ctx.deadline;
        }
        self.dispatch(path, wire, ctx, body).await
    }

    async fn dispatch(
        &self,
        path: &str,
        wire: Wire,
        ctx: RequestContext,
        body: Incoming,
    ) -> Response<HttpBody> {
        let p = &self.process;
        let fs = &self.fs;
        match path {
            "/process.Process/List" => {
                unary(
                    wire,
                    body,
                    ("process.ListRequest", "process.ListResponse"),
                    |_: ListRequest| async { Ok(p.list()) },
                )
                .await
            }
            "/process.Process/Start" => {
                server_stream(
                    wire,
                    body,
                    ("process.StartRequest", "process.StartResponse"),
                    |req: StartRequest| async {
                        let s = p.start(&ctx, req)?;
                        let s: BoxStream<StartResponse> =
                            Box::pin(s.map(|r| r.map(|e| StartResponse { event: Some(e) })));
                        Ok(s)
                    },
                )
                .await
            }
            "/process.Process/Connect" => {
                server_stream(
                    wire,
                    body,
                    ("process.ConnectRequest", "process.ConnectResponse"),
                    |req: ConnectRequest| async {
                        let s = p.connect(&ctx, req)?;
                        let s: BoxStream<ConnectResponse> =
                            Box::pin(s.map(|r| r.map(|e| ConnectResponse { event: Some(e) })));
                        Ok(s)
                    },
                )
                .await
            }
            "/process.Process/Update" => {
                unary(
                    wire,
                    body,
                    ("process.UpdateRequest", "process.UpdateResponse"),
                    |r| async { p.update(r) },
                )
                .await
            }
            "/process.Process/SendInput" => {
                unary(
                    wire,
                    body,
                    ("process.SendInputRequest", "process.SendInputResponse"),
                    |r| p.send_input(r),
                )
                .await
            }
            "/process.Process/SendSignal" => {
                unary(
                    wire,
                    body,
                    ("process.SendSignalRequest", "process.SendSignalResponse"),
                    |r| async { p.send_signal(r) },
                )
                .await
            }
            "/process.Process/CloseStdin" => {
                unary(
                    wire,
                    body,
                    ("process.CloseStdinRequest", "process.CloseStdinResponse"),
                    |r| p.close_stdin(r),
                )
                .await
            }
            "/process.Process/StreamInput" => {
                client_stream(
                    wire,
                    body,
                    ("process.StreamInputRequest", "process.StreamInputResponse"),
                    |input| p.stream_input(input),
                )
                .await
            }
            "/filesystem.Filesystem/Stat" => {
                unary(
                    wire,
                    body,
                    ("filesystem.StatRequest", "filesystem.StatResponse"),
                    |r| fs.stat(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/MakeDir" => {
                unary(
                    wire,
                    body,
                    ("filesystem.MakeDirRequest", "filesystem.MakeDirResponse"),
                    |r| fs.make_dir(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/Move" => {
                unary(
                    wire,
                    body,
                    ("filesystem.MoveRequest", "filesystem.MoveResponse"),
                    |r| fs.move_entry(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/ListDir" => {
                unary(
                    wire,
                    body,
                    ("filesystem.ListDirRequest", "filesystem.ListDirResponse"),
                    |r| fs.list_dir(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/Remove" => {
                unary(
                    wire,
                    body,
                    ("filesystem.RemoveRequest", "filesystem.RemoveResponse"),
                    |r| fs.remove(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/WatchDir" => {
                server_stream(
                    wire,
                    body,
                    ("filesystem.WatchDirRequest", "filesystem.WatchDirResponse"),
                    |r| fs.watch_dir(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/CreateWatcher" => {
                unary(
                    wire,
                    body,
                    (
                        "filesystem.CreateWatcherRequest",
                        "filesystem.CreateWatcherResponse",
                    ),
                    |r| fs.create_watcher(&ctx, r),
                )
                .await
            }
            "/filesystem.Filesystem/GetWatcherEvents" => {
                unary(
                    wire,
                    body,
                    (
                        "filesystem.GetWatcherEventsRequest",
                        "filesystem.GetWatcherEventsResponse",
                    ),
                    |r| async { fs.get_watcher_events(r) },
                )
                .await
            }
            "/filesystem.Filesystem/RemoveWatcher" => {
                unary(
                    wire,
                    body,
                    (
                        "filesystem.RemoveWatcherRequest",
                        "filesystem.RemoveWatcherResponse",
                    ),
                    |r| async { fs.remove_watcher(r) },
                )
                .await
            }
            "/envd.transfer.Transfer/ReadFile" => {
                server_stream(
                    wire,
                    body,
                    (
                        "envd.transfer.ReadFileRequest",
                        "envd.transfer.ReadFileResponse",
                    ),
                    |r| fs.read_file(&ctx, r),
                )
                .await
            }
            "/envd.transfer.Transfer/WriteFile" => {
                client_stream(
                    wire,
                    body,
                    (
                        "envd.transfer.WriteFileRequest",
                        "envd.transfer.WriteFileResponse",
                    ),
                    |input| fs.write_file(&ctx, input),
                )
                .await
            }
            _ => unary_error(&Error::new(
                Code::Unimplemented,
                format!("unknown method {path}"),
            )),
        }
    }
}
