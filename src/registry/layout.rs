//! Writing a pulled image to disk: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/…`) as skopeo, umoci and containerd read it, or a docker-archive (a tar with
//! `manifest.json`, the config and the layers) as `docker load` reads it.
//!
//! The caller stages blobs in a directory of its own; these functions add the small files and
//! build archives into temporary names renamed into place, so an output is whole or absent.
//! Not for: fetching (the mesh) or deciding what to pull (the manifest module).

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::json;

use super::manifest::Descriptor;

/// The annotation naming a manifest's tag in an OCI layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// The OCI layout version written.
pub const OCI_LAYOUT_VERSION: &str = "1.0.0";
/// Tar block size.
const BLOCK: usize = 512;
/// Largest size a ustar octal size field holds; larger entries use base-256.
const MAX_OCTAL_SIZE: u64 = 0o77777777777;

/// Why an image could not be written.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// A filesystem operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A tar entry name does not fit the format.
    #[error("tar entry name too long: {0}")]
    Name(String),
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> LayoutError + '_ {
    move |source| LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where blob `digest` (`sha256:HEX`) lives under a layout (or staging) directory.
pub fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    let (algo, hex) = digest.split_once(':').unwrap_or(("sha256", digest));
    dir.join("blobs").join(algo).join(hex)
}

/// Writes `bytes` as blob `digest` under `dir`, fsynced.
pub fn write_blob(dir: &Path, digest: &str, bytes: &[u8]) -> Result<(), LayoutError> {
    let path = blob_path(dir, digest);
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_at(parent))?;
    }
    write_synced(&path, bytes)
}

/// Completes an OCI image layout in `dir` (whose blobs are in place): `oci-layout` and an
/// `index.json` listing `manifest`, annotated with `tag` when there is one.
pub fn finish_oci_layout(
    dir: &Path,
    manifest: &Descriptor,
    tag: Option<&str>,
) -> Result<(), LayoutError> {
    let mut desc = manifest.clone();
    desc.platform = None;
    if let Some(t) = tag {
        desc.annotations
            .get_or_insert_with(Default::default)
            .insert(REF_NAME_ANNOTATION.to_string(), t.to_string());
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": super::manifest::OCI_INDEX,
        "manifests": [desc],
    });
    write_synced(
        &dir.join("oci-layout"),
        json!({ "imageLayoutVersion": OCI_LAYOUT_VERSION })
            .to_string()
            .as_bytes(),
    )?;
    write_synced(&dir.join("index.json"), index.to_string().as_bytes())
}

