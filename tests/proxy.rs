//! The daemon's HTTPS proxy, end to end: the real `d7q daemon` binary, the real `curl` as the
//! client, and the real `docker-registry` (harness in `tests/common/registry.rs`) as the
//! intercepted registry under the name `registry.test`. The dev server plays the parts no real
//! registry here can: a generic HTTPS site behind a tunnel, a plain-HTTP site, and a registry
//! that redirects blobs to signed storage URLs.
//!
//! Needs root (for `/etc/hosts`), `curl`, `docker-registry`, `skopeo` and `htpasswd`;
//! `scripts/test.sh` installs them.

mod common;

use common::NoProxyEnv;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::registry::{ensure_hosts, Registry, REGISTRY_HOST, REGISTRY_IP};
use common::{sha256, Daemon, Env};
use d7q::devserver::{DevCa, DevServer, Fault};

/// Longest one curl may run.
const CURL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// What curl got: exit code, response head (headers of the last response) and body file.
struct Curl {
    code: i32,
    head: String,
    body: Vec<u8>,
    stderr: String,
}

impl Curl {
    fn status(&self) -> u16 {
        self.head
            .lines()
            .rev()
            .find(|l| l.starts_with("HTTP/"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<String> {
        // The head of the last response only (a CONNECT answer comes first).
        let last = self.head.rsplit("HTTP/").next().unwrap_or("");
        last.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// `curl ARGS…` with its head and body captured in files under `env`.
async fn curl(env: &Env, tag: &str, args: &[&str]) -> Curl {
    let head = env.path().join(format!("curl-{tag}.head"));
    let body = env.path().join(format!("curl-{tag}.body"));
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--noproxy", ""])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .no_proxy_env()
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CURL_TIMEOUT, cmd.output())
        .await
        .expect("curl timed out")
        .expect("curl runs (apt install curl)");
    Curl {
        code: out.status.code().unwrap_or(-1),
        head: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A registry stand-in: the dev server on `registry.test`, serving `DIR/v2/…`.
struct FakeRegistry {
    server: DevServer,
    ca_file: PathBuf,
    root: PathBuf,
}

impl FakeRegistry {
    async fn start(env: &Env) -> Self {
        ensure_hosts().expect("/etc/hosts (tests run as root)");
        let root = env.dir("registry-root");
        let ca = DevCa::new();
        let ca_file = env.path().join("registry-ca.pem");
        ca.write_pem(&ca_file).unwrap();
        let server = DevServer::builder(root.clone())
            .bind(SocketAddr::new(IpAddr::V4(REGISTRY_IP), 0))
            .tls(&ca)
            .extra_name(REGISTRY_HOST)
            .start()
            .await
            .expect("start the registry stand-in");
        Self {
            server,
            ca_file,
            root,
        }
    }

    fn authority(&self) -> String {
        format!("{REGISTRY_HOST}:{}", self.server.addr().port())
    }

    fn url(&self, path: &str) -> String {
        format!("https://{}{path}", self.authority())
    }

    /// Writes `len` deterministic bytes as a blob; its path and bytes.
    fn blob(&self, name: &str, len: usize, seed: u64) -> (String, Vec<u8>) {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let path = format!("/v2/{name}/blobs/sha256:{}", sha256(&data));
        self.file(&path, &data);
        (path, data)
    }

    fn file(&self, path: &str, data: &[u8]) {
        let file = self.root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, data).unwrap();
    }
}

/// The proxy CA a daemon created on first start.
fn proxy_ca(daemon: &Daemon) -> PathBuf {
    daemon.data_dir.join("proxy-ca").join("proxy-ca.pem")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// `/ca.crt`, `d7q ca proxy-init`/`proxy-show`, and a CONNECT to a host that is not
/// intercepted, tunnelled byte for byte (curl verifies the origin's own certificate through it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_and_tunnel() {
    let env = Env::new();
    let cluster = env.cluster().await;
    let origin = env.origin().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let ca_dir = env.path().join("my-proxy-ca");
    let bad = env
        .run(&[
            "ca",
            "proxy-init",
            "--dir",
            s(&ca_dir),
            "--name-constraint",
            "*.test",
        ])
        .await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("--name-constraint"), "{bad:?}");
    env.run(&[
        "ca",
        "proxy-init",
        "--dir",
        s(&ca_dir),
        "--name-constraint",
        "registry.test",
    ])
    .await
    .ok();
    let again = env.run(&["ca", "proxy-init", "--dir", s(&ca_dir)]).await;
    assert_ne!(again.code, 0, "proxy-init must not overwrite: {again:?}");
    let shown = env.run(&["ca", "proxy-show", "--dir", s(&ca_dir)]).await;
    shown.ok();
    assert!(shown.stdout.starts_with("-----BEGIN CERTIFICATE-----"));
    let plain_root = env.dir("plain");
    std::fs::write(plain_root.join("hello.txt"), b"hello through the proxy\n").unwrap();
    let plain = DevServer::start(plain_root, "127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    // Both sites are on loopback, which the proxy reaches only where it is told it may.
    let origin_addr = origin.server.addr().to_string();
    let plain_addr = plain.addr().to_string();
    let daemon = env
        .daemon(
            &cluster.client_pki,
            &[&sn],
            &[
                "--registry",
                "registry.test",
                "--proxy-ca",
                s(&ca_dir),
                "--proxy-allow",
                &origin_addr,
                "--proxy-allow",
                &plain_addr,
            ],
        )
        .await;

    let got = curl(&env, "ca", &[&format!("http://{}/ca.crt", daemon.proxy)]).await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.status(), 200);
    assert_eq!(
        got.header("content-type").as_deref(),
        Some("application/x-pem-file")
    );
    assert_eq!(String::from_utf8(got.body).unwrap(), shown.stdout);

    // localhost is not intercepted: a plain tunnel, and the origin's certificate reaches curl.
    let digest = origin.file("tunnelled.bin", 3 << 20);
    let got = curl(
        &env,
        "tunnel",
        &[
            "-x",
            &format!("http://{}", daemon.proxy),
            "--cacert",
            s(&origin.ca_file),
            &origin.url("tunnelled.bin"),
        ],
    )
    .await;
    assert_eq!(got.code, 0, "{}\n{}", got.stderr, daemon.log());
    assert_eq!(got.status(), 200);
    assert_eq!(sha256(&got.body), digest);
    assert_eq!(origin.gets("tunnelled.bin"), 1);
    assert_eq!(
        daemon
            .metric("d7q_proxy_requests_total{kind=\"tunnel\"}")
            .await,
        1.0
    );
    // Nothing was downloaded through the mesh for it.
    assert_eq!(daemon.downloaded().await, 0.0);
    // A metric that is not exported fails the test instead of reading as 0, and names what is.
    let scraped = daemon.metrics().await;
    let missing = std::panic::catch_unwind(|| {
        common::metric_of(&scraped, "d7q_proxy_requests_total{kind=\"tunneled\"}")
    })
    .expect_err("a missing metric read as a value");
    let message = missing
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        message.contains("kind=\\\"tunneled\\\"")
            && message.contains("d7q_proxy_requests_total{kind=\"tunnel\"}"),
        "{message}"
    );

    // A plain-HTTP proxy request is forwarded.
    let got = curl(
        &env,
        "forward",
        &[
            "-x",
            &format!("http://{}", daemon.proxy),
            &plain.url("/hello.txt"),
        ],
    )
    .await;
    assert_eq!(got.code, 0, "{}", got.stderr);
    assert_eq!(got.status(), 200);
    assert_eq!(got.body, b"hello through the proxy\n");
    assert_eq!(plain.get_count("/hello.txt"), 1);
    assert_eq!(
        daemon
            .metric("d7q_proxy_requests_total{kind=\"forward\"}")
            .await,
        1.0
    );
}

/// An intercepted registry — the real `docker-registry`, htpasswd auth, an image pushed with
/// skopeo: a layer fetched through two daemons leaves the registry once (the second copy comes
/// from the mesh); a Range gets the registry's own 206; a manifest passes through over HTTP/2;
/// and a client without valid credentials gets the registry's 401, not the cached blob.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_registry_through_two_daemons() {
    const ALICE: (&str, &str) = ("alice", "alice-secret");
    let env = Env::new();
    let registry = Registry::start_htpasswd(&env, &[ALICE]).await;
    let image = registry
        .push_image(&env, "team/app", "v1", &[(4 << 20) + 12_345], 1, ALICE)
        .await;
    let (_, pki) = env.ca("cluster", &["sn", "a", "b"]).await;
    let sn = env.supernode(&pki[0], Some(&registry.ca_file)).await;
    let host = registry.host();
    // The registry is on loopback, which the proxy reaches only where it is told it may.
    let allow = registry.addr().to_string();
    let flags = [
        "--registry",
        &host,
        "--origin-ca",
        s(&registry.ca_file),
        "--proxy-allow",
        &allow,
    ];
    let a = env.daemon(&pki[1], &[&sn], &flags).await;
    let b = env.daemon(&pki[2], &[&sn], &flags).await;
    let creds = format!("{}:{}", ALICE.0, ALICE.1);
    // Through daemon `d` (None: straight to the registry), with `extra` curl arguments.
    let run = |tag: &'static str, d: Option<&Daemon>, extra: Vec<String>| {
        let mut args: Vec<String> = match d {
            Some(d) => vec![
                "-x".into(),
                format!("http://{}", d.proxy),
                "--cacert".into(),
                s(&proxy_ca(d)).into(),
            ],
            None => vec!["--cacert".into(), s(&registry.ca_file).into()],
        };
        args.extend(extra);
        let env = &env;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(env, tag, &refs).await
        }
    };
    let with_creds = |url: String| vec!["-u".to_string(), creds.clone(), url];

