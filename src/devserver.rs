//! A small HTTP(S) origin for the demo, the end-to-end tests and the benchmarks.
//!
//! [`DevServer`] serves the files under one root directory over HTTP/1.1 and HTTP/2 (TLS with ALPN
//! `h2` and `http/1.1`, or cleartext), answers `GET` and `HEAD` with `Content-Length` and single
//! `Range` requests, and streams every body from disk in chunks, so a multi-GiB file costs no
//! memory. It counts the `GET` requests per path and the body bytes it sends (the origin egress a
//! benchmark reports), and it misbehaves on request: a per-path [`Fault`] answers an error
//! status, demands credentials, cuts the connection mid-body, sends a body shorter than its
//! `Content-Length`, redirects, stalls or throttles.
//!
//! [`DevCa`] is a throwaway certificate authority (rcgen) that signs the server's leaf
//! certificate, so a client trusts the origin through `--origin-ca` or `SSL_CERT_FILE` without
//! touching the system roots.
//!
//! Not for production: no directory listings, no conditional or multi-range requests, no access
//! control beyond the faults, no limit on connections, and the TLS keys live in memory only.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::crypto::ring;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncSeekExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// Bytes read from disk and handed to hyper at a time.
pub const CHUNK_SIZE: usize = 256 * 1024;

/// A connection that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a body that is about to be cut waits first, so hyper flushes what it was given and
/// the client really receives the bytes the fault promises.
const FLUSH_GRACE: Duration = Duration::from_millis(50);

/// Pause after a failed `accept` (e.g. out of file descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// The realm announced with a 401 from [`Fault::RequireAuth`].
const AUTH_REALM: &str = "Basic realm=\"d7q-dev\"";

/// A misbehaviour injected for one path with [`DevServer::set_fault`].
///
/// Faults apply to `GET` and `HEAD` alike (a `HEAD` sees the same status and headers and no body).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Fault {
    /// Answer this status with a short text body instead of the file.
    Status(u16),
    /// Answer 401 with `WWW-Authenticate` unless the `Authorization` header is exactly this value;
    /// with it, serve the file normally.
    RequireAuth(String),
    /// Send the headers (full `Content-Length`), then this many body bytes at most, then abort the
    /// TCP connection with a reset. A body no longer than this is sent whole and nothing is cut.
    /// The whole connection goes, so other requests multiplexed on it (HTTP/2) fail too.
    ResetAfter(u64),
    /// Declare `declared` bytes in `Content-Length`, send only `sent` bytes (the file's first
    /// bytes, zeros past its end or when there is no file), then close the connection (as
    /// [`Fault::ResetAfter`], other requests multiplexed on it fail too).
    ShortBody { declared: u64, sent: u64 },
    /// Answer 302 Found with this `Location` (absolute or relative).
    Redirect(String),
    /// Wait this long before answering, then serve normally.
    Delay(Duration),
    /// Serve normally, but send the body at about this many bytes per second.
    Throttle(u64),
    /// Apply the inner fault to the next request of this path only, then behave normally.
    Once(Box<Fault>),
}

/// A throwaway certificate authority, made with rcgen, for a test or demo origin.
pub struct DevCa {
    /// The CA certificate, PEM: what a client is told to trust.
    pub cert_pem: String,
    cert: rcgen::Certificate,
    key: KeyPair,
}

/// A leaf certificate and its private key, issued by a [`DevCa`].
pub struct DevCert {
    /// The leaf certificate, PEM.
    pub cert_pem: String,
    /// The leaf's private key, PKCS#8 PEM.
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// A running origin server. It stops when dropped or on [`DevServer::shutdown`].
pub struct DevServer {
    addr: SocketAddr,
    tls: bool,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

/// Options for a [`DevServer`]; see [`DevServer::builder`].
pub struct DevServerBuilder<'a> {
    root: PathBuf,
    bind: SocketAddr,
    ca: Option<&'a DevCa>,
    extra_names: Vec<String>,
    http2: bool,
}

impl DevCa {
    /// Makes a new CA with a fresh key.
    ///
    /// # Panics
    /// Only if rcgen cannot generate an ECDSA key or self-sign with it, which it always can.
    pub fn new() -> Self {
        Self::generate().expect("rcgen makes a self-signed CA")
    }

