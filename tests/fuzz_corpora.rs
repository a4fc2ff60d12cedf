//! Replays every committed fuzz input — the corpora under `fuzz/corpus/<target>/` and the
//! inputs that once crashed, under `fuzz/regressions/<target>/` — through the same functions the
//! cargo-fuzz targets call (`d7q::fuzzing`), on stable Rust, in every test run. The fuzzers
//! themselves need nightly; this is the check CI always has.
//!
//! The seeds of the corpora come from the real encoders and the documents the other tests use
//! (checked by `the_seeds_from_the_real_encoders_pass_every_target`, written into the corpora
//! with `D7Q_WRITE_SEEDS=1`); the rest of each corpus is what libFuzzer found and `cargo fuzz
//! cmin` kept.

use std::fs;
use std::net::SocketAddr;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use d7q::fuzzing;
use d7q_wire::{
    frame::encode_frame, BadPeerReason, BadPeerReport, Bitmap, BitmapUpdate, ByteRange,
    Capabilities, Control, ErrorCode, ErrorMsg, Goodbye, Have, Hello, HelloAck, Labels, NodeId,
    Parents, PeerInfo, PieceDigests, PieceHeader, PieceRequest, PieceStatus, Register,
    TaskComplete, TaskId, TaskMeta,
};

/// The body of a fuzz target.
type Body = fn(&[u8]);

/// Every target with its body.
const TARGETS: &[(&str, Body)] = &[
    ("wire_frames", fuzzing::wire_frames),
    ("proxy_paths", fuzzing::proxy_paths),
    ("manifests", fuzzing::manifests),
    ("image_refs", fuzzing::image_refs),
    ("config", fuzzing::config),
];

#[test]
fn every_committed_fuzz_input_replays_without_a_panic() {
    let mut failed = Vec::new();
    for &(target, body) in TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(target));
        assert!(
            !corpus.is_empty(),
            "no corpus for {target}: run the seeds test with D7Q_WRITE_SEEDS=1"
        );
        let regressions = files(&fuzz_dir().join("regressions").join(target));
        for path in corpus.iter().chain(&regressions) {
            let bytes = fs::read(path).expect("read a fuzz input");
            if panic::catch_unwind(AssertUnwindSafe(|| body(&bytes))).is_err() {
                failed.push(path.display().to_string());
            }
        }
    }
    assert!(failed.is_empty(), "inputs that panic: {failed:?}");
}

/// The seed inputs, made from the real encoders and the documents the other tests use, pass
/// every target's checks (they are valid inputs: a target that rejects one is wrong). With
/// `D7Q_WRITE_SEEDS=1` they are also written into the corpora (`seed-*`), for a new target or
/// a changed format, before fuzzing.
#[test]
fn the_seeds_from_the_real_encoders_pass_every_target() {
    let write = std::env::var_os("D7Q_WRITE_SEEDS").is_some_and(|v| v == "1");
    let mut failed = Vec::new();
    for (target, seeds) in [
        ("wire_frames", wire_seeds()),
        ("proxy_paths", text_seeds(PROXY_SEEDS)),
        ("manifests", manifest_seeds()),
        ("image_refs", text_seeds(REFERENCE_SEEDS)),
        ("config", config_seeds()),
    ] {
        assert!(!seeds.is_empty(), "no seeds for {target}");
        let body = TARGETS
            .iter()
            .find(|(t, _)| *t == target)
            .map(|(_, b)| *b)
            .expect("a target for every seed set");
        let dir = fuzz_dir().join("corpus").join(target);
        for (name, bytes) in seeds {
            if panic::catch_unwind(AssertUnwindSafe(|| body(&bytes))).is_err() {
                failed.push(format!("{target}/seed-{name}"));
            }
            if write {
                fs::create_dir_all(&dir).expect("corpus dir");
                fs::write(dir.join(format!("seed-{name}")), &bytes).expect("write a seed");
            }
        }
    }
    assert!(failed.is_empty(), "seeds that panic: {failed:?}");
}

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

const DIGEST: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
const TASK: TaskId = TaskId([0x42; 16]);

fn labels(dc: &str, zone: &str, host: &str) -> Labels {
    Labels {
        dc: dc.into(),
        zone: zone.into(),
        host: host.into(),
    }
}

fn peer(n: u8) -> PeerInfo {
    PeerInfo {
        node_id: NodeId([n; 16]),
        addr: SocketAddr::from(([10, 0, 0, n], 65002)),
        labels: labels(
            "dc1",
            if n % 2 == 0 { "a" } else { "b" },
            &format!("host{n}"),
        ),
    }
}

