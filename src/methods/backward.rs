//! Gradients of KRAdapter and EigenLoRAx modules (CPU), accumulated into the module's training
//! state (`Lora::train`; kind.rs gives the A/B layouts) like the LoRA backward does.
//!
//! KRAdapter: dU and dV through the Khatri–Rao structure (kron.rs `Kron::backward`), never ΔW.
//! EigenLoRAx, basis frozen (loadings-only fine-tuning): with z = x C_A[:, :k], dz = dy C_B[:, :k],
//! a_k = α_Aᵀ[:, :k], b_k = α_B[:k], gains g and scale s:
//!   t = z a_kᵀ,  dα_B[:k] += s dzᵀ (t ⊙ g),  dt = (s dz b_k) ⊙ g,  dα_Aᵀ[:, :k] += dtᵀ z,
//!   dE += Σ_rows (s dz b_k) ⊙ t,  dx += (dt a_k) C_A[:, :k]ᵀ.

use crate::adapter::{Kind, Lora};
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};

pub(super) fn to_mat(m: MatRef<'_>) -> Mat<f32> {
    let v = m.to_f32_vec();
    Mat::from_fn(m.rows, m.cols, |i, j| v[i * m.cols + j])
}

pub(super) fn check_shapes(
    lora: &Lora,
    x: &MatRef<'_>,
    dy: &MatRef<'_>,
    dx: Option<&MatMut<'_>>,
) -> Result<()> {
    let (out, inp) = lora.module_dims();
    if x.cols != inp || dy.cols != out || x.rows != dy.rows {
        return Err(Error::shape(format!(
            "module '{}' ({} for a {out} x {inp} weight): x is {} x {}, dy is {} x {}",
            lora.name,
            lora.kind.name(),
            x.rows,
            x.cols,
            dy.rows,
            dy.cols
        )));
    }
    if let Some(d) = dx {
        if d.rows != x.rows || d.cols != inp {
            return Err(Error::shape(format!(
                "module '{}': dx is {} x {}, expected {} x {inp}",
                lora.name, d.rows, d.cols, x.rows
            )));
        }
    }
    Ok(())
}

/// Accumulates the module's gradients for `dy` (m x out) at input `x` (m x in) and returns the
/// adapter's part of dx (m x in, row-major f32). `rank` is the per-call rank (EigenLoRAx: basis
/// components; 0 = the module's current). Runs on the current rayon pool.
pub fn backward(lora: &mut Lora, x: MatRef<'_>, dy: MatRef<'_>, rank: usize) -> Result<Vec<f32>> {
    check_shapes(lora, &x, &dy, None)?;
    let name = lora.name.clone();
    let kind = lora.kind.clone();
    let k_in_use = lora.resolve_rank(rank)?;
    let grad = grad_components(lora)?;
    match kind {
        Kind::Lora => Err(Error::internal(format!(
            "module '{name}': the LoRA backward is train::backward_cpu"
        ))),
        Kind::Kron(s) => {
            let (_, u, v) = lora.kron_parts()?;
            let k = crate::adapter::kron::Kron::from_parts(
                &name,
                s.out,
                s.inp,
                u,
                v,
                lora.fixed_scale,
            )?;
            let g = k.backward(&x.to_f32_vec(), &dy.to_f32_vec(), x.rows)?;
            add_kron_grads(lora, &s, &grad, &g.du, &g.dv)?;
            Ok(g.dx)
        }
        Kind::Eigen(basis) => {
            let (kk, m) = (k_in_use, x.rows);
            let par = Par::rayon(0);
            let mut z = Mat::<f32>::zeros(m, kk);
            matmul(
                z.as_mut(),
                Accum::Replace,
                to_mat(x).as_ref(),
                basis.c_a.subcols(0, kk),
                1.0,
                par,
            );
            let mut dz = Mat::<f32>::zeros(m, kk);
            matmul(
                dz.as_mut(),
                Accum::Replace,
                to_mat(dy).as_ref(),
                basis.c_b.subcols(0, kk),
                1.0,
                par,
            );
            let dzin = eigen_grads(lora, &grad, &z, &dz)?;
            let mut dxa = Mat::<f32>::zeros(m, basis.in_features);
            matmul(
                dxa.as_mut(),
                Accum::Replace,
                dzin.as_ref(),
                basis.c_a.subcols(0, kk).transpose(),
                1.0,
                par,
            );
            let inp = basis.in_features;
            let mut out = vec![0f32; m * inp];
            for i in 0..m {
                for c in 0..inp {
                    out[i * inp + c] = dxa[(i, c)];
                }
            }
            Ok(out)
        }
    }
}

