//! Golden bytes: the wire format of every message, pinned against annotated hex dumps.
//!
//! These tests are the format's specification as much as its guard. If one fails, the encoding of
//! a message changed and nodes of different builds no longer understand each other: fix the code,
//! not the dump. The only legitimate edit is appending a new golden for a new variant.
//!
//! Encoding (bincode 2, `standard()` little-endian varints), read once and used below:
//! - unsigned integers wider than a byte are varints: `0..=250` is one byte; otherwise a marker
//!   (`fb` u16, `fc` u32, `fd` u64) then the value little-endian;
//! - `u8` and fixed arrays (ids, digests) are raw bytes, no length;
//! - strings and vectors are a varint length, then the elements;
//! - `Option` is `00` (None) or `01` then the value;
//! - an enum is its variant index as a varint, then the variant's fields;
//! - a struct is its fields in declaration order, nothing else.

use std::fmt::Debug;
use std::net::{Ipv6Addr, SocketAddr};

use serde::{de::DeserializeOwned, Serialize};

use d7q_wire::frame::{encode_frame, FRAME_HEADER_LEN};
use d7q_wire::piece::{PieceHeaderError, PIECE_HEADER_LEN};
use d7q_wire::*;

const TASK: TaskId = TaskId([
    0xa0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xac, 0xad, 0xae, 0xaf,
]);
const NODE: NodeId = NodeId([
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x0e, 0x0f,
]);
const NODE2: NodeId = NodeId([
    0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1a, 0x1b, 0x1c, 0x1d, 0x1e, 0x1f,
]);

/// Parses an annotated hex dump: `#` starts a comment, whitespace separates tokens, every token
/// is an even number of hex digits.
fn parse_hexdump(dump: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for line in dump.lines() {
        let data = line.split('#').next().unwrap_or("");
        for token in data.split_whitespace() {
            assert!(token.len() % 2 == 0, "odd hex token {token:?}");
            for i in (0..token.len()).step_by(2) {
                out.push(u8::from_str_radix(&token[i..i + 2], 16).expect("hex digit"));
            }
        }
    }
    out
}

fn to_hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Asserts that `msg` encodes to exactly `dump` and that `dump` decodes to exactly `msg`.
fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(msg: &T, dump: &str) {
    let expected = parse_hexdump(dump);
    let mut out = Vec::new();
    encode(msg, &mut out).expect("encodes");
    assert_eq!(to_hex(&out), to_hex(&expected), "encoding of {msg:?}");
    let back: T = decode(&expected).expect("golden bytes decode");
    assert_eq!(&back, msg);
}

fn labels(dc: &str, zone: &str, host: &str) -> Labels {
    Labels {
        dc: dc.into(),
        zone: zone.into(),
        host: host.into(),
    }
}

fn addr_v4() -> SocketAddr {
    "10.0.0.7:65002".parse().unwrap()
}

#[test]
fn hexdump_parser() {
    assert_eq!(
        parse_hexdump("00 ff # comment 11\n a0a1 # x\n"),
        vec![0x00, 0xff, 0xa0, 0xa1]
    );
}

#[test]
fn hello() {
    let msg = Control::Hello(Hello {
        major: 1,
        minor: 0,
        node_id: NODE,
        labels: labels("dc1", "z1", "h"),
        upload_addr: Some(addr_v4()),
        capabilities: Capabilities(Capabilities::SEED | Capabilities::UPLOAD),
    });
    check(
        &msg,
        r"
        00                                              # Control::Hello
        01                                              # major: 1
        00                                              # minor: 0
        00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f # node_id: 16 raw bytes
        03 64 63 31                                     # labels.dc: len 3, 'dc1'
        02 7a 31                                        # labels.zone: len 2, 'z1'
        01 68                                           # labels.host: len 1, 'h'
        01                                              # upload_addr: Some
        00                                              #   SocketAddr::V4
        0a 00 00 07                                     #   ip 10.0.0.7
        fb ea fd                                        #   port 65002: u16 marker, LE
        03                                              # capabilities: SEED | UPLOAD
        ",
    );
}

