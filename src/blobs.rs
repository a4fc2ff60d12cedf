//! Blobs streamed out of the mesh: what the proxy asks of the daemon.
//!
//! The proxy turns a registry blob request into a [`BlobRequest`]; the daemon joins (or starts)
//! the task's download and answers with a [`Blob`] as soon as the content's length is known,
//! before any piece has arrived. [`Blob::stream`] then yields the bytes of a range in order, as
//! the pieces covering them are verified, and tells the download where the reader is, so the
//! picker fetches in order near it (a client reads a layer front to back).
//!
//! Not for: deciding whether a client may read the blob (the proxy asks the registry first),
//! or anything HTTP.

use std::future::Future;
use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;
use d7q_wire::Sha256;
use tokio::sync::mpsc;

/// Chunks buffered between the reader task and the consumer; with pieces sent in chunks of at
/// most [`CHUNK`] bytes, the memory per stream is bounded by `STREAM_BUFFER × CHUNK`.
pub const STREAM_BUFFER: usize = 8;
/// Largest chunk a blob stream yields.
pub const CHUNK: usize = 256 << 10;

/// A blob to fetch through the mesh.
#[derive(Clone, Debug)]
pub struct BlobRequest {
    /// The blob's URL at the registry (`https://host/v2/NAME/blobs/sha256:HEX`): where the seed
    /// goes back to source. The task is keyed by the digest, not by this URL.
    pub url: String,
    /// Headers for the back-to-source request (the client's `Authorization`).
    pub headers: Vec<(String, String)>,
    /// The digest from the URL; the content is verified against it.
    pub digest: Sha256,
}

/// Why a blob could not be served from the mesh.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BlobError {
    /// The origin refused or failed (the seed's back-to-source).
    #[error("{0}")]
    Origin(String),
    /// The content did not match the digest.
    #[error("{0}")]
    Integrity(String),
    /// The mesh failed: no supernode, protocol error.
    #[error("{0}")]
    Mesh(String),
    /// Local storage failed.
    #[error("{0}")]
    Local(String),
    /// The requested range is outside the blob.
    #[error("range {start}-{end} outside a blob of {length} bytes")]
    Range {
        /// First byte asked.
        start: u64,
        /// One past the last byte asked.
        end: u64,
        /// The blob's length.
        length: u64,
    },
}

/// Reads ranges of one blob; implemented by the daemon.
pub trait BlobSource: Send + Sync + 'static {
    /// Streams `range` in order into `tx`, each chunk as soon as it is verified; ends after the
    /// last byte or after sending an error. Returns when done or when `tx` is closed.
    fn read(
        &self,
        range: Range<u64>,
        tx: mpsc::Sender<Result<Bytes, BlobError>>,
    ) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// A blob whose length is known, ready to stream.
pub struct Blob {
    /// Content length in bytes.
    pub length: u64,
    /// SHA-256 of the content (the request's digest).
    pub digest: Sha256,
    /// Whether every byte is already stored (a cache hit).
    pub complete: bool,
    source: Box<dyn BlobSource>,
}

impl Blob {
    /// A blob read through `source`.
    pub fn new(length: u64, digest: Sha256, complete: bool, source: Box<dyn BlobSource>) -> Self {
        Self {
            length,
            digest,
            complete,
            source,
        }
    }

    /// Streams the bytes of `range` in order. The receiver sees the chunks, then the end of the
    /// channel; or an error item, after which nothing more comes. Dropping the receiver stops
    /// the reading (not the download: other clients and peers may want the content).
    pub fn stream(&self, range: Range<u64>) -> mpsc::Receiver<Result<Bytes, BlobError>> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        if range.start > range.end || range.end > self.length {
            let err = BlobError::Range {
                start: range.start,
                end: range.end,
                length: self.length,
            };
            let _ = tx.try_send(Err(err));
            return rx;
        }
        tokio::spawn(self.source.read(range, tx));
        rx
    }
}

/// The mesh as the proxy sees it.
pub trait MeshBlobs: Send + Sync + 'static {
    /// Joins or starts the download of `req`; resolves once the length is known (or the
    /// download failed before that).
    fn open(
        &self,
        req: BlobRequest,
    ) -> Pin<Box<dyn Future<Output = Result<Blob, BlobError>> + Send + 'static>>;
}
