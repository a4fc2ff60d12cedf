//! The seed serves each piece as soon as it is stored and verified: a peer receives content
//! while the origin is still sending it. Real sockets on loopback — an HTTPS origin throttled so
//! the overlap is certain, a supernode and a peer from the library — asserting on bytes: how much
//! the origin had sent when the peer already held pieces.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use common::Env;
use d7q::devserver::Fault;
use d7q::peer::{self, GetRequest, ProgressFn};
use d7q::pki::ClusterCa;
use d7q::supernode::{Supernode, SupernodeConfig};
use d7q::transport;

const LEN: u64 = 8 << 20;

#[tokio::test]
async fn pieces_reach_the_peer_before_the_origin_download_ends() {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("slow.bin", LEN);
    // 4 MiB/s: the origin needs about two seconds for the whole file.
    origin
        .server
        .set_fault("/slow.bin", Fault::Throttle(4 << 20));

    let cluster = ClusterCa::generate().unwrap();
    let loopback: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let sn = Supernode::start(SupernodeConfig {
        listen: loopback,
        data_dir: env.dir("sn"),
        identity: cluster.issue("sn").unwrap(),
        origin_cas: vec![origin.ca_file.clone()],
        labels: Default::default(),
        origin_rate: 0,
        metrics: std::sync::Arc::new(d7q::metrics::Metrics::new(d7q::metrics::Role::Supernode)),
    })
    .await
    .unwrap();
    let sn_addr = sn.local_addr();
    let sn_task = tokio::spawn(sn.run());

    // At the first progress report, record how much the origin had sent by then.
    let seen: Arc<Mutex<Option<(u64, u64)>>> = Arc::new(Mutex::new(None));
    let server = Arc::new(origin.server);
    let (seen2, server2) = (seen.clone(), server.clone());
    let progress: ProgressFn = Arc::new(move |done, _total| {
        let mut s = seen2.lock().unwrap();
        if s.is_none() && done > 0 {
            *s = Some((done, server2.body_bytes_sent()));
        }
    });
    let out = env.path().join("out.bin");
    let req = GetRequest {
        url: server.url("/slow.bin"),
        output: out.clone(),
        digest: None,
        headers: vec![],
    };
    let ep = transport::endpoint(&cluster.issue("peer").unwrap(), loopback, false).unwrap();
    let outcome = peer::get(&ep, &[sn_addr], &req, Some(progress))
        .await
        .expect("download");
    sn_task.abort();

    assert_eq!(outcome.length, LEN);
    assert_eq!(common::sha256_file(&out), expected);
    let (peer_had, origin_sent) = seen.lock().unwrap().expect("progress was reported");
    assert!(peer_had > 0);
    assert!(
        origin_sent < LEN,
        "the peer's first piece arrived only after the origin sent everything ({origin_sent} of {LEN} bytes)"
    );
    assert_eq!(server.get_count("/slow.bin"), 1);
}
