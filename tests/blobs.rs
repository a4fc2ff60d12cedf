//! Blobs streamed out of a daemon's mesh in order, as the proxy reads them: whole and in ranges,
//! while the origin is still sending, and never the whole body of content that does not match
//! its digest. A supernode and a daemon from the library, an HTTPS origin on loopback.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use common::Env;
use d7q::blobs::{Blob, BlobError, BlobRequest};
use d7q::daemon::{Daemon, DaemonConfig, GcSettings};
use d7q::devserver::Fault;
use d7q::pki::ClusterCa;
use d7q::supernode::{Supernode, SupernodeConfig};

const LEN: u64 = (6 << 20) + 12345;

struct Mesh {
    _sn: tokio::task::JoinHandle<()>,
    daemon: Daemon,
}

async fn mesh(env: &Env, origin_ca: &std::path::Path) -> Mesh {
    let cluster = ClusterCa::generate().unwrap();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let sn = Supernode::start(SupernodeConfig {
        listen: loopback,
        data_dir: env.dir("sn"),
        identity: cluster.issue("sn").unwrap(),
        origin_cas: vec![origin_ca.to_path_buf()],
        labels: Default::default(),
        origin_rate: 0,
        metrics: Arc::new(d7q::metrics::Metrics::new(d7q::metrics::Role::Supernode)),
    })
    .await
    .unwrap();
    let sn_addr = sn.local_addr();
    let daemon = Daemon::start(DaemonConfig {
        listen: loopback,
        advertise: None,
        proxy: loopback,
        data_dir: env.dir("daemon"),
        identity: cluster.issue("daemon").unwrap(),
        supernodes: vec![sn_addr],
        socket: env.path().join("daemon.sock"),
        labels: Default::default(),
        upload_rate: 0,
        download_rate: 0,
        per_download_rate: 0,
        danger_corrupt_uploads: false,
        gc: GcSettings::default(),
        registries: Vec::new(),
        proxy_ca: None,
        origin_ca: Vec::new(),
        mirror_upstream: "registry-1.docker.io".into(),
        proxy_allow: Vec::new(),
        metrics: None,
    })
    .await
    .unwrap();
    Mesh {
        _sn: tokio::spawn(sn.run()),
        daemon,
    }
}

fn digest(hex: &str) -> d7q_wire::Sha256 {
    d7q::task::parse_digest(&format!("sha256:{hex}")).unwrap()
}

/// Everything a stream yields: the bytes, and the error that ended it, if any.
async fn collect(blob: &Blob, range: std::ops::Range<u64>) -> (Vec<u8>, Option<BlobError>) {
    let mut rx = blob.stream(range);
    let mut out = Vec::new();
    while let Some(item) = rx.recv().await {
        match item {
            Ok(b) => {
                assert!(b.len() <= d7q::blobs::CHUNK, "chunk of {} bytes", b.len());
                out.extend_from_slice(&b);
            }
            Err(e) => return (out, Some(e)),
        }
    }
    (out, None)
}

#[tokio::test]
async fn a_blob_streams_whole_and_in_ranges_while_the_origin_still_sends() {
    let env = Env::new();
    let origin = env.origin().await;
    let hex = origin.file("layer.bin", LEN);
    let content = std::fs::read(env.path().join("origin/layer.bin")).unwrap();
    // About three seconds at the origin: the first open answers before the content is in.
    origin
        .server
        .set_fault("/layer.bin", Fault::Throttle(2 << 20));
    let m = mesh(&env, &origin.ca_file).await;
    let blobs = m.daemon.blobs();
    let req = BlobRequest {
        url: origin.url("layer.bin"),
        headers: vec![],
        digest: digest(&hex),
    };

    let blob = blobs.open(req.clone()).await.unwrap();
    assert_eq!(blob.length, LEN);
    assert!(
        !blob.complete,
        "the first open must not wait for the whole content"
    );
    // A range across a piece boundary, then the whole blob, concurrently.
    let mid = (1 << 20) - 100..(3 << 20) + 7;
    let (part, whole) = tokio::join!(collect(&blob, mid.clone()), collect(&blob, 0..LEN));
    assert!(part.1.is_none(), "range failed: {:?}", part.1);
    assert_eq!(part.0, &content[mid.start as usize..mid.end as usize]);
    assert!(whole.1.is_none(), "whole failed: {:?}", whole.1);
    assert_eq!(common::sha256(&whole.0), hex);

    // Cached now: a second open is complete, the tail and an empty range work, the origin
    // was read once.
    let again = blobs.open(req).await.unwrap();
    assert!(again.complete);
    let tail = collect(&again, LEN - 10..LEN).await;
    assert_eq!(tail.0, &content[(LEN - 10) as usize..]);
    assert!(collect(&again, 5..5).await.0.is_empty());
    let (bytes, err) = collect(&again, 0..LEN + 1).await;
    assert!(bytes.is_empty());
    assert!(matches!(err, Some(BlobError::Range { .. })), "{err:?}");
    assert_eq!(origin.gets("layer.bin"), 1);
}

#[tokio::test]
async fn content_that_does_not_match_its_digest_never_arrives_whole() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("evil.bin", 3 << 20);
    let m = mesh(&env, &origin.ca_file).await;
    let wrong = "ab".repeat(32);
    let req = BlobRequest {
        url: origin.url("evil.bin"),
        headers: vec![],
        digest: digest(&wrong),
    };
    // Either the open fails, or the stream ends in an error before its last byte.
    match m.daemon.blobs().open(req).await {
        Err(e) => assert!(matches!(e, BlobError::Integrity(_)), "{e:?}"),
        Ok(blob) => {
            let (bytes, err) = collect(&blob, 0..blob.length).await;
            assert!((bytes.len() as u64) < blob.length, "the whole body arrived");
            assert!(matches!(err, Some(BlobError::Integrity(_))), "{err:?}");
        }
    }
}

#[tokio::test]
async fn an_origin_refusal_reaches_the_opener() {
    let env = Env::new();
    let origin = env.origin().await;
    let hex = origin.file("private.bin", 1 << 20);
    origin
        .server
        .set_fault("/private.bin", Fault::RequireAuth("Bearer right".into()));
    let m = mesh(&env, &origin.ca_file).await;
    let req = BlobRequest {
        url: origin.url("private.bin"),
        headers: vec![("Authorization".into(), "Bearer wrong".into())],
        digest: digest(&hex),
    };
    let err = m.daemon.blobs().open(req).await.err().expect("refused");
    assert!(matches!(err, BlobError::Origin(_)), "{err:?}");
    assert!(err.to_string().contains("401"), "{err}");
}
