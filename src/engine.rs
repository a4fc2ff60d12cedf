//! The multi-source download engine: one download, fed by the seed (a supernode) and by parent
//! peers the supernode hands out.
//!
//! The supernode connection carries the control stream of the download: registration, task
//! metadata, piece digests as the seed learns them, parent lists, and our `Have`s and bad-peer
//! reports going back. Each parent gets a control stream of its own (we send our bitmap as a
//! subscription; it answers with its bitmap and then `Have`s) and piece streams. Which piece to
//! ask whom for is decided by the sans-IO [`PiecePicker`]; this module only moves bytes.
//!
//! Every piece, from whomever, is verified against the digest the seed published over its
//! authenticated connection before it is written or counted; a parent that sends a corrupt
//! piece is dropped for the task and reported.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use d7q_wire::{
    BadPeerReason, BadPeerReport, Bitmap, BitmapUpdate, Capabilities, Control, ErrorCode, ErrorMsg,
    Have, Hello, Labels, NodeId, PeerInfo, PieceHeader, PieceRequest, PieceStatus, Register,
    Sha256, TaskId,
};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::metrics::{FailureReason, Metrics, Source};
use crate::peer::{GetError, ProgressFn};
use crate::proto;
use crate::ratelimit::RateLimiter;
use crate::sched::picker::{PickerConfig, PiecePicker, SourceId};
use crate::store::StoreError;
use crate::task::Geometry;
use crate::transport::{self, MeshError};

/// The seed's source id in the picker.
pub const SEED: SourceId = SourceId(0);
/// Piece requests in flight to the seed. Lower than to a peer on purpose: the seed should
/// hand out pieces nobody else has and leave the rest to the swarm.
pub const SEED_IN_FLIGHT: usize = 8;
/// Piece requests in flight to one parent peer.
pub const PEER_IN_FLIGHT: usize = 16;
/// Parents connected at once.
pub const MAX_PARENTS: usize = d7q_wire::MAX_PARENTS;
/// Verified pieces queued toward the disk writer.
pub const WRITE_QUEUE_PIECES: usize = 16;
/// Out-of-order pieces kept in memory for the whole-content hash before it re-reads them.
pub const HASH_WINDOW_PIECES: usize = 64;
/// How long one piece may take before its parent is deemed stalled.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(30);
/// Failures (timeouts, refusals, broken streams) after which a parent is dropped.
pub const PARENT_FAILURES: u32 = 3;
/// Attempts per piece from the seed before the download fails.
pub const SEED_ATTEMPTS: u32 = 4;
/// How long to wait for the seed's answer to a registration (the origin may be slow).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a piece the seed refused as busy is not asked of the seed again (peers hold it).
pub const SEED_BUSY_BACKOFF: Duration = Duration::from_millis(300);
/// Control messages buffered from all sources toward the engine.
pub const EVENT_QUEUE: usize = 1024;

/// Where verified pieces go: a temporary output file, or a task in a daemon's store.
pub trait PieceSink: Send + Sync + 'static {
    /// Stores verified piece `index`.
    fn write_piece(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError>;
    /// Reads a stored piece back (for the whole-content hash).
    fn read_piece(&self, index: u32) -> Result<Vec<u8>, StoreError>;
    /// Pieces already stored (a resumed task) with the digest they were verified against.
    fn stored(&self) -> Vec<(u32, Option<Sha256>)> {
        Vec::new()
    }
    /// Digests learnt from the seed, for a store that keeps them.
    fn record_digests(&self, _first: u32, _digests: &[Sha256]) {}
}

/// Makes the sink once the content's geometry is known.
pub type SinkFactory = Box<dyn FnOnce(Geometry) -> Result<Arc<dyn PieceSink>, StoreError> + Send>;

/// Called with each newly stored piece (a daemon tells its children).
pub type HaveFn = Arc<dyn Fn(u32) + Send + Sync>;

/// Who we are and what limits us.
#[derive(Clone)]
pub struct EngineConfig {
    /// Our node id.
    pub node_id: NodeId,
    /// Our labels.
    pub labels: Labels,
    /// Where we serve pieces, if we do.
    pub upload_addr: Option<SocketAddr>,
    /// Budgets every received byte is charged to (machine-wide, per download).
    pub limiters: Vec<RateLimiter>,
    /// Metrics to count into.
    pub metrics: Option<Arc<Metrics>>,
    /// Told of each stored piece.
    pub on_have: Option<HaveFn>,
    /// Stay in the task's swarm after the download (a daemon that uploads).
    pub linger: bool,
    /// Where a streaming client reads (a byte offset): pieces near it are fetched in order.
    pub read_position: Option<tokio::sync::watch::Receiver<Option<u64>>>,
}

impl EngineConfig {
    /// A node that only downloads.
    pub fn downloader() -> Self {
        Self {
            node_id: NodeId(rand::random()),
            labels: Labels::default(),
            upload_addr: None,
            limiters: Vec::new(),
            metrics: None,
            on_have: None,
            linger: false,
            read_position: None,
        }
    }
}

/// Outbound connections, one per remote node, reused across downloads.
pub struct ConnPool {
    ep: quinn::Endpoint,
    conns: Mutex<HashMap<SocketAddr, quinn::Connection>>,
}

