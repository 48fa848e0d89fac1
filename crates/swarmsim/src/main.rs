//! `swarmsim`: runs swarm scenarios in simulated time and prints each against the bound.
//!
//! ```text
//! cargo run --release -p d7y-swarmsim -- [--peers 4,8,16] [--size-mib 256] [--rate-mbit 200]
//!     [--shape equal|half|quarter] [--late 0.33] [--kill] [--dt 0.01] [--refresh 0.5] [--refresh-max 4]
//!     [--no-rates] [--no-measure-rates] [--seed 1] [--max-children 8] [--candidate-parents 8]
//!     [--parents-per-child 4] [--goodput 0.956]
//! cargo run --release -p d7y-swarmsim -- --scheduler-cost --peers 1000,10000,100000
//!     [--tasks 1,10000] [--pieces 256]
//! ```
//!
//! `--shape half`: every other host at half the rate; `quarter`: the first host at a quarter
//! (as on the emulated hosts: it registers first and has the seed among its parents).
//! `--late F`: the last third of the hosts join when the others are F of the way (in
//! bound time); `--kill`: host 0 dies at a third of the bound. One row per N.
//! `--scheduler-cost`: the scheduler alone, CPU per decision and memory per peer (peers
//! and their seeds) for each number of peers, in one task and spread over `--tasks`.

use d7y_swarmsim::{run, HostSpec, Scenario};

/// Resident memory of this process (bytes), from /proc/self/statm.
fn resident() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<usize>().ok())
        .unwrap_or(0)
        * 4096
}

