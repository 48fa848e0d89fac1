//! Back-to-source backends, chosen by the URL's scheme: HTTP(S) ([`HttpBackend`]), object
//! storage and HDFS through OpenDAL (`object`, feature `object-storage`: `s3`, `gs`, `abs`,
//! `oss`, `obs`, `cos`, `hdfs`), and model hubs (`hub`: `hf`, `modelscope`, resolved to
//! HTTP). [`Backend`] is the one entry point: probe, ranged and whole reads, and listing a
//! directory, the same for every scheme, so the daemon's ranged-read path (parallel ranges,
//! retries, bandwidth limits, no whole-body deadline) serves them all.
//!
//! Every request is retried on transient failures (connect errors, timeouts, 5xx, 429) with
//! jittered exponential backoff; client errors (4xx) are final. Redirects are followed and
//! credentials are dropped on cross-origin hops (reqwest's policy). Credentials never reach
//! a `Debug` output or an error message.

mod http;
pub mod hub;
#[cfg(feature = "object-storage")]
pub mod object;
mod policy;

pub use http::{
    passthrough_client, BackendOptions, BodyStream, HttpBackend, PassthroughOptions, Probe,
    SourceStat,
};
pub use policy::TargetPolicy;

use std::time::Duration;

/// A request to the origin.
#[derive(Debug, Clone)]
pub struct SourceRequest {
    pub url: url::Url,
    /// Headers passed through from the user, in order.
    pub headers: Vec<(String, String)>,
    /// Extra trusted CA certificates (DER) for this origin, beside the public roots
    /// (`Download.certificate_chain`: a registry with a private CA).
    pub certificate_chain: Vec<Vec<u8>>,
    /// Who to be at an object store, an HDFS cluster or a hub.
    pub credentials: Credentials,
}

impl SourceRequest {
    pub fn new(url: url::Url) -> SourceRequest {
        SourceRequest {
            url,
            headers: Vec::new(),
            certificate_chain: Vec::new(),
            credentials: Credentials::default(),
        }
    }
}

/// Credentials of a request (`Download.object_storage`, `.hdfs`, `.hugging_face`,
/// `.model_scope`). `Debug` shows which are set, never their values.
#[derive(Clone, Default)]
pub struct Credentials {
    pub object_storage: Option<ObjectStorageAuth>,
    pub hdfs_delegation_token: Option<String>,
    pub hub: Option<HubAuth>,
    /// Whether the process environment's credentials (e.g. `AWS_ACCESS_KEY_ID`, the
    /// instance's metadata service) may stand in for missing ones. Only for requests of
    /// this host's own users: a seed peer fetching for the network must not lend strangers
    /// its identity.
    pub allow_environment: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "object_storage",
                &self.object_storage.as_ref().map(|_| "<set>"),
            )
            .field(
                "hdfs_delegation_token",
                &self.hdfs_delegation_token.as_ref().map(|_| "<set>"),
            )
            .field("hub", &self.hub.as_ref().map(|_| "<set>"))
            .field("allow_environment", &self.allow_environment)
            .finish()
    }
}

/// `Download.object_storage`, as the backend takes it.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ObjectStorageAuth {
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub access_key_id: Option<String>,
    pub access_key_secret: Option<String>,
    pub session_token: Option<String>,
    pub credential_path: Option<String>,
    pub security_token: Option<String>,
}

/// A hub's token, revision and endpoint.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct HubAuth {
    pub token: Option<String>,
    pub revision: String,
    pub base_url: Option<String>,
}

/// A file (or directory) a listing found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Same scheme as the listed URL.
    pub url: String,
    pub content_length: u64,
    pub is_dir: bool,
}

/// Which backend a URL goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Http,
    #[cfg(feature = "object-storage")]
    Object(object::Service),
    Hub(hub::Hub),
}