/// The components of a KRAdapter / EigenLoRAx module that get gradients (NESTED: the whole
/// capacity; masked components none).
pub(super) fn grad_components(lora: &Lora) -> Result<Vec<bool>> {
    crate::train::grad_components(lora, lora.capacity, crate::train::Mode::Nested)
}

/// Adds a KRAdapter's dU (m x r) and dV (m x w, row-major) to the module's gradients (A = U,
/// B = Vᵀ), for the slices in `grad`.
pub(super) fn add_kron_grads(
    lora: &mut Lora,
    s: &crate::adapter::KronShape,
    grad: &[bool],
    du: &[f32],
    dv: &[f32],
) -> Result<()> {
    let t = lora.train_state_mut()?;
    let w = s.w();
    for (i, _) in grad.iter().enumerate().filter(|(_, &on)| on) {
        for c in 0..s.r {
            t.ga[i * s.r + c] += du[i * s.r + c];
        }
        for a in 0..w {
            t.gb[a * s.m + i] += dv[i * w + a];
        }
        t.touched[i] = true;
    }
    Ok(())
}

/// EigenLoRAx loadings gradients from z = x C_A[:, :k] and dz = dy C_B[:, :k] (m x k each),
/// added to the module's gradients for the components in `grad`. Returns dzin (m x k): the
/// adapter's part of dx is dzin C_A[:, :k]ᵀ.
pub(super) fn eigen_grads(
    lora: &mut Lora,
    grad: &[bool],
    z: &Mat<f32>,
    dz: &Mat<f32>,
) -> Result<Mat<f32>> {
    let Kind::Eigen(basis) = &lora.kind else {
        return Err(Error::internal(format!(
            "module '{}' is not an EigenLoRAx module",
            lora.name
        )));
    };
    let (m, kk, kb, r, scale) = (
        z.nrows(),
        z.ncols(),
        basis.k(),
        lora.capacity,
        lora.fixed_scale,
    );
    let t_state = lora.train_state()?;
    let g: Vec<f32> = (0..r).map(|j| t_state.gain(j)).collect();
    let want_de = t_state.e.is_some();
    let av = lora.a.view().to_f32_vec(); // r x K
    let bv = lora.b.view().to_f32_vec(); // K x r
    let ak = Mat::<f32>::from_fn(r, kk, |j, c| av[j * kb + c]);
    let bk = Mat::<f32>::from_fn(kk, r, |c, j| bv[c * r + j]);
    let t = z * ak.transpose(); // m x r
    let tg = Mat::<f32>::from_fn(m, r, |i, j| t[(i, j)] * g[j]);
    let db = dz.transpose() * &tg; // k x r (times s)
    let dtg = dz * &bk; // m x r (times s)
    let dt = Mat::<f32>::from_fn(m, r, |i, j| scale * dtg[(i, j)] * g[j]);
    let da = dt.transpose() * z; // r x k
    let dzin = &dt * &ak; // m x k
    let st = lora.train_state_mut()?;
    for j in 0..r {
        if !grad[j] {
            continue;
        }
        for c in 0..kk {
            st.ga[j * kb + c] += da[(j, c)];
            st.gb[c * r + j] += scale * db[(c, j)];
        }
        if want_de {
            st.ge[j] += (0..m).map(|i| scale * dtg[(i, j)] * t[(i, j)]).sum::<f32>();
        }
        st.touched[j] = true;
    }
    Ok(dzin)
}

/// `backward` plus dx = dy W + the adapter's part, when `dx` is given (any dtype).
pub fn backward_layer(
    lora: &mut Lora,
    x: MatRef<'_>,
    w: MatRef<'_>,
    dy: MatRef<'_>,
    rank: usize,
    dx: Option<&mut MatMut<'_>>,
) -> Result<()> {
    check_shapes(lora, &x, &dy, dx.as_deref())?;
    let (out, inp) = lora.module_dims();
    if w.rows != out || w.cols != inp {
        return Err(Error::shape(format!(
            "module '{}': w is {} x {}, the module is for {out} x {inp}",
            lora.name, w.rows, w.cols
        )));
    }
    if w.dtype.is_quantized() {
        return Err(Error::dtype(format!(
            "w is {}: the backward reads a dense W",
            w.dtype.name()
        )));
    }
    let part = backward(lora, x, dy, rank)?;
    if let Some(dx) = dx {
        let mut base = crate::matrix::Matrix::zeros(crate::DType::F32, x.rows, inp)?;
        crate::train::backward::input_grad(dy, w, &mut base.view_mut());
        let bv = base.to_f32_vec();
        for i in 0..x.rows {
            let row: Vec<f32> = (0..inp)
                .map(|c| bv[i * inp + c] + part[i * inp + c])
                .collect();
            dx.set_row_f32(i, 0, &row);
        }
    }
    Ok(())
}
