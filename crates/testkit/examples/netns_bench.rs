//! Distribution of one file to N emulated hosts: Dragonfly against BitTorrent (aria2c) and
//! plain client-server (curl), on the same hosts in one invocation, with the Kumar–Ross bound.
//!
//! Run as root through `scripts/bench_netns.sh` (which builds release binaries and cleans up
//! namespaces even when interrupted):
//! `scripts/bench_netns.sh --peers 4 --size-mib 256 --rate 200mbit`
//!
//! Host 0 is the origin host: nginx serving the file, the Dragonfly seed peer, the only
//! initial BitTorrent seeder. Hosts 1..=N are the downloaders. Every host's link is shaped to
//! `--rate` both ways, so u_s = u_i = d_i = rate and
//! T* = max(F/u_s, F/d_min, N·F/(u_s + N·u)). The scheduler and the BitTorrent tracker run on
//! the bridge (control traffic only). Results: a Markdown report and `results.json` in
//! `--out`; `scripts/plot_swarm.py` turns the JSON into PNG plots. `--scheduler-yaml TEXT`
//! appends YAML to the scheduler's config (tuning experiments).
//!
//! `--rates half|quarter|R1,R2,...` gives the downloaders their own link rates (`half`:
//! every other downloader at half of `--rate`; `quarter`: the first at a quarter; or one
//! tc rate per downloader), and every daemon then announces its link rate (its bandwidth
//! limits set to it). `--late F` starts the last third of the downloaders (in every
//! system) when the others are F of the way, in bound time. Each row carries the bound for
//! those rates and join times, the simulator's prediction for the same scenario
//! (`d7y-swarmsim`), and the machine's idle CPU during the run. `--kill F` kills downloader
//! 1 (its daemon, or its BitTorrent client) at F of T*: churn; the others must finish.
//!
//! `--announce-rates yes|no` overrides whether the daemons announce their link rates
//! (default `auto`: only with `--rates`); `no` with `--rates` shows what the default
//! configuration, which knows no rates, does on unequal links.
//!
//! `--tcp-cc NAME` sets the TCP congestion control of every emulated host, for every
//! system alike (`cubic`, `reno`, `bbr`; default `system`, the machine's own). The machine
//! this was written on defaults to BBR, which on five hosts each fetching from the four
//! others filled 85-95% of the shaped links against cubic's 94-95%; in the swarm, cubic
//! made the 16-host row 1.24 T* against BBR's 1.15 (single flows locked out in back-off at
//! the links' drop-tail queues, relay chains behind them; BENCHMARKS.md, 2026-12-08).
//! `--daemon-tcp-cc NAME` sets Dragonfly's piece server's own congestion control
//! (`storage.server.tcpCongestionControl`), whatever the hosts' default.

use d7y_testkit::bench::{arg, parse_rate, quantile};
use d7y_testkit::netns::{HostSwarm, Hosts, SUBNET_GW};
use d7y_testkit::swarm::bytes_by_source;
use d7y_testkit::{bin_path, free_port};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PREFIX: &str = "d7bench";

#[derive(Debug, Default, Clone)]
struct SystemResult {
    name: String,
    /// Share of the machine's CPU time idle during the run.
    cpu_idle: f64,
    /// Seconds from the common start to each downloader's completion.
    times: Vec<f64>,
    /// Bytes the origin's nginx served.
    origin_bytes: u64,
    /// Bytes host 0 (origin host) sent on its link.
    origin_host_tx: u64,
    /// Per downloader: (origin, seed, other peers) bytes, when known.
    sources: Vec<(u64, u64, u64)>,
}

impl SystemResult {
    /// JSON by hand: this example does not pull in serde.
    fn to_json(&self) -> String {
        let times: Vec<String> = self.times.iter().map(|t| format!("{t:.3}")).collect();
        let sources: Vec<String> = self
            .sources
            .iter()
            .map(|(o, s, p)| format!("[{o},{s},{p}]"))
            .collect();
        format!(
            "{{\"name\":\"{}\",\"cpu_idle\":{:.3},\"times\":[{}],\"origin_bytes\":{},\"origin_host_tx\":{},\"sources\":[{}]}}",
            self.name,
            self.cpu_idle,
            times.join(","),
            self.origin_bytes,
            self.origin_host_tx,
            sources.join(",")
        )
    }
}

