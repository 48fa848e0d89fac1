use super::*;
use rand::rngs::SmallRng;
use rand::SeedableRng;

fn rng() -> SmallRng {
    SmallRng::seed_from_u64(7)
}

fn cfg() -> Config {
    Config {
        concurrency: 64,
        piece_length: 1000,
        horizon_secs: 1.0,
        default_budget: 2,
        max_per_parent: 4,
        seed_share: 1,
        endgame_pieces: 2,
    }
}

/// A picker over `count` pieces with one parent per entry of `holds` (`(is_seed, pieces)`).
fn setup(count: u32, holds: &[(bool, &[u32])]) -> (Picker, Vec<ParentId>) {
    let mut p = Picker::new(count, cfg());
    let ids = holds
        .iter()
        .map(|(seed, pieces)| {
            let id = p.add_parent(*seed);
            p.set_usable(id, true);
            for n in *pieces {
                p.available(id, *n);
            }
            id
        })
        .collect();
    (p, ids)
}

#[test]
fn rarest_first_and_only_what_a_parent_holds() {
    // (what each normal parent holds, the first pick's piece and parent index)
    let table: &[(&[&[u32]], u32, usize)] = &[
        // A holds 0,1,2; B 1,2; C 2: A (least loaded, first) takes its rarest, 0.
        (&[&[0, 1, 2], &[1, 2], &[2]], 0, 0),
        // Only one parent holds 3, and it is the rarest there.
        (&[&[2, 3], &[2]], 3, 0),
        // A parent with nothing useful is skipped.
        (&[&[], &[5]], 5, 1),
    ];
    for (holds, piece, parent) in table {
        let holds: Vec<(bool, &[u32])> = holds.iter().map(|h| (false, *h)).collect();
        let (mut p, ids) = setup(8, &holds);
        let got = p.next(None, &mut rng());
        assert_eq!(
            got,
            Some((*piece, Source::Parent(ids[*parent]))),
            "{holds:?}"
        );
        p.check().unwrap();
    }
}

#[test]
fn ties_are_broken_at_random() {
    let mut seen = std::collections::HashSet::new();
    for seed in 0..64 {
        let (mut p, _) = setup(4, &[(false, &[0, 1, 2, 3])]);
        let (n, _) = p.next(None, &mut SmallRng::seed_from_u64(seed)).unwrap();
        seen.insert(n);
    }
    assert_eq!(seen.len(), 4, "{seen:?}");
}

#[test]
fn the_seed_gives_only_what_no_normal_parent_holds() {
    // The seed offers 0..4 of 5 (it still deals piece 4 to others); the normal parent holds
    // 0 and 1 but has budget for 2 only.
    let (mut p, ids) = setup(5, &[(true, &[0, 1, 2, 3]), (false, &[0, 1])]);
    let (seed, normal) = (ids[0], ids[1]);
    assert_eq!(
        p.budget(seed),
        1,
        "the seed's share while a normal parent is there"
    );
    assert_eq!(p.budget(normal), 2);
    let mut got: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    got.sort_by_key(|(n, _)| *n);
    // 0 and 1 from the normal parent, one of 2 and 3 from the seed (its share is 1), and
    // nothing else: the other waits for the seed.
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0], (0, Source::Parent(normal)));
    assert_eq!(got[1], (1, Source::Parent(normal)));
    assert_eq!(got[2].1, Source::Parent(seed));
    p.check().unwrap();
    // Without normal parents, its share until its rate is known (a swarm's first
    // moments), then what its rate covers.
    let (mut p, ids) = setup(5, &[(true, &[0, 1, 2, 3])]);
    assert_eq!(p.budget(ids[0]), 1);
    let (n, s) = p.next(None, &mut rng()).unwrap();
    p.finished(n, s, 3000, 1.0);
    assert_eq!(p.budget(ids[0]), 3);
    // A piece a busy normal parent holds is waited for, not taken from the seed.
    let (mut p, ids) = setup(5, &[(true, &[0, 1, 2, 3]), (false, &[0, 1, 2, 3])]);
    let picks: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    assert_eq!(picks.len(), 2, "{picks:?}");
    assert!(picks.iter().all(|(_, s)| *s == Source::Parent(ids[1])));
}

