//! The supernode's parent scheduler for one task: which peers each peer should fetch from.
//!
//! A [`Swarm`] knows the peers of a task, which pieces each has (bitmaps kept current by
//! `Have`), where each sits (labels), how many children each already serves, how fast each was
//! seen uploading and what others reported about it. Asked for a peer's parents it ranks the
//! other peers by
//!
//! - locality: same host > same zone > same datacenter > elsewhere (it dominates: crossing a
//!   WAN link is what the mesh exists to avoid);
//! - spare upload capacity: fewer children first, and a parent with every slot taken only when
//!   nothing else has what the peer lacks;
//! - measured speed, and how much of the content it has;
//! - failure history: timeouts, refusals and slowness cost points that fade with time.
//!
//! Across datacenters, ranking is not enough: a peer in another datacenter (both labelled, the
//! labels differ) is handed out only for pieces that neither the seed (this supernode, which
//! every peer fetches from anyway) nor any peer of the asking peer's datacenter has. Traffic
//! crosses a WAN link only when nothing local can serve it.
//!
//! A peer reported for corrupt data (a digest mismatch) is isolated for the task at once; one
//! reported for other failures by enough distinct peers is isolated too. Isolated peers are
//! never handed out again, even after they leave and rejoin. Reports travel on authenticated
//! connections from members of the cluster, so a single report of corruption is trusted; reports
//! from isolated peers are not.
//!
//! Sans-IO: events in through `handle_*`, decisions out through `poll_*`, time passed in. Cost
//! of [`Swarm::poll_parents`]: bounded, whatever the swarm's size. Up to [`CANDIDATE_SAMPLE`]
//! peers holding pieces, every one is ranked; beyond, a seeded random sample of them is — drawn
//! first from the asking peer's own zone, then its datacenter, then anywhere, so the local
//! parents that locality prefers are in it — together with the peer's current parents (so a
//! good list is kept rather than reshuffled). Labels are compared as interned numbers. Not for: choosing pieces (that is the peer's
//! [`crate::sched::picker`]), talking to peers.

use std::cmp::Ordering;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use d7q_wire::{BadPeerReason, Bitmap, Labels, NodeId, PeerInfo};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::picker::Bits;

/// Default for [`SwarmConfig::max_parents`].
pub const DEFAULT_MAX_PARENTS: usize = 6;

/// Default for [`SwarmConfig::max_children_per_parent`].
pub const DEFAULT_MAX_CHILDREN_PER_PARENT: usize = 8;

/// Default for [`SwarmConfig::bad_peer_threshold`].
pub const DEFAULT_BAD_PEER_THRESHOLD: usize = 3;

/// Peers holding pieces above which [`Swarm::poll_parents`] ranks a sample instead of all:
/// this many from the asking peer's zone, a quarter as many from its datacenter and a quarter
/// from anywhere.
pub const CANDIDATE_SAMPLE: usize = 128;

/// Failure points halve over this time, so a peer that recovers is used again.
pub const PENALTY_HALF_LIFE: Duration = Duration::from_secs(60);

/// Score per locality tier (host 3, zone 2, dc 1, elsewhere 0). Larger than all the other terms
/// together, so locality decides unless failures weigh in.
const W_LOCALITY: f64 = 4.0;
/// Score of a parent with every slot free (scaled down as children are assigned).
const W_SPARE: f64 = 2.0;
/// Score of a parent infinitely fast (half of it at [`SPEED_REFERENCE`]).
const W_SPEED: f64 = 1.0;
/// Score of a parent with the whole content.
const W_PIECES: f64 = 0.5;
/// Upload speed scored at half of [`W_SPEED`]; also assumed for parents not measured yet, so that
/// new peers get tried. 100 Mbit/s.
const SPEED_REFERENCE: f64 = 12_500_000.0;
/// Weight of a new speed sample in the moving average.
const SPEED_ALPHA: f64 = 0.3;
/// Failure points beyond which a peer no longer counts as having its pieces when deciding
/// whether a remote datacenter is needed: as much as one tier of locality.
const LOCAL_PENALTY_LIMIT: f64 = W_LOCALITY;
/// Failure points per report.
const PENALTY_TIMEOUT: f64 = 1.0;
const PENALTY_REFUSED: f64 = 1.0;
const PENALTY_SLOW: f64 = 0.5;

/// How a [`Swarm`] chooses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmConfig {
    /// Parents handed to a peer at most.
    pub max_parents: usize,
    /// Upload slots of a peer: children it is handed out to at most (unless nothing else).
    pub max_children_per_parent: usize,
    /// Distinct peers reporting timeouts, refusals or slowness that isolate a peer.
    pub bad_peer_threshold: usize,
    /// Seed of the tie-break among equally good parents.
    pub seed: u64,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            max_parents: DEFAULT_MAX_PARENTS,
            max_children_per_parent: DEFAULT_MAX_CHILDREN_PER_PARENT,
            bad_peer_threshold: DEFAULT_BAD_PEER_THRESHOLD,
            seed: 0,
        }
    }
}

