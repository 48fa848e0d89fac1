//! `manager.v2.Manager`: schedulers and seed peers register themselves and keep alive;
//! peers ask which schedulers serve them (the searcher decides); schedulers fetch their
//! cluster's configuration and seed peers.
//!
//! A component that stops sending on its KeepAlive stream, or whose stream ends, is
//! marked inactive (within `keepAliveTimeout`) and left out of every answer.

use crate::models::{self, ACTIVE, INACTIVE};
use crate::searcher::{self, Candidate, Conditions};
use crate::store::{now, RowExt, Store, StoreError, Value};
use dragonfly_api::manager::v2::manager_server::Manager;
use dragonfly_api::manager::v2::*;
use std::net::IpAddr;
use std::time::Duration;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info};

/// Longest hostname accepted from the wire.
const MAX_HOSTNAME: usize = 255;

pub struct ManagerService {
    pub store: Store,
    pub keep_alive_timeout: Duration,
}

fn db(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

fn check_host(hostname: &str, ip: &str) -> Result<(), Status> {
    if hostname.is_empty()
        || hostname.len() > MAX_HOSTNAME
        || hostname.chars().any(char::is_control)
    {
        return Err(Status::invalid_argument(
            "hostname must be 1 to 255 printable characters",
        ));
    }
    ip.parse::<IpAddr>()
        .map_err(|_| Status::invalid_argument(format!("ip {ip:?} is not an IP address")))?;
    Ok(())
}

fn check_port(name: &str, port: i32) -> Result<(), Status> {
    if !(1..=65535).contains(&port) {
        return Err(Status::invalid_argument(format!(
            "{name} must be 1 to 65535"
        )));
    }
    Ok(())
}

fn short(s: Option<String>, name: &str) -> Result<String, Status> {
    let s = s.unwrap_or_default();
    if s.len() > 1024 {
        return Err(Status::invalid_argument(format!(
            "{name} is longer than 1024 bytes"
        )));
    }
    Ok(s)
}

impl ManagerService {
    async fn cluster_id_or_default(&self, id: u64, table: &str) -> Result<i64, Status> {
        if id != 0 {
            let exists = self
                .store
                .fetch_optional(
                    &format!("SELECT id FROM {table} WHERE id = ?"),
                    &[(id as i64).into()],
                )
                .await
                .map_err(db)?
                .is_some();
            if !exists {
                return Err(Status::not_found(format!(
                    "cluster {id} does not exist in {table}"
                )));
            }
            return Ok(id as i64);
        }
        let row = self
            .store
            .fetch_optional(&format!("SELECT id FROM {table} ORDER BY id LIMIT 1"), &[])
            .await
            .map_err(db)?
            .ok_or_else(|| Status::failed_precondition(format!("no cluster in {table}")))?;
        Ok(row.int("id"))
    }

    async fn scheduler_cluster(&self, id: i64) -> Result<Option<models::SchedulerCluster>, Status> {
        Ok(self
            .store
            .fetch_optional(
                "SELECT * FROM scheduler_clusters WHERE id = ?",
                &[id.into()],
            )
            .await
            .map_err(db)?
            .map(|r| models::SchedulerCluster::from_row(&r)))
    }

    /// Active seed peers of the seed peer cluster linked to a scheduler cluster.
    async fn seed_peers_of(
        &self,
        cluster: &models::SchedulerCluster,
    ) -> Result<Vec<SeedPeer>, Status> {
        let rows = self
            .store
            .fetch_all(
                "SELECT * FROM seed_peers WHERE state = ? AND (seed_peer_cluster_id = ? OR seed_peer_cluster_id IN (SELECT id FROM seed_peer_clusters WHERE scheduler_cluster_id = ?))",
                &[ACTIVE.into(), cluster.seed_peer_cluster_id.into(), cluster.id.into()],
            )
            .await
            .map_err(db)?;
        Ok(rows
            .iter()
            .map(|r| seed_peer_proto(&models::SeedPeer::from_row(r)))
            .collect())
    }
}

fn scheduler_cluster_proto(c: &models::SchedulerCluster) -> SchedulerCluster {
    fn json(v: &impl serde::Serialize) -> Vec<u8> {
        serde_json::to_vec(v).unwrap_or_default()
    }
    SchedulerCluster {
        id: c.id as u64,
        name: c.name.clone(),
        bio: c.bio.clone(),
        config: json(&c.config),
        client_config: json(&c.client_config),
        scopes: json(&c.scopes),
        seed_client_config: json(&c.seed_client_config),
    }
}

fn opt(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_string())
}

