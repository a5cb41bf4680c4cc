//! AMX-BF16 base GEMM for bf16 x and bf16 W (Sapphire Rapids and later), through `asm!` (stable
//! Rust has no AMX intrinsics). Everything else (f32/f16 inputs, decode, the adapter's shrink
//! and expand, bias, the y store) runs on the AVX-512 kernels, so the adapter math stays f32.
//!
//! Per call, x's rows (walk order) are copied as bf16 into a row-major buffer padded to 32 rows
//! and 32 columns. Per column block, each task packs its W rows in the VNNI layout AMX wants
//! (pairs of k interleaved: `[tile][k/2][16 columns][2]`), then computes 32 x 32 output blocks
//! with 4 accumulator tiles (tmm0-3), 2 A tiles (tmm4-5) and 2 B tiles (tmm6-7), 32 k per step.
//!
//! Detection: CPUID leaf 7 (AMX-TILE, AMX-BF16) and XCR0 bits 17/18 (detect.rs); then Linux
//! must grant the tile data state: `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`, asked
//! once per process. If it is refused, this variant is UNSUPPORTED and `select` falls back.
//!
//! NOT RUN on the development machine (AMD EPYC without AMX): it compiles, it is chosen only
//! when detected and permitted, and tests/kernels.rs compares it with the reference wherever it
//! can run. Treat it as unverified until that test has passed on an AMX machine.

use super::avx512::Avx512;
use super::driver::{self, MicroKernel, NativeGemm};
use super::pack::PackedW;
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::matrix::{MatMut, MatRef};
use std::cell::RefCell;
use std::sync::OnceLock;
use std::thread::LocalKey;

const ARCH_REQ_XCOMP_PERM: libc::c_ulong = 0x1023;
const XFEATURE_XTILEDATA: libc::c_ulong = 18;

/// Whether Linux lets this process use AMX tile data (asked once).
pub fn permitted() -> bool {
    static P: OnceLock<bool> = OnceLock::new();
    *P.get_or_init(|| {
        let f = super::detect::features();
        if !(f.amx_tile && f.amx_bf16) {
            return false;
        }
        // SAFETY: arch_prctl with ARCH_REQ_XCOMP_PERM only changes this process's permitted
        // xstate set; it takes two integer arguments and touches no memory of ours.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    })
}

/// Tile configuration (palette 1): 8 tiles of 16 rows x 64 bytes.
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
}

impl TileConfig {
    fn all_16x64() -> TileConfig {
        let mut c = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
        };
        for t in 0..8 {
            c.colsb[t] = 64;
            c.rows[t] = 16;
        }
        c
    }
}

/// The operands of one 32 x 32 block: C (f32, row stride ldc floats) from A (32 rows of bf16 at
/// stride lda bytes, k values each) and two VNNI B tiles b0/b1 (each `k/2` rows of 64 bytes,
/// consecutive rows `ldb` u16 apart: 32 for tiles packed per call, 64 for the 32-column panels
/// of a prepacked W, where b1 = b0 + 32).
#[derive(Clone, Copy)]
pub struct Block {
    pub a: *const u16,
    pub lda: usize,
    pub b0: *const u16,
    pub b1: *const u16,
    pub ldb: usize,
    pub k: usize,
    pub c: *mut f32,
    pub ldc: usize,
}

