//! The training state a `Lora` carries once training is enabled: f32 master weights, gradient
//! buffers, AdamW moments, optional per-component gains E, the component mask and (ElaLoRA)
//! importance scores. The `Lora`'s own A/B tensors stay what the forward reads: an owned copy in
//! the compute dtype, refreshed from the masters after every optimizer step.

use crate::adapter::{Lora, TensorData};
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::rng::SplitMix64;
use crate::DType;

/// AdamW moments and a per-component step count (bias correction stays right when a component
/// is updated on some steps only, as with DyLoRA's truncation or ElaLoRA's masks).
#[derive(Clone, Debug, Default)]
pub struct Moments {
    pub m: Vec<f32>,
    pub v: Vec<f32>,
}

impl Moments {
    fn zeros(n: usize) -> Moments {
        Moments {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }
    fn reset(&mut self) {
        self.m.fill(0.0);
        self.v.fill(0.0);
    }
}

/// Per-element importance (ElaLoRA / AdaLoRA): EMA of the sensitivity |w g| and of its
/// uncertainty.
#[derive(Clone, Debug, Default)]
pub struct ImportanceState {
    /// I-bar and U-bar for A (capacity x in), B (out x capacity) and E (capacity).
    pub ia: Vec<f32>,
    pub ua: Vec<f32>,
    pub ib: Vec<f32>,
    pub ub: Vec<f32>,
    pub ie: Vec<f32>,
    pub ue: Vec<f32>,
}

/// Everything a trainable `Lora` needs beyond what the forward reads.
#[derive(Clone, Debug)]
pub struct TrainState {
    /// f32 masters: A (capacity x in), B (out x capacity), E (capacity) when gains are on.
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub e: Option<Vec<f32>>,
    /// Gradient accumulators, same layouts.
    pub ga: Vec<f32>,
    pub gb: Vec<f32>,
    pub ge: Vec<f32>,
    /// true = the component is active; false = masked off (no forward, no gradient, no update).
    pub mask: Vec<bool>,
    /// Components that received a gradient since the last `zero_grad`.
    pub touched: Vec<bool>,
    pub mom_a: Moments,
    pub mom_b: Moments,
    pub mom_e: Moments,
    /// AdamW steps taken per component (bias correction).
    pub steps: Vec<u32>,
    /// E ⊙ mask as the forward's 1 x capacity gains (f32); None = no gains and nothing masked.
    pub gains_eff: Option<Matrix>,
    pub importance: Option<ImportanceState>,
}

impl TrainState {
    pub fn capacity(&self) -> usize {
        self.mask.len()
    }
    pub fn has_gains(&self) -> bool {
        self.e.is_some()
    }

    /// Recomputes the forward's gains (E ⊙ mask) after E or the mask changed.
    pub fn refresh_gains(&mut self) {
        let cap = self.capacity();
        let all_on = self.mask.iter().all(|&m| m);
        if self.e.is_none() && all_on {
            self.gains_eff = None;
            return;
        }
        let vals: Vec<f32> = (0..cap)
            .map(|c| {
                if !self.mask[c] {
                    0.0
                } else {
                    self.e.as_ref().map_or(1.0, |e| e[c])
                }
            })
            .collect();
        self.gains_eff = Some(Matrix::from_f32(DType::F32, 1, cap, &vals).expect("1 x cap"));
    }

    /// The gain the forward applies to component `c` (E[c] ⊙ mask[c]).
    pub fn gain(&self, c: usize) -> f32 {
        if !self.mask[c] {
            0.0
        } else {
            self.e.as_ref().map_or(1.0, |e| e[c])
        }
    }

    /// Resets the optimizer state (moments and step counts) of every component: ElaLoRA does
    /// this for a module whose rank changed.
    pub fn reset_optimizer(&mut self) {
        self.mom_a.reset();
        self.mom_b.reset();
        self.mom_e.reset();
        self.steps.fill(0);
    }

