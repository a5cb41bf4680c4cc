//! AVX2 decode on block-quantized W with x quantized to Q8 blocks (`Q8Rows`; the opt-in
//! `ActQuant::Q8` mode): integer dot products as llama.cpp does them on AVX2. Each 32-weight
//! block becomes 32 bytes in one register (Q4: nibbles unpacked with and/shift; Q4_0 re-centred
//! by -8, Q6_K by -32), then per x row `vpmaddubsw` (u8 x i8 pairs -> i16) and `vpmaddwd` (-> 8 i32), one
//! convert and one FMA by `d_w * d_x`. Per 32 weights that is ~12 instructions against ~40 for
//! the exact f32 path (widen to i32, convert, FMA in four 8-lane parts), so one core decodes
//! faster than memory delivers the blocks.
//!
//! `vpmaddubsw` takes unsigned x signed: signed pairs go through the sign trick
//! (`|w| * sign(x, w)`), exact because |x_q| <= 127 (Q8Rows clamps) and |w| <= 128, so a pair
//! sum stays below the i16 limit (2 * 128 * 127 = 32512). Q4_K nibbles are unsigned already;
//! its min term uses each x block's `d * sum(q)` (`Q8Rows::ds`).

use super::avx2_quant::{f16_at, hsum};
use super::driver::DECODE_MAX_M;
use crate::dtype::DType;
use crate::matrix::MatRef;
use crate::quant::{
    q6_k_group, scale_min_k4, Q8Rows, Q4_0_BYTES, Q4_K_BYTES, Q6_K_BYTES, Q6_K_D, Q6_K_SCALES,
    Q8_0_BYTES, QK, QK_K,
};
use std::arch::x86_64::*;

/// Signed w . signed x over 32 bytes, as 8 f32 lanes of exact i32 partial sums.
#[inline(always)]
unsafe fn dot_i8(w: __m256i, x: __m256i) -> __m256 {
    let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
}

/// Unsigned w (0..15) . signed x over 32 bytes, as 8 f32 lanes of exact i32 partial sums.
#[inline(always)]
unsafe fn dot_u4(w: __m256i, x: __m256i) -> __m256 {
    _mm256_cvtepi32_ps(_mm256_madd_epi16(
        _mm256_maddubs_epi16(w, x),
        _mm256_set1_epi16(1),
    ))
}

/// Block `b` of a Q8_0 / Q4_0 row as 32 signed bytes in element order, and its scale.
/// (Keeping Q4_0's nibbles unsigned and taking its -8 from the x block sums measured slower
/// here: 4.4 ms against 3.2 ms for 4096 -> 11008 at m = 1.)
#[inline(always)]
unsafe fn block_i8(row: *const u8, dt: DType, b: usize) -> (__m256i, f32) {
    if dt == DType::Q8_0 {
        let bp = row.add(b * Q8_0_BYTES);
        (_mm256_loadu_si256(bp.add(2) as *const __m256i), f16_at(bp))
    } else {
        let bp = row.add(b * Q4_0_BYTES);
        let v = _mm_loadu_si128(bp.add(2) as *const __m128i);
        let low = _mm_set1_epi8(0x0F);
        // Elements 0..16 are the low nibbles, 16..32 the high ones.
        let lo = _mm_and_si128(v, low);
        let hi = _mm_and_si128(_mm_srli_epi16::<4>(v), low);
        let w = _mm256_sub_epi8(_mm256_set_m128i(hi, lo), _mm256_set1_epi8(8));
        (w, f16_at(bp))
    }
}

