//! ElaLoRA: per-component importance (EMA-smoothed sensitivity, see `importance.rs`), and on a
//! cubic budget schedule, every `interval` steps between warm-up and the final phase: prune the
//! lowest-scoring active components across all modules and grow components (one per module per
//! round) in the modules whose least important active component is still the most important.
//! Grown components get A rows / B columns orthogonalized against the module's active ones and
//! E = 0, so the output does not change; resized modules' optimizer state is reset. The scale
//! stays fixed (use `Scaling::Fixed` = alpha / r_init). Capacity is allocated up front: ranks
//! change through the component mask, never by reallocation.
//!
//! Components grown in the previous round are not pruned in the next one: their EMA has had only
//! one interval to warm up (a grace period; the paper does not specify one).

use super::importance;
use crate::adapter::{Adapter, Lora};
use crate::error::{Error, Result};
use crate::rng::SplitMix64;
use std::collections::HashSet;

#[derive(Clone, Copy, Debug)]
pub struct ElaLoraOptions {
    /// Active components at the end, over all modules; 0 = the starting total.
    pub target_total_rank: usize,
    pub warmup_steps: usize,
    pub final_steps: usize,
    pub total_steps: usize,
    pub interval: usize,
    /// Components exchanged (pruned and grown) per round on top of the budget change.
    pub max_change: usize,
    pub beta1: f32,
    pub beta2: f32,
    pub seed: u64,
}

impl Default for ElaLoraOptions {
    fn default() -> Self {
        ElaLoraOptions {
            target_total_rank: 0,
            warmup_steps: 0,
            final_steps: 0,
            total_steps: 1000,
            interval: 10,
            max_change: 1,
            beta1: 0.85,
            beta2: 0.85,
            seed: 0,
        }
    }
}

pub struct ElaLora {
    pub opts: ElaLoraOptions,
    pub initial_total_rank: usize,
    rng: SplitMix64,
    /// (module index, component) grown in the last round.
    protected: HashSet<(usize, usize)>,
}

fn active(l: &Lora) -> usize {
    l.train
        .as_ref()
        .map_or(l.capacity, |t| t.mask.iter().filter(|&&m| m).count())
}

impl ElaLora {
    pub fn new(adapter: &mut Adapter, opts: ElaLoraOptions) -> Result<ElaLora> {
        for l in adapter.modules() {
            l.require_lora("ElaLoRA's rank schedule")?;
        }
        let o = &opts;
        if o.interval == 0
            || o.total_steps == 0
            || o.warmup_steps + o.final_steps >= o.total_steps
            || !(0.0..1.0).contains(&o.beta1)
            || !(0.0..1.0).contains(&o.beta2)
        {
            return Err(Error::invalid(format!(
                "ElaLoRA options out of range: {o:?} (interval > 0, warmup + final < total, betas in [0, 1))"
            )));
        }
        let mut total = 0;
        let mut cap = 0;
        for l in adapter.modules_mut() {
            if !l.train_state()?.has_gains() {
                return Err(Error::invalid(format!(
                    "module '{}': ElaLoRA needs gains E (rf_lora_enable_gains)",
                    l.name
                )));
            }
            importance::init(l)?;
            total += active(l);
            cap += l.capacity;
        }
        let target = if o.target_total_rank == 0 {
            total
        } else {
            o.target_total_rank
        };
        if target < adapter.len() || target > cap {
            return Err(Error::invalid(format!(
                "ElaLoRA: target_total_rank = {target} is outside {}..={cap} (one per module .. total capacity)",
                adapter.len()
            )));
        }
        let mut opts = opts;
        opts.target_total_rank = target;
        Ok(ElaLora {
            opts,
            initial_total_rank: total,
            rng: SplitMix64::new(opts.seed),
            protected: HashSet::new(),
        })
    }

    /// The cubic budget schedule: the initial total until warm-up ends, then
    /// b_T + (b_0 - b_T) (1 - progress)^3, and b_T in the final phase.
    pub fn budget(&self, step: usize) -> usize {
        let o = &self.opts;
        let (b0, bt) = (self.initial_total_rank as f64, o.target_total_rank as f64);
        if step < o.warmup_steps {
            return self.initial_total_rank;
        }
        let span = (o.total_steps - o.final_steps - o.warmup_steps) as f64;
        let p = ((step - o.warmup_steps) as f64 / span).min(1.0);
        (bt + (b0 - bt) * (1.0 - p).powi(3)).round() as usize
    }

