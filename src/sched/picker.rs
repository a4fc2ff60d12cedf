//! Which piece to fetch next, and from whom.
//!
//! A download fetches from several sources at once — other peers and the seed, each named by a
//! [`SourceId`] the caller assigns. The picker knows which pieces each source has, which pieces
//! can be verified (their digest is known; nothing else is ever requested), and which are in
//! flight from whom, and answers "what should I ask this source for next?":
//!
//! - when a consumer streams the content (Docker reads a layer front to back), the pieces just
//!   ahead of its read position go first, in order;
//! - otherwise rarest first (fewest sources having it), so that every piece stays spread over
//!   the swarm; ties are broken by an order drawn from the seed, so that peers starting together
//!   do not all ask for the same piece;
//! - at the end, when every missing piece is in flight, a source with a free slot may fetch a
//!   duplicate of a piece in flight elsewhere; when one copy arrives the other is cancelled;
//! - a *fallback* source (the seed) is asked only for pieces no other live source has: its
//!   upload is the swarm's scarcest resource and goes to what the swarm lacks. Without this
//!   rule a download with free seed slots asks the seed for pieces its parents hold but are
//!   busy sending, and under load (parents slower, more such pieces) the seed ends up serving
//!   most of the bytes.
//!
//! Sans-IO in the style of quinn-proto: events in through `handle_*`, decisions out through
//! `poll_*`. Not for: timeouts, scoring or choosing sources (the caller and the supernode's
//! [`crate::sched::parents`] do that), verifying bytes.
//!
//! Cost: a request is found by word-wise scans of bitmaps kept in the seeded random order, one
//! per availability count, with a summary word per 64 words; typical polls touch a few words
//! even at 65,536 pieces. Endgame scans only the requests in flight.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use d7q_wire::Bitmap;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Default for [`PickerConfig::max_in_flight_per_source`].
pub const DEFAULT_MAX_IN_FLIGHT_PER_SOURCE: usize = 4;

/// Default for [`PickerConfig::streaming_window`], in pieces.
pub const DEFAULT_STREAMING_WINDOW: u32 = 16;
/// Endgame duplicates start only when this few pieces are missing: with many pieces in flight
/// (tens per source) "everything missing is in flight" is true early, and duplicating then
/// doubles the bytes moved. Measured on loopback with four daemons: a third of all uploads
/// were duplicates before this bound.
pub const ENDGAME_MAX_MISSING: u32 = 8;

/// A source of pieces (a peer or the seed), numbered by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceId(pub u32);

/// How a [`PiecePicker`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PickerConfig {
    /// Requests outstanding at one source at most.
    pub max_in_flight_per_source: usize,
    /// Pieces from the read position that are fetched in order while a consumer streams.
    pub streaming_window: u32,
    /// Whether idle sources may duplicate requests in flight once nothing else is left.
    pub endgame: bool,
    /// Seed of the tie-break order among equally rare pieces; give every node its own (its node
    /// id, say) so that peers spread their first requests.
    pub seed: u64,
}

impl Default for PickerConfig {
    fn default() -> Self {
        Self {
            max_in_flight_per_source: DEFAULT_MAX_IN_FLIGHT_PER_SOURCE,
            streaming_window: DEFAULT_STREAMING_WINDOW,
            endgame: true,
            seed: 0,
        }
    }
}

/// The state of one download's pieces across its sources.
#[derive(Debug)]
pub struct PiecePicker {
    cfg: PickerConfig,
    count: u32,
    /// Piece index → its place in the seeded random order.
    rank: Vec<u32>,
    /// Place in the seeded random order → piece index.
    piece_at: Vec<u32>,
    /// Pieces whose digest is known, by index.
    digest: Bits,
    /// Pieces verified and stored, by index.
    done: Bits,
    done_count: u32,
    /// Live sources having each piece, by index.
    avail: Vec<u32>,
    /// Requests out for each piece, by index: the first, then at most one endgame duplicate.
    holders: Vec<[Option<Flight>; 2]>,
    /// Pieces with at least one request out.
    in_flight_pieces: u32,
    /// Pieces that may be requested now (digest known, not done, not in flight), by index…
    open: Bits,
    /// …and the same pieces by rank, one set per availability count.
    levels: Levels,
    sources: FxHashMap<SourceId, Source>,
    read_pos: Option<u32>,
    cancels: VecDeque<(SourceId, u32)>,
    /// Orders requests, so that endgame duplicates the oldest.
    next_seq: u64,
}

