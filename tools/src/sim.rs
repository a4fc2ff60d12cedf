//! `d7q-bench sim` (BENCH.md row h): a deterministic discrete-event simulator of a swarm that
//! runs the real deciding code of d7q — one [`d7q::sched::download::Download`] per peer and
//! blob, the supernode's [`d7q::sched::parents::Swarm`] and [`d7q::sched::seed::SeedGate`] per
//! blob — over a modelled network, with no sockets, threads or tokio.
//!
//! - [`world`]: the events, the message flow between the machines (as `engine.rs`,
//!   `supernode.rs` and `upload.rs` drive them), the scenarios (late joins, departures,
//!   deaths, slow and lying parents);
//! - [`net`]: the bandwidth model — each piece a flow over its sender's upload, its receiver's
//!   download and the WAN link between datacenters, each shared equally;
//! - [`report`]: the result, the Kumar–Ross bound, the summary and the SVG chart;
//! - [`rng`]: the seeded generator behind every random choice.
//!
//! Same `--seed`, same result: the JSON written with `--no-perf` is the same bytes every run
//! (wall time, decisions per second and memory are the only parts that are not).
//!
//! Calibration against the real namespace benchmark (`d7q-bench swarm`): `--calibrate` runs
//! N = 4, 8, 16 (or `--peers`) with the topology that benchmark builds — one seed fed by an
//! origin over its link, N peers, every rate as `tbf` enforces it (Ethernet frames: goodput
//! 0.95), all clients started at once — and, given `--compare` with that benchmark's JSON,
//! prints both slowest-peer times side by side.

mod net;
mod report;
mod rng;
mod world;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use report::{Bound, Perf, SimResult};
use world::{Knobs, Scenario, SimConfig};

/// Mbit/s (10^6 bit/s) to bytes per second.
fn mbit(v: f64) -> f64 {
    v * 1e6 / 8.0
}

/// Layer shares of `--image`: four blobs, as a base image and three smaller layers.
const IMAGE_LAYERS: [f64; 4] = [0.4, 0.3, 0.2, 0.1];

