//! AVX2 kernels that read prepacked W panels (pack.rs) in their stored dtype: the 6 x 16 GEMM
//! micro-kernel and the decode panel kernel, for f16 panels (`vcvtph2ps` from memory) and bf16
//! pair panels (one 256-bit load holds 8 columns x 2 k; the even k is a 16-bit shift of each
//! lane, the odd k a mask), so packed 16-bit W is never widened in memory. f32 panels take the
//! plain f32 kernels.
//!
//! Every kernel here needs AVX2 + FMA + F16C (callers: `Avx2`'s `MicroKernel` impl, installed
//! only when they were detected; `Avx512`'s decode, whose CPUs have them too).

use super::avx2::{Load8, LoadF16, LoadF32};
use super::pack::PanelLayout;
use std::arch::x86_64::*;

/// Two k steps (2q, 2q + 1) of a 16-column panel as f32: [even lo, even hi, odd lo, odd hi].
trait PanelPairs {
    /// # Safety
    /// Pair row `q` of the panel at `b` (row stride `ldb` elements of the layout) is readable.
    unsafe fn pair(b: *const u8, ldb: usize, q: usize) -> [__m256; 4];
    /// The even k step 2q alone (also an odd kc's last step).
    ///
    /// # Safety
    /// As `pair`.
    unsafe fn even(b: *const u8, ldb: usize, q: usize) -> [__m256; 2];
    /// The odd k step 2q + 1 alone.
    ///
    /// # Safety
    /// As `pair`.
    unsafe fn odd(b: *const u8, ldb: usize, q: usize) -> [__m256; 2];
}

/// f32 or f16 panels: k step p is the 16 values at `p * ldb`.
struct Plain<L>(std::marker::PhantomData<L>);

impl<L: Load8> PanelPairs for Plain<L> {
    #[inline(always)]
    unsafe fn pair(b: *const u8, ldb: usize, q: usize) -> [__m256; 4] {
        let r0 = b.add(2 * q * ldb * L::SIZE);
        let r1 = b.add((2 * q + 1) * ldb * L::SIZE);
        [
            L::load8(r0),
            L::load8(r0.add(8 * L::SIZE)),
            L::load8(r1),
            L::load8(r1.add(8 * L::SIZE)),
        ]
    }
    #[inline(always)]
    unsafe fn even(b: *const u8, ldb: usize, q: usize) -> [__m256; 2] {
        let r0 = b.add(2 * q * ldb * L::SIZE);
        [L::load8(r0), L::load8(r0.add(8 * L::SIZE))]
    }
    #[inline(always)]
    unsafe fn odd(b: *const u8, ldb: usize, q: usize) -> [__m256; 2] {
        let r1 = b.add((2 * q + 1) * ldb * L::SIZE);
        [L::load8(r1), L::load8(r1.add(8 * L::SIZE))]
    }
}

/// bf16 pair panels: pair row q is `2 * ldb` u16 (ldb = the panel width), lane j = (k 2q, k 2q+1).
struct Bf16Pairs;

impl PanelPairs for Bf16Pairs {
    #[inline(always)]
    unsafe fn pair(b: *const u8, ldb: usize, q: usize) -> [__m256; 4] {
        let p = b.add(q * ldb * 4) as *const __m256i;
        let (r0, r1) = (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1)));
        let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
        [
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(r0)),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(r1)),
            _mm256_castsi256_ps(_mm256_and_si256(r0, hi)),
            _mm256_castsi256_ps(_mm256_and_si256(r1, hi)),
        ]
    }
    #[inline(always)]
    unsafe fn even(b: *const u8, ldb: usize, q: usize) -> [__m256; 2] {
        let p = b.add(q * ldb * 4) as *const __m256i;
        [
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_loadu_si256(p))),
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_loadu_si256(p.add(1)))),
        ]
    }
    #[inline(always)]
    unsafe fn odd(b: *const u8, ldb: usize, q: usize) -> [__m256; 2] {
        // black_box: load the pair row again (a memory operand of vpand) rather than let the
        // compiler keep `even`'s loads live across the even half, which spills accumulators.
        let p = std::hint::black_box(b.add(q * ldb * 4)) as *const __m256i;
        let hi = _mm256_set1_epi32(0xffff_0000u32 as i32);
        [
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(p), hi)),
            _mm256_castsi256_ps(_mm256_and_si256(_mm256_loadu_si256(p.add(1)), hi)),
        ]
    }
}

