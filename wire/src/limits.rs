//! Semantic limits on decoded messages, checked right after decoding and before anything acts
//! on them. The frame limit bounds bytes; these bound what the bytes may describe (a frame full
//! of empty header pairs is small on the wire and large in memory).
//!
//! Every bound is a constant of the crate root, and each is chosen so that a message at all its
//! limits still fits one frame: the limits never contradict each other.

use serde::de::DeserializeOwned;

use crate::msg::*;
use crate::{
    codec, DecodeError, MAX_DIGESTS_PER_MESSAGE, MAX_HEADERS, MAX_LABEL_LEN, MAX_PARENTS,
    MAX_PIECE_COUNT, MAX_PIECE_SIZE, MAX_STRING_LEN,
};

/// A decoded message that broke a limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{what} exceeds its limit ({got} > {limit})")]
pub struct LimitError {
    /// Which field.
    pub what: &'static str,
    /// Its size.
    pub got: usize,
    /// The limit.
    pub limit: usize,
}

/// A message whose decoded contents can be checked against the protocol's limits.
pub trait Bounded {
    /// Checks every peer-controlled size in the message.
    fn check_limits(&self) -> Result<(), LimitError>;
}

/// Decodes one message and checks its limits; what a receiver of untrusted bytes calls.
pub fn decode_checked<T: DeserializeOwned + Bounded>(bytes: &[u8]) -> Result<T, DecodeError> {
    let msg: T = codec::decode(bytes)?;
    msg.check_limits()
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    Ok(msg)
}

fn at_most(what: &'static str, got: usize, limit: usize) -> Result<(), LimitError> {
    if got > limit {
        return Err(LimitError { what, got, limit });
    }
    Ok(())
}

/// A piece index must name one of at most [`MAX_PIECE_COUNT`] pieces, whatever the task: a
/// receiver may then index or size a table by it without an overflow or a huge allocation.
fn piece_index(what: &'static str, index: u32) -> Result<(), LimitError> {
    at_most(what, index as usize, MAX_PIECE_COUNT as usize - 1)
}

fn labels(l: &Labels) -> Result<(), LimitError> {
    at_most("dc label", l.dc.len(), MAX_LABEL_LEN)?;
    at_most("zone label", l.zone.len(), MAX_LABEL_LEN)?;
    at_most("host label", l.host.len(), MAX_LABEL_LEN)
}

impl Bounded for Control {
    fn check_limits(&self) -> Result<(), LimitError> {
        match self {
            Control::Hello(h) => labels(&h.labels),
            Control::HelloAck(h) => labels(&h.labels),
            Control::Register(r) => {
                at_most("URL", r.url.len(), MAX_STRING_LEN)?;
                at_most("header count", r.headers.len(), MAX_HEADERS)?;
                for (k, v) in &r.headers {
                    at_most("header", k.len() + v.len(), MAX_STRING_LEN)?;
                }
                Ok(())
            }
            Control::TaskMeta(m) => {
                at_most(
                    "piece count",
                    m.piece_count as usize,
                    MAX_PIECE_COUNT as usize,
                )?;
                at_most("piece size", m.piece_size as usize, MAX_PIECE_SIZE as usize)
            }
            Control::TaskComplete(_) | Control::BadPeer(_) => Ok(()),
            Control::PieceDigests(d) => {
                at_most("piece digests", d.digests.len(), MAX_DIGESTS_PER_MESSAGE)?;
                // In u64: `first + len` of a hostile message overflows a u32.
                let end = u64::from(d.first) + d.digests.len() as u64;
                at_most(
                    "piece digests end (first + count)",
                    usize::try_from(end).unwrap_or(usize::MAX),
                    MAX_PIECE_COUNT as usize,
                )
            }
            Control::Parents(p) => {
                at_most("parents", p.parents.len(), MAX_PARENTS)?;
                p.parents.iter().try_for_each(|p| labels(&p.labels))
            }
            Control::Have(h) => {
                at_most("have list", h.pieces.len(), MAX_PIECE_COUNT as usize)?;
                h.pieces
                    .iter()
                    .try_for_each(|&i| piece_index("have index", i))
            }
            Control::Bitmap(_) | Control::Announce(_) => Ok(()), // checked while decoding
            Control::Error(e) => at_most("error message", e.message.len(), MAX_STRING_LEN),
            Control::Goodbye(g) => at_most("goodbye reason", g.reason.len(), MAX_STRING_LEN),
        }
    }
}

impl Bounded for PieceRequest {
    fn check_limits(&self) -> Result<(), LimitError> {
        piece_index("piece index", self.index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, MAX_MESSAGE_SIZE};

    fn register(headers: usize, each: usize) -> Control {
        Control::Register(Register {
            task: TaskId([0; 16]),
            url: "u".repeat(MAX_STRING_LEN),
            headers: (0..headers)
                .map(|_| ("k".into(), "v".repeat(each - 1)))
                .collect(),
            digest: Some([0; 32]),
            range: None,
        })
    }

    #[test]
    fn a_message_at_every_limit_fits_a_frame() {
        let mut out = Vec::new();
        encode(&register(MAX_HEADERS, MAX_STRING_LEN), &mut out).expect("fits");
        assert!(out.len() <= MAX_MESSAGE_SIZE);
        let back: Control = decode_checked(&out).expect("within limits");
        assert_eq!(back, register(MAX_HEADERS, MAX_STRING_LEN));
    }

    #[test]
    fn too_many_headers_or_a_long_label_are_refused() {
        let mut out = Vec::new();
        encode(&register(MAX_HEADERS + 1, 2), &mut out).unwrap();
        assert!(decode_checked::<Control>(&out).is_err());
        let hello = Control::Goodbye(Goodbye {
            reason: "x".repeat(MAX_STRING_LEN + 1),
        });
        out.clear();
        encode(&hello, &mut out).unwrap();
        let err = decode_checked::<Control>(&out).unwrap_err();
        assert!(err.to_string().contains("goodbye reason"), "{err}");
        let req = PieceRequest {
            task: TaskId([0; 16]),
            index: MAX_PIECE_COUNT,
        };
        out.clear();
        encode(&req, &mut out).unwrap();
        assert!(decode_checked::<PieceRequest>(&out).is_err());
    }
}
