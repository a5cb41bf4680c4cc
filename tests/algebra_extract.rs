//! PHLoRA extraction: Eckart–Young numbers, accuracy against faer's exact SVD on flat, decaying
//! and low-rank spectra, PEFT round trip, and errors that name the tensor.

use faer::Mat;
use rankfuse::adapter::peft;
use rankfuse::algebra::extract::{self, ExtractOptions, RankRule};
use rankfuse::algebra::svd;
use rankfuse::backend::LinearProblem;
use rankfuse::matrix::Matrix;
use rankfuse::runtime::slot;
use rankfuse::weights::{write_safetensors, TensorOut};
use rankfuse::{DType, Runtime, Status, Weights};
use std::borrow::Cow;
use std::path::Path;

fn tensor(name: &str, dtype: DType, shape: &[usize], vals: &[f32]) -> TensorOut<'static> {
    let rows = if shape.len() >= 2 { shape[0] } else { 1 };
    let cols = vals.len() / rows.max(1);
    let m = Matrix::from_f32(dtype, rows, cols, vals).unwrap();
    TensorOut {
        name: name.to_string(),
        dtype,
        shape: shape.to_vec(),
        data: Cow::Owned(m.bytes().to_vec()),
    }
}

fn opts(rule: RankRule) -> ExtractOptions {
    ExtractOptions {
        rule,
        max_rank: 64,
        threads: 2,
        ..Default::default()
    }
}

fn one(d: &[f32], m: usize, n: usize, rule: RankRule) -> extract::LayerReport {
    let r = extract::extract_delta("t", "t.weight", d, m, n, &opts(rule), faer::Par::Seq).unwrap();
    r.report.unwrap()
}

#[test]
fn eckart_young_diag_3_2_1() {
    let d = [3.0f32, 0., 0., 0., 2., 0., 0., 0., 1.];
    let e1 = one(&d, 3, 3, RankRule::Fixed(1));
    let e2 = one(&d, 3, 3, RankRule::Fixed(2));
    println!("E(1) = {:.6}, E(2) = {:.6}", e1.energy, e2.energy);
    assert!((e1.energy - 9.0 / 14.0).abs() < 1e-6 && (e1.energy - 0.642857).abs() < 1e-6);
    assert!((e2.energy - 13.0 / 14.0).abs() < 1e-6 && (e2.energy - 0.928571).abs() < 1e-6);
    // Rank-2 error: ||ΔW - ΔW_2||_F = σ_3 = 1 (relative 1/√14).
    let abs_err = e2.rel_error * e2.delta_norm;
    println!("rank-2 error = {abs_err:.6}");
    assert!((abs_err - 1.0).abs() < 1e-5);
    // And the factors really reproduce it.
    let r = extract::extract_delta(
        "t",
        "t.weight",
        &d,
        3,
        3,
        &opts(RankRule::Fixed(2)),
        faer::Par::Seq,
    )
    .unwrap()
    .lora
    .unwrap();
    let (a, b) = (r.a_view(2).to_f32_vec(), r.b_view(2).to_f32_vec());
    let mut err = 0f64;
    for i in 0..3 {
        for j in 0..3 {
            let ba: f32 = (0..2).map(|c| b[i * 2 + c] * a[c * 3 + j]).sum();
            err += ((d[i * 3 + j] - ba) as f64).powi(2);
        }
    }
    assert!((err.sqrt() - 1.0).abs() < 1e-5, "{}", err.sqrt());
    assert_eq!(r.scale_at(2), 1.0);
    // The energy rule picks the smallest rank reaching the threshold.
    assert_eq!(one(&d, 3, 3, RankRule::Energy(0.6)).rank, 1);
    assert_eq!(one(&d, 3, 3, RankRule::Energy(0.9)).rank, 2);
    assert_eq!(one(&d, 3, 3, RankRule::Energy(0.928571)).rank, 2);
    assert_eq!(one(&d, 3, 3, RankRule::Energy(0.95)).rank, 3);
}

