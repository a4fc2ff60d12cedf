//! Row d of BENCH.md: goodput over a lossy, long-RTT path — the QUIC mesh against TCP (curl over
//! HTTPS) through the same emulated link, in one run.
//!
//! Two network namespaces joined by netsim's TUN link ([`d7q_netsim::tun::TunLink`], run in this
//! process): side A holds the HTTPS origin (`d7q-bench origin`) and a `d7q supernode` that already
//! has the file (seeded once, untimed, from inside A, so the origin is out of the picture); side
//! B holds the clients. For each RTT × loss cell the link is set to `delay = RTT/2` each way,
//! `rate` each way and the loss on both directions (data and acknowledgements), then per round:
//!
//! - **mesh**: a fresh `d7q get --supernode A` process in B, timed spawn to exit, goodput = file
//!   bytes / time (handshakes, verification and fsync included);
//! - **tcp-CC**: `curl` over HTTPS from the origin, with the TCP congestion controller CC set in
//!   on the route in both namespaces (Cubic by default; `--tcp-cc cubic,bbr` measures both), goodput = bytes
//!   received / time. curl is capped at `--tcp-max-secs`: at 10 % loss and 80 ms a Cubic flow
//!   runs at well under a megabit, and the bytes it moved in the cap give its goodput.
//!
//! Variants alternate within each cell and cells within each round, so drift in the machine's
//! load hits every variant alike. Writes `target/bench/wan.json`, the table (printed and in
//! `target/bench/wan.txt`) and
//! `target/bench/wan.svg` (goodput against loss, one line per RTT per transport, the ideal
//! `rate·(1−p)` dashed). Bars: mesh ≥ 0.8 / 0.6 / 0.4 of `rate·(1−p)` at 1 / 5 / 10 %, and
//! several times TCP Cubic.
//!
//! Not measured here: several peers or hops (rows a, b; netsim scenarios), CPU cost.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use d7q_netsim::chart::{Chart, Series};
use d7q_netsim::link::LinkConfig;
use d7q_netsim::netns;
use d7q_netsim::tun::{SwitchHandle, TunLink, TunLinkConfig};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::util::{self, Spread, TempDir};

/// Namespaces of this benchmark: the server side and the client side.
const NS_A: &str = "d7qw-a";
const NS_B: &str = "d7qw-b";
/// Addresses on the TUN devices.
const ADDR_A: &str = "10.79.0.1";
const ADDR_B: &str = "10.79.0.2";
/// Their prefix, routed through the devices.
const SUBNET: &str = "10.79.0.0/30";
/// The TUN device's name on both sides.
const IFNAME: &str = "wan0";
/// The origin's and the supernode's ports on side A.
const ORIGIN_PORT: u16 = 8443;
const MESH_PORT: u16 = 8002;
/// The file, under the origin's root.
const BLOB: &str = "blob.bin";
/// How long a supernode, the origin or a `d7q ca` command may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause after changing the link, so packets of the previous setting have left the queue.
const SETTLE: Duration = Duration::from_millis(500);
/// Bars on mesh goodput / `rate·(1−p)`, by loss.
const BARS: [(f64, f64); 3] = [(0.01, 0.8), (0.05, 0.6), (0.10, 0.4)];
/// Head room kept free on the temp disk beyond the benchmark's own files.
const DISK_MARGIN: u64 = 256 << 20;

