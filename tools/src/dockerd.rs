//! Real programs for the `pull` benchmark: a Docker engine (`dockerd` started by hand with its own
//! socket, data root, exec root and containerd, `vfs` storage, no networking) and Debian's
//! `docker-registry` over TLS under the name `registry.test`.
//!
//! Go clients never send `localhost` or IP literals through `HTTPS_PROXY`, so the registry is
//! reached by name: [`ensure_hosts`] maps `registry.test` to 127.0.0.2 in `/etc/hosts` (the
//! benchmark runs as root, like the tests that share the name).
//!
//! Not for tests: `tests/common/dockerd.rs` and `tests/common/registry.rs` are the test harness;
//! this is the benchmark's leaner copy (no auth, no access-log parsing beyond byte counts).

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use d7q::devserver::DevCa;
use tokio::process::{Child, Command};

use crate::util;

/// The registry's host name.
pub const REGISTRY_HOST: &str = "registry.test";
/// Where [`REGISTRY_HOST`] points.
pub const REGISTRY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// Where a Debian machine keeps the system roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Longest an engine or the registry may take to answer after it was started.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest an engine gets to shut down on SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Makes `registry.test` resolve to [`REGISTRY_IP`]: appends the line to `/etc/hosts` if no line
/// maps it there already.
pub fn ensure_hosts() -> Result<()> {
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let ip = REGISTRY_IP.to_string();
    let present = hosts.lines().any(|line| {
        let mut fields = line.split('#').next().unwrap_or("").split_whitespace();
        fields.next() == Some(ip.as_str()) && fields.any(|n| n == REGISTRY_HOST)
    });
    if !present {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")
            .context("opening /etc/hosts to add registry.test (run as root)")?;
        let sep = if hosts.is_empty() || hosts.ends_with('\n') {
            ""
        } else {
            "\n"
        };
        writeln!(file, "{sep}{ip} {REGISTRY_HOST}").context("writing /etc/hosts")?;
    }
    Ok(())
}

/// A running `docker-registry` without auth, over TLS, killed on drop.
pub struct Registry {
    _child: Child,
    /// Its port on [`REGISTRY_IP`].
    pub port: u16,
    /// The CA that signed its certificate, PEM.
    pub ca_pem: String,
    /// The CA as a file (`--origin-ca`).
    pub ca_file: PathBuf,
    access_log: PathBuf,
}

