//! HTTP header parsing and rendering for `/files`: `Range`,
//! `Accept-Encoding`, MIME types, `Content-Disposition`, `X-Metadata-*`.
//! Pure functions of their input (the fuzz targets call them directly).

use http::HeaderMap;

use crate::status::{Error, Result};

/// `Content-Disposition` for a file name of any bytes (RFC 6266): an ASCII
/// `filename` fallback and the exact name percent-encoded in `filename*`.
pub fn content_disposition(name: &[u8]) -> String {
    let fallback: String = name
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' => '_',
            0x20..=0x7e => char::from(b),
            _ => '_',
        })
        .collect();
    let mut encoded = String::with_capacity(name.len() * 3);
    for &b in name {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            encoded.push(char::from(b));
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    format!("inline; filename=\"{fallback}\"; filename*=UTF-8''{encoded}")
}

/// The MIME type served for a file, by extension.
pub fn content_type(path: &std::path::Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("txt" | "log" | "md" | "py" | "rs" | "sh" | "csv") => "text/plain; charset=utf-8",
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("json") => "application/json",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("svg") => "image/svg+xml",
        Some("pdf") => "application/pdf",
        Some("zip") => "application/zip",
        Some("gz") => "application/gzip",
        _ => "application/octet-stream",
    }
}

/// A single `bytes=` range of a file of `size` bytes: (start, length).
pub fn parse_range(value: &str, size: u64) -> Option<std::result::Result<(u64, u64), ()>> {
    let spec = value.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None; // multiple ranges: serve the whole file
    }
    let (a, b) = spec.split_once('-')?;
    let r = match (a.trim(), b.trim()) {
        ("", "") => Err(()),
        ("", n) => match n.parse::<u64>() {
            Ok(n) if n > 0 && size > 0 => Ok((size.saturating_sub(n), n.min(size))),
            _ => Err(()),
        },
        (s, e) => match (
            s.parse::<u64>(),
            if e.is_empty() {
                Ok(size.saturating_sub(1))
            } else {
                e.parse::<u64>()
            },
        ) {
            (Ok(s), Ok(e)) if s < size && s <= e => Ok((s, e.min(size - 1) - s + 1)),
            _ => Err(()),
        },
    };
    Some(r)
}

/// The coding of a download, from `Accept-Encoding` as upstream reads it:
/// the supported coding (gzip) or identity with the highest q; identity is
/// acceptable unless refused (`identity;q=0`); `*` is gzip only when identity
/// is refused. `Err` when nothing acceptable is left (406).
pub fn accepted_gzip(headers: &HeaderMap) -> std::result::Result<bool, String> {
    let mut offers: Vec<(String, f64)> = headers
        .get_all("accept-encoding")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .take(64)
        .map(|offer| {
            let mut parts = offer.split(';');
            let name = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| {
                    let p = p.trim();
                    p.get(..2)
                        .filter(|k| k.eq_ignore_ascii_case("q="))
                        .and_then(|_| p[2..].trim().parse::<f64>().ok())
                })
                .next_back()
                .unwrap_or(1.0);
            (name, q)
        })
        .filter(|(name, _)| !name.is_empty())
        .collect();
    if offers.is_empty() {
        return Ok(false);
    }
    offers.sort_by(|a, b| b.1.total_cmp(&a.1));
    let identity_refused = offers.iter().any(|(n, q)| n == "identity" && *q == 0.0);
    for (name, q) in &offers {
        if *q == 0.0 {
            continue;
        }
        match name.as_str() {
            "identity" => return Ok(false),
            "*" => return Ok(identity_refused),
            "gzip" => return Ok(true),
            _ => {}
        }
    }
    if identity_refused {
        Err("no acceptable encoding: envd sends gzip or identity".into())
    } else {
        Ok(false)
    }
}

/// `X-Metadata-<key>: <value>` headers (keys lowercased; printable ASCII).
pub fn metadata(headers: &HeaderMap) -> Result<Option<Vec<(String, String)>>> {
    let mut out = Vec::new();
    let mut total = 0;
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix("x-metadata-") else {
            continue;
        };
        let value = value
            .to_str()
            .ok()
            .filter(|v| v.bytes().all(|b| (0x20..0x7f).contains(&b)))
            .ok_or_else(|| {
                Error::invalid(format!("metadata {key}: only printable ASCII is allowed"))
            })?;
        if key.is_empty() || key.len() > 246 {
            return Err(Error::invalid(format!(
                "metadata key {key:?} must be 1..=246 bytes"
            )));
        }
        total += key.len() + value.len();
        out.push((key.to_owned(), value.to_owned()));
    }
    if total > 4096 {
        return Err(Error::invalid("metadata exceeds 4096 bytes in total"));
    }
    Ok((!out.is_empty()).then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_encoding_as_upstream() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert("accept-encoding", v.parse().unwrap());
            accepted_gzip(&m)
        };
        assert_eq!(accepted_gzip(&HeaderMap::new()), Ok(false));
        assert_eq!(h("gzip"), Ok(true));
        assert_eq!(h("GZIP, deflate"), Ok(true));
        assert_eq!(h("br"), Ok(false));
        assert_eq!(h("gzip;q=0"), Ok(false));
        assert_eq!(h("gzip;q=0.5, identity"), Ok(false));
        assert_eq!(h("identity;q=0, *"), Ok(true));
        assert_eq!(h("*"), Ok(false));
        assert!(h("identity;q=0").is_err());
        assert!(h("br, identity;q=0").is_err());
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some(Ok((0, 10))));
        assert_eq!(parse_range("bytes=90-", 100), Some(Ok((90, 10))));
        assert_eq!(parse_range("bytes=-5", 100), Some(Ok((95, 5))));
        assert_eq!(parse_range("bytes=95-200", 100), Some(Ok((95, 5))));
        assert_eq!(parse_range("bytes=100-", 100), Some(Err(())));
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
    }
}