impl PiecePicker {
    /// A picker for `piece_count` pieces; no digests known, no sources yet.
    pub fn new(piece_count: u32, cfg: PickerConfig) -> Self {
        let n = piece_count as usize;
        let mut piece_at: Vec<u32> = (0..piece_count).collect();
        piece_at.shuffle(&mut StdRng::seed_from_u64(cfg.seed));
        let mut rank = vec![0; n];
        for (r, &i) in piece_at.iter().enumerate() {
            rank[i as usize] = r as u32;
        }
        Self {
            cfg,
            count: piece_count,
            rank,
            piece_at,
            digest: Bits::new(piece_count),
            done: Bits::new(piece_count),
            done_count: 0,
            avail: vec![0; n],
            holders: vec![[None, None]; n],
            in_flight_pieces: 0,
            open: Bits::new(piece_count),
            levels: Levels::new(piece_count),
            sources: FxHashMap::default(),
            read_pos: None,
            cancels: VecDeque::new(),
            next_seq: 0,
        }
    }

    /// The digest of piece `i` is known: it may be fetched, since it can be verified.
    pub fn handle_digest(&mut self, i: u32) {
        if i < self.count && self.digest.set(i) {
            self.refresh(i);
        }
    }

    /// `src` has exactly the pieces in `bitmap` (replacing what it announced before). Bits past
    /// this download's piece count are ignored.
    pub fn handle_source_bitmap(&mut self, src: SourceId, bitmap: &Bitmap) {
        let mut has = Bits::new(self.count);
        for i in bitmap.iter_ones().take_while(|&i| i < self.count) {
            has.set(self.rank[i as usize]);
        }
        let source = self.source_mut(src);
        let old = std::mem::replace(&mut source.has, has.clone());
        for (w, (&o, &h)) in old.words.iter().zip(&has.words).enumerate() {
            let mut changed = o ^ h;
            while changed != 0 {
                let b = changed.trailing_zeros();
                changed &= changed - 1;
                let i = self.piece_at[w * 64 + b as usize];
                let a = self.avail[i as usize];
                if h & (1 << b) != 0 {
                    self.set_avail(i, a + 1);
                } else {
                    self.set_avail(i, a - 1);
                }
            }
        }
    }

    /// `src` now has piece `i`.
    pub fn handle_source_have(&mut self, src: SourceId, i: u32) {
        if i >= self.count {
            return;
        }
        let r = self.rank[i as usize];
        if self.source_mut(src).has.set(r) {
            self.set_avail(i, self.avail[i as usize] + 1);
        }
    }

    /// `src` is gone: its requests in flight may go to other sources, its pieces no longer
    /// count, and its pending cancellations are dropped (its streams are gone with it).
    pub fn handle_source_gone(&mut self, src: SourceId) {
        let Some(source) = self.sources.remove(&src) else {
            return;
        };
        for &i in &source.in_flight {
            self.drop_holder(src, i);
        }
        for r in source.has.iter_ones() {
            let i = self.piece_at[r as usize];
            self.set_avail(i, self.avail[i as usize] - 1);
        }
        self.cancels.retain(|&(s, _)| s != src);
    }

    /// Piece `i` was verified and stored, by whatever means. Every request still out for it is
    /// released; if there were two (an endgame duplicate) both are queued for
    /// [`poll_cancel`](Self::poll_cancel), since the picker cannot know which one delivered —
    /// the caller skips the stream that already finished. Prefer
    /// [`handle_done_from`](Self::handle_done_from) when the source is known.
    pub fn handle_done(&mut self, i: u32) {
        if let Some(released) = self.complete(i) {
            if released.len() > 1 {
                self.cancels.extend(released.into_iter().map(|s| (s, i)));
            }
        }
    }

    /// Piece `i` arrived from `src` and was verified and stored; any other request for it
    /// becomes a cancellation.
    pub fn handle_done_from(&mut self, src: SourceId, i: u32) {
        if let Some(released) = self.complete(i) {
            let others = released.into_iter().filter(|&s| s != src);
            self.cancels.extend(others.map(|s| (s, i)));
        }
    }

    /// Fetching piece `i` from `src` failed (error, timeout, bad digest); it may be requested
    /// again. Unknown pairs — a request already released — are ignored.
    pub fn handle_failed(&mut self, src: SourceId, i: u32) {
        let Some(source) = self.sources.get_mut(&src) else {
            return;
        };
        let Some(k) = source.in_flight.iter().position(|&p| p == i) else {
            return;
        };
        source.in_flight.swap_remove(k);
        self.drop_holder(src, i);
    }

