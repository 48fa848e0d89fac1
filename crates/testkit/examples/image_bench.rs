//! One multi-layer image pulled at once by N emulated hosts, three ways side by side in one
//! run: through the Dragonfly swarm (each host's dfdaemon as its registry mirror), straight
//! from the registry, and through CNCF distribution's pull-through cache on a host of its
//! own. Every host pulls with skopeo (digests verified, layers written to an OCI layout).
//!
//! Run as root through `scripts/bench_image.sh` (release binaries, namespaces removed even
//! when interrupted): `scripts/bench_image.sh --peers 4 --layers-mib 128,96,64,48,32`
//!
//! Host 0 runs the registry (and the Dragonfly seed peer: the registry host's link is the
//! server's upload u_s); hosts 1..=N pull; host N+1 runs the pull-through cache. Every link
//! is shaped to `--rate` both ways, so the Kumar–Ross bound for the image's F bytes is
//! T* = max(F/u_s, F/d, N·F/(u_s + N·u)) = F/rate. Reported per system: pull time per host
//! (p50, max, against T*) and the registry's egress per blob (from its access log).
//! `--scheduler-yaml TEXT` appends YAML to the scheduler's config (tuning experiments);
//! `--rounds R` repeats the systems (the median round is reported), `--once a,b` runs
//! systems a and b in the first round only (the slow baselines).

use d7y_testkit::bench::{arg, parse_rate, quantile};
use d7y_testkit::netns::{HostSwarm, Hosts};
use d7y_testkit::rigs::{Registry, RegistryOptions, TestImage};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

const PREFIX: &str = "d7img";
const REGISTRY_PORT: u16 = 5000;
const REPO: &str = "bench/img";

struct Outcome {
    name: &'static str,
    times: Vec<f64>,
    /// Registry body bytes per blob digest.
    egress: HashMap<String, u64>,
    note: String,
}

/// A registries.conf for `registry` with `mirror` (or none) in front of it.
fn registries_conf(path: &Path, registry: &str, mirror: Option<&str>) {
    let mut text = format!(
        "[[registry]]\nprefix = \"{registry}\"\nlocation = \"{registry}\"\ninsecure = true\n"
    );
    if let Some(m) = mirror {
        text.push_str(&format!(
            "\n[[registry.mirror]]\nlocation = \"{m}\"\ninsecure = true\n"
        ));
    }
    std::fs::write(path, text).unwrap();
}