impl Scheme {
    pub fn of(url: &url::Url) -> Result<Scheme, BackendError> {
        match url.scheme() {
            "http" | "https" => Ok(Scheme::Http),
            s => {
                if let Some(h) = hub::Hub::of(s) {
                    return Ok(Scheme::Hub(h));
                }
                #[cfg(feature = "object-storage")]
                if let Some(svc) = object::Service::of(s) {
                    return Ok(Scheme::Object(svc));
                }
                Err(BackendError::UnsupportedScheme(s.to_string()))
            }
        }
    }
}

/// Every scheme this build can fetch.
pub fn supported_schemes() -> Vec<&'static str> {
    let mut all = vec!["http", "https", "hf", "modelscope"];
    if cfg!(feature = "object-storage") {
        all.extend(["s3", "gs", "abs", "oss", "obs", "cos", "hdfs"]);
    }
    all
}

/// The backend for every scheme; cheap to share.
pub struct Backend {
    http: HttpBackend,
    #[cfg(feature = "object-storage")]
    object: object::ObjectBackend,
}

/// The HTTP request to the hub at `url` (made from the hub's `base`): the caller's headers,
/// and the hub token, for the hub's own host only, in place of any `Authorization` header.
fn hub_http_request(
    request: &SourceRequest,
    url: &str,
    base: &str,
) -> Result<SourceRequest, BackendError> {
    let mut hub_request = SourceRequest {
        url: url::Url::parse(url).map_err(|e| BackendError::InvalidUrl {
            url: base.to_string(),
            reason: format!("the hub's base URL: {e}"),
        })?,
        headers: request.headers.clone(),
        certificate_chain: request.certificate_chain.clone(),
        credentials: Credentials::default(),
    };
    if let Some(token) = request
        .credentials
        .hub
        .as_ref()
        .and_then(|h| h.token.clone())
        .filter(|t| !t.is_empty())
    {
        hub_request
            .headers
            .retain(|(k, _)| !k.eq_ignore_ascii_case("authorization"));
        hub_request
            .headers
            .push(("Authorization".into(), format!("Bearer {token}")));
    }
    Ok(hub_request)
}

impl Backend {
    pub fn new(options: BackendOptions) -> Result<Backend, BackendError> {
        let http = HttpBackend::new(options.clone())?;
        Ok(Backend {
            #[cfg(feature = "object-storage")]
            object: object::ObjectBackend::new(
                std::sync::Arc::new(http.policy().clone()),
                options.connect_timeout,
                options.read_timeout,
            )?,
            http,
        })
    }

    pub fn policy(&self) -> &TargetPolicy {
        self.http.policy()
    }

    pub fn http(&self) -> &HttpBackend {
        &self.http
    }

    /// A hub request as the HTTP request it resolves to: the hub's download URL, with
    /// the token for the hub's own host.
    fn resolve_hub(&self, request: &SourceRequest) -> Result<SourceRequest, BackendError> {
        let loc = hub::HubLocation::parse(&request.url)?;
        if loc.path.is_empty() {
            return Err(BackendError::IsDirectory {
                url: request.url.to_string(),
            });
        }
        let (base, revision) = hub::endpoint(&loc, request.credentials.hub.as_ref());
        hub_http_request(request, &loc.file_url(&base, &revision), &base)
    }