/// U diag(σ) Vᵀ with seeded orthonormal U (m x k), V (n x k).
fn with_spectrum(m: usize, n: usize, sigma: &[f32], seed: u64) -> Vec<f32> {
    let k = sigma.len();
    let u = svd::gaussian(m, k, seed).qr().compute_thin_Q();
    let v = svd::gaussian(n, k, seed + 1).qr().compute_thin_Q();
    let mut us = u.clone();
    for j in 0..k {
        for i in 0..m {
            us[(i, j)] *= sigma[j];
        }
    }
    let a: Mat<f32> = &us * v.transpose();
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = a[(i, j)];
        }
    }
    out
}

#[test]
fn randomized_within_1e3_of_exact_svd() {
    let (m, n) = (400, 300);
    let spectra: Vec<(&str, Vec<f32>)> = vec![
        ("flat", vec![1.0; 300]),
        ("decaying", (0..300).map(|i| 0.97f32.powi(i)).collect()),
        (
            "power-law",
            (0..300).map(|i| 1.0 / (1.0 + i as f32)).collect(),
        ),
        (
            "low-rank",
            (0..300)
                .map(|i| if i < 12 { 10.0 - i as f32 * 0.5 } else { 1e-3 })
                .collect(),
        ),
    ];
    let mut cases: Vec<(String, Vec<f32>)> = spectra
        .iter()
        .enumerate()
        .map(|(i, (name, s))| (name.to_string(), with_spectrum(m, n, s, 100 + i as u64)))
        .collect();
    // A Gaussian matrix: the realistic "flat" (Marchenko–Pastur) spectrum.
    let g = svd::gaussian(m, n, 7);
    let gv: Vec<f32> = (0..m * n).map(|t| g[(t / n, t % n)]).collect();
    cases.push(("gaussian".into(), gv));
    for (name, d) in &cases {
        let a = faer::MatRef::from_row_major_slice(d, m, n);
        let exact = svd::exact_thin_svd(a).unwrap();
        let total = svd::frobenius_sq(a);
        for r in [4usize, 16, 40] {
            let rep = one(d, m, n, RankRule::Fixed(r));
            assert_eq!(rep.method, "randomized", "{name}");
            let e_exact = exact.kept_energy(r) / total;
            // The tail, summed directly (1 - E loses digits when E is close to 1).
            let tail: f64 = exact.s[r..].iter().map(|&x| (x as f64).powi(2)).sum();
            let err_exact = (tail / total).sqrt();
            println!(
                "{name:>10} r={r:>2}: E rand {:.6} exact {:.6} | err rand {:.6} exact {:.6}",
                rep.energy, e_exact, rep.rel_error, err_exact
            );
            assert!((rep.energy - e_exact).abs() <= 1e-3, "{name} r={r}");
            assert!((rep.rel_error - err_exact).abs() <= 1e-3, "{name} r={r}");
        }
        // Energy mode: the rank chosen is the exact one, or one more at a borderline.
        let rep = one(d, m, n, RankRule::Energy(0.5));
        let exact_r = svd::rank_for_energy(&exact.s, total, 0.5).unwrap().min(64);
        assert!(
            rep.rank >= exact_r && rep.rank <= exact_r + 1,
            "{name}: {} vs {exact_r}",
            rep.rank
        );
    }
}

