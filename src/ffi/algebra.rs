//! Adapter algebra exports: PHLoRA extraction to a PEFT folder, merge / unmerge into a caller's
//! weight buffer.

use super::boundary::{arg_out, arg_ref, arg_slice, arg_str};
use super::error::rf_error;
use super::handles::{lora_ref, rf_lora, rf_runtime};
use super::linear::{read_matrix, read_opt_matrix};
use super::types::*;
use crate::algebra::extract::{self, ExtractOptions, RankRule};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::weights::Weights;
use std::ffi::{c_char, c_void, CString};
use std::path::Path;
use std::ptr::addr_of;
use std::sync::Mutex;

/// Options of `rf_extract_peft`. Fill with `rf_extract_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_extract_options {
    /// sizeof(rf_extract_options).
    pub struct_size: u32,
    /// A fixed rank for every layer; 0 = choose by `energy`.
    pub rank: u32,
    /// With rank == 0: the smallest rank whose energy sum(s_i^2) / ||dW||_F^2 reaches this,
    /// 0 < energy <= 1 (default 0.90).
    pub energy: f64,
    /// Rank cap per layer (default 128).
    pub max_rank: u32,
    /// Nonzero: write rsLoRA (lora_alpha = sqrt(r)); else LoRA (lora_alpha = r). Scale 1 either way.
    pub rslora: u32,
    /// Comma-separated module globs ('*' crosses dots); NULL or "" = every 2-D ".weight".
    pub modules: *const c_char,
    /// dtype of the written A and B (default F32).
    pub dtype: rf_dtype,
    /// Randomized SVD: oversampling columns (default 20) and power iterations (default 7).
    pub oversample: u32,
    pub power_iters: u32,
    /// Seed of the Gaussian sketch.
    pub seed: u64,
    /// Layers processed at once; 0 = the runtime's threads. Each holds its dW in f32.
    pub threads: u32,
    /// Nonzero: also write energy.svg.
    pub write_svg: u32,
}

/// Progress of a long call: `done` of `total` steps finished, `what` = the tensor just done
/// (valid during the call only). Called from worker threads, never two calls at once.
pub type rf_progress_fn =
    Option<unsafe extern "C" fn(user: *mut c_void, done: usize, total: usize, what: *const c_char)>;

/// Fills `*out` with the defaults (struct_size set, energy 0.90, max_rank 128, F32, ...).
#[no_mangle]
pub unsafe extern "C" fn rf_extract_options_default(out: *mut rf_extract_options) -> *mut rf_error {
    boundary!({
        let out = arg_out(out, "out")?;
        let d = ExtractOptions::default();
        *out = rf_extract_options {
            struct_size: std::mem::size_of::<rf_extract_options>() as u32,
            rank: 0,
            energy: 0.90,
            max_rank: d.max_rank as u32,
            rslora: 0,
            modules: std::ptr::null(),
            dtype: rf_dtype::RF_DTYPE_F32,
            oversample: d.oversample as u32,
            power_iters: d.power_iters as u32,
            seed: d.seed,
            threads: 0,
            write_svg: 0,
        };
        Ok(())
    })
}

