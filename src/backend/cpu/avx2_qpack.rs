//! AVX2 + FMA + F16C decode on a repacked Q4_0 / Q8_0 W (`quant_pack`: 8-row interleaved
//! records): a record's chunks load straight into registers with W row r in lane r, its 8
//! scales are one 16-byte load, and no row needs a horizontal sum.
//!
//! Q8 activations (`gemv_q8`): per record and x row, Q4_0 is 8 `vpmaddubsw` (unsigned nibbles x
//! the x dword of those elements broadcast; the -8 comes from x's block sum once per block, as
//! in `avx2_q8::rows8_q4_0`), Q8_0 8 sign-trick `vpmaddubsw` + `vpmaddwd` (signed pairs reach
//! 32512, so each chunk widens to i32 before they add up). Exact (`gemv`): each element's 8 row
//! values are sign-extended from their byte to an i32 lane (`(v << 24 - 8t) >> 24`, the -8 of
//! Q4_0 subtracted on the bytes once per chunk), converted and FMA'd against that x element
//! broadcast; the scale is applied per block to the dot (m <= 2) or to the weights (m > 2), as
//! the in-place kernels do, so the results match theirs within f32 reassociation.

use super::avx2_q8::{prefetch_next_rows8, q4_0_rows8_block, q4_lanes_step};
use super::driver::DECODE_MAX_M;
use super::quant_pack::{record_bytes, QPackGemv, GROUP};
use crate::dtype::DType;
use crate::quant::{Q8Rows, QK};
use std::arch::x86_64::*;

/// Byte t (0..4) of every i32 lane, sign-extended.
#[inline(always)]
unsafe fn byte_i32<const T: i32>(v: __m256i) -> __m256i {
    match T {
        0 => _mm256_srai_epi32::<24>(_mm256_slli_epi32::<24>(v)),
        1 => _mm256_srai_epi32::<24>(_mm256_slli_epi32::<16>(v)),
        2 => _mm256_srai_epi32::<24>(_mm256_slli_epi32::<8>(v)),
        _ => _mm256_srai_epi32::<24>(v),
    }
}

/// The four elements of one chunk (bytes 0..4 of each lane) as f32 row vectors.
#[inline(always)]
unsafe fn chunk_ps(v: __m256i) -> [__m256; 4] {
    [
        _mm256_cvtepi32_ps(byte_i32::<0>(v)),
        _mm256_cvtepi32_ps(byte_i32::<1>(v)),
        _mm256_cvtepi32_ps(byte_i32::<2>(v)),
        _mm256_cvtepi32_ps(byte_i32::<3>(v)),
    ]
}

/// Q4_0 nibble chunks (bytes 4c..4c+4 of each row, c < 4) as signed element chunks: the low
/// nibbles minus 8 (elements 4c..) then the high ones (16 + 4c..).
#[inline(always)]
unsafe fn q4_signed(c: [__m256i; 4]) -> [__m256i; 8] {
    let (low, eight) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi8(8));
    let mut v = [_mm256_setzero_si256(); 8];
    for (i, q) in c.into_iter().enumerate() {
        v[i] = _mm256_sub_epi8(_mm256_and_si256(q, low), eight);
        v[4 + i] = _mm256_sub_epi8(_mm256_and_si256(_mm256_srli_epi16::<4>(q), low), eight);
    }
    v
}

/// 8 W rows' blocks in row-per-lane form: block b's 8 scales as f32 lanes and 8 signed element
/// chunks (chunk i = elements 4i..4i+4, one byte each, row r in lane r).
trait Rows8 {
    unsafe fn block(&self, b: usize) -> (__m256, [__m256i; 8]);
}

/// Prefetches a record's bytes `PF_RECORD` ahead: a pack is one stream per thread, and
/// prefetching it ahead keeps more of its lines in flight than the hardware prefetcher does
/// alone.
#[inline(always)]
unsafe fn prefetch_record(p: *const u8, rec: usize) {
    let mut o = 0;
    while o < rec {
        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PF_RECORD + o) as *const i8);
        o += 64;
    }
}

/// Bytes ahead `prefetch_record` reads: ~7 Q4_0 / ~4 Q8_0 records.
const PF_RECORD: usize = 1024;

/// A group of a pack (`quant_pack`), Q4_0 or Q8_0.
struct Packed {
    g0: *const u8,
    dt: DType,
    /// `record_bytes(dt)`, once per group rather than per block.
    rec: usize,
}

