//! Scenarios: datacenters, nodes, links, a workload and faults in one TOML file, run with real
//! processes over emulated links, and the report of what happened.
//!
//! For: end-to-end experiments such as "three datacenters, a supernode and three daemons each,
//! 60 ms WAN links with 1 % loss, dc-b cut off for 10 s" — `netsim scenario FILE --out DIR`.
//! It knows nothing of what the processes are: commands are templates, readiness and completion
//! are regexes on their output (or their exit), and the numbers to collect are named by regexes
//! over their output or over an HTTP endpoint they serve (a Prometheus `/metrics`).
//! Not for: deciding packet fates ([`crate::link`]) or moving packets ([`crate::tun`]).
//!
//! Topology: one network namespace per node, each with one TUN device on a single [`Switch`]
//! whose ports are grouped by datacenter. Per node rather than per datacenter because nodes then
//! keep their own address, ports, loopback and routes exactly as on separate hosts (two daemons
//! can both listen on :65002), killing a node is killing its process group, and intra-datacenter
//! links can be impaired too. Between two datacenters each direction is one shared link (one
//! bottleneck for every flow, like a WAN circuit); inside a datacenter each ordered pair of nodes
//! has its own link (a non-blocking switch). Addresses are `10.80.D.N/16`: D the datacenter's
//! position from 1, N the node's position inside it from 1.
//!
//! The run: `setup` commands on the host; then the *services* (nodes without `done`) in file
//! order, each waited for until a line of its output matches `ready`; then time zero, when the
//! *workload* nodes (with `done`) start, each `start_after` later, and the fault schedule starts.
//! A workload node completes when it exits successfully (`done = "exit"`) or prints a line
//! matching `done`. When every workload node has completed, failed or been killed (or `timeout`
//! passes), the metrics are collected, every process group is stopped and the namespaces are
//! removed. `DIR/result.json`, `DIR/summary.txt` and `DIR/completion.svg` are written; each
//! node's output stays in `DIR/nodes/NAME/`.
//!
//! Placeholders in commands (and `setup`, metric URLs): `{addr:NODE}`, `{dir:NODE}`,
//! `{cap:NODE.GROUP}` (a named group of NODE's `ready` match), `{var:NAME}` (from `[vars]`),
//! `{env:NAME}` (this process's environment), `{out}`, and for the node itself `{node}`, `{dc}`,
//! `{addr}`, `{dir}`. `{{` and `}}` are literal braces.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use regex_automata::meta::Regex;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;
use tokio::sync::mpsc;

use crate::chart::{Chart, Series};
use crate::link::LinkConfig;
use crate::netns::{self, OwnedNetns};
use crate::tun::{LinkPlan, PortSpec, Switch, SwitchConfig, SwitchStats, DEFAULT_MTU};

/// Most datacenters in a scenario.
pub const MAX_DCS: usize = 32;
/// Most nodes in one datacenter (the last octet of their addresses).
pub const MAX_NODES_PER_DC: usize = 200;
/// Most nodes in a scenario.
pub const MAX_NODES: usize = 200;
/// Most faults and metrics, each.
pub const MAX_FAULTS: usize = 1000;
/// Longest line of a node's output that is matched; longer lines are cut there.
pub const MAX_LINE_BYTES: usize = 64 << 10;
/// Largest scenario file read.
pub const MAX_FILE_BYTES: u64 = 1 << 20;
/// Longest a service may take to print its `ready` line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest a `setup` command may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest a metric scrape may take, connect to last byte.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest scraped body read.
pub const MAX_SCRAPE_BYTES: u64 = 8 << 20;
/// How long stopped processes get between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// The TUN device in every node's namespace.
const IFNAME: &str = "nsim0";
/// Default for `timeout`.
const DEFAULT_TIMEOUT: &str = "600s";

/// A scenario file, as written.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ScenarioFile {
    /// Shown in the summary.
    #[serde(default)]
    pub name: String,
    /// Seed of every link.
    #[serde(default)]
    pub seed: u64,
    /// Longest the workload may run, from time zero.
    #[serde(default = "default_timeout")]
    pub timeout: String,
    /// Values for `{var:NAME}`.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Commands run on the host (`sh -c`), in order, before anything else.
    #[serde(default)]
    pub setup: Vec<String>,
    /// The datacenters.
    #[serde(rename = "dc")]
    pub dcs: Vec<DcSpec>,
    /// Links between datacenter pairs; pairs not listed get `default_wan`.
    #[serde(default)]
    pub wan: Vec<WanSpec>,
    /// Link between datacenters with no `wan` entry.
    #[serde(default = "perfect")]
    pub default_wan: String,
    /// The nodes, services first by convention (order is start order).
    #[serde(rename = "node")]
    pub nodes: Vec<NodeSpec>,
    /// Numbers to collect at the end.
    #[serde(default, rename = "metric")]
    pub metrics: Vec<MetricSpec>,
    /// Faults, on a schedule from time zero.
    #[serde(default, rename = "fault")]
    pub faults: Vec<FaultSpec>,
}

/// A datacenter.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DcSpec {
    /// Its name.
    pub name: String,
    /// Link between any two of its nodes (each ordered pair its own), link-config text.
    #[serde(default = "perfect")]
    pub intra: String,
}

/// The link between two datacenters.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WanSpec {
    /// The two datacenters.
    pub between: [String; 2],
    /// From the first to the second, link-config text.
    pub link: String,
    /// From the second to the first; default: the same as `link`.
    #[serde(default)]
    pub reverse: Option<String>,
}

/// A node: one process in its own namespace.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// Its name (letters, digits, `-`, `_`; at most 24).
    pub name: String,
    /// Its datacenter.
    pub dc: String,
    /// Command template, run with `sh -c` inside the node's namespace.
    pub command: String,
    /// A regex; the node is ready when a line of its output matches. Services only.
    #[serde(default)]
    pub ready: Option<String>,
    /// Makes the node part of the workload: `"exit"` (it completes by exiting with status 0) or a
    /// regex on its output.
    #[serde(default)]
    pub done: Option<String>,
    /// Workload nodes: start this long after time zero.
    #[serde(default)]
    pub start_after: Option<String>,
    /// Extra environment (values are templates too).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
}

