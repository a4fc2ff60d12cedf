//! Image manifests as registries serve them: OCI image indexes and Docker manifest lists (one
//! entry per platform), OCI image manifests and Docker v2 schema 2 manifests (a config and
//! layers). Parsing is bounded (size, JSON depth, entry counts) because the bytes come from the
//! network, and platform selection is a pure function.
//!
//! Not for: fetching (see [`super::client`]) or writing images to disk (see [`super::layout`]).

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::reference::is_sha256_digest;

/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// OCI image manifest.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Docker v2 schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker v2 schema 1 manifests, which are refused.
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
/// Signed Docker v2 schema 1 manifests, which are refused.
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
/// The `Accept` header for manifest requests: every kind this module reads.
pub const ACCEPT: &str = "application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json, application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// Largest manifest or index accepted.
pub const MAX_MANIFEST_SIZE: usize = 4 << 20;
/// Deepest JSON nesting accepted in a manifest.
pub const MAX_JSON_DEPTH: usize = 32;
/// Most layers in one image manifest.
pub const MAX_LAYERS: usize = 1024;
/// Most entries in one index.
pub const MAX_INDEX_ENTRIES: usize = 4096;

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Larger than [`MAX_MANIFEST_SIZE`].
    #[error("manifest larger than {MAX_MANIFEST_SIZE} bytes")]
    TooLarge,
    /// Nested deeper than [`MAX_JSON_DEPTH`].
    #[error("manifest JSON nested deeper than {MAX_JSON_DEPTH}")]
    TooDeep,
    /// Not valid JSON of the expected shape.
    #[error("malformed manifest: {0}")]
    Malformed(String),
    /// A media type this client does not read.
    #[error("unsupported manifest type {0:?}")]
    Unsupported(String),
    /// A descriptor's digest is not `sha256:<64 hex digits>`.
    #[error("descriptor with unsupported digest {0:?} (only sha256 is supported)")]
    Digest(String),
    /// Too many layers or entries.
    #[error("manifest lists {0} entries, more than the limit of {1}")]
    TooMany(usize, usize),
    /// No entry of an index matches the platform.
    #[error("no image for platform {wanted} (available: {available})")]
    NoPlatform {
        /// The platform asked for.
        wanted: Platform,
        /// The platforms the index offers, comma-separated.
        available: String,
    },
}

/// A platform, `os/architecture[/variant]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// CPU architecture in Go's terms, e.g. `amd64`, `arm64`.
    pub architecture: String,
    /// CPU variant, e.g. `v8` or `v7`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch[/variant]`, normalising architecture aliases (`x86_64` → `amd64`,
    /// `aarch64` → `arm64`).
    pub fn parse(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        };
        if !(2..=3).contains(&parts.len()) || !parts.iter().all(|p| ok(p)) {
            return Err(format!("{s:?} is not OS/ARCH[/VARIANT], e.g. linux/amd64"));
        }
        Ok(Self {
            os: parts[0].to_ascii_lowercase(),
            architecture: normalize_arch(&parts[1].to_ascii_lowercase()),
            variant: parts.get(2).map(|v| v.to_ascii_lowercase()),
        })
    }

    /// The platform of this machine (`linux/amd64` on x86-64).
    pub fn host() -> Self {
        Self {
            os: "linux".into(),
            architecture: normalize_arch(std::env::consts::ARCH),
            variant: None,
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

fn normalize_arch(a: &str) -> String {
    match a {
        "x86_64" | "x86-64" => "amd64",
        "aarch64" => "arm64",
        "i386" | "i686" | "x86" => "386",
        other => other,
    }
    .to_string()
}

/// A content descriptor: what a manifest says about a blob or another manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    /// Media type of the content.
    pub media_type: String,
    /// `sha256:HEX`.
    pub digest: String,
    /// Length in bytes.
    pub size: u64,
    /// For index entries: the platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// Annotations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<std::collections::BTreeMap<String, String>>,
}

/// An image manifest: a config and layers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageManifest {
    /// The manifest's media type.
    pub media_type: String,
    /// The config blob.
    pub config: Descriptor,
    /// The layer blobs, bottom first.
    pub layers: Vec<Descriptor>,
}

