//! AVX2 + FMA + F16C kernels: a 6 x 16 micro-kernel (12 ymm accumulators, the classic shape for
//! two 256-bit FMA pipes), a W packer that converts f16 (`vcvtph2ps`) / bf16 (zero-extend and
//! shift) with SIMD inside an 8 x 8 transpose, a decode gemv that converts W in registers, and a
//! SIMD f32 -> f16/bf16 rounding store.

use super::avx2_panel;
use super::driver::{gemv_generic, pack_b_generic, MicroKernel, DECODE_MAX_M};
use super::pack::PanelLayout;
use crate::dtype::{self, DType};
use crate::matrix::MatRef;
use std::arch::x86_64::*;

pub struct Avx2;

/// How 8 elements of one dtype become 8 f32 lanes.
pub(crate) trait Load8 {
    const SIZE: usize;
    const DTYPE: DType;
    /// # Safety
    /// 8 readable elements at `p`; AVX2 + F16C available.
    unsafe fn load8(p: *const u8) -> __m256;
}

pub(crate) struct LoadF32;
pub(crate) struct LoadF16;
pub(crate) struct LoadBf16;

impl Load8 for LoadF32 {
    const SIZE: usize = 4;
    const DTYPE: DType = DType::F32;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_loadu_ps(p as *const f32)
    }
}
impl Load8 for LoadF16 {
    const SIZE: usize = 2;
    const DTYPE: DType = DType::F16;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
}
impl Load8 for LoadBf16 {
    const SIZE: usize = 2;
    const DTYPE: DType = DType::BF16;
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn micro_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
    let mut r = [[_mm256_setzero_ps(); 2]; 6];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = _mm256_loadu_ps(bp);
        let b1 = _mm256_loadu_ps(bp.add(8));
        for (i, ri) in r.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*ap.add(i));
            ri[0] = _mm256_fmadd_ps(av, b0, ri[0]);
            ri[1] = _mm256_fmadd_ps(av, b1, ri[1]);
        }
        ap = ap.add(6);
        bp = bp.add(16);
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

