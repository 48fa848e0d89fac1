//! A model-like repo from an S3 origin to N emulated hosts at once (issue 12): through the
//! swarm (`dfget -r s3://...` on every host) against every host reading the repo from S3
//! directly (boto3, parallel multipart), side by side in one run.
//!
//! Hosts: 0 runs the S3 store (s3s-fs, objects as files) and the seed peer (so the seed's
//! upload and the store's share the origin's link, as the Kumar–Ross server does); hosts
//! 1..=N download. Every link is shaped to `--rate` both ways, so the bound for F bytes is
//! T* = F/rate. The repo: `--shards` large files holding most of `--size-mib`, and small
//! files up to `--files` in all (configs, tokenizer), as a model repo is. Origin egress:
//! the bytes the daemons took from the origin (their BACK_TO_SOURCE traffic) for the swarm,
//! the bytes host 0 sent for the direct reads.
//!
//! `scripts/bench_model.sh [--peers 4] [--size-mib 2048] [--rate 200mbit] [--out DIR]`

use d7y_testkit::bench::{arg, parse_rate, quantile};
use d7y_testkit::netns::{HostSwarm, Hosts};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Instant;

const PREFIX: &str = "d7mdl";
const S3_PORT: u16 = 9000;
const AK: &str = "AKIDBENCH";
const SK: &str = "bench-secret";

/// Writes the repo under `root/models/repo/`; returns (relative path, size) of each file.
fn write_repo(root: &Path, total: u64, files: usize, shards: usize) -> Vec<(String, u64)> {
    let dir = root.join("models").join("repo");
    std::fs::create_dir_all(dir.join("tokenizer")).unwrap();
    let small_count = files.saturating_sub(shards).max(1);
    // 3 % of the bytes in small files, the rest in equal shards.
    let small_total = total * 3 / 100;
    let shard = (total - small_total) / shards as u64;
    let mut out = Vec::new();
    let mut write = |name: String, size: u64, seed: u64| {
        let path = dir.join(&name);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut left = size;
        let mut chunk_seed = seed;
        while left > 0 {
            let n = left.min(8 << 20) as usize;
            std::io::Write::write_all(&mut f, &d7y_testkit::content(n, chunk_seed)).unwrap();
            chunk_seed += 1;
            left -= n as u64;
        }
        std::io::Write::flush(&mut f).unwrap();
        drop(f);
        d7y_testkit::stores::s3s_fs_index(root, "models", &format!("repo/{name}")).unwrap();
        out.push((name, size));
    };
    for i in 0..shards {
        write(
            format!("model-{:05}-of-{shards:05}.safetensors", i + 1),
            shard,
            1_000 * i as u64,
        );
    }
    for i in 0..small_count {
        let name = if i % 4 == 0 {
            format!("tokenizer/part-{i:03}.json")
        } else {
            format!("config-{i:03}.json")
        };
        write(name, small_total / small_count as u64, 500_000 + i as u64);
    }
    out
}

fn sha_file(path: &Path) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

struct Outcome {
    name: &'static str,
    times: Vec<f64>,
    egress: u64,
}

