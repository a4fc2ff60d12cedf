//! Image references as people type them: `alpine`, `library/alpine:3.19`,
//! `registry.test:5000/team/app:v1`, `app@sha256:…` — resolved to a registry host, a repository
//! and a tag or digest, with Docker Hub's defaults (`docker.io`, `library/`, `latest`).
//!
//! Pure parsing; no IO. Not for: anything the registry says (see [`super::client`]).

use std::fmt;

/// The registry name people write for Docker Hub.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that serves Docker Hub's registry API.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The tag used when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";
/// Longest repository name (registry host excluded), as in distribution/reference.
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag.
pub const MAX_TAG_LEN: usize = 128;

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The registry as written (`docker.io` when none was), host and optional port.
    pub registry: String,
    /// The repository within the registry, e.g. `library/alpine`.
    pub repository: String,
    /// The tag, if one was given (or defaulted, when no digest was given).
    pub tag: Option<String>,
    /// The digest, `sha256:HEX`, if one was given.
    pub digest: Option<String>,
}

/// Why a reference was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    /// Empty input.
    #[error("empty image reference")]
    Empty,
    /// A repository path component is not lower-case letters, digits and separators.
    #[error("invalid repository name {0:?} (lower-case letters, digits, '.', '_', '-' and '/')")]
    Name(String),
    /// The repository name is too long.
    #[error("repository name longer than {MAX_NAME_LEN} characters")]
    NameTooLong,
    /// The tag is not `[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`.
    #[error("invalid tag {0:?}")]
    Tag(String),
    /// The digest is not `sha256:<64 hex digits>`.
    #[error("invalid digest {0:?} (expected sha256:<64 hex digits>)")]
    Digest(String),
    /// The registry host is malformed.
    #[error("invalid registry {0:?}")]
    Registry(String),
}