#[test]
fn hello_without_upload_addr() {
    let msg = Control::Hello(Hello {
        major: 1,
        minor: 0,
        node_id: NODE,
        labels: Labels::default(),
        upload_addr: None,
        capabilities: Capabilities(0),
    });
    check(
        &msg,
        r"
        00                                              # Control::Hello
        01                                              # major: 1
        00                                              # minor: 0
        00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f # node_id
        00 00 00                                        # labels: three empty strings
        00                                              # upload_addr: None
        00                                              # capabilities: none
        ",
    );
}

#[test]
fn hello_ack() {
    let msg = Control::HelloAck(HelloAck {
        major: 1,
        minor: 7,
        node_id: NODE2,
        labels: labels("dc2", "", ""),
        // Unknown capability bits travel untouched.
        capabilities: Capabilities(1 << 40 | Capabilities::UPLOAD),
    });
    check(
        &msg,
        r"
        01                                              # Control::HelloAck
        01                                              # major: 1
        07                                              # minor: 7
        10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f # node_id
        03 64 63 32                                     # labels.dc: 'dc2'
        00                                              # labels.zone: ''
        00                                              # labels.host: ''
        fd 02 00 00 00 00 01 00 00                      # capabilities: u64 marker, 1<<40 | UPLOAD
        ",
    );
}

#[test]
fn register() {
    let msg = Control::Register(Register {
        task: TASK,
        url: "http://o/b".into(),
        headers: vec![("a".into(), "b".into())],
        digest: Some([0x5a; 32]),
        range: Some(ByteRange { start: 0, end: 300 }),
    });
    check(
        &msg,
        r"
        02                                              # Control::Register
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task: 16 raw bytes
        0a 68 74 74 70 3a 2f 2f 6f 2f 62                # url: len 10, 'http://o/b'
        01                                              # headers: 1 pair
        01 61 01 62                                     #   ('a', 'b')
        01                                              # digest: Some
        5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a #   sha-256, 32 raw bytes
        5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a 5a
        01                                              # range: Some
        00                                              #   start: 0
        fb 2c 01                                        #   end: 300
        ",
    );
}

#[test]
fn register_minimal() {
    let msg = Control::Register(Register {
        task: TASK,
        url: String::new(),
        headers: vec![],
        digest: None,
        range: None,
    });
    check(
        &msg,
        r"
        02                                              # Control::Register
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        00                                              # url: ''
        00                                              # headers: none
        00                                              # digest: None
        00                                              # range: None
        ",
    );
}

#[test]
fn task_meta() {
    let msg = Control::TaskMeta(TaskMeta {
        task: TASK,
        length: 5_000_000_000,
        piece_size: 4 << 20,
        piece_count: 1193,
    });
    check(
        &msg,
        r"
        03                                              # Control::TaskMeta
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        fd 00 f2 05 2a 01 00 00 00                      # length: u64 marker, 5_000_000_000
        fc 00 00 40 00                                  # piece_size: u32 marker, 4 MiB
        fb a9 04                                        # piece_count: u16 marker, 1193
        ",
    );
}

#[test]
fn piece_digests() {
    let msg = Control::PieceDigests(PieceDigests {
        task: TASK,
        first: 250,
        digests: vec![[0x11; 32], [0x22; 32]],
    });
    check(
        &msg,
        r"
        04                                              # Control::PieceDigests
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        fa                                              # first: 250, the largest one-byte varint
        02                                              # digests: 2
        11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 #   digest of piece 250
        11 11 11 11 11 11 11 11 11 11 11 11 11 11 11 11
        22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 #   digest of piece 251
        22 22 22 22 22 22 22 22 22 22 22 22 22 22 22 22
        ",
    );
}

