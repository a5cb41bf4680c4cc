//! AVX2 + FMA micro-kernels (6 x 16 register tile: 12 ymm accumulators).

use super::driver::MicroKernel;
use std::arch::x86_64::*;

pub struct Avx2;

#[target_feature(enable = "avx2,fma")]
unsafe fn micro_6x16(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    let mut acc = [[_mm256_setzero_ps(); 2]; 6];
    for p in 0..kc {
        let b0 = _mm256_loadu_ps(b.add(p * 16));
        let b1 = _mm256_loadu_ps(b.add(p * 16 + 8));
        for (i, r) in acc.iter_mut().enumerate() {
            let av = _mm256_broadcast_ss(&*a.add(p * 6 + i));
            r[0] = _mm256_fmadd_ps(av, b0, r[0]);
            r[1] = _mm256_fmadd_ps(av, b1, r[1]);
        }
    }
    for (i, r) in acc.iter().enumerate() {
        let cp = c.add(i * ldc);
        _mm256_storeu_ps(cp, _mm256_add_ps(_mm256_loadu_ps(cp), r[0]));
        _mm256_storeu_ps(cp.add(8), _mm256_add_ps(_mm256_loadu_ps(cp.add(8)), r[1]));
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut s0 = _mm256_setzero_ps();
    let mut s1 = _mm256_setzero_ps();
    let mut i = 0;
    while i + 16 <= n {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), s0);
        s1 = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.add(i + 8)),
            _mm256_loadu_ps(b.add(i + 8)),
            s1,
        );
        i += 16;
    }
    let s = _mm256_add_ps(s0, s1);
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), s);
    let mut t: f32 = lanes.iter().sum();
    while i < n {
        t += a.add(i).read_unaligned() * b.add(i).read_unaligned();
        i += 1;
    }
    t
}

impl MicroKernel for Avx2 {
    const MR: usize = 6;
    const NR: usize = 16;
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        // SAFETY: this table entry is only installed when AVX2 and FMA were detected.
        micro_6x16(kc, a, b, c, ldc)
    }
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        // SAFETY: as above.
        dot_avx2(a, b, n)
    }
}
