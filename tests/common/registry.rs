//! A real container registry for the tests of the proxy, `d7q pull` and the Docker engine:
//! Debian's `docker-registry` (distribution 2.8) over TLS under the host name `registry.test`,
//! with htpasswd or token auth (the token issuer lives in the test process, see
//! [`super::token`]), test images generated as OCI layouts and pushed with the real `skopeo`, and
//! the registry's access log parsed so a test can count which requests reached it.
//!
//! Go clients (skopeo, docker) never use `HTTPS_PROXY` for `localhost` or IP literals, so the
//! registry is reached by name: [`ensure_hosts`] maps `registry.test` → 127.0.0.2 and `auth.test`
//! → 127.0.0.3 in `/etc/hosts` (the tests run as root). TLS comes from a throwaway [`DevCa`];
//! clients trust it through a cert dir (`ca.crt`, for skopeo's `--*-cert-dir`) or a bundle (system
//! roots + test CA + optional extras such as a proxy CA, for `SSL_CERT_FILE`).
//!
//! Not for: measuring anything, or registries other than distribution 2.8 (the access-log format
//! parsed here is its gorilla "combined" log on stdout).

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use d7q::devserver::DevCa;
use rand::{RngCore, SeedableRng};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

use super::NoProxyEnv;

use super::token::{Grant, TokenIssuer, ISSUER};
use super::{read_lossy, Env, Output};

/// The registry's host name (and the token `service`).
pub const REGISTRY_HOST: &str = "registry.test";
/// Where `registry.test` points.
pub const REGISTRY_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
/// The token issuer's host name.
pub const AUTH_HOST: &str = "auth.test";
/// Where `auth.test` points.
pub const AUTH_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);

/// Longest the registry may take to answer `GET /v2/` after it was started.
pub const REGISTRY_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one `skopeo` run may take before the test kills it and fails.
pub const SKOPEO_TIMEOUT: Duration = Duration::from_secs(180);
/// Times a registry start is tried (a free port picked by the test may be taken meanwhile).
const START_ATTEMPTS: usize = 3;
/// Largest generated layer: the layer is built in memory.
pub const MAX_LAYER: usize = 256 << 20;
/// Where a fresh Debian keeps the system roots.
const SYSTEM_ROOTS: &str = "/etc/ssl/certs/ca-certificates.crt";
/// Lock file serialising `/etc/hosts` edits between test processes.
const HOSTS_LOCK: &str = "/tmp/d7q-tests-hosts.lock";
/// How long to wait for the access log to stop growing after a client finished.
const LOG_SETTLE: Duration = Duration::from_millis(300);
/// Most [`LOG_SETTLE`] rounds to wait for the access log to stop growing.
const LOG_SETTLE_ROUNDS: usize = 100;

/// Makes `registry.test` and `auth.test` resolve to their loopback addresses: appends the lines
/// to `/etc/hosts` if missing, under a file lock (tests run in parallel, in several processes).
pub fn ensure_hosts() -> io::Result<()> {
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
    let mut missing = String::new();
    for (ip, name) in [(REGISTRY_IP, REGISTRY_HOST), (AUTH_IP, AUTH_HOST)] {
        let present = hosts.lines().any(|line| {
            let mut fields = line.split('#').next().unwrap_or("").split_whitespace();
            fields.next() == Some(&ip.to_string()) && fields.any(|n| n == name)
        });
        if !present {
            missing.push_str(&format!("{ip} {name}\n"));
        }
    }
    if !missing.is_empty() {
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open("/etc/hosts")?;
        if !hosts.is_empty() && !hosts.ends_with('\n') {
            file.write_all(b"\n")?;
        }
        file.write_all(missing.as_bytes())?;
    }
    drop(lock);
    Ok(())
}

/// How the registry authenticates.
pub enum Auth<'a> {
    /// HTTP basic against an htpasswd file of these users.
    Htpasswd(&'a [(&'a str, &'a str)]),
    /// Bearer tokens from an in-process issuer with these users and grants.
    Token(&'a [(&'a str, &'a str)], &'a [Grant]),
}

