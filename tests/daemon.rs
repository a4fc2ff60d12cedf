//! `d7q daemon` as a process on its own: a restart serves what its store holds and resumes what
//! it had half done, and its machine-wide upload and download budgets hold across concurrent
//! transfers (bytes counted by its own metrics over an interval, with a generous tolerance).

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{sha256_file, Daemon, Env, Output, PIECE, TASKS_RUNNING, UPLOAD_BYTES};
use futures_util::future::join_all;

/// Files here are cut into 1 MiB pieces.
const MIB: u64 = PIECE;
/// How often a test looks at a daemon's metrics.
const POLL: Duration = Duration::from_millis(100);
/// How often the rate tests sample the counters.
const SAMPLE: Duration = Duration::from_millis(250);
/// Longest a test waits for a daemon to reach a state before it fails.
const STATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Rate tests compare counters over intervals at least this long (shorter ones are all burst).
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Slack on a budget: bytes over an interval may exceed rate × interval by this factor…
const RATE_TOLERANCE: f64 = 1.5;

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

#[track_caller]
fn assert_copy(path: &Path, expected: &str) {
    assert_eq!(
        sha256_file(path),
        expected,
        "{}: the bytes differ from the origin's",
        path.display()
    );
}

/// `d7q status --json --pki PKI ADDR`, parsed (the task list needs a cluster certificate).
async fn status(env: &Env, addr: std::net::SocketAddr, pki: &Path) -> serde_json::Value {
    let pki = pki.to_str().expect("utf-8 path");
    let out = env
        .run(&["status", "--json", "--pki", pki, &addr.to_string()])
        .await;
    out.ok();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status is not JSON ({e}):\n{}", out.stdout))
}

/// A daemon killed (SIGKILL) after a complete download comes back on the same data directory
/// and serves the content from its store: no origin request, no byte from the mesh, and its
/// status lists the task complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_serves_a_completed_task_from_its_store() {
    const LEN: u64 = 32 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "a"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let mut a = env.daemon(&pkis[1], &[&sn], &[]).await;
    let url = origin.url("layer.bin");
    let out = env.dir("out");
    get_via(&env, &url, &out.join("first"), &a).await.ok();
    assert_copy(&out.join("first"), &expected);
    assert!(a.downloaded().await >= LEN as f64);
    a.kill().await;
    drop(a);

    let a = env.daemon(&pkis[1], &[&sn], &[]).await;
    get_via(&env, &url, &out.join("again"), &a).await.ok();
    assert_copy(&out.join("again"), &expected);
    let m = a.metrics().await;
    assert_eq!(
        common::downloaded(&m),
        0.0,
        "the restarted daemon fetched content it had: {m:?}"
    );
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");

    let st = status(&env, a.mesh, &pkis[1]).await;
    assert_eq!(st["node"]["role"], "daemon", "{st}");
    let tasks = st["tasks"].as_array().expect("tasks array");
    let task = tasks
        .iter()
        .find(|t| t["url"] == url.as_str())
        .unwrap_or_else(|| panic!("status does not list {url}: {st}"));
    assert_eq!(task["state"], "complete", "{task}");
    assert_eq!(task["length"], LEN, "{task}");
    assert_eq!(task["pieces_done"], task["piece_count"], "{task}");
    assert_eq!(task["sha256"], format!("sha256:{expected}"), "{task}");
}

