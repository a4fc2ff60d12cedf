//! d7q-netsim: network emulation for testing distributed systems on one machine.
//!
//! It knows nothing of d7q: it moves datagrams and decides their fate.
//!
//! - [`link`]: the link model — delay, jitter, random and bursty loss, reordering, duplication,
//!   a rate-limited bottleneck with a queue, MTU and scheduled partitions. Sans-IO and seeded:
//!   `now` goes in, a [`link::Verdict`] comes out, and a seed replays a run.
//! - [`relay`]: a UDP relay applying one link per direction between clients and a server, with
//!   a handle to read statistics, change links, cut the path and rebind a client's address.
//!
//! The `netsim` binary runs the relay from the command line (`netsim relay --help`).
//!
//! Not here (yet): the IP-level link between network namespaces and the scenario runner.

pub mod link;
pub mod relay;
