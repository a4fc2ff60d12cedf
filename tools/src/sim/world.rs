//! The discrete-event world of the simulator: hosts, the seed (a supernode that holds the
//! content), the message flow between them, and the real deciding code of d7q in the middle.
//!
//! Every peer's download of every blob is a real [`Download`]; the supernode's scheduler of
//! every blob is a real [`Swarm`] and its super-seeding gate a real [`SeedGate`]. This module
//! only plays the part of the async drivers (`engine.rs` for the downloads, `supernode.rs` and
//! `upload.rs` for the seed and the parents), with modelled latency instead of sockets and
//! [`net`](super::net) flows instead of bytes:
//!
//! - a peer joins: its `Register` reaches the seed after half an RTT; the seed joins it to the
//!   swarm (`handle_join`), sends task metadata, the digests of the pieces it stores and, once
//!   it has them all, the whole content's hash; and from then on, every
//!   [`PARENTS_INTERVAL`](d7q::supernode::PARENTS_INTERVAL), asks `poll_parents` for the peer
//!   and sends the list when its ids changed (as `watch_task` does);
//! - a `Connect` takes a QUIC handshake and a Hello round trip (2 RTT) before `ParentReady`;
//!   the subscription reaches the parent half an RTT later, which answers with its bitmap and
//!   then a `Have` for every piece it stores (as `upload::control` does);
//! - a request reaches its source after half an RTT; the seed asks its gate first (every
//!   simulated peer uploads, so every one is gated); the bytes flow, the last one arrives half
//!   an RTT after it left; a piece from a lying parent fails verification;
//! - a verified piece is announced to the seed (`Swarm::handle_have`) and to every subscribed
//!   child (`Download::handle_have`);
//! - a done download lingers as a parent (as daemons do) and stops its own requests; a host
//!   that leaves closes its connections (noticed after half an RTT), one that dies goes silent
//!   (noticed after the QUIC idle timeout).
//!
//! Time is a virtual nanosecond count added to one `Instant` captured at the start; only the
//! optional progress line reads the clock, and it never reaches the result. Every choice the
//! world makes itself comes from the seeded [`Rng`] (which peers are late, slow or lying; who
//! hears a broadcast first, as jitter would decide), and everything else is iterated in a fixed
//! order, so a seed names one run exactly.
//!
//! Where the drivers leave something out, so does this: nothing calls
//! `Swarm::handle_transfer`, `set_upload_slots` or `poll_reschedule` (neither `supernode.rs`
//! nor `engine.rs` does). [`Knobs`] set the machines' public configuration; the one what-if
//! that is not the product's (bounded seed upload slots) says so.
//!
//! Not for: modelling CPU, disks, congestion control or the client-side streaming reader.

use std::cmp::Ordering;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use d7q::sched::download::{Action, Delivery, Download, DownloadConfig, PieceFailure};
use d7q::sched::parents::{Swarm, SwarmConfig};
use d7q::sched::picker::SourceId;
use d7q::sched::seed::{Decision, SeedGate, SEED_SLOTS};
use d7q::sched::UPLOAD_SLOTS;
use d7q::task::Geometry;
use d7q_wire::{BadPeerReason, Bitmap, Labels, NodeId, PeerInfo, PieceStatus, Sha256};
use serde::Serialize;

use super::net::{Check, FlowId, Net, ResId, Update};
use super::rng::Rng;

/// The seed's host index.
const SEED_HOST: u32 = 0;
/// No host (a source id the download never named).
const NO_HOST: u32 = u32::MAX;
/// Flow tags with this bit are the seed's origin ingest (task << 32 | piece), the rest requests.
const INGEST_TAG: u64 = 1 << 63;
/// Samples of the time series per run (about).
const SAMPLES: u64 = 200;

/// What the world simulates.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SimConfig {
    /// Peers (the seed not counted).
    pub peers: usize,
    /// Each blob's length; one for a file, several for an image (fetched concurrently).
    pub blobs: Vec<u64>,
    /// Piece size instead of the mesh's own choice (`Geometry::for_length`).
    pub piece_size: Option<u32>,
    /// Datacenters; peers are dealt round-robin, the seed sits in the first.
    pub dcs: usize,
    /// Who joins, leaves or misbehaves.
    pub scenario: Scenario,
    /// Seed of every random choice.
    pub seed: u64,
    /// The seed's upload, bytes/s.
    pub seed_up: f64,
    /// The seed's download (its origin ingest goes through it), bytes/s.
    pub seed_down: f64,
    /// The origin's upload toward the seed, bytes/s; 0: the seed holds everything at t = 0.
    pub origin_up: f64,
    /// Each peer's upload, bytes/s.
    pub peer_up: f64,
    /// Each peer's download, bytes/s.
    pub peer_down: f64,
    /// Round trip inside a datacenter.
    pub rtt: Duration,
    /// Round trip between datacenters.
    pub wan_rtt: Duration,
    /// Each directed link between two datacenters, bytes/s.
    pub wan_rate: f64,
    /// Random loss, as a rate penalty: flows run at `1 - loss` of their share.
    pub loss: f64,
    /// Payload share of a link's rate (headers: about 0.95 for QUIC in Ethernet frames).
    pub goodput: f64,
    /// How often the supernode reconsiders a peer's parents.
    pub parents_interval: Duration,
    /// How long after a death others notice (the QUIC idle timeout).
    pub idle_timeout: Duration,
    /// Virtual time after which the run stops, finished or not.
    pub time_limit: Duration,
    /// Reference time for the scenario's schedule (late joins, departures), usually the
    /// Kumar–Ross bound.
    pub schedule_ref: Duration,
    /// Settings of the real machines other than their defaults.
    pub knobs: Knobs,
}

/// Overrides of the machines' own configuration (`DownloadConfig`, `SwarmConfig`); `None`
/// keeps the default the product ships with. These are the machines' public settings, so a
/// change can be tried here before it is made in `src/`.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Knobs {
    /// `DownloadConfig::seed_in_flight`.
    pub seed_in_flight: Option<usize>,
    /// `DownloadConfig::peer_in_flight`.
    pub peer_in_flight: Option<usize>,
    /// `DownloadConfig::in_flight`.
    pub in_flight: Option<usize>,
    /// `DownloadConfig::max_parents`.
    pub max_parents: Option<usize>,
    /// `DownloadConfig::piece_timeout`.
    pub piece_timeout: Option<Duration>,
    /// `DownloadConfig::saturated_pause`.
    pub saturated_pause: Option<(Duration, Duration)>,
    /// `SwarmConfig::max_parents`.
    pub swarm_parents: Option<usize>,
    /// `SwarmConfig::max_children_per_parent`.
    pub swarm_children: Option<usize>,
    /// The seed gate's upload slots (`SeedGate::with_slots`; default `SEED_SLOTS`).
    pub seed_slots: Option<u32>,
    /// A daemon's piece uploads at once (default `d7q::sched::UPLOAD_SLOTS`, as `upload.rs`).
    pub upload_slots: Option<usize>,
}

impl Knobs {
    fn download(&self, node: NodeId, picker_seed: u64) -> DownloadConfig {
        // Every simulated peer uploads, as a daemon does.
        let d = DownloadConfig::uploader(node, picker_seed);
        DownloadConfig {
            seed_in_flight: self.seed_in_flight.unwrap_or(d.seed_in_flight),
            peer_in_flight: self.peer_in_flight.unwrap_or(d.peer_in_flight),
            in_flight: self.in_flight.unwrap_or(d.in_flight),
            max_parents: self.max_parents.unwrap_or(d.max_parents),
            piece_timeout: self.piece_timeout.unwrap_or(d.piece_timeout),
            saturated_pause: self.saturated_pause.unwrap_or(d.saturated_pause),
            ..d
        }
    }

