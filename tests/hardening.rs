//! The daemon against a hostile local user or client: the real `d7q` binary, with curl, the dev
//! server and a socket this test answers itself as the adversaries.
//!
//! - The proxy is no open relay: CONNECT and plain-HTTP forwarding reach port 443 (80) and the
//!   registry ports only, never loopback, link-local or the daemon's own listeners, whatever a
//!   name resolves to, unless `--proxy-allow` says so; a refusal is a 403 saying why.
//! - Metrics live on their own address, off the proxy port.
//! - The proxy CA a daemon makes is name-constrained to its registries (no IP addresses) and
//!   valid for two years, not a century; a daemon whose CA does not vouch for a registry it is
//!   told to intercept refuses to start and says how to rotate.
//! - Only a configured registry, over HTTPS, answering 2xx (directly or at the end of its
//!   redirects) lets a client have a blob from the mesh: not a registry named by `?ns=`, not a
//!   cleartext one, not a redirect to nowhere.
//! - `d7q get` through a daemon verifies what it receives and refuses a socket another user
//!   could have planted; the daemon keeps its socket directory, store and keys to itself.
//!
//! Needs root (`/etc/hosts`; sockets and directories are handed to another uid with chown) and
//! curl.

mod common;

use common::NoProxyEnv;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;

use common::registry::{ensure_hosts, REGISTRY_HOST, REGISTRY_IP};
use common::{assert_only, sha256, Env, Output};
use d7q::devserver::{DevCa, DevServer, Fault};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpStream, UnixListener};

/// A uid that is not root and not ours: `nobody`.
const OTHER_UID: u32 = 65534;
/// Longest one curl or one raw proxy request may take.
const CLIENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// A `--proxy-allow` rule that opens nothing the tests use (TEST-NET-3): a daemon started with
/// it gets the defaults, not the harness's loopback allowance.
const STRICT: [&str; 2] = ["--proxy-allow", "203.0.113.9:9"];

/// What came back from the proxy: status and body.
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// One request `head` (without the final blank line) sent to `proxy` as is; the answer head and
/// body (by Content-Length), or whatever arrived before the proxy closed.
async fn raw(proxy: SocketAddr, head: &str) -> Answer {
    let exchange = async {
        let mut s = TcpStream::connect(proxy)
            .await
            .expect("connect to the proxy");
        s.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf).await.unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
                continue;
            };
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                got.truncate(end + 4 + len);
                break;
            }
        }
        got
    };
    let got = tokio::time::timeout(CLIENT_TIMEOUT, exchange)
        .await
        .expect("the proxy answers");
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = match got.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => got[end + 4..].to_vec(),
        None => Vec::new(),
    };
    Answer { status, body }
}

/// `CONNECT target` through `proxy`.
async fn connect(proxy: SocketAddr, target: &str) -> Answer {
    raw(
        proxy,
        &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}"),
    )
    .await
}

/// What curl got.
struct Curl {
    code: i32,
    status: u16,
    body: Vec<u8>,
    stderr: String,
}

