//! `rankfuse bench`: times, in the same run and interleaved, the fused linear against base-only
//! and a naive unfused adapter (separate x W^T, x A^T, T B^T passes and an add), so ratios survive
//! a noisy machine. Also: the machine's streaming read bandwidth and FMA peak (the roofline), a
//! mixed-adapter batch against one adapter on the same rows, CPU time per call (so a shared
//! machine still gives a kernel-efficiency figure), kernel workspace bytes and hot-path
//! allocations (counted when the binary installs [`CountingAlloc`]).

use crate::adapter::{Lora, Scaling, TensorData};
use crate::backend::{LinearProblem, Slot};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::rng::SplitMix64;
use crate::runtime::{slot, Runtime};
use serde::Serialize;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A global allocator that counts live bytes, their peak and allocation calls. Install it in a
/// binary with `#[global_allocator] static A: rankfuse::bench::CountingAlloc = CountingAlloc;`
/// to get memory figures from the bench; without it they are reported as null.
pub struct CountingAlloc;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);

fn note_alloc(size: usize) {
    let now = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(now, Ordering::Relaxed);
    CALLS.fetch_add(1, Ordering::Relaxed);
    INSTALLED.store(true, Ordering::Relaxed);
}

// SAFETY: forwards every call to the system allocator unchanged; only counts on the side.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            note_alloc(new_size);
        }
        p
    }
}

/// Live heap bytes, peak, allocation calls; None when `CountingAlloc` is not installed.
fn heap() -> Option<(usize, usize, usize)> {
    INSTALLED.load(Ordering::Relaxed).then(|| {
        (
            LIVE.load(Ordering::Relaxed),
            PEAK.load(Ordering::Relaxed),
            CALLS.load(Ordering::Relaxed),
        )
    })
}

fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// CPU time of the whole process (all threads), seconds.
fn process_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec; the clock id is a constant Linux provides.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// CPU time of the calling thread, seconds.
fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as in `process_cpu_s`.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

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

fn median(v: &mut [f64]) -> f64 {
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

fn random(
    rng: &mut SplitMix64,
    dtype: DType,
    rows: usize,
    cols: usize,
    amp: f32,
) -> Result<Matrix> {
    Matrix::from_f32(dtype, rows, cols, &rng.fill_uniform(rows * cols, -amp, amp))
}

/// The FMA peak of `threads` cores: each thread runs register-only FMAs (AVX2: 12 independent
/// ymm chains, enough to cover 2 pipes x 4 cycles latency), timed by its own CPU time so other
/// processes on a shared machine do not lower it; GFLOP/s summed over threads (median of 3).
pub fn measure_fma_peak(threads: usize) -> Result<f64> {
    use rayon::prelude::*;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::internal(format!("peak pool: {e}")))?;
    let mut runs = Vec::new();
    for _ in 0..3 {
        let per: Vec<f64> = pool.install(|| {
            (0..threads.max(1))
                .into_par_iter()
                .map(|_| {
                    let iters = 20_000_000u64;
                    let t0 = thread_cpu_s();
                    let flops = fma_loop(std::hint::black_box(iters));
                    flops / (thread_cpu_s() - t0).max(1e-9) / 1e9
                })
                .collect()
        });
        runs.push(per.iter().sum());
    }
    Ok(median(&mut runs))
}

/// Runs `iters` rounds of 12 independent FMAs; returns the FLOPs done.
fn fma_loop(iters: u64) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: AVX2 and FMA were detected just above.
        return unsafe { fma_loop_avx2(iters) };
    }
    let mut acc = [1.0f32; 16];
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = a.mul_add(0.999_999, 1e-7);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 16.0 * 2.0
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_loop_avx2(iters: u64) -> f64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(1.0); 12];
    let (m, a) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
    for _ in 0..iters {
        for v in acc.iter_mut() {
            *v = _mm256_fmadd_ps(*v, m, a);
        }
    }
    std::hint::black_box(acc);
    iters as f64 * 12.0 * 8.0 * 2.0
}

/// Sum of a chunk, load-bound: AVX2 with 4 independent 256-bit accumulators when the CPU has
/// it, else 8 scalar lanes.
fn sum_words(s: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { sum_words_avx2(s) };
    }
    sum_words_scalar(s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sum_words_avx2(s: &[u64]) -> u64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_setzero_si256(); 4];
    let n16 = s.len() / 16 * 16;
    let p = s.as_ptr();
    let mut i = 0;
    while i < n16 {
        for (j, a) in acc.iter_mut().enumerate() {
            let v = _mm256_loadu_si256(p.add(i + 4 * j) as *const __m256i);
            *a = _mm256_add_epi64(*a, v);
        }
        i += 16;
    }
    let mut lanes = [0u64; 4];
    let t = _mm256_add_epi64(
        _mm256_add_epi64(acc[0], acc[1]),
        _mm256_add_epi64(acc[2], acc[3]),
    );
    _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, t);
    lanes
        .iter()
        .fold(sum_words_scalar(&s[n16..]), |a, &b| a.wrapping_add(b))
}

