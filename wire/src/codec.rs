//! The one place that names bincode: swap the codec here and nothing else changes.

use serde::{de::DeserializeOwned, Serialize};

use crate::MAX_MESSAGE_SIZE;

/// Why bytes did not decode into a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a valid encoding of the expected message (unknown variant, bad
    /// length, invalid UTF-8, a value out of range, ...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message decoded but left bytes behind it.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
    /// The bytes are more than [`MAX_MESSAGE_SIZE`], so no peer could have sent them as one
    /// message: [`encode`] refuses to produce them.
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")]
    TooLarge(usize),
}

/// Why a message could not be encoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EncodeError {
    /// The message is larger than [`MAX_MESSAGE_SIZE`].
    #[error("message of {0} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")]
    TooLarge(usize),
    /// The codec refused the value (over the size limit while encoding, most likely).
    #[error("message cannot be encoded: {0}")]
    Unencodable(String),
}

/// The codec's own decoding budget, an allocation guard rather than a size limit.
///
/// bincode charges each decoded integer its in-memory width (8 bytes for a `u64` or a length,
/// even when the varint on the wire is one byte) plus the length of each string it allocates,
/// so a message of `n` wire bytes costs at most `8 * n`. A budget of [`MAX_MESSAGE_SIZE`] would
/// refuse dense messages that [`encode`] accepted (any message near the limit, or a few hundred
/// KiB of one-byte piece indices); the wire size itself is checked in [`decode`].
const DECODE_BUDGET: usize = 8 * MAX_MESSAGE_SIZE;

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<DECODE_BUDGET>()
}

/// Encodes a message into `out` (appending). Fails only when the message is larger than
/// [`MAX_MESSAGE_SIZE`]; `out` is then left as it was.
pub fn encode<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = out.len();
    match bincode::serde::encode_into_std_write(msg, out, config()) {
        Ok(n) if n <= MAX_MESSAGE_SIZE => Ok(()),
        Ok(n) => {
            out.truncate(start);
            Err(EncodeError::TooLarge(n))
        }
        Err(e) => {
            out.truncate(start);
            Err(EncodeError::Unencodable(e.to_string()))
        }
    }
}

/// Decodes exactly one message from `bytes`; trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    // The codec's budget bounds what it allocates, not what it reads (see DECODE_BUDGET); this
    // keeps decode from accepting what encode refuses.
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(DecodeError::TooLarge(bytes.len()));
    }
    let (msg, used) = bincode::serde::decode_from_slice(bytes, config())
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(DecodeError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}
