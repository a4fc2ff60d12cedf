//! Back-to-source: fetching content from an HTTP(S) origin with hyper.
//!
//! HTTP/1.1 and HTTP/2, TLS trusting the system roots, `SSL_CERT_FILE`/`SSL_CERT_DIR` and extra
//! CA files; the requester's headers (Authorization and the like) passed through; redirects
//! followed. Failures are classified so a user learns whether the origin said no, could not be
//! reached, broke off mid-body, or was refused by the [`policy`].
//!
//! Hardening, because whoever registers a URL chooses where a supernode connects:
//!
//! - Every connection — to the first URL and to every redirect — resolves the host, judges each
//!   address with the [`policy::OriginPolicy`] and connects to an address that passed, never to
//!   the name again. A refusal is [`Unreached::Refused`], naming host, address and rule; the
//!   supernode's peers read it as "origin unreachable" with that message.
//! - Credentials (`Authorization`, `Proxy-Authorization`, `Cookie`) go only to the scheme, host
//!   and port of the first URL: a redirect elsewhere — another host, another port, or https to
//!   http on the same host — drops them, for the rest of the chain.
//! - A URL in an error or a log line is shown by [`redacted`]: without its query (presigned
//!   object-store URLs carry their signature there) or user info.
//!
//! Not for: registry protocol logic (token dances live with the proxy).

pub mod policy;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use d7q_wire::ByteRange;
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

use crate::dial::Undialed;
use crate::pki;
use policy::{OriginPolicy, Refusal};

/// Redirects followed before giving up.
pub const MAX_REDIRECTS: usize = 10;
/// Time to connect (TCP) to an origin.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Time from request to response headers.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest silence inside a body before the origin is declared gone.
pub const BODY_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why the origin failed us.
#[derive(Debug, Clone, thiserror::Error)]
pub enum OriginError {
    /// The origin answered with an error status.
    #[error("origin answered {status} for {url}")]
    Status {
        /// The status code.
        status: u16,
        /// The URL asked.
        url: String,
    },
    /// The origin could not be reached, or the [`policy`] refused to connect to it.
    #[error("{}", unreachable_message(url, cause))]
    Unreachable {
        /// The URL (redacted).
        url: String,
        /// Why.
        cause: Unreached,
    },
    /// The body ended early or the connection broke mid-body.
    #[error("origin body truncated after {got} bytes{}", expected.map(|e| format!(" of {e}")).unwrap_or_default())]
    Truncated {
        /// Bytes received.
        got: u64,
        /// Bytes announced, if any.
        expected: Option<u64>,
    },
    /// Something about the request or answer was unusable.
    #[error("origin request invalid: {0}")]
    Invalid(String),
}

/// Why an origin was not reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreached {
    /// The network said no: resolving, connecting, TLS, or no answer in time.
    Failed(String),
    /// The [`policy`] refused every address of the origin's host (the first refusal). Nothing
    /// was sent.
    Refused(Refusal),
}

/// The process's origin policy; `None` until [`set_process_policy`] (then the built-in one).
static POLICY: RwLock<Option<OriginPolicy>> = RwLock::new(None);

/// Sets the policy every [`OriginClient::new`] from now on uses (`--origin-allow`,
/// `--origin-deny`), as [`crate::transport::set_tuning`] sets the process's QUIC tuning.
pub fn set_process_policy(policy: OriginPolicy) {
    *POLICY.write().unwrap_or_else(|e| e.into_inner()) = Some(policy);
}

