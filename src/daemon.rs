//! `d7q daemon`: the long-running per-host peer. It downloads for local clients (`d7q get`
//! through its socket), keeps a content store, and uploads verified pieces to other peers —
//! while its own download is still running. A restart resumes half-done tasks from their
//! metadata and serves what the store already holds.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use d7q_wire::{Bitmap, Labels, NodeId, Register, Sha256, TaskId};
use tokio::sync::{broadcast, mpsc, watch};
use tracing::{info, info_span, warn, Instrument};

use crate::blobs::{self, Blob, BlobError, BlobRequest, BlobSource, MeshBlobs};
use crate::engine::{self, ConnPool, EngineConfig, PieceSink};
use crate::metrics::{Metrics, Role, TaskState};
use crate::peer::GetError;
use crate::pki::NodeIdentity;
use crate::ratelimit::RateLimiter;
use crate::store::gc::{DiskUsage, GcConfig, Watermark as GcWatermark};
use crate::store::tasks::{PinGuard, TaskEntry, TaskStore};
use crate::store::StoreError;
use crate::task::{self, Geometry};
use crate::upload::{self, PieceStore, UploadConfig};
use crate::{admin, config, exit, local, transport};

/// Capacity of a task's `Have` feed toward subscribed children; a child that falls further
/// behind gets the whole bitmap again.
pub const HAVE_FEED: usize = 1024;

/// How to run a daemon.
#[derive(Clone)]
pub struct DaemonConfig {
    /// UDP address of the QUIC mesh (uploads, admin API).
    pub listen: SocketAddr,
    /// The address other peers dial for uploads, when `listen` is not reachable as is.
    pub advertise: Option<SocketAddr>,
    /// TCP address of the HTTP side (`/metrics`; the proxy later).
    pub proxy: SocketAddr,
    /// Content store.
    pub data_dir: PathBuf,
    /// Node identity in the cluster.
    pub identity: NodeIdentity,
    /// Supernodes.
    pub supernodes: Vec<SocketAddr>,
    /// Local API socket.
    pub socket: PathBuf,
    /// Locality labels.
    pub labels: Labels,
    /// Machine-wide upload budget, bytes/s (0: unlimited).
    pub upload_rate: u64,
    /// Machine-wide download budget, bytes/s (0: unlimited).
    pub download_rate: u64,
    /// Budget of each single download, bytes/s (0: unlimited).
    pub per_download_rate: u64,
    /// Test-only: serve corrupt pieces.
    pub danger_corrupt_uploads: bool,
    /// Garbage collection of the store.
    pub gc: GcSettings,
    /// Registries the proxy intercepts (`--registry` patterns).
    pub registries: Vec<String>,
    /// Proxy CA directory; `None`: `DATA_DIR/proxy-ca`, created on first start.
    pub proxy_ca: Option<PathBuf>,
    /// Extra CAs trusted for registries (`--origin-ca`).
    pub origin_ca: Vec<PathBuf>,
    /// The registry mirror's default upstream (`--mirror-upstream`).
    pub mirror_upstream: String,
    /// `--proxy-allow`: where the proxy may connect beyond its defaults.
    pub proxy_allow: Vec<crate::proxy::policy::Allow>,
    /// `--metrics`: a TCP address of its own for `/metrics` and `/health`, which then leave the
    /// proxy port; `None`: the proxy port serves them.
    pub metrics: Option<SocketAddr>,
}

/// When the daemon's store is collected.
#[derive(Clone, Debug)]
pub struct GcSettings {
    /// Collection starts above this.
    pub high_watermark: config::Watermark,
    /// Collection stops at or below this.
    pub low_watermark: config::Watermark,
    /// Content unused for this long goes.
    pub ttl: Duration,
}

impl Default for GcSettings {
    fn default() -> Self {
        Self {
            high_watermark: config::defaults::HIGH_WATERMARK,
            low_watermark: config::defaults::LOW_WATERMARK,
            ttl: config::defaults::TTL,
        }
    }
}

