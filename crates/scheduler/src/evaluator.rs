//! Parent scoring and bad-parent detection. Pure functions over plain values: no locks, no
//! clocks, no I/O, so every rule is pinned by a table test below.
//!
//! The score starts from upstream's load-aware evaluator (load quality, IDC and location
//! affinity, host type) and adds two terms upstream lacks, both aimed at the "hot parent"
//! failure (dragonfly#3128, #707): *coverage*, the share of the child's missing pieces the
//! parent can give now, and *spread*, how far the parent is from its children cap. A seed
//! peer is preferred only while the swarm is cold (fewer than two other holders); once peers
//! hold pieces, a seed scores like any peer, so its upload is kept for pieces nobody else has.

/// What the evaluator knows about one candidate parent, relative to one child.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParentStats<'a> {
    pub is_seed: bool,
    /// Succeeded or downloading back-to-source / from its own parents.
    pub active: bool,
    /// Pieces this parent has that the child lacks.
    pub useful_pieces: u32,
    /// Pieces the child still lacks (0 when unknown).
    pub child_missing: u32,
    pub children: u32,
    pub max_children: u32,
    pub max_tx_bps: u64,
    pub tx_bps: u64,
    pub idc: Option<&'a str>,
    pub location: Option<&'a str>,
}

/// What the evaluator knows about the child and the swarm.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChildStats<'a> {
    pub idc: Option<&'a str>,
    pub location: Option<&'a str>,
    /// Normal peers of the task holding at least one piece (the scheduler counts up to
    /// [`WARM_SWARM`]).
    pub warm_holders: u32,
}

/// Weights of the terms; they sum to 1.
pub const W_LOAD: f64 = 0.30;
pub const W_COVERAGE: f64 = 0.25;
pub const W_SPREAD: f64 = 0.15;
pub const W_IDC: f64 = 0.15;
pub const W_LOCATION: f64 = 0.05;
pub const W_HOST_TYPE: f64 = 0.10;

/// Levels in a `country|province|city|zone|cluster` location.
const LOCATION_LEVELS: usize = 5;

/// The total score in `[0, 1]`; higher is better.
pub fn score(parent: &ParentStats<'_>, child: &ChildStats<'_>) -> f64 {
    W_LOAD * load_quality(parent.tx_bps, parent.max_tx_bps)
        + W_COVERAGE * coverage(parent)
        + W_SPREAD * spread(parent.children, parent.max_children)
        + W_IDC * idc_affinity(parent.idc, child.idc)
        + W_LOCATION * location_affinity(parent.location, child.location)
        + W_HOST_TYPE * host_type(parent.is_seed, parent.active, child.warm_holders)
}

/// Idle share of the parent's upload bandwidth. An unknown maximum counts as fully idle
/// (nothing to go by), a saturated link as 0.
pub fn load_quality(tx_bps: u64, max_tx_bps: u64) -> f64 {
    if max_tx_bps == 0 {
        return 1.0;
    }
    if tx_bps >= max_tx_bps {
        return 0.0;
    }
    1.0 - tx_bps as f64 / max_tx_bps as f64
}

/// Share of the child's missing pieces the parent can give now. A parent that is active but
/// holds nothing new yet gets a small credit: it will have pieces soon.
pub fn coverage(parent: &ParentStats<'_>) -> f64 {
    if parent.child_missing == 0 {
        return if parent.active { 0.5 } else { 0.0 };
    }
    let share =
        (parent.useful_pieces.min(parent.child_missing)) as f64 / parent.child_missing as f64;
    if share == 0.0 && parent.active {
        0.1
    } else {
        share
    }
}

/// 1 with no children, 0 at the cap.
pub fn spread(children: u32, max_children: u32) -> f64 {
    if max_children == 0 || children >= max_children {
        return 0.0;
    }
    1.0 - children as f64 / max_children as f64
}

/// 1 when both IDCs are set and equal (case-insensitive).
pub fn idc_affinity(parent: Option<&str>, child: Option<&str>) -> f64 {
    match (parent, child) {
        (Some(p), Some(c)) if !p.is_empty() && p.eq_ignore_ascii_case(c) => 1.0,
        _ => 0.0,
    }
}

/// Matching leading elements of `a|b|c|d|e`, over 5; an exact match is 1.
pub fn location_affinity(parent: Option<&str>, child: Option<&str>) -> f64 {
    let (Some(p), Some(c)) = (parent, child) else {
        return 0.0;
    };
    if p.is_empty() || c.is_empty() {
        return 0.0;
    }
    if p.eq_ignore_ascii_case(c) {
        return 1.0;
    }
    let matching = p
        .split('|')
        .zip(c.split('|'))
        .take(LOCATION_LEVELS)
        .take_while(|(a, b)| a.eq_ignore_ascii_case(b))
        .count();
    matching as f64 / LOCATION_LEVELS as f64
}

/// Normal peers holding pieces from which a swarm is warm: seeds are no longer preferred.
pub const WARM_SWARM: u32 = 2;

/// Seeds first only while the swarm is cold; afterwards every active parent is equal.
pub fn host_type(is_seed: bool, active: bool, warm_holders: u32) -> f64 {
    match (is_seed, active) {
        (true, true) if warm_holders < WARM_SWARM => 1.0,
        (true, false) => 0.0,
        _ => 0.5,
    }
}

/// Window of recent piece costs kept per peer.
pub const COST_WINDOW: usize = 20;

