//! Download through the swarm: register with the task's scheduler, then take pieces from
//! several parents at once (SyncPieces for availability, Vortex for bytes), or go back to
//! source when the scheduler says so or is gone.
//!
//! Which piece comes from which parent is [`d7y_picker`]'s decision (rarest first among the
//! parents, the seed only for pieces no normal parent holds, in-flight budgets from each
//! parent's measured rate); this module feeds it the parents' announcements and the
//! fetches' outcomes, and runs the fetches. Every piece is CRC-checked before it is
//! recorded; a parent that sends a bad piece is reported and dropped for this task.

use super::sink::{PieceSink, ReadError};
use super::source::{self, Prepared};
use super::{DownloadPlan, TaskManager, TaskRun};
use crate::error::TaskError;
use crate::grpc::piece_to_proto;
use crate::relay::FlightInfo;
use crate::scheduler::{is_refusal, Announce, AnnounceStream, SchedulerError, Schedulers};
use d7y_picker::{ParentId, Picker, Source};
use d7y_storage::{PieceMeta, StorageError};
use d7y_types::piece::{piece_length_for, MIN_PIECE_LENGTH};
use d7y_types::{Digest, PieceLayout};
use dragonfly_api::common::v2::{Peer, TrafficType};
use dragonfly_api::dfdaemon::v2::dfdaemon_upload_client::DfdaemonUploadClient;
use dragonfly_api::dfdaemon::v2::SyncPiecesRequest;
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Reply;
use dragonfly_api::scheduler::v2::*;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The picker's settings for a download of `layout` with `concurrency` fetches at most.
/// Few pieces in flight per parent, so that each completes soon: k pieces sharing a
/// parent's link each take k piece-times, and a piece is verified (and its last byte
/// relayed, see [`crate::relay`]) only once whole. Two (unmeasured) keep the link busy
/// across the request round trip; measured, a budget covers 0.35 s of the parent's rate
/// (two 4 MiB pieces at 200 Mbit/s, one at 100). The seed gets one while other parents
/// are connected. No endgame duplicates yet: a piece has one flight at a time here.
fn picker_config(layout: PieceLayout, concurrency: usize) -> d7y_picker::Config {
    d7y_picker::Config {
        concurrency,
        piece_length: layout.piece_length.max(1),
        endgame_pieces: 0,
        ..d7y_picker::Config::default()
    }
}
/// Failed pieces before a parent is dropped for this task.
const PARENT_FAILURE_LIMIT: u32 = 3;
/// How often a downloading peer asks the scheduler for a fresher parent set.
const REFRESH_INTERVAL: Duration = Duration::from_millis(500);
/// With the scheduler gone and nothing obtainable from the parents for this long, the rest
/// comes from the origin.
const ORPHAN_STALL: Duration = Duration::from_secs(3);
/// With the scheduler there and no byte arriving from the parents for this long, the
/// parents are reported as failing and new ones asked for (a parent that announces pieces
/// it never sends, or stops answering, must not hold the download).
const PARENT_STALL: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A fetch whose parent sends nothing for this long is abandoned and its piece asked for
/// again: a flow stuck in TCP back-off on a crowded link, or a parent that froze. A relay
/// passes each write on as it arrives, so even a chain of relays is never silent this
/// long while its head is making progress.
const FETCH_SILENCE: Duration = Duration::from_secs(8);
/// How long a finished download waits for the scheduler to close the announce stream (so
/// the last events reach it) before dropping it.
const ANNOUNCE_DRAIN: Duration = Duration::from_secs(2);

/// Whether to bypass the scheduler: upstream sends contents of at most one minimum piece
/// straight to the origin under the AUTO scheduling policy.
fn bypasses_scheduler(plan: &DownloadPlan, content_length: Option<u64>) -> bool {
    plan.download.scheduling_policy == 0
        && !plan.disable_back_to_source
        && content_length.is_some_and(|len| len <= MIN_PIECE_LENGTH)
}

/// Whether the task is an OCI blob named by its digest (its content is verified against
/// the digest before it counts as finished).
fn is_digest_task(plan: &DownloadPlan) -> bool {
    d7y_types::id::blob_digest_encoded(&plan.download.url).is_some_and(|hex| hex == plan.task_id)
}

