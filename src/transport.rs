//! QUIC endpoints of the mesh: one UDP port that speaks `d7q/1` (mesh) and `h3` (admin API),
//! mutual TLS against the cluster CA, transport parameters sized for bulk piece transfer on
//! lossy, long-RTT paths ([`Tuning`]), and the translation of QUIC failures into errors a user
//! can act on.
//!
//! The tuning is per process (one process is one node): the command line sets it once with
//! [`set_tuning`] before any endpoint is opened, and every endpoint and connection of the node
//! uses it; each path then adapts on its own (congestion control and RTT estimates are per
//! connection). Connection migration is on: a client whose address or port changes (a NAT
//! rebinding) keeps its connections.
//!
//! Not for: what is said on the streams (see `proto` and `wire`).

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use quinn::congestion::{BbrConfig, CubicConfig, NewRenoConfig};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, TransportErrorCode, VarInt};

use crate::pki::{NodeIdentity, PkiError, MESH_SERVER_NAME};

/// Most bidirectional streams a peer may have open on one connection (piece requests in
/// flight plus the control stream).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 512;
/// Per-stream receive window: a little more than the largest common piece.
pub const STREAM_RECEIVE_WINDOW: u32 = 4 << 20;
/// Per-connection receive window, sized for the bandwidth-delay product of a fast WAN path
/// (1 Gbit/s × 100 ms ≈ 12 MiB) with headroom for loopback.
pub const CONNECTION_RECEIVE_WINDOW: u32 = 64 << 20;
/// Largest window a configuration may ask for: the receive buffers are memory a peer can make
/// us hold.
pub const MAX_WINDOW: u64 = 1 << 30;
/// Smallest stream window a configuration may ask for: one piece must fit without stalls.
pub const MIN_STREAM_WINDOW: u64 = 1 << 20;
/// Keep-alive so that NAT bindings and idle-timeouts do not drop a quiet control stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);
/// A connection with no traffic at all for this long is dead. Long enough to ride out a
/// 10-second partition between datacenters: QUIC's probe timer backs off exponentially, so the
/// first packet after a 10 s cut may come ~19 s after the last one that got through.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Round-trip time assumed before the first sample. quinn's default (333 ms) makes the first
/// probe timeouts slow on a LAN; a WAN path corrects it with its first sample.
pub const INITIAL_RTT: Duration = Duration::from_millis(100);
/// Bounds on the configured initial RTT.
pub const MAX_INITIAL_RTT: Duration = Duration::from_secs(10);
/// Bounds on keep-alive and idle timeout.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);
/// Largest UDP payload we accept (Ethernet MTU less IP and UDP headers). Larger datagrams
/// were tried on loopback: at 16 KiB CONNECTION_CLOSE frames stopped arriving, and at 8952
/// (jumbo frames) a 512 MiB transfer ran at 230 MB/s against 329 MB/s at this size
/// (`d7q-bench transfer --size-mib 512 --reps 3`), so the mesh stays at Ethernet sizes.
pub const MAX_UDP_PAYLOAD: u16 = 1472;
/// Socket buffers asked of the kernel (it caps them at net.core.{r,w}mem_max unless root).
pub const SOCKET_BUFFER: usize = 8 << 20;

/// Application close codes on the mesh.
pub mod close {
    use quinn::VarInt;
    /// Normal goodbye.
    pub const DONE: VarInt = VarInt::from_u32(0);
    /// The peer presented no client certificate.
    pub const NO_CERTIFICATE: VarInt = VarInt::from_u32(1);
    /// The peer broke the protocol.
    pub const PROTOCOL: VarInt = VarInt::from_u32(2);
    /// The peer speaks another version.
    pub const VERSION: VarInt = VarInt::from_u32(3);
    /// Shutting down.
    pub const SHUTDOWN: VarInt = VarInt::from_u32(4);
}

