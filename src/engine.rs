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
    Have, Hello, Labels, NodeId, PieceHeader, PieceRequest, PieceStatus, Register, Sha256, TaskId,
};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::metrics::{FailureReason, Metrics, ParentDrop, Source};
use crate::peer::{GetError, ProgressFn};
use crate::proto;
use crate::ratelimit::RateLimiter;
use crate::sched::download::{Action, Delivery, Download, DownloadConfig, Failure, PieceFailure};
use crate::sched::picker::SourceId;
use crate::store::StoreError;
use crate::task::Geometry;
use crate::transport::{self, MeshError};

pub use crate::sched::download::{
    MAX_PARENTS, PARENT_FAILURES, PEER_IN_FLIGHT, PIECE_TIMEOUT, SEED, SEED_ATTEMPTS,
    SEED_BUSY_BACKOFF, SEED_IN_FLIGHT,
};
/// Verified pieces queued toward the disk writer.
pub const WRITE_QUEUE_PIECES: usize = 16;
/// Out-of-order pieces kept in memory for the whole-content hash before it re-reads them.
pub const HASH_WINDOW_PIECES: usize = 64;
/// How long to wait for the seed's answer to a registration (the origin may be slow).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(300);
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

/// The IO half of a parent: its connection once made, and the session relaying its messages.
struct ParentLink {
    conn: Option<quinn::Connection>,
    task: AbortHandle,
}

impl ParentLink {
    fn close(self) {
        self.task.abort();
        if let Some(c) = self.conn {
            c.close(transport::close::DONE, b"dropped");
        }
    }
}

/// The connection to the current seed and its control stream.
struct SeedLink {
    conn: quinn::Connection,
    send: quinn::SendStream,
    reader: AbortHandle,
}

/// A download whose geometry is known: the policy machine and where the bytes go.
struct Running {
    geometry: Geometry,
    machine: Download,
    sink: Arc<dyn PieceSink>,
    writer_tx: Option<std::sync::mpsc::SyncSender<(u32, Bytes)>>,
    writer: Option<tokio::task::JoinHandle<Result<Option<Sha256>, StoreError>>>,
}

type PieceResult = (SourceId, u32, Result<Bytes, PieceError>);