/// The policy in force.
pub fn process_policy() -> OriginPolicy {
    POLICY
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// A client for origins.
#[derive(Clone)]
pub struct OriginClient {
    client: Client<hyper_rustls::HttpsConnector<PolicyConnector>, Empty<Bytes>>,
}

/// Why the client could not open a connection to an origin.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The policy refused every address (the first refusal).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The name did not resolve.
    #[error("{host}: cannot resolve: {source}")]
    Resolve {
        /// The name.
        host: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The name resolved to no address.
    #[error("{host}: no address")]
    NoAddress {
        /// The name.
        host: String,
    },
    /// A URI without a host.
    #[error("no host to connect to")]
    NoHost,
    /// Every allowed address refused the connection (the last error).
    #[error("{host}:{port}: {source}")]
    Connect {
        /// The name.
        host: String,
        /// The port.
        port: u16,
        /// The cause.
        source: std::io::Error,
    },
    /// Nothing connected within [`CONNECT_TIMEOUT`] (resolving included).
    #[error("{host}:{port}: no connection within {CONNECT_TIMEOUT:?}")]
    Timeout {
        /// The name.
        host: String,
        /// The port.
        port: u16,
    },
}

/// An origin response whose body is read piece by piece.
pub struct OriginResponse {
    /// Content-Length, when the origin gave one.
    pub length: Option<u64>,
    body: Incoming,
    got: u64,
}

/// HTTPS (and plain HTTP) connections trusting the system roots (and `SSL_CERT_FILE`) plus
/// `extra_cas`: the one trust policy for origins and registries, shared by the supernode's
/// back-to-source, the proxy's upstream and `d7q pull`. The error names the file at fault.
pub fn https_connector(
    extra_cas: &[PathBuf],
) -> Result<hyper_rustls::HttpsConnector<HttpConnector>, String> {
    let tls = tls_client_config(extra_cas)?;
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_connect_timeout(Some(CONNECT_TIMEOUT));
    http.set_nodelay(true);
    Ok(hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http))
}

/// The TLS side of [`https_connector`], for a connector that dials its own way (the proxy's and
/// the origin client's, which check every address they connect to).
pub fn tls_client_config(extra_cas: &[PathBuf]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    // Missing or unreadable system stores are not fatal: a cluster may trust only its own CA.
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    for path in extra_cas {
        for c in pki::load_certs_file(path).map_err(|e| e.to_string())? {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let tls = rustls::ClientConfig::builder_with_provider(pki::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tls)
}

impl OriginClient {
    /// A client trusting the system roots (and `SSL_CERT_FILE`) plus `extra_cas`, connecting
    /// only where the [`process_policy`] allows.
    pub fn new(extra_cas: &[PathBuf]) -> Result<Self, OriginError> {
        Self::with_policy(extra_cas, process_policy())
    }

    /// [`OriginClient::new`] with its own `policy`.
    pub fn with_policy(extra_cas: &[PathBuf], policy: OriginPolicy) -> Result<Self, OriginError> {
        let tls = tls_client_config(extra_cas).map_err(OriginError::Invalid)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(PolicyConnector {
                policy: Arc::new(policy),
            });
        let client = Client::builder(TokioExecutor::new()).build(https);
        Ok(Self { client })
    }

    /// GETs `url` with `headers` (and a Range header for `range`), following redirects.
    pub async fn fetch(
        &self,
        url: &str,
        headers: &[(String, String)],
        range: Option<ByteRange>,
    ) -> Result<OriginResponse, OriginError> {
        let first: Uri = url
            .parse()
            .map_err(|e| OriginError::Invalid(format!("{}: {e}", redacted(url))))?;
        let mut current = first.clone();
        // Once a redirect leaves the first URL's origin, credentials stay behind for good: a
        // hop through plain HTTP may have been rewritten by anyone on the path.
        let mut credentials = true;
        for _ in 0..=MAX_REDIRECTS {
            credentials &= same_origin(&first, &current);
            let mut req = Request::builder().method(Method::GET).uri(current.clone());
            for (k, v) in headers {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| OriginError::Invalid(format!("bad header name {k:?}")))?;
                if !credentials && is_credential(&name) {
                    continue;
                }
                if name == header::HOST || name == header::RANGE || name == header::CONTENT_LENGTH {
                    continue;
                }
                let value = HeaderValue::from_str(v)
                    .map_err(|_| OriginError::Invalid(format!("bad value for header {k}")))?;
                req = req.header(name, value);
            }
            if let Some(r) = range {
                if r.end <= r.start {
                    return Err(OriginError::Invalid(format!(
                        "empty range {}-{}",
                        r.start, r.end
                    )));
                }
                req = req.header(header::RANGE, format!("bytes={}-{}", r.start, r.end - 1));
            }
            let req = req
                .body(Empty::new())
                .map_err(|e| OriginError::Invalid(e.to_string()))?;
            let shown = redacted(&current.to_string());
            let resp = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req))
                .await
                .map_err(|_| OriginError::Unreachable {
                    url: shown.clone(),
                    cause: Unreached::Failed("no response in time".into()),
                })?
                .map_err(|e| OriginError::Unreachable {
                    url: shown.clone(),
                    cause: match refusal_in(&e) {
                        Some(r) => Unreached::Refused(r),
                        None => Unreached::Failed(error_chain(&e)),
                    },
                })?;
            let status = resp.status();
            if status.is_redirection() {
                let location = resp
                    .headers()
                    .get(header::LOCATION)
                    .and_then(|l| l.to_str().ok())
                    .ok_or_else(|| {
                        OriginError::Invalid(format!("{status} without Location from {shown}"))
                    })?;
                current = resolve(&current, location)?;
                continue;
            }
            let ok = match range {
                Some(_) => status == StatusCode::PARTIAL_CONTENT,
                None => status == StatusCode::OK,
            };
            if !ok {
                if range.is_some() && status == StatusCode::OK {
                    return Err(OriginError::Invalid(format!(
                        "{shown} ignored the Range header"
                    )));
                }
                return Err(OriginError::Status {
                    status: status.as_u16(),
                    url: shown,
                });
            }
            let length = resp
                .headers()
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if let (Some(r), Some(l)) = (range, length) {
                if l != r.end - r.start {
                    return Err(OriginError::Invalid(format!(
                        "{shown} sent {l} bytes for a range of {}",
                        r.end - r.start
                    )));
                }
            }
            return Ok(OriginResponse {
                length,
                body: resp.into_body(),
                got: 0,
            });
        }
        Err(OriginError::Invalid(format!(
            "more than {MAX_REDIRECTS} redirects from {}",
            redacted(url)
        )))
    }
}

