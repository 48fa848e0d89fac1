//! An instrumented HTTP origin on 127.0.0.1.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the origin behaves.
#[derive(Debug, Clone, Copy)]
pub struct OriginOptions {
    /// Honour `Range` requests (206); otherwise always answer 200 with the whole body.
    pub range: bool,
    /// Bytes per second per response, if throttled.
    pub rate: Option<u64>,
    /// Address to bind; 127.0.0.1 by default.
    pub ip: Option<std::net::IpAddr>,
}

impl Default for OriginOptions {
    fn default() -> Self {
        OriginOptions {
            range: true,
            rate: None,
            ip: None,
        }
    }
}

struct Shared {
    files: Mutex<HashMap<String, Bytes>>,
    /// `/v2/...` paths answered with a 307 to `/files/<name>` under a fresh signature.
    redirects: Mutex<HashMap<String, String>>,
    signatures: AtomicU64,
    options: OriginOptions,
    bytes_served: AtomicU64,
    requests: AtomicU64,
}

/// The origin; it stops when dropped.
pub struct Origin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

const CHUNK: usize = 64 * 1024;

impl Origin {
    pub fn start(options: OriginOptions) -> Origin {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("origin runtime");
        let shared = Arc::new(Shared {
            files: Mutex::default(),
            redirects: Mutex::default(),
            signatures: AtomicU64::new(0),
            options,
            bytes_served: AtomicU64::new(0),
            requests: AtomicU64::new(0),
        });
        let app = axum::Router::new()
            .route("/status/{code}", get(status))
            .route("/files/{name}", get(file))
            .route("/redirect/{name}", get(redirect))
            .route("/auth/{name}", get(auth_file))
            .route("/encoded/{name}", get(encoded_file))
            .route("/v2/{*rest}", get(registry_path))
            .with_state(shared.clone());
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind((
                options.ip.unwrap_or(std::net::IpAddr::from([127, 0, 0, 1])),
                0,
            )))
            .expect("bind origin");
        let addr = listener.local_addr().expect("origin addr");
        runtime.spawn(async move { axum::serve(listener, app).await });
        Origin {
            addr,
            shared,
            _runtime: runtime,
        }
    }

    /// Publishes `data` at `/files/<name>` and returns its URL.
    pub fn put(&self, name: &str, data: Vec<u8>) -> String {
        self.shared
            .files
            .lock()
            .unwrap()
            .insert(name.to_string(), Bytes::from(data));
        self.url(&format!("/files/{name}"))
    }

    /// Publishes `data` at `/<path>` under `/v2/` (a registry-like path such as
    /// `v2/<name>/blobs/sha256:<hex>`) and returns its URL.
    pub fn put_at(&self, path: &str, data: Vec<u8>) -> String {
        let path = path.trim_start_matches('/');
        assert!(
            path.starts_with("v2/"),
            "put_at serves paths under /v2/ only"
        );
        self.shared
            .files
            .lock()
            .unwrap()
            .insert(path.to_string(), Bytes::from(data));
        self.url(&format!("/{path}"))
    }

    /// Makes `/<path>` (under `/v2/`) answer with a 307 to `/files/<name>?X-Amz-Signature=<n>`,
    /// a new signature each time, as registries that keep blobs in object storage do.
    /// Returns the URL of `path`.
    pub fn redirect_at(&self, path: &str, name: &str) -> String {
        let path = path.trim_start_matches('/');
        assert!(
            path.starts_with("v2/"),
            "redirect_at serves paths under /v2/ only"
        );
        self.shared
            .redirects
            .lock()
            .unwrap()
            .insert(path.to_string(), name.to_string());
        self.url(&format!("/{path}"))
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Body bytes sent so far (counted as they leave).
    pub fn bytes_served(&self) -> u64 {
        self.shared.bytes_served.load(Ordering::SeqCst)
    }

    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    pub fn reset_counters(&self) {
        self.shared.bytes_served.store(0, Ordering::SeqCst);
        self.shared.requests.store(0, Ordering::SeqCst);
    }
}