    fn swarm(&self, seed: u64) -> SwarmConfig {
        let d = SwarmConfig::default();
        SwarmConfig {
            max_parents: self.swarm_parents.unwrap_or(d.max_parents),
            max_children_per_parent: self.swarm_children.unwrap_or(d.max_children_per_parent),
            seed,
            ..d
        }
    }
}

/// Who joins, leaves or misbehaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Scenario {
    /// Everyone joins at t = 0 and stays.
    Steady,
    /// 30 % of the peers join at uniform times over the first reference time.
    LateJoin,
    /// 10 % join late, 10 % leave (close their connections) and 5 % die (go silent), at
    /// uniform times between 0.1 and 1.0 reference times.
    Churn,
    /// 5 % of the peers (at least one) upload at a tenth of the rate.
    SlowParent,
    /// 2 % of the peers (at least one) serve corrupt pieces.
    Liar,
}

/// What a host is like.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Uploads at the configured rate, serves good pieces.
    Normal,
    /// Uploads at a tenth of the rate.
    Slow,
    /// Serves pieces that fail verification.
    Liar,
}

/// How a host's run ended.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fate {
    /// Every blob verified; seconds from its join.
    Done(f64),
    /// A download failed.
    Failed,
    /// It left before finishing.
    Left,
    /// It died before finishing.
    Died,
    /// Still running when the time limit came.
    Unfinished,
}

/// Counts of everything that happened, for the report.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Counters {
    /// Events processed.
    pub events: u64,
    /// Of those, stale ones: a flow's finish time that changed since, a timer re-armed since.
    pub stale_events: u64,
    pub stale_timers: u64,
    /// The longest the event queue got.
    pub max_queue: u64,
    /// Decisions of the real machines: actions out of `Download::poll_action`, parent lists
    /// out of `Swarm::poll_parents`, and seed-gate decisions.
    pub decisions: u64,
    /// Calls into the machines (`handle_*` of downloads, swarms and gates).
    pub machine_calls: u64,
    /// `Download::poll_action` actions by kind.
    pub connects: u64,
    pub requests_to_seed: u64,
    pub requests_to_peers: u64,
    pub cancels: u64,
    pub timeouts: u64,
    pub reports: u64,
    pub parents_dropped: u64,
    pub downloads_done: u64,
    pub downloads_failed: u64,
    /// `Swarm::poll_parents` calls, and the lists that differed from the last one sent.
    pub poll_parents: u64,
    pub parent_lists_sent: u64,
    /// Parents a list named, summed over the lists sent.
    pub parents_named: u64,
    /// `Have`s delivered to children.
    pub haves_to_children: u64,
    /// Seed gate decisions by kind.
    pub gate_first: u64,
    pub gate_patience: u64,
    pub gate_starvation: u64,
    pub gate_overflow: u64,
    pub gate_busy: u64,
    /// Bytes the seed let through, by the gate's reason.
    pub seed_bytes_first: u64,
    pub seed_bytes_patience: u64,
    pub seed_bytes_starvation: u64,
    pub seed_bytes_overflow: u64,
    /// Seed requests for a piece that peers of the swarm held (availability > 0) when asked.
    pub seed_requests_held_elsewhere: u64,
    /// Bytes that left the seed and the peers (aborted transfers' partial bytes included).
    pub seed_sent_bytes: u64,
    pub peer_sent_bytes: u64,
    /// Bytes that left the origin toward the seed.
    pub origin_sent_bytes: u64,
    /// Verified new bytes, by source.
    pub from_seed_bytes: u64,
    pub from_peers_bytes: u64,
    /// Whole pieces that arrived as a second copy (`Delivery::Duplicate`).
    pub duplicate_bytes: u64,
    /// Whole pieces that arrived for a request already cancelled or given up.
    pub late_bytes: u64,
    /// Pieces that failed verification.
    pub corrupt_bytes: u64,
    /// Refusals: "not available" from parents.
    pub refused_not_available: u64,
    /// Seed requests the gate refused because its upload slots were full.
    pub gate_saturated: u64,
    /// Refusals: "saturated" from parents whose upload slots were full.
    pub refused_saturated: u64,
    /// The most children subscribed to one host for one blob at once.
    pub max_children: u64,
    /// Why downloads failed (digits shown as `#`), and how often.
    pub failures: BTreeMap<String, u64>,
    /// When the first download failed, seconds.
    pub first_failure_s: Option<f64>,
    /// When the first piece was verified anywhere, seconds.
    pub first_piece_s: Option<f64>,
}

/// One point of the time series.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Sample {
    /// Seconds.
    pub t: f64,
    /// Share of the peers whose whole download is done.
    pub done: f64,
    /// Seed upload in use since the last sample, share of its rate.
    pub seed_util: f64,
    /// Peers' upload in use since the last sample, share of the joined peers' rates.
    pub peer_util: f64,
}

/// One peer's record.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PeerRecord {
    /// Datacenter index.
    pub dc: u16,
    /// What it was.
    pub role: Role,
    /// When it joined, seconds.
    pub join_s: f64,
    /// How it ended.
    pub fate: Fate,
    /// Parents it had at the end of each download.
    pub parents: Vec<usize>,
    /// Bytes it uploaded.
    pub uploaded: u64,
}

/// The raw outcome of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub peers: Vec<PeerRecord>,
    pub counters: Counters,
    pub samples: Vec<Sample>,
    /// The piece geometry of each blob.
    pub geometry: Vec<Geometry>,
    /// Virtual seconds at the end.
    pub end_s: f64,
    /// Liars the swarms isolated (in every blob).
    pub liars_isolated: usize,
    /// Honest peers still there that a swarm isolated (in any blob): reported for timeouts or
    /// refusals by enough distinct peers.
    pub honest_isolated: usize,
}

/// Runs one simulation to its end; with `progress`, a line on stderr every tenth of the
/// reference time (the only place the wall clock is read: it never reaches the result).
pub fn simulate(cfg: &SimConfig, progress: bool) -> Outcome {
    let mut w = World::new(cfg);
    w.progress = progress.then(Instant::now);
    w.run();
    w.outcome()
}

struct World<'a> {
    cfg: &'a SimConfig,
    base: Instant,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Sched>,
    /// Copies the seed gates of all blobs let through and not yet ended (the seed's slots are
    /// shared by its tasks, as the supernode's are).
    seed_copies: u32,
    net: Net,
    hosts: Vec<Host>,
    tasks: Vec<TaskState>,
    node_map: HashMap<NodeId, u32>,
    wan: Vec<ResId>,
    origin_up: Option<ResId>,
    reqs: Vec<Req>,
    free_reqs: Vec<u32>,
    counters: Counters,
    updates: Vec<Update>,
    actions: Vec<Action>,
    targets: Vec<(u32, u32)>,
    /// Peers not yet done, failed or gone.
    active: usize,
    done_peers: usize,
    samples: Vec<Sample>,
    sample_every: u64,
    last_sample: (u64, f64, f64),
    /// When the run started, if progress is shown.
    progress: Option<Instant>,
    /// Who hears a broadcast first (digests, `Have`s): on a real network jitter decides, and
    /// the first requester of a piece gets the seed's first copy.
    rng: Rng,
}

