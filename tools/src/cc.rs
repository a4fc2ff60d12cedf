//! The measurement behind `d7q::transport::DEFAULT_CONGESTION`: goodput of one QUIC stream
//! through netsim's UDP relay on a long, lossy path, for each congestion controller the mesh
//! can run.
//!
//! Per transfer: a fresh pair of in-process endpoints with cluster certificates and the mesh's
//! own transport configuration ([`Tuning`] defaults, only the controller varied), and a fresh
//! relay with the same link both ways — `delay = RTT/2`, the rate, independent random loss —
//! seeded by the round, so every controller of a round meets the same loss draws. The client
//! asks for `size` bytes on one bidirectional stream; goodput is bytes received over the time
//! from that request to the last byte (the handshake is left out: it is the same for every
//! controller). Every byte received is checked against the pattern the server sent.
//!
//! Controllers alternate within each loss cell and cells within each round, so drift in the
//! machine's load hits them alike. A transfer still running after `--max-secs` is stopped and
//! counts at the bytes it moved by then (flagged in the table): loss-based controllers at 10 %
//! loss run at a few hundred kbit/s, and a cap keeps the benchmark within minutes.
//!
//! Writes `target/bench/cc.json` and, next to it, `cc.md` (the Markdown table it prints).
//!
//! Not measured here: d7q processes, pieces, several peers (rows a–d), or TCP.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use d7q::pki::ClusterCa;
use d7q::transport::{self, Congestion, Tuning};
use d7q_netsim::link::LinkConfig;
use d7q_netsim::relay::{Relay, RelayConfig};
use serde::Serialize;

use crate::util::{self, Spread};

/// Bytes the server writes per call, and the period of the content pattern.
const CHUNK: usize = 1 << 20;
/// Client read buffer.
const READ_BUF: usize = 64 << 10;
/// Fewest rounds that give a median with a spread around it.
const MIN_REPS: usize = 3;
/// Longest a handshake through the relay may take before the transfer fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest transfer accepted on the command line: the whole run is in memory-light streams,
/// but a typo of a few zeros should not run for days.
const MAX_SIZE_MIB: u64 = 4096;

/// `d7q-bench cc`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Congestion controllers to compare; the first is the one the ratios are of.
    #[arg(long, value_delimiter = ',', default_value = "bbr,cubic,newreno")]
    cc: Vec<String>,
    /// Round-trip time in milliseconds (half of it each way).
    #[arg(long, default_value_t = 100)]
    rtt_ms: u64,
    /// Loss rates in percent, independent, on each direction.
    #[arg(long, value_delimiter = ',', default_value = "1,5,10")]
    loss_pct: Vec<f64>,
    /// Bottleneck rate in Mbit/s, each direction.
    #[arg(long, default_value_t = 100)]
    rate_mbit: u64,
    /// Bytes per transfer, MiB.
    #[arg(long, default_value_t = 4)]
    size_mib: u64,
    /// Rounds; each runs every controller in every loss cell once.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// A transfer still running after this many seconds is stopped and counts at the bytes it
    /// moved by then.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Seed of the link model (plus the round number).
    #[arg(long, default_value_t = 100)]
    seed: u64,
    /// Where to write the JSON result; the Markdown table goes next to it (`.md`).
    #[arg(long, default_value = "target/bench/cc.json")]
    json: PathBuf,
}

