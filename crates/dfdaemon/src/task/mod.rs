//! The task manager: turns download requests into task runs, shares one run among all
//! requests for the same task, and places finished content at the requested output path.
//!
//! **Invariant:** at most one [`TaskRun`] per task ID is in `running`; a request for a task
//! that is finished in storage is answered from storage without any origin traffic.

mod output;
mod p2p;
mod run;
mod sink;
mod source;
mod stream;

pub use output::{check_output, place_output};
pub use run::{RunState, TaskRun};
pub use stream::{stream_range, Chunk};

use crate::error::TaskError;
use crate::host::HostInfo;
use crate::metrics::Metrics;
use crate::ratelimit::Bandwidth;
use crate::scheduler::Schedulers;
use d7y_backend::Backend;
use d7y_config::dfdaemon::Config;
use d7y_storage::{now_secs, PieceMeta, Storage, StorageError, TaskMeta};
use d7y_types::id::{default_filtered_query_params, task_id, TaskIdParams};
use d7y_types::piece::validate_piece_length;
use d7y_types::Digest;
use dragonfly_api::common::v2::Download;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// Extra trusted certificates a request may carry, and their size.
const MAX_CERTIFICATES: usize = 16;
const MAX_CERTIFICATE_BYTES: usize = 64 * 1024;

/// A validated download request. Not `Debug`: the request carries credentials.
#[derive(Clone)]
pub struct DownloadPlan {
    pub task_id: String,
    pub url: url::Url,
    pub headers: Vec<(String, String)>,
    pub piece_length: Option<u64>,
    pub digest: Option<Digest>,
    pub output_path: Option<PathBuf>,
    pub force_hard_link: bool,
    pub overwrite: bool,
    pub disable_back_to_source: bool,
    pub timeout: Option<Duration>,
    pub tag: String,
    pub application: String,
    pub priority: i32,
    pub need_piece_content: bool,
    /// The request as received (what the scheduler and seed peers are told).
    pub download: Download,
    /// Who to be at the origin (from the request).
    pub credentials: d7y_backend::Credentials,
}

impl DownloadPlan {
    /// The origin request of this download.
    pub fn source_request(&self) -> d7y_backend::SourceRequest {
        d7y_backend::SourceRequest {
            url: self.url.clone(),
            headers: self.headers.clone(),
            certificate_chain: self.download.certificate_chain.clone(),
            credentials: self.credentials.clone(),
        }
    }

    /// Lets the origin request use this process's environment credentials: for requests
    /// of this host's own users (the unix socket), never for the network's.
    pub fn local(mut self) -> DownloadPlan {
        self.credentials.allow_environment = true;
        self
    }

    /// Digests the whole content must have: an OCI blob's (from its URL) and the one the
    /// request named.
    pub fn content_digests(&self) -> Vec<Digest> {
        let mut digests = Vec::new();
        if let Some(hex) = d7y_types::id::blob_digest_encoded(self.url.as_str()) {
            if let Ok(d) = format!("sha256:{hex}").parse::<Digest>() {
                digests.push(d);
            }
        }
        if let Some(d) = &self.digest {
            if !digests.contains(d) {
                digests.push(d.clone());
            }
        }
        digests
    }
}

/// The credentials a request carries, as the backend takes them.
pub(crate) fn credentials_of(download: &Download) -> d7y_backend::Credentials {
    let hub = download
        .hugging_face
        .as_ref()
        .map(|h| (h.token.clone(), h.revision.clone(), h.base_url.clone()))
        .or_else(|| {
            download
                .model_scope
                .as_ref()
                .map(|m| (m.token.clone(), m.revision.clone(), m.base_url.clone()))
        })
        .map(|(token, revision, base_url)| d7y_backend::HubAuth {
            token,
            revision,
            base_url,
        });
    d7y_backend::Credentials {
        object_storage: download
            .object_storage
            .as_ref()
            .map(|o| d7y_backend::ObjectStorageAuth {
                region: o.region.clone(),
                endpoint: o.endpoint.clone(),
                access_key_id: o.access_key_id.clone(),
                access_key_secret: o.access_key_secret.clone(),
                session_token: o.session_token.clone(),
                credential_path: o.credential_path.clone(),
                security_token: o.security_token.clone(),
            }),
        hdfs_delegation_token: download
            .hdfs
            .as_ref()
            .and_then(|h| h.delegation_token.clone()),
        hub,
        allow_environment: false,
    }
}

