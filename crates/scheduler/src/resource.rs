//! The in-memory swarm: hosts, tasks, peers, and each task's parent graph.
//!
//! **Invariants** (checked by the tests at the bottom):
//! - every peer's task and host exist; a task's peer list holds exactly its peers;
//! - `parents`/`children` are mirror images, and only link peers of the same task;
//! - the parent graph of a task has no cycle, and no edge joins two peers of one host;
//! - removing a peer removes all its edges.
//!
//! Everything here is synchronous and runs under the service's one lock; nothing awaits.

use crate::digests::DigestBook;
use crate::evaluator::{self, ChildStats, ParentStats, COST_WINDOW};
use crate::limits::Layout;
use crate::scheduling::{self, Candidate, Child, PeerState};
use dragonfly_api::common::v2 as common;
use rand::seq::index::sample;
use rand::Rng;
use std::collections::{HashMap, HashSet, VecDeque};
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
}

impl Host {
    pub fn from_proto(proto: common::Host) -> Host {
        Host {
            id: proto.id.clone(),
            is_seed: proto.r#type != 0,
            proto,
            observed_ip: None,
            announced_at: Instant::now(),
            peers: HashSet::new(),
        }
    }

    fn network(&self) -> common::Network {
        self.proto.network.clone().unwrap_or_default()
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
        }
    }

    pub fn peer_ids(&self) -> &[String] {
        &self.peer_list
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
    pub parents: HashSet<String>,
    pub children: HashSet<String>,
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
    /// It sends refresh reschedules, so it accepts a new parent set at any time.
    pub refreshes: bool,
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
            parents: HashSet::new(),
            children: HashSet::new(),
            blocklist: HashSet::new(),
            corrupt: false,
            blamed_by: Vec::new(),
            wrong_pieces: HashSet::new(),
            seq: 0,
            reserved_bits: 0,
            digests_sent: PieceSet::default(),
            need_back_to_source: false,
            schedule_failures: 0,
            refreshes: false,
            source_bytes: 0,
            peer_bytes: 0,
            created_at: now,
            updated_at: now,
        }
    }

    /// Offered to nobody: proven corrupt, or holding pieces known to be wrong.
    pub fn isolated(&self) -> bool {
        self.corrupt || !self.wrong_pieces.is_empty()
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

/// Score bonus of a child's current parents when it is scheduled again.
pub const STICKY_BONUS: f64 = 0.1;

/// Scheduling limits, from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub candidate_parents: usize,
    pub filter_parents: usize,
    pub max_children: u32,
}