    /// Writes the CA certificate (PEM) to `path`, for `--origin-ca` or `SSL_CERT_FILE`.
    pub fn write_pem(&self, path: impl AsRef<Path>) -> io::Result<()> {
        std::fs::write(path, &self.cert_pem)
    }

    /// The CA certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert.der().clone()
    }

    /// Issues a leaf certificate valid for serving and for client authentication under each of
    /// `names` (DNS names or IP addresses).
    pub fn issue(&self, names: &[String]) -> io::Result<DevCert> {
        let key = KeyPair::generate().map_err(io::Error::other)?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(io::Error::other)?;
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("d7q dev", String::as_str),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(io::Error::other)?;
        Ok(DevCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }

    /// A rustls client configuration that trusts this CA only, offering ALPN `h2` and
    /// `http/1.1`: what a benchmark or a test uses to talk to the server.
    pub fn client_config(&self) -> io::Result<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert_der()).map_err(io::Error::other)?;
        let mut config =
            rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)?
                .with_root_certificates(roots)
                .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    fn generate() -> Result<Self, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "d7q dev CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert,
            key,
        })
    }
}

impl Default for DevCa {
    fn default() -> Self {
        Self::new()
    }
}

impl DevCert {
    /// The leaf certificate, DER.
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    /// The leaf's private key, DER.
    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }
}

impl DevServer {
    /// Starts a server for the files under `root` on `bind` (port 0 picks a free port). With a
    /// CA it speaks HTTPS with a leaf certificate for `localhost`, `127.0.0.1` and `::1` signed
    /// by that CA; without, cleartext HTTP.
    pub async fn start(root: PathBuf, bind: SocketAddr, tls: Option<&DevCa>) -> io::Result<Self> {
        let mut builder = Self::builder(root).bind(bind);
        if let Some(ca) = tls {
            builder = builder.tls(ca);
        }
        builder.start().await
    }

    /// Options beyond [`DevServer::start`]: extra certificate names, HTTP/1.1 only.
    pub fn builder<'a>(root: impl Into<PathBuf>) -> DevServerBuilder<'a> {
        DevServerBuilder {
            root: root.into(),
            bind: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            ca: None,
            extra_names: Vec::new(),
            http2: true,
        }
    }

    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The URL of `path` on this server: `https://localhost:PORT/path` with TLS,
    /// `http://localhost:PORT/path` without (the bound IP instead of `localhost` when the server
    /// listens on a non-loopback address).
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let ip = self.addr.ip();
        let host = if ip.is_loopback() || ip.is_unspecified() {
            "localhost".to_owned()
        } else if ip.is_ipv6() {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        format!(
            "{scheme}://{host}:{}{}",
            self.addr.port(),
            normalize_path(path)
        )
    }

    /// How many `GET` requests reached `path` (whatever the answer was).
    pub fn get_count(&self, path: &str) -> u64 {
        let counts = self
            .shared
            .get_counts
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        counts.get(&normalize_path(path)).copied().unwrap_or(0)
    }

    /// The headers of the last `GET` or `HEAD` of `path`, as they arrived: what a test asserts
    /// a client sent (or kept to itself).
    pub fn last_headers(&self, path: &str) -> Option<HeaderMap> {
        let seen = self
            .shared
            .last_headers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        seen.get(&normalize_path(path)).cloned()
    }

    /// Body bytes handed to the connections so far, all paths together: the origin's egress.
    pub fn body_bytes_sent(&self) -> u64 {
        self.shared.body_bytes.load(Ordering::Relaxed)
    }

