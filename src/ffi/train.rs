//! Training exports: create trainable adapters, backward, zero_grad, clipping, AdamW, masks and
//! gains, the DyLoRA rank sampler and ElaLoRA's rank allocator.
//!
//! Thread safety: every function here that takes a non-const `rf_lora *` or `rf_adapter *`
//! changes it and needs exclusive access to it (no other call on that adapter may run at the same
//! time, including `rf_linear` with one of its modules). Different adapters may be trained from
//! different threads at once.

use super::boundary::{arg_out, arg_ref, arg_str};
use super::error::rf_error;
use super::handles::{lora_mut, lora_ref, rf_adapter, rf_lora, rf_runtime};
use super::linear::{read_matrix, read_opt_matrix};
use super::types::*;
use crate::adapter::{Adapter, Lora, Scaling};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::rank::dylora::DyLoraSampler;
use crate::rank::elalora::{ElaLora, ElaLoraOptions};
use crate::train::{self, AdamW, Mode};
use std::ffi::c_char;
use std::ptr::addr_of;

/// Backward modes: which components get gradients.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_backward_mode {
    /// Every active component below the rank in use (LoRA; DyLoRA nested).
    RF_BACKWARD_NESTED = 0,
    /// Only component rank-1 (DyLoRA's released code: lower components frozen).
    RF_BACKWARD_FROZEN = 1,
}

/// Options of the AdamW step. Set `struct_size = sizeof(rf_adamw_options)`. NULL options =
/// torch.optim.AdamW defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8, weight_decay 0.01).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_adamw_options {
    pub struct_size: u32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// Options of ElaLoRA's rank allocator. Set `struct_size = sizeof(rf_elalora_options)`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_elalora_options {
    pub struct_size: u32,
    /// Total active components at the end (the budget); 0 = the starting total.
    pub target_total_rank: u32,
    /// Steps with no rank change at the start and at the end of training.
    pub warmup_steps: u32,
    pub final_steps: u32,
    /// Total training steps.
    pub total_steps: u32,
    /// Steps between two prune/grow rounds.
    pub interval: u32,
    /// Components exchanged per round (pruned, and grown one per module) on top of the budget's
    /// own change.
    pub max_change: u32,
    /// EMA factors (0.85 in the paper).
    pub beta1: f32,
    pub beta2: f32,
    pub seed: u64,
}

/// DyLoRA's truncation-rank sampler (owned; free with `rf_dylora_sampler_free`; not
/// thread-safe).
pub struct rf_dylora_sampler {
    inner: DyLoraSampler,
}

/// ElaLoRA's rank allocator (owned; free with `rf_elalora_free`; not thread-safe).
pub struct rf_elalora {
    inner: ElaLora,
}

fn scaling_from(v: u32) -> Result<Scaling> {
    Scaling::from_raw(v as i64).ok_or_else(|| {
        Error::invalid(format!(
            "scaling = {v} is not an rf_scaling (0 = LORA, 1 = RSLORA, 2 = FIXED)"
        ))
    })
}

fn dtype_from(v: u32) -> Result<DType> {
    DType::from_raw(v as i64).ok_or_else(|| {
        Error::dtype(format!(
            "dtype = {v} is not an rf_dtype (0 = F32, 1 = F16, 2 = BF16)"
        ))
    })
}

/// Checks `struct_size` of an options struct coming from C.
unsafe fn struct_size<T>(p: *const T, size: u32, what: &str) -> Result<()> {
    let _ = p;
    let size = size as usize;
    if size < std::mem::size_of::<T>() || size > 1 << 16 {
        return Err(Error::invalid(format!(
            "{what}->struct_size = {size}; set it to sizeof({what}) = {}",
            std::mem::size_of::<T>()
        )));
    }
    Ok(())
}