fn sum_words_scalar(s: &[u64]) -> u64 {
    let mut lanes = [0u64; 8];
    let mut it = s.chunks_exact(8);
    for c in &mut it {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l = l.wrapping_add(*v);
        }
    }
    let tail = it.remainder().iter().fold(0u64, |a, &b| a.wrapping_add(b));
    lanes.iter().fold(tail, |a, &b| a.wrapping_add(b))
}

/// Streaming read bandwidth: sums a `mib` MiB buffer with `threads` threads, median of 5.
pub fn measure_bandwidth(mib: usize, threads: usize) -> Result<Bandwidth> {
    use rayon::prelude::*;
    let words = mib * (1 << 20) / 8;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .build()
        .map_err(|e| Error::internal(format!("bandwidth pool: {e}")))?;
    let mut buf: Vec<u64> = Vec::new();
    buf.try_reserve_exact(words)
        .map_err(|_| Error::oom(format!("cannot allocate {mib} MiB for the bandwidth test")))?;
    buf.resize(words, 0);
    let chunk = words.div_ceil(threads.max(1) * 4).max(1);
    pool.install(|| {
        buf.par_chunks_mut(chunk).enumerate().for_each(|(c, s)| {
            for (i, v) in s.iter_mut().enumerate() {
                *v = (c * chunk + i) as u64;
            }
        })
    });
    let mut times = Vec::new();
    let mut check = 0u64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let s: u64 = pool.install(|| {
            buf.par_chunks(chunk)
                .map(sum_words)
                .reduce(|| 0, |a, b| a.wrapping_add(b))
        });
        times.push(t0.elapsed().as_secs_f64());
        check = check.wrapping_add(std::hint::black_box(s));
    }
    std::hint::black_box(check);
    let t = median(&mut times);
    Ok(Bandwidth {
        mib,
        threads,
        read_gbs: (words * 8) as f64 / t / 1e9,
    })
}

fn new_lora(rng: &mut SplitMix64, dtype: DType, k: usize, n: usize, r: usize) -> Result<Lora> {
    let a = random(rng, dtype, r, k, 0.02)?;
    let b = random(rng, dtype, n, r, 0.02)?;
    Lora::new(
        "bench",
        TensorData::Owned(a),
        TensorData::Owned(b),
        2.0 * r as f32,
        Scaling::Lora,
        0.0,
    )
}

/// Runs one case; every iteration times base, fused and naive back to back.
pub fn run_case(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    opts: &BenchOptions,
) -> Result<BenchResult> {
    run_case_with_bandwidth(rt, dtype, m, k, n, r, opts, None)
}