/// `d7q-bench wan`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Round-trip times in milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "20,80")]
    rtt_ms: Vec<u64>,
    /// Loss rates in percent, applied to each direction.
    #[arg(long, value_delimiter = ',', default_value = "0,1,5,10")]
    loss_pct: Vec<f64>,
    /// Link rate in Mbit/s, each direction.
    #[arg(long, default_value_t = 100)]
    rate_mbit: u64,
    /// Queue in front of the bottleneck, in KiB (default: the link model's, 1 MiB).
    #[arg(long)]
    queue_kib: Option<u64>,
    /// Size of the file in MiB.
    #[arg(long, default_value_t = 32)]
    size_mib: u64,
    /// Rounds; each round runs every variant in every cell once.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// TCP congestion controllers to measure curl with (set in both namespaces).
    #[arg(long, value_delimiter = ',', default_value = "cubic")]
    tcp_cc: Vec<String>,
    /// Longest a curl run may take; its goodput is then what it moved in that time.
    #[arg(long, default_value_t = 30)]
    tcp_max_secs: u64,
    /// Longest a `d7q get` may take; a run that times out counts at size / this (an upper
    /// bound on its goodput) and is flagged.
    #[arg(long, default_value_t = 120)]
    mesh_max_secs: u64,
    /// Seed of the link model and of the test data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where to write the JSON result; the SVG goes next to it.
    #[arg(long, default_value = "target/bench/wan.json")]
    json: PathBuf,
    /// The `d7q` binary; default: next to this one.
    #[arg(long)]
    d7q: Option<PathBuf>,
    /// Parent of the temporary directory; default: the system's.
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Extra arguments for `d7q supernode` (space-separated), e.g. QUIC tuning flags.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    supernode_args: String,
    /// Extra arguments for `d7q get` (space-separated).
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    get_args: String,
}

/// One transport's measurements in one cell.
#[derive(Debug, Clone, Serialize)]
struct VariantResult {
    variant: String,
    /// Goodput per round, Mbit/s.
    samples_mbit: Vec<f64>,
    /// Runs that hit their time cap.
    capped: usize,
    spread_mbit: Option<Spread>,
}

/// One RTT × loss cell.
#[derive(Debug, Clone, Serialize)]
struct Cell {
    rtt_ms: u64,
    loss: f64,
    link_each_way: String,
    /// `rate·(1−p)`, Mbit/s.
    ideal_mbit: f64,
    variants: Vec<VariantResult>,
    /// Median mesh goodput / ideal.
    mesh_of_ideal: f64,
    /// Median mesh goodput / median goodput of the first TCP variant.
    mesh_over_tcp: f64,
    /// The bar on `mesh_of_ideal` at this loss, if BENCH.md sets one.
    bar: Option<f64>,
    pass: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    rate_mbit: u64,
    size_mib: u64,
    reps: usize,
    seed: u64,
    tcp_max_secs: u64,
    mesh_max_secs: u64,
    supernode_args: String,
    get_args: String,
    load_average_end: Option<f64>,
    /// Rounds done when this file was written (it is rewritten after every round).
    rounds_done: usize,
    cells: Vec<Cell>,
}

/// Runs the `wan` benchmark.
pub fn run(args: &Args) -> Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be at least 1");
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(args.rate_mbit > 0, "--rate-mbit must be at least 1");
    ensure!(!args.rtt_ms.is_empty() && !args.loss_pct.is_empty());
    ensure!(
        args.loss_pct.iter().all(|p| (0.0..100.0).contains(p)),
        "--loss-pct values must be in [0, 100)"
    );
    netns::privileged().map_err(|why| anyhow!("the TUN link needs root: {why}"))?;
    for ns in [NS_A, NS_B] {
        if netns::exists(ns) {
            // A crashed run's namespace: nothing of value can be in it.
            eprintln!("wan: removing namespace {ns} left by an earlier run");
            netns::remove_stale(ns)?;
        }
    }
    let d7q = match &args.d7q {
        Some(p) => p.clone(),
        None => util::sibling_binary("d7q")?,
    };
    let parent = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let bytes = args.size_mib << 20;
    let needed = 4 * bytes + DISK_MARGIN;
    let free = d7q::store::free_space(&parent)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free, the benchmark needs {} MiB",
        parent.display(),
        free >> 20,
        needed >> 20
    );
    let tmp = TempDir::new(&parent, "d7q-bench-wan")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(bench(args, &d7q, bytes, tmp.path()))?;
    drop(rt);
    drop(tmp);
    print!("{}", table(&report));
    write_outputs(&args.json, &report)?;
    println!("JSON: {}", args.json.display());
    Ok(())
}

