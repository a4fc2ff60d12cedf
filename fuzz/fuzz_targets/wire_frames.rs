//! See `d7q::fuzzing::wire_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| d7q::fuzzing::wire_frames(data));
