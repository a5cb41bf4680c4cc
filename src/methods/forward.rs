//! The forward of calls whose slots include KRAdapter or EigenLoRAx modules (CPU; mod.rs says
//! how it composes with the fused kernels).

use super::MethodSlot;
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef, Matrix};
use faer::Mat;

/// The runtime's plain GEMM (`Runtime::linear` on a problem without slots), for the parts
/// of a method that are ordinary products.
pub type Gemm<'g> = dyn Fn(&LinearProblem<'_>, &mut MatMut<'_>) -> Result<()> + Sync + 'g;

/// Checks method slots against the call (x: m x k, W: n x k); `methods` pairs with `p.slots`
/// (same length, or empty), a method slot's position in `p.slots` being None.
pub fn check(p: &LinearProblem<'_>, methods: &[Option<MethodSlot<'_>>]) -> Result<()> {
    if methods.is_empty() {
        return Ok(());
    }
    if methods.len() != p.slots.len() {
        return Err(Error::internal(format!(
            "{} method slots for {} slots",
            methods.len(),
            p.slots.len()
        )));
    }
    let (n, k) = (p.n(), p.k());
    for (i, ms) in methods.iter().enumerate() {
        let Some(ms) = ms else { continue };
        if p.slots[i].is_some() {
            return Err(Error::internal(format!(
                "slot {i} is both LoRA and a method"
            )));
        }
        let (out, inp, scale) = match ms {
            MethodSlot::Kron {
                shape,
                u,
                vt,
                scale,
                ..
            } => {
                if (u.rows, u.cols, vt.rows, vt.cols) != (shape.m, shape.r, shape.w(), shape.m) {
                    return Err(Error::internal(format!(
                        "slot {i}: KRAdapter parameters do not match their shape"
                    )));
                }
                (shape.out, shape.inp, *scale)
            }
            MethodSlot::Eigen {
                basis,
                k: kk,
                a,
                b,
                gains,
                scale,
                ..
            } => {
                let kb = basis.k();
                if *kk == 0 || *kk > kb || a.cols != kb || b.rows != kb || a.rows != b.cols {
                    return Err(Error::internal(format!(
                        "slot {i}: EigenLoRAx loadings do not match the basis"
                    )));
                }
                if gains.is_some_and(|g| g.cols != a.rows) {
                    return Err(Error::internal(format!("slot {i}: gains length")));
                }
                (basis.out_features, basis.in_features, *scale)
            }
        };
        if out != n || inp != k {
            return Err(Error::shape(format!(
                "slot {i} (module '{}'): the module is for a {out} x {inp} weight, the call's w is {n} x {k}",
                ms.module()
            )));
        }
        if !scale.is_finite() {
            return Err(Error::invalid(format!(
                "slot {i} (module '{}'): scale {scale} is not finite",
                ms.module()
            )));
        }
    }
    Ok(())
}

/// Rows of the call slot `s` applies to.
pub(super) fn rows_of(p: &LinearProblem<'_>, s: usize) -> Vec<usize> {
    (0..p.m()).filter(|&i| p.applies(s, i)).collect()
}

/// An f32 row-major parameter matrix as a slice (kinds keep their parameters in owned f32
/// matrices, contiguous; anything else is converted).
pub(super) fn f32_rows<'a>(m: MatRef<'a>) -> std::borrow::Cow<'a, [f32]> {
    if m.dtype == DType::F32
        && (m.ld == m.cols || m.rows <= 1)
        && (m.as_ptr() as usize).is_multiple_of(4)
    {
        // SAFETY: an F32 view of rows x cols contiguous elements, 4-byte aligned, valid for 'a.
        std::borrow::Cow::Borrowed(unsafe {
            std::slice::from_raw_parts(m.as_ptr() as *const f32, m.rows * m.cols)
        })
    } else {
        std::borrow::Cow::Owned(m.to_f32_vec())
    }
}

