//! rankfuse: a runtime for low-rank adapters on frozen base weights.
//!
//! The Rust API is re-exported here; the C ABI lives in [`ffi`] (the only module with
//! `#[no_mangle]`) and is described by `include/rankfuse.h`.

pub mod adapter;
pub mod algebra;
pub mod backend;
pub mod bench;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod matrix;
pub mod methods;
pub mod quant;
pub mod rank;
pub mod rng;
pub mod runtime;
pub mod store;
pub mod train;
pub mod training;
pub mod weights;

pub use adapter::{Adapter, Lora, Scaling};
pub use backend::{ActQuant, LinearProblem, Slot};
pub use dtype::DType;
pub use error::{Error, Result, Status};
pub use matrix::{MatMut, MatRef, Matrix};
pub use runtime::{Device, Runtime, RuntimeOptions};
pub use weights::Weights;

/// The C ABI version this library implements (`RF_ABI_VERSION` in the header, which the `ffi`
/// layer checks against this at compile time); bumped on any change to an existing signature or
/// struct layout.
pub const ABI_VERSION: u32 = 1;

/// The crate version ("0.1.0").
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
