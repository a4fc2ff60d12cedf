//! Row c of BENCH.md: one file, one receiver, loopback, no shaping — the QUIC mesh against HTTPS
//! over TCP on the same machine, interleaved round by round (A B A' B' A B A' B' …):
//!
//! - **A, mesh**: a real `d7q supernode` process that already holds the file (untimed `d7q get`s
//!   seed it from the origin first, so the origin is out of the picture), and per round a fresh
//!   `d7q get` process that fetches it over QUIC, verifies every piece against the seed's
//!   SHA-256 digests, writes and fsyncs it: one SHA-256 pass over the content, as in B.
//! - **B, HTTPS + SHA-256**: a [`DevServer`] (hyper, rustls, TCP) in this process serving the
//!   same file from disk, and per round a fresh `d7q-bench https-get` process (hyper HTTP/1.1 +
//!   rustls) that writes, hashes and fsyncs it: the work comparable to A.
//! - **A', mesh with `--digest`** (secondary): `d7q get` given the expected digest, which also
//!   hashes the whole content — a second SHA-256 pass. A separate task on the supernode (a
//!   task's id is its digest when one is known), seeded separately.
//! - **B', HTTPS** (secondary): B without the hash — transport and disk alone.
//!
//! A variant's time is its client process from spawn to exit. After each transfer, outside the
//! timing, the benchmark hashes the output itself and deletes it. The bar is median throughput
//! A / median throughput B ≥ 0.8. CPU seconds per transfer come from `/proc`: the client's as a
//! reaped child, the server's from the supernode's process or, for the in-process DevServer,
//! from this process (which only waits meanwhile).
//!
//! Not measured here: several receivers, shaped links, loss (rows a, b and d).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use d7q::devserver::{DevCa, DevServer};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::https;
use crate::util::{self, CpuTimes, Spread, TempDir};

/// The bar of row c: the mesh's median throughput over HTTPS's.
pub const BAR: f64 = 0.8;

/// Head room kept free on the temp disk beyond the benchmark's own files.
const DISK_MARGIN: u64 = 512 << 20;

/// The supernode's log (its stderr), in the temp dir.
const SUPERNODE_LOG: &str = "supernode.log";

/// Lines of the supernode's log shown with an error.
const LOG_TAIL_LINES: usize = 20;

/// How long a supernode (or a `d7q ca` command) may take to get ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Path of the file the mesh fetches from the origin.
const MESH_PATH: &str = "/blob.bin";

/// GETs of [`MESH_PATH`] the origin should ever see: one per supernode task (A's, keyed by the
/// URL, and A''s, keyed by the digest).
const SEED_GETS: u64 = 2;

/// The same file under another name for the HTTPS client, so the origin's count of
/// [`MESH_PATH`] shows the mesh reached it only to seed its tasks.
const DIRECT_PATH: &str = "/direct.bin";

/// `d7q-bench transfer`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the file in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Rounds; each round runs every variant once.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where to write the JSON result.
    #[arg(long, default_value = "target/bench/transfer.json")]
    json: PathBuf,
    /// The `d7q` binary; default: next to this one.
    #[arg(long)]
    d7q: Option<PathBuf>,
    /// Parent of the temporary directory (data, stores, outputs); default: the system's.
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Seed of the test data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest a single transfer may take before the benchmark fails, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// Runs the `transfer` benchmark.
pub fn run(args: &Args) -> Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be at least 1");
    ensure!(args.reps > 0, "--reps must be at least 1");
    let bytes = args.size_mib << 20;
    let d7q = match &args.d7q {
        Some(p) => p.clone(),
        None => util::sibling_binary("d7q")?,
    };
    let parent = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    // The origin file (its second name is a hard link), the supernode's two tasks, one output.
    let needed = 4 * bytes + DISK_MARGIN;
    let free = d7q::store::free_space(&parent)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free, the benchmark needs {} MiB",
        parent.display(),
        free >> 20,
        needed >> 20
    );
    let tmp = TempDir::new(&parent, "d7q-bench-transfer")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(bench(args, &d7q, bytes, tmp.path()))?;
    drop(rt);
    drop(tmp);

    print_table(&report);
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("JSON: {}", args.json.display());
    Ok(())
}

