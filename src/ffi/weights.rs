//! Weights exports: open safetensors (mapped, zero-copy), list and view tensors.

use super::boundary::{arg_out, arg_ref, arg_str};
use super::error::rf_error;
use super::handles::{c_name, rf_runtime, rf_weights};
use super::types::*;
use crate::error::{Error, Result};
use crate::weights::{OpenMode, Weights};
use std::ffi::c_char;
use std::ptr::addr_of;
use std::sync::Arc;

/// Opens a `*.safetensors` file, a sharded model's `*.safetensors.index.json`, or a GGUF file
/// (recognised by its magic "GGUF", any name; versions 3 and 2; validated completely before
/// use: each failure is RF_STATUS_FORMAT naming the file, tensor or key, and field), memory-mapped
/// (read into memory instead when the environment variable `RANKFUSE_NO_MMAP=1` is set; see
/// `rf_weights_open_ex`). A mapped file that another process truncates while open makes later
/// reads of it fault (SIGBUS): open files that may change with `RF_WEIGHTS_READ`.
/// On a CUDA runtime every tensor `rf_weights_get` can return (F32/F16/BF16, at most 2-D) is
/// uploaded to device memory here, before this returns (one allocation per file, tensors at
/// 256-byte aligned offsets, streamed through pinned staging), so `rf_weights_get` gives device
/// pointers and an RF_STATUS_OUT_OF_MEMORY shows at open, not while serving; see
/// `rf_weights_open_ex` for uploading on first use or keeping host views. The device memory
/// belongs to the weights (not to the runtime): it is freed by `rf_weights_free`, which may come
/// before or after `rf_runtime_free`.
/// The caller owns `*out` (free with `rf_weights_free`); views from `rf_weights_get` stay valid
/// until then. Immutable after opening: safe to share across threads.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_open(
    rt: *mut rf_runtime,
    path: *const c_char,
    out: *mut *mut rf_weights,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let path = arg_str(path, "path")?;
        let out = arg_out(out, "out")?;
        *out = open_handle(&rt.inner, path, OpenMode::from_env(), Upload::AtOpen)?;
        Ok(())
    })
}

/// `rf_weights_open_options.flags`: read the file(s) into memory instead of mapping them. Costs a
/// copy; in exchange a file truncated or rewritten by another process while open cannot fault
/// the host (a mapped file that shrinks makes later reads die with SIGBUS).
pub const RF_WEIGHTS_READ: u32 = 1;

/// `rf_weights_open_options.flags`, CUDA runtimes: upload each tensor on its first
/// `rf_weights_get` (into an allocation of its own) instead of all of them at open. For a
/// process that uses a subset of a checkpoint (one pipeline stage, a few layers); the first
/// `rf_weights_get` of a tensor then waits for its upload. No effect on a CPU runtime.
pub const RF_WEIGHTS_LAZY: u32 = 2;

/// `rf_weights_open_options.flags`, CUDA runtimes: no device copy; `rf_weights_get` gives host
/// views into the file, as on a CPU runtime (for host-side work: inspection, `rf_lora_merge`
/// into a host buffer). Such views cannot be passed to `rf_linear` on a CUDA runtime. No effect
/// on a CPU runtime; together with `RF_WEIGHTS_LAZY` it is RF_STATUS_INVALID_ARGUMENT.
pub const RF_WEIGHTS_HOST: u32 = 4;

/// What happens to the tensors on a CUDA runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upload {
    AtOpen,
    OnFirstGet,
    Never,
}

/// Options of `rf_weights_open_ex`. Set `struct_size = sizeof(rf_weights_open_options)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_weights_open_options {
    pub struct_size: u32,
    /// Bitwise OR of `RF_WEIGHTS_*` flags; 0 = memory-map (the default of `rf_weights_open`).
    pub flags: u32,
}

/// Reads options field by field; unknown flag bits are an error (they may mean something later).
unsafe fn read_open_options(p: *const rf_weights_open_options) -> Result<(OpenMode, Upload)> {
    if p.is_null() {
        return Ok((OpenMode::from_env(), Upload::AtOpen));
    }
    let size = addr_of!((*p).struct_size).read_unaligned() as usize;
    let want = std::mem::size_of::<rf_weights_open_options>();
    if size < want || size > 1 << 16 {
        return Err(Error::invalid(format!(
            "opts->struct_size = {size}; set it to sizeof(rf_weights_open_options) = {want}"
        )));
    }
    let flags = addr_of!((*p).flags).read_unaligned();
    let known = RF_WEIGHTS_READ | RF_WEIGHTS_LAZY | RF_WEIGHTS_HOST;
    if flags & !known != 0 {
        return Err(Error::invalid(format!(
            "opts->flags = {flags:#x} has unknown bits (known: RF_WEIGHTS_READ = \
             {RF_WEIGHTS_READ}, RF_WEIGHTS_LAZY = {RF_WEIGHTS_LAZY}, RF_WEIGHTS_HOST = \
             {RF_WEIGHTS_HOST})"
        )));
    }
    let upload = match (flags & RF_WEIGHTS_LAZY != 0, flags & RF_WEIGHTS_HOST != 0) {
        (true, true) => {
            return Err(Error::invalid(format!(
                "opts->flags = {flags:#x}: RF_WEIGHTS_LAZY and RF_WEIGHTS_HOST exclude each other"
            )))
        }
        (true, false) => Upload::OnFirstGet,
        (false, true) => Upload::Never,
        (false, false) => Upload::AtOpen,
    };
    let mode = if flags & RF_WEIGHTS_READ != 0 {
        OpenMode::Read
    } else {
        OpenMode::Map
    };
    Ok((mode, upload))
}