    /// Updates importance from the current gradients; on schedule prunes and grows. Returns the
    /// number of components changed.
    pub fn update(&mut self, adapter: &mut Adapter, step: usize) -> Result<usize> {
        for l in adapter.modules_mut() {
            importance::update(l, self.opts.beta1, self.opts.beta2)?;
        }
        let o = self.opts;
        if step < o.warmup_steps
            || step > o.total_steps - o.final_steps
            || !(step - o.warmup_steps).is_multiple_of(o.interval)
            || step == 0
        {
            return Ok(0);
        }
        let budget = self.budget(step);
        let scores: Vec<Vec<f32>> = adapter
            .modules()
            .map(importance::component_scores)
            .collect::<Result<_>>()?;
        let mut act: Vec<usize> = adapter.modules().map(active).collect();
        let caps: Vec<usize> = adapter.modules().map(|l| l.capacity).collect();
        let current: usize = act.iter().sum();
        // Grow: one component in each of the modules (with spare capacity) whose least
        // important active component is the most important.
        let mut grow_cand: Vec<(f32, usize)> = (0..act.len())
            .filter(|&mi| act[mi] < caps[mi])
            .map(|mi| {
                let min = scores[mi]
                    .iter()
                    .filter(|v| v.is_finite())
                    .fold(f32::INFINITY, |a, &b| a.min(b));
                (min, mi)
            })
            .collect();
        grow_cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let n_grow = o.max_change + budget.saturating_sub(current);
        let grow: Vec<usize> = grow_cand.iter().take(n_grow).map(|&(_, mi)| mi).collect();
        let n_prune = (current + grow.len()).saturating_sub(budget);
        // Prune: globally lowest scores outside the growing modules, keeping one component per
        // module and sparing components grown in the last round.
        let mut cand: Vec<(f32, usize, usize)> = Vec::new();
        for (mi, s) in scores.iter().enumerate() {
            if grow.contains(&mi) {
                continue;
            }
            for (c, &v) in s.iter().enumerate() {
                if v.is_finite() && !self.protected.contains(&(mi, c)) {
                    cand.push((v, mi, c));
                }
            }
        }
        cand.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        let mut pruned = Vec::new();
        for &(_, mi, c) in &cand {
            if pruned.len() == n_prune {
                break;
            }
            if act[mi] <= 1 {
                continue;
            }
            act[mi] -= 1;
            pruned.push((mi, c));
        }
        self.protected.clear();
        let mut changed = 0;
        let mut modules: Vec<&mut Lora> = adapter.modules_mut().collect();
        for &(mi, c) in &pruned {
            let l = &mut *modules[mi];
            let t = l.train_state_mut()?;
            t.mask[c] = false;
            t.reset_optimizer();
            t.refresh_gains();
            l.refresh_device()?;
            changed += 1;
        }
        for &mi in &grow {
            let l = &mut *modules[mi];
            let c = grow_component(l, &mut self.rng)?;
            self.protected.insert((mi, c));
            changed += 1;
        }
        Ok(changed)
    }
}

/// Orthonormal basis (modified Gram-Schmidt, f64) of the given vectors.
fn basis(vs: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let mut q: Vec<Vec<f64>> = Vec::new();
    for v in vs {
        let mut u = v.clone();
        for b in &q {
            let d: f64 = u.iter().zip(b).map(|(x, y)| x * y).sum();
            for (x, y) in u.iter_mut().zip(b) {
                *x -= d * y;
            }
        }
        let n = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-9 {
            q.push(u.into_iter().map(|x| x / n).collect());
        }
    }
    q
}

/// A random vector orthogonal to `existing`, with the existing vectors' mean norm (or `fallback`).
fn orthogonal_random(
    rng: &mut SplitMix64,
    len: usize,
    existing: &[Vec<f64>],
    fallback: f64,
) -> Vec<f32> {
    let q = basis(existing);
    let mean_norm = {
        let ns: Vec<f64> = existing
            .iter()
            .map(|v| v.iter().map(|x| x * x).sum::<f64>().sqrt())
            .filter(|&n| n > 1e-12)
            .collect();
        if ns.is_empty() {
            fallback
        } else {
            ns.iter().sum::<f64>() / ns.len() as f64
        }
    };
    for _ in 0..8 {
        let mut v: Vec<f64> = (0..len).map(|_| rng.normal() as f64).collect();
        for _ in 0..2 {
            for b in &q {
                let d: f64 = v.iter().zip(b).map(|(x, y)| x * y).sum();
                for (x, y) in v.iter_mut().zip(b) {
                    *x -= d * y;
                }
            }
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-6 {
            return v.iter().map(|x| (x / n * mean_norm) as f32).collect();
        }
    }
    // The active components span the whole space: any direction is as good (E = 0 keeps the
    // output unchanged anyway).
    (0..len)
        .map(|_| rng.normal() * (mean_norm / (len as f64).sqrt()) as f32)
        .collect()
}

/// Activates one masked component of `l`: A row and B column orthogonal to the active ones,
/// E = 0 (output unchanged), importance and the module's optimizer state reset. Returns it.
pub fn grow_component(l: &mut Lora, rng: &mut SplitMix64) -> Result<usize> {
    let (k, cap) = (l.in_features, l.capacity);
    let name = l.name.clone();
    let t = l.train_state_mut()?;
    let n = t.b.len() / cap;
    if t.e.is_none() {
        return Err(Error::invalid(format!(
            "module '{name}': growing needs gains E (a new component starts at E = 0)"
        )));
    }
    let Some(c) = t.mask.iter().position(|&m| !m) else {
        return Err(Error::invalid(format!(
            "module '{name}': no spare capacity to grow into ({cap} components active)"
        )));
    };
    let act: Vec<usize> = (0..cap).filter(|&i| t.mask[i]).collect();
    let arows: Vec<Vec<f64>> = act
        .iter()
        .map(|&i| t.a[i * k..(i + 1) * k].iter().map(|&v| v as f64).collect())
        .collect();
    let bcols: Vec<Vec<f64>> = act
        .iter()
        .map(|&i| (0..n).map(|j| t.b[j * cap + i] as f64).collect())
        .collect();
    let ar = orthogonal_random(rng, k, &arows, (k as f64 / 3.0).sqrt() / (k as f64).sqrt());
    let bc = orthogonal_random(rng, n, &bcols, 0.02 * (n as f64).sqrt());
    t.a[c * k..(c + 1) * k].copy_from_slice(&ar);
    for (j, &v) in bc.iter().enumerate() {
        t.b[j * cap + c] = v;
    }
    if let Some(e) = t.e.as_mut() {
        e[c] = 0.0;
    }
    t.mask[c] = true;
    t.reset_optimizer();
    t.refresh_gains();
    importance::reset_component(l, c)?;
    l.sync_from_master()?;
    Ok(c)
}
