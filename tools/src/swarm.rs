//! Rows a and b of BENCH.md: N peers fetch one file over rate-limited links, through the mesh and
//! straight from the origin, between real network namespaces; with `--aria2`, row e too: the same
//! peers as a BitTorrent swarm.
//!
//! Each round, for each N, builds a fresh topology ([`netns`]): namespaces for the origin, the
//! supernode and N peers, each joined to a bridge by a veth pair with `tbf` shaping its upload and
//! its download, MTU 1500. The origin (`d7q-bench origin`, a [`d7q::devserver::DevServer`])
//! serves the file over HTTPS from its namespace. Then two runs (three with `--aria2`), in one
//! order in odd rounds and the reverse in even ones:
//!
//! - **mesh**: a fresh `d7q supernode` (empty store) and N fresh `d7q daemon`s, one per peer
//!   namespace; once all are ready, every peer starts `d7q get` through its daemon at once. The
//!   origin is reached only by the supernode, on the first request.
//! - **direct**: every peer starts `d7q-bench https-get` (hyper + rustls over TCP, hashing and
//!   fsyncing as `d7q get` does) straight from the origin at once.
//! - **torrent** (`--aria2`, [`torrent`]): an `opentracker` and an `aria2c` seed in the
//!   supernode's namespace — the seed, unlike the mesh's supernode, starts with the file — and
//!   every peer starts `aria2c` on a `.torrent` with the mesh's piece size at once; each keeps
//!   seeding until all are done.
//!
//! A peer's time runs from the moment the clients are started to its client's exit (for
//! `aria2c`, which keeps running, to the stamp its download-complete hook writes: no fsync and no
//! whole-file hash in it, which `d7q get` pays); a run's time is its slowest peer's. Outside the
//! timing every output is hashed and checked. Origin egress is counted by the origin (body bytes)
//! and by its link (Ethernet bytes); bytes by source come from the daemons' `/metrics`; link
//! bytes and queue drops from the kernel; machine CPU from `/proc/stat`.
//!
//! The references, from the link rates as `tbf` enforces them (Ethernet frames, so about 5% of
//! each rate is headers for either protocol): the Kumar–Ross bound with the supernode as the seed,
//! `T_min = max(F/u_s, F/min(u_o, d_s), F/min d_i, N·F/(u_s + Σu_i))` — its own upload, and the
//! origin→supernode link it is fed through — and serving directly,
//! `T_direct = max(N·F/u_o, F/min d_i)`. The ideal speedup is `T_direct / T_min`. The torrent's
//! seed needs no inflow, so its bound drops the second term (the same `T_min` unless the origin's
//! link is slower than the supernode's).
//!
//! Not measured here: loss and delay (row d; this kernel has no netem), so row e only without
//! loss; BitTorrent clients other than aria2.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use tokio::task::JoinSet;

use crate::netns::{self, LinkCounters, NodeSpec, Rates, TbfParams, Topology};
use crate::origin::Stats;
use crate::torrent;
use crate::util::{self, CpuTimes, Spread, TempDir};

/// Row a: the mesh's speedup over direct downloads, as a share of the ideal speedup.
pub const BAR_SPEEDUP: f64 = 0.8;
/// Row a: origin egress during a mesh run, in files.
pub const BAR_EGRESS: f64 = 1.05;
/// Row b: the Kumar–Ross bound over the slowest peer's time.
pub const BAR_BOUND: f64 = 0.85;
/// Row e: the mesh's slowest peer over the torrent's, below this ("faster than aria2").
pub const BAR_OVER_TORRENT: f64 = 1.0;

/// The most peers a topology holds (addresses 10..=209 of the /24).
const MAX_PEERS: usize = 200;

/// Last octets of the nodes' addresses.
const ORIGIN_HOST: u8 = 2;
const SUPERNODE_HOST: u8 = 3;
const FIRST_PEER_HOST: u8 = 10;

/// Node names (namespace suffixes and the hub's veth names).
const ORIGIN: &str = "origin";
const SUPERNODE: &str = "sn";

/// Ports inside the namespaces (each has its own, so every peer uses the same).
const ORIGIN_PORT: u16 = 8443;
const MESH_PORT: u16 = 7000;
const METRICS_PORT: u16 = 9000;

/// The file's path at the origin.
const BLOB_PATH: &str = "/blob.bin";

/// How long a process may take to print its `ready` line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The sample that decides whether the machine is idle before a run.
const IDLE_SAMPLE: Duration = Duration::from_secs(2);

/// How often a mesh run asks the origin how much it has sent.
const ORIGIN_POLL: Duration = Duration::from_millis(100);

/// Head room kept free beyond the benchmark's own files.
const DISK_MARGIN: u64 = 512 << 20;

/// Where the files go by default when they fit: a tmpfs, so the end of a run measures the links
/// and not 2·N·F bytes of fsync on one shared disk.
const SHM: &str = "/dev/shm";

/// A run may take this many times the direct model's time, plus [`TIMEOUT_SLACK`], unless
/// `--timeout-secs` says otherwise.
const TIMEOUT_FACTOR: f64 = 3.0;
const TIMEOUT_SLACK: Duration = Duration::from_secs(120);

/// `d7q-bench swarm`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Peer counts, comma-separated; every round runs each.
    #[arg(long, value_delimiter = ',', default_value = "4,8,16")]
    peers: Vec<usize>,
    /// Size of the file in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
    /// Upload and download rate of every peer's link, Mbit/s (10^6 bit/s).
    #[arg(long, default_value_t = 200)]
    link_mbit: u64,
    /// Every peer's download, Mbit/s, when it differs from its upload (BENCH.md's fleet: 50 up,
    /// 500 down); default: --link-mbit.
    #[arg(long)]
    peer_down_mbit: Option<u64>,
    /// The origin's link, Mbit/s; default: --link-mbit.
    #[arg(long)]
    origin_mbit: Option<u64>,
    /// The supernode's link, Mbit/s; default: --link-mbit.
    #[arg(long)]
    supernode_mbit: Option<u64>,
    /// Rounds; each runs mesh and direct (and torrent, with --aria2) once for every N.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Queue of every shaped link, as tbf's latency, in milliseconds.
    #[arg(long, default_value_t = 50)]
    queue_ms: u64,
    /// Where to write the JSON result.
    #[arg(long, default_value = "target/bench/swarm.json")]
    json: PathBuf,
    /// The `d7q` binary; default: next to this one.
    #[arg(long)]
    d7q: Option<PathBuf>,
    /// Parent of the temporary directory; default: /dev/shm when the files fit there, else the
    /// system's temp dir.
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Seed of the test data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest a single run may take, in seconds; default: 3× the direct model + 120 s.
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Keep every process's log here, one directory per round and N.
    #[arg(long)]
    keep_logs: Option<PathBuf>,
    /// Daemons listen on 0.0.0.0 (and must find the address to advertise themselves) instead of
    /// their namespace's address.
    #[arg(long)]
    daemon_listen_any: bool,
    /// Before each run, wait up to this long for the machine to be idle (other work below
    /// --idle-cores for a sample of 2 s); 0: never wait.
    #[arg(long, default_value_t = 60)]
    idle_wait_secs: u64,
    /// What counts as idle, in busy cores.
    #[arg(long, default_value_t = 0.3)]
    idle_cores: f64,
    /// The origin speaks HTTP/1.1 only (default: it offers h2 too, and the supernode takes it).
    #[arg(long)]
    origin_http1: bool,
    /// Also run row e's baseline each round: the same peers as an aria2c BitTorrent swarm
    /// (opentracker, the mesh's piece size, the seed on the supernode's link); needs the Debian
    /// packages aria2, opentracker and mktorrent.
    #[arg(long)]
    aria2: bool,
    /// Only remove what an interrupted run left: its namespaces and the processes in them.
    #[arg(long)]
    cleanup: bool,
}

