//! The embedded default: with no supernode configured, `d7q get` runs a supernode inside its
//! own process, under a throwaway CA, and downloads through it over loopback QUIC — the same
//! code path as a cluster, with zero setup.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use crate::peer::{self, GetError, GetOutcome, GetRequest, ProgressFn};
use crate::pki::ClusterCa;
use crate::supernode::{Supernode, SupernodeConfig};
use crate::transport;

/// Downloads `req` through an in-process supernode whose store lives next to the output (so
/// the free-space check counts the right disk) and is removed afterwards.
pub async fn get(
    req: &GetRequest,
    origin_cas: &[PathBuf],
    progress: Option<ProgressFn>,
) -> Result<GetOutcome, GetError> {
    let setup = |e: &dyn std::fmt::Display| GetError::Mesh(format!("embedded supernode: {e}"));
    let ca = ClusterCa::generate().map_err(|e| setup(&e))?;
    let seed_identity = ca.issue("embedded-supernode").map_err(|e| setup(&e))?;
    let peer_identity = ca.issue("embedded-peer").map_err(|e| setup(&e))?;
    let parent = match req.output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let store = StoreDir::create(&parent)?;
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
    let sn = Supernode::start(SupernodeConfig {
        listen: loopback,
        data_dir: store.0.clone(),
        identity: seed_identity,
        origin_cas: origin_cas.to_vec(),
        labels: Default::default(),
        origin_rate: 0,
        metrics: std::sync::Arc::new(crate::metrics::Metrics::new(
            crate::metrics::Role::Supernode,
        )),
    })
    .await
    .map_err(|e| setup(&e))?;
    let addr = sn.local_addr();
    let ep = transport::endpoint(&peer_identity, loopback, false)?;
    let handle = tokio::spawn(sn.run());
    let result = peer::get(&ep, &[addr], req, progress).await;
    ep.close(transport::close::DONE, b"");
    handle.abort();
    drop(store);
    result
}

/// A hidden scratch directory removed on drop.
struct StoreDir(PathBuf);

impl StoreDir {
    fn create(parent: &Path) -> Result<Self, GetError> {
        let dir = parent.join(format!(".d7q-embedded-{:016x}", rand::random::<u64>()));
        std::fs::create_dir(&dir).map_err(|source| {
            GetError::Local(crate::store::StoreError::Io {
                path: dir.clone(),
                source,
            })
        })?;
        Ok(Self(dir))
    }
}

impl Drop for StoreDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
