//! Row f of BENCH.md: `docker pull` of an image (200 MiB by default, in a few layers) by the real
//! Docker engine, through a d7q daemon's HTTPS proxy against straight from the registry,
//! interleaved round by round:
//!
//! - **direct**: a fresh engine pulls from the registry (`docker-registry` over TLS, as
//!   `registry.test`), no proxy.
//! - **cold**: a fresh supernode and a fresh daemon (empty stores) and a fresh engine with
//!   `HTTPS_PROXY` at the daemon's proxy: every blob goes registry → supernode → daemon → engine.
//! - **warm**: right after cold, a second fresh daemon on the same supernode (which, like the
//!   first daemon, now holds the content) and a fresh engine: the blobs come from the mesh.
//! - **local** (secondary): then a fresh engine through the first daemon again, which holds
//!   every blob in its own store: the proxy's overhead alone.
//!
//! A variant's time is the `docker pull` client from spawn to exit (the engine does the work:
//! download, verify, gunzip, extract into `vfs`); starting engines and daemons is not timed.
//! Each pulled image is checked (its layer diff ids) outside the timing. The registry's access
//! log gives the blob bytes each variant made it send. Bars: median cold / direct ≤ 1.2, median
//! warm / direct ≤ 1.0.
//!
//! `registry.test` resolves to 127.0.0.2, so every engine treats it as an insecure registry
//! (Docker's default for 127.0.0.0/8: TLS without certificate checks). That holds for all
//! variants alike; the tests (`tests/docker.rs`) cover certificate checks through the proxy.
//!
//! Not measured here: shaped or lossy links (every process is on loopback), several pulling
//! hosts at once (rows a and e).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::dockerd::{Engine, Registry};
use crate::util::{self, Spread, TempDir};

/// Bar for a cold pull: at most this many times the direct pull's median time.
pub const BAR_COLD: f64 = 1.2;
/// Bar for a warm pull.
pub const BAR_WARM: f64 = 1.0;

/// Head room kept free on the temp disk beyond the benchmark's own files.
const DISK_MARGIN: u64 = 1 << 30;
/// How long a `d7q` process may take to print its `ready` line (or a `d7q ca` command to run).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest `/ca.crt` or `/metrics` answer read from a daemon's proxy.
const MAX_HTTP_ANSWER: u64 = 4 << 20;
/// The repository and tag pushed to the registry.
const IMAGE: &str = "bench/app:1";

/// `d7q-bench pull`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Size of the image's content in MiB, split evenly over the layers.
    #[arg(long, default_value_t = 200)]
    size_mib: u64,
    /// Layers of the image (Docker pulls up to three at once).
    #[arg(long, default_value_t = 4)]
    layers: usize,
    /// Rounds; each round runs every variant once.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where to write the JSON result.
    #[arg(long, default_value = "target/bench/pull.json")]
    json: PathBuf,
    /// The `d7q` binary; default: next to this one.
    #[arg(long)]
    d7q: Option<PathBuf>,
    /// Parent of the temporary directory (registry, stores, engines); default: the system's.
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Seed of the image's content.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Longest a single pull may take before the benchmark fails, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
}

/// Runs the `pull` benchmark.
pub fn run(args: &Args) -> Result<()> {
    ensure!(args.size_mib > 0, "--size-mib must be at least 1");
    ensure!(args.layers > 0, "--layers must be at least 1");
    ensure!(args.reps > 0, "--reps must be at least 1");
    let bytes = args.size_mib << 20;
    let d7q = match &args.d7q {
        Some(p) => p.clone(),
        None => util::sibling_binary("d7q")?,
    };
    let parent = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    // The build context, the builder's and one puller's vfs copies (a vfs layer holds its
    // parents' files too: up to `layers` times the content), the registry, three d7q stores.
    let vfs = bytes * (args.layers as u64 + 1) / 2;
    let needed = 5 * bytes + 2 * vfs + DISK_MARGIN;
    let free = d7q::store::free_space(&parent)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free, the benchmark needs {} MiB",
        parent.display(),
        free >> 20,
        needed >> 20
    );
    let tmp = TempDir::new(&parent, "d7q-bench-pull")?;
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

/// How the engine reaches the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Variant {
    Direct,
    Cold,
    Warm,
    Local,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::Direct,
        Variant::Cold,
        Variant::Warm,
        Variant::Local,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::Direct => "direct (no proxy)",
            Variant::Cold => "proxy, cold mesh",
            Variant::Warm => "proxy, warm mesh",
            Variant::Local => "proxy, local store",
        }
    }
}

