//! `netsim bench-link`: how fast this machine really pushes traffic through an emulated path.
//!
//! For: the numbers the tests deliberately do not assert — round-trip times and goodput as
//! measured by real sockets, next to what the link model scheduled, and how late the emulator
//! ran behind its own schedule. They depend on the machine and its load, so they are printed
//! and written as JSON for a person or a dashboard to judge, never checked against a bound.
//! Not for: deciding whether the emulator is right; `tests/relay.rs` and `tests/tun.rs` do that
//! from the emulator's counters. Part of the `netsim` binary, not of the library.
//!
//! Two paths: `tun` (root) joins two fresh namespaces with a [`TunLink`] and measures UDP round
//! trips and a TCP bulk transfer; `relay` (no privileges) puts a [`Relay`] on 127.0.0.1 and
//! measures UDP round trips and a windowed UDP bulk transfer.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde::Serialize;
use tokio::net::UdpSocket;

use d7q_netsim::link::{DurationSummary, LinkConfig, LinkStats};
use d7q_netsim::netns;
use d7q_netsim::relay::{Relay, RelayConfig, RelayHandle};
use d7q_netsim::tun::{TunLink, TunLinkConfig};

/// Bytes of one round-trip probe.
const PROBE_LEN: usize = 64;
/// Payload of one datagram of the UDP transfer: fits a 1500-byte MTU with IPv4 and UDP headers.
const DATAGRAM_LEN: usize = 1200;
/// Datagrams of the UDP transfer sent that the relay has not yet taken: below what a loopback
/// socket buffer holds, so the kernel never drops one before the link sees it.
const IN_FLIGHT: u64 = 32;
/// How long to wait for stragglers after the last probe or datagram.
const LINGER: Duration = Duration::from_secs(3);
/// Longest one measurement may take before the bench gives up on it.
const MEASUREMENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Addresses of the two sides of the TUN path.
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

/// Which emulated path to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathKind {
    /// Two network namespaces joined by TUN devices (root); TCP and UDP.
    Tun,
    /// The UDP relay on 127.0.0.1 (no privileges); UDP only.
    Relay,
}

/// What `netsim bench-link` takes.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which path to measure.
    #[arg(long, value_enum, default_value = "tun")]
    path: PathKind,
    /// Forward link (the bulk transfer's direction), e.g. `rate=20mbit,delay=5ms`.
    #[arg(long, value_name = "CONFIG", default_value = "rate=20mbit,delay=5ms", value_parser = crate::parse_link)]
    up: LinkConfig,
    /// Return link, same syntax as --up.
    #[arg(long, value_name = "CONFIG", default_value = "rate=20mbit,delay=5ms", value_parser = crate::parse_link)]
    down: LinkConfig,
    /// Seed for the links' random decisions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// Round-trip probes, one a millisecond.
    #[arg(long, value_name = "N", default_value_t = 500)]
    probes: u64,
    /// Bytes of the bulk transfer.
    #[arg(long, value_name = "BYTES", default_value_t = 6 << 20)]
    bytes: u64,
    /// Also write the results as JSON to this file.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Everything one run measured, as written to `--json`.
#[derive(Debug, Serialize)]
struct Report {
    path: PathKind,
    up_config: String,
    down_config: String,
    seed: u64,
    round_trip: RoundTrip,
    transfer: Transfer,
    /// How late the emulator handed packets on, behind its own schedule.
    lateness: Lateness,
    /// The forward link's counters.
    up: LinkStats,
    /// The return link's counters.
    down: LinkStats,
}

/// Round trips of small UDP probes.
#[derive(Debug, Serialize)]
struct RoundTrip {
    sent: u64,
    received: u64,
    /// Measured by the prober's clock.
    measured: Spread,
    /// What the links scheduled for one probe and its echo, on average: read before the
    /// transfer, so only probes count.
    scheduled_ms: f64,
}

/// One bulk transfer in the forward direction.
#[derive(Debug, Serialize)]
struct Transfer {
    /// `tcp` or `udp`.
    protocol: &'static str,
    /// Payload bytes offered.
    sent_bytes: u64,
    /// Payload bytes that arrived.
    received_bytes: u64,
    /// From the first byte's arrival to the last's.
    seconds: f64,
    /// Payload bits per second over `seconds`, in Mbit/s.
    goodput_mbit: f64,
    /// The forward link's configured rate, if it has one.
    rate_mbit: Option<f64>,
}