/// A number to collect from nodes at the end.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MetricSpec {
    /// Its name in the report.
    pub name: String,
    /// The nodes to collect from; empty: every node.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// `"output"` (the last line of the node's output that matches; its first group is the
    /// value) or an `http://HOST:PORT/PATH` template fetched from inside the node's namespace
    /// (every matching line's first group, summed — so a Prometheus counter with several label
    /// sets adds up).
    pub source: String,
    /// A regex with one capture group holding a number.
    pub regex: String,
}

/// A fault at a time.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// When, from time zero.
    pub at: String,
    /// Kill this node's process group.
    #[serde(default)]
    pub kill: Option<String>,
    /// Cut both directions between these two datacenters for `for`.
    #[serde(default)]
    pub partition: Option<[String; 2]>,
    /// How long a partition lasts.
    #[serde(default, rename = "for")]
    pub duration: Option<String>,
}

/// Why a scenario could not be loaded or run.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a valid scenario.
    #[error("invalid scenario: {0}")]
    Invalid(String),
    /// A template names something that does not exist.
    #[error("in {template:?}: {why}")]
    Template {
        /// The template.
        template: String,
        /// What is wrong.
        why: String,
    },
    /// A setup command failed.
    #[error("setup command {command:?} failed: {why}")]
    Setup {
        /// The command.
        command: String,
        /// Its status and output.
        why: String,
    },
    /// A service did not become ready.
    #[error("node {node} did not become ready: {why}")]
    NotReady {
        /// The node.
        node: String,
        /// What happened instead.
        why: String,
    },
    /// Building the topology failed.
    #[error(transparent)]
    Tun(#[from] crate::tun::TunError),
    /// A namespace operation failed.
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    /// Writing the results or logs failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A process could not be started.
    #[error("cannot start node {node}: {source}")]
    Spawn {
        /// The node.
        node: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

/// A loaded, checked scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    file: ScenarioFile,
    timeout: Duration,
    nodes: Vec<NodeCheck>,
    metrics: Vec<Regex>,
    faults: Vec<Fault>,
    plan: LinkPlan,
}

/// What a run produced; `result.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// The scenario's name.
    pub name: String,
    /// Its seed.
    pub seed: u64,
    /// Every node.
    pub nodes: Vec<NodeResult>,
    /// Every fault, when it was applied.
    pub faults: Vec<FaultResult>,
    /// Every metric.
    pub metrics: Vec<MetricResult>,
    /// Seconds from time zero until the last workload node completed (or the run stopped).
    pub workload_s: f64,
    /// True if every workload node completed.
    pub all_done: bool,
    /// What the links did.
    pub links: SwitchStats,
}

/// One node in the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeResult {
    /// Name.
    pub name: String,
    /// Datacenter.
    pub dc: String,
    /// Address.
    pub addr: Ipv4Addr,
    /// `service` or `workload`.
    pub role: String,
    /// `done`, `failed`, `killed`, `timeout` (workload), or `running`, `exited`, `killed`
    /// (services).
    pub status: String,
    /// Seconds from time zero it was started (negative for services).
    pub started_s: Option<f64>,
    /// When its `ready` line came.
    pub ready_s: Option<f64>,
    /// When it completed (workload).
    pub done_s: Option<f64>,
    /// Its exit code, if it exited.
    pub exit_code: Option<i32>,
}

/// One fault in the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultResult {
    /// What it was.
    pub what: String,
    /// When it was due.
    pub at_s: f64,
    /// When it was applied (`None`: the run ended first).
    pub applied_s: Option<f64>,
}

/// One metric in the result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricResult {
    /// Its name.
    pub name: String,
    /// Value per node that had one.
    pub per_node: BTreeMap<String, f64>,
    /// Their sum.
    pub total: f64,
    /// Nodes without a value, and why.
    pub missing: BTreeMap<String, String>,
}

#[derive(Debug, Clone)]
struct NodeCheck {
    addr: Ipv4Addr,
    ready: Option<Regex>,
    done: Done,
    start_after: Duration,
}

#[derive(Debug, Clone)]
enum Done {
    /// A service.
    Never,
    Exit,
    Line(Regex),
}

#[derive(Debug, Clone)]
struct Fault {
    at: Duration,
    action: FaultAction,
}

#[derive(Debug, Clone)]
enum FaultAction {
    Kill(usize),
    Partition(String, String, Duration),
}

