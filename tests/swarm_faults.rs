//! The swarm under faults, with real processes on loopback: a daemon that serves corrupt pieces,
//! a daemon killed mid-transfer, a parent that stalls (SIGSTOP), and the origin gone once the
//! supernode holds the content. Every honest copy must end byte-correct; what the faulty node did
//! to the others is read from their own metrics and the supernode's log.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{
    assert_only, sha256_file, Daemon, Env, Output, Supernode, DIGEST_MISMATCHES, PIECE,
    UPLOAD_BYTES,
};
use d7q::engine::PEER_IN_FLIGHT;
use futures_util::future::join_all;

/// How often a test looks at a daemon's metrics while it waits for a state.
const POLL: Duration = Duration::from_millis(100);
/// Longest a test waits for a daemon to reach a state before it fails.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Pieces of every file here are 1 MiB (files up to 1 GiB).
const MIB: u64 = PIECE;
/// What a daemon's environment must say before it accepts `--danger-corrupt-uploads`.
const DANGER_ENV: (&str, &str) = ("D7Q_DANGER_CORRUPT_UPLOADS", "i-know-this-corrupts-data");
/// Parents a daemon's downloads gave up on because they could not be reached or went away.
const PARENTS_GONE: &str = "d7q_parents_dropped_total{reason=\"gone\"}";
/// Parents a daemon's downloads dropped for what they served (corrupt or failed pieces).
const PARENTS_DROPPED: &str = "d7q_parents_dropped_total{reason=\"failures\"}";

/// A daemon that serves corrupt pieces (`--danger-corrupt-uploads`, with the variable that
/// allows it).
async fn corrupt_daemon(env: &Env, pki: &Path, sn: &Supernode) -> Daemon {
    env.daemon_with_env(pki, &[sn], &["--danger-corrupt-uploads"], &[DANGER_ENV])
        .await
}

/// A daemon that caught a corrupt piece dropped the parent that sent it: corrupt data costs a
/// parent its place at once.
async fn assert_dropped_if_met(d: &Daemon) {
    let caught = d.metric(DIGEST_MISMATCHES).await;
    let dropped = d.metric(PARENTS_DROPPED).await;
    assert!(
        caught == 0.0 || dropped >= 1.0,
        "a daemon that caught {caught} corrupt pieces dropped no parent ({dropped})"
    );
}

/// The loud warnings a corrupting daemon must leave in its log: one at start, and one for its
/// first corrupted piece.
#[track_caller]
fn assert_warned_of_corruption(bad: &Daemon) {
    let log = bad.log();
    assert!(
        log.contains("WARN") && log.contains("this daemon serves CORRUPT pieces"),
        "no start-up warning in the corrupt daemon's log:\n{log}"
    );
    assert!(
        log.contains("served a CORRUPT piece") && log.contains("corrupted=1"),
        "no warning for the first corrupted piece:\n{log}"
    );
}

/// `d7q get URL -o OUT --daemon SOCKET` through daemon `d`.
/// The arguments are copied at once: the future borrows only `env`.
fn get_via<'e>(
    env: &'e Env,
    url: &str,
    out: &Path,
    d: &Daemon,
) -> impl std::future::Future<Output = Output> + 'e {
    env.get(url, out).arg("--daemon").arg(d.socket_arg()).run()
}

/// The same get through each daemon at once, into `out/copyI`; every one must succeed.
async fn get_all_ok(env: &Env, url: &str, out: &Path, daemons: &[&Daemon], first: usize) {
    let gets = daemons
        .iter()
        .enumerate()
        .map(|(i, d)| get_via(env, url, &out.join(format!("copy{}", first + i)), d));
    for o in join_all(gets).await {
        o.ok();
    }
}