/// How far behind its schedule the emulator ran, in milliseconds (a summary keeps no
/// distribution, so no median).
#[derive(Debug, Serialize)]
struct Lateness {
    count: u64,
    min_ms: f64,
    mean_ms: f64,
    max_ms: f64,
}

/// Distribution of a set of durations, in milliseconds.
#[derive(Debug, Default, Serialize)]
struct Spread {
    count: u64,
    min_ms: f64,
    median_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    mean_ms: f64,
}

/// Runs the measurement `args` asks for, prints it, and writes the JSON if asked.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let report = match args.path {
        PathKind::Tun => {
            netns::privileged().map_err(|why| {
                anyhow::anyhow!("the TUN path needs root and /dev/net/tun: {why}")
            })?;
            tun(&args).await?
        }
        PathKind::Relay => relay(&args).await?,
    };
    print_report(&report);
    if let Some(path) = &args.json {
        crate::write_atomically(path, &serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn tun(args: &BenchArgs) -> anyhow::Result<Report> {
    let id = std::process::id();
    let (ns_a, ns_b) = (format!("nsbench{id}a"), format!("nsbench{id}b"));
    let link = TunLink::start(TunLinkConfig {
        up: args.up.clone(),
        down: args.down.clone(),
        seed: args.seed,
        ..TunLinkConfig::new(&ns_a, &ns_b)
    })
    .await?;

    let server = udp_in(&ns_b, (ADDR_B, 0).into())?;
    let to = server.local_addr()?;
    let echo = tokio::spawn(echo(server));
    let client = udp_in(&ns_a, (ADDR_A, 0).into())?;
    let rtts = timed(ping(&client, to, args.probes)).await??;
    echo.abort();
    let probed = link.stats();
    let scheduled = scheduled_round_trip(&probed.up, &probed.down);

    let bytes = usize::try_from(args.bytes)?;
    let transfer = tokio::task::spawn_blocking({
        let (a, b) = (ns_a.clone(), ns_b.clone());
        move || tcp_transfer(&a, &b, bytes)
    });
    let transfer = timed(transfer)
        .await?
        .context("the transfer thread panicked")??;
    let stats = link.stats();
    drop(link);
    Ok(report(
        args,
        &rtts,
        scheduled,
        transfer,
        stats.switch.lateness,
        stats.up,
        stats.down,
    ))
}

async fn relay(args: &BenchArgs) -> anyhow::Result<Report> {
    // One server: echoes probes, counts and times the transfer's datagrams.
    let server = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
    let sink = Arc::new(Mutex::new(Sink::default()));
    let serve = tokio::spawn(sink_and_echo(server.clone(), sink.clone()));
    let relay = Relay::bind(RelayConfig {
        up: args.up.clone(),
        down: args.down.clone(),
        seed: args.seed,
        ..RelayConfig::new("127.0.0.1:0".parse()?, server.local_addr()?)
    })
    .await?;
    let client = UdpSocket::bind("127.0.0.1:0").await?;
    let rtts = timed(ping(&client, relay.local_addr(), args.probes)).await??;
    let probed = relay.handle().stats();
    let scheduled = scheduled_round_trip(&probed.up, &probed.down);
    let transfer = timed(udp_transfer(
        &client,
        &relay.handle(),
        relay.local_addr(),
        args.bytes,
        &sink,
    ))
    .await??;
    serve.abort();
    let stats = relay.handle().stats();
    Ok(report(
        args,
        &rtts,
        scheduled,
        transfer,
        stats.lateness,
        stats.up,
        stats.down,
    ))
}

fn report(
    args: &BenchArgs,
    rtts: &[Duration],
    scheduled_ms: f64,
    mut transfer: Transfer,
    lateness: DurationSummary,
    up: LinkStats,
    down: LinkStats,
) -> Report {
    transfer.rate_mbit = args.up.rate_bps.map(|r| r as f64 / 1e6);
    Report {
        path: args.path,
        up_config: args.up.to_string(),
        down_config: args.down.to_string(),
        seed: args.seed,
        round_trip: RoundTrip {
            sent: args.probes,
            received: rtts.len() as u64,
            measured: spread(rtts),
            scheduled_ms,
        },
        transfer,
        lateness: Lateness {
            count: lateness.count,
            min_ms: lateness.min().map_or(0.0, ms),
            mean_ms: lateness.mean().map_or(0.0, ms),
            max_ms: lateness.max().map_or(0.0, ms),
        },
        up,
        down,
    }
}

fn print_report(r: &Report) {
    let rt = &r.round_trip;
    println!(
        "path {}: up {}, down {}, seed {}",
        match r.path {
            PathKind::Tun => "tun",
            PathKind::Relay => "relay",
        },
        r.up_config,
        r.down_config,
        r.seed
    );
    println!(
        "round trip: {}/{} probes back; min {:.2} ms, median {:.2} ms, p99 {:.2} ms, max {:.2} ms; {:.2} ms scheduled",
        rt.received,
        rt.sent,
        rt.measured.min_ms,
        rt.measured.median_ms,
        rt.measured.p99_ms,
        rt.measured.max_ms,
        rt.scheduled_ms
    );
    let t = &r.transfer;
    let rate = t.rate_mbit.map_or_else(
        || "no rate".to_owned(),
        |m| format!("{m:.1} Mbit/s configured"),
    );
    println!(
        "transfer ({}): {} of {} bytes in {:.3} s = {:.2} Mbit/s goodput ({rate})",
        t.protocol, t.received_bytes, t.sent_bytes, t.seconds, t.goodput_mbit
    );
    println!(
        "emulator lateness behind schedule: mean {:.3} ms, max {:.3} ms over {} packets",
        r.lateness.mean_ms, r.lateness.max_ms, r.lateness.count
    );
    println!(
        "up link: {} delivered, {} dropped (queue full {}), {} queued at the bottleneck",
        r.up.delivered_packets,
        r.up.dropped_packets,
        r.up.dropped.queue_full,
        r.up.shaper.queued_packets
    );
}

/// Mean scheduled time up plus mean scheduled time down, in milliseconds.
fn scheduled_round_trip(up: &LinkStats, down: &LinkStats) -> f64 {
    let mean = |s: &DurationSummary| s.mean().map_or(0.0, ms);
    mean(&up.scheduled_delay) + mean(&down.scheduled_delay)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn spread(values: &[Duration]) -> Spread {
    if values.is_empty() {
        return Spread::default();
    }
    let mut v = values.to_vec();
    v.sort();
    let at = |q: f64| ms(v[((v.len() - 1) as f64 * q).round() as usize]);
    let sum: Duration = v.iter().sum();
    Spread {
        count: v.len() as u64,
        min_ms: ms(v[0]),
        median_ms: at(0.5),
        p99_ms: at(0.99),
        max_ms: ms(v[v.len() - 1]),
        mean_ms: ms(sum / v.len() as u32),
    }
}

async fn timed<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(MEASUREMENT_TIMEOUT, f)
        .await
        .with_context(|| format!("the measurement took longer than {MEASUREMENT_TIMEOUT:?}"))
}

/// A UDP socket bound in namespace `ns`.
fn udp_in(ns: &str, addr: SocketAddr) -> anyhow::Result<UdpSocket> {
    let socket = netns::run_in(ns, || std::net::UdpSocket::bind(addr))??;
    socket.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(socket)?)
}

async fn echo(socket: UdpSocket) {
    let mut buf = vec![0u8; 65_535];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        let _ = socket.send_to(&buf[..n], from).await;
    }
}

