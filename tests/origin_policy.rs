//! The supernode against origins that try to use it: the real `d7q` binary, the dev server as
//! the origin (and as a plain-HTTP second origin), and the tests reading what reached each.
//!
//! - An origin fetch never connects to a link-local, cloud metadata or unspecified address — not
//!   for the URL a peer registered and not for a redirect — unless `--origin-allow` names it; the
//!   refusal names host, address and rule, the download fails, and nothing is written. An
//!   `--origin-deny` rule (flag or config key) refuses what the defaults allow.
//! - Credentials (`Authorization`, `Cookie`) go to the first URL's scheme, host and port only: an
//!   https origin redirecting to http does not hand them to the http side.
//! - A presigned URL's query appears in no error a client reads and in no log line of the
//!   supernode or the daemon.

mod common;

use common::{assert_only, setup, sha256_file, Env};
use d7q::devserver::{DevServer, Fault};

const ORIGIN: i32 = 3;

/// A cleartext origin on 127.0.0.1 serving `root`.
async fn plain_origin(root: &std::path::Path) -> DevServer {
    DevServer::builder(root)
        .start()
        .await
        .expect("plain origin")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_and_urls_to_link_local_and_metadata_addresses_are_refused() {
    let s = setup().await;
    let cases = [
        // The classic: an origin bounces the supernode to the metadata service.
        (
            "redirect",
            Some("http://169.254.169.254/latest/meta-data/iam/security-credentials/"),
            "origin 169.254.169.254 refused: a cloud metadata address \
             (allow with --origin-allow 169.254.169.254/32)",
        ),
        (
            "redirect",
            Some("http://[::ffff:169.254.169.254]/latest/meta-data/"),
            "origin ::ffff:169.254.169.254 refused: 169.254.169.254 is a cloud metadata address",
        ),
        (
            "redirect",
            Some("http://169.254.10.20:8080/"),
            "origin 169.254.10.20 refused: a link-local address \
             (allow with --origin-allow 169.254.10.20/32)",
        ),
        (
            "direct",
            None,
            "origin 100.100.100.200 refused: a cloud metadata address",
        ),
    ];
    for (i, (how, location, needle)) in cases.into_iter().enumerate() {
        let name = format!("bounce{i}.bin");
        let url = match location {
            Some(location) => {
                s.origin
                    .server
                    .set_fault(&format!("/{name}"), Fault::Redirect(location.into()));
                s.origin.url(&name)
            }
            None => format!("http://100.100.100.200/latest/meta-data/{name}"),
        };
        let dir = s.env.dir(&format!("out{i}"));
        s.env
            .get(&url, &dir.join(&name))
            .via(&s.sn, &s.cluster.client_pki)
            .run()
            .await
            .fails(ORIGIN, needle);
        assert_only(&dir, &[]);
        if how == "redirect" {
            assert!(
                s.origin.gets(&name) >= 1,
                "{name}: the origin was not asked"
            );
        }
    }
    // The supernode stored nothing for any of them.
    let tasks = s.env.path().join("supernode-data-cluster-supernode/tasks");
    assert_only(&tasks, &[]);
}

/// 0.0.0.0 is refused by default (Linux connects it to the local host); with the operator's
/// `--origin-allow` the same redirect is followed and the content arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_allow_lets_the_same_fetch_through() {
    let s = setup().await;
    let plain_root = s.env.dir("plain");
    let sha = common::write_file(&plain_root.join("blob.bin"), 3 << 20, 7);
    let plain = plain_origin(&plain_root).await;
    let target = format!("http://0.0.0.0:{}/blob.bin", plain.addr().port());
    s.origin
        .server
        .set_fault("/via.bin", Fault::Redirect(target));

    let dir = s.env.dir("refused");
    s.env
        .get(&s.origin.url("via.bin"), &dir.join("via.bin"))
        .via(&s.sn, &s.cluster.client_pki)
        .run()
        .await
        .fails(
            ORIGIN,
            "origin 0.0.0.0 refused: an unspecified address (allow with --origin-allow 0.0.0.0/32)",
        );
    assert_only(&dir, &[]);
    assert_eq!(
        plain.get_count("/blob.bin"),
        0,
        "the refused origin was asked"
    );

    let (_, pkis) = s.env.ca("open", &["supernode", "client"]).await;
    let open = s
        .env
        .supernode_with(
            &pkis[0],
            Some(&s.origin.ca_file),
            &["--origin-allow", "0.0.0.0/32"],
        )
        .await;
    let dir = s.env.dir("allowed");
    s.env
        .get(&s.origin.url("via.bin"), &dir.join("via.bin"))
        .via(&open, &pkis[1])
        .run()
        .await
        .ok();
    assert_eq!(sha256_file(&dir.join("via.bin")), sha);
    assert_only(&dir, &["via.bin"]);
    assert_eq!(plain.get_count("/blob.bin"), 1);
    assert!(
        open.log().contains("origin policy") && open.log().contains("allow [0.0.0.0/32]"),
        "the supernode does not log its policy:\n{}",
        open.log()
    );
}

