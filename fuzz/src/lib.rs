//! Checks shared by the fuzz targets: every view a successful load hands out must be readable
//! end to end (AddressSanitizer catches a view that reaches past its bytes), and every error must
//! carry an expected status and a message naming what it is about.

use rankfuse::{Error, Runtime, RuntimeOptions, Status, Weights};
use std::sync::OnceLock;

/// Splits `data` at `sep` into at most `max` parts.
pub fn split<'a>(data: &'a [u8], sep: &[u8], max: usize) -> Vec<&'a [u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while parts.len() + 1 < max {
        match rest.windows(sep.len()).position(|w| w == sep) {
            Some(i) => {
                parts.push(&rest[..i]);
                rest = &rest[i + sep.len()..];
            }
            None => break,
        }
    }
    parts.push(rest);
    parts
}

/// An error must have one of `allowed` statuses and a non-empty message; panics otherwise (a
/// panic is a finding).
pub fn check_error(e: &Error, allowed: &[Status], must_name: Option<&str>) {
    assert!(
        allowed.contains(&e.status),
        "unexpected status {:?}: {}",
        e.status,
        e.message
    );
    assert!(!e.message.trim().is_empty(), "empty error message");
    if let Some(n) = must_name {
        assert!(
            e.message.contains(n),
            "message '{}' does not name '{n}'",
            e.message
        );
    }
}

/// Reads every tensor of opened weights through every accessor, checking sizes agree.
pub fn touch_weights(w: &Weights) {
    let mut sink = 0f32;
    for t in w.entries() {
        let bytes = w.bytes(&t.name).expect("listed tensor has bytes");
        let elems = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let elems = elems.expect("validated shape product fits");
        if let Some(dt) = t.dtype {
            // Quantized dtypes: whole blocks of the innermost dim (the loaders check it).
            assert_eq!(
                Some(bytes.len()),
                dt.bytes(elems),
                "tensor '{}' byte length",
                t.name
            );
        }
        // Reading every byte: out-of-range views fault under ASan.
        sink += bytes.iter().map(|&b| b as f32).sum::<f32>();
        match w.get(&t.name) {
            Ok(v) => {
                assert_eq!(v.rows * v.cols, elems, "tensor '{}' view size", t.name);
                sink += v.to_f32_vec().iter().sum::<f32>();
            }
            Err(e) => check_error(&e, &[Status::Format, Status::Unsupported], Some(&t.name)),
        }
    }
    std::hint::black_box(sink);
}

/// A one-thread CPU runtime with the best kernels of this machine.
pub fn runtime() -> &'static Runtime {
    static RT: OnceLock<Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        Runtime::new(RuntimeOptions {
            num_threads: 1,
            ..Default::default()
        })
        .expect("cpu runtime")
    })
}
