//! Decode (m <= `DECODE_MAX_M`) on a block-quantized W (Q8_0, Q4_0, Q4_K), portable version:
//! each W row is streamed once, block by block; a block is decoded exactly (crate::quant) into
//! a stack buffer that stays in L1 and dotted with every x row before the next block is read.
//!
//! The larger-m path needs no kernel of its own: the GEMM driver packs W through
//! `MatRef::row_f32`, which dequantizes whole blocks into the f32 panels (pack_b_generic).

use super::driver::DECODE_MAX_M;
use crate::matrix::MatRef;
use crate::quant::{dequant_block, QK_K};

/// 8-lane partial sums, so LLVM vectorizes the dot product (and the order is fixed, unlike a
/// plain fold it may not reassociate).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut part = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..8 {
            part[l] += x[l] * y[l];
        }
    }
    let mut t: f32 = part.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        t += x * y;
    }
    t
}

/// `out[i * ldo + j] (+)= sum_p x[i * ldx + p] * w(j, p)` for i < m, j < w.rows, p < w.cols,
/// with w block-quantized; `acc == false` overwrites.
///
/// # Safety
/// x has m rows of w.cols floats at stride ldx; out has m rows of w.rows writable floats at
/// stride ldo; w is a checked view of a quantized dtype (whole blocks per row).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemv_portable(
    x: *const f32,
    ldx: usize,
    m: usize,
    w: &MatRef<'_>,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    debug_assert!(w.dtype.is_quantized() && m <= DECODE_MAX_M);
    let (k, dt) = (w.cols, w.dtype);
    let be = dt.block_elems();
    let mut blk = [0f32; QK_K];
    for j in 0..w.rows {
        let row = w.row_ptr(j);
        let mut sums = [0f32; DECODE_MAX_M];
        for b in 0..k / be {
            dequant_block(row, dt, b, &mut blk);
            for (i, s) in sums.iter_mut().enumerate().take(m) {
                let xr = std::slice::from_raw_parts(x.add(i * ldx + b * be), be);
                *s += dot(&blk[..be], xr);
            }
        }
        for (i, &s) in sums.iter().enumerate().take(m) {
            let o = out.add(i * ldo + j);
            *o = if acc { *o + s } else { s };
        }
    }
}
