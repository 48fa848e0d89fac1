//! Candidate filtering and ranking: which peers may be a child's parents, best first, and
//! how many children a parent takes. Pure: it sees plain snapshots built by
//! [`crate::resource`], which then walks the ranking and adds the edges.

use crate::evaluator::{self, ChildStats, ParentStats};
use std::collections::{HashMap, HashSet};

/// A peer's lifecycle, named as upstream names it on the wire (`Peer.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PeerState {
    /// Registered, not yet started.
    Received,
    /// Downloading from parents.
    Running,
    /// Downloading from the origin.
    BackToSource,
    Succeeded,
    Failed,
    /// Its stream ended before it finished.
    Leave,
}

impl PeerState {
    pub fn as_str(self) -> &'static str {
        match self {
            PeerState::Received => "ReceivedNormal",
            PeerState::Running => "Running",
            PeerState::BackToSource => "BackToSource",
            PeerState::Succeeded => "Succeeded",
            PeerState::Failed => "Failed",
            PeerState::Leave => "Leave",
        }
    }

    /// Still downloading (it will want parents and will gain pieces).
    pub fn is_downloading(self) -> bool {
        matches!(self, PeerState::Running | PeerState::BackToSource)
    }
}

/// One candidate parent as the filter sees it.
#[derive(Debug, Clone)]
pub struct Candidate<'a> {
    pub peer_id: &'a str,
    pub host_id: &'a str,
    pub state: PeerState,
    pub disable_shared: bool,
    /// Number of parents it has now.
    pub in_degree: u32,
    /// Reported by a child as serving corrupt data, or its piece costs are outliers.
    pub bad: bool,
    pub stats: ParentStats<'a>,
}

/// The child being scheduled.
#[derive(Debug, Clone)]
pub struct Child<'a> {
    pub peer_id: &'a str,
    pub host_id: &'a str,
    pub blocklist: &'a HashSet<String>,
    pub stats: ChildStats<'a>,
}

impl Candidate<'_> {
    /// At its children cap (seed peers included).
    pub fn is_full(&self) -> bool {
        self.stats.children >= self.stats.max_children
    }
}

/// Why a candidate cannot be a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    Itself,
    SameHost,
    Blocklisted,
    DisableShared,
    /// Failed, left, or registered without starting.
    NotActive,
    /// No pieces, no parents, not at the origin: nothing to give now or soon.
    NothingToGive,
    Bad,
    /// At its children cap (seed peers too). Soft: see [`rank`]'s `allow_full`.
    Full,
}

/// Whether `candidate` may be a parent of `child` (the cycle check is separate).
pub fn filter(child: &Child<'_>, candidate: &Candidate<'_>) -> Result<(), Rejection> {
    if candidate.peer_id == child.peer_id {
        return Err(Rejection::Itself);
    }
    if candidate.host_id == child.host_id {
        return Err(Rejection::SameHost);
    }
    if child.blocklist.contains(candidate.peer_id) {
        return Err(Rejection::Blocklisted);
    }
    if candidate.disable_shared {
        return Err(Rejection::DisableShared);
    }
    match candidate.state {
        PeerState::Succeeded | PeerState::BackToSource => {}
        // A downloading peer gives what it holds that the child lacks, or soon what its own
        // parents send it; with neither it has nothing to give. A registered peer that was
        // given parents is about to download (its "started" event is on the way): peers
        // that register together can feed each other from their first pieces.
        PeerState::Running | PeerState::Received => {
            if candidate.stats.useful_pieces == 0 && candidate.in_degree == 0 {
                return Err(if candidate.state == PeerState::Received {
                    Rejection::NotActive
                } else {
                    Rejection::NothingToGive
                });
            }
        }
        PeerState::Failed | PeerState::Leave => return Err(Rejection::NotActive),
    }
    if candidate.bad {
        return Err(Rejection::Bad);
    }
    if candidate.is_full() {
        return Err(Rejection::Full);
    }
    Ok(())
}

