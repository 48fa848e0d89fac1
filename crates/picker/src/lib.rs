//! The piece picker: for a download in progress, which missing piece to fetch next and
//! from which source — one of the parents the scheduler gave, or the origin. It owns the
//! decision only: no clock, no I/O, no async. The daemon's piece loop and the swarm
//! simulator drive the same [`Picker`], so what the simulator predicts is what runs.
//!
//! Rules, in order (each pinned by a table test below):
//! - **Demand first.** A piece a reader is waiting for (`wanted`) goes before any other,
//!   on the same terms as the rest.
//! - **One source per idle slot.** Parents with spare in-flight budget are served least
//!   loaded first (in-flight over budget), faster first among equals; each takes the
//!   rarest missing piece it holds (fewest holders among the normal parents), random among
//!   ties, so children of one parent spread over different pieces — except the pieces
//!   only a dealing seed offers: they were dealt to this child, and go oldest deal (lowest
//!   number) first, so none waits behind fresher deals.
//! - **The seed gives what nobody else can.** While a seed parent still deals (it does not
//!   offer every missing piece: [`deal`] holds pieces back for other children), it is
//!   offered only pieces no normal parent holds (a busy normal holder is waited for) — or
//!   only slow ones hold (measured below [`SLOW_FRACTION`] of the fastest normal parent: a
//!   slow host holds nobody back) — and it has [`Config::seed_share`] pieces in flight at
//!   most while normal parents exist or its rate is unknown: its upload goes to new
//!   pieces, which its distinct-first dealing then spreads. Should this download's normal
//!   parents have nothing to give while one of them could take more, the seed gives what
//!   it offers. A seed that offers every missing piece has nothing distinct left to deal:
//!   it is asked like any parent.
//! - **The origin is one more source.** With an origin budget (back-to-source allowed)
//!   it gives, in order, the pieces that no parent holds; with no parents at all that is
//!   the whole download, so a back-to-source run is the same loop as a swarm run.
//! - **Budgets from measured rates.** A parent's in-flight budget covers
//!   [`Config::horizon_secs`] of its measured rate (at least 1, at most
//!   [`Config::max_per_parent`]); an unmeasured parent gets [`Config::default_budget`].
//! - **Endgame.** Once every missing piece is in flight and at most
//!   [`Config::endgame_pieces`] remain, an idle parent (never the origin, whose bytes are
//!   the ones to save) also takes the oldest piece that has a single fetch, if it holds it; the first copy to finish wins
//!   and [`Picker::finished`] names the losers to cancel. Never more than two fetches of
//!   one piece.
//!
//! **Invariants:** a piece is fetched only from a source that holds it (a parent that
//! announced it, or the origin); a held piece is never fetched; at most
//! [`Config::concurrency`] fetches are in flight; a fetch record ends exactly once
//! (finished, failed, or cancelled as a loser), and a late report of an ended one is
//! ignored.

pub mod deal;

use rand::Rng;
use std::collections::HashMap;

/// A parent's handle in one [`Picker`]. Handles of removed parents are not reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParentId(pub u32);

/// Where a piece comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    Parent(ParentId),
    Origin,
}

/// The picker's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Most fetches in flight for the whole download.
    pub concurrency: usize,
    /// Piece length in bytes (the last piece may be shorter).
    pub piece_length: u64,
    /// Seconds of a parent's measured rate its in-flight budget covers.
    pub horizon_secs: f64,
    /// Budget of a parent whose rate is not measured yet. One: in a swarm's first
    /// seconds every parent relays pieces still arriving at it, so two fetches from one
    /// parent each run at half its share and land twice as late, and the children
    /// following them wait as long (measured at N = 16, 100 Mbit: p50 1.17 → 1.15 T*).
    pub default_budget: u32,
    /// Largest budget of one parent.
    pub max_per_parent: u32,
    /// Budget of a seed parent while normal parents are connected.
    pub seed_share: u32,
    /// Missing pieces at or below which the endgame starts (0: never).
    pub endgame_pieces: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            concurrency: 16,
            piece_length: 4 << 20,
            horizon_secs: 0.35,
            default_budget: 1,
            max_per_parent: 4,
            seed_share: 1,
            endgame_pieces: 4,
        }
    }
}

