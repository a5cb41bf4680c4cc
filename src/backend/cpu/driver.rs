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

use crate::backend::{LinearProblem, Slot};
use crate::dtype::{self, DType};
use crate::matrix::{MatMut, MatRef};
use rayon::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

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
    /// to the `MicroKernel`'s NR.
    ///
    /// # Safety
    /// `c` holds that many rows of ldc >= ntp floats; rows j0..j0+nt lie inside w.
    unsafe fn block(
        &self,
        w: &MatRef<'_>,
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
    linear_with::<K>(p, y, None)
}

/// `linear`, with the base part of GEMM-path tiles computed by `native` when given.
pub fn linear_with<K: MicroKernel>(
    p: &LinearProblem<'_>,
    y: &mut MatMut<'_>,
    mut native: Option<&mut dyn NativeGemm>,
) {
    let (m, n) = (p.m(), p.n());
    if m == 0 || n == 0 {
        return;
    }
    let mut ws = take_ws();
    if m <= DECODE_MAX_M {
        decode::<K>(p, y, &mut ws);
    } else {
        plan_rows(p, &mut ws);
        let mut m0 = 0;
        while m0 < m {
            let m1 = (m0 + MAX_M).min(m);
            gemm_chunk::<K>(p, y, &mut ws, m0, m1, native.as_deref_mut());
            m0 = m1;
        }
    }
    give_ws(ws);
}

