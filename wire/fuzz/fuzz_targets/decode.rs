//! Every entry point that takes bytes from a peer, fed arbitrary bytes: none may panic, and
//! whatever decodes must survive a re-encode unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;

use d7q_wire::piece::PIECE_HEADER_LEN;
use d7q_wire::{decode, encode, Bitmap, Control, FrameDecoder, PieceHeader, PieceRequest};

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = decode::<Control>(data) {
        let mut out = Vec::new();
        encode(&msg, &mut out).expect("a decoded message re-encodes");
        assert_eq!(decode::<Control>(&out).expect("and decodes again"), msg);
    }
    if let Ok(req) = decode::<PieceRequest>(data) {
        let mut out = Vec::new();
        encode(&req, &mut out).expect("a decoded request re-encodes");
        assert_eq!(
            decode::<PieceRequest>(&out).expect("and decodes again"),
            req
        );
    }
    if let Ok(bitmap) = decode::<Bitmap>(data) {
        assert!(bitmap.iter_ones().all(|i| i < bitmap.len()));
    }
    if let Some(header) = data.get(..PIECE_HEADER_LEN) {
        let header: [u8; PIECE_HEADER_LEN] = header.try_into().expect("sliced to length");
        if let Ok(h) = PieceHeader::decode(header) {
            assert_eq!(h.encode(), header);
        }
    }

    // The frame decoder, fed in two chunks split where the first byte says, so that "need more
    // bytes" paths run as well as whole-buffer ones.
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    let mut dec = FrameDecoder::new();
    for chunk in [&data[..split], &data[split..]] {
        dec.extend(chunk);
        loop {
            match dec.next::<Control>() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
