//! Object storage and HDFS origins through OpenDAL, with upstream's URL schemes:
//! `s3://bucket/key`, `gs://bucket/key`, `abs://container/key` (Azure Blob), `oss://`,
//! `obs://`, `cos://` (`bucket/key` each) and `hdfs://namenode:port/path` (WebHDFS).
//!
//! Credentials come with the request (`Download.object_storage`, `Download.hdfs`); the
//! process environment's (e.g. `AWS_ACCESS_KEY_ID`) only when the caller allows it for this
//! request (see [`Credentials::allow_environment`]): a seed peer fetches for strangers, and
//! must not lend them its own identity. Every endpoint is checked against the target policy
//! (also the addresses its name resolves to), so an endpoint override cannot reach a denied
//! network. Operators are kept per (service, bucket, endpoint, credentials), bounded.

use crate::http::BodyStream;
use crate::policy::{PolicyResolver, TargetPolicy};
use crate::{BackendError, Credentials, Entry, Probe, SourceRequest, SourceStat};
use futures_util::{StreamExt, TryStreamExt};
use opendal::{ErrorKind, Operator};
use sha2::{Digest as _, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Operators kept at most (one per bucket and identity).
const MAX_OPERATORS: usize = 64;
/// The most entries a listing returns.
pub const MAX_ENTRIES: usize = 100_000;

/// The services this build can reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    S3,
    Gcs,
    AzBlob,
    Oss,
    Obs,
    Cos,
    WebHdfs,
}

impl Service {
    pub fn of(scheme: &str) -> Option<Service> {
        match scheme {
            "s3" => Some(Service::S3),
            "gs" => Some(Service::Gcs),
            "abs" => Some(Service::AzBlob),
            "oss" => Some(Service::Oss),
            "obs" => Some(Service::Obs),
            "cos" => Some(Service::Cos),
            "hdfs" => Some(Service::WebHdfs),
            _ => None,
        }
    }

    pub fn scheme(self) -> &'static str {
        match self {
            Service::S3 => "s3",
            Service::Gcs => "gs",
            Service::AzBlob => "abs",
            Service::Oss => "oss",
            Service::Obs => "obs",
            Service::Cos => "cos",
            Service::WebHdfs => "hdfs",
        }
    }
}

/// Where an object is: the service, its bucket (or HDFS namenode `host:port`) and the path
/// inside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub service: Service,
    pub bucket: String,
    pub path: String,
}

impl Location {
    pub fn parse(url: &url::Url) -> Result<Location, BackendError> {
        let service = Service::of(url.scheme())
            .ok_or_else(|| BackendError::UnsupportedScheme(url.scheme().to_string()))?;
        let host = url.host_str().unwrap_or("");
        if host.is_empty() {
            return Err(BackendError::InvalidUrl {
                url: url.to_string(),
                reason: "it names no bucket (scheme://bucket/key)".into(),
            });
        }
        let bucket = match (service, url.port()) {
            (Service::WebHdfs, Some(port)) => format!("{host}:{port}"),
            (Service::WebHdfs, None) => format!("{host}:9870"),
            _ => host.to_string(),
        };
        let path = percent_encoding::percent_decode_str(url.path().trim_start_matches('/'))
            .decode_utf8_lossy()
            .into_owned();
        Ok(Location {
            service,
            bucket,
            path,
        })
    }

    /// The URL of `path` in the same bucket.
    pub fn url_of(&self, path: &str) -> String {
        let encoded: String = path
            .split('/')
            .map(|seg| percent_encoding::utf8_percent_encode(seg, SEGMENT).to_string())
            .collect::<Vec<_>>()
            .join("/");
        format!("{}://{}/{encoded}", self.service.scheme(), self.bucket)
    }
}

/// Characters escaped in a path segment of a listed entry's URL.
const SEGMENT: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}');

/// The object storage half of the backend.
pub struct ObjectBackend {
    policy: Arc<TargetPolicy>,
    client: reqwest::Client,
    operators: Mutex<HashMap<[u8; 32], Operator>>,
}

