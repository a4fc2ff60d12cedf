//! The fixed header that answers a piece request, before the raw piece bytes.
//!
//! Layout (8 bytes): `status: u8`, three zero bytes, `length: u32` big-endian. A fixed layout
//! rather than a serde message so that piece bytes follow it with no framing to undo.

use crate::MAX_PIECE_SIZE;

/// Length of an encoded [`PieceHeader`].
pub const PIECE_HEADER_LEN: usize = 8;

/// The answer's status; append-only, unknown values are refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PieceStatus {
    /// The piece follows, `length` bytes.
    Ok = 0,
    /// The server does not have this piece (yet).
    NotAvailable = 1,
    /// The server does not know this task.
    UnknownTask = 2,
    /// The server is too busy; ask another parent.
    Busy = 3,
    /// The request was malformed.
    BadRequest = 4,
    /// The server failed to read the piece.
    Internal = 5,
    /// Every upload slot of the server is taken: ask again a little later, or another
    /// parent. Not a failure of the server. Since minor version 1.
    Saturated = 6,
}

impl PieceStatus {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            0 => Self::Ok,
            1 => Self::NotAvailable,
            2 => Self::UnknownTask,
            3 => Self::Busy,
            4 => Self::BadRequest,
            5 => Self::Internal,
            6 => Self::Saturated,
            _ => return None,
        })
    }
}

/// Why a piece header was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum PieceHeaderError {
    /// Status byte not known to this version.
    #[error("unknown piece status {0}")]
    UnknownStatus(u8),
    /// Reserved bytes were not zero.
    #[error("reserved bytes of the piece header are not zero")]
    Reserved,
    /// The announced length is over [`MAX_PIECE_SIZE`].
    #[error("piece length {0} exceeds the limit of {MAX_PIECE_SIZE}")]
    TooLarge(u32),
    /// A non-Ok status carried a length.
    #[error("piece header with status {0:?} carries a length")]
    UnexpectedLength(PieceStatus),
}

/// The header of a piece answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PieceHeader {
    /// The status.
    pub status: PieceStatus,
    /// The number of piece bytes that follow (zero unless `status` is `Ok`).
    pub length: u32,
}

impl PieceHeader {
    /// A header announcing `length` piece bytes.
    pub fn ok(length: u32) -> Self {
        Self {
            status: PieceStatus::Ok,
            length,
        }
    }

    /// A header refusing the request.
    pub fn refuse(status: PieceStatus) -> Self {
        Self { status, length: 0 }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; PIECE_HEADER_LEN] {
        let mut out = [0u8; PIECE_HEADER_LEN];
        out[0] = self.status as u8;
        out[4..].copy_from_slice(&self.length.to_be_bytes());
        out
    }

    /// Decodes and checks a header.
    pub fn decode(bytes: [u8; PIECE_HEADER_LEN]) -> Result<Self, PieceHeaderError> {
        let status =
            PieceStatus::from_u8(bytes[0]).ok_or(PieceHeaderError::UnknownStatus(bytes[0]))?;
        if bytes[1..4] != [0, 0, 0] {
            return Err(PieceHeaderError::Reserved);
        }
        let length = u32::from_be_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        if length > MAX_PIECE_SIZE {
            return Err(PieceHeaderError::TooLarge(length));
        }
        if status != PieceStatus::Ok && length != 0 {
            return Err(PieceHeaderError::UnexpectedLength(status));
        }
        Ok(Self { status, length })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let h = PieceHeader::ok(1 << 20);
        assert_eq!(h.encode(), [0, 0, 0, 0, 0, 0x10, 0, 0]);
        assert_eq!(PieceHeader::decode(h.encode()), Ok(h));
        assert_eq!(
            PieceHeader::decode([9, 0, 0, 0, 0, 0, 0, 0]),
            Err(PieceHeaderError::UnknownStatus(9))
        );
        assert_eq!(
            PieceHeader::decode([0, 1, 0, 0, 0, 0, 0, 0]),
            Err(PieceHeaderError::Reserved)
        );
        assert_eq!(
            PieceHeader::decode([0, 0, 0, 0, 0xff, 0, 0, 0]),
            Err(PieceHeaderError::TooLarge(0xff00_0000))
        );
        assert_eq!(
            PieceHeader::decode([1, 0, 0, 0, 0, 0, 0, 1]),
            Err(PieceHeaderError::UnexpectedLength(
                PieceStatus::NotAvailable
            ))
        );
    }
}
