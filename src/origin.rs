//! Back-to-source: fetching content from an HTTP(S) origin with hyper.
//!
//! HTTP/1.1 and HTTP/2, TLS trusting the system roots, `SSL_CERT_FILE`/`SSL_CERT_DIR` and extra
//! CA files; the requester's headers (Authorization and the like) passed through; redirects
//! followed, without credentials when they leave the origin's host (signed object-store URLs
//! refuse them). Failures are classified so a user learns whether the origin said no, could not
//! be reached, or broke off mid-body.
//!
//! Not for: registry protocol logic (token dances live with the proxy).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use d7q_wire::ByteRange;
use http::{header, HeaderName, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

use crate::pki;

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
    /// The origin could not be reached.
    #[error("origin unreachable: {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
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

/// A client for origins.
#[derive(Clone)]
pub struct OriginClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Empty<Bytes>>,
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

/// The TLS side of [`https_connector`], for a connector that dials its own way (the proxy's,
/// which checks every address it connects to).
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
    /// A client trusting the system roots (and `SSL_CERT_FILE`) plus `extra_cas`.
    pub fn new(extra_cas: &[PathBuf]) -> Result<Self, OriginError> {
        let https = https_connector(extra_cas).map_err(OriginError::Invalid)?;
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
        let mut current: Uri = url
            .parse()
            .map_err(|e| OriginError::Invalid(format!("{url}: {e}")))?;
        let first_authority = current.authority().cloned();
        for _ in 0..=MAX_REDIRECTS {
            let same_host = current.authority() == first_authority.as_ref();
            let mut req = Request::builder().method(Method::GET).uri(current.clone());
            for (k, v) in headers {
                let name = HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| OriginError::Invalid(format!("bad header name {k:?}")))?;
                if !same_host && name == header::AUTHORIZATION {
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
            let shown = current.to_string();
            let resp = tokio::time::timeout(RESPONSE_TIMEOUT, self.client.request(req))
                .await
                .map_err(|_| OriginError::Unreachable {
                    url: shown.clone(),
                    reason: "no response in time".into(),
                })?
                .map_err(|e| OriginError::Unreachable {
                    url: shown.clone(),
                    reason: error_chain(&e),
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
            "more than {MAX_REDIRECTS} redirects from {url}"
        )))
    }
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
    let bad = |e: http::Error| OriginError::Invalid(format!("bad redirect {location:?}: {e}"));
    if location.contains("://") {
        return location
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(e.into()));
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
    }
}
