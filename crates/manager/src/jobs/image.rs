//! An image preheat's first step, as upstream's manager does it: fetch the manifest at the
//! job's URL from its registry (anonymously, with the caller's headers, with basic
//! credentials, or through the bearer-token challenge), pick the platform's manifest out of
//! a list or index, and turn the config and every layer into a blob URL for the peers to
//! download.
//!
//! Parsing and URL building are pure ([`ManifestUrl`], [`parse_manifest`]); the fetching
//! is [`Resolver`]. Every registry answer is bounded (size, index depth, layer count).

use d7y_backend::{PassthroughOptions, TargetPolicy};
use reqwest::header::{
    HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE,
};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// The media types a manifest request accepts.
const ACCEPT_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws;q=0.5";
/// The largest manifest or token answer read.
const MAX_BODY: usize = 4 << 20;
/// The most blobs one image may name.
const MAX_BLOBS: usize = 10_000;
const MAX_REDIRECTS: usize = 5;

/// Why an image could not be resolved (each says what to fix).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error(
        "{url:?} is not a manifest URL (<scheme>://<registry>/v2/<name>/manifests/<tag or digest>)"
    )]
    NotManifestUrl { url: String },
    #[error("the registry refused {url}: HTTP {status}{hint}: {body}")]
    Status {
        url: String,
        status: u16,
        hint: &'static str,
        body: String,
    },
    #[error("the registry at {url} is unreachable: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("the token service {realm} refused: {reason}")]
    Token { realm: String, reason: String },
    #[error("the manifest at {url} is not valid: {reason}")]
    BadManifest { url: String, reason: String },
    #[error(
        "the image index at {url} has no manifest for platform {platform} (it has: {available})"
    )]
    NoPlatform {
        url: String,
        platform: String,
        available: String,
    },
}

/// A manifest URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestUrl {
    /// `scheme://host[:port]`
    pub base: String,
    /// The repository (`library/nginx`).
    pub name: String,
    /// A tag or a digest.
    pub reference: String,
}

impl ManifestUrl {
    pub fn parse(url: &str) -> Result<ManifestUrl, ImageError> {
        let bad = || ImageError::NotManifestUrl {
            url: url.to_string(),
        };
        let parsed = url::Url::parse(url).map_err(|_| bad())?;
        if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
            return Err(bad());
        }
        let path = parsed.path();
        let rest = path.strip_prefix("/v2/").ok_or_else(bad)?;
        let (name, reference) = rest.rsplit_once("/manifests/").ok_or_else(bad)?;
        if name.is_empty() || reference.is_empty() || reference.contains('/') {
            return Err(bad());
        }
        let base = parsed[..url::Position::BeforePath].to_string();
        Ok(ManifestUrl {
            base,
            name: name.to_string(),
            reference: reference.to_string(),
        })
    }

    pub fn manifest(&self, reference: &str) -> String {
        format!("{}/v2/{}/manifests/{reference}", self.base, self.name)
    }

    pub fn blob(&self, digest: &str) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base, self.name)
    }
}

/// What a manifest document says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manifest {
    /// An image: its config and layer digests, in order.
    Image { blobs: Vec<String> },
    /// A list or index: the manifests per platform (`os/arch[/variant]`, digest).
    Index { manifests: Vec<(String, String)> },
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(default)]
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct FsLayer {
    #[serde(rename = "blobSum")]
    blob_sum: String,
}

#[derive(Deserialize)]
struct Document {
    #[serde(rename = "schemaVersion", default)]
    schema_version: u32,
    #[serde(rename = "mediaType", default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(rename = "fsLayers", default)]
    fs_layers: Option<Vec<FsLayer>>,
}

fn is_digest(s: &str) -> bool {
    match s.split_once(':') {
        Some((alg, hex)) => {
            matches!(alg, "sha256" | "sha512")
                && !hex.is_empty()
                && hex.len() <= 128
                && hex.bytes().all(|b| b.is_ascii_hexdigit())
        }
        None => false,
    }
}

