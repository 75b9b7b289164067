//! E2B's REST endpoints: `/health`, `/metrics`, `/envs`, `/init`, `/files`,
//! `/files/compose`. Errors are JSON `{"code": <http status>, "message"}`.

mod files;
pub mod headers;
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
        } else if e.message == crate::body::BUSY {
            Rest::new(StatusCode::SERVICE_UNAVAILABLE, e.message)
        } else if e.code == crate::status::Code::ResourceExhausted {
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

/// Query parameters, percent-decoded; the first of repeated names wins.
/// Values are kept as bytes: a file name need not be UTF-8.
#[derive(Debug, Default)]
pub struct Query(HashMap<String, Vec<u8>>);

impl Query {
    pub fn parse(raw: &str) -> Query {
        let mut out = HashMap::new();
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let key = String::from_utf8_lossy(&percent_decode(k)).into_owned();
            out.entry(key).or_insert_with(|| percent_decode(v));
        }
        Query(out)
    }

    /// A parameter as text (invalid UTF-8 replaced).
    pub fn get(&self, name: &str) -> Option<String> {
        self.0
            .get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// A parameter as the bytes sent.
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }
}

/// `application/x-www-form-urlencoded` decoding to bytes: `+` is a space,
/// `%XX` a byte; a malformed escape is kept literally.
pub fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| {
            char::from(c)
                .to_digit(16)
                .and_then(|d| u8::try_from(d).ok())
        };
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => match (hex(b[i + 1]), hex(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h * 16 + l);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            c => out.push(c),
        }
        i += 1;
    }
    out
}

/// The request's query parameters.
pub fn query(req: &Request<Incoming>) -> Query {
    Query::parse(req.uri().query().unwrap_or(""))
}

/// The user named by `username`, else the default user. Unknown → 401.
pub fn user_of(q: &Query, defaults: &Defaults) -> Result<User, Rest> {
    let name = q
        .get("username")
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| defaults.user());
    User::lookup(&name).map_err(|e| Rest::new(StatusCode::UNAUTHORIZED, e.message))
}