    /// Makes requests of `path` misbehave as `fault` says, until [`DevServer::clear_fault`].
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.shared.faults().insert(normalize_path(path), fault);
    }

    /// Makes `path` behave normally again.
    pub fn clear_fault(&self, path: &str) {
        self.shared.faults().remove(&normalize_path(path));
    }

    /// Stops accepting, drops every open connection and waits until the server is gone.
    pub async fn shutdown(mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
            let _ = accept.await;
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        // The accept task owns the connection tasks (a JoinSet), so aborting it ends them all.
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

impl<'a> DevServerBuilder<'a> {
    /// Where to listen; default `127.0.0.1:0`.
    pub fn bind(mut self, bind: SocketAddr) -> Self {
        self.bind = bind;
        self
    }

    /// Speak HTTPS with a leaf certificate signed by `ca`.
    pub fn tls(mut self, ca: &'a DevCa) -> Self {
        self.ca = Some(ca);
        self
    }

    /// Another name (DNS name or IP address) for the leaf certificate, besides `localhost`,
    /// `127.0.0.1` and `::1`.
    pub fn extra_name(mut self, name: impl Into<String>) -> Self {
        self.extra_names.push(name.into());
        self
    }

    /// Whether to offer HTTP/2 besides HTTP/1.1 (default true).
    pub fn http2(mut self, enabled: bool) -> Self {
        self.http2 = enabled;
        self
    }

    /// Binds and starts serving on the current tokio runtime.
    pub async fn start(self) -> io::Result<DevServer> {
        let acceptor = match self.ca {
            Some(ca) => Some(self.acceptor(ca)?),
            None => None,
        };
        let listener = TcpListener::bind(self.bind).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            root: self.root,
            faults: Mutex::new(HashMap::new()),
            get_counts: Mutex::new(HashMap::new()),
            last_headers: Mutex::new(HashMap::new()),
            body_bytes: AtomicU64::new(0),
        });
        let mut http = auto::Builder::new(TokioExecutor::new());
        if !self.http2 {
            http = http.http1_only();
        }
        let accept = tokio::spawn(accept_loop(
            listener,
            Arc::clone(&shared),
            acceptor,
            Arc::new(http),
        ));
        tracing::debug!(%addr, tls = self.ca.is_some(), "dev origin listening");
        Ok(DevServer {
            addr,
            tls: self.ca.is_some(),
            shared,
            accept: Some(accept),
        })
    }

    fn acceptor(&self, ca: &DevCa) -> io::Result<TlsAcceptor> {
        let mut names = vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        names.extend(self.extra_names.iter().cloned());
        let leaf = ca.issue(&names)?;
        let mut config =
            rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
                .with_safe_default_protocol_versions()
                .map_err(io::Error::other)?
                .with_no_client_auth()
                .with_single_cert(vec![leaf.cert_der()], leaf.key_der())
                .map_err(io::Error::other)?;
        config.alpn_protocols = if self.http2 {
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        } else {
            vec![b"http/1.1".to_vec()]
        };
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// State shared by the handle and every connection.
struct Shared {
    root: PathBuf,
    // std Mutexes: no await happens while one is held.
    faults: Mutex<HashMap<String, Fault>>,
    get_counts: Mutex<HashMap<String, u64>>,
    /// Per path, only the last request's: bounded by the paths asked for.
    last_headers: Mutex<HashMap<String, HeaderMap>>,
    body_bytes: AtomicU64,
}

impl Shared {
    fn faults(&self) -> std::sync::MutexGuard<'_, HashMap<String, Fault>> {
        self.faults.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn count_get(&self, path: &str) {
        let mut counts = self.get_counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts.entry(path.to_owned()).or_insert(0) += 1;
    }

    /// The fault for this request of `path`, consuming a [`Fault::Once`].
    fn take_fault(&self, path: &str) -> Option<Fault> {
        let mut faults = self.faults();
        let mut fault = match faults.get(path)? {
            Fault::Once(_) => faults.remove(path)?,
            other => other.clone(),
        };
        while let Fault::Once(inner) = fault {
            fault = *inner;
        }
        Some(fault)
    }
}

/// Lets a response body end its own connection: a body that must be cut asks, and the task that
/// drives the connection drops it.
#[derive(Default)]
struct ConnCut {
    notify: Notify,
    mode: AtomicU8,
}

const CUT_CLOSE: u8 = 1;
const CUT_RESET: u8 = 2;

impl ConnCut {
    fn fire(&self, mode: u8) {
        self.mode.store(mode, Ordering::Relaxed);
        self.notify.notify_one();
    }
}

type Body = UnsyncBoxBody<Bytes, io::Error>;

async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    http: Arc<auto::Builder<TokioExecutor>>,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_conn(
                        stream,
                        peer,
                        Arc::clone(&shared),
                        tls.clone(),
                        Arc::clone(&http),
                    ));
                }
                Err(error) => {
                    tracing::debug!(%error, "dev origin accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
            // Reap finished connections so the set does not grow without bound.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
}

async fn serve_conn(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    http: Arc<auto::Builder<TokioExecutor>>,
) {
    // A second descriptor for the socket, so a reset can be forced after hyper has taken the
    // stream: SO_LINGER is per socket and takes effect when its last descriptor closes.
    let control = stream.as_fd().try_clone_to_owned().ok();
    let cut = Arc::new(ConnCut::default());
    match tls {
        Some(acceptor) => {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => drive(&http, stream, shared, &cut).await,
                Ok(Err(error)) => tracing::debug!(%peer, %error, "dev origin TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "dev origin TLS handshake timed out"),
            }
        }
        None => drive(&http, stream, shared, &cut).await,
    }
    if cut.mode.load(Ordering::Relaxed) == CUT_RESET {
        if let Some(control) = control {
            abort_socket(control);
        }
    }
}

/// Serves one connection until it ends or a body cuts it.
async fn drive<I>(
    http: &auto::Builder<TokioExecutor>,
    io: I,
    shared: Arc<Shared>,
    cut: &Arc<ConnCut>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service_cut = Arc::clone(cut);
    let service = service_fn(move |req| {
        let shared = Arc::clone(&shared);
        let cut = Arc::clone(&service_cut);
        async move { Ok::<_, Infallible>(respond(&shared, &cut, req).await) }
    });
    let conn = http.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        result = conn => {
            if let Err(error) = result {
                tracing::debug!(%error, "dev origin connection ended with an error");
            }
        }
        () = cut.notify.notified() => {}
    }
}