/// The most bytes the endgame's second copies may take for one download (they are held in
/// memory until one copy wins).
pub const ENDGAME_MEMORY: u64 = 64 << 20;

impl Config {
    /// The settings of a download of pieces of `piece_length` bytes with `concurrency`
    /// fetches at most: the defaults, with the endgame covering at most
    /// [`ENDGAME_MEMORY`] of pieces (at least one).
    pub fn for_download(piece_length: u64, concurrency: usize) -> Config {
        let piece_length = piece_length.max(1);
        let defaults = Config::default();
        Config {
            concurrency,
            piece_length,
            endgame_pieces: defaults
                .endgame_pieces
                .min((ENDGAME_MEMORY / piece_length).min(u32::MAX as u64) as u32)
                .max(1),
            ..defaults
        }
    }
}

/// A normal parent measured below this share of the fastest one's rate is slow: the pieces
/// only slow parents hold may come from the seed.
pub const SLOW_FRACTION: f64 = 1.0 / 3.0;

/// A fixed-size bitset of piece numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bits {
    words: Vec<u64>,
}

impl Bits {
    pub fn new(count: u32) -> Bits {
        Bits {
            words: vec![0; count.div_ceil(64) as usize],
        }
    }

    pub fn get(&self, n: u32) -> bool {
        self.words
            .get((n / 64) as usize)
            .is_some_and(|w| w & (1 << (n % 64)) != 0)
    }

    /// Sets bit `n`; false if it was set (or out of range).
    pub fn set(&mut self, n: u32) -> bool {
        match self.words.get_mut((n / 64) as usize) {
            Some(w) if *w & (1 << (n % 64)) == 0 => {
                *w |= 1 << (n % 64);
                true
            }
            _ => false,
        }
    }

    /// Clears bit `n`; false if it was clear.
    pub fn clear(&mut self, n: u32) -> bool {
        match self.words.get_mut((n / 64) as usize) {
            Some(w) if *w & (1 << (n % 64)) != 0 => {
                *w &= !(1 << (n % 64));
                true
            }
            _ => false,
        }
    }

    /// Whether every bit set in `other` is set in `self`.
    fn covers(&self, other: &Bits) -> bool {
        self.words
            .iter()
            .zip(&other.words)
            .all(|(a, b)| b & !a == 0)
    }

    /// Bits set in both `self` and `other`, in order.
    fn and<'a>(&'a self, other: &'a Bits) -> impl Iterator<Item = u32> + 'a {
        self.words
            .iter()
            .zip(&other.words)
            .enumerate()
            .flat_map(|(i, (a, b))| ones(a & b, i as u32 * 64))
    }

    fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words
            .iter()
            .enumerate()
            .flat_map(|(i, w)| ones(*w, i as u32 * 64))
    }
}

fn ones(mut word: u64, base: u32) -> impl Iterator<Item = u32> {
    std::iter::from_fn(move || {
        if word == 0 {
            return None;
        }
        let b = word.trailing_zeros();
        word &= word - 1;
        Some(base + b)
    })
}

#[derive(Debug)]
struct Slot {
    live: bool,
    is_seed: bool,
    /// It can be asked (its piece address is known).
    usable: bool,
    avail: Bits,
    /// Pieces set in `avail`.
    offered: u32,
    inflight: u32,
    /// Measured rate in bytes per second (smoothed).
    rate: Option<f64>,
}

#[derive(Debug, Clone, Copy)]
struct Fetch {
    source: Source,
    /// Assignment order: the endgame duplicates the oldest fetch first.
    seq: u64,
    /// Fetches in flight from the same source when this one began (it shared the link).
    sharing: u32,
}

