//! The scheduler: holds the swarm in memory and tells each peer which parents to fetch
//! from, or to go back to source; triggers seed peers on a task's first download.
//!
//! Layers, bottom up: [`evaluator`] (pure scoring) → [`scheduling`] (pure filter and rank)
//! → [`resource`] (the swarm model and its parent graph, synchronous) → [`service`] (events,
//! decisions, waiting, seed triggering) → [`grpc`] (wire translation). [`run`] wires them.

pub mod evaluator;
pub mod grpc;
pub mod metrics;
pub mod resource;
pub mod scheduling;
pub mod seed;
pub mod service;

use d7y_config::scheduler::Config;
use dragonfly_api::scheduler::v2::scheduler_server::SchedulerServer;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
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
    let service = service::Service::new(config.clone(), metrics.clone());
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
    .max_decoding_message_size(64 * 1024 * 1024);
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .add_service(health_service)
            .add_service(scheduler)
            .serve_with_incoming(
                tonic::transport::server::TcpIncoming::from(grpc_listener).with_nodelay(Some(true)),
            )
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
