//! Training adapters: backward (reference + optimized kernels), gradient buffers, AdamW with
//! per-component bias correction, gradient clipping and NaN/Inf guards.
//!
//! A module's training state lives on the `Lora` (`Lora::train`, see `state.rs`). Calls here take
//! `&mut Lora`: changing an adapter needs exclusive access (the C ABI documents the same rule).

pub mod backward;
pub mod resume;
pub mod state;

pub use backward::Mode;
pub use state::TrainState;

use crate::adapter::{Adapter, Lora};
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::runtime::Runtime;
use backward::{BackwardProblem, GradsMut};

/// Which components of `lora` get gradients at rank `r` in `mode` (masked-off ones never do).
pub fn grad_components(lora: &Lora, r: usize, mode: Mode) -> Result<Vec<bool>> {
    let t = lora.train_state()?;
    Ok((0..r)
        .map(|c| t.mask[c] && (mode == Mode::Nested || c + 1 == r))
        .collect())
}

/// The CPU backward of a LoRA module (`crate::training::backward` is the entry point that
/// picks it): accumulates dA, dB (and dE with gains) of `lora` for the layer
/// `y = x W^T + lora(x)` given `dy`, at rank `rank` (0 = the lora's current rank) in `mode`;
/// writes `dx = dy W + scale * ((dy B_r) ⊙ e) A_r` when `dx` is given. The scale is the lora's
/// scale at that rank. Host memory; runs on `rt`'s thread pool.
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu(
    rt: &Runtime,
    lora: &mut Lora,
    x: MatRef<'_>,
    w: MatRef<'_>,
    dy: MatRef<'_>,
    rank: usize,
    mode: Mode,
    dx: Option<&mut MatMut<'_>>,
) -> Result<()> {
    lora.require_lora("the LoRA backward")?;
    let r = lora.resolve_rank(rank)?;
    if r == 0 {
        return Err(Error::invalid(format!("module '{}': rank 0", lora.name)));
    }
    let grad = grad_components(lora, r, mode)?;
    let scale = lora.scale_at(r);
    let name = lora.name.clone();
    let Lora { a, b, train, .. } = lora;
    let t = train.as_deref_mut().expect("checked by grad_components");
    let gains: Option<Vec<f32>> = t
        .gains_eff
        .as_ref()
        .map(|_| (0..r).map(|c| t.gain(c)).collect());
    let av = a.view();
    let bv = b.view();
    let p = BackwardProblem {
        x,
        w,
        dy,
        a: av.top_left(r, av.cols),
        b: bv.top_left(bv.rows, r),
        gains: gains.as_deref(),
        scale,
        grad: &grad,
        want_de: t.e.is_some(),
    };
    p.check(dx.as_deref())
        .map_err(|e| e.context(format!("module '{name}'")))?;
    let cap = t.capacity();
    let g = GradsMut {
        da: &mut t.ga,
        db: &mut t.gb,
        ldb: cap,
        de: &mut t.ge,
    };
    rt.install(|| backward::backward(&p, g, dx));
    for (c, &on) in grad.iter().enumerate() {
        if on {
            t.touched[c] = true;
        }
    }
    Ok(())
}

/// Zeroes the gradient buffers (and forgets which components were touched).
pub fn zero_grad(lora: &mut Lora) -> Result<()> {
    lora.train_state_mut()?.zero_grad();
    Ok(())
}

/// AdamW hyper-parameters (torch.optim.AdamW defaults).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamW {
    pub fn check(&self) -> Result<()> {
        let ok = self.lr.is_finite()
            && self.lr >= 0.0
            && (0.0..1.0).contains(&self.beta1)
            && (0.0..1.0).contains(&self.beta2)
            && self.eps.is_finite()
            && self.eps > 0.0
            && self.weight_decay.is_finite()
            && self.weight_decay >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(format!(
                "AdamW options out of range: {self:?} (lr >= 0, betas in [0, 1), eps > 0, weight_decay >= 0)"
            )))
        }
    }
}

