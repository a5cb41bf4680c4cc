//! `DeviceTrain`: a LoRA module's training state resident on the device, its upload, the
//! backward into it, `zero_grad` and the read-back (`snapshot`, `compute_copies`,
//! `download_into`). The AdamW launches on it are in `adamw.rs`.

use super::backward::Gains;
use super::DeviceGrads;
use crate::adapter::Lora;
use crate::backend::cuda::{check, f32_bytes, guard, CudaBackend, DeviceBuffer};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::train::backward::BackwardProblem;
use crate::train::Mode;
use cudarc::driver::sys;
use std::ffi::c_void;

/// One f32 tensor of a module's training state on the device: masters, gradients, moments.
pub(super) struct DeviceTensor<'a> {
    pub(super) p: DeviceBuffer<'a>,
    pub(super) g: DeviceBuffer<'a>,
    pub(super) m: DeviceBuffer<'a>,
    pub(super) v: DeviceBuffer<'a>,
    pub(super) rows: usize,
    pub(super) cols: usize,
    /// 0: the component is the row index (A); 1: the column index (B, E).
    pub(super) comp_axis: i32,
    pub(super) what: &'static str,
}

/// A LoRA module's training state on the device (the counterpart of `crate::train::TrainState`
/// for a CUDA runtime): the compute copy of A and B in the module's dtype (what the forward and
/// the backward read), f32 masters, gradients and AdamW moments in device memory; the component
/// mask, the components touched since `zero_grad` and the per-component step counts on the host.
/// Every call is ordered on the backend's stream; those that must look at results (`clip_grad_norm`,
/// the NaN guard of `adamw_step`, `download_into`) synchronize.
pub struct DeviceTrain<'a> {
    pub(super) backend: &'a CudaBackend,
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
    pub capacity: usize,
    pub dtype: DType,
    /// Rank of calls with rank 0.
    pub rank: usize,
    /// scale_at(r) for r = 1..=capacity.
    scales: Vec<f32>,
    pub(super) a_copy: DeviceBuffer<'a>,
    pub(super) b_copy: DeviceBuffer<'a>,
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

impl CudaBackend {
    fn upload_f32(&self, v: &[f32]) -> Result<DeviceBuffer<'_>> {
        self.upload(f32_bytes(v))
    }

    fn download_f32(&self, buf: &DeviceBuffer<'_>, n: usize) -> Result<Vec<f32>> {
        // SAFETY: buf holds at least n f32 (allocated for them).
        unsafe { self.read_f32(buf.as_ptr(), n) }
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
    pub(super) fn tensors(&self) -> impl Iterator<Item = &DeviceTensor<'a>> {
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
