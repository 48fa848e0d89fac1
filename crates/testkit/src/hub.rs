//! A Hugging Face Hub on 127.0.0.1 that speaks the API paths the hub backend and the
//! `huggingface_hub` client use: model info with siblings
//! (`/api/models/<repo>/revision/<rev>`), `resolve/<rev>/<path>` answering small files
//! itself and LFS files with a 302 to a CDN on another port (a fresh signature each time,
//! as the real hub does), and gated repos (401 without a token, 403 with a wrong one). The
//! CDN counts the body bytes it sends. The same repos answer ModelScope's paths
//! (`/api/v1/models/<repo>/repo/files`, `/api/v1/models/<repo>/repo?FilePath=`).

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use sha2::Digest as _;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Files at least this large are LFS files (served by the CDN).
pub const LFS_THRESHOLD: usize = 64 * 1024;
/// The commit every repo is at.
pub const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Default)]
struct Repo {
    files: Vec<(String, Bytes)>,
    /// The token a gated repo needs.
    token: Option<String>,
}

struct Shared {
    repos: Mutex<HashMap<String, Repo>>,
    blobs: Mutex<HashMap<String, Bytes>>,
    cdn: Mutex<String>,
    signatures: AtomicU64,
    cdn_bytes: AtomicU64,
    /// CDN requests that carried an `Authorization` header (a token that left the hub).
    cdn_authorized: AtomicU64,
    api_requests: AtomicU64,
}

/// The hub and its CDN; stopped when dropped.
pub struct FakeHub {
    pub addr: SocketAddr,
    pub cdn_addr: SocketAddr,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

impl FakeHub {
    pub fn start() -> FakeHub {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("hub runtime");
        let shared = Arc::new(Shared {
            repos: Mutex::default(),
            blobs: Mutex::default(),
            cdn: Mutex::default(),
            signatures: AtomicU64::new(0),
            cdn_bytes: AtomicU64::new(0),
            cdn_authorized: AtomicU64::new(0),
            api_requests: AtomicU64::new(0),
        });
        let hub = axum::Router::new()
            .route("/api/models/{owner}/{name}/revision/{rev}", get(model_info))
            .route("/api/models/{owner}/{name}", get(model_info_main))
            .route("/api/models/{owner}/{name}/tree/{rev}", get(tree))
            .route(
                "/{owner}/{name}/resolve/{rev}/{*path}",
                get(resolve).head(resolve),
            )
            // ModelScope's paths, for the same repos.
            .route("/api/v1/models/{owner}/{name}/repo/files", get(ms_files))
            .route("/api/v1/models/{owner}/{name}/repo", get(ms_file))
            .with_state(shared.clone());
        let cdn = axum::Router::new()
            .route("/blobs/{hash}", get(cdn_blob).head(cdn_blob))
            .with_state(shared.clone());
        let bind = |r: &tokio::runtime::Runtime| {
            r.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
                .expect("bind hub")
        };
        let (hub_listener, cdn_listener) = (bind(&runtime), bind(&runtime));
        let addr = hub_listener.local_addr().expect("addr");
        let cdn_addr = cdn_listener.local_addr().expect("addr");
        *shared.cdn.lock().unwrap() = format!("http://{cdn_addr}");
        runtime.spawn(async move { axum::serve(hub_listener, hub).await });
        runtime.spawn(async move { axum::serve(cdn_listener, cdn).await });
        FakeHub {
            addr,
            cdn_addr,
            shared,
            _runtime: runtime,
        }
    }

    /// `http://127.0.0.1:<port>`, the hub's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Publishes a model repo `owner/name` with `files`; `token` makes it gated.
    pub fn add_repo(&self, repo: &str, files: Vec<(String, Vec<u8>)>, token: Option<&str>) {
        let mut blobs = self.shared.blobs.lock().unwrap();
        let files: Vec<(String, Bytes)> = files
            .into_iter()
            .map(|(name, data)| {
                let data = Bytes::from(data);
                if data.len() >= LFS_THRESHOLD {
                    blobs.insert(hex::encode(sha2::Sha256::digest(&data)), data.clone());
                }
                (name, data)
            })
            .collect();
        self.shared.repos.lock().unwrap().insert(
            repo.to_string(),
            Repo {
                files,
                token: token.map(str::to_string),
            },
        );
    }

    /// Body bytes the CDN sent (LFS files).
    pub fn cdn_bytes(&self) -> u64 {
        self.shared.cdn_bytes.load(Ordering::Relaxed)
    }

