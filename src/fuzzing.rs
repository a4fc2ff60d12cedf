//! The bodies of the fuzz targets in `fuzz/`, as plain functions of `&[u8]`, so that the
//! cargo-fuzz crate (nightly) and the corpus replay in `tests/fuzz_corpora.rs` (stable, every
//! CI run) call the very same code.
//!
//! Each function feeds untrusted bytes to the real parsing entry points and then to the code
//! that acts on what parsed, where that needs no IO. Bad input must come back as an error, never
//! as a panic; the `assert!`s here state properties the parsers promise (a range inside the
//! content, a parsed reference that prints back to itself, ...), so a fuzzer finds broken
//! promises too.
//!
//! Not for: anything a product path calls. It is `#[doc(hidden)]` and exists for the fuzzers.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::{Duration, Instant};

use d7q_wire::{
    decode_checked, frame, Control, FrameDecoder, NodeId, PieceHeader, PieceRequest, TaskId,
};
use http::StatusCode;

use crate::config::{self, ConfigFile};
use crate::proxy::policy::{Allow, ConnectPolicy, Purpose};
use crate::proxy::rules::{self, RangeAnswer, Rules};
use crate::proxy::tokens::{self, Tokens};
use crate::registry::manifest::{self, Manifest, Platform};
use crate::registry::{auth, Reference};
use crate::sched::download::{Action, Download, DownloadConfig, PieceFailure};
use crate::sched::parents::{Swarm, SwarmConfig};
use crate::sched::picker::SourceId;
use crate::task::{self, Geometry};

/// Mesh bytes as a peer sends them: cut into reads (the first byte says how), framed, decoded
/// and limit-checked by [`FrameDecoder::next_checked`], then handed to the machines that act on
/// them — a [`Download`] as the engine drives it from its seed and parents, a [`Swarm`] as the
/// supernode drives it from its members. The same bytes are also read as the other side of a
/// piece stream: a [`PieceRequest`] and a [`PieceHeader`].
pub fn wire_frames(data: &[u8]) {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let _ = decode_checked::<PieceRequest>(rest);
    if let Some(h) = rest.first_chunk::<{ d7q_wire::piece::PIECE_HEADER_LEN }>() {
        if let Ok(header) = PieceHeader::decode(*h) {
            assert_eq!(PieceHeader::decode(header.encode()), Ok(header));
        }
    }
    let mut decoder = FrameDecoder::new();
    let mut machines = Machines::new();
    for chunk in rest.chunks(usize::from(cut % 64) + 1) {
        decoder.extend(chunk);
        loop {
            match decoder.next_checked::<Control>() {
                Ok(Some(msg)) => {
                    round_trip(&msg);
                    machines.handle(msg);
                }
                Ok(None) => break,
                // The stream is closed after an error: nothing more is read from it.
                Err(_) => return,
            }
        }
    }
}

