//! The scheduler and its manager (`manager.addr`): it registers (UpdateScheduler), keeps
//! alive (a KeepAlive stream, every `manager.keepAlive.interval`), and takes its seed
//! peers and its cluster's parent limits from GetScheduler every
//! `dynconfig.refreshInterval`. The last answer is kept in `server.cacheDir`, so a
//! scheduler restarted while the manager is away starts on it; while the manager is away,
//! the scheduler keeps the last config it had. Without a manager, the static `seedPeers`
//! and `scheduler.*ParentLimit` keys are the config.

use crate::service::{ClusterConfig, Service};
use d7y_config::scheduler::{Config, SeedPeer};
use dragonfly_api::manager::v2::manager_client::ManagerClient;
use dragonfly_api::manager::v2::{
    GetSchedulerRequest, KeepAliveRequest, SourceType, UpdateSchedulerRequest,
};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The most seed peers taken from the manager's answer.
const MAX_SEED_PEERS: usize = 1000;
const CACHE_FILE: &str = "dynconfig-cache.yaml";

/// Who this scheduler is, as the manager knows it.
#[derive(Debug, Clone)]
struct Identity {
    hostname: String,
    ip: String,
    port: i32,
    idc: Option<String>,
    location: Option<String>,
    cluster_id: u64,
}

fn identity(config: &Config, port: u16) -> Identity {
    let ip = config
        .server
        .advertise_ip
        .or(config.server.listen_ip.filter(|ip| !ip.is_unspecified()))
        .unwrap_or(IpAddr::from([127, 0, 0, 1]));
    Identity {
        hostname: config
            .server
            .host
            .clone()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(hostname),
        ip: ip.to_string(),
        port: port as i32,
        idc: config.host.idc.clone(),
        location: config.host.location.clone(),
        cluster_id: config.manager.scheduler_cluster_id,
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "scheduler".into())
}

/// Where the last cluster config is kept.
pub fn cache_path(config: &Config) -> PathBuf {
    config
        .server
        .cache_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/var/cache/dragonfly/scheduler"))
        .join(CACHE_FILE)
}

/// The cached config, if a readable one is there.
pub fn load_cache(config: &Config) -> Option<ClusterConfig> {
    d7y_config::cache::load(&cache_path(config))
}

fn save_cache(config: &Config, cluster: &ClusterConfig) {
    let path = cache_path(config);
    if let Err(e) = d7y_config::cache::save(&path, cluster) {
        debug!(%e, path = %path.display(), "cannot keep the dynconfig cache");
    }
}

async fn connect(
    addr: &str,
    tls: &Option<Arc<d7y_net::ClientTls>>,
) -> Result<ManagerClient<Channel>, String> {
    let target = d7y_config::cache::manager_target(addr);
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

/// Turns a GetScheduler answer into the parts the scheduler uses.
fn cluster_config(s: dragonfly_api::manager::v2::Scheduler) -> ClusterConfig {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct Limits {
        candidate_parent_limit: Option<u32>,
        filter_parent_limit: Option<u32>,
    }
    let limits: Limits = s
        .scheduler_cluster
        .as_ref()
        .and_then(|c| serde_json::from_slice(&c.config).ok())
        .unwrap_or_default();
    let seed_peers = s
        .seed_peers
        .into_iter()
        .filter(|p| p.state != "inactive")
        .filter(|p| (1..=65535).contains(&p.port))
        .filter_map(|p| {
            let ip: IpAddr = p.ip.parse().ok()?;
            Some(SeedPeer {
                hostname: p.hostname,
                ip: Some(ip),
                port: Some(p.port as u16),
            })
        })
        .take(MAX_SEED_PEERS)
        .collect();
    ClusterConfig {
        cluster_id: s.scheduler_cluster_id,
        seed_peers,
        candidate_parent_limit: limits.candidate_parent_limit,
        filter_parent_limit: limits.filter_parent_limit,
    }
}

/// Registers with the manager and follows its config, until the process ends. `port` is
/// the gRPC port this scheduler serves on; `tls` its identity (`server.tls`), also
/// presented to the manager.
pub async fn run(
    service: Arc<Service>,
    config: Config,
    port: u16,
    tls: Option<Arc<d7y_net::ClientTls>>,
) {
    let addr = config.manager.addr.clone();
    let mut me = identity(&config, port);
    let keep_alive = config
        .manager
        .keep_alive
        .interval
        .max(Duration::from_secs(1));
    let refresh = config
        .dynconfig
        .refresh_interval
        .max(Duration::from_secs(1));
    let mut reconnect = d7y_net::Reconnect::default();
    loop {
        let started = tokio::time::Instant::now();
        if let Err(e) = session(&service, &config, &addr, &tls, &mut me, keep_alive, refresh).await
        {
            warn!(
                manager = addr,
                err = e,
                "manager unreachable; keeping the last config"
            );
        }
        tokio::time::sleep(reconnect.after(started.elapsed())).await;
    }
}

/// One registration: register, then keep alive and refresh until the connection fails.
async fn session(
    service: &Arc<Service>,
    config: &Config,
    addr: &str,
    tls: &Option<Arc<d7y_net::ClientTls>>,
    me: &mut Identity,
    keep_alive: Duration,
    refresh: Duration,
) -> Result<(), String> {
    let mut client = connect(addr, tls).await?;
    let mut request = tonic::Request::new(UpdateSchedulerRequest {
        source_type: SourceType::SchedulerSource as i32,
        hostname: me.hostname.clone(),
        scheduler_cluster_id: me.cluster_id,
        idc: me.idc.clone(),
        location: me.location.clone(),
        ip: me.ip.clone(),
        port: me.port,
        features: vec!["schedule".into(), "preheat".into()],
        config: Vec::new(),
    });
    request.set_timeout(REQUEST_TIMEOUT);
    let registered = client
        .update_scheduler(request)
        .await
        .map_err(|s| format!("registration refused: {}", s.message()))?
        .into_inner();
    me.cluster_id = registered.scheduler_cluster_id;
    info!(
        manager = addr,
        cluster = me.cluster_id,
        "registered with the manager"
    );

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let beat = KeepAliveRequest {
        source_type: SourceType::SchedulerSource as i32,
        hostname: me.hostname.clone(),
        ip: me.ip.clone(),
        cluster_id: me.cluster_id,
    };
    let _ = tx.send(beat.clone()).await;
    let mut keepalive_client = client.clone();
    let mut stream = tokio::spawn(async move {
        keepalive_client
            .keep_alive(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
    });
    let mut beats = tokio::time::interval(keep_alive);
    let mut refreshes = tokio::time::interval(refresh);
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
            _ = refreshes.tick() => {
                let mut request = tonic::Request::new(GetSchedulerRequest {
                    source_type: SourceType::SchedulerSource as i32,
                    hostname: me.hostname.clone(),
                    scheduler_cluster_id: me.cluster_id,
                    ip: me.ip.clone(),
                });
                request.set_timeout(REQUEST_TIMEOUT);
                match client.get_scheduler(request).await {
                    Ok(answer) => {
                        let cluster = cluster_config(answer.into_inner());
                        if service.apply_cluster_config(&cluster) {
                            info!(seed_peers = cluster.seed_peers.len(), "cluster config from the manager applied");
                        }
                        save_cache(config, &cluster);
                    }
                    Err(s) => {
                        stream.abort();
                        return Err(format!("GetScheduler failed: {}", s.message()));
                    }
                }
            }
        }
    }
}
