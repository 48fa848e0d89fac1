//! `dfdaemon.v2.DfdaemonUpload` on TCP, for other peers and the scheduler.

use super::download::{delete_impl, stat_local_impl, stat_task_impl};
use super::{unimplemented, BoxStream};
use crate::host::{HostInfo, Traffic};
use crate::task::TaskManager;
use dragonfly_api::common::v2::{CacheTask, Host, PersistentCacheTask, PersistentTask, Task};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::DfdaemonUpload;
use dragonfly_api::dfdaemon::v2::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How often SyncHost reports.
const SYNC_HOST_INTERVAL: Duration = Duration::from_secs(1);

pub struct UploadService {
    pub manager: Arc<TaskManager>,
    pub host: Arc<HostInfo>,
    pub traffic: Arc<Traffic>,
    /// Children syncing each task (seed peers only): who hears of a new piece first.
    pub super_seed: Arc<SuperSeed>,
}

/// How long a seed peer keeps a fresh piece to the one child it designated, before offering
/// it to every child. Meanwhile the other children take it from that child: the seed's upload
/// goes to distinct pieces (super-seeding) instead of the same piece N times.
pub const SUPER_SEED_DELAY: Duration = Duration::from_millis(3000);

/// The children syncing each task from this seed peer, in arrival order.
#[derive(Default)]
pub struct SuperSeed {
    children: std::sync::Mutex<std::collections::HashMap<String, Vec<u64>>>,
    next: std::sync::atomic::AtomicU64,
}

impl SuperSeed {
    fn join(self: &Arc<Self>, task_id: &str) -> SuperSeedSlot {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.children
            .lock()
            .expect("super seed")
            .entry(task_id.to_string())
            .or_default()
            .push(id);
        SuperSeedSlot {
            owner: self.clone(),
            task_id: task_id.to_string(),
            id,
        }
    }

    /// Whether piece `number` goes to child `id` first: pieces are dealt round-robin.
    fn designated(&self, task_id: &str, number: u32, id: u64) -> bool {
        let children = self.children.lock().expect("super seed");
        match children.get(task_id) {
            Some(c) if !c.is_empty() => c[number as usize % c.len()] == id,
            _ => true,
        }
    }
}

/// A child's place in [`SuperSeed`]; leaves when dropped.
struct SuperSeedSlot {
    owner: Arc<SuperSeed>,
    task_id: String,
    id: u64,
}

impl Drop for SuperSeedSlot {
    fn drop(&mut self) {
        let mut children = self.owner.children.lock().expect("super seed");
        if let Some(c) = children.get_mut(&self.task_id) {
            c.retain(|x| *x != self.id);
            if c.is_empty() {
                children.remove(&self.task_id);
            }
        }
    }
}

#[tonic::async_trait]
impl DfdaemonUpload for UploadService {
    type DownloadTaskStream = BoxStream<DownloadTaskResponse>;

    async fn download_task(
        &self,
        request: Request<DownloadTaskRequest>,
    ) -> Result<Response<Self::DownloadTaskStream>, Status> {
        super::download_task(&self.manager, &self.host, request.into_inner()).await
    }

    async fn stat_task(&self, request: Request<StatTaskRequest>) -> Result<Response<Task>, Status> {
        Ok(Response::new(
            stat_task_impl(&self.manager, &request.into_inner().task_id).await?,
        ))
    }

    async fn stat_local_task(
        &self,
        request: Request<StatLocalTaskRequest>,
    ) -> Result<Response<StatLocalTaskResponse>, Status> {
        Ok(Response::new(
            stat_local_impl(&self.manager, &request.into_inner().task_id).await?,
        ))
    }

    async fn list_task_entries(
        &self,
        _request: Request<ListTaskEntriesRequest>,
    ) -> Result<Response<ListTaskEntriesResponse>, Status> {
        Err(unimplemented("ListTaskEntries"))
    }

    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<()>, Status> {
        delete_impl(&self.manager, &request.into_inner().task_id).await?;
        Ok(Response::new(()))
    }

    type SyncPiecesStream = BoxStream<SyncPiecesResponse>;

