//! The baseline client: one HTTPS GET over TCP with hyper (HTTP/1.1) and rustls, the body
//! written to a file by a writer thread — optionally hashed with SHA-256 there — and fsynced,
//! as `d7q get` writes, verifies and fsyncs its output. It runs as its own process
//! (`d7q-bench https-get`) so it is timed like `d7q get`: from spawn to exit, start-up and TLS
//! handshake included. It prints one JSON line ([`Report`]) for the parent to check.
//!
//! Not a general client: no redirects, retries, proxies or HTTP/2, and anything but `200 OK` is
//! an error.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::header::{CONTENT_LENGTH, HOST};
use hyper::{Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;

use crate::util;

/// Body chunks queued toward the writer thread. hyper hands over what one read returned (up to
/// about 400 KiB), so this bounds the queue to a few MiB.
const WRITE_QUEUE_CHUNKS: usize = 32;

/// `d7q-bench https-get URL --ca FILE -o FILE [--sha256]`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// `https://HOST:PORT/PATH`.
    pub url: String,
    /// CA certificate (PEM) to trust for the server, the only root.
    #[arg(long)]
    pub ca: PathBuf,
    /// Output file (replaced).
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Hash the body with SHA-256 while writing it.
    #[arg(long)]
    pub sha256: bool,
}

/// What `https-get` prints on stdout, one JSON line.
#[derive(Debug, Serialize, Deserialize)]
pub struct Report {
    /// Body bytes written.
    pub bytes: u64,
    /// SHA-256 of the body, hex, with `--sha256`.
    pub sha256: Option<String>,
    /// The TLS cipher suite negotiated, for the record.
    pub cipher_suite: String,
}

/// Runs the `https-get` subcommand.
pub fn run(args: &Args) -> Result<()> {
    // One thread for the connection (TCP, TLS, HTTP) and one for the disk, as a single stream
    // needs no more; a multi-thread runtime would only add hand-offs.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let report = rt.block_on(get(args))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn get(args: &Args) -> Result<Report> {
    let uri: Uri = args
        .url
        .parse()
        .with_context(|| format!("{:?}", args.url))?;
    ensure!(uri.scheme_str() == Some("https"), "{uri} is not https://");
    let host = uri.host().context("URL without a host")?;
    let port = uri.port_u16().unwrap_or(443);
    let authority = uri.authority().context("URL without a host")?.to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();

    let tcp = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .with_context(|| format!("connecting to {authority}"))?;
    tcp.set_nodelay(true)?;
    let name = ServerName::try_from(host.trim_matches(['[', ']']).to_owned())?;
    let tls = TlsConnector::from(Arc::new(tls_config(&args.ca)?))
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS with {authority}"))?;
    let cipher_suite = tls
        .get_ref()
        .1
        .negotiated_cipher_suite()
        .map_or_else(|| "?".to_owned(), |s| format!("{:?}", s.suite()));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await?;
    let conn = tokio::spawn(conn);

    let req = Request::get(path)
        .header(HOST, &authority)
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        bail!("{}: {}", args.url, resp.status());
    }
    let declared: Option<u64> = resp
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok());

    let file = File::create(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let (tx, rx) = mpsc::channel(WRITE_QUEUE_CHUNKS);
    let hash = args.sha256;
    let writer = std::thread::spawn(move || write_body(file, rx, hash));
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.context("reading the body")?;
        if let Ok(data) = frame.into_data() {
            received += data.len() as u64;
            if tx.send(data).await.is_err() {
                break; // The writer stopped; its error is reported below.
            }
        }
    }
    drop(tx);
    let (written, digest) = writer
        .join()
        .map_err(|_| anyhow!("writer thread panicked"))?
        .with_context(|| format!("writing {}", args.output.display()))?;
    drop(sender);
    conn.abort();
    ensure!(
        written == received,
        "wrote {written} of {received} bytes received"
    );
    if let Some(n) = declared {
        ensure!(received == n, "received {received} of {n} bytes");
    }
    Ok(Report {
        bytes: written,
        sha256: digest.map(|d| util::hex(&d)),
        cipher_suite,
    })
}

/// Trusts the certificates in the PEM file `ca` only, and offers HTTP/1.1 only.
fn tls_config(ca: &Path) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).with_context(|| format!("{}", ca.display()))?;
    for cert in certs {
        roots.add(cert.with_context(|| format!("{}", ca.display()))?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The writer thread: appends each chunk, hashes it when asked, fsyncs at the end (as `d7q get`
/// does before renaming its output into place). Returns the bytes written and the digest.
fn write_body(
    mut file: File,
    mut rx: mpsc::Receiver<Bytes>,
    hash: bool,
) -> std::io::Result<(u64, Option<[u8; 32]>)> {
    let mut hasher = hash.then(Sha256::new);
    let mut written = 0u64;
    while let Some(chunk) = rx.blocking_recv() {
        file.write_all(&chunk)?;
        if let Some(h) = hasher.as_mut() {
            h.update(&chunk);
        }
        written += chunk.len() as u64;
    }
    file.sync_data()?;
    Ok((written, hasher.map(|h| h.finalize().into())))
}
