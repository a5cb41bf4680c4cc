//! AVX-512F kernels: a 12 x 32 micro-kernel (24 zmm accumulators of 32), W packing through the
//! AVX2/F16C 8 x 8 converting transpose (every AVX-512 CPU has both), a 16-lane decode gemv that
//! converts f16 (`vcvtph2ps`) and bf16 (zero-extend + shift) in registers.
//!
//! NOT RUN on the development machine (AMD EPYC without AVX-512): compiled, selected only when
//! detected, and tested by tests/kernels.rs wherever the CPU has AVX-512F.

use super::avx2::{pack_b_full, LoadBf16, LoadF16, LoadF32};
use super::avx2_panel;
use super::driver::{gemv_generic, pack_b_generic, MicroKernel, DECODE_MAX_M};
use super::pack::PanelLayout;
use crate::dtype::{self, DType};
use crate::matrix::MatRef;
use std::arch::x86_64::*;

pub struct Avx512;

const MR: usize = 12;
const NR: usize = 32;

#[target_feature(enable = "avx512f")]
unsafe fn micro_12x32(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
    let mut r = [[_mm512_setzero_ps(); 2]; MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(bp);
        let b1 = _mm512_loadu_ps(bp.add(16));
        for (i, ri) in r.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*ap.add(i));
            ri[0] = _mm512_fmadd_ps(av, b0, ri[0]);
            ri[1] = _mm512_fmadd_ps(av, b1, ri[1]);
        }
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    for (i, ri) in r.iter().enumerate() {
        let cp = c.add(i * ldc);
        if acc {
            _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), ri[0]));
            _mm512_storeu_ps(
                cp.add(16),
                _mm512_add_ps(_mm512_loadu_ps(cp.add(16)), ri[1]),
            );
        } else {
            _mm512_storeu_ps(cp, ri[0]);
            _mm512_storeu_ps(cp.add(16), ri[1]);
        }
    }
}

/// 16 elements of `dt` at `p` as f32 lanes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16(p: *const u8, dt: DType) -> __m512 {
    match dt {
        DType::F32 => _mm512_loadu_ps(p as *const f32),
        DType::F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
        DType::BF16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(p as *const __m256i),
        ))),
        // `gemv` sends quantized W to the generic path before any load16.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            unreachable!("quantized W in load16")
        }
    }
}

/// M x-rows against NW W rows, k elements, 16 lanes at a time (dtype known per call; the match
/// in `load16` is hoisted out of the loop by the compiler after inlining).
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_tile<const M: usize, const NW: usize>(
    x: *const f32,
    ldx: usize,
    w: *const u8,
    ldw: usize,
    dt: DType,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let sz = dt.size();
    let mut s = [[_mm512_setzero_ps(); NW]; M];
    let k16 = k & !15;
    let mut p = 0;
    while p < k16 {
        let mut wv = [_mm512_setzero_ps(); NW];
        for (j, wj) in wv.iter_mut().enumerate() {
            *wj = load16(w.add(j * ldw + p * sz), dt);
        }
        for (i, si) in s.iter_mut().enumerate() {
            let xv = _mm512_loadu_ps(x.add(i * ldx + p));
            for (sij, wj) in si.iter_mut().zip(wv.iter()) {
                *sij = _mm512_fmadd_ps(xv, *wj, *sij);
            }
        }
        p += 16;
    }
    for (i, si) in s.iter().enumerate() {
        for (j, sij) in si.iter().enumerate() {
            let mut t = _mm512_reduce_add_ps(*sij);
            for q in k16..k {
                t += *x.add(i * ldx + q) * dtype::load_f32(w.add(j * ldw), dt, q);
            }
            let o = out.add(i * ldo + j);
            *o = if acc { *o + t } else { t };
        }
    }
}

#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f")]
unsafe fn gemv_rows<const M: usize, const NW: usize>(
    x: *const f32,
    ldx: usize,
    w: &MatRef<'_>,
    c0: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let sz = w.dtype.size();
    let ldw = w.ld * sz;
    let mut j = 0;
    while j + NW <= w.rows {
        let wp = w.row_ptr(j).add(c0 * sz);
        gemv_tile::<M, NW>(x, ldx, wp, ldw, w.dtype, k, out.add(j), ldo, acc);
        j += NW;
    }
    while j < w.rows {
        let wp = w.row_ptr(j).add(c0 * sz);
        gemv_tile::<M, 1>(x, ldx, wp, ldw, w.dtype, k, out.add(j), ldo, acc);
        j += 1;
    }
}

