//! Hostile clients against a real supernode: certificate-less admin (`h3`) connections can
//! neither lock mesh peers out nor read what the supernode holds; a cluster member that never
//! reads what it asked a daemon for holds no more than the daemon's upload slots.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{poll_until, sha256_file, Env, PIECE};
use d7q::pki::MESH_SERVER_NAME;
use d7q::supernode::{MAX_ADMIN_CONNECTIONS, MAX_CONNECTIONS};
use quinn::crypto::rustls::QuicClientConfig;

/// Admin connections opened at once while filling the supernode.
const BATCH: usize = 128;
/// The close code of a connection over its budget.
const CLOSE_BUSY: u32 = 5;

/// An `h3` client that verifies the supernode against the cluster CA (`ca.pem` of `pki`) and
/// presents no certificate: anyone who can reach the port can be this.
fn anonymous_admin_client(pki: &Path) -> (quinn::Endpoint, quinn::ClientConfig) {
    let mut roots = rustls::RootCertStore::empty();
    for c in d7q::pki::load_certs_file(&pki.join("ca.pem")).expect("cluster CA") {
        roots.add(c).expect("CA certificate");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(d7q::pki::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![d7q_wire::ADMIN_ALPN.to_vec()];
    let mut cfg = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).expect("QUIC TLS config"),
    ));
    // Keep-alive: the connections are held, not used.
    cfg.transport_config(Arc::new(d7q::transport::transport_config()));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    (ep, cfg)
}

/// Opens `n` admin connections to `addr`, `BATCH` at a time, and returns those the handshake
/// gave (the supernode may close them right after).
async fn open_admin_connections(
    ep: &quinn::Endpoint,
    cfg: &quinn::ClientConfig,
    addr: SocketAddr,
    n: usize,
) -> Vec<quinn::Connection> {
    let mut conns = Vec::with_capacity(n);
    let mut left = n;
    while left > 0 {
        let batch = left.min(BATCH);
        left -= batch;
        let attempts = (0..batch).map(|_| {
            let connecting = ep
                .connect_with(cfg.clone(), addr, MESH_SERVER_NAME)
                .expect("connect");
            tokio::spawn(connecting)
        });
        for attempt in attempts.collect::<Vec<_>>() {
            if let Ok(conn) = attempt.await.expect("connect task") {
                conns.push(conn);
            }
        }
    }
    conns
}

/// Holding more certificate-less admin connections than the supernode handles at all (its mesh
/// bound and more) keeps no mesh peer out: admin connections have their own budget, the ones
/// over it are closed as busy, and a real `d7q get` through the supernode still downloads the
/// right bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_connections_cannot_lock_mesh_peers_out() {
    let env = Env::new();
    let origin = env.origin().await;
    let len = 3 * PIECE + 777;
    let expected = origin.file("layer.bin", len);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;

    let (ep, cfg) = anonymous_admin_client(&cluster.client_pki);
    let want = MAX_CONNECTIONS + 16;
    let admin = open_admin_connections(&ep, &cfg, sn.mesh, want).await;
    assert!(
        admin.len() > MAX_ADMIN_CONNECTIONS,
        "the handshakes themselves failed: {} of {want}",
        admin.len()
    );

    // The client is given no origin CA: a copy can only come through the mesh.
    let out = env.dir("out");
    env.get(&origin.url("layer.bin"), &out.join("layer.bin"))
        .via(&sn, &cluster.client_pki)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join("layer.bin")), expected);
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");

    // A close can be lost among thousands of handshakes on loopback; the client then learns of
    // it at its next keep-alive (a stateless reset). Wait for that, not for a guessed time.
    let open =
        |admin: &[quinn::Connection]| admin.iter().filter(|c| c.close_reason().is_none()).count();
    let settled = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        let n = open(&admin);
        async move { (n <= MAX_ADMIN_CONNECTIONS).then_some(n) }
    })
    .await;
    assert!(
        settled.is_some(),
        "{} admin connections held, budget {MAX_ADMIN_CONNECTIONS}",
        open(&admin)
    );
    let busy = admin
        .iter()
        .filter(|c| {
            matches!(
                c.close_reason(),
                Some(quinn::ConnectionError::ApplicationClosed(ref a))
                    if a.error_code == quinn::VarInt::from_u32(CLOSE_BUSY)
            )
        })
        .count();
    assert!(busy > 0, "no admin connection was closed as busy");
    drop(admin);
    ep.close(quinn::VarInt::from_u32(0), b"");
}

