//! The real containerd pulling through the daemon's registry mirror: each "host" runs its own
//! standalone `containerd` (own socket, root, state; the CRI plugin off) and pulls with `ctr`
//! using a `hosts.toml` that names the d7q daemon's proxy as a plain-HTTP mirror of the test
//! registry (`registry.test:PORT`, TLS, htpasswd). containerd adds `?ns=registry.test:PORT` to
//! every mirror request; the daemon answers blobs from the mesh and passes the rest through.
//!
//! containerd does not trust the registry's CA, so its `server` fallback cannot succeed: a pull
//! that works came through the mirror. Content is checked by exporting the pulled image and
//! hashing every blob; the mesh by the daemons' metrics and the registry's access log.
//!
//! Not for CRI (kubelet) pulls or running containers: `ctr` does the registry requests itself
//! with containerd's resolver and `hosts.toml` handling, which is what this test is about.

mod common;

use common::NoProxyEnv;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::registry::{Image, Registry};
use common::{Daemon, Env, Output};
use tokio::process::{Child, Command};

const USER: &str = "alice";
const PASSWORD: &str = "s3cret-alice";
/// Blob requests a daemon's proxy answered from the mesh.
const BLOB_MESH: &str = "d7q_proxy_requests_total{kind=\"blob_mesh\"}";
/// Blob requests it sent straight to the registry because the mesh could not open them.
const BLOB_DIRECT: &str = "d7q_proxy_requests_total{kind=\"blob_direct\"}";
/// Blob bytes it served from the mesh.
const PROXY_BLOB_BYTES: &str = "d7q_proxy_blob_bytes_total";
/// Longest a containerd may take to answer `ctr version` after it was started.
const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest one `ctr` command (a pull of the test image) may run before it is killed.
const CTR_TIMEOUT: Duration = Duration::from_secs(120);
/// Lines of a containerd log printed when a test fails.
const LOG_TAIL: usize = 60;
/// Plugins a pull does not need (the CRI server, tracing, `/opt` installs, snapshotters that
/// need special file systems): off, so containerd starts fast and touches nothing of the host.
const DISABLED_PLUGINS: &[&str] = &[
    "io.containerd.grpc.v1.cri",
    "io.containerd.internal.v1.opt",
    "io.containerd.internal.v1.tracing",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
];
/// Unpacking into plain directories needs no overlay mounts (CI containers may not allow them).
const SNAPSHOTTER: &str = "native";

/// A standalone `containerd` with its own directories, killed on drop.
struct Containerd {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    log: PathBuf,
}

impl Containerd {
    /// Starts `containerd` in `SANDBOX/containerd-NAME` and waits until `ctr version` answers.
    async fn start(env: &Env, name: &str) -> Self {
        let dir = env.dir(&format!("containerd-{name}"));
        let socket = dir.join("c.sock");
        let log = dir.join("containerd.log");
        let config = dir.join("config.toml");
        let disabled: Vec<String> = DISABLED_PLUGINS.iter().map(|p| format!("{p:?}")).collect();
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = {root:?}\nstate = {state:?}\ndisabled_plugins = [{disabled}]\n\
                 [grpc]\n  address = {sock:?}\n[ttrpc]\n  address = {ttrpc:?}\n\
                 [debug]\n  address = \"\"\n[metrics]\n  address = \"\"\n",
                root = path_str(&dir.join("root")),
                state = path_str(&dir.join("state")),
                disabled = disabled.join(", "),
                sock = path_str(&socket),
                ttrpc = format!("{}.ttrpc", socket.display()),
            ),
        )
        .expect("write containerd config");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(std::fs::File::create(&log).expect("log")))
            .stderr(Stdio::from(
                std::fs::File::options()
                    .append(true)
                    .open(&log)
                    .expect("log"),
            ))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn containerd (apt install containerd or docker.io)");
        let mut containerd = Self {
            child,
            dir,
            socket,
            log,
        };
        let deadline = tokio::time::Instant::now() + CONTAINERD_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = containerd.child.try_wait() {
                panic!("containerd {name} exited: {status}\n{}", containerd.log());
            }
            if containerd.socket.exists() && containerd.ctr(&["version"]).await.code == 0 {
                return containerd;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "containerd {name} not ready within {CONTAINERD_READY_TIMEOUT:?}:\n{}",
                containerd.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `ctr --address SOCKET ARGS…` (no proxy variables, system roots only), at most
    /// [`CTR_TIMEOUT`].
    async fn ctr(&self, args: &[&str]) -> Output {
        let command = format!("ctr {}", args.join(" "));
        let child = Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .env("HOME", &self.dir)
            .no_proxy_env()
            .env_remove("SSL_CERT_FILE")
            .env_remove("SSL_CERT_DIR")
            .env_remove("CONTAINERD_SNAPSHOTTER")
            .env_remove("CONTAINERD_NAMESPACE")
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command} (apt install containerd): {e}"));
        match tokio::time::timeout(CTR_TIMEOUT, child.wait_with_output()).await {
            Ok(Ok(out)) => Output {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                command,
            },
            Ok(Err(e)) => panic!("waiting for {command}: {e}"),
            Err(_) => panic!("{command} did not finish within {CTR_TIMEOUT:?}; killed"),
        }
    }

    /// Pulls `reference` (and unpacks it) through the mirror configured in `hosts_dir`.
    async fn pull(&self, hosts_dir: &Path, reference: &str) -> Output {
        self.ctr(&[
            "images",
            "pull",
            "--hosts-dir",
            path_str(hosts_dir),
            "--user",
            &format!("{USER}:{PASSWORD}"),
            "--snapshotter",
            SNAPSHOTTER,
            reference,
        ])
        .await
    }

    /// Asserts that `reference` is in this containerd as exactly `image`: the manifest digest
    /// it resolved to, and every blob's bytes in an `images export` of it.
    async fn assert_image(&self, reference: &str, image: &Image) {
        let out = self.ctr(&["images", "ls"]).await;
        out.ok();
        let line = out
            .stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(reference))
            .unwrap_or_else(|| panic!("{reference} not in `ctr images ls`:\n{out}"));
        assert!(
            line.contains(&image.manifest),
            "{reference} resolved to another manifest than {}:\n{line}",
            image.manifest
        );
        let archive = self.dir.join("export.tar");
        self.ctr(&["images", "export", path_str(&archive), reference])
            .await
            .ok();
        let layout = self.dir.join("export");
        std::fs::create_dir_all(&layout).expect("export dir");
        let status = std::process::Command::new("tar")
            .arg("-C")
            .arg(&layout)
            .arg("-xf")
            .arg(&archive)
            .status()
            .expect("run tar");
        assert!(status.success(), "cannot unpack the exported image");
        for digest in image.blobs().iter().chain([&image.manifest]) {
            let hex = digest.trim_start_matches("sha256:");
            let path = layout.join("blobs/sha256").join(hex);
            assert_eq!(
                common::sha256_file(&path),
                hex,
                "blob {digest} exported by containerd"
            );
        }
    }

    fn log(&self) -> String {
        let text = std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
        if std::thread::panicking() {
            eprintln!("--- containerd {} log:\n{}", self.dir.display(), self.log());
        }
    }
}

