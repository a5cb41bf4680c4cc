//! EigenLoRAx: basis build, projection, serving equal to the dense reconstruction, errors.

use rankfuse::adapter::{peft, Adapter, Lora, Scaling, TensorData};
use rankfuse::algebra::eigen::{self, Basis, EigenAdapter};
use rankfuse::algebra::svd;
use rankfuse::backend::LinearProblem;
use rankfuse::matrix::Matrix;
use rankfuse::runtime::slot;
use rankfuse::{DType, Runtime, Status, Weights};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-tiny")
}

fn load(name: &str) -> Adapter {
    peft::load(&fixtures().join("adapters").join(name)).unwrap()
}

/// N adapters of rank r on one 40 x 48 module whose A rows / B columns live in a shared
/// 6-dimensional subspace per side.
fn shared_subspace_adapters(n: usize, r: usize) -> Vec<Adapter> {
    let (out, inp, k) = (40, 48, 6);
    let qa = svd::gaussian(inp, k, 1).qr().compute_thin_Q();
    let qb = svd::gaussian(out, k, 2).qr().compute_thin_Q();
    (0..n)
        .map(|i| {
            let ca = svd::gaussian(k, r, 10 + i as u64);
            let cb = svd::gaussian(k, r, 20 + i as u64);
            let at = &qa * &ca; // in x r
            let b = &qb * &cb; // out x r
            let av: Vec<f32> = (0..r * inp).map(|t| at[(t % inp, t / inp)]).collect();
            let bv: Vec<f32> = (0..out * r).map(|t| b[(t / r, t % r)]).collect();
            let mut ad = Adapter::new(&format!("task{i}"));
            ad.add(
                Lora::new(
                    "m",
                    TensorData::Owned(Matrix::from_f32(DType::F32, r, inp, &av).unwrap()),
                    TensorData::Owned(Matrix::from_f32(DType::F32, out, r, &bv).unwrap()),
                    2.0 * r as f32,
                    Scaling::Lora,
                    0.0,
                )
                .unwrap(),
            )
            .unwrap();
            ad
        })
        .collect()
}

#[test]
fn shared_subspace_is_recovered_and_projection_is_exact() {
    let ads = shared_subspace_adapters(5, 4);
    // 6 components span the shared subspace; centring removes at most one direction, which
    // the 7th (of N·r = 20) brings back.
    let basis = eigen::build(&ads, 7, 0, 3).unwrap();
    let new_one = &shared_subspace_adapters(6, 4)[5];
    let (ea, rep) = eigen::project(&basis, new_one).unwrap();
    println!("{rep:?}");
    assert!(rep.modules[0].rel_error < 1e-4, "{rep:?}");
    assert!(rep.loadings_bytes < rep.adapter_bytes);
    // Too few components lose part of it.
    let small = eigen::build(&ads, 2, 0, 3).unwrap();
    let (_, rep2) = eigen::project(&small, new_one).unwrap();
    assert!(rep2.modules[0].rel_error > 0.1, "{rep2:?}");
    // The reconstruction reproduces s·B·A (scale folded into α_B; eigen scale is 1).
    let dense = ea.to_adapter(&basis, DType::F32).unwrap();
    let l = dense.module("m").unwrap();
    assert_eq!(l.scale_at(l.rank()), 1.0);
}

#[test]
fn augment_adds_orthonormal_directions() {
    let ads = shared_subspace_adapters(3, 4);
    let b = eigen::build(&ads, 5, 3, 9).unwrap();
    let m = b.module("m").unwrap();
    assert_eq!(m.k(), 8);
    for c in [&m.c_a, &m.c_b] {
        let g = c.transpose() * c;
        for i in 0..8 {
            for j in 0..8 {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!((g[(i, j)] - want).abs() < 1e-5, "{i},{j}: {}", g[(i, j)]);
            }
        }
    }
}

