//! The supernode: scheduler and passive CDN for its tasks.
//!
//! On the first registration of a task it fetches the content from the origin, splits it into
//! pieces, hashes each piece (SHA-256) and the whole, stores it, and publishes each piece's
//! digest to the registered peers as soon as the piece is on disk — so peers download while the
//! origin download is still running. Later registrations of a cached task never touch the
//! origin; concurrent ones share one origin download. A failed download leaves nothing behind.
//!
//! Supernodes chain across datacenters: one with `--upstream` supernodes asks them (in
//! rendezvous order, as peers order supernodes) before the origin. It registers the task
//! upstream as an ordinary downloader through the [`engine`], verifies every piece against the
//! digests the upstream learnt from the origin, stores it and serves it to its own peers at
//! once, in whatever order pieces arrive. When every upstream fails it goes to the origin
//! itself, keeping what it already stored. So a blob leaves the origin once and crosses each
//! WAN link about once.
//!
//! Not for: choosing parents among peers (see [`crate::sched::parents`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use d7q_wire::{
    ByteRange, Capabilities, Control, ErrorCode, ErrorMsg, HelloAck, Labels, NodeId, Parents,
    PieceDigests, PieceHeader, PieceRequest, PieceStatus, Register, Sha256, TaskComplete, TaskId,
    TaskMeta, MAX_DIGESTS_PER_MESSAGE, MAX_STRING_LEN,
};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::engine::{self, ConnPool, EngineConfig, PieceSink};
use crate::metrics::{Metrics, Source, TaskState};
use crate::origin::{OriginClient, OriginError};
use crate::pki::NodeIdentity;
use crate::ratelimit::RateLimiter;
use crate::sched::parents::{Swarm, SwarmConfig};
use crate::sched::seed::{Decision, SeedGate};
use crate::store::{self, DataFile, StoreError};
use crate::task::{self, Geometry, MIN_PIECE_SIZE};
use crate::transport::{self, close, MeshError};
use crate::{admin, proto};

/// Pieces an ingest may have buffered between the network and the disk writer.
pub const INGEST_QUEUE_PIECES: usize = 4;
/// Origin downloads running at once; further tasks wait their turn.
pub const MAX_CONCURRENT_INGESTS: usize = 32;
/// Piece reads served at once, across all connections.
pub const MAX_CONCURRENT_UPLOADS: usize = 64;
/// Mesh (`d7q/1`) connections handled at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Admin API (`h3`) connections handled at once. Their own budget, apart from the mesh's: an
/// admin client needs no certificate, so anyone who reaches the port can hold these, and holding
/// all of them must never keep a mesh peer out. A few operators and scrapers need no more.
pub const MAX_ADMIN_CONNECTIONS: usize = 32;
/// Handshakes in progress at once, before the ALPN says which budget a connection takes.
pub const MAX_HANDSHAKES: usize = MAX_CONNECTIONS;
/// Close code of a connection over its budget (an application code, as in
/// [`transport::close`]).
const CLOSE_BUSY: quinn::VarInt = quinn::VarInt::from_u32(5);
/// Tasks one control stream may register or announce (a daemon uses one stream per task).
pub const MAX_TASKS_PER_STREAM: usize = 64;
/// How often a peer's parents are reconsidered.
pub const PARENTS_INTERVAL: Duration = Duration::from_millis(500);
/// Control messages queued toward one peer before we stop reading from it.
pub const CONTROL_QUEUE: usize = 256;

/// How to run a supernode.
#[derive(Clone)]
pub struct SupernodeConfig {
    /// UDP address for QUIC (mesh and admin API).
    pub listen: SocketAddr,
    /// Where content is stored.
    pub data_dir: PathBuf,
    /// The node's identity in the cluster.
    pub identity: NodeIdentity,
    /// Extra CA files trusted for origins.
    pub origin_cas: Vec<PathBuf>,
    /// Locality labels.
    pub labels: Labels,
    /// Budget for fetching from origins, bytes/s, all tasks together (0: unlimited).
    pub origin_rate: u64,
    /// Metrics to count into.
    pub metrics: Arc<Metrics>,
}

/// A running supernode.
pub struct Supernode {
    inner: Arc<Inner>,
    endpoint: quinn::Endpoint,
}

struct Inner {
    node_id: NodeId,
    /// Dials upstream supernodes (from the mesh endpoint).
    pool: ConnPool,
    /// Supernodes asked before the origin.
    upstream: RwLock<Vec<SocketAddr>>,
    labels: Labels,
    origin: OriginClient,
    tasks_dir: PathBuf,
    tasks: Mutex<HashMap<TaskId, Arc<SeedTask>>>,
    uploads: Semaphore,
    /// Copies the seed gates of all tasks let through and not yet ended: the seed's slots are
    /// shared by its tasks ([`SeedGate::handle_request_among`]).
    seed_copies: std::sync::atomic::AtomicU32,
    ingests: Semaphore,
    origin_limiter: RateLimiter,
    metrics: Arc<Metrics>,
    /// Slots for handshakes, then per kind of connection (see [`MAX_ADMIN_CONNECTIONS`]).
    handshakes: Arc<Semaphore>,
    mesh_connections: Arc<Semaphore>,
    admin_connections: Arc<Semaphore>,
    started: Instant,
}

/// One task as the seed sees it.
struct SeedTask {
    id: TaskId,
    /// URL without query (which may carry signatures), for status output.
    shown_url: String,
    progress: watch::Sender<Progress>,
    /// Digests as known, and which pieces are stored (servable).
    pieces: Mutex<Pieces>,
    file: Mutex<Option<Arc<DataFile>>>,
    /// Who has which pieces, who should fetch from whom, and what the seed already handed
    /// out; made once the piece count is known.
    swarm: Mutex<Option<Sched>>,
}

/// The deciding state of one task on its supernode.
struct Sched {
    swarm: Swarm,
    gate: SeedGate,
}

impl SeedTask {
    /// Runs `f` on the task's swarm, once its geometry is known.
    fn with_swarm<R>(&self, f: impl FnOnce(&mut Swarm) -> R) -> Option<R> {
        self.with_sched(|s| f(&mut s.swarm))
    }

