//! KRAdapter and EigenLoRAx modules in `rf_linear` calls and their backward, on the GPU.
//!
//! A call whose slots include those kinds (`CudaBackend::linear_composed`, fed by
//! `methods::cuda`, which turns the call's slots into the updates below):
//! 1. the fused linear (`CudaBackend::linear`) writes `x Wᵀ + bias + Σ LoRA` in f32 into a
//!    scratch `base` (m x n), the kinds' slots being absent there;
//! 2. each KRAdapter slot adds `s · x ΔWᵀ` for its rows (`kron_forward_*` with a row list,
//!    ΔW generated in shared memory, never stored);
//! 3. each EigenLoRAx basis of the call projects every row once (`eigen_project_*`:
//!    z = x C_A), applies the row's core in the K coordinates (`eigen_core_f32`) and adds
//!    u C_Bᵀ to base (`eigen_expand_*` with to_base);
//! 4. `compose_store_*` rounds base into y once.
//!
//! The modules' parameters (U, Vᵀ, cores, the basis) live in host memory and are copied into the
//! call's one scratch allocation (stream-ordered); everything is asynchronous on the stream.
//!
//! Backward (`kron_backward`, `eigen_backward`): dU, dV through `kron_backward_uv_*` (G = dyᵀx a
//! tile at a time, reduced to the slices' components, never stored) and dx = dy (W + sΔW) in one
//! GEMM; EigenLoRAx's z = x C_A[:, :k] and dz = dy C_B[:, :k] on the device, the loadings' small
//! products on the host, dx = dy W + dzin C_A[:, :k]ᵀ through `lora_backward_dx_*`.

use super::algebra_ops::{
    eigen_core_geometry, eigen_expand_geometry, eigen_expand_kernel, eigen_project_geometry,
    eigen_project_kernel, kron_backward_dx_kernel, kron_backward_uv_kernel, kron_forward_geometry,
    kron_forward_kernel, EigenParams, KronParams, EIGEN_CORE_KERNEL,
};
use super::launch::{dtype_code, Geometry};
use super::train::{
    check_int_dims, dtype_suffix, dx_geometry, dx_kernel, rows_grid, tile_grid, BackwardParams,
};
use super::{check, f32_bytes, guard, CudaBackend};
use crate::adapter::BasisModule;
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use cudarc::driver::sys;
use std::ffi::c_void;

/// Mirrors `struct ComposeParams` in kernels/compose.cu (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ComposeParams {
    pub src: *const f32,
    pub y: *mut c_void,
    pub lds: i64,
    pub ldy: i64,
    pub m: i32,
    pub n: i32,
    pub y_dtype: i32,
    pub pad: i32,
}

const _: () = assert!(std::mem::size_of::<ComposeParams>() == 48);

pub fn compose_store_kernel(y_dtype: DType) -> String {
    format!("compose_store_{}", dtype_suffix(y_dtype))
}

/// `compose_store_*`: y (m x n), one thread per column, rows by grid-stride.
pub fn compose_store_geometry(m: usize, n: usize) -> Result<Geometry> {
    rows_grid(m, n, "compose_store")
}

/// `kron_backward_uv_*`: one CTA per 64 x 64 tile of G = dyᵀ x (out x in).
pub fn kron_backward_uv_geometry(out: usize, inp: usize) -> Result<Geometry> {
    tile_grid(out, inp, 1, "kron_backward_uv")
}

/// `kron_backward_dx_*`: dx (batch x in).
pub fn kron_backward_dx_geometry(batch: usize, inp: usize) -> Result<Geometry> {
    tile_grid(batch, inp, 1, "kron_backward_dx")
}

/// Every kernel of compose.cu.
pub fn kernels_for_sm(_sm: u32) -> Vec<String> {
    DType::ALL
        .iter()
        .map(|&d| compose_store_kernel(d))
        .collect()
}

