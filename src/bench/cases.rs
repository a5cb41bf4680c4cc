//! The timed cases: one (dtype, m, k, n, r) case with fused, base-only, naive unfused and the
//! same two on prepacked W, interleaved; cold decode over rotated layers; the mixed batch.

use super::measure::{heap, process_cpu_s, reset_peak};
use super::{median, random, Bandwidth, BenchOptions, BenchResult, MixedResult};
use crate::adapter::{Lora, Scaling, TensorData};
use crate::backend::{LinearProblem, Slot};
use crate::dtype::DType;
use crate::error::Result;
use crate::matrix::Matrix;
use crate::rng::SplitMix64;
use crate::runtime::{slot, Runtime};
use std::time::Instant;

fn new_lora(rng: &mut SplitMix64, dtype: DType, k: usize, n: usize, r: usize) -> Result<Lora> {
    let a = random(rng, dtype, r, k, 0.02)?;
    let b = random(rng, dtype, n, r, 0.02)?;
    Lora::new(
        "bench",
        TensorData::Owned(a),
        TensorData::Owned(b),
        2.0 * r as f32,
        Scaling::Lora,
        0.0,
    )
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
    run_case_with_bandwidth(rt, dtype, m, k, n, r, opts, None)
}

/// `run_case`, also reporting the fused read rate as % of a measured bandwidth.
#[allow(clippy::too_many_arguments)]
pub fn run_case_with_bandwidth(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    opts: &BenchOptions,
    bandwidth: Option<&Bandwidth>,
) -> Result<BenchResult> {
    let mut rng = SplitMix64::new((m * 31 + k * 7 + n * 3 + r) as u64);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let lora = new_lora(&mut rng, dtype, k, n, r)?;
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
    let pw = rt.pack(&w.view())?;
    let mut dv = vec![0f32; m * n];
    let mut row = vec![0f32; n];
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
        let dm = d.view();
        for i in 0..m {
            dm.row_f32(i, 0, &mut dv[i * n..(i + 1) * n]);
        }
        let mut yv = y.view_mut();
        for i in 0..m {
            yv.as_ref().row_f32(i, 0, &mut row);
            for (o, dd) in row.iter_mut().zip(&dv[i * n..(i + 1) * n]) {
                *o += scale * dd;
            }
            yv.set_row_f32(i, 0, &row);
        }
        Ok(())
    };
    // Warm-up (workspaces on every thread, page faults).
    for _ in 0..3 {
        rt.linear(&fused, &mut y.view_mut())?;
    }
    rt.linear(&base, &mut y.view_mut())?;
    naive(&mut y)?;
    rt.linear_packed(&fused, &pw, &mut y.view_mut())?;
    rt.linear_packed(&base, &pw, &mut y.view_mut())?;
    // Memory: one more fused call, now that workspaces exist.
    let mut extra_peak = None;
    if let Some((live0, _, _)) = heap() {
        reset_peak();
        rt.linear(&fused, &mut y.view_mut())?;
        extra_peak = heap().map(|(_, peak, _)| peak.saturating_sub(live0));
    }
    let cap = opts.max_iters.max(3);
    let (mut tb, mut tf, mut tn) = (
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
    );
    let mut cpu_f = Vec::with_capacity(cap);
    let mut cpu_b = Vec::with_capacity(cap);
    let (mut tpb, mut tpf) = (Vec::with_capacity(cap), Vec::with_capacity(cap));
    let mut cpu_pf = Vec::with_capacity(cap);
    let mut fused_allocs = 0usize;
    let start = Instant::now();
    while tb.len() < opts.max_iters && (tb.len() < 3 || start.elapsed() < opts.min_time * 3) {
        let c0 = process_cpu_s();
        let t0 = Instant::now();
        rt.linear(&base, &mut y.view_mut())?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), process_cpu_s() - c0);
        tb.push(wall * 1e3);
        cpu_b.push(cpu * 1e3);

        let a0 = heap().map_or(0, |h| h.2);
        let c0 = process_cpu_s();
        let t0 = Instant::now();
        rt.linear(&fused, &mut y.view_mut())?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), process_cpu_s() - c0);
        fused_allocs += heap().map_or(0, |h| h.2) - a0;
        tf.push(wall * 1e3);
        cpu_f.push(cpu * 1e3);

        let t0 = Instant::now();
        naive(&mut y)?;
        tn.push(t0.elapsed().as_secs_f64() * 1e3);

        let t0 = Instant::now();
        rt.linear_packed(&base, &pw, &mut y.view_mut())?;
        tpb.push(t0.elapsed().as_secs_f64() * 1e3);
        let c0 = process_cpu_s();
        let t0 = Instant::now();
        rt.linear_packed(&fused, &pw, &mut y.view_mut())?;
        tpf.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu_pf.push((process_cpu_s() - c0) * 1e3);
    }
    let iters = tb.len();
    let cold = match bandwidth {
        Some(bw) if m <= crate::backend::cpu::driver::DECODE_MAX_M => {
            Some(cold_decode(rt, dtype, &x, k, n, r, bw, opts, &mut rng)?)
        }
        _ => None,
    };
    let (base_ms, fused_ms, naive_ms) = (median(&mut tb), median(&mut tf), median(&mut tn));
    let (packed_base_ms, packed_fused_ms) = (median(&mut tpb), median(&mut tpf));
    let packed_bytes = pw.bytes();
    let fused_cpu_ms = median(&mut cpu_f);
    let base_cpu_ms = median(&mut cpu_b);
    let flop = 2.0 * m as f64 * n as f64 * k as f64;
    let sz = dtype.size() as f64;
    let bytes = sz * (n * k + r * k + n * r + m * k) as f64;
    let read_gbs = bytes / (fused_ms * 1e6);
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
        fused_gflop_per_cpu_s: flop / (fused_cpu_ms.max(1e-6) * 1e6),
        base_cpu_ms,
        fused_cpu_ms,
        fused_over_base_cpu: fused_cpu_ms / base_cpu_ms.max(1e-9),
        fused_read_gbs: read_gbs,
        fused_pct_of_bandwidth: bandwidth.map(|b| 100.0 * read_gbs / b.read_gbs),
        packed_base_ms,
        packed_fused_ms,
        packed_fused_over_base: packed_fused_ms / packed_base_ms,
        packed_speedup: fused_ms / packed_fused_ms,
        packed_fused_gflops: flop / (packed_fused_ms * 1e6),
        packed_fused_cpu_ms: median(&mut cpu_pf),
        packed_pct_of_fma_peak: None,
        packed_read_gbs: bytes / (packed_fused_ms * 1e6),
        packed_bytes,
        cold_packed_fused_ms: cold.map(|c| c.3),
        cold_packed_pct_of_bandwidth: cold
            .and_then(|c| bandwidth.map(|b| 100.0 * bytes / (c.3 * 1e6) / b.read_gbs)),
        cold_copies: cold.map(|c| c.0),
        cold_base_ms: cold.map(|c| c.1),
        cold_fused_ms: cold.map(|c| c.2),
        cold_fused_over_base: cold.map(|c| c.2 / c.1),
        cold_fused_read_gbs: cold.map(|c| bytes / (c.2 * 1e6)),
        cold_pct_of_bandwidth: cold
            .and_then(|c| bandwidth.map(|b| 100.0 * bytes / (c.2 * 1e6) / b.read_gbs)),
        fused_allocs_per_call: heap().is_some().then(|| fused_allocs as f64 / iters as f64),
        fused_extra_peak_bytes: extra_peak,
        workspace_bytes: crate::backend::cpu::driver::workspace_bytes(),
    })
}