/// Writes a docker-archive at `out` from blobs staged under `blobs`: `manifest.json`, the
/// config as `HEX.json` and each layer as `HEX.tar` (compressed as served; `docker load`
/// decompresses). Built in a temporary file next to `out`, fsynced, then renamed.
pub fn write_docker_archive(
    out: &Path,
    blobs: &Path,
    config: &Descriptor,
    layers: &[Descriptor],
    repo_tags: &[String],
) -> Result<(), LayoutError> {
    let hex = |d: &Descriptor| {
        d.digest
            .split_once(':')
            .map(|(_, h)| h.to_string())
            .unwrap_or_default()
    };
    let config_name = format!("{}.json", hex(config));
    let mut layer_names: Vec<String> = Vec::new();
    for l in layers {
        let name = format!("{}.tar", hex(l));
        // A layer listed twice is stored once (tar readers keep the last entry anyway).
        if !layer_names.contains(&name) {
            layer_names.push(name.clone());
        }
    }
    let all_layers: Vec<String> = layers.iter().map(|l| format!("{}.tar", hex(l))).collect();
    let manifest = json!([{
        "Config": config_name,
        "RepoTags": repo_tags,
        "Layers": all_layers,
    }]);
    let tmp = temp_sibling(out);
    let result = (|| {
        let file = File::create(&tmp).map_err(io_at(&tmp))?;
        let mut tar = TarWriter::new(BufWriter::with_capacity(1 << 20, file));
        let manifest = manifest.to_string();
        tar.append_bytes("manifest.json", manifest.as_bytes())
            .map_err(io_at(&tmp))?;
        tar.append_file(&config_name, &blob_path(blobs, &config.digest))?;
        let mut written = Vec::new();
        for l in layers {
            let name = format!("{}.tar", hex(l));
            if written.contains(&name) {
                continue;
            }
            tar.append_file(&name, &blob_path(blobs, &l.digest))?;
            written.push(name);
        }
        let file = tar
            .finish()
            .map_err(io_at(&tmp))?
            .into_inner()
            .map_err(|e| LayoutError::Io {
                path: tmp.clone(),
                source: e.into_error(),
            })?;
        file.sync_all().map_err(io_at(&tmp))?;
        std::fs::rename(&tmp, out).map_err(io_at(out))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A hidden temporary name next to `path`.
pub fn temp_sibling(path: &Path) -> PathBuf {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.join(format!(".{name}.d7q-{:016x}.part", rand::random::<u64>()))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let mut f = File::create(path).map_err(io_at(path))?;
    f.write_all(bytes).map_err(io_at(path))?;
    f.sync_all().map_err(io_at(path))
}

/// A minimal ustar writer: regular files only, fixed mode and owner, mtime 0 — deterministic.
pub struct TarWriter<W: Write> {
    out: W,
}

impl<W: Write> TarWriter<W> {
    /// Writes to `out`.
    pub fn new(out: W) -> Self {
        Self { out }
    }

    /// Appends an entry with `bytes` as its content.
    pub fn append_bytes(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let header = header(name, bytes.len() as u64)?;
        self.out.write_all(&header)?;
        self.out.write_all(bytes)?;
        self.pad(bytes.len() as u64)
    }

    /// Appends the file at `path` under `name`.
    pub fn append_file(&mut self, name: &str, path: &Path) -> Result<(), LayoutError> {
        let mut f = File::open(path).map_err(io_at(path))?;
        let len = f.metadata().map_err(io_at(path))?.len();
        let h = header(name, len).map_err(|_| LayoutError::Name(name.to_string()))?;
        self.out.write_all(&h).map_err(io_at(path))?;
        let copied = io::copy(&mut (&mut f).take(len), &mut self.out).map_err(io_at(path))?;
        if copied != len {
            return Err(LayoutError::Io {
                path: path.to_path_buf(),
                source: io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while archived"),
            });
        }
        self.pad(len).map_err(io_at(path))
    }

    /// Writes the end-of-archive marker and returns the writer.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.write_all(&[0u8; BLOCK * 2])?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % BLOCK as u64) as usize;
        if rem != 0 {
            self.out.write_all(&vec![0u8; BLOCK - rem])?;
        }
        Ok(())
    }
}

fn header(name: &str, size: u64) -> io::Result<[u8; BLOCK]> {
    let mut h = [0u8; BLOCK];
    if name.len() > 100 || name.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "name too long"));
    }
    h[..name.len()].copy_from_slice(name.as_bytes());
    octal(&mut h[100..108], 0o644);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    if size <= MAX_OCTAL_SIZE {
        octal(&mut h[124..136], size);
    } else {
        // GNU base-256: high bit set, big-endian value.
        h[124] = 0x80;
        h[128..136].copy_from_slice(&size.to_be_bytes());
    }
    octal(&mut h[136..148], 0);
    h[156] = b'0';
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Zero-padded octal with a trailing NUL, filling `field`.
fn octal(field: &mut [u8], v: u64) {
    let s = format!("{v:0width$o}\0", width = field.len() - 1);
    field.copy_from_slice(s.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::manifest::sha256_digest;

    fn desc(media: &str, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: media.into(),
            digest: sha256_digest(bytes),
            size: bytes.len() as u64,
            platform: None,
            annotations: None,
        }
    }

    /// Reads back (name, content) pairs, checking every header checksum.
    fn untar(bytes: &[u8]) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let h = &bytes[at..at + BLOCK];
            if h.iter().all(|&b| b == 0) {
                assert!(bytes[at + BLOCK..at + 2 * BLOCK].iter().all(|&b| b == 0));
                return out;
            }
            let mut copy = h.to_vec();
            copy[148..156].copy_from_slice(b"        ");
            let sum: u32 = copy.iter().map(|&b| b as u32).sum();
            let field = std::str::from_utf8(&h[148..154]).unwrap();
            assert_eq!(u32::from_str_radix(field, 8).unwrap(), sum);
            let name =
                String::from_utf8(h[..100].split(|&b| b == 0).next().unwrap().to_vec()).unwrap();
            let size = u64::from_str_radix(std::str::from_utf8(&h[124..135]).unwrap(), 8).unwrap()
                as usize;
            at += BLOCK;
            out.push((name, bytes[at..at + size].to_vec()));
            at += size.div_ceil(BLOCK) * BLOCK;
        }
    }

    #[test]
    fn tar_headers_are_ustar() {
        let h = header("manifest.json", 1234).unwrap();
        assert_eq!(&h[257..263], b"ustar\0");
        assert_eq!(&h[124..136], b"00000002322\0");
        let big = header("x", 1 << 40).unwrap();
        assert_eq!(big[124], 0x80);
        assert_eq!(&big[128..136], &(1u64 << 40).to_be_bytes());
        assert!(header(&"n".repeat(101), 1).is_err());
    }

    #[test]
    fn oci_layout_files() {
        let dir = tempfile::tempdir().unwrap();
        let m = desc(crate::registry::manifest::OCI_MANIFEST, b"{}");
        write_blob(dir.path(), &m.digest, b"{}").unwrap();
        finish_oci_layout(dir.path(), &m, Some("v1")).unwrap();
        let layout: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("oci-layout")).unwrap()).unwrap();
        assert_eq!(layout["imageLayoutVersion"], "1.0.0");
        let index: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("index.json")).unwrap()).unwrap();
        assert_eq!(index["schemaVersion"], 2);
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], m.digest.as_str());
        assert_eq!(entry["size"], 2);
        assert_eq!(entry["mediaType"], crate::registry::manifest::OCI_MANIFEST);
        assert_eq!(entry["annotations"][REF_NAME_ANNOTATION], "v1");
        let hex = &m.digest[7..];
        assert_eq!(
            std::fs::read(dir.path().join("blobs/sha256").join(hex)).unwrap(),
            b"{}"
        );
    }

    #[test]
    fn docker_archive_contents() {
        let dir = tempfile::tempdir().unwrap();
        let config = desc("c", br#"{"rootfs":{}}"#);
        let l1 = desc("l", &vec![7u8; 1000]);
        let l2 = desc("l", b"");
        write_blob(dir.path(), &config.digest, br#"{"rootfs":{}}"#).unwrap();
        write_blob(dir.path(), &l1.digest, &vec![7u8; 1000]).unwrap();
        write_blob(dir.path(), &l2.digest, b"").unwrap();
        let out = dir.path().join("image.tar");
        let tags = vec!["registry.test:5000/app:v1".to_string()];
        write_docker_archive(
            &out,
            dir.path(),
            &config,
            &[l1.clone(), l2.clone(), l1.clone()],
            &tags,
        )
        .unwrap();
        let entries = untar(&std::fs::read(&out).unwrap());
        let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
        let (h1, h2, hc) = (&l1.digest[7..], &l2.digest[7..], &config.digest[7..]);
        assert_eq!(
            names,
            [
                "manifest.json".to_string(),
                format!("{hc}.json"),
                format!("{h1}.tar"),
                format!("{h2}.tar")
            ]
        );
        let m: serde_json::Value = serde_json::from_slice(&entries[0].1).unwrap();
        assert_eq!(m[0]["Config"], format!("{hc}.json"));
        assert_eq!(m[0]["RepoTags"][0], "registry.test:5000/app:v1");
        assert_eq!(m[0]["Layers"].as_array().unwrap().len(), 3);
        assert_eq!(entries[2].1, vec![7u8; 1000]);
        // No temporary file left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".part"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
        // A missing blob fails and leaves no archive.
        let out2 = dir.path().join("broken.tar");
        let missing = desc("l", b"missing");
        assert!(write_docker_archive(&out2, dir.path(), &config, &[missing], &tags).is_err());
        assert!(!out2.exists());
    }
}
