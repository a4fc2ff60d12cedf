//! The messages of the control stream and the piece request of a piece stream.
//!
//! Every enum here is append-only: a new variant goes at the end, and the golden tests in
//! `tests/golden.rs` pin the bytes of every existing one.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::Bitmap;

/// Identifies a task (one item of content): xxh3-128 of its OCI digest or of its normalized URL
/// and range. Computed by the `d7q` crate; here it is only sixteen bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub [u8; 16]);

/// Identifies a node: random at first start, then kept in its data directory.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct NodeId(pub [u8; 16]);

/// A SHA-256 digest.
pub type Sha256 = [u8; 32];

fn hex16(bytes: &[u8; 16], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex16(&self.0, f)
    }
}
impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({self})")
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        hex16(&self.0, f)
    }
}
impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({self})")
    }
}

/// Where a node sits, for locality-aware scheduling (same host > zone > dc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Labels {
    /// Datacenter.
    pub dc: String,
    /// Zone within the datacenter.
    pub zone: String,
    /// Host name.
    pub host: String,
}

/// What a node can do, as bits; unknown bits are ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities(pub u64);

impl Capabilities {
    /// The node seeds tasks from origins (a supernode).
    pub const SEED: u64 = 1 << 0;
    /// The node serves pieces to other nodes.
    pub const UPLOAD: u64 = 1 << 1;

    /// Whether every bit of `bits` is set.
    pub fn has(self, bits: u64) -> bool {
        self.0 & bits == bits
    }
}

/// First message on a control stream, from the side that opened the connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Major version; must equal the one in the ALPN.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    /// The sender's node id.
    pub node_id: NodeId,
    /// The sender's locality labels.
    pub labels: Labels,
    /// Where the sender accepts piece requests from other nodes, if it uploads.
    pub upload_addr: Option<SocketAddr>,
    /// What the sender can do.
    pub capabilities: Capabilities,
}

/// The answer to a [`Hello`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    /// Major version of the answering side.
    pub major: u16,
    /// Minor version of the answering side.
    pub minor: u16,
    /// The answering node's id.
    pub node_id: NodeId,
    /// The answering node's labels.
    pub labels: Labels,
    /// What the answering side can do.
    pub capabilities: Capabilities,
}

/// A byte range of the origin content, `start..end` (end exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A peer asks for a task: "make this content available and tell me about it".
///
/// Its `Debug` shows no secrets, because messages end up in errors and logs ("unexpected message
/// …"): the URL without its query (presigned URLs carry their signature there) and the headers'
/// names without their values.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Register {
    /// The task id the sender computed; the receiver recomputes it and refuses a mismatch.
    pub task: TaskId,
    /// Origin URL.
    pub url: String,
    /// Headers to pass to the origin (Authorization and the like).
    pub headers: Vec<(String, String)>,
    /// The content's expected SHA-256, when known (OCI digest or `--digest`).
    pub digest: Option<Sha256>,
    /// Only this range of the origin content.
    pub range: Option<ByteRange>,
}

impl fmt::Debug for Register {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // As d7q's `origin::redacted` shows URLs (this crate cannot depend on it).
        let url = match self.url.find(['?', '#']) {
            Some(i) => format!("{}?…", &self.url[..i]),
            None => self.url.clone(),
        };
        let headers: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Register")
            .field("task", &self.task)
            .field("url", &url)
            .field("headers", &headers)
            .field("digest", &self.digest)
            .field("range", &self.range)
            .finish()
    }
}

/// The shape of a task's content, known once the origin answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The task.
    pub task: TaskId,
    /// Content length in bytes.
    pub length: u64,
    /// Piece size in bytes (the last piece may be shorter).
    pub piece_size: u32,
    /// Number of pieces.
    pub piece_count: u32,
}

/// SHA-256 digests of consecutive pieces, starting at `first`, as they become known.
/// A digest sent by the seed over its authenticated connection is what receivers verify against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceDigests {
    /// The task.
    pub task: TaskId,
    /// Index of the first digest.
    pub first: u32,
    /// Digests of pieces `first..first + digests.len()`.
    pub digests: Vec<Sha256>,
}

