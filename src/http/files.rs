//! `GET /files` (download, Range, gzip), `POST /files` (multipart or
//! octet-stream upload, gzip bodies, metadata headers) and
//! `POST /files/compose`: HTTP in and out only. Reading, writing and
//! composing files is `filesystem::transfer` and `filesystem::compose`.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyStream, StreamBody};

use super::headers::{accepted_gzip, content_disposition, content_type, metadata, parse_range};
use super::{json, read_json_body, user_of, Query, Rest, RestResult};
use crate::defaults::Defaults;
use crate::filesystem::compose;
use crate::filesystem::download::{slot, stream_file};
use crate::filesystem::slots::{Slot, UPLOADS};
use crate::filesystem::transfer::{open_for_read, write_bytes, ReadPlan, WriteSpec};
use crate::paths;
use crate::request_body::RequestBody;
use crate::status::{Error, Result};
use crate::users::User;
use crate::wire::HttpBody;

/// Most files one multipart upload writes (the answer lists each one).
const MAX_UPLOAD_PARTS: usize = 10_000;

/// Largest compose request body.
const COMPOSE_BODY_LIMIT: usize = 1 << 20;

fn resolve(path: &[u8], user: &User) -> Result<PathBuf> {
    if path.is_empty() {
        return Err(Error::invalid("the path query parameter is required"));
    }
    paths::resolve_bytes(path, user)
}

fn built(b: http::response::Builder, body: HttpBody) -> RestResult {
    b.body(body)
        .map_err(|e| Rest::from(Error::internal(e.to_string())))
}

pub async fn download(req: Request<RequestBody>, q: Query, defaults: &Defaults) -> RestResult {
    let user = user_of(&q, defaults)?;
    let gzip =
        accepted_gzip(req.headers()).map_err(|m| Rest::http(StatusCode::NOT_ACCEPTABLE, m))?;
    let path = resolve(q.bytes("path").unwrap_or_default(), &user)?;
    // Its place among the downloads sent at once, before the file is held;
    // none within the wait is 503, as envd says it is busy elsewhere.
    let slot = slot(gzip).await.map_err(|e| Rest::busy(e.message))?;
    // One open file gives both the size and the bytes.
    let opened = open_for_read(path.clone()).await?;
    let size = opened.size;
    let name = path.file_name().map_or(&[][..], |n| n.as_bytes());
    let mut response = Response::builder()
        .header("content-type", content_type(&path))
        .header("content-disposition", content_disposition(name))
        .header("vary", "Accept-Encoding");
    // A file the kernel makes as it is read (`/proc/meminfo`) has no size
    // to promise or take ranges of: its bytes go to their end, unannounced.
    let range = if opened.generated {
        None
    } else {
        response = response.header("accept-ranges", "bytes");
        req.headers()
            .get("range")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_range(v, size))
    };
    let mut plan = ReadPlan {
        length: (!opened.generated).then_some(size),
        exact: !opened.generated,
        ..Default::default()
    };
    match range {
        Some(Ok((start, len))) => {
            let last = start + len - 1;
            response = response
                .status(StatusCode::PARTIAL_CONTENT)
                .header("content-range", format!("bytes {start}-{last}/{size}"));
            plan.offset = start;
            plan.length = Some(len);
        }
        Some(Err(())) => {
            let refused = Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{size}"));
            return built(refused, HttpBody::default());
        }
        None => plan.gzip = gzip,
    }
    if plan.gzip {
        response = response.header("content-encoding", "gzip");
    } else if let Some(length) = plan.length {
        response = response.header("content-length", length);
    }
    let frames = stream_file(opened, path, plan, slot).map(|r| {
        r.map(|m| Frame::data(m.data))
            .map_err(|e| std::io::Error::other(e.message))
    });
    built(response, HttpBody::new(StreamBody::new(frames)))
}

/// `{"path","name","type":"file"}`: what E2B answers for a written file.
/// One file of the answer; `metadata` as set from `X-Metadata-*` (the SDK's
/// `WriteInfo.metadata`).
fn written(path: &Path, metadata: Option<&[(String, String)]>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "path": path.to_string_lossy(),
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
    });
    if let Some(m) = metadata {
        let map: serde_json::Map<String, serde_json::Value> = m
            .iter()
            .map(|(k, val)| (k.clone(), serde_json::Value::String(val.clone())))
            .collect();
        v["metadata"] = serde_json::Value::Object(map);
    }
    v
}

/// Whether the body is gzip (`Content-Encoding`); another coding is 415.
fn gzip_body(headers: &HeaderMap) -> std::result::Result<bool, Rest> {
    let coding = headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    match coding {
        None | Some("identity") | Some("") => Ok(false),
        Some(e) if e.eq_ignore_ascii_case("gzip") => Ok(true),
        Some(other) => Err(Rest::http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content-encoding {other:?} is not supported"),
        )),
    }
}

/// The request body as a byte stream.
fn body_bytes(
    body: &mut RequestBody,
) -> impl Stream<Item = std::io::Result<Bytes>> + Unpin + Send + '_ {
    Box::pin(BodyStream::new(body).filter_map(|f| async move {
        match f {
            Ok(frame) => frame.into_data().ok().map(Ok),
            Err(e) => Some(Err(std::io::Error::other(e))),
        }
    }))
}