fn write(path: &Path, ts: &[TensorOut<'_>]) {
    write_safetensors(path, ts, None).unwrap();
}

/// Base + tuned files where ΔW of each layer has a known rank.
fn model_pair(dir: &Path, base_dtype: DType) -> (std::path::PathBuf, std::path::PathBuf) {
    let shapes = [
        ("layers.0.q_proj", 48, 64, 3usize),
        ("layers.0.up_proj", 96, 64, 6),
        ("layers.1.q_proj", 48, 64, 2),
    ];
    let mut base = Vec::new();
    let mut tuned = Vec::new();
    for (i, (name, o, n, r)) in shapes.iter().enumerate() {
        let w = svd::gaussian(*o, *n, 50 + i as u64);
        let wv: Vec<f32> = (0..o * n).map(|t| w[(t / n, t % n)] * 0.05).collect();
        let sig: Vec<f32> = (0..*r).map(|k| 0.5 / (1.0 + k as f32)).collect();
        let d = with_spectrum(*o, *n, &sig, 60 + i as u64);
        // Round the base first so that tuned - base is ΔW up to one rounding of tuned.
        let wb = Matrix::from_f32(base_dtype, *o, *n, &wv)
            .unwrap()
            .to_f32_vec();
        let tv: Vec<f32> = wb.iter().zip(&d).map(|(a, b)| a + b).collect();
        base.push(tensor(
            &format!("{name}.weight"),
            base_dtype,
            &[*o, *n],
            &wb,
        ));
        tuned.push(tensor(
            &format!("{name}.weight"),
            DType::F32,
            &[*o, *n],
            &tv,
        ));
    }
    // A norm (1-D): skipped, and an unchanged matrix: skipped.
    let ln = vec![1.0f32; 64];
    base.push(tensor("layers.0.norm.weight", DType::F32, &[64], &ln));
    tuned.push(tensor("layers.0.norm.weight", DType::F32, &[64], &ln));
    let e: Vec<f32> = (0..32 * 16).map(|i| i as f32 * 0.01).collect();
    base.push(tensor("embed.weight", DType::F32, &[32, 16], &e));
    tuned.push(tensor("embed.weight", DType::F32, &[32, 16], &e));
    let (bp, tp) = (dir.join("base.safetensors"), dir.join("tuned.safetensors"));
    write(&bp, &base);
    write(&tp, &tuned);
    (bp, tp)
}

#[test]
fn peft_round_trip_reproduces_delta_x() {
    let dir = tempfile::tempdir().unwrap();
    let rt = Runtime::cpu().unwrap();
    for (rslora, base_dtype) in [(false, DType::F32), (true, DType::BF16)] {
        let (bp, tp) = model_pair(dir.path(), base_dtype);
        let (base, tuned) = (Weights::open(&bp).unwrap(), Weights::open(&tp).unwrap());
        let o = ExtractOptions {
            rule: RankRule::Energy(0.9999),
            max_rank: 16,
            rslora,
            ..Default::default()
        };
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let ex = extract::extract(&base, &tuned, &o, &|done, total, _| {
            calls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            assert!(done <= total && total == 4);
        })
        .unwrap();
        assert_eq!(calls.into_inner(), 4);
        let out = dir.path().join(format!("out-{rslora}"));
        extract::write(&ex, &out, true).unwrap();
        assert!(out.join("extract_report.md").exists() && out.join("energy.svg").exists());
        let rep: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("extract_report.json")).unwrap())
                .unwrap();
        assert_eq!(rep["layers"].as_array().unwrap().len(), 3);
        assert_eq!(rep["skipped"].as_array().unwrap().len(), 2);
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["use_rslora"], serde_json::json!(rslora));
        assert!(
            !cfg["rank_pattern"].as_object().unwrap().is_empty(),
            "{cfg}"
        );
        let ad = peft::load(&out).unwrap();
        assert_eq!(ad.len(), 3);
        for (name, r) in [
            ("layers.0.q_proj", 3),
            ("layers.0.up_proj", 6),
            ("layers.1.q_proj", 2),
        ] {
            let l = ad.module(name).unwrap();
            assert_eq!(l.rank(), r, "{name}");
            assert!(
                (l.scale_at(r) - 1.0).abs() < 1e-6,
                "{name}: scale {}",
                l.scale_at(r)
            );
            // x·W_baseᵀ + ΔW-path == x·W_tunedᵀ.
            let wb = base.get(&format!("{name}.weight")).unwrap();
            let wt = tuned.get(&format!("{name}.weight")).unwrap();
            let xv: Vec<f32> = (0..5 * wb.cols)
                .map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.1)
                .collect();
            let x = Matrix::from_f32(DType::F32, 5, wb.cols, &xv).unwrap();
            let run = |w, s: Option<rankfuse::Slot<'_>>| {
                let slots = [s];
                let p = LinearProblem {
                    x: x.view(),
                    w,
                    bias: None,
                    slots: if s.is_some() { &slots } else { &[] },
                    row_slot: None,
                };
                let mut y = Matrix::zeros(DType::F32, 5, wb.rows).unwrap();
                rt.linear(&p, &mut y.view_mut()).unwrap();
                y.to_f32_vec()
            };
            let fused = run(wb, Some(slot(l, 0, 1.0).unwrap()));
            let want = run(wt, None);
            let num: f32 = fused.iter().zip(&want).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f32 = want.iter().map(|b| b * b).sum();
            let rel = (num / den).sqrt();
            assert!(rel < 1e-4, "{name}: rel {rel}");
        }
    }
}

