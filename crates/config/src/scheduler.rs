//! `scheduler.yaml`.
//!
//! Key names follow upstream's scheduler config (`server.port`, `scheduler.retryLimit`,
//! `scheduler.gc.peerTTL`, `manager.addr`, `manager.schedulerClusterID`,
//! `manager.keepAlive.interval`, `dynconfig.refreshInterval`, ...). Sections upstream has
//! but this scheduler does not use (database, job, ...) are accepted and ignored so an
//! upstream file still loads.
//! Extensions: `scheduler.candidateParentLimit` and `scheduler.filterParentLimit` (upstream
//! reads them from the manager's cluster config), `scheduler.maxChildrenPerParent`,
//! `scheduler.parentsPerChild`, and `seedPeers` (the static seed-peer list used until a
//! manager provides it).

use crate::{load_yaml, parse_inline, ConfigError};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default config file path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dragonfly/scheduler.yaml";
/// The scheduler's default gRPC port.
pub const DEFAULT_PORT: u16 = 8002;
/// The default port of a seed peer's DfdaemonUpload service.
pub const DEFAULT_SEED_PEER_PORT: u16 = 4000;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub server: Server,
    pub scheduler: Scheduling,
    pub seed_peers: Vec<SeedPeer>,
    pub host: Host,
    pub metrics: Metrics,
    // Accepted for compatibility with upstream files, not used.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<serde_yaml_ng::Value>,
    pub dynconfig: Dynconfig,
    pub manager: Manager,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed_peer: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracing: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verbose: Option<serde_yaml_ng::Value>,
    #[serde(skip_serializing_if = "Option::is_none", rename = "pprofPort")]
    pub pprof_port: Option<serde_yaml_ng::Value>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = load_yaml(path)?;
        config.validate()?;
        Ok(config)
    }

    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_inline(text)?;
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        let s = &self.scheduler;
        if !(1..=20).contains(&s.candidate_parent_limit) {
            return invalid("scheduler.candidateParentLimit", "must be between 1 and 20");
        }
        if !(1..=1000).contains(&s.filter_parent_limit) {
            return invalid("scheduler.filterParentLimit", "must be between 1 and 1000");
        }
        if s.filter_parent_limit < s.candidate_parent_limit {
            return invalid(
                "scheduler.filterParentLimit",
                "must not be lower than scheduler.candidateParentLimit",
            );
        }
        if s.retry_limit == 0 {
            return invalid("scheduler.retryLimit", "must be at least 1");
        }
        if s.retry_back_to_source_limit > s.retry_limit {
            return invalid(
                "scheduler.retryBackToSourceLimit",
                "must not be greater than scheduler.retryLimit",
            );
        }
        if s.max_content_length.as_u64() == 0 {
            return invalid("scheduler.maxContentLength", "must be greater than 0");
        }
        if s.max_children_per_parent == 0 {
            return invalid("scheduler.maxChildrenPerParent", "must be at least 1");
        }
        if !(1..=20).contains(&s.parents_per_child) {
            return invalid("scheduler.parentsPerChild", "must be between 1 and 20");
        }
        for (key, value) in [
            ("scheduler.gc.peerGCInterval", s.gc.peer_gc_interval),
            ("scheduler.gc.peerTTL", s.gc.peer_ttl),
            ("scheduler.gc.taskGCInterval", s.gc.task_gc_interval),
            ("scheduler.gc.hostGCInterval", s.gc.host_gc_interval),
            ("scheduler.gc.hostTTL", s.gc.host_ttl),
        ] {
            if value.is_zero() {
                return invalid(key, "must be greater than 0");
            }
        }
        if self.manager.is_configured() && self.manager.keep_alive.interval.is_zero() {
            return invalid("manager.keepAlive.interval", "must be greater than 0");
        }
        if self
            .seed_peers
            .iter()
            .any(|p| p.ip.is_none() && p.hostname.is_empty())
        {
            return invalid("seedPeers", "every seed peer needs an ip or a hostname");
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    #[serde(rename = "advertiseIP")]
    pub advertise_ip: Option<IpAddr>,
    #[serde(rename = "listenIP")]
    pub listen_ip: Option<IpAddr>,
    pub port: u16,
    pub host: Option<String>,
    pub work_home: Option<PathBuf>,
    pub log_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    pub plugin_dir: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub log_level: Option<String>,
    pub request_rate_limit: Option<u64>,
    /// Mutual TLS of the gRPC server (upstream's `server.tls`); the scheduler also presents
    /// this certificate to the seed peers it triggers.
    pub tls: Option<Tls>,
}

