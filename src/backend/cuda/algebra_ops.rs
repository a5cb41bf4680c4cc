//! KRAdapter (`kernels/kron.cu`) and EigenLoRAx serving (`kernels/eigen.cu`) on the GPU: the
//! parameter blocks and launch geometry (pure, unit-tested), device copies of a `Kron` module,
//! of an EigenLoRAx basis module and of adapters' cores, and the launches.
//!
//! - `CudaBackend::kron_forward`: y (+)= scale · x ΔWᵀ without storing ΔW (the tiles of ΔW are
//!   generated from U and V in shared memory), `Kron::forward` semantics;
//!   `CudaBackend::kron_merge`: W ← W ± ΔW, `Kron::merge_into` semantics (same operation order).
//! - `CudaBackend::eigen_linear`: `crate::algebra::eigen::eigen_linear` — base through the fused
//!   linear into f32, z = x C_A once, u = z · core(slot), y = round(base + u C_Bᵀ).

use super::launch::{dtype_code, Geometry};
use super::train::{check_int_dims, dtype_suffix, rows_grid, tile_grid};
use super::{f32_bytes, guard, CudaBackend, DeviceBuffer};
use crate::adapter::kron::Kron;
use crate::algebra::eigen::{BasisModule, EigenModule};
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use cudarc::driver::sys;
use std::ffi::c_void;

/// Mirrors `struct KronParams` in kernels/kron.cu (192 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KronParams {
    pub x: *const c_void,
    pub u: *const f32,
    pub v: *const f32,
    pub y: *mut c_void,
    pub w: *mut c_void,
    pub rows: *const i32,
    pub dy: *const c_void,
    pub du: *mut f32,
    pub dv: *mut f32,
    pub dx: *mut c_void,
    pub ldx: i64,
    pub ldy: i64,
    pub ldw: i64,
    pub lddy: i64,
    pub lddx: i64,
    /// V[i, a] at v[i * v_si + a * v_sa].
    pub v_si: i64,
    pub v_sa: i64,
    pub batch: i32,
    pub out: i32,
    pub inp: i32,
    pub r: i32,
    pub wv: i32,
    pub rows_are_slices: i32,
    pub x_dtype: i32,
    pub y_dtype: i32,
    pub w_dtype: i32,
    pub dy_dtype: i32,
    pub dx_dtype: i32,
    pub accumulate: i32,
    pub scale: f32,
    pub sign: f32,
}

const _: () = assert!(std::mem::size_of::<KronParams>() == 192);

impl Default for KronParams {
    fn default() -> Self {
        KronParams {
            x: std::ptr::null(),
            u: std::ptr::null(),
            v: std::ptr::null(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            rows: std::ptr::null(),
            dy: std::ptr::null(),
            du: std::ptr::null_mut(),
            dv: std::ptr::null_mut(),
            dx: std::ptr::null_mut(),
            ldx: 0,
            ldy: 0,
            ldw: 0,
            lddy: 0,
            lddx: 0,
            v_si: 1,
            v_sa: 1,
            batch: 0,
            out: 0,
            inp: 0,
            r: 1,
            wv: 1,
            rows_are_slices: 0,
            x_dtype: 0,
            y_dtype: 0,
            w_dtype: 0,
            dy_dtype: 0,
            dx_dtype: 0,
            accumulate: 0,
            scale: 0.0,
            sign: 1.0,
        }
    }
}

/// Mirrors `struct EigenParams` in kernels/eigen.cu (152 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EigenParams {
    pub x: *const c_void,
    pub c_a: *const f32,
    pub c_b: *const f32,
    pub cores: *const f32,
    pub row_slot: *const i32,
    pub z: *mut f32,
    pub u: *mut f32,
    pub base: *mut f32,
    pub y: *mut c_void,
    pub ldx: i64,
    /// C_A[kk, c] at c_a[kk * ca_rs + c * ca_cs].
    pub ca_rs: i64,
    pub ca_cs: i64,
    pub ldcb: i64,
    pub ldbase: i64,
    pub ldy: i64,
    pub m: i32,
    pub n: i32,
    pub inp: i32,
    pub kc: i32,
    pub n_cores: i32,
    pub x_dtype: i32,
    pub y_dtype: i32,
    /// eigen_expand: add u C_Bᵀ into `base` (f32) instead of storing y.
    pub to_base: i32,
}

