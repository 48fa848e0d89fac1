//! A `GET` through the swarm: the origin is asked first whether this client may have the
//! content (a `HEAD` with the client's credentials, so a cached task is never handed to a
//! client the origin would refuse), then the task is joined or started and its bytes are
//! streamed to the client as its pieces are recorded ([`crate::task::stream_range`]).
//!
//! What the client sees: the origin's status when the origin refuses (401 with its
//! challenge, 404, ...), else 200 or 206 with the origin's content headers, the exact bytes
//! asked for, and `X-Dragonfly-Task-ID`. A download that fails after the head was sent
//! (a digest mismatch, say) cuts the body before its end.

use super::range::{self, RangeRequest, Resolved};
use super::{empty, forward, headers, Body, BoxError, Failure, Proxy};
use crate::error::TaskError;
use crate::task::TaskRun;
use dragonfly_api::common::v2::{Download, TaskType};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

/// dfget's default priority: normal peers may trigger the seed peer.
const DEFAULT_PRIORITY: i32 = 6;
/// Chunks buffered per response (each at most `proxy.readBufferSize`).
const CHUNKS_IN_FLIGHT: usize = 4;

/// What the swarm fetches for a request.
pub(super) struct Target {
    pub url: url::Url,
    pub filtered_query_params: Vec<String>,
    pub insecure: bool,
}

/// What the origin said to the authorization check.
enum Check {
    /// May proceed; the origin's headers when it answered 2xx.
    Allowed(Option<HeaderMap>),
    /// The client's copy is current: the origin's 304.
    NotModified(HeaderMap),
    /// Refused (401, 404, ...): the client gets the origin's own answer, body included.
    Refused,
}

pub(super) async fn serve(
    proxy: &Arc<Proxy>,
    request: Request<Incoming>,
    target: Target,
    control: headers::Control,
    range: Option<RangeRequest>,
    peer: SocketAddr,
) -> Result<Response<Body>, Failure> {
    proxy.metrics.proxy_request_via_dfdaemon_total.inc();
    let client_headers = request.headers().clone();
    let task_headers = headers::task_request(&client_headers);
    let origin_headers = match authorize(proxy, &target, &client_headers, &task_headers).await? {
        Check::Allowed(h) => h,
        Check::NotModified(h) => return Ok(bodiless(StatusCode::NOT_MODIFIED, h)),
        Check::Refused => return passthrough_get(proxy, &target, &client_headers).await,
    };

    let download = download_for(proxy, &target, &control, task_headers, peer);
    let manager = &proxy.manager;
    let plan = manager
        .plan(&download)
        .map_err(|e| Failure::BadRequest(e.to_string()))?;
    let cached = manager.running_run(&plan.task_id).is_none()
        && manager
            .storage()
            .task(&plan.task_id)
            .await
            .ok()
            .flatten()
            .is_some_and(|t| t.is_finished());
    let run = manager.start(&plan).await.map_err(|e| task_failure(&e))?;
    let state = match started(&run, proxy.config.download.piece_timeout).await {
        Ok(state) => state,
        Err(Some(err)) => return failed_to_start(proxy, &target, &client_headers, &err).await,
        Err(None) => {
            return Err(Failure::Timeout(format!(
                "{} did not start within download.pieceTimeout",
                target.url
            )))
        }
    };
    let length = state.content_length.unwrap_or_default();
    let announced = origin_headers
        .as_ref()
        .and_then(|h| h.get(http::header::CONTENT_LENGTH))
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n != length) {
        // The task is not what the origin serves now (a changed file under the same URL):
        // the client gets the origin's bytes, not a stale copy.
        warn!(
            task_id = plan.task_id,
            url = %target.url,
            stored = length,
            origin = announced,
            "cached task differs from the origin; passing the request through"
        );
        return passthrough_get(proxy, &target, &client_headers).await;
    }
    if cached {
        proxy
            .metrics
            .proxy_request_via_dfdaemon_and_cache_hits_total
            .inc();
    }

    let described = match &origin_headers {
        Some(h) => headers::content_headers(
            &h.iter()
                .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_string())))
                .collect::<Vec<_>>(),
        ),
        None => headers::content_headers(&state.response_header),
    };
    let (status, response_headers, bytes) = match head(described, &plan.task_id, range, length) {
        Ok(head) => head,
        Err(unsatisfiable) => return Ok(unsatisfiable),
    };
    let body = stream_body(proxy, run, &plan.task_id, &target, bytes);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = response_headers;
    Ok(response)
}

