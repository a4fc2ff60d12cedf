//! The real `d7q get` against a real HTTPS origin nobody here wrote: Debian's nginx (harness in
//! `tests/common/nginx.rs`), over HTTP/2 and HTTP/1.1, static files, bodies without a length,
//! redirects, nginx's own 403 and 404, and the proxy's Range answers set against nginx's.
//! What reached the origin is read from nginx's access log.
//!
//! Needs root (for `/etc/hosts`), `nginx` and `curl`; `scripts/test.sh` installs them.

mod common;

use common::NoProxyEnv;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::nginx::{Nginx, PLACEHOLDER, REPLACEMENT};
use common::{assert_only, sha256, sha256_file, Cluster, Env, Supernode, PEER_BYTES, PIECE};

/// Exit code of `d7q get` when the origin failed (the command-line contract).
const ORIGIN: i32 = 3;

/// nginx, a cluster and a supernode trusting nginx's CA.
struct Setup {
    env: Env,
    nginx: Nginx,
    cluster: Cluster,
    sn: Supernode,
}

async fn setup() -> Setup {
    let env = Env::new();
    let nginx = Nginx::start(&env).await;
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&nginx.ca_file))
        .await;
    Setup {
        env,
        nginx,
        cluster,
        sn,
    }
}

impl Setup {
    /// `d7q get URL` through the supernode into a fresh directory `out`; the output path.
    fn get(&self, url: &str, out: &str) -> (common::Get<'_>, PathBuf) {
        let dir = self.env.dir(out);
        let file = dir.join("file");
        let get = self
            .env
            .get(url, &file)
            .via(&self.sn, &self.cluster.client_pki);
        (get, file)
    }
}

/// A file over HTTP/2 and another over HTTP/1.1 (nginx's log shows which protocol each request
/// came in), byte for byte; a second client of the same supernode is served from its store and
/// nginx sees one GET per file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_over_http2_and_http1() {
    let s = setup().await;
    let h2_sha = s.nginx.file("h2.bin", 5 * PIECE + 4321);
    let h1_sha = s.nginx.file("h1.bin", 3 * PIECE + 7);
    for (url, sha, out) in [
        (s.nginx.h2("/files/h2.bin"), &h2_sha, "h2"),
        (s.nginx.h1("/files/h1.bin"), &h1_sha, "h1"),
    ] {
        let (get, file) = s.get(&url, out);
        get.run().await.ok();
        assert_eq!(&sha256_file(&file), sha, "{url}: bytes differ");
        assert_only(file.parent().unwrap(), &["file"]);
    }
    let h2 = s.nginx.gets("/files/h2.bin").await;
    assert_eq!(h2.len(), 1, "{}", s.nginx.access_log());
    assert_eq!(
        (h2[0].port, h2[0].status, h2[0].protocol.as_str()),
        (s.nginx.h2_port, 200, "HTTP/2.0")
    );
    let h1 = s.nginx.gets("/files/h1.bin").await;
    assert_eq!(h1.len(), 1, "{}", s.nginx.access_log());
    assert_eq!(
        (h1[0].port, h1[0].status, h1[0].protocol.as_str()),
        (s.nginx.h1_port, 200, "HTTP/1.1")
    );

    // Another host's client: from the supernode's store, not from nginx.
    let other = s.env.path().join("client2");
    s.env
        .run(&[
            "ca",
            "issue",
            "--dir",
            path_str(&s.cluster.ca),
            "--name",
            "client2",
            "--out",
            path_str(&other),
        ])
        .await
        .ok();
    let dir = s.env.dir("again");
    s.env
        .get(&s.nginx.h2("/files/h2.bin"), &dir.join("file"))
        .via(&s.sn, &other)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&dir.join("file")), h2_sha);
    assert_eq!(
        s.nginx.gets("/files/h2.bin").await.len(),
        1,
        "the second get went to nginx:\n{}",
        s.nginx.access_log()
    );
}

