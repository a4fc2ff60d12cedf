//! How a seed hands out pieces in a swarm ("super-seeding"): the first copies of each piece go
//! out at once; after that, a piece that peers already hold is refused with "busy", so the
//! requester takes it from a peer and the seed's upload goes to pieces nobody has yet. Without
//! this every peer asks the seed for each brand-new piece at the same moment and the swarm
//! degenerates into N downloads from the seed.
//!
//! Sans-IO: requests and `now` in, serve-or-refuse out.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use d7q_wire::NodeId;

/// Copies of a piece the seed serves before it refuses requests that peers could answer. One:
/// measured with eight daemons on loopback, two copies left 58% of the bytes to the peers and
/// one left about 80%.
pub const FIRST_COPIES: u32 = 1;
/// After this long without any peer announcing a piece the seed delivered, the seed serves it
/// again (its first carriers may have failed or left). Counted from the end of the last
/// delivery, not from the decision to serve: on a loaded seed a copy can wait in the upload
/// queue for seconds, and a clock started at the decision sent duplicates of pieces still on
/// their way to their first carrier.
pub const PATIENCE: Duration = Duration::from_secs(2);
/// A requester refused a piece for this long is served it: its parents do not include the
/// holders, or they cannot deliver. Measured per requester from its first refusal, not from
/// the piece's first copy: a clock per piece let everyone through once the piece was a few
/// seconds old, so on a loaded machine (slower swarm, older pieces) the seed ended up serving
/// most of the bytes.
pub const STARVATION: Duration = Duration::from_secs(5);
/// Refused (requester, piece) pairs remembered at most. Past it, stale pairs are forgotten and,
/// if that is not enough, requests are served: liveness over efficiency.
pub const MAX_WAITING: usize = 1 << 16;
/// Default for [`SeedGate::with_slots`]: copies on their way at once. Every copy shares the
/// seed's upload with the others, so a seed that lets a hundred requests through at once
/// delivers its first piece only after a hundred pieces' time, and nobody has anything to
/// pass on meanwhile. Few copies at a time finish fast and start spreading at once. Measured
/// in the simulator (`d7q-bench sim`): with 100 peers the first piece arrived after 16.7 s
/// with no limit.
pub const SEED_SLOTS: u32 = 4;

/// What the gate decided about one request, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve: one of the piece's first copies.
    First,
    /// Serve: delivered before, but no peer announced it within [`PATIENCE`].
    Patience,
    /// Serve: this requester has been refused it for [`STARVATION`].
    Starvation,
    /// Serve: too many requesters are waiting to remember this one.
    Overflow,
    /// Refuse ("busy"): peers hold it, or its copy is still on its way.
    Busy,
    /// Refuse ("busy"): every upload slot carries a copy; ask again a little later.
    Saturated,
}

impl Decision {
    /// Whether the piece is to be sent.
    pub fn serves(self) -> bool {
        !matches!(self, Decision::Busy | Decision::Saturated)
    }
}

/// Per-task record of what the seed served and whom it kept waiting.
#[derive(Debug)]
pub struct SeedGate {
    /// Copies of each piece served (decided and not aborted).
    served: Vec<u32>,
    /// Copies of each piece decided but not yet delivered.
    sending: Vec<u16>,
    /// When the last copy of each piece finished going out.
    delivered: Vec<Option<Instant>>,
    /// Copies decided and not yet delivered, all pieces together.
    in_flight: u32,
    /// Copies on their way at most.
    slots: u32,
    /// When each requester was first refused each piece it still asks for.
    waiting: HashMap<(NodeId, u32), Instant>,
    /// Not before this is the full waiting list swept again (a sweep that freed nothing would
    /// otherwise repeat on every request).
    next_sweep: Option<Instant>,
}

impl SeedGate {
    /// A gate for `piece_count` pieces with [`SEED_SLOTS`] upload slots.
    pub fn new(piece_count: u32) -> Self {
        Self::with_slots(piece_count, SEED_SLOTS)
    }

    /// A gate for `piece_count` pieces that lets at most `slots` copies (at least one) be on
    /// their way at once.
    pub fn with_slots(piece_count: u32, slots: u32) -> Self {
        Self {
            served: vec![0; piece_count as usize],
            sending: vec![0; piece_count as usize],
            delivered: vec![None; piece_count as usize],
            in_flight: 0,
            slots: slots.max(1),
            waiting: HashMap::new(),
            next_sweep: None,
        }
    }

    /// `requester` asks the seed for piece `i`, which `holders` uploading peers already
    /// announced. Whatever serves must be followed by [`Self::handle_sent`] once the copy went
    /// out or was abandoned. For a seed with this one task; see
    /// [`Self::handle_request_among`].
    pub fn handle_request(
        &mut self,
        requester: NodeId,
        i: u32,
        holders: u32,
        now: Instant,
    ) -> Decision {
        self.handle_request_among(requester, i, holders, 0, now)
    }