/// Runs the `swarm` benchmark (or, with `--cleanup`, removes leftovers).
pub fn run(args: &Args) -> Result<()> {
    if args.cleanup {
        let removed = netns::cleanup()?;
        if removed.is_empty() {
            println!("nothing to clean up");
        } else {
            println!("removed namespaces: {}", removed.join(" "));
        }
        return Ok(());
    }
    ensure!(args.size_mib > 0, "--size-mib must be at least 1");
    ensure!(args.reps > 0, "--reps must be at least 1");
    ensure!(args.link_mbit > 0, "--link-mbit must be at least 1");
    ensure!(
        args.peer_down_mbit != Some(0),
        "--peer-down-mbit must be at least 1"
    );
    ensure!(!args.peers.is_empty(), "--peers needs at least one count");
    for &n in &args.peers {
        ensure!(
            (1..=MAX_PEERS).contains(&n),
            "--peers: {n} is not in 1..={MAX_PEERS}"
        );
    }
    ensure!(
        is_root()?,
        "network namespaces need root (run with sudo or as root)"
    );
    let tools = args.aria2.then(torrent::Tools::find).transpose()?;
    let bytes = args.size_mib << 20;
    let rates = LinkRates::from_args(args);
    let max_n = args.peers.iter().copied().max().unwrap_or(1) as u64;
    let d7q = match &args.d7q {
        Some(p) => p.clone(),
        None => util::sibling_binary("d7q")?,
    };
    let bins = std::fs::metadata(&d7q)?.len() + std::fs::metadata(std::env::current_exe()?)?.len();
    // The origin's file, the supernode's copy, and each peer's store and output.
    let needed = (2 + 2 * max_n) * bytes + bins + DISK_MARGIN;
    let parent = match &args.tmp_dir {
        Some(p) => p.clone(),
        None if d7q::store::free_space(Path::new(SHM)).unwrap_or(0) >= needed => SHM.into(),
        None => std::env::temp_dir(),
    };
    let free = d7q::store::free_space(&parent)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free, the benchmark needs {} MiB",
        parent.display(),
        free >> 20,
        needed >> 20
    );
    let estimate: f64 = args
        .peers
        .iter()
        .map(|&n| {
            let m = Model::new(bytes, n, &rates);
            // Direct, mesh (and torrent) at about the bound, and some seconds of set-up and
            // checking.
            let torrent = if args.aria2 {
                1.5 * m.t_min_s + 3.0
            } else {
                0.0
            };
            m.t_direct_s + 1.3 * m.t_min_s + torrent + 5.0 + 0.3 * n as f64
        })
        .sum::<f64>()
        * args.reps as f64;
    eprintln!(
        "swarm: N = {:?}, {} MiB, {} rounds, files under {}; expect about {:.0} min",
        args.peers,
        args.size_mib,
        args.reps,
        parent.display(),
        estimate / 60.0
    );

    let tmp = TempDir::new(&parent, "d7q-bench-swarm")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = bench(args, &d7q, tools, bytes, rates, tmp.path()) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow!("interrupted")),
            _ = term.recv() => Err(anyhow!("terminated")),
        }
    });
    // The runtime goes first: the children it still holds are killed and the namespaces removed
    // (dropping the bench future did), then the files.
    drop(rt);
    let leftover = netns::cleanup();
    drop(tmp);
    let report = result?;
    if let Ok(names) = leftover {
        if !names.is_empty() {
            eprintln!("removed leftover namespaces: {}", names.join(" "));
        }
    }

    print_table(&report);
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.json, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", args.json.display()))?;
    println!("JSON: {}", args.json.display());
    Ok(())
}

/// The links, bits per second.
#[derive(Clone, Copy, Debug, Serialize)]
struct LinkRates {
    origin_bps: u64,
    supernode_bps: u64,
    /// A peer's upload.
    peer_bps: u64,
    /// A peer's download.
    peer_down_bps: u64,
}

impl LinkRates {
    fn from_args(args: &Args) -> Self {
        let bps = |mbit: u64| mbit * 1_000_000;
        Self {
            origin_bps: bps(args.origin_mbit.unwrap_or(args.link_mbit)),
            supernode_bps: bps(args.supernode_mbit.unwrap_or(args.link_mbit)),
            peer_bps: bps(args.link_mbit),
            peer_down_bps: bps(args.peer_down_mbit.unwrap_or(args.link_mbit)),
        }
    }
}

/// The references for one N, in seconds, from the link rates.
#[derive(Clone, Debug, Serialize)]
struct Model {
    /// F/u_s: the seed uploads every byte at least once.
    seed_upload_s: f64,
    /// F/min(u_o, d_s): every byte reaches the seed through the origin's link and its own.
    seed_inflow_s: f64,
    /// F/min d_i: the slowest peer receives every byte.
    slowest_download_s: f64,
    /// N·F/(u_s + Σu_i): N copies leave the seed's and the peers' uploads together.
    total_upload_s: f64,
    /// The largest of the four: Kumar–Ross with the supernode as the seed.
    t_min_s: f64,
    /// Which term it is.
    binding: &'static str,
    /// The bound for a seed that starts with the file (the torrent's): `t_min_s` without the
    /// inflow term.
    t_min_seeded_s: f64,
    /// max(N·F/u_o, F/min d_i): the origin serving every peer itself.
    t_direct_s: f64,
    /// `t_direct_s / t_min_s`.
    ideal_speedup: f64,
}

impl Model {
    fn new(bytes: u64, n: usize, r: &LinkRates) -> Self {
        let f = bytes as f64 * 8.0;
        let (uo, us, ds, u, d) = (
            r.origin_bps as f64,
            r.supernode_bps as f64,
            r.supernode_bps as f64,
            r.peer_bps as f64,
            r.peer_down_bps as f64,
        );
        let n_f = n as f64;
        let terms = [
            ("F/u_s", f / us),
            ("F/min(u_o,d_s)", f / uo.min(ds)),
            ("F/min d_i", f / d),
            ("N·F/(u_s+Σu_i)", n_f * f / (us + n_f * u)),
        ];
        let (binding, t_min_s) =
            terms
                .iter()
                .copied()
                .fold(("", 0.0), |a, t| if t.1 > a.1 { t } else { a });
        let t_direct_s = (n_f * f / uo).max(f / d);
        let t_min_seeded_s = terms[0].1.max(terms[2].1).max(terms[3].1);
        Self {
            seed_upload_s: terms[0].1,
            seed_inflow_s: terms[1].1,
            slowest_download_s: terms[2].1,
            total_upload_s: terms[3].1,
            t_min_s,
            binding,
            t_min_seeded_s,
            t_direct_s,
            ideal_speedup: t_direct_s / t_min_s,
        }
    }
}

/// The bars, for the record.
#[derive(Debug, Serialize)]
struct Bars {
    speedup_over_ideal: f64,
    origin_egress_over_f: f64,
    t_min_over_t: f64,
    /// With `--aria2`: [`BAR_OVER_TORRENT`].
    #[serde(skip_serializing_if = "Option::is_none")]
    mesh_over_torrent_below: Option<f64>,
}

/// How the torrent runs were made, for the record.
#[derive(Debug, Serialize)]
struct TorrentInfo {
    /// `aria2c --version`, first line.
    aria2: String,
    /// The metainfo: the mesh's piece size, the tracker, the info hash.
    torrent: torrent::Torrent,
    /// Where the seed and the tracker run, and how the seed differs from the mesh's supernode.
    seed: &'static str,
    /// The clients' settings.
    clients: &'static str,
}

/// The JSON result.
#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    rows: &'static str,
    file_bytes: u64,
    links: LinkRates,
    /// Whether the origin offered HTTP/2 (the supernode then fetches over it).
    origin_http2: bool,
    mtu: u32,
    tbf: TbfParams,
    rounds: usize,
    order: &'static str,
    /// Which rates the bound uses.
    bound: &'static str,
    bars: Bars,
    /// Where the stores and outputs lived (a tmpfs keeps disk writes out of the timing).
    tmp_dir: String,
    d7q_binary: String,
    /// `git describe` of the working tree the benchmark ran in, `-dirty` with local changes.
    git: Option<String>,
    cpus: usize,
    /// One-minute load average before and after.
    load_average: [Option<f64>; 2],
    elapsed_s: f64,
    unix_time: u64,
    /// With `--aria2`.
    #[serde(skip_serializing_if = "Option::is_none")]
    torrent: Option<TorrentInfo>,
    results: Vec<PeersResult>,
}

/// Everything about one N.
#[derive(Debug, Serialize)]
struct PeersResult {
    peers: usize,
    model: Model,
    /// Slowest peer's time of each mesh run.
    mesh_slowest_s: Spread,
    /// Median peer's time of each mesh run.
    mesh_median_peer_s: Spread,
    direct_slowest_s: Spread,
    /// Per round: direct slowest / mesh slowest.
    speedup: Spread,
    /// Per round: speedup / ideal speedup. Bar: median ≥ [`BAR_SPEEDUP`].
    speedup_over_ideal: Spread,
    /// Per mesh run: origin body bytes / F. Bar: max ≤ [`BAR_EGRESS`].
    origin_egress_over_f: Spread,
    /// Per mesh run: T_min / slowest. Bar: median ≥ [`BAR_BOUND`].
    t_min_over_t: Spread,
    /// Per direct run: T_direct model / slowest (how close TCP gets to its own model).
    direct_model_over_t: Spread,
    /// Per mesh run: share of the peers' verified bytes that came from other peers.
    peer_share: Spread,
    /// Per mesh run: the supernode's link bytes sent / F.
    supernode_up_over_f: Spread,
    /// Per mesh run: when the origin had sent the whole file (about when the supernode had it).
    mesh_origin_sent_file_s: Option<Spread>,
    /// Per mesh run: packets dropped by upload queues and by download queues.
    mesh_up_drops: Spread,
    mesh_down_drops: Spread,
    /// Machine CPU in use during the runs, and this benchmark's processes' share, in cores.
    cpu_busy_cores_mesh: Spread,
    cpu_ours_cores_mesh: Spread,
    cpu_busy_cores_direct: Spread,
    cpu_ours_cores_direct: Spread,
    pass_speedup: bool,
    pass_egress: bool,
    pass_bound: bool,
    /// With `--aria2`, the torrent runs' figures.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    torrent_summary: Option<TorrentSummary>,
    mesh: Vec<MeshRun>,
    direct: Vec<DirectRun>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    torrent: Vec<TorrentRun>,
}

