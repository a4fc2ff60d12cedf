//! The TUN link driven from outside, with real sockets in two network namespaces: UDP probes
//! for loss, delay, MTU and partitions, a TCP bulk transfer through a bottleneck, and the
//! `netsim tun-link` binary end to end.
//!
//! These need root and /dev/net/tun. Outside CI each test prints why it skips and passes; under
//! CI (`CI=true`) or with `D7Q_REQUIRE_PRIVILEGED=1` (as `scripts/test.sh` sets) a missing one
//! fails the test (see `common`). Every test makes its own pair of namespaces (named after the
//! process id and the test), removed when its link is dropped.
//!
//! No assertion bounds real time from above. What is asserted is what the link decided (the
//! delay it scheduled per packet, drops by reason and their link time, the bottleneck's busy
//! time and backlog), counts, bytes and orders, and real-time lower bounds that only a broken
//! link can violate. Probers keep a bounded window of probes in flight instead of trusting a
//! pace, so no socket or device queue overflows on a loaded machine. Goodput and round-trip
//! times on this machine are measured by `netsim bench-link`, not here.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UdpSocket;

use d7q_netsim::link::DurationSummary;
use d7q_netsim::netns;
use d7q_netsim::tun::{TunLink, TunLinkConfig, TunLinkStats};

/// Longest any test waits for something that should happen: a liveness limit, reached only
/// when the link is broken, so generous enough for any load.
const WAIT: Duration = Duration::from_secs(30);
/// How often a waiting probe loop looks at the link's counters again.
const POLL: Duration = Duration::from_millis(10);
/// Probes in flight (sent, neither echoed back nor dropped by a link); far below a TUN device's
/// queue (500 packets) and what a socket buffer holds, so however the link's reader, the echo
/// server and the prober are scheduled, the kernel never drops a probe or an echo.
const IN_FLIGHT: u64 = 32;
/// Probes carry a sequence number and the send time in µs since the probe loop's base.
const HEADER: usize = 16;
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Two fresh namespace names for one test.
fn names() -> (String, String) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = std::process::id();
    (format!("nst{id}-{n}a"), format!("nst{id}-{n}b"))
}

/// A UDP socket bound in namespace `ns` to `addr`.
fn udp_in(ns: &str, addr: SocketAddr) -> UdpSocket {
    let std = netns::run_in(ns, || std::net::UdpSocket::bind(addr))
        .unwrap()
        .unwrap();
    std.set_nonblocking(true).unwrap();
    UdpSocket::from_std(std).unwrap()
}

fn probe(seq: u64, base: Instant, len: usize) -> Vec<u8> {
    let mut p = vec![0u8; len.max(HEADER)];
    p[..8].copy_from_slice(&seq.to_be_bytes());
    // Truncated to whole µs, so a round trip measured from it is never shorter than the real one.
    let micros = base.elapsed().as_micros() as u64;
    p[8..16].copy_from_slice(&micros.to_be_bytes());
    p
}

fn decode(p: &[u8], base: Instant) -> Option<(u64, Instant)> {
    let seq = u64::from_be_bytes(p.get(..8)?.try_into().ok()?);
    let micros = u64::from_be_bytes(p.get(8..16)?.try_into().ok()?);
    Some((seq, base + Duration::from_micros(micros)))
}

/// A link plus the names of its namespaces.
struct Pair {
    link: TunLink,
    a: String,
    b: String,
}

async fn pair(up: &str, down: &str, seed: u64) -> Pair {
    let (a, b) = names();
    let config = TunLinkConfig {
        up: up.parse().unwrap(),
        down: down.parse().unwrap(),
        seed,
        ..TunLinkConfig::new(&a, &b)
    };
    let link = TunLink::start(config).await.expect("starting the TUN link");
    Pair { link, a, b }
}

/// Echoes every datagram on `socket` back to its sender, until the task is aborted.
fn echo(socket: UdpSocket) -> Echo {
    Echo(tokio::spawn(async move {
        let mut buf = vec![0u8; 65_535];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            let _ = socket.send_to(&buf[..n], from).await;
        }
    }))
}

