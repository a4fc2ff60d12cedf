//! Cluster trust: the cluster CA, node identities signed by it, and the rustls configurations
//! that make the mesh mutual-TLS.
//!
//! Every node of a cluster holds a certificate from the cluster CA; a node without one can
//! neither fetch from nor serve to the mesh. Certificates name the node and carry the common
//! name [`MESH_SERVER_NAME`], which is what a client asks for: the identity that matters on the
//! mesh is "signed by our CA", not a DNS name, because nodes are dialled by IP address.
//!
//! Not for: the proxy CA of the HTTPS edge (a separate CA, see the proxy issue).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// The server name every node certificate carries and every mesh client asks for.
pub const MESH_SERVER_NAME: &str = "d7q-node";

const CA_COMMON_NAME: &str = "d7q cluster CA";
const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
const NODE_CERT_FILE: &str = "node.pem";
const NODE_KEY_FILE: &str = "node.key";

/// Errors of the PKI layer.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A PEM file held nothing usable.
    #[error("{0}: no certificate or key found in it")]
    Empty(PathBuf),
    /// A PEM file could not be parsed (a section without its end, bad base64, ...).
    #[error("{path}: not valid PEM: {reason}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong, in words (the parser's own message shows labels as byte lists).
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// rustls refused the material.
    #[error("TLS configuration failed: {0}")]
    Tls(#[from] rustls::Error),
    /// The CA directory already has a CA.
    #[error("{0} already exists; refusing to overwrite a cluster CA")]
    Exists(PathBuf),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
}

fn pem_err(path: &Path) -> impl FnOnce(pem::Error) -> PkiError + '_ {
    move |e| {
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let reason = match e {
            pem::Error::MissingSectionEnd { end_marker } => {
                format!("\"-----END {}-----\" missing", text(&end_marker))
            }
            pem::Error::IllegalSectionStart { line } => {
                format!("malformed BEGIN line {:?}", text(&line))
            }
            pem::Error::Base64Decode(why) => format!("bad base64 ({why})"),
            other => other.to_string(),
        };
        PkiError::Pem {
            path: path.to_path_buf(),
            reason,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The one crypto provider of the tree.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A cluster CA in memory: can issue node certificates.
pub struct ClusterCa {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl ClusterCa {
    /// A new CA with a fresh key.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let cert = ca_params().self_signed(&key)?;
        Ok(Self { cert, key })
    }

    /// Creates a CA in `dir` (ca.pem, ca.key); refuses to overwrite one.
    pub fn init(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        if cert_path.exists() {
            return Err(PkiError::Exists(cert_path));
        }
        crate::store::private::create_dir(dir).map_err(io_err(dir))?;
        let ca = Self::generate()?;
        write_private(&dir.join(CA_KEY_FILE), ca.key.serialize_pem().as_bytes())?;
        fs::write(&cert_path, ca.cert.pem()).map_err(io_err(&cert_path))?;
        Ok(ca)
    }

    /// Loads the CA of `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let key_path = dir.join(CA_KEY_FILE);
        let _ = crate::store::private::tighten(&key_path);
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let key = KeyPair::from_pem(&key_pem)?;
        // The issuer of a node certificate is named by the CA's distinguished name and
        // identified by its key: re-deriving the parameters from the fixed name and the stored
        // key yields an issuer whose signatures verify against the stored ca.pem.
        let cert = ca_params().self_signed(&key)?;
        let cert_path = dir.join(CA_CERT_FILE);
        fs::metadata(&cert_path).map_err(io_err(&cert_path))?;
        Ok(Self { cert, key })
    }

    /// The CA certificate in PEM.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    /// Issues a node identity named `name` (also valid for [`MESH_SERVER_NAME`]).
    pub fn issue(&self, name: &str) -> Result<NodeIdentity, PkiError> {
        let key = KeyPair::generate()?;
        let mut names = vec![MESH_SERVER_NAME.to_string()];
        if name != MESH_SERVER_NAME {
            names.push(name.to_string());
        }
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let (not_before, not_after) = validity(3650);
        params.not_before = not_before;
        params.not_after = not_after;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(NodeIdentity {
            ca: vec![CertificateDer::from(self.cert.der().to_vec())],
            chain: vec![CertificateDer::from(cert.der().to_vec())],
            key: PrivateKeyDer::try_from(key.serialize_der())
                .map_err(|e| PkiError::Verifier(e.to_string()))?,
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            ca_pem: self.cert.pem(),
        })
    }
}

fn validity(days: i64) -> (time::OffsetDateTime, time::OffsetDateTime) {
    let now = time::OffsetDateTime::now_utc();
    (
        now - time::Duration::days(1),
        now + time::Duration::days(days),
    )
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
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // Fixed validity window so that re-deriving the issuer from the key is stable; the issued
    // certificate only carries the issuer's name and key identifier, not these dates.
    params.not_before = time::macros::datetime!(2024-01-01 0:00 UTC);
    params.not_after = time::macros::datetime!(2124-01-01 0:00 UTC);
    params
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_private_file(path, bytes).map_err(io_err(path))
}

/// Writes a file readable by its owner only (private keys); one that exists with a looser mode
/// is tightened before the key is written into it.
pub(crate) fn write_private_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    crate::store::private::write_file(path, bytes)
}

