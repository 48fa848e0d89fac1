//! Super-seeding: which child a seed peer tells of which piece, and when. Pure: time is
//! seconds on the caller's clock, children are whatever keys the caller uses (host IDs in
//! the daemon, host indices in the simulator), so the seed peer and the simulator run the
//! same rules.
//!
//! The seed's upload should carry distinct pieces (Kumar–Ross: the server pushes one copy;
//! the peers relay the rest to each other). So each fresh piece is *dealt* to one child
//! first: the first child told of it that has fewer than [`DEAL_AHEAD`] dealt pieces it has
//! not asked for yet. A child takes new pieces as fast as it fetches them, so the seed's
//! upload splits over the children in proportion to their rates, and a slow child is dealt
//! few. The others are told of a piece only [`RELAY_GRACE`] after the seed first served it
//! (they take it from the child that got it). A deal its child has not asked for within
//! [`MAX_DEFER`] lapses: the piece is dealt again to the next child with room, and the
//! child that let it lapse (it may have got the piece elsewhere) may be dealt fresh ones.
//! Every hold is counted from a deal or a serve, never from when the piece arrived here: a
//! seed that holds the whole file early deals it over the whole distribution time, which
//! grows with the file and shrinks with the rate (a cap from arrival once released every
//! piece to every child 30 s in, and at 50 Mbit the seed sent 9% of a 256 MiB file twice).
//!
//! The last distinct pieces: once no fresh piece is left to deal, a child with none dealt
//! takes over a piece waiting unasked at a child with a backlog ([`DEAL_AHEAD`] waiting,
//! or one waiting longer than twice the usual time from a deal to its request), so the last
//! pieces leave the seed at the pace of the children free to take them, not behind a slow
//! or busy one. Once every piece has been served once, nothing distinct is left for the
//! seed's upload and nothing is held back.
//!
//! A first serve that lags frees its piece too: a child the seed sends a piece slowly (its
//! downlink is slow or busy) also passes it on slowly, and the others that follow its
//! arrival (a cut-through relay, then a chain of them) all wait on that one slow flow.
//! A first serve that ended short of its bytes frees its piece at once. One that has run
//! [`LAG_FACTOR`] times the usual first serve (and at least [`LAG_FLOOR`]) frees it once no
//! fresh piece is left to deal: the fast children take a copy from the seed (the endgame's
//! idle parent holding the piece) instead of waiting out [`RELAY_GRACE`]. Caught on the
//! emulated hosts: a piece dealt late to the quarter-rate host, seven fast hosts in one
//! chain behind its 3 Mbit upload, ten seconds lost. Earlier than that, a copy of a lagging
//! piece costs the seed a distinct one (freed at once, the quarter row's fast hosts were
//! slower: 1.23-1.33 of their bound against 1.19-1.21).
//!
//! A child that leaves (its last SyncPieces stream ended: done, rescheduled or dead) frees
//! the pieces dealt to it: they are offered to everyone, since it can no longer pass them
//! on. A stream that ended because its child was told every piece it asked about is not a
//! departure: that child is fetching what it was told, and its deals stand (they lapse
//! after [`MAX_DEFER`] like any deal). Callers look at the pieces they hold back at least
//! every [`RECHECK`]: a request, a departure or the last piece going out may release them
//! early.

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

/// After the seed first served a piece, how long the others wait before it offers it too
/// (seconds).
pub const RELAY_GRACE: f64 = 12.0;
/// The longest a deal waits for its child's request before it lapses (seconds).
pub const MAX_DEFER: f64 = 30.0;
/// Pieces dealt to a child and not requested by it yet, at most.
pub const DEAL_AHEAD: u32 = 2;
/// How often a caller looks again at the pieces it holds back (seconds).
pub const RECHECK: f64 = 0.2;
/// A first serve lags once it has run this many times the usual first serve...
pub const LAG_FACTOR: f64 = 3.0;
/// ...and at least this long (seconds).
pub const LAG_FLOOR: f64 = 1.0;

/// How a piece's first serve ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ServeEnd {
    InTime,
    Lagged,
    /// Short of its bytes: the child may not have the piece at all.
    Short,
}

