//! CUDA backend tests.
//!
//! Without a GPU (this machine, CI): a CUDA runtime is an error with a message (DEVICE without a
//! driver, UNSUPPORTED without feature `cuda`), never a panic; the device-memory C ABI answers
//! with the documented errors. With a GPU (feature `cuda`): every kernel path (decode, FMA
//! tiles, tensor cores, shrink/expand, mixed batches, block-quantized W) against the f64
//! reference, and the PEFT fixtures. GPU tests print one `skipped:` line when no device is there.

use rankfuse::ffi::device::*;
use rankfuse::ffi::error::{rf_error_code, rf_error_free, rf_error_message};
use rankfuse::ffi::handles::rf_runtime;
use rankfuse::ffi::runtime::{rf_runtime_create, rf_runtime_free};
use rankfuse::ffi::types::*;
use rankfuse::{Device, Runtime, RuntimeOptions, Status};
use std::ffi::{c_void, CStr};

mod kinds;

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
        act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
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

// ---- device placement of weights and adapters (pure functions; no device needed) ----------

use rankfuse::backend::placement::{self, Placement, DEVICE_ALIGN};
use rankfuse::ffi::handles::{rf_adapter, rf_weights};
use rankfuse::ffi::weights::*;
use rankfuse::weights::{write_safetensors, TensorOut};
use rankfuse::{DType, Weights};
use std::borrow::Cow;
use std::ffi::CString;

fn f32_tensor(name: &str, shape: &[usize], start: f32) -> TensorOut<'static> {
    let n: usize = shape.iter().product();
    TensorOut {
        name: name.into(),
        dtype: DType::F32,
        shape: shape.to_vec(),
        data: Cow::Owned(
            (0..n)
                .flat_map(|i| (start + i as f32).to_le_bytes())
                .collect(),
        ),
    }
}

/// Two shards: shard files hold 2-D, 1-D, empty and 3-D (not a matrix) tensors.
fn write_two_shards(dir: &std::path::Path) -> std::path::PathBuf {
    write_safetensors(
        &dir.join("m-1.safetensors"),
        &[
            f32_tensor("a.weight", &[2, 3], 0.0),
            f32_tensor("a.bias", &[5], 10.0),
            f32_tensor("conv", &[2, 2, 2], 20.0),
            f32_tensor("empty", &[0, 4], 0.0),
        ],
        None,
    )
    .unwrap();
    write_safetensors(
        &dir.join("m-2.safetensors"),
        &[f32_tensor("c.weight", &[3, 3], 100.0)],
        None,
    )
    .unwrap();
    let idx = dir.join("m.safetensors.index.json");
    std::fs::write(
        &idx,
        r#"{"metadata": {}, "weight_map": {"a.weight": "m-1.safetensors",
            "a.bias": "m-1.safetensors", "conv": "m-1.safetensors", "empty": "m-1.safetensors",
            "c.weight": "m-2.safetensors"}}"#,
    )
    .unwrap();
    idx
}

/// Checks the invariants of a packing: aligned, in-bounds, non-overlapping per group.
fn check_packing(items: &[(usize, usize)], placed: &[Placement], totals: &[usize]) {
    assert_eq!(items.len(), placed.len());
    for (g, &total) in totals.iter().enumerate() {
        let mut ranges: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.group == g && p.bytes > 0)
            .map(|p| (p.offset, p.offset + p.bytes))
            .collect();
        ranges.sort();
        for r in &ranges {
            assert_eq!(r.0 % DEVICE_ALIGN, 0, "unaligned {r:?}");
            assert!(r.1 <= total, "{r:?} beyond {total}");
        }
        for w in ranges.windows(2) {
            assert!(w[0].1 <= w[1].0, "overlap {w:?}");
        }
        assert_eq!(ranges.last().map_or(0, |r| r.1), total, "group {g} total");
    }
    for (it, p) in items.iter().zip(placed) {
        assert_eq!((it.0, it.1), (p.group, p.bytes));
    }
}

#[test]
fn pack_aligns_partitions_and_refuses_overflow() {
    let mut rng = rankfuse::rng::SplitMix64::new(7);
    for case in 0..200 {
        let groups = 1 + case % 4;
        let n = (rng.next_u64() % 40) as usize;
        let items: Vec<(usize, usize)> = (0..n)
            .map(|_| {
                let g = (rng.next_u64() % groups as u64) as usize;
                let bytes = match rng.next_u64() % 4 {
                    0 => 0,
                    1 => (rng.next_u64() % 8) as usize,
                    2 => DEVICE_ALIGN * (1 + (rng.next_u64() % 3) as usize),
                    _ => (rng.next_u64() % 100_000) as usize,
                };
                (g, bytes)
            })
            .collect();
        let (placed, totals) = placement::pack(&items, groups).unwrap();
        assert_eq!(totals.len(), groups);
        check_packing(&items, &placed, &totals);
    }
    // Exact layout of a small case: 10 bytes at 0, nothing for the empty item, then 256.
    let (p, t) = placement::pack(&[(0, 10), (0, 0), (0, 300), (1, 4)], 2).unwrap();
    assert_eq!(
        p.iter().map(|p| p.offset).collect::<Vec<_>>(),
        vec![0, 0, 256, 0]
    );
    assert_eq!(t, vec![556, 4]);
    let e = placement::pack(&[(0, usize::MAX / 2), (0, usize::MAX / 2)], 1).unwrap_err();
    assert_eq!(e.status, Status::OutOfMemory, "{}", e.message);
    assert_eq!(
        placement::pack(&[(3, 1)], 2).unwrap_err().status,
        Status::Internal
    );
}