    pub fn zero_grad(&mut self) {
        self.ga.fill(0.0);
        self.gb.fill(0.0);
        self.ge.fill(0.0);
        self.touched.fill(false);
    }
}

fn owned_copy(t: &TensorData) -> Result<(Matrix, Vec<f32>)> {
    let v = t.view();
    let vals = v.to_f32_vec();
    Ok((Matrix::from_f32(v.dtype, v.rows, v.cols, &vals)?, vals))
}

impl Lora {
    /// A new trainable module with PEFT's default init: A kaiming-uniform with a = sqrt(5)
    /// (U(-1/sqrt(in), 1/sqrt(in)), as nn.Linear), B = 0. `dtype` is the compute dtype of the
    /// forward's copy; masters are f32.
    #[allow(clippy::too_many_arguments)]
    pub fn new_trainable(
        name: &str,
        in_features: usize,
        out_features: usize,
        capacity: usize,
        alpha: f32,
        scaling: crate::Scaling,
        dtype: DType,
        seed: u64,
    ) -> Result<Lora> {
        if in_features == 0 || out_features == 0 || capacity == 0 {
            return Err(Error::shape(format!(
                "module '{name}': in = {in_features}, out = {out_features}, capacity = {capacity}: all must be > 0"
            )));
        }
        if in_features > (1 << 24) || out_features > (1 << 24) || capacity > (1 << 16) {
            return Err(Error::shape(format!(
                "module '{name}': {out_features} x {in_features} with capacity {capacity} is out of range"
            )));
        }
        let bound = 1.0 / (in_features as f32).sqrt();
        let mut rng = SplitMix64::new(seed);
        let a = rng.fill_uniform(capacity * in_features, -bound, bound);
        let am = Matrix::from_f32(dtype, capacity, in_features, &a)?;
        let bm = Matrix::zeros(dtype, out_features, capacity)?;
        // For Fixed scaling (AdaLoRA/ElaLoRA) the scale is alpha / r_init = alpha / capacity.
        let fixed = alpha / capacity as f32;
        let mut l = Lora::new(
            name,
            TensorData::Owned(am),
            TensorData::Owned(bm),
            alpha,
            scaling,
            fixed,
        )?;
        l.enable_training()?;
        Ok(l)
    }

    /// Turns training on: A and B become owned copies (a mapped file is never written) with f32
    /// masters, gradient buffers and optimizer state. A no-op when already on.
    pub fn enable_training(&mut self) -> Result<()> {
        if self.train.is_some() {
            return Ok(());
        }
        let (am, a) = owned_copy(&self.a)?;
        let (bm, b) = owned_copy(&self.b)?;
        let cap = self.capacity;
        let (na, nb) = (a.len(), b.len());
        self.a = TensorData::Owned(am);
        self.b = TensorData::Owned(bm);
        self.train = Some(Box::new(TrainState {
            a,
            b,
            e: None,
            ga: vec![0.0; na],
            gb: vec![0.0; nb],
            ge: vec![0.0; cap],
            mask: vec![true; cap],
            touched: vec![false; cap],
            mom_a: Moments::zeros(na),
            mom_b: Moments::zeros(nb),
            mom_e: Moments::zeros(cap),
            steps: vec![0; cap],
            gains_eff: None,
            importance: None,
        }));
        Ok(())
    }

    /// The training state, or INVALID_ARGUMENT naming the module.
    pub fn train_state(&self) -> Result<&TrainState> {
        self.train.as_deref().ok_or_else(|| {
            Error::invalid(format!(
                "module '{}': training is not enabled on this module",
                self.name
            ))
        })
    }
    pub fn train_state_mut(&mut self) -> Result<&mut TrainState> {
        let name = &self.name;
        self.train.as_deref_mut().ok_or_else(|| {
            Error::invalid(format!(
                "module '{name}': training is not enabled on this module"
            ))
        })
    }

    /// Turns on per-component gains E (the `B diag(E) A` form), all set to `init`.
    pub fn enable_gains(&mut self, init: f32) -> Result<()> {
        self.refuse_kron("gains")?;
        if !init.is_finite() {
            return Err(Error::invalid(format!(
                "module '{}': gain init {init} is not finite",
                self.name
            )));
        }
        let cap = self.capacity;
        let t = self.train_state_mut()?;
        t.e = Some(vec![init; cap]);
        t.mom_e = Moments::zeros(cap);
        t.refresh_gains();
        self.refresh_device()
    }