/// `curl ARGS… URL` with no proxy from the environment; body and status captured.
async fn curl(env: &Env, tag: &str, args: &[&str]) -> Curl {
    let body = env.path().join(format!("curl-{tag}.body"));
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-o"])
        .arg(&body)
        .args(["-w", "%{http_code}"])
        .args(args)
        .no_proxy_env()
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(CLIENT_TIMEOUT, out)
        .await
        .expect("curl timed out")
        .expect("curl runs (apt install curl)");
    Curl {
        code: out.status.code().unwrap_or(-1),
        status: String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0),
        body: std::fs::read(&body).unwrap_or_default(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Whether `haystack` holds any 32-byte window of `secret`'s first kilobyte.
fn leaks(haystack: &[u8], secret: &[u8]) -> bool {
    let probe = &secret[..secret.len().min(1024)];
    probe
        .chunks(32)
        .filter(|c| c.len() == 32)
        .any(|c| haystack.windows(32).any(|w| w == c))
}

#[track_caller]
fn assert_refused(a: &Answer, needle: &str, what: &str) {
    let body = String::from_utf8_lossy(&a.body);
    assert_eq!(a.status, 403, "{what}: {body}");
    assert!(body.contains(needle), "{what}: {needle:?} not in {body:?}");
}

/// CONNECT and plain-HTTP forwarding go where the policy says, and nowhere else: loopback
/// (by address or by a name resolving there), link-local, unspecified, other ports and the
/// daemon's own listeners are refused with a 403 that says why, before anything is dialled;
/// `--proxy-allow` opens exactly what it names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_is_not_an_open_relay() {
    ensure_hosts().expect("/etc/hosts (tests run as root)");
    let env = Env::new();
    let origin = env.origin().await;
    let digest = origin.file("secret.bin", 100_000);
    let plain_root = env.dir("plain");
    std::fs::write(plain_root.join("hello.txt"), b"internal only\n").unwrap();
    let plain = DevServer::start(plain_root, "127.0.0.1:0".parse().unwrap(), None)
        .await
        .unwrap();
    let (_, pki) = env.ca("cluster", &["sn", "strict", "open", "one"]).await;
    let sn = env.supernode(&pki[0], Some(&origin.ca_file)).await;
    let strict = env.daemon(&pki[1], &[&sn], &STRICT).await;

    let port = origin.server.addr().port();
    for (target, reason) in [
        (format!("127.0.0.1:{port}"), "loopback"),
        // A name on a closed port is refused before it is even resolved.
        (format!("localhost:{port}"), "only to port 443"),
        // Port 443 is open, but these names resolve to loopback.
        ("localhost:443".into(), "loopback"),
        (format!("{REGISTRY_HOST}:443"), "loopback"),
        ("[::1]:443".into(), "loopback"),
        ("[::ffff:127.0.0.1]:443".into(), "loopback"),
        ("169.254.169.254:443".into(), "link-local"),
        ("[fe80::1]:443".into(), "link-local"),
        ("0.0.0.0:443".into(), "unspecified"),
        ("192.0.2.1:22".into(), "only to port 443"),
        ("192.0.2.1:25".into(), "--proxy-allow"),
    ] {
        assert_refused(&connect(strict.proxy, &target).await, reason, &target);
    }
    assert_refused(
        &connect(strict.proxy, &strict.proxy.to_string()).await,
        "own listener",
        "its own proxy port",
    );
    // curl, as a client would: the tunnel fails, the origin never hears of it.
    let got = curl(
        &env,
        "tunnel-refused",
        &[
            "-x",
            &format!("http://{}", strict.proxy),
            "--cacert",
            origin.ca_file.to_str().unwrap(),
            &origin.url("secret.bin"),
        ],
    )
    .await;
    assert_ne!(got.code, 0, "curl got through: {}", got.stderr);
    assert!(got.stderr.contains("403"), "{}", got.stderr);
    assert_eq!(origin.gets("secret.bin"), 0);

    // Plain HTTP in absolute form: the same rules, port 80 by default.
    let plain_url = format!("http://127.0.0.1:{}/hello.txt", plain.addr().port());
    for (url, reason) in [
        (plain_url.clone(), "loopback"),
        (
            format!("http://localhost:{}/hello.txt", plain.addr().port()),
            "only to port 80",
        ),
        (
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "link-local",
        ),
        ("http://192.0.2.1:8080/".to_string(), "only to port 80"),
    ] {
        let host = url.split('/').nth(2).unwrap().to_string();
        let a = raw(strict.proxy, &format!("GET {url} HTTP/1.1\r\nHost: {host}")).await;
        assert_refused(&a, reason, &url);
    }
    assert_eq!(plain.get_count("/hello.txt"), 0);
    assert!(
        strict
            .metric("d7q_proxy_requests_total{kind=\"denied\"}")
            .await
            >= 15.0
    );

    // Loopback allowed by address: still never the daemon's own listeners.
    let open = env.daemon(&pki[2], &[&sn], &[]).await;
    for own in [open.proxy, open.metrics_addr] {
        assert_refused(
            &connect(open.proxy, &own.to_string()).await,
            "own listener",
            "own",
        );
    }
    assert_eq!(
        connect(open.proxy, &format!("127.0.0.1:{port}"))
            .await
            .status,
        200
    );

    // One address and port allowed: that tunnel works end to end, its neighbours do not.
    let allow = format!("127.0.0.1:{port}");
    let one = env
        .daemon(&pki[3], &[&sn], &["--proxy-allow", &allow])
        .await;
    let got = curl(
        &env,
        "tunnel-allowed",
        &[
            "-x",
            &format!("http://{}", one.proxy),
            "--cacert",
            origin.ca_file.to_str().unwrap(),
            &format!("https://127.0.0.1:{port}/secret.bin"),
        ],
    )
    .await;
    assert_eq!((got.code, got.status), (0, 200), "{}", got.stderr);
    assert_eq!(sha256(&got.body), digest);
    assert_refused(
        &connect(one.proxy, &format!("127.0.0.1:{}", plain.addr().port())).await,
        "loopback",
        "a neighbour of the allowed port",
    );
    let a = raw(one.proxy, &format!("GET {plain_url} HTTP/1.1\r\nHost: x")).await;
    assert_refused(&a, "loopback", "forwarding next to the allowed port");
}

/// `--metrics ADDR` serves `/metrics` there, and the proxy port (which every local client can
/// reach) no longer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_their_own_address() {
    let env = Env::new();
    let (_, pki) = env.ca("cluster", &["sn", "host"]).await;
    let sn = env.supernode(&pki[0], None).await;
    let d = env.daemon(&pki[1], &[&sn], &[]).await;
    assert_ne!(d.metrics_addr, d.proxy);
    let got = curl(&env, "m", &[&format!("http://{}/metrics", d.metrics_addr)]).await;
    assert_eq!(got.status, 200, "{}", got.stderr);
    assert!(String::from_utf8_lossy(&got.body).contains("d7q_proxy_requests_total"));
    let got = curl(&env, "p", &[&format!("http://{}/metrics", d.proxy)]).await;
    assert_eq!(got.status, 404);
    assert!(!String::from_utf8_lossy(&got.body).contains("d7q_"));
    let got = curl(&env, "h", &[&format!("http://{}/health", d.proxy)]).await;
    assert_eq!((got.status, &got.body[..]), (200, &b"ok\n"[..]));
}

