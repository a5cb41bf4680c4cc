//! CUDA backend tests.
//!
//! Without a GPU (this machine, CI): a CUDA runtime is an error with a message (DEVICE without a
//! driver, UNSUPPORTED without feature `cuda`), never a panic; the device-memory C ABI answers
//! with the documented errors. With a GPU (feature `cuda`): every kernel path (decode, FMA
//! tiles, tensor cores, shrink/expand, mixed batches) against the f64 reference, and the PEFT
//! fixtures. GPU tests print one `skipped:` line when no device is there.

use rankfuse::ffi::device::*;
use rankfuse::ffi::error::{rf_error_code, rf_error_free, rf_error_message};
use rankfuse::ffi::handles::rf_runtime;
use rankfuse::ffi::runtime::{rf_runtime_create, rf_runtime_free};
use rankfuse::ffi::types::*;
use rankfuse::{Device, Runtime, RuntimeOptions, Status};
use std::ffi::{c_void, CStr};

fn cuda_opts(index: i32) -> RuntimeOptions {
    RuntimeOptions {
        device: Device::Cuda,
        device_index: index,
        ..Default::default()
    }
}

/// What creating a CUDA runtime must give on a machine without a usable GPU.
fn expected_status() -> Status {
    if cfg!(feature = "cuda") {
        Status::Device
    } else {
        Status::Unsupported
    }
}

#[cfg(feature = "cuda")]
fn driver_present() -> bool {
    rankfuse::backend::cuda::driver_present()
}
#[cfg(not(feature = "cuda"))]
fn driver_present() -> bool {
    false
}

/// Takes an error, returns (status, message) and frees it.
unsafe fn take(e: *mut rankfuse::ffi::error::rf_error) -> Option<(rf_status, String)> {
    if e.is_null() {
        return None;
    }
    let code = rf_error_code(e);
    let msg = CStr::from_ptr(rf_error_message(e))
        .to_string_lossy()
        .into_owned();
    rf_error_free(e);
    Some((code, msg))
}

#[test]
fn cuda_runtime_without_a_gpu_is_an_error_not_a_panic() {
    match Runtime::new(cuda_opts(0)) {
        Ok(rt) => {
            assert!(driver_present());
            assert_eq!(rt.device(), Device::Cuda);
            println!("skipped: a CUDA device is present; no-device path not exercised");
        }
        Err(e) => {
            // A driver without a usable device also gives DEVICE.
            assert_eq!(e.status, expected_status(), "{}", e.message);
            assert!(
                e.message.contains("CUDA") || e.message.contains("cuda"),
                "{}",
                e.message
            );
        }
    }
    // A device index out of range is an error on every machine.
    let e = Runtime::new(cuda_opts(4096)).err().expect("index 4096");
    assert_eq!(e.status, expected_status(), "{}", e.message);
    let e = Runtime::new(cuda_opts(-1)).err().expect("index -1");
    assert_eq!(e.status, expected_status(), "{}", e.message);
}

#[test]
fn c_abi_cuda_runtime_create_reports_device_or_unsupported() {
    let opts = rf_runtime_options {
        struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
        device: rf_device::RF_DEVICE_CUDA,
        device_index: 4096,
        num_threads: 0,
        cuda_stream: std::ptr::null_mut(),
    };
    let mut rt: *mut rf_runtime = std::ptr::null_mut();
    // SAFETY: valid options and out-pointer.
    let (code, msg) = unsafe { take(rf_runtime_create(&opts, &mut rt)) }.expect("an error");
    let want = if cfg!(feature = "cuda") {
        rf_status::RF_STATUS_DEVICE
    } else {
        rf_status::RF_STATUS_UNSUPPORTED
    };
    assert_eq!(code, want, "{msg}");
    assert!(!msg.is_empty());
    assert!(rt.is_null(), "out-param written on failure");
}

