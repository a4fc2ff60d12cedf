//! `d7q get` that fails: every origin failure, a digest mismatch, bad local paths and usage.
//! Each case asserts the exit code, the one-line message, that neither the output file nor a
//! temporary file is left behind, and, where the origin can recover, that the failure was not
//! cached: the next get goes back to the origin and succeeds.

mod common;

use common::{assert_only, closed_tcp_port, setup, sha256, sha256_file, Env, Setup};
use d7q::devserver::Fault;

/// Exit codes of the command-line contract.
const USAGE: i32 = 2;
const ORIGIN: i32 = 3;
const INTEGRITY: i32 = 4;
const LOCAL: i32 = 6;

impl Setup {
    /// A `d7q get` of `name` into a fresh directory `out`, through the supernode.
    fn get(&self, name: &str, out: &str) -> (common::Get<'_>, std::path::PathBuf) {
        let dir = self.env.dir(out);
        let get = self
            .env
            .get(&self.origin.url(name), &dir.join(name))
            .via(&self.sn, &self.cluster.client_pki);
        (get, dir)
    }

    /// Gets `name` and checks the bytes against `sha`.
    async fn get_ok(&self, name: &str, out: &str, sha: &str) {
        let (get, dir) = self.get(name, out);
        get.run().await.ok();
        assert_eq!(sha256_file(&dir.join(name)), sha, "{name}: bytes differ");
        assert_only(&dir, &[name]);
    }

    /// Sets `fault` on `name`, expects a failure with `code` and `needle`, clears the fault and
    /// expects the next get to reach the origin again and succeed.
    async fn fails_then_recovers(
        &self,
        name: &str,
        len: u64,
        fault: Fault,
        code: i32,
        needle: &str,
    ) {
        let sha = self.origin.file(name, len);
        self.origin.server.set_fault(&format!("/{name}"), fault);
        let (get, dir) = self.get(name, "failed");
        get.run().await.fails(code, needle);
        assert_only(&dir, &[]);
        let asked = self.origin.gets(name);
        assert!(asked >= 1, "{name}: the origin was never asked");

        self.origin.server.clear_fault(&format!("/{name}"));
        self.get_ok(name, "recovered", &sha).await;
        assert!(
            self.origin.gets(name) > asked,
            "{name}: the failure was cached; the origin was not asked again"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found() {
    let s = setup().await;
    s.fails_then_recovers(
        "404.bin",
        2 * common::PIECE,
        Fault::Status(404),
        ORIGIN,
        "origin answered 404",
    )
    .await;
}

/// A path that simply does not exist yet, then does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_then_created() {
    let s = setup().await;
    let (get, dir) = s.get("later.bin", "failed");
    get.run().await.fails(ORIGIN, "origin answered 404");
    assert_only(&dir, &[]);
    assert_eq!(s.origin.gets("later.bin"), 1);
    let sha = s.origin.file("later.bin", 1000);
    s.get_ok("later.bin", "recovered", &sha).await;
    assert_eq!(s.origin.gets("later.bin"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_error() {
    let s = setup().await;
    s.fails_then_recovers(
        "500.bin",
        1000,
        Fault::Status(500),
        ORIGIN,
        "origin answered 500",
    )
    .await;
}

/// 401 without credentials; the same URL with `--header 'Authorization: …'` succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthorized_then_authorized() {
    let s = setup().await;
    let name = "private.bin";
    let sha = s.origin.file(name, 3 * common::PIECE + 17);
    let auth = "Basic ZDdxOnNlY3JldA==";
    s.origin
        .server
        .set_fault("/private.bin", Fault::RequireAuth(auth.into()));

    let (get, dir) = s.get(name, "anonymous");
    get.run().await.fails(ORIGIN, "origin answered 401");
    assert_only(&dir, &[]);

    let (get, dir) = s.get(name, "wrong");
    get.header("Authorization: Basic d3Jvbmc6d3Jvbmc=")
        .run()
        .await
        .fails(ORIGIN, "origin answered 401");
    assert_only(&dir, &[]);

    let (get, dir) = s.get(name, "authorized");
    get.header(&format!("Authorization: {auth}"))
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&dir.join(name)), sha);
    assert_only(&dir, &[name]);
    assert_eq!(s.origin.gets(name), 3);
}

/// Nothing listens on the origin's port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_refused() {
    let s = setup().await;
    let url = format!("https://localhost:{}/nothing.bin", closed_tcp_port());
    let dir = s.env.dir("out");
    s.env
        .get(&url, &dir.join("nothing.bin"))
        .via(&s.sn, &s.cluster.client_pki)
        .run()
        .await
        .fails(ORIGIN, "origin unreachable");
    assert_only(&dir, &[]);
}

/// The origin resets the connection in the middle of the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_mid_body() {
    let s = setup().await;
    s.fails_then_recovers(
        "reset.bin",
        5 * common::PIECE + 3,
        Fault::ResetAfter(common::PIECE + common::PIECE / 2),
        ORIGIN,
        "origin body truncated",
    )
    .await;
}