/// The running pieces of one benchmark.
struct Setup {
    d7q: PathBuf,
    bytes: u64,
    digest: [u8; 32],
    url: String,
    origin_ca: PathBuf,
    peer_pki: PathBuf,
    mesh: String,
    out: PathBuf,
    get_args: Vec<String>,
    tcp_max: Duration,
    mesh_max: Duration,
}

async fn bench(args: &Args, d7q: &Path, bytes: u64, tmp: &Path) -> Result<Report> {
    let root = tmp.join("origin");
    std::fs::create_dir(&root)?;
    eprintln!("wan: generating {} MiB of test data", args.size_mib);
    let digest = util::write_random_file(&root.join(BLOB), bytes, args.seed)?;

    let mut config = TunLinkConfig::new(NS_A, NS_B);
    config.addr_a = (ADDR_A.parse()?, 30);
    config.addr_b = (ADDR_B.parse()?, 30);
    config.seed = args.seed;
    config.ifname = IFNAME.into();
    let link = TunLink::start(config)
        .await
        .context("starting the TUN link")?;
    let handle = link.handle();

    let cluster = tmp.join("cluster-ca");
    let (sn_pki, peer_pki) = (tmp.join("pki-sn"), tmp.join("pki-peer"));
    d7q_cmd(d7q, &["ca", "init", "--dir"], &[&cluster]).await?;
    for (name, dir) in [("sn", &sn_pki), ("peer", &peer_pki)] {
        let a = ["ca", "issue", "--name", name, "--dir"];
        d7q_cmd(d7q, &a, &[&cluster, Path::new("--out"), dir]).await?;
    }

    let origin_ca = tmp.join("origin-ca.pem");
    let bench_exe = std::env::current_exe()?;
    let mut origin = in_ns(NS_A, &bench_exe);
    origin
        .arg("origin")
        .arg("--root")
        .arg(&root)
        .args(["--listen", &format!("{ADDR_A}:{ORIGIN_PORT}")])
        .arg("--ca-out")
        .arg(&origin_ca)
        // It ends at the end of its stdin: kept open by holding the child.
        .stdin(Stdio::piped());
    let (mut origin, base) = spawn_ready(origin, &tmp.join("origin.log"), "the origin").await?;
    let base = base
        .strip_prefix("ready ")
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_owned();
    let url = format!("{base}/{BLOB}");

    let store = tmp.join("sn-store");
    let mut sn = in_ns(NS_A, d7q);
    sn.args(["supernode", "--listen", &format!("{ADDR_A}:{MESH_PORT}")])
        .args(["--metrics", "127.0.0.1:0", "--data-dir"])
        .arg(&store)
        .arg("--pki")
        .arg(&sn_pki)
        .arg("--origin-ca")
        .arg(&origin_ca)
        .args(args.supernode_args.split_whitespace())
        .stdin(Stdio::null());
    let (mut supernode, _) = spawn_ready(sn, &tmp.join("supernode.log"), "d7q supernode").await?;
    let mesh = format!("{ADDR_A}:{MESH_PORT}");

    let out_dir = tmp.join("out");
    std::fs::create_dir(&out_dir)?;
    let setup = Setup {
        d7q: d7q.to_path_buf(),
        bytes,
        digest,
        url,
        origin_ca,
        peer_pki,
        mesh,
        out: out_dir.join("out.bin"),
        get_args: args
            .get_args
            .split_whitespace()
            .map(str::to_owned)
            .collect(),
        tcp_max: Duration::from_secs(args.tcp_max_secs),
        mesh_max: Duration::from_secs(args.mesh_max_secs),
    };
    // Seed the supernode from inside A, where nothing is impaired.
    eprintln!("wan: seeding the supernode");
    setup
        .mesh_get(NS_A)
        .await
        .context("seeding the supernode")?;

    let result = rounds(args, &setup, &handle).await;
    let _ = supernode.start_kill();
    let _ = supernode.wait().await;
    let _ = origin.start_kill();
    let _ = origin.wait().await;
    drop(link);
    result.map_err(|e| {
        e.context(format!(
            "{}\n{}",
            log_tail(&tmp.join("supernode.log")),
            log_tail(&tmp.join("origin.log"))
        ))
    })
}