/// The state of one download's piece choice.
#[derive(Debug)]
pub struct Picker {
    cfg: Config,
    count: u32,
    /// Pieces not held yet.
    missing: Bits,
    missing_count: u32,
    /// Missing pieces with no fetch in flight.
    idle: Bits,
    /// Holders of each piece among the live normal parents, and among the live seeds.
    normal_holders: Vec<u16>,
    seed_holders: Vec<u16>,
    slots: Vec<Slot>,
    normal_parents: u32,
    fetches: HashMap<u32, Vec<Fetch>>,
    inflight: usize,
    origin_budget: u32,
    origin_inflight: u32,
    seq: u64,
}

impl Picker {
    /// A download of `count` pieces, none held yet.
    pub fn new(count: u32, cfg: Config) -> Picker {
        let mut missing = Bits::new(count);
        for n in 0..count {
            missing.set(n);
        }
        Picker {
            cfg,
            count,
            idle: missing.clone(),
            missing,
            missing_count: count,
            normal_holders: vec![0; count as usize],
            seed_holders: vec![0; count as usize],
            slots: Vec::new(),
            normal_parents: 0,
            fetches: HashMap::new(),
            inflight: 0,
            origin_budget: 0,
            origin_inflight: 0,
            seq: 0,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    pub fn piece_count(&self) -> u32 {
        self.count
    }

    /// Pieces still missing (in flight or not).
    pub fn remaining(&self) -> u32 {
        self.missing_count
    }

    pub fn is_done(&self) -> bool {
        self.missing_count == 0
    }

    /// Fetches in flight.
    pub fn in_flight(&self) -> usize {
        self.inflight
    }

    pub fn has(&self, n: u32) -> bool {
        n < self.count && !self.missing.get(n)
    }

    /// Missing pieces, in order.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        self.missing.iter()
    }

    /// Piece `n` is held (stored by an earlier run). Its fetches, if any, are forgotten.
    pub fn mark_held(&mut self, n: u32) {
        if n >= self.count || !self.missing.clear(n) {
            return;
        }
        self.missing_count -= 1;
        self.idle.clear(n);
        for f in self.fetches.remove(&n).unwrap_or_default() {
            self.release(f.source);
        }
    }

    /// Piece `n`, held, turned out wrong: it is missing again.
    pub fn lost(&mut self, n: u32) {
        if n < self.count && self.missing.set(n) {
            self.missing_count += 1;
            self.idle.set(n);
        }
    }

    /// Adds a parent; it holds nothing and cannot be asked until [`Picker::set_usable`].
    pub fn add_parent(&mut self, is_seed: bool) -> ParentId {
        self.slots.push(Slot {
            live: true,
            is_seed,
            usable: false,
            avail: Bits::new(self.count),
            offered: 0,
            inflight: 0,
            rate: None,
        });
        if !is_seed {
            self.normal_parents += 1;
        }
        ParentId(self.slots.len() as u32 - 1)
    }

    /// Takes back a parent removed earlier, under the same handle: its measured rate and
    /// the fetches it still has in flight count again, so a parent the scheduler hands
    /// back gets no fresh budget on top of the work it is still doing. It holds nothing
    /// (its availability is announced anew) and is usable only after
    /// [`Picker::set_usable`]. Unknown or live handles are ignored.
    pub fn restore_parent(&mut self, id: ParentId) {
        let count = self.count;
        let Some(slot) = self.slots.get_mut(id.0 as usize).filter(|s| !s.live) else {
            return;
        };
        slot.live = true;
        slot.usable = false;
        slot.avail = Bits::new(count);
        slot.offered = 0;
        if !slot.is_seed {
            self.normal_parents += 1;
        }
    }

    /// Whether the parent can be asked now (its piece address is known).
    pub fn set_usable(&mut self, id: ParentId, usable: bool) {
        if let Some(s) = self.slot_mut(id) {
            s.usable = usable;
        }
    }

    /// Removes a parent. Its fetches in flight stay recorded until they are reported.
    pub fn remove_parent(&mut self, id: ParentId) {
        let Some(slot) = self.slot_mut(id) else {
            return;
        };
        slot.live = false;
        let is_seed = slot.is_seed;
        let avail = std::mem::replace(&mut slot.avail, Bits::new(0));
        slot.offered = 0;
        for n in avail.iter() {
            self.holders_mut(is_seed)[n as usize] -= 1;
        }
        if !is_seed {
            self.normal_parents -= 1;
        }
    }

    /// The parent holds piece `n` (a SyncPieces announcement). Out-of-range numbers and
    /// repeats are ignored.
    pub fn available(&mut self, id: ParentId, n: u32) {
        if n >= self.count {
            return;
        }
        let Some(slot) = self.slot_mut(id) else {
            return;
        };
        if slot.avail.set(n) {
            slot.offered += 1;
            let seed = slot.is_seed;
            self.holders_mut(seed)[n as usize] += 1;
        }
    }

    /// The parent said it does not have piece `n` after all.
    pub fn unavailable(&mut self, id: ParentId, n: u32) {
        let Some(slot) = self.slot_mut(id) else {
            return;
        };
        if slot.avail.clear(n) {
            slot.offered -= 1;
            let seed = slot.is_seed;
            self.holders_mut(seed)[n as usize] -= 1;
        }
    }

    /// Changes the most fetches in flight (those already in flight stay).
    pub fn set_concurrency(&mut self, concurrency: usize) {
        self.cfg.concurrency = concurrency;
    }

    /// Fetches the origin may have in flight (0: the origin is not a source).
    pub fn set_origin_budget(&mut self, budget: u32) {
        self.origin_budget = budget;
    }

    /// A parent's measured rate in bytes per second, if any.
    pub fn rate(&self, id: ParentId) -> Option<f64> {
        self.slot(id).and_then(|s| s.rate)
    }

    /// How many fetches the parent may have in flight now.
    pub fn budget(&self, id: ParentId) -> u32 {
        self.slot(id).map_or(0, |s| self.slot_budget(s))
    }

    /// A seed that offers every piece has no distinct piece left to deal (its super-seeding
    /// holds nothing back): it is asked like any parent.
    fn restricted_seed(&self, s: &Slot) -> bool {
        s.is_seed && !s.avail.covers(&self.missing)
    }

    fn slot_budget(&self, s: &Slot) -> u32 {
        // A seed still dealing gets its share while normal parents are there, and also
        // before its rate is known (a swarm's first moments, before the scheduler gave
        // normal parents: its upload should start many distinct pieces fast, not two
        // slowly per child); alone with a measured rate, its rate decides.
        if self.restricted_seed(s) && (self.normal_parents > 0 || s.rate.is_none()) {
            return self.cfg.seed_share.max(1);
        }
        match s.rate {
            None => self.cfg.default_budget.max(1),
            Some(rate) => {
                let pieces = rate * self.cfg.horizon_secs / self.cfg.piece_length.max(1) as f64;
                (pieces.ceil() as u32).clamp(1, self.cfg.max_per_parent.max(1))
            }
        }
    }

    /// The next fetch to start, recorded as in flight; `None` when nothing may start now.
    pub fn next(&mut self, wanted: Option<u32>, rng: &mut impl Rng) -> Option<(u32, Source)> {
        if self.inflight >= self.cfg.concurrency || self.missing_count == 0 {
            return None;
        }
        let salt: u64 = rng.gen();
        let choice = wanted
            .filter(|n| *n < self.count && self.idle.get(*n))
            .and_then(|n| self.source_for(n, salt).map(|s| (n, s)))
            .or_else(|| self.pick_fresh(salt, rng))
            .or_else(|| self.pick_seed_for_idle_link(salt))
            .or_else(|| self.pick_endgame(salt));
        let (n, source) = choice?;
        self.start(n, source);
        Some((n, source))
    }

    /// Piece `n` arrived from `source`. Returns the other sources still fetching it (the
    /// endgame's losers): their records end here, and the caller cancels them.
    pub fn finished(&mut self, n: u32, source: Source, bytes: u64, secs: f64) -> Vec<Source> {
        let Some(fetches) = self.fetches.get(&n) else {
            return Vec::new();
        };
        let Some(mine) = fetches.iter().find(|f| f.source == source).copied() else {
            return Vec::new(); // a loser's late report
        };
        if let (Source::Parent(id), true) = (source, secs > 0.0) {
            let sample = bytes as f64 * mine.sharing.max(1) as f64 / secs;
            if let Some(s) = self.slot_mut(id) {
                s.rate = Some(s.rate.map_or(sample, |r| 0.5 * r + 0.5 * sample));
            }
        }
        let all = self.fetches.remove(&n).unwrap_or_default();
        let mut losers = Vec::new();
        for f in all {
            self.release(f.source);
            if f.source != source {
                losers.push(f.source);
            }
        }
        if self.missing.clear(n) {
            self.missing_count -= 1;
        }
        self.idle.clear(n);
        losers
    }

    /// The fetch of `n` from `source` failed (or was abandoned); `n` may be picked again.
    pub fn failed(&mut self, n: u32, source: Source) {
        let Some(fetches) = self.fetches.get_mut(&n) else {
            return;
        };
        let Some(i) = fetches.iter().position(|f| f.source == source) else {
            return;
        };
        fetches.swap_remove(i);
        if fetches.is_empty() {
            self.fetches.remove(&n);
            if self.missing.get(n) {
                self.idle.set(n);
            }
        }
        self.release(source);
    }

    /// Whether piece `n` is being fetched.
    pub fn is_fetching(&self, n: u32) -> bool {
        self.fetches.contains_key(&n)
    }

    /// Sources of the fetches of `n` in flight.
    pub fn sources_of(&self, n: u32) -> Vec<Source> {
        self.fetches
            .get(&n)
            .map(|f| f.iter().map(|f| f.source).collect())
            .unwrap_or_default()
    }

    fn slot(&self, id: ParentId) -> Option<&Slot> {
        self.slots.get(id.0 as usize).filter(|s| s.live)
    }

    fn slot_mut(&mut self, id: ParentId) -> Option<&mut Slot> {
        self.slots.get_mut(id.0 as usize).filter(|s| s.live)
    }

    fn holders_mut(&mut self, seed: bool) -> &mut Vec<u16> {
        if seed {
            &mut self.seed_holders
        } else {
            &mut self.normal_holders
        }
    }

    fn spare(&self, s: &Slot) -> bool {
        s.live && s.usable && s.inflight < self.slot_budget(s)
    }

    fn origin_spare(&self) -> bool {
        self.origin_inflight < self.origin_budget
    }

    /// Whether `slot` may be asked for idle missing piece `n` under the seed rule, with
    /// `floor` the current [`Picker::slow_floor`] and `dealing` its
    /// [`Picker::restricted_seed`] (computed once per slot by the caller: it scans the
    /// missing pieces).
    fn offers(&self, s: &Slot, n: u32, floor: f64, dealing: bool) -> bool {
        if !s.avail.get(n) {
            return false;
        }
        if !dealing || self.normal_holders[n as usize] == 0 {
            return true;
        }
        // Held by normal parents: the seed only when every one of them is slow.
        floor > 0.0
            && self.slots.iter().all(|o| {
                o.is_seed || !o.live || !o.avail.get(n) || o.rate.is_some_and(|r| r < floor)
            })
    }

    /// Measured rates below this are slow: [`SLOW_FRACTION`] of the fastest normal
    /// parent's (0 with none measured).
    fn slow_floor(&self) -> f64 {
        self.slots
            .iter()
            .filter(|s| s.live && !s.is_seed)
            .filter_map(|s| s.rate)
            .fold(0.0, f64::max)
            * SLOW_FRACTION
    }

    /// The best source with spare budget for idle piece `n`.
    fn source_for(&self, n: u32, salt: u64) -> Option<Source> {
        let floor = self.slow_floor();
        let best = self.parent_order(salt).into_iter().find(|id| {
            let s = &self.slots[id.0 as usize];
            self.offers(s, n, floor, self.restricted_seed(s))
        });
        if let Some(id) = best {
            return Some(Source::Parent(id));
        }
        let held = self.normal_holders[n as usize] > 0 || self.seed_holders[n as usize] > 0;
        (!held && self.origin_spare()).then_some(Source::Origin)
    }

    /// Live, usable parents with spare budget: least loaded first, faster first, and
    /// among equals in an order drawn afresh for every pick (so that equal,
    /// unmeasured parents share the first picks instead of the oldest handle taking them).
    fn parent_order(&self, salt: u64) -> Vec<ParentId> {
        let mut order: Vec<(f64, f64, u32, ParentId)> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| self.spare(s))
            .map(|(i, s)| {
                let load = s.inflight as f64 / self.slot_budget(s) as f64;
                let shuffle = mix(i as u64 ^ salt);
                (load, -s.rate.unwrap_or(0.0), shuffle, ParentId(i as u32))
            })
            .collect();
        order.sort_by(|a, b| {
            a.0.total_cmp(&b.0)
                .then(a.1.total_cmp(&b.1))
                .then(a.2.cmp(&b.2))
        });
        order.into_iter().map(|(_, _, _, id)| id).collect()
    }

