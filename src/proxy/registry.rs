//! Registry requests, once the proxy knows which registry they are for (an intercepted CONNECT,
//! the mirror's upstream, or a plain-HTTP proxy request): blob downloads through the mesh,
//! everything else to the registry untouched.
//!
//! A blob `GET` is served from the mesh only after the registry confirmed, with the client's own
//! credentials, that this client may read it: a `HEAD` of the same URL answered 2xx, or
//! redirected (at most [`MAX_ACCESS_REDIRECTS`] times, HTTPS only, each hop under the
//! connection policy, the credentials sent to the registry's own origin only) to an answer that
//! is 2xx. A client that may not gets the registry's own answer to its request — never a byte
//! from the mesh. Positive answers are remembered briefly ([`ACCESS_TTL`]) per credentials,
//! registry, repository and digest.
//!
//! Only over HTTPS: a registry reached over plain HTTP (an absolute-form proxy request) is passed
//! through and never served from the mesh, since whoever answers a cleartext check — anyone on
//! the path — could vouch for content that was fetched over HTTPS.
//!
//! Not for: TLS, CONNECT, the mesh itself ([`crate::blobs`]).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::rules::{self, BlobPath, RangeAnswer};
use super::tokens::{TokenAnswer, MAX_TOKEN_BODY};
use super::upstream::{self, Body, BoxError, Target, UpstreamError};
use super::Proxy;
use crate::blobs::{BlobError, BlobRequest};
use crate::metrics::{Metrics, ProxyKind};
use crate::task;

/// How long a registry's "this client may read this blob" is trusted.
pub const ACCESS_TTL: Duration = Duration::from_secs(60);
/// Access answers remembered at once.
pub const ACCESS_CACHE: usize = 4096;
/// Redirects an access check follows before it gives up (and the client is refused the mesh).
pub const MAX_ACCESS_REDIRECTS: usize = 5;

/// How a registry request reached the proxy.
#[derive(Clone, Debug)]
pub struct Route {
    /// The registry.
    pub target: Target,
    /// Mirror mode: the `ns` query parameter (containerd) chose the target and is dropped.
    pub mirror: bool,
}

/// Handles one registry request.
pub async fn handle(proxy: Arc<Proxy>, route: Route, req: Request<Body>) -> Response<Body> {
    if req.method() == Method::GET && route.target.scheme == http::uri::Scheme::HTTPS {
        if let Some(blob) = rules::blob_path(req.uri().path()) {
            return blob_get(proxy, route, req, blob).await;
        }
    }
    passthrough(proxy, route, req, ProxyKind::Passthrough).await
}

/// Sends `req` to the registry as it is (hop-by-hop headers aside) and streams the answer back.
/// Token requests to a learned realm are coalesced.
pub async fn passthrough(
    proxy: Arc<Proxy>,
    route: Route,
    req: Request<Body>,
    kind: ProxyKind,
) -> Response<Body> {
    proxy.metrics.proxy_requests(kind).inc();
    let (mut parts, body) = req.into_parts();
    let pq = path_and_query(&parts.uri, route.mirror);
    let uri = match route.target.uri(&pq) {
        Ok(u) => u,
        Err(e) => return upstream::text(StatusCode::BAD_REQUEST, format!("bad request URI: {e}")),
    };
    upstream::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if parts.method == Method::GET && proxy.tokens.is_realm(&uri) {
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let (answer, shared) =
            coalesced_token(proxy.clone(), uri, auth, parts.headers.clone()).await;
        if shared {
            proxy.metrics.proxy_tokens_coalesced().inc();
        }
        return token_response(&answer);
    }
    parts.uri = uri;
    parts.version = Version::HTTP_11;
    match proxy.upstream.send(Request::from_parts(parts, body)).await {
        Ok(mut resp) => {
            learn_realms(&proxy, resp.headers());
            *resp.version_mut() = Version::HTTP_11;
            resp
        }
        Err(UpstreamError::Refused(r)) => {
            debug!(reason = %r, "proxy: upstream connection refused by policy");
            proxy.metrics.proxy_requests(ProxyKind::Denied).inc();
            upstream::text(StatusCode::FORBIDDEN, r.to_string())
        }
        Err(e) => {
            warn!(error = %e, "proxy: upstream request failed");
            upstream::text(StatusCode::BAD_GATEWAY, e.to_string())
        }
    }
}