#[test]
fn device_memory_functions_on_a_cpu_runtime() {
    let mut rt: *mut rf_runtime = std::ptr::null_mut();
    // SAFETY: NULL options = CPU runtime; every pointer below is valid or deliberately NULL.
    unsafe {
        assert!(take(rf_runtime_create(std::ptr::null(), &mut rt)).is_none());
        let want = if cfg!(feature = "cuda") {
            rf_status::RF_STATUS_INVALID_ARGUMENT
        } else {
            rf_status::RF_STATUS_UNSUPPORTED
        };
        let mut p: *mut c_void = std::ptr::null_mut();
        let (code, msg) = take(rf_device_alloc(rt, 64, &mut p)).expect("alloc on CPU");
        assert_eq!(code, want, "{msg}");
        assert!(p.is_null());
        let mut host = [0u8; 16];
        let (code, _) = take(rf_copy_to_device(
            rt,
            host.as_mut_ptr() as *mut c_void,
            host.as_ptr() as *const c_void,
            16,
        ))
        .expect("copy on CPU");
        assert_eq!(code, want);
        let (code, _) = take(rf_copy_to_host(
            rt,
            host.as_mut_ptr() as *mut c_void,
            host.as_ptr() as *const c_void,
            16,
        ))
        .expect("copy on CPU");
        assert_eq!(code, want);
        let (code, _) =
            take(rf_device_free(rt, host.as_mut_ptr() as *mut c_void)).expect("free on CPU");
        assert_eq!(code, want);
        // NULL is accepted by free; synchronize on a CPU runtime has nothing to wait for.
        assert!(take(rf_device_free(rt, std::ptr::null_mut())).is_none());
        assert!(take(rf_runtime_synchronize(rt)).is_none());
        // Bad arguments name themselves.
        let (code, msg) = take(rf_device_alloc(std::ptr::null_mut(), 64, &mut p)).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("'rt'"), "{msg}");
        let (code, msg) = take(rf_device_alloc(rt, 64, std::ptr::null_mut())).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("'out'"), "{msg}");
        let (code, msg) = take(rf_copy_to_device(
            rt,
            std::ptr::null_mut(),
            host.as_ptr() as _,
            4,
        ))
        .unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("'dst'"), "{msg}");
        let (code, msg) = take(rf_copy_to_host(
            rt,
            host.as_mut_ptr() as _,
            std::ptr::null(),
            4,
        ))
        .unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("'src'"), "{msg}");
        let (code, _) = take(rf_runtime_synchronize(std::ptr::null_mut())).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        rf_runtime_free(rt);
    }
}