#[test]
fn weights_plan_is_per_shard_and_skips_what_get_refuses() {
    let d = tempfile::tempdir().unwrap();
    let idx = write_two_shards(d.path());
    let w = Weights::open(&idx).unwrap();
    assert_eq!(w.shard_count(), 2);
    let plan = placement::plan_weights(&w).unwrap();
    assert_eq!(plan.tensors.len(), w.len());
    assert_eq!(plan.shard_bytes.len(), 2);
    let mut items = Vec::new();
    let mut placed = Vec::new();
    for (e, p) in w.entries().iter().zip(&plan.tensors) {
        // Exactly the tensors `get` turns into a matrix are planned.
        assert_eq!(p.is_some(), w.get(&e.name).is_ok(), "{}", e.name);
        assert_eq!(p.is_some(), placement::uploadable(e), "{}", e.name);
        if let Some(p) = p {
            assert_eq!(p.group, e.shard(), "{}", e.name);
            assert_eq!(p.bytes, e.byte_len(), "{}", e.name);
            assert_eq!(p.bytes, w.bytes(&e.name).unwrap().len());
            items.push((e.shard(), e.byte_len()));
            placed.push(*p);
        }
    }
    check_packing(&items, &placed, &plan.shard_bytes);
    assert!(plan.tensors[w.index_of("conv").unwrap()].is_none());
    let s = |name: &str| w.entries()[w.index_of(name).unwrap()].shard();
    assert_eq!(s("a.weight"), s("a.bias"));
    assert_ne!(s("a.weight"), s("c.weight"));
    // Shard of c.weight: 36 bytes alone. Shard of a.*: a.weight (24 bytes) and a.bias (20) in
    // file order, the second at offset DEVICE_ALIGN.
    assert_eq!(plan.shard_bytes[s("c.weight")], 36);
    let second = if w.index_of("a.bias") > w.index_of("a.weight") {
        20
    } else {
        24
    };
    assert_eq!(plan.shard_bytes[s("a.weight")], DEVICE_ALIGN + second);
    assert_eq!(plan.total(), DEVICE_ALIGN + second + 36);
    assert!(w
        .shard_path(s("c.weight"))
        .unwrap()
        .ends_with("m-2.safetensors"));
    assert!(w.shard_path(2).is_none());
    // A single file is one group.
    let one = Weights::open(d.path().join("m-2.safetensors")).unwrap();
    let p = placement::plan_weights(&one).unwrap();
    assert_eq!(p.shard_bytes, vec![36]);
}

#[test]
fn staging_chunks_cover_every_piece_once_in_order() {
    let lens = [0usize, 1, 7, 8, 9, 24, 0, 3];
    for chunk in [1usize, 2, 7, 8, 100] {
        let plan = placement::staging_chunks(&lens, chunk);
        let mut next = vec![0usize; lens.len()];
        let mut last_piece = 0;
        for &(p, off, n) in &plan {
            assert!(p >= last_piece, "pieces out of order");
            last_piece = p;
            assert!(n > 0 && n <= chunk);
            assert_eq!(off, next[p], "gap or overlap in piece {p}");
            next[p] += n;
        }
        assert_eq!(next.as_slice(), &lens, "chunk {chunk}");
    }
    assert!(placement::staging_chunks(&[0, 0], 8).is_empty());
}

unsafe fn open_ex(
    rt: *mut rf_runtime,
    path: &std::path::Path,
    flags: u32,
    out: *mut *mut rf_weights,
) -> Option<(rf_status, String)> {
    let c = CString::new(path.to_str().unwrap()).unwrap();
    let opts = rf_weights_open_options {
        struct_size: std::mem::size_of::<rf_weights_open_options>() as u32,
        flags,
    };
    take(rf_weights_open_ex(rt, c.as_ptr(), &opts, out))
}