/// Asks the origin whether this client may have the content: a `HEAD` with the client's
/// credentials and conditionals, and the headers the download itself will send.
async fn authorize(
    proxy: &Arc<Proxy>,
    target: &Target,
    client_headers: &HeaderMap,
    task_headers: &[(String, String)],
) -> Result<Check, Failure> {
    let mut head_headers = header_map(task_headers);
    head_headers.extend(headers::conditionals(client_headers));
    let answer = proxy
        .forward
        .send(Method::HEAD, &target.url, head_headers, target.insecure)
        .await?;
    let status = answer.status();
    Ok(if status.is_success() {
        Check::Allowed(Some(answer.headers().clone()))
    } else if status == StatusCode::NOT_MODIFIED {
        Check::NotModified(headers::forwarded_response(answer.headers()))
    } else if status.is_redirection()
        || status == StatusCode::METHOD_NOT_ALLOWED
        || status == StatusCode::NOT_IMPLEMENTED
    {
        // A redirect (to object storage) or an origin without HEAD: the download's own
        // requests carry the credentials.
        Check::Allowed(None)
    } else {
        Check::Refused
    })
}

/// The swarm download of a request.
fn download_for(
    proxy: &Proxy,
    target: &Target,
    control: &headers::Control,
    task_headers: Vec<(String, String)>,
    peer: SocketAddr,
) -> Download {
    Download {
        url: target.url.to_string(),
        r#type: TaskType::Standard as i32,
        tag: control.tag.clone(),
        application: control.application.clone(),
        priority: control.priority.unwrap_or(DEFAULT_PRIORITY),
        filtered_query_params: target.filtered_query_params.clone(),
        request_header: task_headers.into_iter().collect(),
        piece_length: control.piece_length,
        disable_back_to_source: proxy.config.proxy.disable_back_to_source,
        certificate_chain: proxy.registry_roots.clone(),
        remote_ip: Some(peer.ip().to_string()),
        enable_task_id_based_blob_digest: proxy
            .config
            .proxy
            .registry_mirror
            .enable_task_id_based_blob_digest,
        ..Default::default()
    }
}

/// The answer when the download failed before it knew its length.
async fn failed_to_start(
    proxy: &Arc<Proxy>,
    target: &Target,
    client_headers: &HeaderMap,
    err: &TaskError,
) -> Result<Response<Body>, Failure> {
    match err {
        // Never around an integrity or policy failure, nor when the daemon may not go to
        // the origin.
        TaskError::DigestMismatch { .. }
        | TaskError::LengthMismatch { .. }
        | TaskError::InvalidArgument(_)
        | TaskError::Backend(d7y_backend::BackendError::Denied { .. }) => Err(task_failure(err)),
        _ if proxy.config.proxy.disable_back_to_source => Err(task_failure(err)),
        // The origin refused the download's own request, or the swarm could not start it:
        // the client gets the origin's answer directly.
        other => {
            info!(url = %target.url, err = %other, "swarm download failed to start; passing the request through");
            passthrough_get(proxy, target, client_headers).await
        }
    }
}

