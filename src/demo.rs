//! `d7q demo`: an origin, a supernode and a few peers on loopback, offline, in one process.
//! Each peer downloads the same file through the mesh; the demo prints who received how much
//! from whom, how much left the origin, and whether every copy is right.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use sha2::Digest;

use crate::cli::human_bytes;
use crate::daemon::{Daemon, DaemonConfig, GcSettings};
use crate::devserver::{DevCa, DevServer};
use crate::local;
use crate::metrics::Source;
use crate::peer::GetRequest;
use crate::pki::ClusterCa;
use crate::supernode::{Supernode, SupernodeConfig};

/// Runs the demo with `peers` peers and a file of `size_mib` MiB.
pub async fn run(peers: usize, size_mib: u64) -> anyhow::Result<()> {
    let peers = peers.clamp(1, 64);
    let work = tempfile_dir()?;
    let root = work.join("origin");
    std::fs::create_dir_all(&root)?;
    let size = size_mib.clamp(1, 4096) << 20;
    println!(
        "d7q demo: {peers} peers fetch one {} file through a supernode, all on loopback",
        human_bytes(size)
    );
    let expected = write_demo_file(&root.join("demo.bin"), size)?;

    let origin_ca = DevCa::new();
    let origin_ca_path = work.join("origin-ca.pem");
    origin_ca.write_pem(&origin_ca_path)?;
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let origin = DevServer::start(root.clone(), loopback, Some(&origin_ca))
        .await
        .context("origin")?;
    let url = origin.url("/demo.bin");
    println!("  origin     {url}");

    let cluster = ClusterCa::generate()?;
    let sn = Supernode::start(SupernodeConfig {
        listen: loopback,
        data_dir: work.join("supernode"),
        identity: cluster.issue("demo-supernode")?,
        origin_cas: vec![origin_ca_path],
        labels: Default::default(),
        origin_rate: 0,
        metrics: std::sync::Arc::new(crate::metrics::Metrics::new(
            crate::metrics::Role::Supernode,
        )),
    })
    .await?;
    let sn_addr = sn.local_addr();
    println!("  supernode  {sn_addr} (QUIC, mutual TLS)");
    let sn_task = tokio::spawn(sn.run());

    // One daemon per peer, as on a fleet of hosts: each downloads for its local client and
    // uploads what it has verified to the others.
    let mut daemons = Vec::new();
    for p in 0..peers {
        let d = Daemon::start(DaemonConfig {
            listen: loopback,
            advertise: None,
            proxy: loopback,
            data_dir: work.join(format!("daemon-{p}")),
            identity: cluster.issue(&format!("demo-peer-{p}"))?,
            supernodes: vec![sn_addr],
            socket: work.join(format!("daemon-{p}.sock")),
            labels: d7q_wire::Labels {
                host: format!("peer-{p}"),
                ..Default::default()
            },
            upload_rate: 0,
            download_rate: 0,
            per_download_rate: 0,
            danger_corrupt_uploads: false,
            gc: GcSettings::default(),
            registries: Vec::new(),
            proxy_ca: None,
            origin_ca: Vec::new(),
            mirror_upstream: crate::proxy::DEFAULT_MIRROR_UPSTREAM.to_string(),
            proxy_allow: Vec::new(),
            metrics: None,
        })
        .await?;
        daemons.push(d);
    }
    println!("  daemons    {peers}, each with its own store, uploading to the others");
    let started = Instant::now();
    let mut handles = Vec::new();
    for (p, d) in daemons.iter().enumerate() {
        let req = GetRequest {
            url: url.clone(),
            output: work.join(format!("peer-{p}.bin")),
            digest: None,
            headers: vec![],
        };
        let socket = d.socket().to_path_buf();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            local::get(&socket, &req, None).await?;
            anyhow::Ok((t.elapsed(), req.output))
        }));
    }
    println!();
    println!("  peer       from supernode  from peers  uploaded     time  verified");
    let mut ok = 0;
    let (mut all_sn, mut all_peers) = (0, 0);
    for (p, h) in handles.into_iter().enumerate() {
        let (took, path) = h.await??;
        let sha: [u8; 32] = sha2::Sha256::digest(std::fs::read(&path)?).into();
        let good = sha == expected;
        ok += good as usize;
        let m = daemons[p].metrics();
        let (sn_bytes, peer_bytes) = (
            m.download_bytes(Source::Supernode).value(),
            m.download_bytes(Source::Peer).value(),
        );
        all_sn += sn_bytes;
        all_peers += peer_bytes;
        println!(
            "  {:<8} {:>15} {:>11} {:>9} {:>7.2}s  {}",
            format!("peer-{p}"),
            human_bytes(sn_bytes),
            human_bytes(peer_bytes),
            human_bytes(m.upload_bytes().value()),
            took.as_secs_f64(),
            if good { "sha256 ok" } else { "MISMATCH" }
        );
    }
    let total = started.elapsed().as_secs_f64();
    println!();
    println!(
        "  origin sent {} ({} GET) for {peers} copies; {:.0}% of the bytes went peer to peer; \
         done in {total:.2}s; {ok}/{peers} copies verified",
        human_bytes(origin.body_bytes_sent()),
        origin.get_count("/demo.bin"),
        100.0 * all_peers as f64 / (all_peers + all_sn).max(1) as f64,
    );
    for d in &daemons {
        d.shutdown();
    }
    sn_task.abort();
    drop(origin);
    let _ = std::fs::remove_dir_all(&work);
    anyhow::ensure!(ok == peers, "{} copies did not verify", peers - ok);
    Ok(())
}

fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("d7q-demo-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Writes `size` pseudo-random bytes (deterministic) and returns their SHA-256.
fn write_demo_file(path: &std::path::Path, size: u64) -> anyhow::Result<[u8; 32]> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut h = sha2::Sha256::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut block = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        for chunk in block.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        h.update(&block[..n]);
        left -= n as u64;
    }
    f.flush()?;
    Ok(h.finalize().into())
}
