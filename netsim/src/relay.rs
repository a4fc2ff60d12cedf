//! A UDP relay that puts a [`Link`] in each direction between clients and one server.
//!
//! For: running real QUIC endpoints (or anything over UDP) across an impaired path with no
//! privileges — point the client at the relay's address instead of the server's. Each client
//! source address gets a session with its own upstream socket, so the server sees one distinct,
//! stable peer address per client (a normal path, as through a NAT), and
//! [`RelayHandle::rebind_client_side`] can change that address to exercise connection migration.
//! Not for: TCP or anything below UDP (that is the TUN link's job), nor for deciding what happens
//! to packets — that is all in [`crate::link`]; this module only receives, asks, waits and sends.
//!
//! Shape: one task reads the client-side socket, one task per session reads its upstream socket,
//! and one scheduler task sends every packet at its delivery time from a heap ordered by time.
//! All state sits behind one `std::sync::Mutex`, never held across an `.await`. Memory is bounded
//! by [`MAX_SESSIONS`], [`MAX_PENDING_PACKETS`] and [`MAX_PENDING_BYTES`]; a link's own queue
//! limit applies first when it has a rate.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::sync::Notify;
use tokio::task::{AbortHandle, JoinHandle};
use tracing::Instrument;

use crate::link::{ConfigError, DurationSummary, Link, LinkConfig, LinkStats};

/// Receive buffer size: the largest UDP payload, so nothing is ever truncated.
pub const MAX_DATAGRAM_SIZE: usize = 65_535;
/// Default bound on concurrent sessions (client source addresses); packets from further clients
/// are dropped and counted.
pub const MAX_SESSIONS: usize = 1024;
/// Default time after which a session with no packet in either direction is forgotten, as a NAT
/// forgets a mapping; its next packet opens a new session with a new upstream port.
pub const SESSION_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most packets waiting for their delivery time, both directions together.
pub const MAX_PENDING_PACKETS: usize = 65_536;
/// Most bytes waiting for their delivery time, both directions together.
pub const MAX_PENDING_BYTES: usize = 64 << 20;
/// Longest gap between sweeps for idle sessions (shorter when the idle timeout is short).
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Pause after an unexpected receive error, so a persistent one cannot spin a core.
const RECV_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// How long the scheduler sleeps with nothing pending; a new packet wakes it sooner.
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// Mixed into the seed for the down link so the two directions draw unrelated streams.
const DOWN_SEED_MIX: u64 = 0x9e37_79b9_7f4a_7c15;

/// Which way a packet travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

/// How to run a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Client-side address to listen on (port 0 picks one; see [`Relay::local_addr`]).
    pub listen: SocketAddr,
    /// The server every session forwards to.
    pub target: SocketAddr,
    /// Client-to-server link.
    pub up: LinkConfig,
    /// Server-to-client link.
    pub down: LinkConfig,
    /// Seed for both links; the same seed and the same packet order give the same fates.
    pub seed: u64,
    /// Bound on concurrent sessions.
    pub max_sessions: usize,
    /// Idle time after which a session is dropped.
    pub idle_timeout: Duration,
}

/// What the relay has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayStats {
    /// The client-to-server link.
    pub up: LinkStats,
    /// The server-to-client link.
    pub down: LinkStats,
    /// Sessions open now.
    pub sessions_active: u64,
    /// Sessions opened since start.
    pub sessions_opened: u64,
    /// Sessions dropped for being idle.
    pub sessions_expired: u64,
    /// Packets from new clients dropped because [`RelayConfig::max_sessions`] were open.
    pub refused_packets: u64,
    /// Upstream sockets that could not be opened.
    pub upstream_errors: u64,
    /// Upstream sockets replaced by [`RelayHandle::rebind_client_side`].
    pub rebinds: u64,
    /// Packets a link delivered but the relay had no room to hold.
    pub overflow_dropped: u64,
    /// Packets whose session was gone (expired, or rebound) when they were due.
    pub orphaned_dropped: u64,
    /// Sends that failed.
    pub send_errors: u64,
    /// Receives that failed.
    pub recv_errors: u64,
    /// How long after its scheduled arrival each packet was handed to the socket: the relay's
    /// own lateness in real time, which grows on a loaded machine. For benchmarks; the
    /// schedule itself is in each link's `scheduled_delay`.
    pub lateness: DurationSummary,
}