fn scheduler_proto(s: &models::Scheduler) -> Scheduler {
    Scheduler {
        id: s.id as u64,
        hostname: s.hostname.clone(),
        idc: opt(&s.idc),
        location: opt(&s.location),
        ip: s.ip.clone(),
        port: s.port as i32,
        state: s.state.clone(),
        scheduler_cluster_id: s.scheduler_cluster_id as u64,
        scheduler_cluster: None,
        seed_peers: vec![],
        features: serde_json::to_vec(&s.features).unwrap_or_default(),
    }
}

fn seed_peer_proto(p: &models::SeedPeer) -> SeedPeer {
    SeedPeer {
        id: p.id as u64,
        hostname: p.hostname.clone(),
        r#type: p.kind.clone(),
        idc: opt(&p.idc),
        location: opt(&p.location),
        ip: p.ip.clone(),
        port: p.port as i32,
        download_port: p.download_port as i32,
        state: p.state.clone(),
        seed_peer_cluster_id: p.seed_peer_cluster_id as u64,
        seed_peer_cluster: None,
        schedulers: vec![],
    }
}

/// Inserts or updates a component row found by (hostname, ip, cluster).
async fn upsert(
    store: &Store,
    table: &str,
    cluster_column: &str,
    hostname: &str,
    ip: &str,
    cluster: i64,
    fields: Vec<(&'static str, Value)>,
) -> Result<i64, StoreError> {
    let existing = store
        .fetch_optional(
            &format!(
                "SELECT id FROM {table} WHERE hostname = ? AND ip = ? AND {cluster_column} = ?"
            ),
            &[hostname.into(), ip.into(), cluster.into()],
        )
        .await?;
    let mut all = fields;
    all.push(("state", ACTIVE.into()));
    all.push(("keepalive_at", now().into()));
    all.push(models::updated());
    match existing {
        Some(row) => {
            let id = row.int("id");
            store.update(table, id, &all).await?;
            Ok(id)
        }
        None => {
            all.push(("hostname", hostname.into()));
            all.push(("ip", ip.into()));
            all.push((
                if table == "schedulers" {
                    "scheduler_cluster_id"
                } else {
                    "seed_peer_cluster_id"
                },
                cluster.into(),
            ));
            all.push(("created_at", now().into()));
            match store.insert(table, &all).await {
                Ok(id) => Ok(id),
                // Registered meanwhile by another stream: update that row.
                Err(StoreError::Conflict(_)) => {
                    Box::pin(upsert(
                        store,
                        table,
                        cluster_column,
                        hostname,
                        ip,
                        cluster,
                        Vec::new(),
                    ))
                    .await
                }
                Err(e) => Err(e),
            }
        }
    }
}

#[tonic::async_trait]
impl Manager for ManagerService {
    async fn get_seed_peer(
        &self,
        request: Request<GetSeedPeerRequest>,
    ) -> Result<Response<SeedPeer>, Status> {
        let r = request.into_inner();
        check_host(&r.hostname, &r.ip)?;
        let row = self
            .store
            .fetch_optional(
                "SELECT * FROM seed_peers WHERE hostname = ? AND ip = ? AND seed_peer_cluster_id = ?",
                &[r.hostname.as_str().into(), r.ip.as_str().into(), (r.seed_peer_cluster_id as i64).into()],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| Status::not_found(format!("seed peer {} ({}) not found", r.hostname, r.ip)))?;
        Ok(Response::new(seed_peer_proto(&models::SeedPeer::from_row(
            &row,
        ))))
    }

    async fn list_seed_peers(
        &self,
        request: Request<ListSeedPeersRequest>,
    ) -> Result<Response<ListSeedPeersResponse>, Status> {
        let r = request.into_inner();
        if r.hostname.len() > MAX_HOSTNAME {
            return Err(Status::invalid_argument("hostname is too long"));
        }
        let rows = self
            .store
            .fetch_all(
                "SELECT * FROM seed_peers WHERE state = ? ORDER BY id",
                &[ACTIVE.into()],
            )
            .await
            .map_err(db)?;
        Ok(Response::new(ListSeedPeersResponse {
            seed_peers: rows
                .iter()
                .map(|r| seed_peer_proto(&models::SeedPeer::from_row(r)))
                .collect(),
        }))
    }

    async fn update_seed_peer(
        &self,
        request: Request<UpdateSeedPeerRequest>,
    ) -> Result<Response<SeedPeer>, Status> {
        let r = request.into_inner();
        check_host(&r.hostname, &r.ip)?;
        check_port("port", r.port)?;
        check_port("download_port", r.download_port)?;
        let kind = if r.r#type.is_empty() {
            "super".to_string()
        } else {
            r.r#type.clone()
        };
        if !matches!(kind.as_str(), "super" | "strong" | "weak") {
            return Err(Status::invalid_argument(
                "type must be super, strong or weak",
            ));
        }
        let cluster = self
            .cluster_id_or_default(r.seed_peer_cluster_id, "seed_peer_clusters")
            .await?;
        let fields = vec![
            ("kind", kind.into()),
            ("idc", short(r.idc, "idc")?.into()),
            ("location", short(r.location, "location")?.into()),
            ("port", (r.port as i64).into()),
            ("download_port", (r.download_port as i64).into()),
        ];
        let id = upsert(
            &self.store,
            "seed_peers",
            "seed_peer_cluster_id",
            &r.hostname,
            &r.ip,
            cluster,
            fields,
        )
        .await
        .map_err(db)?;
        info!(
            hostname = r.hostname,
            ip = r.ip,
            cluster,
            "seed peer registered"
        );
        let row = self
            .store
            .fetch_optional("SELECT * FROM seed_peers WHERE id = ?", &[id.into()])
            .await
            .map_err(db)?
            .ok_or_else(|| Status::internal("registered seed peer vanished"))?;
        Ok(Response::new(seed_peer_proto(&models::SeedPeer::from_row(
            &row,
        ))))
    }

    async fn delete_seed_peer(
        &self,
        request: Request<DeleteSeedPeerRequest>,
    ) -> Result<Response<()>, Status> {
        let r = request.into_inner();
        check_host(&r.hostname, &r.ip)?;
        self.store
            .execute(
                "DELETE FROM seed_peers WHERE hostname = ? AND ip = ? AND seed_peer_cluster_id = ?",
                &[
                    r.hostname.as_str().into(),
                    r.ip.as_str().into(),
                    (r.seed_peer_cluster_id as i64).into(),
                ],
            )
            .await
            .map_err(db)?;
        Ok(Response::new(()))
    }

    async fn get_scheduler(
        &self,
        request: Request<GetSchedulerRequest>,
    ) -> Result<Response<Scheduler>, Status> {
        let r = request.into_inner();
        check_host(&r.hostname, &r.ip)?;
        let row = self
            .store
            .fetch_optional(
                "SELECT * FROM schedulers WHERE hostname = ? AND ip = ? AND scheduler_cluster_id = ?",
                &[r.hostname.as_str().into(), r.ip.as_str().into(), (r.scheduler_cluster_id as i64).into()],
            )
            .await
            .map_err(db)?
            .ok_or_else(|| Status::not_found(format!("scheduler {} ({}) not found", r.hostname, r.ip)))?;
        let scheduler = models::Scheduler::from_row(&row);
        let mut answer = scheduler_proto(&scheduler);
        if let Some(cluster) = self
            .scheduler_cluster(scheduler.scheduler_cluster_id)
            .await?
        {
            answer.seed_peers = self.seed_peers_of(&cluster).await?;
            answer.scheduler_cluster = Some(scheduler_cluster_proto(&cluster));
        }
        Ok(Response::new(answer))
    }

    async fn update_scheduler(
        &self,
        request: Request<UpdateSchedulerRequest>,
    ) -> Result<Response<Scheduler>, Status> {
        let r = request.into_inner();
        check_host(&r.hostname, &r.ip)?;
        check_port("port", r.port)?;
        if r.features.len() > 32 || r.features.iter().any(|f| f.len() > 64) {
            return Err(Status::invalid_argument(
                "features: at most 32 of at most 64 bytes",
            ));
        }
        let cluster = self
            .cluster_id_or_default(r.scheduler_cluster_id, "scheduler_clusters")
            .await?;
        let fields = vec![
            ("idc", short(r.idc, "idc")?.into()),
            ("location", short(r.location, "location")?.into()),
            ("port", (r.port as i64).into()),
            (
                "features",
                serde_json::to_string(&r.features).expect("json").into(),
            ),
        ];
        let id = upsert(
            &self.store,
            "schedulers",
            "scheduler_cluster_id",
            &r.hostname,
            &r.ip,
            cluster,
            fields,
        )
        .await
        .map_err(db)?;
        info!(
            hostname = r.hostname,
            ip = r.ip,
            cluster,
            "scheduler registered"
        );
        let row = self
            .store
            .fetch_optional("SELECT * FROM schedulers WHERE id = ?", &[id.into()])
            .await
            .map_err(db)?
            .ok_or_else(|| Status::internal("registered scheduler vanished"))?;
        Ok(Response::new(scheduler_proto(
            &models::Scheduler::from_row(&row),
        )))
    }

    async fn list_schedulers(
        &self,
        request: Request<ListSchedulersRequest>,
    ) -> Result<Response<ListSchedulersResponse>, Status> {
        let r = request.into_inner();
        if r.hostname.len() > MAX_HOSTNAME {
            return Err(Status::invalid_argument("hostname is too long"));
        }
        let idc = short(r.idc, "idc")?;
        let location = short(r.location, "location")?;
        let clusters: Vec<models::SchedulerCluster> = self
            .store
            .fetch_all("SELECT * FROM scheduler_clusters ORDER BY id", &[])
            .await
            .map_err(db)?
            .iter()
            .map(models::SchedulerCluster::from_row)
            .collect();
        let candidates: Vec<Candidate<'_>> = clusters
            .iter()
            .map(|c| Candidate {
                id: c.id,
                scopes: &c.scopes,
                is_default: c.is_default,
            })
            .collect();
        let conditions = Conditions {
            hostname: &r.hostname,
            ip: r.ip.parse().ok(),
            idc: &idc,
            location: &location,
        };
        let mut order = searcher::rank(&candidates, &conditions);
        if r.scheduler_cluster_id != 0 {
            // A peer configured for a cluster asks there first.
            order.retain(|id| *id != r.scheduler_cluster_id as i64);
            order.insert(0, r.scheduler_cluster_id as i64);
        }
        for cluster_id in order {
            let rows = self
                .store
                .fetch_all(
                    "SELECT * FROM schedulers WHERE scheduler_cluster_id = ? AND state = ? ORDER BY id",
                    &[cluster_id.into(), ACTIVE.into()],
                )
                .await
                .map_err(db)?;
            if rows.is_empty() {
                continue;
            }
            debug!(
                hostname = r.hostname,
                ip = r.ip,
                cluster_id,
                "schedulers found"
            );
            return Ok(Response::new(ListSchedulersResponse {
                schedulers: rows
                    .iter()
                    .map(|r| scheduler_proto(&models::Scheduler::from_row(r)))
                    .collect(),
            }));
        }
        Ok(Response::new(ListSchedulersResponse { schedulers: vec![] }))
    }

    async fn list_applications(
        &self,
        _request: Request<ListApplicationsRequest>,
    ) -> Result<Response<ListApplicationsResponse>, Status> {
        let rows = self
            .store
            .fetch_all("SELECT * FROM applications ORDER BY id", &[])
            .await
            .map_err(db)?;
        let applications = rows
            .iter()
            .map(|row| {
                let a = models::Application::from_row(row);
                Application {
                    id: a.id as u64,
                    name: a.name,
                    url: a.url,
                    bio: a.bio,
                    priority: Some(ApplicationPriority {
                        value: a.priority.value,
                        urls: a
                            .priority
                            .urls
                            .into_iter()
                            .map(|u| UrlPriority {
                                regex: u.regex,
                                value: u.value,
                            })
                            .collect(),
                    }),
                }
            })
            .collect();
        Ok(Response::new(ListApplicationsResponse { applications }))
    }

    async fn keep_alive(
        &self,
        request: Request<Streaming<KeepAliveRequest>>,
    ) -> Result<Response<()>, Status> {
        let mut stream = request.into_inner();
        let mut identity: Option<(String, &'static str, &'static str, String, i64)> = None;
        let silent = self.keep_alive_timeout;
        loop {
            let next = tokio::time::timeout(silent, stream.message()).await;
            let message = match next {
                Ok(Ok(Some(m))) => m,
                // Ended, failed, or silent too long: the component is gone.
                _ => break,
            };
            let (table, column) = match SourceType::try_from(message.source_type) {
                Ok(SourceType::SchedulerSource) => ("schedulers", "scheduler_cluster_id"),
                Ok(SourceType::SeedPeerSource) => ("seed_peers", "seed_peer_cluster_id"),
                Ok(SourceType::PeerSource) => ("peers", "scheduler_cluster_id"),
                Err(_) => return Err(Status::invalid_argument("unknown source_type")),
            };
            check_host(&message.hostname, &message.ip)?;
            let key = (
                message.hostname.clone(),
                table,
                column,
                message.ip.clone(),
                message.cluster_id as i64,
            );
            let touched = self
                .store
                .execute(
                    &format!("UPDATE {table} SET state = ?, keepalive_at = ? WHERE hostname = ? AND ip = ? AND {column} = ?"),
                    &[ACTIVE.into(), now().into(), key.0.as_str().into(), key.3.as_str().into(), key.4.into()],
                )
                .await
                .map_err(db)?;
            if touched == 0 && identity.is_none() {
                debug!(
                    hostname = key.0,
                    ip = key.3,
                    table,
                    "keepalive from an unregistered component"
                );
            }
            identity = Some(key);
        }
        if let Some((hostname, table, column, ip, cluster)) = identity {
            info!(hostname, ip, table, "keepalive ended; marking inactive");
            self.store
                .execute(
                    &format!("UPDATE {table} SET state = ? WHERE hostname = ? AND ip = ? AND {column} = ?"),
                    &[INACTIVE.into(), hostname.as_str().into(), ip.as_str().into(), cluster.into()],
                )
                .await
                .map_err(db)?;
        }
        Ok(Response::new(()))
    }
}