/// Dot products of one quantized W row with M Q8 x rows; A accumulators per row (2 overlap
/// the FMA latency when few rows share a block).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn row_dot<const M: usize, const A: usize>(
    row: *const u8,
    dt: DType,
    x: &Q8Rows,
) -> [f32; DECODE_MAX_M] {
    let (k, nb) = (x.k, x.k / QK);
    let (xq, xd, xds) = (x.q.as_ptr(), x.d.as_ptr(), x.ds.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); A]; M];
    let mut mins = [0f32; M];
    match dt {
        DType::Q8_0 | DType::Q4_0 => {
            let mut b = 0;
            while b + A <= nb {
                for u in 0..A {
                    let (w, dw) = block_i8(row, dt, b + u);
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_si256(xq.add(i * k + (b + u) * QK) as *const __m256i);
                        let s = _mm256_set1_ps(dw * *xd.add(i * nb + b + u));
                        a[u] = _mm256_fmadd_ps(s, dot_i8(w, xv), a[u]);
                    }
                }
                b += A;
            }
            while b < nb {
                let (w, dw) = block_i8(row, dt, b);
                for (i, a) in acc.iter_mut().enumerate() {
                    let xv = _mm256_loadu_si256(xq.add(i * k + b * QK) as *const __m256i);
                    let s = _mm256_set1_ps(dw * *xd.add(i * nb + b));
                    a[0] = _mm256_fmadd_ps(s, dot_i8(w, xv), a[0]);
                }
                b += 1;
            }
        }
        DType::Q4_K => {
            let low = _mm256_set1_epi8(0x0F);
            for sb in 0..k / QK_K {
                let bp = row.add(sb * Q4_K_BYTES);
                let (d, dmin) = (f16_at(bp), f16_at(bp.add(2)));
                let scales = std::slice::from_raw_parts(bp.add(4), 12);
                for c in 0..4 {
                    let v = _mm256_loadu_si256(bp.add(16 + 32 * c) as *const __m256i);
                    // Sub-block 2c: the low nibbles of the 32 bytes; 2c + 1: the high ones.
                    let halves = [
                        _mm256_and_si256(v, low),
                        _mm256_and_si256(_mm256_srli_epi16::<4>(v), low),
                    ];
                    for (h, w) in halves.into_iter().enumerate() {
                        let sub = sb * (QK_K / QK) + 2 * c + h;
                        let (sc, mn) = scale_min_k4(2 * c + h, scales);
                        let (dsc, mm) = (d * sc as f32, dmin * mn as f32);
                        for (i, a) in acc.iter_mut().enumerate() {
                            let xv = _mm256_loadu_si256(xq.add(i * k + sub * QK) as *const __m256i);
                            let s = _mm256_set1_ps(dsc * *xd.add(i * nb + sub));
                            a[h % A] = _mm256_fmadd_ps(s, dot_u4(w, xv), a[h % A]);
                            mins[i] += mm * *xds.add(i * nb + sub);
                        }
                    }
                }
            }
        }
        DType::Q6_K => {
            let (low, three, c32) = (
                _mm256_set1_epi8(0x0F),
                _mm256_set1_epi8(3),
                _mm256_set1_epi8(32),
            );
            for sb in 0..k / QK_K {
                let bp = row.add(sb * Q6_K_BYTES);
                let d = f16_at(bp.add(Q6_K_D));
                for g in 0..QK_K / QK {
                    let (ql, ls, qh, hs, is) = q6_k_group(g);
                    let (ls, hs) = (_mm_cvtsi32_si128(ls as i32), _mm_cvtsi32_si128(hs as i32));
                    let l = _mm256_loadu_si256(bp.add(ql) as *const __m256i);
                    let h = _mm256_loadu_si256(bp.add(qh) as *const __m256i);
                    // q - 32 in -32..31: signed bytes for the sign trick (dot_i8).
                    let w = _mm256_sub_epi8(
                        _mm256_or_si256(
                            _mm256_and_si256(_mm256_srl_epi16(l, ls), low),
                            _mm256_slli_epi16::<4>(_mm256_and_si256(
                                _mm256_srl_epi16(h, hs),
                                three,
                            )),
                        ),
                        c32,
                    );
                    // dot_i8's lanes 0..3 sum elements 0..15 (first scale), 4..7 16..31.
                    let sc = bp.add(Q6_K_SCALES + is) as *const i8;
                    let sv = _mm256_set_m128(
                        _mm_set1_ps(d * *sc.add(1) as f32),
                        _mm_set1_ps(d * *sc as f32),
                    );
                    let sub = sb * (QK_K / QK) + g;
                    for (i, a) in acc.iter_mut().enumerate() {
                        let xv = _mm256_loadu_si256(xq.add(i * k + sub * QK) as *const __m256i);
                        let s = _mm256_mul_ps(sv, _mm256_set1_ps(*xd.add(i * nb + sub)));
                        a[g % A] = _mm256_fmadd_ps(s, dot_i8(w, xv), a[g % A]);
                    }
                }
            }
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("dense W in the Q8 gemv"),
    }
    let mut r = [0f32; DECODE_MAX_M];
    for (i, a) in acc.iter().enumerate() {
        let mut v = a[0];
        for &more in &a[1..] {
            v = _mm256_add_ps(v, more);
        }
        r[i] = hsum(v) - mins[i];
    }
    r
}