/// One session as seen from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionInfo {
    /// The client's source address.
    pub client: SocketAddr,
    /// The upstream socket's local address: what the server sees as the client.
    pub upstream_local: SocketAddr,
}

/// Why a relay operation failed.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum RelayError {
    /// The client-side socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address asked for.
        addr: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// An upstream socket could not be opened or pointed at the target.
    #[error("cannot open an upstream socket to {target}: {source}")]
    Upstream {
        /// The server.
        target: SocketAddr,
        /// What the OS said.
        source: io::Error,
    },
    /// A link configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The relay has been dropped.
    #[error("the relay has shut down")]
    Closed,
}

/// A running relay. Dropping it stops every task and closes every socket.
#[derive(Debug)]
pub struct Relay {
    handle: RelayHandle,
    tasks: Vec<JoinHandle<()>>,
}

/// Reads statistics and changes the relay while it runs; cheap to clone.
#[derive(Debug, Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

impl RelayConfig {
    /// A relay with perfect links, seed 0 and the default limits.
    pub fn new(listen: SocketAddr, target: SocketAddr) -> Self {
        Self {
            listen,
            target,
            up: LinkConfig::default(),
            down: LinkConfig::default(),
            seed: 0,
            max_sessions: MAX_SESSIONS,
            idle_timeout: SESSION_IDLE_TIMEOUT,
        }
    }
}

impl Relay {
    /// Binds the client-side socket and starts relaying. Partition schedules count from now.
    pub async fn bind(config: RelayConfig) -> Result<Self, RelayError> {
        let start = clock();
        let up = Link::new(config.up, config.seed, start)?;
        let down = Link::new(config.down, config.seed ^ DOWN_SEED_MIX, start)?;
        let listen = UdpSocket::bind(config.listen)
            .await
            .map_err(|source| RelayError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = listen.local_addr().map_err(|source| RelayError::Listen {
            addr: config.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            target: config.target,
            listen,
            local_addr,
            wake: Notify::new(),
            state: Mutex::new(State {
                up,
                down,
                pending: BinaryHeap::new(),
                pending_bytes: 0,
                next_seq: 0,
                sessions: HashMap::new(),
                max_sessions: config.max_sessions,
                idle_timeout: config.idle_timeout,
                closed: false,
                stats: RelayStats::default(),
            }),
        });
        let span = tracing::info_span!("relay", listen = %local_addr, target = %config.target);
        let tasks = vec![
            tokio::spawn(client_side(shared.clone()).instrument(span.clone())),
            tokio::spawn(scheduler(shared.clone(), config.idle_timeout).instrument(span)),
        ];
        tracing::info!(listen = %local_addr, target = %config.target, seed = config.seed, "relay ready");
        Ok(Self {
            handle: RelayHandle { shared },
            tasks,
        })
    }

    /// The client-side address clients should send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.shared.local_addr
    }

    /// A handle for statistics and runtime changes.
    pub fn handle(&self) -> RelayHandle {
        self.handle.clone()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let mut state = self.handle.shared.lock();
        state.closed = true;
        // Dropping the sessions aborts their receivers, which hold the last references to the
        // shared state; without this the state and its sockets would outlive the relay.
        state.sessions.clear();
        state.pending.clear();
        state.pending_bytes = 0;
    }
}

impl RelayHandle {
    /// The client-side address clients should send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local_addr
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> RelayStats {
        let state = self.shared.lock();
        RelayStats {
            up: state.up.stats().clone(),
            down: state.down.stats().clone(),
            sessions_active: state.sessions.len() as u64,
            ..state.stats.clone()
        }
    }

