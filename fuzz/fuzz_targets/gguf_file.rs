//! A GGUF file from arbitrary bytes (the magic is prepended when missing, so every input
//! exercises the GGUF reader): header, typed metadata (nested arrays), tensor table. Loads must
//! succeed with readable views and metadata, or fail with FORMAT naming the file. Quantized
//! tensors that load also go through the fused linear's decode and GEMM paths.
#![no_main]
use libfuzzer_sys::fuzz_target;
use rankfuse::{DType, LinearProblem, Matrix, Status, Weights};
use rankfuse_fuzz::{check_error, runtime, touch_weights};

fuzz_target!(|data: &[u8]| {
    let bytes = if data.starts_with(b"GGUF") {
        data.to_vec()
    } else {
        [b"GGUF".as_slice(), data].concat()
    };
    let w = match Weights::from_bytes("fuzz.gguf", bytes) {
        Ok(w) => w,
        Err(e) => {
            return check_error(
                &e,
                &[Status::Format, Status::OutOfMemory],
                Some("fuzz.gguf"),
            )
        }
    };
    touch_weights(&w);
    for (k, v) in w.meta() {
        assert!(!k.contains('\0'), "key with NUL accepted");
        std::hint::black_box((v.as_u64(), v.as_i64(), v.as_f64(), v.as_bytes()));
    }
    for t in w.entries() {
        let Ok(wv) = w.get(&t.name) else { continue };
        // Small problems only: the fuzzer's time goes to parsing. Each side is bounded on its
        // own: a 0 x 2^60 tensor holds no bytes (valid) but x would need 2^60 columns.
        if !wv.dtype.is_quantized()
            || wv.rows > 1 << 16
            || wv.cols > 1 << 16
            || wv.rows * wv.cols > 1 << 16
        {
            continue;
        }
        for m in [1, 9] {
            let x = Matrix::from_f32(DType::F32, m, wv.cols, &vec![0.5; m * wv.cols]).unwrap();
            let mut y = Matrix::zeros(DType::F32, m, wv.rows).unwrap();
            let p = LinearProblem {
                x: x.view(),
                w: wv,
                bias: None,
                slots: &[],
                row_slot: None,
            };
            runtime()
                .linear(&p, &mut y.view_mut())
                .expect("linear on a loaded tensor");
        }
    }
});