/// 8 x 8 transpose of f32 lanes: out[j] = (in[0][j], ..., in[7][j]).
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn transpose8(v: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(v[0], v[1]);
    let t1 = _mm256_unpackhi_ps(v[0], v[1]);
    let t2 = _mm256_unpacklo_ps(v[2], v[3]);
    let t3 = _mm256_unpackhi_ps(v[2], v[3]);
    let t4 = _mm256_unpacklo_ps(v[4], v[5]);
    let t5 = _mm256_unpackhi_ps(v[4], v[5]);
    let t6 = _mm256_unpacklo_ps(v[6], v[7]);
    let t7 = _mm256_unpackhi_ps(v[6], v[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// Packs `nr` full rows (nr a multiple of 8) converting with `L` in 8 x 8 blocks.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_b_full<L: Load8>(
    src: &MatRef<'_>,
    r0: usize,
    c0: usize,
    kc: usize,
    nr: usize,
    dst: *mut f32,
) {
    let k8 = kc & !7;
    let ldb = src.ld * L::SIZE;
    for g in 0..nr / 8 {
        let base = src.row_ptr(r0 + g * 8).add(c0 * L::SIZE);
        let mut p = 0;
        while p < k8 {
            let mut v = [_mm256_setzero_ps(); 8];
            for (q, vq) in v.iter_mut().enumerate() {
                *vq = L::load8(base.add(q * ldb + p * L::SIZE));
            }
            let t = transpose8(v);
            for (q, tq) in t.iter().enumerate() {
                _mm256_storeu_ps(dst.add((p + q) * nr + g * 8), *tq);
            }
            p += 8;
        }
        for q in 0..8 {
            for pp in k8..kc {
                *dst.add(pp * nr + g * 8 + q) = dtype::load_f32(base.add(q * ldb), L::DTYPE, pp);
            }
        }
    }
}

/// Horizontal sum of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps::<1>(s, s));
    _mm_cvtss_f32(s)
}

/// M x-rows against NW W rows (native dtype), k elements.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_tile<L: Load8, const M: usize, const NW: usize>(
    x: *const f32,
    ldx: usize,
    w: *const u8,
    ldw: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let mut s = [[_mm256_setzero_ps(); NW]; M];
    let k8 = k & !7;
    let mut p = 0;
    while p < k8 {
        let mut wv = [_mm256_setzero_ps(); NW];
        for (j, wj) in wv.iter_mut().enumerate() {
            *wj = L::load8(w.add(j * ldw + p * L::SIZE));
        }
        for (i, si) in s.iter_mut().enumerate() {
            let xv = _mm256_loadu_ps(x.add(i * ldx + p));
            for (sij, wj) in si.iter_mut().zip(wv.iter()) {
                *sij = _mm256_fmadd_ps(xv, *wj, *sij);
            }
        }
        p += 8;
    }
    for (i, si) in s.iter().enumerate() {
        for (j, sij) in si.iter().enumerate() {
            let mut t = hsum(*sij);
            for q in k8..k {
                t += *x.add(i * ldx + q) * dtype::load_f32(w.add(j * ldw), L::DTYPE, q);
            }
            let o = out.add(i * ldo + j);
            *o = if acc { *o + t } else { t };
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_rows<L: Load8, const M: usize, const NW: usize>(
    x: *const f32,
    ldx: usize,
    w: &MatRef<'_>,
    c0: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let ldw = w.ld * L::SIZE;
    let mut j = 0;
    while j + NW <= w.rows {
        let wp = w.row_ptr(j).add(c0 * L::SIZE);
        gemv_tile::<L, M, NW>(x, ldx, wp, ldw, k, out.add(j), ldo, acc);
        j += NW;
    }
    while j < w.rows {
        let wp = w.row_ptr(j).add(c0 * L::SIZE);
        gemv_tile::<L, M, 1>(x, ldx, wp, ldw, k, out.add(j), ldo, acc);
        j += 1;
    }
}

/// Picks the register blocking for m rows: M * NW accumulators + NW W vectors + 1 x <= 16.
/// (Recursive for m > 4: rows 0..4, then the rest.)
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_dispatch<L: Load8>(
    x: *const f32,
    ldx: usize,
    m: usize,
    w: &MatRef<'_>,
    c0: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    match m {
        1 => gemv_rows::<L, 1, 6>(x, ldx, w, c0, k, out, ldo, acc),
        2 => gemv_rows::<L, 2, 4>(x, ldx, w, c0, k, out, ldo, acc),
        3 => gemv_rows::<L, 3, 3>(x, ldx, w, c0, k, out, ldo, acc),
        4 => gemv_rows::<L, 4, 3>(x, ldx, w, c0, k, out, ldo, acc),
        // Two passes of at most 4 rows: 12 accumulators per pass keep both FMA pipes busy
        // (8 rows x 1 W row would be one long FMA chain per row); the W rows of the second
        // pass come from L1/L2.
        5..=DECODE_MAX_M => {
            gemv_rows::<L, 4, 3>(x, ldx, w, c0, k, out, ldo, acc);
            gemv_dispatch::<L>(
                x.add(4 * ldx),
                ldx,
                m - 4,
                w,
                c0,
                k,
                out.add(4 * ldo),
                ldo,
                acc,
            )
        }
        _ => gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc),
    }
}

/// f32 -> bf16 round-to-nearest-even for 8 lanes (NaN stays a quiet NaN), as 8 u16.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub(crate) unsafe fn f32_to_bf16x8(v: __m256) -> __m128i {
    let b = _mm256_castps_si256(v);
    let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
    let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(
        _mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)),
        lsb,
    ));
    let quiet = _mm256_or_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(0x40));
    let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(v, v));
    let r = _mm256_blendv_epi8(rounded, quiet, nan);
    _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r))
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_row_avx2(src: &[f32], dst: *mut u8, dt: DType) {
    let n = src.len();
    let n8 = n & !7;
    match dt {
        // Bytes: y may be unaligned.
        DType::F32 => std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst, n * 4),
        // Never an output (LinearProblem::check); the generic path handles every dtype.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            dtype::convert_from_f32(src, dst, dt)
        }
        DType::F16 => {
            let mut i = 0;
            while i < n8 {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v);
                _mm_storeu_si128(dst.add(i * 2) as *mut __m128i, h);
                i += 8;
            }
            dtype::convert_from_f32(&src[n8..], dst.add(n8 * 2), dt);
        }
        DType::BF16 => {
            let mut i = 0;
            while i < n8 {
                let v = _mm256_loadu_ps(src.as_ptr().add(i));
                _mm_storeu_si128(dst.add(i * 2) as *mut __m128i, f32_to_bf16x8(v));
                i += 8;
            }
            dtype::convert_from_f32(&src[n8..], dst.add(n8 * 2), dt);
        }
    }
}

