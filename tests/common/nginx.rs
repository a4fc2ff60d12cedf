//! Debian's nginx as an HTTPS origin that nobody here wrote: started by the test as a
//! foreground process (`daemon off`) with its own configuration, logs and temp dirs in the
//! sandbox, a certificate for `nginx.test` from a throwaway [`DevCa`], and its access log parsed
//! so a test can count which requests reached it.
//!
//! Two TLS servers share one document root and one set of locations: [`Nginx::h2`] offers
//! HTTP/2 and HTTP/1.1 by ALPN, [`Nginx::h1`] HTTP/1.1 only. The locations:
//!
//! - `/files/NAME`: static files from [`Nginx::root`] (Range, HEAD, Content-Length).
//! - `/filtered/NAME`: the same files through `sub_filter`, which replaces [`PLACEHOLDER`] with
//!   [`REPLACEMENT`]: nginx drops Content-Length and sends HTTP/1.1 bodies chunked.
//! - `/forbidden/…`: `deny all`, nginx's own 403.
//! - `/moved/NAME`: 301 to `/files/NAME` on the same server (absolute Location, nginx's default).
//! - `/elsewhere/NAME`: 302 to `/files/NAME` on the *other* server (absolute URL, other port).
//! - `/chain/NAME`: 302 → `/chain2/NAME` → 307 → `/moved/NAME` → 301 → `/files/NAME`, with
//!   relative Locations (`absolute_redirect off`).
//! - `/loop`: a 302 to itself.
//! - `/v2/…`: static files, so a directory laid out as `v2/NAME/blobs/sha256:HEX` is a
//!   pull-only registry for blobs (as static mirrors are).
//!
//! `nginx.test` resolves through `/etc/hosts` (the tests run as root), to [`NGINX_IP`].
//!
//! Not for: measuring anything; nginx's own modules beyond the few named here.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use d7q::devserver::DevCa;
use tokio::process::{Child, Command};

use super::{read_lossy, Env};

/// The origin's host name, in its certificate.
pub const NGINX_HOST: &str = "nginx.test";
/// Where `nginx.test` points.
pub const NGINX_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 4);
/// What `/filtered/` replaces…
pub const PLACEHOLDER: &str = "@@ORIGIN@@";
/// …and with what.
pub const REPLACEMENT: &str = "served-by-nginx";

/// Longest nginx may take to accept connections after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Times a start is tried (a free port picked by the test may be taken meanwhile).
const START_ATTEMPTS: usize = 3;
/// How long the access log must stay the same to count as settled.
const LOG_SETTLE: Duration = Duration::from_millis(200);
/// Most [`LOG_SETTLE`] rounds to wait for the access log to stop growing.
const LOG_SETTLE_ROUNDS: usize = 100;
/// Lock file serialising `/etc/hosts` edits between test processes (shared with the registry
/// harness, which edits the same file).
const HOSTS_LOCK: &str = "/tmp/d7q-tests-hosts.lock";

/// A running nginx, stopped on drop.
pub struct Nginx {
    child: Child,
    /// Port of the server that offers HTTP/2 (and HTTP/1.1) by ALPN.
    pub h2_port: u16,
    /// Port of the server that speaks HTTP/1.1 only.
    pub h1_port: u16,
    /// The CA that signed its certificate, as a PEM file for `--origin-ca`.
    pub ca_file: PathBuf,
    /// The document root: `files/` and `v2/` under it are served.
    pub root: PathBuf,
    access_log: PathBuf,
    error_log: PathBuf,
}

/// One line of the access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    /// The server port the request came to.
    pub port: u16,
    pub method: String,
    /// The path and query as sent.
    pub uri: String,
    pub status: u16,
    /// `HTTP/1.1` or `HTTP/2.0`.
    pub protocol: String,
    /// The request's Range header, `-` when it had none.
    pub range: String,
    /// The request's Authorization header, `-` when it had none.
    pub authorization: String,
}

