//! The optimized CPU driver shared by every ISA: a cache-blocked, multithreaded fused GEMM whose
//! inner kernels come from the ISA (`MicroKernel`), a streaming decode path for small m, and the
//! adapter "shrink" T = scale * gains * (x A^T).
//!
//! GEMM path (m > `DECODE_MAX_M`), BLIS loop order per call:
//! 1. x is packed once per call (f32, MR-row panels per KC block), shared by every thread.
//! 2. Shrink: T = x A_s^T for every slot with rows, as a small GEMM on the same packed x and the
//!    same micro-kernel (A_s packed like W), then scaled by `scale * gains` and packed into
//!    MR-row panels, zero outside the slot's rows.
//! 3. Threads take column blocks of W (NC wide, work stealing). For each KC block a task packs
//!    its W block once (the ISA converts f16/bf16 with SIMD during the transpose), then runs the
//!    micro-kernel over MC-row groups of packed x. The expand step follows in the same tile:
//!    r_s more K-steps per slot against [T_s | B_s], only over the row panels holding that
//!    slot's rows. The epilogue adds the bias, converts, and writes y once.
//!
//! Mixed batches walk rows in slot order (counting sort), so each slot's rows are contiguous;
//! a row panel runs the expand only for the slots present in it, so every row pays for its own
//! adapter's rank (no padding to the largest rank) plus, at slot boundaries, one shared panel.
//!
//! Decode path (m <= `DECODE_MAX_M`): memory-bound. W is streamed once in its own dtype and
//! converted in registers by the ISA's `gemv` kernel (all m rows per W element), n split across
//! threads; the adapter adds only its own bytes (A for the shrink, B rows for the expand).
//!
//! Memory: call-level buffers (packed x, T) come from a pool and per-thread buffers (packed W
//! block, accumulator tile) are thread-local; both are kept, so after the first call of a shape
//! the hot path allocates nothing.

use super::pack::{PackedW, PanelLayout};
use crate::backend::{ActQuant, LinearProblem, Slot};
use crate::dtype::{self, DType};
use crate::matrix::{MatMut, MatRef};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

mod decode;
mod gemm;
use decode::decode;
use gemm::gemm_chunk;