/// The ways the file travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Variant {
    /// A: `d7q get` from a supernode that has the file.
    Mesh,
    /// B: HTTPS over TCP, written, hashed and fsynced.
    Https,
    /// A': `d7q get --digest`, which hashes the whole content as well.
    MeshDigest,
    /// B': HTTPS over TCP, written and fsynced.
    HttpsNoHash,
}

impl Variant {
    /// The order within each round: the pair the bar compares first.
    const ROUND: [Variant; 4] = [
        Variant::Mesh,
        Variant::Https,
        Variant::MeshDigest,
        Variant::HttpsNoHash,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Mesh => "A  mesh: d7q get (QUIC)",
            Variant::Https => "B  https + sha256 (TCP)",
            Variant::MeshDigest => "A' mesh: d7q get --digest",
            Variant::HttpsNoHash => "B' https, no hash (TCP)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Variant::Mesh => "A ",
            Variant::Https => "B ",
            Variant::MeshDigest => "A'",
            Variant::HttpsNoHash => "B'",
        }
    }

    fn is_mesh(self) -> bool {
        matches!(self, Variant::Mesh | Variant::MeshDigest)
    }
}

/// One timed transfer.
#[derive(Debug, Serialize)]
struct Sample {
    round: usize,
    variant: Variant,
    secs: f64,
    mb_per_s: f64,
    client_cpu: CpuTimes,
    server_cpu: CpuTimes,
}

/// A variant over all rounds. Throughput in MB/s (10^6 bytes) and Gbit/s; CPU in seconds per
/// transfer, user + system.
#[derive(Debug, Serialize)]
struct Summary {
    variant: Variant,
    label: &'static str,
    secs: Spread,
    mb_per_s: Spread,
    gbit_per_s: Spread,
    client_cpu_s: Spread,
    server_cpu_s: Spread,
}

/// The JSON result.
#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    row: &'static str,
    bytes: u64,
    rounds: usize,
    order: &'static str,
    summaries: Vec<Summary>,
    /// Median throughput A / B: the number held against [`BAR`].
    ratio_mesh_over_https: f64,
    /// Median throughput A' / B.
    ratio_mesh_digest_over_https: f64,
    /// Median throughput A / B'.
    ratio_mesh_over_https_nohash: f64,
    bar: f64,
    pass: bool,
    /// GETs of the mesh's URL at the origin: [`SEED_GETS`] means only the seeding reached it.
    origin_gets_mesh: u64,
    /// The untimed seeding `d7q get`s (A's task, then A''s), through the supernode from the
    /// origin.
    seed_secs: [f64; 2],
    /// Cipher suite of the HTTPS baseline.
    https_cipher_suite: String,
    d7q_binary: String,
    cpus: usize,
    /// One-minute load average before and after the rounds (other work on the machine).
    load_average: [Option<f64>; 2],
    unix_time: u64,
    samples: Vec<Sample>,
}

/// Everything the rounds need: the origin, the supernode and where things go.
struct Setup {
    d7q: PathBuf,
    bench: PathBuf,
    bytes: u64,
    digest_hex: String,
    server: DevServer,
    origin_ca: PathBuf,
    peer_pki: PathBuf,
    supernode: Child,
    supernode_pid: u32,
    mesh: SocketAddr,
    out: PathBuf,
    timeout: Duration,
}

