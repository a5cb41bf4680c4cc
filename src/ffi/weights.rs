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

/// Opens a `*.safetensors` file or a sharded model's `*.safetensors.index.json`, memory-mapped
/// (read into memory instead when the environment variable `RANKFUSE_NO_MMAP=1` is set; see
/// `rf_weights_open_ex`). A mapped file that another process truncates while open makes later
/// reads of it fault (SIGBUS): open files that may change with `RF_WEIGHTS_READ`.
/// The caller owns `*out` (free with `rf_weights_free`); views from `rf_weights_get` stay valid
/// until then. Immutable after opening: safe to share across threads.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_open(
    rt: *mut rf_runtime,
    path: *const c_char,
    out: *mut *mut rf_weights,
) -> *mut rf_error {
    boundary!({
        let _rt = arg_ref(rt, "rt")?;
        let path = arg_str(path, "path")?;
        let out = arg_out(out, "out")?;
        *out = open_handle(path, OpenMode::from_env())?;
        Ok(())
    })
}

/// `rf_weights_open_options.flags`: read the file(s) into memory instead of mapping them. Costs a
/// copy; in exchange a file truncated or rewritten by another process while open cannot fault
/// the host (a mapped file that shrinks makes later reads die with SIGBUS).
pub const RF_WEIGHTS_READ: u32 = 1;

/// Options of `rf_weights_open_ex`. Set `struct_size = sizeof(rf_weights_open_options)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_weights_open_options {
    pub struct_size: u32,
    /// Bitwise OR of `RF_WEIGHTS_*` flags; 0 = memory-map (the default of `rf_weights_open`).
    pub flags: u32,
}

/// Reads options field by field; unknown flag bits are an error (they may mean something later).
unsafe fn read_open_options(p: *const rf_weights_open_options) -> Result<OpenMode> {
    if p.is_null() {
        return Ok(OpenMode::from_env());
    }
    let size = addr_of!((*p).struct_size).read_unaligned() as usize;
    let want = std::mem::size_of::<rf_weights_open_options>();
    if size < want || size > 1 << 16 {
        return Err(Error::invalid(format!(
            "opts->struct_size = {size}; set it to sizeof(rf_weights_open_options) = {want}"
        )));
    }
    let flags = addr_of!((*p).flags).read_unaligned();
    if flags & !RF_WEIGHTS_READ != 0 {
        return Err(Error::invalid(format!(
            "opts->flags = {flags:#x} has unknown bits (known: RF_WEIGHTS_READ = {RF_WEIGHTS_READ})"
        )));
    }
    Ok(if flags & RF_WEIGHTS_READ != 0 {
        OpenMode::Read
    } else {
        OpenMode::Map
    })
}

/// `rf_weights_open` with options: `opts` NULL behaves like `rf_weights_open` (mapped unless the
/// environment variable `RANKFUSE_NO_MMAP=1` is set); `flags & RF_WEIGHTS_READ` reads the
/// file(s) into memory instead of mapping them. Ownership and thread safety as
/// `rf_weights_open`.
#[no_mangle]
pub unsafe extern "C" fn rf_weights_open_ex(
    rt: *mut rf_runtime,
    path: *const c_char,
    opts: *const rf_weights_open_options,
    out: *mut *mut rf_weights,
) -> *mut rf_error {
    boundary!({
        let _rt = arg_ref(rt, "rt")?;
        let path = arg_str(path, "path")?;
        let mode = read_open_options(opts)?;
        let out = arg_out(out, "out")?;
        *out = open_handle(path, mode)?;
        Ok(())
    })
}

fn open_handle(path: &str, mode: OpenMode) -> Result<*mut rf_weights> {
    let w = Weights::open_with(path, mode)?;
    let names = w
        .entries()
        .iter()
        .map(|t| c_name(&t.name, "tensor name"))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| e.context(format!("file '{path}'")))?;
    Ok(Box::into_raw(Box::new(rf_weights {
        inner: Arc::new(w),
        names,
    })))
}

/// Frees weights; NULL is accepted. Views obtained from them become invalid.
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

/// A zero-copy view of a tensor: 1-D as 1 x n; more than 2 dims is RF_STATUS_FORMAT; a dtype
/// other than F32/F16/BF16 is RF_STATUS_UNSUPPORTED. `out->data` points into the mapping
/// (read-only memory: do not write through it).
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
        *out = rf_matrix {
            data: v.as_ptr() as *mut std::ffi::c_void,
            dtype: v.dtype.into(),
            rows: v.rows as i64,
            cols: v.cols as i64,
            ld: v.ld as i64,
        };
        Ok(())
    })
}
