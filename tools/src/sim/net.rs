//! The simulator's bandwidth model: each piece transfer is a flow over up to three shared
//! resources — the sender's upload, the receiver's download and, between datacenters, the WAN
//! link — and each resource's capacity is split equally among the flows crossing it. A flow
//! runs at the smallest of its shares (times a goodput factor for headers and loss).
//!
//! Rates are recomputed when a flow starts or ends, for the flows that share a resource with
//! it, and only those whose rate changed get a new finish time. This is not max-min fair (a
//! flow held back elsewhere leaves its share of a resource unused), which is how equal-share
//! models err: on the pessimistic side, and only when one host's download is the bottleneck.
//!
//! Times are nanoseconds of virtual time; the caller owns the event queue and schedules the
//! [`Update`]s this returns. Not for: latency, loss events, congestion control.

/// A resource's index.
pub type ResId = u32;
/// A flow's index (reused once the flow ended).
pub type FlowId = u32;

/// Most resources one flow crosses.
const MAX_RES: usize = 3;
/// Rates closer than this (relative) count as unchanged: no new finish time.
const RATE_EPSILON: f64 = 1e-9;
/// A resource's flows keep their rates until its flow count moved this much (relative) from
/// the count they were computed for; a new flow always gets the current share. With hundreds
/// of flows on the seed's upload, refreshing every one on every start and end made the model
/// quadratic; this way a refresh costs O(1/tolerance) per event, and every rate stays within
/// 2 % of its equal share (exact below 50 flows).
const COUNT_TOLERANCE: f64 = 0.02;

/// What an event for a flow finds, see [`Net::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// A newer event replaced it.
    Stale,
    /// The flow slowed down since: it ends later, at this update (scheduled again).
    Later(Update),
    /// The flow's last byte left: end it with [`Net::end`].
    Finished,
}

/// Bytes left that count as none (rounding of rates and nanoseconds).
const DONE_BYTES: f64 = 1e-3;

/// A flow whose finish time changed: the caller schedules it (older versions are stale).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Update {
    /// The flow.
    pub flow: FlowId,
    /// Its version: an event carrying an older one is stale.
    pub version: u32,
    /// When its last byte leaves, in ns.
    pub at: u64,
}

/// All resources and flows.
#[derive(Debug, Default)]
pub struct Net {
    res: Vec<Resource>,
    flows: Vec<Flow>,
    free: Vec<FlowId>,
}

#[derive(Debug)]
struct Resource {
    /// Bytes per second.
    cap: f64,
    flows: Vec<FlowId>,
    /// The flow count the current rates were computed for.
    n_ref: usize,
}

#[derive(Debug, Default)]
struct Flow {
    res: [ResId; MAX_RES],
    /// Position of this flow in each resource's list.
    pos: [u32; MAX_RES],
    nres: u8,
    factor: f64,
    size: f64,
    remaining: f64,
    /// Bytes per second.
    rate: f64,
    /// When `remaining` was last brought up to date.
    last: u64,
    /// When its current event fires (at or before it finishes).
    sched_at: u64,
    version: u32,
    live: bool,
    tag: u64,
}

impl Net {
    /// An empty network.
    pub fn new() -> Self {
        Self::default()
    }

    /// A resource of `cap` bytes per second.
    pub fn add_resource(&mut self, cap: f64) -> ResId {
        self.res.push(Resource {
            cap,
            flows: Vec::new(),
            n_ref: 0,
        });
        (self.res.len() - 1) as ResId
    }

