//! `dfdaemon.v2.DfdaemonUpload` on TCP, for other peers and the scheduler.

use super::download::{delete_impl, list_entries_impl, stat_local_impl, stat_task_impl};
use super::{unimplemented, BoxStream};
use crate::host::{HostInfo, Traffic};
use crate::task::{RunState, TaskManager};
use d7y_storage::PieceMeta;
use dragonfly_api::common::v2::{
    CacheTask, Download, Host, PersistentCacheTask, PersistentTask, Task,
};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_server::DfdaemonUpload;
use dragonfly_api::dfdaemon::v2::*;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// Refuses the parts of a download that only a local user may ask for: writing a file at
/// a path of the caller's choice (`output_path`, `overwrite`, `force_hard_link`) and piece
/// content streamed back over gRPC (`need_piece_content`, which a caller need not read).
pub(crate) fn check_remote(download: &Download) -> Result<(), Status> {
    let refused = [
        (download.output_path.is_some(), "output_path"),
        (download.overwrite, "overwrite"),
        (download.force_hard_link, "force_hard_link"),
        (download.need_piece_content, "need_piece_content"),
    ];
    if let Some((_, field)) = refused.iter().find(|(set, _)| *set) {
        return Err(Status::permission_denied(format!(
            "{field} is a local-only option: it is accepted only on the dfdaemon's unix socket, \
             not from the network"
        )));
    }
    Ok(())
}

/// The IDs of a SyncPieces request, checked before they reach a map (the super-seeding
/// slots are keyed by host).
fn check_sync_request(task_id: &str, host_id: &str) -> Result<(), Status> {
    if !d7y_types::is_task_id(task_id) {
        return Err(Status::invalid_argument(
            "task_id must be 64 lowercase hex characters",
        ));
    }
    if host_id.is_empty() || host_id.len() > 512 || !host_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Status::invalid_argument(
            "host_id must be 1 to 512 printable ASCII characters",
        ));
    }
    Ok(())
}

/// How often SyncHost reports.
const SYNC_HOST_INTERVAL: Duration = Duration::from_secs(1);

/// A child's place in a seed's dealing, released when its SyncPieces stream ends: as a
/// departure (the pieces dealt to the child are freed), unless the stream ended because
/// the child was told everything it asked about (`told_everything`: its deals stand).
struct Slot {
    seed: Arc<crate::superseed::SuperSeed>,
    task_id: String,
    host_id: String,
    told_everything: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.told_everything {
            self.seed.told_everything(&self.task_id, &self.host_id);
        } else {
            self.seed.leave(&self.task_id, &self.host_id);
        }
    }
}

/// What one SyncPieces stream tells its child, and when. A piece is announced once it
/// starts arriving here (it is relayed as it arrives) and again once stored, in case the
/// child asked for it while a fetch of it failed and dropped it from what this peer offers.
/// On a seed peer both go through its dealer: a piece held back from this child is asked
/// for again until it goes.
struct Announcer {
    /// Interesting pieces not yet announced as stored; the stream ends when none is left.
    wanted: Option<HashSet<u32>>,
    /// Seed peers only.
    slot: Option<Slot>,
    /// Stored pieces looked at so far (`RunState::pieces` only grows).
    stored_seen: usize,
    /// Arriving pieces looked at so far (`RunState::arriving` only grows).
    arriving_seen: usize,
    announced_arriving: HashSet<u32>,
    /// Stored pieces the dealer holds back from this child.
    deferred: Vec<PieceMeta>,
}

impl Announcer {
    fn new(wanted: Option<HashSet<u32>>, slot: Option<Slot>) -> Announcer {
        Announcer {
            wanted,
            slot,
            stored_seen: 0,
            arriving_seen: 0,
            announced_arriving: HashSet::new(),
            deferred: Vec::new(),
        }
    }

    /// When the dealer lets this child hear of piece `number` (`None`: now; always now on
    /// a peer that is not a seed).
    fn release_at(&self, number: u32, piece_count: Option<u32>) -> Option<std::time::Instant> {
        let slot = self.slot.as_ref()?;
        slot.seed
            .release_at(&slot.task_id, &slot.host_id, number, piece_count)
    }

