//! Portable micro-kernels: plain Rust over fixed-size arrays, which LLVM vectorizes for the
//! baseline ISA (SSE2 on x86_64, NEON on aarch64). The fallback every CPU can run.

use super::driver::MicroKernel;

pub struct Portable;

impl MicroKernel for Portable {
    const MR: usize = 4;
    const NR: usize = 16;

    #[inline(never)]
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
        let mut r = [[0f32; 16]; 4];
        for p in 0..kc {
            let bp = std::slice::from_raw_parts(b.add(p * 16), 16);
            for (i, row) in r.iter_mut().enumerate() {
                let av = *a.add(p * 4 + i);
                for (x, &bv) in row.iter_mut().zip(bp) {
                    *x += av * bv;
                }
            }
        }
        for (i, row) in r.iter().enumerate() {
            let cr = std::slice::from_raw_parts_mut(c.add(i * ldc), 16);
            for (x, v) in cr.iter_mut().zip(row) {
                *x = if acc { *x + v } else { *v };
            }
        }
    }
}