/// The peers of one task and their parents.
#[derive(Debug)]
pub struct Swarm {
    cfg: SwarmConfig,
    piece_count: u32,
    peers: HashMap<NodeId, Peer>,
    /// Outlives membership: a peer isolated for the task stays so if it rejoins.
    isolated: HashSet<NodeId>,
    /// Peers that could serve each piece: they have it, upload, and are not isolated.
    avail: Vec<u32>,
    rng: StdRng,
    reschedule: VecDeque<NodeId>,
    reschedule_queued: HashSet<NodeId>,
    /// Pieces the seed itself holds and serves.
    seed_has: Bits,
    /// Peers that can be handed out (they serve, hold a piece, are not isolated): all of
    /// them, by datacenter, and by datacenter and zone.
    holders: Pool,
    holders_by_dc: HashMap<u32, Pool>,
    holders_by_zone: HashMap<(u32, u32), Pool>,
    /// Label strings as numbers (0: no label), so that ranking compares integers.
    names: HashMap<String, u32>,
}

impl Swarm {
    /// A task of `piece_count` pieces with no peers yet.
    pub fn new(piece_count: u32, cfg: SwarmConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            piece_count,
            peers: HashMap::new(),
            isolated: HashSet::new(),
            avail: vec![0; piece_count as usize],
            rng,
            reschedule: VecDeque::new(),
            reschedule_queued: HashSet::new(),
            seed_has: Bits::new(piece_count),
            holders: Pool::default(),
            holders_by_dc: HashMap::new(),
            holders_by_zone: HashMap::new(),
            names: HashMap::new(),
        }
    }

    /// The seed (this supernode) now holds `pieces` and serves them: peers elsewhere are not
    /// needed for them.
    pub fn handle_seed_have(&mut self, pieces: &[u32]) {
        for &i in pieces.iter().filter(|&&i| i < self.piece_count) {
            self.seed_has.set(i);
        }
    }

    /// `peer` joined the task; `addr` is where it serves pieces (`None`: it does not upload).
    /// Joining again updates its address and labels and keeps the rest.
    pub fn handle_join(
        &mut self,
        peer: NodeId,
        addr: Option<SocketAddr>,
        labels: Labels,
        now: Instant,
    ) {
        let was_serving = self.serves(peer);
        let (slots, n) = (self.cfg.max_children_per_parent, self.piece_count);
        let place = Place {
            dc: self.name(&labels.dc),
            zone: self.name(&labels.zone),
            host: self.name(&labels.host),
        };
        let p = self.peers.entry(peer).or_insert_with(|| Peer {
            addr: None,
            labels: Labels::default(),
            place,
            pooled: None,
            has: Bits::new(n),
            has_count: 0,
            parents: Vec::new(),
            children: HashSet::new(),
            slots,
            speed: None,
            penalty: 0.0,
            penalty_at: now,
            reporters: HashSet::new(),
        });
        p.addr = addr;
        p.labels = labels;
        p.place = place;
        let is_serving = self.serves(peer);
        if was_serving != is_serving {
            self.count_pieces(peer, is_serving);
        }
        if !is_serving {
            self.drop_children(peer);
        }
        self.sync_holder(peer);
    }

    /// `peer` left: it is no longer handed out, and the slots it held at its parents are free.
    /// Its children are queued for [`poll_reschedule`](Self::poll_reschedule).
    pub fn handle_leave(&mut self, peer: NodeId) {
        if self.serves(peer) {
            self.count_pieces(peer, false);
        }
        self.drop_children(peer);
        self.release_parents(peer);
        self.unpool(peer);
        self.peers.remove(&peer);
    }

    /// `peer` has exactly the pieces in `bitmap`. Bits past the task's pieces are ignored.
    pub fn handle_bitmap(&mut self, peer: NodeId, bitmap: &Bitmap) {
        let n = self.piece_count;
        let mut has = Bits::new(n);
        for i in bitmap.iter_ones().take_while(|&i| i < n) {
            has.set(i);
        }
        let serving = self.serves(peer);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let old = std::mem::replace(&mut p.has, has);
        p.has_count = p.has.iter_ones().count() as u32;
        if serving {
            for (w, (&o, &h)) in old.words().iter().zip(p.has.words()).enumerate() {
                let mut changed = o ^ h;
                while changed != 0 {
                    let b = changed.trailing_zeros();
                    changed &= changed - 1;
                    let a = &mut self.avail[w * 64 + b as usize];
                    if h & (1 << b) != 0 {
                        *a += 1;
                    } else {
                        *a -= 1;
                    }
                }
            }
        }
        self.sync_holder(peer);
    }

    /// `peer` now has `pieces` too.
    pub fn handle_have(&mut self, peer: NodeId, pieces: &[u32]) {
        let serving = self.serves(peer);
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        let had_none = p.has_count == 0;
        for &i in pieces.iter().filter(|&&i| i < self.piece_count) {
            if p.has.set(i) {
                p.has_count += 1;
                if serving {
                    self.avail[i as usize] += 1;
                }
            }
        }
        if had_none {
            self.sync_holder(peer);
        }
    }

    /// `reporter` says `suspect` misbehaved. Corrupt data isolates the suspect at once; other
    /// failures cost it points, and isolate it once enough distinct peers reported it.
    pub fn handle_report(
        &mut self,
        reporter: NodeId,
        suspect: NodeId,
        reason: BadPeerReason,
        now: Instant,
    ) {
        if reporter == suspect || self.isolated.contains(&reporter) {
            return;
        }
        let points = match reason {
            BadPeerReason::DigestMismatch => {
                self.isolate(suspect);
                return;
            }
            BadPeerReason::Timeout => PENALTY_TIMEOUT,
            BadPeerReason::Refused => PENALTY_REFUSED,
            BadPeerReason::Slow => PENALTY_SLOW,
            // Reasons added later count as an ordinary failure.
            _ => PENALTY_TIMEOUT,
        };
        let Some(p) = self.peers.get_mut(&suspect) else {
            return;
        };
        p.penalty = p.penalty_now(now) + points;
        p.penalty_at = p.penalty_at.max(now);
        p.reporters.insert(reporter);
        if p.reporters.len() >= self.cfg.bad_peer_threshold {
            self.isolate(suspect);
        }
    }

    /// A child saw `parent` deliver `bytes` in `elapsed`: feeds its measured speed.
    pub fn handle_transfer(&mut self, parent: NodeId, bytes: u64, elapsed: Duration) {
        let Some(p) = self.peers.get_mut(&parent) else {
            return;
        };
        if elapsed.is_zero() {
            return;
        }
        let sample = bytes as f64 / elapsed.as_secs_f64();
        p.speed = Some(match p.speed {
            Some(s) => s + SPEED_ALPHA * (sample - s),
            None => sample,
        });
    }

    /// Gives `peer` its own number of upload slots (the seed may serve more children than a
    /// peer).
    pub fn set_upload_slots(&mut self, peer: NodeId, slots: usize) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.slots = slots;
        }
    }

    /// Up to `max_parents` other peers that have pieces `peer` lacks, best first. The list
    /// replaces the previous one: the slots that one held are freed, the new ones taken.
    /// Empty for unknown or complete peers.
    pub fn poll_parents(&mut self, peer: NodeId, now: Instant) -> Vec<PeerInfo> {
        let previous = self
            .peers
            .get(&peer)
            .map(|p| p.parents.clone())
            .unwrap_or_default();
        self.release_parents(peer);
        let Some(me) = self.peers.get(&peer) else {
            return Vec::new();
        };
        if me.has_count >= self.piece_count {
            return Vec::new();
        }
        let place = me.place;
        let ids = self.candidates(place, previous);
        let me = &self.peers[&peer];
        let salt: u64 = self.rng.gen();
        let mut cands: Vec<Candidate> = ids
            .into_iter()
            .filter(|id| *id != peer && self.is_holder(*id))
            .map(|id| {
                let p = &self.peers[&id];
                Candidate {
                    id,
                    full: p.children.len() >= p.slots,
                    score: self.score(me, p, now),
                    tie: mix(fold(id) ^ salt),
                }
            })
            .collect();

        // Best first: only the head is sorted, since most of it will do; the rest only if too
        // many of the best turn out to have nothing this peer lacks.
        let mut chosen: Vec<NodeId> = Vec::new();
        let want = self.cfg.max_parents;
        let head = (want * 4).min(cands.len());
        if head < cands.len() {
            cands.select_nth_unstable_by(head, Candidate::order);
        }
        cands[..head].sort_unstable_by(Candidate::order);
        let mut sorted_all = head == cands.len();
        let mut k = 0;
        let mut first_full = None;
        // What the seed and the peer's own datacenter hold, computed at the first remote
        // candidate (most swarms have none).
        let mut local: Option<Vec<u64>> = None;
        while chosen.len() < want && k < cands.len() {
            if k == head && !sorted_all {
                cands[head..].sort_unstable_by(Candidate::order);
                sorted_all = true;
            }
            let c = &cands[k];
            k += 1;
            if c.full {
                // Full parents sort last: everything that could be chosen has been.
                first_full = Some(k - 1);
                break;
            }
            if self.helps_from(&self.peers[&c.id], me, &mut local, now) {
                chosen.push(c.id);
            }
        }
        if chosen.is_empty() {
            // Nothing with a free slot has what this peer lacks: overload the best full ones
            // rather than leave it without a source.
            if let Some(start) = first_full {
                if !sorted_all {
                    cands[start..].sort_unstable_by(Candidate::order);
                }
                for c in &cands[start..] {
                    if chosen.len() == want {
                        break;
                    }
                    if self.helps_from(&self.peers[&c.id], me, &mut local, now) {
                        chosen.push(c.id);
                    }
                }
            }
        }

        let mut list = Vec::with_capacity(chosen.len());
        for &id in &chosen {
            let Some(p) = self.peers.get_mut(&id) else {
                continue;
            };
            let Some(addr) = p.addr else { continue };
            p.children.insert(peer);
            list.push(PeerInfo {
                node_id: id,
                addr,
                labels: p.labels.clone(),
            });
        }
        if let Some(me) = self.peers.get_mut(&peer) {
            me.parents = chosen;
        }
        list
    }

    /// A peer that lost a parent (it left or was isolated) and should get a new list.
    pub fn poll_reschedule(&mut self) -> Option<NodeId> {
        while let Some(peer) = self.reschedule.pop_front() {
            self.reschedule_queued.remove(&peer);
            if self.peers.contains_key(&peer) {
                return Some(peer);
            }
        }
        None
    }

    /// Whether `peer` is cut off from this task.
    pub fn is_isolated(&self, peer: NodeId) -> bool {
        self.isolated.contains(&peer)
    }

    /// How many peers could serve piece `i`: they have it, upload, and are not isolated.
    pub fn availability(&self, i: u32) -> u32 {
        self.avail.get(i as usize).copied().unwrap_or(0)
    }

    /// Peers in the task, isolated ones included while they stay.
    pub fn peers(&self) -> usize {
        self.peers.len()
    }

    /// Children currently assigned to `peer`.
    pub fn children(&self, peer: NodeId) -> usize {
        self.peers.get(&peer).map_or(0, |p| p.children.len())
    }

    fn serves(&self, peer: NodeId) -> bool {
        !self.isolated.contains(&peer) && self.peers.get(&peer).is_some_and(|p| p.addr.is_some())
    }

    /// Whether `peer` may be handed out: it serves and holds a piece.
    fn is_holder(&self, peer: NodeId) -> bool {
        self.serves(peer) && self.peers.get(&peer).is_some_and(|p| p.has_count > 0)
    }

    /// The peers to rank for a peer at `place`: every holder in a small swarm; in a large one
    /// a sample, local first, and `previous` (the peer's last parents). In a fixed order.
    fn candidates(&mut self, place: Place, previous: Vec<NodeId>) -> Vec<NodeId> {
        if self.holders.len() <= CANDIDATE_SAMPLE {
            return self.holders.ids.clone();
        }
        let mut ids = previous;
        let wide = CANDIDATE_SAMPLE / 4;
        let rng = &mut self.rng;
        if let Some(pool) = self.holders_by_zone.get(&(place.dc, place.zone)) {
            pool.sample(CANDIDATE_SAMPLE, rng, &mut ids);
        }
        if let Some(pool) = self.holders_by_dc.get(&place.dc) {
            pool.sample(wide, rng, &mut ids);
        }
        self.holders.sample(wide, rng, &mut ids);
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Keeps the holder pools in step with `peer`'s state (call after any change to it).
    fn sync_holder(&mut self, peer: NodeId) {
        let want = self.is_holder(peer).then(|| self.peers[&peer].place);
        let have = self.peers.get(&peer).and_then(|p| p.pooled);
        if want == have {
            return;
        }
        self.unpool(peer);
        if let Some(place) = want {
            self.holders.insert(peer);
            self.holders_by_dc.entry(place.dc).or_default().insert(peer);
            self.holders_by_zone
                .entry((place.dc, place.zone))
                .or_default()
                .insert(peer);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.pooled = Some(place);
            }
        }
    }

    /// Takes `peer` out of the holder pools.
    fn unpool(&mut self, peer: NodeId) {
        let Some(place) = self.peers.get_mut(&peer).and_then(|p| p.pooled.take()) else {
            return;
        };
        self.holders.remove(peer);
        if let Some(pool) = self.holders_by_dc.get_mut(&place.dc) {
            pool.remove(peer);
            if pool.is_empty() {
                self.holders_by_dc.remove(&place.dc);
            }
        }
        let key = (place.dc, place.zone);
        if let Some(pool) = self.holders_by_zone.get_mut(&key) {
            pool.remove(peer);
            if pool.is_empty() {
                self.holders_by_zone.remove(&key);
            }
        }
    }

    /// The number of a label string (0 for the empty label).
    fn name(&mut self, label: &str) -> u32 {
        if label.is_empty() {
            return 0;
        }
        if let Some(&n) = self.names.get(label) {
            return n;
        }
        let n = self.names.len() as u32 + 1;
        self.names.insert(label.to_owned(), n);
        n
    }

    fn isolate(&mut self, peer: NodeId) {
        let was_serving = self.serves(peer);
        if !self.isolated.insert(peer) {
            return;
        }
        if was_serving {
            self.count_pieces(peer, false);
        }
        self.drop_children(peer);
        self.sync_holder(peer);
    }

    /// Adds (or removes) `peer`'s pieces to (from) the availability counts.
    fn count_pieces(&mut self, peer: NodeId, add: bool) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        for i in p.has.iter_ones() {
            let a = &mut self.avail[i as usize];
            if add {
                *a += 1;
            } else {
                *a -= 1;
            }
        }
    }

    /// Frees the slots `peer`'s current parents hold for it.
    fn release_parents(&mut self, peer: NodeId) {
        let Some(me) = self.peers.get_mut(&peer) else {
            return;
        };
        for parent in std::mem::take(&mut me.parents) {
            if let Some(p) = self.peers.get_mut(&parent) {
                p.children.remove(&peer);
            }
        }
    }

    /// `peer` serves no one any more: its children lose it and get queued for a new list.
    fn drop_children(&mut self, peer: NodeId) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        // Sorted, so that the order of the queue does not depend on hashing.
        let mut children: Vec<NodeId> = std::mem::take(&mut p.children).into_iter().collect();
        children.sort_unstable();
        for child in children {
            if let Some(c) = self.peers.get_mut(&child) {
                c.parents.retain(|&x| x != peer);
                if self.reschedule_queued.insert(child) {
                    self.reschedule.push_back(child);
                }
            }
        }
    }

    fn score(&self, me: &Peer, p: &Peer, now: Instant) -> f64 {
        let tier = f64::from(me.place.locality(&p.place));
        let spare = if p.slots == 0 {
            0.0
        } else {
            1.0 - (p.children.len() as f64 / p.slots as f64).min(1.0)
        };
        let speed = p.speed.unwrap_or(SPEED_REFERENCE);
        let speed = speed / (speed + SPEED_REFERENCE);
        let pieces = if self.piece_count == 0 {
            0.0
        } else {
            f64::from(p.has_count) / f64::from(self.piece_count)
        };
        W_LOCALITY * tier + W_SPARE * spare + W_SPEED * speed + W_PIECES * pieces
            - p.penalty_now(now)
    }

    /// Whether `p` should serve `me`: it has a piece `me` lacks, and when `p` is in another
    /// datacenter, one that neither the seed nor any peer of `me`'s datacenter has (`local`
    /// caches that union).
    fn helps_from(&self, p: &Peer, me: &Peer, local: &mut Option<Vec<u64>>, now: Instant) -> bool {
        if !me.place.remote(&p.place) {
            return self.helps(p, me);
        }
        let local = local.get_or_insert_with(|| {
            let mut have = self.seed_has.words().to_vec();
            for (qid, q) in &self.peers {
                // A local peer failing all the time does not count as having anything.
                let healthy = q.penalty_now(now) < LOCAL_PENALTY_LIMIT;
                let usable = q.addr.is_some() && !self.isolated.contains(qid);
                if usable && healthy && !me.place.remote(&q.place) {
                    have.iter_mut()
                        .zip(q.has.words())
                        .for_each(|(h, &w)| *h |= w);
                }
            }
            have
        });
        p.has
            .words()
            .iter()
            .zip(me.has.words())
            .zip(local.iter())
            .any(|((&theirs, &mine), &near)| theirs & !mine & !near != 0)
    }

    /// Whether `p` has a piece `me` lacks.
    fn helps(&self, p: &Peer, me: &Peer) -> bool {
        if p.has_count > me.has_count {
            return true;
        }
        p.has
            .words()
            .iter()
            .zip(me.has.words())
            .any(|(&theirs, &mine)| theirs & !mine != 0)
    }
}

