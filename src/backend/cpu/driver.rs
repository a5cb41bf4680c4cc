//! The optimized CPU driver shared by every ISA: a cache-blocked, multithreaded fused GEMM whose
//! micro-kernel comes from the ISA (`MicroKernel`), a streaming decode path for small m, and the
//! adapter "shrink" T = scale * x A^T.
//!
//! Fusion (ARCHITECTURE.md): each output tile keeps its f32 accumulators in a per-thread buffer;
//! after the base K-loop over x W^T the same tile runs r more K-steps against [T | B]. y is written
//! once, with bias and dtype conversion, at the end of the tile. Mixed-adapter batches permute rows
//! so that rows sharing a slot are contiguous; a row panel runs the expand step only for the
//! slots present in it, with rows of other slots zeroed in the packed T, so every row pays only
//! for its own adapter's rank.

use crate::backend::LinearProblem;
use crate::dtype::{self, DType};
use crate::matrix::{MatMut, MatRef};
use rayon::prelude::*;
use std::cell::RefCell;

/// An ISA's register-blocked inner kernels over packed f32 panels.
pub trait MicroKernel: Sync + Send + 'static {
    const MR: usize;
    const NR: usize;
    /// `c[i * ldc + j] += sum_p a[p * MR + i] * b[p * NR + j]` for i < MR, j < NR, p < kc.
    ///
    /// # Safety
    /// `a` holds kc*MR, `b` kc*NR floats; `c` has MR rows of NR writable floats at stride ldc.
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize);
    /// `sum a[i] * b[i]` for i < n (unaligned pointers).
    ///
    /// # Safety
    /// Both point to n readable floats.
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32;
}

const KC: usize = 256;
const MC_TARGET: usize = 128;
const NC_TARGET: usize = 256;
/// Rows at or below this take the streaming decode path.
pub(crate) const DECODE_MAX_M: usize = 8;
/// Width of the W chunks the decode path converts at a time (fits L1).
const DECODE_CHUNK: usize = 1024;

#[derive(Default)]
struct Workspace {
    apack: Vec<f32>,
    bpack: Vec<f32>,
    ctile: Vec<f32>,
    row: Vec<f32>,
    acc: Vec<f32>,
}

thread_local! {
    // Reused across calls: after the first call of a shape, the hot path allocates nothing.
    static WS: RefCell<Workspace> = RefCell::new(Workspace::default());
}

fn grow(v: &mut Vec<f32>, n: usize) -> &mut [f32] {
    if v.len() < n {
        v.resize(n, 0.0);
    }
    &mut v[..n]
}

/// Per-call adapter data: T (m x R, scaled, f32) and where each slot's columns start.
struct Shrink {
    t: Vec<f32>,
    r_total: usize,
    off: Vec<usize>,
}

/// The row order the GEMM walks (grouped by slot for mixed batches) and, per row, its slot.
struct RowPlan {
    perm: Vec<usize>,
    slot_of: Vec<i32>,
}

fn row_plan(p: &LinearProblem<'_>) -> Option<RowPlan> {
    let rs = p.row_slot?;
    let mut perm: Vec<usize> = (0..rs.len()).collect();
    perm.sort_by_key(|&i| rs[i]);
    let slot_of = perm.iter().map(|&i| rs[i]).collect();
    Some(RowPlan { perm, slot_of })
}

fn compute_shrink<K: MicroKernel>(p: &LinearProblem<'_>) -> Shrink {
    let m = p.m();
    let k = p.k();
    let mut off = Vec::with_capacity(p.slots.len());
    let mut r_total = 0;
    for s in p.slots {
        off.push(r_total);
        r_total += s.map_or(0, |s| s.rank());
    }
    let mut t = vec![0f32; m * r_total];
    if r_total == 0 || k == 0 {
        return Shrink { t, r_total, off };
    }
    // A in f32 once per call (adapter tensors are small next to W).
    let a32: Vec<Option<Vec<f32>>> = p
        .slots
        .iter()
        .map(|s| s.and_then(|s| (s.a.dtype != DType::F32 || s.a.ld != k).then(|| s.a.to_f32_vec())))
        .collect();
    t.par_chunks_mut(r_total).enumerate().for_each(|(i, trow)| {
        WS.with(|ws| {
            let ws = &mut *ws.borrow_mut();
            let xr = grow(&mut ws.row, k);
            p.x.row_f32(i, 0, xr);
            for (s, slot) in p.slots.iter().enumerate() {
                let Some(slot) = slot else { continue };
                if !p.applies(s, i) {
                    continue;
                }
                for r in 0..slot.rank() {
                    let arow = match &a32[s] {
                        Some(v) => v[r * k..].as_ptr(),
                        None => slot.a.row_ptr(r) as *const f32,
                    };
                    // SAFETY: both rows hold k floats.
                    let d = unsafe { K::dot(xr.as_ptr(), arow, k) };
                    let g = slot.gains.map_or(1.0, |g| g.get(0, r));
                    trow[off[s] + r] = slot.scale * g * d;
                }
            }
        })
    });
    Shrink { t, r_total, off }
}