/// `url` as errors and logs show it: without user info, query or fragment, which may carry
/// credentials (a presigned object-store URL's signature is in its query). A dropped query is
/// marked `?…`, dropped user info `…@`: `https://…@host/path?…`.
pub fn redacted(url: &str) -> String {
    let (base, query) = match url.find(['?', '#']) {
        Some(i) => (&url[..i], url[i..].starts_with('?') && i + 1 < url.len()),
        None => (url, false),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let authority_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    let mut shown = String::with_capacity(base.len() + 4);
    match base[after_scheme..authority_end].rfind('@') {
        Some(at) => {
            shown.push_str(&base[..after_scheme]);
            shown.push_str("…@");
            shown.push_str(&base[after_scheme + at + 1..]);
        }
        None => shown.push_str(base),
    }
    if query {
        shown.push_str("?…");
    }
    shown
}

/// The client's connector: resolves the host, judges every address with the policy and
/// connects to one that passed — the checked address itself, so a second lookup cannot answer
/// differently. Bounded by [`CONNECT_TIMEOUT`], resolving included.
#[derive(Clone)]
pub struct PolicyConnector {
    policy: Arc<OriginPolicy>,
}

impl tower_service::Service<Uri> for PolicyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or(ConnectError::NoHost)?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = port_of(&uri);
            match tokio::time::timeout(CONNECT_TIMEOUT, connect(&policy, &host, port)).await {
                Ok(r) => r.map(TokioIo::new),
                Err(_) => Err(ConnectError::Timeout { host, port }),
            }
        })
    }
}

async fn connect(policy: &OriginPolicy, host: &str, port: u16) -> Result<TcpStream, ConnectError> {
    let host_ = || host.to_string();
    crate::dial::dial_checked(host, port, |ip| policy.check(host, ip))
        .await
        .map_err(|e| match e {
            Undialed::Resolve(source) => ConnectError::Resolve {
                host: host_(),
                source,
            },
            Undialed::Refused(r) => ConnectError::Refused(r),
            Undialed::NoAddress => ConnectError::NoAddress { host: host_() },
            Undialed::Connect(source) => ConnectError::Connect {
                host: host_(),
                port,
                source,
            },
        })
}