/// A blob download: access check, then the mesh; the registry when the mesh cannot open it.
async fn blob_get(
    proxy: Arc<Proxy>,
    route: Route,
    req: Request<Body>,
    blob: BlobPath,
) -> Response<Body> {
    let auth = req.headers().get(header::AUTHORIZATION).cloned();
    let digest = task::format_digest(&blob.digest);
    let url = match route
        .target
        .uri(&format!("/v2/{}/blobs/{digest}", blob.name))
    {
        Ok(u) => u,
        Err(e) => return upstream::text(StatusCode::BAD_REQUEST, format!("bad blob URI: {e}")),
    };
    let key = access_key(
        route.target.authority.as_str(),
        auth.as_ref().map(|v| v.as_bytes()).unwrap_or_default(),
        &blob.name,
        &digest,
    );
    if !proxy.access.allowed(&key, Instant::now()) {
        match may_read(&proxy, url.clone(), auth.as_ref()).await {
            Ok(Access::Granted) => proxy.access.insert(key, Instant::now()),
            Ok(Access::Denied(why)) => {
                debug!(why, blob = %digest, "proxy: the registry did not grant the blob");
                // The registry's own answer to this very request: status, challenge, body.
                return passthrough(proxy, route, req, ProxyKind::Denied).await;
            }
            Err(e) => {
                warn!(error = %e, "proxy: access check failed");
                return passthrough(proxy, route, req, ProxyKind::Denied).await;
            }
        }
    }
    let open = proxy
        .mesh
        .open(BlobRequest {
            url: url.to_string(),
            headers: auth
                .iter()
                .map(|a| {
                    (
                        "Authorization".to_string(),
                        String::from_utf8_lossy(a.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            digest: blob.digest,
        })
        .await;
    let opened = match open {
        Ok(b) => b,
        Err(e) => {
            warn!(error = %e, blob = %digest, "proxy: mesh could not open the blob; asking the registry");
            return passthrough(proxy, route, req, ProxyKind::BlobDirect).await;
        }
    };
    let length = opened.length;
    let range = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
    let (status, start, end) = match rules::range(range, length) {
        RangeAnswer::Full => (StatusCode::OK, 0, length),
        RangeAnswer::Partial(a, b) => (StatusCode::PARTIAL_CONTENT, a, b),
        RangeAnswer::Unsatisfiable => {
            let mut r = upstream::text(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            insert(
                r.headers_mut(),
                header::CONTENT_RANGE,
                &format!("bytes */{length}"),
            );
            return r;
        }
    };
    proxy.metrics.proxy_requests(ProxyKind::BlobMesh).inc();
    let rx = opened.stream(start..end);
    let mut resp = Response::new(mesh_body(rx, end - start, proxy.metrics.clone()));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    insert(h, header::CONTENT_LENGTH, &(end - start).to_string());
    insert(h, header::CONTENT_TYPE, "application/octet-stream");
    insert(h, header::ACCEPT_RANGES, "bytes");
    insert(h, header::ETAG, &format!("\"{digest}\""));
    insert(h, "docker-content-digest", &digest);
    if status == StatusCode::PARTIAL_CONTENT {
        insert(
            h,
            header::CONTENT_RANGE,
            &format!("bytes {start}-{}/{length}", end - 1),
        );
    }
    resp
}

/// What an access check found.
enum Access {
    /// A 2xx, directly or at the end of the redirects.
    Granted,
    /// Anything else, and why (for the log).
    Denied(String),
}

/// Whether the registry lets the holder of `auth` read `url`: `HEAD`, following redirects as
/// the module doc says. Boxed as `Send` for the same reason as [`coalesced_token`].
fn may_read<'a>(
    proxy: &'a Proxy,
    url: http::Uri,
    auth: Option<&'a HeaderValue>,
) -> Pin<Box<dyn Future<Output = Result<Access, upstream::UpstreamError>> + Send + 'a>> {
    Box::pin(async move {
        let origin = (url.scheme().cloned(), url.authority().cloned());
        let mut at = url;
        for _ in 0..=MAX_ACCESS_REDIRECTS {
            let mut headers = HeaderMap::new();
            if let Some(a) = auth {
                // Credentials for the registry, never for the storage it redirects to.
                if (at.scheme().cloned(), at.authority().cloned()) == origin {
                    headers.insert(header::AUTHORIZATION, a.clone());
                }
            }
            let r = proxy
                .upstream
                .simple(Method::HEAD, at.clone(), headers)
                .await?;
            let status = r.status();
            if status.is_success() {
                return Ok(Access::Granted);
            }
            if !matches!(status.as_u16(), 301 | 302 | 303 | 307 | 308) {
                return Ok(Access::Denied(format!("{at}: {status}")));
            }
            let location = r
                .headers()
                .get(header::LOCATION)
                .and_then(|v| v.to_str().ok());
            match location.and_then(|l| redirect_target(&at, l)) {
                Some(next) if next.scheme() == Some(&http::uri::Scheme::HTTPS) => at = next,
                Some(next) => {
                    return Ok(Access::Denied(format!(
                        "{at}: redirect to {next}, not HTTPS"
                    )))
                }
                None => {
                    return Ok(Access::Denied(format!(
                        "{at}: {status} without a usable Location"
                    )))
                }
            }
        }
        Ok(Access::Denied(format!(
            "more than {MAX_ACCESS_REDIRECTS} redirects"
        )))
    })
}

/// Where a `Location` header leads from `base`: an absolute URL, a scheme-relative `//host/…`,
/// or an absolute path on the same origin. Relative paths are not resolved (registries and
/// storage do not send them); `None` for them and for anything unparsable.
pub(crate) fn redirect_target(base: &http::Uri, location: &str) -> Option<http::Uri> {
    let location = location.trim();
    if let Some(rest) = location.strip_prefix("//") {
        let scheme = base.scheme_str()?;
        return format!("{scheme}://{rest}").parse().ok();
    }
    if location.starts_with('/') {
        let pq: http::uri::PathAndQuery = location.parse().ok()?;
        return http::Uri::builder()
            .scheme(base.scheme()?.clone())
            .authority(base.authority()?.clone())
            .path_and_query(pq)
            .build()
            .ok();
    }
    let uri: http::Uri = location.parse().ok()?;
    (uri.scheme().is_some() && uri.authority().is_some()).then_some(uri)
}

/// The blob's bytes as a response body. An error from the mesh, or an end before the last
/// byte, fails the body, so the server aborts the connection (or resets the HTTP/2 stream) and
/// the client never takes a truncated body for a complete one.
fn mesh_body(
    rx: mpsc::Receiver<Result<Bytes, BlobError>>,
    length: u64,
    metrics: Arc<Metrics>,
) -> Body {
    let s = stream::unfold(
        (rx, length, metrics),
        |(mut rx, left, metrics)| async move {
            if left == 0 {
                return None;
            }
            let item = match rx.recv().await {
                Some(Ok(b)) if b.len() as u64 <= left => {
                    metrics.proxy_blob_bytes().add(b.len() as u64);
                    let left = left - b.len() as u64;
                    return Some((Ok(Frame::data(b)), (rx, left, metrics)));
                }
                Some(Ok(_)) => Err::<Frame<Bytes>, BoxError>("mesh sent more than asked".into()),
                Some(Err(e)) => Err(Box::new(e) as BoxError),
                None => Err("blob stream ended before its last byte".into()),
            };
            Some((item, (rx, 0, metrics)))
        },
    );
    StreamBody::new(s).boxed_unsync()
}

/// Boxed as `Send` here, where every lifetime is concrete: awaiting the generic
/// [`Tokens::get`](super::tokens::Tokens::get) inline trips rustc's higher-ranked `Send` check.
fn coalesced_token(
    proxy: Arc<Proxy>,
    uri: http::Uri,
    auth: String,
    headers: HeaderMap,
) -> Pin<Box<dyn Future<Output = (Arc<TokenAnswer>, bool)> + Send>> {
    Box::pin(async move {
        let client = proxy.upstream.clone();
        let url = uri.to_string();
        proxy
            .tokens
            .get(url, auth, Instant::now(), move || {
                fetch_token(client, uri, headers)
            })
            .await
    })
}

async fn fetch_token(
    client: upstream::Upstream,
    uri: http::Uri,
    headers: HeaderMap,
) -> TokenAnswer {
    let resp = match client.simple(Method::GET, uri, headers).await {
        Ok(r) => r,
        Err(e) => {
            return TokenAnswer {
                status: StatusCode::BAD_GATEWAY,
                headers: HeaderMap::new(),
                body: Bytes::from(format!("{e}\n")),
            }
        }
    };
    let (parts, mut body) = resp.into_parts();
    let mut buf = Vec::new();
    let fail = |msg: String| TokenAnswer {
        status: StatusCode::BAD_GATEWAY,
        headers: HeaderMap::new(),
        body: Bytes::from(format!("token endpoint answer unusable: {msg}\n")),
    };
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    if buf.len() + d.len() > MAX_TOKEN_BODY {
                        return fail(format!("larger than {MAX_TOKEN_BODY} bytes"));
                    }
                    buf.extend_from_slice(d);
                }
            }
            Err(e) => return fail(e.to_string()),
        }
    }
    let mut headers = parts.headers;
    // The body is whole now; hyper sets the length the client gets.
    headers.remove(header::CONTENT_LENGTH);
    TokenAnswer {
        status: parts.status,
        headers,
        body: Bytes::from(buf),
    }
}

