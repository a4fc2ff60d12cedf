//! Length-prefixed framing: a 4-byte big-endian payload length, then the payload.
//!
//! The length is checked against [`MAX_MESSAGE_SIZE`] before any buffer grows, so a peer that
//! announces a huge frame costs us four bytes, not memory.

use serde::{de::DeserializeOwned, Serialize};

use crate::{codec, Bounded, DecodeError, EncodeError, MAX_MESSAGE_SIZE};

/// Length of the frame prefix.
pub const FRAME_HEADER_LEN: usize = 4;

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The announced payload is larger than [`MAX_MESSAGE_SIZE`].
    #[error("frame of {0} bytes exceeds the limit of {MAX_MESSAGE_SIZE}")]
    TooLarge(usize),
    /// The payload did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// The message to send could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

/// Appends one framed message to `out`; on error `out` is left as it was.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    if let Err(e) = codec::encode(msg, out) {
        out.truncate(start);
        return Err(e.into());
    }
    let len = (out.len() - start - FRAME_HEADER_LEN) as u32;
    out[start..start + FRAME_HEADER_LEN].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

/// Reads the payload length from a frame header, refusing lengths over the limit.
pub fn payload_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_MESSAGE_SIZE {
        return Err(FrameError::TooLarge(len));
    }
    Ok(len)
}

/// Incremental decoder over a byte buffer: feed bytes, take whole messages out.
///
/// Says "incomplete, read more" by returning `Ok(None)`, in the manner of mini-redis' frame
/// parser; it never reads from anywhere itself.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Start of the undecoded bytes in `buf`. Taking a message only moves this; the consumed
    /// prefix is dropped in [`FrameDecoder::extend`] once it is at least half the buffer, so a
    /// burst of small frames costs linear time rather than one memmove of the rest per frame.
    pos: usize,
}

impl FrameDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Takes the next whole message, `Ok(None)` if more bytes are needed.
    ///
    /// After an error the stream is unusable: the caller closes it.
    // Not an `Iterator`: the message type is chosen per call and "need more bytes" is not "end".
    #[allow(clippy::should_implement_trait)]
    pub fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        self.take(codec::decode)
    }

    /// [`FrameDecoder::next`] for bytes from a peer: the message's limits are checked too (see
    /// [`crate::decode_checked`]) before it is handed out.
    pub fn next_checked<T: DeserializeOwned + Bounded>(&mut self) -> Result<Option<T>, FrameError> {
        self.take(crate::decode_checked)
    }

    fn take<T>(
        &mut self,
        decode: impl FnOnce(&[u8]) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, FrameError> {
        let rest = &self.buf[self.pos..];
        if rest.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        header.copy_from_slice(&rest[..FRAME_HEADER_LEN]);
        let len = payload_len(header)?;
        if rest.len() - FRAME_HEADER_LEN < len {
            return Ok(None);
        }
        let msg = decode(&rest[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len])?;
        self.pos += FRAME_HEADER_LEN + len;
        if self.pos == self.buf.len() {
            // Everything taken: start over without moving a byte.
            self.buf.clear();
            self.pos = 0;
        }
        Ok(Some(msg))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Capabilities, Control, Hello, Labels, NodeId, MAX_LABEL_LEN};

    /// `next_checked` refuses what `next` lets through: a message that fits the frame but
    /// breaks a semantic limit (here a label longer than `MAX_LABEL_LEN`).
    #[test]
    fn next_checked_refuses_a_message_over_its_limits() {
        let hello = |dc_len: usize| {
            Control::Hello(Hello {
                major: 1,
                minor: 0,
                node_id: NodeId([1; 16]),
                labels: Labels {
                    dc: "d".repeat(dc_len),
                    ..Labels::default()
                },
                upload_addr: None,
                capabilities: Capabilities(0),
            })
        };
        let mut bytes = Vec::new();
        encode_frame(&hello(MAX_LABEL_LEN + 1), &mut bytes).unwrap();
        let mut loose = FrameDecoder::new();
        loose.extend(&bytes);
        assert!(loose.next::<Control>().unwrap().is_some());
        let mut strict = FrameDecoder::new();
        strict.extend(&bytes);
        assert!(matches!(
            strict.next_checked::<Control>(),
            Err(FrameError::Decode(DecodeError::Malformed(m))) if m.contains("dc label")
        ));
        let mut ok = Vec::new();
        encode_frame(&hello(MAX_LABEL_LEN), &mut ok).unwrap();
        let mut strict = FrameDecoder::new();
        strict.extend(&ok[..3]);
        assert!(strict.next_checked::<Control>().unwrap().is_none());
        strict.extend(&ok[3..]);
        assert_eq!(
            strict.next_checked::<Control>().unwrap(),
            Some(hello(MAX_LABEL_LEN))
        );
        assert_eq!(strict.buffered(), 0);
    }
}