    /// The configuration in force for one direction.
    pub fn link_config(&self, direction: Direction) -> LinkConfig {
        self.shared.lock().link(direction).config().clone()
    }

    /// Replaces one direction's configuration; its partition schedule still counts from the
    /// relay's start, and packets already on their way keep their delivery time.
    pub fn set_config(&self, direction: Direction, config: LinkConfig) -> Result<(), RelayError> {
        Ok(self.shared.lock().link(direction).set_config(config)?)
    }

    /// Cuts both directions from now for `duration`.
    pub fn partition(&self, duration: Duration) -> Result<(), RelayError> {
        let now = clock();
        let mut state = self.shared.lock();
        state.up.add_partition(now, duration)?;
        state.down.add_partition(now, duration)?;
        Ok(())
    }

    /// Cuts one direction from now for `duration` (an asymmetric failure).
    pub fn partition_one_way(
        &self,
        direction: Direction,
        duration: Duration,
    ) -> Result<(), RelayError> {
        let now = clock();
        Ok(self
            .shared
            .lock()
            .link(direction)
            .add_partition(now, duration)?)
    }

    /// The open sessions.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        self.shared
            .lock()
            .sessions
            .iter()
            .map(|(client, s)| SessionInfo {
                client: *client,
                upstream_local: s.upstream_local,
            })
            .collect()
    }

    /// Gives every open session a fresh upstream socket (a new source port), so the server sees
    /// each client's address change mid-connection — as when a NAT rebinds or a laptop changes
    /// networks. The client side is untouched. Packets the server still sends to the old address
    /// are lost, as they would be. Returns how many sessions were rebound.
    pub async fn rebind_client_side(&self) -> Result<usize, RelayError> {
        let clients: Vec<SocketAddr> = {
            let state = self.shared.lock();
            if state.closed {
                return Err(RelayError::Closed);
            }
            state.sessions.keys().copied().collect()
        };
        let mut rebound = 0;
        for client in clients {
            let (socket, local) = open_upstream(self.shared.target).await?;
            let mut state = self.shared.lock();
            if state.closed {
                return Err(RelayError::Closed);
            }
            // A session that expired meanwhile has nothing to rebind.
            let Some(last_active) = state.sessions.get(&client).map(|s| s.last_active) else {
                continue;
            };
            let session = start_session(&self.shared, client, socket, local, last_active);
            tracing::info!(%client, upstream = %local, "session rebound");
            // Replacing the old session drops it, which aborts its receiver and closes its socket.
            state.sessions.insert(client, session);
            state.stats.rebinds += 1;
            rebound += 1;
        }
        Ok(rebound)
    }
}

#[derive(Debug)]
struct Shared {
    target: SocketAddr,
    listen: UdpSocket,
    local_addr: SocketAddr,
    /// Wakes the scheduler when a packet is due earlier than anything it is waiting for.
    wake: Notify,
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    up: Link,
    down: Link,
    pending: BinaryHeap<Reverse<Pending>>,
    pending_bytes: usize,
    /// Breaks ties between packets due at the same instant, so they leave in arrival order.
    next_seq: u64,
    sessions: HashMap<SocketAddr, Session>,
    max_sessions: usize,
    idle_timeout: Duration,
    closed: bool,
    /// The relay's own counters; the link and session fields are filled in by `stats()`.
    stats: RelayStats,
}

#[derive(Debug)]
struct Pending {
    at: Instant,
    seq: u64,
    direction: Direction,
    client: SocketAddr,
    data: Vec<u8>,
}

#[derive(Debug)]
struct Session {
    upstream: Arc<UdpSocket>,
    upstream_local: SocketAddr,
    receiver: AbortHandle,
    last_active: Instant,
}

