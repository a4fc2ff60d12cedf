//! Issue 4's registry acceptance tests: the real `docker-registry` (htpasswd and token auth) and
//! the real `skopeo`, straight and through a daemon's HTTPS proxy.
//!
//! Needs root (for `/etc/hosts`), `docker-registry`, `skopeo`, `htpasswd` and `curl`;
//! `scripts/test.sh` installs them.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;

use common::registry::{oci_layout, Registry};
use common::token::Grant;
use common::{Daemon, Env, Output, Supernode};

const ALICE: (&str, &str) = ("alice", "alice-secret");
const BOB: (&str, &str) = ("bob", "bob-secret");

/// The harness itself: a generated layout is a valid image to skopeo, and a push then a direct
/// pull (no proxy) give back the same manifest and blobs, under htpasswd auth.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_htpasswd_push_and_pull_direct() {
    let env = Env::new();
    let layout = env.dir("layout");
    let image = oci_layout(&layout, "1", &[1000, 300_000], 7);
    let out = env
        .skopeo(&["inspect", &format!("oci:{}:1", layout.display())])
        .run()
        .await;
    assert_eq!(out.code, 0, "{out}");
    assert!(out.stdout.contains(&image.layers[1]), "{out}");

    let registry = Registry::start_htpasswd(&env, &[ALICE, BOB]).await;
    let pushed = registry
        .push_image(&env, "app", "1", &[2 << 20, 100_000], 1, ALICE)
        .await;
    let before = registry.blob_gets().await;
    let dest = env.dir("pulled");
    let out = env
        .skopeo(&[
            "copy",
            "--src-cert-dir",
            registry.cert_dir.to_str().unwrap(),
            "--src-creds",
            &format!("{}:{}", BOB.0, BOB.1),
            &format!("docker://{}", registry.reference("app", "1")),
            &format!("oci:{}:1", dest.display()),
        ])
        .run()
        .await;
    assert_eq!(out.code, 0, "{out}");
    pushed.assert_in_layout(&dest, "1");
    // Config and two layers, each fetched once.
    assert_eq!(
        registry.blob_gets().await - before,
        3,
        "{}",
        registry.access_log()
    );

    let out = env
        .skopeo(&[
            "inspect",
            "--cert-dir",
            registry.cert_dir.to_str().unwrap(),
            "--creds",
            "alice:wrong",
            &format!("docker://{}", registry.reference("app", "1")),
        ])
        .run()
        .await;
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr.contains("unauthorized"), "{out}");
}

/// Token auth: alice pushes and pulls `private/app`; bob, allowed only `public/*`, is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_token_auth_direct() {
    let env = Env::new();
    let grants = [
        Grant::user("alice", "", &["pull", "push"]),
        Grant::user("bob", "public/", &["pull"]),
    ];
    let registry = Registry::start_token(&env, &[ALICE, BOB], &grants).await;
    let pushed = registry
        .push_image(&env, "private/app", "1", &[1 << 20], 2, ALICE)
        .await;
    let cert_dir = registry.cert_dir.to_str().unwrap().to_owned();
    let pull = |who: (&str, &str), dest: &std::path::Path| {
        env.skopeo(&[
            "copy",
            "--src-cert-dir",
            &cert_dir,
            "--src-creds",
            &format!("{}:{}", who.0, who.1),
            &format!("docker://{}", registry.reference("private/app", "1")),
            &format!("oci:{}:1", dest.display()),
        ])
        .run()
    };
    let dest = env.dir("alice");
    let out = pull(ALICE, &dest).await;
    assert_eq!(out.code, 0, "{out}");
    pushed.assert_in_layout(&dest, "1");

    let out = pull(BOB, &env.dir("bob")).await;
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr.contains("unauthorized") || out.stderr.contains("denied"),
        "{out}"
    );
    let issuer = registry.issuer.as_ref().unwrap();
    assert!(issuer.requests() >= 3, "{:?}", issuer.log());
}

