//! Emulated hosts: network namespaces on a private bridge (10.200.0.0/24, the bridge is
//! 10.200.0.1), each link shaped by tbf in both directions. Needs root. Everything created is
//! removed on drop; `cleanup(prefix)` removes leftovers of a killed run.

use std::process::Command;

/// The bridge's address, reachable from every emulated host.
pub const SUBNET_GW: &str = "10.200.0.1";

pub fn run(args: &[&str]) -> anyhow::Result<()> {
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
pub struct Hosts {
    pub bridge: String,
    /// Namespace names, host 0 first.
    pub names: Vec<String>,
    /// Each host's link rate (tc syntax), host 0 first.
    pub rates: Vec<String>,
    /// The daemons a [`HostSwarm`] starts on these hosts announce their link rates
    /// (`upload.bandwidthLimit` and `download.bandwidthLimit` set to them), so the
    /// scheduler can size parents by rate. Off by default: the limits are the daemon's.
    pub announce_rates: bool,
}

impl Hosts {
    /// `n` hosts named `<prefix>n<i>` on bridge `<prefix>br` (keep the prefix short: link
    /// names have at most 15 characters), each link shaped to `rate` (tc syntax, e.g.
    /// `200mbit`) both ways.
    pub fn up(prefix: &str, n: usize, rate: &str) -> anyhow::Result<Hosts> {
        Hosts::up_with_rates(prefix, &vec![rate.to_string(); n])
    }

    /// One host per entry of `rates` (tc syntax), each link shaped to its rate both ways.
    pub fn up_with_rates(prefix: &str, rates: &[String]) -> anyhow::Result<Hosts> {
        let tag = prefix;
        let n = rates.len();
        let mut hosts = Hosts {
            bridge: format!("{tag}br"),
            names: Vec::new(),
            rates: rates.to_vec(),
            announce_rates: false,
        };
        let b = hosts.bridge.clone();
        run(&["ip", "link", "add", &b, "type", "bridge"])?;
        run(&["ip", "addr", "add", &format!("{SUBNET_GW}/24"), "dev", &b])?;
        run(&["ip", "link", "set", &b, "up"])?;
        for i in 1..=n {
            let rate = rates[i - 1].as_str();
            let ns = format!("{tag}n{i}");
            let veth = format!("{tag}v{i}");
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

    /// Makes `algorithm` (e.g. `cubic`) the TCP congestion control of every host's new
    /// sockets. A namespace starts with the machine's default, and a namespace may only
    /// choose an algorithm the machine allows (`net.ipv4.tcp_allowed_congestion_control`,
    /// global), so one missing from that list is added to it: the list only says what
    /// unprivileged sockets may pick, and the machine's own default stays as it was.
    pub fn set_congestion_control(&self, algorithm: &str) -> anyhow::Result<()> {
        let read = |key: &str| -> anyhow::Result<String> {
            let out = Command::new("sysctl").args(["-n", key]).output()?;
            anyhow::ensure!(out.status.success(), "sysctl {key} failed");
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        };
        let available = read("net.ipv4.tcp_available_congestion_control")?;
        if !available.split_whitespace().any(|a| a == algorithm) {
            // Loaded on first use when it is a module.
            let _ = Command::new("modprobe")
                .arg(format!("tcp_{algorithm}"))
                .status();
        }
        let allowed = read("net.ipv4.tcp_allowed_congestion_control")?;
        if !allowed.split_whitespace().any(|a| a == algorithm) {
            run(&[
                "sysctl",
                "-qw",
                &format!("net.ipv4.tcp_allowed_congestion_control={allowed} {algorithm}"),
            ])?;
        }
        for ns in &self.names {
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                &format!("net.ipv4.tcp_congestion_control={algorithm}"),
            ])?;
        }
        Ok(())
    }

    /// Address of host `i` (0-based).
    pub fn ip(&self, i: usize) -> String {
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

impl Hosts {
    /// A command run inside host `i`.
    pub fn exec(&self, i: usize, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names[i], program]);
        c
    }

    /// Bytes host `i` has sent on its link.
    pub fn tx_bytes(&self, i: usize) -> u64 {
        std::fs::read_to_string(format!(
            "/sys/class/net/{}v{}/statistics/rx_bytes",
            self.bridge.trim_end_matches("br"),
            i + 1
        ))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
    }
}

/// Removes namespaces, the bridge and the host ends of veth pairs left by a run with this
/// prefix (killed before its drop ran).
pub fn cleanup(prefix: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let ns = line.split_whitespace().next().unwrap_or("");
            if ns.starts_with(&format!("{prefix}n")) {
                if let Ok(p) = Command::new("ip").args(["netns", "pids", ns]).output() {
                    for pid in String::from_utf8_lossy(&p.stdout).split_whitespace() {
                        let _ = Command::new("kill").args(["-9", pid]).status();
                    }
                }
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
        }
    }
    let _ = Command::new("ip")
        .args(["link", "del", &format!("{prefix}br")])
        .status();
    // Host ends of veth pairs a killed run left behind (the next `ip link add` of the same
    // name would fail with "File exists").
    if let Ok(out) = Command::new("ip").args(["-o", "link", "show"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(": ").nth(1).unwrap_or("");
            let name = name.split('@').next().unwrap_or("");
            if name.starts_with(&format!("{prefix}v")) {
                let _ = Command::new("ip").args(["link", "del", name]).status();
            }
        }
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A Dragonfly swarm on emulated hosts: the seed peer on host 0, the scheduler on the
/// bridge, and one peer on each of hosts 1..=n. Processes stop on drop (before the hosts
/// they run in, as long as the `Hosts` outlive this).
pub struct HostSwarm {
    pub scheduler: crate::Scheduler,
    pub seed: crate::Daemon,
    /// `peers[i]` runs on host `i + 1`.
    pub peers: Vec<crate::Daemon>,
}

impl HostSwarm {
    /// Starts the swarm with its files under `dir`; `scheduler_yaml` is appended to the
    /// scheduler's config.
    pub fn start(
        hosts: &Hosts,
        dir: &std::path::Path,
        peers: usize,
        scheduler_yaml: &str,
    ) -> anyhow::Result<HostSwarm> {
        HostSwarm::start_with(hosts, dir, peers, scheduler_yaml, "")
    }

    /// [`HostSwarm::start`], with `proxy_yaml` (lines indented by two spaces) under every
    /// daemon's `proxy:` section.
    pub fn start_with(
        hosts: &Hosts,
        dir: &std::path::Path,
        peers: usize,
        scheduler_yaml: &str,
        proxy_yaml: &str,
    ) -> anyhow::Result<HostSwarm> {
        HostSwarm::start_full(hosts, dir, peers, scheduler_yaml, proxy_yaml, "")
    }

    /// [`HostSwarm::start_with`], with `piece_server_yaml` (lines indented by four spaces)
    /// under every daemon's `storage.server` section.
    pub fn start_full(
        hosts: &Hosts,
        dir: &std::path::Path,
        peers: usize,
        scheduler_yaml: &str,
        proxy_yaml: &str,
        piece_server_yaml: &str,
    ) -> anyhow::Result<HostSwarm> {
        anyhow::ensure!(
            hosts.names.len() > peers,
            "{peers} peers need {} hosts, there are {}",
            peers + 1,
            hosts.names.len()
        );
        let port = crate::free_port();
        let scheduler_addr = format!("{SUBNET_GW}:{port}");
        let daemon = |i: usize, seed: bool| {
            let limit = if hosts.announce_rates {
                let bytes = (crate::bench::parse_rate(&hosts.rates[i]) / 8.0) as u64;
                format!("  bandwidthLimit: {bytes}\n")
            } else {
                String::new()
            };
            crate::Daemon::start_opts(
                &dir.join(format!("host{i}")),
                &crate::DaemonOptions {
                    hostname: Some(format!("host{i}")),
                    schedulers: vec![scheduler_addr.clone()],
                    seed,
                    ip: Some(hosts.ip(i)),
                    netns: Some(hosts.names[i].clone()),
                    proxy_yaml: proxy_yaml.to_string(),
                    piece_server_yaml: piece_server_yaml.to_string(),
                    download_yaml: limit.clone(),
                    upload_yaml: limit,
                    ..Default::default()
                },
            )
        };
        let seed = daemon(0, true)?;
        let scheduler = crate::Scheduler::start_on(
            &dir.join("scheduler"),
            SUBNET_GW,
            port,
            &[(hosts.ip(0), seed.upload_port)],
            scheduler_yaml,
        )?;
        let peers = (1..=peers)
            .map(|i| daemon(i, false))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(HostSwarm {
            scheduler,
            seed,
            peers,
        })
    }
}
