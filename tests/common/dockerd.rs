//! The real Docker engine for end-to-end tests: a `dockerd` started by hand (no systemd) with its
//! own socket, data root, exec root, pidfile, `daemon.json` and its own `containerd`, so several
//! engines run side by side and none touches the machine's `/var/lib/docker` or `/etc/docker`.
//! An engine is given `HTTPS_PROXY` (a d7q daemon's proxy) and `SSL_CERT_FILE` (the CA bundle it
//! trusts); the proxy setting belongs to `dockerd`, which does every registry request itself —
//! the `docker` CLI only talks to the engine's socket.
//!
//! Docker skips certificate checks for registries whose name resolves into 127.0.0.0/8, and the
//! test registry lives at 127.0.0.2: an engine that goes through a proxy runs in its own mount
//! namespace whose `/etc/hosts` points the registry's name elsewhere ([`EngineOptions::proxied`]),
//! so it verifies TLS like against any real registry.
//!
//! Storage is `vfs` (plain directories, no overlay mounts) and networking is off (no bridge, no
//! iptables), so an engine needs nothing from the host but root. Dropping a [`Dockerd`] stops it
//! (SIGTERM, then SIGKILL to its process group and its containerd) and detaches any mount left
//! under its directory.
//!
//! Not for containers that need a network or cgroup limits: the tests only import, push, pull and
//! save images.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::{read_lossy, tail, Output};

/// Longest an engine may take to answer `docker version` after it was started.
pub const ENGINE_READY_TIMEOUT: Duration = Duration::from_secs(60);

/// Longest one `docker` command (a push or pull of a test image) may run before it is killed.
pub const DOCKER_TIMEOUT: Duration = Duration::from_secs(180);

/// Longest an engine gets to shut down cleanly on SIGTERM before it is killed.
const ENGINE_STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// How an engine reaches registries.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// `HTTPS_PROXY=http://ADDR` for `dockerd`; `None` for direct connections.
    pub proxy: Option<SocketAddr>,
    /// `SSL_CERT_FILE` for `dockerd`: the CA bundle it trusts (replaces the system roots).
    pub ca_bundle: Option<PathBuf>,
    /// `registry-mirrors` in its `daemon.json` (URLs).
    pub registry_mirrors: Vec<String>,
    /// Host names the engine resolves to other addresses than the machine does: the engine
    /// runs in its own mount namespace with its own `/etc/hosts` (see [`HIDE_LOOPBACK`]).
    pub resolve: Vec<(String, IpAddr)>,
}

/// Docker treats every registry whose name resolves into 127.0.0.0/8 as insecure (it skips
/// certificate checks and falls back to plain HTTP) and a proxy does not change that: the engine
/// still resolves the name itself. An engine that reaches `registry.test` only through a proxy
/// is told it lives here instead (TEST-NET-1, never connected to), so Docker verifies TLS as it
/// does for any real registry; the proxy resolves the name on its own.
pub const HIDE_LOOPBACK: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

impl EngineOptions {
    /// Through the HTTP proxy at `proxy`, trusting `bundle`, with `hosts` resolved to
    /// [`HIDE_LOOPBACK`] so Docker treats them as the secure registries they stand for.
    pub fn proxied(proxy: SocketAddr, bundle: PathBuf, hosts: &[&str]) -> Self {
        Self {
            proxy: Some(proxy),
            ca_bundle: Some(bundle),
            registry_mirrors: Vec::new(),
            resolve: hosts
                .iter()
                .map(|h| (h.to_string(), HIDE_LOOPBACK))
                .collect(),
        }
    }
}

/// A running `dockerd`, stopped when dropped.
pub struct Dockerd {
    child: Option<Child>,
    /// The engine's directory: data root, exec root, socket, log, CLI config.
    pub dir: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
    name: String,
    log: PathBuf,
}

impl Dockerd {
    /// Starts an engine named `name` under `parent/dockerd-NAME/` and waits until it answers.
    pub async fn start(parent: &Path, name: &str, options: &EngineOptions) -> Self {
        let dir = parent.join(format!("dockerd-{name}"));
        for sub in ["data", "exec", "home", "cli"] {
            std::fs::create_dir_all(dir.join(sub)).expect("engine dir");
        }
        let socket = dir.join("docker.sock");
        let log = dir.join("dockerd.log");
        let config = dir.join("daemon.json");
        let daemon_json = serde_json::json!({ "registry-mirrors": options.registry_mirrors });
        std::fs::write(&config, daemon_json.to_string()).expect("write daemon.json");

        let mut cmd = if options.resolve.is_empty() {
            StdCommand::new("dockerd")
        } else {
            let hosts = dir.join("hosts");
            std::fs::write(&hosts, hosts_file(&options.resolve)).expect("write engine hosts");
            // A private mount namespace: the bind mount over /etc/hosts, and the mounts dockerd
            // makes itself, stay invisible to the machine and vanish with the engine.
            let mut cmd = StdCommand::new("unshare");
            cmd.args([
                "--mount",
                "--propagation",
                "private",
                "--",
                "sh",
                "-c",
                "mount --bind \"$0\" /etc/hosts && exec dockerd \"$@\"",
            ])
            .arg(&hosts);
            cmd
        };
        cmd.env_clear()
            .env("PATH", search_path())
            .env("HOME", dir.join("home"))
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
            .stdout(Stdio::from(
                std::fs::File::create(&log).expect("engine log"),
            ))
            .stderr(Stdio::from(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("engine log"),
            ));
        if let Some(proxy) = options.proxy {
            cmd.env("HTTPS_PROXY", format!("http://{proxy}"));
        }
        if let Some(bundle) = &options.ca_bundle {
            cmd.env("SSL_CERT_FILE", bundle);
        }
        // Its own process group, so the drop can signal the engine and whatever it forked.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start dockerd (is docker.io installed?): {e}"));
        let mut engine = Self {
            child: Some(child),
            dir,
            socket,
            name: name.to_string(),
            log,
        };
        engine.wait_ready().await;
        engine
    }