unsafe fn read_adamw(p: *const rf_adamw_options) -> Result<AdamW> {
    if p.is_null() {
        return Ok(AdamW::default());
    }
    struct_size(
        p,
        addr_of!((*p).struct_size).read_unaligned(),
        "rf_adamw_options",
    )?;
    let o = AdamW {
        lr: addr_of!((*p).lr).read_unaligned(),
        beta1: addr_of!((*p).beta1).read_unaligned(),
        beta2: addr_of!((*p).beta2).read_unaligned(),
        eps: addr_of!((*p).eps).read_unaligned(),
        weight_decay: addr_of!((*p).weight_decay).read_unaligned(),
    };
    o.check()?;
    Ok(o)
}

/// Creates an empty adapter named `name` to add trainable modules to. The caller owns `*out`
/// (free with `rf_adapter_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_new(
    name: *const c_char,
    out: *mut *mut rf_adapter,
) -> *mut rf_error {
    boundary!({
        let name = arg_str(name, "name")?;
        let out = arg_out(out, "out")?;
        *out = Box::into_raw(Box::new(rf_adapter::new(Adapter::new(name))?));
        Ok(())
    })
}

/// Adds a trainable LoRA module for a linear layer `in_features -> out_features`, allocated at
/// `capacity` components (its rank starts at `capacity`). PEFT's default init: A kaiming-uniform
/// with a = sqrt(5) (U(-1/sqrt(in), 1/sqrt(in))) from `seed`, B = 0. `scaling` is an
/// `rf_scaling` value (FIXED uses alpha / capacity, as AdaLoRA's alpha / r_init), `dtype` an
/// `rf_dtype` value: the compute dtype the forward reads; masters and optimizer state are f32.
/// The module is appended to the adapter's module list (`rf_adapter_module_name` index
/// `count - 1`). `*lora_out` (may be NULL) is borrowed from the adapter. When `a` was loaded on
/// a CUDA runtime that still exists, the new module is uploaded to its device too. Needs
/// exclusive access to `a`.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_add_lora(
    a: *mut rf_adapter,
    module: *const c_char,
    in_features: i64,
    out_features: i64,
    capacity: u32,
    alpha: f32,
    scaling: u32,
    dtype: u32,
    seed: u64,
    lora_out: *mut *mut rf_lora,
) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        let module = arg_str(module, "module")?;
        let scaling = scaling_from(scaling)?;
        let dtype = dtype_from(dtype)?;
        if in_features <= 0 || out_features <= 0 {
            return Err(Error::shape(format!(
                "module '{module}': in_features = {in_features}, out_features = {out_features}: both must be > 0"
            )));
        }
        let l = Lora::new_trainable(
            module,
            in_features as usize,
            out_features as usize,
            capacity as usize,
            alpha,
            scaling,
            dtype,
            seed,
        )?;
        let p = a.add_module(l)?;
        if !lora_out.is_null() {
            *lora_out = p;
        }
        Ok(())
    })
}

/// Turns training on for every module of an adapter (e.g. one loaded with
/// `rf_adapter_load_peft` to resume or fine-tune): tensors become owned copies with f32 masters;
/// rankfuse state saved by `rf_adapter_save_peft` (masks, gains, importance) is restored.
/// Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_train_enable(a: *mut rf_adapter) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        crate::train::resume::enable_all(&mut a.inner)
    })
}

/// Turns on per-component gains E (`B diag(E) A`, AdaLoRA/ElaLoRA), all set to `init`; the
/// fused forward applies them to the shrink output. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_enable_gains(l: *mut rf_lora, init: f32) -> *mut rf_error {
    boundary!({
        let l = lora_mut(l, "l")?;
        l.enable_gains(init)
    })
}

/// Sets the component mask: `mask[c]` != 0 keeps component c, 0 masks it off (no output, no
/// gradient, no update). `n` must equal the capacity. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_set_mask(
    l: *mut rf_lora,
    mask: *const u8,
    n: usize,
) -> *mut rf_error {
    boundary!({
        let l = lora_mut(l, "l")?;
        if mask.is_null() {
            return Err(Error::invalid("argument 'mask' is NULL"));
        }
        if n != l.capacity {
            return Err(Error::shape(format!(
                "module '{}': mask has {n} entries, capacity is {}",
                l.name, l.capacity
            )));
        }
        let m: Vec<bool> = std::slice::from_raw_parts(mask, n)
            .iter()
            .map(|&v| v != 0)
            .collect();
        l.set_mask(&m)
    })
}

