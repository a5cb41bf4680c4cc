//! KRAdapter and EigenLoRAx modules from C: create (trainable), tell the kind, load an
//! EigenLoRAx adapter on its basis, build and save bases. Serving, training and saving go
//! through the same calls as LoRA (`rf_linear`, `rf_lora_backward`, `rf_lora_adamw_step`,
//! `rf_adapter_save_peft`).

use super::algebra::rf_eigen_basis;
use super::boundary::{arg_out, arg_ref, arg_slice, arg_str};
use super::error::rf_error;
use super::handles::{lora_ref, rf_adapter, rf_lora, rf_runtime};
use super::types::*;
use crate::adapter::{Adapter, Kind, Lora};
use crate::error::Error;
use std::ffi::c_char;
use std::path::Path;

/// The kind of a module (`rf_module_kind`). Reads only.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_kind(
    l: *const rf_lora,
    out: *mut rf_module_kind,
) -> *mut rf_error {
    boundary!({
        let l = lora_ref(l, "l")?;
        let out = arg_out(out, "out")?;
        *out = match l.kind {
            Kind::Lora => rf_module_kind::RF_MODULE_KIND_LORA,
            Kind::Kron(_) => rf_module_kind::RF_MODULE_KIND_KRADAPTER,
            Kind::Eigen(_) => rf_module_kind::RF_MODULE_KIND_EIGENLORAX,
        };
        Ok(())
    })
}

/// Adds a trainable KRAdapter module for a linear layer `in_features -> out_features`: m =
/// min(in, out), r = floor(sqrt(m)), d the smallest with r (r + d) >= max(in, out); U (m x r) = 0
/// and V (m x (r + d)) kaiming-uniform (a = 5) from `seed`, so the update is 0 until trained;
/// fixed `scale` (the paper's default is 2). Parameters and masters are f32. `*lora_out` (may
/// be NULL) is borrowed from the adapter. Needs exclusive access to `a`.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_add_kradapter(
    a: *mut rf_adapter,
    module: *const c_char,
    in_features: i64,
    out_features: i64,
    scale: f32,
    seed: u64,
    lora_out: *mut *mut rf_lora,
) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        let module = arg_str(module, "module")?;
        if in_features <= 0 || out_features <= 0 {
            return Err(Error::shape(format!(
                "module '{module}': in_features = {in_features}, out_features = {out_features}: both must be > 0"
            )));
        }
        let l = Lora::new_kron(
            module,
            out_features as usize,
            in_features as usize,
            scale,
            seed,
        )?;
        let p = a.add_module(l)?;
        if !lora_out.is_null() {
            *lora_out = p;
        }
        Ok(())
    })
}

/// Adds a trainable EigenLoRAx module on `basis`'s module `module` (its in/out are the basis'):
/// loadings alpha_A, alpha_B (K x `rank`, K = the basis' components, augmented ones included),
/// alpha_A uniform (+-1/sqrt(K)) from `seed`, alpha_B = 0 (update 0 until trained), fixed
/// `scale`. Training updates the loadings only; the basis stays frozen and shared (the module
/// keeps it alive: `basis` may be freed afterwards). Needs exclusive access to `a`.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_add_eigenlorax(
    a: *mut rf_adapter,
    basis: *const rf_eigen_basis,
    module: *const c_char,
    rank: u32,
    scale: f32,
    seed: u64,
    lora_out: *mut *mut rf_lora,
) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        let b = arg_ref(basis, "basis")?;
        let module = arg_str(module, "module")?;
        if !scale.is_finite() {
            return Err(Error::invalid(format!(
                "module '{module}': scale {scale} is not finite"
            )));
        }
        let bm = b.inner.module_arc(module)?.clone();
        let l = Lora::new_eigen(bm, rank as usize, scale, seed)?;
        let p = a.add_module(l)?;
        if !lora_out.is_null() {
            *lora_out = p;
        }
        Ok(())
    })
}

/// Loads an EigenLoRAx adapter folder (`rf_adapter_save_peft` of EigenLoRAx modules) on
/// `basis`: every module must be in the basis with the fingerprint the folder recorded (a
/// different basis is RF_STATUS_INVALID_ARGUMENT naming the module); a folder of a newer
/// format version is RF_STATUS_UNSUPPORTED. Loadings are f32 copies (small); the basis is
/// shared, not copied. The caller owns `*out` (free with `rf_adapter_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_load_eigenlorax(
    rt: *mut rf_runtime,
    basis: *const rf_eigen_basis,
    dir: *const c_char,
    out: *mut *mut rf_adapter,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let b = arg_ref(basis, "basis")?;
        let dir = arg_str(dir, "dir")?;
        let out = arg_out(out, "out")?;
        let ad = crate::methods::files::load_eigenlorax(Path::new(dir), &b.inner)?;
        *out = Box::into_raw(Box::new(rf_adapter::on_runtime(ad, &rt.inner)?));
        Ok(())
    })
}

/// Writes a basis folder (created if missing): `basis.safetensors` + `adapter_config.json`
/// (`peft_type` EIGENLORAX_BASIS, format version, per-module fingerprints). A hundred adapters
/// on one basis store it once. Reads the basis only.
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_basis_save(
    basis: *const rf_eigen_basis,
    dir: *const c_char,
) -> *mut rf_error {
    boundary!({
        let b = arg_ref(basis, "basis")?;
        let dir = arg_str(dir, "dir")?;
        crate::methods::files::save_basis(&b.inner, Path::new(dir))
    })
}

/// Builds an EigenLoRAx basis from `n` LoRA adapters (the modules present in all of them, same
/// shapes): per module and side the top `components` principal directions of the stacked,
/// centred rank vectors, plus `augment` seeded random orthonormal directions (room for what the
/// adapters never used; trainable loadings cover them too). The caller owns `*out` (free with
/// `rf_eigen_basis_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_basis_build(
    adapters: *const *const rf_adapter,
    n: usize,
    components: u32,
    augment: u32,
    seed: u64,
    out: *mut *mut rf_eigen_basis,
) -> *mut rf_error {
    boundary!({
        let raw = arg_slice(adapters, n, "adapters", "n")?;
        let out = arg_out(out, "out")?;
        let mut refs: Vec<&Adapter> = Vec::with_capacity(n);
        for (i, &p) in raw.iter().enumerate() {
            let a = arg_ref(p, &format!("adapters[{i}]"))?;
            refs.push(&a.inner);
        }
        let inner =
            crate::algebra::eigen::build_refs(&refs, components as usize, augment as usize, seed)?;
        *out = Box::into_raw(Box::new(rf_eigen_basis { inner }));
        Ok(())
    })
}