/// The torrent runs of one N.
#[derive(Debug, Serialize)]
struct TorrentSummary {
    /// Slowest peer's time of each torrent run.
    torrent_slowest_s: Spread,
    torrent_median_peer_s: Spread,
    /// Per round: mesh slowest / torrent slowest. Bar: median < [`BAR_OVER_TORRENT`].
    mesh_over_torrent: Spread,
    /// Per torrent run: the seed's bound (`model.t_min_seeded_s`) / slowest.
    torrent_t_min_over_t: Spread,
    /// Per torrent run: the supernode's link bytes sent / F (the seed's upload; the tracker's
    /// few bytes are in it).
    torrent_seed_up_over_f: Spread,
    torrent_up_drops: Spread,
    torrent_down_drops: Spread,
    cpu_busy_cores_torrent: Spread,
    cpu_ours_cores_torrent: Spread,
    pass_faster_than_aria2: bool,
}

/// One mesh run.
#[derive(Debug, Serialize)]
struct MeshRun {
    round: usize,
    /// Whether it ran before the direct run of its round.
    first: bool,
    /// Busy cores on the machine just before the run, after waiting up to --idle-wait-secs.
    busy_before_cores: f64,
    /// Each peer's time, start of all clients to its client's exit.
    peer_secs: Vec<f64>,
    slowest_s: f64,
    median_peer_s: f64,
    traffic: Traffic,
    /// Sums over the daemons' `/metrics`.
    from_peers_bytes: u64,
    from_supernode_bytes: u64,
    from_origin_bytes: u64,
    uploaded_bytes: u64,
    /// Each daemon's own counters, p1 first.
    per_peer: Vec<DaemonBytes>,
    /// When the origin had sent the whole file (its count, polled every
    /// [`ORIGIN_POLL`]): about when the supernode had it all.
    origin_sent_file_s: Option<f64>,
    /// CPU seconds (user + system) of the daemons together, the supernode, the `d7q get`s.
    daemons_cpu_s: f64,
    supernode_cpu_s: f64,
    clients_cpu_s: f64,
    /// All of this run's processes (origin included), in cores over the slowest peer's time;
    /// the rest of `traffic.cpu_busy_cores` is the kernel's packet work and other load.
    cpu_ours_cores: f64,
}

/// One direct run.
#[derive(Debug, Serialize)]
struct DirectRun {
    round: usize,
    first: bool,
    busy_before_cores: f64,
    peer_secs: Vec<f64>,
    slowest_s: f64,
    median_peer_s: f64,
    traffic: Traffic,
    clients_cpu_s: f64,
    /// As in [`MeshRun`].
    cpu_ours_cores: f64,
}

/// One torrent run.
#[derive(Debug, Serialize)]
struct TorrentRun {
    round: usize,
    /// Its place in the round's order, 1 = first.
    position: usize,
    busy_before_cores: f64,
    /// Each peer's time, start of all clients to its download-complete hook's stamp.
    peer_secs: Vec<f64>,
    slowest_s: f64,
    median_peer_s: f64,
    traffic: Traffic,
    /// CPU seconds (user + system) of the peers' `aria2c`s together, the seed's, the tracker's.
    peers_cpu_s: f64,
    seed_cpu_s: f64,
    tracker_cpu_s: f64,
    /// As in [`MeshRun`].
    cpu_ours_cores: f64,
}

/// What crossed the links during a run (first client started to last one done).
#[derive(Debug, Serialize)]
struct Traffic {
    /// Body bytes the origin sent, counted by the origin.
    origin_body_bytes: u64,
    /// GETs of the file at the origin.
    origin_gets: u64,
    /// Ethernet bytes each kind of node sent.
    origin_link_up_bytes: u64,
    supernode_link_up_bytes: u64,
    peers_link_up_bytes: u64,
    peers_link_down_bytes: u64,
    /// Packets the upload and download queues dropped, all links.
    up_drops: u64,
    down_drops: u64,
    /// Cores busy (all but idle and iowait), and those in softirq (the links themselves).
    cpu_busy_cores: f64,
    cpu_softirq_cores: f64,
    /// CPU seconds of the origin process.
    origin_cpu_s: f64,
    /// Every node's link, by name.
    links: BTreeMap<String, LinkCounters>,
}

/// The runs of one N, round by round.
type RoundRuns = (Vec<MeshRun>, Vec<DirectRun>, Vec<TorrentRun>);

/// The kinds of run a round holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunKind {
    Mesh,
    Direct,
    Torrent,
}

/// The order of a round's runs: mesh, direct (, torrent) in odd rounds, reversed in even ones,
/// so a drift in the machine's load weighs on every kind alike over two rounds.
fn run_order(round: usize, torrent: bool) -> Vec<RunKind> {
    let mut order = vec![RunKind::Mesh, RunKind::Direct];
    if torrent {
        order.push(RunKind::Torrent);
    }
    if round % 2 == 0 {
        order.reverse();
    }
    order
}

/// Fixed for the whole benchmark.
struct Ctx {
    d7q: PathBuf,
    bench: PathBuf,
    tmp: PathBuf,
    origin_root: PathBuf,
    pki: PathBuf,
    bytes: u64,
    digest_hex: String,
    rates: LinkRates,
    queue_ms: u64,
    timeout_secs: Option<u64>,
    keep_logs: Option<PathBuf>,
    daemon_listen_any: bool,
    idle_wait: Duration,
    idle_cores: f64,
    origin_http1: bool,
    /// With `--aria2`: the programs and the `.torrent` (made once: the file and the tracker's
    /// address are the same every round).
    torrent: Option<(torrent::Tools, torrent::Torrent)>,
}

async fn bench(
    args: &Args,
    d7q: &Path,
    tools: Option<torrent::Tools>,
    bytes: u64,
    rates: LinkRates,
    tmp: &Path,
) -> Result<Report> {
    let started = Instant::now();
    let git = git_describe();
    // Copies of both binaries, so a rebuild during a long run cannot mix versions.
    let bin = tmp.join("bin");
    std::fs::create_dir(&bin)?;
    let (d7q_copy, bench_copy) = (bin.join("d7q"), bin.join("d7q-bench"));
    std::fs::copy(d7q, &d7q_copy).with_context(|| format!("copying {}", d7q.display()))?;
    std::fs::copy(std::env::current_exe()?, &bench_copy)?;

    let origin_root = tmp.join("origin");
    std::fs::create_dir(&origin_root)?;
    eprintln!("generating {} MiB of test data", bytes >> 20);
    let blob = origin_root.join(BLOB_PATH.trim_start_matches('/'));
    let digest = util::write_random_file(&blob, bytes, args.seed)?;
    let torrent = match tools {
        Some(tools) => {
            let tracker = netns::address(SUPERNODE_HOST);
            let t =
                torrent::Torrent::make(&tools, &blob, tracker, &tmp.join("blob.torrent")).await?;
            Some((tools, t))
        }
        None => None,
    };

    let pki = tmp.join("pki");
    let cluster = pki.join("cluster");
    d7q_cmd(&d7q_copy, &["ca", "init", "--dir"], &[&cluster]).await?;
    let max_n = args.peers.iter().copied().max().unwrap_or(0);
    let names = std::iter::once(SUPERNODE.to_owned()).chain((1..=max_n).map(|i| format!("p{i}")));
    for name in names {
        let args = ["ca", "issue", "--name", &name, "--dir"];
        d7q_cmd(
            &d7q_copy,
            &args,
            &[&cluster, Path::new("--out"), &pki.join(&name)],
        )
        .await?;
    }

    let ctx = Ctx {
        d7q: d7q_copy,
        bench: bench_copy,
        tmp: tmp.to_path_buf(),
        origin_root,
        pki,
        bytes,
        digest_hex: util::hex(&digest),
        rates,
        queue_ms: args.queue_ms,
        timeout_secs: args.timeout_secs,
        keep_logs: args.keep_logs.clone(),
        daemon_listen_any: args.daemon_listen_any,
        idle_wait: Duration::from_secs(args.idle_wait_secs),
        idle_cores: args.idle_cores,
        origin_http1: args.origin_http1,
        torrent,
    };
    let load_before = util::load_average();
    let mut runs: HashMap<usize, RoundRuns> = HashMap::new();
    for round in 1..=args.reps {
        for &n in &args.peers {
            let (mesh, direct, torrent) = ctx
                .round(n, round, args.reps)
                .await
                .with_context(|| format!("round {round}, N = {n}"))?;
            let entry = runs.entry(n).or_default();
            entry.0.push(mesh);
            entry.1.push(direct);
            entry.2.extend(torrent);
        }
    }
    let results = args
        .peers
        .iter()
        .filter_map(|n| {
            let (mesh, direct, torrent) = runs.remove(n)?;
            Some(summarize(
                *n,
                bytes,
                Model::new(bytes, *n, &rates),
                mesh,
                direct,
                torrent,
            ))
        })
        .collect();
    let slowest_link = rates
        .peer_bps
        .min(rates.peer_down_bps)
        .min(rates.origin_bps)
        .min(rates.supernode_bps);
    let torrent = ctx.torrent.as_ref().map(|(tools, t)| TorrentInfo {
        aria2: tools.aria2_version.clone(),
        torrent: t.clone(),
        seed: "aria2c and opentracker in the supernode's namespace (the supernode's link); the \
               seed starts with the file, where the mesh's supernode fetches it from the origin \
               during the run, so its bound is t_min_seeded_s",
        clients: "aria2c per peer, all started at once: DHT and LPD off, peer exchange on, no \
                  upload limit, --file-allocation=none, --seed-ratio=0.0 (seeding until every \
                  peer is done); otherwise aria2's defaults",
    });
    Ok(Report {
        benchmark: "swarm",
        rows: if torrent.is_some() { "a, b, e" } else { "a, b" },
        file_bytes: bytes,
        links: rates,
        origin_http2: !args.origin_http1,
        mtu: netns::MTU,
        tbf: TbfParams {
            queue_ms: args.queue_ms,
            burst_bytes_min: netns::burst_bytes(slowest_link),
        },
        rounds: args.reps,
        order: if torrent.is_some() {
            "each round: for each N a fresh topology and origin, then mesh, direct and torrent \
             (in that order in odd rounds, reversed in even ones)"
        } else {
            "each round: for each N a fresh topology and origin, then mesh and direct \
             (mesh first in odd rounds, direct first in even ones)"
        },
        bound: "seed = the supernode: u_s = its upload; its inflow min(origin upload, supernode \
                download) bounds it too; u_i = d_i = the peers' link rate; rates as tbf \
                enforces them (Ethernet frames, headers included)",
        bars: Bars {
            speedup_over_ideal: BAR_SPEEDUP,
            origin_egress_over_f: BAR_EGRESS,
            t_min_over_t: BAR_BOUND,
            mesh_over_torrent_below: torrent.is_some().then_some(BAR_OVER_TORRENT),
        },
        tmp_dir: tmp.display().to_string(),
        d7q_binary: d7q.display().to_string(),
        git,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average: [load_before, util::load_average()],
        elapsed_s: started.elapsed().as_secs_f64(),
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        torrent,
        results,
    })
}

