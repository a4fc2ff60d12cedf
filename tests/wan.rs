//! d7q across datacenters and on bad links, through the UDP impairment relay of `d7q-netsim`:
//! the real `d7q` binary (supernodes, daemons, `d7q get`) with relays in the test process
//! standing for WAN links.
//!
//! - a transfer finishes with correct bytes at 10 % random loss and 100 ms RTT;
//! - a download survives the client's address changing under it (QUIC migration): the
//!   supernode accepted one connection and saw that connection's peer address change once;
//! - pieces in flight from a parent whose path breaks are fetched from elsewhere;
//! - a supernode whose upstream dies mid-task finishes from the origin, keeping its pieces;
//! - three datacenters chained by `--upstream`: the origin serves the blob once, each WAN
//!   link carries it about once, and daemons exchange pieces only within their datacenter
//!   (each is reached through a relay of its own, whose sessions name every node that fetched
//!   from it);
//! - a 10-second partition between datacenters delays a transfer but does not fail it (and
//!   does not send the downstream supernode back to the origin);
//! - each congestion controller moves correct bytes through loss (their speed is measured by
//!   `d7q-bench cc`, not here).
//!
//! Assertions are on bytes, digests and counters, never on time.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::Env;
use d7q::transport::{self, Congestion, Tuning};
use d7q_netsim::link::LinkConfig;
use d7q_netsim::relay::{Relay, RelayConfig};

const MIB: u64 = 1 << 20;

/// Mesh connections a node accepted (handshake done, cluster certificate checked).
const ACCEPTED: &str = "d7q_mesh_connections_accepted_total";
/// Times an accepted connection's peer address changed under it (QUIC migration).
const PATH_CHANGES: &str = "d7q_mesh_path_changes_total";

/// One direction of a path: one-way `delay` (half the RTT), independent `loss`, and an
/// optional bottleneck in Mbit/s.
fn link(delay_ms: u64, loss: f64, mbit: Option<u64>) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(delay_ms),
        loss,
        rate_bps: mbit.map(|m| m * 1_000_000),
        ..LinkConfig::default()
    }
}

/// A relay on loopback in front of `target`, the same link both ways.
async fn relay(target: SocketAddr, l: LinkConfig, seed: u64) -> Relay {
    let mut cfg = RelayConfig::new("127.0.0.1:0".parse().unwrap(), target);
    cfg.up = l.clone();
    cfg.down = l;
    cfg.seed = seed;
    Relay::bind(cfg).await.expect("relay")
}

