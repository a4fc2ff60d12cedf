//! QUIC endpoints of the mesh: one UDP port that speaks `d7q/1` (mesh) and `h3` (admin API),
//! mutual TLS against the cluster CA, transport parameters sized for bulk piece transfer, and
//! the translation of QUIC failures into errors a user can act on.
//!
//! Not for: what is said on the streams (see `proto` and `wire`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

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
/// Keep-alive so that NAT bindings and idle-timeouts do not drop a quiet control stream.
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);
/// A connection with no traffic at all for this long is dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
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

/// Transport parameters for mesh connections.
pub fn transport_config() -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_concurrent_bidi_streams(VarInt::from_u32(MAX_STREAMS_PER_CONNECTION));
    t.max_concurrent_uni_streams(VarInt::from_u32(16));
    t.stream_receive_window(VarInt::from_u32(STREAM_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(CONNECTION_RECEIVE_WINDOW));
    t.send_window(CONNECTION_RECEIVE_WINDOW as u64);
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.send_fairness(false);
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("idle timeout in range"),
    ));
    t
}

/// A mesh endpoint: serves `d7q/1` and `h3` when `serve` is set, and dials other nodes.
pub fn endpoint(
    identity: &NodeIdentity,
    listen: SocketAddr,
    serve: bool,
) -> Result<quinn::Endpoint, MeshError> {
    let transport = Arc::new(transport_config());
    let server = if serve {
        let tls = identity.server_config(&[d7q_wire::ALPN, d7q_wire::ADMIN_ALPN])?;
        let crypto =
            QuicServerConfig::try_from(tls).map_err(|e| MeshError::Setup(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        server.transport_config(transport);
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
    ep.set_default_client_config(client_config(identity, d7q_wire::ALPN)?);
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