    /// Runs `f` on the task's deciding state, once its geometry is known.
    fn with_sched<R>(&self, f: impl FnOnce(&mut Sched) -> R) -> Option<R> {
        let count = self.progress.borrow().meta?.piece_count;
        let mut guard = self.swarm.lock().expect("swarm lock");
        let sched = guard.get_or_insert_with(|| {
            let mut swarm = Swarm::new(
                count,
                SwarmConfig {
                    seed: rand::random(),
                    ..SwarmConfig::default()
                },
            );
            // Lock order: swarm, then pieces (the writers take pieces alone, then swarm).
            swarm.handle_seed_have(&self.pieces.lock().expect("pieces lock").stored_list());
            Sched {
                swarm,
                gate: SeedGate::new(count),
            }
        });
        Some(f(sched))
    }

    /// Records piece `i` (verified against `digest`) as stored: from now on it is served.
    /// Fails when a different digest was published for it before (the content changed).
    fn store_piece(&self, i: u32, digest: Sha256) -> Result<(), u32> {
        {
            let mut p = self.pieces.lock().expect("pieces lock");
            match p.digest(i) {
                Some(d) if d != digest => return Err(i),
                _ => {}
            }
            p.set_digest(i, digest);
            if !p.set_stored(i) {
                return Ok(());
            }
        }
        self.progress.send_modify(|p| p.available += 1);
        self.with_swarm(|s| s.handle_seed_have(&[i]));
        Ok(())
    }
}

/// Per-piece state of a task on its supernode.
#[derive(Default)]
struct Pieces {
    digests: Vec<Option<Sha256>>,
    stored: Vec<bool>,
}

impl Pieces {
    fn complete(digests: Vec<Sha256>) -> Self {
        Self {
            stored: vec![true; digests.len()],
            digests: digests.into_iter().map(Some).collect(),
        }
    }

    fn digest(&self, i: u32) -> Option<Sha256> {
        self.digests.get(i as usize).copied().flatten()
    }

    /// Records digests of pieces `first..` sent by an upstream, if they all name pieces of a
    /// task of `piece_count` pieces; false, recording nothing, when any does not. The message
    /// passed the wire limits, but only the task's geometry says which indices exist, and a
    /// table is never grown past it (the download machine, handed the same digests next,
    /// refuses them and fails the download).
    fn record_digests(&mut self, first: u32, digests: &[Sha256], piece_count: u32) -> bool {
        if u64::from(first) + digests.len() as u64 > u64::from(piece_count) {
            return false;
        }
        for (i, d) in (first..).zip(digests) {
            self.set_digest(i, *d);
        }
        true
    }

    fn set_digest(&mut self, i: u32, d: Sha256) {
        let i = i as usize;
        if self.digests.len() <= i {
            self.digests.resize(i + 1, None);
        }
        self.digests[i] = Some(d);
    }

    /// Marks piece `i` stored; false when it already was.
    fn set_stored(&mut self, i: u32) -> bool {
        let i = i as usize;
        if self.stored.len() <= i {
            self.stored.resize(i + 1, false);
        }
        !std::mem::replace(&mut self.stored[i], true)
    }

    fn is_stored(&self, i: u32) -> bool {
        self.stored.get(i as usize).copied().unwrap_or(false)
    }

    fn stored_list(&self) -> Vec<u32> {
        (0..self.stored.len() as u32)
            .filter(|&i| self.is_stored(i))
            .collect()
    }

    /// Every digest, once all pieces of `count` are stored.
    fn all_digests(&self, count: u32) -> Option<Vec<Sha256>> {
        (0..count).map(|i| self.digest(i)).collect()
    }
}

/// A peer as the scheduler knows it, from its `Hello`.
#[derive(Clone)]
struct PeerRef {
    node: NodeId,
    addr: Option<SocketAddr>,
    labels: Labels,
}

/// What is known of a task's ingest, broadcast to every peer that registered it.
#[derive(Clone, Debug, Default)]
struct Progress {
    meta: Option<TaskMeta>,
    /// Pieces stored, with their digests known (a signal for watchers: which ones is in
    /// [`SeedTask::pieces`]).
    available: u32,
    done: Option<Sha256>,
    failed: Option<ErrorMsg>,
}

/// Kept next to a completed task's data, so a restart serves it without the origin.
#[derive(Serialize, Deserialize)]
struct StoredMeta {
    url: String,
    length: u64,
    piece_size: u32,
    sha256: String,
    digests: Vec<String>,
}

impl Supernode {
    /// Binds the endpoint and loads completed tasks from the store.
    pub async fn start(cfg: SupernodeConfig) -> Result<Self, anyhow::Error> {
        let tasks_dir = cfg.data_dir.join("tasks");
        std::fs::create_dir_all(&tasks_dir)
            .map_err(|e| anyhow::anyhow!("cannot create data dir {}: {e}", tasks_dir.display()))?;
        let origin = OriginClient::new(&cfg.origin_cas)?;
        let endpoint = transport::endpoint(&cfg.identity, cfg.listen, true)?;
        let inner = Arc::new(Inner {
            node_id: NodeId(rand::random()),
            pool: ConnPool::new(endpoint.clone()),
            upstream: RwLock::new(Vec::new()),
            labels: cfg.labels,
            origin,
            tasks_dir,
            tasks: Mutex::new(HashMap::new()),
            uploads: Semaphore::new(MAX_CONCURRENT_UPLOADS),
            seed_copies: std::sync::atomic::AtomicU32::new(0),
            ingests: Semaphore::new(MAX_CONCURRENT_INGESTS),
            origin_limiter: RateLimiter::new(cfg.origin_rate),
            metrics: cfg.metrics.clone(),
            handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
            mesh_connections: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            admin_connections: Arc::new(Semaphore::new(MAX_ADMIN_CONNECTIONS)),
            started: Instant::now(),
        });
        let loaded = inner.load_completed();
        info!(loaded, "supernode store loaded");
        Ok(Self { inner, endpoint })
    }

    /// Supernodes to ask before the origin for tasks this one does not have (the next
    /// datacenter up the chain). Empty: straight to the origin.
    pub fn set_upstream(&self, upstream: Vec<SocketAddr>) {
        let me = self.local_addr();
        let list: Vec<SocketAddr> = upstream.into_iter().filter(|a| *a != me).collect();
        if !list.is_empty() {
            info!(upstream = ?list, "supernode chain");
        }
        *self.inner.upstream.write().expect("upstream lock") = list;
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.endpoint
            .local_addr()
            .expect("bound endpoint has an address")
    }

