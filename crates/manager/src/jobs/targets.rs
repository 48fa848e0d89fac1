//! Which hosts of a scheduler cluster take part in a job (pure).
//!
//! A preheat's `scope` picks the candidates: `single_seed_peer` one seed peer (the one the
//! scheduler itself would trigger for the task: consistent hashing of the task ID over the
//! seed peers' upload addresses), `all_seed_peers` every seed peer, `all_peers` every host.
//! Among those, `ips` (highest priority), `count`, then `percentage` narrow the set, as
//! upstream's PreheatImageRequest documents.

use d7y_types::HashRing;

/// A host as the cluster's scheduler lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub id: String,
    pub hostname: String,
    pub ip: String,
    /// DfdaemonUpload port.
    pub port: u16,
    /// Seed peers are every host type but normal (0).
    pub is_seed: bool,
}

impl Host {
    /// `ip:port` of the upload service (IPv6 in brackets), the seed ring's key.
    pub fn upload_addr(&self) -> String {
        if self.ip.contains(':') {
            format!("[{}]:{}", self.ip, self.port)
        } else {
            format!("{}:{}", self.ip, self.port)
        }
    }

    /// `seed` or `normal`, as upstream's job results name host types.
    pub fn host_type(&self) -> &'static str {
        if self.is_seed {
            "super"
        } else {
            "normal"
        }
    }
}

/// Preheat scopes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    SingleSeedPeer,
    AllSeedPeers,
    AllPeers,
}

impl Scope {
    /// Upstream's names; an empty scope is the default (`single_seed_peer`), as Harbor
    /// sends it for a policy without extra attributes.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "" | "single_seed_peer" => Some(Scope::SingleSeedPeer),
            "all_seed_peers" => Some(Scope::AllSeedPeers),
            "all_peers" => Some(Scope::AllPeers),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SingleSeedPeer => "single_seed_peer",
            Scope::AllSeedPeers => "all_seed_peers",
            Scope::AllPeers => "all_peers",
        }
    }
}

/// How the candidates of a scope are narrowed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Narrowing {
    pub ips: Vec<String>,
    pub count: Option<u32>,
    pub percentage: Option<u32>,
}

/// The hosts that download `task_id`, in a stable order. Empty when the cluster has none
/// that fit (the caller reports why).
pub fn select(hosts: &[Host], scope: Scope, narrowing: &Narrowing, task_id: &str) -> Vec<Host> {
    let mut candidates: Vec<Host> = match scope {
        Scope::SingleSeedPeer => {
            let seeds: Vec<&Host> = hosts.iter().filter(|h| h.is_seed).collect();
            let ring = HashRing::new(seeds.iter().map(|h| h.upload_addr()));
            return ring
                .get(task_id)
                .and_then(|addr| seeds.iter().find(|h| &h.upload_addr() == addr))
                .map(|h| vec![(*h).clone()])
                .unwrap_or_default();
        }
        Scope::AllSeedPeers => hosts.iter().filter(|h| h.is_seed).cloned().collect(),
        Scope::AllPeers => hosts.to_vec(),
    };
    candidates.sort_by(|a, b| a.id.cmp(&b.id));
    candidates.dedup_by(|a, b| a.id == b.id);
    if !narrowing.ips.is_empty() {
        candidates.retain(|h| narrowing.ips.iter().any(|ip| ip == &h.ip));
        return candidates;
    }
    let keep = if let Some(count) = narrowing.count {
        count as usize
    } else if let Some(percentage) = narrowing.percentage {
        // At least one host when there is one.
        (candidates.len() * percentage.min(100) as usize).div_ceil(100)
    } else {
        candidates.len()
    };
    // Spread the chosen ones over the cluster by the task: different tasks land on
    // different hosts, the same task always on the same ones.
    let ring = HashRing::new(candidates.iter().map(|h| h.id.clone()));
    let order: Vec<String> = ring.successors(task_id).cloned().collect();
    let mut chosen: Vec<Host> = order
        .iter()
        .filter_map(|id| candidates.iter().find(|h| &h.id == id).cloned())
        .take(keep)
        .collect();
    chosen.sort_by(|a, b| a.id.cmp(&b.id));
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(n: u8, is_seed: bool) -> Host {
        Host {
            id: format!("10.0.0.{n}-h{n}"),
            hostname: format!("h{n}"),
            ip: format!("10.0.0.{n}"),
            port: 4000,
            is_seed,
        }
    }

    #[test]
    fn scopes_and_narrowing_table() {
        let hosts: Vec<Host> = (1..=10).map(|n| host(n, n <= 3)).collect();
        let task = "a".repeat(64);
        let n = |ips: &[&str], count: Option<u32>, percentage: Option<u32>| Narrowing {
            ips: ips.iter().map(|s| s.to_string()).collect(),
            count,
            percentage,
        };
        // (scope, narrowing, how many, all seeds?)
        let cases = [
            (Scope::SingleSeedPeer, n(&[], None, None), 1, true),
            (Scope::AllSeedPeers, n(&[], None, None), 3, true),
            (Scope::AllSeedPeers, n(&[], Some(2), None), 2, true),
            (Scope::AllPeers, n(&[], None, None), 10, false),
            (Scope::AllPeers, n(&[], Some(4), Some(90)), 4, false),
            (Scope::AllPeers, n(&[], None, Some(25)), 3, false), // ceil(2.5)
            (Scope::AllPeers, n(&[], None, Some(1)), 1, false),
            (Scope::AllPeers, n(&[], Some(50), None), 10, false),
            (
                Scope::AllPeers,
                n(&["10.0.0.7", "10.0.0.9"], Some(1), None),
                2,
                false,
            ),
            (Scope::AllSeedPeers, n(&["10.0.0.7"], None, None), 0, true),
        ];
        for (scope, narrowing, len, seeds) in cases {
            let chosen = select(&hosts, scope, &narrowing, &task);
            assert_eq!(chosen.len(), len, "{scope:?} {narrowing:?}");
            if seeds {
                assert!(chosen.iter().all(|h| h.is_seed), "{scope:?}");
            }
            // The same task picks the same hosts.
            assert_eq!(chosen, select(&hosts, scope, &narrowing, &task));
        }
    }

    #[test]
    fn single_seed_peer_follows_the_ring_and_tasks_spread() {
        let hosts: Vec<Host> = (1..=4).map(|n| host(n, true)).collect();
        let ring = HashRing::new(hosts.iter().map(|h| h.upload_addr()));
        let mut used = std::collections::HashSet::new();
        for i in 0..64u32 {
            let task = format!("{i:064x}");
            let chosen = select(&hosts, Scope::SingleSeedPeer, &Narrowing::default(), &task);
            assert_eq!(chosen.len(), 1);
            assert_eq!(&chosen[0].upload_addr(), ring.get(&task).unwrap());
            used.insert(chosen[0].id.clone());
        }
        assert!(used.len() > 1, "every task went to one seed peer");
        assert!(select(
            &[host(1, false)],
            Scope::SingleSeedPeer,
            &Narrowing::default(),
            "x"
        )
        .is_empty());
    }

    #[test]
    fn scope_names() {
        assert_eq!(Scope::parse(""), Some(Scope::SingleSeedPeer));
        assert_eq!(Scope::parse("all_peers"), Some(Scope::AllPeers));
        assert_eq!(Scope::parse("everyone"), None);
    }
}