/// The result of scheduling one child.
#[derive(Debug, Default, PartialEq)]
pub struct Scheduled {
    /// The child's new parent set (empty: none found).
    pub parents: Vec<String>,
    /// Other peers whose parent set changed (an edge to them was reversed); each must be
    /// sent its new set.
    pub revised: Vec<String>,
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
    /// Adds or refreshes a host.
    pub fn announce_host(&mut self, proto: common::Host) {
        match self.hosts.get_mut(&proto.id) {
            Some(host) => {
                host.is_seed = proto.r#type != 0;
                host.proto = proto;
                host.announced_at = Instant::now();
            }
            None => {
                self.hosts.insert(proto.id.clone(), Host::from_proto(proto));
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

    pub fn peer_mut(&mut self, peer_id: &str) -> Result<&mut Peer, ResourceError> {
        self.peers
            .get_mut(peer_id)
            .ok_or_else(|| ResourceError::UnknownPeer(peer_id.to_string()))
    }

    /// Removes a peer and all its edges; returns its former children.
    pub fn remove_peer(&mut self, peer_id: &str) -> Vec<String> {
        let Some(peer) = self.peers.remove(peer_id) else {
            return Vec::new();
        };
        for parent in &peer.parents {
            if let Some(p) = self.peers.get_mut(parent) {
                p.children.remove(peer_id);
            }
        }
        for child in &peer.children {
            if let Some(c) = self.peers.get_mut(child) {
                c.parents.remove(peer_id);
            }
        }
        if let Some(task) = self.tasks.get_mut(&peer.task_id) {
            task.remove_peer(peer_id);
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
        let parents: Vec<String> = peer.parents.drain().collect();
        for parent in parents {
            if let Some(p) = self.peers.get_mut(&parent) {
                p.children.remove(peer_id);
            }
        }
    }

    fn add_edge(&mut self, parent: &str, child: &str) {
        if let Some(p) = self.peers.get_mut(parent) {
            p.children.insert(child.to_string());
        }
        if let Some(c) = self.peers.get_mut(child) {
            c.parents.insert(parent.to_string());
        }
    }

    pub fn remove_edge(&mut self, parent: &str, child: &str) {
        if let Some(p) = self.peers.get_mut(parent) {
            p.children.remove(child);
        }
        if let Some(c) = self.peers.get_mut(child) {
            c.parents.remove(parent);
        }
    }

    /// Whether `from` reaches `to` along parent→child edges.
    pub fn reaches(&self, from: &str, to: &str) -> bool {
        if from == to {
            return true;
        }
        let Some(start) = self.peers.get(from) else {
            return false;
        };
        if start.children.is_empty() {
            return false;
        }
        let mut seen: HashSet<&str> = HashSet::new();
        let mut stack: Vec<&str> = vec![from];
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            if let Some(p) = self.peers.get(id) {
                for c in &p.children {
                    if c == to {
                        return true;
                    }
                    stack.push(c);
                }
            }
        }
        false
    }

    /// The child of `from` through which `from` reaches `to`, if it does.
    pub fn first_hop(&self, from: &str, to: &str) -> Option<String> {
        let start = self.peers.get(from)?;
        let mut seen: HashSet<&str> = HashSet::new();
        for hop in &start.children {
            if hop == to {
                return Some(hop.clone());
            }
            let mut stack: Vec<&str> = vec![hop];
            while let Some(id) = stack.pop() {
                if !seen.insert(id) {
                    continue;
                }
                if let Some(p) = self.peers.get(id) {
                    for c in &p.children {
                        if c == to {
                            return Some(hop.clone());
                        }
                        stack.push(c);
                    }
                }
            }
        }
        None
    }

    /// Normal peers of a task that hold at least one piece (a warm swarm has two or more).
    fn warm_holders(&self, sampled: &[String]) -> u32 {
        sampled
            .iter()
            .filter_map(|id| self.peers.get(id))
            .filter(|p| {
                !p.pieces.is_empty() && !self.hosts.get(&p.host_id).is_some_and(|h| h.is_seed)
            })
            .count() as u32
    }

    /// Builds the candidate snapshot of `parent_id` relative to `child`.
    fn candidate(&self, parent: &Peer, child: &Peer, missing: u32, limits: &Limits) -> Candidate {
        let host = self.hosts.get(&parent.host_id);
        let network = host.map(Host::network).unwrap_or_default();
        Candidate {
            peer_id: parent.id.clone(),
            host_id: parent.host_id.clone(),
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
                    || (parent.state == PeerState::Running && !parent.parents.is_empty()),
                useful_pieces: parent.pieces.count_missing_from(&child.pieces),
                child_missing: missing,
                children: parent.children.len() as u32,
                max_children: limits.max_children,
                max_tx_bps: network.max_tx_bandwidth,
                tx_bps: network.tx_bandwidth.unwrap_or(0),
                idc: network.idc,
                location: network.location,
            },
        }
    }

    /// Chooses a new parent set for `child_id`, replacing its current one, and records the
    /// edges. With `allow_reversal`, a direct child of `child_id` that holds more of what
    /// `child_id` lacks than the reverse may become its parent instead (the edge flips, and
    /// the flipped peer is listed in `revised`); this lets two peers feed each other over time
    /// while the graph stays acyclic at every instant.
    pub fn schedule(
        &mut self,
        child_id: &str,
        limits: &Limits,
        allow_reversal: bool,
        rng: &mut impl Rng,
    ) -> Result<Scheduled, ResourceError> {
        self.schedule_with(child_id, limits, allow_reversal, false, rng)
    }

    /// [`Resources::schedule`], where `allow_full` also accepts parents at their children
    /// cap when no other is available (the last resort before the origin).
    pub fn schedule_with(
        &mut self,
        child_id: &str,
        limits: &Limits,
        allow_reversal: bool,
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

        // Sample up to filter_parents peers at random (the random order also breaks ties).
        let ids = task.peer_ids();
        let sampled: Vec<String> = if ids.len() <= limits.filter_parents {
            let mut all = ids.to_vec();
            rand::seq::SliceRandom::shuffle(all.as_mut_slice(), rng);
            all
        } else {
            sample(rng, ids.len(), limits.filter_parents)
                .into_iter()
                .map(|i| ids[i].clone())
                .collect()
        };
        let child_host = self.hosts.get(&child.host_id);
        let child_net = child_host.map(Host::network).unwrap_or_default();
        let stats = ChildStats {
            idc: child_net.idc,
            location: child_net.location,
            warm_holders: self.warm_holders(&sampled),
        };
        let candidates: Vec<Candidate> = sampled
            .iter()
            .filter_map(|id| self.peers.get(id))
            .map(|p| {
                // The child's own in-edges are about to be replaced: do not count them.
                let mut c = self.candidate(p, child, missing, limits);
                if child.parents.contains(&p.id) {
                    c.stats.children = c.stats.children.saturating_sub(1);
                }
                c
            })
            .collect();
        let blocklist = child.blocklist.clone();
        let child_host_id = child.host_id.clone();
        let sampled_count = candidates.len();
        let current = child.parents.clone();
        let (mut ranked, rejections) = scheduling::rank(
            &Child {
                peer_id: child_id,
                host_id: &child_host_id,
                blocklist: &blocklist,
                stats,
            },
            candidates,
            allow_full,
        );
        // Keep current parents unless clearly beaten: a new parent costs the child new
        // connections and a fresh piece sync.
        for (c, score) in ranked.iter_mut() {
            if current.contains(&c.peer_id) {
                *score += STICKY_BONUS;
            }
        }
        scheduling::sort_ranked(&mut ranked);

        let previous: Vec<String> = self.peers[child_id].parents.iter().cloned().collect();
        self.clear_parents(child_id);
        let mut chosen = Vec::new();
        let mut revised = Vec::new();
        let mut below = 0usize; // ranked candidates skipped as the child's descendants
        let max_reversals = limits.candidate_parents;
        for (candidate, _) in ranked {
            if chosen.len() >= limits.candidate_parents {
                break;
            }
            if candidate.is_full() && !chosen.is_empty() {
                // Full parents are the last resort: one, and only when no open one fit.
                break;
            }
            let id = candidate.peer_id;
            if self.reaches(child_id, &id) {
                if !allow_reversal || revised.len() >= max_reversals {
                    below += 1;
                    continue;
                }
                // Break every path child→…→id by cutting child's out-edge on it, so id
                // can feed child. Only towards the richer side, and only when each cut
                // child accepts a new parent set at any time (it is sent one).
                let (Some(me), Some(other)) = (self.peers.get(child_id), self.peers.get(&id))
                else {
                    continue;
                };
                let gives = other.pieces.count_missing_from(&me.pieces);
                let takes = me.pieces.count_missing_from(&other.pieces);
                if gives == 0 {
                    continue;
                }
                let mut cut = Vec::new();
                while let Some(hop) = self.first_hop(child_id, &id) {
                    if cut.len() >= 3 || !self.peers.get(&hop).is_some_and(|p| p.refreshes) {
                        break;
                    }
                    self.remove_edge(child_id, &hop);
                    cut.push(hop);
                }
                if self.reaches(child_id, &id) {
                    // A path could not be cut: restore and skip this candidate.
                    for hop in cut {
                        self.add_edge(child_id, &hop);
                    }
                    continue;
                }
                tracing::debug!(child = child_id, parent = id, gives, takes, cut = ?cut, "reversing");
                for hop in cut {
                    if !revised.contains(&hop) {
                        revised.push(hop);
                    }
                }
            }
            self.add_edge(&id, child_id);
            chosen.push(id);
        }
        if chosen.is_empty() {
            tracing::debug!(
                child = child_id,
                sampled = sampled_count,
                ?rejections,
                descendants = below,
                allow_full,
                "no parent chosen"
            );
            // Nothing better: keep the parents it had (the child still uses them).
            for id in previous {
                if self.peers.contains_key(&id) && !self.reaches(child_id, &id) {
                    self.add_edge(&id, child_id);
                }
            }
        }
        Ok(Scheduled {
            parents: chosen,
            revised,
        })
    }

    /// Whether some peer of the task can give pieces now or soon (seed triggering and
    /// back-to-source decisions hinge on it).
    pub fn has_available_peer(&self, task_id: &str, except_host: &str) -> bool {
        let Some(task) = self.tasks.get(task_id) else {
            return false;
        };
        task.peer_ids()
            .iter()
            .filter_map(|id| self.peers.get(id))
            .any(|p| {
                p.host_id != except_host
                    && !p.isolated()
                    && (matches!(p.state, PeerState::Succeeded | PeerState::BackToSource)
                        || (p.state == PeerState::Running && !p.pieces.is_empty()))
            })
    }

    /// Peers of the task downloading from the origin now.
    pub fn back_to_source_count(&self, task_id: &str) -> usize {
        self.tasks
            .get(task_id)
            .map(|t| {
                t.peer_ids()
                    .iter()
                    .filter_map(|id| self.peers.get(id))
                    .filter(|p| p.state == PeerState::BackToSource)
                    .count()
            })
            .unwrap_or(0)
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
            for child in &peer.children {
                let c = self
                    .peers
                    .get(child)
                    .ok_or(format!("peer {id}: dangling child"))?;
                if !c.parents.contains(id) {
                    return Err(format!("edge {id}->{child} not mirrored"));
                }
                if self.reaches(child, id) {
                    return Err(format!("cycle through {id} and {child}"));
                }
            }
        }
        for (id, task) in &self.tasks {
            if task.peer_list.len() != task.peer_index.len() {
                return Err(format!("task {id}: peer index out of sync"));
            }
            for p in &task.peer_list {
                if !self.peers.contains_key(p) {
                    return Err(format!("task {id}: dangling peer {p}"));
                }
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
        }
    }

    /// A task "t" with a seed holding everything and `n` normal peers with no pieces.
    fn swarm(n: usize, pieces: u32) -> Resources {
        let mut r = Resources::default();
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
        let s = r.schedule("p0", &limits(), true, &mut rng).unwrap();
        assert_eq!(s.parents, ["seed"]);
        r.check_invariants().unwrap();
    }

    #[test]
    fn peers_holding_missing_pieces_become_parents_and_the_graph_stays_acyclic() {
        let mut r = swarm(6, 16);
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for round in 0..20 {
            for i in 0..6 {
                let id = format!("p{i}");
                // Each peer gains some distinct pieces between schedules.
                let piece = ((round * 6 + i) % 16) as u32;
                let p = r.peer_mut(&id).unwrap();
                p.pieces.insert(piece);
                p.refreshes = true;
                let s = r.schedule(&id, &limits(), true, &mut rng).unwrap();
                assert!(!s.parents.is_empty());
                assert!(s.parents.len() <= 4);
                r.check_invariants().unwrap();
            }
        }
        // Someone other than the seed is a parent by now.
        assert!(r
            .peers
            .values()
            .any(|p| p.parents.iter().any(|x| x != "seed")));
    }

    #[test]
    fn reversal_lets_the_topmost_peer_take_from_its_child() {
        let mut r = swarm(2, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // p0 holds 0..2 and p1 (its child) holds 2..8: p1 should flip to be p0's parent.
        for n in 0..2 {
            r.peer_mut("p0").unwrap().pieces.insert(n);
        }
        r.add_edge("seed", "p0");
        r.add_edge("p0", "p1");
        for n in 2..8 {
            r.peer_mut("p1").unwrap().pieces.insert(n);
        }
        r.peer_mut("p1").unwrap().refreshes = true;
        let s = r.schedule("p0", &limits(), true, &mut rng).unwrap();
        assert!(s.parents.contains(&"p1".to_string()), "{s:?}");
        assert_eq!(s.revised, ["p1"]);
        assert!(!r.peers["p1"].parents.contains("p0"));
        r.check_invariants().unwrap();
        // Without reversal the cycle is simply avoided.
        let mut r2 = swarm(2, 8);
        r2.add_edge("p0", "p1");
        r2.peer_mut("p1").unwrap().pieces.insert(3);
        r2.peer_mut("p1").unwrap().refreshes = true;
        let s = r2.schedule("p0", &limits(), false, &mut rng).unwrap();
        assert_eq!(s.parents, ["seed"]);
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
            r.schedule(&format!("p{i}"), &limits, false, &mut rng)
                .unwrap();
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
            let s = r.schedule(&id, &limits, false, &mut rng).unwrap();
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
        let s = r.schedule("p16", &limits, false, &mut rng).unwrap();
        assert!(s.parents.is_empty(), "{s:?}");
        let s = r
            .schedule_with("p16", &limits, false, true, &mut rng)
            .unwrap();
        assert_eq!(s.parents.len(), 1, "{s:?}");
        r.check_invariants().unwrap();
        // p7's parent fails; the open peers left (p8, its child, and p16's subtree if it
        // hangs below p7) may be its descendants: a full parent above is the last resort.
        r.remove_edge("p6", "p7");
        r.peer_mut("p6").unwrap().state = PeerState::Failed;
        let s = r
            .schedule_with("p7", &limits, false, true, &mut rng)
            .unwrap();
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
        let s = r.schedule("p0", &limits(), false, &mut rng).unwrap();
        assert!(s.parents.is_empty(), "{s:?}");
        let s = r.schedule("p2", &limits(), false, &mut rng).unwrap();
        assert_eq!(s.parents, ["p1"]);
    }

    #[test]
    fn removing_peers_hosts_and_tasks_keeps_everything_consistent() {
        let mut r = swarm(5, 8);
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for i in 0..5 {
            let id = format!("p{i}");
            r.peer_mut(&id).unwrap().pieces.insert(i);
            r.schedule(&id, &limits(), false, &mut rng).unwrap();
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