impl Scenario {
    /// Reads and checks a scenario file.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let read_error = |source| ScenarioError::Read {
            path: path.to_owned(),
            source,
        };
        let len = std::fs::metadata(path).map_err(read_error)?.len();
        if len > MAX_FILE_BYTES {
            return Err(ScenarioError::Invalid(format!(
                "{} is {len} bytes, more than {MAX_FILE_BYTES}",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        Self::parse(&text)
    }

    /// Parses and checks scenario text.
    pub fn parse(text: &str) -> Result<Self, ScenarioError> {
        let file: ScenarioFile =
            toml::from_str(text).map_err(|e| ScenarioError::Invalid(e.to_string()))?;
        Self::check(file)
    }

    /// The scenario as written.
    pub fn file(&self) -> &ScenarioFile {
        &self.file
    }

    fn check(file: ScenarioFile) -> Result<Self, ScenarioError> {
        let invalid = |s: String| ScenarioError::Invalid(s);
        if file.dcs.is_empty() || file.dcs.len() > MAX_DCS {
            return Err(invalid(format!("1 to {MAX_DCS} datacenters needed")));
        }
        if file.nodes.is_empty() || file.nodes.len() > MAX_NODES {
            return Err(invalid(format!("1 to {MAX_NODES} nodes needed")));
        }
        if file.faults.len() > MAX_FAULTS || file.metrics.len() > MAX_FAULTS {
            return Err(invalid(format!("at most {MAX_FAULTS} faults and metrics")));
        }
        let mut plan = LinkPlan {
            default_inter: link(&file.default_wan, "default_wan")?,
            ..LinkPlan::default()
        };
        for (i, dc) in file.dcs.iter().enumerate() {
            check_name(&dc.name, "datacenter")?;
            if file.dcs[..i].iter().any(|d| d.name == dc.name) {
                return Err(invalid(format!("datacenter {} twice", dc.name)));
            }
            plan.intra.insert(
                dc.name.clone(),
                link(&dc.intra, &format!("{}.intra", dc.name))?,
            );
        }
        let dc_index = |name: &str| {
            file.dcs
                .iter()
                .position(|d| d.name == name)
                .ok_or_else(|| invalid(format!("no datacenter {name}")))
        };
        for w in &file.wan {
            let [a, b] = &w.between;
            dc_index(a)?;
            dc_index(b)?;
            if a == b {
                return Err(invalid(format!("wan between {a} and itself")));
            }
            let forward = link(&w.link, &format!("wan {a}-{b}"))?;
            let back = match &w.reverse {
                Some(r) => link(r, &format!("wan {b}-{a}"))?,
                None => forward.clone(),
            };
            plan.inter.insert((a.clone(), b.clone()), forward);
            plan.inter.insert((b.clone(), a.clone()), back);
        }
        let mut per_dc = vec![0usize; file.dcs.len()];
        let mut nodes = Vec::with_capacity(file.nodes.len());
        for (i, n) in file.nodes.iter().enumerate() {
            check_name(&n.name, "node")?;
            if file.nodes[..i].iter().any(|m| m.name == n.name) {
                return Err(invalid(format!("node {} twice", n.name)));
            }
            let d = dc_index(&n.dc)?;
            per_dc[d] += 1;
            if per_dc[d] > MAX_NODES_PER_DC {
                return Err(invalid(format!(
                    "more than {MAX_NODES_PER_DC} nodes in {}",
                    n.dc
                )));
            }
            let ready = n.ready.as_deref().map(|r| regex(r, &n.name)).transpose()?;
            let done = match n.done.as_deref() {
                None => Done::Never,
                Some("exit") => Done::Exit,
                Some(r) => Done::Line(regex(r, &n.name)?),
            };
            let start_after = match &n.start_after {
                Some(t) => duration(t)?,
                None => Duration::ZERO,
            };
            nodes.push(NodeCheck {
                addr: Ipv4Addr::new(10, 80, (d + 1) as u8, per_dc[d] as u8),
                ready,
                done,
                start_after,
            });
        }
        if !nodes.iter().any(|n| !matches!(n.done, Done::Never)) {
            return Err(invalid("no workload: give at least one node `done`".into()));
        }
        let node_index = |name: &str| {
            file.nodes
                .iter()
                .position(|n| n.name == name)
                .ok_or_else(|| invalid(format!("no node {name}")))
        };
        let mut metrics = Vec::new();
        for m in &file.metrics {
            for n in &m.nodes {
                node_index(n)?;
            }
            if m.source != "output" && !m.source.starts_with("http://") {
                return Err(invalid(format!(
                    "metric {}: source must be \"output\" or an http:// URL",
                    m.name
                )));
            }
            metrics.push(regex(&m.regex, &m.name)?);
        }
        let mut faults = Vec::new();
        for f in &file.faults {
            let at = duration(&f.at)?;
            let action = match (&f.kill, &f.partition, &f.duration) {
                (Some(node), None, None) => FaultAction::Kill(node_index(node)?),
                (None, Some([a, b]), Some(d)) => {
                    dc_index(a)?;
                    dc_index(b)?;
                    FaultAction::Partition(a.clone(), b.clone(), duration(d)?)
                }
                _ => {
                    return Err(invalid(format!(
                        "fault at {}: give `kill = NODE`, or `partition = [DC, DC]` with `for`",
                        f.at
                    )))
                }
            };
            faults.push(Fault { at, action });
        }
        Ok(Self {
            timeout: duration(&file.timeout)?,
            file,
            nodes,
            metrics,
            faults,
            plan,
        })
    }

    /// Runs the scenario (root), writing everything under `out`.
    pub async fn run(&self, out: &Path) -> Result<ScenarioResult, ScenarioError> {
        Runner::new(self, out)?.run().await
    }
}

fn default_timeout() -> String {
    DEFAULT_TIMEOUT.to_owned()
}

fn perfect() -> String {
    "none".to_owned()
}

fn link(text: &str, what: &str) -> Result<LinkConfig, ScenarioError> {
    text.parse()
        .map_err(|e| ScenarioError::Invalid(format!("{what}: {e}")))
}

fn regex(text: &str, what: &str) -> Result<Regex, ScenarioError> {
    Regex::new(text).map_err(|e| ScenarioError::Invalid(format!("{what}: regex {text:?}: {e}")))
}

fn check_name(name: &str, what: &str) -> Result<(), ScenarioError> {
    let ok = !name.is_empty()
        && name.len() <= 24
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(ScenarioError::Invalid(format!(
            "{what} name {name:?}: letters, digits, - and _, at most 24"
        )))
    }
}

/// `250ms`, `5s`, `1.5s`, `2min`.
pub fn duration(text: &str) -> Result<Duration, ScenarioError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| ScenarioError::Invalid(format!("duration {text:?}")))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "s" | "" => value,
        "min" | "m" => value * 60.0,
        _ => {
            return Err(ScenarioError::Invalid(format!(
                "duration {text:?}: unit ms, s or min"
            )))
        }
    };
    Duration::try_from_secs_f64(secs)
        .ok()
        .filter(|d| *d <= Duration::from_secs(86_400))
        .ok_or_else(|| ScenarioError::Invalid(format!("duration {text:?}")))
}

/// What the output readers and exit watchers report.
#[derive(Debug)]
enum Event {
    Ready(usize, HashMap<String, String>),
    Done(usize),
    Exited(usize, Option<i32>),
}

/// A node's live state, shared with its output readers.
#[derive(Debug, Default)]
struct Live {
    /// Last value seen per metric index, for `source = "output"`.
    metric_values: HashMap<usize, f64>,
    ready_seen: bool,
    done_seen: bool,
}