/// A running `docker-registry`, killed on drop.
pub struct Registry {
    child: Child,
    /// Its port on [`REGISTRY_IP`].
    pub port: u16,
    /// The test CA that signed its certificate (and the issuer's).
    pub ca: DevCa,
    /// The CA as a PEM file.
    pub ca_file: PathBuf,
    /// A directory holding `ca.crt`, for skopeo's `--src-cert-dir`/`--dest-cert-dir`.
    pub cert_dir: PathBuf,
    /// The token issuer, with token auth.
    pub issuer: Option<TokenIssuer>,
    dir: PathBuf,
    access_log: PathBuf,
    log: PathBuf,
}

/// One line of the registry's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    pub path: String,
    pub status: u16,
}

/// An image generated by [`Registry::push_image`] (or [`oci_layout`]).
#[derive(Clone, Debug)]
pub struct Image {
    /// Repository name, e.g. `app` or `private/app`.
    pub name: String,
    pub tag: String,
    /// The OCI layout it was generated in (`oci:LAYOUT:TAG`).
    pub layout: PathBuf,
    /// `sha256:…` of the manifest.
    pub manifest: String,
    /// `sha256:…` of the config blob.
    pub config: String,
    /// `sha256:…` of each layer (tar+gzip), in order.
    pub layers: Vec<String>,
    /// The layers' sizes in bytes.
    pub layer_sizes: Vec<u64>,
}