/// Σ a[i]·b[i] with 8 independent partial sums (vectorizes; the order differs from a serial
/// sum by f32 rounding only).
#[inline]
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Δy = scale · x ΔWᵀ of a KRAdapter for the rows of `x` (rows x k), through its Khatri–Rao
/// structure, reading only U and V: O(rows · out · in) flops like the base.
/// - Few rows (<= 8), slices are rows of ΔW: per row, X = x reshaped ((r+d) x r),
///   Δy_i = s V_iᵀ X U_i, slices split across threads.
/// - Otherwise one GEMM per a in 0..r+d on a generated m x r block of ΔW (never all of it):
///   slices are rows: ΔW[:, a r .. a r + r] = diag(V[:, a]) U, Δy += x[:, a r ..] · blockᵀ;
///   slices are columns: Δy[:, a r ..] = (x ⊙ V[:, a]ᵀ) · U.
pub fn kron_delta(
    shape: &crate::adapter::KronShape,
    u: MatRef<'_>,
    vt: MatRef<'_>,
    scale: f32,
    x: MatRef<'_>,
    gemm: &Gemm<'_>,
) -> Result<Matrix> {
    use rayon::prelude::*;
    let (rows, (r, w, m)) = (x.rows, (shape.r, shape.w(), shape.m));
    let uv = f32_rows(u); // m x r
    let vtv = f32_rows(vt); // w x m
    let mut dy = Matrix::zeros(DType::F32, rows, shape.out)?;
    if rows == 0 {
        return Ok(dy);
    }
    if shape.rows_are_slices() && rows <= 8 {
        let mut xrow = vec![0f32; shape.inp];
        let mut out = vec![0f32; m];
        for b in 0..rows {
            x.row_f32(b, 0, &mut xrow);
            let mut xp = vec![0f32; w * r];
            xp[..shape.inp].copy_from_slice(&xrow);
            out.par_chunks_mut(256).enumerate().for_each(|(ci, oc)| {
                let mut t = vec![0f32; w];
                for (ii, o) in oc.iter_mut().enumerate() {
                    let i = ci * 256 + ii;
                    let ui = &uv[i * r..(i + 1) * r];
                    for (a, ta) in t.iter_mut().enumerate() {
                        *ta = dot8(&xp[a * r..(a + 1) * r], ui);
                    }
                    let mut acc = 0f32;
                    for (a, ta) in t.iter().enumerate() {
                        acc += vtv[a * m + i] * ta;
                    }
                    *o = scale * acc;
                }
            });
            dy.view_mut().set_row_f32(b, 0, &out);
        }
        return Ok(dy);
    }
    kron_tiles(shape, &uv, &vtv, scale, x, gemm, &mut dy)?;
    Ok(dy)
}

