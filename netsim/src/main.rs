//! `netsim`: network emulation from the command line.
//!
//! `netsim relay --listen ADDR --to ADDR [--up CONFIG] [--down CONFIG] [--seed N] [--stats-json FILE]`
//! relays UDP from clients at ADDR to the server, impairing each direction, until SIGINT or
//! SIGTERM. It prints `ready listen=ADDR` (the bound address, so `--listen 127.0.0.1:0` works)
//! once it accepts packets, and on exit writes its statistics as JSON when asked.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use d7q_netsim::link::LinkConfig;
use d7q_netsim::relay::{Relay, RelayConfig, RelayStats};

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
    }
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
