//! HTTP(S) origin access with reqwest and rustls.

use crate::policy::{PolicyResolver, TargetPolicy};
use crate::{BackendError, RetryPolicy, SourceRequest};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};
use std::error::Error as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tracing::debug;

/// What the origin told us about the content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceStat {
    /// Total length, when the origin announced it.
    pub content_length: Option<u64>,
    /// Whether the origin honours `Range` requests.
    pub supports_range: bool,
    /// Response headers of the probe (without hop-by-hop and range headers).
    pub headers: Vec<(String, String)>,
}

/// The result of probing an origin: its stat, plus the whole body when the origin ignored
/// the probe's range (so the body is not requested twice).
pub struct Probe {
    pub stat: SourceStat,
    pub full_body: Option<BodyStream>,
}

/// A body as a stream of chunks.
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<Bytes, BackendError>> + Send>>;

/// How the HTTP client talks to origins.
#[derive(Debug, Clone)]
pub struct BackendOptions {
    pub connect_timeout: Duration,
    /// The longest an origin may stay silent mid-body (no whole-body deadline: a large
    /// object from a slow origin takes as long as it takes, as long as bytes keep coming).
    pub read_timeout: Duration,
    pub retry: RetryPolicy,
    pub policy: TargetPolicy,
}

impl Default for BackendOptions {
    fn default() -> Self {
        BackendOptions {
            connect_timeout: Duration::from_secs(30),
            read_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            policy: TargetPolicy::default(),
        }
    }
}

/// Redirects followed per request at most.
const MAX_REDIRECTS: usize = 10;

/// Clients with extra trusted CAs kept at most (one per distinct certificate chain).
const MAX_CHAIN_CLIENTS: usize = 16;

/// HTTP(S) backend; cheap to clone.
#[derive(Clone)]
pub struct HttpBackend {
    client: reqwest::Client,
    retry: RetryPolicy,
    policy: Arc<TargetPolicy>,
    options: Arc<BackendOptions>,
    /// Clients that also trust a request's `certificate_chain`, by the chain.
    chain_clients: Arc<std::sync::Mutex<std::collections::HashMap<Vec<Vec<u8>>, reqwest::Client>>>,
}

impl HttpBackend {
    pub fn new(options: BackendOptions) -> Result<Self, BackendError> {
        let policy = Arc::new(options.policy.clone());
        let client = Self::build_client(&options, &policy, &[])?;
        Ok(HttpBackend {
            client,
            retry: options.retry,
            policy,
            options: Arc::new(options),
            chain_clients: Arc::default(),
        })
    }