async fn bench(args: &Args, d7q: &Path, bytes: u64, tmp: &Path) -> Result<Report> {
    let origin = tmp.join("origin");
    std::fs::create_dir(&origin)?;
    eprintln!("generating {} MiB of test data", bytes >> 20);
    let blob = origin.join(MESH_PATH.trim_start_matches('/'));
    let digest = util::write_random_file(&blob, bytes, args.seed)?;
    std::fs::hard_link(&blob, origin.join(DIRECT_PATH.trim_start_matches('/')))?;

    let ca = DevCa::new();
    let origin_ca = tmp.join("origin-ca.pem");
    ca.write_pem(&origin_ca)?;
    let server = DevServer::start(origin, "127.0.0.1:0".parse()?, Some(&ca)).await?;

    let cluster = tmp.join("cluster-ca");
    let (sn_pki, peer_pki) = (tmp.join("pki-supernode"), tmp.join("pki-peer"));
    d7q_cmd(d7q, &["ca", "init", "--dir"], &[&cluster]).await?;
    for (name, dir) in [("sn", &sn_pki), ("peer", &peer_pki)] {
        let args = ["ca", "issue", "--name", name, "--dir"];
        d7q_cmd(d7q, &args, &[&cluster, Path::new("--out"), dir]).await?;
    }
    let store = tmp.join("supernode-store");
    std::fs::create_dir(&store)?;
    let (supernode, mesh) = start_supernode(d7q, &store, &sn_pki, &origin_ca, tmp).await?;
    let out_dir = tmp.join("out");
    std::fs::create_dir(&out_dir)?;
    let mut setup = Setup {
        d7q: d7q.to_path_buf(),
        bench: std::env::current_exe()?,
        bytes,
        digest_hex: util::hex(&digest),
        server,
        origin_ca,
        peer_pki,
        supernode_pid: supernode.id().context("supernode exited")?,
        supernode,
        mesh,
        out: out_dir.join("out.bin"),
        timeout: Duration::from_secs(args.timeout_secs),
    };
    let result = rounds(&setup, args.reps).await;
    let _ = setup.supernode.start_kill();
    let _ = setup.supernode.wait().await;
    // The log goes with the temp dir: show its end with the error.
    let (samples, info) = result.map_err(|e| e.context(log_tail(&tmp.join(SUPERNODE_LOG))))?;
    let origin_gets_mesh = setup.server.get_count(MESH_PATH);
    setup.server.shutdown().await;
    Ok(report(
        bytes,
        args.reps,
        samples,
        info,
        origin_gets_mesh,
        d7q,
    ))
}

/// The warm-ups, then the timed rounds.
async fn rounds(s: &Setup, reps: usize) -> Result<(Vec<Sample>, RunInfo)> {
    eprintln!("seeding the supernode (untimed d7q get, then d7q get --digest, from the origin)");
    let seed = s.transfer(Variant::Mesh, 0).await?;
    let seed_digest = s.transfer(Variant::MeshDigest, 0).await?;
    ensure!(
        s.server.get_count(MESH_PATH) == SEED_GETS,
        "the origin saw {} GETs while seeding, expected {SEED_GETS}",
        s.server.get_count(MESH_PATH)
    );
    eprintln!(
        "  {:.2} s and {:.2} s; warming up the HTTPS client",
        seed.sample.secs, seed_digest.sample.secs
    );
    let warm = s.transfer(Variant::Https, 0).await?;
    let cipher = warm.cipher_suite.unwrap_or_default();

    let load_before = util::load_average();
    let mut samples = Vec::new();
    for round in 1..=reps {
        for variant in Variant::ROUND {
            let t = s.transfer(variant, round).await?;
            eprintln!(
                "round {round}/{reps} {} {:7.3} s {:8.1} MB/s  client CPU {:.2} s  server CPU {:.2} s",
                variant.short(),
                t.sample.secs,
                t.sample.mb_per_s,
                t.sample.client_cpu.total(),
                t.sample.server_cpu.total()
            );
            samples.push(t.sample);
        }
    }
    ensure!(
        s.server.get_count(MESH_PATH) == SEED_GETS,
        "the mesh reached the origin again ({} GETs of {MESH_PATH})",
        s.server.get_count(MESH_PATH)
    );
    let info = RunInfo {
        seed_secs: [seed.sample.secs, seed_digest.sample.secs],
        https_cipher_suite: cipher,
        load_average: [load_before, util::load_average()],
    };
    Ok((samples, info))
}

/// What a run observed besides the samples.
struct RunInfo {
    /// The untimed seeding `d7q get`s, through the supernode from the origin.
    seed_secs: [f64; 2],
    https_cipher_suite: String,
    load_average: [Option<f64>; 2],
}

/// One transfer and what was checked about it.
struct Transfer {
    sample: Sample,
    cipher_suite: Option<String>,
}

