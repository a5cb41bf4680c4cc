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
    /// Metadata keys and strings as C strings (made at open).
    pub(crate) meta: super::meta::CMeta,
    /// Device copies when opened on a CUDA runtime (None = `rf_weights_get` gives host views).
    #[cfg(feature = "cuda")]
    pub(crate) device: Option<crate::backend::cuda::resident::DeviceWeights>,
}

/// A base matrix packed for a kind of CPU kernels (`rf_weights_pack`). Immutable; thread-safe.
pub struct rf_packed {
    pub(crate) inner: Arc<crate::backend::cpu::pack::PackedW>,
}

/// An adapter: a named set of LoRA modules. Compute calls may share it across threads; calls
/// that change it need exclusive access.
pub struct rf_adapter {
    pub(crate) inner: Adapter,
    pub(crate) names: Vec<CString>,
    /// The CUDA runtime the adapter was loaded on (modules added later are uploaded there too).
    #[cfg(feature = "cuda")]
    pub(crate) cuda: Option<std::sync::Weak<crate::backend::cuda::CudaBackend>>,
    /// Its identity in an adapter store (`rf_adapter_version`); id 0 outside a store.
    pub(crate) version: crate::store::Version,
}

/// Adapters alive in the process: counted so soak tests can tell every adapter was freed (one
/// relaxed atomic add per adapter made or freed).
static LIVE_ADAPTERS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many `rf_adapter`s are alive in the process (made and not yet freed), whoever owns them.
pub fn live_adapters() -> usize {
    LIVE_ADAPTERS.load(std::sync::atomic::Ordering::SeqCst)
}

impl Drop for rf_adapter {
    fn drop(&mut self) {
        LIVE_ADAPTERS.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl crate::store::Versioned for rf_adapter {
    fn set_version(&mut self, v: crate::store::Version) {
        self.version = v;
    }
}

/// An adapter store (`rf_store_create`): adapters registered by name, loaded on first use,
/// evicted under a byte budget. Thread-safe.
pub struct rf_store {
    pub(crate) inner: crate::store::Store<rf_adapter>,
}

/// One LoRA module, borrowed from its adapter (lives as long as the adapter).
pub struct rf_lora {
    _private: [u8; 0],
}

/// The CUDA device of a runtime (None on a CPU runtime), kept apart from the runtime.
#[derive(Clone)]
pub struct DeviceOf(
    #[cfg(feature = "cuda")] pub(crate) Option<Arc<crate::backend::cuda::CudaBackend>>,
    #[cfg(not(feature = "cuda"))] pub(crate) (),
);

impl DeviceOf {
    pub fn of(rt: &Runtime) -> DeviceOf {
        #[cfg(feature = "cuda")]
        return DeviceOf(rt.cuda_shared());
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rt;
            DeviceOf(())
        }
    }
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
        LIVE_ADAPTERS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(rf_adapter {
            inner,
            names,
            #[cfg(feature = "cuda")]
            cuda: None,
            version: Default::default(),
        })
    }

    /// An adapter handle for `rt`: on a CUDA runtime every module's A, B and gains are uploaded
    /// to device memory now (one allocation), and `rf_linear` on that device reads them there.
    pub fn on_runtime(inner: Adapter, rt: &crate::runtime::Runtime) -> Result<rf_adapter> {
        rf_adapter::on_device(inner, &DeviceOf::of(rt))
    }

    /// As `on_runtime`, for the device a runtime had (the adapter store keeps that, not the
    /// runtime, so it may outlive the runtime's handle).
    pub fn on_device(inner: Adapter, dev: &DeviceOf) -> Result<rf_adapter> {
        #[allow(unused_mut)]
        let mut h = rf_adapter::new(inner)?;
        #[cfg(feature = "cuda")]
        if let Some(c) = dev.0.clone() {
            let mut mods: Vec<&mut Lora> = h.inner.modules_mut().collect();
            crate::backend::cuda::resident::upload_modules(&c, &mut mods)
                .map_err(|e| e.context(format!("adapter '{}'", h.inner.name)))?;
            h.cuda = Some(std::sync::Arc::downgrade(&c));
        }
        #[cfg(not(feature = "cuda"))]
        let _ = dev;
        Ok(h)
    }

    /// Bytes the adapter keeps resident: A and B of every module, twice with a device copy.
    pub fn resident_bytes(&self) -> usize {
        self.inner.tensor_bytes() * if self.on_gpu() { 2 } else { 1 }
    }

    /// Whether the adapter keeps a device copy (its bytes count twice in a store's budget).
    pub fn on_gpu(&self) -> bool {
        #[cfg(feature = "cuda")]
        return self.cuda.is_some();
        #[cfg(not(feature = "cuda"))]
        false
    }

    /// Appends `l` (uploading it when the adapter lives on a CUDA runtime) and returns its
    /// handle, borrowed from the adapter.
    pub fn add_module(&mut self, mut l: Lora) -> Result<*mut rf_lora> {
        let cname = c_name(&l.name, "module name")?;
        let name = l.name.clone();
        self.upload_module(&mut l)?;
        self.inner.add(l)?;
        let p = self.inner.module_ptr(&name)? as *mut rf_lora;
        self.names.push(cname);
        Ok(p)
    }

    /// Uploads a module about to be added when the adapter lives on a CUDA runtime that still
    /// exists; a no-op otherwise.
    pub fn upload_module(&self, l: &mut Lora) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(c) = self.cuda.as_ref().and_then(|w| w.upgrade()) {
            crate::backend::cuda::resident::upload_modules(&c, &mut [&mut *l]).map_err(|e| {
                e.context(format!(
                    "adapter '{}': module '{}'",
                    self.inner.name, l.name
                ))
            })?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = l;
        Ok(())
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
