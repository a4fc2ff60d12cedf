//! Hostile clients against a real supernode: certificate-less admin (`h3`) connections can
//! neither lock mesh peers out nor read what the supernode holds; a cluster member that never
//! reads what it asked a daemon for holds no more than the daemon's upload slots; one that opens
//! control streams and never says Hello (or trickles a frame) loses them after the deadline, and
//! what they held is free again; local clients of a daemon's socket that never finish their
//! request line are closed after the deadline, and those over the bound are told it is busy.

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

/// How long to wait for a deadline of the product to close something: three times the deadline
/// and ten seconds more. This bounds a hang, not a speed.
fn within(deadline: Duration) -> Duration {
    deadline * 3 + Duration::from_secs(10)
}

/// A cluster member's connection to `addr` (its certificate is valid: it passes every check a
/// peer's does).
async fn member_connection(pki: &Path, addr: SocketAddr) -> (quinn::Endpoint, quinn::Connection) {
    let identity = d7q::pki::NodeIdentity::load(pki).expect("identity");
    let cfg = d7q::transport::client_config(&identity, d7q_wire::ALPN).expect("config");
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client endpoint");
    let conn = d7q::transport::connect_with(&ep, addr, Some(cfg))
        .await
        .expect("a member connects");
    (ep, conn)
}

/// Opens a control stream and sends `first` after its kind byte (nothing, half a Hello, ...).
async fn open_control_with(
    conn: &quinn::Connection,
    first: &[u8],
) -> (quinn::SendStream, quinn::RecvStream) {
    let (mut send, recv) = conn.open_bi().await.expect("control stream");
    send.write_all(&[d7q_wire::stream_kind::CONTROL])
        .await
        .expect("stream kind");
    send.write_all(first).await.expect("first bytes");
    (send, recv)
}

/// Waits until the other side is done with a stream: it stopped our half and finished or reset
/// its own. Returns what it sent before (`limit` bounds a hang).
async fn closed_by_peer(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    limit: Duration,
    what: &str,
) -> Vec<u8> {
    let stopped = tokio::time::timeout(limit, send.stopped())
        .await
        .unwrap_or_else(|_| panic!("{what}: our half was not stopped within {limit:?}"));
    assert!(
        matches!(stopped, Ok(Some(_))),
        "{what}: expected STOP_SENDING, got {stopped:?}"
    );
    let mut got = Vec::new();
    let end = tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match recv.read(&mut buf).await {
                Ok(Some(n)) => got.extend_from_slice(&buf[..n]),
                Ok(None) => return "finished".to_string(),
                Err(e) => return format!("reset: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: the peer's half did not end within {limit:?}"));
    assert!(
        end == "finished" || end.starts_with("reset"),
        "{what}: {end}"
    );
    got
}

/// A framed message, as a peer writes it.
fn frame<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut buf = Vec::new();
    d7q_wire::frame::encode_frame(msg, &mut buf).expect("encodes");
    buf
}

fn hello(node: u8) -> d7q_wire::Control {
    d7q_wire::Control::Hello(d7q_wire::Hello {
        major: d7q_wire::MAJOR_VERSION,
        minor: d7q_wire::MINOR_VERSION,
        node_id: d7q_wire::NodeId([node; 16]),
        labels: d7q_wire::Labels::default(),
        upload_addr: None,
        capabilities: d7q_wire::Capabilities(0),
    })
}

