//! One download's policy as a state machine: which piece to ask whom for, when a request has
//! taken too long, when a parent has failed often enough to be dropped (and reported), when the
//! seed is asked again after "busy" or a failure, when the download fails, and when it is done.
//!
//! In the style of quinn-proto: the driver feeds events in through `handle_*` (with `now`),
//! drains decisions through [`Download::poll_action`], and calls
//! [`Download::handle_timeout`] at [`Download::poll_timeout`]. No IO, no clock, no tasks in
//! here: the async engine (`crate::engine`) moves the bytes, and the scale simulator in `tools/`
//! drives the very same machine over a modelled network.
//!
//! The machine knows sources by [`SourceId`]: the seed is [`SEED`]; each parent gets its own
//! id when the machine asks the driver to connect to it. Piece bytes never come in here — only
//! whether a request delivered, and how it failed.
//!
//! Not for: the piece picker's internals ([`super::picker`]), choosing parents (the supernode's
//! [`super::parents`]), verifying bytes, storing them.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use d7q_wire::{BadPeerReason, Bitmap, NodeId, PeerInfo, PieceStatus, Sha256};

use super::picker::{PickerConfig, PiecePicker, SourceId};

/// The seed's source id.
pub const SEED: SourceId = SourceId(0);
/// Default for [`DownloadConfig::seed_in_flight`]. Lower than to a peer on purpose: the seed
/// should hand out pieces nobody else has and leave the rest to the swarm.
pub const SEED_IN_FLIGHT: usize = 8;
/// [`DownloadConfig::seed_in_flight`] of a download that uploads too
/// ([`DownloadConfig::uploader`]): the seed gates such peers, serves them few copies at once
/// and wants its first copies spread over many of them.
pub const UPLOADER_SEED_IN_FLIGHT: usize = 1;
/// Default for [`DownloadConfig::peer_in_flight`].
pub const PEER_IN_FLIGHT: usize = 16;
/// Default for [`DownloadConfig::in_flight`].
pub const IN_FLIGHT: usize = 8;
/// Default for [`DownloadConfig::max_parents`].
pub const MAX_PARENTS: usize = d7q_wire::MAX_PARENTS;
/// Default for [`DownloadConfig::piece_timeout`]: how long one piece may take before its
/// source is deemed stalled.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// Default for [`DownloadConfig::parent_failures`]: failures (timeouts, refusals, broken
/// streams) after which a parent is dropped.
pub const PARENT_FAILURES: u32 = 3;
/// Default for [`DownloadConfig::seed_attempts`]: attempts per piece at the seed before the
/// download fails.
pub const SEED_ATTEMPTS: u32 = 4;
/// Default for [`DownloadConfig::seed_busy_backoff`]: how long a piece the seed refused as busy
/// is not asked of the seed again (peers hold it).
pub const SEED_BUSY_BACKOFF: Duration = Duration::from_millis(300);
/// The first pause before asking a source again whose upload slots were all taken
/// ([`PieceStatus::Saturated`], or a parent's [`PieceStatus::Busy`]); it doubles with each
/// such answer in a row, up to [`SATURATED_PAUSE_MAX`], and starts over once the source
/// delivers. Asking again at once would only turn a full source into a storm of refusals.
/// 200 ms, not less: in the simulator (`d7q-bench sim --size 256MiB --saturated-pause-ms`,
/// 16 / 100 / 300 peers) 20 ms gave 0.848 / 0.818 / 0.806 of the bound with 78 % of the
/// requests to peers refused, 200 ms 0.852 / 0.839 / 0.816 with 67 % refused and a quarter
/// fewer messages; 4 to 32 peers are the same either way.
pub const SATURATED_PAUSE: Duration = Duration::from_millis(200);
/// The longest pause before asking a saturated source again.
pub const SATURATED_PAUSE_MAX: Duration = Duration::from_millis(2560);

/// How a [`Download`] behaves.
#[derive(Clone, Debug)]
pub struct DownloadConfig {
    /// Our node id (a parent list naming us is skipped).
    pub node_id: NodeId,
    /// Requests in flight to the seed at most.
    pub seed_in_flight: usize,
    /// Requests in flight to one parent at most.
    pub peer_in_flight: usize,
    /// Requests in flight in all, shared evenly by the sources (each gets at least one, and
    /// no more than its own limit above). Alone with the seed, a download keeps a deep
    /// pipeline; in a swarm it asks each source for one piece at a time, so that no child
    /// takes a parent's (or the seed's) every upload slot while its siblings wait, and the
    /// seed's first copies go to many peers instead of the fastest few. Measured in the
    /// simulator (`d7q-bench sim --size 256MiB`, 8 / 16 / 100 peers): 0.86 / 0.85 / 0.83 of
    /// the bound with 4 in all, 0.86 / 0.85 / 0.82 with 8, 0.77 / 0.82 / 0.80 with 16, 0.77 /
    /// 0.72 / 0.72 with two per parent whatever their number. 8, not 4: real requests pay a
    /// round trip and a busy machine's scheduling between pieces, which the simulator does
    /// not.
    pub in_flight: usize,
    /// Parents connected at once.
    pub max_parents: usize,
    /// How long one request may take.
    pub piece_timeout: Duration,
    /// Failures after which a parent is dropped.
    pub parent_failures: u32,
    /// Attempts per piece at the seed before the download fails.
    pub seed_attempts: u32,
    /// Back-off after the seed refused a piece as busy.
    pub seed_busy_backoff: Duration,
    /// First and longest pause before asking a saturated source again.
    pub saturated_pause: (Duration, Duration),
    /// Seed of the picker's tie-break order (give every node its own).
    pub picker_seed: u64,
}

impl DownloadConfig {
    /// The defaults for a node that uploads what it downloads (a daemon in a swarm).
    pub fn uploader(node_id: NodeId, picker_seed: u64) -> Self {
        Self {
            seed_in_flight: UPLOADER_SEED_IN_FLIGHT,
            ..Self::new(node_id, picker_seed)
        }
    }

