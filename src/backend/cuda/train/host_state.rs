//! `backward_host_state`: the CUDA backward for a module whose training state lives in host
//! memory (the C ABI's path).

use super::DeviceGrads;
use crate::adapter::Lora;
use crate::backend::cuda::{check, CudaBackend, DeviceBuffer};
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::train::backward::BackwardProblem;
use crate::train::Mode;
use cudarc::driver::sys;
use std::ffi::c_void;

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