/// What a manifest request returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Manifest {
    /// An index or manifest list: one manifest per platform.
    Index {
        /// Its media type.
        media_type: String,
        /// The entries.
        manifests: Vec<Descriptor>,
    },
    /// An image manifest.
    Image(ImageManifest),
}

/// `sha256:HEX` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Parses manifest bytes. The media type comes from the JSON's `mediaType` when present, else
/// from the response's `Content-Type` (`content_type`), else from the shape of the document.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<Manifest, ManifestError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Raw {
        schema_version: Option<u32>,
        media_type: Option<String>,
        config: Option<Descriptor>,
        layers: Option<Vec<Descriptor>>,
        manifests: Option<Vec<Descriptor>>,
    }
    if bytes.len() > MAX_MANIFEST_SIZE {
        return Err(ManifestError::TooLarge);
    }
    if !depth_within(bytes, MAX_JSON_DEPTH) {
        return Err(ManifestError::TooDeep);
    }
    let raw: Raw =
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
    let header_type = content_type
        .map(|c| c.split(';').next().unwrap_or(c).trim().to_string())
        .filter(|c| c.starts_with("application/vnd."));
    let media_type = raw.media_type.clone().or(header_type).unwrap_or_else(|| {
        if raw.manifests.is_some() {
            OCI_INDEX.to_string()
        } else {
            OCI_MANIFEST.to_string()
        }
    });
    if raw.schema_version == Some(1)
        || media_type == DOCKER_SCHEMA1
        || media_type == DOCKER_SCHEMA1_SIGNED
    {
        return Err(ManifestError::Unsupported(
            "Docker v2 schema 1 (deprecated; push the image again with a current client)".into(),
        ));
    }
    match media_type.as_str() {
        OCI_INDEX | DOCKER_LIST => {
            let manifests = raw
                .manifests
                .ok_or_else(|| ManifestError::Malformed("index without manifests".into()))?;
            if manifests.len() > MAX_INDEX_ENTRIES {
                return Err(ManifestError::TooMany(manifests.len(), MAX_INDEX_ENTRIES));
            }
            for d in &manifests {
                check_digest(d)?;
            }
            Ok(Manifest::Index {
                media_type,
                manifests,
            })
        }
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| ManifestError::Malformed("manifest without config".into()))?;
            let layers = raw.layers.unwrap_or_default();
            if layers.len() > MAX_LAYERS {
                return Err(ManifestError::TooMany(layers.len(), MAX_LAYERS));
            }
            check_digest(&config)?;
            for d in &layers {
                check_digest(d)?;
            }
            Ok(Manifest::Image(ImageManifest {
                media_type,
                config,
                layers,
            }))
        }
        other => Err(ManifestError::Unsupported(other.to_string())),
    }
}

fn check_digest(d: &Descriptor) -> Result<(), ManifestError> {
    if is_sha256_digest(&d.digest) && d.digest[7..].bytes().all(|b| !b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(ManifestError::Digest(d.digest.clone()))
    }
}

/// The OCI form of a Docker v2 schema 2 manifest, as `skopeo copy` writes into an OCI layout
/// (whose readers take OCI types only): the same config and layer blobs, OCI media types.
/// The bytes differ from the registry's, so the digest does too.
pub fn to_oci(m: &ImageManifest) -> Vec<u8> {
    let convert = |d: &Descriptor| {
        let media_type = match d.media_type.as_str() {
            "application/vnd.docker.container.image.v1+json" => {
                "application/vnd.oci.image.config.v1+json"
            }
            "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
                "application/vnd.oci.image.layer.v1.tar+gzip"
            }
            "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
                "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
            }
            "application/vnd.docker.image.rootfs.diff.tar" => {
                "application/vnd.oci.image.layer.v1.tar"
            }
            other => other,
        };
        Descriptor {
            media_type: media_type.to_string(),
            platform: None,
            ..d.clone()
        }
    };
    let doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": convert(&m.config),
        "layers": m.layers.iter().map(convert).collect::<Vec<_>>(),
    });
    doc.to_string().into_bytes()
}

