//! Registry token requests, coalesced.
//!
//! A registry that wants a bearer token answers 401 with `WWW-Authenticate: Bearer
//! realm="https://…/token",service=…,scope=…`. The proxy learns the realm from such answers as
//! they pass through; later `GET`s to a realm that are identical (same URL with its query, same
//! `Authorization`) share one upstream request while it is in flight, and a successful answer
//! is reused for identical requests for a short while (half its `expires_in`, at most
//! [`MAX_REUSE`]). A burst of pulls on a host then costs one auth round trip.
//!
//! Identical means byte-identical credentials: an answer is never given to a client that did
//! not send exactly the credentials that obtained it. Basic auth to the registry itself is not
//! touched here; it travels with each request.
//!
//! Not for: fetching (the caller passes the fetch), deciding access to blobs.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, StatusCode, Uri};

/// Longest a token answer is reused.
pub const MAX_REUSE: Duration = Duration::from_secs(60);
/// `expires_in` assumed when a token answer has none (the distribution spec's default).
pub const DEFAULT_EXPIRES_IN: u64 = 60;
/// Token answers (in flight or reusable) remembered at once.
pub const MAX_SLOTS: usize = 1024;
/// Realms remembered; the oldest is forgotten first.
pub const MAX_REALMS: usize = 256;
/// Largest token answer body kept; a larger one is an error (tokens are a few KiB).
pub const MAX_TOKEN_BODY: usize = 1 << 20;

/// A token endpoint's answer, as given to every client that shares it.
#[derive(Debug)]
pub struct TokenAnswer {
    /// Status.
    pub status: StatusCode,
    /// Headers, hop-by-hop ones removed.
    pub headers: HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Realms learned and token answers shared.
#[derive(Default)]
pub struct Tokens {
    // std Mutexes: map operations only, never held across an await.
    realms: Mutex<Realms>,
    slots: Mutex<HashMap<(String, String), Arc<Slot>>>,
}

#[derive(Default)]
struct Realms {
    set: HashSet<String>,
    order: VecDeque<String>,
}

#[derive(Default)]
struct Slot {
    cell: tokio::sync::OnceCell<Arc<TokenAnswer>>,
    /// Until when the answer may be reused; set once the answer is in.
    fresh_until: Mutex<Option<Instant>>,
}

impl Slot {
    /// Whether a new request may join this slot at `now`: in flight, or a fresh answer.
    fn usable(&self, now: Instant) -> bool {
        if !self.cell.initialized() {
            return true;
        }
        let until = *self.fresh_until.lock().unwrap_or_else(|e| e.into_inner());
        until.is_some_and(|t| now < t)
    }
}

impl Tokens {
    /// Remembers the realm of a `WWW-Authenticate` header value, if it is a bearer challenge.
    pub fn learn(&self, www_authenticate: &str) {
        let Some(realm) = bearer_realm(www_authenticate) else {
            return;
        };
        let Ok(uri) = realm.parse::<Uri>() else {
            return;
        };
        let Some(key) = realm_key(&uri) else {
            return;
        };
        let mut r = self.realms.lock().unwrap_or_else(|e| e.into_inner());
        if r.set.insert(key.clone()) {
            r.order.push_back(key);
            while r.order.len() > MAX_REALMS {
                if let Some(old) = r.order.pop_front() {
                    r.set.remove(&old);
                }
            }
        }
    }

    /// Whether `uri` (absolute) is a learned token endpoint.
    pub fn is_realm(&self, uri: &Uri) -> bool {
        let Some(key) = realm_key(uri) else {
            return false;
        };
        self.realms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .set
            .contains(&key)
    }