/// Closes the socket with a TCP reset (SO_LINGER 0) once its other descriptor is gone.
fn abort_socket(control: OwnedFd) {
    match TcpStream::from_std(std::net::TcpStream::from(control)) {
        Ok(stream) => {
            if let Err(error) = stream.set_zero_linger() {
                tracing::debug!(%error, "dev origin could not set SO_LINGER");
            }
        }
        Err(error) => tracing::debug!(%error, "dev origin could not adopt the socket"),
    }
}

async fn respond(
    shared: &Arc<Shared>,
    cut: &Arc<ConnCut>,
    req: Request<Incoming>,
) -> Response<Body> {
    let head = req.method() == Method::HEAD;
    if req.method() != Method::GET && !head {
        let mut resp = text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n", false);
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let path = req.uri().path().to_owned();
    if !head {
        shared.count_get(&path);
    }
    shared
        .last_headers
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(path.clone(), req.headers().clone());
    let mut end = BodyEnd::Finish;
    let mut limit = None;
    let mut throttle = None;
    match shared.take_fault(&path) {
        None => {}
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(
                status,
                &format!("injected status {}\n", status.as_u16()),
                head,
            );
        }
        Some(Fault::RequireAuth(expected)) => {
            let given = req.headers().get(header::AUTHORIZATION);
            if given.map(HeaderValue::as_bytes) != Some(expected.as_bytes()) {
                let mut resp = text(StatusCode::UNAUTHORIZED, "credentials required\n", head);
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(AUTH_REALM),
                );
                return resp;
            }
        }
        Some(Fault::Redirect(location)) => {
            let mut resp = text(StatusCode::FOUND, "moved\n", head);
            match HeaderValue::from_str(&location) {
                Ok(value) => {
                    resp.headers_mut().insert(header::LOCATION, value);
                    return resp;
                }
                Err(_) => return text(StatusCode::INTERNAL_SERVER_ERROR, "bad Location\n", head),
            }
        }
        Some(Fault::ResetAfter(bytes)) => {
            end = BodyEnd::Reset;
            limit = Some(bytes);
        }
        Some(Fault::ShortBody { declared, sent }) => {
            return short_body(shared, cut, &path, declared, sent.min(declared), head).await;
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        Some(Fault::Throttle(rate)) => throttle = Some(rate.max(1)),
        // take_fault unwraps every Once.
        Some(Fault::Once(_)) => {}
    }
    let opened = match open_file(&shared.root, &path).await {
        Some(opened) => opened,
        None => return text(StatusCode::NOT_FOUND, "not found\n", head),
    };
    let (mut file, len, etag) = opened;
    let mut headers = HeaderMap::new();
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Ok(etag) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, etag);
    }
    let (status, start, count) = match parse_range(req.headers(), len) {
        RangeAnswer::Whole => (StatusCode::OK, 0, len),
        RangeAnswer::Part { start, end: last } => {
            let range = format!("bytes {start}-{last}/{len}");
            if let Ok(value) = HeaderValue::from_str(&range) {
                headers.insert(header::CONTENT_RANGE, value);
            }
            (StatusCode::PARTIAL_CONTENT, start, last - start + 1)
        }
        RangeAnswer::Unsatisfiable => {
            let mut resp = text(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range not satisfiable\n",
                head,
            );
            if let Ok(value) = HeaderValue::from_str(&format!("bytes */{len}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, value);
            }
            return resp;
        }
    };
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    let body = if head {
        empty()
    } else {
        if start > 0 {
            if let Err(error) = file.seek(io::SeekFrom::Start(start)).await {
                tracing::debug!(%error, path, "dev origin seek failed");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "seek failed\n", head);
            }
        }
        let send = match limit {
            Some(limit) if limit < count => limit,
            _ => {
                end = BodyEnd::Finish;
                count
            }
        };
        stream_body(BodySource {
            file: Some(file),
            remaining: send,
            end,
            throttle,
            shared: Arc::clone(shared),
            cut: Arc::clone(cut),
        })
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The [`Fault::ShortBody`] answer: `declared` in `Content-Length`, `sent` bytes, then close.
async fn short_body(
    shared: &Arc<Shared>,
    cut: &Arc<ConnCut>,
    path: &str,
    declared: u64,
    sent: u64,
    head: bool,
) -> Response<Body> {
    let body = if head {
        empty()
    } else {
        let file = open_file(&shared.root, path)
            .await
            .map(|(file, len, _)| file.take(len));
        stream_body(BodySource {
            file: file.map(|file| Box::new(file.chain(tokio::io::repeat(0))) as Reader),
            remaining: sent,
            end: BodyEnd::Close,
            throttle: None,
            shared: Arc::clone(shared),
            cut: Arc::clone(cut),
        })
    };
    let mut resp = Response::new(body);
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(declared));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// What a streamed body does after its last byte.
#[derive(Clone, Copy)]
enum BodyEnd {
    /// End normally.
    Finish,
    /// Close the connection (FIN) without ending the body.
    Close,
    /// Abort the connection (RST) without ending the body.
    Reset,
}

struct BodySource<R> {
    /// None: send zeros.
    file: Option<R>,
    remaining: u64,
    end: BodyEnd,
    /// Bytes per second.
    throttle: Option<u64>,
    shared: Arc<Shared>,
    cut: Arc<ConnCut>,
}

fn stream_body<R>(source: BodySource<R>) -> Body
where
    R: AsyncRead + Send + Unpin + 'static,
{
    let frames = futures_util::stream::unfold(source, |mut source| async move {
        if source.remaining == 0 {
            let mode = match source.end {
                BodyEnd::Finish => return None,
                BodyEnd::Close => CUT_CLOSE,
                BodyEnd::Reset => CUT_RESET,
            };
            // Pending here lets hyper flush the bytes already handed over before the cut.
            tokio::time::sleep(FLUSH_GRACE).await;
            source.cut.fire(mode);
            return std::future::pending().await;
        }
        let chunk = match source.throttle {
            // About ten chunks a second, so the rate is smooth enough.
            Some(rate) => (rate / 10).clamp(1024, CHUNK_SIZE as u64),
            None => CHUNK_SIZE as u64,
        };
        let n = source.remaining.min(chunk) as usize;
        let mut buf = vec![0u8; n];
        if let Some(file) = source.file.as_mut() {
            if let Err(error) = file.read_exact(&mut buf).await {
                // The file shrank under us: end the body with an error, hyper aborts it.
                return Some((Err(error), source));
            }
        }
        if let Some(rate) = source.throttle {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / rate as f64)).await;
        }
        source.remaining -= n as u64;
        source
            .shared
            .body_bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        Some((Ok(Frame::data(Bytes::from(buf))), source))
    });
    UnsyncBoxBody::new(StreamBody::new(frames))
}