    /// Accepts connections until the endpoint closes.
    pub async fn run(self) {
        while let Some(incoming) = self.endpoint.accept().await {
            let Ok(handshake) = self.inner.handshakes.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let inner = self.inner.clone();
            tokio::spawn(async move {
                let remote = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(conn) => conn,
                    Err(e) => {
                        warn!(%remote, error = %transport::conn_error(remote, e), "handshake refused");
                        return;
                    }
                };
                drop(handshake);
                // Only the negotiated ALPN says which budget the connection takes.
                let admin = transport::alpn(&conn).as_deref() == Some(d7q_wire::ADMIN_ALPN);
                let slots = if admin {
                    &inner.admin_connections
                } else {
                    &inner.mesh_connections
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    // Not a warning: whoever fills the admin budget could flood the log too.
                    debug!(%remote, admin, "refused: too many connections");
                    conn.close(CLOSE_BUSY, b"too many connections");
                    return;
                };
                inner
                    .handle_connection(conn)
                    .instrument(info_span!("conn", %remote))
                    .await;
                drop(permit);
            });
        }
    }

    /// Stops accepting and closes every connection.
    pub fn close(&self) {
        self.endpoint
            .close(close::SHUTDOWN, b"supernode shutting down");
    }
}

impl Inner {
    async fn handle_connection(self: Arc<Self>, conn: quinn::Connection) {
        let remote = conn.remote_address();
        match transport::alpn(&conn).as_deref() {
            Some(a) if a == d7q_wire::ADMIN_ALPN => {
                admin::serve(conn, self.clone()).await;
                return;
            }
            Some(a) if a == d7q_wire::ALPN => {}
            _ => {
                conn.close(close::VERSION, b"unsupported protocol");
                return;
            }
        }
        if !transport::has_peer_certificate(&conn) {
            warn!(%remote, "refused: no client certificate from the cluster CA");
            conn.close(close::NO_CERTIFICATE, b"client certificate required");
            return;
        }
        debug!(%remote, "mesh connection");
        self.metrics.peers_connected().inc();
        self.metrics.mesh_connections_accepted().inc();
        let _connected = Decrement(&self.metrics);
        let mut path = transport::PathWatch::new(remote);
        // Set by the first control stream's Hello: the peer's id, if it uploads to others —
        // which decides whether the seed may send it to them instead (see SeedGate).
        let uploader: Arc<OnceLock<Option<NodeId>>> = Arc::default();
        loop {
            let (send, recv) = match conn.accept_bi().await {
                Ok(s) => s,
                Err(e) => {
                    debug!(error = %transport::conn_error(remote, e), "connection ended");
                    return;
                }
            };
            if let Some(old) = path.handle_remote(conn.remote_address()) {
                self.metrics.mesh_path_changes().inc();
                debug!(%old, new = %conn.remote_address(), "peer address changed");
            }
            let inner = self.clone();
            let conn2 = conn.clone();
            let uploader = uploader.clone();
            tokio::spawn(async move {
                let mut recv = recv;
                match proto::read_kind(&mut recv).await {
                    Ok(d7q_wire::stream_kind::CONTROL) => {
                        if let Err(e) = inner.control_stream(send, recv, &uploader).await {
                            debug!(error = %e, "control stream ended");
                            if matches!(e, ControlError::Version) {
                                conn2.close(close::VERSION, b"protocol version mismatch");
                            } else if matches!(e, ControlError::Protocol(_)) {
                                conn2.close(close::PROTOCOL, b"protocol error");
                            }
                        }
                    }
                    Ok(d7q_wire::stream_kind::PIECE) => {
                        let gated = uploader.get().copied().flatten();
                        inner.piece_stream(send, recv, gated).await
                    }
                    Ok(other) => {
                        debug!(kind = other, "unknown stream kind");
                        conn2.close(close::PROTOCOL, b"unknown stream kind");
                    }
                    Err(e) => debug!(error = %e, "stream without a kind"),
                }
            });
        }
    }

