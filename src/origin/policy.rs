//! Where the origin client may connect: the rule that keeps a supernode from fetching, for
//! whoever registers a URL (or for an origin that redirects), its cloud's metadata service or a
//! service on a link-local address. Pure — an address in, a decision out; resolving and dialling
//! are [`super::OriginClient`]'s, which judges every address a name resolves to, for the first
//! URL and for every redirect, and connects to the very address that passed, so a second DNS
//! answer (rebinding) never gets a say.
//!
//! Refused by default ([`BUILTIN`]): link-local addresses (169.254.0.0/16, fe80::/10), the cloud
//! metadata addresses (169.254.169.254, fd00:ec2::254, 100.100.100.200), unspecified (0.0.0.0/8,
//! which Linux connects to the local host, and `::`), broadcast and multicast. Everything else is
//! allowed, loopback and private ranges included: a supernode commonly fetches from a registry on
//! its own host or network, and `d7q get` in embedded mode from a server on the user's machine.
//! An operator who wants those refused says so (`--origin-deny 127.0.0.0/8`).
//!
//! Operator rules, `--origin-allow BLOCK` and `--origin-deny BLOCK` (an address or `ADDR/LEN`),
//! join the built-in ones, and the most specific block containing the address decides (longest
//! prefix). At equal length an operator's rule beats a built-in one, and a deny beats an allow.
//! So `--origin-deny 127.0.0.0/8` refuses loopback, `--origin-allow 169.254.0.0/16` opens
//! link-local but not the metadata address inside it (a /32 of its own), `--origin-allow
//! 169.254.169.254/32` opens that too, and `--origin-deny 0.0.0.0/0 --origin-allow 10.0.0.0/8`
//! is an allow-list.
//!
//! Addresses are judged in their IPv4 form when they carry one: IPv4-mapped (`::ffff:a.b.c.d`),
//! IPv4-compatible (`::a.b.c.d`) and NAT64 (`64:ff9b::a.b.c.d`) addresses are refused when their
//! IPv4 address is.
//!
//! Not for: the proxy's connections (see [`crate::proxy::policy`]).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::LazyLock;

use crate::cidr::{canonical, Cidr};

/// The built-in denials: each block and what kind of address it holds, for the message.
pub static BUILTIN: LazyLock<Vec<(Cidr, &'static str)>> = LazyLock::new(|| {
    [
        ("0.0.0.0/8", "unspecified"),
        ("169.254.0.0/16", "link-local"),
        ("169.254.169.254/32", "cloud metadata"),
        ("100.100.100.200/32", "cloud metadata"),
        ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "broadcast"),
        ("::/128", "unspecified"),
        ("fe80::/10", "link-local"),
        ("fd00:ec2::254/128", "cloud metadata"),
        ("ff00::/8", "multicast"),
    ]
    .into_iter()
    .map(|(net, kind)| (net.parse().expect("built-in block"), kind))
    .collect()
});

/// The origin client's connection policy: the operator's rules over [`BUILTIN`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    allow: Vec<Cidr>,
    deny: Vec<Cidr>,
}

/// Why an address is refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// A built-in denial.
    Builtin {
        /// link-local, cloud metadata, …
        kind: &'static str,
    },
    /// The operator's `--origin-deny` rule.
    Denied(Cidr),
}

/// A refused connection to an origin. The message names the host, the address and the rule,
/// and how to lift it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The host of the URL (a name or an address literal).
    pub host: String,
    /// The address refused.
    pub addr: IpAddr,
    /// The rule that refused it.
    pub reason: Reason,
}

/// A `--origin-allow`/`--origin-deny` value that is neither an address nor a block.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected an address or a block like 169.254.169.254/32 or fd00::/8, found {0:?}")]
pub struct BlockError(pub String);

impl OriginPolicy {
    /// The built-in policy plus the operator's `allow` and `deny` blocks.
    pub fn new(allow: Vec<Cidr>, deny: Vec<Cidr>) -> Self {
        Self { allow, deny }
    }

    /// Whether the origin client may connect to `addr` for `host`.
    pub fn check(&self, host: &str, addr: IpAddr) -> Result<(), Refusal> {
        let ip = canonical(addr);
        for form in [Some(ip), embedded_v4(ip)].into_iter().flatten() {
            if let Err(reason) = self.decide(form) {
                return Err(Refusal {
                    host: host.trim_start_matches('[').trim_end_matches(']').into(),
                    addr: ip,
                    reason,
                });
            }
        }
        Ok(())
    }

