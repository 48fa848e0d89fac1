//! The piece loop: one download's pieces, each from a parent or from the origin as
//! [`d7y_picker`] decides (rarest first among the parents, the seed only for pieces no
//! normal parent holds, in-flight budgets from each parent's measured rate, the origin for
//! the pieces nobody holds once back-to-source is on). This module feeds the picker the
//! parents' announcements and the fetches' outcomes, runs the fetches
//! ([`super::transfer`], [`crate::task::source::fetch_piece`]) and keeps the scheduler
//! informed ([`super::conversation`]). A whole back-to-source download is this loop with
//! no parents.
//!
//! **Endgame.** For the last pieces the picker may ask a second parent for a piece already
//! in flight. One fetch of a piece writes the content file (and is relayed from it); the
//! second reads into memory only ([`Target::Buffer`]). If the writing fetch wins, the copy
//! in memory is dropped. If the copy wins, the writing fetch is told so between two of its
//! writes ([`Steer::TakeOver`]) and writes the rest of the piece from the copy, through
//! its own relay flight (children following it lose nothing), checks the whole piece's
//! CRC and records it. Only should that fail is the copy written by itself, after the
//! writing fetch returned. So no two fetches ever write one piece at the same time.

use super::conversation::{Conversation, Directive};
use super::transfer::{
    commit_buffered, fetch_piece, sync_pieces, FetchError, Fetched, ParentEvent, Steer, Target,
};
use super::{ORPHAN_STALL, PARENT_FAILURE_LIMIT, PARENT_STALL, REFRESH_INTERVAL, REFRESH_MAX};
use crate::error::TaskError;
use crate::task::source::{self, Prepared};
use crate::task::{DownloadPlan, TaskManager, TaskRun};
use d7y_backend::{Probe, SourceRequest};
use d7y_picker::{ParentId, Picker, Source};
use d7y_storage::PieceMeta;
use d7y_types::{Digest, PieceLayout};
use dragonfly_api::common::v2::Peer;
use futures_util::future::BoxFuture;
use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

/// The picker's settings for a download of `layout` with `concurrency` fetches at most
/// ([`d7y_picker::Config::for_download`], which the simulator uses too). Few pieces in
/// flight per parent, so that each completes soon: k pieces sharing a parent's link each
/// take k piece-times, and a piece is verified (and its last byte relayed, see
/// [`crate::relay`]) only once whole. One per parent until its rate is measured (a
/// swarm's first pieces are relayed while they arrive: two at once would each land twice
/// as late); measured, a budget covers 0.35 s of the parent's rate (two 4 MiB pieces at
/// 200 Mbit/s, one at 100). The seed gets one while other parents are
/// connected. The endgame's second copies are held in memory until one wins, so it covers
/// at most [`d7y_picker::ENDGAME_MEMORY`] of pieces.
fn picker_config(layout: PieceLayout, concurrency: usize) -> d7y_picker::Config {
    d7y_picker::Config::for_download(layout.piece_length, concurrency)
}

/// Why the loop stopped before having every piece.
pub(super) enum EngineExit {
    /// The rest must come from one streamed GET: the origin takes no ranges. `probe` is
    /// the origin's answer (its body, when it sent one, is the stream to read).
    Streamed {
        reason: String,
        probe: Probe,
    },
    Failed(TaskError),
}