/// The echo task, aborted (closing its socket) when dropped.
struct Echo(tokio::task::JoinHandle<()>);

impl Drop for Echo {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What a probe loop learns from the link as it runs.
trait Progress {
    /// How many probes and echoes of this loop the links have dropped so far.
    fn dropped(&self) -> u64;
    /// How many echoes will come back, once the link has decided about every probe and echo.
    fn expected(&self, n: u64) -> Option<u64>;
}

/// Progress read from an in-process link's counters, relative to a snapshot taken before.
struct Counted<'a> {
    link: &'a TunLink,
    before: TunLinkStats,
}

impl<'a> Counted<'a> {
    fn new(link: &'a TunLink) -> Self {
        Self {
            link,
            before: link.stats(),
        }
    }
}

impl Progress for Counted<'_> {
    fn dropped(&self) -> u64 {
        let (now, was) = (self.link.stats(), &self.before);
        now.up.dropped_packets + now.down.dropped_packets
            - was.up.dropped_packets
            - was.down.dropped_packets
    }

    fn expected(&self, n: u64) -> Option<u64> {
        let (now, was) = (self.link.stats(), &self.before);
        let up_taken = now.up.sent_packets - was.up.sent_packets;
        let up_delivered = now.up.delivered_packets - was.up.delivered_packets;
        let echoes_taken = now.down.sent_packets - was.down.sent_packets;
        // Every probe decided, and every delivered one echoed into the down link and decided.
        (up_taken >= n && echoes_taken >= up_delivered)
            .then(|| now.down.delivered_packets - was.down.delivered_packets)
    }
}

/// Progress of a link in another process: a perfect link, every probe comes back.
struct Lossless;

impl Progress for Lossless {
    fn dropped(&self) -> u64 {
        0
    }

    fn expected(&self, n: u64) -> Option<u64> {
        Some(n)
    }
}

/// Sends `n` probes of `len` bytes from `client` to `to`, one every `gap` but never more than
/// [`IN_FLIGHT`] in flight, and collects the echoes until as many as `progress` expects have
/// come: (seq, round trip).
async fn probe_round_trips(
    client: &UdpSocket,
    to: SocketAddr,
    n: u64,
    len: usize,
    gap: Duration,
    progress: &impl Progress,
) -> Vec<(u64, Duration)> {
    let base = Instant::now();
    let deadline = base + WAIT;
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_535];
    let mut next = 0;
    let mut tick = tokio::time::interval(gap);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if next >= n && progress.expected(n).is_some_and(|k| got.len() as u64 >= k) {
            return got;
        }
        assert!(
            Instant::now() < deadline,
            "sent {next} of {n} probes, {} echoes came",
            got.len()
        );
        let room = next < n && next < got.len() as u64 + progress.dropped() + IN_FLIGHT;
        tokio::select! {
            _ = tick.tick(), if room => {
                client.send_to(&probe(next, base, len), to).await.unwrap();
                next += 1;
            }
            r = tokio::time::timeout(POLL, client.recv_from(&mut buf)) => match r {
                Ok(Ok((k, _))) => {
                    if let Some((seq, sent)) = decode(&buf[..k], base) {
                        got.push((seq, sent.elapsed()));
                    }
                }
                Ok(Err(e)) => panic!("recv: {e}"),
                Err(_) => {}
            },
        }
    }
}

/// The link's counters once `done` holds (or [`WAIT`] has passed).
fn wait_stats(link: &TunLink, done: impl Fn(&TunLinkStats) -> bool) -> TunLinkStats {
    let deadline = Instant::now() + WAIT;
    loop {
        let stats = link.stats();
        if done(&stats) || Instant::now() > deadline {
            return stats;
        }
        std::thread::sleep(POLL);
    }
}

