//! The `d7q` command line. The names here are a contract operators script against: flags may be
//! added, none renamed. Every failure prints one line `d7q: …` on stderr and exits with a code
//! from [`crate::exit`].

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};

use crate::daemon::{Daemon, DaemonConfig};
use crate::exit;
use crate::peer::{self, GetError, GetRequest, ProgressFn};
use crate::pki::{ClusterCa, NodeIdentity};
use crate::supernode::{Supernode, SupernodeConfig};
use crate::{admin, config, demo, embedded, local, task, transport};

/// QUIC-native peer-to-peer distribution of container images and large files.
#[derive(Parser, Debug)]
#[command(name = "d7q", version, about)]
struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `d7q=debug`.
    #[arg(long, global = true, env = "D7Q_LOG")]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Create and inspect the cluster CA and node identities.
    #[command(subcommand)]
    Ca(CaCmd),
    /// Run a supernode: scheduler and seed/CDN.
    Supernode(SupernodeArgs),
    /// Run the per-host daemon: downloads for local clients, content store, uploads.
    Daemon(Box<DaemonArgs>),
    /// Download one file through the mesh.
    Get(GetArgs),
    /// Show a node's tasks.
    Status(StatusArgs),
    /// Everything on loopback, offline: an origin, a supernode and a few peers.
    Demo(DemoArgs),
}

#[derive(Subcommand, Debug)]
enum CaCmd {
    /// Create a cluster CA: DIR/ca.pem, DIR/ca.key.
    Init {
        /// Directory for the CA.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a node identity signed by the cluster CA: OUT/ca.pem, OUT/node.pem, OUT/node.key.
    Issue {
        /// Directory of the cluster CA.
        #[arg(long)]
        dir: PathBuf,
        /// Node name (also put in the certificate).
        #[arg(long)]
        name: String,
        /// Directory for the node identity.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the cluster CA certificate.
    Show {
        /// Directory of the cluster CA or of a node identity.
        #[arg(long)]
        dir: PathBuf,
    },
}

#[derive(Args, Debug)]
struct SupernodeArgs {
    /// UDP address for QUIC (mesh `d7q/1` and admin `h3`) [default: 0.0.0.0:8002].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Content store directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node identity directory (from `d7q ca issue`).
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for origins; repeatable.
    #[arg(long = "origin-ca")]
    origin_ca: Vec<PathBuf>,
    /// Datacenter label.
    #[arg(long)]
    dc: Option<String>,
    /// Zone label.
    #[arg(long)]
    zone: Option<String>,
    /// TCP address of /metrics [default: 0.0.0.0:8001].
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Budget for fetching from origins, all tasks together, e.g. 200MiB (0: unlimited).
    #[arg(long)]
    back_to_source_rate: Option<String>,
    /// Configuration file (TOML); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args, Debug)]
struct DaemonArgs {
    /// UDP address of the QUIC mesh (uploads to other peers).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address other peers dial, when --listen is not reachable as is.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// TCP address of the HTTP side: /metrics (and the proxy).
    #[arg(long)]
    proxy: Option<SocketAddr>,
    /// Content store directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Node identity directory (from `d7q ca issue`).
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Supernode address; repeatable.
    #[arg(long)]
    supernode: Vec<SocketAddr>,
    /// Local API socket for `d7q get`.
    #[arg(long)]
    socket: Option<PathBuf>,
    /// Configuration file (TOML); flags win over it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Datacenter label.
    #[arg(long)]
    dc: Option<String>,
    /// Zone label.
    #[arg(long)]
    zone: Option<String>,
    /// Host label (default: the host name).
    #[arg(long)]
    host: Option<String>,
    /// Machine-wide upload budget, e.g. 100MiB or 800Mbit (0: unlimited).
    #[arg(long)]
    upload_rate: Option<String>,
    /// Machine-wide download budget (0: unlimited).
    #[arg(long)]
    download_rate: Option<String>,
    /// Budget of each single download (0: unlimited).
    #[arg(long)]
    per_download_rate: Option<String>,
    /// Store garbage collection starts above this disk use, e.g. 90% or 500GiB.
    #[arg(long)]
    gc_high_watermark: Option<String>,
    /// Store garbage collection stops at or below this.
    #[arg(long)]
    gc_low_watermark: Option<String>,
    /// Content unused for this long is collected, e.g. 7d.
    #[arg(long)]
    gc_ttl: Option<String>,
    /// Test only: serve corrupt pieces, to exercise bad-peer isolation.
    #[arg(long, hide = true)]
    danger_corrupt_uploads: bool,
}

#[derive(Args, Debug)]
struct GetArgs {
    /// URL of the content.
    url: String,
    /// Output file.
    #[arg(short = 'o', long)]
    output: PathBuf,
    /// Expected digest, `sha256:HEX`.
    #[arg(long)]
    digest: Option<String>,
    /// Header for the origin, `'Name: value'`; repeatable.
    #[arg(long = "header", short = 'H')]
    headers: Vec<String>,
    /// Supernode address; repeatable. None: the embedded default.
    #[arg(long)]
    supernode: Vec<SocketAddr>,
    /// Node identity directory (required with --supernode).
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for origins (embedded mode); repeatable.
    #[arg(long = "origin-ca")]
    origin_ca: Vec<PathBuf>,
    /// The local daemon's socket (default: the daemon's default path, used when a daemon
    /// answers there).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Never use a local daemon.
    #[arg(long)]
    no_daemon: bool,
    /// No progress bar.
    #[arg(long, short = 'q')]
    quiet: bool,
}

#[derive(Args, Debug)]
struct StatusArgs {
    /// Machine-readable JSON.
    #[arg(long)]
    json: bool,
    /// Node identity directory: verify the node against the cluster CA.
    #[arg(long)]
    pki: Option<PathBuf>,
    /// Address of the node's QUIC port.
    #[arg(default_value = "127.0.0.1:8002")]
    addr: SocketAddr,
}

#[derive(Args, Debug)]
struct DemoArgs {
    /// Number of peers.
    #[arg(long, default_value_t = 4)]
    peers: usize,
    /// Size of the demo file in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: u64,
}

/// Runs the command line; returns the exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    let default_log = match cli.cmd {
        Cmd::Supernode(_) | Cmd::Daemon(_) => "info",
        // `get` reports its own failure in one line; logs only when asked for.
        Cmd::Get(_) => "off",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_new(cli.log.as_deref().unwrap_or(default_log))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_log));
    let _ = tracing_subscriber::fmt()
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(exit::FAILURE, &format!("cannot start runtime: {e}")),
    };
    rt.block_on(run(cli.cmd))
}

