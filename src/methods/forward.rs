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

fn to_mat(m: MatRef<'_>) -> Mat<f32> {
    let v = m.to_f32_vec();
    Mat::from_fn(m.rows, m.cols, |i, j| v[i * m.cols + j])
}

/// Δy = scale · x ΔWᵀ of a KRAdapter for the rows of `x` (rows x k), via its Khatri–Rao
/// structure: O(rows · out · in) flops, like the base, reading only U and V.
pub fn kron_delta(
    shape: &crate::adapter::KronShape,
    u: MatRef<'_>,
    vt: MatRef<'_>,
    scale: f32,
    x: &Mat<f32>,
    par: Par,
) -> Mat<f32> {
    let (rows, (r, w, m)) = (x.nrows(), (shape.r, shape.w(), shape.m));
    let um = to_mat(u); // m x r
    let vtm = to_mat(vt); // w x m; column i = V_i
    let mut dy = Mat::<f32>::zeros(rows, shape.out);
    if rows == 0 {
        return dy;
    }
    if shape.rows_are_slices() {
        // x (len in = M) reshaped X_b ((r+d) x r, zero past M); Δy_i = s V_iᵀ X_b U_i.
        // Stack X_b of a chunk of rows, P = X · Uᵀ ((chunk·w) x m), reduce columns with V.
        let chunk = ((32usize << 20) / (4 * w * m).max(1)).clamp(1, rows);
        let mut b0 = 0;
        while b0 < rows {
            let nb = chunk.min(rows - b0);
            let xs = Mat::<f32>::from_fn(nb * w, r, |row, c| {
                let (b, a) = (row / w, row % w);
                let j = a * r + c;
                if j < shape.inp {
                    x[(b0 + b, j)]
                } else {
                    0.0
                }
            });
            let mut pm = Mat::<f32>::zeros(nb * w, m);
            matmul(
                pm.as_mut(),
                Accum::Replace,
                xs.as_ref(),
                um.transpose(),
                1.0,
                par,
            );
            for i in 0..m {
                let vi = vtm.col(i);
                let pc = pm.col(i);
                for b in 0..nb {
                    let mut acc = 0f32;
                    for a in 0..w {
                        acc += vi[a] * pc[b * w + a];
                    }
                    dy[(b0 + b, i)] = scale * acc;
                }
            }
            b0 += nb;
        }
    } else {
        // Columns are slices: Y_b = s Vᵀ diag(x_b) U ((r+d) x r); Δy_b = vec(Y_b)[..M].
        let mut d = Mat::<f32>::zeros(m, r);
        let mut yb = Mat::<f32>::zeros(w, r);
        for b in 0..rows {
            for i in 0..m {
                let xi = x[(b, i)];
                for c in 0..r {
                    d[(i, c)] = xi * um[(i, c)];
                }
            }
            matmul(
                yb.as_mut(),
                Accum::Replace,
                vtm.as_ref(),
                d.as_ref(),
                1.0,
                par,
            );
            for j in 0..shape.out {
                dy[(b, j)] = scale * yb[(j / r, j % r)];
            }
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
