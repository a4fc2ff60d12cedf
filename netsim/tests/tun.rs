//! The TUN link measured from outside, with real sockets in two network namespaces: UDP probes
//! for loss, delay, MTU and partitions, a TCP bulk transfer for the rate, and the `netsim
//! tun-link` binary end to end.
//!
//! These need root and /dev/net/tun (CI runs as root); elsewhere each test prints why it skips
//! and returns. Every test makes its own pair of namespaces (named after the process id and the
//! test), removed when its link is dropped. Timing tolerances are generous: the machine is shared
//! and packets cross user space twice.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::UdpSocket;

use d7q_netsim::netns;
use d7q_netsim::tun::{TunLink, TunLinkConfig};

/// Longest any test waits for packets.
const WAIT: Duration = Duration::from_secs(5);
/// Probes carry a sequence number and the send time in µs since the test's base.
const HEADER: usize = 16;
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

static NEXT: AtomicUsize = AtomicUsize::new(0);

/// Skips (returns true) unless this process can make namespaces and TUN devices.
fn skip() -> bool {
    match netns::privileged() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("skipping: the TUN link needs root and /dev/net/tun ({why})");
            true
        }
    }
}

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

/// Sends `n` probes of `len` bytes from `client` to `to`, one every `gap`, and collects the
/// echoes until [`WAIT`] passes without one after the last send: (seq, round trip).
async fn probe_round_trips(
    client: &UdpSocket,
    to: SocketAddr,
    n: u64,
    len: usize,
    gap: Duration,
) -> Vec<(u64, Duration)> {
    let base = Instant::now();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 65_535];
    let mut next = 0;
    let mut tick = tokio::time::interval(gap);
    loop {
        tokio::select! {
            _ = tick.tick(), if next < n => {
                client.send_to(&probe(next, base, len), to).await.unwrap();
                next += 1;
            }
            r = tokio::time::timeout(Duration::from_millis(1500), client.recv_from(&mut buf)) => {
                match r {
                    Ok(Ok((k, _))) => {
                        if let Some((seq, sent)) = decode(&buf[..k], base) {
                            got.push((seq, sent.elapsed()));
                        }
                    }
                    Ok(Err(e)) => panic!("recv: {e}"),
                    Err(_) if next >= n => break,
                    Err(_) => {}
                }
            }
        }
    }
    got
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_probes_see_the_configured_delay_and_loss() {
    if skip() {
        return;
    }
    let p = pair("delay=30ms,loss=10%", "delay=10ms", 7).await;
    let server = udp_in(&p.b, SocketAddr::from((ADDR_B, 0)));
    let to = server.local_addr().unwrap();
    let _echo_task = echo(server);
    let client = udp_in(&p.a, SocketAddr::from((ADDR_A, 0)));
    let n = 2000;
    let got = probe_round_trips(&client, to, n, 200, Duration::from_millis(1)).await;

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
    let rtt = median(got.iter().map(|g| g.1).collect());
    assert!(
        rtt >= Duration::from_millis(40) && rtt < Duration::from_millis(70),
        "median round trip {rtt:?}, configured 40 ms"
    );
    assert!(got.iter().all(|g| g.1 >= Duration::from_millis(39)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_seed_drops_the_same_probes() {
    if skip() {
        return;
    }
    let mut lost_sets = Vec::new();
    for _ in 0..2 {
        let p = pair("loss=20%", "none", 99).await;
        let server = udp_in(&p.b, SocketAddr::from((ADDR_B, 0)));
        let to = server.local_addr().unwrap();
        let _echo_task = echo(server);
        let client = udp_in(&p.a, SocketAddr::from((ADDR_A, 0)));
        // Paced wide enough that nothing else (an IPv6 solicitation) interleaves unnoticed:
        // only IPv4 packets to the other side reach the link.
        let got = probe_round_trips(&client, to, 300, 100, Duration::from_millis(2)).await;
        let seen: std::collections::BTreeSet<u64> = got.iter().map(|g| g.0).collect();
        let lost: Vec<u64> = (0..300).filter(|s| !seen.contains(s)).collect();
        assert!(!lost.is_empty() && lost.len() < 120, "lost {}", lost.len());
        lost_sets.push(lost);
    }
    assert_eq!(lost_sets[0], lost_sets[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_over_the_mtu_are_dropped_and_a_partition_cuts_then_heals() {
    if skip() {
        return;
    }
    let p = pair("mtu=1000", "none", 1).await;
    let server = udp_in(&p.b, SocketAddr::from((ADDR_B, 0)));
    let to = server.local_addr().unwrap();
    let _echo_task = echo(server);
    let client = udp_in(&p.a, SocketAddr::from((ADDR_A, 0)));
    // 972 bytes of payload + 28 of headers = exactly the MTU; one more byte is too many.
    let fits = probe_round_trips(&client, to, 20, 972, Duration::from_millis(2)).await;
    assert_eq!(fits.len(), 20);
    let too_big = probe_round_trips(&client, to, 20, 973, Duration::from_millis(2)).await;
    assert!(too_big.is_empty());
    let stats = p.link.stats();
    assert_eq!(stats.up.dropped.mtu, 20, "{stats:?}");

    p.link.partition(Duration::from_millis(800)).unwrap();
    let during = probe_round_trips(&client, to, 20, 100, Duration::from_millis(5)).await;
    assert!(
        during.is_empty(),
        "{} probes crossed a partition",
        during.len()
    );
    // The probe loop waited well past the partition's end: the path is back.
    let after = probe_round_trips(&client, to, 20, 100, Duration::from_millis(2)).await;
    assert_eq!(after.len(), 20);
    assert_eq!(p.link.stats().up.dropped.partition, 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_bulk_transfer_runs_at_the_configured_rate() {
    if skip() {
        return;
    }
    const RATE_MBIT: f64 = 20.0;
    const BYTES: usize = 6 << 20;
    let p = pair("rate=20mbit,delay=5ms", "rate=20mbit,delay=5ms", 3).await;
    let listener = netns::run_in(&p.b, || TcpListener::bind((ADDR_B, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let (mut total, mut first, mut checksum) = (0usize, None, 0u64);
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            first.get_or_insert_with(Instant::now);
            checksum = buf[..n].iter().fold(checksum, |c, &b| {
                c.wrapping_mul(31).wrapping_add(u64::from(b))
            });
            total += n;
        }
        (total, first.map(|f| f.elapsed()), checksum)
    });
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
    let (total, took, got_sum) = tokio::task::spawn_blocking(move || reader.join().unwrap())
        .await
        .unwrap();
    assert_eq!(total, BYTES);
    assert_eq!(got_sum, sent_sum, "the bytes arrived intact");
    let mbit = BYTES as f64 * 8.0 / took.unwrap().as_secs_f64() / 1e6;
    // Payload goodput cannot beat the rate (headers take ~4 %); slow start and the shared
    // machine cost some, never half.
    assert!(
        (0.55 * RATE_MBIT..=1.0 * RATE_MBIT).contains(&mbit),
        "goodput {mbit:.1} Mbit/s through a {RATE_MBIT} Mbit/s link"
    );
    let stats = p.link.stats();
    assert!(stats.up.delivered_bytes >= BYTES as u64, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_links_namespaces_and_cleans_up_on_sigterm() {
    if skip() {
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
    let got = probe_round_trips(&client, to, 50, 100, Duration::from_millis(2)).await;
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
    assert_eq!(stats["stats"]["up"]["delivered_packets"], 50);
    assert_eq!(stats["stats"]["down"]["delivered_packets"], 50);
    let _ = std::fs::remove_dir_all(&dir);
}