/// Reads options field by field (raw reads: a bad enum number from C must not become UB).
unsafe fn read_extract_options(
    p: *const rf_extract_options,
    threads: usize,
) -> Result<(ExtractOptions, bool)> {
    let mut o = ExtractOptions {
        threads,
        ..Default::default()
    };
    if p.is_null() {
        return Ok((o, false));
    }
    let size = addr_of!((*p).struct_size).read_unaligned() as usize;
    if size < std::mem::size_of::<rf_extract_options>() || size > 1 << 16 {
        return Err(Error::invalid(format!(
            "opts->struct_size = {size}; set it to sizeof(rf_extract_options) = {} (rf_extract_options_default does)",
            std::mem::size_of::<rf_extract_options>()
        )));
    }
    let rank = addr_of!((*p).rank).read_unaligned() as usize;
    let energy = addr_of!((*p).energy).read_unaligned();
    o.rule = if rank > 0 {
        RankRule::Fixed(rank)
    } else {
        RankRule::Energy(energy)
    };
    o.max_rank = addr_of!((*p).max_rank).read_unaligned() as usize;
    o.rslora = addr_of!((*p).rslora).read_unaligned() != 0;
    let modules = addr_of!((*p).modules).read_unaligned();
    if !modules.is_null() {
        o.modules = vec![arg_str(modules, "opts->modules")?.to_string()];
    }
    let raw = (addr_of!((*p).dtype) as *const i32).read_unaligned();
    o.dtype = DType::from_raw(raw as i64)
        .ok_or_else(|| Error::dtype(format!("opts->dtype = {raw} is not an rf_dtype")))?;
    o.oversample = addr_of!((*p).oversample).read_unaligned() as usize;
    o.power_iters = addr_of!((*p).power_iters).read_unaligned() as usize;
    o.seed = addr_of!((*p).seed).read_unaligned();
    let t = addr_of!((*p).threads).read_unaligned() as usize;
    if t > 0 {
        o.threads = t;
    }
    let svg = addr_of!((*p).write_svg).read_unaligned() != 0;
    Ok((o, svg))
}

struct Callback {
    f: unsafe extern "C" fn(*mut c_void, usize, usize, *const c_char),
    user: *mut c_void,
}
// SAFETY: the caller of rf_extract_peft promises `user` may be used from worker threads; calls
// are serialized by the Mutex around the Callback.
unsafe impl Send for Callback {}

/// PHLoRA: extracts a LoRA adapter from a full fine-tune. For every 2-D `<module>.weight` in both
/// `base_path` and `tuned_path` (safetensors files or `.safetensors.index.json`) with the same
/// shape and matching `opts->modules`, dW = W_tuned - W_base is factored by a randomized
/// truncated SVD; B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T. Writes a PEFT folder (rank_pattern /
/// alpha_pattern) plus extract_report.json / .md to `out_dir` (created if missing).
/// `opts` NULL = defaults. `progress` may be NULL; it is called once per layer, from worker
/// threads, one call at a time, with `user`. Weights are read layer by layer from memory maps.
/// Errors name the tensor (missing from tuned, shapes differ, more than 2 dims). Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_extract_peft(
    rt: *mut rf_runtime,
    base_path: *const c_char,
    tuned_path: *const c_char,
    opts: *const rf_extract_options,
    progress: rf_progress_fn,
    user: *mut c_void,
    out_dir: *const c_char,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let base_path = arg_str(base_path, "base_path")?;
        let tuned_path = arg_str(tuned_path, "tuned_path")?;
        let out_dir = arg_str(out_dir, "out_dir")?;
        let (o, svg) = read_extract_options(opts, rt.inner.threads())?;
        o.check().map_err(|e| e.context("opts"))?;
        let base = Weights::open(base_path)?;
        let tuned = Weights::open(tuned_path)?;
        let cb = Mutex::new(progress.map(|f| Callback { f, user }));
        let report = |done: usize, total: usize, what: &str| {
            let g = cb.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(c) = g.as_ref() {
                let name = CString::new(what.replace('\0', "?")).unwrap_or_default();
                // SAFETY: the caller's callback with its own user pointer; `name` lives through
                // the call.
                unsafe { (c.f)(c.user, done, total, name.as_ptr()) };
            }
        };
        let ex = extract::extract(&base, &tuned, &o, &report)?;
        extract::write(&ex, Path::new(out_dir), svg)
    })
}

