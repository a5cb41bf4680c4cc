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
    /// The single (even) k step 2q, for an odd kc's last step.
    ///
    /// # Safety
    /// As `pair`.
    unsafe fn even(b: *const u8, ldb: usize, q: usize) -> [__m256; 2];
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
    for q in 0..kc / 2 {
        let [e0, e1, o0, o1] = P::pair(b, ldb, q);
        for (i, ri) in r.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(i));
            ri[0] = _mm256_fmadd_ps(av, e0, ri[0]);
            ri[1] = _mm256_fmadd_ps(av, e1, ri[1]);
        }
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
    }
}

/// M (<= 2) x-rows against 16 panel columns; even and odd k accumulate apart (4 M independent
/// FMA chains, enough to stream W at memory speed for m = 1).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_16<P: PanelPairs, const M: usize>(
    x: *const f32,
    ldx: usize,
    b: *const u8,
    ldb: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let mut e = [[_mm256_setzero_ps(); 2]; M];
    let mut o = [[_mm256_setzero_ps(); 2]; M];
    for q in 0..kc / 2 {
        let [e0, e1, o0, o1] = P::pair(b, ldb, q);
        for i in 0..M {
            let xe = _mm256_broadcast_ss(&*x.add(i * ldx + 2 * q));
            let xo = _mm256_broadcast_ss(&*x.add(i * ldx + 2 * q + 1));
            e[i][0] = _mm256_fmadd_ps(xe, e0, e[i][0]);
            e[i][1] = _mm256_fmadd_ps(xe, e1, e[i][1]);
            o[i][0] = _mm256_fmadd_ps(xo, o0, o[i][0]);
            o[i][1] = _mm256_fmadd_ps(xo, o1, o[i][1]);
        }
    }
    if kc % 2 == 1 {
        let [e0, e1] = P::even(b, ldb, kc / 2);
        for (i, ei) in e.iter_mut().enumerate() {
            let xe = _mm256_broadcast_ss(&*x.add(i * ldx + kc - 1));
            ei[0] = _mm256_fmadd_ps(xe, e0, ei[0]);
            ei[1] = _mm256_fmadd_ps(xe, e1, ei[1]);
        }
    }
    for i in 0..M {
        let op = out.add(i * ldo);
        for h in 0..2 {
            let mut v = _mm256_add_ps(e[i][h], o[i][h]);
            if acc {
                v = _mm256_add_ps(_mm256_loadu_ps(op.add(8 * h)), v);
            }
            _mm256_storeu_ps(op.add(8 * h), v);
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_rows<P: PanelPairs>(
    x: *const f32,
    ldx: usize,
    m: usize,
    b: *const u8,
    ldb: usize,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    // Passes of two rows: the panel block (<= 256 k x 16 columns) stays in L1 between passes.
    let mut i = 0;
    while i + 2 <= m {
        gemv_16::<P, 2>(x.add(i * ldx), ldx, b, ldb, kc, out.add(i * ldo), ldo, acc);
        i += 2;
    }
    if i < m {
        gemv_16::<P, 1>(x.add(i * ldx), ldx, b, ldb, kc, out.add(i * ldo), ldo, acc);
    }
}

/// Decode on 16 columns of a panel whose rows are `ldb` columns wide (16 for AVX2's panels; 32
/// for AVX-512's, called once per 16-column half with `b` advanced by `half_offset`).
///
/// # Safety
/// AVX2 + FMA + F16C; x has m rows of kc floats at ldx; the panel block is readable; out has m
/// rows of 16 writable floats at ldo.
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemv_panel_16(
    x: *const f32,
    ldx: usize,
    m: usize,
    b: *const u8,
    ldb: usize,
    layout: PanelLayout,
    kc: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    match layout {
        PanelLayout::F32 => gemv_rows::<Plain<LoadF32>>(x, ldx, m, b, ldb, kc, out, ldo, acc),
        PanelLayout::F16 => gemv_rows::<Plain<LoadF16>>(x, ldx, m, b, ldb, kc, out, ldo, acc),
        PanelLayout::Bf16Pairs => gemv_rows::<Bf16Pairs>(x, ldx, m, b, ldb, kc, out, ldo, acc),
    }
}

/// Byte offset of column 16 inside one k step (or pair row) of a panel in `layout`: where the
/// second 16-column half of a 32-wide panel starts.
pub(crate) fn half_offset(layout: PanelLayout) -> usize {
    match layout {
        PanelLayout::F32 => 16 * 4,
        PanelLayout::F16 => 16 * 2,
        PanelLayout::Bf16Pairs => 16 * 4,
    }
}
