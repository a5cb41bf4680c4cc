//! Criterion: fused linear vs base-only vs naive unfused (three separate GEMMs and an add) vs
//! fused on prepacked W on a few shapes, with the kernel table this CPU selects. Run with
//! `cargo bench --bench fused_linear` (about 1-2 minutes); filter with e.g.
//! `cargo bench --bench fused_linear -- m16`. `rankfuse bench` prints the same comparison as a
//! table plus JSON, the bandwidth roofline and a mixed-adapter batch.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rankfuse::adapter::{Lora, Scaling, TensorData};
use rankfuse::rng::SplitMix64;
use rankfuse::runtime::slot;
use rankfuse::{DType, LinearProblem, Matrix, Runtime};
use std::time::Duration;

fn random(rng: &mut SplitMix64, dtype: DType, rows: usize, cols: usize, amp: f32) -> Matrix {
    Matrix::from_f32(dtype, rows, cols, &rng.fill_uniform(rows * cols, -amp, amp)).unwrap()
}

fn bench(c: &mut Criterion) {
    let rt = Runtime::cpu().unwrap();
    // (dtype, m, k, n, r): decode, small batch, a larger batch.
    let cases = [
        (DType::BF16, 1, 4096, 4096, 16),
        (DType::F32, 16, 2048, 2048, 16),
        (DType::BF16, 128, 2048, 2048, 16),
    ];
    let mut g = c.benchmark_group("fused_linear");
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    for (dtype, m, k, n, r) in cases {
        let mut rng = SplitMix64::new(42);
        let x = random(&mut rng, dtype, m, k, 1.0);
        let w = random(&mut rng, dtype, n, k, 0.02);
        let a = random(&mut rng, dtype, r, k, 0.02);
        let b = random(&mut rng, dtype, n, r, 0.02);
        let lora = Lora::new(
            "bench",
            TensorData::Owned(a),
            TensorData::Owned(b),
            2.0 * r as f32,
            Scaling::Lora,
            0.0,
        )
        .unwrap();
        let s = [Some(slot(&lora, 0, 1.0).unwrap())];
        let mut y = Matrix::zeros(dtype, m, n).unwrap();
        let mut t = Matrix::zeros(DType::F32, m, r).unwrap();
        let mut d = Matrix::zeros(DType::F32, m, n).unwrap();
        let base = LinearProblem {
            x: x.view(),
            w: w.view(),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        let fused = LinearProblem { slots: &s, ..base };
        let id = format!("{}_m{m}_k{k}_n{n}_r{r}", dtype.name().to_lowercase());
        g.throughput(Throughput::Elements((2 * m * n * k) as u64));
        g.bench_function(BenchmarkId::new("base", &id), |bch| {
            bch.iter(|| rt.linear(&base, &mut y.view_mut()).unwrap())
        });
        g.bench_function(BenchmarkId::new("fused", &id), |bch| {
            bch.iter(|| rt.linear(&fused, &mut y.view_mut()).unwrap())
        });
        // The same with W packed once (rf_weights_pack): the per-call W packing is gone.
        let pw = rt.pack(&base.w).unwrap();
        g.bench_function(BenchmarkId::new("packed_fused", &id), |bch| {
            bch.iter(|| rt.linear_packed(&fused, &pw, &mut y.view_mut()).unwrap())
        });
        let scale = s[0].unwrap().scale;
        let mut row = vec![0f32; n];
        let mut drow = vec![0f32; n];
        g.bench_function(BenchmarkId::new("naive", &id), |bch| {
            bch.iter(|| {
                rt.linear(&base, &mut y.view_mut()).unwrap();
                let shrink = LinearProblem {
                    w: lora.a_view(r),
                    ..base
                };
                rt.linear(&shrink, &mut t.view_mut()).unwrap();
                let expand = LinearProblem {
                    x: t.view(),
                    w: lora.b_view(r),
                    ..base
                };
                rt.linear(&expand, &mut d.view_mut()).unwrap();
                let mut yv = y.view_mut();
                for i in 0..m {
                    yv.as_ref().row_f32(i, 0, &mut row);
                    d.view().row_f32(i, 0, &mut drow);
                    for (o, dd) in row.iter_mut().zip(&drow) {
                        *o += scale * dd;
                    }
                    yv.set_row_f32(i, 0, &row);
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
