//! The daemon and its manager (`manager.addr`): every `dynconfig.refreshInterval` it asks
//! the manager which schedulers serve it (ListSchedulers; the manager's searcher decides by
//! cluster ID, IDC, location, hostname and address) and follows the answer; a seed peer
//! also registers (UpdateSeedPeer) and keeps alive (KeepAlive every
//! `seedPeer.keepaliveInterval`), so the schedulers of its cluster trigger it.
//!
//! The last answer is kept in `server.cacheDir`, so a daemon restarted while the manager is
//! away starts on it; while the manager is away the daemon keeps the schedulers it had.
//! Who the control plane is also decides a power: a task may be deleted over the network
//! only by the manager or one of these schedulers ([`ControlPlane`]).

use crate::host::HostInfo;
use crate::scheduler::Schedulers;
use d7y_config::dfdaemon::Config;
use dragonfly_api::manager::v2::manager_client::ManagerClient;
use dragonfly_api::manager::v2::{
    KeepAliveRequest, ListSchedulersRequest, SourceType, UpdateSeedPeerRequest,
};
use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most schedulers taken from one answer.
const MAX_SCHEDULERS: usize = 256;
const CACHE_FILE: &str = "dynconfig-cache.yaml";

/// What is cached between runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Cached {
    /// `ip:port` of each scheduler.
    pub schedulers: Vec<String>,
}

/// The addresses this daemon takes orders from over the network: its manager and its
/// schedulers. Their connections may delete tasks (the manager's delete_task job, a
/// scheduler's); nobody else's may.
#[derive(Debug, Default)]
pub struct ControlPlane {
    ips: RwLock<HashSet<IpAddr>>,
    manager: RwLock<HashSet<IpAddr>>,
}

impl ControlPlane {
    pub fn trusts(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.ips.read().expect("ips").contains(&ip)
            || self.manager.read().expect("manager").contains(&ip)
    }

    /// The schedulers' addresses (`host:port`, resolved).
    pub async fn set_schedulers(&self, addrs: &[String]) {
        let resolved = resolve_all(addrs).await;
        *self.ips.write().expect("ips") = resolved;
    }

    async fn set_manager(&self, addr: &str) {
        let resolved = resolve_all(&[host_port(addr)]).await;
        if !resolved.is_empty() {
            *self.manager.write().expect("manager") = resolved;
        }
    }
}

async fn resolve_all(addrs: &[String]) -> HashSet<IpAddr> {
    let mut out = HashSet::new();
    for addr in addrs {
        if let Ok(found) = tokio::net::lookup_host(addr.as_str()).await {
            out.extend(found.map(|a| a.ip().to_canonical()));
        }
    }
    out
}

use d7y_config::cache::manager_target as host_port;

fn cache_path(config: &Config) -> PathBuf {
    config.server.cache_dir.join(CACHE_FILE)
}

/// The schedulers the last run was given, if any were kept.
pub fn load_cache(config: &Config) -> Option<Cached> {
    d7y_config::cache::load(&cache_path(config))
}

fn save_cache(config: &Config, cached: &Cached) {
    let path = cache_path(config);
    if let Err(e) = d7y_config::cache::save(&path, cached) {
        debug!(%e, path = %path.display(), "cannot keep the dynconfig cache");
    }
}

/// The manager's TLS identity (`manager.caCert`/`cert`/`key`), when configured.
pub type ManagerTls = Option<Arc<d7y_net::ClientTls>>;

async fn connect(addr: &str, tls: &ManagerTls) -> Result<ManagerClient<Channel>, String> {
    let target = host_port(addr);
    let channel = d7y_net::channel(
        &target,
        &d7y_net::ChannelOptions {
            tls: tls.clone(),
            local: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            keepalive: Some((Duration::from_secs(10), Duration::from_secs(10))),
        },
    )
    .await
    .map_err(|e| format!("cannot connect to the manager at {addr}: {e}"))?;
    Ok(ManagerClient::new(channel).max_decoding_message_size(16 << 20))
}