    /// CDN requests that carried a token.
    pub fn cdn_authorized(&self) -> u64 {
        self.shared.cdn_authorized.load(Ordering::Relaxed)
    }

    pub fn api_requests(&self) -> u64 {
        self.shared.api_requests.load(Ordering::Relaxed)
    }
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

fn json_error(status: StatusCode, message: &str) -> Response {
    (
        status,
        [
            ("content-type", "application/json"),
            ("x-error-message", message),
        ],
        format!("{{\"error\":\"{message}\"}}"),
    )
        .into_response()
}

/// 401 / 403 for a gated repo without the right token.
fn gate(repo: &Repo, headers: &HeaderMap) -> Option<Response> {
    let need = repo.token.as_ref()?;
    match bearer(headers) {
        None => Some(json_error(
            StatusCode::UNAUTHORIZED,
            "Access to this repo is restricted: you must be authenticated",
        )),
        Some(t) if &t != need => Some(json_error(
            StatusCode::FORBIDDEN,
            "Access to this repo is restricted and you are not in the authorized list",
        )),
        Some(_) => None,
    }
}

async fn model_info_main(
    state: State<Arc<Shared>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    model_info(
        state,
        Path((owner, name, "main".into())),
        Query(HashMap::new()),
        headers,
    )
    .await
}

async fn model_info(
    State(s): State<Arc<Shared>>,
    Path((owner, name, rev)): Path<(String, String, String)>,
    Query(_): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    s.api_requests.fetch_add(1, Ordering::Relaxed);
    let repo_id = format!("{owner}/{name}");
    let repos = s.repos.lock().unwrap();
    let Some(repo) = repos.get(&repo_id) else {
        return json_error(StatusCode::NOT_FOUND, "Repository not found");
    };
    if let Some(denied) = gate(repo, &headers) {
        return denied;
    }
    if rev != "main" && rev != COMMIT {
        return json_error(StatusCode::NOT_FOUND, "Revision not found");
    }
    let siblings: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(n, d)| {
            let mut s = serde_json::json!({"rfilename": n, "size": d.len()});
            if d.len() >= LFS_THRESHOLD {
                s["lfs"] = serde_json::json!({"size": d.len(), "sha256": hex::encode(sha2::Sha256::digest(d)), "pointerSize": 134});
            }
            s
        })
        .collect();
    axum::Json(serde_json::json!({
        "_id": "0000",
        "id": repo_id,
        "modelId": repo_id,
        "sha": COMMIT,
        "private": false,
        "gated": repo.token.is_some(),
        "disabled": false,
        "tags": [],
        "siblings": siblings,
        "lastModified": "2026-12-01T00:00:00.000Z",
    }))
    .into_response()
}

/// The file tree (`huggingface_hub`'s listing): every file, and the directories above them.
async fn tree(
    State(s): State<Arc<Shared>>,
    Path((owner, name, rev)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    s.api_requests.fetch_add(1, Ordering::Relaxed);
    let repos = s.repos.lock().unwrap();
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
        return json_error(StatusCode::NOT_FOUND, "Repository not found");
    };
    if let Some(denied) = gate(repo, &headers) {
        return denied;
    }
    if rev != "main" && rev != COMMIT {
        return json_error(StatusCode::NOT_FOUND, "Revision not found");
    }
    let mut entries = Vec::new();
    let mut dirs = std::collections::BTreeSet::new();
    for (n, d) in &repo.files {
        let mut parts: Vec<&str> = n.split('/').collect();
        parts.pop();
        for i in 1..=parts.len() {
            dirs.insert(parts[..i].join("/"));
        }
        let oid = hex::encode(sha2::Sha256::digest(d));
        let mut e =
            serde_json::json!({"type": "file", "oid": &oid[..40], "size": d.len(), "path": n});
        if d.len() >= LFS_THRESHOLD {
            e["lfs"] = serde_json::json!({"oid": oid, "size": d.len(), "pointerSize": 134});
        }
        entries.push(e);
    }
    for d in dirs {
        entries.push(
            serde_json::json!({"type": "directory", "oid": "0".repeat(40), "size": 0, "path": d}),
        );
    }
    axum::Json(serde_json::Value::Array(entries)).into_response()
}

async fn resolve(
    State(s): State<Arc<Shared>>,
    Path((owner, name, rev, path)): Path<(String, String, String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let repos = s.repos.lock().unwrap();
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
        return json_error(StatusCode::NOT_FOUND, "Repository not found");
    };
    if let Some(denied) = gate(repo, &headers) {
        return denied;
    }
    if rev != "main" && rev != COMMIT {
        return json_error(StatusCode::NOT_FOUND, "Revision not found");
    }
    let Some((_, data)) = repo.files.iter().find(|(n, _)| *n == path) else {
        return json_error(StatusCode::NOT_FOUND, "Entry not found");
    };
    if data.len() >= LFS_THRESHOLD {
        let hash = hex::encode(sha2::Sha256::digest(data));
        let sig = s.signatures.fetch_add(1, Ordering::Relaxed);
        let location = format!(
            "{}/blobs/{hash}?X-Amz-Signature=sig{sig}&Expires={sig}",
            s.cdn.lock().unwrap()
        );
        return (
            StatusCode::FOUND,
            [
                ("location", location),
                ("x-repo-commit", COMMIT.to_string()),
                ("x-linked-size", data.len().to_string()),
                ("x-linked-etag", format!("\"{hash}\"")),
                ("etag", format!("\"{hash}\"")),
                ("content-length", "0".to_string()),
            ],
        )
            .into_response();
    }
    let etag = format!("\"{}\"", &hex::encode(sha2::Sha256::digest(data))[..40]);
    let headers = [
        ("x-repo-commit", COMMIT.to_string()),
        ("etag", etag),
        ("content-type", "application/octet-stream".to_string()),
    ];
    if method == Method::HEAD {
        return (
            StatusCode::OK,
            [("content-length", data.len().to_string())],
            headers,
        )
            .into_response();
    }
    (StatusCode::OK, headers, data.clone()).into_response()
}

async fn ms_files(
    State(s): State<Arc<Shared>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    s.api_requests.fetch_add(1, Ordering::Relaxed);
    let repos = s.repos.lock().unwrap();
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
        return json_error(StatusCode::NOT_FOUND, "model not found");
    };
    if let Some(denied) = gate(repo, &headers) {
        return denied;
    }
    let files: Vec<serde_json::Value> = repo
        .files
        .iter()
        .map(|(n, d)| serde_json::json!({"Name": n.rsplit('/').next().unwrap_or(n), "Path": n, "Size": d.len(), "Type": "blob"}))
        .collect();
    axum::Json(serde_json::json!({"Code": 200, "Data": {"Files": files}, "Success": true}))
        .into_response()
}

