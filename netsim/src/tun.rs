//! The IP-level link: TUN devices in network namespaces, every IP packet between them put
//! through the link model — so TCP (curl) and UDP (QUIC) see the same impairment.
//!
//! For: measuring anything that speaks IP across emulated paths on one machine, as root.
//! [`Switch`] is the general form: N ports, each a TUN device in some namespace with one IPv4
//! address; a packet read from one port goes to the port owning its destination address, through
//! the [`Link`] the [`LinkPlan`] picks for that pair. [`TunLink`] is the two-port case with one
//! link per direction, as `netsim tun-link` runs it.
//! Not for: deciding packet fates (that is [`crate::link`]), non-IPv4 traffic (counted and
//! dropped), or unprivileged use (the UDP relay, [`crate::relay`], is for that).
//!
//! Which link a packet takes: ports carry a group (a datacenter). Between two groups there is one
//! shared link per direction — a WAN pipe whose rate and queue every flow across it shares, as on
//! a real inter-datacenter link. Inside a group each ordered pair of ports gets its own link with
//! the group's configuration — a non-blocking switch, where two flows between different hosts do
//! not share a bottleneck.
//!
//! Shape: one task per port reads its TUN descriptor (nonblocking, in tokio's `AsyncFd`); one
//! scheduler task writes every packet into its destination port at its delivery time, from a heap
//! ordered by time. State sits behind one `std::sync::Mutex`, never held across an `.await`.
//! Memory is bounded by [`MAX_PENDING_PACKETS`] and [`MAX_PENDING_BYTES`].

pub(crate) mod sys;

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::link::{ConfigError, DurationSummary, Link, LinkConfig, LinkStats};
use crate::netns::{self, NetnsError, OwnedNetns};

/// Largest packet read from a TUN device (the largest IPv4 datagram).
pub const MAX_PACKET_SIZE: usize = 65_535;
/// Most ports one switch serves.
pub const MAX_PORTS: usize = 250;
/// Most packets waiting for their delivery time, all links together.
pub const MAX_PENDING_PACKETS: usize = 131_072;
/// Most bytes waiting for their delivery time, all links together.
pub const MAX_PENDING_BYTES: usize = 128 << 20;
/// Default MTU of the TUN devices: Ethernet's, so TCP segments are as on a LAN.
pub const DEFAULT_MTU: u32 = 1500;
/// Pause after an unexpected read error, so a persistent one cannot spin a core.
const READ_ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// How long the scheduler sleeps with nothing pending; a new packet wakes it sooner.
const IDLE_WAIT: Duration = Duration::from_secs(3600);

/// One port: a TUN device `ifname` in namespace `netns`, holding `addr/prefix_len`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    /// The port's name in statistics (a node's name).
    pub name: String,
    /// The namespace the device is made in; it must exist.
    pub netns: String,
    /// The device's name inside the namespace (at most 15 bytes).
    pub ifname: String,
    /// Its address; packets to this address are written into this port.
    pub addr: Ipv4Addr,
    /// The prefix on the device: the kernel routes the whole prefix into the device.
    pub prefix_len: u8,
    /// Its group (a datacenter): picks the link, see the module docs.
    pub group: String,
}

/// Which link configuration applies between two ports.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LinkPlan {
    /// Inside a group, per group; each ordered pair of ports gets its own link with it. A group
    /// not named here gets a perfect link.
    pub intra: HashMap<String, LinkConfig>,
    /// Between groups, directed (`from`, `to`); one link per direction shared by every flow.
    pub inter: HashMap<(String, String), LinkConfig>,
    /// Between groups with no entry in `inter`.
    pub default_inter: LinkConfig,
}

/// How to run a switch.
#[derive(Debug, Clone)]
pub struct SwitchConfig {
    /// The ports; addresses must be distinct.
    pub ports: Vec<PortSpec>,
    /// The links.
    pub plan: LinkPlan,
    /// Seed of every link (each mixes in its own name); the same seed and packet order replay
    /// the same fates.
    pub seed: u64,
    /// MTU set on every device.
    pub mtu: u32,
}

