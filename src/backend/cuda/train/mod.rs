//! Training on the GPU: the LoRA backward (`kernels/lora_backward.cu`) and the fused AdamW with
//! its gradient statistics (`kernels/adamw.cu`).
//!
//! Pure launch planning first (parameter blocks mirrored from the `.cu` files, kernel names,
//! grids, K splits: unit-tested without a GPU), then the launches on the backend's stream:
//! `CudaBackend::lora_backward` (device operands, device gradient buffers) and `DeviceTrain`, a
//! LoRA module's training state resident on the device (masters, gradients, moments; mask, touched
//! components and step counts on the host) with `backward`, `zero_grad`, `clip_grad_norm`,
//! `adamw_step` and `download_into` — the same semantics as `crate::train` on the CPU.
//!
//! One file per kernel family, each launcher next to its parameter block and geometry:
//! - this file: the geometry helpers shared by every training and algebra kernel (tile and row
//!   grids, K splits, `int` limits), the kernel list and `CudaBackend::launch_block`;
//! - `backward.rs`: the LoRA backward (`BackwardParams`, its grids and kernel names,
//!   `CudaBackend::lora_backward`);
//! - `adamw.rs`: the fused AdamW and gradient statistics (`AdamwParams`, grid, bias corrections,
//!   `DeviceTrain::adamw_step`, `clip_grad_norm`);
//! - `device_state.rs`: `DeviceTrain` / `TrainSnapshot`, the device-resident training state;
//! - `host_state.rs`: `backward_host_state`, the backward for a module whose state is on the host.

use super::launch::{Geometry, BLOCK, GRID_YZ_MAX};
use super::{check, CudaBackend};
use crate::dtype::DType;
use crate::error::{Error, Result};
use cudarc::driver::sys;
use std::ffi::c_void;

mod adamw;
mod backward;
mod device_state;
mod host_state;
#[cfg(test)]
mod tests;

pub use adamw::{
    adamw_geometry, adamw_kernel, bias_corrections, clip_grad_norm, AdamwParams, SCALE_KERNEL,
    STATS_KERNEL,
};
pub use backward::{
    backward_scratch, da_geometry, da_kernel, db_geometry, db_kernel, de_geometry, dx_geometry,
    dx_kernel, tp_geometry, ug_geometry, ug_kernel, BackwardParams, BackwardScratch, DeviceGrads,
    UgSplit, DE_KERNEL, TP_KERNEL,
};
pub use device_state::{DeviceTrain, TrainSnapshot};
pub use host_state::backward_host_state;

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
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => "quantized",
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

/// Every kernel of this module's `.cu` sources (the PTX symbol-table test covers them per SM).
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
}
