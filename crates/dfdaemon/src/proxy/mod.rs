//! The HTTP(S) proxy and registry mirror (`proxy.server.port`, 4001): how container
//! runtimes and HTTP clients pull through the swarm.
//!
//! A request arrives in one of three forms: a forward-proxy request (`GET http://host/...`),
//! a CONNECT tunnel (passed through untouched, or intercepted for the hosts
//! `proxy.hijackHTTPS` names), or a registry-mirror request (`GET /v2/...`, meant for the
//! registry named by `X-Dragonfly-Registry`, containerd's `ns=` parameter or
//! `proxy.registryMirror.addr`). A `GET` that a rule matches (by default, image blobs) goes
//! through the swarm ([`p2p`]); everything else is passed to the origin and back untouched
//! ([`forward`]): manifests, token endpoints, `HEAD`, redirects and authentication
//! challenges reach the client as the origin sent them.
//!
//! Routing decisions are pure ([`route`], [`headers`], [`range`]); this module wires them
//! to sockets.

pub mod headers;
pub mod mitm;
pub mod range;
pub mod route;

mod forward;
mod p2p;

use crate::metrics::Metrics;
use crate::task::TaskManager;
use bytes::Bytes;
use d7y_backend::TargetPolicy;
use d7y_config::dfdaemon::Config;
use headers::Control;
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use route::{Hijack, Rules};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// The body of every proxy answer.
pub type Body = BoxBody<Bytes, BoxError>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Connections the proxy serves at once, and from one address.
const MAX_CONNECTIONS: usize = 4096;
const MAX_CONNECTIONS_PER_IP: usize = 1024;
/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TLS handshake of an intercepted tunnel may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("{0}")]
    Route(#[from] route::RouteError),
    #[error("proxy CA: {0}")]
    Mitm(#[from] mitm::MitmError),
    #[error("{key}: {reason}")]
    Config { key: &'static str, reason: String },
}

/// Why one request failed at the proxy itself (not at the origin: an origin's answer is
/// passed back as it is). The client reads the message; `X-Dragonfly-Error-Type` names the
/// kind.
#[derive(Debug)]
pub(crate) enum Failure {
    BadRequest(String),
    ProxyAuthRequired,
    Denied(String),
    RateLimited,
    Upstream(String),
    Timeout(String),
    Internal(String),
}

impl Failure {
    fn response(&self) -> Response<Body> {
        let (status, kind, message) = match self {
            Failure::BadRequest(m) => (StatusCode::BAD_REQUEST, "invalid-request", m.as_str()),
            Failure::ProxyAuthRequired => (
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                "proxy-auth",
                "proxy authentication required (Proxy-Authorization: Basic)",
            ),
            Failure::Denied(m) => (StatusCode::FORBIDDEN, "denied", m.as_str()),
            Failure::RateLimited => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "too many requests (proxy.server.requestRateLimit)",
            ),
            Failure::Upstream(m) => (StatusCode::BAD_GATEWAY, "backend", m.as_str()),
            Failure::Timeout(m) => (StatusCode::GATEWAY_TIMEOUT, "timeout", m.as_str()),
            Failure::Internal(m) => (StatusCode::INTERNAL_SERVER_ERROR, "internal", m.as_str()),
        };
        let mut response = Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(headers::ERROR_TYPE, kind);
        if matches!(self, Failure::ProxyAuthRequired) {
            response = response.header(
                http::header::PROXY_AUTHENTICATE,
                "Basic realm=\"dragonfly\"",
            );
        }
        response
            .body(full(format!("dfdaemon proxy: {message}\n")))
            .expect("valid response")
    }
}

pub(crate) fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed()
}

pub(crate) fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// An intercepted CONNECT tunnel: requests inside it are for `https://<authority>`.
#[derive(Debug, Clone)]
struct Tunnel {
    authority: String,
    insecure: bool,
}