/// Upstream's outlier rule on a parent's recent piece costs (milliseconds, oldest first):
/// with fewer than 2 samples never bad; while the window is not full, bad when the last cost
/// is over 20x the mean of the others; once full, bad when it is over mean + 3 sigma.
pub fn is_bad_by_costs(costs: &[u64]) -> bool {
    if costs.len() < 2 {
        return false;
    }
    let (last, rest) = costs.split_last().expect("len >= 2");
    let last = *last as f64;
    if costs.len() < COST_WINDOW {
        let mean = rest.iter().sum::<u64>() as f64 / rest.len() as f64;
        return last > mean * 20.0 && last > 0.0;
    }
    let n = costs.len() as f64;
    let mean = costs.iter().sum::<u64>() as f64 / n;
    let variance = costs
        .iter()
        .map(|c| (*c as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    last > mean + 3.0 * variance.sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_quality_table() {
        for (tx, max, want) in [
            (0, 0, 1.0),
            (0, 1000, 1.0),
            (250, 1000, 0.75),
            (1000, 1000, 0.0),
            (2000, 1000, 0.0),
        ] {
            assert_eq!(load_quality(tx, max), want, "tx {tx} max {max}");
        }
    }

    #[test]
    fn coverage_table() {
        let p = |useful, missing, active| ParentStats {
            useful_pieces: useful,
            child_missing: missing,
            active,
            ..Default::default()
        };
        for (parent, want) in [
            (p(10, 10, true), 1.0),
            (p(5, 10, true), 0.5),
            (p(20, 10, true), 1.0),
            (p(0, 10, true), 0.1),
            (p(0, 10, false), 0.0),
            (p(0, 0, true), 0.5),
            (p(0, 0, false), 0.0),
        ] {
            assert_eq!(coverage(&parent), want, "{parent:?}");
        }
    }

    #[test]
    fn spread_table() {
        for (children, max, want) in [
            (0, 8, 1.0),
            (2, 8, 0.75),
            (8, 8, 0.0),
            (9, 8, 0.0),
            (0, 0, 0.0),
        ] {
            assert_eq!(spread(children, max), want);
        }
    }

    #[test]
    fn affinity_tables() {
        for (p, c, want) in [
            (Some("idc1"), Some("IDC1"), 1.0),
            (Some("idc1"), Some("idc2"), 0.0),
            (Some(""), Some(""), 0.0),
            (None, Some("idc1"), 0.0),
        ] {
            assert_eq!(idc_affinity(p, c), want, "{p:?} {c:?}");
        }
        for (p, c, want) in [
            (Some("cn|zj|hz|a|x"), Some("cn|zj|hz|a|x"), 1.0),
            (Some("cn|zj|hz"), Some("cn|zj|hz"), 1.0),
            (Some("cn|zj|hz|a"), Some("cn|zj|sh|a"), 0.4),
            (Some("cn"), Some("us"), 0.0),
            (None, Some("cn"), 0.0),
        ] {
            assert!((location_affinity(p, c) - want).abs() < 1e-9, "{p:?} {c:?}");
        }
    }

    #[test]
    fn host_type_table() {
        for (seed, active, warm, want) in [
            (true, true, 0, 1.0),
            (true, true, 1, 1.0),
            (true, true, 2, 0.5),
            (true, false, 0, 0.0),
            (false, true, 0, 0.5),
            (false, false, 5, 0.5),
        ] {
            assert_eq!(
                host_type(seed, active, warm),
                want,
                "{seed} {active} {warm}"
            );
        }
    }

    #[test]
    fn a_peer_with_what_the_child_lacks_beats_a_busy_seed_in_a_warm_swarm() {
        let child = ChildStats {
            warm_holders: 4,
            ..Default::default()
        };
        let seed = ParentStats {
            is_seed: true,
            active: true,
            useful_pieces: 60,
            child_missing: 60,
            children: 6,
            max_children: 8,
            max_tx_bps: 1000,
            tx_bps: 800,
            ..Default::default()
        };
        let peer = ParentStats {
            active: true,
            useful_pieces: 40,
            child_missing: 60,
            children: 1,
            max_children: 8,
            max_tx_bps: 1000,
            tx_bps: 100,
            ..Default::default()
        };
        assert!(score(&peer, &child) > score(&seed, &child));
        // In a cold swarm the seed wins.
        let cold = ChildStats::default();
        let fresh_seed = ParentStats {
            tx_bps: 0,
            children: 0,
            ..seed
        };
        assert!(score(&fresh_seed, &cold) > score(&peer, &cold));
    }

    #[test]
    fn same_idc_breaks_a_tie() {
        let child = ChildStats {
            idc: Some("a"),
            ..Default::default()
        };
        let base = ParentStats {
            active: true,
            useful_pieces: 5,
            child_missing: 10,
            max_children: 8,
            ..Default::default()
        };
        let near = ParentStats {
            idc: Some("a"),
            ..base.clone()
        };
        assert!(score(&near, &child) > score(&base, &child));
    }

    #[test]
    fn bad_parent_table() {
        let full_normal: Vec<u64> = (0..COST_WINDOW as u64).map(|i| 100 + i % 3).collect();
        let mut full_outlier = full_normal.clone();
        *full_outlier.last_mut().unwrap() = 1000;
        for (costs, want) in [
            (vec![], false),
            (vec![5000], false),
            (vec![10, 10, 10], false),
            (vec![10, 10, 250], true),
            (vec![10, 10, 199], false),
            (vec![0, 0, 0], false),
            (full_normal, false),
            (full_outlier, true),
        ] {
            assert_eq!(is_bad_by_costs(&costs), want, "{costs:?}");
        }
    }
}