impl ObjectBackend {
    pub fn new(
        policy: Arc<TargetPolicy>,
        connect_timeout: Duration,
        read_timeout: Duration,
    ) -> Result<ObjectBackend, BackendError> {
        // Redirects (WebHDFS sends reads to a datanode) obey the policy too.
        let redirect_policy = policy.clone();
        let redirect = reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() >= 10 {
                return attempt.error("more than 10 redirects");
            }
            match redirect_policy.check_url(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(denied) => attempt.error(denied.to_string()),
            }
        });
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .read_timeout(read_timeout)
            .pool_max_idle_per_host(32)
            .tcp_nodelay(true)
            .redirect(redirect)
            .no_gzip();
        if policy.has_denied_networks() {
            builder = builder.dns_resolver(Arc::new(PolicyResolver {
                policy: policy.clone(),
            }));
        }
        let client = builder.build().map_err(|e| BackendError::Unreachable {
            url: String::new(),
            reason: format!("cannot build the object storage client: {e}"),
        })?;
        Ok(ObjectBackend {
            policy,
            client,
            operators: Mutex::default(),
        })
    }

    /// The endpoint a request talks to, checked against the policy.
    fn endpoint(
        &self,
        loc: &Location,
        creds: &Credentials,
    ) -> Result<Option<String>, BackendError> {
        let given = creds
            .object_storage
            .as_ref()
            .and_then(|o| o.endpoint.clone())
            .filter(|e| !e.is_empty());
        let endpoint = match (loc.service, given) {
            (Service::WebHdfs, _) => Some(format!("http://{}", loc.bucket)),
            (_, e) => e,
        };
        if let Some(e) = &endpoint {
            let parsed = url::Url::parse(e).map_err(|err| BackendError::InvalidUrl {
                url: e.clone(),
                reason: format!("object_storage.endpoint: {err}"),
            })?;
            if !matches!(parsed.scheme(), "http" | "https") {
                return Err(BackendError::InvalidUrl {
                    url: e.clone(),
                    reason: "object_storage.endpoint must be http:// or https://".into(),
                });
            }
            // The endpoint's scheme is http(s) whatever the URL's; the policy's networks hold.
            if let Some(ip) = parsed
                .host_str()
                .and_then(|h| h.trim_matches(['[', ']']).parse().ok())
            {
                if let Some(net) = self.policy.denied_network(ip) {
                    return Err(BackendError::Denied {
                        url: e.clone(),
                        reason: format!(
                            "address {ip} is in denied network {net} (backend.deniedNetworks)"
                        ),
                    });
                }
            }
        }
        Ok(endpoint)
    }

    fn operator(&self, loc: &Location, creds: &Credentials) -> Result<Operator, BackendError> {
        let endpoint = self.endpoint(loc, creds)?;
        let key = operator_key(loc, endpoint.as_deref(), creds);
        if let Some(op) = self.operators.lock().expect("operators").get(&key) {
            return Ok(op.clone());
        }
        let op =
            build(loc, endpoint.as_deref(), creds)?.layer(opendal::layers::HttpClientLayer::new(
                opendal::raw::HttpClient::with(self.client.clone()),
            ));
        let mut ops = self.operators.lock().expect("operators");
        if ops.len() >= MAX_OPERATORS {
            // Keep it simple: a full cache starts over (operators are cheap to build).
            ops.clear();
        }
        ops.insert(key, op.clone());
        Ok(op)
    }

    pub async fn probe(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<Probe, BackendError> {
        let loc = Location::parse(&request.url)?;
        let op = self.operator(&loc, &request.credentials)?;
        let meta = tokio::time::timeout(timeout, op.stat(&loc.path))
            .await
            .map_err(|_| BackendError::Timeout {
                url: request.url.to_string(),
                timeout,
            })?
            .map_err(|e| classify(&request.url, &loc, &request.credentials, e))?;
        if meta.is_dir() {
            return Err(BackendError::IsDirectory {
                url: request.url.to_string(),
            });
        }
        let mut headers = Vec::new();
        if let Some(t) = meta.content_type() {
            headers.push(("content-type".to_string(), t.to_string()));
        }
        if let Some(e) = meta.etag() {
            headers.push(("etag".to_string(), e.to_string()));
        }
        Ok(Probe {
            stat: SourceStat {
                content_length: Some(meta.content_length()),
                supports_range: true,
                headers,
            },
            full_body: None,
        })
    }

    /// `length` bytes at `offset` (length 0: to the end).
    pub async fn get_range(
        &self,
        request: &SourceRequest,
        offset: u64,
        length: Option<u64>,
        timeout: Duration,
    ) -> Result<BodyStream, BackendError> {
        let loc = Location::parse(&request.url)?;
        let op = self.operator(&loc, &request.credentials)?;
        let url = request.url.to_string();
        let open = async {
            let reader = op.reader_with(&loc.path).await?;
            match length {
                Some(len) => reader.into_bytes_stream(offset..offset + len).await,
                None => reader.into_bytes_stream(offset..).await,
            }
        };
        let stream = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| BackendError::Timeout {
                url: url.clone(),
                timeout,
            })?
            .map_err(|e| classify(&request.url, &loc, &request.credentials, e))?;
        let body_url = url.clone();
        Ok(Box::pin(stream.map_err(move |e| BackendError::Body {
            url: body_url.clone(),
            reason: e.to_string(),
        })))
    }

    /// Every object below the URL's path (a prefix or a directory), recursively.
    pub async fn list(
        &self,
        request: &SourceRequest,
        timeout: Duration,
    ) -> Result<Vec<Entry>, BackendError> {
        let loc = Location::parse(&request.url)?;
        let op = self.operator(&loc, &request.credentials)?;
        let mut prefix = loc.path.clone();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        let list = async {
            let mut lister = op.lister_with(&prefix).recursive(true).await?;
            let mut out = Vec::new();
            while let Some(entry) = lister.next().await {
                let entry = entry?;
                let meta = entry.metadata();
                if meta.is_dir() {
                    continue;
                }
                let mut content_length = meta.content_length();
                if content_length == 0 {
                    content_length = op.stat(entry.path()).await?.content_length();
                }
                out.push(Entry {
                    url: loc.url_of(entry.path()),
                    content_length,
                    is_dir: false,
                });
                if out.len() > MAX_ENTRIES {
                    return Err(opendal::Error::new(
                        ErrorKind::Unexpected,
                        format!("more than {MAX_ENTRIES} entries"),
                    ));
                }
            }
            Ok(out)
        };
        tokio::time::timeout(timeout, list)
            .await
            .map_err(|_| BackendError::Timeout {
                url: request.url.to_string(),
                timeout,
            })?
            .map_err(|e| classify(&request.url, &loc, &request.credentials, e))
    }
}