    /// The defaults, for node `node_id`.
    pub fn new(node_id: NodeId, picker_seed: u64) -> Self {
        Self {
            node_id,
            seed_in_flight: SEED_IN_FLIGHT,
            peer_in_flight: PEER_IN_FLIGHT,
            in_flight: IN_FLIGHT,
            max_parents: MAX_PARENTS,
            piece_timeout: PIECE_TIMEOUT,
            parent_failures: PARENT_FAILURES,
            seed_attempts: SEED_ATTEMPTS,
            seed_busy_backoff: SEED_BUSY_BACKOFF,
            saturated_pause: (SATURATED_PAUSE, SATURATED_PAUSE_MAX),
            picker_seed,
        }
    }
}

/// How one piece request failed, as far as policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PieceFailure {
    /// The connection to the source broke.
    Connection,
    /// The stream broke or carried nonsense.
    Stream,
    /// The source refused.
    Refused(PieceStatus),
    /// The bytes did not match the digest.
    Corrupt,
}

/// A decision for the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Connect to `peer` and subscribe to the task; report back with
    /// [`Download::handle_parent_ready`] or [`Download::handle_parent_gone`].
    Connect {
        /// The id the machine knows this parent by.
        src: SourceId,
        /// Who and where.
        peer: PeerInfo,
    },
    /// Ask `src` for piece `index` of `len` bytes and verify it against `digest`; report back
    /// with [`Download::handle_piece_result`].
    Request {
        /// The source.
        src: SourceId,
        /// The piece.
        index: u32,
        /// Its length.
        len: u32,
        /// What it must hash to.
        digest: Sha256,
    },
    /// Abandon the request for `index` at `src` (a duplicate that lost, or one that timed out);
    /// its result, if any still comes, is ignored.
    Cancel {
        /// The source.
        src: SourceId,
        /// The piece.
        index: u32,
        /// Whether it ran past its deadline (a failure of the source) rather than being
        /// made redundant.
        timed_out: bool,
    },
    /// Tell the supernode that `peer` misbehaved.
    Report {
        /// The parent.
        peer: NodeId,
        /// What it did.
        reason: BadPeerReason,
    },
    /// Close the connection to parent `src`; it is not used again for this download.
    DropParent {
        /// The parent.
        src: SourceId,
    },
    /// Every piece is verified and the seed confirmed the whole: finish.
    Done,
    /// The download cannot continue with this seed.
    Fail(Failure),
}

/// Why a download stops.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    /// The seed's connection broke: another supernode may take over.
    #[error("seed lost: {0}")]
    SeedLost(String),
    /// A piece never verified, or the content changed.
    #[error("{0}")]
    Integrity(String),
    /// The seed kept failing a piece, or said something impossible.
    #[error("{0}")]
    Mesh(String),
}

/// What a delivered piece means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// A piece we did not have: store it, announce it.
    New,
    /// A copy that finished second (or of a request no longer wanted): drop it.
    Duplicate,
}

/// The policy state of one download whose geometry is known.
#[derive(Debug)]
pub struct Download {
    cfg: DownloadConfig,
    piece_count: u32,
    piece_size: u32,
    length: u64,
    picker: PiecePicker,
    digests: Vec<Option<Sha256>>,
    seed_attempts: Vec<u32>,
    /// Pieces stored before a restart, with the digest they were verified against; they count
    /// once the seed publishes the same digest.
    resumed: HashMap<u32, Option<Sha256>>,
    done: Bitmap,
    bytes_done: u64,
    /// What the seed offers: digest known, less what it recently refused or failed.
    seed_offer: Bitmap,
    /// Whether a seed is attached.
    seed_attached: bool,
    /// Whether the seed's upload slots are full.
    seed_pause: Pause,
    /// When pieces withheld from the seed's offer are offered again.
    reoffer: BinaryHeap<Reverse<(Instant, u32)>>,
    /// Requests out, with their deadlines.
    deadlines: FxHashMap<(SourceId, u32), Instant>,
    /// The same deadlines in time order (entries no longer in `deadlines` are stale).
    timers: BinaryHeap<Reverse<(Instant, SourceId, u32)>>,
    parents: FxHashMap<SourceId, Parent>,
    by_node: HashSet<NodeId>,
    banned: HashSet<NodeId>,
    next_source: u32,
    complete: Option<Sha256>,
    actions: VecDeque<Action>,
    /// Whether every source may have something new to ask for; otherwise only those in
    /// `dirty` (they announced pieces). A source with room and nothing wanted is not
    /// searched again on every event.
    dirty_all: bool,
    dirty: Vec<SourceId>,
    /// Parents connected and subscribed.
    ready_parents: usize,
    /// When paused sources may be asked again (entries whose source's pause changed since
    /// are stale).
    pause_ends: BinaryHeap<Reverse<(Instant, SourceId)>>,
    /// What [`Download::poll_timeout`] answered last, while nothing has changed since
    /// (`None`: to be worked out). Most events in a swarm change nothing, and the driver asks
    /// after each.
    next_timeout: Option<Option<Instant>>,
    finished: bool,
    /// A failure is queued: nothing more is asked until the seed is replaced (a lost seed) or
    /// ever (any other failure).
    failing: bool,
}

#[derive(Debug)]
struct Parent {
    info: PeerInfo,
    ready: bool,
    failures: u32,
    pause: Pause,
}

/// A source that said all its upload slots are taken: not asked again before `until`.
#[derive(Clone, Copy, Debug, Default)]
struct Pause {
    /// Such answers in a row.
    streak: u32,
    until: Option<Instant>,
}

impl Pause {
    fn saturated(&mut self, (first, max): (Duration, Duration), now: Instant) {
        let pause = first.saturating_mul(1 << self.streak.min(16));
        self.streak += 1;
        self.until = Some(now + pause.min(max));
    }

    fn delivered(&mut self) {
        *self = Pause::default();
    }

    fn paused(&self, now: Instant) -> bool {
        self.until.is_some_and(|t| t > now)
    }

    fn expire(&mut self, now: Instant) {
        if self.until.is_some_and(|t| t <= now) {
            self.until = None;
        }
    }
}

