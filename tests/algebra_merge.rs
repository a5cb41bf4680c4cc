//! Merge / unmerge: W + s·B·A then - s·B·A returns W within dtype rounding; merged vs fused
//! forwards agree on the real PEFT fixtures; the C ABI does the same on a caller's buffer; the
//! CLI writes a merged file with a parity report.

use rankfuse::adapter::peft;
use rankfuse::algebra::merge;
use rankfuse::ffi::handles::{rf_adapter, rf_lora, rf_runtime};
use rankfuse::ffi::types::{rf_dtype, rf_matrix};
use rankfuse::matrix::Matrix;
use rankfuse::runtime::slot;
use rankfuse::{DType, Runtime, Status, Weights};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft-tiny")
}

fn base_file(dt: DType) -> PathBuf {
    fixtures().join(match dt {
        DType::F32 => "base.safetensors",
        DType::F16 => "base-f16.safetensors",
        DType::BF16 => "base-bf16.safetensors",
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            unreachable!("merge refuses quantized bases")
        }
    })
}

/// One ulp-ish bound of a dtype at magnitude |v| (two roundings: merge, unmerge).
fn tol(dt: DType, v: f32) -> f32 {
    let eps = match dt {
        DType::F32 => 1.2e-7,
        DType::F16 => 9.8e-4,
        DType::BF16 => 7.9e-3,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            unreachable!("merge refuses quantized bases")
        }
    };
    1e-6 + 2.0 * eps * v.abs()
}

#[test]
fn merge_then_unmerge_returns_w_every_dtype() {
    for adapter in ["lora-r8", "rslora-pattern", "lora-r64"] {
        let ad = peft::load(&fixtures().join("adapters").join(adapter)).unwrap();
        for dt in rankfuse::DType::ALL {
            let base = Weights::open(base_file(dt)).unwrap();
            for l in ad.modules() {
                let w0 = base.get(&format!("{}.weight", l.name)).unwrap();
                let orig = w0.to_f32_vec();
                let mut w = Matrix::from_f32(dt, w0.rows, w0.cols, &orig).unwrap();
                merge::merge_into(l, 0, 1.0, &mut w.view_mut(), false).unwrap();
                let merged = w.to_f32_vec();
                let moved = merged.iter().zip(&orig).filter(|(a, b)| a != b).count();
                assert!(
                    moved > orig.len() / 2,
                    "{adapter} {dt:?} {}: merge changed {moved}",
                    l.name
                );
                merge::merge_into(l, 0, 1.0, &mut w.view_mut(), true).unwrap();
                let back = w.to_f32_vec();
                // Each step rounds once to dt at the magnitude of the merged value.
                for (i, (b, o)) in back.iter().zip(&orig).enumerate() {
                    let t = tol(dt, merged[i].abs().max(o.abs()));
                    assert!(
                        (b - o).abs() <= t,
                        "{adapter} {dt:?} {} [{i}]: {b} vs {o}",
                        l.name
                    );
                }
            }
        }
    }
}