    /// Lets `src` have up to `max` requests outstanding instead of
    /// [`PickerConfig::max_in_flight_per_source`] (the seed may take more than a peer).
    pub fn set_source_limit(&mut self, src: SourceId, max: usize) {
        self.source_mut(src).limit = Some(max);
    }

    /// Makes `src` a fallback: it is asked only for pieces that no other live source has, and
    /// never for endgame duplicates.
    pub fn set_source_fallback(&mut self, src: SourceId) {
        self.source_mut(src).fallback = true;
    }

    /// Where a consumer is reading, in pieces; `None` when nobody streams the content.
    pub fn set_read_position(&mut self, pos: Option<u32>) {
        self.read_pos = pos;
    }

    /// The next piece to ask `src` for, marked in flight from it; `None` when `src` is at its
    /// limit or has nothing useful.
    pub fn poll_request(&mut self, src: SourceId) -> Option<u32> {
        let source = self.sources.get(&src)?;
        let limit = source.limit.unwrap_or(self.cfg.max_in_flight_per_source);
        if source.in_flight.len() >= limit {
            return None;
        }
        let i = if source.fallback {
            self.window_pick(source)
                .or_else(|| self.sole_pick(source))?
        } else {
            self.window_pick(source)
                .or_else(|| self.rarest_pick(source))
                .or_else(|| self.endgame_pick(src, source))?
        };
        self.hold(src, i);
        Some(i)
    }

    /// A request made redundant by a completed piece: the caller resets that stream.
    pub fn poll_cancel(&mut self) -> Option<(SourceId, u32)> {
        self.cancels.pop_front()
    }

    /// Whether [`poll_cancel`](Self::poll_cancel) has something.
    pub fn has_cancels(&self) -> bool {
        !self.cancels.is_empty()
    }

    /// Requests outstanding at `src`.
    pub fn in_flight(&self, src: SourceId) -> usize {
        self.sources.get(&src).map_or(0, |s| s.in_flight.len())
    }

    /// Live sources having piece `i`.
    pub fn availability(&self, i: u32) -> u32 {
        self.avail.get(i as usize).copied().unwrap_or(0)
    }

    /// Whether every piece is done.
    pub fn is_complete(&self) -> bool {
        self.done_count == self.count
    }

    /// Pieces done.
    pub fn done_count(&self) -> u32 {
        self.done_count
    }

    /// Pieces not done yet.
    pub fn missing(&self) -> u32 {
        self.count - self.done_count
    }

    fn source_mut(&mut self, src: SourceId) -> &mut Source {
        let count = self.count;
        self.sources.entry(src).or_insert_with(|| Source {
            has: Bits::new(count),
            in_flight: Vec::new(),
            limit: None,
            fallback: false,
        })
    }

    /// Marks `i` done and releases its requests; returns their sources, or `None` if `i` was
    /// out of range or already done.
    fn complete(&mut self, i: u32) -> Option<Vec<SourceId>> {
        if i >= self.count || !self.done.set(i) {
            return None;
        }
        self.done_count += 1;
        let holders = std::mem::take(&mut self.holders[i as usize]);
        let released: Vec<SourceId> = holders.iter().flatten().map(|f| f.src).collect();
        for &s in &released {
            if let Some(source) = self.sources.get_mut(&s) {
                source.in_flight.retain(|&p| p != i);
            }
        }
        if !released.is_empty() {
            self.in_flight_pieces -= 1;
        }
        self.refresh(i);
        Some(released)
    }

    /// In-order pick in the streaming window.
    fn window_pick(&self, source: &Source) -> Option<u32> {
        let pos = self.read_pos?;
        let end = pos
            .saturating_add(self.cfg.streaming_window)
            .min(self.count);
        self.open.find_in(pos, end, |i| {
            source.has.test(self.rank[i as usize])
                && (!source.fallback || self.avail[i as usize] == 1)
        })
    }

    /// The first open piece in the seeded order that `source` alone has.
    fn sole_pick(&self, source: &Source) -> Option<u32> {
        self.levels
            .first_common(1, &source.has)
            .map(|r| self.piece_at[r as usize])
    }