struct Parent {
    id: String,
    generation: u64,
    /// Its handle in the picker (kept when it is retired and handed back: its rate and its
    /// fetches still in flight count again).
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

/// A fetch's end: the piece, the parent's id (empty for the origin), the source, and what
/// came of it.
type Fetch<'a> = BoxFuture<'a, (u32, String, Source, Result<Fetched, FetchError>)>;

pub(super) struct Engine<'a> {
    mgr: &'a TaskManager,
    run: &'a TaskRun,
    plan: &'a DownloadPlan,
    writer: d7y_storage::ContentWriter,
    talk: Conversation<'a>,
    host_id: String,
    layout: PieceLayout,
    picker: Picker,
    /// The origin's answer to the probe, while the origin is not a source yet.
    probe: Option<Probe>,
    /// The origin's request, once it is a source of this loop.
    origin: Option<Arc<SourceRequest>>,
    /// Fetches in flight, by piece and source: the parent's id (empty for the origin).
    inflight: HashMap<(u32, Source), String>,
    /// Per piece in flight, the fetch that writes the content file (the others are endgame
    /// copies in memory) and how to steer it (none for the origin's and for commits).
    writing: HashMap<u32, (Source, Option<oneshot::Sender<Steer>>)>,
    /// Endgame copies that won while the piece's writing fetch still ran, kept until it
    /// returned: (source, parent id, piece, bytes).
    won: HashMap<u32, (Source, String, PieceMeta, bytes::Bytes)>,
    parents: HashMap<String, Parent>,
    /// Parents the scheduler took back, kept with what they hold and their connections.
    retired: HashMap<String, Parent>,
    /// Parents that failed us: never reconnected, and reported on reschedule.
    failed: HashSet<String>,
    events_tx: mpsc::Sender<ParentEvent>,
    events_rx: mpsc::Receiver<ParentEvent>,
    next_generation: u64,
    /// The wait before the next refresh: [`REFRESH_INTERVAL`] after the parent set
    /// changed, doubling (up to [`REFRESH_MAX`]) while refreshes change nothing, so a
    /// settled swarm costs its scheduler little.
    refresh_every: Duration,
    refresh_at: tokio::time::Instant,
    last_progress: Instant,
    fetches: FuturesUnordered<Fetch<'a>>,
    /// Piece digests from the task's first verified source (the seed peer, through the
    /// scheduler): what a parent serves is checked against these, not only against the
    /// digest the parent itself claims.
    authority: HashMap<u32, Digest>,
    /// Abandons a fetch (its parent stalled, or it is an endgame copy that lost).
    aborts: HashMap<(u32, Source), futures_util::future::AbortHandle>,
    /// Bytes received by the fetches: a stall is a time without any, not without a whole
    /// piece (on a crowded link a piece may take long while bytes keep coming).
    received: Arc<std::sync::atomic::AtomicU64>,
    received_seen: u64,
}

