//! This host's identity, listening addresses and live traffic rates (reported by SyncHost).

use d7y_config::dfdaemon::{Config, HostType};
use d7y_types::HostIdentity;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Who this daemon is and where it listens.
#[derive(Debug, Clone)]
pub struct HostInfo {
    pub identity: HostIdentity,
    pub host_id: String,
    pub ip: IpAddr,
    pub hostname: String,
    pub upload_port: u16,
    pub piece_port: u16,
    pub host_type: u32,
    pub idc: Option<String>,
    pub location: Option<String>,
    pub disable_shared: bool,
    pub max_tx_bps: u64,
    pub max_rx_bps: u64,
    /// Where connections to the schedulers come from: the advertised address when it is
    /// one of this host's (a scheduler checks that a host connects from the address it
    /// announces, and on a host with several addresses the route may pick another one).
    pub source_ip: Option<IpAddr>,
}

impl HostInfo {
    pub fn new(config: &Config, upload_port: u16, piece_port: u16) -> HostInfo {
        let ip = config.host.ip.unwrap_or_else(detect_ip);
        let identity = HostIdentity {
            ip: ip.to_string(),
            hostname: config.host.hostname.clone(),
            is_seed: config.is_seed_peer(),
        };
        let host_type = match (config.is_seed_peer(), config.seed_peer.kind) {
            (true, HostType::Super) => 1,
            (true, HostType::Normal) => 1,
            (false, _) => 0,
        };
        HostInfo {
            host_id: identity.host_id(),
            identity,
            ip,
            hostname: config.host.hostname.clone(),
            upload_port,
            piece_port,
            host_type,
            idc: config.host.idc.clone(),
            location: config.host.location.clone(),
            disable_shared: config.upload.disable_shared,
            max_tx_bps: config.upload.bandwidth_limit.as_u64().saturating_mul(8),
            max_rx_bps: config.download.bandwidth_limit.as_u64().saturating_mul(8),
            source_ip: Some(ip).filter(|ip| is_local(*ip)),
        }
    }
}

/// Whether `ip` is an address of this host (a socket can be bound to it).
fn is_local(ip: IpAddr) -> bool {
    !ip.is_unspecified() && std::net::UdpSocket::bind((ip, 0)).is_ok()
}

/// The first non-loopback IPv4 address, else the first non-loopback one, else 127.0.0.1.
fn detect_ip() -> IpAddr {
    let addrs = if_addrs::get_if_addrs().unwrap_or_default();
    let candidates: Vec<IpAddr> = addrs
        .iter()
        .filter(|i| !i.is_loopback())
        .map(|i| i.ip())
        .collect();
    candidates
        .iter()
        .find(|ip| ip.is_ipv4())
        .or(candidates.first())
        .copied()
        .unwrap_or(IpAddr::from([127, 0, 0, 1]))
}

/// Byte counters and their rates over the last sampling interval.
#[derive(Default)]
pub struct Traffic {
    uploaded: AtomicU64,
    downloaded: AtomicU64,
    tx_rate: AtomicU64,
    rx_rate: AtomicU64,
}

impl Traffic {
    pub fn add_upload(&self, bytes: u64) {
        self.uploaded.fetch_add(bytes, Ordering::Relaxed);
    }

    pub fn add_download(&self, bytes: u64) {
        self.downloaded.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Upload rate in bytes per second.
    pub fn tx_rate(&self) -> u64 {
        self.tx_rate.load(Ordering::Relaxed)
    }

    pub fn rx_rate(&self) -> u64 {
        self.rx_rate.load(Ordering::Relaxed)
    }

    /// Samples the counters every `interval`, forever.
    pub async fn sample(self: Arc<Self>, interval: Duration) {
        let mut ticker = tokio::time::interval(interval);
        let (mut up, mut down) = (0, 0);
        loop {
            ticker.tick().await;
            let (u, d) = (
                self.uploaded.load(Ordering::Relaxed),
                self.downloaded.load(Ordering::Relaxed),
            );
            let secs = interval.as_secs_f64().max(0.001);
            self.tx_rate
                .store(((u - up) as f64 / secs) as u64, Ordering::Relaxed);
            self.rx_rate
                .store(((d - down) as f64 / secs) as u64, Ordering::Relaxed);
            (up, down) = (u, d);
        }
    }
}

/// This host as `common.v2.Host`, with live rates (bits per second), as AnnounceHost and
/// SyncHost report it.
pub fn host_proto(h: &HostInfo, traffic: &Traffic) -> dragonfly_api::common::v2::Host {
    use dragonfly_api::common::v2::{Host, Network};
    Host {
        id: h.host_id.clone(),
        r#type: h.host_type,
        hostname: h.hostname.clone(),
        ip: h.ip.to_string(),
        port: h.upload_port as i32,
        download_port: h.piece_port as i32,
        os: std::env::consts::OS.to_string(),
        network: Some(Network {
            location: h.location.clone(),
            idc: h.idc.clone(),
            max_tx_bandwidth: h.max_tx_bps,
            tx_bandwidth: Some(traffic.tx_rate().saturating_mul(8)),
            max_rx_bandwidth: h.max_rx_bps,
            rx_bandwidth: Some(traffic.rx_rate().saturating_mul(8)),
            ..Default::default()
        }),
        disable_shared: h.disable_shared,
        ..Default::default()
    }
}