/// Downloads a task with the help of the schedulers.
pub(super) async fn download(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    schedulers: &Schedulers,
) -> Result<(), TaskError> {
    // An OCI blob the swarm already holds needs nothing from its registry: its bytes are
    // checked against the digest in its URL before the task counts as finished, so the
    // scheduler's word for its length is enough (a preheated image is then served with no
    // request to the registry at all).
    let known = if is_digest_task(plan) {
        schedulers
            .stat_task(&plan.task_id)
            .await
            .filter(|t| t.has_available_peer && t.content_length > MIN_PIECE_LENGTH)
    } else {
        None
    };
    // The origin tells the length (and whether it takes ranges); without it the parents'
    // view of the task does. An origin that answers with an HTTP error is final.
    let probe = if plan.disable_back_to_source || known.is_some() {
        None
    } else {
        match source::probe(mgr, plan).await {
            Ok(p) => Some(p),
            Err(TaskError::Backend(e)) if e.http_status().is_none() => {
                warn!(task_id = plan.task_id, error = %e, "origin unreachable; trying peers");
                None
            }
            Err(e) => return Err(e),
        }
    };
    let content_length = probe
        .as_ref()
        .and_then(|p| p.stat.content_length)
        .or(known.as_ref().map(|t| t.content_length));
    let probe = match probe {
        // Unknown length (cannot be laid out in pieces for peers) or a small file.
        Some(p) if content_length.is_none() || bypasses_scheduler(plan, content_length) => {
            return from_source(mgr, run, plan, None, p, content_length).await;
        }
        other => other,
    };

    let peer_id = schedulers.host().identity.peer_id();
    let piece_length =
        content_length.map(|len| plan.piece_length.unwrap_or_else(|| piece_length_for(len)));
    let mut register = plan.download.clone();
    // Where the output goes is this host's business, not the swarm's.
    register.output_path = None;
    register.overwrite = false;
    register.force_hard_link = false;
    register.need_piece_content = false;
    register.actual_content_length = content_length;
    register.actual_piece_length = piece_length;
    register.actual_piece_count = content_length
        .zip(piece_length)
        .map(|(len, pl)| PieceLayout::new(len, Some(pl)).piece_count() as u64);
    let stream = match schedulers.open(&plan.task_id, &peer_id, register).await {
        Ok(s) => s,
        Err(SchedulerError::Unreachable(tried)) => {
            warn!(
                task_id = plan.task_id,
                tried, "no scheduler reachable, going back to source"
            );
            return match probe {
                Some(probe) => from_source(mgr, run, plan, None, probe, content_length).await,
                None => Err(TaskError::SchedulerUnavailable(tried)),
            };
        }
        Err(e @ SchedulerError::Refused { .. }) => return Err(TaskError::Scheduler(e.to_string())),
    };
    let AnnounceStream {
        announce,
        first,
        mut responses,
    } = stream;
    let result = scheduled(
        mgr,
        run,
        plan,
        probe,
        content_length,
        &announce,
        first,
        &mut responses,
    )
    .await;
    // Close our side and wait for the scheduler to close its: dropping the response stream
    // would reset the HTTP/2 stream and lose the events still queued (a fast seed peer's
    // "finished" among them, after which the scheduler dropped the only complete copy).
    drop(announce);
    let drain = async { while let Ok(Some(_)) = responses.message().await {} };
    let _ = tokio::time::timeout(ANNOUNCE_DRAIN, drain).await;
    result
}

/// The download as the scheduler's first answer directs it, reporting on `announce`.
#[allow(clippy::too_many_arguments)]
async fn scheduled(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    probe: Option<d7y_backend::Probe>,
    content_length: Option<u64>,
    announce: &Announce,
    first: Option<Reply>,
    responses: &mut tonic::Streaming<AnnouncePeerResponse>,
) -> Result<(), TaskError> {
    match first {
        Some(Reply::NormalTaskResponse(NormalTaskResponse { candidate_parents })) => {
            announce.send(Event::DownloadPeerStartedRequest(
                DownloadPeerStartedRequest {},
            ));
            let content_length =
                match content_length.or_else(|| length_from_parents(&candidate_parents)) {
                    Some(len) => len,
                    None => {
                        return Err(TaskError::Internal(
                            "neither the origin nor the parents know the content length".into(),
                        ))
                    }
                };
            let header = probe
                .as_ref()
                .map(|p| p.stat.headers.clone())
                .unwrap_or_default();
            let mut prepared =
                source::prepare(mgr, run, plan, Some(content_length), header).await?;
            let mut engine = Engine::new(mgr, run, plan, &prepared, announce.clone());
            engine.set_parents(candidate_parents);
            match engine.run(responses).await {
                Ok(()) => {
                    announce.send(Event::DownloadPeerFinishedRequest(
                        DownloadPeerFinishedRequest {},
                    ));
                    mgr.mark_finished(plan, prepared.meta).await
                }
                Err(EngineExit::BackToSource { reason, report }) => {
                    drop(engine);
                    info!(task_id = plan.task_id, reason, "finishing from the origin");
                    let probe = probe_again(mgr, plan, probe).await?;
                    let scheduler = report.then_some(announce);
                    source_rest(mgr, run, plan, scheduler, &mut prepared, probe).await?;
                    mgr.mark_finished(plan, prepared.meta).await
                }
                Err(EngineExit::Failed(e)) => {
                    announce.send(Event::DownloadPeerFailedRequest(
                        DownloadPeerFailedRequest {
                            description: Some(e.to_string()),
                        },
                    ));
                    Err(e)
                }
            }
        }
        Some(Reply::NeedBackToSourceResponse(r)) => {
            debug!(
                task_id = plan.task_id,
                description = r.description.as_deref().unwrap_or(""),
                "scheduler: back to source"
            );
            let probe = probe_again(mgr, plan, probe).await?;
            let content_length = probe.stat.content_length;
            from_source(mgr, run, plan, Some(announce), probe, content_length).await
        }
        Some(Reply::EmptyTaskResponse(_)) => {
            let prepared = source::prepare(mgr, run, plan, Some(0), Vec::new()).await?;
            announce.send(Event::DownloadPeerStartedRequest(
                DownloadPeerStartedRequest {},
            ));
            announce.send(Event::DownloadPeerFinishedRequest(
                DownloadPeerFinishedRequest {},
            ));
            mgr.mark_finished(plan, prepared.meta).await
        }
        Some(Reply::MetadataOnlyResponse(_)) | None => {
            // The scheduler is gone or answered nonsense: do the download alone.
            match probe {
                Some(probe) => from_source(mgr, run, plan, None, probe, content_length).await,
                None => Err(TaskError::SchedulerUnavailable(announce.addr.clone())),
            }
        }
    }
}