/// A cluster member that opens control streams and never finishes its Hello — sends nothing,
/// or half of one — loses those streams after the Hello deadline, on the supernode and on a
/// daemon; one that trickles a frame after its Hello loses the stream after the frame deadline.
/// What the streams held is free again: the daemon's upload slots of that connection (full of
/// mute streams, a piece request is answered busy; after the deadline the same connection gets
/// the piece), and the supernode answers a real Hello on the same connection. A real daemon
/// downloads the right bytes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_that_never_says_hello_loses_its_streams() {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("quiet.bin", 2 * PIECE + 99);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d0", "d1", "mute"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let d0 = env.daemon(&pkis[1], &[&sn], &[]).await;
    let url = origin.url("quiet.bin");
    let out0 = env.dir("out0").join("copy");
    env.get(&url, &out0)
        .arg("--daemon")
        .arg(d0.socket_arg())
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out0), expected);
    let task = d7q::task::task_id(&url, None, None);

    let hello_limit = within(d7q::proto::HELLO_TIMEOUT);
    let full_hello = frame(&hello(7));
    let half_hello = &full_hello[..full_hello.len() / 2];

    // On the supernode: mute streams, a half Hello, and a trickled frame after a whole Hello.
    let (_ep_sn, sn_conn) = member_connection(&pkis[3], sn.mesh).await;
    let mut sn_waits = tokio::task::JoinSet::new();
    for i in 0..16 {
        let first: &[u8] = if i % 2 == 0 { &[] } else { half_hello };
        let (send, recv) = open_control_with(&sn_conn, first).await;
        sn_waits.spawn(async move {
            let got = closed_by_peer(send, recv, hello_limit, "supernode, no Hello").await;
            assert!(
                got.is_empty(),
                "the supernode answered a missing Hello: {got:?}"
            );
        });
    }
    let (mut send, mut recv) = open_control_with(&sn_conn, &full_hello).await;
    let mut reader = d7q::proto::FrameReader::new(recv);
    let ack = reader
        .expect_within::<d7q_wire::Control>(Duration::from_secs(30))
        .await
        .expect("a HelloAck");
    assert!(matches!(ack, d7q_wire::Control::HelloAck(_)), "{ack:?}");
    recv = reader.into_inner();
    let register = frame(&d7q_wire::Control::Register(d7q_wire::Register {
        task,
        url: url.clone(),
        headers: vec![],
        digest: None,
        range: None,
    }));
    // One byte every two seconds: the frame never ends before the supernode gives up on it.
    let trickled = tokio::spawn(async move {
        let mut sent = 0;
        for b in &register[..register.len() - 1] {
            if send.write_all(std::slice::from_ref(b)).await.is_err() {
                break;
            }
            sent += 1;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        (send, sent, register.len())
    });

    // On the daemon: as many mute control streams as one connection has upload slots.
    let (_ep_d, d_conn) = member_connection(&pkis[3], d0.mesh).await;
    let mut held = Vec::new();
    for i in 0..d7q::upload::MAX_UPLOADS_PER_CONNECTION {
        let first: &[u8] = if i % 2 == 0 { &[] } else { half_hello };
        held.push(open_control_with(&d_conn, first).await);
    }
    // Every slot of the connection is taken: a poll until the last mute stream is in.
    let busy = poll_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let (_s, _r, header) = ask_piece(&d_conn, task, 0).await;
            (header.status == d7q_wire::PieceStatus::Busy).then_some(())
        },
    )
    .await;
    assert!(
        busy.is_some(),
        "mute control streams did not fill the connection's slots"
    );
    for (send, recv) in held {
        let got = closed_by_peer(send, recv, hello_limit, "daemon, no Hello").await;
        assert!(
            got.is_empty(),
            "the daemon answered a missing Hello: {got:?}"
        );
    }
    let freed = poll_until(
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async {
            let (_s, mut r, header) = ask_piece(&d_conn, task, 0).await;
            if header.status != d7q_wire::PieceStatus::Ok {
                return None;
            }
            let mut piece = vec![0u8; header.length as usize];
            r.read_exact(&mut piece).await.ok()?;
            Some(piece)
        },
    )
    .await
    .expect("the slots held by mute streams came free");
    let whole = std::fs::read(&out0).expect("the first copy");
    assert_eq!(
        &freed[..],
        &whole[..PIECE as usize],
        "piece 0 from the daemon"
    );

    while let Some(r) = sn_waits.join_next().await {
        r.expect("a mute stream on the supernode");
    }
    // The trickled frame: the supernode stops reading it after the frame deadline.
    let frame_limit = within(d7q::proto::FRAME_TIMEOUT);
    let (send, sent, len) = tokio::time::timeout(frame_limit, trickled)
        .await
        .expect("the trickled stream was cut within the frame deadline")
        .expect("trickle task");
    assert!(
        sent < len - 1,
        "the whole frame but a byte went through: {sent} of {len}"
    );
    closed_by_peer(send, recv, hello_limit, "supernode, trickled frame").await;

    // The connection itself is still good: a real Hello on it is answered.
    let (_s, recv) = open_control_with(&sn_conn, &full_hello).await;
    let ack = d7q::proto::FrameReader::new(recv)
        .expect_within::<d7q_wire::Control>(Duration::from_secs(30))
        .await
        .expect("a HelloAck after the mute streams");
    assert!(matches!(ack, d7q_wire::Control::HelloAck(_)), "{ack:?}");

    // And a real peer downloads the right bytes.
    let d1 = env.daemon(&pkis[2], &[&sn], &[]).await;
    let out1 = env.dir("out1").join("copy");
    env.get(&url, &out1)
        .arg("--daemon")
        .arg(d1.socket_arg())
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out1), expected);
}