/// Decode with every call's W and adapter cold: copies of (W, adapter) totalling more than the
/// bandwidth buffer, walked in order like a model's layers. Alternates a fused pass and a
/// base-only pass over all copies, and a fused pass over the same layers packed; returns
/// (copies, base, fused, packed fused ms per call), medians over passes.
#[allow(clippy::too_many_arguments)]
fn cold_decode(
    rt: &Runtime,
    dtype: DType,
    x: &Matrix,
    k: usize,
    n: usize,
    r: usize,
    bw: &Bandwidth,
    opts: &BenchOptions,
    rng: &mut SplitMix64,
) -> Result<(usize, f64, f64, f64)> {
    let m = x.rows;
    let layer_bytes = dtype.size() * (n * k + r * (n + k));
    let copies = ((bw.mib << 20) / layer_bytes.max(1) + 1).clamp(2, 4096);
    let mut layers = Vec::with_capacity(copies);
    for _ in 0..copies {
        let w = random(rng, dtype, n, k, 0.02)?;
        let lora = new_lora(rng, dtype, k, n, r)?;
        let pw = rt.pack(&w.view())?;
        layers.push((w, lora, pw));
    }
    let mut y = Matrix::zeros(dtype, m, n)?;
    let mut pass = |with_adapter: bool, packed: bool| -> Result<f64> {
        let t0 = Instant::now();
        for (w, lora, pw) in &layers {
            let slots = [Some(slot(lora, 0, 1.0)?)];
            let p = LinearProblem {
                x: x.view(),
                w: w.view(),
                bias: None,
                slots: if with_adapter { &slots } else { &[] },
                row_slot: None,
            };
            if packed {
                rt.linear_packed(&p, pw, &mut y.view_mut())?;
            } else {
                rt.linear(&p, &mut y.view_mut())?;
            }
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3 / copies as f64)
    };
    pass(true, false)?; // page faults and first touch
    pass(true, true)?;
    let (mut tb, mut tf, mut tp) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while tb.len() < 3 || (start.elapsed() < opts.min_time * 2 && tb.len() < 50) {
        tf.push(pass(true, false)?);
        tb.push(pass(false, false)?);
        tp.push(pass(true, true)?);
    }
    Ok((copies, median(&mut tb), median(&mut tf), median(&mut tp)))
}