/// An ISA's inner kernels. Everything except `micro` has a portable default.
pub trait MicroKernel: Sync + Send + 'static {
    /// Rows of the register tile.
    const MR: usize;
    /// Columns of the register tile.
    const NR: usize;

    /// `c[i * ldc + j] (+)= sum_p a[p * MR + i] * b[p * NR + j]` for i < MR, j < NR, p < kc;
    /// `acc == false` overwrites c.
    ///
    /// # Safety
    /// `a` holds kc*MR, `b` kc*NR floats; `c` has MR rows of NR writable floats at stride ldc.
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool);

    /// Packs rows `r0..r0 + rows` (rows <= NR) of `src`, columns `c0..c0 + kc`, transposed into
    /// `dst[p * NR + j]` (f32); rows `rows..NR` are zero.
    ///
    /// # Safety
    /// The rows and columns lie inside `src`; `dst` has kc*NR writable floats.
    unsafe fn pack_b(
        src: &MatRef<'_>,
        r0: usize,
        rows: usize,
        c0: usize,
        kc: usize,
        dst: *mut f32,
    ) {
        pack_b_generic(src, r0, rows, c0, kc, Self::NR, dst)
    }

    /// `out[i * ldo + j] (+)= sum_p x[i * ldx + p] * w(j, c0 + p)` for i < m, j < w.rows,
    /// p < k, with w read in its own dtype. `m <= DECODE_MAX_M`; `acc == false` overwrites.
    ///
    /// # Safety
    /// x has m rows of k floats at stride ldx; columns c0..c0+k lie inside w; out has m rows of
    /// w.rows writable floats at stride ldo.
    #[allow(clippy::too_many_arguments)]
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
        gemv_generic(x, ldx, m, w, c0, k, out, ldo, acc)
    }

    /// `gemv` for a block-quantized W (Q8_0, Q4_0, Q4_K), over whole rows (c0 = 0, k =
    /// w.cols): blocks are decoded in registers as they stream. The GEMM path needs no such
    /// hook: `pack_b` dequantizes blocks into its f32 panels through `MatRef::row_f32`.
    ///
    /// # Safety
    /// As `gemv` with c0 = 0 and k = w.cols; w is quantized.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemv_quant(
        x: *const f32,
        ldx: usize,
        m: usize,
        w: &MatRef<'_>,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        super::quant_gemv::gemv_portable(x, ldx, m, w, out, ldo, acc)
    }

    /// `gemv_quant` with x quantized to Q8 blocks (`ActQuant::Q8`): integer dot products.
    ///
    /// # Safety
    /// out has m rows of w.rows writable floats at stride ldo; w is quantized with
    /// `w.cols == x.k`; x holds m rows.
    unsafe fn gemv_quant_q8(
        x: &crate::quant::Q8Rows,
        m: usize,
        w: &MatRef<'_>,
        out: *mut f32,
        ldo: usize,
        acc: bool,
    ) {
        super::quant_gemv::gemv_q8_portable(x, m, w, out, ldo, acc)
    }

    /// Decode on a repacked Q4_0 / Q8_0 W (`PanelLayout::Interleaved8`; `QPackGemv` says which
    /// rows, x and out).
    ///
    /// # Safety
    /// As `quant_pack::gemv_portable`.
    unsafe fn gemv_qpack(c: &super::quant_pack::QPackGemv<'_>) {
        super::quant_pack::gemv_portable(c)
    }

    /// Whether `micro_panel` reads packed panels of `layout` natively (converting
    /// in registers). When false, the driver converts each packed block to f32 once per block
    /// and calls `micro`, and decode uses the portable `gemv_panel_generic`.
    fn reads_panel(layout: PanelLayout) -> bool {
        layout == PanelLayout::F32
    }

    /// Whether `gemv_panels` reads packed panels of `layout` (decode); when false, decode uses
    /// the portable `gemv_panel_generic`.
    fn gemv_reads_panel(layout: PanelLayout) -> bool {
        Self::reads_panel(layout)
    }

    /// `micro` with B read from a prepacked panel block (`kc` k-steps of NR columns, in
    /// `layout`, from an even k offset). Only called when `reads_panel(layout)`.
    ///
    /// # Safety
    /// As `micro`; `b` holds the panel block (for `Bf16Pairs`, kc rounded up to even steps).
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro_panel(
        kc: usize,
        a: *const f32,
        b: *const u8,
        layout: PanelLayout,
        c: *mut f32,
        ldc: usize,
        acc: bool,
    ) {
        debug_assert_eq!(layout, PanelLayout::F32);
        Self::micro(kc, a, b as *const f32, c, ldc, acc)
    }

    /// Decode on `npan` prepacked panels (panel p's block at `b + p * pstride` bytes):
    /// `out[i * ldo + p * NR + j] (+)= sum_q x[i * ldx + q] * panel_p(q, j)` for i < m
    /// (<= DECODE_MAX_M), j < NR, q < kc; `acc == false` overwrites.
    ///
    /// # Safety
    /// x has m rows of kc floats at stride ldx; each `b + p * pstride` as in `micro_panel`; out
    /// has m rows of npan * NR writable floats at stride ldo.
    #[allow(clippy::too_many_arguments)]
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
        for p in 0..npan {
            let (bp, op) = (b.add(p * pstride), out.add(p * Self::NR));
            gemv_panel_generic(x, ldx, m, bp, layout, kc, Self::NR, op, ldo, acc)
        }
    }

    /// Rounds `src` into `dtype` at `dst` (nearest-even, like `dtype::convert_from_f32`).
    ///
    /// # Safety
    /// `dst` has src.len() writable elements of `dtype` (any alignment).
    unsafe fn store_row(src: &[f32], dst: *mut u8, dtype: DType) {
        dtype::convert_from_f32(src, dst, dtype)
    }
}

