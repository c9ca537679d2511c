//! One point described by the bytes, then values written to it. See fuzz/src/lib.rs for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbus_fuzz::write(data));