    /// The rarest open piece `source` has, first in the seeded order among equals.
    fn rarest_pick(&self, source: &Source) -> Option<u32> {
        (1..self.levels.count())
            .filter(|&a| self.levels.len(a) > 0)
            .find_map(|a| self.levels.first_common(a, &source.has))
            .map(|r| self.piece_at[r as usize])
    }

    /// Once every missing piece is in flight: the oldest single request elsewhere for a piece
    /// `source` has.
    fn endgame_pick(&self, src: SourceId, source: &Source) -> Option<u32> {
        let remaining = self.count - self.done_count;
        if !self.cfg.endgame
            || remaining == 0
            || remaining > ENDGAME_MAX_MISSING
            || self.in_flight_pieces != remaining
        {
            return None;
        }
        let mut best: Option<(u64, u32)> = None;
        for (&other, s) in &self.sources {
            if other == src {
                continue;
            }
            for &i in &s.in_flight {
                let [Some(first), None] = self.holders[i as usize] else {
                    continue;
                };
                if first.src == other
                    && source.has.test(self.rank[i as usize])
                    && best.is_none_or(|(seq, _)| first.seq < seq)
                {
                    best = Some((first.seq, i));
                }
            }
        }
        best.map(|(_, i)| i)
    }

    fn hold(&mut self, src: SourceId, i: u32) {
        let flight = Flight {
            src,
            seq: self.next_seq,
        };
        self.next_seq += 1;
        let slot = &mut self.holders[i as usize];
        if slot[0].is_none() {
            slot[0] = Some(flight);
            self.in_flight_pieces += 1;
            self.refresh(i);
        } else {
            slot[1] = Some(flight);
        }
        self.source_mut(src).in_flight.push(i);
    }

    /// Removes `src`'s request for `i` from the piece's holders (not from the source's list).
    fn drop_holder(&mut self, src: SourceId, i: u32) {
        let slot = &mut self.holders[i as usize];
        if slot[1].is_some_and(|f| f.src == src) {
            slot[1] = None;
        } else if slot[0].is_some_and(|f| f.src == src) {
            slot[0] = slot[1].take();
            if slot[0].is_none() {
                self.in_flight_pieces -= 1;
                self.refresh(i);
            }
        }
    }

    /// Puts `i` in or out of the open sets according to its state.
    fn refresh(&mut self, i: u32) {
        let iu = i as usize;
        let want = self.digest.test(i) && !self.done.test(i) && self.holders[iu][0].is_none();
        if want == self.open.test(i) {
            return;
        }
        let (r, a) = (self.rank[iu], self.avail[iu] as usize);
        if want {
            self.open.set(i);
            self.levels.insert(a, r);
        } else {
            self.open.clear(i);
            self.levels.remove(a, r);
        }
    }

    fn set_avail(&mut self, i: u32, a: u32) {
        let iu = i as usize;
        if self.open.test(i) {
            let r = self.rank[iu];
            self.levels.remove(self.avail[iu] as usize, r);
            self.levels.insert(a as usize, r);
        }
        self.avail[iu] = a;
    }
}

/// One request out.
#[derive(Clone, Copy, Debug)]
struct Flight {
    src: SourceId,
    seq: u64,
}

#[derive(Debug)]
struct Source {
    /// Pieces it has, by rank.
    has: Bits,
    /// Pieces requested from it and not yet released.
    in_flight: Vec<u32>,
    /// Its own limit of requests outstanding, if set.
    limit: Option<usize>,
    /// Asked only for pieces no other live source has.
    fallback: bool,
}

/// A plain bitset over piece indices or ranks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Bits {
    words: Vec<u64>,
}

impl Bits {
    pub(crate) fn new(len: u32) -> Self {
        Self {
            words: vec![0; len.div_ceil(64) as usize],
        }
    }

