//! The in-memory swarm: hosts, tasks, peers, and each task's parent graph.
//!
//! **Invariants** (checked by the tests at the bottom):
//! - every peer's task and host exist; a task's peer list holds exactly its peers;
//! - `parents`/`children` are mirror images, and only link peers of the same task;
//! - no edge joins two peers of one host (nor a peer to itself);
//! - removing a peer removes all its edges;
//! - each task's counters (givers, back-to-source peers) equal what a scan of its peers
//!   would count. Every change to a peer goes through [`Resources::peer_mut`], which
//!   remembers that peer and what it counted as; the next call that needs the counters (or
//!   the next `peer_mut`) re-counts that one peer, so the counters are exact without a scan.
//!
//! **The parent graph is a mesh, not a DAG.** Two peers may be each other's parents at
//! once and trade different pieces (the Kumar–Ross scheme: every peer forwards what it has
//! to the others). What acyclicity guarded against is kept where it is real: no piece is
//! ever waited on in a cycle, because a daemon serves only pieces it holds or whose flight
//! it already follows, and a reader follows one older flight (`dfdaemon::relay`). And no
//! peer is handed a parent that can give it nothing now and could only ever get pieces
//! through the child itself: a parent with nothing the child lacks is taken only when the
//! child does not reach it (a bounded search; an exhausted budget counts as reaching), so
//! a set of empty peers never feeds on each other alone.
//!
//! Everything here is synchronous and runs under the service's one lock; nothing awaits.

use crate::digests::DigestBook;
use crate::evaluator::{self, ChildStats, ParentStats, COST_WINDOW};
use crate::limits::Layout;
use crate::scheduling::{self, Candidate, Child, PeerState};
use dragonfly_api::common::v2 as common;
use rand::seq::index::sample;
use rand::Rng;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::time::Instant;

/// A growable bitset of piece numbers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PieceSet {
    words: Vec<u64>,
    count: u32,
}

impl PieceSet {
    /// Adds a piece; false if it was there.
    pub fn insert(&mut self, n: u32) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        let fresh = self.words[w] & (1 << b) == 0;
        self.words[w] |= 1 << b;
        self.count += fresh as u32;
        fresh
    }

    /// Sets pieces `0..count` (a finished peer): one pass over words, not pieces.
    pub fn fill(&mut self, count: u32) {
        let full_words = (count / 64) as usize;
        let rest = count % 64;
        self.words.resize(full_words + (rest > 0) as usize, 0);
        for w in &mut self.words[..full_words] {
            *w = u64::MAX;
        }
        if rest > 0 {
            self.words[full_words] = (1u64 << rest) - 1;
        }
        self.count = self.words.iter().map(|w| w.count_ones()).sum();
    }

    pub fn contains(&self, n: u32) -> bool {
        let (w, b) = ((n / 64) as usize, n % 64);
        self.words.get(w).is_some_and(|word| word & (1 << b) != 0)
    }

    pub fn len(&self) -> u32 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// How many pieces `self` has that `other` lacks.
    pub fn count_missing_from(&self, other: &PieceSet) -> u32 {
        self.words
            .iter()
            .enumerate()
            .map(|(i, w)| (w & !other.words.get(i).copied().unwrap_or(0)).count_ones())
            .sum()
    }
}

/// A host as announced (AnnounceHost) or first seen at registration.
#[derive(Debug, Clone)]
pub struct Host {
    pub id: String,
    /// A seed peer the scheduler trusts (its config names it); a host that merely
    /// announces itself as a seed is a normal host.
    pub is_seed: bool,
    pub proto: common::Host,
    /// The address its announcement came from, when known.
    pub observed_ip: Option<IpAddr>,
    pub announced_at: Instant,
    pub peers: HashSet<String>,
    /// Its upload and download as the pieces reported show them (see [`Meter`]); used in
    /// place of announced rates that say nothing when [`Resources::measure_rates`] is on.
    pub tx_meter: Meter,
    pub rx_meter: Meter,
}

/// Announced rates at or above this say nothing about a link: the daemons' default
/// limits (ours 50 GB/s, exactly this; upstream's 50 GiB/s) are what a host nobody
/// configured announces.
pub const UNCONFIGURED_RATE_BPS: u64 = 400_000_000_000;

impl Host {
    pub fn from_proto(proto: common::Host) -> Host {
        Host {
            id: proto.id.clone(),
            is_seed: proto.r#type != 0,
            proto,
            observed_ip: None,
            announced_at: Instant::now(),
            peers: HashSet::new(),
            tx_meter: Meter::default(),
            rx_meter: Meter::default(),
        }
    }

    /// The download rate the scheduler goes by (0: unknown); `measure`:
    /// [`Resources::measure_rates`].
    fn rx_bps(&self, measure: bool) -> u64 {
        rate(
            network_of(Some(self)).max_rx_bandwidth,
            self.rx_meter.estimate_bps(),
            measure,
        )
    }

    /// The upload rate the scheduler goes by (0: unknown), as [`Host::rx_bps`]. Measured,
    /// it is the higher of the two meters': a host's upload shows only what its children
    /// ask, which early in a task is little (few pieces), while its download is asked of
    /// by several parents and fills its link; taking the upload estimate alone gave equal
    /// hosts unequal children counts (BENCHMARKS.md). Links are taken as symmetric here;
    /// an asymmetric one should be announced.
    fn tx_bps(&self, measure: bool) -> u64 {
        rate(
            network_of(Some(self)).max_tx_bandwidth,
            self.tx_meter
                .estimate_bps()
                .max(self.rx_meter.estimate_bps()),
            measure,
        )
    }
}

/// A host's announced network, or an empty one (every rate unknown) when it announced none.
fn network_of(host: Option<&Host>) -> &common::Network {
    static UNKNOWN: std::sync::OnceLock<common::Network> = std::sync::OnceLock::new();
    host.and_then(|h| h.proto.network.as_ref())
        .unwrap_or_else(|| UNKNOWN.get_or_init(common::Network::default))
}

/// The announced rate when it says something; else, when measuring, the meters' `estimate`
/// (0, unknown, until they have one).
fn rate(announced: u64, estimate: u64, measure: bool) -> u64 {
    if !measure || (announced != 0 && announced < UNCONFIGURED_RATE_BPS) {
        announced
    } else {
        estimate
    }
}

/// A link's rate as the pieces reported over it show it: the highest rate over a window
/// of [`Meter::WINDOW`] seconds (long enough that equal links measure alike: two-second
/// windows of 4 MiB pieces differed by a fifth from host to host and split equal hosts
/// into unequal children counts, BENCHMARKS.md). A lower bound of the link (it shows only what the swarm
/// asked of it), so the estimate asks [`Meter::HEADROOM`] more: a parent given children
/// by it can show more, and its estimate grows while the use follows, up to the link.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Meter {
    /// Start of the current window (seconds on the caller's clock), once a report came.
    start: Option<f64>,
    /// Bytes reported since `start`.
    bytes: u64,
    /// The highest windowed rate so far (bits per second).
    peak_bps: f64,
}

impl Meter {
    pub const WINDOW: f64 = 6.0;
    pub const HEADROOM: f64 = 1.5;

    /// Records `bytes` ending at `now`. True when the estimate changed. The first report
    /// only starts the window: its bytes moved before it.
    pub fn add(&mut self, now: f64, bytes: u64) -> bool {
        let Some(start) = self.start else {
            self.start = Some(now);
            return false;
        };
        self.bytes = self.bytes.saturating_add(bytes);
        let span = now - start;
        if span < Self::WINDOW {
            return false;
        }
        let rate = self.bytes as f64 * 8.0 / span;
        self.start = Some(now);
        self.bytes = 0;
        if rate > self.peak_bps {
            self.peak_bps = rate;
            return true;
        }
        false
    }

    /// The rate to go by (0 until a window closed).
    pub fn estimate_bps(&self) -> u64 {
        (self.peak_bps * Self::HEADROOM) as u64
    }
}

/// What the scheduler knows of one task.
#[derive(Debug, Clone)]
pub struct Task {
    pub id: String,
    pub url: String,
    pub download: common::Download,
    pub content_length: Option<u64>,
    pub piece_length: Option<u64>,
    pub piece_count: Option<u32>,
    peer_list: Vec<String>,
    peer_index: HashMap<String, usize>,
    /// A seed peer was asked to download it, and when.
    pub seed_triggered: Option<Instant>,
    pub seed_failed: bool,
    pub created_at: Instant,
    pub updated_at: Instant,
    /// Piece digests as reported, and who disagrees with the authority (the seed).
    pub digests: DigestBook,
    /// The layout was stated by a trusted seed peer (a disagreeing registrant is wrong).
    pub layout_from_seed: bool,
    /// Peers that can give pieces now or soon ([`Peer::is_giver`]), and how many of them
    /// each host runs: [`Resources::has_available_peer`] in O(1).
    givers: u32,
    givers_by_host: HashMap<String, u32>,
    /// Peers downloading from the origin now.
    back_to_source: u32,
}

