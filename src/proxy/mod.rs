//! The daemon's HTTP side: an HTTPS proxy for Docker's `HTTPS_PROXY`, a registry mirror, the
//! proxy CA at `/ca.crt`, `/health`, and `/metrics` unless the daemon serves them on their own
//! address (`--metrics`) — all on one TCP port (`--proxy`).
//!
//! Requests, by their form:
//!
//! - `CONNECT host:port` to a host matching the intercept rules (`--registry`): answered 200,
//!   then TLS is terminated with a leaf certificate for the host signed by the proxy CA
//!   ([`ca`]), and the decrypted HTTP/1.1 or HTTP/2 requests go to [`registry`] for that host.
//!   Every other CONNECT is tunnelled byte for byte ([`tunnel`]) where the connection policy
//!   allows ([`policy`]: port 443 and the rules' ports, never loopback, link-local or the
//!   daemon's own listeners unless `--proxy-allow` says so); else 403 with the reason.
//! - `GET http://host/…` (absolute form): forwarded under the same policy (port 80). Never
//!   answered from the mesh, even for an intercepted host: a check over cleartext proves nothing.
//! - Origin form: `/ca.crt`, `/metrics`, `/health`, and `/v2/…` as a registry mirror for the
//!   upstream named by containerd's `?ns=HOST`, else `--mirror-upstream`. An `ns` that names no
//!   configured registry is refused (403): the mirror is not a way to reach any registry, and a
//!   registry nobody configured must not vouch for a blob in the mesh.
//!
//! Bounds: [`MAX_CONNECTIONS`] client connections (an intercepted or tunnelled CONNECT keeps its
//! slot until it ends), [`HEADER_READ_TIMEOUT`] per request head (and for the first bytes of
//! an intercepted connection, before its HTTP version is known), [`TLS_HANDSHAKE_TIMEOUT`],
//! [`tunnel::IDLE_TIMEOUT`], [`upstream::CONNECT_TIMEOUT`], [`ca::LEAF_CACHE`].
//!
//! Not for: the mesh ([`crate::blobs`] is the interface), registry client logic for `d7q pull`.

pub mod ca;
pub mod policy;
pub mod registry;
pub mod rules;
pub mod tokens;
pub mod tunnel;
pub mod upstream;

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::uri::{Authority, Scheme};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info_span, warn, Instrument};

use crate::blobs::MeshBlobs;
use crate::metrics::{self, Metrics, ProxyKind};
use policy::{Allow, ConnectPolicy, Purpose};
use registry::{AccessCache, Route};
use rules::Rules;
use tokens::Tokens;
use upstream::{Body, BoxError, DialError, Target, Upstream};

/// Client connections served at once; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 1024;
/// Time a client has to send a request head (also how long an idle keep-alive HTTP/1.1
/// connection is kept).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Time a client of an intercepted CONNECT has to finish the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// Concurrent HTTP/2 streams per intercepted connection.
pub const MAX_H2_STREAMS: u32 = 128;
/// HTTP/2 keep-alive ping interval on intercepted connections; an unanswered ping closes it.
pub const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// The mirror upstream when none is configured: what Docker's `registry-mirrors` expects.
pub const DEFAULT_MIRROR_UPSTREAM: &str = "registry-1.docker.io";