/// `reason=count` of each piece failure the daemon counted, for messages.
async fn failures(d: &Daemon) -> String {
    d.metrics()
        .await
        .into_iter()
        .filter(|(k, v)| k.starts_with("d7q_piece_failures_total{") && *v > 0.0)
        .map(|(k, v)| format!("{}={v}", k.trim_start_matches("d7q_piece_failures_total")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[track_caller]
fn assert_copy(out: &Path, name: &str, expected: &str) {
    assert_eq!(
        sha256_file(&out.join(name)),
        expected,
        "{name}: the bytes differ from the origin's"
    );
}

/// The corruption switch is refused without the variable that names the danger (absent, or
/// with any other value): a clear usage error that names the variable, and no daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_corruption_switch_needs_its_variable() {
    let env = Env::new();
    let (_ca, pkis) = env.ca("cluster", &["d"]).await;
    let args: Vec<String> = [
        "daemon",
        "--listen",
        "127.0.0.1:0",
        "--proxy",
        "127.0.0.1:0",
        "--supernode",
        "127.0.0.1:9",
        "--danger-corrupt-uploads",
        "--data-dir",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        env.dir("data").to_str().unwrap().to_owned(),
        "--pki".to_owned(),
        pkis[0].to_str().unwrap().to_owned(),
        "--socket".to_owned(),
        env.path().join("d.sock").to_str().unwrap().to_owned(),
    ])
    .collect();
    let wrong = [(DANGER_ENV.0.to_owned(), "yes".to_owned())];
    for envs in [&[][..], &wrong[..]] {
        let out = env.run_with(&args, envs, common::TIMEOUT).await;
        out.fails(
            2,
            "--danger-corrupt-uploads makes this daemon serve corrupt pieces (a test switch); \
             refused unless D7Q_DANGER_CORRUPT_UPLOADS=i-know-this-corrupts-data is set",
        );
        assert!(!out.stdout.contains("ready"), "{out}");
    }
}

/// A corrupt daemon that completed its download first holds every piece; the honest daemons that
/// come after meet it as a parent, catch its corrupt pieces, drop it and report it; the supernode
/// never hands it out again, so a daemon that comes later still does not meet it at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_peer_that_finished_first_is_isolated() {
    const LEN: u64 = 64 * MIB;
    const HONEST: usize = 3;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    let (_ca, pkis) = env
        .ca("cluster", &["sn", "bad", "h0", "h1", "h2", "late"])
        .await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let bad = corrupt_daemon(&env, &pkis[1], &sn).await;
    let url = origin.url("layer.bin");
    let out = env.dir("out");

    // The corrupt daemon's own download is honest (from the seed, verified); only its uploads lie.
    get_via(&env, &url, &out.join("bad"), &bad).await.ok();
    assert_copy(&out, "bad", &expected);

    let mut honest = Vec::new();
    for pki in &pkis[2..2 + HONEST] {
        honest.push(env.daemon(pki, &[&sn], &[]).await);
    }
    let refs: Vec<&Daemon> = honest.iter().collect();
    get_all_ok(&env, &url, &out, &refs, 0).await;
    for i in 0..HONEST {
        assert_copy(&out, &format!("copy{i}"), &expected);
    }

    let mut mismatches = Vec::new();
    for d in &honest {
        mismatches.push(d.metric(DIGEST_MISMATCHES).await);
        assert_dropped_if_met(d).await;
    }
    let bad_uploaded = bad.metric(UPLOAD_BYTES).await;
    let total: f64 = mismatches.iter().sum();
    assert!(
        total > 0.0,
        "no honest daemon met the corrupt one (digest mismatches per daemon {mismatches:?}; the \
         corrupt daemon uploaded {bad_uploaded} bytes): the supernode never handed out the \
         daemon that holds every piece"
    );
    // Dropped at the first corrupt piece: at most the requests already in flight to it fail.
    for (i, m) in mismatches.iter().enumerate() {
        assert!(
            *m <= PEER_IN_FLIGHT as f64,
            "honest daemon {i} caught {m} corrupt pieces: it kept asking the corrupt parent"
        );
    }
    assert!(
        bad_uploaded <= (HONEST * PEER_IN_FLIGHT) as f64 * MIB as f64,
        "the corrupt daemon uploaded {bad_uploaded} bytes to {HONEST} honest daemons: it was not \
         cut off after its first corrupt pieces"
    );
    let log = sn.log();
    assert!(
        log.contains("bad peer reported") && log.contains("DigestMismatch"),
        "the supernode log shows no digest-mismatch report:\n{log}"
    );

    // Isolated for the task: a daemon that comes later is never sent to it.
    let late = env.daemon(&pkis[2 + HONEST], &[&sn], &[]).await;
    get_via(&env, &url, &out.join("late"), &late).await.ok();
    assert_copy(&out, "late", &expected);
    assert_eq!(
        late.metric(DIGEST_MISMATCHES).await,
        0.0,
        "a daemon that came after the isolation still met the corrupt peer"
    );
    assert_eq!(
        bad.metric(UPLOAD_BYTES).await,
        bad_uploaded,
        "the isolated daemon kept uploading"
    );
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");
    assert_warned_of_corruption(&bad);
    eprintln!("digest mismatches {mismatches:?}; the corrupt daemon uploaded {bad_uploaded} bytes");
}

