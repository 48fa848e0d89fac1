//! Errors of the daemon's services, with their mapping to gRPC status codes.

use d7y_backend::BackendError;
use d7y_storage::StorageError;

/// Why a task could not be served. Messages are what the user of dfget reads.
#[derive(Debug, thiserror::Error)]
pub enum TaskError {
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("{0}")]
    Storage(#[from] StorageError),
    #[error("task {0} not found")]
    NotFound(String),
    #[error("back-to-source is disabled for this download and no peer has the content")]
    BackToSourceDisabled,
    #[error("digest mismatch for {url}: expected {expected}, got {actual}")]
    DigestMismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("origin {url} sent {actual} bytes, expected {expected}")]
    LengthMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },
    #[error("cannot write output {path}: {reason}")]
    Output { path: String, reason: String },
    #[error("output {0} already exists; remove it or pass --overwrite")]
    OutputExists(String),
    #[error("piece {number} download timed out after {seconds}s")]
    PieceTimeout { number: u32, seconds: u64 },
    #[error("download was cancelled")]
    Cancelled,
    #[error("no scheduler reachable ({0}) and the origin cannot be used; check the schedulers in dynconfig or allow back-to-source")]
    SchedulerUnavailable(String),
    #[error("the scheduler refused the download: {0}")]
    Scheduler(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl TaskError {
    /// The gRPC code the error travels with; dfget maps it to an exit code.
    pub fn code(&self) -> tonic::Code {
        use tonic::Code;
        match self {
            TaskError::InvalidArgument(_) => Code::InvalidArgument,
            TaskError::Backend(e) => match e {
                BackendError::UnsupportedScheme(_)
                | BackendError::InvalidHeader(_)
                | BackendError::InvalidUrl { .. }
                | BackendError::IsDirectory { .. }
                | BackendError::NotListable { .. } => Code::InvalidArgument,
                BackendError::Denied { .. } => Code::FailedPrecondition,
                BackendError::Status { status, .. } if *status == 404 => Code::NotFound,
                BackendError::Status { .. } => Code::FailedPrecondition,
                BackendError::Timeout { .. } => Code::DeadlineExceeded,
                _ => Code::Unavailable,
            },
            TaskError::Storage(_) | TaskError::Internal(_) => Code::Internal,
            TaskError::NotFound(_) => Code::NotFound,
            TaskError::BackToSourceDisabled => Code::FailedPrecondition,
            TaskError::DigestMismatch { .. } | TaskError::LengthMismatch { .. } => Code::DataLoss,
            TaskError::Output { .. } => Code::PermissionDenied,
            TaskError::OutputExists(_) => Code::AlreadyExists,
            TaskError::PieceTimeout { .. } => Code::DeadlineExceeded,
            TaskError::Cancelled => Code::Cancelled,
            TaskError::SchedulerUnavailable(_) => Code::Unavailable,
            TaskError::Scheduler(_) => Code::FailedPrecondition,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        tonic::Status::new(self.code(), self.to_string())
    }
}