/// Why the mesh failed us.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Nothing answered, or the path died.
    #[error("{addr} unreachable: {reason}")]
    Unreachable {
        /// The remote.
        addr: SocketAddr,
        /// What happened.
        reason: String,
    },
    /// The remote refused our certificate, or we refused its.
    #[error("{addr}: TLS certificate refused ({reason}); both nodes need certificates from the same cluster CA")]
    CertificateRefused {
        /// The remote.
        addr: SocketAddr,
        /// Details from TLS.
        reason: String,
    },
    /// No common protocol version.
    #[error("{addr}: protocol version mismatch: the remote does not speak {ours}")]
    VersionMismatch {
        /// The remote.
        addr: SocketAddr,
        /// Our ALPN.
        ours: String,
    },
    /// The remote broke the protocol.
    #[error("{addr}: protocol error: {reason}")]
    Protocol {
        /// The remote.
        addr: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The connection closed.
    #[error("{addr}: connection closed: {reason}")]
    Closed {
        /// The remote.
        addr: SocketAddr,
        /// Why.
        reason: String,
    },
    /// Local setup failed.
    #[error("mesh setup: {0}")]
    Setup(String),
}

impl From<PkiError> for MeshError {
    fn from(e: PkiError) -> Self {
        MeshError::Setup(e.to_string())
    }
}

/// Congestion controllers the mesh can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Congestion {
    /// BBR (model-based: does not read random loss as congestion).
    Bbr,
    /// CUBIC (loss-based, the TCP default).
    Cubic,
    /// NewReno (loss-based, the textbook one).
    NewReno,
}

impl std::str::FromStr for Congestion {
    type Err = TuningError;
    fn from_str(s: &str) -> Result<Self, TuningError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "bbr" => Ok(Congestion::Bbr),
            "cubic" => Ok(Congestion::Cubic),
            "newreno" | "new_reno" | "reno" => Ok(Congestion::NewReno),
            other => Err(TuningError::Congestion(other.to_string())),
        }
    }
}

impl std::fmt::Display for Congestion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Congestion::Bbr => "bbr",
            Congestion::Cubic => "cubic",
            Congestion::NewReno => "newreno",
        })
    }
}

/// Default congestion controller, chosen from measurements through the relay: 100 ms RTT,
/// 100 Mbit/s, 4 MiB per transfer, controllers interleaved, median of 3
/// (`d7q-bench cc --reps 3 --max-secs 20`). BBR 3.42 / 3.19 / 3.08 MB/s at 1 / 5 / 10 % loss,
/// CUBIC 0.22 / 0.077 / 0.048 MB/s: CUBIC reads random loss as congestion and collapses; BBR
/// does not.
pub const DEFAULT_CONGESTION: Congestion = Congestion::Bbr;

/// How the mesh's QUIC behaves on a path: configurable per node (`[transport]` in the config
/// file, `--congestion` and friends on the command line).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Congestion controller.
    pub congestion: Congestion,
    /// RTT assumed before the first sample.
    pub initial_rtt: Duration,
    /// Receive window per stream, bytes.
    pub stream_window: u64,
    /// Receive (and send) window per connection, bytes: at least the path's bandwidth-delay
    /// product, or a long fat path never fills.
    pub connection_window: u64,
    /// Keep-alive interval (zero: none).
    pub keep_alive: Duration,
    /// Idle timeout.
    pub idle_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            congestion: DEFAULT_CONGESTION,
            initial_rtt: INITIAL_RTT,
            stream_window: u64::from(STREAM_RECEIVE_WINDOW),
            connection_window: u64::from(CONNECTION_RECEIVE_WINDOW),
            keep_alive: KEEP_ALIVE,
            idle_timeout: IDLE_TIMEOUT,
        }
    }
}