/// The async driver of one [`Download`]: it connects, moves bytes, writes them and feeds every
/// outcome back; the machine decides.
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
    parents: HashMap<SourceId, ParentLink>,
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
            parents: HashMap::new(),
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
        let (mut send, recv) = proto::open_control(&conn).await.map_err(lost)?;
        let mut recv = proto::FrameReader::new(recv);
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
        // A supernode that takes the stream and never answers is as good as gone.
        match recv
            .expect_within::<Control>(proto::HELLO_TIMEOUT)
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
                let msg = match recv.next::<Control>().await {
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
        if let Some(r) = self.run.as_mut() {
            r.machine.handle_seed_attached();
        }
        Ok(())
    }

    /// Forgets the current seed: its requests are void and its offer gone; what was verified
    /// stays.
    fn detach(&mut self, addr: SocketAddr) {
        if let Some(link) = self.seed.take() {
            link.reader.abort();
        }
        self.pool.drop_conn(addr);
        self.cancel_all(SEED);
        if let Some(r) = self.run.as_mut() {
            r.machine.handle_seed_lost();
        }
    }

    /// Stops everything still running. When lingering, the control stream to the seed stays
    /// open and is returned; otherwise it says goodbye.
    async fn shutdown(&mut self, linger: bool) -> Option<quinn::SendStream> {
        for (_, p) in self.parents.drain() {
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
                        r.machine.set_read_position(*rp.borrow_and_update());
                    }
                }
                match self.apply(&mut r).await {
                    Ok(true) => {
                        let sha = r.machine.sha256().expect("done means confirmed");
                        return Ok(self.finish(r, sha).await?);
                    }
                    Ok(false) => self.run = Some(r),
                    Err(stop) => {
                        self.run = Some(r);
                        return Err(stop);
                    }
                }
            }
            let deadline = self
                .run
                .as_mut()
                .and_then(|r| r.machine.poll_timeout())
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                ev = self.events.recv() => {
                    let Some(ev) = ev else { return Err(GetError::Mesh("engine events closed".into()).into()) };
                    match ev {
                        Event::Seed(gen, _) if gen != self.seed_gen => {}
                        Event::Seed(_, msg) => {
                            let msg = msg.map_err(|e| Stop::Lost(GetError::Mesh(e)))?;
                            if matches!(msg, Control::TaskMeta(_)) {
                                meta_seen = true;
                            }
                            self.seed_message(task, msg).await?;
                        }
                        Event::ParentReady(src, conn) => {
                            match (self.parents.get_mut(&src), self.run.as_mut()) {
                                (Some(p), Some(r)) => {
                                    p.conn = Some(conn);
                                    r.machine.handle_parent_ready(src);
                                }
                                _ => conn.close(transport::close::DONE, b"dropped"),
                            }
                        }
                        Event::Parent(src, msg) => {
                            let Some(r) = self.run.as_mut() else { continue };
                            match msg {
                                Control::Bitmap(b) if b.task == task => r.machine.handle_bitmap(src, &b.bitmap),
                                Control::Have(h) if h.task == task => r.machine.handle_have(src, &h.pieces),
                                _ => {}
                            }
                        }
                        Event::ParentGone(src, why) => {
                            debug!(source = src.0, why, "parent gone");
                            if let Some(p) = self.parents.remove(&src) {
                                p.close();
                                self.count_dropped(ParentDrop::Gone);
                            }
                            if let Some(r) = self.run.as_mut() {
                                r.machine.handle_parent_gone(src);
                            }
                        }
                    }
                }
                Some(joined) = self.inflight.join_next(), if !self.inflight.is_empty() => {
                    let Ok((src, i, result)) = joined else { continue }; // aborted
                    if self.handles.remove(&(src, i)).is_none() {
                        continue; // a request the machine gave up
                    }
                    self.piece_result(src, i, result).await?;
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    if let Some(r) = self.run.as_mut() {
                        r.machine.handle_timeout(std::time::Instant::now());
                    }
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

    /// One message from the seed's control stream.
    async fn seed_message(&mut self, task: TaskId, msg: Control) -> Result<(), Stop> {
        match msg {
            Control::TaskMeta(m) if m.task == task => {
                let g = Geometry::checked(m.length, m.piece_size, m.piece_count)
                    .map_err(|e| GetError::Mesh(format!("supernode sent {e}")))?;
                match &self.run {
                    Some(r) if r.geometry != g => {
                        return Err(GetError::Integrity(
                            "the content changed at the origin during the download".into(),
                        )
                        .into());
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
                let r = self
                    .run
                    .as_mut()
                    .ok_or_else(|| GetError::Mesh("piece digests before task metadata".into()))?;
                r.sink.record_digests(pd.first, &pd.digests);
                let resumed = r
                    .machine
                    .handle_digests(pd.first, &pd.digests)
                    .map_err(|f| failure(f, self.seed_addr))?;
                if !resumed.is_empty() {
                    // Pieces kept from before a restart: the swarm may fetch them here.
                    if let Some(h) = &self.cfg.on_have {
                        resumed.iter().for_each(|&i| h(i));
                    }
                    self.send_seed(&Control::Have(Have {
                        task,
                        pieces: resumed,
                    }))
                    .await;
                }
            }
            Control::Parents(p) if p.task == task => {
                if let Some(r) = self.run.as_mut() {
                    r.machine.handle_parents(&p.parents);
                }
            }
            Control::TaskComplete(c) if c.task == task => {
                let r = self
                    .run
                    .as_mut()
                    .ok_or_else(|| GetError::Mesh("task complete before task metadata".into()))?;
                r.machine
                    .handle_complete(c.sha256)
                    .map_err(|f| failure(f, self.seed_addr))?;
            }
            Control::Error(e) if e.task.is_none() || e.task == Some(task) => {
                return Err(remote_error(e).into())
            }
            other => debug!(?other, "ignored control message"),
        }
        Ok(())
    }

    fn start(&mut self, g: Geometry, factory: SinkFactory) -> Result<Running, GetError> {
        let sink = factory(g)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<(u32, Bytes)>(WRITE_QUEUE_PIECES);
        let hash = self.reg.digest.is_some();
        let writer_sink = sink.clone();
        let on_stored = self.cfg.on_have.clone();
        let writer =
            tokio::task::spawn_blocking(move || write_pieces(rx, writer_sink, g, hash, on_stored));
        let resumed: HashMap<u32, Option<Sha256>> = sink.stored().into_iter().collect();
        info!(
            length = g.length,
            pieces = g.piece_count,
            resumed = resumed.len(),
            "download started"
        );
        let cfg = if self.cfg.upload_addr.is_some() {
            DownloadConfig::uploader(self.cfg.node_id, rand::random())
        } else {
            DownloadConfig::new(self.cfg.node_id, rand::random())
        };
        Ok(Running {
            geometry: g,
            machine: Download::new(g.length, g.piece_size, g.piece_count, resumed, cfg),
            sink,
            writer_tx: Some(tx),
            writer: Some(writer),
        })
    }

    /// Carries out the machine's decisions; `Ok(true)` when the download is done.
    async fn apply(&mut self, r: &mut Running) -> Result<bool, Stop> {
        while let Some(action) = r.machine.poll_action(std::time::Instant::now()) {
            match action {
                Action::Connect { src, peer } => {
                    let task = tokio::spawn(parent_session(
                        self.pool.endpoint().clone(),
                        peer.addr,
                        self.reg.task,
                        self.cfg.clone(),
                        src,
                        self.events_tx.clone(),
                    ))
                    .abort_handle();
                    self.parents.insert(src, ParentLink { conn: None, task });
                }
                Action::Request {
                    src,
                    index,
                    len,
                    digest,
                } => {
                    let conn = if src == SEED {
                        self.seed.as_ref().map(|l| l.conn.clone())
                    } else {
                        self.parents.get(&src).and_then(|p| p.conn.clone())
                    };
                    let Some(conn) = conn else {
                        // Gone between the decision and now: the machine hears of it as a
                        // failure, as it would from a stream.
                        r.machine.handle_piece_result(
                            src,
                            index,
                            Err(PieceFailure::Connection),
                            std::time::Instant::now(),
                        );
                        continue;
                    };
                    let task = self.reg.task;
                    let limiters = self.cfg.limiters.clone();
                    let h = self.inflight.spawn(async move {
                        let refs: Vec<&RateLimiter> = limiters.iter().collect();
                        crate::ratelimit::acquire_all(&refs, len as u64).await;
                        (
                            src,
                            index,
                            fetch_piece(&conn, task, index, len, digest).await,
                        )
                    });
                    self.handles.insert((src, index), h);
                }
                Action::Cancel {
                    src,
                    index,
                    timed_out,
                } => {
                    if let Some(h) = self.handles.remove(&(src, index)) {
                        h.abort();
                    }
                    if timed_out {
                        debug!(source = src.0, piece = index, "piece timed out");
                        if let Some(m) = &self.cfg.metrics {
                            m.piece_failures(FailureReason::Timeout).inc();
                        }
                    }
                }
                Action::Report { peer, reason } => {
                    if reason == BadPeerReason::DigestMismatch {
                        warn!(%peer, "parent sent a corrupt piece; dropped");
                    }
                    let report = Control::BadPeer(BadPeerReport {
                        task: self.reg.task,
                        peer,
                        reason,
                    });
                    self.send_seed(&report).await;
                }
                Action::DropParent { src } => {
                    if let Some(p) = self.parents.remove(&src) {
                        p.close();
                        self.count_dropped(ParentDrop::Failures);
                    }
                    self.cancel_all(src);
                }
                Action::Done => return Ok(true),
                Action::Fail(f) => return Err(failure(f, self.seed_addr)),
            }
        }
        Ok(false)
    }

    /// `d7q_parents_dropped_total{reason}`.
    fn count_dropped(&self, why: ParentDrop) {
        if let Some(m) = &self.cfg.metrics {
            m.parents_dropped(why).inc();
        }
    }

    /// Aborts every request out at `src`.
    fn cancel_all(&mut self, src: SourceId) {
        self.handles.retain(|(s, _), h| {
            if *s == src {
                h.abort();
                false
            } else {
                true
            }
        });
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
        let now = std::time::Instant::now();
        let bytes = match result {
            Ok(bytes) => bytes,
            Err(e) => {
                debug!(source = src.0, piece = i, error = %e, "piece failed");
                // Busy and saturated sources are fine, only full: not failures.
                let full = matches!(
                    e,
                    PieceError::Refused(PieceStatus::Busy | PieceStatus::Saturated)
                );
                if let (Some(m), false) = (&self.cfg.metrics, full) {
                    m.piece_failures(e.reason()).inc();
                }
                if let (SEED, PieceError::Connection(c)) = (src, &e) {
                    let addr = self.seed_addr.expect("a seed was attached");
                    return Err(Stop::Lost(transport::conn_error(addr, c.clone()).into()));
                }
                r.machine.handle_piece_result(src, i, Err(e.failure()), now);
                return Ok(());
            }
        };
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
        if r.machine.handle_piece_result(src, i, Ok(()), now) != Some(Delivery::New) {
            return Ok(()); // a duplicate that finished second
        }
        if let Some(p) = &self.progress {
            p(r.machine.bytes_done(), r.geometry.length);
        }
        let tx = r.writer_tx.clone().expect("writer open until finish");
        tokio::task::spawn_blocking(move || tx.send((i, bytes)))
            .await
            .map_err(|e| GetError::Mesh(format!("writer: {e}")))?
            .map_err(|_| GetError::Mesh("disk writer stopped".into()))?;
        // Our children hear of it from the writer, once it is on disk and can be served.
        let have = Control::Have(Have {
            task: self.reg.task,
            pieces: vec![i],
        });
        self.send_seed(&have).await;
        Ok(())
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

/// A machine's failure as the engine's stop: a lost seed lets the next supernode take over.
fn failure(f: Failure, seed: Option<SocketAddr>) -> Stop {
    match f {
        Failure::SeedLost(why) => Stop::Lost(GetError::Mesh(match seed {
            Some(a) => format!("{a}: {why}"),
            None => why,
        })),
        Failure::Integrity(why) => Stop::Fatal(GetError::Integrity(why)),
        Failure::Mesh(why) => Stop::Fatal(GetError::Mesh(why)),
    }
}

/// Sleeps until `at`; never, without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
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
        let (mut send, recv) = proto::open_control(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let mut recv = proto::FrameReader::new(recv);
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
        match recv
            .expect_within::<Control>(proto::HELLO_TIMEOUT)
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
            match recv.next::<Control>().await {
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

/// Resolves when a streaming reader moved; never, when there is none.
async fn wait_changed(
    rp: &mut Option<tokio::sync::watch::Receiver<Option<u64>>>,
) -> Result<(), tokio::sync::watch::error::RecvError> {
    match rp {
        Some(rp) => rp.changed().await,
        None => std::future::pending().await,
    }
}

/// Writes pieces through the sink. When the content has an expected digest, a second thread
/// hashes it in order meanwhile, so the disk and the hash do not wait on each other.
/// Writes verified pieces as they come and tells `on_stored` of each once it is stored: a piece
/// announced to children before that would be refused to them as not available (and a parent
/// refusing what it announced counts as failing), which on a loaded machine, with the write
/// queue behind, cost daemons their parents.
fn write_pieces(
    rx: std::sync::mpsc::Receiver<(u32, Bytes)>,
    sink: Arc<dyn PieceSink>,
    g: Geometry,
    hash: bool,
    on_stored: Option<HaveFn>,
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
        if let Some(h) = &on_stored {
            h(i);
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
}

impl PieceError {
    fn reason(&self) -> FailureReason {
        match self {
            PieceError::Corrupt => FailureReason::DigestMismatch,
            PieceError::Refused(_) => FailureReason::Refused,
            PieceError::Connection(_) | PieceError::Stream(_) => FailureReason::Stream,
        }
    }

    /// What the download's policy makes of it.
    fn failure(&self) -> PieceFailure {
        match self {
            PieceError::Connection(_) => PieceFailure::Connection,
            PieceError::Stream(_) => PieceFailure::Stream,
            PieceError::Refused(s) => PieceFailure::Refused(*s),
            PieceError::Corrupt => PieceFailure::Corrupt,
        }
    }
}

/// Fetches and verifies one piece. It takes as long as the source takes: the caller bounds it.
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
    // No timeout here: the download's machine gives each request a deadline and cancels it.
    work.await
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