/// A `hosts.toml` directory for `registry`: the daemon's proxy at `mirror` as a plain-HTTP
/// pull/resolve mirror, the registry itself as the (untrusted, so unusable) server.
fn hosts_dir(env: &Env, name: &str, registry: &Registry, mirror: SocketAddr) -> PathBuf {
    let root = env.dir(&format!("hosts-{name}"));
    let dir = root.join(registry.host());
    std::fs::create_dir_all(&dir).expect("hosts dir");
    std::fs::write(
        dir.join("hosts.toml"),
        format!(
            "server = \"https://{}\"\n\n[host.\"http://{mirror}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            registry.host()
        ),
    )
    .expect("write hosts.toml");
    root
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// containerd A pulls through daemon 0 (blobs from the mesh, at most one registry GET each);
/// containerd B, fresh, pulls through daemon 1: no blob leaves the registry again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_through_the_daemon_as_a_hosts_toml_mirror() {
    let env = Env::new();
    let registry = Registry::start_htpasswd(&env, &[(USER, PASSWORD)]).await;
    let image = registry
        .push_image(
            &env,
            "app",
            "1",
            &[2 << 20, (1 << 20) + 777],
            23,
            (USER, PASSWORD),
        )
        .await;
    let reference = registry.reference("app", "1");
    let blobs = image.blobs().len();
    let layer_bytes: u64 = image.layer_sizes.iter().sum();

    let (_, pki) = env.ca("cluster", &["supernode", "host-0", "host-1"]).await;
    let supernode = env.supernode(&pki[0], Some(&registry.ca_file)).await;
    let host = registry.host();
    let ca_file = path_str(&registry.ca_file).to_owned();
    let mut daemons: Vec<Daemon> = Vec::new();
    for node in &pki[1..] {
        daemons.push(
            env.daemon(
                node,
                &[&supernode],
                &["--registry", &host, "--origin-ca", &ca_file],
            )
            .await,
        );
    }
    assert_eq!(registry.blob_gets().await, 0, "pushing downloaded blobs");

    // Host A: the first pull, through daemon 0.
    let a = Containerd::start(&env, "a").await;
    let hosts_a = hosts_dir(&env, "a", &registry, daemons[0].proxy);
    let out = a.pull(&hosts_a, &reference).await;
    assert_eq!(
        out.code,
        0,
        "pull through daemon 0 failed:\n{out}\n--- registry access log\n{}",
        registry.access_log()
    );
    a.assert_image(&reference, &image).await;
    let gets_after_a = registry.blob_gets().await;
    assert!(
        gets_after_a <= blobs,
        "{gets_after_a} blob GETs at the registry for {blobs} blobs:\n{}",
        registry.access_log()
    );
    let metrics = daemons[0].metrics().await;
    let metric = |key: &str| common::metric_of(&metrics, key);
    assert!(
        metric(BLOB_MESH) >= blobs as f64,
        "daemon 0 served {} blob requests from the mesh, want {blobs}",
        metric(BLOB_MESH)
    );
    assert_eq!(
        metric(BLOB_DIRECT),
        0.0,
        "daemon 0 fell back to the registry"
    );
    assert!(
        metric(PROXY_BLOB_BYTES) >= layer_bytes as f64,
        "daemon 0 served {} blob bytes from the mesh, want at least {layer_bytes}",
        metric(PROXY_BLOB_BYTES)
    );

    // Host B, a fresh containerd: the second pull, through daemon 1, costs the registry nothing.
    let b = Containerd::start(&env, "b").await;
    let hosts_b = hosts_dir(&env, "b", &registry, daemons[1].proxy);
    let out = b.pull(&hosts_b, &reference).await;
    assert_eq!(out.code, 0, "pull through daemon 1 failed:\n{out}");
    b.assert_image(&reference, &image).await;
    assert_eq!(
        registry.blob_gets().await,
        gets_after_a,
        "the second pull fetched blobs from the registry again:\n{}",
        registry.access_log()
    );
    assert!(
        daemons[1].metric(BLOB_MESH).await >= blobs as f64,
        "daemon 1 did not serve the blobs from the mesh"
    );
    assert_eq!(
        daemons[1].metric(BLOB_DIRECT).await,
        0.0,
        "daemon 1 fell back to the registry"
    );
}
