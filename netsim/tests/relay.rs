//! The relay driven from outside, with real UDP sockets on 127.0.0.1: what a client and a server
//! see must match what the links decided, and the links' decisions must match their
//! configuration.
//!
//! No assertion bounds real time from above, so a loaded machine cannot fail a test. What is
//! asserted is what the emulator decided (its counters: the delay it scheduled for each packet,
//! the bottleneck's accepted bytes, busy time and backlog, the link time of partition drops),
//! counts and orders of what arrived, and real-time lower bounds that only a broken emulator can
//! violate (a packet cannot arrive before the delay the link gave it). Senders keep at most
//! [`IN_FLIGHT`] packets unaccounted for (neither arrived nor dropped by the link) rather than
//! trusting a pace, so a stalled relay or server cannot overflow a socket buffer. How fast the
//! relay really is belongs to `netsim bench-link --path relay`. Every test sends only to
//! 127.0.0.1.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

use d7q_netsim::link::DurationSummary;
use d7q_netsim::relay::{Direction, Relay, RelayConfig, RelayHandle, RelayStats};

/// Longest any test waits for something that should happen: a liveness limit, reached only
/// when the relay is broken, so generous enough for any load.
const WAIT: Duration = Duration::from_secs(30);
/// How long "nothing more arrives" is watched for. Only ever checked together with a counter,
/// so a late packet on a loaded machine cannot turn a broken relay green.
const QUIET: Duration = Duration::from_millis(300);
/// Packets a sender may have in flight (sent, neither arrived at the server nor dropped by the
/// link); small enough that any loopback socket buffer on the way holds them all, however the
/// relay and the server are scheduled.
const IN_FLIGHT: u64 = 32;
/// Every probe starts with a sequence number and the send time (µs since the test's base).
const HEADER: usize = 16;

/// A packet as the server saw it.
#[derive(Debug, Clone, Copy)]
struct Arrival {
    seq: u64,
    /// Time from the client's send to the server's receive.
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

    fn count(&self) -> u64 {
        self.arrivals.lock().unwrap().len() as u64
    }

    fn arrivals(&self) -> Vec<Arrival> {
        self.arrivals.lock().unwrap().clone()
    }

    /// The arrivals once there are `n` of them (or [`WAIT`] has passed).
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
    // Truncated to whole µs, so the decoded send time is never later than the real one and a
    // one-way time measured from it is never shorter than the real one.
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

/// Where a sender stands: packets accounted for so far, arrived at `server` or dropped by the
/// relay's up link.
fn settled(server: &Server, relay: &RelayHandle) -> u64 {
    server.count() + relay.stats().up.dropped_packets
}

/// Waits until a sender that has sent `sent` packets since `settled_before` has room in its
/// window of [`IN_FLIGHT`].
async fn wait_for_room(server: &Server, relay: &RelayHandle, settled_before: u64, sent: u64) {
    let deadline = Instant::now() + WAIT;
    while sent >= settled(server, relay) - settled_before + IN_FLIGHT {
        assert!(Instant::now() < deadline, "packets stopped arriving");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends `count` probes of `len` bytes numbered from `first` as fast as they are accounted
/// for, keeping at most [`IN_FLIGHT`] in flight.
async fn send_windowed(
    socket: &UdpSocket,
    server: &Server,
    relay: &RelayHandle,
    base: Instant,
    first: u64,
    count: u64,
    len: usize,
) {
    let before = settled(server, relay);
    for i in 0..count {
        wait_for_room(server, relay, before, i).await;
        socket.send(&probe(first + i, base, len)).await.unwrap();
    }
}

/// Receives echoes on `socket` until `expect` have come (or [`WAIT`] has passed), then for
/// [`QUIET`] more to catch any extra; returns their sequence numbers and round-trip times.
async fn collect_echoes(socket: &UdpSocket, base: Instant, expect: usize) -> Vec<(u64, Duration)> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_535];
    let deadline = Instant::now() + WAIT;
    let mut quiet_from: Option<Instant> = None;
    loop {
        if quiet_from.is_none() && got.len() >= expect {
            quiet_from = Some(Instant::now());
        }
        let until = match quiet_from {
            Some(t) => t + QUIET,
            None => deadline,
        };
        match tokio::time::timeout_at(until.into(), socket.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                if let Some((seq, sent)) = decode(&buf[..len], base) {
                    got.push((seq, Instant::now().saturating_duration_since(sent)));
                }
            }
            // ICMP "port unreachable" from a probe sent before a peer was up: keep reading.
            Ok(Err(_)) => {}
            Err(_) => return got,
        }
    }
}