fn operator_key(loc: &Location, endpoint: Option<&str>, creds: &Credentials) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [loc.service.scheme(), &loc.bucket, endpoint.unwrap_or("")] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    if let Some(o) = &creds.object_storage {
        for part in [
            &o.region,
            &o.access_key_id,
            &o.access_key_secret,
            &o.session_token,
            &o.credential_path,
            &o.security_token,
        ] {
            h.update(part.as_deref().unwrap_or("").as_bytes());
            h.update([0]);
        }
    }
    h.update(
        creds
            .hdfs_delegation_token
            .as_deref()
            .unwrap_or("")
            .as_bytes(),
    );
    h.update([creds.allow_environment as u8]);
    h.finalize().into()
}

fn build(
    loc: &Location,
    endpoint: Option<&str>,
    creds: &Credentials,
) -> Result<Operator, BackendError> {
    let o = creds.object_storage.clone().unwrap_or_default();
    let some = |v: &Option<String>| v.as_deref().filter(|s| !s.is_empty()).map(str::to_string);
    let failed = |e: opendal::Error| BackendError::InvalidUrl {
        url: format!("{}://{}", loc.service.scheme(), loc.bucket),
        reason: e.to_string(),
    };
    let has_key = some(&o.access_key_id).is_some();
    let op = match loc.service {
        Service::S3 => {
            let mut b = opendal::services::S3::default()
                .bucket(&loc.bucket)
                .region(some(&o.region).as_deref().unwrap_or("us-east-1"));
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let (Some(k), Some(s)) = (some(&o.access_key_id), some(&o.access_key_secret)) {
                b = b.access_key_id(&k).secret_access_key(&s);
            }
            if let Some(t) = some(&o.session_token) {
                b = b.session_token(&t);
            }
            if !creds.allow_environment {
                b = b.disable_config_load().disable_ec2_metadata();
                if !has_key {
                    b = b.allow_anonymous();
                }
            }
            Operator::new(b).map_err(failed)?.finish()
        }
        Service::Gcs => {
            let mut b = opendal::services::Gcs::default().bucket(&loc.bucket);
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let Some(p) = some(&o.credential_path) {
                b = b.credential_path(&p);
            } else if !creds.allow_environment {
                b = b.allow_anonymous();
            }
            Operator::new(b).map_err(failed)?.finish()
        }
        Service::AzBlob => {
            let mut b = opendal::services::Azblob::default().container(&loc.bucket);
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let (Some(k), Some(s)) = (some(&o.access_key_id), some(&o.access_key_secret)) {
                b = b.account_name(&k).account_key(&s);
            }
            if let Some(t) = some(&o.security_token) {
                b = b.sas_token(&t);
            }
            Operator::new(b).map_err(failed)?.finish()
        }
        Service::Oss => {
            let mut b = opendal::services::Oss::default().bucket(&loc.bucket);
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let (Some(k), Some(s)) = (some(&o.access_key_id), some(&o.access_key_secret)) {
                b = b.access_key_id(&k).access_key_secret(&s);
            }
            if let Some(t) = some(&o.security_token) {
                b = b.security_token(&t);
            }
            if !creds.allow_environment && !has_key {
                b = b.allow_anonymous();
            }
            Operator::new(b).map_err(failed)?.finish()
        }
        Service::Obs => {
            let mut b = opendal::services::Obs::default().bucket(&loc.bucket);
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let (Some(k), Some(s)) = (some(&o.access_key_id), some(&o.access_key_secret)) {
                b = b.access_key_id(&k).secret_access_key(&s);
            }
            Operator::new(b).map_err(failed)?.finish()
        }
        Service::Cos => {
            let mut b = opendal::services::Cos::default().bucket(&loc.bucket);
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let (Some(k), Some(s)) = (some(&o.access_key_id), some(&o.access_key_secret)) {
                b = b.secret_id(&k).secret_key(&s);
            }
            Operator::new(b).map_err(failed)?.finish()
        }
        Service::WebHdfs => {
            // LISTSTATUS (LISTSTATUS_BATCH is not in every WebHDFS).
            let mut b = opendal::services::Webhdfs::default()
                .root("/")
                .disable_list_batch();
            if let Some(e) = endpoint {
                b = b.endpoint(e);
            }
            if let Some(t) = creds
                .hdfs_delegation_token
                .as_deref()
                .filter(|t| !t.is_empty())
            {
                b = b.delegation(t);
            }
            Operator::new(b).map_err(failed)?.finish()
        }
    };
    Ok(op)
}

