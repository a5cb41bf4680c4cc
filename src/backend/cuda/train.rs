//! Training on the GPU: the LoRA backward (`kernels/lora_backward.cu`) and the fused AdamW with
//! its gradient statistics (`kernels/adamw.cu`).
//!
//! Pure launch planning first (parameter blocks mirrored from the `.cu` files, kernel names,
//! grids, K splits: unit-tested without a GPU), then the launches on the backend's stream:
//! `CudaBackend::lora_backward` (device operands, device gradient buffers) and `DeviceTrain`, a
//! LoRA module's training state resident on the device (masters, gradients, moments; mask, touched
//! components and step counts on the host) with `backward`, `zero_grad`, `clip_grad_norm`,
//! `adamw_step` and `download_into` — the same semantics as `crate::train` on the CPU.

use super::launch::{dtype_code, Geometry, BLOCK, GRID_YZ_MAX};
use super::{check, guard, CudaBackend, DeviceBuffer};
use crate::adapter::Lora;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::train::backward::BackwardProblem;
use crate::train::{AdamW, Mode};
use cudarc::driver::sys;
use std::ffi::c_void;

/// Output tile of the FMA tile kernels (`kernels/tile_gemm.cuh`): 64 x 64, K in steps of 16.
pub(crate) const TILE: usize = 64;
pub(crate) const TILE_K: usize = 16;
/// A K split is never shorter than this (keeps the atomics few).
pub(crate) const MIN_SPLIT_K: usize = 256;
/// Columns per block of the elementwise kernels (one thread per column, rows by grid-stride).
pub(crate) const ROW_BLOCK: usize = BLOCK as usize;
/// Largest grid.x.
pub(crate) const GRID_X_MAX: usize = i32::MAX as usize;
/// Indices inside the kernels are `int`.
pub(crate) const DIM_MAX: usize = i32::MAX as usize;

pub(crate) fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        // No CUDA kernel reads block-quantized data: Runtime::linear refuses a quantized W on
        // CUDA and LinearProblem::check refuses it in every other role.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K => "quantized",
    }
}

pub(crate) fn grid_dim(v: usize, max: usize, what: &str) -> Result<u32> {
    if v == 0 || v > max {
        return Err(Error::unsupported(format!(
            "{what}: grid dimension {v} is outside 1..={max}"
        )));
    }
    Ok(v as u32)
}

/// Every size a kernel indexes with `int` must fit.
pub(crate) fn check_int_dims(what: &str, dims: &[(&str, usize)]) -> Result<()> {
    for &(name, v) in dims {
        if v > DIM_MAX {
            return Err(Error::unsupported(format!(
                "{what}: {name} = {v} exceeds the CUDA kernels' limit of {DIM_MAX}"
            )));
        }
    }
    Ok(())
}

