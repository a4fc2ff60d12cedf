//! Prometheus metrics of a daemon or a supernode: a fixed set of counters and gauges, rendered
//! in the Prometheus text exposition format (version 0.0.4), and a small HTTP server for
//! `/metrics` and `/health`.
//!
//! No metrics crate: the set is small and fixed, so each metric is a named field of [`Metrics`]
//! and every label set is an enum. Updates are one relaxed atomic add — safe on the piece path.
//! Series are rendered even at zero, so `rate()` works from the first scrape.
//!
//! The names and labels rendered here are a contract with dashboards and with the acceptance
//! tests (they sum `d7q_download_bytes_total{source="peer"}` across daemons): add freely, rename
//! nothing.
//!
//! Not in here: deciding what to count (the code that moves the bytes does that), and the
//! daemon's HTTP proxy — it mounts [`handle`] on its own listener; [`serve`] is for a node with a
//! metrics port of its own (the supernode).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Connections the metrics server holds at once; more are closed on accept. A scraper needs
/// one; the bound keeps a flood from costing more than this many tasks.
pub const MAX_CONNECTIONS: usize = 64;

/// Time a client has to send a complete request head — also how long an idle keep-alive
/// connection is kept — so a slow or silent client cannot hold a connection slot.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Which process the metrics describe; rendered as `d7q_info{role=…}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `d7q daemon`.
    Daemon,
    /// `d7q supernode`.
    Supernode,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Daemon => "daemon",
            Role::Supernode => "supernode",
        }
    }
}

/// A value of a fixed label: an enum whose variants are all the values the label can take.
pub trait Label: Copy + 'static {
    /// The label's name.
    const NAME: &'static str;
    /// Every value, in rendering order.
    const ALL: &'static [Self];
    /// Position in [`Label::ALL`].
    fn index(self) -> usize;
    /// The label value.
    fn as_str(self) -> &'static str;
}

/// Where downloaded bytes came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Another daemon.
    Peer,
    /// A supernode (for a supernode: an upstream supernode).
    Supernode,
    /// The origin itself (back-to-source).
    Origin,
}

/// State of a task on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Downloading.
    Running,
    /// All pieces verified and stored.
    Complete,
    /// Given up.
    Failed,
}

/// Why a piece from a parent was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    /// The bytes did not match the piece digest.
    DigestMismatch,
    /// The parent did not answer in time.
    Timeout,
    /// The parent refused (does not have it, too busy).
    Refused,
    /// The stream or connection broke mid-piece.
    Stream,
}

/// Why a download stopped using a parent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParentDrop {
    /// Dropped for what it served: a piece that failed verification, or too many failed
    /// pieces (timeouts, refusals, broken streams); `d7q_piece_failures_total` says which.
    Failures,
    /// It could not be reached, or its session ended (handshake timeout, closed stream).
    Gone,
}

/// What the daemon's proxy did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyKind {
    /// A registry blob served from the mesh.
    BlobMesh,
    /// A registry blob passed to the registry because the mesh could not open it.
    BlobDirect,
    /// A registry request passed to the registry untouched (manifests, tokens, pushes).
    Passthrough,
    /// A CONNECT to a host that is not intercepted, tunnelled byte for byte.
    Tunnel,
    /// A blob request the registry refused for this client: its answer was passed on.
    Denied,
    /// A plain-HTTP proxy request forwarded.
    Forward,
}

macro_rules! label {
    ($ty:ty, $name:literal, [$($variant:ident => $value:literal),+ $(,)?]) => {
        impl Label for $ty {
            const NAME: &'static str = $name;
            const ALL: &'static [Self] = &[$(<$ty>::$variant),+];
            fn index(self) -> usize {
                self as usize
            }
            fn as_str(self) -> &'static str {
                match self {
                    $(<$ty>::$variant => $value),+
                }
            }
        }
    };
}

