//! See `d7q::fuzzing::image_refs`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| d7q::fuzzing::image_refs(data));
