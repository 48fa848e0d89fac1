//! Where a proxied request goes, decided without I/O: the URL a registry-mirror request is
//! meant for, the rules that send a request through the swarm, and which CONNECT tunnels
//! are intercepted.

use d7y_config::dfdaemon::{HijackHost, ProxyRule};
use regex::Regex;
use url::Url;

/// upstream's default rule: OCI/Docker blobs go through the swarm, everything else to the
/// origin.
pub const DEFAULT_RULE: &str = "blobs/sha256.*";

/// A compiled `proxy.rules` entry.
#[derive(Debug, Clone)]
pub struct Rule {
    regex: Regex,
    pub use_tls: bool,
    pub redirect: Option<String>,
    pub filtered_query_params: Vec<String>,
}

/// Why the routing configuration or a request cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("{key}: invalid regular expression {regex:?}: {reason}")]
    BadRegex {
        key: &'static str,
        regex: String,
        reason: String,
    },
    #[error("invalid registry {value:?} ({source_of}): {reason}")]
    BadRegistry {
        value: String,
        source_of: &'static str,
        reason: String,
    },
    #[error("invalid request target {0:?}")]
    BadTarget(String),
}

fn compile(key: &'static str, regex: &str) -> Result<Regex, RouteError> {
    // Bounded compiled size: a rule comes from the config, but it runs on every URL.
    regex::RegexBuilder::new(regex)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| RouteError::BadRegex {
            key,
            regex: regex.to_string(),
            reason: e.to_string(),
        })
}

/// The rules in order; the first match wins.
#[derive(Debug, Clone)]
pub struct Rules(Vec<Rule>);

impl Rules {
    /// Compiles `proxy.rules`; without any, the default rule (blobs through the swarm).
    pub fn compile(rules: Option<&[ProxyRule]>) -> Result<Rules, RouteError> {
        let default = [ProxyRule {
            regex: DEFAULT_RULE.into(),
            ..ProxyRule::default()
        }];
        let rules = rules.unwrap_or(&default);
        rules
            .iter()
            .map(|r| {
                Ok(Rule {
                    regex: compile("proxy.rules[].regex", &r.regex)?,
                    use_tls: r.use_tls,
                    redirect: r.redirect.clone().filter(|s| !s.is_empty()),
                    filtered_query_params: r.filtered_query_params.clone(),
                })
            })
            .collect::<Result<_, _>>()
            .map(Rules)
    }

    /// The first rule whose regex matches the URL.
    pub fn find(&self, url: &str) -> Option<&Rule> {
        self.0.iter().find(|r| r.regex.is_match(url))
    }
}

impl Rule {
    /// The URL the swarm fetches for a request this rule matched: `useTLS` upgrades the
    /// scheme to https, `redirect` replaces the host (`host[:port]` or a base URL).
    pub fn target(&self, url: &Url) -> Result<Url, RouteError> {
        let mut url = url.clone();
        if let Some(redirect) = &self.redirect {
            let base = if redirect.contains("://") {
                Url::parse(redirect)
            } else {
                Url::parse(&format!("{}://{redirect}", url.scheme()))
            }
            .map_err(|_| RouteError::BadTarget(redirect.clone()))?;
            url.set_scheme(base.scheme())
                .map_err(|_| RouteError::BadTarget(redirect.clone()))?;
            url.set_host(base.host_str())
                .map_err(|_| RouteError::BadTarget(redirect.clone()))?;
            url.set_port(base.port())
                .map_err(|_| RouteError::BadTarget(redirect.clone()))?;
        }
        if self.use_tls && url.scheme() == "http" {
            let port = url.port();
            url.set_scheme("https")
                .map_err(|_| RouteError::BadTarget(url.to_string()))?;
            // An explicit :80 was the plain port; https has its own default.
            if port == Some(80) {
                let _ = url.set_port(None);
            }
        }
        Ok(url)
    }
}

/// Which CONNECT targets are intercepted (`proxy.hijackHTTPS.hosts`).
#[derive(Debug, Clone, Default)]
pub struct Hijack(Vec<(Regex, bool)>);

/// An intercepted tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intercept {
    /// Do not verify the real host's certificate.
    pub insecure: bool,
}

