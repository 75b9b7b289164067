//! Entry points for the fuzz targets (`fuzz/`) and the corpus replay test:
//! each feeds arbitrary bytes to one parser of untrusted input, exactly as a
//! request would reach it. They must never panic, hang or allocate without
//! bound; results are discarded.

use std::sync::OnceLock;

use bytes::Bytes;
use http::HeaderMap;

use crate::connect::envelope::EnvelopeReader;
use crate::connect::Codec;
use crate::proto::{filesystem, process, transfer};

/// A fuzz entry point.
pub type Target = fn(&[u8]);

/// The targets, by name (the `fuzz/fuzz_targets` file names).
pub const TARGETS: &[(&str, Target)] = &[
    ("connect_envelopes", connect_envelopes),
    ("messages", messages),
    ("rest_query", rest_query),
    ("range", range),
    ("multipart", multipart),
    ("gzip", gzip),
    ("signature", signature),
    ("paths", paths),
    ("h2_authority", h2_authority),
    ("headers", headers),
];

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        // Timers: a Connect message in pieces must arrive within the body
        // timeout (`EnvelopeReader`).
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime")
    })
}

/// Splits input into a first byte (a selector) and the rest.
fn split(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&b, rest)) => (b, rest),
        None => (0, data),
    }
}

/// Connect streaming envelopes, fed in arbitrary pieces.
pub fn connect_envelopes(data: &[u8]) {
    let (piece, rest) = split(data);
    let piece = usize::from(piece).max(1);
    let frames: Vec<Result<http_body::Frame<Bytes>, std::convert::Infallible>> = rest
        .chunks(piece)
        .map(|c| Ok(http_body::Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
    runtime().block_on(async {
        let mut reader = EnvelopeReader::new(body, 64 * 1024);
        while let Ok(Some(_)) = reader.next().await {}
    });
}

/// Every request message envd decodes, as JSON and as binary proto.
pub fn messages(data: &[u8]) {
    use crate::connect::codec::decode;
    let (which, rest) = split(data);
    let codec = if which & 0x80 == 0 {
        Codec::Json
    } else {
        Codec::Proto
    };
    macro_rules! try_decode {
        ($($t:ty),*) => {{
            let mut i = 0u8;
            $(
                if which & 0x0f == i {
                    let _ = decode::<$t>(codec, stringify!($t), rest);
                }
                i += 1;
            )*
            let _ = i;
        }};
    }
    try_decode!(
        process::StartRequest,
        process::ConnectRequest,
        process::ListRequest,
        process::UpdateRequest,
        process::SendInputRequest,
        process::StreamInputRequest,
        process::SendSignalRequest,
        process::CloseStdinRequest,
        filesystem::StatRequest,
        filesystem::ListDirRequest,
        filesystem::MoveRequest,
        filesystem::WatchDirRequest,
        filesystem::CreateWatcherRequest,
        transfer::ReadFileRequest,
        transfer::WriteFileRequest,
        filesystem::RemoveRequest
    );
}

/// `/files` query strings: decoding, then path resolution of `path`.
pub fn rest_query(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let q = crate::http::Query::parse(&text);
    let _ = q.get("username");
    if let Some(p) = q.bytes("path") {
        let _ = crate::paths::resolve_bytes(p, fuzz_user());
    }
}

/// `Range` against a file size taken from the input.
pub fn range(data: &[u8]) {
    let (a, rest) = split(data);
    let (b, rest) = split(rest);
    let size = u64::from(a) << 8 | u64::from(b);
    let _ = crate::http::headers::parse_range(&String::from_utf8_lossy(rest), size);
    let _ = crate::http::headers::parse_range(&String::from_utf8_lossy(rest), u64::MAX);
}

/// A multipart upload body (boundary "B"), read field by field.
pub fn multipart(data: &[u8]) {
    let body = Bytes::copy_from_slice(data);
    runtime().block_on(async move {
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut parts = multer::Multipart::new(stream, "B");
        while let Ok(Some(mut field)) = parts.next_field().await {
            let _ = field.name();
            let _ = field.file_name();
            while let Ok(Some(_)) = field.chunk().await {}
        }
    });
}

/// gzip request bodies: Connect's bounded decompression and the upload
/// decoder (into a sink).
pub fn gzip(data: &[u8]) {
    let _ = crate::connect::gunzip(data);
    let mut out = flate2::write::GzDecoder::new(std::io::sink());
    let _ = std::io::Write::write_all(&mut out, data).and_then(|()| out.try_finish());
}

/// Signed-URL parameters.
pub fn signature(data: &[u8]) {
    static AUTH: OnceLock<crate::auth::Auth> = OnceLock::new();
    let auth = AUTH.get_or_init(|| crate::auth::Auth::new(Some("fuzz-token".into())));
    let text = String::from_utf8_lossy(data);
    let mut parts = text.split('\u{0}');
    let mut next = || parts.next().unwrap_or("");
    let (path, op, user, sig, exp) = (next(), next(), next(), next(), next());
    let _ = auth.check_signature(path, op, user, sig, Some(exp), 1_700_000_000);
    let _ = auth.check_signature(path, op, user, sig, None, i64::MAX);
}

fn fuzz_user() -> &'static crate::users::User {
    static USER: OnceLock<crate::users::User> = OnceLock::new();
    USER.get_or_init(|| crate::users::User {
        name: "fuzz".into(),
        uid: 1000,
        gid: 1000,
        home: "/home/fuzz".into(),
        groups: vec![1000],
    })
}

/// Path resolution (`~`, relative, `..`, NUL, non-UTF-8).
pub fn paths(data: &[u8]) {
    if let Ok(p) = crate::paths::resolve_bytes(data, fuzz_user()) {
        assert!(p.is_absolute(), "resolved to a relative path");
        assert!(
            !p.components()
                .any(|c| matches!(c, std::path::Component::ParentDir)),
            "'..' survived resolution"
        );
    }
}

/// The HTTP/2 header rewriter of Unix-socket connections, fed a preface
/// and then arbitrary frames.
pub fn h2_authority(data: &[u8]) {
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend_from_slice(data);
    let _ = crate::unix_authority::process_all(&input);
}

/// Per-request headers: user, keepalive and timeouts.
pub fn headers(data: &[u8]) {
    static DEFAULTS: OnceLock<crate::defaults::Defaults> = OnceLock::new();
    let defaults = DEFAULTS.get_or_init(|| crate::defaults::Defaults::new("root".into()));
    let mut map = HeaderMap::new();
    let text = String::from_utf8_lossy(data);
    for line in text.split('\n') {
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::try_from(k.trim()),
            http::HeaderValue::try_from(v.trim()),
        ) {
            map.append(k, v);
        }
    }
    // Only parsing: the user lookup of the Basic header is the part that
    // touches the system, and unknown users are an ordinary error.
    let _ = crate::request::RequestContext::from_headers(&map, defaults, Default::default());
}