impl Shared {
    /// The std mutex, recovered if poisoned: the state is counters and queues that stay
    /// consistent at every unlock, so a panic elsewhere is no reason to stop relaying.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs a packet through its direction's link and queues its deliveries.
    fn admit(&self, state: &mut State, direction: Direction, client: SocketAddr, data: &[u8]) {
        let now = clock();
        let verdict = state.link(direction).handle_packet(now, data.len());
        let mut earliest = false;
        for at in verdict.delivery_times() {
            if state.pending.len() >= MAX_PENDING_PACKETS
                || state.pending_bytes + data.len() > MAX_PENDING_BYTES
            {
                state.stats.overflow_dropped += 1;
                continue;
            }
            earliest |= state.pending.peek().is_none_or(|Reverse(p)| at < p.at);
            let seq = state.next_seq;
            state.next_seq += 1;
            state.pending_bytes += data.len();
            state.pending.push(Reverse(Pending {
                at,
                seq,
                direction,
                client,
                data: data.to_vec(),
            }));
        }
        if earliest {
            self.wake.notify_one();
        }
    }
}

impl State {
    fn link(&mut self, direction: Direction) -> &mut Link {
        match direction {
            Direction::Up => &mut self.up,
            Direction::Down => &mut self.down,
        }
    }

    fn expire_idle(&mut self, now: Instant) {
        let timeout = self.idle_timeout;
        let before = self.sessions.len();
        self.sessions.retain(|client, s| {
            let keep = now.saturating_duration_since(s.last_active) < timeout;
            if !keep {
                tracing::debug!(%client, "session expired");
            }
            keep
        });
        self.stats.sessions_expired += (before - self.sessions.len()) as u64;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.receiver.abort();
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// The relay's clock. tokio's, so that a paused test clock would apply, converted to the std
/// `Instant` the link model speaks.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// Reads packets from clients, opening sessions for new ones.
async fn client_side(shared: Arc<Shared>) {
    let mut buf = vec![0u8; MAX_DATAGRAM_SIZE];
    loop {
        let (len, client) = match shared.listen.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(error) => {
                recv_failed(&shared, &error).await;
                continue;
            }
        };
        let known = {
            let mut state = shared.lock();
            let (open, max) = (state.sessions.len(), state.max_sessions);
            match state.sessions.get_mut(&client) {
                Some(session) => {
                    session.last_active = clock();
                    true
                }
                None if open >= max => {
                    state.stats.refused_packets += 1;
                    continue;
                }
                None => false,
            }
        };
        if !known {
            match open_upstream(shared.target).await {
                Ok((socket, local)) => {
                    let mut state = shared.lock();
                    let session = start_session(&shared, client, socket, local, clock());
                    state.sessions.insert(client, session);
                    state.stats.sessions_opened += 1;
                    tracing::info!(%client, upstream = %local, "session opened");
                }
                Err(error) => {
                    tracing::warn!(%client, %error, "cannot open session");
                    shared.lock().stats.upstream_errors += 1;
                    continue;
                }
            }
        }
        let mut state = shared.lock();
        shared.admit(&mut state, Direction::Up, client, &buf[..len]);
    }
}

/// Reads packets the server sends to one session's upstream socket.
async fn upstream_side(shared: Arc<Shared>, client: SocketAddr, socket: Arc<UdpSocket>) {
    let mut buf = vec![0u8; MAX_DATAGRAM_SIZE];
    loop {
        // The socket is connected to the target, so the kernel drops datagrams from anyone else.
        let len = match socket.recv(&mut buf).await {
            Ok(len) => len,
            Err(error) => {
                recv_failed(&shared, &error).await;
                continue;
            }
        };
        let mut state = shared.lock();
        match state.sessions.get_mut(&client) {
            Some(session) if Arc::ptr_eq(&session.upstream, &socket) => {
                session.last_active = clock();
            }
            // Expired or rebound while this packet was on its way: lost, as behind a NAT that
            // forgot the mapping.
            _ => {
                state.stats.orphaned_dropped += 1;
                return;
            }
        }
        shared.admit(&mut state, Direction::Down, client, &buf[..len]);
    }
}

/// Sends every packet at its delivery time, and sweeps idle sessions.
async fn scheduler(shared: Arc<Shared>, idle_timeout: Duration) {
    let sweep_every = (idle_timeout / 2).clamp(Duration::from_millis(1), MAX_SWEEP_INTERVAL);
    let mut next_sweep = clock() + sweep_every;
    let mut due: Vec<(Option<Arc<UdpSocket>>, Pending)> = Vec::new();
    loop {
        let now = clock();
        let next_at = {
            let mut state = shared.lock();
            if now >= next_sweep {
                state.expire_idle(now);
                next_sweep = now + sweep_every;
            }
            while state.pending.peek().is_some_and(|Reverse(p)| p.at <= now) {
                let Some(Reverse(packet)) = state.pending.pop() else {
                    break;
                };
                state.pending_bytes = state.pending_bytes.saturating_sub(packet.data.len());
                let socket = match packet.direction {
                    // Looked up at send time, so a rebind applies to packets already queued.
                    Direction::Up => match state.sessions.get(&packet.client) {
                        Some(session) => Some(session.upstream.clone()),
                        None => {
                            state.stats.orphaned_dropped += 1;
                            continue;
                        }
                    },
                    Direction::Down => None,
                };
                due.push((socket, packet));
            }
            state.pending.peek().map(|Reverse(p)| p.at)
        };
        if !due.is_empty() {
            let mut lateness = DurationSummary::default();
            let mut failed = 0;
            for (socket, packet) in due.drain(..) {
                lateness.record(clock().saturating_duration_since(packet.at));
                let sent = match socket {
                    Some(upstream) => upstream.send(&packet.data).await,
                    None => shared.listen.send_to(&packet.data, packet.client).await,
                };
                if let Err(error) = sent {
                    tracing::debug!(client = %packet.client, direction = ?packet.direction, %error, "send failed");
                    failed += 1;
                }
            }
            // Once per batch, so a burst of due packets takes the lock once, not per packet.
            let mut state = shared.lock();
            state.stats.lateness.merge(&lateness);
            state.stats.send_errors += failed;
        }
        let deadline = next_at.unwrap_or(now + IDLE_WAIT).min(next_sweep);
        tokio::select! {
            () = tokio::time::sleep_until(deadline.into()) => {}
            () = shared.wake.notified() => {}
        }
    }
}

/// A fresh socket on an ephemeral port, connected to the target so that `send` needs no address
/// and the kernel filters out anyone else.
async fn open_upstream(target: SocketAddr) -> Result<(Arc<UdpSocket>, SocketAddr), RelayError> {
    let any: SocketAddr = match target {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let err = |source| RelayError::Upstream { target, source };
    let socket = UdpSocket::bind(any).await.map_err(err)?;
    socket.connect(target).await.map_err(err)?;
    let local = socket.local_addr().map_err(err)?;
    Ok((Arc::new(socket), local))
}

/// Starts the receiver for a session's upstream socket. Called with the state locked, so the
/// receiver cannot look for its session before the caller has inserted it.
fn start_session(
    shared: &Arc<Shared>,
    client: SocketAddr,
    upstream: Arc<UdpSocket>,
    upstream_local: SocketAddr,
    last_active: Instant,
) -> Session {
    let span = tracing::debug_span!("session", %client, upstream = %upstream_local);
    let receiver =
        tokio::spawn(upstream_side(shared.clone(), client, upstream.clone()).instrument(span))
            .abort_handle();
    Session {
        upstream,
        upstream_local,
        receiver,
        last_active,
    }
}

async fn recv_failed(shared: &Shared, error: &io::Error) {
    shared.lock().stats.recv_errors += 1;
    match error.kind() {
        // An ICMP "port unreachable" reported on a connected socket: the server is not (yet)
        // there. Expected and harmless; keep reading at once.
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionReset => {}
        _ => {
            tracing::warn!(%error, "receive failed");
            tokio::time::sleep(RECV_ERROR_BACKOFF).await;
        }
    }
}
