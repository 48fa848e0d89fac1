//! Super-seeding on a seed peer: each fresh piece is offered to one child first, and to the
//! others only once the seed has served it (plus [`RELAY_GRACE`] for the first child to
//! pass it on) or after [`MAX_DEFER`]. Meanwhile the other children take it from the child
//! that got it, so the seed's upload carries distinct pieces instead of the same piece N
//! times (Kumar–Ross: the server pushes one copy). Pieces are dealt when a child is told of
//! them, to that child if it has fewer than [`DEAL_AHEAD`] dealt pieces it has not asked
//! for yet (keyed by host, so reconnects keep their count): a child takes new pieces as
//! fast as it fetches them, so a slow child is dealt few and holds nobody back, and the
//! seed's upload splits over the children in proportion to their rates, as Kumar–Ross's
//! optimal scheme splits it. Once every piece of the task has been dealt or served, nothing
//! distinct is left for the seed's upload to carry, and nothing is held back any more: a
//! slow child's pieces then come from the seed too.
//! Pieces older than [`MAX_DEFER`] (a seed that finished long ago) are offered to everyone.
//! When a child leaves (its stream ends: done, rescheduled or dead), the pieces dealt to it
//! are offered to everyone at once: a child that died can no longer pass them on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// After the seed first served a piece, how long others wait before the seed offers it too.
pub const RELAY_GRACE: Duration = Duration::from_millis(12000);
/// The longest a piece is held back from a child.
pub const MAX_DEFER: Duration = Duration::from_secs(30);
/// Pieces dealt to a child and not requested by it yet, at most.
pub const DEAL_AHEAD: u32 = 2;

#[derive(Default)]
pub struct SuperSeed {
    /// Per task: children (host IDs, with the number of open streams), in arrival order.
    children: Mutex<HashMap<String, Vec<(String, usize)>>>,
    /// When each (task, piece) was first requested from this seed.
    served: Mutex<HashMap<(String, u32), Instant>>,
    /// Pieces dealt to a child first: (task, piece) -> host.
    dealt: Mutex<HashMap<(String, u32), String>>,
    /// Per (task, host): pieces dealt to it that it has not requested yet.
    outstanding: Mutex<HashMap<(String, String), u32>>,
    /// Per task: how many distinct pieces were dealt or served.
    claimed: Mutex<HashMap<String, u32>>,
}

impl SuperSeed {
    pub fn join(&self, task_id: &str, host_id: &str) {
        let mut children = self.children.lock().expect("super seed");
        let list = children.entry(task_id.to_string()).or_default();
        match list.iter_mut().find(|(h, _)| h == host_id) {
            Some((_, n)) => *n += 1,
            None => list.push((host_id.to_string(), 1)),
        }
    }

    pub fn leave(&self, task_id: &str, host_id: &str) {
        let mut children = self.children.lock().expect("super seed");
        if let Some(list) = children.get_mut(task_id) {
            if let Some(i) = list.iter().position(|(h, _)| h == host_id) {
                list[i].1 -= 1;
                if list[i].1 == 0 {
                    list.remove(i);
                    self.outstanding
                        .lock()
                        .expect("super seed")
                        .remove(&(task_id.to_string(), host_id.to_string()));
                    // Its pieces are nobody's now: offered to everyone from here on.
                    self.dealt
                        .lock()
                        .expect("super seed")
                        .retain(|(t, _), h| !(t == task_id && h == host_id));
                }
            }
            if list.is_empty() {
                children.remove(task_id);
                self.served
                    .lock()
                    .expect("super seed")
                    .retain(|(t, _), _| t != task_id);
                self.dealt
                    .lock()
                    .expect("super seed")
                    .retain(|(t, _), _| t != task_id);
                self.outstanding
                    .lock()
                    .expect("super seed")
                    .retain(|(t, _), _| t != task_id);
                self.claimed.lock().expect("super seed").remove(task_id);
            }
        }
    }

