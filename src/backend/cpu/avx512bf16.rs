//! AVX512-BF16 (`vdpbf16ps`) base GEMM for bf16 x and bf16 W (Cooper Lake, Sapphire Rapids
//! without AMX permission, Zen 4/5): pairs of bf16 products accumulated straight into f32 lanes,
//! no conversion to f32 while packing and half the bytes of packed W. Everything else (f32/f16
//! inputs, decode, the adapter's shrink and expand, bias, the y store) is the AVX-512 path.
//!
//! It reuses the AMX variant's packing (`amx::AmxBase`): x rows as padded bf16, W in the VNNI
//! pair layout `[16-column tile][k/2][16 columns][2]`, which is exactly one zmm of pairs per k
//! pair. The 32 x 32 block is computed as four 8-row groups, each keeping 8 x 2 zmm
//! accumulators, one broadcast x pair and two W pair vectors in registers (19 of 32 zmm).
//!
//! The block is written once, generic over a 16-lane unit (`Lanes`), and instantiated with the
//! real instructions (`Hw`) and with a scalar model (`Emulated`): tests run the model on any
//! CPU, so only the three intrinsics in `Hw` are unexecuted on machines without AVX512-BF16;
//! the start-up self-check (selfcheck.rs) runs them before the variant is used.
//!
//! NOT RUN on the development machine (AMD EPYC without AVX-512).

use super::amx::{self, AmxBase, Block, TileUnit};
use super::avx512::Avx512;
use super::driver;
use super::pack::PackedW;
use crate::backend::LinearProblem;
use crate::matrix::MatMut;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// What the block needs from 16 f32 lanes.
///
/// # Safety
/// Every method needs the implementation's instructions (Hw: AVX-512F + AVX512-BF16); pointers
/// must be readable (writable for `store`) for the bytes each method names.
#[allow(clippy::missing_safety_doc)]
pub trait Lanes {
    type Acc: Copy;
    type Pairs: Copy;
    type Bcast: Copy;
    unsafe fn zero() -> Self::Acc;
    /// 16 columns x (2 k) of bf16 at `p` (64 bytes, VNNI order).
    unsafe fn load_pairs(p: *const u16) -> Self::Pairs;
    /// One x pair (2 bf16 at `p`) in every lane.
    unsafe fn broadcast(p: *const u16) -> Self::Bcast;
    /// `acc[j] += x0 * w[j][0] + x1 * w[j][1]` (`vdpbf16ps`).
    unsafe fn dot(acc: Self::Acc, x: Self::Bcast, w: Self::Pairs) -> Self::Acc;
    unsafe fn store(p: *mut f32, v: Self::Acc);
    /// `TileUnit::block_32x32` on these lanes (`Hw` overrides it to enable its instructions).
    unsafe fn block_32x32(blk: Block)
    where
        Self: Sized,
    {
        block::<Self>(blk)
    }
}

/// The instructions.
pub struct Hw;

impl Lanes for Hw {
    type Acc = __m512;
    type Pairs = __m512bh;
    type Bcast = __m512bh;
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn zero() -> __m512 {
        _mm512_setzero_ps()
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn load_pairs(p: *const u16) -> __m512bh {
        // SAFETY (of the transmute): both are 512-bit vectors; bf16 pairs are plain bits.
        std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p as *const __m512i))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn broadcast(p: *const u16) -> __m512bh {
        let pair = (p as *const i32).read_unaligned();
        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(pair))
    }
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn dot(acc: __m512, x: __m512bh, w: __m512bh) -> __m512 {
        _mm512_dpbf16_ps(acc, x, w)
    }
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store(p: *mut f32, v: __m512) {
        _mm512_storeu_ps(p, v)
    }
    unsafe fn block_32x32(blk: Block) {
        // SAFETY: `Pairs<Hw>` is only installed when AVX512-BF16 was detected (mod.rs).
        hw_block(blk)
    }
}

/// A scalar model of the same lanes (f32 accumulation of each pair, in the instruction's order).
pub struct Emulated;

