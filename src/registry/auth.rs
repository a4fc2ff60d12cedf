//! Registry authentication: `WWW-Authenticate` challenges (Basic and Bearer), credentials from
//! the command line or `~/.docker/config.json`, token responses, and a token cache that makes
//! concurrent requests for the same (realm, service, scope) share one token fetch.
//!
//! Parsing is pure; the cache only coordinates — the HTTP request that fetches a token is the
//! caller's ([`super::client`]). Not for: credential helpers (`credsStore`, `credHelpers`),
//! which would run external programs; they are refused with a clear error.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Largest `config.json` read.
pub const MAX_DOCKER_CONFIG: u64 = 1 << 20;
/// Largest token response accepted from a token endpoint.
pub const MAX_TOKEN_RESPONSE: usize = 64 << 10;
/// Token lifetime assumed when the endpoint names none (the distribution spec's default).
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// A token this close to its expiry is fetched again rather than handed out.
pub const TOKEN_EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Longest `WWW-Authenticate` header parsed.
pub const MAX_CHALLENGE_LEN: usize = 4096;
/// Distinct (realm, service, scope) tokens cached per process.
pub const MAX_CACHED_TOKENS: usize = 256;

/// Why authentication could not proceed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The challenge header could not be understood.
    #[error("unreadable WWW-Authenticate header: {0}")]
    Challenge(String),
    /// The Docker config file is unreadable or malformed.
    #[error("{path}: {reason}")]
    DockerConfig {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The Docker config delegates this registry to a credential helper.
    #[error("{path}: credentials for {registry} are kept by the credential helper {helper:?}, which d7q does not run; pass --username and --password-stdin")]
    CredentialHelper {
        /// The file.
        path: String,
        /// The registry.
        registry: String,
        /// The helper's name.
        helper: String,
    },
    /// The token endpoint's answer is not a token.
    #[error("token endpoint answered without a token: {0}")]
    TokenResponse(String),
}

/// A user name and password for a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password, even in debug logs.
        write!(f, "Credentials({:?}, ***)", self.username)
    }
}

impl Credentials {
    /// The `Authorization` value for HTTP Basic.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!("Basic {}", base64_encode(raw.as_bytes()))
    }
}

/// What a registry asks for in its 401.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Challenge {
    /// HTTP Basic with the registry's own credentials.
    Basic {
        /// The realm, informational.
        realm: String,
    },
    /// A bearer token from a token endpoint.
    Bearer {
        /// The token endpoint URL.
        realm: String,
        /// The `service` parameter, if given.
        service: Option<String>,
        /// The `scope` parameter, if given.
        scope: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header value: `Basic realm="…"` or
/// `Bearer realm="…",service="…",scope="…"`. Parameter names are case-insensitive; values may
/// be quoted (with `\` escapes) or bare tokens.
pub fn parse_challenge(header: &str) -> Result<Challenge, AuthError> {
    if header.len() > MAX_CHALLENGE_LEN {
        return Err(AuthError::Challenge("too long".into()));
    }
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest)?;
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Ok(Challenge::Basic {
            realm: get("realm").unwrap_or_default(),
        }),
        "bearer" => {
            let realm = get("realm")
                .filter(|r| r.starts_with("https://") || r.starts_with("http://"))
                .ok_or_else(|| AuthError::Challenge("Bearer without an http(s) realm".into()))?;
            Ok(Challenge::Bearer {
                realm,
                service: get("service"),
                scope: get("scope"),
            })
        }
        other => Err(AuthError::Challenge(format!(
            "unsupported scheme {other:?}"
        ))),
    }
}

fn parse_params(s: &str) -> Result<Vec<(String, String)>, AuthError> {
    let bad = |why: &str| AuthError::Challenge(why.to_string());
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b' ' || b[i] == b',' || b[i] == b'\t') {
            i += 1;
        }
        if i >= b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && b[i] != b'=' && b[i] != b',' && b[i] != b' ' {
            i += 1;
        }
        let name = s[start..i].to_ascii_lowercase();
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        if i >= b.len() || b[i] != b'=' {
            return Err(bad("parameter without a value"));
        }
        i += 1;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err(bad("unterminated quoted value")),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        let c = b.get(i + 1).ok_or_else(|| bad("dangling escape"))?;
                        value.push(*c);
                        i += 2;
                    }
                    Some(c) => {
                        value.push(*c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && b[i] != b',' {
                value.push(b[i]);
                i += 1;
            }
            while value.last() == Some(&b' ') {
                value.pop();
            }
        }
        let value = String::from_utf8(value).map_err(|_| bad("value is not UTF-8"))?;
        out.push((name, value));
    }
}

