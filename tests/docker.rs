//! The real Docker engine through the daemon's HTTPS proxy (issue 4): engines started by the test
//! (`dockerd` with `HTTPS_PROXY` at a d7q daemon and `SSL_CERT_FILE` trusting its proxy CA) push
//! an imported image to a real `docker-registry` over TLS and pull it back on other engines, and
//! the registry's access log shows that layers crossed the mesh instead of leaving the registry
//! again. Failures reach Docker as its own errors (x509, 401).
//!
//! Content is checked with `docker save`: the pulled layer must be byte for byte the tar that was
//! imported (its SHA-256 is the image's diff id). `docker run` is not used: it needs cgroups and
//! namespaces that a CI container may not give.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use common::dockerd::{Dockerd, EngineOptions};
use common::registry::{Registry, REGISTRY_HOST};
use common::token::Grant;
use common::{Daemon, Env, Supernode};

const USER: &str = "alice";
/// Blob requests a daemon's proxy answered from the mesh.
const BLOB_MESH: &str = "d7q_proxy_requests_total{kind=\"blob_mesh\"}";
/// Blob requests it sent straight to the registry because the mesh could not open them.
const BLOB_DIRECT: &str = "d7q_proxy_requests_total{kind=\"blob_direct\"}";
/// Requests it passed to the registry untouched (manifests, uploads, auth pings).
const PASSTHROUGH: &str = "d7q_proxy_requests_total{kind=\"passthrough\"}";
/// Blob bytes it served from the mesh.
const PROXY_BLOB_BYTES: &str = "d7q_proxy_blob_bytes_total";
const PASSWORD: &str = "s3cret-alice";

/// One registry, one supernode, daemons on their own hosts (identities), each with a proxy that
/// intercepts the registry.
struct Mesh {
    registry: Registry,
    _supernode: Supernode,
    daemons: Vec<Daemon>,
}

/// How the test registry authenticates.
#[derive(Clone, Copy)]
enum Auth {
    /// HTTP basic against htpasswd.
    Basic,
    /// Bearer tokens from an issuer on `auth.test` (as Harbor and Docker Hub do).
    Token,
}

impl Mesh {
    async fn start(env: &Env, daemons: usize) -> Self {
        Self::start_with(env, daemons, Auth::Basic).await
    }

    async fn start_with(env: &Env, daemons: usize, auth: Auth) -> Self {
        let registry = match auth {
            Auth::Basic => Registry::start_htpasswd(env, &[(USER, PASSWORD)]).await,
            Auth::Token => {
                let grants = [Grant::user(USER, "team/", &["pull", "push"])];
                Registry::start_token(env, &[(USER, PASSWORD)], &grants).await
            }
        };
        let names: Vec<String> = (0..daemons).map(|i| format!("host-{i}")).collect();
        let mut nodes: Vec<&str> = vec!["supernode"];
        nodes.extend(names.iter().map(String::as_str));
        let (_, pki) = env.ca("cluster", &nodes).await;
        let supernode = env.supernode(&pki[0], Some(&registry.ca_file)).await;
        let host = registry.host();
        let ca_file = registry.ca_file.to_str().expect("utf-8 path").to_owned();
        let mut started = Vec::new();
        for node in &pki[1..] {
            started.push(
                env.daemon(
                    node,
                    &[&supernode],
                    &["--registry", &host, "--origin-ca", &ca_file],
                )
                .await,
            );
        }
        Self {
            registry,
            _supernode: supernode,
            daemons: started,
        }
    }