/// A native base GEMM that replaces the packed-f32 K loop for the base part of a tile (AMX for
/// bf16 x bf16). The shrink, expand and epilogue stay on the `MicroKernel` path.
pub trait NativeGemm: Sync {
    /// Called once per row chunk (outside the parallel region) with the walk-order source rows
    /// of x; returns the number of accumulator rows `block` writes (>= rows.len()).
    fn prepare(&mut self, x: &MatRef<'_>, rows: &[usize]) -> usize;
    /// `c[i * ldc + j] = sum_p x(rows[i], p) * w(j0 + j, p)` for i < the rows `prepare`
    /// returned (padding rows get 0) and j < ntp (columns nt..ntp get 0); ntp is nt rounded up
    /// to the `MicroKernel`'s NR. With `packed`, W is read from it (its layout is the one this
    /// `NativeGemm`'s table packs; j0 is a multiple of its NR).
    ///
    /// # Safety
    /// `c` holds that many rows of ldc >= ntp floats; rows j0..j0+nt lie inside w.
    #[allow(clippy::too_many_arguments)]
    unsafe fn block(
        &self,
        w: &MatRef<'_>,
        packed: Option<&PackedW>,
        j0: usize,
        nt: usize,
        ntp: usize,
        c: *mut f32,
        ldc: usize,
    );
}

/// Rows at or below this take the streaming decode path.
pub const DECODE_MAX_M: usize = 8;

/// Cache blocking. KC: depth of a packed panel pair (a 16-wide W micro-panel of KC floats is
/// 16 KiB: half of Zen 3's 32 KiB L1d). MC: rows of packed x reused against one W micro-panel
/// (MC x KC x 4 = 144 KiB, well inside a 512 KiB L2). NC: columns of W one task packs
/// (NC x KC x 4 = 512 KiB, L2/L3); smaller when m is large so the accumulator tile stays
/// within `TILE_BYTES`. `RANKFUSE_BLOCKING=kc,mc,nc` overrides them (tuning only).
#[derive(Clone, Copy, Debug)]
pub struct Blocking {
    pub kc: usize,
    pub mc: usize,
    pub nc: usize,
}

const TILE_BYTES: usize = 4 << 20;
/// Rows packed per GEMM chunk: bounds the packed x to MAX_M * k floats.
const MAX_M: usize = 1536;

pub fn blocking() -> Blocking {
    static B: OnceLock<Blocking> = OnceLock::new();
    *B.get_or_init(|| {
        let mut b = Blocking {
            kc: 256,
            mc: 144,
            nc: 512,
        };
        if let Ok(v) = std::env::var("RANKFUSE_BLOCKING") {
            let parts: Vec<usize> = v.split(',').filter_map(|s| s.trim().parse().ok()).collect();
            if parts.len() == 3 && parts.iter().all(|&x| x > 0) {
                b = Blocking {
                    kc: parts[0],
                    mc: parts[1],
                    nc: parts[2],
                };
            }
        }
        b
    })
}

/// Bytes of f32 workspace the kernels hold (thread-local and pooled), for the bench's report.
static WORKSPACE_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes held by kernel workspaces (packing buffers, tiles, T); they are kept for reuse.
pub fn workspace_bytes() -> usize {
    WORKSPACE_BYTES.load(Ordering::Relaxed)
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        let before = v.capacity();
        v.resize(n, 0.0);
        WORKSPACE_BYTES.fetch_add(4 * (v.capacity() - before), Ordering::Relaxed);
    }
    &mut v[..n]
}

/// A raw pointer that tasks share; they write disjoint parts of what it points to.
#[derive(Clone, Copy)]
struct SharedPtr<T>(*mut T);
// SAFETY: only used for buffers whose tasks write disjoint elements (stated at each use).
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedPtr<T> {}
impl<T> SharedPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

/// Per-thread buffers, borrowed only inside leaf tasks (never across a rayon call).
#[derive(Default)]
struct ThreadWs {
    bpack: Vec<f32>,
    ctile: Vec<f32>,
    row: Vec<f32>,
    bias: Vec<f32>,
}

thread_local! {
    static WS: RefCell<ThreadWs> = RefCell::new(ThreadWs::default());
}

/// Per-call buffers, taken from a pool for the duration of one call.
#[derive(Default)]
struct CallWs {
    xpack: Vec<f32>,
    /// x quantized for `ActQuant::Q8` decode.
    xq: crate::quant::Q8Rows,
    t: Vec<f32>,
    tpack: Vec<f32>,
    perm: Vec<usize>,
    counts: Vec<usize>,
    /// Per slot: walk-order rows [lo, hi) of the whole call.
    ranges: Vec<(usize, usize)>,
    /// Per slot: rows [lo, hi) inside the current chunk.
    cranges: Vec<(usize, usize)>,
    /// Per slot: column offset in T (GEMM: NR-aligned; decode: dense).
    toff: Vec<usize>,
    /// Per slot: offset of its packed T panels.
    tpoff: Vec<usize>,
    /// Shrink tasks of the current chunk: (slot, first panel, end panel, rank panel).
    shrink_tasks: Vec<(usize, usize, usize, usize)>,
}

static POOL: Mutex<Vec<CallWs>> = Mutex::new(Vec::new());

