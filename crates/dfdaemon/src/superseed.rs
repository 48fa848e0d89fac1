//! Super-seeding on a seed peer: each fresh piece is offered to one child first (pieces are
//! dealt round-robin over the children syncing the task, keyed by host so reconnects keep
//! their turn), and to the others only once the seed has served it (plus
//! [`RELAY_GRACE`] for the first child to pass it on) or after [`MAX_DEFER`]. Meanwhile the
//! other children take it from the child that got it, so the seed's upload carries distinct
//! pieces instead of the same piece N times (Kumar–Ross: the server pushes one copy).
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

#[derive(Default)]
pub struct SuperSeed {
    /// Per task: children (host IDs, with the number of open streams), in arrival order.
    children: Mutex<HashMap<String, Vec<(String, usize)>>>,
    /// When each (task, piece) was first requested from this seed.
    served: Mutex<HashMap<(String, u32), Instant>>,
    /// Pieces dealt to a child first: (task, piece) -> host.
    dealt: Mutex<HashMap<(String, u32), String>>,
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
            }
        }
    }

    /// Records that a child requested a piece (the piece server calls this).
    pub fn served(&self, task_id: &str, number: u32) {
        self.served
            .lock()
            .expect("super seed")
            .entry((task_id.to_string(), number))
            .or_insert_with(Instant::now);
    }

    /// When `host_id` may be told of piece `number`, which became available here `age` ago:
    /// `None` means now.
    pub fn release_at(
        &self,
        task_id: &str,
        host_id: &str,
        number: u32,
        age: Duration,
    ) -> Option<Instant> {
        if age >= MAX_DEFER {
            return None;
        }
        let key = (task_id.to_string(), number);
        let first_served = self.served.lock().expect("super seed").get(&key).copied();
        {
            use std::collections::hash_map::Entry;
            let children = self.children.lock().expect("super seed");
            let list = children.get(task_id).filter(|l| l.len() > 1)?;
            let mut dealt = self.dealt.lock().expect("super seed");
            let owner = match dealt.entry(key) {
                Entry::Occupied(e) => e.into_mut(),
                // Served, and the child it was dealt to is gone: everyone's now.
                Entry::Vacant(_) if first_served.is_some() => return None,
                Entry::Vacant(e) => e.insert(list[number as usize % list.len()].0.clone()),
            };
            if owner == host_id {
                return None;
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
            s.release_at("t", "a", 1, Duration::ZERO),
            None,
            "a lone child gets all"
        );
        s.join("t", "b");
        s.join("t", "b"); // a reconnect keeps b's turn
                          // Piece 0 goes to a, piece 1 to b.
        assert_eq!(s.release_at("t", "a", 0, Duration::ZERO), None);
        assert_eq!(s.release_at("t", "b", 1, Duration::ZERO), None);
        let later = s
            .release_at("t", "b", 0, Duration::ZERO)
            .expect("held back");
        assert!(later > Instant::now() + MAX_DEFER - Duration::from_secs(1));
        s.served("t", 0);
        let sooner = s.release_at("t", "b", 0, Duration::ZERO).expect("grace");
        assert!(sooner <= Instant::now() + RELAY_GRACE);
        // Old pieces are not held back.
        assert_eq!(s.release_at("t", "b", 2, MAX_DEFER), None);
        s.leave("t", "b");
        assert!(
            s.release_at("t", "b", 2, Duration::ZERO).is_some(),
            "b still has a stream"
        );
        s.leave("t", "b");
        assert_eq!(
            s.release_at("t", "a", 1, Duration::ZERO),
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
        assert_eq!(s.release_at("t", "a", 0, Duration::ZERO), None);
        assert_eq!(s.release_at("t", "b", 1, Duration::ZERO), None);
        s.served("t", 0);
        s.served("t", 1);
        assert!(s.release_at("t", "b", 0, Duration::ZERO).is_some());
        assert!(s.release_at("t", "c", 1, Duration::ZERO).is_some());
        // a dies: its piece goes to everyone now; b's stays b's to relay.
        s.leave("t", "a");
        assert_eq!(s.release_at("t", "b", 0, Duration::ZERO), None);
        assert_eq!(s.release_at("t", "c", 0, Duration::ZERO), None);
        assert!(s.release_at("t", "c", 1, Duration::ZERO).is_some());
        // A piece not dealt yet goes round the children left (2 % [b, c] = b).
        assert_eq!(s.release_at("t", "b", 2, Duration::ZERO), None);
        assert!(s.release_at("t", "c", 2, Duration::ZERO).is_some());
    }
}