/// `d7q-bench sim`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Peer counts, comma-separated; each is one run.
    #[arg(long, value_delimiter = ',', default_value = "100")]
    peers: Vec<usize>,
    /// Content size: bytes, or with KiB/MiB/GiB (K/M/G) or KB/MB/GB.
    #[arg(long, default_value = "1GiB")]
    size: String,
    /// A 4-layer image (40/30/20/10 % of --size) fetched concurrently, instead of one blob.
    #[arg(long)]
    image: bool,
    /// Piece size in MiB instead of the mesh's own choice (1 MiB up to 1 GiB, then doubling
    /// to stay under 1,024 pieces).
    #[arg(long)]
    piece_mib: Option<u32>,
    /// Datacenters; peers are dealt round-robin, the seed sits in the first.
    #[arg(long, default_value_t = 1)]
    dcs: usize,
    /// Who joins late, leaves, dies or misbehaves.
    #[arg(long, value_enum, default_value = "steady")]
    scenario: Scenario,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The seed's (supernode's) upload, Mbit/s.
    #[arg(long, default_value_t = 100.0)]
    seed_up_mbit: f64,
    /// The seed's download (its origin ingest), Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    seed_down_mbit: f64,
    /// The origin's upload toward the seed, Mbit/s; 0: the seed holds the content at t = 0.
    #[arg(long, default_value_t = 0.0)]
    origin_mbit: f64,
    /// Each peer's upload, Mbit/s.
    #[arg(long, default_value_t = 50.0)]
    peer_up_mbit: f64,
    /// Each peer's download, Mbit/s.
    #[arg(long, default_value_t = 500.0)]
    peer_down_mbit: f64,
    /// Round trip inside a datacenter, ms.
    #[arg(long, default_value_t = 2.0)]
    rtt_ms: f64,
    /// Round trip between datacenters, ms.
    #[arg(long, default_value_t = 40.0)]
    wan_rtt_ms: f64,
    /// Each directed link between two datacenters, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    wan_mbit: f64,
    /// Random loss (0..1), as a rate penalty on every flow.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Payload share of each link's rate (0.95 for QUIC in Ethernet frames, as tbf counts).
    #[arg(long, default_value_t = 1.0)]
    goodput: f64,
    /// How often the supernode reconsiders each peer's parents, ms (the real one: 500).
    #[arg(long)]
    parents_interval_ms: Option<u64>,
    /// The download machine's requests in flight to the seed (default: an uploader's, 1).
    #[arg(long)]
    seed_in_flight: Option<usize>,
    /// The download machine's requests in flight to one parent (default 16).
    #[arg(long)]
    peer_in_flight: Option<usize>,
    /// The download machine's requests in flight in all, shared by its sources (default 8)
    #[arg(long)]
    in_flight: Option<usize>,
    /// The download machine's parents at most (default 64).
    #[arg(long)]
    max_parents: Option<usize>,
    /// The download machine's deadline per piece, seconds (default 30).
    #[arg(long)]
    piece_timeout_s: Option<f64>,
    /// The supernode scheduler's parents per list (default 6).
    #[arg(long)]
    swarm_parents: Option<usize>,
    /// The supernode scheduler's children per parent (default 8).
    #[arg(long)]
    swarm_children: Option<usize>,
    /// The download machine's first and longest pause before asking a saturated source
    /// again, ms: FIRST,MAX (default 20,2560).
    #[arg(long, value_parser = parse_pause)]
    saturated_pause_ms: Option<(Duration, Duration)>,
    /// The seed's upload slots: copies on their way at once (default: the product's, 4).
    #[arg(long)]
    seed_slots: Option<u32>,
    /// A daemon's piece uploads at once (default: the product's, 8).
    #[arg(long)]
    upload_slots: Option<usize>,
    /// Stop after this many virtual seconds; default: 20 × the bound + 600.
    #[arg(long)]
    time_limit_s: Option<f64>,
    /// The topology of `d7q-bench swarm` (goodput 0.95, origin ingest at --origin-mbit or the
    /// seed's rate, N = 4, 8, 16 unless --peers says otherwise).
    #[arg(long)]
    calibrate: bool,
    /// With --calibrate: the JSON of a `d7q-bench swarm` run to compare with.
    #[arg(long)]
    compare: Option<PathBuf>,
    /// Where to write the JSON (one object per run, in an array when several).
    #[arg(long)]
    json: PathBuf,
    /// Where to write the completion-curve chart (SVG; with several runs, the last).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Leave the cost (wall time, decisions per second, memory) out of the JSON, so that the
    /// same seed writes the same bytes.
    #[arg(long)]
    no_perf: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    quiet: bool,
}

/// One run as written to the JSON.
#[derive(Serialize)]
struct RunOut<'a> {
    result: &'a SimResult,
    #[serde(skip_serializing_if = "Option::is_none")]
    perf: Option<&'a Perf>,
}

/// Runs `d7q-bench sim`.
pub fn run(args: &Args) -> Result<()> {
    let size = parse_size(&args.size)?;
    ensure!(size > 0, "--size must be at least one byte");
    ensure!(args.dcs >= 1 && args.dcs <= 64, "--dcs must be in 1..=64");
    ensure!((0.0..1.0).contains(&args.loss), "--loss must be in [0, 1)");
    ensure!(
        args.goodput > 0.0 && args.goodput <= 1.0,
        "--goodput must be in (0, 1]"
    );
    let mut peers = args.peers.clone();
    if args.calibrate && peers == [100] {
        peers = vec![4, 8, 16];
    }
    ensure!(
        !peers.is_empty() && peers.iter().all(|&n| n > 0),
        "--peers needs counts of at least 1"
    );
    let mut results = Vec::new();
    for &n in &peers {
        let cfg = config(args, n, size);
        eprintln!(
            "sim: {n} peers, bound {:.1} s, limit {:.0} s",
            cfg.schedule_ref.as_secs_f64(),
            cfg.time_limit.as_secs_f64()
        );
        reset_peak_rss();
        let started = Instant::now();
        let cpu0 = cpu_seconds();
        let r = report::result(&cfg, world::simulate(&cfg, !args.quiet));
        let wall = started.elapsed().as_secs_f64();
        let perf = Perf::new(&r, wall, cpu_seconds() - cpu0, peak_rss_mib());
        println!("{}", report::summary(&r, Some(&perf)));
        results.push((r, perf));
    }
    if results.len() > 1 {
        print_table(&results);
    }
    if args.calibrate {
        calibration(&results, args.compare.as_deref())?;
    }
    let outs: Vec<RunOut<'_>> = results
        .iter()
        .map(|(r, p)| RunOut {
            result: r,
            perf: (!args.no_perf).then_some(p),
        })
        .collect();
    let json = if outs.len() == 1 {
        serde_json::to_string_pretty(&outs[0])?
    } else {
        serde_json::to_string_pretty(&outs)?
    };
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&args.json, json + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("JSON: {}", args.json.display());
    if let (Some(path), Some((r, _))) = (&args.svg, results.last()) {
        std::fs::write(path, report::svg(r))
            .with_context(|| format!("writing {}", path.display()))?;
        println!("SVG: {}", path.display());
    }
    Ok(())
}

