//! `dfdaemon.yaml`.

use crate::{load_yaml, parse_inline, ConfigError};
use bytesize::ByteSize;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default config file path.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/dragonfly/dfdaemon.yaml";
/// The origin schemes dfdaemon knows (upstream's): HTTP(S), object storage, HDFS, hubs.
pub const KNOWN_SCHEMES: &[&str] = &[
    "http",
    "https",
    "s3",
    "gs",
    "abs",
    "oss",
    "obs",
    "cos",
    "hdfs",
    "hf",
    "modelscope",
];

/// The default unix socket of the download gRPC service.
pub const DEFAULT_DOWNLOAD_SOCKET: &str = "/var/run/dragonfly/dfdaemon.sock";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Config {
    pub host: Host,
    pub server: Server,
    pub download: Download,
    pub upload: Upload,
    pub manager: Manager,
    pub scheduler: Scheduler,
    pub seed_peer: SeedPeer,
    pub backend: Backend,
    pub dynconfig: Dynconfig,
    pub storage: Storage,
    pub gc: Gc,
    pub proxy: Proxy,
    pub metrics: Metrics,
    pub health: Health,
    pub stats: Stats,
    pub tracing: Tracing,
}

impl Config {
    /// Loads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config: Config = load_yaml(path)?;
        config.validate()?;
        Ok(config)
    }

    /// Parses and validates YAML text (used by tests and generated configs).
    pub fn from_yaml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_inline(text)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks values that parse but make no sense.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.to_string(),
            })
        };
        if self.download.concurrent_piece_count == 0 {
            return invalid("download.concurrentPieceCount", "must be at least 1");
        }
        if self.download.back_to_source_concurrent_piece_count == 0 {
            return invalid(
                "download.backToSourceConcurrentPieceCount",
                "must be at least 1",
            );
        }
        for (key, limit) in [
            ("download.bandwidthLimit", self.download.bandwidth_limit),
            (
                "download.backToSourceBandwidthLimit",
                self.download.back_to_source_bandwidth_limit,
            ),
            ("upload.bandwidthLimit", self.upload.bandwidth_limit),
        ] {
            if limit.as_u64() < 1024 {
                return invalid(key, "must be at least 1KiB per second");
            }
        }
        if self.upload.concurrent_upload_limit == 0 {
            return invalid("upload.concurrentUploadLimit", "must be at least 1");
        }
        let policy = &self.gc.policy;
        for (key, value) in [
            (
                "gc.policy.diskHighThresholdPercent",
                policy.disk_high_threshold_percent,
            ),
            (
                "gc.policy.diskLowThresholdPercent",
                policy.disk_low_threshold_percent,
            ),
        ] {
            if !(1..=99).contains(&value) {
                return invalid(key, "must be between 1 and 99");
            }
        }
        if policy.disk_low_threshold_percent >= policy.disk_high_threshold_percent {
            return invalid(
                "gc.policy.diskLowThresholdPercent",
                "must be lower than gc.policy.diskHighThresholdPercent",
            );
        }
        if self.gc.interval.is_zero() {
            return invalid("gc.interval", "must be greater than 0");
        }
        if self.storage.write_buffer_size == 0 || self.storage.read_buffer_size == 0 {
            return invalid(
                "storage.writeBufferSize/readBufferSize",
                "must be greater than 0",
            );
        }
        if self.backend.allowed_schemes.is_empty() {
            return invalid(
                "backend.allowedSchemes",
                "must name at least one scheme (http, https)",
            );
        }
        if let Some(bad) = self
            .backend
            .allowed_schemes
            .iter()
            .find(|s| !KNOWN_SCHEMES.contains(&s.to_ascii_lowercase().as_str()))
        {
            return invalid(
                "backend.allowedSchemes",
                &format!(
                    "{bad:?} is not a scheme this dfdaemon can fetch ({})",
                    KNOWN_SCHEMES.join(", ")
                ),
            );
        }
        let piece_server = &self.storage.server;
        if piece_server.max_connections == 0 || piece_server.max_connections_per_ip == 0 {
            return invalid(
                "storage.server.maxConnections/maxConnectionsPerIP",
                "must be at least 1",
            );
        }
        if piece_server.idle_timeout.is_zero() || piece_server.write_timeout.is_zero() {
            return invalid(
                "storage.server.idleTimeout/writeTimeout",
                "must be greater than 0",
            );
        }
        let cc = &piece_server.tcp_congestion_control;
        // The kernel's names: at most 15 bytes (TCP_CA_NAME_MAX with its NUL).
        if cc.len() > 15 || !cc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return invalid(
                "storage.server.tcpCongestionControl",
                &format!("{cc:?} is not a TCP congestion control name (e.g. bbr, cubic)"),
            );
        }
        if self.backend.read_timeout.is_zero() {
            return invalid("backend.readTimeout", "must be greater than 0");
        }
        if !(4096..=64 * 1024 * 1024).contains(&self.proxy.read_buffer_size) {
            return invalid("proxy.readBufferSize", "must be between 4KiB and 64MiB");
        }
        if self
            .proxy
            .server
            .basic_auth
            .as_ref()
            .is_some_and(|a| a.username.is_empty() || a.username.contains(':'))
        {
            return invalid(
                "proxy.server.basicAuth.username",
                "must be non-empty and must not contain ':'",
            );
        }
        if self.proxy.server.ca_cert.is_some() != self.proxy.server.ca_key.is_some() {
            return invalid(
                "proxy.server.caCert/caKey",
                "set both (the CA certificate and its key) or neither",
            );
        }
        if !self.manager.addr.trim().is_empty() {
            if self.dynconfig.refresh_interval.is_zero() {
                return invalid("dynconfig.refreshInterval", "must be greater than 0");
            }
            if self.seed_peer.enable && self.seed_peer.keepalive_interval.is_zero() {
                return invalid("seedPeer.keepaliveInterval", "must be greater than 0");
            }
        }
        if self.download.server.socket_path.as_os_str().is_empty() {
            return invalid("download.server.socketPath", "must not be empty");
        }
        Ok(())
    }

    /// Whether this daemon is a seed peer.
    pub fn is_seed_peer(&self) -> bool {
        self.seed_peer.enable
    }
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Host {
    pub idc: Option<String>,
    pub location: Option<String>,
    pub hostname: String,
    /// The advertised IP; the first non-loopback interface address when unset.
    pub ip: Option<IpAddr>,
    #[serde(rename = "schedulerClusterID")]
    pub scheduler_cluster_id: Option<u64>,
}

