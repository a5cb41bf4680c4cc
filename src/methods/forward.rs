//! The forward of calls whose slots include KRAdapter or EigenLoRAx modules (CPU; mod.rs says
//! how it composes with the fused kernels).

use super::MethodSlot;
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef, Matrix};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

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
fn rows_of(p: &LinearProblem<'_>, s: usize) -> Vec<usize> {
    (0..p.m()).filter(|&i| p.applies(s, i)).collect()
}

/// Rows `rows` of x as an f32 matrix (rows.len() x k).
fn gather(x: MatRef<'_>, rows: &[usize]) -> Mat<f32> {
    let k = x.cols;
    let mut buf = vec![0f32; k];
    let mut g = Mat::<f32>::zeros(rows.len(), k);
    for (ii, &i) in rows.iter().enumerate() {
        x.row_f32(i, 0, &mut buf);
        for (j, v) in buf.iter().enumerate() {
            g[(ii, j)] = *v;
        }
    }
    g
}

/// An f32 row-major parameter matrix as a slice (kinds keep their parameters in owned f32
/// matrices, contiguous; anything else is converted).
fn f32_rows<'a>(m: MatRef<'a>) -> std::borrow::Cow<'a, [f32]> {
    if m.dtype == DType::F32 && (m.ld == m.cols || m.rows <= 1) && (m.as_ptr() as usize) % 4 == 0 {
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
    x: &Mat<f32>,
    par: Par,
) -> Mat<f32> {
    use rayon::prelude::*;
    let (rows, (r, w, m)) = (x.nrows(), (shape.r, shape.w(), shape.m));
    let uv = f32_rows(u); // m x r
    let vtv = f32_rows(vt); // w x m
    let mut dy = Mat::<f32>::zeros(rows, shape.out);
    if rows == 0 {
        return dy;
    }
    if shape.rows_are_slices() && rows <= 8 {
        for b in 0..rows {
            let mut xp = vec![0f32; w * r];
            for (j, v) in xp.iter_mut().enumerate().take(shape.inp) {
                *v = x[(b, j)];
            }
            let mut out = vec![0f32; m];
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
            for (i, v) in out.iter().enumerate() {
                dy[(b, i)] = *v;
            }
        }
        return dy;
    }
    let um = faer::MatRef::from_row_major_slice(&uv, m, r);
    if shape.rows_are_slices() {
        let mut blk = Mat::<f32>::zeros(m, r);
        let mut xa = Mat::<f32>::zeros(rows, r);
        for a in 0..w {
            let c0 = a * r;
            if c0 >= shape.inp {
                break;
            }
            let cols = r.min(shape.inp - c0);
            for i in 0..m {
                let va = scale * vtv[a * m + i];
                for c in 0..cols {
                    blk[(i, c)] = va * uv[i * r + c];
                }
            }
            for b in 0..rows {
                for c in 0..cols {
                    xa[(b, c)] = x[(b, c0 + c)];
                }
            }
            matmul(
                dy.as_mut(),
                Accum::Add,
                xa.subcols(0, cols),
                blk.subcols(0, cols).transpose(),
                1.0,
                par,
            );
        }
    } else {
        let mut xa = Mat::<f32>::zeros(rows, m);
        for a in 0..w {
            let c0 = a * r;
            if c0 >= shape.out {
                break;
            }
            let cols = r.min(shape.out - c0);
            for i in 0..m {
                let va = scale * vtv[a * m + i];
                for b in 0..rows {
                    xa[(b, i)] = x[(b, i)] * va;
                }
            }
            matmul(
                dy.as_mut().subcols_mut(c0, cols),
                Accum::Replace,
                xa.as_ref(),
                um.subcols(0, cols),
                1.0,
                par,
            );
        }
    }
    dy
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
    acc: &mut Mat<f32>,
    par: Par,
) -> Vec<bool> {
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
        // z = x C_A[:, :k], once for every row and slot of the group.
        let xg = gather(p.x, &rows);
        let mut z = Mat::<f32>::zeros(rows.len(), k);
        matmul(
            z.as_mut(),
            Accum::Replace,
            xg.as_ref(),
            basis.c_a.subcols(0, k),
            1.0,
            par,
        );
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
        // Δy = u C_B[:, :k]ᵀ, once for the group.
        let mut dy = Mat::<f32>::zeros(rows.len(), p.n());
        matmul(
            dy.as_mut(),
            Accum::Replace,
            u.as_ref(),
            basis.c_b.subcols(0, k).transpose(),
            1.0,
            par,
        );
        for (ii, &i) in rows.iter().enumerate() {
            touched[i] = true;
            for j in 0..p.n() {
                acc[(i, j)] += dy[(ii, j)];
            }
        }
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
        let xg = gather(p.x, &rows);
        let dy = kron_delta(shape, *u, *vt, *scale, &xg, par);
        for (ii, &i) in rows.iter().enumerate() {
            touched[i] = true;
            for j in 0..p.n() {
                acc[(i, j)] += dy[(ii, j)];
            }
        }
    }
    touched
}

/// `y = x Wᵀ + bias + Σ LoRA slots + Σ method slots`, with `base` running the fused kernels on
/// `p` (whose method positions are None). y is rounded once: into y directly when it is f32,
/// through an f32 copy otherwise.
pub fn linear(
    p: &LinearProblem<'_>,
    methods: &[Option<MethodSlot<'_>>],
    y: &mut MatMut<'_>,
    base: &(dyn Fn(&LinearProblem<'_>, &mut MatMut<'_>) -> Result<()> + Sync),
) -> Result<()> {
    p.check(y)?;
    check(p, methods)?;
    if methods.iter().all(|s| s.is_none()) {
        return base(p, y);
    }
    let (m, n) = (p.m(), p.n());
    let par = Par::rayon(0);
    let mut acc = Mat::<f32>::zeros(m, n);
    let mut row = vec![0f32; n];
    if y.dtype == DType::F32 {
        base(p, y)?;
        let touched = method_deltas(p, methods, &mut acc, par);
        for i in (0..m).filter(|&i| touched[i]) {
            y.as_ref().row_f32(i, 0, &mut row);
            for (j, v) in row.iter_mut().enumerate() {
                *v += acc[(i, j)];
            }
            y.set_row_f32(i, 0, &row);
        }
    } else {
        let mut y32 = Matrix::zeros(DType::F32, m, n)?;
        base(p, &mut y32.view_mut())?;
        let touched = method_deltas(p, methods, &mut acc, par);
        let yv = y32.view();
        for i in 0..m {
            yv.row_f32(i, 0, &mut row);
            if touched[i] {
                for (j, v) in row.iter_mut().enumerate() {
                    *v += acc[(i, j)];
                }
            }
            y.set_row_f32(i, 0, &row);
        }
    }
    Ok(())
}