#[test]
fn a_dealing_seed_s_pieces_go_oldest_deal_first() {
    // The seed still deals (it offers 3, 7 and 12 of 16: dealt to this child, in piece
    // order), a normal parent holds 0: the seed's slot takes 3, then (after 3 lands) 7,
    // whatever the draw. A random pick between two waiting deals left one waiting round
    // after round and the whole swarm waited for it at the end.
    for seed in 0..32 {
        let (mut p, ids) = setup(16, &[(true, &[12, 3, 7]), (false, &[0])]);
        let mut r = SmallRng::seed_from_u64(seed);
        let mut from_seed = Vec::new();
        while let Some((n, s)) = p.next(None, &mut r) {
            if s == Source::Parent(ids[0]) {
                from_seed.push(n);
                p.finished(n, s, 1000, 1.0);
            }
        }
        assert_eq!(from_seed, [3, 7, 12], "draw {seed}");
        p.check().unwrap();
    }
    // Among pieces that normal parents hold, ties stay random (children of one parent
    // spread over different pieces): see ties_are_broken_at_random.
}

#[test]
fn a_seed_that_offers_every_missing_piece_is_asked_like_any_parent() {
    // Every piece went out once: the seed offers all that is missing here and holds
    // nothing back, so it is one more parent (its budget is no longer the share, and a
    // piece a busy normal parent holds may come from it).
    let (mut p, ids) = setup(4, &[(true, &[0, 1, 2, 3]), (false, &[0, 1, 2, 3])]);
    assert_eq!(p.budget(ids[0]), 2);
    let picks: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    assert_eq!(picks.len(), 4, "{picks:?}");
    let from_seed = picks
        .iter()
        .filter(|(_, s)| *s == Source::Parent(ids[0]))
        .count();
    assert_eq!(from_seed, 2, "{picks:?}");
    p.check().unwrap();
}

#[test]
fn pieces_only_slow_parents_hold_may_come_from_the_seed() {
    // Seed holds all; a fast parent holds 0..4, a slow one (a quarter of its rate) 4..8.
    let mut c = cfg();
    c.max_per_parent = 8;
    // (A ninth piece nobody offers yet: the seed is still dealing.)
    let mut p = Picker::new(9, c);
    let seed = p.add_parent(true);
    let fast = p.add_parent(false);
    let slow = p.add_parent(false);
    for (id, pieces) in [(seed, 0..8), (fast, 0..4), (slow, 4..8)] {
        p.set_usable(id, true);
        for n in pieces {
            p.available(id, n);
        }
    }
    let mut r = rng();
    // Measure both: the fast one at 4000 B/s, the slow one at 1000 B/s.
    for (id, secs) in [(fast, 0.25), (slow, 1.0)] {
        let (n, s) = std::iter::from_fn(|| p.next(None, &mut r))
            .find(|(_, s)| *s == Source::Parent(id))
            .expect("a pick from each parent");
        p.finished(n, s, 1000, secs);
        // Return the other picks.
        for m in 0..8 {
            for src in p.sources_of(m) {
                p.failed(m, src);
            }
        }
    }
    let picks: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut r)).collect();
    let from_seed: Vec<u32> = picks
        .iter()
        .filter(|(_, s)| *s == Source::Parent(seed))
        .map(|(n, _)| *n)
        .collect();
    // The seed (share 1) gives one of the slow parent's pieces, never a fast one's.
    assert_eq!(from_seed.len(), 1, "{picks:?}");
    assert!((4..8).contains(&from_seed[0]), "{picks:?}");
    p.check().unwrap();
}