fn take_ws() -> CallWs {
    POOL.lock()
        .unwrap_or_else(|e| e.into_inner())
        .pop()
        .unwrap_or_default()
}

fn give_ws(ws: CallWs) {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).push(ws);
}

/// Scalar-per-row packing any ISA can use.
///
/// # Safety
/// As `MicroKernel::pack_b`.
pub unsafe fn pack_b_generic(
    src: &MatRef<'_>,
    r0: usize,
    rows: usize,
    c0: usize,
    kc: usize,
    nr: usize,
    dst: *mut f32,
) {
    let mut tmp = [0f32; 256];
    for j in 0..nr {
        if j >= rows {
            for p in 0..kc {
                *dst.add(p * nr + j) = 0.0;
            }
            continue;
        }
        let mut p0 = 0;
        while p0 < kc {
            let len = (kc - p0).min(tmp.len());
            src.row_f32(r0 + j, c0 + p0, &mut tmp[..len]);
            for (p, &v) in tmp[..len].iter().enumerate() {
                *dst.add((p0 + p) * nr + j) = v;
            }
            p0 += len;
        }
    }
}

/// Row-by-row gemv any ISA can use.
///
/// # Safety
/// As `MicroKernel::gemv`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemv_generic(
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
    let mut tmp = [0f32; 256];
    for j in 0..w.rows {
        let mut sums = [0f32; DECODE_MAX_M];
        let mut p0 = 0;
        while p0 < k {
            let len = (k - p0).min(tmp.len());
            w.row_f32(j, c0 + p0, &mut tmp[..len]);
            for (i, s) in sums.iter_mut().enumerate().take(m) {
                let xr = std::slice::from_raw_parts(x.add(i * ldx + p0), len);
                let mut part = [0f32; 8];
                let mut chunks = tmp[..len].chunks_exact(8).zip(xr.chunks_exact(8));
                for (a, b) in &mut chunks {
                    for l in 0..8 {
                        part[l] += a[l] * b[l];
                    }
                }
                let mut t: f32 = part.iter().sum();
                for q in (len / 8) * 8..len {
                    t += tmp[q] * xr[q];
                }
                *s += t;
            }
            p0 += len;
        }
        for (i, &s) in sums.iter().enumerate().take(m) {
            let o = out.add(i * ldo + j);
            *o = if acc { *o + s } else { s };
        }
    }
}

/// Element (p, j) of a packed panel block in `layout` with `nr` columns, as f32.
///
/// # Safety
/// `b` holds the block; p, j inside it.
#[inline(always)]
pub unsafe fn panel_elem(b: *const u8, layout: PanelLayout, nr: usize, p: usize, j: usize) -> f32 {
    match layout {
        PanelLayout::F32 => (b as *const f32).add(p * nr + j).read_unaligned(),
        PanelLayout::F16 => dtype::load_f32(b, DType::F16, p * nr + j),
        PanelLayout::Bf16Pairs => {
            let bits = (b as *const u16)
                .add((p / 2) * 2 * nr + 2 * j + p % 2)
                .read_unaligned();
            f32::from_bits((bits as u32) << 16)
        }
        PanelLayout::Interleaved8 => unreachable!("quant packs are not read as panels"),
    }
}

/// Portable decode on one packed panel of any width up to 64 (`MicroKernel::gemv_panels`).
///
/// # Safety
/// As `MicroKernel::gemv_panels` for one panel with NR = nr.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemv_panel_generic(
    x: *const f32,
    ldx: usize,
    m: usize,
    b: *const u8,
    layout: PanelLayout,
    kc: usize,
    nr: usize,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    assert!(nr <= 64 && m <= DECODE_MAX_M);
    let mut sums = [[0f32; 64]; DECODE_MAX_M];
    let mut wrow = [0f32; 64];
    for p in 0..kc {
        for (j, w) in wrow.iter_mut().enumerate().take(nr) {
            *w = panel_elem(b, layout, nr, p, j);
        }
        for (i, si) in sums.iter_mut().enumerate().take(m) {
            let xv = *x.add(i * ldx + p);
            for (s, w) in si.iter_mut().zip(&wrow[..nr]) {
                *s += xv * w;
            }
        }
    }
    for (i, si) in sums.iter().enumerate().take(m) {
        for (j, &s) in si.iter().enumerate().take(nr) {
            let o = out.add(i * ldo + j);
            *o = if acc { *o + s } else { s };
        }
    }
}