fn empty() -> Body {
    UnsyncBoxBody::new(Full::new(Bytes::new()).map_err(|never| match never {}))
}

fn text(status: StatusCode, message: &str, head: bool) -> Response<Body> {
    let body = if head {
        empty()
    } else {
        UnsyncBoxBody::new(
            Full::new(Bytes::from(message.to_owned())).map_err(|never| match never {}),
        )
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(message.len()));
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Opens the regular file a request path names under `root`: the file, its length and an ETag.
async fn open_file(root: &Path, path: &str) -> Option<(tokio::fs::File, u64, String)> {
    let relative = resolve(path)?;
    let file = tokio::fs::File::open(root.join(relative)).await.ok()?;
    let meta = file.metadata().await.ok()?;
    if !meta.is_file() {
        return None;
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    let etag = format!("\"{:x}-{:x}\"", meta.len(), mtime);
    Some((file, meta.len(), etag))
}

/// Turns a request path into a relative file path, refusing anything that could leave the root.
fn resolve(path: &str) -> Option<PathBuf> {
    let decoded = percent_decode(path)?;
    let mut relative = PathBuf::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => return None,
            s if s.contains('\0') || s.contains('\\') => return None,
            s => relative.push(s),
        }
    }
    if relative.as_os_str().is_empty() {
        return None;
    }
    Some(relative)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn normalize_path(path: &str) -> String {
    if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    }
}