fn fail(code: i32, msg: &str) -> i32 {
    eprintln!("d7q: {msg}");
    code
}

async fn run(cmd: Cmd) -> i32 {
    match cmd {
        Cmd::Ca(c) => ca(c),
        Cmd::Supernode(a) => supernode(a).await,
        Cmd::Daemon(a) => daemon(a).await,
        Cmd::Get(a) => get(a).await,
        Cmd::Status(a) => status(a).await,
        Cmd::Demo(a) => match demo::run(a.peers, a.size_mib).await {
            Ok(()) => exit::OK,
            Err(e) => fail(exit::FAILURE, &format!("demo failed: {e:#}")),
        },
    }
}

fn ca(cmd: CaCmd) -> i32 {
    match cmd {
        CaCmd::Init { dir } => match ClusterCa::init(&dir) {
            Ok(_) => {
                println!("cluster CA created: {}", dir.join("ca.pem").display());
                exit::OK
            }
            Err(e) => fail(exit::LOCAL, &e.to_string()),
        },
        CaCmd::Issue { dir, name, out } => {
            let issued = ClusterCa::load(&dir)
                .and_then(|ca| ca.issue(&name))
                .and_then(|id| id.save(&out));
            match issued {
                Ok(()) => {
                    println!("node identity {name:?} written to {}", out.display());
                    exit::OK
                }
                Err(e) => fail(exit::LOCAL, &e.to_string()),
            }
        }
        CaCmd::Show { dir } => match std::fs::read_to_string(dir.join("ca.pem")) {
            Ok(pem) => {
                print!("{pem}");
                exit::OK
            }
            Err(e) => fail(
                exit::LOCAL,
                &format!("{}: {e}", dir.join("ca.pem").display()),
            ),
        },
    }
}