/// A tuning value out of its bounds.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TuningError {
    /// Unknown controller name.
    #[error("unknown congestion controller {0:?}; expected bbr, cubic or newreno")]
    Congestion(String),
    /// Something out of range.
    #[error("{key} must be {bounds}")]
    OutOfRange {
        /// Which setting.
        key: &'static str,
        /// What is allowed.
        bounds: String,
    },
}

impl Tuning {
    /// Checks every value against its bound.
    pub fn validate(&self) -> Result<(), TuningError> {
        let bad = |key: &'static str, bounds: String| Err(TuningError::OutOfRange { key, bounds });
        if self.initial_rtt.is_zero() || self.initial_rtt > MAX_INITIAL_RTT {
            return bad(
                "initial_rtt",
                format!("above 0 and at most {MAX_INITIAL_RTT:?}"),
            );
        }
        if !(MIN_STREAM_WINDOW..=MAX_WINDOW).contains(&self.stream_window) {
            return bad(
                "stream_window",
                format!("between {MIN_STREAM_WINDOW} and {MAX_WINDOW} bytes"),
            );
        }
        if !(self.stream_window..=MAX_WINDOW).contains(&self.connection_window) {
            return bad(
                "connection_window",
                format!("at least stream_window and at most {MAX_WINDOW} bytes"),
            );
        }
        if self.idle_timeout < Duration::from_secs(1) || self.idle_timeout > MAX_TIMEOUT {
            return bad("idle_timeout", format!("between 1s and {MAX_TIMEOUT:?}"));
        }
        if self.keep_alive >= self.idle_timeout {
            return bad("keep_alive", "shorter than idle_timeout (0: none)".into());
        }
        Ok(())
    }

    /// quinn's transport parameters for this tuning.
    pub fn transport_config(&self) -> quinn::TransportConfig {
        let mut t = quinn::TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
        t.max_concurrent_uni_streams(VarInt::from_u32(16));
        let window = |v: u64| VarInt::from_u64(v.min(MAX_WINDOW)).expect("bounded window");
        t.stream_receive_window(window(self.stream_window));
        t.receive_window(window(self.connection_window));
        t.send_window(self.connection_window.min(MAX_WINDOW));
        t.keep_alive_interval((!self.keep_alive.is_zero()).then_some(self.keep_alive));
        t.send_fairness(false);
        t.initial_rtt(self.initial_rtt);
        let idle = self.idle_timeout.min(MAX_TIMEOUT);
        t.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle).expect("idle timeout in range"),
        ));
        match self.congestion {
            Congestion::Bbr => t.congestion_controller_factory(Arc::new(BbrConfig::default())),
            Congestion::Cubic => t.congestion_controller_factory(Arc::new(CubicConfig::default())),
            Congestion::NewReno => {
                t.congestion_controller_factory(Arc::new(NewRenoConfig::default()))
            }
        };
        t
    }
}

/// The process's tuning; `None` until [`set_tuning`] (then the defaults apply).
static TUNING: RwLock<Option<Tuning>> = RwLock::new(None);

/// Sets the tuning every endpoint opened from now on uses.
pub fn set_tuning(t: Tuning) -> Result<(), TuningError> {
    t.validate()?;
    *TUNING.write().unwrap_or_else(|e| e.into_inner()) = Some(t);
    Ok(())
}

