//! Framed messages over QUIC streams: the async half of `d7q_wire::frame`.
//!
//! Reading checks the announced length against the wire limit before allocating, and every
//! failure is an error value; a caller that gets one resets or closes the stream.

use std::time::Duration;

use d7q_wire::frame::{self, FRAME_HEADER_LEN};
use d7q_wire::Bounded;
use serde::{de::DeserializeOwned, Serialize};

/// How long a peer may take to send the request of a piece stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an uploader keeps trying to hand one piece over (header, bytes, the peer's
/// acknowledgement) before it resets the stream: a peer that stops reading must not hold an
/// upload slot. Twice the downloader's own deadline per piece.
pub const PIECE_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a framed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream broke.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The stream broke while writing.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The bytes were not a valid frame.
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    /// The stream ended cleanly where a message was expected.
    #[error("stream ended")]
    Finished,
    /// The peer took too long.
    #[error("timed out")]
    Timeout,
    /// The connection failed while opening a stream.
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
}

/// Reads one framed message; `Ok(None)` when the stream ends cleanly before a new frame.
pub async fn read_msg<T: DeserializeOwned + Bounded>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, ProtoError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = frame::payload_len(header)?;
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await?;
    Ok(Some(
        d7q_wire::decode_checked(&payload).map_err(frame::FrameError::from)?,
    ))
}

/// Reads one framed message, which must be there.
pub async fn expect_msg<T: DeserializeOwned + Bounded>(
    recv: &mut quinn::RecvStream,
) -> Result<T, ProtoError> {
    read_msg(recv).await?.ok_or(ProtoError::Finished)
}

/// Writes one framed message.
pub async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), ProtoError> {
    let mut buf = Vec::with_capacity(64);
    frame::encode_frame(msg, &mut buf)?;
    send.write_all(&buf).await?;
    Ok(())
}

/// Opens a control stream (writes its kind byte).
pub async fn open_control(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), ProtoError> {
    open_kind(conn, d7q_wire::stream_kind::CONTROL).await
}

/// Opens a piece stream (writes its kind byte).
pub async fn open_piece(
    conn: &quinn::Connection,
) -> Result<(quinn::SendStream, quinn::RecvStream), ProtoError> {
    open_kind(conn, d7q_wire::stream_kind::PIECE).await
}

async fn open_kind(
    conn: &quinn::Connection,
    kind: u8,
) -> Result<(quinn::SendStream, quinn::RecvStream), ProtoError> {
    let (mut send, recv) = conn.open_bi().await.map_err(ProtoError::Connection)?;
    send.write_all(&[kind]).await?;
    Ok((send, recv))
}

/// Reads the kind byte of an accepted stream.
pub async fn read_kind(recv: &mut quinn::RecvStream) -> Result<u8, ProtoError> {
    let mut kind = [0u8; 1];
    tokio::time::timeout(REQUEST_TIMEOUT, recv.read_exact(&mut kind))
        .await
        .map_err(|_| ProtoError::Timeout)??;
    Ok(kind[0])
}
