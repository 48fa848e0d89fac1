//! Max-min fair sharing of host links among flows: each flow runs from one host's upload
//! to another's download, and each link's capacity is shared so that no flow can go faster
//! without slowing one that is no faster (progressive filling, run to a fixed number of
//! rounds: exact for the usual one- or two-bottleneck cases, within a few percent beyond).

/// One direction of transfer: `from`'s upload to `to`'s download, going no faster than
/// `cap` (bytes/s; a relayed read that caught up with the flight it follows can go only as
/// fast as that flight).
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub from: usize,
    pub to: usize,
    pub cap: f64,
}

/// Rounds of progressive filling.
const ROUNDS: usize = 6;

/// Rates (bytes/s) of `flows` given each host's `up` and `down` capacity (bytes/s).
/// `rates` is reused between calls (its length is set to `flows.len()`).
pub fn allocate(up: &[f64], down: &[f64], flows: &[Flow], rates: &mut Vec<f64>) {
    let hosts = up.len();
    rates.clear();
    rates.resize(flows.len(), 0.0);
    let mut up_left = up.to_vec();
    let mut down_left = down.to_vec();
    let mut frozen = vec![false; flows.len()];
    let mut out_n = vec![0u32; hosts];
    let mut in_n = vec![0u32; hosts];
    for _ in 0..ROUNDS {
        out_n.iter_mut().for_each(|n| *n = 0);
        in_n.iter_mut().for_each(|n| *n = 0);
        let mut active = 0;
        for (f, fr) in flows.iter().zip(&frozen) {
            if !fr {
                out_n[f.from] += 1;
                in_n[f.to] += 1;
                active += 1;
            }
        }
        if active == 0 {
            break;
        }
        // Each unfrozen flow gets the smaller of its two links' equal shares.
        for (i, f) in flows.iter().enumerate() {
            if frozen[i] {
                continue;
            }
            let share_up = up_left[f.from] / out_n[f.from] as f64;
            let share_down = down_left[f.to] / in_n[f.to] as f64;
            rates[i] = (rates[i] + share_up.min(share_down)).min(f.cap);
        }
        // Charge the links, then freeze the flows on a saturated link.
        up_left.copy_from_slice(up);
        down_left.copy_from_slice(down);
        for (f, r) in flows.iter().zip(rates.iter()) {
            up_left[f.from] -= r;
            down_left[f.to] -= r;
        }
        let eps = 1e-9;
        for (i, f) in flows.iter().enumerate() {
            if up_left[f.from] <= eps * up[f.from].max(1.0)
                || down_left[f.to] <= eps * down[f.to].max(1.0)
                || rates[i] >= f.cap
            {
                frozen[i] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(up: &[f64], down: &[f64], flows: &[(usize, usize)]) -> Vec<f64> {
        let flows: Vec<Flow> = flows
            .iter()
            .map(|&(from, to)| Flow {
                from,
                to,
                cap: f64::INFINITY,
            })
            .collect();
        let mut r = Vec::new();
        allocate(up, down, &flows, &mut r);
        r.iter().map(|x| (x * 1000.0).round() / 1000.0).collect()
    }

    #[test]
    fn max_min_fair_table() {
        // One sender, two receivers: half each.
        assert_eq!(
            rates(&[10.0, 10.0, 10.0], &[10.0; 3], &[(0, 1), (0, 2)]),
            [5.0, 5.0]
        );
        // A slow receiver frees upload for the other.
        assert_eq!(
            rates(&[10.0, 10.0, 10.0], &[10.0, 2.0, 10.0], &[(0, 1), (0, 2)]),
            [2.0, 8.0]
        );
        // Two senders into one receiver.
        assert_eq!(
            rates(&[10.0, 10.0, 10.0], &[10.0, 10.0, 4.0], &[(0, 2), (1, 2)]),
            [2.0, 2.0]
        );
        // A chain of bottlenecks: 0->1 and 0->2 share 0's upload; 2 also takes from 1.
        assert_eq!(
            rates(
                &[6.0, 10.0, 10.0],
                &[10.0, 10.0, 10.0],
                &[(0, 1), (0, 2), (1, 2)]
            ),
            [3.0, 3.0, 7.0]
        );
        // A capped flow (a relay that caught up with its flight) leaves the rest to others.
        let flows = [
            Flow {
                from: 0,
                to: 1,
                cap: 2.0,
            },
            Flow {
                from: 0,
                to: 2,
                cap: f64::INFINITY,
            },
        ];
        let mut r = Vec::new();
        allocate(&[10.0, 10.0, 10.0], &[10.0; 3], &flows, &mut r);
        assert_eq!(r, [2.0, 8.0]);
        // Nothing to do.
        assert!(rates(&[1.0], &[1.0], &[]).is_empty());
    }
}
