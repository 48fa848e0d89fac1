//! Super-seeding on a seed peer: the rules of [`d7y_picker::deal`] (each fresh piece dealt
//! to one child first, the others told once it was relayed, the last distinct pieces taken
//! over by children free to fetch them), kept per task for the children syncing it. The
//! SyncPieces handler asks [`SuperSeed::release_at`] before it tells a child of a piece and
//! looks again at least every [`d7y_picker::deal::RECHECK`]; the piece server reports every
//! request ([`SuperSeed::served`]) and every serve's end ([`SuperSeed::sent`]). A task's
//! state lives while a child syncs it, so the map is bounded by the open streams (themselves
//! capped by the upload server).

use d7y_picker::deal::Dealer;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct SuperSeed {
    /// The clock the dealers' seconds count from.
    epoch: Instant,
    /// Per task with children syncing: its dealing, keyed by child host.
    tasks: Mutex<HashMap<String, Dealer<String>>>,
}

impl Default for SuperSeed {
    fn default() -> Self {
        SuperSeed {
            epoch: Instant::now(),
            tasks: Mutex::default(),
        }
    }
}

impl SuperSeed {
    fn now(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64()
    }

    fn tasks(&self) -> std::sync::MutexGuard<'_, HashMap<String, Dealer<String>>> {
        self.tasks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A child (by host, so its reconnects keep its deals) opened a SyncPieces stream.
    pub fn join(&self, task_id: &str, host_id: &str) {
        self.tasks()
            .entry(task_id.to_string())
            .or_default()
            .join(host_id.to_string());
    }

    /// A child's stream ended; with the task's last child gone, its state goes too.
    pub fn leave(&self, task_id: &str, host_id: &str) {
        self.end_stream(task_id, |dealer| {
            if dealer.leave(&host_id.to_string()) {
                tracing::debug!(
                    task_id,
                    host_id,
                    "a child's last stream ended: the pieces dealt to it are offered to everyone"
                );
            }
        });
    }

    /// A child's stream ended because it was told every piece it asked about: it is still
    /// fetching them, so its deals stand.
    pub fn told_everything(&self, task_id: &str, host_id: &str) {
        self.end_stream(task_id, |dealer| {
            dealer.told_everything(&host_id.to_string());
        });
    }

    /// Ends a stream of the task's dealing with `end`; with the task's last child gone, its
    /// state goes too.
    fn end_stream(&self, task_id: &str, end: impl FnOnce(&mut Dealer<String>)) {
        let mut tasks = self.tasks();
        if let Some(dealer) = tasks.get_mut(task_id) {
            end(dealer);
            if dealer.is_empty() {
                tasks.remove(task_id);
            }
        }
    }

    /// Records that a child requested a piece (the piece server calls this).
    pub fn served(&self, task_id: &str, number: u32) {
        let now = self.now();
        if let Some(dealer) = self.tasks().get_mut(task_id) {
            dealer.served(number, now);
        }
    }

    /// Records that a serve of a piece ended, with every byte read out to the child
    /// (`complete`) or not (the piece server's guard calls this when it drops).
    pub fn sent(&self, task_id: &str, number: u32, complete: bool) {
        let now = self.now();
        let mut tasks = self.tasks();
        let Some(dealer) = tasks.get_mut(task_id) else {
            return;
        };
        let usual = dealer.usual_serve();
        if dealer.sent(number, complete, now) {
            tracing::debug!(
                task_id,
                piece = number,
                complete,
                usual_secs = ?usual,
                "first serve of a piece lagged or ended short: offered to every child now if \
                 short, once no fresh piece is left if it lagged"
            );
        }
    }

    /// How long a first serve of the task usually takes, once measured.
    pub fn usual_serve(&self, task_id: &str) -> Option<Duration> {
        let secs = self.tasks().get(task_id)?.usual_serve()?;
        Some(Duration::from_secs_f64(secs))
    }

    /// When `host_id` may be told of piece `number`: `None` means now. `piece_count` is
    /// the task's, once known.
    pub fn release_at(
        &self,
        task_id: &str,
        host_id: &str,
        number: u32,
        piece_count: Option<u32>,
    ) -> Option<Instant> {
        let now = self.now();
        let at = self.tasks().get_mut(task_id)?.release(
            &host_id.to_string(),
            number,
            piece_count,
            now,
        )?;
        Some(self.epoch + Duration::from_secs_f64(at.max(now)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use d7y_picker::deal::RELAY_GRACE;

    // The dealing rules are table-tested in `d7y_picker::deal`; these pin the wrapper:
    // tasks apart, hosts by their streams, times on the wall clock, state dropped.

    #[test]
    fn tasks_are_dealt_apart_and_forgotten_with_their_last_child() {
        let s = SuperSeed::default();
        for host in ["a", "b"] {
            s.join("t", host);
            s.join("u", host);
        }
        // Piece 0 of t is a's; piece 0 of u is b's.
        assert_eq!(s.release_at("t", "a", 0, None), None);
        assert_eq!(s.release_at("u", "b", 0, None), None);
        let held = s
            .release_at("t", "b", 0, None)
            .expect("a's piece is held back from b");
        assert!(
            held <= Instant::now() + Duration::from_millis(250),
            "{held:?}"
        );
        s.served("t", 0);
        let grace = s.release_at("t", "b", 0, None).unwrap();
        assert!(grace > Instant::now() + Duration::from_secs_f64(RELAY_GRACE - 1.0));
        // Unknown tasks and strangers hold nothing back.
        assert_eq!(s.release_at("v", "a", 0, None), None);
        assert_eq!(s.release_at("t", "c", 0, None), None);
        // A reconnect keeps a's deals until its last stream ends.
        s.join("t", "a");
        s.leave("t", "a");
        assert!(s.release_at("t", "b", 1, None).is_none());
        assert!(s.release_at("t", "b", 2, None).is_none());
        assert!(s.release_at("t", "a", 1, None).is_some());
        s.leave("t", "a");
        assert_eq!(s.release_at("t", "b", 5, None), None, "b alone");
        s.leave("t", "b");
        assert!(!s.tasks().contains_key("t"));
        assert!(s.tasks().contains_key("u"));
    }
}
