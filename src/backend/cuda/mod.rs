//! The CUDA backend (feature `cuda`): a device's primary context, a stream (the host engine's
//! `CUstream` or our own), the embedded PTX loaded lazily, and `linear` launching the shrink,
//! fused and decode kernels of `kernels/`.
//!
//! libcuda is loaded at run time (cudarc, dynamic loading): a build needs no CUDA toolkit, and on
//! a machine without the driver `CudaBackend::new` returns RF_STATUS_DEVICE — the library is
//! probed with `is_culib_present()` before any cudarc call (cudarc panics when it is missing).

pub mod algebra_ops;
pub mod kinds;
pub mod launch;
pub mod modules;
pub mod quant;
pub mod resident;
pub mod train;

use crate::backend::{LinearProblem, Slot};
use crate::dtype::DType;
use crate::error::{Error, Result, Status};
use crate::matrix::{MatMut, MatRef};
use cudarc::driver::sys;
use launch::{Geometry, LinearParams, Path, SlotParams};
use std::collections::HashMap;
use std::ffi::{c_void, CStr};
use std::sync::Mutex;

/// A CUDA error as a crate error: OUT_OF_MEMORY for allocation failures, DEVICE otherwise.
fn check(r: sys::CUresult, what: &str) -> Result<()> {
    if r == sys::CUresult::CUDA_SUCCESS {
        return Ok(());
    }
    let mut name: *const std::ffi::c_char = std::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static string (or leaves it NULL).
    let ok = unsafe { sys::cuGetErrorName(r, &mut name) } == sys::CUresult::CUDA_SUCCESS;
    let name = if ok && !name.is_null() {
        // SAFETY: the driver returned a static NUL-terminated string.
        unsafe { CStr::from_ptr(name) }
            .to_string_lossy()
            .into_owned()
    } else {
        format!("{r:?}")
    };
    let status = if r == sys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Status::OutOfMemory
    } else {
        Status::Device
    };
    Err(Error::new(status, format!("CUDA: {what}: {name}")))
}

/// Is a CUDA driver (libcuda) loadable on this machine? Never panics.
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen libcuda under its usual names; calls nothing in it.
    std::panic::catch_unwind(|| unsafe { sys::is_culib_present() }).unwrap_or(false)
}

/// Number of CUDA devices, or a DEVICE error when there is no driver or it fails to start.
pub fn device_count() -> Result<usize> {
    if !driver_present() {
        return Err(no_driver());
    }
    guard(|| {
        // SAFETY: plain driver calls with out-params owned here.
        unsafe {
            check(sys::cuInit(0), "cuInit")?;
            let mut n = 0i32;
            check(sys::cuDeviceGetCount(&mut n), "cuDeviceGetCount")?;
            Ok(n.max(0) as usize)
        }
    })
}

fn no_driver() -> Error {
    Error::device(
        "no CUDA driver: libcuda.so.1 could not be loaded (no NVIDIA driver on this machine, or \
         it is not on the library path)",
    )
}

/// Runs driver code, turning a cudarc panic (e.g. a symbol the installed driver lacks) into a
/// DEVICE error.
fn guard<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
        let what = p
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".into());
        Err(Error::device(format!("CUDA driver: {what}")))
    })
}

/// Loaded modules and functions of one device.
#[derive(Default)]
struct Loaded {
    modules: HashMap<&'static str, sys::CUmodule>,
    functions: HashMap<String, sys::CUfunction>,
}

/// Facts about the device, for `rf_runtime_info` and the launch planning.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    pub index: i32,
    pub name: String,
    /// Compute capability, major * 10 + minor (87 = Orin, 90 = H100/H200).
    pub sm: u32,
    pub sm_count: usize,
    pub total_mem: usize,
    /// The driver has stream-ordered allocation (cuMemAllocAsync).
    pub memory_pools: bool,
    /// The embedded PTX build this device loads (70, 80 or 90).
    pub ptx_arch: u32,
}

/// A CUDA backend bound to one device. Thread-safe: each call makes the context current on the
/// calling thread; the module cache is behind a mutex.
pub struct CudaBackend {
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    stream: sys::CUstream,
    own_stream: bool,
    info: DeviceInfo,
    loaded: Mutex<Loaded>,
}

// SAFETY: CUDA driver handles (context, stream, module, function) may be used from any thread
// once the context is current there, which every method does first (`bind`); the mutable state
// (module cache) is behind a Mutex.
unsafe impl Send for CudaBackend {}
// SAFETY: as above; launches on one stream from several threads are serialized by the driver.
unsafe impl Sync for CudaBackend {}