/// Connections from other nodes served at once.
pub const MAX_PEER_CONNECTIONS: usize = 1024;
/// Complete tasks offered to their swarms after a restart, most recently used first.
pub const MAX_ANNOUNCED: usize = 256;
/// How often running downloads' metadata is saved.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How often the store is checked against the watermarks and the TTL.
pub const GC_INTERVAL: Duration = Duration::from_secs(60);

/// A running daemon.
pub struct Daemon {
    inner: Arc<Inner>,
    mesh: SocketAddr,
    proxy: SocketAddr,
    metrics_addr: Option<SocketAddr>,
}

struct Inner {
    cfg: DaemonConfig,
    node_id: NodeId,
    store: TaskStore,
    pool: ConnPool,
    metrics: Arc<Metrics>,
    upload_limiter: RateLimiter,
    /// Piece uploads at once, all connections together.
    upload_slots: Arc<tokio::sync::Semaphore>,
    download_limiter: RateLimiter,
    /// Tasks this node can serve pieces of, with the feed of newly stored pieces.
    live: Mutex<HashMap<TaskId, Arc<LiveTask>>>,
    /// Downloads in progress, shared by every local client asking for the same task.
    running: Mutex<HashMap<TaskId, watch::Receiver<State>>>,
    /// Where streaming clients of running downloads read, toward each download's picker.
    positions: Mutex<HashMap<TaskId, Arc<watch::Sender<Option<u64>>>>>,
    started: Instant,
}

struct LiveTask {
    entry: Arc<TaskEntry>,
    haves: broadcast::Sender<u32>,
    /// Membership in the task's swarm after the download completed: others fetch from us.
    presence: Mutex<Option<engine::Presence>>,
}

impl LiveTask {
    fn new(entry: Arc<TaskEntry>) -> Self {
        Self {
            entry,
            haves: broadcast::channel(HAVE_FEED).0,
            presence: Mutex::new(None),
        }
    }
}

/// What a local client sees of a download.
#[derive(Clone, Debug)]
pub enum State {
    /// Bytes done of total (0 of 0 before the metadata arrived).
    Running(u64, u64),
    /// Finished.
    Done(Result<Completed, Failure>),
}

/// A completed task in the store.
#[derive(Clone, Debug)]
pub struct Completed {
    /// The stored data file.
    pub path: PathBuf,
    /// Length.
    pub length: u64,
    /// SHA-256.
    pub sha256: Sha256,
}

/// A failed download: exit code and one-line message, as `d7q get` reports them.
#[derive(Clone, Debug)]
pub struct Failure {
    /// Exit code (see [`crate::exit`]).
    pub code: i32,
    /// Message.
    pub message: String,
}

impl From<GetError> for Failure {
    fn from(e: GetError) -> Self {
        Failure {
            code: e.exit_code(),
            message: e.to_string(),
        }
    }
}