struct Nginx {
    child: Child,
    log: PathBuf,
}

impl Nginx {
    fn start(hosts: &Hosts, dir: &Path, www: &Path) -> Nginx {
        let conf = dir.join("nginx.conf");
        let log = dir.join("access.log");
        let tmp = dir.join("nginx-tmp");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 1;\ndaemon off;\npid {pid};\nerror_log {err};\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n  log_format bytes '$body_bytes_sent';\n  access_log {log} bytes;\n\
                   client_body_temp_path {tmp}; proxy_temp_path {tmp}; fastcgi_temp_path {tmp}; uwsgi_temp_path {tmp}; scgi_temp_path {tmp};\n\
                   sendfile on;\n  server {{ listen {ip}:8080; root {www}; }}\n}}\n",
                pid = dir.join("nginx.pid").display(),
                err = dir.join("nginx-error.log").display(),
                log = log.display(),
                tmp = tmp.display(),
                ip = hosts.ip(0),
                www = www.display(),
            ),
        )
        .unwrap();
        let child = hosts
            .exec(0, "nginx")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect((hosts.ip(0).as_str(), 8080)).is_err() {
            assert!(Instant::now() < deadline, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        Nginx { child, log }
    }

    /// Bytes served since the log was last cleared.
    fn take_bytes(&self) -> u64 {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let _ = std::fs::write(&self.log, "");
        text.lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts downloader `i` (`spawn(i)`) `joins[i]` seconds after `start` and waits for every
/// one, recording when each ends (seconds since `start`); downloader `victim` may fail
/// (it was killed), and its time is NaN.
fn run_timed(
    joins: &[f64],
    start: Instant,
    what: &str,
    victim: Option<usize>,
    spawn: impl Fn(usize) -> Child + Sync,
) -> Vec<f64> {
    let times = Mutex::new(vec![0.0; joins.len()]);
    std::thread::scope(|scope| {
        for (i, join) in joins.iter().enumerate() {
            let (times, spawn) = (&times, &spawn);
            scope.spawn(move || {
                let at = start + Duration::from_secs_f64(*join);
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let out = spawn(i).wait_with_output().unwrap();
                if victim == Some(i) {
                    times.lock().unwrap()[i] = f64::NAN;
                    return;
                }
                assert!(
                    out.status.success(),
                    "{what} on host {} failed: {}",
                    i + 1,
                    String::from_utf8_lossy(&out.stderr)
                );
                times.lock().unwrap()[i] = start.elapsed().as_secs_f64();
            });
        }
    });
    times.into_inner().unwrap()
}

/// (idle, total) CPU jiffies of the whole machine so far.
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (idle, fields.iter().sum())
}

fn idle_since((idle0, total0): (u64, u64)) -> f64 {
    let (idle, total) = cpu_jiffies();
    (idle - idle0) as f64 / (total - total0).max(1) as f64
}

/// The times of the downloaders that finished (not the killed one).
fn done(times: &[f64]) -> Vec<f64> {
    times.iter().copied().filter(|t| !t.is_nan()).collect()
}

fn check_outputs(outputs: &[PathBuf], data: &[u8], what: &str, victim: Option<usize>) {
    for (i, o) in outputs.iter().enumerate() {
        if victim == Some(i) {
            continue;
        }
        let got = std::fs::read(o).unwrap_or_default();
        assert!(got == data, "{what}: host {} output differs", i + 1);
    }
}

#[allow(clippy::too_many_arguments)]
fn run_dragonfly(
    hosts: &Hosts,
    nginx: &Nginx,
    dir: &Path,
    url: &str,
    data: &[u8],
    n: usize,
    scheduler_yaml: &str,
    piece_server_yaml: &str,
    joins: &[f64],
    kill: Option<f64>,
) -> SystemResult {
    let dir = dir.join("dragonfly");
    let swarm = HostSwarm::start_full(hosts, &dir, n, scheduler_yaml, "", piece_server_yaml)
        .expect("start the Dragonfly swarm");
    let peers = &swarm.peers;
    nginx.take_bytes();
    let tx0 = hosts.tx_bytes(0);
    let outputs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("out{i}"))).collect();
    let cpu = cpu_jiffies();
    let start = Instant::now();
    let victim = kill.map(|_| 0);
    let times = std::thread::scope(|scope| {
        if let Some(at) = kill {
            let peers = &swarm.peers;
            scope.spawn(move || {
                std::thread::sleep(Duration::from_secs_f64(at));
                peers[0].signal("-KILL");
            });
        }
        run_timed(joins, start, "dfget", victim, |i| {
            peers[i]
                .dfget(url, &outputs[i])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
    });
    let cpu_idle = idle_since(cpu);
    check_outputs(&outputs, data, "dragonfly", victim);
    let sources = peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if victim == Some(i) {
                return (0, 0, 0);
            }
            let s = bytes_by_source(p);
            (s.origin, s.seed, s.peers)
        })
        .collect();
    if let Ok(keep) = std::env::var("D7Y_KEEP_LOGS") {
        let _ = Command::new("cp").arg("-r").arg(&dir).arg(&keep).status();
    }
    SystemResult {
        name: "dragonfly".into(),
        cpu_idle,
        times,
        origin_bytes: nginx.take_bytes(),
        origin_host_tx: hosts.tx_bytes(0) - tx0,
        sources,
    }
}

