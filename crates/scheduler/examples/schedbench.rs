//! Scheduler benchmark: announce-and-schedule latency and throughput, and memory per peer.
//!
//! `cargo run --release -p d7y-scheduler --example schedbench [-- --peers 10000 --tasks 1000]`
//!
//! Three runs, printed as a table:
//! - `one task`: `--peers` peers register into one task, one after another; each is scheduled
//!   once while the swarm grows (peers gain pieces as they go, like a real download);
//! - `many tasks`: `--tasks` tasks of 10 peers each, interleaved;
//! - `gRPC`: the same over the real AnnouncePeer service on loopback (`--grpc-peers` peers,
//!   16 streams at a time), timed from RegisterPeerRequest to the first answer.

use d7y_config::scheduler::Config;
use d7y_scheduler::resource::{Limits, Resources};
use d7y_scheduler::scheduling::PeerState;
use dragonfly_api::common::v2::{Download, Host};
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::scheduler_client::SchedulerClient;
use dragonfly_api::scheduler::v2::*;
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 4096
}

fn host(i: usize) -> Host {
    Host {
        id: format!("host-{i}"),
        ip: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        port: 4000,
        download_port: 4005,
        ..Default::default()
    }
}

const PIECES: u64 = 64;
/// The benchmark's one task (a task ID is 64 hex characters).
const TASK: &str = "7a5c0b6d3e2f18a94c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b";

fn download() -> Download {
    Download {
        url: "http://origin/file".into(),
        actual_content_length: Some(PIECES * (4 << 20)),
        actual_piece_length: Some(4 << 20),
        ..Default::default()
    }
}

struct Stats {
    name: String,
    count: usize,
    total: Duration,
    p50: Duration,
    p99: Duration,
    bytes_per_peer: Option<u64>,
}

fn stats(
    name: &str,
    mut samples: Vec<Duration>,
    total: Duration,
    bytes_per_peer: Option<u64>,
) -> Stats {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 * q) as usize).min(samples.len() - 1)];
    Stats {
        name: name.into(),
        count: samples.len(),
        total,
        p50: at(0.5),
        p99: at(0.99),
        bytes_per_peer,
    }
}

/// Registers `peers` peers over `tasks` tasks (round-robin) and schedules each once.
fn model_run(name: &str, tasks: usize, peers: usize) -> Stats {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let limits = Limits {
        candidate_parents: 5,
        filter_parents: 40,
        max_children: 8,
        parents_per_child: 4,
    };
    let before = rss_bytes();
    let mut res = Resources::default();
    // One seed holding everything per task.
    for t in 0..tasks {
        let seed = Host {
            r#type: 1,
            ..host(1_000_000 + t)
        };
        res.announce_host(seed.clone());
        let task = format!("task-{t}");
        res.register_peer(&seed.id, &task, &format!("seed-{t}"), &download())
            .unwrap();
        let p = res.peer_mut(&format!("seed-{t}")).unwrap();
        p.state = PeerState::Succeeded;
        for n in 0..PIECES as u32 {
            p.pieces.insert(n);
        }
    }
    let mut samples = Vec::with_capacity(peers);
    let started = Instant::now();
    for i in 0..peers {
        let h = host(i);
        let task = format!("task-{}", i % tasks);
        let id = format!("peer-{i}");
        let t0 = Instant::now();
        res.announce_host(h.clone());
        res.register_peer(&h.id, &task, &id, &download()).unwrap();
        res.peer_mut(&id).unwrap().state = PeerState::Running;
        let s = res.schedule(&id, &limits, &mut rng).unwrap();
        samples.push(t0.elapsed());
        assert!(!s.parents.is_empty());
        // The peer makes progress before the next one arrives.
        let p = res.peer_mut(&id).unwrap();
        for _ in 0..rng.gen_range(0..PIECES) {
            p.pieces.insert(rng.gen_range(0..PIECES as u32));
        }
    }
    let total = started.elapsed();
    let per_peer = rss_bytes().saturating_sub(before) / peers as u64;
    stats(name, samples, total, Some(per_peer))
}