#[derive(Debug, Serialize)]
struct Sample {
    round: usize,
    variant: Variant,
    secs: f64,
    mb_per_s: f64,
    /// Blob bytes the registry sent during this pull (the supernode's back-to-source included).
    registry_blob_bytes: u64,
    /// Bytes the pulling daemon received through the mesh during this pull
    /// (`d7q_download_bytes_total`, summed over its sources); 0 for direct.
    daemon_mesh_bytes: f64,
}

/// A variant over all rounds; MB/s counts 10^6 bytes of image content.
#[derive(Debug, Serialize)]
struct Summary {
    variant: Variant,
    label: &'static str,
    secs: Spread,
    mb_per_s: Spread,
    registry_blob_mib: Spread,
    daemon_mesh_mib: Spread,
}

/// The JSON result.
#[derive(Debug, Serialize)]
struct Report {
    benchmark: &'static str,
    row: &'static str,
    bytes: u64,
    layers: usize,
    rounds: usize,
    order: &'static str,
    summaries: Vec<Summary>,
    /// Median cold time / median direct time: held against [`BAR_COLD`].
    ratio_cold_over_direct: f64,
    /// Median warm time / median direct time: held against [`BAR_WARM`].
    ratio_warm_over_direct: f64,
    /// Median local time / median direct time (no bar).
    ratio_local_over_direct: f64,
    bar_cold: f64,
    bar_warm: f64,
    pass_cold: bool,
    pass_warm: bool,
    docker_version: String,
    d7q_binary: String,
    cpus: usize,
    /// One-minute load average before and after the rounds (other work on the machine).
    load_average: [Option<f64>; 2],
    unix_time: u64,
    samples: Vec<Sample>,
}

/// What every round needs.
struct Setup {
    d7q: PathBuf,
    tmp: PathBuf,
    registry: Registry,
    image: String,
    diff_ids: Vec<String>,
    bytes: u64,
    pki: Pki,
    direct_bundle: PathBuf,
    timeout: Duration,
}

/// Node identities from one cluster CA.
struct Pki {
    supernode: PathBuf,
    hosts: [PathBuf; 2],
}

async fn bench(args: &Args, d7q: &Path, bytes: u64, tmp: &Path) -> Result<Report> {
    let timeout = Duration::from_secs(args.timeout_secs);
    let registry = Registry::start(&tmp.join("registry")).await?;
    let direct_bundle = tmp.join("direct-bundle.pem");
    registry.bundle(&direct_bundle, "")?;
    let image = format!("{}/{IMAGE}", registry.host());

    eprintln!(
        "building and pushing a {} MiB image in {} layers",
        bytes >> 20,
        args.layers
    );
    let (diff_ids, docker_version) = build_and_push(
        tmp,
        &direct_bundle,
        &image,
        bytes,
        args.layers,
        args.seed,
        timeout,
    )
    .await?;

    let pki = make_pki(d7q, tmp).await?;
    let setup = Setup {
        d7q: d7q.to_path_buf(),
        tmp: tmp.to_path_buf(),
        registry,
        image,
        diff_ids,
        bytes,
        pki,
        direct_bundle,
        timeout,
    };

    let load_before = util::load_average();
    let mut samples = Vec::new();
    for round in 0..args.reps {
        // Alternate direct's place so neither side always runs on a warmer page cache.
        let direct_first = round % 2 == 0;
        if direct_first {
            samples.push(setup.direct(round).await?);
        }
        samples.extend(setup.through_mesh(round).await?);
        if !direct_first {
            samples.push(setup.direct(round).await?);
        }
        for s in &samples[samples.len() - Variant::ALL.len()..] {
            eprintln!(
                "round {round}: {:<18} {:>7.2} s  {:>7.1} MB/s  registry sent {:>6.1} MiB",
                s.variant.label(),
                s.secs,
                s.mb_per_s,
                s.registry_blob_bytes as f64 / (1 << 20) as f64
            );
        }
    }
    let load_after = util::load_average();
    Ok(report(
        &setup,
        args,
        samples,
        docker_version,
        [load_before, load_after],
    ))
}

impl Setup {
    /// One direct pull by a fresh engine.
    async fn direct(&self, round: usize) -> Result<Sample> {
        let dir = self.tmp.join(format!("engine-direct-{round}"));
        let engine = Engine::start(&dir, None, &self.direct_bundle).await?;
        let sample = self.pull(&engine, round, Variant::Direct, None).await;
        engine.stop().await?;
        sample
    }

