//! Jobs: preheat (an image resolved from its registry into blobs, or files by URL),
//! `get_task` (which hosts hold a task) and `delete_task` (drop it from them), as
//! upstream's manager runs them and as Harbor's preheat provider polls them.
//!
//! A job is a database row (the API's view and the truth), queued in [`queue`], leased by
//! the manager that runs it, and run against each chosen scheduler cluster: the cluster's
//! scheduler lists its live hosts, [`targets`] picks the ones the job is for, and [`exec`]
//! has them download, report or delete the task. A job ends in SUCCESS or FAILURE, never
//! stays PENDING: a cluster without a live scheduler, a registry that refuses, or the
//! job's timeout all end it in FAILURE with the reason in `result.job_states[].error`.
//! A manager that dies mid-job loses its lease; the job is run again from the start by
//! whoever takes it (downloads already done come back at once: the peers hold them).

pub mod args;
mod exec;
pub mod image;
pub mod queue;
pub mod targets;

use crate::models::{self, FAILURE, PENDING, SUCCESS};
use crate::store::{now, RowExt, Store, StoreError, Value};
use args::{Preheat, Spec, TaskQuery};
use dragonfly_api::common::v2::{Download, Priority, TaskType};
use futures_util::stream::{self, StreamExt};
use queue::Queue;
use serde::Serialize;
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use targets::Host;
use tracing::{debug, info, warn};

/// How long a lease lasts without renewal (a dead manager's jobs wait this long).
pub const LEASE: Duration = Duration::from_secs(30);
/// Jobs one manager runs at once.
const MAX_RUNNING: usize = 64;
/// Hosts asked at once in get_task / delete_task.
const STAT_CONCURRENCY: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Queue(#[from] queue::QueueError),
}

/// How jobs run.
#[derive(Debug, Clone)]
pub struct Options {
    /// A job's deadline when its args name none.
    pub default_timeout: Duration,
    pub registry_timeout: Duration,
    pub registry_insecure: bool,
    pub registry_roots_pem: Vec<Vec<u8>>,
}

/// The job service: creates jobs and runs them.
pub struct Jobs {
    store: Store,
    queue: Arc<Queue>,
    resolver: image::Resolver,
    options: Options,
    /// This manager's name on leases.
    owner: String,
    running: Arc<tokio::sync::Semaphore>,
}

/// One cluster's part of a job, as upstream shows it in `result.job_states`.
#[derive(Debug, Clone, Serialize)]
struct JobState {
    task_uuid: String,
    task_name: String,
    state: &'static str,
    error: String,
    results: Vec<serde_json::Value>,
    ttl: i64,
    created_at: String,
}

impl Jobs {
    /// `owner` names this manager on leases; it must be stable across restarts and unique
    /// among the managers sharing the database (host name and REST address), so that a
    /// restarted manager takes back its own jobs at once instead of waiting out its leases.
    pub fn new(
        store: Store,
        queue: Arc<Queue>,
        options: Options,
        owner: String,
    ) -> Result<Arc<Jobs>, String> {
        let resolver = image::Resolver::new(
            options.registry_timeout,
            options.registry_insecure,
            options.registry_roots_pem.clone(),
        )?;
        Ok(Arc::new(Jobs {
            store,
            queue,
            resolver,
            options,
            owner,
            running: Arc::new(tokio::sync::Semaphore::new(MAX_RUNNING)),
        }))
    }

