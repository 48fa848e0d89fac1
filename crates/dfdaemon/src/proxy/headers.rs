//! Headers at the proxy: upstream's `X-Dragonfly-*` control headers, what is passed on to
//! the origin (hop-by-hop headers never are), and what of the origin's answer is kept.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TAG: &str = "x-dragonfly-tag";
pub const APPLICATION: &str = "x-dragonfly-application";
pub const PRIORITY: &str = "x-dragonfly-priority";
pub const REGISTRY: &str = "x-dragonfly-registry";
pub const FILTERED_QUERY_PARAMS: &str = "x-dragonfly-filtered-query-params";
pub const PIECE_LENGTH: &str = "x-dragonfly-piece-length";
pub const USE_P2P: &str = "x-dragonfly-use-p2p";
/// Response: the task that served the body.
pub const TASK_ID: &str = "x-dragonfly-task-id";
/// Response: why the proxy itself failed (not the origin).
pub const ERROR_TYPE: &str = "x-dragonfly-error-type";

/// What the client asked of Dragonfly through the control headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Control {
    pub tag: Option<String>,
    pub application: Option<String>,
    pub priority: Option<i32>,
    pub piece_length: Option<u64>,
    pub filtered_query_params: Option<Vec<String>>,
    pub registry: Option<String>,
    /// `Some(true)`: through the swarm even without a matching rule; `Some(false)`: never.
    pub use_p2p: Option<bool>,
}

/// Longest control header value accepted (tags and applications become task-ID input and
/// metric labels; they are short in practice).
const MAX_CONTROL_VALUE: usize = 1024;

fn text<'h>(headers: &'h HeaderMap, name: &str) -> Result<Option<&'h str>, String> {
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| format!("header {name} is not visible ASCII"))?
        .trim();
    if value.len() > MAX_CONTROL_VALUE {
        return Err(format!(
            "header {name} is longer than {MAX_CONTROL_VALUE} bytes"
        ));
    }
    Ok((!value.is_empty()).then_some(value))
}

impl Control {
    /// Reads the control headers; a malformed one is an error naming it.
    pub fn from_headers(headers: &HeaderMap) -> Result<Control, String> {
        let priority = text(headers, PRIORITY)?
            .map(|v| {
                v.parse::<i32>()
                    .ok()
                    .filter(|p| (0..=6).contains(p))
                    .ok_or_else(|| format!("header {PRIORITY} must be 0 to 6, got {v:?}"))
            })
            .transpose()?;
        let piece_length = text(headers, PIECE_LENGTH)?
            .map(|v| {
                let bytes = v
                    .parse::<u64>()
                    .ok()
                    .or_else(|| v.parse::<bytesize::ByteSize>().ok().map(|b| b.as_u64()))
                    .ok_or_else(|| format!("header {PIECE_LENGTH} is not a size: {v:?}"))?;
                d7y_types::piece::validate_piece_length(bytes)
                    .map_err(|e| format!("header {PIECE_LENGTH}: {e}"))
            })
            .transpose()?;
        let use_p2p = text(headers, USE_P2P)?
            .map(|v| match v.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("header {USE_P2P} must be true or false, got {v:?}")),
            })
            .transpose()?;
        let filtered_query_params = text(headers, FILTERED_QUERY_PARAMS)?.map(|v| {
            v.split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect()
        });
        Ok(Control {
            tag: text(headers, TAG)?.map(str::to_string),
            application: text(headers, APPLICATION)?.map(str::to_string),
            priority,
            piece_length,
            filtered_query_params,
            registry: text(headers, REGISTRY)?.map(str::to_string),
            use_p2p,
        })
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy's own: never passed on.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Whether a header belongs to one connection (or to the proxy) and must not be forwarded.
fn hop_by_hop(name: &HeaderName, listed: &[String]) -> bool {
    let name = name.as_str();
    HOP_BY_HOP.contains(&name) || listed.iter().any(|l| l == name)
}

/// Header names a `Connection` header lists as hop-by-hop.
fn connection_listed(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect()
}

/// The headers of a request passed through to the origin untouched (`Authorization`
/// included): all but hop-by-hop, `Host` (the client library sets it from the URL) and the
/// control headers.
pub fn forwarded_request(headers: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if hop_by_hop(name, &listed)
            || name == http::header::HOST
            || name.as_str().starts_with("x-dragonfly-")
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

/// The headers a swarm task carries to the origin (also from seed peers): what
/// [`forwarded_request`] keeps, minus what would make the stored bytes depend on this one
/// request: its range, conditionals and content negotiation of encodings (the task holds
/// the origin's identity bytes, so every client gets the bytes the origin serves).
pub fn task_request(headers: &HeaderMap) -> Vec<(String, String)> {
    const PER_REQUEST: [&str; 8] = [
        "range",
        "if-range",
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
        "accept-encoding",
        "content-length",
    ];
    forwarded_request(headers)
        .iter()
        .filter(|(name, _)| !PER_REQUEST.contains(&name.as_str()))
        .filter_map(|(name, value)| Some((name.to_string(), value.to_str().ok()?.to_string())))
        .collect()
}

/// The conditional headers of a request (asked of the origin with the authorization check,
/// so a client revalidating its copy gets the origin's 304).
pub fn conditionals(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        "if-match",
        "if-none-match",
        "if-modified-since",
        "if-unmodified-since",
    ] {
        for value in headers.get_all(name) {
            out.append(HeaderName::from_static(name), value.clone());
        }
    }
    out
}