/// Starts a rate-limited download, stops the daemon with `signal` once it has `kill_at` bytes,
/// restarts it (same data directory, no limit) and gets the file again. Returns the bytes seen
/// before the stop and the bytes downloaded after the restart.
async fn interrupted_download(signal: i32, len: u64, kill_at: u64) -> (f64, f64) {
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", len);
    let (_ca, pkis) = env.ca("cluster", &["sn", "a"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let mut a = env
        .daemon(&pkis[1], &[&sn], &["--per-download-rate", "4MiB"])
        .await;
    let url = origin.url("layer.bin");
    let out = env.dir("out");
    let first = get_via(&env, &url, &out.join("first"), &a);
    let stopper = common::poll_until(STATE_TIMEOUT, POLL, || async {
        let got = a.downloaded().await;
        (got >= kill_at as f64).then(|| {
            a.signal(signal);
            got
        })
    });
    let (first, before) = tokio::join!(first, stopper);
    let before = before.unwrap_or_else(|| panic!("the daemon never had {kill_at} bytes"));
    assert_ne!(
        first.code, 0,
        "the download finished before the stop:\n{first}"
    );
    assert!(
        !out.join("first").exists(),
        "an interrupted get left a file"
    );
    let status = a.wait(Duration::from_secs(30)).await;
    if signal == libc::SIGTERM {
        assert!(status.success(), "SIGTERM: the daemon exited with {status}");
    }
    drop(a);

    let a = env.daemon(&pkis[1], &[&sn], &[]).await;
    get_via(&env, &url, &out.join("again"), &a).await.ok();
    assert_copy(&out.join("again"), &expected);
    let after = a.downloaded().await;
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");
    let log = a.log();
    let resumed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("store opened") || l.contains("download started"))
        .collect::<Vec<_>>();
    eprintln!(
        "stopped ({status}) with {before} bytes; {after} bytes downloaded after the restart; \
         the restarted daemon logged:\n{}",
        resumed.join("\n")
    );
    (before, after)
}

/// SIGTERM mid-download, then a restart: the daemon keeps every piece it had verified (up to
/// the few still queued toward the disk) and fetches only the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_stopped_mid_download_resumes_after_a_restart() {
    const LEN: u64 = 64 * MIB;
    let (before, after) = interrupted_download(libc::SIGTERM, LEN, 16 * MIB).await;
    let slack = (4 * MIB) as f64;
    assert!(
        after <= LEN as f64 - before + slack,
        "after a clean stop with {before} bytes verified, the restart downloaded {after} of \
         {LEN}: it did not keep the pieces it had"
    );
}

/// SIGKILL mid-download (a crash), then a restart: the daemon resumes from its metadata instead
/// of starting over. What reached the metadata shortly before the crash must survive it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daemon_killed_mid_download_resumes_after_a_restart() {
    const LEN: u64 = 64 * MIB;
    let (before, after) = interrupted_download(libc::SIGKILL, LEN, 24 * MIB).await;
    // 24 MiB took six seconds at 4 MiB/s: all but the last seconds' worth must be kept.
    let kept = (8 * MIB) as f64;
    assert!(
        after <= LEN as f64 - kept,
        "killed with {before} bytes verified, the restart downloaded {after} of {LEN}: it kept \
         less than {kept} bytes (started over?)"
    );
}

/// One sample of a daemon's counters.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    bytes: f64,
    running: f64,
}

/// Samples `counter` (a function of the metrics) and the running-tasks gauge of `d` every
/// [`SAMPLE`] until `done` resolves; returns the samples and `done`'s output.
async fn sample_while<T>(
    d: &Daemon,
    counter: impl Fn(&std::collections::BTreeMap<String, f64>) -> f64,
    done: impl std::future::Future<Output = T>,
) -> (Vec<Sample>, T) {
    let mut samples = Vec::new();
    tokio::pin!(done);
    let mut tick = tokio::time::interval(SAMPLE);
    loop {
        tokio::select! {
            out = &mut done => return (samples, out),
            _ = tick.tick() => {
                let m = d.metrics().await;
                samples.push(Sample {
                    at: Instant::now(),
                    bytes: counter(&m),
                    running: common::metric_of(&m, TASKS_RUNNING),
                });
            }
        }
    }
}

/// Checks every pair of samples at least [`MIN_INTERVAL`] apart among `samples` (all taken
/// while the budget was contended): the bytes between them stay within `rate` × interval ×
/// [`RATE_TOLERANCE`] plus `slack`. Returns how many pairs were checked and the highest rate
/// seen over an interval.
#[track_caller]
fn assert_within_budget(what: &str, samples: &[Sample], rate: f64, slack: f64) -> (usize, f64) {
    let mut pairs = 0;
    let mut highest: f64 = 0.0;
    for (i, a) in samples.iter().enumerate() {
        for b in &samples[i + 1..] {
            let dt = b.at.duration_since(a.at);
            if dt < MIN_INTERVAL {
                continue;
            }
            pairs += 1;
            let bytes = b.bytes - a.bytes;
            highest = highest.max(bytes / dt.as_secs_f64());
            let budget = rate * dt.as_secs_f64() * RATE_TOLERANCE + slack;
            assert!(
                bytes <= budget,
                "{what}: {bytes} bytes in {dt:?}, over the budget of {rate} B/s (allowed \
                 {budget}); samples: {samples:?}"
            );
        }
    }
    (pairs, highest)
}