#[test]
fn the_origin_gives_in_order_what_no_parent_holds() {
    // No parents: a whole back-to-source download, budget-bound, in order.
    let mut p = Picker::new(6, cfg());
    p.set_origin_budget(3);
    let got: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    assert_eq!(
        got,
        [
            (0, Source::Origin),
            (1, Source::Origin),
            (2, Source::Origin)
        ]
    );
    p.finished(1, Source::Origin, 1000, 0.1);
    assert_eq!(p.next(None, &mut rng()), Some((3, Source::Origin)));
    // With a parent holding 0..3, the origin takes only 4 and 5.
    let (mut p, ids) = setup(6, &[(false, &[0, 1, 2, 3])]);
    p.set_origin_budget(8);
    let got: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    let from_origin: Vec<u32> = got
        .iter()
        .filter(|(_, s)| *s == Source::Origin)
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(from_origin, [4, 5]);
    assert_eq!(
        got.iter()
            .filter(|(_, s)| *s == Source::Parent(ids[0]))
            .count(),
        2
    );
    // Without an origin budget, never the origin.
    let mut p = Picker::new(2, cfg());
    assert_eq!(p.next(None, &mut rng()), None);
}

#[test]
fn budgets_follow_measured_rates() {
    // piece 1000 B, horizon 1 s: budget = ceil(rate / 1000), within 1..=4.
    for (bytes, secs, sharing_pieces, want) in [
        (1000, 1.0, 1, 1),   // 1000 B/s
        (1000, 0.5, 1, 2),   // 2000 B/s
        (1000, 0.01, 1, 4),  // 100 kB/s: the cap
        (1000, 100.0, 1, 1), // a trickle: at least one
        (1000, 1.0, 2, 2),   // two shared the link: 2000 B/s
    ] {
        let pieces: Vec<u32> = (0..8).collect();
        let (mut p, ids) = setup(8, &[(false, &pieces)]);
        assert_eq!(p.budget(ids[0]), 2, "unmeasured");
        let mut started = Vec::new();
        for _ in 0..sharing_pieces {
            started.push(p.next(None, &mut rng()).unwrap());
        }
        let (n, s) = *started.last().unwrap();
        p.finished(n, s, bytes, secs);
        assert_eq!(
            p.budget(ids[0]),
            want,
            "{bytes} B in {secs} s, {sharing_pieces} sharing"
        );
    }
}

#[test]
fn demand_goes_first_on_the_same_terms() {
    let (mut p, ids) = setup(8, &[(false, &[0, 5, 6])]);
    assert_eq!(
        p.next(Some(6), &mut rng()),
        Some((6, Source::Parent(ids[0])))
    );
    // A wanted piece nobody holds falls back to the normal choice.
    let got = p.next(Some(7), &mut rng()).unwrap();
    assert!(matches!(got, (0 | 5, Source::Parent(_))), "{got:?}");
    // A wanted piece in flight or held is not fetched twice.
    assert_ne!(p.next(Some(6), &mut rng()).map(|x| x.0), Some(6));
}