/// The platform an image config (`{"os":…,"architecture":…,"variant":…}`) declares.
pub fn config_platform(config: &[u8]) -> Option<Platform> {
    #[derive(Deserialize)]
    struct Raw {
        os: Option<String>,
        architecture: Option<String>,
        variant: Option<String>,
    }
    if config.len() > MAX_MANIFEST_SIZE || !depth_within(config, MAX_JSON_DEPTH) {
        return None;
    }
    let raw: Raw = serde_json::from_slice(config).ok()?;
    Some(Platform {
        os: raw.os?,
        architecture: normalize_arch(&raw.architecture?),
        variant: raw.variant.filter(|v| !v.is_empty()),
    })
}

/// Whether an image of platform `have` satisfies a request for `wanted`.
pub fn platform_matches(have: &Platform, wanted: &Platform) -> bool {
    have.os == wanted.os
        && normalize_arch(&have.architecture) == wanted.architecture
        && match &wanted.variant {
            Some(v) => have.variant.as_deref() == Some(v.as_str()),
            None => true,
        }
}

/// The index entry for `wanted`: OS and architecture must match, and the variant when one is
/// asked for. Without a variant, an entry without one (or `v8` on arm64) is preferred.
/// Attestation entries (`unknown/unknown`) are never chosen.
pub fn select_platform<'m>(
    manifests: &'m [Descriptor],
    wanted: &Platform,
) -> Result<&'m Descriptor, ManifestError> {
    let candidates: Vec<&Descriptor> = manifests
        .iter()
        .filter(|d| {
            d.platform
                .as_ref()
                .is_some_and(|p| platform_matches(p, wanted))
        })
        .collect();
    let preferred = candidates
        .iter()
        .find(|d| {
            let v = d.platform.as_ref().and_then(|p| p.variant.as_deref());
            v.is_none() || (wanted.architecture == "arm64" && v == Some("v8"))
        })
        .or(candidates.first());
    match preferred {
        Some(d) => Ok(d),
        None => {
            let mut available: Vec<String> = manifests
                .iter()
                .filter_map(|d| d.platform.as_ref())
                .filter(|p| p.os != "unknown")
                .map(|p| p.to_string())
                .collect();
            available.dedup();
            Err(ManifestError::NoPlatform {
                wanted: wanted.clone(),
                available: if available.is_empty() {
                    "none".into()
                } else {
                    available.join(", ")
                },
            })
        }
    }
}