/// `n` durations all equal to `d`, as a summary.
fn all_equal(n: u64, d: Duration) -> DurationSummary {
    let mut s = DurationSummary::default();
    for _ in 0..n {
        s.record(d);
    }
    s
}

#[test]
fn under_ci_a_missing_privilege_fails_instead_of_skipping() {
    use common::required;
    assert!(!required(None, None), "a developer's run may skip");
    for ci in ["true", "1", "TRUE", "woodpecker"] {
        assert!(required(Some(ci), None), "CI={ci}");
    }
    for ci in ["false", "0", ""] {
        assert!(!required(Some(ci), None), "CI={ci}");
    }
    assert!(required(None, Some("1")));
    assert!(required(Some("false"), Some("1")));
    assert!(!required(Some("true"), Some("0")), "an explicit 0 wins");
    assert!(
        required(Some("true"), Some("maybe")),
        "unrecognised: CI decides"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_probes_get_the_configured_delay_and_loss() {
    if common::skip_unprivileged("udp_probes_get_the_configured_delay_and_loss") {
        return;
    }
    let ms = Duration::from_millis;
    let p = pair("delay=30ms,loss=10%", "delay=10ms", 7).await;
    let server = udp_in(&p.b, SocketAddr::from((ADDR_B, 0)));
    let to = server.local_addr().unwrap();
    let _echo_task = echo(server);
    let client = udp_in(&p.a, SocketAddr::from((ADDR_A, 0)));
    let n = 2000;
    let progress = Counted::new(&p.link);
    let got = probe_round_trips(&client, to, n, 200, ms(1), &progress).await;

    let stats = p.link.stats();
    // Every probe went up; 10 % of them were lost on the way; the way down is lossless.
    assert_eq!(stats.up.sent_packets, n, "{stats:?}");
    let lost = stats.up.dropped.random_loss;
    assert_eq!(stats.up.dropped_packets, lost);
    // Binomial(2000, 10 %): sd ≈ 13.4; ±70 is over 5 of them.
    assert!((130..=270).contains(&lost), "lost {lost} of {n}");
    assert_eq!(
        got.len() as u64,
        n - lost,
        "echoes: every delivered probe comes back"
    );
    // What the link decided: each delivered packet exactly its direction's delay.
    assert_eq!(stats.up.scheduled_delay, all_equal(n - lost, ms(30)));
    assert_eq!(stats.down.scheduled_delay, all_equal(n - lost, ms(10)));
    // And what no load can cause: an echo back before both delays were up.
    for (seq, rtt) in &got {
        assert!(*rtt >= ms(40), "probe {seq} came back after {rtt:?}");
    }
    // The switch wrote every delivered packet (it counts a batch after writing it, so the
    // last echo can arrive just before its count).
    let switch = wait_stats(&p.link, |s| s.switch.written_packets >= 2 * (n - lost)).switch;
    assert_eq!(switch.written_packets, 2 * (n - lost));
    assert_eq!(switch.lateness.count, 2 * (n - lost));
    assert_eq!(switch.write_errors + switch.overflow_dropped, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_drops_the_same_probes() {
    if common::skip_unprivileged("the_same_seed_drops_the_same_probes") {
        return;
    }
    let mut lost_sets = Vec::new();
    for _ in 0..2 {
        let p = pair("loss=20%", "none", 99).await;
        let server = udp_in(&p.b, SocketAddr::from((ADDR_B, 0)));
        let to = server.local_addr().unwrap();
        let _echo_task = echo(server);
        let client = udp_in(&p.a, SocketAddr::from((ADDR_A, 0)));
        // Only IPv4 packets to the other side reach the link (an IPv6 solicitation does not),
        // so the link draws once per probe, in probe order.
        let progress = Counted::new(&p.link);
        let got =
            probe_round_trips(&client, to, 300, 100, Duration::from_millis(2), &progress).await;
        let seen: std::collections::BTreeSet<u64> = got.iter().map(|g| g.0).collect();
        let lost: Vec<u64> = (0..300).filter(|s| !seen.contains(s)).collect();
        assert_eq!(lost.len() as u64, p.link.stats().up.dropped.random_loss);
        assert!(!lost.is_empty() && lost.len() < 120, "lost {}", lost.len());
        lost_sets.push(lost);
    }
    assert_eq!(lost_sets[0], lost_sets[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_over_the_mtu_are_dropped_and_a_partition_cuts_then_heals() {
    let name = "packets_over_the_mtu_are_dropped_and_a_partition_cuts_then_heals";
    if common::skip_unprivileged(name) {
        return;
    }
    let ms = Duration::from_millis;
    let p = pair("mtu=1000", "none", 1).await;
    let server = udp_in(&p.b, SocketAddr::from((ADDR_B, 0)));
    let to = server.local_addr().unwrap();
    let _echo_task = echo(server);
    let client = udp_in(&p.a, SocketAddr::from((ADDR_A, 0)));
    // 972 bytes of payload + 28 of headers = exactly the MTU; one more byte is too many.
    let fits = probe_round_trips(&client, to, 20, 972, ms(2), &Counted::new(&p.link)).await;
    assert_eq!(fits.len(), 20);
    let too_big = probe_round_trips(&client, to, 20, 973, ms(2), &Counted::new(&p.link)).await;
    assert!(too_big.is_empty());
    let stats = p.link.stats();
    assert_eq!(stats.up.dropped.mtu, 20, "{stats:?}");
    assert_eq!(stats.up.dropped_packets, 20);

    // Long enough that 20 probes 5 ms apart are all taken inside it even on a loaded machine;
    // the heal below waits for its end, so the length costs no flakiness either way.
    let cut = Duration::from_secs(2);
    p.link.partition(cut).unwrap();
    let cut_at = Instant::now();
    let during = probe_round_trips(&client, to, 20, 100, ms(5), &Counted::new(&p.link)).await;
    assert!(
        during.is_empty(),
        "{} probes crossed a partition",
        during.len()
    );
    let stats = p.link.stats();
    assert_eq!(stats.up.dropped.partition, 20, "{stats:?}");
    let at = stats.up.partition_drop_at;
    assert!(at.max_ns - at.min_ns < cut.as_nanos() as u64, "{at:?}");
    // The window began before `cut_at`, so the path is back once this sleep ends.
    tokio::time::sleep_until((cut_at + cut).into()).await;
    let after = probe_round_trips(&client, to, 20, 100, ms(2), &Counted::new(&p.link)).await;
    assert_eq!(after.len(), 20);
    assert_eq!(p.link.stats().up.dropped.partition, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_bulk_transfer_arrives_intact_through_the_bottleneck() {
    let name = "a_tcp_bulk_transfer_arrives_intact_through_the_bottleneck";
    if common::skip_unprivileged(name) {
        return;
    }
    const RATE_BPS: u64 = 20_000_000;
    const BYTES: usize = 3 << 20;
    let p = pair("rate=20mbit,delay=5ms", "rate=20mbit,delay=5ms", 3).await;
    let listener = netns::run_in(&p.b, || TcpListener::bind((ADDR_B, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let (mut total, mut checksum) = (0usize, 0u64);
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            checksum = buf[..n].iter().fold(checksum, |c, &b| {
                c.wrapping_mul(31).wrapping_add(u64::from(b))
            });
            total += n;
        }
        (total, checksum, Instant::now())
    });
    let started = Instant::now();
    let writer = std::thread::spawn({
        let a = p.a.clone();
        move || {
            let mut s = netns::run_in(&a, || TcpStream::connect(addr))
                .unwrap()
                .unwrap();
            let data: Vec<u8> = (0..BYTES).map(|i| (i % 251) as u8).collect();
            s.write_all(&data).unwrap();
            data.iter()
                .fold(0u64, |c, &b| c.wrapping_mul(31).wrapping_add(u64::from(b)))
        }
    });
    let sent_sum = tokio::task::spawn_blocking(move || writer.join().unwrap())
        .await
        .unwrap();
    let (total, got_sum, finished) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(total, BYTES);
    assert_eq!(got_sum, sent_sum, "the bytes arrived intact");

    let up = p.link.stats().up;
    eprintln!("{up:?}");
    assert!(up.delivered_bytes >= BYTES as u64, "{up:?}");
    // The bottleneck's decisions: each byte it took cost 8 bits at the rate (400 ns at
    // 20 Mbit/s, exactly); TCP kept it busy enough to queue; it never held more than its queue.
    let sh = &up.shaper;
    assert_eq!(sh.busy_ns, sh.accepted_bytes * 8 * 1_000_000_000 / RATE_BPS);
    assert!(sh.queued_packets > 0, "TCP never queued at the bottleneck");
    let queue = d7q_netsim::link::DEFAULT_QUEUE_BYTES;
    assert!(sh.peak_backlog_bytes <= queue, "{sh:?}");
    // So every packet spent its delay and at most a full queue's drain and its own transmission.
    let d = up.scheduled_delay;
    let drain = Duration::from_nanos(queue * 8 * 1_000_000_000 / RATE_BPS);
    let one_packet = Duration::from_nanos(1500 * 8 * 1_000_000_000 / RATE_BPS);
    assert!(d.min().unwrap() >= Duration::from_millis(5), "{d:?}");
    assert!(
        d.max().unwrap() <= Duration::from_millis(5) + drain + one_packet,
        "{d:?}"
    );
    // The bound a loaded machine cannot break: the payload alone needs this long at the rate.
    let at_rate = Duration::from_nanos(BYTES as u64 * 8 * 1_000_000_000 / RATE_BPS);
    let took = finished - started;
    assert!(
        took >= at_rate,
        "{BYTES} bytes in {took:?}, faster than the rate allows ({at_rate:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_links_namespaces_and_cleans_up_on_sigterm() {
    if common::skip_unprivileged("the_binary_links_namespaces_and_cleans_up_on_sigterm") {
        return;
    }
    let (a, b) = names();
    let dir = std::env::temp_dir().join(format!("netsim-tun-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let stats_path = dir.join(format!("{a}.json"));
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_netsim"))
        .args(["tun-link", "--ns-a", &a, "--ns-b", &b])
        .args(["--addr-a", "10.77.9.1/30", "--addr-b", "10.77.9.2/30"])
        .args(["--up", "delay=5ms", "--down", "delay=5ms", "--seed", "4"])
        .arg("--stats-json")
        .arg(&stats_path)
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(WAIT, lines.next_line())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(ready.as_deref(), Some("ready"));
    assert!(netns::exists(&a) && netns::exists(&b));

    let server = udp_in(&b, "10.77.9.2:0".parse().unwrap());
    let to = server.local_addr().unwrap();
    let echo_task = echo(server);
    let client = udp_in(&a, "10.77.9.1:0".parse().unwrap());
    // A perfect link in another process: every probe comes back, which is all the window needs.
    let got = probe_round_trips(&client, to, 50, 100, Duration::from_millis(2), &Lossless).await;
    assert_eq!(got.len(), 50);
    assert!(got.iter().all(|g| g.1 >= Duration::from_millis(10)));
    drop(client);
    drop(echo_task);

    netns::signal(child.id().unwrap(), false).unwrap();
    let status = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(!netns::exists(&a) && !netns::exists(&b), "namespaces left");
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stats_path).unwrap()).unwrap();
    assert_eq!(stats["seed"], 4);
    for dir in ["up", "down"] {
        let link = &stats["stats"][dir];
        assert_eq!(link["delivered_packets"], 50, "{dir}");
        // The schedule is in the file too: every packet got exactly 5 ms.
        let d = &link["scheduled_delay"];
        assert_eq!(d["count"], 50, "{dir}");
        assert_eq!(d["min_ns"], 5_000_000, "{dir}");
        assert_eq!(d["max_ns"], 5_000_000, "{dir}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
