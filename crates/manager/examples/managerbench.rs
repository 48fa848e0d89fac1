//! The manager under load: `ListSchedulers` answers per second and their latency while
//! 1,000 registered seed peers keep alive, and the manager's RSS and CPU, on SQLite and on
//! PostgreSQL, side by side in one run.
//!
//! `cargo build --release --bins && cargo run --release -p d7y-manager --example
//! managerbench -- [--peers 1000] [--clients 32] [--seconds 20] [--keepalive-ms 1000]
//! [--databases sqlite,postgres] [--postgres postgres://postgres@127.0.0.1:5432/test]`
//!
//! Each database gets a fresh manager process (the release `manager` binary beside this
//! example) and a fresh database. 10 schedulers register in the default cluster and keep
//! alive; `--peers` seed peers register (UpdateSeedPeer) and send a keepalive every
//! `--keepalive-ms` on their own stream; then `--clients` concurrent callers ask
//! ListSchedulers as fast as they are answered for `--seconds`. The manager's CPU is read
//! from /proc over that window, its peak RSS (VmHWM) at the end.

use dragonfly_api::manager::v2::manager_client::ManagerClient;
use dragonfly_api::manager::v2::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn arg(name: &str, default: &str) -> String {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
        .unwrap_or_else(|| default.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Ticks of CPU (user + system) the process used so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is index 0; utime 11, stime 12.
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    get(11) + get(12)
}

fn status_kib(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

struct Run {
    database: String,
    answers: u64,
    errors: u64,
    seconds: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    cpu_cores: f64,
    rss_mib: f64,
    keepalives: u64,
}

async fn connect(addr: &str) -> ManagerClient<Channel> {
    for _ in 0..100 {
        if let Ok(c) = ManagerClient::connect(format!("http://{addr}")).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the manager at {addr} never answered")
}

async fn bench(
    database: &str,
    url: &str,
    peers: usize,
    clients: usize,
    seconds: u64,
    keepalive: Duration,
) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let (rest, grpc) = (free_port(), free_port());
    let config = dir.path().join("manager.yaml");
    std::fs::write(
        &config,
        format!(
            "server:\n  rest:\n    addr: 127.0.0.1:{rest}\n  grpc:\n    listenIP: 127.0.0.1\n    port: {{start: {grpc}, end: {grpc}}}\n\
             database:\n  url: '{url}'\nkeepAliveTimeout: 30s\n"
        ),
    )
    .unwrap();
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().parent().unwrap().join("manager");
    assert!(
        bin.exists(),
        "build the manager first: cargo build --release --bins ({})",
        bin.display()
    );
    let mut child: Child = Command::new(&bin)
        .arg("--config")
        .arg(&config)
        .arg("--log-level")
        .arg("warn")
        .env("DRAGONFLY_INITIAL_ROOT_PASSWORD", "bench-password")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let addr = format!("127.0.0.1:{grpc}");
    let mut client = connect(&addr).await;

    // Ten schedulers in the default cluster, keeping alive.
    let mut beats = Vec::new();
    for i in 0..10 {
        client
            .update_scheduler(UpdateSchedulerRequest {
                source_type: SourceType::SchedulerSource as i32,
                hostname: format!("scheduler-{i}"),
                scheduler_cluster_id: 1,
                ip: format!("10.0.0.{}", i + 1),
                port: 8002,
                ..Default::default()
            })
            .await
            .unwrap();
        beats.push((
            SourceType::SchedulerSource,
            format!("scheduler-{i}"),
            format!("10.0.0.{}", i + 1),
            1u64,
        ));
    }
    // The seed peers register, then keep alive on a stream each.
    for i in 0..peers {
        let ip = format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
        client
            .update_seed_peer(UpdateSeedPeerRequest {
                source_type: SourceType::SeedPeerSource as i32,
                hostname: format!("seed-{i}"),
                r#type: "super".into(),
                ip: ip.clone(),
                port: 4000,
                download_port: 4005,
                seed_peer_cluster_id: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        beats.push((SourceType::SeedPeerSource, format!("seed-{i}"), ip, 1));
    }
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut streams = Vec::new();
    for (i, (source, hostname, ip, cluster)) in beats.into_iter().enumerate() {
        let mut c = client.clone();
        let sent = sent.clone();
        streams.push(tokio::spawn(async move {
            // Spread the beats over the interval.
            tokio::time::sleep(keepalive.mul_f64((i % 100) as f64 / 100.0)).await;
            let stream = async_stream(source, hostname, ip, cluster, keepalive, sent);
            let _ = c.keep_alive(stream).await;
        }));
    }
    // Warm up, then measure.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let ticks_before = cpu_ticks(pid);
    let keepalives_before = sent.load(std::sync::atomic::Ordering::Relaxed);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut callers = Vec::new();
    for i in 0..clients {
        let mut c = client.clone();
        callers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                let r = c
                    .list_schedulers(ListSchedulersRequest {
                        source_type: SourceType::PeerSource as i32,
                        hostname: format!("peer-{i}"),
                        ip: format!("192.168.0.{}", i % 250 + 1),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(a) if a.get_ref().schedulers.len() == 10 => lat.push(t.elapsed()),
                    _ => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for c in callers {
        let (lat, e) = c.await.unwrap();
        all.extend(lat);
        errors += e;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ticks = cpu_ticks(pid) - ticks_before;
    let keepalives = sent.load(std::sync::atomic::Ordering::Relaxed) - keepalives_before;
    let rss_mib = status_kib(pid, "VmHWM:") as f64 / 1024.0;
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let run = Run {
        database: database.to_string(),
        answers: all.len() as u64,
        errors,
        seconds: elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        max_ms: all.last().map(|d| d.as_secs_f64() * 1000.0).unwrap_or(0.0),
        cpu_cores: ticks as f64 / 100.0 / elapsed,
        rss_mib,
        keepalives,
    };
    for s in streams {
        s.abort();
    }
    let _ = child.kill();
    let _ = child.wait();
    run
}

fn async_stream(
    source: SourceType,
    hostname: String,
    ip: String,
    cluster_id: u64,
    every: Duration,
    sent: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> impl futures_util::Stream<Item = KeepAliveRequest> {
    futures_util::stream::unfold(0u64, move |n| {
        let (hostname, ip, sent) = (hostname.clone(), ip.clone(), sent.clone());
        async move {
            if n > 0 {
                tokio::time::sleep(every).await;
            }
            sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Some((
                KeepAliveRequest {
                    source_type: source as i32,
                    hostname,
                    cluster_id,
                    ip,
                },
                n + 1,
            ))
        }
    })
}

/// A fresh PostgreSQL database on the server at `admin` (dropped by the next run's name).
async fn postgres_db(admin: &str) -> String {
    sqlx::any::install_default_drivers();
    let name = format!("d7y_bench_{}", std::process::id());
    let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(admin)
        .await
        .unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut conn)
        .await;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    format!("{}/{name}", admin.rsplit_once('/').unwrap().0)
}

#[tokio::main]
async fn main() {
    let peers: usize = arg("--peers", "1000").parse().unwrap();
    let clients: usize = arg("--clients", "32").parse().unwrap();
    let seconds: u64 = arg("--seconds", "20").parse().unwrap();
    let keepalive = Duration::from_millis(arg("--keepalive-ms", "1000").parse().unwrap());
    let databases = arg("--databases", "sqlite,postgres");
    let pg_admin = arg("--postgres", "postgres://postgres@127.0.0.1:5432/test");
    let mut runs = Vec::new();
    for db in databases.split(',') {
        let dir = tempfile::tempdir().unwrap();
        let url = match db {
            "sqlite" => format!("sqlite://{}", dir.path().join("bench.db").display()),
            "postgres" => postgres_db(&pg_admin).await,
            other => panic!("unknown database {other}: sqlite or postgres"),
        };
        eprintln!("{db}: {peers} seed peers keeping alive every {keepalive:?}, {clients} ListSchedulers callers for {seconds} s");
        runs.push(bench(db, &url, peers, clients, seconds, keepalive).await);
    }
    println!("| database | ListSchedulers/s | p50 (ms) | p99 (ms) | max (ms) | errors | keepalives/s | manager CPU (cores) | manager peak RSS (MiB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &runs {
        println!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {:.0} | {:.2} | {:.0} |",
            r.database,
            r.answers as f64 / r.seconds,
            r.p50_ms,
            r.p99_ms,
            r.max_ms,
            r.errors,
            r.keepalives as f64 / r.seconds,
            r.cpu_cores,
            r.rss_mib
        );
    }
}