    /// Length, range support and headers of the content.
    pub async fn probe(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<Probe, BackendError> {
        self.policy().check_url(&request.url)?;
        match Scheme::of(&request.url)? {
            Scheme::Http => self.http.probe(request, timeout).await,
            Scheme::Hub(_) => self.http.probe(&self.resolve_hub(request)?, timeout).await,
            #[cfg(feature = "object-storage")]
            Scheme::Object(_) => {
                self.http
                    .with_retry("probe", || self.object.probe(request, timeout))
                    .await
            }
        }
    }

    /// `length` bytes at `offset`, exactly.
    pub async fn get_range(
        &self,
        request: &SourceRequest,
        offset: u64,
        length: u64,
        timeout: Duration,
    ) -> Result<BodyStream, BackendError> {
        self.policy().check_url(&request.url)?;
        match Scheme::of(&request.url)? {
            Scheme::Http => self.http.get_range(request, offset, length, timeout).await,
            Scheme::Hub(_) => {
                self.http
                    .get_range(&self.resolve_hub(request)?, offset, length, timeout)
                    .await
            }
            #[cfg(feature = "object-storage")]
            Scheme::Object(_) => {
                self.http
                    .with_retry("range", || {
                        self.object
                            .get_range(request, offset, Some(length), timeout)
                    })
                    .await
            }
        }
    }

    /// The whole content.
    pub async fn get(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<BodyStream, BackendError> {
        self.policy().check_url(&request.url)?;
        match Scheme::of(&request.url)? {
            Scheme::Http => self.http.get(request, timeout).await,
            Scheme::Hub(_) => self.http.get(&self.resolve_hub(request)?, timeout).await,
            #[cfg(feature = "object-storage")]
            Scheme::Object(_) => {
                self.http
                    .with_retry("get", || self.object.get_range(request, 0, None, timeout))
                    .await
            }
        }
    }

    /// The files under a directory URL (an object store prefix, an HDFS directory, a hub
    /// repo or a directory in it), recursively. Plain HTTP cannot be listed.
    pub async fn list(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<Vec<Entry>, BackendError> {
        self.policy().check_url(&request.url)?;
        match Scheme::of(&request.url)? {
            Scheme::Http => Err(BackendError::NotListable {
                url: request.url.to_string(),
            }),
            Scheme::Hub(_) => self.list_hub(request, timeout).await,
            #[cfg(feature = "object-storage")]
            Scheme::Object(_) => {
                self.http
                    .with_retry("list", || self.object.list(request, timeout))
                    .await
            }
        }
    }

    async fn list_hub(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<Vec<Entry>, BackendError> {
        use futures_util::StreamExt;
        let loc = hub::HubLocation::parse(&request.url)?;
        let (base, revision) = hub::endpoint(&loc, request.credentials.hub.as_ref());
        let listing = hub_http_request(request, &loc.list_url(&base, &revision), &base)?;
        let mut body = self.http.get(&listing, timeout).await?;
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk?;
            if bytes.len() + chunk.len() > 64 << 20 {
                return Err(BackendError::Body {
                    url: listing.url.to_string(),
                    reason: "the hub's listing is larger than 64 MiB".into(),
                });
            }
            bytes.extend_from_slice(&chunk);
        }
        let files = hub::parse_listing(&loc, &bytes).map_err(|reason| BackendError::Body {
            url: listing.url.to_string(),
            reason,
        })?;
        if files.is_empty() && !loc.path.is_empty() {
            return Err(BackendError::Status {
                url: request.url.to_string(),
                status: 404,
                reason: format!("no file under {} in {}", loc.path, loc.repo),
            });
        }
        Ok(hub::entries(&loc, files))
    }
}

/// Why the origin could not be used. Messages say what happened and what to check.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("unsupported URL scheme {0:?}: this dfdaemon fetches http, https, s3, gs, abs, oss, obs, cos, hdfs, hf and modelscope")]
    UnsupportedScheme(String),
    #[error("invalid URL {url}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("{url} is a directory: download it with dfget --recursive")]
    IsDirectory { url: String },
    #[error("{url} cannot be listed: only object storage, HDFS and hub URLs can be downloaded recursively")]
    NotListable { url: String },
    #[error("origin {url} is not allowed: {reason}")]
    Denied { url: String, reason: String },
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
    #[error("invalid trusted certificate: {0}")]
    InvalidCertificate(String),
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
            | BackendError::InvalidUrl { .. }
            | BackendError::IsDirectory { .. }
            | BackendError::NotListable { .. }
            | BackendError::Denied { .. }
            | BackendError::InvalidHeader(_)
            | BackendError::InvalidCertificate(_)
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
