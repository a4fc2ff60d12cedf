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
    /// Pull an image through the mesh into an OCI image layout or a docker-archive.
    Pull(Box<crate::pull::PullArgs>),
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
    /// Create the proxy CA (signs the HTTPS proxy's certificates for intercepted registries):
    /// DIR/proxy-ca.pem, DIR/proxy-ca.key.
    ProxyInit {
        /// Directory for the proxy CA.
        #[arg(long)]
        dir: PathBuf,
        /// Limit the CA to this DNS domain and its subdomains (X.509 name constraint), so hosts
        /// that trust it trust it for nothing else; repeatable.
        #[arg(long = "name-constraint")]
        name_constraint: Vec<String>,
    },
    /// Print the proxy CA certificate (what hosts trust to use the proxy).
    ProxyShow {
        /// Directory of the proxy CA.
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
    /// Supernode asked before the origin (the next datacenter up the chain); repeatable.
    #[arg(long)]
    upstream: Vec<SocketAddr>,
    #[command(flatten)]
    origins: OriginPolicyArgs,
    #[command(flatten)]
    transport: TransportArgs,
}

/// Where origin fetches may connect, for the supernode and for `get` in embedded mode; each flag
/// has a `[supernode]` key.
#[derive(Args, Debug, Default)]
struct OriginPolicyArgs {
    /// Address or block (ADDR/LEN) origin fetches may connect to although the built-in policy
    /// refuses it (link-local, cloud metadata, unspecified, broadcast, multicast); repeatable.
    #[arg(long = "origin-allow", value_name = "CIDR")]
    origin_allow: Vec<String>,
    /// Address or block origin fetches must not connect to, like 127.0.0.0/8; repeatable. The
    /// most specific rule wins; at equal length a deny.
    #[arg(long = "origin-deny", value_name = "CIDR")]
    origin_deny: Vec<String>,
}