    /// The least loaded parents' rarest piece: among the parents with spare budget at the
    /// lowest load, the piece with the fewest normal holders that one of them offers
    /// (random among equally rare pieces; among parents offering it, the faster first).
    fn pick_fresh(&self, salt: u64, rng: &mut impl Rng) -> Option<(u32, Source)> {
        let floor = self.slow_floor();
        // (load, rarity, piece, parent) of the best so far, and how many tied with it.
        let mut best: Option<(f64, u16, u32, ParentId)> = None;
        let mut ties = 0u32;
        for id in self.parent_order(salt) {
            let s = &self.slots[id.0 as usize];
            let load = s.inflight as f64 / self.slot_budget(s) as f64;
            if best.is_some_and(|b| load > b.0) {
                break; // parents are in load order: nothing better follows
            }
            let dealing = self.restricted_seed(s);
            for n in s.avail.and(&self.idle) {
                if !self.offers(s, n, floor, dealing) {
                    continue;
                }
                let rarity = self.normal_holders[n as usize];
                match best {
                    Some((_, r, _, _)) if rarity > r => {}
                    Some((_, r, b, _)) if rarity == r => {
                        if b == n {
                            continue; // the same piece at a slower parent
                        }
                        // What a dealing seed offers and nobody else holds was dealt to
                        // this child: the oldest deal first (a seed deals pieces in the
                        // order they reached it, about piece order, so the lowest number),
                        // so none waits behind fresher ones. Drawn at random between two
                        // waiting deals, one deal in a hundred-odd waited seven rounds; on
                        // emulated hosts such a piece left the seed last, twice.
                        if rarity == 0 && dealing {
                            if n < b {
                                best = Some((load, rarity, n, id));
                            }
                            continue;
                        }
                        ties += 1;
                        if rng.gen_range(0..ties) == 0 {
                            best = Some((load, rarity, n, id));
                        }
                    }
                    _ => {
                        best = Some((load, rarity, n, id));
                        ties = 1;
                    }
                }
            }
        }
        if let Some((_, _, n, id)) = best {
            return Some((n, Source::Parent(id)));
        }
        if self.origin_spare() {
            let first = self.idle.iter().find(|n| {
                self.normal_holders[*n as usize] == 0 && self.seed_holders[*n as usize] == 0
            });
            if let Some(n) = first {
                return Some((n, Source::Origin));
            }
        }
        None
    }

