//! The fused AdamW with its gradient statistics (`kernels/adamw.cu`): the parameter block, the
//! grid, the bias corrections, and the launches on a `DeviceTrain` (gradient statistics, scaling,
//! the step) and `clip_grad_norm` over device modules.

use super::device_state::DeviceTensor;
use super::{check_int_dims, dtype_suffix, rows_grid, DeviceTrain};
use crate::backend::cuda::launch::{dtype_code, Geometry};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::train::AdamW;
use cudarc::driver::sys;
use std::ffi::c_void;

/// Mirrors `struct AdamwParams` in kernels/adamw.cu (128 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AdamwParams {
    pub p: *mut f32,
    pub g: *mut f32,
    pub m: *mut f32,
    pub v: *mut f32,
    pub copy: *mut c_void,
    pub update: *const u8,
    pub bc: *const f32,
    pub sumsq: *mut f64,
    pub bad: *mut u32,
    pub ld: i64,
    pub ld_copy: i64,
    pub rows: i32,
    pub cols: i32,
    pub comp_axis: i32,
    pub copy_dtype: i32,
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    pub clip: f32,
}

const _: () = assert!(std::mem::size_of::<AdamwParams>() == 128);

impl Default for AdamwParams {
    fn default() -> Self {
        AdamwParams {
            p: std::ptr::null_mut(),
            g: std::ptr::null_mut(),
            m: std::ptr::null_mut(),
            v: std::ptr::null_mut(),
            copy: std::ptr::null_mut(),
            update: std::ptr::null(),
            bc: std::ptr::null(),
            sumsq: std::ptr::null_mut(),
            bad: std::ptr::null_mut(),
            ld: 0,
            ld_copy: 0,
            rows: 0,
            cols: 0,
            comp_axis: 0,
            copy_dtype: 0,
            lr: 0.0,
            beta1: 0.0,
            beta2: 0.0,
            eps: 0.0,
            weight_decay: 0.0,
            clip: 1.0,
        }
    }
}

/// `adamw_*`, `adamw_grad_stats_f32`, `adamw_scale_f32`: rows x cols elementwise.
pub fn adamw_geometry(rows: usize, cols: usize) -> Result<Geometry> {
    check_int_dims("adamw", &[("rows", rows), ("cols", cols)])?;
    rows_grid(rows, cols, "adamw")
}

pub fn adamw_kernel(copy_dtype: DType) -> String {
    format!("adamw_{}", dtype_suffix(copy_dtype))
}
pub const STATS_KERNEL: &str = "adamw_grad_stats_f32";
pub const SCALE_KERNEL: &str = "adamw_scale_f32";

/// Per-component bias corrections, computed exactly as `crate::train::adamw_step` does:
/// (1 - b1^t, sqrt(1 - b2^t)) for step count t.
pub fn bias_corrections(opt: &AdamW, step: u32) -> (f32, f32) {
    let step = step as i32;
    let bc1 = 1.0 - opt.beta1.powi(step);
    let bc2s = (1.0 - opt.beta2.powi(step)).sqrt();
    (bc1, bc2s)
}

impl<'a> DeviceTrain<'a> {
    /// Per tensor: (sum of g^2 in f64, non-finite count among `update` components, the first
    /// such component). Synchronizes.
    fn grad_stats(&self, update: &[bool]) -> Result<Vec<(f64, u32, u32)>> {
        let be = self.backend;
        be.bind()?;
        let cap = self.capacity;
        let tensors: Vec<&DeviceTensor<'_>> = self.tensors().collect();
        // Scratch: update bytes (cap, padded to 256) then per tensor one f64 + two u32 (16 bytes).
        let upd_bytes = cap.div_ceil(256) * 256;
        let total = upd_bytes + 16 * tensors.len();
        let scratch = be.alloc_scratch(total)?;
        let result = (|| -> Result<Vec<(f64, u32, u32)>> {
            let at = |off: usize| scratch + off as sys::CUdeviceptr;
            let upd: Vec<u8> = update.iter().map(|&b| b as u8).collect();
            be.copy_htod_raw(at(0), upd.as_ptr(), cap)?;
            let init: Vec<u8> = (0..tensors.len())
                .flat_map(|_| {
                    let mut b = [0u8; 16];
                    b[12..16].copy_from_slice(&u32::MAX.to_ne_bytes());
                    b
                })
                .collect();
            be.copy_htod_raw(at(upd_bytes), init.as_ptr(), init.len())?;
            for (i, t) in tensors.iter().enumerate() {
                let base = at(upd_bytes + 16 * i);
                let params = AdamwParams {
                    g: t.g.as_ptr() as *mut f32,
                    update: at(0) as *const u8,
                    sumsq: base as *mut f64,
                    bad: (base + 8) as *mut u32,
                    ld: t.cols as i64,
                    rows: t.rows as i32,
                    cols: t.cols as i32,
                    comp_axis: t.comp_axis,
                    ..AdamwParams::default()
                };
                be.launch_block(STATS_KERNEL, adamw_geometry(t.rows, t.cols)?, &params)?;
            }
            let mut out = vec![0u8; init.len()];
            // SAFETY: `out` is as long as the region read and lives until the synchronize.
            unsafe {
                be.copy_to_host(
                    out.as_mut_ptr() as *mut c_void,
                    at(upd_bytes) as *const c_void,
                    out.len(),
                )?;
            }
            be.synchronize()?;
            Ok(out
                .chunks_exact(16)
                .map(|c| {
                    let u =
                        |at: usize| u32::from_ne_bytes([c[at], c[at + 1], c[at + 2], c[at + 3]]);
                    let mut d = [0u8; 8];
                    d.copy_from_slice(&c[0..8]);
                    (f64::from_ne_bytes(d), u(8), u(12))
                })
                .collect())
        })();
        let freed = be.free_scratch(scratch);
        let r = result?;
        freed?;
        Ok(r)
    }