impl Ctx {
    /// One round for one N: a fresh topology and origin, the mesh run, the direct run and, with
    /// `--aria2`, the torrent run. With `--keep-logs`, every process's log is kept whether the
    /// round succeeded or not.
    async fn round(
        &self,
        n: usize,
        round: usize,
        rounds: usize,
    ) -> Result<(MeshRun, DirectRun, Option<TorrentRun>)> {
        let dir = self.tmp.join("round");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir)?;
        let result = self.run_round(n, round, rounds, &dir).await;
        if let Some(keep) = &self.keep_logs {
            let dest = keep.join(format!("round{round}-n{n}"));
            if let Err(e) = copy_logs(&dir, &dest) {
                eprintln!("d7q-bench: keeping the logs in {}: {e:#}", dest.display());
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    async fn run_round(
        &self,
        n: usize,
        round: usize,
        rounds: usize,
        dir: &Path,
    ) -> Result<(MeshRun, DirectRun, Option<TorrentRun>)> {
        let dir = dir.to_path_buf();
        let mut topo = Topology::build(self.nodes(n), self.queue_ms)?;
        let mut origin = OriginProc::start(self, &topo, &dir).await?;
        let model = Model::new(self.bytes, n, &self.rates);
        let timeout = self.timeout_secs.map_or_else(
            || Duration::from_secs_f64(model.t_direct_s * TIMEOUT_FACTOR) + TIMEOUT_SLACK,
            Duration::from_secs,
        );
        let order = run_order(round, self.torrent.is_some());
        let (mut mesh, mut direct, mut torrent) = (None, None, None);
        for (i, kind) in order.iter().enumerate() {
            match kind {
                RunKind::Mesh => {
                    let m = self.mesh(n, &topo, &mut origin, &dir, timeout).await?;
                    log_mesh(round, rounds, n, &m, &model, self.bytes);
                    mesh = Some(m);
                }
                RunKind::Direct => {
                    let d = self.direct(n, &topo, &mut origin, &dir, timeout).await?;
                    log_direct(round, rounds, n, &d, &model);
                    direct = Some(d);
                }
                RunKind::Torrent => {
                    let t = self.torrent(n, &topo, &mut origin, &dir, timeout).await?;
                    log_torrent(round, rounds, n, &t, &model, self.bytes);
                    torrent = Some(TorrentRun {
                        round,
                        position: i + 1,
                        ..t
                    });
                }
            }
        }
        origin.stop().await;
        topo.teardown()?;
        let mesh_first = order[0] == RunKind::Mesh;
        Ok((
            MeshRun {
                round,
                first: mesh_first,
                ..mesh.context("no mesh run")?
            },
            DirectRun {
                round,
                first: !mesh_first,
                ..direct.context("no direct run")?
            },
            torrent,
        ))
    }

    fn nodes(&self, n: usize) -> Vec<NodeSpec> {
        let both = |bps| Rates {
            up_bps: bps,
            down_bps: bps,
        };
        let mut nodes = vec![
            NodeSpec {
                name: ORIGIN.into(),
                host: ORIGIN_HOST,
                rates: both(self.rates.origin_bps),
            },
            NodeSpec {
                name: SUPERNODE.into(),
                host: SUPERNODE_HOST,
                rates: both(self.rates.supernode_bps),
            },
        ];
        nodes.extend((1..=n).map(|i| NodeSpec {
            name: format!("p{i}"),
            host: FIRST_PEER_HOST + (i - 1) as u8,
            rates: Rates {
                up_bps: self.rates.peer_bps,
                down_bps: self.rates.peer_down_bps,
            },
        }));
        nodes
    }

    /// The mesh run: a fresh supernode and N fresh daemons, then N `d7q get`s at once.
    async fn mesh(
        &self,
        n: usize,
        topo: &Topology,
        origin: &mut OriginProc,
        round_dir: &Path,
        timeout: Duration,
    ) -> Result<MeshRun> {
        let dir = round_dir.join("mesh");
        std::fs::create_dir(&dir)?;
        let sn_log = dir.join("supernode.log");
        let sn_listen = format!("{}:{MESH_PORT}", topo.addr(SUPERNODE)?);
        let mut cmd = Topology::command(SUPERNODE, &self.d7q);
        cmd.args(["supernode", "--listen", &sn_listen, "--data-dir"])
            .arg(dir.join("supernode-store"))
            .arg("--pki")
            .arg(self.pki.join(SUPERNODE))
            .arg("--origin-ca")
            .arg(&origin.ca);
        let (mut supernode, ready) = spawn_ready(cmd, &sn_log, "d7q supernode").await?;
        let mesh_addr = ready_field(&ready, "mesh")
            .with_context(|| format!("supernode said {ready:?}"))?
            .to_owned();

        let mut daemons = Vec::new();
        for i in 1..=n {
            let name = format!("p{i}");
            let pdir = dir.join(&name);
            std::fs::create_dir(&pdir)?;
            let mut cmd = Topology::command(&name, &self.d7q);
            let listen = if self.daemon_listen_any {
                format!("0.0.0.0:{MESH_PORT}")
            } else {
                format!("{}:{MESH_PORT}", topo.addr(&name)?)
            };
            cmd.args(["daemon", "--listen", &listen])
                .args(["--proxy", &format!("127.0.0.1:{METRICS_PORT}")])
                .arg("--data-dir")
                .arg(pdir.join("store"))
                .arg("--pki")
                .arg(self.pki.join(&name))
                .args(["--supernode", &mesh_addr])
                .arg("--socket")
                .arg(pdir.join("d7q.sock"))
                // Every namespace shares the host name, the default host label.
                .args(["--host", &name]);
            let log = pdir.join("daemon.log");
            let (child, _) = spawn_ready(cmd, &log, &format!("d7q daemon in {name}")).await?;
            daemons.push(child);
        }

        let url = origin.url(BLOB_PATH);
        let clients = (1..=n)
            .map(|i| {
                let pdir = dir.join(format!("p{i}"));
                let mut cmd = Topology::command(&format!("p{i}"), &self.d7q);
                cmd.args(["get", &url, "-o"])
                    .arg(pdir.join("out.bin"))
                    .arg("--daemon")
                    .arg(pdir.join("d7q.sock"))
                    .arg("-q");
                cmd
            })
            .collect();
        let busy_before_cores = self.wait_idle().await?;
        let before = Snapshot::take(topo, origin).await?;
        let (done, origin_sent_file_s) = run_watching_origin(
            clients,
            timeout,
            origin,
            before.origin.body_bytes + self.bytes,
        )
        .await;
        let after = Snapshot::take(topo, origin).await?;
        let (times, clients_cpu) = done?;

        let cpu_of = |c: &Child| {
            c.id()
                .and_then(|pid| CpuTimes::of_pid(pid).ok())
                .map_or(0.0, |t| t.total())
        };
        let daemons_cpu_s: f64 = daemons.iter().map(cpu_of).sum();
        let supernode_cpu_s = cpu_of(&supernode);
        let mut bytes = DaemonBytes::default();
        let mut per_peer = Vec::new();
        for i in 1..=n {
            let text = self.scrape(&format!("p{i}")).await?;
            let one = DaemonBytes::parse(&text);
            bytes.add(&one);
            per_peer.push(one);
        }
        for c in daemons.iter_mut().chain(std::iter::once(&mut supernode)) {
            let _ = c.start_kill();
            let _ = c.wait().await;
        }

        let failure_context = |i: usize| {
            format!(
                "{}\n{}",
                util::log_tail(&dir.join(format!("p{i}/daemon.log")), "its daemon"),
                util::log_tail(&sn_log, "the supernode")
            )
        };
        let outputs = (1..=n).map(|i| dir.join(format!("p{i}/out.bin"))).collect();
        self.check_outputs("d7q get", &times, outputs, failure_context)
            .await?;
        let peer_secs: Vec<f64> = times.iter().map(|t| t.0).collect();
        let traffic = after.traffic_since(&before, n);
        let slowest_s = max(&peer_secs);
        let ours = daemons_cpu_s + supernode_cpu_s + clients_cpu.total() + traffic.origin_cpu_s;
        // The stores go now; the logs stay until the round ends.
        let _ = std::fs::remove_dir_all(dir.join("supernode-store"));
        for i in 1..=n {
            let _ = std::fs::remove_dir_all(dir.join(format!("p{i}/store")));
        }
        Ok(MeshRun {
            round: 0,
            first: false,
            busy_before_cores,
            slowest_s,
            median_peer_s: Spread::of(&peer_secs).map_or(f64::NAN, |s| s.median),
            peer_secs,
            traffic,
            from_peers_bytes: bytes.from_peer,
            from_supernode_bytes: bytes.from_supernode,
            from_origin_bytes: bytes.from_origin,
            uploaded_bytes: bytes.uploaded,
            per_peer,
            origin_sent_file_s,
            daemons_cpu_s,
            supernode_cpu_s,
            clients_cpu_s: clients_cpu.total(),
            cpu_ours_cores: ours / slowest_s,
        })
    }

    /// The direct run: N `https-get`s from the origin at once.
    async fn direct(
        &self,
        n: usize,
        topo: &Topology,
        origin: &mut OriginProc,
        round_dir: &Path,
        timeout: Duration,
    ) -> Result<DirectRun> {
        let dir = round_dir.join("direct");
        std::fs::create_dir(&dir)?;
        let url = origin.url(BLOB_PATH);
        let outputs: Vec<PathBuf> = (1..=n).map(|i| dir.join(format!("p{i}.bin"))).collect();
        let clients = outputs
            .iter()
            .enumerate()
            .map(|(i, out)| {
                let mut cmd = Topology::command(&format!("p{}", i + 1), &self.bench);
                cmd.args(["https-get", &url, "--sha256", "--ca"])
                    .arg(&origin.ca)
                    .arg("-o")
                    .arg(out);
                cmd
            })
            .collect();
        let busy_before_cores = self.wait_idle().await?;
        let before = Snapshot::take(topo, origin).await?;
        let done = run_clients(clients, timeout).await;
        let after = Snapshot::take(topo, origin).await?;
        let (times, clients_cpu) = done?;
        let origin_log = origin.log.clone();
        self.check_outputs("https-get", &times, outputs, |_| {
            util::log_tail(&origin_log, "the origin")
        })
        .await?;
        let peer_secs: Vec<f64> = times.iter().map(|t| t.0).collect();
        let traffic = after.traffic_since(&before, n);
        let slowest_s = max(&peer_secs);
        Ok(DirectRun {
            round: 0,
            first: false,
            busy_before_cores,
            slowest_s,
            median_peer_s: Spread::of(&peer_secs).map_or(f64::NAN, |s| s.median),
            peer_secs,
            cpu_ours_cores: (traffic.origin_cpu_s + clients_cpu.total()) / slowest_s,
            traffic,
            clients_cpu_s: clients_cpu.total(),
        })
    }

    /// The torrent run: a tracker and a seed holding the file in the supernode's namespace, then
    /// N `aria2c`s at once, each seeding on until the last is done.
    async fn torrent(
        &self,
        n: usize,
        topo: &Topology,
        origin: &mut OriginProc,
        round_dir: &Path,
        timeout: Duration,
    ) -> Result<TorrentRun> {
        let (tools, meta) = self
            .torrent
            .as_ref()
            .context("a torrent run without --aria2")?;
        let dir = round_dir.join("torrent");
        std::fs::create_dir(&dir)?;
        let blob = self.origin_root.join(BLOB_PATH.trim_start_matches('/'));
        let sn = topo.addr(SUPERNODE)?;
        let mut seeded =
            torrent::Seeded::start(tools, meta, SUPERNODE, sn, &blob, &dir, &self.bench).await?;
        let nodes: Vec<String> = (1..=n).map(|i| format!("p{i}")).collect();
        let busy_before_cores = self.wait_idle().await?;
        let before = Snapshot::take(topo, origin).await?;
        let mut peers = torrent::Peers::start(tools, meta, &nodes, &dir)?;
        let done = peers.wait_done(&mut seeded, timeout).await;
        let after = Snapshot::take(topo, origin).await;
        let peers_cpu_s = peers.cpu_s();
        let (seed_cpu_s, tracker_cpu_s) = seeded.cpu_s();
        peers.stop().await;
        seeded.stop().await;
        let (peer_secs, after) = (done?, after?);
        self.check_files("aria2c", peers.outputs()).await?;
        let traffic = after.traffic_since(&before, n);
        let slowest_s = max(&peer_secs);
        let ours = peers_cpu_s + seed_cpu_s + tracker_cpu_s + traffic.origin_cpu_s;
        Ok(TorrentRun {
            round: 0,
            position: 0,
            busy_before_cores,
            slowest_s,
            median_peer_s: Spread::of(&peer_secs).map_or(f64::NAN, |s| s.median),
            peer_secs,
            traffic,
            peers_cpu_s,
            seed_cpu_s,
            tracker_cpu_s,
            cpu_ours_cores: ours / slowest_s,
        })
    }

    /// Every client succeeded and wrote the file; the outputs are hashed here, then removed.
    async fn check_outputs(
        &self,
        what: &str,
        times: &[(f64, Output)],
        outputs: Vec<PathBuf>,
        context: impl Fn(usize) -> String,
    ) -> Result<()> {
        for (i, (_, out)) in times.iter().enumerate() {
            util::check_success(&format!("{what} in p{}", i + 1), out)
                .map_err(|e| e.context(context(i + 1)))?;
        }
        self.check_files(what, outputs).await
    }

    /// Every output, p1 first, is the file: hashed here, then removed.
    async fn check_files(&self, what: &str, outputs: Vec<PathBuf>) -> Result<()> {
        let mut hashes = JoinSet::new();
        for (i, path) in outputs.into_iter().enumerate() {
            hashes.spawn_blocking(move || {
                let digest = util::sha256_file(&path).map(|d| util::hex(&d));
                let len = std::fs::metadata(&path).map_or(0, |m| m.len());
                let _ = std::fs::remove_file(&path);
                (i, len, digest)
            });
        }
        while let Some(joined) = hashes.join_next().await {
            let (i, len, digest) = joined?;
            let digest = digest?;
            ensure!(
                len == self.bytes && digest == self.digest_hex,
                "{what} in p{}: {len} bytes with digest {digest}, expected {} bytes with {}",
                i + 1,
                self.bytes,
                self.digest_hex
            );
        }
        Ok(())
    }

    /// Waits until the machine is idle (busy below --idle-cores over [`IDLE_SAMPLE`]), at most
    /// --idle-wait-secs; returns the busy cores of the last sample.
    async fn wait_idle(&self) -> Result<f64> {
        let deadline = Instant::now() + self.idle_wait;
        let mut said = false;
        loop {
            let a = MachineCpu::read()?;
            tokio::time::sleep(IDLE_SAMPLE).await;
            let (busy, _) = MachineCpu::read()?.since(&a);
            if busy < self.idle_cores || Instant::now() >= deadline {
                if said {
                    eprintln!("  going on at {busy:.2} busy cores");
                }
                return Ok(busy);
            }
            if !said {
                eprintln!(
                    "  waiting for other work to end ({busy:.2} cores busy, up to {:?})",
                    self.idle_wait
                );
                said = true;
            }
        }
    }

    /// A daemon's `/metrics`, read from inside its namespace.
    async fn scrape(&self, node: &str) -> Result<String> {
        let mut cmd = Topology::command(node, &self.bench);
        cmd.args(["scrape", &format!("127.0.0.1:{METRICS_PORT}"), "/metrics"]);
        let out = util::run_timed(&mut cmd, READY_TIMEOUT).await?;
        util::check_success(&format!("scraping {node}'s metrics"), &out.output)?;
        Ok(String::from_utf8_lossy(&out.output.stdout).into_owned())
    }
}

/// The origin process in its namespace, and the pipe to ask it for its counters.
struct OriginProc {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// The URL of `/`.
    base: String,
    /// Its CA certificate, for the clients.
    ca: PathBuf,
    log: PathBuf,
}

impl OriginProc {
    async fn start(ctx: &Ctx, topo: &Topology, dir: &Path) -> Result<Self> {
        let ca = dir.join("origin-ca.pem");
        let log = dir.join("origin.log");
        let mut child = Topology::command(ORIGIN, &ctx.bench)
            .arg("origin")
            .arg("--root")
            .arg(&ctx.origin_root)
            .args(["--listen", &format!("{}:{ORIGIN_PORT}", topo.addr(ORIGIN)?)])
            .arg("--ca-out")
            .arg(&ca)
            .args(ctx.origin_http1.then_some("--http1-only"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning the origin")?;
        let stdin = child.stdin.take().context("origin stdin")?;
        let mut stdout = BufReader::new(child.stdout.take().context("origin stdout")?).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, stdout.next_line())
            .await
            .map_err(|_| anyhow!("the origin was not ready within {READY_TIMEOUT:?}"))??;
        let base = line
            .as_deref()
            .and_then(|l| l.strip_prefix("ready "))
            .with_context(|| format!("origin said {line:?}; {}", util::log_tail(&log, "its log")))?
            .trim_end_matches('/')
            .to_owned();
        Ok(Self {
            child,
            stdin,
            stdout,
            base,
            ca,
            log,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn stats(&mut self) -> Result<Stats> {
        self.stdin
            .write_all(format!("stats {BLOB_PATH}\n").as_bytes())
            .await?;
        self.stdin.flush().await?;
        let line = tokio::time::timeout(READY_TIMEOUT, self.stdout.next_line())
            .await
            .map_err(|_| anyhow!("the origin did not answer `stats`"))??
            .context("the origin exited")?;
        serde_json::from_str(&line).with_context(|| format!("origin said {line:?}"))
    }

    fn cpu(&self) -> Result<CpuTimes> {
        CpuTimes::of_pid(self.child.id().context("the origin exited")?)
    }

    /// Closes its stdin, which ends it; kills it if it lingers.
    async fn stop(mut self) {
        drop(self.stdin);
        if tokio::time::timeout(READY_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// Counters read just before the clients start and just after the last one ends.
struct Snapshot {
    origin: Stats,
    origin_cpu: CpuTimes,
    links: HashMap<String, LinkCounters>,
    cpu: MachineCpu,
}

impl Snapshot {
    async fn take(topo: &Topology, origin: &mut OriginProc) -> Result<Self> {
        Ok(Self {
            origin: origin.stats().await?,
            origin_cpu: origin.cpu()?,
            links: topo.counters()?,
            cpu: MachineCpu::read()?,
        })
    }

    fn traffic_since(&self, before: &Snapshot, n: usize) -> Traffic {
        let link = |name: &str| {
            let zero = LinkCounters::default();
            let a = before.links.get(name).unwrap_or(&zero);
            self.links.get(name).unwrap_or(&zero).since(a)
        };
        let all: Vec<LinkCounters> = self.links.keys().map(|k| link(k)).collect();
        let peers: Vec<LinkCounters> = (1..=n).map(|i| link(&format!("p{i}"))).collect();
        let (busy, softirq) = self.cpu.since(&before.cpu);
        Traffic {
            origin_body_bytes: self.origin.body_bytes - before.origin.body_bytes,
            origin_gets: self.origin.gets - before.origin.gets,
            origin_link_up_bytes: link(ORIGIN).up_bytes,
            supernode_link_up_bytes: link(SUPERNODE).up_bytes,
            peers_link_up_bytes: peers.iter().map(|c| c.up_bytes).sum(),
            peers_link_down_bytes: peers.iter().map(|c| c.down_bytes).sum(),
            up_drops: all.iter().map(|c| c.up_drops).sum(),
            down_drops: all.iter().map(|c| c.down_drops).sum(),
            cpu_busy_cores: busy,
            cpu_softirq_cores: softirq,
            origin_cpu_s: self.origin_cpu.since(before.origin_cpu).total(),
            links: self.links.keys().map(|k| (k.clone(), link(k))).collect(),
        }
    }
}

/// The machine's CPU counters (`/proc/stat`, first line), in clock ticks.
#[derive(Clone, Copy, Debug, Default)]
struct MachineCpu {
    total: u64,
    idle: u64,
    softirq: u64,
}

impl MachineCpu {
    fn read() -> Result<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat")?).context("parsing /proc/stat")
    }

    /// `cpu  user nice system idle iowait irq softirq steal …`.
    fn parse(text: &str) -> Option<Self> {
        let line = text.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        (v.len() == 8).then(|| Self {
            total: v.iter().sum(),
            idle: v[3] + v[4],
            softirq: v[6],
        })
    }

    /// Cores busy, and cores in softirq, on average since `earlier`.
    fn since(&self, earlier: &MachineCpu) -> (f64, f64) {
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        let idle = self.idle.saturating_sub(earlier.idle) as f64;
        let softirq = self.softirq.saturating_sub(earlier.softirq) as f64;
        ((total - idle) / total * cpus, softirq / total * cpus)
    }
}

/// The byte counters of one daemon's `/metrics`, or their sum over several.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
struct DaemonBytes {
    from_peer: u64,
    from_supernode: u64,
    from_origin: u64,
    uploaded: u64,
}

impl DaemonBytes {
    /// Reads the Prometheus text format; unknown series are ignored.
    fn parse(text: &str) -> Self {
        let mut b = Self::default();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let slot = match series.trim() {
                r#"d7q_download_bytes_total{source="peer"}"# => &mut b.from_peer,
                r#"d7q_download_bytes_total{source="supernode"}"# => &mut b.from_supernode,
                r#"d7q_download_bytes_total{source="origin"}"# => &mut b.from_origin,
                "d7q_upload_bytes_total" => &mut b.uploaded,
                _ => continue,
            };
            *slot = value as u64;
        }
        b
    }

    fn add(&mut self, o: &DaemonBytes) {
        self.from_peer += o.from_peer;
        self.from_supernode += o.from_supernode;
        self.from_origin += o.from_origin;
        self.uploaded += o.uploaded;
    }

    fn peer_share(&self) -> f64 {
        let total = self.from_peer + self.from_supernode + self.from_origin;
        self.from_peer as f64 / total.max(1) as f64
    }
}

/// Starts `cmd` with its stderr into `log` and waits for a stdout line starting `ready`, which it
/// returns; later stdout is drained so the child never blocks on it.
async fn spawn_ready(mut cmd: Command, log: &Path, what: &str) -> Result<(Child, String)> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log)?)
        .kill_on_drop(true)
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
        Ok(Ok(None)) => bail!(
            "{what} exited before it was ready\n{}",
            util::log_tail(log, "log")
        ),
        Ok(Err(e)) => return Err(e.context(format!("reading {what}'s stdout"))),
        Err(_) => bail!("{what} not ready within {READY_TIMEOUT:?}"),
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line))
}

/// Starts every client at once; returns, in order, each one's seconds from the common start to
/// its exit with its output, and the CPU they used together.
async fn run_clients(
    cmds: Vec<Command>,
    timeout: Duration,
) -> Result<(Vec<(f64, Output)>, CpuTimes)> {
    let n = cmds.len();
    // No other child is reaped meanwhile: the daemons and the origin outlive the clients.
    let cpu_before = CpuTimes::of_children()?;
    let start = Instant::now();
    let mut set = JoinSet::new();
    for (i, mut cmd) in cmds.into_iter().enumerate() {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        set.spawn(async move {
            let out = child.wait_with_output().await;
            (i, start.elapsed().as_secs_f64(), out)
        });
    }
    let mut results: Vec<Option<(f64, Output)>> = (0..n).map(|_| None).collect();
    let collect = async {
        while let Some(joined) = set.join_next().await {
            let (i, secs, out) = joined?;
            results[i] = Some((secs, out.context("waiting for a client")?));
        }
        Ok::<_, anyhow::Error>(())
    };
    match tokio::time::timeout(timeout, collect).await {
        Ok(r) => r?,
        Err(_) => bail!("the clients did not all finish within {timeout:?}"),
    }
    let cpu = CpuTimes::of_children()?.since(cpu_before);
    let results = results
        .into_iter()
        .map(|r| r.context("a client was lost"))
        .collect::<Result<_>>()?;
    Ok((results, cpu))
}

/// The value of `key=VALUE` in a `ready …` line.
fn ready_field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// [`run_clients`], asking the origin for its count every [`ORIGIN_POLL`] meanwhile; also
/// returns the seconds until the count first reached `sent`.
async fn run_watching_origin(
    cmds: Vec<Command>,
    timeout: Duration,
    origin: &mut OriginProc,
    sent: u64,
) -> (Result<(Vec<(f64, Output)>, CpuTimes)>, Option<f64>) {
    let start = Instant::now();
    let clients = run_clients(cmds, timeout);
    tokio::pin!(clients);
    let mut reached = None;
    loop {
        tokio::select! {
            r = &mut clients => return (r, reached),
            // The clients' times are taken by their own tasks, so this arm delays nothing.
            _ = tokio::time::sleep(ORIGIN_POLL), if reached.is_none() => {
                match origin.stats().await {
                    Ok(s) if s.body_bytes >= sent => {
                        reached = Some(start.elapsed().as_secs_f64());
                    }
                    Ok(_) => {}
                    Err(e) => return (Err(e), None),
                }
            }
        }
    }
}

/// Runs `d7q ARGS PATHS…` to completion.
async fn d7q_cmd(d7q: &Path, args: &[&str], paths: &[&Path]) -> Result<()> {
    let mut cmd = Command::new(d7q);
    cmd.args(args).args(paths);
    let out = util::run_timed(&mut cmd, READY_TIMEOUT).await?;
    util::check_success(&format!("d7q {}", args.join(" ")), &out.output)
}

/// Copies every `*.log` under `dir` (two levels) to `dest`, named by their path with `/` as `-`.
fn copy_logs(dir: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest)?;
    let mut stack = vec![(dir.to_path_buf(), 0)];
    while let Some((d, depth)) = stack.pop() {
        for entry in std::fs::read_dir(&d)? {
            let path = entry?.path();
            if path.is_dir() && depth < 2 {
                stack.push((path, depth + 1));
            } else if path.extension().is_some_and(|e| e == "log") {
                let rel = path.strip_prefix(dir)?.to_string_lossy().replace('/', "-");
                std::fs::copy(&path, dest.join(rel))?;
            }
        }
    }
    Ok(())
}

/// `git describe --always --dirty` of the current directory, if it is a checkout.
fn git_describe() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether this process runs as root (uid 0).
fn is_root() -> Result<bool> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        == Some("0"))
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NAN, f64::max)
}

