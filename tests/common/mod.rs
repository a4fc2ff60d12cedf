//! Shared helpers for the end-to-end tests of the `d7q` binary: a sandbox per test (temp dir,
//! `HOME`, XDG dirs), processes that die with the test, deterministic test files and their
//! SHA-256, the cluster PKI, a supernode process, and an HTTPS origin ([`d7q::devserver`]).
//!
//! Every process run is bounded by a timeout, so a hung binary fails the test instead of hanging
//! the suite. Nothing here measures time: tests assert outcomes only.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

pub mod dockerd;
pub mod nginx;
pub mod registry;
pub mod token;

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use d7q::devserver::{DevCa, DevServer};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The proxy variables a client started by a test must not inherit: each test says itself
/// whether (and which) proxy a client uses.
pub const PROXY_ENV: [&str; 7] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "NO_PROXY",
    "no_proxy",
];

/// A command without the environment's proxy settings ([`PROXY_ENV`]).
pub trait NoProxyEnv {
    /// Removes [`PROXY_ENV`] from the command's environment.
    fn no_proxy_env(&mut self) -> &mut Self;
}

impl NoProxyEnv for tokio::process::Command {
    fn no_proxy_env(&mut self) -> &mut Self {
        for var in PROXY_ENV {
            self.env_remove(var);
        }
        self
    }
}

/// Piece size for files up to 1 GiB.
pub const PIECE: u64 = 1 << 20;

/// Longest a single `d7q` command may run before the test kills it and fails.
pub const TIMEOUT: Duration = Duration::from_secs(120);

/// Longest a supernode may take to print its `ready` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The path of the binary under test.
pub fn d7q() -> &'static str {
    env!("CARGO_BIN_EXE_d7q")
}

/// A sandbox for one test: a temp dir that also serves as `HOME` and the XDG dirs of every
/// process the test starts, so no test sees another's (or the user's) config, cache or daemon.
pub struct Env {
    dir: TempDir,
}

/// What a finished `d7q` command left behind.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// The command line, for messages.
    pub command: String,
}

/// The parts many tests start from: an HTTPS test origin, a cluster and a supernode that
/// trusts the origin's CA.
pub struct Setup {
    pub env: Env,
    pub origin: Origin,
    pub cluster: Cluster,
    pub sn: Supernode,
}

/// A fresh [`Setup`].
pub async fn setup() -> Setup {
    let env = Env::new();
    let origin = env.origin().await;
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    Setup {
        env,
        origin,
        cluster,
        sn,
    }
}

/// A cluster CA and the identities issued from it.
pub struct Cluster {
    /// The CA directory (`ca.pem`, `ca.key`).
    pub ca: PathBuf,
    /// A node identity for the supernode.
    pub supernode_pki: PathBuf,
    /// A node identity for clients.
    pub client_pki: PathBuf,
}

/// A running `d7q supernode`, killed on drop. Its stderr goes to a log file that is printed when
/// the test fails.
pub struct Supernode {
    child: Child,
    /// The mesh address from the `ready mesh=…` line.
    pub mesh: SocketAddr,
    /// Its `/metrics` address, from the `ready` line.
    pub metrics: Option<SocketAddr>,
    /// The whole `ready` line.
    pub ready_line: String,
    log: PathBuf,
}

/// A running `d7q daemon`.
pub struct Daemon {
    child: Child,
    /// Its mesh (upload) address.
    pub mesh: SocketAddr,
    /// Its proxy address.
    pub proxy: SocketAddr,
    /// Its `/metrics` address (`--metrics`, off the proxy port).
    pub metrics_addr: SocketAddr,
    /// Its local socket.
    pub socket: PathBuf,
    /// Its data directory.
    pub data_dir: PathBuf,
    log: PathBuf,
}

/// An HTTPS origin with its own CA, serving files from a directory of the sandbox.
pub struct Origin {
    pub server: DevServer,
    pub ca: DevCa,
    /// The CA certificate as a PEM file, for `--origin-ca` / `SSL_CERT_FILE`.
    pub ca_file: PathBuf,
    pub root: PathBuf,
}

/// A `d7q get` to run: build it up, then [`Get::run`].
pub struct Get<'a> {
    env: &'a Env,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    timeout: Duration,
}