/// One chunk of walk-order rows `m0..m1` on the GEMM path.
fn gemm_chunk<K: MicroKernel>(
    p: &LinearProblem<'_>,
    y: &mut MatMut<'_>,
    ws: &mut CallWs,
    m0: usize,
    m1: usize,
    mut native: Option<&mut (dyn NativeGemm + '_)>,
) {
    let (n, k) = (p.n(), p.k());
    let (mr, nr) = (K::MR, K::NR);
    let bl = blocking();
    let kcb = bl.kc.max(8);
    let mt = m1 - m0;
    let mpan = mt.div_ceil(mr);
    let mtp = mpan * mr;
    let mcp = (bl.mc / mr).max(1); // row panels per MC group
    let nkb = k.div_ceil(kcb);
    let CallWs {
        xpack,
        t,
        tpack,
        perm,
        ranges,
        cranges,
        toff,
        tpoff,
        shrink_tasks,
        ..
    } = ws;
    let perm = &perm[m0..m1];
    let native_rows = match native.as_deref_mut() {
        Some(nat) => nat.prepare(&p.x, perm),
        None => 0,
    };
    let native: Option<&dyn NativeGemm> = native.map(|n| &*n);

    // 1. Pack x: block b starts at b * mtp * kcb; panel ip of block b at + ip * kcb_b * mr.
    let xp = SharedPtr(grow(xpack, mtp * kcb * nkb).as_mut_ptr());
    (0..mpan).into_par_iter().for_each(|ip| {
        WS.with(|tw| {
            let tw = &mut *tw.borrow_mut();
            let row = grow(&mut tw.row, k);
            for i in 0..mr {
                let wi = ip * mr + i;
                if wi < mt {
                    p.x.row_f32(perm[wi], 0, row);
                } else {
                    row.fill(0.0);
                }
                for b in 0..nkb {
                    let kc = kcb.min(k - b * kcb);
                    let base = b * mtp * kcb + ip * kc * mr;
                    for q in 0..kc {
                        // SAFETY: panel ip owns elements [base, base + kc*mr) of block b.
                        unsafe { *xp.get().add(base + q * mr + i) = row[b * kcb + q] };
                    }
                }
            }
        })
    });
    let xpack: &[f32] = &xpack[..mtp * kcb * nkb];
    let xpanel = |b: usize, ip: usize| -> *const f32 {
        let kc = kcb.min(k - b * kcb);
        xpack[b * mtp * kcb + ip * kc * mr..].as_ptr()
    };

    // 2. Shrink into T (mtp x rpad), then packed T panels per slot.
    cranges.clear();
    toff.clear();
    tpoff.clear();
    let (mut rpad, mut tplen) = (0, 0);
    for (s, &(lo, hi)) in ranges.iter().enumerate() {
        let (lo, hi) = (lo.clamp(m0, m1) - m0, hi.clamp(m0, m1) - m0);
        let r = slot_at(p, s).map_or(0, |sl| sl.rank());
        let used = hi > lo && r > 0;
        cranges.push(if used { (lo, hi) } else { (0, 0) });
        toff.push(rpad);
        tpoff.push(tplen);
        if used {
            rpad += r.div_ceil(nr) * nr;
            tplen += (hi.div_ceil(mr) - lo / mr) * r * mr;
        }
    }
    let cranges: &[(usize, usize)] = cranges;
    let (toff, tpoff): (&[usize], &[usize]) = (toff, tpoff);
    if rpad > 0 {
        let tp = SharedPtr(grow(t, mtp * rpad).as_mut_ptr());
        let tpk = SharedPtr(grow(tpack, tplen).as_mut_ptr());
        // One task per (MC group, slot, NR-wide panel of the slot's rank): each packs only its
        // own rows of A, so a single adapter's shrink spreads over threads (rank/NR tasks) and a
        // mixed batch's over its slots, without packing any of A twice within a group.
        let groups = mpan.div_ceil(mcp);
        let tasks = shrink_tasks;
        tasks.clear();
        for g in 0..groups {
            let (g0, g1) = (g * mcp, ((g + 1) * mcp).min(mpan));
            for (s, &(lo, hi)) in cranges.iter().enumerate() {
                if hi <= lo {
                    continue;
                }
                let (a0, a1) = (g0.max(lo / mr), g1.min(hi.div_ceil(mr)));
                if a0 >= a1 {
                    continue;
                }
                let r = slot_at(p, s).map_or(0, |sl| sl.rank());
                tasks.extend((0..r.div_ceil(nr)).map(|jp| (s, a0, a1, jp)));
            }
        }
        tasks.par_iter().for_each(|&(s, a0, a1, jp)| {
            WS.with(|tw| {
                let tw = &mut *tw.borrow_mut();
                let (lo, hi) = cranges[s];
                let slot = slot_at(p, s).expect("used slot");
                let r = slot.rank();
                let ps0 = lo / mr;
                let (c0, c1) = (jp * nr, (jp * nr + nr).min(r));
                let bpack = grow(&mut tw.bpack, nr * kcb);
                for b in 0..nkb {
                    let kc = kcb.min(k - b * kcb);
                    // SAFETY: rows c0..c1 and columns b*kcb..+kc lie inside A; bpack holds
                    // nr*kcb floats.
                    unsafe { K::pack_b(&slot.a, c0, c1 - c0, b * kcb, kc, bpack.as_mut_ptr()) };
                    for ip in a0..a1 {
                        // SAFETY: this task owns T rows of panels a0..a1 in the columns
                        // toff[s] + c0 .. + nr (inside rpad: ranks are padded to NR).
                        unsafe {
                            K::micro(
                                kc,
                                xpanel(b, ip),
                                bpack.as_ptr(),
                                tp.get().add(ip * mr * rpad + toff[s] + c0),
                                rpad,
                                b > 0,
                            )
                        };
                    }
                }
                if nkb == 0 {
                    for row in a0 * mr..a1 * mr {
                        for c in c0..c1 {
                            // SAFETY: as above.
                            unsafe { *tp.get().add(row * rpad + toff[s] + c) = 0.0 };
                        }
                    }
                }
                // Pack T_s panels a0..a1, columns c0..c1, with scale * gains, zero outside the
                // slot's rows.
                for ip in a0..a1 {
                    let base = tpoff[s] + (ip - ps0) * r * mr;
                    for c in c0..c1 {
                        let g = slot.scale * slot.gains.map_or(1.0, |gm| gm.get(0, c));
                        for i in 0..mr {
                            let row = ip * mr + i;
                            // SAFETY: this task owns these packed elements; T row in range.
                            unsafe {
                                let v = if row >= lo && row < hi {
                                    g * *tp.get().add(row * rpad + toff[s] + c)
                                } else {
                                    0.0
                                };
                                *tpk.get().add(base + c * mr + i) = v;
                            }
                        }
                    }
                }
            })
        });
    }
    let tpack: &[f32] = &tpack[..tplen];

    // 3. Base GEMM + expand + epilogue over column blocks.
    let nc_max = (bl.nc / nr).max(1) * nr;
    let nc_tile = ((TILE_BYTES / 4 / mtp.max(1)) / nr).max(1) * nr;
    let threads = rayon::current_num_threads().max(1);
    // At least 2 blocks per thread so work stealing can balance a busy machine.
    let nc_bal = (n.div_ceil(threads * 2)).div_ceil(nr) * nr;
    let nc = nc_max.min(nc_tile).min(nc_bal.max(nr));
    let nblocks = n.div_ceil(nc);
    let maxr = cranges
        .iter()
        .enumerate()
        .filter(|(_, &(lo, hi))| hi > lo)
        .map(|(s, _)| slot_at(p, s).map_or(0, |sl| sl.rank()))
        .max()
        .unwrap_or(0);
    let yv = SharedPtr(y.as_mut_ptr());
    let (yld, ydt) = (y.ld, y.dtype);
    (0..nblocks).into_par_iter().for_each(|jb| {
        let (j0, j1) = (jb * nc, ((jb + 1) * nc).min(n));
        let nt = j1 - j0;
        let npan = nt.div_ceil(nr);
        let ntp = npan * nr;
        WS.with(|tw| {
            let tw = &mut *tw.borrow_mut();
            let ThreadWs {
                bpack, ctile, bias, ..
            } = tw;
            let bpack = grow(bpack, ntp * kcb.max(maxr));
            let ctile = grow(ctile, mtp.max(native_rows) * ntp);
            let cptr = ctile.as_mut_ptr();
            if let Some(nat) = native {
                // SAFETY: ctile holds native_rows x ntp floats; W rows j0..j1 exist.
                unsafe { nat.block(&p.w, j0, nt, ntp, cptr, ntp) };
            }
            for b in (0..nkb).filter(|_| native.is_none()) {
                let kc = kcb.min(k - b * kcb);
                for jp in 0..npan {
                    let rows = nr.min(nt - jp * nr);
                    // SAFETY: W rows j0.., columns b*kcb.. lie inside W; bpack holds ntp*kc.
                    unsafe {
                        K::pack_b(
                            &p.w,
                            j0 + jp * nr,
                            rows,
                            b * kcb,
                            kc,
                            bpack.as_mut_ptr().add(jp * nr * kc),
                        )
                    };
                }
                let mut ic = 0;
                while ic < mpan {
                    let ie = (ic + mcp).min(mpan);
                    for jp in 0..npan {
                        let bp = bpack[jp * nr * kc..].as_ptr();
                        for ip in ic..ie {
                            // SAFETY: panels hold kc*mr / kc*nr floats; ctile is mtp x ntp.
                            unsafe {
                                K::micro(
                                    kc,
                                    xpanel(b, ip),
                                    bp,
                                    cptr.add(ip * mr * ntp + jp * nr),
                                    ntp,
                                    b > 0,
                                )
                            };
                        }
                    }
                    ic = ie;
                }
            }
            if nkb == 0 && native.is_none() {
                ctile.fill(0.0);
            }
            // Expand: r_s more K-steps per slot, only over that slot's row panels.
            for (s, &(lo, hi)) in cranges.iter().enumerate() {
                if hi <= lo {
                    continue;
                }
                let slot = slot_at(p, s).expect("used slot");
                let r = slot.rank();
                for jp in 0..npan {
                    let rows = nr.min(nt - jp * nr);
                    // SAFETY: B rows j0.., columns 0..r lie inside B; bpack holds ntp*r.
                    unsafe {
                        K::pack_b(
                            &slot.b,
                            j0 + jp * nr,
                            rows,
                            0,
                            r,
                            bpack.as_mut_ptr().add(jp * nr * r),
                        )
                    };
                }
                let (ps0, ps1) = (lo / mr, hi.div_ceil(mr));
                for jp in 0..npan {
                    let bp = bpack[jp * nr * r..].as_ptr();
                    for ip in ps0..ps1 {
                        let ap = tpack[tpoff[s] + (ip - ps0) * r * mr..].as_ptr();
                        // SAFETY: the T panel holds r*mr floats, the B panel r*nr.
                        unsafe {
                            K::micro(r, ap, bp, cptr.add(ip * mr * ntp + jp * nr), ntp, true)
                        };
                    }
                }
            }
            // Epilogue: bias, convert, one write of y per element.
            let bias: Option<&[f32]> = match p.bias {
                Some(bm) => {
                    let bv = grow(bias, nt);
                    bm.row_f32(0, j0, bv);
                    Some(bv)
                }
                None => None,
            };
            for (wi, &src) in perm.iter().enumerate() {
                let crow = &mut ctile[wi * ntp..wi * ntp + nt];
                if let Some(bv) = bias {
                    for (o, b) in crow.iter_mut().zip(bv) {
                        *o += b;
                    }
                }
                // SAFETY: blocks write disjoint column ranges of y; (src, j0..j1) is inside y.
                unsafe { K::store_row(crow, yv.get().add((src * yld + j0) * ydt.size()), ydt) };
            }
        })
    });
}

/// k-block length for the decode kernels: x rows (m of them) stay in L1 across W rows.
fn decode_kc(m: usize) -> usize {
    ((65536 / (4 * m.max(1))) / 64 * 64).max(256)
}

/// `out (+)= x W^T` for m <= DECODE_MAX_M rows, blocked over k so x stays in L1.
///
/// # Safety
/// As `MicroKernel::gemv` with c0 = 0 and k = w.cols.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_blocked<K: MicroKernel>(
    x: *const f32,
    ldx: usize,
    m: usize,
    w: &MatRef<'_>,
    out: *mut f32,
    ldo: usize,
    acc: bool,
) {
    let k = w.cols;
    if k == 0 {
        if !acc {
            for i in 0..m {
                for j in 0..w.rows {
                    *out.add(i * ldo + j) = 0.0;
                }
            }
        }
        return;
    }
    let kcd = decode_kc(m);
    let mut kb = 0;
    while kb < k {
        let kc = kcd.min(k - kb);
        K::gemv(x.add(kb), ldx, m, w, kb, kc, out, ldo, acc || kb > 0);
        kb += kc;
    }
}

