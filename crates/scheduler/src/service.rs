//! The scheduler's service layer: turns AnnouncePeer events into changes of the swarm model
//! and decides, per peer, between parents, back-to-source and failure. The gRPC layer
//! ([`crate::grpc`]) only translates messages; everything that holds state is here.

use crate::digests::Reporter;
use crate::limits;
use crate::metrics::Metrics;
use crate::resource::{Limits, ResourceError, Resources};
use crate::scheduling::PeerState;
use crate::seed::SeedPeers;
use d7y_config::scheduler::Config;
use dragonfly_api::common::v2 as common;
use dragonfly_api::scheduler::v2::announce_peer_request::Request as Event;
use dragonfly_api::scheduler::v2::announce_peer_response::Response as Reply;
use dragonfly_api::scheduler::v2::*;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tonic::Status;
use tracing::{debug, info, warn};

/// Responses to one AnnouncePeer stream.
pub type ReplyTx = mpsc::Sender<Result<AnnouncePeerResponse, Status>>;

/// A reschedule whose description starts with this asks for a fresher parent set; it is not
/// a failure and does not count against the retry limits.
pub const REFRESH_DESCRIPTION: &str = "refresh";

/// Domain failures, mapped to gRPC codes at the edge.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    PermissionDenied(String),
    #[error("{0}")]
    ResourceExhausted(String),
}

impl From<ResourceError> for ServiceError {
    fn from(e: ResourceError) -> Self {
        match e {
            ResourceError::WrongTask { .. } => ServiceError::InvalidArgument(e.to_string()),
            ResourceError::Exhausted(_) => ServiceError::ResourceExhausted(e.to_string()),
            _ => ServiceError::NotFound(e.to_string()),
        }
    }
}

impl ServiceError {
    pub fn to_status(&self) -> Status {
        match self {
            ServiceError::InvalidArgument(m) => Status::invalid_argument(m.clone()),
            ServiceError::NotFound(m) => Status::not_found(m.clone()),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m.clone()),
            ServiceError::PermissionDenied(m) => Status::permission_denied(m.clone()),
            ServiceError::ResourceExhausted(m) => Status::resource_exhausted(m.clone()),
        }
    }
}

struct StreamHandle {
    tx: ReplyTx,
    generation: u64,
}

#[derive(Default)]
struct State {
    res: Resources,
    streams: HashMap<String, StreamHandle>,
    /// Woken when a task gains a usable parent (a piece, a back-to-source start, a finish)
    /// or loses its seed, so waiting schedules retry at once instead of at the next tick.
    waiters: HashMap<String, Arc<Notify>>,
    next_generation: u64,
    /// Per-peer download flags that matter after registration.
    flags: HashMap<String, PeerFlags>,
}

#[derive(Debug, Clone, Copy, Default)]
struct PeerFlags {
    disable_back_to_source: bool,
    /// LEVEL2 on a first download: never back to source.
    no_back_to_source: bool,
}

impl State {
    fn notify(&self, task_id: &str) {
        if let Some(n) = self.waiters.get(task_id) {
            n.notify_waiters();
        }
    }

    fn notify_all(&self) {
        for n in self.waiters.values() {
            n.notify_waiters();
        }
    }

    fn waiter(&mut self, task_id: &str) -> Arc<Notify> {
        self.waiters
            .entry(task_id.to_string())
            .or_insert_with(|| Arc::new(Notify::new()))
            .clone()
    }
}

/// Whether an announce stream goes on after an event.
enum Flow {
    Continue,
    /// The peer reached a final state (finished or failed): its stream ends.
    End,
}

/// What a waiting schedule does next.
enum Decision {
    Parents(Vec<common::Peer>),
    BackToSource(String),
    Fail(ServiceError),
    Wait(Arc<Notify>),
    /// The peer is gone or no longer needs parents.
    Done,
}

/// The scheduler service.
pub struct Service {
    config: Config,
    /// What the manager may change while the scheduler runs (seed peers, parent limits);
    /// read briefly, never held across an await.
    dynamic: std::sync::RwLock<Dynamic>,
    state: Mutex<State>,
    pub metrics: Arc<Metrics>,
    /// The clock of the hosts' rate meters.
    started: Instant,
}

/// The settings that follow the cluster config.
struct Dynamic {
    limits: Limits,
    /// The trusted seed peers, and their ring.
    seed_peers: Vec<d7y_config::scheduler::SeedPeer>,
    seeds: SeedPeers,
    /// Mutual TLS towards seed peers (kept for rings built later).
    seed_tls: Option<Arc<d7y_net::ClientTls>>,
}

/// A scheduler cluster's config as the manager gives it (and as it is cached on disk).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    pub cluster_id: u64,
    pub seed_peers: Vec<d7y_config::scheduler::SeedPeer>,
    pub candidate_parent_limit: Option<u32>,
    pub filter_parent_limit: Option<u32>,
}

/// Where a request came from: the peer address of its connection, when the transport
/// knows it (TCP does).
pub type Origin = Option<IpAddr>;

use d7y_types::priority_label;

impl Service {
    pub fn new(config: Config, metrics: Arc<Metrics>) -> Arc<Service> {
        Service::with_seed_tls(config, metrics, None)
    }

    /// [`Service::new`], talking to seed peers over mutual TLS.
    pub fn with_seed_tls(
        config: Config,
        metrics: Arc<Metrics>,
        tls: Option<Arc<d7y_net::ClientTls>>,
    ) -> Arc<Service> {
        let seeds = SeedPeers::new(config.seed_peers.iter().map(|s| s.addr()).collect())
            .with_tls(tls.clone());
        let limits = Limits::from(&config.scheduler);
        let dynamic = Dynamic {
            limits,
            seed_peers: config.seed_peers.clone(),
            seeds,
            seed_tls: tls,
        };
        let mut state = State::default();
        state.res.measure_rates = config.scheduler.measure_rates;
        Arc::new(Service {
            config,
            dynamic: std::sync::RwLock::new(dynamic),
            state: Mutex::new(state),
            metrics,
            started: Instant::now(),
        })
    }

    fn dynamic(&self) -> std::sync::RwLockReadGuard<'_, Dynamic> {
        self.dynamic.read().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> Limits {
        self.dynamic().limits.clone()
    }

    fn seeds(&self) -> SeedPeers {
        self.dynamic().seeds.clone()
    }