/// Through two daemons: the second host's copy comes from the mesh (bytes from the first
/// daemon), and nginx's log shows a single GET of the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_host_gets_it_from_the_mesh() {
    let env = Env::new();
    let nginx = Nginx::start(&env).await;
    let sha = nginx.file("layer.bin", 16 * PIECE + 99);
    let (_ca, pkis) = env.ca("cluster", &["sn", "a", "b"]).await;
    let sn = env.supernode(&pkis[0], Some(&nginx.ca_file)).await;
    let a = env.daemon(&pkis[1], &[&sn], &[]).await;
    let b = env.daemon(&pkis[2], &[&sn], &[]).await;
    let url = nginx.h2("/files/layer.bin");
    for (d, name) in [(&a, "a"), (&b, "b")] {
        let out = env.dir(name).join("layer.bin");
        env.get(&url, &out)
            .arg("--daemon")
            .arg(d.socket_arg())
            .run()
            .await
            .ok();
        assert_eq!(sha256_file(&out), sha, "{name}: bytes differ");
    }
    let gets = nginx.gets("/files/layer.bin").await;
    assert_eq!(gets.len(), 1, "{}", nginx.access_log());
    assert_eq!(gets[0].status, 200);
    assert!(
        b.downloaded().await >= (16 * PIECE + 99) as f64,
        "the second daemon's counters miss bytes"
    );
    assert!(
        b.metric(PEER_BYTES).await > 0.0,
        "the second daemon took nothing from its peer"
    );
}

/// The embedded default (no daemon, no supernode) against nginx, with the digest checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_get_with_a_digest() {
    let env = Env::new();
    let nginx = Nginx::start(&env).await;
    let sha = nginx.file("embedded.bin", 2 * PIECE + 1);
    let out = env.dir("out");
    env.get(&nginx.h2("/files/embedded.bin"), &out.join("embedded.bin"))
        .arg("--no-daemon")
        .origin_ca(&nginx.ca_file)
        .digest(&sha)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join("embedded.bin")), sha);
    assert_only(&out, &["embedded.bin"]);
    assert_eq!(nginx.gets("/files/embedded.bin").await.len(), 1);
}

/// Bodies whose length nobody knows in advance: `sub_filter` rewrites the file as it is sent,
/// so nginx drops Content-Length and (HTTP/1.1) sends it chunked — curl shows both first. The
/// rewritten bytes arrive whole over both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_without_a_length() {
    let s = setup().await;
    // Several pieces of text with the placeholder all through it.
    let mut text = String::new();
    let mut line = 0u64;
    while text.len() < (3 * PIECE + 5000) as usize {
        text.push_str(&format!("line {line} of a text {PLACEHOLDER} rewrote\n"));
        line += 1;
    }
    s.nginx.put("/files/text.txt", text.as_bytes());
    let expected = text.replace(PLACEHOLDER, REPLACEMENT);
    assert_ne!(expected, text);

    let h1 = curl(
        &s.env,
        "chunked-h1",
        &[
            "--http1.1",
            "--cacert",
            path_str(&s.nginx.ca_file),
            &s.nginx.h1("/filtered/text.txt"),
        ],
    )
    .await;
    assert_eq!(h1.status(), 200, "{}", h1.stderr);
    assert_eq!(
        h1.header("transfer-encoding").as_deref(),
        Some("chunked"),
        "{}",
        h1.head
    );
    assert_eq!(h1.header("content-length"), None, "{}", h1.head);
    assert_eq!(h1.body, expected.as_bytes());
    let h2 = curl(
        &s.env,
        "chunked-h2",
        &[
            "--http2",
            "--cacert",
            path_str(&s.nginx.ca_file),
            &s.nginx.h2("/filtered/text.txt"),
        ],
    )
    .await;
    assert!(h2.head.starts_with("HTTP/2 200"), "{}", h2.head);
    assert_eq!(h2.header("content-length"), None, "{}", h2.head);

    for (url, out) in [
        (s.nginx.h1("/filtered/text.txt"), "h1"),
        (s.nginx.h2("/filtered/text.txt"), "h2"),
    ] {
        let (get, file) = s.get(&url, out);
        get.run().await.ok();
        assert_eq!(
            sha256_file(&file),
            sha256(expected.as_bytes()),
            "{url}: bytes differ"
        );
    }
    let filtered = s.nginx.gets("/filtered/text.txt").await;
    assert_eq!(
        filtered.len(),
        4,
        "curl twice, d7q twice:\n{}",
        s.nginx.access_log()
    );
}

