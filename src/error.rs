//! The crate's one error type and the one mapping from it to `rf_status` numbers.

use std::fmt;

/// Stable status numbers (append-only; retired numbers are never reused).
/// Mirrors `rf_status` in the C ABI (`ffi::types::rf_status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    InvalidArgument = 1,
    Shape = 2,
    DType = 3,
    NotFound = 4,
    Io = 5,
    Format = 6,
    Unsupported = 7,
    Device = 8,
    OutOfMemory = 9,
    Numeric = 10,
    Internal = 11,
}

/// An error: a status and a message that names the argument, tensor, module or file at fault.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub status: Status,
    pub message: String,
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(status: Status, message: impl Into<String>) -> Self {
        Error {
            status,
            message: message.into(),
        }
    }
    pub fn invalid(m: impl Into<String>) -> Self {
        Self::new(Status::InvalidArgument, m)
    }
    pub fn shape(m: impl Into<String>) -> Self {
        Self::new(Status::Shape, m)
    }
    pub fn dtype(m: impl Into<String>) -> Self {
        Self::new(Status::DType, m)
    }
    pub fn not_found(m: impl Into<String>) -> Self {
        Self::new(Status::NotFound, m)
    }
    pub fn io(m: impl Into<String>) -> Self {
        Self::new(Status::Io, m)
    }
    pub fn format(m: impl Into<String>) -> Self {
        Self::new(Status::Format, m)
    }
    pub fn unsupported(m: impl Into<String>) -> Self {
        Self::new(Status::Unsupported, m)
    }
    pub fn device(m: impl Into<String>) -> Self {
        Self::new(Status::Device, m)
    }
    pub fn oom(m: impl Into<String>) -> Self {
        Self::new(Status::OutOfMemory, m)
    }
    pub fn numeric(m: impl Into<String>) -> Self {
        Self::new(Status::Numeric, m)
    }
    pub fn internal(m: impl Into<String>) -> Self {
        Self::new(Status::Internal, m)
    }
    /// Prefixes the message with context (`"adapter 'x': " + message`), keeping the status.
    pub fn context(mut self, ctx: impl fmt::Display) -> Self {
        self.message = format!("{ctx}: {}", self.message);
        self
    }
    /// An I/O error on `path`, keeping the OS's words.
    pub fn from_io(path: &std::path::Path, e: &std::io::Error) -> Self {
        let status = match e.kind() {
            std::io::ErrorKind::NotFound => Status::NotFound,
            std::io::ErrorKind::OutOfMemory => Status::OutOfMemory,
            _ => Status::Io,
        };
        Error::new(status, format!("file '{}': {e}", path.display()))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status, self.message)
    }
}

impl std::error::Error for Error {}
