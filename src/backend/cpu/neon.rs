//! AArch64 NEON kernels (every ARMv8-A core: Graviton, Ampere, Apple M, Jetson Orin's
//! Cortex-A78AE): an 8 x 12 micro-kernel (24 of the 32 q-register accumulators, `fmla` by lane
//! from two 4-float A vectors and three B vectors), a decode gemv that converts W in registers
//! (bf16: `ushll #16`; f16: `fcvtl`, base ARMv8, through `asm!` because Rust's f16 vector types
//! are not stable), and the portable packer and store.
//!
//! Tested on the x86 development machine under `qemu-aarch64` (tests/kernels.rs and the
//! self-check run there with `--target aarch64-unknown-linux-gnu`); speed is unmeasured.

use super::driver::{gemv_generic, MicroKernel, DECODE_MAX_M};
use crate::dtype::{self, DType};
use crate::matrix::MatRef;
use std::arch::aarch64::*;

pub struct Neon;

const MR: usize = 8;
const NR: usize = 12;

/// `c (+)= a b` for one 8 x 12 tile: per k, 2 A vectors (8 rows) and 3 B vectors (12 columns),
/// 24 `fmla v.4s, v.4s, v.s[lane]`.
unsafe fn micro_8x12(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
    let mut r = [[vdupq_n_f32(0.0); 3]; MR];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..kc {
        let b0 = vld1q_f32(bp);
        let b1 = vld1q_f32(bp.add(4));
        let b2 = vld1q_f32(bp.add(8));
        let a0 = vld1q_f32(ap);
        let a1 = vld1q_f32(ap.add(4));
        macro_rules! row {
            ($i:expr, $av:expr, $lane:expr) => {
                r[$i][0] = vfmaq_laneq_f32::<$lane>(r[$i][0], b0, $av);
                r[$i][1] = vfmaq_laneq_f32::<$lane>(r[$i][1], b1, $av);
                r[$i][2] = vfmaq_laneq_f32::<$lane>(r[$i][2], b2, $av);
            };
        }
        row!(0, a0, 0);
        row!(1, a0, 1);
        row!(2, a0, 2);
        row!(3, a0, 3);
        row!(4, a1, 0);
        row!(5, a1, 1);
        row!(6, a1, 2);
        row!(7, a1, 3);
        ap = ap.add(MR);
        bp = bp.add(NR);
    }
    for (i, ri) in r.iter().enumerate() {
        let cp = c.add(i * ldc);
        for (q, v) in ri.iter().enumerate() {
            let p = cp.add(4 * q);
            vst1q_f32(p, if acc { vaddq_f32(vld1q_f32(p), *v) } else { *v });
        }
    }
}

/// How 4 elements of one dtype become 4 f32 lanes.
trait Load4 {
    const SIZE: usize;
    const DTYPE: DType;
    /// # Safety
    /// 4 readable elements at `p` (any alignment).
    unsafe fn load4(p: *const u8) -> float32x4_t;
}

struct LoadF32;
struct LoadF16;
struct LoadBf16;

impl Load4 for LoadF32 {
    const SIZE: usize = 4;
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    unsafe fn load4(p: *const u8) -> float32x4_t {
        vld1q_f32(p as *const f32)
    }
}
impl Load4 for LoadBf16 {
    const SIZE: usize = 2;
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    unsafe fn load4(p: *const u8) -> float32x4_t {
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p as *const u16)))
    }
}
impl Load4 for LoadF16 {
    const SIZE: usize = 2;
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    unsafe fn load4(p: *const u8) -> float32x4_t {
        let h = vld1_u16(p as *const u16);
        let out: float32x4_t;
        // SAFETY: FCVTL (half -> single, 4 lanes) is part of base ARMv8 AdvSIMD; it only reads
        // and writes the named registers.
        std::arch::asm!(
            "fcvtl {o:v}.4s, {h:v}.4h",
            o = lateout(vreg) out,
            h = in(vreg) h,
            options(pure, nomem, nostack, preserves_flags)
        );
        out
    }
}

/// M x-rows against NW W rows (W in its own dtype), k elements, 4 lanes at a time.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn gemv_tile<L: Load4, const M: usize, const NW: usize>(
    x: *const f32,
    ldx: usize,
    w: *const u8,
    ldw: usize,
    k: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let mut s = [[vdupq_n_f32(0.0); NW]; M];
    let k4 = k & !3;
    let mut p = 0;
    while p < k4 {
        let mut wv = [vdupq_n_f32(0.0); NW];
        for (j, wj) in wv.iter_mut().enumerate() {
            *wj = L::load4(w.add(j * ldw + p * L::SIZE));
        }
        for (i, si) in s.iter_mut().enumerate() {
            let xv = vld1q_f32(x.add(i * ldx + p));
            for (sij, wj) in si.iter_mut().zip(wv.iter()) {
                *sij = vfmaq_f32(*sij, xv, *wj);
            }
        }
        p += 4;
    }
    for (i, si) in s.iter().enumerate() {
        for (j, sij) in si.iter().enumerate() {
            let mut t = vaddvq_f32(*sij);
            for q in k4..k {
                t += *x.add(i * ldx + q) * dtype::load_f32(w.add(j * ldw), L::DTYPE, q);
            }
            let o = out.add(i * ldo + j);
            *o = if acc { *o + t } else { t };
        }
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn gemv_rows<L: Load4, const M: usize, const NW: usize>(
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

/// Rows of a decode call in register blocks: M * NW accumulators + NW W vectors + 1 x vector
/// stay within the 32 q registers; 5..8 rows run as 4 + the rest (W rows hot in L1).
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_dispatch<L: Load4>(
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
        0 => {}
        1 => gemv_rows::<L, 1, 8>(x, ldx, w, c0, k, out, ldo, acc),
        2 => gemv_rows::<L, 2, 6>(x, ldx, w, c0, k, out, ldo, acc),
        3 => gemv_rows::<L, 3, 5>(x, ldx, w, c0, k, out, ldo, acc),
        4 => gemv_rows::<L, 4, 4>(x, ldx, w, c0, k, out, ldo, acc),
        _ => {
            gemv_rows::<L, 4, 4>(x, ldx, w, c0, k, out, ldo, acc);
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
    }
}

impl MicroKernel for Neon {
    const MR: usize = MR;
    const NR: usize = NR;
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
        micro_8x12(kc, a, b, c, ldc, acc)
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
        if m > DECODE_MAX_M {
            return gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc);
        }
        match w.dtype {
            DType::F32 => gemv_dispatch::<LoadF32>(x, ldx, m, w, c0, k, out, ldo, acc),
            DType::F16 => gemv_dispatch::<LoadF16>(x, ldx, m, w, c0, k, out, ldo, acc),
            DType::BF16 => gemv_dispatch::<LoadBf16>(x, ldx, m, w, c0, k, out, ldo, acc),
            // Quantized W has its own decode kernels (MicroKernel::gemv_quant); stay correct if
            // one arrives here anyway.
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
                gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc)
            }
        }
    }
}