/// A download's session from its seed, as the supernode sends it: 10 MiB in ten pieces, then
/// every other message type once.
fn session() -> Vec<Control> {
    let mut bitmap = Bitmap::new(10);
    [1, 3, 5].into_iter().for_each(|i| {
        bitmap.set(i);
    });
    vec![
        Control::Hello(Hello {
            major: 1,
            minor: 1,
            node_id: NodeId([7; 16]),
            labels: labels("dc1", "a", "host7"),
            upload_addr: Some(SocketAddr::from(([10, 0, 0, 7], 65002))),
            capabilities: Capabilities(Capabilities::UPLOAD),
        }),
        Control::HelloAck(HelloAck {
            major: 1,
            minor: 1,
            node_id: NodeId([1; 16]),
            labels: labels("dc1", "", "sn1"),
            capabilities: Capabilities(Capabilities::SEED | Capabilities::UPLOAD),
        }),
        Control::Register(Register {
            task: TASK,
            url: "https://registry.test:5000/v2/team/app/blobs/sha256:e3b0?X-Sig=abc".into(),
            headers: vec![("Authorization".into(), "Bearer abc".into())],
            digest: Some([0xe3; 32]),
            range: Some(ByteRange {
                start: 0,
                end: 10 << 20,
            }),
        }),
        Control::TaskMeta(TaskMeta {
            task: TASK,
            length: 10 << 20,
            piece_size: 1 << 20,
            piece_count: 10,
        }),
        Control::PieceDigests(PieceDigests {
            task: TASK,
            first: 0,
            digests: (0..10).map(|i| [i; 32]).collect(),
        }),
        Control::Parents(Parents {
            task: TASK,
            parents: vec![peer(2), peer(3), peer(4)],
        }),
        Control::Have(Have {
            task: TaskId([1; 16]),
            pieces: vec![0, 2, 4, 9],
        }),
        Control::Bitmap(BitmapUpdate {
            task: TaskId([2; 16]),
            bitmap: bitmap.clone(),
        }),
        Control::Announce(BitmapUpdate {
            task: TaskId([3; 16]),
            bitmap,
        }),
        Control::BadPeer(BadPeerReport {
            task: TASK,
            peer: NodeId([3; 16]),
            reason: BadPeerReason::Timeout,
        }),
        Control::TaskComplete(TaskComplete {
            task: TASK,
            length: 10 << 20,
            sha256: [0xe3; 32],
        }),
        Control::Error(ErrorMsg {
            task: Some(TASK),
            code: ErrorCode::OriginStatus,
            origin_status: Some(404),
            message: "origin answered 404 Not Found".into(),
        }),
        Control::Goodbye(Goodbye {
            reason: "shutting down".into(),
        }),
    ]
}

fn frames(msgs: &[Control], cut: u8) -> Vec<u8> {
    let mut out = vec![cut];
    for m in msgs {
        encode_frame(m, &mut out).expect("encode");
    }
    out
}

fn wire_seeds() -> Vec<(String, Vec<u8>)> {
    let all = session();
    let mut seeds = vec![
        ("session-whole-reads".to_string(), frames(&all, 63)),
        ("session-3-byte-reads".to_string(), frames(&all, 2)),
    ];
    // Each message alone, after the geometry where it acts on a download.
    for (i, m) in all.iter().enumerate() {
        let msgs = if i > 3 {
            vec![all[3].clone(), m.clone()]
        } else {
            vec![m.clone()]
        };
        seeds.push((format!("message-{i:02}"), frames(&msgs, 63)));
    }
    let mut request = vec![63];
    d7q_wire::encode(
        &PieceRequest {
            task: TASK,
            index: 3,
        },
        &mut request,
    )
    .expect("encode");
    seeds.push(("piece-request".into(), request));
    let mut header = vec![63];
    header.extend_from_slice(&PieceHeader::ok(1 << 20).encode());
    seeds.push(("piece-header-ok".into(), header));
    let mut refused = vec![63];
    refused.extend_from_slice(&PieceHeader::refuse(PieceStatus::Saturated).encode());
    seeds.push(("piece-header-saturated".into(), refused));
    seeds
}

fn text_seeds(seeds: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
    seeds
        .iter()
        .map(|(name, text)| (name.to_string(), text.as_bytes().to_vec()))
        .collect()
}

/// Lines as `fuzzing::proxy_paths` reads them: the first two are values (a URI and a
/// `Location`, an authority and a mirror, ...), the rest intercept and allow rules.
const PROXY_SEEDS: &[(&str, &str)] = &[
    ("range-closed", "bytes=0-99\nbytes=100-"),
    ("range-suffix", "bytes=-500\nbytes=0-0,5-9"),
    (
        "blob-path",
        "/v2/team/app/blobs/sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\n/v2/team/app/blobs/uploads/1",
    ),
    (
        "connect-rules",
        "registry.test:5000\nregistry-1.docker.io:443\nregistry.test\n*.corp.example:5000\nregistry.internal:5000\n10.20.0.0/16",
    ),
    ("connect-ipv6", "[::1]:5000\n127.0.0.1:443\n[::1]/128\n127.0.0.0/8:443"),
    ("mirror-ns", "registry.example%3A5000\nhttps://registry.example:5000/"),
    (
        "bearer",
        "Bearer realm=\"https://auth.test/token\",service=\"registry.test\",scope=\"repository:team/app:pull\"\nBasic realm=\"registry\"",
    ),
    (
        "redirect",
        "https://registry.test:5000/v2/team/app/blobs/sha256:e3b0?ns=registry.test&x=1\n//storage.test/blob?sig=abc",
    ),
    (
        "redirect-path",
        "https://registry.test/v2/team/app/blobs/sha256:e3b0\n/storage/e3b0?X-Amz-Signature=abc",
    ),
    ("token", "{\"token\":\"abc.def\",\"access_token\":\"abc.def\",\"expires_in\":300}"),
];