/// Simulates one configuration (no progress lines).
#[cfg(test)]
fn simulate(cfg: &SimConfig) -> SimResult {
    report::result(cfg, world::simulate(cfg, false))
}

/// The configuration of one run with `n` peers.
fn config(args: &Args, n: usize, size: u64) -> SimConfig {
    let blobs = if args.image {
        let mut v: Vec<u64> = IMAGE_LAYERS
            .iter()
            .map(|s| ((size as f64 * s) as u64).max(1))
            .collect();
        // The layers add up to --size exactly.
        let rest = size.saturating_sub(v[1..].iter().sum());
        v[0] = rest.max(1);
        v
    } else {
        vec![size]
    };
    let seed_up = mbit(args.seed_up_mbit);
    let origin_up = if args.calibrate && args.origin_mbit == 0.0 {
        seed_up
    } else {
        mbit(args.origin_mbit)
    };
    let mut cfg = SimConfig {
        peers: n,
        blobs,
        piece_size: args.piece_mib.map(|m| m << 20),
        dcs: args.dcs,
        scenario: args.scenario,
        seed: args.seed,
        seed_up,
        seed_down: mbit(args.seed_down_mbit),
        origin_up,
        peer_up: mbit(args.peer_up_mbit),
        peer_down: mbit(args.peer_down_mbit),
        rtt: Duration::from_secs_f64(args.rtt_ms / 1e3),
        wan_rtt: Duration::from_secs_f64(args.wan_rtt_ms / 1e3),
        wan_rate: mbit(args.wan_mbit),
        loss: args.loss,
        goodput: if args.calibrate && args.goodput == 1.0 {
            0.95
        } else {
            args.goodput
        },
        parents_interval: args
            .parents_interval_ms
            .map_or(d7q::supernode::PARENTS_INTERVAL, Duration::from_millis),
        idle_timeout: d7q::transport::IDLE_TIMEOUT,
        time_limit: Duration::ZERO,
        schedule_ref: Duration::ZERO,
        knobs: Knobs {
            seed_in_flight: args.seed_in_flight,
            peer_in_flight: args.peer_in_flight,
            in_flight: args.in_flight,
            max_parents: args.max_parents,
            piece_timeout: args.piece_timeout_s.map(Duration::from_secs_f64),
            saturated_pause: args.saturated_pause_ms,
            swarm_parents: args.swarm_parents,
            swarm_children: args.swarm_children,
            seed_slots: args.seed_slots,
            upload_slots: args.upload_slots,
        },
    };
    let t_min = Bound::planned(&cfg).t_min_s;
    cfg.schedule_ref = Duration::from_secs_f64(t_min);
    cfg.time_limit = Duration::from_secs_f64(args.time_limit_s.unwrap_or(20.0 * t_min + 600.0));
    cfg
}