impl CudaBackend {
    /// Opens device `index` (its primary context, shared with the CUDA runtime API) and uses
    /// `stream` (a `CUstream` of that context; NULL = a stream of our own).
    pub fn new(index: i32, stream: *mut c_void) -> Result<CudaBackend> {
        if !driver_present() {
            return Err(no_driver());
        }
        guard(|| Self::open(index, stream))
    }

    fn open(index: i32, stream: *mut c_void) -> Result<CudaBackend> {
        // SAFETY: driver calls with out-params owned here; the context is retained before use
        // and released in Drop (or below on failure).
        unsafe {
            check(sys::cuInit(0), "cuInit")?;
            let mut count = 0i32;
            check(sys::cuDeviceGetCount(&mut count), "cuDeviceGetCount")?;
            if index < 0 || index >= count {
                return Err(Error::device(format!(
                    "CUDA device index {index} is out of range: this machine has {count} device(s)"
                )));
            }
            let mut dev: sys::CUdevice = 0;
            check(sys::cuDeviceGet(&mut dev, index), "cuDeviceGet")?;
            let attr = |a: sys::CUdevice_attribute| -> Result<i32> {
                let mut v = 0i32;
                check(
                    sys::cuDeviceGetAttribute(&mut v, a, dev),
                    "cuDeviceGetAttribute",
                )?;
                Ok(v)
            };
            use sys::CUdevice_attribute as A;
            let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
            let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
            let sm_count = attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?.max(1) as usize;
            let pools = attr(A::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED).unwrap_or(0) != 0;
            let sm = (major * 10 + minor).max(0) as u32;
            let mut name_buf = [0 as std::ffi::c_char; 256];
            check(
                sys::cuDeviceGetName(name_buf.as_mut_ptr(), name_buf.len() as i32, dev),
                "cuDeviceGetName",
            )?;
            let name = CStr::from_ptr(name_buf.as_ptr())
                .to_string_lossy()
                .into_owned();
            let mut total_mem = 0usize;
            check(
                sys::cuDeviceTotalMem_v2(&mut total_mem, dev),
                "cuDeviceTotalMem",
            )?;
            let ptx_arch = modules::ptx_arch_for_sm(sm).ok_or_else(|| {
                Error::unsupported(format!(
                    "CUDA device {index} ({name}) is sm_{sm}; rankfuse needs sm_70 or newer"
                ))
            })?;
            let mut ctx: sys::CUcontext = std::ptr::null_mut();
            check(
                sys::cuDevicePrimaryCtxRetain(&mut ctx, dev),
                "cuDevicePrimaryCtxRetain",
            )?;
            let release = |e: Error| {
                sys::cuDevicePrimaryCtxRelease_v2(dev);
                e
            };
            check(sys::cuCtxSetCurrent(ctx), "cuCtxSetCurrent").map_err(release)?;
            let (stream, own_stream) = if stream.is_null() {
                let mut s: sys::CUstream = std::ptr::null_mut();
                check(
                    sys::cuStreamCreate(&mut s, sys::CUstream_flags::CU_STREAM_NON_BLOCKING as u32),
                    "cuStreamCreate",
                )
                .map_err(release)?;
                (s, true)
            } else {
                (stream as sys::CUstream, false)
            };
            Ok(CudaBackend {
                dev,
                ctx,
                stream,
                own_stream,
                info: DeviceInfo {
                    index,
                    name,
                    sm,
                    sm_count,
                    total_mem,
                    memory_pools: pools,
                    ptx_arch,
                },
                loaded: Mutex::new(Loaded::default()),
            })
        }
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The stream every call of this backend is ordered on.
    pub fn stream(&self) -> *mut c_void {
        self.stream as *mut c_void
    }

    /// Makes this backend's context current on the calling thread.
    fn bind(&self) -> Result<()> {
        // SAFETY: ctx is a retained primary context, alive until Drop.
        check(unsafe { sys::cuCtxSetCurrent(self.ctx) }, "cuCtxSetCurrent")
    }

    /// The function of a kernel, loading its PTX module on first use.
    pub fn function(&self, kernel: &str) -> Result<sys::CUfunction> {
        let mut l = self
            .loaded
            .lock()
            .map_err(|_| Error::internal("CUDA module cache lock poisoned"))?;
        if let Some(&f) = l.functions.get(kernel) {
            return Ok(f);
        }
        let m = modules::module_for_kernel(kernel, self.info.sm).ok_or_else(|| {
            Error::internal(format!(
                "kernel '{kernel}' has no PTX for sm_{}",
                self.info.sm
            ))
        })?;
        let module = match l.modules.get(m.stem) {
            Some(&h) => h,
            None => {
                let mut h: sys::CUmodule = std::ptr::null_mut();
                // SAFETY: m.text is NUL-terminated PTX embedded in the binary; the driver copies it.
                check(
                    unsafe { sys::cuModuleLoadData(&mut h, m.text.as_ptr() as *const c_void) },
                    &format!("loading PTX {}.compute_{} (JIT)", m.stem, m.arch),
                )?;
                l.modules.insert(m.stem, h);
                h
            }
        };
        let cname = std::ffi::CString::new(kernel)
            .map_err(|_| Error::internal("kernel name contains NUL"))?;
        let mut f: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: module is loaded and alive until Drop; cname is NUL-terminated.
        check(
            unsafe { sys::cuModuleGetFunction(&mut f, module, cname.as_ptr()) },
            &format!("kernel '{kernel}'"),
        )?;
        l.functions.insert(kernel.to_string(), f);
        Ok(f)
    }

    fn launch(&self, kernel: &str, g: Geometry, params: &LinearParams) -> Result<()> {
        let f = self.function(kernel)?;
        let mut p = *params;
        let mut args = [&mut p as *mut LinearParams as *mut c_void];
        // SAFETY: the kernel takes one LinearParams by value (layout mirrored and tested); the
        // driver copies it at launch. Every pointer inside was checked by LinearProblem::check
        // and `device_accessible`, and the scratch it points into is freed stream-ordered after.
        check(
            unsafe {
                sys::cuLaunchKernel(
                    f,
                    g.grid.0,
                    g.grid.1,
                    g.grid.2,
                    g.block.0,
                    g.block.1,
                    g.block.2,
                    g.shared_bytes,
                    self.stream,
                    args.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            },
            &format!("launching {kernel}"),
        )
    }

    /// Can the GPU read `ptr` (device, managed or mapped pinned memory)?
    pub fn device_accessible(&self, ptr: *const u8) -> bool {
        let mut ty: u32 = 0;
        // SAFETY: a query; an unknown (plain host) pointer is an error result, not UB.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                &mut ty as *mut u32 as *mut c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                ptr as sys::CUdeviceptr,
            )
        };
        r == sys::CUresult::CUDA_SUCCESS
    }