async fn supernode(a: SupernodeArgs) -> i32 {
    let (cfg, metrics_addr) = match supernode_config(a) {
        Ok(c) => c,
        Err(e) => return fail(exit::USAGE, &e),
    };
    let metrics = cfg.metrics.clone();
    let listener = match tokio::net::TcpListener::bind(metrics_addr).await {
        Ok(l) => l,
        Err(e) => {
            return fail(
                exit::FAILURE,
                &format!("metrics address {metrics_addr}: {e}"),
            )
        }
    };
    let metrics_addr = listener.local_addr().unwrap_or(metrics_addr);
    let sn = match Supernode::start(cfg).await {
        Ok(s) => s,
        Err(e) => return fail(exit::FAILURE, &format!("{e:#}")),
    };
    tokio::spawn(crate::metrics::serve(
        listener,
        metrics,
        std::future::pending::<()>(),
    ));
    println!("ready mesh={} metrics={metrics_addr}", sn.local_addr());
    let _ = std::io::stdout().flush();
    let run = tokio::spawn(sn.run());
    shutdown_signal().await;
    run.abort();
    exit::OK
}

/// Flags over the config file over defaults; every refusal names the flag or key.
fn supernode_config(a: SupernodeArgs) -> Result<(SupernodeConfig, SocketAddr), String> {
    let file = match &a.config {
        Some(path) => config::ConfigFile::load(path)
            .map_err(|e| e.to_string())?
            .supernode(),
        None => Default::default(),
    };
    let pki =
        config::require(a.pki, file.pki, "--pki", "supernode.pki").map_err(|e| e.to_string())?;
    let data_dir = config::require(
        a.data_dir,
        file.data_dir,
        "--data-dir",
        "supernode.data_dir",
    )
    .map_err(|e| e.to_string())?;
    let identity = NodeIdentity::load(&pki).map_err(|e| format!("node identity: {e}"))?;
    let origin_rate = match &a.back_to_source_rate {
        Some(s) => config::parse_rate(s).map_err(|e| format!("--back-to-source-rate: {e}"))?,
        None => file.back_to_source_rate.unwrap_or(0),
    };
    let listen = config::pick(
        a.listen,
        file.listen,
        parse_default(config::defaults::SUPERNODE_LISTEN),
    );
    let metrics = config::pick(
        a.metrics,
        file.metrics,
        parse_default(config::defaults::SUPERNODE_METRICS),
    );
    let cfg = SupernodeConfig {
        listen,
        data_dir,
        identity,
        origin_cas: config::pick_list(a.origin_ca, file.origin_ca),
        labels: d7q_wire::Labels {
            dc: config::pick(a.dc, file.dc, String::new()),
            zone: config::pick(a.zone, file.zone, String::new()),
            host: file.host.unwrap_or_else(config::default_host),
        },
        origin_rate,
        metrics: std::sync::Arc::new(crate::metrics::Metrics::new(
            crate::metrics::Role::Supernode,
        )),
    };
    Ok((cfg, metrics))
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse().expect("built-in default address")
}

async fn daemon(a: Box<DaemonArgs>) -> i32 {
    let cfg = match daemon_config(*a) {
        Ok(c) => c,
        Err(e) => return fail(exit::USAGE, &e),
    };
    let d = match Daemon::start(cfg).await {
        Ok(d) => d,
        Err(e) => return fail(exit::FAILURE, &format!("{e:#}")),
    };
    println!(
        "ready mesh={} proxy={} socket={}",
        d.mesh_addr(),
        d.proxy_addr(),
        d.socket().display()
    );
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    d.shutdown();
    exit::OK
}