impl Task {
    fn new(id: String, download: common::Download) -> Task {
        let now = Instant::now();
        Task {
            id,
            url: download.url.clone(),
            content_length: download.actual_content_length,
            piece_length: download.actual_piece_length.or(download.piece_length),
            piece_count: download.actual_piece_count.map(|c| c as u32),
            download,
            peer_list: Vec::new(),
            peer_index: HashMap::new(),
            seed_triggered: None,
            seed_failed: false,
            created_at: now,
            updated_at: now,
            digests: DigestBook::default(),
            layout_from_seed: false,
            givers: 0,
            givers_by_host: HashMap::new(),
            back_to_source: 0,
        }
    }

    pub fn peer_ids(&self) -> &[String] {
        &self.peer_list
    }

    /// Adds (`+1`) or removes (`-1`) one peer's contribution to the counters.
    fn count(&mut self, host_id: &str, flags: Counted, sign: i32) {
        if flags.giver {
            self.givers = self.givers.saturating_add_signed(sign);
            if sign > 0 {
                *self.givers_by_host.entry(host_id.to_string()).or_default() += 1;
            } else if let Some(n) = self.givers_by_host.get_mut(host_id) {
                *n -= 1;
                if *n == 0 {
                    self.givers_by_host.remove(host_id);
                }
            }
        }
        if flags.back_to_source {
            self.back_to_source = self.back_to_source.saturating_add_signed(sign);
        }
    }

    fn add_peer(&mut self, id: &str) {
        if !self.peer_index.contains_key(id) {
            self.peer_index.insert(id.to_string(), self.peer_list.len());
            self.peer_list.push(id.to_string());
        }
    }

    fn remove_peer(&mut self, id: &str) {
        if let Some(i) = self.peer_index.remove(id) {
            self.peer_list.swap_remove(i);
            if let Some(moved) = self.peer_list.get(i) {
                self.peer_index.insert(moved.clone(), i);
            }
        }
    }

    /// The layout as known so far.
    pub fn layout(&self) -> Layout {
        Layout {
            content_length: self.content_length,
            piece_length: self.piece_length,
            piece_count: self.piece_count,
        }
    }

    /// Replaces the layout (a trusted seed peer stated another one).
    pub fn set_layout(&mut self, layout: Layout) {
        self.content_length = layout.content_length;
        self.piece_length = layout.piece_length;
        self.piece_count = layout.piece_count;
    }

    /// Learns sizes from a registering peer that probed the origin.
    fn learn(&mut self, download: &common::Download) {
        if self.content_length.is_none() {
            self.content_length = download.actual_content_length;
        }
        if self.piece_length.is_none() {
            self.piece_length = download.actual_piece_length.or(download.piece_length);
        }
        if self.piece_count.is_none() {
            self.piece_count = download.actual_piece_count.map(|c| c as u32);
        }
        if self.piece_count.is_none() {
            if let (Some(len), Some(pl)) = (self.content_length, self.piece_length) {
                if pl > 0 {
                    self.piece_count = Some(len.div_ceil(pl) as u32);
                }
            }
        }
    }
}

/// One download of one task by one host.
#[derive(Debug)]
pub struct Peer {
    pub id: String,
    pub task_id: String,
    pub host_id: String,
    pub state: PeerState,
    pub priority: i32,
    pub pieces: PieceSet,
    /// Recent costs (ms) of pieces this peer downloaded, oldest first.
    pub costs: VecDeque<u64>,
    /// Ordered sets (small: a child's parents, a parent's children up to its cap), so that
    /// every walk over the graph visits peers in one order and a decision depends on the
    /// swarm alone, not on a per-process hash seed.
    pub parents: BTreeSet<String>,
    pub children: BTreeSet<String>,
    /// Its host's announced download rate (0: unknown), kept for its parents' sums.
    pub rx_bps: u64,
    /// The download rates of `children`, kept with the edges.
    pub children_rx: scheduling::ChildrenRx,
    /// Parents this peer reported as failing it; never offered to it again.
    pub blocklist: HashSet<String>,
    /// Children on two source addresses reported corrupt data from this peer: never
    /// offered to anyone again.
    pub corrupt: bool,
    /// Source addresses of the children that reported it corrupt (a few suffice).
    pub blamed_by: Vec<Option<IpAddr>>,
    /// Pieces it holds with a digest the authority (or the majority) contradicts; while
    /// any is left it is offered to nobody.
    pub wrong_pieces: HashSet<u32>,
    /// Unique within the scheduler: names the peer in digest books.
    pub seq: u32,
    /// Piece bits reserved for it (its task's piece count).
    pub reserved_bits: u64,
    /// Authoritative digests already sent to it on its stream.
    pub digests_sent: PieceSet,
    pub need_back_to_source: bool,
    /// Failed schedules (no parent found) so far.
    pub schedule_failures: u32,
    /// Bytes it reported by traffic type: back-to-source, remote peer.
    pub source_bytes: u64,
    pub peer_bytes: u64,
    pub created_at: Instant,
    pub updated_at: Instant,
}

impl Peer {
    fn new(id: String, task_id: String, host_id: String, priority: i32) -> Peer {
        let now = Instant::now();
        Peer {
            id,
            task_id,
            host_id,
            state: PeerState::Received,
            priority,
            pieces: PieceSet::default(),
            costs: VecDeque::new(),
            parents: BTreeSet::new(),
            children: BTreeSet::new(),
            rx_bps: 0,
            children_rx: scheduling::ChildrenRx::default(),
            blocklist: HashSet::new(),
            corrupt: false,
            blamed_by: Vec::new(),
            wrong_pieces: HashSet::new(),
            seq: 0,
            reserved_bits: 0,
            digests_sent: PieceSet::default(),
            need_back_to_source: false,
            schedule_failures: 0,
            source_bytes: 0,
            peer_bytes: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// Takes `child`, downloading at `rx_bps`, as a child; the children's rates follow.
    fn add_child(&mut self, child: &str, rx_bps: u64) {
        if self.children.insert(child.to_string()) {
            self.children_rx.add(rx_bps);
        }
    }

    /// Drops `child`, downloading at `rx_bps`; the children's rates follow.
    fn remove_child(&mut self, child: &str, rx_bps: u64) {
        if self.children.remove(child) {
            self.children_rx.remove(rx_bps);
        }
    }

    /// Offered to nobody: proven corrupt, or holding pieces known to be wrong.
    pub fn isolated(&self) -> bool {
        self.corrupt || !self.wrong_pieces.is_empty()
    }

    /// Can give pieces now or soon: finished, at the origin, or downloading with pieces,
    /// and not isolated.
    pub fn is_giver(&self) -> bool {
        !self.isolated()
            && (matches!(self.state, PeerState::Succeeded | PeerState::BackToSource)
                || (self.state == PeerState::Running && !self.pieces.is_empty()))
    }

    fn counted(&self) -> Counted {
        Counted {
            giver: self.is_giver(),
            back_to_source: self.state == PeerState::BackToSource,
        }
    }

    pub fn add_cost(&mut self, millis: u64) {
        if self.costs.len() == COST_WINDOW {
            self.costs.pop_front();
        }
        self.costs.push_back(millis);
    }

    fn is_bad_by_costs(&self) -> bool {
        let (a, b) = self.costs.as_slices();
        if b.is_empty() {
            evaluator::is_bad_by_costs(a)
        } else {
            evaluator::is_bad_by_costs(&self.costs.iter().copied().collect::<Vec<_>>())
        }
    }
}

/// What a peer adds to its task's counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counted {
    giver: bool,
    back_to_source: bool,
}

/// Most peers the search for a path from a child to a candidate parent visits
/// ([`Resources::reaches_within`]); past it the candidate counts as reachable.
pub const REACH_BUDGET: usize = 64;

/// What a bounded search of a peer's descendants found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reach {
    /// Every descendant (the search ended within its budget).
    Within(Vec<String>),
    /// More than the budget: any peer may be one.
    Unknown,
}

impl Reach {
    pub fn contains(&self, id: &str) -> bool {
        match self {
            Reach::Within(ids) => ids.iter().any(|d| d == id),
            Reach::Unknown => true,
        }
    }
}

/// Score bonus of a child's current parents when it is scheduled again.
pub const STICKY_BONUS: f64 = 0.1;

/// Scheduling limits, from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Most parents of one child (a ceiling: [`Limits::parents_per_child`] of the child's
    /// rate fill it).
    pub candidate_parents: usize,
    pub filter_parents: usize,
    /// Most children of one parent (a ceiling: its upload rate sets its cap).
    pub max_children: u32,
    /// How many parents of the child's own rate fill its download: a parent is asked for
    /// this share of it at most, and gets as many children as its upload covers at that
    /// share.
    pub parents_per_child: usize,
}

impl From<&d7y_config::scheduler::Scheduling> for Limits {
    fn from(s: &d7y_config::scheduler::Scheduling) -> Limits {
        Limits {
            candidate_parents: s.candidate_parent_limit as usize,
            filter_parents: s.filter_parent_limit as usize,
            max_children: s.max_children_per_parent,
            parents_per_child: s.parents_per_child as usize,
        }
    }
}