    /// Stream-ordered allocation (or a plain one where the driver has no memory pools).
    fn alloc_scratch(&self, bytes: usize) -> Result<sys::CUdeviceptr> {
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: out-param owned here; the context is current.
        unsafe {
            if self.info.memory_pools {
                check(
                    sys::cuMemAllocAsync(&mut p, bytes, self.stream),
                    &format!("allocating {bytes} bytes of scratch"),
                )?;
            } else {
                check(
                    sys::cuMemAlloc_v2(&mut p, bytes),
                    &format!("allocating {bytes} bytes of scratch"),
                )?;
            }
        }
        Ok(p)
    }

    fn free_scratch(&self, p: sys::CUdeviceptr) -> Result<()> {
        // SAFETY: p came from alloc_scratch; with pools the free is ordered after the launches
        // on the stream; without, the stream is drained first.
        unsafe {
            if self.info.memory_pools {
                check(sys::cuMemFreeAsync(p, self.stream), "freeing scratch")
            } else {
                check(sys::cuStreamSynchronize(self.stream), "cuStreamSynchronize")?;
                check(sys::cuMemFree_v2(p), "freeing scratch")
            }
        }
    }

    /// The fused linear on the GPU. `p` was checked by `LinearProblem::check`; x, w, bias and y
    /// must be device-accessible; adapter tensors in host memory are uploaded for this call.
    /// Asynchronous on the backend's stream.
    pub fn linear(&self, p: &LinearProblem<'_>, y: &mut MatMut<'_>) -> Result<()> {
        let (m, n, k) = (p.m(), p.n(), p.k());
        launch::check_dims(m, n, k)?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        guard(|| self.linear_inner(p, y))
    }

