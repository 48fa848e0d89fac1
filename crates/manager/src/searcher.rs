//! Which scheduler cluster serves a peer, as upstream's searcher decides: clusters are
//! scored against the peer by their scopes (0.3 CIDR, 0.3 hostname regex, 0.25 IDC,
//! 0.14 location prefix, 0.01 the default cluster) and tried best first. Pure.

use crate::models::Scopes;
use std::net::IpAddr;

const CIDR_WEIGHT: f64 = 0.3;
const HOSTNAME_WEIGHT: f64 = 0.3;
const IDC_WEIGHT: f64 = 0.25;
const LOCATION_WEIGHT: f64 = 0.14;
const DEFAULT_WEIGHT: f64 = 0.01;
/// Location elements compared at most (`country|province|city|zone|cluster`).
const MAX_LOCATION_ELEMENTS: usize = 5;

/// What a peer says about itself.
#[derive(Debug, Clone, Default)]
pub struct Conditions<'a> {
    pub hostname: &'a str,
    pub ip: Option<IpAddr>,
    pub idc: &'a str,
    pub location: &'a str,
}

/// A cluster as the searcher sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub id: i64,
    pub scopes: &'a Scopes,
    pub is_default: bool,
}

fn cidr_score(scopes: &Scopes, ip: Option<IpAddr>) -> f64 {
    let Some(ip) = ip else { return 0.0 };
    let best = scopes
        .cidrs
        .iter()
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        .filter(|net| net.contains(&ip))
        .map(|net| net.prefix_len() as f64 / net.max_prefix_len() as f64)
        .fold(None::<f64>, |acc, s| Some(acc.map_or(s, |a| a.max(s))));
    // Any match counts; a narrower network counts more.
    best.map_or(0.0, |s| 0.5 + 0.5 * s)
}

fn hostname_score(scopes: &Scopes, hostname: &str) -> f64 {
    if hostname.is_empty() {
        return 0.0;
    }
    let matched = scopes.hostnames.iter().any(|pattern| {
        pattern == hostname
            || regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
                .size_limit(1 << 20)
                .build()
                .is_ok_and(|re| re.is_match(hostname))
    });
    if matched {
        1.0
    } else {
        0.0
    }
}

fn idc_score(scopes: &Scopes, idc: &str) -> f64 {
    if idc.is_empty() || scopes.idc.is_empty() {
        return 0.0;
    }
    if scopes
        .idc
        .split('|')
        .any(|i| i.trim().eq_ignore_ascii_case(idc))
    {
        1.0
    } else {
        0.0
    }
}

fn location_score(scopes: &Scopes, location: &str) -> f64 {
    if location.is_empty() || scopes.location.is_empty() {
        return 0.0;
    }
    let ours: Vec<&str> = scopes.location.split('|').map(str::trim).collect();
    let theirs: Vec<&str> = location.split('|').map(str::trim).collect();
    let common = ours
        .iter()
        .zip(&theirs)
        .take(MAX_LOCATION_ELEMENTS)
        .take_while(|(a, b)| a.eq_ignore_ascii_case(b))
        .count();
    common as f64 / MAX_LOCATION_ELEMENTS as f64
}

/// A cluster's score for a peer.
pub fn score(candidate: &Candidate<'_>, peer: &Conditions<'_>) -> f64 {
    CIDR_WEIGHT * cidr_score(candidate.scopes, peer.ip)
        + HOSTNAME_WEIGHT * hostname_score(candidate.scopes, peer.hostname)
        + IDC_WEIGHT * idc_score(candidate.scopes, peer.idc)
        + LOCATION_WEIGHT * location_score(candidate.scopes, peer.location)
        + if candidate.is_default {
            DEFAULT_WEIGHT
        } else {
            0.0
        }
}

/// Cluster IDs best first (equal scores: lower ID first).
pub fn rank(candidates: &[Candidate<'_>], peer: &Conditions<'_>) -> Vec<i64> {
    let mut scored: Vec<(f64, i64)> = candidates.iter().map(|c| (score(c, peer), c.id)).collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scopes(idc: &str, location: &str, cidrs: &[&str], hostnames: &[&str]) -> Scopes {
        Scopes {
            idc: idc.into(),
            location: location.into(),
            cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
            hostnames: hostnames.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn ranking_table() {
        let default = scopes("", "", &[], &[]);
        let by_cidr = scopes("", "", &["10.1.0.0/16"], &[]);
        let by_host = scopes("", "", &[], &["gpu-.*"]);
        let by_idc = scopes("idc-a|idc-b", "", &[], &[]);
        let by_location = scopes("", "cn|hz|xh", &[], &[]);
        let clusters = [
            Candidate {
                id: 1,
                scopes: &default,
                is_default: true,
            },
            Candidate {
                id: 2,
                scopes: &by_cidr,
                is_default: false,
            },
            Candidate {
                id: 3,
                scopes: &by_host,
                is_default: false,
            },
            Candidate {
                id: 4,
                scopes: &by_idc,
                is_default: false,
            },
            Candidate {
                id: 5,
                scopes: &by_location,
                is_default: false,
            },
        ];
        let ip = |s: &str| Some(s.parse().unwrap());
        let cases: [(Conditions<'_>, i64); 6] = [
            (
                Conditions {
                    hostname: "web-1",
                    ip: ip("192.168.0.1"),
                    ..Default::default()
                },
                1,
            ),
            (
                Conditions {
                    hostname: "web-1",
                    ip: ip("10.1.2.3"),
                    ..Default::default()
                },
                2,
            ),
            (
                Conditions {
                    hostname: "gpu-7",
                    ip: ip("192.168.0.1"),
                    ..Default::default()
                },
                3,
            ),
            (
                Conditions {
                    hostname: "x",
                    idc: "idc-b",
                    ..Default::default()
                },
                4,
            ),
            (
                Conditions {
                    hostname: "x",
                    location: "cn|hz|xh|z1",
                    ..Default::default()
                },
                5,
            ),
            // Partial location beats the default cluster's bonus.
            (
                Conditions {
                    hostname: "x",
                    location: "cn|sh",
                    ..Default::default()
                },
                5,
            ),
        ];
        for (peer, best) in cases {
            assert_eq!(rank(&clusters, &peer)[0], best, "{peer:?}");
        }
        // A bad regex or CIDR in a scope matches nothing instead of failing.
        let broken = scopes("", "", &["not a cidr"], &["("]);
        let only = [Candidate {
            id: 9,
            scopes: &broken,
            is_default: false,
        }];
        let peer = Conditions {
            hostname: "(",
            ip: ip("10.0.0.1"),
            ..Default::default()
        };
        assert_eq!(
            score(&only[0], &peer),
            HOSTNAME_WEIGHT,
            "an exact name still matches"
        );
    }
}