    let layer = &image.layers[0];
    let data = std::fs::read(
        image
            .layout
            .join("blobs/sha256")
            .join(layer.trim_start_matches("sha256:")),
    )
    .expect("the pushed layer in its layout");
    let url = registry.url(&format!("/v2/team/app/blobs/{layer}"));
    let before = registry.blob_gets().await;
    let got = run("blob-a", Some(&a), with_creds(url.clone())).await;
    assert_eq!(got.code, 0, "{}\n{}", got.stderr, a.log());
    assert_eq!(got.status(), 200, "{}", got.head);
    assert_eq!(sha256(&got.body), sha256(&data));
    assert_eq!(
        got.header("docker-content-digest").as_deref(),
        Some(&**layer)
    );
    let got = run("blob-b", Some(&b), with_creds(url.clone())).await;
    assert_eq!(got.code, 0, "{}\n{}", got.stderr, b.log());
    assert_eq!(sha256(&got.body), sha256(&data));
    assert_eq!(
        registry.blob_gets().await - before,
        1,
        "the registry sent the blob once:\n{}",
        registry.access_log()
    );
    for d in [&a, &b] {
        assert_eq!(
            d.metric("d7q_proxy_requests_total{kind=\"blob_mesh\"}")
                .await,
            1.0
        );
    }
    assert!(b.downloaded().await >= data.len() as f64);