/// The origin's probe: the one made at the start, or a new one when the origin was
/// unreachable then (its error is the one the user should see if it still is).
async fn probe_again(
    mgr: &TaskManager,
    plan: &DownloadPlan,
    probe: Option<d7y_backend::Probe>,
) -> Result<d7y_backend::Probe, TaskError> {
    if plan.disable_back_to_source {
        return Err(TaskError::BackToSourceDisabled);
    }
    match probe {
        Some(p) => Ok(p),
        None => source::probe(mgr, plan).await,
    }
}

fn length_from_parents(parents: &[Peer]) -> Option<u64> {
    parents
        .iter()
        .filter_map(|p| p.task.as_ref())
        .map(|t| t.content_length)
        .find(|len| *len > 0)
}

/// The whole task from the origin, reporting pieces to the scheduler when there is one.
async fn from_source(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    announce: Option<&Announce>,
    probe: d7y_backend::Probe,
    content_length: Option<u64>,
) -> Result<(), TaskError> {
    if plan.disable_back_to_source {
        return Err(TaskError::BackToSourceDisabled);
    }
    let mut prepared =
        source::prepare(mgr, run, plan, content_length, probe.stat.headers.clone()).await?;
    source_rest(mgr, run, plan, announce, &mut prepared, probe).await?;
    mgr.mark_finished(plan, prepared.meta).await
}

/// Fetches the missing pieces from the origin, forwarding each to the scheduler.
async fn source_rest(
    mgr: &TaskManager,
    run: &TaskRun,
    plan: &DownloadPlan,
    announce: Option<&Announce>,
    prepared: &mut Prepared,
    probe: d7y_backend::Probe,
) -> Result<(), TaskError> {
    if plan.disable_back_to_source {
        return Err(TaskError::BackToSourceDisabled);
    }
    let Some(announce) = announce else {
        return source::transfer(mgr, run, plan, prepared, probe).await;
    };
    announce.send(Event::DownloadPeerBackToSourceStartedRequest(
        DownloadPeerBackToSourceStartedRequest { description: None },
    ));
    let mut watch = run.subscribe();
    let mut reported = watch.borrow().pieces.len();
    let forward = |pieces: &[PieceMeta], from: usize| {
        for p in &pieces[from..] {
            if p.traffic_type == TrafficType::BackToSource as i32 {
                announce.send(Event::DownloadPieceBackToSourceFinishedRequest(
                    DownloadPieceBackToSourceFinishedRequest {
                        piece: Some(piece_to_proto(p)),
                    },
                ));
            }
        }
    };
    let transfer = source::transfer(mgr, run, plan, prepared, probe);
    tokio::pin!(transfer);
    let result = loop {
        tokio::select! {
            r = &mut transfer => break r,
            changed = watch.changed() => {
                if changed.is_err() { continue; }
                let pieces = watch.borrow_and_update().pieces.clone();
                forward(&pieces, reported);
                reported = pieces.len();
            }
        }
    };
    let pieces = run.state().pieces;
    forward(&pieces, reported);
    match &result {
        Ok(()) => announce.send(Event::DownloadPeerBackToSourceFinishedRequest(
            DownloadPeerBackToSourceFinishedRequest {},
        )),
        Err(e) => announce.send(Event::DownloadPeerBackToSourceFailedRequest(
            DownloadPeerBackToSourceFailedRequest {
                description: Some(e.to_string()),
            },
        )),
    }
    result
}

/// Why the engine stopped before having every piece.
enum EngineExit {
    /// The rest comes from the origin; `report` when the scheduler is still there to be
    /// told about it.
    BackToSource {
        reason: String,
        report: bool,
    },
    Failed(TaskError),
}

/// How fetching a piece from a parent failed.
#[derive(Debug, thiserror::Error)]
enum FetchError {
    #[error(
        "piece {number} from {parent} failed its CRC check: expected {expected}, got {actual}"
    )]
    Corrupt {
        number: u32,
        parent: String,
        expected: String,
        actual: String,
    },
    #[error("parent does not have the piece")]
    NotFound,
    #[error("{0}")]
    Transfer(String),
    #[error("{0}")]
    Storage(#[from] StorageError),
}

/// Something a parent's background stream learnt.
/// Events carry the parent's incarnation (`generation`): a parent dropped and added again
/// gets new streams, and late events of the old ones are ignored.
enum ParentEvent {
    Available {
        parent: String,
        generation: u64,
        number: u32,
        addr: Option<SocketAddr>,
    },
    SyncEnded {
        parent: String,
        generation: u64,
        error: Option<String>,
    },
}