    /// [`Self::handle_request`] for a seed that also has `elsewhere` copies of its other tasks
    /// on their way: the slots are the seed's, since its tasks share one upload. Per task, an
    /// image's four layers let four times as many copies share the link, and each first copy
    /// took four times as long to reach a peer that could pass it on (in the simulator, 100
    /// peers fetching a 4-layer image: 0.63 of the bound with slots per task, 0.80 shared).
    pub fn handle_request_among(
        &mut self,
        requester: NodeId,
        i: u32,
        holders: u32,
        elsewhere: u32,
        now: Instant,
    ) -> Decision {
        let idx = i as usize;
        if idx >= self.served.len() {
            return Decision::First;
        }
        if self.in_flight.saturating_add(elsewhere) >= self.slots {
            // Nothing is remembered: the requester asks again, and by then the answer may
            // differ for reasons that have nothing to do with it.
            return Decision::Saturated;
        }
        let key = (requester, i);
        let waited = self
            .waiting
            .get(&key)
            .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t));
        let quiet = holders == 0
            && self.sending[idx] == 0
            && self.delivered[idx].is_none_or(|t| now.saturating_duration_since(t) >= PATIENCE);
        let mut decision = if self.served[idx] < FIRST_COPIES {
            Decision::First
        } else if quiet {
            Decision::Patience
        } else if waited >= STARVATION {
            Decision::Starvation
        } else {
            Decision::Busy
        };
        if decision == Decision::Busy && !self.waiting.contains_key(&key) {
            if self.waiting.len() >= MAX_WAITING && self.next_sweep.is_none_or(|t| now >= t) {
                // Pairs this old were answered elsewhere: their requesters stopped asking.
                self.waiting
                    .retain(|_, t| now.saturating_duration_since(*t) < 2 * STARVATION);
                // Whatever stayed is younger than 2 × STARVATION: nothing more can go
                // before another STARVATION has passed.
                self.next_sweep = Some(now + STARVATION);
            }
            if self.waiting.len() >= MAX_WAITING {
                decision = Decision::Overflow;
            } else {
                self.waiting.insert(key, now);
            }
        }
        if decision.serves() {
            self.served[idx] += 1;
            self.sending[idx] = self.sending[idx].saturating_add(1);
            self.in_flight += 1;
            self.waiting.remove(&key);
        }
        decision
    }

    /// A copy of piece `i` that [`Self::handle_request`] let through went out whole
    /// (`delivered`), or was abandoned before that (the requester went away, the read failed):
    /// an abandoned copy does not count as served.
    pub fn handle_sent(&mut self, i: u32, delivered: bool, now: Instant) {
        let idx = i as usize;
        if idx >= self.served.len() {
            return;
        }
        if self.sending[idx] == 0 {
            return; // not a copy this gate let through
        }
        self.sending[idx] -= 1;
        self.in_flight = self.in_flight.saturating_sub(1);
        if delivered {
            self.delivered[idx] = Some(now);
        } else {
            self.served[idx] = self.served[idx].saturating_sub(1);
        }
    }

    /// Copies of piece `i` served so far.
    pub fn served(&self, i: u32) -> u32 {
        self.served.get(i as usize).copied().unwrap_or(0)
    }

    /// Copies on their way now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slots_are_shared_with_the_seeds_other_tasks() {
        let t0 = Instant::now();
        let mut g = SeedGate::with_slots(8, 2);
        // Two copies of another task on their way fill the seed.
        assert_eq!(g.handle_request_among(P, 0, 0, 2, t0), Decision::Saturated);
        // One of them done: a slot for this task.
        assert_eq!(g.handle_request_among(P, 0, 0, 1, t0), Decision::First);
        assert_eq!(g.handle_request_among(Q, 1, 0, 1, t0), Decision::Saturated);
        g.handle_sent(0, true, t0);
        assert_eq!(g.handle_request_among(Q, 1, 0, 1, t0), Decision::First);
    }

    const P: NodeId = NodeId([1; 16]);
    const Q: NodeId = NodeId([2; 16]);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn first_copies_then_busy_while_peers_hold_it() {
        let t0 = Instant::now();
        let mut g = SeedGate::new(4);
        for _ in 0..FIRST_COPIES {
            assert_eq!(g.handle_request(P, 1, 0, t0), Decision::First);
            g.handle_sent(1, true, t0 + 50 * MS);
        }
        // Nobody announced it yet, but it went out moments ago: wait for the carriers.
        assert_eq!(g.handle_request(Q, 1, 0, t0 + 100 * MS), Decision::Busy);
        // Peers hold it: busy.
        assert_eq!(g.handle_request(Q, 1, 3, t0 + 500 * MS), Decision::Busy);
        // The carriers never announced it: serve again after the patience.
        assert_eq!(
            g.handle_request(Q, 1, 0, t0 + 50 * MS + PATIENCE),
            Decision::Patience
        );
        assert_eq!(g.served(1), FIRST_COPIES + 1);
        // Other pieces are independent; out of range is served (the caller checks ranges).
        assert_eq!(g.handle_request(Q, 2, 7, t0), Decision::First);
        assert!(g.handle_request(Q, 99, 0, t0).serves());
    }

    #[test]
    fn patience_counts_from_the_delivery_not_the_decision() {
        let t0 = Instant::now();
        let mut g = SeedGate::new(2);
        assert_eq!(g.handle_request(P, 0, 0, t0), Decision::First);
        // The copy sits in a long upload queue: nobody can hold it yet, and nobody gets a
        // second copy however long it takes.
        assert_eq!(g.handle_request(Q, 0, 0, t0 + 3 * PATIENCE), Decision::Busy);
        g.handle_sent(0, true, t0 + 4 * PATIENCE);
        assert_eq!(
            g.handle_request(Q, 0, 0, t0 + 4 * PATIENCE + PATIENCE / 2),
            Decision::Busy
        );
        assert_eq!(
            g.handle_request(Q, 0, 0, t0 + 5 * PATIENCE),
            Decision::Patience
        );
    }

    #[test]
    fn an_abandoned_copy_is_not_served() {
        let t0 = Instant::now();
        let mut g = SeedGate::new(2);
        assert_eq!(g.handle_request(P, 0, 0, t0), Decision::First);
        assert_eq!(g.handle_request(Q, 0, 0, t0 + MS), Decision::Busy);
        // P went away before the copy left: the next asker gets the first copy at once.
        g.handle_sent(0, false, t0 + 2 * MS);
        assert_eq!(g.served(0), 0);
        assert_eq!(g.handle_request(Q, 0, 0, t0 + 3 * MS), Decision::First);
    }

    #[test]
    fn starvation_counts_from_each_requesters_first_refusal() {
        let t0 = Instant::now();
        let mut g = SeedGate::new(4);
        assert_eq!(g.handle_request(P, 0, 0, t0), Decision::First);
        g.handle_sent(0, true, t0);
        // Long after the first copy, holders exist: a newcomer is still refused...
        let late = t0 + 10 * STARVATION;
        assert_eq!(g.handle_request(Q, 0, 5, late), Decision::Busy);
        assert_eq!(
            g.handle_request(Q, 0, 5, late + STARVATION / 2),
            Decision::Busy
        );
        // ...until it has itself been kept waiting for the starvation limit.
        assert_eq!(
            g.handle_request(Q, 0, 5, late + STARVATION),
            Decision::Starvation
        );
        g.handle_sent(0, true, late + STARVATION);
        assert_eq!(g.served(0), 2);
        // Served once, it waits again from scratch if it asks again.
        assert_eq!(g.handle_request(Q, 0, 5, late + STARVATION), Decision::Busy);
    }

    #[test]
    fn copies_on_their_way_are_bounded_by_the_slots() {
        let t0 = Instant::now();
        let mut g = SeedGate::with_slots(8, 2);
        assert_eq!(g.handle_request(P, 0, 0, t0), Decision::First);
        assert_eq!(g.handle_request(P, 1, 0, t0), Decision::First);
        assert_eq!(g.in_flight(), 2);
        // Full: even a piece nobody has is refused, and nothing of it is recorded.
        assert_eq!(g.handle_request(Q, 2, 0, t0), Decision::Saturated);
        assert_eq!(g.served(2), 0);
        assert!(g.waiting.is_empty());
        // A delivered or an abandoned copy frees its slot.
        g.handle_sent(0, true, t0 + MS);
        assert_eq!(g.handle_request(Q, 2, 0, t0 + MS), Decision::First);
        assert_eq!(g.handle_request(Q, 3, 0, t0 + MS), Decision::Saturated);
        g.handle_sent(1, false, t0 + 2 * MS);
        assert_eq!(g.served(1), 0);
        assert_eq!(g.handle_request(Q, 1, 0, t0 + 2 * MS), Decision::First);
        assert_eq!(g.in_flight(), 2);
        // A report of a copy the gate never let through frees nothing.
        g.handle_sent(5, true, t0 + 3 * MS);
        assert_eq!(g.in_flight(), 2);
        assert_eq!(g.handle_request(P, 6, 0, t0 + 3 * MS), Decision::Saturated);
    }

    #[test]
    fn the_waiting_list_is_bounded() {
        let t0 = Instant::now();
        let pieces = 4u32;
        let mut g = SeedGate::new(pieces);
        for i in 0..pieces {
            assert_eq!(g.handle_request(P, i, 0, t0), Decision::First);
            g.handle_sent(i, true, t0);
        }
        let mut refused = 0usize;
        let mut n = 0u64;
        while refused < MAX_WAITING {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_le_bytes());
            n += 1;
            if !g.handle_request(NodeId(id), (n % 4) as u32, 3, t0).serves() {
                refused += 1;
            }
        }
        assert_eq!(g.waiting.len(), MAX_WAITING);
        // Full of fresh pairs: a new requester is served rather than remembered.
        assert_eq!(g.handle_request(Q, 1, 3, t0), Decision::Overflow);
        assert_eq!(g.waiting.len(), MAX_WAITING);
        // Once those pairs are stale they are forgotten to make room.
        assert_eq!(
            g.handle_request(Q, 2, 3, t0 + 3 * STARVATION),
            Decision::Busy
        );
        assert_eq!(g.waiting.len(), 1);
    }
}