/// Parses a manifest (Docker schema 2, OCI image manifest, Docker manifest list, OCI
/// index, or legacy schema 1). The response's Content-Type decides when the body does not
/// name its media type.
pub fn parse_manifest(body: &[u8], content_type: &str) -> Result<Manifest, String> {
    let doc: Document = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let media = doc.media_type.clone().unwrap_or_else(|| {
        content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_string()
    });
    let check = |d: &str| -> Result<String, String> {
        if is_digest(d) {
            Ok(d.to_string())
        } else {
            Err(format!("{d:?} is not a digest"))
        }
    };
    let is_index = media.contains("manifest.list")
        || media.contains("image.index")
        || (doc.manifests.is_some() && doc.layers.is_none());
    if is_index {
        let manifests = doc.manifests.unwrap_or_default();
        if manifests.len() > MAX_BLOBS {
            return Err(format!("{} manifests is too many", manifests.len()));
        }
        let mut out = Vec::with_capacity(manifests.len());
        for m in manifests {
            let platform = match &m.platform {
                Some(p) => match &p.variant {
                    Some(v) if !v.is_empty() => format!("{}/{}/{v}", p.os, p.architecture),
                    _ => format!("{}/{}", p.os, p.architecture),
                },
                None => "unknown/unknown".into(),
            };
            out.push((platform, check(&m.digest)?));
        }
        return Ok(Manifest::Index { manifests: out });
    }
    let mut blobs = Vec::new();
    if doc.schema_version == 1 || doc.fs_layers.is_some() {
        for l in doc.fs_layers.unwrap_or_default() {
            let d = check(&l.blob_sum)?;
            if !blobs.contains(&d) {
                blobs.push(d);
            }
        }
    } else {
        if let Some(config) = &doc.config {
            blobs.push(check(&config.digest)?);
        }
        for l in doc.layers.unwrap_or_default() {
            let d = check(&l.digest)?;
            if !blobs.contains(&d) {
                blobs.push(d);
            }
        }
    }
    if blobs.is_empty() {
        return Err("it names no layers".into());
    }
    if blobs.len() > MAX_BLOBS {
        return Err(format!("{} blobs is too many", blobs.len()));
    }
    Ok(Manifest::Image { blobs })
}

/// The index entry for `platform` (`os/arch[/variant]`; a request without a variant takes
/// the first entry of that os/arch).
pub fn pick_platform<'a>(manifests: &'a [(String, String)], platform: &str) -> Option<&'a str> {
    manifests
        .iter()
        .find(|(p, _)| p == platform)
        .or_else(|| {
            manifests
                .iter()
                .find(|(p, _)| p.split('/').take(2).collect::<Vec<_>>().join("/") == platform)
        })
        .map(|(_, d)| d.as_str())
}