/// The origin declares more bytes than it sends, then closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_body() {
    let s = setup().await;
    let len = 4 * common::PIECE + 99;
    s.fails_then_recovers(
        "short.bin",
        len,
        Fault::ShortBody {
            declared: len,
            sent: 2 * common::PIECE + 10,
        },
        ORIGIN,
        "origin body truncated",
    )
    .await;
}

/// A short body inside the first piece, so no piece completes before the failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_body_in_the_first_piece() {
    let s = setup().await;
    s.fails_then_recovers(
        "tiny-short.bin",
        5000,
        Fault::ShortBody {
            declared: 5000,
            sent: 100,
        },
        ORIGIN,
        "origin body truncated",
    )
    .await;
}

/// A --digest that does not match: exit 4 and no file; asking again with the same wrong digest
/// fails again (the content was not cached as good under it); the right digest succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_mismatch() {
    let s = setup().await;
    let name = "digest.bin";
    let sha = s.origin.file(name, 2 * common::PIECE + 1);
    let wrong = sha256(b"not the content");
    for attempt in ["first", "again"] {
        let (get, dir) = s.get(name, attempt);
        get.digest(&wrong)
            .run()
            .await
            .fails(INTEGRITY, "digest mismatch");
        assert_only(&dir, &[]);
    }
    let (get, dir) = s.get(name, "right");
    get.digest(&sha).run().await.ok();
    assert_eq!(sha256_file(&dir.join(name)), sha);
    assert_only(&dir, &[name]);
}

/// The embedded default reports origin failures the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_failures() {
    let env = Env::new();
    let origin = env.origin().await;
    let len = 3 * common::PIECE;
    let sha = origin.file("e.bin", len);

    let cases = [
        (Fault::Status(404), ORIGIN, "origin answered 404"),
        (
            Fault::RequireAuth("Bearer x".into()),
            ORIGIN,
            "origin answered 401",
        ),
        (
            Fault::ResetAfter(common::PIECE + 1),
            ORIGIN,
            "origin body truncated",
        ),
        (
            Fault::ShortBody {
                declared: len,
                sent: len / 2,
            },
            ORIGIN,
            "origin body truncated",
        ),
    ];
    for (i, (fault, code, needle)) in cases.into_iter().enumerate() {
        origin.server.set_fault("/e.bin", fault);
        let dir = env.dir(&format!("out{i}"));
        env.get(&origin.url("e.bin"), &dir.join("e.bin"))
            .origin_ca(&origin.ca_file)
            .run()
            .await
            .fails(code, needle);
        assert_only(&dir, &[]);
    }
    origin.server.clear_fault("/e.bin");

    let dir = env.dir("mismatch");
    env.get(&origin.url("e.bin"), &dir.join("e.bin"))
        .origin_ca(&origin.ca_file)
        .digest(&sha256(b"other"))
        .run()
        .await
        .fails(INTEGRITY, "digest mismatch");
    assert_only(&dir, &[]);

    let dir = env.dir("refused");
    let url = format!("https://localhost:{}/e.bin", closed_tcp_port());
    env.get(&url, &dir.join("e.bin"))
        .origin_ca(&origin.ca_file)
        .run()
        .await
        .fails(ORIGIN, "origin unreachable");
    assert_only(&dir, &[]);

    let dir = env.dir("ok");
    env.get(&origin.url("e.bin"), &dir.join("e.bin"))
        .origin_ca(&origin.ca_file)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&dir.join("e.bin")), sha);
}