/// A registry on `registry.test`, a private blob in it, and two impostors serving other bytes
/// under the blob's path (so they answer 200 to every HEAD of it): one over HTTPS with a
/// certificate the daemon trusts, one over cleartext on the registry's own address.
struct Impostors {
    registry: DevServer,
    https: DevServer,
    cleartext: DevServer,
    ca_file: PathBuf,
    path: String,
    secret: Vec<u8>,
}

async fn impostors(env: &Env) -> Impostors {
    ensure_hosts().expect("/etc/hosts (tests run as root)");
    let ca = DevCa::new();
    let ca_file = env.path().join("registry-ca.pem");
    ca.write_pem(&ca_file).unwrap();
    let secret: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let path = format!("/v2/team/private/blobs/sha256:{}", sha256(&secret));
    let junk = vec![b'x'; secret.len()];
    let serve = |name: &str, data: &[u8]| {
        let root = env.dir(name);
        let file = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, data).unwrap();
        root
    };
    let registry = DevServer::builder(serve("registry", &secret))
        .bind(SocketAddr::new(IpAddr::V4(REGISTRY_IP), 0))
        .tls(&ca)
        .extra_name(REGISTRY_HOST)
        .start()
        .await
        .unwrap();
    registry.set_fault(&path, Fault::RequireAuth("Basic dXNlcjpwdw==".into()));
    let https = DevServer::start(
        serve("impostor", &junk),
        "127.0.0.1:0".parse().unwrap(),
        Some(&ca),
    )
    .await
    .unwrap();
    let cleartext = DevServer::builder(serve("cleartext", &junk))
        .bind(SocketAddr::new(IpAddr::V4(REGISTRY_IP), 0))
        .start()
        .await
        .unwrap();
    Impostors {
        registry,
        https,
        cleartext,
        ca_file,
        path,
        secret,
    }
}

impl Impostors {
    fn url(&self, path: &str) -> String {
        format!(
            "https://{REGISTRY_HOST}:{}{path}",
            self.registry.addr().port()
        )
    }
}

