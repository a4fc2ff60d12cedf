//! A registry API client for the small part of the distribution protocol that `d7q pull`
//! needs itself: manifests (by tag or digest) and the authentication dance around them —
//! anonymous, Basic, or Bearer tokens from the registry's token endpoint (fetched once per
//! realm, service and scope and shared by concurrent requests).
//!
//! Blobs are not fetched here: they go through the mesh, and [`RegistryClient::authorization`]
//! hands out the `Authorization` value the mesh's back-to-source request carries.
//! TLS trusts the system roots, `SSL_CERT_FILE`/`SSL_CERT_DIR` and extra CA files.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use http::{header, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;

use crate::origin::redacted;

use super::auth::{self, AuthError, Challenge, Credentials, TokenCache, TokenKey};
use super::manifest::{self, Manifest, ManifestError};
use super::reference::Reference;

/// Time for a whole manifest or token request, headers and body.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest error body read to explain a failure.
pub const MAX_ERROR_BODY: usize = 16 << 10;

/// Why a registry request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RegistryError {
    /// The repository, tag or digest does not exist.
    #[error("{image}: not found{}", detail_suffix(.detail))]
    NotFound {
        /// The image asked for.
        image: String,
        /// The registry's error code and message.
        detail: String,
    },
    /// The registry needs credentials and none were given.
    #[error("{registry} refused anonymous access to {image}{} (it does not exist or needs credentials: log in with `docker login` or pass --username and --password-stdin)", detail_suffix(.detail))]
    AuthRequired {
        /// The registry.
        registry: String,
        /// The image asked for.
        image: String,
        /// The registry's error code and message.
        detail: String,
    },
    /// The registry (or its token endpoint) refused the given credentials, or they do not
    /// grant access.
    #[error("{registry} refused the credentials of {username:?} for {image} ({status}){}", detail_suffix(.detail))]
    Unauthorized {
        /// The registry.
        registry: String,
        /// The image asked for.
        image: String,
        /// The user name given.
        username: String,
        /// 401 or 403.
        status: u16,
        /// The registry's error code and message.
        detail: String,
    },
    /// Any other error status.
    #[error("registry answered {status} for {url}{}", detail_suffix(.detail))]
    Status {
        /// The status code.
        status: u16,
        /// The URL.
        url: String,
        /// The registry's error code and message.
        detail: String,
    },
    /// The registry could not be reached.
    #[error("registry unreachable: {url}: {reason}")]
    Unreachable {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Manifest bytes did not match the digest they were asked by.
    #[error("digest mismatch for {what}: expected {expected}, got {actual}")]
    Digest {
        /// What was fetched.
        what: String,
        /// The digest asked for.
        expected: String,
        /// The digest of the bytes received.
        actual: String,
    },
    /// The manifest was unusable.
    #[error("{image}: {source}")]
    Manifest {
        /// The image.
        image: String,
        /// Why.
        source: ManifestError,
    },
    /// Authentication could not proceed.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// Something about the request or answer was unusable.
    #[error("{0}")]
    Invalid(String),
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(" ({detail})")
    }
}

impl RegistryError {
    /// The process exit code for this failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            RegistryError::Digest { .. } => crate::exit::INTEGRITY,
            RegistryError::Auth(AuthError::DockerConfig { .. })
            | RegistryError::Auth(AuthError::CredentialHelper { .. }) => crate::exit::USAGE,
            _ => crate::exit::ORIGIN,
        }
    }
}

/// A manifest as fetched: its bytes (kept verbatim, so its digest holds), type and digest.
#[derive(Clone, Debug)]
pub struct FetchedManifest {
    /// The bytes as served.
    pub bytes: Bytes,
    /// The media type.
    pub media_type: String,
    /// `sha256:HEX` of `bytes`.
    pub digest: String,
    /// The parsed document.
    pub manifest: Manifest,
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A registry client with one set of credentials (or none).
pub struct RegistryClient {
    http: Client<Https, Empty<Bytes>>,
    credentials: Option<Credentials>,
    tokens: TokenCache,
    // What each registry host asked for in its last 401, so later requests (and the blob
    // fetches of the mesh) authenticate up front. Held without awaiting: a std Mutex.
    challenges: Mutex<HashMap<String, Challenge>>,
}

impl RegistryClient {
    /// A client trusting the system roots (and `SSL_CERT_FILE`) plus `extra_cas`.
    pub fn new(
        extra_cas: &[PathBuf],
        credentials: Option<Credentials>,
    ) -> Result<Self, RegistryError> {
        let https = crate::origin::https_connector(extra_cas).map_err(RegistryError::Invalid)?;
        Ok(Self {
            http: Client::builder(TokioExecutor::new()).build(https),
            credentials,
            tokens: TokenCache::default(),
            challenges: Mutex::new(HashMap::new()),
        })
    }