/// How many children a parent serves at once: as many as its upload covers at the share a
/// child asks of each parent (the child's download rate over the `fill` parents that fill
/// it), at least one, and never more than the configured `ceiling`. Rates of 0 are
/// unknown: `fill` children, as if every link were equal. Equal links give `fill`
/// children; a parent with half the upload takes half as many (at least one); a fat seed,
/// up to the ceiling.
pub fn children_cap(parent_tx_bps: u64, child_rx_bps: u64, fill: usize, ceiling: u32) -> u32 {
    let ceiling = ceiling.max(1);
    if parent_tx_bps == 0 || child_rx_bps == 0 {
        return (fill.max(1) as u32).min(ceiling);
    }
    let share = (child_rx_bps as f64 / fill.max(1) as f64).max(1.0);
    let cap = (parent_tx_bps as f64 / share).round();
    (cap.min(ceiling as f64) as u32).clamp(1, ceiling)
}

/// The download rates of a parent's children, kept as the edges change (a sum, so a
/// decision does not visit each candidate's children).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ChildrenRx {
    /// Children with a known download rate, and the sum of those rates.
    pub known: u32,
    pub known_bps: u64,
    /// Children whose host announced no rate.
    pub unknown: u32,
}

impl ChildrenRx {
    pub fn of(rates: impl IntoIterator<Item = u64>) -> ChildrenRx {
        let mut c = ChildrenRx::default();
        for rx in rates {
            c.add(rx);
        }
        c
    }

    pub fn add(&mut self, rx_bps: u64) {
        if rx_bps == 0 {
            self.unknown += 1;
        } else {
            self.known += 1;
            self.known_bps = self.known_bps.saturating_add(rx_bps);
        }
    }

    pub fn remove(&mut self, rx_bps: u64) {
        if rx_bps == 0 {
            self.unknown = self.unknown.saturating_sub(1);
        } else {
            self.known = self.known.saturating_sub(1);
            self.known_bps = self.known_bps.saturating_sub(rx_bps);
        }
    }

    pub fn count(&self) -> u32 {
        self.known + self.unknown
    }
}

/// [`children_cap`] by the rates of the children a parent already has: each child asks of a
/// parent 1/`fill` of its own download rate, so a parent takes this child while its
/// children's asks and this child's fit in its upload. A cap counted for the child at hand
/// alone would let a fast parent fill up with slow children and then turn fast ones away
/// (its count reached at their larger ask), holding fast hosts to slow ones' pace.
/// `others` are the parent's other children (those of unknown rate count as this child).
/// Returns the count the parent may reach with this child: at least one when it has no
/// child, never more than `ceiling`.
pub fn children_cap_by_load(
    parent_tx_bps: u64,
    child_rx_bps: u64,
    others: ChildrenRx,
    fill: usize,
    ceiling: u32,
) -> u32 {
    if parent_tx_bps == 0 || child_rx_bps == 0 {
        return children_cap(parent_tx_bps, child_rx_bps, fill, ceiling);
    }
    let fill = fill.max(1) as f64;
    let ask = child_rx_bps as f64 / fill;
    let load = (others.known_bps as f64 + others.unknown as f64 * child_rx_bps as f64) / fill;
    // The child's ask fits when at most half of it is over (the rounding of children_cap).
    let room = (parent_tx_bps as f64 - load) / ask;
    let more = if room >= 0.5 {
        room.round().max(1.0) as u32
    } else {
        0
    };
    (others.count() + more).clamp(1, ceiling.max(1))
}

/// The share of a child's download one parent covers: its upload split over its
/// `children_cap` children, but never more than 1/`fill` of the child's rate (so `fill`
/// parents at least, even under a fat seed). Unknown rates: 1/`fill`.
pub fn share_of_child(
    parent_tx_bps: u64,
    children_cap: u32,
    child_rx_bps: u64,
    fill: usize,
) -> f64 {
    let most = 1.0 / fill.max(1) as f64;
    if parent_tx_bps == 0 || child_rx_bps == 0 {
        return most;
    }
    let per_child = parent_tx_bps as f64 / children_cap.max(1) as f64;
    (per_child / child_rx_bps as f64).min(most)
}

