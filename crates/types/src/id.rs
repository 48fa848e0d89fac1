//! Task, host and peer identifiers, derived exactly as upstream derives them.
//!
//! A URL-based task ID is the hex SHA-256 of the canonical URL followed by the tag, the
//! application, the revision, the decimal piece length (each only when present) and the task
//! type name `STANDARD`. The canonical URL drops the filtered query parameters and sorts the
//! rest by key, escaping like Go's `url.QueryEscape`, so the Go scheduler and manager agree.

use percent_encoding::percent_encode_byte;
use sha2::{Digest as _, Sha256};
use url::{form_urlencoded, Url};

/// The task type name hashed into standard task IDs.
const STANDARD_TASK_TYPE: &str = "STANDARD";

/// Query parameters that never identify content: the signatures of S3, GCS, OSS, OBS, COS
/// pre-signed URLs and containerd's `ns` mirror hint. Used when a request names none.
pub const DEFAULT_FILTERED_QUERY_PARAMS: &[&str] = &[
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
    "X-Amz-User-Agent",
    "X-Goog-Algorithm",
    "X-Goog-Credential",
    "X-Goog-Date",
    "X-Goog-Expires",
    "X-Goog-SignedHeaders",
    "X-Goog-Signature",
    "OSSAccessKeyId",
    "Expires",
    "Signature",
    "SecurityToken",
    "AccessKeyId",
    "X-Obs-Date",
    "X-Obs-Security-Token",
    "q-sign-algorithm",
    "q-ak",
    "q-sign-time",
    "q-key-time",
    "q-header-list",
    "q-url-param-list",
    "q-signature",
    "x-cos-security-token",
    "ns",
];

/// The default filtered query parameters as owned strings.
pub fn default_filtered_query_params() -> Vec<String> {
    DEFAULT_FILTERED_QUERY_PARAMS
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// Why an identifier could not be derived.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdError {
    #[error("invalid URL {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
}

/// Everything a standard task ID depends on.
#[derive(Debug, Clone, Default)]
pub struct TaskIdParams<'a> {
    pub url: &'a str,
    pub piece_length: Option<u64>,
    pub tag: Option<&'a str>,
    pub application: Option<&'a str>,
    pub filtered_query_params: &'a [String],
    pub revision: Option<&'a str>,
    /// When set, the task ID is the SHA-256 of this content and nothing else.
    pub content_for_calculating_task_id: Option<&'a str>,
    /// When set and the URL is an OCI blob URL, the task ID is the blob digest's hex.
    pub enable_task_id_based_blob_digest: bool,
}

/// Derives a standard task ID.
pub fn task_id(params: &TaskIdParams<'_>) -> Result<String, IdError> {
    if let Some(content) = params.content_for_calculating_task_id {
        return Ok(hex::encode(Sha256::digest(content.as_bytes())));
    }
    if params.enable_task_id_based_blob_digest {
        if let Some(encoded) = blob_digest_encoded(params.url) {
            return Ok(encoded);
        }
    }

    let url = filter_query_params(params.url, params.filtered_query_params)?;
    let mut hasher = Sha256::new();
    hasher.update(url.as_bytes());
    for part in [params.tag, params.application, params.revision]
        .into_iter()
        .flatten()
    {
        hasher.update(part.as_bytes());
    }
    if let Some(piece_length) = params.piece_length {
        hasher.update(piece_length.to_string().as_bytes());
    }
    hasher.update(STANDARD_TASK_TYPE.as_bytes());
    Ok(hex::encode(hasher.finalize()))
}

/// Length of a task ID: 64 lowercase hex characters (a SHA-256), the only form Vortex can
/// carry (its request holds exactly 64 bytes of task ID).
pub const TASK_ID_LEN: usize = 64;