/// A 64 x 64 tile grid over a rows x cols output: (ceil(cols / 64), ceil(rows / 64), z).
pub(crate) fn tile_grid(rows: usize, cols: usize, z: usize, what: &str) -> Result<Geometry> {
    if rows == 0 || cols == 0 {
        return Err(Error::internal(format!(
            "{what}: empty output ({rows} x {cols}) must not be launched"
        )));
    }
    Ok(Geometry {
        grid: (
            grid_dim(cols.div_ceil(TILE), GRID_X_MAX, what)?,
            grid_dim(rows.div_ceil(TILE), GRID_YZ_MAX, what)?,
            grid_dim(z, GRID_YZ_MAX, what)?,
        ),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// One thread per column, rows by grid-stride: (ceil(cols / 256), min(rows, 65535)).
pub(crate) fn rows_grid(rows: usize, cols: usize, what: &str) -> Result<Geometry> {
    if rows == 0 || cols == 0 {
        return Err(Error::internal(format!(
            "{what}: empty output ({rows} x {cols}) must not be launched"
        )));
    }
    Ok(Geometry {
        grid: (
            grid_dim(cols.div_ceil(ROW_BLOCK), GRID_X_MAX, what)?,
            rows.min(GRID_YZ_MAX) as u32,
            1,
        ),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// A K (reduction) range split across blocks: `splits` chunks of `chunk` (a multiple of 16);
/// chunk `s` covers [s * chunk, min(k, (s + 1) * chunk)); none is empty (for k > 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KSplit {
    pub splits: usize,
    pub chunk: usize,
}

/// Splits a reduction of length `k` so that `tiles` output tiles give about two blocks per SM,
/// never below MIN_SPLIT_K elements per split and at most `max_splits` splits.
pub fn k_split(tiles: usize, k: usize, sm_count: usize, max_splits: usize) -> KSplit {
    let want = (2 * sm_count.max(1)).div_ceil(tiles.max(1));
    let by_k = (k / MIN_SPLIT_K).max(1);
    let splits = want.min(by_k).min(max_splits.max(1)).max(1);
    let chunk = k.div_ceil(splits).div_ceil(TILE_K).max(1) * TILE_K;
    KSplit {
        splits: k.div_ceil(chunk).max(1),
        chunk,
    }
}

// ---- the LoRA backward -------------------------------------------------------------------

/// Mirrors `struct BackwardParams` in kernels/lora_backward.cu (240 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BackwardParams {
    pub x: *const c_void,
    pub w: *const c_void,
    pub dy: *const c_void,
    pub a: *const c_void,
    pub b: *const c_void,
    pub gains: *const f32,
    pub grad: *const u8,
    pub active: *const u8,
    pub u: *mut f32,
    pub g: *mut f32,
    pub da: *mut f32,
    pub db: *mut f32,
    pub de: *mut f32,
    pub dx: *mut c_void,
    pub ldx: i64,
    pub ldw: i64,
    pub lddy: i64,
    pub lda: i64,
    pub ldb: i64,
    pub ldda: i64,
    pub lddb: i64,
    pub lddx: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub r: i32,
    pub x_dtype: i32,
    pub w_dtype: i32,
    pub dy_dtype: i32,
    pub a_dtype: i32,
    pub b_dtype: i32,
    pub dx_dtype: i32,
    pub ug_splits: i32,
    pub ug_chunk_k: i32,
    pub ug_chunk_n: i32,
    pub ab_splits: i32,
    pub ab_chunk_m: i32,
    pub scale: f32,
}

const _: () = assert!(std::mem::size_of::<BackwardParams>() == 240);

impl Default for BackwardParams {
    fn default() -> Self {
        BackwardParams {
            x: std::ptr::null(),
            w: std::ptr::null(),
            dy: std::ptr::null(),
            a: std::ptr::null(),
            b: std::ptr::null(),
            gains: std::ptr::null(),
            grad: std::ptr::null(),
            active: std::ptr::null(),
            u: std::ptr::null_mut(),
            g: std::ptr::null_mut(),
            da: std::ptr::null_mut(),
            db: std::ptr::null_mut(),
            de: std::ptr::null_mut(),
            dx: std::ptr::null_mut(),
            ldx: 0,
            ldw: 0,
            lddy: 0,
            lda: 0,
            ldb: 0,
            ldda: 0,
            lddb: 0,
            lddx: 0,
            m: 0,
            n: 0,
            k: 0,
            r: 0,
            x_dtype: 0,
            w_dtype: 0,
            dy_dtype: 0,
            a_dtype: 0,
            b_dtype: 0,
            dx_dtype: 0,
            ug_splits: 1,
            ug_chunk_k: TILE_K as i32,
            ug_chunk_n: TILE_K as i32,
            ab_splits: 1,
            ab_chunk_m: TILE_K as i32,
            scale: 0.0,
        }
    }
}

/// How U and G split their reductions (k for U, n for G) over the same number of splits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UgSplit {
    pub splits: usize,
    pub chunk_k: usize,
    pub chunk_n: usize,
}

/// `lora_backward_ug_*`: grid (ceil(r/64), ceil(m/64), 2 * splits).
pub fn ug_geometry(
    m: usize,
    r: usize,
    k: usize,
    n: usize,
    sm_count: usize,
) -> Result<(Geometry, UgSplit)> {
    check_int_dims("lora backward", &[("m", m), ("r", r), ("k", k), ("n", n)])?;
    let tiles = 2 * m.div_ceil(TILE) * r.div_ceil(TILE);
    let s = k_split(tiles, k.max(n), sm_count, GRID_YZ_MAX / 2);
    let chunk_k = k.div_ceil(s.splits).div_ceil(TILE_K).max(1) * TILE_K;
    let chunk_n = n.div_ceil(s.splits).div_ceil(TILE_K).max(1) * TILE_K;
    let g = tile_grid(m, r, 2 * s.splits, "lora_backward_ug")?;
    Ok((
        g,
        UgSplit {
            splits: s.splits,
            chunk_k,
            chunk_n,
        },
    ))
}

/// `lora_backward_de_f32`: one block per component.
pub fn de_geometry(r: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (grid_dim(r, GRID_X_MAX, "lora_backward_de")?, 1, 1),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// `lora_backward_tp_f32`: m x r elementwise.
pub fn tp_geometry(m: usize, r: usize) -> Result<Geometry> {
    rows_grid(m, r, "lora_backward_tp")
}

/// `lora_backward_db_*`: output n x r, reduction over m split in `ab` chunks.
pub fn db_geometry(n: usize, r: usize, m: usize, sm_count: usize) -> Result<(Geometry, KSplit)> {
    let s = k_split(
        n.div_ceil(TILE) * r.div_ceil(TILE),
        m,
        sm_count,
        GRID_YZ_MAX,
    );
    Ok((tile_grid(n, r, s.splits, "lora_backward_db")?, s))
}

/// `lora_backward_da_*`: output r x k, reduction over m split in chunks.
pub fn da_geometry(r: usize, k: usize, m: usize, sm_count: usize) -> Result<(Geometry, KSplit)> {
    let s = k_split(
        r.div_ceil(TILE) * k.div_ceil(TILE),
        m,
        sm_count,
        GRID_YZ_MAX,
    );
    Ok((tile_grid(r, k, s.splits, "lora_backward_da")?, s))
}

/// `lora_backward_dx_*`: output m x k.
pub fn dx_geometry(m: usize, k: usize) -> Result<Geometry> {
    tile_grid(m, k, 1, "lora_backward_dx")
}

pub fn ug_kernel(x_dtype: DType) -> String {
    format!("lora_backward_ug_{}", dtype_suffix(x_dtype))
}
pub fn db_kernel(dy_dtype: DType) -> String {
    format!("lora_backward_db_{}", dtype_suffix(dy_dtype))
}
pub fn da_kernel(x_dtype: DType) -> String {
    format!("lora_backward_da_{}", dtype_suffix(x_dtype))
}
pub fn dx_kernel(w_dtype: DType) -> String {
    format!("lora_backward_dx_{}", dtype_suffix(w_dtype))
}
pub const DE_KERNEL: &str = "lora_backward_de_f32";
pub const TP_KERNEL: &str = "lora_backward_tp_f32";

// ---- AdamW --------------------------------------------------------------------------------

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

/// Every kernel of this file's `.cu` sources (the PTX symbol-table test covers them per SM).
pub fn kernels_for_sm(_sm: u32) -> Vec<String> {
    let mut v = vec![
        DE_KERNEL.to_string(),
        TP_KERNEL.to_string(),
        STATS_KERNEL.to_string(),
        SCALE_KERNEL.to_string(),
    ];
    for d in DType::ALL {
        v.push(ug_kernel(d));
        v.push(db_kernel(d));
        v.push(da_kernel(d));
        v.push(dx_kernel(d));
        v.push(adamw_kernel(d));
    }
    v
}

// ---- launches -----------------------------------------------------------------------------

/// Where a backward accumulates: f32 device buffers. dA is r x k with ld `ldda`, dB n x r with ld
/// `lddb`, dE r entries (NULL: no trainable gains).
#[derive(Clone, Copy, Debug)]
pub struct DeviceGrads {
    pub da: *mut f32,
    pub ldda: usize,
    pub db: *mut f32,
    pub lddb: usize,
    pub de: *mut f32,
}

/// The gains of a backward: host values (uploaded for the call) or device f32 memory.
#[derive(Clone, Copy, Debug)]
enum Gains<'a> {
    Host(Option<&'a [f32]>),
    Device(*const f32),
}

/// Byte offsets of one backward's scratch (each region 256-byte aligned).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackwardScratch {
    pub u: usize,
    pub g: usize,
    pub gains: usize,
    pub grad: usize,
    pub active: usize,
    pub total: usize,
}

pub fn backward_scratch(m: usize, r: usize) -> Result<BackwardScratch> {
    let ovf = || {
        Error::unsupported(format!(
            "lora backward: scratch for m = {m}, r = {r} overflows"
        ))
    };
    let mr = m
        .checked_mul(r)
        .and_then(|v| v.checked_mul(4))
        .ok_or_else(ovf)?;
    let mut off = 0usize;
    let mut take = |bytes: usize| -> Result<usize> {
        let at = off;
        off = off.checked_add(bytes.div_ceil(256) * 256).ok_or_else(ovf)?;
        Ok(at)
    };
    let u = take(mr)?;
    let g = take(mr)?;
    let gains = take(r * 4)?;
    let grad = take(r)?;
    let active = take(r)?;
    Ok(BackwardScratch {
        u,
        g,
        gains,
        grad,
        active,
        total: off,
    })
}

impl CudaBackend {
    /// Launches `kernel` with one parameter block `P` (a `#[repr(C)]` mirror of the kernel's
    /// struct, checked by a layout test).
    pub(crate) fn launch_block<P: Copy>(
        &self,
        kernel: &str,
        g: Geometry,
        params: &P,
    ) -> Result<()> {
        let f = self.function(kernel)?;
        let mut p = *params;
        let mut args = [&mut p as *mut P as *mut c_void];
        // SAFETY: the kernel takes one P by value (layout mirrored and tested); the driver copies
        // it at launch. The pointers inside were checked by the caller.
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

    fn require_device(&self, what: &[(&str, *const u8)]) -> Result<()> {
        for &(name, ptr) in what {
            if !self.device_accessible(ptr) {
                return Err(Error::invalid(format!(
                    "{name}: data is not device memory; a CUDA runtime takes device pointers \
                     (rf_device_alloc + rf_copy_to_device)"
                )));
            }
        }
        Ok(())
    }

    /// The LoRA backward on the GPU (`crate::train::backward::backward` semantics): every
    /// operand of `p` (x, w, dy, a, b) and `dx` are device memory; `p.gains` and `p.grad` are
    /// host slices (copied for the call). Accumulates into `grads`, writes dx when given.
    /// Asynchronous on the backend's stream.
    ///
    /// # Safety
    /// `grads.da` must be device memory of r x k f32 (ld `ldda`), `grads.db` of n x r (ld
    /// `lddb`), `grads.de` NULL or r f32 when `p.want_de`, all alive until the stream has run.
    pub unsafe fn lora_backward(
        &self,
        p: &BackwardProblem<'_>,
        grads: DeviceGrads,
        dx: Option<&mut MatMut<'_>>,
    ) -> Result<()> {
        p.check(dx.as_deref())?;
        guard(|| self.backward_inner(p, Gains::Host(p.gains), None, grads, dx))
    }

    fn backward_inner(
        &self,
        p: &BackwardProblem<'_>,
        gains: Gains<'_>,
        active: Option<&[bool]>,
        grads: DeviceGrads,
        dx: Option<&mut MatMut<'_>>,
    ) -> Result<()> {
        let (m, n, k, r) = (p.m(), p.n(), p.k(), p.r());
        check_int_dims("lora backward", &[("m", m), ("n", n), ("k", k), ("r", r)])?;
        if grads.ldda < k || grads.lddb < r {
            return Err(Error::internal(format!(
                "lora backward: gradient ld {} / {} below k = {k} / r = {r}",
                grads.ldda, grads.lddb
            )));
        }
        if p.want_de && grads.de.is_null() {
            return Err(Error::internal("lora backward: dE wanted without a buffer"));
        }
        if m == 0 || r == 0 {
            // No rows: every gradient gets + 0 and dx is empty; rank 0 is refused upstream.
            return Ok(());
        }
        self.bind()?;
        let mut ops: Vec<(&str, *const u8)> = Vec::new();
        if n > 0 {
            ops.push(("db", grads.db as *const u8));
        }
        if k > 0 {
            ops.push(("x", p.x.as_ptr()));
            ops.push(("a", p.a.as_ptr()));
            ops.push(("da", grads.da as *const u8));
        }
        if n > 0 {
            ops.push(("dy", p.dy.as_ptr()));
            ops.push(("b", p.b.as_ptr()));
        }
        if k > 0 && n > 0 {
            ops.push(("w", p.w.as_ptr()));
        }
        if p.want_de {
            ops.push(("de", grads.de as *const u8));
        }
        if let Gains::Device(ptr) = gains {
            if !ptr.is_null() {
                ops.push(("gains", ptr as *const u8));
            }
        }
        let dx_ptr = dx.as_ref().map(|d| d.as_ref().as_ptr());
        if let Some(ptr) = dx_ptr {
            if k > 0 {
                ops.push(("dx", ptr));
            }
        }
        self.require_device(&ops)?;

        let layout = backward_scratch(m, r)?;
        let scratch = self.alloc_scratch(layout.total)?;
        let result = self.run_backward(p, gains, active, grads, dx, &layout, scratch);
        let freed = self.free_scratch(scratch);
        result.and(freed)
    }

    #[allow(clippy::too_many_arguments)]
    fn run_backward(
        &self,
        p: &BackwardProblem<'_>,
        gains: Gains<'_>,
        active: Option<&[bool]>,
        grads: DeviceGrads,
        dx: Option<&mut MatMut<'_>>,
        layout: &BackwardScratch,
        scratch: sys::CUdeviceptr,
    ) -> Result<()> {
        let (m, n, k, r) = (p.m(), p.n(), p.k(), p.r());
        let sms = self.info.sm_count;
        let at = |off: usize| scratch + off as sys::CUdeviceptr;
        let grad_bytes: Vec<u8> = p.grad.iter().map(|&b| b as u8).collect();
        self.copy_htod_raw(at(layout.grad), grad_bytes.as_ptr(), r)?;
        let gains_ptr = match gains {
            Gains::Host(Some(g)) => {
                self.copy_htod_raw(at(layout.gains), g.as_ptr() as *const u8, r * 4)?;
                at(layout.gains) as *const f32
            }
            Gains::Host(None) => std::ptr::null(),
            Gains::Device(ptr) => ptr,
        };
        let active_bytes: Option<Vec<u8>> = active.map(|a| a.iter().map(|&b| b as u8).collect());
        let active_ptr = match &active_bytes {
            Some(a) => {
                self.copy_htod_raw(at(layout.active), a.as_ptr(), r)?;
                at(layout.active) as *const u8
            }
            None => std::ptr::null(),
        };
        let (dx_ptr, lddx, dx_dtype) = match &dx {
            Some(d) => (
                d.as_ref().as_ptr() as *mut c_void,
                d.ld as i64,
                dtype_code(d.dtype),
            ),
            None => (std::ptr::null_mut(), 0, 0),
        };
        let mut params = BackwardParams {
            x: p.x.as_ptr() as *const c_void,
            w: p.w.as_ptr() as *const c_void,
            dy: p.dy.as_ptr() as *const c_void,
            a: p.a.as_ptr() as *const c_void,
            b: p.b.as_ptr() as *const c_void,
            gains: gains_ptr,
            grad: at(layout.grad) as *const u8,
            active: active_ptr,
            u: at(layout.u) as *mut f32,
            g: at(layout.g) as *mut f32,
            da: grads.da,
            db: grads.db,
            de: if p.want_de {
                grads.de
            } else {
                std::ptr::null_mut()
            },
            dx: dx_ptr,
            ldx: p.x.ld as i64,
            ldw: p.w.ld as i64,
            lddy: p.dy.ld as i64,
            lda: p.a.ld as i64,
            ldb: p.b.ld as i64,
            ldda: grads.ldda as i64,
            lddb: grads.lddb as i64,
            lddx,
            m: m as i32,
            n: n as i32,
            k: k as i32,
            r: r as i32,
            x_dtype: dtype_code(p.x.dtype),
            w_dtype: dtype_code(p.w.dtype),
            dy_dtype: dtype_code(p.dy.dtype),
            a_dtype: dtype_code(p.a.dtype),
            b_dtype: dtype_code(p.b.dtype),
            dx_dtype,
            scale: p.scale,
            ..BackwardParams::default()
        };
        // 1. U, G.
        let (g, s) = ug_geometry(m, r, k, n, sms)?;
        params.ug_splits = s.splits as i32;
        params.ug_chunk_k = s.chunk_k as i32;
        params.ug_chunk_n = s.chunk_n as i32;
        if s.splits > 1 {
            // SAFETY: U and G are adjacent regions of the scratch allocation (2 * m * r f32 and
            // their alignment padding, all inside layout.total); the gains region after them
            // (already filled) is not cleared.
            check(
                unsafe {
                    sys::cuMemsetD8Async(at(layout.u), 0, layout.gains - layout.u, self.stream)
                },
                "clearing U and G",
            )?;
        }
        self.launch_block(&ug_kernel(p.x.dtype), g, &params)?;
        let any_grad = p.grad.iter().any(|&b| b);
        // 2. dE (from U and G, before they become T and P).
        if any_grad && p.want_de {
            self.launch_block(DE_KERNEL, de_geometry(r)?, &params)?;
        }
        // 3. T, P in place.
        self.launch_block(TP_KERNEL, tp_geometry(m, r)?, &params)?;
        // 4, 5. dB, dA.
        if any_grad {
            if n > 0 {
                let (g, s) = db_geometry(n, r, m, sms)?;
                params.ab_splits = s.splits as i32;
                params.ab_chunk_m = s.chunk as i32;
                self.launch_block(&db_kernel(p.dy.dtype), g, &params)?;
            }
            if k > 0 {
                let (g, s) = da_geometry(r, k, m, sms)?;
                params.ab_splits = s.splits as i32;
                params.ab_chunk_m = s.chunk as i32;
                self.launch_block(&da_kernel(p.x.dtype), g, &params)?;
            }
        }
        // 6. dx.
        if dx.is_some() && k > 0 {
            self.launch_block(&dx_kernel(p.w.dtype), dx_geometry(m, k)?, &params)?;
        }
        Ok(())
    }
}

/// One f32 tensor of a module's training state on the device: masters, gradients, moments.
struct DeviceTensor<'a> {
    p: DeviceBuffer<'a>,
    g: DeviceBuffer<'a>,
    m: DeviceBuffer<'a>,
    v: DeviceBuffer<'a>,
    rows: usize,
    cols: usize,
    /// 0: the component is the row index (A); 1: the column index (B, E).
    comp_axis: i32,
    what: &'static str,
}

/// A LoRA module's training state on the device (the counterpart of `crate::train::TrainState`
/// for a CUDA runtime): the compute copy of A and B in the module's dtype (what the forward and
/// the backward read), f32 masters, gradients and AdamW moments in device memory; the component
/// mask, the components touched since `zero_grad` and the per-component step counts on the host.
/// Every call is ordered on the backend's stream; those that must look at results (`clip_grad_norm`,
/// the NaN guard of `adamw_step`, `download_into`) synchronize.
pub struct DeviceTrain<'a> {
    backend: &'a CudaBackend,
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
    pub capacity: usize,
    pub dtype: DType,
    /// Rank of calls with rank 0.
    pub rank: usize,
    /// scale_at(r) for r = 1..=capacity.
    scales: Vec<f32>,
    a_copy: DeviceBuffer<'a>,
    b_copy: DeviceBuffer<'a>,
    a: DeviceTensor<'a>,
    b: DeviceTensor<'a>,
    /// Trainable gains E (1 x capacity), when enabled.
    e: Option<DeviceTensor<'a>>,
    pub mask: Vec<bool>,
    pub touched: Vec<bool>,
    pub steps: Vec<u32>,
}

/// The state as f32 vectors, read back from the device (for checks and for handing the state back
/// to the CPU).
#[derive(Clone, Debug, Default)]
pub struct TrainSnapshot {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub e: Option<Vec<f32>>,
    pub ga: Vec<f32>,
    pub gb: Vec<f32>,
    pub ge: Vec<f32>,
    pub ma: Vec<f32>,
    pub va: Vec<f32>,
    pub mb: Vec<f32>,
    pub vb: Vec<f32>,
    pub me: Vec<f32>,
    pub ve: Vec<f32>,
}

fn f32_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any bit pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) }
}

