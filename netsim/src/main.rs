//! `netsim`: network emulation from the command line.
//!
//! `netsim relay --listen ADDR --to ADDR [--up CONFIG] [--down CONFIG] [--seed N] [--stats-json FILE]`
//! relays UDP from clients at ADDR to the server, impairing each direction, until SIGINT or
//! SIGTERM. It prints `ready listen=ADDR` (the bound address, so `--listen 127.0.0.1:0` works)
//! once it accepts packets, and on exit writes its statistics as JSON when asked.
//!
//! `netsim tun-link --ns-a A --ns-b B [--addr-a CIDR] [--addr-b CIDR] [--up CONFIG] [--down CONFIG]
//! [--seed N] [--mtu N] [--stats-json FILE]` joins two network namespaces (made if missing) with a
//! TUN device in each and puts every IP packet through the links (root). It prints `ready` once
//! packets flow; SIGINT or SIGTERM removes the devices and the namespaces it made.
//!
//! `netsim bench-link [--path tun|relay] [--up CONFIG] [--down CONFIG] [--seed N] [--probes N]
//! [--bytes N] [--json FILE]` measures what the tests do not assert: round trips and bulk goodput
//! through an emulated path on this machine, next to what the links scheduled and how late the
//! emulator ran (`tun`: TCP between two namespaces, root; `relay`: UDP on 127.0.0.1).
//!
//! `netsim scenario FILE --out DIR` runs a scenario file (see `d7q_netsim::scenario`) and writes
//! `DIR/result.json`, `DIR/summary.txt` and `DIR/completion.svg`; it exits 0 when every workload
//! node completed, 1 otherwise.

mod bench;

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use d7q_netsim::link::LinkConfig;
use d7q_netsim::relay::{Relay, RelayConfig, RelayStats};
use d7q_netsim::scenario::Scenario;
use d7q_netsim::tun::{self, TunLink, TunLinkConfig, TunLinkStats};

#[derive(Debug, Parser)]
#[command(
    name = "netsim",
    version,
    about = "Network emulation: impair UDP paths for testing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay UDP between clients and one server through an impaired link in each direction.
    Relay(RelayArgs),
    /// Join two network namespaces at the IP level through impaired links (root).
    TunLink(TunLinkArgs),
    /// Run a scenario file: namespaces per node, emulated links, real processes, faults (root).
    Scenario(ScenarioArgs),
    /// Measure round trips and bulk goodput through an emulated path on this machine.
    BenchLink(bench::BenchArgs),
}

#[derive(Debug, Args)]
struct ScenarioArgs {
    /// The scenario (TOML).
    file: PathBuf,
    /// Directory for the results and every node's output (created).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Only check the file and print what would run.
    #[arg(long)]
    check: bool,
}

#[derive(Debug, Args)]
struct TunLinkArgs {
    /// Namespace of side A (made if missing, removed at exit if made).
    #[arg(long, value_name = "NAME")]
    ns_a: String,
    /// Namespace of side B.
    #[arg(long, value_name = "NAME")]
    ns_b: String,
    /// Side A's address on its TUN device.
    #[arg(long, value_name = "CIDR", default_value = "10.77.0.1/30", value_parser = tun::parse_cidr)]
    addr_a: (Ipv4Addr, u8),
    /// Side B's address on its TUN device.
    #[arg(long, value_name = "CIDR", default_value = "10.77.0.2/30", value_parser = tun::parse_cidr)]
    addr_b: (Ipv4Addr, u8),
    /// A-to-B link, e.g. `delay=40ms,loss=1%,rate=100mbit`, or a JSON object.
    #[arg(long, value_name = "CONFIG", default_value = "none", value_parser = parse_link)]
    up: LinkConfig,
    /// B-to-A link, same syntax as --up.
    #[arg(long, value_name = "CONFIG", default_value = "none", value_parser = parse_link)]
    down: LinkConfig,
    /// Seed for the links' random decisions.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// MTU of both devices.
    #[arg(long, value_name = "BYTES", default_value_t = tun::DEFAULT_MTU)]
    mtu: u32,
    /// Name of the device in each namespace.
    #[arg(long, value_name = "NAME", default_value = "nstun0")]
    ifname: String,
    /// On exit, write statistics as JSON to this file.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
}