impl Download {
    /// A download of `length` bytes in `piece_count` pieces of `piece_size`, with `resumed`
    /// pieces already stored (and the digest each was verified against). The seed is attached.
    pub fn new(
        length: u64,
        piece_size: u32,
        piece_count: u32,
        resumed: HashMap<u32, Option<Sha256>>,
        cfg: DownloadConfig,
    ) -> Self {
        let pcfg = PickerConfig {
            seed: cfg.picker_seed,
            max_in_flight_per_source: cfg.peer_in_flight,
            ..PickerConfig::default()
        };
        let mut picker = PiecePicker::new(piece_count, pcfg);
        picker.set_source_limit(SEED, cfg.seed_in_flight);
        // The seed serves what no parent has; the parents serve the rest.
        picker.set_source_fallback(SEED);
        picker.handle_source_bitmap(SEED, &Bitmap::new(piece_count));
        Self {
            cfg,
            piece_count,
            piece_size,
            length,
            picker,
            digests: vec![None; piece_count as usize],
            seed_attempts: vec![0; piece_count as usize],
            resumed,
            done: Bitmap::new(piece_count),
            bytes_done: 0,
            seed_offer: Bitmap::new(piece_count),
            seed_attached: true,
            seed_pause: Pause::default(),
            reoffer: BinaryHeap::new(),
            deadlines: FxHashMap::default(),
            timers: BinaryHeap::new(),
            parents: FxHashMap::default(),
            by_node: HashSet::new(),
            banned: HashSet::new(),
            next_source: 1,
            complete: None,
            actions: VecDeque::new(),
            dirty_all: true,
            dirty: Vec::new(),
            ready_parents: 0,
            next_timeout: None,
            pause_ends: BinaryHeap::new(),
            finished: false,
            failing: false,
        }
    }

    /// The seed published digests for pieces `first..`. Returns the resumed pieces that now
    /// count as done (stored before, verified against these very digests): the driver
    /// announces them.
    pub fn handle_digests(&mut self, first: u32, digests: &[Sha256]) -> Result<Vec<u32>, Failure> {
        self.next_timeout = None;
        self.dirty_all = true;
        let mut resumed_now = Vec::new();
        for (k, digest) in digests.iter().enumerate() {
            let i = first as usize + k;
            if i >= self.digests.len() {
                return Err(Failure::Mesh(
                    "supernode sent digests past the last piece".into(),
                ));
            }
            let idx = i as u32;
            if self.digests[i].is_some_and(|d| d != *digest) {
                // Another seed (after a failover) read different content from the origin.
                return Err(changed());
            }
            self.digests[i] = Some(*digest);
            self.picker.handle_digest(idx);
            if self.seed_attached && self.seed_offer.set(idx) {
                self.picker.handle_source_have(SEED, idx);
            }
            if self
                .resumed
                .remove(&idx)
                .is_some_and(|d| d == Some(*digest))
                && self.done.set(idx)
            {
                self.picker.handle_done(idx);
                self.bytes_done += u64::from(self.piece_len(idx));
                resumed_now.push(idx);
            }
        }
        Ok(resumed_now)
    }

    /// The seed confirmed the whole content's SHA-256.
    pub fn handle_complete(&mut self, sha256: Sha256) -> Result<(), Failure> {
        self.next_timeout = None;
        if self.complete.is_some_and(|old| old != sha256) {
            return Err(changed());
        }
        self.complete = Some(sha256);
        Ok(())
    }

    /// The supernode's latest parent list: new parents are connected (up to the limit; never
    /// ourselves, a banned node, or one we already have).
    pub fn handle_parents(&mut self, list: &[PeerInfo]) {
        self.next_timeout = None;
        for info in list.iter().take(self.cfg.max_parents) {
            if info.node_id == self.cfg.node_id
                || self.banned.contains(&info.node_id)
                || self.by_node.contains(&info.node_id)
                || self.parents.len() >= self.cfg.max_parents
            {
                continue;
            }
            let src = SourceId(self.next_source);
            self.next_source += 1;
            // Kept even after the parent is dropped, so a later list does not bring it back.
            self.by_node.insert(info.node_id);
            self.parents.insert(
                src,
                Parent {
                    info: info.clone(),
                    ready: false,
                    failures: 0,
                    pause: Pause::default(),
                },
            );
            self.actions.push_back(Action::Connect {
                src,
                peer: info.clone(),
            });
        }
    }

    /// Parent `src` is connected and subscribed: it may be asked for what it announces.
    pub fn handle_parent_ready(&mut self, src: SourceId) {
        self.next_timeout = None;
        self.dirty_all = true;
        if let Some(p) = self.parents.get_mut(&src) {
            if !std::mem::replace(&mut p.ready, true) {
                self.ready_parents += 1;
            }
        }
    }

    /// `src` has exactly the pieces in `bitmap`. Ignored for unknown sources and bitmaps of
    /// the wrong length.
    pub fn handle_bitmap(&mut self, src: SourceId, bitmap: &Bitmap) {
        self.next_timeout = None;
        if self.parents.contains_key(&src) && bitmap.len() == self.piece_count {
            self.picker.handle_source_bitmap(src, bitmap);
            self.mark(src);
        }
    }

    /// `src` now has `pieces`.
    ///
    /// Pieces verified here already are not even recorded: nothing this machine decides
    /// depends on who else has them, and they are most announcements in a swarm, where every
    /// piece reaches a peer from each of its parents. Such a Have costs one bit test.
    pub fn handle_have(&mut self, src: SourceId, pieces: &[u32]) {
        let n = self.piece_count;
        let mut new = pieces.iter().filter(|&&i| i < n && !self.done.test(i));
        let Some(&first) = new.next() else {
            return;
        };
        if !self.parents.contains_key(&src) {
            return;
        }
        self.next_timeout = None;
        self.picker.handle_source_have(src, first);
        for &i in new {
            self.picker.handle_source_have(src, i);
        }
        self.mark(src);
    }

    /// Parent `src` went away (connection lost, stream ended, it said no).
    pub fn handle_parent_gone(&mut self, src: SourceId) {
        self.next_timeout = None;
        self.dirty_all = true;
        self.drop_parent(src, false);
    }

