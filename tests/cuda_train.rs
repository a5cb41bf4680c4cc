//! GPU tests of the training and algebra kernels (feature `cuda`): the LoRA backward
//! (kernels/lora_backward.cu) against the f64 reference of src/train/backward.rs, the device
//! training state (backward + clip + AdamW, kernels/adamw.cu) against the CPU training path, the
//! KRAdapter forward/merge (kernels/kron.cu) against `Kron`, EigenLoRAx serving
//! (kernels/eigen.cu) against `eigen::eigen_linear` on the CPU.
//!
//! Each test prints `skipped: no CUDA device (...)` and returns when there is no usable GPU (this
//! machine and CI); `scripts/gpu-check.sh` runs them on a GPU and fails if they skip.

#[cfg(feature = "cuda")]
mod gpu {
    use rankfuse::adapter::kron::Kron;
    use rankfuse::algebra::eigen::{self, BasisModule, EigenModule};
    use rankfuse::backend::cuda::train::{clip_grad_norm, DeviceGrads};
    use rankfuse::backend::cuda::{CudaBackend, DeviceMatrix};
    use rankfuse::rng::SplitMix64;
    use rankfuse::train::backward::{reference, BackwardProblem};
    use rankfuse::train::{self, AdamW, Mode};
    use rankfuse::{
        Adapter, DType, Device, Lora, MatMut, MatRef, Matrix, Runtime, RuntimeOptions, Scaling,
        Status,
    };
    use std::ffi::c_void;

    fn runtime() -> Option<Runtime> {
        let opts = RuntimeOptions {
            device: Device::Cuda,
            device_index: 0,
            ..Default::default()
        };
        match Runtime::new(opts) {
            Ok(rt) => Some(rt),
            Err(e) => {
                println!("skipped: no CUDA device ({})", e.message);
                None
            }
        }
    }

    fn cpu() -> Runtime {
        Runtime::new(RuntimeOptions::default()).unwrap()
    }

