//! One error type crosses tier boundaries; its code maps to SQLSTATE (pgwire) and HTTP status.

use serde::{Deserialize, Serialize};

/// Stable error classes. Codes are part of the public HTTP API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request is malformed (bad JSON, wrong types, bad values).
    InvalidInput,
    /// SQL that does not parse.
    Syntax,
    /// A column (field path) that the collection does not have.
    UndefinedColumn,
    /// A named object (collection, workspace, document) does not exist.
    NotFound,
    /// The object already exists.
    AlreadyExists,
    /// A client-controlled size or count is over its limit.
    LimitExceeded,
    /// The operation is not supported (yet).
    Unsupported,
    /// A dependency (another tier, storage) is unavailable; retrying may succeed.
    Unavailable,
    /// A bug or an unexpected storage failure.
    Internal,
    /// The write conflicts with state another writer created (a source write that straddles a
    /// shard's position); the writer re-reads the state and tries again.
    Conflict,
    /// The statement was stopped: its timeout passed or the client canceled it.
    Canceled,
    /// The statement needed more memory than its limit allows.
    OutOfMemory,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "invalid_input",
            ErrorCode::Syntax => "syntax_error",
            ErrorCode::UndefinedColumn => "undefined_column",
            ErrorCode::NotFound => "not_found",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Canceled => "query_canceled",
            ErrorCode::OutOfMemory => "out_of_memory",
        }
    }

    /// SQLSTATE for the PostgreSQL wire protocol.
    pub fn sqlstate(self) -> &'static str {
        match self {
            ErrorCode::InvalidInput => "22023",
            ErrorCode::Syntax => "42601",
            ErrorCode::UndefinedColumn => "42703",
            ErrorCode::NotFound => "42P01",
            ErrorCode::AlreadyExists => "42P07",
            ErrorCode::LimitExceeded => "54000",
            ErrorCode::Unsupported => "0A000",
            ErrorCode::Unavailable => "08006",
            ErrorCode::Internal => "XX000",
            ErrorCode::Conflict => "40001",
            ErrorCode::Canceled => "57014",
            ErrorCode::OutOfMemory => "53200",
        }
    }

    /// HTTP status for the JSON API.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::InvalidInput | ErrorCode::Syntax | ErrorCode::UndefinedColumn => 400,
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists | ErrorCode::Conflict => 409,
            ErrorCode::LimitExceeded => 413,
            ErrorCode::Unsupported => 501,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
            ErrorCode::Canceled => 408,
            ErrorCode::OutOfMemory => 507,
        }
    }
}

/// The error every tier API returns. Messages are lowercase without a trailing period.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize, PartialEq)]
#[error("{message}")]
pub struct BasaltError {
    pub code: ErrorCode,
    pub message: String,
}

impl BasaltError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidInput, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
    pub fn limit(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::LimitExceeded, message)
    }
    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unsupported, message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
}

impl From<arrow::error::ArrowError> for BasaltError {
    fn from(e: arrow::error::ArrowError) -> Self {
        BasaltError::internal(format!("arrow: {e}"))
    }
}

pub type Result<T, E = BasaltError> = std::result::Result<T, E>;