/// The revision that is part of a hub file's task ID (as upstream hashes it): the request's,
/// or the hub's default branch.
fn revision_of(download: &Download, url: &url::Url) -> Option<String> {
    let given = match url.scheme() {
        "hf" => download.hugging_face.as_ref().map(|h| h.revision.clone()),
        "modelscope" => download.model_scope.as_ref().map(|m| m.revision.clone()),
        _ => return None,
    };
    let default = if url.scheme() == "hf" {
        "main"
    } else {
        "master"
    };
    Some(
        given
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| default.to_string()),
    )
}

/// Owns every task run of this daemon.
pub struct TaskManager {
    pub(crate) config: Arc<Config>,
    pub(crate) storage: Storage,
    pub(crate) backend: Backend,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) download_bandwidth: Bandwidth,
    pub(crate) source_bandwidth: Bandwidth,
    pub(crate) host: Arc<HostInfo>,
    /// `None` runs standalone: every download goes back to source.
    pub(crate) schedulers: Option<Arc<Schedulers>>,
    /// Pieces arriving from parents, servable before they are whole.
    pub(crate) flights: Arc<crate::relay::Flights>,
    /// Mutual TLS towards other peers (`upload.client`), when configured.
    pub(crate) peer_tls: Option<Arc<d7y_net::ClientTls>>,
    running: Mutex<HashMap<String, Arc<TaskRun>>>,
}

impl TaskManager {
    pub fn new(
        config: Arc<Config>,
        storage: Storage,
        backend: Backend,
        metrics: Arc<Metrics>,
        host: Arc<HostInfo>,
        schedulers: Option<Arc<Schedulers>>,
    ) -> TaskManager {
        TaskManager {
            download_bandwidth: Bandwidth::new(config.download.bandwidth_limit.as_u64()),
            source_bandwidth: Bandwidth::new(
                config.download.back_to_source_bandwidth_limit.as_u64(),
            ),
            config,
            storage,
            backend,
            metrics,
            host,
            // Kept even while empty: a manager may name schedulers later.
            schedulers,
            flights: Arc::default(),
            peer_tls: None,
            running: Mutex::default(),
        }
    }

    /// Uses mutual TLS towards other peers' upload and piece servers.
    pub fn with_peer_tls(mut self, tls: Option<Arc<d7y_net::ClientTls>>) -> TaskManager {
        self.peer_tls = tls;
        self
    }