    /// An engine behind daemon `i`'s proxy, trusting the registry's CA and that proxy's CA.
    async fn engine(&self, env: &Env, name: &str, i: usize) -> Dockerd {
        let proxy = self.daemons[i].proxy;
        let proxy_ca = fetch_proxy_ca(env, proxy, name).await;
        let bundle = self.registry.bundle(name, &[&proxy_ca]);
        let options = EngineOptions::proxied(proxy, bundle, &[REGISTRY_HOST]);
        Dockerd::start(env.path(), name, &options).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_push_and_pull_through_the_proxy_layers_come_from_the_mesh() {
    push_pull_through_the_mesh(Auth::Basic).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_push_and_pull_through_the_proxy_with_token_auth() {
    push_pull_through_the_mesh(Auth::Token).await;
}

/// Engine A pushes through daemon 0; engine B pulls through daemon 1 (layers from the mesh, at
/// most one registry GET per blob); engine C pulls through daemon 0 (no registry GET at all).
async fn push_pull_through_the_mesh(auth: Auth) {
    let env = Env::new();
    let mesh = Mesh::start_with(&env, 2, auth).await;
    let registry = &mesh.registry;
    let image = registry.reference("team/app", "1");
    let (rootfs, diff_id) = make_rootfs(&env, 7);

    // Engine A imports and pushes through daemon 0's proxy: uploads pass through untouched.
    let a = mesh.engine(&env, "a", 0).await;
    a.docker(&["import", path_str(&rootfs), &image]).await.ok();
    a.login(&registry.host(), USER, PASSWORD).await.ok();
    a.docker(&["push", &image]).await.ok();
    let pushed = registry.settled_accesses().await;
    assert!(
        pushed
            .iter()
            .any(|r| r.method == "PUT" && r.path.contains("/manifests/1") && r.status == 201),
        "the manifest PUT did not reach the registry:\n{}",
        registry.access_log()
    );
    assert!(
        pushed
            .iter()
            .any(|r| r.method == "PUT" && r.path.contains("/blobs/uploads/") && r.status == 201),
        "no blob upload completed at the registry:\n{}",
        registry.access_log()
    );
    assert_eq!(
        registry.blob_gets().await,
        0,
        "a push should not download blobs"
    );
    let passed = mesh.daemons[0].metric(PASSTHROUGH).await;
    assert!(passed > 0.0, "daemon 0's proxy passed nothing through");

    // Engine B pulls through daemon 1's proxy: the blobs (config and layer) cross the mesh; the
    // registry serves each at most once, to the supernode's back-to-source fetch.
    let b = mesh.engine(&env, "b", 1).await;
    b.login(&registry.host(), USER, PASSWORD).await.ok();
    let manifests_before = registry.manifest_requests().await;
    b.docker(&["pull", &image]).await.ok();
    assert_layer(&b, &image, &diff_id).await;
    let blobs = 2; // the config and the one layer
    let gets_after_b = registry.blob_gets().await;
    assert!(
        gets_after_b <= blobs,
        "{gets_after_b} blob GETs at the registry for {blobs} blobs:\n{}",
        registry.access_log()
    );
    assert!(
        registry.manifest_requests().await > manifests_before,
        "the manifest did not pass through to the registry"
    );
    let layer_len = std::fs::metadata(&rootfs).expect("rootfs").len() as f64;
    let metrics = mesh.daemons[1].metrics().await;
    let through_mesh = common::downloaded(&metrics);
    assert!(
        through_mesh >= layer_len * 0.9,
        "daemon 1 moved {through_mesh} bytes through the mesh for a ~{layer_len}-byte layer"
    );
    let metric = |key: &str| common::metric_of(&metrics, key);
    assert!(
        metric(BLOB_MESH) >= blobs as f64,
        "daemon 1 served {} blob requests from the mesh, want {blobs}",
        metric(BLOB_MESH)
    );
    assert_eq!(
        metric(BLOB_DIRECT),
        0.0,
        "daemon 1 fell back to the registry"
    );
    assert!(metric(PROXY_BLOB_BYTES) >= layer_len * 0.9);

    // Engine C, fresh, pulls through daemon 0: nothing more leaves the registry.
    let c = mesh.engine(&env, "c", 0).await;
    c.login(&registry.host(), USER, PASSWORD).await.ok();
    c.docker(&["pull", &image]).await.ok();
    assert_layer(&c, &image, &diff_id).await;
    assert_eq!(
        registry.blob_gets().await,
        gets_after_b,
        "the second pull fetched blobs from the registry again:\n{}",
        registry.access_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_gets_its_own_errors_through_the_proxy() {
    let env = Env::new();
    let mesh = Mesh::start(&env, 1).await;
    let registry = &mesh.registry;
    let image = registry.reference("team/app", "1");

    // An engine that does not trust the proxy CA: Docker's usual x509 failure.
    let untrusted = Dockerd::start(
        env.path(),
        "untrusted",
        &EngineOptions::proxied(
            mesh.daemons[0].proxy,
            registry.bundle("untrusted", &[]),
            &[REGISTRY_HOST],
        ),
    )
    .await;
    let out = untrusted.docker(&["pull", &image]).await;
    assert_ne!(
        out.code, 0,
        "pull through an untrusted proxy succeeded:\n{out}"
    );
    assert!(
        out.stderr
            .contains("x509: certificate signed by unknown authority"),
        "no x509 error from Docker:\n{out}"
    );
    let out = untrusted.login(&registry.host(), USER, PASSWORD).await;
    assert_ne!(out.code, 0, "login through an untrusted proxy succeeded");
    assert!(out.stderr.contains("x509"), "no x509 error:\n{out}");

    // A trusting engine with a wrong password: the registry's 401, as Docker reports it.
    let engine = mesh.engine(&env, "trusting", 0).await;
    let out = engine
        .login(&registry.host(), USER, "not-the-password")
        .await;
    assert_ne!(out.code, 0, "login with a wrong password succeeded:\n{out}");
    assert!(
        out.stderr.contains("401 Unauthorized"),
        "no 401 from Docker:\n{out}"
    );
    // Without credentials the pull is refused the same way as without the proxy.
    let out = engine.docker(&["pull", &image]).await;
    assert_ne!(out.code, 0, "anonymous pull succeeded:\n{out}");
    assert!(
        out.stderr.contains("no basic auth credentials"),
        "no auth error from Docker:\n{out}"
    );
    // And the right password works through the same proxy.
    engine.login(&registry.host(), USER, PASSWORD).await.ok();
}

/// Builds a small root filesystem (a text file and a few MiB of pseudo-random data, so the
/// layer is not trivially small) and tars it reproducibly. Returns the tar and its SHA-256,
/// which `docker import` keeps as the image's diff id.
fn make_rootfs(env: &Env, seed: u64) -> (PathBuf, String) {
    let root = env.dir("rootfs");
    std::fs::create_dir_all(root.join("data")).expect("rootfs dir");
    std::fs::write(root.join("hello.txt"), b"hello from d7q\n").expect("write rootfs");
    common::write_file(&root.join("data/blob-a.bin"), 3 << 20, seed);
    common::write_file(&root.join("data/blob-b.bin"), (1 << 20) + 4321, seed + 1);
    let tar = env.path().join("rootfs.tar");
    let status = std::process::Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(&root)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .expect("run tar");
    assert!(status.success(), "tar failed");
    let digest = format!("sha256:{}", common::sha256_file(&tar));
    (tar, digest)
}

/// Asserts that `image` on `engine` has exactly one layer, the imported tar: its diff id, and
/// the bytes `docker save` writes for it.
async fn assert_layer(engine: &Dockerd, image: &str, diff_id: &str) {
    let out = engine
        .docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .RootFS.Layers}}",
            image,
        ])
        .await;
    out.ok();
    let layers: Vec<String> = serde_json::from_str(out.stdout.trim()).expect("layers JSON");
    assert_eq!(layers, vec![diff_id.to_string()], "diff ids of {image}");

    let dir = engine.dir.join("save");
    std::fs::create_dir_all(&dir).expect("save dir");
    let archive = dir.join("image.tar");
    engine
        .docker(&["save", "-o", path_str(&archive), image])
        .await
        .ok();
    let status = std::process::Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .arg("-xf")
        .arg(&archive)
        .status()
        .expect("run tar");
    assert!(status.success(), "cannot unpack the saved image");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).expect("manifest.json"))
            .expect("manifest.json is JSON");
    let saved = manifest[0]["Layers"][0]
        .as_str()
        .expect("one layer in manifest.json");
    assert_eq!(
        format!("sha256:{}", common::sha256_file(&dir.join(saved))),
        diff_id,
        "the saved layer differs from the imported tar"
    );
}