impl ConnPool {
    /// A pool dialling from `ep`.
    pub fn new(ep: quinn::Endpoint) -> Self {
        Self {
            ep,
            conns: Mutex::new(HashMap::new()),
        }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &quinn::Endpoint {
        &self.ep
    }

    /// A live connection to `addr`, dialling if needed.
    pub async fn get(&self, addr: SocketAddr) -> Result<quinn::Connection, MeshError> {
        if let Some(c) = self.conns.lock().expect("pool lock").get(&addr) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let conn = transport::connect(&self.ep, addr).await?;
        self.conns
            .lock()
            .expect("pool lock")
            .insert(addr, conn.clone());
        Ok(conn)
    }

    /// Forgets (and closes) the connection to `addr`.
    pub fn drop_conn(&self, addr: SocketAddr) {
        if let Some(c) = self.conns.lock().expect("pool lock").remove(&addr) {
            c.close(transport::close::DONE, b"");
        }
    }

    /// Closes everything.
    pub fn close(&self) {
        for (_, c) in self.conns.lock().expect("pool lock").drain() {
            c.close(transport::close::DONE, b"");
        }
    }
}

/// A finished download.
pub struct Outcome {
    /// The content's geometry.
    pub geometry: Geometry,
    /// SHA-256 of the content as the seed computed it from the origin.
    pub sha256: Sha256,
    /// Bytes received from the seed.
    pub from_seed: u64,
    /// Bytes received from other peers.
    pub from_peers: u64,
    /// Where the pieces are.
    pub sink: Arc<dyn PieceSink>,
    /// The supernode that seeded it.
    pub supernode: SocketAddr,
    /// Kept membership in the swarm, when the configuration asked to linger.
    pub presence: Option<Presence>,
}

/// Orders supernodes for a task by rendezvous hashing: every node computes the same order, so
/// a task has one home supernode and, when it is down, the same next one everywhere.
pub fn rendezvous(task: TaskId, supernodes: &[SocketAddr]) -> Vec<SocketAddr> {
    let mut scored: Vec<(u64, SocketAddr)> = supernodes
        .iter()
        .map(|a| {
            let mut key = task.0.to_vec();
            key.extend_from_slice(a.to_string().as_bytes());
            (xxhash_rust::xxh3::xxh3_64(&key), *a)
        })
        .collect();
    scored.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.dedup_by_key(|s| s.1);
    scored.into_iter().map(|s| s.1).collect()
}

/// Downloads the content of `reg` through the mesh: from the task's home supernode by
/// rendezvous hashing, and when that one is down or dies mid-task, from the next one — keeping
/// every piece already verified.
pub async fn download(
    pool: &ConnPool,
    supernodes: &[SocketAddr],
    reg: Register,
    cfg: EngineConfig,
    make_sink: SinkFactory,
    progress: Option<ProgressFn>,
) -> Result<Outcome, GetError> {
    let linger = cfg.linger;
    let mut engine = Engine::new(pool, reg, cfg, progress, make_sink);
    let mut result = engine.run(supernodes).await;
    let presence = engine.shutdown(linger && result.is_ok()).await;
    if let Ok(o) = result.as_mut() {
        o.presence = presence.map(|s| Presence::new(s, None));
    }
    result
}

/// A completed download's membership in its swarm: while this lives, the supernode keeps the
/// node as a holder of every piece and hands it out as a parent. Dropping it leaves.
pub struct Presence {
    /// Held, never written: the open stream is the membership.
    _control: quinn::SendStream,
    /// Held so the supernode's half is not stopped (which would end the stream).
    _answers: Option<quinn::RecvStream>,
}

impl Presence {
    /// Membership held by an open control stream that announced or registered the task.
    pub fn new(control: quinn::SendStream, answers: Option<quinn::RecvStream>) -> Self {
        Self {
            _control: control,
            _answers: answers,
        }
    }
}

enum Event {
    /// A control message from the seed of generation `.0` (messages of a seed we left are
    /// dropped).
    Seed(u32, Result<Control, String>),
    /// The seed said "busy" for a piece a while ago; offer it from the seed again.
    SeedReoffer(u32),
    ParentReady(SourceId, quinn::Connection),
    Parent(SourceId, Control),
    ParentGone(SourceId, String),
}

/// Why the engine stopped talking to a seed.
enum Stop {
    /// The supernode is gone (unreachable, connection lost): try the next one.
    Lost(GetError),
    /// The download cannot succeed (the origin said no, the content is wrong, ...).
    Fatal(GetError),
}

impl From<GetError> for Stop {
    fn from(e: GetError) -> Self {
        Stop::Fatal(e)
    }
}

struct Parent {
    info: PeerInfo,
    conn: Option<quinn::Connection>,
    failures: u32,
    task: AbortHandle,
}

/// The connection to the current seed and its control stream.
struct SeedLink {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: AbortHandle,
}

struct Running {
    geometry: Geometry,
    picker: PiecePicker,
    digests: Vec<Option<Sha256>>,
    seed_attempts: Vec<u32>,
    sink: Arc<dyn PieceSink>,
    writer_tx: Option<std::sync::mpsc::SyncSender<(u32, Bytes)>>,
    writer: Option<tokio::task::JoinHandle<Result<Option<Sha256>, StoreError>>>,
    resumed: HashMap<u32, Option<Sha256>>,
    done: Bitmap,
    /// What the seed offers (digest known), less what it recently refused as busy.
    seed_offer: Bitmap,
    bytes_done: u64,
}

type PieceResult = (SourceId, u32, Result<Bytes, PieceError>);

struct Engine<'a> {
    pool: &'a ConnPool,
    reg: Register,
    cfg: EngineConfig,
    progress: Option<ProgressFn>,
    events_tx: mpsc::Sender<Event>,
    events: mpsc::Receiver<Event>,
    seed: Option<SeedLink>,
    seed_gen: u32,
    seed_addr: Option<SocketAddr>,
    make_sink: Option<SinkFactory>,
    run: Option<Running>,
    complete: Option<Sha256>,
    parents: HashMap<SourceId, Parent>,
    by_node: HashMap<NodeId, SourceId>,
    banned: Vec<NodeId>,
    next_source: u32,
    inflight: JoinSet<PieceResult>,
    handles: HashMap<(SourceId, u32), AbortHandle>,
    from_seed: u64,
    from_peers: u64,
}