/// The proxy's parsing of what a client or a registry sends: `Range` values, blob paths, CONNECT
/// authorities, containerd's percent-escaped `ns` upstream, `Location` redirects, bearer
/// challenges and token answers, intercept rules and `--proxy-allow` rules with the connection
/// policy built from them. The input is read as lines; each parser gets the whole input and the
/// lines where it takes two values.
pub fn proxy_paths(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<&str> = text.split('\n').collect();
    let first = lines[0];
    let second = lines.get(1).copied().unwrap_or("");
    let length = match data.first().map(|b| b % 5) {
        Some(0) => 0,
        Some(1) => 1,
        Some(2) => 1000,
        Some(3) => 1 << 40,
        _ => u64::MAX,
    };
    for value in [&*text, first, second] {
        match rules::range(Some(value), length) {
            RangeAnswer::Partial(start, end) => {
                assert!(
                    start < end && end <= length,
                    "{value:?}: {start}..{end} of {length}"
                )
            }
            RangeAnswer::Full | RangeAnswer::Unsatisfiable => {}
        }
        if let Some(b) = rules::blob_path(value) {
            let again = format!("/v2/{}/blobs/{}", b.name, task::format_digest(&b.digest));
            assert_eq!(rules::blob_path(&again), Some(b));
        }
        if let Some((host, port)) = rules::split_authority(value) {
            assert!(!host.is_empty() && port != 0);
        }
        if let Some(decoded) = crate::proxy::percent_decode(value) {
            // Only `%` and two hex digits is an escape.
            assert!(
                value
                    .split('%')
                    .skip(1)
                    .all(|e| e.len() >= 2 && e.as_bytes()[..2].iter().all(u8::is_ascii_hexdigit)),
                "{value:?} decoded to {decoded:?}"
            );
            let _ = crate::proxy::parse_upstream(&decoded);
        }
        let _ = crate::proxy::parse_upstream(value);
        let _ = auth::parse_challenge(value);
        let _ = config::parse_registry(value);
        if let Some(realm) = tokens::bearer_realm(value) {
            let learned = Tokens::default();
            learned.learn(value);
            if let Ok(uri) = realm.parse::<http::Uri>() {
                let _ = learned.is_realm(&uri);
            }
        }
    }
    let _ = auth::parse_token_response(data);
    let _ = tokens::reuse_for(StatusCode::OK, data);
    if let Ok(base) = first.parse::<http::Uri>() {
        let _ = crate::proxy::registry::redirect_target(&base, second);
        let _ = crate::proxy::registry::path_and_query(&base, true);
        let _ = crate::proxy::registry::path_and_query(&base, false);
    }
    // Intercept and allow rules from the lines after the first two, asked about the first.
    let patterns: Vec<String> = lines
        .iter()
        .skip(2)
        .filter_map(|l| config::parse_registry(l).ok())
        .collect();
    let allow: Vec<Allow> = lines
        .iter()
        .skip(2)
        .filter_map(|l| Allow::from_str(l).ok())
        .collect();
    for a in &allow {
        assert_eq!(Allow::from_str(&a.to_string()).as_ref(), Ok(a));
    }
    let Some((host, port)) = rules::split_authority(first) else {
        return;
    };
    let mirror = rules::split_authority(second);
    let _ = Rules::new(&patterns).intercepts(&host, port);
    let policy = ConnectPolicy::new(&patterns, mirror, allow, Vec::new());
    for purpose in [Purpose::Tunnel, Purpose::Forward, Purpose::Registry] {
        let _ = policy.check_name(&host, port, purpose);
        if let Ok(ip) = host.trim_matches(['[', ']']).parse::<IpAddr>() {
            let _ = policy.check(&host, ip, port, purpose);
        }
    }
    let _ = policy.purpose_of(&host, port, data.len() % 2 == 0);
}

