//! Decode (m <= `DECODE_MAX_M`) on a block-quantized W (Q8_0, Q4_0, Q4_K), portable version:
//! each W row is streamed once, block by block; a block is decoded exactly (crate::quant) into
//! a stack buffer that stays in L1 and dotted with every x row before the next block is read.
//!
//! The larger-m path needs no kernel of its own: the GEMM driver packs W through
//! `MatRef::row_f32`, which dequantizes whole blocks into the f32 panels (pack_b_generic).

use super::driver::DECODE_MAX_M;
use crate::dtype::DType;
use crate::matrix::MatRef;
use crate::quant::{
    dequant_block, q6_k_group, q6_k_q, scale_min_k4, Q8Rows, Q6_K_D, Q6_K_SCALES, QK, QK_K,
};
use half::f16;

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

/// `out[i * ldo + j] (+)= w(j, :) . x_q(i, :)` with x quantized to Q8 blocks (`Q8Rows`, the
/// opt-in `ActQuant::Q8` decode): integer dot products per 32-weight block, then one f32
/// multiply-add by the two scales (minus the min term for Q4_K).
///
/// # Safety
/// out has m rows of w.rows writable floats at stride ldo; w is a checked quantized view whose
/// cols equal `x.k`; x holds m rows.
pub unsafe fn gemv_q8_portable(
    x: &Q8Rows,
    m: usize,
    w: &MatRef<'_>,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    debug_assert!(w.dtype.is_quantized() && m <= DECODE_MAX_M && w.cols == x.k);
    let (k, dt) = (w.cols, w.dtype);
    let nb = k / QK;
    let bytes = dt.size();
    for j in 0..w.rows {
        let row = w.row_ptr(j);
        let mut sums = [0f32; DECODE_MAX_M];
        for (i, s) in sums.iter_mut().enumerate().take(m) {
            let (xq, xd, xds) = (x.row(i), &x.d[i * nb..], &x.ds[i * nb..]);
            match dt {
                DType::Q8_0 | DType::Q4_0 => {
                    for b in 0..nb {
                        let blk = std::slice::from_raw_parts(row.add(b * bytes), bytes);
                        let dw = f16::from_bits(u16::from_le_bytes([blk[0], blk[1]])).to_f32();
                        let xb = &xq[b * QK..(b + 1) * QK];
                        let mut dot = 0i32;
                        if dt == DType::Q8_0 {
                            for (l, &v) in xb.iter().enumerate() {
                                dot += (blk[2 + l] as i8) as i32 * v as i32;
                            }
                        } else {
                            for l in 0..QK / 2 {
                                let q = blk[2 + l];
                                dot += ((q & 0x0F) as i32 - 8) * xb[l] as i32
                                    + ((q >> 4) as i32 - 8) * xb[l + QK / 2] as i32;
                            }
                        }
                        *s += dw * xd[b] * dot as f32;
                    }
                }
                DType::Q4_K => {
                    for sb in 0..k / QK_K {
                        let blk = std::slice::from_raw_parts(row.add(sb * bytes), bytes);
                        let h16 = |at: usize| {
                            f16::from_bits(u16::from_le_bytes([blk[at], blk[at + 1]])).to_f32()
                        };
                        let (d, dmin) = (h16(0), h16(2));
                        for c in 0..4 {
                            let q = &blk[16 + 32 * c..16 + 32 * (c + 1)];
                            for h in 0..2 {
                                let sub = sb * (QK_K / QK) + 2 * c + h;
                                let (sc, mn) = scale_min_k4(2 * c + h, &blk[4..16]);
                                let xb = &xq[sub * QK..(sub + 1) * QK];
                                let mut dot = 0i32;
                                for l in 0..QK {
                                    dot += ((q[l] >> (4 * h)) & 0x0F) as i32 * xb[l] as i32;
                                }
                                *s += d * sc as f32 * xd[sub] * dot as f32
                                    - dmin * mn as f32 * xds[sub];
                            }
                        }
                    }
                }
                DType::Q6_K => {
                    for sb in 0..k / QK_K {
                        let blk = std::slice::from_raw_parts(row.add(sb * bytes), bytes);
                        let d = f16::from_bits(u16::from_le_bytes([blk[Q6_K_D], blk[Q6_K_D + 1]]))
                            .to_f32();
                        for g in 0..QK_K / QK {
                            let sub = sb * (QK_K / QK) + g;
                            let (.., is) = q6_k_group(g);
                            let xb = &xq[sub * QK..(sub + 1) * QK];
                            for half in 0..2 {
                                let sc = blk[Q6_K_SCALES + is + half] as i8;
                                let dot: i32 = (16 * half..16 * half + 16)
                                    .map(|l| (q6_k_q(blk, g, l) as i32 - 32) * xb[l] as i32)
                                    .sum();
                                *s += d * sc as f32 * xd[sub] * dot as f32;
                            }
                        }
                    }
                }
                DType::F32 | DType::F16 | DType::BF16 => unreachable!("dense W in the Q8 gemv"),
            }
        }
        for (i, &s) in sums.iter().enumerate().take(m) {
            let o = out.add(i * ldo + j);
            *o = if acc { *o + s } else { s };
        }
    }
}
