//! See `d7q::fuzzing::proxy_paths`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| d7q::fuzzing::proxy_paths(data));