impl Daemon {
    /// Opens the store, binds the mesh endpoint, the local socket and the HTTP side.
    pub async fn start(cfg: DaemonConfig) -> anyhow::Result<Self> {
        // Private: the store holds layers some registry shows only to some clients, and the
        // default proxy CA key lives here too. What an older build left open is tightened.
        crate::store::private::create_dir(&cfg.data_dir)?;
        crate::store::private::tighten_dir_entries(&cfg.data_dir)?;
        let default_ca = cfg.data_dir.join("proxy-ca");
        if default_ca.is_dir() {
            crate::store::private::tighten_dir_entries(&default_ca)?;
        }
        let node_id = load_node_id(&cfg.data_dir)?;
        let store = TaskStore::open(&cfg.data_dir)?;
        let s = store.open_summary();
        info!(
            tasks = s.tasks,
            complete = s.complete,
            pieces_dropped = s.pieces_dropped,
            "store opened"
        );
        let endpoint = transport::endpoint(&cfg.identity, cfg.listen, true)?;
        let mesh = endpoint.local_addr()?;
        // With port 0 the kernel chose: advertise what was bound.
        let mut cfg = cfg;
        cfg.listen = mesh;
        let metrics = Arc::new(Metrics::new(Role::Daemon));
        let http = tokio::net::TcpListener::bind(cfg.proxy).await?;
        let proxy = http.local_addr()?;
        let metrics_http = match cfg.metrics {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
            None => None,
        };
        let metrics_addr = metrics_http.as_ref().map(|l| l.local_addr()).transpose()?;
        let mut live = HashMap::new();
        for info in store.list() {
            if let Some(entry) = store.get(info.task) {
                live.insert(info.task, Arc::new(LiveTask::new(entry)));
            }
        }
        let inner = Arc::new(Inner {
            upload_limiter: RateLimiter::new(cfg.upload_rate),
            upload_slots: Arc::new(tokio::sync::Semaphore::new(crate::sched::UPLOAD_SLOTS)),
            download_limiter: RateLimiter::new(cfg.download_rate),
            node_id,
            store,
            pool: ConnPool::new(endpoint.clone()),
            metrics: metrics.clone(),
            live: Mutex::new(live),
            running: Mutex::new(HashMap::new()),
            positions: Mutex::new(HashMap::new()),
            started: Instant::now(),
            cfg,
        });
        let socket = local::bind(&inner.cfg.socket)?;
        tokio::spawn(local::serve(socket, Daemon::handle(inner.clone())));
        let proxy_cfg = crate::proxy::ProxyConfig {
            registries: inner.cfg.registries.clone(),
            ca_dir: inner
                .cfg
                .proxy_ca
                .clone()
                .unwrap_or_else(|| inner.cfg.data_dir.join("proxy-ca")),
            origin_ca: inner.cfg.origin_ca.clone(),
            mirror_upstream: inner.cfg.mirror_upstream.clone(),
            allow: inner.cfg.proxy_allow.clone(),
            own: std::iter::once(proxy).chain(metrics_addr).collect(),
            serve_metrics: metrics_addr.is_none(),
        };
        if let Some(listener) = metrics_http {
            tokio::spawn(crate::metrics::serve(
                listener,
                metrics.clone(),
                std::future::pending::<()>(),
            ));
        }
        let http_side = crate::proxy::Proxy::new(proxy_cfg, mesh_blobs(&inner), metrics)?;
        tokio::spawn(crate::proxy::serve(
            http,
            http_side,
            std::future::pending::<()>(),
        ));
        tokio::spawn(accept(endpoint, inner.clone()));
        tokio::spawn(collect_garbage(inner.clone()));
        tokio::spawn(flush_metadata(inner.clone()));
        tokio::spawn(announce_stored(inner.clone()));
        Ok(Self {
            inner,
            mesh,
            proxy,
            metrics_addr,
        })
    }

    fn handle(inner: Arc<Inner>) -> local::Handler {
        Arc::new(move |req| inner.clone().get(req))
    }

    /// The mesh address.
    pub fn mesh_addr(&self) -> SocketAddr {
        self.mesh
    }

    /// The HTTP address.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy
    }

    /// The `--metrics` address, when it has one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Blobs through this daemon's mesh, streamed in order (what the proxy serves).
    pub fn blobs(&self) -> Arc<dyn MeshBlobs> {
        mesh_blobs(&self.inner)
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.inner.metrics.clone()
    }

    /// The local socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.inner.cfg.socket
    }

    /// Flushes the store's metadata (on shutdown).
    pub fn shutdown(&self) {
        let _ = self.inner.store.flush();
        let _ = std::fs::remove_file(&self.inner.cfg.socket);
        self.inner.pool.close();
    }
}

