//! The relay measured from outside, with real UDP sockets on 127.0.0.1: what a client and a
//! server see must match what the links were configured to do.
//!
//! Timing tolerances are generous (the machine is shared and tokio's timers have millisecond
//! resolution); every test is bounded by deadlines and sends only to 127.0.0.1.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use d7q_netsim::relay::{Direction, Relay, RelayConfig, RelayHandle};

/// Longest any test waits for packets to show up.
const WAIT: Duration = Duration::from_secs(5);
/// How long "nothing arrives" is watched for.
const QUIET: Duration = Duration::from_millis(300);
/// Every probe starts with a sequence number and the send time (µs since the test's base).
const HEADER: usize = 16;

/// A packet as the server saw it.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    seq: u64,
    /// One-way time from the client's send to the server's receive.
    one_way: Duration,
    len: usize,
    at: Instant,
    from: SocketAddr,
}

/// A UDP server on 127.0.0.1 that records every packet and, if asked, echoes it to its sender.
struct Server {
    addr: SocketAddr,
    socket: Arc<UdpSocket>,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(base: Instant, echo: bool) -> Self {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").await.unwrap());
        let addr = socket.local_addr().unwrap();
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let task = tokio::spawn({
            let (socket, arrivals) = (socket.clone(), arrivals.clone());
            async move {
                let mut buf = vec![0u8; 65_535];
                loop {
                    let Ok((len, from)) = socket.recv_from(&mut buf).await else {
                        continue;
                    };
                    let at = Instant::now();
                    if let Some((seq, sent)) = decode(&buf[..len], base) {
                        arrivals.lock().unwrap().push(Arrival {
                            seq,
                            one_way: at.saturating_duration_since(sent),
                            len,
                            at,
                            from,
                        });
                    }
                    if echo {
                        let _ = socket.send_to(&buf[..len], from).await;
                    }
                }
            }
        });
        Self {
            addr,
            socket,
            arrivals,
            task,
        }
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    async fn wait_for(&self, n: usize) -> Vec<Arrival> {
        let deadline = Instant::now() + WAIT;
        while self.arrivals.lock().unwrap().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.arrivals()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn probe(seq: u64, base: Instant, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(HEADER)];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    let micros = base.elapsed().as_micros() as u64;
    p[8..16].copy_from_slice(&micros.to_le_bytes());
    p
}

fn decode(p: &[u8], base: Instant) -> Option<(u64, Instant)> {
    let seq = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
    let micros = u64::from_le_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, base + Duration::from_micros(micros)))
}

async fn relay(server: SocketAddr, up: &str, down: &str, seed: u64) -> Relay {
    let config = RelayConfig {
        up: up.parse().unwrap(),
        down: down.parse().unwrap(),
        seed,
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), server)
    };
    Relay::bind(config).await.unwrap()
}

async fn client(relay: &Relay) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(relay.local_addr()).await.unwrap();
    socket
}