impl MicroKernel for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
        // SAFETY: this table entry is only installed when AVX2, FMA and F16C were detected.
        micro_6x16(kc, a, b, c, ldc, acc)
    }
    unsafe fn pack_b(
        src: &MatRef<'_>,
        r0: usize,
        rows: usize,
        c0: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        if rows != Self::NR {
            return pack_b_generic(src, r0, rows, c0, kc, Self::NR, dst);
        }
        // SAFETY: as above; the caller guarantees the rows and columns.
        match src.dtype {
            DType::F32 => pack_b_full::<LoadF32>(src, r0, c0, kc, Self::NR, dst),
            DType::F16 => pack_b_full::<LoadF16>(src, r0, c0, kc, Self::NR, dst),
            DType::BF16 => pack_b_full::<LoadBf16>(src, r0, c0, kc, Self::NR, dst),
            // Quantized W is dequantized by backend::cpu::quant before it reaches a pack; the
            // generic packer reads any dtype through MatRef::row_f32 all the same.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
                pack_b_generic(src, r0, rows, c0, kc, Self::NR, dst)
            }
        }
    }
    unsafe fn gemv(
        x: *const f32,
        ldx: usize,
        m: usize,
        w: &MatRef<'_>,
        c0: usize,
        k: usize,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        debug_assert!(m <= DECODE_MAX_M);
        // SAFETY: as above.
        match w.dtype {
            DType::F32 => gemv_dispatch::<LoadF32>(x, ldx, m, w, c0, k, out, ldo, acc),
            DType::F16 => gemv_dispatch::<LoadF16>(x, ldx, m, w, c0, k, out, ldo, acc),
            DType::BF16 => gemv_dispatch::<LoadBf16>(x, ldx, m, w, c0, k, out, ldo, acc),
            // Quantized W has its own decode kernels (backend::cpu::quant); stay correct if one
            // arrives here anyway.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
                gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc)
            }
        }
    }
    unsafe fn gemv_quant(
        x: *const f32,
        ldx: usize,
        m: usize,
        w: &MatRef<'_>,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        // SAFETY: installed only where AVX2, FMA and F16C were detected (every AVX-512 CPU
        // this table is chosen on has them too).
        super::avx2_quant::gemv(x, ldx, m, w, out, ldo, acc)
    }
    unsafe fn gemv_quant_q8(
        x: &crate::quant::Q8Rows,
        m: usize,
        w: &MatRef<'_>,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        // SAFETY: as gemv_quant.
        super::avx2_q8::gemv(x, m, w, out, ldo, acc)
    }
    unsafe fn store_row(src: &[f32], dst: *mut u8, dt: DType) {
        // SAFETY: as above.
        store_row_avx2(src, dst, dt)
    }
    fn reads_panel(l: PanelLayout) -> bool {
        l.is_panels()
    }
    unsafe fn gemv_qpack(c: &super::quant_pack::QPackGemv<'_>) {
        // SAFETY: installed only where AVX2, FMA and F16C were detected.
        super::avx2_qpack::gemv(c)
    }
    unsafe fn micro_panel(
        kc: usize,
        a: *const f32,
        b: *const u8,
        layout: PanelLayout,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        // SAFETY: as above.
        avx2_panel::micro_panel_6x16(kc, a, b, layout, c, ldc, acc)
    }
    unsafe fn gemv_panels(
        x: *const f32,
        ldx: usize,
        m: usize,
        b: *const u8,
        pstride: usize,
        npan: usize,
        layout: PanelLayout,
        kc: usize,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        // SAFETY: as above.
        avx2_panel::gemv_panels_16(
            x, ldx, m, b, 16, pstride, npan, 16, layout, kc, out, ldo, acc,
        )
    }
}