/// An OpenDAL error as the backend's: what failed, on which bucket, and what to check.
/// The request's credentials are cut out of whatever the service answered (S3 echoes the
/// access key ID in some errors).
fn classify(
    url: &url::Url,
    loc: &Location,
    creds: &Credentials,
    e: opendal::Error,
) -> BackendError {
    let bucket = format!("{}://{}", loc.service.scheme(), loc.bucket);
    let status = match e.kind() {
        ErrorKind::NotFound => Some(404),
        ErrorKind::PermissionDenied => Some(403),
        ErrorKind::RateLimited => Some(429),
        ErrorKind::ConditionNotMatch => Some(412),
        ErrorKind::RangeNotSatisfied => Some(416),
        _ => None,
    };
    let detail = redact(&e.to_string(), creds);
    match status {
        Some(status) => BackendError::Status {
            url: url.to_string(),
            status,
            reason: format!(
                "{} on bucket {bucket}{}",
                match status {
                    404 => "not found",
                    403 => "access denied (check the credentials: object_storage access key, secret, token)",
                    429 => "rate limited",
                    _ => "refused",
                },
                short(&detail)
            ),
        },
        None if e.is_temporary() => BackendError::Unreachable {
            url: url.to_string(),
            reason: format!("bucket {bucket}: {}", short(&detail)),
        },
        None => BackendError::Status {
            url: url.to_string(),
            status: 400,
            reason: format!("bucket {bucket}: {}", short(&detail)),
        },
    }
}

