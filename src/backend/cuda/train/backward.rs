//! The LoRA backward (`kernels/lora_backward.cu`): the parameter block, the grids and K splits
//! of its six kernels, the scratch layout and `CudaBackend::lora_backward`.

use super::{check_int_dims, dtype_suffix, k_split, rows_grid, tile_grid, KSplit};
use super::{grid_dim, GRID_X_MAX, TILE, TILE_K};
use crate::backend::cuda::launch::{dtype_code, Geometry, BLOCK, GRID_YZ_MAX};
use crate::backend::cuda::{check, guard, CudaBackend};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::MatMut;
use crate::train::backward::BackwardProblem;
use cudarc::driver::sys;
use std::ffi::c_void;

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
pub(super) enum Gains<'a> {
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

    pub(super) fn backward_inner(
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
