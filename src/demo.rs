//! `d7q demo`: an origin, a supernode and a few peers on loopback, offline, in one process.
//! Each peer downloads the same file through the mesh; the demo prints who received how much
//! from whom, how much left the origin, and whether every copy is right.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::Context;
use sha2::Digest;

use crate::cli::human_bytes;
use crate::devserver::{DevCa, DevServer};
use crate::peer::{self, GetRequest};
use crate::pki::ClusterCa;
use crate::supernode::{Supernode, SupernodeConfig};
use crate::transport;

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

    let started = Instant::now();
    let mut handles = Vec::new();
    for p in 0..peers {
        let identity = cluster.issue(&format!("demo-peer-{p}"))?;
        let req = GetRequest {
            url: url.clone(),
            output: work.join(format!("peer-{p}.bin")),
            digest: None,
            headers: vec![],
        };
        handles.push(tokio::spawn(async move {
            let ep = transport::endpoint(&identity, loopback, false)?;
            let t = Instant::now();
            let out = peer::get(&ep, &[sn_addr], &req, None).await;
            ep.close(transport::close::DONE, b"");
            anyhow::Ok((out?, t.elapsed(), req.output))
        }));
    }
    println!();
    println!("  peer       received      time  from                   verified");
    let mut ok = 0;
    for (p, h) in handles.into_iter().enumerate() {
        let (outcome, took, path) = h.await??;
        let sha: [u8; 32] = sha2::Sha256::digest(std::fs::read(&path)?).into();
        let good = sha == expected && outcome.sha256 == expected;
        ok += good as usize;
        for (src, bytes) in &outcome.sources {
            println!(
                "  {:<8} {:>10} {:>8.2}s  supernode {:<12} {}",
                format!("peer-{p}"),
                human_bytes(*bytes),
                took.as_secs_f64(),
                src,
                if good { "sha256 ok" } else { "MISMATCH" }
            );
        }
    }
    let total = started.elapsed().as_secs_f64();
    println!();
    println!(
        "  origin sent {} for {} copies ({} GET); all done in {total:.2}s; {ok}/{peers} copies verified",
        human_bytes(origin.body_bytes_sent()),
        peers,
        origin.get_count("/demo.bin"),
    );
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