/// RF_WEIGHTS_LAZY / RF_WEIGHTS_HOST: contradictory together; on a CPU runtime they change
/// nothing (host views with the file's bytes).
#[test]
fn weights_upload_flags_on_a_cpu_runtime() {
    let d = tempfile::tempdir().unwrap();
    let idx = write_two_shards(d.path());
    let host = Weights::open(&idx).unwrap();
    // SAFETY: every pointer below is valid or deliberately NULL; handles are freed once.
    unsafe {
        let mut rt: *mut rf_runtime = std::ptr::null_mut();
        assert!(take(rf_runtime_create(std::ptr::null(), &mut rt)).is_none());
        let sentinel = std::ptr::NonNull::<rf_weights>::dangling().as_ptr();
        let mut w = sentinel;
        let (code, msg) = open_ex(rt, &idx, RF_WEIGHTS_LAZY | RF_WEIGHTS_HOST, &mut w).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(
            msg.contains("RF_WEIGHTS_LAZY") && msg.contains("RF_WEIGHTS_HOST"),
            "{msg}"
        );
        assert_eq!(w, sentinel, "out-param written on failure");
        let (code, msg) = open_ex(rt, &idx, 8, &mut w).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("RF_WEIGHTS_LAZY = 2"), "{msg}");
        assert_eq!(w, sentinel);
        for flags in [
            0,
            RF_WEIGHTS_LAZY,
            RF_WEIGHTS_HOST,
            RF_WEIGHTS_LAZY | RF_WEIGHTS_READ,
        ] {
            let mut w: *mut rf_weights = std::ptr::null_mut();
            assert!(open_ex(rt, &idx, flags, &mut w).is_none(), "flags {flags}");
            for name in ["a.weight", "a.bias", "c.weight"] {
                let c = CString::new(name).unwrap();
                let mut m = std::mem::zeroed::<rf_matrix>();
                assert!(take(rf_weights_get(w, c.as_ptr(), &mut m)).is_none());
                let want = host.bytes(name).unwrap();
                let got = std::slice::from_raw_parts(m.data as *const u8, want.len());
                assert_eq!(got, want, "{name}, flags {flags}");
            }
            let c = CString::new("conv").unwrap();
            let mut m = std::mem::zeroed::<rf_matrix>();
            let (code, msg) = take(rf_weights_get(w, c.as_ptr(), &mut m)).unwrap();
            assert_eq!(code, rf_status::RF_STATUS_FORMAT, "{msg}");
            rf_weights_free(w);
        }
        rf_runtime_free(rt);
    }
}

/// The whole host sequence on a machine without a usable GPU: the CUDA runtime is an error
/// (DEVICE with the feature, UNSUPPORTED without) and leaves `rt` NULL; opening weights or an
/// adapter with that NULL runtime is INVALID_ARGUMENT naming 'rt', out-params untouched.
#[test]
fn weights_and_adapters_without_a_cuda_runtime() {
    if driver_present() && Runtime::new(cuda_opts(0)).is_ok() {
        println!("skipped: a CUDA device is present; the no-device path is not exercised");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let idx = write_two_shards(d.path());
    let opts = rf_runtime_options {
        struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
        device: rf_device::RF_DEVICE_CUDA,
        device_index: 0,
        num_threads: 0,
        cuda_stream: std::ptr::null_mut(),
        act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
    };
    // SAFETY: valid arguments or deliberately NULL runtime.
    unsafe {
        let mut rt: *mut rf_runtime = std::ptr::null_mut();
        let (code, msg) = take(rf_runtime_create(&opts, &mut rt)).expect("an error");
        let want = if cfg!(feature = "cuda") {
            rf_status::RF_STATUS_DEVICE
        } else {
            rf_status::RF_STATUS_UNSUPPORTED
        };
        assert_eq!(code, want, "{msg}");
        assert!(msg.contains("CUDA"), "{msg}");
        assert!(rt.is_null());
        let sentinel = std::ptr::NonNull::<rf_weights>::dangling().as_ptr();
        let mut w = sentinel;
        let (code, msg) = open_ex(rt, &idx, 0, &mut w).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("'rt'"), "{msg}");
        assert_eq!(w, sentinel);
        let c = CString::new(idx.to_str().unwrap()).unwrap();
        let (code, _) = take(rf_weights_open(rt, c.as_ptr(), &mut w)).unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert_eq!(w, sentinel);
        let sentinel_a = std::ptr::NonNull::<rf_adapter>::dangling().as_ptr();
        let mut a = sentinel_a;
        let dir = CString::new(fixture_dir().join("adapters/lora-r8").to_str().unwrap()).unwrap();
        let (code, msg) = take(rankfuse::ffi::adapter::rf_adapter_load_peft(
            rt,
            dir.as_ptr(),
            &mut a,
        ))
        .unwrap();
        assert_eq!(code, rf_status::RF_STATUS_INVALID_ARGUMENT);
        assert!(msg.contains("'rt'"), "{msg}");
        assert_eq!(a, sentinel_a);
    }
}

/// On a CPU runtime `lora_slot` is the host slot (device copies only matter to CUDA runtimes),
/// and a module with no device copy refreshes as a no-op.
#[test]
fn lora_slot_on_a_cpu_runtime_reads_the_host_tensors() {
    let rt = Runtime::cpu().unwrap();
    let mut a =
        rankfuse::adapter::peft::load(&fixture_dir().join("adapters/rslora-pattern")).unwrap();
    for l in a.modules() {
        for rank in [0usize, 1, 3] {
            let s = rt.lora_slot(l, rank, 0.5).unwrap();
            let h = rankfuse::runtime::slot(l, rank, 0.5).unwrap();
            assert_eq!(s.a.as_ptr(), h.a.as_ptr());
            assert_eq!(s.b.as_ptr(), h.b.as_ptr());
            assert_eq!((s.a.rows, s.b.cols, s.scale), (h.a.rows, h.b.cols, h.scale));
        }
    }
    for l in a.modules_mut() {
        l.refresh_device().unwrap();
    }
}

/// The PEFT fixtures (RANKFUSE_REPO: the checkout when the binary was built elsewhere).
fn fixture_dir() -> std::path::PathBuf {
    let repo = std::env::var("RANKFUSE_REPO").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    std::path::Path::new(&repo).join("tests/fixtures/peft-tiny")
}

