//! Rate-limited links between network namespaces, for the swarm benchmark: one namespace per
//! node, each joined to a bridge in a hub namespace by a veth pair, MTU 1500, with a `tbf` on both
//! ends of the pair — the node's end shapes what the node sends (its upload), the hub's end what
//! it receives (its download).
//!
//! Nothing is made in the caller's namespace: each veth pair is created inside the hub with its
//! other end placed straight into the node's namespace, and the addresses (one private /24,
//! [`SUBNET`]) exist only on the nodes' interfaces. Every namespace is named with [`PREFIX`], so
//! [`cleanup`] finds and removes what a crashed run left behind.
//!
//! Not for impairments beyond rate (no delay, no loss: this machine's kernel has no netem), and
//! it knows nothing of d7q.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

/// Every namespace this module makes starts with this.
pub const PREFIX: &str = "d7qb-";

/// The namespace holding the bridge.
const HUB: &str = "d7qb-hub";

/// The bridge in the hub.
const BRIDGE: &str = "br0";

/// The node's end of its veth pair, inside the node's namespace.
const NODE_IF: &str = "eth0";

/// The first three octets of the nodes' /24; the hub itself has no address.
const SUBNET: [u8; 3] = [10, 77, 0];

/// The link MTU, as on an Ethernet LAN (loopback's 64 KiB flatters TCP).
pub const MTU: u32 = 1500;

/// The smallest `tbf` bucket: ten full frames, so a burst never splits one.
const MIN_BURST: u64 = 16 << 10;

/// The `tbf` bucket holds this many seconds of the rate (2 ms): enough that the kernel's timer
/// keeps up, small enough that the rate holds over any interval that matters.
const BURST_SECS: f64 = 0.002;

/// A node's link rates, bits per second (`tc`'s units: 1 mbit = 10^6 bit).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Rates {
    /// What the node sends.
    pub up_bps: u64,
    /// What the node receives.
    pub down_bps: u64,
}

/// One node to create.
pub struct NodeSpec {
    /// Short name (`origin`, `sn`, `p3`): the namespace is [`PREFIX`] + name, the hub's end of
    /// its veth pair is the name itself (so at most 15 bytes).
    pub name: String,
    /// The last octet of its address.
    pub host: u8,
    /// Its link.
    pub rates: Rates,
}

/// The `tbf` settings every link uses, for the record.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct TbfParams {
    /// Queue limit, as `tbf`'s `latency`: the longest a packet may wait.
    pub queue_ms: u64,
    /// Bucket size in bytes, for the slowest link (it scales with the rate).
    pub burst_bytes_min: u64,
}

/// Bytes that crossed a node's link and packets its two queues dropped, since the link was made.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct LinkCounters {
    /// Bytes the node sent (Ethernet frames, as `tbf` counts them).
    pub up_bytes: u64,
    /// Bytes the node received.
    pub down_bytes: u64,
    /// Packets dropped by the upload queue (the node's own end).
    pub up_drops: u64,
    /// Packets dropped by the download queue (the hub's end).
    pub down_drops: u64,
}

impl LinkCounters {
    /// Growth since `earlier`.
    pub fn since(&self, earlier: &LinkCounters) -> LinkCounters {
        LinkCounters {
            up_bytes: self.up_bytes.saturating_sub(earlier.up_bytes),
            down_bytes: self.down_bytes.saturating_sub(earlier.down_bytes),
            up_drops: self.up_drops.saturating_sub(earlier.up_drops),
            down_drops: self.down_drops.saturating_sub(earlier.down_drops),
        }
    }
}

/// The namespaces, the bridge and the shaped links; all removed on [`Topology::teardown`] or
/// drop.
pub struct Topology {
    nodes: Vec<NodeSpec>,
    /// Namespaces made so far, hub first: what teardown removes.
    made: Vec<String>,
}

