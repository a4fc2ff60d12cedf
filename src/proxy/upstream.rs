//! Requests to the real registry (or any origin a plain-HTTP proxy request names): one pooled
//! hyper client, TLS verified against the system roots, `SSL_CERT_FILE`/`SSL_CERT_DIR` and the
//! daemon's `--origin-ca` files, bodies streamed both ways. Every connection — the client's and
//! a CONNECT tunnel's — is opened by [`dial`], which resolves the name, asks the
//! [`ConnectPolicy`] about each address and connects to an address that passed.
//!
//! Not for: deciding what goes upstream (see [`super::registry`]); redirects are never
//! followed here — the client sees them as the registry sent them.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::dial::Undialed;
use crate::origin::redacted;

use super::policy::{ConnectPolicy, Purpose, Refusal};

/// Errors carried by bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the proxy sends or forwards.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Time to connect (TCP) to a registry or origin: the same as the back-to-source client's.
pub const CONNECT_TIMEOUT: Duration = crate::origin::CONNECT_TIMEOUT;
/// Time from a body-less request (GET, HEAD, DELETE) to the response head. Requests with a body
/// (uploads) have none: the registry answers after the last byte, however long that takes.
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(120);
/// Idle pooled connections per host.
pub const POOL_IDLE_PER_HOST: usize = 32;
/// How long an idle pooled connection is kept.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why the upstream side failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An `--origin-ca` file or the TLS setup was unusable.
    #[error("upstream TLS: {0}")]
    Tls(String),
    /// The request could not be sent or no answer came.
    #[error("upstream {uri}: {reason}")]
    Failed {
        /// The URI asked.
        uri: String,
        /// Why.
        reason: String,
    },
    /// No answer head within [`RESPONSE_TIMEOUT`].
    #[error("upstream {0}: no answer within {RESPONSE_TIMEOUT:?}")]
    Timeout(String),
    /// The connection policy refused the target; the client gets a 403 saying why.
    #[error(transparent)]
    Refused(Refusal),
}

/// Why the proxy could not open a connection.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The policy refused every address (the first refusal), or the port.
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
    #[error("{0}: no host to connect to")]
    NoHost(String),
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

/// Opens a TCP connection to `host:port` for `purpose`, if the policy allows: resolves the
/// name, checks every address, and connects only to addresses that passed — the checked address
/// itself, never the name again, so a second lookup cannot answer differently. Bounded by
/// [`CONNECT_TIMEOUT`].
pub async fn dial(
    policy: &ConnectPolicy,
    host: &str,
    port: u16,
    purpose: Purpose,
) -> Result<TcpStream, DialError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    match tokio::time::timeout(CONNECT_TIMEOUT, dial_checked(policy, host, port, purpose)).await {
        Ok(r) => r,
        Err(_) => Err(DialError::Timeout {
            host: host.to_string(),
            port,
        }),
    }
}

async fn dial_checked(
    policy: &ConnectPolicy,
    host: &str,
    port: u16,
    purpose: Purpose,
) -> Result<TcpStream, DialError> {
    if host.parse::<IpAddr>().is_err() {
        // A port no address could open costs no DNS query (an address literal is judged as
        // an address: the refusal names what it is).
        policy.check_name(host, port, purpose)?;
    }
    let host_ = || host.to_string();
    crate::dial::dial_checked(host, port, |ip| policy.check(host, ip, port, purpose))
        .await
        .map_err(|e| match e {
            Undialed::Resolve(source) => DialError::Resolve {
                host: host_(),
                source,
            },
            Undialed::Refused(r) => DialError::Refused(r),
            Undialed::NoAddress => DialError::NoAddress { host: host_() },
            Undialed::Connect(source) => DialError::Connect {
                host: host_(),
                port,
                source,
            },
        })
}

/// The upstream client's connector: [`dial`] for every new connection, with the purpose the
/// URI implies (a configured registry, else a tunnel-like HTTPS target, else forwarding).
#[derive(Clone)]
pub struct PolicyConnector {
    policy: Arc<ConnectPolicy>,
}

