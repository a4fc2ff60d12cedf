//! `d7q get` without a daemon: the [`crate::engine`] downloads into a preallocated temporary
//! file next to the output (free space checked first), which is fsynced once and renamed into
//! place only when every piece is verified (and the whole, against an expected digest). Any
//! failure removes the temporary file: the user's FILE is whole and right, or absent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use d7q_wire::{Register, Sha256};

use crate::engine::{self, ConnPool, EngineConfig, PieceSink, SinkFactory};
use crate::store::{DataFile, StoreError, TempOutput};
use crate::task::{self, Geometry};
use crate::transport::MeshError;

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
    /// The supernode that seeded it and the bytes received from it (none through a daemon,
    /// which keeps its own counts in its metrics).
    pub from_supernode: Option<(SocketAddr, u64)>,
    /// Bytes received from other peers.
    pub from_peers: u64,
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

/// Progress callback: (bytes done, total bytes).
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Downloads `req` through the mesh from `supernodes`, into a temporary file next to the
/// output that becomes the output only once every piece is verified.
pub async fn get(
    ep: &quinn::Endpoint,
    supernodes: &[SocketAddr],
    req: &GetRequest,
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let pool = ConnPool::new(ep.clone());
    let result = get_with(&pool, supernodes, req, EngineConfig::downloader(), progress).await;
    pool.close();
    result
}

/// [`get`] with a connection pool and engine configuration of the caller's.
pub async fn get_with(
    pool: &ConnPool,
    supernodes: &[SocketAddr],
    req: &GetRequest,
    cfg: EngineConfig,
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let task = task::task_id(&req.url, req.digest.as_ref(), None);
    let reg = Register {
        task,
        url: req.url.clone(),
        headers: req.headers.clone(),
        digest: req.digest,
        range: None,
    };
    let slot: Arc<Mutex<Option<TempOutput>>> = Arc::new(Mutex::new(None));
    let (slot2, output) = (slot.clone(), req.output.clone());
    let make_sink: SinkFactory = Box::new(move |g: Geometry| {
        let out = TempOutput::create(&output, g.length)?;
        let sink = Arc::new(FileSink {
            file: out.file_handle(),
            geometry: g,
        });
        *slot2.lock().expect("slot lock") = Some(out);
        Ok(sink as Arc<dyn PieceSink>)
    });
    let outcome = engine::download(pool, supernodes, reg, cfg, make_sink, progress).await?;
    let out = slot.lock().expect("slot lock").take();
    if let Some(out) = out {
        tokio::task::spawn_blocking(move || out.commit())
            .await
            .map_err(|e| GetError::Mesh(format!("commit: {e}")))??;
    }
    Ok(GetOutcome {
        length: outcome.geometry.length,
        sha256: outcome.sha256,
        from_supernode: Some((outcome.supernode, outcome.from_seed)),
        from_peers: outcome.from_peers,
    })
}

/// Pieces written straight into the temporary output file.
struct FileSink {
    file: Arc<DataFile>,
    geometry: Geometry,
}

impl PieceSink for FileSink {
    fn write_piece(&self, index: u32, bytes: &[u8]) -> Result<(), StoreError> {
        self.file.write_at(self.geometry.offset(index), bytes)
    }

    fn read_piece(&self, index: u32) -> Result<Vec<u8>, StoreError> {
        self.file.read_at(
            self.geometry.offset(index),
            self.geometry.piece_len(index) as usize,
        )
    }
}