    /// The pieces to announce now, and the earliest time a held-back one may go.
    fn step(&mut self, state: &RunState) -> (Vec<PieceMeta>, Option<std::time::Instant>) {
        let mut ready = Vec::new();
        // A seed deals arriving pieces like stored ones: one it holds back from this child
        // is announced once stored and released. Announced as they arrived, the pieces a
        // seed was still fetching from the origin when a child connected bypassed the
        // dealer, and a child could take a copy of one from the seed at any time.
        for piece in &state.arriving[self.arriving_seen..] {
            let n = piece.number;
            let open = self.wanted.as_ref().is_none_or(|w| w.contains(&n));
            if open && !self.announced_arriving.contains(&n) && self.release_at(n, None).is_none() {
                self.announced_arriving.insert(n);
                ready.push(piece.clone());
            }
        }
        self.arriving_seen = state.arriving.len();
        for piece in &state.pieces[self.stored_seen..] {
            if let Some(w) = &mut self.wanted {
                if !w.remove(&piece.number) {
                    continue;
                }
            }
            self.deferred.push(piece.clone());
        }
        self.stored_seen = state.pieces.len();
        let piece_count = state.piece_count().filter(|_| state.outcome.is_some());
        let mut next_due: Option<std::time::Instant> = None;
        let mut held = Vec::new();
        for piece in std::mem::take(&mut self.deferred) {
            match self.release_at(piece.number, piece_count) {
                None => ready.push(piece),
                Some(at) => {
                    next_due = Some(next_due.map_or(at, |n| n.min(at)));
                    held.push(piece);
                }
            }
        }
        self.deferred = held;
        (ready, next_due)
    }

    /// Every interesting piece was announced as stored.
    fn wants_nothing(&self) -> bool {
        self.wanted.as_ref().is_some_and(HashSet::is_empty) && self.deferred.is_empty()
    }

    /// Stored pieces are held back from this child still.
    fn holds_back(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// The stream ends because the child was told everything there is for it: on a seed,
    /// its deals stand when its slot is released.
    fn told_everything(&mut self) {
        if let Some(slot) = &mut self.slot {
            slot.told_everything = true;
        }
    }
}

pub struct UploadService {
    pub manager: Arc<TaskManager>,
    pub host: Arc<HostInfo>,
    pub traffic: Arc<Traffic>,
    /// Seed peers only: who hears of a new piece first.
    pub super_seed: Option<Arc<crate::superseed::SuperSeed>>,
    /// The manager and schedulers: the only network callers that may delete a task.
    pub control: Arc<crate::dynconfig::ControlPlane>,
}

#[tonic::async_trait]
impl DfdaemonUpload for UploadService {
    type DownloadTaskStream = BoxStream<DownloadTaskResponse>;