/// A piece's first serve: when a child first requested it, and how the first serve of it
/// to end went.
#[derive(Debug, Clone, Copy)]
struct FirstServe {
    at: f64,
    end: Option<ServeEnd>,
}

/// The next value of a moving mean (`None`: nothing measured yet).
fn moving_mean(mean: Option<f64>, sample: f64) -> f64 {
    mean.map_or(sample, |m| 0.8 * m + 0.2 * sample)
}

/// One task's dealing at a seed peer.
#[derive(Debug, Clone)]
pub struct Dealer<K> {
    /// Children syncing the task, in arrival order, with their number of open streams.
    children: Vec<(K, usize)>,
    /// Piece -> the child it is dealt to, and when it was dealt.
    dealt: BTreeMap<u32, (K, f64)>,
    /// Child -> pieces dealt to it that it has not requested yet.
    outstanding: HashMap<K, u32>,
    /// Piece -> its first serve.
    served: HashMap<u32, FirstServe>,
    /// Mean time a first serve takes (s), once measured.
    serve_time: Option<f64>,
    /// Distinct pieces dealt or served.
    claimed: u32,
    /// Mean time from a deal to its owner's request (s), once measured.
    wait: Option<f64>,
}

impl<K> Default for Dealer<K> {
    fn default() -> Self {
        Dealer {
            children: Vec::new(),
            dealt: BTreeMap::new(),
            outstanding: HashMap::new(),
            served: HashMap::new(),
            serve_time: None,
            claimed: 0,
            wait: None,
        }
    }
}

impl<K: Clone + Eq + Hash> Dealer<K> {
    /// A child opened a stream (a reconnect counts again, so it keeps its deals).
    pub fn join(&mut self, child: K) {
        match self.children.iter_mut().find(|(c, _)| *c == child) {
            Some((_, n)) => *n += 1,
            None => self.children.push((child, 1)),
        }
    }

    /// A child's stream ended. When it was its last, the pieces dealt to it are
    /// everyone's now; returns whether that happened.
    pub fn leave(&mut self, child: &K) -> bool {
        if !self.close_stream(child) {
            return false;
        }
        self.outstanding.remove(child);
        self.dealt.retain(|_, (owner, _)| owner != child);
        true
    }

    /// A child's stream ended because the child was told every piece it asked about: the
    /// pieces dealt to it stay dealt. Returns whether it was its last stream.
    pub fn told_everything(&mut self, child: &K) -> bool {
        self.close_stream(child)
    }

    /// Counts one stream of `child` closed; returns whether it was its last.
    fn close_stream(&mut self, child: &K) -> bool {
        let Some(i) = self.children.iter().position(|(c, _)| c == child) else {
            return false;
        };
        self.children[i].1 -= 1;
        if self.children[i].1 > 0 {
            return false;
        }
        self.children.remove(i);
        true
    }

    /// Whether `child` has a stream open.
    pub fn contains(&self, child: &K) -> bool {
        self.children.iter().any(|(c, _)| c == child)
    }

    /// No child is syncing: the caller may drop this dealer.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// Distinct pieces dealt or served so far.
    pub fn claimed(&self) -> u32 {
        self.claimed
    }

    /// How long a first serve usually takes (s), once measured.
    pub fn usual_serve(&self) -> Option<f64> {
        self.serve_time
    }

    /// A child requested `piece` at `now`.
    pub fn served(&mut self, piece: u32, now: f64) {
        if self.served.contains_key(&piece) {
            return;
        }
        self.served.insert(piece, FirstServe { at: now, end: None });
        match self.dealt.get(&piece) {
            Some((owner, at)) => {
                // Its owner asked for it: one fewer waiting, so it may be dealt another.
                if let Some(n) = self.outstanding.get_mut(owner) {
                    *n = n.saturating_sub(1);
                }
                let w = (now - at).max(0.0);
                self.wait = Some(moving_mean(self.wait, w));
            }
            None => self.claimed += 1,
        }
    }

