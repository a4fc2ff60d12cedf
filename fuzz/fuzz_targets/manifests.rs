//! See `d7q::fuzzing::manifests`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| d7q::fuzzing::manifests(data));
