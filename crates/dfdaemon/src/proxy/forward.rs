//! Requests that do not go through the swarm, passed to the origin and back untouched:
//! method, headers (all but hop-by-hop ones), body streamed both ways, status and headers
//! of the answer as the origin sent them (redirects and authentication challenges
//! included); and CONNECT tunnels. Every target obeys the back-to-source policy
//! (`backend.allowedSchemes`, `backend.deniedNetworks`).

use super::{headers, Body, BoxError, Failure};
use crate::metrics::Metrics;
use d7y_backend::{passthrough_client, PassthroughOptions, TargetPolicy};
use futures_util::TryStreamExt;
use http::{Request, Response};
use http_body_util::{BodyDataStream, BodyExt, StreamBody};
use hyper::body::{Body as _, Frame, Incoming};
use std::sync::Arc;
use std::time::Duration;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// The clients the proxy forwards with.
pub(crate) struct Forwarder {
    client: reqwest::Client,
    /// For intercepted hosts configured `insecure`.
    insecure: reqwest::Client,
    policy: Arc<TargetPolicy>,
}

impl Forwarder {
    pub fn new(
        policy: Arc<TargetPolicy>,
        read_timeout: Duration,
        extra_roots_pem: Vec<Vec<u8>>,
    ) -> Result<Forwarder, d7y_backend::BackendError> {
        let mut options = PassthroughOptions {
            connect_timeout: CONNECT_TIMEOUT,
            read_timeout,
            policy: policy.clone(),
            extra_roots_pem,
            insecure: false,
        };
        let client = passthrough_client(&options)?;
        options.insecure = true;
        let insecure = passthrough_client(&options)?;
        Ok(Forwarder {
            client,
            insecure,
            policy,
        })
    }

    fn check(&self, url: &url::Url) -> Result<(), Failure> {
        self.policy
            .check_url(url)
            .map_err(|e| Failure::Denied(e.to_string()))
    }

    fn client(&self, insecure: bool) -> &reqwest::Client {
        if insecure {
            &self.insecure
        } else {
            &self.client
        }
    }

    /// Sends `request` to `url` and passes the answer back.
    pub async fn forward(
        &self,
        request: Request<Incoming>,
        url: url::Url,
        insecure: bool,
        metrics: &Arc<Metrics>,
    ) -> Result<Response<Body>, Failure> {
        self.check(&url)?;
        let (parts, body) = request.into_parts();
        let mut outgoing = self
            .client(insecure)
            .request(parts.method.clone(), url.clone())
            .headers(headers::forwarded_request(&parts.headers));
        if !body.is_end_stream() {
            outgoing = outgoing.body(reqwest::Body::wrap_stream(BodyDataStream::new(body)));
        }
        let response = outgoing
            .send()
            .await
            .map_err(|e| upstream_failure(&url, &e))?;
        Ok(passback(response, metrics))
    }

    /// A `HEAD` of a URL the swarm serves: a redirect (object storage behind a registry, a
    /// hub's CDN) is followed here and answered `200` with the first answer's headers
    /// (without `Location`; the length from `X-Linked-Size`, or from the target), so the
    /// client's `GET` comes back to this proxy, and through the swarm, instead of going to
    /// the redirect target around it.
    pub async fn head_resolved(
        &self,
        request: Request<Incoming>,
        url: url::Url,
        insecure: bool,
        metrics: &Arc<Metrics>,
    ) -> Result<Response<Body>, Failure> {
        let response = self
            .forward(request, url.clone(), insecure, metrics)
            .await?;
        if !response.status().is_redirection() {
            return Ok(response);
        }
        let Some(location) = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|l| url.join(l).ok())
        else {
            return Ok(response);
        };
        let mut headers = response.headers().clone();
        headers.remove(http::header::LOCATION);
        let linked = headers
            .get("x-linked-size")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let length = match linked {
            Some(n) => Some(n),
            // The target's length (a redirect target is another origin: no credentials).
            None => match self
                .send(
                    http::Method::HEAD,
                    &location,
                    http::HeaderMap::new(),
                    insecure,
                )
                .await
            {
                Ok(r) if r.status().is_success() => r.content_length(),
                _ => None,
            },
        };
        match length {
            Some(n) => {
                headers.insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(n));
            }
            None => return Ok(response),
        }
        let mut out = Response::new(super::empty());
        *out.status_mut() = http::StatusCode::OK;
        *out.headers_mut() = headers;
        Ok(out)
    }

    /// Sends a request without a body (the swarm path's checks and fallbacks).
    pub async fn send(
        &self,
        method: http::Method,
        url: &url::Url,
        headers: http::HeaderMap,
        insecure: bool,
    ) -> Result<reqwest::Response, Failure> {
        self.check(url)?;
        self.client(insecure)
            .request(method, url.clone())
            .headers(headers)
            .send()
            .await
            .map_err(|e| upstream_failure(url, &e))
    }

    /// Opens the TCP connection of a CONNECT tunnel, to an address the policy allows.
    pub async fn tunnel_to(
        &self,
        authority: &http::uri::Authority,
    ) -> Result<tokio::net::TcpStream, Failure> {
        let target = format!("https://{authority}/");
        if let Ok(url) = url::Url::parse(&target) {
            self.check(&url)?;
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(443);
        let resolved: Vec<std::net::SocketAddr> =
            tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| Failure::Timeout(format!("resolving {authority} timed out")))?
                .map_err(|e| Failure::Upstream(format!("cannot resolve {authority}: {e}")))?
                .collect();
        let allowed: Vec<std::net::SocketAddr> = resolved
            .iter()
            .copied()
            .filter(|a| self.policy.denied_network(a.ip()).is_none())
            .collect();
        if allowed.is_empty() {
            return Err(Failure::Denied(format!(
                "{authority} resolves only to addresses backend.deniedNetworks denies"
            )));
        }
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(&allowed[..]),
        )
        .await
        .map_err(|_| Failure::Timeout(format!("connecting to {authority} timed out")))?
        .map_err(|e| Failure::Upstream(format!("cannot connect to {authority}: {e}")))
    }
}

fn upstream_failure(url: &url::Url, err: &reqwest::Error) -> Failure {
    let mut reason = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        source = s.source();
    }
    if err.is_timeout() {
        Failure::Timeout(format!("{url}: {reason}"))
    } else {
        Failure::Upstream(format!("cannot reach {url}: {reason}"))
    }
}

/// An origin's answer as the proxy's: status and headers (minus hop-by-hop ones) as sent,
/// the body streamed. A body cut short stays cut short (the connection is closed before
/// the announced length), never a clean end.
pub(crate) fn passback(response: reqwest::Response, metrics: &Arc<Metrics>) -> Response<Body> {
    let status = response.status();
    let headers = headers::forwarded_response(response.headers());
    let counter = metrics.proxy_traffic.with_label_values(&["direct"]);
    let stream = response
        .bytes_stream()
        .map_ok(move |chunk| {
            counter.inc_by(chunk.len() as u64);
            Frame::data(chunk)
        })
        .map_err(|e| -> BoxError { Box::new(e) });
    let mut out = Response::new(StreamBody::new(stream).boxed());
    *out.status_mut() = status;
    *out.headers_mut() = headers;
    out
}