impl<'a> Engine<'a> {
    fn new(
        pool: &'a ConnPool,
        reg: Register,
        cfg: EngineConfig,
        progress: Option<ProgressFn>,
        make_sink: SinkFactory,
    ) -> Self {
        let (events_tx, events) = mpsc::channel(EVENT_QUEUE);
        Self {
            pool,
            reg,
            cfg,
            progress,
            events_tx,
            events,
            seed: None,
            seed_gen: 0,
            seed_addr: None,
            make_sink: Some(make_sink),
            run: None,
            complete: None,
            parents: HashMap::new(),
            by_node: HashMap::new(),
            banned: Vec::new(),
            next_source: 1,
            inflight: JoinSet::new(),
            handles: HashMap::new(),
            from_seed: 0,
            from_peers: 0,
        }
    }

    async fn run(&mut self, supernodes: &[SocketAddr]) -> Result<Outcome, GetError> {
        let mut last: Option<GetError> = None;
        for addr in rendezvous(self.reg.task, supernodes) {
            let attached = self.attach(addr).await;
            let result = match attached {
                Ok(()) => self.drive().await,
                Err(stop) => Err(stop),
            };
            match result {
                Ok(outcome) => return Ok(outcome),
                Err(Stop::Fatal(e)) => return Err(e),
                Err(Stop::Lost(e)) => {
                    if self.seed.is_some() {
                        warn!(%addr, error = %e, "supernode lost mid-task; moving to the next");
                    } else {
                        debug!(%addr, error = %e, "supernode not usable");
                    }
                    self.detach(addr);
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| GetError::Mesh("no supernode configured".into())))
    }

    /// Connects to a seed, says hello and registers the task.
    async fn attach(&mut self, addr: SocketAddr) -> Result<(), Stop> {
        let conn = self.pool.get(addr).await.map_err(|e| match e {
            MeshError::CertificateRefused { .. } | MeshError::VersionMismatch { .. } => {
                Stop::Fatal(e.into())
            }
            e => Stop::Lost(e.into()),
        })?;
        let lost = |e: proto::ProtoError| -> Stop {
            let err = match (e, conn.close_reason()) {
                (_, Some(reason)) => transport::conn_error(addr, reason),
                (proto::ProtoError::Connection(c), None) => transport::conn_error(addr, c),
                (e, None) => MeshError::Protocol {
                    addr,
                    reason: e.to_string(),
                },
            };
            match err {
                MeshError::CertificateRefused { .. } | MeshError::VersionMismatch { .. } => {
                    Stop::Fatal(err.into())
                }
                e => Stop::Lost(e.into()),
            }
        };
        // Listening on every address: others reach us at the address we reach the seed from.
        let mut upload_addr = self.cfg.upload_addr;
        if let Some(a) = upload_addr.as_mut() {
            if a.ip().is_unspecified() {
                if let Some(ip) = conn.local_ip() {
                    a.set_ip(ip);
                }
            }
        }
        let (mut send, mut recv) = proto::open_control(&conn).await.map_err(lost)?;
        let hello = Control::Hello(Hello {
            major: d7q_wire::MAJOR_VERSION,
            minor: d7q_wire::MINOR_VERSION,
            node_id: self.cfg.node_id,
            labels: self.cfg.labels.clone(),
            upload_addr,
            capabilities: Capabilities(if upload_addr.is_some() {
                Capabilities::UPLOAD
            } else {
                0
            }),
        });
        proto::write_msg(&mut send, &hello).await.map_err(lost)?;
        match proto::expect_msg::<Control>(&mut recv)
            .await
            .map_err(lost)?
        {
            Control::HelloAck(ack) if ack.major == d7q_wire::MAJOR_VERSION => {}
            Control::HelloAck(_)
            | Control::Error(ErrorMsg {
                code: ErrorCode::VersionMismatch,
                ..
            }) => {
                return Err(Stop::Fatal(
                    MeshError::VersionMismatch {
                        addr,
                        ours: String::from_utf8_lossy(d7q_wire::ALPN).into(),
                    }
                    .into(),
                ))
            }
            other => {
                return Err(Stop::Lost(GetError::Mesh(format!(
                    "{addr}: expected HelloAck, got {other:?}"
                ))))
            }
        }
        proto::write_msg(&mut send, &Control::Register(self.reg.clone()))
            .await
            .map_err(lost)?;
        self.seed_gen += 1;
        let gen = self.seed_gen;
        let tx = self.events_tx.clone();
        let reader = tokio::spawn(async move {
            loop {
                let msg = match proto::read_msg::<Control>(&mut recv).await {
                    Ok(Some(m)) => Ok(m),
                    Ok(None) => Err("supernode closed the control stream".to_string()),
                    Err(e) => Err(e.to_string()),
                };
                let stop = msg.is_err();
                if tx.send(Event::Seed(gen, msg)).await.is_err() || stop {
                    return;
                }
            }
        })
        .abort_handle();
        self.seed = Some(SeedLink { conn, send, reader });
        self.seed_addr = Some(addr);
        Ok(())
    }

    /// Forgets the current seed: its requests are void and its offer gone; what was verified
    /// stays.
    fn detach(&mut self, addr: SocketAddr) {
        if let Some(link) = self.seed.take() {
            link.reader.abort();
        }
        self.pool.drop_conn(addr);
        self.handles.retain(|(s, _), h| {
            if *s == SEED {
                h.abort();
                false
            } else {
                true
            }
        });
        if let Some(r) = self.run.as_mut() {
            r.picker.handle_source_gone(SEED);
            r.seed_offer = Bitmap::new(r.geometry.piece_count);
            r.picker.handle_source_bitmap(SEED, &r.seed_offer);
            r.seed_attempts.iter_mut().for_each(|a| *a = 0);
        }
    }

    /// Says goodbye and stops everything still running.
    /// Stops everything still running. When lingering, the control stream to the seed stays
    /// open and is returned; otherwise it says goodbye.
    async fn shutdown(&mut self, linger: bool) -> Option<quinn::SendStream> {
        for p in self.parents.values() {
            p.task.abort();
        }
        self.inflight.abort_all();
        if let Some(mut link) = self.seed.take() {
            link.reader.abort();
            if linger {
                return Some(link.send);
            }
            let bye = Control::Goodbye(d7q_wire::Goodbye {
                reason: "done".into(),
            });
            let _ = proto::write_msg(&mut link.send, &bye).await;
            let _ = link.send.finish();
        }
        None
    }

    async fn send_seed(&mut self, msg: &Control) {
        if let Some(link) = self.seed.as_mut() {
            let _ = proto::write_msg(&mut link.send, msg).await;
        }
    }

    async fn drive(&mut self) -> Result<Outcome, Stop> {
        let task = self.reg.task;
        let registered = tokio::time::Instant::now();
        let mut meta_seen = false;
        loop {
            if let Some(mut r) = self.run.take() {
                if let Some(rp) = self.cfg.read_position.as_mut() {
                    if rp.has_changed().unwrap_or(false) {
                        let piece = u64::from(r.geometry.piece_size.max(1));
                        let pos = rp.borrow_and_update().map(|b| (b / piece) as u32);
                        r.picker.set_read_position(pos);
                    }
                }
                self.dispatch(&mut r);
                let finished = r.picker.is_complete() && self.complete.is_some();
                if finished {
                    let sha = self.complete.expect("checked");
                    return Ok(self.finish(r, sha).await?);
                }
                self.run = Some(r);
            }
            tokio::select! {
                ev = self.events.recv() => {
                    let Some(ev) = ev else { return Err(GetError::Mesh("engine events closed".into()).into()) };
                    match ev {
                        Event::Seed(gen, _) if gen != self.seed_gen => {}
                        Event::Seed(_, msg) => {
                            let msg = msg.map_err(|e| Stop::Lost(GetError::Mesh(e)))?;
                            match msg {
                                Control::TaskMeta(m) if m.task == task => {
                                    meta_seen = true;
                                    let g = Geometry::checked(m.length, m.piece_size, m.piece_count)
                                        .map_err(|e| GetError::Mesh(format!("supernode sent {e}")))?;
                                    match &self.run {
                                        Some(r) if r.geometry != g => {
                                            return Err(GetError::Integrity("the content changed at the origin during the download".into()).into());
                                        }
                                        Some(_) => {}
                                        None => {
                                            let factory = self.make_sink.take().expect("sink made once");
                                            self.run = Some(self.start(g, factory)?);
                                            // The length is known: a streaming client may start.
                                            if let Some(p) = &self.progress {
                                                p(0, g.length);
                                            }
                                        }
                                    }
                                }
                                Control::PieceDigests(pd) if pd.task == task => {
                                    let resumed = self.handle_digests(pd)?;
                                    if !resumed.is_empty() {
                                        // Pieces kept from before a restart: the swarm may fetch them here.
                                        if let Some(h) = &self.cfg.on_have {
                                            resumed.iter().for_each(|&i| h(i));
                                        }
                                        self.send_seed(&Control::Have(Have { task, pieces: resumed })).await;
                                    }
                                }
                                Control::Parents(p) if p.task == task => self.handle_parents(p.parents),
                                Control::TaskComplete(c) if c.task == task => {
                                    if self.complete.is_some_and(|old| old != c.sha256) {
                                        return Err(GetError::Integrity("the content changed at the origin during the download".into()).into());
                                    }
                                    self.complete = Some(c.sha256);
                                }
                                Control::Error(e) if e.task.is_none() || e.task == Some(task) => return Err(remote_error(e).into()),
                                other => debug!(?other, "ignored control message"),
                            }
                        }
                        Event::SeedReoffer(i) => {
                            if let Some(r) = self.run.as_mut() {
                                if self.seed.is_some() && r.digests[i as usize].is_some() && r.seed_offer.set(i) {
                                    r.picker.handle_source_have(SEED, i);
                                }
                            }
                        }
                        Event::ParentReady(src, conn) => {
                            if let Some(p) = self.parents.get_mut(&src) {
                                p.conn = Some(conn);
                            }
                        }
                        Event::Parent(src, msg) => {
                            let Some(r) = self.run.as_mut() else { continue };
                            match msg {
                                Control::Bitmap(b) if b.task == task && b.bitmap.len() == r.geometry.piece_count => {
                                    r.picker.handle_source_bitmap(src, &b.bitmap);
                                }
                                Control::Have(h) if h.task == task => {
                                    for i in h.pieces {
                                        if i < r.geometry.piece_count {
                                            r.picker.handle_source_have(src, i);
                                        }
                                    }
                                }
                                _ => {}
                            }
                        }
                        Event::ParentGone(src, why) => {
                            debug!(source = src.0, why, "parent gone");
                            self.drop_parent(src);
                        }
                    }
                }
                Some(joined) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    let Ok((src, i, result)) = joined else { continue }; // aborted
                    if self.handles.remove(&(src, i)).is_none() {
                        continue; // a request of a source we dropped
                    }
                    self.piece_result(src, i, result).await?;
                }
                changed = wait_changed(&mut self.cfg.read_position) => {
                    if changed.is_err() {
                        self.cfg.read_position = None; // the reader went away
                    }
                }
                _ = tokio::time::sleep_until(registered + REGISTER_TIMEOUT), if !meta_seen => {
                    return Err(Stop::Lost(GetError::Mesh("supernode did not answer the registration in time".into())));
                }
            }
        }
    }

