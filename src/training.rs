//! Training entry points: each call goes to the backward of its module's kind (LoRA, KRAdapter,
//! EigenLoRAx) on its runtime's backend. The layers below know nothing of each other:
//! `train` holds what is method- and backend-independent (state, AdamW, clipping, the CPU LoRA
//! backward), `methods::backward` the other kinds' gradients, `backend::cuda::train` the GPU
//! launchers; only this module sees them all.

use crate::adapter::{Kind, Lora};
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::runtime::Runtime;
use crate::train::Mode;

/// Accumulates the gradients of `lora` for the layer `y = x Wᵀ + lora(x)` given `dy` (m x out),
/// at per-call rank `rank` (0 = the module's current; LoRA: components, `mode` as DyLoRA's;
/// EigenLoRAx: basis components, every loadings component gets its gradient; KRAdapter: no
/// truncation) and writes `dx = dy W + the adapter's part` when `dx` is given.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    rt: &Runtime,
    lora: &mut Lora,
    x: MatRef<'_>,
    w: MatRef<'_>,
    dy: MatRef<'_>,
    rank: usize,
    mode: Mode,
    dx: Option<&mut MatMut<'_>>,
) -> Result<()> {
    if !matches!(lora.kind, Kind::Lora) && mode != Mode::Nested {
        return Err(Error::invalid(format!(
            "module '{}' is a {} module: only the NESTED backward mode applies",
            lora.name,
            lora.kind.name()
        )));
    }
    // x, w, dy and dx are device memory on a CUDA runtime: the GPU kernels run the backward.
    #[cfg(feature = "cuda")]
    if let Some(cuda) = rt.cuda() {
        return match lora.kind {
            Kind::Lora => crate::backend::cuda::train::backward_host_state(
                cuda, lora, x, w, dy, rank, mode, dx,
            ),
            _ => crate::methods::cuda::backward_layer(cuda, lora, x, w, dy, rank, dx)
                .map_err(|e| e.context(format!("module '{}'", lora.name))),
        };
    }
    match lora.kind {
        Kind::Lora => crate::train::backward_cpu(rt, lora, x, w, dy, rank, mode, dx),
        _ => rt
            .install(|| crate::methods::backward::backward_layer(lora, x, w, dy, rank, dx))
            .map_err(|e| e.context(format!("module '{}'", lora.name))),
    }
}
