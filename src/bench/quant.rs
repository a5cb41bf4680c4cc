//! Decode on block-quantized W next to BF16: the same (m, k, n, r) with W in Q8_0, Q4_0, Q4_K, Q6_K and
//! BF16, base-only and fused, interleaved. Decode reads W once per call, so the figures to compare
//! are time and the W read rate (bytes of W in its own format per second).
//!
//! As in a model's decode step, W comes from memory, not cache: the case rotates over enough
//! copies of W ([`ROTATE_BYTES`] in all) that the last-level cache never holds the one a call
//! reads. The ceiling is timed in the same loop: a plain streaming read of the same copy's bytes
//! with the runtime's number of threads (`stream_ms`), so `%read` = stream time / fused time is
//! a ratio of two interleaved measurements and survives a noisy machine.

use super::measure::{process_cpu_s, stream_read};
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
    /// W read from `Runtime::pack` (Q4_0 / Q8_0 8-row interleaved blocks) instead of in place.
    pub packed: bool,
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
    /// A plain streaming read of the same W bytes with the runtime's threads, timed in the same
    /// loop (median), ms; and its rate, GB/s.
    pub stream_ms: f64,
    pub stream_gbs: f64,
    /// stream_ms / fused_ms: the fused call's share of the read rate the machine gives these
    /// bytes (1.0 = as fast as merely reading W).
    pub of_stream: f64,
    /// Copies of W rotated over (so none is cache-resident when read).
    pub w_copies: usize,
}

/// Bytes of W copies a quant case rotates over: several times any last-level cache seen on
/// these machines (32 MiB on the Zen 3 / Zen 4 VMs).
pub(crate) const ROTATE_BYTES: usize = 256 << 20;

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
    packed: bool,
) -> Result<QuantResult> {
    let mut rng = SplitMix64::new((m * 31 + k * 7 + n * 3 + r) as u64);
    let w_bytes = dt.bytes(n * k).unwrap_or(0);
    let copies = ROTATE_BYTES.div_ceil(w_bytes.max(1)).clamp(2, 64);
    // One random W, then byte copies of it (the values do not matter for timing).
    let first = if dt.is_quantized() {
        random_blocks(&mut rng, dt, n, k)
    } else {
        random(&mut rng, dt, n, k, 0.02)?.bytes().to_vec()
    };
    let store: Vec<Vec<u8>> = (0..copies).map(|_| first.clone()).collect();
    drop(first);
    let ws = store
        .iter()
        .map(|b| MatRef::from_bytes(b, dt, n, k, k))
        .collect::<Result<Vec<_>>>()?;
    let packs = if packed {
        ws.iter().map(|w| rt.pack(w)).collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let call = |p: &LinearProblem<'_>, i: usize, y: &mut Matrix| match packs.get(i) {
        Some(pk) => rt.linear_packed(p, pk, &mut y.view_mut()),
        None => rt.linear(p, &mut y.view_mut()),
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(rt.threads())
        .build()
        .map_err(|e| crate::error::Error::internal(format!("stream pool: {e}")))?;
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
    fn problem<'a>(
        x: &'a Matrix,
        w: MatRef<'a>,
        slots: &'a [Option<crate::backend::Slot<'a>>],
    ) -> LinearProblem<'a> {
        LinearProblem {
            x: x.view(),
            w,
            bias: None,
            slots,
            row_slot: None,
        }
    }
    let mut y = Matrix::zeros(DType::F32, m, n)?;
    let mut next = 0usize;
    let mut w_next = || {
        next = (next + 1) % copies;
        next
    };
    for _ in 0..3 {
        let i = w_next();
        call(&problem(&x, ws[i], &slots), i, &mut y)?;
        let i = w_next();
        call(&problem(&x, ws[i], &[]), i, &mut y)?;
    }
    let (mut tb, mut tf, mut cf, mut ts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut check = 0u64;
    let start = Instant::now();
    while tf.len() < 3 || (start.elapsed() < 2 * min_time && tf.len() < max_iters.max(3)) {
        let t0 = Instant::now();
        let i = w_next();
        call(&problem(&x, ws[i], &[]), i, &mut y)?;
        let (t1, c1) = (Instant::now(), process_cpu_s());
        let i = w_next();
        call(&problem(&x, ws[i], &slots), i, &mut y)?;
        let (t2, c2) = (Instant::now(), process_cpu_s());
        check = check.wrapping_add(stream_read(&pool, &store[w_next()]));
        let t3 = Instant::now();
        tb.push((t1 - t0).as_secs_f64() * 1e3);
        tf.push((t2 - t1).as_secs_f64() * 1e3);
        cf.push((c2 - c1) * 1e3);
        ts.push((t3 - t2).as_secs_f64() * 1e3);
    }
    std::hint::black_box(check);
    let stream_ms = median(&mut ts);
    let (base_ms, fused_ms) = (median(&mut tb), median(&mut tf));
    Ok(QuantResult {
        dtype: dt.name(),
        packed,
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
        stream_ms,
        stream_gbs: w_bytes as f64 / (stream_ms * 1e-3) / 1e9,
        of_stream: stream_ms / fused_ms,
        w_copies: copies,
    })
}
