//! d7q: QUIC-native peer-to-peer distribution of container images and large files.
//!
//! A map of the crate, top down:
//!
//! - [`cli`]: the `d7q` command line (the contract operators script against) and exit codes.
//! - [`supernode`]: scheduler and passive CDN — seeds tasks from origins, serves pieces.
//! - [`daemon`]: the per-host peer — downloads for local clients, keeps a store, uploads.
//! - [`engine`]: one download from the seed and parent peers, every piece verified.
//! - [`upload`]: serving stored pieces and their availability to other peers.
//! - [`blobs`]: blobs streamed out of the mesh in order, what the proxy asks of the daemon.
//! - [`proxy`]: the daemon's HTTPS proxy and registry mirror: CONNECT interception, blobs from
//!   the mesh, everything else to the registry.
//! - [`local`]: the daemon's Unix-socket API for `d7q get`.
//! - [`peer`]: `d7q get` without a daemon, into a temporary file renamed into place.
//! - [`pull`]: `d7q pull`, an image through the mesh into an OCI layout or docker-archive.
//! - [`embedded`]: the zero-setup default, a peer and a supernode in one process.
//! - [`demo`]: everything on loopback, to see it work.
//! - [`sched`]: deciding logic without IO: piece picking, parent scheduling, rate budgets.
//! - [`ratelimit`]: the async face of the rate budgets.
//! - [`config`]: the one TOML configuration file.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint.
//! - [`transport`], [`proto`]: QUIC endpoints with mutual TLS, framed messages on streams.
//! - [`pki`]: the cluster CA and node identities.
//! - [`origin`]: back-to-source over HTTP(S), and where it may connect ([`origin::policy`]).
//! - [`cidr`]: address blocks, for the proxy's and the origin client's connection policies.
//! - [`registry`]: image references, registry auth, manifests, OCI layout and docker-archive.
//! - [`store`]: disk: free space, preallocated files, never a half-written output.
//! - [`task`]: task ids, piece geometry, digests.
//! - [`admin`]: the read-only HTTP/3 admin API and its client.
//! - [`devserver`]: a small HTTP(S) origin for the demo, the tests and the benchmarks.
//! - `fuzzing` (hidden): the bodies of the fuzz targets in `fuzz/`, replayed by
//!   `tests/fuzz_corpora.rs`.
//!
//! The wire format lives in the `d7q-wire` crate; network emulation in `d7q-netsim`.

pub mod admin;
pub mod blobs;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod daemon;
pub mod demo;
pub mod devserver;
pub mod dial;
pub mod embedded;
pub mod engine;
#[doc(hidden)]
pub mod fuzzing;
pub mod local;
pub mod metrics;
pub mod origin;
pub mod peer;
pub mod pki;
pub mod proto;
pub mod proxy;
pub mod pull;
pub mod ratelimit;
pub mod registry;
pub mod sched;
pub mod store;
pub mod supernode;
pub mod task;
pub mod transport;
pub mod upload;

/// Process exit codes a script can rely on.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Anything not classified below.
    pub const FAILURE: i32 = 1;
    /// Bad command line or configuration.
    pub const USAGE: i32 = 2;
    /// The origin failed: an HTTP error status, unreachable, or a truncated body.
    pub const ORIGIN: i32 = 3;
    /// Content did not match its digest.
    pub const INTEGRITY: i32 = 4;
    /// The mesh failed: supernode unreachable, certificate refused, version mismatch.
    pub const MESH: i32 = 5;
    /// Local IO failed: disk full, output not writable.
    pub const LOCAL: i32 = 6;
}