/// `rf_weights_open` with options: `opts` NULL behaves like `rf_weights_open` (mapped unless the
/// environment variable `RANKFUSE_NO_MMAP=1` is set); `flags & RF_WEIGHTS_READ` reads the
/// file(s) into memory instead of mapping them; on a CUDA runtime `RF_WEIGHTS_LAZY` uploads each
/// tensor on its first `rf_weights_get` and `RF_WEIGHTS_HOST` keeps host views (default: every
/// tensor uploaded at open). Ownership and thread safety as `rf_weights_open`.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_open_ex(
    rt: *mut rf_runtime,
    path: *const c_char,
    opts: *const rf_weights_open_options,
    out: *mut *mut rf_weights,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let path = arg_str(path, "path")?;
        let (mode, upload) = read_open_options(opts)?;
        let out = arg_out(out, "out")?;
        *out = open_handle(&rt.inner, path, mode, upload)?;
        Ok(())
    })
}

fn open_handle(
    rt: &crate::runtime::Runtime,
    path: &str,
    mode: OpenMode,
    upload: Upload,
) -> Result<*mut rf_weights> {
    let w = Weights::open_with(path, mode)?;
    let names = w
        .entries()
        .iter()
        .map(|t| c_name(&t.name, "tensor name"))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| e.context(format!("file '{path}'")))?;
    #[cfg(feature = "cuda")]
    let device = {
        use crate::backend::cuda::resident::DeviceWeights;
        match (rt.cuda_shared(), upload) {
            (Some(c), Upload::AtOpen) => Some(DeviceWeights::upload_all(&c, &w)?),
            (Some(c), Upload::OnFirstGet) => Some(DeviceWeights::lazy(&c, &w)?),
            _ => None,
        }
    };
    #[cfg(not(feature = "cuda"))]
    let _ = (rt, upload);
    let meta = super::meta::CMeta::new(&w).map_err(|e| e.context(format!("file '{path}'")))?;
    Ok(Box::into_raw(Box::new(rf_weights {
        inner: Arc::new(w),
        names,
        meta,
        #[cfg(feature = "cuda")]
        device,
    })))
}

/// Frees weights; NULL is accepted. Views obtained from them become invalid. Device copies
/// (weights opened on a CUDA runtime) are freed here, after the device's queued work.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_free(w: *mut rf_weights) {
    boundary_value!((), {
        if !w.is_null() {
            drop(Box::from_raw(w));
        }
    })
}

/// Number of tensors (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_count(w: *const rf_weights) -> usize {
    boundary_value!(0, { w.as_ref().map_or(0, |w| w.names.len()) })
}

/// Name of tensor `i` (file order), valid until `rf_weights_free`.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_name(
    w: *const rf_weights,
    i: usize,
    name_out: *mut *const c_char,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let out = arg_out(name_out, "name_out")?;
        let n = w.names.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "index {i} is out of range: '{}' has {} tensors",
                w.inner.path().display(),
                w.names.len()
            ))
        })?;
        *out = n.as_ptr();
        Ok(())
    })
}

/// A view of a tensor: 1-D as 1 x n; more than 2 dims is RF_STATUS_FORMAT; a dtype other than
/// F32/F16/BF16/Q8_0/Q4_0/Q4_K/Q6_K is RF_STATUS_UNSUPPORTED. A GGUF tensor with dims [ne0, ne1]
/// (innermost first) is an ne1 x ne0 matrix; a quantized one (RF_DTYPE_Q8_0/Q4_0/Q4_K/Q6_K) is
/// valid only as `w` of `rf_linear`. On a CPU runtime (and with `RF_WEIGHTS_HOST`)
/// `out->data` points into the mapping (zero-copy, read-only memory: do not write through it).
/// On a CUDA runtime it is a device pointer into the weights' device copy (do not write through
/// it either; NULL for a tensor with no elements); with `RF_WEIGHTS_LAZY` the first call for a
/// tensor uploads it (concurrent first calls wait for one upload) and may fail with
/// RF_STATUS_OUT_OF_MEMORY / RF_STATUS_DEVICE, or RF_STATUS_DEVICE when the runtime has been
/// freed. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_get(
    w: *const rf_weights,
    name: *const c_char,
    out: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({
        let w = arg_ref(w, "w")?;
        let name = arg_str(name, "name")?;
        let out = arg_out(out, "out")?;
        let v = w.inner.get(name)?;
        #[allow(unused_mut)]
        let mut data = v.as_ptr() as *mut std::ffi::c_void;
        #[cfg(feature = "cuda")]
        if let Some(d) = &w.device {
            let i = w
                .inner
                .index_of(name)
                .ok_or_else(|| Error::internal(format!("tensor '{name}' has no index")))?;
            data = d.tensor_ptr(&w.inner, i)?;
        }
        *out = rf_matrix {
            data,
            dtype: v.dtype.into(),
            rows: v.rows as i64,
            cols: v.cols as i64,
            ld: v.ld as i64,
        };
        Ok(())
    })
}