    /// What the scheduler asks of a seed peer (and a preheat of any peer): download a task
    /// into this daemon's own storage. Placing the output anywhere, streaming piece
    /// content back, and similar local powers are refused here (see [`check_remote`]).
    async fn download_task(
        &self,
        request: Request<DownloadTaskRequest>,
    ) -> Result<Response<Self::DownloadTaskStream>, Status> {
        let request = request.into_inner();
        if let Some(download) = &request.download {
            check_remote(download)?;
        }
        super::download_task(&self.manager, &self.host, request, false).await
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

    /// Lists with the request's own credentials only (never this host's environment's).
    async fn list_task_entries(
        &self,
        request: Request<ListTaskEntriesRequest>,
    ) -> Result<Response<ListTaskEntriesResponse>, Status> {
        list_entries_impl(&self.manager, &request.into_inner(), false).await
    }

    /// Only the control plane (the manager's delete_task job, a scheduler) may delete a
    /// task over the network; a stranger cannot empty this host's cache.
    async fn delete_task(
        &self,
        request: Request<DeleteTaskRequest>,
    ) -> Result<Response<()>, Status> {
        let caller = request.remote_addr().map(|a| a.ip());
        if !caller.is_some_and(|ip| self.control.trusts(ip)) {
            return Err(Status::permission_denied(
                "DeleteTask over the network is served only to this dfdaemon's manager and \
                 schedulers; use the local unix socket",
            ));
        }
        let task_id = request.into_inner().task_id;
        if !d7y_types::is_task_id(&task_id) {
            return Err(Status::invalid_argument(
                "task_id must be 64 lowercase hex characters",
            ));
        }
        tracing::info!(task_id, caller = ?caller, "task deleted on the control plane's request");
        delete_impl(&self.manager, &task_id).await?;
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
        check_sync_request(&task_id, &request.host_id)?;
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
        let wanted: Option<HashSet<u32>> = (!request.interested_piece_numbers.is_empty())
            .then(|| request.interested_piece_numbers.into_iter().collect());
        let ip = self.host.ip.to_string();
        let port = self.host.piece_port as i32;
        let (tx, rx) = mpsc::channel(256);
        let slot = self.super_seed.clone().map(|seed| {
            seed.join(&task_id, &request.host_id);
            Slot {
                seed,
                task_id: task_id.clone(),
                host_id: request.host_id.clone(),
                told_everything: false,
            }
        });
        let mut announcer = Announcer::new(wanted, slot);
        tokio::spawn(async move {
            let message = |piece: &PieceMeta| SyncPiecesResponse {
                number: piece.number,
                offset: piece.offset,
                length: piece.length,
                ip: ip.clone(),
                tcp_port: Some(port),
                quic_port: None,
            };
            let mut watch = run.subscribe();
            loop {
                let state = watch.borrow_and_update().clone();
                let (ready, next_due) = announcer.step(&state);
                for piece in &ready {
                    if tx.send(Ok(message(piece))).await.is_err() {
                        return;
                    }
                }
                if announcer.wants_nothing() {
                    announcer.told_everything();
                    return;
                }
                match &state.outcome {
                    Some(Ok(())) if !announcer.holds_back() => {
                        announcer.told_everything();
                        return;
                    }
                    Some(Ok(())) => {}
                    Some(Err(err)) => {
                        let _ = tx.send(Err(err.to_status())).await;
                        return;
                    }
                    None => {}
                }
                let done = state.outcome.is_some();
                // Held-back pieces are re-checked often: serving one releases it early.
                let wake = next_due.map(|d| {
                    tokio::time::Instant::from_std(d)
                        .min(tokio::time::Instant::now() + Duration::from_millis(200))
                });
                tokio::select! {
                    // The child went away (finished, rescheduled or died) while nothing was
                    // being sent: end now, so a seed's slot for it is released.
                    _ = tx.closed() => return,
                    changed = watch.changed(), if !done => if changed.is_err() { return },
                    _ = async {
                        match wake {
                            Some(at) => tokio::time::sleep_until(at).await,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::superseed::SuperSeed;

    const TASK: &str = "t";

    fn pieces(numbers: &[u32]) -> Arc<Vec<PieceMeta>> {
        let meta = |n: u32| PieceMeta::new(n, u64::from(n) << 22, 4 << 20, "crc32:0".into());
        Arc::new(numbers.iter().copied().map(meta).collect())
    }

    fn state(arriving: &[u32], stored: &[u32]) -> RunState {
        RunState {
            arriving: pieces(arriving),
            pieces: pieces(stored),
            ..RunState::default()
        }
    }

    fn child(seed: &Arc<SuperSeed>, host: &str) -> Announcer {
        seed.join(TASK, host);
        let slot = Slot {
            seed: seed.clone(),
            task_id: TASK.into(),
            host_id: host.into(),
            told_everything: false,
        };
        Announcer::new(None, Some(slot))
    }

    fn numbers(step: (Vec<PieceMeta>, Option<std::time::Instant>)) -> Vec<u32> {
        step.0.iter().map(|p| p.number).collect()
    }

    #[test]
    fn a_seed_announces_an_arriving_piece_only_to_the_child_it_deals_it_to() {
        let seed = Arc::new(SuperSeed::default());
        let (mut a, mut b) = (child(&seed, "a"), child(&seed, "b"));
        // a is dealt the first two arriving pieces (as many as a child may have waiting),
        // b the third; neither hears of the other's.
        let arriving = state(&[0, 1, 2], &[]);
        assert_eq!(numbers(a.step(&arriving)), [0, 1]);
        assert_eq!(numbers(b.step(&arriving)), [2]);
        // Stored, each is announced again to its own child only; the rest are held back.
        let stored = state(&[0, 1, 2], &[0, 1, 2]);
        let step = a.step(&stored);
        assert!(step.1.is_some() && a.holds_back(), "2 is b's");
        assert_eq!(numbers(step), [0, 1]);
        assert_eq!(numbers(b.step(&stored)), [2]);
        assert!(b.holds_back());
        // a's stream ends (the child finished or went away): what was dealt to it is
        // everyone's now.
        drop(a);
        assert_eq!(numbers(b.step(&stored)), [0, 1]);
        assert!(!b.holds_back());
    }

    #[test]
    fn a_seed_child_told_everything_it_asked_for_keeps_its_deals() {
        let seed = Arc::new(SuperSeed::default());
        let (mut a, mut b) = (child(&seed, "a"), child(&seed, "b"));
        let _c = child(&seed, "c"); // with a lone child left, it would take everything
        let stored = state(&[], &[0, 1, 2]);
        assert_eq!(numbers(a.step(&stored)), [0, 1]);
        assert_eq!(numbers(b.step(&stored)), [2]);
        // a's stream ends having told a everything it asked about (a narrower stream): a
        // is fetching 0 and 1, so b still does not hear of them.
        a.told_everything();
        drop(a);
        let step = b.step(&stored);
        assert!(numbers(step).is_empty() && b.holds_back());
    }

    #[test]
    fn a_peer_announces_the_wanted_pieces_arriving_and_stored_then_nothing_is_left() {
        let mut child = Announcer::new(Some(HashSet::from([1, 2])), None);
        assert_eq!(numbers(child.step(&state(&[0, 1], &[]))), [1]);
        assert_eq!(numbers(child.step(&state(&[0, 1], &[0, 1]))), [1]);
        assert!(!child.wants_nothing(), "2 is still wanted");
        // A retried fetch of 1 appears again as arriving: announced once only.
        assert_eq!(numbers(child.step(&state(&[0, 1, 1, 2], &[0, 1]))), [2]);
        assert_eq!(numbers(child.step(&state(&[0, 1, 1, 2], &[0, 1, 2]))), [2]);
        assert!(child.wants_nothing());
    }
}
