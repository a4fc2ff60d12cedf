//! Where the proxy may open a connection: the rules that keep it from being an open relay.
//! Pure — a name, a resolved address, a port and a purpose in, a decision out; resolving and
//! dialling are [`super::upstream::dial`]'s.
//!
//! The defaults, after Squid's: a tunnel (`CONNECT`) goes only to port 443 and to the ports the
//! `--registry` rules name; plain-HTTP forwarding only to port 80 and those ports; a configured
//! registry (an intercept rule or the mirror upstream) on whatever port it is configured with.
//! Never, whatever the name: loopback, link-local (169.254/16 — cloud metadata lives there —
//! and fe80::/10), unspecified, broadcast and multicast addresses, nor the daemon's own
//! listeners. The decision is made on every address a name resolves to, and the caller connects
//! to the very address that passed, so a name that resolves to loopback (DNS rebinding, a
//! hostile `/etc/hosts` entry) gets nowhere.
//!
//! `--proxy-allow` widens this, one rule at a time:
//!
//! - `HOST:PORT` (or `*:PORT`): that port for that name (any name). Addresses are still checked:
//!   a name never unlocks loopback.
//! - `ADDR:PORT`, `[V6]:PORT`: that port at that address, loopback and own listeners included.
//! - `ADDR`, `CIDR` (`127.0.0.0/8`, `fd00::/8`): every port at those addresses, loopback
//!   included, the daemon's own listeners not.
//!
//! Not for: what an intercepted request may read (the registry decides, see
//! [`super::registry`]).

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use crate::cidr::canonical;
pub use crate::cidr::Cidr;

use super::rules::Rules;

/// Ports a tunnel may reach without a rule.
pub const TUNNEL_PORTS: &[u16] = &[443];
/// Ports plain-HTTP forwarding may reach without a rule.
pub const FORWARD_PORTS: &[u16] = &[80];

/// Why the proxy opens a connection: decides which ports are open by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A `CONNECT` tunnel, or an HTTPS request to a host that is not a configured registry (a
    /// redirect to object storage).
    Tunnel,
    /// A plain-HTTP request in absolute form.
    Forward,
    /// A registry the operator configured: any port.
    Registry,
}

/// One `--proxy-allow` rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Allow {
    /// A port for a host name (`None`: any name).
    Name {
        /// Lower-case host name, without a trailing dot.
        host: Option<String>,
        /// The port.
        port: u16,
    },
    /// Addresses, and one port of them or all.
    Net {
        /// The network.
        net: Cidr,
        /// The port; `None`: every port.
        port: Option<u16>,
    },
}

/// A `--proxy-allow` value that is none of the forms.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "expected HOST:PORT, *:PORT, ADDR:PORT, [V6]:PORT, ADDR or CIDR (like 127.0.0.0/8), found {0:?}"
)]
pub struct AllowError(pub String);

/// Why a connection is refused. The message is what the client reads in the 403's body.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    /// The port is not open for this purpose.
    #[error(
        "{host}:{port}: the proxy connects only to port {defaults} and the ports of its \
         --registry rules (--proxy-allow HOST:PORT opens more)"
    )]
    Port {
        /// The name asked for.
        host: String,
        /// The port.
        port: u16,
        /// The default ports, for the message.
        defaults: String,
    },
    /// The address is of a kind the proxy never connects to unless an address rule allows it.
    #[error(
        "{host}:{port}: {addr} is a {kind} address; the proxy does not connect there unless \
         --proxy-allow names it (like 127.0.0.1:5000 or 127.0.0.0/8)"
    )]
    Address {
        /// The name asked for.
        host: String,
        /// The port.
        port: u16,
        /// The address it resolved to.
        addr: IpAddr,
        /// loopback, link-local, …
        kind: &'static str,
    },
    /// The daemon's own listener: a request that would loop back into the proxy or metrics.
    #[error("{host}:{port}: {addr} is this daemon's own listener")]
    OwnListener {
        /// The name asked for.
        host: String,
        /// The port.
        port: u16,
        /// The address it resolved to.
        addr: IpAddr,
    },
}

/// The proxy's connection policy.
#[derive(Clone, Debug, Default)]
pub struct ConnectPolicy {
    registries: Rules,
    /// The mirror's configured upstream, lower-case host and port.
    mirror: Option<(String, u16)>,
    /// Ports named by `--registry` rules.
    rule_ports: BTreeSet<u16>,
    allow: Vec<Allow>,
    /// The daemon's own TCP listeners.
    own: Vec<SocketAddr>,
}