    async fn control_stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        uploader: &OnceLock<Option<NodeId>>,
    ) -> Result<(), ControlError> {
        let mut recv = proto::FrameReader::new(recv);
        // A member that opens the stream and says nothing loses it within the deadline.
        let hello = match recv.expect_within::<Control>(proto::HELLO_TIMEOUT).await? {
            Control::Hello(h) => h,
            other => {
                return Err(ControlError::Protocol(format!(
                    "expected Hello, got {other:?}"
                )))
            }
        };
        if hello.major != d7q_wire::MAJOR_VERSION {
            let _ = proto::write_msg(
                &mut send,
                &Control::Error(error_msg(
                    None,
                    ErrorCode::VersionMismatch,
                    "protocol version mismatch",
                )),
            )
            .await;
            // Closing the connection discards unsent data: let the error reach the peer first.
            let _ = send.finish();
            let _ = tokio::time::timeout(proto::REQUEST_TIMEOUT, send.stopped()).await;
            return Err(ControlError::Version);
        }
        proto::write_msg(
            &mut send,
            &Control::HelloAck(HelloAck {
                major: d7q_wire::MAJOR_VERSION,
                minor: d7q_wire::MINOR_VERSION,
                node_id: self.node_id,
                labels: self.labels.clone(),
                capabilities: Capabilities(Capabilities::SEED | Capabilities::UPLOAD),
            }),
        )
        .await?;
        // One writer owns the send half; task watchers queue messages to it.
        let (tx, mut rx) = mpsc::channel::<Control>(CONTROL_QUEUE);
        let writer = tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if proto::write_msg(&mut send, &msg).await.is_err() {
                    break;
                }
            }
            let _ = send.finish();
        });
        let mut watchers = tokio::task::JoinSet::new();
        let mut registered: Vec<Arc<SeedTask>> = Vec::new();
        let _ = uploader.set(hello.upload_addr.is_some().then_some(hello.node_id));
        let peer = PeerRef {
            node: hello.node_id,
            addr: hello.upload_addr,
            labels: hello.labels.clone(),
        };
        let result = loop {
            let msg = match recv.next::<Control>().await {
                Ok(Some(m)) => m,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e.into()),
            };
            match msg {
                Control::Register(_) | Control::Announce(_)
                    if registered.len() >= MAX_TASKS_PER_STREAM =>
                {
                    let err = error_msg(
                        None,
                        ErrorCode::Overloaded,
                        "too many tasks on one control stream",
                    );
                    let _ = tx.send(Control::Error(err)).await;
                    break Ok(());
                }
                Control::Register(reg) => match self.register(reg) {
                    Ok(task) => {
                        registered.push(task.clone());
                        watchers.spawn(watch_task(task, tx.clone(), peer.clone()));
                    }
                    Err(err) => {
                        if tx.send(*err).await.is_err() {
                            break Ok(());
                        }
                    }
                },
                Control::Goodbye(_) => break Ok(()),
                Control::Have(h) => {
                    if let Some(t) = registered.iter().find(|t| t.id == h.task) {
                        t.with_swarm(|s| s.handle_have(peer.node, &h.pieces));
                    }
                }
                Control::Bitmap(b) => {
                    if let Some(t) = registered.iter().find(|t| t.id == b.task) {
                        t.with_swarm(|s| s.handle_bitmap(peer.node, &b.bitmap));
                    }
                }
                Control::Announce(b) => {
                    // A holder offering what it kept; it never starts an origin download.
                    let t = self.tasks.lock().expect("tasks lock").get(&b.task).cloned();
                    let Some(t) = t else { continue };
                    let fits = t
                        .progress
                        .borrow()
                        .meta
                        .is_some_and(|m| m.piece_count == b.bitmap.len());
                    if fits {
                        t.with_swarm(|s| {
                            s.handle_join(
                                peer.node,
                                peer.addr,
                                peer.labels.clone(),
                                Instant::now(),
                            );
                            s.handle_bitmap(peer.node, &b.bitmap);
                        });
                        registered.push(t);
                    }
                }
                Control::BadPeer(r) => {
                    if let Some(t) = registered.iter().find(|t| t.id == r.task) {
                        warn!(reporter = %peer.node, suspect = %r.peer, reason = ?r.reason, "bad peer reported");
                        t.with_swarm(|s| {
                            s.handle_report(peer.node, r.peer, r.reason, Instant::now())
                        });
                    }
                }
                other => {
                    break Err(ControlError::Protocol(format!(
                        "unexpected message {other:?}"
                    )))
                }
            }
        };
        watchers.abort_all();
        for t in &registered {
            t.with_swarm(|s| s.handle_leave(peer.node));
        }
        drop(tx);
        let _ = writer.await;
        result
    }

    /// Validates a registration and returns the task, starting its ingest if it is new.
    fn register(self: &Arc<Self>, reg: Register) -> Result<Arc<SeedTask>, Box<Control>> {
        let bad = |m: &str| {
            Box::new(Control::Error(error_msg(
                Some(reg.task),
                ErrorCode::BadRequest,
                m,
            )))
        };
        // Sizes were bounded when the message was decoded (d7q_wire::Bounded).
        if !(reg.url.starts_with("https://") || reg.url.starts_with("http://")) {
            return Err(bad("URL must be http:// or https://"));
        }
        if let Some(r) = reg.range {
            if r.end <= r.start {
                return Err(bad("empty range"));
            }
        }
        let id = task::task_id(&reg.url, reg.digest.as_ref(), reg.range);
        if id != reg.task {
            return Err(bad("task id does not match the URL, digest and range"));
        }
        let mut tasks = self.tasks.lock().expect("tasks lock");
        if let Some(t) = tasks.get(&id) {
            return Ok(t.clone());
        }
        let shown_url = reg.url.split('?').next().unwrap_or_default().to_string();
        let task = Arc::new(SeedTask {
            id,
            shown_url,
            progress: watch::channel(Progress::default()).0,
            pieces: Mutex::new(Pieces::default()),
            file: Mutex::new(None),
            swarm: Mutex::new(None),
        });
        tasks.insert(id, task.clone());
        drop(tasks);
        let inner = self.clone();
        let t = task.clone();
        tokio::spawn(
            async move { inner.ingest(t, reg).await }.instrument(info_span!("ingest", task = %id)),
        );
        Ok(task)
    }

    async fn ingest(self: Arc<Self>, task: Arc<SeedTask>, reg: Register) {
        let data_path = self.tasks_dir.join(format!("{}.data", task.id));
        // Bounded: each ingest holds piece buffers and an origin connection.
        let _permit = self.ingests.acquire().await;
        self.metrics.tasks(TaskState::Running).inc();
        let upstream = self.upstream.read().expect("upstream lock").clone();
        let mut result = Err(error_msg(Some(task.id), ErrorCode::Internal, "not fetched"));
        if !upstream.is_empty() {
            info!(url = %task.shown_url, "seeding from upstream supernodes");
            result = self
                .ingest_upstream(&task, &reg, &upstream, &data_path)
                .await;
            if let Err(e) = &result {
                warn!(error = %e.message, "upstream supernodes failed; going to the origin");
            }
        }
        if result.is_err() {
            info!(url = %task.shown_url, "seeding from origin");
            result = self
                .ingest_inner(
                    &task,
                    &reg.url,
                    &reg.headers,
                    reg.digest,
                    reg.range,
                    &data_path,
                )
                .await;
        }
        self.metrics.tasks(TaskState::Running).dec();
        let state = if result.is_ok() {
            TaskState::Complete
        } else {
            TaskState::Failed
        };
        self.metrics.tasks(state).inc();
        match result {
            Ok(sha) => {
                info!(sha = %task::format_digest(&sha), "task complete");
                task.progress.send_modify(|p| p.done = Some(sha));
            }
            Err(err) => {
                warn!(error = %err.message, "task failed");
                // Tell the registered peers first, so they hear the reason before any piece
                // request meets an unknown task; then forget the task so a new registration
                // starts over, and drop its data.
                task.progress.send_modify(|p| p.failed = Some(err));
                {
                    let mut tasks = self.tasks.lock().expect("tasks lock");
                    if tasks.get(&task.id).is_some_and(|t| Arc::ptr_eq(t, &task)) {
                        tasks.remove(&task.id);
                    }
                }
                task.file.lock().expect("file lock").take();
                let _ = std::fs::remove_file(&data_path);
                let _ = std::fs::remove_file(meta_path(&data_path));
            }
        }
    }

    async fn ingest_inner(
        &self,
        task: &Arc<SeedTask>,
        url: &str,
        headers: &[(String, String)],
        expected: Option<Sha256>,
        range: Option<ByteRange>,
        data_path: &Path,
    ) -> Result<Sha256, ErrorMsg> {
        let id = task.id;
        self.metrics.origin_requests().inc();
        let mut resp = self
            .origin
            .fetch(url, headers, range)
            .await
            .map_err(|e| origin_error(id, e))?;
        let geometry = match resp.length {
            Some(len) => Some(
                Geometry::for_length(len)
                    .map_err(|e| error_msg(Some(id), ErrorCode::TooLarge, &e.to_string()))?,
            ),
            None => None,
        };
        let published = task.progress.borrow().meta;
        let kept = task.file.lock().expect("file lock").clone();
        let file = match (published, kept) {
            // An upstream supernode got part of it: keep those pieces (each is checked again
            // against what the origin sends now).
            (Some(m), Some(f)) if geometry.is_some_and(|g| meta(id, g) == m) => f,
            (Some(_), _) => return Err(changed(id)),
            (None, _) => {
                store::check_free_space(&self.tasks_dir, resp.length.unwrap_or(0))
                    .map_err(|e| store_error(id, e))?;
                let _ = std::fs::remove_file(data_path);
                let file = Arc::new(
                    DataFile::create(data_path, resp.length.unwrap_or(0))
                        .map_err(|e| store_error(id, e))?,
                );
                *task.file.lock().expect("file lock") = Some(file.clone());
                file
            }
        };
        let piece_size = geometry.map(|g| g.piece_size).unwrap_or(MIN_PIECE_SIZE);
        if let Some(g) = geometry {
            task.progress.send_modify(|p| p.meta = Some(meta(id, g)));
        }

        // The writer thread hashes and stores pieces while this task keeps reading the network.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(INGEST_QUEUE_PIECES);
        let writer_task = task.clone();
        let writer_file = file.clone();
        let writer = tokio::task::spawn_blocking(move || {
            write_pieces(rx, writer_file, writer_task, piece_size as u64)
        });
        let mut buf = BytesMut::with_capacity(piece_size as usize);
        let mut total: u64 = 0;
        let read_result: Result<(), ErrorMsg> = async {
            while let Some(mut chunk) = resp.chunk().await.map_err(|e| origin_error(id, e))? {
                total += chunk.len() as u64;
                self.metrics.origin_bytes().add(chunk.len() as u64);
                self.metrics
                    .download_bytes(Source::Origin)
                    .add(chunk.len() as u64);
                self.origin_limiter.acquire(chunk.len() as u64).await;
                if total > task::MAX_CONTENT_LENGTH {
                    return Err(error_msg(
                        Some(id),
                        ErrorCode::TooLarge,
                        "origin content exceeds the mesh limit",
                    ));
                }
                while !chunk.is_empty() {
                    let take = (piece_size as usize - buf.len()).min(chunk.len());
                    buf.extend_from_slice(&chunk.split_to(take));
                    if buf.len() == piece_size as usize {
                        let piece = buf.split().freeze();
                        buf.reserve(piece_size as usize);
                        let tx = tx.clone();
                        // A bounded channel: when the disk is slower than the network, the
                        // network read waits here (on the blocking pool, not the runtime).
                        tokio::task::spawn_blocking(move || tx.send(piece))
                            .await
                            .map_err(|_| {
                                error_msg(Some(id), ErrorCode::Internal, "piece writer failed")
                            })?
                            .map_err(|_| {
                                error_msg(Some(id), ErrorCode::Internal, "piece writer failed")
                            })?;
                    }
                }
            }
            Ok(())
        }
        .await;
        if read_result.is_ok() && !buf.is_empty() {
            let _ = tx.send(buf.split().freeze());
        }
        drop(tx);
        let written = writer
            .await
            .map_err(|_| error_msg(Some(id), ErrorCode::Internal, "piece writer panicked"))?;
        read_result?;
        let (sha, stored) = written?;
        if stored != total {
            return Err(error_msg(
                Some(id),
                ErrorCode::Internal,
                "stored length differs from received length",
            ));
        }
        if let Some(want) = expected {
            if want != sha {
                return Err(error_msg(
                    Some(id),
                    ErrorCode::DigestMismatch,
                    &format!(
                        "digest mismatch: expected {}, origin content is {}",
                        task::format_digest(&want),
                        task::format_digest(&sha)
                    ),
                ));
            }
        }
        if geometry.is_none() {
            // Unknown length until now: the pieces were cut at the minimum size.
            let g = Geometry::new(total, piece_size)
                .map_err(|e| error_msg(Some(id), ErrorCode::TooLarge, &e.to_string()))?;
            task.progress.send_modify(|p| p.meta = Some(meta(id, g)));
        }
        file.sync().map_err(|e| store_error(id, e))?;
        let count = task.progress.borrow().meta.map_or(0, |m| m.piece_count);
        let digests = task
            .pieces
            .lock()
            .expect("pieces lock")
            .all_digests(count)
            .ok_or_else(|| error_msg(Some(id), ErrorCode::Internal, "a piece is missing"))?;
        self.save_meta(task, total, piece_size, sha, &digests, data_path)?;
        Ok(sha)
    }

    /// Writes a completed task's metadata next to its data, so a restart serves it.
    fn save_meta(
        &self,
        task: &SeedTask,
        total: u64,
        piece_size: u32,
        sha: Sha256,
        digests: &[Sha256],
        data_path: &Path,
    ) -> Result<(), ErrorMsg> {
        let id = task.id;
        let stored_meta = StoredMeta {
            url: task.shown_url.clone(),
            length: total,
            piece_size,
            sha256: task::format_digest(&sha),
            digests: digests.iter().map(task::format_digest).collect(),
        };
        let json = serde_json::to_vec(&stored_meta).expect("meta serializes");
        let tmp = meta_path(data_path).with_extension("tmp");
        std::fs::write(&tmp, json)
            .and_then(|_| std::fs::rename(&tmp, meta_path(data_path)))
            .map_err(|e| {
                store_error(
                    id,
                    StoreError::Io {
                        path: tmp.clone(),
                        source: e,
                    },
                )
            })?;
        Ok(())
    }

    /// Fetches the task through the upstream supernodes, as a downloader of theirs: every piece
    /// is verified against their digests (which they learnt from the origin) and served here as
    /// soon as it is stored.
    async fn ingest_upstream(
        &self,
        task: &Arc<SeedTask>,
        reg: &Register,
        upstream: &[SocketAddr],
        data_path: &Path,
    ) -> Result<Sha256, ErrorMsg> {
        let id = task.id;
        let sink_task = task.clone();
        let tasks_dir = self.tasks_dir.clone();
        let path = data_path.to_path_buf();
        let make_sink: engine::SinkFactory = Box::new(move |g: Geometry| {
            store::check_free_space(&tasks_dir, g.length)?;
            let _ = std::fs::remove_file(&path);
            let file = Arc::new(DataFile::create(&path, g.length)?);
            *sink_task.file.lock().expect("file lock") = Some(file.clone());
            sink_task
                .progress
                .send_modify(|p| p.meta = Some(meta(sink_task.id, g)));
            Ok(Arc::new(ChainSink {
                task: sink_task,
                file,
                geometry: g,
            }) as Arc<dyn PieceSink>)
        });
        // No upload address: the upstream's scheduler never hands this node out to its peers,
        // and its seed does not hold pieces back from it ("busy"), since nothing here serves
        // the upstream's swarm.
        let cfg = EngineConfig {
            node_id: self.node_id,
            labels: self.labels.clone(),
            metrics: Some(self.metrics.clone()),
            ..EngineConfig::downloader()
        };
        let outcome = engine::download(&self.pool, upstream, reg.clone(), cfg, make_sink, None)
            .await
            .map_err(|e| error_msg(Some(id), ErrorCode::Internal, &format!("upstream: {e}")))?;
        let g = outcome.geometry;
        let file = task
            .file
            .lock()
            .expect("file lock")
            .clone()
            .ok_or_else(|| error_msg(Some(id), ErrorCode::Internal, "no data file"))?;
        file.sync().map_err(|e| store_error(id, e))?;
        let digests = task
            .pieces
            .lock()
            .expect("pieces lock")
            .all_digests(g.piece_count)
            .ok_or_else(|| error_msg(Some(id), ErrorCode::Internal, "a piece is missing"))?;
        self.save_meta(
            task,
            g.length,
            g.piece_size,
            outcome.sha256,
            &digests,
            data_path,
        )?;
        Ok(outcome.sha256)
    }

    async fn piece_stream(
        self: Arc<Self>,
        mut send: quinn::SendStream,
        recv: quinn::RecvStream,
        gated: Option<NodeId>,
    ) {
        // Kept to the end: the request's stream stays open while the answer goes out.
        let mut recv = proto::FrameReader::new(recv);
        let req = match recv
            .expect_within::<PieceRequest>(proto::REQUEST_TIMEOUT)
            .await
        {
            Ok(r) => r,
            _ => {
                let _ = send
                    .write_all(&PieceHeader::refuse(PieceStatus::BadRequest).encode())
                    .await;
                let _ = send.finish();
                return;
            }
        };
        let (header, body, passed) = self.read_piece(req, gated).await;
        let delivered = send_answer(&mut send, &header, body).await;
        if passed {
            self.gate_sent(req, delivered);
        }
    }

    /// Tells the task's seed gate how a copy it let through ended.
    fn gate_sent(&self, req: PieceRequest, delivered: bool) {
        self.seed_copy_ended();
        let task = self
            .tasks
            .lock()
            .expect("tasks lock")
            .get(&req.task)
            .cloned();
        if let Some(task) = task {
            let now = Instant::now();
            task.with_sched(|s| s.gate.handle_sent(req.index, delivered, now));
        }
    }

    /// One copy a seed gate let through ended, however.
    fn seed_copy_ended(&self) {
        let _ = self
            .seed_copies
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Reads a piece for a request; `gated` names an uploading requester, whom the seed may
    /// send to its peers instead. The flag says whether the seed gate let this copy through
    /// (then [`Self::gate_sent`] must follow).
    async fn read_piece(
        &self,
        req: PieceRequest,
        gated: Option<NodeId>,
    ) -> (PieceHeader, Option<Bytes>, bool) {
        let task = self
            .tasks
            .lock()
            .expect("tasks lock")
            .get(&req.task)
            .cloned();
        let Some(task) = task else {
            return (PieceHeader::refuse(PieceStatus::UnknownTask), None, false);
        };
        let meta = task.progress.borrow().meta;
        let stored = task
            .pieces
            .lock()
            .expect("pieces lock")
            .is_stored(req.index);
        let (Some(meta), true) = (meta, stored) else {
            return (PieceHeader::refuse(PieceStatus::NotAvailable), None, false);
        };
        let Some(file) = task.file.lock().expect("file lock").clone() else {
            return (PieceHeader::refuse(PieceStatus::NotAvailable), None, false);
        };
        let Ok(g) = Geometry::checked(meta.length, meta.piece_size, meta.piece_count) else {
            return (PieceHeader::refuse(PieceStatus::Internal), None, false);
        };
        let mut passed = false;
        if let Some(requester) = gated {
            let now = Instant::now();
            let decision = task.with_sched(|s| {
                let holders = s.swarm.availability(req.index);
                let all = self.seed_copies.load(Ordering::Relaxed);
                let elsewhere = all.saturating_sub(s.gate.in_flight());
                let d = s
                    .gate
                    .handle_request_among(requester, req.index, holders, elsewhere, now);
                if d.serves() {
                    self.seed_copies.fetch_add(1, Ordering::Relaxed);
                }
                d
            });
            if let Some(d) = decision {
                self.metrics.seed_decisions(d).inc();
                if !d.serves() {
                    let status = match d {
                        Decision::Saturated => PieceStatus::Saturated,
                        _ => PieceStatus::Busy,
                    };
                    return (PieceHeader::refuse(status), None, false);
                }
                passed = true;
            }
        }
        let refuse = |status| {
            if passed {
                let now = Instant::now();
                task.with_sched(|s| s.gate.handle_sent(req.index, false, now));
                self.seed_copy_ended();
            }
            (PieceHeader::refuse(status), None, false)
        };
        let Ok(_permit) = self.uploads.acquire().await else {
            return refuse(PieceStatus::Busy);
        };
        let (off, len) = (g.offset(req.index), g.piece_len(req.index));
        match tokio::task::spawn_blocking(move || file.read_at(off, len as usize)).await {
            Ok(Ok(bytes)) => {
                self.metrics.pieces_served().inc();
                self.metrics.upload_bytes().add(len as u64);
                (PieceHeader::ok(len), Some(Bytes::from(bytes)), passed)
            }
            _ => refuse(PieceStatus::Internal),
        }
    }

    /// Loads tasks completed by an earlier run; returns how many.
    fn load_completed(&self) -> usize {
        let Ok(dir) = std::fs::read_dir(&self.tasks_dir) else {
            return 0;
        };
        let mut n = 0;
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "tmp" || e == "part") {
                let _ = std::fs::remove_file(&path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "meta") {
                continue;
            }
            match self.load_one(&path) {
                Some(t) => {
                    self.tasks
                        .lock()
                        .expect("tasks lock")
                        .insert(t.id, Arc::new(t));
                    n += 1;
                }
                None => {
                    warn!(path = %path.display(), "dropping unreadable task metadata");
                    let _ = std::fs::remove_file(&path);
                    let _ = std::fs::remove_file(path.with_extension("data"));
                }
            }
        }
        // Data without metadata is an ingest that never finished.
        if let Ok(dir) = std::fs::read_dir(&self.tasks_dir) {
            for entry in dir.flatten() {
                let p = entry.path();
                if p.extension().is_some_and(|e| e == "data") && !p.with_extension("meta").exists()
                {
                    let _ = std::fs::remove_file(&p);
                }
            }
        }
        n
    }

    fn load_one(&self, path: &Path) -> Option<SeedTask> {
        let stem = path.file_stem()?.to_str()?;
        let mut id = [0u8; 16];
        if stem.len() != 32 {
            return None;
        }
        for (i, c) in stem.as_bytes().chunks(2).enumerate() {
            id[i] = u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()?;
        }
        let id = TaskId(id);
        let m: StoredMeta = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
        let g = Geometry::new(m.length, m.piece_size).ok()?;
        let digests: Vec<Sha256> = m
            .digests
            .iter()
            .map(|d| task::parse_digest(d))
            .collect::<Option<_>>()?;
        if digests.len() != g.piece_count as usize {
            return None;
        }
        let sha = task::parse_digest(&m.sha256)?;
        let file = DataFile::open(&path.with_extension("data")).ok()?;
        let progress = Progress {
            meta: Some(meta(id, g)),
            available: g.piece_count,
            done: Some(sha),
            failed: None,
        };
        Some(SeedTask {
            id,
            shown_url: m.url,
            progress: watch::channel(progress).0,
            pieces: Mutex::new(Pieces::complete(digests)),
            file: Mutex::new(Some(Arc::new(file))),
            swarm: Mutex::new(None),
        })
    }
}

