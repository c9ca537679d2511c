//! Shadow messages through the shadow adapter's state machine. See fuzz/src/lib.rs for what is checked.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| twinbus_fuzz::delta(data));
