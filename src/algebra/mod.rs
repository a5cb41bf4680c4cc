//! Adapter algebra: making and reshaping adapters rather than running them.
//!
//! - [`extract`]: PHLoRA — LoRA adapters from a full fine-tune (ΔW = W_tuned - W_base) by a
//!   randomized truncated SVD ([`svd`]).
//! - [`merge`]: W' = W ± s·B_r·A_r into a weights file or a caller's buffer, with a parity report.
//! - [`eigen`]: EigenLoRAx — one principal basis per module for many adapters, small loadings
//!   per adapter, and a serving path that shares x·C_A across every adapter on the basis.

pub mod eigen;
pub mod extract;
pub mod merge;
pub mod svd;