/// Every round: every cell, every variant; the report is rewritten after each round.
async fn rounds(args: &Args, setup: &Setup, link: &SwitchHandle) -> Result<Report> {
    let mut variants = vec!["mesh".to_owned()];
    variants.extend(args.tcp_cc.iter().map(|cc| format!("tcp-{cc}")));
    let mut cells = Vec::new();
    for &rtt in &args.rtt_ms {
        for &loss_pct in &args.loss_pct {
            let config = link_config(args, rtt, loss_pct / 100.0)?;
            cells.push(Cell {
                rtt_ms: rtt,
                loss: loss_pct / 100.0,
                link_each_way: config.to_string(),
                ideal_mbit: args.rate_mbit as f64 * (1.0 - loss_pct / 100.0),
                variants: variants
                    .iter()
                    .map(|v| VariantResult {
                        variant: v.clone(),
                        samples_mbit: Vec::new(),
                        capped: 0,
                        spread_mbit: None,
                    })
                    .collect(),
                mesh_of_ideal: f64::NAN,
                mesh_over_tcp: f64::NAN,
                bar: None,
                pass: None,
            });
        }
    }
    let mut report = Report {
        benchmark: "wan (BENCH.md row d)",
        rate_mbit: args.rate_mbit,
        size_mib: args.size_mib,
        reps: args.reps,
        seed: args.seed,
        tcp_max_secs: args.tcp_max_secs,
        mesh_max_secs: args.mesh_max_secs,
        supernode_args: args.supernode_args.clone(),
        get_args: args.get_args.clone(),
        load_average_end: None,
        rounds_done: 0,
        cells: Vec::new(),
    };
    for round in 0..args.reps {
        for cell in cells.iter_mut() {
            let config: LinkConfig = cell.link_each_way.parse()?;
            link.set_inter_config("a", "b", config.clone())?;
            link.set_inter_config("b", "a", config)?;
            // Alternate which variant goes first, round by round.
            let n = cell.variants.len();
            for k in 0..n {
                let i = (k + round) % n;
                tokio::time::sleep(SETTLE).await;
                let name = cell.variants[i].variant.clone();
                let (mbit, capped) = match name.strip_prefix("tcp-") {
                    None => setup.mesh_run().await?,
                    Some(cc) => setup.tcp_run(cc).await?,
                };
                eprintln!(
                    "  round {}/{} rtt {} ms loss {:.0}%: {name:<10} {mbit:7.2} Mbit/s{}",
                    round + 1,
                    args.reps,
                    cell.rtt_ms,
                    cell.loss * 100.0,
                    if capped { " (capped)" } else { "" }
                );
                let v = &mut cell.variants[i];
                v.samples_mbit.push(mbit);
                v.capped += usize::from(capped);
            }
            summarize(cell);
        }
        report.rounds_done = round + 1;
        report.cells = cells.clone();
        report.load_average_end = util::load_average();
        // Partial results for whoever is waiting for them.
        write_outputs(&args.json, &report)?;
    }
    Ok(report)
}

impl Setup {
    /// One timed `d7q get` in side B: (goodput Mbit/s, hit the cap).
    async fn mesh_run(&self) -> Result<(f64, bool)> {
        let start = Instant::now();
        match self.mesh_get(NS_B).await {
            Ok(()) => {}
            Err(e) if e.downcast_ref::<Capped>().is_some() => {
                return Ok((mbit(self.bytes, self.mesh_max), true));
            }
            Err(e) => return Err(e),
        }
        let took = start.elapsed();
        self.check_output(self.bytes)?;
        Ok((mbit(self.bytes, took), false))
    }

    /// `d7q get` from inside `ns` to the output file, checked for success.
    async fn mesh_get(&self, ns: &str) -> Result<()> {
        let _ = std::fs::remove_file(&self.out);
        let mut cmd = in_ns(ns, &self.d7q);
        cmd.arg("get")
            .arg(&self.url)
            .arg("-o")
            .arg(&self.out)
            .args(["--supernode", &self.mesh])
            .arg("--pki")
            .arg(&self.peer_pki)
            .arg("--origin-ca")
            .arg(&self.origin_ca)
            .args(&self.get_args)
            .arg("-q");
        let out = run_capped(&mut cmd, self.mesh_max).await?;
        util::check_success("d7q get", &out)
    }