/// 6 x 16 tile: `c (+)= a (kc x 6 packed x) * panel (kc x 16)`.
#[inline(always)]
unsafe fn micro_6x16<P: PanelPairs>(
    kc: usize,
    a: *const f32,
    b: *const u8,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    let mut r = [[_mm256_setzero_ps(); 2]; 6];
    let mut ap = a;
    // Even and odd halves of a pair row one after the other: 12 accumulators + 2 W vectors +
    // a broadcast fit the 16 ymm registers (all four W vectors at once would spill).
    for q in 0..kc / 2 {
        let [e0, e1] = P::even(b, ldb, q);
        for (i, ri) in r.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(i));
            ri[0] = _mm256_fmadd_ps(av, e0, ri[0]);
            ri[1] = _mm256_fmadd_ps(av, e1, ri[1]);
        }
        let [o0, o1] = P::odd(b, ldb, q);
        for (i, ri) in r.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(6 + i));
            ri[0] = _mm256_fmadd_ps(av, o0, ri[0]);
            ri[1] = _mm256_fmadd_ps(av, o1, ri[1]);
        }
        ap = ap.add(12);
    }
    if kc % 2 == 1 {
        let [e0, e1] = P::even(b, ldb, kc / 2);
        for (i, ri) in r.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(i));
            ri[0] = _mm256_fmadd_ps(av, e0, ri[0]);
            ri[1] = _mm256_fmadd_ps(av, e1, ri[1]);
        }
    }
    for (i, ri) in r.iter().enumerate() {
        let cp = c.add(i * ldc);
        if acc {
            _mm256_storeu_ps(cp, _mm256_add_ps(_mm256_loadu_ps(cp), ri[0]));
            _mm256_storeu_ps(cp.add(8), _mm256_add_ps(_mm256_loadu_ps(cp.add(8)), ri[1]));
        } else {
            _mm256_storeu_ps(cp, ri[0]);
            _mm256_storeu_ps(cp.add(8), ri[1]);
        }
    }
}

/// The 6 x 16 micro-kernel on a 16-wide panel block in `layout`.
///
/// # Safety
/// AVX2 + FMA + F16C; as `MicroKernel::micro_panel` with NR = 16.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn micro_panel_6x16(
    kc: usize,
    a: *const f32,
    b: *const u8,
    layout: PanelLayout,
    c: *mut f32,
    ldc: usize,
    acc: bool,
) {
    match layout {
        PanelLayout::F32 => micro_6x16::<Plain<LoadF32>>(kc, a, b, 16, c, ldc, acc),
        PanelLayout::F16 => micro_6x16::<Plain<LoadF16>>(kc, a, b, 16, c, ldc, acc),
        PanelLayout::Bf16Pairs => micro_6x16::<Bf16Pairs>(kc, a, b, 16, c, ldc, acc),
        PanelLayout::Interleaved8 => unreachable!("quant packs are not read as panels"),
    }
}

/// M x-rows against NP panels (16 columns each, `pstride` bytes apart), k in pairs. The NP
/// panels are NP sequential streams (one lone stream leaves the memory system idle between the
/// prefetcher's requests) and M * NP * 2 independent accumulators hide the FMA latency.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_np<P: PanelPairs, const M: usize, const NP: usize>(
    x: *const f32,
    ldx: usize,
    b: *const u8,
    ldb: usize,
    pstride: usize,
    ocol: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let mut a = [[[_mm256_setzero_ps(); 2]; NP]; M];
    for q in 0..kc / 2 {
        for p in 0..NP {
            let [e0, e1, o0, o1] = P::pair(b.add(p * pstride), ldb, q);
            for (i, ai) in a.iter_mut().enumerate() {
                let xe = _mm256_broadcast_ss(&*x.add(i * ldx + 2 * q));
                let xo = _mm256_broadcast_ss(&*x.add(i * ldx + 2 * q + 1));
                ai[p][0] = _mm256_fmadd_ps(xe, e0, ai[p][0]);
                ai[p][1] = _mm256_fmadd_ps(xe, e1, ai[p][1]);
                ai[p][0] = _mm256_fmadd_ps(xo, o0, ai[p][0]);
                ai[p][1] = _mm256_fmadd_ps(xo, o1, ai[p][1]);
            }
        }
    }
    if kc % 2 == 1 {
        for p in 0..NP {
            let [e0, e1] = P::even(b.add(p * pstride), ldb, kc / 2);
            for (i, ai) in a.iter_mut().enumerate() {
                let xe = _mm256_broadcast_ss(&*x.add(i * ldx + kc - 1));
                ai[p][0] = _mm256_fmadd_ps(xe, e0, ai[p][0]);
                ai[p][1] = _mm256_fmadd_ps(xe, e1, ai[p][1]);
            }
        }
    }
    for (i, ai) in a.iter().enumerate() {
        for (p, ap) in ai.iter().enumerate() {
            let op = out.add(i * ldo + p * ocol);
            for (h, v) in ap.iter().enumerate() {
                let mut v = *v;
                if acc {
                    v = _mm256_add_ps(_mm256_loadu_ps(op.add(8 * h)), v);
                }
                _mm256_storeu_ps(op.add(8 * h), v);
            }
        }
    }
}