    /// Fetches the manifest `reference` (a tag or `sha256:` digest) of `image`'s repository,
    /// verifying the bytes when asked by digest.
    pub async fn manifest(
        &self,
        image: &Reference,
        reference: &str,
    ) -> Result<FetchedManifest, RegistryError> {
        let url = image.manifest_url(reference);
        let shown = format!("{}/{}", image.registry, image.repository);
        let shown = if reference.starts_with("sha256:") {
            format!("{shown}@{reference}")
        } else {
            format!("{shown}:{reference}")
        };
        let (status, headers, body) = self
            .get_authorized(
                image,
                &url,
                manifest::ACCEPT,
                &shown,
                manifest::MAX_MANIFEST_SIZE,
            )
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(status, &url, &shown, &body));
        }
        let digest = manifest::sha256_digest(&body);
        let expected = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            headers
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.starts_with("sha256:"))
                .map(|v| v.to_string())
        };
        if let Some(expected) = expected {
            if expected != digest {
                return Err(RegistryError::Digest {
                    what: format!("the manifest of {shown}"),
                    expected,
                    actual: digest,
                });
            }
        }
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let manifest =
            manifest::parse(&body, content_type).map_err(|source| RegistryError::Manifest {
                image: shown.clone(),
                source,
            })?;
        let media_type = match &manifest {
            Manifest::Index { media_type, .. } => media_type.clone(),
            Manifest::Image(m) => m.media_type.clone(),
        };
        Ok(FetchedManifest {
            bytes: body,
            media_type,
            digest,
            manifest,
        })
    }

    /// The `Authorization` value for requests to `image`'s repository, as its registry asked
    /// for it (a fresh token when the cached one nears expiry); `None` when it asked for none.
    pub async fn authorization(&self, image: &Reference) -> Result<Option<String>, RegistryError> {
        let challenge = self
            .challenges
            .lock()
            .expect("challenges lock")
            .get(image.api_host())
            .cloned();
        match challenge {
            None => Ok(None),
            Some(c) => self.answer(image, &c).await.map(Some),
        }
    }

    /// GET with the known authorization; on a 401, learns the challenge and retries once.
    async fn get_authorized(
        &self,
        image: &Reference,
        url: &str,
        accept: &str,
        shown: &str,
        limit: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), RegistryError> {
        let auth = self.authorization(image).await?;
        let first = self.get(url, accept, auth.as_deref(), limit).await?;
        if first.0 != StatusCode::UNAUTHORIZED {
            return Ok(first);
        }
        let challenge = first
            .1
            .get(header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(auth::parse_challenge)
            .transpose()?
            .ok_or_else(|| self.refused(image, shown, 401, &first.2))?;
        if let Challenge::Bearer { .. } = &challenge {
            // A token we sent was refused (expired or revoked): fetch a fresh one.
            self.tokens.forget(&token_key(image, &challenge));
        }
        let known = {
            let mut map = self.challenges.lock().expect("challenges lock");
            map.insert(image.api_host().to_string(), challenge.clone())
        };
        if auth.is_some()
            && known.as_ref() == Some(&challenge)
            && matches!(challenge, Challenge::Basic { .. })
        {
            return Err(self.refused(image, shown, 401, &first.2));
        }
        let auth = self.answer(image, &challenge).await?;
        let second = self.get(url, accept, Some(&auth), limit).await?;
        if second.0 == StatusCode::UNAUTHORIZED || second.0 == StatusCode::FORBIDDEN {
            return Err(self.refused(image, shown, second.0.as_u16(), &second.2));
        }
        Ok(second)
    }

    /// The Authorization value that answers `challenge`.
    async fn answer(
        &self,
        image: &Reference,
        challenge: &Challenge,
    ) -> Result<String, RegistryError> {
        match challenge {
            Challenge::Basic { .. } => match &self.credentials {
                Some(c) => Ok(c.basic()),
                None => Err(RegistryError::AuthRequired {
                    registry: image.registry.clone(),
                    image: image.to_string(),
                    detail: String::new(),
                }),
            },
            Challenge::Bearer { .. } => {
                let key = token_key(image, challenge);
                let token = self
                    .tokens
                    .get_or_fetch(&key, || self.fetch_token(image, &key))
                    .await?;
                Ok(format!("Bearer {token}"))
            }
        }
    }

    async fn fetch_token(
        &self,
        image: &Reference,
        key: &TokenKey,
    ) -> Result<auth::Token, RegistryError> {
        let mut url = key.realm.clone();
        let mut sep = if url.contains('?') { '&' } else { '?' };
        for (k, v) in [("service", &key.service), ("scope", &key.scope)] {
            if let Some(v) = v {
                url.push(sep);
                url.push_str(k);
                url.push('=');
                url.push_str(&percent_encode(v));
                sep = '&';
            }
        }
        let basic = self.credentials.as_ref().map(|c| c.basic());
        let (status, _, body) = self
            .get(
                &url,
                "application/json",
                basic.as_deref(),
                auth::MAX_TOKEN_RESPONSE,
            )
            .await?;
        match status {
            StatusCode::OK => Ok(auth::parse_token_response(&body)?),
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => {
                Err(self.refused(image, &image.to_string(), status.as_u16(), &body))
            }
            _ => Err(status_error(status, &url, &image.to_string(), &body)),
        }
    }

    fn refused(&self, image: &Reference, shown: &str, status: u16, body: &[u8]) -> RegistryError {
        let detail = error_detail(body);
        match &self.credentials {
            Some(c) => RegistryError::Unauthorized {
                registry: image.registry.clone(),
                image: shown.to_string(),
                username: c.username.clone(),
                status,
                detail,
            },
            None => RegistryError::AuthRequired {
                registry: image.registry.clone(),
                image: shown.to_string(),
                detail,
            },
        }
    }

    /// One GET; the body is read whole, up to `limit` bytes.
    async fn get(
        &self,
        url: &str,
        accept: &str,
        authorization: Option<&str>,
        limit: usize,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), RegistryError> {
        let mut req = Request::get(url).header(header::ACCEPT, accept);
        if let Some(a) = authorization {
            req = req.header(header::AUTHORIZATION, a);
        }
        let req = req
            .body(Empty::new())
            .map_err(|e| RegistryError::Invalid(format!("{}: {e}", redacted(url))))?;
        let unreachable = |reason: String| RegistryError::Unreachable {
            url: redacted(url),
            reason,
        };
        let work = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| unreachable(error_chain(&e)))?;
            let (parts, mut body) = resp.into_parts();
            // Error bodies are only read to explain the failure.
            let limit = if parts.status.is_success() {
                limit
            } else {
                MAX_ERROR_BODY
            };
            let mut buf = Vec::new();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| unreachable(format!("body: {}", error_chain(&e))))?;
                if let Ok(data) = frame.into_data() {
                    if buf.len() + data.len() > limit {
                        if !parts.status.is_success() {
                            break;
                        }
                        return Err(RegistryError::Invalid(format!(
                            "{}: response larger than {limit} bytes",
                            redacted(url)
                        )));
                    }
                    buf.extend_from_slice(&data);
                }
            }
            Ok((parts.status, parts.headers, Bytes::from(buf)))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, work)
            .await
            .map_err(|_| unreachable("no complete answer in time".into()))?
    }
}

