//! `d7q get` that succeeds: through a real supernode process and on the embedded default, for
//! files of every shape, with coalesced origin downloads, the passive cache, redirects, digests and
//! `d7q status`.

mod common;

use std::time::Duration;

use common::{assert_only, sha256_file, Env, PIECE};
use d7q::devserver::Fault;

/// Fetches `name` (of `len` bytes) through a fresh supernode and checks bytes, leftovers and
/// that the origin was asked exactly once.
async fn through_supernode(name: &str, len: u64, timeout: Duration) {
    let env = Env::new();
    let origin = env.origin().await;
    let sha = origin.file(name, len);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let out = env.dir("out");
    env.get(&origin.url(name), &out.join(name))
        .via(&sn, &cluster.client_pki)
        .timeout(timeout)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join(name)), sha, "{name}: bytes differ");
    assert_eq!(std::fs::metadata(out.join(name)).unwrap().len(), len);
    assert_only(&out, &[name]);
    assert_eq!(origin.gets(name), 1, "{name}: origin GETs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_file() {
    through_supernode("empty.bin", 0, common::TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_byte() {
    through_supernode("one.bin", 1, common::TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_one_piece() {
    through_supernode("piece.bin", PIECE, common::TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_pieces_with_a_short_tail() {
    through_supernode("tail.bin", 5 * PIECE + 12345, common::TIMEOUT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_a_gibibyte() {
    through_supernode("big.bin", 512 * PIECE, Duration::from_secs(600)).await;
}

/// Four clients ask for one URL at once: one origin download serves them all, and a later client
/// is served from the cache without touching the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_share_one_origin_download_and_later_gets_are_cached() {
    let env = Env::new();
    let origin = env.origin().await;
    let name = "shared.bin";
    let sha = origin.file(name, 8 * PIECE + 777);
    // A slow origin, so the four registrations overlap with the origin download.
    origin
        .server
        .set_fault("/shared.bin", Fault::Throttle(8 * PIECE));
    let (_ca, clients) = env
        .ca("cluster", &["supernode", "c1", "c2", "c3", "c4", "c5"])
        .await;
    let sn = env.supernode(&clients[0], Some(&origin.ca_file)).await;
    let url = origin.url(name);
    let outs: Vec<_> = (1..=4).map(|i| env.dir(&format!("out{i}"))).collect();
    let gets = outs
        .iter()
        .zip(&clients[1..5])
        .map(|(out, pki)| env.get(&url, &out.join(name)).via(&sn, pki).run());
    for result in futures_util::future::join_all(gets).await {
        result.ok();
    }
    for out in &outs {
        assert_eq!(sha256_file(&out.join(name)), sha);
        assert_only(out, &[name]);
    }
    assert_eq!(origin.gets(name), 1, "four concurrent gets: origin GETs");

    origin.server.clear_fault("/shared.bin");
    let later = env.dir("later");
    env.get(&url, &later.join(name))
        .via(&sn, &clients[5])
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&later.join(name)), sha);
    assert_eq!(origin.gets(name), 1, "a cached get went to the origin");
}

/// Several downloads at once from one node identity (one host running several gets).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_gets_from_one_identity() {
    let env = Env::new();
    let origin = env.origin().await;
    let names = ["a.bin", "b.bin", "c.bin"];
    let shas: Vec<_> = names
        .iter()
        .map(|n| origin.file(n, 3 * PIECE + 7))
        .collect();
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let out = env.dir("out");
    let gets = names.iter().flat_map(|n| {
        let out = &out;
        let env = &env;
        let origin = &origin;
        let sn = &sn;
        let pki = &cluster.client_pki;
        (0..2).map(move |i| {
            env.get(&origin.url(n), &out.join(format!("{i}-{n}")))
                .via(sn, pki)
                .run()
        })
    });
    for output in futures_util::future::join_all(gets).await {
        output.ok();
    }
    for (n, sha) in names.iter().zip(&shas) {
        for i in 0..2 {
            assert_eq!(&sha256_file(&out.join(format!("{i}-{n}"))), sha);
        }
        assert_eq!(origin.gets(n), 1, "{n}");
    }
    let mut want: Vec<String> = Vec::new();
    for n in names {
        for i in 0..2 {
            want.push(format!("{i}-{n}"));
        }
    }
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    assert_only(&out, &want);
}

/// The same client twice: the second get is served from the supernode's cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_get_of_the_same_url_is_cached() {
    let env = Env::new();
    let origin = env.origin().await;
    let sha = origin.file("again.bin", 3 * PIECE + 1);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    for round in ["first", "second"] {
        let out = env.dir(round);
        env.get(&origin.url("again.bin"), &out.join("again.bin"))
            .via(&sn, &cluster.client_pki)
            .run()
            .await
            .ok();
        assert_eq!(sha256_file(&out.join("again.bin")), sha);
    }
    assert_eq!(origin.gets("again.bin"), 1);
}

/// No --supernode: a peer and a supernode inside the process, trusting the origin through
/// --origin-ca.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_fetches_and_verifies() {
    let env = Env::new();
    let origin = env.origin().await;
    let name = "embedded.bin";
    let sha = origin.file(name, 2 * PIECE + 99);
    let out = env.dir("out");
    env.get(&origin.url(name), &out.join(name))
        .origin_ca(&origin.ca_file)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join(name)), sha);
    assert_only(&out, &[name]);
    assert_eq!(origin.gets(name), 1);

    // With the right digest too.
    let out = env.dir("out-digest");
    env.get(&origin.url(name), &out.join(name))
        .origin_ca(&origin.ca_file)
        .digest(&sha)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join(name)), sha);
}