/// One Q4_0 block of 8 W rows (row r in lane r) against x row i's block b: `lo[c]` / `hi[c]`
/// hold the unsigned low / high nibbles of the rows' quant bytes 4c..4c+4 (elements 4c.. and
/// 16+4c..). Returns `acc + d_w * d_x * sum((q_w - 8) q_x)` per lane: the x dword of each
/// 4 elements broadcast, 8 `vpmaddubsw` summed in i16 (8 x 2 x 15 x 127 = 30480 < 32767),
/// one `vpmaddwd`, and the -8 from x's block sum (`ds` = d_x sum(q_x)) once per block.
///
/// # Safety
/// x holds row i with block b; AVX2 + FMA (inlined into such functions only).
#[inline(always)]
pub(super) unsafe fn q4_lanes_step(
    lo: &[__m256i; 4],
    hi: &[__m256i; 4],
    x: &Q8Rows,
    i: usize,
    b: usize,
    dw: __m256,
    acc: __m256,
) -> __m256 {
    let nb = x.k / QK;
    let xb = x.q.as_ptr().add(i * x.k + b * QK) as *const i32;
    let bx = |g: usize| _mm256_set1_epi32(xb.add(g).read_unaligned());
    let mut p = _mm256_maddubs_epi16(lo[0], bx(0));
    for (g, l) in lo.iter().enumerate().skip(1) {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*l, bx(g)));
    }
    for (g, h) in hi.iter().enumerate() {
        p = _mm256_add_epi16(p, _mm256_maddubs_epi16(*h, bx(4 + g)));
    }
    let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
    // d_x * sum(q_w x) - 8 d_x sum(x) = d_x * sum((q_w - 8) x), then times d_w.
    let t = _mm256_fmadd_ps(
        _mm256_set1_ps(*x.ds.as_ptr().add(i * nb + b)),
        _mm256_set1_ps(-8.0),
        _mm256_mul_ps(_mm256_set1_ps(*x.d.as_ptr().add(i * nb + b)), dot),
    );
    _mm256_fmadd_ps(dw, t, acc)
}

/// Prefetches the next 8 rows (`w0 + 8 ls`) 144 bytes per block b, so that over the 8 rows'
/// pass the next group's 8 x ls bytes arrive as one sequential stream: the 8 row streams of a
/// group at 2-4 KiB strides alone leave the hardware prefetchers behind (~2x slower in place
/// than the same kernel on a pack, whose groups are contiguous).
#[inline(always)]
pub(super) unsafe fn prefetch_next_rows8(w0: *const u8, ls: usize, b: usize) {
    let p = w0.wrapping_add(8 * ls + b * 144);
    _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64) as *const i8);
    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(128) as *const i8);
}

/// Block b of 8 in-place Q4_0 rows (`w0` = the first, rows `ls` bytes apart) in the row-per-lane
/// form of a packed record (`quant_pack`): the 8 scales as f32 lanes, and chunk c = quant bytes
/// 4c..4c+4 of each row in lane r. The rows' 16 quant bytes are loaded two rows to a register
/// and transposed in 4-byte groups (8 unpacks); the scales are 8 16-bit inserts.
///
/// # Safety
/// The 8 rows hold block b; AVX2 + F16C (inlined into such functions only).
#[inline(always)]
pub(super) unsafe fn q4_0_rows8_block(
    w0: *const u8,
    ls: usize,
    b: usize,
) -> (__m256, [__m256i; 4]) {
    let bp = w0.add(b * Q4_0_BYTES);
    let qs = |r: usize| bp.add(r * ls + 2) as *const __m128i;
    let h = |r: usize| (bp.add(r * ls) as *const i16).read_unaligned();
    // Register lo half = rows 0..3, hi half = rows 4..7.
    let (r0, r1, r2, r3) = (
        _mm256_loadu2_m128i(qs(4), qs(0)),
        _mm256_loadu2_m128i(qs(5), qs(1)),
        _mm256_loadu2_m128i(qs(6), qs(2)),
        _mm256_loadu2_m128i(qs(7), qs(3)),
    );
    let (t0, t1) = (_mm256_unpacklo_epi32(r0, r1), _mm256_unpacklo_epi32(r2, r3));
    let (t2, t3) = (_mm256_unpackhi_epi32(r0, r1), _mm256_unpackhi_epi32(r2, r3));
    let c = [
        _mm256_unpacklo_epi64(t0, t1),
        _mm256_unpackhi_epi64(t0, t1),
        _mm256_unpacklo_epi64(t2, t3),
        _mm256_unpackhi_epi64(t2, t3),
    ];
    let dw = _mm256_cvtph_ps(_mm_set_epi16(
        h(7),
        h(6),
        h(5),
        h(4),
        h(3),
        h(2),
        h(1),
        h(0),
    ));
    (dw, c)
}