/// `origin_deny` in the config file refuses loopback, which the defaults allow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operators_deny_refuses_what_the_defaults_allow() {
    let env = Env::new();
    let origin = env.origin().await;
    origin.file("local.bin", 1 << 20);
    let (_, pkis) = env.ca("strict", &["supernode", "client"]).await;
    let config = env.path().join("d7q.toml");
    std::fs::write(
        &config,
        "[supernode]\norigin_deny = [\"127.0.0.0/8\", \"::1\"]\n",
    )
    .unwrap();
    let sn = env
        .supernode_with(
            &pkis[0],
            Some(&origin.ca_file),
            &["--config", config.to_str().unwrap()],
        )
        .await;
    let dir = env.dir("out");
    env.get(&origin.url("local.bin"), &dir.join("local.bin"))
        .via(&sn, &pkis[1])
        .run()
        .await
        .fails(ORIGIN, "origin localhost refused: ");
    let err = env
        .get(&origin.url("local.bin"), &dir.join("local.bin"))
        .via(&sn, &pkis[1])
        .run()
        .await;
    assert!(
        err.stderr
            .contains("is denied by --origin-deny 127.0.0.0/8")
            || err.stderr.contains("is denied by --origin-deny ::1/128"),
        "{err}"
    );
    assert_only(&dir, &[]);
    assert_eq!(origin.gets("local.bin"), 0, "a denied origin was asked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_do_not_follow_a_redirect_from_https_to_http() {
    let s = setup().await;
    let plain_root = s.env.dir("plain");
    let sha = common::write_file(&plain_root.join("layer.bin"), 2 << 20, 11);
    let plain = plain_origin(&plain_root).await;
    // Same host name, other scheme (and, as two servers must, another port).
    s.origin.server.set_fault(
        "/layer.bin",
        Fault::Redirect(format!(
            "http://localhost:{}/layer.bin",
            plain.addr().port()
        )),
    );
    // Within the first origin, a redirect keeps them.
    let kept_sha = s.origin.file("kept.bin", 1 << 20);
    s.origin
        .server
        .set_fault("/moved.bin", Fault::Redirect("/kept.bin".into()));

    for (name, sha) in [("layer.bin", &sha), ("moved.bin", &kept_sha)] {
        let dir = s.env.dir(&format!("out-{name}"));
        s.env
            .get(&s.origin.url(name), &dir.join(name))
            .via(&s.sn, &s.cluster.client_pki)
            .header("Authorization: Bearer s3cr3t-token")
            .header("Cookie: session=s3cr3t-cookie")
            .header("X-Trace: 42")
            .run()
            .await
            .ok();
        assert_eq!(&sha256_file(&dir.join(name)), sha, "{name}");
    }

    let first = s.origin.server.last_headers("/layer.bin").expect("asked");
    assert_eq!(first["authorization"], "Bearer s3cr3t-token");
    let http_side = plain.last_headers("/layer.bin").expect("redirect followed");
    for h in ["authorization", "cookie", "proxy-authorization"] {
        assert!(
            http_side.get(h).is_none(),
            "the http side received {h}: {http_side:?}"
        );
    }
    assert_eq!(http_side["x-trace"], "42", "other headers still go");
    let same_origin = s.origin.server.last_headers("/kept.bin").expect("asked");
    assert_eq!(same_origin["authorization"], "Bearer s3cr3t-token");
    assert_eq!(same_origin["cookie"], "session=s3cr3t-cookie");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_signatures_stay_out_of_errors_and_logs() {
    let env = Env::new();
    let origin = env.origin().await;
    let (_, pkis) = env.ca("cluster", &["supernode", "daemon", "client"]).await;
    let sn = env
        .supernode_with(
            &pkis[0],
            Some(&origin.ca_file),
            &["--log", "debug,h2=info,rustls=info"],
        )
        .await;
    let daemon = env
        .daemon(&pkis[1], &[&sn], &["--log", "debug,h2=info,rustls=info"])
        .await;
    const QUERY: &str = "?X-Amz-Signature=secret-signature&X-Amz-Credential=AKIASECRET";
    origin.file("signed.bin", 1 << 20);
    origin.server.set_fault(
        "/bounce.bin",
        Fault::Redirect(format!("/gone.bin{QUERY}&hop=2")),
    );

    let dir = env.dir("out");
    let mut outputs = Vec::new();
    for (url, needle) in [
        (
            format!("{}{QUERY}", origin.url("missing.bin")),
            format!("origin answered 404 for {}?…", origin.url("missing.bin")),
        ),
        (
            format!("{}{QUERY}", origin.url("bounce.bin")),
            format!("origin answered 404 for {}?…", origin.url("gone.bin")),
        ),
    ] {
        // Through the daemon and straight to the supernode: both clients' errors.
        let via_daemon = env
            .get(&url, &dir.join("x.bin"))
            .arg("--daemon")
            .arg(daemon.socket_arg())
            .run()
            .await;
        via_daemon.fails(ORIGIN, &needle);
        let direct = env
            .get(&url, &dir.join("x.bin"))
            .via(&sn, &pkis[2])
            .run()
            .await;
        direct.fails(ORIGIN, &needle);
        outputs.extend([via_daemon, direct]);
    }
    // A presigned download that works is listed without its query.
    let url = format!("{}{QUERY}", origin.url("signed.bin"));
    env.get(&url, &dir.join("signed.bin"))
        .arg("--daemon")
        .arg(daemon.socket_arg())
        .run()
        .await
        .ok();
    let status = env
        .run(&[
            "status",
            "--json",
            "--pki",
            pkis[2].to_str().unwrap(),
            &sn.addr(),
        ])
        .await;
    status.ok();
    assert!(
        status.stdout.contains(&origin.url("signed.bin")),
        "{status}"
    );
    // A client that is not a URL gets it back without the query too.
    let bad = env
        .run(&["get", &format!("ftp://x/{QUERY}"), "-o", "y"])
        .await;
    outputs.extend([status, bad]);

    for out in &outputs {
        for secret in ["secret", "AKIA"] {
            assert!(
                !out.stdout.contains(secret) && !out.stderr.contains(secret),
                "{secret} leaked to a client:\n{out}"
            );
        }
    }
    for (who, log, about) in [
        ("supernode", sn.log(), "missing.bin?…"),
        ("daemon", daemon.log(), "download complete"),
    ] {
        assert!(
            log.contains(about),
            "the {who} log is not about the downloads:\n{log}"
        );
        for secret in ["secret", "AKIA"] {
            assert!(
                !log.contains(secret),
                "{secret} leaked to the {who} log:\n{log}"
            );
        }
    }
}