impl Setup {
    /// Runs one client process for `variant`, checks its output and removes it.
    async fn transfer(&self, variant: Variant, round: usize) -> Result<Transfer> {
        let mut cmd;
        match variant {
            Variant::Mesh | Variant::MeshDigest => {
                cmd = Command::new(&self.d7q);
                cmd.arg("get")
                    .arg(self.server.url(MESH_PATH))
                    .arg("-o")
                    .arg(&self.out)
                    .arg("--supernode")
                    .arg(self.mesh.to_string())
                    .arg("--pki")
                    .arg(&self.peer_pki)
                    .arg("-q");
                if variant == Variant::MeshDigest {
                    cmd.arg("--digest")
                        .arg(format!("sha256:{}", self.digest_hex));
                }
            }
            Variant::Https | Variant::HttpsNoHash => {
                cmd = Command::new(&self.bench);
                cmd.arg("https-get")
                    .arg(self.server.url(DIRECT_PATH))
                    .arg("--ca")
                    .arg(&self.origin_ca)
                    .arg("-o")
                    .arg(&self.out);
                if variant == Variant::Https {
                    cmd.arg("--sha256");
                }
            }
        }
        let server_before = self.server_cpu(variant)?;
        let run = util::run_timed(&mut cmd, self.timeout).await;
        let server_cpu = self.server_cpu(variant)?.since(server_before);
        let run = run?;
        let checked = self.check(variant, &run.output);
        let _ = std::fs::remove_file(&self.out);
        let cipher_suite = checked?;
        let secs = run.wall.as_secs_f64();
        Ok(Transfer {
            sample: Sample {
                round,
                variant,
                secs,
                mb_per_s: self.bytes as f64 / secs / 1e6,
                client_cpu: run.cpu,
                server_cpu,
            },
            cipher_suite,
        })
    }

    /// The supernode's CPU counter for A; for B this process's, where the DevServer runs.
    fn server_cpu(&self, variant: Variant) -> Result<CpuTimes> {
        if variant.is_mesh() {
            CpuTimes::of_pid(self.supernode_pid)
        } else {
            CpuTimes::of_self()
        }
    }

    /// The client succeeded and its output is the file, hashed here whatever the client
    /// checked; `https-get`'s own report is checked too. Returns its cipher suite.
    fn check(&self, variant: Variant, output: &std::process::Output) -> Result<Option<String>> {
        let what = if variant.is_mesh() {
            "d7q get"
        } else {
            "https-get"
        };
        util::check_success(what, output)?;
        let len = std::fs::metadata(&self.out)
            .with_context(|| format!("{what} left no {}", self.out.display()))?
            .len();
        ensure!(
            len == self.bytes,
            "{what} wrote {len} of {} bytes",
            self.bytes
        );
        let digest = util::hex(&util::sha256_file(&self.out)?);
        ensure!(
            digest == self.digest_hex,
            "{what} wrote content with digest {digest}, expected {}",
            self.digest_hex
        );
        if variant.is_mesh() {
            return Ok(None);
        }
        let report: https::Report = serde_json::from_slice(&output.stdout).with_context(|| {
            format!(
                "{what} printed {:?}",
                String::from_utf8_lossy(&output.stdout)
            )
        })?;
        ensure!(
            report.bytes == self.bytes,
            "{what} reported {} bytes",
            report.bytes
        );
        if variant == Variant::Https && report.sha256.as_deref() != Some(self.digest_hex.as_str()) {
            bail!(
                "{what}: digest {:?}, expected {}",
                report.sha256,
                self.digest_hex
            );
        }
        Ok(Some(report.cipher_suite))
    }
}

/// The last lines of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
    format!("supernode log, last lines:\n{tail}")
}

/// Runs `d7q ARGS PATHS…` to completion.
async fn d7q_cmd(d7q: &Path, args: &[&str], paths: &[&Path]) -> Result<()> {
    let mut cmd = Command::new(d7q);
    cmd.args(args).args(paths);
    let out = util::run_timed(&mut cmd, READY_TIMEOUT).await?;
    util::check_success(&format!("d7q {}", args.join(" ")), &out.output)
}