#[test]
fn bad_inputs_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);
    let z = |n: usize| vec![0.5f32; n];
    write(
        &p("b.safetensors"),
        &[tensor("l.weight", DType::F32, &[4, 6], &z(24))],
    );
    write(
        &p("t_shape.safetensors"),
        &[tensor("l.weight", DType::F32, &[6, 4], &z(24))],
    );
    write(
        &p("t_missing.safetensors"),
        &[tensor("other.weight", DType::F32, &[4, 6], &z(24))],
    );
    write(
        &p("b3.safetensors"),
        &[tensor("conv.weight", DType::F32, &[2, 3, 4], &z(24))],
    );
    let o = ExtractOptions::default();
    let run = |b: &str, t: &str| {
        let (b, t) = (Weights::open(p(b)).unwrap(), Weights::open(p(t)).unwrap());
        extract::extract(&b, &t, &o, &|_, _, _| {}).err().unwrap()
    };
    let e = run("b.safetensors", "t_shape.safetensors");
    assert_eq!(e.status, Status::Shape);
    assert!(
        e.message.contains("'l.weight'") && e.message.contains("[4, 6]"),
        "{}",
        e.message
    );
    let e = run("b.safetensors", "t_missing.safetensors");
    assert_eq!(e.status, Status::NotFound);
    assert!(
        e.message.contains("'l.weight'") && e.message.contains("missing"),
        "{}",
        e.message
    );
    let e = run("b3.safetensors", "b3.safetensors");
    assert_eq!(e.status, Status::Unsupported);
    assert!(
        e.message.contains("'conv.weight'") && e.message.contains("2-D"),
        "{}",
        e.message
    );
    // Identical files: nothing to extract.
    let e = run("b.safetensors", "b.safetensors");
    assert!(e.message.contains("identical"), "{}", e.message);
    // Options are checked.
    let bad = ExtractOptions {
        rule: RankRule::Energy(1.5),
        ..Default::default()
    };
    assert_eq!(bad.check().unwrap_err().status, Status::InvalidArgument);
    let bad = ExtractOptions {
        rule: RankRule::Fixed(200),
        max_rank: 128,
        ..Default::default()
    };
    assert!(bad.check().unwrap_err().message.contains("max_rank"));
    // A glob selecting nothing.
    let (b, t) = (
        Weights::open(p("b.safetensors")).unwrap(),
        Weights::open(p("t_shape.safetensors")).unwrap(),
    );
    let o = ExtractOptions {
        modules: vec!["*.v_proj".into()],
        ..Default::default()
    };
    assert_eq!(
        extract::extract(&b, &t, &o, &|_, _, _| {})
            .err()
            .unwrap()
            .status,
        Status::NotFound
    );
}

