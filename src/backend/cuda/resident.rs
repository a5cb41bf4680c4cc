//! Device-resident copies of weights and adapters opened on a CUDA runtime.
//!
//! Ownership: every allocation here holds an `Arc<DeviceHome>`, a retain of the device's primary
//! context of its own, so device memory stays valid and is freed correctly whatever happens to
//! the runtime: weights and adapters may be freed before or after the runtime they were opened
//! on. Uploads go through the runtime's stream and pinned staging (`CudaBackend::upload_pieces`);
//! the copies keep only a `Weak` reference to the runtime's backend for later uploads (a lazy
//! tensor's first `rf_weights_get`, an adapter's refresh after a training step). When that
//! runtime is gone, a lazy tensor not yet uploaded is a DEVICE error and an adapter's device copy
//! is dropped (its module is then copied per call, still correct).
//!
//! Freeing waits for the device (`cuCtxSynchronize`, then `cuMemFree`), so work still queued
//! that reads the memory finishes first.

use super::{check, guard, span_bytes, CudaBackend};
use crate::adapter::Lora;
use crate::backend::placement::{self, Placement};
use crate::backend::Slot;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::MatRef;
use crate::weights::Weights;
use cudarc::driver::sys;
use std::ffi::c_void;
use std::sync::{Arc, Mutex, Weak};

/// A retain of a device's primary context: device memory allocated in it stays valid while one
/// of these lives.
pub struct DeviceHome {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
}

// SAFETY: a retained primary context may be made current on any thread; nothing here is mutated
// after construction.
unsafe impl Send for DeviceHome {}
// SAFETY: as above.
unsafe impl Sync for DeviceHome {}

impl DeviceHome {
    /// Retains the primary context of `b`'s device once more (released on drop).
    pub fn of(b: &CudaBackend) -> Result<Arc<DeviceHome>> {
        guard(|| {
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            // SAFETY: b.dev is a valid device (b opened it); out-param owned here.
            check(
                unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, b.dev) },
                "cuDevicePrimaryCtxRetain",
            )?;
            Ok(Arc::new(DeviceHome { dev: b.dev, ctx }))
        })
    }

    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is retained until Drop.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    /// Memory of this home is usable by `b` (same device, same primary context).
    pub fn serves(&self, b: &CudaBackend) -> bool {
        self.ctx == b.ctx
    }
}

impl Drop for DeviceHome {
    fn drop(&mut self) {
        // SAFETY: releases the retain taken in `of`; errors at teardown are ignored.
        let _ = std::panic::catch_unwind(|| unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.dev) });
    }
}

/// One device allocation (cuMemAlloc), freed on drop after the device has finished its work.
pub struct ResidentBuffer {
    home: Arc<DeviceHome>,
    ptr: sys::CUdeviceptr,
    bytes: usize,
}

impl ResidentBuffer {
    /// Allocates `bytes` (at least 1) in `home`'s context.
    pub fn alloc(home: &Arc<DeviceHome>, bytes: usize) -> Result<ResidentBuffer> {
        guard(|| {
            home.bind()?;
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: out-param owned here; the context is current.
            check(
                unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes.max(1)) },
                &format!("allocating {bytes} bytes"),
            )?;
            Ok(ResidentBuffer {
                home: home.clone(),
                ptr,
                bytes,
            })
        })
    }

    pub fn ptr(&self) -> sys::CUdeviceptr {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for ResidentBuffer {
    fn drop(&mut self) {
        let (home, ptr) = (&self.home, self.ptr);
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if home.bind().is_ok() {
                // SAFETY: ptr came from cuMemAlloc in this context and is freed once, after the
                // context's queued work (which may still read it) has completed.
                unsafe {
                    sys::cuCtxSynchronize();
                    sys::cuMemFree_v2(ptr);
                }
            }
        }));
    }
}

/// The host bytes of a view's span.
fn host_bytes<'a>(m: &MatRef<'a>) -> &'a [u8] {
    let n = span_bytes(m);
    if n == 0 {
        return &[];
    }
    // SAFETY: a host view covers `n` bytes from its pointer (checked when it was made) and lives
    // for 'a.
    unsafe { std::slice::from_raw_parts(m.as_ptr(), n) }
}