/// The scheduler config's defaults.
impl Default for Limits {
    fn default() -> Limits {
        Limits::from(&d7y_config::scheduler::Scheduling::default())
    }
}

impl Limits {
    /// Parents of the child's rate that fill it, within the parent ceiling.
    fn fill(&self) -> usize {
        self.parents_per_child
            .clamp(1, self.candidate_parents.max(1))
    }
}

/// The result of scheduling one child.
#[derive(Debug, Default, PartialEq)]
pub struct Scheduled {
    /// The child's new parent set (empty: none found).
    pub parents: Vec<String>,
}

/// Hosts, tasks and peers.
#[derive(Debug, Default)]
pub struct Resources {
    pub hosts: HashMap<String, Host>,
    pub tasks: HashMap<String, Task>,
    pub peers: HashMap<String, Peer>,
    /// Peer IDs by [`Peer::seq`].
    pub by_seq: HashMap<u32, String>,
    next_seq: u32,
    /// Piece bits reserved by all peers (bounded by [`crate::limits::MAX_PIECE_BITS`]).
    pub piece_bits: u64,
    /// The peer last handed out by [`Resources::peer_mut`] and what it counted as then: its
    /// change is not in its task's counters yet.
    pending: Option<(String, Counted)>,
    /// Hosts whose announced rates say nothing are rated by what their pieces show
    /// ([`Host::tx_meter`], [`Host::rx_meter`]).
    pub measure_rates: bool,
}

/// Domain failures of resource operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ResourceError {
    #[error("host {0} is unknown; announce it first (AnnounceHost)")]
    UnknownHost(String),
    #[error("task {0} is unknown")]
    UnknownTask(String),
    #[error("peer {0} is unknown; register it first")]
    UnknownPeer(String),
    #[error("peer {peer} belongs to task {actual}, not {claimed}")]
    WrongTask {
        peer: String,
        actual: String,
        claimed: String,
    },
    #[error("the scheduler is full: {0}")]
    Exhausted(String),
}

impl Resources {
    /// The upload and download rates (bits per second, 0: unknown) the scheduler goes by
    /// for a host: announced, or measured when it measures.
    pub fn host_rates_bps(&self, host_id: &str) -> Option<(u64, u64)> {
        let h = self.hosts.get(host_id)?;
        Some((h.tx_bps(self.measure_rates), h.rx_bps(self.measure_rates)))
    }

    /// Adds or refreshes a host.
    pub fn announce_host(&mut self, proto: common::Host) {
        match self.hosts.get_mut(&proto.id) {
            Some(host) => {
                host.is_seed = proto.r#type != 0;
                let id = proto.id.clone();
                host.proto = proto;
                host.announced_at = Instant::now();
                self.host_rx_follows(&id);
            }
            None => {
                self.hosts.insert(proto.id.clone(), Host::from_proto(proto));
            }
        }
    }

    /// A host's download rate may have changed (announced or measured): its peers' rates,
    /// and so their parents' sums, follow.
    fn host_rx_follows(&mut self, host_id: &str) {
        let Some(host) = self.hosts.get(host_id) else {
            return;
        };
        let rx = host.rx_bps(self.measure_rates);
        let peers: Vec<String> = host
            .peers
            .iter()
            .filter(|id| self.peers.get(*id).is_some_and(|p| p.rx_bps != rx))
            .cloned()
            .collect();
        for id in peers {
            self.set_rx(&id, rx);
        }
    }

    /// Peer `child` reported piece `number`, `bytes` long, at `now` (seconds, the caller's
    /// clock), from peer `parent` (none: from the origin). Feeds the hosts' meters; when a
    /// download estimate changes, the child host's peers' rates follow. Call it before the
    /// piece is added to the child's set.
    ///
    /// The report comes from the child, a stranger: only its first report of a piece counts
    /// (a repeat moves no bytes), and a parent's upload is credited only when the scheduler
    /// gave that parent to this child and it is on another host. A child can still overstate
    /// its own download (and so its host's upload, [`Host::tx_bps`]), or a given parent's
    /// upload by up to the task's size; that moves children counts and parents only within
    /// the configured ceilings (`maxChildrenPerParent`, `candidateParentLimit`).
    pub fn observe_piece(
        &mut self,
        child: &str,
        number: u32,
        parent: Option<&str>,
        bytes: u64,
        now: f64,
    ) {
        if !self.measure_rates {
            return;
        }
        let Some(peer) = self.peers.get(child) else {
            return;
        };
        if peer.pieces.contains(number) {
            return;
        }
        let child_host = peer.host_id.clone();
        let parent_host = parent
            .filter(|p| peer.parents.contains(*p))
            .and_then(|p| self.peers.get(p))
            .map(|p| &p.host_id)
            .filter(|h| **h != child_host)
            .cloned();
        if let Some(host) = parent_host.and_then(|h| self.hosts.get_mut(&h)) {
            host.tx_meter.add(now, bytes);
        }
        let Some(host) = self.hosts.get_mut(&child_host) else {
            return;
        };
        if host.rx_meter.add(now, bytes) {
            self.host_rx_follows(&child_host);
        }
    }

    /// A peer's host announced a new download rate: its parents' sums follow.
    fn set_rx(&mut self, peer_id: &str, rx_bps: u64) {
        let Some(peer) = self.peers.get_mut(peer_id) else {
            return;
        };
        let old = std::mem::replace(&mut peer.rx_bps, rx_bps);
        if old == rx_bps {
            return;
        }
        let parents: Vec<String> = peer.parents.iter().cloned().collect();
        for parent in parents {
            if let Some(p) = self.peers.get_mut(&parent) {
                p.children_rx.remove(old);
                p.children_rx.add(rx_bps);
            }
        }
    }

    /// Registers a peer (or re-registers one whose stream was lost), creating its task.
    pub fn register_peer(
        &mut self,
        host_id: &str,
        task_id: &str,
        peer_id: &str,
        download: &common::Download,
    ) -> Result<(), ResourceError> {
        self.settle();
        if !self.hosts.contains_key(host_id) {
            return Err(ResourceError::UnknownHost(host_id.to_string()));
        }
        if let Some(existing) = self.peers.get(peer_id) {
            if existing.task_id != task_id {
                return Err(ResourceError::WrongTask {
                    peer: peer_id.to_string(),
                    actual: existing.task_id.clone(),
                    claimed: task_id.to_string(),
                });
            }
            // A re-registration starts the peer over.
            self.remove_peer(peer_id);
        }
        if self.peers.len() >= crate::limits::MAX_PEERS {
            return Err(ResourceError::Exhausted(format!(
                "{} peers are registered",
                self.peers.len()
            )));
        }
        let reserve = {
            let mut probe = self
                .tasks
                .get(task_id)
                .map(|t| t.layout())
                .unwrap_or_default();
            if probe.piece_count.is_none() {
                probe.piece_count = download.actual_piece_count.map(|c| c as u32);
            }
            probe.piece_count.unwrap_or(0) as u64
        };
        if self.piece_bits + reserve > crate::limits::MAX_PIECE_BITS {
            return Err(ResourceError::Exhausted(format!(
                "piece bitsets would exceed {} bits",
                crate::limits::MAX_PIECE_BITS
            )));
        }
        let task = self
            .tasks
            .entry(task_id.to_string())
            .or_insert_with(|| Task::new(task_id.to_string(), download.clone()));
        task.learn(download);
        task.updated_at = Instant::now();
        task.add_peer(peer_id);
        let mut peer = Peer::new(
            peer_id.to_string(),
            task_id.to_string(),
            host_id.to_string(),
            download.priority,
        );
        peer.need_back_to_source = download.need_back_to_source;
        peer.rx_bps = self
            .hosts
            .get(host_id)
            .map_or(0, |h| h.rx_bps(self.measure_rates));
        self.next_seq = self.next_seq.wrapping_add(1);
        while self.by_seq.contains_key(&self.next_seq) {
            self.next_seq = self.next_seq.wrapping_add(1);
        }
        peer.seq = self.next_seq;
        peer.reserved_bits = reserve;
        self.piece_bits += reserve;
        self.by_seq.insert(peer.seq, peer_id.to_string());
        self.peers.insert(peer_id.to_string(), peer);
        self.hosts
            .get_mut(host_id)
            .expect("checked above")
            .peers
            .insert(peer_id.to_string());
        Ok(())
    }

    /// A peer to change. Its task's counters take the change in at the next call on
    /// `self` (see the module docs).
    pub fn peer_mut(&mut self, peer_id: &str) -> Result<&mut Peer, ResourceError> {
        self.settle();
        let peer = self
            .peers
            .get_mut(peer_id)
            .ok_or_else(|| ResourceError::UnknownPeer(peer_id.to_string()))?;
        self.pending = Some((peer_id.to_string(), peer.counted()));
        Ok(peer)
    }