impl Topology {
    /// Makes the hub and every node. Fails if a namespace of an earlier run is still there; on
    /// any failure removes what it made.
    pub fn build(nodes: Vec<NodeSpec>, queue_ms: u64) -> Result<Self> {
        let stale = leftovers()?;
        if !stale.is_empty() {
            bail!(
                "namespaces of an earlier run exist ({}); remove them with `d7q-bench swarm \
                 --cleanup`",
                stale.join(" ")
            );
        }
        let mut topo = Topology {
            nodes: Vec::new(),
            made: Vec::new(),
        };
        ip(&["netns", "add", HUB])?;
        topo.made.push(HUB.to_owned());
        ip(&["-n", HUB, "link", "add", BRIDGE, "type", "bridge"])?;
        ip(&["-n", HUB, "link", "set", BRIDGE, "up"])?;
        for node in &nodes {
            topo.add_node(node, queue_ms)
                .with_context(|| format!("making node {}", node.name))?;
        }
        topo.nodes = nodes;
        Ok(topo)
    }

    /// The namespace of node `name`.
    pub fn netns(name: &str) -> String {
        format!("{PREFIX}{name}")
    }

    /// The address of node `name`.
    pub fn addr(&self, name: &str) -> Result<Ipv4Addr> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name}"))?;
        Ok(address(node.host))
    }

    /// A command running `program` inside node `name`'s namespace.
    pub fn command(name: &str, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", &Self::netns(name)]).arg(program);
        cmd
    }

    /// Every node's counters, by name: one `ip` and one `tc` call for the hub's ends, one `tc`
    /// call per node for its upload queue.
    pub fn counters(&self) -> Result<HashMap<String, LinkCounters>> {
        let links: Value = serde_json::from_str(&ip(&["-j", "-s", "-n", HUB, "link", "show"])?)?;
        let hub_qdiscs: Value =
            serde_json::from_str(&tc(&["-j", "-s", "-n", HUB, "qdisc", "show"])?)?;
        let mut out = HashMap::new();
        for node in &self.nodes {
            let link = find_by(&links, "ifname", &node.name)
                .with_context(|| format!("hub has no link {}", node.name))?;
            // The hub's end sends what the node receives, and receives what the node sends.
            let stat = |dir: &str| link["stats64"][dir]["bytes"].as_u64().unwrap_or(0);
            let down_drops = find_by(&hub_qdiscs, "dev", &node.name)
                .and_then(|q| q["drops"].as_u64())
                .unwrap_or(0);
            let own: Value = serde_json::from_str(&tc(&[
                "-j",
                "-s",
                "-n",
                &Self::netns(&node.name),
                "qdisc",
                "show",
                "dev",
                NODE_IF,
            ])?)?;
            let up_drops = own
                .as_array()
                .and_then(|a| a.iter().find(|q| q["kind"] == "tbf"))
                .and_then(|q| q["drops"].as_u64())
                .unwrap_or(0);
            out.insert(
                node.name.clone(),
                LinkCounters {
                    up_bytes: stat("rx"),
                    down_bytes: stat("tx"),
                    up_drops,
                    down_drops,
                },
            );
        }
        Ok(out)
    }

    /// Kills whatever still runs inside the namespaces and removes them (their veth pairs go
    /// with them). Best effort: every namespace is tried, the first error is returned.
    pub fn teardown(&mut self) -> Result<()> {
        let mut first_err = None;
        for ns in self.made.drain(..).rev() {
            if let Err(e) = remove_netns(&ns) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn add_node(&mut self, node: &NodeSpec, queue_ms: u64) -> Result<()> {
        let ns = Self::netns(&node.name);
        ip(&["netns", "add", &ns])?;
        self.made.push(ns.clone());
        let hub_if = node.name.as_str();
        let mtu = MTU.to_string();
        ip(&[
            "-n", HUB, "link", "add", hub_if, "mtu", &mtu, "type", "veth", "peer", "name", NODE_IF,
            "mtu", &mtu, "netns", &ns,
        ])?;
        ip(&["-n", HUB, "link", "set", hub_if, "master", BRIDGE, "up"])?;
        let cidr = format!("{}/24", address(node.host));
        ip(&["-n", &ns, "addr", "add", &cidr, "dev", NODE_IF])?;
        ip(&["-n", &ns, "link", "set", NODE_IF, "up"])?;
        // Loopback for the node's local services (a daemon's /metrics).
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        shape(&ns, NODE_IF, node.rates.up_bps, queue_ms)?;
        shape(HUB, hub_if, node.rates.down_bps, queue_ms)?;
        Ok(())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            eprintln!("d7q-bench: tearing down the namespaces: {e:#}");
        }
    }
}