struct Parent {
    id: String,
    generation: u64,
    /// Its handle in the picker (a new one each time it is added).
    handle: ParentId,
    is_seed: bool,
    piece_addr: Option<SocketAddr>,
    available: HashSet<u32>,
    failures: u32,
    /// Stalls in a row ([`PARENT_STALL`] without a piece while it had fetches in flight).
    stalls: u32,
    sync_done: bool,
    pool: Arc<Mutex<Vec<d7y_vortex::Client>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Parent {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

type Fetch<'a> = BoxFuture<'a, (u32, String, Result<PieceMeta, FetchError>)>;

struct Engine<'a> {
    mgr: &'a TaskManager,
    run: &'a TaskRun,
    plan: &'a DownloadPlan,
    writer: d7y_storage::ContentWriter,
    announce: Announce,
    host_id: String,
    layout: PieceLayout,
    picker: Picker,
    /// Pieces in flight and the parent fetching each.
    inflight: HashMap<u32, (String, ParentId)>,
    parents: HashMap<String, Parent>,
    /// Parents the scheduler took back, kept with what they hold and their connections.
    retired: HashMap<String, Parent>,
    /// Parents that failed us: never reconnected, and reported on reschedule.
    failed: HashSet<String>,
    events_tx: mpsc::Sender<ParentEvent>,
    events_rx: mpsc::Receiver<ParentEvent>,
    scheduler_alive: bool,
    waiting_for_parents: bool,
    next_generation: u64,
    last_progress: Instant,
    fetches: FuturesUnordered<Fetch<'a>>,
    /// Piece digests from the task's first verified source (the seed peer, through the
    /// scheduler): what a parent serves is checked against these, not only against the
    /// digest the parent itself claims.
    authority: HashMap<u32, Digest>,
    /// Abandons a piece's fetch (its parent stalled).
    aborts: HashMap<u32, futures_util::future::AbortHandle>,
    /// Bytes received by the fetches: a stall is a time without any, not without a whole
    /// piece (on a crowded link a piece may take long while bytes keep coming).
    received: Arc<std::sync::atomic::AtomicU64>,
    received_seen: u64,
}

impl<'a> Engine<'a> {
    fn new(
        mgr: &'a TaskManager,
        run: &'a TaskRun,
        plan: &'a DownloadPlan,
        prepared: &Prepared,
        announce: Announce,
    ) -> Engine<'a> {
        let layout = PieceLayout::new(
            prepared.content_length.unwrap_or(0),
            Some(prepared.piece_length),
        );
        let concurrency = mgr.config.download.concurrent_piece_count.max(1) as usize;
        let mut picker = Picker::new(layout.piece_count(), picker_config(layout, concurrency));
        for p in run.state().pieces.iter() {
            picker.mark_held(p.number);
        }
        let (events_tx, events_rx) = mpsc::channel(4096);
        Engine {
            mgr,
            run,
            plan,
            writer: prepared.writer.clone(),
            announce,
            host_id: mgr.host.host_id.clone(),
            layout,
            picker,
            inflight: HashMap::new(),
            parents: HashMap::new(),
            retired: HashMap::new(),
            failed: HashSet::new(),
            events_tx,
            events_rx,
            scheduler_alive: true,
            waiting_for_parents: false,
            next_generation: 0,
            last_progress: Instant::now(),
            fetches: FuturesUnordered::new(),
            authority: HashMap::new(),
            aborts: HashMap::new(),
            received: Arc::default(),
            received_seen: 0,
        }
    }

    /// Learns the authoritative digests the scheduler sent with a parent set. A piece
    /// already here under another digest came from a lying parent: it is fetched again,
    /// and the parent it came from is reported and dropped.
    fn learn_digests(&mut self, peers: &[Peer]) {
        let count = self.layout.piece_count();
        let mut learnt = Vec::new();
        for piece in peers
            .iter()
            .filter_map(|p| p.task.as_ref())
            .flat_map(|t| t.pieces.iter())
        {
            if piece.number >= count {
                continue;
            }
            let Ok(digest) = piece.digest.parse::<Digest>() else {
                continue;
            };
            if self.authority.insert(piece.number, digest).is_none() {
                learnt.push(piece.number);
            }
        }
        if learnt.is_empty() {
            return;
        }
        let held = self.run.state().pieces;
        for number in learnt {
            if !self.picker.has(number) {
                continue;
            }
            let Some(stored) = held.iter().rev().find(|p| p.number == number) else {
                continue;
            };
            let expected = &self.authority[&number];
            if stored.digest == expected.to_string() {
                continue;
            }
            warn!(
                task_id = self.plan.task_id,
                number,
                stored = stored.digest,
                expected = %expected,
                parent = stored.parent_id.as_deref().unwrap_or(""),
                "a stored piece contradicts the seed peer's digest; fetching it again"
            );
            self.picker.lost(number);
            if let Some(parent) = stored.parent_id.clone() {
                self.announce.send(Event::DownloadPieceFailedRequest(
                    DownloadPieceFailedRequest {
                        piece_number: Some(number),
                        parent_id: parent.clone(),
                        temporary: false,
                    },
                ));
                self.drop_parent(&parent, "served a piece the seed peer contradicts");
            }
        }
    }