struct Runner<'a> {
    sc: &'a Scenario,
    out: PathBuf,
    prefix: String,
    captures: HashMap<String, HashMap<String, String>>,
    results: Vec<NodeResult>,
    pgids: Vec<Option<u32>>,
    live: Vec<Arc<Mutex<Live>>>,
    killed: Vec<bool>,
}

impl<'a> Runner<'a> {
    fn new(sc: &'a Scenario, out: &Path) -> Result<Self, ScenarioError> {
        let n = sc.file.nodes.len();
        let results = sc
            .file
            .nodes
            .iter()
            .zip(&sc.nodes)
            .map(|(spec, check)| NodeResult {
                name: spec.name.clone(),
                dc: spec.dc.clone(),
                addr: check.addr,
                role: if matches!(check.done, Done::Never) {
                    "service".into()
                } else {
                    "workload".into()
                },
                status: "not started".into(),
                started_s: None,
                ready_s: None,
                done_s: None,
                exit_code: None,
            })
            .collect();
        Ok(Self {
            sc,
            out: out.to_owned(),
            prefix: format!("nss{}-", std::process::id() % 100_000),
            captures: HashMap::new(),
            results,
            pgids: vec![None; n],
            live: (0..n).map(|_| Arc::default()).collect(),
            killed: vec![false; n],
        })
    }

    async fn run(mut self) -> Result<ScenarioResult, ScenarioError> {
        let nodes_dir = self.out.join("nodes");
        for spec in &self.sc.file.nodes {
            let d = nodes_dir.join(&spec.name);
            std::fs::create_dir_all(&d).map_err(|source| ScenarioError::Write {
                path: d.clone(),
                source,
            })?;
        }
        self.setup().await?;
        let mut made = Vec::new();
        for spec in &self.sc.file.nodes {
            made.push(OwnedNetns::create(&format!(
                "{}{}",
                self.prefix, spec.name
            ))?);
        }
        let ports = self
            .sc
            .file
            .nodes
            .iter()
            .zip(&self.sc.nodes)
            .map(|(spec, check)| PortSpec {
                name: spec.name.clone(),
                netns: format!("{}{}", self.prefix, spec.name),
                ifname: IFNAME.into(),
                addr: check.addr,
                prefix_len: 16,
                group: spec.dc.clone(),
            })
            .collect();
        let switch = Switch::start(SwitchConfig {
            ports,
            plan: self.sc.plan.clone(),
            seed: self.sc.file.seed,
            mtu: DEFAULT_MTU,
        })
        .await?;
        let result = self.drive(&switch).await;
        self.stop_all().await;
        let stats = switch.handle().stats();
        drop(switch);
        drop(made);
        let mut result = result?;
        result.links = stats;
        self.write_outputs(&result)?;
        Ok(result)
    }