impl Registry {
    /// Starts a registry storing under `dir` and waits until it accepts connections.
    pub async fn start(dir: &Path) -> Result<Self> {
        ensure_hosts()?;
        std::fs::create_dir_all(dir)?;
        let ca = DevCa::new();
        let ca_file = dir.join("ca.pem");
        ca.write_pem(&ca_file)?;
        let leaf = ca.issue(&[REGISTRY_HOST.to_owned()])?;
        let (crt, key) = (dir.join("registry.crt"), dir.join("registry.key"));
        std::fs::write(&crt, &leaf.cert_pem)?;
        std::fs::write(&key, &leaf.key_pem)?;
        let port = std::net::TcpListener::bind((REGISTRY_IP, 0))?
            .local_addr()?
            .port();
        let config = dir.join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {data}\n\
                 http:\n  addr: {REGISTRY_IP}:{port}\n  secret: d7q-bench\n  tls:\n    \
                 certificate: {crt}\n    key: {key}\n",
                data = dir.join("data").display(),
                crt = crt.display(),
                key = key.display(),
            ),
        )?;
        let access_log = dir.join("access.log");
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&access_log)?)
            .stderr(std::fs::File::create(dir.join("registry.log"))?)
            .kill_on_drop(true)
            .spawn()
            .context("spawning docker-registry (apt install docker-registry)")?;
        let addr = SocketAddr::from((REGISTRY_IP, port));
        let deadline = Instant::now() + READY_TIMEOUT;
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            if let Some(status) = child.try_wait()? {
                bail!("docker-registry exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("docker-registry not listening on {addr} within {READY_TIMEOUT:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Self {
            _child: child,
            port,
            ca_pem: ca.cert_pem.clone(),
            ca_file,
            access_log,
        })
    }

    /// `registry.test:PORT`.
    pub fn host(&self) -> String {
        format!("{REGISTRY_HOST}:{}", self.port)
    }

    /// Writes a CA bundle for `SSL_CERT_FILE`: the system roots, the registry's CA and `extra`
    /// PEM text (a proxy CA).
    pub fn bundle(&self, path: &Path, extra: &str) -> Result<()> {
        let mut pem = std::fs::read_to_string(SYSTEM_ROOTS).unwrap_or_default();
        pem.push('\n');
        pem.push_str(&self.ca_pem);
        pem.push('\n');
        pem.push_str(extra);
        std::fs::write(path, pem).with_context(|| format!("writing {}", path.display()))
    }

    /// Body bytes of successful blob GETs in the access log, and the number of log lines (a
    /// mark: pass it back to count only what came after).
    pub fn blob_bytes_since(&self, mark: usize) -> (u64, usize) {
        let text = std::fs::read_to_string(&self.access_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let bytes = lines
            .iter()
            .skip(mark)
            .filter_map(|line| blob_get_bytes(line))
            .sum();
        (bytes, lines.len())
    }
}

/// `… "GET /v2/x/blobs/sha256:… HTTP/1.1" 200 1234 …` → 1234 for a 2xx blob GET.
fn blob_get_bytes(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    if parts.next()? != "GET" || !parts.next()?.contains("/blobs/sha256:") {
        return None;
    }
    let mut fields = rest.split_whitespace();
    let status: u16 = fields.next()?.parse().ok()?;
    let bytes: u64 = fields.next()?.parse().ok()?;
    (200..300).contains(&status).then_some(bytes)
}

/// A running `dockerd`; [`Engine::stop`] (or drop) ends it and removes its directory.
pub struct Engine {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Engine {
    /// Starts an engine under `dir` (created; removed on stop), going through the HTTP proxy
    /// `proxy` if given and trusting exactly the CAs in `bundle`.
    pub async fn start(dir: &Path, proxy: Option<SocketAddr>, bundle: &Path) -> Result<Self> {
        for sub in ["data", "exec", "home", "cli"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let socket = dir.join("docker.sock");
        let config = dir.join("daemon.json");
        std::fs::write(&config, "{}\n")?;
        let log = std::fs::File::create(dir.join("dockerd.log"))?;
        let mut cmd = Command::new("dockerd");
        cmd.env_clear()
            .env("PATH", search_path())
            .env("HOME", dir.join("home"))
            .env("SSL_CERT_FILE", bundle)
            .args([
                "--storage-driver=vfs",
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
            ])
            .arg(format!("--host=unix://{}", socket.display()))
            .arg(format!("--config-file={}", config.display()))
            .arg(format!("--data-root={}", dir.join("data").display()))
            .arg(format!("--exec-root={}", dir.join("exec").display()))
            .arg(format!("--pidfile={}", dir.join("dockerd.pid").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(true);
        if let Some(proxy) = proxy {
            cmd.env("HTTPS_PROXY", format!("http://{proxy}"));
        }
        let child = cmd
            .spawn()
            .context("spawning dockerd (apt install docker.io)")?;
        let mut engine = Self {
            child: Some(child),
            dir: dir.to_path_buf(),
            socket,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = engine
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("dockerd exited before it was ready: {status}");
            }
            let probe = engine
                .docker(&["version", "--format", "{{.Server.Version}}"])
                .output()
                .await?;
            if probe.status.success() {
                return Ok(engine);
            }
            if Instant::now() > deadline {
                bail!(
                    "dockerd not ready within {READY_TIMEOUT:?}: {}",
                    String::from_utf8_lossy(&probe.stderr).trim()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A `docker ARGS…` command for this engine (not yet run).
    pub fn docker(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker");
        cmd.env_clear()
            .env("PATH", search_path())
            .env("HOME", self.dir.join("home"))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .env("DOCKER_BUILDKIT", "0")
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs `docker ARGS…` to completion; fails with its stderr unless it succeeded.
    pub async fn run(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let finished = util::run_timed(&mut self.docker(args), timeout).await?;
        util::check_success(&format!("docker {}", args.join(" ")), &finished.output)?;
        Ok(String::from_utf8_lossy(&finished.output.stdout).into_owned())
    }

    /// Stops the engine (SIGTERM to its process group, SIGKILL after [`STOP_TIMEOUT`]) and
    /// removes its directory.
    pub async fn stop(mut self) -> Result<()> {
        self.shutdown().await;
        std::fs::remove_dir_all(&self.dir)
            .with_context(|| format!("removing {}", self.dir.display()))
    }

    async fn shutdown(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            signal_group(pid, "TERM").await;
            if tokio::time::timeout(STOP_TIMEOUT, child.wait())
                .await
                .is_err()
            {
                signal_group(pid, "KILL").await;
                let _ = child.wait().await;
            }
        }
        // A clean shutdown stops the engine's containerd (its own session) and unmounts its
        // data root; after a SIGKILL, do both by hand.
        let pidfile = self.dir.join("exec/containerd/containerd.pid");
        if let Ok(pid) = std::fs::read_to_string(pidfile) {
            let _ = Command::new("kill")
                .args(["-KILL", pid.trim()])
                .stderr(Stdio::null())
                .status()
                .await;
        }
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.join("data"))
            .stderr(Stdio::null())
            .status()
            .await;
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            if let Some(pid) = child.id() {
                // Best effort from a destructor: no runtime to wait on here.
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pid}")])
                    .stderr(Stdio::null())
                    .status();
            }
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.join("data"))
                .stderr(Stdio::null())
                .status();
        }
    }
}

async fn signal_group(pgid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(format!("-{pgid}"))
        .stderr(Stdio::null())
        .status()
        .await;
}

/// `PATH` with the directories where Debian puts `dockerd`, `containerd` and `runc`.
fn search_path() -> String {
    let own = std::env::var("PATH").unwrap_or_default();
    format!("{own}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_blob_get_bytes_only() {
        let get = r#"127.0.0.1 - - [27/Nov/2026:21:00:00 +0000] "GET /v2/a/b/blobs/sha256:ab HTTP/1.1" 200 52428800 "" "docker/20.10""#;
        let head = r#"127.0.0.1 - - [x] "HEAD /v2/a/blobs/sha256:ab HTTP/1.1" 200 0 "" "x""#;
        let manifest = r#"127.0.0.1 - - [x] "GET /v2/a/manifests/1 HTTP/1.1" 200 527 "" "x""#;
        let denied = r#"127.0.0.1 - - [x] "GET /v2/a/blobs/sha256:ab HTTP/1.1" 401 145 "" "x""#;
        assert_eq!(blob_get_bytes(get), Some(52_428_800));
        assert_eq!(blob_get_bytes(head), None);
        assert_eq!(blob_get_bytes(manifest), None);
        assert_eq!(blob_get_bytes(denied), None);
        assert_eq!(blob_get_bytes("garbage"), None);
    }
}