/// Sends `n` probes to `to`, one a millisecond, reading echoes as they come; returns the round
/// trips of those that came back within [`LINGER`] of the last send.
async fn ping(client: &UdpSocket, to: SocketAddr, n: u64) -> anyhow::Result<Vec<Duration>> {
    let base = Instant::now();
    let mut sent_at = Vec::with_capacity(n as usize);
    let mut rtts = Vec::with_capacity(n as usize);
    let mut buf = vec![0u8; 65_535];
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let mut last_send = base;
    while (rtts.len() as u64) < n {
        let sending = (sent_at.len() as u64) < n;
        if !sending && last_send.elapsed() > LINGER {
            break;
        }
        tokio::select! {
            _ = tick.tick(), if sending => {
                let mut p = [0u8; PROBE_LEN];
                p[..8].copy_from_slice(&(sent_at.len() as u64).to_be_bytes());
                sent_at.push(Instant::now());
                client.send_to(&p, to).await?;
                last_send = Instant::now();
            }
            r = tokio::time::timeout(Duration::from_millis(50), client.recv_from(&mut buf)) => {
                if let Ok(Ok((len, _))) = r {
                    let seq = buf.get(..8).filter(|_| len >= 8).and_then(|b| b.try_into().ok());
                    if let Some(&at) = seq.map(u64::from_be_bytes).and_then(|s| sent_at.get(s as usize)) {
                        rtts.push(at.elapsed());
                    }
                }
            }
        }
    }
    Ok(rtts)
}