/// Runs the `cc` benchmark.
pub fn run(args: &Args) -> Result<()> {
    let ccs = args
        .cc
        .iter()
        .map(|s| s.parse::<Congestion>())
        .collect::<Result<Vec<_>, _>>()?;
    ensure!(!ccs.is_empty(), "--cc names no controller");
    ensure!(
        args.reps >= MIN_REPS,
        "--reps must be at least {MIN_REPS} (a median and a spread)"
    );
    ensure!(
        (1..=MAX_SIZE_MIB).contains(&args.size_mib),
        "--size-mib must be between 1 and {MAX_SIZE_MIB}"
    );
    ensure!(args.rtt_ms > 0, "--rtt-ms must be above 0");
    ensure!(args.rate_mbit > 0, "--rate-mbit must be above 0");
    ensure!(args.max_secs > 0, "--max-secs must be above 0");
    for &p in &args.loss_pct {
        ensure!(
            (0.0..100.0).contains(&p),
            "--loss-pct {p} is not in [0, 100)"
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(bench(args, &ccs))?;
    drop(rt);

    let table = markdown(&report);
    print!("\n{table}");
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    let md = args.json.with_extension("md");
    std::fs::write(&md, &table).with_context(|| format!("writing {}", md.display()))?;
    println!("JSON: {}  table: {}", args.json.display(), md.display());
    Ok(())
}

/// One transfer.
#[derive(Debug, Clone, Serialize)]
struct Sample {
    round: usize,
    loss: f64,
    cc: String,
    bytes: u64,
    secs: f64,
    mb_per_s: f64,
    /// Stopped at `--max-secs` before the last byte.
    capped: bool,
    /// Packets the relay's loss dropped, both directions.
    lost_packets: u64,
}

/// One controller in one loss cell.
#[derive(Debug, Clone, Serialize)]
struct CcResult {
    cc: String,
    /// Goodput, MB/s (10^6 bytes).
    mb_per_s: Spread,
    /// Transfers stopped at the cap.
    capped: usize,
}

/// One loss rate.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    loss: f64,
    /// `rate·(1−p)`, MB/s: what a perfect sender could deliver.
    bound_mb_per_s: f64,
    results: Vec<CcResult>,
    /// Median goodput of the first controller over each other's, in `--cc` order.
    ratios: Vec<(String, f64)>,
}

/// The JSON result.
#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    bytes: u64,
    rtt_ms: u64,
    rate_mbit: u64,
    rounds: usize,
    max_secs: u64,
    order: &'static str,
    cells: Vec<Cell>,
    cpus: usize,
    /// One-minute load average before and after (other work on the machine).
    load_average: [Option<f64>; 2],
    unix_time: u64,
    samples: Vec<Sample>,
}

async fn bench(args: &Args, ccs: &[Congestion]) -> Result<Report> {
    let bytes = args.size_mib << 20;
    let ca = ClusterCa::generate()?;
    let ids = (ca.issue("server")?, ca.issue("client")?);
    let pattern: Vec<u8> = (0..CHUNK).map(pattern_byte).collect();
    let losses: Vec<f64> = args.loss_pct.iter().map(|p| p / 100.0).collect();
    let load_before = util::load_average();
    let mut samples = Vec::new();
    for round in 1..=args.reps {
        for &loss in &losses {
            for &cc in ccs {
                let tuning = Tuning {
                    congestion: cc,
                    ..Tuning::default()
                };
                let t = Transfer {
                    ids: &ids,
                    tuning: &tuning,
                    link: link(args, loss),
                    seed: args.seed + round as u64,
                    bytes,
                    pattern: &pattern,
                    cap: Duration::from_secs(args.max_secs),
                };
                let s = t
                    .run()
                    .await
                    .with_context(|| format!("{cc} at {} % loss, round {round}", loss * 100.0))?;
                eprintln!(
                    "round {round}/{} loss {:>4.1} % {:>7}: {:7.3} MB/s  {:6.2} s{}",
                    args.reps,
                    loss * 100.0,
                    cc.to_string(),
                    s.mb_per_s,
                    s.secs,
                    if s.capped { "  (capped)" } else { "" }
                );
                samples.push(Sample {
                    round,
                    loss,
                    cc: cc.to_string(),
                    ..s
                });
            }
        }
    }
    let cells = losses
        .iter()
        .map(|&loss| cell(args, ccs, loss, &samples))
        .collect();
    Ok(Report {
        benchmark: "cc",
        bytes,
        rtt_ms: args.rtt_ms,
        rate_mbit: args.rate_mbit,
        rounds: args.reps,
        max_secs: args.max_secs,
        order: "every controller in every loss cell in every round",
        cells,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average: [load_before, util::load_average()],
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        samples,
    })
}