/// The headers of an origin's answer passed back to the client: all but hop-by-hop ones.
pub fn forwarded_response(headers: &HeaderMap) -> HeaderMap {
    let listed = connection_listed(headers);
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if !hop_by_hop(name, &listed) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// The origin's headers that describe the content, kept on an answer the proxy builds from
/// a task (length and range headers are the proxy's own).
pub fn content_headers(origin: &[(String, String)]) -> HeaderMap {
    const KEPT: [&str; 9] = [
        "content-type",
        "content-encoding",
        "docker-content-digest",
        "docker-distribution-api-version",
        "etag",
        "last-modified",
        "cache-control",
        "expires",
        "content-disposition",
    ];
    let mut out = HeaderMap::new();
    for (name, value) in origin {
        let lower = name.to_ascii_lowercase();
        if !KEPT.contains(&lower.as_str()) {
            continue;
        }
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(lower.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.append(n, v);
        }
    }
    out
}

/// Checks `Proxy-Authorization: Basic ...` against the configured credentials.
pub fn basic_auth_ok(headers: &HeaderMap, username: &str, password: &str) -> bool {
    use base64::Engine as _;
    let Some(value) = headers
        .get(http::header::PROXY_AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, encoded)) = value.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(encoded.trim()) else {
        return false;
    };
    let expected = format!("{username}:{password}");
    // Constant time in the length of what was sent.
    decoded.len() == expected.len()
        && decoded
            .iter()
            .zip(expected.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn control_headers_table() {
        let ok = Control::from_headers(&map(&[
            ("X-Dragonfly-Tag", "t1"),
            ("X-Dragonfly-Application", "app"),
            ("X-Dragonfly-Priority", "3"),
            ("X-Dragonfly-Piece-Length", "8388608"),
            ("X-Dragonfly-Filtered-Query-Params", "Expires, Signature,,"),
            ("X-Dragonfly-Registry", "https://r.example"),
            ("X-Dragonfly-Use-P2P", "TRUE"),
        ]))
        .unwrap();
        assert_eq!(
            ok,
            Control {
                tag: Some("t1".into()),
                application: Some("app".into()),
                priority: Some(3),
                piece_length: Some(8 * 1024 * 1024),
                filtered_query_params: Some(vec!["Expires".into(), "Signature".into()]),
                registry: Some("https://r.example".into()),
                use_p2p: Some(true),
            }
        );
        assert_eq!(
            Control::from_headers(&map(&[("x-dragonfly-piece-length", "4mib")]))
                .unwrap()
                .piece_length,
            Some(4 * 1024 * 1024)
        );
        for (name, value, needle) in [
            ("x-dragonfly-priority", "7", "0 to 6"),
            ("x-dragonfly-priority", "high", "0 to 6"),
            ("x-dragonfly-piece-length", "1024", "out of range"),
            ("x-dragonfly-piece-length", "lots", "not a size"),
            ("x-dragonfly-use-p2p", "yes", "true or false"),
        ] {
            let err = Control::from_headers(&map(&[(name, value)])).unwrap_err();
            assert!(err.contains(name) && err.contains(needle), "{name}: {err}");
        }
        let long = "x".repeat(2000);
        assert!(Control::from_headers(&map(&[("x-dragonfly-tag", &long)])).is_err());
        assert_eq!(
            Control::from_headers(&HeaderMap::new()).unwrap(),
            Control::default()
        );
    }

    #[test]
    fn what_reaches_the_origin() {
        let request = map(&[
            ("Host", "127.0.0.1:4001"),
            ("Authorization", "Bearer abc"),
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("X-Secret-Hop", "1"),
            ("Proxy-Authorization", "Basic eDp5"),
            ("Range", "bytes=0-1"),
            ("Accept-Encoding", "gzip"),
            ("If-None-Match", "\"e\""),
            ("Accept", "application/vnd.oci.image.manifest.v1+json"),
            ("X-Dragonfly-Registry", "https://r.example"),
            ("User-Agent", "containerd/1.6"),
        ]);
        let forwarded = forwarded_request(&request);
        let names: Vec<&str> = forwarded.keys().map(|k| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "authorization",
                "range",
                "accept-encoding",
                "if-none-match",
                "accept",
                "user-agent"
            ]
        );
        let task: Vec<String> = task_request(&request).into_iter().map(|(k, _)| k).collect();
        assert_eq!(task, ["authorization", "accept", "user-agent"]);
        assert_eq!(conditionals(&request).len(), 1);
        let response = forwarded_response(&map(&[
            ("Transfer-Encoding", "chunked"),
            ("Content-Type", "x/y"),
            ("WWW-Authenticate", "Bearer realm=\"r\""),
        ]));
        assert_eq!(response.len(), 2);
        let kept = content_headers(&[
            ("Content-Type".into(), "application/octet-stream".into()),
            ("Docker-Content-Digest".into(), "sha256:ab".into()),
            ("Content-Length".into(), "5".into()),
            ("ETag".into(), "\"sha256:ab\"".into()),
            ("Content-Encoding".into(), "gzip".into()),
        ]);
        assert_eq!(kept.len(), 4);
        assert!(kept.get("content-length").is_none());
    }

    #[test]
    fn proxy_basic_auth() {
        let good = map(&[("Proxy-Authorization", "Basic dXNlcjpwYXNz")]); // user:pass
        assert!(basic_auth_ok(&good, "user", "pass"));
        assert!(!basic_auth_ok(&good, "user", "pas"));
        assert!(!basic_auth_ok(
            &map(&[("Proxy-Authorization", "Bearer x")]),
            "user",
            "pass"
        ));
        assert!(!basic_auth_ok(
            &map(&[("Authorization", "Basic dXNlcjpwYXNz")]),
            "user",
            "pass"
        ));
        assert!(!basic_auth_ok(
            &map(&[("Proxy-Authorization", "Basic !!")]),
            "user",
            "pass"
        ));
    }
}