fn seqs(arrivals: &[Arrival]) -> HashSet<u64> {
    arrivals.iter().map(|a| a.seq).collect()
}

/// `n` durations all equal to `d`, as a summary.
fn all_equal(n: u64, d: Duration) -> DurationSummary {
    let mut s = DurationSummary::default();
    for _ in 0..n {
        s.record(d);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_loss_is_applied_and_every_delivered_packet_arrives() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "loss=20%", "none", 1).await;
    let client = client(&relay).await;
    let n = 3000;
    send_windowed(&client, &server, &relay.handle(), base, 0, n, 200).await;

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
    // What was lost is what the link chose: nothing else is missing.
    let got = seqs(&arrivals);
    assert_eq!(got.len(), arrivals.len(), "a probe arrived twice");
    assert!(got.iter().all(|&s| s < n));
    let loss = stats.up.dropped.random_loss as f64 / n as f64;
    eprintln!("loss {loss:.4}, configured 0.2");
    // Binomial(3000, 0.2) has a standard deviation of 0.7 points; ±3 points is over 4 of them.
    // The seed fixes the draws, so this is the same number on every run.
    assert!((0.17..=0.23).contains(&loss), "loss {loss}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_configured_delay_is_scheduled_and_never_beaten_both_ways() {
    let base = Instant::now();
    let server = Server::start(base, true).await;
    let relay = relay(server.addr, "delay=50ms", "delay=30ms", 2).await;
    let client = Arc::new(client(&relay).await);
    // Echoes are read as they come, so a round trip does not include waiting in the buffer.
    let echoes = tokio::spawn({
        let client = client.clone();
        async move { collect_echoes(&client, base, 40).await }
    });
    for seq in 0..40 {
        client.send(&probe(seq, base, 100)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let arrivals = server.wait_for(40).await;
    let echoes = echoes.await.unwrap();
    assert_eq!(arrivals.len(), 40);
    assert_eq!(echoes.len(), 40);
    let stats = wait_stats(&relay.handle(), |s| s.lateness.count == 80).await;

    // What the emulator decided: each packet exactly its direction's delay, whatever the load.
    let ms = Duration::from_millis;
    assert_eq!(stats.up.scheduled_delay, all_equal(40, ms(50)), "{stats:?}");
    assert_eq!(
        stats.down.scheduled_delay,
        all_equal(40, ms(30)),
        "{stats:?}"
    );
    // The relay sent every packet at or after its scheduled time, never before.
    assert_eq!(stats.lateness.count, 80);
    // And what no load can cause: a packet arriving before its delay was up.
    for a in &arrivals {
        assert!(
            a.one_way >= ms(50),
            "probe {} arrived after {:?}",
            a.seq,
            a.one_way
        );
    }
    for (seq, rtt) in &echoes {
        assert!(*rtt >= ms(80), "probe {seq} came back after {rtt:?}");
    }
    // A constant delay keeps the order.
    let order: Vec<u64> = arrivals.iter().map(|a| a.seq).collect();
    assert_eq!(order, (0..40).collect::<Vec<u64>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bottleneck_sends_at_its_rate_and_tail_drops_beyond_its_queue() {
    // 8 Mbit/s is 1 MB/s: a 1200-byte packet takes exactly 1.2 ms. The queue holds 13 of them,
    // fewer than a sender's window, so every burst the relay reads at once overflows it.
    const RATE_BPS: u64 = 8_000_000;
    const QUEUE: u64 = 16 << 10;
    const LEN: usize = 1200;
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "rate=8mbit,queue=16kb", "none", 3).await;
    let client = client(&relay).await;
    let n = 2000;
    let first_sent = Instant::now();
    send_windowed(&client, &server, &relay.handle(), base, 0, n, LEN).await;
    let stats = wait_stats(&relay.handle(), |s| s.up.sent_packets == n).await;
    let arrivals = server.wait_for(stats.up.delivered_packets as usize).await;
    let up = &stats.up;
    eprintln!("{up:?}");

    assert_eq!(up.sent_packets, n);
    assert_eq!(arrivals.len() as u64, up.delivered_packets, "{stats:?}");
    let bytes: usize = arrivals.iter().map(|a| a.len).sum();
    assert_eq!(bytes as u64, up.delivered_bytes);
    // Offered far above the rate: the queue overflowed, and that is the only loss.
    assert!(up.dropped.queue_full > 0, "the queue never overflowed");
    assert_eq!(up.delivered_packets + up.dropped.queue_full, n);
    // The shaper's decisions: every packet it took cost its transmission time at the
    // configured rate; it never held more than the queue, and it did fill it (a packet is
    // refused only when less than one packet's room is left).
    let sh = &up.shaper;
    let transmit_ns = LEN as u64 * 8 * 1_000_000_000 / RATE_BPS;
    assert_eq!(transmit_ns, 1_200_000);
    assert_eq!(sh.accepted_packets, up.delivered_packets);
    assert_eq!(sh.accepted_bytes, up.delivered_bytes);
    assert_eq!(sh.busy_ns, sh.accepted_packets * transmit_ns);
    assert!(sh.queued_packets > 0);
    assert!(
        sh.peak_backlog_bytes <= QUEUE && sh.peak_backlog_bytes > QUEUE - 2 * LEN as u64,
        "peak backlog {} of a {QUEUE}-byte queue",
        sh.peak_backlog_bytes
    );
    // So no packet waited longer than a full queue takes to drain, and none spent less than
    // its own transmission time in the link.
    let drain = Duration::from_nanos(QUEUE * 8 * 1_000_000_000 / RATE_BPS);
    assert!(sh.wait.max().unwrap() <= drain, "{:?}", sh.wait);
    let d = up.scheduled_delay;
    assert!(d.min_ns >= transmit_ns, "{d:?}");
    assert!(
        d.max().unwrap() <= drain + Duration::from_nanos(transmit_ns),
        "{d:?}"
    );
    // A FIFO bottleneck keeps the order.
    assert!(arrivals.windows(2).all(|w| w[0].seq < w[1].seq));
    // The bound a loaded machine cannot break: the bottleneck cannot have sent the delivered
    // bytes faster than the rate, counted from before the first packet was offered.
    let at_rate = Duration::from_nanos(up.delivered_bytes * 8 * 1_000_000_000 / RATE_BPS);
    let took = arrivals.last().unwrap().at - first_sent;
    assert!(
        took >= at_rate,
        "{} bytes arrived in {took:?}, faster than the rate allows ({at_rate:?})",
        up.delivered_bytes
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_partition_drops_exactly_the_packets_sent_in_its_window() {
    let ms = Duration::from_millis;
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "partition=300ms+400ms", "none", 4).await;
    let handle = relay.handle();
    let client = client(&relay).await;
    // One probe every 5 ms until the link has cut and then delivered again: however late the
    // relay runs, the probes span the window in its link time.
    let mut delivered_when_cut = None;
    let deadline = Instant::now() + WAIT;
    let mut sent = 0u64;
    while Instant::now() < deadline {
        wait_for_room(&server, &handle, 0, sent).await;
        client.send(&probe(sent, base, 100)).await.unwrap();
        sent += 1;
        tokio::time::sleep(ms(5)).await;
        let up = handle.stats().up;
        if up.dropped.partition > 0 {
            let cut = *delivered_when_cut.get_or_insert(up.delivered_packets);
            if up.delivered_packets >= cut + 20 {
                break;
            }
        }
    }
    let stats = wait_stats(&handle, |s| s.up.sent_packets == sent).await;
    let got = seqs(&server.wait_for(stats.up.delivered_packets as usize).await);
    let up = &stats.up;

    assert_eq!(up.sent_packets, sent);
    assert!(up.dropped.partition > 0, "nothing was dropped: {up:?}");
    assert_eq!(
        up.dropped_packets, up.dropped.partition,
        "only the cut drops"
    );
    // The link dropped only inside the window, in its own time.
    let at = up.partition_drop_at;
    assert!(
        at.min().unwrap() >= ms(300) && at.max().unwrap() < ms(700),
        "partition drops at {at:?}"
    );
    // What arrived is exactly what was not dropped: one contiguous run of probes is missing,
    // and the path carried probes again after it.
    assert_eq!(got.len() as u64, up.delivered_packets);
    let missing: Vec<u64> = (0..sent).filter(|s| !got.contains(s)).collect();
    assert_eq!(missing.len() as u64, up.dropped.partition);
    assert!(
        missing.windows(2).all(|w| w[1] == w[0] + 1),
        "missing probes are not one run: {missing:?}"
    );
    assert!(
        got.iter().any(|&s| s > *missing.last().unwrap()),
        "never healed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_partition_cuts_then_heals() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let relay = relay(server.addr, "none", "none", 5).await;
    let handle = relay.handle();
    let client = client(&relay).await;

    send_windowed(&client, &server, &handle, base, 0, 20, 100).await;
    assert_eq!(server.wait_for(20).await.len(), 20);

    // Long enough that the 20 probes sent right after the cut are taken inside it even on a
    // loaded machine; the heal below waits for its end, so it costs no flakiness either way.
    let cut = Duration::from_secs(2);
    handle.partition(cut).unwrap();
    let cut_at = Instant::now();
    send_windowed(&client, &server, &handle, base, 100, 20, 100).await;
    wait_stats(&handle, |s| s.up.sent_packets == 40).await;
    // The window began before `cut_at`, so it is over once this sleep ends.
    tokio::time::sleep_until((cut_at + cut).into()).await;
    send_windowed(&client, &server, &handle, base, 200, 20, 100).await;
    let stats = wait_stats(&handle, |s| s.up.sent_packets == 60).await;
    server.wait_for(40).await;
    tokio::time::sleep(QUIET).await;

    let got = seqs(&server.arrivals());
    assert_eq!(got, (0..20).chain(200..220).collect::<HashSet<u64>>());
    assert_eq!(stats.up.dropped.partition, 20);
    assert_eq!(stats.up.dropped_packets, 20);
    // The drops fell inside the window the handle added, in link time.
    let window = *handle.link_config(Direction::Up).partitions.last().unwrap();
    let at = stats.up.partition_drop_at;
    assert!(
        at.min().unwrap() >= window.start && at.max().unwrap() < window.start + window.duration,
        "drops at {at:?}, window {window:?}"
    );
    assert_eq!(stats.down.dropped.partition, 0, "nothing went down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_partition_cuts_only_that_way() {
    let base = Instant::now();
    let server = Server::start(base, true).await;
    let relay = relay(server.addr, "none", "none", 6).await;
    let handle = relay.handle();
    let client = client(&relay).await;
    handle
        .partition_one_way(Direction::Down, Duration::from_secs(5))
        .unwrap();
    send_windowed(&client, &server, &handle, base, 0, 10, 100).await;
    assert_eq!(server.wait_for(10).await.len(), 10, "up must still work");
    // Every echo reached the down link, which dropped it for the cut.
    let stats = wait_stats(&handle, |s| s.down.sent_packets == 10).await;
    assert_eq!(stats.up.delivered_packets, 10);
    assert_eq!(stats.down.dropped.partition, 10, "down must be cut");
    assert_eq!(stats.down.delivered_packets, 0);
    assert!(collect_echoes(&client, base, 0).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebinding_changes_the_address_the_server_sees() {
    let base = Instant::now();
    let server = Server::start(base, true).await;
    let relay = relay(server.addr, "none", "none", 7).await;
    let handle = relay.handle();
    let client = client(&relay).await;

    client.send(&probe(1, base, 100)).await.unwrap();
    assert_eq!(collect_echoes(&client, base, 1).await.len(), 1);
    let before = server.arrivals()[0].from;
    assert_eq!(handle.sessions()[0].upstream_local.port(), before.port());

    assert_eq!(handle.rebind_client_side().await.unwrap(), 1);
    client.send(&probe(2, base, 100)).await.unwrap();
    assert_eq!(
        collect_echoes(&client, base, 1).await.len(),
        1,
        "the echo must follow the new path"
    );
    let after = server.wait_for(2).await[1].from;
    assert_ne!(before, after, "the server must see a new client address");
    assert_eq!(after.ip(), before.ip());
    assert_eq!(handle.sessions().len(), 1, "still one session");

    // The old address is gone, as after a real rebinding: nothing sent there reaches the
    // client, and the relay never even sees it (the down link was offered only the 2 echoes).
    server
        .socket
        .send_to(&probe(3, base, 100), before)
        .await
        .unwrap();
    assert!(collect_echoes(&client, base, 0).await.is_empty());
    let stats = handle.stats();
    assert_eq!(stats.rebinds, 1);
    assert_eq!(stats.down.sent_packets, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_bounded_and_expire_when_idle() {
    let base = Instant::now();
    let server = Server::start(base, false).await;
    let config = RelayConfig {
        max_sessions: 2,
        // Far longer than reading three queued packets takes, so no session expires between
        // the first client's packet and the third's; short enough to wait for below.
        idle_timeout: Duration::from_secs(1),
        ..RelayConfig::new("127.0.0.1:0".parse().unwrap(), server.addr)
    };
    let relay = Relay::bind(config).await.unwrap();
    let handle = relay.handle();
    let clients = [
        client(&relay).await,
        client(&relay).await,
        client(&relay).await,
    ];
    // All three queue on the relay's socket in this order, and it reads them in this order.
    for (i, c) in clients.iter().enumerate() {
        c.send(&probe(i as u64, base, 100)).await.unwrap();
    }
    let stats = wait_stats(&handle, |s| s.sessions_opened + s.refused_packets == 3).await;
    assert_eq!(stats.sessions_opened, 2);
    assert_eq!(stats.refused_packets, 1);
    assert_eq!(seqs(&server.wait_for(2).await), HashSet::from([0, 1]));

    let stats = wait_stats(&handle, |s| s.sessions_active == 0).await;
    assert_eq!(stats.sessions_expired, 2);
    // With the old sessions gone, the third client now gets one.
    clients[2].send(&probe(2, base, 100)).await.unwrap();
    assert!(seqs(&server.wait_for(3).await).contains(&2));
    assert_eq!(handle.stats().sessions_opened, 3);
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_relays_and_writes_stats_on_sigterm() {
    use std::process::Stdio;
    use tokio::io::{AsyncBufReadExt, BufReader};

    let base = Instant::now();
    let server = Server::start(base, true).await;
    let stats_path = std::env::temp_dir().join(format!("netsim-stats-{}.json", std::process::id()));
    // Killed when dropped, so a failing assertion cannot leave it running (holding the test's
    // stdout open).
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_netsim"))
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
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .expect("no ready line")
        .unwrap()
        .unwrap_or_default();
    let listen: SocketAddr = line
        .trim()
        .strip_prefix("ready listen=")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    assert!(listen.ip().is_loopback() && listen.port() != 0);

    // Ten small probes fit any socket buffer, so they need no window.
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(listen).await.unwrap();
    for seq in 0..10 {
        socket.send(&probe(seq, base, 100)).await.unwrap();
    }
    let echoes = collect_echoes(&socket, base, 10).await;
    assert_eq!(echoes.len(), 10);
    // 10 ms up and 5 ms down were scheduled; no echo can beat that.
    assert!(
        echoes.iter().all(|e| e.1 >= Duration::from_millis(15)),
        "{echoes:?}"
    );

    // No `kill` binary needed (minimal systems lack one).
    d7q_netsim::netns::signal(child.id().unwrap(), false).unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .expect("netsim did not exit on SIGTERM")
        .unwrap();
    assert!(status.success(), "{status}");

    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_path).unwrap()).unwrap();
    let _ = std::fs::remove_file(&stats_path);
    assert_eq!(json["seed"], 3);
    assert_eq!(json["up_config"], "delay=10ms");
    assert_eq!(json["down_config"], "delay=5ms");
    let stats = &json["stats"];
    assert_eq!(stats["up"]["sent_packets"], 10);
    assert_eq!(stats["down"]["delivered_packets"], 10);
    // The schedule is in the file too: every packet got its direction's delay.
    for (dir, ns) in [("up", 10_000_000), ("down", 5_000_000)] {
        let d = &stats[dir]["scheduled_delay"];
        assert_eq!(d["count"], 10, "{dir}");
        assert_eq!(d["min_ns"], ns, "{dir}");
        assert_eq!(d["max_ns"], ns, "{dir}");
    }
    assert_eq!(stats["lateness"]["count"], 20);
}

/// Polls the relay's statistics until `done` holds or [`WAIT`] passes.
async fn wait_stats(handle: &RelayHandle, done: impl Fn(&RelayStats) -> bool) -> RelayStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = handle.stats();
        if done(&stats) || Instant::now() > deadline {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