unsafe fn merge_common(
    rt: *mut rf_runtime,
    lora: *const rf_lora,
    rank: u32,
    scale_mult: f32,
    w_inout: *mut rf_matrix,
    unmerge: bool,
) -> Result<()> {
    let _rt = arg_ref(rt, "rt")?;
    let l = lora_ref(lora, "lora")?;
    let wd = read_matrix(w_inout, "w_inout")?;
    let mut w = wd.as_mut();
    let slot = crate::runtime::slot(l, rank as usize, scale_mult)?;
    // The adapter's tensors must not live inside the buffer being written.
    let (ws, we) = (
        w.as_ref().as_ptr() as usize,
        w.as_ref().as_ptr() as usize
            + crate::matrix::span_bytes(w.rows, w.cols, w.ld, w.dtype).unwrap_or(0),
    );
    for (name, m) in [("lora_A", slot.a), ("lora_B", slot.b)] {
        let s = m.as_ptr() as usize;
        let e = s + crate::matrix::span_bytes(m.rows, m.cols, m.ld, m.dtype).unwrap_or(0);
        if s < we && ws < e {
            return Err(Error::invalid(format!(
                "w_inout overlaps module '{}' {name}",
                l.name
            )));
        }
    }
    crate::algebra::merge::merge_slot_into(&slot, &mut w, if unmerge { -1.0 } else { 1.0 })
}

/// W <- W + scale * B[:, :r] A[:r] in place (r = `rank`, 0 = the lora's current rank; scale =
/// the lora's scale at r times `scale_mult`). `w_inout` is the caller's writable out x in buffer
/// (any dtype, ld >= cols); accumulation is f32, each element rounded once to W's dtype. Shapes
/// that do not match the module are RF_STATUS_SHAPE naming it. Needs exclusive access to the
/// buffer; the lora is only read (other threads may compute with it).
#[no_mangle]
pub unsafe extern "C" fn rf_lora_merge(
    rt: *mut rf_runtime,
    lora: *const rf_lora,
    rank: u32,
    scale_mult: f32,
    w_inout: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({ merge_common(rt, lora, rank, scale_mult, w_inout, false) })
}

/// The inverse of `rf_lora_merge`: W <- W - scale * B[:, :r] A[:r]. Merge then unmerge returns W
/// within one rounding of its dtype per step. Same rules as `rf_lora_merge`.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_unmerge(
    rt: *mut rf_runtime,
    lora: *const rf_lora,
    rank: u32,
    scale_mult: f32,
    w_inout: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({ merge_common(rt, lora, rank, scale_mult, w_inout, true) })
}

/// An EigenLoRAx basis (`rankfuse eigen build` output). Immutable; thread-safe.
pub struct rf_eigen_basis {
    pub(crate) inner: crate::algebra::eigen::Basis,
}

/// An adapter as loadings on an EigenLoRAx basis (`rankfuse eigen project` output). Immutable;
/// thread-safe.
pub struct rf_eigen_adapter {
    inner: crate::algebra::eigen::EigenAdapter,
}

/// Loads a basis: a folder written by `rf_eigen_basis_save` (format version and per-module
/// fingerprints checked) or a file (`<module>.eigen_A` / `<module>.eigen_B`, `rankfuse eigen
/// build`). The caller owns `*out` (free
/// with `rf_eigen_basis_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_basis_load(
    rt: *mut rf_runtime,
    path: *const c_char,
    out: *mut *mut rf_eigen_basis,
) -> *mut rf_error {
    boundary!({
        let _rt = arg_ref(rt, "rt")?;
        let path = arg_str(path, "path")?;
        let out = arg_out(out, "out")?;
        let inner = crate::methods::files::load_basis(Path::new(path))?;
        *out = Box::into_raw(Box::new(rf_eigen_basis { inner }));
        Ok(())
    })
}

/// Frees a basis; NULL is accepted. Adapters loaded against it stay valid (they hold loadings
/// only), but need a live basis for `rf_eigen_linear`.
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_basis_free(b: *mut rf_eigen_basis) {
    boundary_value!((), {
        if !b.is_null() {
            drop(Box::from_raw(b));
        }
    })
}