/// Why the switch or link could not start or change.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TunError {
    /// A namespace operation (or `ip`) failed.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// The TUN device could not be made.
    #[error("cannot open TUN device {ifname} in namespace {netns}: {source}")]
    Open {
        /// Device name.
        ifname: String,
        /// Namespace.
        netns: String,
        /// What the OS said.
        source: io::Error,
    },
    /// Registering the descriptor with tokio failed (no runtime?).
    #[error("cannot poll TUN device {ifname}: {source}")]
    Poll {
        /// Device name.
        ifname: String,
        /// What tokio said.
        source: io::Error,
    },
    /// A link configuration was rejected.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The ports do not make a switch.
    #[error("bad port list: {0}")]
    Ports(String),
    /// No such group.
    #[error("no group named {0:?}")]
    NoGroup(String),
}

/// Counters of one link of the switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkReport {
    /// `inter` (between groups; `from`/`to` are groups) or `intra` (`from`/`to` are ports).
    pub kind: String,
    /// Where packets enter.
    pub from: String,
    /// Where they go.
    pub to: String,
    /// What the link did.
    pub stats: LinkStats,
}

/// What the switch has done so far.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SwitchStats {
    /// Every link that exists (inter-group links always; intra-group ones once used).
    pub links: Vec<LinkReport>,
    /// Packets read from the ports.
    pub read_packets: u64,
    /// Packets that were not IPv4 (IPv6 router solicitations and the like).
    pub not_ipv4: u64,
    /// IPv4 packets to an address no port owns (broadcast, multicast, strays).
    pub unroutable: u64,
    /// Packets a link delivered but the switch had no room to hold.
    pub overflow_dropped: u64,
    /// Packets written into their destination port.
    pub written_packets: u64,
    /// Writes that failed.
    pub write_errors: u64,
    /// Reads that failed.
    pub read_errors: u64,
    /// How long after its scheduled arrival each packet was written into its port: the
    /// switch's own lateness in real time, which grows on a loaded machine. For benchmarks;
    /// the schedule itself is in each link's `scheduled_delay`.
    pub lateness: DurationSummary,
}

/// A running switch. Dropping it stops the tasks and closes the devices, which deletes them.
#[derive(Debug)]
pub struct Switch {
    handle: SwitchHandle,
    tasks: Vec<JoinHandle<()>>,
}

/// Reads statistics and changes the switch while it runs; cheap to clone.
#[derive(Debug, Clone)]
pub struct SwitchHandle {
    shared: Arc<Shared>,
}

impl Switch {
    /// Makes every port's device (in its namespace: MTU, address, up) and starts forwarding.
    /// Needs root and a tokio runtime; partition schedules count from now.
    pub async fn start(config: SwitchConfig) -> Result<Self, TunError> {
        let SwitchConfig {
            ports,
            plan,
            seed,
            mtu,
        } = config;
        check_ports(&ports)?;
        for c in plan.intra.values().chain(plan.inter.values()) {
            c.validate()?;
        }
        plan.default_inter.validate()?;
        let mut groups: Vec<String> = Vec::new();
        for p in &ports {
            if !groups.contains(&p.group) {
                groups.push(p.group.clone());
            }
        }
        let mut opened = Vec::with_capacity(ports.len());
        for spec in &ports {
            let fd = make_device(spec, mtu)?;
            let fd = sys::register(fd).map_err(|source| TunError::Poll {
                ifname: spec.ifname.clone(),
                source,
            })?;
            opened.push(Port {
                group: groups.iter().position(|g| *g == spec.group).unwrap_or(0),
                spec: spec.clone(),
                fd,
            });
        }
        let start = clock();
        let mut links = HashMap::new();
        for (gi, from) in groups.iter().enumerate() {
            for (gj, to) in groups.iter().enumerate() {
                if gi == gj {
                    continue;
                }
                let config = plan
                    .inter
                    .get(&(from.clone(), to.clone()))
                    .unwrap_or(&plan.default_inter)
                    .clone();
                let key = LinkKey::Inter(gi, gj);
                let link = Link::new(
                    config,
                    link_seed(seed, &key_name(&groups, &opened, key)),
                    start,
                )?;
                links.insert(key, link);
            }
        }
        let routes = opened
            .iter()
            .enumerate()
            .map(|(i, p)| (p.spec.addr, i))
            .collect();
        let shared = Arc::new(Shared {
            ports: opened,
            groups,
            routes,
            wake: Notify::new(),
            state: Mutex::new(State {
                plan,
                seed,
                start,
                links,
                pending: BinaryHeap::new(),
                pending_bytes: 0,
                next_seq: 0,
                stats: SwitchStats::default(),
            }),
        });
        let mut tasks: Vec<JoinHandle<()>> = (0..shared.ports.len())
            .map(|i| tokio::spawn(reader(shared.clone(), i)))
            .collect();
        tasks.push(tokio::spawn(scheduler(shared.clone())));
        tracing::info!(ports = shared.ports.len(), seed, "switch ready");
        Ok(Self {
            handle: SwitchHandle { shared },
            tasks,
        })
    }