impl Default for Host {
    fn default() -> Self {
        Host {
            idc: None,
            location: None,
            hostname: system_hostname(),
            ip: None,
            scheduler_cluster_id: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Server {
    pub plugin_dir: PathBuf,
    pub cache_dir: PathBuf,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            plugin_dir: "/usr/local/lib/dragonfly/plugins/dfdaemon/".into(),
            cache_dir: "/var/cache/dragonfly/dfdaemon/".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct DownloadServer {
    pub socket_path: PathBuf,
    pub request_rate_limit: u64,
    pub request_buffer_size: usize,
}

impl Default for DownloadServer {
    fn default() -> Self {
        DownloadServer {
            socket_path: DEFAULT_DOWNLOAD_SOCKET.into(),
            request_rate_limit: 4000,
            request_buffer_size: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Download {
    pub server: DownloadServer,
    /// Piece transfer protocol announced to children: "tcp" (Vortex over TCP).
    pub protocol: String,
    /// Download bandwidth limit in bytes per second (all tasks together).
    pub bandwidth_limit: ByteSize,
    /// Back-to-source bandwidth limit in bytes per second (all tasks together).
    pub back_to_source_bandwidth_limit: ByteSize,
    #[serde(with = "humantime_serde")]
    pub piece_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub collected_piece_timeout: Duration,
    pub concurrent_piece_count: u32,
    /// Parallel ranged GETs per task when going back to source.
    pub back_to_source_concurrent_piece_count: u32,
}

impl Default for Download {
    fn default() -> Self {
        Download {
            server: DownloadServer::default(),
            protocol: "tcp".into(),
            bandwidth_limit: ByteSize::gb(50),
            back_to_source_bandwidth_limit: ByteSize::gb(50),
            piece_timeout: Duration::from_secs(360),
            collected_piece_timeout: Duration::from_secs(360),
            concurrent_piece_count: 8,
            back_to_source_concurrent_piece_count: 8,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadServer {
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub request_rate_limit: u64,
    pub request_buffer_size: usize,
}

impl Default for UploadServer {
    fn default() -> Self {
        UploadServer {
            ip: None,
            port: 4000,
            ca_cert: None,
            cert: None,
            key: None,
            request_rate_limit: 4000,
            request_buffer_size: 1000,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsClient {
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Upload {
    pub server: UploadServer,
    pub client: TlsClient,
    pub disable_shared: bool,
    /// Upload bandwidth limit in bytes per second (all children together).
    pub bandwidth_limit: ByteSize,
    /// Extension: pieces served at once over Vortex; further requests wait their turn.
    /// Defaults to upstream's scheduler load limits: 200 for a peer, 2000 for a seed peer.
    pub concurrent_upload_limit: u32,
}

impl Default for Upload {
    fn default() -> Self {
        Upload {
            server: UploadServer::default(),
            client: TlsClient::default(),
            disable_shared: false,
            bandwidth_limit: ByteSize::gb(50),
            concurrent_upload_limit: 200,
        }
    }
}

/// The manager (`manager.addr`, `http://host:65003` or `host:65003`): the daemon asks it
/// for its schedulers every `dynconfig.refreshInterval`, and a seed peer registers with it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Manager {
    pub addr: String,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Scheduler {
    #[serde(with = "humantime_serde")]
    pub announce_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub schedule_timeout: Duration,
    pub max_schedule_count: u32,
    pub ca_cert: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for Scheduler {
    fn default() -> Self {
        Scheduler {
            announce_interval: Duration::from_secs(300),
            schedule_timeout: Duration::from_secs(3 * 3600),
            max_schedule_count: 5,
            ca_cert: None,
            cert: None,
            key: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum HostType {
    #[default]
    #[serde(rename = "normal")]
    Normal,
    #[serde(rename = "super")]
    Super,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct SeedPeer {
    pub enable: bool,
    #[serde(rename = "type")]
    pub kind: HostType,
    /// The seed peer cluster it registers in with the manager.
    #[serde(rename = "clusterID")]
    pub cluster_id: u64,
    /// How often it keeps alive with the manager.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
}

impl Default for SeedPeer {
    fn default() -> Self {
        SeedPeer {
            enable: false,
            kind: HostType::default(),
            cluster_id: 1,
            keepalive_interval: Duration::from_secs(15),
        }
    }
}

/// Extension: limits on back-to-source. A seed peer fetches URLs that arrive over the
/// network (through the scheduler), so these decide what a stranger can make it fetch.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Backend {
    /// URL schemes back-to-source may fetch (all it knows by default: http, https, s3, gs,
    /// abs, oss, obs, cos, hdfs, hf, modelscope).
    pub allowed_schemes: Vec<String>,
    /// Networks an origin may not be in (CIDR), checked for the URL, for every redirect
    /// target and for every address a name resolves to. Defaults to the link-local ranges,
    /// where cloud metadata services answer.
    pub denied_networks: Vec<ipnet::IpNet>,
    /// The longest an origin may stay silent while sending a body. There is no deadline on
    /// a whole body: a large object from a slow origin is not cut off.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
}

impl Default for Backend {
    fn default() -> Self {
        Backend {
            allowed_schemes: KNOWN_SCHEMES.iter().map(|s| s.to_string()).collect(),
            denied_networks: vec![
                "169.254.0.0/16".parse().expect("cidr"),
                "fe80::/10".parse().expect("cidr"),
            ],
            read_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Dynconfig {
    #[serde(with = "humantime_serde")]
    pub refresh_interval: Duration,
}

impl Default for Dynconfig {
    fn default() -> Self {
        Dynconfig {
            refresh_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct StorageServer {
    pub ip: Option<IpAddr>,
    pub tcp_port: u16,
    pub tcp_fastopen: bool,
    pub quic_port: u16,
    /// Extension: piece-server (Vortex) connections at once, from everyone.
    pub max_connections: usize,
    /// Extension: piece-server connections at once from one address.
    #[serde(rename = "maxConnectionsPerIP")]
    pub max_connections_per_ip: usize,
    /// Extension: how long a piece-server connection may wait for its next request.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Extension: how long one write to a child may take before its connection is cut
    /// (a child that stops reading frees its upload slot).
    #[serde(with = "humantime_serde")]
    pub write_timeout: Duration,
    /// Extension: the TCP congestion control of the pieces this daemon sends (set on the
    /// piece server's listening socket, which its connections inherit), e.g. `bbr`; empty
    /// for the host's default. Linux only; the algorithm must be loaded (`modprobe
    /// tcp_bbr`) and, for a daemon without CAP_NET_ADMIN, allowed
    /// (`net.ipv4.tcp_allowed_congestion_control`). On emulated hosts whose default is
    /// cubic, flows that share a drop-tail queue sometimes stall in back-off for seconds
    /// and every child relaying from the stalled one waits as long (BENCHMARKS.md); BBR's
    /// flows did not. BBR may also take more than its share from the host's cubic flows,
    /// so it is not the default.
    pub tcp_congestion_control: String,
}

impl Default for StorageServer {
    fn default() -> Self {
        StorageServer {
            ip: None,
            tcp_port: 4005,
            tcp_fastopen: false,
            quic_port: 4006,
            max_connections: 2048,
            max_connections_per_ip: 128,
            idle_timeout: Duration::from_secs(60),
            write_timeout: Duration::from_secs(30),
            tcp_congestion_control: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Storage {
    pub server: StorageServer,
    pub dir: PathBuf,
    /// Keep tasks across restarts. Deviation: upstream defaults to false (a restart starts
    /// empty); we default to true so finished tasks are served and interrupted ones resume.
    pub keep: bool,
    #[serde(with = "humantime_serde")]
    pub write_piece_timeout: Duration,
    /// Bytes gathered from the network before one write to the content file. Deviation:
    /// 128 KiB rather than upstream's 4 MiB. A buffer that fits the CPU's cache lets the
    /// kernel copy it into the page cache from cache instead of from memory; with 4 MiB the
    /// daemon spent about 3x curl's CPU per GiB from the origin (BENCHMARKS.md).
    pub write_buffer_size: usize,
    pub read_buffer_size: usize,
    pub cache_capacity: ByteSize,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            server: StorageServer::default(),
            dir: "/var/lib/dragonfly/".into(),
            keep: true,
            write_piece_timeout: Duration::from_secs(360),
            write_buffer_size: 128 * 1024,
            read_buffer_size: 1024 * 1024,
            cache_capacity: ByteSize::mib(64),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct GcPolicy {
    #[serde(rename = "taskTTL", with = "humantime_serde")]
    pub task_ttl: Duration,
    #[serde(rename = "persistentTaskTTL", with = "humantime_serde")]
    pub persistent_task_ttl: Duration,
    #[serde(rename = "persistentCacheTaskTTL", with = "humantime_serde")]
    pub persistent_cache_task_ttl: Duration,
    /// Capacity the percentages apply to; 0 means the whole disk.
    #[serde(alias = "distThreshold")]
    pub disk_threshold: ByteSize,
    #[serde(alias = "distHighThresholdPercent")]
    pub disk_high_threshold_percent: u8,
    #[serde(alias = "distLowThresholdPercent")]
    pub disk_low_threshold_percent: u8,
}

impl Default for GcPolicy {
    fn default() -> Self {
        GcPolicy {
            task_ttl: Duration::from_secs(30 * 24 * 3600),
            persistent_task_ttl: Duration::from_secs(24 * 3600),
            persistent_cache_task_ttl: Duration::from_secs(24 * 3600),
            disk_threshold: ByteSize::b(0),
            disk_high_threshold_percent: 80,
            disk_low_threshold_percent: 60,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Gc {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    pub policy: GcPolicy,
}

impl Default for Gc {
    fn default() -> Self {
        Gc {
            interval: Duration::from_secs(900),
            policy: GcPolicy::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct BasicAuth {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyServer {
    pub ip: Option<IpAddr>,
    pub port: u16,
    pub request_rate_limit: u64,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub basic_auth: Option<BasicAuth>,
}

impl Default for ProxyServer {
    fn default() -> Self {
        ProxyServer {
            ip: None,
            port: 4001,
            request_rate_limit: 4000,
            ca_cert: None,
            ca_key: None,
            basic_auth: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyRule {
    pub regex: String,
    #[serde(rename = "useTLS")]
    pub use_tls: bool,
    pub redirect: Option<String>,
    pub filtered_query_params: Vec<String>,
}

impl Default for ProxyRule {
    fn default() -> Self {
        ProxyRule {
            regex: ".*".into(),
            use_tls: false,
            redirect: None,
            filtered_query_params: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryMirror {
    pub addr: String,
    pub cert: Option<PathBuf>,
    #[serde(rename = "enableTaskIDBasedBlobDigest")]
    pub enable_task_id_based_blob_digest: bool,
}

impl Default for RegistryMirror {
    fn default() -> Self {
        RegistryMirror {
            addr: "https://index.docker.io".into(),
            cert: None,
            enable_task_id_based_blob_digest: true,
        }
    }
}

/// A host whose HTTPS the proxy intercepts (upstream Go dfdaemon's `hijackHTTPS.hosts`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct HijackHost {
    /// Regular expression matched against the CONNECT target (`host:port`).
    pub regx: String,
    /// Do not verify the certificate of the real host behind the interception.
    pub insecure: bool,
}

/// Which CONNECT tunnels the proxy intercepts (TLS terminated with a leaf certificate signed
/// by `proxy.server.caCert`, or by a CA generated on first use); all others are tunnelled
/// untouched.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct HijackHttps {
    pub hosts: Vec<HijackHost>,
}

/// The HTTP(S) proxy and registry mirror on `proxy.server.port` (4001, loopback unless
/// `proxy.server.ip` says otherwise).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Proxy {
    pub server: ProxyServer,
    pub rules: Option<Vec<ProxyRule>>,
    pub registry_mirror: RegistryMirror,
    /// Extension (upstream Go dfdaemon's key): hosts whose HTTPS is intercepted.
    #[serde(rename = "hijackHTTPS")]
    pub hijack_https: HijackHttps,
    pub disable_back_to_source: bool,
    pub prefetch: bool,
    pub prefetch_bandwidth_limit: ByteSize,
    pub read_buffer_size: usize,
}

impl Default for Proxy {
    fn default() -> Self {
        Proxy {
            server: ProxyServer::default(),
            rules: None,
            registry_mirror: RegistryMirror::default(),
            hijack_https: HijackHttps::default(),
            disable_back_to_source: false,
            prefetch: false,
            prefetch_bandwidth_limit: ByteSize::gb(10),
            read_buffer_size: 1024 * 1024,
        }
    }
}

/// An HTTP listener of an auxiliary server.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpServer {
    pub ip: Option<IpAddr>,
    pub port: u16,
}

macro_rules! http_section {
    ($name:ident, $port:expr) => {
        #[derive(Debug, Clone, Serialize, Deserialize)]
        #[serde(default, rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            pub server: HttpServer,
        }

        impl Default for $name {
            fn default() -> Self {
                $name {
                    server: HttpServer {
                        ip: None,
                        port: $port,
                    },
                }
            }
        }
    };
}

http_section!(Metrics, 4002);
http_section!(Health, 4003);
http_section!(Stats, 4004);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, rename_all = "camelCase", deny_unknown_fields)]
pub struct Tracing {
    pub protocol: Option<String>,
    pub endpoint: Option<String>,
    pub path: Option<PathBuf>,
    pub headers: std::collections::HashMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_upstream_defaults() {
        let c = Config::from_yaml("").unwrap();
        assert_eq!(c.upload.server.port, 4000);
        assert_eq!(c.proxy.server.port, 4001);
        assert_eq!(c.metrics.server.port, 4002);
        assert_eq!(c.health.server.port, 4003);
        assert_eq!(c.storage.server.tcp_port, 4005);
        assert_eq!(
            c.storage.server.tcp_congestion_control, "",
            "the host's default"
        );
        let bbr = Config::from_yaml("storage:\n  server:\n    tcpCongestionControl: bbr").unwrap();
        assert_eq!(bbr.storage.server.tcp_congestion_control, "bbr");
        assert_eq!(
            c.download.server.socket_path,
            PathBuf::from(DEFAULT_DOWNLOAD_SOCKET)
        );
        assert_eq!(c.download.concurrent_piece_count, 8);
        assert_eq!(c.gc.policy.task_ttl, Duration::from_secs(30 * 24 * 3600));
        assert_eq!(c.gc.policy.disk_high_threshold_percent, 80);
        assert!(!c.seed_peer.enable);
    }

    #[test]
    fn parses_upstream_style_file() {
        let c = Config::from_yaml(
            r#"
host:
  idc: idc1
  location: "cn|hz"
download:
  server:
    socketPath: /tmp/x/dfdaemon.sock
  bandwidthLimit: 100MiB
  pieceTimeout: 30s
  concurrentPieceCount: 16
upload:
  server:
    port: 14000
  bandwidthLimit: 1GB
storage:
  dir: /tmp/x/data
  keep: true
  server:
    tcpPort: 14005
gc:
  interval: 1m
  policy:
    taskTTL: 1h
    distHighThresholdPercent: 90
    distLowThresholdPercent: 70
seedPeer:
  enable: true
  type: super
metrics:
  server:
    port: 14002
"#,
        )
        .unwrap();
        assert_eq!(c.download.bandwidth_limit, ByteSize::mib(100));
        assert_eq!(c.download.piece_timeout, Duration::from_secs(30));
        assert_eq!(c.upload.bandwidth_limit, ByteSize::gb(1));
        assert_eq!(c.storage.server.tcp_port, 14005);
        assert_eq!(c.gc.policy.disk_high_threshold_percent, 90);
        assert_eq!(c.gc.policy.task_ttl, Duration::from_secs(3600));
        assert!(c.is_seed_peer());
        assert_eq!(c.seed_peer.kind, HostType::Super);
        assert!(c.storage.keep);
    }

    #[test]
    fn parses_upstream_proxy_section() {
        let c = Config::from_yaml(
            r#"
proxy:
  server:
    ip: 0.0.0.0
    port: 14001
    caCert: /etc/dragonfly/ca.crt
    caKey: /etc/dragonfly/ca.key
    basicAuth:
      username: user
      password: pass
  rules:
    - regex: 'blobs/sha256.*'
    - regex: 'example\.com/files/.*'
      useTLS: true
      filteredQueryParams: [Expires, Signature]
  registryMirror:
    addr: https://index.docker.io
    enableTaskIDBasedBlobDigest: true
  hijackHTTPS:
    hosts:
      - regx: 'registry\.example\.com:443'
        insecure: false
  disableBackToSource: false
  readBufferSize: 2097152
"#,
        )
        .unwrap();
        let rules = c.proxy.rules.as_ref().unwrap();
        assert_eq!(rules.len(), 2);
        assert!(rules[1].use_tls);
        assert_eq!(rules[1].filtered_query_params, ["Expires", "Signature"]);
        assert_eq!(
            c.proxy.hijack_https.hosts[0].regx,
            r"registry\.example\.com:443"
        );
        assert_eq!(c.proxy.server.basic_auth.as_ref().unwrap().username, "user");
        assert_eq!(c.proxy.read_buffer_size, 2 * 1024 * 1024);
        let defaults = Config::from_yaml("").unwrap();
        assert_eq!(
            defaults.proxy.server.ip, None,
            "the proxy decides: loopback"
        );
        assert!(defaults.proxy.rules.is_none());
        assert_eq!(
            defaults.proxy.registry_mirror.addr,
            "https://index.docker.io"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let cases = [
            ("downlaod: {}", "unknown field `downlaod`"),
            ("proxy:\n  readBufferSize: 10", "proxy.readBufferSize"),
            (
                "proxy:\n  server:\n    caCert: /x.crt",
                "proxy.server.caCert/caKey",
            ),
            (
                "proxy:\n  server:\n    basicAuth: {username: '', password: x}",
                "proxy.server.basicAuth.username",
            ),
            (
                "download:\n  concurentPieceCount: 3",
                "unknown field `concurentPieceCount`",
            ),
            (
                "download:\n  concurrentPieceCount: 0",
                "download.concurrentPieceCount",
            ),
            ("download:\n  pieceTimeout: soon", "pieceTimeout"),
            ("upload:\n  server:\n    port: 70000", "port"),
            (
                "gc:\n  policy:\n    diskLowThresholdPercent: 90",
                "diskLowThresholdPercent",
            ),
            ("upload:\n  bandwidthLimit: 10", "upload.bandwidthLimit"),
            (
                "backend:\n  allowedSchemes: [ftp]",
                "backend.allowedSchemes",
            ),
            (
                "backend:\n  deniedNetworks: [10.0.0.0/33]",
                "deniedNetworks",
            ),
            (
                "storage:\n  server:\n    tcpCongestionControl: 'bbr; rm'",
                "storage.server.tcpCongestionControl",
            ),
            (
                "storage:\n  server:\n    tcpCongestionControl: averyveryverylongname",
                "storage.server.tcpCongestionControl",
            ),
        ];
        for (yaml, needle) in cases {
            let err = Config::from_yaml(yaml).unwrap_err().to_string();
            assert!(err.contains(needle), "{yaml:?} -> {err}");
        }
    }

    #[test]
    fn load_names_the_missing_file() {
        let err = Config::load(Path::new("/nonexistent/dfdaemon.yaml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dfdaemon.yaml"));
    }
}
