//! The peer daemon: downloads tasks as pieces (back to source for now), stores and verifies
//! them, and serves them to other peers over Vortex while still downloading.
//!
//! Wiring only lives here; the download engine is [`task`], wire translation is [`grpc`].
//! This crate never depends on dfget (dfget talks to it over the unix socket).

pub mod error;
pub mod gc;
pub mod grpc;
pub mod host;
pub mod http;
pub mod metrics;
pub mod piece_server;
pub mod ratelimit;
pub mod relay;
pub mod scheduler;
pub mod superseed;
pub mod task;

use d7y_backend::{HttpBackend, RetryPolicy};
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
    let backend = HttpBackend::new(Duration::from_secs(30), RetryPolicy::default())
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
    let metrics_listener = bind_tcp(
        "metrics",
        config.metrics.server.ip,
        config.metrics.server.port,
    )
    .await?;
    let health_listener =
        bind_tcp("health", config.health.server.ip, config.health.server.port).await?;
    let upload_port = upload.local_addr().map(|a| a.port()).unwrap_or_default();
    let piece_port = pieces.local_addr().map(|a| a.port()).unwrap_or_default();

    let host = Arc::new(host::HostInfo::new(&config, upload_port, piece_port));
    let schedulers = (!scheduler_addrs.is_empty()).then(|| {
        Arc::new(scheduler::Schedulers::new(
            scheduler_addrs.clone(),
            host.clone(),
            traffic.clone(),
        ))
    });
    let manager = Arc::new(task::TaskManager::new(
        config.clone(),
        storage.clone(),
        backend,
        metrics.clone(),
        host.clone(),
        schedulers.clone(),
    ));

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
    });

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
        tonic::transport::Server::builder()
            .add_service(upload_service)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(upload).with_nodelay(Some(true)),
            )
            .await
            .map_err(|e| DaemonError::Server {
                what: "upload gRPC",
                reason: e.to_string(),
            })
    });
    tasks.spawn(async move {
        d7y_vortex::serve(pieces, provider).await;
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
    let _ = std::fs::remove_file(&config.download.server.socket_path);
    info!("dfdaemon stopped");
    result
}