/// A corrupt daemon downloading together with honest ones: the seed hands each piece out once and
/// leaves the rest to the peers, so the honest daemons must ask the corrupt one for its first
/// copies, catch the corruption, drop and report it, and take those pieces elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_peer_downloading_with_the_swarm_is_isolated() {
    const LEN: u64 = 64 * MIB;
    const HONEST: usize = 3;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "bad", "h0", "h1", "h2"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let bad = corrupt_daemon(&env, &pkis[1], &sn).await;
    let mut honest = Vec::new();
    for pki in &pkis[2..] {
        honest.push(env.daemon(pki, &[&sn], &[]).await);
    }
    let url = origin.url("layer.bin");
    let out = env.dir("out");
    let mut all: Vec<&Daemon> = honest.iter().collect();
    all.push(&bad);
    get_all_ok(&env, &url, &out, &all, 0).await;
    for i in 0..=HONEST {
        assert_copy(&out, &format!("copy{i}"), &expected);
    }

    let mut mismatches = Vec::new();
    for d in &honest {
        mismatches.push(d.metric(DIGEST_MISMATCHES).await);
        assert_dropped_if_met(d).await;
    }
    let bad_uploaded = bad.metric(UPLOAD_BYTES).await;
    assert!(
        mismatches.iter().sum::<f64>() > 0.0,
        "no honest daemon met the corrupt one (mismatches {mismatches:?}, it uploaded \
         {bad_uploaded} bytes)"
    );
    for (i, m) in mismatches.iter().enumerate() {
        assert!(
            *m <= PEER_IN_FLIGHT as f64,
            "honest daemon {i} caught {m} corrupt pieces: it kept asking the corrupt parent"
        );
    }
    assert!(
        bad_uploaded <= (HONEST * PEER_IN_FLIGHT) as f64 * MIB as f64,
        "the corrupt daemon uploaded {bad_uploaded} bytes: it was not cut off"
    );
    assert_eq!(
        bad.metric(DIGEST_MISMATCHES).await,
        0.0,
        "the honest daemons served the corrupt one corrupt pieces"
    );
    let log = sn.log();
    assert!(
        log.contains("bad peer reported") && log.contains("DigestMismatch"),
        "the supernode log shows no digest-mismatch report:\n{log}"
    );
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");
    assert_warned_of_corruption(&bad);
    eprintln!("digest mismatches {mismatches:?}; the corrupt daemon uploaded {bad_uploaded} bytes");
}

/// Four daemons fetch a file; once one of them has served its peers, it is killed (SIGKILL). The
/// other three finish with correct bytes from the rest of the swarm; the killed daemon's client
/// fails cleanly and leaves no file behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_killed_mid_transfer_does_not_stop_the_others() {
    const LEN: u64 = 128 * MIB;
    const DAEMONS: usize = 4;
    const VICTIM: usize = 1;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("big.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d0", "d1", "d2", "d3"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    // A per-download budget keeps the transfer going long enough to kill a peer in its middle.
    let mut daemons = Vec::new();
    for pki in &pkis[1..] {
        daemons.push(
            env.daemon(pki, &[&sn], &["--per-download-rate", "16MiB"])
                .await,
        );
    }
    let url = origin.url("big.bin");
    let outs: Vec<_> = (0..DAEMONS).map(|i| env.dir(&format!("out{i}"))).collect();
    let gets = join_all(
        daemons
            .iter()
            .zip(&outs)
            .map(|(d, o)| get_via(&env, &url, &o.join("big.bin"), d)),
    );
    let victim = &daemons[VICTIM];
    let killer = common::poll_until(STATE_TIMEOUT * 2, POLL, || async {
        let m = victim.metrics().await;
        if common::downloaded(&m) >= LEN as f64 {
            return Some(None); // finished before it served enough: nothing to kill mid-way
        }
        let up = common::metric_of(&m, UPLOAD_BYTES);
        (up >= 4.0 * MIB as f64).then(|| {
            victim.signal(libc::SIGKILL);
            Some((up, common::downloaded(&m)))
        })
    });
    let (results, killed) = tokio::join!(gets, killer);
    let killed = killed.flatten();
    assert!(
        killed.is_some(),
        "the victim never served 4 MiB to its peers while downloading: nothing was killed mid-transfer"
    );
    for (i, o) in results.iter().enumerate() {
        if i == VICTIM {
            continue;
        }
        o.ok();
        assert_copy(&outs[i], "big.bin", &expected);
        eprintln!("daemon {i} piece failures: {}", failures(&daemons[i]).await);
    }
    results[VICTIM].fails(5, "daemon");
    assert_only(&outs[VICTIM], &[]);
    assert_eq!(origin.gets("big.bin"), 1, "origin GETs");
    let (up, down) = killed.unwrap_or_default();
    eprintln!("killed the victim after it uploaded {up} and downloaded {down} bytes");
}