impl CudaBackend {
    fn upload_f32(&self, v: &[f32]) -> Result<DeviceBuffer<'_>> {
        self.upload(f32_bytes(v))
    }

    fn download_f32(&self, buf: &DeviceBuffer<'_>, n: usize) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        // SAFETY: buf holds at least n f32 (allocated for them); `out` lives until the
        // synchronize below.
        unsafe {
            self.copy_to_host(out.as_mut_ptr() as *mut c_void, buf.as_ptr(), n * 4)?;
        }
        self.synchronize()?;
        Ok(out)
    }

    fn tensor(
        &self,
        p: &[f32],
        g: &[f32],
        m: &[f32],
        v: &[f32],
        shape: (usize, usize, i32),
        what: &'static str,
    ) -> Result<DeviceTensor<'_>> {
        Ok(DeviceTensor {
            p: self.upload_f32(p)?,
            g: self.upload_f32(g)?,
            m: self.upload_f32(m)?,
            v: self.upload_f32(v)?,
            rows: shape.0,
            cols: shape.1,
            comp_axis: shape.2,
            what,
        })
    }

    /// Copies a trainable module's state (compute copy, masters, gradients, moments, mask,
    /// steps) to the device.
    pub fn upload_train(&self, lora: &Lora) -> Result<DeviceTrain<'_>> {
        let t = lora.train_state()?;
        let (k, n, cap) = (lora.in_features, lora.out_features, lora.capacity);
        let a_copy = self.upload_matrix(lora.a.view())?;
        let b_copy = self.upload_matrix(lora.b.view())?;
        if a_copy.ld != k || b_copy.ld != cap {
            return Err(Error::internal(format!(
                "module '{}': compute copies are not dense",
                lora.name
            )));
        }
        Ok(DeviceTrain {
            backend: self,
            module: lora.name.clone(),
            in_features: k,
            out_features: n,
            capacity: cap,
            dtype: lora.dtype(),
            rank: lora.rank(),
            scales: (1..=cap).map(|r| lora.scale_at(r)).collect(),
            a_copy: a_copy.buf,
            b_copy: b_copy.buf,
            a: self.tensor(&t.a, &t.ga, &t.mom_a.m, &t.mom_a.v, (cap, k, 0), "lora_A")?,
            b: self.tensor(&t.b, &t.gb, &t.mom_b.m, &t.mom_b.v, (n, cap, 1), "lora_B")?,
            e: match &t.e {
                Some(e) => {
                    Some(self.tensor(e, &t.ge, &t.mom_e.m, &t.mom_e.v, (1, cap, 1), "gains E")?)
                }
                None => None,
            },
            mask: t.mask.clone(),
            touched: t.touched.clone(),
            steps: t.steps.clone(),
        })
    }
}

