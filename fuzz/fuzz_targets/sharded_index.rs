//! A sharded model from memory: `index JSON | SEP | shard s0.safetensors | SEP | s1... ` (at
//! most 3 shards). Exercises the index's weight_map checks (file names beside the index, string
//! values), tensors looked up in the shard the index names, and each shard's own validation.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rankfuse::{Status, Weights};
use rankfuse_fuzz::{check_error, split, touch_weights};

pub const SEP: &[u8] = b"\n#SHARD#\n";
const NAMES: [&str; 3] = ["s0.safetensors", "s1.safetensors", "s2.safetensors"];

fuzz_target!(|data: &[u8]| {
    let parts = split(data, SEP, 4);
    let shards: Vec<(&str, &[u8])> = parts[1..].iter().zip(NAMES).map(|(b, n)| (n, *b)).collect();
    match Weights::from_index_bytes("fuzz.safetensors.index.json", parts[0], &shards) {
        Ok(w) => touch_weights(&w),
        // Errors about a shard name the shard, not the index.
        Err(e) => check_error(&e, &[Status::Format, Status::NotFound], None),
    }
});