/// Writes the component mask (1 = active) into `mask_out[0..n)`, `n` = capacity. Reads only.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_get_mask(
    l: *const rf_lora,
    mask_out: *mut u8,
    n: usize,
) -> *mut rf_error {
    boundary!({
        let l = lora_ref(l, "l")?;
        if mask_out.is_null() {
            return Err(Error::invalid("argument 'mask_out' is NULL"));
        }
        if n != l.capacity {
            return Err(Error::shape(format!(
                "module '{}': mask_out has {n} entries, capacity is {}",
                l.name, l.capacity
            )));
        }
        let out = std::slice::from_raw_parts_mut(mask_out, n);
        match &l.train {
            Some(t) => {
                for (o, &m) in out.iter_mut().zip(&t.mask) {
                    *o = m as u8;
                }
            }
            None => out.fill(1),
        }
        Ok(())
    })
}

/// Views of the module's A (capacity x in) and B (out x capacity) as the forward reads them
/// (compute dtype). Borrowed: valid until the next call that changes the module. Host memory on
/// every runtime (an adapter loaded on a CUDA runtime keeps its host copy as the reference).
#[no_mangle]
pub unsafe extern "C" fn rf_lora_weights(
    l: *const rf_lora,
    a_out: *mut rf_matrix,
    b_out: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({
        let l = lora_ref(l, "l")?;
        let ao = arg_out(a_out, "a_out")?;
        let bo = arg_out(b_out, "b_out")?;
        for (o, v) in [(ao, l.a.view()), (bo, l.b.view())] {
            *o = rf_matrix {
                data: v.as_ptr() as *mut std::ffi::c_void,
                dtype: v.dtype.into(),
                rows: v.rows as i64,
                cols: v.cols as i64,
                ld: v.ld as i64,
            };
        }
        Ok(())
    })
}

/// Replaces the module's A (capacity x in) and B (out x capacity) with copies of `a` and `b`
/// (any dtype, any ld; host memory, also for an adapter on a CUDA runtime); resets its optimizer
/// state. A module with a device copy (adapter loaded on a CUDA runtime) is re-uploaded before
/// this returns. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_set_weights(
    l: *mut rf_lora,
    a: *const rf_matrix,
    b: *const rf_matrix,
) -> *mut rf_error {
    boundary!({
        let l = lora_mut(l, "l")?;
        let ad = read_matrix(a, "a")?;
        let bd = read_matrix(b, "b")?;
        let (av, bv) = (ad.as_ref(), bd.as_ref());
        if av.rows != l.capacity || av.cols != l.in_features {
            return Err(Error::shape(format!(
                "module '{}': a is {} x {}, expected {} x {} (capacity x in)",
                l.name, av.rows, av.cols, l.capacity, l.in_features
            )));
        }
        if bv.rows != l.out_features || bv.cols != l.capacity {
            return Err(Error::shape(format!(
                "module '{}': b is {} x {}, expected {} x {} (out x capacity)",
                l.name, bv.rows, bv.cols, l.out_features, l.capacity
            )));
        }
        l.set_weights(&av.to_f32_vec(), &bv.to_f32_vec())
    })
}