async fn accept(endpoint: quinn::Endpoint, inner: Arc<Inner>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
    while let Some(incoming) = endpoint.accept().await {
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            incoming.refuse();
            continue;
        };
        let inner = inner.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let remote = incoming.remote_address();
            let conn = match incoming.await {
                Ok(c) => c,
                Err(e) => {
                    warn!(%remote, error = %transport::conn_error(remote, e), "handshake refused");
                    return;
                }
            };
            match transport::alpn(&conn).as_deref() {
                Some(a) if a == d7q_wire::ADMIN_ALPN => admin::serve(conn, inner).await,
                Some(a) if a == d7q_wire::ALPN => {
                    let cfg = UploadConfig {
                        slots: inner.upload_slots.clone(),
                        node_id: inner.node_id,
                        labels: inner.cfg.labels.clone(),
                        limiter: inner.upload_limiter.clone(),
                        metrics: inner.metrics.clone(),
                        danger_corrupt: inner.cfg.danger_corrupt_uploads,
                    };
                    upload::serve_connection(conn, inner, cfg)
                        .instrument(info_span!("upload", %remote))
                        .await
                }
                _ => conn.close(transport::close::VERSION, b"unsupported protocol"),
            }
        });
    }
}

/// After a restart, offers what the store kept: each complete task (the most recently used
/// first, up to [`MAX_ANNOUNCED`]) joins its swarm on its home supernode as a holder, so the
/// supernode hands this daemon out as a parent again.
async fn announce_stored(inner: Arc<Inner>) {
    let mut complete: Vec<_> = inner
        .store
        .list()
        .into_iter()
        .filter(|e| e.complete)
        .collect();
    complete.sort_by_key(|e| std::cmp::Reverse(e.last_access));
    for e in complete.into_iter().take(MAX_ANNOUNCED) {
        let Some(live) = inner.live.lock().expect("live lock").get(&e.task).cloned() else {
            continue;
        };
        let Some(&home) = engine::rendezvous(e.task, &inner.cfg.supernodes).first() else {
            return;
        };
        let announced = async {
            let conn = inner.pool.get(home).await.ok()?;
            let (mut send, recv) = crate::proto::open_control(&conn).await.ok()?;
            let mut recv = crate::proto::FrameReader::new(recv);
            let hello = d7q_wire::Control::Hello(d7q_wire::Hello {
                major: d7q_wire::MAJOR_VERSION,
                minor: d7q_wire::MINOR_VERSION,
                node_id: inner.node_id,
                labels: inner.cfg.labels.clone(),
                upload_addr: Some(inner.cfg.advertise.unwrap_or(inner.cfg.listen)),
                capabilities: d7q_wire::Capabilities(d7q_wire::Capabilities::UPLOAD),
            });
            crate::proto::write_msg(&mut send, &hello).await.ok()?;
            match recv
                .expect_within::<d7q_wire::Control>(crate::proto::HELLO_TIMEOUT)
                .await
                .ok()?
            {
                d7q_wire::Control::HelloAck(_) => {}
                _ => return None,
            }
            let bitmap = live.entry.bitmap();
            let msg = d7q_wire::Control::Announce(d7q_wire::BitmapUpdate {
                task: e.task,
                bitmap,
            });
            crate::proto::write_msg(&mut send, &msg).await.ok()?;
            Some((send, recv.into_inner()))
        };
        if let Some((send, recv)) = announced.await {
            *live.presence.lock().expect("presence lock") =
                Some(engine::Presence::new(send, Some(recv)));
        }
    }
}

/// Saves the store's metadata (which pieces are stored, with their checksums) every
/// [`FLUSH_INTERVAL`], so a crash loses at most that much progress: a restart resumes from it
/// and the scrub drops any piece whose bytes did not reach the disk.
async fn flush_metadata(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(FLUSH_INTERVAL).await;
        let i = inner.clone();
        let _ = tokio::task::spawn_blocking(move || i.store.flush()).await;
    }
}

