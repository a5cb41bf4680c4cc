//! The runtime: a device, a thread pool and the kernel table chosen when it starts.

use crate::adapter::Lora;
use crate::backend::cpu::pack::PackedW;
use crate::backend::cpu::{self, KernelTable};
use crate::backend::{ActQuant, LinearProblem, Slot};
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::methods::{AnySlot, MethodSlot};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Device {
    #[default]
    Cpu,
    Cuda,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct RuntimeOptions {
    pub device: Device,
    pub device_index: i32,
    /// CPU threads; 0 = all cores.
    pub num_threads: usize,
    /// The host engine's `CUstream` (as an address); 0 = the runtime's own stream.
    pub cuda_stream: usize,
    /// How decode on a block-quantized W reads x (exact by default).
    pub act_quant: ActQuant,
}

/// Where `linear` runs.
enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    // Shared: weights and adapters opened on the runtime keep a weak reference for uploads.
    Cuda(std::sync::Arc<crate::backend::cuda::CudaBackend>),
}

/// A runtime. Compute calls may run from many threads at once.
pub struct Runtime {
    pool: rayon::ThreadPool,
    kernels: KernelTable,
    threads: usize,
    backend: Backend,
    act_quant: ActQuant,
}

impl Runtime {
    pub fn new(opts: RuntimeOptions) -> Result<Runtime> {
        let kernels = cpu::select()?;
        match opts.device {
            Device::Cpu => Self::with_kernels(opts, kernels),
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                let cuda = crate::backend::cuda::CudaBackend::new(
                    opts.device_index,
                    opts.cuda_stream as *mut std::ffi::c_void,
                )?;
                // The CPU side only does host work (argument checks): one thread.
                let mut rt = Self::with_kernels(
                    RuntimeOptions {
                        num_threads: 1,
                        ..opts
                    },
                    kernels,
                )?;
                rt.backend = Backend::Cuda(std::sync::Arc::new(cuda));
                Ok(rt)
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => Err(Error::unsupported(
                "this build of rankfuse has no CUDA backend (build with feature 'cuda')",
            )),
        }
    }

    /// A CPU runtime with all cores.
    pub fn cpu() -> Result<Runtime> {
        Self::new(RuntimeOptions::default())
    }