impl Env {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("d7q-e2e-")
            .tempdir()
            .expect("temp dir");
        for sub in [
            "home",
            "xdg-config",
            "xdg-cache",
            "xdg-data",
            "xdg-state",
            "xdg-run",
        ] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("sandbox dir");
        }
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A new empty directory `name` in the sandbox.
    pub fn dir(&self, name: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::create_dir_all(&path).expect("create dir");
        path
    }

    /// A `d7q` command with the sandboxed environment; the process is killed if dropped.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(d7q());
        let p = self.path();
        cmd.env("HOME", p.join("home"))
            .env("XDG_CONFIG_HOME", p.join("xdg-config"))
            .env("XDG_CACHE_HOME", p.join("xdg-cache"))
            .env("XDG_DATA_HOME", p.join("xdg-data"))
            .env("XDG_STATE_HOME", p.join("xdg-state"))
            .env("XDG_RUNTIME_DIR", p.join("xdg-run"))
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env_remove("D7Q_LOG")
            .env_remove("RUST_LOG")
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("ALL_PROXY")
            .current_dir(p)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `d7q ARGS…` to completion (at most [`TIMEOUT`]).
    pub async fn run(&self, args: &[&str]) -> Output {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        self.run_with(&args, &[], TIMEOUT).await
    }

    /// Runs `d7q ARGS…` with extra environment variables, killing it after `timeout`.
    pub async fn run_with(
        &self,
        args: &[String],
        envs: &[(String, String)],
        timeout: Duration,
    ) -> Output {
        let command = format!("d7q {}", args.join(" "));
        let mut cmd = self.command();
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command}: {e}"));
        // Dropping the future on timeout drops the child, which kills it.
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                command,
            },
            Ok(Err(e)) => panic!("waiting for {command}: {e}"),
            Err(_) => panic!("{command} did not finish within {timeout:?}; killed"),
        }
    }

    /// `d7q ca init` into `NAME/` and, for each node name, `d7q ca issue` into `NAME-NODE/`.
    pub async fn ca(&self, name: &str, nodes: &[&str]) -> (PathBuf, Vec<PathBuf>) {
        let ca = self.path().join(name);
        let ca_str = ca.to_str().expect("utf-8 path");
        self.run(&["ca", "init", "--dir", ca_str]).await.ok();
        for file in ["ca.pem", "ca.key"] {
            assert!(ca.join(file).is_file(), "ca init did not write {file}");
        }
        let mut issued = Vec::new();
        for node in nodes {
            let out = self.path().join(format!("{name}-{node}"));
            let out_str = out.to_str().expect("utf-8 path");
            self.run(&[
                "ca", "issue", "--dir", ca_str, "--name", node, "--out", out_str,
            ])
            .await
            .ok();
            for file in ["ca.pem", "node.pem", "node.key"] {
                assert!(out.join(file).is_file(), "ca issue did not write {file}");
            }
            issued.push(out);
        }
        (ca, issued)
    }

    /// A cluster CA with one supernode identity and one client identity.
    pub async fn cluster(&self) -> Cluster {
        let (ca, nodes) = self.ca("cluster", &["supernode", "client"]).await;
        Cluster {
            ca,
            supernode_pki: nodes[0].clone(),
            client_pki: nodes[1].clone(),
        }
    }

    /// Starts `d7q supernode` on a free port with identity `pki`, trusting `origin_ca` for
    /// origins, and waits for its `ready mesh=…` line.
    pub async fn supernode(&self, pki: &Path, origin_ca: Option<&Path>) -> Supernode {
        self.supernode_with(pki, origin_ca, &[]).await
    }

    /// [`Env::supernode`] with `extra` flags.
    pub async fn supernode_with(
        &self,
        pki: &Path,
        origin_ca: Option<&Path>,
        extra: &[&str],
    ) -> Supernode {
        let name = pki.file_name().and_then(|n| n.to_str()).unwrap_or("sn");
        let data = self.dir(&format!("supernode-data-{name}"));
        let log = self.path().join(format!("supernode-{name}.log"));
        let log_file = std::fs::File::create(&log).expect("supernode log");
        let mut cmd = self.command();
        cmd.args([
            "supernode",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data)
        .arg("--pki")
        .arg(pki);
        if let Some(ca) = origin_ca {
            cmd.arg("--origin-ca").arg(ca);
        }
        cmd.args(extra);
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(log_file));
        let mut child = cmd.spawn().expect("spawn supernode");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.ok().flatten() {
                if line.starts_with("ready ") {
                    return Some(line);
                }
            }
            None
        })
        .await;
        let line = match ready {
            Ok(Some(line)) => line,
            Ok(None) => {
                let status = child.wait().await;
                panic!(
                    "supernode exited before it was ready ({status:?}); log:\n{}",
                    read_lossy(&log)
                )
            }
            Err(_) => panic!(
                "supernode not ready within {READY_TIMEOUT:?}; log:\n{}",
                read_lossy(&log)
            ),
        };
        let mesh = field(&line, "mesh")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no mesh=ADDR in the ready line {line:?}"));
        // Keep draining stdout so the supernode never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let metrics = field(&line, "metrics").and_then(|v| v.parse().ok());
        Supernode {
            child,
            mesh,
            metrics,
            ready_line: line,
            log,
        }
    }

    /// Starts `d7q daemon` with identity `pki` against `supernodes`, plus `extra` flags, and
    /// waits for its `ready mesh=… proxy=… socket=…` line.
    pub async fn daemon(&self, pki: &Path, supernodes: &[&Supernode], extra: &[&str]) -> Daemon {
        self.daemon_with_env(pki, supernodes, extra, &[]).await
    }

    /// [`Env::daemon`] with extra environment variables (`NAME`, `VALUE`).
    pub async fn daemon_with_env(
        &self,
        pki: &Path,
        supernodes: &[&Supernode],
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Daemon {
        let name = pki
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("daemon")
            .to_string();
        let data_dir = self.dir(&format!("daemon-data-{name}"));
        let socket = self.path().join(format!("{name}.sock"));
        let log = self.path().join(format!("daemon-{name}.log"));
        let log_file = std::fs::File::create(&log).expect("daemon log");
        let mut cmd = self.command();
        cmd.args([
            "daemon",
            "--listen",
            "127.0.0.1:0",
            "--proxy",
            "127.0.0.1:0",
            "--data-dir",
        ])
        .arg(&data_dir)
        .arg("--pki")
        .arg(pki)
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics", "127.0.0.1:0"])
        .args(extra);
        // Test origins and registries listen on loopback, where the proxy connects only when
        // told; a test that sets its own --proxy-allow gets exactly what it asked for.
        if !extra.contains(&"--proxy-allow") {
            cmd.args(["--proxy-allow", "127.0.0.0/8"]);
        }
        for sn in supernodes {
            cmd.arg("--supernode").arg(sn.addr());
        }
        cmd.envs(envs.iter().copied());
        cmd.stdout(Stdio::piped()).stderr(Stdio::from(log_file));
        let mut child = cmd.spawn().expect("spawn daemon");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.ok().flatten() {
                if line.starts_with("ready ") {
                    return Some(line);
                }
            }
            None
        })
        .await;
        let Ok(Some(line)) = ready else {
            let _ = child.start_kill();
            panic!("daemon {name} not ready; log:\n{}", read_lossy(&log));
        };
        let addr = |key: &str| -> SocketAddr {
            field(&line, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {key}=ADDR in {line:?}"))
        };
        let (mesh, proxy, metrics_addr) = (addr("mesh"), addr("proxy"), addr("metrics"));
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Daemon {
            child,
            mesh,
            proxy,
            metrics_addr,
            socket,
            data_dir,
            log,
        }
    }

    /// An HTTPS origin with a fresh CA, serving `origin/` of the sandbox.
    pub async fn origin(&self) -> Origin {
        let root = self.dir("origin");
        let ca = DevCa::new();
        let ca_file = self.path().join("origin-ca.pem");
        ca.write_pem(&ca_file).expect("write origin CA");
        let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let server = DevServer::start(root.clone(), bind, Some(&ca))
            .await
            .expect("start origin");
        Origin {
            server,
            ca,
            ca_file,
            root,
        }
    }

    /// A `d7q get URL -o OUT`, to be completed with flags and run.
    pub fn get(&self, url: &str, out: &Path) -> Get<'_> {
        Get {
            env: self,
            args: vec![
                "get".into(),
                url.into(),
                "-o".into(),
                out.to_str().expect("utf-8 path").into(),
            ],
            envs: Vec::new(),
            timeout: TIMEOUT,
        }
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Output {
    /// Asserts success; returns self for chaining.
    #[track_caller]
    pub fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "`{}` failed:\n{self}", self.command);
        self
    }

    /// Asserts exit code `code` and a one-line `d7q: ` message on stderr containing `needle`.
    #[track_caller]
    pub fn fails(&self, code: i32, needle: &str) -> &Self {
        assert_eq!(
            self.code, code,
            "`{}`: wrong exit code (want {code}):\n{self}",
            self.command
        );
        let message = self.stderr.trim_end();
        assert!(
            message.starts_with("d7q: ") && !message.contains('\n'),
            "`{}`: stderr is not one `d7q: ` line:\n{self}",
            self.command
        );
        assert!(
            message.contains(needle),
            "`{}`: stderr lacks {needle:?}:\n{self}",
            self.command
        );
        self
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit code {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

impl Supernode {
    /// Kills the supernode (SIGKILL) and waits for it.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// `--supernode ADDR`.
    pub fn addr(&self) -> String {
        self.mesh.to_string()
    }

    /// The supernode's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }
}

impl Drop for Supernode {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- supernode {} log ({}):\n{}",
                self.mesh,
                self.log.display(),
                tail(&read_lossy(&self.log), 200)
            );
        }
    }
}

