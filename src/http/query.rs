//! Query strings, percent-decoded to bytes (file names need not be UTF-8).

use std::collections::HashMap;

use http::Request;

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
pub fn query<B>(req: &Request<B>) -> Query {
    Query::parse(req.uri().query().unwrap_or(""))
}