/// A private blob in the mesh reaches only clients a configured registry, over HTTPS, answered
/// 2xx for: not through a `?ns=` naming another registry, not through a cleartext request that
/// an impostor answers, not after a redirect that leads nowhere or to cleartext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_configured_registry_over_https_unlocks_a_cached_blob() {
    let env = Env::new();
    let im = impostors(&env).await;
    let (_, pki) = env.ca("cluster", &["sn", "host"]).await;
    let sn = env.supernode(&pki[0], Some(&im.ca_file)).await;
    // A pattern without a port, as an operator writes it.
    let d = env
        .daemon(
            &pki[1],
            &[&sn],
            &[
                "--registry",
                REGISTRY_HOST,
                "--origin-ca",
                im.ca_file.to_str().unwrap(),
            ],
        )
        .await;
    let proxy_ca = d.data_dir.join("proxy-ca").join("proxy-ca.pem");
    let via = |extra: &[&str]| -> Vec<String> {
        let mut a = vec![
            "-x".to_string(),
            format!("http://{}", d.proxy),
            "--cacert".into(),
            proxy_ca.to_str().unwrap().into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let run = |tag: &'static str, args: Vec<String>| {
        let env = &env;
        async move {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            curl(env, tag, &refs).await
        }
    };

    // Someone allowed brings the blob into the mesh.
    let url = im.url(&im.path);
    let got = run("owner", via(&["-u", "user:pw", &url])).await;
    assert_eq!(
        got.status,
        200,
        "{}
{}",
        got.stderr,
        d.log()
    );
    assert_eq!(sha256(&got.body), sha256(&im.secret));
    assert_eq!(
        d.metric("d7q_proxy_requests_total{kind=\"blob_mesh\"}")
            .await,
        1.0
    );

    // Mirror mode naming an impostor that says 200 to the HEAD: refused, impostor not asked.
    let mirror = format!(
        "http://{}{}?ns=127.0.0.1:{}",
        d.proxy,
        im.path,
        im.https.addr().port()
    );
    let got = run("ns", vec![mirror]).await;
    assert_eq!(got.status, 403, "{}", String::from_utf8_lossy(&got.body));
    assert!(String::from_utf8_lossy(&got.body).contains("not a registry this mirror serves"));
    assert!(!leaks(&got.body, &im.secret), "ns= impostor got the blob");
    assert_eq!(im.https.get_count(&im.path), 0);
    // The configured registry through ns= still answers for itself.
    let ns = format!(
        "http://{}{}?ns={REGISTRY_HOST}%3A{}",
        d.proxy,
        im.path,
        im.registry.addr().port()
    );
    let got = run("ns-registry", vec![ns]).await;
    assert_eq!(got.status, 401);
    assert!(!leaks(&got.body, &im.secret));

    // Plain HTTP to the intercepted name, on another port, answered by the impostor: its
    // bytes, never the mesh's.
    let cleartext = format!(
        "http://{REGISTRY_HOST}:{}{}",
        im.cleartext.addr().port(),
        im.path
    );
    let got = run("cleartext", via(&[&cleartext])).await;
    assert!(
        !leaks(&got.body, &im.secret),
        "a cleartext check unlocked the blob"
    );
    assert_eq!(
        got.body,
        vec![b'x'; im.secret.len()],
        "the impostor's own answer"
    );

    // The registry redirects the HEAD to nowhere, or to cleartext that answers 200: the
    // client gets the registry's redirect, not the bytes.
    for (tag, location) in [
        ("to-nowhere", im.url("/nowhere")),
        ("to-cleartext", cleartext.clone()),
    ] {
        im.registry
            .set_fault(&im.path, Fault::Redirect(location.clone()));
        let got = run(tag, via(&[&url])).await;
        assert_eq!(got.status, 302, "{tag}: {}", got.stderr);
        assert!(!leaks(&got.body, &im.secret), "{tag}: the blob leaked");
    }
    assert_eq!(
        d.metric("d7q_proxy_requests_total{kind=\"blob_mesh\"}")
            .await,
        1.0
    );
}