    /// How to reach another peer's upload service.
    pub(crate) fn peer_channel_options(&self) -> d7y_net::ChannelOptions {
        d7y_net::ChannelOptions {
            tls: self.peer_tls.clone(),
            local: None,
            connect_timeout: Some(Duration::from_secs(3)),
            keepalive: Some((Duration::from_secs(10), Duration::from_secs(5))),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The files under a directory URL (object store prefix, HDFS directory, hub repo), for
    /// a recursive download. `local`: asked on the unix socket.
    pub async fn list_entries(
        &self,
        request: &dragonfly_api::dfdaemon::v2::ListTaskEntriesRequest,
        local: bool,
    ) -> Result<Vec<d7y_backend::Entry>, TaskError> {
        let url = url::Url::parse(&request.url).map_err(|e| {
            TaskError::InvalidArgument(format!("malformed URL {:?}: {e}", request.url))
        })?;
        if request.request_header.len() > 256 || request.certificate_chain.len() > MAX_CERTIFICATES
        {
            return Err(TaskError::InvalidArgument(
                "too many request headers or certificates".into(),
            ));
        }
        // The credential fields are Download's; reuse its mapping.
        let as_download = Download {
            object_storage: request.object_storage.clone(),
            hdfs: request.hdfs.clone(),
            hugging_face: request.hugging_face.clone(),
            model_scope: request.model_scope.clone(),
            ..Default::default()
        };
        let mut credentials = credentials_of(&as_download);
        credentials.allow_environment = local;
        let mut headers: Vec<(String, String)> = request
            .request_header
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        headers.sort();
        let source = d7y_backend::SourceRequest {
            url,
            headers,
            certificate_chain: request.certificate_chain.clone(),
            credentials,
        };
        let timeout = request
            .timeout
            .as_ref()
            .and_then(proto_duration)
            .filter(|d| !d.is_zero())
            .unwrap_or(Duration::from_secs(120))
            .min(Duration::from_secs(3600));
        Ok(self.backend.list(&source, timeout).await?)
    }

    /// Validates a request and derives its task ID.
    pub fn plan(&self, download: &Download) -> Result<DownloadPlan, TaskError> {
        let url = url::Url::parse(&download.url).map_err(|e| {
            TaskError::InvalidArgument(format!("malformed URL {:?}: {e}", download.url))
        })?;
        if !d7y_backend::supported_schemes().contains(&url.scheme()) {
            return Err(TaskError::InvalidArgument(format!(
                "unsupported URL scheme {:?} in {}: supported are {}",
                url.scheme(),
                download.url,
                d7y_backend::supported_schemes().join(", ")
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(TaskError::InvalidArgument(format!(
                "URL {} has no host",
                download.url
            )));
        }
        self.backend.policy().check_url(&url)?;
        if download.range.is_some() {
            return Err(TaskError::InvalidArgument(
                "range downloads are not supported yet; download the whole file".into(),
            ));
        }
        let mut headers: Vec<(String, String)> = download
            .request_header
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        headers.sort();
        if headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("range")) {
            return Err(TaskError::InvalidArgument(
                "a Range request header is not supported yet; download the whole file".into(),
            ));
        }
        if download.certificate_chain.len() > MAX_CERTIFICATES
            || download
                .certificate_chain
                .iter()
                .any(|c| c.len() > MAX_CERTIFICATE_BYTES)
        {
            return Err(TaskError::InvalidArgument(format!(
                "certificate_chain holds at most {MAX_CERTIFICATES} certificates of at most {MAX_CERTIFICATE_BYTES} bytes"
            )));
        }
        let piece_length = download
            .piece_length
            .map(validate_piece_length)
            .transpose()
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let digest = download
            .digest
            .as_deref()
            .filter(|d| !d.is_empty())
            .map(str::parse::<Digest>)
            .transpose()
            .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let output_path = match download.output_path.as_deref().filter(|p| !p.is_empty()) {
            Some(p) => {
                let path = PathBuf::from(p);
                if !path.is_absolute() {
                    return Err(TaskError::InvalidArgument(format!(
                        "output path {p:?} must be absolute"
                    )));
                }
                Some(path)
            }
            None => None,
        };
        let filtered = if download.filtered_query_params.is_empty() {
            default_filtered_query_params()
        } else {
            download.filtered_query_params.clone()
        };
        let id = task_id(&TaskIdParams {
            url: &download.url,
            piece_length: download.piece_length,
            tag: download.tag.as_deref(),
            application: download.application.as_deref(),
            filtered_query_params: &filtered,
            revision: revision_of(download, &url).as_deref(),
            content_for_calculating_task_id: download.content_for_calculating_task_id.as_deref(),
            enable_task_id_based_blob_digest: download.enable_task_id_based_blob_digest,
        })
        .map_err(|e| TaskError::InvalidArgument(e.to_string()))?;
        let timeout = download
            .timeout
            .as_ref()
            .and_then(proto_duration)
            .filter(|d| !d.is_zero());
        Ok(DownloadPlan {
            task_id: id,
            url,
            headers,
            piece_length,
            digest,
            output_path,
            force_hard_link: download.force_hard_link,
            overwrite: download.overwrite,
            disable_back_to_source: download.disable_back_to_source,
            timeout,
            tag: download.tag.clone().unwrap_or_default(),
            application: download.application.clone().unwrap_or_default(),
            priority: download.priority,
            need_piece_content: download.need_piece_content,
            download: download.clone(),
            credentials: credentials_of(download),
        })
    }

    /// Joins the running download of the task, or answers from storage, or starts one.
    pub async fn start(self: &Arc<Self>, plan: &DownloadPlan) -> Result<Arc<TaskRun>, TaskError> {
        if let Some(run) = self.running_run(&plan.task_id) {
            return Ok(run);
        }
        if let Some(run) = self.finished_run(&plan.task_id).await? {
            return Ok(run);
        }
        let run = {
            let mut running = self.running.lock().expect("running lock");
            if let Some(run) = running.get(&plan.task_id) {
                return Ok(run.clone());
            }
            let run = Arc::new(TaskRun::new(plan.task_id.clone()));
            running.insert(plan.task_id.clone(), run.clone());
            run
        };
        let manager = self.clone();
        let plan = plan.clone();
        let spawned = run.clone();
        tokio::spawn(async move { manager.drive(spawned, plan).await });
        Ok(run)
    }

    /// The run of a task being downloaded now, if any.
    pub fn running_run(&self, task_id: &str) -> Option<Arc<TaskRun>> {
        self.running
            .lock()
            .expect("running lock")
            .get(task_id)
            .cloned()
    }

    /// A completed run built from storage when the task is finished there.
    pub async fn finished_run(&self, task_id: &str) -> Result<Option<Arc<TaskRun>>, TaskError> {
        let Some(meta) = self.storage.task(task_id).await? else {
            return Ok(None);
        };
        if !meta.is_finished() || !self.storage.content_path(task_id)?.exists() {
            return Ok(None);
        }
        // A task from before a restart is served only once its bytes match its CRCs.
        let bad = self.storage.verify_task(task_id).await?;
        if !bad.is_empty() {
            warn!(task_id, pieces = ?bad, "stored pieces lost their bytes; downloading them again");
            return Ok(None);
        }
        let Some(mut meta) = self.storage.task(task_id).await? else {
            return Ok(None);
        };
        let pieces = self.storage.pieces(task_id).await?;
        let expected =
            d7y_types::PieceLayout::new(meta.content_length.unwrap_or_default(), meta.piece_length)
                .piece_count() as usize;
        if pieces.len() != expected {
            warn!(
                task_id,
                have = pieces.len(),
                expected,
                "finished task lost pieces, downloading again"
            );
            return Ok(None);
        }
        meta.accessed_at = now_secs();
        self.storage.put_task(meta.clone()).await?;
        Ok(Some(Arc::new(TaskRun::completed(&meta, pieces))))
    }

    /// Runs a download to its end and publishes the outcome.
    async fn drive(self: Arc<Self>, run: Arc<TaskRun>, plan: DownloadPlan) {
        let _lease = self.storage.lease(&plan.task_id);
        let started = tokio::time::Instant::now();
        let result = match &self.schedulers {
            // A manager may have handed out no scheduler (yet): that is standalone.
            Some(schedulers) if !schedulers.is_empty() => {
                p2p::download(&self, &run, &plan, schedulers).await
            }
            _ => source::download(&self, &run, &plan).await,
        };
        {
            let mut running = self.running.lock().expect("running lock");
            if running
                .get(&plan.task_id)
                .is_some_and(|r| Arc::ptr_eq(r, &run))
            {
                running.remove(&plan.task_id);
            }
        }
        match &result {
            Ok(()) => {
                let length = run.state().content_length.unwrap_or_default();
                info!(task_id = plan.task_id, url = %plan.url, length, elapsed = ?started.elapsed(), "task finished");
                self.metrics
                    .download_task_duration_milliseconds
                    .with_label_values(&["STANDARD", crate::metrics::task_size_level(length)])
                    .observe(started.elapsed().as_millis() as f64);
            }
            Err(err) => warn!(task_id = plan.task_id, url = %plan.url, %err, "task failed"),
        }
        run.finish(result.map_err(Arc::new));
    }

    /// Records a verified piece: stored, counted (`source` is the metrics' label,
    /// `REMOTE_PEER` or `BACK_TO_SOURCE`) and published to the run's readers.
    pub(crate) async fn record_piece(
        &self,
        run: &TaskRun,
        task_id: &str,
        piece: PieceMeta,
        source: &str,
    ) -> Result<(), StorageError> {
        self.storage.put_piece(task_id, piece.clone()).await?;
        let m = &self.metrics;
        m.download_traffic
            .with_label_values(&[source, "STANDARD"])
            .inc_by(piece.length);
        m.download_piece_total.with_label_values(&[source]).inc();
        m.download_piece_duration_milliseconds
            .with_label_values(&[source])
            .observe(piece.cost_millis as f64);
        run.add_piece(piece);
        Ok(())
    }

    /// Records a task as finished, after checking its content against every digest known
    /// for it (an OCI blob's digest in its URL, the digest the request named). Content that
    /// does not match is deleted and the download fails: it never counts as finished and is
    /// never served again.
    pub(crate) async fn mark_finished(
        &self,
        plan: &DownloadPlan,
        mut meta: TaskMeta,
    ) -> Result<(), TaskError> {
        for expected in plan.content_digests() {
            let path = self.storage.content_path(&plan.task_id)?;
            let check = expected.clone();
            let actual = tokio::task::spawn_blocking(move || output::file_digest(&path, &check))
                .await
                .map_err(|e| TaskError::Internal(e.to_string()))?
                .map_err(|e| {
                    TaskError::Internal(format!("reading the content to verify it: {e}"))
                })?;
            if actual != expected {
                warn!(
                    task_id = plan.task_id,
                    url = %plan.url,
                    %expected,
                    %actual,
                    "content does not match its digest; deleting it"
                );
                self.storage.delete_task(&plan.task_id).await?;
                if let Some(schedulers) = &self.schedulers {
                    let _ = schedulers.forget_task(&plan.task_id).await;
                }
                return Err(TaskError::DigestMismatch {
                    url: plan.url.to_string(),
                    expected: expected.to_string(),
                    actual: actual.to_string(),
                });
            }
        }
        meta.finished_at = Some(now_secs());
        meta.accessed_at = now_secs();
        self.storage.put_task(meta).await?;
        Ok(())
    }

    /// Deletes a task unless it is in use.
    pub async fn delete(&self, task_id: &str) -> Result<(), TaskError> {
        if self.running_run(task_id).is_some() || self.storage.is_leased(task_id) {
            return Err(TaskError::InvalidArgument(format!(
                "task {task_id} is in use; try again when its download has finished"
            )));
        }
        if self.storage.task(task_id).await?.is_none() {
            return Err(TaskError::NotFound(task_id.to_string()));
        }
        self.storage.delete_task(task_id).await?;
        if let Some(schedulers) = &self.schedulers {
            if let Err(err) = schedulers.forget_task(task_id).await {
                warn!(task_id, %err, "could not tell the scheduler the task was deleted");
            }
        }
        Ok(())
    }
}

/// A protobuf duration as a std duration; `None` when negative.
fn proto_duration(d: &prost_wkt_types::Duration) -> Option<Duration> {
    (d.seconds >= 0 && d.nanos >= 0).then(|| Duration::new(d.seconds as u64, d.nanos as u32))
}