/// The files of an upload, each written as it arrives.
struct Upload<'a> {
    user: &'a User,
    slot: &'a Slot,
    metadata: Option<Vec<(String, String)>>,
    gzip: bool,
    written: Vec<serde_json::Value>,
    seen: HashSet<PathBuf>,
}

impl Upload<'_> {
    /// Writes one file (atomically, see `filesystem::transfer`).
    async fn file<S>(&mut self, dest: &[u8], data: S) -> Result<()>
    where
        S: Stream<Item = Result<Bytes>> + Unpin,
    {
        if self.written.len() >= MAX_UPLOAD_PARTS {
            return Err(Error::invalid(format!(
                "an upload may write at most {MAX_UPLOAD_PARTS} files"
            )));
        }
        let path = resolve(dest, self.user)?;
        if !self.seen.insert(path.clone()) {
            return Err(Error::invalid(format!(
                "two parts write to '{}'",
                path.display()
            )));
        }
        let spec = WriteSpec {
            path: path.clone(),
            gzip: self.gzip,
            metadata: self.metadata.clone(),
            ..Default::default()
        };
        write_bytes(spec, self.user, data, self.slot).await?;
        // E2B's answer names the path as requested (a symlink is written
        // through).
        self.written.push(written(&path, self.metadata.as_deref()));
        Ok(())
    }
}

pub async fn upload(req: Request<RequestBody>, q: Query, defaults: &Defaults) -> RestResult {
    let user = user_of(&q, defaults)?;
    // Its place among the uploads that run at once (the writer holds a
    // thread while the client sends); none within the wait is 503.
    let slot = UPLOADS.take(1).await.map_err(|e| Rest::busy(e.message))?;
    let (parts, mut body) = req.into_parts();
    let result = upload_parts(&parts.headers, &mut body, &q, &user, &slot).await;
    if result.is_err() {
        // A file refused midway (disk full, a bad part): what the client
        // still sends is read and dropped, so that it gets the answer.
        crate::body::drain(&mut body).await;
    }
    result
}

async fn upload_parts(
    headers: &HeaderMap,
    body: &mut RequestBody,
    q: &Query,
    user: &User,
    slot: &Slot,
) -> RestResult {
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut upload = Upload {
        user,
        slot,
        metadata: metadata(headers)?,
        gzip: gzip_body(headers)?,
        written: Vec::new(),
        seen: HashSet::new(),
    };
    let query_path = q.bytes("path").filter(|p| !p.is_empty());
    let multipart = content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data");
    if !multipart {
        let data = body_bytes(body)
            .map(|r| r.map_err(|e| Error::invalid(format!("reading the upload: {e}"))));
        upload.file(query_path.unwrap_or_default(), data).await?;
        return Ok(json(StatusCode::OK, &upload.written));
    }
    if upload.gzip {
        return Err(Rest::http(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "gzip is supported for octet-stream uploads only",
        ));
    }
    let boundary = multer::parse_boundary(content_type).map_err(bad_multipart)?;
    let heads = std::sync::Arc::new(super::multipart::Heads::default());
    let mut fields = multer::Multipart::new(heads.guard(body_bytes(body)), boundary);
    loop {
        heads.looking();
        let field = fields.next_field().await;
        heads.found();
        let Some(mut field) = field.map_err(bad_multipart)? else {
            break;
        };
        if field.name() != Some("file") {
            // Read to its end here, so that looking for the next part
            // reads only its boundary and headers.
            while field.chunk().await.map_err(bad_multipart)?.is_some() {}
            continue;
        }
        let dest = query_path
            .map(<[u8]>::to_vec)
            .or_else(|| field.file_name().map(|n| n.as_bytes().to_vec()))
            .unwrap_or_default();
        let data = field.map(|r| r.map_err(bad_multipart));
        upload.file(&dest, data).await?;
    }
    if upload.written.is_empty() {
        return Err(Error::invalid("no part named 'file' in the upload").into());
    }
    Ok(json(StatusCode::OK, &upload.written))
}

/// A multipart body the parser (or [`super::multipart`]'s bound) refused.
fn bad_multipart(e: multer::Error) -> Error {
    Error::invalid(format!("multipart: {e}"))
}

#[derive(serde::Deserialize)]
struct ComposeRequest {
    source_paths: Vec<String>,
    destination: String,
    #[serde(default)]
    username: Option<String>,
}

pub async fn compose(req: Request<RequestBody>, defaults: &Defaults) -> RestResult {
    let body = read_json_body(req.into_body(), COMPOSE_BODY_LIMIT).await?;
    let c: ComposeRequest =
        serde_json::from_slice(&body).map_err(|e| Error::invalid(format!("bad JSON: {e}")))?;
    let name = c
        .username
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| defaults.user());
    let user = User::lookup(&name).map_err(|e| Error::unauthenticated(e.message))?;
    let sources = c
        .source_paths
        .iter()
        .map(|p| resolve(p.as_bytes(), &user))
        .collect::<Result<Vec<_>>>()?;
    let dest = resolve(c.destination.as_bytes(), &user)?;
    let requested = dest.clone();
    crate::filesystem::pool::run(move || compose::compose(&sources, &dest, &user)).await??;
    // E2B's shape: the path as requested (a symlink is written through).
    Ok(json(StatusCode::OK, &written(&requested, None)))
}