    /// The seed is gone: its requests are void and its offer withdrawn; what was verified
    /// stays. A new seed is attached with [`Download::handle_seed_attached`].
    pub fn handle_seed_lost(&mut self) {
        self.next_timeout = None;
        self.dirty_all = true;
        self.seed_attached = false;
        // Decisions about the old seed are void (its other requests failed too).
        self.actions.retain(|a| match a {
            Action::Fail(_) => false,
            Action::Request { src, .. } => *src != SEED,
            _ => true,
        });
        self.forget_requests(SEED);
        self.picker.handle_source_gone(SEED);
        self.seed_offer = Bitmap::new(self.piece_count);
        self.picker.handle_source_bitmap(SEED, &self.seed_offer);
        self.seed_attempts.iter_mut().for_each(|a| *a = 0);
        self.reoffer.clear();
        self.seed_pause = Pause::default();
        self.failing = false;
    }

    /// A (new) seed is attached: it offers pieces as it publishes their digests.
    pub fn handle_seed_attached(&mut self) {
        self.next_timeout = None;
        self.dirty_all = true;
        self.seed_attached = true;
    }

    /// Where a streaming consumer reads, as a byte offset; `None` when nobody streams.
    pub fn set_read_position(&mut self, pos: Option<u64>) {
        self.next_timeout = None;
        self.dirty_all = true;
        let piece = u64::from(self.piece_size.max(1));
        self.picker
            .set_read_position(pos.map(|b| (b / piece) as u32));
    }

    /// The request for `index` at `src` ended: delivered (and verified by the driver) or
    /// failed. Results of requests the machine no longer holds (cancelled, timed out, of a
    /// dropped source) are ignored and return `None`.
    pub fn handle_piece_result(
        &mut self,
        src: SourceId,
        index: u32,
        result: Result<(), PieceFailure>,
        now: Instant,
    ) -> Option<Delivery> {
        self.next_timeout = None;
        self.deadlines.remove(&(src, index))?;
        match result {
            Ok(()) => {
                // Room at `src`; requests elsewhere made redundant are marked as cancelled.
                self.mark(src);
                self.source_delivered(src);
                if !self.done.set(index) {
                    return Some(Delivery::Duplicate);
                }
                self.picker.handle_done_from(src, index);
                self.bytes_done += u64::from(self.piece_len(index));
                Some(Delivery::New)
            }
            Err(e) => {
                // The piece is open again, for every source.
                self.dirty_all = true;
                self.picker.handle_failed(src, index);
                self.failed(src, index, Some(e), now);
                None
            }
        }
    }