    /// A cold pull through a fresh mesh, a warm pull through a second fresh daemon, and a
    /// local pull through the first daemon again.
    async fn through_mesh(&self, round: usize) -> Result<[Sample; 3]> {
        let base = self.tmp.join(format!("mesh-{round}"));
        let supernode = Node::supernode(self, &base.join("supernode")).await?;
        let daemon_a = Node::daemon(self, &base.join("daemon-a"), 0, supernode.mesh).await?;
        let cold = self
            .pull_via(&daemon_a, &base, round, Variant::Cold)
            .await?;
        // The first daemon stays up: it is part of the mesh the warm pull draws on.
        let daemon_b = Node::daemon(self, &base.join("daemon-b"), 1, supernode.mesh).await?;
        let warm = self
            .pull_via(&daemon_b, &base, round, Variant::Warm)
            .await?;
        drop(daemon_b);
        let local = self
            .pull_via(&daemon_a, &base, round, Variant::Local)
            .await?;
        drop(daemon_a);
        drop(supernode);
        std::fs::remove_dir_all(&base).with_context(|| format!("removing {}", base.display()))?;
        Ok([cold, warm, local])
    }

    /// A fresh engine behind `daemon`'s proxy pulls.
    async fn pull_via(
        &self,
        daemon: &Node,
        base: &Path,
        round: usize,
        variant: Variant,
    ) -> Result<Sample> {
        let proxy = daemon.proxy.context("daemon without a proxy address")?;
        let ca = http_get(proxy, "/ca.crt").await.context("GET /ca.crt")?;
        ensure!(
            ca.contains("BEGIN CERTIFICATE"),
            "the proxy's /ca.crt is not a PEM certificate"
        );
        let bundle = base.join(format!("bundle-{variant:?}.pem"));
        self.registry.bundle(&bundle, &ca)?;
        let dir = base.join(format!("engine-{variant:?}"));
        let engine = Engine::start(&dir, Some(proxy), &bundle).await?;
        let sample = self.pull(&engine, round, variant, Some(proxy)).await;
        engine.stop().await?;
        sample
    }

    /// Times `docker pull` on `engine`, then checks the image and counts what the registry sent.
    async fn pull(
        &self,
        engine: &Engine,
        round: usize,
        variant: Variant,
        proxy: Option<SocketAddr>,
    ) -> Result<Sample> {
        let (_, mark) = self.registry.blob_bytes_since(0);
        let mesh_before = match proxy {
            Some(addr) => downloaded(&http_get(addr, "/metrics").await?),
            None => 0.0,
        };
        let finished =
            util::run_timed(&mut engine.docker(&["pull", &self.image]), self.timeout).await?;
        util::check_success(&format!("docker pull ({variant:?})"), &finished.output)?;
        let secs = finished.wall.as_secs_f64();
        let layers = engine
            .run(
                &[
                    "image",
                    "inspect",
                    "--format",
                    "{{json .RootFS.Layers}}",
                    &self.image,
                ],
                self.timeout,
            )
            .await?;
        let layers: Vec<String> =
            serde_json::from_str(layers.trim()).context("parsing the image's layers")?;
        ensure!(
            layers == self.diff_ids,
            "{variant:?} pull gave layers {layers:?}, pushed {:?}",
            self.diff_ids
        );
        // The registry may log a request a moment after answering it.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (registry_blob_bytes, _) = self.registry.blob_bytes_since(mark);
        let daemon_mesh_bytes = match proxy {
            Some(addr) => downloaded(&http_get(addr, "/metrics").await?) - mesh_before,
            None => 0.0,
        };
        Ok(Sample {
            round,
            variant,
            secs,
            mb_per_s: self.bytes as f64 / secs / 1e6,
            registry_blob_bytes,
            daemon_mesh_bytes,
        })
    }
}

/// A running `d7q supernode` or `d7q daemon`, killed on drop.
struct Node {
    _child: Child,
    mesh: SocketAddr,
    proxy: Option<SocketAddr>,
}