    /// Takes the manager's cluster config: its seed peers join the configured ones (both
    /// are trusted; a seed peer the manager no longer lists is dropped unless the config
    /// names it), its parent limits replace the configured limits (clamped to what the
    /// config accepts). Returns whether anything changed.
    pub fn apply_cluster_config(&self, cluster: &ClusterConfig) -> bool {
        let mut seed_peers = self.config.seed_peers.clone();
        for p in &cluster.seed_peers {
            if !seed_peers.iter().any(|s| s.addr() == p.addr()) {
                seed_peers.push(p.clone());
            }
        }
        let cluster = &ClusterConfig {
            seed_peers,
            ..cluster.clone()
        };
        let defaults = &self.config.scheduler;
        let candidate = cluster
            .candidate_parent_limit
            .unwrap_or(defaults.candidate_parent_limit)
            .clamp(1, 20);
        let filter = cluster
            .filter_parent_limit
            .unwrap_or(defaults.filter_parent_limit)
            .clamp(candidate, 1000);
        let mut d = self.dynamic.write().unwrap_or_else(|p| p.into_inner());
        let limits = Limits {
            candidate_parents: candidate as usize,
            filter_parents: filter as usize,
            ..Limits::from(defaults)
        };
        let seeds_changed = d.seed_peers != cluster.seed_peers;
        let changed = seeds_changed || d.limits != limits;
        if seeds_changed {
            d.seeds = SeedPeers::new(cluster.seed_peers.iter().map(|s| s.addr()).collect())
                .with_tls(d.seed_tls.clone());
            d.seed_peers = cluster.seed_peers.clone();
        }
        d.limits = limits;
        drop(d);
        if changed {
            let mut st = self.lock();
            if seeds_changed {
                // Hosts announced before the list arrived (or that left it) are judged again.
                let judged: Vec<(String, bool)> = st
                    .res
                    .hosts
                    .values()
                    .map(|h| (h.id.clone(), self.is_trusted_seed(&h.proto, h.observed_ip)))
                    .collect();
                for (id, trusted) in judged {
                    if let Some(h) = st.res.hosts.get_mut(&id) {
                        h.is_seed = trusted;
                    }
                }
            }
            // Waiting schedules see the new seed peers at once.
            st.notify_all();
        }
        changed
    }