    /// Records digests from the seed; returns the pieces that were already stored and match.
    fn handle_digests(&mut self, pd: d7q_wire::PieceDigests) -> Result<Vec<u32>, Stop> {
        let mut resumed_now = Vec::new();
        let r = self
            .run
            .as_mut()
            .ok_or_else(|| GetError::Mesh("piece digests before task metadata".into()))?;
        r.sink.record_digests(pd.first, &pd.digests);
        for (k, digest) in pd.digests.into_iter().enumerate() {
            let i = pd.first as usize + k;
            if i >= r.digests.len() {
                return Err(
                    GetError::Mesh("supernode sent digests past the last piece".into()).into(),
                );
            }
            let idx = i as u32;
            if r.digests[i].is_some_and(|d| d != digest) {
                // Another seed (after a failover) read different content from the origin.
                return Err(GetError::Integrity(
                    "the content changed at the origin during the download".into(),
                )
                .into());
            }
            r.digests[i] = Some(digest);
            r.picker.handle_digest(idx);
            r.picker.handle_source_have(SEED, idx);
            r.seed_offer.set(idx);
            if r.resumed.remove(&idx).is_some_and(|d| d == Some(digest)) {
                // Stored before a restart, verified against this very digest.
                r.picker.handle_done(idx);
                r.done.set(idx);
                r.bytes_done += r.geometry.piece_len(idx) as u64;
                resumed_now.push(idx);
            }
        }
        Ok(resumed_now)
    }

