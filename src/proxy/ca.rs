//! The proxy CA and the leaf certificates it signs for intercepted hosts.
//!
//! A host that trusts the proxy CA (fetched from `GET /ca.crt` on the proxy, or printed by
//! `d7q ca proxy-show`) accepts the daemon as any registry it intercepts. The CA lives in a
//! directory of its own (`proxy-ca.pem`, `proxy-ca.key`), apart from the cluster CA: trusting
//! the proxy must not let anyone into the mesh, and the other way round.
//!
//! Leaf certificates are made on the first CONNECT to a host and kept in a bounded cache of
//! ready rustls server configurations; the cache refuses hosts the `--registry` rules do not
//! intercept.
//!
//! The CA a daemon makes on first start is valid for [`CA_DAYS`] and name-constrained to the
//! registries configured then (their DNS names and subdomains; IP literals only where a rule is
//! one, all other addresses excluded): a host that trusts it trusts it for nothing else, even if
//! its key leaks. At every start the daemon checks that the CA still vouches for every
//! configured registry and has not expired; if not, it refuses to start and says how to rotate
//! (move the directory away so a new CA is made, or make one with `d7q ca proxy-init`, then
//! distribute the new `/ca.crt`).
//!
//! Not for: the cluster CA and node identities ([`crate::pki`]).

use std::collections::{HashMap, VecDeque};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, CidrSubnet, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, GeneralSubtree, IsCa, KeyPair, KeyUsagePurpose, NameConstraints,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki;

/// The CA certificate in a proxy CA directory.
pub const CERT_FILE: &str = "proxy-ca.pem";
/// The CA key in a proxy CA directory (mode 0600).
pub const KEY_FILE: &str = "proxy-ca.key";
/// Leaf configurations kept; the oldest goes first. A proxy sees a handful of registries; the
/// bound only stops a client that CONNECTs to endless names from growing memory.
pub const LEAF_CACHE: usize = 1024;
/// Validity of a leaf certificate, in days (a restarted daemon makes new ones).
pub const LEAF_DAYS: i64 = 397;
/// Validity of a proxy CA made here, in days: long enough not to be a chore, short enough that
/// a copied key does not vouch for years.
pub const CA_DAYS: i64 = 730;
/// ALPN protocols offered to clients of intercepted connections.
pub const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

const CA_COMMON_NAME: &str = "d7q proxy CA";

/// Errors of the proxy CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The directory already holds a proxy CA.
    #[error("{0} already exists; refusing to overwrite a proxy CA")]
    Exists(PathBuf),
    /// rcgen could not make or read a certificate or key.
    #[error("proxy CA: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the leaf.
    #[error("proxy CA: TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// A leaf was asked for a host no `--registry` rule intercepts.
    #[error("{0}: not an intercepted registry; no certificate is made for it")]
    NotIntercepted(String),
    /// The stored CA cannot vouch for a configured registry (made for other registries, or
    /// expired).
    #[error(
        "the proxy CA in {dir} does not vouch for registry {host} ({reason}); rotate it: move \
         {dir} away and restart (a new CA is made for the configured registries), or make one \
         with `d7q ca proxy-init`, then give hosts the new /ca.crt"
    )]
    DoesNotCover {
        /// The CA directory.
        dir: PathBuf,
        /// The registry.
        host: String,
        /// What verification said.
        reason: String,
    },
}

/// A proxy CA in memory: signs leaf certificates.
pub struct ProxyCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The stored certificate, as served at `/ca.crt`.
    pem: String,
}

impl ProxyCa {
    /// Creates a CA in `dir`; refuses to overwrite one.
    pub fn init(dir: &Path) -> Result<Self, CaError> {
        Self::init_constrained(dir, &[])
    }