    /// The seed for a piece normal parents hold, when they have nothing to give now: a
    /// normal parent has spare budget (this download's link has room) but no idle piece
    /// is offered by one. The rarest such piece the seed offers (random among equals). The
    /// seed offers only what its super-seeding releases (a piece dealt to this child,
    /// one relayed long enough, or anything once every piece went out), so this spends
    /// its upload on copies only when the distinct pieces are out or it would idle.
    fn pick_seed_for_idle_link(&self, salt: u64) -> Option<(u32, Source)> {
        let normal_idle = self.slots.iter().any(|s| !s.is_seed && self.spare(s));
        if !normal_idle {
            return None;
        }
        let mut best: Option<(u16, u32, u32, ParentId)> = None;
        for (i, s) in self.slots.iter().enumerate() {
            if !s.is_seed || !self.spare(s) {
                continue;
            }
            for n in s.avail.and(&self.idle) {
                let key = (self.normal_holders[n as usize], mix(n as u64 ^ salt));
                if best.is_none_or(|b| key < (b.0, b.1)) {
                    best = Some((key.0, key.1, n, ParentId(i as u32)));
                }
            }
        }
        best.map(|(_, _, n, id)| (n, Source::Parent(id)))
    }

    /// A second fetch of the oldest single-fetch piece, by an idle parent that holds it (the
    /// origin is never asked twice for a piece: its bytes are the ones to save).
    fn pick_endgame(&self, salt: u64) -> Option<(u32, Source)> {
        let idle_pieces = self.idle.iter().next().is_some();
        if self.cfg.endgame_pieces == 0
            || self.missing_count > self.cfg.endgame_pieces
            || idle_pieces
        {
            return None;
        }
        let mut singles: Vec<(u64, u32, Source)> = self
            .fetches
            .iter()
            .filter(|(_, f)| f.len() == 1)
            .map(|(n, f)| (f[0].seq, *n, f[0].source))
            .collect();
        singles.sort_by_key(|(seq, n, _)| (*seq, *n));
        let order = self.parent_order(salt);
        for (_, n, current) in singles {
            let parent = order.iter().find(|id| {
                Source::Parent(**id) != current && self.slots[id.0 as usize].avail.get(n)
            });
            if let Some(id) = parent {
                return Some((n, Source::Parent(*id)));
            }
        }
        None
    }

