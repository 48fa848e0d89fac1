//! The scheduler: holds the swarm in memory and tells each peer which parents to fetch
//! from, or to go back to source; triggers seed peers on a task's first download.
//!
//! Layers, bottom up: [`evaluator`] (pure scoring) → [`scheduling`] (pure filter and rank)
//! → [`resource`] (the swarm model and its parent graph, synchronous) → [`service`] (events,
//! decisions, waiting, seed triggering) → [`grpc`] (wire translation). [`run`] wires them.

pub mod digests;
pub mod dynconfig;
pub mod evaluator;
pub mod grpc;
pub mod limits;
pub mod metrics;
pub mod resource;
pub mod scheduling;
pub mod seed;
pub mod service;

use d7y_config::scheduler::Config;
use dragonfly_api::scheduler::v2::scheduler_server::SchedulerServer;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tracing::info;

/// Why the scheduler could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error("cannot listen on {what} {addr}: {source}; is another scheduler running? change the port in the config")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid config: {0}")]
    Config(#[from] d7y_config::ConfigError),
    #[error("{what} server failed: {reason}")]
    Server { what: &'static str, reason: String },
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, SchedulerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| SchedulerError::Bind {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// How often TLS files are checked for changes.
pub const TLS_RELOAD_INTERVAL: Duration = Duration::from_secs(10);
/// The largest gRPC message accepted (a registration is far smaller).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Connections at once, in total and from one address (a host keeps one connection to its
/// scheduler; containers behind one address share it).
pub const MAX_CONNECTIONS: usize = 100_000;
pub const MAX_CONNECTIONS_PER_IP: usize = 256;
/// Streams on one connection: one AnnouncePeer per task a host downloads at once.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 10_000;

/// Serves gRPC (with grpc.health.v1, which upstream peers check) on `server.listenIP` and
/// `server.port`, and metrics, until `shutdown` resolves.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SchedulerError> {
    let ip = config
        .server
        .listen_ip
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let grpc_listener = bind("gRPC", SocketAddr::new(ip, config.server.port)).await?;
    serve(config, grpc_listener, shutdown).await
}

/// [`run`] with gRPC on a listener the caller bound (`server.listenIP`/`port` unused):
/// an in-process server on port 0 has no window in which another process takes its port.
pub async fn serve(
    config: Config,
    grpc_listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), SchedulerError> {
    let metrics_listener = if config.metrics.enable {
        Some(bind("metrics", config.metrics.socket_addr()?).await?)
    } else {
        None
    };
    let metrics = Arc::new(metrics::Metrics::new());
    let tls_files = config.server.tls.as_ref().map(|t| d7y_net::TlsFiles {
        ca_cert: t.ca_cert.clone(),
        cert: t.cert.clone(),
        key: t.key.clone(),
    });
    let tls_error = |e: d7y_net::TlsError| SchedulerError::Server {
        what: "TLS (server.tls)",
        reason: e.to_string(),
    };
    let server_tls = tls_files
        .clone()
        .map(|f| d7y_net::ServerTls::load(f, Some(TLS_RELOAD_INTERVAL)))
        .transpose()
        .map_err(tls_error)?;
    let seed_tls = tls_files
        .map(|f| d7y_net::ClientTls::load(f, Some(TLS_RELOAD_INTERVAL)))
        .transpose()
        .map_err(tls_error)?;
    let manager_tls = seed_tls.clone();
    let service = service::Service::with_seed_tls(config.clone(), metrics.clone(), seed_tls);
    let grpc_port = grpc_listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(config.server.port);
    if config.manager.is_configured() {
        // The last config the manager gave, until it answers (or while it is away).
        if let Some(cached) = dynconfig::load_cache(&config) {
            service.apply_cluster_config(&cached);
            info!(
                seed_peers = cached.seed_peers.len(),
                "cluster config from the cache applied"
            );
        }
    }
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<SchedulerServer<grpc::SchedulerService>>()
        .await;
    info!(
        addr = %grpc_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        seed_peers = config.seed_peers.len(),
        "scheduler started"
    );

    let mut tasks = tokio::task::JoinSet::new();
    let scheduler = SchedulerServer::new(grpc::SchedulerService {
        service: service.clone(),
    })
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let incoming = d7y_net::incoming(
        grpc_listener,
        d7y_net::ConnLimiter::new(d7y_net::ConnLimits {
            max_connections: MAX_CONNECTIONS,
            max_per_ip: MAX_CONNECTIONS_PER_IP,
        }),
        server_tls,
    );
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .tcp_keepalive(Some(Duration::from_secs(60)))
            .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
            .timeout(Duration::from_secs(60))
            .add_service(health_service)
            .add_service(scheduler)
            .serve_with_incoming(incoming)
            .await
            .map_err(|e| SchedulerError::Server {
                what: "gRPC",
                reason: e.to_string(),
            })
    });
    if let Some(listener) = metrics_listener {
        let m = metrics.clone();
        tasks.spawn(async move {
            let app = axum::Router::new()
                .route(
                    "/metrics",
                    axum::routing::get(move || {
                        let m = m.clone();
                        async move { m.render() }
                    }),
                )
                .route("/healthy", axum::routing::get(|| async { "OK" }));
            axum::serve(listener, app)
                .await
                .map_err(|e| SchedulerError::Server {
                    what: "metrics",
                    reason: e.to_string(),
                })
        });
    }
    let gc = service.clone();
    tasks.spawn(async move {
        gc.run_gc().await;
        Ok(())
    });
    if config.manager.is_configured() {
        let (s, c) = (service.clone(), config.clone());
        tasks.spawn(async move {
            dynconfig::run(s, c, grpc_port, manager_tls).await;
            Ok(())
        });
    }
    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(joined) = tasks.join_next() => match joined {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(SchedulerError::Server { what: "internal", reason: e.to_string() }),
        },
    };
    tasks.abort_all();
    info!("scheduler stopped");
    result
}
