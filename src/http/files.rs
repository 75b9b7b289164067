//! `GET /files` (download, Range, gzip), `POST /files` (multipart or
//! octet-stream upload, gzip bodies, metadata headers, atomic), and
//! `POST /files/compose`.

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyStream, StreamBody};
use hyper::body::Incoming;

use super::headers::{content_disposition, content_type, metadata, parse_range, wants_gzip};
use super::{json, query, user_of, Rest, RestResult};
use crate::connect::HttpBody;
use crate::defaults::Defaults;
use crate::filesystem::compose;
use crate::filesystem::transfer::{open_for_read, stream_file, write_bytes, WriteSpec};
use crate::paths;
use crate::status::{Error, Result};
use crate::users::User;

fn resolve(path: &[u8], user: &User) -> std::result::Result<PathBuf, Rest> {
    if path.is_empty() {
        return Err(Rest::new(
            StatusCode::BAD_REQUEST,
            "the path query parameter is required",
        ));
    }
    Ok(paths::resolve_bytes(path, user)?)
}

pub async fn download(req: Request<Incoming>, defaults: &Defaults) -> RestResult {
    let q = query(&req);
    let user = user_of(&q, defaults)?;
    let path = resolve(q.bytes("path").unwrap_or_default(), &user)?;
    // One open file gives both the size and the bytes.
    let opened = open_for_read(path.clone()).await?;
    let size = opened.size;
    let name = path.file_name().map_or(&[][..], |n| n.as_bytes());
    let mut builder = Response::builder()
        .header("content-type", content_type(&path))
        .header("content-disposition", content_disposition(name))
        .header("vary", "Accept-Encoding")
        .header("accept-ranges", "bytes");
    let range = req
        .headers()
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_range(v, size));
    let (status, offset, length) = match range {
        Some(Ok((start, len))) => {
            builder = builder.header(
                "content-range",
                format!("bytes {start}-{}/{size}", start + len - 1),
            );
            (StatusCode::PARTIAL_CONTENT, start, len)
        }
        Some(Err(())) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{size}"))
                .body(HttpBody::default())
                .map_err(|e| Rest::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()));
        }
        None => (StatusCode::OK, 0, size),
    };
    let chunks = stream_file(opened, path, offset, Some(length), true).map(|r| r.map(|m| m.data));
    let gzip = status == StatusCode::OK && wants_gzip(req.headers());
    let body = if gzip {
        builder = builder.header("content-encoding", "gzip");
        HttpBody::new(StreamBody::new(gzip_stream(chunks)))
    } else {
        builder = builder.header("content-length", length);
        HttpBody::new(StreamBody::new(chunks.map(|r| {
            r.map(Frame::data)
                .map_err(|e| std::io::Error::other(e.message))
        })))
    };
    builder
        .status(status)
        .body(body)
        .map_err(|e| Rest::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

/// Compresses a byte stream with gzip as it is sent.
fn gzip_stream(
    chunks: impl Stream<Item = Result<Bytes>> + Send + Unpin + 'static,
) -> impl Stream<Item = std::result::Result<Frame<Bytes>, std::io::Error>> + Send {
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    futures_util::stream::unfold(Some((chunks, encoder)), |state| async move {
        let (mut chunks, mut enc) = state?;
        loop {
            match chunks.next().await {
                Some(Ok(data)) => {
                    let out = tokio::task::block_in_place(|| {
                        enc.write_all(&data).map(|()| std::mem::take(enc.get_mut()))
                    });
                    match out {
                        Ok(out) if out.is_empty() => continue,
                        Ok(out) => {
                            return Some((Ok(Frame::data(Bytes::from(out))), Some((chunks, enc))))
                        }
                        Err(e) => return Some((Err(e), None)),
                    }
                }
                Some(Err(e)) => return Some((Err(std::io::Error::other(e.message)), None)),
                None => {
                    return match enc.finish() {
                        Ok(tail) => Some((Ok(Frame::data(Bytes::from(tail))), None)),
                        Err(e) => Some((Err(e), None)),
                    }
                }
            }
        }
    })
}

fn body_bytes(body: Incoming) -> impl Stream<Item = Result<Bytes>> + Unpin + Send {
    Box::pin(BodyStream::new(body).filter_map(|f| async move {
        match f {
            Ok(frame) => frame.into_data().ok().map(Ok),
            Err(e) => Some(Err(Error::invalid(format!("reading the upload: {e}")))),
        }
    }))
}

fn written(path: &std::path::Path) -> serde_json::Value {
    serde_json::json!({
        "path": path.to_string_lossy(),
        "name": path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        "type": "file",
    })
}

pub async fn upload(req: Request<Incoming>, defaults: &Defaults) -> RestResult {
    let q = query(&req);
    let user = user_of(&q, defaults)?;
    let headers = req.headers().clone();
    let meta = metadata(&headers)?;
    let gzip = match headers
        .get("content-encoding")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        None | Some("identity") | Some("") => false,
        Some(e) if e.eq_ignore_ascii_case("gzip") => true,
        Some(other) => {
            return Err(Rest::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("content-encoding {other:?} is not supported"),
            ))
        }
    };
    let ct = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let query_path = q
        .bytes("path")
        .filter(|p| !p.is_empty())
        .map(<[u8]>::to_vec);
    let mut results = Vec::new();
    if ct.to_ascii_lowercase().starts_with("multipart/form-data") {
        if gzip {
            return Err(Rest::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "gzip is supported for octet-stream uploads only",
            ));
        }
        let boundary = multer::parse_boundary(&ct)
            .map_err(|e| Rest::new(StatusCode::BAD_REQUEST, format!("multipart: {e}")))?;
        let stream = BodyStream::new(req.into_body()).filter_map(|f| async move {
            match f {
                Ok(frame) => frame.into_data().ok().map(Ok::<_, std::io::Error>),
                Err(e) => Some(Err(std::io::Error::other(e))),
            }
        });
        let mut parts = multer::Multipart::new(stream, boundary);
        let mut seen = HashSet::new();
        while let Some(field) = parts
            .next_field()
            .await
            .map_err(|e| Rest::new(StatusCode::BAD_REQUEST, format!("multipart: {e}")))?
        {
            if field.name() != Some("file") {
                continue;
            }
            let dest = query_path
                .clone()
                .or_else(|| field.file_name().map(|n| n.as_bytes().to_vec()))
                .unwrap_or_default();
            let path = resolve(&dest, &user)?;
            if !seen.insert(path.clone()) {
                return Err(Rest::new(
                    StatusCode::BAD_REQUEST,
                    format!("two parts write to '{}'", path.display()),
                ));
            }
            let data = field.map(|r| r.map_err(|e| Error::invalid(format!("multipart: {e}"))));
            let spec = WriteSpec {
                path: path.clone(),
                metadata: meta.clone(),
                ..Default::default()
            };
            write_bytes(spec, &user, Box::pin(data)).await?;
            results.push(written(&path));
        }
        if results.is_empty() {
            return Err(Rest::new(
                StatusCode::BAD_REQUEST,
                "no part named 'file' in the upload",
            ));
        }
    } else {
        let path = resolve(query_path.as_deref().unwrap_or_default(), &user)?;
        let spec = WriteSpec {
            path: path.clone(),
            gzip,
            metadata: meta,
            ..Default::default()
        };
        write_bytes(spec, &user, body_bytes(req.into_body())).await?;
        results.push(written(&path));
    }
    Ok(json(StatusCode::OK, &results))
}

#[derive(serde::Deserialize)]
struct ComposeRequest {
    source_paths: Vec<String>,
    destination: String,
    #[serde(default)]
    username: Option<String>,
}

pub async fn compose(req: Request<Incoming>, defaults: &Defaults) -> RestResult {
    let body = super::read_json_body(req.into_body(), 1 << 20).await?;
    let c: ComposeRequest = serde_json::from_slice(&body)
        .map_err(|e| Rest::new(StatusCode::BAD_REQUEST, format!("bad JSON: {e}")))?;
    let name = c
        .username
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| defaults.user());
    let user = User::lookup(&name).map_err(|e| Rest::new(StatusCode::UNAUTHORIZED, e.message))?;
    let sources = c
        .source_paths
        .iter()
        .map(|p| resolve(p.as_bytes(), &user))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let dest = resolve(c.destination.as_bytes(), &user)?;
    let requested = dest.clone();
    tokio::task::spawn_blocking(move || compose::compose(&sources, &dest, &user))
        .await
        .map_err(|e| Rest::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    // E2B's shape: the path as requested (a symlink is written through).
    Ok(json(StatusCode::OK, &written(&requested)))
}
