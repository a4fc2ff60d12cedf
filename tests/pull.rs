//! `d7q pull` end to end against a real Debian `docker-registry` over TLS under `registry.test`
//! (htpasswd and token auth), with images pushed by the real `skopeo`: the OCI image layout it
//! writes is read back by `skopeo inspect`, the docker-archive by `tar` and `skopeo`; wrong
//! credentials, unknown tags and missing platforms fail with one clear line and leave nothing
//! behind; through a daemon, a second pull takes every blob from the mesh, not the registry.

mod common;

use std::path::Path;
use std::process::Stdio;

use common::dockerd::{Dockerd, EngineOptions};
use common::registry::Registry;
use common::token::Grant;
use common::{Env, Output, TIMEOUT};
use d7q::exit;
use tokio::io::AsyncWriteExt;

const USER: &str = "alice";
const PASSWORD: &str = "wonderland";

/// `d7q pull ARGS…` with `stdin` fed in (for `--password-stdin`).
async fn pull(env: &Env, args: &[&str], stdin: Option<&str>) -> Output {
    let command = format!("d7q pull {}", args.join(" "));
    let mut cmd = env.command();
    cmd.arg("pull")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn d7q pull");
    if let Some(s) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(s.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    let out = tokio::time::timeout(TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{command} did not finish within {TIMEOUT:?}"))
        .expect("wait for d7q pull");
    Output {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        command,
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Writes `~/.docker/config.json` of the sandbox with `user:password` for `registry`.
fn docker_login(env: &Env, registry: &str, user: &str, password: &str) {
    use base64::Engine as _;
    let dir = env.path().join("home/.docker");
    std::fs::create_dir_all(&dir).expect("docker config dir");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        dir.join("config.json"),
        format!(r#"{{"auths":{{"{registry}":{{"auth":"{auth}"}}}}}}"#),
    )
    .expect("write config.json");
}

/// Every entry of the sandbox directory `dir` whose name starts with a dot (staging leftovers).
fn hidden_entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.'))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_writes_an_oci_layout_and_a_docker_archive() {
    let env = Env::new();
    let reg = Registry::start_htpasswd(&env, &[(USER, PASSWORD)]).await;
    let creds = (USER, PASSWORD);
    let img = reg
        .push_image(&env, "team/app", "v1", &[3 << 20, 200 << 10], 11, creds)
        .await;
    let out_dir = env.path().join("images");
    std::fs::create_dir_all(&out_dir).unwrap();

    // OCI layout, credentials on stdin, the registry's CA by --origin-ca, embedded mesh.
    let layout = out_dir.join("app-oci");
    let image = reg.reference("team/app", "v1");
    let args = [
        image.as_str(),
        "-o",
        s(&layout),
        "--origin-ca",
        s(&reg.ca_file),
        "--username",
        USER,
        "--password-stdin",
    ];
    let out = pull(&env, &args, Some(&format!("{PASSWORD}\n"))).await;
    out.ok();
    assert!(out.stdout.contains(&img.manifest), "{out}");
    img.assert_in_layout(&layout, "v1");
    let inspect = env
        .skopeo(&["inspect", &format!("oci:{}:v1", layout.display())])
        .run()
        .await;
    assert_eq!(inspect.code, 0, "{inspect}");
    let info: serde_json::Value = serde_json::from_str(&inspect.stdout).expect("inspect JSON");
    assert_eq!(info["Digest"], img.manifest.as_str());
    let layers: Vec<&str> = info["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    assert_eq!(layers, img.layers);
    // skopeo copies out of it, to a directory it verifies blob by blob.
    let copy = env
        .skopeo(&[
            "copy",
            &format!("oci:{}:v1", layout.display()),
            &format!("dir:{}", out_dir.join("copied").display()),
        ])
        .run()
        .await;
    assert_eq!(copy.code, 0, "{copy}");

    // docker-archive, credentials from ~/.docker/config.json, the CA by SSL_CERT_FILE.
    docker_login(&env, &reg.host(), USER, PASSWORD);
    let archive = out_dir.join("app.tar");
    let bundle = reg.bundle("pull-trust", &[]);
    let out = env
        .run_with(
            &[
                "pull".into(),
                image.clone(),
                "--docker-archive".into(),
                s(&archive).into(),
            ],
            &[("SSL_CERT_FILE".into(), s(&bundle).into())],
            TIMEOUT,
        )
        .await;
    out.ok();
    let listing = std::process::Command::new("tar")
        .arg("-tf")
        .arg(&archive)
        .output()
        .expect("run tar");
    assert!(listing.status.success());
    let mut names: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(|l| l.to_string())
        .collect();
    names.sort();
    let mut want = vec![
        "manifest.json".to_string(),
        format!("{}.json", &img.config[7..]),
    ];
    want.extend(img.layers.iter().map(|l| format!("{}.tar", &l[7..])));
    want.sort();
    assert_eq!(names, want);
    let manifest = std::process::Command::new("tar")
        .arg("-xOf")
        .arg(&archive)
        .arg("manifest.json")
        .output()
        .expect("run tar");
    let manifest: serde_json::Value = serde_json::from_slice(&manifest.stdout).unwrap();
    assert_eq!(manifest[0]["RepoTags"][0], image.as_str());
    assert_eq!(manifest[0]["Config"], format!("{}.json", &img.config[7..]));
    let inspect = env
        .skopeo(&[
            "inspect",
            "--config",
            &format!("docker-archive:{}", archive.display()),
        ])
        .run()
        .await;
    assert_eq!(inspect.code, 0, "{inspect}");
    // The real Docker engine loads it, under its tag, as the image whose id is the config.
    let engine = Dockerd::start(env.path(), "load", &EngineOptions::default()).await;
    let load = engine.docker(&["load", "-i", s(&archive)]).await;
    load.ok();
    assert!(load.stdout.contains(&image), "{load}");
    let id = engine
        .docker(&["image", "inspect", "--format", "{{.Id}}", &image])
        .await;
    id.ok();
    assert_eq!(id.stdout.trim(), img.config);
    assert!(
        hidden_entries(&out_dir).is_empty(),
        "{:?}",
        hidden_entries(&out_dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_failures_are_one_clear_line_and_leave_nothing() {
    let env = Env::new();
    let reg = Registry::start_htpasswd(&env, &[(USER, PASSWORD)]).await;
    let img = reg
        .push_image(&env, "app", "v1", &[100 << 10], 12, (USER, PASSWORD))
        .await;
    let out_dir = env.path().join("images");
    std::fs::create_dir_all(&out_dir).unwrap();
    let layout = out_dir.join("oci");
    let ca = s(&reg.ca_file).to_string();
    let run = |image: String, extra: Vec<String>, password: Option<&'static str>| {
        let env = &env;
        let (layout, ca) = (layout.clone(), ca.clone());
        async move {
            let mut args = vec![
                image,
                "-o".into(),
                s(&layout).into(),
                "--origin-ca".into(),
                ca,
            ];
            if password.is_some() {
                args.extend(["--username".into(), USER.into(), "--password-stdin".into()]);
            }
            args.extend(extra);
            let args: Vec<&str> = args.iter().map(|a| a.as_str()).collect();
            pull(env, &args, password).await
        }
    };

    run(reg.reference("app", "v1"), vec![], Some("wrong\n"))
        .await
        .fails(exit::ORIGIN, "refused the credentials of \"alice\"");
    run(reg.reference("app", "v1"), vec![], None)
        .await
        .fails(exit::ORIGIN, "refused anonymous access");
    run(reg.reference("app", "nope"), vec![], Some("wonderland\n"))
        .await
        .fails(exit::ORIGIN, "not found (MANIFEST_UNKNOWN");
    run(
        reg.reference("nothing/here", "v1"),
        vec![],
        Some("wonderland\n"),
    )
    .await
    .fails(exit::ORIGIN, "not found");
    pull(&env, &["Bad Name", "-o", s(&layout)], None)
        .await
        .fails(exit::USAGE, "invalid");

    // A multi-platform index with arm64 and s390x entries only.
    let manifest = std::fs::read(img.layout.join("blobs/sha256").join(&img.manifest[7..])).unwrap();
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": img.manifest,
             "size": manifest.len(), "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": img.manifest,
             "size": manifest.len(), "platform": {"os": "linux", "architecture": "s390x"}},
        ],
    });
    let put = std::process::Command::new("curl")
        .args(["-sf", "--noproxy", "*", "-X", "PUT", "--cacert", &ca, "-u"])
        .arg(format!("{USER}:{PASSWORD}"))
        .args([
            "-H",
            "Content-Type: application/vnd.oci.image.index.v1+json",
            "--data-binary",
        ])
        .arg(index.to_string())
        .arg(reg.url("/v2/app/manifests/multi"))
        .output()
        .expect("run curl");
    assert!(
        put.status.success(),
        "PUT index: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    run(
        reg.reference("app", "multi"),
        vec!["--platform".into(), "linux/amd64".into()],
        Some("wonderland\n"),
    )
    .await
    .fails(
        exit::ORIGIN,
        "no image for platform linux/amd64 (available: linux/arm64/v8, linux/s390x)",
    );
    assert!(!layout.exists());
    assert!(
        hidden_entries(&out_dir).is_empty(),
        "{:?}",
        hidden_entries(&out_dir)
    );
    // The platform that is there resolves to the pushed image.
    run(
        reg.reference("app", "multi"),
        vec!["--platform".into(), "linux/arm64".into()],
        Some("wonderland\n"),
    )
    .await
    .ok();
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    assert_eq!(index["manifests"][0]["digest"], img.manifest.as_str());
    // A single-platform image is checked against its config when a platform is asked for.
    let arm = out_dir.join("arm");
    let out = pull(
        &env,
        &[
            &reg.reference("app", "v1"),
            "-o",
            s(&arm),
            "--origin-ca",
            &ca,
            "--platform",
            "linux/arm64",
            "--username",
            USER,
            "--password-stdin",
        ],
        Some("wonderland\n"),
    )
    .await;
    out.fails(
        exit::ORIGIN,
        "no image for platform linux/arm64 (available: linux/amd64)",
    );
    assert!(!arm.exists());
    // By digest too, into a second directory.
    let by_digest = format!("{}/app@{}", reg.host(), img.manifest);
    let second = out_dir.join("second");
    let out = pull(
        &env,
        &[
            &by_digest,
            "-o",
            s(&second),
            "--origin-ca",
            &ca,
            "--username",
            USER,
            "--password-stdin",
        ],
        Some("wonderland\n"),
    )
    .await;
    out.ok();
    // A Docker v2 schema 2 manifest is written in its OCI form, which skopeo reads.
    let push = env
        .skopeo(&[
            "copy",
            "--format",
            "v2s2",
            "--dest-cert-dir",
            s(&reg.cert_dir),
            "--dest-creds",
            &format!("{USER}:{PASSWORD}"),
            &format!("oci:{}:v1", img.layout.display()),
            &format!("docker://{}", reg.reference("app", "v2s2")),
        ])
        .run()
        .await;
    assert_eq!(push.code, 0, "{push}");
    let docker_layout = out_dir.join("v2s2");
    std::fs::remove_dir_all(&layout).unwrap();
    run(reg.reference("app", "v2s2"), vec![], Some("wonderland\n"))
        .await
        .ok();
    std::fs::rename(&layout, &docker_layout).unwrap();
    let inspect = env
        .skopeo(&["inspect", &format!("oci:{}:v2s2", docker_layout.display())])
        .run()
        .await;
    assert_eq!(inspect.code, 0, "{inspect}");
    let info: serde_json::Value = serde_json::from_str(&inspect.stdout).expect("inspect JSON");
    assert_eq!(info["Layers"][0], img.layers[0].as_str());
    // An output that is not empty is refused before anything is fetched.
    pull(
        &env,
        &[&by_digest, "-o", s(&second), "--origin-ca", &ca],
        None,
    )
    .await
    .fails(exit::LOCAL, "not empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_through_a_daemon_with_token_auth_fetches_each_blob_once() {
    let env = Env::new();
    let reg = Registry::start_token(
        &env,
        &[(USER, PASSWORD)],
        &[Grant::user(USER, "", &["pull", "push"])],
    )
    .await;
    let img = reg
        .push_image(
            &env,
            "team/tok",
            "v1",
            &[2 << 20, 1 << 20, 50 << 10],
            13,
            (USER, PASSWORD),
        )
        .await;
    let cluster = env.cluster().await;
    let sn = env
        .supernode(&cluster.supernode_pki, Some(&reg.ca_file))
        .await;
    let daemon = env.daemon(&cluster.client_pki, &[&sn], &[]).await;
    let issuer = reg.issuer.as_ref().expect("token issuer");
    let before_tokens = issuer.requests();
    let before_blobs = reg.blob_gets().await;
    let out_dir = env.path().join("images");
    std::fs::create_dir_all(&out_dir).unwrap();
    let image = reg.reference("team/tok", "v1");
    let ca = s(&reg.ca_file).to_string();
    for name in ["first", "second"] {
        let layout = out_dir.join(name);
        pull(
            &env,
            &[
                &image,
                "-o",
                s(&layout),
                "--origin-ca",
                &ca,
                "--daemon",
                daemon.socket_arg(),
                "--username",
                USER,
                "--password-stdin",
            ],
            Some("wonderland\n"),
        )
        .await
        .ok();
        img.assert_in_layout(&layout, "v1");
    }
    // One token per pull serves the manifest and every blob the supernode fetched.
    assert_eq!(issuer.requests() - before_tokens, 2);
    // Each blob left the registry once: the second pull came from the mesh.
    assert_eq!(reg.blob_gets().await - before_blobs, img.blobs().len());
    // Straight to the supernode, without the daemon: its store serves every blob again.
    let direct = out_dir.join("direct");
    pull(
        &env,
        &[
            &image,
            "-o",
            s(&direct),
            "--origin-ca",
            &ca,
            "--supernode",
            &sn.addr(),
            "--pki",
            s(&cluster.client_pki),
            "--username",
            USER,
            "--password-stdin",
        ],
        Some("wonderland\n"),
    )
    .await
    .ok();
    img.assert_in_layout(&direct, "v1");
    assert_eq!(reg.blob_gets().await - before_blobs, img.blobs().len());
    // Wrong credentials at the token endpoint: exit 3, one line.
    pull(
        &env,
        &[
            &image,
            "-o",
            s(&out_dir.join("third")),
            "--origin-ca",
            &ca,
            "--daemon",
            daemon.socket_arg(),
            "--username",
            USER,
            "--password-stdin",
        ],
        Some("nope\n"),
    )
    .await
    .fails(exit::ORIGIN, "refused the credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_refuses_content_that_does_not_match_its_digest() {
    let env = Env::new();
    let reg = Registry::start_htpasswd(&env, &[(USER, PASSWORD)]).await;
    let img = reg
        .push_image(&env, "bad", "v1", &[300 << 10], 14, (USER, PASSWORD))
        .await;
    docker_login(&env, &reg.host(), USER, PASSWORD);
    let ca = s(&reg.ca_file).to_string();
    // The registry serves what is on its disk without checking: flip bytes of the layer there.
    let blob = |digest: &str| {
        let hex = &digest[7..];
        env.path()
            .join("registry/data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    };
    let layer = blob(&img.layers[0]);
    let mut bytes = std::fs::read(&layer).expect("the registry's copy of the layer");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xff;
    std::fs::write(&layer, &bytes).unwrap();
    let out_dir = env.path().join("images");
    std::fs::create_dir_all(&out_dir).unwrap();
    let layout = out_dir.join("oci");
    let image = reg.reference("bad", "v1");
    pull(&env, &[&image, "-o", s(&layout), "--origin-ca", &ca], None)
        .await
        .fails(exit::INTEGRITY, &img.layers[0]);
    // A manifest asked for by digest is checked too.
    let manifest = blob(&img.manifest);
    let mut bytes = std::fs::read(&manifest).expect("the registry's copy of the manifest");
    // Still valid JSON, so the registry serves it; different bytes, so a different digest.
    bytes.insert(1, b' ');
    std::fs::write(&manifest, &bytes).unwrap();
    let by_digest = format!("{}/bad@{}", reg.host(), img.manifest);
    pull(
        &env,
        &[&by_digest, "-o", s(&layout), "--origin-ca", &ca],
        None,
    )
    .await
    .fails(exit::INTEGRITY, "digest mismatch for the manifest");
    assert!(!layout.exists());
    assert!(
        hidden_entries(&out_dir).is_empty(),
        "{:?}",
        hidden_entries(&out_dir)
    );
}
