//! A job's request as upstream's API takes it (`{type, args, scheduler_cluster_ids}`), and
//! its arguments checked field by field (pure). Unknown fields are ignored, as upstream's
//! binding does, so Harbor's `concurrent_count` (a field upstream dropped) is accepted.

use super::targets::{Narrowing, Scope};
use crate::rest::resources::{field, FieldError};
use serde::{Deserialize, Deserializer};
use std::collections::HashMap;
use std::time::Duration;

pub const PREHEAT: &str = "preheat";
pub const GET_TASK: &str = "get_task";
pub const DELETE_TASK: &str = "delete_task";

const MIN_PIECE_LENGTH: u64 = 4 << 20;
const MAX_PIECE_LENGTH: u64 = 64 << 20;
const MAX_URLS: usize = 1000;
const MAX_HEADERS: usize = 64;
const MAX_TEXT: usize = 1024;

/// `POST /api/v1/jobs` and `/oapi/v1/jobs`.
#[derive(Debug, Deserialize)]
pub struct CreateJob {
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub bio: Option<String>,
    #[serde(default)]
    pub args: serde_json::Value,
    /// `null` (Harbor) or empty: every scheduler cluster.
    #[serde(default, deserialize_with = "null_as_default")]
    pub scheduler_cluster_ids: Vec<i64>,
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// A Go `time.Duration` as JSON: an integer of nanoseconds (what Harbor sends), or a
/// duration string (`30m`, `1h0m0s`).
fn go_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Nanos(i64),
        Text(String),
    }
    match Option::<Raw>::deserialize(d)? {
        None => Ok(None),
        Some(Raw::Nanos(n)) if n <= 0 => Ok(None),
        Some(Raw::Nanos(n)) => Ok(Some(Duration::from_nanos(n as u64))),
        Some(Raw::Text(t)) if t.is_empty() || t == "0" || t == "0s" => Ok(None),
        Some(Raw::Text(t)) => humantime::parse_duration(&t)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("{t:?} is not a duration: {e}"))),
    }
}

/// `args` of a preheat (upstream's PreheatArgs).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct PreheatArgs {
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub urls: Vec<String>,
    pub piece_length: Option<u64>,
    pub tag: String,
    pub application: String,
    /// `&`-separated, as upstream takes it; empty: the default list.
    pub filtered_query_params: String,
    #[serde(deserialize_with = "null_as_default")]
    pub headers: HashMap<String, String>,
    pub username: String,
    pub password: String,
    pub platform: String,
    pub scope: String,
    #[serde(deserialize_with = "null_as_default")]
    pub ips: Vec<String>,
    pub percentage: Option<u32>,
    pub count: Option<u32>,
    pub concurrent_task_count: Option<i64>,
    pub concurrent_peer_count: Option<i64>,
    #[serde(deserialize_with = "go_duration")]
    pub timeout: Option<Duration>,
    /// An OCI blob's task ID is its digest (as this project's proxy and dfget derive it);
    /// `false` derives it from the URL, as upstream's defaults do.
    pub enable_task_id_based_blob_digest: Option<bool>,
}

/// `args` of `get_task` and `delete_task` (upstream's GetTaskArgs / DeleteTaskArgs).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct TaskArgs {
    pub task_id: String,
    pub url: String,
    pub tag: String,
    pub application: String,
    pub filtered_query_params: String,
    pub piece_length: Option<u64>,
    pub content_for_calculating_task_id: Option<String>,
    #[serde(deserialize_with = "go_duration")]
    pub timeout: Option<Duration>,
    pub enable_task_id_based_blob_digest: Option<bool>,
}

/// A job's work, checked.
#[derive(Debug, Clone)]
pub enum Spec {
    Preheat(Preheat),
    GetTask(TaskQuery),
    DeleteTask(TaskQuery),
}

impl Spec {
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Spec::Preheat(p) => p.timeout,
            Spec::GetTask(t) | Spec::DeleteTask(t) => t.timeout,
        }
    }
}

/// What to preheat.
#[derive(Debug, Clone)]
pub struct Preheat {
    pub image: bool,
    /// The manifest URL (image) or the files' URLs.
    pub urls: Vec<String>,
    pub piece_length: Option<u64>,
    pub tag: String,
    pub application: String,
    pub filtered_query_params: Vec<String>,
    pub headers: HashMap<String, String>,
    pub username: String,
    pub password: String,
    pub platform: String,
    pub scope: Scope,
    pub narrowing: Narrowing,
    pub concurrent_task_count: usize,
    pub concurrent_peer_count: usize,
    pub timeout: Option<Duration>,
    pub blob_digest_task_id: bool,
}