/// Admin view of the supernode.
impl admin::StatusSource for Inner {
    fn status(&self) -> admin::Status {
        let tasks = self.tasks.lock().expect("tasks lock");
        let mut list: Vec<admin::TaskStatus> = tasks
            .values()
            .map(|t| {
                let p = t.progress.borrow();
                admin::TaskStatus {
                    id: t.id.to_string(),
                    url: t.shown_url.clone(),
                    length: p.meta.map(|m| m.length),
                    piece_count: p.meta.map(|m| m.piece_count),
                    pieces_done: p.available,
                    state: if p.failed.is_some() {
                        "failed"
                    } else if p.done.is_some() {
                        "complete"
                    } else {
                        "seeding"
                    }
                    .into(),
                    sha256: p.done.as_ref().map(task::format_digest),
                }
            })
            .collect();
        list.sort_by(|a, b| a.id.cmp(&b.id));
        admin::Status {
            node: admin::NodeStatus {
                role: "supernode".into(),
                node_id: self.node_id.to_string(),
                labels: self.labels.clone(),
                uptime_secs: self.started.elapsed().as_secs(),
            },
            tasks: list,
        }
    }
}

/// Streams a task's progress to one peer — metadata, digests as pieces land, the end — and,
/// for as long as the peer stays, its parents as the swarm changes.
async fn watch_task(task: Arc<SeedTask>, tx: mpsc::Sender<Control>, peer: PeerRef) {
    let mut rx = task.progress.subscribe();
    let mut sent_meta = false;
    // Which pieces' digests this peer has (only stored pieces are announced: a digest is an
    // offer to serve).
    let mut announced: Vec<bool> = Vec::new();
    let mut sent: u32 = 0;
    let mut seeding = true;
    let mut last_parents: Vec<NodeId> = Vec::new();
    let mut tick = tokio::time::interval(PARENTS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if seeding {
            let p = rx.borrow_and_update().clone();
            if let Some(err) = p.failed {
                let _ = tx.send(Control::Error(err)).await;
                return;
            }
            if let Some(m) = p.meta {
                if !sent_meta {
                    if tx.send(Control::TaskMeta(m)).await.is_err() {
                        return;
                    }
                    sent_meta = true;
                    task.with_swarm(|s| {
                        s.handle_join(peer.node, peer.addr, peer.labels.clone(), Instant::now())
                    });
                }
                if sent < p.available {
                    let runs = new_runs(&task, &mut announced);
                    for (first, digests) in runs {
                        sent += digests.len() as u32;
                        let msg = Control::PieceDigests(PieceDigests {
                            task: task.id,
                            first,
                            digests,
                        });
                        if tx.send(msg).await.is_err() {
                            return;
                        }
                    }
                }
                if let Some(sha) = p.done {
                    if sent == m.piece_count {
                        let done = TaskComplete {
                            task: task.id,
                            length: m.length,
                            sha256: sha,
                        };
                        if tx.send(Control::TaskComplete(done)).await.is_err() {
                            return;
                        }
                        seeding = false;
                    }
                }
            }
        }
        tokio::select! {
            changed = rx.changed(), if seeding => {
                if changed.is_err() {
                    seeding = false;
                }
            }
            _ = tick.tick(), if sent_meta => {
                let parents = task.with_swarm(|s| s.poll_parents(peer.node, Instant::now())).unwrap_or_default();
                let ids: Vec<NodeId> = parents.iter().map(|p| p.node_id).collect();
                if ids != last_parents {
                    last_parents = ids;
                    if tx.send(Control::Parents(Parents { task: task.id, parents })).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

/// Stored pieces whose digests `announced` lacks, as runs of consecutive pieces of at most
/// [`MAX_DIGESTS_PER_MESSAGE`]; marks them announced.
fn new_runs(task: &SeedTask, announced: &mut Vec<bool>) -> Vec<(u32, Vec<Sha256>)> {
    let pieces = task.pieces.lock().expect("pieces lock");
    let n = pieces.stored.len();
    if announced.len() < n {
        announced.resize(n, false);
    }
    let mut runs: Vec<(u32, Vec<Sha256>)> = Vec::new();
    for i in 0..n as u32 {
        if announced[i as usize] || !pieces.is_stored(i) {
            continue;
        }
        let Some(d) = pieces.digest(i) else { continue };
        announced[i as usize] = true;
        match runs.last_mut() {
            Some((first, ds))
                if *first + ds.len() as u32 == i && ds.len() < MAX_DIGESTS_PER_MESSAGE =>
            {
                ds.push(d)
            }
            _ => runs.push((i, vec![d])),
        }
    }
    runs
}

/// The disk half of an origin ingest: hash each piece and the whole, store, publish.
fn write_pieces(
    rx: std::sync::mpsc::Receiver<Bytes>,
    file: Arc<DataFile>,
    task: Arc<SeedTask>,
    piece_size: u64,
) -> Result<(Sha256, u64), ErrorMsg> {
    let id = task.id;
    let mut whole = sha2::Sha256::new();
    let mut index: u64 = 0;
    let mut stored: u64 = 0;
    while let Ok(piece) = rx.recv() {
        whole.update(&piece);
        let digest: Sha256 = sha2::Sha256::digest(&piece).into();
        file.write_at(index * piece_size, &piece)
            .map_err(|e| store_error(id, e))?;
        stored += piece.len() as u64;
        // A piece is served only once it is on disk and its digest is known.
        task.store_piece(index as u32, digest)
            .map_err(|_| changed(id))?;
        index += 1;
    }
    Ok((whole.finalize().into(), stored))
}

/// Where pieces fetched from an upstream supernode go: the task's data file, and from there
/// straight to this supernode's peers.
struct ChainSink {
    task: Arc<SeedTask>,
    file: Arc<DataFile>,
    geometry: Geometry,
}

impl PieceSink for ChainSink {
    fn write_piece(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        self.file.write_at(self.geometry.offset(index), bytes)?;
        let known = self.task.pieces.lock().expect("pieces lock").digest(index);
        // The engine verified the bytes against the upstream's digest before handing them on.
        let digest = known.unwrap_or_else(|| sha2::Sha256::digest(bytes).into());
        self.task
            .store_piece(index, digest)
            .map_err(|i| StoreError::Io {
                path: PathBuf::from(format!("piece {i}")),
                source: std::io::Error::other("the content changed during the download"),
            })
    }

    fn read_piece(&self, index: u32) -> Result<Vec<u8>, StoreError> {
        let (off, len) = (
            self.geometry.offset(index),
            self.geometry.piece_len(index) as usize,
        );
        self.file.read_at(off, len)
    }

    fn record_digests(&self, first: u32, digests: &[Sha256]) {
        let pieces = self.geometry.piece_count;
        let fits = self
            .task
            .pieces
            .lock()
            .expect("pieces lock")
            .record_digests(first, digests, pieces);
        if !fits {
            warn!(
                task = %self.task.id,
                first,
                count = digests.len(),
                pieces,
                "upstream sent digests past the last piece; ignored"
            );
        }
    }
}

/// The origin's content differs from what was published for the task before.
fn changed(task: TaskId) -> ErrorMsg {
    error_msg(
        Some(task),
        ErrorCode::DigestMismatch,
        "the content changed at the origin during the download",
    )
}

fn meta(task: TaskId, g: Geometry) -> TaskMeta {
    TaskMeta {
        task,
        length: g.length,
        piece_size: g.piece_size,
        piece_count: g.piece_count,
    }
}

fn meta_path(data: &Path) -> PathBuf {
    data.with_extension("meta")
}

fn error_msg(task: Option<TaskId>, code: ErrorCode, message: &str) -> ErrorMsg {
    ErrorMsg {
        task,
        code,
        origin_status: None,
        message: message.chars().take(MAX_STRING_LEN / 4).collect(),
    }
}

fn origin_error(task: TaskId, e: OriginError) -> ErrorMsg {
    let (code, status) = match &e {
        OriginError::Status { status, .. } => (ErrorCode::OriginStatus, Some(*status)),
        OriginError::Unreachable { .. } => (ErrorCode::OriginUnreachable, None),
        OriginError::Truncated { .. } => (ErrorCode::OriginTruncated, None),
        OriginError::Invalid(_) => (ErrorCode::OriginUnreachable, None),
    };
    ErrorMsg {
        origin_status: status,
        ..error_msg(Some(task), code, &e.to_string())
    }
}

fn store_error(task: TaskId, e: StoreError) -> ErrorMsg {
    let code = if matches!(e, StoreError::NoSpace { .. }) {
        ErrorCode::NoSpace
    } else {
        ErrorCode::Internal
    };
    error_msg(Some(task), code, &format!("supernode storage: {e}"))
}

/// Why a control stream ended badly.
#[derive(Debug, thiserror::Error)]
enum ControlError {
    #[error(transparent)]
    Proto(#[from] proto::ProtoError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("protocol version mismatch")]
    Version,
}

impl From<MeshError> for ControlError {
    fn from(e: MeshError) -> Self {
        ControlError::Protocol(e.to_string())
    }
}

/// Decrements the connected-peers gauge when a connection handler ends, however it ends.
struct Decrement<'a>(&'a Metrics);

impl Drop for Decrement<'_> {
    fn drop(&mut self) {
        self.0.peers_connected().dec();
    }
}

/// Writes a piece stream's answer; whether the peer received all of it (the stream finished and
/// acknowledged), as opposed to a broken or stopped stream.
async fn send_answer(
    send: &mut quinn::SendStream,
    header: &PieceHeader,
    body: Option<Bytes>,
) -> bool {
    let sent = tokio::time::timeout(proto::PIECE_SEND_TIMEOUT, send_all(send, header, body));
    match sent.await {
        Ok(delivered) => delivered,
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(0));
            false
        }
    }
}

async fn send_all(send: &mut quinn::SendStream, header: &PieceHeader, body: Option<Bytes>) -> bool {
    if send.write_all(&header.encode()).await.is_err() {
        return false;
    }
    if let Some(body) = body {
        if send.write_chunk(body).await.is_err() {
            return false;
        }
    }
    if send.finish().is_err() {
        return false;
    }
    // Keep the stream until the peer has read it all, or gave up.
    matches!(send.stopped().await, Ok(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_digests_past_the_last_piece_are_refused_without_allocating() {
        let mut p = Pieces::default();
        assert!(
            !p.record_digests(u32::MAX, &[[1; 32]; 2], 4),
            "overflowing first"
        );
        assert!(!p.record_digests(3, &[[1; 32]; 2], 4), "one past the end");
        assert!(p.digests.is_empty(), "nothing recorded or allocated");
        assert!(p.record_digests(2, &[[1; 32]; 2], 4));
        assert_eq!((p.digest(3), p.digests.len()), (Some([1; 32]), 4));
    }
}