impl Rows8 for Packed {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (__m256, [__m256i; 8]) {
        let p = self.g0.add(b * self.rec);
        prefetch_record(p, self.rec);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let ld = |c: usize| _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
        if self.dt == DType::Q4_0 {
            (dw, q4_signed([ld(0), ld(1), ld(2), ld(3)]))
        } else {
            (dw, [ld(0), ld(1), ld(2), ld(3), ld(4), ld(5), ld(6), ld(7)])
        }
    }
}

/// 8 Q4_0 rows read in place (GGUF layout), transposed per block (`q4_0_rows8_block`).
struct InPlaceQ4_0 {
    w0: *const u8,
    ls: usize,
}

impl Rows8 for InPlaceQ4_0 {
    #[inline(always)]
    unsafe fn block(&self, b: usize) -> (__m256, [__m256i; 8]) {
        prefetch_next_rows8(self.w0, self.ls, b);
        let (dw, c) = q4_0_rows8_block(self.w0, self.ls, b);
        (dw, q4_signed(c))
    }
}

/// Exact dots of one 8-row group with M f32 x rows; lane r of result i = row r . x row i.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_exact<S: Rows8, const M: usize>(
    src: &S,
    nb: usize,
    x: *const f32,
    ldx: usize,
) -> [__m256; M] {
    let mut acc = [_mm256_setzero_ps(); M];
    let first = [0, 4, 8, 12, 16, 20, 24, 28];
    for b in 0..nb {
        let (dw, chunks) = src.block(b);
        let xb = |i: usize, e: usize| _mm256_broadcast_ss(&*x.add(i * ldx + b * QK + e));
        if M <= 2 {
            // The block's dot first (4 chains per row hide the FMA latency), then d once.
            let mut s = [[_mm256_setzero_ps(); 4]; M];
            for (c, &e0) in chunks.iter().zip(&first) {
                let w = chunk_ps(*c);
                for (i, si) in s.iter_mut().enumerate() {
                    for (t, (st, wt)) in si.iter_mut().zip(&w).enumerate() {
                        *st = _mm256_fmadd_ps(*wt, xb(i, e0 + t), *st);
                    }
                }
            }
            for (a, si) in acc.iter_mut().zip(&s) {
                let t = _mm256_add_ps(_mm256_add_ps(si[0], si[1]), _mm256_add_ps(si[2], si[3]));
                *a = _mm256_fmadd_ps(dw, t, *a);
            }
        } else {
            // Scaled weights (exact: (q - 8) * d rounds once, as ggml's dequantization); M
            // rows are M independent chains.
            for (c, &e0) in chunks.iter().zip(&first) {
                let w = chunk_ps(*c);
                for (t, wt) in w.iter().enumerate() {
                    let wd = _mm256_mul_ps(*wt, dw);
                    for (i, a) in acc.iter_mut().enumerate() {
                        *a = _mm256_fmadd_ps(wd, xb(i, e0 + t), *a);
                    }
                }
            }
        }
    }
    acc
}

/// Q8-activation dots of one 8-row group with M x rows of `x`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_q8<const M: usize>(g0: *const u8, dt: DType, nb: usize, x: &Q8Rows) -> [__m256; M] {
    let rec = record_bytes(dt);
    let (k, xq, xd) = (x.k, x.q.as_ptr(), x.d.as_ptr());
    let (low, ones) = (_mm256_set1_epi8(0x0F), _mm256_set1_epi16(1));
    let mut acc = [_mm256_setzero_ps(); M];
    for b in 0..nb {
        let p = g0.add(b * rec);
        prefetch_record(p, rec);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
        let ld = |c: usize| _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
        if dt == DType::Q4_0 {
            let c = [ld(0), ld(1), ld(2), ld(3)];
            let lo = c.map(|v| _mm256_and_si256(v, low));
            let hi = c.map(|v| _mm256_and_si256(_mm256_srli_epi16::<4>(v), low));
            for (i, a) in acc.iter_mut().enumerate() {
                *a = q4_lanes_step(&lo, &hi, x, i, b, dw, *a);
            }
        } else {
            let c = [ld(0), ld(1), ld(2), ld(3), ld(4), ld(5), ld(6), ld(7)];
            let mag = c.map(|v| _mm256_sign_epi8(v, v));
            for (i, a) in acc.iter_mut().enumerate() {
                let xb = xq.add(i * k + b * QK) as *const i32;
                let mut s = _mm256_setzero_si256();
                for (j, (mj, cj)) in mag.iter().zip(&c).enumerate() {
                    let bx = _mm256_set1_epi32(xb.add(j).read_unaligned());
                    let pr = _mm256_maddubs_epi16(*mj, _mm256_sign_epi8(bx, *cj));
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(pr, ones));
                }
                let dot = _mm256_cvtepi32_ps(s);
                let sx = _mm256_mul_ps(dw, _mm256_set1_ps(*xd.add(i * nb + b)));
                *a = _mm256_fmadd_ps(sx, dot, *a);
            }
        }
    }
    acc
}