/// The tile instructions the AMX base GEMM uses, behind a trait so the packing, padding and
/// driver integration can be tested with a scalar model of them (`Emulated`) on CPUs without
/// AMX; `Hardware` is the real thing.
pub trait TileUnit: Sync + Send + 'static {
    /// Configures 8 tiles of 16 rows x 64 bytes on this thread (`ldtilecfg`).
    ///
    /// # Safety
    /// AMX is supported and permitted (`permitted()`), or this is the emulation.
    unsafe fn begin();
    /// 32 x 32 block of C (f32, row stride ldc floats) from A (32 rows of bf16 at stride lda
    /// bytes, k values each) and two VNNI B tiles (each `k/2` rows of 64 bytes, contiguous):
    /// C = A[0..16] B0 | A[0..16] B1 over A[16..32] B0 | A[16..32] B1.
    ///
    /// # Safety
    /// `begin` ran on this thread; k a multiple of 32; A has 32 readable rows of k bf16; b0/b1
    /// hold k/2 x 64 bytes; c has 32 rows of 32 writable floats.
    unsafe fn block_32x32(blk: Block);
    /// Releases the tile state (`tilerelease`).
    ///
    /// # Safety
    /// `begin` ran on this thread.
    unsafe fn end();
}

/// The AMX instructions (`asm!`: stable Rust has no AMX intrinsics).
pub struct Hardware;

impl TileUnit for Hardware {
    unsafe fn begin() {
        let cfg = TileConfig::all_16x64();
        std::arch::asm!(
            "ldtilecfg [{0}]",
            in(reg) &cfg as *const TileConfig,
            options(nostack, readonly, preserves_flags)
        );
    }
    unsafe fn block_32x32(blk: Block) {
        hw_block_32x32(blk)
    }
    unsafe fn end() {
        std::arch::asm!("tilerelease", options(nostack, nomem, preserves_flags));
    }
}

/// A scalar model of `tdpbf16ps` on the same memory layouts: per output element, pairs of bf16
/// products accumulated in f32 in the instruction's order. Used by tests on CPUs without AMX.
pub struct Emulated;

impl TileUnit for Emulated {
    unsafe fn begin() {}
    unsafe fn block_32x32(blk: Block) {
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
        let bf = |v: u16| f32::from_bits((v as u32) << 16);
        let lda = lda / 2; // bytes -> u16
        let mut acc = [[0f32; 32]; 32];
        let mut kk = 0;
        while kk < k {
            for (half, b) in [b0, b1].into_iter().enumerate() {
                // One 16 x 64-byte B tile: 16 VNNI rows (pairs of k) of 16 columns.
                let bt = b.add(kk / 2 * ldb);
                for (i, row) in acc.iter_mut().enumerate() {
                    let ar = a.add(i * lda + kk);
                    for j in 0..16 {
                        let mut t = row[half * 16 + j];
                        for kp in 0..16 {
                            t += bf(*ar.add(2 * kp)) * bf(*bt.add(kp * ldb + 2 * j));
                            t += bf(*ar.add(2 * kp + 1)) * bf(*bt.add(kp * ldb + 2 * j + 1));
                        }
                        row[half * 16 + j] = t;
                    }
                }
            }
            kk += 32;
        }
        for (i, row) in acc.iter().enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(i * ldc), 32);
        }
    }
    unsafe fn end() {}
}

/// 32 x 32 block of C (f32, row stride ldc floats) from A (32 rows of bf16 at stride lda
/// bytes, k values each) and two VNNI B tiles (each `k/2` rows of 64 bytes, contiguous).
///
/// # Safety
/// Tiles configured as 16 x 64 (ldtilecfg done by the caller on this thread); k a multiple of
/// 32; A has 32 readable rows of k bf16; b0/b1 hold k/2 x 64 bytes; c has 32 rows of 32 floats.
#[target_feature(enable = "avx512f")]
unsafe fn hw_block_32x32(blk: Block) {
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
    std::arch::asm!(
        "tilezero tmm0",
        "tilezero tmm1",
        "tilezero tmm2",
        "tilezero tmm3",
        options(nostack, nomem, preserves_flags)
    );
    let a1 = a.add(16 * lda / 2);
    let mut kk = 0;
    while kk < k {
        let (pa0, pa1) = (a.add(kk), a1.add(kk));
        // 32 k = 16 VNNI rows of 64 bytes.
        let (pb0, pb1) = (b0.add(kk / 2 * ldb), b1.add(kk / 2 * ldb));
        std::arch::asm!(
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) pa0,
            a1 = in(reg) pa1,
            b0 = in(reg) pb0,
            b1 = in(reg) pb1,
            lda = in(reg) lda,
            ldb = in(reg) ldb * 2,
            options(nostack, readonly, preserves_flags)
        );
        kk += 32;
    }
    let ldcb = ldc * 4;
    std::arch::asm!(
        "tilestored [{c0} + {ldc}*1], tmm0",
        "tilestored [{c1} + {ldc}*1], tmm1",
        "tilestored [{c2} + {ldc}*1], tmm2",
        "tilestored [{c3} + {ldc}*1], tmm3",
        c0 = in(reg) c,
        c1 = in(reg) c.add(16),
        c2 = in(reg) c.add(16 * ldc),
        c3 = in(reg) c.add(16 * ldc + 16),
        ldc = in(reg) ldcb,
        options(nostack, preserves_flags)
    );
}