impl Daemon {
    /// The daemon's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// `--daemon SOCKET` for `d7q get`.
    pub fn socket_arg(&self) -> &str {
        self.socket.to_str().expect("utf-8 path")
    }

    /// Its Prometheus metrics, parsed into `name{labels}` → value.
    pub async fn metrics(&self) -> std::collections::BTreeMap<String, f64> {
        scrape(self.metrics_addr).await
    }

    /// Stops the daemon (SIGKILL).
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// Its process id (`None` once it has been reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Sends `signal` (`libc::SIGSTOP`, `SIGCONT`, `SIGTERM`, `SIGKILL`…) to the daemon without
    /// waiting for it; a no-op once the process has been reaped.
    pub fn signal(&self, signal: i32) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
            // not yet reaped, so it cannot have been reused.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    /// Waits at most `timeout` for the process to exit (after a signal); its exit status.
    pub async fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(Ok(status)) => status,
            Ok(Err(e)) => panic!("waiting for daemon {}: {e}", self.mesh),
            Err(_) => panic!("daemon {} did not exit within {timeout:?}", self.mesh),
        }
    }

    /// One metric by its full `name{labels}` key. A key the daemon does not export fails the
    /// test (see [`metric_of`]).
    #[track_caller]
    pub fn metric(&self, key: &str) -> impl std::future::Future<Output = f64> + '_ {
        // `#[track_caller]` does not reach into an `async fn`'s body: take the caller here.
        let caller = std::panic::Location::caller();
        let key = key.to_owned();
        async move { metric_at(&self.metrics().await, &key, caller) }
    }

    /// Verified bytes it received from every source (`d7q_download_bytes_total`, summed).
    pub async fn downloaded(&self) -> f64 {
        downloaded(&self.metrics().await)
    }
}