    /// Creates a CA in `dir` whose certificate is name-constrained to `domains` (DNS names and
    /// their subdomains), so a host that trusts it trusts it for nothing else; none: no
    /// constraint. Refuses to overwrite a CA.
    pub fn init_constrained(dir: &Path, domains: &[String]) -> Result<Self, CaError> {
        let cert_path = dir.join(CERT_FILE);
        if cert_path.exists() {
            return Err(CaError::Exists(cert_path));
        }
        crate::store::private::create_dir(dir).map_err(io_err(dir))?;
        let key = KeyPair::generate()?;
        let mut params = ca_params();
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(CA_DAYS);
        if !domains.is_empty() {
            params.name_constraints = Some(constraints(domains));
        }
        // Only the stored certificate carries the constraint: leaves name their issuer by
        // distinguished name and key, which the unconstrained parameters of `load` share.
        let cert = params.self_signed(&key)?;
        let pem = cert.pem();
        write_private(&dir.join(KEY_FILE), key.serialize_pem().as_bytes())?;
        // Private too: by default the CA lives in the daemon's data directory, which is private
        // throughout (`/ca.crt` serves the certificate to whoever needs it).
        crate::store::private::write_file(&cert_path, pem.as_bytes())
            .map_err(io_err(&cert_path))?;
        Ok(Self { cert, key, pem })
    }

    /// Loads the CA of `dir`.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let key_path = dir.join(KEY_FILE);
        // As for node keys: tightened if we may, usable if we may not (a read-only mount).
        let _ = crate::store::private::tighten(&key_path);
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        // As for the cluster CA: a leaf names its issuer by distinguished name and key
        // identifier, both fixed by the parameters and the stored key, so an issuer re-derived
        // here signs leaves that verify against the stored certificate.
        let cert = ca_params().self_signed(&key)?;
        let cert_path = dir.join(CERT_FILE);
        let pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        Ok(Self { cert, key, pem })
    }

    /// Loads the CA of `dir`, creating it first when the directory has none — constrained to
    /// the registries of the `--registry` patterns `registries` — and checks that it vouches
    /// for each of them now.
    pub fn load_or_init(dir: &Path, registries: &[String]) -> Result<Self, CaError> {
        let ca = if dir.join(CERT_FILE).exists() {
            Self::load(dir)?
        } else {
            Self::init_constrained(dir, &constraint_names(registries))?
        };
        for host in sample_hosts(registries) {
            ca.vouches_for(&host)
                .map_err(|reason| CaError::DoesNotCover {
                    dir: dir.to_path_buf(),
                    host: host.clone(),
                    reason,
                })?;
        }
        Ok(ca)
    }

    /// Whether a client trusting only this CA's stored certificate accepts a leaf it makes for
    /// `host` now (name constraints); the verifier's reason if not. (rustls does not check a
    /// trust anchor's own dates; the CA's validity is [`CA_DAYS`] from its making.)
    pub fn vouches_for(&self, host: &str) -> Result<(), String> {
        use rustls::client::danger::ServerCertVerifier;
        let (leaf, _) = self.issue(host).map_err(|e| e.to_string())?;
        let at = rustls::pki_types::UnixTime::now();
        let mut roots = rustls::RootCertStore::empty();
        for c in pki::load_certs_pem(&self.pem, Path::new(CERT_FILE)).map_err(|e| e.to_string())? {
            roots.add(c).map_err(|e| e.to_string())?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            pki::provider(),
        )
        .build()
        .map_err(|e| e.to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from(host.to_string()).map_err(|e| e.to_string())?;
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], at)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A fresh leaf for `host` (a DNS name or an IP literal): certificate and key, DER.
    pub fn issue(
        &self,
        host: &str,
    ) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), CaError> {
        let key = KeyPair::generate()?;
        // rcgen makes an IP SAN of a string that parses as an address, a DNS SAN otherwise.
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, host);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(LEAF_DAYS);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        let key = PrivateKeyDer::try_from(key.serialize_der())
            .map_err(|e| CaError::Tls(rustls::Error::General(e.to_string())))?;
        Ok((CertificateDer::from(cert.der().to_vec()), key))
    }
}

