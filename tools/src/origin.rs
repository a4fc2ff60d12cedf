//! Processes the namespace benchmarks start inside a node's network namespace, where the
//! benchmark itself cannot reach:
//!
//! - `d7q-bench origin`: a [`DevServer`] over HTTPS, bound to the node's address, with a fresh
//!   [`DevCa`] whose certificate it writes for the clients. It prints `ready URL` (the URL of
//!   `/`), then answers each `stats PATH` line on stdin with one JSON line ([`Stats`]): the body
//!   bytes it has sent, counted at the origin, and the GETs of `PATH`. It stops at the end of its
//!   stdin — so it never outlives the benchmark that started it — or on SIGTERM, printing its
//!   stats once more.
//! - `d7q-bench scrape`: one plain HTTP GET to `127.0.0.1` inside the namespace (a daemon's
//!   `/metrics`), the body printed on stdout.
//!
//! Not general servers or clients: no HTTP/2 toward `scrape`, no redirects, no TLS.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use d7q::devserver::{DevCa, DevServer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

/// Longest a `scrape` may take, connect to last byte.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

/// `d7q-bench origin --root DIR --listen ADDR --ca-out FILE`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory whose files are served.
    #[arg(long)]
    pub root: PathBuf,
    /// TCP address to listen on (the namespace's own address; port 0 picks one).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Where to write the CA certificate (PEM) the clients must trust.
    #[arg(long)]
    pub ca_out: PathBuf,
    /// Offer HTTP/1.1 only (default: h2 and HTTP/1.1).
    #[arg(long)]
    pub http1_only: bool,
}

/// The origin's answer to `stats PATH`.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Body bytes handed to connections since start, all paths together: the egress.
    pub body_bytes: u64,
    /// GET requests of the path asked about.
    pub gets: u64,
}

/// `d7q-bench scrape ADDR PATH`.
#[derive(clap::Args, Debug)]
pub struct ScrapeArgs {
    /// `IP:PORT` of the HTTP server.
    pub addr: SocketAddr,
    /// Path to GET.
    #[arg(default_value = "/metrics")]
    pub path: String,
}

/// Runs the `origin` subcommand.
pub fn run(args: &Args) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(args))
}

/// Runs the `scrape` subcommand.
pub fn scrape(args: &ScrapeArgs) -> Result<()> {
    let mut tcp = TcpStream::connect_timeout(&args.addr, SCRAPE_TIMEOUT)
        .with_context(|| format!("connecting to {}", args.addr))?;
    tcp.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    // HTTP/1.0: the server answers with a length or closes, never chunks.
    write!(
        tcp,
        "GET {} HTTP/1.0\r\nHost: {}\r\n\r\n",
        args.path, args.addr
    )?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("no end of the response head")?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("GET {} from {}: {status}", args.path, args.addr);
    }
    print!("{body}");
    Ok(())
}

async fn serve(args: &Args) -> Result<()> {
    let ca = DevCa::new();
    ca.write_pem(&args.ca_out)
        .with_context(|| format!("writing {}", args.ca_out.display()))?;
    let server = DevServer::builder(args.root.clone())
        .bind(args.listen)
        .tls(&ca)
        .extra_name(args.listen.ip().to_string())
        .http2(!args.http1_only)
        .start()
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let mut out = tokio::io::stdout();
    out.write_all(format!("ready {}\n", server.url("/")).as_bytes())
        .await?;
    out.flush().await?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut last_path = String::from("/");
    loop {
        let line = tokio::select! {
            line = lines.next_line() => line?,
            _ = term.recv() => None,
        };
        let Some(line) = line else { break };
        let Some(path) = line.trim().strip_prefix("stats") else {
            bail!("unknown command {line:?} (expected `stats PATH`)");
        };
        let path = path.trim();
        if !path.is_empty() {
            last_path = path.to_owned();
        }
        write_stats(&mut out, &server, &last_path).await?;
    }
    write_stats(&mut out, &server, &last_path).await?;
    server.shutdown().await;
    Ok(())
}

async fn write_stats(out: &mut tokio::io::Stdout, server: &DevServer, path: &str) -> Result<()> {
    let stats = Stats {
        body_bytes: server.body_bytes_sent(),
        gets: server.get_count(path),
    };
    out.write_all((serde_json::to_string(&stats)? + "\n").as_bytes())
        .await?;
    out.flush().await?;
    Ok(())
}
