//! A whole PEFT adapter from memory: `adapter_config.json | SEP | adapter_model.safetensors`.
//! Covers PEFT key mapping (`split_key` on every tensor name), lora_A/lora_B pairing, per-module
//! r/alpha from the patterns, shape and dtype agreement, and rankfuse's own metadata. A loaded
//! adapter's every module then runs once through the fused linear (its A/B views must be
//! readable end to end).
#![no_main]
use libfuzzer_sys::fuzz_target;
use rankfuse::adapter::peft::{self, PeftConfig};
use rankfuse::{DType, LinearProblem, Matrix, Status, Weights};
use rankfuse_fuzz::{check_error, runtime, split};
use std::path::Path;
use std::sync::Arc;

const SEP: &[u8] = b"\n#WEIGHTS#\n";

fuzz_target!(|data: &[u8]| {
    let parts = split(data, SEP, 2);
    if let Ok(k) = std::str::from_utf8(parts[0]) {
        match peft::split_key(k) {
            Ok((m, w)) => assert!(!m.is_empty() && (w == 'A' || w == 'B')),
            Err(e) => check_error(&e, &[Status::Unsupported], None),
        }
    }
    let Some(wbytes) = parts.get(1) else { return };
    let Ok(cfg) = PeftConfig::parse(Path::new("adapter_config.json"), parts[0]) else {
        return;
    };
    let weights = match Weights::from_bytes("adapter_model.safetensors", wbytes.to_vec()) {
        Ok(w) => Arc::new(w),
        Err(e) => {
            check_error(&e, &[Status::Format], Some("adapter_model.safetensors"));
            return;
        }
    };
    let adapter = match peft::from_parts("fuzz", cfg, weights) {
        Ok(a) => a,
        Err(e) => {
            check_error(
                &e,
                &[
                    Status::Format,
                    Status::Unsupported,
                    Status::Shape,
                    Status::DType,
                    Status::InvalidArgument,
                ],
                None,
            );
            return;
        }
    };
    assert!(!adapter.is_empty());
    for l in adapter.modules() {
        assert!(l.capacity >= 1 && l.rank() == l.capacity);
        let (k, n) = (l.in_features, l.out_features);
        if k.saturating_mul(n) > 1 << 16 {
            continue;
        }
        let x = Matrix::from_f32(DType::F32, 2, k, &vec![1.0; 2 * k]).unwrap();
        let w = Matrix::zeros(DType::F32, n, k).unwrap();
        let mut y = Matrix::zeros(DType::F32, 2, n).unwrap();
        let slots = [Some(
            rankfuse::runtime::slot(l, 0, 1.0).expect("own rank resolves"),
        )];
        let p = LinearProblem {
            x: x.view(),
            w: w.view(),
            bias: None,
            slots: &slots,
            row_slot: None,
        };
        runtime()
            .linear(&p, &mut y.view_mut())
            .expect("shapes of a loaded module agree");
    }
});