#[test]
fn c_abi_extract_with_progress() {
    use rankfuse::ffi::algebra::{rf_extract_options, rf_extract_options_default, rf_extract_peft};
    use rankfuse::ffi::error::{rf_error_code, rf_error_free, rf_error_message};
    use rankfuse::ffi::handles::rf_runtime;
    use rankfuse::ffi::runtime::{rf_runtime_create, rf_runtime_free};
    use std::ffi::{c_char, c_void, CStr, CString};
    unsafe extern "C" fn cb(user: *mut c_void, done: usize, total: usize, what: *const c_char) {
        let seen = &mut *(user as *mut Vec<(usize, usize, String)>);
        seen.push((
            done,
            total,
            CStr::from_ptr(what).to_string_lossy().into_owned(),
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let (bp, tp) = model_pair(dir.path(), DType::F16);
    let c = |p: &Path| CString::new(p.to_str().unwrap()).unwrap();
    let (bc, tc, oc) = (c(&bp), c(&tp), c(&dir.path().join("ffi-out")));
    unsafe {
        let mut rt: *mut rf_runtime = std::ptr::null_mut();
        assert!(rf_runtime_create(std::ptr::null(), &mut rt).is_null());
        let mut o: rf_extract_options = std::mem::zeroed();
        assert!(rf_extract_options_default(&mut o).is_null());
        o.rank = 4;
        o.max_rank = 8;
        let glob = CString::new("*.q_proj").unwrap();
        o.modules = glob.as_ptr();
        o.dtype = rankfuse::ffi::types::rf_dtype::RF_DTYPE_BF16;
        let mut seen: Vec<(usize, usize, String)> = Vec::new();
        let e = rf_extract_peft(
            rt,
            bc.as_ptr(),
            tc.as_ptr(),
            &o,
            Some(cb),
            &mut seen as *mut _ as *mut c_void,
            oc.as_ptr(),
        );
        assert!(
            e.is_null(),
            "{}",
            CStr::from_ptr(rf_error_message(e)).to_string_lossy()
        );
        assert_eq!(seen.len(), 2);
        assert!(seen
            .iter()
            .all(|(_, t, n)| *t == 2 && n.ends_with("q_proj.weight")));
        let ad = peft::load(&dir.path().join("ffi-out")).unwrap();
        assert_eq!(ad.len(), 2);
        for l in ad.modules() {
            assert_eq!((l.rank(), l.dtype()), (4, DType::BF16));
        }
        // Bad struct_size and NULL paths are errors, not crashes.
        o.struct_size = 4;
        let e = rf_extract_peft(
            rt,
            bc.as_ptr(),
            tc.as_ptr(),
            &o,
            None,
            std::ptr::null_mut(),
            oc.as_ptr(),
        );
        assert_eq!(rf_error_code(e) as i32, Status::InvalidArgument as i32);
        rf_error_free(e);
        let e = rf_extract_peft(
            rt,
            std::ptr::null(),
            tc.as_ptr(),
            std::ptr::null(),
            None,
            std::ptr::null_mut(),
            oc.as_ptr(),
        );
        assert!(CStr::from_ptr(rf_error_message(e))
            .to_string_lossy()
            .contains("base_path"));
        rf_error_free(e);
        rf_runtime_free(rt);
    }
}

#[test]
fn cli_extract() {
    let dir = tempfile::tempdir().unwrap();
    let (bp, tp) = model_pair(dir.path(), DType::F32);
    let out = dir.path().join("cli-out");
    let st = std::process::Command::new(env!("CARGO_BIN_EXE_rankfuse"))
        .args(["--threads", "2", "extract", "--base"])
        .arg(&bp)
        .arg("--tuned")
        .arg(&tp)
        .args([
            "--energy",
            "0.99",
            "--max-rank",
            "5",
            "--rslora",
            "--svg",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let md = std::fs::read_to_string(out.join("extract_report.md")).unwrap();
    assert!(
        md.contains("| `layers.0.up_proj` | 96 x 64 | 5 (cap) |"),
        "{md}"
    );
    let ad = peft::load(&out).unwrap();
    assert_eq!(ad.module("layers.0.up_proj").unwrap().rank(), 5);
}

#[test]
fn sharded_base_index() {
    let dir = tempfile::tempdir().unwrap();
    let (_, tp) = model_pair(dir.path(), DType::F32);
    // Split the base into two shards behind an index.json.
    let base = Weights::open(dir.path().join("base.safetensors")).unwrap();
    let mut shards: [Vec<TensorOut<'_>>; 2] = [Vec::new(), Vec::new()];
    let mut map = serde_json::Map::new();
    for (i, e) in base.entries().iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        map.insert(e.name.clone(), serde_json::json!(file));
        shards[i % 2].push(TensorOut {
            name: e.name.clone(),
            dtype: e.dtype.unwrap(),
            shape: e.shape.clone(),
            data: Cow::Borrowed(base.bytes(&e.name).unwrap()),
        });
    }
    for (i, s) in shards.iter().enumerate() {
        write(
            &dir.path()
                .join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            s,
        );
    }
    let idx = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &idx,
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )
    .unwrap();
    let (b, t) = (Weights::open(&idx).unwrap(), Weights::open(&tp).unwrap());
    let ex = extract::extract(&b, &t, &opts(RankRule::Fixed(2)), &|_, _, _| {}).unwrap();
    assert_eq!(ex.adapter.len(), 3);
    assert!(ex.report.layers.iter().all(|l| l.rank == 2));
}