/// Shape of a matrix as uploaded: a device copy is used only while the host tensor still has it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Shape {
    dtype: DType,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl Shape {
    fn of(m: &MatRef<'_>) -> Shape {
        Shape {
            dtype: m.dtype,
            rows: m.rows,
            cols: m.cols,
            ld: m.ld,
        }
    }
}

/// A range of a (possibly shared) device allocation.
struct Region {
    buf: Arc<ResidentBuffer>,
    offset: usize,
    bytes: usize,
}

impl Region {
    fn ptr(&self) -> sys::CUdeviceptr {
        self.buf.ptr() + self.offset as sys::CUdeviceptr
    }
}

/// A LoRA module's A (capacity x in), B (out x capacity) and gains (1 x capacity, f32) in device
/// memory. Space for the gains is reserved at upload, so turning gains or a mask on later needs
/// no allocation.
pub struct ResidentLora {
    backend: Weak<CudaBackend>,
    a: Region,
    b: Region,
    gains: Region,
    a_shape: Shape,
    b_shape: Shape,
    has_gains: bool,
}

/// Device bytes reserved per module for its gains (f32 per component).
fn gains_bytes(capacity: usize) -> usize {
    capacity * DType::F32.size()
}

impl ResidentLora {
    /// A slot reading this copy instead of the host tensors, when the copy is usable by `c` and
    /// still matches the host module (`host` = the slot resolved from the host tensors, whose
    /// rank, scale and shapes are kept). None = use the host slot (per-call copy).
    pub fn slot<'a>(
        &'a self,
        c: &CudaBackend,
        lora: &'a Lora,
        host: &Slot<'a>,
    ) -> Option<Slot<'a>> {
        if !self.a.buf.home.serves(c)
            || Shape::of(&lora.a.view()) != self.a_shape
            || Shape::of(&lora.b.view()) != self.b_shape
            || host.gains.is_some() != self.has_gains
        {
            return None;
        }
        let dev = |ptr: sys::CUdeviceptr, v: &MatRef<'a>| -> MatRef<'a> {
            // SAFETY: the view is only handed to the CUDA backend, which passes the pointer to
            // kernels; the region covers the full tensor (of which `v` is the top-left part, with
            // the same ld) and lives as long as `self`.
            unsafe { MatRef::from_raw(ptr as *const u8, v.dtype, v.rows, v.cols, v.ld) }
        };
        Some(Slot {
            a: dev(self.a.ptr(), &host.a),
            b: dev(self.b.ptr(), &host.b),
            gains: host.gains.as_ref().map(|g| dev(self.gains.ptr(), g)),
            ..*host
        })
    }

    /// Device bytes this module's copy uses (its ranges, not counting alignment).
    pub fn bytes(&self) -> usize {
        self.a.bytes + self.b.bytes + self.gains.bytes
    }

    /// Uploads the host tensors again (same ranges when they still fit, else a new allocation
    /// of this module's own). Ok(false) = the runtime is gone: drop this copy.
    pub fn refresh(
        &mut self,
        a: MatRef<'_>,
        b: MatRef<'_>,
        gains: Option<MatRef<'_>>,
    ) -> Result<bool> {
        let Some(backend) = self.backend.upgrade() else {
            return Ok(false);
        };
        let home = self.a.buf.home.clone();
        let need = [
            span_bytes(&a),
            span_bytes(&b),
            gains.as_ref().map_or(0, span_bytes),
        ];
        let fits = [
            need[0] <= self.a.bytes,
            need[1] <= self.b.bytes,
            need[2] <= self.gains.bytes,
        ];
        if !fits.iter().all(|&f| f) {
            // New ranges for everything, in one allocation of this module's own.
            let (placed, totals) = placement::pack(
                &[
                    (0, need[0]),
                    (0, need[1]),
                    (0, need[2].max(gains_bytes(a.rows))),
                ],
                1,
            )?;
            let buf = Arc::new(ResidentBuffer::alloc(&home, totals[0])?);
            let region = |p: &Placement| Region {
                buf: buf.clone(),
                offset: p.offset,
                bytes: p.bytes,
            };
            self.a = region(&placed[0]);
            self.b = region(&placed[1]);
            self.gains = region(&placed[2]);
        }
        let mut pieces = vec![
            (self.a.ptr(), host_bytes(&a)),
            (self.b.ptr(), host_bytes(&b)),
        ];
        if let Some(g) = &gains {
            pieces.push((self.gains.ptr(), host_bytes(g)));
        }
        // On error the caller drops this copy (`Lora::refresh_device`): it is never used half
        // updated.
        guard(|| backend.upload_pieces(&pieces))?;
        self.a_shape = Shape::of(&a);
        self.b_shape = Shape::of(&b);
        self.has_gains = gains.is_some();
        Ok(true)
    }
}