    fn start(&mut self, g: Geometry, factory: SinkFactory) -> Result<Running, GetError> {
        let sink = factory(g)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u32, Bytes)>(WRITE_QUEUE_PIECES);
        let hash = self.reg.digest.is_some();
        let writer_sink = sink.clone();
        let writer = tokio::task::spawn_blocking(move || write_pieces(rx, writer_sink, g, hash));
        let resumed: HashMap<u32, Option<Sha256>> = sink.stored().into_iter().collect();
        info!(
            length = g.length,
            pieces = g.piece_count,
            resumed = resumed.len(),
            "download started"
        );
        let cfg = PickerConfig {
            seed: rand::random(),
            max_in_flight_per_source: PEER_IN_FLIGHT,
            ..PickerConfig::default()
        };
        Ok(Running {
            geometry: g,
            picker: {
                let mut p = PiecePicker::new(g.piece_count, cfg);
                p.set_source_limit(SEED, SEED_IN_FLIGHT);
                p
            },
            digests: vec![None; g.piece_count as usize],
            seed_attempts: vec![0; g.piece_count as usize],
            sink,
            writer_tx: Some(tx),
            writer: Some(writer),
            resumed,
            done: Bitmap::new(g.piece_count),
            seed_offer: Bitmap::new(g.piece_count),
            bytes_done: 0,
        })
    }

    /// Hands out piece requests to every source with room, and cancels redundant duplicates.
    fn dispatch(&mut self, r: &mut Running) {
        while let Some((src, i)) = r.picker.poll_cancel() {
            if let Some(h) = self.handles.remove(&(src, i)) {
                h.abort();
            }
        }
        let mut sources: Vec<(SourceId, quinn::Connection, usize)> = self
            .parents
            .iter()
            .filter_map(|(s, p)| p.conn.clone().map(|c| (*s, c, PEER_IN_FLIGHT)))
            .collect();
        // The seed last: peers first take what they can.
        if let Some(link) = &self.seed {
            sources.push((SEED, link.conn.clone(), SEED_IN_FLIGHT));
        }
        for (src, conn, limit) in sources {
            while r.picker.in_flight(src) < limit {
                let Some(i) = r.picker.poll_request(src) else {
                    break;
                };
                let Some(digest) = r.digests[i as usize] else {
                    r.picker.handle_failed(src, i);
                    break;
                };
                let len = r.geometry.piece_len(i);
                let task = self.reg.task;
                let delay = if src == SEED {
                    retry_delay(r.seed_attempts[i as usize])
                } else {
                    Duration::ZERO
                };
                let limiters = self.cfg.limiters.clone();
                let conn = conn.clone();
                let h = self.inflight.spawn(async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let refs: Vec<&RateLimiter> = limiters.iter().collect();
                    crate::ratelimit::acquire_all(&refs, len as u64).await;
                    (src, i, fetch_piece(&conn, task, i, len, digest).await)
                });
                self.handles.insert((src, i), h);
            }
        }
    }

    async fn piece_result(
        &mut self,
        src: SourceId,
        i: u32,
        result: Result<Bytes, PieceError>,
    ) -> Result<(), Stop> {
        let Some(mut r) = self.run.take() else {
            return Ok(());
        };
        let result = self.piece_result_in(&mut r, src, i, result).await;
        self.run = Some(r);
        result
    }

    async fn piece_result_in(
        &mut self,
        r: &mut Running,
        src: SourceId,
        i: u32,
        result: Result<Bytes, PieceError>,
    ) -> Result<(), Stop> {
        match result {
            Ok(bytes) => {
                let n = bytes.len() as u64;
                if src == SEED {
                    self.from_seed += n;
                } else {
                    self.from_peers += n;
                }
                if let Some(m) = &self.cfg.metrics {
                    m.download_bytes(if src == SEED {
                        Source::Supernode
                    } else {
                        Source::Peer
                    })
                    .add(n);
                }
                if !r.done.set(i) {
                    return Ok(()); // a duplicate that finished second
                }
                r.picker.handle_done_from(src, i);
                r.bytes_done += n;
                if let Some(p) = &self.progress {
                    p(r.bytes_done, r.geometry.length);
                }
                let tx = r.writer_tx.clone().expect("writer open until finish");
                tokio::task::spawn_blocking(move || tx.send((i, bytes)))
                    .await
                    .map_err(|e| GetError::Mesh(format!("writer: {e}")))?
                    .map_err(|_| GetError::Mesh("disk writer stopped".into()))?;
                if let Some(h) = &self.cfg.on_have {
                    h(i);
                }
                let have = Control::Have(Have {
                    task: self.reg.task,
                    pieces: vec![i],
                });
                self.send_seed(&have).await;
            }
            Err(e) => {
                debug!(source = src.0, piece = i, error = %e, "piece failed");
                let busy_seed = src == SEED && matches!(e, PieceError::Refused(PieceStatus::Busy));
                if let (Some(m), false) = (&self.cfg.metrics, busy_seed) {
                    m.piece_failures(e.reason()).inc();
                }
                r.picker.handle_failed(src, i);
                if src == SEED && matches!(e, PieceError::Refused(PieceStatus::Busy)) {
                    // Peers hold it: take it from them; the seed is asked again later if not.
                    r.seed_offer.clear(i);
                    r.picker.handle_source_bitmap(SEED, &r.seed_offer);
                    let tx = self.events_tx.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(SEED_BUSY_BACKOFF).await;
                        let _ = tx.send(Event::SeedReoffer(i)).await;
                    });
                    return Ok(());
                }
                if src == SEED {
                    if let PieceError::Connection(c) = e {
                        let addr = self.seed_addr.expect("a seed was attached");
                        return Err(Stop::Lost(transport::conn_error(addr, c).into()));
                    }
                    r.seed_attempts[i as usize] += 1;
                    if r.seed_attempts[i as usize] >= SEED_ATTEMPTS {
                        return Err(match e {
                            PieceError::Corrupt => GetError::Integrity(format!(
                                "piece {i} from the supernode failed verification {SEED_ATTEMPTS} times"
                            ))
                            .into(),
                            e => Stop::Lost(GetError::Mesh(format!("piece {i}: {e}"))),
                        });
                    }
                    return Ok(());
                }
                let reason = match e {
                    PieceError::Corrupt => Some(BadPeerReason::DigestMismatch),
                    PieceError::Timeout => Some(BadPeerReason::Timeout),
                    PieceError::Refused(PieceStatus::NotAvailable) => None,
                    PieceError::Refused(_) => Some(BadPeerReason::Refused),
                    _ => None,
                };
                let corrupt = matches!(reason, Some(BadPeerReason::DigestMismatch));
                let Some(p) = self.parents.get_mut(&src) else {
                    return Ok(());
                };
                p.failures += 1;
                let node = p.info.node_id;
                if corrupt || p.failures >= PARENT_FAILURES {
                    if corrupt {
                        warn!(peer = %node, addr = %p.info.addr, piece = i, "parent sent a corrupt piece; dropped");
                    }
                    if let Some(reason) = reason {
                        let report = Control::BadPeer(BadPeerReport {
                            task: self.reg.task,
                            peer: node,
                            reason,
                        });
                        self.send_seed(&report).await;
                    }
                    self.banned.push(node);
                    r.picker.handle_source_gone(src);
                    self.drop_parent(src);
                }
            }
        }
        Ok(())
    }

    fn handle_parents(&mut self, list: Vec<PeerInfo>) {
        for info in list.into_iter().take(MAX_PARENTS) {
            if info.node_id == self.cfg.node_id
                || self.banned.contains(&info.node_id)
                || self.by_node.contains_key(&info.node_id)
                || self.parents.len() >= MAX_PARENTS
            {
                continue;
            }
            let src = SourceId(self.next_source);
            self.next_source += 1;
            let task = tokio::spawn(parent_session(
                self.pool.endpoint().clone(),
                info.addr,
                self.reg.task,
                self.cfg.clone(),
                src,
                self.events_tx.clone(),
            ))
            .abort_handle();
            self.by_node.insert(info.node_id, src);
            self.parents.insert(
                src,
                Parent {
                    info,
                    conn: None,
                    failures: 0,
                    task,
                },
            );
        }
    }

    fn drop_parent(&mut self, src: SourceId) {
        if let Some(p) = self.parents.remove(&src) {
            p.task.abort();
            if let Some(c) = p.conn {
                c.close(transport::close::DONE, b"dropped");
            }
            // Keep the node id mapped so a later Parents list does not bring it back at once.
        }
        if let Some(r) = self.run.as_mut() {
            r.picker.handle_source_gone(src);
        }
        self.handles.retain(|(s, _), h| {
            if *s == src {
                h.abort();
                false
            } else {
                true
            }
        });
    }

    async fn finish(&mut self, mut r: Running, seed_sha: Sha256) -> Result<Outcome, GetError> {
        r.writer_tx.take();
        let sha = r
            .writer
            .take()
            .expect("writer present")
            .await
            .map_err(|e| GetError::Mesh(format!("writer: {e}")))??;
        // Every piece was verified against the seed's digests on arrival. With an expected
        // digest the whole content is hashed as well and must match it and the seed.
        if let (Some(want), Some(sha)) = (self.reg.digest, sha) {
            if want != sha || sha != seed_sha {
                return Err(GetError::Integrity(format!(
                    "digest mismatch: expected {}, got {}",
                    crate::task::format_digest(&want),
                    crate::task::format_digest(&sha)
                )));
            }
        }
        Ok(Outcome {
            geometry: r.geometry,
            sha256: seed_sha,
            from_seed: self.from_seed,
            from_peers: self.from_peers,
            sink: r.sink,
            supernode: self.seed_addr.expect("a seed was attached"),
            presence: None,
        })
    }
}