fn bf(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

impl Lanes for Emulated {
    type Acc = [f32; 16];
    type Pairs = [u16; 32];
    type Bcast = [u16; 2];
    unsafe fn zero() -> [f32; 16] {
        [0.0; 16]
    }
    unsafe fn load_pairs(p: *const u16) -> [u16; 32] {
        std::ptr::read_unaligned(p as *const [u16; 32])
    }
    unsafe fn broadcast(p: *const u16) -> [u16; 2] {
        std::ptr::read_unaligned(p as *const [u16; 2])
    }
    unsafe fn dot(mut acc: [f32; 16], x: [u16; 2], w: [u16; 32]) -> [f32; 16] {
        for (j, a) in acc.iter_mut().enumerate() {
            *a += bf(x[0]) * bf(w[2 * j]);
            *a += bf(x[1]) * bf(w[2 * j + 1]);
        }
        acc
    }
    unsafe fn store(p: *mut f32, v: [f32; 16]) {
        std::ptr::copy_nonoverlapping(v.as_ptr(), p, 16)
    }
}

/// The `TileUnit::block_32x32` contract (see amx.rs) on 16-lane pair dot products.
///
/// # Safety
/// As `TileUnit::block_32x32`, plus: `L`'s instructions are available.
#[inline(always)]
unsafe fn block<L: Lanes>(blk: Block) {
    let Block {
        a,
        lda,
        b0,
        b1,
        ldb,
        k,
        c,
        ldc,
    } = blk;
    const G: usize = 8;
    let lda = lda / 2; // bytes -> bf16 elements
    for g in 0..32 / G {
        let mut acc = [[L::zero(); 2]; G];
        for kp in 0..k / 2 {
            let w0 = L::load_pairs(b0.add(kp * ldb));
            let w1 = L::load_pairs(b1.add(kp * ldb));
            for (i, ai) in acc.iter_mut().enumerate() {
                let x = L::broadcast(a.add((g * G + i) * lda + 2 * kp));
                ai[0] = L::dot(ai[0], x, w0);
                ai[1] = L::dot(ai[1], x, w1);
            }
        }
        for (i, ai) in acc.iter().enumerate() {
            let cp = c.add((g * G + i) * ldc);
            L::store(cp, ai[0]);
            L::store(cp.add(16), ai[1]);
        }
    }
}

#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn hw_block(blk: Block) {
    block::<Hw>(blk)
}

/// Pair dot products on lanes `L` as the AMX packing's tile unit: `Pairs<Hw>` is `vdpbf16ps`,
/// `Pairs<Emulated>` its scalar model.
pub struct Pairs<L>(std::marker::PhantomData<L>);

impl<L: Lanes + Sync + Send + 'static> TileUnit for Pairs<L> {
    unsafe fn begin() {}
    unsafe fn block_32x32(blk: Block) {
        L::block_32x32(blk)
    }
    unsafe fn end() {}
}

thread_local! {
    static BASE: RefCell<Option<AmxBase<Pairs<Hw>>>> = const { RefCell::new(None) };
}

/// The avx512bf16 table's linear: bf16 x bf16 GEMM-path calls use `vdpbf16ps` for the base part;
/// everything else is the AVX-512 path.
pub fn linear(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    linear_any(p, None, y)
}

/// `linear` on W packed for this table.
pub fn linear_packed(p: &LinearProblem<'_>, packed: &PackedW, y: &mut MatMut<'_>) {
    linear_any(p, Some(packed), y)
}

fn linear_any(p: &LinearProblem<'_>, packed: Option<&PackedW>, y: &mut MatMut<'_>) {
    if amx::takes_bf16_pairs(p) {
        amx::linear_on_pairs::<Pairs<Hw>, Avx512>(p, packed, y, &BASE)
    } else {
        driver::linear_with::<Avx512>(p, packed, y, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::selfcheck;
    use crate::rng::SplitMix64;

    const EMULATED: crate::backend::cpu::LinearFn = amx::linear_for_tests::<Pairs<Emulated>>;
    const EMULATED_PACKED: crate::backend::cpu::PackedLinearFn =
        amx::linear_packed_for_tests::<Pairs<Emulated>>;

    #[test]
    fn dpbf16_gemm_path_matches_the_reference_with_emulated_lanes() {
        selfcheck::verify_bf16_gemm(EMULATED, EMULATED_PACKED, 23).unwrap();
    }

    /// The 8-row-group block equals the AMX tile model on the same packed data.
    #[test]
    fn block_matches_the_amx_tile_model() {
        let mut rng = SplitMix64::new(5);
        for k in [32usize, 64, 96] {
            let bf16 = |v: f32| (v.to_bits() >> 16) as u16;
            let a: Vec<u16> = (0..32 * k).map(|_| bf16(rng.uniform(-1.0, 1.0))).collect();
            let b0: Vec<u16> = (0..k * 16).map(|_| bf16(rng.uniform(-1.0, 1.0))).collect();
            let b1: Vec<u16> = (0..k * 16).map(|_| bf16(rng.uniform(-1.0, 1.0))).collect();
            let (mut c1, mut c2) = (vec![0f32; 32 * 33], vec![0f32; 32 * 33]);
            let blk = |c: *mut f32| Block {
                a: a.as_ptr(),
                lda: 2 * k,
                b0: b0.as_ptr(),
                b1: b1.as_ptr(),
                ldb: 32,
                k,
                c,
                ldc: 33,
            };
            // SAFETY: buffers sized for one 32 x 32 block with this k and ldc = 33.
            unsafe {
                Pairs::<Emulated>::block_32x32(blk(c1.as_mut_ptr()));
                amx::Emulated::block_32x32(blk(c2.as_mut_ptr()));
            }
            for (i, (x, y)) in c1.iter().zip(&c2).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                    "k={k} [{i}]: {x} vs {y}"
                );
            }
        }
    }
}
