//! E2B's REST endpoints: `/health`, `/metrics`, `/envs`, `/init`, `/files`,
//! `/files/compose`. Errors are JSON `{"code": <http status>, "message"}`.

mod files;
mod init;
mod metrics;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::auth::Auth;
use crate::connect::HttpBody;
use crate::defaults::Defaults;
use crate::status::Error;
use crate::users::User;

/// The envd version reported in `X-Envd-Version` (E2B feature gates start at
/// 0.6.4, so envd reports the E2B protocol level it implements).
pub const ENVD_VERSION: &str = "0.6.13";

#[derive(Debug)]
pub struct RestRouter {
    defaults: Arc<Defaults>,
    auth: Arc<Auth>,
    metrics: metrics::Metrics,
}

impl RestRouter {
    pub fn new(defaults: Arc<Defaults>, auth: Arc<Auth>) -> Self {
        Self {
            defaults,
            auth,
            metrics: metrics::Metrics::default(),
        }
    }

    pub async fn handle(&self, req: Request<Incoming>) -> Response<HttpBody> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let result = match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/health") => Ok(empty(StatusCode::NO_CONTENT)),
            ("GET", "/metrics") => self.metrics.handle(),
            ("GET", "/envs") => Ok(json(StatusCode::OK, &self.defaults.envs())),
            ("POST", "/init") => init::handle(req, &self.defaults, &self.auth).await,
            ("GET", "/files") => files::download(req, &self.defaults).await,
            ("POST", "/files") => files::upload(req, &self.defaults).await,
            ("POST", "/files/compose") => files::compose(req, &self.defaults).await,
            (_, "/health" | "/metrics" | "/envs" | "/init" | "/files" | "/files/compose") => {
                Err(Rest::new(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{method} is not allowed on {path}"),
                ))
            }
            _ => Err(Rest::new(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {path}"),
            )),
        };
        let mut response = result.unwrap_or_else(|e| e.response());
        if path == "/health" {
            response
                .headers_mut()
                .insert("cache-control", "no-store".parse().expect("valid"));
        }
        response
    }
}

/// A REST error: an HTTP status and a message.
#[derive(Debug)]
pub struct Rest {
    status: StatusCode,
    message: String,
}

impl Rest {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
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
        Rest::new(e.code.rest_status(), e.message)
    }
}

pub type RestResult = Result<Response<HttpBody>, Rest>;

/// A JSON request body of at most `limit` bytes (see [`crate::body`]); a body
/// that does not arrive in time is 408.
pub async fn read_json_body(body: Incoming, limit: usize) -> Result<bytes::Bytes, Rest> {
    crate::body::read_to_end(body, limit).await.map_err(|e| {
        if e.code == crate::status::Code::DeadlineExceeded {
            Rest::new(StatusCode::REQUEST_TIMEOUT, e.message)
        } else if e.code == crate::status::Code::ResourceExhausted && e.message.contains("limit") {
            Rest::new(StatusCode::PAYLOAD_TOO_LARGE, e.message)
        } else {
            Rest::from(e)
        }
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

/// Query parameters (decoded; the first of repeated names wins).
pub fn query(req: &Request<Incoming>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for (k, v) in form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
        out.entry(k.into_owned()).or_insert_with(|| v.into_owned());
    }
    out
}

/// The user named by `username`, else the default user. Unknown → 401.
pub fn user_of(q: &HashMap<String, String>, defaults: &Defaults) -> Result<User, Rest> {
    let name = q
        .get("username")
        .filter(|u| !u.is_empty())
        .cloned()
        .unwrap_or_else(|| defaults.user());
    User::lookup(&name).map_err(|e| Rest::new(StatusCode::UNAUTHORIZED, e.message))
}
