//! A small WebHDFS on 127.0.0.1 (no real HDFS installs here): a namenode answering
//! `GETFILESTATUS` and `LISTSTATUS`, and `OPEN` with a 307 to a datanode on another port,
//! which serves the bytes of the offset and length asked for. With a delegation token set,
//! every request must carry it (`delegation=`), else 401. The datanode counts the bytes
//! it sends.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

struct Shared {
    files: Mutex<BTreeMap<String, Bytes>>,
    token: Option<String>,
    datanode: Mutex<String>,
    served: AtomicU64,
}

/// The namenode and its datanode; stopped when dropped.
pub struct FakeWebHdfs {
    pub namenode: SocketAddr,
    shared: Arc<Shared>,
    _runtime: tokio::runtime::Runtime,
}

type Params = Query<HashMap<String, String>>;

fn remote_exception(status: StatusCode, exception: &str, message: &str) -> Response {
    (
        status,
        [("content-type", "application/json")],
        serde_json::json!({"RemoteException": {"exception": exception, "javaClassName": format!("java.io.{exception}"), "message": message}}).to_string(),
    )
        .into_response()
}

impl FakeWebHdfs {
    /// `token`: the delegation token every request must carry.
    pub fn start(token: Option<&str>) -> FakeWebHdfs {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("webhdfs runtime");
        let shared = Arc::new(Shared {
            files: Mutex::default(),
            token: token.map(str::to_string),
            datanode: Mutex::default(),
            served: AtomicU64::new(0),
        });
        let namenode = axum::Router::new()
            .route("/webhdfs/v1/{*path}", get(namenode_op))
            .route("/webhdfs/v1/", get(namenode_root))
            .with_state(shared.clone());
        let datanode = axum::Router::new()
            .route("/webhdfs/v1/{*path}", get(datanode_open))
            .with_state(shared.clone());
        let bind = |r: &tokio::runtime::Runtime| {
            r.block_on(tokio::net::TcpListener::bind(("127.0.0.1", 0)))
                .expect("bind")
        };
        let (nl, dl) = (bind(&runtime), bind(&runtime));
        let addr = nl.local_addr().expect("addr");
        *shared.datanode.lock().unwrap() = format!("http://{}", dl.local_addr().expect("addr"));
        runtime.spawn(async move { axum::serve(nl, namenode).await });
        runtime.spawn(async move { axum::serve(dl, datanode).await });
        FakeWebHdfs {
            namenode: addr,
            shared,
            _runtime: runtime,
        }
    }

    /// Puts a file at `/path`.
    pub fn put(&self, path: &str, data: Vec<u8>) {
        self.shared.files.lock().unwrap().insert(
            format!("/{}", path.trim_start_matches('/')),
            Bytes::from(data),
        );
    }

    /// `hdfs://127.0.0.1:<port>/<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("hdfs://{}/{}", self.namenode, path.trim_start_matches('/'))
    }

    /// Bytes the datanode sent.
    pub fn served(&self) -> u64 {
        self.shared.served.load(Ordering::Relaxed)
    }
}

fn authorized(s: &Shared, q: &HashMap<String, String>) -> bool {
    match &s.token {
        Some(t) => q.get("delegation") == Some(t),
        None => true,
    }
}

fn status_of(path: &str, files: &BTreeMap<String, Bytes>) -> Option<serde_json::Value> {
    if let Some(data) = files.get(path) {
        return Some(
            serde_json::json!({"pathSuffix": "", "type": "FILE", "length": data.len(), "modificationTime": 0, "permission": "644", "replication": 1, "blockSize": 134217728}),
        );
    }
    let dir = format!("{}/", path.trim_end_matches('/'));
    (path == "/" || files.keys().any(|k| k.starts_with(&dir)))
        .then(|| serde_json::json!({"pathSuffix": "", "type": "DIRECTORY", "length": 0, "modificationTime": 0, "permission": "755", "replication": 0, "blockSize": 0}))
}