impl<'a> DeviceTrain<'a> {
    fn tensors(&self) -> impl Iterator<Item = &DeviceTensor<'a>> {
        [Some(&self.a), Some(&self.b), self.e.as_ref()]
            .into_iter()
            .flatten()
    }

    /// A view of the compute copy of A[:r] on the device (for `CudaBackend::linear` slots).
    pub fn a_view(&self, r: usize) -> MatRef<'_> {
        // SAFETY: a_copy holds capacity x in elements of `dtype`, dense; r <= capacity is
        // asserted by top_left. The view is only handed to kernels.
        let full = unsafe {
            MatRef::from_raw(
                self.a_copy.as_ptr() as *const u8,
                self.dtype,
                self.capacity,
                self.in_features,
                self.in_features,
            )
        };
        full.top_left(r, self.in_features)
    }

    /// A view of the compute copy of B[:, :r] on the device.
    pub fn b_view(&self, r: usize) -> MatRef<'_> {
        // SAFETY: as a_view; B is out x capacity, dense.
        let full = unsafe {
            MatRef::from_raw(
                self.b_copy.as_ptr() as *const u8,
                self.dtype,
                self.out_features,
                self.capacity,
                self.capacity,
            )
        };
        full.top_left(self.out_features, r)
    }

    fn resolve_rank(&self, rank: usize) -> Result<usize> {
        let r = if rank == 0 { self.rank } else { rank };
        if r == 0 {
            return Err(Error::invalid(format!("module '{}': rank 0", self.module)));
        }
        if r > self.capacity {
            return Err(Error::invalid(format!(
                "module '{}': rank {r} exceeds capacity {}",
                self.module, self.capacity
            )));
        }
        Ok(r)
    }

    /// `crate::train::backward` on the device: x, w, dy and dx are device memory.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &mut self,
        x: MatRef<'_>,
        w: MatRef<'_>,
        dy: MatRef<'_>,
        rank: usize,
        mode: Mode,
        dx: Option<&mut MatMut<'_>>,
    ) -> Result<()> {
        let r = self.resolve_rank(rank)?;
        let grad: Vec<bool> = (0..r)
            .map(|c| self.mask[c] && (mode == Mode::Nested || c + 1 == r))
            .collect();
        let all_on = self.mask[..r].iter().all(|&m| m);
        let p = BackwardProblem {
            x,
            w,
            dy,
            a: self.a_view(r),
            b: self.b_view(r),
            gains: None,
            scale: self.scales[r - 1],
            grad: &grad,
            want_de: self.e.is_some(),
        };
        p.check(dx.as_deref())
            .map_err(|e| e.context(format!("module '{}'", self.module)))?;
        let grads = DeviceGrads {
            da: self.a.g.as_ptr() as *mut f32,
            ldda: self.in_features,
            db: self.b.g.as_ptr() as *mut f32,
            lddb: self.capacity,
            de: self
                .e
                .as_ref()
                .map_or(std::ptr::null_mut(), |e| e.g.as_ptr() as *mut f32),
        };
        let gains = Gains::Device(
            self.e
                .as_ref()
                .map_or(std::ptr::null(), |e| e.p.as_ptr() as *const f32),
        );
        let active = if all_on { None } else { Some(&self.mask[..r]) };
        let be = self.backend;
        guard(|| be.backward_inner(&p, gains, active, grads, dx))?;
        for (c, &on) in grad.iter().enumerate() {
            if on {
                self.touched[c] = true;
            }
        }
        Ok(())
    }

    /// Zeroes the gradients and forgets which components were touched.
    pub fn zero_grad(&mut self) -> Result<()> {
        let be = self.backend;
        be.bind()?;
        for t in self.tensors() {
            // SAFETY: the gradient buffer holds rows x cols f32.
            check(
                unsafe {
                    sys::cuMemsetD8Async(
                        t.g.as_ptr() as sys::CUdeviceptr,
                        0,
                        t.rows * t.cols * 4,
                        be.stream,
                    )
                },
                "zeroing gradients",
            )?;
        }
        self.touched.fill(false);
        Ok(())
    }

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

    /// Reads the whole state back (synchronizes).
    pub fn snapshot(&self) -> Result<TrainSnapshot> {
        let be = self.backend;
        let rd = |t: &DeviceTensor<'_>| -> Result<[Vec<f32>; 4]> {
            let n = t.rows * t.cols;
            Ok([
                be.download_f32(&t.p, n)?,
                be.download_f32(&t.g, n)?,
                be.download_f32(&t.m, n)?,
                be.download_f32(&t.v, n)?,
            ])
        };
        let [a, ga, ma, va] = rd(&self.a)?;
        let [b, gb, mb, vb] = rd(&self.b)?;
        let (e, ge, me, ve) = match &self.e {
            Some(t) => {
                let [e, ge, me, ve] = rd(t)?;
                (Some(e), ge, me, ve)
            }
            None => (
                None,
                vec![0.0; self.capacity],
                vec![0.0; self.capacity],
                vec![0.0; self.capacity],
            ),
        };
        Ok(TrainSnapshot {
            a,
            b,
            e,
            ga,
            gb,
            ge,
            ma,
            va,
            mb,
            vb,
            me,
            ve,
        })
    }

    /// The compute copies of A (capacity x in) and B (out x capacity) as the device holds them,
    /// converted to f32 (exact). Synchronizes.
    pub fn compute_copies(&self) -> Result<(Vec<f32>, Vec<f32>)> {
        let be = self.backend;
        let read = |buf: &DeviceBuffer<'_>, rows: usize, cols: usize| -> Result<Vec<f32>> {
            let mut bytes = vec![0u8; rows * cols * self.dtype.size()];
            // SAFETY: buf holds rows x cols elements of `dtype`, dense; `bytes` lives until the
            // synchronize.
            unsafe {
                be.copy_to_host(bytes.as_mut_ptr() as *mut c_void, buf.as_ptr(), bytes.len())?;
            }
            be.synchronize()?;
            Ok(crate::matrix::Matrix::from_bytes(self.dtype, rows, cols, bytes)?.to_f32_vec())
        };
        Ok((
            read(&self.a_copy, self.capacity, self.in_features)?,
            read(&self.b_copy, self.out_features, self.capacity)?,
        ))
    }

    /// Hands the state back to the CPU module (masters, gradients, moments, touched, steps;
    /// then the compute copy and gains are refreshed from the masters as after a CPU step).
    pub fn download_into(&self, lora: &mut Lora) -> Result<()> {
        if lora.in_features != self.in_features
            || lora.out_features != self.out_features
            || lora.capacity != self.capacity
        {
            return Err(Error::shape(format!(
                "module '{}': device state is {} x {} (capacity {}), the module {} x {} (capacity {})",
                self.module,
                self.out_features,
                self.in_features,
                self.capacity,
                lora.out_features,
                lora.in_features,
                lora.capacity
            )));
        }
        let s = self.snapshot()?;
        let t = lora.train_state_mut()?;
        if t.e.is_some() != s.e.is_some() {
            return Err(Error::invalid(
                "trainable gains are enabled on one side only",
            ));
        }
        t.a = s.a;
        t.b = s.b;
        t.e = s.e;
        t.ga = s.ga;
        t.gb = s.gb;
        t.ge = s.ge;
        t.mom_a.m = s.ma;
        t.mom_a.v = s.va;
        t.mom_b.m = s.mb;
        t.mom_b.v = s.vb;
        t.mom_e.m = s.me;
        t.mom_e.v = s.ve;
        t.mask.copy_from_slice(&self.mask);
        t.touched.copy_from_slice(&self.touched);
        t.steps.copy_from_slice(&self.steps);
        t.refresh_gains();
        lora.sync_from_master()
    }
}