    /// One curl over HTTPS in side B with congestion controller `cc`.
    async fn tcp_run(&self, cc: &str) -> Result<(f64, bool)> {
        // Per route, not by sysctl: a namespace other than the first may only default to the
        // controllers in net.ipv4.tcp_allowed_congestion_control, which need not list Cubic.
        for ns in [NS_A, NS_B] {
            netns::ip(&[
                "-n", ns, "route", "replace", SUBNET, "dev", IFNAME, "congctl", cc,
            ])
            .with_context(|| format!("setting congestion control {cc} in {ns}"))?;
        }
        let _ = std::fs::remove_file(&self.out);
        let mut cmd = in_ns(NS_B, Path::new("curl"));
        cmd.args(["-sS", "--http1.1", "--cacert"])
            .arg(&self.origin_ca)
            .args(["--max-time", &self.tcp_max.as_secs().to_string()])
            .args(["-w", "%{size_download} %{time_total}", "-o"])
            .arg(&self.out)
            .arg(&self.url);
        // curl enforces the cap itself; ours is a backstop.
        let out = run_capped(&mut cmd, self.tcp_max + READY_TIMEOUT).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let (size, secs) = match (words.next(), words.next()) {
            (Some(s), Some(t)) => (s.parse::<u64>()?, t.parse::<f64>()?),
            _ => bail!(
                "curl printed {text:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ),
        };
        // Exit 28 is curl's "operation timed out": the cap, with the bytes so far.
        let capped = out.status.code() == Some(28);
        if !capped {
            util::check_success("curl", &out)?;
            self.check_output(size)?;
        }
        ensure!(secs > 0.0, "curl reported no time");
        Ok((size as f64 * 8.0 / secs / 1e6, capped))
    }

    /// The output is the whole file (checked by digest), or, for `expected` short of it, its
    /// length only.
    fn check_output(&self, expected: u64) -> Result<()> {
        let len = std::fs::metadata(&self.out).map_or(0, |m| m.len());
        ensure!(
            len == expected,
            "output has {len} bytes, expected {expected}"
        );
        if len == self.bytes {
            let digest = util::sha256_file(&self.out)?;
            ensure!(
                digest == self.digest,
                "output digest differs from the file's"
            );
        }
        let _ = std::fs::remove_file(&self.out);
        Ok(())
    }
}

/// A run that hit its time cap.
#[derive(Debug)]
struct Capped(Duration);

impl std::fmt::Display for Capped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "did not finish within {:?}", self.0)
    }
}

impl std::error::Error for Capped {}

/// Runs `cmd` to completion with stdout and stderr captured, killed after `cap`.
async fn run_capped(cmd: &mut Command, cap: Duration) -> Result<std::process::Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
    match tokio::time::timeout(cap, child.wait_with_output()).await {
        Ok(out) => Ok(out?),
        Err(_) => Err(Capped(cap).into()),
    }
}

/// The link each way for one cell.
fn link_config(args: &Args, rtt_ms: u64, loss: f64) -> Result<LinkConfig> {
    let mut text = format!(
        "delay={}us,rate={}mbit,loss={loss}",
        rtt_ms * 500,
        args.rate_mbit
    );
    if let Some(q) = args.queue_kib {
        text.push_str(&format!(",queue={q}kb"));
    }
    text.parse()
        .with_context(|| format!("link configuration {text:?}"))
}

/// Fills in a cell's medians, ratios and verdict from its samples.
fn summarize(cell: &mut Cell) {
    for v in &mut cell.variants {
        v.spread_mbit = Spread::of(&v.samples_mbit);
    }
    let median = |i: usize| {
        cell.variants
            .get(i)
            .and_then(|v| v.spread_mbit)
            .map_or(f64::NAN, |s| s.median)
    };
    let (mesh, tcp) = (median(0), median(1));
    cell.mesh_of_ideal = mesh / cell.ideal_mbit;
    cell.mesh_over_tcp = mesh / tcp;
    cell.bar = BARS
        .iter()
        .find(|(p, _)| (p - cell.loss).abs() < 1e-9)
        .map(|&(_, bar)| bar);
    cell.pass = cell.bar.map(|bar| cell.mesh_of_ideal >= bar);
}