const _: () = assert!(std::mem::size_of::<EigenParams>() == 152);

impl Default for EigenParams {
    fn default() -> Self {
        EigenParams {
            x: std::ptr::null(),
            c_a: std::ptr::null(),
            c_b: std::ptr::null(),
            cores: std::ptr::null(),
            row_slot: std::ptr::null(),
            z: std::ptr::null_mut(),
            u: std::ptr::null_mut(),
            base: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            ldx: 0,
            ca_rs: 0,
            ca_cs: 1,
            ldcb: 0,
            ldbase: 0,
            ldy: 0,
            m: 0,
            n: 0,
            inp: 0,
            kc: 0,
            n_cores: 0,
            x_dtype: 0,
            y_dtype: 0,
            to_base: 0,
        }
    }
}

/// `kron_forward_*`: output batch x out in 64 x 64 tiles.
pub fn kron_forward_geometry(batch: usize, out: usize, inp: usize) -> Result<Geometry> {
    check_int_dims(
        "kron forward",
        &[("batch", batch), ("out", out), ("in", inp)],
    )?;
    tile_grid(batch, out, 1, "kron_forward")
}

/// `kron_merge_*`: W (out x in) elementwise, one thread per column, rows by grid-stride.
pub fn kron_merge_geometry(out: usize, inp: usize) -> Result<Geometry> {
    check_int_dims("kron merge", &[("out", out), ("in", inp)])?;
    rows_grid(out, inp, "kron_merge")
}

/// `eigen_project_*`: z (m x K).
pub fn eigen_project_geometry(m: usize, k: usize) -> Result<Geometry> {
    tile_grid(m, k, 1, "eigen_project")
}

/// `eigen_core_f32`: u (m x K), one thread per column, rows by grid-stride.
pub fn eigen_core_geometry(m: usize, k: usize) -> Result<Geometry> {
    rows_grid(m, k, "eigen_core")
}

/// `eigen_expand_*`: y (m x n).
pub fn eigen_expand_geometry(m: usize, n: usize) -> Result<Geometry> {
    tile_grid(m, n, 1, "eigen_expand")
}

pub fn kron_forward_kernel(x_dtype: DType) -> String {
    format!("kron_forward_{}", dtype_suffix(x_dtype))
}
pub fn kron_backward_uv_kernel(x_dtype: DType) -> String {
    format!("kron_backward_uv_{}", dtype_suffix(x_dtype))
}
pub fn kron_backward_dx_kernel(w_dtype: DType) -> String {
    format!("kron_backward_dx_{}", dtype_suffix(w_dtype))
}
pub fn kron_merge_kernel(w_dtype: DType) -> String {
    format!("kron_merge_{}", dtype_suffix(w_dtype))
}
pub fn eigen_project_kernel(x_dtype: DType) -> String {
    format!("eigen_project_{}", dtype_suffix(x_dtype))
}
pub fn eigen_expand_kernel(y_dtype: DType) -> String {
    format!("eigen_expand_{}", dtype_suffix(y_dtype))
}
pub const EIGEN_CORE_KERNEL: &str = "eigen_core_f32";

/// Every kernel of kron.cu and eigen.cu.
pub fn kernels_for_sm(_sm: u32) -> Vec<String> {
    let mut v = vec![EIGEN_CORE_KERNEL.to_string()];
    for d in DType::ALL {
        v.push(kron_forward_kernel(d));
        v.push(kron_merge_kernel(d));
        v.push(kron_backward_uv_kernel(d));
        v.push(kron_backward_dx_kernel(d));
        v.push(eigen_project_kernel(d));
        v.push(eigen_expand_kernel(d));
    }
    v
}

/// Byte offsets of `eigen_linear`'s scratch (256-byte aligned regions): base (m x n f32), z and
/// u (m x K f32 each), row_slot (m i32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EigenScratch {
    pub base: usize,
    pub z: usize,
    pub u: usize,
    pub row_slot: usize,
    pub total: usize,
}