#[derive(Debug)]
struct Peer {
    addr: Option<SocketAddr>,
    labels: Labels,
    /// The labels as numbers.
    place: Place,
    /// The place it is filed under in the holder pools, when it is in them.
    pooled: Option<Place>,
    has: Bits,
    has_count: u32,
    /// Its current parents, holding one slot each.
    parents: Vec<NodeId>,
    /// Peers it is a current parent of.
    children: HashSet<NodeId>,
    slots: usize,
    /// Measured upload speed, bytes per second, moving average.
    speed: Option<f64>,
    /// Failure points as of `penalty_at`.
    penalty: f64,
    penalty_at: Instant,
    /// Distinct peers that reported it for non-corruption failures.
    reporters: HashSet<NodeId>,
}

impl Peer {
    fn penalty_now(&self, now: Instant) -> f64 {
        if self.penalty == 0.0 {
            return 0.0;
        }
        let age = now.saturating_duration_since(self.penalty_at);
        self.penalty * 0.5f64.powf(age.as_secs_f64() / PENALTY_HALF_LIFE.as_secs_f64())
    }
}

struct Candidate {
    id: NodeId,
    full: bool,
    score: f64,
    tie: u64,
}

impl Candidate {
    /// Free before full, then higher score, then the seeded tie-break.
    fn order(a: &Self, b: &Self) -> Ordering {
        a.full
            .cmp(&b.full)
            .then(b.score.total_cmp(&a.score))
            .then(a.tie.cmp(&b.tie))
            .then(a.id.cmp(&b.id))
    }
}