    /// Sets the component mask (true = active); its length must be the capacity.
    pub fn set_mask(&mut self, mask: &[bool]) -> Result<()> {
        self.refuse_kron("a component mask")?;
        let cap = self.capacity;
        let name = self.name.clone();
        let t = self.train_state_mut()?;
        if mask.len() != cap {
            return Err(Error::shape(format!(
                "module '{name}': mask has {} entries, capacity is {cap}",
                mask.len()
            )));
        }
        t.mask.copy_from_slice(mask);
        t.refresh_gains();
        self.refresh_device()
    }

    /// KRAdapter's components are its slices, which the method never gates.
    fn refuse_kron(&self, what: &str) -> Result<()> {
        if matches!(self.kind, crate::adapter::Kind::Kron(_)) {
            return Err(Error::unsupported(format!(
                "module '{}' is a KRAdapter module: {what} is defined for LoRA and EigenLoRAx \
                 modules",
                self.name
            )));
        }
        Ok(())
    }

    /// Copies the f32 masters into the forward's compute-dtype tensors (rounding to nearest-even),
    /// and to the device copy when the module has one.
    pub fn sync_from_master(&mut self) -> Result<()> {
        let Some(t) = self.train.as_deref() else {
            return Ok(());
        };
        for (dst, src, what) in [(&mut self.a, &t.a, "lora_A"), (&mut self.b, &t.b, "lora_B")] {
            match dst {
                TensorData::Owned(m) => {
                    let mut v = m.view_mut();
                    let cols = v.cols;
                    for i in 0..v.rows {
                        v.set_row_f32(i, 0, &src[i * cols..(i + 1) * cols]);
                    }
                }
                TensorData::Mapped { .. } => {
                    return Err(Error::internal(format!(
                        "module '{}': {what} is mapped while training",
                        self.name
                    )))
                }
            }
        }
        self.refresh_device()
    }

    /// Re-draws PEFT's default init (A kaiming-uniform from `seed`, B = 0), as `new_trainable`
    /// does, keeping the allocation: a new trial on the same capacity (RankAdaptor probes).
    /// Resets gradients and optimizer state; gains, mask and rank are left as they are.
    pub fn reset_peft_init(&mut self, seed: u64) -> Result<()> {
        self.require_lora("PEFT's init")?;
        let (k, n, cap) = (self.in_features, self.out_features, self.capacity);
        let bound = 1.0 / (k as f32).sqrt();
        let a = SplitMix64::new(seed).fill_uniform(cap * k, -bound, bound);
        self.set_weights(&a, &vec![0.0; n * cap])?;
        self.train_state_mut()?.zero_grad();
        Ok(())
    }

    /// Replaces A (capacity x in) and B (out x capacity), row-major f32, in the masters and the
    /// forward's copies; resets the optimizer state.
    pub fn set_weights(&mut self, a: &[f32], b: &[f32]) -> Result<()> {
        let (k, n, cap) = (self.in_features, self.out_features, self.capacity);
        if a.len() != cap * k || b.len() != n * cap {
            return Err(Error::shape(format!(
                "module '{}': A must be {cap} x {k} and B {n} x {cap}; got {} and {} values",
                self.name,
                a.len(),
                b.len()
            )));
        }
        if a.iter().chain(b).any(|v| !v.is_finite()) {
            return Err(Error::numeric(format!(
                "module '{}': new weights contain NaN or infinity",
                self.name
            )));
        }
        let t = self.train_state_mut()?;
        t.a.copy_from_slice(a);
        t.b.copy_from_slice(b);
        t.reset_optimizer();
        self.sync_from_master()
    }

    /// The forward's gains for the first `r` components (None when no gains and no mask).
    pub fn gains_view(&self, r: usize) -> Option<MatRef<'_>> {
        let g = self.train.as_deref()?.gains_eff.as_ref()?;
        Some(g.view().top_left(1, r))
    }
}
