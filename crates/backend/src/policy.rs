//! Which origins back-to-source may reach. A dfdaemon fetches URLs that arrive over the
//! network (a seed peer downloads what the scheduler forwards, and the scheduler forwards
//! what any peer registered), so without limits anyone who reaches it can make it fetch
//! internal addresses (SSRF): a cloud metadata service, an admin port on loopback.
//!
//! The policy is applied to the URL asked for, to every redirect target, and to every
//! address a host name resolves to (so a name that resolves to a denied address is refused
//! as well as a literal one).

use crate::BackendError;
use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

/// Allowed schemes and denied networks for origin requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetPolicy {
    allowed_schemes: Vec<String>,
    denied: Vec<IpNet>,
}

impl Default for TargetPolicy {
    /// http and https to anywhere.
    fn default() -> Self {
        TargetPolicy::new(vec!["http".into(), "https".into()], Vec::new())
    }
}

impl TargetPolicy {
    pub fn new(allowed_schemes: Vec<String>, denied: Vec<IpNet>) -> TargetPolicy {
        TargetPolicy {
            allowed_schemes: allowed_schemes
                .into_iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            denied,
        }
    }

    pub fn allows_scheme(&self, scheme: &str) -> bool {
        self.allowed_schemes
            .iter()
            .any(|s| s.eq_ignore_ascii_case(scheme))
    }

    /// The denied network `ip` is in, if any (IPv4-mapped IPv6 counts as IPv4).
    pub fn denied_network(&self, ip: IpAddr) -> Option<&IpNet> {
        let ip = ip.to_canonical();
        self.denied.iter().find(|net| net.contains(&ip))
    }

    /// Checks a URL's scheme and, when its host is an address literal, the address.
    pub fn check_url(&self, url: &url::Url) -> Result<(), BackendError> {
        if !self.allows_scheme(url.scheme()) {
            return Err(BackendError::Denied {
                url: url.to_string(),
                reason: format!(
                    "scheme {:?} is not in backend.allowedSchemes ({})",
                    url.scheme(),
                    self.allowed_schemes.join(", ")
                ),
            });
        }
        let literal = match url.host() {
            Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        if let Some(ip) = literal {
            if let Some(net) = self.denied_network(ip) {
                return Err(BackendError::Denied {
                    url: url.to_string(),
                    reason: format!(
                        "address {ip} is in denied network {net} (backend.deniedNetworks)"
                    ),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn has_denied_networks(&self) -> bool {
        !self.denied.is_empty()
    }
}

/// Resolves names with the system resolver and drops denied addresses; a name with only
/// denied addresses fails to resolve, with a message saying why.
pub(crate) struct PolicyResolver {
    pub(crate) policy: Arc<TargetPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|a| policy.denied_network(a.ip()).is_none())
                .collect();
            if allowed.is_empty() && !resolved.is_empty() {
                let ip = resolved[0].ip();
                let net = policy
                    .denied_network(ip)
                    .map(|n| n.to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "{host} resolves only to denied addresses ({ip} is in {net}, backend.deniedNetworks)"
                )
                .into());
            }
            let addrs: Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> TargetPolicy {
        TargetPolicy::new(
            vec!["https".into(), "HTTP".into()],
            vec![
                "169.254.0.0/16".parse().unwrap(),
                "fe80::/10".parse().unwrap(),
                "10.1.0.0/16".parse().unwrap(),
            ],
        )
    }

    #[test]
    fn urls_table() {
        let cases = [
            ("http://example.org/a", true),
            ("HTTPS://example.org/a", true),
            ("ftp://example.org/a", false),
            ("file:///etc/passwd", false),
            ("http://169.254.169.254/latest/meta-data", false),
            ("http://[fe80::1]/x", false),
            ("http://[::ffff:169.254.1.1]/x", false),
            ("http://10.1.2.3:8080/x", false),
            ("http://10.2.2.3:8080/x", true),
            ("http://127.0.0.1:9/x", true),
        ];
        let p = policy();
        for (url, ok) in cases {
            let result = p.check_url(&url::Url::parse(url).unwrap());
            assert_eq!(result.is_ok(), ok, "{url}: {result:?}");
            if let Err(e) = result {
                assert!(e.to_string().contains("backend."), "{e}");
            }
        }
    }

    #[tokio::test]
    async fn resolver_drops_denied_addresses() {
        let resolver = PolicyResolver {
            policy: Arc::new(TargetPolicy::new(
                vec!["http".into()],
                vec!["127.0.0.0/8".parse().unwrap()],
            )),
        };
        let err = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => {
                // Only an IPv6 ::1 may be left.
                let left: Vec<_> = addrs.collect();
                assert!(left.iter().all(|a| !a.ip().is_ipv4()), "{left:?}");
                return;
            }
            Err(e) => e.to_string(),
        };
        assert!(err.contains("denied"), "{err}");
    }
}