/// Starts skopeo on hosts 1..=n at once; returns each host's time to a complete copy.
fn pull_all(hosts: &Hosts, n: usize, dir: &Path, registry: &str, confs: &[PathBuf]) -> Vec<f64> {
    let start = Instant::now();
    let children: Vec<(Child, PathBuf)> = (1..=n)
        .map(|i| {
            let out = dir.join(format!("out{i}"));
            let child = hosts
                .exec(i, "skopeo")
                .arg("--registries-conf")
                .arg(&confs[i - 1])
                .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
                .arg(format!("docker://{registry}/{REPO}:v1"))
                .arg(format!("oci:{}:v1", out.display()))
                .env_remove("HTTPS_PROXY")
                .env_remove("HTTP_PROXY")
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("skopeo is installed");
            (child, out)
        })
        .collect();
    let handles: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(i, (child, _))| {
            std::thread::spawn(move || {
                let out = child.wait_with_output().unwrap();
                assert!(
                    out.status.success(),
                    "skopeo on host {} failed: {}",
                    i + 1,
                    String::from_utf8_lossy(&out.stderr)
                );
                start.elapsed().as_secs_f64()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check(image: &TestImage, dir: &Path, n: usize, what: &str) {
    for i in 1..=n {
        assert!(
            image.same_blobs_as(&dir.join(format!("out{i}"))),
            "{what}: host {i} has different blobs"
        );
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        d7y_testkit::netns::is_root(),
        "run as root (network namespaces)"
    );
    let n: usize = arg("--peers", "4").parse()?;
    let rate = arg("--rate", "200mbit");
    let layers: Vec<usize> = arg("--layers-mib", "128,96,64,48,32")
        .split(',')
        .map(|s| s.trim().parse::<usize>().map(|m| m << 20))
        .collect::<Result<_, _>>()?;
    let systems = arg("--systems", "dragonfly,direct,pullthrough");
    let scheduler_yaml = arg("--scheduler-yaml", "");
    let out_dir = PathBuf::from(arg("--out", "target/image-bench"));
    std::fs::create_dir_all(&out_dir)?;
    let work = tempfile::tempdir()?;
    d7y_testkit::netns::cleanup(PREFIX);

    // The image, pushed once into a registry on loopback; the benchmark's registry serves
    // the same storage from host 0.
    let image = TestImage::write(&work.path().join("img"), "v1", &layers, 42);
    let bytes: u64 = image.layers.iter().map(|(_, s)| s).sum::<u64>() + 1024;
    let storage = work.path().join("storage");
    {
        let seed_registry = Registry::start(
            &work.path().join("push"),
            RegistryOptions {
                storage: Some(storage.clone()),
                ..Default::default()
            },
        )?;
        seed_registry.push(&image, "127.0.0.1", REPO, None);
    }
    let hosts = Hosts::up(PREFIX, n + 2, &rate)?;
    let registry_addr = format!("{}:{REGISTRY_PORT}", hosts.ip(0));
    let t_star = bytes as f64 * 8.0 / parse_rate(&rate);
    println!(
        "{n} hosts, {} layers, {:.0} MiB, {rate} links, T* = {t_star:.2} s",
        layers.len(),
        bytes as f64 / 1048576.0
    );
    let rounds: usize = arg("--rounds", "1").parse()?;
    // Systems measured in the first round only (the slow baselines).
    let once: Vec<String> = arg("--once", "")
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let mut runs: Vec<Outcome> = Vec::new();
    for round in 0..rounds {
        for system in systems.split(',') {
            if round > 0 && once.iter().any(|o| o == system) {
                continue;
            }
            let dir = work.path().join(format!("{system}-{round}"));
            std::fs::create_dir_all(&dir)?;
            // A fresh registry process (and log) on host 0 for each system.
            let registry = Registry::start(
                &dir.join("registry"),
                RegistryOptions {
                    storage: Some(storage.clone()),
                    ip: Some(hosts.ip(0)),
                    port: Some(REGISTRY_PORT),
                    netns: Some(hosts.names[0].clone()),
                    ..Default::default()
                },
            )?;
            let confs: Vec<PathBuf> = (1..=n)
                .map(|i| dir.join(format!("registries-{i}.conf")))
                .collect();
            let outcome = match system {
                "ttfb" => {
                    // Streaming: every host fetches the largest layer through its proxy with
                    // curl at once; time to first byte against time to the last.
                    let swarm = HostSwarm::start_with(
                        &hosts,
                        &dir.join("swarm"),
                        n,
                        &scheduler_yaml,
                        &format!("  registryMirror:\n    addr: http://{registry_addr}\n"),
                    )?;
                    let (layer, _) = image
                        .layers
                        .iter()
                        .max_by_key(|(_, size)| *size)
                        .expect("a layer")
                        .clone();
                    let start = Instant::now();
                    let children: Vec<Child> = (1..=n)
                        .map(|i| {
                            hosts
                                .exec(i, "curl")
                                .args([
                                    "-s",
                                    "-o",
                                    "/dev/null",
                                    "-w",
                                    "%{time_starttransfer} %{time_total} %{http_code}",
                                ])
                                .arg(format!(
                                    "http://127.0.0.1:{}/v2/{REPO}/blobs/{layer}",
                                    swarm.peers[i - 1].proxy_port
                                ))
                                .stdout(Stdio::piped())
                                .spawn()
                                .expect("curl")
                        })
                        .collect();
                    let mut firsts = Vec::new();
                    let mut totals = Vec::new();
                    for child in children {
                        let out = child.wait_with_output()?;
                        let text = String::from_utf8_lossy(&out.stdout).to_string();
                        let fields: Vec<&str> = text.split_whitespace().collect();
                        anyhow::ensure!(
                            fields.get(2) == Some(&"200"),
                            "curl through the proxy: {text}"
                        );
                        firsts.push(fields[0].parse::<f64>()?);
                        totals.push(fields[1].parse::<f64>()?);
                    }
                    let _ = start;
                    Outcome {
                        name: "dragonfly ttfb (largest layer, curl)",
                        times: totals.clone(),
                        egress: registry.blob_egress(),
                        note: format!(
                            "time to first byte p50 {:.2} s, max {:.2} s, against p50 {:.2} s to the last byte",
                            quantile(&firsts, 0.5),
                            quantile(&firsts, 1.0),
                            quantile(&totals, 0.5)
                        ),
                    }
                }
                "direct" => {
                    for c in &confs {
                        registries_conf(c, &registry_addr, None);
                    }
                    let times = pull_all(&hosts, n, &dir, &registry_addr, &confs);
                    Outcome {
                        name: "direct",
                        times,
                        egress: registry.blob_egress(),
                        note: String::new(),
                    }
                }
                "pullthrough" => {
                    let cache_host = n + 1;
                    let cache = Registry::start(
                        &dir.join("cache"),
                        RegistryOptions {
                            ip: Some(hosts.ip(cache_host)),
                            port: Some(REGISTRY_PORT),
                            netns: Some(hosts.names[cache_host].clone()),
                            proxy_remote: Some(format!("http://{registry_addr}")),
                            ..Default::default()
                        },
                    )?;
                    let mirror = format!("{}:{REGISTRY_PORT}", hosts.ip(cache_host));
                    for c in &confs {
                        registries_conf(c, &registry_addr, Some(&mirror));
                    }
                    let times = pull_all(&hosts, n, &dir, &registry_addr, &confs);
                    let served: u64 = cache.blob_egress().values().sum();
                    Outcome {
                        name: "pull-through cache",
                        times,
                        egress: registry.blob_egress(),
                        note: format!("cache served {:.0} MiB", served as f64 / 1048576.0),
                    }
                }
                "dragonfly" | "dragonfly-chain" => {
                    let chain = system == "dragonfly-chain";
                    let yaml = if chain {
                        format!("{scheduler_yaml}scheduler:\n  maxChildrenPerParent: 1\n")
                    } else {
                        scheduler_yaml.clone()
                    };
                    let swarm = HostSwarm::start_with(
                        &hosts,
                        &dir.join("swarm"),
                        n,
                        &yaml,
                        &format!("  registryMirror:\n    addr: http://{registry_addr}\n"),
                    )?;
                    for (i, c) in confs.iter().enumerate() {
                        let mirror = format!("127.0.0.1:{}", swarm.peers[i].proxy_port);
                        registries_conf(c, &registry_addr, Some(&mirror));
                    }
                    let times = pull_all(&hosts, n, &dir, &registry_addr, &confs);
                    let mut via = 0.0;
                    for p in &swarm.peers {
                        let text = hosts
                            .exec(1, "curl")
                            .args(["-s", &format!("http://{}:{}/metrics", p.ip, p.metrics_port)])
                            .output()
                            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
                            .unwrap_or_default();
                        via += metric(&text, "dragonfly_dfdaemon_proxy_request_via_dfdaemon_total");
                    }
                    if let Ok(keep) = std::env::var("D7Y_KEEP_LOGS") {
                        let _ = Command::new("cp").arg("-r").arg(&dir).arg(&keep).status();
                    }
                    Outcome {
                        name: if chain {
                            "dragonfly (chain)"
                        } else {
                            "dragonfly"
                        },
                        times,
                        egress: registry.blob_egress(),
                        note: format!("{via:.0} blob requests through the proxies"),
                    }
                }
                other => anyhow::bail!(
                    "unknown system {other} (dragonfly, dragonfly-chain, ttfb, direct, pullthrough)"
                ),
            };
            if system != "ttfb" {
                check(&image, &dir, n, outcome.name);
            }
            let total: u64 = outcome.egress.values().sum();
            println!(
            "{:<20} p50 {:6.2} s ({:.2} T*)  max {:6.2} s ({:.2} T*)  registry egress {:.2} F  {}",
            outcome.name,
            quantile(&outcome.times, 0.5),
            quantile(&outcome.times, 0.5) / t_star,
            quantile(&outcome.times, 1.0),
            quantile(&outcome.times, 1.0) / t_star,
            total as f64 / bytes as f64,
            outcome.note
        );
            runs.push(outcome);
            drop(registry);
            // Each run writes N copies of the image twice (daemon, skopeo): keep the disk.
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    // Per system: the round with the median p50 stands for it (the machine is noisy).
    let mut outcomes: Vec<Outcome> = Vec::new();
    let mut names: Vec<&'static str> = Vec::new();
    for o in &runs {
        if !names.contains(&o.name) {
            names.push(o.name);
        }
    }
    let mut all_p50: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for name in names {
        let mut mine: Vec<Outcome> = runs
            .iter()
            .filter(|o| o.name == name)
            .map(|o| Outcome {
                name: o.name,
                times: o.times.clone(),
                egress: o.egress.clone(),
                note: o.note.clone(),
            })
            .collect();
        mine.sort_by(|a, b| quantile(&a.times, 0.5).total_cmp(&quantile(&b.times, 0.5)));
        all_p50.insert(name, mine.iter().map(|o| quantile(&o.times, 0.5)).collect());
        let median = mine.len() / 2;
        outcomes.push(mine.swap_remove(median));
    }

    // Report.
    let mut md = format!(
        "# Image pull on {n} emulated hosts\n\n{} layers ({} MiB), F = {:.0} MiB, links {rate} both ways, \
         T* = F/rate = {t_star:.2} s. Every host pulls with skopeo (`copy --preserve-digests` to an \
         OCI layout) at the same moment. {rounds} round(s){}; per system the round with the \
         median p50 is shown.\n\n\
         | system | p50 (s) | p50/T* | max (s) | max/T* | registry egress (F) | max copies of one blob | note |\n\
         |---|---|---|---|---|---|---|---|\n",
        layers.len(),
        layers.iter().map(|l| (l >> 20).to_string()).collect::<Vec<_>>().join("+"),
        bytes as f64 / 1048576.0,
        if once.is_empty() {
            String::new()
        } else {
            format!(" ({} in the first only)", once.join(", "))
        },
    );
    let mut json = Vec::new();
    for o in &outcomes {
        let total: u64 = o.egress.values().sum();
        let copies = image
            .layers
            .iter()
            .map(|(d, s)| o.egress.get(d).copied().unwrap_or(0) as f64 / *s as f64)
            .fold(0.0, f64::max);
        md.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} | {} |\n",
            o.name,
            quantile(&o.times, 0.5),
            quantile(&o.times, 0.5) / t_star,
            quantile(&o.times, 1.0),
            quantile(&o.times, 1.0) / t_star,
            total as f64 / bytes as f64,
            copies,
            o.note
        ));
        let times: Vec<String> = o.times.iter().map(|t| format!("{t:.3}")).collect();
        json.push(format!(
            "{{\"name\":\"{}\",\"times\":[{}],\"origin_bytes\":{total},\"origin_host_tx\":0,\"sources\":[]}}",
            o.name,
            times.join(",")
        ));
    }
    if rounds > 1 {
        md.push_str("\np50 of every round (s):");
        for o in &outcomes {
            let list: Vec<String> = all_p50[o.name].iter().map(|t| format!("{t:.2}")).collect();
            md.push_str(&format!(" {}: {};", o.name, list.join(", ")));
        }
        md.push('\n');
    }
    let pull_through = outcomes.iter().find(|o| o.name == "pull-through cache");
    for df in outcomes
        .iter()
        .filter(|o| o.name.starts_with("dragonfly") && !o.name.contains("ttfb"))
    {
        let df_egress: u64 = df.egress.values().sum();
        let versus = match pull_through {
            Some(pt) => format!(
                "{} ({:.2}x its p50)",
                if quantile(&df.times, 0.5) < quantile(&pt.times, 0.5) {
                    "met"
                } else {
                    "missed"
                },
                quantile(&df.times, 0.5) / quantile(&pt.times, 0.5)
            ),
            None => "not run".into(),
        };
        md.push_str(&format!(
            "\nTargets for {}: registry egress one copy of each blob: {}; p50 ≤ 1.3 T*: {}; faster than the pull-through cache: {versus}.\n",
            df.name,
            if df_egress as f64 <= bytes as f64 * 1.02 { "met" } else { "missed" },
            if quantile(&df.times, 0.5) <= 1.3 * t_star { "met" } else { "missed" },
        ));
    }
    std::fs::write(out_dir.join("report.md"), &md)?;
    std::fs::write(
        out_dir.join("results.json"),
        format!(
            "{{\"peers\":{n},\"size\":{bytes},\"rate\":\"{rate}\",\"t_star\":{t_star:.3},\"results\":[{}]}}",
            json.join(",")
        ),
    )?;
    println!("\n{md}");
    Ok(())
}