impl Reference {
    /// Parses `input` with Docker's defaults.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        let input = input.trim();
        if input.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => {
                if !is_sha256_digest(d) {
                    return Err(ReferenceError::Digest(d.to_string()));
                }
                (r, Some(d.to_ascii_lowercase()))
            }
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/' (a ':' before it is a port).
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let at = last_slash + i;
                (&rest[..at], Some(rest[at + 1..].to_string()))
            }
            None => (rest, None),
        };
        if let Some(t) = &tag {
            if !is_tag(t) {
                return Err(ReferenceError::Tag(t.clone()));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if looks_like_host(first) => (first.to_string(), path.to_string()),
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        if !is_registry(&registry) {
            return Err(ReferenceError::Registry(registry));
        }
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        if repository.len() > MAX_NAME_LEN {
            return Err(ReferenceError::NameTooLong);
        }
        if !repository.split('/').all(is_path_component) {
            return Err(ReferenceError::Name(repository));
        }
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            (t, _) => t,
        };
        Ok(Self {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The host (and port) that serves the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// `https://HOST`, the base of every API URL.
    pub fn base_url(&self) -> String {
        format!("https://{}", self.api_host())
    }

    /// What to ask the manifests endpoint for: the digest when given, else the tag.
    pub fn manifest_reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or(DEFAULT_TAG)
    }

    /// The manifest URL for `reference` (a tag or a digest) in this repository.
    pub fn manifest_url(&self, reference: &str) -> String {
        format!(
            "{}/v2/{}/manifests/{reference}",
            self.base_url(),
            self.repository
        )
    }

    /// The blob URL for `digest` in this repository.
    pub fn blob_url(&self, digest: &str) -> String {
        format!("{}/v2/{}/blobs/{digest}", self.base_url(), self.repository)
    }

    /// The token scope for pulling from this repository.
    pub fn pull_scope(&self) -> String {
        format!("repository:{}:pull", self.repository)
    }

    /// The name without tag or digest, as `docker images` shows it (`alpine`,
    /// `registry.test:5000/app`).
    pub fn familiar_name(&self) -> String {
        if self.registry == DOCKER_HUB {
            match self.repository.strip_prefix("library/") {
                Some(short) => short.to_string(),
                None => self.repository.clone(),
            }
        } else {
            format!("{}/{}", self.registry, self.repository)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Whether `s` is `sha256:` and 64 hex digits.
pub fn is_sha256_digest(s: &str) -> bool {
    match s.strip_prefix("sha256:") {
        Some(hex) => hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()),
        None => false,
    }
}

/// Docker's rule: the first component is a registry when it has a '.' or ':' or is `localhost`.
fn looks_like_host(first: &str) -> bool {
    first.contains('.') || first.contains(':') || first == "localhost"
}

fn is_registry(s: &str) -> bool {
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || s.starts_with('[') => (h, Some(p)),
        _ => (s, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'[' | b']' | b':'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    host_ok && port_ok
}

/// `[a-z0-9]+` joined by `.`, `_`, `__` or runs of `-`.
fn is_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return false;
    }
    let mut prev_sep = false;
    let mut underscores = 0;
    for &ch in b {
        if ch.is_ascii_lowercase() || ch.is_ascii_digit() {
            prev_sep = false;
            underscores = 0;
        } else if ch == b'-' {
            prev_sep = true;
        } else if ch == b'.' || ch == b'_' {
            if prev_sep && !(ch == b'_' && underscores == 1) {
                return false;
            }
            underscores = if ch == b'_' { underscores + 1 } else { 0 };
            prev_sep = true;
        } else {
            return false;
        }
    }
    true
}

fn is_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_TAG_LEN
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Reference {
        Reference::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = p("alpine");
        assert_eq!(r.registry, "docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.digest, None);
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(
            r.manifest_url("latest"),
            "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
        );
        assert_eq!(r.familiar_name(), "alpine");
        assert_eq!(r.to_string(), "docker.io/library/alpine:latest");
        let r = p("bitnami/redis:7.2");
        assert_eq!(r.repository, "bitnami/redis");
        assert_eq!(r.tag.as_deref(), Some("7.2"));
        assert_eq!(p("docker.io/alpine").repository, "library/alpine");
        assert_eq!(p("index.docker.io/library/alpine").registry, "docker.io");
    }

    #[test]
    fn hosts_ports_tags_and_digests() {
        let r = p("registry.test:5000/team/app:v1.2");
        assert_eq!(r.registry, "registry.test:5000");
        assert_eq!(r.repository, "team/app");
        assert_eq!(r.tag.as_deref(), Some("v1.2"));
        assert_eq!(
            r.blob_url("sha256:ab"),
            "https://registry.test:5000/v2/team/app/blobs/sha256:ab"
        );
        assert_eq!(r.pull_scope(), "repository:team/app:pull");
        // A port without a tag.
        let r = p("registry.test:5000/app");
        assert_eq!(r.repository, "app");
        assert_eq!(r.tag.as_deref(), Some("latest"));
        let r = p("localhost/app");
        assert_eq!(r.registry, "localhost");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = p(&format!("registry.test/app@{d}"));
        assert_eq!(r.tag, None);
        assert_eq!(r.digest.as_deref(), Some(d.as_str()));
        assert_eq!(r.manifest_reference(), d);
        let r = p(&format!("app:v1@{d}"));
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert_eq!(r.manifest_reference(), d);
        assert_eq!(r.to_string(), format!("docker.io/library/app:v1@{d}"));
    }

    #[test]
    fn refusals() {
        assert_eq!(Reference::parse(""), Err(ReferenceError::Empty));
        assert!(matches!(
            Reference::parse("Alpine"),
            Err(ReferenceError::Name(_))
        ));
        assert!(matches!(
            Reference::parse("alpine:bad tag"),
            Err(ReferenceError::Tag(_))
        ));
        assert!(matches!(
            Reference::parse("alpine:"),
            Err(ReferenceError::Tag(_))
        ));
        assert!(matches!(
            Reference::parse("alpine@sha256:abc"),
            Err(ReferenceError::Digest(_))
        ));
        assert!(matches!(
            Reference::parse("registry.test:99999/app"),
            Err(ReferenceError::Registry(_))
        ));
        assert!(matches!(
            Reference::parse("a//b"),
            Err(ReferenceError::Name(_))
        ));
        assert!(matches!(
            Reference::parse("a/-b"),
            Err(ReferenceError::Name(_))
        ));
        assert!(Reference::parse(&"a".repeat(300)).is_err());
        assert!(Reference::parse("a__b/c.d-e").is_ok());
    }
}