/// One parent: connect, subscribe to the task with our (empty) bitmap, relay its bitmap and
/// `Have`s to the engine until it goes away.
async fn parent_session(
    ep: quinn::Endpoint,
    addr: SocketAddr,
    task: TaskId,
    cfg: EngineConfig,
    src: SourceId,
    events: mpsc::Sender<Event>,
) {
    let result: Result<(), String> = async {
        let conn = transport::connect(&ep, addr)
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, mut recv) = proto::open_control(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let hello = Control::Hello(Hello {
            major: d7q_wire::MAJOR_VERSION,
            minor: d7q_wire::MINOR_VERSION,
            node_id: cfg.node_id,
            labels: cfg.labels.clone(),
            upload_addr: cfg.upload_addr,
            capabilities: Capabilities(0),
        });
        proto::write_msg(&mut send, &hello)
            .await
            .map_err(|e| e.to_string())?;
        match proto::expect_msg::<Control>(&mut recv)
            .await
            .map_err(|e| e.to_string())?
        {
            Control::HelloAck(a) if a.major == d7q_wire::MAJOR_VERSION => {}
            other => return Err(format!("unexpected answer {other:?}")),
        }
        let subscribe = Control::Bitmap(BitmapUpdate {
            task,
            bitmap: Bitmap::new(0),
        });
        proto::write_msg(&mut send, &subscribe)
            .await
            .map_err(|e| e.to_string())?;
        events
            .send(Event::ParentReady(src, conn.clone()))
            .await
            .map_err(|_| "engine gone".to_string())?;
        loop {
            match proto::read_msg::<Control>(&mut recv).await {
                Ok(Some(Control::Error(e))) => return Err(e.message),
                Ok(Some(m)) => {
                    if events.send(Event::Parent(src, m)).await.is_err() {
                        return Ok(());
                    }
                }
                Ok(None) => return Err("parent closed the stream".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    .await;
    if let Err(why) = result {
        let _ = events.send(Event::ParentGone(src, why)).await;
    }
}

fn remote_error(e: ErrorMsg) -> GetError {
    match e.code {
        ErrorCode::OriginStatus | ErrorCode::OriginUnreachable | ErrorCode::OriginTruncated => {
            GetError::Origin(e.message)
        }
        ErrorCode::DigestMismatch => GetError::Integrity(e.message),
        _ => GetError::Mesh(format!("supernode: {}", e.message)),
    }
}

/// Back-off before retrying a piece at the seed: a refusal often means the reason is on its way
/// on the control stream (the task failed), and an immediate retry would only hit it again.
fn retry_delay(attempts: u32) -> Duration {
    match attempts {
        0 => Duration::ZERO,
        n => Duration::from_millis(250 << (n - 1).min(4)),
    }
}

/// Writes pieces through the sink. When the content has an expected digest, a second thread
/// hashes it in order meanwhile, so the disk and the hash do not wait on each other.
/// Resolves when a streaming reader moved; never, when there is none.
async fn wait_changed(
    rp: &mut Option<tokio::sync::watch::Receiver<Option<u64>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rp {
        Some(rp) => rp.changed().await,
        None => std::future::pending().await,
    }
}

fn write_pieces(
    rx: std::sync::mpsc::Receiver<(u32, Bytes)>,
    sink: Arc<dyn PieceSink>,
    g: Geometry,
    hash: bool,
) -> Result<Option<Sha256>, StoreError> {
    let hasher = hash.then(|| {
        let (htx, hrx) = std::sync::mpsc::sync_channel::<(u32, Bytes)>(WRITE_QUEUE_PIECES);
        let s = sink.clone();
        (htx, std::thread::spawn(move || hash_in_order(hrx, s, g)))
    });
    let mut result = Ok(());
    while let Ok((i, bytes)) = rx.recv() {
        if let Err(e) = sink.write_piece(i, &bytes) {
            result = Err(e);
            break;
        }
        if let Some((htx, _)) = &hasher {
            if htx.send((i, bytes)).is_err() {
                break;
            }
        }
    }
    let sha = match hasher {
        Some((htx, handle)) => {
            drop(htx);
            let joined = handle.join().map_err(|_| StoreError::Io {
                path: "<hash thread>".into(),
                source: std::io::Error::other("hash thread panicked"),
            })?;
            Some(joined?)
        }
        None => None,
    };
    result?;
    Ok(sha)
}

/// SHA-256 of the whole content from pieces arriving in any order: in-order pieces are hashed
/// at once, pieces ahead are kept up to a window and re-read beyond it (they are stored before
/// they get here). Resumed pieces never come through the channel and are read back.
fn hash_in_order(
    rx: std::sync::mpsc::Receiver<(u32, Bytes)>,
    sink: Arc<dyn PieceSink>,
    g: Geometry,
) -> Result<Sha256, StoreError> {
    let mut whole = sha2::Sha256::new();
    let mut next: u32 = 0;
    let mut pending: BTreeMap<u32, Option<Bytes>> = BTreeMap::new();
    while let Ok((i, bytes)) = rx.recv() {
        if i == next {
            whole.update(&bytes);
            next += 1;
        } else {
            let keep = pending.len() < HASH_WINDOW_PIECES;
            pending.insert(i, keep.then_some(bytes));
        }
        while let Some(entry) = pending.remove(&next) {
            match entry {
                Some(b) => whole.update(&b),
                None => whole.update(sink.read_piece(next)?),
            }
            next += 1;
        }
    }
    // Whatever did not come through (resumed pieces, or an early exit) is read back.
    while next < g.piece_count {
        match pending.remove(&next) {
            Some(Some(b)) => whole.update(&b),
            _ => whole.update(sink.read_piece(next)?),
        }
        next += 1;
    }
    Ok(whole.finalize().into())
}

/// Why one piece request failed.
#[derive(Debug, thiserror::Error)]
pub enum PieceError {
    /// The connection broke.
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
    /// The stream broke or carried nonsense.
    #[error("stream: {0}")]
    Stream(String),
    /// The source refused.
    #[error("refused: {0:?}")]
    Refused(PieceStatus),
    /// The bytes did not match the digest.
    #[error("piece digest mismatch")]
    Corrupt,
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

impl PieceError {
    fn reason(&self) -> FailureReason {
        match self {
            PieceError::Corrupt => FailureReason::DigestMismatch,
            PieceError::Timeout => FailureReason::Timeout,
            PieceError::Refused(_) => FailureReason::Refused,
            PieceError::Connection(_) | PieceError::Stream(_) => FailureReason::Stream,
        }
    }
}

/// Fetches and verifies one piece.
pub async fn fetch_piece(
    conn: &quinn::Connection,
    task: TaskId,
    index: u32,
    len: u32,
    digest: Sha256,
) -> Result<Bytes, PieceError> {
    let work = async {
        let (mut send, mut recv) = proto::open_piece(conn).await.map_err(|e| match e {
            proto::ProtoError::Connection(c) => PieceError::Connection(c),
            e => PieceError::Stream(e.to_string()),
        })?;
        proto::write_msg(&mut send, &PieceRequest { task, index })
            .await
            .map_err(|e| PieceError::Stream(e.to_string()))?;
        let _ = send.finish();
        let mut h = [0u8; d7q_wire::piece::PIECE_HEADER_LEN];
        recv.read_exact(&mut h)
            .await
            .map_err(|e| PieceError::Stream(e.to_string()))?;
        let header = PieceHeader::decode(h).map_err(|e| PieceError::Stream(e.to_string()))?;
        if header.status != PieceStatus::Ok {
            return Err(PieceError::Refused(header.status));
        }
        if header.length != len {
            return Err(PieceError::Stream(format!(
                "piece {index} is {} bytes, expected {len}",
                header.length
            )));
        }
        // Hash each chunk as it arrives, while it is still in cache, instead of a second pass
        // over the whole piece; and no zero-filled buffer to overwrite.
        let mut buf = Vec::with_capacity(len as usize);
        let mut hasher = sha2::Sha256::new();
        while buf.len() < len as usize {
            let want = len as usize - buf.len();
            let chunk = recv
                .read_chunk(want, true)
                .await
                .map_err(|e| PieceError::Stream(e.to_string()))?
                .ok_or_else(|| {
                    PieceError::Stream(format!("piece {index} ended after {} bytes", buf.len()))
                })?;
            hasher.update(&chunk.bytes);
            buf.extend_from_slice(&chunk.bytes);
        }
        let got: Sha256 = hasher.finalize().into();
        if got != digest {
            return Err(PieceError::Corrupt);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(PIECE_TIMEOUT, work)
        .await
        .map_err(|_| PieceError::Timeout)?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_is_stable_and_spreads_tasks() {
        let sns: Vec<SocketAddr> = (1..=3)
            .map(|i| format!("10.0.0.{i}:8002").parse().unwrap())
            .collect();
        let t = TaskId([7; 16]);
        let order = rendezvous(t, &sns);
        assert_eq!(order.len(), 3);
        let mut rev = sns.clone();
        rev.reverse();
        assert_eq!(
            rendezvous(t, &rev),
            order,
            "order does not depend on the configured order"
        );
        // Without the home supernode, the others keep their relative order.
        let without: Vec<SocketAddr> = sns.iter().copied().filter(|a| *a != order[0]).collect();
        assert_eq!(rendezvous(t, &without), order[1..].to_vec());
        // Different tasks have different homes.
        let homes: std::collections::HashSet<SocketAddr> = (0..64u8)
            .map(|k| rendezvous(TaskId([k; 16]), &sns)[0])
            .collect();
        assert_eq!(homes.len(), 3);
    }
}