/// Where a peer sits: its labels as interned numbers, 0 for none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Place {
    dc: u32,
    zone: u32,
    host: u32,
}

impl Place {
    /// Whether the two sit in different datacenters (both labelled, differently).
    fn remote(&self, other: &Place) -> bool {
        self.dc != 0 && other.dc != 0 && self.dc != other.dc
    }

    /// Locality tier: 3 same host, 2 same zone, 1 same datacenter, 0 elsewhere. Each level
    /// counts only if the levels above it agree, and missing labels never match.
    fn locality(&self, other: &Place) -> u8 {
        let dc = self.dc == other.dc;
        let zone = dc && self.zone == other.zone;
        let host = zone && self.host == other.host;
        if host && self.host != 0 {
            3
        } else if zone && self.zone != 0 {
            2
        } else if dc && self.dc != 0 {
            1
        } else {
            0
        }
    }
}

/// A set of peers that can be sampled at random: a vector and each member's index in it.
#[derive(Debug, Default)]
struct Pool {
    ids: Vec<NodeId>,
    at: HashMap<NodeId, usize>,
}

impl Pool {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    fn insert(&mut self, id: NodeId) {
        if let std::collections::hash_map::Entry::Vacant(e) = self.at.entry(id) {
            e.insert(self.ids.len());
            self.ids.push(id);
        }
    }