/// 301 on the same server, 302 to the other server (another port: another origin, so the
/// user's Authorization stays behind), and a chain 302 → 307 → 301 with relative Locations:
/// every one ends at the file, byte for byte. A redirect loop is cut off after
/// `MAX_REDIRECTS` with the origin's exit code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_a_redirect_chain() {
    let s = setup().await;
    let sha = s.nginx.file("target.bin", 2 * PIECE + 77);
    const TOKEN: &str = "Bearer d7q-test-token";
    for (url, out) in [
        (s.nginx.h2("/moved/target.bin"), "moved"),
        (s.nginx.h1("/elsewhere/target.bin"), "elsewhere"),
        (s.nginx.h2("/chain/target.bin"), "chain"),
    ] {
        let (get, file) = s.get(&url, out);
        get.header(&format!("Authorization: {TOKEN}"))
            .run()
            .await
            .ok();
        assert_eq!(sha256_file(&file), sha, "via {url}");
        assert_only(file.parent().unwrap(), &["file"]);
    }
    let log = s.nginx.settled_accesses().await;
    let seen: Vec<(u16, &str, u16, &str)> = log
        .iter()
        .map(|a| (a.port, a.uri.as_str(), a.status, a.authorization.as_str()))
        .collect();
    let (h1, h2) = (s.nginx.h1_port, s.nginx.h2_port);
    assert_eq!(
        seen,
        [
            (h2, "/moved/target.bin", 301, TOKEN),
            (h2, "/files/target.bin", 200, TOKEN),
            (h1, "/elsewhere/target.bin", 302, TOKEN),
            (h2, "/files/target.bin", 200, "-"),
            (h2, "/chain/target.bin", 302, TOKEN),
            (h2, "/chain2/target.bin", 307, TOKEN),
            (h2, "/moved/target.bin", 301, TOKEN),
            (h2, "/files/target.bin", 200, TOKEN),
        ],
        "{}",
        s.nginx.access_log()
    );

    let (get, file) = s.get(&s.nginx.h2("/loop"), "loop");
    get.run().await.fails(ORIGIN, "redirects");
    assert_only(file.parent().unwrap(), &[]);
    assert_eq!(
        s.nginx.gets("/loop").await.len(),
        d7q::origin::MAX_REDIRECTS + 1,
        "{}",
        s.nginx.access_log()
    );
}

/// nginx's own 404 and 403 (`deny all`) are origin failures (exit code 3, one line naming the
/// status) through a supernode and embedded, leave no file, and are not cached: once the
/// missing file exists, the next get fetches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_404_and_403_are_origin_errors() {
    let s = setup().await;
    s.nginx.put("/forbidden/secret.bin", b"never served");
    let missing = s.nginx.h2("/files/later.bin");
    let forbidden = s.nginx.h2("/forbidden/secret.bin");
    for (url, status) in [(&missing, 404), (&forbidden, 403)] {
        let (get, file) = s.get(url, &format!("sn-{status}"));
        get.run()
            .await
            .fails(ORIGIN, &format!("origin answered {status}"));
        assert_only(file.parent().unwrap(), &[]);
        let dir = s.env.dir(&format!("embedded-{status}"));
        s.env
            .get(url, &dir.join("file"))
            .arg("--no-daemon")
            .origin_ca(&s.nginx.ca_file)
            .run()
            .await
            .fails(ORIGIN, &format!("origin answered {status}"));
        assert_only(&dir, &[]);
    }
    let statuses = |uri: &'static str| {
        let nginx = &s.nginx;
        async move {
            nginx
                .gets(uri)
                .await
                .iter()
                .map(|a| a.status)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(statuses("/forbidden/secret.bin").await, [403, 403]);
    assert_eq!(statuses("/files/later.bin").await, [404, 404]);

    let sha = s.nginx.file("later.bin", PIECE + 10);
    let (get, file) = s.get(&missing, "recovered");
    get.run().await.ok();
    assert_eq!(sha256_file(&file), sha);
    assert_eq!(statuses("/files/later.bin").await, [404, 404, 200]);
}

/// A user's Range header is not passed to the origin: pieces and digests are over the whole
/// content, so the whole file arrives and nginx saw a request without Range.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_range_header_is_not_sent_to_the_origin() {
    let s = setup().await;
    let sha = s.nginx.file("whole.bin", PIECE + 500);
    let (get, file) = s.get(&s.nginx.h2("/files/whole.bin"), "out");
    get.header("Range: bytes=0-99").run().await.ok();
    assert_eq!(sha256_file(&file), sha);
    let gets = s.nginx.gets("/files/whole.bin").await;
    assert_eq!(gets.len(), 1, "{}", s.nginx.access_log());
    assert_eq!((gets[0].status, gets[0].range.as_str()), (200, "-"));
}