impl tower_service::Service<Uri> for PolicyConnector {
    type Response = TokioIo<TcpStream>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy.clone();
        Box::pin(async move {
            let https = uri.scheme() == Some(&Scheme::HTTPS);
            let host = uri
                .host()
                .ok_or_else(|| DialError::NoHost(redacted(&uri.to_string())))?;
            let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
            let purpose = policy.purpose_of(host, port, https);
            dial(&policy, host, port, purpose).await.map(TokioIo::new)
        })
    }
}

/// Where a registry request goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `https` (intercepted, mirror) or `http` (plain proxy requests).
    pub scheme: Scheme,
    /// `host[:port]`.
    pub authority: Authority,
}

impl Target {
    /// The absolute URI of `path_and_query` at this target.
    pub fn uri(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let pq: PathAndQuery = path_and_query.parse()?;
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// The pooled client.
#[derive(Clone)]
pub struct Upstream {
    client: Client<hyper_rustls::HttpsConnector<PolicyConnector>, Body>,
}

impl Upstream {
    /// A client trusting the system roots (and `SSL_CERT_FILE`) plus `extra_cas`, connecting
    /// where `policy` allows.
    pub fn new(extra_cas: &[PathBuf], policy: Arc<ConnectPolicy>) -> Result<Self, UpstreamError> {
        let tls = crate::origin::tls_client_config(extra_cas).map_err(UpstreamError::Tls)?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(PolicyConnector { policy });
        let client = Client::builder(TokioExecutor::new())
            .timer(TokioTimer::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST)
            .build(https);
        Ok(Self { client })
    }

    /// Sends `req` (absolute URI, hop-by-hop headers already removed) and returns the answer
    /// with its body streaming and its hop-by-hop headers removed.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let uri = redacted(&req.uri().to_string());
        let bodyless = hyper::body::Body::is_end_stream(req.body());
        let fut = self.client.request(req);
        let resp = if bodyless {
            tokio::time::timeout(RESPONSE_TIMEOUT, fut)
                .await
                .map_err(|_| UpstreamError::Timeout(uri.clone()))?
        } else {
            fut.await
        };
        let resp = resp.map_err(|e| match refusal_in(&e) {
            Some(r) => UpstreamError::Refused(r),
            None => UpstreamError::Failed {
                uri,
                reason: error_chain(&e),
            },
        })?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(|e| Box::new(e) as BoxError).boxed_unsync(),
        ))
    }

    /// A body-less request with only `headers`.
    pub async fn simple(
        &self,
        method: http::Method,
        uri: Uri,
        headers: HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut req = Request::builder()
            .method(method)
            .uri(uri)
            .body(empty())
            .map_err(|e| UpstreamError::Failed {
                uri: String::new(),
                reason: e.to_string(),
            })?;
        *req.headers_mut() = headers;
        self.send(req).await
    }
}

/// Removes the hop-by-hop headers (RFC 9110 §7.6.1), those named by `Connection` included, and
/// the proxy's own.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        headers.remove(n);
    }
    for n in [
        header::CONNECTION,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
    ] {
        headers.remove(n);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

/// An empty body.
pub fn empty() -> Body {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body of `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A short text answer.
pub fn text(status: StatusCode, msg: impl Into<String>) -> Response<Body> {
    let mut msg = msg.into();
    msg.push('\n');
    let mut r = Response::new(full(msg));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

/// The policy's refusal somewhere in an error's sources (the client wraps the connector's).
fn refusal_in(e: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let mut at = Some(e);
    while let Some(e) = at {
        if let Some(DialError::Refused(r)) = e.downcast_ref::<DialError>() {
            return Some(r.clone());
        }
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r.clone());
        }
        at = e.source();
    }
    None
}

/// An error with its sources, on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Foo"),
        );
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic x"),
        );
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer t"));
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("/v2/x/blobs/uploads/1"),
        );
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        left.sort();
        assert_eq!(left, ["authorization", "location"]);
    }

    #[test]
    fn target_uris() {
        let t = Target {
            scheme: Scheme::HTTPS,
            authority: "registry.test:5000".parse().unwrap(),
        };
        assert_eq!(
            t.uri("/v2/a/manifests/latest?x=1").unwrap().to_string(),
            "https://registry.test:5000/v2/a/manifests/latest?x=1"
        );
    }
}