    /// Requests past their deadline fail as timeouts; pieces the seed withheld are offered
    /// again.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.next_timeout = None;
        self.dirty_all = true;
        while let Some(&Reverse((at, src))) = self.pause_ends.peek() {
            if at > now {
                break;
            }
            self.pause_ends.pop();
            if let Some(p) = self.pause_mut(src) {
                p.expire(now);
            }
        }
        while let Some(&Reverse((at, i))) = self.reoffer.peek() {
            if at > now {
                break;
            }
            self.reoffer.pop();
            if self.seed_attached
                && self.digests[i as usize].is_some()
                && !self.done.test(i)
                && self.seed_offer.set(i)
            {
                self.picker.handle_source_have(SEED, i);
            }
        }
        while let Some(&Reverse((at, src, i))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            if self.deadlines.get(&(src, i)) != Some(&at) {
                continue; // answered, or asked again since
            }
            self.deadlines.remove(&(src, i));
            self.picker.handle_failed(src, i);
            self.actions.push_back(Action::Cancel {
                src,
                index: i,
                timed_out: true,
            });
            self.failed(src, i, None, now);
        }
    }

    /// When to call [`Download::handle_timeout`] next.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        if let Some(known) = self.next_timeout {
            return known;
        }
        // Drop stale timer entries so the answer is a real deadline.
        while let Some(&Reverse((at, src, i))) = self.timers.peek() {
            if self.deadlines.get(&(src, i)) == Some(&at) {
                break;
            }
            self.timers.pop();
        }
        while let Some(&Reverse((at, src))) = self.pause_ends.peek() {
            if self.pause_mut(src).is_some_and(|p| p.until == Some(at)) {
                break;
            }
            self.pause_ends.pop();
        }
        let timer = self.timers.peek().map(|r| r.0 .0);
        let reoffer = self.reoffer.peek().map(|r| r.0 .0);
        let pause = self.pause_ends.peek().map(|r| r.0 .0);
        let next = [timer, reoffer, pause].into_iter().flatten().min();
        self.next_timeout = Some(next);
        next
    }

    fn pause_mut(&mut self, src: SourceId) -> Option<&mut Pause> {
        if src == SEED {
            Some(&mut self.seed_pause)
        } else {
            self.parents.get_mut(&src).map(|p| &mut p.pause)
        }
    }

    /// The next decision, if any. Requests are handed out here, to every source with room;
    /// `now` starts their deadlines.
    pub fn poll_action(&mut self, now: Instant) -> Option<Action> {
        if let Some(a) = self.actions.pop_front() {
            return Some(a);
        }
        if self.finished || self.failing {
            return None;
        }
        let nothing_new = !self.dirty_all && self.dirty.is_empty() && !self.picker.has_cancels();
        if nothing_new && !(self.picker.is_complete() && self.complete.is_some()) {
            // No source to ask, nothing to cancel or finish: what the last call left stands.
            return None;
        }
        self.next_timeout = None;
        while let Some((src, index)) = self.picker.poll_cancel() {
            self.mark(src);
            if self.deadlines.remove(&(src, index)).is_some() {
                self.actions.push_back(Action::Cancel {
                    src,
                    index,
                    timed_out: false,
                });
            }
        }
        if self.picker.is_complete() && self.complete.is_some() {
            self.finished = true;
            self.actions.push_back(Action::Done);
            return self.actions.pop_front();
        }
        self.dispatch(now);
        self.actions.pop_front()
    }

    /// Pieces verified so far.
    pub fn done_count(&self) -> u32 {
        self.picker.done_count()
    }

    /// Bytes verified so far.
    pub fn bytes_done(&self) -> u64 {
        self.bytes_done
    }

    /// Whether piece `i` is verified.
    pub fn has(&self, i: u32) -> bool {
        self.done.test(i)
    }

    /// The digest of piece `i`, once known.
    pub fn digest(&self, i: u32) -> Option<Sha256> {
        self.digests.get(i as usize).copied().flatten()
    }

    /// The whole content's SHA-256 as the seed confirmed it.
    pub fn sha256(&self) -> Option<Sha256> {
        self.complete
    }

    /// Parents connected or connecting.
    pub fn parent_count(&self) -> usize {
        self.parents.len()
    }

    /// Length of piece `i`.
    pub fn piece_len(&self, i: u32) -> u32 {
        if i + 1 < self.piece_count {
            self.piece_size
        } else {
            (self.length - u64::from(self.piece_size) * u64::from(self.piece_count - 1)) as u32
        }
    }

    /// `src` may have something new to ask for.
    fn mark(&mut self, src: SourceId) {
        if !self.dirty_all && !self.dirty.contains(&src) {
            self.dirty.push(src);
        }
    }

    fn dispatch(&mut self, now: Instant) {
        let mut sources = std::mem::take(&mut self.dirty);
        if std::mem::replace(&mut self.dirty_all, false) {
            sources.clear();
            sources.extend(self.parents.keys());
            // In the order they were connected (ids are handed out in sequence).
            sources.sort_unstable();
            // The seed last: peers first take what they can.
            sources.push(SEED);
        }
        // Paused sources count: their share is not handed to the others.
        let ready = self.ready_parents + usize::from(self.seed_attached);
        let share = (self.cfg.in_flight / ready.max(1)).max(1);
        for src in sources.drain(..) {
            let limit = if src == SEED {
                if !self.seed_attached || self.seed_pause.paused(now) {
                    continue;
                }
                self.cfg.seed_in_flight.min(share)
            } else {
                match self.parents.get(&src) {
                    Some(p) if p.ready && !p.pause.paused(now) => {
                        self.cfg.peer_in_flight.min(share)
                    }
                    _ => continue,
                }
            };
            while self.picker.in_flight(src) < limit {
                let Some(i) = self.picker.poll_request(src) else {
                    break;
                };
                let Some(digest) = self.digests[i as usize] else {
                    // The picker only offers pieces with digests; be safe anyway.
                    self.picker.handle_failed(src, i);
                    break;
                };
                let at = now + self.cfg.piece_timeout;
                self.deadlines.insert((src, i), at);
                self.timers.push(Reverse((at, src, i)));
                self.actions.push_back(Action::Request {
                    src,
                    index: i,
                    len: self.piece_len(i),
                    digest,
                });
            }
        }
        // Kept for its capacity.
        self.dirty = sources;
    }

    /// Policy for a failed request (`None`: it timed out).
    fn failed(&mut self, src: SourceId, i: u32, e: Option<PieceFailure>, now: Instant) {
        let full = match e {
            Some(PieceFailure::Refused(PieceStatus::Saturated)) => true,
            // A parent's "busy" says the same (the seed's means "peers hold this piece").
            Some(PieceFailure::Refused(PieceStatus::Busy)) => src != SEED,
            _ => false,
        };
        if full {
            // Not a failure: the source is fine, only full. Pieces it offers are asked of
            // others meanwhile, or of it again after the pause.
            let pause = self.cfg.saturated_pause;
            if let Some(p) = self.pause_mut(src) {
                p.saturated(pause, now);
                if let Some(until) = p.until {
                    self.pause_ends.push(Reverse((until, src)));
                }
            }
            return;
        }
        if src == SEED {
            if e == Some(PieceFailure::Refused(PieceStatus::Busy)) {
                // Peers hold it: take it from them; the seed is asked again later if not.
                self.withhold_from_seed(i, now + self.cfg.seed_busy_backoff);
                return;
            }
            if e == Some(PieceFailure::Connection) {
                self.fail(Failure::SeedLost("connection to the supernode lost".into()));
                return;
            }
            self.seed_attempts[i as usize] += 1;
            let attempts = self.seed_attempts[i as usize];
            if attempts >= self.cfg.seed_attempts {
                let n = self.cfg.seed_attempts;
                self.fail(match e {
                    Some(PieceFailure::Corrupt) => Failure::Integrity(format!(
                        "piece {i} from the supernode failed verification {n} times"
                    )),
                    Some(e) => Failure::SeedLost(format!("piece {i}: {e:?} {n} times")),
                    None => Failure::SeedLost(format!("piece {i}: timed out {n} times")),
                });
                return;
            }
            // A refusal often means the reason is on its way on the control stream (the task
            // failed); an immediate retry would only hit it again.
            self.withhold_from_seed(i, now + retry_delay(attempts));
            return;
        }
        let reason = match e {
            Some(PieceFailure::Corrupt) => Some(BadPeerReason::DigestMismatch),
            None => Some(BadPeerReason::Timeout),
            Some(PieceFailure::Refused(PieceStatus::NotAvailable)) => None,
            Some(PieceFailure::Refused(_)) => Some(BadPeerReason::Refused),
            Some(PieceFailure::Connection | PieceFailure::Stream) => None,
        };
        let corrupt = e == Some(PieceFailure::Corrupt);
        let Some(p) = self.parents.get_mut(&src) else {
            return;
        };
        p.failures += 1;
        if corrupt || p.failures >= self.cfg.parent_failures {
            let node = p.info.node_id;
            if let Some(reason) = reason {
                self.actions
                    .push_back(Action::Report { peer: node, reason });
            }
            self.banned.insert(node);
            self.drop_parent(src, true);
        }
    }

    fn source_delivered(&mut self, src: SourceId) {
        if let Some(p) = self.pause_mut(src) {
            p.delivered();
        }
    }

    fn fail(&mut self, f: Failure) {
        self.failing = true;
        self.actions.push_back(Action::Fail(f));
    }

    fn withhold_from_seed(&mut self, i: u32, until: Instant) {
        self.seed_offer.clear(i);
        self.picker.handle_source_bitmap(SEED, &self.seed_offer);
        self.reoffer.push(Reverse((until, i)));
    }

    fn drop_parent(&mut self, src: SourceId, tell: bool) {
        let Some(p) = self.parents.remove(&src) else {
            return;
        };
        if p.ready {
            self.ready_parents -= 1;
        }
        self.forget_requests(src);
        self.picker.handle_source_gone(src);
        if tell {
            self.actions.push_back(Action::DropParent { src });
        }
    }

    /// Voids every request out at `src`; the driver is told to cancel them.
    fn forget_requests(&mut self, src: SourceId) {
        let mut gone: Vec<u32> = self
            .deadlines
            .keys()
            .filter(|(s, _)| *s == src)
            .map(|(_, i)| *i)
            .collect();
        gone.sort_unstable();
        for i in gone {
            self.deadlines.remove(&(src, i));
            self.actions.push_back(Action::Cancel {
                src,
                index: i,
                timed_out: false,
            });
        }
    }
}