    pub fn queue_kind(&self) -> &'static str {
        self.queue.kind()
    }

    /// Checks and stores a job, and queues it. The caller checked permissions.
    pub async fn create(
        &self,
        request: args::CreateJob,
        user_id: i64,
    ) -> Result<models::Job, CreateError> {
        args::check(&request.kind, &request.args).map_err(CreateError::Invalid)?;
        for id in &request.scheduler_cluster_ids {
            let exists = self
                .store
                .fetch_optional(
                    "SELECT id FROM scheduler_clusters WHERE id = ?",
                    &[(*id).into()],
                )
                .await?
                .is_some();
            if !exists {
                return Err(CreateError::Invalid(crate::rest::resources::field(
                    "scheduler_cluster_ids",
                    format!("scheduler cluster {id} does not exist"),
                )));
            }
        }
        if let Some(bio) = &request.bio {
            if bio.len() > 1024 {
                return Err(CreateError::Invalid(crate::rest::resources::field(
                    "bio",
                    "is longer than 1024 characters",
                )));
            }
        }
        let mut fields: Vec<(&str, Value)> = vec![
            ("task_id", format!("group_{}", uuid_v4()).into()),
            ("bio", request.bio.unwrap_or_default().into()),
            ("kind", request.kind.into()),
            ("state", PENDING.into()),
            ("args", request.args.to_string().into()),
            ("result", "{}".into()),
            (
                "scheduler_cluster_ids",
                serde_json::to_string(&request.scheduler_cluster_ids)
                    .expect("json")
                    .into(),
            ),
            ("user_id", user_id.into()),
            ("lease_owner", "".into()),
            ("lease_until", 0i64.into()),
        ];
        fields.extend(models::created());
        let id = self.store.insert("jobs", &fields).await?;
        self.queue.push(id).await?;
        info!(id, "job created");
        self.job(id)
            .await?
            .ok_or_else(|| CreateError::Store(StoreError::Db("the new job vanished".into())))
    }

    pub async fn job(&self, id: i64) -> Result<Option<models::Job>, StoreError> {
        Ok(self
            .store
            .fetch_optional("SELECT * FROM jobs WHERE id = ?", &[id.into()])
            .await?
            .map(|r| models::Job::from_row(&r)))
    }

    /// Takes queued jobs and runs them, until the process ends.
    pub async fn run(self: Arc<Self>) {
        // Jobs this manager held when it died are free again now.
        match self
            .store
            .execute(
                "UPDATE jobs SET lease_until = ? WHERE lease_owner = ? AND state = ?",
                &[0i64.into(), self.owner.as_str().into(), PENDING.into()],
            )
            .await
        {
            Ok(0) => {}
            Ok(n) => info!(
                jobs = n,
                "taking back the jobs this manager ran before it restarted"
            ),
            Err(e) => warn!(%e, "releasing this manager's old leases failed"),
        }
        let _ = self.queue.recover(&self.store).await;
        let recovering = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            loop {
                tick.tick().await;
                match recovering.queue.recover(&recovering.store).await {
                    Ok(0) => {}
                    Ok(n) => info!(jobs = n, "requeued jobs nobody holds"),
                    Err(e) => warn!(%e, "looking for lost jobs failed"),
                }
            }
        });
        loop {
            let permit = match self.running.clone().acquire_owned().await {
                Ok(p) => p,
                Err(_) => return,
            };
            let candidates = match self
                .queue
                .candidates(&self.store, Duration::from_secs(5))
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    warn!(%e, "the job queue failed; retrying");
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            };
            drop(permit);
            for id in candidates {
                match queue::claim(&self.store, id, &self.owner, LEASE).await {
                    Ok(true) => {
                        let Ok(permit) = self.running.clone().acquire_owned().await else {
                            return;
                        };
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.execute(id).await;
                            drop(permit);
                        });
                    }
                    Ok(false) => debug!(id, "job taken by another runner or done"),
                    Err(e) => warn!(id, %e, "claiming a job failed"),
                }
            }
        }
    }

    /// Runs job `id`, which this manager holds, to its end (or until its lease is lost).
    async fn execute(self: Arc<Self>, id: i64) {
        let Ok(Some(row)) = self
            .store
            .fetch_optional("SELECT * FROM jobs WHERE id = ?", &[id.into()])
            .await
        else {
            return;
        };
        let job = models::Job::from_row(&row);
        let created_at = row.int("created_at");
        let spec = match args::check(&job.kind, &job.args) {
            Ok(spec) => spec,
            Err(e) => {
                let state = failed_state(&job, format!("invalid field {}: {}", e.field, e.message));
                self.finish(id, FAILURE, vec![state]).await;
                return;
            }
        };
        let timeout = spec.timeout().unwrap_or(self.options.default_timeout);
        let deadline = created_at + timeout.as_secs().max(1) as i64;
        let left = deadline - now();
        if left <= 0 {
            let state = failed_state(
                &job,
                format!("timed out after {}", humantime::format_duration(timeout)),
            );
            self.finish(id, FAILURE, vec![state]).await;
            return;
        }
        info!(id, kind = job.kind, "job started");
        let renewing = async {
            let mut tick = tokio::time::interval(LEASE / 3);
            tick.tick().await;
            loop {
                tick.tick().await;
                match queue::renew(&self.store, id, &self.owner, LEASE).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => warn!(id, %e, "renewing a job's lease failed"),
                }
            }
        };
        let work = tokio::time::timeout(
            Duration::from_secs(left as u64),
            self.perform(&job, &spec, Duration::from_secs(left as u64)),
        );
        let states = tokio::select! {
            done = work => match done {
                Ok(states) => states,
                Err(_) => vec![failed_state(&job, format!("timed out after {}", humantime::format_duration(timeout)))],
            },
            _ = renewing => {
                warn!(id, "lost the job's lease; another manager runs it");
                return;
            }
        };
        let state = if !states.is_empty() && states.iter().all(|s| s.state == SUCCESS) {
            SUCCESS
        } else {
            FAILURE
        };
        self.finish(id, state, states).await;
    }

    /// Stores the end of a job (only while this manager holds it).
    async fn finish(&self, id: i64, state: &'static str, states: Vec<JobState>) {
        let result = json!({
            "state": state,
            "job_states": states,
            "created_at": models::rfc3339(now()),
        });
        match self
            .store
            .execute(
                "UPDATE jobs SET state = ?, result = ?, lease_until = ?, updated_at = ? WHERE id = ? AND lease_owner = ?",
                &[state.into(), result.to_string().into(), 0i64.into(), now().into(), id.into(), self.owner.as_str().into()],
            )
            .await
        {
            Ok(_) => info!(id, state, "job ended"),
            Err(e) => warn!(id, %e, "storing a job's end failed; it will run again"),
        }
    }

    /// The clusters a job is for: its list, or every cluster.
    async fn clusters(&self, job: &models::Job) -> Result<Vec<i64>, StoreError> {
        if !job.scheduler_cluster_ids.is_empty() {
            return Ok(job.scheduler_cluster_ids.clone());
        }
        Ok(self
            .store
            .fetch_all("SELECT id FROM scheduler_clusters ORDER BY id", &[])
            .await?
            .iter()
            .map(|r| r.int("id"))
            .collect())
    }

    /// The live hosts of a cluster, from the first of its active schedulers that answers.
    async fn hosts(&self, cluster: i64) -> Result<Vec<Host>, String> {
        let rows = self
            .store
            .fetch_all(
                "SELECT * FROM schedulers WHERE scheduler_cluster_id = ? AND state = ? ORDER BY keepalive_at DESC",
                &[cluster.into(), models::ACTIVE.into()],
            )
            .await
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            return Err(format!(
                "scheduler cluster {cluster} has no active scheduler"
            ));
        }
        let mut last = String::new();
        for row in rows {
            let s = models::Scheduler::from_row(&row);
            match exec::list_hosts(&s.ip, s.port as u16).await {
                Ok(hosts) => return Ok(hosts),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn perform(&self, job: &models::Job, spec: &Spec, left: Duration) -> Vec<JobState> {
        let clusters = match self.clusters(job).await {
            Ok(c) if c.is_empty() => {
                return vec![failed_state(job, "there is no scheduler cluster".into())]
            }
            Ok(c) => c,
            Err(e) => return vec![failed_state(job, e.to_string())],
        };
        match spec {
            Spec::Preheat(p) => {
                // An image is resolved once, by the manager, as upstream does.
                let (urls, headers) = if p.image {
                    let creds = image::Credentials {
                        headers: p.headers.clone(),
                        username: p.username.clone(),
                        password: p.password.clone(),
                    };
                    match self.resolver.resolve(&p.urls[0], &p.platform, &creds).await {
                        Ok(r) => (r.blob_urls, r.headers),
                        Err(e) => return vec![failed_state(job, e.to_string())],
                    }
                } else {
                    (p.urls.clone(), p.headers.clone())
                };
                stream::iter(clusters)
                    .map(|c| self.preheat_cluster(job, c, p, &urls, &headers, left))
                    .buffer_unordered(16)
                    .collect()
                    .await
            }
            Spec::GetTask(q) => {
                stream::iter(clusters)
                    .map(|c| self.task_cluster(job, c, q, false))
                    .buffer_unordered(16)
                    .collect()
                    .await
            }
            Spec::DeleteTask(q) => {
                stream::iter(clusters)
                    .map(|c| self.task_cluster(job, c, q, true))
                    .buffer_unordered(16)
                    .collect()
                    .await
            }
        }
    }

    async fn preheat_cluster(
        &self,
        job: &models::Job,
        cluster: i64,
        p: &Preheat,
        urls: &[String],
        headers: &HashMap<String, String>,
        left: Duration,
    ) -> JobState {
        let hosts = match self.hosts(cluster).await {
            Ok(h) => h,
            Err(e) => {
                return cluster_state(
                    job,
                    FAILURE,
                    e,
                    vec![
                        json!({"success_tasks": [], "failure_tasks": [], "scheduler_cluster_id": cluster}),
                    ],
                )
            }
        };
        let started = tokio::time::Instant::now();
        let per_url = stream::iter(urls.iter().cloned())
            .map(|url| {
                let hosts = &hosts;
                async move {
                    let task_id = args::task_id_of(&url, p.piece_length, &p.tag, &p.application, &p.filtered_query_params, None, p.blob_digest_task_id)
                        .unwrap_or_default();
                    let chosen = targets::select(hosts, p.scope, &p.narrowing, &task_id);
                    if chosen.is_empty() {
                        let why = match p.scope {
                            targets::Scope::AllPeers if !p.narrowing.ips.is_empty() => "no host of the cluster has one of args.ips",
                            targets::Scope::AllPeers => "the cluster has no host",
                            _ => "the cluster has no live seed peer",
                        };
                        return (url.clone(), Vec::new(), vec![json!({"url": url, "hostname": "", "ip": "", "description": why})]);
                    }
                    let download = Download {
                        url: url.clone(),
                        r#type: TaskType::Standard as i32,
                        tag: Some(p.tag.clone()),
                        application: Some(p.application.clone()),
                        priority: Priority::Level0 as i32,
                        filtered_query_params: p.filtered_query_params.clone(),
                        request_header: headers.clone(),
                        piece_length: p.piece_length,
                        enable_task_id_based_blob_digest: p.blob_digest_task_id,
                        ..Default::default()
                    };
                    let results: Vec<(Host, Result<(), String>)> = stream::iter(chosen)
                        .map(|host| {
                            let download = download.clone();
                            async move {
                                let remaining = left.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
                                let r = exec::download(&host, download, remaining).await;
                                (host, r)
                            }
                        })
                        .buffer_unordered(p.concurrent_peer_count)
                        .collect()
                        .await;
                    let mut ok = Vec::new();
                    let mut failed = Vec::new();
                    for (host, r) in results {
                        match r {
                            Ok(()) => ok.push(json!({"url": url, "hostname": host.hostname, "ip": host.ip})),
                            Err(e) => failed.push(json!({"url": url, "hostname": host.hostname, "ip": host.ip, "description": e})),
                        }
                    }
                    (url, ok, failed)
                }
            })
            .buffer_unordered(p.concurrent_task_count)
            .collect::<Vec<_>>()
            .await;
        let mut success_tasks = Vec::new();
        let mut failure_tasks = Vec::new();
        let mut failed_urls = 0;
        let mut first_error = String::new();
        for (_, ok, failed) in per_url {
            if ok.is_empty() {
                failed_urls += 1;
                if first_error.is_empty() {
                    if let Some(f) = failed.first() {
                        first_error = format!(
                            "{}: {}",
                            f["url"].as_str().unwrap_or(""),
                            f["description"].as_str().unwrap_or("")
                        );
                    }
                }
            }
            success_tasks.extend(ok);
            failure_tasks.extend(failed);
        }
        let result = json!({"success_tasks": success_tasks, "failure_tasks": failure_tasks, "scheduler_cluster_id": cluster});
        if failed_urls == 0 {
            cluster_state(job, SUCCESS, String::new(), vec![result])
        } else {
            let error = format!("{failed_urls} of {} files were preheated nowhere in scheduler cluster {cluster}; {first_error}", urls.len());
            cluster_state(job, FAILURE, error, vec![result])
        }
    }

    async fn task_cluster(
        &self,
        job: &models::Job,
        cluster: i64,
        q: &TaskQuery,
        delete: bool,
    ) -> JobState {
        let hosts = match self.hosts(cluster).await {
            Ok(h) => h,
            Err(e) => {
                return cluster_state(
                    job,
                    FAILURE,
                    e,
                    vec![json!({"scheduler_cluster_id": cluster})],
                )
            }
        };
        let stats: Vec<(Host, Result<Option<bool>, String>)> = stream::iter(hosts)
            .map(|host| async move {
                let r = exec::stat(&host, &q.task_id).await;
                (host, r)
            })
            .buffer_unordered(STAT_CONCURRENCY)
            .collect()
            .await;
        let mut holders: Vec<(Host, bool)> = Vec::new();
        let mut unreachable = Vec::new();
        for (host, r) in stats {
            match r {
                Ok(Some(finished)) => holders.push((host, finished)),
                Ok(None) => {}
                Err(e) => unreachable.push(json!({"hostname": host.hostname, "ip": host.ip, "host_type": host.host_type(), "description": e})),
            }
        }
        holders.sort_by(|a, b| a.0.id.cmp(&b.0.id));
        if !delete {
            let peers: Vec<serde_json::Value> = holders
                .iter()
                .map(|(h, finished)| json!({"id": h.id, "hostname": h.hostname, "ip": h.ip, "host_type": h.host_type(), "is_finished": finished}))
                .collect();
            let result = json!({"task_id": q.task_id, "url": q.url, "peers": peers, "failure_tasks": unreachable, "scheduler_cluster_id": cluster});
            return cluster_state(job, SUCCESS, String::new(), vec![result]);
        }
        let deleted: Vec<(Host, Result<(), String>)> =
            stream::iter(holders.into_iter().map(|(h, _)| h))
                .map(|host| async move {
                    let r = exec::delete(&host, &q.task_id).await;
                    (host, r)
                })
                .buffer_unordered(STAT_CONCURRENCY)
                .collect()
                .await;
        let mut success_tasks = Vec::new();
        let mut failure_tasks = unreachable;
        for (host, r) in deleted {
            match r {
                Ok(()) => success_tasks.push(json!({"hostname": host.hostname, "ip": host.ip, "host_type": host.host_type()})),
                Err(e) => failure_tasks.push(json!({"hostname": host.hostname, "ip": host.ip, "host_type": host.host_type(), "description": e})),
            }
        }
        let state = if failure_tasks.is_empty() {
            SUCCESS
        } else {
            FAILURE
        };
        let error = if failure_tasks.is_empty() {
            String::new()
        } else {
            format!(
                "{} hosts of scheduler cluster {cluster} could not be asked or refused",
                failure_tasks.len()
            )
        };
        let result = json!({"task_id": q.task_id, "url": q.url, "success_tasks": success_tasks, "failure_tasks": failure_tasks, "scheduler_cluster_id": cluster});
        cluster_state(job, state, error, vec![result])
    }
}

/// Why a job could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("invalid field {}: {}", .0.field, .0.message)]
    Invalid(crate::rest::resources::FieldError),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{0}")]
    Queue(#[from] queue::QueueError),
}

fn uuid_v4() -> String {
    let b: [u8; 16] = rand::random();
    let h = hex::encode(b);
    format!(
        "{}-{}-4{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[16..20],
        &h[20..32]
    )
}

fn cluster_state(
    job: &models::Job,
    state: &'static str,
    error: String,
    results: Vec<serde_json::Value>,
) -> JobState {
    JobState {
        task_uuid: format!("task_{}", uuid_v4()),
        task_name: job.kind.clone(),
        state,
        error,
        results,
        ttl: 86400,
        created_at: models::rfc3339(now()),
    }
}

fn failed_state(job: &models::Job, error: String) -> JobState {
    cluster_state(job, FAILURE, error, Vec::new())
}