/// A mixed batch: `m` rows spread round-robin over `ranks.len()` adapters (ranks as given),
/// timed against one adapter of the largest rank on the same rows, and base-only.
pub fn run_mixed(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    ranks: &[usize],
    opts: &BenchOptions,
) -> Result<MixedResult> {
    let mut rng = SplitMix64::new((m * 131 + k * 17 + n * 5) as u64);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let loras = ranks
        .iter()
        .map(|&r| new_lora(&mut rng, dtype, k, n, r))
        .collect::<Result<Vec<_>>>()?;
    let single_r = ranks.iter().copied().max().unwrap_or(1);
    let single = new_lora(&mut rng, dtype, k, n, single_r)?;
    let mut y = Matrix::zeros(dtype, m, n)?;
    let slots: Vec<Option<Slot<'_>>> = loras
        .iter()
        .map(|l| slot(l, 0, 1.0).map(Some))
        .collect::<Result<_>>()?;
    let row_slot: Vec<i32> = (0..m).map(|i| (i % ranks.len()) as i32).collect();
    let one = [Some(slot(&single, 0, 1.0)?)];
    let base = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let single_p = LinearProblem {
        slots: &one,
        ..base
    };
    let mixed_p = LinearProblem {
        slots: &slots,
        row_slot: Some(&row_slot),
        ..base
    };
    let pw = rt.pack(&w.view())?;
    for p in [&base, &single_p, &mixed_p] {
        rt.linear(p, &mut y.view_mut())?;
        rt.linear_packed(p, &pw, &mut y.view_mut())?;
    }
    let (mut tps, mut tpm) = (Vec::new(), Vec::new());
    let (mut tb, mut ts, mut tm) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cs, mut cm) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while tb.len() < opts.max_iters && (tb.len() < 3 || start.elapsed() < opts.min_time * 3) {
        for (p, v, c) in [
            (&base, &mut tb, None),
            (&single_p, &mut ts, Some(&mut cs)),
            (&mixed_p, &mut tm, Some(&mut cm)),
        ] {
            let c0 = process_cpu_s();
            let t0 = Instant::now();
            rt.linear(p, &mut y.view_mut())?;
            v.push(t0.elapsed().as_secs_f64() * 1e3);
            if let Some(c) = c {
                c.push(process_cpu_s() - c0);
            }
        }
        for (p, v) in [(&single_p, &mut tps), (&mixed_p, &mut tpm)] {
            let t0 = Instant::now();
            rt.linear_packed(p, &pw, &mut y.view_mut())?;
            v.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let (packed_single_ms, packed_mixed_ms) = (median(&mut tps), median(&mut tpm));
    let iters = tb.len();
    let (base_ms, single_ms, mixed_ms) = (median(&mut tb), median(&mut ts), median(&mut tm));
    let mixed_over_single_cpu = median(&mut cm) / median(&mut cs).max(1e-12);
    Ok(MixedResult {
        dtype: dtype.name(),
        m,
        k,
        n,
        adapters: ranks.len(),
        ranks: ranks.to_vec(),
        single_r,
        iters,
        base_ms,
        single_ms,
        mixed_ms,
        mixed_over_single: mixed_ms / single_ms,
        mixed_over_single_cpu,
        mixed_over_base: mixed_ms / base_ms,
        packed_single_ms,
        packed_mixed_ms,
        packed_mixed_over_single: packed_mixed_ms / packed_single_ms,
    })
}
