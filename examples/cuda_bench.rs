//! GPU benchmark of the CUDA backend (feature `cuda`): fused vs base-only, decode bandwidth
//! against the device's measured copy bandwidth, and mixed batches (64 rows over 16 adapters vs
//! one adapter). Times come from CUDA events on the runtime's stream.
//!
//!   cargo run --release --features cuda --example cuda_bench -- [--quick] [--json PATH]
//!
//! Used by scripts/gpu-check.sh; prints a table to stderr and the JSON to PATH (or stdout).

use rankfuse::backend::cuda::{CudaBackend, DeviceMatrix};
use rankfuse::backend::{LinearProblem, Slot};
use rankfuse::rng::SplitMix64;
use rankfuse::{DType, Device, Error, MatMut, Matrix, Result, Runtime, RuntimeOptions};
use serde_json::json;

fn random<'a>(
    cuda: &'a CudaBackend,
    rng: &mut SplitMix64,
    d: DType,
    rows: usize,
    cols: usize,
) -> Result<DeviceMatrix<'a>> {
    let m = Matrix::from_f32(d, rows, cols, &rng.fill_uniform(rows * cols, -1.0, 1.0))?;
    cuda.upload_matrix(m.view())
}

fn slot<'a>(a: &'a DeviceMatrix<'_>, b: &'a DeviceMatrix<'_>) -> Slot<'a> {
    Slot {
        a: a.view(),
        b: b.view(),
        scale: 0.5,
        gains: None,
        module: "bench",
    }
}

fn time_linear(
    rt: &Runtime,
    iters: usize,
    p: &LinearProblem<'_>,
    y: &DeviceMatrix<'_>,
) -> Result<f64> {
    let cuda = rt
        .cuda()
        .ok_or_else(|| Error::internal("not a CUDA runtime"))?;
    cuda.time_ms(iters, || {
        // SAFETY: y is device memory of rows x cols of its dtype.
        let mut yv =
            unsafe { MatMut::from_raw(y.buf.as_ptr() as *mut u8, y.dtype, y.rows, y.cols, y.ld) };
        rt.linear(p, &mut yv)
    })
}