/// A token endpoint's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// The bearer token.
    pub token: String,
    /// How long it is valid.
    pub lifetime: Duration,
}

/// Parses a token endpoint's JSON: `token` or `access_token`, and `expires_in` seconds.
pub fn parse_token_response(body: &[u8]) -> Result<Token, AuthError> {
    #[derive(Deserialize)]
    struct Raw {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    if body.len() > MAX_TOKEN_RESPONSE {
        return Err(AuthError::TokenResponse("response too large".into()));
    }
    let raw: Raw =
        serde_json::from_slice(body).map_err(|e| AuthError::TokenResponse(e.to_string()))?;
    let token = raw
        .token
        .filter(|t| !t.is_empty())
        .or(raw.access_token.filter(|t| !t.is_empty()))
        .ok_or_else(|| AuthError::TokenResponse("no token or access_token field".into()))?;
    if token.bytes().any(|c| !(0x21..0x7f).contains(&c)) {
        return Err(AuthError::TokenResponse(
            "token has characters not allowed in a header".into(),
        ));
    }
    let lifetime = raw
        .expires_in
        .filter(|s| *s > 0)
        .map(|s| Duration::from_secs(s.min(24 * 3600)))
        .unwrap_or(DEFAULT_TOKEN_LIFETIME);
    Ok(Token { token, lifetime })
}

/// The Docker client configuration file: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`.
pub fn docker_config_path() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir).join("config.json"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".docker").join("config.json"))
}

/// Credentials for `registry` from the Docker config at `path`; `Ok(None)` when the file is
/// missing or has none for it.
pub fn docker_config_credentials(
    path: &Path,
    registry: &str,
) -> Result<Option<Credentials>, AuthError> {
    use std::io::Read;
    let shown = path.display().to_string();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(AuthError::DockerConfig {
                path: shown,
                reason: e.to_string(),
            })
        }
    };
    let mut bytes = Vec::new();
    file.take(MAX_DOCKER_CONFIG + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| AuthError::DockerConfig {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
    if bytes.len() as u64 > MAX_DOCKER_CONFIG {
        return Err(AuthError::DockerConfig {
            path: shown,
            reason: format!("larger than {MAX_DOCKER_CONFIG} bytes"),
        });
    }
    credentials_from_docker_config(&bytes, registry, &shown)
}

/// [`docker_config_credentials`] on the file's bytes; `shown` names the file in errors.
pub fn credentials_from_docker_config(
    json: &[u8],
    registry: &str,
    shown: &str,
) -> Result<Option<Credentials>, AuthError> {
    #[derive(Deserialize, Default)]
    #[serde(rename_all = "camelCase")]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
        creds_store: Option<String>,
        #[serde(default)]
        cred_helpers: HashMap<String, String>,
    }
    #[derive(Deserialize, Default)]
    struct Entry {
        auth: Option<String>,
        username: Option<String>,
        password: Option<String>,
    }
    let bad = |reason: String| AuthError::DockerConfig {
        path: shown.to_string(),
        reason,
    };
    let file: File = serde_json::from_slice(json).map_err(|e| bad(e.to_string()))?;
    let keys = config_keys(registry);
    if let Some(helper) = keys.iter().find_map(|k| file.cred_helpers.get(k)) {
        return Err(AuthError::CredentialHelper {
            path: shown.to_string(),
            registry: registry.to_string(),
            helper: helper.clone(),
        });
    }
    let entry = file.auths.iter().find_map(|(k, v)| {
        let k = normalize_config_key(k);
        keys.contains(&k).then_some(v)
    });
    if let Some(e) = entry {
        if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
            let raw = base64_decode(auth.trim())
                .ok_or_else(|| bad(format!("auths entry for {registry}: auth is not base64")))?;
            let raw = String::from_utf8(raw)
                .map_err(|_| bad(format!("auths entry for {registry}: auth is not UTF-8")))?;
            let (u, p) = raw.split_once(':').ok_or_else(|| {
                bad(format!(
                    "auths entry for {registry}: auth is not user:password"
                ))
            })?;
            return Ok(Some(Credentials {
                username: u.to_string(),
                password: p.to_string(),
            }));
        }
        if let (Some(u), Some(p)) = (&e.username, &e.password) {
            return Ok(Some(Credentials {
                username: u.clone(),
                password: p.clone(),
            }));
        }
    }
    if let Some(helper) = file.creds_store.filter(|s| !s.is_empty()) {
        return Err(AuthError::CredentialHelper {
            path: shown.to_string(),
            registry: registry.to_string(),
            helper,
        });
    }
    Ok(None)
}