/// Marks components inactive whose last keepalive is older than `timeout` (a manager that
/// restarted has no streams to watch; this also covers a stream that died silently).
pub async fn sweep_inactive(store: Store, timeout: Duration) {
    let mut tick = tokio::time::interval(timeout / 3);
    loop {
        tick.tick().await;
        let cutoff = now() - timeout.as_secs() as i64;
        for table in ["schedulers", "seed_peers", "peers"] {
            if let Err(e) = store
                .execute(
                    &format!("UPDATE {table} SET state = ? WHERE state = ? AND keepalive_at < ?"),
                    &[INACTIVE.into(), ACTIVE.into(), cutoff.into()],
                )
                .await
            {
                tracing::warn!(%e, table, "marking silent components inactive failed");
            }
        }
    }
}

/// The default clusters of a new database (as upstream creates `cluster-1`).
pub async fn ensure_default_clusters(store: &Store) -> Result<(), StoreError> {
    if store.count("scheduler_clusters", "1 = 1", &[]).await? > 0 {
        return Ok(());
    }
    let mut seed = vec![
        ("name", "cluster-1".into()),
        ("bio", "the default seed peer cluster".into()),
        ("config", "{\"load_limit\":2000}".into()),
    ];
    seed.extend(models::created());
    let seed_id = match store.insert("seed_peer_clusters", &seed).await {
        Ok(id) => id,
        Err(StoreError::Conflict(_)) => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut cluster = vec![
        ("name", "cluster-1".into()),
        ("bio", "the default scheduler cluster".into()),
        (
            "config",
            serde_json::to_string(&models::SchedulerClusterConfig::default())
                .expect("json")
                .into(),
        ),
        (
            "client_config",
            serde_json::to_string(&models::ClientConfig::default())
                .expect("json")
                .into(),
        ),
        ("seed_client_config", "{\"load_limit\":2000}".into()),
        ("scopes", "{}".into()),
        ("is_default", true.into()),
        ("seed_peer_cluster_id", seed_id.into()),
    ];
    cluster.extend(models::created());
    match store.insert("scheduler_clusters", &cluster).await {
        Ok(id) => {
            store
                .update(
                    "seed_peer_clusters",
                    seed_id,
                    &[("scheduler_cluster_id", id.into())],
                )
                .await?;
            Ok(())
        }
        Err(StoreError::Conflict(_)) => Ok(()),
        Err(e) => Err(e),
    }
}