/// `GET /ca.crt` from a daemon's proxy, saved as PEM in the sandbox.
async fn fetch_proxy_ca(env: &Env, proxy: SocketAddr, name: &str) -> PathBuf {
    let path = env.path().join(format!("proxy-ca-{name}.pem"));
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--fail", "--noproxy", "*", "-o"])
        .arg(&path)
        .arg(format!("http://{proxy}/ca.crt"))
        .output()
        .await
        .expect("run curl");
    assert!(
        out.status.success(),
        "GET /ca.crt from the proxy failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = std::fs::read_to_string(&path).expect("proxy CA");
    assert!(
        pem.contains("BEGIN CERTIFICATE"),
        "not a PEM certificate: {pem}"
    );
    path
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_pulls_through_the_daemon_as_a_registry_mirror() {
    let env = Env::new();
    let registry = Registry::start_htpasswd(&env, &[(USER, PASSWORD)]).await;
    // `docker pull app:1` means docker.io/library/app:1, which goes to the mirrors first.
    let pushed = registry
        .push_image(&env, "library/app", "1", &[3 << 20], 11, (USER, PASSWORD))
        .await;
    let (_, pki) = env.ca("cluster", &["supernode", "host-0"]).await;
    let supernode = env.supernode(&pki[0], Some(&registry.ca_file)).await;
    let host = registry.host();
    let ca_file = registry.ca_file.to_str().expect("utf-8 path").to_owned();
    let daemon = env
        .daemon(
            &pki[1],
            &[&supernode],
            &[
                "--registry",
                &host,
                "--origin-ca",
                &ca_file,
                "--mirror-upstream",
                &host,
            ],
        )
        .await;
    let engine = Dockerd::start(
        env.path(),
        "mirrored",
        &EngineOptions {
            ca_bundle: Some(registry.bundle("mirrored", &[])),
            registry_mirrors: vec![format!("http://{}", daemon.proxy)],
            ..EngineOptions::default()
        },
    )
    .await;
    // Docker sends the mirror the credentials it holds for Docker Hub.
    let auth = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        format!("{USER}:{PASSWORD}"),
    );
    std::fs::write(
        engine.dir.join("cli/config.json"),
        serde_json::json!({ "auths": { "https://index.docker.io/v1/": { "auth": auth } } })
            .to_string(),
    )
    .expect("write the CLI's config.json");

    engine.docker(&["pull", "app:1"]).await.ok();
    let out = engine
        .docker(&["image", "inspect", "--format", "{{.Id}}", "app:1"])
        .await;
    out.ok();
    assert_eq!(
        out.stdout.trim(),
        pushed.config,
        "image id (the config digest)"
    );
    let metrics = daemon.metrics().await;
    let metric = |key: &str| common::metric_of(&metrics, key);
    assert!(
        metric(BLOB_MESH) >= pushed.blobs().len() as f64,
        "the mirror served {} blob requests from the mesh:\n{}",
        metric(BLOB_MESH),
        registry.access_log()
    );
    assert!(
        registry.blob_gets().await <= pushed.blobs().len(),
        "more than one registry GET per blob:\n{}",
        registry.access_log()
    );
}