/// The keys a registry may be filed under: its host, and Docker Hub's historical names.
fn config_keys(registry: &str) -> Vec<String> {
    let mut keys = vec![registry.to_ascii_lowercase()];
    if registry == super::reference::DOCKER_HUB {
        keys.extend(
            ["index.docker.io", "registry-1.docker.io"]
                .iter()
                .map(|s| s.to_string()),
        );
    }
    keys
}

/// `https://index.docker.io/v1/` → `index.docker.io`.
fn normalize_config_key(k: &str) -> String {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k).to_ascii_lowercase()
}

/// Coalesces token fetches: concurrent callers for one (realm, service, scope) wait for a single
/// fetch and share its token until it nears expiry.
#[derive(Default)]
pub struct TokenCache {
    // A std Mutex for the map (held without awaiting); a tokio Mutex per key, because the
    // fetch that fills it is awaited while the key is held.
    slots: Mutex<HashMap<TokenKey, TokenSlot>>,
}

/// One cached token and when it was fetched; the async lock is held while fetching.
type TokenSlot = Arc<tokio::sync::Mutex<Option<(Token, Instant)>>>;

/// What a token is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenKey {
    /// The token endpoint.
    pub realm: String,
    /// The service parameter.
    pub service: Option<String>,
    /// The scope parameter.
    pub scope: Option<String>,
}

impl TokenCache {
    /// A cached token for `key`, or the result of `fetch` (run by one caller at a time).
    pub async fn get_or_fetch<F, Fut, E>(&self, key: &TokenKey, fetch: F) -> Result<String, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, E>>,
    {
        let slot = {
            let mut slots = self.slots.lock().expect("token cache lock");
            if slots.len() >= MAX_CACHED_TOKENS && !slots.contains_key(key) {
                slots.clear();
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let mut guard = slot.lock().await;
        if let Some((t, at)) = guard.as_ref() {
            if at.elapsed() + TOKEN_EXPIRY_MARGIN < t.lifetime {
                return Ok(t.token.clone());
            }
        }
        let t = fetch().await?;
        let token = t.token.clone();
        *guard = Some((t, Instant::now()));
        Ok(token)
    }

    /// Forgets the token for `key` (the registry refused it).
    pub fn forget(&self, key: &TokenKey) {
        self.slots.lock().expect("token cache lock").remove(key);
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = match chunk.len() {
            1 => (chunk[0] as u32) << 16,
            2 => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8,
            _ => (chunk[0] as u32) << 16 | (chunk[1] as u32) << 8 | chunk[2] as u32,
        };
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard base64, padding optional; `None` on any other character.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = B64.iter().position(|&b| b == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            )
            .unwrap(),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into()),
                scope: Some("repository:library/alpine:pull".into()),
            }
        );
        // Harbor-style spacing, bare tokens, case, and an escaped quote.
        assert_eq!(
            parse_challenge(r#"bearer Realm = "https://h.test/service/token" , service=harbor-registry, scope="a\"b""#)
                .unwrap(),
            Challenge::Bearer {
                realm: "https://h.test/service/token".into(),
                service: Some("harbor-registry".into()),
                scope: Some("a\"b".into()),
            }
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#).unwrap(),
            Challenge::Basic {
                realm: "Registry Realm".into()
            }
        );
        assert_eq!(
            parse_challenge("Basic").unwrap(),
            Challenge::Basic {
                realm: String::new()
            }
        );
        assert!(parse_challenge("Bearer service=\"x\"").is_err());
        assert!(parse_challenge("Bearer realm=\"ftp://x\"").is_err());
        assert!(parse_challenge("Bearer realm=\"https://x").is_err());
        assert!(parse_challenge("Negotiate abc").is_err());
        assert!(parse_challenge(&"a".repeat(MAX_CHALLENGE_LEN + 1)).is_err());
    }