async fn grpc_run(peers: usize) -> Stats {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    let config = Config::from_yaml(
        // Its hosts are simulated (10.x addresses) on one loopback connection.
        "metrics:\n  enable: false\nscheduler:\n  verifyHostIP: false\n",
    )
    .unwrap();
    tokio::spawn(d7y_scheduler::serve(
        config,
        listener,
        std::future::pending(),
    ));
    let client = SchedulerClient::connect(addr).await.unwrap();
    // A first peer on the origin, holding every piece, makes every later one schedulable.
    let mut c = client.clone();
    c.announce_host(AnnounceHostRequest {
        host: Some(Host {
            r#type: 1,
            ..host(999_999)
        }),
        interval: None,
    })
    .await
    .unwrap();
    let (first_tx, first_rx) = tokio::sync::mpsc::channel(PIECES as usize + 4);
    let mut first = c
        .announce_peer(tokio_stream::wrappers::ReceiverStream::new(first_rx))
        .await
        .unwrap()
        .into_inner();
    let send =
        |tx: &tokio::sync::mpsc::Sender<AnnouncePeerRequest>, peer: &str, host: &str, e: Event| {
            let _ = tx.try_send(AnnouncePeerRequest {
                host_id: host.into(),
                task_id: TASK.into(),
                peer_id: peer.into(),
                request: Some(e),
            });
        };
    send(
        &first_tx,
        "origin-peer",
        "host-999999",
        Event::RegisterPeerRequest(RegisterPeerRequest {
            download: Some(download()),
        }),
    );
    first.message().await.unwrap();
    send(
        &first_tx,
        "origin-peer",
        "host-999999",
        Event::DownloadPeerBackToSourceStartedRequest(DownloadPeerBackToSourceStartedRequest {
            description: None,
        }),
    );
    for n in 0..PIECES as u32 {
        send(
            &first_tx,
            "origin-peer",
            "host-999999",
            Event::DownloadPieceBackToSourceFinishedRequest(
                DownloadPieceBackToSourceFinishedRequest {
                    piece: Some(dragonfly_api::common::v2::Piece {
                        number: n,
                        length: 4 << 20,
                        ..Default::default()
                    }),
                },
            ),
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = Instant::now();
    let mut samples = Vec::with_capacity(peers);
    let mut streams = Vec::new();
    let concurrency = 16;
    let mut next = 0;
    while next < peers {
        let batch: Vec<usize> = (next..(next + concurrency).min(peers)).collect();
        next += batch.len();
        let handles: Vec<_> = batch
            .into_iter()
            .map(|i| {
                let mut c = client.clone();
                tokio::spawn(async move {
                    let h = host(i);
                    c.announce_host(AnnounceHostRequest {
                        host: Some(h.clone()),
                        interval: None,
                    })
                    .await
                    .unwrap();
                    let (tx, rx) = tokio::sync::mpsc::channel(4);
                    let t0 = Instant::now();
                    tx.send(AnnouncePeerRequest {
                        host_id: h.id.clone(),
                        task_id: TASK.into(),
                        peer_id: format!("peer-{i}"),
                        request: Some(Event::RegisterPeerRequest(RegisterPeerRequest {
                            download: Some(download()),
                        })),
                    })
                    .await
                    .unwrap();
                    let mut responses = c
                        .announce_peer(tokio_stream::wrappers::ReceiverStream::new(rx))
                        .await
                        .unwrap()
                        .into_inner();
                    let reply = responses.message().await.unwrap().unwrap();
                    let elapsed = t0.elapsed();
                    assert!(
                        matches!(
                            reply.response,
                            Some(announce_peer_response::Response::NormalTaskResponse(_))
                        ),
                        "{reply:?}"
                    );
                    // Like a real peer: start, and report a first piece.
                    for e in [
                        Event::DownloadPeerStartedRequest(DownloadPeerStartedRequest {}),
                        Event::DownloadPieceFinishedRequest(DownloadPieceFinishedRequest {
                            piece: Some(dragonfly_api::common::v2::Piece {
                                number: (i % PIECES as usize) as u32,
                                length: 4 << 20,
                                ..Default::default()
                            }),
                        }),
                    ] {
                        let _ = tx
                            .send(AnnouncePeerRequest {
                                host_id: h.id.clone(),
                                task_id: TASK.into(),
                                peer_id: format!("peer-{i}"),
                                request: Some(e),
                            })
                            .await;
                    }
                    (elapsed, tx, responses)
                })
            })
            .collect();
        for h in handles {
            let (elapsed, tx, responses) = h.await.unwrap();
            samples.push(elapsed);
            streams.push((tx, responses));
        }
    }
    let total = started.elapsed();
    drop(first_tx);
    stats("gRPC, one task", samples, total, None)
}

fn main() {
    let peers = arg("--peers", 10_000);
    let tasks = arg("--tasks", 1_000);
    let grpc_peers = arg("--grpc-peers", 2_000);
    let runs = vec![
        model_run(&format!("model, {peers} peers in 1 task"), 1, peers),
        model_run(
            &format!("model, {tasks} tasks x 10 peers"),
            tasks,
            tasks * 10,
        ),
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(grpc_run(grpc_peers)),
    ];
    println!("| run | peers | p50 | p99 | throughput (schedules/s) | memory per peer |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in runs {
        println!(
            "| {} | {} | {:.1} µs | {:.1} µs | {:.0} | {} |",
            r.name,
            r.count,
            r.p50.as_secs_f64() * 1e6,
            r.p99.as_secs_f64() * 1e6,
            r.count as f64 / r.total.as_secs_f64(),
            r.bytes_per_peer
                .map(|b| format!("{:.1} KiB", b as f64 / 1024.0))
                .unwrap_or_else(|| "-".into()),
        );
    }
}