#[test]
fn serving_equals_dense_reconstruction() {
    let rt = Runtime::cpu().unwrap();
    let ads = [load("lora-r8"), load("rslora-pattern"), load("lora-r64")];
    let basis = eigen::build(&ads, 24, 4, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("basis.safetensors");
    basis.save(&bp).unwrap();
    let basis = Basis::load(&bp).unwrap();
    let projected: Vec<EigenAdapter> = ads
        .iter()
        .map(|a| {
            let (e, _) = eigen::project(&basis, a).unwrap();
            let p = dir.path().join(format!("{}.safetensors", a.name));
            e.save(&p).unwrap();
            EigenAdapter::load(&p, &a.name).unwrap()
        })
        .collect();
    let dense: Vec<Adapter> = projected
        .iter()
        .map(|e| e.to_adapter(&basis, DType::F32).unwrap())
        .collect();
    let base = Weights::open(fixtures().join("base.safetensors")).unwrap();
    let mem = eigen::memory(&basis, &ads);
    assert!(mem.basis_bytes + mem.loadings_bytes > 0);
    for module in [
        "layers.0.self_attn.q_proj",
        "layers.0.mlp.down_proj",
        "layers.1.mlp.up_proj",
    ] {
        let w = base.get(&format!("{module}.weight")).unwrap();
        let bias = base.get(&format!("{module}.bias")).ok();
        let m = 7;
        let xv: Vec<f32> = (0..m * w.cols)
            .map(|i| ((i * 31 % 17) as f32 - 8.0) * 0.05)
            .collect();
        let x = Matrix::from_f32(DType::F32, m, w.cols, &xv).unwrap();
        let bm = basis.module(module).unwrap();
        let slots: Vec<Option<&eigen::EigenModule>> =
            projected.iter().map(|p| p.modules.get(module)).collect();
        let lslots: Vec<Option<rankfuse::Slot<'_>>> = dense
            .iter()
            .map(|d| Some(slot(d.module(module).unwrap(), 0, 1.0).unwrap()))
            .collect();
        for row_slot in [None, Some(vec![0, 1, 2, -1, 2, 1, 0])] {
            let mut y = Matrix::zeros(DType::F32, m, w.rows).unwrap();
            eigen::eigen_linear(
                &rt,
                x.view(),
                w,
                bias,
                bm,
                &slots,
                row_slot.as_deref(),
                &mut y.view_mut(),
            )
            .unwrap();
            let p = LinearProblem {
                x: x.view(),
                w,
                bias,
                slots: &lslots,
                row_slot: row_slot.as_deref(),
            };
            let mut want = Matrix::zeros(DType::F32, m, w.rows).unwrap();
            rt.linear(&p, &mut want.view_mut()).unwrap();
            let (y, want) = (y.to_f32_vec(), want.to_f32_vec());
            for (a, b) in y.iter().zip(&want) {
                assert!(
                    (a - b).abs() <= 1e-4 + 1e-5 * b.abs(),
                    "{module}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn errors() {
    let ads = [load("lora-r8"), load("rslora-pattern")];
    // layers.0.self_attn.q_proj has r = 8 and 4 in these two: N·r = 12.
    let e = eigen::build(&ads, 13, 0, 1).unwrap_err();
    assert_eq!(e.status, Status::InvalidArgument);
    assert!(
        e.message.contains("layers.0.self_attn.q_proj") && e.message.contains("N·r = 12"),
        "{}",
        e.message
    );
    let mut partial = Adapter::new("partial");
    let l = ads[0].module("layers.0.mlp.up_proj").unwrap();
    partial
        .add(
            Lora::new(
                &l.name,
                TensorData::Owned(
                    Matrix::from_f32(DType::F32, 8, 256, &l.a_view(8).to_f32_vec()).unwrap(),
                ),
                TensorData::Owned(
                    Matrix::from_f32(DType::F32, 172, 8, &l.b_view(8).to_f32_vec()).unwrap(),
                ),
                16.0,
                Scaling::Lora,
                0.0,
            )
            .unwrap(),
        )
        .unwrap();
    let e = eigen::build(&[partial, load("lora-r8")], 4, 0, 1).unwrap();
    assert_eq!(e.modules.len(), 1);
    let e = eigen::build(&[load("lora-r8"), Adapter::new("empty")], 4, 0, 1).unwrap_err();
    assert_eq!(e.status, Status::NotFound);
    assert!(e.message.contains("'empty'"), "{}", e.message);
}

#[test]
fn cli_build_and_project() {
    let exe = env!("CARGO_BIN_EXE_rankfuse");
    let dir = tempfile::tempdir().unwrap();
    let a = fixtures().join("adapters");
    let basis = dir.path().join("basis.safetensors");
    let out = std::process::Command::new(exe)
        .args(["eigen", "build"])
        .arg(a.join("lora-r8"))
        .arg(a.join("lora-r64"))
        .args(["--components", "12", "--augment", "2", "--out"])
        .arg(&basis)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("basis"));
    let loads = dir.path().join("loads.safetensors");
    let peft_dir = dir.path().join("recon");
    let out = std::process::Command::new(exe)
        .args(["eigen", "project", "--basis"])
        .arg(&basis)
        .arg("--adapter")
        .arg(a.join("lora-r8"))
        .arg("--out")
        .arg(&loads)
        .arg("--export-peft")
        .arg(&peft_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let w = Weights::open(&loads).unwrap();
    let e = w.entry("layers.0.mlp.up_proj.alpha_A").unwrap();
    assert_eq!(e.shape, vec![14, 8]);
    assert_eq!(peft::load(&peft_dir).unwrap().len(), 14);
    // K larger than N·r: a clear error naming the module, non-zero exit.
    let out = std::process::Command::new(exe)
        .args(["eigen", "build"])
        .arg(a.join("lora-r8"))
        .args(["--components", "9", "--out"])
        .arg(dir.path().join("x.safetensors"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let msg = String::from_utf8_lossy(&out.stderr);
    assert!(msg.contains("N·r = 8") && msg.contains("module '"), "{msg}");
}

#[test]
fn c_abi_eigen_serving_equals_reconstruction() {
    use rankfuse::ffi::adapter::{rf_adapter_free, rf_adapter_module};
    use rankfuse::ffi::algebra::*;
    use rankfuse::ffi::error::{rf_error_free, rf_error_message};
    use rankfuse::ffi::handles::{rf_adapter, rf_lora, rf_runtime};
    use rankfuse::ffi::linear::rf_linear;
    use rankfuse::ffi::runtime::{rf_runtime_create, rf_runtime_free};
    use rankfuse::ffi::types::{rf_dtype, rf_lora_slot, rf_matrix};
    use std::ffi::{CStr, CString};
    let ads = [load("lora-r8"), load("lora-r64")];
    let basis = eigen::build(&ads, 12, 0, 5).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bp = dir.path().join("basis.safetensors");
    basis.save(&bp).unwrap();
    let mut lps = Vec::new();
    for a in &ads {
        let p = dir.path().join(format!("{}.safetensors", a.name));
        eigen::project(&basis, a).unwrap().0.save(&p).unwrap();
        lps.push(CString::new(p.to_str().unwrap()).unwrap());
    }
    let base = Weights::open(fixtures().join("base.safetensors")).unwrap();
    let module = "layers.0.mlp.gate_proj";
    let w = base.get(&format!("{module}.weight")).unwrap();
    let (m, k, n) = (5usize, w.cols, w.rows);
    let mut xv: Vec<f32> = (0..m * k)
        .map(|i| ((i * 13 % 11) as f32 - 5.0) * 0.1)
        .collect();
    let mat = |p: *mut f32, r: usize, c: usize| rf_matrix {
        data: p as *mut _,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: r as i64,
        cols: c as i64,
        ld: c as i64,
    };
    let mut wv = w.to_f32_vec();
    let (xm, wm) = (mat(xv.as_mut_ptr(), m, k), mat(wv.as_mut_ptr(), n, k));
    let check = |e: *mut rankfuse::ffi::error::rf_error| unsafe {
        if !e.is_null() {
            let msg = CStr::from_ptr(rf_error_message(e))
                .to_string_lossy()
                .into_owned();
            rf_error_free(e);
            panic!("{msg}");
        }
    };
    unsafe {
        let mut rt: *mut rf_runtime = std::ptr::null_mut();
        check(rf_runtime_create(std::ptr::null(), &mut rt));
        let bc = CString::new(bp.to_str().unwrap()).unwrap();
        let mut b: *mut rf_eigen_basis = std::ptr::null_mut();
        check(rf_eigen_basis_load(rt, bc.as_ptr(), &mut b));
        let mut eas: Vec<*mut rf_eigen_adapter> = Vec::new();
        let mut dense: Vec<*mut rf_adapter> = Vec::new();
        for lp in &lps {
            let mut ea: *mut rf_eigen_adapter = std::ptr::null_mut();
            check(rf_eigen_adapter_load(b, lp.as_ptr(), &mut ea));
            let mut d: *mut rf_adapter = std::ptr::null_mut();
            check(rf_eigen_adapter_to_adapter(b, ea, &mut d));
            eas.push(ea);
            dense.push(d);
        }
        let mc = CString::new(module).unwrap();
        let row_slot = [1i32, 0, -1, 1, 0];
        let mut y1 = vec![0f32; m * n];
        let mut y1m = mat(y1.as_mut_ptr(), m, n);
        let ptrs: Vec<*const rf_eigen_adapter> = eas.iter().map(|&p| p as *const _).collect();
        check(rf_eigen_linear(
            rt,
            b,
            mc.as_ptr(),
            &xm,
            &wm,
            std::ptr::null(),
            ptrs.as_ptr(),
            2,
            row_slot.as_ptr(),
            &mut y1m,
        ));
        let mut slots = Vec::new();
        for &d in &dense {
            let mut l: *mut rf_lora = std::ptr::null_mut();
            check(rf_adapter_module(d, mc.as_ptr(), &mut l));
            slots.push(rf_lora_slot {
                lora: l,
                rank: 0,
                scale_mult: 1.0,
            });
        }
        let mut y2 = vec![0f32; m * n];
        let mut y2m = mat(y2.as_mut_ptr(), m, n);
        check(rf_linear(
            rt,
            &xm,
            &wm,
            std::ptr::null(),
            slots.as_ptr(),
            2,
            row_slot.as_ptr(),
            &mut y2m,
        ));
        for (a, bb) in y1.iter().zip(&y2) {
            assert!((a - bb).abs() <= 1e-4 + 1e-5 * bb.abs(), "{a} vs {bb}");
        }
        // A module the basis lacks is NOT_FOUND naming it.
        let bad = CString::new("layers.9.nope").unwrap();
        let e = rf_eigen_linear(
            rt,
            b,
            bad.as_ptr(),
            &xm,
            &wm,
            std::ptr::null(),
            ptrs.as_ptr(),
            2,
            row_slot.as_ptr(),
            &mut y1m,
        );
        assert!(CStr::from_ptr(rf_error_message(e))
            .to_string_lossy()
            .contains("layers.9.nope"));
        rf_error_free(e);
        for d in dense {
            rf_adapter_free(d);
        }
        for ea in eas {
            rf_eigen_adapter_free(ea);
        }
        rf_eigen_basis_free(b);
        rf_runtime_free(rt);
    }
}
