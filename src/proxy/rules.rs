//! Which CONNECT targets the proxy intercepts, and the parsing of registry request paths and
//! `Range` headers. Pure functions, no IO.
//!
//! Not for: what happens to an intercepted request (see [`super::registry`]).

use d7q_wire::Sha256;

use crate::{config, task};

/// The intercept rules: the daemon's `--registry` patterns (`host`, `host:port`, `*.domain`,
/// `*.domain:port`), already validated by [`crate::config::parse_registry`].
#[derive(Clone, Debug, Default)]
pub struct Rules {
    patterns: Vec<Pattern>,
}

#[derive(Clone, Debug)]
struct Pattern {
    /// Lower-case host, without the `*.` of a wildcard.
    host: String,
    wildcard: bool,
    port: Option<u16>,
}

impl Rules {
    /// Rules from patterns; ones that do not parse are skipped (the config layer refuses them
    /// before they get here).
    pub fn new(patterns: &[String]) -> Self {
        let patterns = patterns
            .iter()
            .filter_map(|p| {
                let p = p.trim().to_ascii_lowercase();
                let (host, port) = match p.rsplit_once(':') {
                    Some((h, port)) => (h.to_string(), Some(config::parse_port(port)?)),
                    None => (p, None),
                };
                let (host, wildcard) = match host.strip_prefix("*.") {
                    Some(h) => (h.to_string(), true),
                    None => (host, false),
                };
                (!host.is_empty()).then_some(Pattern {
                    host,
                    wildcard,
                    port,
                })
            })
            .collect();
        Self { patterns }
    }

    /// Whether a CONNECT to `host:port` is intercepted. A pattern without a port matches any
    /// port; `*.domain` matches every name under the domain, not the domain itself.
    pub fn intercepts(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.patterns.iter().any(|p| {
            if p.port.is_some_and(|want| want != port) {
                return false;
            }
            if p.wildcard {
                host.len() > p.host.len() + 1
                    && host.ends_with(&p.host)
                    && host.as_bytes()[host.len() - p.host.len() - 1] == b'.'
            } else {
                host == p.host
            }
        })
    }
}

/// A blob path: `/v2/<name>/blobs/sha256:<hex>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobPath {
    /// The repository name (may contain slashes).
    pub name: String,
    /// The digest.
    pub digest: Sha256,
}

/// Parses a blob download path; `None` for every other path (uploads under
/// `/v2/<name>/blobs/uploads/` included).
pub fn blob_path(path: &str) -> Option<BlobPath> {
    let rest = path.strip_prefix("/v2/")?;
    let (name, digest) = rest.rsplit_once("/blobs/")?;
    if name.is_empty()
        || name
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return None;
    }
    let hex = digest.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let digest = task::parse_digest(&format!("sha256:{}", hex.to_ascii_lowercase()))?;
    Some(BlobPath {
        name: name.to_string(),
        digest,
    })
}

/// The answer to a `Range` header for content of a known length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable range: the whole content, 200.
    Full,
    /// A satisfiable single range `start..end` (end exclusive), 206.
    Partial(u64, u64),
    /// Not satisfiable, 416.
    Unsatisfiable,
}

/// Interprets a `Range` header value for content of `length` bytes. A single `bytes=` range is
/// honoured; several ranges, other units or malformed values are ignored (the whole content),
/// as RFC 9110 allows.
pub fn range(value: Option<&str>, length: u64) -> RangeAnswer {
    let Some(value) = value else {
        return RangeAnswer::Full;
    };
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| -> Option<u64> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    match (a.trim().is_empty(), b.trim().is_empty()) {
        // bytes=-n: the last n bytes.
        (true, false) => match num(b) {
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if length == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial(length - n.min(length), length),
            None => RangeAnswer::Full,
        },
        // bytes=a-
        (false, true) => match num(a) {
            Some(start) if start >= length => RangeAnswer::Unsatisfiable,
            Some(start) => RangeAnswer::Partial(start, length),
            None => RangeAnswer::Full,
        },
        (false, false) => match (num(a), num(b)) {
            (Some(start), Some(last)) if last < start => RangeAnswer::Full,
            (Some(start), Some(_)) if start >= length => RangeAnswer::Unsatisfiable,
            (Some(start), Some(last)) => {
                RangeAnswer::Partial(start, last.saturating_add(1).min(length))
            }
            _ => RangeAnswer::Full,
        },
        (true, true) => RangeAnswer::Full,
    }
}

