//! Consistent hashing with virtual nodes: maps a key (a task ID) to one of a set of nodes
//! (scheduler or seed-peer addresses) so that adding or removing a node moves only about
//! 1/N of the keys. Peers use it to pick a task's scheduler, schedulers to pick its seed peer.

use sha2::{Digest as _, Sha256};

/// Virtual nodes per real node; enough to keep the spread within a few percent.
pub const DEFAULT_VNODES: u32 = 160;

/// A ring of nodes. Building is `O(n·vnodes·log)`, a lookup is `O(log)`.
#[derive(Debug, Clone)]
pub struct HashRing<T> {
    nodes: Vec<T>,
    /// (point on the ring, index into `nodes`), sorted by point.
    points: Vec<(u64, usize)>,
}

fn point(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

impl<T: AsRef<str>> HashRing<T> {
    /// A ring over `nodes`, each placed by its string form. Duplicates are kept once.
    pub fn new(nodes: impl IntoIterator<Item = T>) -> HashRing<T> {
        HashRing::with_vnodes(nodes, DEFAULT_VNODES)
    }

    pub fn with_vnodes(nodes: impl IntoIterator<Item = T>, vnodes: u32) -> HashRing<T> {
        let mut unique: Vec<T> = Vec::new();
        for node in nodes {
            if !unique.iter().any(|n| n.as_ref() == node.as_ref()) {
                unique.push(node);
            }
        }
        let mut points = Vec::with_capacity(unique.len() * vnodes as usize);
        for (index, node) in unique.iter().enumerate() {
            for v in 0..vnodes.max(1) {
                points.push((point(format!("{}#{v}", node.as_ref()).as_bytes()), index));
            }
        }
        points.sort_unstable();
        HashRing {
            nodes: unique,
            points,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The node owning `key`, or `None` on an empty ring.
    pub fn get(&self, key: &str) -> Option<&T> {
        self.successors(key).next()
    }

    /// Every node, in ring order starting at the owner of `key`: the fail-over order when the
    /// owner is down.
    pub fn successors<'a>(&'a self, key: &str) -> impl Iterator<Item = &'a T> + 'a {
        let start = if self.points.is_empty() {
            0
        } else {
            let p = point(key.as_bytes());
            self.points.partition_point(|(q, _)| *q < p) % self.points.len()
        };
        let mut seen = vec![false; self.nodes.len()];
        let n = self.points.len();
        (0..n).filter_map(move |i| {
            let (_, index) = self.points[(start + i) % n];
            if seen[index] {
                return None;
            }
            seen[index] = true;
            Some(&self.nodes[index])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn empty_ring_has_no_owner() {
        let ring: HashRing<String> = HashRing::new(Vec::new());
        assert!(ring.get("task").is_none());
        assert_eq!(ring.successors("task").count(), 0);
    }

    #[test]
    fn owner_is_stable_and_successors_cover_every_node_once() {
        let ring = HashRing::new(["a:8002", "b:8002", "c:8002", "b:8002"]);
        assert_eq!(ring.len(), 3);
        let owner = ring.get("some-task").unwrap();
        assert_eq!(ring.get("some-task").unwrap(), owner);
        let order: Vec<_> = ring.successors("some-task").collect();
        assert_eq!(order.len(), 3);
        assert_eq!(order[0], owner);
        let mut sorted: Vec<&str> = order.iter().map(|s| **s).collect();
        sorted.sort();
        assert_eq!(sorted, ["a:8002", "b:8002", "c:8002"]);
    }

    #[test]
    fn keys_spread_evenly_and_removal_moves_only_the_removed_nodes_keys() {
        let nodes = ["n1", "n2", "n3", "n4"];
        let ring = HashRing::new(nodes);
        let keys: Vec<String> = (0..8000).map(|i| format!("task-{i}")).collect();
        let mut count: HashMap<&str, usize> = HashMap::new();
        for k in &keys {
            *count.entry(ring.get(k).unwrap()).or_default() += 1;
        }
        for n in nodes {
            let share = count[n] as f64 / keys.len() as f64;
            assert!((0.17..0.33).contains(&share), "{n} owns {share}");
        }
        let smaller = HashRing::new(["n1", "n2", "n4"]);
        for k in &keys {
            let before = *ring.get(k).unwrap();
            let after = *smaller.get(k).unwrap();
            if before != "n3" {
                assert_eq!(before, after, "key {k} moved although its node stayed");
            }
        }
    }
}
