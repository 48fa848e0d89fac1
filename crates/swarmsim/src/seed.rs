//! The seed peer's super-seeding, as `dfdaemon::superseed` runs it, in simulated time:
//! a fresh piece is dealt to the first child told of it that has fewer than
//! [`DEAL_AHEAD`] dealt pieces it has not fetched yet, and offered to the others only
//! [`RELAY_GRACE`] after the seed first served it, or [`MAX_DEFER`] after it arrived.
//! Held-back offers are re-checked every [`RECHECK`] (the daemon's SyncPieces loop does).
//! Once every piece has been dealt or served, nothing distinct is left for the seed's
//! upload, and nothing is held back.

use std::collections::{BTreeMap, HashMap};

/// The daemon's waits (`dfdaemon::superseed`).
pub const RELAY_GRACE: f64 = 12.0;
pub const MAX_DEFER: f64 = 30.0;
pub const DEAL_AHEAD: u32 = 2;
/// How often the daemon re-checks pieces it holds back from a child (s).
pub const RECHECK: f64 = 0.2;

#[derive(Default)]
pub struct SuperSeed {
    /// The task's pieces.
    pub piece_count: u32,
    /// Children syncing with the seed, in arrival order.
    pub children: Vec<usize>,
    /// Piece -> the child it was dealt to.
    dealt: BTreeMap<u32, usize>,
    /// Child -> pieces dealt to it and not fetched yet.
    outstanding: HashMap<usize, u32>,
    /// Piece -> when the seed first served it.
    served: HashMap<u32, f64>,
    /// Piece -> when it arrived at the seed.
    arrived: HashMap<u32, f64>,
    /// Distinct pieces dealt or served (not lowered when a child leaves, as in the daemon).
    claimed: u32,
    /// Offers held back: (when to look again, child, piece).
    pub pending: Vec<(f64, usize, u32)>,
}

impl SuperSeed {
    pub fn new(piece_count: u32) -> SuperSeed {
        SuperSeed {
            piece_count,
            ..SuperSeed::default()
        }
    }

    pub fn join(&mut self, child: usize) {
        if !self.children.contains(&child) {
            self.children.push(child);
        }
    }

    /// `child` stops syncing with the seed: the pieces dealt to it are offered to the other
    /// children now.
    pub fn leave(&mut self, child: usize, t: f64) {
        self.children.retain(|c| *c != child);
        self.outstanding.remove(&child);
        for (piece, _) in self.dealt.iter().filter(|(_, o)| **o == child) {
            self.pending
                .extend(self.children.iter().map(|c| (t, *c, *piece)));
        }
        self.dealt.retain(|_, o| *o != child);
    }

    pub fn arrived(&mut self, piece: u32, t: f64) {
        self.arrived.insert(piece, t);
    }

    /// A child started fetching `piece` from the seed.
    pub fn served(&mut self, piece: u32, t: f64) {
        if self.served.contains_key(&piece) {
            return;
        }
        self.served.insert(piece, t);
        match self.dealt.get(&piece) {
            Some(owner) => {
                if let Some(n) = self.outstanding.get_mut(owner) {
                    *n = n.saturating_sub(1);
                }
            }
            None => self.claimed += 1,
        }
        let at = t + RELAY_GRACE;
        self.pending
            .extend(self.children.iter().map(|c| (at, *c, piece)));
    }

    /// When the seed may tell `child` of `piece` (None: now); dealing it to `child` when
    /// it is free and the child may take more.
    pub fn release(&mut self, child: usize, piece: u32, t: f64) -> Option<f64> {
        let age = t - self.arrived.get(&piece).copied().unwrap_or(t);
        let all_out = self.claimed >= self.piece_count;
        if all_out
            || age >= MAX_DEFER
            || self.children.len() <= 1
            || !self.children.contains(&child)
        {
            return None;
        }
        let cap = t + (MAX_DEFER - age);
        match self.dealt.get(&piece) {
            Some(owner) if *owner == child => return None,
            Some(_) => {}
            None if self.served.contains_key(&piece) => return None,
            None => {
                let mine = self.outstanding.entry(child).or_default();
                if *mine < DEAL_AHEAD {
                    *mine += 1;
                    self.dealt.insert(piece, child);
                    self.claimed += 1;
                    return None;
                }
                return Some((t + RECHECK).min(cap));
            }
        }
        match self.served.get(&piece) {
            Some(first) => {
                let at = first + RELAY_GRACE;
                (at > t).then_some(at.min(cap))
            }
            None => Some(cap), // its owner has not fetched it; `served` re-offers it
        }
    }

    /// Tells `child` of `piece` now or later; true when now.
    pub fn offer(&mut self, child: usize, piece: u32, t: f64) -> bool {
        match self.release(child, piece, t) {
            None => true,
            Some(at) => {
                self.pending.push((at, child, piece));
                false
            }
        }
    }

    /// Takes the pending offers due at `t`.
    pub fn due(&mut self, t: f64) -> Vec<(usize, u32)> {
        let mut due = Vec::new();
        self.pending.retain(|(at, child, piece)| {
            if *at <= t {
                due.push((*child, *piece));
                false
            } else {
                true
            }
        });
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_child_is_dealt_only_what_it_fetches() {
        let mut s = SuperSeed::new(16);
        s.join(0);
        s.join(1);
        for p in 0..8 {
            s.arrived(p, 0.0);
        }
        let now: Vec<(usize, u32)> = (0..8)
            .flat_map(|p| [(0, p), (1, p)])
            .filter(|(c, p)| s.offer(*c, *p, 0.0))
            .collect();
        assert_eq!(now, [(0, 0), (0, 1), (1, 2), (1, 3)]);
        // Child 1 fetches both; child 0 neither: at the next look child 1 takes 4 and 5.
        s.served(2, 0.1);
        s.served(3, 0.1);
        let later: Vec<(usize, u32)> = s
            .due(RECHECK)
            .into_iter()
            .filter(|(c, p)| s.offer(*c, *p, RECHECK))
            .collect();
        assert_eq!(later, [(1, 4), (1, 5)]);
        // Others are told of a served piece after the relay grace, or of any at the cap.
        assert_eq!(s.release(0, 2, 0.1 + RELAY_GRACE), None);
        assert_eq!(s.release(1, 0, MAX_DEFER), None);
        // A child that leaves gives its pieces to the others at once.
        s.leave(0, 1.0);
        let given: Vec<(usize, u32)> = s.due(1.0).into_iter().filter(|(c, _)| *c == 1).collect();
        assert!(
            given.contains(&(1, 0)) && given.contains(&(1, 1)),
            "{given:?}"
        );
    }
}