#[test]
fn merged_forward_matches_fused_on_fixtures() {
    let rt = Runtime::cpu().unwrap();
    for adapter in ["lora-r8", "rslora-pattern", "lora-r64"] {
        let ad = peft::load(&fixtures().join("adapters").join(adapter)).unwrap();
        for dt in [DType::F32, DType::BF16] {
            let base = Weights::open(base_file(dt)).unwrap();
            for l in ad.modules() {
                let s = slot(l, 0, 1.0).unwrap();
                let w = base.get(&format!("{}.weight", l.name)).unwrap();
                let m = merge::merged_tensor(&s, w, 1.0, dt).unwrap();
                let m32 = merge::merged_tensor(&s, w, 1.0, DType::F32).unwrap();
                let p =
                    merge::parity(&rt, &s, &l.name, (w, m.view()), (w, m32.view()), 4, 1).unwrap();
                // f32 merge: only kernel rounding remains; bf16: rounding W' to bf16 dominates.
                let bound = match dt {
                    DType::F32 => 1e-5,
                    _ => 1.6e-2,
                };
                assert!(p.rel_f32 < 1e-5, "{adapter} {} {dt:?}: {p:?}", l.name);
                assert!(p.rel < bound, "{adapter} {} {dt:?}: {p:?}", l.name);
                if dt == DType::BF16 {
                    assert!(p.rel_rounding > 0.0, "{p:?}");
                }
            }
        }
    }
    // A truncated rank merges only the first components.
    let ad = peft::load(&fixtures().join("adapters/lora-r64")).unwrap();
    let l = ad.module("layers.0.self_attn.q_proj").unwrap();
    let base = Weights::open(base_file(DType::F32)).unwrap();
    let w = base.get("layers.0.self_attn.q_proj.weight").unwrap();
    let s16 = slot(l, 16, 1.0).unwrap();
    let m = merge::merged_tensor(&s16, w, 1.0, DType::F32).unwrap();
    let p = merge::parity(&rt, &s16, "q", (w, m.view()), (w, m.view()), 3, 2).unwrap();
    assert!(p.rel < 1e-5, "{p:?}");
}

#[test]
fn shape_mismatch_names_the_module() {
    let ad = peft::load(&fixtures().join("adapters/lora-r8")).unwrap();
    let l = ad.module("layers.0.self_attn.q_proj").unwrap();
    let mut w = Matrix::zeros(DType::F32, 65, 256).unwrap();
    let e = merge::merge_into(l, 0, 1.0, &mut w.view_mut(), false).unwrap_err();
    assert_eq!(e.status, Status::Shape);
    assert!(
        e.message.contains("layers.0.self_attn.q_proj"),
        "{}",
        e.message
    );
}

#[test]
fn c_abi_merge_unmerge() {
    use rankfuse::ffi::adapter::{rf_adapter_free, rf_adapter_load_peft, rf_adapter_module};
    use rankfuse::ffi::algebra::{rf_lora_merge, rf_lora_unmerge};
    use rankfuse::ffi::error::{rf_error_code, rf_error_free, rf_error_message};
    use rankfuse::ffi::runtime::{rf_runtime_create, rf_runtime_free};
    use std::ffi::CString;
    unsafe {
        let mut rt: *mut rf_runtime = std::ptr::null_mut();
        assert!(rf_runtime_create(std::ptr::null(), &mut rt).is_null());
        let dir = CString::new(fixtures().join("adapters/lora-r8").to_str().unwrap()).unwrap();
        let mut ad: *mut rf_adapter = std::ptr::null_mut();
        assert!(rf_adapter_load_peft(rt, dir.as_ptr(), &mut ad).is_null());
        let name = CString::new("layers.0.mlp.up_proj").unwrap();
        let mut l: *mut rf_lora = std::ptr::null_mut();
        assert!(rf_adapter_module(ad, name.as_ptr(), &mut l).is_null());
        let base = Weights::open(base_file(DType::F32)).unwrap();
        let w0 = base
            .get("layers.0.mlp.up_proj.weight")
            .unwrap()
            .to_f32_vec();
        // ld > cols: the padding must be left alone.
        let (rows, cols, ld) = (172usize, 256usize, 260usize);
        let mut buf = vec![-7.0f32; rows * ld];
        for i in 0..rows {
            buf[i * ld..i * ld + cols].copy_from_slice(&w0[i * cols..(i + 1) * cols]);
        }
        let mut m = rf_matrix {
            data: buf.as_mut_ptr() as *mut _,
            dtype: rf_dtype::RF_DTYPE_F32,
            rows: rows as i64,
            cols: cols as i64,
            ld: ld as i64,
        };
        assert!(rf_lora_merge(rt, l, 0, 1.0, &mut m).is_null());
        // Compare with the Rust merge.
        let ra = peft::load(&fixtures().join("adapters/lora-r8")).unwrap();
        let mut want = Matrix::from_f32(DType::F32, rows, cols, &w0).unwrap();
        merge::merge_into(
            ra.module("layers.0.mlp.up_proj").unwrap(),
            0,
            1.0,
            &mut want.view_mut(),
            false,
        )
        .unwrap();
        let want = want.to_f32_vec();
        for i in 0..rows {
            assert_eq!(&buf[i * ld..i * ld + cols], &want[i * cols..(i + 1) * cols]);
            assert!(buf[i * ld + cols..(i + 1) * ld].iter().all(|&v| v == -7.0));
        }
        assert!(rf_lora_unmerge(rt, l, 0, 1.0, &mut m).is_null());
        for i in 0..rows {
            for j in 0..cols {
                let (b, o) = (buf[i * ld + j], w0[i * cols + j]);
                assert!((b - o).abs() <= 1e-6 + 1e-6 * o.abs(), "{i},{j}");
            }
        }
        // Wrong shape: SHAPE naming the module.
        m.rows = 10;
        let e = rf_lora_merge(rt, l, 0, 1.0, &mut m);
        assert_eq!(rf_error_code(e) as i32, Status::Shape as i32);
        let msg = std::ffi::CStr::from_ptr(rf_error_message(e))
            .to_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("layers.0.mlp.up_proj"), "{msg}");
        rf_error_free(e);
        // NULL buffer argument.
        let e = rf_lora_merge(rt, l, 0, 1.0, std::ptr::null_mut());
        assert_eq!(rf_error_code(e) as i32, Status::InvalidArgument as i32);
        rf_error_free(e);
        rf_adapter_free(ad);
        rf_runtime_free(rt);
    }
}