/// A bearer challenge's parameters (`realm`, `service`, `scope`).
pub fn parse_challenge(header: &str) -> Option<(String, HashMap<String, String>)> {
    let (scheme, rest) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    let mut params = HashMap::new();
    let mut rest = rest.trim();
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = if let Some(quoted) = after.strip_prefix('"') {
            let end = quoted.find('"')?;
            (&quoted[..end], &quoted[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        params.insert(key.trim().to_ascii_lowercase(), value.to_string());
        rest = tail.trim_start().trim_start_matches(',').trim_start();
    }
    Some((scheme.to_ascii_lowercase(), params))
}

/// Who to be at the registry.
#[derive(Debug, Clone, Default)]
pub struct Credentials {
    /// Headers the job carries (Harbor sends `Authorization: Bearer <pull token>`).
    pub headers: HashMap<String, String>,
    pub username: String,
    pub password: String,
}

/// What an image resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Blob URLs: the config first, then the layers.
    pub blob_urls: Vec<String>,
    /// The headers peers need to fetch them (the caller's, with the token the manager
    /// obtained, if it had to).
    pub headers: HashMap<String, String>,
}

/// Fetches manifests from registries.
pub struct Resolver {
    client: reqwest::Client,
    policy: Arc<TargetPolicy>,
}

impl Resolver {
    pub fn new(
        timeout: Duration,
        insecure: bool,
        extra_roots_pem: Vec<Vec<u8>>,
    ) -> Result<Resolver, String> {
        // As dfdaemon's default: no link-local targets (cloud metadata services answer there).
        let policy = Arc::new(TargetPolicy::new(
            vec!["http".into(), "https".into()],
            vec![
                "169.254.0.0/16".parse().expect("cidr"),
                "fe80::/10".parse().expect("cidr"),
            ],
        ));
        let client = d7y_backend::passthrough_client(&PassthroughOptions {
            connect_timeout: timeout.min(Duration::from_secs(30)),
            read_timeout: timeout,
            policy: policy.clone(),
            extra_roots_pem,
            insecure,
        })
        .map_err(|e| e.to_string())?;
        Ok(Resolver { client, policy })
    }

    /// Resolves `url` (a manifest URL) for `platform` into blob URLs.
    pub async fn resolve(
        &self,
        url: &str,
        platform: &str,
        creds: &Credentials,
    ) -> Result<Resolved, ImageError> {
        let parsed = ManifestUrl::parse(url)?;
        let mut session = Session {
            resolver: self,
            creds,
            bearer: None,
        };
        let (body, content_type) = session.get(url).await?;
        let bad = |url: &str, reason: String| ImageError::BadManifest {
            url: url.to_string(),
            reason,
        };
        let blobs = match parse_manifest(&body, &content_type).map_err(|r| bad(url, r))? {
            Manifest::Image { blobs } => blobs,
            Manifest::Index { manifests } => {
                let digest =
                    pick_platform(&manifests, platform).ok_or_else(|| ImageError::NoPlatform {
                        url: url.to_string(),
                        platform: platform.to_string(),
                        available: manifests
                            .iter()
                            .map(|(p, _)| p.as_str())
                            .collect::<Vec<_>>()
                            .join(", "),
                    })?;
                let child = parsed.manifest(digest);
                let (body, content_type) = session.get(&child).await?;
                match parse_manifest(&body, &content_type).map_err(|r| bad(&child, r))? {
                    Manifest::Image { blobs } => blobs,
                    Manifest::Index { .. } => {
                        return Err(bad(&child, "an index inside an index".into()));
                    }
                }
            }
        };
        let mut headers = creds.headers.clone();
        if let Some(token) = session.bearer {
            headers.retain(|k, _| !k.eq_ignore_ascii_case("authorization"));
            headers.insert("Authorization".into(), format!("Bearer {token}"));
        } else if !creds.username.is_empty() && !has_authorization(&headers) {
            headers.insert(
                "Authorization".into(),
                basic(&creds.username, &creds.password),
            );
        }
        Ok(Resolved {
            blob_urls: blobs.iter().map(|d| parsed.blob(d)).collect(),
            headers,
        })
    }
}

fn has_authorization(headers: &HashMap<String, String>) -> bool {
    headers
        .keys()
        .any(|k| k.eq_ignore_ascii_case("authorization"))
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// One resolution's requests: the credentials, and the token once a challenge gave one.
struct Session<'a> {
    resolver: &'a Resolver,
    creds: &'a Credentials,
    bearer: Option<String>,
}

impl Session<'_> {
    fn headers(&self, basic_auth: bool) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in &self.creds.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(v),
            ) {
                h.insert(k, v);
            }
        }
        if let Some(token) = &self.bearer {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {token}")) {
                h.insert(AUTHORIZATION, v);
            }
        } else if basic_auth && !self.creds.username.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&basic(&self.creds.username, &self.creds.password))
            {
                h.insert(AUTHORIZATION, v);
            }
        }
        h.insert(ACCEPT, HeaderValue::from_static(ACCEPT_MANIFESTS));
        h
    }

    /// GETs a manifest, answering one authentication challenge.
    async fn get(&mut self, url: &str) -> Result<(Vec<u8>, String), ImageError> {
        let mut basic_auth = false;
        for attempt in 0..2 {
            let response = self.send(url, self.headers(basic_auth)).await?;
            let status = response.status();
            if status == reqwest::StatusCode::UNAUTHORIZED && attempt == 0 {
                let challenge = response
                    .headers()
                    .get(WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_challenge);
                match challenge {
                    Some((scheme, params)) if scheme == "bearer" => {
                        self.bearer = Some(self.token(&params).await?);
                        continue;
                    }
                    Some((scheme, _)) if scheme == "basic" && !self.creds.username.is_empty() => {
                        basic_auth = true;
                        continue;
                    }
                    _ => {}
                }
            }
            let content_type = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = read_bounded(url, response).await?;
            if !status.is_success() {
                return Err(ImageError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                    hint: match status.as_u16() {
                        401 => " (the job's headers or username/password are missing or wrong)",
                        403 => " (the credentials may not pull this repository)",
                        404 => " (no such repository, tag or digest)",
                        _ => "",
                    },
                    body: excerpt(&body),
                });
            }
            return Ok((body, content_type));
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Follows redirects (each target checked against the policy).
    async fn send(&self, url: &str, headers: HeaderMap) -> Result<reqwest::Response, ImageError> {
        let mut target = url.to_string();
        for _ in 0..=MAX_REDIRECTS {
            let parsed = url::Url::parse(&target).map_err(|e| ImageError::Unreachable {
                url: target.clone(),
                reason: e.to_string(),
            })?;
            self.resolver
                .policy
                .check_url(&parsed)
                .map_err(|e| ImageError::Unreachable {
                    url: target.clone(),
                    reason: e.to_string(),
                })?;
            let response = self
                .resolver
                .client
                .get(parsed.clone())
                .headers(headers.clone())
                .send()
                .await
                .map_err(|e| ImageError::Unreachable {
                    url: target.clone(),
                    reason: e.to_string(),
                })?;
            if response.status().is_redirection() {
                if let Some(location) = response
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                {
                    target = parsed
                        .join(location)
                        .map(|u| u.to_string())
                        .unwrap_or_default();
                    continue;
                }
            }
            return Ok(response);
        }
        Err(ImageError::Unreachable {
            url: url.to_string(),
            reason: format!("more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// The bearer-token dance: GET realm?service&scope, with basic credentials if given.
    async fn token(&self, params: &HashMap<String, String>) -> Result<String, ImageError> {
        let realm = params.get("realm").cloned().unwrap_or_default();
        let failed = |reason: String| ImageError::Token {
            realm: realm.clone(),
            reason,
        };
        let mut url = url::Url::parse(&realm).map_err(|e| failed(format!("not a URL: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            for key in ["service", "scope"] {
                if let Some(v) = params.get(key) {
                    q.append_pair(key, v);
                }
            }
        }
        let mut headers = HeaderMap::new();
        if !self.creds.username.is_empty() {
            if let Ok(v) = HeaderValue::from_str(&basic(&self.creds.username, &self.creds.password))
            {
                headers.insert(AUTHORIZATION, v);
            }
        }
        let response = self.send(url.as_str(), headers).await?;
        let status = response.status();
        let body = read_bounded(url.as_str(), response).await?;
        if !status.is_success() {
            return Err(failed(format!(
                "HTTP {}: {}",
                status.as_u16(),
                excerpt(&body)
            )));
        }
        #[derive(Deserialize)]
        struct Token {
            #[serde(default)]
            token: String,
            #[serde(default)]
            access_token: String,
        }
        let t: Token = serde_json::from_slice(&body)
            .map_err(|e| failed(format!("not a token answer: {e}")))?;
        let token = if t.token.is_empty() {
            t.access_token
        } else {
            t.token
        };
        if token.is_empty() || token.len() > 64 * 1024 {
            return Err(failed("no usable token in the answer".into()));
        }
        Ok(token)
    }
}

async fn read_bounded(url: &str, mut response: reqwest::Response) -> Result<Vec<u8>, ImageError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| ImageError::Unreachable {
            url: url.to_string(),
            reason: e.to_string(),
        })?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ImageError::BadManifest {
                url: url.to_string(),
                reason: format!("the answer is larger than {} MiB", MAX_BODY >> 20),
            });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    text.trim().replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";
    const C: &str = "sha256:cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

    #[test]
    fn manifest_urls() {
        let u = ManifestUrl::parse("https://harbor.example.com/v2/library/nginx/manifests/latest")
            .unwrap();
        assert_eq!(u.base, "https://harbor.example.com");
        assert_eq!(u.name, "library/nginx");
        assert_eq!(u.reference, "latest");
        assert_eq!(
            u.blob(A),
            format!("https://harbor.example.com/v2/library/nginx/blobs/{A}")
        );
        let u =
            ManifestUrl::parse(&format!("http://127.0.0.1:5000/v2/a/b/c/manifests/{A}")).unwrap();
        assert_eq!(
            (u.base.as_str(), u.name.as_str()),
            ("http://127.0.0.1:5000", "a/b/c")
        );
        for bad in [
            "ftp://x/v2/a/manifests/t",
            "http://x/v1/a/manifests/t",
            "http://x/v2/manifests/t",
            "http://x/v2/a/blobs/t",
            "not a url",
        ] {
            assert!(ManifestUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifest_kinds_table() {
        let schema2 = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.docker.distribution.manifest.v2+json","config":{{"digest":"{A}"}},"layers":[{{"digest":"{B}"}},{{"digest":"{C}"}},{{"digest":"{B}"}}]}}"#
        );
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"digest":"{A}"}},"layers":[{{"digest":"{B}"}}]}}"#
        );
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"digest":"{A}","platform":{{"os":"linux","architecture":"amd64"}}}},{{"digest":"{B}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}}]}}"#
        );
        let schema1 = format!(
            r#"{{"schemaVersion":1,"fsLayers":[{{"blobSum":"{C}"}},{{"blobSum":"{C}"}}]}}"#
        );
        let cases: Vec<(&str, &str, Result<Manifest, ()>)> = vec![
            (
                &schema2,
                "",
                Ok(Manifest::Image {
                    blobs: vec![A.into(), B.into(), C.into()],
                }),
            ),
            (
                &oci,
                "application/vnd.oci.image.manifest.v1+json",
                Ok(Manifest::Image {
                    blobs: vec![A.into(), B.into()],
                }),
            ),
            (
                &index,
                "",
                Ok(Manifest::Index {
                    manifests: vec![
                        ("linux/amd64".into(), A.into()),
                        ("linux/arm64/v8".into(), B.into()),
                    ],
                }),
            ),
            (
                &schema1,
                "",
                Ok(Manifest::Image {
                    blobs: vec![C.into()],
                }),
            ),
            (
                r#"{"schemaVersion":2,"layers":[{"digest":"sha256:xyz"}]}"#,
                "",
                Err(()),
            ),
            (r#"{"schemaVersion":2,"layers":[]}"#, "", Err(())),
            ("<html>", "text/html", Err(())),
        ];
        for (body, ct, want) in cases {
            let got = parse_manifest(body.as_bytes(), ct).map_err(|_| ());
            assert_eq!(got, want, "{body}");
        }
    }

    #[test]
    fn platforms() {
        let m = vec![
            ("linux/amd64".to_string(), A.to_string()),
            ("linux/arm64/v8".to_string(), B.to_string()),
        ];
        assert_eq!(pick_platform(&m, "linux/amd64"), Some(A));
        assert_eq!(pick_platform(&m, "linux/arm64"), Some(B));
        assert_eq!(pick_platform(&m, "linux/arm64/v8"), Some(B));
        assert_eq!(pick_platform(&m, "windows/amd64"), None);
    }

    #[test]
    fn challenges() {
        let (scheme, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/nginx:pull""#,
        )
        .unwrap();
        assert_eq!(scheme, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/nginx:pull");
        let (scheme, p) = parse_challenge(r#"Basic realm="Registry Realm""#).unwrap();
        assert_eq!(
            (scheme.as_str(), p["realm"].as_str()),
            ("basic", "Registry Realm")
        );
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }
}