    /// A handle for statistics and runtime changes.
    pub fn handle(&self) -> SwitchHandle {
        self.handle.clone()
    }
}

impl Drop for Switch {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        let mut state = self.handle.shared.lock();
        state.pending.clear();
        state.pending_bytes = 0;
    }
}

impl SwitchHandle {
    /// A snapshot of the counters.
    pub fn stats(&self) -> SwitchStats {
        let state = self.shared.lock();
        let mut links: Vec<LinkReport> = state
            .links
            .iter()
            .map(|(key, link)| {
                let (kind, from, to) = match *key {
                    LinkKey::Inter(a, b) => {
                        ("inter", &self.shared.groups[a], &self.shared.groups[b])
                    }
                    LinkKey::Intra(a, b) => (
                        "intra",
                        &self.shared.ports[a].spec.name,
                        &self.shared.ports[b].spec.name,
                    ),
                };
                LinkReport {
                    kind: kind.to_owned(),
                    from: from.clone(),
                    to: to.clone(),
                    stats: link.stats().clone(),
                }
            })
            .collect();
        links.sort_by(|a, b| (&a.kind, &a.from, &a.to).cmp(&(&b.kind, &b.from, &b.to)));
        SwitchStats {
            links,
            ..state.stats.clone()
        }
    }

    /// Cuts both directions between groups `a` and `b` from now for `duration`.
    pub fn partition_groups(&self, a: &str, b: &str, duration: Duration) -> Result<(), TunError> {
        let (ga, gb) = (self.group(a)?, self.group(b)?);
        let now = clock();
        let mut state = self.shared.lock();
        for key in [LinkKey::Inter(ga, gb), LinkKey::Inter(gb, ga)] {
            if let Some(link) = state.links.get_mut(&key) {
                link.add_partition(now, duration)?;
            }
        }
        Ok(())
    }

    /// Replaces the configuration of the link from group `from` to group `to`.
    pub fn set_inter_config(
        &self,
        from: &str,
        to: &str,
        config: LinkConfig,
    ) -> Result<(), TunError> {
        let key = LinkKey::Inter(self.group(from)?, self.group(to)?);
        let mut state = self.shared.lock();
        match state.links.get_mut(&key) {
            Some(link) => Ok(link.set_config(config)?),
            None => Err(TunError::NoGroup(to.to_owned())),
        }
    }

    fn group(&self, name: &str) -> Result<usize, TunError> {
        self.shared
            .groups
            .iter()
            .position(|g| g == name)
            .ok_or_else(|| TunError::NoGroup(name.to_owned()))
    }
}

/// How to run a [`TunLink`].
#[derive(Debug, Clone)]
pub struct TunLinkConfig {
    /// Namespace of side A; made (and removed at the end) if it does not exist.
    pub ns_a: String,
    /// Namespace of side B; likewise.
    pub ns_b: String,
    /// Side A's address and prefix, e.g. `10.77.0.1/30`.
    pub addr_a: (Ipv4Addr, u8),
    /// Side B's address and prefix, e.g. `10.77.0.2/30`.
    pub addr_b: (Ipv4Addr, u8),
    /// Link from A to B.
    pub up: LinkConfig,
    /// Link from B to A.
    pub down: LinkConfig,
    /// Seed for both links.
    pub seed: u64,
    /// Device MTU.
    pub mtu: u32,
    /// Device name, the same on both sides (each is in its own namespace).
    pub ifname: String,
}

/// Statistics of a [`TunLink`], by direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunLinkStats {
    /// A to B.
    pub up: LinkStats,
    /// B to A.
    pub down: LinkStats,
    /// Everything else the switch counted.
    pub switch: SwitchStats,
}

/// Two namespaces joined by TUN devices through one link per direction. Dropping it deletes the
/// devices, and the namespaces it made.
#[derive(Debug)]
pub struct TunLink {
    // Declared before the namespaces so the devices close before the namespaces go.
    switch: Switch,
    _made: Vec<OwnedNetns>,
}

/// Group names of the two sides inside the switch.
const SIDE_A: &str = "a";
const SIDE_B: &str = "b";