    /// The answer for `url` with `authorization`: joins an identical request in flight, reuses
    /// a fresh identical answer, or runs `fetch`. Returns the answer and whether it was shared
    /// (another request's).
    pub async fn get<F, Fut>(
        &self,
        url: String,
        authorization: String,
        now: Instant,
        fetch: F,
    ) -> (Arc<TokenAnswer>, bool)
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = TokenAnswer>,
    {
        let key = (url, authorization);
        let slot = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            match slots.get(&key) {
                Some(s) if s.usable(now) => s.clone(),
                _ => {
                    if slots.len() >= MAX_SLOTS {
                        slots.retain(|_, s| s.usable(now));
                    }
                    let s = Arc::new(Slot::default());
                    // Full of live slots: this request runs alone, unshared.
                    if slots.len() < MAX_SLOTS {
                        slots.insert(key.clone(), s.clone());
                    }
                    s
                }
            }
        };
        let mut ran = false;
        let answer = slot
            .cell
            .get_or_init(|| {
                ran = true;
                complete(fetch(), slot.clone(), now)
            })
            .await
            .clone();
        if ran && !slot.usable(now) {
            // Not reusable (an error, or a token too short-lived): later requests go upstream.
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if slots.get(&key).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                slots.remove(&key);
            }
        }
        (answer, !ran)
    }
}

/// Runs a fetch and records until when its answer may be reused.
async fn complete(
    fetch: impl Future<Output = TokenAnswer>,
    slot: Arc<Slot>,
    now: Instant,
) -> Arc<TokenAnswer> {
    let a = fetch.await;
    let reuse = reuse_for(a.status, &a.body);
    *slot.fresh_until.lock().unwrap_or_else(|e| e.into_inner()) =
        (!reuse.is_zero()).then(|| now + reuse);
    Arc::new(a)
}

/// How long a token answer may be reused: `min(expires_in / 2, MAX_REUSE)` for a success, zero
/// otherwise.
pub fn reuse_for(status: StatusCode, body: &[u8]) -> Duration {
    if !status.is_success() {
        return Duration::ZERO;
    }
    let expires_in = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("expires_in").and_then(|e| e.as_u64()))
        .unwrap_or(DEFAULT_EXPIRES_IN);
    Duration::from_secs(expires_in / 2).min(MAX_REUSE)
}

/// The `realm` of a `Bearer` challenge, if `value` is one.
pub fn bearer_realm(value: &str) -> Option<String> {
    let value = value.trim_start();
    let (scheme, rest) = value.split_once(char::is_whitespace)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    params(rest)
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("realm"))
        .map(|(_, v)| v)
}

/// `k=v` or `k="quoted \" v"` parameters, comma separated.
fn params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c == ',' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() {
            return out;
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek() != Some(&'=') {
            continue;
        }
        chars.next();
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
            value = value.trim_end().to_string();
        }
        out.push((key, value));
    }
}

