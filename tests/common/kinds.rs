//! Modules of every kind for the method tests (tests/methods.rs, tests/cuda/kinds.rs).

use faer::Mat;
use rankfuse::adapter::BasisModule;
use rankfuse::rng::SplitMix64;
use rankfuse::{DType, Lora};
use std::sync::Arc;

pub fn rand_mat(g: &mut SplitMix64, rows: usize, cols: usize) -> Mat<f32> {
    let v = g.fill_uniform(rows * cols, -1.0, 1.0);
    Mat::from_fn(rows, cols, |i, j| v[i * cols + j])
}

/// A LoRA, a KRAdapter, two EigenLoRAx adapters on one basis (one truncated) and one on
/// another basis, all with non-zero parameters, for an n x k weight.
pub fn modules(n: usize, k: usize, seed: u64) -> Vec<Lora> {
    let mut g = SplitMix64::new(seed);
    let mut lora =
        Lora::new_trainable("m", k, n, 4, 8.0, rankfuse::Scaling::Lora, DType::F32, seed).unwrap();
    let a = g.fill_uniform(4 * k, -0.5, 0.5);
    let b = g.fill_uniform(n * 4, -0.5, 0.5);
    lora.set_weights(&a, &b).unwrap();
    let mut kron = Lora::new_kron("m", n, k, 2.0, seed + 1).unwrap();
    let (s, _, _) = kron.kron_parts().unwrap();
    let u = g.fill_uniform(s.m * s.r, -0.5, 0.5);
    let vt = g.fill_uniform(s.w() * s.m, -0.5, 0.5);
    kron.set_weights(&u, &vt).unwrap();
    let kb = 5.min(n).min(k);
    let basis = Arc::new(
        BasisModule::new(
            "m",
            rand_mat(&mut g, k, kb),
            rand_mat(&mut g, n, kb),
            1.0,
            1.0,
        )
        .unwrap(),
    );
    let other = Arc::new(
        BasisModule::new(
            "m",
            rand_mat(&mut g, k, 3),
            rand_mat(&mut g, n, 3),
            1.0,
            1.0,
        )
        .unwrap(),
    );
    let mut eig = Vec::new();
    for (b, r, sc) in [(&basis, 3, 1.0f32), (&basis, 2, 0.5), (&other, 2, 1.5)] {
        let mut e = Lora::new_eigen(b.clone(), r, sc, g.next_u64()).unwrap();
        let kk = b.k();
        let aa = g.fill_uniform(r * kk, -0.5, 0.5);
        let ab = g.fill_uniform(kk * r, -0.5, 0.5);
        e.set_weights(&aa, &ab).unwrap();
        eig.push(e);
    }
    eig[1].set_rank(kb - 1).unwrap(); // the first k - 1 basis components
    let mut v = vec![lora, kron];
    v.extend(eig);
    v
}