/// A minimal HTTP BitTorrent tracker (compact peer lists), enough for aria2c.
fn start_tracker(port: u16) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let listener = std::net::TcpListener::bind((SUBNET_GW, port)).expect("bind tracker");
        let peers: Arc<Mutex<HashMap<(String, u16), ()>>> = Arc::default();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let peers = peers.clone();
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let ip = stream
                    .peer_addr()
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                let query = req
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("")
                    .split('?')
                    .nth(1)
                    .unwrap_or("");
                let param = |k: &str| {
                    query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
                        .map(str::to_string)
                };
                let port: u16 = param("port").and_then(|p| p.parse().ok()).unwrap_or(0);
                let mut compact = Vec::new();
                {
                    let mut map = peers.lock().unwrap();
                    if param("event").as_deref() == Some("stopped") {
                        map.remove(&(ip.clone(), port));
                    } else {
                        map.insert((ip.clone(), port), ());
                    }
                    for (pip, pport) in map.keys() {
                        if (pip, *pport) == (&ip, port) {
                            continue;
                        }
                        if let Ok(addr) = pip.parse::<std::net::Ipv4Addr>() {
                            compact.extend_from_slice(&addr.octets());
                            compact.extend_from_slice(&pport.to_be_bytes());
                        }
                    }
                }
                let mut body = format!("d8:intervali2e12:min intervali1e5:peers{}:", compact.len())
                    .into_bytes();
                body.extend_from_slice(&compact);
                body.push(b'e');
                let _ = write!(
                    stream,
                    "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(&body);
            });
        }
    })
}