    /// Whether the operator changed nothing.
    pub fn is_builtin(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Longest prefix wins; at equal length operator deny > operator allow > built-in.
    fn decide(&self, ip: IpAddr) -> Result<(), Reason> {
        let builtin = BUILTIN
            .iter()
            .filter(|(net, _)| net.contains(ip))
            .map(|(net, kind)| (net.prefix_len(), 0, Err(Reason::Builtin { kind })));
        let allow = self
            .allow
            .iter()
            .filter(|net| net.contains(ip))
            .map(|net| (net.prefix_len(), 1, Ok(())));
        let deny = self
            .deny
            .iter()
            .filter(|net| net.contains(ip))
            .map(|net| (net.prefix_len(), 2, Err(Reason::Denied(*net))));
        builtin
            .chain(allow)
            .chain(deny)
            .max_by_key(|(len, rank, _)| (*len, *rank))
            .map_or(Ok(()), |(_, _, verdict)| verdict)
    }
}

impl fmt::Display for OriginPolicy {
    /// The operator's rules, for the start-up log: `allow [..] deny [..]`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let list = |v: &[Cidr]| v.iter().map(Cidr::to_string).collect::<Vec<_>>().join(",");
        write!(
            f,
            "allow [{}] deny [{}]",
            list(&self.allow),
            list(&self.deny)
        )
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.host == self.addr.to_string() {
            String::new()
        } else {
            format!("{} is ", self.addr)
        };
        match &self.reason {
            Reason::Builtin { kind } => write!(
                f,
                "origin {} refused: {at}{} {kind} address (allow with --origin-allow {})",
                self.host,
                if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
                    "an"
                } else {
                    "a"
                },
                Cidr::single(self.addr)
            ),
            Reason::Denied(net) => write!(
                f,
                "origin {} refused: {at}denied by --origin-deny {net}",
                self.host
            ),
        }
    }
}

impl std::error::Error for Refusal {}

/// An `--origin-allow`/`--origin-deny` value: `ADDR` (one address) or `ADDR/LEN`.
pub fn parse_block(s: &str) -> Result<Cidr, BlockError> {
    let t = s.trim();
    let parsed = if t.contains('/') {
        t.parse().ok()
    } else {
        t.parse::<IpAddr>().ok().map(Cidr::single)
    };
    parsed.ok_or_else(|| BlockError(s.to_string()))
}