/// What the proxy needs from the daemon's configuration.
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Intercept rules (`--registry`).
    pub registries: Vec<String>,
    /// The proxy CA directory; created on first start when empty.
    pub ca_dir: PathBuf,
    /// Extra CAs trusted for registries (`--origin-ca`).
    pub origin_ca: Vec<PathBuf>,
    /// The mirror's default upstream, `host[:port]` (HTTPS).
    pub mirror_upstream: String,
    /// `--proxy-allow` rules: what the connection policy allows beyond its defaults.
    pub allow: Vec<Allow>,
    /// The daemon's own TCP listeners, which the proxy never connects to.
    pub own: Vec<SocketAddr>,
    /// Whether `/metrics` is served on the proxy port (no `--metrics` address of its own).
    pub serve_metrics: bool,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The proxy CA could not be created or loaded.
    #[error(transparent)]
    Ca(#[from] ca::CaError),
    /// The upstream client could not be built.
    #[error(transparent)]
    Upstream(#[from] upstream::UpstreamError),
    /// `--mirror-upstream` is not `host[:port]`.
    #[error("--mirror-upstream {0:?}: expected HOST[:PORT]")]
    MirrorUpstream(String),
}

/// The proxy's shared state.
pub struct Proxy {
    rules: Rules,
    policy: Arc<ConnectPolicy>,
    serve_metrics: bool,
    mirror_upstream: Authority,
    leaves: ca::LeafCache,
    upstream: Upstream,
    mesh: Arc<dyn MeshBlobs>,
    metrics: Arc<Metrics>,
    access: AccessCache,
    tokens: Tokens,
}

impl Proxy {
    /// Loads (or creates) the proxy CA and builds the upstream client.
    pub fn new(
        cfg: ProxyConfig,
        mesh: Arc<dyn MeshBlobs>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, ProxyError> {
        let mirror_upstream = parse_upstream(&cfg.mirror_upstream)
            .ok_or_else(|| ProxyError::MirrorUpstream(cfg.mirror_upstream.clone()))?;
        let ca = ca::ProxyCa::load_or_init(&cfg.ca_dir, &cfg.registries)?;
        let mirror = (
            mirror_upstream.host().to_string(),
            mirror_upstream.port_u16().unwrap_or(443),
        );
        let policy = Arc::new(ConnectPolicy::new(
            &cfg.registries,
            Some(mirror),
            cfg.allow,
            cfg.own,
        ));
        Ok(Arc::new(Self {
            rules: Rules::new(&cfg.registries),
            upstream: Upstream::new(&cfg.origin_ca, policy.clone())?,
            policy,
            serve_metrics: cfg.serve_metrics,
            mirror_upstream,
            leaves: ca::LeafCache::new(ca, ca::LEAF_CACHE, Rules::new(&cfg.registries)),
            mesh,
            metrics,
            access: AccessCache::default(),
            tokens: Tokens::default(),
        }))
    }

    /// The proxy CA certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        self.leaves.ca().cert_pem()
    }
}

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    // Owning the connection tasks means dropping this set on return ends them all.
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(error) => {
                // Out of file descriptors, most likely: back off instead of spinning.
                warn!(%error, "proxy: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, "proxy: connection limit reached, closing");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        conns.spawn(
            async move {
                // Shared with the CONNECT tasks: the slot is free once all of them end.
                let slot = Arc::new(slot);
                let service = service_fn(move |req: Request<Incoming>| {
                    let (proxy, slot) = (proxy.clone(), slot.clone());
                    async move { Ok::<_, Infallible>(outer(proxy, req, slot).await) }
                });
                let result = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
                if let Err(error) = result {
                    debug!(%error, "proxy: connection ended");
                }
            }
            .instrument(info_span!("proxy", %peer)),
        );
    }
}

/// A request on a client connection to the proxy.
async fn outer(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    slot: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    if req.method() == Method::CONNECT {
        return connect(proxy, req, slot).await;
    }
    let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
    if let Some(authority) = req.uri().authority().cloned() {
        // Absolute form: a plain-HTTP proxy request.
        if req.uri().scheme() != Some(&Scheme::HTTP) {
            return upstream::text(
                StatusCode::BAD_REQUEST,
                "only http:// URLs in absolute form; use CONNECT for https",
            );
        }
        let (host, port) = (
            authority.host().to_string(),
            authority.port_u16().unwrap_or(80),
        );
        let route = Route {
            target: Target {
                scheme: Scheme::HTTP,
                authority,
            },
            mirror: false,
        };
        if proxy.rules.intercepts(&host, port) {
            return registry::handle(proxy, route, req).await;
        }
        return registry::passthrough(proxy, route, req, ProxyKind::Forward).await;
    }
    // Owned: a borrow of `req` alive across the awaits below makes the future not provably Send.
    let path = req.uri().path().to_string();
    if path == "/metrics" && !proxy.serve_metrics {
        // Off the proxy port, which every local client (every tenant) can reach.
        return upstream::text(
            StatusCode::NOT_FOUND,
            "metrics are on the --metrics address",
        );
    }
    if let Some(r) = metrics::handle(&req, &proxy.metrics) {
        return r.map(|b| b.map_err(|never| match never {}).boxed_unsync());
    }
    if path == "/ca.crt" {
        return ca_crt(&proxy, req.method());
    }
    if path == "/v2" || path.starts_with("/v2/") {
        let Some(target) = mirror_target(&proxy, req.uri().query()) else {
            return upstream::text(StatusCode::BAD_REQUEST, "bad ns parameter");
        };
        let (host, port) = (
            target.authority.host().to_string(),
            target.authority.port_u16().unwrap_or(443),
        );
        if !proxy.policy.is_registry(&host, port) {
            proxy.metrics.proxy_requests(ProxyKind::Denied).inc();
            return upstream::text(
                StatusCode::FORBIDDEN,
                format!(
                    "{}: not a registry this mirror serves (--registry, --mirror-upstream)",
                    target.authority
                ),
            );
        }
        let route = Route {
            target,
            mirror: true,
        };
        return registry::handle(proxy, route, req).await;
    }
    upstream::text(StatusCode::NOT_FOUND, "not found")
}

