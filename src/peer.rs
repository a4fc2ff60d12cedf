//! The downloading side of a peer: register a task with a supernode, fetch its pieces over the
//! mesh with several in flight, verify each against the digest the seed published, write them
//! at their offsets into a preallocated temporary file, verify the whole, fsync once and rename
//! into place. Any failure removes the temporary file: the user's FILE is whole and right, or
//! absent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use d7q_wire::{
    Capabilities, Control, ErrorCode, ErrorMsg, Goodbye, Hello, Labels, NodeId, PieceHeader,
    PieceRequest, PieceStatus, Register, Sha256, TaskId,
};
use sha2::Digest;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{debug, info};

use crate::proto;
use crate::sched::picker::PiecePicker;
use crate::store::{DataFile, StoreError, TempOutput};
use crate::task::{self, Geometry};
use crate::transport::{self, close, MeshError};

/// Piece requests in flight to one source.
pub const MAX_IN_FLIGHT: usize = 24;
/// Verified pieces queued toward the disk writer.
pub const WRITE_QUEUE_PIECES: usize = 16;
/// Out-of-order pieces kept in memory for the whole-content hash before it re-reads them.
pub const HASH_WINDOW_PIECES: usize = 64;
/// How long one piece may take.
pub const PIECE_TIMEOUT: Duration = Duration::from_secs(60);
/// Attempts per piece before the download fails.
pub const PIECE_ATTEMPTS: u32 = 4;
/// How long to wait for the seed's answer to a registration (the origin may be slow).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(300);

/// What to download.
#[derive(Clone, Debug)]
pub struct GetRequest {
    /// Origin URL.
    pub url: String,
    /// Where the content goes.
    pub output: PathBuf,
    /// Expected SHA-256 of the content.
    pub digest: Option<Sha256>,
    /// Headers for the origin.
    pub headers: Vec<(String, String)>,
}

/// A finished download.
#[derive(Clone, Debug)]
pub struct GetOutcome {
    /// Bytes.
    pub length: u64,
    /// SHA-256 of the content.
    pub sha256: Sha256,
    /// Bytes received from each source.
    pub sources: Vec<(SocketAddr, u64)>,
}

/// Why a download failed; each kind has its own exit code.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// The origin failed (status, unreachable, truncated).
    #[error("{0}")]
    Origin(String),
    /// Content did not match its digest.
    #[error("{0}")]
    Integrity(String),
    /// The mesh failed (supernode unreachable, certificates, protocol).
    #[error("{0}")]
    Mesh(String),
    /// Local storage failed.
    #[error("{0}")]
    Local(#[from] StoreError),
}

impl GetError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            GetError::Origin(_) => crate::exit::ORIGIN,
            GetError::Integrity(_) => crate::exit::INTEGRITY,
            GetError::Mesh(_) => crate::exit::MESH,
            GetError::Local(_) => crate::exit::LOCAL,
        }
    }
}

