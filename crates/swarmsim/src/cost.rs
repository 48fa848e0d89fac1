//! The scheduler's cost as a swarm grows: `peers` peers spread over `tasks` tasks, each
//! holding a random part of its task's pieces and scheduled once (so the parent graph is
//! filled), then `decisions` scheduling decisions of random peers timed. Memory per peer
//! is measured by the binary (resident memory before and after), not here.

use d7y_scheduler::resource::{Limits, Resources};
use d7y_scheduler::scheduling::PeerState;
use dragonfly_api::common::v2 as common;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

/// What [`measure`] found.
#[derive(Debug, Clone)]
pub struct Cost {
    pub peers: usize,
    pub tasks: usize,
    /// Time to register every peer and schedule it once.
    pub setup: Duration,
    /// Mean time of one scheduling decision in the filled swarm.
    pub per_decision: Duration,
    /// Mean time of `has_available_peer` + `back_to_source_count` (the per-decision checks).
    pub per_check: Duration,
}

/// Builds the swarm in `res` (the caller keeps it alive to measure its memory).
pub fn measure(
    res: &mut Resources,
    peers: usize,
    tasks: usize,
    pieces: u32,
    decisions: usize,
) -> Cost {
    let mut rng = SmallRng::seed_from_u64(7);
    let limits = Limits::default();
    let task_id = |t: usize| format!("{t:064x}");
    let download = common::Download {
        url: "http://origin/file".into(),
        actual_content_length: Some(pieces as u64 * (4 << 20)),
        actual_piece_length: Some(4 << 20),
        actual_piece_count: Some(pieces as u64),
        ..Default::default()
    };
    let started = Instant::now();
    for t in 0..tasks {
        let host = format!("seed{t}");
        res.announce_host(common::Host {
            id: host.clone(),
            r#type: 1,
            ip: "10.255.0.1".into(),
            ..Default::default()
        });
        let id = format!("s{t}");
        res.register_peer(&host, &task_id(t), &id, &download)
            .expect("seed registers");
        let seed = res.peer_mut(&id).expect("seed");
        seed.state = PeerState::Succeeded;
        for n in 0..pieces {
            seed.pieces.insert(n);
        }
    }
    for i in 0..peers {
        let host = format!("h{i}");
        res.announce_host(common::Host {
            id: host.clone(),
            ip: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
            ..Default::default()
        });
        let id = format!("p{i}");
        res.register_peer(&host, &task_id(i % tasks), &id, &download)
            .expect("peer registers");
        let held = rng.gen_range(0..=pieces);
        let peer = res.peer_mut(&id).expect("peer");
        peer.state = PeerState::Running;
        for _ in 0..held {
            peer.pieces.insert(rng.gen_range(0..pieces));
        }
    }
    for i in 0..peers {
        res.schedule(&format!("p{i}"), &limits, &mut rng)
            .expect("known peer");
    }
    let setup = started.elapsed();
    let ids: Vec<String> = (0..decisions)
        .map(|_| format!("p{}", rng.gen_range(0..peers)))
        .collect();
    let started = Instant::now();
    for id in &ids {
        res.schedule(id, &limits, &mut rng).expect("known peer");
    }
    let per_decision = started.elapsed() / decisions.max(1) as u32;
    let started = Instant::now();
    let mut any = 0usize;
    for (k, _) in ids.iter().enumerate() {
        let t = task_id(k % tasks);
        any += res.has_available_peer(&t, "nobody") as usize + res.back_to_source_count(&t);
    }
    std::hint::black_box(any);
    let per_check = started.elapsed() / decisions.max(1) as u32;
    Cost {
        peers,
        tasks,
        setup,
        per_decision,
        per_check,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_cost_run_fills_the_graph_and_keeps_the_invariants() {
        let mut res = Resources::default();
        let c = measure(&mut res, 200, 4, 64, 100);
        assert_eq!((c.peers, c.tasks), (200, 4));
        res.check_invariants().unwrap();
        assert!(res.peers.values().any(|p| !p.parents.is_empty()));
    }
}