/// Uploads `modules` (A, B and gains of each) into one allocation and gives each its device
/// copy. All or nothing: on error no module gets a copy.
pub fn upload_modules(backend: &Arc<CudaBackend>, modules: &mut [&mut Lora]) -> Result<()> {
    if modules.is_empty() {
        return Ok(());
    }
    let mut items = Vec::with_capacity(modules.len() * 3);
    for l in modules.iter() {
        items.push((0, span_bytes(&l.a.view())));
        items.push((0, span_bytes(&l.b.view())));
        items.push((0, gains_bytes(l.capacity)));
    }
    let (placed, totals) = placement::pack(&items, 1)?;
    let home = DeviceHome::of(backend)?;
    let total = totals[0];
    let buf = Arc::new(ResidentBuffer::alloc(&home, total).map_err(|e| {
        e.context(format!(
            "uploading {} module(s) ({total} bytes) to CUDA device {}",
            modules.len(),
            backend.info().index
        ))
    })?);
    let region = |p: &Placement| Region {
        buf: buf.clone(),
        offset: p.offset,
        bytes: p.bytes,
    };
    let mut copies = Vec::with_capacity(modules.len());
    let mut pieces = Vec::with_capacity(items.len());
    for (l, p) in modules.iter().zip(placed.chunks(3)) {
        let (a, b) = (l.a.view(), l.b.view());
        let gains = l.gains_view(l.capacity);
        let c = ResidentLora {
            backend: Arc::downgrade(backend),
            a: region(&p[0]),
            b: region(&p[1]),
            gains: region(&p[2]),
            a_shape: Shape::of(&a),
            b_shape: Shape::of(&b),
            has_gains: gains.is_some(),
        };
        pieces.push((c.a.ptr(), host_bytes(&a)));
        pieces.push((c.b.ptr(), host_bytes(&b)));
        if let Some(g) = &gains {
            pieces.push((c.gains.ptr(), host_bytes(g)));
        }
        copies.push(c);
    }
    guard(|| backend.upload_pieces(&pieces))?;
    for (l, c) in modules.iter_mut().zip(copies) {
        l.device = Some(c);
    }
    Ok(())
}

/// Where opened weights live on the device.
enum Store {
    /// Everything uploaded at open: one allocation per shard (None = a shard with nothing to
    /// upload), each tensor at its planned range.
    Eager {
        shards: Vec<Option<ResidentBuffer>>,
        plan: Vec<Option<Placement>>,
    },
    /// Each tensor uploaded on its first use, into an allocation of its own.
    Lazy {
        backend: Weak<CudaBackend>,
        home: Arc<DeviceHome>,
        tensors: Vec<Mutex<Option<ResidentBuffer>>>,
    },
}

/// Device copies of opened weights (`rf_weights_open` on a CUDA runtime).
pub struct DeviceWeights {
    store: Store,
}

impl DeviceWeights {
    /// Uploads every uploadable tensor now (`placement::plan_weights`): all allocations are made
    /// first (an OUT_OF_MEMORY leaves nothing behind), then the data streams shard by shard in
    /// file order through one pair of pinned staging buffers.
    pub fn upload_all(backend: &Arc<CudaBackend>, w: &Weights) -> Result<DeviceWeights> {
        let plan = placement::plan_weights(w)?;
        let home = DeviceHome::of(backend)?;
        let mut shards = Vec::with_capacity(plan.shard_bytes.len());
        for (s, &bytes) in plan.shard_bytes.iter().enumerate() {
            shards.push(if bytes == 0 {
                None
            } else {
                Some(ResidentBuffer::alloc(&home, bytes).map_err(|e| {
                    e.context(format!(
                        "weights '{}': uploading {bytes} bytes of '{}' to CUDA device {} ({} bytes \
                         for all files)",
                        w.path().display(),
                        w.shard_path(s).map_or_else(String::new, |p| p.display().to_string()),
                        backend.info().index,
                        plan.total()
                    ))
                })?)
            });
        }
        let mut pieces = Vec::new();
        for (e, p) in w.entries().iter().zip(&plan.tensors) {
            if let (Some(p), true) = (p, e.byte_len() > 0) {
                let buf = shards[p.group].as_ref().ok_or_else(|| {
                    Error::internal(format!("tensor '{}': shard without an allocation", e.name))
                })?;
                pieces.push((buf.ptr() + p.offset as sys::CUdeviceptr, w.bytes(&e.name)?));
            }
        }
        guard(|| backend.upload_pieces(&pieces))
            .map_err(|e| e.context(format!("weights '{}'", w.path().display())))?;
        Ok(DeviceWeights {
            store: Store::Eager {
                shards,
                plan: plan.tensors,
            },
        })
    }

