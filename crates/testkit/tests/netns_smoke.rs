//! Smoke run of the swarm on emulated hosts: a seed peer and three peers, each in its own
//! network namespace with its links shaped by tbf, on a bridge whose root side carries the
//! origin and the scheduler. Needs root (it creates namespaces, links and qdiscs) and cleans
//! up everything it made, also when an assertion fails.

use d7y_testkit::{free_port, Daemon, DaemonOptions, Origin, OriginOptions, Scheduler};
use std::process::Command;

const MIB: usize = 1024 * 1024;
const SUBNET_GW: &str = "10.200.0.1";

fn run(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "{} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// N emulated hosts `10.200.0.11..` on a private bridge; torn down on drop.
struct Hosts {
    bridge: String,
    names: Vec<String>,
}

impl Hosts {
    fn up(n: usize, rate: &str) -> anyhow::Result<Hosts> {
        let tag = format!("{:04x}", std::process::id() & 0xffff);
        let mut hosts = Hosts {
            bridge: format!("d7b{tag}"),
            names: Vec::new(),
        };
        let b = hosts.bridge.clone();
        run(&["ip", "link", "add", &b, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{SUBNET_GW}/24"), "dev", &b])?;
        run(&["ip", "link", "set", &b, "up"])?;
        for i in 1..=n {
            let ns = format!("d7n{tag}{i}");
            let veth = format!("d7v{tag}{i}");
            run(&["ip", "netns", "add", &ns])?;
            hosts.names.push(ns.clone());
            run(&[
                "ip", "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            run(&["ip", "link", "set", &veth, "master", &b, "up"])?;
            run(&[
                "ip",
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.200.0.{}/24", 10 + i),
                "dev",
                "eth0",
            ])?;
            run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
            run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", &ns, "route", "add", "default", "via", SUBNET_GW])?;
            // Upload shaped inside the host, download on the bridge side.
            run(&[
                "ip", "netns", "exec", &ns, "tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                "rate", rate, "burst", "256kb", "latency", "50ms",
            ])?;
            run(&[
                "tc", "qdisc", "add", "dev", &veth, "root", "tbf", "rate", rate, "burst", "256kb",
                "latency", "50ms",
            ])?;
        }
        Ok(hosts)
    }

    fn ip(&self, i: usize) -> String {
        format!("10.200.0.{}", 11 + i)
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in &self.names {
            if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).status();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

#[test]
fn three_peers_on_emulated_hosts_get_identical_files_from_one_origin_copy() {
    if !is_root() {
        eprintln!("SKIPPED: network namespaces need root");
        return;
    }
    let in_use = Command::new("ip").args(["-o", "addr"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&in_use.stdout).contains(&format!("{SUBNET_GW}/24")),
        "10.200.0.1/24 is already configured (a leftover of netns.sh?); remove it first"
    );
    let hosts = match Hosts::up(4, "200mbit") {
        Ok(h) => h,
        // A container without CAP_NET_ADMIN: report, do not pretend.
        Err(e) if e.to_string().contains("Operation not permitted") => {
            eprintln!("SKIPPED: cannot create network namespaces here: {e}");
            return;
        }
        Err(e) => panic!("create emulated hosts: {e}"),
    };
    let dir = tempfile::tempdir().unwrap();
    let origin = Origin::start(OriginOptions {
        ip: Some(SUBNET_GW.parse().unwrap()),
        ..Default::default()
    });
    let scheduler_port = free_port();
    let scheduler_addr = format!("{SUBNET_GW}:{scheduler_port}");
    let daemon = |i: usize, seed: bool| {
        Daemon::start_opts(
            &dir.path().join(format!("host{i}")),
            &DaemonOptions {
                hostname: Some(format!("host{i}")),
                schedulers: vec![scheduler_addr.clone()],
                seed,
                ip: Some(hosts.ip(i)),
                netns: Some(hosts.names[i].clone()),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let seed = daemon(0, true);
    let scheduler = Scheduler::start_on(
        &dir.path().join("scheduler"),
        SUBNET_GW,
        scheduler_port,
        &[(hosts.ip(0), seed.upload_port)],
        "",
    )
    .unwrap();
    let peers: Vec<Daemon> = (1..4).map(|i| daemon(i, false)).collect();

    let size = 32 * MIB;
    let data = d7y_testkit::content(size, 3);
    let url = origin.put("smoke.bin", data.clone());
    let children: Vec<_> = peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.dfget(&url, &dir.path().join(format!("out{i}")))
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, child) in children.into_iter().enumerate() {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "peer{i}: {}\nscheduler:\n{}\npeer log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            scheduler.log(),
            peers[i].log()
        );
        assert!(
            std::fs::read(dir.path().join(format!("out{i}"))).unwrap() == data,
            "peer{i} output differs"
        );
    }
    let served = origin.bytes_served();
    assert!(
        served as f64 <= 1.1 * size as f64,
        "origin served {served} bytes for a {size}-byte file"
    );
    drop(peers);
    drop(seed);
    drop(scheduler);
    drop(hosts);
}