fn print_table(results: &[(SimResult, Perf)]) {
    println!();
    println!(
        "{:>7} {:>6} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>9} {:>12} {:>9} {:>9}",
        "peers",
        "done",
        "p50 s",
        "max s",
        "T_min s",
        "bound/T",
        "seed/F",
        "wall s",
        "cpu s",
        "decisions/s",
        "µs/dec",
        "RSS MiB"
    );
    for (r, p) in results {
        let c = r.completion_s.as_ref();
        println!(
            "{:>7} {:>6} {:>9.1} {:>9.1} {:>9.1} {:>8.3} {:>8.2} {:>9.1} {:>9.1} {:>12.0} {:>9.2} {:>9.0}",
            r.config.peers,
            r.peers.done,
            c.map_or(f64::NAN, |d| d.p50),
            c.map_or(f64::NAN, |d| d.max),
            r.bound.t_min_s,
            r.bound_over_slowest.unwrap_or(f64::NAN),
            r.seed_egress_over_f,
            p.wall_s,
            p.cpu_s,
            p.decisions_per_cpu_s,
            p.cpu_us_per_decision,
            p.peak_rss_mib
        );
    }
}

/// Prints the simulator's slowest peer next to the namespace benchmark's, per N.
fn calibration(results: &[(SimResult, Perf)], compare: Option<&std::path::Path>) -> Result<()> {
    let bench: Vec<(usize, f64)> = match compare {
        None => Vec::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let v: serde_json::Value = serde_json::from_str(&text)?;
            let Some(rows) = v["results"].as_array() else {
                bail!(
                    "{}: no \"results\" array (not a d7q-bench swarm JSON?)",
                    path.display()
                );
            };
            rows.iter()
                .filter_map(|r| {
                    Some((
                        r["peers"].as_u64()? as usize,
                        r["mesh_slowest_s"]["median"].as_f64()?,
                    ))
                })
                .collect()
        }
    };
    println!();
    println!("calibration against d7q-bench swarm (slowest peer, s):");
    println!(
        "{:>6} {:>9} {:>9} {:>9} {:>9}",
        "peers", "T_min", "sim", "bench", "sim/bench"
    );
    for (r, _) in results {
        let sim = r.completion_s.as_ref().map_or(f64::NAN, |d| d.max);
        let b = bench
            .iter()
            .find(|(n, _)| *n == r.config.peers)
            .map(|b| b.1);
        println!(
            "{:>6} {:>9.2} {:>9.2} {:>9} {:>9}",
            r.config.peers,
            r.bound.t_min_s,
            sim,
            b.map_or("-".into(), |b| format!("{b:.2}")),
            b.map_or("-".into(), |b| format!("{:.3}", sim / b))
        );
    }
    Ok(())
}

/// Parses `1GiB`, `128MiB`, `64M`, `1.5GB`, `4096`.
fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num
        .parse()
        .with_context(|| format!("size {s:?}: not a number"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => bail!("size {s:?}: unknown unit {other:?}"),
    };
    Ok((v * mult).round() as u64)
}