/// The port a URI connects to: its own, else its scheme's.
fn port_of(uri: &Uri) -> u16 {
    uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    })
}

/// Whether `b` has `a`'s scheme, host and port: where `a`'s credentials may go.
fn same_origin(a: &Uri, b: &Uri) -> bool {
    a.scheme() == b.scheme()
        && a.host()
            .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
            == b.host()
                .map(|h| h.trim_end_matches('.').to_ascii_lowercase())
        && port_of(a) == port_of(b)
}

/// Headers that carry credentials, sent only within the first URL's origin.
fn is_credential(name: &HeaderName) -> bool {
    name == header::AUTHORIZATION || name == header::PROXY_AUTHORIZATION || name == header::COOKIE
}

fn unreachable_message(url: &str, cause: &Unreached) -> String {
    match cause {
        Unreached::Failed(reason) => format!("origin unreachable: {url}: {reason}"),
        // The refusal names host, address and rule; the URL adds only a path.
        Unreached::Refused(r) => r.to_string(),
    }
}

/// A policy refusal somewhere in an error's chain.
fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(ConnectError::Refused(r)) = e.downcast_ref::<ConnectError>() {
            return Some(r.clone());
        }
        at = e.source();
    }
    None
}

impl OriginResponse {
    /// The next chunk of the body; `Ok(None)` at a complete end.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, OriginError> {
        loop {
            let frame = tokio::time::timeout(BODY_IDLE_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| OriginError::Truncated {
                    got: self.got,
                    expected: self.length,
                })?;
            match frame {
                None => {
                    if let Some(l) = self.length {
                        if self.got != l {
                            return Err(OriginError::Truncated {
                                got: self.got,
                                expected: Some(l),
                            });
                        }
                    }
                    return Ok(None);
                }
                Some(Err(_)) => {
                    return Err(OriginError::Truncated {
                        got: self.got,
                        expected: self.length,
                    })
                }
                Some(Ok(f)) => {
                    if let Ok(data) = f.into_data() {
                        self.got += data.len() as u64;
                        if self.length.is_some_and(|l| self.got > l) {
                            return Err(OriginError::Invalid(
                                "origin sent more than Content-Length".into(),
                            ));
                        }
                        if !data.is_empty() {
                            return Ok(Some(data));
                        }
                    }
                }
            }
        }
    }
}

fn resolve(base: &Uri, location: &str) -> Result<Uri, OriginError> {
    let bad = |e: http::Error| {
        OriginError::Invalid(format!("bad redirect {:?}: {e}", redacted(location)))
    };
    if location.contains("://") {
        let uri: Uri = location
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.into()))?;
        if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none() {
            return Err(OriginError::Invalid(format!(
                "redirect to {}: only http and https URLs with a host are followed",
                redacted(location)
            )));
        }
        return Ok(uri);
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    let path = if location.starts_with('/') {
        location.to_string()
    } else {
        let dir = base.path().rsplit_once('/').map(|(d, _)| d).unwrap_or("");
        format!("{dir}/{location}")
    };
    Uri::builder()
        .scheme(scheme)
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(bad)
}

