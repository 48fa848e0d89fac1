//! How long a long-lived session (a registration with its keepalive stream) waits before
//! it reconnects: doubling from 500 ms to at most 30 s, and back to 500 ms after a session
//! that lasted over a minute, so a brief outage after a long run is retried at once.

use std::time::Duration;

const FIRST: Duration = Duration::from_millis(500);
const MAX: Duration = Duration::from_secs(30);
const HEALTHY: Duration = Duration::from_secs(60);

/// The wait before the next reconnect attempt.
#[derive(Debug, Clone)]
pub struct Reconnect {
    next: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        Reconnect { next: FIRST }
    }
}

impl Reconnect {
    /// The wait after a session that lasted `lasted`; the one after it doubles.
    pub fn after(&mut self, lasted: Duration) -> Duration {
        if lasted > HEALTHY {
            self.next = FIRST;
        }
        let wait = self.next;
        self.next = (self.next * 2).min(MAX);
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_ceiling_and_resets_after_a_long_session() {
        let mut r = Reconnect::default();
        let short = Duration::from_secs(1);
        let waits: Vec<u64> = (0..8).map(|_| r.after(short).as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000]);
        assert_eq!(r.after(Duration::from_secs(61)), FIRST);
        assert_eq!(r.after(short), Duration::from_secs(1));
    }
}