/// How to answer a request's `Range` header for a representation of `len` bytes.
#[derive(Debug, PartialEq, Eq)]
enum RangeAnswer {
    /// No usable range (absent, malformed, several ranges, or an empty file): 200, whole body.
    Whole,
    /// 206 with bytes `start..=end`.
    Part { start: u64, end: u64 },
    /// 416.
    Unsatisfiable,
}

fn parse_range(headers: &HeaderMap, len: u64) -> RangeAnswer {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeAnswer::Whole;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Whole;
    };
    if spec.contains(',') || len == 0 {
        return RangeAnswer::Whole;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAnswer::Whole;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range: the last N bytes.
        return match last.parse::<u64>() {
            Ok(0) => RangeAnswer::Unsatisfiable,
            Ok(n) => RangeAnswer::Part {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            Err(_) => RangeAnswer::Whole,
        };
    }
    let Ok(start) = first.parse::<u64>() else {
        return RangeAnswer::Whole;
    };
    let end = if last.is_empty() {
        len - 1
    } else {
        match last.parse::<u64>() {
            Ok(end) if end >= start => end.min(len - 1),
            _ => return RangeAnswer::Whole,
        }
    };
    if start >= len {
        return RangeAnswer::Unsatisfiable;
    }
    RangeAnswer::Part { start, end }
}

#[cfg(test)]
mod tests {
    use super::*;

    use hyper::client::conn::{http1, http2};
    use rustls::pki_types::ServerName;
    use tokio_rustls::TlsConnector;

    struct Fetched {
        status: StatusCode,
        headers: HeaderMap,
        /// Err when the body did not arrive whole.
        body: Result<Bytes, String>,
        alpn_h2: bool,
    }