impl Hijack {
    pub fn compile(hosts: &[HijackHost]) -> Result<Hijack, RouteError> {
        hosts
            .iter()
            .map(|h| {
                Ok((
                    compile("proxy.hijackHTTPS.hosts[].regx", &h.regx)?,
                    h.insecure,
                ))
            })
            .collect::<Result<_, _>>()
            .map(Hijack)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether to intercept a tunnel to `authority` (`host:port`).
    pub fn find(&self, authority: &str) -> Option<Intercept> {
        self.0
            .iter()
            .find(|(regex, _)| regex.is_match(authority))
            .map(|(_, insecure)| Intercept {
                insecure: *insecure,
            })
    }
}

/// The registry behind Docker Hub's `docker.io` namespace.
const DOCKER_HUB: &str = "https://index.docker.io";

fn registry_url(value: &str, source_of: &'static str) -> Result<Url, RouteError> {
    let bad = |reason: &str| RouteError::BadRegistry {
        value: value.to_string(),
        source_of,
        reason: reason.to_string(),
    };
    let text = if value.contains("://") {
        value.to_string()
    } else {
        format!("https://{value}")
    };
    let url = Url::parse(&text).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if url.query().is_some() || url.fragment().is_some() || !url.username().is_empty() {
        return Err(bad(
            "a registry is a base URL without query, fragment or credentials",
        ));
    }
    Ok(url)
}

/// The registry a mirror request (a path without a host) is meant for: the
/// `X-Dragonfly-Registry` header, else containerd's `ns` query parameter (a host; https,
/// unless it is the configured mirror's host, whose scheme is used), else
/// `proxy.registryMirror.addr`.
pub fn mirror_registry(
    header: Option<&str>,
    ns: Option<&str>,
    default_addr: &str,
) -> Result<Url, RouteError> {
    let default = registry_url(default_addr, "proxy.registryMirror.addr")?;
    if let Some(header) = header {
        return registry_url(header, "X-Dragonfly-Registry header");
    }
    if let Some(ns) = ns.filter(|ns| !ns.is_empty()) {
        if ns == "docker.io" {
            return registry_url(DOCKER_HUB, "ns query parameter");
        }
        if ns.contains('/') || ns.contains('@') || ns.contains("://") {
            return Err(RouteError::BadRegistry {
                value: ns.to_string(),
                source_of: "ns query parameter",
                reason: "must be host[:port]".into(),
            });
        }
        let authority = match default.port() {
            Some(port) => format!("{}:{port}", default.host_str().unwrap_or_default()),
            None => default.host_str().unwrap_or_default().to_string(),
        };
        if ns.eq_ignore_ascii_case(&authority) {
            return Ok(default);
        }
        return registry_url(ns, "ns query parameter");
    }
    Ok(default)
}

/// The `ns` query parameter of a request target, percent-decoded.
pub fn ns_param(path_and_query: &str) -> Option<String> {
    let query = path_and_query.split_once('?')?.1;
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == "ns")
        .map(|(_, v)| v.into_owned())
}

