//! One low-rank module: A (capacity x in), B (out x capacity), alpha, scaling rule, and the rank
//! in use. Tensors are used in place from their safetensors mapping when loaded from a file.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::weights::Weights;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// How the scale follows the rank in use. Numbers match `rf_scaling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scaling {
    /// alpha / r
    Lora = 0,
    /// alpha / sqrt(r)
    RsLora = 1,
    /// a constant, whatever the rank (AdaLoRA/ElaLoRA, KRAdapter, EigenLoRAx)
    Fixed = 2,
}

impl Scaling {
    pub fn from_raw(v: i64) -> Option<Scaling> {
        match v {
            0 => Some(Scaling::Lora),
            1 => Some(Scaling::RsLora),
            2 => Some(Scaling::Fixed),
            _ => None,
        }
    }
}

/// Tensor storage: a view into a mapped file (kept alive by the Arc) or owned memory.
pub enum TensorData {
    Mapped {
        _keep: Arc<Weights>,
        view: MatRef<'static>,
    },
    Owned(Matrix),
}

impl TensorData {
    /// A view of the named tensor inside `weights`, valid as long as this value lives.
    pub fn mapped(weights: &Arc<Weights>, name: &str) -> Result<TensorData> {
        let v = weights.get(name)?;
        // SAFETY: the view points into the Weights' mapping (or owned buffer), whose address is
        // stable and which the Arc stored next to it keeps alive for this value's lifetime.
        let view: MatRef<'static> =
            unsafe { MatRef::from_raw(v.as_ptr(), v.dtype, v.rows, v.cols, v.ld) };
        Ok(TensorData::Mapped {
            _keep: weights.clone(),
            view,
        })
    }
    pub fn view(&self) -> MatRef<'_> {
        match self {
            TensorData::Mapped { view, .. } => *view,
            TensorData::Owned(m) => m.view(),
        }
    }
    pub fn is_mapped(&self) -> bool {
        matches!(self, TensorData::Mapped { .. })
    }
}

/// A LoRA module: delta(x) = scale(r) * (x A[:r]^T) B[:, :r]^T.
pub struct Lora {
    /// Module path in the base model ("model.layers.0.self_attn.q_proj").
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub capacity: usize,
    rank: AtomicU32,
    pub alpha: f32,
    pub scaling: Scaling,
    /// The scale when `scaling == Fixed`.
    pub fixed_scale: f32,
    pub a: TensorData,
    pub b: TensorData,
    /// What the module is (kind.rs): LoRA, or a KRAdapter / EigenLoRAx module whose parameters
    /// A and B hold in the layout kind.rs gives. `in_features` / `out_features` are A's columns
    /// and B's rows (the weight's in / out for LoRA; `module_dims` gives the weight's for every
    /// kind).
    pub kind: super::kind::Kind,
    /// Training state (f32 masters, gradients, optimizer, gains, mask); None = inference only.
    pub train: Option<Box<crate::train::TrainState>>,
    /// A copy of A, B and the gains in device memory (adapters loaded on a CUDA runtime); the
    /// host tensors above stay the reference. Kept in step by [`Lora::refresh_device`], which
    /// every method that changes A, B, the gains or the capacity calls.
    #[cfg(feature = "cuda")]
    pub device: Option<crate::backend::cuda::resident::ResidentLora>,
}