    // A range of the cached blob: what the registry itself answers, from the mesh.
    let mut ranged = vec!["-r".to_string(), "1000-1999".to_string()];
    ranged.extend(with_creds(url.clone()));
    let direct = run("range-direct", None, ranged.clone()).await;
    let got = run("range", Some(&b), ranged).await;
    assert_eq!(direct.status(), 206, "{}", direct.head);
    assert_eq!(got.status(), 206, "{}", got.head);
    assert_eq!(got.body, &data[1000..2000]);
    assert_eq!(got.body, direct.body);
    assert_eq!(
        got.header("content-range"),
        Some(format!("bytes 1000-1999/{}", data.len()))
    );
    assert_eq!(got.header("content-range"), direct.header("content-range"));
    assert_eq!(
        registry.blob_gets().await - before,
        2,
        "only the direct range reached the registry:\n{}",
        registry.access_log()
    );

    // Everything else passes through, over HTTP/2 inside the intercepted connection (ALPN), as
    // Go clients speak it.
    let manifests = registry.manifest_requests().await;
    let accept = "Accept: application/vnd.oci.image.manifest.v1+json".to_string();
    let mut args = vec!["--http2".to_string(), "-H".to_string(), accept];
    args.extend(with_creds(registry.url("/v2/team/app/manifests/v1")));
    let got = run("manifest", Some(&a), args).await;
    assert_eq!(got.status(), 200, "{}", got.head);
    assert!(got.head.contains("HTTP/2 200"), "{}", got.head);
    assert_eq!(format!("sha256:{}", sha256(&got.body)), image.manifest);
    let got = run(
        "missing",
        Some(&a),
        with_creds(registry.url("/v2/team/app/manifests/nope")),
    )
    .await;
    assert_eq!(got.status(), 404, "{}", got.head);
    assert_eq!(
        registry.manifest_requests().await - manifests,
        2,
        "both manifest requests reached the registry:\n{}",
        registry.access_log()
    );