#[test]
fn parents() {
    let msg = Control::Parents(Parents {
        task: TASK,
        parents: vec![
            PeerInfo {
                node_id: NODE,
                addr: addr_v4(),
                labels: labels("dc1", "z1", "h"),
            },
            PeerInfo {
                node_id: NODE2,
                addr: SocketAddr::new(Ipv6Addr::LOCALHOST.into(), 8002),
                labels: labels("dc2", "", ""),
            },
        ],
    });
    check(
        &msg,
        r"
        05                                              # Control::Parents
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        02                                              # parents: 2
        00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f #   [0].node_id
        00                                              #   [0].addr: SocketAddr::V4
        0a 00 00 07                                     #     ip 10.0.0.7
        fb ea fd                                        #     port 65002
        03 64 63 31 02 7a 31 01 68                      #   [0].labels: 'dc1' 'z1' 'h'
        10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f #   [1].node_id
        01                                              #   [1].addr: SocketAddr::V6
        00 00 00 00 00 00 00 00 00 00 00 00 00 00 00 01 #     ip ::1
        fb 42 1f                                        #     port 8002
        03 64 63 32 00 00                               #   [1].labels: 'dc2' '' ''
        ",
    );
}

#[test]
fn have() {
    let msg = Control::Have(Have {
        task: TASK,
        pieces: vec![0, 250, 251, 65536],
    });
    check(
        &msg,
        r"
        06                                              # Control::Have
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        04                                              # pieces: 4
        00                                              #   0
        fa                                              #   250
        fb fb 00                                        #   251: the first two-byte value
        fc 00 00 01 00                                  #   65536: the first four-byte value
        ",
    );
}

#[test]
fn bitmap() {
    let mut bitmap = Bitmap::new(70);
    for i in [0, 63, 69] {
        bitmap.set(i);
    }
    let msg = Control::Bitmap(BitmapUpdate { task: TASK, bitmap });
    check(
        &msg,
        r"
        07                                              # Control::Bitmap
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        46                                              # bitmap.len: 70 pieces
        02                                              # bitmap.words: 2
        fd 01 00 00 00 00 00 00 80                      #   pieces 0 and 63 (bit i = piece i)
        20                                              #   piece 69 (bit 5 of word 1)
        ",
    );
}

#[test]
fn task_complete() {
    let msg = Control::TaskComplete(TaskComplete {
        task: TASK,
        length: 1024,
        sha256: [0x33; 32],
    });
    check(
        &msg,
        r"
        08                                              # Control::TaskComplete
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        fb 00 04                                        # length: 1024
        33 33 33 33 33 33 33 33 33 33 33 33 33 33 33 33 # sha256
        33 33 33 33 33 33 33 33 33 33 33 33 33 33 33 33
        ",
    );
}

#[test]
fn error() {
    let msg = Control::Error(ErrorMsg {
        task: Some(TASK),
        code: ErrorCode::OriginStatus,
        origin_status: Some(404),
        message: "not found".into(),
    });
    check(
        &msg,
        r"
        09                                              # Control::Error
        01                                              # task: Some
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af #   the task
        03                                              # code: ErrorCode::OriginStatus
        01 fb 94 01                                     # origin_status: Some(404)
        09 6e 6f 74 20 66 6f 75 6e 64                   # message: 'not found'
        ",
    );
}

#[test]
fn error_about_the_connection() {
    let msg = Control::Error(ErrorMsg {
        task: None,
        code: ErrorCode::ShuttingDown,
        origin_status: None,
        message: String::new(),
    });
    check(
        &msg,
        r"
        09                                              # Control::Error
        00                                              # task: None
        0c                                              # code: ErrorCode::ShuttingDown
        00                                              # origin_status: None
        00                                              # message: ''
        ",
    );
}

#[test]
fn bad_peer() {
    let msg = Control::BadPeer(BadPeerReport {
        task: TASK,
        peer: NODE2,
        reason: BadPeerReason::Slow,
    });
    check(
        &msg,
        r"
        0a                                              # Control::BadPeer
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f # peer
        03                                              # reason: BadPeerReason::Slow
        ",
    );
}

#[test]
fn goodbye() {
    let msg = Control::Goodbye(Goodbye {
        reason: "bye".into(),
    });
    check(
        &msg,
        r"
        0b                                              # Control::Goodbye
        03 62 79 65                                     # reason: 'bye'
        ",
    );
}

#[test]
fn announce() {
    let mut bitmap = Bitmap::new(3);
    bitmap.set(0);
    bitmap.set(2);
    let msg = Control::Announce(BitmapUpdate { task: TASK, bitmap });
    check(
        &msg,
        r"
        0c                                              # Control::Announce
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task
        03                                              # bitmap.len: 3 pieces
        01                                              # bitmap.words: 1 word
        05                                              #   0b101: pieces 0 and 2
        ",
    );
}