/// TLS files: the CA that signs the other side, and this side's certificate and key.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            advertise_ip: None,
            listen_ip: None,
            port: DEFAULT_PORT,
            host: None,
            work_home: None,
            log_dir: None,
            cache_dir: None,
            plugin_dir: None,
            data_dir: None,
            log_level: None,
            request_rate_limit: None,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Scheduling {
    /// Only `default` exists.
    pub algorithm: String,
    /// Most peers of one task that may go back to source.
    pub back_to_source_count: u32,
    /// Failed schedules before a peer is told to go back to source.
    pub retry_back_to_source_limit: u32,
    /// Failed schedules before the peer's download fails.
    pub retry_limit: u32,
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// Parents handed to a peer at once (upstream: 3, from the manager's cluster config).
    pub candidate_parent_limit: u32,
    /// Peers sampled before filtering (upstream: 15).
    pub filter_parent_limit: u32,
    /// Extension: most children one parent, seed peers included, serves at once (spreads
    /// load off hot parents). Soft: a peer that would otherwise go back to source takes a
    /// full parent. 1 makes a chain, the fastest layout when every host has the same link
    /// rate (BENCHMARKS.md, issue 4).
    pub max_children_per_parent: u32,
    /// Extension: how many parents of the child's own link rate fill its download. A child
    /// is given parents until their shares cover its download rate (at most
    /// candidateParentLimit; a parent is asked for 1/parentsPerChild of it at most), and a
    /// parent takes children while their asks (1/parentsPerChild of each one's download
    /// rate) fit in its upload (at most maxChildrenPerParent). Rates come from the hosts' announced bandwidth limits;
    /// unknown or equal rates give every child parentsPerChild parents and every parent
    /// parentsPerChild children. Fewer flows per link keep TCP's sharing fair (on emulated
    /// hosts 4 beat 8 at 16 peers, 1.17 against 1.25 × the bound), and pieces relayed as
    /// they arrive cost a hop little; 4 keeps a seed's child taking 3/4 of its bytes from
    /// other peers (2 gives half) (BENCHMARKS.md, issue 13).
    pub parents_per_child: u32,
    /// Extension: rate the hosts whose announced bandwidth limits say nothing (0, or at or
    /// above 400 Gbit/s: the daemons' 50 GB/s default) by the pieces their peers report:
    /// the highest rate over six seconds, with headroom (a host's upload is rated by the
    /// higher of its two meters: links are taken as symmetric unless announced). On by
    /// default: on emulated hosts with no rates configured it kept every peer taking at
    /// least half of its bytes from peers where the unmeasured scheduler missed that in a
    /// third of the runs, and left equal links as fast (BENCHMARKS.md, issue 13). `false`
    /// treats every unannounced host as equal.
    pub measure_rates: bool,
    /// Extension: the largest task (content length) a registration may announce; bounds
    /// the piece count, and so the memory, of every task.
    pub max_content_length: bytesize::ByteSize,
    /// Extension: a host's announced `ip` must be the address it connects from, and its ID
    /// must start with `<ip>-` (upstream's host IDs do), so nobody can announce, register
    /// peers for, or delete a host on another address. Turn off only behind a proxy that
    /// hides the peers' addresses.
    #[serde(rename = "verifyHostIP")]
    pub verify_host_ip: bool,
    pub gc: SchedulerGc,
}