/// A local client of the daemon's socket that sent `first` and then nothing.
async fn idle_local_client(socket: &Path, first: &[u8]) -> tokio::net::UnixStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .expect("connect to the daemon socket");
    s.write_all(first).await.expect("first bytes");
    s
}

/// Everything the daemon sends on `s` until it closes it (`limit` bounds a hang).
async fn until_closed(mut s: tokio::net::UnixStream, limit: Duration, what: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    tokio::time::timeout(limit, s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("{what}: not closed within {limit:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    String::from_utf8(got).expect("answer lines are UTF-8")
}

/// The one line a client that never finished its request gets before the daemon closes it.
#[track_caller]
fn assert_request_line_timed_out(answer: &str) {
    let line = answer.strip_suffix('\n').unwrap_or(answer);
    assert!(!line.contains('\n'), "one line: {answer:?}");
    let v: serde_json::Value = serde_json::from_str(line).expect("a JSON answer line");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("no whole request line within"),
        "{answer:?}"
    );
    assert_eq!(v["error"]["code"], d7q::exit::USAGE, "{answer:?}");
}

async fn get_via_daemon(env: &Env, url: &str, d: &common::Daemon, name: &str) -> String {
    let out = env.dir(name).join("copy");
    env.get(url, &out)
        .arg("--daemon")
        .arg(d.socket_arg())
        .run()
        .await
        .ok();
    sha256_file(&out)
}

/// A local client that connects to the daemon's socket, sends half a request line and then
/// nothing is told so and closed after the request-line deadline; a real `d7q get --daemon`
/// downloads the right bytes while it waits and after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_client_with_half_a_request_line_is_closed() {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("half.bin", PIECE + 5);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d0"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let d = env.daemon(&pkis[1], &[&sn], &[]).await;
    let url = origin.url("half.bin");

    let idle = idle_local_client(&d.socket, br#"{"url":"https://exa"#).await;
    assert_eq!(get_via_daemon(&env, &url, &d, "during").await, expected);
    let answer = until_closed(
        idle,
        within(d7q::local::REQUEST_LINE_TIMEOUT),
        "half a request line",
    )
    .await;
    assert_request_line_timed_out(&answer);
    assert_eq!(get_via_daemon(&env, &url, &d, "after").await, expected);
}

/// Many idle local clients (nothing sent, or half a line) fill the daemon's bound on local
/// clients: one more is told the daemon is busy rather than hung or silently dropped. A real
/// `d7q get` downloads once a slot is free, every idle client is closed after the deadline, and
/// then downloads go on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_local_clients_fill_the_bound_and_are_closed() {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("many.bin", PIECE + 5);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d0"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let d = env.daemon(&pkis[1], &[&sn], &[]).await;
    let url = origin.url("many.bin");

    let mut idle = Vec::new();
    for i in 0..d7q::local::MAX_CLIENTS {
        let first: &[u8] = if i % 2 == 0 {
            b""
        } else {
            br#"{"url":"#.as_slice()
        };
        idle.push(idle_local_client(&d.socket, first).await);
    }
    // One over the bound: an answer that says why, then the end.
    let over = idle_local_client(&d.socket, b"").await;
    let answer = until_closed(over, Duration::from_secs(30), "one client over the bound").await;
    let v: serde_json::Value = serde_json::from_str(answer.trim_end()).expect("a JSON answer line");
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("daemon busy"), "{answer:?}");
    assert!(
        message.contains(&d7q::local::MAX_CLIENTS.to_string()),
        "{answer:?}"
    );

    // One idle client leaves; a real download takes its slot while the others wait.
    drop(idle.pop());
    assert_eq!(get_via_daemon(&env, &url, &d, "during").await, expected);

    let limit = within(d7q::local::REQUEST_LINE_TIMEOUT);
    let mut closed = tokio::task::JoinSet::new();
    for s in idle {
        closed.spawn(until_closed(s, limit, "an idle local client"));
    }
    let mut n = 0;
    while let Some(answer) = closed.join_next().await {
        assert_request_line_timed_out(&answer.expect("idle client task"));
        n += 1;
    }
    assert_eq!(n, d7q::local::MAX_CLIENTS - 1);
    assert_eq!(get_via_daemon(&env, &url, &d, "after").await, expected);
}