/// A supernode and `n` daemons whose proxies intercept the registry (and its token issuer), each
/// with its proxy CA fetched from `GET /ca.crt`.
struct Mesh {
    _supernode: Supernode,
    daemons: Vec<Daemon>,
    /// The proxy CA of each daemon, PEM files.
    proxy_cas: Vec<PathBuf>,
}

async fn mesh(env: &Env, registry: &Registry, n: usize) -> Mesh {
    let names: Vec<String> = (0..n).map(|i| format!("host{i}")).collect();
    let mut nodes = vec!["supernode"];
    nodes.extend(names.iter().map(String::as_str));
    let (_, pki) = env.ca("cluster", &nodes).await;
    let supernode = env.supernode(&pki[0], Some(&registry.ca_file)).await;
    let mut intercept = vec![registry.host()];
    intercept.extend(registry.auth_host());
    let mut extra: Vec<String> = Vec::new();
    for host in &intercept {
        extra.extend(["--registry".to_owned(), host.clone()]);
    }
    extra.extend([
        "--origin-ca".to_owned(),
        registry.ca_file.to_str().unwrap().to_owned(),
    ]);
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let mut daemons = Vec::new();
    let mut proxy_cas = Vec::new();
    for pki in &pki[1..] {
        let daemon = env.daemon(pki, &[&supernode], &extra).await;
        let name = pki.file_name().unwrap().to_str().unwrap();
        let ca = env.path().join(format!("proxy-ca-{name}.pem"));
        let out = curl(&[
            "-sSf",
            "--noproxy",
            "*",
            "-o",
            ca.to_str().unwrap(),
            &format!("http://{}/ca.crt", daemon.proxy),
        ])
        .await;
        assert_eq!(out.code, 0, "GET /ca.crt: {out}");
        assert!(
            std::fs::read_to_string(&ca)
                .unwrap()
                .contains("BEGIN CERTIFICATE"),
            "/ca.crt is no PEM certificate"
        );
        daemons.push(daemon);
        proxy_cas.push(ca);
    }
    Mesh {
        _supernode: supernode,
        daemons,
        proxy_cas,
    }
}

/// `skopeo copy docker://REF oci:DEST:TAG` through daemon `i`'s proxy, trusting its CA only.
async fn pull_via(
    env: &Env,
    registry: &Registry,
    mesh: &Mesh,
    i: usize,
    creds: (&str, &str),
    (name, tag): (&str, &str),
    dest: &Path,
) -> Output {
    let bundle = registry.proxy_bundle(&format!("proxy-bundle-{i}"), &mesh.proxy_cas[i]);
    env.skopeo(&[
        "copy",
        "--src-creds",
        &format!("{}:{}", creds.0, creds.1),
        &format!("docker://{}", registry.reference(name, tag)),
        &format!("oci:{}:{tag}", dest.display()),
    ])
    .proxy(mesh.daemons[i].proxy)
    .trust(&bundle)
    .run()
    .await
}