/// Rows in passes of up to 2 (the panel blocks stay in L1 between passes), panels in groups of
/// 4 (m = 1) or 2.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_rows<P: PanelPairs>(
    x: *const f32,
    ldx: usize,
    m: usize,
    b: *const u8,
    ldb: usize,
    pstride: usize,
    npan: usize,
    ocol: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let mut i = 0;
    while i < m {
        let (xi, oi) = (x.add(i * ldx), out.add(i * ldo));
        let mut p = 0;
        if m - i == 1 {
            while p + 4 <= npan {
                let (bp, op) = (b.add(p * pstride), oi.add(p * ocol));
                gemv_np::<P, 1, 4>(xi, ldx, bp, ldb, pstride, ocol, kc, op, ldo, acc);
                p += 4;
            }
            while p < npan {
                let (bp, op) = (b.add(p * pstride), oi.add(p * ocol));
                gemv_np::<P, 1, 1>(xi, ldx, bp, ldb, pstride, ocol, kc, op, ldo, acc);
                p += 1;
            }
            i += 1;
        } else {
            while p + 2 <= npan {
                let (bp, op) = (b.add(p * pstride), oi.add(p * ocol));
                gemv_np::<P, 2, 2>(xi, ldx, bp, ldb, pstride, ocol, kc, op, ldo, acc);
                p += 2;
            }
            while p < npan {
                let (bp, op) = (b.add(p * pstride), oi.add(p * ocol));
                gemv_np::<P, 2, 1>(xi, ldx, bp, ldb, pstride, ocol, kc, op, ldo, acc);
                p += 1;
            }
            i += 2;
        }
    }
}

/// Decode on `npan` panels of 16 columns (panel p at `b + p * pstride` bytes, k step rows `ldb`
/// columns wide: 16 for AVX2's panels; 32 for AVX-512's, called once per 16-column half with
/// `b` advanced by `half_offset` and `ocol` = 32); panel p's outputs go to `out + p * ocol`.
///
/// # Safety
/// AVX2 + FMA + F16C; x has m rows of kc floats at ldx; the panel blocks are readable; out has
/// m rows of npan * ocol writable floats at ldo.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_panels_16(
    x: *const f32,
    ldx: usize,
    m: usize,
    b: *const u8,
    ldb: usize,
    pstride: usize,
    npan: usize,
    ocol: usize,
    layout: PanelLayout,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let a = (x, ldx, m, b, ldb, pstride, npan, ocol, kc, out, ldo, acc);
    match layout {
        PanelLayout::F32 => gemv_rows::<Plain<LoadF32>>(
            a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7, a.8, a.9, a.10, a.11,
        ),
        PanelLayout::F16 => gemv_rows::<Plain<LoadF16>>(
            a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7, a.8, a.9, a.10, a.11,
        ),
        PanelLayout::Bf16Pairs => {
            gemv_rows::<Bf16Pairs>(a.0, a.1, a.2, a.3, a.4, a.5, a.6, a.7, a.8, a.9, a.10, a.11)
        }
        PanelLayout::Interleaved8 => unreachable!("quant packs are not read as panels"),
    }
}

/// Byte offset of column 16 inside one k step (or pair row) of a panel in `layout`: where the
/// second 16-column half of a 32-wide panel starts.
pub(crate) fn half_offset(layout: PanelLayout) -> usize {
    match layout {
        PanelLayout::F32 => 16 * 4,
        PanelLayout::F16 => 16 * 2,
        PanelLayout::Bf16Pairs => 16 * 4,
        PanelLayout::Interleaved8 => unreachable!("quant packs are not read as panels"),
    }
}