/// `run_case`, also reporting the fused read rate as % of a measured bandwidth.
#[allow(clippy::too_many_arguments)]
pub fn run_case_with_bandwidth(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    r: usize,
    opts: &BenchOptions,
    bandwidth: Option<&Bandwidth>,
) -> Result<BenchResult> {
    let mut rng = SplitMix64::new((m * 31 + k * 7 + n * 3 + r) as u64);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let lora = new_lora(&mut rng, dtype, k, n, r)?;
    let mut y = Matrix::zeros(dtype, m, n)?;
    let mut t = Matrix::zeros(DType::F32, m, r)?;
    let mut d = Matrix::zeros(DType::F32, m, n)?;
    let s = slot(&lora, 0, 1.0)?;
    let slots_fused = [Some(s)];
    let base = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let fused = LinearProblem {
        slots: &slots_fused,
        ..base
    };
    let mut dv = vec![0f32; m * n];
    let mut row = vec![0f32; n];
    let mut naive = |y: &mut Matrix| -> Result<()> {
        rt.linear(&base, &mut y.view_mut())?;
        let shrink = LinearProblem {
            x: x.view(),
            w: lora.a_view(r),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        rt.linear(&shrink, &mut t.view_mut())?;
        let expand = LinearProblem {
            x: t.view(),
            w: lora.b_view(r),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        rt.linear(&expand, &mut d.view_mut())?;
        let scale = s.scale;
        let dm = d.view();
        for i in 0..m {
            dm.row_f32(i, 0, &mut dv[i * n..(i + 1) * n]);
        }
        let mut yv = y.view_mut();
        for i in 0..m {
            yv.as_ref().row_f32(i, 0, &mut row);
            for (o, dd) in row.iter_mut().zip(&dv[i * n..(i + 1) * n]) {
                *o += scale * dd;
            }
            yv.set_row_f32(i, 0, &row);
        }
        Ok(())
    };
    // Warm-up (workspaces on every thread, page faults).
    for _ in 0..3 {
        rt.linear(&fused, &mut y.view_mut())?;
    }
    rt.linear(&base, &mut y.view_mut())?;
    naive(&mut y)?;
    // Memory: one more fused call, now that workspaces exist.
    let mut extra_peak = None;
    if let Some((live0, _, _)) = heap() {
        reset_peak();
        rt.linear(&fused, &mut y.view_mut())?;
        extra_peak = heap().map(|(_, peak, _)| peak.saturating_sub(live0));
    }
    let cap = opts.max_iters.max(3);
    let (mut tb, mut tf, mut tn) = (
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
        Vec::with_capacity(cap),
    );
    let mut cpu_f = Vec::with_capacity(cap);
    let mut cpu_b = Vec::with_capacity(cap);
    let mut fused_allocs = 0usize;
    let start = Instant::now();
    while tb.len() < opts.max_iters && (tb.len() < 3 || start.elapsed() < opts.min_time * 3) {
        let c0 = process_cpu_s();
        let t0 = Instant::now();
        rt.linear(&base, &mut y.view_mut())?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), process_cpu_s() - c0);
        tb.push(wall * 1e3);
        cpu_b.push(cpu * 1e3);

        let a0 = heap().map_or(0, |h| h.2);
        let c0 = process_cpu_s();
        let t0 = Instant::now();
        rt.linear(&fused, &mut y.view_mut())?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), process_cpu_s() - c0);
        fused_allocs += heap().map_or(0, |h| h.2) - a0;
        tf.push(wall * 1e3);
        cpu_f.push(cpu * 1e3);

        let t0 = Instant::now();
        naive(&mut y)?;
        tn.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let iters = tb.len();
    let cold = match bandwidth {
        Some(bw) if m <= crate::backend::cpu::driver::DECODE_MAX_M => {
            Some(cold_decode(rt, dtype, &x, k, n, r, bw, opts, &mut rng)?)
        }
        _ => None,
    };
    let (base_ms, fused_ms, naive_ms) = (median(&mut tb), median(&mut tf), median(&mut tn));
    let fused_cpu_ms = median(&mut cpu_f);
    let base_cpu_ms = median(&mut cpu_b);
    let flop = 2.0 * m as f64 * n as f64 * k as f64;
    let sz = dtype.size() as f64;
    let bytes = sz * (n * k + r * k + n * r + m * k) as f64;
    let read_gbs = bytes / (fused_ms * 1e6);
    Ok(BenchResult {
        dtype: dtype.name(),
        m,
        k,
        n,
        r,
        iters,
        base_ms,
        fused_ms,
        naive_ms,
        fused_over_base: fused_ms / base_ms,
        naive_over_base: naive_ms / base_ms,
        base_gflops: flop / (base_ms * 1e6),
        fused_gflops: flop / (fused_ms * 1e6),
        fused_gflop_per_cpu_s: flop / (fused_cpu_ms.max(1e-6) * 1e6),
        base_cpu_ms,
        fused_cpu_ms,
        fused_over_base_cpu: fused_cpu_ms / base_cpu_ms.max(1e-9),
        fused_read_gbs: read_gbs,
        fused_pct_of_bandwidth: bandwidth.map(|b| 100.0 * read_gbs / b.read_gbs),
        cold_copies: cold.map(|c| c.0),
        cold_base_ms: cold.map(|c| c.1),
        cold_fused_ms: cold.map(|c| c.2),
        cold_fused_over_base: cold.map(|c| c.2 / c.1),
        cold_fused_read_gbs: cold.map(|c| bytes / (c.2 * 1e6)),
        cold_pct_of_bandwidth: cold
            .and_then(|c| bandwidth.map(|b| 100.0 * bytes / (c.2 * 1e6) / b.read_gbs)),
        fused_allocs_per_call: heap().is_some().then(|| fused_allocs as f64 / iters as f64),
        fused_extra_peak_bytes: extra_peak,
        workspace_bytes: crate::backend::cpu::driver::workspace_bytes(),
    })
}