/// Decode path (m <= DECODE_MAX_M).
fn decode<K: MicroKernel>(p: &LinearProblem<'_>, y: &mut MatMut<'_>, ws: &mut CallWs) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    let CallWs { xpack, t, toff, .. } = ws;
    let xf = grow(xpack, m * k.max(1));
    for i in 0..m {
        p.x.row_f32(i, 0, &mut xf[i * k..(i + 1) * k]);
    }
    let xf: &[f32] = xf;
    // Shrink: T (m x rsum, dense per slot), rows that do not use a slot are zero there.
    toff.clear();
    let mut rsum = 0;
    for (s, sl) in p.slots.iter().enumerate() {
        toff.push(rsum);
        if let Some(sl) = sl {
            if (0..m).any(|i| p.applies(s, i)) {
                rsum += sl.rank();
            }
        }
    }
    let tv = grow(t, m * rsum.max(1));
    for (s, sl) in p.slots.iter().enumerate() {
        let Some(sl) = sl else { continue };
        if !(0..m).any(|i| p.applies(s, i)) {
            continue;
        }
        let (o, r) = (toff[s], sl.rank());
        // SAFETY: x is m x k at ld k; A is r x k; T has m rows of rsum at columns o..o+r.
        unsafe {
            gemv_blocked::<K>(
                xf.as_ptr(),
                k,
                m,
                &sl.a,
                tv.as_mut_ptr().add(o),
                rsum,
                false,
            )
        };
        for i in 0..m {
            let applies = p.applies(s, i);
            for c in 0..r {
                let v = &mut tv[i * rsum + o + c];
                *v = if applies {
                    sl.scale * sl.gains.map_or(1.0, |g| g.get(0, c)) * *v
                } else {
                    0.0
                };
            }
        }
    }
    let tv: &[f32] = tv;
    let toff: &[usize] = toff;
    // A slot is used when some row applies it; its T columns are then the next block.
    let slot_used =
        |s: usize| -> bool { slot_at(p, s).is_some() && (0..m).any(|i| p.applies(s, i)) };
    let threads = rayon::current_num_threads().max(1);
    let cols = n.div_ceil(threads * 8).clamp(16, 512);
    let chunks = n.div_ceil(cols);
    let yv = SharedPtr(y.as_mut_ptr());
    let (yld, ydt) = (y.ld, y.dtype);
    (0..chunks).into_par_iter().for_each(|c| {
        let (j0, j1) = (c * cols, ((c + 1) * cols).min(n));
        let nt = j1 - j0;
        WS.with(|tw| {
            let tw = &mut *tw.borrow_mut();
            let out = grow(&mut tw.ctile, m * nt);
            let wv = p.w.row_range(j0, nt);
            // SAFETY: x is m x k; out is m x nt at ld nt.
            unsafe { gemv_blocked::<K>(xf.as_ptr(), k, m, &wv, out.as_mut_ptr(), nt, false) };
            for (s, sl) in p.slots.iter().enumerate() {
                let Some(sl) = sl else { continue };
                if !slot_used(s) {
                    continue;
                }
                let bv = sl.b.row_range(j0, nt);
                // SAFETY: T columns toff[s].. hold r values per row at ld rsum; B rows j0..j1.
                unsafe {
                    gemv_blocked::<K>(
                        tv.as_ptr().add(toff[s]),
                        rsum,
                        m,
                        &bv,
                        out.as_mut_ptr(),
                        nt,
                        true,
                    )
                };
            }
            if let Some(bm) = p.bias {
                let bv = grow(&mut tw.bias, nt);
                bm.row_f32(0, j0, bv);
                for i in 0..m {
                    for (o, b) in out[i * nt..(i + 1) * nt].iter_mut().zip(bv.iter()) {
                        *o += b;
                    }
                }
            }
            for i in 0..m {
                // SAFETY: chunks write disjoint columns of y; (i, j0..j1) is inside y.
                unsafe {
                    K::store_row(
                        &out[i * nt..(i + 1) * nt],
                        yv.get().add((i * yld + j0) * ydt.size()),
                        ydt,
                    )
                };
            }
        })
    });
}