fn summarize(
    n: usize,
    bytes: u64,
    model: Model,
    mesh: Vec<MeshRun>,
    direct: Vec<DirectRun>,
    torrent: Vec<TorrentRun>,
) -> PeersResult {
    let spread = |v: Vec<f64>| Spread::of(&v).expect("at least one round");
    let torrent_summary = (!torrent.is_empty()).then(|| {
        let mesh_over_torrent = spread(
            torrent
                .iter()
                .filter_map(|t| {
                    let m = mesh.iter().find(|m| m.round == t.round)?;
                    Some(m.slowest_s / t.slowest_s)
                })
                .collect(),
        );
        TorrentSummary {
            torrent_slowest_s: spread(torrent.iter().map(|t| t.slowest_s).collect()),
            torrent_median_peer_s: spread(torrent.iter().map(|t| t.median_peer_s).collect()),
            pass_faster_than_aria2: mesh_over_torrent.median < BAR_OVER_TORRENT,
            mesh_over_torrent,
            torrent_t_min_over_t: spread(
                torrent
                    .iter()
                    .map(|t| model.t_min_seeded_s / t.slowest_s)
                    .collect(),
            ),
            torrent_seed_up_over_f: spread(
                torrent
                    .iter()
                    .map(|t| t.traffic.supernode_link_up_bytes as f64 / bytes as f64)
                    .collect(),
            ),
            torrent_up_drops: spread(torrent.iter().map(|t| t.traffic.up_drops as f64).collect()),
            torrent_down_drops: spread(
                torrent
                    .iter()
                    .map(|t| t.traffic.down_drops as f64)
                    .collect(),
            ),
            cpu_busy_cores_torrent: spread(
                torrent.iter().map(|t| t.traffic.cpu_busy_cores).collect(),
            ),
            cpu_ours_cores_torrent: spread(torrent.iter().map(|t| t.cpu_ours_cores).collect()),
        }
    });
    let f = bytes as f64;
    // Rounds pair one mesh run with one direct run.
    let speedups: Vec<f64> = mesh
        .iter()
        .zip(&direct)
        .map(|(m, d)| d.slowest_s / m.slowest_s)
        .collect();
    let speedup = spread(speedups.clone());
    let speedup_over_ideal = spread(speedups.iter().map(|s| s / model.ideal_speedup).collect());
    let t_min_over_t = spread(mesh.iter().map(|m| model.t_min_s / m.slowest_s).collect());
    let egress = spread(
        mesh.iter()
            .map(|m| m.traffic.origin_body_bytes as f64 / f)
            .collect(),
    );
    PeersResult {
        peers: n,
        mesh_slowest_s: spread(mesh.iter().map(|m| m.slowest_s).collect()),
        mesh_median_peer_s: spread(mesh.iter().map(|m| m.median_peer_s).collect()),
        direct_slowest_s: spread(direct.iter().map(|d| d.slowest_s).collect()),
        pass_speedup: speedup_over_ideal.median >= BAR_SPEEDUP,
        pass_egress: egress.max <= BAR_EGRESS,
        pass_bound: t_min_over_t.median >= BAR_BOUND,
        speedup,
        speedup_over_ideal,
        origin_egress_over_f: egress,
        t_min_over_t,
        direct_model_over_t: spread(
            direct
                .iter()
                .map(|d| model.t_direct_s / d.slowest_s)
                .collect(),
        ),
        peer_share: spread(
            mesh.iter()
                .map(|m| {
                    DaemonBytes {
                        from_peer: m.from_peers_bytes,
                        from_supernode: m.from_supernode_bytes,
                        from_origin: m.from_origin_bytes,
                        uploaded: m.uploaded_bytes,
                    }
                    .peer_share()
                })
                .collect(),
        ),
        supernode_up_over_f: spread(
            mesh.iter()
                .map(|m| m.traffic.supernode_link_up_bytes as f64 / f)
                .collect(),
        ),
        mesh_origin_sent_file_s: Spread::of(
            &mesh
                .iter()
                .filter_map(|m| m.origin_sent_file_s)
                .collect::<Vec<_>>(),
        ),
        mesh_up_drops: spread(mesh.iter().map(|m| m.traffic.up_drops as f64).collect()),
        mesh_down_drops: spread(mesh.iter().map(|m| m.traffic.down_drops as f64).collect()),
        cpu_busy_cores_mesh: spread(mesh.iter().map(|m| m.traffic.cpu_busy_cores).collect()),
        cpu_ours_cores_mesh: spread(mesh.iter().map(|m| m.cpu_ours_cores).collect()),
        cpu_ours_cores_direct: spread(direct.iter().map(|d| d.cpu_ours_cores).collect()),
        cpu_busy_cores_direct: spread(direct.iter().map(|d| d.traffic.cpu_busy_cores).collect()),
        torrent_summary,
        model,
        mesh,
        direct,
        torrent,
    }
}