#[allow(clippy::too_many_arguments)]
fn run_aria2(
    hosts: &Hosts,
    dir: &Path,
    www: &Path,
    data: &[u8],
    n: usize,
    tracker_port: u16,
    joins: &[f64],
    kill: Option<f64>,
) -> SystemResult {
    let dir = dir.join("aria2");
    std::fs::create_dir_all(&dir).unwrap();
    let torrent = dir.join("f.torrent");
    let status = Command::new("mktorrent")
        .args([
            "-a",
            &format!("http://{SUBNET_GW}:{tracker_port}/announce"),
            "-l",
            "20",
            "-o",
        ])
        .arg(&torrent)
        .arg(www.join("file.bin"))
        .stdout(Stdio::null())
        .status()
        .expect("mktorrent is installed");
    assert!(status.success());
    let common = [
        "--enable-dht=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=true",
        "--file-allocation=none",
        "--summary-interval=0",
        "--console-log-level=warn",
        "--bt-tracker-interval=1",
        "--bt-max-peers=55",
    ];
    // The origin host seeds (after checking the file, which is not timed).
    let mut seeder = hosts
        .exec(0, "aria2c")
        .arg(format!("--dir={}", www.display()))
        .args([
            "--seed-ratio=0.0",
            "--check-integrity=true",
            "--listen-port=6881",
        ])
        .args(common)
        .arg(&torrent)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("aria2c is installed");
    std::thread::sleep(Duration::from_secs(3));
    let tx0 = hosts.tx_bytes(0);
    let outputs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("out{i}"))).collect();
    // Leechers keep seeding until all are done; each marks its completion in a file.
    let cpu = cpu_jiffies();
    let start = Instant::now();
    let mut leechers = Vec::new();
    let mut started = vec![false; n];
    let mut times = vec![0.0; n];
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut killed = false;
    while times.contains(&0.0) {
        if let Some(at) = kill {
            if !killed && start.elapsed().as_secs_f64() >= at && !leechers.is_empty() {
                killed = true;
                let victim: &mut Child = &mut leechers[0];
                let _ = victim.kill();
                times[0] = f64::NAN;
            }
        }
        for (i, out) in outputs.iter().enumerate() {
            if started[i] || start.elapsed().as_secs_f64() < joins[i] {
                continue;
            }
            started[i] = true;
            std::fs::create_dir_all(out).unwrap();
            let hook = dir.join(format!("done{}.sh", i + 1));
            let mark = dir.join(format!("done{}", i + 1));
            std::fs::write(&hook, format!("#!/bin/sh\ntouch {}\n", mark.display())).unwrap();
            Command::new("chmod").arg("+x").arg(&hook).status().unwrap();
            leechers.push(
                hosts
                    .exec(i + 1, "aria2c")
                    .arg(format!("--dir={}", out.display()))
                    .arg(format!("--on-bt-download-complete={}", hook.display()))
                    .args(["--seed-time=600", "--listen-port=6882"])
                    .args(common)
                    .arg(&torrent)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
        }
        for (i, t) in times.iter_mut().enumerate() {
            if *t == 0.0 && dir.join(format!("done{}", i + 1)).exists() {
                *t = start.elapsed().as_secs_f64();
            }
        }
        assert!(Instant::now() < deadline, "aria2 did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let cpu_idle = idle_since(cpu);
    let origin_host_tx = hosts.tx_bytes(0) - tx0;
    for mut l in leechers {
        let _ = l.kill();
        let _ = l.wait();
    }
    let _ = seeder.kill();
    let _ = seeder.wait();
    let files: Vec<PathBuf> = outputs.iter().map(|o| o.join("file.bin")).collect();
    check_outputs(&files, data, "aria2", kill.map(|_| 0));
    SystemResult {
        name: "aria2 (BitTorrent)".into(),
        cpu_idle,
        times,
        origin_bytes: origin_host_tx,
        origin_host_tx,
        sources: Vec::new(),
    }
}

fn run_curl(
    hosts: &Hosts,
    nginx: &Nginx,
    dir: &Path,
    url: &str,
    data: &[u8],
    n: usize,
) -> SystemResult {
    let dir = dir.join("curl");
    std::fs::create_dir_all(&dir).unwrap();
    nginx.take_bytes();
    let tx0 = hosts.tx_bytes(0);
    let outputs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("out{i}"))).collect();
    let cpu = cpu_jiffies();
    let start = Instant::now();
    let times = run_timed(&vec![0.0; n], start, "curl", None, |i| {
        hosts
            .exec(i + 1, "curl")
            .args(["-sf", "-o"])
            .arg(&outputs[i])
            .arg(url)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    });
    let cpu_idle = idle_since(cpu);
    check_outputs(&outputs, data, "curl", None);
    SystemResult {
        name: "curl (client-server)".into(),
        cpu_idle,
        times,
        origin_bytes: nginx.take_bytes(),
        origin_host_tx: hosts.tx_bytes(0) - tx0,
        sources: outputs.iter().map(|_| (data.len() as u64, 0, 0)).collect(),
    }
}