    fn build_client(
        options: &BackendOptions,
        policy: &Arc<TargetPolicy>,
        chain: &[Vec<u8>],
    ) -> Result<reqwest::Client, BackendError> {
        let redirect_policy = policy.clone();
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= MAX_REDIRECTS {
                return attempt.error(format!("more than {MAX_REDIRECTS} redirects"));
            }
            match redirect_policy.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(denied) => attempt.error(denied.to_string()),
            }
        });
        let mut builder = reqwest::Client::builder()
            .connect_timeout(options.connect_timeout)
            .read_timeout(options.read_timeout)
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .redirect(redirect)
            .no_gzip();
        if policy.has_denied_networks() {
            builder = builder.dns_resolver(Arc::new(PolicyResolver {
                policy: policy.clone(),
            }));
        }
        for der in chain {
            let cert = reqwest::Certificate::from_der(der)
                .map_err(|e| BackendError::InvalidCertificate(format!("certificate_chain: {e}")))?;
            builder = builder.add_root_certificate(cert);
        }
        builder.build().map_err(|e| BackendError::Unreachable {
            url: String::new(),
            reason: format!("cannot build HTTP client: {e}"),
        })
    }

    /// The client for a request: the shared one, or one that also trusts its chain.
    fn client_for(&self, request: &SourceRequest) -> Result<reqwest::Client, BackendError> {
        if request.certificate_chain.is_empty() {
            return Ok(self.client.clone());
        }
        let mut clients = self.chain_clients.lock().expect("chain clients");
        if let Some(client) = clients.get(&request.certificate_chain) {
            return Ok(client.clone());
        }
        let client = Self::build_client(&self.options, &self.policy, &request.certificate_chain)?;
        if clients.len() >= MAX_CHAIN_CLIENTS {
            clients.clear();
        }
        clients.insert(request.certificate_chain.clone(), client.clone());
        Ok(client)
    }

    /// The policy origin requests obey.
    pub fn policy(&self) -> &TargetPolicy {
        &self.policy
    }

    fn headers(request: &SourceRequest) -> Result<HeaderMap, BackendError> {
        let mut map = HeaderMap::new();
        for (name, value) in &request.headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| BackendError::InvalidHeader(name.clone()))?;
            let value = HeaderValue::from_str(value)
                .map_err(|_| BackendError::InvalidHeader(format!("{name}: {value}")))?;
            map.append(name, value);
        }
        Ok(map)
    }

    pub(crate) fn check_target(&self, request: &SourceRequest) -> Result<(), BackendError> {
        match request.url.scheme() {
            "http" | "https" => self.policy.check_url(&request.url),
            other => Err(BackendError::UnsupportedScheme(other.to_string())),
        }
    }

    /// Sends a GET and waits at most `timeout` for the response head; the body is bounded
    /// by the client's read timeout only.
    async fn send(
        &self,
        request: &SourceRequest,
        range: Option<String>,
        timeout: Duration,
    ) -> Result<Response, BackendError> {
        self.check_target(request)?;
        let mut headers = Self::headers(request)?;
        if let Some(range) = &range {
            headers.insert(RANGE, HeaderValue::from_str(range).expect("ascii range"));
        }
        let url = request.url.to_string();
        let sent = self
            .client_for(request)?
            .get(request.url.clone())
            .headers(headers)
            .send();
        let response = match tokio::time::timeout(timeout, sent).await {
            Ok(result) => result.map_err(|e| classify(&url, timeout, e))?,
            Err(_) => return Err(BackendError::Timeout { url, timeout }),
        };
        let status = response.status();
        if status.is_client_error() && status != StatusCode::RANGE_NOT_SATISFIABLE
            || status.is_server_error()
        {
            return Err(BackendError::Status {
                url,
                status: status.as_u16(),
                reason: status.canonical_reason().unwrap_or("").to_string(),
            });
        }
        Ok(response)
    }

    /// Runs `op` with the retry policy.
    pub async fn with_retry<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, BackendError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BackendError>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(err) if err.retryable() && attempt < self.retry.max_attempts => {
                    let backoff = self.retry.backoff(attempt);
                    debug!(%err, attempt, ?backoff, what, "origin request failed, retrying");
                    tokio::time::sleep(backoff).await;
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// Probes the origin with `Range: bytes=0-0`.
    pub async fn probe(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<Probe, BackendError> {
        self.with_retry("probe", || async {
            let response = self
                .send(request, Some("bytes=0-0".into()), timeout)
                .await?;
            let headers = kept_headers(response.headers());
            match response.status() {
                StatusCode::PARTIAL_CONTENT => {
                    let total = response
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_content_range_total);
                    Ok(Probe {
                        stat: SourceStat {
                            content_length: total,
                            supports_range: total.is_some(),
                            headers,
                        },
                        full_body: None,
                    })
                }
                StatusCode::RANGE_NOT_SATISFIABLE => {
                    // `bytes */0`: an empty object.
                    let total = response
                        .headers()
                        .get(CONTENT_RANGE)
                        .and_then(|v| v.to_str().ok())
                        .and_then(parse_content_range_total);
                    match total {
                        Some(total) => Ok(Probe {
                            stat: SourceStat {
                                content_length: Some(total),
                                supports_range: true,
                                headers,
                            },
                            full_body: None,
                        }),
                        None => {
                            // Range refused for another reason: ask for the whole body.
                            let response = self.send(request, None, timeout).await?;
                            Ok(full_probe(response))
                        }
                    }
                }
                _ => Ok(full_probe(response)),
            }
        })
        .await
    }

    /// GETs `length` bytes at `offset`; the origin must answer 206 with that exact range.
    pub async fn get_range(
        &self,
        request: &SourceRequest,
        offset: u64,
        length: u64,
        timeout: Duration,
    ) -> Result<BodyStream, BackendError> {
        let range = format!("bytes={}-{}", offset, offset + length - 1);
        let response = self
            .with_retry("range", || self.send(request, Some(range.clone()), timeout))
            .await?;
        let status = response.status();
        let content_range = response
            .headers()
            .get(CONTENT_RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_content_range);
        if status != StatusCode::PARTIAL_CONTENT
            || content_range.map(|(s, e, _)| (s, e)) != Some((offset, offset + length - 1))
        {
            return Err(BackendError::RangeIgnored {
                url: request.url.to_string(),
                range,
                status: status.as_u16(),
            });
        }
        Ok(body_stream(request.url.to_string(), response))
    }

    /// GETs the whole body.
    pub async fn get(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<BodyStream, BackendError> {
        let response = self
            .with_retry("get", || self.send(request, None, timeout))
            .await?;
        Ok(body_stream(request.url.to_string(), response))
    }
}

/// How the proxy's pass-through client talks to origins.
#[derive(Debug, Clone)]
pub struct PassthroughOptions {
    pub connect_timeout: Duration,
    /// The longest an origin may stay silent while answering.
    pub read_timeout: Duration,
    pub policy: Arc<TargetPolicy>,
    /// Extra trusted CA certificates (PEM files' contents).
    pub extra_roots_pem: Vec<Vec<u8>>,
    /// Accept any certificate (an intercepted host configured `insecure`).
    pub insecure: bool,
}

/// A client for requests passed through untouched (the proxy's): redirects reach the
/// caller instead of being followed, bodies are not decompressed, no proxy from the
/// environment is used (the caller is the proxy), and the target policy holds for every
/// resolved address.
pub fn passthrough_client(options: &PassthroughOptions) -> Result<reqwest::Client, BackendError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(options.connect_timeout)
        .read_timeout(options.read_timeout)
        .pool_max_idle_per_host(32)
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .no_gzip()
        .http1_only();
    if options.policy.has_denied_networks() {
        builder = builder.dns_resolver(Arc::new(PolicyResolver {
            policy: options.policy.clone(),
        }));
    }
    for pem in &options.extra_roots_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| BackendError::InvalidCertificate(e.to_string()))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if options.insecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    builder.build().map_err(|e| BackendError::Unreachable {
        url: String::new(),
        reason: format!("cannot build HTTP client: {e}"),
    })
}