/// A manifest or index as a registry returns it, parsed with and without a `Content-Type`,
/// then what a pull does with it: the OCI form of an image manifest (which must parse back to
/// the same blobs) and the choice of a platform from an index.
pub fn manifests(data: &[u8]) {
    let content_types = [
        manifest::OCI_MANIFEST,
        manifest::DOCKER_MANIFEST,
        manifest::OCI_INDEX,
        manifest::DOCKER_LIST,
        "application/vnd.docker.distribution.manifest.v2+json; charset=utf-8",
        "text/plain",
    ];
    let typed = content_types[data.len() % content_types.len()];
    for content_type in [None, Some(typed)] {
        match manifest::parse(data, content_type) {
            Ok(Manifest::Image(m)) => {
                let oci = manifest::to_oci(&m);
                if oci.len() <= manifest::MAX_MANIFEST_SIZE {
                    match manifest::parse(&oci, None) {
                        Ok(Manifest::Image(back)) => {
                            assert_eq!(back.config.digest, m.config.digest);
                            assert_eq!(back.layers.len(), m.layers.len());
                        }
                        other => panic!("the OCI form did not parse back: {other:?}"),
                    }
                }
            }
            Ok(Manifest::Index { manifests, .. }) => {
                for wanted in [
                    Platform::host(),
                    Platform::parse("linux/arm64").expect("valid"),
                    Platform::parse("linux/arm/v7").expect("valid"),
                ] {
                    if let Ok(d) = manifest::select_platform(&manifests, &wanted) {
                        let have = d.platform.as_ref().expect("chosen entries have one");
                        assert!(manifest::platform_matches(have, &wanted));
                    }
                }
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    if let Some(p) = manifest::config_platform(data) {
        let _ = p.to_string();
    }
}

/// Image references as a user or a config writes them, and the URLs a pull builds from them. A
/// parsed reference prints as one that parses back to itself.
pub fn image_refs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = Platform::parse(&text);
    let _ = task::parse_digest(&text);
    let Ok(r) = Reference::parse(&text) else {
        return;
    };
    assert_eq!(
        Reference::parse(&r.to_string()).as_ref(),
        Ok(&r),
        "{text:?}"
    );
    let _ = r.api_host();
    let _ = r.base_url();
    let _ = r.manifest_url(r.manifest_reference());
    let _ = r.blob_url(manifest::sha256_digest(data).as_str());
    let _ = r.pull_scope();
    let _ = r.familiar_name();
}

/// The configuration file: parsed and checked as `d7q daemon` and `d7q supernode` load it,
/// relative paths resolved, each section taken out; a refusal is printed as the CLI prints it.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match ConfigFile::parse(text) {
        Ok(mut cfg) => {
            cfg.resolve_paths(std::path::Path::new("/etc/d7q"));
            let _ = format!("{:?} {:?}", cfg.supernode(), cfg.daemon());
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    for value in [text, text.trim()] {
        let _ = config::parse_rate(value);
        let _ = config::parse_size(value);
        let _ = config::parse_duration(value);
        let _ = config::parse_watermark(value);
    }
}

/// What the wire's own encoder makes of a decoded message must decode to the same message.
fn round_trip(msg: &Control) {
    let mut bytes = Vec::new();
    frame::encode_frame(msg, &mut bytes).expect("a decoded message encodes");
    let mut decoder = FrameDecoder::new();
    decoder.extend(&bytes);
    let back = decoder
        .next_checked::<Control>()
        .expect("re-encoded message decodes");
    assert_eq!(back.as_ref(), Some(msg));
}

/// Steps of [`Machines::handle`] after which the clock jumps past every piece deadline.
const TIMEOUT_EVERY: u32 = 8;
/// Actions taken from the download per message, at most (it yields a bounded number anyway).
const ACTIONS_PER_STEP: usize = 4096;

/// The sans-IO machines a node runs on decoded messages, driven as the engine and the
/// supernode drive them. The task id of a message is not compared with a registered one here,
/// so that every message reaches a machine.
struct Machines {
    download: Option<Download>,
    swarm: Option<Swarm>,
    geometry: Option<Geometry>,
    /// The member a `Hello` introduced last: the sender of what follows, for the swarm.
    member: NodeId,
    now: Instant,
    steps: u32,
}

impl Machines {
    fn new() -> Self {
        Self {
            download: None,
            swarm: None,
            geometry: None,
            member: NodeId([0xee; 16]),
            now: Instant::now(),
            steps: 0,
        }
    }

    fn handle(&mut self, msg: Control) {
        let now = self.now;
        match msg {
            Control::Hello(h) => {
                self.member = h.node_id;
                if let Some(s) = &mut self.swarm {
                    s.handle_join(h.node_id, h.upload_addr, h.labels, now);
                }
            }
            Control::HelloAck(_) => {}
            Control::Register(r) => {
                // The supernode's checks before it accepts a registration.
                let _ = task::normalize_url(&r.url);
                let id = task::task_id(&r.url, r.digest.as_ref(), r.range);
                let _ = id == r.task;
            }
            Control::TaskMeta(m) => {
                // As the engine: the geometry is checked, then fixed for the download.
                let Ok(g) = Geometry::checked(m.length, m.piece_size, m.piece_count) else {
                    return;
                };
                if self.geometry.is_none() {
                    let resumed = resumed(&g, m.task);
                    self.geometry = Some(g);
                    self.download = Some(Download::new(
                        g.length,
                        g.piece_size,
                        g.piece_count,
                        resumed,
                        DownloadConfig::uploader(NodeId([0; 16]), 7),
                    ));
                    let mut swarm = Swarm::new(g.piece_count, SwarmConfig::default());
                    swarm.handle_seed_have(&[0, g.piece_count / 2]);
                    self.swarm = Some(swarm);
                }
            }
            Control::PieceDigests(d) => {
                if let Some(dl) = &mut self.download {
                    if dl.handle_digests(d.first, &d.digests).is_err() {
                        self.download = None; // the engine stops the download
                    }
                }
            }
            Control::Parents(p) => {
                if let Some(dl) = &mut self.download {
                    dl.handle_parents(&p.parents);
                }
                if let Some(s) = &mut self.swarm {
                    for peer in &p.parents {
                        s.handle_join(peer.node_id, Some(peer.addr), peer.labels.clone(), now);
                    }
                }
            }
            Control::Have(h) => {
                if let Some(dl) = &mut self.download {
                    dl.handle_have(source_of(h.task), &h.pieces);
                }
                if let Some(s) = &mut self.swarm {
                    s.handle_have(member_of(h.task), &h.pieces);
                    s.handle_seed_have(&h.pieces);
                }
            }
            Control::Bitmap(b) => {
                if let Some(dl) = &mut self.download {
                    dl.handle_bitmap(source_of(b.task), &b.bitmap);
                }
                if let Some(s) = &mut self.swarm {
                    s.handle_bitmap(member_of(b.task), &b.bitmap);
                }
            }
            Control::Announce(b) => {
                // As the supernode: only a bitmap of the task's length joins its swarm.
                let fits = self
                    .geometry
                    .is_some_and(|g| g.piece_count == b.bitmap.len());
                if let (Some(s), true) = (&mut self.swarm, fits) {
                    let addr = SocketAddr::from(([10, 0, 0, b.task.0[0]], 65002));
                    s.handle_join(member_of(b.task), Some(addr), Default::default(), now);
                    s.handle_bitmap(member_of(b.task), &b.bitmap);
                }
            }
            Control::TaskComplete(c) => {
                if let Some(dl) = &mut self.download {
                    if dl.handle_complete(c.sha256).is_err() {
                        self.download = None;
                    } else {
                        dl.set_read_position(Some(c.length));
                    }
                }
            }
            Control::Error(_) => {
                if let Some(dl) = &mut self.download {
                    dl.handle_seed_lost();
                    dl.handle_seed_attached();
                }
            }
            Control::BadPeer(r) => {
                if let Some(s) = &mut self.swarm {
                    s.handle_report(self.member, r.peer, r.reason, now);
                    s.handle_report(member_of(r.task), r.peer, r.reason, now);
                }
            }
            Control::Goodbye(_) => {
                if let Some(s) = &mut self.swarm {
                    s.handle_leave(self.member);
                }
            }
            _ => {}
        }
        self.drive();
    }

    /// What the drivers do between messages: carry out the download's decisions (connections
    /// succeed, requests deliver or fail by a rule of their own), let time pass, and ask the
    /// swarm for parents.
    fn drive(&mut self) {
        self.steps += 1;
        self.now += if self.steps % TIMEOUT_EVERY == 0 {
            crate::sched::download::PIECE_TIMEOUT + Duration::from_secs(1)
        } else {
            Duration::from_millis(50)
        };
        let now = self.now;
        if let (Some(dl), Some(g)) = (&mut self.download, self.geometry) {
            let mut requests = Vec::new();
            let mut stop = false;
            for _ in 0..ACTIONS_PER_STEP {
                let Some(action) = dl.poll_action(now) else {
                    break;
                };
                match action {
                    Action::Connect { src, .. } => dl.handle_parent_ready(src),
                    Action::Request {
                        src, index, len, ..
                    } => {
                        assert!(index < g.piece_count, "request for piece {index}");
                        assert_eq!(len, g.piece_len(index));
                        requests.push((src, index));
                    }
                    Action::DropParent { src } => dl.handle_parent_gone(src),
                    Action::Done | Action::Fail(_) => {
                        stop = true;
                        break;
                    }
                    Action::Cancel { .. } | Action::Report { .. } => {}
                }
            }
            for (src, index) in requests {
                let result = match (index + src.0) % 5 {
                    0 => Err(PieceFailure::Corrupt),
                    1 => Err(PieceFailure::Refused(d7q_wire::PieceStatus::Saturated)),
                    2 if self.steps % 3 == 0 => continue, // left to time out
                    _ => Ok(()),
                };
                let _ = dl.handle_piece_result(src, index, result, now);
            }
            if dl.poll_timeout().is_some_and(|t| t <= now) {
                dl.handle_timeout(now);
            }
            assert!(dl.done_count() <= g.piece_count);
            assert!(dl.bytes_done() <= g.length);
            if stop {
                self.download = None;
            }
        }
        if let Some(s) = &mut self.swarm {
            let _ = s.poll_parents(self.member, now);
            for _ in 0..64 {
                let Some(peer) = s.poll_reschedule() else {
                    break;
                };
                let _ = s.poll_parents(peer, now);
            }
        }
    }
}

/// Pieces "stored before a restart": a few, some with the digest a test seed would publish.
fn resumed(g: &Geometry, task: TaskId) -> HashMap<u32, Option<d7q_wire::Sha256>> {
    (0..g.piece_count.min(u32::from(task.0[0] % 4)))
        .map(|i| (i, (i % 2 == 0).then_some([i as u8; 32])))
        .collect()
}

/// The parent a message is taken to come from: one of the first few the download numbered.
fn source_of(task: TaskId) -> SourceId {
    SourceId(u32::from(task.0[0] % 8))
}

/// The swarm member a message is taken to come from.
fn member_of(task: TaskId) -> NodeId {
    NodeId(task.0)
}
