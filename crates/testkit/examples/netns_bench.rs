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
            "{{\"name\":\"{}\",\"times\":[{}],\"origin_bytes\":{},\"origin_host_tx\":{},\"sources\":[{}]}}",
            self.name,
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

/// Waits for every child, recording when each ends (seconds since `start`).
fn wait_all(children: Vec<Child>, start: Instant, what: &str) -> Vec<f64> {
    let times = Arc::new(Mutex::new(vec![0.0; children.len()]));
    let handles: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(i, child)| {
            let times = times.clone();
            let what = what.to_string();
            std::thread::spawn(move || {
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "{what} on host {} failed: {}",
                    i + 1,
                    String::from_utf8_lossy(&out.stderr)
                );
                times.lock().unwrap()[i] = start.elapsed().as_secs_f64();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let t = times.lock().unwrap().clone();
    t
}

fn check_outputs(outputs: &[PathBuf], data: &[u8], what: &str) {
    for (i, o) in outputs.iter().enumerate() {
        let got = std::fs::read(o).unwrap_or_default();
        assert!(got == data, "{what}: host {} output differs", i + 1);
    }
}

fn run_dragonfly(
    hosts: &Hosts,
    nginx: &Nginx,
    dir: &Path,
    url: &str,
    data: &[u8],
    n: usize,
    scheduler_yaml: &str,
) -> SystemResult {
    let dir = dir.join("dragonfly");
    let swarm =
        HostSwarm::start(hosts, &dir, n, scheduler_yaml).expect("start the Dragonfly swarm");
    let peers = &swarm.peers;
    nginx.take_bytes();
    let tx0 = hosts.tx_bytes(0);
    let outputs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("out{i}"))).collect();
    let start = Instant::now();
    let children: Vec<Child> = peers
        .iter()
        .zip(&outputs)
        .map(|(p, o)| {
            p.dfget(url, o)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let times = wait_all(children, start, "dfget");
    check_outputs(&outputs, data, "dragonfly");
    let sources = peers
        .iter()
        .map(|p| {
            let s = bytes_by_source(p);
            (s.origin, s.seed, s.peers)
        })
        .collect();
    if let Ok(keep) = std::env::var("D7Y_KEEP_LOGS") {
        let _ = Command::new("cp").arg("-r").arg(&dir).arg(&keep).status();
    }
    SystemResult {
        name: "dragonfly".into(),
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

fn run_aria2(
    hosts: &Hosts,
    dir: &Path,
    www: &Path,
    data: &[u8],
    n: usize,
    tracker_port: u16,
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
    let start = Instant::now();
    let mut leechers = Vec::new();
    for (i, out) in outputs.iter().enumerate() {
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
    let mut times = vec![0.0; n];
    let deadline = Instant::now() + Duration::from_secs(3600);
    while times.contains(&0.0) {
        for (i, t) in times.iter_mut().enumerate() {
            if *t == 0.0 && dir.join(format!("done{}", i + 1)).exists() {
                *t = start.elapsed().as_secs_f64();
            }
        }
        assert!(Instant::now() < deadline, "aria2 did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let origin_host_tx = hosts.tx_bytes(0) - tx0;
    for mut l in leechers {
        let _ = l.kill();
        let _ = l.wait();
    }
    let _ = seeder.kill();
    let _ = seeder.wait();
    let files: Vec<PathBuf> = outputs.iter().map(|o| o.join("file.bin")).collect();
    check_outputs(&files, data, "aria2");
    SystemResult {
        name: "aria2 (BitTorrent)".into(),
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
    let start = Instant::now();
    let children = outputs
        .iter()
        .enumerate()
        .map(|(i, o)| {
            hosts
                .exec(i + 1, "curl")
                .args(["-sf", "-o"])
                .arg(o)
                .arg(url)
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let times = wait_all(children, start, "curl");
    check_outputs(&outputs, data, "curl");
    SystemResult {
        name: "curl (client-server)".into(),
        times,
        origin_bytes: nginx.take_bytes(),
        origin_host_tx: hosts.tx_bytes(0) - tx0,
        sources: outputs.iter().map(|_| (data.len() as u64, 0, 0)).collect(),
    }
}

/// The issue's targets against one run: (target, measured, met). Reported, never fatal.
fn targets(
    df: &SystemResult,
    aria2: Option<&SystemResult>,
    t_star: f64,
    size: f64,
) -> Vec<(String, String, bool)> {
    let p50 = quantile(&df.times, 0.5) / t_star;
    let max = quantile(&df.times, 1.0) / t_star;
    let origin = df.origin_bytes as f64 / size;
    let mut rows = vec![
        (
            "p50 ≤ 1.25 T*".to_string(),
            format!("{p50:.2} T*"),
            p50 <= 1.25,
        ),
        (
            "max ≤ 1.5 T*".to_string(),
            format!("{max:.2} T*"),
            max <= 1.5,
        ),
        (
            "origin egress ≤ 1.05 F".to_string(),
            format!("{origin:.3} F"),
            origin <= 1.05,
        ),
    ];
    if let Some(a) = aria2 {
        let ratio = quantile(&df.times, 0.5) / quantile(&a.times, 0.5);
        rows.push((
            "faster than aria2 (p50)".to_string(),
            format!("{ratio:.2}x aria2"),
            ratio < 1.0,
        ));
    }
    rows
}

fn main() {
    assert!(
        d7y_testkit::netns::is_root(),
        "run as root (network namespaces)"
    );
    let n: usize = arg("--peers", "4").parse().unwrap();
    let size_mib: usize = arg("--size-mib", "256").parse().unwrap();
    let rate = arg("--rate", "200mbit");
    let systems = arg("--systems", "dragonfly,aria2,curl");
    let scheduler_yaml = arg("--scheduler-yaml", "");
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

    let hosts = Hosts::up(PREFIX, n + 1, &rate).expect("create emulated hosts");
    let nginx = Nginx::start(&hosts, work.path(), &www);
    let url = format!("http://{}:8080/file.bin", hosts.ip(0));
    let bps = parse_rate(&rate);
    let f_bits = size as f64 * 8.0;
    let t_star = (f_bits / bps)
        .max(f_bits / bps)
        .max(n as f64 * f_bits / (bps + n as f64 * bps));
    let t_cs = (n as f64 * f_bits / bps).max(f_bits / bps);
    eprintln!(
        "{n} hosts, {size_mib} MiB, {rate}: T* = {t_star:.1} s, client-server bound {t_cs:.1} s"
    );

    let tracker_port = free_port();
    let _tracker = start_tracker(tracker_port);
    let mut results = Vec::new();
    for system in systems.split(',') {
        eprintln!("running {system} ...");
        let r = match system {
            "dragonfly" => {
                run_dragonfly(&hosts, &nginx, work.path(), &url, &data, n, &scheduler_yaml)
            }
            "aria2" => run_aria2(&hosts, work.path(), &www, &data, n, tracker_port),
            "curl" => run_curl(&hosts, &nginx, work.path(), &url, &data, n),
            other => panic!("unknown system {other}"),
        };
        eprintln!(
            "  {}: p50 {:.2}s max {:.2}s (T* {t_star:.2}s)",
            r.name,
            quantile(&r.times, 0.5),
            quantile(&r.times, 1.0)
        );
        results.push(r);
    }
    drop(nginx);
    drop(hosts);

    let mut md = String::new();
    md += &format!(
        "{n} downloaders + origin host, F = {size_mib} MiB, every link {rate} both ways; \
         T* = max(F/u_s, F/d_min, N·F/(u_s+Σu_i)) = {t_star:.1} s (client-server bound {t_cs:.1} s)\n\n"
    );
    md += "| system | p50 | p90 | max | p50 / T* | max / T* | origin egress / F | origin host egress / F |\n";
    md += "|---|---:|---:|---:|---:|---:|---:|---:|\n";
    for r in &results {
        let (p50, p90, max) = (
            quantile(&r.times, 0.5),
            quantile(&r.times, 0.9),
            quantile(&r.times, 1.0),
        );
        md += &format!(
            "| {} | {p50:.2} s | {p90:.2} s | {max:.2} s | {:.2} | {:.2} | {:.3} | {:.3} |\n",
            r.name,
            p50 / t_star,
            max / t_star,
            r.origin_bytes as f64 / size as f64,
            r.origin_host_tx as f64 / size as f64,
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
        md += "| target (issue 4) | measured | met |\n|---|---:|---|\n";
        for (target, measured, met) in targets(df, aria2, t_star, size as f64) {
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
                    quantile(&df.times, 0.5) / quantile(&r.times, 0.5),
                    quantile(&df.times, 1.0) / quantile(&r.times, 1.0)
                );
            }
        }
    }
    let json = format!(
        "{{\"peers\":{n},\"size\":{size},\"rate\":\"{rate}\",\"t_star\":{t_star},\"results\":[{}]}}",
        results.iter().map(SystemResult::to_json).collect::<Vec<_>>().join(",")
    );
    std::fs::write(out.join("results.json"), json).unwrap();
    std::fs::write(out.join("report.md"), &md).unwrap();
    println!("{md}");
    eprintln!("wrote {}/results.json and report.md", out.display());
}