/// Who answers a fake daemon socket, and how.
#[derive(Clone, Copy)]
enum Lie {
    /// Announces `content` with its true digest and length and sends it.
    Content(&'static [u8]),
    /// Announces `content` with its true digest and a longer length, sends it and hangs up.
    Short(&'static [u8]),
    /// Announces one digest and sends other bytes.
    WrongDigest(&'static [u8]),
}

/// A socket at `path` answering every `d7q get` with `lie`; the number of clients it saw.
fn fake_daemon(path: &Path, lie: Lie) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let listener = UnixListener::bind(path).expect("bind the fake daemon");
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let (read, mut write) = stream.into_split();
            let mut request = String::new();
            let _ = BufReader::new(read).read_line(&mut request).await;
            let (announced_len, digest, body): (u64, String, &[u8]) = match lie {
                Lie::Content(c) => (c.len() as u64, sha256(c), c),
                Lie::Short(c) => (c.len() as u64 + 1000, sha256(c), c),
                Lie::WrongDigest(c) => (c.len() as u64, sha256(b"something else"), c),
            };
            let done = format!(
                "{{\"done\":{{\"length\":{announced_len},\"sha256\":\"sha256:{digest}\"}}}}\n"
            );
            let _ = write.write_all(done.as_bytes()).await;
            let _ = write.write_all(body).await;
            let _ = write.shutdown().await;
        }
    });
    seen
}

async fn get_via_socket(env: &Env, socket: &Path, out: &Path, digest: Option<&str>) -> Output {
    let mut get = env
        .get("https://origin.invalid/layer.bin", out)
        .arg("--daemon")
        .arg(socket.to_str().expect("utf-8 path"));
    if let Some(d) = digest {
        get = get.digest(d);
    }
    get.run().await
}

fn chown(path: &Path, uid: u32) {
    std::os::unix::fs::lchown(path, Some(uid), None)
        .unwrap_or_else(|e| panic!("chown {}: {e} (tests run as root)", path.display()));
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

/// Every file and directory under `root` (itself included) and its mode.
fn walk(root: &Path) -> Vec<(PathBuf, u32)> {
    let mut out = vec![(root.to_path_buf(), mode(root))];
    if std::fs::symlink_metadata(root).unwrap().is_dir() {
        for e in std::fs::read_dir(root).unwrap() {
            out.extend(walk(&e.unwrap().path()));
        }
    }
    out
}

/// Whatever answers on the socket, `d7q get` keeps only bytes that match `--digest`, the
/// length and the digest the daemon announced; otherwise it fails and leaves no file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_through_a_daemon_verifies_what_it_receives() {
    const REAL: &[u8] = b"the layer the user asked for\n";
    const FORGED: &[u8] = b"a layer someone else chose\n";
    let env = Env::new();
    let out = env.dir("out");

    // A socket serving other bytes than the ones --digest names: exit 4, no file.
    let forged = env.path().join("forged.sock");
    let seen = fake_daemon(&forged, Lie::Content(FORGED));
    get_via_socket(&env, &forged, &out.join("a"), Some(&sha256(REAL)))
        .await
        .fails(4, "not the expected");
    assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_only(&out, &[]);

    // Fewer bytes than announced: a failure, no half file.
    let short = env.path().join("short.sock");
    fake_daemon(&short, Lie::Short(REAL));
    get_via_socket(&env, &short, &out.join("b"), Some(&sha256(REAL)))
        .await
        .fails(5, "bytes");
    assert_only(&out, &[]);

    // Without --digest, the bytes must still be the ones the daemon vouched for.
    let wrong = env.path().join("wrong.sock");
    fake_daemon(&wrong, Lie::WrongDigest(REAL));
    get_via_socket(&env, &wrong, &out.join("c"), None)
        .await
        .fails(4, "announced");
    assert_only(&out, &[]);

    // The honest answer is taken.
    let honest = env.path().join("honest.sock");
    fake_daemon(&honest, Lie::Content(REAL));
    get_via_socket(&env, &honest, &out.join("d"), Some(&sha256(REAL)))
        .await
        .ok();
    assert_eq!(std::fs::read(out.join("d")).unwrap(), REAL);
}