/// GPU tests: each compares the CUDA backend with the f64 reference.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use rankfuse::adapter::peft;
    use rankfuse::backend::cpu::reference;
    use rankfuse::backend::cuda::{CudaBackend, DeviceMatrix};
    use rankfuse::backend::{LinearProblem, Slot};
    use rankfuse::rng::SplitMix64;
    use rankfuse::{DType, MatMut, MatRef, Matrix, Weights};

    fn runtime() -> Option<Runtime> {
        match Runtime::new(cuda_opts(0)) {
            Ok(rt) => Some(rt),
            Err(e) => {
                println!("skipped: no CUDA device ({})", e.message);
                None
            }
        }
    }

    fn rtol(d: DType) -> f32 {
        match d {
            DType::F32 => 1e-5,
            DType::F16 => 2e-3,
            DType::BF16 => 1.6e-2,
        }
    }

    /// A rows x cols matrix of dtype with row stride cols + pad, random values in [-1, 1].
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
        let bytes = rankfuse::matrix::span_elems(d.rows, d.cols, d.ld).unwrap() * d.dtype.size();
        // SAFETY: host has rows * ld elements >= the span; d is device memory of that span.
        unsafe {
            cuda.copy_to_host(
                host.bytes_mut().as_mut_ptr() as *mut c_void,
                d.buf.as_ptr(),
                bytes,
            )
            .unwrap();
        }
        cuda.synchronize().unwrap();
        host
    }

    #[derive(Clone, Debug)]
    struct Case {
        m: usize,
        n: usize,
        k: usize,
        x: DType,
        w: DType,
        y: DType,
        ab: DType,
        ranks: Vec<usize>,
        mixed: bool,
        bias: bool,
        gains: bool,
        pad: usize,
        device_adapters: bool,
    }

    fn slot<'a>(a: MatRef<'a>, b: MatRef<'a>, gains: Option<MatRef<'a>>, scale: f32) -> Slot<'a> {
        Slot {
            a,
            b,
            scale,
            gains,
            module: "test",
        }
    }

    fn run_case(rt: &Runtime, c: &Case, seed: u64) {
        let cuda = rt.cuda().expect("CUDA runtime");
        let mut rng = SplitMix64::new(seed);
        let x = random(&mut rng, c.x, c.m, c.k, c.pad);
        let w = random(&mut rng, c.w, c.n, c.k, c.pad);
        let bias = random(&mut rng, c.y, 1, c.n, 0);
        let a: Vec<Matrix> = c
            .ranks
            .iter()
            .map(|&r| random(&mut rng, c.ab, r, c.k, 1))
            .collect();
        let b: Vec<Matrix> = c
            .ranks
            .iter()
            .map(|&r| random(&mut rng, c.ab, c.n, r, 2))
            .collect();
        let g: Vec<Matrix> = c
            .ranks
            .iter()
            .map(|&r| random(&mut rng, DType::F32, 1, r, 0))
            .collect();
        let row_slot: Vec<i32> = (0..c.m)
            .map(|_| (rng.next_u64() % (c.ranks.len() as u64 + 1)) as i32 - 1)
            .collect();
        let scales: Vec<f32> = c.ranks.iter().map(|&r| 2.0 / r as f32).collect();
        // Reference on the host.
        let host_slots: Vec<Option<Slot<'_>>> = (0..c.ranks.len())
            .map(|i| {
                Some(slot(
                    view(&a[i], c.k),
                    view(&b[i], c.ranks[i]),
                    c.gains.then(|| g[i].view()),
                    scales[i],
                ))
            })
            .collect();
        let hp = LinearProblem {
            x: view(&x, c.k),
            w: view(&w, c.k),
            bias: c.bias.then(|| bias.view()),
            slots: &host_slots,
            row_slot: c.mixed.then_some(&row_slot[..]),
        };
        let mut want = Matrix::zeros(DType::F32, c.m, c.n).unwrap();
        reference::linear(&hp, &mut want.view_mut());

        // The same problem on the device.
        let dx = cuda.upload_matrix(view(&x, c.k)).unwrap();
        let dw = cuda.upload_matrix(view(&w, c.k)).unwrap();
        let dbias = cuda.upload_matrix(bias.view()).unwrap();
        let sentinel =
            Matrix::from_f32(c.y, c.m, c.n + c.pad, &vec![7.0; c.m * (c.n + c.pad)]).unwrap();
        let dy = cuda.upload_matrix(sentinel.view()).unwrap();
        let da: Vec<DeviceMatrix<'_>> = a
            .iter()
            .map(|m| cuda.upload_matrix(view(m, c.k)).unwrap())
            .collect();
        let db: Vec<DeviceMatrix<'_>> = b
            .iter()
            .zip(&c.ranks)
            .map(|(m, &r)| cuda.upload_matrix(view(m, r)).unwrap())
            .collect();
        let dg: Vec<DeviceMatrix<'_>> = g
            .iter()
            .map(|m| cuda.upload_matrix(m.view()).unwrap())
            .collect();
        let dev_slots: Vec<Option<Slot<'_>>> = if c.device_adapters {
            (0..c.ranks.len())
                .map(|i| {
                    Some(slot(
                        da[i].view(),
                        db[i].view(),
                        c.gains.then(|| dg[i].view()),
                        scales[i],
                    ))
                })
                .collect()
        } else {
            host_slots.clone() // host-resident adapters: uploaded per call
        };
        let dp = LinearProblem {
            x: dx.view(),
            w: dw.view(),
            bias: c.bias.then(|| dbias.view()),
            slots: &dev_slots,
            row_slot: c.mixed.then_some(&row_slot[..]),
        };
        // SAFETY: dy is device memory of m x (n + pad); the view covers m x n of it.
        let mut yv =
            unsafe { MatMut::from_raw(dy.buf.as_ptr() as *mut u8, c.y, c.m, c.n, c.n + c.pad) };
        rt.linear(&dp, &mut yv)
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
        let got = download(cuda, &dy);

        let mma = c.m > 8 && c.x == c.w && c.x != DType::F32 && cuda.info().sm >= 80;
        let mut rt_ = rtol(c.y).max(1e-5);
        if mma {
            rt_ = rt_.max(rtol(c.x)); // T is rounded to the tensor-core type
        }
        let max_ref = want.to_f32_vec().iter().fold(0f32, |a, v| a.max(v.abs()));
        let atol = 4.0 * rt_ * max_ref.max(1.0);
        let gv = got.view();
        for i in 0..c.m {
            for j in 0..c.n + c.pad {
                let v = gv.get(i, j);
                if j >= c.n {
                    assert_eq!(v, 7.0, "{c:?}: padding ({i}, {j}) overwritten");
                    continue;
                }
                let r = want.view().get(i, j);
                assert!(
                    (v - r).abs() <= atol + rt_ * r.abs(),
                    "{c:?}: y[{i}][{j}] = {v}, reference {r}"
                );
            }
        }
    }

    #[test]
    fn every_path_and_dtype_matches_the_reference() {
        let Some(rt) = runtime() else { return };
        let mut seed = 1;
        for &(m, n, k) in &[
            (1usize, 33usize, 77usize),
            (5, 300, 1000),
            (8, 17, 4096),
            (9, 65, 40),
            (130, 257, 100),
            (257, 129, 520),
        ] {
            for x in DType::ALL {
                for w in DType::ALL {
                    for y in DType::ALL {
                        let c = Case {
                            m,
                            n,
                            k,
                            x,
                            w,
                            y,
                            ab: x,
                            ranks: vec![8],
                            mixed: false,
                            bias: true,
                            gains: false,
                            pad: 0,
                            device_adapters: true,
                        };
                        run_case(&rt, &c, seed);
                        seed += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn ld_greater_than_cols_bias_gains_and_host_adapters() {
        let Some(rt) = runtime() else { return };
        let mut seed = 100;
        for &(m, n, k) in &[(3usize, 50usize, 70usize), (200, 130, 72), (64, 64, 64)] {
            for d in [DType::F16, DType::BF16, DType::F32] {
                for pad in [0usize, 3, 8] {
                    for device_adapters in [false, true] {
                        let c = Case {
                            m,
                            n,
                            k,
                            x: d,
                            w: d,
                            y: d,
                            ab: DType::F32,
                            ranks: vec![3, 16],
                            mixed: false,
                            bias: pad != 3,
                            gains: pad == 8,
                            pad,
                            device_adapters,
                        };
                        run_case(&rt, &c, seed);
                        seed += 1;
                    }
                }
            }
        }
    }

    #[test]
    fn mixed_batches_heterogeneous_ranks() {
        let Some(rt) = runtime() else { return };
        let mut seed = 500;
        let ranks = [
            vec![1usize],
            vec![4, 64],
            vec![8, 3, 16, 33, 2],
            (1..=20).collect(),
        ];
        for r in &ranks {
            for &(m, n, k) in &[(7usize, 100usize, 64usize), (64, 256, 256), (300, 129, 200)] {
                for d in [DType::BF16, DType::F16, DType::F32] {
                    let c = Case {
                        m,
                        n,
                        k,
                        x: d,
                        w: d,
                        y: d,
                        ab: d,
                        ranks: r.clone(),
                        mixed: true,
                        bias: true,
                        gains: false,
                        pad: 0,
                        device_adapters: true,
                    };
                    run_case(&rt, &c, seed);
                    seed += 1;
                }
            }
        }
    }

    #[test]
    fn peft_fixtures_on_the_gpu() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().unwrap();
        // RANKFUSE_REPO: the checkout when the binary was built elsewhere (scripts/gpu-check.sh).
        let repo =
            std::env::var("RANKFUSE_REPO").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
        let dir = std::path::Path::new(&repo).join("tests/fixtures/peft-tiny");
        let base = Weights::open(dir.join("base.safetensors")).unwrap();
        let io = Weights::open(dir.join("io.safetensors")).unwrap();
        for name in ["lora-r8", "rslora-pattern", "lora-r64"] {
            let adapter = peft::load(&dir.join("adapters").join(name)).unwrap();
            for l in adapter.modules() {
                let m = &l.name;
                let x = cuda
                    .upload_matrix(io.get(&format!("x.{m}")).unwrap())
                    .unwrap();
                let w = cuda
                    .upload_matrix(base.get(&format!("{m}.weight")).unwrap())
                    .unwrap();
                let bias = base
                    .get(&format!("{m}.bias"))
                    .ok()
                    .map(|b| cuda.upload_matrix(b).unwrap());
                let want = io.get(&format!("y.{name}.{m}")).unwrap();
                let dl = cuda.upload_lora(l, 0).unwrap();
                let slots = [Some(dl.slot(1.0))];
                let p = LinearProblem {
                    x: x.view(),
                    w: w.view(),
                    bias: bias.as_ref().map(|b| b.view()),
                    slots: &slots,
                    row_slot: None,
                };
                let out = Matrix::zeros(DType::F32, want.rows, want.cols).unwrap();
                let dy = cuda.upload_matrix(out.view()).unwrap();
                // SAFETY: dy is device memory of want.rows x want.cols f32.
                let mut yv = unsafe {
                    MatMut::from_raw(
                        dy.buf.as_ptr() as *mut u8,
                        DType::F32,
                        want.rows,
                        want.cols,
                        want.cols,
                    )
                };
                rt.linear(&p, &mut yv).unwrap();
                let got = download(cuda, &dy);
                for i in 0..want.rows {
                    for j in 0..want.cols {
                        let (g, r) = (got.view().get(i, j), want.get(i, j));
                        assert!(
                            (g - r).abs() <= 1e-4 + 1e-4 * r.abs(),
                            "{name} {m} [{i}][{j}]: {g} vs {r}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn host_pointers_for_x_are_rejected_with_a_message() {
        let Some(rt) = runtime() else { return };
        let x = vec![0f32; 16];
        let w = vec![0f32; 16];
        let mut y = vec![0f32; 16];
        let p = LinearProblem {
            x: MatRef::from_slice(&x, 4, 4, 4).unwrap(),
            w: MatRef::from_slice(&w, 4, 4, 4).unwrap(),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        let e = rt
            .linear(&p, &mut MatMut::from_slice(&mut y, 4, 4, 4).unwrap())
            .unwrap_err();
        assert_eq!(e.status, Status::InvalidArgument);
        assert!(e.message.contains("device memory"), "{}", e.message);
    }
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gpu_comparisons_need_feature_cuda() {
    println!("skipped: GPU comparisons need a build with --features cuda (and a GPU)");
}
