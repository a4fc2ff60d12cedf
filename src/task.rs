//! What a task is: its id (from the content digest when known, else from the normalized URL and
//! range), its piece geometry, and the `sha256:HEX` digest notation.
//!
//! Pure functions; no IO.

use d7q_wire::{ByteRange, Sha256, TaskId, MAX_PIECE_COUNT};
use xxhash_rust::xxh3::xxh3_128;

/// Smallest piece size.
pub const MIN_PIECE_SIZE: u32 = 1 << 20;
/// Largest piece size the geometry picks.
pub const MAX_PIECE_SIZE: u32 = 64 << 20;
/// Piece count the geometry aims to stay under by growing the piece size.
pub const TARGET_PIECE_COUNT: u64 = 1024;
/// The largest content the mesh accepts: [`MAX_PIECE_COUNT`] pieces of the largest size.
pub const MAX_CONTENT_LENGTH: u64 = MAX_PIECE_COUNT as u64 * MAX_PIECE_SIZE as u64;

/// The id of a task: the digest decides when known, so the same blob from any registry or URL is
/// one task; otherwise the URL (without its fragment) and the range.
pub fn task_id(url: &str, digest: Option<&Sha256>, range: Option<ByteRange>) -> TaskId {
    let mut key = Vec::with_capacity(128);
    match digest {
        Some(d) => {
            key.extend_from_slice(b"sha256:");
            key.extend_from_slice(d);
        }
        None => {
            key.extend_from_slice(b"url:");
            key.extend_from_slice(normalize_url(url).as_bytes());
        }
    }
    if let Some(r) = range {
        key.extend_from_slice(format!("#range={}-{}", r.start, r.end).as_bytes());
    }
    TaskId(xxh3_128(&key).to_be_bytes())
}

/// The URL as it identifies content: without fragment, scheme and host lower-cased.
pub fn normalize_url(url: &str) -> String {
    let url = url.split('#').next().unwrap_or(url);
    match url.find("://") {
        Some(i) => {
            let rest = &url[i + 3..];
            let host_end = rest.find('/').unwrap_or(rest.len());
            format!(
                "{}://{}{}",
                url[..i].to_ascii_lowercase(),
                rest[..host_end].to_ascii_lowercase(),
                &rest[host_end..]
            )
        }
        None => url.to_string(),
    }
}

/// Piece geometry of a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Content length.
    pub length: u64,
    /// Piece size.
    pub piece_size: u32,
    /// Number of pieces.
    pub piece_count: u32,
}

/// Why a geometry was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GeometryError {
    /// Too large for the mesh.
    #[error("content of {0} bytes exceeds the limit of {MAX_CONTENT_LENGTH}")]
    TooLarge(u64),
    /// Inconsistent numbers from a peer.
    #[error("inconsistent geometry: {0} bytes, piece size {1}, {2} pieces")]
    Inconsistent(u64, u32, u32),
}

impl Geometry {
    /// The geometry the mesh uses for `length` bytes: 1 MiB pieces, doubled while there
    /// would be more than [`TARGET_PIECE_COUNT`] pieces, up to [`MAX_PIECE_SIZE`].
    pub fn for_length(length: u64) -> Result<Self, GeometryError> {
        if length > MAX_CONTENT_LENGTH {
            return Err(GeometryError::TooLarge(length));
        }
        let mut piece_size = MIN_PIECE_SIZE;
        while length.div_ceil(piece_size as u64) > TARGET_PIECE_COUNT && piece_size < MAX_PIECE_SIZE
        {
            piece_size *= 2;
        }
        Self::new(length, piece_size)
    }

    /// A geometry with an explicit piece size.
    pub fn new(length: u64, piece_size: u32) -> Result<Self, GeometryError> {
        if piece_size == 0 || piece_size > d7q_wire::MAX_PIECE_SIZE {
            return Err(GeometryError::Inconsistent(length, piece_size, 0));
        }
        let count = length.div_ceil(piece_size as u64);
        if count > MAX_PIECE_COUNT as u64 {
            return Err(GeometryError::TooLarge(length));
        }
        Ok(Self {
            length,
            piece_size,
            piece_count: count as u32,
        })
    }

    /// Checks numbers received from a peer.
    pub fn checked(length: u64, piece_size: u32, piece_count: u32) -> Result<Self, GeometryError> {
        let g = Self::new(length, piece_size)
            .map_err(|_| GeometryError::Inconsistent(length, piece_size, piece_count))?;
        if g.piece_count != piece_count {
            return Err(GeometryError::Inconsistent(length, piece_size, piece_count));
        }
        Ok(g)
    }

    /// Byte offset of piece `i`.
    pub fn offset(&self, i: u32) -> u64 {
        i as u64 * self.piece_size as u64
    }

    /// Length of piece `i` (the last one may be short).
    pub fn piece_len(&self, i: u32) -> u32 {
        let start = self.offset(i);
        (self.length.saturating_sub(start)).min(self.piece_size as u64) as u32
    }
}

/// Parses `sha256:HEX` (64 lower- or upper-case hex digits).
pub fn parse_digest(s: &str) -> Option<Sha256> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(chunk).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Formats a digest as `sha256:HEX`.
pub fn format_digest(d: &Sha256) -> String {
    let mut s = String::with_capacity(71);
    s.push_str("sha256:");
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_picks_one_mebibyte_then_grows() {
        let g = Geometry::for_length(0).unwrap();
        assert_eq!((g.piece_size, g.piece_count), (MIN_PIECE_SIZE, 0));
        let g = Geometry::for_length(1 << 20).unwrap();
        assert_eq!(g.piece_count, 1);
        let g = Geometry::for_length((5 << 20) + 12345).unwrap();
        assert_eq!((g.piece_count, g.piece_len(5)), (6, 12345));
        let g = Geometry::for_length(1 << 30).unwrap();
        assert_eq!((g.piece_size, g.piece_count), (1 << 20, 1024));
        let g = Geometry::for_length((1 << 30) + 1).unwrap();
        assert_eq!((g.piece_size, g.piece_count), (2 << 20, 513));
        assert!(Geometry::for_length(MAX_CONTENT_LENGTH + 1).is_err());
        assert!(Geometry::checked(10, 4, 2).is_err());
        assert!(Geometry::checked(10, 4, 3).is_ok());
        assert!(Geometry::checked(10, 0, 0).is_err());
    }

    #[test]
    fn digest_decides_the_task_id() {
        let d = [7u8; 32];
        assert_eq!(
            task_id("https://a/x", Some(&d), None),
            task_id("https://b/y", Some(&d), None)
        );
        assert_ne!(
            task_id("https://a/x", None, None),
            task_id("https://a/y", None, None)
        );
        assert_eq!(
            task_id("HTTPS://A/x#frag", None, None),
            task_id("https://a/x", None, None)
        );
        let r = ByteRange { start: 0, end: 10 };
        assert_ne!(
            task_id("https://a/x", None, Some(r)),
            task_id("https://a/x", None, None)
        );
    }

    #[test]
    fn digest_notation_round_trips() {
        let d = [0xabu8; 32];
        assert_eq!(parse_digest(&format_digest(&d)), Some(d));
        assert_eq!(parse_digest("sha256:xyz"), None);
        assert_eq!(parse_digest("md5:00"), None);
    }
}