/// A node's identity: its certificate chain and key, and the cluster CA it trusts.
pub struct NodeIdentity {
    ca: Vec<CertificateDer<'static>>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_pem: String,
    key_pem: String,
    ca_pem: String,
}

impl Clone for NodeIdentity {
    fn clone(&self) -> Self {
        Self {
            ca: self.ca.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            cert_pem: self.cert_pem.clone(),
            key_pem: self.key_pem.clone(),
            ca_pem: self.ca_pem.clone(),
        }
    }
}

impl NodeIdentity {
    /// A throwaway identity under a throwaway CA, for the embedded default.
    pub fn ephemeral() -> Result<Self, PkiError> {
        ClusterCa::generate()?.issue(MESH_SERVER_NAME)
    }

    /// Writes the identity to `dir` (ca.pem, node.pem, node.key).
    pub fn save(&self, dir: &Path) -> Result<(), PkiError> {
        crate::store::private::create_dir(dir).map_err(io_err(dir))?;
        let ca = dir.join(CA_CERT_FILE);
        fs::write(&ca, &self.ca_pem).map_err(io_err(&ca))?;
        let cert = dir.join(NODE_CERT_FILE);
        fs::write(&cert, &self.cert_pem).map_err(io_err(&cert))?;
        write_private(&dir.join(NODE_KEY_FILE), self.key_pem.as_bytes())
    }

    /// Loads an identity written by `d7q ca issue`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let ca_path = dir.join(CA_CERT_FILE);
        let cert_path = dir.join(NODE_CERT_FILE);
        let key_path = dir.join(NODE_KEY_FILE);
        // A key an older build (or a copy) left readable by others: take that away if we may
        // (a read-only mount may not let us; the key is still usable).
        let _ = crate::store::private::tighten(&key_path);
        let ca_pem = fs::read_to_string(&ca_path).map_err(io_err(&ca_path))?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let ca = load_certs_pem(&ca_pem, &ca_path)?;
        let chain = load_certs_pem(&cert_pem, &cert_path)?;
        let key = match PrivateKeyDer::from_pem_slice(key_pem.as_bytes()) {
            Ok(key) => key,
            Err(pem::Error::NoItemsFound) => return Err(PkiError::Empty(key_path)),
            Err(e) => return Err(pem_err(&key_path)(e)),
        };
        Ok(Self {
            ca,
            chain,
            key,
            cert_pem,
            key_pem,
            ca_pem,
        })
    }

    /// The cluster CA certificate in PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    fn roots(&self) -> Result<RootCertStore, PkiError> {
        let mut roots = RootCertStore::empty();
        for c in &self.ca {
            roots.add(c.clone())?;
        }
        Ok(roots)
    }

    /// Server side: present our certificate; verify client certificates against the cluster
    /// CA. Clients without a certificate complete the handshake (the read-only admin API
    /// allows them) and the mesh then closes their connection; clients with a certificate
    /// from another CA fail the handshake.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<rustls::ServerConfig, PkiError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(Arc::new(self.roots()?), provider())
                .allow_unauthenticated()
                .build()
                .map_err(|e| PkiError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }

    /// Client side: present our certificate; accept only servers certified by the cluster CA.
    pub fn client_config(&self, alpn: &[&[u8]]) -> Result<rustls::ClientConfig, PkiError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots()?)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Ok(cfg)
    }
}

