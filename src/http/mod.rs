//! E2B's REST endpoints: `/health`, `/metrics`, `/envs`, `/init`, `/files`,
//! `/files/compose`. Errors are JSON `{"code": <http status>, "message"}`.

mod files;
pub mod headers;
pub mod init;
mod metrics;
mod multipart;
mod pause;
mod query;
pub mod reverse;
pub mod tunnel;
mod upgrade;

use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;

use crate::auth::{Auth, Verdict};
use crate::defaults::Defaults;
use crate::request_body::RequestBody;
use crate::status::Error;
use crate::users::User;
use crate::wire::HttpBody;

/// Who may call a REST endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone (`/health`; `/init` authenticates itself).
    Open,
    /// The access token, when one is set.
    Token,
    /// The access token, or else a signed URL (`/files`).
    TokenOrSignature,
}

#[derive(Debug)]
pub struct RestRouter {
    defaults: Arc<Defaults>,
    auth: Arc<Auth>,
    init: Arc<init::InitState>,
    upgrader: Arc<crate::handover::Upgrader>,
    tunnels: tunnel::TunnelPolicy,
    metrics: metrics::Metrics,
}

impl RestRouter {
    pub fn new(
        defaults: Arc<Defaults>,
        auth: Arc<Auth>,
        init: Arc<init::InitState>,
        upgrader: Arc<crate::handover::Upgrader>,
    ) -> Self {
        Self {
            defaults,
            auth,
            init,
            upgrader,
            tunnels: tunnel::TunnelPolicy { any: false },
            metrics: metrics::Metrics::default(),
        }
    }

    /// The access rule of an endpoint.
    pub fn access(method: &http::Method, path: &str) -> Access {
        match (method.as_str(), path) {
            ("GET" | "HEAD", "/health") | ("POST", "/init") => Access::Open,
            ("GET" | "POST", "/files") => Access::TokenOrSignature,
            _ => Access::Token,
        }
    }

    /// Serves `req`. With `signed`, the caller showed no token and the
    /// request must carry a valid signature (checked here, where the query
    /// is parsed once for both the check and the handler).
    pub async fn handle(&self, req: Request<RequestBody>, signed: bool) -> Response<HttpBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        if method == http::Method::CONNECT {
            let mut r = tunnel::handle(req, &self.tunnels)
                .await
                .unwrap_or_else(|e| e.response());
            r.headers_mut().remove("content-length");
            return r;
        }
        let result = match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/health") => Ok(empty(StatusCode::NO_CONTENT)),
            ("GET", "/metrics") => self
                .metrics
                .handle(self.init.guest().process().resource_control()),
            ("GET", "/envs") => Ok(json(StatusCode::OK, &self.defaults.envs())),
            ("POST", "/init") => init::handle(req, &self.defaults, &self.auth, &self.init)
                .await
                .map(|mut r| {
                    if let Some(h) = self.handover_header() {
                        r.headers_mut().insert("x-envd-handover", h);
                    }
                    r
                }),
            ("POST", "/upgrade") => upgrade::handle(req, &self.upgrader).await,
            ("GET", "/files") => match self.signed_query(&req, "read", signed) {
                Ok(q) => files::download(req, q, &self.defaults).await,
                Err(e) => Err(e),
            },
            ("POST", "/files") => match self.signed_query(&req, "write", signed) {
                Ok(q) => files::upload(req, q, &self.defaults).await,
                Err(e) => Err(e),
            },
            ("POST", "/files/compose") => files::compose(req, &self.defaults).await,
            ("POST", "/freeze") => pause::freeze(self.init.guest(), &query(&req)).await,
            ("POST", "/unfreeze") => pause::unfreeze(self.init.guest()).await,
            ("POST", "/fsfreeze") => pause::fsfreeze(self.init.guest(), true).await,
            ("POST", "/fsthaw") => pause::fsfreeze(self.init.guest(), false).await,
            ("POST", "/collapse") => pause::collapse().await,
            (
                _,
                "/health" | "/metrics" | "/envs" | "/init" | "/files" | "/files/compose"
                | "/freeze" | "/unfreeze" | "/fsfreeze" | "/fsthaw" | "/collapse" | "/upgrade",
            ) => Err(Rest::http(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            )),
            _ => Err(Rest::http(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {path}"),
            )),
        };
        let mut response = result.unwrap_or_else(|e| e.response());
        if path == "/health" {
            let h = response.headers_mut();
            h.insert("cache-control", "no-store".parse().expect("valid"));
            if let Ok(v) = crate::build_id::build_id().parse() {
                h.insert("x-envd-build", v);
            }
        }
        response
    }

    /// E2B's `X-Envd-Handover`: what this image took over in a live upgrade.
    fn handover_header(&self) -> Option<http::HeaderValue> {
        let report = self.upgrader.report()?;
        serde_json::to_string(&report).ok()?.parse().ok()
    }

    /// The request's query; with `signed`, only if its signature for `op`
    /// is valid.
    fn signed_query(
        &self,
        req: &Request<RequestBody>,
        op: &str,
        signed: bool,
    ) -> Result<Query, Rest> {
        let q = query(req);
        if !signed {
            return Ok(q);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        let verdict = match q.get("signature") {
            None => Verdict::Missing,
            Some(signature) => self.auth.check_signature(
                &q.get("path").unwrap_or_default(),
                op,
                &q.get("username").unwrap_or_default(),
                &signature,
                q.get("signature_expiration").as_deref(),
                now,
            ),
        };
        match verdict {
            Verdict::Allowed => Ok(q),
            v => Err(Rest::from(crate::auth::refusal(v))),
        }
    }
}

