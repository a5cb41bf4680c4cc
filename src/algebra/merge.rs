//! Merge / unmerge: W' = W ± s·B_r·A_r, accumulated in f32 and rounded once to W's dtype.
//!
//! [`merge_into`] works on any writable view (a row-major buffer of the caller's, through the C
//! ABI, or a tensor being written to a new file); [`merged_tensor`] produces the merged copy of a
//! mapped tensor; [`parity`] compares the merged forward with the fused unmerged forward and
//! separates the part of the difference that comes from rounding W' to its dtype.

use crate::adapter::Lora;
use crate::backend::{LinearProblem, Slot};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef, Matrix};
use crate::rng::SplitMix64;
use crate::runtime::Runtime;
use faer::linalg::matmul::matmul;
use faer::{Accum, Par};
use rayon::prelude::*;
use serde::Serialize;

/// Rows of W per block: the block's ΔW (ROWS x in, f32) is the only scratch.
const BLOCK_ROWS: usize = 64;

/// Checks that `slot` fits W (out x in), naming the module.
fn check_fit(slot: &Slot<'_>, rows: usize, cols: usize, what: &str) -> Result<()> {
    if slot.b.rows != rows || slot.a.cols != cols {
        return Err(Error::shape(format!(
            "module '{}': the adapter is {} x {} (out x in), {what} is {rows} x {cols}",
            slot.module, slot.b.rows, slot.a.cols
        )));
    }
    Ok(())
}

/// ΔW rows `r0..r0+rows` = scale · B[r0.., :r] · A[:r] as a dense f32 block (rows x in).
fn delta_block(slot: &Slot<'_>, a32: &[f32], r0: usize, rows: usize, out: &mut [f32]) {
    let (r, n) = (slot.rank(), slot.a.cols);
    let mut b32 = vec![0f32; rows * r];
    for i in 0..rows {
        slot.b.row_f32(r0 + i, 0, &mut b32[i * r..(i + 1) * r]);
    }
    let bm = faer::MatRef::from_row_major_slice(&b32, rows, r);
    let am = faer::MatRef::from_row_major_slice(a32, r, n);
    let dst = faer::MatMut::from_row_major_slice_mut(out, rows, n);
    matmul(dst, Accum::Replace, bm, am, slot.scale, Par::Seq);
}

/// A merge into a block-quantized base is refused: writing W + s·B·A back means re-quantizing
/// every block, whose rounding (a step of d = max|w|/127 or /7) is larger than a typical LoRA
/// update, so the adapter would be mostly lost. Serve it fused (rf_linear reads the blocks).
fn refuse_quantized(dt: DType) -> Result<()> {
    if dt.is_quantized() {
        return Err(Error::dtype(format!(
            "cannot merge into a {} (block-quantized) base: re-quantizing would round the \
             adapter's update away; use the fused rf_linear on the quantized W instead, or merge \
             into a dense (F32/F16/BF16) copy of the base",
            dt.name()
        )));
    }
    Ok(())
}

/// W ← W + sign·s·B·A for every element, f32 accumulation, one rounding to W's dtype.
/// `sign` is +1 (merge) or -1 (unmerge). Row blocks run in parallel on the current rayon pool.
pub fn merge_slot_into(slot: &Slot<'_>, w: &mut MatMut<'_>, sign: f32) -> Result<()> {
    refuse_quantized(w.dtype)?;
    check_fit(slot, w.rows, w.cols, "the weight")?;
    let s = Slot {
        scale: slot.scale * sign,
        ..*slot
    };
    let a32 = s.a.to_f32_vec();
    let n = w.cols;
    let blocks = w.rows.div_ceil(BLOCK_ROWS);
    // SAFETY: each block writes only its own rows of W.
    let wa = unsafe { w.alias() };
    (0..blocks).into_par_iter().for_each(|bi| {
        let r0 = bi * BLOCK_ROWS;
        let rows = BLOCK_ROWS.min(wa.rows - r0);
        let mut d = vec![0f32; rows * n];
        delta_block(&s, &a32, r0, rows, &mut d);
        // SAFETY: rows r0..r0+rows belong to this block only.
        let mut wb = unsafe { wa.alias() };
        let mut row = vec![0f32; n];
        for i in 0..rows {
            wb.as_ref().row_f32(r0 + i, 0, &mut row);
            for (x, dx) in row.iter_mut().zip(&d[i * n..(i + 1) * n]) {
                *x += dx;
            }
            wb.set_row_f32(r0 + i, 0, &row);
        }
    });
    Ok(())
}

/// Merges (or with `unmerge`, subtracts) a LoRA module at `rank` (0 = its current rank) with
/// its scale times `scale_mult` into W (out x in).
pub fn merge_into(
    lora: &Lora,
    rank: usize,
    scale_mult: f32,
    w: &mut MatMut<'_>,
    unmerge: bool,
) -> Result<()> {
    let slot = crate::runtime::slot(lora, rank, scale_mult)?;
    merge_slot_into(&slot, w, if unmerge { -1.0 } else { 1.0 })
}