    /// Starts a flow of `bytes` over `res` (at most three), at `factor` of its share; `tag`
    /// is the caller's. Finish times that changed (this flow's among them) go to `out`.
    pub fn start(
        &mut self,
        now: u64,
        res: &[ResId],
        factor: f64,
        bytes: u64,
        tag: u64,
        out: &mut Vec<Update>,
    ) -> FlowId {
        assert!(!res.is_empty() && res.len() <= MAX_RES, "1..=3 resources");
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                self.flows.push(Flow::default());
                (self.flows.len() - 1) as FlowId
            }
        };
        let mut f = Flow {
            nres: res.len() as u8,
            factor,
            size: bytes as f64,
            remaining: bytes as f64,
            rate: 0.0,
            last: now,
            version: self.flows[id as usize].version.wrapping_add(1),
            live: true,
            tag,
            ..Flow::default()
        };
        for (k, &r) in res.iter().enumerate() {
            f.res[k] = r;
            let list = &mut self.res[r as usize].flows;
            f.pos[k] = list.len() as u32;
            list.push(id);
        }
        self.flows[id as usize] = f;
        self.refresh(id, now, out);
        for &r in res {
            self.maybe_refresh_resource(r, now, out);
        }
        id
    }

    /// What the event for `flow` at `version` means now. A flow that slowed down keeps its
    /// earlier event rather than getting a new one each time (most rate changes are slowdowns
    /// as flows start); the event then finds it unfinished and moves it on.
    pub fn check(&mut self, now: u64, flow: FlowId, version: u32) -> Check {
        let Some(f) = self.flows.get(flow as usize) else {
            return Check::Stale;
        };
        if !f.live || f.version != version {
            return Check::Stale;
        }
        self.advance(flow, now);
        let f = &mut self.flows[flow as usize];
        if f.remaining <= DONE_BYTES {
            return Check::Finished;
        }
        let at = finish_at(now, f.remaining, f.rate);
        f.sched_at = at;
        Check::Later(Update { flow, version, at })
    }

    /// The caller's tag of a live flow.
    pub fn tag(&self, flow: FlowId) -> u64 {
        self.flows[flow as usize].tag
    }

    /// Ends `flow` (finished or abandoned) at `now`; returns the bytes it had sent. Its
    /// neighbours' new finish times go to `out`.
    pub fn end(&mut self, now: u64, flow: FlowId, out: &mut Vec<Update>) -> u64 {
        self.advance(flow, now);
        let f = &mut self.flows[flow as usize];
        debug_assert!(f.live, "ending a dead flow");
        f.live = false;
        f.version = f.version.wrapping_add(1);
        let sent = (f.size - f.remaining.max(0.0)).round().max(0.0) as u64;
        let (res, pos, n) = (f.res, f.pos, f.nres as usize);
        for k in 0..n {
            let list = &mut self.res[res[k] as usize].flows;
            let at = pos[k] as usize;
            list.swap_remove(at);
            if let Some(&moved) = list.get(at) {
                let m = &mut self.flows[moved as usize];
                let slot = (0..m.nres as usize)
                    .find(|&j| m.res[j] == res[k])
                    .expect("a flow in a resource's list crosses it");
                m.pos[slot] = at as u32;
            }
        }
        self.free.push(flow);
        for &r in &res[..n] {
            self.maybe_refresh_resource(r, now, out);
        }
        sent
    }

    /// Flows crossing `res`, as their tags.
    pub fn tags_on(&self, res: ResId) -> Vec<u64> {
        self.res[res as usize]
            .flows
            .iter()
            .map(|&f| self.flows[f as usize].tag)
            .collect()
    }

    /// Bytes the flows crossing `res` have moved so far (they are not done yet).
    pub fn in_flight_bytes(&self, res: ResId, now: u64) -> f64 {
        self.res[res as usize]
            .flows
            .iter()
            .map(|&id| {
                let f = &self.flows[id as usize];
                let left = f.remaining - f.rate * now.saturating_sub(f.last) as f64 * 1e-9;
                (f.size - left.max(0.0)).max(0.0)
            })
            .sum()
    }

    /// Flows crossing `res` right now.
    pub fn load(&self, res: ResId) -> usize {
        self.res[res as usize].flows.len()
    }

    /// Refreshes the flows of `r` when its count moved past [`COUNT_TOLERANCE`].
    fn maybe_refresh_resource(&mut self, r: ResId, now: u64, out: &mut Vec<Update>) {
        let res = &self.res[r as usize];
        let (n, n_ref) = (res.flows.len() as f64, res.n_ref as f64);
        if (n - n_ref).abs() <= COUNT_TOLERANCE * n_ref {
            return;
        }
        self.res[r as usize].n_ref = res.flows.len();
        self.refresh_resource(r, now, out);
    }

    fn refresh_resource(&mut self, r: ResId, now: u64, out: &mut Vec<Update>) {
        // Index loop: `refresh` needs the whole table, and the list does not change here.
        for k in 0..self.res[r as usize].flows.len() {
            let id = self.res[r as usize].flows[k];
            self.refresh(id, now, out);
        }
    }

    fn refresh(&mut self, id: FlowId, now: u64, out: &mut Vec<Update>) {
        let rate = self.rate_of(id);
        let f = &self.flows[id as usize];
        if f.rate > 0.0 && ((rate - f.rate).abs() <= RATE_EPSILON * f.rate) {
            return;
        }
        self.advance(id, now);
        let f = &mut self.flows[id as usize];
        let fresh = f.rate == 0.0;
        f.rate = rate;
        let at = finish_at(now, f.remaining, rate);
        if !fresh && at >= f.sched_at {
            return; // the event already queued comes first and will move it on
        }
        f.version = f.version.wrapping_add(1);
        f.sched_at = at;
        out.push(Update {
            flow: id,
            version: f.version,
            at,
        });
    }

    fn rate_of(&self, id: FlowId) -> f64 {
        let f = &self.flows[id as usize];
        let share = f.res[..f.nres as usize]
            .iter()
            .map(|&r| {
                let res = &self.res[r as usize];
                res.cap / res.flows.len().max(1) as f64
            })
            .fold(f64::INFINITY, f64::min);
        share * f.factor
    }

    fn advance(&mut self, id: FlowId, now: u64) {
        let f = &mut self.flows[id as usize];
        if now > f.last {
            f.remaining -= f.rate * (now - f.last) as f64 * 1e-9;
            f.last = now;
        }
    }
}

