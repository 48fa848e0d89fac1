//! The peer daemon: downloads tasks as pieces (back to source for now), stores and verifies
//! them, and serves them to other peers over Vortex while still downloading.
//!
//! Wiring only lives here; the download engine is [`task`], wire translation is [`grpc`].
//! This crate never depends on dfget (dfget talks to it over the unix socket).

pub mod dynconfig;
pub mod error;
pub mod gc;
pub mod grpc;
pub mod host;
pub mod http;
pub mod metrics;
pub mod piece_server;
pub mod proxy;
pub mod ratelimit;
pub mod relay;
pub mod scheduler;
pub mod superseed;
pub mod task;
mod tls;

use d7y_backend::{Backend, BackendOptions, RetryPolicy, TargetPolicy};
use d7y_config::dfdaemon::Config;
use d7y_storage::Storage;
use dragonfly_api::dfdaemon::v2::dfdaemon_download_server::DfdaemonDownloadServer;
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::DfdaemonUploadServer;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, UnixListener};
use tracing::info;

/// Why the daemon could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot listen on {what} {addr}: {source}; is another dfdaemon running? change the port in the config")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot open storage in {dir}: {source}")]
    Storage {
        dir: String,
        source: d7y_storage::StorageError,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{what} server failed: {reason}")]
    Server { what: &'static str, reason: String },
}

async fn bind_tcp(
    what: &'static str,
    ip: Option<IpAddr>,
    port: u16,
) -> Result<TcpListener, DaemonError> {
    let addr = SocketAddr::new(ip.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)), port);
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Sets the TCP congestion control of `listener`, inherited by the connections it accepts
/// (empty: the host's default).
fn set_congestion_control(listener: &TcpListener, name: &str) -> Result<(), DaemonError> {
    if name.is_empty() {
        return Ok(());
    }
    let failed = |reason: String| {
        DaemonError::Setup(format!(
            "storage.server.tcpCongestionControl {name:?}: {reason}; load the algorithm \
             (modprobe tcp_{name}) and allow it (sysctl net.ipv4.tcp_allowed_congestion_control), \
             or leave the key empty for the host's default"
        ))
    };
    #[cfg(target_os = "linux")]
    {
        socket2::SockRef::from(listener)
            .set_tcp_congestion(name.as_bytes())
            .map_err(|e| failed(e.to_string()))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = listener;
        Err(failed("only supported on Linux".into()))
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener, DaemonError> {
    let err = |source| DaemonError::Bind {
        what: "download socket",
        addr: path.display().to_string(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    if path.exists() {
        // A live daemon answers on it; a stale socket file is left by a crash.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another dfdaemon is serving on it",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    UnixListener::bind(path).map_err(err)
}

/// A gRPC server for the network: HTTP/2 keepalive (a peer that dies silently loses its
/// streams within [`KEEPALIVE`] + [`KEEPALIVE_TIMEOUT`]), a cap on concurrent streams per
/// connection, and a deadline on every request's answer (long streams are not cut: the
/// deadline covers the response head).
pub fn hardened_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .timeout(REQUEST_DEADLINE)
}

/// Keepalive pings on server connections.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Concurrent streams on one connection (SyncPieces per task per parent, SyncHost, ...).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
/// The longest a handler may take to answer (a unary answer, or a stream's head).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(60);

/// Starts every server and runs standalone (no scheduler) until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    run_with(config, Vec::new(), shutdown).await
}

/// Starts every server and runs until `shutdown` resolves. With `scheduler_addrs`
/// (`host:port` each), downloads go through the swarm; without, straight to the origin.
pub async fn run_with(
    config: Config,
    scheduler_addrs: Vec<String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    let config = Arc::new(config);
    let storage = Storage::open(&config.storage.dir, config.storage.keep).map_err(|source| {
        DaemonError::Storage {
            dir: config.storage.dir.display().to_string(),
            source,
        }
    })?;
    let backend = Backend::new(BackendOptions {
        connect_timeout: Duration::from_secs(30),
        read_timeout: config.backend.read_timeout,
        retry: RetryPolicy::default(),
        policy: TargetPolicy::new(
            config.backend.allowed_schemes.clone(),
            config.backend.denied_networks.clone(),
        ),
    })
    .map_err(|e| DaemonError::Setup(e.to_string()))?;
    let metrics = Arc::new(metrics::Metrics::new());
    let traffic = Arc::new(host::Traffic::default());

    let socket = bind_unix(&config.download.server.socket_path)?;
    let upload = bind_tcp(
        "upload gRPC",
        config.upload.server.ip,
        config.upload.server.port,
    )
    .await?;
    let pieces = bind_tcp(
        "piece server",
        config.storage.server.ip,
        config.storage.server.tcp_port,
    )
    .await?;
    set_congestion_control(&pieces, &config.storage.server.tcp_congestion_control)?;
    let metrics_listener = bind_tcp(
        "metrics",
        config.metrics.server.ip,
        config.metrics.server.port,
    )
    .await?;
    let health_listener =
        bind_tcp("health", config.health.server.ip, config.health.server.port).await?;
    // The proxy serves local clients unless told otherwise (it fetches for whoever asks).
    let proxy_listener = bind_tcp(
        "proxy",
        Some(
            config
                .proxy
                .server
                .ip
                .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        ),
        config.proxy.server.port,
    )
    .await?;
    let upload_port = upload.local_addr().map(|a| a.port()).unwrap_or_default();
    let piece_port = pieces.local_addr().map(|a| a.port()).unwrap_or_default();

    let tls = tls::Identities::load(&config)?;
    let host = Arc::new(host::HostInfo::new(&config, upload_port, piece_port));
    let with_manager = !config.manager.addr.trim().is_empty();
    let scheduler_addrs = if with_manager {
        // The manager's schedulers win over the dynconfig file's.
        dynconfig::initial(&config, &host, scheduler_addrs, &tls.manager).await
    } else {
        scheduler_addrs
    };
    let control = Arc::new(dynconfig::ControlPlane::default());
    control.set_schedulers(&scheduler_addrs).await;
    let schedulers = (with_manager || !scheduler_addrs.is_empty()).then(|| {
        Arc::new(
            scheduler::Schedulers::new(scheduler_addrs.clone(), host.clone(), traffic.clone())
                .with_tls(tls.scheduler.clone())
                .with_schedule_timeout(config.scheduler.schedule_timeout),
        )
    });
    let manager = Arc::new(
        task::TaskManager::new(
            config.clone(),
            storage.clone(),
            backend,
            metrics.clone(),
            host.clone(),
            schedulers.clone(),
        )
        .with_peer_tls(tls.peers.clone()),
    );

    let proxy = Arc::new(
        proxy::Proxy::new(config.clone(), manager.clone(), metrics.clone())
            .map_err(|e| DaemonError::Setup(e.to_string()))?,
    );

    let upload_limit = if config.is_seed_peer() && config.upload.concurrent_upload_limit == 200 {
        2000
    } else {
        config.upload.concurrent_upload_limit
    };
    let super_seed = config
        .is_seed_peer()
        .then(|| Arc::new(superseed::SuperSeed::default()));
    let provider = Arc::new(piece_server::StoragePieces {
        super_seed: super_seed.clone(),
        flights: manager.flights.clone(),
        storage: storage.clone(),
        metrics: metrics.clone(),
        traffic: traffic.clone(),
        bandwidth: ratelimit::Bandwidth::new(config.upload.bandwidth_limit.as_u64()),
        slots: Arc::new(tokio::sync::Semaphore::new(upload_limit as usize)),
        total_slots: upload_limit as usize,
        per_ip: Arc::default(),
        disable_shared: config.upload.disable_shared,
        buffer_size: config
            .storage
            .read_buffer_size
            .clamp(16 * 1024, 4 * 1024 * 1024),
    });

    info!(
        host_id = host.host_id,
        socket = %config.download.server.socket_path.display(),
        upload_port,
        piece_port,
        storage = %config.storage.dir.display(),
        schedulers = ?scheduler_addrs,
        "dfdaemon started"
    );

    let download_service = DfdaemonDownloadServer::new(grpc::download::DownloadService {
        manager: manager.clone(),
        host: host.clone(),
    });
    let upload_service = DfdaemonUploadServer::new(grpc::upload::UploadService {
        manager: manager.clone(),
        host: host.clone(),
        traffic: traffic.clone(),
        super_seed: super_seed.clone(),
        control: control.clone(),
    });

    let server = &config.storage.server;
    let vortex_limits = d7y_vortex::ServerLimits {
        max_connections: server.max_connections,
        max_connections_per_ip: server.max_connections_per_ip,
        idle_timeout: server.idle_timeout,
        write_timeout: server.write_timeout,
    };
    let piece_tls = tls.server.clone();
    let upload_incoming = d7y_net::incoming(
        upload,
        d7y_net::ConnLimiter::new(d7y_net::ConnLimits {
            max_connections: server.max_connections,
            max_per_ip: server.max_connections_per_ip,
        }),
        tls.server.clone(),
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(download_service)
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(socket))
            .await
            .map_err(|e| DaemonError::Server {
                what: "download gRPC",
                reason: e.to_string(),
            })
    });
    tasks.spawn(async move {
        hardened_server()
            .add_service(upload_service)
            .serve_with_incoming(upload_incoming)
            .await
            .map_err(|e| DaemonError::Server {
                what: "upload gRPC",
                reason: e.to_string(),
            })
    });
    tasks.spawn(async move {
        d7y_vortex::serve(pieces, provider, vortex_limits, piece_tls).await;
        Err(DaemonError::Server {
            what: "piece",
            reason: "listener closed".into(),
        })
    });
    let m = metrics.clone();
    tasks.spawn(async move {
        http::serve_metrics(metrics_listener, m)
            .await
            .map_err(|e| DaemonError::Server {
                what: "metrics",
                reason: e.to_string(),
            })
    });
    let proxy_addr = proxy_listener.local_addr().ok();
    tasks.spawn(async move {
        proxy
            .serve(proxy_listener)
            .await
            .map_err(|e| DaemonError::Server {
                what: "proxy",
                reason: e.to_string(),
            })
    });
    if let Some(addr) = proxy_addr {
        info!(%addr, "proxy and registry mirror listening");
    }
    tasks.spawn(async move {
        http::serve_health(health_listener)
            .await
            .map_err(|e| DaemonError::Server {
                what: "health",
                reason: e.to_string(),
            })
    });
    tasks.spawn(async move {
        traffic.sample(Duration::from_secs(1)).await;
        Ok(())
    });
    let gc_schedulers = manager.schedulers.clone();
    if let (true, Some(schedulers)) = (with_manager, schedulers.clone()) {
        let (c, h, t) = (config.clone(), host.clone(), tls.manager.clone());
        tasks.spawn(async move {
            dynconfig::run(c, h, schedulers, control, t).await;
            Ok(())
        });
    }
    if let Some(schedulers) = schedulers {
        let interval = config.scheduler.announce_interval;
        tasks.spawn(async move {
            schedulers.announce_loop(interval).await;
            Ok(())
        });
    }
    let gc_policy = config.gc.policy.clone();
    let gc_storage = storage.clone();
    let gc_metrics = metrics.clone();
    let gc_interval = config.gc.interval;
    tasks.spawn(async move {
        gc::run(
            gc_storage,
            gc_policy,
            gc_interval,
            gc_metrics,
            gc_schedulers,
        )
        .await;
        Ok(())
    });

    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(joined) = tasks.join_next() => match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(err)) => Err(err),
            Err(err) => Err(DaemonError::Server { what: "internal", reason: err.to_string() }),
        },
    };
    tasks.abort_all();
    if let Err(err) = storage.flush_all().await {
        tracing::warn!(%err, "committing piece records at shutdown failed");
    }
    let _ = std::fs::remove_file(&config.download.server.socket_path);
    info!("dfdaemon stopped");
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_piece_servers_connections_take_the_configured_congestion_control() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        set_congestion_control(&listener, "").unwrap();
        // reno is built into every Linux kernel; the host's default is usually another.
        set_congestion_control(&listener, "reno").unwrap();
        let addr = listener.local_addr().unwrap();
        let client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let cc = socket2::SockRef::from(&accepted).tcp_congestion().unwrap();
        assert_eq!(String::from_utf8_lossy(&cc).trim_end_matches('\0'), "reno");
        drop(client);
        let err = set_congestion_control(&listener, "nosuchcc")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tcpCongestionControl \"nosuchcc\"") && err.contains("modprobe"),
            "{err}"
        );
    }

    /// Forwards one connection until `frozen`; then passes nothing on (a peer that died
    /// silently: its kernel keeps the connection, nobody answers) and reports when the
    /// server closes its side.
    async fn freezable_proxy(
        server: SocketAddr,
        frozen: Arc<AtomicBool>,
        closed: tokio::sync::oneshot::Sender<()>,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (client, _) = listener.accept().await.unwrap();
            let upstream = tokio::net::TcpStream::connect(server).await.unwrap();
            let (mut cr, mut cw) = client.into_split();
            let (mut ur, mut uw) = upstream.into_split();
            let f = frozen.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                while !f.load(Ordering::SeqCst) {
                    match tokio::time::timeout(Duration::from_millis(50), cr.read(&mut buf)).await {
                        Ok(Ok(0)) | Ok(Err(_)) => return,
                        Ok(Ok(n)) => {
                            if uw.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => {}
                    }
                }
                std::future::pending::<()>().await; // holds the client side open
            });
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match ur.read(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = closed.send(());
                        return;
                    }
                    Ok(n) if !frozen.load(Ordering::SeqCst) => {
                        let _ = cw.write_all(&buf[..n]).await;
                    }
                    Ok(_) => {} // frozen: pings go unanswered
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_peer_that_dies_silently_loses_its_streams_within_seconds() {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        let incoming = d7y_net::incoming(
            listener,
            d7y_net::ConnLimiter::new(d7y_net::ConnLimits::default()),
            None,
        );
        tokio::spawn(
            hardened_server()
                .add_service(health)
                .serve_with_incoming(incoming),
        );
        let frozen = Arc::new(AtomicBool::new(false));
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
        let proxy = freezable_proxy(server, frozen.clone(), closed_tx).await;

        // A long-lived server stream, like SyncPieces.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{proxy}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
        let mut watch = client
            .watch(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        watch.message().await.unwrap().unwrap();

        let frozen_at = std::time::Instant::now();
        frozen.store(true, Ordering::SeqCst);
        let bound = KEEPALIVE + KEEPALIVE_TIMEOUT + Duration::from_secs(3);
        tokio::time::timeout(bound, closed_rx)
            .await
            .expect("the server kept a silent peer's connection")
            .unwrap();
        assert!(
            frozen_at.elapsed() >= KEEPALIVE,
            "closed before any keepalive could fail"
        );
    }
}