/// Runs one command per host 1..=n at once; each host's time to its end, or the first
/// failure.
fn all_at_once(
    hosts: &Hosts,
    n: usize,
    command: impl Fn(usize) -> std::process::Command,
) -> Result<Vec<f64>, String> {
    let start = Instant::now();
    let children: Vec<Child> = (1..=n)
        .map(|i| {
            command(i)
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn")
        })
        .collect();
    let _ = hosts;
    let handles: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(i, child)| {
            std::thread::spawn(move || {
                let out = child.wait_with_output().unwrap();
                if out.status.success() {
                    Ok(start.elapsed().as_secs_f64())
                } else {
                    Err(format!(
                        "host {}: {}",
                        i + 1,
                        String::from_utf8_lossy(&out.stderr)
                    ))
                }
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

fn check(files: &[(String, u64)], shas: &[String], dir: &Path, n: usize, what: &str) {
    for i in 1..=n {
        for ((name, _), sha) in files.iter().zip(shas) {
            let got = sha_file(&dir.join(format!("out{i}")).join(name));
            assert_eq!(&got, sha, "{what}: host {i} has a different {name}");
        }
    }
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        d7y_testkit::netns::is_root(),
        "run as root (network namespaces)"
    );
    let n: usize = arg("--peers", "4").parse()?;
    let rate = arg("--rate", "200mbit");
    let total: u64 = arg("--size-mib", "2048").parse::<u64>()? << 20;
    let files: usize = arg("--files", "40").parse()?;
    let shards: usize = arg("--shards", "4").parse()?;
    let systems = arg("--systems", "dragonfly,direct");
    let out_dir = PathBuf::from(arg("--out", "target/model-bench"));
    std::fs::create_dir_all(&out_dir)?;
    let work = tempfile::tempdir()?;
    d7y_testkit::netns::cleanup(PREFIX);

    let root = work.path().join("s3root");
    let repo = write_repo(&root, total, files, shards);
    let bytes: u64 = repo.iter().map(|(_, s)| s).sum();
    let shas: Vec<String> = repo
        .iter()
        .map(|(name, _)| sha_file(&root.join("models/repo").join(name)))
        .collect();
    let hosts = Hosts::up(PREFIX, n + 1, &rate)?;
    let endpoint = format!("http://{}:{S3_PORT}", hosts.ip(0));
    let t_star = bytes as f64 * 8.0 / parse_rate(&rate);
    println!(
        "{n} hosts, {} files ({shards} shards), {:.0} MiB, {rate} links, T* = {t_star:.2} s",
        repo.len(),
        bytes as f64 / 1048576.0
    );
    let bin = |name: &str| d7y_testkit::bin_path(name).display().to_string();
    let mut outcomes = Vec::new();
    for system in systems.split(',') {
        let dir = work.path().join(system);
        std::fs::create_dir_all(&dir)?;
        let mut s3 = hosts
            .exec(0, "s3s-fs")
            .args([
                "--host",
                &hosts.ip(0),
                "--port",
                &S3_PORT.to_string(),
                "--access-key",
                AK,
                "--secret-key",
                SK,
            ])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        std::thread::sleep(std::time::Duration::from_millis(500));
        let before = hosts.tx_bytes(0);
        let outcome = match system {
            "dragonfly" => {
                let swarm = HostSwarm::start(&hosts, &dir.join("swarm"), n, "")?;
                let result = all_at_once(&hosts, n, |i| {
                    let mut c = hosts.exec(i, &bin("dfget"));
                    c.args(["s3://models/repo", "-r", "-O"])
                        .arg(dir.join(format!("out{i}")))
                        .arg("-e")
                        .arg(&swarm.peers[i - 1].socket)
                        .args([
                            "--no-progress",
                            "--max-files",
                            "1000",
                            "--max-concurrent-requests",
                            "8",
                        ])
                        .args([
                            "--storage-endpoint",
                            &endpoint,
                            "--storage-region",
                            "us-east-1",
                        ])
                        .args([
                            "--storage-access-key-id",
                            AK,
                            "--storage-access-key-secret",
                            SK,
                        ]);
                    c
                });
                // Keep the logs (of a failed run, for reading; of any run, to see who
                // fetched what from the origin).
                let keep = out_dir.join("logs");
                std::fs::create_dir_all(&keep)?;
                std::fs::write(keep.join("seed.log"), swarm.seed.log())?;
                std::fs::write(keep.join("scheduler.log"), swarm.scheduler.log())?;
                for (i, p) in swarm.peers.iter().enumerate() {
                    std::fs::write(keep.join(format!("peer{}.log", i + 1)), p.log())?;
                }
                let times =
                    result.map_err(|e| anyhow::anyhow!("{e}\nlogs in {}", keep.display()))?;
                check(&repo, &shas, &dir, n, "dragonfly");
                let per_daemon: Vec<f64> = std::iter::once(&swarm.seed)
                    .chain(swarm.peers.iter())
                    .map(|d| {
                        d7y_testkit::Daemon::http_get_at(&d.ip, d.metrics_port, "/metrics")
                            .unwrap_or_default()
                            .lines()
                            .filter(|l| {
                                l.starts_with("dragonfly_dfdaemon_download_traffic{")
                                    && l.contains("BACK_TO_SOURCE")
                            })
                            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                            .sum::<f64>()
                    })
                    .collect();
                let shares: Vec<String> = per_daemon
                    .iter()
                    .map(|b| format!("{:.3}", b / bytes as f64))
                    .collect();
                println!(
                    "origin bytes per daemon (seed first), in F: {}",
                    shares.join(" ")
                );
                let from_origin: f64 = per_daemon.iter().sum();
                Outcome {
                    name: "dragonfly",
                    times,
                    egress: from_origin as u64,
                }
            }
            "direct" => {
                let script = format!(
                    "import boto3,os,sys\nfrom boto3.s3.transfer import TransferConfig\n\
                     s3=boto3.client('s3',endpoint_url='{endpoint}',aws_access_key_id='{AK}',aws_secret_access_key='{SK}',region_name='us-east-1')\n\
                     cfg=TransferConfig(max_concurrency=8,multipart_chunksize=8*1024*1024)\n\
                     out=sys.argv[1]\n\
                     for page in s3.get_paginator('list_objects_v2').paginate(Bucket='models',Prefix='repo/'):\n\
                     \x20   for o in page.get('Contents',[]):\n\
                     \x20       p=os.path.join(out,o['Key'][len('repo/'):])\n\
                     \x20       os.makedirs(os.path.dirname(p),exist_ok=True)\n\
                     \x20       s3.download_file('models',o['Key'],p,Config=cfg)\n"
                );
                let times = all_at_once(&hosts, n, |i| {
                    let mut c = hosts.exec(i, "python3");
                    c.args(["-c", &script]).arg(dir.join(format!("out{i}")));
                    c
                })
                .map_err(anyhow::Error::msg)?;
                check(&repo, &shas, &dir, n, "direct");
                Outcome {
                    name: "direct (boto3)",
                    times,
                    egress: hosts.tx_bytes(0) - before,
                }
            }
            other => anyhow::bail!("unknown system {other}: dragonfly or direct"),
        };
        let _ = s3.kill();
        let _ = s3.wait();
        println!(
            "{:<16} p50 {:>7.2} s ({:.2} T*)  max {:>7.2} s ({:.2} T*)  origin egress {:.3} F",
            outcome.name,
            quantile(&outcome.times, 0.5),
            quantile(&outcome.times, 0.5) / t_star,
            quantile(&outcome.times, 1.0),
            quantile(&outcome.times, 1.0) / t_star,
            outcome.egress as f64 / bytes as f64
        );
        outcomes.push(outcome);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let mut md = format!(
        "# A model repo on {n} emulated hosts from S3\n\n{} files ({shards} shards), {:.0} MiB, links {rate} both ways, T* = F/rate = {t_star:.2} s. \
         Every host downloads the whole repo at the same moment.\n\n\
         | system | p50 (s) | p50/T* | max (s) | max/T* | origin egress (F) |\n|---|---|---|---|---|---|\n",
        repo.len(),
        bytes as f64 / 1048576.0
    );
    let mut json = Vec::new();
    for o in &outcomes {
        let (p50, max) = (quantile(&o.times, 0.5), quantile(&o.times, 1.0));
        md.push_str(&format!(
            "| {} | {p50:.2} | {:.2} | {max:.2} | {:.2} | {:.3} |\n",
            o.name,
            p50 / t_star,
            max / t_star,
            o.egress as f64 / bytes as f64
        ));
        json.push(serde_json::json!({"system": o.name, "times": o.times, "egress": o.egress, "bytes": bytes, "t_star": t_star}));
    }
    std::fs::write(out_dir.join("report.md"), &md)?;
    std::fs::write(
        out_dir.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    println!("\n{md}");
    Ok(())
}