/// Ready TLS server configurations per intercepted host, made on first use.
pub struct LeafCache {
    ca: ProxyCa,
    rules: super::rules::Rules,
    /// std Mutex: held only for map operations, never across an await or a key generation.
    inner: Mutex<Leaves>,
    capacity: usize,
}

#[derive(Default)]
struct Leaves {
    map: HashMap<String, Arc<rustls::ServerConfig>>,
    order: VecDeque<String>,
}

impl LeafCache {
    /// A cache of at most `capacity` hosts over `ca`, for hosts that `rules` intercept.
    pub fn new(ca: ProxyCa, capacity: usize, rules: super::rules::Rules) -> Self {
        Self {
            ca,
            rules,
            inner: Mutex::new(Leaves::default()),
            capacity: capacity.max(1),
        }
    }

    /// The CA.
    pub fn ca(&self) -> &ProxyCa {
        &self.ca
    }

    /// The server configuration for `host:port`, made and cached on first use; refused for a
    /// target the rules do not intercept (IP literals included, unless a rule names one).
    pub fn config(&self, host: &str, port: u16) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if !self.rules.intercepts(&host, port) {
            return Err(CaError::NotIntercepted(host));
        }
        if let Some(c) = self.lock().map.get(&host) {
            return Ok(c.clone());
        }
        // Made outside the lock; two first CONNECTs racing both make one, the last one stays.
        let (cert, key) = self.ca.issue(&host)?;
        let mut config = rustls::ServerConfig::builder_with_provider(pki::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)?;
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let config = Arc::new(config);
        let mut leaves = self.lock();
        if leaves.map.insert(host.clone(), config.clone()).is_none() {
            leaves.order.push_back(host);
        }
        while leaves.map.len() > self.capacity {
            let Some(old) = leaves.order.pop_front() else {
                break;
            };
            leaves.map.remove(&old);
        }
        Ok(config)
    }

    /// Hosts cached now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Leaves> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Name constraints for `names`: DNS names (each with its subdomains) and IP literals; every
/// address not named is excluded, so a leaf for an IP literal verifies only where a rule names
/// that address.
fn constraints(names: &[String]) -> NameConstraints {
    let mut permitted = Vec::new();
    let mut ips = false;
    for n in names {
        let n = n.trim().trim_end_matches('.').to_ascii_lowercase();
        match n
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
        {
            Ok(std::net::IpAddr::V4(a)) => {
                ips = true;
                permitted.push(GeneralSubtree::IpAddress(CidrSubnet::V4(
                    a.octets(),
                    [0xff; 4],
                )));
            }
            Ok(std::net::IpAddr::V6(a)) => {
                ips = true;
                permitted.push(GeneralSubtree::IpAddress(CidrSubnet::V6(
                    a.octets(),
                    [0xff; 16],
                )));
            }
            Err(_) => permitted.push(GeneralSubtree::DnsName(n)),
        }
    }
    if !permitted
        .iter()
        .any(|t| matches!(t, GeneralSubtree::DnsName(_)))
    {
        // Addresses only: permit names under the reserved `invalid` TLD alone (RFC 2606),
        // since without any DNS subtree every name would be allowed.
        permitted.push(GeneralSubtree::DnsName("invalid".into()));
    }
    let excluded = if ips {
        Vec::new()
    } else {
        vec![
            GeneralSubtree::IpAddress(CidrSubnet::V4([0; 4], [0; 4])),
            GeneralSubtree::IpAddress(CidrSubnet::V6([0; 16], [0; 16])),
        ]
    };
    NameConstraints {
        permitted_subtrees: permitted,
        excluded_subtrees: excluded,
    }
}

/// The names a CA made for `--registry` patterns is constrained to: each pattern's host (a
/// wildcard's domain), without ports, once each.
fn constraint_names(registries: &[String]) -> Vec<String> {
    let mut names: Vec<String> = registries.iter().map(|p| pattern_host(p).1).collect();
    names.sort();
    names.dedup();
    names
}