/// The innermost cause of an error, which is where "connection refused" lives.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut last = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        last = s.to_string();
        cur = s.source();
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redirects_resolve_against_the_base() {
        let base: Uri = "https://a.test:8443/v2/x/blobs/sha".parse().unwrap();
        assert_eq!(
            resolve(&base, "/other?sig=1").unwrap().to_string(),
            "https://a.test:8443/other?sig=1"
        );
        assert_eq!(
            resolve(&base, "y").unwrap().to_string(),
            "https://a.test:8443/v2/x/blobs/y"
        );
        assert_eq!(
            resolve(&base, "https://s3.test/b?x=1").unwrap().to_string(),
            "https://s3.test/b?x=1"
        );
        for bad in [
            "file:///etc/passwd",
            "gopher://a.test/x",
            "ftp://a.test/x?sig=secret",
        ] {
            let e = resolve(&base, bad).unwrap_err().to_string();
            assert!(
                e.contains("only http and https") || e.contains("bad redirect"),
                "{bad}: {e}"
            );
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn credentials_stay_within_the_first_origin() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        let first = u("https://reg.test/v2/x");
        for same in [
            "https://reg.test/other?sig=1",
            "https://REG.test:443/y",
            "https://reg.test./y",
        ] {
            assert!(same_origin(&first, &u(same)), "{same}");
        }
        for other in [
            // https to http on the same host (and on the same port, too).
            "http://reg.test/v2/x",
            "http://reg.test:443/v2/x",
            "https://reg.test:8443/v2/x",
            "https://s3.test/v2/x",
            "https://reg.test.evil/v2/x",
        ] {
            assert!(!same_origin(&first, &u(other)), "{other}");
        }
        assert!(same_origin(&u("http://h:80/a"), &u("http://h/b")));
        for name in ["authorization", "Proxy-Authorization", "cookie"] {
            assert!(is_credential(
                &HeaderName::from_bytes(name.as_bytes()).unwrap()
            ));
        }
        assert!(!is_credential(&header::ACCEPT));
    }

    #[test]
    fn redacted_urls_keep_no_query_or_user_info() {
        for (url, shown) in [
            ("https://h/p", "https://h/p"),
            (
                "https://s3.test/b/k?X-Amz-Signature=secret&X-Amz-Credential=AKIA",
                "https://s3.test/b/k?…",
            ),
            ("https://h:8443/p?", "https://h:8443/p"),
            ("https://h/p#frag", "https://h/p"),
            ("https://h/p#x?secret", "https://h/p"),
            ("https://user:secret@h/p?sig=secret", "https://…@h/p?…"),
            ("https://h/p@q", "https://h/p@q"),
            ("http://[::1]:80/a?b", "http://[::1]:80/a?…"),
            ("not a url?secret", "not a url?…"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }

    #[test]
    fn errors_show_urls_redacted() {
        let e = OriginError::Status {
            status: 403,
            url: redacted("https://s3.test/b?X-Amz-Signature=secret"),
        };
        assert_eq!(e.to_string(), "origin answered 403 for https://s3.test/b?…");
    }

    /// The client refuses before connecting: a literal address is judged as is, a name by what
    /// it resolves to, and the error is the typed refusal.
    #[tokio::test]
    async fn refused_origins_are_never_connected() {
        let client = OriginClient::with_policy(&[], OriginPolicy::default()).unwrap();
        for url in [
            "http://169.254.169.254/latest/meta-data/?sig=secret",
            "http://[fe80::1]/x",
            "http://[::ffff:169.254.169.254]/x",
            "http://0.0.0.0:1/x",
        ] {
            match client.fetch(url, &[], None).await {
                Err(OriginError::Unreachable {
                    cause: Unreached::Refused(r),
                    ..
                }) => {
                    assert!(r.to_string().contains("--origin-allow"), "{url}: {r}");
                    assert!(!r.to_string().contains("secret"), "{r}");
                }
                Err(e) => panic!("{url}: not refused: {e}"),
                Ok(_) => panic!("{url}: fetched"),
            }
        }
        let deny = OriginPolicy::new(
            Vec::new(),
            vec![
                policy::parse_block("127.0.0.0/8").unwrap(),
                policy::parse_block("::1").unwrap(),
            ],
        );
        let client = OriginClient::with_policy(&[], deny).unwrap();
        match client.fetch("http://localhost:1/x", &[], None).await {
            Err(OriginError::Unreachable {
                cause: Unreached::Refused(r),
                ..
            }) => {
                assert!(r.to_string().contains("origin localhost refused"), "{r}")
            }
            Err(e) => panic!("not refused: {e}"),
            Ok(_) => panic!("fetched"),
        }
    }
}