/// Waits until `relay` delivered at least `bytes` toward its clients.
async fn delivered_down(relay: &Relay, bytes: u64) {
    let h = relay.handle();
    common::poll_until(Duration::from_secs(90), Duration::from_millis(20), || {
        let h = h.clone();
        async move { (h.stats().down.delivered_bytes >= bytes).then_some(()) }
    })
    .await
    .expect("the transfer never got going through the relay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_finishes_at_ten_percent_loss_and_100ms_rtt() {
    const LEN: u64 = 16 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("lossy.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "client"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let wan = relay(sn.mesh, link(50, 0.10, None), 1).await;
    let out = env.dir("out").join("lossy.bin");
    env.get(&origin.url("lossy.bin"), &out)
        .arg("--supernode")
        .arg(&wan.local_addr().to_string())
        .pki(&pkis[1])
        .run()
        .await
        .ok();
    assert_eq!(common::sha256_file(&out), expected);
    let stats = wan.handle().stats();
    let lost = stats.down.dropped.random_loss + stats.up.dropped.random_loss;
    let sent = stats.down.sent_packets + stats.up.sent_packets;
    assert!(
        lost * 20 > sent,
        "the relay dropped only {lost} of {sent} packets: the loss was not applied"
    );
    assert!(stats.down.delivered_bytes >= LEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_survives_the_clients_address_changing() {
    const LEN: u64 = 16 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("moving.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "client"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let sn_metrics = sn.metrics.expect("metrics address");
    // 40 Mbit/s: a few seconds for the whole, so the change comes mid-transfer.
    let path = relay(sn.mesh, link(10, 0.0, Some(40)), 2).await;
    let out = env.dir("out").join("moving.bin");
    let get = env
        .get(&origin.url("moving.bin"), &out)
        .arg("--supernode")
        .arg(&path.local_addr().to_string())
        .pki(&pkis[1])
        .run();
    let rebind = async {
        delivered_down(&path, 4 * MIB).await;
        let metrics = common::scrape(sn_metrics).await;
        let before = path.handle().sessions();
        let n = path.handle().rebind_client_side().await.expect("rebind");
        let after = path.handle().sessions();
        let delivered = path.handle().stats().down.delivered_bytes;
        (n, before, after, delivered, metrics)
    };
    let (output, (rebound, before, after, at, pre)) = tokio::join!(get, rebind);
    output.ok();
    assert_eq!(common::sha256_file(&out), expected);
    assert_eq!(rebound, 1, "one client session to move");
    assert_ne!(
        before[0].upstream_local, after[0].upstream_local,
        "the supernode saw the same client address"
    );
    assert!(at < LEN, "the address changed only after the transfer");
    // The relay cannot tell a kept connection from a new one (a reconnect would come from the
    // same client socket, so the same session); the supernode can. Before the change: the
    // client's one connection, never moved. After: still that one connection (a reconnect
    // would read 2 here), and its peer address changed exactly once — a new connection starts
    // from the new address and would leave this at 0.
    let post = common::scrape(sn_metrics).await;
    assert_eq!(
        (pre[ACCEPTED], pre[PATH_CHANGES]),
        (1.0, 0.0),
        "before the change"
    );
    assert_eq!(
        post[ACCEPTED], pre[ACCEPTED],
        "the client reconnected instead of migrating"
    );
    assert_eq!(post[PATH_CHANGES], 1.0, "the connection never moved");
    let stats = path.handle().stats();
    assert_eq!(stats.sessions_opened, 1);
    assert_eq!(stats.rebinds, 1);
    assert!(stats.down.delivered_bytes >= LEN);
    assert_eq!(origin.gets("moving.bin"), 1);
}

/// One datacenter: its supernode (chained to `upstream`, if any) and `daemons` daemons, each
/// with the relay in front of it when the datacenter is [`fronted`](datacenter_fronted).
struct Dc {
    name: &'static str,
    sn: common::Supernode,
    daemons: Vec<common::Daemon>,
    fronts: Vec<Relay>,
}

async fn datacenter(
    env: &Env,
    origin: &common::Origin,
    name: &'static str,
    pkis: &[std::path::PathBuf],
    upstream: Option<SocketAddr>,
) -> Dc {
    build_datacenter(env, origin, name, pkis, upstream, false).await
}

/// [`datacenter`] whose daemons other daemons reach only through a relay each: every daemon
/// advertises its relay's address, so the relay's sessions are every node that fetched from it.
async fn datacenter_fronted(
    env: &Env,
    origin: &common::Origin,
    name: &'static str,
    pkis: &[std::path::PathBuf],
    upstream: Option<SocketAddr>,
) -> Dc {
    build_datacenter(env, origin, name, pkis, upstream, true).await
}

async fn build_datacenter(
    env: &Env,
    origin: &common::Origin,
    name: &'static str,
    pkis: &[std::path::PathBuf],
    upstream: Option<SocketAddr>,
    fronted: bool,
) -> Dc {
    let up = upstream.map(|a| a.to_string());
    let mut extra = vec!["--dc", name];
    if let Some(up) = &up {
        extra.extend(["--upstream", up.as_str()]);
    }
    let sn = env
        .supernode_with(&pkis[0], Some(&origin.ca_file), &extra)
        .await;
    let mut daemons = Vec::new();
    let mut fronts = Vec::new();
    for pki in &pkis[1..] {
        if !fronted {
            daemons.push(env.daemon(pki, &[&sn], &["--dc", name]).await);
            continue;
        }
        // The relay's target is known only once the daemon runs: advertise a free port, then
        // bind the relay there before any download hands the address out.
        let front = format!("127.0.0.1:{}", common::closed_udp_port());
        let d = env
            .daemon(pki, &[&sn], &["--dc", name, "--advertise", &front])
            .await;
        let mut cfg = RelayConfig::new(front.parse().unwrap(), d.mesh);
        // Sessions never expire during the test, so the list at the end is complete.
        cfg.idle_timeout = Duration::from_secs(3600);
        fronts.push(Relay::bind(cfg).await.expect("front relay"));
        daemons.push(d);
    }
    Dc {
        name,
        sn,
        daemons,
        fronts,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_datacenters_take_each_blob_once_from_the_origin_and_once_over_each_wan_link() {
    const LEN: u64 = 16 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    let names = ["sn-a", "a1", "a2", "sn-b", "b1", "b2", "sn-c", "c1", "c2"];
    let (_ca, pkis) = env.ca("cluster", &names).await;
    let a = datacenter_fronted(&env, &origin, "dc-a", &pkis[0..3], None).await;
    // WAN links from dc-b and dc-c to dc-a: 40 and 80 ms RTT, 1 % loss.
    let wan_b = relay(a.sn.mesh, link(20, 0.01, None), 3).await;
    let wan_c = relay(a.sn.mesh, link(40, 0.01, None), 4).await;
    let b = datacenter_fronted(&env, &origin, "dc-b", &pkis[3..6], Some(wan_b.local_addr())).await;
    let c = datacenter_fronted(&env, &origin, "dc-c", &pkis[6..9], Some(wan_c.local_addr())).await;
    let dcs = [&a, &b, &c];
    let out = env.dir("out");
    let url = origin.url("layer.bin");
    let all: Vec<&common::Daemon> = dcs.iter().flat_map(|dc| dc.daemons.iter()).collect();
    let gets = all.iter().enumerate().map(|(i, d)| {
        env.get(&url, &out.join(format!("copy{i}")))
            .arg("--daemon")
            .arg(d.socket_arg())
            .run()
    });
    for o in futures_util::future::join_all(gets).await {
        o.ok();
    }
    for i in 0..all.len() {
        assert_eq!(
            common::sha256_file(&out.join(format!("copy{i}"))),
            expected,
            "copy {i}"
        );
    }
    assert_eq!(
        origin.gets("layer.bin"),
        1,
        "the origin served the blob twice"
    );
    let egress = origin.server.body_bytes_sent();
    assert!(
        egress < LEN + LEN / 20,
        "origin egress {egress} for a blob of {LEN}"
    );
    for (name, wan) in [("dc-b", &wan_b), ("dc-c", &wan_c)] {
        let s = wan.handle().stats();
        let carried = s.down.delivered_bytes;
        eprintln!(
            "WAN {name}: {carried} bytes toward the datacenter ({:.2} copies), {} back",
            carried as f64 / LEN as f64,
            s.up.delivered_bytes
        );
        assert!(
            (LEN..LEN + LEN / 4).contains(&carried),
            "the WAN link to {name} carried {carried} bytes for a blob of {LEN}"
        );
    }
    // Which datacenter every node sends from: daemons and supernodes dial from their mesh
    // port, so a relay session's client address names the node.
    let home: HashMap<SocketAddr, &str> = dcs
        .iter()
        .flat_map(|dc| {
            let nodes = dc.daemons.iter().map(|d| d.mesh).chain([dc.sn.mesh]);
            nodes.map(move |addr| (addr, dc.name))
        })
        .collect();
    for dc in dcs {
        let (mut relayed, mut from_peers, mut from_supernode) = (0u64, 0.0, 0.0);
        for (d, front) in dc.daemons.iter().zip(&dc.fronts) {
            let s = front.handle().stats();
            let sessions = front.handle().sessions();
            // Nothing expired or was replaced, so the sessions are everyone who ever sent.
            assert_eq!(
                (s.sessions_opened, s.sessions_expired, s.rebinds),
                (sessions.len() as u64, 0, 0),
                "sessions of {}'s relay",
                d.mesh
            );
            for session in &sessions {
                let from = home
                    .get(&session.client)
                    .copied()
                    .unwrap_or("no known node");
                assert_eq!(
                    from, dc.name,
                    "{} (in {from}) reached {} in {}",
                    session.client, d.mesh, dc.name
                );
            }
            // And nobody reached the daemon around its relay: every piece byte it uploaded
            // went through it.
            let m = d.metrics().await;
            let uploaded = m[common::UPLOAD_BYTES];
            assert!(
                uploaded <= s.down.delivered_bytes as f64,
                "{} uploaded {uploaded} bytes, its relay carried {}",
                d.mesh,
                s.down.delivered_bytes
            );
            relayed += s.down.delivered_bytes;
            from_peers += m[common::PEER_BYTES];
            from_supernode += m["d7q_download_bytes_total{source=\"supernode\"}"];
        }
        eprintln!(
            "{}: {from_peers} bytes between its daemons, {from_supernode} from its supernode",
            dc.name
        );
        // Zero bytes crossed between daemons of different datacenters (above), and the
        // daemons did share within theirs: the peer bytes they received all came through
        // their own datacenter's relays.
        assert!(from_peers > 0.0, "no peer traffic inside {}", dc.name);
        assert!(
            from_peers <= relayed as f64,
            "{} received {from_peers} bytes from peers, its relays carried {relayed}",
            dc.name
        );
        assert!(
            from_supernode > 0.0,
            "{}'s supernode served nothing",
            dc.name
        );
    }
    drop((a.sn, b.sn, c.sn));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_second_partition_between_datacenters_delays_but_does_not_fail() {
    const LEN: u64 = 16 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("cut.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn-a", "sn-b", "b1"]).await;
    let sn_a = env
        .supernode_with(&pkis[0], Some(&origin.ca_file), &["--dc", "dc-a"])
        .await;
    // 40 ms RTT, 1 % loss, 40 Mbit/s: a few seconds of transfer, cut in the middle.
    let wan = relay(sn_a.mesh, link(20, 0.01, Some(40)), 5).await;
    let b = datacenter(&env, &origin, "dc-b", &pkis[1..3], Some(wan.local_addr())).await;
    let out = env.dir("out").join("cut.bin");
    let get = env
        .get(&origin.url("cut.bin"), &out)
        .arg("--daemon")
        .arg(b.daemons[0].socket_arg())
        .run();
    let cut = async {
        delivered_down(&wan, 4 * MIB).await;
        wan.handle()
            .partition(Duration::from_secs(10))
            .expect("partition");
        wan.handle().stats().down.delivered_bytes
    };
    let (output, at) = tokio::join!(get, cut);
    output.ok();
    assert_eq!(common::sha256_file(&out), expected);
    assert!(at < LEN, "the partition came after the transfer");
    let s = wan.handle().stats();
    assert!(
        s.down.dropped.partition + s.up.dropped.partition > 0,
        "the partition dropped nothing"
    );
    // The chain held: dc-b's supernode did not give up on its upstream and go to the origin.
    assert_eq!(origin.gets("cut.bin"), 1);
    assert!((LEN..LEN + LEN / 4).contains(&s.down.delivered_bytes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_from_a_parent_whose_path_breaks_come_from_elsewhere() {
    const LEN: u64 = 16 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("detour.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d1", "d2"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    // d1 is reached only through a relay (its advertised address), 20 Mbit/s.
    let front: SocketAddr = format!("127.0.0.1:{}", common::closed_udp_port())
        .parse()
        .unwrap();
    let d1 = env
        .daemon(&pkis[1], &[&sn], &["--advertise", &front.to_string()])
        .await;
    let mut cfg = RelayConfig::new(front, d1.mesh);
    cfg.up = link(5, 0.0, Some(20));
    cfg.down = cfg.up.clone();
    let path = Relay::bind(cfg).await.expect("relay");
    let d2 = env.daemon(&pkis[2], &[&sn], &[]).await;
    let out = env.dir("out");
    let url = origin.url("detour.bin");
    env.get(&url, &out.join("first"))
        .arg("--daemon")
        .arg(d1.socket_arg())
        .run()
        .await
        .ok();
    // d2 now takes pieces from d1 (the seed refers it to the holder), until the path dies.
    let get = env
        .get(&url, &out.join("second"))
        .arg("--daemon")
        .arg(d2.socket_arg())
        .run();
    let cut = async {
        delivered_down(&path, 4 * MIB).await;
        path.handle()
            .partition(Duration::from_secs(600))
            .expect("partition");
        path.handle().stats().down.delivered_bytes
    };
    let (output, at) = tokio::join!(get, cut);
    output.ok();
    assert_eq!(common::sha256_file(&out.join("second")), expected);
    assert!(at < LEN, "the path broke only after the transfer");
    let m = d2.metrics().await;
    let from_peer = m["d7q_download_bytes_total{source=\"peer\"}"];
    let from_sn = m["d7q_download_bytes_total{source=\"supernode\"}"];
    assert!(from_peer >= (2 * MIB) as f64, "{from_peer} bytes from d1");
    assert!(
        from_peer + from_sn >= LEN as f64 && from_sn > 0.0,
        "{from_peer} from d1 and {from_sn} from the supernode"
    );
    let s = path.handle().stats();
    assert!(s.down.dropped.partition + s.up.dropped.partition > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_supernode_whose_upstream_dies_finishes_from_the_origin_keeping_its_pieces() {
    const LEN: u64 = 16 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("orphan.bin", LEN);
    // Slow enough that the upstream dies mid-transfer.
    origin
        .server
        .set_fault("/orphan.bin", d7q::devserver::Fault::Throttle(4 << 20));
    let (_ca, pkis) = env.ca("cluster", &["sn-a", "sn-b", "b1"]).await;
    let mut sn_a = env
        .supernode_with(&pkis[0], Some(&origin.ca_file), &["--dc", "dc-a"])
        .await;
    let b = datacenter(&env, &origin, "dc-b", &pkis[1..3], Some(sn_a.mesh)).await;
    let sn_b_metrics = b.sn.metrics.expect("metrics address");
    let out = env.dir("out").join("orphan.bin");
    let get = env
        .get(&origin.url("orphan.bin"), &out)
        .arg("--daemon")
        .arg(b.daemons[0].socket_arg())
        .run();
    const FROM_UPSTREAM: &str = "d7q_download_bytes_total{source=\"supernode\"}";
    let kill = async {
        common::poll_until(
            Duration::from_secs(60),
            Duration::from_millis(50),
            || async {
                let m = common::scrape(sn_b_metrics).await;
                (common::metric_of(&m, FROM_UPSTREAM) >= (4 * MIB) as f64).then_some(())
            },
        )
        .await
        .expect("dc-b's supernode never got pieces from upstream");
        sn_a.kill().await;
    };
    let (output, ()) = tokio::join!(get, kill);
    output.ok();
    assert_eq!(common::sha256_file(&out), expected);
    // dc-a's supernode read it once, then dc-b's went to the origin itself.
    assert_eq!(origin.gets("orphan.bin"), 2);
    let m = common::scrape(sn_b_metrics).await;
    let upstream = common::metric_of(&m, FROM_UPSTREAM);
    assert!(
        upstream >= (4 * MIB) as f64 && upstream < LEN as f64,
        "{upstream} bytes from upstream"
    );
    assert!(
        b.sn.log()
            .contains("upstream supernodes failed; going to the origin"),
        "{}",
        b.sn.log()
    );
}

/// Moves `len` bytes over one stream between two in-process endpoints through a relay with
/// link `l` both ways; returns the bytes received, their position-weighted checksum and the
/// packets the relay's loss dropped.
async fn transfer(tuning: &Tuning, l: LinkConfig, len: u64, seed: u64) -> (u64, u64, u64) {
    let ca = d7q::pki::ClusterCa::generate().expect("ca");
    let server_id = ca.issue("server").expect("issue");
    let client_id = ca.issue("client").expect("issue");
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = transport::endpoint_with(&server_id, any, true, tuning).expect("server");
    let client = transport::endpoint_with(&client_id, any, false, tuning).expect("client");
    let path = relay(server.local_addr().unwrap(), l, seed).await;
    let serve = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("conn");
        let (mut send, mut recv) = conn.accept_bi().await.expect("stream");
        let mut go = [0u8; 1];
        recv.read_exact(&mut go).await.expect("request");
        let chunk: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
        let mut left = len;
        while left > 0 {
            let n = left.min(MIB) as usize;
            send.write_all(&chunk[..n]).await.expect("write");
            left -= n as u64;
        }
        send.finish().expect("finish");
        let _ = send.stopped().await;
        server
    });
    let conn = transport::connect(&client, path.local_addr())
        .await
        .expect("connect");
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(&[1]).await.expect("request");
    let mut sum: u64 = 0;
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 64 << 10];
    while let Some(n) = recv.read(&mut buf).await.expect("read") {
        for (k, b) in buf[..n].iter().enumerate() {
            sum = sum.wrapping_add(u64::from(*b) * ((got + k as u64) % 1009 + 1));
        }
        got += n as u64;
    }
    conn.close(0u32.into(), b"done");
    let _ = serve.await;
    let s = path.handle().stats();
    (
        got,
        sum,
        s.up.dropped.random_loss + s.down.dropped.random_loss,
    )
}

fn expected_sum(len: u64) -> u64 {
    (0..len).fold(0u64, |s, i| {
        s.wrapping_add(((i % MIB) * 7 % 251) * (i % 1009 + 1))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_congestion_controller_moves_correct_bytes_through_loss() {
    const LEN: u64 = 2 * MIB;
    let want = expected_sum(LEN);
    for cc in [Congestion::Bbr, Congestion::Cubic, Congestion::NewReno] {
        let tuning = Tuning {
            congestion: cc,
            ..Tuning::default()
        };
        let (got, sum, lost) = transfer(&tuning, link(50, 0.01, Some(100)), LEN, 6).await;
        assert_eq!((got, sum), (LEN, want), "{cc}");
        assert!(lost > 0, "{cc}: the relay dropped nothing");
    }
}
