//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod capi;
pub mod kinds;

use rankfuse::backend::cpu::{self, Isa};
use rankfuse::{Runtime, RuntimeOptions};
use std::path::PathBuf;

pub fn fixture(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/peft-tiny")
        .join(p)
}

/// A runtime per kernel variant this CPU can run; prints one line for each it cannot.
pub fn runtimes() -> Vec<(Isa, Runtime)> {
    runtimes_with(RuntimeOptions {
        num_threads: 2,
        ..Default::default()
    })
}

/// `runtimes` with other options (the kernel table is still chosen per variant).
pub fn runtimes_with(opts: RuntimeOptions) -> Vec<(Isa, Runtime)> {
    let mut out = Vec::new();
    for isa in Isa::ALL {
        match cpu::table(isa) {
            Ok(t) => out.push((isa, Runtime::with_kernels(opts, t).unwrap())),
            Err(_) => println!(
                "skipping kernel variant '{}': this CPU lacks its instructions",
                isa.name()
            ),
        }
    }
    out
}

/// `|a - b| <= atol + rtol * |b|` everywhere; panics with the worst element otherwise.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.is_nan() || w.is_nan() {
            assert!(
                g.is_nan() && w.is_nan(),
                "{what}: element {i}: got {g}, want {w}"
            );
            continue;
        }
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > worst.1 {
            worst = (i, excess);
        }
    }
    if worst.1 > 0.0 {
        let i = worst.0;
        panic!(
            "{what}: element {i}: got {}, want {} (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}
