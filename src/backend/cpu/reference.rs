//! The scalar reference: f64 accumulation, no blocking, no threads. The ground truth every
//! optimized kernel is tested against. Slow on purpose; never used for speed.

use super::pack::PackedW;
use crate::backend::LinearProblem;
use crate::matrix::{MatMut, MatRef};

/// `linear` with W read from a pack (unpacked to f32 first: exact, as packing keeps W's values).
pub fn linear_packed(p: &LinearProblem<'_>, packed: &PackedW, y: &mut MatMut<'_>) {
    let w = packed.unpack_f32();
    let (n, k) = (packed.rows(), packed.cols());
    let q = LinearProblem {
        x: p.x,
        w: MatRef::from_slice(&w, n, k, k.max(1)).expect("an n x k f32 matrix"),
        bias: p.bias,
        slots: p.slots,
        row_slot: p.row_slot,
    };
    linear(&q, y)
}

pub fn linear(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    linear_base_x(p, y, None)
}

/// `linear_act_q8` with W read from a pack: a quantized pack is rebuilt into GGUF rows (the
/// pack keeps the blocks bit for bit), a panel pack is `linear_packed`.
pub fn linear_packed_act_q8(p: &LinearProblem<'_>, packed: &PackedW, y: &mut MatMut<'_>) {
    if packed.layout().is_panels() {
        return linear_packed(p, packed, y);
    }
    let (n, k, dt) = (packed.rows(), packed.cols(), packed.dtype());
    let nb = k / crate::quant::QK;
    let mut rows = Vec::with_capacity(n * nb * dt.size());
    let mut buf = Vec::new();
    for g in 0..n.div_ceil(super::quant_pack::GROUP) {
        let gr = super::quant_pack::GROUP.min(n - g * super::quant_pack::GROUP);
        // SAFETY: the pack holds group g of dt with nb blocks per row.
        unsafe { super::quant_pack::group_rows(packed.data_ptr(), dt, nb, g, gr, &mut buf) };
        rows.extend_from_slice(&buf[..gr * nb * dt.size()]);
    }
    let q = LinearProblem {
        w: MatRef::from_bytes(&rows, dt, n, k, k).expect("whole blocks"),
        ..*p
    };
    linear_act_q8(&q, y)
}

/// The reference of `ActQuant::Q8`: on a quantized W with m <= DECODE_MAX_M rows, the base
/// product reads x quantized to Q8 blocks (`Q8Rows`, values `d * q` in f64, so the sums are the
/// kernels' exact integer dots); bias and adapters read x as given. Otherwise `linear`.
pub fn linear_act_q8(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    let (m, k) = (p.m(), p.k());
    if !p.w.dtype.is_quantized() || m > super::driver::DECODE_MAX_M || m == 0 || k == 0 {
        return linear(p, y);
    }
    let mut xf = vec![0f32; m * k];
    for i in 0..m {
        p.x.row_f32(i, 0, &mut xf[i * k..(i + 1) * k]);
    }
    let mut xq = crate::quant::Q8Rows::default();
    xq.quantize(&xf, m, k, k);
    let nb = k / crate::quant::QK;
    let xb: Vec<f64> = (0..m * k)
        .map(|e| xq.d[(e / k) * nb + (e % k) / crate::quant::QK] as f64 * xq.q[e] as f64)
        .collect();
    linear_base_x(p, y, Some(&xb))
}

/// `linear`, with the base product `x W^T` reading `xbase` (m x k, row-major) instead of x
/// when given.
fn linear_base_x(p: &LinearProblem<'_>, y: &mut MatMut<'_>, xbase: Option<&[f64]>) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    if m == 0 || n == 0 {
        return;
    }
    if p.w.dtype.is_quantized() {
        // Dequantize W exactly (crate::quant, llama.cpp's arithmetic) once, then the same f64
        // sums: per-element block decoding would cost a whole block per element.
        let wf = p.w.to_f32_vec();
        let q = LinearProblem {
            w: MatRef::from_slice(&wf, n, k, k.max(1)).expect("an n x k f32 matrix"),
            ..*p
        };
        return linear_base_x(&q, y, xbase);
    }
    let mut t: Vec<Vec<f64>> = vec![Vec::new(); p.slots.len()];
    for i in 0..m {
        for (s, slot) in p.slots.iter().enumerate() {
            t[s].clear();
            let Some(slot) = slot else { continue };
            if !p.applies(s, i) {
                continue;
            }
            for r in 0..slot.rank() {
                let mut acc = 0f64;
                for kk in 0..k {
                    acc += p.x.get(i, kk) as f64 * slot.a.get(r, kk) as f64;
                }
                if let Some(g) = &slot.gains {
                    acc *= g.get(0, r) as f64;
                }
                t[s].push(acc);
            }
        }
        for j in 0..n {
            let mut acc = 0f64;
            for kk in 0..k {
                let xv = match xbase {
                    Some(xb) => xb[i * k + kk],
                    None => p.x.get(i, kk) as f64,
                };
                acc += xv * p.w.get(j, kk) as f64;
            }
            if let Some(b) = &p.bias {
                acc += b.get(0, j) as f64;
            }
            for (s, slot) in p.slots.iter().enumerate() {
                let Some(slot) = slot else { continue };
                if t[s].is_empty() {
                    continue;
                }
                let mut d = 0f64;
                for (r, tv) in t[s].iter().enumerate() {
                    d += tv * slot.b.get(j, r) as f64;
                }
                acc += slot.scale as f64 * d;
            }
            y.set(i, j, acc as f32);
        }
    }
}