impl Node {
    async fn supernode(s: &Setup, dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = Command::new(&s.d7q);
        cmd.args([
            "supernode",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.join("store"))
        .arg("--pki")
        .arg(&s.pki.supernode)
        .arg("--origin-ca")
        .arg(&s.registry.ca_file);
        Self::start(cmd, dir).await
    }

    async fn daemon(s: &Setup, dir: &Path, host: usize, supernode: SocketAddr) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut cmd = Command::new(&s.d7q);
        cmd.args([
            "daemon",
            "--listen",
            "127.0.0.1:0",
            "--proxy",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(dir.join("store"))
        .arg("--pki")
        .arg(&s.pki.hosts[host])
        .arg("--socket")
        .arg(dir.join("d7q.sock"))
        .arg("--supernode")
        .arg(supernode.to_string())
        .arg("--registry")
        .arg(s.registry.host())
        .arg("--origin-ca")
        .arg(&s.registry.ca_file);
        Self::start(cmd, dir).await
    }

    /// Spawns `cmd` (stderr to `dir/log`) and waits for its `ready mesh=… [proxy=…]` line.
    async fn start(mut cmd: Command, dir: &Path) -> Result<Self> {
        let log = dir.join("log");
        let mut child = cmd
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("SSL_CERT_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log)?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning d7q")?;
        let mut lines = BufReader::new(child.stdout.take().context("d7q stdout")?).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await? {
                if line.starts_with("ready ") {
                    return Ok::<_, std::io::Error>(Some(line));
                }
            }
            Ok(None)
        })
        .await;
        let line = match line {
            Ok(Ok(Some(line))) => line,
            Ok(Ok(None)) | Ok(Err(_)) => bail!(
                "d7q exited before it was ready; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            ),
            Err(_) => bail!("d7q not ready within {READY_TIMEOUT:?}"),
        };
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let field = |key: &str| -> Option<SocketAddr> {
            line.split_whitespace()
                .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
                .and_then(|v| v.parse().ok())
        };
        Ok(Self {
            _child: child,
            mesh: field("mesh").with_context(|| format!("no mesh= in {line:?}"))?,
            proxy: field("proxy"),
        })
    }
}

/// Builds an image of `layers` layers of random files (a `FROM scratch` Dockerfile, one `COPY`
/// per layer) on a direct engine and pushes it. Returns its diff ids and the engine's version.
async fn build_and_push(
    tmp: &Path,
    bundle: &Path,
    image: &str,
    bytes: u64,
    layers: usize,
    seed: u64,
    timeout: Duration,
) -> Result<(Vec<String>, String)> {
    let context = tmp.join("build");
    std::fs::create_dir_all(&context)?;
    let mut dockerfile = String::from("FROM scratch\n");
    let per_layer = bytes / layers as u64;
    for i in 0..layers {
        let len = if i + 1 == layers {
            bytes - per_layer * (layers as u64 - 1)
        } else {
            per_layer
        };
        let name = format!("layer-{i}.bin");
        util::write_random_file(&context.join(&name), len, seed.wrapping_add(i as u64))?;
        dockerfile.push_str(&format!("COPY {name} /d7q/{name}\n"));
    }
    std::fs::write(context.join("Dockerfile"), dockerfile)?;
    let engine = Engine::start(&tmp.join("engine-builder"), None, bundle).await?;
    let context_str = context.to_str().context("non-UTF-8 temp path")?;
    engine
        .run(&["build", "-q", "-t", image, context_str], timeout)
        .await?;
    engine.run(&["push", image], timeout).await?;
    let out = engine
        .run(
            &[
                "image",
                "inspect",
                "--format",
                "{{json .RootFS.Layers}}",
                image,
            ],
            timeout,
        )
        .await?;
    let diff_ids: Vec<String> = serde_json::from_str(out.trim()).context("parsing layers")?;
    ensure!(
        diff_ids.len() == layers,
        "built {} layers, wanted {layers}",
        diff_ids.len()
    );
    let version = engine
        .run(&["version", "--format", "{{.Server.Version}}"], timeout)
        .await?
        .trim()
        .to_owned();
    engine.stop().await?;
    std::fs::remove_dir_all(&context)?;
    Ok((diff_ids, version))
}

/// A cluster CA with identities for one supernode and two daemons.
async fn make_pki(d7q: &Path, tmp: &Path) -> Result<Pki> {
    let ca = tmp.join("cluster-ca");
    d7q_cmd(d7q, &["ca", "init", "--dir"], &[&ca]).await?;
    let issue = |name: &str| {
        let out = tmp.join(format!("pki-{name}"));
        let ca = ca.clone();
        let name = name.to_owned();
        async move {
            d7q_cmd(
                d7q,
                &["ca", "issue", "--name", &name, "--dir"],
                &[&ca, Path::new("--out"), &out],
            )
            .await
            .map(|()| out)
        }
    };
    Ok(Pki {
        supernode: issue("supernode").await?,
        hosts: [issue("host-a").await?, issue("host-b").await?],
    })
}

/// Runs `d7q ARGS PATHS…` to completion.
async fn d7q_cmd(d7q: &Path, args: &[&str], paths: &[&Path]) -> Result<()> {
    let mut cmd = Command::new(d7q);
    cmd.args(args).args(paths);
    let out = util::run_timed(&mut cmd, READY_TIMEOUT).await?;
    util::check_success(&format!("d7q {}", args.join(" ")), &out.output)
}

/// A plain HTTP GET to a daemon's proxy address (its own endpoints); the body as text.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        // HTTP/1.0, so the answer is never chunked: the body is what follows the headers.
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut answer = String::new();
    tokio::time::timeout(
        READY_TIMEOUT,
        stream.take(MAX_HTTP_ANSWER).read_to_string(&mut answer),
    )
    .await
    .context("no answer")??;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .context("no end of headers in the answer")?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {status}"
    );
    Ok(body.to_owned())
}

