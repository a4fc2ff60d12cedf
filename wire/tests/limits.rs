//! The size limits: where they bite, and that the ones documented as "always fits" do fit.

use d7q_wire::frame::{encode_frame, FRAME_HEADER_LEN};
use d7q_wire::*;

const TASK: TaskId = TaskId([7; 16]);

/// A `Goodbye` whose encoding is exactly `size` bytes: variant (1) + u32-marked length (5) +
/// the string.
fn goodbye_of_encoded_size(size: usize) -> Control {
    assert!(
        size - 6 > u16::MAX as usize,
        "the length must take the u32 varint form"
    );
    Control::Goodbye(Goodbye {
        reason: "x".repeat(size - 6),
    })
}

#[test]
fn message_of_exactly_the_limit_round_trips() {
    let msg = goodbye_of_encoded_size(MAX_MESSAGE_SIZE);
    let mut bytes = Vec::new();
    encode(&msg, &mut bytes).unwrap();
    assert_eq!(bytes.len(), MAX_MESSAGE_SIZE);
    assert_eq!(decode::<Control>(&bytes).unwrap(), msg);

    let mut framed = Vec::new();
    encode_frame(&msg, &mut framed).unwrap();
    assert_eq!(
        framed[..FRAME_HEADER_LEN],
        (MAX_MESSAGE_SIZE as u32).to_be_bytes()
    );
    let mut dec = FrameDecoder::new();
    dec.extend(&framed[..framed.len() - 1]);
    assert!(
        dec.next::<Control>().unwrap().is_none(),
        "one byte short: wait"
    );
    dec.extend(&framed[framed.len() - 1..]);
    assert_eq!(dec.next::<Control>().unwrap(), Some(msg));
}

/// Messages at the wire limit made of the smallest fields decode too: the codec's allocation
/// budget must not be a second, tighter, size limit (bincode charges a one-byte varint as the
/// integer's full width).
#[test]
fn dense_messages_at_the_limit_round_trip() {
    // Have: variant (1) + task (16) + u32-marked count (5) + one byte per piece index 0.
    let have = Control::Have(Have {
        task: TASK,
        pieces: vec![0; MAX_MESSAGE_SIZE - 22],
    });
    // Register: variant (1) + task (16) + url 'x' (2) + u32-marked count (5) + two bytes per
    // empty header pair + digest None (1) + range None (1). Each empty string costs the codec 8.
    let register = Control::Register(Register {
        task: TASK,
        url: "x".into(),
        headers: vec![(String::new(), String::new()); (MAX_MESSAGE_SIZE - 26) / 2],
        digest: None,
        range: None,
    });
    for msg in [have, register] {
        let mut bytes = Vec::new();
        encode(&msg, &mut bytes).unwrap();
        assert_eq!(bytes.len(), MAX_MESSAGE_SIZE);
        assert_eq!(decode::<Control>(&bytes).unwrap(), msg);
    }
}

#[test]
fn message_over_the_limit_is_not_encoded_and_leaves_the_buffer_alone() {
    let msg = goodbye_of_encoded_size(MAX_MESSAGE_SIZE + 1);
    let mut out = b"prefix".to_vec();
    assert!(
        matches!(encode(&msg, &mut out), Err(EncodeError::TooLarge(n)) if n == MAX_MESSAGE_SIZE + 1)
    );
    assert_eq!(out, b"prefix");
    assert!(matches!(
        encode_frame(&msg, &mut out),
        Err(FrameError::Encode(EncodeError::TooLarge(n))) if n == MAX_MESSAGE_SIZE + 1
    ));
    assert_eq!(out, b"prefix");
}

#[test]
fn message_over_the_limit_is_not_decoded() {
    // Built by hand, since encode refuses it: the receiving side must refuse it as well.
    let reason_len = (MAX_MESSAGE_SIZE + 1 - 6) as u32;
    let mut bytes = vec![0x0b, 0xfc];
    bytes.extend_from_slice(&reason_len.to_le_bytes());
    bytes.resize(MAX_MESSAGE_SIZE + 1, b'x');
    assert!(
        matches!(decode::<Control>(&bytes), Err(DecodeError::TooLarge(n)) if n == MAX_MESSAGE_SIZE + 1)
    );
}

