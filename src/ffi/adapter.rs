//! Adapter and LoRA exports: load/save PEFT folders, list modules, info, default rank.

use super::boundary::{arg_out, arg_ref, arg_str};
use super::error::rf_error;
use super::handles::{lora_ref, rf_adapter, rf_lora, rf_runtime};
use super::types::*;
use crate::error::Error;
use std::ffi::c_char;
use std::path::Path;

/// Loads a PEFT LoRA folder (`adapter_config.json` + `adapter_model.safetensors`), or a
/// KRAdapter folder in rankfuse's format (`peft_type` KRADAPTER, docs/formats.md; owned copies).
/// An EigenLoRAx folder needs its basis: `rf_adapter_load_eigenlorax`. Tensors are
/// used in place from the file's mapping (the host copy). On a CUDA runtime every module's A and
/// B are also uploaded to device memory once, here (one allocation per adapter, through pinned
/// staging), and `rf_linear` on that device reads them there instead of copying them per call;
/// the device memory is freed by `rf_adapter_free` (which may come before or after
/// `rf_runtime_free`). An upload failure is an error (RF_STATUS_OUT_OF_MEMORY / RF_STATUS_DEVICE)
/// and `*out` is not written. The caller owns `*out` (free with `rf_adapter_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_load_peft(
    rt: *mut rf_runtime,
    dir: *const c_char,
    out: *mut *mut rf_adapter,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let dir = arg_str(dir, "dir")?;
        let out = arg_out(out, "out")?;
        let a = crate::methods::files::load_any(Path::new(dir))?;
        *out = Box::into_raw(Box::new(rf_adapter::on_runtime(a, &rt.inner)?));
        Ok(())
    })
}

/// Writes the adapter as a PEFT folder (created if missing) that PEFT and rankfuse load back:
/// each module's rank in use becomes its `r` (rank_pattern), alpha is chosen so the scale is
/// unchanged. An adapter of KRAdapter or EigenLoRAx modules is written in that method's folder
/// format (docs/formats.md; EigenLoRAx writes the loadings only, the basis is saved once with
/// `rf_eigen_basis_save`); one adapter holds one kind. Reads the adapter only.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_save_peft(
    a: *const rf_adapter,
    dir: *const c_char,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        let dir = arg_str(dir, "dir")?;
        crate::methods::files::save_any(&a.inner, Path::new(dir))
    })
}

/// Frees an adapter and every `rf_lora` borrowed from it; NULL is accepted. An adapter loaded on
/// a CUDA runtime frees its device memory here after waiting for the device's queued work.
/// An adapter from `rf_store_acquire` is released instead, as by `rf_store_release`: it is freed
/// only with its last holder, so other threads' calls with their acquisitions of it run on.
/// No call may be using `a` itself (this acquisition) when it is freed.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_free(a: *mut rf_adapter) {
    boundary_value!((), {
        if !a.is_null() {
            if (*a).version.id != 0 {
                // Only a store makes versioned adapters, and hands them out as `Arc`s.
                drop(std::sync::Arc::from_raw(a as *const rf_adapter));
            } else {
                drop(Box::from_raw(a));
            }
        }
    })
}

/// Number of modules (0 for NULL).
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_module_count(a: *const rf_adapter) -> usize {
    boundary_value!(0, { a.as_ref().map_or(0, |a| a.inner.len()) })
}

/// Name of module `i` (sorted order), valid until `rf_adapter_free`.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_module_name(
    a: *const rf_adapter,
    i: usize,
    name_out: *mut *const c_char,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        let out = arg_out(name_out, "name_out")?;
        let n = a.names.get(i).ok_or_else(|| {
            Error::invalid(format!(
                "index {i} is out of range: adapter '{}' has {} modules",
                a.inner.name,
                a.names.len()
            ))
        })?;
        *out = n.as_ptr();
        Ok(())
    })
}

/// The module named `module` (the base model's module path). Borrowed: valid as long as the
/// adapter; do not free it.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_module(
    a: *mut rf_adapter,
    module: *const c_char,
    out: *mut *mut rf_lora,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        let module = arg_str(module, "module")?;
        let out = arg_out(out, "out")?;
        *out = a.inner.module_ptr(module)? as *mut rf_lora;
        Ok(())
    })
}

/// Shapes (the weight's in and out, for every kind), capacity (components trained: LoRA's
/// rank capacity, KRAdapter's slices m, EigenLoRAx's loadings rank), rank in use (LoRA:
/// components; EigenLoRAx: basis components; KRAdapter: 1), alpha, the scale at that rank,
/// scaling rule and dtype.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_info_get(
    l: *const rf_lora,
    out: *mut rf_lora_info,
) -> *mut rf_error {
    boundary!({
        let l = lora_ref(l, "l")?;
        let out = arg_out(out, "out")?;
        let r = l.rank();
        let (out_f, in_f) = l.module_dims();
        *out = rf_lora_info {
            in_features: in_f as i64,
            out_features: out_f as i64,
            capacity: l.capacity as u32,
            rank: r as u32,
            alpha: l.alpha,
            scale: l.scale_at(r),
            scaling: l.scaling.into(),
            dtype: l.dtype().into(),
        };
        Ok(())
    })
}

/// Sets the default rank of later calls (1..capacity). Needs exclusive access to the lora: do
/// not call while another thread runs `rf_linear` with it.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_set_rank(l: *mut rf_lora, rank: u32) -> *mut rf_error {
    boundary!({
        let l = lora_ref(l, "l")?;
        l.set_rank(rank as usize)
    })
}