/// `d7q_download_bytes_total` summed over its sources, from a `/metrics` text.
fn downloaded(metrics: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("d7q_download_bytes_total{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

fn report(
    s: &Setup,
    args: &Args,
    samples: Vec<Sample>,
    docker_version: String,
    load_average: [Option<f64>; 2],
) -> Report {
    let summaries: Vec<Summary> = Variant::ALL
        .iter()
        .map(|&v| {
            let of = |f: &dyn Fn(&Sample) -> f64| {
                let vals: Vec<f64> = samples.iter().filter(|x| x.variant == v).map(f).collect();
                Spread::of(&vals).expect("at least one round")
            };
            Summary {
                variant: v,
                label: v.label(),
                secs: of(&|x| x.secs),
                mb_per_s: of(&|x| x.mb_per_s),
                registry_blob_mib: of(&|x| x.registry_blob_bytes as f64 / (1 << 20) as f64),
                daemon_mesh_mib: of(&|x| x.daemon_mesh_bytes / (1 << 20) as f64),
            }
        })
        .collect();
    let median = |v: Variant| {
        summaries
            .iter()
            .find(|x| x.variant == v)
            .map_or(f64::NAN, |x| x.secs.median)
    };
    let cold = median(Variant::Cold) / median(Variant::Direct);
    let warm = median(Variant::Warm) / median(Variant::Direct);
    let local = median(Variant::Local) / median(Variant::Direct);
    Report {
        benchmark: "pull",
        row: "f",
        bytes: s.bytes,
        layers: args.layers,
        rounds: args.reps,
        order: "direct, cold, warm, local in even rounds; cold, warm, local, direct in odd ones",
        summaries,
        ratio_cold_over_direct: cold,
        ratio_warm_over_direct: warm,
        ratio_local_over_direct: local,
        bar_cold: BAR_COLD,
        bar_warm: BAR_WARM,
        pass_cold: cold <= BAR_COLD,
        pass_warm: warm <= BAR_WARM,
        docker_version,
        d7q_binary: s.d7q.display().to_string(),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average,
        unix_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        samples,
    }
}

fn print_table(r: &Report) {
    println!();
    println!(
        "pull (BENCH.md row f): docker pull of {} MiB in {} layers, {} rounds ({}), loopback",
        r.bytes >> 20,
        r.layers,
        r.rounds,
        r.order
    );
    println!(
        "{:<20} {:>8} {:>17} {:>8} {:>14} {:>10}",
        "variant", "time s", "min..max s", "MB/s", "registry MiB", "mesh MiB"
    );
    for s in &r.summaries {
        println!(
            "{:<20} {:>8.2} {:>17} {:>8.1} {:>14.1} {:>10.1}",
            s.label,
            s.secs.median,
            format!("{:.2}..{:.2}", s.secs.min, s.secs.max),
            s.mb_per_s.median,
            s.registry_blob_mib.median,
            s.daemon_mesh_mib.median
        );
    }
    let verdict = |pass| if pass { "PASS" } else { "FAIL" };
    println!(
        "cold/direct = {:.2} (bar <= {:.1}: {})   warm/direct = {:.2} (bar <= {:.1}: {})",
        r.ratio_cold_over_direct,
        r.bar_cold,
        verdict(r.pass_cold),
        r.ratio_warm_over_direct,
        r.bar_warm,
        verdict(r.pass_warm)
    );
    println!("local/direct = {:.2} (no bar)", r.ratio_local_over_direct);
    println!(
        "medians of the docker pull client's wall time; engine {}; registry MiB = blob bytes the \
         registry sent during the pull; mesh MiB = what the pulling daemon received from the mesh",
        r.docker_version
    );
    if let [Some(before), Some(after)] = r.load_average {
        println!(
            "load average {before:.2} before, {after:.2} after, on {} CPUs",
            r.cpus
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_download_bytes_over_sources() {
        let text = "# HELP d7q_download_bytes_total x\n\
                    d7q_download_bytes_total{source=\"peer\"} 100\n\
                    d7q_download_bytes_total{source=\"supernode\"} 50\n\
                    d7q_upload_bytes_total 7\n";
        assert_eq!(downloaded(text), 150.0);
    }
}