/// Asks the manager for this host's schedulers once.
async fn list_schedulers(
    client: &mut ManagerClient<Channel>,
    config: &Config,
    host: &HostInfo,
) -> Result<Vec<String>, String> {
    let mut request = tonic::Request::new(ListSchedulersRequest {
        source_type: if config.is_seed_peer() {
            SourceType::SeedPeerSource
        } else {
            SourceType::PeerSource
        } as i32,
        hostname: host.hostname.clone(),
        ip: host.ip.to_string(),
        idc: host.idc.clone(),
        location: host.location.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        commit: String::new(),
        scheduler_cluster_id: config.host.scheduler_cluster_id.unwrap_or(0),
    });
    request.set_timeout(REQUEST_TIMEOUT);
    let answer = client
        .list_schedulers(request)
        .await
        .map_err(|s| format!("ListSchedulers failed: {}", s.message()))?
        .into_inner();
    let mut addrs: Vec<String> = answer
        .schedulers
        .into_iter()
        .filter(|s| s.state != "inactive" && (1..=65535).contains(&s.port))
        .filter_map(|s| {
            let ip: IpAddr = s.ip.parse().ok()?;
            Some(std::net::SocketAddr::new(ip, s.port as u16).to_string())
        })
        .take(MAX_SCHEDULERS)
        .collect();
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

/// The schedulers to start with: the manager's answer, else the cached one, else
/// `fallback` (the dynconfig file's).
pub async fn initial(
    config: &Config,
    host: &HostInfo,
    fallback: Vec<String>,
    tls: &ManagerTls,
) -> Vec<String> {
    let asked = tokio::time::timeout(CONNECT_TIMEOUT + REQUEST_TIMEOUT, async {
        let mut client = connect(&config.manager.addr, tls).await?;
        list_schedulers(&mut client, config, host).await
    })
    .await
    .unwrap_or_else(|_| Err("no answer in time".into()));
    let cached = || {
        load_cache(config)
            .map(|c| c.schedulers)
            .filter(|s| !s.is_empty())
    };
    match asked {
        Ok(addrs) if !addrs.is_empty() => {
            save_cache(
                config,
                &Cached {
                    schedulers: addrs.clone(),
                },
            );
            info!(manager = config.manager.addr, schedulers = ?addrs, "schedulers from the manager");
            addrs
        }
        Ok(_) => {
            let start = cached().unwrap_or(fallback);
            info!(manager = config.manager.addr, schedulers = ?start, "the manager names no scheduler yet; starting on the last known ones");
            start
        }
        Err(e) => {
            let start = cached().unwrap_or(fallback);
            warn!(manager = config.manager.addr, err = e, schedulers = ?start, "manager unreachable; starting on the last known schedulers");
            start
        }
    }
}

/// Follows the manager until the process ends: refreshes the schedulers, and for a seed
/// peer, registers and keeps alive.
pub async fn run(
    config: Arc<Config>,
    host: Arc<HostInfo>,
    schedulers: Arc<Schedulers>,
    control: Arc<ControlPlane>,
    tls: ManagerTls,
) {
    control.set_manager(&config.manager.addr).await;
    control.set_schedulers(&schedulers.addrs()).await;
    if config.is_seed_peer() {
        let (c, h, t) = (config.clone(), host.clone(), tls.clone());
        tokio::spawn(async move { seed_peer_loop(c, h, t).await });
    }
    let mut tick = tokio::time::interval(
        config
            .dynconfig
            .refresh_interval
            .max(Duration::from_secs(1)),
    );
    tick.tick().await;
    let mut client: Option<ManagerClient<Channel>> = None;
    loop {
        tick.tick().await;
        if client.is_none() {
            match connect(&config.manager.addr, &tls).await {
                Ok(c) => client = Some(c),
                Err(e) => {
                    debug!(err = e, "manager unreachable; keeping the schedulers");
                    continue;
                }
            }
        }
        let Some(c) = client.as_mut() else { continue };
        match list_schedulers(c, &config, &host).await {
            // No scheduler for this host right now (all restarting?): keep the ones it has.
            Ok(addrs) if addrs.is_empty() => {
                debug!("the manager names no scheduler; keeping the current ones");
            }
            Ok(addrs) => {
                if schedulers.set_addrs(addrs.clone()) {
                    info!(schedulers = ?addrs, "schedulers changed");
                }
                schedulers.announce_new().await;
                control.set_schedulers(&addrs).await;
                control.set_manager(&config.manager.addr).await;
                save_cache(&config, &Cached { schedulers: addrs });
            }
            Err(e) => {
                debug!(err = e, "refreshing schedulers failed; keeping them");
                client = None;
            }
        }
    }
}

/// A seed peer's registration and keepalive, re-registering whenever the stream breaks.
async fn seed_peer_loop(config: Arc<Config>, host: Arc<HostInfo>, tls: ManagerTls) {
    let mut reconnect = d7y_net::Reconnect::default();
    loop {
        let started = tokio::time::Instant::now();
        if let Err(e) = seed_peer_session(&config, &host, &tls).await {
            warn!(
                manager = config.manager.addr,
                err = e,
                "seed peer registration lost; retrying"
            );
        }
        tokio::time::sleep(reconnect.after(started.elapsed())).await;
    }
}

async fn seed_peer_session(
    config: &Config,
    host: &HostInfo,
    tls: &ManagerTls,
) -> Result<(), String> {
    let mut client = connect(&config.manager.addr, tls).await?;
    let mut request = tonic::Request::new(UpdateSeedPeerRequest {
        source_type: SourceType::SeedPeerSource as i32,
        hostname: host.hostname.clone(),
        r#type: match config.seed_peer.kind {
            d7y_config::dfdaemon::HostType::Super => "super",
            d7y_config::dfdaemon::HostType::Normal => "normal",
        }
        .into(),
        idc: host.idc.clone(),
        location: host.location.clone(),
        ip: host.ip.to_string(),
        port: host.upload_port as i32,
        download_port: host.piece_port as i32,
        seed_peer_cluster_id: config.seed_peer.cluster_id,
    });
    request.set_timeout(REQUEST_TIMEOUT);
    let registered = client
        .update_seed_peer(request)
        .await
        .map_err(|s| format!("registration refused: {}", s.message()))?
        .into_inner();
    info!(
        manager = config.manager.addr,
        cluster = registered.seed_peer_cluster_id,
        "seed peer registered with the manager"
    );
    let beat = KeepAliveRequest {
        source_type: SourceType::SeedPeerSource as i32,
        hostname: host.hostname.clone(),
        ip: host.ip.to_string(),
        cluster_id: registered.seed_peer_cluster_id,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let _ = tx.send(beat.clone()).await;
    let mut stream = tokio::spawn(async move {
        client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut beats = tokio::time::interval(
        config
            .seed_peer
            .keepalive_interval
            .max(Duration::from_secs(1)),
    );
    loop {
        tokio::select! {
            _ = beats.tick() => {
                if tx.send(beat.clone()).await.is_err() {
                    return Err("the keepalive stream ended".into());
                }
            }
            ended = &mut stream => {
                return Err(match ended {
                    Ok(Ok(_)) => "the manager ended the keepalive stream".into(),
                    Ok(Err(s)) => format!("keepalive failed: {}", s.message()),
                    Err(e) => e.to_string(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_control_plane_is_the_manager_and_the_schedulers() {
        let control = ControlPlane::default();
        assert!(!control.trusts("127.0.0.1".parse().unwrap()));
        control.set_schedulers(&["127.0.0.2:8002".into()]).await;
        control.set_manager("http://127.0.0.3:65003").await;
        assert!(control.trusts("127.0.0.2".parse().unwrap()));
        assert!(control.trusts("127.0.0.3".parse().unwrap()));
        assert!(control.trusts("::ffff:127.0.0.2".parse().unwrap()));
        assert!(!control.trusts("127.0.0.4".parse().unwrap()));
        control.set_schedulers(&[]).await;
        assert!(!control.trusts("127.0.0.2".parse().unwrap()));
    }
}