/// Turns a response into a chunk stream with errors that name the URL.
pub fn body_stream(url: String, response: Response) -> BodyStream {
    Box::pin(response.bytes_stream().map(move |chunk| {
        chunk.map_err(|e| BackendError::Body {
            url: url.clone(),
            reason: error_chain(&e),
        })
    }))
}

fn full_probe(response: Response) -> Probe {
    let url = response.url().to_string();
    let content_length = response
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    Probe {
        stat: SourceStat {
            content_length,
            supports_range: false,
            headers: kept_headers(response.headers()),
        },
        full_body: Some(body_stream(url, response)),
    }
}

/// Headers worth recording for a task (not hop-by-hop, not range-specific).
fn kept_headers(headers: &HeaderMap) -> Vec<(String, String)> {
    const SKIP: &[&str] = &[
        "connection",
        "keep-alive",
        "transfer-encoding",
        "content-range",
        "content-length",
        "date",
        "server",
    ];
    headers
        .iter()
        .filter(|(name, _)| !SKIP.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// Parses `bytes START-END/TOTAL`.
fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let total = if total == "*" {
        None
    } else {
        Some(total.parse().ok()?)
    };
    Some((start.parse().ok()?, end.parse().ok()?, total))
}

/// The total of `bytes START-END/TOTAL` or `bytes */TOTAL`.
fn parse_content_range_total(value: &str) -> Option<u64> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (_, total) = rest.split_once('/')?;
    total.parse().ok()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn classify(url: &str, timeout: Duration, err: reqwest::Error) -> BackendError {
    if err.is_redirect() {
        // Refused by the target policy, or a redirect loop: trying again changes nothing.
        let reason = err
            .source()
            .map(|s| s.to_string())
            .unwrap_or_else(|| err.to_string());
        BackendError::Denied {
            url: url.to_string(),
            reason,
        }
    } else if err.is_timeout() {
        BackendError::Timeout {
            url: url.to_string(),
            timeout,
        }
    } else {
        BackendError::Unreachable {
            url: url.to_string(),
            reason: error_chain(&err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_parsing() {
        assert_eq!(parse_content_range("bytes 0-0/10"), Some((0, 0, Some(10))));
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */10"), None);
        assert_eq!(parse_content_range_total("bytes */0"), Some(0));
        assert_eq!(parse_content_range_total("items 0-1/2"), None);
    }

    #[test]
    fn retryable_classification() {
        let status = |s| BackendError::Status {
            url: "u".into(),
            status: s,
            reason: String::new(),
        };
        assert!(status(503).retryable());
        assert!(status(429).retryable());
        assert!(!status(404).retryable());
        assert!(!status(403).retryable());
        assert!(BackendError::Unreachable {
            url: "u".into(),
            reason: "r".into()
        }
        .retryable());
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let p = RetryPolicy::default();
        assert!(p.backoff(1) <= Duration::from_millis(250));
        assert!(p.backoff(10) <= Duration::from_millis(6250));
    }

    async fn origin(range: bool) -> std::net::SocketAddr {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::get;
        let data: &'static [u8] = b"0123456789";
        let app = axum::Router::new()
            .route(
                "/f",
                get(move |headers: HeaderMap| async move {
                    if range {
                        if let Some(r) = headers.get("range").and_then(|v| v.to_str().ok()) {
                            let (s, e) = r.trim_start_matches("bytes=").split_once('-').unwrap();
                            let (s, e): (usize, usize) = (s.parse().unwrap(), e.parse().unwrap());
                            return (
                                StatusCode::PARTIAL_CONTENT,
                                [("content-range", format!("bytes {s}-{e}/{}", data.len()))],
                                data[s..=e].to_vec(),
                            );
                        }
                    }
                    (StatusCode::OK, [("x-a", "b".to_string())], data.to_vec())
                }),
            )
            .route("/missing", get(|| async { StatusCode::NOT_FOUND }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    fn req(addr: std::net::SocketAddr, path: &str) -> SourceRequest {
        SourceRequest {
            url: format!("http://{addr}{path}").parse().unwrap(),
            headers: vec![],
            certificate_chain: vec![],
            credentials: Default::default(),
        }
    }

    async fn collect(mut s: BodyStream) -> Vec<u8> {
        let mut out = Vec::new();
        while let Some(chunk) = s.next().await {
            out.extend_from_slice(&chunk.unwrap());
        }
        out
    }

    #[tokio::test]
    async fn probes_and_fetches_ranges() {
        let b = HttpBackend::new(BackendOptions::default()).unwrap();
        let t = Duration::from_secs(5);
        let addr = origin(true).await;
        let probe = b.probe(&req(addr, "/f"), t).await.unwrap();
        assert_eq!(probe.stat.content_length, Some(10));
        assert!(probe.stat.supports_range);
        let body = collect(b.get_range(&req(addr, "/f"), 3, 4, t).await.unwrap()).await;
        assert_eq!(body, b"3456");

        let addr = origin(false).await;
        let probe = b.probe(&req(addr, "/f"), t).await.unwrap();
        assert!(!probe.stat.supports_range);
        assert_eq!(probe.stat.content_length, Some(10));
        assert!(probe
            .stat
            .headers
            .iter()
            .any(|(k, v)| k == "x-a" && v == "b"));
        let body = collect(probe.full_body.unwrap()).await;
        assert_eq!(body, b"0123456789");
        let err = b.get_range(&req(addr, "/f"), 3, 4, t).await.err().unwrap();
        assert!(matches!(err, BackendError::RangeIgnored { .. }), "{err}");

        let err = b.probe(&req(addr, "/missing"), t).await.err().unwrap();
        assert_eq!(err.http_status(), Some(404));
        assert!(err.to_string().contains("HTTP 404 Not Found"), "{err}");
    }

    #[tokio::test]
    async fn unreachable_origin_is_reported_after_retries() {
        let b = HttpBackend::new(BackendOptions {
            connect_timeout: Duration::from_secs(1),
            retry: RetryPolicy {
                max_attempts: 2,
                initial_backoff: Duration::from_millis(10),
                max_backoff: Duration::from_millis(10),
            },
            ..BackendOptions::default()
        })
        .unwrap();
        // a port nobody listens on
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let err = b
            .probe(&req(addr, "/f"), Duration::from_secs(2))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, BackendError::Unreachable { .. }), "{err}");
        let err = b
            .probe(
                &SourceRequest {
                    url: "ftp://x/y".parse().unwrap(),
                    headers: vec![],
                    certificate_chain: vec![],
                    credentials: Default::default(),
                },
                Duration::from_secs(1),
            )
            .await
            .err()
            .unwrap();
        assert!(matches!(err, BackendError::UnsupportedScheme(_)));
    }

    /// An origin on 127.0.0.1 that redirects `/to-denied` to 127.0.0.2 and trickles
    /// `/slow` in ten chunks, 100 ms apart.
    async fn tricky_origin() -> std::net::SocketAddr {
        use axum::http::StatusCode;
        use axum::routing::get;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route(
                "/to-denied",
                get(move || async move {
                    (
                        StatusCode::FOUND,
                        [("location", format!("http://127.0.0.2:{}/f", addr.port()))],
                    )
                }),
            )
            .route(
                "/slow",
                get(|| async {
                    let chunks = futures_util::stream::unfold(0u8, |i| async move {
                        if i == 10 {
                            return None;
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Some((Ok::<_, std::io::Error>(vec![b'0' + i]), i + 1))
                    });
                    axum::body::Body::from_stream(chunks)
                }),
            );
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }

    #[tokio::test]
    async fn denied_targets_are_refused_also_behind_a_redirect() {
        let b = HttpBackend::new(BackendOptions {
            policy: TargetPolicy::new(vec!["http".into()], vec!["127.0.0.2/32".parse().unwrap()]),
            ..BackendOptions::default()
        })
        .unwrap();
        let t = Duration::from_secs(5);
        let addr = tricky_origin().await;
        let err = b.probe(&req(addr, "/to-denied"), t).await.err().unwrap();
        let text = err.to_string();
        assert!(
            text.contains("127.0.0.2") && text.contains("denied"),
            "{text}"
        );
        assert!(!err.retryable(), "{err:?}");
        let direct = SourceRequest {
            url: format!("http://127.0.0.2:{}/f", addr.port())
                .parse()
                .unwrap(),
            headers: vec![],
            certificate_chain: vec![],
            credentials: Default::default(),
        };
        let err = b.probe(&direct, t).await.err().unwrap();
        assert!(matches!(err, BackendError::Denied { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_slow_body_is_bounded_by_silence_not_by_its_total_time() {
        let addr = tricky_origin().await;
        // One second of body, 100 ms between chunks: a 300 ms head timeout and a 500 ms
        // read timeout let it through.
        let b = HttpBackend::new(BackendOptions {
            read_timeout: Duration::from_millis(500),
            ..BackendOptions::default()
        })
        .unwrap();
        let body = b
            .get(&req(addr, "/slow"), Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(collect(body).await, b"0123456789");
        // A read timeout shorter than the gap between chunks cuts it.
        let b = HttpBackend::new(BackendOptions {
            read_timeout: Duration::from_millis(30),
            retry: RetryPolicy {
                max_attempts: 1,
                ..RetryPolicy::default()
            },
            ..BackendOptions::default()
        })
        .unwrap();
        let mut body = b.get(&req(addr, "/slow"), Duration::from_secs(1)).await;
        let failed = match body.as_mut() {
            Err(_) => true,
            Ok(stream) => {
                let mut failed = false;
                while let Some(chunk) = stream.next().await {
                    if chunk.is_err() {
                        failed = true;
                        break;
                    }
                }
                failed
            }
        };
        assert!(
            failed,
            "a 30 ms read timeout must cut a body with 100 ms gaps"
        );
    }
}