fn log_mesh(round: usize, rounds: usize, n: usize, m: &MeshRun, model: &Model, bytes: u64) {
    let total = m.from_peers_bytes + m.from_supernode_bytes + m.from_origin_bytes;
    eprintln!(
        "round {round}/{rounds} N={n:<3} mesh   slowest {:7.2} s (median peer {:7.2} s)  \
         T_min/T {:.2}  origin done {:5.2} s  origin egress {:.3} F  from peers {:3.0}%  \
         supernode sent {:.2} F  drops {}/{}  CPU {:.2} cores ({:.2} ours, {:.2} before)",
        m.slowest_s,
        m.median_peer_s,
        model.t_min_s / m.slowest_s,
        m.origin_sent_file_s.unwrap_or(f64::NAN),
        m.traffic.origin_body_bytes as f64 / bytes as f64,
        100.0 * m.from_peers_bytes as f64 / total.max(1) as f64,
        m.traffic.supernode_link_up_bytes as f64 / bytes as f64,
        m.traffic.up_drops,
        m.traffic.down_drops,
        m.traffic.cpu_busy_cores,
        m.cpu_ours_cores,
        m.busy_before_cores
    );
}

fn log_direct(round: usize, rounds: usize, n: usize, d: &DirectRun, model: &Model) {
    eprintln!(
        "round {round}/{rounds} N={n:<3} direct slowest {:7.2} s (median peer {:7.2} s)  \
         model/T {:.2}  drops {}/{}  CPU {:.2} cores ({:.2} ours, {:.2} before)",
        d.slowest_s,
        d.median_peer_s,
        model.t_direct_s / d.slowest_s,
        d.traffic.up_drops,
        d.traffic.down_drops,
        d.traffic.cpu_busy_cores,
        d.cpu_ours_cores,
        d.busy_before_cores
    );
}