/// The first non-finite gradient of a module's touched, active components, as an error.
fn check_finite(lora: &Lora) -> Result<()> {
    let t = lora.train_state()?;
    let (k, n, cap) = (lora.in_features, lora.out_features, lora.capacity);
    for c in 0..cap {
        if !(t.touched[c] && t.mask[c]) {
            continue;
        }
        let bad = if t.ga[c * k..(c + 1) * k].iter().any(|v| !v.is_finite()) {
            Some("lora_A")
        } else if (0..n).any(|j| !t.gb[j * cap + c].is_finite()) {
            Some("lora_B")
        } else if t.e.is_some() && !t.ge[c].is_finite() {
            Some("gains E")
        } else {
            None
        };
        if let Some(what) = bad {
            return Err(Error::numeric(format!(
                "module '{}': the gradient of {what} (component {c}) is NaN or infinite; step skipped, weights unchanged",
                lora.name
            )));
        }
    }
    Ok(())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn adam_one(p: &mut f32, g: f32, m: &mut f32, v: &mut f32, o: &AdamW, bc1: f32, bc2s: f32) {
    // torch.optim.AdamW (non-amsgrad, foreach=False), in f32.
    *p *= 1.0 - o.lr * o.weight_decay;
    *m = o.beta1 * *m + (1.0 - o.beta1) * g;
    *v = o.beta2 * *v + (1.0 - o.beta2) * g * g;
    let denom = v.sqrt() / bc2s + o.eps;
    *p -= (o.lr / bc1) * *m / denom;
}

/// One AdamW step (bias-corrected, decoupled weight decay) on the components that received a
/// gradient since `zero_grad` and are not masked; others are left exactly as they are. A NaN/Inf
/// gradient makes it a no-op returning NUMERIC naming the module.
pub fn adamw_step(lora: &mut Lora, opt: &AdamW) -> Result<()> {
    opt.check()?;
    check_finite(lora)?;
    let (k, n, cap) = (lora.in_features, lora.out_features, lora.capacity);
    let t = lora.train_state_mut()?;
    for c in 0..cap {
        if !(t.touched[c] && t.mask[c]) {
            continue;
        }
        t.steps[c] += 1;
        let step = t.steps[c] as i32;
        let bc1 = 1.0 - opt.beta1.powi(step);
        let bc2s = (1.0 - opt.beta2.powi(step)).sqrt();
        for kk in c * k..(c + 1) * k {
            adam_one(
                &mut t.a[kk],
                t.ga[kk],
                &mut t.mom_a.m[kk],
                &mut t.mom_a.v[kk],
                opt,
                bc1,
                bc2s,
            );
        }
        for j in 0..n {
            let i = j * cap + c;
            adam_one(
                &mut t.b[i],
                t.gb[i],
                &mut t.mom_b.m[i],
                &mut t.mom_b.v[i],
                opt,
                bc1,
                bc2s,
            );
        }
        if let Some(e) = t.e.as_mut() {
            adam_one(
                &mut e[c],
                t.ge[c],
                &mut t.mom_e.m[c],
                &mut t.mom_e.v[c],
                opt,
                bc1,
                bc2s,
            );
        }
    }
    t.refresh_gains();
    lora.sync_from_master()
}

/// AdamW on every module of an adapter; all-or-nothing: any non-finite gradient anywhere makes
/// it a no-op returning NUMERIC naming the module.
pub fn adapter_adamw_step(adapter: &mut Adapter, opt: &AdamW) -> Result<()> {
    opt.check()?;
    for l in adapter.modules() {
        check_finite(l)?;
    }
    for l in adapter.modules_mut() {
        adamw_step(l, opt)?;
    }
    Ok(())
}

/// Scales every module's gradients so their global L2 norm is at most `max_norm`; returns the
/// norm before clipping (torch.nn.utils.clip_grad_norm_). A non-finite norm leaves the gradients
/// as they are (the next step reports NUMERIC).
pub fn clip_grad_norm(adapter: &mut Adapter, max_norm: f32) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::invalid(format!(
            "max_norm = {max_norm}: must be finite and > 0"
        )));
    }
    let mut sq = 0f64;
    for l in adapter.modules() {
        let t = l.train_state()?;
        let add = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
        sq += add(&t.ga) + add(&t.gb);
        if t.e.is_some() {
            sq += add(&t.ge);
        }
    }
    let norm = sq.sqrt();
    if norm.is_finite() && norm > max_norm as f64 {
        let f = (max_norm as f64 / (norm + 1e-6)) as f32;
        for l in adapter.modules_mut() {
            let t = l.train_state_mut()?;
            for v in
                t.ga.iter_mut()
                    .chain(t.gb.iter_mut())
                    .chain(t.ge.iter_mut())
            {
                *v *= f;
            }
        }
    }
    Ok(norm)
}