impl From<MeshError> for GetError {
    fn from(e: MeshError) -> Self {
        GetError::Mesh(e.to_string())
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

/// Progress callback: (bytes done, total bytes).
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Downloads `req` through the first supernode of `supernodes` that answers.
pub async fn get(
    ep: &quinn::Endpoint,
    supernodes: &[SocketAddr],
    req: &GetRequest,
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let mut last = None;
    for &addr in supernodes {
        match transport::connect(ep, addr).await {
            Ok(conn) => {
                let result = download(&conn, req, progress.clone()).await;
                conn.close(close::DONE, b"bye");
                return result;
            }
            Err(e) => {
                debug!(%addr, error = %e, "supernode not usable");
                let fatal = matches!(
                    e,
                    MeshError::CertificateRefused { .. } | MeshError::VersionMismatch { .. }
                );
                last = Some(e);
                if fatal {
                    break;
                }
            }
        }
    }
    Err(last
        .map(GetError::from)
        .unwrap_or_else(|| GetError::Mesh("no supernode configured".into())))
}

struct Download {
    geometry: Geometry,
    output: TempOutput,
    picker: PiecePicker,
    digests: Vec<Option<Sha256>>,
    attempts: Vec<u32>,
    writer_tx: Option<std::sync::mpsc::SyncSender<(u32, Bytes)>>,
    writer: Option<tokio::task::JoinHandle<Result<Option<Sha256>, StoreError>>>,
    bytes_done: u64,
}

async fn download(
    conn: &quinn::Connection,
    req: &GetRequest,
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let remote = conn.remote_address();
    let cerr = |e: quinn::ConnectionError| GetError::from(transport::conn_error(remote, e));
    let (mut send, mut recv) = proto::open_control(conn).await.map_err(|e| match e {
        proto::ProtoError::Connection(c) => cerr(c),
        e => GetError::Mesh(format!("{remote}: {e}")),
    })?;
    let hello = Control::Hello(Hello {
        major: d7q_wire::MAJOR_VERSION,
        minor: d7q_wire::MINOR_VERSION,
        node_id: NodeId(rand::random()),
        labels: Labels::default(),
        upload_addr: None,
        capabilities: Capabilities(0),
    });
    let proto_err = |e: proto::ProtoError| match (e, conn.close_reason()) {
        (_, Some(reason)) => GetError::from(transport::conn_error(remote, reason)),
        (e, None) => GetError::Mesh(format!("{remote}: {e}")),
    };
    proto::write_msg(&mut send, &hello)
        .await
        .map_err(proto_err)?;
    match proto::expect_msg::<Control>(&mut recv)
        .await
        .map_err(proto_err)?
    {
        Control::HelloAck(ack) if ack.major == d7q_wire::MAJOR_VERSION => {}
        Control::HelloAck(_)
        | Control::Error(ErrorMsg {
            code: ErrorCode::VersionMismatch,
            ..
        }) => {
            return Err(MeshError::VersionMismatch {
                addr: remote,
                ours: String::from_utf8_lossy(d7q_wire::ALPN).into(),
            }
            .into())
        }
        other => {
            return Err(GetError::Mesh(format!(
                "{remote}: expected HelloAck, got {other:?}"
            )))
        }
    }
    let task = task::task_id(&req.url, req.digest.as_ref(), None);
    let register = Control::Register(Register {
        task,
        url: req.url.clone(),
        headers: req.headers.clone(),
        digest: req.digest,
        range: None,
    });
    proto::write_msg(&mut send, &register)
        .await
        .map_err(proto_err)?;

    // The control stream is read by its own task so piece completions and control messages
    // are handled as they come.
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Result<Control, String>>(64);
    let reader = tokio::spawn(async move {
        loop {
            let msg = match proto::read_msg::<Control>(&mut recv).await {
                Ok(Some(m)) => Ok(m),
                Ok(None) => Err("supernode closed the control stream".to_string()),
                Err(e) => Err(e.to_string()),
            };
            let stop = msg.is_err();
            if ctl_tx.send(msg).await.is_err() || stop {
                return;
            }
        }
    });
    let result = run_download(conn, task, req, &mut ctl_rx, progress).await;
    reader.abort();
    let _ = proto::write_msg(
        &mut send,
        &Control::Goodbye(Goodbye {
            reason: "done".into(),
        }),
    )
    .await;
    let _ = send.finish();
    let result = result.map_err(|e| match (&e, conn.close_reason()) {
        (GetError::Mesh(_), Some(reason)) => GetError::from(transport::conn_error(remote, reason)),
        _ => e,
    });
    result.map(|(length, sha256, bytes)| GetOutcome {
        length,
        sha256,
        sources: vec![(remote, bytes)],
    })
}

async fn run_download(
    conn: &quinn::Connection,
    task: TaskId,
    req: &GetRequest,
    ctl_rx: &mut mpsc::Receiver<Result<Control, String>>,
    progress: Option<ProgressFn>,
) -> Result<(u64, Sha256, u64), GetError> {
    let mut dl: Option<Download> = None;
    let mut complete: Option<Sha256> = None;
    let mut inflight: JoinSet<(u32, Result<Bytes, PieceError>)> = JoinSet::new();
    let registered = tokio::time::Instant::now();
    loop {
        if let Some(d) = dl.as_mut() {
            while inflight.len() < MAX_IN_FLIGHT {
                let Some(i) = d.picker.poll_next() else { break };
                let Some(digest) = d.digests[i as usize] else {
                    d.picker.handle_failed(i);
                    break;
                };
                let len = d.geometry.piece_len(i);
                let conn = conn.clone();
                let delay = retry_delay(d.attempts[i as usize]);
                inflight.spawn(async move {
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    (i, fetch_piece(&conn, task, i, len, digest).await)
                });
            }
            if d.picker.is_complete() {
                if let Some(sha) = complete {
                    let d = dl.take().expect("download present");
                    return finish(d, sha, req.digest).await;
                }
            }
        }
        tokio::select! {
            msg = ctl_rx.recv() => {
                let msg = msg.unwrap_or_else(|| Err("control stream ended".into())).map_err(GetError::Mesh)?;
                match msg {
                    Control::TaskMeta(m) if m.task == task => {
                        if dl.is_some() {
                            continue;
                        }
                        let g = Geometry::checked(m.length, m.piece_size, m.piece_count)
                            .map_err(|e| GetError::Mesh(format!("supernode sent {e}")))?;
                        dl = Some(start_download(g, req)?);
                    }
                    Control::PieceDigests(pd) if pd.task == task => {
                        let d = dl.as_mut().ok_or_else(|| GetError::Mesh("piece digests before task metadata".into()))?;
                        for (k, digest) in pd.digests.into_iter().enumerate() {
                            let i = pd.first as usize + k;
                            if i >= d.digests.len() {
                                return Err(GetError::Mesh("supernode sent digests past the last piece".into()));
                            }
                            d.digests[i] = Some(digest);
                            d.picker.handle_available(i as u32);
                        }
                    }
                    Control::TaskComplete(c) if c.task == task => complete = Some(c.sha256),
                    Control::Error(e) if e.task.is_none() || e.task == Some(task) => return Err(remote_error(e)),
                    other => debug!(?other, "ignored control message"),
                }
            }
            Some(joined) = inflight.join_next(), if !inflight.is_empty() => {
                let (i, result) = joined.map_err(|e| GetError::Mesh(format!("piece task failed: {e}")))?;
                let d = dl.as_mut().expect("pieces only fetched once started");
                match result {
                    Ok(bytes) => {
                        d.picker.handle_done(i);
                        d.bytes_done += bytes.len() as u64;
                        if let Some(p) = &progress {
                            p(d.bytes_done, d.geometry.length);
                        }
                        let tx = d.writer_tx.clone().expect("writer open until finish");
                        tokio::task::spawn_blocking(move || tx.send((i, bytes)))
                            .await
                            .map_err(|e| GetError::Mesh(format!("writer: {e}")))?
                            .map_err(|_| writer_failed(d))?;
                    }
                    Err(e) => {
                        d.attempts[i as usize] += 1;
                        debug!(piece = i, error = %e, "piece failed");
                        if let PieceError::Connection(c) = e {
                            return Err(GetError::from(transport::conn_error(conn.remote_address(), c)));
                        }
                        if d.attempts[i as usize] >= PIECE_ATTEMPTS {
                            return Err(match e {
                                PieceError::Corrupt => GetError::Integrity(format!("piece {i} failed verification {PIECE_ATTEMPTS} times")),
                                e => GetError::Mesh(format!("piece {i}: {e}")),
                            });
                        }
                        d.picker.handle_failed(i);
                    }
                }
            }
            _ = tokio::time::sleep_until(registered + REGISTER_TIMEOUT), if dl.is_none() => {
                return Err(GetError::Mesh("supernode did not answer the registration in time".into()));
            }
        }
    }
}

/// Back-off before retrying a piece: a refusal often means the reason is on its way on the
/// control stream (the task failed), and an immediate retry would only hit it again.
fn retry_delay(attempts: u32) -> Duration {
    match attempts {
        0 => Duration::ZERO,
        n => Duration::from_millis(250 << (n - 1).min(4)),
    }
}

fn writer_failed(_d: &Download) -> GetError {
    GetError::Mesh("disk writer stopped".into())
}

fn start_download(g: Geometry, req: &GetRequest) -> Result<Download, GetError> {
    let output = TempOutput::create(&req.output, g.length)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<(u32, Bytes)>(WRITE_QUEUE_PIECES);
    let file = output.file_handle();
    let hash = req.digest.is_some();
    let writer = tokio::task::spawn_blocking(move || write_pieces(rx, file, g, hash));
    info!(
        length = g.length,
        pieces = g.piece_count,
        "download started"
    );
    Ok(Download {
        geometry: g,
        output,
        picker: PiecePicker::new(g.piece_count),
        digests: vec![None; g.piece_count as usize],
        attempts: vec![0; g.piece_count as usize],
        writer_tx: Some(tx),
        writer: Some(writer),
        bytes_done: 0,
    })
}

async fn finish(
    mut d: Download,
    seed_sha: Sha256,
    expected: Option<Sha256>,
) -> Result<(u64, Sha256, u64), GetError> {
    d.writer_tx.take();
    let sha = d
        .writer
        .take()
        .expect("writer present")
        .await
        .map_err(|e| GetError::Mesh(format!("writer: {e}")))??;
    // Every piece was verified against the seed's digests on arrival. With an expected digest,
    // the whole content is hashed as well and must match it (and what the seed announced).
    if let (Some(want), Some(sha)) = (expected, sha) {
        if want != sha || sha != seed_sha {
            return Err(GetError::Integrity(format!(
                "digest mismatch: expected {}, got {}",
                task::format_digest(&want),
                task::format_digest(&sha)
            )));
        }
    }
    let length = d.geometry.length;
    let bytes = d.bytes_done;
    tokio::task::spawn_blocking(move || d.output.commit())
        .await
        .map_err(|e| GetError::Mesh(format!("commit: {e}")))??;
    Ok((length, seed_sha, bytes))
}

/// Writes pieces at their offsets. When the content has an expected digest, a second thread
/// hashes it in order meanwhile, so the disk and the hash do not wait on each other.
fn write_pieces(
    rx: std::sync::mpsc::Receiver<(u32, Bytes)>,
    file: Arc<DataFile>,
    g: Geometry,
    hash: bool,
) -> Result<Option<Sha256>, StoreError> {
    let hasher = hash.then(|| {
        let (htx, hrx) = std::sync::mpsc::sync_channel::<(u32, Bytes)>(WRITE_QUEUE_PIECES);
        let f = file.clone();
        (htx, std::thread::spawn(move || hash_in_order(hrx, f, g)))
    });
    let mut result = Ok(());
    while let Ok((i, bytes)) = rx.recv() {
        if let Err(e) = file.write_at(g.offset(i), &bytes) {
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
                path: file.path().to_path_buf(),
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
/// at once, pieces ahead are kept up to a window and re-read from the file beyond it (they are
/// on disk before they get here).
fn hash_in_order(
    rx: std::sync::mpsc::Receiver<(u32, Bytes)>,
    file: Arc<DataFile>,
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
                None => whole.update(file.read_at(g.offset(next), g.piece_len(next) as usize)?),
            }
            next += 1;
        }
    }
    // Pieces missing (only on an early exit) leave a wrong hash: the caller compares and fails.
    Ok(whole.finalize().into())
}

#[derive(Debug, thiserror::Error)]
enum PieceError {
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
    #[error("stream: {0}")]
    Stream(String),
    #[error("refused: {0:?}")]
    Refused(PieceStatus),
    #[error("piece digest mismatch")]
    Corrupt,
    #[error("timed out")]
    Timeout,
}

async fn fetch_piece(
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
        let mut buf = vec![0u8; len as usize];
        recv.read_exact(&mut buf)
            .await
            .map_err(|e| PieceError::Stream(e.to_string()))?;
        let got: Sha256 = sha2::Sha256::digest(&buf).into();
        if got != digest {
            return Err(PieceError::Corrupt);
        }
        Ok(Bytes::from(buf))
    };
    tokio::time::timeout(PIECE_TIMEOUT, work)
        .await
        .map_err(|_| PieceError::Timeout)?
}