/// `crate::train::backward` on a CUDA runtime for a module whose training state lives in host
/// memory (what the C ABI holds): x, w, dy and dx are device memory; A_r and B_r (the compute
/// copy) are copied to the device for the call, the gradients are computed there into zeroed
/// buffers, read back and added to the host gradients of the components that get them (others
/// are not touched, so masked components stay exactly zero). Synchronizes before returning.
#[allow(clippy::too_many_arguments)]
pub fn backward_host_state(
    cuda: &CudaBackend,
    lora: &mut Lora,
    x: MatRef<'_>,
    w: MatRef<'_>,
    dy: MatRef<'_>,
    rank: usize,
    mode: Mode,
    dx: Option<&mut MatMut<'_>>,
) -> Result<()> {
    let r = lora.resolve_rank(rank)?;
    if r == 0 {
        return Err(Error::invalid(format!("module '{}': rank 0", lora.name)));
    }
    let grad = crate::train::grad_components(lora, r, mode)?;
    let scale = lora.scale_at(r);
    let name = lora.name.clone();
    let (k, n, cap) = (lora.in_features, lora.out_features, lora.capacity);
    let t = lora.train_state()?;
    let gains: Option<Vec<f32>> = t
        .gains_eff
        .as_ref()
        .map(|_| (0..r).map(|c| t.gain(c)).collect());
    let want_de = t.e.is_some();
    let ad = cuda.upload_matrix(lora.a_view(r))?;
    let bd = cuda.upload_matrix(lora.b_view(r))?;
    let p = BackwardProblem {
        x,
        w,
        dy,
        a: ad.view(),
        b: bd.view(),
        gains: gains.as_deref(),
        scale,
        grad: &grad,
        want_de,
    };
    p.check(dx.as_deref())
        .map_err(|e| e.context(format!("module '{name}'")))?;
    let m = x.rows;
    let mut da = vec![0f32; r * k];
    let mut db = vec![0f32; n * r];
    let mut de = vec![0f32; r];
    if m > 0 {
        let bytes = (r * k + n * r + r) * 4;
        let buf = DeviceBuffer {
            ptr: cuda.alloc(bytes)?,
            bytes,
            backend: cuda,
        };
        let base = buf.as_ptr() as *mut f32;
        // SAFETY: the three regions lie inside `buf` (r*k, n*r and r f32).
        let (gda, gdb, gde) = unsafe { (base, base.add(r * k), base.add(r * k + n * r)) };
        // SAFETY: buf holds `bytes` bytes of device memory.
        check(
            unsafe {
                sys::cuMemsetD8Async(buf.as_ptr() as sys::CUdeviceptr, 0, bytes, cuda.stream)
            },
            "zeroing gradients",
        )?;
        let grads = DeviceGrads {
            da: gda,
            ldda: k,
            db: gdb,
            lddb: r,
            de: gde,
        };
        // SAFETY: the gradient regions are device memory of the sizes lora_backward needs and
        // live until the synchronize below (buf is dropped after it).
        unsafe {
            cuda.lora_backward(&p, grads, dx)
                .map_err(|e| e.context(format!("module '{name}'")))?;
            cuda.copy_to_host(
                da.as_mut_ptr() as *mut c_void,
                gda as *const c_void,
                r * k * 4,
            )?;
            cuda.copy_to_host(
                db.as_mut_ptr() as *mut c_void,
                gdb as *const c_void,
                n * r * 4,
            )?;
            cuda.copy_to_host(de.as_mut_ptr() as *mut c_void, gde as *const c_void, r * 4)?;
        }
        cuda.synchronize()?;
    }
    let t = lora.train_state_mut()?;
    for c in (0..r).filter(|&c| grad[c]) {
        for (dst, src) in t.ga[c * k..(c + 1) * k]
            .iter_mut()
            .zip(&da[c * k..(c + 1) * k])
        {
            *dst += src;
        }
        for j in 0..n {
            t.gb[j * cap + c] += db[j * r + c];
        }
        if want_de {
            t.ge[c] += de[c];
        }
        t.touched[c] = true;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn params_layout_matches_the_cu_files() {
        assert_eq!(offset_of!(BackwardParams, ldx), 112);
        assert_eq!(offset_of!(BackwardParams, m), 176);
        assert_eq!(offset_of!(BackwardParams, dx_dtype), 212);
        assert_eq!(offset_of!(BackwardParams, scale), 236);
        let src = include_str!("../../../kernels/lora_backward.cu");
        assert!(src.contains("sizeof(BackwardParams) == 240"));
        assert_eq!(offset_of!(AdamwParams, ld), 72);
        assert_eq!(offset_of!(AdamwParams, rows), 88);
        assert_eq!(offset_of!(AdamwParams, lr), 104);
        assert_eq!(offset_of!(AdamwParams, clip), 124);
        let src = include_str!("../../../kernels/adamw.cu");
        assert!(src.contains("sizeof(AdamwParams) == 128"));
    }

    const SHAPES: [usize; 14] = [1, 2, 3, 15, 16, 17, 63, 64, 65, 127, 129, 1000, 4097, 11008];

    fn covers(grid: u32, per: usize, n: usize) -> bool {
        grid as usize * per >= n && (grid as usize - 1) * per < n
    }

    /// Chunks of a split cover [0, k) exactly, none empty, each a multiple of 16 long.
    fn split_covers(s: KSplit, k: usize) -> bool {
        if !s.chunk.is_multiple_of(TILE_K) || s.splits == 0 {
            return false;
        }
        if k == 0 {
            return s.splits == 1;
        }
        (s.splits - 1) * s.chunk < k && s.splits * s.chunk >= k
    }

    #[test]
    fn k_splits_cover_the_reduction() {
        for tiles in [1usize, 2, 7, 64, 1000] {
            for k in [
                0usize,
                1,
                15,
                16,
                17,
                255,
                256,
                257,
                4096,
                4097,
                11008,
                1 << 20,
            ] {
                for sms in [1usize, 8, 16, 132] {
                    let s = k_split(tiles, k, sms, GRID_YZ_MAX);
                    assert!(split_covers(s, k), "{tiles} tiles, k {k}, {sms} SMs: {s:?}");
                    if s.splits > 1 {
                        assert!(s.chunk >= MIN_SPLIT_K, "{s:?}");
                    }
                    assert!(s.splits * tiles <= (2 * sms).max(tiles) * 2 || s.splits == 1);
                }
            }
        }
        assert_eq!(k_split(1, 100_000, 1000, 3).splits, 3);
    }

    #[test]
    fn backward_grids_cover_every_output() {
        for m in SHAPES {
            for r in [1usize, 2, 3, 8, 16, 31, 64, 65, 128] {
                for (k, n) in [
                    (1usize, 1usize),
                    (17, 33),
                    (4096, 4096),
                    (4097, 11008),
                    (0, 5),
                ] {
                    let (g, s) = ug_geometry(m, r, k, n, 132).unwrap();
                    assert!(covers(g.grid.0, TILE, r) && covers(g.grid.1, TILE, m));
                    assert_eq!(g.grid.2 as usize, 2 * s.splits);
                    for (len, chunk) in [(k, s.chunk_k), (n, s.chunk_n)] {
                        assert_eq!(chunk % TILE_K, 0);
                        assert!(s.splits * chunk >= len, "{len} {s:?}");
                    }
                    assert_eq!(g.block, (256, 1, 1));
                    let g = tp_geometry(m, r).unwrap();
                    assert!(covers(g.grid.0, ROW_BLOCK, r));
                    assert_eq!(g.grid.1 as usize, m.min(GRID_YZ_MAX));
                    assert_eq!(de_geometry(r).unwrap().grid, (r as u32, 1, 1));
                    if n > 0 {
                        let (g, s) = db_geometry(n, r, m, 132).unwrap();
                        assert!(covers(g.grid.0, TILE, r) && covers(g.grid.1, TILE, n));
                        assert!(split_covers(s, m) && g.grid.2 as usize == s.splits);
                    }
                    if k > 0 {
                        let (g, s) = da_geometry(r, k, m, 132).unwrap();
                        assert!(covers(g.grid.0, TILE, k) && covers(g.grid.1, TILE, r));
                        assert!(split_covers(s, m) && g.grid.2 as usize == s.splits);
                        let g = dx_geometry(m, k).unwrap();
                        assert!(covers(g.grid.0, TILE, k) && covers(g.grid.1, TILE, m));
                    }
                }
            }
        }
    }

    #[test]
    fn preconditions_are_errors_with_messages() {
        let e = dx_geometry(0, 5).unwrap_err();
        assert!(e.message.contains("empty output"), "{}", e.message);
        let e = tile_grid(64 * 65536, 5, 1, "t").unwrap_err();
        assert!(e.message.contains("grid dimension"), "{}", e.message);
        let e = ug_geometry(1 << 31, 4, 4, 4, 1).unwrap_err();
        assert!(e.message.contains("m = 2147483648"), "{}", e.message);
        let e = adamw_geometry(4, 1 << 31).unwrap_err();
        assert!(e.message.contains("cols"), "{}", e.message);
        assert!(de_geometry(0).is_err());
        assert!(backward_scratch(usize::MAX / 2, 3).is_err());
    }

    #[test]
    fn adamw_grid_covers_columns_and_strides_rows() {
        for rows in SHAPES.iter().copied().chain([65535, 65536, 1 << 24]) {
            for cols in [1usize, 3, 255, 256, 257, 4096, 65536] {
                let g = adamw_geometry(rows, cols).unwrap();
                assert!(covers(g.grid.0, ROW_BLOCK, cols));
                assert_eq!(g.grid.1 as usize, rows.min(GRID_YZ_MAX));
                assert_eq!(g.grid.2, 1);
            }
        }
    }

    #[test]
    fn scratch_regions_are_aligned_and_disjoint() {
        for m in [1usize, 7, 512] {
            for r in [1usize, 3, 64] {
                let s = backward_scratch(m, r).unwrap();
                let regions = [
                    (s.u, m * r * 4),
                    (s.g, m * r * 4),
                    (s.gains, r * 4),
                    (s.grad, r),
                    (s.active, r),
                ];
                let mut end = 0;
                for (off, len) in regions {
                    assert_eq!(off % 256, 0);
                    assert!(off >= end);
                    end = off + len;
                }
                assert!(end <= s.total);
                // U and G are cleared together, up to (not into) the gains region.
                assert!(s.gains >= s.g + m * r * 4 && s.g >= s.u + m * r * 4);
            }
        }
    }

    #[test]
    fn bias_corrections_match_the_cpu_formula() {
        let o = AdamW::default();
        for step in [1u32, 2, 10, 1000] {
            let (b1, b2) = bias_corrections(&o, step);
            assert_eq!(b1, 1.0 - o.beta1.powi(step as i32));
            assert_eq!(b2, (1.0 - o.beta2.powi(step as i32)).sqrt());
        }
    }

    #[test]
    fn kernel_names_follow_the_convention() {
        for k in kernels_for_sm(70) {
            assert!(
                k.ends_with("_f32") || k.ends_with("_f16") || k.ends_with("_bf16"),
                "{k}"
            );
        }
        assert_eq!(ug_kernel(DType::BF16), "lora_backward_ug_bf16");
        assert_eq!(adamw_kernel(DType::F16), "adamw_f16");
    }
}
