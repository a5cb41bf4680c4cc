//! The C ABI. The only place with `#[no_mangle]`; `include/rankfuse.h` is generated from here by
//! cbindgen. Every export runs inside `boundary!` (panics become RF_STATUS_INTERNAL) and checks
//! its arguments before anything else.
#![allow(non_camel_case_types)]
#![allow(clippy::missing_safety_doc)]

#[macro_use]
pub mod boundary;
pub mod adapter;
pub mod adapter_gguf;
pub mod algebra;
pub mod device;
pub mod error;
pub mod handles;
pub mod kinds;
pub mod linear;
pub mod meta;
pub mod packed;
pub mod runtime;
pub mod store;
pub mod train;
pub mod types;
pub mod weights;
