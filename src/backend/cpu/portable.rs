//! Portable micro-kernels: plain Rust over fixed-size arrays, which LLVM vectorizes for the
//! baseline ISA (SSE2 on x86_64, NEON on aarch64). The fallback every CPU can run.
//!
//! The tile shape is a const parameter so the driver's blocking can be exercised with the tile
//! shapes of ISAs this machine cannot run (AVX-512's 12 x 32): see the tests in selfcheck.rs.

use super::driver::MicroKernel;

/// An MR x NR register tile in plain Rust.
pub struct PortableTile<const MR: usize, const NR: usize>;

/// The variant the kernel table installs.
pub type Portable = PortableTile<4, 16>;

impl<const MR: usize, const NR: usize> MicroKernel for PortableTile<MR, NR> {
    const MR: usize = MR;
    const NR: usize = NR;

    #[inline(never)]
    unsafe fn micro(kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize, acc: bool) {
        let mut r = [[0f32; NR]; MR];
        for p in 0..kc {
            let bp = std::slice::from_raw_parts(b.add(p * NR), NR);
            for (i, row) in r.iter_mut().enumerate() {
                let av = *a.add(p * MR + i);
                for (x, &bv) in row.iter_mut().zip(bp) {
                    *x += av * bv;
                }
            }
        }
        for (i, row) in r.iter().enumerate() {
            let cr = std::slice::from_raw_parts_mut(c.add(i * ldc), NR);
            for (x, v) in cr.iter_mut().zip(row) {
                *x = if acc { *x + v } else { *v };
            }
        }
    }
}