/// `scheme://host[:port]/path`, the default port dropped, the host lower-cased.
fn realm_key(uri: &Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let host = uri.host()?.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let port = uri.port_u16().filter(|p| *p != default);
    Some(match port {
        Some(p) => format!("{scheme}://{host}:{p}{}", uri.path()),
        None => format!("{scheme}://{host}{}", uri.path()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn parses_bearer_challenges() {
        assert_eq!(
            bearer_realm(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull""#
            )
            .as_deref(),
            Some("https://auth.docker.io/token")
        );
        assert_eq!(
            bearer_realm(r#"bearer service="s", realm = "https://h/t\"x", scope=a"#).as_deref(),
            Some("https://h/t\"x")
        );
        assert_eq!(
            bearer_realm("Bearer realm=https://h/t,service=s").as_deref(),
            Some("https://h/t")
        );
        assert_eq!(bearer_realm(r#"Basic realm="x""#), None);
        assert_eq!(bearer_realm("Bearer"), None);
        assert_eq!(bearer_realm(r#"Bearer service="s""#), None);
        assert_eq!(
            bearer_realm(r#"Bearer realm="unterminated"#).as_deref(),
            Some("unterminated")
        );
    }

    #[test]
    fn realms_match_by_scheme_host_port_path() {
        let t = Tokens::default();
        t.learn(r#"Bearer realm="https://Harbor.corp:443/service/token",service="harbor""#);
        t.learn(r#"Basic realm="ignored""#);
        let is = |u: &str| t.is_realm(&u.parse().unwrap());
        assert!(is("https://harbor.corp/service/token?scope=x"));
        assert!(is("https://harbor.corp:443/service/token"));
        assert!(!is("http://harbor.corp/service/token"));
        assert!(!is("https://harbor.corp:8443/service/token"));
        assert!(!is("https://harbor.corp/service/token2"));
        for i in 0..MAX_REALMS {
            t.learn(&format!(r#"Bearer realm="https://h{i}/t""#));
        }
        assert!(!is("https://harbor.corp/service/token"), "oldest forgotten");
        assert!(is(&format!("https://h{}/t", MAX_REALMS - 1)));
    }

    #[test]
    fn reuse_is_half_the_lifetime_capped() {
        let ok = StatusCode::OK;
        assert_eq!(
            reuse_for(ok, br#"{"token":"t","expires_in":300}"#),
            MAX_REUSE
        );
        assert_eq!(
            reuse_for(ok, br#"{"token":"t","expires_in":20}"#),
            Duration::from_secs(10)
        );
        assert_eq!(reuse_for(ok, br#"{"token":"t"}"#), Duration::from_secs(30));
        assert_eq!(reuse_for(ok, br#"{"expires_in":1}"#), Duration::ZERO);
        assert_eq!(reuse_for(StatusCode::UNAUTHORIZED, b"{}"), Duration::ZERO);
    }

    fn answer(status: StatusCode, body: &'static str) -> TokenAnswer {
        TokenAnswer {
            status,
            headers: HeaderMap::new(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[tokio::test]
    async fn concurrent_identical_requests_share_one_fetch() {
        let tokens = Arc::new(Tokens::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Notify::new());
        let now = Instant::now();
        let mut joins = Vec::new();
        for _ in 0..8 {
            let (tokens, calls, gate) = (tokens.clone(), calls.clone(), gate.clone());
            joins.push(tokio::spawn(async move {
                tokens
                    .get(
                        "https://h/t?scope=a".into(),
                        "Basic x".into(),
                        now,
                        || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            gate.notified().await;
                            answer(StatusCode::OK, r#"{"token":"T","expires_in":300}"#)
                        },
                    )
                    .await
            }));
        }
        // Every task is waiting on the one fetch; release it.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        gate.notify_one();
        let mut shared = 0;
        for j in joins {
            let (a, s) = j.await.unwrap();
            assert_eq!(&a.body[..], br#"{"token":"T","expires_in":300}"#);
            shared += usize::from(s);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(shared, 7);

        let fetch = |calls: Arc<AtomicUsize>| {
            move || async move {
                calls.fetch_add(1, Ordering::SeqCst);
                answer(StatusCode::OK, r#"{"token":"U"}"#)
            }
        };
        // Reused while fresh.
        let (a, s) = tokens
            .get(
                "https://h/t?scope=a".into(),
                "Basic x".into(),
                now + Duration::from_secs(59),
                fetch(calls.clone()),
            )
            .await;
        assert!(s);
        assert_eq!(&a.body[..], br#"{"token":"T","expires_in":300}"#);
        // Other credentials or another scope: a fetch of their own.
        tokens
            .get(
                "https://h/t?scope=a".into(),
                "Basic y".into(),
                now,
                fetch(calls.clone()),
            )
            .await;
        tokens
            .get(
                "https://h/t?scope=b".into(),
                "Basic x".into(),
                now,
                fetch(calls.clone()),
            )
            .await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        // Stale: fetched again.
        let (a, s) = tokens
            .get(
                "https://h/t?scope=a".into(),
                "Basic x".into(),
                now + MAX_REUSE,
                fetch(calls.clone()),
            )
            .await;
        assert!(!s);
        assert_eq!(&a.body[..], br#"{"token":"U"}"#);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn failures_are_not_reused() {
        let tokens = Tokens::default();
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            let (a, s) = tokens
                .get(
                    "https://h/t".into(),
                    String::new(),
                    Instant::now(),
                    || async {
                        calls.fetch_add(1, Ordering::SeqCst);
                        answer(StatusCode::UNAUTHORIZED, "no")
                    },
                )
                .await;
            assert_eq!(a.status, StatusCode::UNAUTHORIZED);
            assert!(!s);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn slots_are_bounded() {
        let tokens = Tokens::default();
        let now = Instant::now();
        for i in 0..MAX_SLOTS + 10 {
            tokens
                .get(format!("https://h/t?{i}"), String::new(), now, || async {
                    answer(StatusCode::OK, "{}")
                })
                .await;
        }
        assert!(tokens.slots.lock().unwrap().len() <= MAX_SLOTS);
    }
}
