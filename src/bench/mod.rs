//! `rankfuse bench`: times, in the same run and interleaved, the fused linear against base-only
//! and a naive unfused adapter (separate x W^T, x A^T, T B^T passes and an add), so ratios survive
//! a noisy machine. Also: the machine's streaming read bandwidth and FMA peak (the roofline), a
//! mixed-adapter batch against one adapter on the same rows, CPU time per call (so a shared
//! machine still gives a kernel-efficiency figure), kernel workspace bytes and hot-path
//! allocations (counted when the binary installs [`CountingAlloc`]).

mod cases;
mod measure;

pub mod methods;
pub mod quant;
pub use cases::{run_case, run_case_with_bandwidth, run_mixed};
pub use measure::{measure_bandwidth, measure_fma_peak, CountingAlloc};

use crate::dtype::DType;
use crate::error::Result;
use crate::matrix::Matrix;
use crate::rng::SplitMix64;
use crate::runtime::Runtime;
use serde::Serialize;
use std::time::Duration;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub ms: Vec<usize>,
    /// (k, n) pairs.
    pub shapes: Vec<(usize, usize)>,
    pub ranks: Vec<usize>,
    pub dtypes: Vec<DType>,
    /// Minimum time spent per variant per case.
    pub min_time: Duration,
    pub max_iters: usize,
    /// Size of the streaming-read bandwidth buffer in MiB (0 = skip the measurement).
    pub bandwidth_mib: usize,
    /// Run the mixed-batch case (64 rows over 16 adapters) for each dtype and shape.
    pub mixed: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            ms: vec![1, 16, 128, 512],
            shapes: vec![(4096, 4096), (4096, 11008)],
            ranks: vec![8, 16, 64],
            dtypes: vec![DType::F32, DType::BF16],
            min_time: Duration::from_millis(300),
            max_iters: 50,
            bandwidth_mib: 1024,
            mixed: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub dtype: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub r: usize,
    pub iters: usize,
    pub base_ms: f64,
    pub fused_ms: f64,
    pub naive_ms: f64,
    /// fused / base-only (the adapter's overhead; goal <= 1.03, m = 1: <= 1.05)
    pub fused_over_base: f64,
    /// naive unfused / base-only
    pub naive_over_base: f64,
    /// Base-only FLOP rate (2mnk / time), GFLOP/s.
    pub base_gflops: f64,
    pub fused_gflops: f64,
    /// Fused FLOPs per second of process CPU time (all threads): kernel efficiency that a
    /// busy, shared machine does not hide. Divide by the thread count's peak for % of peak.
    pub fused_gflop_per_cpu_s: f64,
    /// Median process CPU time (all threads) of one call, ms.
    pub base_cpu_ms: f64,
    pub fused_cpu_ms: f64,
    /// fused / base-only in CPU time: the adapter's cost where wall time is noisy (shared CPUs).
    pub fused_over_base_cpu: f64,
    /// Bytes the fused call must read (W + A + B + x) per second of wall time, GB/s.
    pub fused_read_gbs: f64,
    /// fused_read_gbs as % of the measured streaming bandwidth (the decode goal: >= 85% at m=1).
    pub fused_pct_of_bandwidth: Option<f64>,
    /// Decode cases (m <= 8, bandwidth measured): W and the adapter rotated over `cold_copies`
    /// copies that together exceed the bandwidth buffer, as a model's layers are during a decode
    /// step, so every call reads them from DRAM; per-call medians. Null otherwise.
    pub cold_copies: Option<usize>,
    pub cold_base_ms: Option<f64>,
    pub cold_fused_ms: Option<f64>,
    /// cold fused / cold base-only (the adapter's cost when its bytes also come from DRAM)
    pub cold_fused_over_base: Option<f64>,
    /// Bytes a cold fused call reads per second, GB/s, and as % of the streaming bandwidth
    /// (the decode goal, >= 85%, is judged on this: warm figures can exceed 100% when W stays
    /// in a large last-level cache).
    pub cold_fused_read_gbs: Option<f64>,
    pub cold_pct_of_bandwidth: Option<f64>,
    /// The same base-only and fused calls on W prepacked once for the runtime's kernels
    /// (`Runtime::pack` / `rf_weights_pack`), timed in the same loop; the pack's bytes.
    pub packed_base_ms: f64,
    pub packed_fused_ms: f64,
    /// packed fused / packed base-only (the adapter's overhead on packed W)
    pub packed_fused_over_base: f64,
    /// unpacked fused / packed fused (what packing saves per call)
    pub packed_speedup: f64,
    pub packed_fused_gflops: f64,
    /// Median process CPU time of one packed fused call, ms (compare with `fused_cpu_ms`).
    pub packed_fused_cpu_ms: f64,
    /// packed_fused_gflops as % of the measured FMA peak (f32 FMA: bf16 is converted to f32 in
    /// registers on this machine's kernels; null without the roofline measurement)
    pub packed_pct_of_fma_peak: Option<f64>,
    pub packed_read_gbs: f64,
    pub packed_bytes: usize,
    /// Cold decode on packed layers (same rotation as `cold_*`): ms per call and % of the
    /// streaming bandwidth.
    pub cold_packed_fused_ms: Option<f64>,
    pub cold_packed_pct_of_bandwidth: Option<f64>,
    /// Heap allocation calls per fused call after warm-up (goal 0); null without CountingAlloc.
    pub fused_allocs_per_call: Option<f64>,
    /// Peak heap bytes a fused call added above what was live before it (after warm-up).
    pub fused_extra_peak_bytes: Option<usize>,
    /// Bytes the kernels hold in reusable workspaces after this case (all threads).
    pub workspace_bytes: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MixedResult {
    pub dtype: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub adapters: usize,
    pub ranks: Vec<usize>,
    /// The single adapter's rank (the largest of `ranks`: no fewer adapter FLOPs per row).
    pub single_r: usize,
    pub iters: usize,
    pub base_ms: f64,
    pub single_ms: f64,
    pub mixed_ms: f64,
    /// mixed / one adapter on the same rows (goal <= 1.10)
    pub mixed_over_single: f64,
    /// The same ratio in process CPU time (robust on a shared machine).
    pub mixed_over_single_cpu: f64,
    pub mixed_over_base: f64,
    /// The same mixed and single-adapter calls on prepacked W.
    pub packed_single_ms: f64,
    pub packed_mixed_ms: f64,
    /// packed mixed / packed one adapter (goal <= 1.10)
    pub packed_mixed_over_single: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Bandwidth {
    pub mib: usize,
    pub threads: usize,
    /// Median streaming read bandwidth (sum over the buffer, all threads), GB/s (1e9 B/s).
    pub read_gbs: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub bandwidth: Option<Bandwidth>,
    /// Measured FMA peak of the runtime's thread count in GFLOP per CPU-second (None when the
    /// bandwidth measurement is off): compare with `fused_gflop_per_cpu_s`.
    pub fma_peak_gflops: Option<f64>,
    pub results: Vec<BenchResult>,
    pub mixed: Vec<MixedResult>,
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

pub(crate) fn random(
    rng: &mut SplitMix64,
    dtype: DType,
    rows: usize,
    cols: usize,
    amp: f32,
) -> Result<Matrix> {
    Matrix::from_f32(dtype, rows, cols, &rng.fill_uniform(rows * cols, -amp, amp))
}

/// The ranks of the mixed case: 16 adapters, ranks 8..64.
pub const MIXED_RANKS: [usize; 16] = [8, 16, 32, 64, 8, 16, 32, 64, 8, 16, 32, 64, 8, 16, 32, 64];

/// Runs every case of `opts`, calling `progress` after each.
pub fn run(
    rt: &Runtime,
    opts: &BenchOptions,
    mut on_bandwidth: impl FnMut(&Bandwidth, f64),
    mut progress: impl FnMut(&BenchResult),
    mut on_mixed: impl FnMut(&MixedResult),
) -> Result<BenchReport> {
    let (bandwidth, fma_peak_gflops) = if opts.bandwidth_mib > 0 {
        let b = measure_bandwidth(opts.bandwidth_mib, rt.threads())?;
        let peak = measure_fma_peak(rt.threads())?;
        on_bandwidth(&b, peak);
        (Some(b), Some(peak))
    } else {
        (None, None)
    };
    let mut results = Vec::new();
    let mut mixed = Vec::new();
    for &dtype in &opts.dtypes {
        for &(k, n) in &opts.shapes {
            for &m in &opts.ms {
                for &r in &opts.ranks {
                    let mut res =
                        run_case_with_bandwidth(rt, dtype, m, k, n, r, opts, bandwidth.as_ref())?;
                    res.packed_pct_of_fma_peak =
                        fma_peak_gflops.map(|p| 100.0 * res.packed_fused_gflops / p);
                    progress(&res);
                    results.push(res);
                }
            }
            if opts.mixed {
                let res = run_mixed(rt, dtype, 64, k, n, &MIXED_RANKS, opts)?;
                on_mixed(&res);
                mixed.push(res);
            }
        }
    }
    Ok(BenchReport {
        bandwidth,
        fma_peak_gflops,
        results,
        mixed,
    })
}