/// A merged copy of `w` in `dtype`: W's own dtype for the file, F32 for the unrounded merge the
/// parity report compares with.
pub fn merged_tensor(slot: &Slot<'_>, w: MatRef<'_>, sign: f32, dtype: DType) -> Result<Matrix> {
    refuse_quantized(w.dtype)?;
    refuse_quantized(dtype)?;
    check_fit(slot, w.rows, w.cols, "the weight")?;
    let mut m = Matrix::zeros(dtype, w.rows, w.cols)?;
    {
        let mut mv = m.view_mut();
        let mut row = vec![0f32; w.cols];
        for i in 0..w.rows {
            w.row_f32(i, 0, &mut row);
            mv.set_row_f32(i, 0, &row);
        }
    }
    merge_slot_into(slot, &mut m.view_mut(), sign)?;
    Ok(m)
}

/// Merged vs fused forward for one module.
#[derive(Clone, Debug, Serialize)]
pub struct Parity {
    pub module: String,
    pub tensor: String,
    pub dtype: &'static str,
    /// max |y_merged - y_fused|.
    pub max_abs: f64,
    /// ||y_merged - y_fused||_F / ||y_fused||_F.
    pub rel: f64,
    /// The same with W' kept in f32 (no rounding to the dtype): what remains is kernel rounding.
    pub max_abs_f32: f64,
    pub rel_f32: f64,
    /// rel - rel_f32: the part of the relative error due to rounding W' to its dtype.
    pub rel_rounding: f64,
}

fn y_of(rt: &Runtime, x: &Matrix, w: MatRef<'_>, slot: Option<Slot<'_>>) -> Result<Vec<f32>> {
    let slots = [slot];
    let p = LinearProblem {
        x: x.view(),
        w,
        bias: None,
        slots: if slot.is_some() { &slots } else { &[] },
        row_slot: None,
    };
    let mut y = Matrix::zeros(DType::F32, x.rows, w.rows)?;
    rt.linear(&p, &mut y.view_mut())?;
    Ok(y.to_f32_vec())
}

fn diff(a: &[f32], b: &[f32]) -> (f64, f64) {
    let mut max = 0f64;
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        let d = (*x as f64) - (*y as f64);
        max = max.max(d.abs());
        num += d * d;
        den += (*y as f64) * (*y as f64);
    }
    (max, (num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// Parity of one module. `exact` = (weight without the delta, weight with it) as they are
/// stored; `unrounded` = the same pair where the side that was computed is kept in f32. The fused
/// forward is x·unmergedᵀ + s·(x·Aᵀ)·Bᵀ through the runtime, the merged one x·mergedᵀ; x is `rows`
/// seeded Gaussian rows.
pub fn parity(
    rt: &Runtime,
    slot: &Slot<'_>,
    tensor: &str,
    exact: (MatRef<'_>, MatRef<'_>),
    unrounded: (MatRef<'_>, MatRef<'_>),
    rows: usize,
    seed: u64,
) -> Result<Parity> {
    let cols = exact.0.cols;
    let mut g = SplitMix64::new(seed);
    let xv: Vec<f32> = (0..rows * cols).map(|_| g.normal()).collect();
    let x = Matrix::from_f32(DType::F32, rows, cols, &xv)?;
    let err = |(unmerged, merged): (MatRef<'_>, MatRef<'_>)| -> Result<(f64, f64)> {
        let fused = y_of(rt, &x, unmerged, Some(*slot))?;
        let ym = y_of(rt, &x, merged, None)?;
        Ok(diff(&ym, &fused))
    };
    let (max_abs, rel) = err(exact)?;
    let (max_abs_f32, rel_f32) = err(unrounded)?;
    let dtype = if exact.0.dtype == DType::F32 {
        exact.1.dtype
    } else {
        exact.0.dtype
    };
    Ok(Parity {
        module: slot.module.to_string(),
        tensor: tensor.to_string(),
        dtype: dtype.name(),
        max_abs,
        rel,
        max_abs_f32,
        rel_f32,
        rel_rounding: rel - rel_f32,
    })
}

/// The parity report as markdown.
pub fn parity_markdown(rows: &[Parity], unmerge: bool) -> String {
    let mut s = String::new();
    s.push_str(if unmerge {
        "# Unmerge parity: fused forward of the unmerged weight + adapter vs the merged input\n\n"
    } else {
        "# Merge parity: merged forward vs fused unmerged forward\n\n"
    });
    s.push_str("| module | dtype | max abs | rel. error | rel. error, W' in f32 | part due to dtype rounding |\n");
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: |\n");
    for p in rows {
        s.push_str(&format!(
            "| `{}` | {} | {:.3e} | {:.3e} | {:.3e} | {:.3e} |\n",
            p.module, p.dtype, p.max_abs, p.rel, p.rel_f32, p.rel_rounding
        ));
    }
    s
}