/// Evicts by TTL and watermarks, least recently used first, never what is pinned (a running
/// download or upload), every [`GC_INTERVAL`].
async fn collect_garbage(inner: Arc<Inner>) {
    loop {
        let i = inner.clone();
        let report = tokio::task::spawn_blocking(move || {
            let g = &i.cfg.gc;
            let cfg = GcConfig {
                high_watermark: store_watermark(g.high_watermark),
                low_watermark: store_watermark(g.low_watermark),
                ttl: g.ttl,
            };
            let bytes = |w: config::Watermark| matches!(w, config::Watermark::Bytes(_));
            if bytes(g.high_watermark) || bytes(g.low_watermark) {
                // Byte watermarks bound the store's own usage, not the whole disk's.
                let free = crate::store::free_space(i.store.dir()).unwrap_or(0);
                let used = i.store.usage();
                let disk = DiskUsage {
                    total: used + free,
                    free,
                };
                i.store.gc_with(&cfg, disk, SystemTime::now())
            } else {
                i.store.gc(&cfg, SystemTime::now())
            }
        })
        .await;
        if let Ok(report) = report {
            if !report.evicted.is_empty() {
                info!(
                    evicted = report.evicted.len(),
                    bytes = report.bytes_freed,
                    "store collected"
                );
                let mut live = inner.live.lock().expect("live lock");
                for t in &report.evicted {
                    live.remove(t);
                }
            }
        }
        tokio::time::sleep(GC_INTERVAL).await;
    }
}

fn store_watermark(w: config::Watermark) -> GcWatermark {
    match w {
        config::Watermark::Percent(p) => GcWatermark::Percent(p.clamp(0.0, 100.0).round() as u8),
        config::Watermark::Bytes(b) => GcWatermark::Bytes(b),
    }
}

impl Inner {
    /// Starts or joins the download of a local client's request.
    fn get(self: Arc<Self>, req: local::Request) -> watch::Receiver<State> {
        let digest = match req.digest.as_deref().map(task::parse_digest) {
            Some(None) => {
                return done(Err(Failure {
                    code: exit::USAGE,
                    message: "bad digest".into(),
                }));
            }
            Some(Some(d)) => Some(d),
            None => None,
        };
        let id = task::task_id(&req.url, digest.as_ref(), None);
        if let Some(entry) = self.store.get(id).filter(|e| e.is_complete()) {
            let sha = entry.sha256().unwrap_or_default();
            if digest.is_some_and(|d| d != sha) {
                return done(Err(Failure {
                    code: exit::INTEGRITY,
                    message: format!(
                        "digest mismatch: expected {}, got {}",
                        task::format_digest(&digest.unwrap_or_default()),
                        task::format_digest(&sha)
                    ),
                }));
            }
            return done(Ok(Completed {
                path: entry.data_path().to_path_buf(),
                length: entry.geometry().length,
                sha256: sha,
            }));
        }
        let mut running = self.running.lock().expect("running lock");
        if let Some(rx) = running.get(&id) {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(State::Running(0, 0));
        running.insert(id, rx.clone());
        drop(running);
        let (pos_tx, pos_rx) = watch::channel(None);
        self.positions
            .lock()
            .expect("positions lock")
            .insert(id, Arc::new(pos_tx));
        let reg = Register {
            task: id,
            url: req.url.clone(),
            headers: req.headers,
            digest,
            range: None,
        };
        let inner = self.clone();
        tokio::spawn(
            async move {
                let result = inner.download(reg, &tx, pos_rx).await;
                inner.running.lock().expect("running lock").remove(&id);
                inner.positions.lock().expect("positions lock").remove(&id);
                let _ = tx.send(State::Done(result.map_err(Failure::from)));
            }
            .instrument(info_span!("download", task = %id)),
        );
        rx
    }

    async fn download(
        self: &Arc<Self>,
        reg: Register,
        tx: &watch::Sender<State>,
        read_position: watch::Receiver<Option<u64>>,
    ) -> Result<Completed, GetError> {
        let id = reg.task;
        let url = reg.url.split('?').next().unwrap_or_default().to_string();
        let me = self.clone();
        let make_sink: engine::SinkFactory = Box::new(move |g: Geometry| {
            let entry = me.store.create(id, &url, g)?;
            me.live
                .lock()
                .expect("live lock")
                .entry(id)
                .or_insert_with(|| Arc::new(LiveTask::new(entry.clone())));
            let pin = entry.pin();
            Ok(Arc::new(StoreSink { entry, _pin: pin }) as Arc<dyn PieceSink>)
        });
        let me = self.clone();
        let on_have: engine::HaveFn = Arc::new(move |i| {
            if let Some(t) = me.live.lock().expect("live lock").get(&id) {
                let _ = t.haves.send(i);
            }
        });
        let mut limiters = vec![self.download_limiter.clone()];
        if self.cfg.per_download_rate > 0 {
            limiters.push(RateLimiter::new(self.cfg.per_download_rate));
        }
        let cfg = EngineConfig {
            node_id: self.node_id,
            labels: self.cfg.labels.clone(),
            upload_addr: Some(self.cfg.advertise.unwrap_or(self.cfg.listen)),
            limiters,
            metrics: Some(self.metrics.clone()),
            on_have: Some(on_have),
            linger: true,
            read_position: Some(read_position),
        };
        let txp = tx.clone();
        let progress: crate::peer::ProgressFn = Arc::new(move |done, total| {
            let _ = txp.send(State::Running(done, total));
        });
        self.metrics.tasks(TaskState::Running).inc();
        let outcome = engine::download(
            &self.pool,
            &self.cfg.supernodes,
            reg,
            cfg,
            make_sink,
            Some(progress),
        )
        .await;
        self.metrics.tasks(TaskState::Running).dec();
        let mut outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                self.metrics.tasks(TaskState::Failed).inc();
                return Err(e);
            }
        };
        let entry = self
            .store
            .get(id)
            .ok_or_else(|| GetError::Mesh("task vanished from the store".into()))?;
        let sha = outcome.sha256;
        let e2 = entry.clone();
        tokio::task::spawn_blocking(move || e2.complete(sha))
            .await
            .map_err(|e| GetError::Mesh(format!("store: {e}")))??;
        self.metrics.tasks(TaskState::Complete).inc();
        if let Some(t) = self.live.lock().expect("live lock").get(&id) {
            *t.presence.lock().expect("presence lock") = outcome.presence.take();
        }
        info!(
            from_seed = outcome.from_seed,
            from_peers = outcome.from_peers,
            "download complete"
        );
        Ok(Completed {
            path: entry.data_path().to_path_buf(),
            length: outcome.geometry.length,
            sha256: sha,
        })
    }
}