#[test]
fn cli_merge_writes_file_and_parity() {
    let exe = env!("CARGO_BIN_EXE_rankfuse");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged.safetensors");
    let rep = dir.path().join("parity.json");
    let st = std::process::Command::new(exe)
        .args(["merge", "--base"])
        .arg(base_file(DType::BF16))
        .arg("--adapter")
        .arg(fixtures().join("adapters/rslora-pattern"))
        .arg("--out")
        .arg(&out)
        .arg("--report")
        .arg(&rep)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let table = String::from_utf8_lossy(&st.stdout);
    assert!(table.contains("part due to dtype rounding"), "{table}");
    let merged = Weights::open(&out).unwrap();
    let base = Weights::open(base_file(DType::BF16)).unwrap();
    assert_eq!(merged.len(), base.len());
    // Untouched tensors are byte-identical; adapted ones differ and keep the dtype.
    for e in base.entries() {
        let same = merged.bytes(&e.name).unwrap() == base.bytes(&e.name).unwrap();
        let adapted = e.name.ends_with("proj.weight");
        assert_eq!(same, !adapted, "{}", e.name);
        assert_eq!(merged.entry(&e.name).unwrap().dtype, e.dtype);
    }
    let parity: serde_json::Value = serde_json::from_slice(&std::fs::read(&rep).unwrap()).unwrap();
    assert_eq!(parity.as_array().unwrap().len(), 14);
    // Unmerge the merged file: back to the base within bf16 rounding.
    let back = dir.path().join("back.safetensors");
    let st = std::process::Command::new(exe)
        .args(["merge", "--unmerge", "--base"])
        .arg(&out)
        .arg("--adapter")
        .arg(fixtures().join("adapters/rslora-pattern"))
        .arg("--out")
        .arg(&back)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let back = Weights::open(&back).unwrap();
    let w0 = base
        .get("layers.1.mlp.up_proj.weight")
        .unwrap()
        .to_f32_vec();
    let wm = merged
        .get("layers.1.mlp.up_proj.weight")
        .unwrap()
        .to_f32_vec();
    let w1 = back
        .get("layers.1.mlp.up_proj.weight")
        .unwrap()
        .to_f32_vec();
    for i in 0..w0.len() {
        assert!(
            (w1[i] - w0[i]).abs() <= tol(DType::BF16, wm[i].abs().max(w0[i].abs())),
            "{i}"
        );
    }
}
