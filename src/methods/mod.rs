//! KRAdapter and EigenLoRAx modules as `rf_linear` slots and trainable modules, next to LoRA.
//!
//! The fused kernels run `y = x Wᵀ + b + Σ LoRA` (backend/); a call whose slots include modules
//! of the other kinds runs those kernels for the base and the LoRA slots, then adds each other
//! slot's update in f32 before y is rounded once to its dtype (forward.rs):
//! - KRAdapter: Δy through the Khatri–Rao structure (the paper's forward), ΔW never formed.
//! - EigenLoRAx: slots on the same basis module share one projection z = x·C_A for all their
//!   rows, then each row applies its adapter's loadings in the K-dimensional coordinates, and
//!   one product with C_Bᵀ serves every row of the group.
//!
//! backward.rs has both kinds' gradients (KRAdapter's U, V without ΔW; EigenLoRAx loadings with
//! the basis frozen), files.rs their folder formats, cuda.rs the same forward and backward on a
//! CUDA runtime (kernels in backend/cuda/kinds.rs).

pub mod backward;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod files;
pub mod forward;

use crate::adapter::{BasisModule, Kind, KronShape, Lora};
use crate::backend::Slot;
use crate::error::{Error, Result};
use crate::matrix::MatRef;

/// A resolved slot of a kind the fused kernels do not run.
#[derive(Clone, Copy, Debug)]
pub enum MethodSlot<'a> {
    /// U (m x r) and Vᵀ ((r + d) x m), f32.
    Kron {
        shape: KronShape,
        u: MatRef<'a>,
        vt: MatRef<'a>,
        scale: f32,
        module: &'a str,
    },
    /// α_Aᵀ (r x K), α_B (K x r), the first `k` basis components in use, optional gains (1 x r).
    Eigen {
        basis: &'a BasisModule,
        k: usize,
        a: MatRef<'a>,
        b: MatRef<'a>,
        gains: Option<MatRef<'a>>,
        scale: f32,
        module: &'a str,
    },
}

impl MethodSlot<'_> {
    pub fn module(&self) -> &str {
        match self {
            MethodSlot::Kron { module, .. } | MethodSlot::Eigen { module, .. } => module,
        }
    }
}

/// A resolved slot of any kind.
#[derive(Clone, Copy, Debug)]
pub enum AnySlot<'a> {
    LowRank(crate::backend::Slot<'a>),
    Method(MethodSlot<'a>),
}

/// A call's resolved slots split for `Runtime::linear_with`: `low` for the fused kernels
/// (None at the other kinds' positions and at empty slots), `methods` with the other kinds at
/// the same positions (empty when there are none).
pub struct Slots<'a> {
    pub low: Vec<Option<crate::backend::Slot<'a>>>,
    pub methods: Vec<Option<MethodSlot<'a>>>,
}

impl<'a> Slots<'a> {
    pub fn from_any(slots: impl IntoIterator<Item = Option<AnySlot<'a>>>) -> Slots<'a> {
        let mut out = Slots {
            low: Vec::new(),
            methods: Vec::new(),
        };
        for (i, s) in slots.into_iter().enumerate() {
            match s {
                Some(AnySlot::LowRank(l)) => out.low.push(Some(l)),
                Some(AnySlot::Method(m)) => {
                    out.methods.resize(i, None);
                    out.methods.push(Some(m));
                    out.low.push(None);
                }
                None => out.low.push(None),
            }
        }
        if !out.methods.is_empty() {
            out.methods.resize(out.low.len(), None);
        }
        out
    }
}

/// Resolves a module at per-call rank `rank` (0 = its current rank) with `scale_mult`: LoRA
/// through `runtime::slot`, the other kinds here.
pub fn resolve(lora: &Lora, rank: usize, scale_mult: f32) -> Result<AnySlot<'_>> {
    if !scale_mult.is_finite() {
        return Err(Error::invalid(format!(
            "module '{}': scale_mult {scale_mult} is not finite",
            lora.name
        )));
    }
    match &lora.kind {
        Kind::Lora => lora_slot(lora, rank, scale_mult).map(AnySlot::LowRank),
        Kind::Kron(shape) => {
            lora.resolve_rank(rank)?;
            Ok(AnySlot::Method(MethodSlot::Kron {
                shape: *shape,
                u: lora.a.view(),
                vt: lora.b.view(),
                scale: lora.fixed_scale * scale_mult,
                module: &lora.name,
            }))
        }
        Kind::Eigen(basis) => {
            let k = lora.resolve_rank(rank)?;
            Ok(AnySlot::Method(MethodSlot::Eigen {
                basis,
                k,
                a: lora.a.view(),
                b: lora.b.view(),
                gains: lora.gains_view(lora.capacity),
                scale: lora.fixed_scale * scale_mult,
                module: &lora.name,
            }))
        }
    }
}

/// Resolves a slot: rank 0 = the lora's current rank; scale = scale(rank) * scale_mult.
pub fn lora_slot(lora: &Lora, rank: usize, scale_mult: f32) -> Result<Slot<'_>> {
    lora.require_lora("this operation")?;
    let r = lora.resolve_rank(rank)?;
    if !scale_mult.is_finite() {
        return Err(Error::invalid(format!(
            "module '{}': scale_mult {scale_mult} is not finite",
            lora.name
        )));
    }
    Ok(Slot {
        a: lora.a_view(r),
        b: lora.b_view(r),
        scale: lora.scale_at(r) * scale_mult,
        gains: lora.gains_view(r),
        module: &lora.name,
    })
}