impl TunLinkConfig {
    /// A perfect link between `ns_a` (10.77.0.1/30) and `ns_b` (10.77.0.2/30), seed 0.
    pub fn new(ns_a: &str, ns_b: &str) -> Self {
        Self {
            ns_a: ns_a.to_owned(),
            ns_b: ns_b.to_owned(),
            addr_a: (Ipv4Addr::new(10, 77, 0, 1), 30),
            addr_b: (Ipv4Addr::new(10, 77, 0, 2), 30),
            up: LinkConfig::default(),
            down: LinkConfig::default(),
            seed: 0,
            mtu: DEFAULT_MTU,
            ifname: "nstun0".to_owned(),
        }
    }
}

impl TunLink {
    /// Makes the namespaces that do not exist, a device in each, and starts forwarding.
    pub async fn start(config: TunLinkConfig) -> Result<Self, TunError> {
        if config.ns_a == config.ns_b {
            return Err(TunError::Ports("both sides in one namespace".into()));
        }
        let mut made = Vec::new();
        for ns in [&config.ns_a, &config.ns_b] {
            if !netns::exists(ns) {
                made.push(OwnedNetns::create(ns)?);
            }
        }
        let port = |name: &str, ns: &str, (addr, prefix_len): (Ipv4Addr, u8)| PortSpec {
            name: name.to_owned(),
            netns: ns.to_owned(),
            ifname: config.ifname.clone(),
            addr,
            prefix_len,
            group: name.to_owned(),
        };
        let mut plan = LinkPlan::default();
        plan.inter
            .insert((SIDE_A.into(), SIDE_B.into()), config.up.clone());
        plan.inter
            .insert((SIDE_B.into(), SIDE_A.into()), config.down.clone());
        let switch = Switch::start(SwitchConfig {
            ports: vec![
                port(SIDE_A, &config.ns_a, config.addr_a),
                port(SIDE_B, &config.ns_b, config.addr_b),
            ],
            plan,
            seed: config.seed,
            mtu: config.mtu,
        })
        .await?;
        Ok(Self {
            switch,
            _made: made,
        })
    }