fn mbit(bytes: u64, took: Duration) -> f64 {
    bytes as f64 * 8.0 / took.as_secs_f64().max(1e-9) / 1e6
}

/// The table for people.
fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "\nrow d: goodput through the TUN link, {} Mbit/s each way, {} MiB, {} rounds \
         (median [min–max] Mbit/s)",
        r.rate_mbit, r.size_mib, r.rounds_done
    );
    let names: Vec<&str> = r
        .cells
        .first()
        .map(|c| c.variants.iter().map(|v| v.variant.as_str()).collect())
        .unwrap_or_default();
    let _ = write!(s, "{:>6} {:>6} {:>7}", "rtt", "loss", "ideal");
    for n in &names {
        let _ = write!(s, " {n:>22}");
    }
    let _ = writeln!(s, " {:>9} {:>9} {:>5}", "mesh/ideal", "mesh/tcp", "bar");
    for c in &r.cells {
        let _ = write!(
            s,
            "{:>4}ms {:>5.0}% {:>7.1}",
            c.rtt_ms,
            c.loss * 100.0,
            c.ideal_mbit
        );
        for v in &c.variants {
            let cell = v.spread_mbit.map_or("-".to_owned(), |sp| {
                format!(
                    "{:.1} [{:.1}–{:.1}]{}",
                    sp.median,
                    sp.min,
                    sp.max,
                    if v.capped > 0 { "*" } else { "" }
                )
            });
            let _ = write!(s, " {cell:>22}");
        }
        let verdict = match (c.bar, c.pass) {
            (Some(b), Some(true)) => format!("≥{b} ok"),
            (Some(b), _) => format!("≥{b} MISS"),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            " {:>10.2} {:>9.1} {verdict:>5}",
            c.mesh_of_ideal, c.mesh_over_tcp
        );
    }
    let _ = writeln!(
        s,
        "* some runs hit their time cap (tcp: goodput over the cap; mesh: an upper bound)"
    );
    s
}

/// The JSON and, next to it, the SVG chart.
fn write_outputs(json: &Path, r: &Report) -> Result<()> {
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(json, serde_json::to_string_pretty(r)? + "\n")
        .with_context(|| format!("writing {}", json.display()))?;
    let txt = json.with_extension("txt");
    std::fs::write(&txt, table(r)).with_context(|| format!("writing {}", txt.display()))?;
    let svg = json.with_extension("svg");
    std::fs::write(&svg, chart(r).to_svg())
        .with_context(|| format!("writing {}", svg.display()))?;
    Ok(())
}

fn chart(r: &Report) -> Chart {
    let mut rtts: Vec<u64> = r.cells.iter().map(|c| c.rtt_ms).collect();
    rtts.dedup();
    let mut series = Vec::new();
    let names: Vec<String> = r
        .cells
        .first()
        .map(|c| c.variants.iter().map(|v| v.variant.clone()).collect())
        .unwrap_or_default();
    for (vi, name) in names.iter().enumerate() {
        for (ri, rtt) in rtts.iter().enumerate() {
            let points = r
                .cells
                .iter()
                .filter(|c| c.rtt_ms == *rtt)
                .map(|c| {
                    let y = c.variants[vi].spread_mbit.map_or(f64::NAN, |s| s.median);
                    (c.loss * 100.0, y)
                })
                .collect();
            series.push(Series {
                name: format!("{name}, {rtt} ms RTT"),
                points,
                dashed: ri % 2 == 1,
                colour: Some(vi),
                ..Series::default()
            });
        }
    }
    let ideal = r
        .cells
        .iter()
        .filter(|c| Some(&c.rtt_ms) == rtts.first())
        .map(|c| (c.loss * 100.0, c.ideal_mbit))
        .collect();
    series.push(Series {
        name: "ideal rate·(1−p)".into(),
        points: ideal,
        dashed: true,
        colour: Some(7),
        ..Series::default()
    });
    Chart {
        title: format!(
            "Goodput vs loss, {} Mbit/s link, {} MiB",
            r.rate_mbit, r.size_mib
        ),
        x_label: "loss each way (%)".into(),
        y_label: "goodput (Mbit/s, median)".into(),
        series,
        y_min: Some(0.0),
        ..Chart::default()
    }
}