/// Which task a get/delete job is about.
#[derive(Debug, Clone)]
pub struct TaskQuery {
    pub task_id: String,
    /// For the results (empty when only the ID was given).
    pub url: String,
    pub timeout: Option<Duration>,
}

fn text(name: &'static str, s: &str) -> Result<(), FieldError> {
    if s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(field(name, "must be at most 1024 printable characters"));
    }
    Ok(())
}

fn filtered(s: &str) -> Vec<String> {
    s.split('&')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect()
}

fn piece_length(p: Option<u64>) -> Result<Option<u64>, FieldError> {
    match p {
        Some(0) | None => Ok(None),
        Some(p) if (MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&p) => Ok(Some(p)),
        Some(_) => Err(field(
            "args.piece_length",
            "must be between 4194304 (4 MiB) and 67108864 (64 MiB)",
        )),
    }
}

fn url_ok(name: &'static str, u: &str) -> Result<(), FieldError> {
    if u.len() > 8192 || u.chars().any(char::is_control) {
        return Err(field(name, "must be at most 8192 printable characters"));
    }
    match url::Url::parse(u) {
        Ok(parsed) if parsed.has_host() => Ok(()),
        _ => Err(field(name, format!("{u:?} is not an absolute URL"))),
    }
}

/// Checks a job request; the field named in an error is the one to fix.
pub fn check(kind: &str, args: &serde_json::Value) -> Result<Spec, FieldError> {
    match kind {
        PREHEAT => {
            let a: PreheatArgs =
                serde_json::from_value(args.clone()).map_err(|e| field("args", e.to_string()))?;
            check_preheat(a).map(Spec::Preheat)
        }
        GET_TASK | DELETE_TASK => {
            let a: TaskArgs =
                serde_json::from_value(args.clone()).map_err(|e| field("args", e.to_string()))?;
            let q = check_task(a)?;
            Ok(if kind == GET_TASK {
                Spec::GetTask(q)
            } else {
                Spec::DeleteTask(q)
            })
        }
        "" => Err(field(
            "type",
            "is required: preheat, get_task or delete_task",
        )),
        other => Err(field(
            "type",
            format!("{other:?} is not a job type: preheat, get_task or delete_task"),
        )),
    }
}

fn check_preheat(a: PreheatArgs) -> Result<Preheat, FieldError> {
    let image = match a.kind.as_str() {
        "image" => true,
        "file" => false,
        "" => return Err(field("args.type", "is required: image or file")),
        other => {
            return Err(field(
                "args.type",
                format!("{other:?} is not image or file"),
            ))
        }
    };
    let urls = if image {
        if a.url.is_empty() {
            return Err(field("args.url", "is required: the image's manifest URL"));
        }
        super::image::ManifestUrl::parse(&a.url).map_err(|e| field("args.url", e.to_string()))?;
        vec![a.url.clone()]
    } else {
        let mut urls = a.urls.clone();
        if !a.url.is_empty() {
            urls.insert(0, a.url.clone());
        }
        if urls.is_empty() {
            return Err(field(
                "args.url",
                "is required (or args.urls): the files to preheat",
            ));
        }
        if urls.len() > MAX_URLS {
            return Err(field(
                "args.urls",
                format!("holds more than {MAX_URLS} URLs"),
            ));
        }
        for u in &urls {
            url_ok("args.urls", u)?;
        }
        urls.dedup();
        urls
    };
    text("args.tag", &a.tag)?;
    text("args.application", &a.application)?;
    text("args.filtered_query_params", &a.filtered_query_params)?;
    if a.headers.len() > MAX_HEADERS {
        return Err(field(
            "args.headers",
            format!("holds more than {MAX_HEADERS} headers"),
        ));
    }
    for (k, v) in &a.headers {
        if reqwest::header::HeaderName::from_bytes(k.as_bytes()).is_err()
            || reqwest::header::HeaderValue::from_str(v).is_err()
            || v.len() > 16 * 1024
        {
            return Err(field(
                "args.headers",
                format!("{k:?} is not a valid header"),
            ));
        }
    }
    let platform = if a.platform.is_empty() {
        "linux/amd64".to_string()
    } else {
        let parts: Vec<&str> = a.platform.split('/').collect();
        if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
            return Err(field(
                "args.platform",
                "must be os/arch or os/arch/variant, e.g. linux/amd64",
            ));
        }
        a.platform.clone()
    };
    let scope = Scope::parse(&a.scope).ok_or_else(|| {
        field(
            "args.scope",
            "must be single_seed_peer, all_seed_peers or all_peers",
        )
    })?;
    if a.ips.len() > 100 {
        return Err(field("args.ips", "holds more than 100 addresses"));
    }
    for ip in &a.ips {
        if ip.parse::<std::net::IpAddr>().is_err() {
            return Err(field("args.ips", format!("{ip:?} is not an IP address")));
        }
    }
    if let Some(p) = a.percentage {
        if !(1..=100).contains(&p) {
            return Err(field("args.percentage", "must be 1 to 100"));
        }
    }
    if let Some(c) = a.count {
        if !(1..=200).contains(&c) {
            return Err(field("args.count", "must be 1 to 200"));
        }
    }
    let bounded = |name: &'static str, v: Option<i64>, default: i64, max: i64| match v {
        None | Some(0) => Ok(default as usize),
        Some(v) if (1..=max).contains(&v) => Ok(v as usize),
        Some(_) => Err(field(name, format!("must be 1 to {max}"))),
    };
    Ok(Preheat {
        image,
        urls,
        piece_length: piece_length(a.piece_length)?,
        tag: a.tag,
        application: a.application,
        filtered_query_params: filtered(&a.filtered_query_params),
        headers: a.headers,
        username: a.username,
        password: a.password,
        platform,
        scope,
        narrowing: Narrowing {
            ips: a.ips,
            count: a.count,
            percentage: a.percentage,
        },
        concurrent_task_count: bounded(
            "args.concurrent_task_count",
            a.concurrent_task_count,
            8,
            100,
        )?,
        concurrent_peer_count: bounded(
            "args.concurrent_peer_count",
            a.concurrent_peer_count,
            500,
            1000,
        )?,
        timeout: a.timeout,
        blob_digest_task_id: a.enable_task_id_based_blob_digest.unwrap_or(true),
    })
}