#[test]
fn piece_request() {
    let msg = PieceRequest {
        task: TASK,
        index: 70_000,
    };
    check(
        &msg,
        r"
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af # task (a struct, no variant index)
        fc 70 11 01 00                                  # index: 70000
        ",
    );
}

#[test]
fn framed_stream() {
    let mut out = Vec::new();
    encode_frame(
        &Control::Goodbye(Goodbye {
            reason: "bye".into(),
        }),
        &mut out,
    )
    .unwrap();
    encode_frame(
        &PieceRequest {
            task: TASK,
            index: 7,
        },
        &mut out,
    )
    .unwrap();
    let expected = parse_hexdump(
        r"
        00 00 00 05                                     # frame 1: payload length 5, big-endian
        0b 03 62 79 65                                  #   Control::Goodbye { reason: 'bye' }
        00 00 00 11                                     # frame 2: payload length 17
        a0 a1 a2 a3 a4 a5 a6 a7 a8 a9 aa ab ac ad ae af #   PieceRequest.task
        07                                              #   PieceRequest.index: 7
        ",
    );
    assert_eq!(to_hex(&out), to_hex(&expected));

    let mut dec = FrameDecoder::new();
    dec.extend(&expected);
    let first: Control = dec.next().unwrap().unwrap();
    assert_eq!(
        first,
        Control::Goodbye(Goodbye {
            reason: "bye".into()
        })
    );
    assert_eq!(dec.buffered(), FRAME_HEADER_LEN + 17);
    let second: PieceRequest = dec.next().unwrap().unwrap();
    assert_eq!(
        second,
        PieceRequest {
            task: TASK,
            index: 7
        }
    );
    assert_eq!(dec.buffered(), 0);
    assert!(dec.next::<Control>().unwrap().is_none());
}

#[test]
fn frame_length_is_big_endian_and_wider_than_a_byte() {
    // A 300-byte payload: the prefix is 00 00 01 2c, whatever the codec's own endianness.
    let msg = Control::Goodbye(Goodbye {
        reason: "x".repeat(296),
    });
    let mut out = Vec::new();
    encode_frame(&msg, &mut out).unwrap();
    assert_eq!(out.len(), FRAME_HEADER_LEN + 300);
    assert_eq!(
        to_hex(&out[..8]),
        to_hex(&parse_hexdump(
            "00 00 01 2c  # payload length 300\n 0b  # Goodbye\n fb 28 01  # len 296"
        ))
    );
}

#[test]
fn piece_header() {
    let cases = [
        (
            PieceHeader::ok(4 << 20),
            r"
            00                                          # status: Ok
            00 00 00                                    # reserved, zero
            00 40 00 00                                 # length: 4 MiB, u32 big-endian
            ",
        ),
        (
            PieceHeader::ok(0),
            r"
            00 000000 00000000                          # Ok, an empty piece
            ",
        ),
        (
            PieceHeader::refuse(PieceStatus::Busy),
            r"
            03                                          # status: Busy
            00 00 00                                    # reserved
            00 00 00 00                                 # length: 0, nothing follows
            ",
        ),
    ];
    for (header, dump) in cases {
        let expected: [u8; PIECE_HEADER_LEN] = parse_hexdump(dump).try_into().unwrap();
        assert_eq!(header.encode(), expected, "{header:?}");
        assert_eq!(PieceHeader::decode(expected), Ok(header));
    }
}

// Append-only discipline: each variant keeps the index it has today. A new variant goes at the
// end of its enum and of the table below; reordering or inserting fails here.