    /// Records that a child requested a piece (the piece server calls this).
    pub fn served(&self, task_id: &str, number: u32) {
        let key = (task_id.to_string(), number);
        let first = {
            let mut served = self.served.lock().expect("super seed");
            let first = !served.contains_key(&key);
            served.entry(key.clone()).or_insert_with(Instant::now);
            first
        };
        if first {
            // The piece's owner asked for it (others are not told of it yet): one fewer
            // outstanding, so it may be dealt another.
            let owner = self.dealt.lock().expect("super seed").get(&key).cloned();
            match owner {
                Some(owner) => {
                    let mut outstanding = self.outstanding.lock().expect("super seed");
                    if let Some(n) = outstanding.get_mut(&(task_id.to_string(), owner)) {
                        *n = n.saturating_sub(1);
                    }
                }
                None => self.claim(task_id),
            }
        }
    }

    fn claim(&self, task_id: &str) {
        *self
            .claimed
            .lock()
            .expect("super seed")
            .entry(task_id.to_string())
            .or_default() += 1;
    }

    /// When `host_id` may be told of piece `number`, which became available here `age` ago:
    /// `None` means now. `piece_count` is the task's, once known.
    pub fn release_at(
        &self,
        task_id: &str,
        host_id: &str,
        number: u32,
        age: Duration,
        piece_count: Option<u32>,
    ) -> Option<Instant> {
        if age >= MAX_DEFER {
            return None;
        }
        let all_out = piece_count.is_some_and(|count| {
            let claimed = self.claimed.lock().expect("super seed");
            claimed.get(task_id).copied().unwrap_or(0) >= count
        });
        if all_out {
            return None;
        }
        let key = (task_id.to_string(), number);
        let first_served = self.served.lock().expect("super seed").get(&key).copied();
        {
            use std::collections::hash_map::Entry;
            let children = self.children.lock().expect("super seed");
            let list = children.get(task_id).filter(|l| l.len() > 1)?;
            if !list.iter().any(|(h, _)| h == host_id) {
                return None; // not a child syncing this task (cannot be dealt to)
            }
            let mut dealt = self.dealt.lock().expect("super seed");
            match dealt.entry(key) {
                Entry::Occupied(e) if e.get() == host_id => return None,
                Entry::Occupied(_) => {}
                // Served, and the child it was dealt to is gone: everyone's now.
                Entry::Vacant(_) if first_served.is_some() => return None,
                Entry::Vacant(e) => {
                    let mut outstanding = self.outstanding.lock().expect("super seed");
                    let mine = outstanding
                        .entry((task_id.to_string(), host_id.to_string()))
                        .or_default();
                    if *mine < DEAL_AHEAD {
                        *mine += 1;
                        e.insert(host_id.to_string());
                        drop(outstanding);
                        self.claim(task_id);
                        return None;
                    }
                    // This child has enough waiting: the piece stays free for a child that
                    // fetches faster (asked again soon: the caller re-checks held pieces).
                }
            }
        }
        let now = Instant::now();
        let cap = now + (MAX_DEFER - age);
        match first_served {
            Some(first) => {
                let at = first + RELAY_GRACE;
                (at > now).then_some(at.min(cap))
            }
            None => Some(cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn designated_child_first_others_after_relay_grace_or_cap() {
        let s = SuperSeed::default();
        s.join("t", "a");
        assert_eq!(
            s.release_at("t", "a", 1, Duration::ZERO, None),
            None,
            "a lone child gets all"
        );
        s.join("t", "b");
        s.join("t", "b"); // a reconnect keeps b's count
                          // Told first, each child is dealt the piece: 0 to a, 2 to b.
        assert_eq!(s.release_at("t", "a", 0, Duration::ZERO, None), None);
        assert_eq!(s.release_at("t", "b", 2, Duration::ZERO, None), None);
        let later = s
            .release_at("t", "b", 0, Duration::ZERO, None)
            .expect("held back");
        assert!(later > Instant::now() + MAX_DEFER - Duration::from_secs(1));
        s.served("t", 0);
        let sooner = s
            .release_at("t", "b", 0, Duration::ZERO, None)
            .expect("grace");
        assert!(sooner <= Instant::now() + RELAY_GRACE);
        // Old pieces are not held back.
        assert_eq!(s.release_at("t", "b", 3, MAX_DEFER, None), None);
        s.leave("t", "b");
        assert!(
            s.release_at("t", "a", 2, Duration::ZERO, None).is_some(),
            "b still has a stream, and piece 2 is b's"
        );
        s.leave("t", "b");
        assert_eq!(
            s.release_at("t", "a", 4, Duration::ZERO, None),
            None,
            "a alone again"
        );
    }

    #[test]
    fn pieces_dealt_to_a_child_that_left_are_offered_to_everyone() {
        let s = SuperSeed::default();
        for host in ["a", "b", "c"] {
            s.join("t", host);
        }
        // Piece 0 is a's and piece 1 b's; both served, so the others wait for the relay.
        assert_eq!(s.release_at("t", "a", 0, Duration::ZERO, None), None);
        assert_eq!(s.release_at("t", "b", 1, Duration::ZERO, None), None);
        s.served("t", 0);
        s.served("t", 1);
        assert!(s.release_at("t", "b", 0, Duration::ZERO, None).is_some());
        assert!(s.release_at("t", "c", 1, Duration::ZERO, None).is_some());
        // a dies: its piece goes to everyone now; b's stays b's to relay.
        s.leave("t", "a");
        assert_eq!(s.release_at("t", "b", 0, Duration::ZERO, None), None);
        assert_eq!(s.release_at("t", "c", 0, Duration::ZERO, None), None);
        assert!(s.release_at("t", "c", 1, Duration::ZERO, None).is_some());
    }

    #[test]
    fn nothing_is_held_back_once_every_piece_was_dealt_or_served() {
        let s = SuperSeed::default();
        for host in ["a", "b"] {
            s.join("t", host);
        }
        assert_eq!(s.release_at("t", "a", 0, Duration::ZERO, Some(3)), None);
        assert_eq!(s.release_at("t", "b", 1, Duration::ZERO, Some(3)), None);
        s.served("t", 0);
        assert!(s.release_at("t", "b", 0, Duration::ZERO, Some(3)).is_some());
        // Piece 2 is dealt too: every piece is out; b may have 0 now.
        assert_eq!(s.release_at("t", "a", 2, Duration::ZERO, Some(3)), None);
        assert_eq!(s.release_at("t", "b", 0, Duration::ZERO, Some(3)), None);
        assert!(
            s.release_at("t", "b", 0, Duration::ZERO, None).is_some(),
            "an unknown piece count holds back as before"
        );
    }

    #[test]
    fn a_child_that_fetches_slowly_is_dealt_only_what_it_takes() {
        let s = SuperSeed::default();
        for host in ["slow", "fast"] {
            s.join("t", host);
        }
        // Both are told of pieces 0..8 as they arrive: each is dealt DEAL_AHEAD at most
        // while it has not asked for them.
        let mut dealt = HashMap::new();
        for n in 0..8 {
            for host in ["slow", "fast"] {
                if s.release_at("t", host, n, Duration::ZERO, None).is_none() {
                    dealt.entry(host).or_insert_with(Vec::new).push(n);
                }
            }
        }
        assert_eq!(dealt["slow"], [0, 1]);
        assert_eq!(dealt["fast"], [2, 3]);
        // The fast child fetches its pieces; the slow one does not yet. Asked again, the
        // fast one is dealt the next ones, the slow one nothing more.
        for round in 0..3 {
            for n in dealt["fast"].clone() {
                s.served("t", n);
            }
            let mut got = Vec::new();
            for n in 4..8 {
                assert!(s.release_at("t", "slow", n, Duration::ZERO, None).is_some());
                if s.release_at("t", "fast", n, Duration::ZERO, None).is_none()
                    && !dealt["fast"].contains(&n)
                {
                    got.push(n);
                }
            }
            assert!(got.len() <= DEAL_AHEAD as usize, "round {round}: {got:?}");
            dealt.get_mut("fast").unwrap().extend(got);
        }
        assert_eq!(dealt["fast"], [2, 3, 4, 5, 6, 7]);
        // Once the slow child fetches, it is dealt again (pieces are none left here).
        s.served("t", 0);
        assert_eq!(s.release_at("t", "slow", 8, Duration::ZERO, None), None);
    }
}
