//! Access control: the access token (`X-Access-Token`, set by `/init` or
//! `--access-token-file`) and E2B's signed `/files` URLs. Comparisons are
//! constant-time; tokens are never logged.

use std::sync::RwLock;

use base64::Engine;
use sha2::{Digest, Sha256};

/// Header carrying the token on every protocol.
pub const TOKEN_HEADER: &str = "x-access-token";

#[derive(Default)]
pub struct Auth {
    token: RwLock<Option<String>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token_set", &self.is_set())
            .finish()
    }
}

/// Compares two secrets in time independent of where they differ (and of
/// their lengths: their SHA-256 digests are compared).
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    let (da, db) = (Sha256::digest(a), Sha256::digest(b));
    da.iter()
        .zip(db.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// The outcome of checking a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// No token or signature where one is required.
    Missing,
    /// A wrong token, or a bad or expired signature.
    Rejected,
}

impl Auth {
    pub fn new(token: Option<String>) -> Self {
        Self {
            token: RwLock::new(token.filter(|t| !t.is_empty())),
        }
    }

    pub fn is_set(&self) -> bool {
        self.token
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    /// Sets (or with `None`, clears) the token.
    /// The token now in force (carried across a live upgrade).
    pub fn current(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn set(&self, token: Option<String>) {
        *self.token.write().unwrap_or_else(|e| e.into_inner()) = token.filter(|t| !t.is_empty());
    }

    /// Checks a presented `X-Access-Token`.
    pub fn check_token(&self, presented: Option<&[u8]>) -> Verdict {
        let guard = self.token.read().unwrap_or_else(|e| e.into_inner());
        match (guard.as_deref(), presented) {
            (None, _) => Verdict::Allowed,
            (Some(_), None) => Verdict::Missing,
            (Some(t), Some(p)) if secrets_equal(t.as_bytes(), p) => Verdict::Allowed,
            (Some(_), Some(_)) => Verdict::Rejected,
        }
    }

    /// Checks a `/files` signature: `v1_` + unpadded base64 of
    /// sha256("<path>:<operation>:<username>:<token>[:<expiration>]").
    pub fn check_signature(
        &self,
        path: &str,
        operation: &str,
        username: &str,
        signature: &str,
        expiration: Option<&str>,
        now_unix: i64,
    ) -> Verdict {
        let guard = self.token.read().unwrap_or_else(|e| e.into_inner());
        let Some(token) = guard.as_deref() else {
            return Verdict::Allowed;
        };
        if let Some(exp) = expiration {
            match exp.parse::<i64>() {
                Ok(at) if at >= now_unix => {}
                _ => return Verdict::Rejected,
            }
        }
        let expected = sign(path, operation, username, token, expiration);
        if secrets_equal(expected.as_bytes(), signature.as_bytes()) {
            Verdict::Allowed
        } else {
            Verdict::Rejected
        }
    }
}

/// The `v1_` signature of a `/files` request (also used by clients and tests).
pub fn sign(
    path: &str,
    operation: &str,
    username: &str,
    token: &str,
    expiration: Option<&str>,
) -> String {
    let mut text = format!("{path}:{operation}:{username}:{token}");
    if let Some(exp) = expiration {
        text.push(':');
        text.push_str(exp);
    }
    let digest = Sha256::digest(text.as_bytes());
    format!(
        "v1_{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// The error for a request refused by `verdict` (Missing or Rejected).
pub fn refusal(verdict: Verdict) -> crate::status::Error {
    match verdict {
        Verdict::Rejected => {
            crate::status::Error::unauthenticated("invalid access token or signature")
        }
        _ => crate::status::Error::unauthenticated(
            "unauthorized access, please provide a valid access token (X-Access-Token) or method signing if supported",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_signatures() {
        let auth = Auth::new(None);
        assert_eq!(auth.check_token(None), Verdict::Allowed);
        auth.set(Some("secret".into()));
        assert_eq!(auth.check_token(None), Verdict::Missing);
        assert_eq!(auth.check_token(Some(b"secret")), Verdict::Allowed);
        assert_eq!(auth.check_token(Some(b"secreT")), Verdict::Rejected);
        let sig = sign("/a", "read", "", "secret", Some("100"));
        assert_eq!(
            auth.check_signature("/a", "read", "", &sig, Some("100"), 50),
            Verdict::Allowed
        );
        assert_eq!(
            auth.check_signature("/a", "read", "", &sig, Some("100"), 101),
            Verdict::Rejected
        );
        assert_eq!(
            auth.check_signature("/a", "write", "", &sig, Some("100"), 50),
            Verdict::Rejected
        );
        let sig = sign("/a", "read", "u", "secret", None);
        assert_eq!(
            auth.check_signature("/a", "read", "u", &sig, None, 0),
            Verdict::Allowed
        );
    }
}