    /// A serve of `piece` ended at `now`, with every byte sent (`complete`) or not. Only the
    /// first serve to end counts (later ones ran after the piece was offered to everyone);
    /// returns whether it freed its piece (it lagged or ended short).
    pub fn sent(&mut self, piece: u32, complete: bool, now: f64) -> bool {
        let limit = self.lag_limit().unwrap_or(f64::INFINITY);
        let Some(first) = self.served.get_mut(&piece) else {
            return false;
        };
        if first.end.is_some() {
            return false;
        }
        let took = (now - first.at).max(0.0);
        let end = if !complete {
            ServeEnd::Short
        } else if took > limit {
            ServeEnd::Lagged
        } else {
            ServeEnd::InTime
        };
        first.end = Some(end);
        if complete {
            // A lagging serve counts as no longer than the lag limit: the mean is the usual
            // serve, and still follows a seed whose serves all slow down.
            self.serve_time = Some(moving_mean(self.serve_time, took.min(limit)));
        }
        end != ServeEnd::InTime
    }

    /// How long a first serve runs before it lags, once the usual one is measured.
    fn lag_limit(&self) -> Option<f64> {
        self.serve_time.map(|t| (LAG_FACTOR * t).max(LAG_FLOOR))
    }

    /// When a piece's first serve frees the piece: at once when
    /// it ended short; once it lags, but only when no fresh piece is left to deal (while
    /// the seed still has distinct pieces to send, a copy of a lagging one costs one of
    /// them: on the emulated hosts' quarter row that made the fast hosts slower); never
    /// when it ended in time or nothing is measured yet.
    fn lags_at(&self, first: FirstServe, fresh_left: bool) -> f64 {
        match (first.end, self.lag_limit()) {
            (Some(ServeEnd::Short), _) => first.at,
            (Some(ServeEnd::Lagged), _) if !fresh_left => first.at,
            (None, Some(limit)) if !fresh_left => first.at + limit,
            _ => f64::INFINITY,
        }
    }

    /// When `child` may be told of `piece`: `None` means now (the piece may be dealt to it
    /// by this call); otherwise the time to ask again at the latest. `piece_count` is the
    /// task's, once known.
    pub fn release(
        &mut self,
        child: &K,
        piece: u32,
        piece_count: Option<u32>,
        now: f64,
    ) -> Option<f64> {
        let all_out = piece_count.is_some_and(|c| self.served.len() as u32 >= c);
        if all_out {
            return None;
        }
        if self.children.len() <= 1 || !self.contains(child) {
            return None; // a lone child takes everything; a stranger cannot be dealt to
        }
        let first_served = self.served.get(&piece).copied();
        if first_served.is_none() {
            self.lapse(piece, child, now);
        }
        let mine = self.outstanding.get(child).copied().unwrap_or(0);
        let fresh_left = piece_count.is_none_or(|c| self.claimed < c);
        match self.dealt.get(&piece) {
            Some((owner, _)) if owner == child => return None,
            Some((owner, at)) => {
                let theirs = self.outstanding.get(owner).copied().unwrap_or(0);
                let stuck = self.wait.is_some_and(|w| now - at > 2.0 * w + RECHECK);
                let takes_over = first_served.is_none()
                    && !fresh_left
                    && mine == 0
                    && (theirs >= DEAL_AHEAD || (theirs >= 1 && stuck));
                if takes_over {
                    let owner = owner.clone();
                    self.outstanding.insert(owner, theirs - 1);
                    self.outstanding.insert(child.clone(), 1);
                    self.dealt.insert(piece, (child.clone(), now));
                    return None;
                }
            }
            // Served, and the child it was dealt to is gone: everyone's now.
            None if first_served.is_some() => return None,
            None => {
                if mine < DEAL_AHEAD {
                    self.outstanding.insert(child.clone(), mine + 1);
                    self.dealt.insert(piece, (child.clone(), now));
                    self.claimed += 1;
                    return None;
                }
                // This child has enough waiting: the piece stays free for a child that
                // fetches faster.
                return Some(now + RECHECK);
            }
        }
        match first_served {
            Some(first) => {
                let at = (first.at + RELAY_GRACE).min(self.lags_at(first, fresh_left));
                (at > now).then_some(at)
            }
            // Its owner has not asked for it yet: looked at again soon (it lapses at the
            // latest [`MAX_DEFER`] after its deal).
            None => Some(now + RECHECK),
        }
    }

