//! Address blocks (`ADDR/LEN`) and the one canonical form of an address, shared by the two
//! policies that decide where this process may connect: the proxy's ([`crate::proxy::policy`])
//! and the origin client's ([`crate::origin::policy`]).
//!
//! Not for: deciding anything — a block only says whether it contains an address.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// An address block, `ADDR/LEN`. An IPv4-mapped IPv6 block (`::ffff:a.b.c.d/LEN`) is kept as
/// the IPv4 block it is, so it matches the addresses [`canonical`] yields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    /// The block of exactly `addr`.
    pub fn single(addr: IpAddr) -> Self {
        let addr = canonical(addr);
        let len = if addr.is_ipv4() { 32 } else { 128 };
        Self { addr, len }
    }

    /// The block's first address (its network address).
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length: 0 (everything) to 32 or 128 (one address).
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether the block is a single address.
    pub fn is_single(&self) -> bool {
        self.len == if self.addr.is_ipv4() { 32 } else { 128 }
    }

    /// Whether `ip` (canonical, see [`canonical`]) is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Cidr {
    type Err = ();

    /// `ADDR/LEN`; the address need not be the network's first (`10.1.2.3/8` is `10.0.0.0/8`).
    fn from_str(s: &str) -> Result<Self, ()> {
        let (addr, len) = s.split_once('/').ok_or(())?;
        let parsed = addr.parse::<IpAddr>().map_err(|_| ())?;
        let max = if parsed.is_ipv4() { 32 } else { 128 };
        let len: u8 = len.parse().map_err(|_| ())?;
        if len > max {
            return Err(());
        }
        let addr = canonical(parsed);
        // `::ffff:a.b.c.d/LEN` is the IPv4 block `a.b.c.d/(LEN - 96)`.
        let len = if addr.is_ipv4() && parsed.is_ipv6() {
            len.checked_sub(96).ok_or(())?
        } else {
            len
        };
        Ok(Self { addr, len })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, so `::ffff:127.0.0.1` is loopback:
/// a socket connected to it reaches the IPv4 host.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let net: Cidr = "10.1.2.3/8".parse().unwrap();
        assert_eq!(net.to_string(), "10.1.2.3/8");
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("fd00::1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("255.255.255.255")));
        let v6: Cidr = "fe80::/10".parse().unwrap();
        assert!(v6.contains(ip("febf::1")));
        assert!(!v6.contains(ip("fec0::1")));
        let mapped: Cidr = "::ffff:169.254.0.0/112".parse().unwrap();
        assert_eq!(mapped, "169.254.0.0/16".parse().unwrap());
        assert!(mapped.contains(canonical(ip("::ffff:169.254.169.254"))));
        assert!(Cidr::single(ip("::ffff:127.0.0.1")).is_single());
        assert_eq!(Cidr::single(ip("::ffff:127.0.0.1")).prefix_len(), 32);
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "::/129",
            "x/8",
            "::ffff:1.2.3.4/95",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }
}