/// Pulls `app:1` through host0 then host1: both get the pushed bytes; the second pull's blobs
/// come from the mesh (the registry's blob GET count does not grow) while its manifest requests
/// still reach the registry.
async fn second_host_pulls_from_the_mesh(env: &Env, registry: &Registry, creds: (&str, &str)) {
    let image = registry
        .push_image(env, "app", "1", &[3 << 20, 1 << 20], 11, creds)
        .await;
    let mesh = mesh(env, registry, 2).await;
    let pushed_gets = registry.blob_gets().await;
    let manifests_before = registry.manifest_requests().await;

    let dest = env.dir("pull-host0");
    let out = pull_via(env, registry, &mesh, 0, creds, ("app", "1"), &dest).await;
    assert_eq!(out.code, 0, "{out}\n{}", mesh.daemons[0].log());
    image.assert_in_layout(&dest, "1");
    let layer_bytes: u64 = image.layer_sizes.iter().sum();
    assert!(mesh.daemons[0].downloaded().await >= layer_bytes as f64);
    let after_first = registry.blob_gets().await;
    // The supernode went to the registry, at most once per blob (config and two layers).
    assert!(
        after_first > pushed_gets && after_first - pushed_gets <= image.blobs().len(),
        "{}",
        registry.access_log()
    );
    let manifests_first = registry.manifest_requests().await;
    assert!(
        manifests_first > manifests_before,
        "manifests must pass through"
    );

    let dest = env.dir("pull-host1");
    let out = pull_via(env, registry, &mesh, 1, creds, ("app", "1"), &dest).await;
    assert_eq!(out.code, 0, "{out}\n{}", mesh.daemons[1].log());
    image.assert_in_layout(&dest, "1");
    assert!(mesh.daemons[1].downloaded().await >= layer_bytes as f64);
    assert_eq!(
        registry.blob_gets().await,
        after_first,
        "the second host's blobs must come from the mesh:\n{}",
        registry.access_log()
    );
    assert!(
        registry.manifest_requests().await > manifests_first,
        "the second host's manifest requests must reach the registry"
    );

    // A wrong password through the proxy: skopeo's normal authentication failure.
    let dest = env.dir("pull-wrong-password");
    let out = pull_via(
        env,
        registry,
        &mesh,
        1,
        (creds.0, "wrong"),
        ("app", "1"),
        &dest,
    )
    .await;
    assert_ne!(out.code, 0, "{out}");
    assert!(out.stderr.contains("unauthorized"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pull_htpasswd_second_host_from_mesh() {
    let env = Env::new();
    let registry = Registry::start_htpasswd(&env, &[ALICE]).await;
    second_host_pulls_from_the_mesh(&env, &registry, ALICE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_pull_token_second_host_from_mesh() {
    let env = Env::new();
    let grants = [Grant::user("alice", "", &["pull", "push"])];
    let registry = Registry::start_token(&env, &[ALICE], &grants).await;
    second_host_pulls_from_the_mesh(&env, &registry, ALICE).await;
}

/// A push through the proxy reaches the registry unchanged (uploads pass through); a wrong
/// password and an untrusted proxy CA give skopeo its normal errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_push_passes_through_and_failures_are_normal() {
    let env = Env::new();
    let registry = Registry::start_htpasswd(&env, &[ALICE]).await;
    let mesh = mesh(&env, &registry, 1).await;
    let layout = env.dir("layout");
    let image = oci_layout(&layout, "1", &[2 << 20, 70_000], 21);
    let bundle = registry.proxy_bundle("proxy-bundle", &mesh.proxy_cas[0]);
    let reference = format!("docker://{}", registry.reference("pushed", "1"));
    let source = format!("oci:{}:1", layout.display());
    let out = env
        .skopeo(&[
            "copy",
            "--dest-creds",
            "alice:alice-secret",
            &source,
            &reference,
        ])
        .proxy(mesh.daemons[0].proxy)
        .trust(&bundle)
        .run()
        .await;
    assert_eq!(out.code, 0, "{out}\n{}", mesh.daemons[0].log());
    let accesses = registry.settled_accesses().await;
    assert!(
        accesses
            .iter()
            .any(|a| a.method == "PUT" && a.path == "/v2/pushed/manifests/1" && a.status == 201),
        "{}",
        registry.access_log()
    );
    // What arrived is what was pushed: a direct pull gives the same manifest and bytes.
    let dest = env.dir("direct");
    let out = env
        .skopeo(&[
            "copy",
            "--src-cert-dir",
            registry.cert_dir.to_str().unwrap(),
            "--src-creds",
            "alice:alice-secret",
            &reference,
            &format!("oci:{}:1", dest.display()),
        ])
        .run()
        .await;
    assert_eq!(out.code, 0, "{out}");
    image.assert_in_layout(&dest, "1");

    // A wrong password: the registry's 401 reaches skopeo, as it does without the proxy.
    let inspect = |creds: &'static str| env.skopeo(&["inspect", "--creds", creds, &reference]);
    let direct = inspect("alice:wrong")
        .env(
            "SSL_CERT_FILE",
            registry.bundle("direct", &[]).to_str().unwrap(),
        )
        .run()
        .await;
    let proxied = inspect("alice:wrong")
        .proxy(mesh.daemons[0].proxy)
        .trust(&bundle)
        .run()
        .await;
    for out in [&direct, &proxied] {
        assert_ne!(out.code, 0, "{out}");
        assert!(
            out.stderr.contains("unauthorized: authentication required"),
            "{out}"
        );
    }

    // A proxy CA the client does not trust: Go's x509 error, nothing served.
    let untrusted = registry.bundle("without-proxy-ca", &[]);
    let out = inspect("alice:alice-secret")
        .proxy(mesh.daemons[0].proxy)
        .trust(&untrusted)
        .run()
        .await;
    assert_ne!(out.code, 0, "{out}");
    assert!(
        out.stderr
            .contains("x509: certificate signed by unknown authority"),
        "{out}"
    );
}

/// Private content stays private: alice's pull through host0 puts `private/app` in the mesh;
/// bob (whose tokens grant nothing under `private/`) and an anonymous client asking host1 for the
/// same blob get exactly the registry's own answer, never the bytes; alice through host1 does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_blobs_stay_private() {
    let env = Env::new();
    let grants = [
        Grant::user("alice", "", &["pull", "push"]),
        Grant::user("bob", "public/", &["pull"]),
    ];
    let registry = Registry::start_token(&env, &[ALICE, BOB], &grants).await;
    let image = registry
        .push_image(&env, "private/app", "1", &[2 << 20], 31, ALICE)
        .await;
    let mesh = mesh(&env, &registry, 2).await;
    let dest = env.dir("alice-host0");
    let out = pull_via(
        &env,
        &registry,
        &mesh,
        0,
        ALICE,
        ("private/app", "1"),
        &dest,
    )
    .await;
    assert_eq!(out.code, 0, "{out}\n{}", mesh.daemons[0].log());
    image.assert_in_layout(&dest, "1");

    // Bob's own pull through host1 fails as it would without the proxy.
    let out = pull_via(
        &env,
        &registry,
        &mesh,
        1,
        BOB,
        ("private/app", "1"),
        &env.dir("bob"),
    )
    .await;
    assert_ne!(out.code, 0, "{out}");

    let layer = &image.layers[0];
    let layer_hex = layer.trim_start_matches("sha256:");
    let url = registry.url(&format!("/v2/private/app/blobs/{layer}"));
    let issuer = registry.issuer.as_ref().unwrap();
    let scope = ["repository:private/app:pull"];
    let bob = format!("Authorization: Bearer {}", issuer.mint(Some("bob"), &scope));
    let anonymous = format!("Authorization: Bearer {}", issuer.mint(None, &scope));
    let proxy = format!("http://{}", mesh.daemons[1].proxy);
    let proxy_ca = mesh.proxy_cas[1].to_str().unwrap();
    let registry_ca = registry.ca_file.to_str().unwrap();
    for (who, header) in [
        ("bob", Some(&bob)),
        ("anonymous token", Some(&anonymous)),
        ("no credentials", None),
    ] {
        let fetch = |via_proxy: bool| {
            let body = env.path().join(format!("{who}-{via_proxy}.body"));
            let mut args: Vec<String> = ["-s", "-o", body.to_str().unwrap(), "-w", "%{http_code}"]
                .map(str::to_owned)
                .to_vec();
            if via_proxy {
                args.extend([
                    "--proxy".into(),
                    proxy.clone(),
                    "--cacert".into(),
                    proxy_ca.into(),
                ]);
            } else {
                args.extend([
                    "--noproxy".into(),
                    "*".into(),
                    "--cacert".into(),
                    registry_ca.into(),
                ]);
            }
            if let Some(header) = header {
                args.extend(["-H".into(), header.clone()]);
            }
            args.push(url.clone());
            async move {
                let args: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = curl(&args).await;
                let bytes = std::fs::read(&body).unwrap_or_default();
                (out.stdout, bytes)
            }
        };
        let (direct_status, direct_body) = fetch(false).await;
        let (proxied_status, proxied_body) = fetch(true).await;
        eprintln!("{who}: registry {direct_status}, through host1 {proxied_status}");
        assert!(
            ["401", "403", "404"].contains(&direct_status.as_str()),
            "{who}: the registry itself answered {direct_status}"
        );
        assert_eq!(
            proxied_status, direct_status,
            "{who}: not the registry's answer"
        );
        assert!(
            proxied_body.len() < 4096,
            "{who}: got {} bytes",
            proxied_body.len()
        );
        assert_ne!(
            common::sha256(&proxied_body),
            layer_hex,
            "{who} got the blob"
        );
        assert_eq!(
            String::from_utf8_lossy(&proxied_body),
            String::from_utf8_lossy(&direct_body),
            "{who}: not the registry's body"
        );
    }

    // Alice, with a token of her own, gets the blob from host1 (from the mesh).
    let gets = registry.blob_gets().await;
    let alice = format!(
        "Authorization: Bearer {}",
        issuer.mint(Some("alice"), &scope)
    );
    let body = env.path().join("alice.body");
    let out = curl(&[
        "-s",
        "-o",
        body.to_str().unwrap(),
        "-w",
        "%{http_code}",
        "--proxy",
        &proxy,
        "--cacert",
        proxy_ca,
        "-H",
        &alice,
        &url,
    ])
    .await;
    assert_eq!(out.stdout, "200", "{out}\n{}", mesh.daemons[1].log());
    assert_eq!(common::sha256_file(&body), layer_hex);
    assert_eq!(
        registry.blob_gets().await,
        gets,
        "{}",
        registry.access_log()
    );
}

/// A burst of pulls through one daemon costs one token request per distinct scope and
/// credentials, fewer than the same pulls cost without the proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_requests_are_coalesced() {
    const PULLS: usize = 4;
    let env = Env::new();
    let grants = [Grant::user("alice", "", &["pull", "push"])];
    let registry = Registry::start_token(&env, &[ALICE], &grants).await;
    let image = registry
        .push_image(&env, "app", "1", &[1 << 20, 200_000], 41, ALICE)
        .await;
    let issuer = registry.issuer.as_ref().unwrap();

    // One direct pull: what a pull costs the issuer without the proxy.
    let before = issuer.requests();
    let dest = env.dir("direct");
    let out = env
        .skopeo(&[
            "copy",
            "--src-cert-dir",
            registry.cert_dir.to_str().unwrap(),
            "--src-creds",
            "alice:alice-secret",
            &format!("docker://{}", registry.reference("app", "1")),
            &format!("oci:{}:1", dest.display()),
        ])
        .run()
        .await;
    assert_eq!(out.code, 0, "{out}");
    let per_pull = issuer.requests() - before;
    assert!(per_pull >= 1, "{:?}", issuer.log());

    let mesh = mesh(&env, &registry, 1).await;
    let seen = issuer.log().len();
    let dests: Vec<PathBuf> = (0..PULLS).map(|i| env.dir(&format!("burst-{i}"))).collect();
    let outs = futures_util::future::join_all(
        dests
            .iter()
            .map(|dest| pull_via(&env, &registry, &mesh, 0, ALICE, ("app", "1"), dest)),
    )
    .await;
    for (out, dest) in outs.iter().zip(&dests) {
        assert_eq!(out.code, 0, "{out}\n{}", mesh.daemons[0].log());
        image.assert_in_layout(dest, "1");
    }
    let proxied = &issuer.log()[seen..];
    eprintln!(
        "token requests: one direct pull {per_pull}, {PULLS} proxied pulls {}",
        proxied.len()
    );
    let distinct: std::collections::BTreeSet<_> = proxied
        .iter()
        .map(|r| (r.user.clone(), r.scopes.clone()))
        .collect();
    assert_eq!(
        proxied.len(),
        distinct.len(),
        "one token request per scope and credentials: {proxied:?}"
    );
    assert!(
        (proxied.len() as u64) < PULLS as u64 * per_pull,
        "{} token requests for {PULLS} pulls (one pull costs {per_pull})",
        proxied.len()
    );
}

/// `curl ARGS…` (no proxy variables from the environment), to completion.
async fn curl(args: &[&str]) -> Output {
    let out = tokio::process::Command::new("curl")
        .args(args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(common::TIMEOUT, out)
        .await
        .expect("curl timed out")
        .expect("run curl");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        command: format!("curl {}", args.join(" ")),
    }
}
