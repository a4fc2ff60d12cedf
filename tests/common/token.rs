//! A registry token issuer for the registry tests: the "authorization service" of the Docker
//! registry token spec, as Harbor and Docker Hub run one, small enough to live in the test process.
//!
//! It serves `GET /token?service=…&scope=…` (and the OAuth2 `POST /token` form) over HTTPS,
//! checks HTTP basic credentials against a user table, grants each requested scope the
//! intersection of the asked actions and what an [`Grant`] list allows that user, and answers
//! `{"token":…,"access_token":…,"expires_in":300,"issued_at":…}`. Tokens are JWTs signed ES256
//! with a key whose certificate (in the `x5c` header) chains to the test CA, which the registry
//! is told to trust as its `rootcertbundle`. Every request is counted and recorded, so a test
//! can tell how many auth round trips a burst of pulls cost.
//!
//! Not for: anything but tests. No refresh tokens, no token revocation, no rate limiting, and the
//! signing key lives in memory only.

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use d7q::devserver::DevCa;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_rustls::TlsAcceptor;

/// The `iss` claim of every token, and the registry's `auth.token.issuer`.
pub const ISSUER: &str = "d7q-test-issuer";

/// How long a token is valid (`expires_in`).
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// Largest request body (the OAuth2 form) the issuer reads.
const MAX_BODY: usize = 64 * 1024;

/// Most scopes one request may ask for.
const MAX_SCOPES: usize = 32;

/// A connection that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What one user (or anyone, anonymous included) may do on repositories under a prefix.
#[derive(Clone, Debug)]
pub struct Grant {
    /// `None`: every caller, anonymous included.
    pub user: Option<String>,
    /// Repository names that start with this (`"private/"`, or `""` for all).
    pub prefix: String,
    /// Allowed actions, e.g. `["pull", "push"]`.
    pub actions: Vec<String>,
}