    fn linear_inner(&self, p: &LinearProblem<'_>, y: &mut MatMut<'_>) -> Result<()> {
        let (m, n, k) = (p.m(), p.n(), p.k());
        self.bind()?;
        let mut operands: Vec<(&str, *const u8, bool)> = vec![
            ("x", p.x.as_ptr(), k > 0),
            ("w", p.w.as_ptr(), k > 0),
            ("y", y.as_ref().as_ptr(), true),
        ];
        if let Some(b) = &p.bias {
            operands.push(("bias", b.as_ptr(), true));
        }
        for (name, ptr, used) in operands {
            if used && !self.device_accessible(ptr) {
                return Err(Error::invalid(format!(
                    "{name}: data is not device memory; a CUDA runtime takes device pointers \
                     (rf_device_alloc + rf_copy_to_device)"
                )));
            }
        }

        let present: Vec<bool> = p.slots.iter().map(|s| s.is_some()).collect();
        let grouping = launch::group_rows(m, &present, p.row_slot)?;
        let slots: Vec<&Slot<'_>> = grouping
            .active
            .iter()
            .filter_map(|&s| p.slots[s].as_ref())
            .collect();
        let ranks: Vec<usize> = slots.iter().map(|s| s.rank()).collect();
        let (offs, total_rank) = launch::rank_offsets(&ranks)?;

        // Adapter tensors not on the device are copied into this call's scratch.
        let mut uploads: Vec<MatRef<'_>> = Vec::new();
        let mut slot_uploads: Vec<[Option<usize>; 3]> = Vec::with_capacity(slots.len());
        for s in &slots {
            let mut idx = [None; 3];
            let mats = [Some(s.a), Some(s.b), s.gains];
            for (j, mat) in mats.iter().enumerate() {
                if let Some(mat) = mat {
                    if !self.device_accessible(mat.as_ptr()) {
                        uploads.push(*mat);
                        idx[j] = Some(uploads.len() - 1);
                    }
                }
            }
            slot_uploads.push(idx);
        }
        let upload_bytes: Vec<usize> = uploads.iter().map(span_bytes).collect();

        let quantized = p.w.dtype.is_quantized();
        if quantized {
            quant::check_w(p.w.as_ptr() as u64, p.w.cols, p.w.ld, p.w.dtype)?;
        }
        let mma_ok = launch::mma_eligible(
            self.info.sm,
            p.x.dtype,
            p.w.dtype,
            p.x.as_ptr() as u64,
            p.x.ld,
            p.w.as_ptr() as u64,
            p.w.ld,
        );
        let path = launch::choose_path(m, mma_ok);
        // Quantized decode splits K for parallelism only (x is staged inside the block); with
        // one split it needs no partial sums.
        let split = match path {
            Path::Decode if quantized => {
                Some(quant::decode_plan(m, n, k, self.info.sm_count)?.split)
            }
            Path::Decode => Some(launch::decode_split(m, n, k, self.info.sm_count)?),
            _ => None,
        };
        let partial_elems = split.map_or(0, |s| {
            if quantized && s.splits == 1 {
                0
            } else {
                s.splits * m * n
            }
        });
        let mixed = grouping.row_slot.is_some();
        let layout = launch::scratch_layout(m, total_rank, mixed, partial_elems, &upload_bytes)?;
        let scratch = if layout.total > 0 {
            self.alloc_scratch(layout.total)?
        } else {
            0
        };
        let result = self.run_linear(
            p,
            y,
            &grouping,
            &slots,
            &offs,
            total_rank,
            &uploads,
            &slot_uploads,
            &layout,
            scratch,
            path,
            split,
        );
        if scratch != 0 {
            let freed = self.free_scratch(scratch);
            result?;
            freed
        } else {
            result
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn run_linear(
        &self,
        p: &LinearProblem<'_>,
        y: &mut MatMut<'_>,
        grouping: &launch::Grouping,
        slots: &[&Slot<'_>],
        offs: &[usize],
        total_rank: usize,
        uploads: &[MatRef<'_>],
        slot_uploads: &[[Option<usize>; 3]],
        layout: &launch::Scratch,
        scratch: sys::CUdeviceptr,
        path: Path,
        split: Option<launch::DecodeSplit>,
    ) -> Result<()> {
        let (m, n, k) = (p.m(), p.n(), p.k());
        let at = |off: usize| scratch + off as sys::CUdeviceptr;
        // Host -> scratch copies. Pageable sources are staged by the driver before the call
        // returns, so the host buffers may change afterwards.
        for (mat, &(off, bytes)) in uploads.iter().zip(&layout.uploads) {
            self.copy_htod_raw(at(off), mat.as_ptr(), bytes)?;
        }
        let mut params = LinearParams {
            x: p.x.as_ptr() as *const c_void,
            w: p.w.as_ptr() as *const c_void,
            bias: p
                .bias
                .map_or(std::ptr::null(), |b| b.as_ptr() as *const c_void),
            y: y.as_mut_ptr() as *mut c_void,
            ldx: p.x.ld as i64,
            ldw: p.w.ld as i64,
            ldy: y.ld as i64,
            ldt: total_rank as i64,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            x_dtype: launch::dtype_code(p.x.dtype),
            w_dtype: launch::dtype_code(p.w.dtype),
            bias_dtype: p.bias.map_or(-1, |b| launch::dtype_code(b.dtype)),
            y_dtype: launch::dtype_code(y.dtype),
            n_slots: slots.len() as i32,
            total_rank: total_rank as i32,
            ..LinearParams::default()
        };
        if total_rank > 0 {
            params.t = at(layout.t) as *mut f32;
            // SAFETY: the T region lies inside the scratch allocation.
            check(
                unsafe { sys::cuMemsetD8Async(at(layout.t), 0, m * total_rank * 4, self.stream) },
                "clearing T",
            )?;
        }
        if let (Some(rs), Some(perm)) = (&grouping.row_slot, &grouping.perm) {
            self.copy_htod_raw(at(layout.row_slot), rs.as_ptr() as *const u8, rs.len() * 4)?;
            self.copy_htod_raw(at(layout.perm), perm.as_ptr() as *const u8, perm.len() * 4)?;
            params.row_slot = at(layout.row_slot) as *const i32;
            params.perm = at(layout.perm) as *const i32;
        }
        let mut max_seg = 0usize;
        for (i, s) in slots.iter().enumerate() {
            let dev_ptr = |idx: Option<usize>, host: *const u8| -> *const c_void {
                match idx {
                    Some(u) => at(layout.uploads[u].0) as *const c_void,
                    None => host as *const c_void,
                }
            };
            let (seg_start, seg_len) = grouping.segments[i];
            max_seg = max_seg.max(seg_len);
            params.slots[i] = SlotParams {
                a: dev_ptr(slot_uploads[i][0], s.a.as_ptr()),
                b: dev_ptr(slot_uploads[i][1], s.b.as_ptr()),
                gains: s.gains.map_or(std::ptr::null(), |g| {
                    dev_ptr(slot_uploads[i][2], g.as_ptr())
                }),
                lda: s.a.ld as i64,
                ldb: s.b.ld as i64,
                rank: s.rank() as i32,
                off: offs[i] as i32,
                a_dtype: launch::dtype_code(s.a.dtype),
                b_dtype: launch::dtype_code(s.b.dtype),
                gains_dtype: s.gains.map_or(-1, |g| launch::dtype_code(g.dtype)),
                seg_start: seg_start as i32,
                seg_len: seg_len as i32,
                scale: s.scale,
            };
        }
        if total_rank > 0 && max_seg > 0 && k > 0 {
            let max_rank = slots.iter().map(|s| s.rank()).max().unwrap_or(0);
            let (g, s) =
                launch::shrink_geometry(max_seg, slots.len(), max_rank, k, self.info.sm_count)?;
            params.shrink_k_chunk = s.k_chunk as i32;
            params.shrink_c_chunks = s.c_chunks as i32;
            self.launch(launch::shrink_kernel(p.x.dtype), g, &params)?;
        }
        if p.w.dtype.is_quantized() {
            let partial = at(layout.partial) as *mut f32;
            return self.run_quant(&mut params, path, partial, (p.w.dtype, y.dtype), (m, n, k));
        }
        match path {
            Path::Decode => {
                let s = split.ok_or_else(|| Error::internal("decode without a split"))?;
                params.partial = at(layout.partial) as *mut f32;
                params.k_chunk = s.k_chunk as i32;
                params.splits = s.splits as i32;
                params.vec_ok =
                    launch::decode_vec_ok(p.w.as_ptr() as u64, p.w.ld, p.w.dtype) as i32;
                let g = launch::decode_geometry(m, n, s)?;
                self.launch(launch::base_kernel(Path::Decode, p.w.dtype)?, g, &params)?;
                let g = launch::epilogue_geometry(m, n)?;
                self.launch(launch::epilogue_kernel(y.dtype), g, &params)
            }
            Path::Mma => {
                let g = launch::mma_geometry(m, n)?;
                self.launch(launch::base_kernel(Path::Mma, p.w.dtype)?, g, &params)
            }
            Path::Tile => {
                let g = launch::tile_geometry(m, n)?;
                self.launch(launch::base_kernel(Path::Tile, p.w.dtype)?, g, &params)
            }
        }
    }

    fn copy_htod_raw(&self, dst: sys::CUdeviceptr, src: *const u8, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: src is valid for `bytes` (a checked view or a live Vec); dst is device memory
        // of at least `bytes`. Pageable sources are staged before the call returns.
        check(
            unsafe { sys::cuMemcpyHtoDAsync_v2(dst, src as *const c_void, bytes, self.stream) },
            "copy to device",
        )
    }

    // ---- device memory for the C ABI and the Rust API --------------------------------------

    /// Allocates `bytes` of device memory (cuMemAlloc; not stream-ordered, usable everywhere).
    pub fn alloc(&self, bytes: usize) -> Result<*mut c_void> {
        self.bind()?;
        let mut p: sys::CUdeviceptr = 0;
        // SAFETY: out-param owned here.
        check(
            unsafe { sys::cuMemAlloc_v2(&mut p, bytes.max(1)) },
            &format!("allocating {bytes} bytes"),
        )?;
        Ok(p as *mut c_void)
    }

    /// Frees memory from `alloc`.
    ///
    /// # Safety
    /// `p` must come from `alloc` of this backend and not be freed twice; no pending work may
    /// still use it (cuMemFree synchronizes with the device).
    pub unsafe fn free(&self, p: *mut c_void) -> Result<()> {
        self.bind()?;
        check(
            sys::cuMemFree_v2(p as sys::CUdeviceptr),
            "freeing device memory",
        )
    }

    /// Copies host -> device, ordered on the stream.
    ///
    /// # Safety
    /// `src` must be readable for `bytes` until the copy completes (synchronize) and `dst`
    /// device memory of at least `bytes`.
    pub unsafe fn copy_to_device(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        bytes: usize,
    ) -> Result<()> {
        self.bind()?;
        if bytes == 0 {
            return Ok(());
        }
        check(
            sys::cuMemcpyHtoDAsync_v2(dst as sys::CUdeviceptr, src, bytes, self.stream),
            "copy to device",
        )
    }

    /// Copies device -> host, ordered on the stream.
    ///
    /// # Safety
    /// `dst` must be writable for `bytes` until the copy completes (synchronize) and `src`
    /// device memory of at least `bytes`.
    pub unsafe fn copy_to_host(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        bytes: usize,
    ) -> Result<()> {
        self.bind()?;
        if bytes == 0 {
            return Ok(());
        }
        check(
            sys::cuMemcpyDtoHAsync_v2(dst, src as sys::CUdeviceptr, bytes, self.stream),
            "copy to host",
        )
    }

    /// Waits for all work on the stream.
    /// `n` f32 read back from device memory at `src` after the work queued before it
    /// (synchronizes).
    ///
    /// # Safety
    /// `src` is device memory holding `n` f32.
    pub(crate) unsafe fn read_f32(&self, src: *const c_void, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        // `out` lives until the synchronize below.
        self.copy_to_host(out.as_mut_ptr() as *mut c_void, src, n * 4)?;
        self.synchronize()?;
        Ok(out)
    }

    pub fn synchronize(&self) -> Result<()> {
        self.bind()?;
        // SAFETY: the stream is alive (ours until Drop, or the host's by contract).
        check(
            unsafe { sys::cuStreamSynchronize(self.stream) },
            "cuStreamSynchronize",
        )
    }

    /// Copies device -> device on the stream (benchmarks measure bandwidth with it).
    ///
    /// # Safety
    /// Both pointers must be device memory of at least `bytes`.
    pub unsafe fn copy_device_to_device(
        &self,
        dst: *mut c_void,
        src: *const c_void,
        bytes: usize,
    ) -> Result<()> {
        self.bind()?;
        check(
            sys::cuMemcpyDtoDAsync_v2(
                dst as sys::CUdeviceptr,
                src as sys::CUdeviceptr,
                bytes,
                self.stream,
            ),
            "copy device to device",
        )
    }

    /// Milliseconds per run of `f` on the stream (CUDA events), over `iters` runs after one
    /// warm-up run.
    pub fn time_ms(&self, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        self.bind()?;
        f()?;
        let mut ev = [std::ptr::null_mut(); 2];
        // SAFETY: events are created, recorded on our stream and destroyed here.
        unsafe {
            for e in ev.iter_mut() {
                check(sys::cuEventCreate(e, 0), "cuEventCreate")?;
            }
            let run = (|| -> Result<f32> {
                check(sys::cuEventRecord(ev[0], self.stream), "cuEventRecord")?;
                for _ in 0..iters.max(1) {
                    f()?;
                }
                check(sys::cuEventRecord(ev[1], self.stream), "cuEventRecord")?;
                check(sys::cuEventSynchronize(ev[1]), "cuEventSynchronize")?;
                let mut ms = 0f32;
                check(
                    sys::cuEventElapsedTime(&mut ms, ev[0], ev[1]),
                    "cuEventElapsedTime",
                )?;
                Ok(ms)
            })();
            for e in ev {
                sys::cuEventDestroy_v2(e);
            }
            Ok(run? as f64 / iters.max(1) as f64)
        }
    }

    /// Uploads host bytes (e.g. a tensor inside a memory-mapped safetensors file) through
    /// pinned staging buffers, double-buffered so reading the file overlaps the DMA. Returns
    /// when the data is on the device.
    pub fn upload(&self, src: &[u8]) -> Result<DeviceBuffer<'_>> {
        let buf = DeviceBuffer {
            ptr: self.alloc(src.len())?,
            bytes: src.len(),
            backend: self,
        };
        guard(|| self.upload_into(buf.ptr, src))?;
        Ok(buf)
    }

    fn upload_into(&self, dst: *mut c_void, src: &[u8]) -> Result<()> {
        self.upload_pieces(&[(dst as sys::CUdeviceptr, src)])
    }

    /// Copies each `(dst, src)` host range to device memory at `dst` through two pinned staging
    /// buffers, double-buffered so reading the source (e.g. a memory-mapped file) overlaps the
    /// DMA; the buffers are shared by all pieces (one pinned allocation per call, not per
    /// piece). Ordered on the stream after earlier work; returns when the data is on the device.
    pub(crate) fn upload_pieces(&self, pieces: &[(sys::CUdeviceptr, &[u8])]) -> Result<()> {
        const CHUNK: usize = 8 << 20;
        let lens: Vec<usize> = pieces.iter().map(|p| p.1.len()).collect();
        let largest = lens.iter().copied().max().unwrap_or(0);
        if largest == 0 {
            return Ok(());
        }
        self.bind()?;
        let chunk = CHUNK.min(largest);
        let plan = crate::backend::placement::staging_chunks(&lens, chunk);
        let mut staging = [std::ptr::null_mut::<c_void>(); 2];
        let mut events = [std::ptr::null_mut(); 2];
        let result = (|| -> Result<()> {
            // SAFETY: pinned buffers and events are created here and destroyed below, after the
            // stream has drained; each copy reads a staging buffer only after the event of its
            // previous use has completed. Every piece's `dst` is device memory of at least its
            // source's length (the caller's contract).
            unsafe {
                for i in 0..2 {
                    check(
                        sys::cuMemHostAlloc(&mut staging[i], chunk, 0),
                        "pinned staging",
                    )?;
                    check(
                        sys::cuEventCreate(
                            &mut events[i],
                            sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32,
                        ),
                        "cuEventCreate",
                    )?;
                }
                for (i, &(piece, off, len)) in plan.iter().enumerate() {
                    let b = i % 2;
                    if i >= 2 {
                        check(sys::cuEventSynchronize(events[b]), "cuEventSynchronize")?;
                    }
                    let (dst, src) = pieces[piece];
                    std::ptr::copy_nonoverlapping(
                        src.as_ptr().add(off),
                        staging[b] as *mut u8,
                        len,
                    );
                    check(
                        sys::cuMemcpyHtoDAsync_v2(
                            dst + off as sys::CUdeviceptr,
                            staging[b],
                            len,
                            self.stream,
                        ),
                        "copy to device",
                    )?;
                    check(sys::cuEventRecord(events[b], self.stream), "cuEventRecord")?;
                }
                Ok(())
            }
        })();
        // SAFETY: drain the stream before releasing the staging buffers the copies read.
        let drained = check(unsafe { sys::cuStreamSynchronize(self.stream) }, "upload");
        for i in 0..2 {
            // SAFETY: created above (or NULL, skipped); no copy uses them any more.
            unsafe {
                if !staging[i].is_null() {
                    sys::cuMemFreeHost(staging[i]);
                }
                if !events[i].is_null() {
                    sys::cuEventDestroy_v2(events[i]);
                }
            }
        }
        result.and(drained)
    }

    /// Copies a host matrix view (row by row span, same ld) to the device.
    pub fn upload_matrix(&self, m: MatRef<'_>) -> Result<DeviceMatrix<'_>> {
        let bytes = span_bytes(&m);
        // SAFETY: the view covers `bytes` bytes from its pointer (checked when it was made).
        let src = unsafe { std::slice::from_raw_parts(m.as_ptr(), bytes) };
        Ok(DeviceMatrix {
            buf: self.upload(src)?,
            dtype: m.dtype,
            rows: m.rows,
            cols: m.cols,
            ld: m.ld,
        })
    }

    /// Uploads one LoRA module at rank `rank` (0 = its current rank) so later calls read it from
    /// device memory instead of copying it per call.
    pub fn upload_lora(&self, lora: &crate::adapter::Lora, rank: usize) -> Result<DeviceLora<'_>> {
        let r = lora.resolve_rank(rank)?;
        Ok(DeviceLora {
            a: self.upload_matrix(lora.a_view(r))?,
            b: self.upload_matrix(lora.b_view(r))?,
            scale: lora.scale_at(r),
            module: lora.name.clone(),
        })
    }

    /// JSON facts for `rf_runtime_info`.
    pub fn info_json(&self) -> serde_json::Value {
        serde_json::json!({
            "index": self.info.index,
            "name": self.info.name,
            "sm": self.info.sm,
            "sm_count": self.info.sm_count,
            "total_mem": self.info.total_mem,
            "memory_pools": self.info.memory_pools,
            "ptx": format!("compute_{}", self.info.ptx_arch),
            "own_stream": self.own_stream,
        })
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        // SAFETY: handles were created by this backend; errors at teardown are ignored (the
        // driver may already be shutting down at process exit).
        unsafe {
            if sys::cuCtxSetCurrent(self.ctx) == sys::CUresult::CUDA_SUCCESS {
                sys::cuStreamSynchronize(self.stream);
                if let Ok(l) = self.loaded.get_mut() {
                    for (_, &m) in l.modules.iter() {
                        sys::cuModuleUnload(m);
                    }
                }
                if self.own_stream {
                    sys::cuStreamDestroy_v2(self.stream);
                }
            }
            sys::cuDevicePrimaryCtxRelease_v2(self.dev);
        }
    }
}

/// An f32 slice's bytes (for uploads).
pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding; any bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn span_bytes(m: &MatRef<'_>) -> usize {
    crate::matrix::span_bytes(m.rows, m.cols, m.ld, m.dtype).unwrap_or(0)
}

/// Device memory owned by Rust code; freed on drop.
pub struct DeviceBuffer<'a> {
    ptr: *mut c_void,
    bytes: usize,
    backend: &'a CudaBackend,
}

impl DeviceBuffer<'_> {
    pub fn as_ptr(&self) -> *mut c_void {
        self.ptr
    }
    pub fn len(&self) -> usize {
        self.bytes
    }
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }
}

