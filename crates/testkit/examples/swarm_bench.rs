//! The six-peer swarm against one curl of the same file from the same origin, side by side.
//!
//! `cargo build --release --bins && cargo run --release -p d7y-testkit --example swarm_bench
//!  [-- --peers 6 --size-mib 256 --rounds 3]`
//!
//! Each round starts a fresh scheduler, seed peer and N peers (release binaries) and an
//! in-process origin on loopback; times one `curl` of the file, then N concurrent `dfget`s.
//! Prints a Markdown table with medians.

use d7y_testkit::swarm::bytes_by_source;
use d7y_testkit::Swarm;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let peers = arg("--peers", 6);
    let size = arg("--size-mib", 256) << 20;
    let rounds = arg("--rounds", 3);
    let data = d7y_testkit::content(size, 7);
    let mut rows = Vec::new();
    for round in 1..=rounds {
        let swarm = Swarm::start(peers, "");
        let url = swarm.origin.put("bench.bin", data.clone());
        let t0 = Instant::now();
        let status = Command::new("curl")
            .args(["-sf", "-o", "/dev/null", &url])
            .stdout(Stdio::null())
            .status()
            .expect("curl is installed");
        assert!(status.success(), "curl failed");
        let curl = t0.elapsed();
        swarm.origin.reset_counters();
        let t0 = Instant::now();
        for (i, child) in swarm.spawn_all(&url).into_iter().enumerate() {
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "peer{i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let p2p = t0.elapsed();
        let origin = swarm.origin.bytes_served() as f64 / size as f64;
        let min_share = swarm
            .peers
            .iter()
            .map(|p| bytes_by_source(p).peers as f64 / size as f64)
            .fold(f64::MAX, f64::min);
        eprintln!(
            "round {round}: {peers} peers {:.2}s, curl {:.2}s, origin {origin:.3}x, min peer share {:.0}%",
            p2p.as_secs_f64(),
            curl.as_secs_f64(),
            min_share * 100.0
        );
        if origin > 1.05 {
            for (i, p) in swarm.peers.iter().enumerate() {
                for line in p.log().lines().filter(|l| {
                    l.contains("origin")
                        || l.contains("back to source")
                        || l.contains("scheduler lost")
                        || l.contains("dropping")
                        || l.contains("asking for new parents")
                }) {
                    eprintln!("  peer{i}: {line}");
                }
            }
        }
        rows.push((p2p, curl, origin, min_share));
        drop(swarm);
        std::thread::sleep(Duration::from_millis(300));
    }
    let col = |f: fn(&(Duration, Duration, f64, f64)) -> f64| median(rows.iter().map(f).collect());
    let (p2p, curl) = (col(|r| r.0.as_secs_f64()), col(|r| r.1.as_secs_f64()));
    println!("| peers | file | {peers} x dfget (swarm) | 1 x curl | swarm / curl | origin egress / file | min share from other peers |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {peers} | {} MiB | {p2p:.2} s | {curl:.2} s | {:.2} | {:.3} | {:.0}% |",
        size >> 20,
        p2p / curl,
        col(|r| r.2),
        col(|r| r.3) * 100.0
    );
    println!(
        "\n(medians of {rounds} rounds; {:.0} MiB/s of aggregate delivery in the swarm vs {:.0} MiB/s for curl)",
        (peers * (size >> 20)) as f64 / p2p,
        (size >> 20) as f64 / curl
    );
}