#[test]
fn control_variant_indices() {
    let variants: [(u8, Control); 13] = [
        (
            0,
            Control::Hello(Hello {
                major: 1,
                minor: 0,
                node_id: NODE,
                labels: Labels::default(),
                upload_addr: None,
                capabilities: Capabilities(0),
            }),
        ),
        (
            1,
            Control::HelloAck(HelloAck {
                major: 1,
                minor: 0,
                node_id: NODE,
                labels: Labels::default(),
                capabilities: Capabilities(0),
            }),
        ),
        (
            2,
            Control::Register(Register {
                task: TASK,
                url: String::new(),
                headers: vec![],
                digest: None,
                range: None,
            }),
        ),
        (
            3,
            Control::TaskMeta(TaskMeta {
                task: TASK,
                length: 0,
                piece_size: 0,
                piece_count: 0,
            }),
        ),
        (
            4,
            Control::PieceDigests(PieceDigests {
                task: TASK,
                first: 0,
                digests: vec![],
            }),
        ),
        (
            5,
            Control::Parents(Parents {
                task: TASK,
                parents: vec![],
            }),
        ),
        (
            6,
            Control::Have(Have {
                task: TASK,
                pieces: vec![],
            }),
        ),
        (
            7,
            Control::Bitmap(BitmapUpdate {
                task: TASK,
                bitmap: Bitmap::new(0),
            }),
        ),
        (
            8,
            Control::TaskComplete(TaskComplete {
                task: TASK,
                length: 0,
                sha256: [0; 32],
            }),
        ),
        (
            9,
            Control::Error(ErrorMsg {
                task: None,
                code: ErrorCode::Internal,
                origin_status: None,
                message: String::new(),
            }),
        ),
        (
            10,
            Control::BadPeer(BadPeerReport {
                task: TASK,
                peer: NODE,
                reason: BadPeerReason::Timeout,
            }),
        ),
        (
            11,
            Control::Goodbye(Goodbye {
                reason: String::new(),
            }),
        ),
        (
            12,
            Control::Announce(BitmapUpdate {
                task: TASK,
                bitmap: Bitmap::new(0),
            }),
        ),
    ];
    for (index, msg) in &variants {
        let mut out = Vec::new();
        encode(msg, &mut out).unwrap();
        assert_eq!(out[0], *index, "variant index of {msg:?}");
        let back: Control = decode(&out).unwrap();
        assert_eq!(&back, msg);
    }
    // The first unused index is refused, whatever follows it.
    for tail in [&[][..], &[0u8; 64][..]] {
        let bytes: Vec<u8> = [&[variants.len() as u8][..], tail].concat();
        assert!(matches!(
            decode::<Control>(&bytes),
            Err(DecodeError::Malformed(_))
        ));
    }
}

#[test]
fn error_code_indices() {
    let codes = [
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
    ];
    for (index, code) in codes.iter().enumerate() {
        let mut out = Vec::new();
        encode(code, &mut out).unwrap();
        assert_eq!(out, [index as u8], "index of {code:?}");
        assert_eq!(decode::<ErrorCode>(&out).unwrap(), *code);
    }
    // Appending a code means appending it to the table above; an unknown code is refused.
    assert!(matches!(
        decode::<ErrorCode>(&[codes.len() as u8]),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn bad_peer_reason_indices() {
    let reasons = [
        BadPeerReason::DigestMismatch,
        BadPeerReason::Timeout,
        BadPeerReason::Refused,
        BadPeerReason::Slow,
    ];
    for (index, reason) in reasons.iter().enumerate() {
        let mut out = Vec::new();
        encode(reason, &mut out).unwrap();
        assert_eq!(out, [index as u8], "index of {reason:?}");
        assert_eq!(decode::<BadPeerReason>(&out).unwrap(), *reason);
    }
    assert!(matches!(
        decode::<BadPeerReason>(&[reasons.len() as u8]),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn piece_status_values() {
    let statuses = [
        PieceStatus::Ok,
        PieceStatus::NotAvailable,
        PieceStatus::UnknownTask,
        PieceStatus::Busy,
        PieceStatus::BadRequest,
        PieceStatus::Internal,
        PieceStatus::Saturated,
    ];
    for (value, status) in statuses.iter().enumerate() {
        let header = PieceHeader::refuse(*status);
        assert_eq!(
            header.encode(),
            [value as u8, 0, 0, 0, 0, 0, 0, 0],
            "value of {status:?}"
        );
        assert_eq!(PieceHeader::decode(header.encode()), Ok(header));
    }
    let unknown = statuses.len() as u8;
    assert_eq!(
        PieceHeader::decode([unknown, 0, 0, 0, 0, 0, 0, 0]),
        Err(PieceHeaderError::UnknownStatus(unknown))
    );
}
