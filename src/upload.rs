//! The uploading side of a daemon: other peers subscribe to a task on a control stream (they
//! send their bitmap; we answer with ours, then a `Have` for every piece we store afterwards) and
//! fetch pieces on piece streams. Only pieces that were verified and stored are ever served.
//!
//! Uploads are charged to the machine-wide upload budget.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use d7q_wire::{
    Bitmap, BitmapUpdate, Capabilities, Control, ErrorCode, ErrorMsg, Have, HelloAck, Labels,
    NodeId, PieceHeader, PieceRequest, PieceStatus, TaskId,
};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::metrics::Metrics;
use crate::proto;
use crate::ratelimit::RateLimiter;
use crate::transport::{self, close};

/// How long a subscription waits for a task this node is about to start (the supernode may
/// hand us out as a parent a moment before our own download has its metadata).
pub const SUBSCRIBE_WAIT: Duration = Duration::from_secs(10);
/// Piece streams served at once per connection.
pub const MAX_UPLOADS_PER_CONNECTION: usize = 64;

/// What an uploader needs from the node's store.
pub trait PieceStore: Send + Sync + 'static {
    /// The task's current bitmap and a feed of pieces stored from now on, if the task is here.
    fn subscribe(&self, task: TaskId) -> Option<(Bitmap, broadcast::Receiver<u32>)>;
    /// Reads a stored piece (blocking IO); `None` if the piece or task is not here.
    fn read_piece(&self, task: TaskId, index: u32) -> Option<Vec<u8>>;
}

/// How this node uploads.
#[derive(Clone)]
pub struct UploadConfig {
    /// Piece uploads at once, shared by every connection (see [`crate::sched::UPLOAD_SLOTS`]).
    pub slots: Arc<tokio::sync::Semaphore>,
    /// Our node id.
    pub node_id: NodeId,
    /// Our labels.
    pub labels: Labels,
    /// The machine-wide upload budget.
    pub limiter: RateLimiter,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Test-only: flip a byte of every served piece, to exercise bad-peer isolation.
    pub danger_corrupt: bool,
}

/// Pieces corrupted on purpose by this process (`danger_corrupt`), for the rate-limited warning.
static CORRUPTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Serves one accepted mesh connection from another node.
pub async fn serve_connection<S: PieceStore>(
    conn: quinn::Connection,
    store: Arc<S>,
    cfg: UploadConfig,
) {
    let remote = conn.remote_address();
    if !transport::has_peer_certificate(&conn) {
        conn.close(close::NO_CERTIFICATE, b"client certificate required");
        return;
    }
    cfg.metrics.mesh_connections_accepted().inc();
    let mut path = transport::PathWatch::new(remote);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_UPLOADS_PER_CONNECTION));
    loop {
        let (send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                debug!(%remote, error = %transport::conn_error(remote, e), "peer connection ended");
                return;
            }
        };
        if let Some(old) = path.handle_remote(conn.remote_address()) {
            cfg.metrics.mesh_path_changes().inc();
            debug!(%old, new = %conn.remote_address(), "peer address changed");
        }
        let (store, cfg, conn2) = (store.clone(), cfg.clone(), conn.clone());
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // Too many at once from one peer: refuse this one, keep the connection.
            tokio::spawn(async move {
                let mut send = send;
                let _ = send
                    .write_all(&PieceHeader::refuse(PieceStatus::Busy).encode())
                    .await;
                let _ = send.finish();
            });
            continue;
        };
        tokio::spawn(async move {
            match proto::read_kind(&mut recv).await {
                Ok(d7q_wire::stream_kind::CONTROL) => control(send, recv, store, cfg).await,
                Ok(d7q_wire::stream_kind::PIECE) => piece(send, recv, store, cfg).await,
                Ok(_) => conn2.close(close::PROTOCOL, b"unknown stream kind"),
                Err(_) => {}
            }
            drop(permit);
        });
    }
}