fn done(result: Result<Completed, Failure>) -> watch::Receiver<State> {
    watch::channel(State::Done(result)).1
}

/// Stored pieces of a task in the daemon's store, pinned against collection while the
/// download runs.
struct StoreSink {
    entry: Arc<TaskEntry>,
    _pin: PinGuard,
}

impl PieceSink for StoreSink {
    fn write_piece(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        self.entry.write_piece(index, bytes)
    }

    fn read_piece(&self, index: u32) -> Result<Vec<u8>, StoreError> {
        self.entry.read_piece(index)
    }

    fn stored(&self) -> Vec<(u32, Option<Sha256>)> {
        self.entry
            .bitmap()
            .iter_ones()
            .map(|i| (i, self.entry.digest(i)))
            .collect()
    }

    fn record_digests(&self, first: u32, digests: &[Sha256]) {
        let _ = self.entry.set_digests(first, digests);
    }
}

impl PieceStore for Inner {
    fn subscribe(&self, task: TaskId) -> Option<(Bitmap, broadcast::Receiver<u32>)> {
        let t = self.live.lock().expect("live lock").get(&task).cloned()?;
        // Subscribe before the snapshot, so no piece falls between the two.
        let rx = t.haves.subscribe();
        Some((t.entry.bitmap(), rx))
    }

    fn read_piece(&self, task: TaskId, index: u32) -> Option<Vec<u8>> {
        self.live.lock().expect("live lock").get(&task)?;
        // Pinned for the read, so collection cannot remove the file under it.
        let pinned = self.store.pin(task)?;
        if !pinned.has(index) {
            return None;
        }
        pinned.read_piece(index).ok()
    }
}