impl ConnectPolicy {
    /// A policy from the intercept rules (already validated patterns), the mirror upstream
    /// (`host`, port), the `--proxy-allow` rules and the daemon's own TCP listeners.
    pub fn new(
        registries: &[String],
        mirror: Option<(String, u16)>,
        allow: Vec<Allow>,
        own: Vec<SocketAddr>,
    ) -> Self {
        let rule_ports = registries
            .iter()
            .filter_map(|p| crate::config::parse_port(p.rsplit_once(':')?.1))
            .collect();
        Self {
            registries: Rules::new(registries),
            mirror: mirror.map(|(h, p)| (normalize(&h), p)),
            rule_ports,
            allow,
            own,
        }
    }

    /// Whether `host:port` is a registry the operator configured: an intercept rule matches it,
    /// or it is the mirror upstream.
    pub fn is_registry(&self, host: &str, port: u16) -> bool {
        self.registries.intercepts(host, port)
            || self
                .mirror
                .as_ref()
                .is_some_and(|(h, p)| *p == port && *h == normalize(host))
    }

    /// The purpose of a connection the upstream client opens for a URI of `scheme`.
    pub fn purpose_of(&self, host: &str, port: u16, https: bool) -> Purpose {
        if self.is_registry(host, port) {
            Purpose::Registry
        } else if https {
            Purpose::Tunnel
        } else {
            Purpose::Forward
        }
    }

    /// The check before resolving: refuses a port no address of `host` could be allowed on,
    /// so a refused target costs no DNS query.
    pub fn check_name(&self, host: &str, port: u16, purpose: Purpose) -> Result<(), Refusal> {
        if self.port_open(host, port, purpose)
            || self.allow.iter().any(|a| match a {
                Allow::Net { port: p, .. } => p.is_none_or(|p| p == port),
                Allow::Name { .. } => false,
            })
        {
            return Ok(());
        }
        Err(self.port_refusal(host, port, purpose))
    }

    /// Whether the proxy may connect to `addr:port` for `host`.
    pub fn check(
        &self,
        host: &str,
        addr: IpAddr,
        port: u16,
        purpose: Purpose,
    ) -> Result<(), Refusal> {
        let ip = canonical(addr);
        let by_address = |exact: bool| {
            self.allow.iter().any(|a| match a {
                Allow::Net { net, port: p } => {
                    net.contains(ip)
                        && p.is_none_or(|p| p == port)
                        && (!exact || (net.is_single() && p.is_some()))
                }
                Allow::Name { .. } => false,
            })
        };
        let own = self
            .own
            .iter()
            .any(|o| o.port() == port && (o.ip().is_unspecified() || canonical(o.ip()) == ip));
        if own && !by_address(true) {
            return Err(Refusal::OwnListener {
                host: host.to_string(),
                port,
                addr: ip,
            });
        }
        let allowed = by_address(false);
        if let Some(kind) = special(ip) {
            if !allowed {
                return Err(Refusal::Address {
                    host: host.to_string(),
                    port,
                    addr: ip,
                    kind,
                });
            }
        }
        if allowed || self.port_open(host, port, purpose) {
            Ok(())
        } else {
            Err(self.port_refusal(host, port, purpose))
        }
    }

    fn port_open(&self, host: &str, port: u16, purpose: Purpose) -> bool {
        let defaults = match purpose {
            Purpose::Registry => return true,
            Purpose::Tunnel => TUNNEL_PORTS,
            Purpose::Forward => FORWARD_PORTS,
        };
        let host = normalize(host);
        defaults.contains(&port)
            || self.rule_ports.contains(&port)
            || self.allow.iter().any(|a| match a {
                Allow::Name { host: h, port: p } => {
                    *p == port && h.as_ref().is_none_or(|h| *h == host)
                }
                Allow::Net { .. } => false,
            })
    }