fn log_torrent(round: usize, rounds: usize, n: usize, t: &TorrentRun, model: &Model, bytes: u64) {
    eprintln!(
        "round {round}/{rounds} N={n:<3} aria2  slowest {:7.2} s (median peer {:7.2} s)  \
         T_min/T {:.2}  seed sent {:.2} F  drops {}/{}  CPU {:.2} cores ({:.2} ours, {:.2} before)",
        t.slowest_s,
        t.median_peer_s,
        model.t_min_seeded_s / t.slowest_s,
        t.traffic.supernode_link_up_bytes as f64 / bytes as f64,
        t.traffic.up_drops,
        t.traffic.down_drops,
        t.traffic.cpu_busy_cores,
        t.cpu_ours_cores,
        t.busy_before_cores
    );
}

fn print_table(r: &Report) {
    let mbit = |bps: u64| bps / 1_000_000;
    println!();
    println!(
        "swarm (BENCH.md rows {}): {} MiB; links: peers {} Mbit/s up, {} down, origin {}, \
         supernode {} (up = down, tbf, queue {} ms, MTU {}); {} rounds",
        r.rows,
        r.file_bytes >> 20,
        mbit(r.links.peer_bps),
        mbit(r.links.peer_down_bps),
        mbit(r.links.origin_bps),
        mbit(r.links.supernode_bps),
        r.tbf.queue_ms,
        r.mtu,
        r.rounds
    );
    println!(
        "{:>3} {:>21} {:>21} {:>7} {:>6} {:>15} {:>15} {:>7} {:>15}",
        "N",
        "mesh slowest s",
        "direct slowest s",
        "speedup",
        "ideal",
        "sp/ideal>=0.8",
        "egress/F<=1.05",
        "T_min s",
        "T_min/T>=0.85",
    );
    let verdict = |ok: bool| if ok { "ok" } else { "FAIL" };
    let range = |s: &Spread| format!("{:.1} ({:.1}..{:.1})", s.median, s.min, s.max);
    for p in &r.results {
        println!(
            "{:>3} {:>21} {:>21} {:>7.2} {:>6.2} {:>10.2} {:<4} {:>10.3} {:<4} {:>7.2} {:>10.2} \
             {:<4}",
            p.peers,
            range(&p.mesh_slowest_s),
            range(&p.direct_slowest_s),
            p.speedup.median,
            p.model.ideal_speedup,
            p.speedup_over_ideal.median,
            verdict(p.pass_speedup),
            p.origin_egress_over_f.max,
            verdict(p.pass_egress),
            p.model.t_min_s,
            p.t_min_over_t.median,
            verdict(p.pass_bound),
        );
    }
    println!();
    println!(
        "{:>3} {:>8} {:>12} {:>14} {:>13} {:>8} {:>8} {:>13} {:>12} {:>12} {:>10}",
        "N",
        "T_min s",
        "origin done",
        "mesh median pr",
        "mesh slowest",
        "peers%",
        "sn up/F",
        "drops up/down",
        "CPU mesh",
        "CPU direct",
        "direct eff"
    );
    for p in &r.results {
        println!(
            "{:>3} {:>8.2} {:>12} {:>14.2} {:>13.2} {:>7.0}% {:>8.2} {:>13} {:>12} {:>12} {:>10.2}",
            p.peers,
            p.model.t_min_s,
            p.mesh_origin_sent_file_s
                .map_or("-".into(), |s| format!("{:.2}", s.median)),
            p.mesh_median_peer_s.median,
            p.mesh_slowest_s.median,
            100.0 * p.peer_share.median,
            p.supernode_up_over_f.median,
            format!(
                "{:.0}/{:.0}",
                p.mesh_up_drops.median, p.mesh_down_drops.median
            ),
            format!(
                "{:.2} ({:.2})",
                p.cpu_busy_cores_mesh.median, p.cpu_ours_cores_mesh.median
            ),
            format!(
                "{:.2} ({:.2})",
                p.cpu_busy_cores_direct.median, p.cpu_ours_cores_direct.median
            ),
            p.direct_model_over_t.median
        );
    }
    println!(
        "origin done: seconds until the origin had sent F (the supernode's ingest); sn up/F: \
         the supernode's link bytes sent over F; CPU: cores busy on the machine (ours: this \
         benchmark's processes); direct eff: T_direct model / T_direct measured"
    );
    println!(
        "medians over rounds (min..max); egress/F is the worst round. T_min: Kumar-Ross with the \
         supernode as the seed ({}); binding term: {}.",
        r.bound,
        r.results
            .iter()
            .map(|p| format!("N={} {}", p.peers, p.model.binding))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "peers% = share of the peers' verified bytes that came from other peers; {} CPUs; \
         elapsed {:.0} s",
        r.cpus, r.elapsed_s
    );
    if let Some(info) = &r.torrent {
        print_torrent_table(r, info);
    }
    if let [Some(before), Some(after)] = r.load_average {
        println!("load average {before:.2} before, {after:.2} after");
    }
}