/// Packs rows `rows` (source row indices, or None = zero row) of `src`, columns c0..c0+kc, into
/// panels of `mr` rows: `dst[panel][p][i]`.
fn pack_rows(
    src: &MatRef<'_>,
    rows: &[Option<usize>],
    c0: usize,
    kc: usize,
    mr: usize,
    dst: &mut [f32],
    tmp: &mut [f32],
) {
    let panels = rows.len().div_ceil(mr);
    for pi in 0..panels {
        let base = pi * mr * kc;
        for i in 0..mr {
            let idx = pi * mr + i;
            match rows.get(idx).copied().flatten() {
                Some(r) => {
                    src.row_f32(r, c0, &mut tmp[..kc]);
                    for p in 0..kc {
                        dst[base + p * mr + i] = tmp[p];
                    }
                }
                None => {
                    for p in 0..kc {
                        dst[base + p * mr + i] = 0.0;
                    }
                }
            }
        }
    }
}

/// Fused GEMM path.
fn gemm<K: MicroKernel>(
    p: &LinearProblem<'_>,
    y: &mut MatMut<'_>,
    sh: &Shrink,
    plan: &Option<RowPlan>,
) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    let (mr, nr) = (K::MR, K::NR);
    let mc = (MC_TARGET / mr).max(1) * mr;
    let nc = (NC_TARGET / nr).max(1) * nr;
    let mb = m.div_ceil(mc);
    let nb = n.div_ceil(nc);
    let yv = &*y;
    let t_mat = (sh.r_total > 0).then(|| {
        // SAFETY: t holds m x r_total floats.
        unsafe {
            MatRef::from_raw(
                sh.t.as_ptr() as *const u8,
                DType::F32,
                m,
                sh.r_total,
                sh.r_total,
            )
        }
    });
    (0..mb * nb).into_par_iter().for_each(|tile| {
        let (bi, bj) = (tile / nb, tile % nb);
        let (i0, i1) = (bi * mc, ((bi + 1) * mc).min(m));
        let (j0, j1) = (bj * nc, ((bj + 1) * nc).min(n));
        let (mt, nt) = (i1 - i0, j1 - j0);
        let mtp = mt.div_ceil(mr) * mr;
        let ntp = nt.div_ceil(nr) * nr;
        // Source row of each position of the block, in walk order.
        let src_rows: Vec<Option<usize>> = (i0..i1)
            .map(|i| Some(plan.as_ref().map_or(i, |pl| pl.perm[i])))
            .collect();
        let w_rows: Vec<Option<usize>> = (j0..j1).map(Some).collect();
        WS.with(|ws| {
            let ws = &mut *ws.borrow_mut();
            let kmax = KC.max(
                sh.off
                    .iter()
                    .zip(p.slots)
                    .map(|(_, s)| s.map_or(0, |s| s.rank()))
                    .max()
                    .unwrap_or(0),
            );
            let apack = grow(&mut ws.apack, mtp * kmax);
            let bpack = grow(&mut ws.bpack, ntp * kmax);
            let tmp = grow(&mut ws.row, kmax.max(nt));
            let ctile = grow(&mut ws.ctile, mtp * ntp);
            ctile.fill(0.0);
            let mut kb = 0;
            while kb < k {
                let kc = KC.min(k - kb);
                pack_rows(&p.w, &w_rows, kb, kc, nr, bpack, tmp);
                pack_rows(&p.x, &src_rows, kb, kc, mr, apack, tmp);
                run_block::<K>(kc, mtp / mr, ntp / nr, apack, bpack, ctile, ntp, None);
                kb += kc;
            }
            if let Some(tm) = &t_mat {
                for (s, slot) in p.slots.iter().enumerate() {
                    let Some(slot) = slot else { continue };
                    let r = slot.rank();
                    // Which row panels hold rows of this slot (all of them when stacked).
                    let present: Vec<bool> = match plan {
                        None => vec![true; mtp / mr],
                        Some(pl) => (0..mtp / mr)
                            .map(|pi| {
                                (i0 + pi * mr..(i0 + (pi + 1) * mr).min(i1))
                                    .any(|i| pl.slot_of[i] == s as i32)
                            })
                            .collect(),
                    };
                    if !present.iter().any(|&b| b) {
                        continue;
                    }
                    let t_rows: Vec<Option<usize>> = (i0..i1)
                        .map(|i| match plan {
                            None => Some(i),
                            Some(pl) => (pl.slot_of[i] == s as i32).then_some(pl.perm[i]),
                        })
                        .collect();
                    let tcols = tm.top_left(m, sh.off[s] + r);
                    pack_rows(&slot.b, &w_rows, 0, r, nr, bpack, tmp);
                    pack_rows(&tcols, &t_rows, sh.off[s], r, mr, apack, tmp);
                    run_block::<K>(
                        r,
                        mtp / mr,
                        ntp / nr,
                        apack,
                        bpack,
                        ctile,
                        ntp,
                        Some(&present),
                    );
                }
            }
            // Epilogue: bias, convert, one write of y.
            let out = grow(&mut ws.acc, nt);
            let bias = p.bias.map(|b| {
                let mut v = vec![0f32; nt];
                b.row_f32(0, j0, &mut v);
                v
            });
            for (ii, src) in src_rows.iter().enumerate() {
                let crow = &ctile[ii * ntp..ii * ntp + nt];
                out.copy_from_slice(crow);
                if let Some(bv) = &bias {
                    for (o, b) in out.iter_mut().zip(bv) {
                        *o += b;
                    }
                }
                let row = src.expect("real row");
                // SAFETY: tiles write disjoint (row, column) ranges of y; the view covers them.
                unsafe {
                    dtype::convert_from_f32(
                        out,
                        yv.row_ptr(row).add(j0 * yv.dtype.size()),
                        yv.dtype,
                    );
                }
            }
        });
    });
}