    /// The switch underneath, for runtime changes.
    pub fn handle(&self) -> SwitchHandle {
        self.switch.handle()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TunLinkStats {
        let switch = self.switch.handle().stats();
        let find = |from: &str| {
            switch
                .links
                .iter()
                .find(|l| l.kind == "inter" && l.from == from)
                .map(|l| l.stats.clone())
                .unwrap_or_default()
        };
        TunLinkStats {
            up: find(SIDE_A),
            down: find(SIDE_B),
            switch,
        }
    }

    /// Cuts both directions from now for `duration`.
    pub fn partition(&self, duration: Duration) -> Result<(), TunError> {
        self.switch
            .handle()
            .partition_groups(SIDE_A, SIDE_B, duration)
    }
}

/// Parses `A.B.C.D/N`.
pub fn parse_cidr(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or_else(|| format!("{text:?}: expected ADDRESS/PREFIX, e.g. 10.77.0.1/30"))?;
    let addr: Ipv4Addr = addr.parse().map_err(|e| format!("{text:?}: {e}"))?;
    let len: u8 = len.parse().map_err(|e| format!("{text:?}: {e}"))?;
    if !(1..=32).contains(&len) {
        return Err(format!("{text:?}: prefix must be 1 to 32"));
    }
    Ok((addr, len))
}

#[derive(Debug)]
struct Shared {
    ports: Vec<Port>,
    groups: Vec<String>,
    routes: HashMap<Ipv4Addr, usize>,
    wake: Notify,
    state: Mutex<State>,
}

#[derive(Debug)]
struct Port {
    spec: PortSpec,
    group: usize,
    fd: AsyncFd<OwnedFd>,
}

#[derive(Debug)]
struct State {
    plan: LinkPlan,
    seed: u64,
    start: Instant,
    links: HashMap<LinkKey, Link>,
    pending: BinaryHeap<Reverse<Pending>>,
    pending_bytes: usize,
    /// Breaks ties between packets due at the same instant, so they leave in arrival order.
    next_seq: u64,
    stats: SwitchStats,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LinkKey {
    /// Between groups, by group index.
    Inter(usize, usize),
    /// Inside a group, by port index.
    Intra(usize, usize),
}

#[derive(Debug)]
struct Pending {
    at: Instant,
    seq: u64,
    port: usize,
    data: Vec<u8>,
}

impl Shared {
    /// The std mutex, recovered if poisoned: counters and queues stay consistent at every
    /// unlock, so a panic elsewhere is no reason to stop forwarding.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Routes one packet read from port `from` and queues its deliveries.
    fn admit(&self, state: &mut State, from: usize, packet: &[u8]) {
        state.stats.read_packets += 1;
        let Some(dst) = ipv4_destination(packet) else {
            state.stats.not_ipv4 += 1;
            return;
        };
        let Some(&to) = self.routes.get(&dst) else {
            state.stats.unroutable += 1;
            return;
        };
        if to == from {
            state.stats.unroutable += 1;
            return;
        }
        let (gf, gt) = (self.ports[from].group, self.ports[to].group);
        let key = if gf == gt {
            LinkKey::Intra(from, to)
        } else {
            LinkKey::Inter(gf, gt)
        };
        let now = clock();
        if !state.links.contains_key(&key) {
            let config = state
                .plan
                .intra
                .get(&self.groups[gf])
                .cloned()
                .unwrap_or_default();
            let seed = link_seed(state.seed, &key_name(&self.groups, &self.ports, key));
            // The plan was validated at start, so this cannot fail; if it did, drop the packet.
            let Ok(link) = Link::new(config, seed, state.start) else {
                state.stats.unroutable += 1;
                return;
            };
            state.links.insert(key, link);
        }
        let Some(link) = state.links.get_mut(&key) else {
            return;
        };
        let verdict = link.handle_packet(now, packet.len());
        let mut earliest = false;
        for at in verdict.delivery_times() {
            if state.pending.len() >= MAX_PENDING_PACKETS
                || state.pending_bytes + packet.len() > MAX_PENDING_BYTES
            {
                state.stats.overflow_dropped += 1;
                continue;
            }
            earliest |= state.pending.peek().is_none_or(|Reverse(p)| at < p.at);
            let seq = state.next_seq;
            state.next_seq += 1;
            state.pending_bytes += packet.len();
            state.pending.push(Reverse(Pending {
                at,
                seq,
                port: to,
                data: packet.to_vec(),
            }));
        }
        if earliest {
            self.wake.notify_one();
        }
    }
}

impl PartialEq for Pending {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Pending {}

impl PartialOrd for Pending {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Pending {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

/// tokio's clock (so a paused test clock would apply), as the std `Instant` the model speaks.
fn clock() -> Instant {
    tokio::time::Instant::now().into_std()
}

/// The destination of an IPv4 packet; `None` for anything else or a truncated header.
fn ipv4_destination(packet: &[u8]) -> Option<Ipv4Addr> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(
        packet[16], packet[17], packet[18], packet[19],
    ))
}

/// A stable name for a link, mixed into its seed so links draw unrelated streams.
fn key_name(groups: &[String], ports: &[Port], key: LinkKey) -> String {
    match key {
        LinkKey::Inter(a, b) => format!("inter:{}>{}", groups[a], groups[b]),
        LinkKey::Intra(a, b) => format!("intra:{}>{}", ports[a].spec.name, ports[b].spec.name),
    }
}

/// The seed of one link: FNV-1a of its name, mixed with the switch's seed by SplitMix64.
fn link_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn check_ports(ports: &[PortSpec]) -> Result<(), TunError> {
    if ports.len() < 2 || ports.len() > MAX_PORTS {
        return Err(TunError::Ports(format!(
            "{} ports (2 to {MAX_PORTS})",
            ports.len()
        )));
    }
    for (i, p) in ports.iter().enumerate() {
        if ports[..i].iter().any(|q| q.addr == p.addr) {
            return Err(TunError::Ports(format!("address {} used twice", p.addr)));
        }
        if ports[..i]
            .iter()
            .any(|q| q.netns == p.netns && q.ifname == p.ifname)
        {
            return Err(TunError::Ports(format!(
                "device {} in {} used twice",
                p.ifname, p.netns
            )));
        }
        if p.ifname.is_empty() || p.ifname.len() > sys::MAX_IFNAME_LEN {
            return Err(TunError::Ports(format!("bad device name {:?}", p.ifname)));
        }
        if !(1..=32).contains(&p.prefix_len) {
            return Err(TunError::Ports(format!("bad prefix /{}", p.prefix_len)));
        }
    }
    Ok(())
}

/// Opens the device inside its namespace, then configures it there with `ip`.
fn make_device(spec: &PortSpec, mtu: u32) -> Result<OwnedFd, TunError> {
    let open_error = |source| TunError::Open {
        ifname: spec.ifname.clone(),
        netns: spec.netns.clone(),
        source,
    };
    let fd = netns::run_in(&spec.netns, || sys::open_tun(&spec.ifname))?.map_err(open_error)?;
    let ns = spec.netns.as_str();
    let dev = spec.ifname.as_str();
    let cidr = format!("{}/{}", spec.addr, spec.prefix_len);
    netns::ip(&["-n", ns, "link", "set", "dev", dev, "mtu", &mtu.to_string()])?;
    netns::ip(&["-n", ns, "addr", "add", &cidr, "dev", dev])?;
    netns::ip(&["-n", ns, "link", "set", "dev", dev, "up"])?;
    netns::ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
    Ok(fd)
}

/// Reads every packet port `index` receives and hands it to the links.
async fn reader(shared: Arc<Shared>, index: usize) {
    let mut buf = vec![0u8; MAX_PACKET_SIZE];
    let port = &shared.ports[index];
    loop {
        let mut guard = match port.fd.readable().await {
            Ok(guard) => guard,
            Err(error) => {
                tracing::warn!(port = %port.spec.name, %error, "cannot poll TUN device");
                shared.lock().stats.read_errors += 1;
                tokio::time::sleep(READ_ERROR_BACKOFF).await;
                continue;
            }
        };
        loop {
            match guard.try_io(|fd| sys::read(fd.get_ref().as_fd(), &mut buf)) {
                Ok(Ok(len)) => {
                    let mut state = shared.lock();
                    shared.admit(&mut state, index, &buf[..len]);
                }
                Ok(Err(error)) => {
                    tracing::debug!(port = %port.spec.name, %error, "TUN read failed");
                    shared.lock().stats.read_errors += 1;
                    tokio::time::sleep(READ_ERROR_BACKOFF).await;
                    break;
                }
                // Drained: wait for the next readiness.
                Err(_would_block) => break,
            }
        }
    }
}

/// Writes every packet into its port at its delivery time.
async fn scheduler(shared: Arc<Shared>) {
    let mut due: Vec<Pending> = Vec::new();
    loop {
        let next = {
            let mut state = shared.lock();
            let now = clock();
            while state.pending.peek().is_some_and(|Reverse(p)| p.at <= now) {
                if let Some(Reverse(p)) = state.pending.pop() {
                    state.pending_bytes -= p.data.len();
                    due.push(p);
                }
            }
            state.pending.peek().map(|Reverse(p)| p.at)
        };
        if !due.is_empty() {
            let (mut written, mut failed) = (0, 0);
            let mut lateness = DurationSummary::default();
            for p in due.drain(..) {
                lateness.record(clock().saturating_duration_since(p.at));
                match sys::write(shared.ports[p.port].fd.get_ref().as_fd(), &p.data) {
                    Ok(_) => written += 1,
                    Err(error) => {
                        tracing::debug!(port = %shared.ports[p.port].spec.name, %error, "TUN write failed");
                        failed += 1;
                    }
                }
            }
            let mut state = shared.lock();
            state.stats.written_packets += written;
            state.stats.write_errors += failed;
            state.stats.lateness.merge(&lateness);
        }
        let wait = next.map_or(IDLE_WAIT, |at| at.saturating_duration_since(clock()));
        if wait.is_zero() {
            continue;
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shared.wake.notified() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_destination_of_ipv4_only() {
        let mut p = [0u8; 20];
        p[0] = 0x45;
        p[16..20].copy_from_slice(&[10, 77, 0, 2]);
        assert_eq!(ipv4_destination(&p), Some(Ipv4Addr::new(10, 77, 0, 2)));
        p[0] = 0x60;
        assert_eq!(ipv4_destination(&p), None);
        assert_eq!(ipv4_destination(&[0x45; 19]), None);
    }

    #[test]
    fn link_seeds_differ_by_name_and_replay_by_seed() {
        assert_eq!(link_seed(7, "inter:a>b"), link_seed(7, "inter:a>b"));
        assert_ne!(link_seed(7, "inter:a>b"), link_seed(7, "inter:b>a"));
        assert_ne!(link_seed(7, "inter:a>b"), link_seed(8, "inter:a>b"));
    }

    #[test]
    fn parses_cidrs() {
        assert_eq!(
            parse_cidr("10.77.0.1/30"),
            Ok((Ipv4Addr::new(10, 77, 0, 1), 30))
        );
        assert!(parse_cidr("10.77.0.1").is_err());
        assert!(parse_cidr("10.77.0.1/33").is_err());
        assert!(parse_cidr("x/3").is_err());
    }
}