/// What `tun-link --stats-json` writes.
#[derive(Debug, Serialize)]
struct TunStatsFile<'a> {
    ns_a: &'a str,
    ns_b: &'a str,
    seed: u64,
    up_config: String,
    down_config: String,
    stats: &'a TunLinkStats,
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Address clients send to (port 0 picks a free port; see the `ready` line).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// The server to relay to.
    #[arg(long, value_name = "ADDR")]
    to: SocketAddr,
    /// Client-to-server link, e.g. `delay=40ms,loss=1%,rate=100mbit`, or a JSON object.
    #[arg(long, value_name = "CONFIG", default_value = "none", value_parser = parse_link)]
    up: LinkConfig,
    /// Server-to-client link, same syntax as --up.
    #[arg(long, value_name = "CONFIG", default_value = "none", value_parser = parse_link)]
    down: LinkConfig,
    /// Seed for the links' random decisions; the same seed replays the same fates.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
    /// On exit, write statistics as JSON to this file.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
}

/// What `--stats-json` writes: the statistics with what is needed to replay the run.
#[derive(Debug, Serialize)]
struct StatsFile<'a> {
    listen: SocketAddr,
    to: SocketAddr,
    seed: u64,
    up_config: String,
    down_config: String,
    stats: &'a RelayStats,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Relay(args) => relay(args).await,
        Command::TunLink(args) => tun_link(args).await,
        Command::Scenario(args) => scenario(args).await,
        Command::BenchLink(args) => bench::run(args).await,
    }
}

async fn scenario(args: ScenarioArgs) -> anyhow::Result<()> {
    let sc = Scenario::load(&args.file)?;
    if args.check {
        println!(
            "{}: {} datacenters, {} nodes, {} faults, {} metrics",
            args.file.display(),
            sc.file().dcs.len(),
            sc.file().nodes.len(),
            sc.file().faults.len(),
            sc.file().metrics.len()
        );
        return Ok(());
    }
    d7q_netsim::netns::privileged()
        .map_err(|why| anyhow::anyhow!("scenarios need root and /dev/net/tun: {why}"))?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let out = std::fs::canonicalize(&args.out)?;
    let result = tokio::select! {
        r = sc.run(&out) => r?,
        r = shutdown_signal() => {
            r?;
            anyhow::bail!("interrupted");
        }
    };
    print!("{}", d7q_netsim::scenario::summary(&result));
    println!("results: {}", out.display());
    if !result.all_done {
        std::process::exit(1);
    }
    Ok(())
}

async fn tun_link(args: TunLinkArgs) -> anyhow::Result<()> {
    let (up_config, down_config) = (args.up.to_string(), args.down.to_string());
    let config = TunLinkConfig {
        addr_a: args.addr_a,
        addr_b: args.addr_b,
        up: args.up,
        down: args.down,
        seed: args.seed,
        mtu: args.mtu,
        ifname: args.ifname,
        ..TunLinkConfig::new(&args.ns_a, &args.ns_b)
    };
    let link = TunLink::start(config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
    }
    shutdown_signal().await?;
    let stats = link.stats();
    drop(link);
    if let Some(path) = &args.stats_json {
        let file = TunStatsFile {
            ns_a: &args.ns_a,
            ns_b: &args.ns_b,
            seed: args.seed,
            up_config,
            down_config,
            stats: &stats,
        };
        write_atomically(path, &serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("writing statistics to {}", path.display()))?;
    }
    Ok(())
}

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let (up_config, down_config) = (args.up.to_string(), args.down.to_string());
    let config = RelayConfig {
        up: args.up,
        down: args.down,
        seed: args.seed,
        ..RelayConfig::new(args.listen, args.to)
    };
    let relay = Relay::bind(config).await?;
    let listen = relay.local_addr();
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready listen={listen}")?;
        out.flush()?;
    }
    shutdown_signal().await?;
    let stats = relay.handle().stats();
    drop(relay);
    if let Some(path) = &args.stats_json {
        let file = StatsFile {
            listen,
            to: args.to,
            seed: args.seed,
            up_config,
            down_config,
            stats: &stats,
        };
        write_atomically(path, &serde_json::to_vec_pretty(&file)?)
            .with_context(|| format!("writing statistics to {}", path.display()))?;
    }
    Ok(())
}

fn parse_link(text: &str) -> Result<LinkConfig, String> {
    if text.trim_start().starts_with('{') {
        let config: LinkConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    } else {
        text.parse()
            .map_err(|e: d7q_netsim::link::ConfigError| e.to_string())
    }
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result.context("waiting for SIGINT")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl-C")?;
    Ok(())
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}