/// The issue's targets against one run: (target, measured, met). Reported, never fatal.
/// Issue 13's targets: on equal links p50 ≤ 1.15 T*, max ≤ 1.3 T*, origin ≤ 1.02 F and
/// p50 ≤ 0.8 × aria2's; with unequal rates or late joiners p50 and max within 1.3 × the
/// bound for those rates and joins.
fn targets(
    df: &SystemResult,
    aria2: Option<&SystemResult>,
    t_star: f64,
    bound: f64,
    equal: bool,
    size: f64,
) -> Vec<(String, String, bool)> {
    let p50 = quantile(&done(&df.times), 0.5);
    let max = quantile(&done(&df.times), 1.0);
    let origin = df.origin_bytes as f64 / size;
    let mut rows = Vec::new();
    if equal {
        rows.push((
            "p50 ≤ 1.15 T*".to_string(),
            format!("{:.2} T*", p50 / t_star),
            p50 / t_star <= 1.15,
        ));
        rows.push((
            "max ≤ 1.3 T*".to_string(),
            format!("{:.2} T*", max / t_star),
            max / t_star <= 1.3,
        ));
    } else {
        rows.push((
            "p50 ≤ 1.3 × bound".to_string(),
            format!("{:.2} × bound", p50 / bound),
            p50 / bound <= 1.3,
        ));
        rows.push((
            "max ≤ 1.3 × bound".to_string(),
            format!("{:.2} × bound", max / bound),
            max / bound <= 1.3,
        ));
    }
    rows.push((
        "origin egress ≤ 1.02 F".to_string(),
        format!("{origin:.3} F"),
        origin <= 1.02,
    ));
    let share = df
        .sources
        .iter()
        .filter(|(o, s, p)| o + s + p > 0)
        .map(|(o, s, p)| *p as f64 / (o + s + p) as f64)
        .fold(1.0, f64::min);
    rows.push((
        "every peer takes ≥ half from peers".to_string(),
        format!("smallest share {share:.2}"),
        share >= 0.5,
    ));
    if let Some(a) = aria2 {
        let ratio = p50 / quantile(&done(&a.times), 0.5);
        rows.push((
            "p50 ≤ 0.8 × aria2's".to_string(),
            format!("{ratio:.2}x aria2"),
            ratio <= 0.8,
        ));
    }
    rows
}

/// Each downloader's link rate (tc syntax) from `--rates`.
fn downloader_rates(spec: &str, rate: &str, n: usize) -> Vec<String> {
    let bps = parse_rate(rate);
    let kbit = |b: f64| format!("{}kbit", (b / 1e3).round() as u64);
    match spec {
        "" => vec![rate.to_string(); n],
        "half" => (0..n)
            .map(|i| {
                if i % 2 == 1 {
                    kbit(bps / 2.0)
                } else {
                    rate.to_string()
                }
            })
            .collect(),
        "quarter" => (0..n)
            .map(|i| {
                if i == 0 {
                    kbit(bps / 4.0)
                } else {
                    rate.to_string()
                }
            })
            .collect(),
        list => {
            let rates: Vec<String> = list.split(',').map(str::to_string).collect();
            assert_eq!(
                rates.len(),
                n,
                "--rates needs one rate per downloader ({n})"
            );
            rates
        }
    }
}

/// The simulator's scenario for this run: the same hosts, rates, joins, file and scheduler
/// limits (`--scheduler-yaml` over the scheduler's defaults).
fn scenario(
    size: u64,
    seed_bps: f64,
    rates: &[f64],
    joins: &[f64],
    scheduling: &d7y_config::scheduler::Scheduling,
) -> d7y_swarmsim::Scenario {
    let mut sc = d7y_swarmsim::Scenario::equal(rates.len(), size, seed_bps);
    sc.limits = d7y_scheduler::resource::Limits::from(scheduling);
    sc.measure_rates = scheduling.measure_rates;
    sc.piece_length = d7y_types::piece::piece_length_for(size);
    sc.seed_up_bps = seed_bps;
    for (h, (r, j)) in sc.hosts.iter_mut().zip(rates.iter().zip(joins)) {
        h.up_bps = *r;
        h.down_bps = *r;
        h.join = *j;
    }
    sc
}