impl<'a> Engine<'a> {
    pub fn new(
        mgr: &'a TaskManager,
        run: &'a TaskRun,
        plan: &'a DownloadPlan,
        prepared: &Prepared,
        talk: Conversation<'a>,
        probe: Option<Probe>,
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
            talk,
            host_id: mgr.host.host_id.clone(),
            layout,
            picker,
            probe,
            origin: None,
            inflight: HashMap::new(),
            writing: HashMap::new(),
            won: HashMap::new(),
            parents: HashMap::new(),
            retired: HashMap::new(),
            failed: HashSet::new(),
            events_tx,
            events_rx,
            next_generation: 0,
            refresh_every: REFRESH_INTERVAL,
            refresh_at: tokio::time::Instant::now() + REFRESH_INTERVAL,
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
                self.talk.piece_failed(number, &parent, false);
                self.drop_parent(&parent, "served a piece the seed peer contradicts");
            }
        }
    }

    /// Replaces the parent set with the scheduler's latest answer.
    pub fn set_parents(&mut self, peers: Vec<Peer>) {
        self.learn_digests(&peers);
        let wanted: HashSet<String> = peers.iter().map(|p| p.id.clone()).collect();
        let current: HashSet<&String> = self.parents.keys().collect();
        if wanted.len() != current.len() || !wanted.iter().all(|id| current.contains(id)) {
            self.refresh_every = REFRESH_INTERVAL;
            let soon = tokio::time::Instant::now() + REFRESH_INTERVAL;
            self.refresh_at = self.refresh_at.min(soon);
        }
        // Parents left out are retired, not forgotten: what they hold only grows, their
        // connections stay warm and their fetches go on, so a parent handed back a moment
        // later is usable at once, under the same picker handle (its budget already spent
        // by what it still has in flight).
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
            let handle = match &known {
                Some(p) => {
                    self.picker.restore_parent(p.handle);
                    p.handle
                }
                None => self.picker.add_parent(is_seed),
            };
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

    /// Makes the origin one more source of this loop: from now on the pieces no parent
    /// holds come from it (all of them, with no parents). The scheduler, if there, is told
    /// the peer went back to source. An origin without ranges cannot serve single pieces:
    /// the rest then comes from one streamed GET, outside this loop.
    pub async fn use_origin(&mut self, reason: &str) -> Result<(), EngineExit> {
        if self.origin.is_some() {
            return Ok(());
        }
        let probe = super::probe_again(self.mgr, self.plan, self.probe.take())
            .await
            .map_err(EngineExit::Failed)?;
        // The swarm's pieces are laid out for one length: an origin that now serves
        // another content cannot fill them.
        if let Some(len) = probe.stat.content_length {
            if len != self.layout.content_length {
                return Err(EngineExit::Failed(TaskError::LengthMismatch {
                    url: self.plan.url.to_string(),
                    expected: self.layout.content_length,
                    actual: len,
                }));
            }
        }
        if !probe.stat.supports_range {
            return Err(EngineExit::Streamed {
                reason: reason.to_string(),
                probe,
            });
        }
        info!(
            task_id = self.plan.task_id,
            reason,
            missing = self.picker.remaining(),
            "the origin is a source now"
        );
        self.talk.back_to_source_started(reason);
        let download = &self.mgr.config.download;
        let budget = download.back_to_source_concurrent_piece_count.max(1);
        let concurrency = (download.concurrent_piece_count.max(1)).max(budget);
        self.picker.set_concurrency(concurrency as usize);
        self.picker.set_origin_budget(budget);
        self.origin = Some(Arc::new(self.plan.source_request()));
        Ok(())
    }

    fn dispatch(&mut self) {
        let mut rng = rand::thread_rng();
        // A reader streaming the content in order waits for one piece: it goes first.
        while let Some((number, source)) = self.picker.next(self.run.wanted(), &mut rng) {
            // A second fetch of a piece (the endgame) reads into memory; the first writes.
            let copy = self.writing.contains_key(&number);
            let (parent_id, fut): (String, BoxFuture<'a, Result<Fetched, FetchError>>) =
                match source {
                    Source::Origin => {
                        let Some(request) = self.origin.clone().filter(|_| !copy) else {
                            self.picker.failed(number, source);
                            break;
                        };
                        let (mgr, run, plan, writer, layout) = (
                            self.mgr,
                            self.run,
                            self.plan,
                            self.writer.clone(),
                            self.layout,
                        );
                        let fut = async move {
                            source::fetch_piece(mgr, run, plan, &request, &writer, layout, number)
                                .await
                                .map(Fetched::Recorded)
                                .map_err(FetchError::Origin)
                        }; // The origin's fetch is not steered: an endgame copy that beats it
                           // waits for it to end.
                        self.writing.insert(number, (source, None));
                        (String::new(), fut.boxed())
                    }
                    Source::Parent(handle) => {
                        let Some(parent) = self.parents.values().find(|p| p.handle == handle)
                        else {
                            self.picker.failed(number, source);
                            break;
                        };
                        let Some(addr) = parent.piece_addr else {
                            self.picker.failed(number, source);
                            break;
                        };
                        let target = if copy {
                            Target::Buffer
                        } else {
                            let (steer, steered) = oneshot::channel();
                            self.writing.insert(number, (source, Some(steer)));
                            Target::File(steered)
                        };
                        let fut = fetch_piece(
                            self.mgr,
                            self.run,
                            self.writer.clone(),
                            self.plan.task_id.clone(),
                            self.layout,
                            number,
                            parent.id.clone(),
                            addr,
                            parent.pool.clone(),
                            self.authority.get(&number).cloned(),
                            self.received.clone(),
                            target,
                        );
                        (parent.id.clone(), fut.boxed())
                    }
                };
            self.launch(number, source, parent_id, fut);
        }
    }

    /// Runs a fetch (or the commit of an endgame copy) as part of the loop.
    fn launch(
        &mut self,
        number: u32,
        source: Source,
        parent_id: String,
        fut: BoxFuture<'a, Result<Fetched, FetchError>>,
    ) {
        self.inflight.insert((number, source), parent_id.clone());
        let (fut, abort) = futures_util::future::abortable(fut);
        self.aborts.insert((number, source), abort);
        self.fetches.push(
            async move {
                let result = fut.await.unwrap_or_else(|_| {
                    Err(FetchError::Transfer("abandoned: the parent stalled".into()))
                });
                (number, parent_id, source, result)
            }
            .boxed(),
        );
    }

    /// Writes and records an endgame copy that won; nothing else writes the piece now.
    fn commit(
        &mut self,
        number: u32,
        source: Source,
        parent_id: String,
        piece: PieceMeta,
        data: bytes::Bytes,
    ) {
        debug!(
            task_id = self.plan.task_id,
            number,
            parent = parent_id,
            "endgame: a second copy won; writing it alone"
        );
        let (mgr, run, writer) = (self.mgr, self.run, self.writer.clone());
        let task_id = self.plan.task_id.clone();
        let fut = async move {
            commit_buffered(mgr, run, &writer, &task_id, piece, data)
                .await
                .map(Fetched::Recorded)
        };
        self.writing.insert(number, (source, None));
        self.launch(number, source, parent_id, fut.boxed());
    }

    fn stuck(&self) -> bool {
        !self.picker.is_done() && self.inflight.is_empty()
    }

    fn parents_exhausted(&self) -> bool {
        self.parents.values().all(|p| p.sync_done)
    }

    /// Asks for new parents. Only parents that failed us are reported (and blocklisted);
    /// a parent that has told us all it has is not at fault.
    fn reschedule(&mut self, why: &str) {
        let failed = self.failed.iter().cloned().collect();
        self.talk.reschedule(failed, why);
    }

    /// Runs until every piece is here (the caller reports the end to the scheduler).
    pub async fn run(&mut self) -> Result<(), EngineExit> {
        let mut stall_check = tokio::time::interval(Duration::from_millis(250));
        loop {
            self.dispatch();
            if self.picker.is_done() && self.inflight.is_empty() {
                return Ok(());
            }
            if self.stuck() && self.parents_exhausted() && self.origin.is_none() {
                self.reschedule("parents have nothing more to give");
            }
            let alive = self.talk.alive();
            tokio::select! {
                Some((number, parent, source, result)) = self.fetches.next(), if !self.fetches.is_empty() => {
                    self.on_fetched(number, &parent, source, result).map_err(EngineExit::Failed)?;
                }
                Some(event) = self.events_rx.recv() => self.on_parent_event(event),
                directive = self.talk.next() => match directive {
                    Directive::Parents(peers) => self.set_parents(peers),
                    Directive::BackToSource(reason) => self.use_origin(&reason).await?,
                    Directive::Refused(message) => {
                        return Err(EngineExit::Failed(TaskError::Scheduler(message)))
                    }
                    Directive::Nothing => {
                        if alive && !self.talk.alive() {
                            self.last_progress = Instant::now();
                        }
                    }
                },
                _ = tokio::time::sleep_until(self.refresh_at), if alive && !self.picker.is_done() => {
                    self.talk.refresh();
                    self.refresh_at = tokio::time::Instant::now() + self.refresh_every;
                    self.refresh_every = (self.refresh_every * 2).min(REFRESH_MAX);
                }
                _ = stall_check.tick() => {
                    let received = self.received.load(std::sync::atomic::Ordering::Relaxed);
                    if received != self.received_seen {
                        self.received_seen = received;
                        self.last_progress = Instant::now();
                    }
                    if alive && !self.picker.is_done() && self.last_progress.elapsed() > PARENT_STALL {
                        self.parents_stalled();
                    }
                    if !alive && self.origin.is_none() && self.stuck() && self.last_progress.elapsed() > ORPHAN_STALL {
                        if self.plan.disable_back_to_source {
                            return Err(EngineExit::Failed(TaskError::SchedulerUnavailable(
                                format!("{} (lost mid-download; back-to-source is disabled)", self.talk.addr()),
                            )));
                        }
                        self.use_origin("scheduler lost and parents stalled").await?;
                    }
                }
            }
        }
    }

    pub fn conversation(&mut self) -> &mut Conversation<'a> {
        &mut self.talk
    }

    pub fn into_conversation(self) -> Conversation<'a> {
        self.talk
    }

    /// Nothing arrived for [`PARENT_STALL`]. With fetches in flight (a parent that froze,
    /// or a flow stuck in TCP back-off on a crowded link), they are abandoned and the
    /// pieces asked for again on fresh connections, from any parent; a parent that stalls
    /// twice in a row is dropped and reported. With nothing in flight (parents that
    /// announce pieces they never send, or hold nothing needed), they are all dropped. In
    /// both cases the scheduler is asked for others when a parent was dropped.
    fn parents_stalled(&mut self) {
        let busy: HashSet<String> = self
            .inflight
            .iter()
            .filter(|((_, source), _)| matches!(source, Source::Parent(_)))
            .map(|(_, id)| id.clone())
            .collect();
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
        // The stuck fetches end as failures, and their pieces are fetched again. One that
        // writes the file is told to stop (it returns between two writes); a copy in
        // memory is dropped.
        for ((number, source), parent) in &self.inflight {
            if !busy.contains(parent) {
                continue;
            }
            let steer = match self.writing.get_mut(number) {
                Some((writer, steer)) if writer == source => steer.take(),
                _ => None,
            };
            match steer {
                Some(steer) => {
                    let _ = steer.send(Steer::Stop);
                }
                None => {
                    if let Some(handle) = self.aborts.get(&(*number, *source)) {
                        handle.abort();
                    }
                }
            }
        }
        if !stalled.is_empty() {
            self.talk.stop_waiting();
            self.reschedule("parents stalled");
        }
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
        source: Source,
        result: Result<Fetched, FetchError>,
    ) -> Result<(), TaskError> {
        self.inflight.remove(&(number, source));
        self.aborts.remove(&(number, source));
        let was_writing = self.writing.get(&number).is_some_and(|(s, _)| *s == source);
        if was_writing {
            self.writing.remove(&number);
        }
        if self.picker.has(number) {
            return Ok(()); // the endgame copy that lost, or a fetch of a piece held already
        }
        let result = match result {
            // An endgame copy won: the fetch writing the piece takes the rest from it (the
            // copy is kept should that fetch fail after all); with none, it goes in now.
            Ok(Fetched::Buffered { piece, data }) => {
                self.progressed(parent_id);
                match self.writing.get_mut(&number) {
                    Some((_, steer)) => {
                        if let Some(steer) = steer.take() {
                            let _ = steer.send(Steer::TakeOver {
                                data: data.clone(),
                                parent_id: parent_id.to_string(),
                            });
                        }
                        debug!(
                            task_id = self.plan.task_id,
                            number,
                            parent = parent_id,
                            "endgame: a second copy won; the writing fetch takes the rest from it"
                        );
                        self.won
                            .insert(number, (source, parent_id.to_string(), piece, data));
                    }
                    None => self.commit(number, source, parent_id.to_string(), piece, data),
                }
                return Ok(());
            }
            Ok(Fetched::Recorded(piece)) => Ok(piece),
            Err(e) => Err(e),
        };
        match result {
            Ok(piece) => {
                self.won.remove(&number);
                let secs = piece.cost_millis as f64 / 1000.0;
                for loser in self.picker.finished(number, source, piece.length, secs) {
                    if let Some(handle) = self.aborts.get(&(number, loser)) {
                        handle.abort();
                    }
                }
                self.progressed(parent_id);
                debug!(
                    task_id = self.plan.task_id,
                    number,
                    parent = parent_id,
                    millis = piece.cost_millis,
                    "piece fetched"
                );
                self.talk.piece_finished(&piece, source == Source::Origin);
            }
            Err(FetchError::Storage(e)) => return Err(e.into()),
            // The backend retried the piece already; the origin is the last resort.
            Err(FetchError::Origin(e)) => return Err(e),
            Err(err) => {
                self.picker.failed(number, source);
                let metrics = &self.mgr.metrics;
                metrics
                    .download_piece_failure_total
                    .with_label_values(&["REMOTE_PEER"])
                    .inc();
                let temporary = !matches!(err, FetchError::Corrupt { .. });
                self.talk.piece_failed(number, parent_id, temporary);
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
                if self.parents.is_empty() && self.origin.is_none() {
                    self.reschedule("every parent failed");
                }
                // A copy that arrived while this fetch was writing goes in now.
                if was_writing {
                    if let Some((won_source, won_parent, piece, data)) = self.won.remove(&number) {
                        self.commit(number, won_source, won_parent, piece, data);
                    }
                }
            }
        }
        Ok(())
    }

    /// Bytes came from `parent_id`: it is not failing.
    fn progressed(&mut self, parent_id: &str) {
        self.last_progress = Instant::now();
        if let Some(p) = self.parents.get_mut(parent_id) {
            p.failures = 0;
            p.stalls = 0;
        }
    }
}