    /// Brings the counters up to date with the peer last handed out for change.
    fn settle(&mut self) {
        let Some((id, before)) = self.pending.take() else {
            return;
        };
        let Some(peer) = self.peers.get(&id) else {
            return;
        };
        let after = peer.counted();
        if after != before {
            if let Some(task) = self.tasks.get_mut(&peer.task_id) {
                task.count(&peer.host_id, before, -1);
                task.count(&peer.host_id, after, 1);
            }
        }
    }

    /// What the unsettled change adds to `task_id`'s counters: (givers, givers on
    /// `host_id`, back-to-source peers).
    fn unsettled(&self, task_id: &str, host_id: &str) -> (i64, i64, i64) {
        let Some((id, before)) = &self.pending else {
            return (0, 0, 0);
        };
        let Some(peer) = self.peers.get(id).filter(|p| p.task_id == task_id) else {
            return (0, 0, 0);
        };
        let after = peer.counted();
        let giver = after.giver as i64 - before.giver as i64;
        let on_host = if peer.host_id == host_id { giver } else { 0 };
        let bts = after.back_to_source as i64 - before.back_to_source as i64;
        (giver, on_host, bts)
    }

    /// Removes a peer and all its edges; returns its former children.
    pub fn remove_peer(&mut self, peer_id: &str) -> Vec<String> {
        self.settle();
        let Some(peer) = self.peers.remove(peer_id) else {
            return Vec::new();
        };
        for parent in &peer.parents {
            if let Some(p) = self.peers.get_mut(parent) {
                p.remove_child(peer_id, peer.rx_bps);
            }
        }
        for child in &peer.children {
            if let Some(c) = self.peers.get_mut(child) {
                c.parents.remove(peer_id);
            }
        }
        if let Some(task) = self.tasks.get_mut(&peer.task_id) {
            task.remove_peer(peer_id);
            task.count(&peer.host_id, peer.counted(), -1);
            task.digests.forget(peer.seq);
        }
        if let Some(host) = self.hosts.get_mut(&peer.host_id) {
            host.peers.remove(peer_id);
        }
        self.by_seq.remove(&peer.seq);
        self.piece_bits = self.piece_bits.saturating_sub(peer.reserved_bits);
        peer.children.into_iter().collect()
    }

    /// Removes a task and its peers.
    pub fn remove_task(&mut self, task_id: &str) -> bool {
        let Some(task) = self.tasks.get(task_id) else {
            return false;
        };
        for peer in task.peer_list.clone() {
            self.remove_peer(&peer);
        }
        self.tasks.remove(task_id);
        true
    }

    /// Removes a host and its peers.
    pub fn remove_host(&mut self, host_id: &str) -> bool {
        let Some(host) = self.hosts.get(host_id) else {
            return false;
        };
        for peer in host.peers.clone() {
            self.remove_peer(&peer);
        }
        self.hosts.remove(host_id);
        true
    }

    /// Drops every in-edge of a peer (it no longer downloads from anyone).
    pub fn clear_parents(&mut self, peer_id: &str) {
        let Some(peer) = self.peers.get_mut(peer_id) else {
            return;
        };
        let parents: Vec<String> = std::mem::take(&mut peer.parents).into_iter().collect();
        let rx = peer.rx_bps;
        for parent in parents {
            if let Some(p) = self.peers.get_mut(&parent) {
                p.remove_child(peer_id, rx);
            }
        }
    }

    fn add_edge(&mut self, parent: &str, child: &str) {
        let rx = self.peers.get(child).map_or(0, |c| c.rx_bps);
        if let Some(p) = self.peers.get_mut(parent) {
            p.add_child(child, rx);
        }
        if let Some(c) = self.peers.get_mut(child) {
            c.parents.insert(parent.to_string());
        }
    }

    pub fn remove_edge(&mut self, parent: &str, child: &str) {
        let rx = self.peers.get(child).map_or(0, |c| c.rx_bps);
        if let Some(p) = self.peers.get_mut(parent) {
            p.remove_child(child, rx);
        }
        if let Some(c) = self.peers.get_mut(child) {
            c.parents.remove(parent);
        }
    }

    /// Whether `from` reaches `to` along parent→child edges, visiting at most `budget`
    /// peers; a search that runs out of budget answers yes (the cautious side for its one
    /// caller, which then does not take `to` as a parent).
    pub fn reaches_within(&self, from: &str, to: &str, budget: usize) -> bool {
        from == to || self.descendants_within(from, budget).contains(to)
    }

    /// The peers `from` feeds, directly or through others, found by visiting at most
    /// `budget` peers; past the budget the answer is [`Reach::Unknown`] (everything counts
    /// as reachable). One search answers every candidate of a scheduling decision.
    pub fn descendants_within(&self, from: &str, budget: usize) -> Reach {
        let Some(start) = self.peers.get(from) else {
            return Reach::Within(Vec::new());
        };
        // Peers are told apart by the address of their key in `peers`: a visit costs one
        // map lookup and a few integer compares, not string hashing.
        let mut seen: Vec<&str> = Vec::with_capacity(budget.min(64) + 1);
        let mut stack: Vec<&String> = start.children.iter().collect();
        while let Some(id) = stack.pop() {
            let Some((key, p)) = self.peers.get_key_value(id) else {
                continue;
            };
            let key = key.as_str();
            if seen.iter().any(|s| std::ptr::eq(*s, key)) {
                continue;
            }
            if seen.len() >= budget {
                return Reach::Unknown;
            }
            seen.push(key);
            stack.extend(p.children.iter());
        }
        Reach::Within(seen.into_iter().map(str::to_string).collect())
    }

    /// Whether `cand` is fed from outside the child: some peer that can give
    /// ([`Peer::is_giver`]) reaches it along parent→child edges that avoid `child`. The
    /// search walks `cand`'s ancestors, visiting at most `budget` peers; past it the answer
    /// is no (the cautious side: the candidate is then not taken). An empty peer fed
    /// through other empty peers whose own parents are fed (a relay tree from the seed
    /// still filling up) counts as fed: its flights follow theirs.
    fn fed_from_outside(&self, cand: &str, child: &str, budget: usize) -> bool {
        let mut seen: Vec<&str> = Vec::with_capacity(budget.min(64) + 1);
        let mut stack: Vec<&String> = match self.peers.get(cand) {
            Some(p) => p.parents.iter().collect(),
            None => return false,
        };
        while let Some(id) = stack.pop() {
            if id == child || id == cand {
                continue;
            }
            let Some((key, p)) = self.peers.get_key_value(id) else {
                continue;
            };
            let key = key.as_str();
            if seen.iter().any(|s| std::ptr::eq(*s, key)) {
                continue;
            }
            if p.is_giver() {
                return true;
            }
            if seen.len() >= budget {
                return false;
            }
            seen.push(key);
            stack.extend(p.parents.iter());
        }
        false
    }

    /// Normal peers of a task that hold at least one piece, counted up to
    /// [`evaluator::WARM_SWARM`] (a warm swarm; the evaluator asks no more), so a warm
    /// swarm's decision looks at a few sampled peers, not all of them.
    fn warm_holders(&self, sampled: &[String]) -> u32 {
        sampled
            .iter()
            .filter_map(|id| self.peers.get(id))
            .filter(|p| {
                !p.pieces.is_empty() && !self.hosts.get(&p.host_id).is_some_and(|h| h.is_seed)
            })
            .take(evaluator::WARM_SWARM as usize)
            .count() as u32
    }