#[test]
fn the_endgame_doubles_the_oldest_single_fetch_and_names_the_loser() {
    // Two pieces left, both from the slow parent A; B holds both and is idle.
    let (mut p, ids) = setup(2, &[(false, &[0, 1]), (false, &[])]);
    let (a, b) = (ids[0], ids[1]);
    let first = p.next(None, &mut rng()).unwrap();
    let second = p.next(None, &mut rng()).unwrap();
    assert_eq!((first.1, second.1), (Source::Parent(a), Source::Parent(a)));
    assert_eq!(p.next(None, &mut rng()), None, "B holds nothing yet");
    p.available(b, 0);
    p.available(b, 1);
    // B takes the older of the two.
    assert_eq!(p.next(None, &mut rng()), Some((first.0, Source::Parent(b))));
    assert_eq!(
        p.next(None, &mut rng()),
        Some((second.0, Source::Parent(b)))
    );
    assert_eq!(p.next(None, &mut rng()), None, "never a third fetch");
    p.check().unwrap();
    // B's copy of the first wins: A's is the loser, and A's late report is ignored.
    assert_eq!(
        p.finished(first.0, Source::Parent(b), 1000, 0.1),
        [Source::Parent(a)]
    );
    p.failed(first.0, Source::Parent(a));
    assert_eq!(p.finished(first.0, Source::Parent(a), 1000, 1.0), []);
    assert_eq!(p.remaining(), 1);
    assert_eq!(p.in_flight(), 2);
    p.check().unwrap();
    // With more than `endgame_pieces` left, no duplicates.
    let (mut p, ids) = setup(3, &[(false, &[0, 1, 2]), (false, &[0, 1, 2])]);
    p.set_usable(ids[1], false);
    while p.next(None, &mut rng()).is_some() {}
    assert_eq!(p.in_flight(), 2);
    p.set_usable(ids[1], true);
    assert!(p.next(None, &mut rng()).is_some(), "the third, fresh");
    assert_eq!(p.next(None, &mut rng()), None, "three left: no endgame yet");
}

#[test]
fn concurrency_bounds_everything_and_failures_free_the_piece() {
    let pieces: Vec<u32> = (0..32).collect();
    let mut p = Picker::new(
        32,
        Config {
            concurrency: 3,
            ..cfg()
        },
    );
    for _ in 0..4 {
        let id = p.add_parent(false);
        p.set_usable(id, true);
        for n in &pieces {
            p.available(id, *n);
        }
    }
    let got: Vec<(u32, Source)> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    assert_eq!(got.len(), 3);
    let (n, s) = got[0];
    p.failed(n, s);
    p.failed(n, s); // a repeat is ignored
    assert_eq!(p.in_flight(), 2);
    assert!(p.next(None, &mut rng()).is_some());
    p.check().unwrap();
}

#[test]
fn removed_parents_and_held_pieces_are_accounted() {
    let (mut p, ids) = setup(4, &[(false, &[0, 1, 2, 3]), (false, &[0])]);
    p.mark_held(3);
    assert_eq!(p.remaining(), 3);
    // A takes its rarest (1 or 2: B also holds 0).
    let (n, s) = p.next(None, &mut rng()).unwrap();
    assert_eq!(s, Source::Parent(ids[0]));
    assert!(n == 1 || n == 2, "{n}");
    p.remove_parent(ids[0]);
    // Its fetch stays until reported; nothing more comes from it, and B gives 0.
    assert_eq!(p.in_flight(), 1);
    assert_eq!(p.next(None, &mut rng()), Some((0, Source::Parent(ids[1]))));
    assert_eq!(p.next(None, &mut rng()), None);
    p.failed(n, s);
    assert_eq!(p.in_flight(), 1);
    p.check().unwrap();
    // A held piece found wrong is missing again.
    p.lost(3);
    assert_eq!(p.remaining(), 4);
    assert!(!p.has(3));
    p.check().unwrap();
}

#[test]
fn a_restored_parent_keeps_its_fetches_in_flight_and_its_rate() {
    let mut c = cfg();
    c.default_budget = 2;
    let mut p = Picker::new(8, c);
    let a = p.add_parent(false);
    p.set_usable(a, true);
    for n in 0..8 {
        p.available(a, n);
    }
    let (n0, s0) = p.next(None, &mut rng()).unwrap();
    let (n1, s1) = p.next(None, &mut rng()).unwrap();
    assert_eq!(p.next(None, &mut rng()), None, "budget 2 is spent");
    // Measured: 1000 bytes in 0.25 s = 4000 B/s, a budget of 4.
    p.finished(n0, s0, 1000, 0.25);
    assert_eq!(p.budget(a), 4);
    p.remove_parent(a);
    assert_eq!(p.budget(a), 0);
    p.restore_parent(a);
    // Back under the same handle: nothing announced, not usable until told.
    assert_eq!(p.next(None, &mut rng()), None);
    p.set_usable(a, true);
    for n in 0..8 {
        p.available(a, n);
    }
    // Its rate is kept and the fetch still in flight counts: 3 more, not 4.
    assert_eq!(p.budget(a), 4);
    let more: Vec<_> = std::iter::from_fn(|| p.next(None, &mut rng())).collect();
    assert_eq!(more.len(), 3, "{more:?}");
    assert!(more.iter().all(|(n, _)| *n != n1));
    p.finished(n1, s1, 1000, 0.25);
    p.check().unwrap();
    // Restoring a live or unknown handle changes nothing.
    p.restore_parent(a);
    p.restore_parent(ParentId(99));
    assert_eq!(p.budget(a), 4);
    p.check().unwrap();
}