/// Whether the JSON in `bytes` nests at most `max` arrays/objects deep (strings skipped).
fn depth_within(bytes: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in bytes {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return false;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(n: u8) -> String {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
    }

    fn entry(platform: &str, n: u8) -> String {
        let p = Platform::parse(platform).unwrap();
        let variant = p
            .variant
            .map(|v| format!(r#","variant":"{v}""#))
            .unwrap_or_default();
        format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","digest":"{}","size":500,"platform":{{"os":"{}","architecture":"{}"{variant}}}}}"#,
            d(n),
            p.os,
            p.architecture
        )
    }

    fn index(entries: &[String]) -> Vec<Descriptor> {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{}]}}"#,
            entries.join(",")
        );
        match parse(json.as_bytes(), None).unwrap() {
            Manifest::Index { manifests, .. } => manifests,
            m => panic!("{m:?}"),
        }
    }

    #[test]
    fn platforms_parse() {
        assert_eq!(
            Platform::parse("linux/amd64").unwrap().to_string(),
            "linux/amd64"
        );
        assert_eq!(
            Platform::parse("linux/aarch64/v8").unwrap().to_string(),
            "linux/arm64/v8"
        );
        assert_eq!(
            Platform::parse("linux/x86_64").unwrap().architecture,
            "amd64"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//v7").is_err());
        assert!(Platform::parse("a/b/c/d").is_err());
        assert_eq!(Platform::host().os, "linux");
    }

    #[test]
    fn platform_selection() {
        let m = index(&[
            entry("linux/amd64", 1),
            entry("linux/arm/v7", 2),
            entry("linux/arm/v6", 3),
            entry("linux/arm64/v8", 4),
            entry("unknown/unknown", 5),
        ]);
        let pick =
            |p: &str| select_platform(&m, &Platform::parse(p).unwrap()).map(|d| d.digest.clone());
        assert_eq!(pick("linux/amd64"), Ok(d(1)));
        assert_eq!(pick("linux/arm/v6"), Ok(d(3)));
        assert_eq!(pick("linux/arm64"), Ok(d(4)));
        assert_eq!(pick("linux/arm"), Ok(d(2)));
        let e = pick("linux/s390x").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no image for platform linux/s390x (available: linux/amd64, linux/arm/v7, linux/arm/v6, linux/arm64/v8)"
        );
        assert!(pick("windows/amd64").is_err());
        assert!(pick("linux/arm/v5").is_err());
        let arm = config_platform(
            br#"{"os":"linux","architecture":"aarch64","variant":"v8","rootfs":{}}"#,
        )
        .unwrap();
        assert_eq!(arm.to_string(), "linux/arm64/v8");
        assert!(platform_matches(
            &arm,
            &Platform::parse("linux/arm64").unwrap()
        ));
        assert!(!platform_matches(
            &arm,
            &Platform::parse("linux/amd64").unwrap()
        ));
        assert_eq!(config_platform(b"{}"), None);
    }

    #[test]
    fn image_manifests() {
        let json = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}",
                "config":{{"mediaType":"application/vnd.docker.container.image.v1+json","digest":"{}","size":10}},
                "layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","digest":"{}","size":20}}]}}"#,
            d(1),
            d(2)
        );
        let Manifest::Image(m) = parse(json.as_bytes(), None).unwrap() else {
            panic!()
        };
        assert_eq!(m.media_type, DOCKER_MANIFEST);
        assert_eq!(m.config.digest, d(1));
        assert_eq!(m.layers.len(), 1);
        assert_eq!(m.layers[0].size, 20);
        let oci = to_oci(&m);
        let Manifest::Image(o) = parse(&oci, None).unwrap() else {
            panic!()
        };
        assert_eq!(o.media_type, OCI_MANIFEST);
        assert_eq!(
            o.config.media_type,
            "application/vnd.oci.image.config.v1+json"
        );
        assert_eq!(o.config.digest, d(1));
        assert_eq!(
            o.layers[0].media_type,
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
        assert_eq!(
            (o.layers[0].digest.as_str(), o.layers[0].size),
            (d(2).as_str(), 20)
        );
        // No mediaType in the body: the Content-Type decides.
        let json = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{}","size":1}},"layers":[]}}"#,
            d(1)
        );
        let Manifest::Image(m) = parse(
            json.as_bytes(),
            Some(&format!("{OCI_MANIFEST}; charset=utf-8")),
        )
        .unwrap() else {
            panic!()
        };
        assert_eq!(m.media_type, OCI_MANIFEST);
    }

    #[test]
    fn refusals() {
        assert!(matches!(
            parse(br#"{"schemaVersion":1,"fsLayers":[]}"#, None),
            Err(ManifestError::Unsupported(_))
        ));
        assert!(matches!(
            parse(br#"{"mediaType":"text/plain"}"#, None),
            Err(ManifestError::Unsupported(_))
        ));
        let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
        assert_eq!(parse(deep.as_bytes(), None), Err(ManifestError::TooDeep));
        // Brackets inside strings do not count.
        assert!(depth_within(
            format!("{{\"a\":\"{}\"}}", "[".repeat(100)).as_bytes(),
            2
        ));
        assert_eq!(
            parse(&vec![b' '; MAX_MANIFEST_SIZE + 1], None),
            Err(ManifestError::TooLarge)
        );
        let bad = format!(
            r#"{{"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"sha512:ab","size":1}}}}"#
        );
        assert!(matches!(
            parse(bad.as_bytes(), None),
            Err(ManifestError::Digest(_))
        ));
        assert!(matches!(
            parse(b"{", None),
            Err(ManifestError::Malformed(_))
        ));
        assert_eq!(
            sha256_digest(b""),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