impl Lora {
    /// A module over A (capacity x in) and B (out x capacity); checks that they agree.
    pub fn new(
        name: &str,
        a: TensorData,
        b: TensorData,
        alpha: f32,
        scaling: Scaling,
        fixed_scale: f32,
    ) -> Result<Lora> {
        let (av, bv) = (a.view(), b.view());
        if av.rows != bv.cols {
            return Err(Error::shape(format!(
                "module '{name}': lora_A has {} rows (rank), lora_B has {} columns",
                av.rows, bv.cols
            )));
        }
        if av.rows == 0 || av.rows > u32::MAX as usize {
            return Err(Error::shape(format!(
                "module '{name}': rank {} is out of range",
                av.rows
            )));
        }
        if av.dtype != bv.dtype {
            return Err(Error::dtype(format!(
                "module '{name}': lora_A is {}, lora_B is {}",
                av.dtype.name(),
                bv.dtype.name()
            )));
        }
        if !alpha.is_finite() || !fixed_scale.is_finite() {
            return Err(Error::invalid(format!(
                "module '{name}': alpha/scale must be finite"
            )));
        }
        Ok(Lora {
            name: name.to_string(),
            in_features: av.cols,
            out_features: bv.rows,
            capacity: av.rows,
            rank: AtomicU32::new(av.rows as u32),
            alpha,
            scaling,
            fixed_scale,
            a,
            b,
            kind: super::kind::Kind::Lora,
            train: None,
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Re-uploads A, B and the gains to the module's device copy after they changed (a no-op
    /// without one). Rust code that changes `a`, `b` or the training state directly must call
    /// it; the methods of `Lora` and the training functions do. Waits for the device copy's
    /// runtime stream (earlier calls reading the copy finish first). If the upload fails, the
    /// device copy is dropped (later calls copy the host tensors per call, still correct) and
    /// the error says so; if the runtime the adapter was loaded on has been freed, the device
    /// copy is dropped silently.
    pub fn refresh_device(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(mut d) = self.device.take() {
            let cap = self.capacity;
            let gains = self.gains_view(cap);
            match d.refresh(self.a.view(), self.b.view(), gains) {
                Ok(true) => self.device = Some(d),
                Ok(false) => {}
                Err(e) => {
                    return Err(e.context(format!(
                        "module '{}': the host copy changed but its device copy could not be \
                         updated; the device copy was dropped (later calls copy the module per call)",
                        self.name
                    )))
                }
            }
        }
        Ok(())
    }

    /// The default rank of later calls.
    pub fn rank(&self) -> usize {
        self.rank.load(Ordering::Relaxed) as usize
    }

    /// Sets the default rank (1..=rank_limit: LoRA's capacity, EigenLoRAx's basis components).
    pub fn set_rank(&self, rank: usize) -> Result<()> {
        let lim = self.rank_limit();
        if rank == 0 || rank > lim {
            return Err(Error::invalid(format!(
                "module '{}': rank {rank} is outside 1..={lim}",
                self.name
            )));
        }
        self.rank.store(rank as u32, Ordering::Relaxed);
        Ok(())
    }

    /// Sets the rank without the check (constructors of the other kinds).
    pub(crate) fn set_rank_unchecked(&mut self, rank: usize) {
        self.rank.store(rank as u32, Ordering::Relaxed);
    }

    /// The scale at rank `r` in use.
    pub fn scale_at(&self, r: usize) -> f32 {
        match self.scaling {
            Scaling::Lora => (self.alpha as f64 / r as f64) as f32,
            Scaling::RsLora => (self.alpha as f64 / (r as f64).sqrt()) as f32,
            Scaling::Fixed => self.fixed_scale,
        }
    }

    pub fn dtype(&self) -> DType {
        self.a.view().dtype
    }

    /// A[:r] (r x in).
    pub fn a_view(&self, r: usize) -> MatRef<'_> {
        let a = self.a.view();
        a.top_left(r, a.cols)
    }

    /// B[:, :r] (out x r, ld = capacity).
    pub fn b_view(&self, r: usize) -> MatRef<'_> {
        let b = self.b.view();
        b.top_left(b.rows, r)
    }

    /// Resolves a per-call rank (0 = current) and checks it.
    pub fn resolve_rank(&self, rank: usize) -> Result<usize> {
        let r = if rank == 0 { self.rank() } else { rank };
        let lim = self.rank_limit();
        if r > lim {
            return Err(Error::invalid(format!(
                "module '{}': rank {r} exceeds {} {lim}",
                self.name,
                if matches!(self.kind, super::kind::Kind::Lora) {
                    "capacity"
                } else {
                    "the module's rank limit"
                }
            )));
        }
        Ok(r)
    }
}