/// A `skopeo` run: build it up, then [`Skopeo::run`].
pub struct Skopeo<'a> {
    env: &'a Env,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Registry {
    /// A registry with htpasswd auth for `users`.
    pub async fn start_htpasswd(env: &Env, users: &[(&str, &str)]) -> Self {
        Self::start(env, Auth::Htpasswd(users)).await
    }

    /// A registry with token auth: an issuer on `auth.test` that knows `users` and `grants`.
    pub async fn start_token(env: &Env, users: &[(&str, &str)], grants: &[Grant]) -> Self {
        Self::start(env, Auth::Token(users, grants)).await
    }

    /// Starts the registry (and its issuer) and waits until it answers `GET /v2/`.
    pub async fn start(env: &Env, auth: Auth<'_>) -> Self {
        ensure_hosts().expect("add registry.test and auth.test to /etc/hosts (run as root)");
        // Its own directory, so a test may run several registries.
        let dir = (1..)
            .map(|n| match n {
                1 => env.path().join("registry"),
                n => env.path().join(format!("registry-{n}")),
            })
            .find(|d| !d.exists())
            .expect("a free directory name");
        std::fs::create_dir_all(&dir).expect("registry dir");
        let ca = DevCa::new();
        let ca_file = dir.join("ca.pem");
        ca.write_pem(&ca_file).expect("write registry CA");
        let cert_dir = dir.join("certs.d");
        std::fs::create_dir_all(&cert_dir).expect("cert dir");
        ca.write_pem(cert_dir.join("ca.crt")).expect("write ca.crt");
        let leaf = ca
            .issue(&[REGISTRY_HOST.to_owned()])
            .expect("registry certificate");
        std::fs::write(dir.join("registry.crt"), &leaf.cert_pem).expect("write cert");
        std::fs::write(dir.join("registry.key"), &leaf.key_pem).expect("write key");

        let (auth_yaml, issuer) = match auth {
            Auth::Htpasswd(users) => {
                let htpasswd = dir.join("htpasswd");
                write_htpasswd(&htpasswd, users);
                (
                    format!(
                        "auth:\n  htpasswd:\n    realm: d7q-test\n    path: {}\n",
                        htpasswd.display()
                    ),
                    None,
                )
            }
            Auth::Token(users, grants) => {
                let issuer = TokenIssuer::start(
                    &ca,
                    IpAddr::V4(AUTH_IP),
                    AUTH_HOST,
                    REGISTRY_HOST,
                    users,
                    grants,
                )
                .await
                .expect("start the token issuer");
                (
                    format!(
                        "auth:\n  token:\n    realm: {}\n    service: {REGISTRY_HOST}\n    \
                         issuer: {ISSUER}\n    rootcertbundle: {}\n",
                        issuer.realm(),
                        ca_file.display()
                    ),
                    Some(issuer),
                )
            }
        };

        let mut last_failure = String::new();
        for attempt in 0..START_ATTEMPTS {
            let port = free_port(REGISTRY_IP);
            let config = dir.join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\n\
                     storage:\n  filesystem:\n    rootdirectory: {data}\n  delete:\n    enabled: true\n\
                     http:\n  addr: {REGISTRY_IP}:{port}\n  secret: d7q-test-secret\n  tls:\n    \
                     certificate: {crt}\n    key: {key}\n{auth_yaml}",
                    data = dir.join("data").display(),
                    crt = dir.join("registry.crt").display(),
                    key = dir.join("registry.key").display(),
                ),
            )
            .expect("write registry config");
            let access_log = dir.join(format!("access-{attempt}.log"));
            let log = dir.join(format!("registry-{attempt}.log"));
            let mut child = Command::new("docker-registry")
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::from(
                    std::fs::File::create(&access_log).expect("access log"),
                ))
                .stderr(Stdio::from(std::fs::File::create(&log).expect("log")))
                .kill_on_drop(true)
                .spawn()
                .expect("spawn docker-registry (apt install docker-registry)");
            match wait_ready(&mut child, port, &ca_file).await {
                Ok(()) => {
                    return Self {
                        child,
                        port,
                        ca,
                        ca_file,
                        cert_dir,
                        issuer,
                        dir,
                        access_log,
                        log,
                    }
                }
                Err(why) => {
                    let _ = child.kill().await;
                    last_failure = format!("{why}; log:\n{}", read_lossy(&log));
                }
            }
        }
        panic!("docker-registry did not start: {last_failure}");
    }

    /// `registry.test:PORT`.
    pub fn host(&self) -> String {
        format!("{REGISTRY_HOST}:{}", self.port)
    }

    /// `registry.test:PORT/NAME:TAG`.
    pub fn reference(&self, name: &str, tag: &str) -> String {
        format!("{}/{name}:{tag}", self.host())
    }

    /// `https://registry.test:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.host())
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(REGISTRY_IP), self.port)
    }

    /// A CA bundle for `SSL_CERT_FILE`: the system roots, the test CA and `extra` PEM files
    /// (e.g. a proxy CA), written to `registry/NAME.pem`.
    pub fn bundle(&self, name: &str, extra: &[&Path]) -> PathBuf {
        let mut pem = std::fs::read_to_string(SYSTEM_ROOTS).unwrap_or_default();
        pem.push('\n');
        pem.push_str(&self.ca.cert_pem);
        for file in extra {
            pem.push('\n');
            pem.push_str(
                &std::fs::read_to_string(file)
                    .unwrap_or_else(|e| panic!("read {}: {e}", file.display())),
            );
        }
        let path = self.dir.join(format!("{name}.pem"));
        std::fs::write(&path, pem).expect("write CA bundle");
        path
    }

    /// A CA bundle for `SSL_CERT_FILE` of a client behind an intercepting proxy: the system
    /// roots and `proxy_ca` only, so the client can reach the registry only through the proxy's
    /// interception (a tunnel would meet the test CA, which it does not trust).
    pub fn proxy_bundle(&self, name: &str, proxy_ca: &Path) -> PathBuf {
        let mut pem = std::fs::read_to_string(SYSTEM_ROOTS).unwrap_or_default();
        pem.push('\n');
        pem.push_str(
            &std::fs::read_to_string(proxy_ca)
                .unwrap_or_else(|e| panic!("read {}: {e}", proxy_ca.display())),
        );
        let path = self.dir.join(format!("{name}.pem"));
        std::fs::write(&path, pem).expect("write CA bundle");
        path
    }

    /// `auth.test:PORT` of the token issuer, with token auth.
    pub fn auth_host(&self) -> Option<String> {
        self.issuer
            .as_ref()
            .map(|i| format!("{AUTH_HOST}:{}", i.addr().port()))
    }

    /// Generates an image of random layers of `layer_sizes` bytes (content seeded by `seed`)
    /// and pushes it with skopeo straight to the registry (no proxy) as `user:password`.
    pub async fn push_image(
        &self,
        env: &Env,
        name: &str,
        tag: &str,
        layer_sizes: &[usize],
        seed: u64,
        creds: (&str, &str),
    ) -> Image {
        let layout = env.dir(&format!("push-{}-{tag}", name.replace('/', "_")));
        let mut image = oci_layout(&layout, tag, layer_sizes, seed);
        image.name = name.to_owned();
        let digest_file = layout.join("pushed.digest");
        let out = env
            .skopeo(&[
                "copy",
                "--dest-cert-dir",
                path_str(&self.cert_dir),
                "--dest-creds",
                &format!("{}:{}", creds.0, creds.1),
                "--digestfile",
                path_str(&digest_file),
                &format!("oci:{}:{tag}", layout.display()),
                &format!("docker://{}", self.reference(name, tag)),
            ])
            .run()
            .await;
        assert_eq!(out.code, 0, "pushing {name}:{tag} failed:\n{out}");
        let pushed = std::fs::read_to_string(&digest_file).expect("skopeo --digestfile");
        assert_eq!(
            pushed.trim(),
            image.manifest,
            "skopeo rewrote the manifest while pushing"
        );
        image
    }

    /// Every request in the access log so far.
    pub fn accesses(&self) -> Vec<Access> {
        read_lossy(&self.access_log)
            .lines()
            .filter_map(parse_access)
            .collect()
    }

    /// Waits until the access log stops growing (a client may finish before the registry has
    /// written its last lines), then returns it.
    pub async fn settled_accesses(&self) -> Vec<Access> {
        let mut before = self.accesses();
        for _ in 0..LOG_SETTLE_ROUNDS {
            tokio::time::sleep(LOG_SETTLE).await;
            let now = self.accesses();
            if now.len() == before.len() {
                return now;
            }
            before = now;
        }
        panic!(
            "the registry's access log kept growing:\n{}",
            self.access_log()
        );
    }

    /// Blob downloads that the registry answered with content (`GET …/blobs/sha256:…`, 2xx or a
    /// redirect), after the log settled.
    pub async fn blob_gets(&self) -> usize {
        self.settled_accesses()
            .await
            .iter()
            .filter(|a| a.method == "GET" && a.path.contains("/blobs/sha256:") && a.status < 400)
            .count()
    }

    /// Requests for manifests (any method and status), after the log settled.
    pub async fn manifest_requests(&self) -> usize {
        self.settled_accesses()
            .await
            .iter()
            .filter(|a| a.path.contains("/manifests/"))
            .count()
    }

    /// The registry's own log (stderr), for failure messages.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The access log, raw, for failure messages.
    pub fn access_log(&self) -> String {
        read_lossy(&self.access_log)
    }

    /// Stops the registry.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