/// One series of parsed metrics by its full `name{labels}` key. A missing key fails the test,
/// naming the key and the series of the same metric name that are present: a renamed metric or
/// label must not read as 0 and let "equals 0" pass.
#[track_caller]
pub fn metric_of(metrics: &std::collections::BTreeMap<String, f64>, key: &str) -> f64 {
    metric_at(metrics, key, std::panic::Location::caller())
}

fn metric_at(
    metrics: &std::collections::BTreeMap<String, f64>,
    key: &str,
    caller: &std::panic::Location<'_>,
) -> f64 {
    if let Some(v) = metrics.get(key) {
        return *v;
    }
    let name = key.split('{').next().unwrap_or(key);
    // The same metric under other labels, else anything sharing the name's first two words.
    let stem: String = name.splitn(3, '_').take(2).collect::<Vec<_>>().join("_");
    let mut similar: Vec<&str> = metrics
        .keys()
        .filter(|k| k.split('{').next() == Some(name))
        .map(String::as_str)
        .collect();
    if similar.is_empty() {
        similar = metrics
            .keys()
            .filter(|k| k.starts_with(&stem))
            .map(String::as_str)
            .collect();
    }
    panic!(
        "{caller}: no metric {key:?} is exported ({} series scraped); similar: {}",
        metrics.len(),
        if similar.is_empty() {
            "none".to_string()
        } else {
            similar.join(", ")
        }
    )
}

/// `d7q_download_bytes_total` summed over its sources, from parsed metrics.
pub fn downloaded(metrics: &std::collections::BTreeMap<String, f64>) -> f64 {
    metrics
        .iter()
        .filter(|(k, _)| k.starts_with("d7q_download_bytes_total{"))
        .map(|(_, v)| v)
        .sum()
}

/// `d7q_download_bytes_total{source="peer"}`.
pub const PEER_BYTES: &str = "d7q_download_bytes_total{source=\"peer\"}";
/// `d7q_piece_failures_total{reason="digest_mismatch"}`.
pub const DIGEST_MISMATCHES: &str = "d7q_piece_failures_total{reason=\"digest_mismatch\"}";
/// `d7q_upload_bytes_total`.
pub const UPLOAD_BYTES: &str = "d7q_upload_bytes_total";
/// `d7q_tasks{state="running"}`.
pub const TASKS_RUNNING: &str = "d7q_tasks{state=\"running\"}";