fn check_task(a: TaskArgs) -> Result<TaskQuery, FieldError> {
    if !a.task_id.is_empty() {
        if !d7y_types::is_task_id(&a.task_id) {
            return Err(field("args.task_id", "must be 64 lowercase hex characters"));
        }
        return Ok(TaskQuery {
            task_id: a.task_id,
            url: a.url,
            timeout: a.timeout,
        });
    }
    if a.url.is_empty() {
        return Err(field("args.url", "is required (or args.task_id)"));
    }
    url_ok("args.url", &a.url)?;
    text("args.tag", &a.tag)?;
    text("args.application", &a.application)?;
    let filtered = {
        let f = filtered(&a.filtered_query_params);
        if f.is_empty() {
            d7y_types::id::default_filtered_query_params()
        } else {
            f
        }
    };
    let task_id = task_id_of(
        &a.url,
        piece_length(a.piece_length)?,
        &a.tag,
        &a.application,
        &filtered,
        a.content_for_calculating_task_id.as_deref(),
        a.enable_task_id_based_blob_digest.unwrap_or(true),
    )
    .map_err(|e| field("args.url", e))?;
    Ok(TaskQuery {
        task_id,
        url: a.url,
        timeout: a.timeout,
    })
}

/// The task ID a dfdaemon derives for a download of `url` with these parameters (with
/// `blob_digest`, an OCI blob URL's is its digest, as this project's proxy and dfget use).
pub fn task_id_of(
    url: &str,
    piece_length: Option<u64>,
    tag: &str,
    application: &str,
    filtered_query_params: &[String],
    content: Option<&str>,
    blob_digest: bool,
) -> Result<String, String> {
    let defaults;
    let filtered = if filtered_query_params.is_empty() {
        defaults = d7y_types::id::default_filtered_query_params();
        &defaults[..]
    } else {
        filtered_query_params
    };
    d7y_types::id::task_id(&d7y_types::TaskIdParams {
        url,
        piece_length,
        tag: Some(tag),
        application: Some(application),
        filtered_query_params: filtered,
        revision: None,
        content_for_calculating_task_id: content,
        enable_task_id_based_blob_digest: blob_digest,
    })
    .map_err(|e| e.to_string())
}