/// A host each `--registry` pattern intercepts, to check a CA against: the host itself, or a
/// name under a wildcard's domain.
fn sample_hosts(registries: &[String]) -> Vec<String> {
    let mut hosts: Vec<String> = registries
        .iter()
        .map(|p| match pattern_host(p) {
            (true, domain) => format!("registry.{domain}"),
            (false, host) => host,
        })
        .collect();
    hosts.sort();
    hosts.dedup();
    hosts
}

/// A pattern's host without port or `*.`, lower case, and whether it was a wildcard.
fn pattern_host(pattern: &str) -> (bool, String) {
    let p = pattern.trim().to_ascii_lowercase();
    // `[v6]:port`, `host:port`, `v6`, `host`.
    let host = if let Some(rest) = p.strip_prefix('[') {
        rest.split(']').next().unwrap_or_default().to_string()
    } else if p.matches(':').count() == 1 {
        p.split(':').next().unwrap_or_default().to_string()
    } else {
        p
    };
    match host.strip_prefix("*.") {
        Some(d) => (true, d.to_string()),
        None => (false, host),
    }
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, CA_COMMON_NAME);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "d7q");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // Fixed, so that the issuer re-derived from the key on load is the stored one.
    params.not_before = time::macros::datetime!(2024-01-01 0:00 UTC);
    params.not_after = time::macros::datetime!(2124-01-01 0:00 UTC);
    params
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    pki::write_private_file(path, bytes).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::RootCertStore;

    fn verify(ca_pem: &str, leaf: &CertificateDer<'static>, name: &str) -> Result<(), String> {
        let mut roots = RootCertStore::empty();
        for c in pki::load_certs_pem(ca_pem, Path::new("ca")).unwrap() {
            roots.add(c).unwrap();
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            pki::provider(),
        )
        .build()
        .unwrap();
        verifier
            .verify_server_cert(
                leaf,
                &[],
                &ServerName::try_from(name.to_string()).unwrap(),
                &[],
                UnixTime::now(),
            )
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    #[test]
    fn leaves_verify_against_the_stored_ca_after_reload() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ProxyCa::init(dir.path()).unwrap();
        assert!(matches!(ProxyCa::init(dir.path()), Err(CaError::Exists(_))));
        let stored = fs::read_to_string(dir.path().join(CERT_FILE)).unwrap();
        assert_eq!(ca.cert_pem(), stored);
        let (leaf, _) = ca.issue("registry.test").unwrap();
        verify(&stored, &leaf, "registry.test").unwrap();
        assert!(verify(&stored, &leaf, "other.test").is_err());

        let reloaded = ProxyCa::load_or_init(dir.path(), &[]).unwrap();
        assert_eq!(reloaded.cert_pem(), stored);
        let (leaf, _) = reloaded.issue("127.0.0.2").unwrap();
        verify(&stored, &leaf, "127.0.0.2").unwrap();

        let other = tempfile::tempdir().unwrap();
        let stranger = ProxyCa::init(other.path()).unwrap();
        let (leaf, _) = stranger.issue("registry.test").unwrap();
        assert!(verify(&stored, &leaf, "registry.test").is_err());
    }

    #[test]
    fn a_constrained_ca_vouches_only_for_its_domains() {
        let dir = tempfile::tempdir().unwrap();
        ProxyCa::init_constrained(dir.path(), &["registry.test".into(), "corp.example".into()])
            .unwrap();
        let ca = ProxyCa::load(dir.path()).unwrap();
        for ok in ["registry.test", "harbor.corp.example"] {
            let (leaf, _) = ca.issue(ok).unwrap();
            verify(ca.cert_pem(), &leaf, ok).unwrap();
        }
        let (leaf, _) = ca.issue("registry-1.docker.io").unwrap();
        let err = verify(ca.cert_pem(), &leaf, "registry-1.docker.io").unwrap_err();
        assert!(err.to_lowercase().contains("name"), "{err}");
    }

    #[test]
    fn leaf_cache_is_bounded_and_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let rules = super::super::rules::Rules::new(&["*.test".to_string()]);
        let cache = LeafCache::new(ProxyCa::init(dir.path()).unwrap(), 3, rules);
        let a = cache.config("a.test", 443).unwrap();
        assert!(Arc::ptr_eq(&a, &cache.config("A.TEST.", 443).unwrap()));
        for h in ["b.test", "c.test", "d.test", "e.test"] {
            cache.config(h, 443).unwrap();
        }
        assert_eq!(cache.len(), 3);
        // a.test was the oldest: made again, a new configuration.
        assert!(!Arc::ptr_eq(&a, &cache.config("a.test", 443).unwrap()));
        assert_eq!(cache.len(), 3);
        // Nothing is made for a host the rules do not intercept, addresses included.
        for h in ["other.example", "127.0.0.1", "::1"] {
            assert!(
                matches!(cache.config(h, 443), Err(CaError::NotIntercepted(_))),
                "{h}"
            );
        }
        assert_eq!(cache.len(), 3);
    }

    #[test]
    fn the_ca_made_on_first_start_vouches_for_the_registries_only_and_not_for_long() {
        let dir = tempfile::tempdir().unwrap();
        let rules = [
            "registry.test:5000".to_string(),
            "*.corp.example".to_string(),
        ];
        let ca = ProxyCa::load_or_init(dir.path(), &rules).unwrap();
        for ok in ["registry.test", "harbor.corp.example", "corp.example"] {
            ca.vouches_for(ok).unwrap();
        }
        for bad in [
            "registry-1.docker.io",
            "evil.test",
            "127.0.0.2",
            "::1",
            "10.0.0.1",
        ] {
            assert!(ca.vouches_for(bad).is_err(), "{bad}");
        }
        // Valid for CA_DAYS, not a century (read by openssl: rustls does not check the dates
        // of a trust anchor, clients like Go's do).
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend"])
            .arg(((CA_DAYS - 2) * 86_400).to_string())
            .arg("-in")
            .arg(dir.path().join(CERT_FILE))
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "expires too soon: {out:?}");
        let out = std::process::Command::new("openssl")
            .args(["x509", "-noout", "-checkend"])
            .arg(((CA_DAYS + 2) * 86_400).to_string())
            .arg("-in")
            .arg(dir.path().join(CERT_FILE))
            .output()
            .expect("run openssl");
        assert!(!out.status.success(), "valid too long: {out:?}");
        // The same directory, restarted with the same rules: the same CA.
        let again = ProxyCa::load_or_init(dir.path(), &rules).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }

    #[test]
    fn a_registry_the_ca_was_not_made_for_stops_the_start_with_how_to_rotate() {
        let dir = tempfile::tempdir().unwrap();
        ProxyCa::load_or_init(dir.path(), &["registry.test".to_string()]).unwrap();
        let more = [
            "registry.test".to_string(),
            "harbor.example:8443".to_string(),
        ];
        let err = match ProxyCa::load_or_init(dir.path(), &more) {
            Err(e @ CaError::DoesNotCover { .. }) => e.to_string(),
            Err(e) => panic!("another error: {e}"),
            Ok(_) => panic!("a CA for registry.test accepted harbor.example"),
        };
        assert!(err.contains("harbor.example"), "{err}");
        assert!(err.contains("move") && err.contains("proxy-init"), "{err}");
    }

    #[test]
    fn an_address_rule_constrains_the_ca_to_that_address() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ProxyCa::load_or_init(dir.path(), &["10.1.2.3:5000".to_string()]).unwrap();
        ca.vouches_for("10.1.2.3").unwrap();
        for bad in ["10.1.2.4", "registry.test"] {
            assert!(ca.vouches_for(bad).is_err(), "{bad}");
        }
    }
}