thread_local! {
    static VNNI: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// The AMX base GEMM state for one call: x rows as padded bf16.
pub struct AmxBase<U: TileUnit> {
    xb: Vec<u16>,
    rows_pad: usize,
    kpad: usize,
    unit: std::marker::PhantomData<U>,
}

impl<U: TileUnit> AmxBase<U> {
    pub fn new() -> Self {
        AmxBase {
            xb: Vec::new(),
            rows_pad: 0,
            kpad: 0,
            unit: std::marker::PhantomData,
        }
    }
}

impl<U: TileUnit> Default for AmxBase<U> {
    fn default() -> Self {
        Self::new()
    }
}

impl<U: TileUnit> NativeGemm for AmxBase<U> {
    fn prepare(&mut self, x: &MatRef<'_>, rows: &[usize]) -> usize {
        let k = x.cols;
        self.kpad = k.div_ceil(32) * 32;
        self.rows_pad = rows.len().div_ceil(32) * 32;
        self.xb.clear();
        self.xb.resize(self.rows_pad * self.kpad, 0);
        for (i, &r) in rows.iter().enumerate() {
            let dst = &mut self.xb[i * self.kpad..i * self.kpad + k];
            let src = x.row_ptr(r) as *const u16;
            for (q, d) in dst.iter_mut().enumerate() {
                // SAFETY: x is bf16 (checked by `linear`), row r has k elements.
                *d = unsafe { src.add(q).read_unaligned() };
            }
        }
        self.rows_pad
    }

    unsafe fn block(
        &self,
        w: &MatRef<'_>,
        packed: Option<&PackedW>,
        j0: usize,
        nt: usize,
        ntp: usize,
        c: *mut f32,
        ldc: usize,
    ) {
        let (k, kpad) = (w.cols, self.kpad);
        if let Some(pw) = packed {
            // Prepacked: 32-column pair panels, k padded to kpad (PackSpec::kgran = 32), the
            // two 16-column halves of a panel are b0 and b0 + 32 at 64 u16 per k pair.
            debug_assert!(pw.nr() == 32 && j0.is_multiple_of(32) && ntp.is_multiple_of(32));
            U::begin();
            for tp in 0..ntp / 32 {
                let b0 = pw.panel(j0 / 32 + tp, 0) as *const u16;
                for ib in 0..self.rows_pad / 32 {
                    U::block_32x32(Block {
                        a: self.xb[ib * 32 * kpad..].as_ptr(),
                        lda: kpad * 2,
                        b0,
                        b1: b0.add(32),
                        ldb: 64,
                        k: kpad,
                        c: c.add(ib * 32 * ldc + tp * 32),
                        ldc,
                    });
                }
            }
            U::end();
            return;
        }
        let ntiles = ntp.div_ceil(16);
        let ntiles = ntiles + ntiles % 2; // pairs of 16-column tiles
        VNNI.with(|v| {
            let v = &mut *v.borrow_mut();
            let tile_len = kpad * 16; // u16 per 16-column tile: kpad/2 rows x 32
            if v.len() < ntiles * tile_len {
                v.resize(ntiles * tile_len, 0);
            }
            // VNNI pack: tile t, k pair kp, column j -> [t][kp][j][2].
            for t in 0..ntiles {
                let dst = &mut v[t * tile_len..(t + 1) * tile_len];
                for j in 0..16 {
                    let col = t * 16 + j;
                    if col >= nt {
                        for kp in 0..kpad / 2 {
                            dst[kp * 32 + j * 2] = 0;
                            dst[kp * 32 + j * 2 + 1] = 0;
                        }
                        continue;
                    }
                    let src = w.row_ptr(j0 + col) as *const u16;
                    for q in 0..kpad {
                        let val = if q < k {
                            src.add(q).read_unaligned()
                        } else {
                            0
                        };
                        dst[(q / 2) * 32 + j * 2 + (q % 2)] = val;
                    }
                }
            }
            U::begin();
            let mut scratch = [0f32; 32 * 32];
            for tp in 0..ntiles / 2 {
                let b0 = v[2 * tp * tile_len..].as_ptr();
                let b1 = v[(2 * tp + 1) * tile_len..].as_ptr();
                let col0 = tp * 32;
                for ib in 0..self.rows_pad / 32 {
                    let a = self.xb[ib * 32 * kpad..].as_ptr();
                    let blk = |c: *mut f32, ldc: usize| Block {
                        a,
                        lda: kpad * 2,
                        b0,
                        b1,
                        ldb: 32,
                        k: kpad,
                        c,
                        ldc,
                    };
                    if col0 + 32 <= ntp {
                        U::block_32x32(blk(c.add(ib * 32 * ldc + col0), ldc));
                    } else {
                        // The last pair covers columns past ntp: compute into scratch.
                        U::block_32x32(blk(scratch.as_mut_ptr(), 32));
                        for i in 0..32 {
                            for j in 0..ntp - col0 {
                                *c.add((ib * 32 + i) * ldc + col0 + j) = scratch[i * 32 + j];
                            }
                        }
                    }
                }
            }
            U::end();
        });
    }
}

thread_local! {
    static BASE: RefCell<Option<AmxBase<Hardware>>> = const { RefCell::new(None) };
}

/// Whether a call takes a pair-packed bf16 base GEMM: bf16 x and W on the GEMM path.
pub(crate) fn takes_bf16_pairs(p: &LinearProblem<'_>) -> bool {
    p.x.dtype == DType::BF16 && p.w.dtype == DType::BF16 && p.m() > driver::DECODE_MAX_M
}

/// The driver on `K` with the base part of bf16 x bf16 GEMM tiles on `U`, reusing the packing
/// state cached in `cache` on this thread. The state is taken out of the thread-local for the
/// call (a nested call on this thread then simply builds its own).
pub(crate) fn linear_on_pairs<U: TileUnit, K: MicroKernel>(
    p: &LinearProblem<'_>,
    packed: Option<&PackedW>,
    y: &mut MatMut<'_>,
    cache: &'static LocalKey<RefCell<Option<AmxBase<U>>>>,
) {
    let mut base = cache.with(|b| b.borrow_mut().take()).unwrap_or_default();
    driver::linear_with::<K>(p, packed, y, Some(&mut base));
    cache.with(|b| *b.borrow_mut() = Some(base));
}

/// The AMX table's linear: bf16 x bf16 GEMM-path calls use AMX for the base part; everything
/// else is the AVX-512 path.
pub fn linear(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    linear_any(p, None, y)
}

/// `linear` on W packed for this table (`PACK_SPEC`).
pub fn linear_packed(p: &LinearProblem<'_>, packed: &PackedW, y: &mut MatMut<'_>) {
    linear_any(p, Some(packed), y)
}

fn linear_any(p: &LinearProblem<'_>, packed: Option<&PackedW>, y: &mut MatMut<'_>) {
    if takes_bf16_pairs(p) && permitted() {
        linear_on_pairs::<Hardware, Avx512>(p, packed, y, &BASE)
    } else {
        driver::linear_with::<Avx512>(p, packed, y, None)
    }
}

/// A table entry for tests: `linear` with tile unit `U` and portable 12 x 32 micro-kernels in
/// place of AVX-512, so the whole variant except `U`'s instructions runs on any CPU.
#[cfg(test)]
pub(crate) fn linear_for_tests<U: TileUnit>(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    linear_stand_in::<U>(p, None, y)
}

/// `linear_for_tests` on a W packed with `PACK_SPEC`'s layout (Some) or unpacked (None).
#[cfg(test)]
pub(crate) fn linear_packed_for_tests<U: TileUnit>(
    p: &LinearProblem<'_>,
    packed: &PackedW,
    y: &mut MatMut<'_>,
) {
    linear_stand_in::<U>(p, Some(packed), y)
}

#[cfg(test)]
fn linear_stand_in<U: TileUnit>(
    p: &LinearProblem<'_>,
    packed: Option<&PackedW>,
    y: &mut MatMut<'_>,
) {
    use super::portable::PortableTile;
    if takes_bf16_pairs(p) {
        let mut base = AmxBase::<U>::new();
        driver::linear_with::<PortableTile<12, 32>>(p, packed, y, Some(&mut base));
    } else {
        driver::linear_with::<PortableTile<12, 32>>(p, packed, y, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::selfcheck;

    /// The AMX table's GEMM path with the tile instructions emulated: VNNI packing, padding of
    /// rows/columns/k to tiles, the scratch path for the last column pair, and the driver's
    /// native-base integration (shrink/expand/epilogue around it). Only the ten instructions
    /// in `Hardware` stay unexecuted on CPUs without AMX (the start-up self-check covers them
    /// where AMX exists).
    const EMULATED: crate::backend::cpu::LinearFn = linear_for_tests::<Emulated>;

    #[test]
    fn amx_gemm_path_matches_the_reference_with_emulated_tiles() {
        selfcheck::verify_bf16_gemm(EMULATED, linear_packed_for_tests::<Emulated>, 11).unwrap();
    }

    /// The emulated instruction itself on a hand-checked layout: A row i = i+1 at every k,
    /// B column j = j at every k (VNNI), k = 32: C[i][j] = 32 (i+1) j.
    #[test]
    fn emulated_tile_product_uses_the_vnni_layout() {
        let bf = |v: f32| (v.to_bits() >> 16) as u16;
        let k = 32;
        let a: Vec<u16> = (0..32).flat_map(|i| vec![bf(i as f32 + 1.0); k]).collect();
        let tile = |col0: usize| -> Vec<u16> {
            let mut t = vec![0u16; k / 2 * 32];
            for kp in 0..k / 2 {
                for j in 0..16 {
                    t[kp * 32 + 2 * j] = bf((col0 + j) as f32);
                    t[kp * 32 + 2 * j + 1] = bf((col0 + j) as f32);
                }
            }
            t
        };
        let (b0, b1) = (tile(0), tile(16));
        let mut c = vec![0f32; 32 * 40];
        // SAFETY: buffers sized for one 32 x 32 block with k = 32, ldc = 40.
        unsafe {
            Emulated::begin();
            Emulated::block_32x32(Block {
                a: a.as_ptr(),
                lda: k * 2,
                b0: b0.as_ptr(),
                b1: b1.as_ptr(),
                ldb: 32,
                k,
                c: c.as_mut_ptr(),
                ldc: 40,
            });
            Emulated::end();
        }
        for i in 0..32 {
            for j in 0..32 {
                assert_eq!(c[i * 40 + j], (32 * (i + 1) * j) as f32, "({i}, {j})");
            }
        }
    }
}