impl Env {
    /// `skopeo ARGS…` in this sandbox (its `HOME`, no proxy variables, `--insecure-policy`).
    pub fn skopeo(&self, args: &[&str]) -> Skopeo<'_> {
        Skopeo {
            env: self,
            args: args.iter().map(|a| a.to_string()).collect(),
            envs: Vec::new(),
        }
    }
}

impl Skopeo<'_> {
    /// Sets an environment variable for the run.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Goes through the HTTP(S) proxy at `addr` (`HTTPS_PROXY`/`HTTP_PROXY`).
    pub fn proxy(self, addr: SocketAddr) -> Self {
        let url = format!("http://{addr}");
        self.env("HTTPS_PROXY", &url).env("HTTP_PROXY", &url)
    }

    /// Trusts exactly the CAs in `bundle` (`SSL_CERT_FILE`).
    pub fn trust(self, bundle: &Path) -> Self {
        self.env("SSL_CERT_FILE", path_str(bundle))
    }

    /// Runs to completion (at most [`SKOPEO_TIMEOUT`]).
    pub async fn run(self) -> Output {
        let command = format!("skopeo {}", self.args.join(" "));
        let p = self.env.path();
        let mut cmd = Command::new("skopeo");
        cmd.arg("--insecure-policy")
            .args(&self.args)
            .env("HOME", p.join("home"))
            .env("XDG_CONFIG_HOME", p.join("xdg-config"))
            .env("XDG_RUNTIME_DIR", p.join("xdg-run"))
            .env("REGISTRY_AUTH_FILE", p.join("xdg-run").join("auth.json"))
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .no_proxy_env()
            .current_dir(p)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command} (apt install skopeo): {e}"));
        match tokio::time::timeout(SKOPEO_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                command,
            },
            Ok(Err(e)) => panic!("waiting for {command}: {e}"),
            Err(_) => panic!("{command} did not finish within {SKOPEO_TIMEOUT:?}; killed"),
        }
    }
}