impl Nginx {
    /// Starts nginx on two free ports of [`NGINX_IP`] and waits until both accept connections.
    pub async fn start(env: &Env) -> Self {
        ensure_host(NGINX_IP, NGINX_HOST).expect("add nginx.test to /etc/hosts (run as root)");
        let dir = env.dir("nginx");
        let root = env.dir("nginx/root");
        std::fs::create_dir_all(root.join("files")).expect("files dir");
        for sub in ["tmp", "logs"] {
            std::fs::create_dir_all(dir.join(sub)).expect("nginx dir");
        }
        let ca = DevCa::new();
        let ca_file = dir.join("ca.pem");
        ca.write_pem(&ca_file).expect("write nginx CA");
        let leaf = ca.issue(&[NGINX_HOST.to_owned()]).expect("certificate");
        std::fs::write(dir.join("server.crt"), &leaf.cert_pem).expect("write cert");
        std::fs::write(dir.join("server.key"), &leaf.key_pem).expect("write key");

        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            let (h2_port, h1_port) = (free_port(), free_port());
            if h1_port == h2_port {
                continue;
            }
            let access_log = dir.join(format!("logs/access-{attempt}.log"));
            let error_log = dir.join(format!("logs/error-{attempt}.log"));
            let config = dir.join("nginx.conf");
            std::fs::write(
                &config,
                config_text(&dir, &root, &access_log, &error_log, h2_port, h1_port),
            )
            .expect("write nginx.conf");
            // `-e` before the configuration is read: nginx must never open the system log.
            let mut child = Command::new("nginx")
                .arg("-p")
                .arg(&dir)
                .arg("-e")
                .arg(&error_log)
                .arg("-c")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(
                    std::fs::File::create(dir.join(format!("logs/stderr-{attempt}.log")))
                        .expect("nginx stderr"),
                ))
                .kill_on_drop(true)
                .spawn()
                .expect("spawn nginx (apt install nginx)");
            match wait_ready(&mut child, &[h2_port, h1_port]).await {
                Ok(()) => {
                    return Self {
                        child,
                        h2_port,
                        h1_port,
                        ca_file,
                        root,
                        access_log,
                        error_log,
                    }
                }
                Err(why) => {
                    let _ = child.kill().await;
                    last_failure = format!(
                        "{why}; error log:\n{}\nstderr:\n{}",
                        read_lossy(&error_log),
                        read_lossy(&dir.join(format!("logs/stderr-{attempt}.log")))
                    );
                }
            }
        }
        panic!("nginx did not start: {last_failure}");
    }

    /// `https://nginx.test:H2PORT{path}`.
    pub fn h2(&self, path: &str) -> String {
        format!("https://{NGINX_HOST}:{}{path}", self.h2_port)
    }

    /// `https://nginx.test:H1PORT{path}`.
    pub fn h1(&self, path: &str) -> String {
        format!("https://{NGINX_HOST}:{}{path}", self.h1_port)
    }

    /// `nginx.test:H2PORT`.
    pub fn h2_authority(&self) -> String {
        format!("{NGINX_HOST}:{}", self.h2_port)
    }

    /// Writes `len` deterministic pseudo-random bytes to `files/NAME`; their SHA-256, hex.
    pub fn file(&self, name: &str, len: u64) -> String {
        super::write_file(
            &self.root.join("files").join(name),
            len,
            super::seed_of(name),
        )
    }

    /// Writes `bytes` to `path` under the root (directories created).
    pub fn put(&self, path: &str, bytes: &[u8]) {
        let file = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().expect("a parent")).expect("create dirs");
        std::fs::write(file, bytes).expect("write file");
    }

    /// Every request in the access log so far.
    pub fn accesses(&self) -> Vec<Access> {
        read_lossy(&self.access_log)
            .lines()
            .filter_map(parse_access)
            .collect()
    }

    /// The access log once it has stopped growing (nginx writes a line when a request ends,
    /// which may be just after the client has its last byte).
    pub async fn settled_accesses(&self) -> Vec<Access> {
        let mut before = self.accesses();
        for _ in 0..LOG_SETTLE_ROUNDS {
            tokio::time::sleep(LOG_SETTLE).await;
            let now = self.accesses();
            if now == before {
                return now;
            }
            before = now;
        }
        panic!("nginx's access log kept growing:\n{}", self.access_log());
    }

    /// GET requests for exactly `uri` (on either server) after the log settled.
    pub async fn gets(&self, uri: &str) -> Vec<Access> {
        self.settled_accesses()
            .await
            .into_iter()
            .filter(|a| a.method == "GET" && a.uri == uri)
            .collect()
    }

    /// The access log, raw, for failure messages.
    pub fn access_log(&self) -> String {
        read_lossy(&self.access_log)
    }

    /// nginx's error log, for failure messages.
    pub fn error_log(&self) -> String {
        read_lossy(&self.error_log)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- nginx access log:\n{}\n--- nginx error log:\n{}",
                self.access_log(),
                self.error_log()
            );
        }
    }
}