    /// Replaces the parent set with the scheduler's latest answer.
    fn set_parents(&mut self, peers: Vec<Peer>) {
        self.learn_digests(&peers);
        let wanted: HashSet<String> = peers.iter().map(|p| p.id.clone()).collect();
        // Parents left out are retired, not forgotten: what they hold only grows, and their
        // connections stay warm, so a parent handed back a moment later (edge reversals make
        // that common) is usable at once instead of after a fresh piece sync.
        let leaving: Vec<String> = self
            .parents
            .keys()
            .filter(|id| !wanted.contains(*id))
            .cloned()
            .collect();
        for id in leaving {
            if let Some(mut p) = self.parents.remove(&id) {
                for t in p.tasks.drain(..) {
                    t.abort();
                }
                p.sync_done = false;
                self.picker.remove_parent(p.handle);
                self.retired.insert(id, p);
            }
        }
        for peer in peers {
            if self.failed.contains(&peer.id) || self.parents.contains_key(&peer.id) {
                continue;
            }
            let Some(host) = peer.host.as_ref() else {
                continue;
            };
            if host.id == self.host_id {
                continue;
            }
            let ip: Option<std::net::IpAddr> = host.ip.parse().ok();
            let piece_addr = ip
                .filter(|_| host.download_port > 0)
                .map(|ip| SocketAddr::new(ip, host.download_port as u16));
            let upload = match ip {
                Some(std::net::IpAddr::V6(ip)) => format!("[{ip}]:{}", host.port),
                _ => format!("{}:{}", host.ip, host.port),
            };
            self.next_generation += 1;
            let generation = self.next_generation;
            let known = self.retired.remove(&peer.id);
            if known.is_none() {
                debug!(task_id = self.plan.task_id, parent = peer.id, "new parent");
            }
            let is_seed = known.as_ref().map_or(host.r#type != 0, |p| p.is_seed);
            let handle = self.picker.add_parent(is_seed);
            let tasks = vec![tokio::spawn(sync_pieces(
                upload,
                self.mgr.peer_channel_options(),
                self.host_id.clone(),
                self.plan.task_id.clone(),
                (peer.id.clone(), generation),
                self.missing(),
                self.events_tx.clone(),
            ))];
            let parent = match known {
                Some(mut p) => {
                    p.generation = generation;
                    p.handle = handle;
                    p.tasks = tasks;
                    p.piece_addr = p.piece_addr.or(piece_addr);
                    p
                }
                None => Parent {
                    id: peer.id.clone(),
                    generation,
                    handle,
                    is_seed,
                    piece_addr,
                    available: HashSet::new(),
                    failures: 0,
                    stalls: 0,
                    sync_done: false,
                    pool: Arc::default(),
                    tasks,
                },
            };
            // What it held before it was retired, it still holds.
            for n in &parent.available {
                self.picker.available(handle, *n);
            }
            self.picker.set_usable(handle, parent.piece_addr.is_some());
            self.parents.insert(peer.id.clone(), parent);
        }
        self.waiting_for_parents = false;
    }

    fn missing(&self) -> Vec<u32> {
        self.picker.missing().collect()
    }

    fn drop_parent(&mut self, id: &str, why: &str) {
        self.retired.remove(id);
        if let Some(p) = self.parents.remove(id) {
            self.picker.remove_parent(p.handle);
            debug!(
                task_id = self.plan.task_id,
                parent = id,
                why,
                "dropping parent"
            );
        }
        self.failed.insert(id.to_string());
    }

    fn dispatch(&mut self) {
        let mut rng = rand::thread_rng();
        // A reader streaming the content in order waits for one piece: it goes first.
        while let Some((number, source)) = self.picker.next(self.run.wanted(), &mut rng) {
            let Source::Parent(handle) = source else {
                // The origin has no budget here (it is not a source of this loop yet).
                self.picker.failed(number, source);
                break;
            };
            let Some(parent) = self.parents.values().find(|p| p.handle == handle) else {
                self.picker.failed(number, source);
                break;
            };
            let (parent_id, addr) = match parent.piece_addr {
                Some(addr) => (parent.id.clone(), addr),
                None => {
                    self.picker.failed(number, source);
                    break;
                }
            };
            self.inflight.insert(number, (parent_id.clone(), handle));
            let pool = parent.pool.clone();
            let fut = fetch_piece(
                self.mgr,
                self.run,
                self.writer.clone(),
                self.plan.task_id.clone(),
                self.layout,
                number,
                parent_id.clone(),
                addr,
                pool,
                self.authority.get(&number).cloned(),
                self.received.clone(),
            );
            let (fut, abort) = futures_util::future::abortable(fut);
            self.aborts.insert(number, abort);
            self.fetches.push(
                async move {
                    let result = fut.await.unwrap_or_else(|_| {
                        Err(FetchError::Transfer("abandoned: the parent stalled".into()))
                    });
                    (number, parent_id, result)
                }
                .boxed(),
            );
        }
    }

    fn stuck(&self) -> bool {
        !self.picker.is_done() && self.inflight.is_empty()
    }

    fn parents_exhausted(&self) -> bool {
        self.parents.values().all(|p| p.sync_done)
    }

    fn reschedule(&mut self, why: &str) {
        if !self.scheduler_alive || self.waiting_for_parents {
            return;
        }
        // Only parents that failed us are reported (and blocklisted); a parent that has
        // told us all it has is not at fault.
        let failed: Vec<Peer> = self
            .failed
            .iter()
            .map(|id| Peer {
                id: id.clone(),
                ..Default::default()
            })
            .collect();
        debug!(
            task_id = self.plan.task_id,
            why,
            failed = failed.len(),
            "asking for new parents"
        );
        self.announce
            .send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
                candidate_parents: failed,
                description: Some(why.to_string()),
            }));
        self.waiting_for_parents = true;
    }

    async fn run(
        &mut self,
        responses: &mut tonic::Streaming<AnnouncePeerResponse>,
    ) -> Result<(), EngineExit> {
        let mut refresh = tokio::time::interval(REFRESH_INTERVAL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut stall_check = tokio::time::interval(Duration::from_millis(250));
        loop {
            self.dispatch();
            if self.picker.is_done() && self.inflight.is_empty() {
                return Ok(());
            }
            if self.stuck() && self.parents_exhausted() {
                self.reschedule("parents have nothing more to give");
            }
            tokio::select! {
                Some((number, parent, result)) = self.fetches.next(), if !self.fetches.is_empty() => {
                    self.on_fetched(number, &parent, result).map_err(EngineExit::Failed)?;
                }
                Some(event) = self.events_rx.recv() => self.on_parent_event(event),
                message = responses.message(), if self.scheduler_alive => {
                    match message {
                        Ok(Some(AnnouncePeerResponse { response: Some(reply) })) => match reply {
                            Reply::NormalTaskResponse(r) => self.set_parents(r.candidate_parents),
                            Reply::NeedBackToSourceResponse(r) => {
                                return Err(EngineExit::BackToSource {
                                    reason: r
                                        .description
                                        .unwrap_or_else(|| "scheduler asked".into()),
                                    report: true,
                                })
                            }
                            Reply::EmptyTaskResponse(_) | Reply::MetadataOnlyResponse(_) => {}
                        },
                        Ok(Some(_)) => {}
                        Ok(None) => self.scheduler_lost("stream closed"),
                        Err(status) if is_refusal(&status) => {
                            return Err(EngineExit::Failed(TaskError::Scheduler(
                                status.message().to_string(),
                            )))
                        }
                        Err(status) => self.scheduler_lost(status.message()),
                    }
                }
                _ = refresh.tick(), if self.scheduler_alive && !self.picker.is_done() => {
                    self.announce.send(Event::ReschedulePeerRequest(ReschedulePeerRequest {
                        candidate_parents: Vec::new(),
                        description: Some("refresh".into()),
                    }));
                }
                _ = stall_check.tick() => {
                    let received = self.received.load(std::sync::atomic::Ordering::Relaxed);
                    if received != self.received_seen {
                        self.received_seen = received;
                        self.last_progress = Instant::now();
                    }
                    if self.scheduler_alive && !self.picker.is_done() && self.last_progress.elapsed() > PARENT_STALL {
                        self.parents_stalled();
                    }
                    if !self.scheduler_alive && self.stuck() && self.last_progress.elapsed() > ORPHAN_STALL {
                        if self.plan.disable_back_to_source {
                            return Err(EngineExit::Failed(TaskError::SchedulerUnavailable(
                                format!("{} (lost mid-download; back-to-source is disabled)", self.announce.addr),
                            )));
                        }
                        return Err(EngineExit::BackToSource {
                            reason: "scheduler lost and parents stalled".into(),
                            report: false,
                        });
                    }
                }
            }
        }
    }

    /// Nothing arrived for [`PARENT_STALL`]. With fetches in flight (a parent that froze,
    /// or a flow stuck in TCP back-off on a crowded link), they are abandoned and the
    /// pieces asked for again on fresh connections, from any parent; a parent that stalls
    /// twice in a row is dropped and reported. With nothing in flight (parents that
    /// announce pieces they never send, or hold nothing needed), they are all dropped. In
    /// both cases the scheduler is asked for others when a parent was dropped.
    fn parents_stalled(&mut self) {
        let busy: HashSet<String> = self.inflight.values().map(|(id, _)| id.clone()).collect();
        let stalled: Vec<String> = if busy.is_empty() {
            self.parents.keys().cloned().collect()
        } else {
            busy.iter()
                .filter(|id| {
                    self.parents.get_mut(*id).is_some_and(|p| {
                        p.stalls += 1;
                        p.stalls >= 2
                    })
                })
                .cloned()
                .collect()
        };
        warn!(
            task_id = self.plan.task_id,
            parents = self.parents.len(),
            in_flight = self.inflight.len(),
            dropped = stalled.len(),
            stalled_for = ?self.last_progress.elapsed(),
            "no piece from the parents; asking again"
        );
        for id in &stalled {
            self.drop_parent(id, "stalled");
        }
        // The stuck fetches end as failures, and their pieces are fetched again.
        for (number, (parent, _)) in &self.inflight {
            if busy.contains(parent) {
                if let Some(handle) = self.aborts.get(number) {
                    handle.abort();
                }
            }
        }
        if !stalled.is_empty() {
            self.waiting_for_parents = false;
            self.reschedule("parents stalled");
        }
        self.last_progress = Instant::now();
    }

    fn scheduler_lost(&mut self, why: &str) {
        warn!(
            task_id = self.plan.task_id,
            why, "scheduler lost; continuing with the current parents"
        );
        self.scheduler_alive = false;
        self.last_progress = Instant::now();
    }

    fn on_parent_event(&mut self, event: ParentEvent) {
        let (parent, generation) = match &event {
            ParentEvent::Available {
                parent, generation, ..
            }
            | ParentEvent::SyncEnded {
                parent, generation, ..
            } => (parent.clone(), *generation),
        };
        let Some(p) = self
            .parents
            .get_mut(&parent)
            .filter(|p| p.generation == generation)
        else {
            return; // a parent since dropped or replaced
        };
        match event {
            ParentEvent::Available { number, addr, .. } => {
                if number < self.layout.piece_count() {
                    p.available.insert(number);
                }
                self.picker.available(p.handle, number);
                if let Some(addr) = addr {
                    p.piece_addr = Some(addr);
                    self.picker.set_usable(p.handle, true);
                }
            }
            ParentEvent::SyncEnded { error: None, .. } => p.sync_done = true,
            ParentEvent::SyncEnded { error: Some(e), .. } => self.drop_parent(&parent, &e),
        }
    }

    fn on_fetched(
        &mut self,
        number: u32,
        parent_id: &str,
        result: Result<PieceMeta, FetchError>,
    ) -> Result<(), TaskError> {
        let handle = self.inflight.remove(&number).map(|(_, h)| h);
        self.aborts.remove(&number);
        let source = handle.map(Source::Parent);
        match result {
            Ok(piece) => {
                match source {
                    Some(source) => {
                        let secs = piece.cost_millis as f64 / 1000.0;
                        self.picker.finished(number, source, piece.length, secs);
                    }
                    None => self.picker.mark_held(number),
                }
                self.last_progress = Instant::now();
                if let Some(p) = self.parents.get_mut(parent_id) {
                    p.failures = 0;
                    p.stalls = 0;
                }
                self.announce.send(Event::DownloadPieceFinishedRequest(
                    DownloadPieceFinishedRequest {
                        piece: Some(piece_to_proto(&piece)),
                    },
                ));
            }
            Err(FetchError::Storage(e)) => return Err(e.into()),
            Err(err) => {
                if let Some(source) = source {
                    self.picker.failed(number, source);
                }
                let metrics = &self.mgr.metrics;
                metrics
                    .download_piece_failure_total
                    .with_label_values(&["REMOTE_PEER"])
                    .inc();
                let temporary = !matches!(err, FetchError::Corrupt { .. });
                self.announce.send(Event::DownloadPieceFailedRequest(
                    DownloadPieceFailedRequest {
                        piece_number: Some(number),
                        parent_id: parent_id.to_string(),
                        temporary,
                    },
                ));
                match err {
                    FetchError::Corrupt { .. } => {
                        warn!(task_id = self.plan.task_id, %err, "dropping the parent for this task");
                        self.drop_parent(parent_id, "corrupt piece");
                    }
                    FetchError::NotFound => {
                        if let Some(p) = self.parents.get_mut(parent_id) {
                            p.available.remove(&number);
                            self.picker.unavailable(p.handle, number);
                        }
                    }
                    _ => {
                        debug!(task_id = self.plan.task_id, number, parent = parent_id, %err, "piece failed");
                        let drop_it = self.parents.get_mut(parent_id).is_some_and(|p| {
                            p.failures += 1;
                            p.failures >= PARENT_FAILURE_LIMIT
                        });
                        if drop_it {
                            self.drop_parent(parent_id, "too many failures");
                        }
                    }
                }
                if self.parents.is_empty() {
                    self.reschedule("every parent failed");
                }
            }
        }
        Ok(())
    }
}