impl admin::StatusSource for Inner {
    fn status(&self) -> admin::Status {
        let mut tasks: Vec<admin::TaskStatus> = self
            .store
            .list()
            .into_iter()
            .map(|e| admin::TaskStatus {
                id: e.task.to_string(),
                url: e.url,
                length: Some(e.geometry.length),
                piece_count: Some(e.geometry.piece_count),
                pieces_done: e.pieces,
                state: if e.complete { "complete" } else { "partial" }.into(),
                sha256: e.sha256.as_ref().map(task::format_digest),
            })
            .collect();
        tasks.sort_by(|a, b| a.id.cmp(&b.id));
        admin::Status {
            node: admin::NodeStatus {
                role: "daemon".into(),
                node_id: self.node_id.to_string(),
                labels: self.cfg.labels.clone(),
                uptime_secs: self.started.elapsed().as_secs(),
            },
            tasks,
        }
    }
}

/// The daemon's mesh as the proxy sees it: blobs by digest, streamed in order.
fn mesh_blobs(inner: &Arc<Inner>) -> Arc<dyn MeshBlobs> {
    Arc::new(DaemonBlobs(inner.clone()))
}

/// How long a blob reader waits for a piece before looking again (a `Have` may come before the
/// piece reaches the disk, so the feed alone is not enough).
const BLOB_POLL: Duration = Duration::from_millis(25);

struct DaemonBlobs(Arc<Inner>);

impl MeshBlobs for DaemonBlobs {
    fn open(
        &self,
        req: BlobRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Blob, BlobError>> + Send + 'static>> {
        let inner = self.0.clone();
        Box::pin(async move { inner.open_blob(req).await })
    }
}

impl Inner {
    /// Joins or starts the download of a blob and waits until its length is known.
    async fn open_blob(self: Arc<Self>, req: BlobRequest) -> Result<Blob, BlobError> {
        let digest = req.digest;
        let id = task::task_id(&req.url, Some(&digest), None);
        let mut state = self.clone().get(local::Request {
            url: req.url,
            headers: req.headers,
            digest: Some(task::format_digest(&digest)),
        });
        loop {
            let live = self.live.lock().expect("live lock").get(&id).cloned();
            if let Some(live) = live {
                let length = live.entry.geometry().length;
                let complete = live.entry.is_complete();
                let source = StoreBlob {
                    inner: self.clone(),
                    task: id,
                    live,
                    state,
                    digest,
                };
                return Ok(Blob::new(length, digest, complete, Box::new(source)));
            }
            let now = state.borrow_and_update().clone();
            match now {
                State::Done(Err(f)) => return Err(blob_error(f)),
                State::Done(Ok(_)) => {
                    // Complete but no longer live (collected meanwhile): ask again.
                    return Err(BlobError::Local("the blob left the store".into()));
                }
                State::Running(..) => {}
            }
            if state.changed().await.is_err() {
                // The download ended; its last state is in the receiver.
                if matches!(&*state.borrow(), State::Running(..)) {
                    return Err(BlobError::Mesh("the download stopped".into()));
                }
            }
        }
    }
}

fn blob_error(f: Failure) -> BlobError {
    match f.code {
        exit::ORIGIN => BlobError::Origin(f.message),
        exit::INTEGRITY => BlobError::Integrity(f.message),
        exit::LOCAL => BlobError::Local(f.message),
        _ => BlobError::Mesh(f.message),
    }
}

/// One client's reading of a blob in the store, piece by piece as they are stored. The last
/// bytes are held back until the whole content is verified against the digest, so a client
/// never receives a complete body of wrong content.
struct StoreBlob {
    inner: Arc<Inner>,
    task: TaskId,
    live: Arc<LiveTask>,
    state: watch::Receiver<State>,
    digest: Sha256,
}