/// Backward of `y = x W^T + scale * ((x A_r^T) ⊙ e) B_r^T` for the layer's output gradient `dy`
/// (m x n): accumulates dA, dB (and dE with gains) into the module's gradient buffers, at rank
/// `rank_or_0` (0 = the module's current rank), `mode` an `rf_backward_mode` value. When `dx` is
/// not NULL writes `dx = dy W + scale * ((dy B_r) ⊙ e) A_r` (m x k, any dtype, its own memory).
/// Masked components get exactly zero gradient. x, w, dy may be f32/f16/bf16; accumulation is
/// f32. Needs exclusive access to `l`; `rt`, `x`, `w`, `dy` are only read.
/// On a CUDA runtime x, w, dy and dx are device pointers and the backward runs on the GPU; the
/// module's gradients stay in host memory (A_r, B_r are copied for the call, the gradients are
/// read back and accumulated); the call returns after the GPU work is done.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_backward(
    rt: *mut rf_runtime,
    l: *mut rf_lora,
    x: *const rf_matrix,
    w: *const rf_matrix,
    dy: *const rf_matrix,
    rank_or_0: u32,
    mode: u32,
    dx: *const rf_matrix,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let l = lora_mut(l, "l")?;
        let xd = read_matrix(x, "x")?;
        let wd = read_matrix(w, "w")?;
        let dyd = read_matrix(dy, "dy")?;
        let mode = Mode::from_raw(mode as i64).ok_or_else(|| {
            Error::invalid(format!(
                "mode = {mode} is not an rf_backward_mode (0 = NESTED, 1 = FROZEN)"
            ))
        })?;
        let dxd = read_opt_matrix(dx, "dx")?;
        let mut dxv = dxd.as_ref().map(|d| d.as_mut());
        crate::training::backward(
            &rt.inner,
            l,
            xd.as_ref(),
            wd.as_ref(),
            dyd.as_ref(),
            rank_or_0 as usize,
            mode,
            dxv.as_mut(),
        )
    })
}

/// Zeroes the module's gradient buffers. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_zero_grad(l: *mut rf_lora) -> *mut rf_error {
    boundary!({
        let l = lora_mut(l, "l")?;
        train::zero_grad(l)
    })
}

/// Zeroes the gradient buffers of every module. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_zero_grad(a: *mut rf_adapter) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        for l in a.inner.modules_mut() {
            train::zero_grad(l)?;
        }
        Ok(())
    })
}

/// Scales all gradients of the adapter so their global L2 norm is at most `max_norm` (as
/// torch.nn.utils.clip_grad_norm_); `*norm_out` (may be NULL) gets the norm before clipping.
/// A non-finite norm leaves the gradients unchanged. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_clip_grad_norm(
    a: *mut rf_adapter,
    max_norm: f32,
    norm_out: *mut f64,
) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        let n = train::clip_grad_norm(&mut a.inner, max_norm)?;
        if !norm_out.is_null() {
            *norm_out = n;
        }
        Ok(())
    })
}

/// One AdamW step (bias-corrected per component, decoupled weight decay) on the components that
/// got a gradient since the last zero_grad and are not masked; the rest stay exactly as they
/// are. `opts` NULL = defaults. A NaN/Inf gradient makes it a no-op returning
/// RF_STATUS_NUMERIC naming the module. Does not zero the gradients. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_lora_adamw_step(
    l: *mut rf_lora,
    opts: *const rf_adamw_options,
) -> *mut rf_error {
    boundary!({
        let l = lora_mut(l, "l")?;
        let o = read_adamw(opts)?;
        train::adamw_step(l, &o)
    })
}

/// `rf_lora_adamw_step` on every module, all-or-nothing: a NaN/Inf gradient in any module makes
/// it a no-op returning RF_STATUS_NUMERIC naming that module. Needs exclusive access.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_adamw_step(
    a: *mut rf_adapter,
    opts: *const rf_adamw_options,
) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        let o = read_adamw(opts)?;
        train::adapter_adamw_step(&mut a.inner, &o)
    })
}

/// A DyLoRA sampler: each `rf_dylora_sampler_next` draws b uniform in [r_min, r_max] from
/// `seed`; use the same b for every layer of a step (per-call rank in `rf_linear` and
/// `rf_lora_backward`). The caller owns `*out`.
#[no_mangle]
pub unsafe extern "C" fn rf_dylora_sampler_create(
    seed: u64,
    r_min: u32,
    r_max: u32,
    out: *mut *mut rf_dylora_sampler,
) -> *mut rf_error {
    boundary!({
        let out = arg_out(out, "out")?;
        let s = DyLoraSampler::new(seed, r_min as usize, r_max as usize)?;
        *out = Box::into_raw(Box::new(rf_dylora_sampler { inner: s }));
        Ok(())
    })
}