/// Flags over the config file over defaults; every refusal names the flag or key.
fn daemon_config(a: DaemonArgs) -> Result<DaemonConfig, String> {
    let file = match &a.config {
        Some(path) => config::ConfigFile::load(path)
            .map_err(|e| e.to_string())?
            .daemon
            .unwrap_or_default(),
        None => Default::default(),
    };
    let rate = |flag: &Option<String>, key: &str, from_file: Option<u64>| -> Result<u64, String> {
        match flag {
            Some(s) => config::parse_rate(s).map_err(|e| format!("--{key}: {e}")),
            None => Ok(from_file.unwrap_or(0)),
        }
    };
    let pki = a
        .pki
        .clone()
        .or(file.pki.clone())
        .ok_or("--pki NODEDIR is required (or daemon.pki in the config)")?;
    let identity = NodeIdentity::load(&pki).map_err(|e| format!("node identity: {e}"))?;
    let supernodes = config::pick_list(a.supernode.clone(), file.supernode.clone());
    if supernodes.is_empty() {
        return Err(
            "at least one --supernode ADDR is required (or daemon.supernode in the config)".into(),
        );
    }
    Ok(DaemonConfig {
        listen: config::pick(
            a.listen,
            file.listen,
            "0.0.0.0:65002".parse().expect("literal"),
        ),
        advertise: a.advertise.or(file.advertise),
        proxy: config::pick(
            a.proxy,
            file.proxy,
            "127.0.0.1:65001".parse().expect("literal"),
        ),
        data_dir: config::pick(
            a.data_dir.clone(),
            file.data_dir.clone(),
            PathBuf::from("/var/lib/d7q/daemon"),
        ),
        identity,
        supernodes,
        socket: config::pick(
            a.socket.clone(),
            file.socket.clone(),
            config::default_socket_path(),
        ),
        labels: d7q_wire::Labels {
            dc: config::pick(a.dc.clone(), file.dc.clone(), String::new()),
            zone: config::pick(a.zone.clone(), file.zone.clone(), String::new()),
            host: config::pick(a.host.clone(), file.host.clone(), config::default_host()),
        },
        upload_rate: rate(&a.upload_rate, "upload-rate", file.upload_rate)?,
        download_rate: rate(&a.download_rate, "download-rate", file.download_rate)?,
        per_download_rate: rate(
            &a.per_download_rate,
            "per-download-rate",
            file.per_download_rate,
        )?,
        danger_corrupt_uploads: a.danger_corrupt_uploads,
        gc: {
            let storage = file.storage.clone().unwrap_or_default();
            let wm = |flag: &Option<String>,
                      name: &str,
                      from_file: Option<config::Watermark>,
                      default| {
                match flag {
                    Some(s) => config::parse_watermark(s).map_err(|e| format!("--{name}: {e}")),
                    None => Ok(from_file.unwrap_or(default)),
                }
            };
            crate::daemon::GcSettings {
                high_watermark: wm(
                    &a.gc_high_watermark,
                    "gc-high-watermark",
                    storage.high_watermark,
                    config::defaults::HIGH_WATERMARK,
                )?,
                low_watermark: wm(
                    &a.gc_low_watermark,
                    "gc-low-watermark",
                    storage.low_watermark,
                    config::defaults::LOW_WATERMARK,
                )?,
                ttl: match &a.gc_ttl {
                    Some(s) => config::parse_duration(s).map_err(|e| format!("--gc-ttl: {e}"))?,
                    None => storage.ttl.unwrap_or(config::defaults::TTL),
                },
            }
        },
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

async fn get(a: GetArgs) -> i32 {
    let digest = match a.digest.as_deref().map(|d| task::parse_digest(d).ok_or(d)) {
        None => None,
        Some(Ok(d)) => Some(d),
        Some(Err(d)) => {
            return fail(
                exit::USAGE,
                &format!("--digest {d:?} is not sha256:<64 hex digits>"),
            )
        }
    };
    let mut headers = Vec::new();
    for h in &a.headers {
        match h.split_once(':') {
            Some((k, v)) if !k.trim().is_empty() => {
                headers.push((k.trim().to_string(), v.trim().to_string()))
            }
            _ => return fail(exit::USAGE, &format!("--header {h:?} is not 'Name: value'")),
        }
    }
    if !(a.url.starts_with("http://") || a.url.starts_with("https://")) {
        return fail(
            exit::USAGE,
            &format!("{:?} is not an http:// or https:// URL", a.url),
        );
    }
    if a.output.is_dir() {
        return fail(
            exit::LOCAL,
            &format!("{} is a directory", a.output.display()),
        );
    }
    let req = GetRequest {
        url: a.url.clone(),
        output: a.output.clone(),
        digest,
        headers,
    };
    let bar = (!a.quiet && std::io::stderr().is_terminal()).then(ProgressBar::new);
    let progress: Option<ProgressFn> = bar
        .clone()
        .map(|b| Arc::new(move |done, total| b.update(done, total)) as ProgressFn);
    let socket = a.daemon.clone().or_else(|| {
        config::socket_candidates()
            .into_iter()
            .find(|p| local::daemon_running(p))
    });
    let use_daemon = !a.no_daemon && a.supernode.is_empty() && socket.is_some();
    let socket = socket.unwrap_or_default();
    let work = async {
        if use_daemon {
            local::get(&socket, &req, progress).await
        } else if a.supernode.is_empty() {
            embedded::get(&req, &a.origin_ca, progress).await
        } else {
            let Some(pki) = &a.pki else {
                return Err(GetError::Mesh(
                    "--pki NODEDIR is required with --supernode".into(),
                ));
            };
            let identity = NodeIdentity::load(pki)
                .map_err(|e| GetError::Mesh(format!("node identity: {e}")))?;
            let bind: SocketAddr = "0.0.0.0:0".parse().expect("literal");
            let ep = transport::endpoint(&identity, bind, false)?;
            let r = peer::get(&ep, &a.supernode, &req, progress).await;
            ep.close(transport::close::DONE, b"");
            r
        }
    };
    // On Ctrl-C the download future is dropped, which removes its temporary file.
    let result = tokio::select! {
        r = work => r,
        _ = shutdown_signal() => return fail(exit::FAILURE, "interrupted"),
    };
    if let Some(b) = &bar {
        b.clear();
    }
    match result {
        Ok(_) => exit::OK,
        Err(e) => fail(e.exit_code(), &e.to_string()),
    }
}

async fn status(a: StatusArgs) -> i32 {
    let identity = match a.pki.as_deref().map(NodeIdentity::load).transpose() {
        Ok(i) => i,
        Err(e) => return fail(exit::USAGE, &format!("node identity: {e}")),
    };
    let body = match admin::fetch(a.addr, "/status", identity.as_ref()).await {
        Ok(b) => b,
        Err(e) => return fail(exit::MESH, &format!("{e:#}")),
    };
    if a.json {
        println!("{}", String::from_utf8_lossy(&body));
        return exit::OK;
    }
    let st: admin::Status = match serde_json::from_slice(&body) {
        Ok(s) => s,
        Err(e) => return fail(exit::MESH, &format!("{}: unreadable status: {e}", a.addr)),
    };
    println!(
        "{} {} up {}s, {} tasks",
        st.node.role,
        st.node.node_id,
        st.node.uptime_secs,
        st.tasks.len()
    );
    for t in st.tasks {
        let len = t.length.map(human_bytes).unwrap_or_else(|| "?".into());
        println!(
            "  {} {:<9} {:>4}/{:<4} {:>10}  {}",
            &t.id[..12],
            t.state,
            t.pieces_done,
            t.piece_count.unwrap_or(0),
            len,
            t.url
        );
    }
    exit::OK
}

/// Formats a byte count for people.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A one-line progress bar on stderr, redrawn at most a few times a second.
#[derive(Clone)]
struct ProgressBar {
    state: Arc<std::sync::Mutex<(Instant, Instant)>>,
}

impl ProgressBar {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            state: Arc::new(std::sync::Mutex::new((now, now))),
        }
    }

    fn update(&self, done: u64, total: u64) {
        let mut s = self.state.lock().expect("progress lock");
        let now = Instant::now();
        if now.duration_since(s.1).as_millis() < 150 && done < total {
            return;
        }
        s.1 = now;
        let secs = now.duration_since(s.0).as_secs_f64().max(1e-3);
        let pct = if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        };
        let width = 30usize;
        let filled = ((pct / 100.0) * width as f64) as usize;
        eprint!(
            "\r[{}{}] {:5.1}% {} / {}  {}/s   ",
            "#".repeat(filled),
            "-".repeat(width - filled),
            pct,
            human_bytes(done),
            human_bytes(total),
            human_bytes((done as f64 / secs) as u64)
        );
    }

    fn clear(&self) {
        eprint!("\r{}\r", " ".repeat(80));
    }
}