/// A daemon that holds pieces freezes (SIGSTOP) and stays in the swarm as a parent that never
/// answers; the daemons that start after it are sent to it, give up on it, route around it and
/// finish correct, with not one byte from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_parent_is_routed_around() {
    const LEN: u64 = 64 * MIB;
    const OTHERS: usize = 3;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("big.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "stall", "d1", "d2", "d3"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    // Slow, so it is still a member of the task (and a parent) when it freezes.
    let stalled = env
        .daemon(&pkis[1], &[&sn], &["--per-download-rate", "4MiB"])
        .await;
    // The others give up on a silent peer after a 3 s idle timeout (the handshake to the frozen
    // daemon ends there), and their 8 MiB/s budget keeps each 64 MiB download running at least
    // 8 s: the attempt on the frozen parent ends while they still download, so they must route
    // around it rather than simply finish first.
    let mut others = Vec::new();
    for pki in &pkis[2..] {
        let flags = [
            "--idle-timeout",
            "3s",
            "--keep-alive",
            "500ms",
            "--per-download-rate",
            "8MiB",
        ];
        others.push(env.daemon(pki, &[&sn], &flags).await);
    }
    let url = origin.url("big.bin");
    let out = env.dir("out");
    let stalled_get = env
        .get(&url, &out.join("stalled"))
        .arg("--daemon")
        .arg(stalled.socket_arg())
        .timeout(Duration::from_secs(100))
        .run();
    let scenario = async {
        let holds = common::poll_until(STATE_TIMEOUT, POLL, || async {
            (stalled.downloaded().await >= (8 * MIB) as f64).then_some(())
        })
        .await;
        assert!(holds.is_some(), "the daemon to stall never got 8 MiB");
        stalled.signal(libc::SIGSTOP);
        let refs: Vec<&Daemon> = others.iter().collect();
        let gets = refs
            .iter()
            .enumerate()
            .map(|(i, d)| get_via(&env, &url, &out.join(format!("copy{i}")), d));
        let results = join_all(gets).await;
        stalled.signal(libc::SIGCONT);
        results
    };
    let (stalled_result, results) = tokio::join!(stalled_get, scenario);
    for o in &results {
        o.ok();
    }
    for i in 0..OTHERS {
        assert_copy(&out, &format!("copy{i}"), &expected);
    }
    // The frozen daemon itself may finish or fail once it runs again; either way no wrong file.
    if stalled_result.code == 0 {
        assert_copy(&out, "stalled", &expected);
    } else {
        assert!(
            !out.join("stalled").exists(),
            "a failed get left a file:\n{stalled_result}"
        );
    }
    eprintln!(
        "stalled daemon's own get: exit code {}; {}",
        stalled_result.code,
        stalled_result.stderr.trim()
    );
    let mut gone = Vec::new();
    for (i, d) in others.iter().enumerate() {
        gone.push(d.metric(PARENTS_GONE).await);
        eprintln!("daemon {i} piece failures: {}", failures(d).await);
    }
    eprintln!("parents given up as gone, per daemon: {gone:?}");
    // Offered and tried: the supernode handed the frozen daemon (it held pieces the others
    // lacked) to each of them, and each one's session with it failed — and only that one: it
    // was the only peer that went silent.
    for (i, g) in gone.iter().enumerate() {
        assert_eq!(
            *g, 1.0,
            "daemon {i} gave up on {g} parents (all: {gone:?}); exactly one, the frozen daemon, \
             must have been tried and dropped"
        );
    }
    // Routed around: nobody got a byte from it (its counters, read now that it runs again).
    assert_eq!(
        stalled.metric(UPLOAD_BYTES).await,
        0.0,
        "the frozen daemon uploaded to its peers"
    );
    assert_eq!(origin.gets("big.bin"), 1, "origin GETs");
}

/// Once the supernode holds the content, the origin can go away: the swarm still finishes, and
/// only content the supernode never saw fails (with the origin's exit code).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_swarm_finishes_with_the_origin_gone() {
    const LEN: u64 = 64 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    origin.file("never.bin", MIB);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d0", "d1", "d2", "d3"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let mut daemons = Vec::new();
    for pki in &pkis[1..] {
        daemons.push(env.daemon(pki, &[&sn], &[]).await);
    }
    let url = origin.url("layer.bin");
    let never = origin.url("never.bin");
    let out = env.dir("out");
    get_via(&env, &url, &out.join("first"), &daemons[0])
        .await
        .ok();
    assert_copy(&out, "first", &expected);
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");

    origin.server.shutdown().await;
    let refs: Vec<&Daemon> = daemons[1..].iter().collect();
    get_all_ok(&env, &url, &out, &refs, 1).await;
    for i in 1..daemons.len() {
        assert_copy(&out, &format!("copy{i}"), &expected);
    }
    for d in &daemons[1..] {
        assert_eq!(
            d.metric("d7q_download_bytes_total{source=\"origin\"}")
                .await,
            0.0
        );
    }
    // The origin really is gone: what the supernode never fetched cannot be had.
    get_via(&env, &never, &out.join("never"), &daemons[1])
        .await
        .fails(3, "");
    assert!(!out.join("never").exists());
}
