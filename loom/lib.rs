//! src/store.rs and the error type it uses, compiled on their own (under `--cfg loom`, with
//! loom's sync primitives) for the model in tests/store.rs.

#[path = "../src/error.rs"]
pub mod error;
#[path = "../src/store.rs"]
pub mod store;

pub use error::{Error, Result};