    /// Ends the deal of an unserved `piece` to a child other than `asker` when it waited
    /// [`MAX_DEFER`]: the piece is fresh again and its child has room for another.
    fn lapse(&mut self, piece: u32, asker: &K, now: f64) {
        let Some((owner, at)) = self.dealt.get(&piece) else {
            return;
        };
        if owner == asker || now - at < MAX_DEFER {
            return;
        }
        if let Some(n) = self.outstanding.get_mut(owner) {
            *n = n.saturating_sub(1);
        }
        self.dealt.remove(&piece);
        self.claimed = self.claimed.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dealer(children: &[&'static str]) -> Dealer<&'static str> {
        let mut d = Dealer::default();
        for c in children {
            d.join(*c);
        }
        d
    }

    #[test]
    fn designated_child_first_others_after_relay_grace() {
        let mut d = dealer(&["a"]);
        assert_eq!(d.release(&"a", 1, None, 0.0), None, "a lone child gets all");
        d.join("b");
        d.join("b"); // a reconnect keeps b's count
                     // Told first, each child is dealt the piece: 0 to a, 2 to b.
        assert_eq!(d.release(&"a", 0, None, 0.0), None);
        assert_eq!(d.release(&"b", 2, None, 0.0), None);
        // b is held back from a's piece, looking again soon.
        assert_eq!(d.release(&"b", 0, None, 0.0), Some(RECHECK));
        d.served(0, 1.0);
        assert_eq!(d.release(&"b", 0, None, 1.0), Some(1.0 + RELAY_GRACE));
        assert_eq!(d.release(&"b", 0, None, 1.0 + RELAY_GRACE), None);
        // b has room for a second deal.
        assert_eq!(d.release(&"b", 3, None, 2.0), None);
        assert!(d.release(&"b", 4, None, 2.0).is_some(), "b has two waiting");
        assert!(!d.leave(&"b"), "b still has a stream");
        assert!(d.release(&"a", 2, None, 2.0).is_some(), "piece 2 is b's");
        assert!(d.leave(&"b"));
        assert_eq!(d.release(&"a", 4, None, 2.0), None, "a alone again");
        assert!(d.leave(&"a") && d.is_empty());
    }

    #[test]
    fn a_child_told_everything_keeps_its_deals_one_that_left_frees_them() {
        let mut d = dealer(&["a", "b", "c"]);
        assert_eq!(d.release(&"a", 0, None, 0.0), None);
        assert_eq!(d.release(&"b", 1, None, 0.0), None);
        assert!(d.told_everything(&"a") && !d.contains(&"a"));
        assert!(d.release(&"c", 0, None, 0.1).is_some(), "0 is still a's");
        assert!(d.leave(&"b"));
        assert_eq!(
            d.release(&"c", 1, None, 0.1),
            None,
            "b left: 1 is everyone's"
        );
        // Unasked, a's deal lapses like any other.
        assert_eq!(d.release(&"c", 0, None, MAX_DEFER), None);
    }

    #[test]
    fn a_first_serve_that_lags_frees_its_piece_once_nothing_fresh_is_left() {
        // Six pieces; fast is dealt 0 and 1, slow 2 and 3, c 4: piece 5 is still fresh.
        let mut d = dealer(&["fast", "slow", "c"]);
        let count = Some(6);
        for (child, n) in [("fast", 0), ("fast", 1), ("slow", 2), ("slow", 3), ("c", 4)] {
            assert_eq!(d.release(&child, n, count, 0.0), None);
        }
        // Nothing measured yet: a serve running long is held back the usual grace.
        d.served(2, 0.0);
        assert_eq!(d.release(&"c", 2, count, 5.0), Some(RELAY_GRACE));
        // The usual first serve takes 0.5 s (fast's), so lagging is over 1.5 s.
        d.served(0, 1.0);
        assert!(!d.sent(0, true, 1.5));
        // Slow's piece 2 ended after 6 s: it lagged. It counts as 1.5 s in the usual serve
        // (0.8 * 0.5 + 0.2 * 1.5 = 0.7 s: lagging is over 2.1 s now).
        assert!(d.sent(2, true, 6.0));
        // While a fresh piece is left, a lagging piece is held back all the same...
        assert_eq!(d.release(&"fast", 2, count, 6.0), Some(RELAY_GRACE));
        d.served(3, 6.5);
        assert_eq!(d.release(&"c", 3, count, 6.9), Some(6.5 + RELAY_GRACE));
        // ...but a serve that ended short of its bytes frees its piece at once.
        d.served(1, 6.5);
        assert!(d.sent(1, false, 6.6));
        assert_eq!(d.release(&"c", 1, count, 6.6), None);
        // The last fresh piece is dealt: now the lagging ones go to everyone, the ended one
        // at once, the running one (3, requested at 6.5) once it has run 2.1 s.
        assert_eq!(d.release(&"fast", 5, count, 7.0), None);
        assert_eq!(d.release(&"c", 2, count, 7.0), None, "2 lagged");
        let lags = 6.5 + 3.0 * (0.8 * 0.5 + 0.2 * 1.5);
        assert_eq!(d.release(&"fast", 3, count, 7.0), Some(lags));
        assert_eq!(d.release(&"c", 3, count, lags), None);
        // A serve that ended in time holds its piece back the usual grace; only the first
        // serve to end counts.
        d.served(4, 9.0);
        assert!(!d.sent(4, true, 9.5));
        assert!(!d.sent(4, false, 9.6));
        assert_eq!(d.release(&"fast", 4, count, 12.0), Some(9.0 + RELAY_GRACE));
        // The floor: with serves of 0.1 s, one of 0.9 s is not lagging.
        let mut d = dealer(&["a", "b"]);
        for n in 0..4 {
            assert_eq!(d.release(&"a", n, Some(5), 0.0), None);
            d.served(n, 0.0);
            d.sent(n, true, if n == 3 { 0.9 } else { 0.1 });
        }
        assert_eq!(
            d.release(&"b", 4, Some(5), 1.0),
            None,
            "the last fresh piece"
        );
        assert_eq!(d.release(&"b", 3, Some(5), 1.0), Some(RELAY_GRACE));
        // Unknown pieces' serves are ignored.
        assert!(!d.sent(99, true, 5.0));
    }

    #[test]
    fn a_deal_not_asked_for_lapses_and_its_piece_is_dealt_again() {
        let mut d = dealer(&["a", "b"]);
        // a is dealt 0 and 1 and never asks for them (it got them elsewhere, or it lies).
        assert_eq!(d.release(&"a", 0, None, 0.0), None);
        assert_eq!(d.release(&"a", 1, None, 0.0), None);
        assert_eq!(
            d.release(&"a", 2, None, 0.0),
            Some(RECHECK),
            "a has two waiting"
        );
        // b is held back from a's piece until the deal is MAX_DEFER old...
        assert_eq!(d.release(&"b", 0, None, 1.0), Some(1.0 + RECHECK));
        assert!(d.release(&"b", 0, None, MAX_DEFER - 0.1).is_some());
        // ...then it is dealt to b, and a has room for a fresh piece again.
        assert_eq!(d.release(&"b", 0, None, MAX_DEFER), None);
        assert_eq!(d.release(&"a", 2, None, MAX_DEFER), None);
        assert_eq!(
            d.release(&"a", 3, None, MAX_DEFER),
            Some(MAX_DEFER + RECHECK)
        );
        assert!(
            d.release(&"a", 0, None, MAX_DEFER).is_some(),
            "0 is b's now"
        );
        assert_eq!(d.claimed(), 3, "0, 1 and 2, each once");
        // a asks for its lapsed piece after all: it is b's turn to be dealt more.
        d.served(0, MAX_DEFER + 1.0);
        assert_eq!(d.release(&"b", 3, None, MAX_DEFER + 1.0), None);
    }

    #[test]
    fn a_seed_that_holds_the_whole_file_early_keeps_dealing_it() {
        // Every piece arrived at 0; the children fetch at their pace for minutes: nothing
        // is offered to everyone before it was served, however old it is.
        let mut d = dealer(&["a", "b", "c"]);
        let count = Some(300);
        let mut from_seed = 0;
        for step in 0..100u32 {
            let now = step as f64 * 2.0;
            for (i, c) in ["a", "b", "c"].into_iter().enumerate() {
                let n = step * 3 + i as u32;
                assert_eq!(d.release(&c, n, count, now), None, "{c} dealt {n} at {now}");
                for other in ["a", "b", "c"].into_iter().filter(|o| *o != c) {
                    assert!(d.release(&other, n, count, now).is_some());
                }
                d.served(n, now + 1.0);
                from_seed += 1;
            }
        }
        assert_eq!(from_seed, 300);
        assert_eq!(d.claimed(), 300);
    }

    #[test]
    fn pieces_dealt_to_a_child_that_left_are_offered_to_everyone() {
        let mut d = dealer(&["a", "b", "c"]);
        assert_eq!(d.release(&"a", 0, None, 0.0), None);
        assert_eq!(d.release(&"b", 1, None, 0.0), None);
        d.served(0, 0.1);
        d.served(1, 0.1);
        assert!(d.release(&"b", 0, None, 0.2).is_some());
        assert!(d.release(&"c", 1, None, 0.2).is_some());
        // a dies: its piece goes to everyone now; b's stays b's to relay.
        d.leave(&"a");
        assert_eq!(d.release(&"b", 0, None, 0.3), None);
        assert_eq!(d.release(&"c", 0, None, 0.3), None);
        assert!(d.release(&"c", 1, None, 0.3).is_some());
    }

    #[test]
    fn a_child_that_fetches_slowly_is_dealt_only_what_it_takes() {
        let mut d = dealer(&["slow", "fast"]);
        let mut dealt: HashMap<&str, Vec<u32>> = HashMap::new();
        for n in 0..8 {
            for c in ["slow", "fast"] {
                if d.release(&c, n, None, 0.0).is_none() {
                    dealt.entry(c).or_default().push(n);
                }
            }
        }
        assert_eq!(dealt["slow"], [0, 1]);
        assert_eq!(dealt["fast"], [2, 3]);
        // The fast child asks for its pieces, the slow one does not: asked again, the fast
        // one is dealt the next ones, the slow one nothing more.
        for round in 0..3 {
            let t = round as f64;
            for n in dealt["fast"].clone() {
                d.served(n, t);
            }
            let mut got = Vec::new();
            for n in 4..8 {
                assert!(d.release(&"slow", n, None, t).is_some());
                if d.release(&"fast", n, None, t).is_none() && !dealt["fast"].contains(&n) {
                    got.push(n);
                }
            }
            assert!(got.len() <= DEAL_AHEAD as usize, "round {round}: {got:?}");
            dealt.get_mut("fast").unwrap().extend(got);
        }
        assert_eq!(dealt["fast"], [2, 3, 4, 5, 6, 7]);
        d.served(0, 3.0);
        assert_eq!(d.release(&"slow", 8, None, 3.0), None);
    }

    #[test]
    fn the_last_pieces_go_to_children_free_to_take_them() {
        // Four pieces, three children: a is dealt 0 and 1, b 2 and 3; no fresh piece is left.
        let mut d = dealer(&["a", "b", "c"]);
        let count = Some(4);
        for (c, n) in [("a", 0), ("a", 1), ("b", 2), ("b", 3)] {
            assert_eq!(d.release(&c, n, count, 0.0), None);
        }
        // c, with nothing dealt, takes over a piece waiting at a (two waiting there)...
        assert_eq!(d.release(&"c", 1, count, 0.0), None);
        // ...and nothing more while it has one waiting.
        assert!(d.release(&"c", 3, count, 0.0).is_some());
        // a asks for 0 and has none waiting: it takes over one of b's two.
        d.served(0, 0.5);
        assert_eq!(d.release(&"a", 3, count, 0.5), None);
        // b asks for 2. c's piece (1) is not taken from it while c keeps the usual pace...
        d.served(2, 1.0);
        assert!(d.release(&"b", 1, count, 1.2).is_some());
        // ...but is once it waited over twice the usual time from a deal to its request.
        assert_eq!(d.release(&"b", 1, count, 5.0), None);
        // Once every piece was served once, nothing is held back.
        for n in [1, 3] {
            d.served(n, 5.5);
        }
        assert_eq!(d.release(&"c", 0, count, 5.6), None);
        assert_eq!(d.release(&"c", 2, count, 5.6), None);
    }
}