/// A socket, or a directory above it, that another user owns or may write is refused with a
/// clear error before anything is sent to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_refuses_a_socket_another_user_could_have_planted() {
    const CONTENT: &[u8] = b"bytes from an impostor\n";
    let env = Env::new();
    let out = env.dir("out");
    let dir = env.dir("planted");
    let socket = dir.join("daemon.sock");
    let seen = fake_daemon(&socket, Lie::Content(CONTENT));
    let digest = sha256(CONTENT);

    chown(&socket, OTHER_UID);
    get_via_socket(&env, &socket, &out.join("x"), Some(&digest))
        .await
        .fails(5, &format!("owned by uid {OTHER_UID}"));

    chown(&socket, 0);
    chown(&dir, OTHER_UID);
    get_via_socket(&env, &socket, &out.join("x"), Some(&digest))
        .await
        .fails(5, &format!("{} is owned by uid {OTHER_UID}", dir.display()));

    chown(&dir, 0);
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    get_via_socket(&env, &socket, &out.join("x"), Some(&digest))
        .await
        .fails(5, "writable by other users");

    // Through a symlink from a directory anyone may write into, to the same planted socket.
    let link = env.path().join("link.sock");
    std::os::unix::fs::symlink(&socket, &link).unwrap();
    get_via_socket(&env, &link, &out.join("x"), Some(&digest))
        .await
        .fails(5, "writable by other users");

    assert_eq!(
        seen.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "nothing may be sent to an untrusted socket"
    );
    assert_only(&out, &[]);

    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    get_via_socket(&env, &socket, &out.join("x"), Some(&digest))
        .await
        .ok();
    assert_eq!(std::fs::read(out.join("x")).unwrap(), CONTENT);
}

/// The daemon creates its socket directory 0700 and will not listen in one another user owns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_socket_directory_is_its_own() {
    let env = Env::new();
    let (_, pki) = env.ca("cluster", &["sn", "host"]).await;
    let sn = env.supernode(&pki[0], None).await;
    let daemon_args = |data: &str, socket: &Path| -> Vec<String> {
        [
            "daemon",
            "--listen",
            "127.0.0.1:0",
            "--proxy",
            "127.0.0.1:0",
            "--data-dir",
            env.dir(data).to_str().unwrap(),
            "--pki",
            pki[1].to_str().unwrap(),
            "--supernode",
            &sn.addr(),
            "--socket",
            socket.to_str().unwrap(),
        ]
        .map(String::from)
        .to_vec()
    };

    let run = env.path().join("run");
    let socket = run.join("d7q").join("daemon.sock");
    let mut child = env
        .command()
        .args(daemon_args("data1", &socket))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn daemon");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = tokio::time::timeout(common::READY_TIMEOUT, lines.next_line())
        .await
        .expect("daemon ready in time")
        .unwrap()
        .unwrap_or_default();
    assert!(ready.starts_with("ready "), "{ready:?}");
    assert_eq!(mode(&run), 0o700);
    assert_eq!(mode(&run.join("d7q")), 0o700);
    child.kill().await.unwrap();

    let theirs = env.dir("theirs");
    chown(&theirs, OTHER_UID);
    let args = daemon_args("data2", &theirs.join("daemon.sock"));
    let out = env.run_with(&args, &[], common::TIMEOUT).await;
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr.contains(&format!("owned by uid {OTHER_UID}")),
        "{out}"
    );
    assert!(!theirs.join("daemon.sock").exists());
}

