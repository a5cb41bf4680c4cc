//! One-thread decode probe for block-quantized W: times `rf_linear`'s Rust twin on an n x 4096 W
//! (m = 1, no adapter) and prints ns per 8-row x 32-weight block, the unit of the AVX2 8-row
//! kernels. With n = 128 W stays in L2, so the figure is the kernel's compute cost alone; with
//! n = 11008 it reads from memory.
//!
//! `cargo run --release --example quant_probe -- 128 q4_0 [q8|exact] [m] [pk]`: m x rows (default
//! 1), `pk` reads W from `Runtime::pack` (8-row interleaved blocks); `ITERS` sets the count,
//! `THREADS` the runtime's threads (default 1).
use rankfuse::backend::LinearProblem;
use rankfuse::matrix::{MatRef, Matrix};
use rankfuse::{dtype::DType, ActQuant, Runtime, RuntimeOptions};
use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let n: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(128);
    let dt = match args.get(2).map(String::as_str).unwrap_or("q4_0") {
        "q4_0" => DType::Q4_0,
        "q8_0" => DType::Q8_0,
        "q4_k" => DType::Q4_K,
        "q6_k" => DType::Q6_K,
        other => panic!("unknown type {other} (q4_0, q8_0, q4_k, q6_k)"),
    };
    let q8 = args.get(3).map(|s| s == "q8").unwrap_or(true);
    let m: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let pk = args.get(5).is_some_and(|s| s == "pk");
    let threads = std::env::var("THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let k = 4096;
    let mut rng = rankfuse::rng::SplitMix64::new(1);
    let wb = rankfuse::bench::quant::random_blocks(&mut rng, dt, n, k);
    let w = MatRef::from_bytes(&wb, dt, n, k, k).unwrap();
    let x = Matrix::from_f32(DType::F32, m, k, &rng.fill_uniform(m * k, -1.0, 1.0)).unwrap();
    let rt = Runtime::new(RuntimeOptions {
        num_threads: threads,
        act_quant: if q8 { ActQuant::Q8 } else { ActQuant::Exact },
        ..Default::default()
    })
    .unwrap();
    let p = LinearProblem {
        x: x.view(),
        w,
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let packed = pk.then(|| rt.pack(&w).unwrap());
    let mut y = Matrix::zeros(DType::F32, m, n).unwrap();
    let call = |y: &mut Matrix| match &packed {
        Some(pw) => rt.linear_packed(&p, pw, &mut y.view_mut()).unwrap(),
        None => rt.linear(&p, &mut y.view_mut()).unwrap(),
    };
    for _ in 0..3 {
        call(&mut y);
    }
    let iters = std::env::var("ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or((2_000_000_000 / wb.len() / m).max(3));
    let t = Instant::now();
    for _ in 0..iters {
        call(&mut y);
    }
    let s = t.elapsed().as_secs_f64() / iters as f64;
    let blocks8 = n as f64 / 8.0 * (k / 32) as f64;
    println!(
        "{}{} n={n} k={k} m={m} {}: {:.1} us/call, W {:.2} GB/s, {:.2} ns per 8-row x 32 block ({})",
        dt.name(),
        if pk { "+pk" } else { "" },
        if q8 { "q8x" } else { "exact" },
        s * 1e6,
        wb.len() as f64 / s / 1e9,
        s * 1e9 / blocks8,
        rt.kernels().isa.name()
    );
}