impl Image {
    /// `sha256:…` digests of every blob (config and layers).
    pub fn blobs(&self) -> Vec<String> {
        let mut blobs = vec![self.config.clone()];
        blobs.extend(self.layers.iter().cloned());
        blobs
    }

    /// Asserts that the OCI layout `dir` (e.g. from `skopeo copy … oci:DIR:TAG`) holds this
    /// image: the same manifest digest under `tag`, and every blob present with the bytes
    /// its digest names.
    pub fn assert_in_layout(&self, dir: &Path, tag: &str) {
        let index: serde_json::Value = serde_json::from_str(&read_lossy(&dir.join("index.json")))
            .unwrap_or_else(|e| panic!("{}/index.json: {e}", dir.display()));
        let manifests = index["manifests"].as_array().cloned().unwrap_or_default();
        let entry = manifests
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap_or_else(|| panic!("no {tag} in {index}"));
        assert_eq!(entry["digest"], self.manifest.as_str(), "manifest digest");
        let mut all = self.blobs();
        all.push(self.manifest.clone());
        for digest in all {
            let hex = digest.trim_start_matches("sha256:");
            let path = dir.join("blobs/sha256").join(hex);
            let got = super::sha256_file(&path);
            assert_eq!(got, hex, "blob {digest} in {}", dir.display());
        }
    }
}

/// Writes an OCI image layout to `dir` holding one image tagged `tag`: random layers of the
/// given sizes (each a tar with one file, gzip-wrapped), a config and a manifest. Deterministic
/// for a given `seed`. The returned [`Image`] has an empty name.
pub fn oci_layout(dir: &Path, tag: &str, layer_sizes: &[usize], seed: u64) -> Image {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("layout dir");
    let put = |bytes: &[u8]| -> String {
        let hex = hex(&Sha256::digest(bytes));
        std::fs::write(blobs.join(&hex), bytes).expect("write blob");
        format!("sha256:{hex}")
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (mut layers, mut sizes, mut diff_ids) = (Vec::new(), Vec::new(), Vec::new());
    for (i, &size) in layer_sizes.iter().enumerate() {
        assert!(size <= MAX_LAYER, "layer {i} larger than MAX_LAYER");
        let mut content = vec![0u8; size];
        rng.fill_bytes(&mut content);
        let tar = tar_one(&format!("d7q/layer-{i}.bin"), &content);
        diff_ids.push(format!("sha256:{}", hex(&Sha256::digest(&tar))));
        let gz = gzip_stored(&tar);
        sizes.push(gz.len() as u64);
        layers.push(put(&gz));
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {"Cmd": ["/d7q/none"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": layer_sizes.iter().map(|_| serde_json::json!({"created_by": "d7q test"})).collect::<Vec<_>>(),
    })
    .to_string();
    let config_digest = put(config.as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": config.len(),
        },
        "layers": layers.iter().zip(&sizes).map(|(digest, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest,
            "size": size,
        })).collect::<Vec<_>>(),
    })
    .to_string();
    let manifest_digest = put(manifest.as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest,
            "size": manifest.len(),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).expect("index.json");
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#)
        .expect("oci-layout");
    Image {
        name: String::new(),
        tag: tag.to_owned(),
        layout: dir.to_path_buf(),
        manifest: manifest_digest,
        config: config_digest,
        layers,
        layer_sizes: sizes,
    }
}