impl BlobSource for StoreBlob {
    fn read(
        &self,
        range: Range<u64>,
        tx: mpsc::Sender<Result<Bytes, BlobError>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>> {
        let reader = BlobReader {
            inner: self.inner.clone(),
            task: self.task,
            entry: self.live.entry.clone(),
            haves: self.live.haves.subscribe(),
            state: self.state.clone(),
            digest: self.digest,
        };
        Box::pin(async move {
            if let Err(e) = reader.run(range, &tx).await {
                let _ = tx.send(Err(e)).await;
            }
        })
    }
}

struct BlobReader {
    inner: Arc<Inner>,
    task: TaskId,
    entry: Arc<TaskEntry>,
    haves: broadcast::Receiver<u32>,
    state: watch::Receiver<State>,
    digest: Sha256,
}

impl BlobReader {
    async fn run(
        mut self,
        range: Range<u64>,
        tx: &mpsc::Sender<Result<Bytes, BlobError>>,
    ) -> Result<(), BlobError> {
        let g = self.entry.geometry();
        let _pin = self.entry.pin();
        let mut off = range.start;
        while off < range.end {
            let i = (off / u64::from(g.piece_size)) as u32;
            self.tell_position(off);
            self.wait_piece(i).await?;
            let entry = self.entry.clone();
            let piece = tokio::task::spawn_blocking(move || entry.read_piece(i))
                .await
                .map_err(|e| BlobError::Local(format!("read: {e}")))?
                .map_err(|e| BlobError::Local(e.to_string()))?;
            let start = g.offset(i);
            let end = (start + piece.len() as u64).min(range.end);
            let piece = Bytes::from(piece);
            while off < end {
                let n = (end - off).min(blobs::CHUNK as u64);
                let at = (off - start) as usize;
                if off + n == g.length {
                    self.wait_verified().await?;
                }
                if tx.send(Ok(piece.slice(at..at + n as usize))).await.is_err() {
                    return Ok(()); // the client went away
                }
                off += n;
            }
        }
        Ok(())
    }

    fn tell_position(&self, off: u64) {
        let pos = self
            .inner
            .positions
            .lock()
            .expect("positions lock")
            .get(&self.task)
            .cloned();
        if let Some(p) = pos {
            p.send_replace(Some(off));
        }
    }

    /// Waits until piece `i` is stored, or the download failed.
    async fn wait_piece(&mut self, i: u32) -> Result<(), BlobError> {
        loop {
            if self.entry.has(i) {
                return Ok(());
            }
            self.check_failed()?;
            tokio::select! {
                _ = self.haves.recv() => {}
                _ = self.state.changed() => {}
                _ = tokio::time::sleep(BLOB_POLL) => {}
            }
        }
    }

    /// Waits until the whole content is verified against the digest.
    async fn wait_verified(&mut self) -> Result<(), BlobError> {
        loop {
            if self.entry.is_complete() {
                return match self.entry.sha256() {
                    Some(d) if d == self.digest => Ok(()),
                    _ => Err(BlobError::Integrity(format!(
                        "content does not match {}",
                        task::format_digest(&self.digest)
                    ))),
                };
            }
            self.check_failed()?;
            tokio::select! {
                _ = self.state.changed() => {}
                _ = tokio::time::sleep(BLOB_POLL) => {}
            }
        }
    }

    fn check_failed(&self) -> Result<(), BlobError> {
        match &*self.state.borrow() {
            State::Done(Err(f)) => Err(blob_error(f.clone())),
            _ => Ok(()),
        }
    }
}

/// The node id kept in the data directory, so a restarted daemon is the same node.
fn load_node_id(dir: &std::path::Path) -> std::io::Result<NodeId> {
    let path = dir.join("node-id");
    if let Ok(s) = std::fs::read_to_string(&path) {
        if let Some(id) = parse_hex16(s.trim()) {
            return Ok(NodeId(id));
        }
    }
    let id = NodeId(rand::random());
    crate::store::private::write_file(&path, id.to_string().as_bytes())?;
    Ok(id)
}

fn parse_hex16(s: &str) -> Option<[u8; 16]> {
    if s.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, c) in s.as_bytes().chunks(2).enumerate() {
        out[i] = u8::from_str_radix(std::str::from_utf8(c).ok()?, 16).ok()?;
    }
    Some(out)
}