fn main() {
    if let Err(e) = run() {
        eprintln!("cuda_bench: {e}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .cloned();
    let rt = Runtime::new(RuntimeOptions {
        device: Device::Cuda,
        ..Default::default()
    })?;
    let cuda = rt
        .cuda()
        .ok_or_else(|| Error::internal("not a CUDA runtime"))?;
    let iters = if quick { 10 } else { 50 };
    let mut rng = SplitMix64::new(42);

    // Device copy bandwidth (read + write), the yardstick for decode.
    let bytes = 1usize << 30;
    let src = cuda.alloc(bytes)?;
    let dst = cuda.alloc(bytes)?;
    // SAFETY: both are device allocations of `bytes`.
    let copy_ms = cuda.time_ms(iters.min(20), || unsafe {
        cuda.copy_device_to_device(dst, src, bytes)
    })?;
    // SAFETY: allocated above, no pending work after time_ms synchronized.
    unsafe {
        cuda.free(src)?;
        cuda.free(dst)?;
    }
    let bw_gbs = 2.0 * bytes as f64 / (copy_ms * 1e-3) / 1e9;
    eprintln!(
        "{}: device copy bandwidth {bw_gbs:.0} GB/s",
        cuda.info().name
    );

    let mut cases = Vec::new();
    let shapes: &[(usize, usize)] = if quick {
        &[(4096, 4096)]
    } else {
        &[(4096, 4096), (4096, 11008), (8192, 8192)]
    };
    let ms: &[usize] = if quick {
        &[1, 8, 512]
    } else {
        &[1, 2, 4, 8, 64, 512, 2048]
    };
    eprintln!(
        "{:>5} {:>5} {:>6} {:>6} {:>4} {:>10} {:>10} {:>7} {:>9}",
        "dtype", "m", "k", "n", "r", "base_ms", "fused_ms", "ratio", "bw_frac"
    );
    for d in [DType::BF16, DType::F16] {
        for &(k, n) in shapes {
            let w = random(cuda, &mut rng, d, n, k)?;
            for &m in ms {
                let x = random(cuda, &mut rng, d, m, k)?;
                let y = random(cuda, &mut rng, d, m, n)?;
                let base = LinearProblem {
                    x: x.view(),
                    w: w.view(),
                    bias: None,
                    slots: &[],
                    row_slot: None,
                };
                let base_ms = time_linear(&rt, iters, &base, &y)?;
                for r in [16usize, 64] {
                    let a = random(cuda, &mut rng, d, r, k)?;
                    let b = random(cuda, &mut rng, d, n, r)?;
                    let slots = [Some(slot(&a, &b))];
                    let fused = LinearProblem {
                        slots: &slots,
                        ..base
                    };
                    let fused_ms = time_linear(&rt, iters, &fused, &y)?;
                    let w_bytes = (n * k * d.size()) as f64;
                    let bw_frac = if m <= 8 {
                        w_bytes / (base_ms * 1e-3) / 1e9 / bw_gbs
                    } else {
                        f64::NAN
                    };
                    eprintln!("{:>5} {m:>5} {k:>6} {n:>6} {r:>4} {base_ms:>10.4} {fused_ms:>10.4} {:>7.3} {:>9.3}", d.name(), fused_ms / base_ms, bw_frac);
                    cases.push(json!({"dtype": d.name(), "m": m, "k": k, "n": n, "rank": r,
                        "base_ms": base_ms, "fused_ms": fused_ms, "fused_over_base": fused_ms / base_ms,
                        "decode_bw_fraction": if m <= 8 { json!(bw_frac) } else { json!(null) }}));
                }
            }
        }
    }

    // Mixed batch: 64 rows over 16 adapters (rank 16) vs the same rows on one adapter.
    let (m, k, n, r) = (64usize, 4096usize, 4096usize, 16usize);
    let d = DType::BF16;
    let w = random(cuda, &mut rng, d, n, k)?;
    let x = random(cuda, &mut rng, d, m, k)?;
    let y = random(cuda, &mut rng, d, m, n)?;
    let ads: Vec<(DeviceMatrix<'_>, DeviceMatrix<'_>)> = (0..16)
        .map(|_| {
            Ok((
                random(cuda, &mut rng, d, r, k)?,
                random(cuda, &mut rng, d, n, r)?,
            ))
        })
        .collect::<Result<_>>()?;
    let slots: Vec<Option<Slot<'_>>> = ads.iter().map(|(a, b)| Some(slot(a, b))).collect();
    let mixed_rows: Vec<i32> = (0..m as i32).map(|i| i % 16).collect();
    let one_rows = vec![0i32; m];
    let p_mixed = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &slots,
        row_slot: Some(&mixed_rows),
    };
    let p_one = LinearProblem {
        row_slot: Some(&one_rows),
        ..p_mixed
    };
    let mixed_ms = time_linear(&rt, iters, &p_mixed, &y)?;
    let one_ms = time_linear(&rt, iters, &p_one, &y)?;
    eprintln!(
        "mixed 64 rows / 16 adapters: {mixed_ms:.4} ms, one adapter: {one_ms:.4} ms, ratio {:.3}",
        mixed_ms / one_ms
    );

    let out = json!({
        "device": cuda.info_json(),
        "copy_bandwidth_gbs": bw_gbs,
        "cases": cases,
        "mixed": {"m": m, "k": k, "n": n, "rank": r, "adapters": 16, "mixed_ms": mixed_ms, "one_adapter_ms": one_ms, "ratio": mixed_ms / one_ms},
        "iters": iters,
    });
    match json_path {
        Some(p) => std::fs::write(&p, serde_json::to_string_pretty(&out).unwrap_or_default())
            .map_err(|e| Error::from_io(std::path::Path::new(&p), &e))?,
        None => println!("{out}"),
    }
    Ok(())
}
