//! The d7q mesh protocol, written down as types. No IO lives here.
//!
//! Goals: one QUIC connection between two nodes, one long-lived *control stream* per connection
//! and one bidirectional *piece stream* per piece request. Every message on either stream is a
//! length-prefixed frame ([`frame`]) whose size is checked before anything is allocated, and
//! decoding untrusted bytes returns an error, never panics. Piece bytes are never wrapped in a
//! message: a piece stream answers a [`msg::PieceRequest`] with a fixed [`piece::PieceHeader`]
//! followed by the raw bytes.
//!
//! Non-goals: transport, scheduling and storage. Those live in the `d7q` crate.
//!
//! Versioning: the ALPN string ([`ALPN`]) carries the major version, so two nodes of different
//! major versions never exchange a frame; the [`msg::Hello`] carries the minor version. Every wire
//! enum is append-only: new variants go at the end, never in between, and golden byte tests pin
//! the encoding.

pub mod bitmap;
mod codec;
pub mod frame;
mod limits;
pub mod msg;
pub mod piece;

pub use bitmap::Bitmap;
pub use codec::{decode, encode, DecodeError, EncodeError};
pub use frame::{FrameDecoder, FrameError};
pub use limits::{decode_checked, Bounded, LimitError};
pub use msg::*;
pub use piece::{PieceHeader, PieceStatus};

/// The first byte of every bidirectional stream says what it carries, so a node may run several
/// control streams (one per download) beside its piece streams on one connection.
pub mod stream_kind {
    /// A control stream: [`crate::msg::Control`] frames both ways, starting with a `Hello`.
    pub const CONTROL: u8 = b'C';
    /// A piece stream: one [`crate::msg::PieceRequest`] frame, answered by a
    /// [`crate::piece::PieceHeader`] and the raw piece bytes.
    pub const PIECE: u8 = b'P';
}

/// ALPN of the mesh protocol; the digit is the major version.
pub const ALPN: &[u8] = b"d7q/1";
/// ALPN of the admin API served on the same UDP port.
pub const ADMIN_ALPN: &[u8] = b"h3";
/// Major version, the one in [`ALPN`].
pub const MAJOR_VERSION: u16 = 1;
/// Minor version, carried in [`msg::Hello`]; minor versions only ever add. 1: the
/// `Saturated` piece status.
pub const MINOR_VERSION: u16 = 1;
/// The largest frame payload either side accepts, checked before allocation.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;
/// The largest number of pieces one task may have. Bounds bitmaps, digest lists and every piece
/// index on the wire (`PieceDigests.first + count`, `Have`, `PieceRequest`), in `decode_checked`.
pub const MAX_PIECE_COUNT: u32 = 1 << 16;
/// The largest piece size, so a piece buffer is bounded whatever a peer says.
pub const MAX_PIECE_SIZE: u32 = 64 << 20;
/// The most piece digests one [`msg::PieceDigests`] carries, so it always fits a frame.
pub const MAX_DIGESTS_PER_MESSAGE: usize = 16 * 1024;
/// Bound on strings a peer controls (a URL, one header's name and value together, error text).
/// With [`MAX_HEADERS`] of them a [`msg::Register`] stays well under [`MAX_MESSAGE_SIZE`].
pub const MAX_STRING_LEN: usize = 8 * 1024;
/// Bound on each locality label (dc, zone, host).
pub const MAX_LABEL_LEN: usize = 256;
/// Bound on headers passed to the origin in one registration.
pub const MAX_HEADERS: usize = 64;
/// Bound on the parents in one [`msg::Parents`] message.
pub const MAX_PARENTS: usize = 64;