async fn control<S: PieceStore>(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    store: Arc<S>,
    cfg: UploadConfig,
) {
    // Read through one cancel-safe reader: the loop below reads inside a `select!`.
    let mut recv = proto::FrameReader::new(recv);
    // A peer that opens the stream and says nothing loses it (and the slot it holds).
    match recv.expect_within::<Control>(proto::HELLO_TIMEOUT).await {
        Ok(Control::Hello(h)) if h.major == d7q_wire::MAJOR_VERSION => {}
        _ => return,
    }
    let ack = Control::HelloAck(HelloAck {
        major: d7q_wire::MAJOR_VERSION,
        minor: d7q_wire::MINOR_VERSION,
        node_id: cfg.node_id,
        labels: cfg.labels.clone(),
        capabilities: Capabilities(Capabilities::UPLOAD),
    });
    if proto::write_msg(&mut send, &ack).await.is_err() {
        return;
    }
    // One subscription per control stream: the child's download.
    let task = match recv.expect_within::<Control>(proto::REQUEST_TIMEOUT).await {
        Ok(Control::Bitmap(b)) => b.task,
        _ => return,
    };
    let mut sub = None;
    let deadline = tokio::time::Instant::now() + SUBSCRIBE_WAIT;
    while sub.is_none() && tokio::time::Instant::now() < deadline {
        sub = store.subscribe(task);
        if sub.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let Some((bitmap, mut haves)) = sub else {
        let err = ErrorMsg {
            task: Some(task),
            code: ErrorCode::UnknownTask,
            origin_status: None,
            message: "task not here".into(),
        };
        let _ = proto::write_msg(&mut send, &Control::Error(err)).await;
        let _ = send.finish();
        return;
    };
    if proto::write_msg(&mut send, &Control::Bitmap(BitmapUpdate { task, bitmap }))
        .await
        .is_err()
    {
        return;
    }
    loop {
        tokio::select! {
            have = haves.recv() => {
                let pieces = match have {
                    Ok(i) => {
                        let mut v = vec![i];
                        while let Ok(j) = haves.try_recv() {
                            v.push(j);
                        }
                        v
                    }
                    // Fell behind: resend the whole picture.
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let Some((bitmap, rx)) = store.subscribe(task) else { return };
                        haves = rx;
                        if proto::write_msg(&mut send, &Control::Bitmap(BitmapUpdate { task, bitmap })).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if proto::write_msg(&mut send, &Control::Have(Have { task, pieces })).await.is_err() {
                    return;
                }
            }
            msg = recv.next::<Control>() => {
                match msg {
                    Ok(Some(_)) => {}
                    _ => return,
                }
            }
        }
    }
}

async fn piece<S: PieceStore>(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    store: Arc<S>,
    cfg: UploadConfig,
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
    let (task, index) = (req.task, req.index);
    // Held until the child has the whole piece (or the stream ends).
    let Ok(_slot) = cfg.slots.clone().try_acquire_owned() else {
        let _ = send
            .write_all(&PieceHeader::refuse(PieceStatus::Saturated).encode())
            .await;
        let _ = send.finish();
        return;
    };
    let read = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.read_piece(task, index))
            .await
            .ok()
            .flatten()
    };
    let Some(mut bytes) = read else {
        let _ = send
            .write_all(&PieceHeader::refuse(PieceStatus::NotAvailable).encode())
            .await;
        let _ = send.finish();
        return;
    };
    cfg.limiter.acquire(bytes.len() as u64).await;
    if cfg.danger_corrupt {
        if let Some(b) = bytes.first_mut() {
            *b ^= 0xff;
        }
        // Loud, but rate-limited without a clock: the 1st, 2nd, 4th, 8th… corrupted piece.
        let n = CORRUPTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            warn!(%task, piece = index, corrupted = n, "--danger-corrupt-uploads: served a CORRUPT piece");
        }
    }
    let n = bytes.len() as u64;
    let delivered = async {
        send.write_all(&PieceHeader::ok(n as u32).encode())
            .await
            .ok()?;
        send.write_chunk(Bytes::from(bytes)).await.ok()?;
        send.finish().ok()?;
        // Once the peer has it all; a request it cancelled (an endgame duplicate, a piece it
        // got elsewhere first) is not an upload.
        matches!(send.stopped().await, Ok(None)).then_some(())
    };
    match tokio::time::timeout(proto::PIECE_SEND_TIMEOUT, delivered).await {
        Ok(Some(())) => {
            cfg.metrics.upload_bytes().add(n);
            cfg.metrics.pieces_served().inc();
        }
        Ok(None) => {}
        // A peer that stopped reading: free the slot.
        Err(_) => {
            let _ = send.reset(quinn::VarInt::from_u32(0));
        }
    }
}
