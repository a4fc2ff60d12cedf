//! Property tests: decoding untrusted bytes never panics, well-formed messages round-trip, framing
//! survives arbitrary splits, and bitmaps keep their invariants.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proptest::collection::{btree_set, vec};
use proptest::prelude::*;

use d7q_wire::frame::{encode_frame, payload_len, FRAME_HEADER_LEN};
use d7q_wire::piece::PIECE_HEADER_LEN;
use d7q_wire::*;

// ---- strategies -------------------------------------------------------------------------------

fn task_id() -> impl Strategy<Value = TaskId> {
    any::<[u8; 16]>().prop_map(TaskId)
}

fn node_id() -> impl Strategy<Value = NodeId> {
    any::<[u8; 16]>().prop_map(NodeId)
}

/// Short strings of any printable Unicode, so multi-byte UTF-8 is exercised.
fn text() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn labels() -> impl Strategy<Value = Labels> {
    (text(), text(), text()).prop_map(|(dc, zone, host)| Labels { dc, zone, host })
}

/// Socket addresses as the wire carries them: serde's compact form drops the IPv6 flow info
/// and scope id, so they are zero here.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(ip, port)| SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::from(ip), port))),
        (any::<[u8; 16]>(), any::<u16>()).prop_map(|(ip, port)| SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(ip),
            port,
            0,
            0
        ))),
    ]
}

fn digest() -> impl Strategy<Value = Sha256> {
    any::<[u8; 32]>()
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::VersionMismatch,
        ErrorCode::BadRequest,
        ErrorCode::Forbidden,
        ErrorCode::OriginStatus,
        ErrorCode::OriginUnreachable,
        ErrorCode::OriginTruncated,
        ErrorCode::DigestMismatch,
        ErrorCode::TooLarge,
        ErrorCode::UnknownTask,
        ErrorCode::NoSpace,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
        ErrorCode::ShuttingDown,
    ])
}

fn bad_peer_reason() -> impl Strategy<Value = BadPeerReason> {
    prop::sample::select(vec![
        BadPeerReason::DigestMismatch,
        BadPeerReason::Timeout,
        BadPeerReason::Refused,
        BadPeerReason::Slow,
    ])
}

/// A bitmap of up to 300 pieces with arbitrary pieces set.
fn bitmap() -> impl Strategy<Value = Bitmap> {
    (0u32..=300)
        .prop_flat_map(|len| (Just(len), vec(any::<u32>(), 0..40)))
        .prop_map(|(len, picks)| {
            let mut b = Bitmap::new(len);
            if len > 0 {
                for p in picks {
                    b.set(p % len);
                }
            }
            b
        })
}