/// The IPv4 address an IPv6 address stands for, besides the mapped form [`canonical`] already
/// turned into IPv4: IPv4-compatible `::a.b.c.d` (not `::` nor `::1`) and NAT64 `64:ff9b::/96`.
fn embedded_v4(ip: IpAddr) -> Option<IpAddr> {
    let IpAddr::V6(v6) = ip else { return None };
    let s = v6.segments();
    let low = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    let compat = s[..6] == [0; 6] && v6 != Ipv6Addr::UNSPECIFIED && v6 != Ipv6Addr::LOCALHOST;
    let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
    (compat || nat64).then_some(IpAddr::V4(low))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn blocks(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|b| parse_block(b).unwrap()).collect()
    }

    fn policy(allow: &[&str], deny: &[&str]) -> OriginPolicy {
        OriginPolicy::new(blocks(allow), blocks(deny))
    }

    fn kind_of(p: &OriginPolicy, addr: &str) -> Option<&'static str> {
        match p.check("h", ip(addr)) {
            Ok(()) => None,
            Err(Refusal {
                reason: Reason::Builtin { kind },
                ..
            }) => Some(kind),
            Err(r) => panic!("{addr}: refused by an operator rule: {r}"),
        }
    }

    #[test]
    fn the_default_refuses_each_special_range() {
        let p = OriginPolicy::default();
        for (addr, kind) in [
            ("169.254.169.254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("169.254.0.1", "link-local"),
            ("169.254.170.2", "link-local"),
            ("169.254.255.255", "link-local"),
            ("fe80::1", "link-local"),
            ("febf:ffff::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("255.255.255.255", "broadcast"),
            ("224.0.0.1", "multicast"),
            ("239.255.255.250", "multicast"),
            ("ff02::1", "multicast"),
            // An IPv6 spelling of a refused IPv4 address is refused as that address.
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("::ffff:169.254.1.1", "link-local"),
            ("::ffff:0.0.0.0", "unspecified"),
            ("::169.254.169.254", "cloud metadata"),
            ("64:ff9b::169.254.169.254", "cloud metadata"),
            ("64:ff9b::a9fe:1", "link-local"),
        ] {
            assert_eq!(kind_of(&p, addr), Some(kind), "{addr}");
        }
        for ordinary in [
            "127.0.0.1",
            "127.0.0.2",
            "::1",
            "::ffff:127.0.0.1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.201",
            "169.253.255.255",
            "169.255.0.1",
            "fd00:ec2::253",
            "fd00::1",
            "fec0::1",
            "2001:db8::1",
            "93.184.216.34",
            "64:ff9b::93.184.216.34",
            "223.255.255.255",
        ] {
            assert_eq!(kind_of(&p, ordinary), None, "{ordinary}");
        }
    }

    #[test]
    fn operator_rules_override_by_specificity() {
        // An allow opens what it names, and only that.
        let p = policy(&["169.254.169.254/32"], &[]);
        assert_eq!(p.check("m", ip("169.254.169.254")), Ok(()));
        assert_eq!(p.check("m", ip("::ffff:169.254.169.254")), Ok(()));
        assert_eq!(kind_of(&p, "169.254.169.253"), Some("link-local"));
        // A wider allow opens link-local, not the metadata address inside it.
        let p = policy(&["169.254.0.0/16"], &[]);
        assert_eq!(p.check("m", ip("169.254.1.1")), Ok(()));
        assert_eq!(kind_of(&p, "169.254.169.254"), Some("cloud metadata"));
        // Allowing everything does not lift a built-in denial either.
        let p = policy(&["0.0.0.0/0", "::/0"], &[]);
        assert_eq!(kind_of(&p, "169.254.1.1"), Some("link-local"));
        assert_eq!(kind_of(&p, "fe80::1"), Some("link-local"));
        // A bare address is a single-address allow.
        let p = policy(&["0.0.0.0"], &[]);
        assert_eq!(p.check("h", ip("0.0.0.0")), Ok(()));
        assert_eq!(kind_of(&p, "0.0.0.1"), Some("unspecified"));

        // A deny wins over the default allow…
        let p = policy(&[], &["127.0.0.0/8", "::1"]);
        for addr in ["127.0.0.1", "127.9.9.9", "::ffff:127.0.0.1", "::1"] {
            let r = p.check("localhost", ip(addr)).unwrap_err();
            assert!(matches!(r.reason, Reason::Denied(_)), "{addr}: {r}");
        }
        assert_eq!(p.check("h", ip("10.0.0.1")), Ok(()));
        // …and over an allow of the same block; a more specific allow wins over a deny.
        let p = policy(&["10.0.0.0/8", "10.1.0.0/16"], &["10.0.0.0/8"]);
        assert!(p.check("h", ip("10.2.0.1")).is_err());
        assert_eq!(p.check("h", ip("10.1.2.3")), Ok(()));
        // An allow-list.
        let p = policy(&["10.0.0.0/8", "fd00::/8"], &["0.0.0.0/0", "::/0"]);
        assert_eq!(p.check("h", ip("10.20.30.40")), Ok(()));
        assert_eq!(p.check("h", ip("fd12::1")), Ok(()));
        assert!(p.check("h", ip("93.184.216.34")).is_err());
        assert!(p.check("h", ip("2001:db8::1")).is_err());
        // An operator deny of an IPv6 block catches the NAT64 spelling of an address in it.
        let p = policy(&[], &["64:ff9b::/96"]);
        assert!(p.check("h", ip("64:ff9b::93.184.216.34")).is_err());
    }

    #[test]
    fn refusals_name_the_host_the_address_and_the_rule() {
        let p = policy(&[], &["127.0.0.0/8"]);
        assert_eq!(
            p.check("169.254.169.254", ip("169.254.169.254"))
                .unwrap_err()
                .to_string(),
            "origin 169.254.169.254 refused: a cloud metadata address \
             (allow with --origin-allow 169.254.169.254/32)"
        );
        assert_eq!(
            p.check("[fe80::1]", ip("fe80::1")).unwrap_err().to_string(),
            "origin fe80::1 refused: a link-local address (allow with --origin-allow fe80::1/128)"
        );
        assert_eq!(
            p.check("meta.internal", ip("::ffff:169.254.1.2"))
                .unwrap_err()
                .to_string(),
            "origin meta.internal refused: 169.254.1.2 is a link-local address \
             (allow with --origin-allow 169.254.1.2/32)"
        );
        assert_eq!(
            p.check("0.0.0.0", ip("0.0.0.0")).unwrap_err().to_string(),
            "origin 0.0.0.0 refused: an unspecified address (allow with --origin-allow 0.0.0.0/32)"
        );
        assert_eq!(
            p.check("localhost", ip("127.0.0.1"))
                .unwrap_err()
                .to_string(),
            "origin localhost refused: 127.0.0.1 is denied by --origin-deny 127.0.0.0/8"
        );
    }

    #[test]
    fn blocks_parse() {
        assert_eq!(
            parse_block("169.254.169.254").unwrap().to_string(),
            "169.254.169.254/32"
        );
        assert_eq!(parse_block(" fd00::/8 ").unwrap().to_string(), "fd00::/8");
        assert_eq!(
            parse_block("::ffff:10.0.0.0/104").unwrap().to_string(),
            "10.0.0.0/8"
        );
        for bad in [
            "",
            "localhost",
            "10.0.0.0/33",
            "10.0.0.0/",
            "1.2.3.4:80",
            "*",
        ] {
            assert!(parse_block(bad).is_err(), "{bad:?}");
        }
        assert!(parse_block("x")
            .unwrap_err()
            .to_string()
            .contains("169.254.169.254/32"));
    }
}