/// A file published with [`Origin::put_at`].
async fn registry_path(
    state: State<Arc<Shared>>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> Response {
    let path = format!("v2/{rest}");
    let target = state.redirects.lock().unwrap().get(&path).cloned();
    if let Some(name) = target {
        let signature = state.signatures.fetch_add(1, Ordering::SeqCst);
        return Response::builder()
            .status(StatusCode::TEMPORARY_REDIRECT)
            .header(
                "location",
                format!("/files/{name}?X-Amz-Expires=60&X-Amz-Signature={signature:016x}"),
            )
            .body(Body::empty())
            .unwrap();
    }
    file(state, Path(path), headers).await
}

/// 302 to `/files/<name>`.
async fn redirect(Path(name): Path<String>) -> Response {
    Response::builder()
        .status(StatusCode::FOUND)
        .header("location", format!("/files/{name}"))
        .body(Body::empty())
        .unwrap()
}

/// `/files/<name>`, but only with the header `X-Token: secret` (else 401).
async fn auth_file(state: State<Arc<Shared>>, path: Path<String>, headers: HeaderMap) -> Response {
    if headers.get("x-token").and_then(|v| v.to_str().ok()) != Some("secret") {
        return StatusCode::UNAUTHORIZED.into_response();
    }
    file(state, path, headers).await
}

/// `/files/<name>` sent as stored with `Content-Encoding: gzip`, whatever the client
/// accepts (an origin that always compresses).
async fn encoded_file(
    state: State<Arc<Shared>>,
    path: Path<String>,
    headers: HeaderMap,
) -> Response {
    let mut response = file(state, path, headers).await;
    response.headers_mut().insert(
        "content-encoding",
        axum::http::HeaderValue::from_static("gzip"),
    );
    response
}

async fn status(Path(code): Path<u16>) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST)
}

fn parse_range(headers: &HeaderMap, len: u64) -> Option<Result<(u64, u64), ()>> {
    let value = headers.get("range")?.to_str().ok()?;
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.parse().ok()?;
    let end: u64 = if end.is_empty() {
        len.saturating_sub(1)
    } else {
        end.parse().ok()?
    };
    if start >= len || end < start {
        return Some(Err(()));
    }
    Some(Ok((start, end.min(len - 1))))
}

async fn file(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    shared.requests.fetch_add(1, Ordering::SeqCst);
    let Some(data) = shared.files.lock().unwrap().get(&name).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let len = data.len() as u64;
    let (status, slice, content_range) = match shared
        .options
        .range
        .then(|| parse_range(&headers, len))
        .flatten()
    {
        Some(Ok((start, end))) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(start as usize..=end as usize),
            Some(format!("bytes {start}-{end}/{len}")),
        ),
        Some(Err(())) => {
            return Response::builder()
                .status(StatusCode::RANGE_NOT_SATISFIABLE)
                .header("content-range", format!("bytes */{len}"))
                .body(Body::empty())
                .unwrap();
        }
        None => (StatusCode::OK, data, None),
    };
    let body_len = slice.len();
    let rate = shared.options.rate;
    let counter = shared.clone();
    let chunks = futures_util::stream::unfold(slice, move |mut rest| {
        let counter = counter.clone();
        async move {
            if rest.is_empty() {
                return None;
            }
            let chunk = rest.split_to(CHUNK.min(rest.len()));
            if let Some(rate) = rate {
                tokio::time::sleep(Duration::from_secs_f64(chunk.len() as f64 / rate as f64)).await;
            }
            counter
                .bytes_served
                .fetch_add(chunk.len() as u64, Ordering::SeqCst);
            Some((Ok::<_, std::io::Error>(chunk), rest))
        }
    });
    let mut builder = Response::builder()
        .status(status)
        .header("content-length", body_len.to_string())
        .header("content-type", "application/octet-stream")
        .header("etag", format!("\"{name}-{len}\""));
    if shared.options.range {
        builder = builder.header("accept-ranges", "bytes");
    }
    if let Some(range) = content_range {
        builder = builder.header("content-range", range);
    }
    builder.body(Body::from_stream(chunks)).unwrap()
}
