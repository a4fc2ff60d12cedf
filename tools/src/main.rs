//! `d7q-bench`: the benchmarks of d7q, one subcommand per measurement of `BENCH.md`.
//!
//! A map of the crate:
//!
//! - [`swarm`]: rows a and b, N peers through the mesh against N direct HTTPS downloads, on
//!   rate-limited links between network namespaces, held against the Kumar–Ross bound.
//! - [`transfer`]: row c, one transfer on loopback — the QUIC mesh against HTTPS over TCP.
//! - [`pullbench`]: row f, `docker pull` by the real Docker engine through a daemon's HTTPS
//!   proxy, cold and warm, against a direct pull; [`dockerd`] runs the engines and the registry.
//! - [`https`]: the baseline HTTPS client (hyper + rustls), run as its own process through the
//!   hidden `https-get` subcommand so it is timed exactly like `d7q get`.
//! - [`netns`]: namespaces, veth pairs, a bridge and `tbf` links for [`swarm`].
//! - [`origin`]: the processes [`swarm`] runs inside a namespace: the HTTPS origin and a
//!   `/metrics` reader (hidden `origin` and `scrape` subcommands).
//! - [`cc`]: the congestion controllers of the mesh's QUIC (BBR, CUBIC, NewReno) against each
//!   other through netsim's UDP relay at a long RTT and random loss — the measurement behind
//!   the default.
//! - [`wan`]: row d, goodput over a lossy long-RTT path (netsim's TUN link) — the mesh against
//!   curl over TCP, RTT × loss.
//! - [`util`]: child processes with wall-clock and CPU time, temp dirs, test data, statistics.
//!
//! Every benchmark interleaves its variants round by round, reports the median and the spread,
//! prints a table for people and writes a JSON file for machines. Absolute numbers mean little on
//! a shared machine; the ratios measured in one run are the result.

mod cc;
mod dockerd;
mod https;
mod netns;
mod origin;
mod pullbench;
mod sim;
mod swarm;
mod torrent;
mod transfer;
mod util;
mod wan;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Benchmarks for d7q (see BENCH.md): each compares d7q with a baseline in the same run.
#[derive(Parser, Debug)]
#[command(name = "d7q-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Rows a and b: N peers through the mesh vs N direct downloads, shaped links (root).
    Swarm(swarm::Args),
    /// Row c: one transfer on loopback, QUIC mesh vs HTTPS over TCP (hyper + rustls).
    Transfer(transfer::Args),
    /// Row f: `docker pull` through the daemon's proxy (cold, warm) vs direct (root, docker.io).
    Pull(pullbench::Args),
    /// Row d: goodput vs RTT and loss through a TUN link, mesh vs curl over TCP (root).
    Wan(wan::Args),
    /// QUIC congestion controllers (bbr, cubic, newreno) through the UDP relay: RTT × loss.
    Cc(cc::Args),
    /// Row h: the real scheduler and download machines over a simulated swarm (no root).
    Sim(sim::Args),
    /// One HTTPS GET to a file (the baseline client the benchmarks spawn).
    #[command(hide = true)]
    HttpsGet(https::Args),
    /// An HTTPS origin serving a directory, for a network namespace.
    #[command(hide = true)]
    Origin(origin::Args),
    /// One plain HTTP GET (a daemon's /metrics), body to stdout.
    #[command(hide = true)]
    Scrape(origin::ScrapeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.cmd {
        Cmd::Transfer(a) => transfer::run(a),
        Cmd::HttpsGet(a) => https::run(a),
        Cmd::Swarm(a) => swarm::run(a),
        Cmd::Pull(a) => pullbench::run(a),
        Cmd::Origin(a) => origin::run(a),
        Cmd::Scrape(a) => origin::scrape(a),
        Cmd::Wan(a) => wan::run(a),
        Cmd::Cc(a) => cc::run(a),
        Cmd::Sim(a) => sim::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("d7q-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