pub fn eigen_scratch(m: usize, n: usize, k: usize) -> Result<EigenScratch> {
    let ovf = || {
        Error::unsupported(format!(
            "eigen linear: scratch for {m} x {n}, K = {k} overflows"
        ))
    };
    let sizes = [
        m.checked_mul(n).and_then(|v| v.checked_mul(4)),
        m.checked_mul(k).and_then(|v| v.checked_mul(4)),
        m.checked_mul(k).and_then(|v| v.checked_mul(4)),
        m.checked_mul(4),
    ];
    let mut offs = [0usize; 4];
    let mut off = 0usize;
    for (o, s) in offs.iter_mut().zip(sizes) {
        let s = s.ok_or_else(ovf)?;
        *o = off;
        off = off.checked_add(s.div_ceil(256) * 256).ok_or_else(ovf)?;
    }
    Ok(EigenScratch {
        base: offs[0],
        z: offs[1],
        u: offs[2],
        row_slot: offs[3],
        total: off,
    })
}

/// A KRAdapter module on the device (U m x r, V m x (r + d), f32).
pub struct DeviceKron<'a> {
    pub module: String,
    pub out_features: usize,
    pub in_features: usize,
    pub r: usize,
    pub d: usize,
    pub scale: f32,
    u: DeviceBuffer<'a>,
    v: DeviceBuffer<'a>,
}

/// One module's EigenLoRAx basis on the device: C_A (in x K) and C_B (out x K), row-major f32.
pub struct DeviceEigenBasis<'a> {
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
    pub k: usize,
    c_a: DeviceBuffer<'a>,
    c_b: DeviceBuffer<'a>,
}

/// The K x K cores of the adapters of one call, on the device: one per slot (zero for absent
/// slots), or one summed core for a stacked call.
pub struct DeviceEigenCores<'a> {
    pub k: usize,
    pub n_cores: usize,
    pub stacked: bool,
    buf: DeviceBuffer<'a>,
}

