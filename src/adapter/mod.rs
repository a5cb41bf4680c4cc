//! Adapters: a named set of per-module low-rank modules.

pub mod gguf;
pub mod kind;
pub mod kron;
pub mod lora;
pub mod names;
pub mod pattern;
pub mod peft;

pub use kind::{BasisModule, Kind, KronShape};
pub use lora::{Lora, Scaling, TensorData};

use crate::error::{Error, Result};
use std::cell::UnsafeCell;
use std::collections::HashMap;

/// A named set of modules, keyed by the base model's module path.
pub struct Adapter {
    pub name: String,
    // Boxed so `&Lora` handed to C stays put when the vector grows. In an UnsafeCell so a handle
    // given to C (`module_ptr`) may be written through by training calls, which the C ABI
    // requires to have exclusive access to the adapter.
    #[allow(clippy::vec_box)]
    modules: Vec<Box<UnsafeCell<Lora>>>,
    index: HashMap<String, usize>,
    /// The adapter_config.json this adapter was loaded from (kept for saving), if any.
    pub peft_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// The `general.architecture` of the GGUF file the adapter was loaded from (NUL-terminated
    /// for the C accessor), if any.
    architecture: Option<std::ffi::CString>,
    /// Module name -> the Hugging Face (PEFT) module path it was converted from, as recorded in
    /// a GGUF adapter written by rankfuse (`gguf::to_peft_names` prefers these to the table).
    pub peft_names: HashMap<String, String>,
}

// SAFETY: shared access only reads modules; writes need `&mut Adapter` or, through
// `module_ptr` handles, exclusive access promised by the caller (the C ABI contract).
unsafe impl Sync for Adapter {}

impl Adapter {
    pub fn new(name: &str) -> Adapter {
        Adapter {
            name: name.to_string(),
            modules: Vec::new(),
            index: HashMap::new(),
            peft_config: None,
            architecture: None,
            peft_names: HashMap::new(),
        }
    }

    /// The architecture the adapter is for (`general.architecture` of a GGUF adapter).
    pub fn architecture(&self) -> Option<&str> {
        self.architecture.as_ref().and_then(|c| c.to_str().ok())
    }
    /// The same, NUL-terminated (for C).
    pub fn architecture_c(&self) -> Option<&std::ffi::CStr> {
        self.architecture.as_deref()
    }
    /// Sets (or clears) the architecture; a name holding NUL is refused.
    pub fn set_architecture(&mut self, arch: Option<&str>) -> Result<()> {
        self.architecture = match arch {
            None => None,
            Some(a) => Some(std::ffi::CString::new(a).map_err(|_| {
                Error::invalid(format!("architecture '{}' holds a NUL", a.escape_debug()))
            })?),
        };
        Ok(())
    }

    /// Renames every module (`names[i]` for module `i`); the new names must be distinct.
    pub fn rename_modules(&mut self, names: &[String]) -> Result<()> {
        if names.len() != self.modules.len() {
            return Err(Error::internal(format!(
                "adapter '{}': {} names for {} modules",
                self.name,
                names.len(),
                self.modules.len()
            )));
        }
        let mut index = HashMap::with_capacity(names.len());
        for (i, n) in names.iter().enumerate() {
            if index.insert(n.clone(), i).is_some() {
                return Err(Error::invalid(format!(
                    "adapter '{}': two modules would be named '{n}'",
                    self.name
                )));
            }
        }
        for (m, n) in self.modules.iter_mut().zip(names) {
            m.get_mut().name = n.clone();
        }
        self.index = index;
        Ok(())
    }

    /// Adds a module; its name must be new.
    pub fn add(&mut self, lora: Lora) -> Result<&mut Lora> {
        if self.index.contains_key(&lora.name) {
            return Err(Error::invalid(format!(
                "adapter '{}': module '{}' already exists",
                self.name, lora.name
            )));
        }
        self.index.insert(lora.name.clone(), self.modules.len());
        self.modules.push(Box::new(UnsafeCell::new(lora)));
        Ok(self.modules.last_mut().expect("just pushed").get_mut())
    }

    pub fn len(&self) -> usize {
        self.modules.len()
    }
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }
    fn shared(cell: &UnsafeCell<Lora>) -> &Lora {
        // SAFETY: writes happen only through `&mut self` (no `&Lora` can be live then) or through
        // `module_ptr` handles, whose users must hold exclusive access to the adapter.
        unsafe { &*cell.get() }
    }
    pub fn modules(&self) -> impl Iterator<Item = &Lora> {
        self.modules.iter().map(|b| Self::shared(b))
    }
    pub fn modules_mut(&mut self) -> impl Iterator<Item = &mut Lora> {
        self.modules.iter_mut().map(|b| b.get_mut())
    }
    pub fn module_at(&self, i: usize) -> Option<&Lora> {
        self.modules.get(i).map(|b| Self::shared(b))
    }
    pub fn get(&self, module: &str) -> Option<&Lora> {
        self.index
            .get(module)
            .map(|&i| Self::shared(&self.modules[i]))
    }
    pub fn get_mut(&mut self, module: &str) -> Option<&mut Lora> {
        self.index.get(module).map(|&i| self.modules[i].get_mut())
    }
    /// A raw handle to a module (for the C ABI): stable while the adapter lives; writing through
    /// it needs exclusive access to the adapter.
    pub fn module_ptr(&self, module: &str) -> Result<*mut Lora> {
        self.module(module)?;
        Ok(self.modules[self.index[module]].get())
    }
    /// Bytes of every module's A and B (what the adapter keeps resident on the host).
    pub fn tensor_bytes(&self) -> usize {
        self.modules()
            .map(|l| {
                let (a, b) = (l.a.view(), l.b.view());
                (a.rows * a.cols + b.rows * b.cols) * a.dtype.size()
            })
            .sum()
    }
    /// Like `get`, with an error naming the adapter and module.
    pub fn module(&self, module: &str) -> Result<&Lora> {
        self.get(module).ok_or_else(|| {
            Error::not_found(format!("adapter '{}': no module '{module}'", self.name))
        })
    }
}