    /// Nothing uploaded yet: each tensor on its first [`DeviceWeights::tensor_ptr`].
    pub fn lazy(backend: &Arc<CudaBackend>, w: &Weights) -> Result<DeviceWeights> {
        Ok(DeviceWeights {
            store: Store::Lazy {
                backend: Arc::downgrade(backend),
                home: DeviceHome::of(backend)?,
                tensors: (0..w.len()).map(|_| Mutex::new(None)).collect(),
            },
        })
    }

    /// The device address of tensor `i` of `w` (the weights these copies were made from), which
    /// the caller has checked is uploadable (`Weights::get` succeeded). NULL for an empty
    /// tensor. Lazy: uploads it on first use (thread-safe; one upload per tensor).
    pub fn tensor_ptr(&self, w: &Weights, i: usize) -> Result<*mut c_void> {
        let e = w
            .entries()
            .get(i)
            .ok_or_else(|| Error::internal(format!("tensor index {i}")))?;
        if e.byte_len() == 0 {
            return Ok(std::ptr::null_mut());
        }
        match &self.store {
            Store::Eager { shards, plan } => {
                let p = plan.get(i).copied().flatten().ok_or_else(|| {
                    Error::internal(format!("tensor '{}' has no device copy", e.name))
                })?;
                let buf = shards[p.group].as_ref().ok_or_else(|| {
                    Error::internal(format!("tensor '{}': shard without an allocation", e.name))
                })?;
                Ok((buf.ptr() + p.offset as sys::CUdeviceptr) as *mut c_void)
            }
            Store::Lazy {
                backend,
                home,
                tensors,
            } => {
                let mut slot = tensors[i]
                    .lock()
                    .map_err(|_| Error::internal("weights upload lock poisoned"))?;
                if let Some(b) = slot.as_ref() {
                    return Ok(b.ptr() as *mut c_void);
                }
                let backend = backend.upgrade().ok_or_else(|| {
                    Error::device(format!(
                        "weights '{}': tensor '{}' is not on the device yet and the runtime the \
                         weights were opened on has been freed (RF_WEIGHTS_LAZY uploads through \
                         it)",
                        w.path().display(),
                        e.name
                    ))
                })?;
                let bytes = w.bytes(&e.name)?;
                let ctx = || {
                    format!(
                        "weights '{}': tensor '{}': uploading {} bytes to CUDA device {}",
                        w.path().display(),
                        e.name,
                        bytes.len(),
                        backend.info().index
                    )
                };
                let buf =
                    ResidentBuffer::alloc(home, bytes.len()).map_err(|err| err.context(ctx()))?;
                guard(|| backend.upload_pieces(&[(buf.ptr(), bytes)]))
                    .map_err(|err| err.context(ctx()))?;
                let p = buf.ptr() as *mut c_void;
                *slot = Some(buf);
                Ok(p)
            }
        }
    }

    /// Device bytes held now (all planned bytes when eager; the tensors used so far when lazy).
    pub fn resident_bytes(&self) -> usize {
        match &self.store {
            Store::Eager { shards, .. } => shards.iter().flatten().map(|b| b.len()).sum(),
            Store::Lazy { tensors, .. } => tensors
                .iter()
                .filter_map(|t| t.lock().ok().and_then(|g| g.as_ref().map(|b| b.len())))
                .sum(),
        }
    }

    /// Whether tensors upload on first use.
    pub fn is_lazy(&self) -> bool {
        matches!(self.store, Store::Lazy { .. })
    }
}