/// Makes `name` resolve to `ip`: appends the line to `/etc/hosts` if missing, under a file lock
/// (tests run in parallel, in several processes).
pub fn ensure_host(ip: Ipv4Addr, name: &str) -> io::Result<()> {
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(HOSTS_LOCK)?;
    // SAFETY: flock on a file descriptor we own; it is released when `lock` is closed.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let present = hosts.lines().any(|line| {
        let mut fields = line.split('#').next().unwrap_or("").split_whitespace();
        fields.next() == Some(&ip.to_string()) && fields.any(|n| n == name)
    });
    if !present {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")?;
        if !hosts.is_empty() && !hosts.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        writeln!(file, "{ip} {name}")?;
    }
    drop(lock);
    Ok(())
}

/// The whole configuration: one worker, no daemon, everything under `dir`.
fn config_text(
    dir: &Path,
    root: &Path,
    access_log: &Path,
    error_log: &Path,
    h2_port: u16,
    h1_port: u16,
) -> String {
    // As root, nginx's workers would switch to `nobody`, who cannot read the sandbox (0700).
    // SAFETY: geteuid has no preconditions.
    let user = if unsafe { libc::geteuid() } == 0 {
        "user root root;\n"
    } else {
        ""
    };
    let d = dir.display();
    let server = |port: u16, http2: &str, other: u16| {
        format!(
            r#"
    server {{
        listen {NGINX_IP}:{port} ssl{http2};
        server_name {NGINX_HOST};
        ssl_certificate {d}/server.crt;
        ssl_certificate_key {d}/server.key;
        root {root};

        location /files/ {{ }}
        location /v2/ {{ }}
        location /filtered/ {{
            alias {root}/files/;
            sub_filter_types *;
            sub_filter '{PLACEHOLDER}' '{REPLACEMENT}';
            sub_filter_once off;
        }}
        location /forbidden/ {{ deny all; }}
        location ~ ^/moved/(.+)$ {{ return 301 /files/$1; }}
        location ~ ^/elsewhere/(.+)$ {{ return 302 https://{NGINX_HOST}:{other}/files/$1; }}
        location ~ ^/chain/(.+)$ {{ absolute_redirect off; return 302 /chain2/$1; }}
        location ~ ^/chain2/(.+)$ {{ absolute_redirect off; return 307 /moved/$1; }}
        location = /loop {{ return 302 /loop; }}
    }}
"#,
            root = root.display(),
        )
    };
    format!(
        "{user}daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {err} info;\nevents {{ worker_connections 256; }}\n\
         http {{\n    types {{ application/octet-stream bin; text/plain txt; }}\n    \
         default_type application/octet-stream;\n    \
         log_format d7q '$server_port\t$request_method\t$request_uri\t$status\t$server_protocol\t$http_range\t$http_authorization';\n    \
         access_log {access} d7q;\n    \
         client_body_temp_path {d}/tmp/body;\n    proxy_temp_path {d}/tmp/proxy;\n    \
         fastcgi_temp_path {d}/tmp/fastcgi;\n    uwsgi_temp_path {d}/tmp/uwsgi;\n    \
         scgi_temp_path {d}/tmp/scgi;\n    sendfile on;\n    keepalive_timeout 30s;\n{}{}}}\n",
        server(h2_port, " http2", h1_port),
        server(h1_port, "", h2_port),
        err = error_log.display(),
        access = access_log.display(),
    )
}

/// Waits until every port accepts a TCP connection, or nginx exits, or time runs out. nginx
/// listens before it starts its worker; a connection made meanwhile waits in the backlog.
async fn wait_ready(child: &mut Child, ports: &[u16]) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for &port in ports {
        let addr = SocketAddr::new(IpAddr::V4(NGINX_IP), port);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("nginx exited: {status}"));
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                return Err(format!("nothing listens on {addr} after {READY_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// A port free on [`NGINX_IP`] right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind((NGINX_IP, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// `PORT\tMETHOD\tURI\tSTATUS\tPROTOCOL\tRANGE\tAUTHORIZATION` → [`Access`].
fn parse_access(line: &str) -> Option<Access> {
    let mut f = line.split('\t');
    Some(Access {
        port: f.next()?.parse().ok()?,
        method: f.next()?.to_owned(),
        uri: f.next()?.to_owned(),
        status: f.next()?.parse().ok()?,
        protocol: f.next()?.to_owned(),
        range: f.next()?.to_owned(),
        authorization: f.next()?.to_owned(),
    })
}