/// The next truncation rank. Needs exclusive access to the sampler.
#[no_mangle]
pub unsafe extern "C" fn rf_dylora_sampler_next(
    s: *mut rf_dylora_sampler,
    b_out: *mut u32,
) -> *mut rf_error {
    boundary!({
        let s = arg_out(s, "s")?;
        let out = arg_out(b_out, "b_out")?;
        *out = s.inner.sample() as u32;
        Ok(())
    })
}

/// Frees a sampler; NULL is accepted.
#[no_mangle]
pub unsafe extern "C" fn rf_dylora_sampler_free(s: *mut rf_dylora_sampler) {
    boundary_value!((), {
        if !s.is_null() {
            drop(Box::from_raw(s));
        }
    })
}

unsafe fn read_elalora(p: *const rf_elalora_options) -> Result<ElaLoraOptions> {
    if p.is_null() {
        return Err(Error::invalid("argument 'opts' is NULL"));
    }
    struct_size(
        p,
        addr_of!((*p).struct_size).read_unaligned(),
        "rf_elalora_options",
    )?;
    Ok(ElaLoraOptions {
        target_total_rank: addr_of!((*p).target_total_rank).read_unaligned() as usize,
        warmup_steps: addr_of!((*p).warmup_steps).read_unaligned() as usize,
        final_steps: addr_of!((*p).final_steps).read_unaligned() as usize,
        total_steps: addr_of!((*p).total_steps).read_unaligned() as usize,
        interval: addr_of!((*p).interval).read_unaligned() as usize,
        max_change: addr_of!((*p).max_change).read_unaligned() as usize,
        beta1: addr_of!((*p).beta1).read_unaligned(),
        beta2: addr_of!((*p).beta2).read_unaligned(),
        seed: addr_of!((*p).seed).read_unaligned(),
    })
}

/// Prepares ElaLoRA on an adapter whose modules have training and gains enabled: importance
/// state is allocated on every module. The caller owns `*out` (free with `rf_elalora_free`).
/// Needs exclusive access to `a`.
#[no_mangle]
pub unsafe extern "C" fn rf_elalora_create(
    a: *mut rf_adapter,
    opts: *const rf_elalora_options,
    out: *mut *mut rf_elalora,
) -> *mut rf_error {
    boundary!({
        let a = arg_out(a, "a")?;
        let o = read_elalora(opts)?;
        let out = arg_out(out, "out")?;
        let e = ElaLora::new(&mut a.inner, o)?;
        *out = Box::into_raw(Box::new(rf_elalora { inner: e }));
        Ok(())
    })
}

/// Call after the backward of step `step` (0-based) and before the optimizer step: updates the
/// importance EMAs from the gradients and, on schedule, prunes and grows components (new ones
/// are orthogonalized with E = 0, so outputs do not change; resized modules' optimizer state is
/// reset). `*changed_out` (may be NULL) = number of components pruned + grown. Needs exclusive
/// access to `e` and `a`.
#[no_mangle]
pub unsafe extern "C" fn rf_elalora_update(
    e: *mut rf_elalora,
    a: *mut rf_adapter,
    step: u32,
    changed_out: *mut u32,
) -> *mut rf_error {
    boundary!({
        let e = arg_out(e, "e")?;
        let a = arg_out(a, "a")?;
        let n = e.inner.update(&mut a.inner, step as usize)?;
        if !changed_out.is_null() {
            *changed_out = n as u32;
        }
        Ok(())
    })
}

/// Frees an ElaLoRA allocator; NULL is accepted.
#[no_mangle]
pub unsafe extern "C" fn rf_elalora_free(e: *mut rf_elalora) {
    boundary_value!((), {
        if !e.is_null() {
            drop(Box::from_raw(e));
        }
    })
}