    /// Builds the candidate snapshot of `parent_id` relative to `child`.
    fn candidate<'a>(
        &'a self,
        parent: &'a Peer,
        child: &Peer,
        child_rx_bps: u64,
        missing: u32,
        limits: &Limits,
    ) -> Candidate<'a> {
        let host = self.hosts.get(&parent.host_id);
        let network = network_of(host);
        let tx_bps = host.map_or(0, |h| h.tx_bps(self.measure_rates));
        Candidate {
            peer_id: &parent.id,
            host_id: &parent.host_id,
            state: parent.state,
            disable_shared: host.is_some_and(|h| h.proto.disable_shared),
            in_degree: parent.parents.len() as u32,
            // Slow downloads only say something about a parent still downloading; a
            // finished one serves from disk.
            bad: parent.isolated()
                || (parent.state == PeerState::Running && parent.is_bad_by_costs()),
            stats: ParentStats {
                is_seed: host.is_some_and(|h| h.is_seed),
                active: matches!(parent.state, PeerState::Succeeded | PeerState::BackToSource)
                    || (matches!(parent.state, PeerState::Running | PeerState::Received)
                        && !parent.parents.is_empty()),
                useful_pieces: parent.pieces.count_missing_from(&child.pieces),
                child_missing: missing,
                children: parent.children.len() as u32,
                // Counted without the child itself (its own edge is about to be replaced;
                // the caller takes it off `children`).
                max_children: scheduling::children_cap_by_load(
                    tx_bps,
                    child_rx_bps,
                    {
                        let mut others = parent.children_rx;
                        if parent.children.contains(&child.id) {
                            others.remove(child.rx_bps);
                        }
                        others
                    },
                    limits.fill(),
                    limits.max_children,
                ),
                max_tx_bps: tx_bps,
                tx_bps: network.tx_bandwidth.unwrap_or(0),
                idc: network.idc.as_deref(),
                location: network.location.as_deref(),
            },
        }
    }

    /// Chooses a new parent set for `child_id`, replacing its current one, and records the
    /// edges. Parents may be the child's own children (the mesh, see the module docs).
    pub fn schedule(
        &mut self,
        child_id: &str,
        limits: &Limits,
        rng: &mut impl Rng,
    ) -> Result<Scheduled, ResourceError> {
        self.schedule_with(child_id, limits, false, rng)
    }

    /// [`Resources::schedule`], where `allow_full` also accepts parents at their children
    /// cap when no other is available (the last resort before the origin).
    pub fn schedule_with(
        &mut self,
        child_id: &str,
        limits: &Limits,
        allow_full: bool,
        rng: &mut impl Rng,
    ) -> Result<Scheduled, ResourceError> {
        let child = self
            .peers
            .get(child_id)
            .ok_or_else(|| ResourceError::UnknownPeer(child_id.to_string()))?;
        let task = self
            .tasks
            .get(&child.task_id)
            .ok_or_else(|| ResourceError::UnknownTask(child.task_id.clone()))?;
        let missing = task
            .piece_count
            .map(|c| c.saturating_sub(child.pieces.len()))
            .unwrap_or(0);

        // Sample up to filter_parents peers at random (the random order also breaks ties),
        // and always weigh the current parents again: dropping a parent only because the
        // sample missed it would churn a large swarm's parent sets at every refresh.
        let ids = task.peer_ids();
        let mut sampled: Vec<String> = if ids.len() <= limits.filter_parents {
            let mut all = ids.to_vec();
            rand::seq::SliceRandom::shuffle(all.as_mut_slice(), rng);
            all
        } else {
            sample(rng, ids.len(), limits.filter_parents)
                .into_iter()
                .map(|i| ids[i].clone())
                .collect()
        };
        if ids.len() > limits.filter_parents {
            // In the set's order (sorted): runs stay reproducible.
            let current: Vec<&String> = child
                .parents
                .iter()
                .filter(|id| !sampled.contains(id))
                .collect();
            sampled.extend(current.into_iter().cloned());
        }
        let child_host = self.hosts.get(&child.host_id);
        let child_net = network_of(child_host);
        let child_rx_bps = child_host.map_or(0, |h| h.rx_bps(self.measure_rates));
        let stats = ChildStats {
            idc: child_net.idc.as_deref(),
            location: child_net.location.as_deref(),
            warm_holders: self.warm_holders(&sampled),
        };
        let candidates: Vec<Candidate<'_>> = sampled
            .iter()
            .filter_map(|id| self.peers.get(id))
            .map(|p| {
                // The child's own in-edges are about to be replaced: do not count them.
                let mut c = self.candidate(p, child, child_rx_bps, missing, limits);
                if child.parents.contains(&p.id) {
                    c.stats.children = c.stats.children.saturating_sub(1);
                }
                c
            })
            .collect();
        let sampled_count = candidates.len();
        let (mut ranked, rejections) = scheduling::rank(
            &Child {
                peer_id: child_id,
                host_id: &child.host_id,
                blocklist: &child.blocklist,
                stats,
            },
            candidates,
            allow_full,
        );
        // Keep current parents unless clearly beaten: a new parent costs the child new
        // connections and a fresh piece sync.
        for (c, score) in ranked.iter_mut() {
            if child.parents.contains(c.peer_id) {
                *score += STICKY_BONUS;
            }
        }
        scheduling::sort_ranked(&mut ranked);

        // Decided on the graph as it is, then applied: the searches below walk the child's
        // descendants and its candidates' ancestors around the child, which neither the
        // child's old in-edges nor its new ones change.
        let mut chosen: Vec<&str> = Vec::new();
        let mut below = 0usize; // candidates with nothing now that feed only through the child
        let mut reach: Option<Reach> = None; // the child's descendants, when needed
        let mut covered = 0.0; // the share of the child's download the chosen parents cover
        for (candidate, _) in ranked {
            if chosen.len() >= limits.candidate_parents || covered >= 1.0 - 1e-9 {
                break;
            }
            if candidate.is_full() && !chosen.is_empty() {
                // Full parents are the last resort: one, and only when no open one fit.
                break;
            }
            let id = candidate.peer_id;
            // A parent with nothing the child lacks is worth taking only for what it will
            // get from elsewhere: not when its pieces could come only through the child.
            let empty_running = matches!(candidate.state, PeerState::Running | PeerState::Received)
                && candidate.stats.useful_pieces == 0;
            if empty_running && reach.is_none() {
                // One search of the child's descendants answers for every candidate.
                reach = Some(self.descendants_within(child_id, REACH_BUDGET));
            }
            // Below the child, it is still fed from elsewhere when a giver reaches it along
            // a path that avoids the child (the seed, typically, directly or through peers
            // it feeds): two peers then trade what they get from outside, as in a mesh
            // they should.
            let fed_through_child = empty_running
                && reach.as_ref().is_some_and(|r| {
                    r.contains(id) && !self.fed_from_outside(id, child_id, REACH_BUDGET)
                });
            if fed_through_child {
                below += 1;
                continue;
            }
            covered += scheduling::share_of_child(
                candidate.stats.max_tx_bps,
                candidate.stats.max_children,
                child_rx_bps,
                limits.fill(),
            );
            chosen.push(id);
        }
        if chosen.is_empty() {
            tracing::debug!(
                child = child_id,
                sampled = sampled_count,
                ?rejections,
                fed_through_child = below,
                allow_full,
                "no parent chosen"
            );
            // Nothing better: keep the parents it had (the child still uses them).
            return Ok(Scheduled {
                parents: Vec::new(),
            });
        }
        let chosen: Vec<String> = chosen.into_iter().map(str::to_string).collect();
        self.clear_parents(child_id);
        for id in &chosen {
            self.add_edge(id, child_id);
        }
        Ok(Scheduled { parents: chosen })
    }

    /// Whether some peer of the task, on a host other than `except_host`, can give pieces
    /// now or soon (seed triggering and back-to-source decisions hinge on it). O(1).
    pub fn has_available_peer(&self, task_id: &str, except_host: &str) -> bool {
        let (giver, on_host, _) = self.unsettled(task_id, except_host);
        self.tasks.get(task_id).is_some_and(|t| {
            let all = t.givers as i64 + giver;
            let there = t.givers_by_host.get(except_host).copied().unwrap_or(0) as i64 + on_host;
            all > there
        })
    }

    /// Peers of the task downloading from the origin now. O(1).
    pub fn back_to_source_count(&self, task_id: &str) -> usize {
        let (_, _, bts) = self.unsettled(task_id, "");
        self.tasks
            .get(task_id)
            .map_or(0, |t| (t.back_to_source as i64 + bts).max(0) as usize)
    }

    /// Checks the invariants listed in the module docs; returns the first violation.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (id, peer) in &self.peers {
            let task = self
                .tasks
                .get(&peer.task_id)
                .ok_or(format!("peer {id}: no task"))?;
            if !task.peer_index.contains_key(id) {
                return Err(format!("peer {id}: missing from its task"));
            }
            let host = self
                .hosts
                .get(&peer.host_id)
                .ok_or(format!("peer {id}: no host"))?;
            if !host.peers.contains(id) {
                return Err(format!("peer {id}: missing from its host"));
            }
            for parent in &peer.parents {
                let p = self
                    .peers
                    .get(parent)
                    .ok_or(format!("peer {id}: dangling parent"))?;
                if !p.children.contains(id) {
                    return Err(format!("edge {parent}->{id} not mirrored"));
                }
                if p.task_id != peer.task_id {
                    return Err(format!("edge {parent}->{id} crosses tasks"));
                }
                if p.host_id == peer.host_id {
                    return Err(format!("edge {parent}->{id} within one host"));
                }
            }
            let mut rates = Vec::with_capacity(peer.children.len());
            for child in &peer.children {
                let c = self
                    .peers
                    .get(child)
                    .ok_or(format!("peer {id}: dangling child"))?;
                if !c.parents.contains(id) {
                    return Err(format!("edge {id}->{child} not mirrored"));
                }
                rates.push(c.rx_bps);
            }
            if peer.children_rx != scheduling::ChildrenRx::of(rates) {
                return Err(format!("peer {id}: children's rates out of sync"));
            }
            if peer.rx_bps != host.rx_bps(self.measure_rates) {
                return Err(format!("peer {id}: rate differs from its host's"));
            }
        }
        for (id, task) in &self.tasks {
            if task.peer_list.len() != task.peer_index.len() {
                return Err(format!("task {id}: peer index out of sync"));
            }
            let mut givers = 0;
            let mut by_host: HashMap<&str, u32> = HashMap::new();
            let mut back_to_source = 0;
            for p in &task.peer_list {
                let peer = self
                    .peers
                    .get(p)
                    .ok_or(format!("task {id}: dangling peer {p}"))?;
                if peer.is_giver() {
                    givers += 1;
                    *by_host.entry(peer.host_id.as_str()).or_default() += 1;
                }
                back_to_source += (peer.state == PeerState::BackToSource) as u32;
            }
            // The unsettled change (module docs) is counted as a reader would see it.
            let mut counted: HashMap<&str, i64> = task
                .givers_by_host
                .iter()
                .map(|(h, n)| (h.as_str(), *n as i64))
                .collect();
            let mut total = task.givers as i64;
            let mut bts = task.back_to_source as i64;
            if let Some(peer) = self.pending.as_ref().and_then(|(p, _)| self.peers.get(p)) {
                let (giver, on_host, b) = self.unsettled(id, &peer.host_id);
                total += giver;
                bts += b;
                *counted.entry(peer.host_id.as_str()).or_default() += on_host;
            }
            counted.retain(|_, n| *n != 0);
            let scanned: HashMap<&str, i64> =
                by_host.into_iter().map(|(h, n)| (h, n as i64)).collect();
            if (givers as i64, back_to_source as i64, scanned) != (total, bts, counted) {
                return Err(format!("task {id}: counters out of sync"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn host(id: &str, seed: bool) -> common::Host {
        common::Host {
            id: id.into(),
            r#type: seed as u32,
            ip: "127.0.0.1".into(),
            ..Default::default()
        }
    }

    /// A host announcing `bps` both ways.
    fn rated_host(id: &str, seed: bool, bps: u64) -> common::Host {
        common::Host {
            network: Some(common::Network {
                max_tx_bandwidth: bps,
                max_rx_bandwidth: bps,
                ..Default::default()
            }),
            ..host(id, seed)
        }
    }

    fn download(pieces: u64) -> common::Download {
        common::Download {
            url: "http://o/f".into(),
            actual_content_length: Some(pieces * 4),
            actual_piece_length: Some(4),
            ..Default::default()
        }
    }

    fn limits() -> Limits {
        Limits {
            candidate_parents: 4,
            filter_parents: 40,
            max_children: 8,
            parents_per_child: 4,
        }
    }

    /// A task "t" with a seed holding everything and `n` normal peers with no pieces.
    fn swarm(n: usize, pieces: u32) -> Resources {
        swarm_measured(n, pieces, false)
    }

    /// [`swarm`], rating unconfigured hosts by their meters when `measure`.
    fn swarm_measured(n: usize, pieces: u32, measure: bool) -> Resources {
        let mut r = Resources {
            measure_rates: measure,
            ..Default::default()
        };
        r.announce_host(host("seed-host", true));
        r.register_peer("seed-host", "t", "seed", &download(pieces as u64))
            .unwrap();
        let seed = r.peer_mut("seed").unwrap();
        seed.state = PeerState::Succeeded;
        for i in 0..pieces {
            seed.pieces.insert(i);
        }
        for i in 0..n {
            r.announce_host(host(&format!("h{i}"), false));
            r.register_peer(
                &format!("h{i}"),
                "t",
                &format!("p{i}"),
                &download(pieces as u64),
            )
            .unwrap();
            r.peer_mut(&format!("p{i}")).unwrap().state = PeerState::Running;
        }
        r
    }

    #[test]
    fn piece_set_counts() {
        let mut a = PieceSet::default();
        let mut b = PieceSet::default();
        for n in [0, 5, 64, 130] {
            assert!(a.insert(n));
        }
        assert!(!a.insert(5));
        b.insert(5);
        b.insert(200);
        assert_eq!(a.len(), 4);
        assert!(a.contains(130) && !a.contains(131) && !a.contains(100_000));
        assert_eq!(a.count_missing_from(&b), 3);
        assert_eq!(b.count_missing_from(&a), 1);
        for count in [0, 1, 63, 64, 65, 130] {
            let mut full = PieceSet::default();
            full.insert(3);
            full.fill(count);
            assert_eq!(full.len(), count, "{count}");
            assert_eq!(full.contains(count.saturating_sub(1)), count > 0);
            assert!(!full.contains(count));
        }
    }

    #[test]
    fn unknown_host_cannot_register() {
        let mut r = Resources::default();
        assert_eq!(
            r.register_peer("nope", "t", "p", &download(1)),
            Err(ResourceError::UnknownHost("nope".into()))
        );
    }

    #[test]
    fn cold_swarm_gets_the_seed_and_never_a_peer_with_nothing() {
        let mut r = swarm(3, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let s = r.schedule("p0", &limits(), &mut rng).unwrap();
        assert_eq!(s.parents, ["seed"]);
        r.check_invariants().unwrap();
    }

    #[test]
    fn peers_holding_missing_pieces_become_parents_of_each_other() {
        let mut r = swarm(6, 16);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..20 {
            for i in 0..6 {
                let id = format!("p{i}");
                // Each peer gains some distinct pieces between schedules.
                let piece = ((round * 6 + i) % 16) as u32;
                r.peer_mut(&id).unwrap().pieces.insert(piece);
                let s = r.schedule(&id, &limits(), &mut rng).unwrap();
                assert!(!s.parents.is_empty());
                assert!(s.parents.len() <= 4);
                r.check_invariants().unwrap();
            }
        }
        // Someone other than the seed is a parent by now, and some pair feeds both ways.
        assert!(r
            .peers
            .values()
            .any(|p| p.parents.iter().any(|x| x != "seed")));
        assert!(r
            .peers
            .values()
            .any(|p| p.parents.iter().any(|x| p.children.contains(x))));
    }

    #[test]
    fn a_large_swarm_keeps_good_parents_the_sample_missed() {
        // 200 peers, 10 sampled per decision: each holds a distinct half of the pieces,
        // so every peer is a useful parent of every other. Refreshes must not drop the
        // current parents just because the random sample left them out.
        let mut r = swarm(200, 64);
        for i in 0..200u32 {
            let p = r.peer_mut(&format!("p{i}")).unwrap();
            for n in 0..32 {
                p.pieces.insert((i + n * 2) % 64);
            }
        }
        let limits = Limits {
            candidate_parents: 4,
            filter_parents: 10,
            max_children: 50,
            parents_per_child: 4,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let first = r.schedule("p0", &limits, &mut rng).unwrap().parents;
        assert_eq!(first.len(), 4);
        for _ in 0..20 {
            let again = r.schedule("p0", &limits, &mut rng).unwrap().parents;
            let kept = again.iter().filter(|p| first.contains(p)).count();
            assert!(kept >= 3, "{first:?} -> {again:?}");
        }
        r.check_invariants().unwrap();
    }

    #[test]
    fn two_peers_trade_both_ways_but_empty_peers_never_feed_only_each_other() {
        let mut r = swarm(2, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // p0 holds 0..2 and is p1's parent; p1 holds 2..8: p1 becomes p0's parent too.
        for n in 0..2 {
            r.peer_mut("p0").unwrap().pieces.insert(n);
        }
        r.add_edge("seed", "p0");
        r.add_edge("p0", "p1");
        for n in 2..8 {
            r.peer_mut("p1").unwrap().pieces.insert(n);
        }
        let s = r.schedule("p0", &limits(), &mut rng).unwrap();
        assert!(s.parents.contains(&"p1".to_string()), "{s:?}");
        assert!(r.peers["p1"].parents.contains("p0"), "the old edge stays");
        r.check_invariants().unwrap();
        // An empty child of p0 is no parent for p0: it could only get pieces through p0.
        let mut r2 = swarm(2, 8);
        r2.add_edge("p0", "p1");
        let s = r2.schedule("p0", &limits(), &mut rng).unwrap();
        assert_eq!(s.parents, ["seed"]);
        // But an empty peer fed from elsewhere is (it will have pieces soon).
        let mut r3 = swarm(2, 8);
        r3.add_edge("seed", "p1");
        let s = r3.schedule("p0", &limits(), &mut rng).unwrap();
        let mut got = s.parents.clone();
        got.sort();
        assert_eq!(got, ["p1", "seed"]);
        // An empty child of p0 that the seed also feeds is a parent of p0 as well: both
        // trade what they get from the seed (a mesh from the first piece on).
        let mut r4 = swarm(2, 8);
        r4.add_edge("seed", "p1");
        r4.add_edge("p0", "p1");
        let s = r4.schedule("p0", &limits(), &mut rng).unwrap();
        let mut got = s.parents.clone();
        got.sort();
        assert_eq!(got, ["p1", "seed"]);
        r4.check_invariants().unwrap();
    }

    #[test]
    fn the_reach_search_is_bounded_and_errs_towards_reachable() {
        // A chain seed -> p0 -> p1 -> ... -> p99.
        let mut r = swarm(100, 8);
        r.add_edge("seed", "p0");
        for i in 1..100 {
            r.add_edge(&format!("p{}", i - 1), &format!("p{i}"));
        }
        assert!(r.reaches_within("p0", "p10", REACH_BUDGET));
        assert!(!r.reaches_within("p90", "p0", REACH_BUDGET));
        assert!(!r.reaches_within("p98", "p0", 2));
        // Past the budget: "reaches", whether or not it does.
        assert!(r.reaches_within("p0", "p99", REACH_BUDGET));
        assert!(r.reaches_within("p0", "seed", 3));
    }

    #[test]
    fn counters_follow_every_change_and_answer_without_a_scan() {
        let mut r = swarm(3, 8);
        // Only the seed can give.
        assert!(r.has_available_peer("t", "h0"));
        assert!(!r.has_available_peer("t", "seed-host"));
        assert_eq!(r.back_to_source_count("t"), 0);
        r.peer_mut("p0").unwrap().pieces.insert(1);
        assert!(r.has_available_peer("t", "seed-host"));
        r.peer_mut("p1").unwrap().state = PeerState::BackToSource;
        r.peer_mut("p2").unwrap().state = PeerState::BackToSource;
        assert_eq!(r.back_to_source_count("t"), 2);
        r.check_invariants().unwrap();
        // Isolation and removal take a peer out; a re-registration starts it over.
        r.peer_mut("p0").unwrap().wrong_pieces.insert(1);
        r.peer_mut("seed").unwrap().corrupt = true;
        r.remove_peer("p1");
        r.register_peer("h2", "t", "p2", &download(8)).unwrap();
        assert_eq!(r.back_to_source_count("t"), 0);
        assert!(!r.has_available_peer("t", ""));
        r.check_invariants().unwrap();
        assert!(!r.has_available_peer("nope", ""));
        assert_eq!(r.back_to_source_count("nope"), 0);
    }

    #[test]
    fn parents_fill_the_childs_download_rate() {
        // Every host announces its rates: p0..p3 hold everything at 100 Mbit/s, p4 holds
        // everything at 25 Mbit/s, the child p5 downloads at 100 Mbit/s.
        const M: u64 = 1_000_000;
        let mut r = swarm(6, 8);
        let rates = |id: &str, bps: u64| rated_host(id, id == "seed-host", bps);
        r.announce_host(rates("seed-host", 100 * M));
        for i in 0..6 {
            r.announce_host(rates(
                &format!("h{i}"),
                if i == 4 { 25 * M } else { 100 * M },
            ));
        }
        for i in 0..5 {
            let p = r.peer_mut(&format!("p{i}")).unwrap();
            p.state = PeerState::Succeeded;
            for n in 0..8 {
                p.pieces.insert(n);
            }
        }
        let limits = Limits {
            candidate_parents: 8,
            filter_parents: 40,
            max_children: 8,
            parents_per_child: 2,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut with_slow = 0;
        for _ in 0..32 {
            r.clear_parents("p5");
            let got = r.schedule("p5", &limits, &mut rng).unwrap().parents;
            // Two parents at the child's rate fill it; the slow one covers a quarter of it,
            // so with it the child needs a third.
            let slow = got.contains(&"p4".to_string());
            with_slow += slow as u32;
            assert_eq!(got.len(), if slow { 3 } else { 2 }, "{got:?}");
            r.check_invariants().unwrap();
        }
        assert!(with_slow > 0, "the slow parent was never drawn");
        // Unknown rates: parentsPerChild parents.
        let mut r = swarm(6, 8);
        for i in 0..5 {
            r.peer_mut(&format!("p{i}")).unwrap().pieces.insert(0);
        }
        let got = r.schedule("p5", &limits, &mut rng).unwrap().parents;
        assert_eq!(got.len(), 2, "{got:?}");
    }

    #[test]
    fn meter_table() {
        // (reports as (time s, bytes), estimate in bit/s after them)
        let cases: &[(&[(f64, u64)], u64)] = &[
            (&[], 0),
            // The first report only starts the window.
            (&[(0.0, 1_000_000)], 0),
            // A window not yet closed.
            (&[(0.0, 0), (3.0, 1_000_000)], 0),
            // 15 MB over 6 s: 20 Mbit/s, estimated with headroom.
            (&[(0.0, 0), (3.0, 7_500_000), (6.0, 7_500_000)], 30_000_000),
            // A slower window later keeps the peak.
            (
                &[(0.0, 0), (6.0, 15_000_000), (12.0, 3_000_000)],
                30_000_000,
            ),
            // A faster one raises it: 30 MB over 7.5 s, 32 Mbit/s.
            (
                &[
                    (0.0, 0),
                    (6.0, 15_000_000),
                    (9.0, 15_000_000),
                    (13.5, 15_000_000),
                ],
                48_000_000,
            ),
        ];
        for (reports, want) in cases {
            let mut m = Meter::default();
            for (t, b) in *reports {
                m.add(*t, *b);
            }
            assert_eq!(m.estimate_bps(), *want, "{reports:?}");
        }
    }

    #[test]
    fn measured_rates_stand_in_only_for_announcements_that_say_nothing() {
        const M: u64 = 1_000_000;
        for measure in [false, true] {
            let mut r = swarm_measured(3, 8, measure);
            // h0 announced its link, h1 the daemons' default, h2 nothing.
            r.announce_host(rated_host("h0", false, 100 * M));
            r.announce_host(rated_host("h1", false, UNCONFIGURED_RATE_BPS));
            r.add_edge("p0", "p1");
            r.add_edge("p0", "p2");
            for p in ["p0", "p1", "p2"] {
                // 15 MB down over 6 s: 20 Mbit/s, 30 with headroom.
                r.observe_piece(p, 0, None, 0, 0.0);
                r.observe_piece(p, 1, None, 15_000_000, 6.0);
            }
            r.check_invariants().unwrap();
            let rx = |r: &Resources, h: &str| r.hosts[h].rx_bps(r.measure_rates);
            assert_eq!(rx(&r, "h0"), 100 * M, "an announced link is believed");
            if measure {
                assert_eq!(rx(&r, "h1"), 30 * M);
                assert_eq!(rx(&r, "h2"), 30 * M);
                // The parent's sum of its children's rates followed the estimates.
                assert_eq!(r.peers["p0"].children_rx.known_bps, 60 * M);
            } else {
                assert_eq!(rx(&r, "h1"), UNCONFIGURED_RATE_BPS);
                assert_eq!(rx(&r, "h2"), 0);
            }
        }
    }

    #[test]
    fn a_measured_upload_is_the_higher_of_the_two_meters() {
        // (announced both ways, MB uploaded and downloaded in six seconds, upload rate
        // gone by): an upload shows only what children asked, a download fills the link.
        const M: u64 = 1_000_000;
        let cases: &[(u64, u64, u64, u64)] = &[
            (0, 15, 75, 150 * M),
            (0, 75, 15, 150 * M),
            (0, 0, 0, 0),
            (UNCONFIGURED_RATE_BPS, 15, 75, 150 * M),
            // An announced link is believed, measured or not.
            (40 * M, 15, 75, 40 * M),
        ];
        for (announced, up_mb, down_mb, want) in cases {
            let mut h = Host::from_proto(rated_host("h", false, *announced));
            h.tx_meter.add(0.0, 0);
            h.tx_meter.add(6.0, up_mb * M);
            h.rx_meter.add(0.0, 0);
            h.rx_meter.add(6.0, down_mb * M);
            assert_eq!(h.tx_bps(true), *want, "{announced} {up_mb} {down_mb}");
            assert_eq!(h.tx_bps(false), *announced);
        }
    }

    #[test]
    fn measured_slow_parents_give_a_fast_child_more_of_them() {
        // Nobody announced a rate. The child's host measured 200 Mbit/s down, every
        // parent's 25 Mbit/s up: a parent covers an eighth of the child, so it gets the
        // ceiling of parents, not parentsPerChild of them.
        let limits = Limits {
            candidate_parents: 8,
            filter_parents: 40,
            max_children: 8,
            parents_per_child: 4,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for measure in [false, true] {
            let mut r = swarm_measured(9, 16, measure);
            // The parents' uploads are measured by what they gave another child, q.
            r.announce_host(host("hq", false));
            r.register_peer("hq", "t", "q", &download(16)).unwrap();
            for i in 1..9 {
                let id = format!("p{i}");
                let p = r.peer_mut(&id).unwrap();
                p.state = PeerState::Succeeded;
                for n in 0..16 {
                    p.pieces.insert(n);
                }
                r.add_edge(&id, "q");
                let n = 2 * (i - 1);
                r.observe_piece("q", n, Some(&id), 0, 0.0);
                r.observe_piece("q", n + 1, Some(&id), 18_750_000, 6.0);
            }
            r.remove_peer("q");
            r.observe_piece("p0", 0, None, 0, 0.0);
            r.observe_piece("p0", 1, None, 150_000_000, 6.0);
            r.peer_mut("seed").unwrap().state = PeerState::Failed;
            let got = r.schedule("p0", &limits, &mut rng).unwrap().parents;
            assert_eq!(got.len(), if measure { 8 } else { 4 }, "{got:?}");
            r.check_invariants().unwrap();
        }
    }

    #[test]
    fn a_hostile_child_moves_the_meters_only_by_pieces_it_was_given() {
        // Child p0 (host h0) has parent p1 (host h1); p2 is on h2 but not its parent; p3
        // shares p0's host. Each case is a run of reports by p0, then p1's host's upload
        // estimate. The task has 8 pieces of 4 bytes, reported as 1 MB here to see rates.
        const MB: u64 = 1_000_000;
        type Report = (f64, u32, Option<&'static str>, u64);
        let honest = (6 * MB * 8 / 6) * 3 / 2;
        let cases: &[(&str, Vec<Report>, u64, u64)] = &[
            (
                "honest: piece 0 starts the window, six more in six seconds",
                (0..7).map(|n| (n as f64, n, Some("p1"), MB)).collect(),
                honest,
                0,
            ),
            (
                "one piece reported a thousand times counts once: 1 MB in 6 s",
                std::iter::once((0.0, 0, Some("p1"), MB))
                    .chain((0..1000).map(|i| (6.0 + i as f64 / 100.0, 1, Some("p1"), MB)))
                    .collect(),
                2 * MB,
                0,
            ),
            (
                "a parent the scheduler did not give is not credited",
                (0..7).map(|n| (n as f64, n, Some("p2"), MB)).collect(),
                0,
                0,
            ),
            (
                "nor a parent on the child's own host",
                (0..7).map(|n| (n as f64, n, Some("p3"), MB)).collect(),
                0,
                0,
            ),
        ];
        for (what, reports, want_h1, want_h2) in cases {
            let mut r = swarm_measured(4, 8, true);
            r.announce_host(host("h0", false));
            r.register_peer("h0", "t", "p3", &download(8)).unwrap();
            for p in ["p1", "p2", "p3"] {
                let peer = r.peer_mut(p).unwrap();
                peer.state = PeerState::Succeeded;
                for n in 0..8 {
                    peer.pieces.insert(n);
                }
            }
            r.add_edge("p1", "p0");
            for (now, n, parent, bytes) in reports {
                r.observe_piece("p0", *n, *parent, *bytes, *now);
                // The service records the piece after the report; so does this.
                r.peer_mut("p0").unwrap().pieces.insert(*n);
            }
            let tx = |h: &str| r.hosts[h].tx_bps(true);
            assert_eq!(tx("h1"), *want_h1, "{what}");
            assert_eq!(tx("h2"), *want_h2, "{what}");
            // The child's own upload is rated by its download (links taken as symmetric):
            // what it overstates there is its own.
            assert_eq!(tx("h0"), r.hosts["h0"].rx_bps(true), "{what}");
            r.check_invariants().unwrap();
        }
    }

    #[test]
    fn an_inflated_upload_estimate_gives_no_more_than_the_ceiling_of_children() {
        // A child (or a colluding pair) made p1's host look like a terabit uploader: its
        // children count still stops at maxChildrenPerParent.
        let limits = Limits {
            candidate_parents: 1,
            filter_parents: 40,
            max_children: 3,
            parents_per_child: 1,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut r = swarm_measured(12, 8, true);
        r.announce_host(host("hq", false));
        r.register_peer("hq", "t", "q", &download(8)).unwrap();
        let p1 = r.peer_mut("p1").unwrap();
        p1.state = PeerState::Succeeded;
        for n in 0..8 {
            p1.pieces.insert(n);
        }
        r.add_edge("p1", "q");
        r.observe_piece("q", 0, Some("p1"), 0, 0.0);
        r.observe_piece("q", 1, Some("p1"), 1 << 40, 6.0);
        r.remove_peer("q");
        assert!(r.hosts["h1"].tx_bps(true) > 1_000_000_000_000);
        r.peer_mut("seed").unwrap().state = PeerState::Failed;
        // The children announce 100 Mbit/s: by load, p1 could take ten thousand of them.
        for i in (0..12).filter(|i| *i != 1) {
            r.announce_host(rated_host(&format!("h{i}"), false, 100_000_000));
        }
        for i in (0..12).filter(|i| *i != 1) {
            r.schedule(&format!("p{i}"), &limits, &mut rng).unwrap();
            r.check_invariants().unwrap();
        }
        assert!(
            r.peers["p1"].children.len() <= 3,
            "{:?}",
            r.peers["p1"].children
        );
        assert_eq!(r.peers["p1"].children.len(), 3);
    }

    #[test]
    fn parents_keep_their_childrens_rates_as_edges_and_hosts_change() {
        const M: u64 = 1_000_000;
        let mut r = swarm(4, 8);
        let rated = |id: &str, bps: u64| rated_host(id, false, bps);
        r.add_edge("p0", "p1");
        r.add_edge("p0", "p2");
        r.check_invariants().unwrap();
        assert_eq!(r.peers["p0"].children_rx.unknown, 2);
        // A child's host announces a rate: its parent's sum follows.
        r.announce_host(rated("h1", 100 * M));
        r.check_invariants().unwrap();
        assert_eq!(r.peers["p0"].children_rx.known_bps, 100 * M);
        r.announce_host(rated("h1", 40 * M));
        r.remove_edge("p0", "p2");
        r.check_invariants().unwrap();
        assert_eq!(
            r.peers["p0"].children_rx,
            scheduling::ChildrenRx::of([40 * M])
        );
        r.add_edge("p3", "p1");
        r.remove_peer("p1");
        r.check_invariants().unwrap();
        assert_eq!(r.peers["p0"].children_rx.count(), 0);
        assert_eq!(r.peers["p3"].children_rx.count(), 0);
    }

    #[test]
    fn children_cap_spreads_load() {
        let mut r = swarm(12, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // p0 holds everything and is a normal peer: at most max_children may take it.
        let p0 = r.peer_mut("p0").unwrap();
        p0.state = PeerState::Succeeded;
        for n in 0..8 {
            p0.pieces.insert(n);
        }
        let limits = Limits {
            max_children: 3,
            ..limits()
        };
        for i in 1..12 {
            r.schedule(&format!("p{i}"), &limits, &mut rng).unwrap();
        }
        assert!(r.peers["p0"].children.len() <= 3);
        r.check_invariants().unwrap();
    }

    #[test]
    fn a_cap_of_one_makes_a_chain_and_a_full_swarm_still_finds_a_parent() {
        let mut r = swarm(16, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        let limits = Limits {
            max_children: 1,
            ..limits()
        };
        // Each newcomer gets the one peer with a free slot: the previous one.
        for i in 0..16 {
            let id = format!("p{i}");
            let s = r.schedule(&id, &limits, &mut rng).unwrap();
            let want = if i == 0 {
                "seed".to_string()
            } else {
                format!("p{}", i - 1)
            };
            assert_eq!(s.parents, [want], "{id}");
        }
        r.check_invariants().unwrap();
        // The tail fails: a newcomer finds every live parent full, and only the last
        // resort (a full parent) keeps it off the origin.
        r.peer_mut("p15").unwrap().state = PeerState::Failed;
        r.announce_host(host("h16", false));
        r.register_peer("h16", "t", "p16", &download(8)).unwrap();
        r.peer_mut("p16").unwrap().state = PeerState::Running;
        let s = r.schedule("p16", &limits, &mut rng).unwrap();
        assert!(s.parents.is_empty(), "{s:?}");
        let s = r.schedule_with("p16", &limits, true, &mut rng).unwrap();
        assert_eq!(s.parents.len(), 1, "{s:?}");
        r.check_invariants().unwrap();
        // p7's parent fails; the open peers left (p8, its child, and p16's subtree if it
        // hangs below p7) may be its descendants: a full parent above is the last resort.
        r.remove_edge("p6", "p7");
        r.peer_mut("p6").unwrap().state = PeerState::Failed;
        let s = r.schedule_with("p7", &limits, true, &mut rng).unwrap();
        assert!(!s.parents.is_empty(), "{s:?}");
        r.check_invariants().unwrap();
    }

    #[test]
    fn corrupt_and_blocklisted_parents_are_skipped() {
        let mut r = swarm(3, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        r.peer_mut("seed").unwrap().corrupt = true;
        let p1 = r.peer_mut("p1").unwrap();
        p1.state = PeerState::Succeeded;
        for n in 0..8 {
            p1.pieces.insert(n);
        }
        r.peer_mut("p0").unwrap().blocklist.insert("p1".into());
        let s = r.schedule("p0", &limits(), &mut rng).unwrap();
        assert!(s.parents.is_empty(), "{s:?}");
        let s = r.schedule("p2", &limits(), &mut rng).unwrap();
        assert_eq!(s.parents, ["p1"]);
    }

    #[test]
    fn removing_peers_hosts_and_tasks_keeps_everything_consistent() {
        let mut r = swarm(5, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for i in 0..5 {
            let id = format!("p{i}");
            r.peer_mut(&id).unwrap().pieces.insert(i);
            r.schedule(&id, &limits(), &mut rng).unwrap();
        }
        let orphans = r.remove_peer("p0");
        for o in &orphans {
            assert!(!r.peers[o].parents.contains("p0"));
        }
        r.check_invariants().unwrap();
        assert!(r.remove_host("h1"));
        r.check_invariants().unwrap();
        assert!(!r.peers.contains_key("p1"));
        assert!(r.remove_task("t"));
        assert!(r.peers.is_empty());
        r.check_invariants().unwrap();
    }
}
