//! The manager: the control plane of a Dragonfly cluster. It owns the store of clusters,
//! schedulers, seed peers, users and tokens (an SQLite file by default, PostgreSQL or
//! MySQL at scale), serves the REST and open APIs on `server.rest.addr` (8080) and
//! `manager.v2.Manager` on `server.grpc.port` (65003), and marks components that stop
//! keeping alive inactive.
//!
//! Wiring only lives here: decisions are in [`searcher`] (pure), [`auth`], and the
//! handlers of [`rest`] and [`grpc`], which translate and call the [`store`].

pub mod auth;
pub mod grpc;
pub mod jobs;
pub mod models;
pub mod rest;
pub mod searcher;
pub mod store;

use d7y_config::manager::Config;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use tracing::info;

/// Why the manager could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("{0}")]
    Store(#[from] store::StoreError),
    #[error("{0}")]
    Config(#[from] d7y_config::ConfigError),
    #[error("cannot listen on {what} {addr}: {source}; is another manager running? change the port in the config")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{what} server failed: {reason}")]
    Server { what: &'static str, reason: String },
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "manager".into())
}

/// The listening addresses, once bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub rest: SocketAddr,
    pub grpc: SocketAddr,
}

/// Opens the store (creating the root account and default clusters on first start),
/// binds both servers and runs until `shutdown` resolves. `bound` learns the addresses.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
    bound: Option<tokio::sync::oneshot::Sender<Bound>>,
) -> Result<(), ManagerError> {
    let url = config.database_url();
    if let Some(path) = url.strip_prefix("sqlite://") {
        if let Some(dir) = std::path::Path::new(path.split('?').next().unwrap_or(path)).parent() {
            let _ = std::fs::create_dir_all(dir);
        }
    }
    let store = store::Store::open(&url).await?;
    info!(database = store::redact(&url), "store ready");
    if let Some(password) = auth::ensure_root(
        &store,
        config
            .initial_root_password
            .clone()
            .or_else(|| std::env::var(auth::ROOT_PASSWORD_ENV).ok()),
    )
    .await?
    {
        // Printed once, at the first start: it is not stored anywhere readable.
        eprintln!(
            "manager: created user root with password {password} (set {} to choose it)",
            auth::ROOT_PASSWORD_ENV
        );
    }
    grpc::ensure_default_clusters(&store).await?;
    let jwt = auth::Jwt::load(
        &store,
        Some(config.auth.jwt.key.as_str()),
        &config.auth.jwt.realm,
        config.auth.jwt.timeout,
    )
    .await?;

    let rest_addr = config.server.rest.socket_addr()?;
    let rest = tokio::net::TcpListener::bind(rest_addr)
        .await
        .map_err(|source| ManagerError::Bind {
            what: "REST",
            addr: rest_addr,
            source,
        })?;
    let grpc_addr = SocketAddr::new(
        config
            .server
            .grpc
            .listen_ip
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
        config.server.grpc.port.start,
    );
    let grpc_tls = config
        .server
        .grpc
        .tls
        .as_ref()
        .map(|t| {
            d7y_net::ServerTls::load(
                d7y_net::TlsFiles {
                    ca_cert: t.ca_cert.clone(),
                    cert: t.cert.clone(),
                    key: t.key.clone(),
                },
                Some(std::time::Duration::from_secs(10)),
            )
        })
        .transpose()
        .map_err(|e| ManagerError::Server {
            what: "TLS (server.grpc.tls)",
            reason: e.to_string(),
        })?;
    let grpc_listener = tokio::net::TcpListener::bind(grpc_addr)
        .await
        .map_err(|source| ManagerError::Bind {
            what: "gRPC",
            addr: grpc_addr,
            source,
        })?;
    let addrs = Bound {
        rest: rest.local_addr().unwrap_or(rest_addr),
        grpc: grpc_listener.local_addr().unwrap_or(grpc_addr),
    };
    info!(rest = %addrs.rest, grpc = %addrs.grpc, "manager started");
    if let Some(tx) = bound {
        let _ = tx.send(addrs);
    }

    // Managers sharing this database share a queue; managers of other databases sharing
    // the Redis never see each other's job IDs.
    let installation = store
        .setting_or_insert("installation_id", &hex::encode(rand::random::<[u8; 8]>()))
        .await?;
    let queue = match config.database.redis.addrs.first() {
        Some(addr) => jobs::queue::Queue::redis(&jobs::queue::RedisTarget {
            addr: addr.clone(),
            username: config.database.redis.username.clone(),
            password: config.database.redis.password.clone(),
            db: config.database.redis.broker_db,
            prefix: format!("d7y:manager:{installation}"),
        })
        .await
        .map_err(|e| ManagerError::Server {
            what: "job queue",
            reason: e.to_string(),
        })?,
        None => jobs::queue::Queue::database(),
    };
    let mut roots = Vec::new();
    if let Some(path) = &config.job.preheat.tls.ca_cert {
        roots.push(std::fs::read(path).map_err(|e| ManagerError::Server {
            what: "job",
            reason: format!("cannot read job.preheat.tls.caCert {}: {e}", path.display()),
        })?);
    }
    let jobs = jobs::Jobs::new(
        store.clone(),
        queue,
        jobs::Options {
            default_timeout: config.job.timeout,
            registry_timeout: config.job.preheat.registry_timeout,
            registry_insecure: config.job.preheat.tls.insecure_skip_verify,
            registry_roots_pem: roots,
        },
        format!("{}@{}", hostname(), rest_addr),
    )
    .map_err(|reason| ManagerError::Server {
        what: "job",
        reason,
    })?;
    info!(queue = jobs.queue_kind(), "job queue ready");
    let state = Arc::new(rest::AppState {
        store: store.clone(),
        jwt,
        jobs: jobs.clone(),
    });
    let app = rest::router(state);
    let service =
        dragonfly_api::manager::v2::manager_server::ManagerServer::new(grpc::ManagerService {
            store: store.clone(),
            keep_alive_timeout: config.keep_alive_timeout,
        });
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        axum::serve(rest, app)
            .await
            .map_err(|e| ManagerError::Server {
                what: "REST",
                reason: e.to_string(),
            })
    });
    tasks.spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .max_concurrent_streams(Some(1024))
            .add_service(service)
            .serve_with_incoming(d7y_net::incoming(
                grpc_listener,
                d7y_net::ConnLimiter::new(d7y_net::ConnLimits {
                    max_connections: 100_000,
                    max_per_ip: 256,
                }),
                grpc_tls,
            ))
            .await
            .map_err(|e| ManagerError::Server {
                what: "gRPC",
                reason: e.to_string(),
            })
    });
    tasks.spawn(async move {
        jobs.run().await;
        Ok(())
    });
    let sweeper = store.clone();
    let timeout = config.keep_alive_timeout;
    tasks.spawn(async move {
        grpc::sweep_inactive(sweeper, timeout).await;
        Ok(())
    });
    let result = tokio::select! {
        _ = shutdown => Ok(()),
        Some(joined) = tasks.join_next() => match joined {
            Ok(r) => r,
            Err(e) => Err(ManagerError::Server { what: "internal", reason: e.to_string() }),
        },
    };
    tasks.abort_all();
    info!("manager stopped");
    result
}