    // No or wrong credentials: the registry's own 401 through either daemon, though the bytes
    // are in the mesh.
    let gets = registry.blob_gets().await;
    for (tag, d, user) in [
        ("denied-a", &a, None),
        ("denied-b", &b, None),
        ("wrong-b", &b, Some("alice:wrong")),
    ] {
        let args = |url: &str| -> Vec<String> {
            let mut v: Vec<String> = user
                .map(|u| vec!["-u".to_string(), u.to_string()])
                .unwrap_or_default();
            v.push(url.to_string());
            v
        };
        let direct = run("denied-direct", None, args(&url)).await;
        let got = run(tag, Some(d), args(&url)).await;
        assert_eq!(direct.status(), 401, "{}", direct.head);
        assert_eq!(got.status(), 401, "{tag}: {}", got.head);
        assert_eq!(
            got.header("www-authenticate"),
            direct.header("www-authenticate"),
            "{tag}"
        );
        assert_eq!(got.body, direct.body, "{tag}: not the registry's body");
        assert!(got.body.len() < 1000, "{tag}: {} bytes", got.body.len());
    }
    assert_eq!(
        a.metric("d7q_proxy_requests_total{kind=\"denied\"}").await,
        1.0
    );
    assert_eq!(
        b.metric("d7q_proxy_requests_total{kind=\"denied\"}").await,
        2.0
    );
    assert_eq!(
        registry.blob_gets().await,
        gets,
        "a refused client made the registry send the blob"
    );
}

/// A registry that answers blob requests with a redirect to object storage (a signed URL, as
/// S3-backed registries do): the blob still comes through the mesh, verified, and is keyed by
/// its digest — a second client whose redirect carries another signature gets it from the mesh
/// without the storage being read again. The dev server stays the stand-in here: Debian's
/// `docker-registry` runs on its filesystem driver, which never redirects to storage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_redirected_to_signed_storage_urls() {
    let env = Env::new();
    let registry = FakeRegistry::start(&env).await;
    let (_, pki) = env.ca("cluster", &["sn", "a", "b"]).await;
    let sn = env.supernode(&pki[0], Some(&registry.ca_file)).await;
    let allow = registry.server.addr().to_string();
    let flags = [
        "--registry",
        REGISTRY_HOST,
        "--origin-ca",
        s(&registry.ca_file),
        "--proxy-allow",
        &allow,
    ];
    let a = env.daemon(&pki[1], &[&sn], &flags).await;
    let b = env.daemon(&pki[2], &[&sn], &flags).await;

    let (path, data) = registry.blob("team/signed", (3 << 20) + 77, 3);
    // The bytes live in "object storage"; the blob path only redirects there.
    registry.file("/storage/layer-3", &data);
    std::fs::remove_file(registry.root.join(path.trim_start_matches('/'))).unwrap();
    for (tag, d, sig) in [("signed-a", &a, "one"), ("signed-b", &b, "two")] {
        let signed = registry.url(&format!("/storage/layer-3?X-Signature={sig}"));
        registry.server.set_fault(&path, Fault::Redirect(signed));
        let got = curl(
            &env,
            tag,
            &[
                "-x",
                &format!("http://{}", d.proxy),
                "--cacert",
                s(&proxy_ca(d)),
                &registry.url(&path),
            ],
        )
        .await;
        assert_eq!(got.code, 0, "{}\n{}", got.stderr, d.log());
        assert_eq!(got.status(), 200, "{}", got.head);
        assert_eq!(sha256(&got.body), sha256(&data));
        assert_eq!(
            d.metric("d7q_proxy_requests_total{kind=\"blob_mesh\"}")
                .await,
            1.0,
            "served from the mesh"
        );
    }
    assert_eq!(
        registry.server.get_count("/storage/layer-3"),
        1,
        "object storage was read once for both clients"
    );
}