/// When `remaining` bytes at `rate` are through, from `now`.
fn finish_at(now: u64, remaining: f64, rate: f64) -> u64 {
    if rate <= 0.0 {
        u64::MAX
    } else {
        now.saturating_add((remaining.max(0.0) / rate * 1e9).ceil() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn two_flows_share_an_upload_then_the_survivor_speeds_up() {
        let mut net = Net::new();
        let up = net.add_resource(100.0);
        let (d1, d2) = (net.add_resource(1000.0), net.add_resource(1000.0));
        let mut out = Vec::new();
        let a = net.start(0, &[up, d1], 1.0, 100, 1, &mut out);
        let first = *out.last().unwrap();
        assert_eq!(first.at, S);
        out.clear();
        let b = net.start(0, &[up, d2], 1.0, 200, 2, &mut out);
        // Both at 50/s now: b would end at 4 s. a slowed down, so it keeps its event at 1 s,
        // which then finds it half done and moves it to 2 s.
        assert_eq!(
            out,
            vec![Update {
                flow: b,
                version: out[0].version,
                at: 4 * S
            }]
        );
        let later = match net.check(S, a, first.version) {
            Check::Later(u) => u,
            other => panic!("{other:?}"),
        };
        assert_eq!(later.at, 2 * S);
        assert_eq!(net.check(2 * S, a, later.version), Check::Finished);
        out.clear();
        assert_eq!(net.end(2 * S, a, &mut out), 100);
        // b has 100 left, alone at 100/s: one more second, sooner than its event.
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].flow, out[0].at), (b, 3 * S));
        assert_eq!(net.load(up), 1);
        assert_eq!(net.tags_on(up), vec![2]);
        // Abandoned half-way through that second: about half sent of what was left.
        out.clear();
        let sent = net.end(2 * S + S / 2, b, &mut out);
        assert_eq!(sent, 150);
        assert_eq!(net.load(up), 0);
        assert_eq!(
            net.check(3 * S, b, out.last().map_or(0, |u| u.version)),
            Check::Stale
        );
    }

    #[test]
    fn the_slowest_share_decides_and_stale_versions_are_told_apart() {
        let mut net = Net::new();
        let up = net.add_resource(1000.0);
        let down = net.add_resource(10.0);
        let mut out = Vec::new();
        let f = net.start(0, &[up, down], 0.5, 10, 7, &mut out);
        let u = *out.last().unwrap();
        assert_eq!(u.at, 2 * S);
        assert_eq!(net.tag(f), 7);
        assert!(matches!(net.check(S, f, u.version), Check::Later(_)));
        assert_eq!(net.check(S, f, u.version + 1), Check::Stale);
        net.end(S, f, &mut out);
        assert_eq!(net.check(2 * S, f, u.version), Check::Stale);
    }
}