/// Δy = x ΔWᵀ for many rows: ΔW is generated a tile of output rows at a time (a few MiB,
/// never whole) and each tile runs through the runtime's GEMM kernel with the full K, so no
/// partial sums are carried between tiles.
fn kron_tiles(
    shape: &crate::adapter::KronShape,
    uv: &[f32],
    vtv: &[f32],
    scale: f32,
    x: MatRef<'_>,
    gemm: &Gemm<'_>,
    dy: &mut Matrix,
) -> Result<()> {
    use rayon::prelude::*;
    let (rows, n, k) = (x.rows, shape.out, shape.inp);
    let (r, m) = (shape.r, shape.m);
    let nc = ((4usize << 20) / (4 * k)).clamp(16, n.max(16)).min(n);
    let mut tile = Matrix::zeros(DType::F32, nc, k)?;
    // Columns are slices: ΔW[a r + c, i] = V[i, a] U[i, c]; Uᵀ rows make each ΔW row contiguous.
    let ut: Vec<f32> = if shape.rows_are_slices() {
        Vec::new()
    } else {
        let mut t = vec![0f32; r * m];
        for i in 0..m {
            for c in 0..r {
                t[c * m + i] = uv[i * r + c];
            }
        }
        t
    };
    let mut j0 = 0;
    while j0 < n {
        let nj = nc.min(n - j0);
        {
            let tv = tile.view_mut();
            // SAFETY: the tile is an owned, contiguous F32 matrix of nc x k.
            let data =
                unsafe { std::slice::from_raw_parts_mut(tv.as_ref().as_ptr() as *mut f32, nc * k) };
            data[..nj * k]
                .par_chunks_mut(k)
                .enumerate()
                .for_each(|(jj, row)| {
                    let j = j0 + jj;
                    if shape.rows_are_slices() {
                        // Row j is slice j: kron(V_j, U_j)[..in].
                        let uj = &uv[j * r..(j + 1) * r];
                        for (a, chunk) in row.chunks_mut(r).enumerate() {
                            let va = scale * vtv[a * m + j];
                            for (o, u) in chunk.iter_mut().zip(uj) {
                                *o = va * u;
                            }
                        }
                    } else {
                        let (a, c) = (j / r, j % r);
                        let va = &vtv[a * m..(a + 1) * m];
                        let uc = &ut[c * m..(c + 1) * m];
                        for ((o, v), u) in row.iter_mut().zip(va).zip(uc) {
                            *o = scale * v * u;
                        }
                    }
                });
        }
        let q = LinearProblem {
            x,
            w: tile.view().top_left(nj, k),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        let dv = dy.view_mut();
        // SAFETY: columns j0..j0 + nj of the owned rows x n F32 matrix `dy`.
        let mut yv = unsafe {
            MatMut::from_raw(
                (dv.as_ref().as_ptr() as *mut u8).add(j0 * 4),
                DType::F32,
                rows,
                nj,
                n,
            )
        };
        gemm(&q, &mut yv)?;
        j0 += nj;
    }
    Ok(())
}

/// The loadings of an eigen slot in the first k coordinates: α_A[:k]... as faer matrices
/// a_k (r x k) and b_k (k x r), gains folded into a_k's rows and the scale into b_k.
fn eigen_factors(
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    gains: Option<MatRef<'_>>,
    scale: f32,
) -> (Mat<f32>, Mat<f32>) {
    let r = a.rows;
    let av = a.to_f32_vec();
    let bv = b.to_f32_vec();
    let g = gains.map(|g| g.to_f32_vec());
    let ak = Mat::<f32>::from_fn(r, k, |j, c| {
        av[j * a.cols + c] * g.as_ref().map_or(1.0, |g| g[j])
    });
    let bk = Mat::<f32>::from_fn(k, r, |c, j| scale * bv[c * r + j]);
    (ak, bk)
}

/// Adds every method slot's update for its rows into `acc` (m x n, f32, zero where untouched);
/// returns which rows were touched.
fn method_deltas(
    p: &LinearProblem<'_>,
    methods: &[Option<MethodSlot<'_>>],
    acc: &mut [f32],
    gemm: &Gemm<'_>,
) -> Result<Vec<bool>> {
    let m = p.m();
    let mut touched = vec![false; m];
    // EigenLoRAx: group slots by (basis module, k), one projection per group.
    let mut done = vec![false; methods.len()];
    for s0 in 0..methods.len() {
        let Some(MethodSlot::Eigen { basis, k, .. }) = methods[s0] else {
            continue;
        };
        if done[s0] {
            continue;
        }
        let group: Vec<usize> = (s0..methods.len())
            .filter(|&s| {
                matches!(methods[s], Some(MethodSlot::Eigen { basis: b2, k: k2, .. })
                    if std::ptr::eq(b2, basis) && k2 == k)
            })
            .collect();
        for &s in &group {
            done[s] = true;
        }
        let rows: Vec<usize> = (0..m)
            .filter(|&i| group.iter().any(|&s| p.applies(s, i)))
            .collect();
        if rows.is_empty() {
            continue;
        }
        // z = x C_A[:, :k], once for every row and slot of the group (the runtime's GEMM on
        // C_Aᵀ, kept row-major with the basis).
        let gathered = gather_rows(p.x, &rows)?;
        let xs = gathered.as_ref().map_or(p.x, |g| g.view());
        let mut zm = Matrix::zeros(DType::F32, rows.len(), k)?;
        gemm(
            &LinearProblem {
                x: xs,
                w: basis.ca_t.view().top_left(k, basis.in_features),
                bias: None,
                slots: &[],
                row_slot: None,
            },
            &mut zm.view_mut(),
        )?;
        let zv = zm.to_f32_vec();
        let z = Mat::<f32>::from_fn(rows.len(), k, |i, c| zv[i * k + c]);
        // u = Σ over the row's slots of ((z a_kᵀ) ⊙ g) · s b_kᵀ  (rows x k).
        let mut u = Mat::<f32>::zeros(rows.len(), k);
        for &s in &group {
            let Some(MethodSlot::Eigen {
                a, b, gains, scale, ..
            }) = methods[s]
            else {
                unreachable!()
            };
            let (ak, bk) = eigen_factors(k, a, b, gains, scale);
            let mine: Vec<usize> = (0..rows.len())
                .filter(|&ii| p.applies(s, rows[ii]))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let zs = Mat::<f32>::from_fn(mine.len(), k, |i, c| z[(mine[i], c)]);
            let t = &zs * ak.transpose();
            let us = &t * bk.transpose();
            for (i, &ii) in mine.iter().enumerate() {
                for c in 0..k {
                    u[(ii, c)] += us[(i, c)];
                }
            }
        }
        // Δy = u C_B[:, :k]ᵀ, once for the group (the runtime's GEMM on C_B, row-major).
        let uv: Vec<f32> = (0..rows.len() * k).map(|e| u[(e / k, e % k)]).collect();
        let um = Matrix::from_f32(DType::F32, rows.len(), k, &uv)?;
        let mut dy = Matrix::zeros(DType::F32, rows.len(), p.n())?;
        gemm(
            &LinearProblem {
                x: um.view(),
                w: basis.cb_rows.view().top_left(basis.out_features, k),
                bias: None,
                slots: &[],
                row_slot: None,
            },
            &mut dy.view_mut(),
        )?;
        add_rows(acc, &mut touched, &rows, &dy);
    }
    for (s, ms) in methods.iter().enumerate() {
        let Some(MethodSlot::Kron {
            shape,
            u,
            vt,
            scale,
            ..
        }) = ms
        else {
            continue;
        };
        let rows = rows_of(p, s);
        if rows.is_empty() {
            continue;
        }
        // Every row: x as it is; otherwise the slot's rows, gathered in f32.
        let gathered = gather_rows(p.x, &rows)?;
        let xs = gathered.as_ref().map_or(p.x, |g| g.view());
        let dy = kron_delta(shape, *u, *vt, *scale, xs, gemm)?;
        add_rows(acc, &mut touched, &rows, &dy);
    }
    Ok(touched)
}

/// Rows `rows` of x as an owned f32 matrix, or None when they are all of x's rows (then x
/// serves as it is).
fn gather_rows(x: MatRef<'_>, rows: &[usize]) -> Result<Option<Matrix>> {
    if rows.len() == x.rows {
        return Ok(None);
    }
    let mut g = Matrix::zeros(DType::F32, rows.len(), x.cols)?;
    let mut buf = vec![0f32; x.cols];
    let mut gv = g.view_mut();
    for (ii, &i) in rows.iter().enumerate() {
        x.row_f32(i, 0, &mut buf);
        gv.set_row_f32(ii, 0, &buf);
    }
    Ok(Some(g))
}

/// acc[rows[ii], :] += dy[ii, :] (acc row-major m x n, dy f32 rows x n); marks the rows touched.
fn add_rows(acc: &mut [f32], touched: &mut [bool], rows: &[usize], dy: &Matrix) {
    let dv = dy.view();
    let n = dv.cols;
    let mut row = vec![0f32; n];
    for (ii, &i) in rows.iter().enumerate() {
        touched[i] = true;
        dv.row_f32(ii, 0, &mut row);
        for (a, v) in acc[i * n..(i + 1) * n].iter_mut().zip(&row) {
            *a += v;
        }
    }
}

/// `y = x Wᵀ + bias + Σ LoRA slots + Σ method slots`, with `base` running the fused kernels on
/// `p` (whose method positions are None) and `gemm` the runtime's plain product. y is rounded once: into y directly when it is f32,
/// through an f32 copy otherwise.
pub fn linear(
    p: &LinearProblem<'_>,
    methods: &[Option<MethodSlot<'_>>],
    y: &mut MatMut<'_>,
    base: &Gemm<'_>,
    gemm: &Gemm<'_>,
) -> Result<()> {
    p.check(y)?;
    check(p, methods)?;
    if methods.iter().all(|s| s.is_none()) {
        return base(p, y);
    }
    let (m, n) = (p.m(), p.n());
    // An f32 y takes the base directly and only touched rows are read back; another dtype
    // goes through an f32 copy so that every row is rounded once.
    let mut y32 = match y.dtype {
        DType::F32 => None,
        _ => Some(Matrix::zeros(DType::F32, m, n)?),
    };
    match y32.as_mut() {
        Some(t) => base(p, &mut t.view_mut())?,
        None => base(p, y)?,
    }
    let mut acc = vec![0f32; m * n];
    let touched = method_deltas(p, methods, &mut acc, gemm)?;
    let mut row = vec![0f32; n];
    for i in 0..m {
        match &y32 {
            Some(t) => t.view().row_f32(i, 0, &mut row),
            None if touched[i] => y.as_ref().row_f32(i, 0, &mut row),
            None => continue,
        }
        if touched[i] {
            for (v, a) in row.iter_mut().zip(&acc[i * n..(i + 1) * n]) {
                *v += a;
            }
        }
        y.set_row_f32(i, 0, &row);
    }
    Ok(())
}