/// Two downloads at once through a daemon with a machine-wide download budget: together they
/// stay within it, and both files end correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_budget_holds_across_concurrent_downloads() {
    const LEN: u64 = 24 * MIB;
    const RATE: u64 = 8 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let sha_a = origin.file("a.bin", LEN);
    let sha_b = origin.file("b.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let d = env
        .daemon(&pkis[1], &[&sn], &["--download-rate", "8MiB"])
        .await;
    let out = env.dir("out");
    let gets = futures_util::future::join(
        get_via(&env, &origin.url("a.bin"), &out.join("a.bin"), &d),
        get_via(&env, &origin.url("b.bin"), &out.join("b.bin"), &d),
    );
    let (samples, (a, b)) = sample_while(&d, common::downloaded, gets).await;
    a.ok();
    b.ok();
    assert_copy(&out.join("a.bin"), &sha_a);
    assert_copy(&out.join("b.bin"), &sha_b);
    // Only while both run: that is the budget shared across tasks.
    let both: Vec<Sample> = samples.into_iter().filter(|s| s.running >= 2.0).collect();
    // One piece per download may be on its way at either end of an interval.
    let slack = (2 * 2 * MIB) as f64;
    let (pairs, highest) = assert_within_budget("downloads", &both, RATE as f64, slack);
    assert!(
        pairs > 0,
        "no interval of {MIN_INTERVAL:?} with both downloads running: {both:?}"
    );
    eprintln!("download budget {RATE} B/s: highest {highest:.0} B/s over {pairs} intervals");
}

/// A daemon with a machine-wide upload budget serves three others fetching what it holds: its
/// upload counter stays within the budget over every interval.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upload_budget_holds_while_serving_several_peers() {
    const LEN: u64 = 64 * MIB;
    const RATE: u64 = 4 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "u", "d1", "d2", "d3"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    // It downloads slowly, so it still belongs to the task while the others want its pieces.
    let u = env
        .daemon(
            &pkis[1],
            &[&sn],
            &["--upload-rate", "4MiB", "--per-download-rate", "8MiB"],
        )
        .await;
    let mut others = Vec::new();
    for pki in &pkis[2..] {
        others.push(env.daemon(pki, &[&sn], &[]).await);
    }
    let url = origin.url("layer.bin");
    let out = env.dir("out");
    let u_get = get_via(&env, &url, &out.join("u"), &u);
    let rest = async {
        // The others start once it holds pieces nobody else has.
        let holds = common::poll_until(STATE_TIMEOUT, POLL, || async {
            (u.downloaded().await >= (16 * MIB) as f64).then_some(())
        })
        .await;
        assert!(holds.is_some(), "the uploader never got 16 MiB");
        join_all(
            others
                .iter()
                .enumerate()
                .map(|(i, d)| get_via(&env, &url, &out.join(format!("copy{i}")), d)),
        )
        .await
    };
    let uploads = |m: &std::collections::BTreeMap<String, f64>| common::metric_of(m, UPLOAD_BYTES);
    let (samples, (u_out, outs)) =
        sample_while(&u, uploads, futures_util::future::join(u_get, rest)).await;
    u_out.ok();
    assert_copy(&out.join("u"), &expected);
    for (i, o) in outs.iter().enumerate() {
        o.ok();
        assert_copy(&out.join(format!("copy{i}")), &expected);
    }
    let total = u.metric(UPLOAD_BYTES).await;
    assert!(
        total >= (4 * MIB) as f64,
        "the rate-limited daemon uploaded only {total} bytes: the test measured nothing"
    );
    // Pieces on their way at either end of an interval.
    let slack = (2 * MIB) as f64;
    let (pairs, highest) = assert_within_budget("uploads", &samples, RATE as f64, slack);
    assert!(pairs > 0, "no interval to check: {samples:?}");
    eprintln!(
        "upload budget {RATE} B/s: {total} bytes uploaded, highest {highest:.0} B/s over {pairs} intervals"
    );
}