/// `text` with every credential of `creds` replaced by `***`.
pub fn redact(text: &str, creds: &Credentials) -> String {
    let mut out = text.to_string();
    let mut secrets: Vec<&str> = Vec::new();
    if let Some(o) = &creds.object_storage {
        for s in [
            &o.access_key_id,
            &o.access_key_secret,
            &o.session_token,
            &o.security_token,
        ] {
            if let Some(v) = s.as_deref() {
                secrets.push(v);
            }
        }
    }
    if let Some(t) = creds.hdfs_delegation_token.as_deref() {
        secrets.push(t);
    }
    for secret in secrets.into_iter().filter(|s| s.len() >= 4) {
        out = out.replace(secret, "***");
    }
    out
}

/// OpenDAL's kind and operation, without its context dump (request and response parts).
fn short(detail: &str) -> String {
    let first = detail.lines().next().unwrap_or("");
    let head = first.split(", context:").next().unwrap_or(first);
    let head = head.replace(" (permanent)", "").replace(" (temporary)", "");
    let cut: String = head.chars().take(200).collect();
    format!(" ({})", cut.trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_cut_out_of_errors() {
        let creds = Credentials {
            object_storage: Some(crate::ObjectStorageAuth {
                access_key_id: Some("AKIDEXAMPLE".into()),
                access_key_secret: Some("s3cr3t-value".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let text = redact(
            "SignatureDoesNotMatch: <AWSAccessKeyId>AKIDEXAMPLE</AWSAccessKeyId> s3cr3t-value",
            &creds,
        );
        assert!(
            !text.contains("AKIDEXAMPLE") && !text.contains("s3cr3t"),
            "{text}"
        );
        assert!(!format!("{creds:?}").contains("s3cr3t"));
    }

    #[test]
    fn locations_table() {
        let cases = [
            ("s3://bucket/a/b.bin", Service::S3, "bucket", "a/b.bin"),
            ("gs://models/x", Service::Gcs, "models", "x"),
            ("abs://container/dir/", Service::AzBlob, "container", "dir/"),
            ("oss://b/k", Service::Oss, "b", "k"),
            ("obs://b/k", Service::Obs, "b", "k"),
            ("cos://b-125/k%20x", Service::Cos, "b-125", "k x"),
            (
                "hdfs://namenode:9870/user/data",
                Service::WebHdfs,
                "namenode:9870",
                "user/data",
            ),
            (
                "hdfs://namenode/user",
                Service::WebHdfs,
                "namenode:9870",
                "user",
            ),
        ];
        for (url, service, bucket, path) in cases {
            let loc = Location::parse(&url::Url::parse(url).unwrap()).unwrap();
            assert_eq!(
                (loc.service, loc.bucket.as_str(), loc.path.as_str()),
                (service, bucket, path),
                "{url}"
            );
        }
        let loc = Location::parse(&url::Url::parse("s3://b/p").unwrap()).unwrap();
        assert_eq!(loc.url_of("dir/a b#1.bin"), "s3://b/dir/a%20b%231.bin");
        assert!(Location::parse(&url::Url::parse("s3:///k").unwrap()).is_err());
        assert!(Location::parse(&url::Url::parse("ftp://b/k").unwrap()).is_err());
    }
}