/// Parses every certificate of a PEM text.
pub fn load_certs_pem(pem: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err(path))?;
    if certs.is_empty() {
        return Err(PkiError::Empty(path.to_path_buf()));
    }
    Ok(certs)
}

/// Parses every certificate of a PEM file.
pub fn load_certs_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let pem = fs::read_to_string(path).map_err(io_err(path))?;
    load_certs_pem(&pem, path)
}

#[cfg(test)]
mod tests {
    use rustls::client::danger::ServerCertVerifier;

    use super::*;

    #[test]
    fn reloaded_ca_issues_certificates_that_chain_to_the_saved_one() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCa::init(dir.path()).unwrap();
        assert!(matches!(
            ClusterCa::init(dir.path()),
            Err(PkiError::Exists(_))
        ));
        let ca = ClusterCa::load(dir.path()).unwrap();
        let node = ca.issue("n1").unwrap();
        node.save(&dir.path().join("n1")).unwrap();
        let loaded = NodeIdentity::load(&dir.path().join("n1")).unwrap();
        // The saved CA verifies the reloaded CA's node certificate.
        let roots = Arc::new(loaded.roots().unwrap());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .unwrap();
        let name = rustls::pki_types::ServerName::try_from(MESH_SERVER_NAME).unwrap();
        verifier
            .verify_server_cert(
                &loaded.chain[0],
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("node certificate chains to the saved CA");
        let other = NodeIdentity::ephemeral().unwrap();
        assert!(verifier
            .verify_server_cert(
                &other.chain[0],
                &[],
                &name,
                &[],
                rustls::pki_types::UnixTime::now()
            )
            .is_err());
    }

    #[test]
    fn a_broken_or_empty_pem_file_is_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCa::init(dir.path()).unwrap();
        let node = dir.path().join("n1");
        ClusterCa::load(dir.path())
            .unwrap()
            .issue("n1")
            .unwrap()
            .save(&node)
            .unwrap();
        let cert = node.join(NODE_CERT_FILE);
        let key = node.join(NODE_KEY_FILE);
        let good_cert = fs::read_to_string(&cert).unwrap();
        let good_key = fs::read_to_string(&key).unwrap();

        // A certificate cut before its END line.
        fs::write(&cert, &good_cert[..good_cert.len() / 2]).unwrap();
        let err = NodeIdentity::load(&node).err().expect("a cut certificate");
        assert!(
            matches!(err, PkiError::Pem { ref path, .. } if *path == cert),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&cert.display().to_string()), "{msg}");
        assert!(
            msg.contains("not valid PEM: \"-----END CERTIFICATE-----\" missing"),
            "{msg}"
        );

        // A key file with no key in it (a certificate where the key should be).
        fs::write(&cert, &good_cert).unwrap();
        fs::write(&key, &good_cert).unwrap();
        let err = NodeIdentity::load(&node).err().expect("no key");
        assert!(
            matches!(err, PkiError::Empty(ref p) if *p == key),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("no certificate or key found"),
            "{err}"
        );

        // Bad base64 inside a well-formed key section.
        let body = good_key.find('\n').unwrap() + 1;
        let mangled = format!("{}*{}", &good_key[..body], &good_key[body + 1..]);
        fs::write(&key, mangled).unwrap();
        let err = NodeIdentity::load(&node).err().expect("bad base64");
        assert!(
            matches!(err, PkiError::Pem { ref path, .. } if *path == key),
            "{err:?}"
        );
        assert!(err.to_string().contains("bad base64"), "{err}");

        // Restored, it loads again; and a file of no certificates at all is refused by name.
        fs::write(&key, &good_key).unwrap();
        NodeIdentity::load(&node).unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        assert!(matches!(load_certs_file(&empty), Err(PkiError::Empty(p)) if p == empty));
    }
}