/// The tuning in force.
pub fn tuning() -> Tuning {
    TUNING
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Transport parameters for mesh connections, from the process's [`tuning`].
pub fn transport_config() -> quinn::TransportConfig {
    tuning().transport_config()
}

/// A mesh endpoint: serves `d7q/1` and `h3` when `serve` is set, and dials other nodes; with
/// the process's [`tuning`].
pub fn endpoint(
    identity: &NodeIdentity,
    listen: SocketAddr,
    serve: bool,
) -> Result<quinn::Endpoint, MeshError> {
    endpoint_with(identity, listen, serve, &tuning())
}

/// [`endpoint`] with an explicit tuning (measurements compare several in one process).
pub fn endpoint_with(
    identity: &NodeIdentity,
    listen: SocketAddr,
    serve: bool,
    tuning: &Tuning,
) -> Result<quinn::Endpoint, MeshError> {
    let transport = Arc::new(tuning.transport_config());
    let server = if serve {
        let tls = identity.server_config(&[d7q_wire::ALPN, d7q_wire::ADMIN_ALPN])?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| MeshError::Setup(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport.clone());
        // A client behind a NAT that rebinds keeps its connections (and its downloads).
        server.migration(true);
        Some(server)
    } else {
        None
    };
    let socket = udp_socket(listen).map_err(|e| MeshError::Setup(format!("bind {listen}: {e}")))?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(|e| MeshError::Setup(e.to_string()))?;
    let mut ep = quinn::Endpoint::new(config, server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| MeshError::Setup(format!("bind {listen}: {e}")))?;
    let tls = identity.client_config(&[d7q_wire::ALPN])?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| MeshError::Setup(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport);
    ep.set_default_client_config(client);
    Ok(ep)
}

/// A UDP socket with large buffers, so bursts at high rates are not dropped by the kernel.
fn udp_socket(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use std::os::fd::AsRawFd;
    let socket = std::net::UdpSocket::bind(addr)?;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        let size = SOCKET_BUFFER as libc::c_int;
        // SAFETY: a valid fd, a pointer to a c_int and its size. Failure only leaves the
        // kernel's default buffer, which works, more slowly.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                &size as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    Ok(socket)
}

/// A client configuration speaking `alpn`.
pub fn client_config(
    identity: &NodeIdentity,
    alpn: &[u8],
) -> Result<quinn::ClientConfig, MeshError> {
    let tls = identity.client_config(&[alpn])?;
    let crypto = QuicClientConfig::try_from(tls).map_err(|e| MeshError::Setup(e.to_string()))?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    cfg.transport_config(Arc::new(transport_config()));
    Ok(cfg)
}

/// Dials a mesh node with the endpoint's default configuration.
pub async fn connect(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
) -> Result<quinn::Connection, MeshError> {
    connect_with(ep, addr, None).await
}

/// Dials a node with an explicit client configuration (tests use it to speak other versions).
pub async fn connect_with(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    cfg: Option<quinn::ClientConfig>,
) -> Result<quinn::Connection, MeshError> {
    let connecting = match cfg {
        Some(cfg) => ep.connect_with(cfg, addr, MESH_SERVER_NAME),
        None => ep.connect(addr, MESH_SERVER_NAME),
    }
    .map_err(|e| MeshError::Unreachable {
        addr,
        reason: e.to_string(),
    })?;
    connecting.await.map_err(|e| conn_error(addr, e))
}

/// Notices an accepted connection's peer address changing under it (QUIC migration: a NAT
/// rebinding, a client changing networks), so the node can count it. quinn raises no event when
/// it switches paths, so the owner of a connection hands in `remote_address()` whenever it
/// looks at the connection anyway (each accepted stream): a move shows at the next stream.
#[derive(Debug, Clone, Copy)]
pub struct PathWatch {
    last: SocketAddr,
}

impl PathWatch {
    /// Starts from the address the handshake came from.
    pub fn new(remote: SocketAddr) -> Self {
        Self { last: remote }
    }

    /// Takes the connection's current peer address; the previous one if it moved.
    pub fn handle_remote(&mut self, remote: SocketAddr) -> Option<SocketAddr> {
        (remote != self.last).then(|| std::mem::replace(&mut self.last, remote))
    }
}

/// The ALPN a connection negotiated.
pub fn alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Whether the remote presented a (verified) certificate.
pub fn has_peer_certificate(conn: &quinn::Connection) -> bool {
    conn.peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .is_some_and(|chain| !chain.is_empty())
}

const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// Turns a QUIC connection failure into a [`MeshError`] that says what to fix.
pub fn conn_error(addr: SocketAddr, e: ConnectionError) -> MeshError {
    let ours = String::from_utf8_lossy(d7q_wire::ALPN).into_owned();
    match e {
        ConnectionError::TransportError(t) => classify(addr, t.code, t.reason, ours),
        ConnectionError::ConnectionClosed(c) => classify(
            addr,
            c.error_code,
            String::from_utf8_lossy(&c.reason).into_owned(),
            ours,
        ),
        ConnectionError::ApplicationClosed(c) if c.error_code == close::NO_CERTIFICATE => {
            MeshError::CertificateRefused {
                addr,
                reason: "no client certificate presented".into(),
            }
        }
        ConnectionError::ApplicationClosed(c) if c.error_code == close::VERSION => {
            MeshError::VersionMismatch { addr, ours }
        }
        ConnectionError::ApplicationClosed(c) => MeshError::Closed {
            addr,
            reason: format!(
                "code {}: {}",
                c.error_code,
                String::from_utf8_lossy(&c.reason)
            ),
        },
        ConnectionError::TimedOut => MeshError::Unreachable {
            addr,
            reason: "timed out".into(),
        },
        ConnectionError::VersionMismatch => MeshError::Unreachable {
            addr,
            reason: "no common QUIC version".into(),
        },
        other => MeshError::Closed {
            addr,
            reason: other.to_string(),
        },
    }
}

fn classify(addr: SocketAddr, code: TransportErrorCode, reason: String, ours: String) -> MeshError {
    if code == TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL) {
        return MeshError::VersionMismatch { addr, ours };
    }
    let crypto = (0x100..0x200).contains(&u64::from(code));
    if crypto {
        let reason = if reason.is_empty() {
            format!("TLS alert {}", u64::from(code) - 0x100)
        } else {
            reason
        };
        return MeshError::CertificateRefused { addr, reason };
    }
    MeshError::Closed {
        addr,
        reason: format!("{code}: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_watch_reports_each_move_once() {
        let a: SocketAddr = "127.0.0.1:1000".parse().unwrap();
        let b: SocketAddr = "127.0.0.1:2000".parse().unwrap();
        let mut w = PathWatch::new(a);
        assert_eq!(w.handle_remote(a), None);
        assert_eq!(w.handle_remote(b), Some(a));
        assert_eq!(w.handle_remote(b), None);
        assert_eq!(w.handle_remote(a), Some(b));
    }

    #[test]
    fn tuning_defaults_are_valid_and_bounds_are_named() {
        Tuning::default().validate().unwrap();
        assert_eq!("BBR".parse::<Congestion>().unwrap(), Congestion::Bbr);
        assert_eq!(
            "newreno".parse::<Congestion>().unwrap(),
            Congestion::NewReno
        );
        assert!("vegas".parse::<Congestion>().is_err());
        let bad = |t: Tuning| match t.validate() {
            Err(TuningError::OutOfRange { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        let d = Tuning::default;
        assert_eq!(
            bad(Tuning {
                initial_rtt: Duration::ZERO,
                ..d()
            }),
            "initial_rtt"
        );
        assert_eq!(
            bad(Tuning {
                stream_window: 1024,
                ..d()
            }),
            "stream_window"
        );
        assert_eq!(
            bad(Tuning {
                connection_window: MAX_WINDOW + 1,
                ..d()
            }),
            "connection_window"
        );
        assert_eq!(
            bad(Tuning {
                keep_alive: Duration::from_secs(40),
                ..d()
            }),
            "keep_alive"
        );
        assert_eq!(
            bad(Tuning {
                idle_timeout: Duration::from_secs(3600),
                ..d()
            }),
            "idle_timeout"
        );
        // Every controller builds a transport configuration.
        for c in [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno] {
            let _ = Tuning {
                congestion: c,
                ..d()
            }
            .transport_config();
        }
    }
}
