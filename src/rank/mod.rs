//! Dynamic ranks: DyLoRA truncation sampling, importance scores, ElaLoRA prune/grow, and
//! RankAdaptor's per-layer rank search.

pub mod dylora;
pub mod elalora;
pub mod importance;
pub mod schedule;