/// Splits `host:port` (or `[v6]:port`) of a CONNECT target; the port defaults to 443.
pub fn split_authority(authority: &str) -> Option<(String, u16)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => config::parse_port(p)?,
            None if after.is_empty() => 443,
            None => return None,
        };
        (h.to_string(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), config::parse_port(p)?),
            None => (authority.to_string(), 443),
        }
    };
    if host.is_empty() || port == 0 {
        return None;
    }
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intercept_patterns() {
        let r = Rules::new(&[
            "registry.test".into(),
            "harbor.corp:8443".into(),
            "*.example.com".into(),
        ]);
        assert!(r.intercepts("registry.test", 443));
        assert!(r.intercepts("REGISTRY.test", 5000));
        assert!(r.intercepts("registry.test.", 443));
        assert!(!r.intercepts("registry.testx", 443));
        assert!(!r.intercepts("x.registry.test", 443));
        assert!(r.intercepts("harbor.corp", 8443));
        assert!(!r.intercepts("harbor.corp", 443));
        assert!(r.intercepts("a.example.com", 443));
        assert!(r.intercepts("a.b.example.com", 443));
        assert!(!r.intercepts("example.com", 443));
        assert!(!r.intercepts("badexample.com", 443));
        assert!(!Rules::default().intercepts("registry.test", 443));
    }

    #[test]
    fn blob_paths() {
        let hex = "ab".repeat(32);
        let p = blob_path(&format!("/v2/library/alpine/blobs/sha256:{hex}")).unwrap();
        assert_eq!(p.name, "library/alpine");
        assert_eq!(p.digest, [0xab; 32]);
        let upper = blob_path(&format!("/v2/x/blobs/sha256:{}", hex.to_uppercase())).unwrap();
        assert_eq!(upper.digest, [0xab; 32]);
        for bad in [
            format!("/v2//blobs/sha256:{hex}"),
            format!("/v2/a//b/blobs/sha256:{hex}"),
            format!("/v2/a/../b/blobs/sha256:{hex}"),
            format!("/v2/a/blobs/sha512:{hex}"),
            format!("/v2/a/blobs/sha256:{}", &hex[1..]),
            format!("/v2/a/blobs/sha256:{}zz", &hex[2..]),
            "/v2/a/blobs/uploads/".into(),
            format!("/v2/a/manifests/sha256:{hex}"),
            format!("/v3/a/blobs/sha256:{hex}"),
        ] {
            assert_eq!(blob_path(&bad), None, "{bad}");
        }
    }

    #[test]
    fn ranges() {
        use RangeAnswer::*;
        assert_eq!(range(None, 100), Full);
        assert_eq!(range(Some("bytes=0-9"), 100), Partial(0, 10));
        assert_eq!(range(Some("bytes=90-200"), 100), Partial(90, 100));
        assert_eq!(range(Some("bytes=10-"), 100), Partial(10, 100));
        assert_eq!(range(Some("bytes=-10"), 100), Partial(90, 100));
        assert_eq!(range(Some("bytes=-1000"), 100), Partial(0, 100));
        assert_eq!(range(Some("bytes=99-99"), 100), Partial(99, 100));
        assert_eq!(range(Some("bytes=100-"), 100), Unsatisfiable);
        assert_eq!(range(Some("bytes=100-200"), 100), Unsatisfiable);
        assert_eq!(range(Some("bytes=-0"), 100), Unsatisfiable);
        assert_eq!(range(Some("bytes=0-"), 0), Unsatisfiable);
        assert_eq!(range(Some("bytes=-5"), 0), Unsatisfiable);
        assert_eq!(range(Some("bytes=0-1,5-6"), 100), Full);
        assert_eq!(range(Some("items=0-1"), 100), Full);
        assert_eq!(range(Some("bytes=5-1"), 100), Full);
        assert_eq!(range(Some("bytes=x-1"), 100), Full);
        assert_eq!(range(Some("bytes=+1-2"), 100), Full);
        assert_eq!(range(Some("bytes=-"), 100), Full);
        assert_eq!(
            range(Some("bytes=0-18446744073709551615"), 100),
            Partial(0, 100)
        );
    }

    #[test]
    fn authorities() {
        assert_eq!(
            split_authority("a.test:5000"),
            Some(("a.test".into(), 5000))
        );
        assert_eq!(split_authority("a.test"), Some(("a.test".into(), 443)));
        assert_eq!(split_authority("[::1]:8443"), Some(("::1".into(), 8443)));
        assert_eq!(split_authority("[::1]"), Some(("::1".into(), 443)));
        assert_eq!(split_authority(":443"), None);
        assert_eq!(split_authority("a:0"), None);
        assert_eq!(split_authority("a:x"), None);
        assert_eq!(split_authority("a:+443"), None);
        assert_eq!(split_authority("[::1]:+443"), None);
    }
}