#[allow(clippy::too_many_arguments)]
fn run_block<K: MicroKernel>(
    kc: usize,
    mpanels: usize,
    npanels: usize,
    apack: &[f32],
    bpack: &[f32],
    ctile: &mut [f32],
    ldc: usize,
    present: Option<&[bool]>,
) {
    if kc == 0 {
        return;
    }
    let (mr, nr) = (K::MR, K::NR);
    for jp in 0..npanels {
        let b = bpack[jp * nr * kc..].as_ptr();
        for ip in 0..mpanels {
            if present.is_some_and(|pr| !pr[ip]) {
                continue;
            }
            let a = apack[ip * mr * kc..].as_ptr();
            let c = ctile[ip * mr * ldc + jp * nr..].as_mut_ptr();
            // SAFETY: panels hold kc*MR / kc*NR floats; ctile is mpanels*MR x npanels*NR at ldc.
            unsafe { K::micro(kc, a, b, c, ldc) };
        }
    }
}

/// Decode path (m <= DECODE_MAX_M): stream W once, each chunk converted in L1 and dotted with
/// every x row; the adapter's expand reads only B's row for each output column.
fn decode<K: MicroKernel>(p: &LinearProblem<'_>, y: &mut MatMut<'_>, sh: &Shrink) {
    let (m, n, k) = (p.m(), p.n(), p.k());
    let mut xf = vec![0f32; m * k];
    for i in 0..m {
        p.x.row_f32(i, 0, &mut xf[i * k..(i + 1) * k]);
    }
    let yv = &*y;
    let threads = rayon::current_num_threads().max(1);
    let cols_per = n.div_ceil(threads * 4).clamp(16, 1024);
    let chunks = n.div_ceil(cols_per);
    (0..chunks).into_par_iter().for_each(|c| {
        let (j0, j1) = (c * cols_per, ((c + 1) * cols_per).min(n));
        WS.with(|ws| {
            let ws = &mut *ws.borrow_mut();
            let wbuf = grow(&mut ws.row, DECODE_CHUNK.max(sh.r_total));
            let acc = grow(&mut ws.acc, m);
            for j in j0..j1 {
                acc.fill(0.0);
                let mut kb = 0;
                while kb < k {
                    let kc = DECODE_CHUNK.min(k - kb);
                    let wrow: *const f32 = if p.w.dtype == DType::F32 {
                        // SAFETY: row j, columns kb..kb+kc lie inside w.
                        unsafe { (p.w.row_ptr(j) as *const f32).add(kb) }
                    } else {
                        p.w.row_f32(j, kb, &mut wbuf[..kc]);
                        wbuf.as_ptr()
                    };
                    for (i, a) in acc.iter_mut().enumerate() {
                        // SAFETY: both hold kc floats from their offsets.
                        *a += unsafe { K::dot(wrow, xf[i * k + kb..].as_ptr(), kc) };
                    }
                    kb += kc;
                }
                if sh.r_total > 0 {
                    for (s, slot) in p.slots.iter().enumerate() {
                        let Some(slot) = slot else { continue };
                        let r = slot.rank();
                        let brow = &mut wbuf[..r];
                        slot.b.row_f32(j, 0, brow);
                        for (i, a) in acc.iter_mut().enumerate() {
                            if p.applies(s, i) {
                                let t = &sh.t[i * sh.r_total + sh.off[s]..][..r];
                                *a += t.iter().zip(brow.iter()).map(|(x, y)| x * y).sum::<f32>();
                            }
                        }
                    }
                }
                let b = p.bias.map_or(0.0, |b| b.get(0, j));
                for (i, a) in acc.iter().enumerate() {
                    // SAFETY: chunks write disjoint columns of y; (i, j) is inside the view.
                    unsafe { dtype::store_f32(yv.row_ptr(i), yv.dtype, j, a + b) };
                }
            }
        });
    });
}

/// The fused linear on the optimized path. Arguments were checked by `LinearProblem::check`.
pub fn linear<K: MicroKernel>(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
    let (m, n) = (p.m(), p.n());
    if m == 0 || n == 0 {
        return;
    }
    let sh = compute_shrink::<K>(p);
    if m <= DECODE_MAX_M {
        decode::<K>(p, y, &sh);
    } else {
        let plan = row_plan(p);
        gemm::<K>(p, y, &sh, &plan);
    }
}