/// Status, headers and byte range of the answer; a range outside the content is a 416
/// answered at once (the error is the whole answer, built once per request).
#[allow(clippy::result_large_err)]
fn head(
    mut map: HeaderMap,
    task_id: &str,
    range: Option<RangeRequest>,
    length: u64,
) -> Result<(StatusCode, HeaderMap, std::ops::Range<u64>), Response<Body>> {
    map.insert(
        headers::TASK_ID,
        HeaderValue::from_str(task_id).expect("hex task id"),
    );
    map.insert(
        http::header::ACCEPT_RANGES,
        HeaderValue::from_static("bytes"),
    );
    let (status, bytes) = match range.and_then(|r| r.resolve(length)) {
        None => (StatusCode::OK, 0..length),
        Some(Resolved::Bytes { start, end }) => {
            map.insert(
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&range::content_range(start, end, length))
                    .expect("ascii range"),
            );
            (StatusCode::PARTIAL_CONTENT, start..end)
        }
        Some(Resolved::Unsatisfiable) => {
            map.insert(
                http::header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{length}")).expect("ascii range"),
            );
            return Err(bodiless(StatusCode::RANGE_NOT_SATISFIABLE, map));
        }
    };
    map.insert(
        http::header::CONTENT_LENGTH,
        HeaderValue::from(bytes.end - bytes.start),
    );
    Ok((status, map, bytes))
}

/// The body: `bytes` of the task, streamed as its pieces are recorded.
fn stream_body(
    proxy: &Arc<Proxy>,
    run: Arc<TaskRun>,
    task_id: &str,
    target: &Target,
    bytes: std::ops::Range<u64>,
) -> Body {
    let (tx, rx) = tokio::sync::mpsc::channel(CHUNKS_IN_FLIGHT);
    let chunk = proxy.config.proxy.read_buffer_size;
    let task_id = task_id.to_string();
    let url = target.url.to_string();
    let counter = proxy.metrics.proxy_traffic.with_label_values(&["p2p"]);
    let manager = proxy.manager.clone();
    tokio::spawn(async move {
        match crate::task::stream_range(manager, run, bytes, chunk, tx).await {
            Ok(sent) => counter.inc_by(sent),
            Err(err) => info!(task_id, url, %err, "proxy response cut short"),
        }
    });
    let body = StreamBody::new(ReceiverStream::new(rx).map(|chunk| {
        chunk
            .map(Frame::data)
            .map_err(|e| -> BoxError { Box::new(e) })
    }));
    BodyExt::boxed(body)
}

fn bodiless(status: StatusCode, headers: HeaderMap) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Waits until the run knows its length, at most `limit`. `Err(Some)`: the run failed
/// first; `Err(None)`: it took too long.
async fn started(
    run: &Arc<TaskRun>,
    limit: std::time::Duration,
) -> Result<crate::task::RunState, Option<Arc<TaskError>>> {
    let mut rx = run.subscribe();
    let wait = async {
        loop {
            let state = rx.borrow_and_update().clone();
            if let Some(Err(err)) = &state.outcome {
                return Err(Some(err.clone()));
            }
            if state.started {
                return Ok(state);
            }
            if rx.changed().await.is_err() {
                return Err(None);
            }
        }
    };
    tokio::time::timeout(limit, wait).await.unwrap_or(Err(None))
}

/// A task error as the proxy's failure.
fn task_failure(err: &TaskError) -> Failure {
    match err {
        TaskError::InvalidArgument(m) => Failure::BadRequest(m.clone()),
        TaskError::Backend(d7y_backend::BackendError::Denied { .. }) => {
            Failure::Denied(err.to_string())
        }
        TaskError::PieceTimeout { .. } => Failure::Timeout(err.to_string()),
        TaskError::Storage(_) | TaskError::Internal(_) => Failure::Internal(err.to_string()),
        _ => Failure::Upstream(err.to_string()),
    }
}

/// The client's GET sent to the origin as it is (its body-less request rebuilt), and the
/// answer passed back.
async fn passthrough_get(
    proxy: &Arc<Proxy>,
    target: &Target,
    client_headers: &HeaderMap,
) -> Result<Response<Body>, Failure> {
    let response = proxy
        .forward
        .send(
            Method::GET,
            &target.url,
            headers::forwarded_request(client_headers),
            target.insecure,
        )
        .await?;
    Ok(forward::passback(response, &proxy.metrics))
}

fn header_map(pairs: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(n), Ok(v)) = (
            http::header::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            map.append(n, v);
        }
    }
    map
}
