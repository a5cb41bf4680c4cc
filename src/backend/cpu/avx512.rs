//! AVX-512F micro-kernels (8 x 32 register tile: 16 zmm accumulators).

use super::driver::MicroKernel;
use std::arch::x86_64::*;

pub struct Avx512;

#[target_feature(enable = "avx512f")]
unsafe fn micro_8x32(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    let mut acc = [[_mm512_setzero_ps(); 2]; 8];
    for p in 0..kc {
        let b0 = _mm512_loadu_ps(b.add(p * 32));
        let b1 = _mm512_loadu_ps(b.add(p * 32 + 16));
        for (i, r) in acc.iter_mut().enumerate() {
            let av = _mm512_set1_ps(*a.add(p * 8 + i));
            r[0] = _mm512_fmadd_ps(av, b0, r[0]);
            r[1] = _mm512_fmadd_ps(av, b1, r[1]);
        }
    }
    for (i, r) in acc.iter().enumerate() {
        let cp = c.add(i * ldc);
        _mm512_storeu_ps(cp, _mm512_add_ps(_mm512_loadu_ps(cp), r[0]));
        _mm512_storeu_ps(cp.add(16), _mm512_add_ps(_mm512_loadu_ps(cp.add(16)), r[1]));
    }
}

#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: *const f32, b: *const f32, n: usize) -> f32 {
    let mut s0 = _mm512_setzero_ps();
    let mut s1 = _mm512_setzero_ps();
    let mut i = 0;
    while i + 32 <= n {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), s0);
        s1 = _mm512_fmadd_ps(
            _mm512_loadu_ps(a.add(i + 16)),
            _mm512_loadu_ps(b.add(i + 16)),
            s1,
        );
        i += 32;
    }
    while i + 16 <= n {
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a.add(i)), _mm512_loadu_ps(b.add(i)), s0);
        i += 16;
    }
    if i < n {
        let mask: __mmask16 = (1u32 << (n - i)) as u16 - 1;
        let x = _mm512_maskz_loadu_ps(mask, a.add(i));
        let y = _mm512_maskz_loadu_ps(mask, b.add(i));
        s1 = _mm512_fmadd_ps(x, y, s1);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
}

impl MicroKernel for Avx512 {
    const MR: usize = 8;
    const NR: usize = 32;
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
        // SAFETY: this table entry is only installed when AVX-512F was detected.
        micro_8x32(kc, a, b, c, ldc)
    }
    unsafe fn dot(a: *const f32, b: *const f32, n: usize) -> f32 {
        // SAFETY: as above.
        dot_avx512(a, b, n)
    }
}