fn token_key(image: &Reference, challenge: &Challenge) -> TokenKey {
    match challenge {
        Challenge::Bearer { realm, service, .. } => TokenKey {
            realm: realm.clone(),
            service: service.clone(),
            // Always the repository's pull scope: the blobs the mesh fetches need it too.
            scope: Some(image.pull_scope()),
        },
        Challenge::Basic { realm } => TokenKey {
            realm: realm.clone(),
            service: None,
            scope: None,
        },
    }
}

fn status_error(status: StatusCode, url: &str, shown: &str, body: &[u8]) -> RegistryError {
    let detail = error_detail(body);
    if status == StatusCode::NOT_FOUND {
        RegistryError::NotFound {
            image: shown.to_string(),
            detail,
        }
    } else {
        RegistryError::Status {
            status: status.as_u16(),
            url: redacted(url),
            detail,
        }
    }
}

/// `CODE: message` from a distribution error body (`{"errors":[{"code":…,"message":…}]}`).
pub fn error_detail(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Errors {
        errors: Vec<Entry>,
    }
    #[derive(Deserialize)]
    struct Entry {
        code: Option<String>,
        message: Option<String>,
    }
    let Ok(e) = serde_json::from_slice::<Errors>(body) else {
        return String::new();
    };
    let clean = |s: &str| -> String { s.chars().filter(|c| !c.is_control()).take(200).collect() };
    e.errors
        .iter()
        .take(3)
        .map(|x| match (&x.code, &x.message) {
            (Some(c), Some(m)) => format!("{}: {}", clean(c), clean(m)),
            (Some(c), None) => clean(c),
            (None, Some(m)) => clean(m),
            (None, None) => String::new(),
        })
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters pass).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
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
    fn error_bodies() {
        assert_eq!(
            error_detail(br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"x"}}]}"#),
            "MANIFEST_UNKNOWN: manifest unknown"
        );
        assert_eq!(error_detail(b"<html>"), "");
        assert_eq!(
            error_detail(br#"{"errors":[{"code":"A\nB"},{"message":"m"}]}"#),
            "AB; m"
        );
        assert_eq!(
            percent_encode("repository:a/b:pull"),
            "repository%3Aa%2Fb%3Apull"
        );
    }
}