fn changed() -> Failure {
    Failure::Integrity("the content changed at the origin during the download".into())
}

/// Back-off before asking the seed again for a piece it failed `attempts` times.
fn retry_delay(attempts: u32) -> Duration {
    match attempts {
        0 => Duration::ZERO,
        n => Duration::from_millis(250 << (n - 1).min(4)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use d7q_wire::Labels;

    const ME: NodeId = NodeId([0xfe; 16]);
    const PIECE: u32 = 4;

    fn machine(pieces: u32) -> Download {
        Download::new(
            u64::from(PIECE) * u64::from(pieces) - 1,
            PIECE,
            pieces,
            HashMap::new(),
            DownloadConfig {
                seed_in_flight: 2,
                peer_in_flight: 2,
                ..DownloadConfig::new(ME, 7)
            },
        )
    }

    fn digest(i: u32) -> Sha256 {
        [i as u8 + 1; 32]
    }

    fn digests(n: u32) -> Vec<Sha256> {
        (0..n).map(digest).collect()
    }

    fn peer(n: u8) -> PeerInfo {
        PeerInfo {
            node_id: NodeId([n; 16]),
            addr: format!("127.0.0.1:{}", 1000 + u16::from(n))
                .parse()
                .unwrap(),
            labels: Labels::default(),
        }
    }

    fn drain(d: &mut Download, now: Instant) -> Vec<Action> {
        std::iter::from_fn(|| d.poll_action(now)).collect()
    }

    fn requests(actions: &[Action]) -> Vec<(SourceId, u32)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Request { src, index, .. } => Some((*src, *index)),
                _ => None,
            })
            .collect()
    }

    /// Connects a parent with every piece; returns its source id.
    fn ready_parent(d: &mut Download, n: u8, now: Instant) -> SourceId {
        d.handle_parents(&[peer(n)]);
        let src = match drain(d, now).as_slice() {
            [Action::Connect { src, peer: p }, ..] if *p == peer(n) => *src,
            other => panic!("expected a Connect first, got {other:?}"),
        };
        d.handle_parent_ready(src);
        let mut all = Bitmap::new(d.piece_count);
        (0..d.piece_count).for_each(|i| {
            all.set(i);
        });
        d.handle_bitmap(src, &all);
        src
    }

    #[test]
    fn from_the_seed_alone_to_done() {
        let t0 = Instant::now();
        let mut d = machine(5);
        // Nothing to ask before digests are known.
        assert!(drain(&mut d, t0).is_empty());
        assert_eq!(d.handle_digests(0, &digests(5)), Ok(vec![]));
        let mut done = 0;
        let mut now = t0;
        while done < 5 {
            let reqs = requests(&drain(&mut d, now));
            assert!(!reqs.is_empty() && reqs.len() <= 2, "{reqs:?}");
            for (src, i) in reqs {
                assert_eq!(src, SEED);
                assert_eq!(
                    d.handle_piece_result(src, i, Ok(()), now),
                    Some(Delivery::New)
                );
                done += 1;
            }
            now += Duration::from_millis(1);
        }
        assert_eq!(d.bytes_done(), 19);
        assert_eq!(d.piece_len(4), 3);
        // Done only once the seed confirmed the whole.
        assert!(drain(&mut d, now).is_empty());
        d.handle_complete([1; 32]).unwrap();
        assert_eq!(drain(&mut d, now), vec![Action::Done]);
        assert_eq!(d.handle_complete([2; 32]), Err(changed()));
    }

    #[test]
    fn the_seed_is_asked_only_for_what_no_parent_has() {
        let t0 = Instant::now();
        let mut d = machine(4);
        d.handle_parents(&[peer(1)]);
        let src = match drain(&mut d, t0).as_slice() {
            [Action::Connect { src, .. }] => *src,
            other => panic!("{other:?}"),
        };
        d.handle_parent_ready(src);
        d.handle_have(src, &[0, 1, 99]);
        d.handle_digests(0, &digests(4)).unwrap();
        let mut reqs = requests(&drain(&mut d, t0));
        reqs.sort();
        assert_eq!(reqs, vec![(SEED, 2), (SEED, 3), (src, 0), (src, 1)]);
    }

    #[test]
    fn busy_at_the_seed_waits_then_asks_again() {
        let t0 = Instant::now();
        let mut d = machine(1);
        d.handle_digests(0, &digests(1)).unwrap();
        assert_eq!(requests(&drain(&mut d, t0)), vec![(SEED, 0)]);
        let busy = Err(PieceFailure::Refused(PieceStatus::Busy));
        assert_eq!(d.handle_piece_result(SEED, 0, busy, t0), None);
        assert!(drain(&mut d, t0).is_empty());
        let back = t0 + SEED_BUSY_BACKOFF;
        assert_eq!(d.poll_timeout(), Some(back));
        d.handle_timeout(back - Duration::from_millis(1));
        assert!(drain(&mut d, back).is_empty());
        d.handle_timeout(back);
        assert_eq!(requests(&drain(&mut d, back)), vec![(SEED, 0)]);
        // Busy never fails the download, however often.
        for k in 1..20u32 {
            let now = back + SEED_BUSY_BACKOFF * k;
            d.handle_piece_result(SEED, 0, busy, now);
            d.handle_timeout(now + SEED_BUSY_BACKOFF);
            let acts = drain(&mut d, now + SEED_BUSY_BACKOFF);
            assert_eq!(requests(&acts), vec![(SEED, 0)], "{acts:?}");
        }
    }

    #[test]
    fn seed_failures_back_off_then_fail_the_download() {
        let t0 = Instant::now();
        let mut d = machine(1);
        d.handle_digests(0, &digests(1)).unwrap();
        let mut now = t0;
        for attempt in 1..SEED_ATTEMPTS {
            assert_eq!(requests(&drain(&mut d, now)), vec![(SEED, 0)]);
            d.handle_piece_result(SEED, 0, Err(PieceFailure::Corrupt), now);
            assert!(drain(&mut d, now).is_empty(), "asked again without a pause");
            now += retry_delay(attempt);
            assert_eq!(d.poll_timeout(), Some(now));
            d.handle_timeout(now);
        }
        assert_eq!(requests(&drain(&mut d, now)), vec![(SEED, 0)]);
        d.handle_piece_result(SEED, 0, Err(PieceFailure::Corrupt), now);
        match drain(&mut d, now).as_slice() {
            [Action::Fail(Failure::Integrity(m))] => assert!(m.contains("piece 0"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_lost_seed_connection_fails_at_once_and_a_new_seed_resumes() {
        let t0 = Instant::now();
        let mut d = machine(4);
        d.handle_digests(0, &digests(4)).unwrap();
        let reqs = requests(&drain(&mut d, t0));
        assert_eq!(reqs.len(), 2);
        let (_, i) = reqs[0];
        d.handle_piece_result(SEED, reqs[1].1, Ok(()), t0);
        d.handle_piece_result(SEED, i, Err(PieceFailure::Connection), t0);
        // Queued: more requests to the seed and the failure.
        d.handle_seed_lost();
        // Its decisions are void: nothing for the dead seed, no stale failure.
        let acts = drain(&mut d, t0);
        assert!(requests(&acts).is_empty(), "{acts:?}");
        assert!(
            !acts.iter().any(|a| matches!(a, Action::Fail(_))),
            "{acts:?}"
        );
        // The next seed publishes the same digests: the three missing pieces are asked of it.
        d.handle_seed_attached();
        d.handle_digests(0, &digests(4)).unwrap();
        let mut all = Vec::new();
        let mut now = t0;
        while d.done_count() < 4 {
            let reqs = requests(&drain(&mut d, now));
            assert!(!reqs.is_empty());
            for (src, i) in reqs {
                all.push(i);
                d.handle_piece_result(src, i, Ok(()), now);
            }
            now += Duration::from_millis(1);
        }
        all.sort();
        assert_eq!(all.len(), 3);
        assert!(!all.contains(&reqs[1].1));
        // A seed publishing other digests means the content changed.
        let mut other = digests(4);
        other[2] = [0xee; 32];
        assert_eq!(d.handle_digests(0, &other), Err(changed()));
    }

    #[test]
    fn a_parent_that_keeps_failing_is_reported_dropped_and_never_taken_back() {
        let t0 = Instant::now();
        let mut d = machine(8);
        let src = ready_parent(&mut d, 1, t0);
        d.handle_digests(0, &digests(8)).unwrap();
        let mut failures = 0;
        let mut acts = drain(&mut d, t0);
        while failures < PARENT_FAILURES {
            let i = requests(&acts)
                .into_iter()
                .find(|(s, _)| *s == src)
                .expect("a request to the parent")
                .1;
            let refused = Err(PieceFailure::Refused(PieceStatus::Internal));
            d.handle_piece_result(src, i, refused, t0);
            failures += 1;
            acts = drain(&mut d, t0);
        }
        assert!(acts.contains(&Action::Report {
            peer: peer(1).node_id,
            reason: BadPeerReason::Refused
        }));
        assert!(acts.contains(&Action::DropParent { src }));
        // Its request still out is cancelled; nothing is asked of it again.
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Cancel { src: s, timed_out: false, .. } if *s == src)));
        assert_eq!(d.parent_count(), 0);
        d.handle_parents(&[peer(1), peer(2)]);
        let acts = drain(&mut d, t0);
        let connects: Vec<_> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Connect { peer, .. } => Some(peer.node_id),
                _ => None,
            })
            .collect();
        assert_eq!(connects, vec![peer(2).node_id]);
        // Results from the dropped parent are ignored.
        assert_eq!(d.handle_piece_result(src, 0, Ok(()), t0), None);
        assert!(!d.has(0));
    }

    #[test]
    fn a_full_parent_is_paused_never_failed_and_its_pieces_go_elsewhere() {
        let t0 = Instant::now();
        let mut d = machine(8);
        let full = ready_parent(&mut d, 1, t0);
        let other = ready_parent(&mut d, 2, t0);
        d.handle_digests(0, &digests(8)).unwrap();
        let first = requests(&drain(&mut d, t0));
        // Far more "full" answers than the failures that drop a parent: it stays, unreported.
        let mut now = t0;
        let mut pauses = Vec::new();
        for k in 0..4 * PARENT_FAILURES {
            let status = if k % 2 == 0 {
                PieceStatus::Saturated
            } else {
                PieceStatus::Busy
            };
            let i = if k == 0 {
                first.iter().find(|(s, _)| *s == full).unwrap().1
            } else {
                requests(&drain(&mut d, now))
                    .into_iter()
                    .find(|(s, _)| *s == full)
                    .expect("asked again after the pause")
                    .1
            };
            d.handle_piece_result(full, i, Err(PieceFailure::Refused(status)), now);
            let acts = drain(&mut d, now);
            assert!(
                !acts
                    .iter()
                    .any(|a| matches!(a, Action::Report { .. } | Action::DropParent { .. })),
                "{acts:?}"
            );
            assert!(
                requests(&acts).iter().all(|(s, _)| *s != full),
                "asked during its pause: {acts:?}"
            );
            let until = d.poll_timeout().expect("a pause to wait for");
            pauses.push(until - now);
            now = until;
            d.handle_timeout(now);
        }
        assert_eq!(d.parent_count(), 2);
        // The pause doubles from the first one up to the cap.
        assert_eq!(pauses[0], SATURATED_PAUSE);
        assert_eq!(pauses[1], 2 * SATURATED_PAUSE);
        assert_eq!(*pauses.last().unwrap(), SATURATED_PAUSE_MAX);
        // The other parent took pieces the full one could not serve.
        assert!(first.iter().any(|(s, _)| *s == other));
        // A delivery starts the pauses over.
        let i = requests(&drain(&mut d, now))
            .into_iter()
            .find(|(s, _)| *s == full)
            .unwrap()
            .1;
        assert_eq!(
            d.handle_piece_result(full, i, Ok(()), now),
            Some(Delivery::New)
        );
        let j = requests(&drain(&mut d, now))
            .into_iter()
            .find(|(s, _)| *s == full)
            .expect("asked at once after delivering")
            .1;
        let refused = Err(PieceFailure::Refused(PieceStatus::Saturated));
        d.handle_piece_result(full, j, refused, now);
        drain(&mut d, now);
        assert_eq!(d.poll_timeout(), Some(now + SATURATED_PAUSE));
    }

    #[test]
    fn a_saturated_seed_is_paused_and_never_fails_the_download() {
        let t0 = Instant::now();
        let mut d = machine(4);
        d.handle_digests(0, &digests(4)).unwrap();
        let reqs = requests(&drain(&mut d, t0));
        assert_eq!(reqs.len(), 2);
        let saturated = Err(PieceFailure::Refused(PieceStatus::Saturated));
        // Many more refusals than seed attempts: still no failure, and nothing asked of the
        // seed before the pause ends.
        let mut now = t0;
        d.handle_piece_result(SEED, reqs[0].1, saturated, now);
        d.handle_piece_result(SEED, reqs[1].1, saturated, now);
        for _ in 0..3 * SEED_ATTEMPTS {
            let acts = drain(&mut d, now);
            assert!(requests(&acts).is_empty(), "{acts:?}");
            assert!(!acts.iter().any(|a| matches!(a, Action::Fail(_))));
            now = d.poll_timeout().expect("the pause's end");
            d.handle_timeout(now);
            let asked = requests(&drain(&mut d, now));
            assert!(!asked.is_empty());
            for (_, i) in asked {
                d.handle_piece_result(SEED, i, saturated, now);
            }
        }
        // The seed was asked for every piece it refused, and delivers them in the end.
        let asked = loop {
            now = d.poll_timeout().unwrap();
            d.handle_timeout(now);
            let asked = requests(&drain(&mut d, now));
            if !asked.is_empty() {
                break asked;
            }
        };
        for (_, i) in asked {
            assert_eq!(
                d.handle_piece_result(SEED, i, Ok(()), now),
                Some(Delivery::New)
            );
        }
        assert!(d.done_count() >= 2);
    }

    #[test]
    fn one_corrupt_piece_drops_the_parent() {
        let t0 = Instant::now();
        let mut d = machine(8);
        let src = ready_parent(&mut d, 3, t0);
        d.handle_digests(0, &digests(8)).unwrap();
        let (_, i) = requests(&drain(&mut d, t0))
            .into_iter()
            .find(|(s, _)| *s == src)
            .unwrap();
        d.handle_piece_result(src, i, Err(PieceFailure::Corrupt), t0);
        let acts = drain(&mut d, t0);
        assert_eq!(
            acts[0],
            Action::Report {
                peer: peer(3).node_id,
                reason: BadPeerReason::DigestMismatch
            }
        );
        assert!(acts.contains(&Action::DropParent { src }));
        // The piece is asked again, of the seed (the only source left).
        assert!(requests(&acts).contains(&(SEED, i)), "{acts:?}");
    }

    #[test]
    fn a_request_past_its_deadline_is_cancelled_and_asked_elsewhere() {
        let t0 = Instant::now();
        let mut d = machine(1);
        let src = ready_parent(&mut d, 4, t0);
        d.handle_digests(0, &digests(1)).unwrap();
        assert_eq!(requests(&drain(&mut d, t0)), vec![(src, 0)]);
        let mut now = t0;
        // The parent has it, so it is asked again until it failed often enough to be dropped.
        for _ in 1..PARENT_FAILURES {
            now += PIECE_TIMEOUT;
            assert_eq!(d.poll_timeout(), Some(now));
            d.handle_timeout(now);
            let acts = drain(&mut d, now);
            let cancel = Action::Cancel {
                src,
                index: 0,
                timed_out: true,
            };
            assert_eq!(acts[0], cancel);
            assert_eq!(requests(&acts), vec![(src, 0)]);
        }
        now += PIECE_TIMEOUT;
        d.handle_timeout(now);
        let acts = drain(&mut d, now);
        assert!(acts.contains(&Action::Report {
            peer: peer(4).node_id,
            reason: BadPeerReason::Timeout
        }));
        assert!(acts.contains(&Action::DropParent { src }));
        assert_eq!(requests(&acts), vec![(SEED, 0)]);
        // The late answer changes nothing; the seed's does.
        assert_eq!(d.handle_piece_result(src, 0, Ok(()), now), None);
        assert_eq!(
            d.handle_piece_result(SEED, 0, Ok(()), now),
            Some(Delivery::New)
        );
    }

    #[test]
    fn resumed_pieces_count_only_against_the_same_digest() {
        let t0 = Instant::now();
        let resumed = HashMap::from([(0, Some(digest(0))), (1, Some([0xaa; 32])), (2, None)]);
        let mut d = Download::new(12, PIECE, 3, resumed, DownloadConfig::new(ME, 1));
        assert_eq!(d.handle_digests(0, &digests(3)), Ok(vec![0]));
        assert!(d.has(0) && !d.has(1) && !d.has(2));
        let mut reqs = requests(&drain(&mut d, t0));
        reqs.sort();
        assert_eq!(reqs, vec![(SEED, 1), (SEED, 2)]);
        assert!(d.handle_digests(3, &[[0; 32]]).is_err());
    }

    #[test]
    fn a_parent_list_naming_us_or_too_many_is_trimmed() {
        let t0 = Instant::now();
        let mut d = machine(2);
        let me = PeerInfo {
            node_id: ME,
            ..peer(0)
        };
        let mut list = vec![me];
        list.extend((1..=(MAX_PARENTS as u8 + 4)).map(peer));
        d.handle_parents(&list);
        let connects = drain(&mut d, t0)
            .iter()
            .filter(|a| matches!(a, Action::Connect { .. }))
            .count();
        assert_eq!(connects, MAX_PARENTS - 1);
        assert_eq!(d.parent_count(), MAX_PARENTS - 1);
        // Unknown sources' news is ignored.
        d.handle_have(SourceId(999), &[0]);
        d.handle_parent_gone(SourceId(999));
        assert_eq!(d.parent_count(), MAX_PARENTS - 1);
    }
}