/// Streams a parent's pieces as they become available there.
async fn sync_pieces(
    upload: String,
    options: d7y_net::ChannelOptions,
    host_id: String,
    task_id: String,
    (parent, generation): (String, u64),
    interested: Vec<u32>,
    events: mpsc::Sender<ParentEvent>,
) {
    let result: Result<(), String> = async {
        let channel = d7y_net::channel(&upload, &options)
            .await
            .map_err(|e| format!("connect {upload}: {e}"))?;
        let mut stream = DfdaemonUploadClient::new(channel)
            .sync_pieces(SyncPiecesRequest {
                host_id,
                task_id,
                interested_piece_numbers: interested,
            })
            .await
            .map_err(|s| s.message().to_string())?
            .into_inner();
        while let Some(r) = stream
            .message()
            .await
            .map_err(|s| s.message().to_string())?
        {
            let addr =
                r.ip.parse::<std::net::IpAddr>()
                    .ok()
                    .zip(r.tcp_port.filter(|p| *p > 0))
                    .map(|(ip, port)| SocketAddr::new(ip, port as u16));
            if events
                .send(ParentEvent::Available {
                    parent: parent.clone(),
                    generation,
                    number: r.number,
                    addr,
                })
                .await
                .is_err()
            {
                return Ok(());
            }
        }
        Ok(())
    }
    .await;
    let _ = events
        .send(ParentEvent::SyncEnded {
            parent,
            generation,
            error: result.err(),
        })
        .await;
}