async fn namenode_root(state: State<Arc<Shared>>, q: Params) -> Response {
    namenode_op(state, Path(String::new()), q).await
}

async fn namenode_op(
    State(s): State<Arc<Shared>>,
    Path(path): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&s, &q) {
        return remote_exception(
            StatusCode::UNAUTHORIZED,
            "SecurityException",
            "Failed to obtain user group information: a delegation token is required",
        );
    }
    let path = format!("/{}", path.trim_start_matches('/'));
    let path = if path.len() > 1 {
        path.trim_end_matches('/').to_string()
    } else {
        path
    };
    let files = s.files.lock().unwrap();
    match q.get("op").map(|o| o.to_ascii_uppercase()).as_deref() {
        Some("GETFILESTATUS") => match status_of(&path, &files) {
            Some(st) => axum::Json(serde_json::json!({"FileStatus": st})).into_response(),
            None => remote_exception(
                StatusCode::NOT_FOUND,
                "FileNotFoundException",
                &format!("File does not exist: {path}"),
            ),
        },
        Some("LISTSTATUS") => {
            let dir = if path == "/" {
                "/".to_string()
            } else {
                format!("{path}/")
            };
            let mut children: BTreeMap<String, serde_json::Value> = BTreeMap::new();
            for (k, data) in files.iter() {
                let Some(rest) = k.strip_prefix(&dir) else {
                    continue;
                };
                match rest.split_once('/') {
                    Some((d, _)) => {
                        children.entry(d.to_string()).or_insert_with(|| serde_json::json!({"pathSuffix": d, "type": "DIRECTORY", "length": 0, "modificationTime": 0}));
                    }
                    None => {
                        children.insert(rest.to_string(), serde_json::json!({"pathSuffix": rest, "type": "FILE", "length": data.len(), "modificationTime": 0}));
                    }
                }
            }
            if children.is_empty() && status_of(&path, &files).is_none() {
                return remote_exception(
                    StatusCode::NOT_FOUND,
                    "FileNotFoundException",
                    &format!("File {path} does not exist."),
                );
            }
            axum::Json(serde_json::json!({"FileStatuses": {"FileStatus": children.into_values().collect::<Vec<_>>()}})).into_response()
        }
        Some("OPEN") => {
            if !files.contains_key(&path) {
                return remote_exception(
                    StatusCode::NOT_FOUND,
                    "FileNotFoundException",
                    &format!("File does not exist: {path}"),
                );
            }
            let mut location = format!("{}/webhdfs/v1{path}?op=OPEN", s.datanode.lock().unwrap());
            for key in ["offset", "length", "delegation"] {
                if let Some(v) = q.get(key) {
                    location.push_str(&format!("&{key}={v}"));
                }
            }
            (StatusCode::TEMPORARY_REDIRECT, [("location", location)]).into_response()
        }
        _ => remote_exception(
            StatusCode::BAD_REQUEST,
            "IllegalArgumentException",
            "unsupported op",
        ),
    }
}

async fn datanode_open(
    State(s): State<Arc<Shared>>,
    Path(path): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if !authorized(&s, &q) {
        return remote_exception(
            StatusCode::UNAUTHORIZED,
            "SecurityException",
            "a delegation token is required",
        );
    }
    let path = format!("/{}", path.trim_start_matches('/'));
    let Some(data) = s.files.lock().unwrap().get(&path).cloned() else {
        return remote_exception(
            StatusCode::NOT_FOUND,
            "FileNotFoundException",
            &format!("File does not exist: {path}"),
        );
    };
    let offset: usize = q
        .get("offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
        .min(data.len());
    let length: usize = q
        .get("length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(data.len() - offset);
    let end = (offset + length).min(data.len());
    let body = data.slice(offset..end);
    s.served.fetch_add(body.len() as u64, Ordering::Relaxed);
    (
        StatusCode::OK,
        [("content-type", "application/octet-stream")],
        body,
    )
        .into_response()
}
