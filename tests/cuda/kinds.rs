//! (module of tests/cuda/main.rs) KRAdapter and EigenLoRAx modules on a CUDA runtime against the CPU runtime (itself checked
//! against the dense reference and finite differences in tests/methods.rs): `rf_linear`'s
//! forward with LoRA, KRAdapter and EigenLoRAx slots (two bases, one slot truncated) in mixed and
//! stacked calls, dtype mixes, ld > cols, shapes of several tiles; the backward's gradients and
//! dx. Needs feature `cuda` and a GPU; prints one `skipped:` line otherwise.

#[cfg(feature = "cuda")]
#[path = "../common/kinds.rs"]
mod common_kinds;

#[cfg(feature = "cuda")]
mod gpu {
    use super::common_kinds::modules;
    use crate::gpu::runtime;
    use rankfuse::backend::cuda::{CudaBackend, DeviceMatrix};
    use rankfuse::methods::Slots;
    use rankfuse::rng::SplitMix64;
    use rankfuse::train::Mode;
    use rankfuse::{DType, LinearProblem, Lora, MatMut, Matrix, Runtime};

    /// d's rows x cols, read back (without the padding past cols).
    fn download(cuda: &CudaBackend, d: &DeviceMatrix<'_>) -> Vec<f32> {
        let v = crate::gpu::download(cuda, d).to_f32_vec();
        (0..d.rows)
            .flat_map(|i| v[i * d.ld..i * d.ld + d.cols].to_vec())
            .collect()
    }

