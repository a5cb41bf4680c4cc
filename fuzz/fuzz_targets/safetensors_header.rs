//! A single safetensors file from arbitrary bytes: header length, JSON header, tensor table
//! (dtypes, shapes, offsets). Loads must succeed with readable views or fail with FORMAT naming
//! the file.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rankfuse::{Status, Weights};
use rankfuse_fuzz::{check_error, touch_weights};

fuzz_target!(|data: &[u8]| {
    match Weights::from_bytes("fuzz.safetensors", data.to_vec()) {
        Ok(w) => touch_weights(&w),
        Err(e) => check_error(&e, &[Status::Format], Some("fuzz.safetensors")),
    }
});