/// A REST error: an HTTP status and a message.
#[derive(Debug)]
pub struct Rest {
    status: StatusCode,
    message: String,
}

impl Rest {
    pub fn http(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    /// 503: envd is busy (a shared bound is reached), not out of disk
    /// (507, what `RESOURCE_EXHAUSTED` is otherwise on REST).
    pub fn busy(message: impl Into<String>) -> Self {
        Rest::http(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    pub fn response(&self) -> Response<HttpBody> {
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        let mut r = json(self.status, &body);
        r.headers_mut()
            .insert("x-content-type-options", "nosniff".parse().expect("valid"));
        r
    }
}

impl From<Error> for Rest {
    fn from(e: Error) -> Self {
        Rest::http(e.code.rest_status(), e.message)
    }
}

pub type RestResult = Result<Response<HttpBody>, Rest>;

/// A JSON request body of at most `limit` bytes (see [`crate::body`]): over
/// the limit is 413, the shared budget spent 503, too slow 408.
pub async fn read_json_body(body: RequestBody, limit: usize) -> Result<bytes::Bytes, Rest> {
    use crate::body::BodyError;
    crate::body::read_to_end(body, limit).await.map_err(|e| {
        let status = match e {
            BodyError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            BodyError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            BodyError::Read(_) => return Rest::from(Error::from(e)),
        };
        Rest::http(status, e.to_string())
    })
}

pub fn empty(status: StatusCode) -> Response<HttpBody> {
    Response::builder()
        .status(status)
        .body(HttpBody::default())
        .expect("static response parts are valid")
}

pub fn json<T: serde::Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<HttpBody> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"null".to_vec());
    Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8")
        .body(HttpBody::new(Full::new(Bytes::from(body))))
        .expect("static response parts are valid")
}

/// The user named by `username`, else the default user. Unknown → 401.
pub fn user_of(q: &Query, defaults: &Defaults) -> Result<User, Rest> {
    let name = q
        .get("username")
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| defaults.user());
    User::lookup(&name).map_err(|e| Rest::from(Error::unauthenticated(e.message)))
}

pub use query::{query, Query};