    fn close(what: &str, got: &[f32], want: &[f32], rtol: f32) {
        assert_eq!(got.len(), want.len(), "{what}");
        let scale = want.iter().fold(1f32, |a, v| a.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= rtol * (scale + w.abs()),
                "{what}: [{i}] {g} vs {w} (scale {scale})"
            );
        }
    }

    #[test]
    fn method_slots_match_the_cpu_runtime() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().unwrap();
        let cpu = Runtime::cpu().unwrap();
        for (n, k, m) in [
            (12, 20, 11),
            (20, 12, 11),
            (130, 70, 67),
            (70, 130, 9),
            (64, 300, 130),
        ] {
            let mods = modules(n, k, (n * 100 + k) as u64);
            let mults = [1.0f32, 0.75, 1.0, 2.0, 1.0];
            let mut g = SplitMix64::new(5);
            let ld = k + 3;
            let xs = g.fill_uniform(m * ld, -1.0, 1.0);
            let w = g.fill_uniform(n * k, -1.0, 1.0);
            let bias = g.fill_uniform(n, -1.0, 1.0);
            let resolve = |r: &Runtime| {
                Slots::from_any(
                    mods.iter()
                        .zip(mults)
                        .map(|(l, s)| Some(r.slot_any(l, 0, s).unwrap())),
                )
            };
            let (hs, ds) = (resolve(&cpu), resolve(&rt));
            let mixed: Vec<i32> = (0..m as i32).map(|i| i % 6 - 1).collect();
            for (xdt, wdt, ydt) in [
                (DType::F32, DType::F32, DType::F32),
                (DType::BF16, DType::F16, DType::F32),
                (DType::F16, DType::BF16, DType::BF16),
                (DType::F16, DType::F16, DType::F16),
            ] {
                let xm = Matrix::from_f32(xdt, m, ld, &xs).unwrap();
                let wm = Matrix::from_f32(wdt, n, k, &w).unwrap();
                let bm = Matrix::from_f32(DType::F32, 1, n, &bias).unwrap();
                let dxm = cuda.upload_matrix(xm.view()).unwrap();
                let dwm = cuda.upload_matrix(wm.view()).unwrap();
                let dbm = cuda.upload_matrix(bm.view()).unwrap();
                for rs in [Some(&mixed[..]), None] {
                    let what = format!(
                        "{n}x{k} m{m} {xdt:?}/{wdt:?}/{ydt:?} mixed={}",
                        rs.is_some()
                    );
                    let hp = LinearProblem {
                        x: xm.view().top_left(m, k),
                        w: wm.view(),
                        bias: Some(bm.view()),
                        slots: &hs.low,
                        row_slot: rs,
                    };
                    let mut want = Matrix::zeros(ydt, m, n).unwrap();
                    cpu.linear_with(&hp, &hs.methods, &mut want.view_mut())
                        .unwrap();
                    let dy = cuda
                        .upload_matrix(Matrix::zeros(ydt, m, n + 2).unwrap().view())
                        .unwrap();
                    let dp = LinearProblem {
                        x: dxm.view().top_left(m, k),
                        w: dwm.view(),
                        bias: Some(dbm.view()),
                        slots: &ds.low,
                        row_slot: rs,
                    };
                    // SAFETY: dy is device memory of m x (n + 2); the view covers m x n of it.
                    let mut yv =
                        unsafe { MatMut::from_raw(dy.buf.as_ptr() as *mut u8, ydt, m, n, n + 2) };
                    rt.linear_with(&dp, &ds.methods, &mut yv)
                        .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let got = download(cuda, &dy);
                    let gv: Vec<f32> = (0..m)
                        .flat_map(|i| got[i * (n + 2)..i * (n + 2) + n].to_vec())
                        .collect();
                    let pad: Vec<f32> = (0..m)
                        .flat_map(|i| got[i * (n + 2) + n..(i + 1) * (n + 2)].to_vec())
                        .collect();
                    assert!(pad.iter().all(|&v| v == 0.0), "{what}: padding written");
                    let tol = if ydt == DType::F32 { 1e-4 } else { 1e-2 };
                    close(&what, &gv, &want.to_f32_vec(), tol);
                }
            }
        }
    }

    /// (ga, gb, ge) of a module's training state.
    fn grads(l: &Lora) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let t = l.train_state().unwrap();
        (t.ga.clone(), t.gb.clone(), t.ge.clone())
    }

    #[test]
    fn method_backward_matches_the_cpu_runtime() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().unwrap();
        let cpu = Runtime::cpu().unwrap();
        for (n, k, m) in [(12, 20, 5), (20, 12, 5), (130, 70, 70), (70, 130, 33)] {
            let seed = 7 + n as u64;
            let (mut host_mods, mut dev_mods) = (modules(n, k, seed), modules(n, k, seed));
            for mods in [&mut host_mods, &mut dev_mods] {
                mods[2].enable_gains(1.0).unwrap();
                mods[2].set_mask(&[true, false, true]).unwrap();
            }
            let mut g = SplitMix64::new(3);
            let x = g.fill_uniform(m * k, -1.0, 1.0);
            let dy = g.fill_uniform(m * n, -1.0, 1.0);
            let w = g.fill_uniform(n * k, -1.0, 1.0);
            for (xdt, dxdt) in [(DType::F32, DType::F32), (DType::BF16, DType::F16)] {
                let xm = Matrix::from_f32(xdt, m, k, &x).unwrap();
                let dym = Matrix::from_f32(xdt, m, n, &dy).unwrap();
                let wm = Matrix::from_f32(xdt, n, k, &w).unwrap();
                let (dxm, ddym, dwm) = (
                    cuda.upload_matrix(xm.view()).unwrap(),
                    cuda.upload_matrix(dym.view()).unwrap(),
                    cuda.upload_matrix(wm.view()).unwrap(),
                );
                for idx in [1usize, 2, 3, 4] {
                    let what = format!("{} {n}x{k} m{m} {xdt:?}", host_mods[idx].kind.name());
                    let mut hdx = Matrix::zeros(dxdt, m, k).unwrap();
                    let hl = &mut host_mods[idx];
                    hl.train_state_mut().unwrap().zero_grad();
                    rankfuse::training::backward(
                        &cpu,
                        hl,
                        xm.view(),
                        wm.view(),
                        dym.view(),
                        0,
                        Mode::Nested,
                        Some(&mut hdx.view_mut()),
                    )
                    .unwrap();
                    let ddx = cuda
                        .upload_matrix(Matrix::zeros(dxdt, m, k).unwrap().view())
                        .unwrap();
                    // SAFETY: ddx is device memory of m x k.
                    let mut dxv =
                        unsafe { MatMut::from_raw(ddx.buf.as_ptr() as *mut u8, dxdt, m, k, k) };
                    let dl = &mut dev_mods[idx];
                    dl.train_state_mut().unwrap().zero_grad();
                    rankfuse::training::backward(
                        &rt,
                        dl,
                        dxm.view(),
                        dwm.view(),
                        ddym.view(),
                        0,
                        Mode::Nested,
                        Some(&mut dxv),
                    )
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                    let tol = if dxdt == DType::F32 { 1e-4 } else { 1e-2 };
                    close(
                        &format!("{what} dx"),
                        &download(cuda, &ddx),
                        &hdx.to_f32_vec(),
                        tol,
                    );
                    let (ha, hb, he) = grads(&host_mods[idx]);
                    let (da, db, de) = grads(&dev_mods[idx]);
                    close(&format!("{what} dA"), &da, &ha, 1e-4);
                    close(&format!("{what} dB"), &db, &hb, 1e-4);
                    close(&format!("{what} dE"), &de, &he, 1e-4);
                }
            }
        }
    }
}
