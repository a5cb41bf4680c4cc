//! AVX2 + FMA + F16C decode on block-quantized W (Q8_0, Q4_0, Q4_K, Q6_K): each 32-weight group
//! is widened to four f32 vectors in registers (int8, nibbles or Q6_K's nibble + 2 bits -> i32 ->
//! f32, times its scale, minus its min or offset) and FMA'd into every x row's accumulators; W is read once and
//! nothing is dequantized to memory.
//!
//! All m <= 8 x rows go through in one pass, so each block is decoded once per call: up to 4
//! rows get two accumulators each (the FMA chains of one row overlap), 5..8 rows one each (8
//! chains already overlap; 8 accumulators + 4 weight vectors fit the 16 ymm registers).

use super::driver::DECODE_MAX_M;
use crate::dtype::DType;
use crate::matrix::MatRef;
use crate::quant::{q6_k_group, scale_min_k4, Q6_K_BYTES, Q6_K_D, Q6_K_SCALES, QK, QK_K};
use std::arch::x86_64::*;

/// The f16 at `p` (unaligned) as f32, via F16C.
#[inline(always)]
pub(super) unsafe fn f16_at(p: *const u8) -> f32 {
    let bits = (p as *const u16).read_unaligned();
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// Eight unsigned bytes (the low 8 of `v`) as f32 lanes.
#[inline(always)]
unsafe fn u8x8_ps(v: __m128i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
}

/// acc[i] += w . x[i, p..p + 32] for the M rows (A accumulators per row: 2 or 1).
#[inline(always)]
unsafe fn fma_group<const M: usize, const A: usize>(
    acc: &mut [[__m256; A]; M],
    w: &[__m256; 4],
    x: *const f32,
    ldx: usize,
    p: usize,
) {
    for (i, a) in acc.iter_mut().enumerate() {
        let xp = x.add(i * ldx + p);
        for (c, wc) in w.iter().enumerate() {
            a[c % A] = _mm256_fmadd_ps(*wc, _mm256_loadu_ps(xp.add(8 * c)), a[c % A]);
        }
    }
}

/// acc[i] += d * (w . x[i, p..p + 32]): the block's scale applied once per row to the dot of
/// the raw values, instead of once per weight. Fewer multiplies on the FMA ports when few rows
/// share the decoded block (m <= 2), the case where decode is most often compute-bound.
#[inline(always)]
unsafe fn fma_group_scaled<const M: usize, const A: usize>(
    acc: &mut [[__m256; A]; M],
    w: &[__m256; 4],
    d: __m256,
    x: *const f32,
    ldx: usize,
    p: usize,
) {
    for (i, a) in acc.iter_mut().enumerate() {
        let xp = x.add(i * ldx + p);
        let mut t = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
        t = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), t);
        t = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xp.add(16)), t);
        t = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xp.add(24)), t);
        a[0] = _mm256_fmadd_ps(d, t, a[0]);
    }
}

/// Rows at or below this take `fma_group_scaled` for Q8_0 / Q4_0.
const SCALE_AFTER_MAX_M: usize = 2;

#[inline(always)]
pub(super) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_movehdup_ps(s));
    _mm_cvtss_f32(s)
}