/// Polls `probe` every `every` until it yields a value, for at most `limit`; `None` if it never
/// did. For waiting on a process's state (a metric crossing a threshold) without sleeping for
/// a guessed time.
pub async fn poll_until<T, F, Fut>(limit: Duration, every: Duration, mut probe: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    tokio::time::timeout(limit, async {
        loop {
            if let Some(v) = probe().await {
                return v;
            }
            tokio::time::sleep(every).await;
        }
    })
    .await
    .ok()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!(
                "--- daemon {} log:\n{}",
                self.mesh,
                tail(&read_lossy(&self.log), 100)
            );
        }
    }
}

impl Origin {
    /// Writes `len` bytes of pseudo-random content (seeded by `name`) to `name` under the root;
    /// returns its SHA-256, hex.
    pub fn file(&self, name: &str, len: u64) -> String {
        write_file(&self.root.join(name), len, seed_of(name))
    }

    /// The URL of `name`.
    pub fn url(&self, name: &str) -> String {
        self.server.url(&format!("/{name}"))
    }

    /// GET requests that reached `name`.
    pub fn gets(&self, name: &str) -> u64 {
        self.server.get_count(&format!("/{name}"))
    }
}

impl<'a> Get<'a> {
    /// Through this supernode, with this identity.
    pub fn via(mut self, supernode: &Supernode, pki: &Path) -> Self {
        self.args.push("--supernode".into());
        self.args.push(supernode.addr());
        self.pki(pki)
    }

    pub fn pki(mut self, pki: &Path) -> Self {
        self.args.push("--pki".into());
        self.args.push(pki.to_str().expect("utf-8 path").into());
        self
    }

    pub fn origin_ca(mut self, file: &Path) -> Self {
        self.args.push("--origin-ca".into());
        self.args.push(file.to_str().expect("utf-8 path").into());
        self
    }

    /// `--digest sha256:HEX`.
    pub fn digest(mut self, sha256_hex: &str) -> Self {
        self.args.push("--digest".into());
        self.args.push(format!("sha256:{sha256_hex}"));
        self
    }

    /// `--header 'NAME: VALUE'`.
    pub fn header(mut self, header: &str) -> Self {
        self.args.push("--header".into());
        self.args.push(header.into());
        self
    }

    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub async fn run(self) -> Output {
        self.env
            .run_with(&self.args, &self.envs, self.timeout)
            .await
    }
}

/// Value of `key=` in a line of space-separated `key=value` fields.
pub fn field<'l>(line: &'l str, key: &str) -> Option<&'l str> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))
}

/// Writes `len` deterministic pseudo-random bytes to `path` without holding them in memory and
/// returns their SHA-256, hex. Content is made block by block: one pseudo-random 1 MiB block from
/// `seed`, with the block index mixed into every word, so every piece differs.
pub fn write_file(path: &Path, len: u64, seed: u64) -> String {
    const BLOCK: usize = 1 << 20;
    let mut base = vec![0u64; BLOCK / 8];
    let mut state = seed;
    for word in &mut base {
        *word = splitmix64(&mut state);
    }
    let mut out = io::BufWriter::with_capacity(BLOCK, std::fs::File::create(path).expect("create"));
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; BLOCK];
    let mut written = 0u64;
    let mut index = 0u64;
    while written < len {
        let mut mix_state = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mix = splitmix64(&mut mix_state);
        for (chunk, word) in block.chunks_exact_mut(8).zip(&base) {
            chunk.copy_from_slice(&(word ^ mix).to_le_bytes());
        }
        let n = (len - written).min(BLOCK as u64) as usize;
        out.write_all(&block[..n]).expect("write");
        hasher.update(&block[..n]);
        written += n as u64;
        index += 1;
    }
    out.into_inner().expect("flush").sync_all().expect("sync");
    hex(&hasher.finalize())
}

/// SHA-256 of a file, hex, read in chunks.
pub fn sha256_file(path: &Path) -> String {
    let mut file =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex(&hasher.finalize())
}

/// SHA-256 of bytes, hex.
pub fn sha256(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

/// Asserts that `dir` holds exactly the entries `names` (so no temp file is left beside them).
#[track_caller]
pub fn assert_only(dir: &Path, names: &[&str]) {
    let found: BTreeSet<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
    assert_eq!(found, want, "unexpected contents of {}", dir.display());
}

/// A TCP port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A UDP port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.local_addr().expect("addr").port()
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn seed_of(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Scrapes a `/metrics` endpoint, parsed into `name{labels}` → value.
pub async fn scrape(addr: SocketAddr) -> std::collections::BTreeMap<String, f64> {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("metrics connect");

    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: d7q\r\nConnection: close\r\n\r\n")
        .await
        .expect("metrics request");
    let mut body = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut body)
        .await
        .expect("metrics read");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}