    /// Streams where each (interesting) piece can be fetched over Vortex, as soon as it is
    /// available here, until all of them were sent or the task ends.
    async fn sync_pieces(
        &self,
        request: Request<SyncPiecesRequest>,
    ) -> Result<Response<Self::SyncPiecesStream>, Status> {
        let request = request.into_inner();
        let task_id = request.task_id;
        let run = match self.manager.running_run(&task_id) {
            Some(run) => run,
            None => self
                .manager
                .finished_run(&task_id)
                .await
                .map_err(|e| e.to_status())?
                .ok_or_else(|| {
                    Status::not_found(format!("task {task_id} is not available on this peer"))
                })?,
        };
        if self.host.disable_shared {
            return Err(Status::permission_denied(
                "this peer does not share its tasks",
            ));
        }
        let mut wanted: Option<HashSet<u32>> = (!request.interested_piece_numbers.is_empty())
            .then(|| request.interested_piece_numbers.into_iter().collect());
        let ip = self.host.ip.to_string();
        let port = self.host.piece_port as i32;
        let (tx, rx) = mpsc::channel(256);
        let slot = (self.host.host_type != 0).then(|| self.super_seed.join(&task_id));
        tokio::spawn(async move {
            let message = |piece: &d7y_storage::PieceMeta| SyncPiecesResponse {
                number: piece.number,
                offset: piece.offset,
                length: piece.length,
                ip: ip.clone(),
                tcp_port: Some(port),
                quic_port: None,
            };
            let mut watch = run.subscribe();
            let mut sent = 0usize;
            // Pieces held back for other children first, with when they are due.
            let mut deferred: std::collections::VecDeque<(
                tokio::time::Instant,
                d7y_storage::PieceMeta,
            )> = std::collections::VecDeque::new();
            // A child arriving after the seed finished gets everything at once; one that
            // was there while pieces arrived keeps getting non-designated ones late, also
            // after the seed finishes, so it keeps taking them from its other parents.
            let finished_at_start = watch.borrow().outcome.is_some();
            loop {
                let state = watch.borrow_and_update().clone();
                for piece in &state.pieces[sent..] {
                    if let Some(w) = &mut wanted {
                        if !w.remove(&piece.number) {
                            continue;
                        }
                    }
                    let first = match &slot {
                        Some(slot) if !finished_at_start => {
                            slot.owner.designated(&task_id, piece.number, slot.id)
                        }
                        _ => true,
                    };
                    if !first {
                        deferred.push_back((
                            tokio::time::Instant::now() + SUPER_SEED_DELAY,
                            piece.clone(),
                        ));
                        continue;
                    }
                    if tx.send(Ok(message(piece))).await.is_err() {
                        return;
                    }
                }
                sent = state.pieces.len();
                let now = tokio::time::Instant::now();
                while deferred.front().is_some_and(|(due, _)| *due <= now) {
                    let (_, piece) = deferred.pop_front().expect("non-empty");
                    if tx.send(Ok(message(&piece))).await.is_err() {
                        return;
                    }
                }
                if wanted.as_ref().is_some_and(HashSet::is_empty) && deferred.is_empty() {
                    return;
                }
                match &state.outcome {
                    Some(Ok(())) if deferred.is_empty() => return,
                    Some(Ok(())) => {}
                    Some(Err(err)) => {
                        let _ = tx.send(Err(err.to_status())).await;
                        return;
                    }
                    None => {}
                }
                let next_due = deferred.front().map(|(due, _)| *due);
                let done = state.outcome.is_some();
                tokio::select! {
                    changed = watch.changed(), if !done => if changed.is_err() { return },
                    _ = async {
                        match next_due {
                            Some(due) => tokio::time::sleep_until(due).await,
                            None => std::future::pending().await,
                        }
                    } => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type DownloadCacheTaskStream = BoxStream<DownloadCacheTaskResponse>;

    async fn download_cache_task(
        &self,
        _request: Request<DownloadCacheTaskRequest>,
    ) -> Result<Response<Self::DownloadCacheTaskStream>, Status> {
        Err(unimplemented("DownloadCacheTask"))
    }

    async fn stat_cache_task(
        &self,
        _request: Request<StatCacheTaskRequest>,
    ) -> Result<Response<CacheTask>, Status> {
        Err(unimplemented("StatCacheTask"))
    }

    async fn delete_cache_task(
        &self,
        _request: Request<DeleteCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeleteCacheTask"))
    }

    type SyncCachePiecesStream = BoxStream<SyncCachePiecesResponse>;

    async fn sync_cache_pieces(
        &self,
        _request: Request<SyncCachePiecesRequest>,
    ) -> Result<Response<Self::SyncCachePiecesStream>, Status> {
        Err(unimplemented("SyncCachePieces"))
    }

    async fn download_cache_piece(
        &self,
        _request: Request<DownloadCachePieceRequest>,
    ) -> Result<Response<DownloadCachePieceResponse>, Status> {
        Err(unimplemented("DownloadCachePiece"))
    }

    type DownloadPersistentTaskStream = BoxStream<DownloadPersistentTaskResponse>;

    async fn download_persistent_task(
        &self,
        _request: Request<DownloadPersistentTaskRequest>,
    ) -> Result<Response<Self::DownloadPersistentTaskStream>, Status> {
        Err(unimplemented("DownloadPersistentTask"))
    }

    type SyncPersistentPiecesStream = BoxStream<SyncPersistentPiecesResponse>;

    async fn sync_persistent_pieces(
        &self,
        _request: Request<SyncPersistentPiecesRequest>,
    ) -> Result<Response<Self::SyncPersistentPiecesStream>, Status> {
        Err(unimplemented("SyncPersistentPieces"))
    }

    async fn update_persistent_task(
        &self,
        _request: Request<UpdatePersistentTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("UpdatePersistentTask"))
    }

    async fn stat_persistent_task(
        &self,
        _request: Request<StatPersistentTaskRequest>,
    ) -> Result<Response<PersistentTask>, Status> {
        Err(unimplemented("StatPersistentTask"))
    }

    async fn delete_persistent_task(
        &self,
        _request: Request<DeletePersistentTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeletePersistentTask"))
    }

    type DownloadPersistentCacheTaskStream = BoxStream<DownloadPersistentCacheTaskResponse>;

    async fn download_persistent_cache_task(
        &self,
        _request: Request<DownloadPersistentCacheTaskRequest>,
    ) -> Result<Response<Self::DownloadPersistentCacheTaskStream>, Status> {
        Err(unimplemented("DownloadPersistentCacheTask"))
    }

    async fn update_persistent_cache_task(
        &self,
        _request: Request<UpdatePersistentCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("UpdatePersistentCacheTask"))
    }

    async fn stat_persistent_cache_task(
        &self,
        _request: Request<StatPersistentCacheTaskRequest>,
    ) -> Result<Response<PersistentCacheTask>, Status> {
        Err(unimplemented("StatPersistentCacheTask"))
    }

    async fn delete_persistent_cache_task(
        &self,
        _request: Request<DeletePersistentCacheTaskRequest>,
    ) -> Result<Response<()>, Status> {
        Err(unimplemented("DeletePersistentCacheTask"))
    }

    type SyncPersistentCachePiecesStream = BoxStream<SyncPersistentCachePiecesResponse>;

    async fn sync_persistent_cache_pieces(
        &self,
        _request: Request<SyncPersistentCachePiecesRequest>,
    ) -> Result<Response<Self::SyncPersistentCachePiecesStream>, Status> {
        Err(unimplemented("SyncPersistentCachePieces"))
    }

    type SyncHostStream = BoxStream<Host>;

    /// Streams this host's live load (upload/download rates) once a second.
    async fn sync_host(
        &self,
        _request: Request<SyncHostRequest>,
    ) -> Result<Response<Self::SyncHostStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let (host, traffic) = (self.host.clone(), self.traffic.clone());
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(SYNC_HOST_INTERVAL);
            loop {
                ticker.tick().await;
                if tx
                    .send(Ok(crate::host::host_proto(&host, &traffic)))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