/// A KRAdapter slot of a call: U (m x r) and Vᵀ (w x m), f32 row-major in host memory, the
/// slot's scale (scale_mult included) and its rows (None: every row of the call).
pub struct KronUpdate<'a> {
    pub module: &'a str,
    pub out: usize,
    pub inp: usize,
    pub r: usize,
    pub w: usize,
    pub u: &'a [f32],
    pub vt: &'a [f32],
    pub scale: f32,
    pub rows: Option<Vec<i32>>,
}

impl KronUpdate<'_> {
    fn m(&self) -> usize {
        self.out.min(self.inp)
    }

    fn check(&self) -> Result<()> {
        let m = self.m();
        if self.u.len() != m * self.r || self.vt.len() != self.w * m || self.r == 0 {
            return Err(Error::internal(format!(
                "KRAdapter module '{}': U has {} values, Vᵀ {}, for m {m}, r {}, w {}",
                self.module,
                self.u.len(),
                self.vt.len(),
                self.r,
                self.w
            )));
        }
        if self.r * self.w < self.out.max(self.inp) {
            return Err(Error::internal(format!(
                "KRAdapter module '{}': r (r + d) = {} does not cover {}",
                self.module,
                self.r * self.w,
                self.out.max(self.inp)
            )));
        }
        Ok(())
    }
}

/// The EigenLoRAx slots of a call on one basis module: `n_cores` K x K cores (row-major,
/// each `scale · a_kᵀ diag(g) b_kᵀ` padded with zeros past the slot's k) and the core of each
/// row (-1: none); None = every row uses core 0 (a stacked call: the sum of the cores).
pub struct EigenUpdate<'a> {
    pub basis: &'a BasisModule,
    pub cores: Vec<f32>,
    pub n_cores: usize,
    pub row_core: Option<Vec<i32>>,
}

/// 256-byte aligned regions of one scratch allocation.
struct Regions {
    offs: Vec<usize>,
    total: usize,
}

fn regions(sizes: &[usize]) -> Result<Regions> {
    let mut offs = Vec::with_capacity(sizes.len());
    let mut off = 0usize;
    for &s in sizes {
        offs.push(off);
        off = s
            .checked_next_multiple_of(256)
            .and_then(|s| off.checked_add(s))
            .ok_or_else(|| Error::unsupported("scratch size overflows"))?;
    }
    Ok(Regions {
        offs,
        total: off.max(256),
    })
}

