//! A scheduler, a seed peer and N peers on loopback, all real binaries, plus an instrumented
//! origin: the fixture of the swarm tests and the swarm benchmark.

use crate::{free_port, Daemon, DaemonOptions, Origin, OriginOptions, Scheduler};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::StatTaskRequest;
use std::path::PathBuf;
use std::process::Child;

pub struct Swarm {
    pub origin: Origin,
    pub scheduler: Scheduler,
    pub seed: Daemon,
    pub peers: Vec<Daemon>,
    pub dir: tempfile::TempDir,
}

impl Swarm {
    /// A scheduler, a seed peer and `n` peers; `peer_download_yaml` goes under each normal
    /// peer's `download:` section.
    pub fn start(n: usize, peer_download_yaml: &str) -> Swarm {
        Swarm::start_with(n, peer_download_yaml, "")
    }

    /// [`Swarm::start`], with `peer_extra_yaml` (top-level sections) added to each normal
    /// peer's config.
    pub fn start_with(n: usize, peer_download_yaml: &str, peer_extra_yaml: &str) -> Swarm {
        Swarm::start_opts(n, peer_download_yaml, peer_extra_yaml, false)
    }

    /// [`Swarm::start`], with peer `i` on its own loopback address `127.0.0.(10 + i)`, as
    /// hosts on a network are (the scheduler counts witnesses by address).
    pub fn start_on_own_addresses(n: usize, peer_download_yaml: &str) -> Swarm {
        Swarm::start_opts(n, peer_download_yaml, "", true)
    }

    fn start_opts(
        n: usize,
        peer_download_yaml: &str,
        peer_extra_yaml: &str,
        own_addresses: bool,
    ) -> Swarm {
        Swarm::start_custom(n, |i| DaemonOptions {
            download_yaml: peer_download_yaml.to_string(),
            extra_yaml: peer_extra_yaml.to_string(),
            ip: own_addresses.then(|| format!("127.0.0.{}", 10 + i)),
            ..Default::default()
        })
    }

    /// A scheduler, a seed peer and `n` peers, peer `i` started with `options(i)` (its
    /// hostname and schedulers are the fixture's).
    pub fn start_custom(n: usize, options: impl Fn(usize) -> DaemonOptions) -> Swarm {
        let dir = tempfile::tempdir().unwrap();
        let origin = Origin::start(OriginOptions::default());
        let scheduler_port = free_port();
        let scheduler_addr = format!("127.0.0.1:{scheduler_port}");
        let seed = Daemon::start_opts(
            &dir.path().join("seed"),
            &DaemonOptions {
                hostname: Some("seed".into()),
                schedulers: vec![scheduler_addr.clone()],
                seed: true,
                ..Default::default()
            },
        )
        .unwrap();
        let scheduler = Scheduler::start_at(
            &dir.path().join("scheduler"),
            scheduler_port,
            &[seed.upload_port],
            "",
        )
        .unwrap();
        let peers = (0..n)
            .map(|i| {
                Daemon::start_opts(
                    &dir.path().join(format!("peer{i}")),
                    &DaemonOptions {
                        hostname: Some(format!("peer{i}")),
                        schedulers: vec![scheduler_addr.clone()],
                        ..options(i)
                    },
                )
                .unwrap()
            })
            .collect();
        Swarm {
            origin,
            scheduler,
            seed,
            peers,
            dir,
        }
    }

    pub fn output(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("out{i}"))
    }

    /// Starts dfget on every peer at once.
    pub fn spawn_all(&self, url: &str) -> Vec<Child> {
        self.peers
            .iter()
            .enumerate()
            .map(|(i, p)| p.dfget(url, &self.output(i)).spawn().unwrap())
            .collect()
    }

    pub fn logs(&self) -> String {
        if let Ok(keep) = std::env::var("D7Y_KEEP_LOGS") {
            let _ = std::process::Command::new("cp")
                .arg("-r")
                .arg(self.dir.path())
                .arg(&keep)
                .status();
        }
        let mut s = format!(
            "--- scheduler\n{}\n--- seed\n{}\n",
            tail(&self.scheduler.log()),
            tail(&self.seed.log())
        );
        for (i, p) in self.peers.iter().enumerate() {
            s += &format!("--- peer{i}\n{}\n", tail(&p.log()));
        }
        s
    }
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Bytes a daemon holds for its only task, by the parent each piece came from
/// (`None` = the origin).
pub fn bytes_by_parent(daemon: &Daemon) -> Vec<(Option<String>, u64)> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let task_id = only_task_id(daemon);
        let mut client =
            DfdaemonUploadClient::connect(format!("http://{}:{}", daemon.ip, daemon.upload_port))
                .await
                .unwrap();
        let task = client
            .stat_task(StatTaskRequest {
                task_id,
                remote_ip: None,
            })
            .await
            .unwrap()
            .into_inner();
        task.pieces
            .into_iter()
            .map(|p| (p.parent_id, p.length))
            .collect()
    })
}

/// The task ID of the content file a daemon stores (the tests download one file per daemon).
pub fn only_task_id(daemon: &Daemon) -> String {
    let tasks = daemon.tasks_dir();
    std::fs::read_dir(&tasks)
        .unwrap()
        .flat_map(|prefix| std::fs::read_dir(prefix.unwrap().path()).unwrap())
        .map(|file| file.unwrap().file_name().to_string_lossy().into_owned())
        .next()
        .unwrap_or_else(|| panic!("no task in {}", tasks.display()))
}

/// Bytes a daemon holds for its only task, by where they came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sources {
    pub origin: u64,
    /// From a seed peer (its peer ID ends in `-seed`).
    pub seed: u64,
    /// From normal peers.
    pub peers: u64,
}

impl Sources {
    pub fn total(&self) -> u64 {
        self.origin + self.seed + self.peers
    }
}

/// [`bytes_by_parent`] summed by source.
pub fn bytes_by_source(daemon: &Daemon) -> Sources {
    let mut s = Sources::default();
    for (parent, len) in bytes_by_parent(daemon) {
        match parent {
            None => s.origin += len,
            Some(id) if id.ends_with("-seed") => s.seed += len,
            Some(_) => s.peers += len,
        }
    }
    s
}