    fn port_refusal(&self, host: &str, port: u16, purpose: Purpose) -> Refusal {
        let defaults = match purpose {
            Purpose::Forward => FORWARD_PORTS,
            _ => TUNNEL_PORTS,
        };
        Refusal::Port {
            host: host.to_string(),
            port,
            defaults: defaults
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

impl FromStr for Allow {
    type Err = AllowError;

    fn from_str(s: &str) -> Result<Self, AllowError> {
        let bad = || AllowError(s.to_string());
        let t = s.trim();
        if t.contains('/') {
            return Ok(Allow::Net {
                net: t.parse().map_err(|_| bad())?,
                port: None,
            });
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Allow::Net {
                net: Cidr::single(ip),
                port: None,
            });
        }
        if let Ok(sa) = t.parse::<SocketAddr>() {
            if sa.port() == 0 {
                return Err(bad());
            }
            return Ok(Allow::Net {
                net: Cidr::single(sa.ip()),
                port: Some(sa.port()),
            });
        }
        let (host, port) = t.rsplit_once(':').ok_or_else(bad)?;
        let port = crate::config::parse_port(port).ok_or_else(bad)?;
        if host == "*" {
            return Ok(Allow::Name { host: None, port });
        }
        // Host names as `--registry` spells them, without a wildcard.
        if host.contains('*') || crate::config::parse_registry(host).is_err() {
            return Err(bad());
        }
        Ok(Allow::Name {
            host: Some(normalize(host)),
            port,
        })
    }
}

impl fmt::Display for Allow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Allow::Name { host, port } => write!(f, "{}:{port}", host.as_deref().unwrap_or("*")),
            Allow::Net { net, port: None } => write!(f, "{net}"),
            Allow::Net {
                net,
                port: Some(port),
            } => write!(f, "{}", SocketAddr::new(net.addr(), *port)),
        }
    }
}

/// The kind of an address the proxy never connects to by default; `None` for ordinary ones.
fn special(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.octets()[0] == 0 {
                // 0.0.0.0/8, "this network": Linux connects it to the local host.
                Some("unspecified")
            } else if v4 == Ipv4Addr::BROADCAST {
                Some("broadcast")
            } else if v4.is_multicast() {
                Some("multicast")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.segments()[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if v6 != Ipv6Addr::UNSPECIFIED && v6.to_ipv4().is_some_and(|v4| v4.is_loopback())
            {
                // The deprecated IPv4-compatible form, ::127.0.0.1.
                Some("loopback")
            } else {
                None
            }
        }
    }
}

