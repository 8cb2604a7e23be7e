//! Domain errors shared by the store and the API.
//!
//! Every failure is classified by kind; the API maps kinds to HTTP statuses uniformly
//! (invalid -> 400, not found -> 404, conflict -> 409, failed precondition -> 412, storage
//! full -> 507, storage recovering -> 503, anything else -> 500), as docs/api.md section 7
//! says. How redb's failures are classified lives with the store (`store/handle.rs`).

use std::fmt;

/// The classes of failure a domain operation can report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The input breaks a pattern or rule (400).
    Invalid,
    /// A named thing does not exist or is not visible (404).
    NotFound,
    /// A uniqueness rule would be broken (409).
    Conflict,
    /// The thing exists but is in the wrong state for the operation (412).
    Precondition,
    /// The data directory's filesystem cannot take the write (507).
    InsufficientStorage,
    /// The store is recovering from an I/O error or cannot write right now (503).
    Unavailable,
    /// Storage or another internal failure (500).
    Internal,
}

/// A classified failure with the detail shown to clients.
#[derive(Debug, Clone)]
pub struct Error {
    pub kind: Kind,
    pub detail: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: Kind, detail: impl Into<String>) -> Self {
        Error {
            kind,
            detail: detail.into(),
        }
    }
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(Kind::Invalid, detail)
    }
    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::new(Kind::NotFound, detail)
    }
    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::new(Kind::Conflict, detail)
    }
    pub fn precondition(detail: impl Into<String>) -> Self {
        Self::new(Kind::Precondition, detail)
    }
    pub fn internal(detail: impl Into<String>) -> Self {
        Self::new(Kind::Internal, detail)
    }
    pub fn insufficient_storage(detail: impl Into<String>) -> Self {
        Self::new(Kind::InsufficientStorage, detail)
    }
    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::new(Kind::Unavailable, detail)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.detail)
    }
}

impl std::error::Error for Error {}