/// Dot products of one quantized W row (`k` elements at `row`) with M x rows.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot<const M: usize, const A: usize>(
    row: *const u8,
    dt: DType,
    k: usize,
    x: *const f32,
    ldx: usize,
) -> [f32; DECODE_MAX_M] {
    let mut acc = [[_mm256_setzero_ps(); A]; M];
    match dt {
        DType::Q8_0 => {
            for b in 0..k / QK {
                let bp = row.add(b * crate::quant::Q8_0_BYTES);
                let d = _mm256_set1_ps(f16_at(bp));
                let q = bp.add(2);
                let mut w = [_mm256_setzero_ps(); 4];
                for (c, wc) in w.iter_mut().enumerate() {
                    let v = _mm_loadl_epi64(q.add(8 * c) as *const __m128i);
                    *wc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                }
                if M <= SCALE_AFTER_MAX_M {
                    fma_group_scaled::<M, A>(&mut acc, &w, d, x, ldx, b * QK);
                } else {
                    for wc in w.iter_mut() {
                        *wc = _mm256_mul_ps(*wc, d);
                    }
                    fma_group::<M, A>(&mut acc, &w, x, ldx, b * QK);
                }
            }
        }
        DType::Q4_0 => {
            let low = _mm_set1_epi8(0x0F);
            for b in 0..k / QK {
                let bp = row.add(b * crate::quant::Q4_0_BYTES);
                let df = f16_at(bp);
                let d = _mm256_set1_ps(df);
                // q * d - 8d in one FMA: 8d is exact (a power-of-two multiple) and the FMA
                // rounds once, so this is bit-identical to ggml's (q - 8) * d.
                let d8 = _mm256_set1_ps(8.0 * df);
                let v = _mm_loadu_si128(bp.add(2) as *const __m128i);
                // Elements 0..16 in the low nibbles, 16..32 in the high ones.
                let lo = _mm_and_si128(v, low);
                let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
                let parts = [lo, _mm_srli_si128::<8>(lo), hi, _mm_srli_si128::<8>(hi)];
                let mut w = [_mm256_setzero_ps(); 4];
                if M <= SCALE_AFTER_MAX_M {
                    // q - 8 is exact; d is applied per row to the block's dot.
                    let eight = _mm256_set1_ps(8.0);
                    for (wc, part) in w.iter_mut().zip(parts) {
                        *wc = _mm256_sub_ps(u8x8_ps(part), eight);
                    }
                    fma_group_scaled::<M, A>(&mut acc, &w, d, x, ldx, b * QK);
                } else {
                    for (wc, part) in w.iter_mut().zip(parts) {
                        *wc = _mm256_fmsub_ps(u8x8_ps(part), d, d8);
                    }
                    fma_group::<M, A>(&mut acc, &w, x, ldx, b * QK);
                }
            }
        }
        DType::Q4_K => {
            let low = _mm_set1_epi8(0x0F);
            for sb in 0..k / QK_K {
                let bp = row.add(sb * crate::quant::Q4_K_BYTES);
                let (d, dmin) = (f16_at(bp), f16_at(bp.add(2)));
                let scales = std::slice::from_raw_parts(bp.add(4), 12);
                for c in 0..4 {
                    let q = bp.add(16 + 32 * c);
                    let v0 = _mm_loadu_si128(q as *const __m128i);
                    let v1 = _mm_loadu_si128(q.add(16) as *const __m128i);
                    // Sub-block 2c: low nibbles of the 32 bytes; 2c + 1: high nibbles.
                    let halves = [
                        (_mm_and_si128(v0, low), _mm_and_si128(v1, low)),
                        (
                            _mm_and_si128(_mm_srli_epi16::<4>(v0), low),
                            _mm_and_si128(_mm_srli_epi16::<4>(v1), low),
                        ),
                    ];
                    for (h, (a, b)) in halves.into_iter().enumerate() {
                        let (sc, mn) = scale_min_k4(2 * c + h, scales);
                        let dv = _mm256_set1_ps(d * sc as f32);
                        let mv = _mm256_set1_ps(dmin * mn as f32);
                        let parts = [a, _mm_srli_si128::<8>(a), b, _mm_srli_si128::<8>(b)];
                        let mut w = [_mm256_setzero_ps(); 4];
                        for (wc, part) in w.iter_mut().zip(parts) {
                            *wc = _mm256_fmsub_ps(u8x8_ps(part), dv, mv);
                        }
                        fma_group::<M, A>(&mut acc, &w, x, ldx, sb * QK_K + 64 * c + 32 * h);
                    }
                }
            }
        }
        DType::Q6_K => {
            let (low, three) = (_mm_set1_epi8(0x0F), _mm_set1_epi8(3));
            for sb in 0..k / QK_K {
                let bp = row.add(sb * Q6_K_BYTES);
                let d = f16_at(bp.add(Q6_K_D));
                for g in 0..QK_K / QK {
                    let (ql, ls, qh, hs, is) = q6_k_group(g);
                    let (ls, hs) = (_mm_cvtsi32_si128(ls as i32), _mm_cvtsi32_si128(hs as i32));
                    let mut w = [_mm256_setzero_ps(); 4];
                    for half in 0..2 {
                        // (d * sc) * (q - 32) as q * dsc - 32 dsc in one FMA: 32 dsc is exact
                        // and the FMA rounds once, as ggml's (d * sc) * (q - 32).
                        let dsc = d * *(bp.add(Q6_K_SCALES + is + half) as *const i8) as f32;
                        let (dv, d32) = (_mm256_set1_ps(dsc), _mm256_set1_ps(32.0 * dsc));
                        let l = _mm_loadu_si128(bp.add(ql + 16 * half) as *const __m128i);
                        let h = _mm_loadu_si128(bp.add(qh + 16 * half) as *const __m128i);
                        let q = _mm_or_si128(
                            _mm_and_si128(_mm_srl_epi16(l, ls), low),
                            _mm_slli_epi16::<4>(_mm_and_si128(_mm_srl_epi16(h, hs), three)),
                        );
                        w[2 * half] = _mm256_fmsub_ps(u8x8_ps(q), dv, d32);
                        w[2 * half + 1] = _mm256_fmsub_ps(u8x8_ps(_mm_srli_si128::<8>(q)), dv, d32);
                    }
                    fma_group::<M, A>(&mut acc, &w, x, ldx, sb * QK_K + QK * g);
                }
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("dense W in the quantized gemv"),
    }
    let mut r = [0f32; DECODE_MAX_M];
    for (ri, a) in r.iter_mut().zip(&acc) {
        let mut v = a[0];
        for &more in &a[1..] {
            v = _mm256_add_ps(v, more);
        }
        *ri = hsum(v);
    }
    r
}

/// As `quant_gemv::gemv_portable`, with AVX2 + FMA + F16C.
///
/// # Safety
/// As `gemv_portable`, and the CPU has AVX2, FMA and F16C (the kernel table checks).
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemv(
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
    // Q4_0 8 rows at a time, one row per lane (avx2_qpack: ~1.7x fewer instructions per weight
    // than one row at a time); the other types and the tail row by row.
    let done = if dt == DType::Q4_0 && w.rows >= 8 {
        let ls = w.ld / QK * crate::quant::Q4_0_BYTES;
        super::avx2_qpack::gemv_q4_0_in_place(
            w.row_ptr(0),
            ls,
            w.rows,
            k / QK,
            (x, ldx),
            m,
            out,
            ldo,
            acc,
        )
    } else {
        0
    };
    for j in done..w.rows {
        let row = w.row_ptr(j);
        let r = match m {
            1 => row_dot::<1, 2>(row, dt, k, x, ldx),
            2 => row_dot::<2, 2>(row, dt, k, x, ldx),
            3 => row_dot::<3, 2>(row, dt, k, x, ldx),
            4 => row_dot::<4, 2>(row, dt, k, x, ldx),
            5 => row_dot::<5, 1>(row, dt, k, x, ldx),
            6 => row_dot::<6, 1>(row, dt, k, x, ldx),
            7 => row_dot::<7, 1>(row, dt, k, x, ldx),
            _ => row_dot::<8, 1>(row, dt, k, x, ldx),
        };
        for (i, &v) in r.iter().enumerate().take(m) {
            let o = out.add(i * ldo + j);
            *o = if acc { *o + v } else { v };
        }
    }
}