impl Grant {
    /// `user` may do `actions` on repositories starting with `prefix`.
    pub fn user(user: &str, prefix: &str, actions: &[&str]) -> Self {
        Self {
            user: Some(user.to_owned()),
            prefix: prefix.to_owned(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// Everybody, anonymous included, may do `actions` on repositories starting with `prefix`.
    pub fn anyone(prefix: &str, actions: &[&str]) -> Self {
        Self {
            user: None,
            prefix: prefix.to_owned(),
            actions: actions.iter().map(|a| a.to_string()).collect(),
        }
    }
}

/// One request the issuer answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// The authenticated user, `None` for anonymous (or refused) callers.
    pub user: Option<String>,
    /// The scopes asked for, as sent.
    pub scopes: Vec<String>,
    /// The status answered.
    pub status: u16,
}

/// A running token issuer; it stops when dropped.
pub struct TokenIssuer {
    addr: SocketAddr,
    host: String,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

struct Shared {
    service: String,
    users: Vec<(String, String)>,
    grants: Vec<Grant>,
    key: EcdsaKeyPair,
    /// The signing certificate, DER, base64 (standard alphabet) for the `x5c` header.
    x5c: String,
    rng: SystemRandom,
    count: AtomicU64,
    log: Mutex<Vec<TokenRequest>>,
}

/// Why a JWT could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The signing key was refused by ring.
    #[error("signing key rejected: {0}")]
    Key(String),
    /// Signing failed.
    #[error("signing failed")]
    Sign,
}

impl TokenIssuer {
    /// Starts an issuer for `service` on `ip:0`, with a TLS certificate for `host` signed by
    /// `ca` and a token-signing certificate issued by the same CA (so the registry's
    /// `rootcertbundle` is `ca`'s PEM).
    pub async fn start(
        ca: &DevCa,
        ip: IpAddr,
        host: &str,
        service: &str,
        users: &[(&str, &str)],
        grants: &[Grant],
    ) -> io::Result<Self> {
        let tls_leaf = ca.issue(&[host.to_owned()])?;
        let signer = ca.issue(&["d7q-token-signer".to_owned()])?;
        let rng = SystemRandom::new();
        let pkcs8 = signer.key_der();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.secret_der(), &rng)
                .map_err(|e| io::Error::other(TokenError::Key(e.to_string())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(vec![tls_leaf.cert_der()], tls_leaf.key_der())
        .map_err(io::Error::other)?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            service: service.to_owned(),
            users: users
                .iter()
                .map(|(u, p)| (u.to_string(), p.to_string()))
                .collect(),
            grants: grants.to_vec(),
            key,
            x5c: STANDARD.encode(signer.cert_der().as_ref()),
            rng,
            count: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, acceptor, Arc::clone(&shared)));
        Ok(Self {
            addr,
            host: host.to_owned(),
            shared,
            accept: Some(accept),
        })
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The realm URL for the registry's config: `https://HOST:PORT/token`.
    pub fn realm(&self) -> String {
        format!("https://{}:{}/token", self.host, self.addr.port())
    }

    /// Requests answered so far (any status).
    pub fn requests(&self) -> u64 {
        self.shared.count.load(Ordering::SeqCst)
    }

    /// Every request answered so far, in order.
    pub fn log(&self) -> Vec<TokenRequest> {
        self.shared
            .log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A token for `user` (`None`: anonymous) and `scopes`, minted in process without a
    /// request (not counted): what a test hands to curl to act as that user.
    pub fn mint(&self, user: Option<&str>, scopes: &[&str]) -> String {
        let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
        self.shared
            .token(user, &scopes)
            .expect("the test issuer signs tokens")
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        if let Some(accept) = self.accept.take() {
            accept.abort();
        }
    }
}

impl Shared {
    /// The JWT for `user` asking for `scopes`: granted actions only.
    fn token(&self, user: Option<&str>, scopes: &[String]) -> Result<String, TokenError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let access: Vec<serde_json::Value> = scopes
            .iter()
            .filter_map(|scope| parse_scope(scope))
            .map(|(kind, name, asked)| {
                let granted: Vec<&str> = asked
                    .iter()
                    .copied()
                    .filter(|action| kind == "repository" && self.allows(user, name, action))
                    .collect();
                serde_json::json!({"type": kind, "name": name, "actions": granted})
            })
            .collect();
        let header = serde_json::json!({"typ": "JWT", "alg": "ES256", "x5c": [self.x5c]});
        let mut jti = [0u8; 16];
        ring::rand::SecureRandom::fill(&self.rng, &mut jti).map_err(|_| TokenError::Sign)?;
        let claims = serde_json::json!({
            "iss": ISSUER,
            "sub": user.unwrap_or(""),
            "aud": self.service,
            "exp": now + TOKEN_LIFETIME.as_secs(),
            "nbf": now.saturating_sub(10),
            "iat": now,
            "jti": jti.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .map_err(|_| TokenError::Sign)?;
        Ok(format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        ))
    }

    fn allows(&self, user: Option<&str>, repo: &str, action: &str) -> bool {
        self.grants.iter().any(|g| {
            (g.user.is_none() || g.user.as_deref() == user)
                && repo.starts_with(&g.prefix)
                && g.actions.iter().any(|a| a == action || a == "*")
        })
    }

    /// Whether `user` with `password` is in the user table.
    fn check(&self, user: &str, password: &str) -> bool {
        self.users.iter().any(|(u, p)| u == user && p == password)
    }

    fn record(&self, user: Option<&str>, scopes: &[String], status: StatusCode) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(TokenRequest {
                user: user.map(str::to_owned),
                scopes: scopes.to_vec(),
                status: status.as_u16(),
            });
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.uri().path() != "/token" {
            return json(StatusCode::NOT_FOUND, r#"{"details":"not found"}"#.into());
        }
        let basic = basic_credentials(&req);
        let (method, query) = (
            req.method().clone(),
            req.uri().query().unwrap_or("").to_owned(),
        );
        let mut params = parse_form(&query);
        if method == Method::POST {
            let Ok(body) = Limited::new(req.into_body(), MAX_BODY).collect().await else {
                return json(StatusCode::BAD_REQUEST, r#"{"details":"bad body"}"#.into());
            };
            params.extend(parse_form(&String::from_utf8_lossy(&body.to_bytes())));
        } else if method != Method::GET {
            return json(StatusCode::METHOD_NOT_ALLOWED, "{}".into());
        }
        let scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| v.split(' ').map(str::to_owned).collect::<Vec<_>>())
            .filter(|s| !s.is_empty())
            .take(MAX_SCOPES)
            .collect();
        let form_credentials = params
            .iter()
            .find(|(k, _)| k == "username")
            .map(|(_, u)| u.clone())
            .zip(
                params
                    .iter()
                    .find(|(k, _)| k == "password")
                    .map(|(_, p)| p.clone()),
            );
        let user = match basic.or(form_credentials) {
            None => None,
            Some((user, password)) if self.check(&user, &password) => Some(user),
            Some(_) => {
                self.record(None, &scopes, StatusCode::UNAUTHORIZED);
                let mut resp = json(
                    StatusCode::UNAUTHORIZED,
                    r#"{"errors":[{"code":"UNAUTHORIZED","message":"invalid username or password"}]}"#
                        .into(),
                );
                resp.headers_mut().insert(
                    hyper::header::WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("Basic realm=\"d7q-test-issuer\""),
                );
                return resp;
            }
        };
        let Ok(token) = self.token(user.as_deref(), &scopes) else {
            self.record(user.as_deref(), &scopes, StatusCode::INTERNAL_SERVER_ERROR);
            return json(StatusCode::INTERNAL_SERVER_ERROR, "{}".into());
        };
        self.record(user.as_deref(), &scopes, StatusCode::OK);
        let issued_at = humantime_utc(SystemTime::now());
        let body = serde_json::json!({
            "token": token,
            "access_token": token,
            "expires_in": TOKEN_LIFETIME.as_secs(),
            "issued_at": issued_at,
        });
        json(StatusCode::OK, body.to_string())
    }
}

async fn accept_loop(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut connections = JoinSet::new();
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        while connections.try_join_next().is_some() {}
        let (acceptor, shared) = (acceptor.clone(), Arc::clone(&shared));
        connections.spawn(async move {
            let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let service = service_fn(move |req| {
                let shared = Arc::clone(&shared);
                async move { Ok::<_, Infallible>(shared.handle(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

/// `type:name:actions` → (type, name, actions); the name may hold colons (a port).
fn parse_scope(scope: &str) -> Option<(&str, &str, Vec<&str>)> {
    let (kind, rest) = scope.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some((
        kind,
        name,
        actions.split(',').filter(|a| !a.is_empty()).collect(),
    ))
}

fn basic_credentials(req: &Request<Incoming>) -> Option<(String, String)> {
    let value = req
        .headers()
        .get(hyper::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = STANDARD.decode(encoded.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_owned(), password.to_owned()))
}

/// `k=v&k=v` with `+` and `%XX` decoded; malformed escapes are kept as they are.
fn parse_form(input: &str) -> Vec<(String, String)> {
    input
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(input: &str) -> String {
    let bytes = input.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                if let Some(byte) = hex {
                    out.push(byte);
                    i += 2;
                } else {
                    out.push(b'%');
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3339 UTC time, seconds precision, without a date crate.
fn humantime_utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