impl Default for Scheduling {
    fn default() -> Self {
        Scheduling {
            algorithm: "default".into(),
            back_to_source_count: 200,
            retry_back_to_source_limit: 4,
            retry_limit: 5,
            retry_interval: Duration::from_millis(500),
            candidate_parent_limit: 8,
            filter_parent_limit: 40,
            max_children_per_parent: 8,
            parents_per_child: 4,
            measure_rates: true,
            max_content_length: bytesize::ByteSize::tib(10),
            verify_host_ip: true,
            gc: SchedulerGc::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SchedulerGc {
    #[serde(rename = "pieceDownloadTimeout", with = "humantime_serde")]
    pub piece_download_timeout: Duration,
    #[serde(rename = "peerGCInterval", with = "humantime_serde")]
    pub peer_gc_interval: Duration,
    #[serde(rename = "peerTTL", with = "humantime_serde")]
    pub peer_ttl: Duration,
    #[serde(rename = "taskGCInterval", with = "humantime_serde")]
    pub task_gc_interval: Duration,
    #[serde(rename = "hostGCInterval", with = "humantime_serde")]
    pub host_gc_interval: Duration,
    #[serde(rename = "hostTTL", with = "humantime_serde")]
    pub host_ttl: Duration,
}

impl Default for SchedulerGc {
    fn default() -> Self {
        SchedulerGc {
            piece_download_timeout: Duration::from_secs(30 * 60),
            peer_gc_interval: Duration::from_secs(10),
            peer_ttl: Duration::from_secs(24 * 3600),
            task_gc_interval: Duration::from_secs(30 * 60),
            host_gc_interval: Duration::from_secs(5 * 60),
            host_ttl: Duration::from_secs(3600),
        }
    }
}

/// The manager this scheduler registers with (upstream's `manager` keys). Without `addr`
/// the static config is all there is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Manager {
    /// `host:port` of the manager's gRPC service (`http://` may be written before it).
    pub addr: String,
    /// The cluster to join; 0 joins the manager's default cluster.
    #[serde(rename = "schedulerClusterID")]
    pub scheduler_cluster_id: u64,
    pub keep_alive: KeepAlive,
}

impl Default for Manager {
    fn default() -> Self {
        Manager {
            addr: String::new(),
            scheduler_cluster_id: 1,
            keep_alive: KeepAlive::default(),
        }
    }
}

impl Manager {
    pub fn is_configured(&self) -> bool {
        !self.addr.trim().is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct KeepAlive {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
}

impl Default for KeepAlive {
    fn default() -> Self {
        KeepAlive {
            interval: Duration::from_secs(5),
        }
    }
}

/// How often the cluster config is fetched from the manager.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase")]
pub struct Dynconfig {
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for Dynconfig {
    fn default() -> Self {
        Dynconfig {
            refresh_interval: Duration::from_secs(10),
        }
    }
}

/// A seed peer the scheduler may trigger (its DfdaemonUpload address).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedPeer {
    pub hostname: String,
    pub ip: Option<IpAddr>,
    /// DfdaemonUpload port.
    pub port: Option<u16>,
}

impl SeedPeer {
    /// `ip:port` (or `hostname:port`) of its upload service.
    pub fn addr(&self) -> String {
        let port = self.port.unwrap_or(DEFAULT_SEED_PEER_PORT);
        match self.ip {
            Some(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            Some(ip) => format!("{ip}:{port}"),
            None => format!("{}:{port}", self.hostname),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Host {
    pub idc: Option<String>,
    pub location: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Metrics {
    pub enable: bool,
    /// `host:port` or `:port`.
    pub addr: String,
    pub enable_host: bool,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            enable: true,
            addr: ":8000".into(),
            enable_host: false,
        }
    }
}

impl Metrics {
    /// The socket address to bind (`:8000` means every interface).
    pub fn socket_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        let text = if self.addr.starts_with(':') {
            format!("0.0.0.0{}", self.addr)
        } else {
            self.addr.clone()
        };
        text.parse().map_err(|e| ConfigError::Invalid {
            key: "metrics.addr",
            message: format!("{:?} is not host:port: {e}", self.addr),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_upstream() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.server.port, 8002);
        assert_eq!(c.scheduler.retry_limit, 5);
        assert_eq!(c.scheduler.retry_back_to_source_limit, 4);
        assert_eq!(c.scheduler.retry_interval, Duration::from_millis(500));
        assert_eq!(c.scheduler.gc.peer_ttl, Duration::from_secs(86400));
        assert_eq!(c.scheduler.gc.host_ttl, Duration::from_secs(3600));
        assert_eq!(c.metrics.socket_addr().unwrap().port(), 8000);
    }

    #[test]
    fn upstream_style_file_loads() {
        let c = Config::from_yaml(
            "server:\n  advertiseIP: 10.0.0.1\n  listenIP: 0.0.0.0\n  port: 9002\n\
             scheduler:\n  algorithm: default\n  retryInterval: 1s\n  gc:\n    peerTTL: 1h\n    hostTTL: 2h\n\
             database:\n  redis:\n    addrs: [a:6379]\n\
             manager:\n  addr: 127.0.0.1:65003\n  schedulerClusterID: 2\n  keepAlive:\n    interval: 3s\n\
             dynconfig:\n  refreshInterval: 30s\n\
             seedPeers:\n  - ip: 127.0.0.1\n    port: 4100\n",
        )
        .unwrap();
        assert_eq!(c.server.port, 9002);
        assert_eq!(c.scheduler.gc.peer_ttl, Duration::from_secs(3600));
        assert_eq!(c.seed_peers[0].addr(), "127.0.0.1:4100");
        assert!(c.manager.is_configured());
        assert_eq!(c.manager.scheduler_cluster_id, 2);
        assert_eq!(c.manager.keep_alive.interval, Duration::from_secs(3));
        assert_eq!(c.dynconfig.refresh_interval, Duration::from_secs(30));
        assert!(!Config::from_yaml("").unwrap().manager.is_configured());
    }

    #[test]
    fn bad_values_name_their_key() {
        for (yaml, key) in [
            (
                "scheduler:\n  candidateParentLimit: 0\n",
                "candidateParentLimit",
            ),
            ("scheduler:\n  retryLimit: 0\n", "retryLimit"),
            ("scheduler:\n  parentsPerChild: 0\n", "parentsPerChild"),
            ("scheduler:\n  gc:\n    peerTTL: 0s\n", "peerTTL"),
            ("seedPeers:\n  - port: 1\n", "seedPeers"),
            ("schedulr: {}\n", "schedulr"),
        ] {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(key), "{yaml}: {err}");
        }
    }
}