    /// The state lock. A panic while holding it (a bug) must not take every later
    /// request down with it: the model's invariants are re-established per operation.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a host announcing itself as a seed peer is one this scheduler's config
    /// names (by address and upload port, or by hostname and port).
    fn is_trusted_seed(&self, host: &common::Host, origin: Origin) -> bool {
        if host.r#type == 0 {
            return false;
        }
        let ip = if self.config.scheduler.verify_host_ip {
            origin.or_else(|| host.ip.parse().ok())
        } else {
            host.ip.parse().ok()
        };
        self.dynamic().seed_peers.iter().any(|seed| {
            let port_ok = seed
                .port
                .unwrap_or(d7y_config::scheduler::DEFAULT_SEED_PEER_PORT)
                == host.port as u16;
            let addr_ok = match seed.ip {
                Some(seed_ip) => ip.is_some_and(|ip| ip.to_canonical() == seed_ip.to_canonical()),
                None => !seed.hostname.is_empty() && seed.hostname == host.hostname,
            };
            port_ok && addr_ok
        })
    }

    /// With `scheduler.verifyHostIP`, a request about `host_id` must come from the address
    /// the host was announced from.
    fn check_origin(&self, st: &State, host_id: &str, origin: Origin) -> Result<(), ServiceError> {
        if !self.config.scheduler.verify_host_ip {
            return Ok(());
        }
        let Some(host) = st.res.hosts.get(host_id) else {
            return Ok(()); // unknown hosts are refused by the operation itself
        };
        match (host.observed_ip, origin) {
            (Some(known), Some(from)) if known != from.to_canonical() => {
                Err(ServiceError::PermissionDenied(format!(
                    "host {host_id} was announced from {known}; this request comes from {from}"
                )))
            }
            _ => Ok(()),
        }
    }

    /// Serves one AnnouncePeer stream: reads events until the peer closes it or misbehaves,
    /// then cleans up. Responses go to `tx`.
    pub async fn serve_stream<S>(self: Arc<Self>, mut inbound: S, tx: ReplyTx, origin: Origin)
    where
        S: futures_util::Stream<Item = Result<AnnouncePeerRequest, Status>> + Unpin + Send,
    {
        use futures_util::StreamExt;
        let mut bound: Option<(String, u64)> = None;
        while let Some(message) = inbound.next().await {
            let request = match message {
                Ok(r) => r,
                Err(status) => {
                    debug!(code = ?status.code(), "announce stream broke");
                    break;
                }
            };
            match self.handle(request, &tx, &mut bound, origin) {
                Ok(Flow::Continue) => {}
                // The peer finished or failed: end the response stream, as upstream's
                // scheduler does (upstream's client waits for that end before it returns).
                // The replies queued before it are still delivered.
                Ok(Flow::End) => break,
                Err(err) => {
                    debug!(%err, "rejecting announce stream");
                    let _ = tx.send(Err(err.to_status())).await;
                    break;
                }
            }
        }
        if let Some((peer_id, generation)) = bound {
            self.stream_closed(&peer_id, generation);
        }
        // `tx` drops here; with the handle in `streams` gone too, the stream ends.
    }

    fn handle(
        self: &Arc<Self>,
        request: AnnouncePeerRequest,
        tx: &ReplyTx,
        bound: &mut Option<(String, u64)>,
        origin: Origin,
    ) -> Result<Flow, ServiceError> {
        let AnnouncePeerRequest {
            host_id,
            task_id,
            peer_id,
            request,
        } = request;
        limits::check_ids(&host_id, &task_id, &peer_id).map_err(ServiceError::InvalidArgument)?;
        let event = request.ok_or_else(|| {
            ServiceError::InvalidArgument("announce request carries no event".into())
        })?;
        if let Some((bound_peer, _)) = bound {
            if *bound_peer != peer_id {
                return Err(ServiceError::InvalidArgument(format!(
                    "this stream belongs to peer {bound_peer}, not {peer_id}"
                )));
            }
        }
        if let Event::RegisterPeerRequest(register) = event {
            let download = register.download.ok_or_else(|| {
                ServiceError::InvalidArgument("register request carries no download".into())
            })?;
            let generation = self.register(&host_id, &task_id, &peer_id, download, tx, origin)?;
            *bound = Some((peer_id, generation));
            return Ok(Flow::Continue);
        }
        if bound.is_none() {
            return Err(ServiceError::FailedPrecondition(format!(
                "peer {peer_id} must register on this stream before anything else"
            )));
        }
        let ends = matches!(
            event,
            Event::DownloadPeerFinishedRequest(_)
                | Event::DownloadPeerBackToSourceFinishedRequest(_)
                | Event::DownloadPeerFailedRequest(_)
                | Event::DownloadPeerBackToSourceFailedRequest(_)
        );
        self.event(&task_id, &peer_id, event)?;
        Ok(if ends { Flow::End } else { Flow::Continue })
    }

    fn host_type_label(&self, st: &State, host_id: &str) -> &'static str {
        match st.res.hosts.get(host_id) {
            Some(h) if h.is_seed => "super",
            _ => "normal",
        }
    }

    /// Registers a peer and starts deciding what it should do.
    fn register(
        self: &Arc<Self>,
        host_id: &str,
        task_id: &str,
        peer_id: &str,
        download: common::Download,
        tx: &ReplyTx,
        origin: Origin,
    ) -> Result<u64, ServiceError> {
        let priority = download.priority;
        let mut st = self.lock();
        let host_label = self.host_type_label(&st, host_id);
        let labels = [priority_label(priority), "STANDARD", host_label];
        self.metrics
            .register_peer_total
            .with_label_values(&labels)
            .inc();
        if let Err(e) = self.admit(&mut st, host_id, task_id, peer_id, &download, origin) {
            self.metrics
                .register_peer_failure_total
                .with_label_values(&labels)
                .inc();
            return Err(e);
        }
        st.next_generation += 1;
        let generation = st.next_generation;
        st.streams.insert(
            peer_id.to_string(),
            StreamHandle {
                tx: tx.clone(),
                generation,
            },
        );
        let is_seed_host = st.res.hosts.get(host_id).is_some_and(|h| h.is_seed);
        let available = st.res.has_available_peer(task_id, host_id);
        let mut flags = PeerFlags {
            disable_back_to_source: download.disable_back_to_source,
            no_back_to_source: false,
        };
        let reply = |r: Reply| {
            let _ = tx.try_send(Ok(AnnouncePeerResponse { response: Some(r) }));
        };

        if priority == common::Priority::Level1 as i32 {
            st.res.remove_peer(peer_id);
            st.streams.remove(peer_id);
            return Err(ServiceError::FailedPrecondition(
                "priority LEVEL1 forbids downloading this task".into(),
            ));
        }
        let content_length = st.res.tasks.get(task_id).and_then(|t| t.content_length);
        if download.metadata_only {
            // The peer has the whole task already: record it as a complete holder.
            let piece_count = st.res.tasks.get(task_id).and_then(|t| t.piece_count);
            let peer = st.res.peer_mut(peer_id)?;
            peer.state = PeerState::Succeeded;
            peer.pieces.fill(piece_count.unwrap_or(0));
            st.notify(task_id);
            reply(Reply::MetadataOnlyResponse(MetadataOnlyResponse {}));
            return Ok(generation);
        }
        if content_length == Some(0) {
            st.res.peer_mut(peer_id)?.state = PeerState::Running;
            reply(Reply::EmptyTaskResponse(EmptyTaskResponse {}));
            return Ok(generation);
        }
        let go_to_source = |why: &str| -> Option<String> {
            (!download.disable_back_to_source).then(|| why.to_string())
        };
        let mut direct: Option<String> = None;
        if download.need_back_to_source {
            direct = go_to_source("the download asks for back-to-source");
        } else if is_seed_host && !available {
            direct = go_to_source("seed peer fetches the first copy");
        } else if !available && !is_seed_host {
            if priority == common::Priority::Level3 as i32 {
                direct = go_to_source("priority LEVEL3: the peer fetches from the origin");
            } else if priority == common::Priority::Level2 as i32 {
                flags.no_back_to_source = true;
            } else if self.seeds().is_empty() {
                direct = go_to_source("no seed peer configured and no peer has the task");
            } else {
                self.maybe_trigger_seed(&mut st, task_id);
            }
        }
        st.flags.insert(peer_id.to_string(), flags);
        if let Some(description) = direct {
            if st.res.back_to_source_count(task_id)
                < self.config.scheduler.back_to_source_count as usize
            {
                self.send_back_to_source(&mut st, peer_id, task_id, &description);
                return Ok(generation);
            }
        }
        drop(st);
        self.spawn_schedule(peer_id.to_string(), task_id.to_string(), "register");
        Ok(generation)
    }

    /// Checks a registration against what the scheduler knows and records the peer.
    fn admit(
        &self,
        st: &mut State,
        host_id: &str,
        task_id: &str,
        peer_id: &str,
        download: &common::Download,
        origin: Origin,
    ) -> Result<(), ServiceError> {
        if common::Priority::try_from(download.priority).is_err() {
            return Err(ServiceError::InvalidArgument(format!(
                "priority {} is not a priority (LEVEL0..LEVEL6)",
                download.priority
            )));
        }
        let layout =
            limits::check_download(download, self.config.scheduler.max_content_length.as_u64())
                .map_err(ServiceError::InvalidArgument)?;
        self.check_origin(st, host_id, origin)?;
        let is_seed = st.res.hosts.get(host_id).is_some_and(|h| h.is_seed);
        if let Some(task) = st.res.tasks.get(task_id) {
            if let Some(why) = task.layout().conflict(&layout) {
                if is_seed && !task.layout_from_seed {
                    // The seed fetched the origin itself: its sizes win, and the peers
                    // registered with the other sizes are dropped (their pieces would not
                    // line up).
                    warn!(task_id, why, "seed peer corrects the task's layout");
                    let peers: Vec<String> = task.peer_ids().to_vec();
                    for id in peers {
                        st.res.remove_peer(&id);
                        st.streams.remove(&id);
                    }
                    if let Some(task) = st.res.tasks.get_mut(task_id) {
                        task.set_layout(layout);
                    }
                } else {
                    return Err(ServiceError::InvalidArgument(format!(
                        "registration for task {task_id} does not match the task: {why}"
                    )));
                }
            }
        }
        // A host at its peer cap makes room by dropping its least recently active
        // finished peer (the copy stays on its disk; it is just no longer offered).
        let host_peers: Option<Vec<String>> = st
            .res
            .hosts
            .get(host_id)
            .filter(|h| h.peers.len() >= limits::MAX_PEERS_PER_HOST && !h.peers.contains(peer_id))
            .map(|h| h.peers.iter().cloned().collect());
        if let Some(peers) = host_peers {
            let oldest = peers
                .iter()
                .filter_map(|id| st.res.peers.get(id))
                .filter(|p| p.state == PeerState::Succeeded)
                .min_by_key(|p| p.updated_at)
                .map(|p| p.id.clone());
            match oldest {
                Some(id) => {
                    st.res.remove_peer(&id);
                    st.streams.remove(&id);
                }
                None => {
                    return Err(ServiceError::ResourceExhausted(format!(
                        "host {host_id} has {} peers downloading; at most {} are kept",
                        peers.len(),
                        limits::MAX_PEERS_PER_HOST
                    )))
                }
            }
        }
        st.res.register_peer(host_id, task_id, peer_id, download)?;
        if let Some(task) = st.res.tasks.get_mut(task_id) {
            if is_seed && layout.content_length.is_some() {
                task.layout_from_seed = true;
            }
        }
        Ok(())
    }

    fn maybe_trigger_seed(self: &Arc<Self>, st: &mut State, task_id: &str) {
        let Some(task) = st.res.tasks.get_mut(task_id) else {
            return;
        };
        let stale = task
            .seed_triggered
            .is_some_and(|t| task.seed_failed && t.elapsed() > Duration::from_secs(30));
        if task.seed_triggered.is_some() && !stale {
            return;
        }
        task.seed_triggered = Some(Instant::now());
        task.seed_failed = false;
        let download = task.download.clone();
        let service = self.clone();
        let task_id = task_id.to_string();
        tokio::spawn(async move {
            let seeds = service.seeds();
            let result = seeds.trigger(&task_id, download).await;
            let outcome = match &result {
                Ok(addr) => {
                    info!(task_id, addr, "seed peer finished the task");
                    "succeeded"
                }
                Err(err) => {
                    warn!(task_id, %err, "seed peer trigger failed");
                    "failed"
                }
            };
            service
                .metrics
                .trigger_seed_peer_total
                .with_label_values(&[outcome])
                .inc();
            if result.is_err() {
                let mut st = service.lock();
                if let Some(task) = st.res.tasks.get_mut(&task_id) {
                    task.seed_failed = true;
                }
                st.notify(&task_id);
            }
        });
    }

    fn send_back_to_source(&self, st: &mut State, peer_id: &str, task_id: &str, description: &str) {
        st.res.clear_parents(peer_id);
        if let Ok(peer) = st.res.peer_mut(peer_id) {
            peer.need_back_to_source = true;
            peer.state = PeerState::BackToSource;
        }
        st.notify(task_id);
        if let Some(stream) = st.streams.get(peer_id) {
            info!(peer_id, description, "sending the peer back to source");
            let _ = stream.tx.try_send(Ok(AnnouncePeerResponse {
                response: Some(Reply::NeedBackToSourceResponse(NeedBackToSourceResponse {
                    description: Some(description.to_string()),
                })),
            }));
        }
    }

    /// Runs the schedule-or-wait loop for a peer in the background.
    fn spawn_schedule(self: &Arc<Self>, peer_id: String, task_id: String, reason: &'static str) {
        let service = self.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let interval = service.config.scheduler.retry_interval;
            loop {
                let attempt = (started.elapsed().as_millis() / interval.as_millis().max(1)) as u32;
                let decision = service.decide(&peer_id, &task_id, attempt, reason);
                match decision {
                    Decision::Wait(notify) => {
                        let _ = tokio::time::timeout(interval, notify.notified()).await;
                    }
                    Decision::Parents(parents) => {
                        service.send(
                            &peer_id,
                            Reply::NormalTaskResponse(NormalTaskResponse {
                                candidate_parents: parents,
                            }),
                        );
                        return;
                    }
                    Decision::BackToSource(description) => {
                        let mut st = service.lock();
                        service.send_back_to_source(&mut st, &peer_id, &task_id, &description);
                        return;
                    }
                    Decision::Fail(err) => {
                        let st = service.lock();
                        if let Some(stream) = st.streams.get(&peer_id) {
                            let _ = stream.tx.try_send(Err(err.to_status()));
                        }
                        return;
                    }
                    Decision::Done => return,
                }
            }
        });
    }

    fn decide(&self, peer_id: &str, task_id: &str, attempt: u32, reason: &str) -> Decision {
        let mut st = self.lock();
        let Some(peer) = st.res.peers.get(peer_id) else {
            return Decision::Done;
        };
        if matches!(
            peer.state,
            PeerState::Succeeded | PeerState::Failed | PeerState::BackToSource | PeerState::Leave
        ) {
            return Decision::Done;
        }
        let host_id = peer.host_id.clone();
        // Parents at their children cap are the last resort: only when the peer would
        // otherwise be sent to the origin or fail. Until then it waits for an open one
        // (a busy parent still beats the origin, but a waiting peer usually gets a better
        // place in the graph within a retry interval).
        let last_attempt = attempt >= self.config.scheduler.retry_back_to_source_limit
            || attempt >= self.config.scheduler.retry_limit;
        let started = Instant::now();
        let scheduled = st.res.schedule_with(
            peer_id,
            &self.limits(),
            last_attempt,
            &mut rand::thread_rng(),
        );
        self.metrics
            .schedule_duration_milliseconds
            .with_label_values(&[reason])
            .observe(started.elapsed().as_secs_f64() * 1000.0);
        match scheduled {
            Ok(s) if !s.parents.is_empty() => {
                if let Ok(p) = st.res.peer_mut(peer_id) {
                    p.schedule_failures = 0;
                }
                let mut protos = self.parent_protos(&st, &s.parents);
                attach_digests(&mut st, peer_id, &mut protos);
                return Decision::Parents(protos);
            }
            Ok(_) => {}
            Err(e) => return Decision::Fail(e.into()),
        }
        let flags = st.flags.get(peer_id).copied().unwrap_or_default();
        let may_go_to_source = !flags.disable_back_to_source
            && !flags.no_back_to_source
            && st.res.back_to_source_count(task_id)
                < self.config.scheduler.back_to_source_count as usize;
        let seed_failed = st
            .res
            .tasks
            .get(task_id)
            .is_some_and(|t| t.seed_failed && t.seed_triggered.is_some());
        let available = st.res.has_available_peer(task_id, &host_id);
        if may_go_to_source
            && ((seed_failed && !available)
                || attempt >= self.config.scheduler.retry_back_to_source_limit)
        {
            return Decision::BackToSource(if seed_failed {
                "the seed peer could not fetch the task".into()
            } else {
                format!("no parent found after {attempt} attempts")
            });
        }
        if attempt >= self.config.scheduler.retry_limit {
            if let Ok(p) = st.res.peer_mut(peer_id) {
                p.state = PeerState::Failed;
            }
            return Decision::Fail(ServiceError::FailedPrecondition(format!(
                "no parent for task {task_id} after {attempt} attempts and back-to-source is not allowed"
            )));
        }
        Decision::Wait(st.waiter(task_id))
    }

    fn send(&self, peer_id: &str, reply: Reply) {
        let st = self.lock();
        if let Some(stream) = st.streams.get(peer_id) {
            let _ = stream.tx.try_send(Ok(AnnouncePeerResponse {
                response: Some(reply),
            }));
        }
    }

    fn parent_protos(&self, st: &State, ids: &[String]) -> Vec<common::Peer> {
        ids.iter()
            .filter_map(|id| peer_proto(&st.res, id, false))
            .collect()
    }

    /// Handles every event after registration.
    fn event(
        self: &Arc<Self>,
        task_id: &str,
        peer_id: &str,
        event: Event,
    ) -> Result<(), ServiceError> {
        let mut st = self.lock();
        let peer = st.res.peer_mut(peer_id)?;
        if peer.task_id != task_id {
            return Err(ResourceError::WrongTask {
                peer: peer_id.into(),
                actual: peer.task_id.clone(),
                claimed: task_id.into(),
            }
            .into());
        }
        peer.updated_at = Instant::now();
        let priority = priority_label(peer.priority);
        let host_id = peer.host_id.clone();
        let host_label = self.host_type_label(&st, &host_id);
        let labels = [priority, "STANDARD", host_label];
        let m = &self.metrics;
        match event {
            Event::RegisterPeerRequest(_) => unreachable!("handled by the caller"),
            Event::DownloadPeerStartedRequest(_) => {
                m.download_peer_started_total
                    .with_label_values(&labels)
                    .inc();
                let peer = st.res.peer_mut(peer_id)?;
                if peer.state == PeerState::Received {
                    peer.state = PeerState::Running;
                }
            }
            Event::DownloadPeerBackToSourceStartedRequest(_) => {
                m.download_peer_back_to_source_started_total
                    .with_label_values(&labels)
                    .inc();
                st.res.clear_parents(peer_id);
                st.res.peer_mut(peer_id)?.state = PeerState::BackToSource;
                st.notify(task_id);
            }
            Event::ReschedulePeerRequest(r) => {
                let refresh = r.candidate_parents.is_empty()
                    && r.description
                        .as_deref()
                        .is_some_and(|d| d.starts_with(REFRESH_DESCRIPTION));
                if refresh {
                    m.reschedule_total.with_label_values(&["refresh"]).inc();
                    self.refresh(&mut st, peer_id);
                    return Ok(());
                }
                m.reschedule_total.with_label_values(&["failure"]).inc();
                // Only peers of this task can be blocklisted, and only so many.
                let failed: Vec<String> = r
                    .candidate_parents
                    .iter()
                    .take(limits::MAX_RESCHEDULE_PARENTS)
                    .filter(|p| {
                        st.res
                            .peers
                            .get(&p.id)
                            .is_some_and(|parent| parent.task_id == task_id)
                    })
                    .map(|p| p.id.clone())
                    .collect();
                let peer = st.res.peer_mut(peer_id)?;
                for parent in failed {
                    if peer.blocklist.len() < limits::MAX_BLOCKLIST {
                        peer.blocklist.insert(parent);
                    }
                }
                peer.schedule_failures += 1;
                if peer.state == PeerState::Received {
                    peer.state = PeerState::Running;
                }
                debug!(
                    peer_id,
                    failed = r.candidate_parents.len(),
                    description = r.description.as_deref().unwrap_or(""),
                    "reschedule"
                );
                drop(st);
                self.spawn_schedule(peer_id.to_string(), task_id.to_string(), "reschedule");
            }
            Event::DownloadPeerFinishedRequest(_)
            | Event::DownloadPeerBackToSourceFinishedRequest(_) => {
                if matches!(event, Event::DownloadPeerFinishedRequest(_)) {
                    m.download_peer_finished_total
                        .with_label_values(&labels)
                        .inc();
                } else {
                    m.download_peer_back_to_source_finished_total
                        .with_label_values(&labels)
                        .inc();
                }
                st.res.clear_parents(peer_id);
                let piece_count = st.res.tasks.get(task_id).and_then(|t| t.piece_count);
                let peer = st.res.peer_mut(peer_id)?;
                peer.state = PeerState::Succeeded;
                if let Some(count) = piece_count {
                    peer.pieces.fill(count);
                }
                st.notify(task_id);
            }
            Event::DownloadPeerFailedRequest(r) => {
                m.download_peer_finished_failure_total
                    .with_label_values(&labels)
                    .inc();
                debug!(
                    peer_id,
                    description = r.description.as_deref().unwrap_or(""),
                    "peer failed"
                );
                st.res.clear_parents(peer_id);
                st.res.peer_mut(peer_id)?.state = PeerState::Failed;
            }
            Event::DownloadPeerBackToSourceFailedRequest(r) => {
                m.download_peer_back_to_source_finished_failure_total
                    .with_label_values(&labels)
                    .inc();
                debug!(
                    peer_id,
                    description = r.description.as_deref().unwrap_or(""),
                    "peer failed back-to-source"
                );
                st.res.peer_mut(peer_id)?.state = PeerState::Failed;
                st.notify(task_id);
            }
            Event::DownloadPieceFinishedRequest(DownloadPieceFinishedRequest { piece }) => {
                let piece = piece.ok_or_else(|| {
                    ServiceError::InvalidArgument("piece finished without a piece".into())
                })?;
                let crc = self.check_piece(&st, task_id, &piece)?;
                m.download_piece_finished_total
                    .with_label_values(&["REMOTE_PEER", "STANDARD", host_label])
                    .inc();
                m.traffic
                    .with_label_values(&["REMOTE_PEER", "STANDARD", host_label])
                    .inc_by(piece.length);
                self.piece_finished(&mut st, task_id, peer_id, &piece, crc, false);
            }
            Event::DownloadPieceBackToSourceFinishedRequest(
                DownloadPieceBackToSourceFinishedRequest { piece },
            ) => {
                let piece = piece.ok_or_else(|| {
                    ServiceError::InvalidArgument("piece finished without a piece".into())
                })?;
                let crc = self.check_piece(&st, task_id, &piece)?;
                m.download_piece_back_to_source_finished_total
                    .with_label_values(&["STANDARD", host_label])
                    .inc();
                m.traffic
                    .with_label_values(&["BACK_TO_SOURCE", "STANDARD", host_label])
                    .inc_by(piece.length);
                self.piece_finished(&mut st, task_id, peer_id, &piece, crc, true);
            }
            Event::DownloadPieceFailedRequest(r) => {
                m.download_piece_finished_failure_total
                    .with_label_values(&["STANDARD", host_label])
                    .inc();
                if !r.temporary {
                    self.blame(&mut st, task_id, peer_id, &host_id, &r.parent_id);
                }
            }
            Event::DownloadPieceBackToSourceFailedRequest(r) => {
                m.download_piece_back_to_source_finished_failure_total
                    .with_label_values(&["STANDARD", host_label])
                    .inc();
                debug!(peer_id, piece = ?r.piece_number, "piece back-to-source failed");
            }
        }
        Ok(())
    }

    /// Checks a reported piece against the task's layout; returns its CRC, if it has one.
    fn check_piece(
        &self,
        st: &State,
        task_id: &str,
        piece: &common::Piece,
    ) -> Result<Option<u32>, ServiceError> {
        let layout = st
            .res
            .tasks
            .get(task_id)
            .map(|t| t.layout())
            .unwrap_or_default();
        limits::check_piece(piece, &layout).map_err(ServiceError::InvalidArgument)
    }

    fn piece_finished(
        &self,
        st: &mut State,
        task_id: &str,
        peer_id: &str,
        piece: &common::Piece,
        crc: Option<u32>,
        from_source: bool,
    ) {
        let reporter = st.res.peers.get(peer_id).and_then(|p| {
            let host = st.res.hosts.get(&p.host_id)?;
            Some(Reporter {
                seq: p.seq,
                ip: host.observed_ip,
                // Only a trusted seed's back-to-source bytes speak for the origin.
                authoritative: host.is_seed && from_source,
            })
        });
        let mut outcome = crate::digests::Outcome::default();
        if let (Some(task), Some(crc), Some(reporter)) =
            (st.res.tasks.get_mut(task_id), crc, reporter)
        {
            task.updated_at = Instant::now();
            outcome = task.digests.report(piece.number, crc, reporter);
        }
        for seq in &outcome.wrong {
            let Some(id) = st.res.by_seq.get(seq).cloned() else {
                continue;
            };
            warn!(
                task_id,
                peer_id = id,
                number = piece.number,
                "peer holds a piece whose digest the seed peer or the majority contradicts; isolating it"
            );
            if let Ok(p) = st.res.peer_mut(&id) {
                p.wrong_pieces.insert(piece.number);
            }
            for child in st
                .res
                .peers
                .get(&id)
                .map(|p| p.children.clone())
                .unwrap_or_default()
            {
                st.res.remove_edge(&id, &child);
            }
        }
        if st.res.measure_rates {
            let now = self.started.elapsed().as_secs_f64();
            let parent = piece.parent_id.as_deref().filter(|_| !from_source);
            st.res
                .observe_piece(peer_id, piece.number, parent, piece.length, now);
        }
        if let Ok(peer) = st.res.peer_mut(peer_id) {
            if outcome.right {
                // A corrected copy: the peer is trusted with this piece again.
                peer.wrong_pieces.remove(&piece.number);
            }
            let first = peer.pieces.is_empty();
            peer.pieces.insert(piece.number);
            if let Some(cost) = &piece.cost {
                peer.add_cost(limits::cost_ms(cost));
            }
            if from_source {
                peer.source_bytes = peer.source_bytes.saturating_add(piece.length);
            } else {
                peer.peer_bytes = peer.peer_bytes.saturating_add(piece.length);
            }
            if first {
                st.notify(task_id);
            }
        }
    }

    /// A child says `parent_id` served it a corrupt piece. The child never gets that
    /// parent again; the task stops offering it only when children on two source
    /// addresses say so (one stranger cannot take a good parent, the seed included, away
    /// from everyone).
    fn blame(
        &self,
        st: &mut State,
        task_id: &str,
        child_id: &str,
        child_host: &str,
        parent_id: &str,
    ) {
        let Some(parent) = st.res.peers.get(parent_id) else {
            return;
        };
        if parent.task_id != task_id || parent.id == child_id {
            return;
        }
        let child_ip = st.res.hosts.get(child_host).and_then(|h| h.observed_ip);
        if let Ok(child) = st.res.peer_mut(child_id) {
            if child.blocklist.len() < limits::MAX_BLOCKLIST {
                child.blocklist.insert(parent_id.to_string());
            }
        }
        st.res.remove_edge(parent_id, child_id);
        let Ok(parent) = st.res.peer_mut(parent_id) else {
            return;
        };
        let known = parent.blamed_by.contains(&child_ip) && child_ip.is_some();
        if !known && parent.blamed_by.len() < 8 {
            parent.blamed_by.push(child_ip);
        }
        let witnesses = {
            let mut ips: Vec<Option<IpAddr>> = Vec::new();
            for ip in &parent.blamed_by {
                if ip.is_none() || !ips.contains(ip) {
                    ips.push(*ip);
                }
            }
            ips.len()
        };
        if witnesses >= 2 && !parent.corrupt {
            warn!(
                task_id,
                parent_id,
                witnesses,
                "children on two addresses report corrupt pieces from this parent; excluding it"
            );
            parent.corrupt = true;
        } else {
            debug!(
                task_id,
                parent_id,
                child_id,
                "a child reports a corrupt piece; only that child avoids the parent"
            );
        }
    }

    /// Answers a refresh: a new parent set now, or nothing.
    fn refresh(&self, st: &mut State, peer_id: &str) {
        let Ok(scheduled) = st
            .res
            .schedule(peer_id, &self.limits(), &mut rand::thread_rng())
        else {
            return;
        };
        if scheduled.parents.is_empty() {
            return;
        }
        let mut protos = self.parent_protos(st, &scheduled.parents);
        attach_digests(st, peer_id, &mut protos);
        if let Some(stream) = st.streams.get(peer_id) {
            let _ = stream.tx.try_send(Ok(AnnouncePeerResponse {
                response: Some(Reply::NormalTaskResponse(NormalTaskResponse {
                    candidate_parents: protos,
                })),
            }));
        }
    }

    /// A peer's stream ended. A finished peer stays as a parent (its daemon still serves
    /// the task); any other peer leaves the swarm.
    fn stream_closed(&self, peer_id: &str, generation: u64) {
        let mut st = self.lock();
        if st
            .streams
            .get(peer_id)
            .is_some_and(|s| s.generation == generation)
        {
            st.streams.remove(peer_id);
        } else {
            return; // re-registered on a newer stream
        }
        st.flags.remove(peer_id);
        let Some(peer) = st.res.peers.get(peer_id) else {
            return;
        };
        let task_id = peer.task_id.clone();
        if peer.state == PeerState::Succeeded {
            st.res.clear_parents(peer_id);
        } else {
            debug!(
                peer_id,
                state = peer.state.as_str(),
                "peer left before finishing"
            );
            st.res.remove_peer(peer_id);
        }
        st.notify(&task_id);
    }

    // ---- unary RPCs ----

    /// Records a host's announcement. With `scheduler.verifyHostIP`, the host must announce
    /// the address it connects from, under an ID that starts with it; it is a seed peer
    /// only when this scheduler's config names it.
    pub fn announce_host(
        &self,
        host: Option<common::Host>,
        origin: Origin,
    ) -> Result<(), ServiceError> {
        self.metrics.announce_host_total.inc();
        let fail = |e: ServiceError| {
            self.metrics.announce_host_failure_total.inc();
            e
        };
        let mut host = host.ok_or_else(|| {
            fail(ServiceError::InvalidArgument(
                "announce host needs a host".into(),
            ))
        })?;
        limits::check_host(&mut host).map_err(|m| fail(ServiceError::InvalidArgument(m)))?;
        let origin = origin.map(|ip| ip.to_canonical());
        if self.config.scheduler.verify_host_ip {
            if let Some(from) = origin {
                let announced: IpAddr = host.ip.parse().expect("checked by check_host");
                if announced.to_canonical() != from {
                    return Err(fail(ServiceError::PermissionDenied(format!(
                        "host {} announces ip {} but connects from {from}; set host.ip to the \
                         address it connects from (scheduler.verifyHostIP)",
                        host.id, host.ip
                    ))));
                }
                if !host.id.starts_with(&format!("{}-", host.ip)) {
                    return Err(fail(ServiceError::PermissionDenied(format!(
                        "host id {} does not start with its ip {} (scheduler.verifyHostIP)",
                        host.id, host.ip
                    ))));
                }
            }
        }
        let trusted = self.is_trusted_seed(&host, origin);
        if host.r#type != 0 && !trusted {
            debug!(host_id = host.id, "host announces itself as a seed peer but is not configured as one; treating it as a normal host");
        }
        let mut st = self.lock();
        if !st.res.hosts.contains_key(&host.id) {
            if st.res.hosts.len() >= limits::MAX_HOSTS {
                return Err(fail(ServiceError::ResourceExhausted(format!(
                    "{} hosts are known; at most {} are kept",
                    st.res.hosts.len(),
                    limits::MAX_HOSTS
                ))));
            }
            // Behind a proxy (verifyHostIP off) every host shares the proxy's address.
            if let Some(from) = origin.filter(|_| self.config.scheduler.verify_host_ip) {
                let same = st
                    .res
                    .hosts
                    .values()
                    .filter(|h| h.observed_ip == Some(from))
                    .count();
                if same >= limits::MAX_HOSTS_PER_IP {
                    return Err(fail(ServiceError::ResourceExhausted(format!(
                        "{same} hosts are announced from {from}; at most {} are kept per address",
                        limits::MAX_HOSTS_PER_IP
                    ))));
                }
            }
        }
        self.check_origin(&st, &host.id, origin).map_err(fail)?;
        let id = host.id.clone();
        st.res.announce_host(host);
        if let Some(h) = st.res.hosts.get_mut(&id) {
            h.is_seed = trusted;
            h.observed_ip = origin.or(h.observed_ip);
        }
        Ok(())
    }

    pub fn list_hosts(&self, kind: Option<u32>) -> Vec<common::Host> {
        self.metrics.list_hosts_total.inc();
        let st = self.lock();
        let mut hosts: Vec<common::Host> = st
            .res
            .hosts
            .values()
            .filter(|h| kind.is_none_or(|k| h.proto.r#type == k))
            .map(|h| h.proto.clone())
            .collect();
        hosts.sort_by(|a, b| a.id.cmp(&b.id));
        hosts
    }

    pub fn delete_host(&self, host_id: &str, origin: Origin) -> Result<(), ServiceError> {
        self.metrics.delete_host_total.inc();
        let mut st = self.lock();
        self.check_origin(&st, host_id, origin)?;
        if !st.res.remove_host(host_id) {
            return Err(ServiceError::NotFound(format!("host {host_id} not found")));
        }
        Ok(())
    }

    pub fn stat_peer(&self, peer_id: &str) -> Result<common::Peer, ServiceError> {
        self.metrics.stat_peer_total.inc();
        let st = self.lock();
        peer_proto(&st.res, peer_id, true)
            .ok_or_else(|| ServiceError::NotFound(format!("peer {peer_id} not found")))
    }

    pub fn delete_peer(&self, peer_id: &str, origin: Origin) -> Result<(), ServiceError> {
        self.metrics.delete_peer_total.inc();
        let mut st = self.lock();
        let Some((task_id, host_id)) = st
            .res
            .peers
            .get(peer_id)
            .map(|p| (p.task_id.clone(), p.host_id.clone()))
        else {
            return Err(ServiceError::NotFound(format!("peer {peer_id} not found")));
        };
        self.check_origin(&st, &host_id, origin)?;
        st.res.remove_peer(peer_id);
        st.streams.remove(peer_id);
        st.notify(&task_id);
        Ok(())
    }

    pub fn stat_task(&self, task_id: &str) -> Result<common::Task, ServiceError> {
        self.metrics.stat_task_total.inc();
        let st = self.lock();
        task_proto(&st.res, task_id)
            .ok_or_else(|| ServiceError::NotFound(format!("task {task_id} not found")))
    }

    /// Removes the task's peer on `host_id` (upstream's DeleteTask is per host).
    pub fn delete_task(
        &self,
        host_id: &str,
        task_id: &str,
        origin: Origin,
    ) -> Result<(), ServiceError> {
        self.metrics.delete_task_total.inc();
        let mut st = self.lock();
        self.check_origin(&st, host_id, origin)?;
        let Some(task) = st.res.tasks.get(task_id) else {
            return Err(ServiceError::NotFound(format!("task {task_id} not found")));
        };
        let on_host: Vec<String> = task
            .peer_ids()
            .iter()
            .filter(|id| st.res.peers.get(*id).is_some_and(|p| p.host_id == host_id))
            .cloned()
            .collect();
        for id in on_host {
            st.res.remove_peer(&id);
            st.streams.remove(&id);
        }
        st.notify(task_id);
        Ok(())
    }

    /// One GC pass: peers idle past their TTL, tasks without peers, hosts not announced
    /// within their TTL. Returns (peers, tasks, hosts) removed.
    pub fn gc(&self, hosts_too: bool) -> (usize, usize, usize) {
        let gc = &self.config.scheduler.gc;
        let mut st = self.lock();
        let stale_peers: Vec<String> = st
            .res
            .peers
            .values()
            .filter(|p| {
                p.updated_at.elapsed() > gc.peer_ttl
                    || (matches!(p.state, PeerState::Failed | PeerState::Leave)
                        && !st.streams.contains_key(&p.id))
            })
            .map(|p| p.id.clone())
            .collect();
        for id in &stale_peers {
            st.res.remove_peer(id);
            st.streams.remove(id);
        }
        let empty_tasks: Vec<String> = st
            .res
            .tasks
            .values()
            .filter(|t| t.peer_ids().is_empty() && t.updated_at.elapsed() > gc.task_gc_interval)
            .map(|t| t.id.clone())
            .collect();
        for id in &empty_tasks {
            st.res.remove_task(id);
            st.waiters.remove(id);
        }
        let mut hosts = 0;
        if hosts_too {
            let stale_hosts: Vec<String> = st
                .res
                .hosts
                .values()
                .filter(|h| h.announced_at.elapsed() > gc.host_ttl)
                .map(|h| h.id.clone())
                .collect();
            for id in &stale_hosts {
                st.res.remove_host(id);
            }
            hosts = stale_hosts.len();
        }
        self.update_gauges(&st);
        (stale_peers.len(), empty_tasks.len(), hosts)
    }

    fn update_gauges(&self, st: &State) {
        self.metrics.hosts.set(st.res.hosts.len() as i64);
        self.metrics.tasks.set(st.res.tasks.len() as i64);
        let mut by_state: HashMap<&'static str, i64> = HashMap::new();
        for p in st.res.peers.values() {
            *by_state.entry(p.state.as_str()).or_default() += 1;
        }
        for s in [
            PeerState::Received,
            PeerState::Running,
            PeerState::BackToSource,
            PeerState::Succeeded,
            PeerState::Failed,
            PeerState::Leave,
        ] {
            self.metrics
                .peers
                .with_label_values(&[s.as_str()])
                .set(by_state.get(s.as_str()).copied().unwrap_or(0));
        }
    }

    /// Runs the GC loops forever.
    pub async fn run_gc(self: Arc<Self>) {
        let gc = self.config.scheduler.gc.clone();
        let mut peer_tick = tokio::time::interval(gc.peer_gc_interval);
        let mut host_tick = tokio::time::interval(gc.host_gc_interval);
        peer_tick.tick().await;
        host_tick.tick().await;
        loop {
            let hosts_too = tokio::select! {
                _ = peer_tick.tick() => false,
                _ = host_tick.tick() => true,
            };
            let (p, t, h) = self.gc(hosts_too);
            if p + t + h > 0 {
                debug!(peers = p, tasks = t, hosts = h, "gc removed");
            }
        }
    }

    /// Test and benchmark access to the model.
    pub fn with_resources<R>(&self, f: impl FnOnce(&mut Resources) -> R) -> R {
        f(&mut self.lock().res)
    }
}

/// Adds the authoritative piece digests `peer_id` was not sent yet to the task of the
/// first candidate parent (`Peer.task.pieces`): a child checks what a parent serves
/// against these (the seed peer's, from the origin) rather than only against the digest
/// the parent itself claims. Upstream clients ignore the field.
fn attach_digests(st: &mut State, peer_id: &str, parents: &mut [common::Peer]) {
    let Some(first) = parents.first_mut() else {
        return;
    };
    let Some(peer) = st.res.peers.get(peer_id) else {
        return;
    };
    let Some(task) = st.res.tasks.get(&peer.task_id) else {
        return;
    };
    let layout = task.layout();
    let (Some(len), Some(pl)) = (layout.content_length, layout.piece_length) else {
        return;
    };
    let layout = d7y_types::PieceLayout::new(len, Some(pl));
    let fresh: Vec<(u32, u32)> = task
        .digests
        .authoritative()
        .filter(|(n, _)| !peer.digests_sent.contains(*n))
        .collect();
    if fresh.is_empty() {
        return;
    }
    let pieces: Vec<common::Piece> = fresh
        .iter()
        .filter_map(|(number, crc)| {
            let (offset, length) = layout.range(*number).ok()?;
            Some(common::Piece {
                number: *number,
                offset,
                length,
                digest: format!("crc32:{crc}"),
                ..Default::default()
            })
        })
        .collect();
    if let Some(task) = first.task.as_mut() {
        task.pieces = pieces;
    }
    if let Ok(peer) = st.res.peer_mut(peer_id) {
        for (number, _) in fresh {
            peer.digests_sent.insert(number);
        }
    }
}

/// `common.v2.Peer` of a peer, with its host and task (and its pieces when `with_pieces`).
pub fn peer_proto(res: &Resources, peer_id: &str, with_pieces: bool) -> Option<common::Peer> {
    let peer = res.peers.get(peer_id)?;
    let host = res.hosts.get(&peer.host_id)?;
    let pieces = if with_pieces {
        let count = res
            .tasks
            .get(&peer.task_id)
            .and_then(|t| t.piece_count)
            .unwrap_or(0)
            .max(peer.pieces.len());
        (0..count.saturating_mul(2))
            .filter(|n| peer.pieces.contains(*n))
            .map(|number| common::Piece {
                number,
                ..Default::default()
            })
            .collect()
    } else {
        Vec::new()
    };
    Some(common::Peer {
        id: peer.id.clone(),
        priority: peer.priority,
        pieces,
        state: peer.state.as_str().to_string(),
        task: task_proto(res, &peer.task_id),
        host: Some(host.proto.clone()),
        need_back_to_source: peer.need_back_to_source,
        created_at: None,
        updated_at: None,
        ..Default::default()
    })
}

/// `common.v2.Task` as the scheduler knows it.
pub fn task_proto(res: &Resources, task_id: &str) -> Option<common::Task> {
    let task = res.tasks.get(task_id)?;
    let d = &task.download;
    let has_available_peer = res.has_available_peer(task_id, "");
    let succeeded = task
        .peer_ids()
        .iter()
        .filter_map(|id| res.peers.get(id))
        .any(|p| p.state == PeerState::Succeeded);
    Some(common::Task {
        id: task.id.clone(),
        r#type: common::TaskType::Standard as i32,
        url: task.url.clone(),
        digest: d.digest.clone(),
        tag: d.tag.clone(),
        application: d.application.clone(),
        filtered_query_params: d.filtered_query_params.clone(),
        request_header: d.request_header.clone(),
        content_length: task.content_length.unwrap_or(0),
        piece_count: task.piece_count.unwrap_or(0),
        size_scope: size_scope(task.content_length, task.piece_length) as i32,
        pieces: Vec::new(),
        state: if succeeded { "Succeeded" } else { "Running" }.to_string(),
        peer_count: task.peer_ids().len() as u32,
        has_available_peer,
        created_at: None,
        updated_at: None,
    })
}

fn size_scope(content_length: Option<u64>, piece_length: Option<u64>) -> common::SizeScope {
    match (content_length, piece_length) {
        (Some(0), _) => common::SizeScope::Empty,
        (Some(len), _) if len <= 128 => common::SizeScope::Tiny,
        (Some(len), Some(pl)) if len <= pl => common::SizeScope::Small,
        _ => common::SizeScope::Normal,
    }
}