/// Slot `s` if it exists (a NULL slot is base-only).
fn slot_at<'a>(p: &LinearProblem<'a>, s: usize) -> Option<&'a Slot<'a>> {
    p.slots[s].as_ref()
}

/// Walk order: rows grouped by slot (base-only rows first), stable inside a group. Fills
/// `ws.perm` and `ws.ranges`.
fn plan_rows(p: &LinearProblem<'_>, ws: &mut CallWs) {
    let m = p.m();
    let ns = p.slots.len();
    ws.perm.clear();
    ws.ranges.clear();
    match p.row_slot {
        None => {
            ws.perm.extend(0..m);
            for s in 0..ns {
                let lo_hi = if slot_at(p, s).is_some() {
                    (0, m)
                } else {
                    (0, 0)
                };
                ws.ranges.push(lo_hi);
            }
        }
        Some(rs) => {
            let key = |i: usize| -> usize {
                let s = rs[i];
                if s < 0 || slot_at(p, s as usize).is_none() {
                    0
                } else {
                    s as usize + 1
                }
            };
            ws.counts.clear();
            ws.counts.resize(ns + 2, 0);
            for i in 0..m {
                ws.counts[key(i) + 1] += 1;
            }
            for g in 1..ns + 2 {
                ws.counts[g] += ws.counts[g - 1];
            }
            for s in 0..ns {
                ws.ranges.push((ws.counts[s + 1], ws.counts[s + 2]));
            }
            ws.perm.resize(m, 0);
            for i in 0..m {
                let g = key(i);
                ws.perm[ws.counts[g]] = i;
                ws.counts[g] += 1;
            }
        }
    }
}

/// The fused linear on the optimized path. Arguments were checked by `LinearProblem::check`.
pub fn linear<K: MicroKernel>(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    linear_with::<K>(p, None, y, None)
}

/// `linear` with W read from `packed` (made for this kernel's NR; `p.w` is only its shape).
pub fn linear_packed<K: MicroKernel>(p: &LinearProblem<'_>, packed: &PackedW, y: &mut MatMut<'_>) {
    linear_with::<K>(p, Some(packed), y, None)
}

/// `linear`, with W prepacked when `packed` is given, and the base part of GEMM-path tiles
/// computed by `native` when given.
pub fn linear_with<K: MicroKernel>(
    p: &LinearProblem<'_>,
    packed: Option<&PackedW>,
    y: &mut MatMut<'_>,
    native: Option<&mut dyn NativeGemm>,
) {
    linear_with_act::<K>(p, packed, y, native, ActQuant::Exact)
}

/// `linear` with x quantized to Q8 blocks for the base product of decode calls on a
/// block-quantized W (`ActQuant::Q8`); everything else as `linear`.
pub fn linear_act_q8<K: MicroKernel>(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    linear_with_act::<K>(p, None, y, None, ActQuant::Q8)
}

/// `linear_packed` in the `ActQuant::Q8` mode: decode on a repacked Q4_0 / Q8_0 W reads x as Q8
/// blocks (the GEMM path, m > 8, stays exact as for an unpacked W).
pub fn linear_packed_act_q8<K: MicroKernel>(
    p: &LinearProblem<'_>,
    packed: &PackedW,
    y: &mut MatMut<'_>,
) {
    linear_with_act::<K>(p, Some(packed), y, None, ActQuant::Q8)
}

/// `linear_with`, with the activation mode of quantized-W decode.
pub fn linear_with_act<K: MicroKernel>(
    p: &LinearProblem<'_>,
    packed: Option<&PackedW>,
    y: &mut MatMut<'_>,
    mut native: Option<&mut dyn NativeGemm>,
    act: ActQuant,
) {
    let (m, n) = (p.m(), p.n());
    if m == 0 || n == 0 {
        return;
    }
    if let Some(pw) = packed {
        assert!(
            pw.nr() == K::NR && pw.rows() == n && pw.cols() == p.k(),
            "a pack for another kernel or shape reached the driver"
        );
    }
    let mut ws = take_ws();
    if m <= DECODE_MAX_M {
        decode::<K>(p, packed, y, &mut ws, act);
    } else {
        plan_rows(p, &mut ws);
        let mut m0 = 0;
        while m0 < m {
            let m1 = (m0 + MAX_M).min(m);
            gemm_chunk::<K>(p, packed, y, &mut ws, m0, m1, native.as_deref_mut());
            m0 = m1;
        }
    }
    give_ws(ws);
}