/// One direction of the path.
fn link(args: &Args, loss: f64) -> LinkConfig {
    LinkConfig {
        delay: Duration::from_millis(args.rtt_ms) / 2,
        loss,
        rate_bps: Some(args.rate_mbit * 1_000_000),
        ..LinkConfig::default()
    }
}

/// The byte at offset `i` of every chunk the server sends.
fn pattern_byte(i: usize) -> u8 {
    (i * 7 % 251) as u8
}

/// Everything one transfer needs.
struct Transfer<'a> {
    ids: &'a (d7q::pki::NodeIdentity, d7q::pki::NodeIdentity),
    tuning: &'a Tuning,
    link: LinkConfig,
    seed: u64,
    bytes: u64,
    pattern: &'a [u8],
    cap: Duration,
}

impl Transfer<'_> {
    /// Runs it; the sample without its round, loss and controller. (quinn's types are only
    /// inferred here: the crate reaches quinn through d7q's transport alone.)
    async fn run(&self) -> Result<Sample> {
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let server = transport::endpoint_with(&self.ids.0, any, true, self.tuning)?;
        let client = transport::endpoint_with(&self.ids.1, any, false, self.tuning)?;
        let mut cfg = RelayConfig::new(any, server.local_addr()?);
        cfg.up = self.link.clone();
        cfg.down = self.link.clone();
        cfg.seed = self.seed;
        let relay = Relay::bind(cfg).await?;
        // The server: one connection, one stream, `bytes` of the pattern after a 1-byte request.
        let serving = tokio::spawn({
            let (ep, bytes, pattern) = (server.clone(), self.bytes, self.pattern.to_vec());
            async move {
                let conn = ep.accept().await.context("endpoint closed")?.await?;
                let (mut send, mut recv) = conn.accept_bi().await?;
                let mut go = [0u8; 1];
                recv.read_exact(&mut go).await?;
                let mut left = bytes;
                while left > 0 {
                    let n = left.min(CHUNK as u64) as usize;
                    send.write_all(&pattern[..n]).await?;
                    left -= n as u64;
                }
                send.finish()?;
                // Keeps the connection until the client has it all (or closes it at the cap).
                let _ = send.stopped().await;
                anyhow::Ok(())
            }
        });
        let conn = tokio::time::timeout(
            CONNECT_TIMEOUT,
            transport::connect(&client, relay.local_addr()),
        )
        .await
        .context("handshake through the relay timed out")??;
        // Asks for the bytes and reads them until the end or the cap, checking each against
        // the pattern: bytes received, seconds, and whether the cap stopped it.
        let received = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            let started = Instant::now();
            let deadline = tokio::time::Instant::from_std(started + self.cap);
            send.write_all(&[1]).await?;
            let mut got: u64 = 0;
            let mut buf = vec![0u8; READ_BUF];
            loop {
                let n = match tokio::time::timeout_at(deadline, recv.read(&mut buf)).await {
                    Err(_) => return Ok((got, self.cap.as_secs_f64(), true)),
                    Ok(read) => match read? {
                        Some(n) => n,
                        None => break,
                    },
                };
                for (k, &b) in buf[..n].iter().enumerate() {
                    let at = got + k as u64;
                    if b != self.pattern[(at % CHUNK as u64) as usize] {
                        bail!("byte {at} is {b:#04x}, the server sent something else");
                    }
                }
                got += n as u64;
                ensure!(
                    got <= self.bytes,
                    "received {got} bytes, more than the {} asked for",
                    self.bytes
                );
            }
            let secs = started.elapsed().as_secs_f64();
            ensure!(
                got == self.bytes,
                "the stream ended after {got} of {} bytes",
                self.bytes
            );
            anyhow::Ok((got, secs, false))
        }
        .await;
        conn.close(transport::close::DONE, b"done");
        client.close(transport::close::DONE, b"");
        server.close(transport::close::DONE, b"");
        // A server error matters only if the client did not already say what went wrong.
        let served = serving.await;
        let (bytes, secs, capped) = received?;
        if !capped {
            served.context("server task")??;
        }
        let s = relay.handle().stats();
        Ok(Sample {
            round: 0,
            loss: 0.0,
            cc: String::new(),
            bytes,
            secs,
            mb_per_s: bytes as f64 / secs / 1e6,
            capped,
            lost_packets: s.up.dropped.random_loss + s.down.dropped.random_loss,
        })
    }
}