/// Whether `id` is a well-formed task ID. Anything that reaches a map, a file name or a
/// metric from the network is checked with this first.
pub fn is_task_id(id: &str) -> bool {
    id.len() == TASK_ID_LEN && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The hex of the digest in an OCI blob URL (`/v2/<name>/blobs/sha256:<hex>`), if it is one.
pub fn blob_digest_encoded(url: &str) -> Option<String> {
    let url = Url::parse(url).ok()?;
    let segments: Vec<&str> = url.path_segments()?.collect();
    // v2, at least one name segment, blobs, digest
    if segments.len() < 4 || segments[0] != "v2" || segments[segments.len() - 2] != "blobs" {
        return None;
    }
    let (algorithm, encoded) = segments[segments.len() - 1].split_once(':')?;
    // Only a sha256 digest can be a task ID (see [`is_task_id`]); a sha512 blob gets a
    // URL-based ID. OCI digests are lowercase hex.
    (algorithm == "sha256" && is_task_id(encoded)).then(|| encoded.to_string())
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    let mut escaped = String::with_capacity(s.len());
    for &byte in s.as_bytes() {
        match byte {
            b'-' | b'.' | b'_' | b'~' | b'0'..=b'9' | b'A'..=b'Z' | b'a'..=b'z' => {
                escaped.push(byte as char)
            }
            b' ' => escaped.push('+'),
            _ => escaped.push_str(percent_encode_byte(byte)),
        }
    }
    escaped
}

/// Drops the filtered query parameters and sorts the rest by key (stable, so repeated keys
/// keep their order). An empty filter list leaves the URL untouched, as upstream does.
pub fn filter_query_params(url: &str, filtered: &[String]) -> Result<String, IdError> {
    if filtered.is_empty() {
        return Ok(url.to_string());
    }
    let mut parsed = Url::parse(url).map_err(|err| IdError::InvalidUrl {
        url: url.to_string(),
        reason: err.to_string(),
    })?;
    let mut pairs: Vec<(String, String)> = parsed
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|segment| !segment.contains(';'))
        .flat_map(|segment| form_urlencoded::parse(segment.as_bytes()))
        .filter(|(key, _)| !filtered.iter().any(|f| f == key.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    pairs.sort_by(|a, b| a.0.cmp(&b.0));
    if pairs.is_empty() {
        parsed.set_query(None);
    } else {
        let query = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", query_escape(k), query_escape(v)))
            .collect::<Vec<_>>()
            .join("&");
        parsed.set_query(Some(&query));
    }
    let out = parsed.to_string();
    if parsed.path() == "/" && out.ends_with('/') {
        return Ok(out.trim_end_matches('/').to_string());
    }
    Ok(out)
}

/// The identity of this host: upstream's host ID is `<ip>-<hostname>`, with `-seed` for seed
/// peers; a peer ID adds a random UUID (and a `-seed` suffix for seed peers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostIdentity {
    pub ip: String,
    pub hostname: String,
    pub is_seed: bool,
}

impl HostIdentity {
    pub fn host_id(&self) -> String {
        if self.is_seed {
            format!("{}-{}-seed", self.ip, self.hostname)
        } else {
            format!("{}-{}", self.ip, self.hostname)
        }
    }

    pub fn peer_id(&self) -> String {
        let uuid = uuid::Uuid::new_v4();
        if self.is_seed {
            format!("{}-{}-{}-seed", self.ip, self.hostname, uuid)
        } else {
            format!("{}-{}-{}", self.ip, self.hostname, uuid)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    // Expected IDs are the ones upstream's dragonfly-client publishes for the same inputs, so
    // these tests pin wire compatibility.
    #[test]
    fn url_based_task_ids_match_upstream() {
        let none: Vec<String> = vec![];
        /// url, piece length, tag, application, filtered query params, revision, expected ID
        type Case<'a> = (
            &'a str,
            Option<u64>,
            Option<&'a str>,
            Option<&'a str>,
            Vec<String>,
            Option<&'a str>,
            &'a str,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "https://example.com",
                Some(1024),
                Some("foo"),
                Some("bar"),
                none.clone(),
                Some("v1.0"),
                "5844f27a257287e9b734256bb25603d8005422ced8c0377f15063ec11963b25f",
            ),
            (
                "https://example.com",
                None,
                Some("foo"),
                Some("bar"),
                none.clone(),
                None,
                "06408fbf247ddaca478f8cb9565fe5591c28efd0994b8fea80a6a87d3203c5ca",
            ),
            (
                "https://example.com",
                None,
                Some("foo"),
                None,
                none.clone(),
                None,
                "3c3f230ef9f191dd2821510346a7bc138e4894bee9aee184ba250a3040701d2a",
            ),
            (
                "https://example.com",
                None,
                None,
                Some("bar"),
                none.clone(),
                None,
                "c9f9261b7305c24371244f9f149f5d4589ed601348fdf22d7f6f4b10658fdba2",
            ),
            (
                "https://example.com",
                Some(1024),
                None,
                None,
                none.clone(),
                None,
                "9f7c9aafbc6f30f8f41a96ca77eeae80c5b60964b3034b0ee43ccf7b2f9e52b8",
            ),
            (
                "https://example.com?foo=foo&bar=bar",
                None,
                None,
                None,
                s(&["foo", "bar"]),
                None,
                "457b4328cde278e422c9e243f7bfd1e97f511fec43a80f535cf6b0ef6b086776",
            ),
            (
                "https://example.com/file.txt?z=9&b=2&a=1",
                None,
                Some("foo"),
                Some("bar"),
                s(&["z"]),
                None,
                "8b3f6e9b9b8fe20903bced565cfd1d0aaef354a4c17573f0c2c1979210443f9d",
            ),
            (
                "https://example.com/file.txt?a=1;x&b=2",
                None,
                None,
                None,
                s(&["none"]),
                None,
                "370933e9d7ab42b3ed90287213cd5f8def6091c8606da5b2dc79436061b06c34",
            ),
            (
                "http://www.xx.yy/path?u=f&x=y&m=z&x=s#size",
                None,
                None,
                None,
                s(&["x", "m"]),
                None,
                "3570c3c808f06fd250a7a60634b9275d72c56edc248576508bb06264c2c65825",
            ),
            (
                "https://example.com/file.txt",
                None,
                None,
                None,
                none.clone(),
                None,
                "7fcf06e5f0b1e443065c1a563eed788eb2e168a05c6ad9c4b319f7a976322be0",
            ),
        ];
        for (url, piece_length, tag, application, filtered, revision, expected) in cases {
            let id = task_id(&TaskIdParams {
                url,
                piece_length,
                tag,
                application,
                filtered_query_params: &filtered,
                revision,
                ..Default::default()
            })
            .unwrap();
            assert_eq!(
                id, expected,
                "{url} {piece_length:?} {tag:?} {application:?}"
            );
        }
    }

    #[test]
    fn empty_tag_and_application_hash_like_absent_ones() {
        let a = task_id(&TaskIdParams {
            url: "https://example.com",
            tag: Some(""),
            application: Some(""),
            ..Default::default()
        })
        .unwrap();
        let b = task_id(&TaskIdParams {
            url: "https://example.com",
            ..Default::default()
        })
        .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn content_and_blob_digest_ids() {
        let id = task_id(&TaskIdParams {
            url: "https://example.com",
            content_for_calculating_task_id: Some("This is a test file"),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            id,
            "e2d0fe1585a63ec6009c8016ff8dda8b17719a637405a4e23c0ff81339148249"
        );

        let blob = "http://registry.example.com/v2/library/ubuntu/blobs/sha256:b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e";
        let with = task_id(&TaskIdParams {
            url: blob,
            enable_task_id_based_blob_digest: true,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            with,
            "b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e"
        );
        let without = task_id(&TaskIdParams {
            url: blob,
            ..Default::default()
        })
        .unwrap();
        assert_ne!(without, with);
        // not blob URLs
        for url in [
            "http://r/v2/blobs/sha256:b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e",
            "http://r/v2/x/manifests/sha256:b2c366cce7e68013d5441c6326d5a3e1b12aeb5ed58564d0fd3fa089bc29cb6e",
            "http://r/v2/x/blobs/sha256:abc",
            // uppercase hex is not an OCI digest, and a sha512 digest cannot be a task ID
            "http://r/v2/x/blobs/sha256:B2C366CCE7E68013D5441C6326D5A3E1B12AEB5ED58564D0FD3FA089BC29CB6E",
            &format!("http://r/v2/x/blobs/sha512:{}", "ab".repeat(64)),
        ] {
            assert_eq!(blob_digest_encoded(url), None, "{url}");
        }
    }

    #[test]
    fn task_ids_are_64_lowercase_hex() {
        assert!(is_task_id(&"0123456789abcdef".repeat(4)));
        for bad in [
            String::new(),
            "a".repeat(63),
            "a".repeat(65),
            "A".repeat(64),
            format!("{}g", "a".repeat(63)),
            format!("../{}", "a".repeat(61)),
        ] {
            assert!(!is_task_id(&bad), "{bad}");
        }
        // every derived ID is one
        let id = task_id(&TaskIdParams {
            url: "https://example.com/x?y=1",
            ..Default::default()
        })
        .unwrap();
        assert!(is_task_id(&id));
    }

    #[test]
    fn filter_query_params_canonicalises_like_upstream() {
        let cases = [
            (
                "https://example.com/file.txt?z=9&b=2&a=1",
                s(&["z"]),
                "https://example.com/file.txt?a=1&b=2",
            ),
            (
                "https://example.com/file.txt?b=2&a=1&b=1",
                s(&["c"]),
                "https://example.com/file.txt?a=1&b=2&b=1",
            ),
            (
                "https://example.com?foo=foo",
                s(&["foo"]),
                "https://example.com",
            ),
            (
                "https://example.com/file.txt?k=a b&m=x*y&n=c~d",
                s(&["none"]),
                "https://example.com/file.txt?k=a+b&m=x%2Ay&n=c~d",
            ),
            (
                "http://www.xx.yy/path?u=f&x=y&m=z&x=s#size",
                s(&[]),
                "http://www.xx.yy/path?u=f&x=y&m=z&x=s#size",
            ),
        ];
        for (url, filtered, expected) in cases {
            assert_eq!(filter_query_params(url, &filtered).unwrap(), expected);
        }
        assert!(filter_query_params(":bad", &s(&["x"])).is_err());
    }

    #[test]
    fn host_and_peer_ids() {
        let host = HostIdentity {
            ip: "127.0.0.1".into(),
            hostname: "localhost".into(),
            is_seed: false,
        };
        assert_eq!(host.host_id(), "127.0.0.1-localhost");
        assert!(host.peer_id().starts_with("127.0.0.1-localhost-"));
        let seed = HostIdentity {
            is_seed: true,
            ..host
        };
        assert_eq!(seed.host_id(), "127.0.0.1-localhost-seed");
        assert!(seed.peer_id().ends_with("-seed"));
    }
}