label!(Source, "source", [Peer => "peer", Supernode => "supernode", Origin => "origin"]);
label!(TaskState, "state", [Running => "running", Complete => "complete", Failed => "failed"]);
label!(ProxyKind, "kind", [
    BlobMesh => "blob_mesh",
    BlobDirect => "blob_direct",
    Passthrough => "passthrough",
    Tunnel => "tunnel",
    Denied => "denied",
    Forward => "forward",
]);
label!(FailureReason, "reason", [
    DigestMismatch => "digest_mismatch",
    Timeout => "timeout",
    Refused => "refused",
    Stream => "stream",
]);
label!(ParentDrop, "reason", [Failures => "failures", Gone => "gone"]);
label!(crate::sched::seed::Decision, "decision", [
    First => "first",
    Patience => "patience",
    Starvation => "starvation",
    Overflow => "overflow",
    Busy => "busy",
    Saturated => "saturated",
]);

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        // Relaxed: each counter is independent, and a scrape needs no ordering with other data.
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn value(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down. Signed, so that an `inc` and a `dec` racing around zero never
/// wrap to 2^64.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Subtracts one.
    pub fn dec(&self) {
        self.add(-1);
    }

    /// Adds `n` (negative to subtract).
    pub fn add(&self, n: i64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets the value.
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }

    /// The current value.
    pub fn value(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One metric per value of a label `L`.
#[derive(Debug)]
pub struct Family<L: Label, M> {
    cells: Box<[M]>,
    _label: std::marker::PhantomData<L>,
}

impl<L: Label, M: Default> Default for Family<L, M> {
    fn default() -> Self {
        Family {
            cells: L::ALL.iter().map(|_| M::default()).collect(),
            _label: std::marker::PhantomData,
        }
    }
}

impl<L: Label, M> Family<L, M> {
    /// The metric for one label value.
    pub fn get(&self, label: L) -> &M {
        &self.cells[label.index()]
    }
}

/// Everything a daemon or a supernode exposes. Shared as `Arc<Metrics>`; all methods take
/// `&self`.
#[derive(Debug)]
pub struct Metrics {
    role: Role,
    download_bytes: Family<Source, Counter>,
    upload_bytes: Counter,
    tasks: Family<TaskState, Gauge>,
    piece_failures: Family<FailureReason, Counter>,
    parents_dropped: Family<ParentDrop, Counter>,
    origin_bytes: Counter,
    origin_requests: Counter,
    peers_connected: Gauge,
    mesh_connections_accepted: Counter,
    mesh_path_changes: Counter,
    pieces_served: Counter,
    seed_decisions: Family<crate::sched::seed::Decision, Counter>,
    proxy_requests: Family<ProxyKind, Counter>,
    proxy_blob_bytes: Counter,
    proxy_tokens_coalesced: Counter,
}

impl Metrics {
    /// All zero, for a process in `role`.
    pub fn new(role: Role) -> Metrics {
        Metrics {
            role,
            download_bytes: Family::default(),
            upload_bytes: Counter::default(),
            tasks: Family::default(),
            piece_failures: Family::default(),
            parents_dropped: Family::default(),
            origin_bytes: Counter::default(),
            origin_requests: Counter::default(),
            peers_connected: Gauge::default(),
            mesh_connections_accepted: Counter::default(),
            mesh_path_changes: Counter::default(),
            pieces_served: Counter::default(),
            seed_decisions: Family::default(),
            proxy_requests: Family::default(),
            proxy_blob_bytes: Counter::default(),
            proxy_tokens_coalesced: Counter::default(),
        }
    }

    /// The role given to [`Metrics::new`].
    pub fn role(&self) -> Role {
        self.role
    }

    /// `d7q_download_bytes_total{source}`: verified piece bytes received, by where they came
    /// from.
    pub fn download_bytes(&self, source: Source) -> &Counter {
        self.download_bytes.get(source)
    }

    /// `d7q_upload_bytes_total`: piece bytes sent to other nodes.
    pub fn upload_bytes(&self) -> &Counter {
        &self.upload_bytes
    }

    /// `d7q_tasks{state}`: tasks on this node by state.
    pub fn tasks(&self, state: TaskState) -> &Gauge {
        self.tasks.get(state)
    }

    /// `d7q_piece_failures_total{reason}`: pieces from a parent that were not used.
    pub fn piece_failures(&self, reason: FailureReason) -> &Counter {
        self.piece_failures.get(reason)
    }

    /// `d7q_parents_dropped_total{reason}`: parents a download stopped using, and why.
    pub fn parents_dropped(&self, reason: ParentDrop) -> &Counter {
        self.parents_dropped.get(reason)
    }

    /// `d7q_origin_bytes_total`: bytes fetched from origins (back-to-source).
    pub fn origin_bytes(&self) -> &Counter {
        &self.origin_bytes
    }

    /// `d7q_origin_requests_total`: requests sent to origins.
    pub fn origin_requests(&self) -> &Counter {
        &self.origin_requests
    }

    /// `d7q_peers_connected`: mesh connections open now.
    pub fn peers_connected(&self) -> &Gauge {
        &self.peers_connected
    }

    /// `d7q_mesh_connections_accepted_total`: mesh connections from other nodes that completed
    /// the handshake with a cluster certificate. A client that keeps its connection through an
    /// address change adds nothing here; one that had to reconnect adds one.
    pub fn mesh_connections_accepted(&self) -> &Counter {
        &self.mesh_connections_accepted
    }

    /// `d7q_mesh_path_changes_total`: times an accepted mesh connection's peer address changed
    /// under it (QUIC connection migration: a NAT rebinding, a new network).
    pub fn mesh_path_changes(&self) -> &Counter {
        &self.mesh_path_changes
    }

    /// `d7q_pieces_served_total`: pieces sent to other nodes.
    pub fn pieces_served(&self) -> &Counter {
        &self.pieces_served
    }

    /// `d7q_seed_decisions_total{decision}`: a supernode's answers to uploading peers' piece
    /// requests (see [`crate::sched::seed`]): which rule let a copy out, or "busy".
    pub fn seed_decisions(&self, d: crate::sched::seed::Decision) -> &Counter {
        self.seed_decisions.get(d)
    }

    /// `d7q_proxy_requests_total{kind}`: requests the proxy handled, by what it did.
    pub fn proxy_requests(&self, kind: ProxyKind) -> &Counter {
        self.proxy_requests.get(kind)
    }

    /// `d7q_proxy_blob_bytes_total`: blob bytes the proxy served to clients from the mesh.
    pub fn proxy_blob_bytes(&self) -> &Counter {
        &self.proxy_blob_bytes
    }

    /// `d7q_proxy_token_requests_coalesced_total`: token requests answered by another client's
    /// request to the token endpoint (in flight or recent).
    pub fn proxy_tokens_coalesced(&self) -> &Counter {
        &self.proxy_tokens_coalesced
    }

    /// The text exposition format, as served at `/metrics`.
    pub fn render(&self) -> String {
        let mut e = Encoder::default();
        e.header("d7q_info", "gauge", "Which d7q process this is.");
        e.sample(
            "d7q_info",
            &[
                ("role", self.role.as_str()),
                ("version", env!("CARGO_PKG_VERSION")),
            ],
            1,
        );
        e.family(
            "d7q_download_bytes_total",
            "counter",
            "Verified bytes received, by source.",
            &self.download_bytes,
            |c| c.value().to_string(),
        );
        e.single(
            "d7q_upload_bytes_total",
            "counter",
            "Piece bytes sent to other nodes.",
            self.upload_bytes.value(),
        );
        e.family(
            "d7q_tasks",
            "gauge",
            "Tasks on this node, by state.",
            &self.tasks,
            |g| g.value().to_string(),
        );
        e.family(
            "d7q_piece_failures_total",
            "counter",
            "Pieces from a parent that were not used, by reason.",
            &self.piece_failures,
            |c| c.value().to_string(),
        );
        e.family(
            "d7q_parents_dropped_total",
            "counter",
            "Parents a download stopped using, by reason.",
            &self.parents_dropped,
            |c| c.value().to_string(),
        );
        e.single(
            "d7q_origin_bytes_total",
            "counter",
            "Bytes fetched from origins (back-to-source).",
            self.origin_bytes.value(),
        );
        e.single(
            "d7q_origin_requests_total",
            "counter",
            "Requests sent to origins.",
            self.origin_requests.value(),
        );
        e.single(
            "d7q_peers_connected",
            "gauge",
            "Mesh connections open now.",
            self.peers_connected.value(),
        );
        e.single(
            "d7q_mesh_connections_accepted_total",
            "counter",
            "Mesh connections accepted from other nodes (handshake and certificate done).",
            self.mesh_connections_accepted.value(),
        );
        e.single(
            "d7q_mesh_path_changes_total",
            "counter",
            "Peer address changes of accepted mesh connections (QUIC migration).",
            self.mesh_path_changes.value(),
        );
        e.single(
            "d7q_pieces_served_total",
            "counter",
            "Pieces sent to other nodes.",
            self.pieces_served.value(),
        );
        e.family(
            "d7q_seed_decisions_total",
            "counter",
            "Seed answers to uploading peers' piece requests, by the rule that decided.",
            &self.seed_decisions,
            |c| c.value().to_string(),
        );
        e.family(
            "d7q_proxy_requests_total",
            "counter",
            "Requests the proxy handled, by what it did.",
            &self.proxy_requests,
            |c| c.value().to_string(),
        );
        e.single(
            "d7q_proxy_blob_bytes_total",
            "counter",
            "Blob bytes the proxy served to clients from the mesh.",
            self.proxy_blob_bytes.value(),
        );
        e.single(
            "d7q_proxy_token_requests_coalesced_total",
            "counter",
            "Token requests answered by another client's request.",
            self.proxy_tokens_coalesced.value(),
        );
        e.out
    }
}

/// Answers `GET /metrics` and `GET /health` (and `HEAD`); `None` for any other path, so a
/// server that mounts this (the daemon's proxy) handles the request itself. Requests in absolute
/// form (`GET http://host/metrics`, a proxy request for another server) are never answered here.
pub fn handle<B>(req: &Request<B>, metrics: &Metrics) -> Option<Response<Full<Bytes>>> {
    if req.uri().authority().is_some() {
        return None;
    }
    let body = match req.uri().path() {
        "/metrics" => metrics.render(),
        "/health" => "ok\n".to_string(),
        _ => return None,
    };
    let mut resp = match *req.method() {
        Method::GET => Response::new(Full::new(Bytes::from(body))),
        Method::HEAD => Response::new(Full::new(Bytes::new())),
        _ => {
            let mut r = Response::new(Full::new(Bytes::from_static(b"method not allowed\n")));
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
            return Some(r);
        }
    };
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    Some(resp)
}

/// Serves [`handle`] over HTTP/1.1 on `listener` until `shutdown` resolves; 404 for everything
/// else. At most [`MAX_CONNECTIONS`] connections at once (more are closed when accepted), each
/// given [`HEADER_READ_TIMEOUT`] per request head. When `shutdown` resolves, open connections are
/// dropped.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owning the connection tasks means dropping this set on return ends them all.
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                tracing::warn!(%error, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: connection limit reached, closing");
            continue;
        };
        let metrics = metrics.clone();
        conns.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = handle(&req, &metrics).unwrap_or_else(not_found);
                async move { Ok::<_, Infallible>(resp) }
            });
            let result = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await;
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "metrics: connection ended");
            }
        });
    }
}