impl MicroKernel for Avx512 {
    const MR: usize = MR;
    const NR: usize = NR;
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
        // SAFETY: this table entry is only installed when AVX-512F (and AVX2/FMA/F16C) were
        // detected.
        micro_12x32(kc, a, b, c, ldc, acc)
    }
    unsafe fn pack_b(
        src: &MatRef<'_>,
        r0: usize,
        rows: usize,
        c0: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        if rows != NR {
            return pack_b_generic(src, r0, rows, c0, kc, NR, dst);
        }
        // SAFETY: as above.
        match src.dtype {
            DType::F32 => pack_b_full::<LoadF32>(src, r0, c0, kc, NR, dst),
            DType::F16 => pack_b_full::<LoadF16>(src, r0, c0, kc, NR, dst),
            DType::BF16 => pack_b_full::<LoadBf16>(src, r0, c0, kc, NR, dst),
            // Quantized W is dequantized by backend::cpu::quant before it reaches a pack; the
            // generic packer reads any dtype through MatRef::row_f32 all the same.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
                pack_b_generic(src, r0, rows, c0, kc, NR, dst)
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
        if w.dtype.is_quantized() {
            // Quantized W has its own decode kernels (backend::cpu::quant); stay correct here.
            return gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc);
        }
        // SAFETY: as above. Blocking: M * NW + NW + 1 <= 32 zmm registers.
        match m {
            1 => gemv_rows::<1, 8>(x, ldx, w, c0, k, out, ldo, acc),
            2 => gemv_rows::<2, 8>(x, ldx, w, c0, k, out, ldo, acc),
            3 => gemv_rows::<3, 6>(x, ldx, w, c0, k, out, ldo, acc),
            4 => gemv_rows::<4, 4>(x, ldx, w, c0, k, out, ldo, acc),
            5 | 6 => {
                gemv_rows::<3, 6>(x, ldx, w, c0, k, out, ldo, acc);
                gemv_rows_tail(x, ldx, m, 3, w, c0, k, out, ldo, acc)
            }
            7 | 8 => {
                gemv_rows::<4, 4>(x, ldx, w, c0, k, out, ldo, acc);
                gemv_rows_tail(x, ldx, m, 4, w, c0, k, out, ldo, acc)
            }
            _ => gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc),
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
        // SAFETY: as above (AVX2 + F16C are present on every AVX-512 CPU we select).
        <super::avx2::Avx2 as MicroKernel>::store_row(src, dst, dt)
    }
    /// Decode reads every packed layout with the AVX2 panel kernel, once per 16-column half:
    /// W-bandwidth-bound, and Zen 4 runs 512-bit ops as two 256-bit halves anyway. The GEMM
    /// path converts f16 / bf16 panel blocks to f32 once per block (`reads_panel` is false).
    fn gemv_reads_panel(l: PanelLayout) -> bool {
        l.is_panels()
    }
    unsafe fn gemv_qpack(c: &super::quant_pack::QPackGemv<'_>) {
        // SAFETY: as gemv_quant (AVX2, FMA and F16C are present on every AVX-512 CPU we select).
        super::avx2_qpack::gemv(c)
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
        let half = avx2_panel::half_offset(layout);
        for h in 0..2 {
            // SAFETY: AVX2 + FMA + F16C are present on every AVX-512 CPU we select; each 32-wide
            // panel block's two halves are 16 columns each.
            avx2_panel::gemv_panels_16(
                x,
                ldx,
                m,
                b.add(h * half),
                32,
                pstride,
                npan,
                32,
                layout,
                kc,
                out.add(16 * h),
                ldo,
                acc,
            )
        }
    }
}

/// Rows `done..m` of a gemv (the second half of a split 5..8-row call).
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_rows_tail(
    x: *const f32,
    ldx: usize,
    m: usize,
    done: usize,
    w: &MatRef<'_>,
    c0: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let (x2, o2) = (x.add(done * ldx), out.add(done * ldo));
    match m - done {
        1 => gemv_rows::<1, 8>(x2, ldx, w, c0, k, o2, ldo, acc),
        2 => gemv_rows::<2, 8>(x2, ldx, w, c0, k, o2, ldo, acc),
        3 => gemv_rows::<3, 6>(x2, ldx, w, c0, k, o2, ldo, acc),
        4 => gemv_rows::<4, 4>(x2, ldx, w, c0, k, o2, ldo, acc),
        _ => gemv_generic(x2, ldx, m - done, w, c0, k, o2, ldo, acc),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::pack::PackSpec;
    use crate::backend::cpu::portable::PortableTile;
    use crate::backend::cpu::{driver, selfcheck, Isa};

    /// Portable 12 x 32 tiles with `Avx512`'s packed decode, which only needs AVX2: the decode
    /// half of the AVX-512 packed path runs on any AVX2 machine.
    struct DecodeStandIn;

    impl MicroKernel for DecodeStandIn {
        const MR: usize = 12;
        const NR: usize = 32;
        unsafe fn micro(
            kc: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            acc: bool,
        ) {
            PortableTile::<12, 32>::micro(kc, a, b, c, ldc, acc)
        }
        fn gemv_reads_panel(l: PanelLayout) -> bool {
            Avx512::gemv_reads_panel(l)
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
            Avx512::gemv_panels(x, ldx, m, b, pstride, npan, layout, kc, out, ldo, acc)
        }
    }

    #[test]
    fn packed_decode_matches_the_reference() {
        if !crate::backend::cpu::supported(Isa::Avx2) {
            println!("skipped: this CPU has no AVX2");
            return;
        }
        let spec = PackSpec {
            isa: Isa::Portable,
            nr: 32,
            kgran: 32,
        };
        let run = selfcheck::packed(driver::linear_packed::<DecodeStandIn>, spec);
        selfcheck::verify_random(&run, 31, 60, (None, None), (1, 9), 300).unwrap();
    }
}