async fn ms_file(
    State(s): State<Arc<Shared>>,
    Path((owner, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let repos = s.repos.lock().unwrap();
    let Some(repo) = repos.get(&format!("{owner}/{name}")) else {
        return json_error(StatusCode::NOT_FOUND, "model not found");
    };
    if let Some(denied) = gate(repo, &headers) {
        return denied;
    }
    let path = q.get("FilePath").cloned().unwrap_or_default();
    match repo.files.iter().find(|(n, _)| *n == path) {
        Some((_, data)) => (
            StatusCode::OK,
            [("content-type", "application/octet-stream")],
            data.clone(),
        )
            .into_response(),
        None => json_error(StatusCode::NOT_FOUND, "file not found"),
    }
}

async fn cdn_blob(
    State(s): State<Arc<Shared>>,
    Path(hash): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    if headers.contains_key("authorization") {
        s.cdn_authorized.fetch_add(1, Ordering::Relaxed);
    }
    let Some(data) = s.blobs.lock().unwrap().get(&hash).cloned() else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let total = data.len();
    let range = headers
        .get("range")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| {
            let (a, b) = v.split_once('-')?;
            let start: usize = a.parse().ok()?;
            let end: usize = if b.is_empty() {
                total.checked_sub(1)?
            } else {
                b.parse().ok()?
            };
            (start <= end && start < total).then_some((start, end.min(total - 1)))
        });
    let (status, body, extra) = match range {
        Some((a, b)) => (
            StatusCode::PARTIAL_CONTENT,
            data.slice(a..=b),
            Some(format!("bytes {a}-{b}/{total}")),
        ),
        None => (StatusCode::OK, data, None),
    };
    let mut response = if method == Method::HEAD {
        (status, [("content-length", body.len().to_string())]).into_response()
    } else {
        s.cdn_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
        (status, body).into_response()
    };
    let h = response.headers_mut();
    h.insert("accept-ranges", "bytes".parse().unwrap());
    h.insert("etag", format!("\"{hash}\"").parse().unwrap());
    if let Some(cr) = extra {
        h.insert("content-range", cr.parse().unwrap());
    }
    response
}