/// The URL a mirror request is forwarded to: the registry's base (and path prefix), then
/// the request's path and query without `ns` (containerd's note to the mirror).
pub fn mirror_url(registry: &Url, path_and_query: &str) -> Result<Url, RouteError> {
    if !path_and_query.starts_with('/') {
        return Err(RouteError::BadTarget(path_and_query.to_string()));
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut url = registry.clone();
    let prefix = url.path().trim_end_matches('/').to_string();
    url.set_path(&format!("{prefix}{path}"));
    let kept: Vec<(String, String)> = query
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .filter(|(k, _)| k != "ns")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    if kept.is_empty() {
        url.set_query(None);
    } else {
        url.query_pairs_mut().clear().extend_pairs(kept);
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_rule_takes_blobs_only() {
        let rules = Rules::compile(None).unwrap();
        let cases = [
            (
                "https://r.example/v2/library/alpine/blobs/sha256:abcd",
                true,
            ),
            ("http://127.0.0.1:5000/v2/a/b/blobs/sha256:00?ns=x", true),
            (
                "https://r.example/v2/library/alpine/manifests/latest",
                false,
            ),
            (
                "https://r.example/v2/library/alpine/manifests/sha256:abcd",
                false,
            ),
            ("https://r.example/v2/_catalog", false),
            ("https://auth.example/token?scope=repository:a:pull", false),
        ];
        for (url, p2p) in cases {
            assert_eq!(rules.find(url).is_some(), p2p, "{url}");
        }
    }

    #[test]
    fn configured_rules_first_match_and_targets() {
        let rules = Rules::compile(Some(&[
            ProxyRule {
                regex: r"example\.com/files/.*\.bin".into(),
                use_tls: true,
                ..Default::default()
            },
            ProxyRule {
                regex: r"/mirror/".into(),
                redirect: Some("cache.internal:8080".into()),
                ..Default::default()
            },
        ]))
        .unwrap();
        let url = Url::parse("http://example.com/files/a.bin").unwrap();
        let rule = rules.find(url.as_str()).unwrap();
        assert_eq!(
            rule.target(&url).unwrap().as_str(),
            "https://example.com/files/a.bin"
        );
        let url = Url::parse("http://example.com:80/files/a.bin").unwrap();
        assert_eq!(
            rules
                .find(url.as_str())
                .unwrap()
                .target(&url)
                .unwrap()
                .as_str(),
            "https://example.com/files/a.bin"
        );
        let url = Url::parse("http://x.example/mirror/f?a=1").unwrap();
        assert_eq!(
            rules
                .find(url.as_str())
                .unwrap()
                .target(&url)
                .unwrap()
                .as_str(),
            "http://cache.internal:8080/mirror/f?a=1"
        );
        assert!(rules.find("http://example.com/other").is_none());
        let err = Rules::compile(Some(&[ProxyRule {
            regex: "(".into(),
            ..Default::default()
        }]))
        .unwrap_err();
        assert!(err.to_string().contains("proxy.rules[].regex"), "{err}");
    }

    #[test]
    fn mirror_registry_table() {
        let default = "https://index.docker.io";
        /// header, ns, configured mirror, the registry or a word of the error
        type Case<'a> = (
            Option<&'a str>,
            Option<&'a str>,
            &'a str,
            Result<&'a str, &'a str>,
        );
        let cases: [Case<'_>; 9] = [
            (None, None, default, Ok("https://index.docker.io/")),
            (
                Some("http://origin.test:5000"),
                Some("other:1"),
                default,
                Ok("http://origin.test:5000/"),
            ),
            (
                Some("origin.test:5000"),
                None,
                default,
                Ok("https://origin.test:5000/"),
            ),
            (
                None,
                Some("origin.test:5000"),
                default,
                Ok("https://origin.test:5000/"),
            ),
            (
                None,
                Some("docker.io"),
                "http://127.0.0.1:5000",
                Ok("https://index.docker.io/"),
            ),
            (
                None,
                Some("127.0.0.1:5000"),
                "http://127.0.0.1:5000",
                Ok("http://127.0.0.1:5000/"),
            ),
            (None, Some("a/b"), default, Err("ns query parameter")),
            (Some("ftp://x"), None, default, Err("X-Dragonfly-Registry")),
            (Some("https://u:p@x"), None, default, Err("without query")),
        ];
        for (header, ns, addr, expected) in cases {
            match (mirror_registry(header, ns, addr), expected) {
                (Ok(url), Ok(want)) => assert_eq!(url.as_str(), want, "{header:?} {ns:?}"),
                (Err(err), Err(needle)) => {
                    assert!(err.to_string().contains(needle), "{err}")
                }
                (got, want) => panic!("{header:?} {ns:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn mirror_urls_drop_ns_and_keep_the_rest() {
        let registry = Url::parse("http://origin.test:5000").unwrap();
        let cases = [
            (
                "/v2/test/img/blobs/sha256:ab?ns=origin.test%3A5000",
                "http://origin.test:5000/v2/test/img/blobs/sha256:ab",
            ),
            (
                "/v2/test/img/tags/list?n=10&ns=x&last=a",
                "http://origin.test:5000/v2/test/img/tags/list?n=10&last=a",
            ),
            ("/v2/", "http://origin.test:5000/v2/"),
        ];
        for (target, want) in cases {
            assert_eq!(mirror_url(&registry, target).unwrap().as_str(), want);
        }
        let prefixed = Url::parse("https://harbor.example/proxy/").unwrap();
        assert_eq!(
            mirror_url(&prefixed, "/v2/a/manifests/1").unwrap().as_str(),
            "https://harbor.example/proxy/v2/a/manifests/1"
        );
        assert!(mirror_url(&registry, "v2/x").is_err());
        assert_eq!(
            ns_param("/v2/a?ns=origin.test%3A5000").as_deref(),
            Some("origin.test:5000")
        );
        assert_eq!(ns_param("/v2/a"), None);
    }

    #[test]
    fn hijack_hosts() {
        let hijack = Hijack::compile(&[
            HijackHost {
                regx: r"^registry\.example:443$".into(),
                insecure: false,
            },
            HijackHost {
                regx: r"^.*\.internal:\d+$".into(),
                insecure: true,
            },
        ])
        .unwrap();
        assert_eq!(
            hijack.find("registry.example:443"),
            Some(Intercept { insecure: false })
        );
        assert_eq!(
            hijack.find("a.internal:5443"),
            Some(Intercept { insecure: true })
        );
        assert_eq!(hijack.find("example.org:443"), None);
        assert!(Hijack::default().is_empty());
    }
}
