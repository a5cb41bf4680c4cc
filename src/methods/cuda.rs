//! KRAdapter and EigenLoRAx slots on a CUDA runtime: turns a call's method slots into the
//! backend's updates (`backend::cuda::kinds`: row lists, one set of cores per basis module) and
//! runs the kinds' backward with the device kernels, the small loadings products on the host
//! (shared with the CPU backward).

use super::backward::{add_kron_grads, check_shapes, eigen_grads, grad_components};
use super::forward::{check, f32_rows, rows_of};
use super::MethodSlot;
use crate::adapter::{Kind, KronShape, Lora};
use crate::backend::cuda::kinds::{EigenUpdate, KronUpdate};
use crate::backend::cuda::CudaBackend;
use crate::backend::LinearProblem;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use faer::Mat;
use std::borrow::Cow;

/// `scale · a_kᵀ diag(g) b_kᵀ` (K x K, zero past k) of an EigenLoRAx slot, added into `core`:
/// u = z · core is the slot's update in the basis coordinates (z = x C_A).
fn add_core(
    core: &mut [f32],
    kb: usize,
    k: usize,
    a: MatRef<'_>,
    b: MatRef<'_>,
    gains: Option<MatRef<'_>>,
    scale: f32,
) {
    let r = a.rows;
    let av = f32_rows(a); // r x K
    let bv = f32_rows(b); // K x r
    let g: Vec<f32> = gains.map_or_else(|| vec![1.0; r], |g| g.to_f32_vec());
    for c in 0..k {
        for c2 in 0..k {
            let mut acc = 0f64;
            for j in 0..r {
                acc += av[j * kb + c] as f64 * g[j] as f64 * bv[c2 * r + j] as f64;
            }
            core[c * kb + c2] += scale * acc as f32;
        }
    }
}

/// A KRAdapter slot's parameters as f32 row-major slices.
struct KronSource<'a> {
    slot: usize,
    shape: KronShape,
    scale: f32,
    module: &'a str,
    u: Cow<'a, [f32]>,
    vt: Cow<'a, [f32]>,
}

/// `Runtime::linear_with` on a CUDA runtime: `p`'s LoRA slots through the fused kernels, the
/// method slots added in f32 before y's one rounding. x, w, bias, y device memory.
pub fn linear(
    cuda: &CudaBackend,
    p: &LinearProblem<'_>,
    methods: &[Option<MethodSlot<'_>>],
    y: &mut MatMut<'_>,
) -> Result<()> {
    check(p, methods)?;
    let mixed = p.row_slot.is_some();
    let rows_i32 = |s: usize| -> Vec<i32> { rows_of(p, s).into_iter().map(|i| i as i32).collect() };
    // Parameters as f32 slices first (borrowed when they already are), then the updates.
    let kron_src: Vec<KronSource<'_>> = methods
        .iter()
        .enumerate()
        .filter_map(|(slot, ms)| match ms {
            Some(MethodSlot::Kron {
                shape,
                u,
                vt,
                scale,
                module,
            }) => Some(KronSource {
                slot,
                shape: *shape,
                scale: *scale,
                module,
                u: f32_rows(*u),
                vt: f32_rows(*vt),
            }),
            _ => None,
        })
        .collect();
    let mut kron = Vec::new();
    for ks in &kron_src {
        let rows = mixed.then(|| rows_i32(ks.slot));
        if rows.as_ref().is_some_and(|r| r.is_empty()) {
            continue;
        }
        kron.push(KronUpdate {
            module: ks.module,
            out: ks.shape.out,
            inp: ks.shape.inp,
            r: ks.shape.r,
            w: ks.shape.w(),
            u: &ks.u,
            vt: &ks.vt,
            scale: ks.scale,
            rows,
        });
    }
    // EigenLoRAx slots grouped by basis module (the same Arc'd module: one projection each).
    let mut eigen: Vec<EigenUpdate<'_>> = Vec::new();
    let mut group_slots: Vec<Vec<usize>> = Vec::new();
    for (s, ms) in methods.iter().enumerate() {
        let Some(MethodSlot::Eigen { basis, .. }) = ms else {
            continue;
        };
        match eigen.iter().position(|e| std::ptr::eq(e.basis, *basis)) {
            Some(g) => group_slots[g].push(s),
            None => {
                eigen.push(EigenUpdate {
                    basis,
                    cores: Vec::new(),
                    n_cores: 0,
                    row_core: None,
                });
                group_slots.push(vec![s]);
            }
        }
    }
    for (e, slots) in eigen.iter_mut().zip(&group_slots) {
        let kb = e.basis.k();
        e.n_cores = if mixed { slots.len() } else { 1 };
        e.cores = vec![0f32; e.n_cores * kb * kb];
        for (ci, &s) in slots.iter().enumerate() {
            let Some(MethodSlot::Eigen {
                k,
                a,
                b,
                gains,
                scale,
                ..
            }) = methods[s]
            else {
                unreachable!("only EigenLoRAx slots were grouped")
            };
            let dst = if mixed { ci } else { 0 };
            add_core(
                &mut e.cores[dst * kb * kb..(dst + 1) * kb * kb],
                kb,
                k,
                a,
                b,
                gains,
                scale,
            );
        }
        if mixed {
            let mut rc = vec![-1i32; p.m()];
            for (ci, &s) in slots.iter().enumerate() {
                for i in rows_of(p, s) {
                    rc[i] = ci as i32;
                }
            }
            e.row_core = Some(rc);
        }
    }
    cuda.linear_composed(p, &kron, &eigen, y)
}

/// `methods::backward::backward_layer` on a CUDA runtime: x, w, dy (and dx) device memory; the
/// module's state stays in host memory (its gradients are added there). Synchronizes.
pub fn backward_layer(
    cuda: &CudaBackend,
    lora: &mut Lora,
    x: MatRef<'_>,
    w: MatRef<'_>,
    dy: MatRef<'_>,
    rank: usize,
    dx: Option<&mut MatMut<'_>>,
) -> Result<()> {
    check_shapes(lora, &x, &dy, dx.as_deref())?;
    let k_in_use = lora.resolve_rank(rank)?;
    let grad = grad_components(lora)?;
    match lora.kind.clone() {
        Kind::Lora => Err(Error::internal(format!(
            "module '{}': the LoRA backward is backend::cuda::train",
            lora.name
        ))),
        Kind::Kron(shape) => {
            let (du, dv) = {
                let (u, vt) = (f32_rows(lora.a.view()), f32_rows(lora.b.view()));
                let upd = KronUpdate {
                    module: &lora.name,
                    out: shape.out,
                    inp: shape.inp,
                    r: shape.r,
                    w: shape.w(),
                    u: &u,
                    vt: &vt,
                    scale: lora.fixed_scale,
                    rows: None,
                };
                cuda.kron_backward(&upd, x, Some(w), dy, dx)?
            };
            add_kron_grads(lora, &shape, &grad, &du, &dv)
        }
        Kind::Eigen(basis) => {
            let (m, k) = (x.rows, k_in_use);
            cuda.eigen_backward(&basis, k, x, w, dy, dx, |z, dz| {
                let zm = Mat::<f32>::from_fn(m, k, |i, c| z[i * k + c]);
                let dzm = Mat::<f32>::from_fn(m, k, |i, c| dz[i * k + c]);
                let dzin = eigen_grads(lora, &grad, &zm, &dzm)?;
                Ok((0..m * k).map(|e| dzin[(e / k, e % k)]).collect())
            })
        }
    }
}