/// GPU tests: each compares the CUDA backend with the f64 reference.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use rankfuse::adapter::peft;
    use rankfuse::backend::cpu::reference;
    use rankfuse::backend::cuda::{CudaBackend, DeviceMatrix};
    use rankfuse::backend::{LinearProblem, Slot};
    use rankfuse::ffi::adapter::*;
    use rankfuse::ffi::handles::rf_lora;
    use rankfuse::ffi::train::*;
    use rankfuse::rng::SplitMix64;
    use rankfuse::{MatMut, MatRef, Matrix};

    pub(crate) fn runtime() -> Option<Runtime> {
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
            DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
                unreachable!("a quantized output")
            }
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

    pub(crate) fn download(cuda: &CudaBackend, d: &DeviceMatrix<'_>) -> Matrix {
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

    /// `rows` rows of `ld` elements of random blocks with small finite f16 scales (random scale
    /// bytes could be NaN / inf), as tests/quant_linear.rs.
    fn random_quant(dt: DType, rows: usize, ld: usize, rng: &mut SplitMix64) -> Vec<u8> {
        let mut out = vec![0u8; rows * ld / dt.block_elems() * dt.size()];
        for b in out.chunks_mut(dt.size()) {
            for v in b.iter_mut() {
                *v = rng.next_u64() as u8;
            }
            // Q6_K: d 32x smaller keeps |w| <= 4 (i8 scales times q - 32), as Q8_0's.
            let dscale = if dt == DType::Q6_K { 1.0 / 32.0 } else { 1.0 };
            let d = half::f16::from_f32(rng.uniform(0.002, 0.03) * dscale);
            let at = rankfuse::quant::d_offset(dt);
            b[at..at + 2].copy_from_slice(&d.to_le_bytes());
            if dt == DType::Q4_K {
                let dmin = half::f16::from_f32(rng.uniform(0.0, 0.02));
                b[2..4].copy_from_slice(&dmin.to_le_bytes());
            }
        }
        out
    }

    /// A block-quantized W (Q8_0, Q4_0, Q4_K, Q6_K) through quant_decode_* (one split with the expand
    /// in the CTA, K splits with the epilogue) and quant_linear_*, against the f64 reference on
    /// the exactly dequantized W; ld one block wider than k, stacked and mixed slots, host and
    /// device adapters, every x / y dtype.
    #[test]
    fn quantized_w_matches_the_reference() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda().expect("CUDA runtime");
        let mut rng = SplitMix64::new(1400);
        let dts = [DType::F32, DType::F16, DType::BF16];
        let mut case = 0usize;
        for wdt in DType::QUANT {
            let be = wdt.block_elems();
            for &(m, n, blocks) in &[
                (1usize, 37usize, 3usize),
                (3, 300, 5),
                (8, 17, 33),
                (8, 4100, 16),
                (9, 65, 3),
                (130, 257, 4),
            ] {
                case += 1;
                let (k, ld) = (blocks * be, blocks * be + be);
                let (xdt, ydt, abdt) = (dts[case % 3], dts[(case / 3) % 3], dts[(case + 1) % 3]);
                let mixed = case.is_multiple_of(2);
                let ranks = [3usize, 40, 16];
                let x = random(&mut rng, xdt, m, k, 1);
                let wb = random_quant(wdt, n, ld, &mut rng);
                let bias = random(&mut rng, ydt, 1, n, 0);
                let a: Vec<Matrix> = ranks
                    .iter()
                    .map(|&r| random(&mut rng, abdt, r, k, 0))
                    .collect();
                let b: Vec<Matrix> = ranks
                    .iter()
                    .map(|&r| random(&mut rng, abdt, n, r, 0))
                    .collect();
                let row_slot: Vec<i32> = (0..m)
                    .map(|_| (rng.next_u64() % (ranks.len() as u64 + 1)) as i32 - 1)
                    .collect();
                let host_slots: Vec<Option<Slot<'_>>> = (0..ranks.len())
                    .map(|i| Some(slot(a[i].view(), b[i].view(), None, 2.0 / ranks[i] as f32)))
                    .collect();
                let hw = MatRef::from_bytes(&wb, wdt, n, k, ld).unwrap();
                let hp = LinearProblem {
                    x: view(&x, k),
                    w: hw,
                    bias: Some(bias.view()),
                    slots: &host_slots,
                    row_slot: mixed.then_some(&row_slot[..]),
                };
                let mut want = Matrix::zeros(DType::F32, m, n).unwrap();
                reference::linear(&hp, &mut want.view_mut());

                let dx = cuda.upload_matrix(view(&x, k)).unwrap();
                let dwb = cuda.upload(&wb).unwrap();
                // SAFETY: dwb holds the n rows of ld elements of wb on the device.
                let dw = unsafe { MatRef::from_raw(dwb.as_ptr() as *const u8, wdt, n, k, ld) };
                let dbias = cuda.upload_matrix(bias.view()).unwrap();
                let da: Vec<DeviceMatrix<'_>> = a
                    .iter()
                    .map(|v| cuda.upload_matrix(v.view()).unwrap())
                    .collect();
                let db: Vec<DeviceMatrix<'_>> = b
                    .iter()
                    .map(|v| cuda.upload_matrix(v.view()).unwrap())
                    .collect();
                let dev_slots: Vec<Option<Slot<'_>>> = if case.is_multiple_of(3) {
                    host_slots.clone()
                } else {
                    (0..ranks.len())
                        .map(|i| {
                            Some(slot(
                                da[i].view(),
                                db[i].view(),
                                None,
                                2.0 / ranks[i] as f32,
                            ))
                        })
                        .collect()
                };
                let dp = LinearProblem {
                    x: dx.view(),
                    w: dw,
                    bias: Some(dbias.view()),
                    slots: &dev_slots,
                    row_slot: mixed.then_some(&row_slot[..]),
                };
                let sentinel = Matrix::from_f32(ydt, m, n + 1, &vec![7.0; m * (n + 1)]).unwrap();
                let dy = cuda.upload_matrix(sentinel.view()).unwrap();
                // SAFETY: dy is device memory of m x (n + 1); the view covers m x n of it.
                let mut yv =
                    unsafe { MatMut::from_raw(dy.buf.as_ptr() as *mut u8, ydt, m, n, n + 1) };
                let what = format!(
                    "{} m={m} n={n} k={k} x={xdt:?} y={ydt:?} mixed={mixed}",
                    wdt.name()
                );
                rt.linear(&dp, &mut yv)
                    .unwrap_or_else(|e| panic!("{what}: {e}"));
                let got = download(cuda, &dy);
                let rt_ = rtol(ydt).max(1e-5);
                let max_ref = want.to_f32_vec().iter().fold(0f32, |a, v| a.max(v.abs()));
                let atol = 4.0 * rt_ * max_ref.max(1.0);
                for i in 0..m {
                    assert_eq!(
                        got.view().get(i, n),
                        7.0,
                        "{what}: padding of row {i} overwritten"
                    );
                    for j in 0..n {
                        let (v, r) = (got.view().get(i, j), want.view().get(i, j));
                        assert!(
                            (v - r).abs() <= atol + rt_ * r.abs(),
                            "{what}: y[{i}][{j}] = {v}, reference {r}"
                        );
                    }
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

    // ---- weights and adapters opened on a CUDA runtime (device copies) -----------------------

    /// A CUDA runtime through the C ABI; None (and a `skipped:` line) without a device.
    unsafe fn c_runtime() -> Option<*mut rf_runtime> {
        let opts = rf_runtime_options {
            struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
            device: rf_device::RF_DEVICE_CUDA,
            device_index: 0,
            num_threads: 0,
            cuda_stream: std::ptr::null_mut(),
            act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
        };
        let mut rt: *mut rf_runtime = std::ptr::null_mut();
        match take(rf_runtime_create(&opts, &mut rt)) {
            None => Some(rt),
            Some((_, msg)) => {
                println!("skipped: no CUDA device ({msg})");
                None
            }
        }
    }

    /// `bytes` bytes at device address `p`, copied back to the host.
    unsafe fn fetch(rt: *mut rf_runtime, p: *const c_void, bytes: usize) -> Vec<u8> {
        let mut v = vec![0u8; bytes];
        if bytes > 0 {
            assert!(take(rf_copy_to_host(rt, v.as_mut_ptr() as *mut c_void, p, bytes)).is_none());
            assert!(take(rf_runtime_synchronize(rt)).is_none());
        }
        v
    }

    unsafe fn get(w: *const rf_weights, name: &str) -> Result<rf_matrix, (rf_status, String)> {
        let c = CString::new(name).unwrap();
        let mut m = std::mem::zeroed::<rf_matrix>();
        match take(rf_weights_get(w, c.as_ptr(), &mut m)) {
            None => Ok(m),
            Some(e) => Err(e),
        }
    }

    /// A sharded copy of base.safetensors (two files, plus a 3-D tensor that stays on the host).
    fn shard_base(dir: &std::path::Path) -> std::path::PathBuf {
        let base = Weights::open(fixture_dir().join("base.safetensors")).unwrap();
        let names: Vec<String> = base.entries().iter().map(|e| e.name.clone()).collect();
        let (first, second) = names.split_at(names.len() / 2);
        let out = |list: &[String]| -> Vec<TensorOut<'_>> {
            list.iter()
                .map(|n| TensorOut {
                    name: n.clone(),
                    dtype: DType::F32,
                    shape: base.entry(n).unwrap().shape.clone(),
                    data: Cow::Owned(base.bytes(n).unwrap().to_vec()),
                })
                .collect()
        };
        write_safetensors(&dir.join("s-1.safetensors"), &out(first), None).unwrap();
        let mut two = out(second);
        two.push(f32_tensor("extra.conv", &[2, 2, 2], 1.0));
        write_safetensors(&dir.join("s-2.safetensors"), &two, None).unwrap();
        let mut map = serde_json::Map::new();
        for n in first {
            map.insert(n.clone(), "s-1.safetensors".into());
        }
        for n in second.iter().map(|s| s.as_str()).chain(["extra.conv"]) {
            map.insert(n.to_string(), "s-2.safetensors".into());
        }
        let idx = dir.join("s.safetensors.index.json");
        let j = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(&idx, j.to_string()).unwrap();
        idx
    }

    /// rf_weights_open on a CUDA runtime: every tensor is a device pointer (aligned, 256 B)
    /// whose bytes are the file's; eager and lazy, single file and sharded; RF_WEIGHTS_HOST keeps
    /// host views; weights outlive the runtime they were opened on.
    #[test]
    fn weights_on_a_cuda_runtime_are_device_copies_of_the_file() {
        // SAFETY: C ABI calls with valid arguments; handles freed once.
        unsafe {
            let Some(rt) = c_runtime() else { return };
            let probe = CudaBackend::new(0, std::ptr::null_mut()).unwrap();
            let d = tempfile::tempdir().unwrap();
            let idx = shard_base(d.path());
            let single = fixture_dir().join("base.safetensors");
            for (path, flags) in [
                (&single, 0),
                (&single, RF_WEIGHTS_LAZY),
                (&idx, 0),
                (&idx, RF_WEIGHTS_LAZY | RF_WEIGHTS_READ),
            ] {
                let host = Weights::open(path).unwrap();
                let mut w: *mut rf_weights = std::ptr::null_mut();
                assert!(open_ex(rt, path, flags, &mut w).is_none());
                assert_eq!(rf_weights_count(w), host.len());
                for e in host.entries() {
                    let m = match get(w, &e.name) {
                        Ok(m) => m,
                        Err((code, msg)) => {
                            assert_eq!(e.name, "extra.conv");
                            assert_eq!(code, rf_status::RF_STATUS_FORMAT, "{msg}");
                            continue;
                        }
                    };
                    let want = host.bytes(&e.name).unwrap();
                    let v = host.get(&e.name).unwrap();
                    assert_eq!(
                        (m.rows, m.cols, m.ld),
                        (v.rows as i64, v.cols as i64, v.ld as i64)
                    );
                    assert!(probe.device_accessible(m.data as *const u8), "{}", e.name);
                    assert_eq!(m.data as usize % 256, 0, "{} unaligned", e.name);
                    assert_eq!(
                        fetch(rt, m.data, want.len()),
                        want,
                        "{} flags {flags}",
                        e.name
                    );
                    // The same copy every time (lazy: uploaded once).
                    assert_eq!(get(w, &e.name).unwrap().data, m.data);
                }
                rf_weights_free(w);
            }
            // Host views on request.
            let host = Weights::open(&single).unwrap();
            let mut w: *mut rf_weights = std::ptr::null_mut();
            assert!(open_ex(rt, &single, RF_WEIGHTS_HOST, &mut w).is_none());
            for e in host.entries() {
                let m = get(w, &e.name).unwrap();
                let want = host.bytes(&e.name).unwrap();
                // Read on the host: a device pointer here would fault.
                assert_eq!(
                    std::slice::from_raw_parts(m.data as *const u8, want.len()),
                    want
                );
            }
            rf_weights_free(w);
            // Freed runtime: eager copies stay valid; a lazy tensor not yet uploaded is DEVICE.
            let mut eager: *mut rf_weights = std::ptr::null_mut();
            let mut lazy: *mut rf_weights = std::ptr::null_mut();
            assert!(open_ex(rt, &idx, 0, &mut eager).is_none());
            assert!(open_ex(rt, &idx, RF_WEIGHTS_LAZY, &mut lazy).is_none());
            let first = &host.entries()[0].name;
            let early = get(lazy, first).unwrap();
            rf_runtime_free(rt);
            let Some(rt2) = c_runtime() else { return };
            let sharded = Weights::open(&idx).unwrap();
            for e in sharded.entries().iter().filter(|e| e.name != "extra.conv") {
                let m = get(eager, &e.name).unwrap();
                let want = sharded.bytes(&e.name).unwrap();
                assert_eq!(
                    fetch(rt2, m.data, want.len()),
                    want,
                    "{} after rf_runtime_free",
                    e.name
                );
            }
            let want = sharded.bytes(first).unwrap();
            assert_eq!(fetch(rt2, early.data, want.len()), want);
            let other = &host.entries()[1].name;
            let (code, msg) = get(lazy, other).unwrap_err();
            assert_eq!(code, rf_status::RF_STATUS_DEVICE, "{msg}");
            assert!(
                msg.contains("freed") && msg.contains(other.as_str()),
                "{msg}"
            );
            rf_weights_free(eager);
            rf_weights_free(lazy);
            rf_runtime_free(rt2);
        }
    }

    /// An adapter uploaded to the device: `lora_slot` on the CUDA runtime reads the device copy
    /// (equal to the host tensors); a CPU runtime keeps reading the host tensors.
    #[test]
    fn uploaded_modules_are_read_from_device_memory() {
        let Some(rt) = runtime() else { return };
        let cuda = rt.cuda_shared().unwrap();
        let cpu = Runtime::cpu().unwrap();
        let mut a = peft::load(&fixture_dir().join("adapters/rslora-pattern")).unwrap();
        {
            let mut mods: Vec<&mut rankfuse::adapter::Lora> = a.modules_mut().collect();
            rankfuse::backend::cuda::resident::upload_modules(&cuda, &mut mods).unwrap();
        }
        for l in a.modules() {
            let s = rt.lora_slot(l, 0, 1.0).unwrap();
            assert!(cuda.device_accessible(s.a.as_ptr()), "{}", l.name);
            assert!(cuda.device_accessible(s.b.as_ptr()), "{}", l.name);
            assert_eq!(s.a.as_ptr() as usize % 256, 0);
            let h = rankfuse::runtime::slot(l, 0, 1.0).unwrap();
            assert_eq!((s.a.rows, s.a.cols, s.a.ld), (h.a.rows, h.a.cols, h.a.ld));
            assert_eq!((s.b.rows, s.b.cols, s.b.ld), (h.b.rows, h.b.cols, h.b.ld));
            assert_eq!(s.scale, h.scale);
            for (dev, host) in [(s.a, l.a.view()), (s.b, l.b.view())] {
                let bytes = rankfuse::matrix::span_elems(host.rows, host.cols, host.ld).unwrap()
                    * host.dtype.size();
                let mut back = vec![0u8; bytes];
                // SAFETY: dev is device memory of the full tensor's span; back has that size.
                unsafe {
                    cuda.copy_to_host(back.as_mut_ptr() as *mut c_void, dev.as_ptr() as _, bytes)
                        .unwrap();
                }
                cuda.synchronize().unwrap();
                // SAFETY: the host view covers `bytes` bytes.
                let want = unsafe { std::slice::from_raw_parts(host.as_ptr(), bytes) };
                assert_eq!(back, want, "{}", l.name);
            }
            let c = cpu.lora_slot(l, 0, 1.0).unwrap();
            assert_eq!(c.a.as_ptr(), l.a.view().as_ptr());
        }
    }

    /// Runs `rf_linear` for module `m` on both runtimes (CUDA: device weights and adapter; CPU:
    /// host ones) and returns (gpu y, cpu y).
    #[allow(clippy::too_many_arguments)]
    unsafe fn both(
        gpu: *mut rf_runtime,
        cpu: *mut rf_runtime,
        wg: (*const rf_weights, *const rf_weights),
        wc: (*const rf_weights, *const rf_weights),
        lg: *const rf_lora,
        lc: *const rf_lora,
        m: &str,
        rank: u32,
    ) -> (Vec<f32>, Vec<f32>) {
        let mut out = Vec::new();
        for (rt, (base, io), l) in [(gpu, wg, lg), (cpu, wc, lc)] {
            let x = get(io, &format!("x.{m}")).unwrap();
            let w = get(base, &format!("{m}.weight")).unwrap();
            let bias = get(base, &format!("{m}.bias")).ok();
            let (rows, cols) = (x.rows as usize, w.rows as usize);
            let mut host = vec![0f32; rows * cols];
            let mut dev: *mut c_void = std::ptr::null_mut();
            let data = if rt == gpu {
                assert!(take(rf_device_alloc(rt, rows * cols * 4, &mut dev)).is_none());
                dev
            } else {
                host.as_mut_ptr() as *mut c_void
            };
            let mut y = rf_matrix {
                data,
                dtype: rf_dtype::RF_DTYPE_F32,
                rows: rows as i64,
                cols: cols as i64,
                ld: cols as i64,
            };
            let slots = [rf_lora_slot {
                lora: l,
                rank,
                scale_mult: 1.0,
            }];
            let bp = bias
                .as_ref()
                .map_or(std::ptr::null(), |b| b as *const rf_matrix);
            let e = take(rankfuse::ffi::linear::rf_linear(
                rt,
                &x,
                &w,
                bp,
                slots.as_ptr(),
                1,
                std::ptr::null(),
                &mut y,
            ));
            assert!(e.is_none(), "{m}: {e:?}");
            if rt == gpu {
                let b = fetch(rt, dev, rows * cols * 4);
                host = b
                    .chunks(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                assert!(take(rf_device_free(rt, dev)).is_none());
            }
            out.push(host);
        }
        let cpu_y = out.pop().unwrap();
        (out.pop().unwrap(), cpu_y)
    }

    fn close(what: &str, got: &[f32], want: &[f32]) {
        assert_eq!(got.len(), want.len());
        for (i, (g, r)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - r).abs() <= 1e-4 + 1e-4 * r.abs(),
                "{what} [{i}]: {g} vs {r}"
            );
        }
    }

    unsafe fn module(a: *mut rf_adapter, m: &str) -> *mut rf_lora {
        let c = CString::new(m).unwrap();
        let mut l: *mut rf_lora = std::ptr::null_mut();
        assert!(take(rf_adapter_module(a, c.as_ptr(), &mut l)).is_none());
        l
    }

    /// Adapters loaded on a CUDA runtime (device copies) give the CPU results and PEFT's on
    /// the fixtures, at the configured rank and truncated; after training calls change a module
    /// (set_weights, gains, mask) its device copy follows; the adapter outlives the runtime.
    #[test]
    fn adapters_loaded_on_a_cuda_runtime_match_the_cpu() {
        // SAFETY: C ABI calls with valid arguments; handles freed once, device memory before
        // its runtime.
        unsafe {
            let Some(gpu) = c_runtime() else { return };
            let mut cpu: *mut rf_runtime = std::ptr::null_mut();
            assert!(take(rf_runtime_create(std::ptr::null(), &mut cpu)).is_none());
            let dir = fixture_dir();
            let open = |rt, f: &str| {
                let mut w: *mut rf_weights = std::ptr::null_mut();
                assert!(open_ex(rt, &dir.join(f), 0, &mut w).is_none());
                w as *const rf_weights
            };
            let wg = (open(gpu, "base.safetensors"), open(gpu, "io.safetensors"));
            let wc = (open(cpu, "base.safetensors"), open(cpu, "io.safetensors"));
            let io = Weights::open(dir.join("io.safetensors")).unwrap();
            let load = |rt, name: &str| {
                let c = CString::new(dir.join("adapters").join(name).to_str().unwrap()).unwrap();
                let mut a: *mut rf_adapter = std::ptr::null_mut();
                let e = take(rankfuse::ffi::adapter::rf_adapter_load_peft(
                    rt,
                    c.as_ptr(),
                    &mut a,
                ));
                assert!(e.is_none(), "{e:?}");
                a
            };
            let mut kept = std::ptr::null_mut();
            for name in ["lora-r8", "rslora-pattern", "lora-r64"] {
                let (ag, ac) = (load(gpu, name), load(cpu, name));
                let n = rf_adapter_module_count(ag);
                assert_eq!(n, rf_adapter_module_count(ac));
                for i in 0..n {
                    let mut p: *const std::ffi::c_char = std::ptr::null();
                    assert!(take(rf_adapter_module_name(ag, i, &mut p)).is_none());
                    let m = CStr::from_ptr(p).to_str().unwrap().to_string();
                    let (lg, lc) = (module(ag, &m), module(ac, &m));
                    let (g, c) = both(gpu, cpu, wg, wc, lg, lc, &m, 0);
                    close(&format!("{name} {m} gpu vs cpu"), &g, &c);
                    let want = io.get(&format!("y.{name}.{m}")).unwrap().to_f32_vec();
                    close(&format!("{name} {m} gpu vs PEFT"), &g, &want);
                    let (g, c) = both(gpu, cpu, wg, wc, lg, lc, &m, 2);
                    close(&format!("{name} {m} rank 2"), &g, &c);
                }
                if name == "lora-r8" {
                    kept = ag;
                } else {
                    rf_adapter_free(ag);
                }
                rf_adapter_free(ac);
            }
            // Training calls keep the device copy in step.
            let ac = load(cpu, "lora-r8");
            let m = "layers.0.mlp.down_proj";
            assert!(take(rf_adapter_train_enable(kept)).is_none());
            assert!(take(rf_adapter_train_enable(ac)).is_none());
            let (lg, lc) = (module(kept, m), module(ac, m));
            let mut info = std::mem::zeroed::<rf_lora_info>();
            assert!(take(rf_lora_info_get(lg, &mut info)).is_none());
            let (cap, k, n) = (
                info.capacity as usize,
                info.in_features as usize,
                info.out_features as usize,
            );
            let mut rng = SplitMix64::new(5);
            let av = rng.fill_uniform(cap * k, -0.1, 0.1);
            let bv = rng.fill_uniform(n * cap, -0.1, 0.1);
            let mat = |v: &Vec<f32>, r: usize, c: usize| rf_matrix {
                data: v.as_ptr() as *mut c_void,
                dtype: rf_dtype::RF_DTYPE_F32,
                rows: r as i64,
                cols: c as i64,
                ld: c as i64,
            };
            for l in [lg, lc] {
                assert!(
                    take(rf_lora_set_weights(l, &mat(&av, cap, k), &mat(&bv, n, cap))).is_none()
                );
            }
            let (g, c) = both(gpu, cpu, wg, wc, lg, lc, m, 0);
            close("after set_weights", &g, &c);
            let mut mask = vec![1u8; cap];
            mask[1] = 0;
            for l in [lg, lc] {
                assert!(take(rf_lora_enable_gains(l, 0.5)).is_none());
                assert!(take(rf_lora_set_mask(l, mask.as_ptr(), cap)).is_none());
                assert!(take(rf_lora_set_rank(l, 5)).is_none());
            }
            let (g, c) = both(gpu, cpu, wg, wc, lg, lc, m, 0);
            close("after gains, mask, set_rank", &g, &c);
            // A module added to the adapter loaded on the GPU is uploaded there too (same shape
            // as the layer, so it can stand in its slot).
            let extra = CString::new("extra").unwrap();
            let mut added = [std::ptr::null_mut::<rf_lora>(); 2];
            for (a, out) in [kept, ac].into_iter().zip(added.iter_mut()) {
                let e = take(rf_adapter_add_lora(
                    a,
                    extra.as_ptr(),
                    k as i64,
                    n as i64,
                    4,
                    8.0,
                    0,
                    0,
                    11,
                    out,
                ));
                assert!(e.is_none(), "{e:?}");
            }
            let av = rng.fill_uniform(4 * k, -0.1, 0.1);
            let bv = rng.fill_uniform(n * 4, -0.1, 0.1);
            for l in added {
                assert!(take(rf_lora_set_weights(l, &mat(&av, 4, k), &mat(&bv, n, 4))).is_none());
            }
            let (g, c) = both(gpu, cpu, wg, wc, added[0], added[1], m, 0);
            close("added module", &g, &c);
            // The adapter and the weights outlive the runtime; freeing them afterwards is fine.
            rf_runtime_free(gpu);
            rf_adapter_free(kept);
            rf_adapter_free(ac);
            for w in [wg.0, wg.1, wc.0, wc.1] {
                rf_weights_free(w as *mut rf_weights);
            }
            rf_runtime_free(cpu);
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