    /// Runs `docker ARGS…` against this engine (at most [`DOCKER_TIMEOUT`]).
    pub async fn docker(&self, args: &[&str]) -> Output {
        self.docker_with_stdin(args, None).await
    }

    /// Runs `docker ARGS…` with `stdin` written to its standard input (e.g. `--password-stdin`).
    pub async fn docker_with_stdin(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        let command = format!("docker {} (engine {})", args.join(" "), self.name);
        let mut cmd = Command::new("docker");
        cmd.env_clear()
            .env("PATH", search_path())
            .env("HOME", self.dir.join("home"))
            .env("DOCKER_CONFIG", self.dir.join("cli"))
            .env("DOCKER_HOST", format!("unix://{}", self.socket.display()))
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command}: {e}"));
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().expect("piped stdin");
            pipe.write_all(bytes).await.expect("write docker stdin");
            drop(pipe);
        }
        match tokio::time::timeout(DOCKER_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                command,
            },
            Ok(Err(e)) => panic!("waiting for {command}: {e}"),
            Err(_) => panic!(
                "{command} did not finish within {DOCKER_TIMEOUT:?}; killed. Engine log:\n{}",
                tail(&self.log(), 60)
            ),
        }
    }

    /// `docker login HOST -u USER --password-stdin`.
    pub async fn login(&self, host: &str, user: &str, password: &str) -> Output {
        self.docker_with_stdin(
            &["login", host, "-u", user, "--password-stdin"],
            Some(password.as_bytes()),
        )
        .await
    }

    /// The engine's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + ENGINE_READY_TIMEOUT;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "dockerd {} exited before it was ready ({status}); log:\n{}",
                    self.name,
                    tail(&self.log(), 60)
                );
            }
            if self.socket.exists()
                && self
                    .docker(&["version", "--format", "{{.Server.Version}}"])
                    .await
                    .code
                    == 0
            {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "dockerd {} did not answer within {ENGINE_READY_TIMEOUT:?}; log:\n{}",
                    self.name,
                    tail(&self.log(), 60)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Stops the engine: SIGTERM to its process group (a clean shutdown also stops its
    /// containerd and unmounts), SIGKILL after [`ENGINE_STOP_TIMEOUT`]; then kills a containerd
    /// that survived (it runs in its own session) and detaches mounts left under the directory.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pgid = child.id() as libc::pid_t;
        signal_group(pgid, libc::SIGTERM);
        let deadline = Instant::now() + ENGINE_STOP_TIMEOUT;
        while !matches!(child.try_wait(), Ok(Some(_))) {
            if Instant::now() > deadline {
                signal_group(pgid, libc::SIGKILL);
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let containerd_pid = self.dir.join("exec/containerd/containerd.pid");
        if let Some(pid) = std::fs::read_to_string(&containerd_pid)
            .ok()
            .and_then(|s| s.trim().parse::<libc::pid_t>().ok())
            .filter(|&pid| pid > 1)
        {
            // SAFETY: kill(2) has no memory-safety preconditions. The pid came from the pidfile
            // of this engine's containerd, which is gone if the engine shut down cleanly.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        detach_mounts_under(&self.dir);
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- dockerd {} log ({}):\n{}",
                self.name,
                self.log.display(),
                tail(&self.log(), 80)
            );
        }
        self.stop();
    }
}

/// The machine's `/etc/hosts` without the names in `resolve`, then those names at their
/// addresses.
fn hosts_file(resolve: &[(String, IpAddr)]) -> String {
    let system = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    let mut out = String::new();
    for line in system.lines() {
        let names = line.split('#').next().unwrap_or("");
        if !names
            .split_whitespace()
            .skip(1)
            .any(|n| resolve.iter().any(|(name, _)| name == n))
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    for (name, ip) in resolve {
        out.push_str(&format!("{ip} {name}\n"));
    }
    out
}

/// `PATH` for the engine and the CLI: the test's own plus the system directories where Debian
/// puts `dockerd`, `containerd` and `runc`.
fn search_path() -> String {
    let own = std::env::var("PATH").unwrap_or_default();
    format!("{own}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
}

fn signal_group(pgid: libc::pid_t, signal: libc::c_int) {
    if pgid > 1 {
        // SAFETY: kill(2) has no memory-safety preconditions; a negative pid names the process
        // group this harness created for the engine.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

/// Lazily unmounts every mount point at or below `dir` (deepest first), as a killed `dockerd`
/// may leave its data root bind-mounted.
fn detach_mounts_under(dir: &Path) {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = table
        .lines()
        .filter_map(|line| line.split_whitespace().nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    for point in points {
        let Ok(c_path) = std::ffi::CString::new(point.as_os_str().as_encoded_bytes()) else {
            continue;
        };
        // SAFETY: `c_path` is a valid NUL-terminated string that outlives the call.
        unsafe {
            libc::umount2(c_path.as_ptr(), libc::MNT_DETACH);
        }
    }
}