/// nginx as a static pull-only registry (`v2/NAME/blobs/sha256:HEX` files) behind a daemon that
/// intercepts it: the blob comes through the mesh, and every Range the proxy answers from the
/// mesh gets the same status, Content-Range and bytes as nginx gives for it directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_ranges_match_nginxs_own() {
    let env = Env::new();
    let nginx = Nginx::start(&env).await;
    let (_ca, pkis) = env.ca("cluster", &["sn", "a"]).await;
    let sn = env.supernode(&pkis[0], Some(&nginx.ca_file)).await;
    let authority = nginx.h2_authority();
    let ca = path_str(&nginx.ca_file).to_owned();
    let daemon = env
        .daemon(
            &pkis[1],
            &[&sn],
            // nginx is on loopback, which the proxy reaches only where it is told it may.
            &[
                "--registry",
                &authority,
                "--origin-ca",
                &ca,
                "--proxy-allow",
                &format!("{}:{}", common::nginx::NGINX_IP, nginx.h2_port),
            ],
        )
        .await;
    let len = 3 * PIECE as usize + 12_345;
    let blob = pseudo_random(len, 5);
    let path = format!("/v2/static/app/blobs/sha256:{}", sha256(&blob));
    nginx.put(&path, &blob);
    let proxy_ca = daemon.data_dir.join("proxy-ca").join("proxy-ca.pem");
    let proxy = format!("http://{}", daemon.proxy);

    let whole = curl(
        &env,
        "whole",
        &[
            "-x",
            &proxy,
            "--cacert",
            path_str(&proxy_ca),
            &nginx.h2(&path),
        ],
    )
    .await;
    assert_eq!(whole.status(), 200, "{}\n{}", whole.stderr, daemon.log());
    assert_eq!(sha256(&whole.body), sha256(&blob));
    assert_eq!(
        daemon
            .metric("d7q_proxy_requests_total{kind=\"blob_mesh\"}")
            .await,
        1.0
    );

    let mut partial = 0;
    for (i, range) in [
        "bytes=1000-1999",
        "bytes=0-0",
        "bytes=-500",
        "bytes=3000000-",
        &format!("bytes={}-{}", len - 10, len + 1000),
        &format!("bytes={len}-"),
    ]
    .iter()
    .enumerate()
    {
        let header = format!("Range: {range}");
        let direct = curl(
            &env,
            &format!("direct-{i}"),
            &["--cacert", &ca, "-H", &header, &nginx.h2(&path)],
        )
        .await;
        let proxied = curl(
            &env,
            &format!("proxied-{i}"),
            &[
                "-x",
                &proxy,
                "--cacert",
                path_str(&proxy_ca),
                "-H",
                &header,
                &nginx.h2(&path),
            ],
        )
        .await;
        assert!(
            [206, 416].contains(&direct.status()),
            "{range}: nginx answered {}",
            direct.head
        );
        assert_eq!(proxied.status(), direct.status(), "{range}: status");
        assert_eq!(
            proxied.header("content-range"),
            direct.header("content-range"),
            "{range}: Content-Range"
        );
        if direct.status() == 206 {
            assert_eq!(proxied.body, direct.body, "{range}: bytes");
            partial += 1;
        }
    }
    // Every range came from the mesh: nginx sent the blob once without a Range (the seed), and
    // only the direct requests asked it for ranges.
    let gets = nginx.gets(&path).await;
    let whole_gets = gets.iter().filter(|a| a.range == "-").count();
    assert_eq!(whole_gets, 1, "{}", nginx.access_log());
    assert_eq!(gets.len(), 1 + 6, "{}", nginx.access_log());
    // Each 206 was served from the mesh (a 416 serves nothing, so it is not counted).
    assert_eq!(partial, 5);
    assert_eq!(
        daemon
            .metric("d7q_proxy_requests_total{kind=\"blob_mesh\"}")
            .await,
        1.0 + partial as f64
    );
}

/// What curl got: status line and headers of the last response, the body, stderr.
struct Curl {
    head: String,
    body: Vec<u8>,
    stderr: String,
}

impl Curl {
    fn status(&self) -> u16 {
        last_head(&self.head)
            .lines()
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }

    fn header(&self, name: &str) -> Option<String> {
        last_head(&self.head).lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }
}

/// The last response head in curl's `-D` output (a proxy's CONNECT answer comes first).
fn last_head(head: &str) -> &str {
    head.rfind("HTTP/").map(|i| &head[i..]).unwrap_or("")
}

/// `curl ARGS…` with no proxy from the environment, its head and body kept under `env`.
async fn curl(env: &Env, tag: &str, args: &[&str]) -> Curl {
    let head = env.path().join(format!("curl-{tag}.head"));
    let body = env.path().join(format!("curl-{tag}.body"));
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "--noproxy", ""])
        .arg("-D")
        .arg(&head)
        .arg("-o")
        .arg(&body)
        .args(args)
        .no_proxy_env()
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::TIMEOUT, out)
        .await
        .expect("curl timed out")
        .expect("curl runs (apt install curl)");
    let got = Curl {
        head: std::fs::read_to_string(&head).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    assert!(out.status.success(), "curl {args:?} failed: {}", got.stderr);
    got
}

/// `len` deterministic bytes.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}