/// Host names compare lower-case, without a trailing dot and IPv6 brackets.
fn normalize(host: &str) -> String {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn allow(rules: &[&str]) -> Vec<Allow> {
        rules.iter().map(|r| r.parse().unwrap()).collect()
    }

    fn policy(allow_rules: &[&str]) -> ConnectPolicy {
        ConnectPolicy::new(
            &["registry.corp:5000".into(), "*.harbor.example".into()],
            Some(("mirror.corp".into(), 443)),
            allow(allow_rules),
            vec![
                "127.0.0.1:65001".parse().unwrap(),
                "0.0.0.0:9100".parse().unwrap(),
            ],
        )
    }

    #[test]
    fn default_ports_and_registry_ports() {
        let p = policy(&[]);
        let public = ip("93.184.216.34");
        assert_eq!(p.check("a.example", public, 443, Purpose::Tunnel), Ok(()));
        // The port of a --registry rule is open for tunnels to other hosts too (Squid's SSL_ports).
        assert_eq!(p.check("a.example", public, 5000, Purpose::Tunnel), Ok(()));
        let refused = p
            .check("a.example", public, 22, Purpose::Tunnel)
            .unwrap_err();
        assert!(
            matches!(refused, Refusal::Port { port: 22, .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("--proxy-allow"), "{refused}");
        assert_eq!(p.check_name("a.example", 22, Purpose::Tunnel), Err(refused));
        assert_eq!(p.check("a.example", public, 80, Purpose::Forward), Ok(()));
        assert!(p
            .check("a.example", public, 8080, Purpose::Forward)
            .is_err());
        assert!(p.check("a.example", public, 80, Purpose::Tunnel).is_err());
        // A configured registry, any port it is configured on.
        assert_eq!(p.purpose_of("registry.corp", 5000, true), Purpose::Registry);
        assert_eq!(
            p.purpose_of("x.harbor.example", 8443, true),
            Purpose::Registry
        );
        assert_eq!(p.purpose_of("MIRROR.corp.", 443, true), Purpose::Registry);
        assert_eq!(p.purpose_of("mirror.corp", 8443, true), Purpose::Tunnel);
        assert_eq!(p.purpose_of("other.example", 80, false), Purpose::Forward);
        assert_eq!(
            p.check("x.harbor.example", public, 8443, Purpose::Registry),
            Ok(())
        );
    }

    #[test]
    fn special_addresses_whatever_the_name_or_purpose() {
        let p = policy(&["*:8080", "registry.internal:5000"]);
        for (addr, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.8.9.10", "loopback"),
            ("::1", "loopback"),
            ("::ffff:127.0.0.1", "loopback"),
            ("169.254.169.254", "link-local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("ff02::1", "multicast"),
        ] {
            for purpose in [Purpose::Tunnel, Purpose::Forward, Purpose::Registry] {
                let r = p.check("registry.corp", ip(addr), 5000, purpose);
                assert!(
                    matches!(&r, Err(Refusal::Address { kind: k, .. }) if *k == kind),
                    "{addr} {purpose:?}: {r:?}"
                );
            }
            // A name rule opens a port, never an address.
            assert!(p
                .check("registry.internal", ip(addr), 5000, Purpose::Tunnel)
                .is_err());
            assert!(p.check("x", ip(addr), 8080, Purpose::Tunnel).is_err());
        }
        for ordinary in [
            "10.0.0.1",
            "192.168.1.1",
            "fd00::1",
            "2001:db8::1",
            "172.16.0.1",
        ] {
            assert_eq!(
                p.check("r", ip(ordinary), 443, Purpose::Tunnel),
                Ok(()),
                "{ordinary}"
            );
        }
        assert_eq!(
            p.check("registry.internal", ip("10.1.1.1"), 5000, Purpose::Tunnel),
            Ok(())
        );
        assert!(p
            .check("registry.other", ip("10.1.1.1"), 5000 + 1, Purpose::Tunnel)
            .is_err());
        assert_eq!(
            p.check("any", ip("10.1.1.1"), 8080, Purpose::Forward),
            Ok(())
        );
    }

    #[test]
    fn address_rules_unlock_addresses_and_ports() {
        let p = policy(&["127.0.0.0/8", "::1", "10.9.0.0/16"]);
        assert_eq!(
            p.check("localhost", ip("127.0.0.1"), 5000, Purpose::Tunnel),
            Ok(())
        );
        assert_eq!(
            p.check("localhost", ip("::1"), 22, Purpose::Forward),
            Ok(())
        );
        assert_eq!(p.check("x", ip("10.9.200.1"), 22, Purpose::Tunnel), Ok(()));
        assert!(p.check("x", ip("10.10.0.1"), 22, Purpose::Tunnel).is_err());
        assert!(p
            .check("x", ip("169.254.169.254"), 80, Purpose::Forward)
            .is_err());
        assert_eq!(p.check_name("anything", 22, Purpose::Tunnel), Ok(()));
        // Not the daemon's own listeners, on their address or behind an unspecified bind.
        for (addr, port) in [
            ("127.0.0.1", 65001),
            ("127.0.0.1", 9100),
            ("10.9.1.1", 9100),
        ] {
            let r = p.check("self", ip(addr), port, Purpose::Tunnel);
            assert!(
                matches!(r, Err(Refusal::OwnListener { .. })),
                "{addr}:{port}: {r:?}"
            );
        }
        assert_eq!(
            p.check("x", ip("127.0.0.2"), 65001, Purpose::Tunnel),
            Ok(())
        );
        // Only an exact address and port names an own listener on purpose.
        let p = policy(&["127.0.0.1:65001", "127.0.0.1:5000"]);
        assert_eq!(
            p.check("self", ip("127.0.0.1"), 65001, Purpose::Tunnel),
            Ok(())
        );
        assert_eq!(p.check("x", ip("127.0.0.1"), 5000, Purpose::Tunnel), Ok(()));
        assert!(p
            .check("x", ip("127.0.0.1"), 5001, Purpose::Tunnel)
            .is_err());
        assert!(p.check_name("x", 5001, Purpose::Tunnel).is_err());
    }

    #[test]
    fn allow_rules_parse_and_print() {
        for (text, printed) in [
            ("registry.corp:5000", "registry.corp:5000"),
            ("Registry.Corp:5000", "registry.corp:5000"),
            ("*:8443", "*:8443"),
            ("127.0.0.1:5000", "127.0.0.1:5000"),
            ("[::1]:5000", "[::1]:5000"),
            ("127.0.0.0/8", "127.0.0.0/8"),
            ("10.0.0.1", "10.0.0.1/32"),
            ("fd00::/8", "fd00::/8"),
            ("::ffff:127.0.0.1/128", "127.0.0.1/32"),
        ] {
            let a: Allow = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(a.to_string(), printed);
        }
        for bad in [
            "",
            "registry.corp",
            "registry.corp:0",
            "registry.corp:x",
            "*.corp:443",
            "a b:1",
            "127.0.0.0/33",
            "::1/129",
            "1.2.3.4:0",
            // Found by the proxy_paths fuzz target: a signed port made this a host-name rule.
            "127.0.0.1:+43",
            "registry.corp:+5000",
            "https://x:443",
            "x/8",
        ] {
            assert!(bad.parse::<Allow>().is_err(), "{bad:?} parsed");
        }
    }
}