/// The proxy: routing, interception, and the clients it forwards with.
pub struct Proxy {
    config: Arc<Config>,
    manager: Arc<TaskManager>,
    metrics: Arc<Metrics>,
    rules: Rules,
    hijack: Hijack,
    mitm: Option<mitm::Mitm>,
    forward: forward::Forwarder,
    limiter: d7y_net::ConnLimiter,
    rate: leaky_bucket::RateLimiter,
    /// `proxy.registryMirror.cert` (DER), trusted for origins besides the public roots,
    /// also by the seed peers that fetch a task (`Download.certificate_chain`).
    registry_roots: Vec<Vec<u8>>,
}

impl Proxy {
    /// Builds the proxy from `proxy.*`; bad rules, a bad CA or unreadable certificates stop
    /// start-up with the key named.
    pub fn new(
        config: Arc<Config>,
        manager: Arc<TaskManager>,
        metrics: Arc<Metrics>,
    ) -> Result<Proxy, ProxyError> {
        let proxy = &config.proxy;
        let rules = Rules::compile(proxy.rules.as_deref())?;
        let hijack = Hijack::compile(&proxy.hijack_https.hosts)?;
        let mitm = if hijack.is_empty() {
            None
        } else {
            Some(match (&proxy.server.ca_cert, &proxy.server.ca_key) {
                (Some(cert), Some(key)) => mitm::Mitm::load(cert, key)?,
                _ => {
                    let (mitm, generated) =
                        mitm::Mitm::load_or_generate(&config.storage.dir.join("proxy-ca"))?;
                    let path = mitm.ca_path.display();
                    if generated {
                        info!(ca = %path, "generated the proxy's interception CA");
                    }
                    info!(
                        "intercepted HTTPS is signed by {path}; trust it on this host with: \
                         cp {path} /usr/local/share/ca-certificates/dragonfly-proxy.crt && update-ca-certificates \
                         (or pass it to the client, e.g. skopeo --src-cert-dir, SSL_CERT_FILE)"
                    );
                    mitm
                }
            })
        };
        let registry_pem = match &proxy.registry_mirror.cert {
            Some(path) => std::fs::read(path).map_err(|e| ProxyError::Config {
                key: "proxy.registryMirror.cert",
                reason: format!("cannot read {}: {e}", path.display()),
            })?,
            None => Vec::new(),
        };
        let registry_roots = pem_to_der(&registry_pem).map_err(|reason| ProxyError::Config {
            key: "proxy.registryMirror.cert",
            reason,
        })?;
        let policy = Arc::new(TargetPolicy::new(
            config.backend.allowed_schemes.clone(),
            config.backend.denied_networks.clone(),
        ));
        let forward = forward::Forwarder::new(
            policy,
            config.backend.read_timeout,
            if registry_pem.is_empty() {
                vec![]
            } else {
                vec![registry_pem]
            },
        )
        .map_err(|e| ProxyError::Config {
            key: "proxy",
            reason: e.to_string(),
        })?;
        let per_second = proxy.server.request_rate_limit.max(1) as usize;
        let rate = leaky_bucket::RateLimiter::builder()
            .max(per_second)
            .initial(per_second)
            .refill(per_second.div_ceil(10))
            .interval(Duration::from_millis(100))
            .build();
        Ok(Proxy {
            rules,
            hijack,
            mitm,
            forward,
            limiter: d7y_net::ConnLimiter::new(d7y_net::ConnLimits {
                max_connections: MAX_CONNECTIONS,
                max_per_ip: MAX_CONNECTIONS_PER_IP,
            }),
            rate,
            registry_roots,
            config,
            manager,
            metrics,
        })
    }

    /// Where the interception CA is, when HTTPS is intercepted.
    pub fn ca_path(&self) -> Option<&std::path::Path> {
        self.mitm.as_ref().map(|m| m.ca_path.as_path())
    }