const REFERENCE_SEEDS: &[(&str, &str)] = &[
    ("short", "alpine"),
    ("tag", "alpine:3.19"),
    ("library", "library/alpine:latest"),
    ("hub", "docker.io/library/alpine"),
    ("hub-index", "index.docker.io/team/app:v1"),
    (
        "port-digest",
        "registry.test:5000/team/app@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    ),
    (
        "tag-digest",
        "ghcr.io/org/sub/repo:v1.2.3@sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
    ),
    ("localhost", "localhost/app_1-x.y:tag_2"),
    ("platform", "linux/arm64/v8"),
    ("digest", DIGEST),
];

const CONFIG_SEEDS: &[(&str, &str)] = &[
    ("empty", ""),
    (
        "daemon-minimal",
        "[daemon]\nsupernode = [\"10.0.0.5:8002\"]\nupload_rate = \"800Mbit\"\n",
    ),
    (
        "storage-bytes",
        "[daemon.storage]\nhigh_watermark = \"500GiB\"\nlow_watermark = \"1.5TB\"\nttl = \"1h30m\"\n",
    ),
    ("typo", "[daemon]\nuplod_rate = \"100MiB\"\n"),
    ("rate", "100MiB"),
];

/// The example of the README's Configuration section, and a few small files.
fn config_seeds() -> Vec<(String, Vec<u8>)> {
    let readme = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let section = &readme[readme
        .find("## Configuration")
        .expect("Configuration section")..];
    let start = section.find("```toml\n").expect("a TOML example") + "```toml\n".len();
    let example = &section[start..start + section[start..].find("```").expect("its end")];
    let mut seeds = text_seeds(CONFIG_SEEDS);
    seeds.push(("readme".into(), example.as_bytes().to_vec()));
    seeds
}

fn manifest_seeds() -> Vec<(String, Vec<u8>)> {
    let d = |n: u8| format!("sha256:{}", format!("{n:02x}").repeat(32));
    let layer = |media: &str, n: u8| {
        format!(
            r#"{{"mediaType":"{media}","digest":"{}","size":{}}}"#,
            d(n),
            1000 + n as u32
        )
    };
    let image = |media: &str, config: &str, layer_type: &str| {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media}","config":{},"layers":[{},{}]}}"#,
            layer(config, 1),
            layer(layer_type, 2),
            layer(layer_type, 3)
        )
    };
    let entry = |media: &str, platform: &str, n: u8| {
        let mut parts = platform.split('/');
        let (os, arch) = (parts.next().unwrap(), parts.next().unwrap());
        let variant = parts
            .next()
            .map(|v| format!(r#","variant":"{v}""#))
            .unwrap_or_default();
        format!(
            r#"{{"mediaType":"{media}","digest":"{}","size":500,"platform":{{"os":"{os}","architecture":"{arch}"{variant}}}}}"#,
            d(n)
        )
    };
    let index = |media: &str, entry_type: &str| {
        let entries = [
            entry(entry_type, "linux/amd64", 10),
            entry(entry_type, "linux/arm64/v8", 11),
            entry(entry_type, "linux/arm/v7", 12),
            entry(entry_type, "unknown/unknown", 13),
        ];
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{media}","manifests":[{}]}}"#,
            entries.join(",")
        )
    };
    let oci_manifest = "application/vnd.oci.image.manifest.v1+json";
    let docker_manifest = "application/vnd.docker.distribution.manifest.v2+json";
    vec![
        (
            "oci-image",
            image(
                oci_manifest,
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            ),
        ),
        (
            "docker-image",
            image(
                docker_manifest,
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            ),
        ),
        (
            "oci-index",
            index("application/vnd.oci.image.index.v1+json", oci_manifest),
        ),
        (
            "docker-list",
            index(
                "application/vnd.docker.distribution.manifest.list.v2+json",
                docker_manifest,
            ),
        ),
        (
            "config",
            r#"{"architecture":"arm64","variant":"v8","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
                .to_string(),
        ),
        (
            "schema1",
            r#"{"schemaVersion":1,"name":"team/app","tag":"v1","fsLayers":[]}"#.to_string(),
        ),
    ]
    .into_iter()
    .map(|(name, text)| (name.to_string(), text.into_bytes()))
    .collect()
}
