//! The one place where internal errors become status codes.
//!
//! Service logic returns [`Error`]; here its [`Code`] becomes a gRPC status,
//! a Connect code and HTTP status, and a REST status. Messages name the
//! object.

use std::io;

/// A status code with a meaning for the client (a subset of gRPC's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    Unauthenticated,
    FailedPrecondition,
    ResourceExhausted,
    DeadlineExceeded,
    DataLoss,
    Internal,
    Unimplemented,
}

/// An error of the service logic: a code and a message naming the object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub code: Code,
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(Code::InvalidArgument, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(Code::NotFound, message)
    }
    pub fn precondition(message: impl Into<String>) -> Self {
        Self::new(Code::FailedPrecondition, message)
    }
    pub fn permission(message: impl Into<String>) -> Self {
        Self::new(Code::PermissionDenied, message)
    }
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(Code::Unauthenticated, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(Code::Internal, message)
    }

    /// An OS error while doing `what` (e.g. "open /tmp/x"), classified by errno.
    pub fn io(what: impl std::fmt::Display, err: &io::Error) -> Self {
        let code = match err.raw_os_error() {
            Some(libc::ENOENT) => Code::NotFound,
            Some(libc::ENOTDIR)
            | Some(libc::EISDIR)
            | Some(libc::EINVAL)
            | Some(libc::ENAMETOOLONG)
            | Some(libc::ELOOP) => Code::InvalidArgument,
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => Code::AlreadyExists,
            Some(libc::EACCES) | Some(libc::EPERM) | Some(libc::EROFS) => Code::PermissionDenied,
            Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EMFILE) | Some(libc::ENFILE)
            | Some(libc::ENOMEM) | Some(libc::EAGAIN) => Code::ResourceExhausted,
            _ => match err.kind() {
                io::ErrorKind::NotFound => Code::NotFound,
                io::ErrorKind::PermissionDenied => Code::PermissionDenied,
                io::ErrorKind::AlreadyExists => Code::AlreadyExists,
                io::ErrorKind::InvalidInput => Code::InvalidArgument,
                _ => Code::Internal,
            },
        };
        Self::new(code, format!("{what}: {err}"))
    }
}

impl From<nix::Error> for Error {
    fn from(e: nix::Error) -> Self {
        Error::io("system call", &io::Error::from(e))
    }
}

impl From<Code> for tonic::Code {
    fn from(code: Code) -> Self {
        match code {
            Code::InvalidArgument => tonic::Code::InvalidArgument,
            Code::NotFound => tonic::Code::NotFound,
            Code::AlreadyExists => tonic::Code::AlreadyExists,
            Code::PermissionDenied => tonic::Code::PermissionDenied,
            Code::Unauthenticated => tonic::Code::Unauthenticated,
            Code::FailedPrecondition => tonic::Code::FailedPrecondition,
            Code::ResourceExhausted => tonic::Code::ResourceExhausted,
            Code::DeadlineExceeded => tonic::Code::DeadlineExceeded,
            Code::DataLoss => tonic::Code::DataLoss,
            Code::Internal => tonic::Code::Internal,
            Code::Unimplemented => tonic::Code::Unimplemented,
        }
    }
}

impl Code {
    /// The Connect protocol's name for the code.
    pub fn connect_name(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::Unauthenticated => "unauthenticated",
            Code::FailedPrecondition => "failed_precondition",
            Code::ResourceExhausted => "resource_exhausted",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::DataLoss => "data_loss",
            Code::Internal => "internal",
            Code::Unimplemented => "unimplemented",
        }
    }

    /// The HTTP status of a Connect unary error (Connect's code table) and of
    /// REST errors.
    pub fn http_status(self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => S::BAD_REQUEST,
            Code::NotFound => S::NOT_FOUND,
            Code::AlreadyExists => S::CONFLICT,
            Code::PermissionDenied => S::FORBIDDEN,
            Code::Unauthenticated => S::UNAUTHORIZED,
            Code::ResourceExhausted => S::TOO_MANY_REQUESTS,
            Code::DeadlineExceeded => S::GATEWAY_TIMEOUT,
            Code::Unimplemented => S::NOT_IMPLEMENTED,
            Code::DataLoss | Code::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }
}

impl Code {
    /// The HTTP status of a REST (`/files`, `/init`, ...) error: as for
    /// Connect, except that a full disk is 507 Insufficient Storage.
    pub fn rest_status(self) -> http::StatusCode {
        match self {
            Code::ResourceExhausted => http::StatusCode::INSUFFICIENT_STORAGE,
            other => other.http_status(),
        }
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        tonic::Status::new(e.code.into(), e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_classification() {
        let e = Error::io("open /x", &io::Error::from_raw_os_error(libc::ENOENT));
        assert_eq!(e.code, Code::NotFound);
        assert!(e.message.starts_with("open /x: "));
        let e = Error::io("write /x", &io::Error::from_raw_os_error(libc::ENOSPC));
        assert_eq!(e.code, Code::ResourceExhausted);
        let e = Error::io("x", &io::Error::from_raw_os_error(libc::EIO));
        assert_eq!(e.code, Code::Internal);
    }
}