/// The `tbf` bucket for `bps`: [`BURST_SECS`] of the rate, at least [`MIN_BURST`].
pub fn burst_bytes(bps: u64) -> u64 {
    ((bps as f64 / 8.0 * BURST_SECS) as u64).max(MIN_BURST)
}

/// Namespaces named with [`PREFIX`] that exist now.
pub fn leftovers() -> Result<Vec<String>> {
    let list = ip(&["netns", "list"])?;
    Ok(list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(PREFIX))
        .map(str::to_owned)
        .collect())
}

/// Removes every namespace named with [`PREFIX`], killing the processes inside first. Returns
/// the names removed.
pub fn cleanup() -> Result<Vec<String>> {
    let stale = leftovers()?;
    let mut first_err = None;
    for ns in &stale {
        if let Err(e) = remove_netns(ns) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(stale), Err)
}

/// Kills the processes inside `ns` by their ids (all of them were started there by this tool),
/// then deletes it.
fn remove_netns(ns: &str) -> Result<()> {
    let pids = ip(&["netns", "pids", ns]).unwrap_or_default();
    for pid in pids.split_whitespace() {
        let _ = Command::new("kill").args(["-KILL", pid]).status();
    }
    ip(&["netns", "del", ns]).map(drop)
}

/// `tc qdisc replace … tbf` on `dev` in `ns`.
fn shape(ns: &str, dev: &str, bps: u64, queue_ms: u64) -> Result<()> {
    tc(&[
        "-n",
        ns,
        "qdisc",
        "replace",
        "dev",
        dev,
        "root",
        "tbf",
        "rate",
        &format!("{bps}bit"),
        "burst",
        &burst_bytes(bps).to_string(),
        "latency",
        &format!("{queue_ms}ms"),
    ])
    .map(drop)
}

/// The address of the node with last octet `host` (what [`Topology::addr`] answers for it).
pub fn address(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(SUBNET[0], SUBNET[1], SUBNET[2], host)
}

/// The element of a JSON array whose `key` is `value`.
fn find_by<'a>(list: &'a Value, key: &str, value: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|v| v[key] == value)
}

fn ip(args: &[&str]) -> Result<String> {
    run("ip", args)
}

fn tc(args: &[&str]) -> Result<String> {
    run("tc", args)
}

/// Runs `program args`, returning its stdout; fails with its stderr.
fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} (iproute2 is needed)"))?;
    if !out.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_scales_with_the_rate_above_a_floor() {
        assert_eq!(burst_bytes(1_000_000), MIN_BURST);
        assert_eq!(burst_bytes(100_000_000), 25_000);
        assert_eq!(burst_bytes(1_000_000_000), 250_000);
    }

    #[test]
    fn counters_subtract_without_wrapping() {
        let a = LinkCounters {
            up_bytes: 10,
            down_bytes: 5,
            up_drops: 1,
            down_drops: 0,
        };
        let b = LinkCounters {
            up_bytes: 30,
            down_bytes: 4,
            up_drops: 3,
            down_drops: 2,
        };
        let d = b.since(&a);
        assert_eq!(
            (d.up_bytes, d.down_bytes, d.up_drops, d.down_drops),
            (20, 0, 2, 2)
        );
    }
}