/// A node another node may fetch pieces from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    /// Its node id.
    pub node_id: NodeId,
    /// Its upload address.
    pub addr: SocketAddr,
    /// Its labels.
    pub labels: Labels,
}

/// The parents a scheduler chose for a peer, best first; replaces any earlier list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Parents {
    /// The task.
    pub task: TaskId,
    /// The parents.
    pub parents: Vec<PeerInfo>,
}

/// The sender now has (verified) these pieces.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Have {
    /// The task.
    pub task: TaskId,
    /// Piece indices.
    pub pieces: Vec<u32>,
}

/// The sender's whole piece bitmap for a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BitmapUpdate {
    /// The task.
    pub task: TaskId,
    /// Which pieces the sender has.
    pub bitmap: Bitmap,
}

/// The seed has the whole content, verified.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskComplete {
    /// The task.
    pub task: TaskId,
    /// Content length.
    pub length: u64,
    /// SHA-256 of the whole content.
    pub sha256: Sha256,
}

/// Error codes; append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ErrorCode {
    /// The peers speak different major versions.
    VersionMismatch,
    /// A message was malformed or out of order.
    BadRequest,
    /// The sender is not allowed to do this.
    Forbidden,
    /// The origin answered with an HTTP error status (in [`ErrorMsg::origin_status`]).
    OriginStatus,
    /// The origin could not be reached (DNS, refused, TLS).
    OriginUnreachable,
    /// The origin's body ended early or the connection broke mid-body.
    OriginTruncated,
    /// The content does not match the expected digest.
    DigestMismatch,
    /// The content is larger than this node accepts.
    TooLarge,
    /// The task is unknown here.
    UnknownTask,
    /// The node is out of disk space.
    NoSpace,
    /// The node is overloaded; try elsewhere.
    Overloaded,
    /// Anything else.
    Internal,
    /// The node is shutting down.
    ShuttingDown,
}

/// An error about a task, or about the connection when `task` is `None`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// The task concerned.
    pub task: Option<TaskId>,
    /// What went wrong.
    pub code: ErrorCode,
    /// The origin's HTTP status, for [`ErrorCode::OriginStatus`].
    pub origin_status: Option<u16>,
    /// A one-line human description.
    pub message: String,
}

/// Why a peer is reported as bad; append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum BadPeerReason {
    /// It served a piece whose digest did not match.
    DigestMismatch,
    /// It did not answer in time.
    Timeout,
    /// It refused pieces it announced.
    Refused,
    /// It was far slower than its peers.
    Slow,
}

/// A report that a peer misbehaved on a task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BadPeerReport {
    /// The task.
    pub task: TaskId,
    /// The peer.
    pub peer: NodeId,
    /// Why.
    pub reason: BadPeerReason,
}

/// The sender is leaving (the connection closes next).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    /// Why, for logs.
    pub reason: String,
}

/// Every message of the control stream. Append-only.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Control {
    /// See [`Hello`].
    Hello(Hello),
    /// See [`HelloAck`].
    HelloAck(HelloAck),
    /// See [`Register`].
    Register(Register),
    /// See [`TaskMeta`].
    TaskMeta(TaskMeta),
    /// See [`PieceDigests`].
    PieceDigests(PieceDigests),
    /// See [`Parents`].
    Parents(Parents),
    /// See [`Have`].
    Have(Have),
    /// See [`BitmapUpdate`].
    Bitmap(BitmapUpdate),
    /// See [`TaskComplete`].
    TaskComplete(TaskComplete),
    /// See [`ErrorMsg`].
    Error(ErrorMsg),
    /// See [`BadPeerReport`].
    BadPeer(BadPeerReport),
    /// See [`Goodbye`].
    Goodbye(Goodbye),
    /// The sender holds these pieces of a task it did not register on this connection (a
    /// restarted daemon offering what its store kept): join the task's swarm as a holder.
    /// Never starts a download from the origin.
    Announce(BitmapUpdate),
}

/// The one message of a piece stream's request side: "send me piece `index` of `task`".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PieceRequest {
    /// The task.
    pub task: TaskId,
    /// The piece.
    pub index: u32,
}