impl CudaBackend {
    pub fn upload_kron(&self, k: &Kron) -> Result<DeviceKron<'_>> {
        Ok(DeviceKron {
            module: k.name.clone(),
            out_features: k.out_features,
            in_features: k.in_features,
            r: k.r,
            d: k.d,
            scale: k.scale,
            u: self.upload(f32_bytes(&k.u))?,
            v: self.upload(f32_bytes(&k.v))?,
        })
    }

    fn kron_params(&self, k: &DeviceKron<'_>) -> KronParams {
        KronParams {
            u: k.u.as_ptr() as *const f32,
            v: k.v.as_ptr() as *const f32,
            out: k.out_features as i32,
            inp: k.in_features as i32,
            r: k.r as i32,
            wv: (k.r + k.d) as i32,
            v_si: (k.r + k.d) as i64,
            v_sa: 1,
            rows_are_slices: (k.out_features <= k.in_features) as i32,
            scale: k.scale,
            ..KronParams::default()
        }
    }

    /// y = (accumulate ? y : 0) + scale · x ΔWᵀ for x (batch x in) and y (batch x out), device
    /// memory, any dtypes. Asynchronous on the stream.
    pub fn kron_forward(
        &self,
        k: &DeviceKron<'_>,
        x: MatRef<'_>,
        y: &mut MatMut<'_>,
        accumulate: bool,
    ) -> Result<()> {
        if x.cols != k.in_features || y.rows != x.rows || y.cols != k.out_features {
            return Err(Error::shape(format!(
                "kron module '{}': x is {} x {}, y is {} x {}; the adapter is {} x {} (out x in)",
                k.module, x.rows, x.cols, y.rows, y.cols, k.out_features, k.in_features
            )));
        }
        let batch = x.rows;
        if batch == 0 {
            return Ok(());
        }
        let g = kron_forward_geometry(batch, k.out_features, k.in_features)?;
        guard(|| {
            self.bind()?;
            self.require_device_ptrs(&[("x", x.as_ptr()), ("y", y.as_ref().as_ptr())])?;
            let params = KronParams {
                x: x.as_ptr() as *const c_void,
                y: y.as_mut_ptr() as *mut c_void,
                ldx: x.ld as i64,
                ldy: y.ld as i64,
                batch: batch as i32,
                x_dtype: dtype_code(x.dtype),
                y_dtype: dtype_code(y.dtype),
                accumulate: accumulate as i32,
                ..self.kron_params(k)
            };
            self.launch_block(&kron_forward_kernel(x.dtype), g, &params)
        })
    }

    /// W ← W ± ΔW in place (device memory, any dtype, f32 arithmetic, one rounding).
    pub fn kron_merge(&self, k: &DeviceKron<'_>, w: &mut MatMut<'_>, unmerge: bool) -> Result<()> {
        if w.rows != k.out_features || w.cols != k.in_features {
            return Err(Error::shape(format!(
                "kron module '{}': the adapter is {} x {}, the weight is {} x {}",
                k.module, k.out_features, k.in_features, w.rows, w.cols
            )));
        }
        let g = kron_merge_geometry(w.rows, w.cols)?;
        guard(|| {
            self.bind()?;
            self.require_device_ptrs(&[("w", w.as_ref().as_ptr())])?;
            let params = KronParams {
                w: w.as_mut_ptr() as *mut c_void,
                ldw: w.ld as i64,
                w_dtype: dtype_code(w.dtype),
                sign: if unmerge { -1.0 } else { 1.0 },
                ..self.kron_params(k)
            };
            self.launch_block(&kron_merge_kernel(w.dtype), g, &params)
        })
    }

    pub(super) fn require_device_ptrs(&self, what: &[(&str, *const u8)]) -> Result<()> {
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

    pub fn upload_eigen_basis(&self, b: &BasisModule) -> Result<DeviceEigenBasis<'_>> {
        let k = b.k();
        let ca: Vec<f32> = (0..b.in_features)
            .flat_map(|i| (0..k).map(move |c| b.c_a[(i, c)]))
            .collect();
        let cb: Vec<f32> = (0..b.out_features)
            .flat_map(|j| (0..k).map(move |c| b.c_b[(j, c)]))
            .collect();
        Ok(DeviceEigenBasis {
            module: b.name.clone(),
            in_features: b.in_features,
            out_features: b.out_features,
            k,
            c_a: self.upload(f32_bytes(&ca))?,
            c_b: self.upload(f32_bytes(&cb))?,
        })
    }

    /// The cores of the slots of a call: stacked = one core, the sum of the present slots' cores
    /// in slot order (as the CPU sums them); otherwise one core per slot (absent slots zero).
    pub fn upload_eigen_cores(
        &self,
        basis: &DeviceEigenBasis<'_>,
        slots: &[Option<&EigenModule>],
        stacked: bool,
    ) -> Result<DeviceEigenCores<'_>> {
        let k = basis.k;
        for (i, s) in slots.iter().enumerate() {
            if let Some(s) = s {
                if s.core.nrows() != k || s.core.ncols() != k {
                    return Err(Error::shape(format!(
                        "slot {i} (eigen module '{}'): {} components, the basis has {k}",
                        s.name,
                        s.core.nrows()
                    )));
                }
            }
        }
        let n_cores = if stacked { 1 } else { slots.len() };
        // At least one (zero) core so the buffer is never empty.
        let mut v = vec![0f32; n_cores.max(1) * k * k];
        for (si, s) in slots.iter().enumerate() {
            let Some(s) = s else { continue };
            let dst = if stacked { 0 } else { si };
            for i in 0..k {
                for j in 0..k {
                    v[dst * k * k + i * k + j] += s.core[(i, j)];
                }
            }
        }
        Ok(DeviceEigenCores {
            k,
            n_cores,
            stacked,
            buf: self.upload(f32_bytes(&v))?,
        })
    }

    /// `crate::algebra::eigen::eigen_linear` on the GPU: x, w, bias, y device memory;
    /// `row_slot` a host array (None = stacked, which `cores` must be). Asynchronous.
    #[allow(clippy::too_many_arguments)]
    pub fn eigen_linear(
        &self,
        x: MatRef<'_>,
        w: MatRef<'_>,
        bias: Option<MatRef<'_>>,
        basis: &DeviceEigenBasis<'_>,
        cores: &DeviceEigenCores<'_>,
        row_slot: Option<&[i32]>,
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        let (m, n) = (x.rows, w.rows);
        if basis.in_features != x.cols || basis.out_features != n {
            return Err(Error::shape(format!(
                "eigen module '{}': basis is {} x {} (out x in), the call is {n} x {}",
                basis.module, basis.out_features, basis.in_features, x.cols
            )));
        }
        if cores.k != basis.k {
            return Err(Error::shape(format!(
                "eigen module '{}': cores have {} components, the basis {}",
                basis.module, cores.k, basis.k
            )));
        }
        if y.rows != m || y.cols != n {
            return Err(Error::shape(format!(
                "y is {} x {}, expected {m} x {n}",
                y.rows, y.cols
            )));
        }
        match row_slot {
            None if !cores.stacked => {
                return Err(Error::invalid(
                    "row_slot is NULL (stacked) but the cores were uploaded per slot",
                ))
            }
            Some(_) if cores.stacked => {
                return Err(Error::invalid(
                    "row_slot is given but the cores were uploaded stacked (summed)",
                ))
            }
            Some(rs) => {
                if rs.len() != m {
                    return Err(Error::shape(format!(
                        "row_slot has {} entries, x has {m} rows",
                        rs.len()
                    )));
                }
                if let Some((i, s)) = rs
                    .iter()
                    .enumerate()
                    .find(|(_, &s)| s < -1 || s >= cores.n_cores as i32)
                {
                    return Err(Error::invalid(format!(
                        "row_slot[{i}] = {s} is outside -1..{}",
                        cores.n_cores
                    )));
                }
            }
            None => {}
        }
        check_int_dims(
            "eigen linear",
            &[("m", m), ("n", n), ("in", x.cols), ("K", basis.k)],
        )?;
        if m == 0 || n == 0 {
            return Ok(());
        }
        guard(|| self.eigen_inner(x, w, bias, basis, cores, row_slot, y))
    }

    #[allow(clippy::too_many_arguments)]
    fn eigen_inner(
        &self,
        x: MatRef<'_>,
        w: MatRef<'_>,
        bias: Option<MatRef<'_>>,
        basis: &DeviceEigenBasis<'_>,
        cores: &DeviceEigenCores<'_>,
        row_slot: Option<&[i32]>,
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        let (m, n, kc) = (x.rows, w.rows, basis.k);
        self.bind()?;
        self.require_device_ptrs(&[("y", y.as_ref().as_ptr())])?;
        let layout = eigen_scratch(m, n, kc)?;
        let scratch = self.alloc_scratch(layout.total)?;
        let at = |off: usize| scratch + off as sys::CUdeviceptr;
        let result = (|| -> Result<()> {
            // Base (+ bias) in f32 through the fused linear (it checks x, w, bias).
            // SAFETY: the base region holds m x n f32 inside the scratch allocation, alive until
            // free_scratch (stream-ordered after every launch here).
            let mut base =
                unsafe { MatMut::from_raw(at(layout.base) as *mut u8, DType::F32, m, n, n) };
            let p = LinearProblem {
                x,
                w,
                bias,
                slots: &[],
                row_slot: None,
            };
            p.check(&base)?;
            self.linear(&p, &mut base)?;
            let mut params = EigenParams {
                x: x.as_ptr() as *const c_void,
                c_a: basis.c_a.as_ptr() as *const f32,
                c_b: basis.c_b.as_ptr() as *const f32,
                cores: cores.buf.as_ptr() as *const f32,
                z: at(layout.z) as *mut f32,
                u: at(layout.u) as *mut f32,
                base: at(layout.base) as *mut f32,
                y: y.as_mut_ptr() as *mut c_void,
                ldx: x.ld as i64,
                ca_rs: kc as i64,
                ca_cs: 1,
                ldcb: kc as i64,
                ldbase: n as i64,
                ldy: y.ld as i64,
                m: m as i32,
                n: n as i32,
                inp: x.cols as i32,
                kc: kc as i32,
                n_cores: cores.n_cores as i32,
                x_dtype: dtype_code(x.dtype),
                y_dtype: dtype_code(y.dtype),
                ..EigenParams::default()
            };
            if let Some(rs) = row_slot {
                self.copy_htod_raw(at(layout.row_slot), rs.as_ptr() as *const u8, m * 4)?;
                params.row_slot = at(layout.row_slot) as *const i32;
            }
            if kc > 0 {
                self.launch_block(
                    &eigen_project_kernel(x.dtype),
                    eigen_project_geometry(m, kc)?,
                    &params,
                )?;
                self.launch_block(EIGEN_CORE_KERNEL, eigen_core_geometry(m, kc)?, &params)?;
            }
            self.launch_block(
                &eigen_expand_kernel(y.dtype),
                eigen_expand_geometry(m, n)?,
                &params,
            )
        })();
        let freed = self.free_scratch(scratch);
        result.and(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cuda::train::{ROW_BLOCK, TILE};
    use std::mem::offset_of;

    #[test]
    fn params_layout_matches_the_cu_files() {
        assert_eq!(offset_of!(KronParams, rows), 40);
        assert_eq!(offset_of!(KronParams, ldx), 80);
        assert_eq!(offset_of!(KronParams, v_sa), 128);
        assert_eq!(offset_of!(KronParams, batch), 136);
        assert_eq!(offset_of!(KronParams, scale), 184);
        assert!(include_str!("../../../kernels/kron.cu").contains("sizeof(KronParams) == 192"));
        assert_eq!(offset_of!(EigenParams, ldx), 72);
        assert_eq!(offset_of!(EigenParams, ca_cs), 88);
        assert_eq!(offset_of!(EigenParams, m), 120);
        assert_eq!(offset_of!(EigenParams, to_base), 148);
        assert!(include_str!("../../../kernels/eigen.cu").contains("sizeof(EigenParams) == 152"));
    }

    fn covers(grid: u32, per: usize, n: usize) -> bool {
        grid as usize * per >= n && (grid as usize - 1) * per < n
    }

    #[test]
    fn grids_cover_every_output() {
        let sizes = [
            1usize, 2, 3, 17, 63, 64, 65, 255, 256, 257, 1000, 4097, 11008,
        ];
        for a in sizes {
            for b in sizes {
                let g = kron_forward_geometry(a, b, 7).unwrap();
                assert!(covers(g.grid.0, TILE, b) && covers(g.grid.1, TILE, a));
                let g = kron_merge_geometry(a, b).unwrap();
                assert!(covers(g.grid.0, ROW_BLOCK, b));
                assert_eq!(g.grid.1 as usize, a.min(65535));
                let g = eigen_project_geometry(a, b).unwrap();
                assert!(covers(g.grid.0, TILE, b) && covers(g.grid.1, TILE, a));
                let g = eigen_core_geometry(a, b).unwrap();
                assert!(covers(g.grid.0, ROW_BLOCK, b));
                let g = eigen_expand_geometry(a, b).unwrap();
                assert!(covers(g.grid.0, TILE, b) && covers(g.grid.1, TILE, a));
                assert_eq!(g.block, (256, 1, 1));
            }
        }
        assert!(kron_forward_geometry(0, 3, 3).is_err());
        let e = kron_merge_geometry(3, 1 << 31).unwrap_err();
        assert!(e.message.contains("in = 2147483648"), "{}", e.message);
        let e = eigen_expand_geometry(64 * 65536, 3).unwrap_err();
        assert!(e.message.contains("grid dimension"), "{}", e.message);
    }

    #[test]
    fn eigen_scratch_is_aligned_and_disjoint() {
        for (m, n, k) in [(1usize, 1usize, 1usize), (7, 33, 5), (512, 4096, 64)] {
            let s = eigen_scratch(m, n, k).unwrap();
            let regions = [
                (s.base, m * n * 4),
                (s.z, m * k * 4),
                (s.u, m * k * 4),
                (s.row_slot, m * 4),
            ];
            let mut end = 0;
            for (off, len) in regions {
                assert_eq!(off % 256, 0);
                assert!(off >= end);
                end = off + len;
            }
            assert!(end <= s.total);
        }
        assert!(eigen_scratch(usize::MAX / 4, 8, 8).is_err());
    }

    #[test]
    fn kernel_names() {
        let names = kernels_for_sm(90);
        assert_eq!(names.len(), 19);
        assert!(names.contains(&"kron_forward_bf16".to_string()));
        assert!(names.contains(&"kron_backward_uv_f16".to_string()));
        assert!(names.contains(&"kron_backward_dx_f32".to_string()));
        assert!(names.contains(&"eigen_core_f32".to_string()));
    }
}