/// Starts `d7q supernode` on a free loopback port and waits for its `ready mesh=ADDR` line. Its
/// log goes to a file in `tmp`; its stdout is drained so it never blocks.
async fn start_supernode(
    d7q: &Path,
    store: &Path,
    pki: &Path,
    origin_ca: &Path,
    tmp: &Path,
) -> Result<(Child, SocketAddr)> {
    let log = std::fs::File::create(tmp.join(SUPERNODE_LOG))?;
    let mut child = Command::new(d7q)
        .args([
            "supernode",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(store)
        .arg("--pki")
        .arg(pki)
        .arg("--origin-ca")
        .arg(origin_ca)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("spawning d7q supernode")?;
    let mut lines = BufReader::new(child.stdout.take().context("supernode stdout")?).lines();
    let ready = tokio::time::timeout(READY_TIMEOUT, async {
        while let Some(line) = lines.next_line().await? {
            if let Some(rest) = line.trim().strip_prefix("ready mesh=") {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return Ok::<_, anyhow::Error>(Some(addr.parse::<SocketAddr>()?));
            }
        }
        Ok(None)
    })
    .await;
    let addr = match ready {
        Ok(Ok(Some(addr))) => addr,
        Ok(Ok(None)) => bail!(
            "d7q supernode exited before it was ready; {}",
            log_tail(&tmp.join(SUPERNODE_LOG))
        ),
        Ok(Err(e)) => return Err(e.context("reading the supernode's stdout")),
        Err(_) => bail!("d7q supernode not ready within {READY_TIMEOUT:?}"),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, addr))
}

fn report(
    bytes: u64,
    rounds: usize,
    samples: Vec<Sample>,
    info: RunInfo,
    origin_gets_mesh: u64,
    d7q: &Path,
) -> Report {
    let summaries: Vec<Summary> = Variant::ROUND
        .iter()
        .map(|&v| {
            let of = |f: &dyn Fn(&Sample) -> f64| {
                let vals: Vec<f64> = samples.iter().filter(|s| s.variant == v).map(f).collect();
                Spread::of(&vals).expect("at least one round")
            };
            let mb_per_s = of(&|s| s.mb_per_s);
            Summary {
                variant: v,
                label: v.label(),
                secs: of(&|s| s.secs),
                mb_per_s,
                gbit_per_s: mb_per_s.scaled(8.0 / 1000.0),
                client_cpu_s: of(&|s| s.client_cpu.total()),
                server_cpu_s: of(&|s| s.server_cpu.total()),
            }
        })
        .collect();
    let median = |v: Variant| {
        summaries
            .iter()
            .find(|s| s.variant == v)
            .map_or(f64::NAN, |s| s.mb_per_s.median)
    };
    let ratio = median(Variant::Mesh) / median(Variant::Https);
    let ratio_digest = median(Variant::MeshDigest) / median(Variant::Https);
    Report {
        benchmark: "transfer",
        row: "c",
        bytes,
        rounds,
        order: "A B A' B' in every round",
        ratio_mesh_over_https: ratio,
        ratio_mesh_digest_over_https: ratio_digest,
        ratio_mesh_over_https_nohash: median(Variant::Mesh) / median(Variant::HttpsNoHash),
        bar: BAR,
        pass: ratio >= BAR,
        summaries,
        origin_gets_mesh,
        seed_secs: info.seed_secs,
        https_cipher_suite: info.https_cipher_suite,
        load_average: info.load_average,
        d7q_binary: d7q.display().to_string(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        samples,
    }
}

fn print_table(r: &Report) {
    println!();
    println!(
        "transfer (BENCH.md row c): {} MiB, {} rounds ({}), loopback, no shaping",
        r.bytes >> 20,
        r.rounds,
        r.order
    );
    println!(
        "{:<25} {:>9} {:>19} {:>7} {:>8} {:>10} {:>10}",
        "variant", "MB/s", "min..max MB/s", "Gbit/s", "time s", "client CPU", "server CPU"
    );
    for s in &r.summaries {
        println!(
            "{:<25} {:>9.1} {:>19} {:>7.2} {:>8.3} {:>9.2}s {:>9.2}s",
            s.label,
            s.mb_per_s.median,
            format!("{:.1}..{:.1}", s.mb_per_s.min, s.mb_per_s.max),
            s.gbit_per_s.median,
            s.secs.median,
            s.client_cpu_s.median,
            s.server_cpu_s.median
        );
    }
    println!(
        "A/B  = {:.2}  (bar >= {:.2}: {})",
        r.ratio_mesh_over_https,
        r.bar,
        if r.pass { "PASS" } else { "FAIL" }
    );
    println!(
        "A'/B = {:.2}   A/B' = {:.2}",
        r.ratio_mesh_digest_over_https, r.ratio_mesh_over_https_nohash
    );
    println!(
        "medians per transfer; CPU = user+sys seconds. Origin GETs by the mesh: {} (seeding, \
         {:.2} s and {:.2} s). HTTPS: {}",
        r.origin_gets_mesh, r.seed_secs[0], r.seed_secs[1], r.https_cipher_suite
    );
    if let [Some(before), Some(after)] = r.load_average {
        println!(
            "load average {before:.2} before, {after:.2} after, on {} CPUs",
            r.cpus
        );
    }
}
