//! The scenario runner with generic processes (`sh -c`): a service that becomes ready and prints
//! a counter, workload nodes that complete by exiting or by printing a line, one that fails, one
//! killed by a fault, a partition on the schedule — and the files the runner writes.
//!
//! Needs root and /dev/net/tun: outside CI it prints why it skips; under CI (`CI=true`) or with
//! `D7Q_REQUIRE_PRIVILEGED=1` (as `scripts/test.sh` sets) a missing one fails it (see `common`).
//! The shipped scenarios are checked (parsed and validated) without privileges.
//!
//! Times are only checked from below (a process told to sleep 0.3 s cannot be done sooner) and
//! by order (what the runner did before the run ended), never against a ceiling.

mod common;

use std::path::Path;

use d7q_netsim::netns;
use d7q_netsim::scenario::{Scenario, ScenarioResult};

/// A service in dc-a prints its ready line (with its address, captured), then a counter every
/// 100 ms. Workload: `w-exit` exits 0 after 0.3 s; `w-line` prints "finished" after 0.5 s and
/// keeps running; `w-fail` exits 3; `w-killed` would sleep 60 s but is killed at 1 s.
const SCENARIO: &str = r#"
name = "runner-test"
seed = 5
timeout = "30s"
setup = ["mkdir -p {out}/shared && echo hello > {out}/shared/greeting"]

[vars]
greeting_file = "shared/greeting"

[[dc]]
name = "dc-a"

[[dc]]
name = "dc-b"
intra = "delay=1ms"

[[wan]]
between = ["dc-a", "dc-b"]
link = "delay=20ms"

[[node]]
name = "svc"
dc = "dc-a"
command = "echo ready at {addr}; i=0; while true; do i=$((i+1)); echo counter $i; sleep 0.1; done"
ready = '^ready at (?P<ip>\S+)'

[[node]]
name = "w-exit"
dc = "dc-a"
command = "sleep 0.3; cat {out}/{var:greeting_file}; echo value 42"
done = "exit"

[[node]]
name = "w-line"
dc = "dc-b"
command = "sleep 0.5; echo finished talking to {cap:svc.ip}; sleep 60"
done = '^finished talking to 10\.80\.1\.1$'

[[node]]
name = "w-fail"
dc = "dc-b"
command = "exit 3"
done = "exit"

[[node]]
name = "w-killed"
dc = "dc-b"
command = "echo value 7; sleep 60"
done = "exit"
start_after = "200ms"

[[metric]]
name = "value"
nodes = ["w-exit", "w-killed", "w-fail"]
source = "output"
regex = '^value (\d+)'

[[metric]]
name = "counter"
nodes = ["svc"]
source = "output"
regex = '^counter (\d+)'

[[fault]]
at = "1s"
kill = "w-killed"

[[fault]]
at = "100ms"
partition = ["dc-a", "dc-b"]
for = "500ms"

[[fault]]
at = "25s"
kill = "svc"
"#;

#[test]
fn shipped_scenarios_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n >= 1, "no scenarios in {}", dir.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_processes_applies_faults_and_writes_results() {
    if common::skip_unprivileged("runs_processes_applies_faults_and_writes_results") {
        return;
    }
    let out = std::env::temp_dir().join(format!("netsim-scenario-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir_all(&out).unwrap();
    let sc = Scenario::parse(SCENARIO).unwrap();
    let r: ScenarioResult = sc.run(&out).await.unwrap();

    let node = |name: &str| r.nodes.iter().find(|n| n.name == name).unwrap();
    assert_eq!(node("svc").role, "service");
    assert!(node("svc").ready_s.unwrap() <= 0.0);
    assert_eq!(node("w-exit").status, "done");
    assert_eq!(node("w-exit").exit_code, Some(0));
    assert_eq!(node("w-line").status, "done");
    assert_eq!(node("w-fail").status, "failed");
    assert_eq!(node("w-fail").exit_code, Some(3));
    assert_eq!(node("w-killed").status, "killed");
    // Completion times are recorded in the order the work finishes.
    let (t_exit, t_line) = (
        node("w-exit").done_s.unwrap(),
        node("w-line").done_s.unwrap(),
    );
    assert!(t_exit >= 0.3 && t_line >= 0.5, "{t_exit} {t_line}");
    assert!(!r.all_done, "w-fail failed and w-killed was killed");
    // The run ended when the workload did: after the kill at 1 s it needed, before the fault
    // at 25 s, which the runner therefore never applied.
    let faults: Vec<_> = r.faults.iter().map(|f| f.applied_s.is_some()).collect();
    assert_eq!(faults, [true, true, false]);
    assert!(r.faults[0].applied_s.unwrap() >= 1.0);
    assert!(r.workload_s >= r.faults[0].applied_s.unwrap());

    let metric = |name: &str| r.metrics.iter().find(|m| m.name == name).unwrap();
    let value = metric("value");
    assert_eq!(value.per_node.get("w-exit"), Some(&42.0));
    assert_eq!(value.per_node.get("w-killed"), Some(&7.0));
    assert!(value.missing.contains_key("w-fail"));
    assert_eq!(value.total, 49.0);
    assert!(metric("counter").total >= 1.0);
    // Both directions of the WAN link exist (and carried the partition).
    let inter = r.links.links.iter().filter(|l| l.kind == "inter").count();
    assert_eq!(inter, 2);

    // The files, and each node's output and expanded command.
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("result.json")).unwrap()).unwrap();
    assert_eq!(json["name"], "runner-test");
    assert_eq!(json["nodes"].as_array().unwrap().len(), 5);
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.contains("w-killed") && summary.contains("killed"));
    assert!(summary.contains("kill w-killed"));
    let svg = std::fs::read_to_string(out.join("completion.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("w-exit (done)"));
    let greeting = std::fs::read_to_string(out.join("nodes/w-exit/stdout.log")).unwrap();
    assert!(greeting.starts_with("hello\n"));
    let cmd = std::fs::read_to_string(out.join("nodes/w-line/command.txt")).unwrap();
    assert!(cmd.contains("finished talking to 10.80.1.1"));
    // Everything was stopped and every namespace removed.
    let left = netns::ip(&["netns", "list"]).unwrap();
    assert!(
        !left.contains(&format!("nss{}-", std::process::id() % 100_000)),
        "{left}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