/// `user:bcrypt` lines made with `htpasswd -Bbn` (distribution accepts bcrypt only).
fn write_htpasswd(path: &Path, users: &[(&str, &str)]) {
    let mut lines = String::new();
    for (user, password) in users {
        let out = std::process::Command::new("htpasswd")
            .args(["-Bbn", user, password])
            .output()
            .expect("run htpasswd (apt install apache2-utils)");
        assert!(out.status.success(), "htpasswd failed for {user}");
        lines.push_str(String::from_utf8_lossy(&out.stdout).trim());
        lines.push('\n');
    }
    std::fs::write(path, lines).expect("write htpasswd");
}

/// Waits until the registry answers `GET /v2/` (401 counts as up), or exits, or times out.
async fn wait_ready(child: &mut Child, port: u16, ca_file: &Path) -> Result<(), String> {
    let url = format!("https://{REGISTRY_HOST}:{port}/v2/");
    let deadline = tokio::time::Instant::now() + REGISTRY_READY_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!("docker-registry exited: {status}"));
        }
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--noproxy",
                "*",
            ])
            .arg("--cacert")
            .arg(ca_file)
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(|e| format!("run curl: {e}"))?;
        let code = String::from_utf8_lossy(&out.stdout);
        if code == "401" || code == "200" {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "no answer on {url} within {REGISTRY_READY_TIMEOUT:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A port free on `ip` right now.
fn free_port(ip: Ipv4Addr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind a free port")
}

/// `"GET /v2/x/blobs/sha256:… HTTP/2.0" 200 …` → method, path, status.
fn parse_access(line: &str) -> Option<Access> {
    let (_, rest) = line.split_once('"')?;
    let (request, rest) = rest.split_once('"')?;
    let mut parts = request.split(' ');
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let status = rest.split_whitespace().next()?.parse().ok()?;
    Some(Access {
        method,
        path,
        status,
    })
}

/// A ustar archive holding one regular file.
fn tar_one(name: &str, content: &[u8]) -> Vec<u8> {
    let mut header = [0u8; 512];
    let field = |h: &mut [u8; 512], at: usize, bytes: &[u8]| {
        h[at..at + bytes.len()].copy_from_slice(bytes);
    };
    field(&mut header, 0, name.as_bytes());
    field(&mut header, 100, b"0000644\0");
    field(&mut header, 108, b"0000000\0");
    field(&mut header, 116, b"0000000\0");
    field(
        &mut header,
        124,
        format!("{:011o}\0", content.len()).as_bytes(),
    );
    field(&mut header, 136, b"00000000000\0");
    field(&mut header, 148, b"        ");
    header[156] = b'0';
    field(&mut header, 257, b"ustar\0");
    field(&mut header, 263, b"00");
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    field(&mut header, 148, format!("{sum:06o}\0 ").as_bytes());
    let mut tar = Vec::with_capacity(512 + content.len() + 512 + 1024);
    tar.extend_from_slice(&header);
    tar.extend_from_slice(content);
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    tar.resize(tar.len() + 1024, 0);
    tar
}

/// `data` in a gzip member of stored (uncompressed) deflate blocks: random content does not
/// compress, and this needs no compression library.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    const MAX_STORED: usize = 65_535;
    let mut out = Vec::with_capacity(data.len() + data.len() / MAX_STORED * 5 + 32);
    out.extend_from_slice(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff]);
    let mut chunks = data.chunks(MAX_STORED).peekable();
    if chunks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(chunk) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = chunk.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (i, entry) in table.iter_mut().enumerate() {
        let mut c = i as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *entry = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8)
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}