    /// Serves connections until the listener fails.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    warn!(%err, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let slot = match self.limiter.admit(peer.ip()) {
                Ok(slot) => slot,
                Err(reason) => {
                    debug!(%peer, reason, "proxy connection refused");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let proxy = self.clone();
            tokio::spawn(async move {
                let _slot = slot;
                proxy.serve_connection(stream, peer, None).await;
            });
        }
    }

    async fn serve_connection<IO>(self: Arc<Self>, io: IO, peer: SocketAddr, tunnel: Option<Tunnel>)
    where
        IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.clone();
        let service = hyper::service::service_fn(move |request| {
            let proxy = proxy.clone();
            let tunnel = tunnel.clone();
            async move { Ok::<_, Infallible>(proxy.handle(request, peer, tunnel).await) }
        });
        let result = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .keep_alive(true)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades()
            .await;
        if let Err(err) = result {
            debug!(%peer, %err, "proxy connection ended with an error");
        }
    }

    /// Answers one request. Boxed: a CONNECT it answers serves a tunnel with this handler
    /// (the recursion needs a named future type).
    fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        tunnel: Option<Tunnel>,
    ) -> futures_util::future::BoxFuture<'static, Response<Body>> {
        Box::pin(async move { self.handle_inner(request, peer, tunnel).await })
    }

    async fn handle_inner(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        tunnel: Option<Tunnel>,
    ) -> Response<Body> {
        self.metrics.proxy_request_total.inc();
        let method = request.method().clone();
        let uri = request.uri().clone();
        match self.route(request, peer, tunnel).await {
            Ok(response) => {
                if response.status().is_server_error() {
                    self.metrics.proxy_request_failure_total.inc();
                }
                response
            }
            Err(failure) => {
                self.metrics.proxy_request_failure_total.inc();
                if matches!(failure, Failure::RateLimited) {
                    self.metrics.proxy_request_rate_limited_total.inc();
                }
                info!(%peer, %method, %uri, ?failure, "proxy request failed");
                failure.response()
            }
        }
    }

    async fn route(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
        tunnel: Option<Tunnel>,
    ) -> Result<Response<Body>, Failure> {
        // Inside an intercepted tunnel the CONNECT was already admitted.
        if tunnel.is_none() {
            if let Some(auth) = &self.config.proxy.server.basic_auth {
                if !headers::basic_auth_ok(request.headers(), &auth.username, &auth.password) {
                    return Err(Failure::ProxyAuthRequired);
                }
            }
        }
        if !self.rate.try_acquire(1) {
            return Err(Failure::RateLimited);
        }
        if request.method() == Method::CONNECT {
            return self.connect(request, peer).await;
        }
        let control = Control::from_headers(request.headers()).map_err(Failure::BadRequest)?;
        let url = self.target_url(&request, &control, tunnel.as_ref())?;
        let insecure = tunnel.as_ref().is_some_and(|t| t.insecure);
        let rule = self.rules.find(url.as_str());
        let through_swarm =
            request.method() == Method::GET && control.use_p2p.unwrap_or(rule.is_some());
        if request.method() == Method::HEAD && control.use_p2p.unwrap_or(rule.is_some()) {
            return self
                .forward
                .head_resolved(request, url, insecure, &self.metrics)
                .await;
        }
        if through_swarm {
            let range = match request.headers().get(http::header::RANGE) {
                None => None,
                Some(value) => match value.to_str().ok().map(range::parse) {
                    Some(Ok(range::RangeRequest::Multi)) => {
                        // The origin builds multipart answers.
                        return self
                            .forward
                            .forward(request, url, insecure, &self.metrics)
                            .await;
                    }
                    Some(Ok(r)) => Some(r),
                    // A range we do not understand is ignored (RFC 9110 §14.2): 200.
                    _ => None,
                },
            };
            let target = match rule {
                Some(rule) => rule
                    .target(&url)
                    .map_err(|e| Failure::BadRequest(e.to_string()))?,
                None => url.clone(),
            };
            let filtered = control.filtered_query_params.clone().or_else(|| {
                rule.map(|r| r.filtered_query_params.clone())
                    .filter(|f| !f.is_empty())
            });
            return p2p::serve(
                self,
                request,
                p2p::Target {
                    url: target,
                    filtered_query_params: filtered.unwrap_or_default(),
                    insecure,
                },
                control,
                range,
                peer,
            )
            .await;
        }
        self.forward
            .forward(request, url, insecure, &self.metrics)
            .await
    }

    /// The absolute URL a request is for.
    fn target_url(
        &self,
        request: &Request<Incoming>,
        control: &Control,
        tunnel: Option<&Tunnel>,
    ) -> Result<url::Url, Failure> {
        let uri = request.uri();
        let path_and_query = uri.path_and_query().map_or("/", |p| p.as_str());
        let bad = |what: String| Failure::BadRequest(what);
        if let Some(tunnel) = tunnel {
            let authority = tunnel
                .authority
                .strip_suffix(":443")
                .unwrap_or(&tunnel.authority);
            return url::Url::parse(&format!("https://{authority}{path_and_query}"))
                .map_err(|e| bad(format!("request target {path_and_query:?}: {e}")));
        }
        if uri.scheme().is_some() && uri.authority().is_some() {
            return url::Url::parse(&uri.to_string())
                .map_err(|e| bad(format!("request target {uri}: {e}")));
        }
        // A registry-mirror request: a path for the registry the client names.
        let registry = route::mirror_registry(
            control.registry.as_deref(),
            route::ns_param(path_and_query).as_deref(),
            &self.config.proxy.registry_mirror.addr,
        )
        .map_err(|e| bad(e.to_string()))?;
        route::mirror_url(&registry, path_and_query).map_err(|e| bad(e.to_string()))
    }

    /// A CONNECT: intercepted when `proxy.hijackHTTPS` names the target, else a tunnel.
    async fn connect(
        self: &Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Failure> {
        let authority = request
            .uri()
            .authority()
            .filter(|a| a.port_u16().is_some())
            .ok_or_else(|| Failure::BadRequest("CONNECT needs host:port".into()))?
            .clone();
        let intercept = self
            .mitm
            .as_ref()
            .and_then(|m| Some((m, self.hijack.find(authority.as_str())?)));
        if let Some((mitm, intercept)) = intercept {
            let acceptor = mitm
                .acceptor(authority.host())
                .map_err(|e| Failure::Internal(e.to_string()))?;
            let proxy = self.clone();
            let tunnel = Tunnel {
                authority: authority.to_string(),
                insecure: intercept.insecure,
            };
            tokio::spawn(async move {
                let upgraded = match hyper::upgrade::on(request).await {
                    Ok(u) => u,
                    Err(err) => return debug!(%peer, %err, "CONNECT upgrade failed"),
                };
                let tls = tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    acceptor.accept(TokioIo::new(upgraded)),
                )
                .await;
                match tls {
                    Ok(Ok(stream)) => proxy.serve_connection(stream, peer, Some(tunnel)).await,
                    Ok(Err(err)) => info!(
                        %peer,
                        authority = tunnel.authority,
                        %err,
                        "intercepted TLS handshake failed; does the client trust the proxy CA?"
                    ),
                    Err(_) => debug!(%peer, "intercepted TLS handshake timed out"),
                }
            });
            return Ok(Response::new(empty()));
        }
        let upstream = self.forward.tunnel_to(&authority).await?;
        tokio::spawn(async move {
            let upgraded = match hyper::upgrade::on(request).await {
                Ok(u) => u,
                Err(err) => return debug!(%peer, %err, "CONNECT upgrade failed"),
            };
            let mut client = TokioIo::new(upgraded);
            let mut upstream = upstream;
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
        Ok(Response::new(empty()))
    }
}

/// Certificates of a PEM bundle as DER.
fn pem_to_der(pem: &[u8]) -> Result<Vec<Vec<u8>>, String> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem)
        .map(|c| c.map(|c| c.to_vec()).map_err(|e| e.to_string()))
        .collect()
}