    async fn fetch(
        server: &DevServer,
        ca: Option<&DevCa>,
        method: Method,
        path: &str,
        extra: &[(&str, &str)],
    ) -> Fetched {
        let tcp = TcpStream::connect(server.addr()).await.unwrap();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, format!("localhost:{}", server.addr().port()));
        for (name, value) in extra {
            req = req.header(*name, *value);
        }
        let req = req.body(http_body_util::Empty::<Bytes>::new()).unwrap();
        match ca {
            Some(ca) => {
                let connector = TlsConnector::from(Arc::new(ca.client_config().unwrap()));
                let tls = connector
                    .connect(ServerName::try_from("localhost").unwrap(), tcp)
                    .await
                    .unwrap();
                let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                send(TokioIo::new(tls), req, h2).await
            }
            None => send(TokioIo::new(tcp), req, false).await,
        }
    }

    async fn send<I>(io: I, mut req: Request<http_body_util::Empty<Bytes>>, h2: bool) -> Fetched
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let resp = if h2 {
            *req.uri_mut() = format!("https://localhost{}", req.uri()).parse().unwrap();
            req.headers_mut().remove(header::HOST);
            let (mut sender, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        } else {
            let (mut sender, conn) = http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            sender.send_request(req).await.unwrap()
        };
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map(|collected| collected.to_bytes())
            .map_err(|e| e.to_string());
        Fetched {
            status: parts.status,
            headers: parts.headers,
            body,
            alpn_h2: h2,
        }
    }

    fn content(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    async fn server_with(
        files: &[(&str, usize)],
        tls: Option<&DevCa>,
    ) -> (tempfile::TempDir, DevServer) {
        let dir = tempfile::tempdir().unwrap();
        for (name, len) in files {
            std::fs::write(dir.path().join(name), content(*len)).unwrap();
        }
        let bind = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        let server = DevServer::start(dir.path().to_path_buf(), bind, tls)
            .await
            .unwrap();
        (dir, server)
    }

    #[tokio::test]
    async fn serves_whole_files_over_h2_and_counts() {
        let ca = DevCa::new();
        let len = CHUNK_SIZE * 3 + 17;
        let (_dir, server) = server_with(&[("a.bin", len), ("empty", 0)], Some(&ca)).await;
        let got = fetch(&server, Some(&ca), Method::GET, "/a.bin", &[]).await;
        assert!(got.alpn_h2);
        assert_eq!(got.status, StatusCode::OK);
        assert_eq!(got.body.unwrap(), content(len));
        let got = fetch(&server, Some(&ca), Method::GET, "/empty", &[]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.body.unwrap().is_empty());
        let got = fetch(&server, Some(&ca), Method::HEAD, "/a.bin", &[]).await;
        assert_eq!(
            got.headers[header::CONTENT_LENGTH],
            len.to_string().as_str()
        );
        assert_eq!(server.get_count("/a.bin"), 1);
        assert_eq!(server.get_count("empty"), 1);
        assert_eq!(server.body_bytes_sent(), len as u64);
        assert!(server.url("/a.bin").starts_with("https://localhost:"));
    }

    #[tokio::test]
    async fn ranges_and_missing_paths() {
        let (_dir, server) = server_with(&[("f", 1000)], None).await;
        let data = content(1000);
        let got = fetch(
            &server,
            None,
            Method::GET,
            "/f",
            &[("range", "bytes=10-19")],
        )
        .await;
        assert_eq!(got.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(got.headers[header::CONTENT_RANGE], "bytes 10-19/1000");
        assert_eq!(got.body.unwrap(), &data[10..20]);
        let got = fetch(&server, None, Method::GET, "/f", &[("range", "bytes=-5")]).await;
        assert_eq!(got.body.unwrap(), &data[995..]);
        let got = fetch(&server, None, Method::GET, "/f", &[("range", "bytes=990-")]).await;
        assert_eq!(got.body.unwrap(), &data[990..]);
        let got = fetch(
            &server,
            None,
            Method::GET,
            "/f",
            &[("range", "bytes=1000-")],
        )
        .await;
        assert_eq!(got.status, StatusCode::RANGE_NOT_SATISFIABLE);
        let got = fetch(&server, None, Method::GET, "/f", &[("range", "bytes=junk")]).await;
        assert_eq!(got.status, StatusCode::OK);
        for path in ["/nope", "/../etc/passwd", "/%2e%2e/x", "/", "/%zz"] {
            let got = fetch(&server, None, Method::GET, path, &[]).await;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{path}");
        }
        let got = fetch(&server, None, Method::POST, "/f", &[]).await;
        assert_eq!(got.status, StatusCode::METHOD_NOT_ALLOWED);
    }

    #[tokio::test]
    async fn faults_misbehave_and_clear() {
        let ca = DevCa::new();
        let len = CHUNK_SIZE * 2;
        let (_dir, server) = server_with(&[("f", len), ("g", 10)], Some(&ca)).await;

        server.set_fault("/f", Fault::Status(503));
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);

        server.set_fault("/f", Fault::RequireAuth("Bearer t".into()));
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.status, StatusCode::UNAUTHORIZED);
        let got = fetch(
            &server,
            Some(&ca),
            Method::GET,
            "/f",
            &[("authorization", "Bearer t")],
        )
        .await;
        assert_eq!(got.body.unwrap().len(), len);

        server.set_fault("/f", Fault::ResetAfter(1000));
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.body.is_err());

        server.set_fault(
            "/f",
            Fault::ShortBody {
                declared: 100,
                sent: 40,
            },
        );
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.headers[header::CONTENT_LENGTH], "100");
        assert!(got.body.is_err());

        server.set_fault("/f", Fault::Redirect("/g".into()));
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[("x-probe", "1")]).await;
        assert_eq!(got.status, StatusCode::FOUND);
        assert_eq!(got.headers[header::LOCATION], "/g");
        assert_eq!(server.last_headers("/f").unwrap()["x-probe"], "1");
        assert!(server.last_headers("/g").is_none());

        server.set_fault("/f", Fault::Once(Box::new(Fault::Status(404))));
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.status, StatusCode::NOT_FOUND);
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.body.unwrap(), content(len));

        server.set_fault("/f", Fault::Status(500));
        server.clear_fault("/f");
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert_eq!(got.body.unwrap(), content(len));
        assert_eq!(server.get_count("/f"), 9);
    }

    #[tokio::test]
    async fn cuts_work_over_http1_too() {
        let ca = DevCa::new();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), content(CHUNK_SIZE * 2)).unwrap();
        let server = DevServer::builder(dir.path())
            .tls(&ca)
            .http2(false)
            .start()
            .await
            .unwrap();
        server.set_fault("/f", Fault::ResetAfter(5000));
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert!(!got.alpn_h2);
        assert!(got.body.is_err());
        server.set_fault(
            "/f",
            Fault::ShortBody {
                declared: 10,
                sent: 3,
            },
        );
        let got = fetch(&server, Some(&ca), Method::GET, "/f", &[]).await;
        assert!(got.body.is_err());
        server.shutdown().await;
    }

    /// On the wire: a reset after exactly the promised bytes, a short body then a clean close.
    #[tokio::test]
    async fn cuts_deliver_the_promised_bytes() {
        use tokio::io::AsyncWriteExt;

        async fn raw_get(server: &DevServer) -> (Vec<u8>, Option<io::ErrorKind>) {
            let mut tcp = TcpStream::connect(server.addr()).await.unwrap();
            tcp.write_all(b"GET /f HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 65536];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => return (got, None),
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) => return (got, Some(e.kind())),
                }
            }
        }
        fn body_len(response: &[u8]) -> usize {
            let head_end = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
            response.len() - head_end - 4
        }

        let (_dir, server) = server_with(&[("f", CHUNK_SIZE * 2)], None).await;
        server.set_fault("/f", Fault::ResetAfter(5000));
        let (response, error) = raw_get(&server).await;
        assert_eq!(error, Some(io::ErrorKind::ConnectionReset));
        assert_eq!(body_len(&response), 5000);
        server.set_fault(
            "/f",
            Fault::ShortBody {
                declared: 100,
                sent: 40,
            },
        );
        let (response, error) = raw_get(&server).await;
        assert_eq!(error, None);
        assert_eq!(body_len(&response), 40);
        assert_eq!(&response[response.len() - 40..], &content(40)[..]);
    }

    #[test]
    fn range_parsing() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::RANGE, HeaderValue::from_str(v).unwrap());
            m
        };
        assert_eq!(parse_range(&HeaderMap::new(), 10), RangeAnswer::Whole);
        assert_eq!(
            parse_range(&h("bytes=0-0"), 10),
            RangeAnswer::Part { start: 0, end: 0 }
        );
        assert_eq!(
            parse_range(&h("bytes=5-100"), 10),
            RangeAnswer::Part { start: 5, end: 9 }
        );
        assert_eq!(
            parse_range(&h("bytes=-100"), 10),
            RangeAnswer::Part { start: 0, end: 9 }
        );
        assert_eq!(parse_range(&h("bytes=-0"), 10), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(&h("bytes=10-"), 10), RangeAnswer::Unsatisfiable);
        assert_eq!(parse_range(&h("bytes=5-4"), 10), RangeAnswer::Whole);
        assert_eq!(parse_range(&h("bytes=0-1,3-4"), 10), RangeAnswer::Whole);
        assert_eq!(parse_range(&h("bytes=0-5"), 0), RangeAnswer::Whole);
        assert_eq!(parse_range(&h("items=0-5"), 10), RangeAnswer::Whole);
    }
}