fn token_response(a: &TokenAnswer) -> Response<Body> {
    let mut r = Response::new(upstream::full(a.body.clone()));
    *r.status_mut() = a.status;
    *r.headers_mut() = a.headers.clone();
    r
}

fn learn_realms(proxy: &Proxy, headers: &HeaderMap) {
    for v in headers.get_all(header::WWW_AUTHENTICATE) {
        if let Ok(v) = v.to_str() {
            proxy.tokens.learn(v);
        }
    }
}

/// The path and query to send upstream; in mirror mode without containerd's `ns` parameter.
pub(crate) fn path_and_query(uri: &http::Uri, mirror: bool) -> String {
    let path = uri.path();
    match uri.query() {
        Some(q) if mirror => {
            let kept: Vec<&str> = q
                .split('&')
                .filter(|p| !p.is_empty() && *p != "ns" && !p.starts_with("ns="))
                .collect();
            if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            }
        }
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    }
}

fn insert(h: &mut HeaderMap, name: impl header::IntoHeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// The key of an access answer: SHA-256 over registry, credentials, repository and digest
/// (a cryptographic hash: a collision would hand one client's permission to another).
fn access_key(registry: &str, credentials: &[u8], name: &str, digest: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in [
        registry.as_bytes(),
        credentials,
        name.as_bytes(),
        digest.as_bytes(),
    ] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Registry answers "this client may read this blob", remembered for [`ACCESS_TTL`].
#[derive(Default)]
pub struct AccessCache {
    // std Mutex: map operations only.
    map: Mutex<HashMap<[u8; 32], Instant>>,
}

impl AccessCache {
    /// Whether a fresh positive answer is remembered for `key` at `now`.
    pub fn allowed(&self, key: &[u8; 32], now: Instant) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(key)
            .is_some_and(|t| now.saturating_duration_since(*t) < ACCESS_TTL)
    }

    /// Remembers a positive answer; when full of fresh answers, this one is not kept.
    pub fn insert(&self, key: [u8; 32], now: Instant) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= ACCESS_CACHE {
            map.retain(|_, t| now.saturating_duration_since(*t) < ACCESS_TTL);
        }
        if map.len() < ACCESS_CACHE || map.contains_key(&key) {
            map.insert(key, now);
        }
    }

    /// Answers remembered.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether none is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_drops_only_ns() {
        let u = |s: &str| s.parse::<http::Uri>().unwrap();
        assert_eq!(
            path_and_query(&u("/v2/a/manifests/b?ns=docker.io"), true),
            "/v2/a/manifests/b"
        );
        assert_eq!(
            path_and_query(&u("/v2/a/tags/list?n=5&ns=x.io&last=c"), true),
            "/v2/a/tags/list?n=5&last=c"
        );
        assert_eq!(
            path_and_query(&u("/v2/a/tags/list?ns=x.io"), false),
            "/v2/a/tags/list?ns=x.io"
        );
        assert_eq!(path_and_query(&u("/v2/"), true), "/v2/");
    }

    #[test]
    fn redirect_targets() {
        let base: http::Uri = "https://registry.test:5000/v2/a/blobs/sha256:00"
            .parse()
            .unwrap();
        let t = |l: &str| redirect_target(&base, l).map(|u| u.to_string());
        assert_eq!(
            t("https://s3.example/bucket/x?X-Amz-Signature=1").as_deref(),
            Some("https://s3.example/bucket/x?X-Amz-Signature=1")
        );
        assert_eq!(
            t("/storage/x?sig=2").as_deref(),
            Some("https://registry.test:5000/storage/x?sig=2")
        );
        assert_eq!(
            t("//cdn.example/x").as_deref(),
            Some("https://cdn.example/x")
        );
        assert_eq!(
            t("http://plain.example/x").as_deref(),
            Some("http://plain.example/x")
        );
        assert_eq!(t("storage/x"), None);
        assert_eq!(t(""), None);
        assert_eq!(t("https://"), None);
    }

    #[test]
    fn access_answers_expire_and_are_bounded() {
        let c = AccessCache::default();
        let now = Instant::now();
        let k = access_key("r.test", b"Basic a", "x/y", "sha256:00");
        assert_ne!(k, access_key("r.test", b"Basic b", "x/y", "sha256:00"));
        assert_ne!(k, access_key("r.test", b"Basic a", "x/z", "sha256:00"));
        assert_ne!(
            access_key("ab", b"c", "d", "e"),
            access_key("a", b"bc", "d", "e")
        );
        assert!(!c.allowed(&k, now));
        c.insert(k, now);
        assert!(c.allowed(&k, now + ACCESS_TTL / 2));
        assert!(!c.allowed(&k, now + ACCESS_TTL));
        for i in 0..ACCESS_CACHE + 100 {
            c.insert(access_key("r", &i.to_be_bytes(), "n", "d"), now);
        }
        assert_eq!(c.len(), ACCESS_CACHE);
        // Once the old answers expire, room is made.
        let later = now + ACCESS_TTL;
        let fresh = access_key("r", b"new", "n", "d");
        c.insert(fresh, later);
        assert!(c.allowed(&fresh, later));
        assert_eq!(c.len(), 1);
    }
}