/// Sends `count` probes numbered from `first`, `per_ms` of them each millisecond or so — slow
/// enough that no socket buffer on the loopback overflows.
async fn send_paced(
    socket: &UdpSocket,
    base: Instant,
    first: u64,
    count: u64,
    len: usize,
    per_ms: u64,
) {
    for seq in first..first + count {
        socket.send(&probe(seq, base, len)).await.unwrap();
        if (seq - first + 1) % per_ms == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

/// Receives echoes on `socket` until `QUIET` passes with none; returns their sequence numbers
/// and round-trip times.
async fn collect_echoes(socket: &UdpSocket, base: Instant) -> Vec<(u64, Duration)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_535];
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        match tokio::time::timeout(QUIET, socket.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                if let Some((seq, sent)) = decode(&buf[..len], base) {
                    got.push((seq, Instant::now().saturating_duration_since(sent)));
                }
            }
            Ok(Err(_)) => {}
            Err(_) => break,
        }
    }
    got
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn seqs(arrivals: &[Arrival]) -> HashSet<u64> {
    arrivals.iter().map(|a| a.seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_loss_matches_configured_loss() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "loss=20%", "none", 1).await;
    let client = client(&relay).await;
    let n = 3000;
    send_paced(&client, base, 0, n, 200, 20).await;

    let stats = wait_stats(&relay.handle(), |s| s.up.sent_packets == n).await;
    let arrivals = server.wait_for(stats.up.delivered_packets as usize).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        server.arrivals().len(),
        arrivals.len(),
        "more arrived than the link delivered"
    );
    assert_eq!(stats.up.sent_packets, n, "the relay missed packets");
    assert_eq!(arrivals.len() as u64, stats.up.delivered_packets);
    assert_eq!(stats.up.dropped.random_loss + stats.up.delivered_packets, n);
    let loss = 1.0 - arrivals.len() as f64 / n as f64;
    eprintln!("measured loss {loss:.4}, configured 0.2");
    // Binomial(3000, 0.2) has a standard deviation of 0.7 points; ±3 points is over 4 of them.
    assert!((0.17..=0.23).contains(&loss), "measured loss {loss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_delay_matches_configured_delay_both_ways() {
    let base = Instant::now();
    let server = Server::start(base, true).await;
    let relay = relay(server.addr, "delay=50ms", "delay=30ms", 2).await;
    let client = Arc::new(client(&relay).await);
    // Echoes are read as they come, or their round trip would include waiting in the buffer.
    let echoes = tokio::spawn({
        let client = client.clone();
        async move { collect_echoes(&client, base).await }
    });
    for seq in 0..40 {
        client.send(&probe(seq, base, 100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrivals = server.wait_for(40).await;
    let echoes = echoes.await.unwrap();
    assert_eq!(arrivals.len(), 40);
    assert_eq!(echoes.len(), 40);

    let one_way = median(arrivals.iter().map(|a| a.one_way).collect());
    assert!(
        one_way >= Duration::from_millis(45) && one_way <= Duration::from_millis(80),
        "median one-way {one_way:?}, configured 50ms"
    );
    let rtt = median(echoes.iter().map(|e| e.1).collect());
    eprintln!("median one-way {one_way:?} (50ms), round trip {rtt:?} (80ms)");
    assert!(
        rtt >= Duration::from_millis(75) && rtt <= Duration::from_millis(120),
        "median round trip {rtt:?}, configured 50ms + 30ms"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn measured_rate_matches_configured_rate() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    // 8 Mbit/s is 1 MB/s; offered about 3.6 MB/s, so the bottleneck is always busy.
    let relay = relay(server.addr, "rate=8mbit,queue=64kb", "none", 3).await;
    let client = client(&relay).await;
    send_paced(&client, base, 0, 4000, 1200, 3).await;
    let stats = wait_stats(&relay.handle(), |s| s.up.sent_packets == 4000).await;
    let arrivals = server.wait_for(stats.up.delivered_packets as usize).await;

    assert!(
        stats.up.dropped.queue_full > 0,
        "the queue never overflowed: {stats:?}"
    );
    let (first, last) = (arrivals[0].at, arrivals[arrivals.len() - 1].at);
    let bytes: usize = arrivals[1..].iter().map(|a| a.len).sum();
    let rate = bytes as f64 / (last - first).as_secs_f64();
    eprintln!(
        "measured {rate:.0} B/s, configured 1000000 B/s, stats {:?}",
        stats.up
    );
    assert!(
        (750_000.0..=1_250_000.0).contains(&rate),
        "measured {rate:.0} B/s, configured 1000000 B/s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_partition_drops_everything_in_its_window() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "partition=300ms+400ms", "none", 4).await;
    let client = client(&relay).await;
    // One probe every 5 ms for a second; the sequence number is the send time in 5 ms units.
    let start = Instant::now();
    for seq in 0..200u64 {
        tokio::time::sleep_until((start + Duration::from_millis(5 * seq)).into()).await;
        client.send(&probe(seq, start, 100)).await.unwrap();
    }
    let stats = wait_stats(&relay.handle(), |s| s.up.sent_packets == 200).await;
    server.wait_for(stats.up.delivered_packets as usize).await;
    let got = seqs(&server.arrivals());

    // 100 ms margins around the window absorb scheduling delays between send and relay.
    for seq in 0..200u64 {
        let sent = 5 * seq;
        if !(200..=800).contains(&sent) {
            assert!(
                got.contains(&seq),
                "probe sent at {sent} ms, outside the window, was lost"
            );
        }
        if (400..=600).contains(&sent) {
            assert!(
                !got.contains(&seq),
                "probe sent at {sent} ms, inside the window, arrived"
            );
        }
    }
    assert_eq!(stats.up.dropped.partition, 200 - got.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_partition_cuts_then_heals() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "none", "none", 5).await;
    let handle = relay.handle();
    let client = client(&relay).await;

    send_paced(&client, base, 0, 20, 100, 10).await;
    assert_eq!(server.wait_for(20).await.len(), 20);

    handle.partition(Duration::from_millis(500)).unwrap();
    send_paced(&client, base, 100, 20, 100, 10).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    send_paced(&client, base, 200, 20, 100, 10).await;
    server.wait_for(40).await;
    tokio::time::sleep(QUIET).await;

    let got = seqs(&server.arrivals());
    assert_eq!(got, (0..20).chain(200..220).collect::<HashSet<u64>>());
    assert_eq!(handle.stats().up.dropped.partition, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_partition_cuts_only_that_way() {
    let base = Instant::now();
    let server = Server::start(base, true).await;
    let relay = relay(server.addr, "none", "none", 6).await;
    let client = client(&relay).await;
    relay
        .handle()
        .partition_one_way(Direction::Down, Duration::from_secs(5))
        .unwrap();
    send_paced(&client, base, 0, 10, 100, 10).await;
    assert_eq!(server.wait_for(10).await.len(), 10, "up must still work");
    assert!(
        collect_echoes(&client, base).await.is_empty(),
        "down must be cut"
    );
    assert_eq!(relay.handle().stats().down.dropped.partition, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_changes_the_address_the_server_sees() {
    let base = Instant::now();
    let server = Server::start(base, true).await;
    let relay = relay(server.addr, "none", "none", 7).await;
    let handle = relay.handle();
    let client = client(&relay).await;

    client.send(&probe(1, base, 100)).await.unwrap();
    assert_eq!(collect_echoes(&client, base).await.len(), 1);
    let before = server.arrivals()[0].from;
    assert_eq!(handle.sessions()[0].upstream_local.port(), before.port());

    assert_eq!(handle.rebind_client_side().await.unwrap(), 1);
    client.send(&probe(2, base, 100)).await.unwrap();
    assert_eq!(
        collect_echoes(&client, base).await.len(),
        1,
        "the echo must follow the new path"
    );
    let after = server.wait_for(2).await[1].from;
    assert_ne!(before, after, "the server must see a new client address");
    assert_eq!(after.ip(), before.ip());
    assert_eq!(handle.sessions().len(), 1, "still one session");

    // The old address is gone, as after a real rebinding: nothing sent there reaches the client.
    server
        .socket
        .send_to(&probe(3, base, 100), before)
        .await
        .unwrap();
    assert!(collect_echoes(&client, base).await.is_empty());
    assert_eq!(handle.stats().rebinds, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_expire_when_idle() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let config = RelayConfig {
        max_sessions: 2,
        idle_timeout: Duration::from_millis(300),
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), server.addr)
    };
    let relay = Relay::bind(config).await.unwrap();
    let clients = [
        client(&relay).await,
        client(&relay).await,
        client(&relay).await,
    ];
    for (i, c) in clients.iter().enumerate() {
        c.send(&probe(i as u64, base, 100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let stats = relay.handle().stats();
    assert_eq!(stats.sessions_opened, 2);
    assert_eq!(stats.refused_packets, 1);
    assert_eq!(seqs(&server.arrivals()), HashSet::from([0, 1]));

    let stats = wait_stats(&relay.handle(), |s| s.sessions_active == 0).await;
    assert_eq!(stats.sessions_expired, 2);
    // With the old sessions gone, the third client now gets one.
    clients[2].send(&probe(2, base, 100)).await.unwrap();
    assert!(seqs(&server.wait_for(3).await).contains(&2));
    assert_eq!(relay.handle().stats().sessions_opened, 3);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_relays_and_writes_stats_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let base = Instant::now();
    let server = Server::start(base, true).await;
    let stats_path = std::env::temp_dir().join(format!("netsim-stats-{}.json", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_netsim"))
        .args([
            "relay",
            "--listen",
            "127.0.0.1:0",
            "--to",
            &server.addr.to_string(),
        ])
        .args([
            "--up",
            "delay=10ms",
            "--down",
            r#"{"delay":"5ms"}"#,
            "--seed",
            "3",
        ])
        .arg("--stats-json")
        .arg(&stats_path)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).map(|_| line)
    })
    .await
    .unwrap()
    .unwrap();
    let listen: SocketAddr = line
        .trim()
        .strip_prefix("ready listen=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    assert!(listen.ip().is_loopback() && listen.port() != 0);

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(listen).await.unwrap();
    send_paced(&socket, base, 0, 10, 100, 10).await;
    assert_eq!(collect_echoes(&socket, base).await.len(), 10);

    // No `kill` binary needed (minimal systems lack one).
    d7q_netsim::netns::signal(child.id(), false).unwrap();
    let deadline = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("netsim did not exit on SIGTERM");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&stats_path);
    assert_eq!(json["seed"], 3);
    assert_eq!(json["up_config"], "delay=10ms");
    assert_eq!(json["down_config"], "delay=5ms");
    assert_eq!(json["stats"]["up"]["sent_packets"], 10);
    assert_eq!(json["stats"]["down"]["delivered_packets"], 10);
}

/// Polls the relay's statistics until `done` holds or `WAIT` passes.
async fn wait_stats(
    handle: &RelayHandle,
    done: impl Fn(&d7q_netsim::relay::RelayStats) -> bool,
) -> d7q_netsim::relay::RelayStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = handle.stats();
        if done(&stats) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
