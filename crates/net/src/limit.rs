//! Connection caps: in total and per remote address. A connection holds a [`ConnSlot`]
//! for as long as it lives; the per-address map only has entries for live connections, so
//! it is bounded by the total cap.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// The caps of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    pub max_connections: usize,
    pub max_per_ip: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 2048,
            max_per_ip: 128,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: usize,
    by_ip: HashMap<IpAddr, usize>,
}

/// Admits connections within [`ConnLimits`]; cheap to clone (clones share the counts).
#[derive(Clone)]
pub struct ConnLimiter {
    limits: ConnLimits,
    counts: Arc<Mutex<Counts>>,
}

/// Counts one live connection; released when dropped.
#[derive(Debug)]
pub struct ConnSlot {
    held: Option<(Arc<Mutex<Counts>>, IpAddr)>,
}

impl ConnSlot {
    /// A slot that counts nothing (outgoing connections).
    pub fn untracked() -> ConnSlot {
        ConnSlot { held: None }
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let Some((counts, ip)) = self.held.take() else {
            return;
        };
        let mut c = counts.lock().unwrap_or_else(|e| e.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                c.by_ip.remove(&ip);
            }
        }
    }
}

impl ConnLimiter {
    pub fn new(limits: ConnLimits) -> ConnLimiter {
        ConnLimiter {
            limits,
            counts: Arc::default(),
        }
    }

    pub fn limits(&self) -> ConnLimits {
        self.limits
    }

    /// Admits a connection from `ip`, or says which cap it hit.
    pub fn admit(&self, ip: IpAddr) -> Result<ConnSlot, String> {
        let ip = ip.to_canonical();
        let mut c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if c.total >= self.limits.max_connections {
            return Err(format!(
                "at most {} connections are served at once",
                self.limits.max_connections
            ));
        }
        let from_ip = c.by_ip.get(&ip).copied().unwrap_or(0);
        if from_ip >= self.limits.max_per_ip {
            return Err(format!(
                "at most {} connections from {ip} are served at once",
                self.limits.max_per_ip
            ));
        }
        c.total += 1;
        *c.by_ip.entry(ip).or_default() += 1;
        Ok(ConnSlot {
            held: Some((self.counts.clone(), ip)),
        })
    }

    /// Live connections (in total, and from `ip`).
    pub fn live(&self, ip: Option<IpAddr>) -> usize {
        let c = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        match ip {
            None => c.total,
            Some(ip) => c.by_ip.get(&ip.to_canonical()).copied().unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_in_total_and_per_address_and_release_on_drop() {
        let limiter = ConnLimiter::new(ConnLimits {
            max_connections: 3,
            max_per_ip: 2,
        });
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let s1 = limiter.admit(a).unwrap();
        let _s2 = limiter.admit(mapped).unwrap();
        assert!(limiter.admit(a).unwrap_err().contains("from 10.0.0.1"));
        let _s3 = limiter.admit(b).unwrap();
        assert!(limiter
            .admit("10.0.0.3".parse().unwrap())
            .unwrap_err()
            .contains("at most 3"));
        drop(s1);
        assert_eq!(limiter.live(Some(a)), 1);
        let _s4 = limiter.admit(a).unwrap();
        assert_eq!(limiter.live(None), 3);
    }
}