    /// Services, time zero, workload and faults, metrics.
    async fn drive(&mut self, switch: &Switch) -> Result<ScenarioResult, ScenarioError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let clock = Instant::now();
        let sc = self.sc;
        // Services, in order, each waited for.
        for i in 0..sc.nodes.len() {
            if !matches!(sc.nodes[i].done, Done::Never) {
                continue;
            }
            self.spawn(i, &tx)?;
            self.results[i].started_s = Some(-clock.elapsed().as_secs_f64());
            if sc.nodes[i].ready.is_none() {
                continue;
            }
            let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
            loop {
                let event = tokio::time::timeout_at(deadline, rx.recv()).await;
                match event {
                    Ok(Some(Event::Ready(j, caps))) => {
                        self.captures.insert(sc.file.nodes[j].name.clone(), caps);
                        self.results[j].ready_s = Some(-clock.elapsed().as_secs_f64());
                        if j == i {
                            break;
                        }
                    }
                    Ok(Some(Event::Exited(j, code))) => {
                        self.results[j].exit_code = code;
                        self.results[j].status = "exited".into();
                        if j == i {
                            return Err(ScenarioError::NotReady {
                                node: sc.file.nodes[i].name.clone(),
                                why: format!(
                                    "it exited ({code:?}); see {}",
                                    self.out
                                        .join("nodes")
                                        .join(&sc.file.nodes[i].name)
                                        .display()
                                ),
                            });
                        }
                    }
                    Ok(Some(Event::Done(_))) => {}
                    Ok(None) => unreachable_channel(),
                    Err(_) => {
                        return Err(ScenarioError::NotReady {
                            node: sc.file.nodes[i].name.clone(),
                            why: format!("no line matched `ready` within {READY_TIMEOUT:?}"),
                        })
                    }
                }
            }
            self.results[i].status = "running".into();
        }
        // Service ready times are relative to the start so far; shift to time zero below.
        let t0 = Instant::now();
        let shift = t0.duration_since(clock).as_secs_f64();
        for r in &mut self.results {
            for v in [&mut r.started_s, &mut r.ready_s].into_iter().flatten() {
                *v = -(shift + *v);
            }
        }
        // The schedule: workload starts and faults, by time.
        let mut schedule: Vec<(Duration, Step)> = Vec::new();
        for (i, n) in sc.nodes.iter().enumerate() {
            if !matches!(n.done, Done::Never) {
                schedule.push((n.start_after, Step::Start(i)));
            }
        }
        for (k, f) in sc.faults.iter().enumerate() {
            schedule.push((f.at, Step::Fault(k)));
        }
        schedule.sort_by_key(|s| s.0);
        let mut faults: Vec<FaultResult> = sc
            .faults
            .iter()
            .map(|f| FaultResult {
                what: match &f.action {
                    FaultAction::Kill(i) => format!("kill {}", sc.file.nodes[*i].name),
                    FaultAction::Partition(a, b, d) => format!("partition {a} {b} for {d:?}"),
                },
                at_s: f.at.as_secs_f64(),
                applied_s: None,
            })
            .collect();
        let workload: Vec<usize> = (0..sc.nodes.len())
            .filter(|&i| !matches!(sc.nodes[i].done, Done::Never))
            .collect();
        let deadline = tokio::time::Instant::from_std(t0 + sc.timeout);
        let mut next = 0;
        let since = |t0: Instant| t0.elapsed().as_secs_f64();
        loop {
            let finished = workload.iter().all(|&i| {
                let s = self.results[i].status.as_str();
                s == "done" || s == "failed" || s == "killed"
            });
            if finished {
                break;
            }
            let wake = schedule
                .get(next)
                .map(|(at, _)| tokio::time::Instant::from_std(t0 + *at))
                .unwrap_or(deadline)
                .min(deadline);
            tokio::select! {
                _ = tokio::time::sleep_until(wake) => {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    while let Some((at, step)) = schedule.get(next) {
                        if t0 + *at > Instant::now() {
                            break;
                        }
                        match *step {
                            Step::Start(i) => {
                                self.spawn(i, &tx)?;
                                self.results[i].started_s = Some(since(t0));
                                self.results[i].status = "running".into();
                            }
                            Step::Fault(k) => {
                                self.apply(&sc.faults[k].action, switch).await;
                                faults[k].applied_s = Some(since(t0));
                            }
                        }
                        next += 1;
                    }
                }
                event = rx.recv() => {
                    let Some(event) = event else { unreachable_channel() };
                    let now = since(t0);
                    match event {
                        Event::Ready(j, caps) => {
                            self.captures.insert(sc.file.nodes[j].name.clone(), caps);
                            self.results[j].ready_s.get_or_insert(now);
                        }
                        Event::Done(j) => {
                            if self.results[j].status == "running" {
                                self.results[j].status = "done".into();
                                self.results[j].done_s = Some(now);
                            }
                        }
                        Event::Exited(j, code) => self.exited(j, code, now),
                    }
                }
            }
        }
        let end = since(t0);
        for &i in &workload {
            if self.results[i].status == "running" || self.results[i].status == "not started" {
                self.results[i].status = "timeout".into();
            }
        }
        // Let exits that raced the end land before reading statuses of services.
        while let Ok(event) = rx.try_recv() {
            if let Event::Exited(j, code) = event {
                self.exited(j, code, end);
            }
        }
        let workload_s = workload
            .iter()
            .filter_map(|&i| self.results[i].done_s)
            .fold(0.0, f64::max);
        let all_done = workload.iter().all(|&i| self.results[i].status == "done");
        let metrics = self.collect_metrics().await;
        Ok(ScenarioResult {
            name: sc.file.name.clone(),
            seed: sc.file.seed,
            nodes: self.results.clone(),
            faults,
            metrics,
            workload_s: if all_done { workload_s } else { end },
            all_done,
            links: SwitchStats::default(),
        })
    }

    fn exited(&mut self, j: usize, code: Option<i32>, now: f64) {
        let r = &mut self.results[j];
        r.exit_code = code;
        self.pgids[j] = None;
        let workload = r.role == "workload";
        if self.killed[j] {
            if r.status != "done" {
                r.status = "killed".into();
            }
        } else if workload && r.status == "running" {
            if matches!(self.sc.nodes[j].done, Done::Exit) && code == Some(0) {
                r.status = "done".into();
                r.done_s = Some(now);
            } else {
                r.status = "failed".into();
            }
        } else if !workload {
            r.status = "exited".into();
        }
    }

    async fn apply(&mut self, action: &FaultAction, switch: &Switch) {
        match action {
            FaultAction::Kill(i) => {
                self.killed[*i] = true;
                if let Some(pgid) = self.pgids[*i] {
                    signal_group(pgid, true);
                }
                tracing::info!(node = %self.sc.file.nodes[*i].name, "fault: kill");
            }
            FaultAction::Partition(a, b, d) => {
                if let Err(e) = switch.handle().partition_groups(a, b, *d) {
                    tracing::warn!(error = %e, "fault: partition failed");
                }
                tracing::info!(%a, %b, duration = ?d, "fault: partition");
            }
        }
    }

    /// Host-side setup commands, in order.
    async fn setup(&self) -> Result<(), ScenarioError> {
        let log_path = self.out.join("setup.log");
        let mut log = std::fs::File::create(&log_path).map_err(|source| ScenarioError::Write {
            path: log_path.clone(),
            source,
        })?;
        for template in &self.sc.file.setup {
            let command = self.expand(template, None)?;
            let _ = writeln!(log, "$ {command}");
            let child = Command::new("sh")
                .args(["-c", &command])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| ScenarioError::Setup {
                    command: command.clone(),
                    why: e.to_string(),
                })?;
            let out = tokio::time::timeout(SETUP_TIMEOUT, child.wait_with_output())
                .await
                .map_err(|_| ScenarioError::Setup {
                    command: command.clone(),
                    why: format!("not done within {SETUP_TIMEOUT:?}"),
                })?
                .map_err(|e| ScenarioError::Setup {
                    command: command.clone(),
                    why: e.to_string(),
                })?;
            let _ = log.write_all(&out.stdout);
            let _ = log.write_all(&out.stderr);
            if !out.status.success() {
                return Err(ScenarioError::Setup {
                    command,
                    why: format!(
                        "{}: {}",
                        out.status,
                        String::from_utf8_lossy(&out.stderr).trim()
                    ),
                });
            }
        }
        Ok(())
    }

    /// Starts node `i` in its namespace, in its own process group, with its output watched.
    fn spawn(&mut self, i: usize, tx: &mpsc::UnboundedSender<Event>) -> Result<(), ScenarioError> {
        let spec = &self.sc.file.nodes[i];
        let command = self.expand(&spec.command, Some(i))?;
        let dir = self.out.join("nodes").join(&spec.name);
        let _ = std::fs::write(dir.join("command.txt"), format!("{command}\n"));
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &format!("{}{}", self.prefix, spec.name)])
            .args(["sh", "-c", &command])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for (k, v) in &spec.env {
            cmd.env(k, self.expand(v, Some(i))?);
        }
        let mut child = cmd.spawn().map_err(|source| ScenarioError::Spawn {
            node: spec.name.clone(),
            source,
        })?;
        self.pgids[i] = child.id();
        let watch = Watch {
            node: i,
            ready: self.sc.nodes[i].ready.clone(),
            done: match &self.sc.nodes[i].done {
                Done::Line(r) => Some(r.clone()),
                _ => None,
            },
            metrics: self
                .sc
                .file
                .metrics
                .iter()
                .zip(&self.sc.metrics)
                .enumerate()
                .filter(|(_, (m, _))| {
                    m.source == "output" && (m.nodes.is_empty() || m.nodes.contains(&spec.name))
                })
                .map(|(k, (_, r))| (k, r.clone()))
                .collect(),
            live: self.live[i].clone(),
            tx: tx.clone(),
        };
        if let Some(stdout) = child.stdout.take() {
            tokio::spawn(watch.clone().read(stdout, dir.join("stdout.log")));
        }
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(watch.read(stderr, dir.join("stderr.log")));
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let code = child.wait().await.ok().and_then(|s| s.code());
            let _ = tx.send(Event::Exited(i, code));
        });
        Ok(())
    }

    /// SIGTERM to every group still running, SIGKILL to what is left after [`STOP_GRACE`].
    async fn stop_all(&mut self) {
        let running: Vec<u32> = self.pgids.iter().flatten().copied().collect();
        for &pgid in &running {
            signal_group(pgid, false);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline
            && running
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for &pgid in &running {
            signal_group(pgid, true);
        }
        self.pgids.iter_mut().for_each(|p| *p = None);
        // Give the reaper tasks a moment so the namespaces are free to go.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    async fn collect_metrics(&self) -> Vec<MetricResult> {
        let mut out = Vec::new();
        for (k, m) in self.sc.file.metrics.iter().enumerate() {
            let mut result = MetricResult {
                name: m.name.clone(),
                per_node: BTreeMap::new(),
                total: 0.0,
                missing: BTreeMap::new(),
            };
            for (i, spec) in self.sc.file.nodes.iter().enumerate() {
                if !(m.nodes.is_empty() || m.nodes.contains(&spec.name)) {
                    continue;
                }
                let value = if m.source == "output" {
                    let live = self.live[i].lock().unwrap_or_else(PoisonError::into_inner);
                    live.metric_values
                        .get(&k)
                        .copied()
                        .ok_or_else(|| "no output line matched".to_owned())
                } else {
                    match self.expand(&m.source, Some(i)) {
                        Ok(url) => {
                            let ns = format!("{}{}", self.prefix, spec.name);
                            let re = self.sc.metrics[k].clone();
                            tokio::task::spawn_blocking(move || scrape_sum(&ns, &url, &re))
                                .await
                                .unwrap_or_else(|e| Err(e.to_string()))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                };
                match value {
                    Ok(v) => {
                        result.total += v;
                        result.per_node.insert(spec.name.clone(), v);
                    }
                    Err(why) => {
                        result.missing.insert(spec.name.clone(), why);
                    }
                }
            }
            out.push(result);
        }
        out
    }

    /// Expands a template; `me` is the node it belongs to, if any.
    fn expand(&self, template: &str, me: Option<usize>) -> Result<String, ScenarioError> {
        let err = |why: String| ScenarioError::Template {
            template: template.to_owned(),
            why,
        };
        let node = |name: &str| {
            self.sc
                .file
                .nodes
                .iter()
                .position(|n| n.name == name)
                .ok_or_else(|| err(format!("no node {name}")))
        };
        let dir = |i: usize| {
            self.out
                .join("nodes")
                .join(&self.sc.file.nodes[i].name)
                .display()
                .to_string()
        };
        let mut out = String::with_capacity(template.len());
        let mut rest = template;
        while let Some(pos) = rest.find(['{', '}']) {
            out.push_str(&rest[..pos]);
            let tail = &rest[pos..];
            if tail.starts_with("{{") || tail.starts_with("}}") {
                out.push_str(&tail[..1]);
                rest = &tail[2..];
                continue;
            }
            if tail.starts_with('}') {
                return Err(err("unmatched }".into()));
            }
            let end = tail.find('}').ok_or_else(|| err("unclosed {".into()))?;
            let key = &tail[1..end];
            rest = &tail[end + 1..];
            let (kind, arg) = key.split_once(':').unwrap_or((key, ""));
            let value = match (kind, arg) {
                ("out", "") => self.out.display().to_string(),
                ("node", "") | ("dc", "") | ("addr", "") | ("dir", "") => {
                    let i = me.ok_or_else(|| err(format!("{{{kind}}} outside a node")))?;
                    match kind {
                        "node" => self.sc.file.nodes[i].name.clone(),
                        "dc" => self.sc.file.nodes[i].dc.clone(),
                        "addr" => self.sc.nodes[i].addr.to_string(),
                        _ => dir(i),
                    }
                }
                ("addr", name) => self.sc.nodes[node(name)?].addr.to_string(),
                ("dir", name) => dir(node(name)?),
                ("var", name) => self
                    .sc
                    .file
                    .vars
                    .get(name)
                    .cloned()
                    .ok_or_else(|| err(format!("no var {name}")))?,
                ("env", name) => {
                    std::env::var(name).map_err(|_| err(format!("environment has no {name}")))?
                }
                ("cap", what) => {
                    let (n, group) = what
                        .split_once('.')
                        .ok_or_else(|| err("{cap:NODE.GROUP}".into()))?;
                    node(n)?;
                    self.captures
                        .get(n)
                        .and_then(|c| c.get(group))
                        .cloned()
                        .ok_or_else(|| {
                            err(format!("node {n} has no ready capture {group} (yet)"))
                        })?
                }
                _ => return Err(err(format!("unknown placeholder {{{key}}}"))),
            };
            out.push_str(&value);
        }
        out.push_str(rest);
        Ok(out)
    }

    fn write_outputs(&self, result: &ScenarioResult) -> Result<(), ScenarioError> {
        let write = |name: &str, bytes: &[u8]| {
            let path = self.out.join(name);
            std::fs::write(&path, bytes).map_err(|source| ScenarioError::Write { path, source })
        };
        let json = serde_json::to_vec_pretty(result).unwrap_or_default();
        write("result.json", &json)?;
        write("summary.txt", summary(result).as_bytes())?;
        write(
            "completion.svg",
            completion_chart(result).to_svg().as_bytes(),
        )?;
        Ok(())
    }
}

impl Drop for Runner<'_> {
    /// A run abandoned midway (its future dropped on Ctrl-C) still stops what it started.
    fn drop(&mut self) {
        for pgid in self.pgids.iter().flatten() {
            signal_group(*pgid, true);
        }
    }
}

enum Step {
    Start(usize),
    Fault(usize),
}

fn unreachable_channel() -> ! {
    // The runner holds a sender for as long as it receives, so the channel cannot close.
    unreachable!("event channel closed while the runner holds a sender")
}

/// Signals the process group `pgid` (a node this runner started); SIGKILL if `kill`.
fn signal_group(pgid: u32, kill: bool) {
    if let Err(e) = netns::signal_group(pgid, kill) {
        tracing::debug!(pgid, error = %e, "signal failed (already gone?)");
    }
}

/// Watches one output stream of one node.
#[derive(Clone)]
struct Watch {
    node: usize,
    ready: Option<Regex>,
    done: Option<Regex>,
    metrics: Vec<(usize, Regex)>,
    live: Arc<Mutex<Live>>,
    tx: mpsc::UnboundedSender<Event>,
}

impl Watch {
    /// Copies the stream to `log` and matches each line (cut at [`MAX_LINE_BYTES`]).
    async fn read(self, mut stream: impl AsyncRead + Unpin, log: PathBuf) {
        let mut file = std::fs::File::create(&log).ok();
        let mut buf = vec![0u8; 16 << 10];
        let mut line: Vec<u8> = Vec::new();
        let mut overlong = false;
        loop {
            let n = match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Some(f) = file.as_mut() {
                let _ = f.write_all(&buf[..n]);
            }
            for &b in &buf[..n] {
                if b == b'\n' {
                    self.line(&line);
                    line.clear();
                    overlong = false;
                } else if line.len() < MAX_LINE_BYTES {
                    line.push(b);
                } else if !overlong {
                    overlong = true;
                }
            }
        }
        if !line.is_empty() {
            self.line(&line);
        }
    }

    fn line(&self, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let text = text.trim_end_matches('\r');
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(re) = &self.ready {
            if !live.ready_seen {
                let mut caps = re.create_captures();
                re.captures(text, &mut caps);
                if caps.is_match() {
                    live.ready_seen = true;
                    let mut named = HashMap::new();
                    let names = re
                        .group_info()
                        .pattern_names(regex_automata::PatternID::ZERO);
                    for (k, name) in names.enumerate() {
                        if let (Some(name), Some(span)) = (name, caps.get_group(k)) {
                            named.insert(name.to_owned(), text[span.range()].to_owned());
                        }
                    }
                    let _ = self.tx.send(Event::Ready(self.node, named));
                }
            }
        }
        if let Some(re) = &self.done {
            if !live.done_seen && re.is_match(text) {
                live.done_seen = true;
                let _ = self.tx.send(Event::Done(self.node));
            }
        }
        for (k, re) in &self.metrics {
            if let Some(v) = first_group_number(re, text) {
                live.metric_values.insert(*k, v);
            }
        }
    }
}

/// The number in the first capture group of `re`'s match in `text`.
fn first_group_number(re: &Regex, text: &str) -> Option<f64> {
    let mut caps = re.create_captures();
    re.captures(text, &mut caps);
    let span = caps.get_group(1)?;
    text[span.range()].trim().parse().ok()
}

/// GETs `url` (plain HTTP/1.0) from inside namespace `ns` and sums the first group of every
/// line `re` matches.
fn scrape_sum(ns: &str, url: &str, re: &Regex) -> Result<f64, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: not http://"))?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let addr: SocketAddr = host
        .parse()
        .map_err(|_| format!("{url}: the host must be IP:PORT"))?;
    let body = netns::run_in(ns, || -> std::io::Result<Vec<u8>> {
        let mut tcp = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)?;
        tcp.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
        tcp.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
        write!(tcp, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n")?;
        let mut raw = Vec::new();
        tcp.take(MAX_SCRAPE_BYTES).read_to_end(&mut raw)?;
        Ok(raw)
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("{url}: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("{url}: no end of the response head"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{url}: {status}"));
    }
    let mut sum = None;
    for line in body.lines() {
        if let Some(v) = first_group_number(re, line) {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum.ok_or_else(|| format!("{url}: no line matched"))
}

/// The readable table.
pub fn summary(r: &ScenarioResult) -> String {
    let mut s = String::new();
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let _ = writeln!(
        s,
        "scenario {:?} (seed {}): {} in {:.2} s\n",
        r.name,
        r.seed,
        if r.all_done {
            "every workload node completed"
        } else {
            "NOT every workload node completed"
        },
        r.workload_s
    );
    let _ = writeln!(
        s,
        "{:<16} {:<8} {:<12} {:<9} {:<9} {:>9} {:>9} {:>9} {:>5}",
        "node", "dc", "addr", "role", "status", "start s", "ready s", "done s", "exit"
    );
    for n in &r.nodes {
        let _ = writeln!(
            s,
            "{:<16} {:<8} {:<12} {:<9} {:<9} {:>9} {:>9} {:>9} {:>5}",
            n.name,
            n.dc,
            n.addr.to_string(),
            n.role,
            n.status,
            opt(n.started_s),
            opt(n.ready_s),
            opt(n.done_s),
            n.exit_code.map_or("-".into(), |c| c.to_string())
        );
    }
    if !r.faults.is_empty() {
        let _ = writeln!(s, "\nfaults:");
        for f in &r.faults {
            let _ = writeln!(
                s,
                "  at {:>7.2} s  {:<40} applied {}",
                f.at_s,
                f.what,
                f.applied_s
                    .map_or("never (the run ended first)".into(), |a| format!(
                        "at {a:.2} s"
                    ))
            );
        }
    }
    if !r.metrics.is_empty() {
        let _ = writeln!(s, "\nmetrics:");
        for m in &r.metrics {
            let _ = writeln!(s, "  {:<32} total {}", m.name, number(m.total));
            for (node, v) in &m.per_node {
                let _ = writeln!(s, "      {node:<20} {}", number(*v));
            }
            for (node, why) in &m.missing {
                let _ = writeln!(s, "      {node:<20} - ({why})");
            }
        }
    }
    let inter: Vec<_> = r.links.links.iter().filter(|l| l.kind == "inter").collect();
    if !inter.is_empty() {
        let _ = writeln!(s, "\nlinks between datacenters:");
        let _ = writeln!(
            s,
            "  {:<10} {:<10} {:>14} {:>10} {:>10} {:>10} {:>10}",
            "from", "to", "bytes", "packets", "lost", "queue full", "cut"
        );
        for l in inter {
            let st = &l.stats;
            let _ = writeln!(
                s,
                "  {:<10} {:<10} {:>14} {:>10} {:>10} {:>10} {:>10}",
                l.from,
                l.to,
                st.delivered_bytes,
                st.delivered_packets,
                st.dropped.random_loss + st.dropped.burst_loss,
                st.dropped.queue_full,
                st.dropped.partition
            );
        }
    }
    s
}

fn number(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

/// Completion over time: a step per workload node (0 until it completes, then 1) and the
/// fraction of the workload done.
pub fn completion_chart(r: &ScenarioResult) -> Chart {
    let end = r
        .workload_s
        .max(r.nodes.iter().filter_map(|n| n.done_s).fold(0.0, f64::max));
    let workload: Vec<&NodeResult> = r.nodes.iter().filter(|n| n.role == "workload").collect();
    let mut series: Vec<Series> = workload
        .iter()
        .map(|n| {
            let mut points = vec![(0.0, 0.0)];
            if let Some(d) = n.done_s {
                points.push((d, 1.0));
            }
            points.push((end, if n.done_s.is_some() { 1.0 } else { 0.0 }));
            Series {
                name: format!("{} ({})", n.name, n.status),
                points,
                step: true,
                ..Series::default()
            }
        })
        .collect();
    let mut done: Vec<f64> = workload.iter().filter_map(|n| n.done_s).collect();
    done.sort_by(f64::total_cmp);
    let total = workload.len().max(1) as f64;
    let mut fraction = vec![(0.0, 0.0)];
    fraction.extend(
        done.iter()
            .enumerate()
            .map(|(k, &t)| (t, (k + 1) as f64 / total)),
    );
    fraction.push((end, done.len() as f64 / total));
    series.push(Series {
        name: "fraction done".into(),
        points: fraction,
        step: true,
        dashed: true,
        colour: Some(7),
    });
    Chart {
        title: format!("{}: completion over time", r.name),
        x_label: "seconds from time zero".into(),
        y_label: "completed".into(),
        series,
        y_min: Some(0.0),
        y_max: Some(1.05),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"
        name = "tiny"
        [[dc]]
        name = "a"
        [[dc]]
        name = "b"
        [[wan]]
        between = ["a", "b"]
        link = "delay=10ms"
        [[node]]
        name = "srv"
        dc = "a"
        command = "echo ready port=80; sleep 100"
        ready = "^ready port=(?P<port>\\d+)"
        [[node]]
        name = "cli"
        dc = "b"
        command = "echo {addr:srv}:{cap:srv.port} {var:x}"
        done = "exit"
        [vars]
        x = "y"
        [[fault]]
        at = "1s"
        partition = ["a", "b"]
        for = "2s"
    "#;

    #[test]
    fn parses_and_assigns_addresses_by_datacenter() {
        let sc = Scenario::parse(TINY).unwrap();
        assert_eq!(sc.nodes[0].addr, Ipv4Addr::new(10, 80, 1, 1));
        assert_eq!(sc.nodes[1].addr, Ipv4Addr::new(10, 80, 2, 1));
        assert_eq!(sc.plan.inter.len(), 2, "both directions");
        assert!(matches!(sc.nodes[1].done, Done::Exit));
        assert_eq!(sc.timeout, Duration::from_secs(600));
    }

    #[test]
    fn rejects_what_cannot_run() {
        for (bad, why) in [
            (TINY.replace("dc = \"b\"", "dc = \"c\""), "no datacenter"),
            (TINY.replace("done = \"exit\"", ""), "no workload"),
            (TINY.replace("for = \"2s\"", ""), "fault"),
            (TINY.replace("delay=10ms", "delay=lots"), "wan"),
            (TINY.replace("(?P<port>", "(?P<port"), "regex"),
            (TINY.replace("name = \"cli\"", "name = \"srv\""), "twice"),
            (TINY.replace("[vars]", "[nope]\n[vars]"), "nope"),
        ] {
            let e = Scenario::parse(&bad).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
        }
    }

    #[test]
    fn expands_placeholders() {
        let sc = Scenario::parse(TINY).unwrap();
        let mut r = Runner::new(&sc, Path::new("/tmp/o")).unwrap();
        let e = |r: &Runner<'_>, t: &str, me| r.expand(t, me).map_err(|e| e.to_string());
        assert!(e(&r, "{cap:srv.port}", None).unwrap_err().contains("yet"));
        r.captures
            .insert("srv".into(), HashMap::from([("port".into(), "80".into())]));
        assert_eq!(
            e(&r, &sc.file.nodes[1].command, Some(1)).unwrap(),
            "echo 10.80.1.1:80 y"
        );
        assert_eq!(
            e(&r, "{{x}} {node}@{dc} {dir} {out}", Some(1)).unwrap(),
            "{x} cli@b /tmp/o/nodes/cli /tmp/o"
        );
        assert!(e(&r, "{addr}", None).is_err());
        assert!(e(&r, "{what:ever}", None).is_err());
        assert!(e(&r, "{addr:nobody}", None).is_err());
        assert!(e(&r, "{open", None).is_err());
    }

    #[test]
    fn parses_durations() {
        assert_eq!(duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(duration("2min").unwrap(), Duration::from_secs(120));
        assert!(duration("soon").is_err());
        assert!(duration("5h").is_err());
    }

    #[test]
    fn reads_numbers_from_lines() {
        let re = Regex::new(r#"^x_total\{source="origin"\} (\S+)"#).unwrap();
        assert_eq!(
            first_group_number(&re, r#"x_total{source="origin"} 1024"#),
            Some(1024.0)
        );
        assert_eq!(first_group_number(&re, r#"x_total{source="peer"} 1"#), None);
    }
}