    fn start(&mut self, n: u32, source: Source) {
        let sharing = match source {
            Source::Parent(id) => {
                let s = &mut self.slots[id.0 as usize];
                s.inflight += 1;
                s.inflight
            }
            Source::Origin => {
                self.origin_inflight += 1;
                self.origin_inflight
            }
        };
        self.seq += 1;
        self.fetches.entry(n).or_default().push(Fetch {
            source,
            seq: self.seq,
            sharing,
        });
        self.idle.clear(n);
        self.inflight += 1;
    }

    fn release(&mut self, source: Source) {
        self.inflight -= 1;
        match source {
            Source::Parent(id) => {
                // Removed parents keep their counters until their fetches are reported.
                if let Some(s) = self.slots.get_mut(id.0 as usize) {
                    s.inflight = s.inflight.saturating_sub(1);
                }
            }
            Source::Origin => self.origin_inflight = self.origin_inflight.saturating_sub(1),
        }
    }

    /// Checks the invariants of the module docs; returns the first violation.
    pub fn check(&self) -> Result<(), String> {
        if self.inflight > self.cfg.concurrency {
            return Err(format!("{} in flight", self.inflight));
        }
        let mut total = 0;
        for (n, f) in &self.fetches {
            if !self.missing.get(*n) {
                return Err(format!("held piece {n} in flight"));
            }
            if f.is_empty() || f.len() > 2 {
                return Err(format!("piece {n}: {} fetches", f.len()));
            }
            if self.idle.get(*n) {
                return Err(format!("piece {n} in flight and idle"));
            }
            total += f.len();
        }
        if total != self.inflight {
            return Err(format!("{total} fetch records, {} counted", self.inflight));
        }
        for n in self.idle.iter() {
            if !self.missing.get(n) {
                return Err(format!("held piece {n} idle"));
            }
        }
        Ok(())
    }
}

/// A 64-to-32-bit mixer (splitmix64's finaliser): a cheap, deterministic shuffle key.
fn mix(mut x: u64) -> u32 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (x ^ (x >> 31)) as u32
}

#[cfg(test)]
mod tests;