/// Two clients asking one daemon for the same URL at once share one download; both end correct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_of_one_daemon_share_one_download() {
    const LEN: u64 = 32 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("layer.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "d"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let d = env.daemon(&pkis[1], &[&sn], &[]).await;
    let url = origin.url("layer.bin");
    let out = env.dir("out");
    let (a, b) = futures_util::future::join(
        get_via(&env, &url, &out.join("a"), &d),
        get_via(&env, &url, &out.join("b"), &d),
    )
    .await;
    a.ok();
    b.ok();
    assert_copy(&out.join("a"), &expected);
    assert_copy(&out.join("b"), &expected);
    let got = d.downloaded().await;
    assert!(
        got < 2.0 * LEN as f64,
        "two clients of one daemon downloaded the content twice ({got} bytes)"
    );
    assert_eq!(origin.gets("layer.bin"), 1, "origin GETs");
}

/// After a restart a daemon offers what its store kept to the task's swarm: a daemon that
/// arrives later takes pieces from it, not only from the supernode.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_daemon_is_a_parent_for_what_it_kept() {
    const LEN: u64 = 32 * MIB;
    let env = Env::new();
    let origin = env.origin().await;
    let expected = origin.file("kept.bin", LEN);
    let url = origin.url("kept.bin");
    let (_ca, pkis) = env.ca("cluster", &["sn", "a", "b"]).await;
    let sn = env.supernode(&pkis[0], Some(&origin.ca_file)).await;
    let out = env.dir("out");

    let mut a = env.daemon(&pkis[1], &[&sn], &[]).await;
    get_via(&env, &url, &out.join("first"), &a).await.ok();
    a.kill().await;
    drop(a);
    let a = env.daemon(&pkis[1], &[&sn], &[]).await;

    let b = env.daemon(&pkis[2], &[&sn], &[]).await;
    get_via(&env, &url, &out.join("second"), &b).await.ok();
    assert_copy(&out.join("second"), &expected);
    let from_peers = b.metric(common::PEER_BYTES).await;
    assert!(
        from_peers > 0.0,
        "the restarted daemon was never a parent: b got nothing from peers\n{}",
        a.log()
    );
    assert_eq!(origin.gets("kept.bin"), 1);
}

/// A supernode's back-to-source budget holds across two origin downloads at once: its origin
/// byte counter over every interval stays within the rate (generous tolerance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_back_to_source_budget_holds_across_origin_downloads() {
    const LEN: u64 = 24 * MIB;
    const RATE: f64 = (8 * MIB) as f64;
    let env = Env::new();
    let origin = env.origin().await;
    let sha_a = origin.file("a.bin", LEN);
    let sha_b = origin.file("b.bin", LEN);
    let (_ca, pkis) = env.ca("cluster", &["sn", "c"]).await;
    let sn = env
        .supernode_with(
            &pkis[0],
            Some(&origin.ca_file),
            &["--back-to-source-rate", "8MiB"],
        )
        .await;
    let metrics = sn.metrics.expect("the supernode reports a metrics address");
    let out = env.dir("out");
    let get = |name: &'static str| {
        env.get(&origin.url(name), &out.join(name))
            .via(&sn, &pkis[1])
            .run()
    };
    let gets = futures_util::future::join(get("a.bin"), get("b.bin"));
    tokio::pin!(gets);
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE);
    let (a, b) = loop {
        tokio::select! {
            out = &mut gets => break out,
            _ = tick.tick() => {
                let m = common::scrape(metrics).await;
                samples.push(Sample {
                    at: Instant::now(),
                    bytes: common::metric_of(&m, "d7q_origin_bytes_total"),
                    running: common::metric_of(&m, "d7q_tasks{state=\"running\"}"),
                });
            }
        }
    };
    a.ok();
    b.ok();
    assert_copy(&out.join("a.bin"), &sha_a);
    assert_copy(&out.join("b.bin"), &sha_b);
    let both: Vec<Sample> = samples.into_iter().filter(|s| s.running >= 2.0).collect();
    let (pairs, highest) = assert_within_budget("origin", &both, RATE, (2 * MIB) as f64);
    assert!(
        pairs > 0,
        "no interval with both origin downloads running: {both:?}"
    );
    eprintln!("back-to-source budget {RATE} B/s: highest {highest:.0} B/s over {pairs} intervals");
}
