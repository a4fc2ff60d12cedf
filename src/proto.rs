//! Framed messages over QUIC streams: the async half of `d7q_wire::frame`.
//!
//! Reading goes through [`FrameReader`]: the announced length is checked against the wire limit
//! before anything is buffered, every message's limits before it is handed out, and every
//! failure is an error value; a caller that gets one resets or closes the stream.
//!
//! Deadlines: whatever a remote side controls is bounded in time. The first message of a stream
//! (a piece request, a Hello, a subscription) within [`REQUEST_TIMEOUT`] / [`HELLO_TIMEOUT`];
//! between messages a control stream may be quiet for as long as its connection lives (QUIC's
//! idle timeout and keep-alives decide that), but a frame that has begun must be whole within
//! [`FRAME_TIMEOUT`], so a peer trickling one byte a minute is cut off.

use std::time::Duration;

use d7q_wire::{frame, Bounded, FrameDecoder};
use serde::{de::DeserializeOwned, Serialize};
use tokio::time::Instant;

/// How long a peer may take to send the first message of a stream it opened: the request of a
/// piece stream, the subscription that follows a Hello on an uploader's control stream.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the opener of a control stream may take to send its Hello, and the answerer its
/// HelloAck. Both are written the moment the stream is open, like a piece request, so the
/// allowance is the same; a peer that says nothing is dropped and frees what its stream held
/// (a task on the supernode, an upload slot on a daemon).
pub const HELLO_TIMEOUT: Duration = REQUEST_TIMEOUT;
/// How long one frame, once its first bytes are in, may take to arrive whole. A frame is at
/// most [`d7q_wire::MAX_MESSAGE_SIZE`] (1 MiB): 8 s at 1 Mbit/s, so a live peer on a poor path
/// makes it; a peer that trickles bytes to hold the stream does not.
pub const FRAME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an uploader keeps trying to hand one piece over (header, bytes, the peer's
/// acknowledgement) before it resets the stream: a peer that stops reading must not hold an
/// upload slot. Twice the downloader's own deadline per piece.
pub const PIECE_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes taken from a stream at once by a [`FrameReader`]; with the frame limit, what one
/// reader may buffer.
const READ_CHUNK: usize = 64 << 10;

/// Why a framed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The stream broke.
    #[error("stream read: {0}")]
    Read(#[from] quinn::ReadExactError),
    /// The stream broke (a chunked read).
    #[error("stream read: {0}")]
    Recv(#[from] quinn::ReadError),
    /// The stream broke while writing.
    #[error("stream write: {0}")]
    Write(#[from] quinn::WriteError),
    /// The bytes were not a valid frame.
    #[error("bad frame: {0}")]
    Frame(#[from] frame::FrameError),
    /// The stream ended cleanly where a message was expected.
    #[error("stream ended")]
    Finished,
    /// The stream ended in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// The peer took too long.
    #[error("timed out")]
    Timeout,
    /// The connection failed while opening a stream.
    #[error("connection: {0}")]
    Connection(quinn::ConnectionError),
}

/// Reads framed messages from the receiving half of a stream.
///
/// Cancel-safe: bytes taken from the stream wait in a [`FrameDecoder`] until they make a whole
/// frame, so a [`FrameReader::next`] dropped by a `select!` loses nothing and the next call goes
/// on where it stopped (a `read_exact` dropped half-way loses what it had read, and the stream
/// is out of step from then on).
pub struct FrameReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
    /// When the frame waiting in the decoder was first found incomplete: its
    /// [`FRAME_TIMEOUT`] runs from there, across calls.
    partial_since: Option<Instant>,
}

impl FrameReader {
    /// Reads from `recv`.
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(),
            partial_since: None,
        }
    }

    /// The next message; `Ok(None)` when the stream ends cleanly between frames. Waits for a
    /// frame to begin for as long as the stream lives; a begun frame must be whole within
    /// [`FRAME_TIMEOUT`].
    pub async fn next<T: DeserializeOwned + Bounded>(&mut self) -> Result<Option<T>, ProtoError> {
        loop {
            if let Some(msg) = self.decoder.next_checked::<T>()? {
                self.partial_since = None;
                return Ok(Some(msg));
            }
            let chunk = if self.decoder.buffered() == 0 {
                self.recv.read_chunk(READ_CHUNK, true).await?
            } else {
                let since = *self.partial_since.get_or_insert_with(Instant::now);
                tokio::time::timeout_at(
                    since + FRAME_TIMEOUT,
                    self.recv.read_chunk(READ_CHUNK, true),
                )
                .await
                .map_err(|_| ProtoError::Timeout)??
            };
            match chunk {
                Some(c) => self.decoder.extend(&c.bytes),
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => return Err(ProtoError::Truncated(self.decoder.buffered())),
            }
        }
    }

    /// The next message, which must be there.
    pub async fn expect<T: DeserializeOwned + Bounded>(&mut self) -> Result<T, ProtoError> {
        self.next().await?.ok_or(ProtoError::Finished)
    }

    /// The next message, which must be there within `limit` (for a first message:
    /// [`HELLO_TIMEOUT`], [`REQUEST_TIMEOUT`]).
    pub async fn expect_within<T: DeserializeOwned + Bounded>(
        &mut self,
        limit: Duration,
    ) -> Result<T, ProtoError> {
        tokio::time::timeout(limit, self.expect())
            .await
            .map_err(|_| ProtoError::Timeout)?
    }

    /// The stream, to hold it open without reading (bytes already buffered are dropped).
    pub fn into_inner(self) -> quinn::RecvStream {
        self.recv
    }
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

#[cfg(test)]
mod tests {
    use d7q_wire::{Control, Goodbye};

    use super::*;
    use crate::pki::NodeIdentity;
    use crate::transport;

    /// Messages read through a `FrameReader` inside a `select!` whose other arm fires over and
    /// over (each firing drops the read half-way through a frame) arrive whole and in order.
    #[tokio::test]
    async fn a_frame_reader_cancelled_mid_frame_loses_nothing() {
        let id = NodeIdentity::ephemeral().unwrap();
        let server = transport::endpoint(&id, "127.0.0.1:0".parse().unwrap(), true).unwrap();
        let client = transport::endpoint(&id, "127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = server.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (_send, recv) = conn.accept_bi().await.unwrap();
            (server, conn, recv)
        });
        let conn = transport::connect(&client, addr).await.unwrap();
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        let sent: Vec<Control> = (0..5)
            .map(|i| {
                Control::Goodbye(Goodbye {
                    reason: format!("message {i} {}", "x".repeat(i * 300)),
                })
            })
            .collect();
        let mut bytes = Vec::new();
        for m in &sent {
            frame::encode_frame(m, &mut bytes).unwrap();
        }
        let writer = tokio::spawn(async move {
            // A few bytes at a time, so frames straddle many reads.
            for chunk in bytes.chunks(7) {
                send.write_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            send.finish().unwrap();
            send
        });
        let (_server, _sconn, recv) = accepted.await.unwrap();
        let mut reader = FrameReader::new(recv);
        let mut got = Vec::new();
        let mut cancelled = 0u32;
        let mut tick = tokio::time::interval(Duration::from_micros(100));
        loop {
            tokio::select! {
                msg = reader.next::<Control>() => match msg.unwrap() {
                    Some(m) => got.push(m),
                    None => break,
                },
                _ = tick.tick() => cancelled += 1,
            }
        }
        let _send = writer.await.unwrap();
        assert!(cancelled > 0, "the read was never cancelled");
        assert_eq!(got, sent);
    }
}