/// Fetches one piece over Vortex into the content file, checks its CRC, records it.
#[allow(clippy::too_many_arguments)]
async fn fetch_piece(
    mgr: &TaskManager,
    run: &TaskRun,
    writer: d7y_storage::ContentWriter,
    task_id: String,
    layout: PieceLayout,
    number: u32,
    parent_id: String,
    addr: SocketAddr,
    pool: Arc<Mutex<Vec<d7y_vortex::Client>>>,
    authority: Option<Digest>,
    received: Arc<std::sync::atomic::AtomicU64>,
) -> Result<PieceMeta, FetchError> {
    let started = Instant::now();
    let timeout = mgr.config.download.piece_timeout;
    let transfer = |e: String| FetchError::Transfer(e);
    let (offset, length) = layout.range(number).map_err(|e| transfer(e.to_string()))?;
    let pooled = pool.lock().expect("pool").pop();
    let mut client = match pooled {
        Some(c) => c,
        None => {
            d7y_vortex::Client::connect_with(addr, None, CONNECT_TIMEOUT, mgr.peer_tls.as_deref())
                .await
                .map_err(|e| transfer(e.to_string()))?
        }
    };
    let silent = || {
        transfer(format!(
            "no bytes of piece {number} from the parent for {FETCH_SILENCE:?}"
        ))
    };
    let work = async {
        let meta = tokio::time::timeout(FETCH_SILENCE, client.request_piece(&task_id, number))
            .await
            .map_err(|_| silent())?
            .map_err(|e| {
                if e.is_not_found() {
                    FetchError::NotFound
                } else {
                    transfer(e.to_string())
                }
            })?;
        if meta.number != number || meta.offset != offset || meta.length != length {
            return Err(FetchError::Corrupt {
                number,
                parent: parent_id.clone(),
                expected: format!("piece {number} at {offset}+{length}"),
                actual: format!("piece {} at {}+{}", meta.number, meta.offset, meta.length),
            });
        }
        let claimed: Digest = meta.digest.parse().map_err(|_| FetchError::Corrupt {
            number,
            parent: parent_id.clone(),
            expected: "a crc32 digest".into(),
            actual: meta.digest.clone(),
        })?;
        // A parent that claims another digest than the seed's is serving other bytes:
        // refused before a byte is read (the connection is dropped with the error).
        if let Some(authority) = &authority {
            if *authority != claimed {
                return Err(FetchError::Corrupt {
                    number,
                    parent: parent_id.clone(),
                    expected: format!("{authority} (the seed peer's)"),
                    actual: format!("{claimed} (claimed by the parent)"),
                });
            }
        }
        let expected = authority.unwrap_or(claimed);
        // From here the piece can be relayed to children while it arrives.
        let flight = mgr.flights.begin(
            &task_id,
            FlightInfo {
                number,
                offset,
                length,
                digest: meta.digest.clone(),
                parent_id: parent_id.clone(),
            },
        );
        run.add_arriving(PieceMeta::new(number, offset, length, meta.digest.clone()));
        let limits = [&mgr.download_bandwidth];
        let write_buffer_size = mgr.config.storage.write_buffer_size;
        let mut sink =
            PieceSink::new(&writer, &limits, offset, length, write_buffer_size).relaying(&flight);
        let mut reader = client.content(length);
        loop {
            let read = tokio::time::timeout(FETCH_SILENCE, sink.read_from(&mut reader))
                .await
                .map_err(|_| silent())?;
            match read {
                Ok(0) => break,
                Ok(n) => {
                    received.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                }
                Err(ReadError::Io(e)) => return Err(transfer(e.to_string())),
                Err(ReadError::Storage(e)) => return Err(e.into()),
            }
        }
        let (written, crc) = sink.finish().await?;
        if written != length {
            return Err(transfer(format!(
                "parent closed after {written} of {length} bytes"
            )));
        }
        let actual = Digest::crc32(crc);
        if actual != expected {
            return Err(FetchError::Corrupt {
                number,
                parent: parent_id.clone(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            });
        }
        Ok((actual, flight))
    };
    let (digest, flight) = match tokio::time::timeout(timeout, work).await {
        Ok(Ok(done)) => done,
        Ok(Err(e)) => return Err(e),
        Err(_) => {
            return Err(transfer(format!(
                "piece {number} timed out after {timeout:?}"
            )))
        }
    };
    pool.lock().expect("pool").push(client);
    let mut piece = PieceMeta::new(number, offset, length, digest.to_string());
    piece.parent_id = Some(parent_id);
    piece.traffic_type = TrafficType::RemotePeer as i32;
    piece.cost_millis = started.elapsed().as_millis() as u64;
    mgr.storage.put_piece(&task_id, piece.clone()).await?;
    let m = &mgr.metrics;
    m.download_traffic
        .with_label_values(&["REMOTE_PEER", "STANDARD"])
        .inc_by(length);
    m.download_piece_total
        .with_label_values(&["REMOTE_PEER"])
        .inc();
    m.download_piece_duration_milliseconds
        .with_label_values(&["REMOTE_PEER"])
        .observe(piece.cost_millis as f64);
    run.add_piece(piece.clone());
    flight.verified();
    Ok(piece)
}