/// The embedded default trusts origins through SSL_CERT_FILE as well.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_trusts_ssl_cert_file() {
    let env = Env::new();
    let origin = env.origin().await;
    let sha = origin.file("env.bin", 12345);
    let out = env.dir("out");
    env.get(&origin.url("env.bin"), &out.join("env.bin"))
        .env("SSL_CERT_FILE", origin.ca_file.to_str().unwrap())
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join("env.bin")), sha);
}

/// The origin's CA is not trusted: the embedded default refuses the origin (exit 3) and leaves no
/// file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_default_refuses_an_untrusted_origin() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("untrusted.bin", 100);
    let out = env.dir("out");
    env.get(&origin.url("untrusted.bin"), &out.join("untrusted.bin"))
        .run()
        .await
        .fails(3, "origin");
    assert_only(&out, &[]);
}

/// A redirect is followed and yields the target's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_followed() {
    let env = Env::new();
    let origin = env.origin().await;
    let sha = origin.file("target.bin", 2 * PIECE + 5);
    origin
        .server
        .set_fault("/alias.bin", Fault::Redirect(origin.url("target.bin")));
    origin
        .server
        .set_fault("/relative.bin", Fault::Redirect("/target.bin".into()));
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    for alias in ["alias.bin", "relative.bin"] {
        let out = env.dir(&format!("out-{alias}"));
        env.get(&origin.url(alias), &out.join("file"))
            .via(&sn, &cluster.client_pki)
            .run()
            .await
            .ok();
        assert_eq!(sha256_file(&out.join("file")), sha, "via {alias}");
        assert_only(&out, &["file"]);
        assert_eq!(origin.gets(alias), 1);
    }
    assert!(origin.gets("target.bin") >= 1);
}

/// A matching --digest through a supernode succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_matching_digest_succeeds() {
    let env = Env::new();
    let origin = env.origin().await;
    let sha = origin.file("digest.bin", PIECE + 3);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let out = env.dir("out");
    env.get(&origin.url("digest.bin"), &out.join("digest.bin"))
        .via(&sn, &cluster.client_pki)
        .digest(&sha)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join("digest.bin")), sha);
}

/// An origin that speaks only HTTP/1.1 works as well as the HTTP/2 default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http1_only_origin() {
    let env = Env::new();
    let root = env.dir("origin");
    let ca = d7q::devserver::DevCa::new();
    let ca_file = env.path().join("origin-ca.pem");
    ca.write_pem(&ca_file).unwrap();
    let server = d7q::devserver::DevServer::builder(&root)
        .tls(&ca)
        .http2(false)
        .start()
        .await
        .unwrap();
    let sha = common::write_file(&root.join("h1.bin"), 3 * PIECE + 3, 11);
    let cluster = env.cluster().await;
    let sn = env.supernode(&cluster.supernode_pki, Some(&ca_file)).await;
    let out = env.dir("out");
    env.get(&server.url("/h1.bin"), &out.join("h1.bin"))
        .via(&sn, &cluster.client_pki)
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&out.join("h1.bin")), sha);
}

/// After a get, `d7q status --json` on the supernode lists the task, complete, with its length,
/// to a client with a cluster certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_lists_the_completed_task() {
    let env = Env::new();
    let origin = env.origin().await;
    let len = 3 * PIECE + 4321;
    origin.file("status.bin", len);
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&origin.ca_file))
        .await;
    let out = env.dir("out");
    let url = origin.url("status.bin");
    env.get(&url, &out.join("status.bin"))
        .via(&sn, &cluster.client_pki)
        .run()
        .await
        .ok();
    // Without a cluster certificate the task list is withheld (tests/hostile.rs has the rest).
    let status = env.run(&["status", "--json", &sn.addr()]).await;
    status.ok();
    assert!(!status.stdout.contains(&url), "{}", status.stdout);

    let pki = cluster.client_pki.to_str().unwrap();
    let status = env
        .run(&["status", "--json", "--pki", pki, &sn.addr()])
        .await;
    status.ok();
    check_status(&status.stdout, &url, len);
}

#[track_caller]
fn check_status(stdout: &str, url: &str, len: u64) {
    let json: serde_json::Value = serde_json::from_str(stdout)
        .unwrap_or_else(|e| panic!("status is not JSON ({e}): {stdout}"));
    assert!(json["node"].is_object(), "no node object: {json}");
    let tasks = json["tasks"]
        .as_array()
        .unwrap_or_else(|| panic!("no tasks array: {json}"));
    let task = tasks
        .iter()
        .find(|t| t["url"] == url)
        .unwrap_or_else(|| panic!("no task for {url}: {json}"));
    let id = task["id"].as_str().unwrap_or_default();
    assert!(
        !id.is_empty() && id.chars().all(|c| c.is_ascii_hexdigit()),
        "task id is not hex: {task}"
    );
    assert_eq!(task["length"], len, "{task}");
    let pieces = len.div_ceil(PIECE);
    assert_eq!(task["piece_count"], pieces, "{task}");
    assert_eq!(task["pieces_done"], pieces, "{task}");
    let state = task["state"].as_str().unwrap_or_default();
    assert!(
        state == "complete" || state == "seeding",
        "task not complete: {task}"
    );
}