    fn remove(&mut self, id: NodeId) {
        let Some(i) = self.at.remove(&id) else {
            return;
        };
        self.ids.swap_remove(i);
        if let Some(&moved) = self.ids.get(i) {
            self.at.insert(moved, i);
        }
    }

    /// Appends `k` distinct members chosen at random to `out` (all of them when there are no
    /// more than `k`).
    fn sample(&self, k: usize, rng: &mut StdRng, out: &mut Vec<NodeId>) {
        let n = self.ids.len();
        if n <= k {
            out.extend_from_slice(&self.ids);
            return;
        }
        // Floyd's algorithm: k distinct indices in O(k).
        let mut picked = HashSet::with_capacity(k);
        for j in n - k..n {
            let t = rng.gen_range(0..=j);
            let i = if picked.insert(t) { t } else { j };
            picked.insert(i);
            out.push(self.ids[i]);
        }
    }
}

fn fold(id: NodeId) -> u64 {
    let v = u128::from_le_bytes(id.0);
    v as u64 ^ (v >> 64) as u64
}

/// SplitMix64's finalizer: spreads a salted id into a tie-break key.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    const N: u32 = 16;

    fn id(k: u32) -> NodeId {
        let mut b = [0; 16];
        b[..4].copy_from_slice(&k.to_be_bytes());
        b[15] = 1;
        NodeId(b)
    }

    fn addr(k: u32) -> Option<SocketAddr> {
        Some(SocketAddr::from(([10, 0, (k >> 8) as u8, k as u8], 65002)))
    }

    fn labels(dc: &str, zone: &str, host: &str) -> Labels {
        Labels {
            dc: dc.into(),
            zone: zone.into(),
            host: host.into(),
        }
    }

    /// Locality tier of two label sets, from the strings.
    fn locality(a: &Labels, b: &Labels) -> u8 {
        let mut s = Swarm::new(1, SwarmConfig::default());
        let (pa, pb) = (
            Place {
                dc: s.name(&a.dc),
                zone: s.name(&a.zone),
                host: s.name(&a.host),
            },
            Place {
                dc: s.name(&b.dc),
                zone: s.name(&b.zone),
                host: s.name(&b.host),
            },
        );
        pa.locality(&pb)
    }

    fn ids(list: &[PeerInfo]) -> Vec<NodeId> {
        list.iter().map(|p| p.node_id).collect()
    }

    fn swarm(cfg: SwarmConfig) -> (Swarm, Instant) {
        (Swarm::new(N, cfg), Instant::now())
    }

    /// Joins peer `k` with the whole content.
    fn seed(s: &mut Swarm, k: u32, l: Labels, now: Instant) {
        s.handle_join(id(k), addr(k), l, now);
        s.handle_bitmap(id(k), &Bitmap::full(N));
    }

    #[test]
    fn closer_parents_come_first() {
        let (mut s, now) = swarm(SwarmConfig::default());
        seed(&mut s, 1, labels("dc2", "z9", "far"), now);
        seed(&mut s, 2, labels("dc1", "z2", "h3"), now);
        seed(&mut s, 3, labels("dc1", "z1", "h2"), now);
        seed(&mut s, 4, labels("dc1", "z1", "h1"), now);
        // Same host name in another datacenter is not the same host.
        seed(&mut s, 5, labels("dc3", "z1", "h1"), now);
        s.handle_join(id(9), addr(9), labels("dc1", "z1", "h1"), now);
        let got = ids(&s.poll_parents(id(9), now));
        // The other datacenters have nothing the local peers lack: they are not handed out.
        assert_eq!(got, [id(4), id(3), id(2)]);
        let first = &s.poll_parents(id(9), now)[0];
        assert_eq!(
            (first.addr, &first.labels.host[..]),
            (addr(4).unwrap(), "h1")
        );
    }

    #[test]
    fn remote_parents_only_for_what_nothing_local_has() {
        let (mut s, now) = swarm(SwarmConfig::default());
        let half = |from: u32, to: u32| {
            let mut b = Bitmap::new(N);
            (from..to).for_each(|i| {
                b.set(i);
            });
            b
        };
        // dc-a holds everything; dc-b holds the first half; the asking peer is in dc-b.
        seed(&mut s, 1, labels("dc-a", "", ""), now);
        s.handle_join(id(2), addr(2), labels("dc-b", "", ""), now);
        s.handle_bitmap(id(2), &half(0, N / 2));
        s.handle_join(id(9), addr(9), labels("dc-b", "", ""), now);
        // The second half is nowhere in dc-b: the remote peer is needed.
        assert_eq!(ids(&s.poll_parents(id(9), now)), [id(2), id(1)]);
        // The seed (this supernode) now has the second half: the remote peer is not.
        s.handle_seed_have(&(N / 2..N).collect::<Vec<_>>());
        assert_eq!(ids(&s.poll_parents(id(9), now)), [id(2)]);
        // Unlabelled peers are never remote.
        s.handle_join(id(3), addr(3), Labels::default(), now);
        s.handle_bitmap(id(3), &Bitmap::full(N));
        assert!(ids(&s.poll_parents(id(9), now)).contains(&id(3)));
        // A peer with no datacenter label of its own takes anyone.
        s.handle_join(id(10), addr(10), Labels::default(), now);
        assert_eq!(s.poll_parents(id(10), now).len(), 3);
    }

    #[test]
    fn children_spread_over_parents() {
        let (mut s, now) = swarm(SwarmConfig {
            max_parents: 2,
            max_children_per_parent: 3,
            ..SwarmConfig::default()
        });
        for k in 1..=4 {
            seed(&mut s, k, Labels::default(), now);
        }
        for c in 10..16 {
            s.handle_join(id(c), addr(c), Labels::default(), now);
            assert_eq!(s.poll_parents(id(c), now).len(), 2);
        }
        // 12 slots taken over 4 parents of 3: every one full, none over.
        for k in 1..=4 {
            assert_eq!(s.children(id(k)), 3, "parent {k}");
        }
        // Asking again frees the old slots first: still nobody over capacity.
        for c in 10..16 {
            assert_eq!(s.poll_parents(id(c), now).len(), 2);
        }
        assert_eq!((1..=4).map(|k| s.children(id(k))).sum::<usize>(), 12);
        assert!((1..=4).all(|k| s.children(id(k)) == 3));
        // With every slot taken, a newcomer still gets full parents rather than none.
        s.handle_join(id(20), addr(20), Labels::default(), now);
        assert_eq!(s.poll_parents(id(20), now).len(), 2);
    }

    #[test]
    fn never_itself_nor_addressless_nor_useless_peers() {
        let (mut s, now) = swarm(SwarmConfig::default());
        // A complete peer that does not upload.
        s.handle_join(id(1), None, Labels::default(), now);
        s.handle_bitmap(id(1), &Bitmap::full(N));
        // A peer with only what the child already has.
        s.handle_join(id(2), addr(2), Labels::default(), now);
        s.handle_have(id(2), &[0, 1]);
        // A peer with nothing.
        s.handle_join(id(3), addr(3), Labels::default(), now);
        // A useful one, smaller than the child but with a piece it lacks.
        s.handle_join(id(4), addr(4), Labels::default(), now);
        s.handle_have(id(4), &[7]);
        s.handle_join(id(9), addr(9), Labels::default(), now);
        s.handle_have(id(9), &[0, 1, 2, 3]);
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(4)]);
        // The only peer with everything is the child itself: nothing for the complete peer.
        assert_eq!(s.poll_parents(id(1), now), vec![]);
        assert_eq!(s.poll_parents(id(77), now), vec![]);
        assert_eq!(s.peers(), 5);
        // Piece 0: peers 2 and 9 (1 does not upload).
        assert_eq!(
            (s.availability(0), s.availability(7), s.availability(9)),
            (2, 1, 0)
        );
    }

    #[test]
    fn corrupt_data_isolates_at_once() {
        let (mut s, now) = swarm(SwarmConfig::default());
        seed(&mut s, 1, Labels::default(), now);
        seed(&mut s, 2, Labels::default(), now);
        for c in [9, 10] {
            s.handle_join(id(c), addr(c), Labels::default(), now);
            assert_eq!(s.poll_parents(id(c), now).len(), 2);
        }
        assert_eq!(s.availability(3), 2);
        s.handle_report(id(9), id(1), BadPeerReason::DigestMismatch, now);
        assert!(s.is_isolated(id(1)) && !s.is_isolated(id(2)));
        assert_eq!(s.availability(3), 1);
        assert_eq!(s.children(id(1)), 0);
        // Both of its children are told to ask again, once each.
        let mut again: Vec<NodeId> = std::iter::from_fn(|| s.poll_reschedule()).collect();
        again.sort();
        assert_eq!(again, vec![id(9), id(10)]);
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(2)]);
        // Leaving and rejoining does not clear it.
        s.handle_leave(id(1));
        seed(&mut s, 1, Labels::default(), now);
        assert!(s.is_isolated(id(1)));
        assert_eq!(s.availability(3), 1);
        assert_eq!(ids(&s.poll_parents(id(10), now)), vec![id(2)]);
        // An isolated peer's own reports count for nothing.
        s.handle_report(id(1), id(2), BadPeerReason::DigestMismatch, now);
        assert!(!s.is_isolated(id(2)));
        // Nor does a peer reporting itself.
        s.handle_report(id(2), id(2), BadPeerReason::DigestMismatch, now);
        assert!(!s.is_isolated(id(2)));
    }

    #[test]
    fn timeouts_lower_the_score_then_fade() {
        let (mut s, now) = swarm(SwarmConfig::default());
        seed(&mut s, 1, Labels::default(), now);
        seed(&mut s, 2, Labels::default(), now);
        // 1 is measured faster: first in line.
        s.handle_transfer(id(1), 50_000_000, Duration::from_secs(1));
        s.handle_transfer(id(2), 5_000_000, Duration::from_secs(1));
        s.handle_join(id(9), None, Labels::default(), now);
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(1), id(2)]);
        s.handle_report(id(8), id(1), BadPeerReason::Timeout, now);
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(2), id(1)]);
        // Ten half-lives later it is forgiven.
        let later = now + PENALTY_HALF_LIFE * 10;
        assert_eq!(ids(&s.poll_parents(id(9), later)), vec![id(1), id(2)]);
        // The same reporter many times does not isolate; enough distinct reporters do.
        for _ in 0..10 {
            s.handle_report(id(8), id(1), BadPeerReason::Slow, later);
        }
        assert!(!s.is_isolated(id(1)));
        s.handle_report(id(7), id(1), BadPeerReason::Refused, later);
        assert!(!s.is_isolated(id(1)));
        s.handle_report(id(6), id(1), BadPeerReason::Timeout, later);
        assert!(s.is_isolated(id(1)));
        assert_eq!(ids(&s.poll_parents(id(9), later)), vec![id(2)]);
    }

    #[test]
    fn locality_outweighs_some_failures_not_many() {
        let (mut s, now) = swarm(SwarmConfig {
            bad_peer_threshold: 100,
            ..SwarmConfig::default()
        });
        seed(&mut s, 1, labels("dc1", "z1", "h1"), now);
        seed(&mut s, 2, labels("dc2", "z1", "h1"), now);
        s.handle_join(id(9), addr(9), labels("dc1", "z1", "h9"), now);
        assert_eq!(ids(&s.poll_parents(id(9), now))[0], id(1));
        for r in 20..22 {
            s.handle_report(id(r), id(1), BadPeerReason::Timeout, now);
        }
        for r in 22..25 {
            s.handle_report(id(r), id(1), BadPeerReason::Slow, now);
        }
        // 3.5 points do not outweigh two tiers of locality (8 points)…
        assert_eq!(ids(&s.poll_parents(id(9), now))[0], id(1));
        // …but a peer failing all the time does.
        for r in 25..30 {
            s.handle_report(id(r), id(1), BadPeerReason::Timeout, now);
        }
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(2), id(1)]);
        assert!(!s.is_isolated(id(1)));
    }

    #[test]
    fn leaving_frees_slots() {
        let (mut s, now) = swarm(SwarmConfig {
            max_parents: 1,
            max_children_per_parent: 1,
            ..SwarmConfig::default()
        });
        seed(&mut s, 1, labels("dc1", "z1", ""), now);
        seed(&mut s, 2, labels("dc1", "z2", ""), now);
        for c in [9, 10, 11] {
            s.handle_join(id(c), addr(c), labels("dc1", "z1", ""), now);
        }
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(1)]);
        // 1 is full: the farther 2 instead.
        assert_eq!(ids(&s.poll_parents(id(10), now)), vec![id(2)]);
        // Asking again frees one's own slot.
        assert_eq!(ids(&s.poll_parents(id(9), now)), vec![id(1)]);
        s.handle_leave(id(9));
        assert_eq!(s.children(id(1)), 0);
        assert_eq!(ids(&s.poll_parents(id(11), now)), vec![id(1)]);
        // A parent leaving frees its children and queues them.
        s.handle_leave(id(2));
        assert_eq!(s.poll_reschedule(), Some(id(10)));
        assert_eq!(s.poll_reschedule(), None);
        assert_eq!(s.peers(), 3);
        assert_eq!(s.availability(0), 1);
        // A child that completes needs no parents.
        s.handle_bitmap(id(10), &Bitmap::full(N));
        assert_eq!(s.poll_parents(id(10), now), vec![]);
        assert_eq!(s.availability(0), 2);
    }

    #[test]
    fn the_seed_breaks_ties() {
        let first = |rng_seed| {
            let (mut s, now) = swarm(SwarmConfig {
                seed: rng_seed,
                ..SwarmConfig::default()
            });
            for k in 1..=8 {
                seed(&mut s, k, Labels::default(), now);
            }
            s.handle_join(id(99), None, Labels::default(), now);
            ids(&s.poll_parents(id(99), now))
        };
        assert_eq!(first(1), first(1));
        let lists: Vec<Vec<NodeId>> = (0..4).map(first).collect();
        assert!(lists.windows(2).any(|w| w[0] != w[1]));
    }

    #[test]
    fn ten_thousand_peers() {
        let n = 1024;
        let now = Instant::now();
        let mut s = Swarm::new(n, SwarmConfig::default());
        let mut rng = StdRng::seed_from_u64(3);
        s.handle_join(id(0), addr(0), labels("dc0", "", ""), now);
        s.handle_bitmap(id(0), &Bitmap::full(n));
        s.set_upload_slots(id(0), 64);
        for k in 1..10_000 {
            let l = labels(&format!("dc{}", k % 3), &format!("z{}", k % 7), "");
            s.handle_join(id(k), addr(k), l, now);
            let have: Vec<u32> = (0..n).filter(|_| rng.gen_bool(0.2)).collect();
            s.handle_have(id(k), &have);
        }
        for k in 1..=500 {
            let list = s.poll_parents(id(k), now);
            assert_eq!(list.len(), DEFAULT_MAX_PARENTS);
            assert!(list.iter().all(|p| p.node_id != id(k)));
            // Same zone and datacenter are plentiful: every parent is one.
            let mine = labels(&format!("dc{}", k % 3), &format!("z{}", k % 7), "");
            assert!(list.iter().all(|p| locality(&mine, &p.labels) == 2));
        }
        assert!((0..10_000).all(|k| s.children(id(k)) <= DEFAULT_MAX_CHILDREN_PER_PARENT));
    }
}