/// Resets the kernel's peak-RSS mark of this process, so each run reports its own.
fn reset_peak_rss() {
    // "5" clears VmHWM (Linux 4.0+); failing leaves the process-wide peak, which is still an
    // upper bound.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// User + system CPU seconds of this process so far (0 when unreadable): on a shared machine
/// the cost per decision is told by CPU time, not wall time.
fn cpu_seconds() -> f64 {
    // Fields 14 and 15 of /proc/self/stat, after the parenthesised command name; in clock
    // ticks, 100 per second on Linux.
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// VmHWM of this process in MiB (0 when unreadable).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// `FIRST,MAX` in milliseconds.
fn parse_pause(s: &str) -> Result<(Duration, Duration), String> {
    let (a, b) = s
        .split_once(',')
        .ok_or_else(|| format!("expected FIRST,MAX in ms, got {s:?}"))?;
    let ms = |v: &str| {
        v.trim()
            .parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|e| format!("{v:?}: {e}"))
    };
    Ok((ms(a)?, ms(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(peers: usize, scenario: Scenario, seed: u64) -> SimConfig {
        let mut cfg = SimConfig {
            peers,
            blobs: vec![64 << 20],
            piece_size: None,
            dcs: 1,
            scenario,
            seed,
            seed_up: mbit(100.0),
            seed_down: mbit(1000.0),
            origin_up: 0.0,
            peer_up: mbit(50.0),
            peer_down: mbit(500.0),
            rtt: Duration::from_millis(2),
            wan_rtt: Duration::from_millis(40),
            wan_rate: mbit(1000.0),
            loss: 0.0,
            goodput: 1.0,
            parents_interval: d7q::supernode::PARENTS_INTERVAL,
            idle_timeout: d7q::transport::IDLE_TIMEOUT,
            time_limit: Duration::from_secs(3600),
            schedule_ref: Duration::ZERO,
            knobs: Knobs::default(),
        };
        cfg.schedule_ref = Duration::from_secs_f64(Bound::planned(&cfg).t_min_s);
        cfg
    }

    #[test]
    fn the_same_seed_gives_the_same_result() {
        for scenario in [Scenario::Churn, Scenario::Liar] {
            let cfg = small(24, scenario, 7);
            let a = simulate(&cfg);
            let b = simulate(&cfg);
            assert_eq!(a, b, "{scenario:?}");
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                serde_json::to_string(&b).unwrap()
            );
            assert!(a.peers.done > 0, "{scenario:?}: {:?}", a.peers);
        }
        // Another seed is another run.
        let c = simulate(&small(24, Scenario::Churn, 8));
        assert_ne!(simulate(&small(24, Scenario::Churn, 7)), c);
    }

    #[test]
    fn one_peer_fetches_everything_from_the_seed_at_the_slower_rate() {
        // No latency: the time is F / min(seed up, peer down) exactly, up to the last flow's
        // rounding to a nanosecond.
        let mut cfg = small(1, Scenario::Steady, 1);
        cfg.rtt = Duration::ZERO;
        let r = simulate(&cfg);
        let f = (64u64 << 20) as f64;
        let expect = f / mbit(100.0);
        let got = r.completion_s.as_ref().expect("the peer finished").max;
        assert!((got - expect).abs() < 1e-3, "{got} vs {expect}");
        assert_eq!(r.bound.t_min_s, expect);
        assert_eq!(r.counters.seed_sent_bytes, 64 << 20);
        assert_eq!(r.counters.from_seed_bytes, 64 << 20);
        // 64 pieces of 1 MiB, each let through once.
        assert_eq!(r.counters.gate_first, 64);
        assert_eq!(r.counters.duplicate_bytes + r.counters.late_bytes, 0);
        // With a download slower than the seed, the download decides.
        cfg.peer_down = mbit(40.0);
        let r = simulate(&cfg);
        let expect = f / mbit(40.0);
        let got = r.completion_s.as_ref().unwrap().max;
        assert!((got - expect).abs() < 1e-3, "{got} vs {expect}");
    }

    /// Everyone who stays finishes when others leave or die mid-transfer, also with the seed
    /// serving several blobs (copies that end twice, a requester gone, must free the seed's
    /// shared slots exactly once: a leak stalled every download at 100 peers).
    #[test]
    fn under_churn_everyone_who_stays_finishes() {
        for (peers, seed, blobs) in [
            (100, 1, vec![256 << 20]),
            (60, 5, vec![192 << 20, 64 << 20]),
        ] {
            let mut cfg = small(peers, Scenario::Churn, seed);
            cfg.blobs = blobs;
            cfg.schedule_ref = Duration::from_secs_f64(Bound::planned(&cfg).t_min_s);
            let r = simulate(&cfg);
            assert_eq!(r.peers.unfinished, 0, "{peers} peers: {:?}", r.peers);
            assert_eq!(r.peers.failed, 0, "{peers} peers: {:?}", r.peers);
            assert!(
                r.peers.done > peers * 8 / 10,
                "{peers} peers: {:?}",
                r.peers
            );
        }
    }

    #[test]
    fn a_liar_is_isolated_and_everyone_still_finishes() {
        let r = simulate(&small(30, Scenario::Liar, 3));
        assert_eq!(r.peers.done, 30, "{:?}", r.peers);
        assert_eq!((r.liars, r.liars_isolated), (1, 1));
        assert!(r.counters.reports >= 1);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
    }
}
