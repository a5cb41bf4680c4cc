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
        return linear(&q, y);
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
                acc += p.x.get(i, kk) as f64 * p.w.get(j, kk) as f64;
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