/// After a download, nothing in the daemon's data directory can be read by another local user,
/// and key files are 0600; a store an older build left open is closed when the daemon starts.
/// The user's own output keeps the user's umask.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_and_the_keys_are_private() {
    let env = Env::new();
    let origin = env.origin().await;
    let digest = origin.file("layer.bin", 3 << 20);
    let (ca, pki) = env.ca("cluster", &["sn", "host"]).await;
    let sn = env.supernode(&pki[0], Some(&origin.ca_file)).await;
    let d = env.daemon(&pki[1], &[&sn], &[]).await;
    let out = env.dir("out");
    env.get(&origin.url("layer.bin"), &out.join("layer.bin"))
        .arg("--daemon")
        .arg(d.socket_arg())
        .digest(&digest)
        .run()
        .await
        .ok();
    assert_eq!(common::sha256_file(&out.join("layer.bin")), digest);

    let data_dir = d.data_dir.clone();
    let assert_private = |when: &str| {
        let entries = walk(&data_dir);
        assert!(
            entries
                .iter()
                .any(|(p, _)| p.extension() == Some("data".as_ref())),
            "no data file in {entries:?}"
        );
        assert!(
            entries
                .iter()
                .any(|(p, _)| p.ends_with("proxy-ca/proxy-ca.key")),
            "no proxy CA key in {entries:?}"
        );
        for (path, mode) in &entries {
            assert_eq!(
                mode & 0o077,
                0,
                "{when}: {} is {mode:04o}, open to other users",
                path.display()
            );
        }
    };
    assert_private("after a download");
    for key in [ca.join("ca.key"), pki[1].join("node.key")] {
        assert_eq!(mode(&key), 0o600, "{}", key.display());
    }
    // SAFETY: umask only swaps the process's mask; it is put back at once.
    let umask = unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m
    };
    assert_eq!(mode(&out.join("layer.bin")), 0o666 & !umask);

    // An older build's store: everything readable by everyone. A restart closes it.
    drop(d);
    for (path, _) in walk(&data_dir) {
        let open = if std::fs::metadata(&path).unwrap().is_dir() {
            0o755
        } else {
            0o644
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(open)).unwrap();
    }
    let d = env.daemon(&pki[1], &[&sn], &[]).await;
    assert_eq!(d.data_dir, data_dir);
    assert_private("after a restart on an open store");
    // `d7q ca issue` over an old, open key file writes it 0600.
    let key = pki[1].join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let reissued = env.path().join("cluster-host");
    env.run(&[
        "ca",
        "issue",
        "--dir",
        ca.to_str().unwrap(),
        "--name",
        "host",
        "--out",
        reissued.to_str().unwrap(),
    ])
    .await
    .ok();
    assert_eq!(reissued, pki[1]);
    assert_eq!(mode(&key), 0o600);
}

/// `openssl x509 ARGS -in FILE`: its stdout, and whether it succeeded.
fn openssl_x509(file: &Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .arg("x509")
        .args(args)
        .arg("-in")
        .arg(file)
        .output()
        .expect("run openssl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_ca_vouches_for_the_registries_only_and_must_be_rotated_for_others() {
    let env = Env::new();
    let (_ca, pkis) = env.ca("cluster", &["sn", "a"]).await;
    let sn = env.supernode(&pkis[0], None).await;
    let mut d = env
        .daemon(&pkis[1], &[&sn], &["--registry", "registry.test:5000"])
        .await;
    let answer = raw(d.proxy, "GET /ca.crt HTTP/1.1\r\nHost: d7q").await;
    assert_eq!(answer.status, 200);
    let served = String::from_utf8(answer.body).unwrap();
    let file = d.data_dir.join("proxy-ca").join("proxy-ca.pem");
    assert_eq!(served, std::fs::read_to_string(&file).unwrap());
    let (_, text) = openssl_x509(&file, &["-noout", "-text"]);
    assert!(
        text.contains("Permitted:") && text.contains("DNS:registry.test"),
        "{text}"
    );
    // No address is vouched for: every IPv4 and IPv6 address is excluded.
    assert!(
        text.contains("Excluded:") && text.contains("IP:0.0.0.0/0.0.0.0"),
        "{text}"
    );
    // Two years, not a century.
    let day = 86_400u64;
    let (ok, _) = openssl_x509(&file, &["-noout", "-checkend", &(700 * day).to_string()]);
    assert!(ok, "the CA expires within 700 days");
    let (ok, _) = openssl_x509(&file, &["-noout", "-checkend", &(740 * day).to_string()]);
    assert!(!ok, "the CA is valid for more than 740 days");
    d.kill().await;

    // The same store told to intercept a registry the CA was not made for: no start.
    let data = d.data_dir.to_str().unwrap().to_string();
    let pki = pkis[1].to_str().unwrap().to_string();
    let socket = env.path().join("again.sock");
    let sn_addr = sn.addr();
    let args = [
        "daemon",
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        "127.0.0.1:0",
        "--data-dir",
        &data,
        "--pki",
        &pki,
        "--socket",
        socket.to_str().unwrap(),
        "--supernode",
        &sn_addr,
        "--registry",
        "registry.test:5000",
        "--registry",
        "harbor.example",
    ];
    let out = env.run(&args).await;
    assert_ne!(out.code, 0, "{out:?}");
    assert!(
        out.stderr
            .contains("does not vouch for registry harbor.example")
            && out.stderr.contains("proxy-init"),
        "{}",
        out.stderr
    );
    // The CA is untouched.
    assert_eq!(served, std::fs::read_to_string(&file).unwrap());
}
