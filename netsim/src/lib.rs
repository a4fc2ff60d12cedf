//! d7q-netsim: network emulation for testing distributed systems on one machine.
//!
//! It knows nothing of d7q: it moves datagrams and decides their fate.
//!
//! - [`link`]: the link model — delay, jitter, random and bursty loss, reordering, duplication,
//!   a rate-limited bottleneck with a queue, MTU and scheduled partitions. Sans-IO and seeded:
//!   `now` goes in, a [`link::Verdict`] comes out, and a seed replays a run.
//! - [`relay`]: a UDP relay applying one link per direction between clients and a server, with
//!   a handle to read statistics, change links, cut the path and rebind a client's address.
//! - [`tun`]: the IP-level link — TUN devices in network namespaces, every IP packet between
//!   them through the link model, so TCP and UDP see the same path (root). [`tun::TunLink`]
//!   joins two namespaces; [`tun::Switch`] joins many, with links picked by group (datacenter).
//! - [`scenario`]: scenario files (datacenters, nodes, links, workload, faults) and the runner
//!   that starts real processes over a [`tun::Switch`] and reports completion times and metrics.
//! - [`chart`]: hand-written SVG line and step charts for results.
//! - [`netns`]: network namespaces — create, delete, run `ip` or a closure inside one.
//!
//! The `netsim` binary runs these from the command line (`netsim --help`).

pub mod chart;
pub mod link;
pub mod netns;
pub mod relay;
pub mod scenario;
pub mod tun;