    /// Sum of squares of every gradient element (f64), as `crate::train::clip_grad_norm` sums.
    pub fn grad_sumsq(&self) -> Result<f64> {
        let all = vec![false; self.capacity];
        Ok(self.grad_stats(&all)?.iter().map(|s| s.0).sum())
    }

    /// Multiplies every gradient by `f` (the in-place scaling of clip_grad_norm).
    pub fn scale_grads(&mut self, f: f32) -> Result<()> {
        let be = self.backend;
        be.bind()?;
        for t in self.tensors() {
            let params = AdamwParams {
                g: t.g.as_ptr() as *mut f32,
                ld: t.cols as i64,
                rows: t.rows as i32,
                cols: t.cols as i32,
                comp_axis: t.comp_axis,
                clip: f,
                ..AdamwParams::default()
            };
            be.launch_block(SCALE_KERNEL, adamw_geometry(t.rows, t.cols)?, &params)?;
        }
        Ok(())
    }

    /// One AdamW step (`crate::train::adamw_step` semantics): the components touched since
    /// `zero_grad` and not masked are stepped with their own bias corrections; a NaN/Inf gradient
    /// in one of them makes it a no-op returning NUMERIC naming the module, tensor and
    /// component. Rewrites the compute copy from the masters. Synchronizes once (the NaN guard).
    pub fn adamw_step(&mut self, opt: &AdamW) -> Result<()> {
        opt.check()?;
        let cap = self.capacity;
        let update: Vec<bool> = (0..cap).map(|c| self.touched[c] && self.mask[c]).collect();
        if update.iter().any(|&u| u) {
            let stats = self.grad_stats(&update)?;
            // The CPU reports the lowest component, A before B before E within it.
            let names: Vec<&str> = self.tensors().map(|t| t.what).collect();
            let worst = stats
                .iter()
                .zip(&names)
                .filter(|(s, _)| s.1 > 0)
                .min_by_key(|(s, _)| s.2);
            if let Some((s, what)) = worst {
                return Err(Error::numeric(format!(
                    "module '{}': the gradient of {what} (component {}) is NaN or infinite; step skipped, weights unchanged",
                    self.module, s.2
                )));
            }
        }
        let mut bc = vec![0f32; 2 * cap];
        for c in 0..cap {
            if update[c] {
                self.steps[c] += 1;
                let (b1, b2) = bias_corrections(opt, self.steps[c]);
                bc[2 * c] = b1;
                bc[2 * c + 1] = b2;
            }
        }
        let be = self.backend;
        be.bind()?;
        let upd_bytes = cap.div_ceil(256) * 256;
        let scratch = be.alloc_scratch(upd_bytes + 8 * cap)?;
        let result = (|| -> Result<()> {
            let at = |off: usize| scratch + off as sys::CUdeviceptr;
            let upd: Vec<u8> = update.iter().map(|&b| b as u8).collect();
            be.copy_htod_raw(at(0), upd.as_ptr(), cap)?;
            be.copy_htod_raw(at(upd_bytes), bc.as_ptr() as *const u8, 8 * cap)?;
            let copies = [
                Some((&self.a_copy, self.in_features)),
                Some((&self.b_copy, cap)),
                None,
            ];
            for (t, copy) in self.tensors().zip(copies) {
                let params = AdamwParams {
                    p: t.p.as_ptr() as *mut f32,
                    g: t.g.as_ptr() as *mut f32,
                    m: t.m.as_ptr() as *mut f32,
                    v: t.v.as_ptr() as *mut f32,
                    copy: copy.map_or(std::ptr::null_mut(), |c| c.0.as_ptr()),
                    update: at(0) as *const u8,
                    bc: at(upd_bytes) as *const f32,
                    ld: t.cols as i64,
                    ld_copy: copy.map_or(0, |c| c.1 as i64),
                    rows: t.rows as i32,
                    cols: t.cols as i32,
                    comp_axis: t.comp_axis,
                    copy_dtype: dtype_code(self.dtype),
                    lr: opt.lr,
                    beta1: opt.beta1,
                    beta2: opt.beta2,
                    eps: opt.eps,
                    weight_decay: opt.weight_decay,
                    clip: 1.0,
                    ..AdamwParams::default()
                };
                let kernel = adamw_kernel(if copy.is_some() {
                    self.dtype
                } else {
                    DType::F32
                });
                be.launch_block(&kernel, adamw_geometry(t.rows, t.cols)?, &params)?;
            }
            Ok(())
        })();
        let freed = be.free_scratch(scratch);
        result.and(freed)
    }
}

/// clip_grad_norm over device modules (`crate::train::clip_grad_norm` semantics): returns the
/// norm before clipping; scales the gradients in place when it exceeds `max_norm`.
pub fn clip_grad_norm(modules: &mut [DeviceTrain<'_>], max_norm: f32) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        return Err(Error::invalid(format!(
            "max_norm = {max_norm}: must be finite and > 0"
        )));
    }
    let mut sq = 0f64;
    for m in modules.iter() {
        sq += m.grad_sumsq()?;
    }
    let norm = sq.sqrt();
    if norm.is_finite() && norm > max_norm as f64 {
        let f = (max_norm as f64 / (norm + 1e-6)) as f32;
        for m in modules.iter_mut() {
            m.scale_grads(f)?;
        }
    }
    Ok(norm)
}
