//! `rankfuse bench`: times, in the same run and interleaved, the fused linear against base-only
//! and a naive unfused adapter (separate x W^T, x A^T, T B^T passes and an add), so ratios survive
//! a noisy machine.

use crate::adapter::{Lora, Scaling, TensorData};
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::Result;
use crate::matrix::Matrix;
use crate::rng::SplitMix64;
use crate::runtime::{slot, Runtime};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub ms: Vec<usize>,
    /// (k, n) pairs.
    pub shapes: Vec<(usize, usize)>,
    pub ranks: Vec<usize>,
    pub dtypes: Vec<DType>,
    /// Minimum time spent per variant per case.
    pub min_time: Duration,
    pub max_iters: usize,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            ms: vec![1, 16, 128, 512],
            shapes: vec![(4096, 4096), (4096, 11008)],
            ranks: vec![8, 16, 64],
            dtypes: vec![DType::F32, DType::BF16],
            min_time: Duration::from_millis(300),
            max_iters: 50,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub dtype: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub iters: usize,
    pub base_ms: f64,
    pub fused_ms: f64,
    pub naive_ms: f64,
    /// fused / base-only (the adapter's overhead; goal <= 1.03)
    pub fused_over_base: f64,
    /// naive unfused / base-only
    pub naive_over_base: f64,
    /// Base-only FLOP rate (2mnk / time), GFLOP/s.
    pub base_gflops: f64,
    pub fused_gflops: f64,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

fn random(
    rng: &mut SplitMix64,
    dtype: DType,
    rows: usize,
    cols: usize,
    amp: f32,
) -> Result<Matrix> {
    Matrix::from_f32(dtype, rows, cols, &rng.fill_uniform(rows * cols, -amp, amp))
}

/// Runs one case; every iteration times base, fused and naive back to back.
pub fn run_case(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    opts: &BenchOptions,
) -> Result<BenchResult> {
    let mut rng = SplitMix64::new((m * 31 + k * 7 + n * 3 + r) as u64);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let a = random(&mut rng, dtype, r, k, 0.02)?;
    let b = random(&mut rng, dtype, n, r, 0.02)?;
    let lora = Lora::new(
        "bench",
        TensorData::Owned(a),
        TensorData::Owned(b),
        2.0 * r as f32,
        Scaling::Lora,
        0.0,
    )?;
    let mut y = Matrix::zeros(dtype, m, n)?;
    let mut t = Matrix::zeros(DType::F32, m, r)?;
    let mut d = Matrix::zeros(DType::F32, m, n)?;
    let s = slot(&lora, 0, 1.0)?;
    let slots_fused = [Some(s)];
    let base = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let fused = LinearProblem {
        slots: &slots_fused,
        ..base
    };
    let mut naive = |y: &mut Matrix| -> Result<()> {
        rt.linear(&base, &mut y.view_mut())?;
        let shrink = LinearProblem {
            x: x.view(),
            w: lora.a_view(r),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        rt.linear(&shrink, &mut t.view_mut())?;
        let expand = LinearProblem {
            x: t.view(),
            w: lora.b_view(r),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        rt.linear(&expand, &mut d.view_mut())?;
        let scale = s.scale;
        let dv = d.to_f32_vec();
        let mut yv = y.view_mut();
        let mut row = vec![0f32; n];
        for i in 0..m {
            yv.as_ref().row_f32(i, 0, &mut row);
            for (o, dd) in row.iter_mut().zip(&dv[i * n..(i + 1) * n]) {
                *o += scale * dd;
            }
            yv.set_row_f32(i, 0, &row);
        }
        Ok(())
    };
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let t0 = Instant::now();
        f()?;
        Ok(t0.elapsed().as_secs_f64() * 1e3)
    };
    // Warm-up (workspaces, page faults).
    rt.linear(&fused, &mut y.view_mut())?;
    naive(&mut y)?;
    let (mut tb, mut tf, mut tn) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while tb.len() < opts.max_iters && (tb.len() < 3 || start.elapsed() < opts.min_time * 3) {
        tb.push(time(&mut || rt.linear(&base, &mut y.view_mut()))?);
        tf.push(time(&mut || rt.linear(&fused, &mut y.view_mut()))?);
        tn.push(time(&mut || naive(&mut y))?);
    }
    let iters = tb.len();
    let (base_ms, fused_ms, naive_ms) = (median(&mut tb), median(&mut tf), median(&mut tn));
    let flop = 2.0 * m as f64 * n as f64 * k as f64;
    Ok(BenchResult {
        dtype: dtype.name(),
        m,
        k,
        n,
        r,
        iters,
        base_ms,
        fused_ms,
        naive_ms,
        fused_over_base: fused_ms / base_ms,
        naive_over_base: naive_ms / base_ms,
        base_gflops: flop / (base_ms * 1e6),
        fused_gflops: flop / (fused_ms * 1e6),
    })
}

/// Runs every case of `opts`, calling `progress` after each.
pub fn run(
    rt: &Runtime,
    opts: &BenchOptions,
    mut progress: impl FnMut(&BenchResult),
) -> Result<Vec<BenchResult>> {
    let mut out = Vec::new();
    for &dtype in &opts.dtypes {
        for &(k, n) in &opts.shapes {
            for &m in &opts.ms {
                for &r in &opts.ranks {
                    let res = run_case(rt, dtype, m, k, n, r, opts)?;
                    progress(&res);
                    out.push(res);
                }
            }
        }
    }
    Ok(out)
}