#[test]
fn equal_unmeasured_parents_share_the_first_picks() {
    // Eight equal parents holding everything, budget 1 each: the first pick's parent
    // varies from pick to pick instead of always being the oldest handle.
    let mut firsts = std::collections::HashSet::new();
    let mut r = rng();
    for _ in 0..16 {
        let mut c = cfg();
        c.default_budget = 1;
        let mut p = Picker::new(64, c);
        let ids: Vec<ParentId> = (0..8).map(|_| p.add_parent(false)).collect();
        for id in &ids {
            p.set_usable(*id, true);
            for n in 0..64 {
                p.available(*id, n);
            }
        }
        let (_, s) = p.next(None, &mut r).unwrap();
        firsts.insert(s);
        // Every parent gets one before any gets a second.
        let rest: std::collections::HashSet<_> = std::iter::from_fn(|| p.next(None, &mut r))
            .map(|(_, s)| s)
            .collect();
        assert_eq!(rest.len() + 1, 8);
    }
    assert!(firsts.len() >= 3, "{firsts:?}");
}

#[test]
fn random_operations_keep_the_invariants_and_finish() {
    for seed in 0..20 {
        let mut r = SmallRng::seed_from_u64(seed);
        let count = r.gen_range(1..200);
        let mut p = Picker::new(
            count,
            Config {
                concurrency: r.gen_range(1..20),
                ..cfg()
            },
        );
        p.set_origin_budget(r.gen_range(0..3));
        let mut parents = Vec::new();
        let mut in_flight: Vec<(u32, Source)> = Vec::new();
        for _step in 0..20_000 {
            match r.gen_range(0..10) {
                0 if parents.len() < 6 => {
                    let id = p.add_parent(r.gen_bool(0.2));
                    p.set_usable(id, true);
                    parents.push(id);
                }
                1 if !parents.is_empty() && r.gen_bool(0.1) => {
                    let id = parents.swap_remove(r.gen_range(0..parents.len()));
                    p.remove_parent(id);
                }
                2 | 3 if !parents.is_empty() => {
                    let id = parents[r.gen_range(0..parents.len())];
                    p.available(id, r.gen_range(0..count + 2));
                }
                4..=6 => {
                    if let Some((n, s)) = p.next(None, &mut r) {
                        assert!(!p.has(n));
                        in_flight.push((n, s));
                    }
                }
                _ if !in_flight.is_empty() => {
                    let (n, s) = in_flight.swap_remove(r.gen_range(0..in_flight.len()));
                    if r.gen_bool(0.8) {
                        for loser in p.finished(n, s, 1000, 0.1) {
                            in_flight.retain(|f| *f != (n, loser));
                        }
                    } else {
                        p.failed(n, s);
                    }
                }
                _ => {}
            }
            p.check().unwrap();
        }
        // Drain: with the origin (or a parent holding all) everything arrives.
        p.set_origin_budget(4);
        for (n, s) in in_flight.drain(..) {
            p.failed(n, s);
        }
        while !p.is_done() {
            let (n, s) = p.next(None, &mut r).expect("progress");
            p.finished(n, s, 1000, 0.1);
            p.check().unwrap();
        }
    }
}