/// Decode with every call's W and adapter cold: copies of (W, adapter) totalling more than the
/// bandwidth buffer, walked in order like a model's layers. Alternates a fused pass and a
/// base-only pass over all copies; returns (copies, base ms per call, fused ms per call), medians
/// over passes.
#[allow(clippy::too_many_arguments)]
fn cold_decode(
    rt: &Runtime,
    dtype: DType,
    x: &Matrix,
    k: usize,
    n: usize,
    r: usize,
    bw: &Bandwidth,
    opts: &BenchOptions,
    rng: &mut SplitMix64,
) -> Result<(usize, f64, f64)> {
    let m = x.rows;
    let layer_bytes = dtype.size() * (n * k + r * (n + k));
    let copies = ((bw.mib << 20) / layer_bytes.max(1) + 1).clamp(2, 4096);
    let mut layers = Vec::with_capacity(copies);
    for _ in 0..copies {
        let w = random(rng, dtype, n, k, 0.02)?;
        let lora = new_lora(rng, dtype, k, n, r)?;
        layers.push((w, lora));
    }
    let mut y = Matrix::zeros(dtype, m, n)?;
    let mut pass = |with_adapter: bool| -> Result<f64> {
        let t0 = Instant::now();
        for (w, lora) in &layers {
            let slots = [Some(slot(lora, 0, 1.0)?)];
            let p = LinearProblem {
                x: x.view(),
                w: w.view(),
                bias: None,
                slots: if with_adapter { &slots } else { &[] },
                row_slot: None,
            };
            rt.linear(&p, &mut y.view_mut())?;
        }
        Ok(t0.elapsed().as_secs_f64() * 1e3 / copies as f64)
    };
    pass(true)?; // page faults and first touch
    let (mut tb, mut tf) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while tb.len() < 3 || (start.elapsed() < opts.min_time * 2 && tb.len() < 50) {
        tf.push(pass(true)?);
        tb.push(pass(false)?);
    }
    Ok((copies, median(&mut tb), median(&mut tf)))
}

/// A mixed batch: `m` rows spread round-robin over `ranks.len()` adapters (ranks as given),
/// timed against one adapter of the largest rank on the same rows, and base-only.
pub fn run_mixed(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    ranks: &[usize],
    opts: &BenchOptions,
) -> Result<MixedResult> {
    let mut rng = SplitMix64::new((m * 131 + k * 17 + n * 5) as u64);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let loras = ranks
        .iter()
        .map(|&r| new_lora(&mut rng, dtype, k, n, r))
        .collect::<Result<Vec<_>>>()?;
    let single_r = ranks.iter().copied().max().unwrap_or(1);
    let single = new_lora(&mut rng, dtype, k, n, single_r)?;
    let mut y = Matrix::zeros(dtype, m, n)?;
    let slots: Vec<Option<Slot<'_>>> = loras
        .iter()
        .map(|l| slot(l, 0, 1.0).map(Some))
        .collect::<Result<_>>()?;
    let row_slot: Vec<i32> = (0..m).map(|i| (i % ranks.len()) as i32).collect();
    let one = [Some(slot(&single, 0, 1.0)?)];
    let base = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let single_p = LinearProblem {
        slots: &one,
        ..base
    };
    let mixed_p = LinearProblem {
        slots: &slots,
        row_slot: Some(&row_slot),
        ..base
    };
    for p in [&base, &single_p, &mixed_p] {
        rt.linear(p, &mut y.view_mut())?;
    }
    let (mut tb, mut ts, mut tm) = (Vec::new(), Vec::new(), Vec::new());
    let (mut cs, mut cm) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while tb.len() < opts.max_iters && (tb.len() < 3 || start.elapsed() < opts.min_time * 3) {
        for (p, v, c) in [
            (&base, &mut tb, None),
            (&single_p, &mut ts, Some(&mut cs)),
            (&mixed_p, &mut tm, Some(&mut cm)),
        ] {
            let c0 = process_cpu_s();
            let t0 = Instant::now();
            rt.linear(p, &mut y.view_mut())?;
            v.push(t0.elapsed().as_secs_f64() * 1e3);
            if let Some(c) = c {
                c.push(process_cpu_s() - c0);
            }
        }
    }
    let iters = tb.len();
    let (base_ms, single_ms, mixed_ms) = (median(&mut tb), median(&mut ts), median(&mut tm));
    let mixed_over_single_cpu = median(&mut cm) / median(&mut cs).max(1e-12);
    Ok(MixedResult {
        dtype: dtype.name(),
        m,
        k,
        n,
        adapters: ranks.len(),
        ranks: ranks.to_vec(),
        single_r,
        iters,
        base_ms,
        single_ms,
        mixed_ms,
        mixed_over_single: mixed_ms / single_ms,
        mixed_over_single_cpu,
        mixed_over_base: mixed_ms / base_ms,
    })
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
                    let res =
                        run_case_with_bandwidth(rt, dtype, m, k, n, r, opts, bandwidth.as_ref())?;
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