/// What the relay bench's server saw of the transfer.
#[derive(Debug, Default)]
struct Sink {
    bytes: u64,
    first: Option<Instant>,
    last: Option<Instant>,
}

/// Echoes probes (up to [`PROBE_LEN`] bytes) and records transfer datagrams without answering.
async fn sink_and_echo(socket: Arc<UdpSocket>, sink: Arc<Mutex<Sink>>) {
    let mut buf = vec![0u8; 65_535];
    while let Ok((n, from)) = socket.recv_from(&mut buf).await {
        if n <= PROBE_LEN {
            let _ = socket.send_to(&buf[..n], from).await;
            continue;
        }
        let now = Instant::now();
        let mut s = sink.lock().unwrap_or_else(PoisonError::into_inner);
        s.bytes += n as u64;
        s.first.get_or_insert(now);
        s.last = Some(now);
    }
}

/// Sends `bytes` in datagrams through the relay as fast as it takes them, then waits for the
/// stragglers; goodput is over the arrivals at the server.
async fn udp_transfer(
    client: &UdpSocket,
    relay: &RelayHandle,
    to: SocketAddr,
    bytes: u64,
    sink: &Mutex<Sink>,
) -> anyhow::Result<Transfer> {
    let datagram = [0x5au8; DATAGRAM_LEN];
    let count = bytes.div_ceil(DATAGRAM_LEN as u64);
    let taken_before = relay.stats().up.sent_packets;
    for i in 0..count {
        while i >= relay.stats().up.sent_packets - taken_before + IN_FLIGHT {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        client.send_to(&datagram, to).await?;
    }
    // Done once nothing has arrived for LINGER.
    loop {
        let last = sink.lock().unwrap_or_else(PoisonError::into_inner).last;
        match last {
            Some(t) if t.elapsed() > LINGER => break,
            None if relay.stats().up.sent_packets - taken_before >= count => {
                tokio::time::sleep(LINGER).await;
                if sink
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .last
                    .is_none()
                {
                    bail!("no datagram of the transfer arrived");
                }
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let s = sink.lock().unwrap_or_else(PoisonError::into_inner);
    let (Some(first), Some(last)) = (s.first, s.last) else {
        bail!("no datagram of the transfer arrived");
    };
    let seconds = (last - first).as_secs_f64();
    Ok(Transfer {
        protocol: "udp",
        sent_bytes: count * DATAGRAM_LEN as u64,
        received_bytes: s.bytes,
        seconds,
        goodput_mbit: if seconds > 0.0 {
            s.bytes as f64 * 8.0 / seconds / 1e6
        } else {
            0.0
        },
        rate_mbit: None,
    })
}

/// Writes `bytes` over TCP from namespace `a` to a listener in `b`, checking they arrive intact.
fn tcp_transfer(a: &str, b: &str, bytes: usize) -> anyhow::Result<Transfer> {
    let listener = netns::run_in(b, || TcpListener::bind((ADDR_B, 0)))??;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(
        move || -> std::io::Result<(u64, u64, Option<Instant>, Instant)> {
            let (mut s, _) = listener.accept()?;
            let mut buf = vec![0u8; 64 << 10];
            let (mut total, mut sum, mut first) = (0u64, 0u64, None);
            loop {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Ok((total, sum, first, Instant::now()));
                }
                first.get_or_insert_with(Instant::now);
                sum = checksum(sum, &buf[..n]);
                total += n as u64;
            }
        },
    );
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut s = netns::run_in(a, || TcpStream::connect(addr))??;
    s.write_all(&data)?;
    drop(s);
    let (total, sum, first, last) = reader
        .join()
        .map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    if total != bytes as u64 || sum != checksum(0, &data) {
        bail!("{total} of {bytes} bytes arrived, or they arrived damaged");
    }
    let seconds = first.map_or(0.0, |f| (last - f).as_secs_f64());
    Ok(Transfer {
        protocol: "tcp",
        sent_bytes: bytes as u64,
        received_bytes: total,
        seconds,
        goodput_mbit: if seconds > 0.0 {
            total as f64 * 8.0 / seconds / 1e6
        } else {
            0.0
        },
        rate_mbit: None,
    })
}

fn checksum(start: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(start, |c, &b| c.wrapping_mul(31).wrapping_add(u64::from(b)))
}
