//! Back-to-source backends. Only HTTP(S) for now; other schemes (s3, hdfs, ...) will sit
//! behind the same functions.
//!
//! Every request is retried on transient failures (connect errors, timeouts, 5xx, 429) with
//! jittered exponential backoff; client errors (4xx) are final. Redirects are followed and
//! credentials are dropped on cross-origin hops (reqwest's policy).

mod http;

pub use http::{body_stream as http_body_stream, BodyStream, HttpBackend, Probe, SourceStat};

use std::time::Duration;

/// A request to the origin.
#[derive(Debug, Clone)]
pub struct SourceRequest {
    pub url: url::Url,
    /// Headers passed through from the user, in order.
    pub headers: Vec<(String, String)>,
}

/// Why the origin could not be used. Messages say what happened and what to check.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unsupported URL scheme {0:?}: only http and https are supported")]
    UnsupportedScheme(String),
    #[error("invalid request header {0:?}")]
    InvalidHeader(String),
    #[error("origin returned HTTP {status} {reason} for {url}")]
    Status {
        url: String,
        status: u16,
        reason: String,
    },
    #[error("cannot reach origin {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("origin {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("origin {url} ignored the range request {range} (answered {status})")]
    RangeIgnored {
        url: String,
        range: String,
        status: u16,
    },
    #[error("reading the body from {url} failed: {reason}")]
    Body { url: String, reason: String },
}

impl BackendError {
    /// Whether trying again may succeed.
    pub fn retryable(&self) -> bool {
        match self {
            BackendError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            BackendError::Unreachable { .. }
            | BackendError::Timeout { .. }
            | BackendError::Body { .. } => true,
            BackendError::UnsupportedScheme(_)
            | BackendError::InvalidHeader(_)
            | BackendError::RangeIgnored { .. } => false,
        }
    }

    /// The HTTP status the origin answered, if that is what failed.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            BackendError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Retry policy for origin requests.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 4,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl RetryPolicy {
    /// Backoff before attempt `attempt` (1-based retry count), with +-25% jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .initial_backoff
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
            .min(self.max_backoff);
        let jitter: f64 = 0.75 + rand::random::<f64>() * 0.5;
        base.mul_f64(jitter)
    }
}