/// Row e: the torrent runs next to the mesh and direct ones.
fn print_torrent_table(r: &Report, info: &TorrentInfo) {
    let range = |s: &Spread| format!("{:.1} ({:.1}..{:.1})", s.median, s.min, s.max);
    let verdict = |ok: bool| if ok { "ok" } else { "FAIL" };
    println!();
    println!(
        "{:>3} {:>8} {:>21} {:>21} {:>21} {:>16} {:>13} {:>10} {:>13} {:>12}",
        "N",
        "T_min s",
        "mesh slowest s",
        "direct slowest s",
        "aria2 slowest s",
        "mesh/aria2<1",
        "aria2 T_min/T",
        "seed up/F",
        "drops up/down",
        "CPU aria2"
    );
    for p in &r.results {
        let Some(t) = &p.torrent_summary else {
            continue;
        };
        println!(
            "{:>3} {:>8.2} {:>21} {:>21} {:>21} {:>11.2} {:<4} {:>13.2} {:>10.2} {:>13} {:>12}",
            p.peers,
            p.model.t_min_seeded_s,
            range(&p.mesh_slowest_s),
            range(&p.direct_slowest_s),
            range(&t.torrent_slowest_s),
            t.mesh_over_torrent.median,
            verdict(t.pass_faster_than_aria2),
            t.torrent_t_min_over_t.median,
            t.torrent_seed_up_over_f.median,
            format!(
                "{:.0}/{:.0}",
                t.torrent_up_drops.median, t.torrent_down_drops.median
            ),
            format!(
                "{:.2} ({:.2})",
                t.cpu_busy_cores_torrent.median, t.cpu_ours_cores_torrent.median
            ),
        );
    }
    println!(
        "aria2 (BENCH.md row e): {}, opentracker, piece size {} KiB as the mesh's; its seed, on \
         the supernode's link, starts with the file (the mesh's supernode fetches it during the \
         run), so T_min here is the seed's bound (no inflow term). mesh/aria2: per round, the \
         mesh's slowest peer over aria2's (below 1: the mesh is faster); seed up/F: the \
         supernode's link bytes sent over F",
        info.aria2,
        info.torrent.piece_size >> 10
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rates(origin: u64, supernode: u64, peer: u64) -> LinkRates {
        LinkRates {
            origin_bps: origin,
            supernode_bps: supernode,
            peer_bps: peer,
            peer_down_bps: peer,
        }
    }

    #[test]
    fn equal_links_bound_by_one_file_time_and_ideal_is_n() {
        // 100 Mbit/s everywhere, F = 100 Mbit: 1 s per file on any link.
        let m = Model::new(12_500_000, 8, &rates(100_000_000, 100_000_000, 100_000_000));
        assert!((m.t_min_s - 1.0).abs() < 1e-9);
        assert!((m.total_upload_s - 8.0 / 9.0).abs() < 1e-9);
        assert!((m.t_direct_s - 8.0).abs() < 1e-9);
        assert!((m.ideal_speedup - 8.0).abs() < 1e-9);
    }

    #[test]
    fn the_binding_term_follows_the_slowest_constraint() {
        // Slow peers, fast seed: each peer's own download binds.
        let m = Model::new(
            12_500_000,
            16,
            &rates(1_000_000_000, 1_000_000_000, 50_000_000),
        );
        assert_eq!(m.binding, "F/min d_i");
        let m = Model::new(
            12_500_000,
            4,
            &rates(50_000_000, 1_000_000_000, 100_000_000),
        );
        assert_eq!(m.binding, "F/min(u_o,d_s)");
        assert!((m.seed_inflow_s - 2.0).abs() < 1e-9);
    }

    #[test]
    fn a_seed_that_starts_with_the_file_drops_only_the_inflow_term() {
        // A slow origin binds the mesh's bound, not the torrent's.
        let m = Model::new(
            12_500_000,
            4,
            &rates(50_000_000, 1_000_000_000, 100_000_000),
        );
        assert!((m.t_min_s - 2.0).abs() < 1e-9);
        assert!((m.t_min_seeded_s - 1.0).abs() < 1e-9);
        // Otherwise both are the same.
        let m = Model::new(
            12_500_000,
            8,
            &rates(1_000_000_000, 100_000_000, 50_000_000),
        );
        assert_eq!(m.t_min_s, m.t_min_seeded_s);
    }

    #[test]
    fn rounds_alternate_the_order_of_their_runs() {
        use RunKind::*;
        assert_eq!(run_order(1, false), [Mesh, Direct]);
        assert_eq!(run_order(2, false), [Direct, Mesh]);
        assert_eq!(run_order(3, true), [Mesh, Direct, Torrent]);
        assert_eq!(run_order(4, true), [Torrent, Direct, Mesh]);
    }

    #[test]
    fn reads_daemon_metrics() {
        let text = "# HELP d7q_download_bytes_total Verified bytes received, by source.\n\
                    # TYPE d7q_download_bytes_total counter\n\
                    d7q_download_bytes_total{source=\"peer\"} 1000\n\
                    d7q_download_bytes_total{source=\"supernode\"} 24\n\
                    d7q_download_bytes_total{source=\"origin\"} 0\n\
                    d7q_upload_bytes_total 77\n\
                    d7q_tasks{state=\"done\"} 1\n";
        let b = DaemonBytes::parse(text);
        assert_eq!(
            b,
            DaemonBytes {
                from_peer: 1000,
                from_supernode: 24,
                from_origin: 0,
                uploaded: 77
            }
        );
        let mut sum = b;
        sum.add(&b);
        assert_eq!(sum.from_peer, 2000);
        assert!((b.peer_share() - 1000.0 / 1024.0).abs() < 1e-12);
    }

    #[test]
    fn reads_ready_lines() {
        let line = "ready mesh=10.77.0.3:7000 metrics=0.0.0.0:8001";
        assert_eq!(ready_field(line, "mesh"), Some("10.77.0.3:7000"));
        assert_eq!(
            ready_field("ready mesh=1.2.3.4:5", "mesh"),
            Some("1.2.3.4:5")
        );
        assert_eq!(ready_field(line, "proxy"), None);
    }

    #[test]
    fn reads_machine_cpu() {
        let text = "cpu  100 0 50 800 50 0 10 0 0 0\ncpu0 1 2 3 4 5 6 7 8\n";
        let a = MachineCpu::parse(text).unwrap();
        assert_eq!((a.total, a.idle, a.softirq), (1010, 850, 10));
        assert!(MachineCpu::parse("cpu 1 2\n").is_none());
        assert!(MachineCpu::read().is_ok());
    }
}