    pub(crate) fn test(&self, i: u32) -> bool {
        self.words
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i`; whether it was newly set.
    pub(crate) fn set(&mut self, i: u32) -> bool {
        let w = &mut self.words[(i / 64) as usize];
        let was = *w & (1 << (i % 64)) != 0;
        *w |= 1 << (i % 64);
        !was
    }

    pub(crate) fn clear(&mut self, i: u32) {
        self.words[(i / 64) as usize] &= !(1 << (i % 64));
    }

    pub(crate) fn words(&self) -> &[u64] {
        &self.words
    }

    pub(crate) fn iter_ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(wi, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                if w == 0 {
                    return None;
                }
                let b = w.trailing_zeros();
                w &= w - 1;
                Some(wi as u32 * 64 + b)
            })
        })
    }

    /// The first set bit in `from..to` for which `pred` holds.
    fn find_in(&self, from: u32, to: u32, mut pred: impl FnMut(u32) -> bool) -> Option<u32> {
        if from >= to {
            return None;
        }
        let (first, last) = ((from / 64) as usize, ((to - 1) / 64) as usize);
        for wi in first..=last {
            let mut w = self.words[wi];
            if wi == first {
                w &= u64::MAX << (from % 64);
            }
            while w != 0 {
                let i = wi as u32 * 64 + w.trailing_zeros();
                if i >= to {
                    return None;
                }
                if pred(i) {
                    return Some(i);
                }
                w &= w - 1;
            }
        }
        None
    }
}

/// The open pieces by rank, one set per availability count, all in one allocation (the scan
/// for the rarest piece a source has walks them in order, so they sit side by side in memory).
/// Each set has one summary bit per non-empty word, so that "the first member that is also in
/// that other set" skips empty stretches 4096 bits at a time.
#[derive(Debug)]
struct Levels {
    /// Words per set.
    wpl: usize,
    /// Summary words per set.
    spl: usize,
    words: Vec<u64>,
    summary: Vec<u64>,
    /// Members of each set.
    lens: Vec<u32>,
}

impl Levels {
    /// Sets for ranks below `len`; one (availability 0) to begin with.
    fn new(len: u32) -> Self {
        let wpl = len.div_ceil(64) as usize;
        let spl = wpl.div_ceil(64);
        Self {
            wpl,
            spl,
            words: vec![0; wpl],
            summary: vec![0; spl],
            lens: vec![0],
        }
    }

    /// Sets so far (availability counts seen, plus one).
    fn count(&self) -> usize {
        self.lens.len()
    }

    fn len(&self, a: usize) -> u32 {
        self.lens.get(a).copied().unwrap_or(0)
    }

    fn insert(&mut self, a: usize, r: u32) {
        while self.lens.len() <= a {
            self.lens.push(0);
            self.words.resize(self.words.len() + self.wpl, 0);
            self.summary.resize(self.summary.len() + self.spl, 0);
        }
        let w = (r / 64) as usize;
        let word = &mut self.words[a * self.wpl + w];
        if *word & (1 << (r % 64)) == 0 {
            *word |= 1 << (r % 64);
            self.summary[a * self.spl + w / 64] |= 1 << (w % 64);
            self.lens[a] += 1;
        }
    }

    fn remove(&mut self, a: usize, r: u32) {
        if a >= self.lens.len() {
            return;
        }
        let w = (r / 64) as usize;
        let word = &mut self.words[a * self.wpl + w];
        if *word & (1 << (r % 64)) != 0 {
            *word &= !(1 << (r % 64));
            if *word == 0 {
                self.summary[a * self.spl + w / 64] &= !(1 << (w % 64));
            }
            self.lens[a] -= 1;
        }
    }

    /// The first rank in set `a` that is also in `other`.
    fn first_common(&self, a: usize, other: &Bits) -> Option<u32> {
        if a >= self.lens.len() {
            return None;
        }
        let words = &self.words[a * self.wpl..(a + 1) * self.wpl];
        let summary = &self.summary[a * self.spl..(a + 1) * self.spl];
        for (si, &s) in summary.iter().enumerate() {
            let mut s = s;
            while s != 0 {
                let wi = si * 64 + s.trailing_zeros() as usize;
                s &= s - 1;
                let both = words[wi] & other.words()[wi];
                if both != 0 {
                    return Some(wi as u32 * 64 + both.trailing_zeros());
                }
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: SourceId = SourceId(1);
    const B: SourceId = SourceId(2);
    const C: SourceId = SourceId(3);

    fn cfg(max: usize) -> PickerConfig {
        PickerConfig {
            max_in_flight_per_source: max,
            ..PickerConfig::default()
        }
    }

    fn bitmap(len: u32, ones: impl IntoIterator<Item = u32>) -> Bitmap {
        let mut b = Bitmap::new(len);
        for i in ones {
            b.set(i);
        }
        b
    }

    /// A picker with every digest known.
    fn picker(count: u32, cfg: PickerConfig) -> PiecePicker {
        let mut p = PiecePicker::new(count, cfg);
        for i in 0..count {
            p.handle_digest(i);
        }
        p
    }

    fn drain(p: &mut PiecePicker, src: SourceId) -> Vec<u32> {
        std::iter::from_fn(|| p.poll_request(src)).collect()
    }

    fn sorted(mut v: Vec<u32>) -> Vec<u32> {
        v.sort_unstable();
        v
    }

    #[test]
    fn rarest_pieces_first() {
        let mut p = picker(8, cfg(usize::MAX));
        p.handle_source_bitmap(A, &Bitmap::full(8));
        p.handle_source_bitmap(B, &bitmap(8, 0..4));
        p.handle_source_bitmap(C, &bitmap(8, 0..2));
        assert_eq!(
            (p.availability(0), p.availability(3), p.availability(7)),
            (3, 2, 1)
        );
        let order = drain(&mut p, A);
        assert_eq!(order.len(), 8);
        assert_eq!(sorted(order[..4].to_vec()), vec![4, 5, 6, 7]);
        assert_eq!(sorted(order[4..6].to_vec()), vec![2, 3]);
        assert_eq!(sorted(order[6..].to_vec()), vec![0, 1]);
    }

    #[test]
    fn availability_follows_have_and_bitmap_replacement() {
        let mut p = picker(8, cfg(usize::MAX));
        p.handle_source_bitmap(A, &bitmap(8, [0, 1]));
        p.handle_source_have(B, 1);
        p.handle_source_have(B, 1);
        p.handle_source_have(B, 99);
        assert_eq!((p.availability(0), p.availability(1)), (1, 2));
        p.handle_source_bitmap(A, &bitmap(8, [5]));
        assert_eq!(
            (p.availability(0), p.availability(1), p.availability(5)),
            (0, 1, 1)
        );
        // C can only be asked for what it announced.
        p.handle_source_bitmap(C, &bitmap(8, [1, 5]));
        assert_eq!(sorted(drain(&mut p, C)), vec![1, 5]);
    }

    #[test]
    fn streaming_window_goes_in_order_then_rarest() {
        let mut p = picker(
            32,
            PickerConfig {
                max_in_flight_per_source: usize::MAX,
                streaming_window: 4,
                ..PickerConfig::default()
            },
        );
        p.handle_source_bitmap(A, &bitmap(32, (0..32).filter(|&i| i != 12)));
        p.set_read_position(Some(10));
        let got: Vec<u32> = (0..3).filter_map(|_| p.poll_request(A)).collect();
        // 12 is in the window but A lacks it.
        assert_eq!(got, vec![10, 11, 13]);
        p.set_read_position(Some(20));
        assert_eq!(p.poll_request(A), Some(20));
        assert_eq!(p.poll_request(A), Some(21));
        // Past the window's end the order is the seeded one: not simply ascending.
        p.set_read_position(None);
        let rest = drain(&mut p, A);
        assert_eq!(rest.len(), 31 - 5);
        assert_ne!(rest, sorted(rest.clone()));
        // A window reaching past the last piece is fine.
        let mut q = picker(4, cfg(usize::MAX));
        q.handle_source_bitmap(A, &Bitmap::full(4));
        q.set_read_position(Some(2));
        assert_eq!(q.poll_request(A), Some(2));
        assert_eq!(q.poll_request(A), Some(3));
    }

    #[test]
    fn a_fallback_source_is_asked_only_for_what_no_other_source_has() {
        let seed = SourceId(0);
        let mut p = picker(8, cfg(usize::MAX));
        p.set_source_fallback(seed);
        p.handle_source_bitmap(seed, &Bitmap::full(8));
        p.handle_source_bitmap(A, &bitmap(8, 0..6));
        // A holds 0..6 and has free slots or not: the seed is asked only for 6 and 7.
        assert_eq!(sorted(drain(&mut p, seed)), vec![6, 7]);
        // Even with A's requests all out, the seed is not asked for A's pieces, nor for
        // endgame duplicates.
        assert_eq!(sorted(drain(&mut p, A)), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(p.poll_request(seed), None);
        // A fails a piece and leaves: what only the seed has now is the seed's again.
        p.handle_failed(A, 2);
        assert_eq!(p.poll_request(seed), None, "A still has piece 2");
        p.handle_source_gone(A);
        assert_eq!(sorted(drain(&mut p, seed)), vec![0, 1, 2, 3, 4, 5]);
        // A streaming reader does not change the rule.
        let mut q = picker(8, cfg(usize::MAX));
        q.set_source_fallback(seed);
        q.handle_source_bitmap(seed, &Bitmap::full(8));
        q.handle_source_bitmap(B, &bitmap(8, [3]));
        q.set_read_position(Some(3));
        assert_eq!(q.poll_request(seed), Some(4));
        assert_eq!(q.poll_request(B), Some(3));
    }

    #[test]
    fn only_pieces_with_known_digests_are_requested() {
        let mut p = PiecePicker::new(8, cfg(usize::MAX));
        p.handle_source_bitmap(A, &Bitmap::full(8));
        assert_eq!(p.poll_request(A), None);
        p.handle_digest(3);
        p.handle_digest(3);
        p.handle_digest(42);
        assert_eq!(p.poll_request(A), Some(3));
        assert_eq!(p.poll_request(A), None);
        p.handle_digest(6);
        assert_eq!(p.poll_request(A), Some(6));
        // Unknown sources get nothing.
        assert_eq!(p.poll_request(SourceId(77)), None);
    }

    #[test]
    fn per_source_limit_holds() {
        let mut p = picker(16, cfg(2));
        p.handle_source_bitmap(A, &Bitmap::full(16));
        p.handle_source_bitmap(B, &Bitmap::full(16));
        let a = drain(&mut p, A);
        assert_eq!(a.len(), 2);
        assert_eq!(p.in_flight(A), 2);
        let b = drain(&mut p, B);
        assert_eq!(b.len(), 2);
        assert!(a.iter().all(|i| !b.contains(i)), "no piece asked twice");
        p.handle_done_from(A, a[0]);
        assert_eq!(p.in_flight(A), 1);
        let next = p.poll_request(A).expect("a slot freed");
        assert!(!a.contains(&next) && !b.contains(&next));
        assert_eq!(p.poll_request(A), None);
        assert_eq!(p.poll_cancel(), None);
        // A source of its own size.
        p.set_source_limit(C, 5);
        p.handle_source_bitmap(C, &Bitmap::full(16));
        assert_eq!(drain(&mut p, C).len(), 5);
        assert_eq!(p.in_flight(C), 5);
    }

    #[test]
    fn failed_and_gone_requests_are_requested_again() {
        let mut p = picker(
            4,
            PickerConfig {
                endgame: false,
                ..cfg(usize::MAX)
            },
        );
        p.handle_source_bitmap(A, &Bitmap::full(4));
        p.handle_source_bitmap(B, &bitmap(4, [0, 1]));
        assert_eq!(drain(&mut p, A).len(), 4);
        assert!(drain(&mut p, B).is_empty(), "everything B has is in flight");
        p.handle_failed(A, 0);
        p.handle_failed(A, 0);
        assert_eq!(p.in_flight(A), 3);
        assert_eq!(p.poll_request(B), Some(0));
        p.handle_source_gone(A);
        assert_eq!(p.in_flight(A), 0);
        assert_eq!((p.availability(1), p.availability(2)), (1, 0));
        assert_eq!(drain(&mut p, B), vec![1]);
        // 2 and 3 wait for a source that has them.
        p.handle_source_have(C, 3);
        assert_eq!(drain(&mut p, C), vec![3]);
        assert_eq!(p.in_flight(B), 2);
    }

    #[test]
    fn endgame_duplicates_once_and_cancels_the_loser() {
        let mut p = picker(4, cfg(2));
        for s in [A, B, C] {
            p.handle_source_bitmap(s, &Bitmap::full(4));
        }
        let a = drain(&mut p, A);
        assert_eq!(a.len(), 2);
        // Not endgame yet: two pieces are still open, B gets them, not duplicates.
        let b = drain(&mut p, B);
        assert_eq!(b.len(), 2);
        assert!(a.iter().all(|i| !b.contains(i)));
        // Every missing piece is in flight now: C duplicates, oldest request first, and never
        // the same piece twice.
        let c = drain(&mut p, C);
        assert_eq!(c, vec![a[0], a[1]]);
        // A delivers a[0]: C's copy is cancelled.
        p.handle_done_from(A, a[0]);
        assert_eq!(p.poll_cancel(), Some((C, a[0])));
        assert_eq!(p.poll_cancel(), None);
        assert_eq!(p.in_flight(A), 1);
        assert_eq!(p.in_flight(C), 1);
        // A and C are free again: they duplicate B's pieces, oldest first.
        assert_eq!(p.poll_request(A), Some(b[0]));
        assert_eq!(p.poll_request(C), Some(b[1]));
        // Every piece has its one duplicate: a newcomer gets nothing.
        let d = SourceId(4);
        p.handle_source_bitmap(d, &Bitmap::full(4));
        assert_eq!(p.poll_request(d), None);
        // The duplicate wins: the original is cancelled.
        p.handle_done_from(A, b[0]);
        assert_eq!(p.poll_cancel(), Some((B, b[0])));
        assert_eq!(p.poll_cancel(), None);
        // Done without a known source and two requests out: both are cancelled.
        p.handle_done(a[1]);
        let mut both = vec![p.poll_cancel().unwrap(), p.poll_cancel().unwrap()];
        both.sort();
        assert_eq!(both, vec![(A, a[1]), (C, a[1])]);
        // A late failure of a cancelled request changes nothing.
        p.handle_failed(C, a[1]);
        assert_eq!(p.missing(), 1);
        assert_eq!((p.in_flight(A), p.in_flight(B), p.in_flight(C)), (0, 1, 1));
        // The original of the last piece fails: the duplicate carries on, and the piece may get
        // one new duplicate.
        p.handle_failed(B, b[1]);
        assert_eq!(p.poll_request(d), Some(b[1]));
        assert_eq!(p.poll_request(B), None);
        p.handle_done_from(C, b[1]);
        assert_eq!(p.poll_cancel(), Some((d, b[1])));
        assert!(p.is_complete());
        assert_eq!(p.in_flight(d), 0);
    }

    #[test]
    fn endgame_can_be_switched_off() {
        let mut p = picker(
            2,
            PickerConfig {
                endgame: false,
                ..cfg(4)
            },
        );
        p.handle_source_bitmap(A, &Bitmap::full(2));
        p.handle_source_bitmap(B, &Bitmap::full(2));
        assert_eq!(drain(&mut p, A).len(), 2);
        assert_eq!(p.poll_request(B), None);
    }

    #[test]
    fn the_seed_fixes_the_order() {
        let order = |seed| {
            let mut p = picker(
                64,
                PickerConfig {
                    seed,
                    ..cfg(usize::MAX)
                },
            );
            p.handle_source_bitmap(A, &Bitmap::full(64));
            drain(&mut p, A)
        };
        assert_eq!(order(7), order(7));
        let orders: Vec<Vec<u32>> = (0..4).map(order).collect();
        assert!(
            orders.windows(2).all(|w| w[0] != w[1]),
            "seeds give distinct orders"
        );
        for o in &orders {
            assert_eq!(sorted(o.clone()), (0..64).collect::<Vec<_>>());
        }
    }

    #[test]
    fn completes_and_stops() {
        let mut p = picker(3, cfg(4));
        p.handle_source_bitmap(A, &Bitmap::full(3));
        assert_eq!(
            (p.missing(), p.done_count(), p.is_complete()),
            (3, 0, false)
        );
        for i in drain(&mut p, A) {
            p.handle_done_from(A, i);
        }
        p.handle_done(1);
        p.handle_done(9);
        assert!(p.is_complete());
        assert_eq!((p.missing(), p.done_count()), (0, 3));
        assert_eq!(p.poll_request(A), None);
        assert_eq!(p.in_flight(A), 0);
        assert!(PiecePicker::new(0, PickerConfig::default()).is_complete());
    }

    #[test]
    fn pieces_done_from_disk_are_never_requested() {
        let mut p = picker(4, cfg(4));
        p.handle_done(0);
        p.handle_done(2);
        p.handle_source_bitmap(A, &Bitmap::full(4));
        assert_eq!(sorted(drain(&mut p, A)), vec![1, 3]);
        assert_eq!(p.poll_cancel(), None);
    }

    #[test]
    fn many_pieces_many_sources_finish() {
        use rand::Rng;
        let n = 65_536;
        let mut rng = StdRng::seed_from_u64(1);
        let mut p = picker(n, cfg(8));
        let sources: Vec<SourceId> = (0..16).map(SourceId).collect();
        for &s in &sources[1..] {
            let b = bitmap(n, (0..n).filter(|_| rng.gen_bool(0.3)));
            p.handle_source_bitmap(s, &b);
        }
        p.handle_source_bitmap(sources[0], &Bitmap::full(n));
        let mut requests = 0u32;
        while !p.is_complete() {
            for &s in &sources {
                while let Some(i) = p.poll_request(s) {
                    requests += 1;
                    p.handle_done_from(s, i);
                }
            }
        }
        assert_eq!(requests, n, "no duplicates outside endgame");
        assert_eq!(p.poll_cancel(), None);
    }
}