fn ca_crt(proxy: &Proxy, method: &Method) -> Response<Body> {
    let body = match *method {
        Method::GET => upstream::full(proxy.ca_pem().to_string()),
        Method::HEAD => upstream::empty(),
        _ => return upstream::text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    };
    let mut r = Response::new(body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-pem-file"),
    );
    r
}

/// The mirror's upstream: containerd's `ns` parameter, else the configured one.
fn mirror_target(proxy: &Proxy, query: Option<&str>) -> Option<Target> {
    let ns = query.and_then(|q| {
        q.split('&')
            .find_map(|p| p.strip_prefix("ns="))
            .filter(|v| !v.is_empty())
    });
    // containerd escapes the value (`ns=registry.example%3A5000`).
    let ns = match ns {
        Some(raw) => Some(percent_decode(raw)?),
        None => None,
    };
    let authority = match ns.as_deref() {
        // Docker Hub's name for itself; its API lives elsewhere.
        Some("docker.io") => Authority::from_static(DEFAULT_MIRROR_UPSTREAM),
        Some(ns) => parse_upstream(ns)?,
        None => proxy.mirror_upstream.clone(),
    };
    Some(Target {
        scheme: Scheme::HTTPS,
        authority,
    })
}

/// `%XX` escapes decoded; `None` for a bad escape or a result that is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let (bytes, mut out, mut i) = (s.as_bytes(), Vec::with_capacity(s.len()), 0);
    while i < bytes.len() {
        if bytes[i] == b'%' {
            // Two hex digits, checked as such: `from_str_radix` alone takes a sign too, and
            // would read `%+f` as the byte 0x0f.
            let hex = bytes.get(i + 1..i + 3)?;
            if !hex.iter().all(u8::is_ascii_hexdigit) {
                return None;
            }
            out.push(u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// `host[:port]` (an `https://` prefix and a trailing `/` tolerated), host names checked as the
/// `--registry` patterns are.
pub(crate) fn parse_upstream(s: &str) -> Option<Authority> {
    let s = s.trim();
    let s = s
        .strip_prefix("https://")
        .unwrap_or(s)
        .trim_end_matches('/');
    if s.contains('*') || crate::config::parse_registry(s).is_err() {
        // IP literals are fine too.
        let (host, _) = rules::split_authority(s)?;
        host.parse::<std::net::IpAddr>().ok()?;
    }
    s.parse().ok()
}

/// `CONNECT host:port`: intercept or tunnel.
async fn connect(
    proxy: Arc<Proxy>,
    req: Request<Incoming>,
    slot: Arc<OwnedSemaphorePermit>,
) -> Response<Body> {
    let Some(authority) = req.uri().authority().cloned() else {
        return upstream::text(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let Some((host, port)) = rules::split_authority(authority.as_str()) else {
        return upstream::text(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    if proxy.rules.intercepts(&host, port) {
        let tls = match proxy.leaves.config(&host, port) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, %host, "proxy: no leaf certificate");
                return upstream::text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
            }
        };
        let target = Target {
            scheme: Scheme::HTTPS,
            authority,
        };
        tokio::spawn(
            async move {
                let _slot = slot;
                match hyper::upgrade::on(req).await {
                    Ok(upgraded) => intercept(proxy, upgraded, tls, target).await,
                    Err(error) => debug!(%error, "proxy: CONNECT upgrade failed"),
                }
            }
            .instrument(info_span!("intercept", %host, port)),
        );
        return Response::new(upstream::empty());
    }
    let server = match upstream::dial(&proxy.policy, &host, port, Purpose::Tunnel).await {
        Ok(s) => s,
        Err(DialError::Refused(r)) => {
            debug!(reason = %r, "proxy: CONNECT refused");
            proxy.metrics.proxy_requests(ProxyKind::Denied).inc();
            return upstream::text(StatusCode::FORBIDDEN, r.to_string());
        }
        Err(e @ DialError::Timeout { .. }) => {
            return upstream::text(StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
        Err(e) => return upstream::text(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    proxy.metrics.proxy_requests(ProxyKind::Tunnel).inc();
    tokio::spawn(
        async move {
            let _slot = slot;
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    if let Err(error) = tunnel::run(TokioIo::new(upgraded), server).await {
                        debug!(%error, "proxy: tunnel ended");
                    }
                }
                Err(error) => debug!(%error, "proxy: CONNECT upgrade failed"),
            }
        }
        .instrument(info_span!("tunnel", %host, port)),
    );
    Response::new(upstream::empty())
}

/// Serves the requests of an intercepted CONNECT, over TLS as `target`.
async fn intercept(
    proxy: Arc<Proxy>,
    upgraded: hyper::upgrade::Upgraded,
    tls: Arc<rustls::ServerConfig>,
    target: Target,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let stream = match tokio::time::timeout(
        TLS_HANDSHAKE_TIMEOUT,
        acceptor.accept(TokioIo::new(upgraded)),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(error)) => {
            // Most often: the client does not trust the proxy CA.
            debug!(%error, "proxy: TLS handshake with the client failed");
            return;
        }
        Err(_) => {
            debug!("proxy: TLS handshake timed out");
            return;
        }
    };
    // hyper-util tells HTTP/1.1 from HTTP/2 by the first bytes and waits for them with no
    // deadline (HTTP/1.1's header timeout and HTTP/2's keep-alive start only after), so a
    // client that finished TLS and sends nothing would hold its slot for good.
    let mut stream = stream;
    let head = match tokio::time::timeout(HEADER_READ_TIMEOUT, first_bytes(&mut stream)).await {
        Ok(Ok(head)) => head,
        Ok(Err(error)) => {
            debug!(%error, "proxy: intercepted connection ended");
            return;
        }
        Err(_) => {
            debug!("proxy: no request on an intercepted connection in time");
            return;
        }
    };
    let stream = Prefixed {
        head,
        at: 0,
        inner: stream,
    };
    let route = Route {
        target,
        mirror: false,
    };
    let service = service_fn(move |req: Request<Incoming>| {
        let (proxy, route) = (proxy.clone(), route.clone());
        async move {
            let req = req.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
            Ok::<_, Infallible>(registry::handle(proxy, route, req).await)
        }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS)
        .keep_alive_interval(H2_KEEPALIVE);
    if let Err(error) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(%error, "proxy: intercepted connection ended");
    }
}

/// The HTTP/2 connection preface, which an HTTP/2 client sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The first bytes of a connection: until they are the whole HTTP/2 preface, or stop matching
/// it (an HTTP/1.1 request), or the stream ends. What protocol detection needs, and no more.
async fn first_bytes<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<Vec<u8>> {
    let mut head = vec![0u8; H2_PREFACE.len()];
    let mut filled = 0;
    while filled < head.len() && head[..filled] == H2_PREFACE[..filled] {
        let n = s.read(&mut head[filled..]).await?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    head.truncate(filled);
    Ok(head)
}

/// A stream that yields `head` (bytes already read from `inner`) before the rest of `inner`.
struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.at < this.head.len() {
            let n = (this.head.len() - this.at).min(buf.remaining());
            buf.put_slice(&this.head[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