#[test]
fn encode_appends() {
    let mut out = vec![0xee];
    encode(
        &PieceRequest {
            task: TASK,
            index: 1,
        },
        &mut out,
    )
    .unwrap();
    encode_frame(
        &PieceRequest {
            task: TASK,
            index: 2,
        },
        &mut out,
    )
    .unwrap();
    assert_eq!(out[0], 0xee);
    assert_eq!(decode::<PieceRequest>(&out[1..18]).unwrap().index, 1);
    let mut dec = FrameDecoder::new();
    dec.extend(&out[18..]);
    assert_eq!(dec.next::<PieceRequest>().unwrap().unwrap().index, 2);
}

#[test]
fn lengths_claimed_beyond_the_bytes_are_refused() {
    let cases: [(&str, &[u8]); 6] = [
        (
            "string of u64::MAX bytes",
            &[0x0b, 0xfd, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
        ),
        (
            "string of the limit, 2 bytes present",
            &[0x0b, 0xfc, 0x00, 0x00, 0x10, 0x00, b'a', b'b'],
        ),
        ("string of 1 GiB", &[0x0b, 0xfc, 0x00, 0x00, 0x00, 0x40]),
        (
            "vector of u64::MAX pieces",
            &[
                0x06, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 0xfd, 0xff, 0xff, 0xff, 0xff,
                0xff, 0xff, 0xff, 0xff,
            ],
        ),
        (
            "u16 with a u32 marker",
            &[0x01, 0xfc, 0x01, 0x00, 0x00, 0x00],
        ),
        ("reserved varint marker", &[0xff]),
    ];
    for (what, bytes) in cases {
        assert!(
            matches!(decode::<Control>(bytes), Err(DecodeError::Malformed(_))),
            "{what}"
        );
    }
}

#[test]
fn invalid_utf8_and_bad_option_tags_are_refused() {
    assert!(matches!(
        decode::<Control>(&[0x0b, 0x02, 0xc3, 0x28]),
        Err(DecodeError::Malformed(_))
    ));
    // Error { task: tag 2 } — an Option tag is 0 or 1.
    assert!(matches!(
        decode::<Control>(&[0x09, 0x02]),
        Err(DecodeError::Malformed(_))
    ));
    // Hello with SocketAddr variant 2.
    let mut hello = vec![0x00, 0x01, 0x00];
    hello.extend_from_slice(&[0; 16]);
    hello.extend_from_slice(&[0, 0, 0, 0x01, 0x02]);
    assert!(matches!(
        decode::<Control>(&hello),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn empty_input_is_refused() {
    assert!(matches!(
        decode::<Control>(&[]),
        Err(DecodeError::Malformed(_))
    ));
    assert!(matches!(
        decode::<PieceRequest>(&[]),
        Err(DecodeError::Malformed(_))
    ));
    let mut dec = FrameDecoder::new();
    assert!(dec.next::<Control>().unwrap().is_none());
    dec.extend(&[0, 0, 0, 0]);
    assert!(matches!(
        dec.next::<Control>(),
        Err(FrameError::Decode(DecodeError::Malformed(_)))
    ));
}

#[test]
fn frame_refused_on_header_alone() {
    let mut dec = FrameDecoder::new();
    dec.extend(&((MAX_MESSAGE_SIZE + 1) as u32).to_be_bytes());
    assert!(
        matches!(dec.next::<Control>(), Err(FrameError::TooLarge(n)) if n == MAX_MESSAGE_SIZE + 1)
    );
    dec.extend(&u32::MAX.to_be_bytes());
    assert!(
        matches!(dec.next::<Control>(), Err(FrameError::TooLarge(_))),
        "stays refused"
    );
}

// The worst cases of messages documented to fit a frame, each with the widest varints.

#[test]
fn most_digests_per_message_fit_a_frame() {
    let msg = Control::PieceDigests(PieceDigests {
        task: TASK,
        first: u32::MAX,
        digests: vec![[0xff; 32]; MAX_DIGESTS_PER_MESSAGE],
    });
    let mut out = Vec::new();
    encode_frame(&msg, &mut out).expect("MAX_DIGESTS_PER_MESSAGE digests fit a frame");
    let mut dec = FrameDecoder::new();
    dec.extend(&out);
    assert_eq!(dec.next::<Control>().unwrap(), Some(msg));
}

#[test]
fn full_bitmap_and_have_of_every_piece_fit_a_frame() {
    let bitmap = Control::Bitmap(BitmapUpdate {
        task: TASK,
        bitmap: Bitmap::full(MAX_PIECE_COUNT),
    });
    let have = Control::Have(Have {
        task: TASK,
        pieces: (u32::MAX - MAX_PIECE_COUNT..u32::MAX).collect(),
    });
    for msg in [bitmap, have] {
        let mut out = Vec::new();
        encode_frame(&msg, &mut out).expect("fits a frame");
        let mut dec = FrameDecoder::new();
        dec.extend(&out);
        assert_eq!(dec.next::<Control>().unwrap(), Some(msg));
    }
}

#[test]
fn largest_piece_header_is_accepted_and_one_more_is_not() {
    use d7q_wire::piece::PieceHeaderError;
    let h = PieceHeader::ok(MAX_PIECE_SIZE);
    assert_eq!(PieceHeader::decode(h.encode()), Ok(h));
    let over = PieceHeader::ok(MAX_PIECE_SIZE + 1).encode();
    assert_eq!(
        PieceHeader::decode(over),
        Err(PieceHeaderError::TooLarge(MAX_PIECE_SIZE + 1))
    );
}

// Piece indices and counts: every one a receiver may index a table by is bounded by
// MAX_PIECE_COUNT in decode_checked, so no message can make it overflow or allocate.

fn checked(msg: &Control) -> Result<Control, DecodeError> {
    let mut bytes = Vec::new();
    encode(msg, &mut bytes).unwrap();
    decode_checked::<Control>(&bytes)
}

#[track_caller]
fn refused(msg: &Control, field: &str) {
    match checked(msg) {
        Err(DecodeError::Malformed(e)) => assert!(e.contains(field), "{field}: {e}"),
        other => panic!("{field}: accepted or wrong error: {other:?}"),
    }
}

fn digests(first: u32, count: usize) -> Control {
    Control::PieceDigests(PieceDigests {
        task: TASK,
        first,
        digests: vec![[0xab; 32]; count],
    })
}

#[test]
fn piece_digests_past_the_largest_task_are_refused() {
    // A peer posing as an upstream: an index that overflows u32 when the count is added.
    refused(&digests(u32::MAX, 2), "piece digests end");
    refused(&digests(u32::MAX - 1, 1), "piece digests end");
    refused(&digests(MAX_PIECE_COUNT, 1), "piece digests end");
    refused(
        &digests(MAX_PIECE_COUNT - 2, 3),
        "piece digests end (first + count)",
    );
    // The last pieces of the largest task are fine, and so is an empty list at its end.
    let last = digests(MAX_PIECE_COUNT - 3, 3);
    assert_eq!(checked(&last).unwrap(), last);
    let empty = digests(MAX_PIECE_COUNT, 0);
    assert_eq!(checked(&empty).unwrap(), empty);
}

#[test]
fn have_indices_and_task_meta_counts_are_bounded() {
    let have = |pieces: Vec<u32>| Control::Have(Have { task: TASK, pieces });
    refused(&have(vec![0, MAX_PIECE_COUNT]), "have index");
    refused(&have(vec![u32::MAX]), "have index");
    let ok = have(vec![0, MAX_PIECE_COUNT - 1]);
    assert_eq!(checked(&ok).unwrap(), ok);

    let meta = |piece_size, piece_count| {
        Control::TaskMeta(TaskMeta {
            task: TASK,
            length: 1,
            piece_size,
            piece_count,
        })
    };
    refused(&meta(1 << 20, MAX_PIECE_COUNT + 1), "piece count");
    refused(&meta(1 << 20, u32::MAX), "piece count");
    refused(&meta(MAX_PIECE_SIZE + 1, 1), "piece size");
    let ok = meta(MAX_PIECE_SIZE, MAX_PIECE_COUNT);
    assert_eq!(checked(&ok).unwrap(), ok);

    let req = |index| PieceRequest { task: TASK, index };
    let mut bytes = Vec::new();
    encode(&req(u32::MAX), &mut bytes).unwrap();
    let err = decode_checked::<PieceRequest>(&bytes).unwrap_err();
    assert!(err.to_string().contains("piece index"), "{err}");
    bytes.clear();
    encode(&req(MAX_PIECE_COUNT - 1), &mut bytes).unwrap();
    assert_eq!(
        decode_checked::<PieceRequest>(&bytes).unwrap().index,
        MAX_PIECE_COUNT - 1
    );
}