fn i32_bytes(v: &[i32]) -> &[u8] {
    // SAFETY: as f32_bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

fn bytes4(n: usize) -> Result<usize> {
    n.checked_mul(4)
        .ok_or_else(|| Error::unsupported("scratch size overflows"))
}

impl CudaBackend {
    /// Runs `f` with one stream-ordered scratch allocation laid out as `sizes` (256-byte aligned
    /// regions; `at(i)` is region i's device address) and frees it (ordered after the work `f`
    /// queued) whatever `f` returns.
    fn with_scratch<T>(
        &self,
        sizes: &[usize],
        f: impl FnOnce(&dyn Fn(usize) -> sys::CUdeviceptr) -> Result<T>,
    ) -> Result<T> {
        let reg = regions(sizes)?;
        let scratch = self.alloc_scratch(reg.total)?;
        let at = |i: usize| scratch + reg.offs[i] as sys::CUdeviceptr;
        let result = f(&at);
        let freed = self.free_scratch(scratch);
        result.and_then(|v| freed.map(|()| v))
    }

    /// `y = round(x Wᵀ + bias + Σ LoRA slots + Σ kron + Σ eigen)`: `p` holds the LoRA slots
    /// (the other kinds' positions None). x, w, bias, y device memory. Asynchronous.
    pub fn linear_composed(
        &self,
        p: &LinearProblem<'_>,
        kron: &[KronUpdate<'_>],
        eigen: &[EigenUpdate<'_>],
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        p.check(y)?;
        let (m, n, k) = (p.m(), p.n(), p.k());
        for u in kron {
            u.check()?;
            if (u.out, u.inp) != (n, k) {
                return Err(Error::shape(format!(
                    "KRAdapter module '{}' is for {} x {}, the call's w is {n} x {k}",
                    u.module, u.out, u.inp
                )));
            }
            if let Some(rows) = &u.rows {
                if rows.iter().any(|&r| r < 0 || r as usize >= m) {
                    return Err(Error::internal("KRAdapter row outside the call"));
                }
            }
        }
        for e in eigen {
            let kb = e.basis.k();
            if (e.basis.out_features, e.basis.in_features) != (n, k)
                || e.cores.len() != e.n_cores * kb * kb
                || e.n_cores == 0
            {
                return Err(Error::internal(format!(
                    "EigenLoRAx basis '{}': cores or shape do not match the call",
                    e.basis.name
                )));
            }
            if let Some(rc) = &e.row_core {
                if rc.len() != m || rc.iter().any(|&c| c < -1 || c >= e.n_cores as i32) {
                    return Err(Error::internal("EigenLoRAx row core outside the cores"));
                }
            }
        }
        check_int_dims("composed linear", &[("m", m), ("n", n), ("k", k)])?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        guard(|| {
            self.bind()?;
            self.require_device_ptrs(&[("y", y.as_ref().as_ptr())])?;
            self.composed_inner(p, kron, eigen, y)
        })
    }

    fn composed_inner(
        &self,
        p: &LinearProblem<'_>,
        kron: &[KronUpdate<'_>],
        eigen: &[EigenUpdate<'_>],
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        let (m, n, k) = (p.m(), p.n(), p.k());
        // Host data to copy, and the sizes of every region: base, then per slot / basis.
        let mut sizes = vec![bytes4(m * n)?];
        let mut host: Vec<(usize, &[u8])> = Vec::new();
        for u in kron {
            host.push((sizes.len(), f32_bytes(u.u)));
            sizes.push(bytes4(u.u.len())?);
            host.push((sizes.len(), f32_bytes(u.vt)));
            sizes.push(bytes4(u.vt.len())?);
            if let Some(rows) = &u.rows {
                host.push((sizes.len(), i32_bytes(rows)));
            }
            sizes.push(bytes4(u.rows.as_ref().map_or(0, |r| r.len()))?);
        }
        for e in eigen {
            let kb = e.basis.k();
            let ca_t = e.basis.ca_t.view();
            let cb = e.basis.cb_rows.view();
            // SAFETY: both are owned, contiguous f32 matrices of the basis (K x in, out x K).
            let (ca_t, cb) = unsafe {
                (
                    std::slice::from_raw_parts(ca_t.as_ptr(), ca_t.rows * ca_t.cols * 4),
                    std::slice::from_raw_parts(cb.as_ptr(), cb.rows * cb.cols * 4),
                )
            };
            host.push((sizes.len(), ca_t));
            sizes.push(ca_t.len());
            host.push((sizes.len(), cb));
            sizes.push(cb.len());
            host.push((sizes.len(), f32_bytes(&e.cores)));
            sizes.push(bytes4(e.cores.len())?);
            if let Some(rc) = &e.row_core {
                host.push((sizes.len(), i32_bytes(rc)));
            }
            sizes.push(bytes4(m)?);
            sizes.push(bytes4(m * kb)?); // z
            sizes.push(bytes4(m * kb)?); // u
        }
        self.with_scratch(&sizes, |at| {
            for &(i, bytes) in &host {
                self.copy_htod_raw(at(i), bytes.as_ptr(), bytes.len())?;
            }
            let base_ptr = at(0) as *mut f32;
            // SAFETY: region 0 holds m x n f32 inside the scratch allocation, alive until
            // free_scratch (stream-ordered after every launch here).
            let mut base = unsafe { MatMut::from_raw(base_ptr as *mut u8, DType::F32, m, n, n) };
            self.linear(p, &mut base)?;
            let mut region = 1;
            for u in kron {
                let (pu, pvt, prows) = (at(region), at(region + 1), at(region + 2));
                region += 3;
                let batch = u.rows.as_ref().map_or(m, |r| r.len());
                if batch == 0 {
                    continue;
                }
                let params = KronParams {
                    x: p.x.as_ptr() as *const c_void,
                    u: pu as *const f32,
                    v: pvt as *const f32,
                    y: base_ptr as *mut c_void,
                    rows: if u.rows.is_some() {
                        prows as *const i32
                    } else {
                        std::ptr::null()
                    },
                    ldx: p.x.ld as i64,
                    ldy: n as i64,
                    v_si: 1,
                    v_sa: u.m() as i64,
                    batch: batch as i32,
                    out: n as i32,
                    inp: k as i32,
                    r: u.r as i32,
                    wv: u.w as i32,
                    rows_are_slices: (n <= k) as i32,
                    x_dtype: dtype_code(p.x.dtype),
                    y_dtype: dtype_code(DType::F32),
                    accumulate: 1,
                    scale: u.scale,
                    ..KronParams::default()
                };
                self.launch_block(
                    &kron_forward_kernel(p.x.dtype),
                    kron_forward_geometry(batch, n, k)?,
                    &params,
                )?;
            }
            for e in eigen {
                let kb = e.basis.k();
                let (pca, pcb, pcores, prc, pz, pu) = (
                    at(region),
                    at(region + 1),
                    at(region + 2),
                    at(region + 3),
                    at(region + 4),
                    at(region + 5),
                );
                region += 6;
                let params = EigenParams {
                    x: p.x.as_ptr() as *const c_void,
                    c_a: pca as *const f32,
                    c_b: pcb as *const f32,
                    cores: pcores as *const f32,
                    row_slot: if e.row_core.is_some() {
                        prc as *const i32
                    } else {
                        std::ptr::null()
                    },
                    z: pz as *mut f32,
                    u: pu as *mut f32,
                    base: base_ptr,
                    ldx: p.x.ld as i64,
                    // C_A[kk, c] = C_Aᵀ[c, kk].
                    ca_rs: 1,
                    ca_cs: k as i64,
                    ldcb: kb as i64,
                    ldbase: n as i64,
                    m: m as i32,
                    n: n as i32,
                    inp: k as i32,
                    kc: kb as i32,
                    n_cores: e.n_cores as i32,
                    x_dtype: dtype_code(p.x.dtype),
                    y_dtype: dtype_code(DType::F32),
                    to_base: 1,
                    ..EigenParams::default()
                };
                self.launch_block(
                    &eigen_project_kernel(p.x.dtype),
                    eigen_project_geometry(m, kb)?,
                    &params,
                )?;
                self.launch_block(EIGEN_CORE_KERNEL, eigen_core_geometry(m, kb)?, &params)?;
                self.launch_block(
                    &eigen_expand_kernel(DType::F32),
                    eigen_expand_geometry(m, n)?,
                    &params,
                )?;
            }
            let cp = ComposeParams {
                src: base_ptr,
                y: y.as_mut_ptr() as *mut c_void,
                lds: n as i64,
                ldy: y.ld as i64,
                m: m as i32,
                n: n as i32,
                y_dtype: dtype_code(y.dtype),
                pad: 0,
            };
            self.launch_block(
                &compose_store_kernel(y.dtype),
                compose_store_geometry(m, n)?,
                &cp,
            )
        })
    }

    /// A KRAdapter's gradients for `dy` at `x` (device memory, batch rows): returns dU (m x r)
    /// and dV (m x w, row-major) as host vectors, and writes dx = dy (W + sΔW) (dy sΔW when
    /// `w` is None) when `dx` is given. Synchronizes.
    pub fn kron_backward(
        &self,
        u: &KronUpdate<'_>,
        x: MatRef<'_>,
        w: Option<MatRef<'_>>,
        dy: MatRef<'_>,
        dx: Option<&mut MatMut<'_>>,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        u.check()?;
        let (batch, out, inp, m) = (x.rows, u.out, u.inp, u.m());
        if x.cols != inp || dy.cols != out || dy.rows != batch {
            return Err(Error::shape(format!(
                "KRAdapter module '{}' ({out} x {inp}): x is {} x {}, dy is {} x {}",
                u.module, x.rows, x.cols, dy.rows, dy.cols
            )));
        }
        if let Some(w) = &w {
            if (w.rows, w.cols) != (out, inp) || w.dtype.is_quantized() {
                return Err(Error::shape(format!(
                    "KRAdapter module '{}': w is {} x {} {}, expected a dense {out} x {inp}",
                    u.module,
                    w.rows,
                    w.cols,
                    w.dtype.name()
                )));
            }
        }
        if let Some(d) = &dx {
            if (d.rows, d.cols) != (batch, inp) {
                return Err(Error::shape(format!(
                    "KRAdapter module '{}': dx is {} x {}, expected {batch} x {inp}",
                    u.module, d.rows, d.cols
                )));
            }
        }
        check_int_dims(
            "kron backward",
            &[("batch", batch), ("out", out), ("in", inp)],
        )?;
        if batch == 0 {
            return Ok((vec![0f32; m * u.r], vec![0f32; m * u.w]));
        }
        guard(|| {
            self.bind()?;
            let mut ptrs = vec![("x", x.as_ptr()), ("dy", dy.as_ptr())];
            if let Some(w) = &w {
                ptrs.push(("w", w.as_ptr()));
            }
            if let Some(d) = &dx {
                ptrs.push(("dx", d.as_ref().as_ptr()));
            }
            self.require_device_ptrs(&ptrs)?;
            let sizes = [
                bytes4(u.u.len())?,
                bytes4(u.vt.len())?,
                bytes4(m * u.r)?,
                bytes4(m * u.w)?,
            ];
            self.with_scratch(&sizes, |at| {
                self.copy_htod_raw(at(0), f32_bytes(u.u).as_ptr(), sizes[0])?;
                self.copy_htod_raw(at(1), f32_bytes(u.vt).as_ptr(), sizes[1])?;
                // SAFETY: regions 2 and 3 are device memory of these sizes.
                for (r, &bytes) in sizes.iter().enumerate().skip(2) {
                    check(
                        unsafe { sys::cuMemsetD8Async(at(r), 0, bytes, self.stream) },
                        "zeroing gradients",
                    )?;
                }
                let mut params = KronParams {
                    x: x.as_ptr() as *const c_void,
                    u: at(0) as *const f32,
                    v: at(1) as *const f32,
                    w: w.map_or(std::ptr::null_mut(), |w| w.as_ptr() as *mut c_void),
                    dy: dy.as_ptr() as *const c_void,
                    du: at(2) as *mut f32,
                    dv: at(3) as *mut f32,
                    ldx: x.ld as i64,
                    ldw: w.map_or(0, |w| w.ld as i64),
                    lddy: dy.ld as i64,
                    v_si: 1,
                    v_sa: m as i64,
                    batch: batch as i32,
                    out: out as i32,
                    inp: inp as i32,
                    r: u.r as i32,
                    wv: u.w as i32,
                    rows_are_slices: (out <= inp) as i32,
                    x_dtype: dtype_code(x.dtype),
                    w_dtype: w.map_or(0, |w| dtype_code(w.dtype)),
                    dy_dtype: dtype_code(dy.dtype),
                    scale: u.scale,
                    ..KronParams::default()
                };
                self.launch_block(
                    &kron_backward_uv_kernel(x.dtype),
                    kron_backward_uv_geometry(out, inp)?,
                    &params,
                )?;
                if let Some(d) = dx {
                    params.dx = d.as_mut_ptr() as *mut c_void;
                    params.lddx = d.ld as i64;
                    params.dx_dtype = dtype_code(d.dtype);
                    let wd = w.map_or(DType::F32, |w| w.dtype);
                    self.launch_block(
                        &kron_backward_dx_kernel(wd),
                        kron_backward_dx_geometry(batch, inp)?,
                        &params,
                    )?;
                }
                // SAFETY: regions 2 and 3 hold dU (m x r) and dV (m x w) f32.
                unsafe {
                    Ok((
                        self.read_f32(at(2) as *const c_void, m * u.r)?,
                        self.read_f32(at(3) as *const c_void, m * u.w)?,
                    ))
                }
            })
        })
    }

    /// An EigenLoRAx module's backward at the first `k` basis components: z = x C_A[:, :k] and
    /// dz = dy C_B[:, :k] (m x k, row-major) are formed on the device and handed to `host`,
    /// which accumulates the loadings' gradients and returns dzin (m x k, row-major); then
    /// dx = dy W + dzin C_A[:, :k]ᵀ is written when `dx` is given. Synchronizes.
    #[allow(clippy::too_many_arguments)]
    pub fn eigen_backward(
        &self,
        basis: &BasisModule,
        k: usize,
        x: MatRef<'_>,
        w: MatRef<'_>,
        dy: MatRef<'_>,
        dx: Option<&mut MatMut<'_>>,
        host: impl FnOnce(&[f32], &[f32]) -> Result<Vec<f32>>,
    ) -> Result<()> {
        let (m, inp, out, kb) = (x.rows, basis.in_features, basis.out_features, basis.k());
        if k == 0 || k > kb {
            return Err(Error::internal(format!(
                "EigenLoRAx basis '{}': {k} of {kb} components",
                basis.name
            )));
        }
        if x.cols != inp || dy.cols != out || dy.rows != m || (w.rows, w.cols) != (out, inp) {
            return Err(Error::shape(format!(
                "EigenLoRAx basis '{}' ({out} x {inp}): x is {} x {}, dy {} x {}, w {} x {}",
                basis.name, x.rows, x.cols, dy.rows, dy.cols, w.rows, w.cols
            )));
        }
        if w.dtype.is_quantized() {
            return Err(Error::dtype(format!(
                "w is {}: the backward reads a dense W",
                w.dtype.name()
            )));
        }
        if let Some(d) = &dx {
            if (d.rows, d.cols) != (m, inp) {
                return Err(Error::shape(format!(
                    "dx is {} x {}, expected {m} x {inp}",
                    d.rows, d.cols
                )));
            }
        }
        check_int_dims(
            "eigen backward",
            &[("m", m), ("out", out), ("in", inp), ("K", kb)],
        )?;
        if m == 0 {
            host(&[], &[])?;
            return Ok(());
        }
        guard(|| {
            self.bind()?;
            let mut ptrs = vec![("x", x.as_ptr()), ("dy", dy.as_ptr()), ("w", w.as_ptr())];
            if let Some(d) = &dx {
                ptrs.push(("dx", d.as_ref().as_ptr()));
            }
            self.require_device_ptrs(&ptrs)?;
            let ca_t = basis.ca_t.view();
            let cb = basis.cb_rows.view();
            let sizes = [
                bytes4(kb * inp)?,
                bytes4(out * kb)?,
                bytes4(m * k)?, // z, then dzin
                bytes4(m * k)?, // dz
            ];
            self.with_scratch(&sizes, |at| {
                self.copy_htod_raw(at(0), ca_t.as_ptr(), sizes[0])?;
                self.copy_htod_raw(at(1), cb.as_ptr(), sizes[1])?;
                let common = EigenParams {
                    m: m as i32,
                    kc: k as i32,
                    z: at(2) as *mut f32,
                    ..EigenParams::default()
                };
                // z = x C_A[:, :k] (C_A[kk, c] = C_Aᵀ[c, kk]).
                let pz = EigenParams {
                    x: x.as_ptr() as *const c_void,
                    c_a: at(0) as *const f32,
                    ldx: x.ld as i64,
                    ca_rs: 1,
                    ca_cs: inp as i64,
                    inp: inp as i32,
                    x_dtype: dtype_code(x.dtype),
                    ..common
                };
                self.launch_block(
                    &eigen_project_kernel(x.dtype),
                    eigen_project_geometry(m, k)?,
                    &pz,
                )?;
                // dz = dy C_B[:, :k].
                let pdz = EigenParams {
                    x: dy.as_ptr() as *const c_void,
                    c_a: at(1) as *const f32,
                    ldx: dy.ld as i64,
                    ca_rs: kb as i64,
                    ca_cs: 1,
                    inp: out as i32,
                    x_dtype: dtype_code(dy.dtype),
                    z: at(3) as *mut f32,
                    ..common
                };
                self.launch_block(
                    &eigen_project_kernel(dy.dtype),
                    eigen_project_geometry(m, k)?,
                    &pdz,
                )?;
                // SAFETY: regions 2 and 3 hold z and dz (m x k f32 each).
                let (z, dz) = unsafe {
                    (
                        self.read_f32(at(2) as *const c_void, m * k)?,
                        self.read_f32(at(3) as *const c_void, m * k)?,
                    )
                };
                let dzin = host(&z, &dz)?;
                if dzin.len() != m * k {
                    return Err(Error::internal("dzin has the wrong size"));
                }
                if let Some(d) = dx {
                    self.copy_htod_raw(at(2), f32_bytes(&dzin).as_ptr(), sizes[2])?;
                    // dx = [dy | dzin] · [W ; C_A[:, :k]ᵀ] (C_Aᵀ's first k rows).
                    let bp = BackwardParams {
                        w: w.as_ptr() as *const c_void,
                        dy: dy.as_ptr() as *const c_void,
                        a: at(0) as *const c_void,
                        g: at(2) as *mut f32,
                        dx: d.as_mut_ptr() as *mut c_void,
                        ldw: w.ld as i64,
                        lddy: dy.ld as i64,
                        lda: inp as i64,
                        lddx: d.ld as i64,
                        m: m as i32,
                        n: out as i32,
                        k: inp as i32,
                        r: k as i32,
                        w_dtype: dtype_code(w.dtype),
                        dy_dtype: dtype_code(dy.dtype),
                        a_dtype: dtype_code(DType::F32),
                        dx_dtype: dtype_code(d.dtype),
                        ..BackwardParams::default()
                    };
                    self.launch_block(&dx_kernel(w.dtype), dx_geometry(m, inp)?, &bp)?;
                    self.synchronize()?;
                }
                Ok(())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn compose_params_layout_matches_the_cu_file() {
        assert_eq!(offset_of!(ComposeParams, lds), 16);
        assert_eq!(offset_of!(ComposeParams, m), 32);
        assert_eq!(offset_of!(ComposeParams, pad), 44);
        assert!(include_str!("../../../kernels/compose.cu").contains("sizeof(ComposeParams) == 48"));
    }

    #[test]
    fn regions_are_aligned_and_disjoint() {
        let r = regions(&[4, 0, 1000, 256, 3]).unwrap();
        assert_eq!(r.offs, vec![0, 256, 256, 1280, 1536]);
        assert_eq!(r.total, 1792);
        assert!(regions(&[usize::MAX - 10]).is_err());
        assert_eq!(regions(&[]).unwrap().total, 256);
    }

    #[test]
    fn geometry_covers_outputs() {
        let g = kron_backward_uv_geometry(130, 70).unwrap();
        assert_eq!((g.grid.0, g.grid.1), (2, 3));
        let g = kron_backward_dx_geometry(5, 4097).unwrap();
        assert_eq!((g.grid.0, g.grid.1), (65, 1));
        let g = compose_store_geometry(70000, 257).unwrap();
        assert_eq!((g.grid.0, g.grid.1), (2, 65535));
        assert!(compose_store_geometry(0, 3).is_err());
    }
}