fn cell(args: &Args, ccs: &[Congestion], loss: f64, samples: &[Sample]) -> Cell {
    let results: Vec<CcResult> = ccs
        .iter()
        .map(|cc| {
            let name = cc.to_string();
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.loss == loss && s.cc == name)
                .collect();
            let rates: Vec<f64> = mine.iter().map(|s| s.mb_per_s).collect();
            CcResult {
                mb_per_s: Spread::of(&rates).expect("at least one round"),
                capped: mine.iter().filter(|s| s.capped).count(),
                cc: name,
            }
        })
        .collect();
    let first = results[0].mb_per_s.median;
    let ratios = results[1..]
        .iter()
        .map(|r| (r.cc.clone(), first / r.mb_per_s.median))
        .collect();
    Cell {
        loss,
        bound_mb_per_s: args.rate_mbit as f64 * 1e6 / 8.0 * (1.0 - loss) / 1e6,
        results,
        ratios,
    }
}

/// The table, in Markdown: median goodput with the min–max range per controller and loss.
fn markdown(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "cc: {} MiB per transfer over one QUIC stream, {} ms RTT, {} Mbit/s each way, random \
         loss each way; {} rounds, controllers interleaved; MB/s = 10^6 bytes/s, median \
         (min–max)",
        r.bytes >> 20,
        r.rtt_ms,
        r.rate_mbit,
        r.rounds
    );
    let _ = writeln!(s);
    let Some(first) = r.cells.first() else {
        return s;
    };
    let mut head = "| loss | bound rate·(1−p) |".to_string();
    let mut rule = "|---:|---:|".to_string();
    for c in &first.results {
        let _ = write!(head, " {} |", c.cc);
        rule.push_str("---:|");
    }
    for (other, _) in &first.ratios {
        let _ = write!(head, " {} / {other} |", first.results[0].cc);
        rule.push_str("---:|");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    let mut any_capped = false;
    for c in &r.cells {
        let _ = write!(s, "| {} % | {:.2} |", c.loss * 100.0, c.bound_mb_per_s);
        for res in &c.results {
            let m = res.mb_per_s;
            let flag = if res.capped > 0 { "*" } else { "" };
            any_capped |= res.capped > 0;
            let _ = write!(
                s,
                " {}{flag} ({}–{}) |",
                fmt_rate(m.median),
                fmt_rate(m.min),
                fmt_rate(m.max)
            );
        }
        for (_, ratio) in &c.ratios {
            let digits = if *ratio < 10.0 { 1 } else { 0 };
            let _ = write!(s, " {ratio:.digits$}× |");
        }
        let _ = writeln!(s);
    }
    if any_capped {
        let _ = writeln!(
            s,
            "\n\\* some transfers were stopped at {} s and count at the bytes they moved by then",
            r.max_secs
        );
    }
    if let [Some(before), Some(after)] = r.load_average {
        let _ = writeln!(
            s,
            "\nload average {before:.2} before, {after:.2} after, on {} CPUs",
            r.cpus
        );
    }
    s
}

/// Two decimals, three below 0.1 MB/s so a collapsed controller is not shown as 0.00.
fn fmt_rate(mb: f64) -> String {
    if mb < 0.1 {
        format!("{mb:.3}")
    } else {
        format!("{mb:.2}")
    }
}