fn control() -> impl Strategy<Value = Control> {
    prop_oneof![
        (
            any::<u16>(),
            any::<u16>(),
            node_id(),
            labels(),
            proptest::option::of(socket_addr()),
            any::<u64>()
        )
            .prop_map(|(major, minor, node_id, labels, upload_addr, caps)| {
                Control::Hello(Hello {
                    major,
                    minor,
                    node_id,
                    labels,
                    upload_addr,
                    capabilities: Capabilities(caps),
                })
            }),
        (
            any::<u16>(),
            any::<u16>(),
            node_id(),
            labels(),
            any::<u64>()
        )
            .prop_map(|(major, minor, node_id, labels, caps)| {
                Control::HelloAck(HelloAck {
                    major,
                    minor,
                    node_id,
                    labels,
                    capabilities: Capabilities(caps),
                })
            }),
        (
            task_id(),
            text(),
            vec((text(), text()), 0..4),
            proptest::option::of(digest()),
            proptest::option::of((any::<u64>(), any::<u64>()))
        )
            .prop_map(|(task, url, headers, digest, range)| {
                Control::Register(Register {
                    task,
                    url,
                    headers,
                    digest,
                    range: range.map(|(start, end)| ByteRange { start, end }),
                })
            }),
        (task_id(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(
            |(task, length, piece_size, piece_count)| {
                Control::TaskMeta(TaskMeta {
                    task,
                    length,
                    piece_size,
                    piece_count,
                })
            }
        ),
        (task_id(), any::<u32>(), vec(digest(), 0..6)).prop_map(|(task, first, digests)| {
            Control::PieceDigests(PieceDigests {
                task,
                first,
                digests,
            })
        }),
        (task_id(), vec((node_id(), socket_addr(), labels()), 0..5)).prop_map(|(task, parents)| {
            Control::Parents(Parents {
                task,
                parents: parents
                    .into_iter()
                    .map(|(node_id, addr, labels)| PeerInfo {
                        node_id,
                        addr,
                        labels,
                    })
                    .collect(),
            })
        }),
        (task_id(), vec(any::<u32>(), 0..20))
            .prop_map(|(task, pieces)| Control::Have(Have { task, pieces })),
        (task_id(), bitmap())
            .prop_map(|(task, bitmap)| Control::Bitmap(BitmapUpdate { task, bitmap })),
        (task_id(), any::<u64>(), digest()).prop_map(|(task, length, sha256)| {
            Control::TaskComplete(TaskComplete {
                task,
                length,
                sha256,
            })
        }),
        (
            proptest::option::of(task_id()),
            error_code(),
            proptest::option::of(any::<u16>()),
            text()
        )
            .prop_map(|(task, code, origin_status, message)| {
                Control::Error(ErrorMsg {
                    task,
                    code,
                    origin_status,
                    message,
                })
            }),
        (task_id(), node_id(), bad_peer_reason()).prop_map(
            |(task, peer, reason)| Control::BadPeer(BadPeerReport { task, peer, reason })
        ),
        text().prop_map(|reason| Control::Goodbye(Goodbye { reason })),
    ]
}

fn piece_status() -> impl Strategy<Value = PieceStatus> {
    prop::sample::select(vec![
        PieceStatus::Ok,
        PieceStatus::NotAvailable,
        PieceStatus::UnknownTask,
        PieceStatus::Busy,
        PieceStatus::BadRequest,
        PieceStatus::Internal,
        PieceStatus::Saturated,
    ])
}

fn piece_request() -> impl Strategy<Value = PieceRequest> {
    (task_id(), any::<u32>()).prop_map(|(task, index)| PieceRequest { task, index })
}

/// Byte edits applied to a valid encoding. Positions are taken modulo the current length.
#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Delete(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip(at, bit)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Set(at, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
        any::<usize>().prop_map(Mutation::Delete),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match *m {
        Mutation::Flip(at, bit) if n > 0 => bytes[at % n] ^= 1 << bit,
        Mutation::Set(at, b) if n > 0 => bytes[at % n] = b,
        Mutation::Insert(at, b) => bytes.insert(at % (n + 1), b),
        Mutation::Delete(at) if n > 0 => {
            bytes.remove(at % n);
        }
        Mutation::Truncate(at) => bytes.truncate(at % (n + 1)),
        _ => {}
    }
}

// ---- helpers ----------------------------------------------------------------------------------

fn encoded<T: serde::Serialize>(msg: &T) -> Vec<u8> {
    let mut out = Vec::new();
    encode(msg, &mut out).expect("bounded messages encode");
    out
}

fn framed_len(msg: &Control) -> usize {
    FRAME_HEADER_LEN + encoded(msg).len()
}

/// Takes every message a decoder yields until it wants more bytes or fails. Each `Ok(Some)`
/// consumes bytes, so this ends.
fn drain<T: serde::de::DeserializeOwned>(dec: &mut FrameDecoder) -> (Vec<T>, Option<FrameError>) {
    let mut msgs = Vec::new();
    loop {
        match dec.next::<T>() {
            Ok(Some(m)) => msgs.push(m),
            Ok(None) => return (msgs, None),
            Err(e) => return (msgs, Some(e)),
        }
    }
}

/// Whatever decodes must re-encode, and the re-encoding must decode to the same value: no
/// decoded value is "stuck" (accepted but unsendable, or changed by a round trip).
fn assert_stable(msg: &Control) {
    let again: Control = decode(&encoded(msg)).expect("a decoded message re-decodes");
    assert_eq!(&again, msg);
}

/// Feeds bytes to every untrusted-input entry point; the assertion is that none panics, and
/// that whatever decodes is stable.
fn feed_everything(bytes: &[u8]) {
    if let Ok(msg) = decode::<Control>(bytes) {
        assert_stable(&msg);
    }
    if let Ok(req) = decode::<PieceRequest>(bytes) {
        assert_eq!(decode::<PieceRequest>(&encoded(&req)).unwrap(), req);
    }
    if let Ok(b) = decode::<Bitmap>(bytes) {
        // The invariant the decoder guards: no piece at or past `len`.
        assert!(b.iter_ones().all(|i| i < b.len()) && b.count() <= b.len());
    }
    if let Ok(header) =
        <[u8; PIECE_HEADER_LEN]>::try_from(bytes.get(..PIECE_HEADER_LEN).unwrap_or(&[]))
    {
        if let Ok(h) = PieceHeader::decode(header) {
            assert_eq!(h.encode(), header, "a piece header has one encoding");
        }
    }
    let mut dec = FrameDecoder::new();
    dec.extend(bytes);
    let (msgs, _) = drain::<Control>(&mut dec);
    msgs.iter().for_each(assert_stable);
}

// ---- properties -------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    // (a) Arbitrary bytes never panic any decoder.
    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        feed_everything(&bytes);
    }

    // (a) The same, with a known variant index in front so decoding gets past the first byte.
    #[test]
    fn random_bytes_after_a_variant_index_never_panic(tag in 0u8..13, bytes in vec(any::<u8>(), 0..512)) {
        let payload = [&[tag][..], &bytes].concat();
        feed_everything(&payload);
    }

    // (a) The same through the frame decoder, with a plausible length so the payload is decoded.
    #[test]
    fn random_frames_never_panic(tag in 0u8..13, bytes in vec(any::<u8>(), 0..512), extra in 0usize..4) {
        let payload = [&[tag][..], &bytes].concat();
        let mut stream = (payload.len() as u32).to_be_bytes().to_vec();
        stream.extend_from_slice(&payload);
        stream.extend(std::iter::repeat_n(0u8, extra));
        let mut dec = FrameDecoder::new();
        dec.extend(&stream);
        let (msgs, err) = drain::<Control>(&mut dec);
        msgs.iter().for_each(assert_stable);
        // A frame is all or nothing: if the payload did not decode, nothing was taken.
        if msgs.is_empty() && err.is_some() {
            prop_assert_eq!(dec.buffered(), stream.len());
        }
    }

    // (b) Well-formed control messages round-trip, bare and framed.
    #[test]
    fn control_round_trips(msg in control()) {
        let bytes = encoded(&msg);
        prop_assert_eq!(decode::<Control>(&bytes).unwrap(), msg.clone());

        let mut framed = Vec::new();
        encode_frame(&msg, &mut framed).unwrap();
        prop_assert_eq!(&framed[..FRAME_HEADER_LEN], &(bytes.len() as u32).to_be_bytes()[..]);
        prop_assert_eq!(&framed[FRAME_HEADER_LEN..], &bytes[..]);
        let mut dec = FrameDecoder::new();
        dec.extend(&framed);
        prop_assert_eq!(dec.next::<Control>().unwrap(), Some(msg));
        prop_assert_eq!(dec.buffered(), 0);
    }

    // (b) Piece requests and piece headers round-trip.
    #[test]
    fn piece_request_and_header_round_trip(
        req in piece_request(),
        status in piece_status(),
        length in 0..=MAX_PIECE_SIZE,
    ) {
        prop_assert_eq!(decode::<PieceRequest>(&encoded(&req)).unwrap(), req);
        let header = if status == PieceStatus::Ok { PieceHeader::ok(length) } else { PieceHeader::refuse(status) };
        prop_assert_eq!(PieceHeader::decode(header.encode()), Ok(header));
    }

    // (b) Trailing bytes after a valid message are refused, not ignored.
    #[test]
    fn trailing_bytes_are_refused(msg in control(), tail in vec(any::<u8>(), 1..8)) {
        let bytes = [encoded(&msg), tail.clone()].concat();
        prop_assert!(matches!(decode::<Control>(&bytes), Err(DecodeError::Trailing(n)) if n == tail.len()));
    }

    // (c) Mutated valid encodings never panic, bare or framed.
    #[test]
    fn mutated_encodings_never_panic(msg in control(), mutations in vec(mutation(), 1..6)) {
        let mut framed = Vec::new();
        encode_frame(&msg, &mut framed).unwrap();
        let mut payload = framed[FRAME_HEADER_LEN..].to_vec();
        for m in &mutations {
            apply(&mut framed, m);
            apply(&mut payload, m);
        }
        feed_everything(&payload);
        feed_everything(&framed);
    }

    // (d) An announced length over the limit is refused from the header alone, and the decoder
    // does not grow.
    #[test]
    fn oversized_frame_refused_from_header(len in (MAX_MESSAGE_SIZE as u32 + 1)..=u32::MAX) {
        let header = len.to_be_bytes();
        prop_assert!(matches!(payload_len(header), Err(FrameError::TooLarge(n)) if n == len as usize));
        let mut dec = FrameDecoder::new();
        dec.extend(&header);
        prop_assert!(matches!(dec.next::<Control>(), Err(FrameError::TooLarge(n)) if n == len as usize));
        prop_assert_eq!(dec.buffered(), FRAME_HEADER_LEN);
    }

    // (d) Any length up to the limit is accepted and the decoder waits for the payload.
    #[test]
    fn in_limit_frame_waits_for_payload(len in 1..=MAX_MESSAGE_SIZE as u32) {
        prop_assert_eq!(payload_len(len.to_be_bytes()).unwrap(), len as usize);
        let mut dec = FrameDecoder::new();
        dec.extend(&len.to_be_bytes());
        prop_assert!(dec.next::<Control>().unwrap().is_none());
    }

    // (e) A stream of frames split at arbitrary points yields the same messages.
    #[test]
    fn split_stream_yields_same_messages(
        msgs in vec(control(), 1..6),
        cuts in vec(any::<usize>(), 0..12),
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut stream).unwrap();
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (stream.len() + 1)).collect();
        cuts.push(0);
        cuts.push(stream.len());
        cuts.sort_unstable();
        cuts.dedup();

        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        for w in cuts.windows(2) {
            dec.extend(&stream[w[0]..w[1]]);
            let (more, err) = drain::<Control>(&mut dec);
            prop_assert!(err.is_none(), "error on a valid stream: {:?}", err);
            got.extend(more);
        }
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }

    // (e) The same when the reader takes at most one message per chunk it feeds, so undecoded
    // frames pile up behind consumed ones; `buffered` always counts exactly the bytes not taken.
    #[test]
    fn lazy_reader_yields_same_messages(
        msgs in vec(control(), 1..12),
        chunk in 1usize..64,
    ) {
        let mut stream = Vec::new();
        for m in &msgs {
            encode_frame(m, &mut stream).unwrap();
        }
        let mut dec = FrameDecoder::new();
        let mut got = Vec::new();
        let mut taken = 0;
        for piece in stream.chunks(chunk) {
            dec.extend(piece);
            taken += piece.len();
            if let Some(m) = dec.next::<Control>().unwrap() {
                got.push(m);
            }
            let consumed: usize = got.iter().map(framed_len).sum();
            prop_assert_eq!(dec.buffered(), taken - consumed);
        }
        let (rest, err) = drain::<Control>(&mut dec);
        prop_assert!(err.is_none());
        got.extend(rest);
        prop_assert_eq!(got, msgs);
        prop_assert_eq!(dec.buffered(), 0);
    }

    // (f) A bitmap whose word count does not match its length is refused.
    #[test]
    fn bitmap_wrong_word_count_refused(len in 0u32..=1000, delta in 1usize..20, fewer in any::<bool>(), fill in any::<u64>()) {
        let expected = len.div_ceil(64) as usize;
        let count = if fewer && expected >= delta { expected - delta } else { expected + delta };
        prop_assert!(decode::<Bitmap>(&encoded(&(len, vec![fill; count]))).is_err());
        // The right count of empty words is accepted.
        prop_assert_eq!(decode::<Bitmap>(&encoded(&(len, vec![0u64; expected]))).unwrap(), Bitmap::new(len));
    }

    // (f) A bitmap with a bit set past its length is refused.
    #[test]
    fn bitmap_bits_past_len_refused(len in 1u32..=1000, bit in 0u32..64, fill in any::<u64>()) {
        prop_assume!(len % 64 != 0);
        let tail = len % 64;
        let stray = tail + bit % (64 - tail);
        let mut words = vec![fill; len.div_ceil(64) as usize];
        let last = words.len() - 1;
        words[last] = (fill & ((1u64 << tail) - 1)) | (1u64 << stray);
        prop_assert!(decode::<Bitmap>(&encoded(&(len, words.clone()))).is_err());
        // Without the stray bit the same bitmap is accepted.
        words[last] &= !(1u64 << stray);
        let b = decode::<Bitmap>(&encoded(&(len, words))).unwrap();
        prop_assert_eq!(b.len(), len);
    }

    // (f) A bitmap longer than the piece limit is refused even when its words are consistent.
    #[test]
    fn bitmap_over_piece_limit_refused(extra in 1u32..=64) {
        let len = MAX_PIECE_COUNT + extra;
        let words = vec![0u64; len.div_ceil(64) as usize];
        prop_assert!(decode::<Bitmap>(&encoded(&(len, words))).is_err());
    }

    // (f) Bitmap operations agree with a set model, and the result round-trips.
    #[test]
    fn bitmap_agrees_with_set_model(
        len in 0u32..=300,
        ops in vec((0u8..3, any::<u32>()), 0..200),
    ) {
        let mut bitmap = Bitmap::new(len);
        let mut model = BTreeSet::new();
        for (op, raw) in ops {
            // Mostly in range, sometimes just past it.
            let i = raw % (len + 8);
            match op {
                0 => prop_assert_eq!(bitmap.set(i), i < len && model.insert(i)),
                1 => {
                    bitmap.clear(i);
                    model.remove(&i);
                }
                _ => prop_assert_eq!(bitmap.test(i), model.contains(&i)),
            }
        }
        prop_assert_eq!(bitmap.count() as usize, model.len());
        prop_assert_eq!(bitmap.iter_ones().collect::<Vec<_>>(), model.iter().copied().collect::<Vec<_>>());
        prop_assert_eq!(bitmap.is_full(), model.len() == len as usize);
        prop_assert_eq!(bitmap.is_empty(), len == 0);
        prop_assert_eq!(bitmap.len(), len);
        prop_assert_eq!(decode::<Bitmap>(&encoded(&bitmap)).unwrap(), bitmap);
    }

    // (f) A bitmap built from a set has exactly that set.
    #[test]
    fn bitmap_from_set(len in 1u32..=2000, set in btree_set(any::<u32>(), 0..100)) {
        let set: BTreeSet<u32> = set.into_iter().map(|i| i % len).collect();
        let mut b = Bitmap::new(len);
        for &i in &set {
            b.set(i);
        }
        prop_assert_eq!(b.iter_ones().collect::<BTreeSet<_>>(), set.clone());
        prop_assert_eq!(Bitmap::full(len).count(), len);
    }
}