/// Rejected candidates by reason (full ones included even when `allow_full` kept them).
pub type Rejections = HashMap<Rejection, usize>;

/// The candidates that pass [`filter`], best first, with their scores, and a tally of the
/// others by reason. With `allow_full`, those rejected only for being at their children
/// cap follow them: the caller's last resort (it takes one only when no open candidate
/// could be used, e.g. all are the child's descendants). Ties keep the input order, which
/// the caller randomises, so equal parents share the load.
pub fn rank<'a>(
    child: &Child<'_>,
    candidates: Vec<Candidate<'a>>,
    allow_full: bool,
) -> (Vec<(Candidate<'a>, f64)>, Rejections) {
    let mut rejections = Rejections::new();
    let mut ranked: Vec<(Candidate<'a>, f64)> = candidates
        .into_iter()
        .filter(|c| match filter(child, c) {
            Ok(()) => true,
            Err(why) => {
                *rejections.entry(why).or_default() += 1;
                why == Rejection::Full && allow_full
            }
        })
        .map(|c| {
            let s = evaluator::score(&c.stats, &child.stats);
            (c, s)
        })
        .collect();
    sort_ranked(&mut ranked);
    (ranked, rejections)
}

/// Open candidates first, then full ones; best score first within each.
pub fn sort_ranked(ranked: &mut [(Candidate<'_>, f64)]) {
    ranked.sort_by(|a, b| a.0.is_full().cmp(&b.0.is_full()).then(b.1.total_cmp(&a.1)));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand<'a>(id: &'a str, host: &'a str, state: PeerState) -> Candidate<'a> {
        Candidate {
            peer_id: id,
            host_id: host,
            state,
            disable_shared: false,
            in_degree: 1,
            bad: false,
            stats: ParentStats {
                active: true,
                useful_pieces: 3,
                child_missing: 10,
                max_children: 4,
                ..Default::default()
            },
        }
    }

    #[test]
    fn filter_table() {
        let blocked: HashSet<String> = ["blocked".to_string()].into();
        let child = Child {
            peer_id: "me",
            host_id: "my-host",
            blocklist: &blocked,
            stats: ChildStats::default(),
        };
        let mut empty_running = cand("p", "h", PeerState::Running);
        empty_running.in_degree = 0;
        empty_running.stats.useful_pieces = 0;
        let mut stale = cand("p", "h", PeerState::Running);
        stale.stats.useful_pieces = 0;
        stale.in_degree = 0;
        let mut waiting_with_parent = cand("p", "h", PeerState::Running);
        waiting_with_parent.stats.useful_pieces = 0;
        let mut bad = cand("p", "h", PeerState::Succeeded);
        bad.bad = true;
        let mut full = cand("p", "h", PeerState::Running);
        full.stats.children = 4;
        let mut full_seed = full.clone();
        full_seed.stats.is_seed = true;
        let mut leech = cand("p", "h", PeerState::Succeeded);
        leech.disable_shared = true;
        let mut just_registered = cand("p", "h", PeerState::Received);
        just_registered.in_degree = 0;
        just_registered.stats.useful_pieces = 0;
        let mut registered_with_parent = cand("p", "h", PeerState::Received);
        registered_with_parent.stats.useful_pieces = 0;
        let mut origin_fetcher = cand("p", "h", PeerState::BackToSource);
        origin_fetcher.in_degree = 0;
        origin_fetcher.stats.useful_pieces = 0;
        for (candidate, want) in [
            (
                cand("me", "other", PeerState::Running),
                Err(Rejection::Itself),
            ),
            (
                cand("p", "my-host", PeerState::Running),
                Err(Rejection::SameHost),
            ),
            (
                cand("blocked", "h", PeerState::Running),
                Err(Rejection::Blocklisted),
            ),
            (leech, Err(Rejection::DisableShared)),
            (just_registered, Err(Rejection::NotActive)),
            (registered_with_parent, Ok(())),
            (cand("p", "h", PeerState::Failed), Err(Rejection::NotActive)),
            (cand("p", "h", PeerState::Leave), Err(Rejection::NotActive)),
            (empty_running, Err(Rejection::NothingToGive)),
            (stale, Err(Rejection::NothingToGive)),
            (waiting_with_parent, Ok(())),
            (origin_fetcher, Ok(())),
            (bad, Err(Rejection::Bad)),
            (full, Err(Rejection::Full)),
            (full_seed, Err(Rejection::Full)),
            (cand("p", "h", PeerState::Running), Ok(())),
            (cand("p", "h", PeerState::Succeeded), Ok(())),
        ] {
            assert_eq!(filter(&child, &candidate), want, "{candidate:?}");
        }
    }

    #[test]
    fn children_cap_follows_the_upload_rate() {
        const M: u64 = 1_000_000;
        for (parent_tx, child_rx, fill, ceiling, want) in [
            // Unknown rates: as if equal, `fill` children.
            (0, 100 * M, 2, 8, 2),
            (100 * M, 0, 2, 8, 2),
            (0, 0, 16, 8, 8),
            // Equal links: `fill` children each.
            (100 * M, 100 * M, 2, 8, 2),
            (100 * M, 100 * M, 8, 8, 8),
            (100 * M, 100 * M, 8, 16, 8),
            // Half the upload, half the children; a quarter, a quarter (at least one).
            (50 * M, 100 * M, 8, 8, 4),
            (25 * M, 100 * M, 8, 8, 2),
            (25 * M, 100 * M, 2, 8, 1),
            // A trickle still serves one.
            (M, 100 * M, 8, 8, 1),
            // A fat seed: up to the ceiling only.
            (10_000 * M, 100 * M, 2, 8, 8),
            (10_000 * M, 100 * M, 8, 64, 64),
            // A slow child asks little of each parent.
            (100 * M, 25 * M, 8, 64, 32),
            // Degenerate settings do not panic.
            (100 * M, 100 * M, 0, 8, 1),
            (100 * M, 100 * M, 8, 0, 1),
        ] {
            assert_eq!(
                children_cap(parent_tx, child_rx, fill, ceiling),
                want,
                "{parent_tx} {child_rx} {fill} {ceiling}"
            );
        }
    }

    #[test]
    fn children_cap_counts_the_asks_of_the_children_a_parent_has() {
        const M: u64 = 1_000_000;
        for (parent_tx, child_rx, children, fill, ceiling, want) in [
            // No child yet: as children_cap.
            (200 * M, 200 * M, vec![], 4, 8, 4),
            (0, 200 * M, vec![], 4, 8, 4),
            // Equal links: four children of the parent's rate fill it.
            (200 * M, 200 * M, vec![200 * M; 3], 4, 8, 4),
            (200 * M, 200 * M, vec![200 * M; 4], 4, 8, 4),
            // Four slow children ask for half the upload: a fast child still fits, twice.
            (200 * M, 200 * M, vec![100 * M; 4], 4, 8, 6),
            // Eight slow children fill it: a fast child is turned away (the count reached).
            (200 * M, 200 * M, vec![100 * M; 8], 4, 16, 8),
            // Unknown rates of the children count as the child's.
            (200 * M, 200 * M, vec![0; 2], 4, 8, 4),
            // The ceiling bounds it.
            (10_000 * M, 200 * M, vec![200 * M; 2], 4, 8, 8),
            // A slow parent with one child still serves another when half of its ask fits.
            (100 * M, 200 * M, vec![200 * M], 4, 8, 2),
            (25 * M, 200 * M, vec![], 4, 8, 1),
        ] {
            assert_eq!(
                children_cap_by_load(
                    parent_tx,
                    child_rx,
                    ChildrenRx::of(children.clone()),
                    fill,
                    ceiling
                ),
                want,
                "{parent_tx} {child_rx} {children:?} {fill} {ceiling}"
            );
        }
    }

    #[test]
    fn shares_fill_a_child_with_few_parents() {
        const M: u64 = 1_000_000;
        for (parent_tx, cap, child_rx, fill, want) in [
            // Equal links, two to fill: half each.
            (100 * M, 2, 100 * M, 2, 0.5),
            // A parent at a quarter of the rate, alone with its child: a quarter.
            (25 * M, 1, 100 * M, 2, 0.25),
            // A fat seed covers no more than its part: the child still gets `fill`.
            (10_000 * M, 8, 100 * M, 2, 0.5),
            // Unknown rates: 1/fill.
            (0, 2, 100 * M, 4, 0.25),
            (100 * M, 2, 0, 2, 0.5),
        ] {
            let got = share_of_child(parent_tx, cap, child_rx, fill);
            assert!(
                (got - want).abs() < 1e-9,
                "{parent_tx} {cap} {child_rx} {fill}: {got}"
            );
        }
    }

    #[test]
    fn rank_orders_by_score_and_drops_rejected() {
        let none = HashSet::new();
        let child = Child {
            peer_id: "me",
            host_id: "my-host",
            blocklist: &none,
            stats: ChildStats {
                warm_holders: 3,
                ..Default::default()
            },
        };
        let mut rich = cand("rich", "h1", PeerState::Running);
        rich.stats.useful_pieces = 9;
        let poor = cand("poor", "h2", PeerState::Running);
        let mut busy = cand("busy", "h3", PeerState::Running);
        busy.stats.useful_pieces = 9;
        busy.stats.children = 3;
        busy.stats.max_tx_bps = 100;
        busy.stats.tx_bps = 90;
        let same_host = cand("twin", "my-host", PeerState::Succeeded);
        let (ranked, _) = rank(&child, vec![poor, same_host, busy, rich], false);
        let ids: Vec<&str> = ranked.iter().map(|(c, _)| c.peer_id).collect();
        // A saturated parent ranks below an idle one holding less.
        assert_eq!(ids, ["rich", "poor", "busy"]);
    }

    #[test]
    fn full_parents_only_as_a_last_resort() {
        let none = HashSet::new();
        let child = Child {
            peer_id: "me",
            host_id: "my-host",
            blocklist: &none,
            stats: ChildStats::default(),
        };
        let full = |id: &'static str, seed: bool| {
            let mut c = cand(id, id, PeerState::Succeeded);
            c.stats.children = c.stats.max_children;
            c.stats.is_seed = seed;
            c
        };
        let mut bad = full("bad", false);
        bad.bad = true;
        let ids = |r: Vec<(Candidate<'_>, f64)>| -> Vec<String> {
            let mut v: Vec<String> = r.into_iter().map(|(c, _)| c.peer_id.to_string()).collect();
            v.sort();
            v
        };
        let all = || {
            vec![
                full("seed", true),
                full("p", false),
                bad.clone(),
                cand("open", "h", PeerState::Running),
            ]
        };
        // An open parent only, unless full ones are allowed: then after it.
        assert_eq!(ids(rank(&child, all(), false).0), ["open"]);
        let (ranked, rejected) = rank(&child, all(), true);
        assert_eq!(rejected[&Rejection::Full], 2);
        assert_eq!(rejected[&Rejection::Bad], 1);
        assert_eq!(ranked[0].0.peer_id, "open");
        assert_eq!(ids(ranked), ["open", "p", "seed"]);
        let full_only = || all().into_iter().filter(|c| c.peer_id != "open").collect();
        assert!(rank(&child, full_only(), false).0.is_empty());
        // As the last resort: the full ones rather than the origin, never a bad one.
        assert_eq!(ids(rank(&child, full_only(), true).0), ["p", "seed"]);
    }
}
