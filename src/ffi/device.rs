//! Device memory for CUDA runtimes: allocate, free, copy (asynchronous on the runtime's stream)
//! and synchronize. Always exported; without feature `cuda` they return RF_STATUS_UNSUPPORTED,
//! and on a CPU runtime the memory functions return RF_STATUS_INVALID_ARGUMENT.

use super::boundary::{arg_out, arg_ref};
use super::error::rf_error;
use super::handles::rf_runtime;
use crate::error::{Error, Result};
use std::ffi::c_void;

#[cfg(feature = "cuda")]
fn cuda_of<'a>(rt: &'a rf_runtime, what: &str) -> Result<&'a crate::backend::cuda::CudaBackend> {
    rt.inner.cuda().ok_or_else(|| {
        Error::invalid(format!(
            "{what}: rt is a CPU runtime; device memory needs a runtime made with RF_DEVICE_CUDA"
        ))
    })
}

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>(what: &str) -> Result<T> {
    Err(Error::unsupported(format!(
        "{what}: this build of rankfuse has no CUDA backend (build with feature 'cuda')"
    )))
}

/// Allocates `bytes` of device memory on the runtime's GPU; `*out` receives the device pointer.
/// The caller owns it and frees it with `rf_device_free` on the same runtime. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_device_alloc(
    rt: *mut rf_runtime,
    bytes: usize,
    out: *mut *mut c_void,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let out = arg_out(out, "out")?;
        #[cfg(feature = "cuda")]
        {
            let p = cuda_of(rt, "rf_device_alloc")?.alloc(bytes)?;
            *out = p;
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (rt, out, bytes);
            no_cuda("rf_device_alloc")
        }
    })
}

/// Frees memory from `rf_device_alloc`; NULL is accepted. Waits for work still using it (the
/// driver synchronizes). Thread-safe, but a pointer must be freed once.
#[no_mangle]
pub unsafe extern "C" fn rf_device_free(rt: *mut rf_runtime, ptr: *mut c_void) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        if ptr.is_null() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            cuda_of(rt, "rf_device_free")?.free(ptr)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rt;
            no_cuda("rf_device_free")
        }
    })
}

/// Copies `bytes` from host `src` to device `dst`, asynchronously on the runtime's stream: keep
/// `src` alive and unchanged until `rf_runtime_synchronize` (pinned memory makes it truly
/// asynchronous). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_copy_to_device(
    rt: *mut rf_runtime,
    dst: *mut c_void,
    src: *const c_void,
    bytes: usize,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        check_ptrs(dst as *const c_void, src, bytes)?;
        #[cfg(feature = "cuda")]
        {
            cuda_of(rt, "rf_copy_to_device")?.copy_to_device(dst, src, bytes)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rt;
            no_cuda("rf_copy_to_device")
        }
    })
}

/// Copies `bytes` from device `src` to host `dst`, asynchronously on the runtime's stream: read
/// `dst` only after `rf_runtime_synchronize`. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_copy_to_host(
    rt: *mut rf_runtime,
    dst: *mut c_void,
    src: *const c_void,
    bytes: usize,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        check_ptrs(dst as *const c_void, src, bytes)?;
        #[cfg(feature = "cuda")]
        {
            cuda_of(rt, "rf_copy_to_host")?.copy_to_host(dst, src, bytes)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rt;
            no_cuda("rf_copy_to_host")
        }
    })
}

/// Waits until all work the runtime queued (rf_linear, copies) is done. On a CPU runtime calls
/// are synchronous and this returns at once. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_runtime_synchronize(rt: *mut rf_runtime) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        #[cfg(feature = "cuda")]
        {
            match rt.inner.cuda() {
                Some(c) => c.synchronize(),
                None => Ok(()),
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = rt;
            Ok(())
        }
    })
}

fn check_ptrs(dst: *const c_void, src: *const c_void, bytes: usize) -> Result<()> {
    if bytes > 0 && dst.is_null() {
        return Err(Error::invalid(format!(
            "argument 'dst' is NULL with bytes = {bytes}"
        )));
    }
    if bytes > 0 && src.is_null() {
        return Err(Error::invalid(format!(
            "argument 'src' is NULL with bytes = {bytes}"
        )));
    }
    Ok(())
}
