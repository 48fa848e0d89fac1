//! The seed peer's super-seeding in simulated time: the daemon's own rules
//! ([`d7y_picker::deal::Dealer`]) and its loop around them: pieces held back from a child
//! are looked at again every [`RECHECK`] (the daemon's SyncPieces loop does).

use d7y_picker::deal::Dealer;
pub use d7y_picker::deal::{DEAL_AHEAD, MAX_DEFER, RECHECK, RELAY_GRACE};

#[derive(Default)]
pub struct SuperSeed {
    /// The task's pieces.
    pub piece_count: u32,
    dealer: Dealer<usize>,
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

    /// `child` syncs with the seed (a simulated child has one stream: joining twice is
    /// joining once).
    pub fn join(&mut self, child: usize) {
        if !self.dealer.contains(&child) {
            self.dealer.join(child);
        }
    }

    /// `child` stops syncing with the seed: the pieces dealt to it are everyone's (the
    /// others' held-back offers of them are looked at again within [`RECHECK`]).
    pub fn leave(&mut self, child: usize, _t: f64) {
        self.dealer.leave(&child);
    }

    /// A child started fetching `piece` from the seed.
    pub fn served(&mut self, piece: u32, t: f64) {
        self.dealer.served(piece, t);
    }

    /// A fetch of `piece` from the seed ended, with all its bytes or not.
    pub fn sent(&mut self, piece: u32, complete: bool, t: f64) {
        self.dealer.sent(piece, complete, t);
    }

    /// Tells `child` of `piece` now or later; true when now.
    pub fn offer(&mut self, child: usize, piece: u32, t: f64) -> bool {
        match self
            .dealer
            .release(&child, piece, Some(self.piece_count), t)
        {
            None => true,
            Some(at) => {
                self.pending.push((at.min(t + RECHECK), child, piece));
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
    fn held_back_offers_are_looked_at_again_every_recheck() {
        let mut s = SuperSeed::new(16);
        s.join(0);
        s.join(1);
        s.join(1);
        let now: Vec<(usize, u32)> = (0..8)
            .flat_map(|p| [(0, p), (1, p)])
            .filter(|(c, p)| s.offer(*c, *p, 0.0))
            .collect();
        assert_eq!(now, [(0, 0), (0, 1), (1, 2), (1, 3)]);
        assert!(s.pending.iter().all(|(at, _, _)| *at <= RECHECK));
        // Child 1 fetches both; child 0 neither: at the next look child 1 takes 4 and 5.
        s.served(2, 0.1);
        s.served(3, 0.1);
        let later: Vec<(usize, u32)> = s
            .due(RECHECK)
            .into_iter()
            .filter(|(c, p)| s.offer(*c, *p, RECHECK))
            .collect();
        assert_eq!(later, [(1, 4), (1, 5)]);
        // A child that leaves frees its pieces: the other is told at its next look.
        s.leave(0, 1.0);
        let given: Vec<(usize, u32)> = s
            .due(1.0)
            .into_iter()
            .filter(|(c, p)| *c == 1 && s.offer(*c, *p, 1.0))
            .collect();
        assert!(
            given.contains(&(1, 0)) && given.contains(&(1, 1)),
            "{given:?}"
        );
    }
}
