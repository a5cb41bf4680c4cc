//! Runtime and version exports.

use super::boundary::{arg_out, arg_ref};
use super::error::rf_error;
use super::handles::rf_runtime;
use super::types::*;
use crate::backend::ActQuant;
use crate::error::Error;
use crate::runtime::{Device, Runtime, RuntimeOptions};
use std::ffi::c_char;
use std::ptr::addr_of;

/// The ABI version this library implements (RF_ABI_VERSION).
#[no_mangle]
pub extern "C" fn rf_abi_version() -> u32 {
    RF_ABI_VERSION
}

/// The library version, "MAJOR.MINOR.PATCH"; a static string.
#[no_mangle]
pub extern "C" fn rf_version() -> *const c_char {
    c"0.1.0".as_ptr()
}

/// Reads options field by field (raw reads: an out-of-range enum from C must not become UB).
unsafe fn read_options(p: *const rf_runtime_options) -> crate::Result<RuntimeOptions> {
    if p.is_null() {
        return Ok(RuntimeOptions::default());
    }
    let size = addr_of!((*p).struct_size).read_unaligned() as usize;
    // The 0.1 layout ended after cuda_stream; fields past `size` keep their defaults.
    let v1 = std::mem::offset_of!(rf_runtime_options, act_quant);
    if size < v1 || size > 1 << 16 {
        return Err(Error::invalid(format!(
            "opts->struct_size = {size}; set it to sizeof(rf_runtime_options) = {}",
            std::mem::size_of::<rf_runtime_options>()
        )));
    }
    let has = |end: usize| size >= end;
    let act_quant = if has(v1 + 4) {
        match (addr_of!((*p).act_quant) as *const i32).read_unaligned() {
            0 => ActQuant::Exact,
            1 => ActQuant::Q8,
            a => {
                return Err(Error::invalid(format!(
                    "opts->act_quant = {a} is not an rf_act_quant"
                )))
            }
        }
    } else {
        ActQuant::Exact
    };
    let device = match (addr_of!((*p).device) as *const i32).read_unaligned() {
        0 => Device::Cpu,
        1 => Device::Cuda,
        d => {
            return Err(Error::invalid(format!(
                "opts->device = {d} is not an rf_device"
            )))
        }
    };
    Ok(RuntimeOptions {
        device,
        device_index: addr_of!((*p).device_index).read_unaligned(),
        num_threads: addr_of!((*p).num_threads).read_unaligned() as usize,
        cuda_stream: addr_of!((*p).cuda_stream).read_unaligned() as usize,
        act_quant,
    })
}

/// Creates a runtime. `opts` NULL = CPU, all cores. The caller owns `*out` and frees it with
/// `rf_runtime_free` after every object made with it. Thread-safe for compute calls.
#[no_mangle]
pub unsafe extern "C" fn rf_runtime_create(
    opts: *const rf_runtime_options,
    out: *mut *mut rf_runtime,
) -> *mut rf_error {
    boundary!({
        let out = arg_out(out, "out")?;
        let o = read_options(opts)?;
        let rt = Runtime::new(o)?;
        *out = Box::into_raw(Box::new(rf_runtime { inner: rt }));
        Ok(())
    })
}

/// Frees a runtime; NULL is accepted.
#[no_mangle]
pub unsafe extern "C" fn rf_runtime_free(rt: *mut rf_runtime) {
    boundary_value!((), {
        if !rt.is_null() {
            drop(Box::from_raw(rt));
        }
    })
}

/// Writes runtime facts as NUL-terminated JSON (version, backend, CPU features detected, kernel
/// variant chosen, threads, GPU). `*len_out` = the JSON's length without the NUL. Call with
/// `buf` NULL to learn the length; a `cap` too small is RF_STATUS_INVALID_ARGUMENT.
#[no_mangle]
pub unsafe extern "C" fn rf_runtime_info(
    rt: *const rf_runtime,
    buf: *mut c_char,
    cap: usize,
    len_out: *mut usize,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let len_out = arg_out(len_out, "len_out")?;
        let json = rt.inner.info_json();
        if !buf.is_null() {
            if cap < json.len() + 1 {
                return Err(Error::invalid(format!(
                    "buf: cap {cap} is too small; {} bytes needed",
                    json.len() + 1
                )));
            }
            std::ptr::copy_nonoverlapping(json.as_ptr(), buf.cast::<u8>(), json.len());
            *buf.add(json.len()) = 0;
        }
        *len_out = json.len();
        Ok(())
    })
}
