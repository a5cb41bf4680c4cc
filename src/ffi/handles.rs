//! Opaque handle types. C sees `typedef struct rf_x rf_x;`; Rust casts the pointer back to the
//! one type it came from. Ownership and thread safety are documented on each constructor.

use crate::adapter::{Adapter, Lora};
use crate::error::{Error, Result};
use crate::runtime::Runtime;
use crate::weights::Weights;
use std::ffi::CString;
use std::sync::Arc;

/// A runtime. Thread-safe: compute calls may run from many threads at once.
pub struct rf_runtime {
    pub(crate) inner: Runtime,
}

/// Opened weights (memory-mapped). Immutable; thread-safe.
pub struct rf_weights {
    pub(crate) inner: Arc<Weights>,
    pub(crate) names: Vec<CString>,
}

/// An adapter: a named set of LoRA modules. Compute calls may share it across threads; calls
/// that change it need exclusive access.
pub struct rf_adapter {
    pub(crate) inner: Adapter,
    pub(crate) names: Vec<CString>,
}

/// One LoRA module, borrowed from its adapter (lives as long as the adapter).
pub struct rf_lora {
    _private: [u8; 0],
}

pub fn c_name(s: &str, what: &str) -> Result<CString> {
    CString::new(s)
        .map_err(|_| Error::format(format!("{what} '{}' contains a NUL byte", s.escape_debug())))
}

impl rf_adapter {
    pub fn new(inner: Adapter) -> Result<rf_adapter> {
        let names = inner
            .modules()
            .map(|l| c_name(&l.name, "module name"))
            .collect::<Result<_>>()?;
        Ok(rf_adapter { inner, names })
    }
}

/// `&Lora` behind an `rf_lora` pointer.
///
/// # Safety
/// `p` must be NULL or a pointer obtained from `rf_adapter_module` whose adapter is alive.
pub unsafe fn lora_ref<'a>(p: *const rf_lora, name: &str) -> Result<&'a Lora> {
    if p.is_null() {
        return Err(Error::invalid(format!("argument '{name}' is NULL")));
    }
    Ok(&*(p as *const Lora))
}

pub fn lora_ptr(l: &Lora) -> *mut rf_lora {
    l as *const Lora as *mut rf_lora
}

/// `&mut Lora` behind an `rf_lora` pointer, for calls that change the module.
///
/// # Safety
/// `p` must be NULL or a pointer obtained from `rf_adapter_module` / `rf_adapter_add_lora`
/// (`Adapter::module_ptr`, which has write provenance) whose adapter is alive, and the caller must hold exclusive access to that module (the C ABI
/// documents this on every function that changes an adapter).
pub unsafe fn lora_mut<'a>(p: *mut rf_lora, name: &str) -> Result<&'a mut Lora> {
    if p.is_null() {
        return Err(Error::invalid(format!("argument '{name}' is NULL")));
    }
    Ok(&mut *(p as *mut Lora))
}