    /// A runtime with a given kernel table (tests and benchmarks compare variants with this).
    pub fn with_kernels(opts: RuntimeOptions, kernels: KernelTable) -> Result<Runtime> {
        let threads = if opts.num_threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            opts.num_threads
        };
        if threads > 4096 {
            return Err(Error::invalid(format!(
                "num_threads = {threads} is out of range"
            )));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("rankfuse-{i}"))
            .build()
            .map_err(|e| Error::internal(format!("cannot start {threads} threads: {e}")))?;
        Ok(Runtime {
            pool,
            kernels,
            threads,
            backend: Backend::Cpu,
            act_quant: opts.act_quant,
        })
    }

    pub fn kernels(&self) -> KernelTable {
        self.kernels
    }
    pub fn threads(&self) -> usize {
        self.threads
    }
    /// How decode on a block-quantized W reads x.
    pub fn act_quant(&self) -> ActQuant {
        self.act_quant
    }
    pub fn device(&self) -> Device {
        match self.backend {
            Backend::Cpu => Device::Cpu,
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => Device::Cuda,
        }
    }
    /// The CUDA backend of a CUDA runtime.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> Option<&crate::backend::cuda::CudaBackend> {
        match &self.backend {
            Backend::Cuda(c) => Some(c),
            Backend::Cpu => None,
        }
    }

    /// The CUDA backend of a CUDA runtime, shared (device copies of weights and adapters keep a
    /// weak reference to it for later uploads).
    #[cfg(feature = "cuda")]
    pub fn cuda_shared(&self) -> Option<std::sync::Arc<crate::backend::cuda::CudaBackend>> {
        match &self.backend {
            Backend::Cuda(c) => Some(c.clone()),
            Backend::Cpu => None,
        }
    }

    /// Resolves a slot for this runtime's `linear`: as [`slot`], but on a CUDA runtime a module
    /// with an up-to-date device copy on this runtime's device (uploaded when its adapter was
    /// loaded on a CUDA runtime) is read from device memory instead of being copied per call.
    pub fn lora_slot<'a>(&self, lora: &'a Lora, rank: usize, scale_mult: f32) -> Result<Slot<'a>> {
        let host = slot(lora, rank, scale_mult)?;
        #[cfg(feature = "cuda")]
        if let (Backend::Cuda(c), Some(d)) = (&self.backend, lora.device.as_ref()) {
            if let Some(s) = d.slot(c, lora, &host) {
                return Ok(s);
            }
        }
        Ok(host)
    }

    /// Resolves a module of any kind for this runtime's calls: LoRA through `lora_slot`
    /// (device copies preferred), the other kinds through `methods::resolve`.
    pub fn slot_any<'a>(
        &self,
        lora: &'a Lora,
        rank: usize,
        scale_mult: f32,
    ) -> Result<AnySlot<'a>> {
        match lora.kind {
            crate::adapter::Kind::Lora => {
                self.lora_slot(lora, rank, scale_mult).map(AnySlot::LowRank)
            }
            _ => crate::methods::resolve(lora, rank, scale_mult),
        }
    }

    /// Runs `f` on the runtime's thread pool (training kernels use this).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// The fused linear: checks the problem, then runs the kernel table's implementation.
    pub fn linear(&self, p: &LinearProblem<'_>, y: &mut MatMut<'_>) -> Result<()> {
        p.check(y)?;
        match &self.backend {
            Backend::Cpu => {
                let f = match self.act_quant {
                    ActQuant::Q8 if p.w.dtype.is_quantized() => self.kernels.linear_act_q8,
                    _ => self.kernels.linear,
                };
                self.pool.install(|| f(p, y));
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => c.linear(p, y),
        }
    }

    /// The fused linear with slots of every kind: `methods` pairs with `p.slots` (same length,
    /// or empty), holding the KRAdapter / EigenLoRAx slots whose positions in `p.slots` are
    /// None (methods/forward.rs). Without method slots this is `linear`.
    pub fn linear_with(
        &self,
        p: &LinearProblem<'_>,
        methods: &[Option<MethodSlot<'_>>],
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        self.with_methods(p, methods, y, &|q, yy| self.linear(q, yy))
    }

    /// `linear_packed` with slots of every kind (as `linear_with`).
    pub fn linear_packed_with(
        &self,
        p: &LinearProblem<'_>,
        packed: &PackedW,
        methods: &[Option<MethodSlot<'_>>],
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        let q = LinearProblem {
            w: packed.shape_view(),
            ..*p
        };
        self.with_methods(&q, methods, y, &|q2, yy| self.linear_packed(q2, packed, yy))
    }

    fn with_methods(
        &self,
        p: &LinearProblem<'_>,
        methods: &[Option<MethodSlot<'_>>],
        y: &mut MatMut<'_>,
        base: &(dyn Fn(&LinearProblem<'_>, &mut MatMut<'_>) -> Result<()> + Sync),
    ) -> Result<()> {
        if methods.iter().all(|m| m.is_none()) {
            return base(p, y);
        }
        match &self.backend {
            Backend::Cpu => self.pool.install(|| {
                crate::methods::forward::linear(p, methods, y, base, &|q, yy| self.linear(q, yy))
            }),
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => crate::methods::cuda::linear(c, p, methods, y),
        }
    }

    /// Packs a base matrix once for this runtime's kernels (`PackedW`): the layout follows the
    /// kernel table (`KernelTable::pack`), so a pack serves runtimes with the same table. CPU
    /// runtimes only: on a CUDA runtime W is device-resident and read in place by the kernels.
    pub fn pack(&self, w: &MatRef<'_>) -> Result<PackedW> {
        if w.dtype.is_quantized() && !crate::backend::cpu::quant_pack::supports(w.dtype) {
            // Q4_0 / Q8_0 repack into 8-row interleaved blocks (same bytes); the K-quants have
            // no such layout yet, and f32 panels would hold 7x their bytes.
            return Err(Error::dtype(format!(
                "w is {}: of the block-quantized types only Q4_0 and Q8_0 are packed; pass {} \
                 weights to rf_linear as they are",
                w.dtype.name(),
                w.dtype.name()
            )));
        }
        match &self.backend {
            Backend::Cpu => {
                let spec = self.kernels.pack;
                self.pool.install(|| PackedW::pack(w, spec))
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => Err(Error::unsupported(
                "packed weights are for CPU runtimes: on a CUDA runtime the kernels read W in \
                 place from device memory (rf_weights_open uploads it once)",
            )),
        }
    }

    /// The fused linear with W read from `packed` (`p.w` is ignored: the pack gives W and its
    /// shape). The pack must have been made for this runtime's kernel table; otherwise
    /// INVALID_ARGUMENT (a pack is never read in another layout).
    pub fn linear_packed(
        &self,
        p: &LinearProblem<'_>,
        packed: &PackedW,
        y: &mut MatMut<'_>,
    ) -> Result<()> {
        let q = LinearProblem {
            w: packed.shape_view(),
            ..*p
        };
        q.check(y)?;
        let want = self.kernels.pack;
        if packed.spec() != want {
            return Err(Error::invalid(format!(
                "the packed matrix was made for the '{}' kernels ({}-column panels) but this \
                 runtime runs the '{}' kernels ({}-column panels): pack it with this runtime \
                 (rf_weights_pack)",
                packed.spec().isa.name(),
                packed.spec().nr,
                want.isa.name(),
                want.nr
            )));
        }
        match &self.backend {
            Backend::Cpu => {
                let f = match self.act_quant {
                    ActQuant::Q8 if packed.dtype().is_quantized() => {
                        self.kernels.linear_packed_act_q8
                    }
                    _ => self.kernels.linear_packed,
                };
                self.pool.install(|| f(&q, packed, y));
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Backend::Cuda(_) => Err(Error::unsupported(
                "packed weights are for CPU runtimes (this runtime is CUDA)",
            )),
        }
    }

    /// Runtime facts as JSON: version, backend, CPU features, kernels chosen, threads.
    pub fn info_json(&self) -> String {
        let (backend, gpu) = match &self.backend {
            Backend::Cpu => ("cpu", serde_json::Value::Null),
            #[cfg(feature = "cuda")]
            Backend::Cuda(c) => ("cuda", c.info_json()),
        };
        let info = serde_json::json!({
            "version": crate::VERSION,
            "abi_version": crate::ABI_VERSION,
            "backend": backend,
            "device": backend,
            "arch": std::env::consts::ARCH,
            "cpu_features": cpu::detect::features(),
            "isa": self.kernels.isa.name(),
            "kernels": {
                "linear": self.kernels.linear_name,
                "pack": {
                    "panel_columns": self.kernels.pack.nr,
                    "bf16_k_granule": self.kernels.pack.kgran,
                },
                "self_check": match cpu::self_check_result(self.kernels.isa) {
                    None => "not run".to_string(),
                    Some(Ok(())) => "passed".to_string(),
                    Some(Err(e)) => format!("failed: {e}"),
                },
                "rejected": self.kernels.rejected.iter().map(|r| serde_json::json!({
                    "isa": r.isa.name(),
                    "reason": r.reason,
                })).collect::<Vec<_>>(),
            },
            "threads": self.threads,
            "gpu": gpu,
        });
        info.to_string()
    }
}

pub use crate::methods::lora_slot as slot;
