//! Decode on block-quantized W next to BF16: the same (m, k, n, r) with W in Q8_0, Q4_0, Q4_K, Q6_K and
//! BF16, base-only and fused, interleaved. Decode reads W once per call, so the figures to compare
//! are time and the W read rate (bytes of W in its own format per second).

use super::measure::process_cpu_s;
use super::{median, random};
use crate::adapter::{Lora, Scaling, TensorData};
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::Result;
use crate::matrix::{MatRef, Matrix};
use crate::rng::SplitMix64;
use crate::runtime::{slot, Runtime};
use serde::Serialize;
use std::time::{Duration, Instant};

#[derive(Clone, Debug, Serialize)]
pub struct QuantResult {
    pub dtype: &'static str,
    /// How x was read: "exact", or "q8" (the runtime's `ActQuant::Q8`, integer dots).
    pub act: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    /// Bytes of W in its own format.
    pub w_bytes: usize,
    pub base_ms: f64,
    pub fused_ms: f64,
    /// W bytes per second of the fused call, GB/s.
    pub fused_w_gbs: f64,
    /// Process CPU time per fused call (all threads), ms: steadier than wall time on a machine
    /// shared with other work.
    pub fused_cpu_ms: f64,
}

/// Random blocks with small finite scales (the values do not matter for timing; NaN/inf scales
/// from random bytes would).
pub fn random_blocks(rng: &mut SplitMix64, dt: DType, rows: usize, cols: usize) -> Vec<u8> {
    let nb = cols / dt.block_elems();
    let mut out = vec![0u8; rows * nb * dt.size()];
    for b in out.chunks_mut(dt.size()) {
        for v in b.iter_mut() {
            *v = rng.next_u64() as u8;
        }
        let d = half::f16::from_f32(rng.uniform(0.001, 0.01)).to_bits();
        let at = crate::quant::d_offset(dt);
        b[at..at + 2].copy_from_slice(&d.to_le_bytes());
        if dt == DType::Q4_K {
            b[2..4].copy_from_slice(&d.to_le_bytes());
        }
    }
    out
}

/// Times `dt` (Q8_0, Q4_0, Q4_K, Q6_K or a dense dtype) as W with f32 x and y; k must be a
/// multiple of 256 for the K-quants.
#[allow(clippy::too_many_arguments)]
pub fn run_quant_case(
    rt: &Runtime,
    dt: DType,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    min_time: Duration,
    max_iters: usize,
) -> Result<QuantResult> {
    let mut rng = SplitMix64::new((m * 31 + k * 7 + n * 3 + r) as u64);
    let dense;
    let blocks;
    let w = if dt.is_quantized() {
        blocks = random_blocks(&mut rng, dt, n, k);
        MatRef::from_bytes(&blocks, dt, n, k, k)?
    } else {
        dense = random(&mut rng, dt, n, k, 0.02)?;
        dense.view()
    };
    let w_bytes = dt.bytes(n * k).unwrap_or(0);
    let x = random(&mut rng, DType::F32, m, k, 1.0)?;
    let a = random(&mut rng, DType::BF16, r, k, 0.02)?;
    let b = random(&mut rng, DType::BF16, n, r, 0.02)?;
    let lora = Lora::new(
        "bench",
        TensorData::Owned(a),
        TensorData::Owned(b),
        2.0 * r as f32,
        Scaling::Lora,
        0.0,
    )?;
    let slots = [Some(slot(&lora, 0, 1.0)?)];
    let base = LinearProblem {
        x: x.view(),
        w,
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let fused = LinearProblem {
        slots: &slots,
        ..base
    };
    let mut y = Matrix::zeros(DType::F32, m, n)?;
    for _ in 0..3 {
        rt.linear(&fused, &mut y.view_mut())?;
        rt.linear(&base, &mut y.view_mut())?;
    }
    let (mut tb, mut tf, mut cf) = (Vec::new(), Vec::new(), Vec::new());
    let start = Instant::now();
    while tf.len() < 3 || (start.elapsed() < 2 * min_time && tf.len() < max_iters.max(3)) {
        let t0 = Instant::now();
        rt.linear(&base, &mut y.view_mut())?;
        let (t1, c1) = (Instant::now(), process_cpu_s());
        rt.linear(&fused, &mut y.view_mut())?;
        let (t2, c2) = (Instant::now(), process_cpu_s());
        tb.push((t1 - t0).as_secs_f64() * 1e3);
        tf.push((t2 - t1).as_secs_f64() * 1e3);
        cf.push((c2 - c1) * 1e3);
    }
    let (base_ms, fused_ms) = (median(&mut tb), median(&mut tf));
    Ok(QuantResult {
        dtype: dt.name(),
        act: match rt.act_quant() {
            crate::backend::ActQuant::Q8 if dt.is_quantized() => "q8",
            _ => "exact",
        },
        m,
        k,
        n,
        r,
        w_bytes,
        base_ms,
        fused_ms,
        fused_w_gbs: w_bytes as f64 / (fused_ms * 1e-3) / 1e9,
        fused_cpu_ms: median(&mut cf),
    })
}