    #[test]
    fn token_responses() {
        let t = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!(t.token, "abc");
        assert_eq!(t.lifetime, Duration::from_secs(300));
        let t = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!(t.token, "xyz");
        assert_eq!(t.lifetime, DEFAULT_TOKEN_LIFETIME);
        assert!(parse_token_response(br#"{"token":""}"#).is_err());
        assert!(parse_token_response(br#"{"token":"a\nb"}"#).is_err());
        assert!(parse_token_response(b"<html>").is_err());
    }

    #[test]
    fn base64_round_trips() {
        for s in [
            "",
            "f",
            "fo",
            "foo",
            "foob",
            "fooba",
            "foobar",
            "user:pa:ss",
        ] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(base64_decode(&e).unwrap(), s.as_bytes());
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_encode(b"fo"), "Zm8=");
        assert_eq!(base64_decode("Zm8").unwrap(), b"fo");
        assert!(base64_decode("Zm9v!").is_none());
        let c = Credentials {
            username: "Aladdin".into(),
            password: "open sesame".into(),
        };
        assert_eq!(c.basic(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
        assert!(!format!("{c:?}").contains("sesame"));
    }

    #[test]
    fn docker_config() {
        let auth = base64_encode(b"alice:s3cret:x");
        let json = format!(
            r#"{{"auths":{{"registry.test:5000":{{"auth":"{auth}"}},
                "https://index.docker.io/v1/":{{"auth":"{}"}},
                "plain.test":{{"username":"bob","password":"pw"}}}},
               "credHelpers":{{"ecr.test":"ecr-login"}}}}"#,
            base64_encode(b"hub:hubpw")
        );
        let get = |r: &str| credentials_from_docker_config(json.as_bytes(), r, "config.json");
        let c = get("registry.test:5000").unwrap().unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("alice", "s3cret:x")
        );
        let c = get("docker.io").unwrap().unwrap();
        assert_eq!(c.username, "hub");
        assert_eq!(get("plain.test").unwrap().unwrap().username, "bob");
        assert_eq!(get("other.test").unwrap(), None);
        let e = get("ecr.test").unwrap_err();
        assert!(e.to_string().contains("ecr-login"), "{e}");
        assert!(e.to_string().contains("--password-stdin"), "{e}");
        // A credential store covers every registry without an inline entry.
        let json = format!(
            r#"{{"auths":{{"registry.test:5000":{{"auth":"{auth}"}}, "x.test":{{}}}},"credsStore":"desktop"}}"#
        );
        let get = |r: &str| credentials_from_docker_config(json.as_bytes(), r, "config.json");
        assert_eq!(
            get("registry.test:5000").unwrap().unwrap().username,
            "alice"
        );
        assert!(matches!(
            get("x.test"),
            Err(AuthError::CredentialHelper { .. })
        ));
        assert!(credentials_from_docker_config(b"{", "x", "c").is_err());
        let bad = r#"{"auths":{"x.test":{"auth":"!!"}}}"#;
        assert!(credentials_from_docker_config(bad.as_bytes(), "x.test", "c").is_err());
        assert_eq!(
            credentials_from_docker_config(b"{}", "x", "c").unwrap(),
            None
        );
    }

    #[tokio::test]
    async fn token_fetches_are_coalesced() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let key = TokenKey {
            realm: "https://auth.test/token".into(),
            service: Some("registry".into()),
            scope: Some("repository:a:pull".into()),
        };
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (cache, fetches, key) = (cache.clone(), fetches.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get_or_fetch(&key, || async {
                        fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok::<_, ()>(Token {
                            token: "t1".into(),
                            lifetime: Duration::from_secs(300),
                        })
                    })
                    .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), Ok("t1".to_string()));
        }
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Another scope is another token; a forgotten one is fetched again.
        let other = TokenKey {
            scope: Some("repository:b:pull".into()),
            ..key.clone()
        };
        let count = |n: &'static str| {
            let fetches = fetches.clone();
            move || async move {
                fetches.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Ok::<_, ()>(Token {
                    token: n.into(),
                    lifetime: Duration::from_secs(300),
                })
            }
        };
        assert_eq!(
            cache.get_or_fetch(&other, count("t2")).await,
            Ok("t2".into())
        );
        cache.forget(&key);
        assert_eq!(cache.get_or_fetch(&key, count("t3")).await, Ok("t3".into()));
        assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 3);
        // A token about to expire is not handed out.
        let short = TokenKey {
            scope: Some("s".into()),
            ..key
        };
        let expiring = || async {
            Ok::<_, ()>(Token {
                token: "old".into(),
                lifetime: TOKEN_EXPIRY_MARGIN,
            })
        };
        assert_eq!(cache.get_or_fetch(&short, expiring).await, Ok("old".into()));
        assert_eq!(
            cache.get_or_fetch(&short, count("new")).await,
            Ok("new".into())
        );
    }
}