/// `args` as the API shows them: header values and passwords are write-only.
pub fn redact(args: &serde_json::Value) -> serde_json::Value {
    let mut out = args.clone();
    if let Some(obj) = out.as_object_mut() {
        if let Some(headers) = obj.get_mut("headers").and_then(|h| h.as_object_mut()) {
            for v in headers.values_mut() {
                *v = serde_json::Value::String("***".into());
            }
        }
        if let Some(p) = obj.get_mut("password") {
            if p.as_str().is_some_and(|s| !s.is_empty()) {
                *p = serde_json::Value::String("***".into());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn harbors_body_is_accepted() {
        let body = r#"{"type":"preheat","args":{"type":"image","url":"http://127.0.0.1:5000/v2/library/app/manifests/v1","tag":"","filtered_query_params":"","headers":{"Authorization":"Bearer t"},"scope":"single_seed_peer","concurrent_count":0,"timeout":0},"scheduler_cluster_ids":null}"#;
        let req: CreateJob = serde_json::from_str(body).unwrap();
        assert!(req.scheduler_cluster_ids.is_empty());
        let Spec::Preheat(p) = check(&req.kind, &req.args).unwrap() else {
            panic!("not a preheat")
        };
        assert!(p.image);
        assert_eq!(p.scope, Scope::SingleSeedPeer);
        assert_eq!(p.timeout, None);
        assert_eq!(p.platform, "linux/amd64");
        assert_eq!(p.concurrent_task_count, 8);
        assert_eq!(p.headers["Authorization"], "Bearer t");
    }

    #[test]
    fn bad_fields_are_named_table() {
        let cases = [
            ("", json!({}), "type"),
            ("reboot", json!({}), "type"),
            ("preheat", json!({}), "args.type"),
            ("preheat", json!({"type": "movie"}), "args.type"),
            ("preheat", json!({"type": "image"}), "args.url"),
            (
                "preheat",
                json!({"type": "image", "url": "http://r/v2/a/blobs/x"}),
                "args.url",
            ),
            ("preheat", json!({"type": "file"}), "args.url"),
            (
                "preheat",
                json!({"type": "file", "urls": ["nope"]}),
                "args.urls",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "piece_length": 1}),
                "args.piece_length",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "scope": "world"}),
                "args.scope",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "count": 0}),
                "args.count",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "percentage": 101}),
                "args.percentage",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "ips": ["x"]}),
                "args.ips",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "platform": "linux"}),
                "args.platform",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "concurrent_peer_count": 5000}),
                "args.concurrent_peer_count",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "headers": {"a b": "c"}}),
                "args.headers",
            ),
            (
                "preheat",
                json!({"type": "file", "url": "http://h/f", "timeout": "soon"}),
                "args",
            ),
            ("get_task", json!({}), "args.url"),
            ("get_task", json!({"task_id": "XYZ"}), "args.task_id"),
            ("delete_task", json!({"url": "relative/path"}), "args.url"),
        ];
        for (kind, args, name) in cases {
            let err = check(kind, &args).unwrap_err();
            assert_eq!(err.field, name, "{kind} {args}: {}", err.message);
        }
    }

    #[test]
    fn durations_and_task_ids() {
        for (timeout, want) in [
            (json!(0), None),
            (json!(1_800_000_000_000i64), Some(Duration::from_secs(1800))),
            (json!("30m"), Some(Duration::from_secs(1800))),
            (json!("1h0m0s"), Some(Duration::from_secs(3600))),
            (json!(null), None),
        ] {
            let Spec::Preheat(p) = check(
                PREHEAT,
                &json!({"type": "file", "url": "http://h/f", "timeout": timeout}),
            )
            .unwrap() else {
                panic!()
            };
            assert_eq!(p.timeout, want, "{timeout}");
        }
        let blob = "http://127.0.0.1:5000/v2/a/blobs/sha256:".to_string() + &"ab".repeat(32);
        let Spec::GetTask(q) = check(GET_TASK, &json!({"url": blob})).unwrap() else {
            panic!()
        };
        assert_eq!(q.task_id, "ab".repeat(32), "a blob's task is its digest");
        let Spec::DeleteTask(q) =
            check(DELETE_TASK, &json!({"url": "http://h/f?Expires=1"})).unwrap()
        else {
            panic!()
        };
        let Spec::DeleteTask(q2) =
            check(DELETE_TASK, &json!({"url": "http://h/f?Expires=2"})).unwrap()
        else {
            panic!()
        };
        assert_eq!(q.task_id, q2.task_id, "signature parameters are filtered");
    }

    #[test]
    fn secrets_are_not_shown() {
        let shown = redact(
            &json!({"type": "image", "headers": {"Authorization": "Bearer t"}, "password": "p", "username": "u"}),
        );
        assert_eq!(shown["headers"]["Authorization"], "***");
        assert_eq!(shown["password"], "***");
        assert_eq!(shown["username"], "u");
    }
}