/// The output's directory does not exist, or is a file: a local IO failure (exit 6), and
/// nothing is written anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_not_writable() {
    let s = setup().await;
    s.origin.file("local.bin", 1000);
    let dir = s.env.dir("out");
    std::fs::write(dir.join("a-file"), b"x").unwrap();
    for out in [
        dir.join("a-file").join("local.bin"),
        dir.join("missing").join("local.bin"),
    ] {
        s.env
            .get(&s.origin.url("local.bin"), &out)
            .via(&s.sn, &s.cluster.client_pki)
            .run()
            .await
            .fails(LOCAL, "");
        assert_only(&dir, &["a-file"]);
    }
    // The output is an existing directory.
    let target = s.env.dir("out-dir");
    s.env
        .get(&s.origin.url("local.bin"), &target)
        .via(&s.sn, &s.cluster.client_pki)
        .run()
        .await
        .fails(LOCAL, "");
    assert_only(&target, &[]);
}

/// Usage errors: exit 2 and nothing fetched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("u.bin", 10);
    let out = env.dir("out");
    let out_file = out.join("u.bin");
    let out_str = out_file.to_str().unwrap();
    let url = origin.url("u.bin");
    // No -o.
    assert_eq!(env.run(&["get", &url]).await.code, USAGE);
    // Not sha256:HEX.
    env.run(&["get", &url, "-o", out_str, "--digest", "md5:abc"])
        .await
        .fails(USAGE, "");
    // A header without a colon.
    env.run(&["get", &url, "-o", out_str, "--header", "nocolon"])
        .await
        .fails(USAGE, "");
    // Not an http(s) URL.
    env.run(&["get", "ftp://localhost/u.bin", "-o", out_str])
        .await
        .fails(USAGE, "");
    // An unknown command.
    assert_eq!(env.run(&["frobnicate"]).await.code, USAGE);
    assert_only(&out, &[]);
    assert_eq!(origin.gets("u.bin"), 0);
}

/// Four clients at once while the origin cuts every download: all four fail cleanly, nothing
/// is cached, and once the origin recovers a get succeeds from a new origin download.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_all_fail_when_the_origin_fails() {
    let env = Env::new();
    let origin = env.origin().await;
    let name = "flaky.bin";
    let sha = origin.file(name, 8 * common::PIECE + 5);
    origin
        .server
        .set_fault("/flaky.bin", Fault::ResetAfter(3 * common::PIECE));
    let (_ca, nodes) = env
        .ca("cluster", &["supernode", "c1", "c2", "c3", "c4"])
        .await;
    let sn = env.supernode(&nodes[0], Some(&origin.ca_file)).await;
    let url = origin.url(name);
    let dirs: Vec<_> = (1..=4).map(|i| env.dir(&format!("out{i}"))).collect();
    let gets = dirs
        .iter()
        .zip(&nodes[1..])
        .map(|(dir, pki)| env.get(&url, &dir.join(name)).via(&sn, pki).run());
    for output in futures_util::future::join_all(gets).await {
        output.fails(ORIGIN, "origin body truncated");
    }
    for dir in &dirs {
        assert_only(dir, &[]);
    }
    let asked = origin.gets(name);
    assert!(asked >= 1);

    origin.server.clear_fault("/flaky.bin");
    let dir = env.dir("recovered");
    env.get(&url, &dir.join(name))
        .via(&sn, &nodes[1])
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&dir.join(name)), sha);
    assert_eq!(origin.gets(name), asked + 1);
}