impl Drop for DeviceBuffer<'_> {
    fn drop(&mut self) {
        // SAFETY: ptr came from backend.alloc and is freed once; cuMemFree waits for the device.
        let _ = unsafe { self.backend.free(self.ptr) };
    }
}

/// A matrix in device memory.
pub struct DeviceMatrix<'a> {
    pub buf: DeviceBuffer<'a>,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

impl DeviceMatrix<'_> {
    /// A view over the device memory (for a CUDA runtime's `linear`; never dereference it on
    /// the host).
    pub fn view(&self) -> MatRef<'_> {
        // SAFETY: the view is only handed to the CUDA backend, which passes the pointer to
        // kernels; the buffer covers the span and lives as long as the view.
        unsafe {
            MatRef::from_raw(
                self.buf.as_ptr() as *const u8,
                self.dtype,
                self.rows,
                self.cols,
                self.ld,
            )
        }
    }
}

/// A LoRA module resident on the device.
pub struct DeviceLora<'a> {
    pub a: DeviceMatrix<'a>,
    pub b: DeviceMatrix<'a>,
    pub scale: f32,
    pub module: String,
}

impl DeviceLora<'_> {
    pub fn slot(&self, scale_mult: f32) -> Slot<'_> {
        Slot {
            a: self.a.view(),
            b: self.b.view(),
            scale: self.scale * scale_mult,
            gains: None,
            module: &self.module,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without a driver (this machine, CI) opening a device is a DEVICE error, never a panic.
    #[test]
    fn no_driver_is_a_device_error() {
        if driver_present() {
            println!("skipped: a CUDA driver is present on this machine");
            return;
        }
        let e = CudaBackend::new(0, std::ptr::null_mut())
            .err()
            .expect("error");
        assert_eq!(e.status, Status::Device);
        assert!(e.message.contains("libcuda"), "{}", e.message);
        assert_eq!(device_count().unwrap_err().status, Status::Device);
    }
}