/// `ip netns exec NS PROGRAM`.
fn in_ns(ns: &str, program: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd.kill_on_drop(true);
    cmd
}

/// Starts `cmd` with stderr into `log`, waits for its `ready` line on stdout and returns it;
/// later stdout is drained.
async fn spawn_ready(mut cmd: Command, log: &Path, what: &str) -> Result<(Child, String)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .spawn()
        .with_context(|| format!("spawning {what}"))?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if line.starts_with("ready") {
                return Ok::<_, anyhow::Error>(Some(line));
            }
        }
        Ok(None)
    })
    .await;
    let line = match ready {
        Ok(Ok(Some(line))) => line,
        Ok(Ok(None)) => bail!("{what} exited before it was ready\n{}", log_tail(log)),
        Ok(Err(e)) => return Err(e.context(format!("reading {what}'s stdout"))),
        Err(_) => bail!(
            "{what} not ready within {READY_TIMEOUT:?}\n{}",
            log_tail(log)
        ),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line))
}

async fn d7q_cmd(d7q: &Path, args: &[&str], paths: &[&Path]) -> Result<()> {
    let mut cmd = Command::new(d7q);
    cmd.args(args).args(paths);
    let out = run_capped(&mut cmd, READY_TIMEOUT).await?;
    util::check_success(&format!("d7q {}", args.join(" ")), &out)
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(15)..].join("\n");
    format!("{}, last lines:\n{tail}", path.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cell(loss: f64, mesh: &[f64], tcp: &[f64]) -> Cell {
        let v = |name: &str, s: &[f64]| VariantResult {
            variant: name.into(),
            samples_mbit: s.to_vec(),
            capped: 0,
            spread_mbit: None,
        };
        Cell {
            rtt_ms: 80,
            loss,
            link_each_way: String::new(),
            ideal_mbit: 100.0 * (1.0 - loss),
            variants: vec![v("mesh", mesh), v("tcp-cubic", tcp)],
            mesh_of_ideal: f64::NAN,
            mesh_over_tcp: f64::NAN,
            bar: None,
            pass: None,
        }
    }

    #[test]
    fn bars_follow_bench_md() {
        let mut c = cell(0.05, &[60.0, 57.0, 58.0], &[2.0, 3.0, 4.0]);
        summarize(&mut c);
        assert_eq!(c.bar, Some(0.6));
        assert_eq!(c.pass, Some(true));
        assert!((c.mesh_over_tcp - 19.333).abs() < 0.01);
        let mut c = cell(0.10, &[30.0], &[1.0]);
        summarize(&mut c);
        assert_eq!(c.pass, Some(false));
        let mut c = cell(0.0, &[90.0], &[80.0]);
        summarize(&mut c);
        assert_eq!((c.bar, c.pass), (None, None));
    }

    #[test]
    fn link_is_half_the_rtt_each_way() {
        let args = Args {
            rtt_ms: vec![],
            loss_pct: vec![],
            rate_mbit: 100,
            queue_kib: None,
            size_mib: 1,
            reps: 1,
            tcp_cc: vec![],
            tcp_max_secs: 1,
            mesh_max_secs: 1,
            seed: 0,
            json: PathBuf::new(),
            d7q: None,
            tmp_dir: None,
            supernode_args: String::new(),
            get_args: String::new(),
        };
        let c = link_config(&args, 80, 0.01).unwrap();
        assert_eq!(c.delay, Duration::from_millis(40));
        assert_eq!(c.rate_bps, Some(100_000_000));
        assert!((c.loss - 0.01).abs() < 1e-12);
    }
}
