//! Dialing a host by name through an address policy: resolve, judge every address, connect to
//! one that was judged (never a second lookup that could answer differently). The proxy's
//! upstream connector and the origin client both dial this way, each with its own policy.

use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpStream;

/// Why [`dial_checked`] connected to nothing; `R` is the policy's refusal.
#[derive(Debug)]
pub enum Undialed<R> {
    /// The name did not resolve.
    Resolve(std::io::Error),
    /// The policy refused every address (the first refusal).
    Refused(R),
    /// The name resolved to no address.
    NoAddress,
    /// Every allowed address refused the connection (the last error).
    Connect(std::io::Error),
}

/// Resolves `host` (an address literal stands for itself), keeps the addresses `check` allows,
/// and connects to the first of them that answers, with Nagle off.
pub async fn dial_checked<R>(
    host: &str,
    port: u16,
    mut check: impl FnMut(IpAddr) -> Result<(), R>,
) -> Result<TcpStream, Undialed<R>> {
    let resolved: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(Undialed::Resolve)?
            .map(|sa| sa.ip())
            .collect(),
    };
    let mut allowed: Vec<IpAddr> = Vec::new();
    let mut refused = None;
    for ip in resolved {
        match check(ip) {
            Ok(()) if !allowed.contains(&ip) => allowed.push(ip),
            Ok(()) => {}
            Err(r) => {
                refused.get_or_insert(r);
            }
        }
    }
    if allowed.is_empty() {
        return Err(refused.map_or(Undialed::NoAddress, Undialed::Refused));
    }
    let mut last = None;
    for ip in allowed {
        match TcpStream::connect(SocketAddr::new(ip, port)).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(Undialed::Connect(
        last.unwrap_or_else(|| std::io::ErrorKind::NotConnected.into()),
    ))
}
