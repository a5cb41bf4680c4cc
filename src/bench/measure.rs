//! The machine side of the bench: a counting allocator (hot-path allocations, peak bytes),
//! process / thread CPU time, and the roofline (FMA peak, streaming read bandwidth).

use super::{median, Bandwidth};
use crate::error::{Error, Result};
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

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
pub(super) fn heap() -> Option<(usize, usize, usize)> {
    INSTALLED.load(Ordering::Relaxed).then(|| {
        (
            LIVE.load(Ordering::Relaxed),
            PEAK.load(Ordering::Relaxed),
            CALLS.load(Ordering::Relaxed),
        )
    })
}

pub(super) fn reset_peak() {
    PEAK.store(LIVE.load(Ordering::Relaxed), Ordering::Relaxed);
}

/// CPU time of the whole process (all threads), seconds.
pub(super) fn process_cpu_s() -> f64 {
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

/// Reads `bytes` once with the pool's threads (one contiguous part each, summed as u64 words):
/// the plain streaming read of the very bytes a kernel reads, to time beside it.
pub(super) fn stream_read(pool: &rayon::ThreadPool, bytes: &[u8]) -> u64 {
    use rayon::prelude::*;
    // SAFETY: u64 has no invalid bit patterns; align_to gives the aligned middle only.
    let (head, words, tail) = unsafe { bytes.align_to::<u64>() };
    let parts = pool.current_num_threads().max(1);
    let chunk = words.len().div_ceil(parts).max(1);
    let s: u64 = pool.install(|| {
        words
            .par_chunks(chunk)
            .map(sum_words)
            .reduce(|| 0, |a, b| a.wrapping_add(b))
    });
    let edge = head
        .iter()
        .chain(tail)
        .fold(0u64, |a, &b| a.wrapping_add(b as u64));
    s.wrapping_add(edge)
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
