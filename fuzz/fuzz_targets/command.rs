//! A command payload: parse, check against the points, encode, answer. See fuzz/src/lib.rs for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbus_fuzz::command(data));