/// `--scheduler-cost`: CPU per decision and memory per peer for each (peers, tasks).
fn scheduler_cost(peers: &[usize]) {
    let tasks: Vec<usize> = arg("--tasks")
        .unwrap_or_else(|| "1,10000".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let pieces = num("--pieces", 256.0) as u32;
    println!("| peers | tasks | µs per decision | ns per has_available_peer + back_to_source_count | resident memory per peer (bytes) | setup (s) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &n in peers {
        for &t in &tasks {
            let t = t.min(n).max(1);
            let before = resident();
            let mut res = d7y_scheduler::resource::Resources::default();
            let c = d7y_swarmsim::cost::measure(&mut res, n, t, pieces, 20_000);
            let bytes = resident().saturating_sub(before);
            println!(
                "| {n} | {t} | {:.1} | {:.0} | {} | {:.1} |",
                c.per_decision.as_secs_f64() * 1e6,
                c.per_check.as_secs_f64() * 1e9,
                bytes / (n + t),
                c.setup.as_secs_f64()
            );
            drop(res);
        }
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn num(name: &str, default: f64) -> f64 {
    match arg(name) {
        Some(v) => v.parse().unwrap_or_else(|_| {
            eprintln!("swarmsim: {name} takes a number, not {v:?}");
            std::process::exit(2)
        }),
        None => default,
    }
}

fn main() {
    let peers: Vec<usize> = arg("--peers")
        .unwrap_or_else(|| "4,8,16".into())
        .split(',')
        .map(|p| {
            p.trim().parse().unwrap_or_else(|_| {
                eprintln!("swarmsim: --peers takes numbers like 4,8,16, not {p:?}");
                std::process::exit(2)
            })
        })
        .collect();
    if flag("--scheduler-cost") {
        scheduler_cost(&peers);
        return;
    }
    let size = (num("--size-mib", 256.0) * 1048576.0) as u64;
    let rate = num("--rate-mbit", 200.0) * 1e6;
    let shape = arg("--shape").unwrap_or_else(|| "equal".into());
    let late = arg("--late").map(|_| num("--late", 0.5));
    println!(
        "| scenario | N | p50 / T* | p99 / T* | max / T* | T* (s) | origin / F | min share from peers | seed upload / F | schedules | µs per schedule | wall (s) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for n in peers {
        let mut sc = Scenario::equal(n, size, rate);
        sc.dt = num("--dt", if n >= 1000 { 0.05 } else { 0.01 });
        sc.refresh = num("--refresh", 0.5);
        sc.refresh_max = num("--refresh-max", 4.0).max(sc.refresh);
        sc.announce_rates = !flag("--no-rates");
        sc.measure_rates = !flag("--no-measure-rates");
        sc.rng_seed = num("--seed", 1.0) as u64;
        sc.goodput = num("--goodput", sc.goodput);
        sc.ack_share = num("--ack-share", sc.ack_share);
        sc.limits.max_children = num("--max-children", sc.limits.max_children as f64) as u32;
        sc.limits.candidate_parents =
            num("--candidate-parents", sc.limits.candidate_parents as f64) as usize;
        sc.limits.parents_per_child =
            num("--parents-per-child", sc.limits.parents_per_child as f64) as usize;
        let mut name = shape.clone();
        match shape.as_str() {
            "equal" => {}
            "half" => {
                for h in sc.hosts.iter_mut().skip(1).step_by(2) {
                    h.up_bps = rate / 2.0;
                    h.down_bps = rate / 2.0;
                }
            }
            "quarter" => {
                // The first host, as on the emulated hosts (it registers first, so the
                // scheduler gives it the seed: the case that costs the fast hosts most).
                let h = &mut sc.hosts[0];
                h.up_bps = rate / 4.0;
                h.down_bps = rate / 4.0;
            }
            other => {
                eprintln!("swarmsim: --shape is equal, half or quarter, not {other:?}");
                std::process::exit(2)
            }
        }
        if let Some(frac) = late {
            let at = sc.bound() * frac;
            let first_late = n - n / 3;
            for h in &mut sc.hosts[first_late..] {
                *h = HostSpec {
                    join: at,
                    ..h.clone()
                };
            }
            name.push_str(&format!(", last third at {frac} T*"));
        }
        if flag("--kill") {
            sc.kill = Some((0, sc.bound() / 3.0));
            name.push_str(", host 0 killed at T*/3");
        }
        sc.name = name;
        let r = run(&sc, sc.bound() * 20.0 + 60.0);
        // Late joiners and unequal hosts: each host against its own bound.
        let per_host = sc.kill.is_none() && (late.is_some() || shape != "equal");
        let (p50, p99, max) = if per_host {
            let mut ratios: Vec<f64> = r
                .finished
                .iter()
                .enumerate()
                .filter_map(|(i, f)| f.map(|f| f / sc.host_bound(i)))
                .collect();
            ratios.sort_by(f64::total_cmp);
            (
                d7y_swarmsim::quantile(&ratios, 0.5),
                d7y_swarmsim::quantile(&ratios, 0.99),
                ratios.last().copied().unwrap_or(f64::NAN),
            )
        } else {
            (r.p50() / r.bound, r.p99() / r.bound, r.max() / r.bound)
        };
        let f = size as f64;
        println!(
            "| {} | {n} | {p50:.3} | {p99:.3} | {max:.3} | {:.2} | {:.3} | {:.2} | {:.3} | {} | {:.1} | {:.1} |",
            r.name,
            r.bound,
            r.origin_bytes as f64 / f,
            r.min_peer_share(),
            r.seed_upload as f64 / f,
            r.schedules,
            r.schedule_time.as_secs_f64() * 1e6 / r.schedules.max(1) as f64,
            r.wall.as_secs_f64(),
        );
        println!(
            "<!-- wasted: {:.3} F moved by fetches that delivered nothing, {:.3} F of it from the seed -->",
            r.wasted as f64 / f,
            r.wasted_seed as f64 / f
        );
        if n <= 16 {
            let times: Vec<String> = r.sorted().iter().map(|t| format!("{t:.2}")).collect();
            println!("<!-- completion times (s): {} -->", times.join(", "));
            let shares: Vec<String> = (0..n)
                .map(|i| {
                    let (p, s) = (r.from_peers[i], r.from_seed[i]);
                    format!("{:.2}", p as f64 / (p + s).max(1) as f64)
                })
                .collect();
            println!("<!-- share from peers by host: {} -->", shares.join(", "));
        }
    }
}