/// Loads loadings (`<module>.alpha_A` / `<module>.alpha_B`, K x r) and checks them against
/// `basis` (every module present, K equal). The caller owns `*out` (free with
/// `rf_eigen_adapter_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_adapter_load(
    basis: *const rf_eigen_basis,
    path: *const c_char,
    out: *mut *mut rf_eigen_adapter,
) -> *mut rf_error {
    boundary!({
        let b = arg_ref(basis, "basis")?;
        let path = arg_str(path, "path")?;
        let out = arg_out(out, "out")?;
        let name = Path::new(path)
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let inner = crate::algebra::eigen::EigenAdapter::load(Path::new(path), &name)?;
        for m in inner.modules.values() {
            let bm = b.inner.module(&m.name).map_err(|e| e.context(path))?;
            if bm.k() != m.alpha_a.nrows() {
                return Err(Error::shape(format!(
                    "file '{path}': module '{}' has {} components, the basis has {}",
                    m.name,
                    m.alpha_a.nrows(),
                    bm.k()
                )));
            }
        }
        *out = Box::into_raw(Box::new(rf_eigen_adapter { inner }));
        Ok(())
    })
}

/// Frees an eigen adapter; NULL is accepted.
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_adapter_free(a: *mut rf_eigen_adapter) {
    boundary_value!((), {
        if !a.is_null() {
            drop(Box::from_raw(a));
        }
    })
}

/// The dense reconstruction of an eigen adapter as an ordinary adapter (A = alpha_A^T C_A^T,
/// B = C_B alpha_B, F32, fixed scale 1): its modules work in every `rf_linear` slot. The caller owns
/// `*out` (free with `rf_adapter_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_adapter_to_adapter(
    basis: *const rf_eigen_basis,
    a: *const rf_eigen_adapter,
    out: *mut *mut super::handles::rf_adapter,
) -> *mut rf_error {
    boundary!({
        let b = arg_ref(basis, "basis")?;
        let a = arg_ref(a, "a")?;
        let out = arg_out(out, "out")?;
        let ad = a.inner.to_adapter(&b.inner, DType::F32)?;
        *out = Box::into_raw(Box::new(super::handles::rf_adapter::new(ad)?));
        Ok(())
    })
}

/// EigenLoRAx serving for one module: y = x W^T + bias + dy, dy = ((x C_A) core_s) C_B^T with
/// core_s = alpha_A alpha_B^T of the row's eigen adapter. z = x C_A is computed once for all rows and
/// adapters; C_B^T is applied once for all rows. `adapters[s]` (NULL = empty slot) are eigen
/// adapters on `basis`; `row_slot` as in `rf_linear` (NULL = every adapter on every row; -1 = base
/// only). Shapes as in `rf_linear`; y is written in its dtype after f32 accumulation.
/// On a CUDA runtime x, w, bias and y are device pointers (the basis and cores are copied for the
/// call; it returns after the GPU work is done).
/// Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_eigen_linear(
    rt: *mut rf_runtime,
    basis: *const rf_eigen_basis,
    module: *const c_char,
    x: *const rf_matrix,
    w: *const rf_matrix,
    bias: *const rf_matrix,
    adapters: *const *const rf_eigen_adapter,
    n_adapters: usize,
    row_slot: *const i32,
    y: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let b = arg_ref(basis, "basis")?;
        let module = arg_str(module, "module")?;
        let xd = read_matrix(x, "x")?;
        let wd = read_matrix(w, "w")?;
        let bd = read_opt_matrix(bias, "bias")?;
        let yd = read_matrix(y, "y")?;
        let raw = arg_slice(adapters, n_adapters, "adapters", "n_adapters")?;
        let bm = b.inner.module(module)?;
        let mut slots = Vec::with_capacity(n_adapters);
        for (i, &p) in raw.iter().enumerate() {
            match p.as_ref() {
                None => slots.push(None),
                Some(a) => slots.push(Some(a.inner.modules.get(module).ok_or_else(|| {
                    Error::not_found(format!(
                        "adapters[{i}] ('{}') has no module '{module}'",
                        a.inner.name
                    ))
                })?)),
            }
        }
        let rs = if row_slot.is_null() {
            None
        } else {
            Some(std::slice::from_raw_parts(row_slot, xd.rows))
        };
        let mut yv = yd.as_mut();
        crate::algebra::eigen::eigen_linear(
            &rt.inner,
            xd.as_ref(),
            wd.as_ref(),
            bd.as_ref().map(|d| d.as_ref()),
            bm,
            &slots,
            rs,
            &mut yv,
        )
    })
}