/// The M results in the first M of 8 slots (the rest zero).
#[inline(always)]
unsafe fn pad<const M: usize>(r: [__m256; M]) -> [__m256; DECODE_MAX_M] {
    let mut o = [_mm256_setzero_ps(); DECODE_MAX_M];
    o[..M].copy_from_slice(&r);
    o
}

macro_rules! by_m {
    ($m:expr, $f:ident $(:: <$t:ty>)?, $($a:expr),*) => {
        match $m {
            1 => pad($f::<$($t,)? 1>($($a),*)),
            2 => pad($f::<$($t,)? 2>($($a),*)),
            3 => pad($f::<$($t,)? 3>($($a),*)),
            4 => pad($f::<$($t,)? 4>($($a),*)),
            5 => pad($f::<$($t,)? 5>($($a),*)),
            6 => pad($f::<$($t,)? 6>($($a),*)),
            7 => pad($f::<$($t,)? 7>($($a),*)),
            _ => pad($f::<$($t,)? 8>($($a),*)),
        }
    };
}

/// Writes lanes 0..rows of r[i] to `out + i * ldo` for i < m, adding to what is there when
/// `acc`.
#[inline(always)]
unsafe fn store(
    r: &[__m256; DECODE_MAX_M],
    m: usize,
    rows: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    for (i, v) in r.iter().enumerate().take(m) {
        let o = out.add(i * ldo);
        let mut t = [0f32; GROUP];
        _mm256_storeu_ps(t.as_mut_ptr(), *v);
        for (l, tv) in t.iter().enumerate().take(rows) {
            *o.add(l) = if acc { *o.add(l) + tv } else { *tv };
        }
    }
}

/// As `quant_pack::gemv_portable`, with AVX2 + FMA + F16C.
///
/// # Safety
/// As `quant_pack::gemv_portable`, and the CPU has AVX2, FMA and F16C (the kernel table checks).
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv(c: &QPackGemv<'_>) {
    debug_assert!(c.j0.is_multiple_of(GROUP) && (1..=DECODE_MAX_M).contains(&c.m));
    let (dt, nb, rec) = (c.dt, c.nb, record_bytes(c.dt));
    for (g, j, gr) in c.groups() {
        let g0 = c.base.add(g * nb * rec);
        let r = match c.xq {
            Some(xq) => by_m!(c.m, group_q8, g0, dt, nb, xq),
            None => by_m!(
                c.m,
                group_exact::<Packed>,
                &Packed { g0, dt, rec },
                nb,
                c.x.0,
                c.x.1
            ),
        };
        store(&r, c.m, gr, c.out.add(j), c.ldo, false);
    }
}

/// Exact decode of in-place Q4_0 rows `w0 ..` (`rows` of them, `ls` bytes apart, `nb` blocks),
/// 8 at a time in row-per-lane form (`avx2_quant::gemv` hands its Q4_0 row groups here);
/// returns the rows done (a multiple of 8; the caller takes the tail).
///
/// # Safety
/// As `avx2_quant::gemv` for those rows; the CPU has AVX2, FMA and F16C.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn gemv_q4_0_in_place(
    w0: *const u8,
    ls: usize,
    rows: usize,
    nb: usize,
    x: (*const f32, usize),
    m: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) -> usize {
    let mut j = 0;
    while j + GROUP <= rows {
        let src = InPlaceQ4_0 {
            w0: w0.add(j * ls),
            ls,
        };
        let r = by_m!(m, group_exact::<InPlaceQ4_0>, &src, nb, x.0, x.1);
        store(&r, m, GROUP, out.add(j), ldo, acc);
        j += GROUP;
    }
    j
}
