//! The daemon against a hostile local user or client: the real `d7q` binary, with curl, the dev
//! server and a socket this test answers itself as the adversaries.
//!
//! - `d7q get` through a daemon verifies what it receives and refuses a socket another user
//!   could have planted; the daemon keeps its socket directory, store and keys to itself.
//!
//! Needs root (sockets and directories are handed to another uid with chown).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use common::{assert_only, sha256, Env, Output};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// A uid that is not root and not ours: `nobody`.
const OTHER_UID: u32 = 65534;

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