struct Host {
    node: NodeId,
    addr: SocketAddr,
    labels: Labels,
    dc: u16,
    up: ResId,
    down: ResId,
    up_rate: f64,
    role: Role,
    join_at: u64,
    departs: Option<(u64, bool)>,
    alive: bool,
    joined: bool,
    gone_at: u64,
    tasks: Vec<PeerTask>,
    tasks_left: usize,
    failed: bool,
    fate: Option<Fate>,
    uploaded: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Run {
    Waiting,
    Running,
    Done,
    Failed,
    Gone,
}

struct PeerTask {
    dl: Option<Box<Download>>,
    run: Run,
    picker_seed: u64,
    /// Source id → host.
    sources: Vec<u32>,
    /// Requests out: (source id, piece) → request.
    live: BTreeMap<(u32, u32), u32>,
    /// Pieces this host stores (and serves).
    stored: Bitmap,
    /// Children subscribed to this host for this blob.
    subs: Vec<Sub>,
    timer_at: Option<u64>,
    /// The supernode's side: whether the peer is in the swarm, and the last list sent.
    in_swarm: bool,
    last_parents: Vec<NodeId>,
    parents_at_end: usize,
}

#[derive(Clone, Copy)]
struct Sub {
    child: u32,
    src: u32,
    dc: u16,
    at: u64,
}

struct TaskState {
    geo: Geometry,
    digests: Vec<Sha256>,
    sha: Sha256,
    swarm: Swarm,
    gate: SeedGate,
    /// Pieces the seed stores: always a prefix (the origin is read in order).
    seed_stored: u32,
    ingest_started: bool,
    /// Registered peers by datacenter, with the time of registration.
    registered: Vec<Vec<(u32, u64)>>,
}

struct Req {
    child: u32,
    task: u16,
    src: u32,
    src_host: u32,
    piece: u32,
    len: u32,
    flow: Option<FlowId>,
    gate: Option<Decision>,
    cancelled: bool,
    refs: u16,
}

enum Ev {
    Join(u32),
    Depart(u32),
    SeedRegister {
        host: u32,
        task: u16,
    },
    Meta {
        host: u32,
        task: u16,
        upto: u32,
        complete: bool,
    },
    Digests {
        task: u16,
        first: u32,
        complete: bool,
        dc: u16,
        sent: u64,
    },
    ParentsTick {
        host: u32,
        task: u16,
    },
    ParentsArrive {
        host: u32,
        task: u16,
        list: Box<[PeerInfo]>,
    },
    Timer {
        host: u32,
        task: u16,
        at: u64,
    },
    ParentReady {
        host: u32,
        task: u16,
        src: u32,
    },
    Subscribe {
        parent: u32,
        task: u16,
        child: u32,
        src: u32,
    },
    Bitmap {
        host: u32,
        task: u16,
        src: u32,
        bitmap: Box<Bitmap>,
    },
    ParentGone {
        host: u32,
        task: u16,
        src: u32,
    },
    HaveFanout {
        parent: u32,
        task: u16,
        piece: u32,
        dc: u16,
        sent: u64,
    },
    SeedHave {
        host: u32,
        task: u16,
        piece: u32,
    },
    SeedLeave {
        host: u32,
        task: u16,
    },
    Report {
        reporter: u32,
        task: u16,
        suspect: NodeId,
        reason: BadPeerReason,
    },
    SeedRequest(u32),
    PeerRequest(u32),
    Refused {
        req: u32,
        status: PieceStatus,
    },
    FlowDone {
        flow: FlowId,
        version: u32,
    },
    Delivered(u32),
    CancelArrive(u32),
    SeedSent(u32),
    Sample,
}

struct Sched {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Sched {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Sched {}
impl PartialOrd for Sched {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Sched {
    /// Reversed: the heap pops the earliest, first scheduled first.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

fn ns(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

fn secs(t: u64) -> f64 {
    t as f64 * 1e-9
}

impl<'a> World<'a> {
    fn new(cfg: &'a SimConfig) -> Self {
        let mut rng = Rng::new(cfg.seed);
        let mut net = Net::new();
        let dcs = cfg.dcs.max(1);
        let mut wan = Vec::with_capacity(dcs * dcs);
        for a in 0..dcs {
            for b in 0..dcs {
                wan.push(if a == b {
                    ResId::MAX
                } else {
                    net.add_resource(cfg.wan_rate)
                });
            }
        }
        let origin_up = (cfg.origin_up > 0.0).then(|| net.add_resource(cfg.origin_up));
        let geometry: Vec<Geometry> = cfg
            .blobs
            .iter()
            .map(|&len| match cfg.piece_size {
                Some(p) => Geometry::new(len, p),
                None => Geometry::for_length(len),
            })
            .map(|g| g.expect("blob size within the mesh's limits"))
            .collect();

        // Who is what: a shuffled order of the peers, cut into the scenario's groups.
        let n = cfg.peers;
        let mut order: Vec<usize> = (1..=n).collect();
        rng.shuffle(&mut order);
        let share = |f: f64| ((n as f64 * f).round() as usize).max(1).min(n);
        let reference = ns(cfg.schedule_ref);
        let mut join_at = vec![0u64; n + 1];
        let mut departs: Vec<Option<(u64, bool)>> = vec![None; n + 1];
        let mut role = vec![Role::Normal; n + 1];
        let mut cursor = 0usize;
        let mut take = |k: usize| {
            let group: Vec<usize> = order[cursor.min(n)..(cursor + k).min(n)].to_vec();
            cursor += k;
            group
        };
        match cfg.scenario {
            Scenario::Steady => {}
            Scenario::LateJoin => {
                for h in take(share(0.3)) {
                    join_at[h] = (rng.unit() * reference as f64) as u64;
                }
            }
            Scenario::Churn => {
                for h in take(share(0.1)) {
                    join_at[h] = (rng.unit() * reference as f64) as u64;
                }
                for (k, dies) in [(share(0.1), false), (share(0.05), true)] {
                    for h in take(k) {
                        let at = (0.1 + 0.9 * rng.unit()) * reference as f64;
                        departs[h] = Some((at as u64, dies));
                    }
                }
            }
            Scenario::SlowParent => take(share(0.05))
                .into_iter()
                .for_each(|h| role[h] = Role::Slow),
            Scenario::Liar => take(share(0.02))
                .into_iter()
                .for_each(|h| role[h] = Role::Liar),
        }

        let mut hosts = Vec::with_capacity(n + 1);
        let mut node_map = HashMap::with_capacity(n + 1);
        for h in 0..=n {
            let node = NodeId(rng.bytes16());
            let dc = if h == 0 { 0 } else { ((h - 1) % dcs) as u16 };
            let (up_rate, down_rate) = if h == 0 {
                (cfg.seed_up, cfg.seed_down)
            } else if role[h] == Role::Slow {
                (cfg.peer_up / 10.0, cfg.peer_down)
            } else {
                (cfg.peer_up, cfg.peer_down)
            };
            let up = net.add_resource(up_rate);
            let down = net.add_resource(down_rate);
            let ip = Ipv4Addr::from(0x0a00_0000u32 | h as u32);
            let tasks = geometry
                .iter()
                .map(|g| PeerTask {
                    dl: None,
                    run: Run::Waiting,
                    picker_seed: rng.next_u64(),
                    sources: Vec::new(),
                    live: BTreeMap::new(),
                    stored: if h == 0 {
                        Bitmap::full(g.piece_count)
                    } else {
                        Bitmap::new(g.piece_count)
                    },
                    subs: Vec::new(),
                    timer_at: None,
                    in_swarm: false,
                    last_parents: Vec::new(),
                    parents_at_end: 0,
                })
                .collect();
            node_map.insert(node, h as u32);
            hosts.push(Host {
                node,
                addr: SocketAddr::from((ip, 65002)),
                labels: Labels {
                    dc: format!("dc{dc}"),
                    zone: String::new(),
                    host: format!("h{h}"),
                },
                dc,
                up,
                down,
                up_rate,
                role: role[h],
                join_at: join_at[h],
                departs: departs[h],
                alive: true,
                joined: false,
                gone_at: 0,
                tasks,
                tasks_left: geometry.len(),
                failed: false,
                fate: None,
                uploaded: 0,
            });
        }

        let tasks = geometry
            .iter()
            .enumerate()
            .map(|(t, g)| {
                let digests: Vec<Sha256> = (0..g.piece_count)
                    .map(|i| {
                        let mut d = [0u8; 32];
                        d[..4].copy_from_slice(&i.to_le_bytes());
                        d[4] = t as u8;
                        d[31] = 0xd7;
                        d
                    })
                    .collect();
                let mut swarm = Swarm::new(g.piece_count, cfg.knobs.swarm(rng.next_u64()));
                let instant = cfg.origin_up <= 0.0;
                if instant {
                    swarm.handle_seed_have(&(0..g.piece_count).collect::<Vec<_>>());
                }
                TaskState {
                    geo: *g,
                    digests,
                    sha: [t as u8 ^ 0x5a; 32],
                    swarm,
                    gate: SeedGate::with_slots(
                        g.piece_count,
                        cfg.knobs.seed_slots.unwrap_or(SEED_SLOTS),
                    ),
                    seed_stored: if instant { g.piece_count } else { 0 },
                    ingest_started: instant,
                    registered: vec![Vec::new(); dcs],
                }
            })
            .collect();

        let sample_every = (ns(cfg.schedule_ref) / SAMPLES).max(10_000_000);
        let mut w = World {
            cfg,
            base: Instant::now(),
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            seed_copies: 0,
            net,
            hosts,
            tasks,
            node_map,
            wan,
            origin_up,
            reqs: Vec::new(),
            free_reqs: Vec::new(),
            counters: Counters::default(),
            updates: Vec::new(),
            actions: Vec::new(),
            targets: Vec::new(),
            active: n,
            done_peers: 0,
            samples: Vec::new(),
            sample_every,
            last_sample: (0, 0.0, 0.0),
            progress: None,
            rng: Rng::new(cfg.seed ^ 0x005e_ed0f_04de),
        };
        for h in 1..=n as u32 {
            let host = &w.hosts[h as usize];
            let (join, departs) = (host.join_at, host.departs);
            w.at(join, Ev::Join(h));
            if let Some((at, _)) = departs {
                w.at(at.max(join), Ev::Depart(h));
            }
        }
        w.at(0, Ev::Sample);
        w
    }

    fn run(&mut self) {
        let limit = ns(self.cfg.time_limit);
        while self.active > 0 {
            let Some(s) = self.heap.pop() else { break };
            if s.at > limit {
                self.now = limit;
                break;
            }
            self.now = s.at;
            self.counters.events += 1;
            self.counters.max_queue = self.counters.max_queue.max(self.heap.len() as u64 + 1);
            self.handle(s.ev);
        }
        self.sample();
    }

    fn outcome(mut self) -> Outcome {
        let (mut liars_isolated, mut honest_isolated) = (0, 0);
        for h in 1..self.hosts.len() {
            let node = self.hosts[h].node;
            if self.hosts[h].role == Role::Liar {
                if self.tasks.iter().all(|t| t.swarm.is_isolated(node)) {
                    liars_isolated += 1;
                }
            } else if self.hosts[h].alive && self.tasks.iter().any(|t| t.swarm.is_isolated(node)) {
                honest_isolated += 1;
            }
        }
        let peers = self.hosts[1..]
            .iter_mut()
            .map(|h| PeerRecord {
                dc: h.dc,
                role: h.role,
                join_s: secs(h.join_at),
                fate: h.fate.unwrap_or(Fate::Unfinished),
                parents: h.tasks.iter().map(|t| t.parents_at_end).collect(),
                uploaded: h.uploaded,
            })
            .collect();
        Outcome {
            peers,
            counters: std::mem::take(&mut self.counters),
            samples: std::mem::take(&mut self.samples),
            geometry: self.tasks.iter().map(|t| t.geo).collect(),
            end_s: secs(self.now),
            liars_isolated,
            honest_isolated,
        }
    }

    // ---- plumbing ----

    fn at(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Sched {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn after(&mut self, delay: u64, ev: Ev) {
        self.at(self.now.saturating_add(delay), ev);
    }

    fn instant(&self) -> Instant {
        self.base + Duration::from_nanos(self.now)
    }

    /// One-way latency between two hosts.
    fn lat(&self, a: u32, b: u32) -> u64 {
        self.lat_dc(self.hosts[a as usize].dc, self.hosts[b as usize].dc)
    }

    fn lat_dc(&self, a: u16, b: u16) -> u64 {
        if a == b {
            ns(self.cfg.rtt) / 2
        } else {
            ns(self.cfg.wan_rtt) / 2
        }
    }

    fn rtt(&self, a: u32, b: u32) -> u64 {
        2 * self.lat(a, b)
    }

    fn schedule_updates(&mut self) {
        let mut ups = std::mem::take(&mut self.updates);
        for u in ups.drain(..) {
            if u.at != u64::MAX {
                self.at(
                    u.at.max(self.now),
                    Ev::FlowDone {
                        flow: u.flow,
                        version: u.version,
                    },
                );
            }
        }
        self.updates = ups;
    }

    fn new_req(&mut self, r: Req) -> u32 {
        match self.free_reqs.pop() {
            Some(id) => {
                self.reqs[id as usize] = r;
                id
            }
            None => {
                self.reqs.push(r);
                (self.reqs.len() - 1) as u32
            }
        }
    }

    /// An event or a flow now refers to `rid`.
    fn hold(&mut self, rid: u32) {
        self.reqs[rid as usize].refs += 1;
    }

    /// One reference to `rid` is done with; the last frees it.
    /// Tells blob `t`'s seed gate how a copy ended, and the seed's count of copies on their
    /// way what the gate counted (a copy ended twice counts once, as in the gate).
    fn seed_sent(&mut self, t: u16, piece: u32, delivered: bool, now: Instant) {
        let gate = &mut self.tasks[t as usize].gate;
        let before = gate.in_flight();
        gate.handle_sent(piece, delivered, now);
        self.seed_copies -= before - gate.in_flight();
    }

    fn release(&mut self, rid: u32) {
        let r = &mut self.reqs[rid as usize];
        r.refs -= 1;
        if r.refs == 0 {
            self.free_reqs.push(rid);
        }
    }

    fn after_req(&mut self, delay: u64, rid: u32, ev: Ev) {
        self.hold(rid);
        self.after(delay, ev);
    }

    fn task_mut(&mut self, h: u32, t: u16) -> &mut PeerTask {
        &mut self.hosts[h as usize].tasks[t as usize]
    }

    // ---- events ----

    fn handle(&mut self, ev: Ev) {
        match ev {
            Ev::Join(h) => self.join(h),
            Ev::Depart(h) => {
                let dies = self.hosts[h as usize].departs.is_some_and(|d| d.1);
                self.host_gone(h, dies);
            }
            Ev::SeedRegister { host, task } => self.seed_register(host, task),
            Ev::Meta {
                host,
                task,
                upto,
                complete,
            } => self.meta(host, task, upto, complete),
            Ev::Digests {
                task,
                first,
                complete,
                dc,
                sent,
            } => self.digests(task, first, complete, dc, sent),
            Ev::ParentsTick { host, task } => self.parents_tick(host, task),
            Ev::ParentsArrive { host, task, list } => {
                self.feed(host, task, |dl| dl.handle_parents(&list));
            }
            Ev::Timer { host, task, at } => {
                let now = self.instant();
                let pt = self.task_mut(host, task);
                if pt.timer_at != Some(at) {
                    self.counters.stale_events += 1;
                    self.counters.stale_timers += 1;
                    return;
                }
                pt.timer_at = None;
                self.feed(host, task, |dl| dl.handle_timeout(now));
            }
            Ev::ParentReady { host, task, src } => {
                self.feed(host, task, |dl| dl.handle_parent_ready(SourceId(src)));
            }
            Ev::Subscribe {
                parent,
                task,
                child,
                src,
            } => self.subscribe(parent, task, child, src),
            Ev::Bitmap {
                host,
                task,
                src,
                bitmap,
            } => {
                self.feed(host, task, |dl| dl.handle_bitmap(SourceId(src), &bitmap));
            }
            Ev::ParentGone { host, task, src } => {
                self.feed(host, task, |dl| dl.handle_parent_gone(SourceId(src)));
            }
            Ev::HaveFanout {
                parent,
                task,
                piece,
                dc,
                sent,
            } => self.have_fanout(parent, task, piece, dc, sent),
            Ev::SeedHave { host, task, piece } => {
                let node = self.hosts[host as usize].node;
                if self.hosts[host as usize].tasks[task as usize].in_swarm {
                    self.tasks[task as usize].swarm.handle_have(node, &[piece]);
                    self.counters.machine_calls += 1;
                }
            }
            Ev::SeedLeave { host, task } => {
                let node = self.hosts[host as usize].node;
                let pt = self.task_mut(host, task);
                if pt.in_swarm {
                    pt.in_swarm = false;
                    self.tasks[task as usize].swarm.handle_leave(node);
                    self.counters.machine_calls += 1;
                }
            }
            Ev::Report {
                reporter,
                task,
                suspect,
                reason,
            } => {
                let now = self.instant();
                let node = self.hosts[reporter as usize].node;
                self.tasks[task as usize]
                    .swarm
                    .handle_report(node, suspect, reason, now);
                self.counters.machine_calls += 1;
            }
            Ev::SeedRequest(rid) => self.seed_request(rid),
            Ev::PeerRequest(rid) => self.peer_request(rid),
            Ev::Refused { req, status } => self.refused(req, status),
            Ev::FlowDone { flow, version } => self.flow_done(flow, version),
            Ev::Delivered(rid) => self.delivered(rid),
            Ev::CancelArrive(rid) => self.cancel_arrive(rid),
            Ev::SeedSent(rid) => {
                let now = self.instant();
                let r = &self.reqs[rid as usize];
                let (task, piece, delivered) = (r.task, r.piece, !r.cancelled);
                self.seed_sent(task, piece, delivered, now);
                self.counters.machine_calls += 1;
                self.release(rid);
            }
            Ev::Sample => {
                self.sample();
                if let Some(started) = self.progress {
                    if self.samples.len() % (SAMPLES as usize / 10) == 1 {
                        eprintln!(
                            "  t {:7.1} s: {:5.1} % done, {} active, {:.1} M events, {:.1} M decisions, wall {:.0} s",
                            secs(self.now),
                            100.0 * self.done_peers as f64 / self.cfg.peers.max(1) as f64,
                            self.active,
                            self.counters.events as f64 * 1e-6,
                            self.counters.decisions as f64 * 1e-6,
                            started.elapsed().as_secs_f64()
                        );
                    }
                }
                let every = self.sample_every;
                self.after(every, Ev::Sample);
            }
        }
    }

    fn join(&mut self, h: u32) {
        let host = &mut self.hosts[h as usize];
        if !host.alive {
            return;
        }
        host.joined = true;
        let lat = self.lat(h, SEED_HOST);
        for t in 0..self.tasks.len() as u16 {
            self.after(lat, Ev::SeedRegister { host: h, task: t });
        }
    }

    /// The seed's side of a registration: join the swarm, start the ingest on the first one,
    /// send what is known, and start the parents cadence (its first tick is immediate).
    fn seed_register(&mut self, h: u32, t: u16) {
        if !self.hosts[h as usize].alive {
            return;
        }
        let now = self.instant();
        let host = &self.hosts[h as usize];
        let (node, addr, labels, dc) = (host.node, host.addr, host.labels.clone(), host.dc);
        let ts = &mut self.tasks[t as usize];
        ts.swarm.handle_join(node, Some(addr), labels, now);
        self.counters.machine_calls += 1;
        ts.registered[dc as usize].push((h, self.now));
        let (upto, complete) = (ts.seed_stored, ts.seed_stored == ts.geo.piece_count);
        if !ts.ingest_started {
            ts.ingest_started = true;
            self.ingest_next(t);
        }
        self.task_mut(h, t).in_swarm = true;
        let lat = self.lat(SEED_HOST, h);
        self.after(
            lat,
            Ev::Meta {
                host: h,
                task: t,
                upto,
                complete,
            },
        );
        self.after(0, Ev::ParentsTick { host: h, task: t });
    }

    /// Task metadata, the digests of the first `upto` pieces and maybe the whole's hash reach
    /// the peer: its download starts.
    fn meta(&mut self, h: u32, t: u16, upto: u32, complete: bool) {
        if !self.hosts[h as usize].alive {
            return;
        }
        let ts = &self.tasks[t as usize];
        let g = ts.geo;
        let node = self.hosts[h as usize].node;
        let pt = &mut self.hosts[h as usize].tasks[t as usize];
        let mut dl = Download::new(
            g.length,
            g.piece_size,
            g.piece_count,
            HashMap::new(),
            self.cfg.knobs.download(node, pt.picker_seed),
        );
        if upto > 0 {
            dl.handle_digests(0, &ts.digests[..upto as usize])
                .expect("consistent digests");
        }
        if complete {
            dl.handle_complete(ts.sha).expect("one hash");
        }
        pt.dl = Some(Box::new(dl));
        pt.run = Run::Running;
        self.counters.machine_calls += 2;
        self.pump(h, t);
    }

    /// Digests of piece `first` (and maybe the whole's hash) reach the peers of `dc` that
    /// registered before they were sent.
    fn digests(&mut self, t: u16, first: u32, complete: bool, dc: u16, sent: u64) {
        let mut list: Vec<u32> = self.tasks[t as usize].registered[dc as usize]
            .iter()
            .filter(|&&(_, at)| at <= sent)
            .map(|&(h, _)| h)
            .collect();
        self.rng.shuffle(&mut list);
        for h in list {
            let ts = &self.tasks[t as usize];
            let pt = &mut self.hosts[h as usize].tasks[t as usize];
            let Some(dl) = pt.dl.as_mut() else { continue };
            dl.handle_digests(first, &ts.digests[first as usize..first as usize + 1])
                .expect("consistent digests");
            if complete {
                dl.handle_complete(ts.sha).expect("one hash");
            }
            self.counters.machine_calls += 1;
            self.pump(h, t);
        }
    }

    fn parents_tick(&mut self, h: u32, t: u16) {
        if !self.hosts[h as usize].tasks[t as usize].in_swarm {
            return;
        }
        let now = self.instant();
        let node = self.hosts[h as usize].node;
        let list = self.tasks[t as usize].swarm.poll_parents(node, now);
        self.counters.poll_parents += 1;
        self.counters.decisions += 1;
        let pt = &mut self.hosts[h as usize].tasks[t as usize];
        let finished = !matches!(pt.run, Run::Waiting | Run::Running);
        let changed = list.len() != pt.last_parents.len()
            || list
                .iter()
                .zip(&pt.last_parents)
                .any(|(p, &id)| p.node_id != id);
        let empty = list.is_empty();
        if changed {
            pt.last_parents = list.iter().map(|p| p.node_id).collect();
            self.counters.parent_lists_sent += 1;
            self.counters.parents_named += list.len() as u64;
            let lat = self.lat(SEED_HOST, h);
            self.after(
                lat,
                Ev::ParentsArrive {
                    host: h,
                    task: t,
                    list: list.into_boxed_slice(),
                },
            );
        }
        // A finished download's list stays empty (the swarm hands no parents to a complete
        // peer): the remaining ticks would change nothing.
        if !(finished && empty) {
            let every = ns(self.cfg.parents_interval);
            self.after(every, Ev::ParentsTick { host: h, task: t });
        }
    }

    fn subscribe(&mut self, parent: u32, t: u16, child: u32, src: u32) {
        if !self.hosts[parent as usize].alive {
            // Nobody answers: the child's connection times out.
            let detect = self.hosts[parent as usize].gone_at + ns(self.cfg.idle_timeout);
            self.at(
                detect.max(self.now),
                Ev::ParentGone {
                    host: child,
                    task: t,
                    src,
                },
            );
            return;
        }
        if self.hosts[child as usize].tasks[t as usize].run != Run::Running {
            return;
        }
        let dc = self.hosts[child as usize].dc;
        let now = self.now;
        let pt = &mut self.hosts[parent as usize].tasks[t as usize];
        pt.subs.push(Sub {
            child,
            src,
            dc,
            at: now,
        });
        self.counters.max_children = self.counters.max_children.max(pt.subs.len() as u64);
        let bitmap = Box::new(pt.stored.clone());
        let lat = self.lat(parent, child);
        self.after(
            lat,
            Ev::Bitmap {
                host: child,
                task: t,
                src,
                bitmap,
            },
        );
    }

    fn have_fanout(&mut self, p: u32, t: u16, piece: u32, dc: u16, sent: u64) {
        let mut targets = std::mem::take(&mut self.targets);
        targets.extend(
            self.hosts[p as usize].tasks[t as usize]
                .subs
                .iter()
                .filter(|s| s.dc == dc && s.at <= sent)
                .map(|s| (s.child, s.src)),
        );
        self.rng.shuffle(&mut targets);
        for &(c, src) in &targets {
            if self.feed(c, t, |dl| dl.handle_have(SourceId(src), &[piece])) {
                self.counters.haves_to_children += 1;
            }
        }
        targets.clear();
        self.targets = targets;
    }

    fn seed_request(&mut self, rid: u32) {
        let r = &self.reqs[rid as usize];
        let (c, t, piece, len) = (r.child, r.task, r.piece, r.len);
        if !self.hosts[c as usize].alive {
            self.release(rid);
            return;
        }
        let now = self.instant();
        let node = self.hosts[c as usize].node;
        let ts = &mut self.tasks[t as usize];
        if piece >= ts.seed_stored {
            let lat = self.lat(SEED_HOST, c);
            self.after_req(
                lat,
                rid,
                Ev::Refused {
                    req: rid,
                    status: PieceStatus::NotAvailable,
                },
            );
            self.release(rid);
            return;
        }
        let ts = &mut self.tasks[t as usize];
        let holders = ts.swarm.availability(piece);
        let elsewhere = self.seed_copies - ts.gate.in_flight();
        let d = ts
            .gate
            .handle_request_among(node, piece, holders, elsewhere, now);
        if d.serves() {
            self.seed_copies += 1;
        }
        self.counters.machine_calls += 1;
        self.counters.decisions += 1;
        if holders > 0 {
            self.counters.seed_requests_held_elsewhere += 1;
        }
        let c_ = &mut self.counters;
        let len = u64::from(len);
        match d {
            Decision::First => (c_.gate_first += 1, c_.seed_bytes_first += len),
            Decision::Patience => (c_.gate_patience += 1, c_.seed_bytes_patience += len),
            Decision::Starvation => (c_.gate_starvation += 1, c_.seed_bytes_starvation += len),
            Decision::Overflow => (c_.gate_overflow += 1, c_.seed_bytes_overflow += len),
            Decision::Busy => (c_.gate_busy += 1, ()),
            Decision::Saturated => (c_.gate_saturated += 1, ()),
        };
        if !d.serves() {
            // As the supernode answers: busy for a piece held back, saturated when full.
            let status = match d {
                Decision::Saturated => PieceStatus::Saturated,
                _ => PieceStatus::Busy,
            };
            let lat = self.lat(SEED_HOST, c);
            self.after_req(lat, rid, Ev::Refused { req: rid, status });
        } else {
            self.reqs[rid as usize].gate = Some(d);
            self.start_flow(rid);
        }
        self.release(rid);
    }

    fn peer_request(&mut self, rid: u32) {
        let r = &self.reqs[rid as usize];
        let (p, c, t, piece) = (r.src_host, r.child, r.task, r.piece);
        if !self.hosts[p as usize].alive || !self.hosts[c as usize].alive {
            // The child hears of it when it notices the connection is gone.
            self.release(rid);
            return;
        }
        let slots = self.cfg.knobs.upload_slots.unwrap_or(UPLOAD_SLOTS);
        if self.net.load(self.hosts[p as usize].up) >= slots {
            // Every piece upload of the daemon is taken, all blobs together, as `upload.rs`
            // counts them.
            self.counters.refused_saturated += 1;
            let lat = self.lat(p, c);
            let status = PieceStatus::Saturated;
            self.after_req(lat, rid, Ev::Refused { req: rid, status });
        } else if !self.hosts[p as usize].tasks[t as usize].stored.test(piece) {
            self.counters.refused_not_available += 1;
            let lat = self.lat(p, c);
            self.after_req(
                lat,
                rid,
                Ev::Refused {
                    req: rid,
                    status: PieceStatus::NotAvailable,
                },
            );
        } else {
            self.start_flow(rid);
        }
        self.release(rid);
    }

    fn start_flow(&mut self, rid: u32) {
        let r = &self.reqs[rid as usize];
        let (s, c, len) = (r.src_host, r.child, r.len);
        let (src, dst) = (&self.hosts[s as usize], &self.hosts[c as usize]);
        let mut res = [src.up, dst.down, 0];
        let mut n = 2;
        if src.dc != dst.dc {
            res[2] = self.wan[src.dc as usize * self.cfg.dcs.max(1) + dst.dc as usize];
            n = 3;
        }
        let factor = self.cfg.goodput * (1.0 - self.cfg.loss);
        let mut ups = std::mem::take(&mut self.updates);
        let f = self.net.start(
            self.now,
            &res[..n],
            factor,
            u64::from(len),
            u64::from(rid),
            &mut ups,
        );
        self.updates = ups;
        self.reqs[rid as usize].flow = Some(f);
        self.hold(rid);
        self.schedule_updates();
    }

    /// Bytes that left a host, for the counters.
    fn count_sent(&mut self, s: u32, bytes: u64) {
        if s == SEED_HOST {
            self.counters.seed_sent_bytes += bytes;
        } else {
            self.counters.peer_sent_bytes += bytes;
        }
        self.hosts[s as usize].uploaded += bytes;
    }

    fn flow_done(&mut self, flow: FlowId, version: u32) {
        match self.net.check(self.now, flow, version) {
            Check::Stale => {
                self.counters.stale_events += 1;
                return;
            }
            Check::Later(u) => {
                self.counters.stale_events += 1;
                if u.at != u64::MAX {
                    self.at(u.at, Ev::FlowDone { flow, version });
                }
                return;
            }
            Check::Finished => {}
        }
        let tag = self.net.tag(flow);
        let mut ups = std::mem::take(&mut self.updates);
        let sent = self.net.end(self.now, flow, &mut ups);
        self.updates = ups;
        self.schedule_updates();
        if tag & INGEST_TAG != 0 {
            self.counters.origin_sent_bytes += sent;
            self.ingested(((tag & !INGEST_TAG) >> 32) as u16);
            return;
        }
        let rid = tag as u32;
        let r = &mut self.reqs[rid as usize];
        r.flow = None;
        let (s, c, gate) = (r.src_host, r.child, r.gate.is_some());
        self.count_sent(s, sent);
        let lat = self.lat(s, c);
        self.after_req(lat, rid, Ev::Delivered(rid));
        if gate {
            // The seed learns the copy went out whole when the stream is acknowledged.
            self.after_req(2 * lat, rid, Ev::SeedSent(rid));
        }
        self.release(rid);
    }

    fn delivered(&mut self, rid: u32) {
        let now = self.instant();
        let r = &self.reqs[rid as usize];
        let (c, t, src, s, piece, len) = (r.child, r.task, r.src, r.src_host, r.piece, r.len);
        let len = u64::from(len);
        let liar = s != SEED_HOST && self.hosts[s as usize].role == Role::Liar;
        let pt = &mut self.hosts[c as usize].tasks[t as usize];
        if pt.live.get(&(src, piece)) != Some(&rid) || pt.dl.is_none() {
            self.counters.late_bytes += len;
            self.release(rid);
            return;
        }
        pt.live.remove(&(src, piece));
        let dl = pt.dl.as_mut().expect("checked");
        let result = if liar {
            Err(PieceFailure::Corrupt)
        } else {
            Ok(())
        };
        let d = dl.handle_piece_result(SourceId(src), piece, result, now);
        self.counters.machine_calls += 1;
        match d {
            Some(Delivery::New) => {
                self.counters.first_piece_s.get_or_insert(secs(self.now));
                if s == SEED_HOST {
                    self.counters.from_seed_bytes += len;
                } else {
                    self.counters.from_peers_bytes += len;
                }
                self.store(c, t, piece);
            }
            Some(Delivery::Duplicate) => self.counters.duplicate_bytes += len,
            None if liar => self.counters.corrupt_bytes += len,
            None => self.counters.late_bytes += len,
        }
        self.release(rid);
        self.pump(c, t);
    }

    /// `h` stored `piece`: the seed and the subscribed children hear of it.
    fn store(&mut self, h: u32, t: u16, piece: u32) {
        let pt = &mut self.hosts[h as usize].tasks[t as usize];
        if !pt.stored.set(piece) {
            return;
        }
        let mut dcs: u64 = 0;
        for s in &pt.subs {
            dcs |= 1 << (s.dc % 64);
        }
        let lat = self.lat(h, SEED_HOST);
        self.after(
            lat,
            Ev::SeedHave {
                host: h,
                task: t,
                piece,
            },
        );
        let my_dc = self.hosts[h as usize].dc;
        let sent = self.now;
        while dcs != 0 {
            let dc = dcs.trailing_zeros() as u16;
            dcs &= dcs - 1;
            let lat = self.lat_dc(my_dc, dc);
            self.after(
                lat,
                Ev::HaveFanout {
                    parent: h,
                    task: t,
                    piece,
                    dc,
                    sent,
                },
            );
        }
    }

    fn refused(&mut self, rid: u32, status: PieceStatus) {
        let now = self.instant();
        let r = &self.reqs[rid as usize];
        let (c, t, src, piece) = (r.child, r.task, r.src, r.piece);
        let pt = &mut self.hosts[c as usize].tasks[t as usize];
        if pt.live.get(&(src, piece)) == Some(&rid) {
            pt.live.remove(&(src, piece));
            if let Some(dl) = pt.dl.as_mut() {
                dl.handle_piece_result(
                    SourceId(src),
                    piece,
                    Err(PieceFailure::Refused(status)),
                    now,
                );
                self.counters.machine_calls += 1;
                self.release(rid);
                self.pump(c, t);
                return;
            }
        }
        self.release(rid);
    }

    fn cancel_arrive(&mut self, rid: u32) {
        let now = self.instant();
        let r = &mut self.reqs[rid as usize];
        r.cancelled = true;
        if let Some(f) = self.reqs[rid as usize].flow.take() {
            let mut ups = std::mem::take(&mut self.updates);
            let sent = self.net.end(self.now, f, &mut ups);
            self.updates = ups;
            self.schedule_updates();
            let r = &self.reqs[rid as usize];
            let (s, t, piece, gate) = (r.src_host, r.task, r.piece, r.gate.is_some());
            self.count_sent(s, sent);
            if gate {
                self.seed_sent(t, piece, false, now);
                self.counters.machine_calls += 1;
            }
            self.release(rid); // the flow's
        }
        self.release(rid);
    }

    // ---- the origin ingest ----

    fn ingest_next(&mut self, t: u16) {
        let ts = &self.tasks[t as usize];
        let i = ts.seed_stored;
        if i >= ts.geo.piece_count {
            return;
        }
        let len = ts.geo.piece_len(i);
        let origin = self.origin_up.expect("ingest needs an origin");
        let res = [origin, self.hosts[SEED_HOST as usize].down];
        let mut ups = std::mem::take(&mut self.updates);
        self.net.start(
            self.now,
            &res,
            self.cfg.goodput,
            u64::from(len),
            INGEST_TAG | (u64::from(t) << 32) | u64::from(i),
            &mut ups,
        );
        self.updates = ups;
        self.schedule_updates();
    }

    /// The seed stored its next piece of `t`: it serves it, and tells the registered peers.
    fn ingested(&mut self, t: u16) {
        let ts = &mut self.tasks[t as usize];
        let i = ts.seed_stored;
        ts.seed_stored += 1;
        ts.swarm.handle_seed_have(&[i]);
        self.counters.machine_calls += 1;
        let complete = ts.seed_stored == ts.geo.piece_count;
        let dcs: Vec<u16> = (0..ts.registered.len() as u16)
            .filter(|&dc| !ts.registered[dc as usize].is_empty())
            .collect();
        let sent = self.now;
        for dc in dcs {
            let lat = self.lat_dc(0, dc);
            self.after(
                lat,
                Ev::Digests {
                    task: t,
                    first: i,
                    complete,
                    dc,
                    sent,
                },
            );
        }
        self.ingest_next(t);
    }

    // ---- the download driver ----

    /// Hands one event to host `h`'s download of blob `t` (if it runs) and carries out what
    /// follows; whether there was a download to tell.
    fn feed(&mut self, h: u32, t: u16, event: impl FnOnce(&mut Download)) -> bool {
        let Some(dl) = self.task_mut(h, t).dl.as_mut() else {
            return false;
        };
        event(dl);
        self.counters.machine_calls += 1;
        self.pump(h, t);
        true
    }

    /// Drains `h`'s decisions for blob `t`, carries them out, and re-arms its timer: what
    /// `Engine::apply` and the `sleep_until(poll_timeout)` arm of its loop do.
    ///
    /// See [`Self::feed`] for one event followed by a pump.
    fn pump(&mut self, h: u32, t: u16) {
        let now = self.instant();
        let mut acts = std::mem::take(&mut self.actions);
        if let Some(dl) = self.task_mut(h, t).dl.as_mut() {
            while let Some(a) = dl.poll_action(now) {
                acts.push(a);
            }
        }
        self.counters.decisions += acts.len() as u64;
        for a in acts.drain(..) {
            self.execute(h, t, a);
        }
        self.actions = acts;
        let base = self.base;
        let now_ns = self.now;
        let pt = self.task_mut(h, t);
        let Some(dl) = pt.dl.as_mut() else {
            pt.timer_at = None;
            return;
        };
        let at = dl
            .poll_timeout()
            .map(|i| ns(i.saturating_duration_since(base)).max(now_ns));
        if at != pt.timer_at {
            pt.timer_at = at;
            if let Some(at) = at {
                self.at(
                    at,
                    Ev::Timer {
                        host: h,
                        task: t,
                        at,
                    },
                );
            }
        }
    }

    fn execute(&mut self, h: u32, t: u16, a: Action) {
        if self.hosts[h as usize].tasks[t as usize].run != Run::Running {
            return;
        }
        match a {
            Action::Connect { src, peer } => {
                self.counters.connects += 1;
                let p = self.node_map.get(&peer.node_id).copied().unwrap_or(NO_HOST);
                let pt = self.task_mut(h, t);
                let k = src.0 as usize;
                if pt.sources.len() <= k {
                    pt.sources.resize(k + 1, NO_HOST);
                }
                pt.sources[k] = p;
                if p == NO_HOST || !self.hosts[p as usize].alive {
                    let idle = ns(self.cfg.idle_timeout);
                    self.after(
                        idle,
                        Ev::ParentGone {
                            host: h,
                            task: t,
                            src: src.0,
                        },
                    );
                    return;
                }
                let rtt = self.rtt(h, p);
                self.after(
                    2 * rtt,
                    Ev::ParentReady {
                        host: h,
                        task: t,
                        src: src.0,
                    },
                );
                self.after(
                    2 * rtt + rtt / 2,
                    Ev::Subscribe {
                        parent: p,
                        task: t,
                        child: h,
                        src: src.0,
                    },
                );
            }
            Action::Request {
                src, index, len, ..
            } => {
                let s = if src.0 == 0 {
                    SEED_HOST
                } else {
                    self.hosts[h as usize].tasks[t as usize]
                        .sources
                        .get(src.0 as usize)
                        .copied()
                        .unwrap_or(NO_HOST)
                };
                assert_ne!(s, NO_HOST, "a request to a source never connected");
                let rid = self.new_req(Req {
                    child: h,
                    task: t,
                    src: src.0,
                    src_host: s,
                    piece: index,
                    len,
                    flow: None,
                    gate: None,
                    cancelled: false,
                    refs: 0,
                });
                self.task_mut(h, t).live.insert((src.0, index), rid);
                let lat = self.lat(h, s);
                if s == SEED_HOST {
                    self.counters.requests_to_seed += 1;
                    self.after_req(lat, rid, Ev::SeedRequest(rid));
                } else {
                    self.counters.requests_to_peers += 1;
                    self.after_req(lat, rid, Ev::PeerRequest(rid));
                }
            }
            Action::Cancel {
                src,
                index,
                timed_out,
            } => {
                if timed_out {
                    self.counters.timeouts += 1;
                } else {
                    self.counters.cancels += 1;
                }
                if let Some(rid) = self.task_mut(h, t).live.remove(&(src.0, index)) {
                    let s = self.reqs[rid as usize].src_host;
                    let lat = self.lat(h, s);
                    self.after_req(lat, rid, Ev::CancelArrive(rid));
                }
            }
            Action::Report { peer, reason } => {
                self.counters.reports += 1;
                let lat = self.lat(h, SEED_HOST);
                self.after(
                    lat,
                    Ev::Report {
                        reporter: h,
                        task: t,
                        suspect: peer,
                        reason,
                    },
                );
            }
            Action::DropParent { src } => {
                self.counters.parents_dropped += 1;
                let p = self.hosts[h as usize].tasks[t as usize]
                    .sources
                    .get(src.0 as usize)
                    .copied()
                    .unwrap_or(NO_HOST);
                self.unsubscribe(p, t, h, src.0);
            }
            Action::Done => {
                self.counters.downloads_done += 1;
                self.finish_task(h, t, false);
            }
            Action::Fail(f) => {
                self.counters.downloads_failed += 1;
                let why: String = f
                    .to_string()
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '#' } else { c })
                    .collect();
                *self.counters.failures.entry(why).or_default() += 1;
                self.counters.first_failure_s.get_or_insert(secs(self.now));
                self.finish_task(h, t, true);
            }
        }
    }

    fn unsubscribe(&mut self, p: u32, t: u16, child: u32, src: u32) {
        if p == NO_HOST || p == SEED_HOST {
            return;
        }
        self.hosts[p as usize].tasks[t as usize]
            .subs
            .retain(|s| !(s.child == child && s.src == src));
    }

    /// The download of blob `t` at `h` ended: its requests are cancelled, its parents
    /// connections closed; the host stays as a parent of others (a daemon lingers).
    fn finish_task(&mut self, h: u32, t: u16, failed: bool) {
        let pt = self.task_mut(h, t);
        let dl = pt.dl.take().expect("a running download");
        pt.parents_at_end = dl.parent_count();
        drop(dl);
        pt.run = if failed { Run::Failed } else { Run::Done };
        pt.timer_at = None;
        let live = std::mem::take(&mut pt.live);
        let sources = std::mem::take(&mut pt.sources);
        for (_, rid) in live {
            let s = self.reqs[rid as usize].src_host;
            let lat = self.lat(h, s);
            self.after_req(lat, rid, Ev::CancelArrive(rid));
        }
        for (src, &p) in sources.iter().enumerate().skip(1) {
            self.unsubscribe(p, t, h, src as u32);
        }
        if failed {
            // Without linger the control stream says goodbye: the swarm forgets it.
            let lat = self.lat(h, SEED_HOST);
            self.after(lat, Ev::SeedLeave { host: h, task: t });
        }
        let host = &mut self.hosts[h as usize];
        host.failed |= failed;
        host.tasks_left -= 1;
        if host.tasks_left == 0 {
            host.fate = Some(if host.failed {
                Fate::Failed
            } else {
                Fate::Done(secs(self.now - host.join_at))
            });
            self.active -= 1;
            if !host.failed {
                self.done_peers += 1;
            }
        }
    }

    /// `h` leaves (closes its connections) or dies (goes silent).
    fn host_gone(&mut self, h: u32, dies: bool) {
        if !self.hosts[h as usize].alive {
            return;
        }
        let idle = ns(self.cfg.idle_timeout);
        self.hosts[h as usize].alive = false;
        self.hosts[h as usize].gone_at = self.now;
        for t in 0..self.tasks.len() as u16 {
            let pt = self.task_mut(h, t);
            if pt.run == Run::Running || pt.run == Run::Waiting {
                pt.run = Run::Gone;
            }
            pt.dl = None;
            pt.timer_at = None;
            pt.live.clear();
            let sources = std::mem::take(&mut pt.sources);
            let subs = std::mem::take(&mut pt.subs);
            for (src, &p) in sources.iter().enumerate().skip(1) {
                self.unsubscribe(p, t, h, src as u32);
            }
            for s in subs {
                let delay = if dies { idle } else { self.lat(h, s.child) };
                self.after(
                    delay,
                    Ev::ParentGone {
                        host: s.child,
                        task: t,
                        src: s.src,
                    },
                );
            }
            let delay = if dies { idle } else { self.lat(h, SEED_HOST) };
            self.after(delay, Ev::SeedLeave { host: h, task: t });
        }
        // Its transfers stop at once, both ways.
        let (up, down) = (self.hosts[h as usize].up, self.hosts[h as usize].down);
        let mut tags = self.net.tags_on(up);
        tags.extend(self.net.tags_on(down));
        for tag in tags {
            let rid = tag as u32;
            let Some(f) = self.reqs[rid as usize].flow.take() else {
                continue;
            };
            let mut ups = std::mem::take(&mut self.updates);
            let sent = self.net.end(self.now, f, &mut ups);
            self.updates = ups;
            self.schedule_updates();
            let r = &mut self.reqs[rid as usize];
            r.cancelled = true;
            let (s, c, gate) = (r.src_host, r.child, r.gate.is_some());
            self.count_sent(s, sent);
            if gate {
                let delay = if dies { idle } else { self.lat(c, SEED_HOST) };
                self.after_req(delay, rid, Ev::SeedSent(rid));
            }
            self.release(rid); // the flow's
        }
        let host = &mut self.hosts[h as usize];
        if host.fate.is_none() {
            host.fate = Some(if dies { Fate::Died } else { Fate::Left });
            self.active -= 1;
        }
    }

    fn sample(&mut self) {
        let (t0, seed0, peers0) = self.last_sample;
        let dt = secs(self.now.saturating_sub(t0));
        // Bytes moved so far, the transfers under way included: counting only finished
        // pieces would show a seed that sends a thousand pieces at once as idle, then busy.
        let seed_up = self.hosts[SEED_HOST as usize].up;
        let seed1 =
            self.counters.seed_sent_bytes as f64 + self.net.in_flight_bytes(seed_up, self.now);
        let mut peers1 = self.counters.peer_sent_bytes as f64;
        let mut joined_up = 0.0;
        for h in &self.hosts[1..] {
            peers1 += self.net.in_flight_bytes(h.up, self.now);
            if h.joined && h.alive {
                joined_up += h.up_rate;
            }
        }
        let util = |bytes: f64, rate: f64| {
            if dt > 0.0 && rate > 0.0 {
                (bytes / (rate * dt)).max(0.0)
            } else {
                0.0
            }
        };
        self.samples.push(Sample {
            t: secs(self.now),
            done: self.done_peers as f64 / self.cfg.peers.max(1) as f64,
            seed_util: util(seed1 - seed0, self.cfg.seed_up),
            peer_util: util(peers1 - peers0, joined_up),
        });
        self.last_sample = (self.now, seed1, peers1);
    }
}
