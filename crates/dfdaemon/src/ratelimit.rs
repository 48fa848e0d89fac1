//! Byte-rate limits (bytes per second) shared by all transfers of one kind.

use leaky_bucket::RateLimiter;
use std::time::Duration;

/// A token bucket refilled ten times a second with one second of burst.
pub struct Bandwidth {
    limiter: RateLimiter,
    max: usize,
}

impl Bandwidth {
    pub fn new(bytes_per_second: u64) -> Bandwidth {
        let per_second = bytes_per_second.clamp(1024, usize::MAX as u64 / 2) as usize;
        let refill = (per_second / 10).max(1);
        Bandwidth {
            limiter: RateLimiter::builder()
                .max(per_second)
                .initial(refill)
                .refill(refill)
                .interval(Duration::from_millis(100))
                .build(),
            max: per_second,
        }
    }

    /// Waits until `bytes` may pass.
    pub async fn acquire(&self, mut bytes: usize) {
        while bytes > 0 {
            let take = bytes.min(self.max);
            self.limiter.acquire(take).await;
            bytes -= take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_rate() {
        let bw = Bandwidth::new(100 * 1024);
        let start = tokio::time::Instant::now();
        for _ in 0..30 {
            bw.acquire(10 * 1024).await;
        }
        // 300 KiB at 100 KiB/s with a 10 KiB head start: close to 3 s
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_millis(2500), "{elapsed:?}");
        assert!(elapsed <= Duration::from_millis(3500), "{elapsed:?}");
    }
}