fn main() {
    assert!(
        d7y_testkit::netns::is_root(),
        "run as root (network namespaces)"
    );
    let n: usize = arg("--peers", "4").parse().unwrap();
    let size_mib: usize = arg("--size-mib", "256").parse().unwrap();
    let rate = arg("--rate", "200mbit");
    let rates_spec = arg("--rates", "");
    let late: f64 = arg("--late", "0")
        .parse()
        .expect("--late takes a fraction like 0.5");
    let kill_frac: f64 = arg("--kill", "0")
        .parse()
        .expect("--kill takes a fraction like 0.33");
    let systems = arg("--systems", "dragonfly,aria2,curl");
    let scheduler_yaml = arg("--scheduler-yaml", "");
    let tcp_cc = arg("--tcp-cc", "system");
    let daemon_tcp_cc = arg("--daemon-tcp-cc", "");
    let piece_server_yaml = if daemon_tcp_cc.is_empty() {
        String::new()
    } else {
        format!("    tcpCongestionControl: {daemon_tcp_cc}\n")
    };
    let announce = arg("--announce-rates", "auto");
    let out = PathBuf::from(arg("--out", "target/netns-bench"));
    let _ = bin_path("dfdaemon"); // fail early when the binaries are not built
    d7y_testkit::netns::cleanup(PREFIX);
    std::fs::create_dir_all(&out).unwrap();
    let work = tempfile::tempdir().unwrap();
    let www = work.path().join("www");
    std::fs::create_dir_all(&www).unwrap();
    let size = size_mib << 20;
    let data = d7y_testkit::content(size, 11);
    std::fs::write(www.join("file.bin"), &data).unwrap();

    let peer_rates = downloader_rates(&rates_spec, &rate, n);
    let mut all_rates = vec![rate.clone()];
    all_rates.extend(peer_rates.iter().cloned());
    let mut hosts = Hosts::up_with_rates(PREFIX, &all_rates).expect("create emulated hosts");
    hosts.announce_rates = match announce.as_str() {
        "auto" => !rates_spec.is_empty(),
        "yes" => true,
        "no" => false,
        other => panic!("--announce-rates takes auto, yes or no, not {other}"),
    };
    let announced = hosts.announce_rates;
    if tcp_cc != "system" {
        hosts
            .set_congestion_control(&tcp_cc)
            .unwrap_or_else(|e| panic!("--tcp-cc {tcp_cc}: {e}"));
    }
    let tcp_note = if tcp_cc == "system" {
        let out = Command::new("sysctl")
            .args(["-n", "net.ipv4.tcp_congestion_control"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        format!("TCP {out} (the machine's)")
    } else {
        format!("TCP {tcp_cc}")
    };
    let tcp_note = if daemon_tcp_cc.is_empty() {
        tcp_note
    } else {
        format!("{tcp_note}, Dragonfly's piece servers {daemon_tcp_cc}")
    };
    let nginx = Nginx::start(&hosts, work.path(), &www);
    let url = format!("http://{}:8080/file.bin", hosts.ip(0));
    let seed_bps = parse_rate(&rate);
    let bps: Vec<f64> = peer_rates.iter().map(|r| parse_rate(r)).collect();
    let scheduling = if scheduler_yaml.trim().is_empty() {
        d7y_config::scheduler::Scheduling::default()
    } else {
        d7y_config::scheduler::Config::from_yaml(&scheduler_yaml)
            .unwrap_or_else(|e| panic!("--scheduler-yaml: {e}"))
            .scheduler
    };
    // The bound for all joining at 0; the late third then joins at `late` of it.
    let sc0 = scenario(size as u64, seed_bps, &bps, &vec![0.0; n], &scheduling);
    let t_star = sc0.bound();
    let late_from = n - n / 3;
    let joins: Vec<f64> = (0..n)
        .map(|i| {
            if late > 0.0 && i >= late_from {
                late * t_star
            } else {
                0.0
            }
        })
        .collect();
    let mut sc = scenario(size as u64, seed_bps, &bps, &joins, &scheduling);
    if !rates_spec.is_empty() {
        // The simulator's hosts then size parents by rate only when the daemons do.
        sc.announce_rates = announced;
    }
    let kill = (kill_frac > 0.0).then_some(kill_frac * t_star);
    sc.kill = kill.map(|at| (0, at));
    let host_bounds: Vec<f64> = (0..n).map(|i| sc.host_bound(i)).collect();
    let bound = host_bounds.iter().copied().fold(0.0, f64::max);
    let f_bits = size as f64 * 8.0;
    let t_cs = (n as f64 * f_bits / seed_bps).max(f_bits / seed_bps);
    eprintln!(
        "{n} hosts, {size_mib} MiB, {rate} (downloaders {}), joins {joins:?}: T* = {t_star:.1} s, \
         bound for these joins {bound:.1} s, client-server bound {t_cs:.1} s",
        peer_rates.join(",")
    );
    let sim = d7y_swarmsim::run(&sc, 100.0 * bound);
    // The same quantiles as the measured rows.
    let sim_sorted = sim.sorted();
    let sim_p50 = quantile(&sim_sorted, 0.5);
    eprintln!("  simulator: p50 {sim_p50:.2}s max {:.2}s", sim.max());

    let tracker_port = free_port();
    let _tracker = start_tracker(tracker_port);
    let mut results = Vec::new();
    for system in systems.split(',') {
        eprintln!("running {system} ...");
        let r = match system {
            "dragonfly" => run_dragonfly(
                &hosts,
                &nginx,
                work.path(),
                &url,
                &data,
                n,
                &scheduler_yaml,
                &piece_server_yaml,
                &joins,
                kill,
            ),
            "aria2" => run_aria2(
                &hosts,
                work.path(),
                &www,
                &data,
                n,
                tracker_port,
                &joins,
                kill,
            ),
            "curl" => run_curl(&hosts, &nginx, work.path(), &url, &data, n),
            other => panic!("unknown system {other}"),
        };
        eprintln!(
            "  {}: p50 {:.2}s max {:.2}s (T* {t_star:.2}s), CPU idle {:.0}%",
            r.name,
            quantile(&done(&r.times), 0.5),
            quantile(&done(&r.times), 1.0),
            r.cpu_idle * 100.0
        );
        results.push(r);
    }
    drop(nginx);
    drop(hosts);

    let mut md = String::new();
    let announced_note = if announced {
        "rates announced"
    } else {
        "rates not announced"
    };
    let links = if rates_spec.is_empty() {
        format!("every link {rate} both ways ({announced_note})")
    } else {
        format!(
            "origin host {rate}, downloaders {} (both ways, {announced_note})",
            peer_rates.join(", ")
        )
    };
    let kill_note = match kill {
        Some(at) => format!("; downloader 1 killed at {at:.1} s ({kill_frac} of T*)"),
        None => String::new(),
    };
    let join_note = if late > 0.0 {
        format!(
            "; downloaders {}..{n} join at {:.1} s ({late} of T*), bound for these joins {bound:.1} s",
            late_from + 1,
            late * t_star
        )
    } else {
        String::new()
    };
    md += &format!(
        "{n} downloaders + origin host, F = {size_mib} MiB, {links}, {tcp_note}; \
         T* = max(F/u_s, F/d_min, N·F/(u_s+Σu_i)) = {t_star:.1} s{join_note}{kill_note} (client-server bound {t_cs:.1} s)\n\n"
    );
    md += "| system | p50 | p90 | max | p50 / T* | max / T* | max / bound | slowest fast host / its bound | origin egress / F | origin host egress / F | CPU idle |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    let full_rate: Vec<bool> = bps.iter().map(|b| *b >= seed_bps).collect();
    let fast_ratio = |times: &[f64]| {
        times
            .iter()
            .zip(&host_bounds)
            .zip(&full_rate)
            .filter(|((t, _), fast)| **fast && !t.is_nan())
            .map(|((t, b), _)| t / b)
            .fold(0.0, f64::max)
    };
    for r in &results {
        let (p50, p90, max) = (
            quantile(&done(&r.times), 0.5),
            quantile(&done(&r.times), 0.9),
            quantile(&done(&r.times), 1.0),
        );
        md += &format!(
            "| {} | {p50:.2} s | {p90:.2} s | {max:.2} s | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.0}% |\n",
            r.name,
            p50 / t_star,
            max / t_star,
            max / bound,
            fast_ratio(&r.times),
            r.origin_bytes as f64 / size as f64,
            r.origin_host_tx as f64 / size as f64,
            r.cpu_idle * 100.0,
        );
    }
    let sim_times: Vec<f64> = sim.finished.iter().map(|t| t.unwrap_or(f64::NAN)).collect();
    md += &format!(
        "| simulator (swarmsim) | {:.2} s | {:.2} s | {:.2} s | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | | |\n",
        sim_p50,
        quantile(&sim_sorted, 0.9),
        sim.max(),
        sim_p50 / t_star,
        sim.max() / t_star,
        sim.max() / bound,
        fast_ratio(&sim_times),
        sim.origin_bytes as f64 / size as f64,
    );
    if let Some(df) = results.iter().find(|r| r.name == "dragonfly") {
        let measured = quantile(&done(&df.times), 0.5);
        md += &format!(
            "\nSimulator vs measurement (Dragonfly p50): predicted {sim_p50:.2} s, measured {measured:.2} s, \
             residual {:+.1}%\n",
            (sim_p50 / measured - 1.0) * 100.0
        );
    }
    if let Some(df) = results.iter().find(|r| r.name == "dragonfly") {
        let aria2 = results.iter().find(|r| r.name.starts_with("aria2"));
        md += &format!(
            "\nDragonfly's scheduler settings: {}\n\n",
            if scheduler_yaml.trim().is_empty() {
                "defaults".to_string()
            } else {
                format!(
                    "`{}`",
                    scheduler_yaml
                        .split_whitespace()
                        .collect::<Vec<_>>()
                        .join(" ")
                )
            }
        );
        md += "| target (issue 13) | measured | met |\n|---|---:|---|\n";
        let equal = rates_spec.is_empty() && late == 0.0 && kill.is_none();
        for (target, measured, met) in targets(df, aria2, t_star, bound, equal, size as f64) {
            md += &format!(
                "| {target} | {measured} | {} |\n",
                if met { "yes" } else { "**no**" }
            );
        }
        md += "\nDragonfly, bytes each downloader received by source (MiB): origin / seed peer / other peers\n\n";
        md += "| host | origin | seed | other peers |\n|---|---:|---:|---:|\n";
        for (i, (o, s, p)) in df.sources.iter().enumerate() {
            md += &format!("| {} | {} | {} | {} |\n", i + 1, o >> 20, s >> 20, p >> 20);
        }
        for r in &results {
            if r.name != "dragonfly" {
                md += &format!(
                    "\nDragonfly vs {}: p50 {:.2}x, max {:.2}x (below 1 = Dragonfly faster)\n",
                    r.name,
                    quantile(&done(&df.times), 0.5) / quantile(&done(&r.times), 0.5),
                    quantile(&done(&df.times), 1.0) / quantile(&done(&r.times), 1.0)
                );
            }
        }
    }
    let json = format!(
        "{{\"peers\":{n},\"size\":{size},\"rate\":\"{rate}\",\"rates\":\"{}\",\"joins\":[{}],\"kill\":{},\"t_star\":{t_star},\"bound\":{bound},\"sim_times\":[{}],\"results\":[{}]}}",
        peer_rates.join(","),
        joins.iter().map(|j| format!("{j:.3}")).collect::<Vec<_>>().join(","),
        kill.map_or("null".to_string(), |k| format!("{k:.3}")),
        sim.sorted().iter().map(|t| format!("{t:.3}")).collect::<Vec<_>>().join(","),
        results.iter().map(SystemResult::to_json).collect::<Vec<_>>().join(",")
    );
    std::fs::write(out.join("results.json"), json).unwrap();
    std::fs::write(out.join("report.md"), &md).unwrap();
    println!("{md}");
    eprintln!("wrote {}/results.json and report.md", out.display());
}