fn not_found() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(b"not found\n")));
    *r.status_mut() = StatusCode::NOT_FOUND;
    r
}

/// Writes the text exposition format.
#[derive(Default)]
struct Encoder {
    out: String,
}

impl Encoder {
    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape_label(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }

    fn single(&mut self, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
        self.header(name, kind, help);
        self.sample(name, &[], value);
    }

    fn family<L: Label, M>(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        family: &Family<L, M>,
        value: impl Fn(&M) -> String,
    ) {
        self.header(name, kind, help);
        for &l in L::ALL {
            self.sample(name, &[(L::NAME, l.as_str())], value(family.get(l)));
        }
    }
}

/// Label values escape backslash, double quote and newline.
fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// HELP text escapes backslash and newline (a double quote is literal there).
fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[test]
    fn render_is_exact() {
        let m = Metrics::new(Role::Daemon);
        m.download_bytes(Source::Peer).add(1000);
        m.download_bytes(Source::Origin).add(5);
        m.upload_bytes().add(77);
        m.tasks(TaskState::Running).inc();
        m.tasks(TaskState::Running).inc();
        m.tasks(TaskState::Running).dec();
        m.tasks(TaskState::Complete).set(3);
        m.piece_failures(FailureReason::DigestMismatch).inc();
        m.parents_dropped(ParentDrop::Failures).add(2);
        m.origin_bytes().add(5);
        m.origin_requests().inc();
        m.peers_connected().set(4);
        m.mesh_connections_accepted().add(2);
        m.mesh_path_changes().inc();
        m.pieces_served().add(9);
        m.seed_decisions(crate::sched::seed::Decision::Busy).add(3);
        let want = format!(
            "\
# HELP d7q_info Which d7q process this is.
# TYPE d7q_info gauge
d7q_info{{role=\"daemon\",version=\"{}\"}} 1
# HELP d7q_download_bytes_total Verified bytes received, by source.
# TYPE d7q_download_bytes_total counter
d7q_download_bytes_total{{source=\"peer\"}} 1000
d7q_download_bytes_total{{source=\"supernode\"}} 0
d7q_download_bytes_total{{source=\"origin\"}} 5
# HELP d7q_upload_bytes_total Piece bytes sent to other nodes.
# TYPE d7q_upload_bytes_total counter
d7q_upload_bytes_total 77
# HELP d7q_tasks Tasks on this node, by state.
# TYPE d7q_tasks gauge
d7q_tasks{{state=\"running\"}} 1
d7q_tasks{{state=\"complete\"}} 3
d7q_tasks{{state=\"failed\"}} 0
# HELP d7q_piece_failures_total Pieces from a parent that were not used, by reason.
# TYPE d7q_piece_failures_total counter
d7q_piece_failures_total{{reason=\"digest_mismatch\"}} 1
d7q_piece_failures_total{{reason=\"timeout\"}} 0
d7q_piece_failures_total{{reason=\"refused\"}} 0
d7q_piece_failures_total{{reason=\"stream\"}} 0
# HELP d7q_parents_dropped_total Parents a download stopped using, by reason.
# TYPE d7q_parents_dropped_total counter
d7q_parents_dropped_total{{reason=\"failures\"}} 2
d7q_parents_dropped_total{{reason=\"gone\"}} 0
# HELP d7q_origin_bytes_total Bytes fetched from origins (back-to-source).
# TYPE d7q_origin_bytes_total counter
d7q_origin_bytes_total 5
# HELP d7q_origin_requests_total Requests sent to origins.
# TYPE d7q_origin_requests_total counter
d7q_origin_requests_total 1
# HELP d7q_peers_connected Mesh connections open now.
# TYPE d7q_peers_connected gauge
d7q_peers_connected 4
# HELP d7q_mesh_connections_accepted_total Mesh connections accepted from other nodes (handshake and certificate done).
# TYPE d7q_mesh_connections_accepted_total counter
d7q_mesh_connections_accepted_total 2
# HELP d7q_mesh_path_changes_total Peer address changes of accepted mesh connections (QUIC migration).
# TYPE d7q_mesh_path_changes_total counter
d7q_mesh_path_changes_total 1
# HELP d7q_pieces_served_total Pieces sent to other nodes.
# TYPE d7q_pieces_served_total counter
d7q_pieces_served_total 9
# HELP d7q_seed_decisions_total Seed answers to uploading peers' piece requests, by the rule that decided.
# TYPE d7q_seed_decisions_total counter
d7q_seed_decisions_total{{decision=\"first\"}} 0
d7q_seed_decisions_total{{decision=\"patience\"}} 0
d7q_seed_decisions_total{{decision=\"starvation\"}} 0
d7q_seed_decisions_total{{decision=\"overflow\"}} 0
d7q_seed_decisions_total{{decision=\"busy\"}} 3
d7q_seed_decisions_total{{decision=\"saturated\"}} 0
# HELP d7q_proxy_requests_total Requests the proxy handled, by what it did.
# TYPE d7q_proxy_requests_total counter
d7q_proxy_requests_total{{kind=\"blob_mesh\"}} 0
d7q_proxy_requests_total{{kind=\"blob_direct\"}} 0
d7q_proxy_requests_total{{kind=\"passthrough\"}} 0
d7q_proxy_requests_total{{kind=\"tunnel\"}} 0
d7q_proxy_requests_total{{kind=\"denied\"}} 0
d7q_proxy_requests_total{{kind=\"forward\"}} 0
# HELP d7q_proxy_blob_bytes_total Blob bytes the proxy served to clients from the mesh.
# TYPE d7q_proxy_blob_bytes_total counter
d7q_proxy_blob_bytes_total 0
# HELP d7q_proxy_token_requests_coalesced_total Token requests answered by another client's request.
# TYPE d7q_proxy_token_requests_coalesced_total counter
d7q_proxy_token_requests_coalesced_total 0
",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(m.render(), want);
    }

    #[test]
    fn labels_and_help_are_escaped() {
        let mut e = Encoder::default();
        e.header("x", "gauge", "a \"quoted\" back\\slash\nnewline");
        e.sample("x", &[("a", "q\"b\\n\nz"), ("b", "plain")], -2);
        assert_eq!(
            e.out,
            "# HELP x a \"quoted\" back\\\\slash\\nnewline\n\
             # TYPE x gauge\n\
             x{a=\"q\\\"b\\\\n\\nz\",b=\"plain\"} -2\n"
        );
    }

    #[test]
    fn concurrent_increments_all_count() {
        let m = Arc::new(Metrics::new(Role::Supernode));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.download_bytes(Source::Supernode).add(3);
                        m.upload_bytes().inc();
                        m.peers_connected().inc();
                        m.peers_connected().dec();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(m.download_bytes(Source::Supernode).value(), 8 * 10_000 * 3);
        assert_eq!(m.upload_bytes().value(), 8 * 10_000);
        assert_eq!(m.peers_connected().value(), 0);
        assert!(m
            .render()
            .contains("d7q_download_bytes_total{source=\"supernode\"} 240000\n"));
        assert!(m.render().contains("role=\"supernode\""));
    }

    #[test]
    fn handle_answers_only_its_own_paths() {
        let m = Metrics::new(Role::Daemon);
        let req = |method: Method, uri: &str| {
            Request::builder().method(method).uri(uri).body(()).unwrap()
        };
        let r = handle(&req(Method::GET, "/metrics?x=1"), &m).unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], CONTENT_TYPE);
        assert_eq!(
            handle(&req(Method::HEAD, "/health"), &m).unwrap().status(),
            StatusCode::OK
        );
        assert_eq!(
            handle(&req(Method::POST, "/metrics"), &m).unwrap().status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert!(handle(&req(Method::GET, "/v2/"), &m).is_none());
        assert!(handle(&req(Method::GET, "/metricsx"), &m).is_none());
        // A proxy request for someone else's /metrics is the proxy's business.
        assert!(handle(&req(Method::GET, "http://example.test/metrics"), &m).is_none());
    }

    /// One request on a fresh connection; returns status and body.
    async fn get(addr: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header(header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn serve_answers_metrics_health_and_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new(Role::Daemon));
        m.download_bytes(Source::Peer).add(123_456);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, m.clone(), async {
            let _ = stopped.await;
        }));

        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            body.contains("d7q_download_bytes_total{source=\"peer\"} 123456\n"),
            "{body}"
        );
        m.download_bytes(Source::Peer).add(1);
        let (_, body) = get(addr, "/metrics").await;
        assert!(body.contains("d7q_download_bytes_total{source=\"peer\"} 123457\n"));
        assert_eq!(get(addr, "/health").await, (StatusCode::OK, "ok\n".into()));
        assert_eq!(get(addr, "/nope").await.0, StatusCode::NOT_FOUND);

        stop.send(()).unwrap();
        server.await.unwrap();
        assert!(TcpStream::connect(addr).await.is_err(), "listener closed");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let m = Arc::new(Metrics::new(Role::Supernode));
        let server = tokio::spawn(serve(listener, m, std::future::pending()));

        // Fill every slot with a keep-alive connection the server has certainly accepted: each
        // has had one request answered.
        let mut held = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
            held.push(s);
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let _ = extra
            .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            .await;
        let mut buf = [0u8; 256];
        let n = extra.read(&mut buf).await.unwrap_or(0);
        assert_eq!(n, 0, "closed without an answer");

        // A freed slot is usable again.
        drop(held.pop());
        let mut answered = false;
        for _ in 0..500 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let _ = s
                .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                .await;
            if s.read(&mut buf).await.unwrap_or(0) > 0 {
                answered = true;
                break;
            }
            // The server sees the close on its own schedule; poll, do not time.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(answered);
        server.abort();
    }
}