    fn rtol(d: DType) -> f64 {
        match d {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 1.6e-2,
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
                unreachable!("a quantized output")
            }
        }
    }

    /// rows x cols of dtype with row stride cols + pad, values in [-1, 1].
    fn random(rng: &mut SplitMix64, d: DType, rows: usize, cols: usize, pad: usize) -> Matrix {
        let ld = cols + pad;
        Matrix::from_f32(d, rows, ld, &rng.fill_uniform(rows * ld, -1.0, 1.0)).unwrap()
    }

    fn view(m: &Matrix, cols: usize) -> MatRef<'_> {
        let v = m.view();
        v.top_left(v.rows, cols)
    }

    fn download(cuda: &CudaBackend, d: &DeviceMatrix<'_>) -> Matrix {
        let mut host = Matrix::zeros(d.dtype, d.rows, d.ld).unwrap();
        let bytes = host.bytes().len();
        // SAFETY: host has rows * ld elements (the device buffer's full size); d is device memory
        // of that size (uploaded from a matrix of the same shape).
        unsafe {
            cuda.copy_to_host(
                host.bytes_mut().as_mut_ptr() as *mut c_void,
                d.buf.as_ptr(),
                bytes.min(d.buf.len()),
            )
            .unwrap();
        }
        cuda.synchronize().unwrap();
        host
    }

    fn upload_f32<'a>(cuda: &'a CudaBackend, v: &[f32]) -> DeviceMatrix<'a> {
        let m = Matrix::from_f32(DType::F32, 1, v.len().max(1), &{
            let mut x = v.to_vec();
            x.resize(v.len().max(1), 0.0);
            x
        })
        .unwrap();
        cuda.upload_matrix(m.view()).unwrap()
    }

    /// |got - want| <= atol + rtol |want| with atol = 4 rtol max|want| (the house rule).
    fn close(got: &[f32], want: &[f64], rtol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        let max = want.iter().fold(0f64, |a, &b| a.max(b.abs()));
        let atol = 4.0 * rtol * max + 1e-30;
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= atol + rtol * w.abs(),
                "{what}[{i}]: {g} vs {w} (max |ref| {max})"
            );
        }
    }

    #[derive(Clone, Debug)]
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        cap: usize,
        r: usize,
        x: DType,
        w: DType,
        dy: DType,
        ab: DType,
        dx: Option<DType>,
        mode: Mode,
        mask: Option<Vec<bool>>,
        gains: bool,
        pad: usize,
    }

    fn run_backward_case(cuda: &CudaBackend, c: &Case, seed: u64) {
        let mut rng = SplitMix64::new(seed);
        let x = random(&mut rng, c.x, c.m, c.k, c.pad);
        let w = random(&mut rng, c.w, c.n, c.k, c.pad);
        let dy = random(&mut rng, c.dy, c.m, c.n, c.pad);
        let a = random(&mut rng, c.ab, c.cap, c.k, 0);
        let b = random(&mut rng, c.ab, c.n, c.cap, 0);
        let r = c.r;
        let mask = c.mask.clone().unwrap_or_else(|| vec![true; c.cap]);
        let e: Vec<f32> = rng.fill_uniform(c.cap, 0.5, 1.5);
        // Effective gains as TrainState::gain: E ⊙ mask (1 without E).
        let gains_eff: Vec<f32> = (0..r)
            .map(|i| {
                if !mask[i] {
                    0.0
                } else if c.gains {
                    e[i]
                } else {
                    1.0
                }
            })
            .collect();
        let has_gains = c.gains || mask[..r].iter().any(|&m| !m);
        let grad: Vec<bool> = (0..r)
            .map(|i| mask[i] && (c.mode == Mode::Nested || i + 1 == r))
            .collect();
        let scale = 2.0 / r as f32;
        let host = BackwardProblem {
            x: view(&x, c.k),
            w: view(&w, c.k),
            dy: view(&dy, c.n),
            a: a.view().top_left(r, c.k),
            b: b.view().top_left(c.n, r),
            gains: has_gains.then_some(&gains_eff[..]),
            scale,
            grad: &grad,
            want_de: c.gains,
        };
        let want = reference(&host);

        let xd = cuda.upload_matrix(x.view()).unwrap();
        let wd = cuda.upload_matrix(w.view()).unwrap();
        let dyd = cuda.upload_matrix(dy.view()).unwrap();
        let ad = cuda.upload_matrix(a.view()).unwrap();
        let bd = cuda.upload_matrix(b.view()).unwrap();
        let dev = BackwardProblem {
            x: xd.view().top_left(c.m, c.k),
            w: wd.view().top_left(c.n, c.k),
            dy: dyd.view().top_left(c.m, c.n),
            a: ad.view().top_left(r, c.k),
            b: bd.view().top_left(c.n, r),
            ..host
        };
        // Gradient buffers start non-zero: the backward accumulates, and components without a
        // gradient must keep their values bit for bit.
        let ga0 = rng.fill_uniform(c.cap * c.k, -1.0, 1.0);
        let gb0 = rng.fill_uniform(c.n * c.cap, -1.0, 1.0);
        let ge0 = rng.fill_uniform(c.cap, -1.0, 1.0);
        let gad = upload_f32(cuda, &ga0);
        let gbd = upload_f32(cuda, &gb0);
        let ged = upload_f32(cuda, &ge0);
        let dx_dt = c.dx.unwrap_or(DType::F32);
        let sentinel = Matrix::from_f32(
            dx_dt,
            c.m.max(1),
            c.k + c.pad,
            &vec![7.0; c.m.max(1) * (c.k + c.pad)],
        )
        .unwrap();
        let dxd = cuda.upload_matrix(sentinel.view()).unwrap();
        let grads = DeviceGrads {
            da: gad.buf.as_ptr() as *mut f32,
            ldda: c.k,
            db: gbd.buf.as_ptr() as *mut f32,
            lddb: c.cap,
            de: ged.buf.as_ptr() as *mut f32,
        };
        // SAFETY: a view over the device dx buffer (m x k, ld k + pad), only handed to kernels.
        let mut dxv =
            unsafe { MatMut::from_raw(dxd.buf.as_ptr() as *mut u8, dx_dt, c.m, c.k, c.k + c.pad) };
        // SAFETY: the gradient buffers hold cap x k, n x cap and cap f32 (r <= cap), alive until
        // the synchronize below.
        unsafe {
            cuda.lora_backward(&dev, grads, c.dx.map(|_| &mut dxv))
                .unwrap_or_else(|e| panic!("{c:?}: {}", e.message));
        }
        cuda.synchronize().unwrap();
        let ga = download(cuda, &gad).to_f32_vec();
        let gb = download(cuda, &gbd).to_f32_vec();
        let ge = download(cuda, &ged).to_f32_vec();
        let what = format!("{c:?}");
        for comp in 0..c.cap {
            let on = comp < r && grad[comp];
            let a_got: Vec<f32> = ga[comp * c.k..(comp + 1) * c.k].to_vec();
            let b_got: Vec<f32> = (0..c.n).map(|j| gb[j * c.cap + comp]).collect();
            if on {
                let a_want: Vec<f64> = (0..c.k)
                    .map(|kk| ga0[comp * c.k + kk] as f64 + want.da[comp * c.k + kk])
                    .collect();
                let b_want: Vec<f64> = (0..c.n)
                    .map(|j| gb0[j * c.cap + comp] as f64 + want.db[j * r + comp])
                    .collect();
                close(&a_got, &a_want, 1e-5, &format!("dA[{comp}] {what}"));
                close(&b_got, &b_want, 1e-5, &format!("dB[{comp}] {what}"));
                if c.gains {
                    close(
                        &[ge[comp]],
                        &[ge0[comp] as f64 + want.de[comp]],
                        1e-5,
                        &format!("dE[{comp}] {what}"),
                    );
                } else {
                    assert_eq!(
                        ge[comp].to_bits(),
                        ge0[comp].to_bits(),
                        "dE untouched {what}"
                    );
                }
            } else {
                // Masked, frozen or above the rank: exactly as before.
                assert_eq!(
                    a_got,
                    ga0[comp * c.k..(comp + 1) * c.k],
                    "dA[{comp}] {what}"
                );
                let b0: Vec<f32> = (0..c.n).map(|j| gb0[j * c.cap + comp]).collect();
                assert_eq!(b_got, b0, "dB[{comp}] {what}");
                assert_eq!(ge[comp].to_bits(), ge0[comp].to_bits(), "dE[{comp}] {what}");
            }
        }
        if let Some(dt) = c.dx {
            let got = download(cuda, &dxd);
            let gv = got.view();
            let mut vals = Vec::new();
            for i in 0..c.m {
                for kk in 0..c.k + c.pad {
                    if kk < c.k {
                        vals.push(gv.get(i, kk));
                    } else {
                        assert_eq!(gv.get(i, kk), 7.0, "dx padding {what}");
                    }
                }
            }
            // Inputs are exact in their dtypes; the output is rounded once to dx's dtype.
            close(&vals, &want.dx, rtol(dt).max(1e-5), &format!("dx {what}"));
        }
    }

    #[test]
    fn backward_matches_the_f64_reference() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        let mut cases = Vec::new();
        let dts = [DType::F32, DType::F16, DType::BF16];
        // Every rank 1..capacity, both modes, odd shapes, with and without gains and a mask.
        for cap in [1usize, 5, 17] {
            for r in 1..=cap {
                for mode in [Mode::Nested, Mode::Frozen] {
                    let i = cases.len();
                    let mask = (cap > 2).then(|| (0..cap).map(|c| c % 3 != 1).collect());
                    cases.push(Case {
                        m: [1, 7, 33, 70][i % 4],
                        n: [3, 17, 65][i % 3],
                        k: [5, 31, 129][(i / 3) % 3],
                        cap,
                        r,
                        x: dts[i % 3],
                        w: dts[(i + 1) % 3],
                        dy: dts[(i / 3) % 3],
                        ab: dts[(i / 2) % 3],
                        dx: Some(dts[(i + 2) % 3]),
                        mode,
                        mask: if i % 2 == 0 { mask } else { None },
                        gains: i % 4 < 2,
                        pad: i % 3,
                    });
                }
            }
        }
        // Larger shapes: K splits in U / G and m splits in dA / dB (atomics), tails everywhere.
        for (m, n, k, r) in [
            (1, 4099, 1031, 16),
            (513, 257, 1537, 64),
            (1025, 96, 80, 33),
        ] {
            for dt in dts {
                cases.push(Case {
                    m,
                    n,
                    k,
                    cap: r + 3,
                    r,
                    x: dt,
                    w: dt,
                    dy: dt,
                    ab: dt,
                    dx: Some(dt),
                    mode: Mode::Nested,
                    mask: None,
                    gains: dt == DType::F32,
                    pad: 1,
                });
            }
        }
        // No dx; an empty k.
        let mut c = cases[3].clone();
        c.dx = None;
        cases.push(c);
        let mut c = cases[4].clone();
        c.k = 0;
        cases.push(c);
        for (i, c) in cases.iter().enumerate() {
            run_backward_case(cuda, c, 100 + i as u64);
        }
        println!("{} backward cases", cases.len());
    }

    /// A trainable module with random A, B (so every gradient is non-zero), a mask and gains.
    fn module(seed: u64, dtype: DType, gains: bool) -> Lora {
        let (k, n, cap) = (37, 29, 6);
        let mut l = Lora::new_trainable("m", k, n, cap, 12.0, Scaling::Lora, dtype, seed).unwrap();
        let mut rng = SplitMix64::new(seed + 1);
        l.set_weights(
            &rng.fill_uniform(cap * k, -0.3, 0.3),
            &rng.fill_uniform(n * cap, -0.3, 0.3),
        )
        .unwrap();
        l.set_mask(&[true, true, false, true, true, true]).unwrap();
        if gains {
            l.enable_gains(0.8).unwrap();
        }
        l
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    /// Backward, clip and AdamW on the device against the CPU training path, over DyLoRA steps
    /// at different ranks and modes (per-component step counts). AdamW is bit-identical given
    /// the same gradients, so each step starts the device from the CPU's state.
    #[test]
    fn device_training_matches_the_cpu() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        let cpu_rt = cpu();
        let opt = AdamW {
            lr: 1e-2,
            weight_decay: 0.05,
            ..AdamW::default()
        };
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for gains in [false, true] {
                let mut ad = Adapter::new("cpu");
                ad.add(module(7, dtype, gains)).unwrap();
                let mut rng = SplitMix64::new(3);
                let (m, k, n) = (11, 37, 29);
                for (step, (rank, mode)) in [
                    (6, Mode::Nested),
                    (3, Mode::Frozen),
                    (4, Mode::Nested),
                    (6, Mode::Frozen),
                ]
                .into_iter()
                .enumerate()
                {
                    let x = random(&mut rng, dtype, m, k, 0);
                    let w = random(&mut rng, dtype, n, k, 0);
                    let dy = random(&mut rng, dtype, m, n, 0);
                    let what = format!("{dtype:?} gains {gains} step {step}");
                    // Device: upload the CPU state, backward on the device.
                    let l = ad.modules_mut().next().unwrap();
                    let mut dev = cuda.upload_train(l).unwrap();
                    let (xd, wd, dyd) = (
                        cuda.upload_matrix(x.view()).unwrap(),
                        cuda.upload_matrix(w.view()).unwrap(),
                        cuda.upload_matrix(dy.view()).unwrap(),
                    );
                    dev.backward(xd.view(), wd.view(), dyd.view(), rank, mode, None)
                        .unwrap();
                    // CPU: the same backward.
                    rankfuse::training::backward(
                        &cpu_rt,
                        l,
                        x.view(),
                        w.view(),
                        dy.view(),
                        rank,
                        mode,
                        None,
                    )
                    .unwrap();
                    let snap = dev.snapshot().unwrap();
                    let t = l.train_state().unwrap();
                    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                    close(&snap.ga, &f64s(&t.ga), 1e-5, &format!("dA {what}"));
                    close(&snap.gb, &f64s(&t.gb), 1e-5, &format!("dB {what}"));
                    if gains {
                        close(&snap.ge, &f64s(&t.ge), 1e-5, &format!("dE {what}"));
                    }
                    assert_eq!(dev.touched, t.touched, "{what}");
                    // Clip (tiny max_norm so it scales) and step from the CPU's gradients.
                    let mut dev = vec![cuda.upload_train(l).unwrap()];
                    let norm_dev = clip_grad_norm(&mut dev, 1e-3).unwrap();
                    let norm_cpu = train::clip_grad_norm(&mut ad, 1e-3).unwrap();
                    assert!(
                        (norm_dev - norm_cpu).abs() <= 1e-12 * norm_cpu.max(1.0),
                        "norm {norm_dev} vs {norm_cpu} {what}"
                    );
                    let l = ad.modules_mut().next().unwrap();
                    let snap = dev[0].snapshot().unwrap();
                    let t = l.train_state().unwrap();
                    close(&snap.ga, &f64s(&t.ga), 1e-6, &format!("clipped dA {what}"));
                    // Step both from identical gradients: bit-identical.
                    let mut dev = cuda.upload_train(l).unwrap();
                    dev.adamw_step(&opt).unwrap();
                    train::adamw_step(l, &opt).unwrap();
                    let snap = dev.snapshot().unwrap();
                    let t = l.train_state().unwrap();
                    assert_eq!(bits(&snap.a), bits(&t.a), "A {what}");
                    assert_eq!(bits(&snap.b), bits(&t.b), "B {what}");
                    assert_eq!(bits(&snap.ma), bits(&t.mom_a.m), "m_A {what}");
                    assert_eq!(bits(&snap.vb), bits(&t.mom_b.v), "v_B {what}");
                    if gains {
                        assert_eq!(
                            bits(snap.e.as_ref().unwrap()),
                            bits(t.e.as_ref().unwrap()),
                            "E {what}"
                        );
                    }
                    assert_eq!(dev.steps, t.steps, "{what}");
                    // The compute copy on the device is round(masters), as on the CPU.
                    let (ca, cb) = dev.compute_copies().unwrap();
                    assert_eq!(bits(&ca), bits(&l.a.view().to_f32_vec()), "copy A {what}");
                    assert_eq!(bits(&cb), bits(&l.b.view().to_f32_vec()), "copy B {what}");
                    // And handing the state back reproduces the CPU module.
                    let mut back = module(7, dtype, gains);
                    dev.download_into(&mut back).unwrap();
                    let tb = back.train_state().unwrap();
                    assert_eq!(bits(&tb.a), bits(&t.a), "download A {what}");
                    assert_eq!(tb.steps, t.steps, "download steps {what}");
                    train::zero_grad(l).unwrap();
                }
            }
        }
    }

    /// `train::backward` (what `rf_lora_backward` calls) on a CUDA runtime: device x, w, dy, dx,
    /// the module's state in host memory; the gradients and dx match the CPU runtime's.
    #[test]
    fn train_backward_on_a_cuda_runtime_matches_the_cpu_runtime() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        let cpu_rt = cpu();
        for (i, dtype) in [DType::F32, DType::F16, DType::BF16]
            .into_iter()
            .enumerate()
        {
            for (rank, mode) in [(0, Mode::Nested), (4, Mode::Frozen), (3, Mode::Nested)] {
                let gains = i % 2 == 0;
                let mut lg = module(11, dtype, gains);
                let mut lc = module(11, dtype, gains);
                let (m, k, n) = (13, 37, 29);
                let mut rng = SplitMix64::new(5 + i as u64);
                let x = random(&mut rng, dtype, m, k, 0);
                let w = random(&mut rng, dtype, n, k, 0);
                let dy = random(&mut rng, dtype, m, n, 0);
                let mut dxc = Matrix::zeros(dtype, m, k).unwrap();
                rankfuse::training::backward(
                    &cpu_rt,
                    &mut lc,
                    x.view(),
                    w.view(),
                    dy.view(),
                    rank,
                    mode,
                    Some(&mut dxc.view_mut()),
                )
                .unwrap();
                let (xd, wd, dyd) = (
                    cuda.upload_matrix(x.view()).unwrap(),
                    cuda.upload_matrix(w.view()).unwrap(),
                    cuda.upload_matrix(dy.view()).unwrap(),
                );
                let dxd = cuda
                    .upload_matrix(Matrix::zeros(dtype, m, k).unwrap().view())
                    .unwrap();
                // SAFETY: a view over dxd's device memory, only handed to kernels.
                let mut dxv =
                    unsafe { MatMut::from_raw(dxd.buf.as_ptr() as *mut u8, dtype, m, k, k) };
                rankfuse::training::backward(
                    &rt,
                    &mut lg,
                    xd.view(),
                    wd.view(),
                    dyd.view(),
                    rank,
                    mode,
                    Some(&mut dxv),
                )
                .unwrap();
                let what = format!("{dtype:?} rank {rank} {mode:?}");
                let (tg, tc) = (lg.train_state().unwrap(), lc.train_state().unwrap());
                let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
                close(&tg.ga, &f64s(&tc.ga), 1e-5, &format!("dA {what}"));
                close(&tg.gb, &f64s(&tc.gb), 1e-5, &format!("dB {what}"));
                close(&tg.ge, &f64s(&tc.ge), 1e-5, &format!("dE {what}"));
                assert_eq!(tg.touched, tc.touched, "{what}");
                // Components without a gradient are exactly zero on both.
                for c in 0..tg.touched.len() {
                    if !tc.touched[c] {
                        assert!(tg.ga[c * k..(c + 1) * k].iter().all(|v| v.to_bits() == 0));
                    }
                }
                let got = download(cuda, &dxd).to_f32_vec();
                close(
                    &got,
                    &f64s(&dxc.to_f32_vec()),
                    rtol(dtype).max(1e-5),
                    &format!("dx {what}"),
                );
            }
        }
    }

    /// A NaN gradient makes the device step a no-op returning NUMERIC with the CPU's message.
    #[test]
    fn nan_gradient_is_numeric_like_the_cpu() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        let mut l = module(9, DType::F32, true);
        let (m, k, n) = (5, 37, 29);
        let mut rng = SplitMix64::new(4);
        let x = random(&mut rng, DType::F32, m, k, 0);
        let w = random(&mut rng, DType::F32, n, k, 0);
        let mut dyv = rng.fill_uniform(m * n, -1.0, 1.0);
        dyv[2 * n + 3] = f32::NAN;
        let dy = Matrix::from_f32(DType::F32, m, n, &dyv).unwrap();
        let mut dev = cuda.upload_train(&l).unwrap();
        let (xd, wd, dyd) = (
            cuda.upload_matrix(x.view()).unwrap(),
            cuda.upload_matrix(w.view()).unwrap(),
            cuda.upload_matrix(dy.view()).unwrap(),
        );
        dev.backward(xd.view(), wd.view(), dyd.view(), 0, Mode::Nested, None)
            .unwrap();
        let before = dev.snapshot().unwrap();
        let e = dev.adamw_step(&AdamW::default()).unwrap_err();
        rankfuse::training::backward(
            &cpu(),
            &mut l,
            x.view(),
            w.view(),
            dy.view(),
            0,
            Mode::Nested,
            None,
        )
        .unwrap();
        let ec = train::adamw_step(&mut l, &AdamW::default()).unwrap_err();
        assert_eq!(e.status, Status::Numeric);
        assert_eq!(e.message, ec.message);
        let after = dev.snapshot().unwrap();
        assert_eq!(bits(&before.a), bits(&after.a));
        assert_eq!(bits(&before.mb), bits(&after.mb));
        assert!(dev.steps.iter().all(|&s| s == 0));
    }

    fn random_kron(out: usize, inp: usize, seed: u64) -> Kron {
        let mut k = Kron::new("k", out, inp, 1.5, seed).unwrap();
        let mut g = SplitMix64::new(seed + 1);
        k.u = g.fill_uniform(k.u.len(), -1.0, 1.0);
        k
    }

    #[test]
    fn kron_forward_and_merge_match_the_cpu() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        for (i, (out, inp)) in [
            (4, 6),
            (6, 4),
            (5, 7),
            (7, 5),
            (33, 100),
            (100, 33),
            (257, 1000),
            (1000, 257),
            (64, 64),
        ]
        .into_iter()
        .enumerate()
        {
            let kr = random_kron(out, inp, 10 + i as u64);
            let dk = cuda.upload_kron(&kr).unwrap();
            let mut rng = SplitMix64::new(i as u64);
            for (xdt, batch, pad) in [(DType::F32, 1, 0), (DType::F16, 9, 3), (DType::BF16, 70, 1)]
            {
                let x = random(&mut rng, xdt, batch, inp, pad);
                let xf: Vec<f32> = (0..batch)
                    .flat_map(|b| (0..inp).map(move |j| (b, j)))
                    .map(|(b, j)| x.view().get(b, j))
                    .collect();
                let want: Vec<f64> = kr
                    .forward(&xf, batch)
                    .unwrap()
                    .iter()
                    .map(|&v| v as f64)
                    .collect();
                let xd = cuda.upload_matrix(x.view()).unwrap();
                // y = Δy (f32), then y += Δy on a y that holds ones (accumulate).
                for accumulate in [false, true] {
                    let y0 =
                        Matrix::from_f32(DType::F32, batch, out, &vec![1.0; batch * out]).unwrap();
                    let yd = cuda.upload_matrix(y0.view()).unwrap();
                    // SAFETY: a view over yd's device memory, only handed to the kernel.
                    let mut yv = unsafe {
                        MatMut::from_raw(yd.buf.as_ptr() as *mut u8, DType::F32, batch, out, out)
                    };
                    cuda.kron_forward(&dk, xd.view().top_left(batch, inp), &mut yv, accumulate)
                        .unwrap();
                    let got = download(cuda, &yd).to_f32_vec();
                    let w2: Vec<f64> = want
                        .iter()
                        .map(|&v| if accumulate { v + 1.0 } else { v })
                        .collect();
                    close(
                        &got,
                        &w2,
                        1e-5,
                        &format!("kron forward {out} x {inp} {xdt:?}"),
                    );
                }
            }
            for wdt in [DType::F32, DType::F16, DType::BF16] {
                for unmerge in [false, true] {
                    let w = random(&mut rng, wdt, out, inp, 2);
                    let mut cpu_w = Matrix::from_f32(wdt, out, inp + 2, &w.to_f32_vec()).unwrap();
                    {
                        let mut v = cpu_w.view_mut();
                        // SAFETY: a sub-view of cpu_w (out x inp, ld inp + 2).
                        let mut sub =
                            unsafe { MatMut::from_raw(v.as_mut_ptr(), wdt, out, inp, inp + 2) };
                        kr.merge_into(&mut sub, unmerge).unwrap();
                    }
                    let wd = cuda.upload_matrix(w.view()).unwrap();
                    // SAFETY: a view over wd's device memory (out x inp, ld inp + 2).
                    let mut wv = unsafe {
                        MatMut::from_raw(wd.buf.as_ptr() as *mut u8, wdt, out, inp, inp + 2)
                    };
                    cuda.kron_merge(&dk, &mut wv, unmerge).unwrap();
                    let got = download(cuda, &wd);
                    // Same operations in the same order, one rounding: identical, padding too.
                    assert_eq!(
                        got.bytes(),
                        cpu_w.bytes(),
                        "kron merge {out} x {inp} {wdt:?} unmerge {unmerge}"
                    );
                }
            }
        }
    }

    #[test]
    fn eigen_linear_matches_the_cpu() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        let cpu_rt = cpu();
        for (case, (out, inp, kc, m)) in [(40, 48, 6, 7), (129, 65, 17, 70), (33, 300, 64, 1)]
            .into_iter()
            .enumerate()
        {
            let mut rng = SplitMix64::new(50 + case as u64);
            let mut mat = |r: usize, c: usize| {
                let v = rng.fill_uniform(r * c, -0.5, 0.5);
                faer::Mat::<f32>::from_fn(r, c, |i, j| v[i * c + j])
            };
            let (ca, cb) = (mat(inp, kc), mat(out, kc));
            let basis = BasisModule::new("mod", ca, cb, 1.0, 1.0).unwrap();
            let mods: Vec<EigenModule> = (0..3)
                .map(|i| EigenModule::new(&format!("a{i}"), mat(kc, 4), mat(kc, 4)).unwrap())
                .collect();
            let slots: Vec<Option<&EigenModule>> =
                vec![Some(&mods[0]), None, Some(&mods[1]), Some(&mods[2])];
            let db = cuda.upload_eigen_basis(&basis).unwrap();
            for (xdt, ydt) in [
                (DType::F32, DType::F32),
                (DType::BF16, DType::BF16),
                (DType::F16, DType::F32),
            ] {
                let mut rng = SplitMix64::new(case as u64 + 7);
                let x = random(&mut rng, xdt, m, inp, 1);
                let w = random(&mut rng, xdt, out, inp, 0);
                let bias = random(&mut rng, ydt, 1, out, 0);
                let row_slot: Vec<i32> = (0..m as i32).map(|i| (i % 5) - 1).collect();
                for rs in [None, Some(&row_slot[..])] {
                    let mut want = Matrix::zeros(ydt, m, out).unwrap();
                    eigen::eigen_linear(
                        &cpu_rt,
                        view(&x, inp),
                        w.view(),
                        Some(bias.view()),
                        &basis,
                        &slots,
                        rs,
                        &mut want.view_mut(),
                    )
                    .unwrap();
                    let cores = cuda.upload_eigen_cores(&db, &slots, rs.is_none()).unwrap();
                    let (xd, wd, bd) = (
                        cuda.upload_matrix(x.view()).unwrap(),
                        cuda.upload_matrix(w.view()).unwrap(),
                        cuda.upload_matrix(bias.view()).unwrap(),
                    );
                    let y0 = Matrix::zeros(ydt, m, out).unwrap();
                    let yd = cuda.upload_matrix(y0.view()).unwrap();
                    // SAFETY: a view over yd's device memory, only handed to kernels.
                    let mut yv =
                        unsafe { MatMut::from_raw(yd.buf.as_ptr() as *mut u8, ydt, m, out, out) };
                    cuda.eigen_linear(
                        xd.view().top_left(m, inp),
                        wd.view(),
                        Some(bd.view()),
                        &db,
                        &cores,
                        rs,
                        &mut yv,
                    )
                    .unwrap();
                    let got = download(cuda, &yd).to_f32_vec();
                    // The same through `eigen::eigen_linear` on the CUDA runtime (what
                    // rf_eigen_linear calls): basis and cores copied for the call.
                    let y2 = cuda.upload_matrix(y0.view()).unwrap();
                    // SAFETY: a view over y2's device memory, only handed to kernels.
                    let mut y2v =
                        unsafe { MatMut::from_raw(y2.buf.as_ptr() as *mut u8, ydt, m, out, out) };
                    eigen::eigen_linear(
                        &rt,
                        xd.view().top_left(m, inp),
                        wd.view(),
                        Some(bd.view()),
                        &basis,
                        &slots,
                        rs,
                        &mut y2v,
                    )
                    .unwrap();
                    assert_eq!(download(cuda, &y2).to_f32_vec(), got, "runtime path {case}");
                    let want: Vec<f64> = want.to_f32_vec().iter().map(|&v| v as f64).collect();
                    // The base product runs in a different kernel order on each side: tolerance
                    // of y's dtype (one rounding may differ) and of f32 accumulation.
                    close(
                        &got,
                        &want,
                        rtol(ydt).max(1e-4),
                        &format!("eigen {case} {xdt:?}->{ydt:?} stacked {}", rs.is_none()),
                    );
                }
            }
            // Host pointers are refused with a message.
            let x = random(&mut rng, DType::F32, m, inp, 0);
            let w = random(&mut rng, DType::F32, out, inp, 0);
            let mut y = Matrix::zeros(DType::F32, m, out).unwrap();
            let cores = cuda.upload_eigen_cores(&db, &slots, true).unwrap();
            let e = cuda
                .eigen_linear(
                    x.view(),
                    w.view(),
                    None,
                    &db,
                    &cores,
                    None,
                    &mut y.view_mut(),
                )
                .unwrap_err();
            assert!(e.message.contains("device memory"), "{}", e.message);
        }
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_training_tests_need_feature_cuda() {
    println!("skipped: no CUDA device (built without feature cuda)");
}