/// Q4_0 against M Q8 x rows for 8 W rows at once (`w0` = row j0, rows `ls` bytes apart), read
/// in place from the GGUF layout: lane r of a vector is W row j0 + r, so the per-block work
/// that `row_dot` does once per row (i32 sum, convert, scale multiply-add) is done once per
/// 8 rows, and the nibbles stay unsigned (`vpmaddubsw` wants them so: no sign trick, no -8 per
/// byte; the -8 comes once per block from x's block sum, `8 * d_x * sum(q_x)` = `8 * ds`).
///
/// Per block `q4_0_rows8_block` transposes the 8 rows so chunk c holds bytes 4c..4c+4 of every
/// row: its low nibbles are elements 4c..4c+4, its high nibbles 16+4c..16+4c+4; then
/// `q4_lanes_step` per x row.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows8_q4_0<const M: usize>(
    w0: *const u8,
    ls: usize,
    x: &Q8Rows,
    out: *mut f32,
    ldo: usize,
    acc_out: bool,
) {
    let (nb, low) = (x.k / QK, _mm256_set1_epi8(0x0F));
    let mut acc = [_mm256_setzero_ps(); M];
    for b in 0..nb {
        prefetch_next_rows8(w0, ls, b);
        let (dw, c) = q4_0_rows8_block(w0, ls, b);
        let lo = c.map(|v| _mm256_and_si256(v, low));
        let hi = c.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
        for (i, a) in acc.iter_mut().enumerate() {
            *a = q4_lanes_step(&lo, &hi, x, i, b, dw, *a);
        }
    }
    for (i, a) in acc.iter().enumerate() {
        let o = out.add(i * ldo);
        let v = if acc_out {
            _mm256_add_ps(_mm256_loadu_ps(o), *a)
        } else {
            *a
        };
        _mm256_storeu_ps(o, v);
    }
}

/// As `quant_gemv::gemv_q8_portable`, with AVX2 + FMA + F16C.
///
/// # Safety
/// As `gemv_q8_portable`, and the CPU has AVX2, FMA and F16C (the kernel table checks).
pub unsafe fn gemv(x: &Q8Rows, m: usize, w: &MatRef<'_>, out: *mut f32, ldo: usize, acc: bool) {
    debug_assert!(w.dtype.is_quantized() && m <= DECODE_MAX_M && w.cols == x.k);
    debug_assert!(x.q.len() >= m * x.k);
    let dt = w.dtype;
    let mut j = 0;
    if dt == DType::Q4_0 {
        let ls = w.ld / QK * Q4_0_BYTES;
        while j + 8 <= w.rows {
            let (w0, o) = (w.row_ptr(j), out.add(j));
            match m {
                1 => rows8_q4_0::<1>(w0, ls, x, o, ldo, acc),
                2 => rows8_q4_0::<2>(w0, ls, x, o, ldo, acc),
                3 => rows8_q4_0::<3>(w0, ls, x, o, ldo, acc),
                4 => rows8_q4_0::<4>(w0, ls, x, o, ldo, acc),
                5 => rows8_q4_0::<5>(w0, ls, x, o, ldo, acc),
                6 => rows8_q4_0::<6>(w0, ls, x, o, ldo, acc),
                7 => rows8_q4_0::<7>(w0, ls, x, o, ldo, acc),
                _ => rows8_q4_0::<8>(w0, ls, x, o, ldo, acc),
            }
            j += 8;
        }
    }
    for j in j..w.rows {
        let row = w.row_ptr(j);
        let r = match m {
            1 => row_dot::<1, 2>(row, dt, x),
            2 => row_dot::<2, 2>(row, dt, x),
            3 => row_dot::<3, 2>(row, dt, x),
            4 => row_dot::<4, 2>(row, dt, x),
            5 => row_dot::<5, 1>(row, dt, x),
            6 => row_dot::<6, 1>(row, dt, x),
            7 => row_dot::<7, 1>(row, dt, x),
            _ => row_dot::<8, 1>(row, dt, x),
        };
        for (i, &v) in r.iter().enumerate().take(m) {
            let o = out.add(i * ldo + j);
            *o = if acc { *o + v } else { v };
        }
    }
}