/// `/status` to a client without a cluster certificate names no content: no URL, no repository
/// or file name, no digest, no task id; with the certificate the same supernode lists the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_names_no_content_to_an_anonymous_client() {
    let env = Env::new();
    let origin = env.origin().await;
    let len = 2 * PIECE + 5;
    let expected = origin.file("team-secret-layer.bin", len);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let url = origin.url("team-secret-layer.bin");
    let out = env.dir("out");
    env.get(&url, &out.join("layer.bin"))
        .via(&sn, &cluster.client_pki)
        .digest(&expected)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join("layer.bin")), expected);

    let pki = cluster.client_pki.to_str().unwrap();
    let member = env
        .run(&["status", "--json", "--pki", pki, &sn.addr()])
        .await;
    member.ok();
    let json: serde_json::Value = serde_json::from_str(&member.stdout).expect("status JSON");
    let task = json["tasks"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["url"] == url.as_str()))
        .unwrap_or_else(|| panic!("a member is not shown the task: {json}"));
    let id = task["id"].as_str().expect("task id").to_owned();
    assert!(!id.is_empty());

    for json_flag in [true, false] {
        let mut args = vec!["status"];
        if json_flag {
            args.push("--json");
        }
        let addr = sn.addr();
        args.push(&addr);
        let anonymous = env.run(&args).await;
        anonymous.ok();
        let shown = &anonymous.stdout;
        for secret in [
            url.as_str(),
            "team-secret-layer",
            expected.as_str(),
            &id[..12],
        ] {
            assert!(!shown.contains(secret), "shows {secret:?}:\n{shown}");
        }
        if json_flag {
            let json: serde_json::Value = serde_json::from_str(shown).expect("status JSON");
            assert_eq!(json["redacted"], true, "{json}");
            assert_eq!(json["tasks_hidden"], 1, "{json}");
            assert_eq!(json["tasks"].as_array().map(Vec::len), Some(0), "{json}");
            assert_eq!(json["node"]["role"], "supernode", "{json}");
        } else {
            assert!(shown.contains("tasks hidden"), "{shown}");
        }
    }
}

/// Asks `conn` for piece `index` of `task` on a new piece stream and reads only the 8-byte
/// answer header; the stream is returned unread beyond it.
async fn ask_piece(
    conn: &quinn::Connection,
    task: d7q_wire::TaskId,
    index: u32,
) -> (quinn::SendStream, quinn::RecvStream, d7q_wire::PieceHeader) {
    let (mut send, mut recv) = conn.open_bi().await.expect("piece stream");
    send.write_all(&[d7q_wire::stream_kind::PIECE])
        .await
        .expect("stream kind");
    d7q::proto::write_msg(&mut send, &d7q_wire::PieceRequest { task, index })
        .await
        .expect("piece request");
    let mut head = [0u8; d7q_wire::piece::PIECE_HEADER_LEN];
    tokio::time::timeout(Duration::from_secs(30), recv.read_exact(&mut head))
        .await
        .expect("an answer in time")
        .expect("an answer header");
    let header = d7q_wire::PieceHeader::decode(head).expect("a valid header");
    (send, recv, header)
}

/// A cluster member that asks a daemon for pieces and never reads them holds no more than the
/// daemon's upload slots: the next request is answered "saturated" at once (not queued, not
/// hung), and a slot is free again as soon as one of the unread streams goes away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_never_reads_holds_only_the_upload_slots() {
    let env = Env::new();
    let origin = env.origin().await;
    let pieces = d7q::sched::UPLOAD_SLOTS as u64 + 4;
    let expected = origin.file("wide.bin", pieces * PIECE);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d0", "greedy"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let d = env.daemon(&pkis[1], &[&sn], &[]).await;
    let url = origin.url("wide.bin");
    let out = env.dir("out").join("copy");
    env.get(&url, &out)
        .arg("--daemon")
        .arg(d.socket_arg())
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out), expected);

    // A member of the cluster (its certificate is valid) whose streams take 16 KiB and no more:
    // the daemon cannot finish a 1 MiB piece to it.
    let identity = d7q::pki::NodeIdentity::load(&pkis[2]).expect("identity");
    let mut cfg = d7q::transport::client_config(&identity, d7q_wire::ALPN).expect("config");
    let mut transport = d7q::transport::transport_config();
    transport.stream_receive_window(quinn::VarInt::from_u32(16 << 10));
    cfg.transport_config(Arc::new(transport));
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    let conn = d7q::transport::connect_with(&ep, d.mesh, Some(cfg))
        .await
        .expect("connect to the daemon");
    let task = d7q::task::task_id(&url, None, None);

    let mut held = Vec::new();
    for i in 0..d7q::sched::UPLOAD_SLOTS as u32 {
        let (send, recv, header) = ask_piece(&conn, task, i).await;
        assert_eq!(header.status, d7q_wire::PieceStatus::Ok, "piece {i}");
        assert_eq!(u64::from(header.length), PIECE);
        held.push((send, recv));
    }
    let next = d7q::sched::UPLOAD_SLOTS as u32;
    let (_s, _r, header) = ask_piece(&conn, task, next).await;
    assert_eq!(header.status, d7q_wire::PieceStatus::Saturated);
    assert_eq!(header.length, 0);

    // One reader goes away: its slot is the next request's.
    let (_send, mut recv) = held.pop().expect("a held stream");
    recv.stop(quinn::VarInt::from_u32(0)).expect("stop");
    let served = poll_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || async {
            let (send, recv, header) = ask_piece(&conn, task, next).await;
            (header.status == d7q_wire::PieceStatus::Ok).then_some((send, recv))
        },
    )
    .await;
    assert!(served.is_some(), "no slot came free after a reader left");
    // Still full for anyone else while the rest are held.
    let (_s, _r, header) = ask_piece(&conn, task, next + 1).await;
    assert_eq!(header.status, d7q_wire::PieceStatus::Saturated);
    drop(held);
}