/// QUIC on the mesh, for both roles; each flag has a `[transport]` key.
#[derive(Args, Debug, Default)]
struct TransportArgs {
    /// Congestion controller: bbr, cubic or newreno [default: bbr].
    #[arg(long)]
    congestion: Option<String>,
    /// RTT assumed before the first sample, e.g. 100ms.
    #[arg(long)]
    initial_rtt: Option<String>,
    /// Receive window per stream, e.g. 4MiB.
    #[arg(long)]
    stream_window: Option<String>,
    /// Receive and send window per connection (at least bandwidth × RTT), e.g. 64MiB.
    #[arg(long)]
    connection_window: Option<String>,
    /// Keep-alive interval, e.g. 4s (0: none).
    #[arg(long)]
    keep_alive: Option<String>,
    /// A connection silent this long is dead, e.g. 30s.
    #[arg(long)]
    idle_timeout: Option<String>,
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
    /// Registry whose CONNECTs the proxy intercepts and whose blobs go through the mesh:
    /// HOST, HOST:PORT or *.DOMAIN; repeatable.
    #[arg(long = "registry")]
    registry: Vec<String>,
    /// Directory of the proxy CA [default: DATA_DIR/proxy-ca, created on first start].
    #[arg(long)]
    proxy_ca: Option<PathBuf>,
    /// Extra CA certificate (PEM) trusted for registries; repeatable.
    #[arg(long = "origin-ca")]
    origin_ca: Vec<PathBuf>,
    /// Registry served by the mirror on the proxy port when a request names none
    /// [default: registry-1.docker.io].
    #[arg(long)]
    mirror_upstream: Option<String>,
    /// Where the proxy may also connect: HOST:PORT, *:PORT, ADDR:PORT, ADDR or CIDR; repeatable.
    /// By default it tunnels to port 443 and the --registry ports only, and never to loopback,
    /// link-local or its own listeners (an address rule like 127.0.0.0/8 lifts that).
    #[arg(long = "proxy-allow")]
    proxy_allow: Vec<String>,
    /// TCP address for /metrics and /health, which then leave the proxy port.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// Test only: serve corrupt pieces, to exercise bad-peer isolation. Refused unless the
    /// environment sets `D7Q_DANGER_CORRUPT_UPLOADS=i-know-this-corrupts-data`.
    #[arg(long, hide = true)]
    danger_corrupt_uploads: bool,
    #[command(flatten)]
    transport: TransportArgs,
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
    /// Embedded mode: where the in-process supernode may fetch from.
    #[command(flatten)]
    origins: OriginPolicyArgs,
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
        Cmd::Get(_) | Cmd::Pull(_) => "off",
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
        Cmd::Pull(a) => crate::pull::main(*a).await,
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
        CaCmd::ProxyInit {
            dir,
            name_constraint,
        } => match name_constraint
            .iter()
            .find(|d| d.contains([':', '*']) || config::parse_registry(d).is_err())
        {
            Some(bad) => fail(
                exit::USAGE,
                &format!("--name-constraint {bad:?}: expected a DNS domain like corp.example"),
            ),
            None => proxy_init(&dir, &name_constraint),
        },
        CaCmd::ProxyShow { dir } => {
            let path = dir.join(crate::proxy::ca::CERT_FILE);
            match std::fs::read_to_string(&path) {
                Ok(pem) => {
                    print!("{pem}");
                    exit::OK
                }
                Err(e) => fail(exit::LOCAL, &format!("{}: {e}", path.display())),
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

/// `d7q ca proxy-init`: the proxy CA, optionally name-constrained.
fn proxy_init(dir: &std::path::Path, domains: &[String]) -> i32 {
    match crate::proxy::ca::ProxyCa::init_constrained(dir, domains) {
        Ok(_) => {
            println!(
                "proxy CA created: {}",
                dir.join(crate::proxy::ca::CERT_FILE).display()
            );
            exit::OK
        }
        Err(e) => fail(exit::LOCAL, &e.to_string()),
    }
}

async fn supernode(a: SupernodeArgs) -> i32 {
    let (cfg, metrics_addr, upstream) = match supernode_config(a) {
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
    sn.set_upstream(upstream);
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

/// Sets the process's QUIC tuning: flags over `[transport]` in the config file over defaults.
fn apply_transport(a: &TransportArgs, config: Option<&std::path::Path>) -> Result<(), String> {
    let file = match config {
        Some(path) => config::ConfigFile::load(path)
            .map_err(|e| e.to_string())?
            .transport
            .unwrap_or_default(),
        None => Default::default(),
    };
    let d = transport::Tuning::default();
    let dur =
        |flag: &Option<String>, name: &str, from_file: Option<std::time::Duration>, def| match flag
        {
            Some(s) => config::parse_duration(s).map_err(|e| format!("--{name}: {e}")),
            None => Ok(from_file.unwrap_or(def)),
        };
    let size = |flag: &Option<String>, name: &str, from_file: Option<u64>, def| match flag {
        Some(s) => config::parse_size(s).map_err(|e| format!("--{name}: {e}")),
        None => Ok(from_file.unwrap_or(def)),
    };
    let tuning = transport::Tuning {
        congestion: match &a.congestion {
            Some(s) => s.parse().map_err(|e| format!("--congestion: {e}"))?,
            None => file.congestion.unwrap_or(d.congestion),
        },
        initial_rtt: dur(
            &a.initial_rtt,
            "initial-rtt",
            file.initial_rtt,
            d.initial_rtt,
        )?,
        stream_window: size(
            &a.stream_window,
            "stream-window",
            file.stream_window,
            d.stream_window,
        )?,
        connection_window: size(
            &a.connection_window,
            "connection-window",
            file.connection_window,
            d.connection_window,
        )?,
        keep_alive: dur(&a.keep_alive, "keep-alive", file.keep_alive, d.keep_alive)?,
        idle_timeout: dur(
            &a.idle_timeout,
            "idle-timeout",
            file.idle_timeout,
            d.idle_timeout,
        )?,
    };
    transport::set_tuning(tuning).map_err(|e| format!("transport: {e}"))
}

/// Flags over the config file over defaults; every refusal names the flag or key.
fn supernode_config(
    a: SupernodeArgs,
) -> Result<(SupernodeConfig, SocketAddr, Vec<SocketAddr>), String> {
    apply_transport(&a.transport, a.config.as_deref())?;
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
    let policy = origin_policy(&a.origins, file.origin_allow, file.origin_deny)?;
    if !policy.is_builtin() {
        tracing::info!(rules = %policy, "origin policy");
    }
    crate::origin::set_process_policy(policy);
    let upstream = config::pick_list(a.upstream, file.upstream);
    Ok((cfg, metrics, upstream))
}

/// `--origin-allow`/`--origin-deny` over the config file's lists.
fn origin_policy(
    a: &OriginPolicyArgs,
    file_allow: Option<Vec<crate::cidr::Cidr>>,
    file_deny: Option<Vec<crate::cidr::Cidr>>,
) -> Result<crate::origin::policy::OriginPolicy, String> {
    let parse = |flag: &str, values: &[String]| {
        values
            .iter()
            .map(|v| crate::origin::policy::parse_block(v).map_err(|e| format!("--{flag}: {e}")))
            .collect::<Result<Vec<_>, _>>()
    };
    let allow = parse("origin-allow", &a.origin_allow)?;
    let deny = parse("origin-deny", &a.origin_deny)?;
    Ok(crate::origin::policy::OriginPolicy::new(
        config::pick_list(allow, file_allow),
        config::pick_list(deny, file_deny),
    ))
}

fn parse_default(addr: &str) -> SocketAddr {
    addr.parse().expect("built-in default address")
}

async fn daemon(a: Box<DaemonArgs>) -> i32 {
    let cfg = match daemon_config(*a) {
        Ok(c) => c,
        Err(e) => return fail(exit::USAGE, &e),
    };
    if cfg.danger_corrupt_uploads {
        tracing::warn!(
            "--danger-corrupt-uploads: this daemon serves CORRUPT pieces to its peers (a test \
             switch); never run it in a real cluster"
        );
    }
    let d = match Daemon::start(cfg).await {
        Ok(d) => d,
        Err(e) => return fail(exit::FAILURE, &format!("{e:#}")),
    };
    println!(
        "ready mesh={} proxy={} socket={}{}",
        d.mesh_addr(),
        d.proxy_addr(),
        d.socket().display(),
        d.metrics_addr()
            .map(|m| format!(" metrics={m}"))
            .unwrap_or_default()
    );
    let _ = std::io::stdout().flush();
    shutdown_signal().await;
    d.shutdown();
    exit::OK
}

/// Flags over the config file over defaults; every refusal names the flag or key.
fn daemon_config(a: DaemonArgs) -> Result<DaemonConfig, String> {
    apply_transport(&a.transport, a.config.as_deref())?;
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
        danger_corrupt_uploads: danger_corrupt_uploads(a.danger_corrupt_uploads)?,
        registries: {
            let mut regs = Vec::new();
            for r in &a.registry {
                regs.push(config::parse_registry(r).map_err(|e| format!("--registry {r:?}: {e}"))?);
            }
            config::pick_list(regs, file.registry.clone())
        },
        proxy_ca: a
            .proxy_ca
            .clone()
            .or_else(|| file.proxy_ca.as_ref().and_then(|c| c.dir.clone())),
        origin_ca: config::pick_list(a.origin_ca.clone(), file.origin_ca.clone()),
        mirror_upstream: config::pick(
            a.mirror_upstream.clone(),
            file.mirror_upstream.clone(),
            crate::proxy::DEFAULT_MIRROR_UPSTREAM.to_string(),
        ),
        proxy_allow: {
            let mut allow = Vec::new();
            for r in &a.proxy_allow {
                allow.push(r.parse().map_err(|e| format!("--proxy-allow: {e}"))?);
            }
            config::pick_list(allow, file.proxy_allow.clone())
        },
        metrics: a.metrics.or(file.metrics),
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

/// The environment variable that must name the danger before `--danger-corrupt-uploads` is
/// accepted, and the value it must have: a hidden flag alone is one typo in a unit file away
/// from a production daemon that corrupts every upload.
pub const DANGER_CORRUPT_UPLOADS_ENV: &str = "D7Q_DANGER_CORRUPT_UPLOADS";
/// See [`DANGER_CORRUPT_UPLOADS_ENV`].
pub const DANGER_CORRUPT_UPLOADS_ACK: &str = "i-know-this-corrupts-data";

/// `--danger-corrupt-uploads`, accepted only with [`DANGER_CORRUPT_UPLOADS_ENV`] set to
/// [`DANGER_CORRUPT_UPLOADS_ACK`].
fn danger_corrupt_uploads(flag: bool) -> Result<bool, String> {
    if !flag {
        return Ok(false);
    }
    match std::env::var(DANGER_CORRUPT_UPLOADS_ENV) {
        Ok(v) if v == DANGER_CORRUPT_UPLOADS_ACK => Ok(true),
        _ => Err(format!(
            "--danger-corrupt-uploads makes this daemon serve corrupt pieces (a test switch); \
             refused unless {DANGER_CORRUPT_UPLOADS_ENV}={DANGER_CORRUPT_UPLOADS_ACK} is set"
        )),
    }
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
            &format!(
                "{:?} is not an http:// or https:// URL",
                crate::origin::redacted(&a.url)
            ),
        );
    }
    match origin_policy(&a.origins, None, None) {
        Ok(p) => crate::origin::set_process_policy(p),
        Err(e) => return fail(exit::USAGE, &e),
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
    let redacted = serde_json::from_slice::<serde_json::Value>(&body)
        .is_ok_and(|v| v[admin::REDACTED_KEY] == true);
    if redacted {
        println!("  tasks hidden: present a certificate of the cluster CA (--pki) to list them");
    }
    for t in st.tasks {
        let len = t.length.map(human_bytes).unwrap_or_else(|| "?".into());
        println!(
            "  {} {:<9} {:>4}/{:<4} {:>10}  {}",
            t.id.get(..12).unwrap_or(&t.id),
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
