//! Parity with Hugging Face PEFT: adapters and outputs written by PEFT itself
//! (tests/fixtures/peft-tiny, see its README for versions and tolerances).

mod common;
use common::{assert_close, fixture, runtimes};
use rankfuse::adapter::peft;
use rankfuse::backend::LinearProblem;
use rankfuse::runtime::slot;
use rankfuse::{Adapter, DType, MatRef, Matrix, Runtime, Scaling, Weights};

const ADAPTERS: [&str; 3] = ["lora-r8", "rslora-pattern", "lora-r64"];

fn load(name: &str) -> Adapter {
    peft::load(&fixture(&format!("adapters/{name}"))).unwrap()
}

fn convert(m: MatRef<'_>, dt: DType) -> Matrix {
    Matrix::from_f32(dt, m.rows, m.cols, &m.to_f32_vec()).unwrap()
}

/// y for one module through the runtime, in `ydt`.
#[allow(clippy::too_many_arguments)]
fn run(
    rt: &Runtime,
    base: &Weights,
    module: &str,
    x: MatRef<'_>,
    slots: &[Option<rankfuse::Slot<'_>>],
    rows: Option<&[i32]>,
    ydt: DType,
) -> Vec<f32> {
    let w = base.get(&format!("{module}.weight")).unwrap();
    let bias = base
        .contains(&format!("{module}.bias"))
        .then(|| base.get(&format!("{module}.bias")).unwrap());
    let mut y = Matrix::zeros(ydt, x.rows, w.rows).unwrap();
    let p = LinearProblem {
        x,
        w,
        bias,
        slots,
        row_slot: rows,
    };
    rt.linear(&p, &mut y.view_mut()).unwrap();
    // The same call on W prepacked for this runtime (rf_weights_pack) agrees: every fixture
    // check below holds for the packed path too.
    let pw = rt.pack(&w).unwrap();
    let mut yp = Matrix::zeros(ydt, x.rows, w.rows).unwrap();
    rt.linear_packed(&p, &pw, &mut yp.view_mut()).unwrap();
    let tol = match ydt {
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => unreachable!("a quantized output"),
    };
    assert_close(
        &format!("{module}: packed W vs W"),
        &yp.to_f32_vec(),
        &y.to_f32_vec(),
        tol,
        tol,
    );
    y.to_f32_vec()
}

#[test]
fn config_values_match_peft_meta() {
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("meta.json")).unwrap()).unwrap();
    for name in ADAPTERS {
        let ad = load(name);
        let per = meta["adapters"][name]["per_module"].as_object().unwrap();
        assert_eq!(ad.len(), per.len(), "{name}: module count");
        for (module, m) in per {
            let l = ad.module(module).unwrap();
            assert_eq!(
                l.rank() as u64,
                m["r"].as_u64().unwrap(),
                "{name}/{module}: r"
            );
            assert_eq!(
                l.alpha as f64,
                m["lora_alpha"].as_f64().unwrap(),
                "{name}/{module}: alpha"
            );
            let want = m["scaling"].as_f64().unwrap() as f32;
            assert!(
                (l.scale_at(l.rank()) - want).abs() <= 1e-6 * want,
                "{name}/{module}: scale"
            );
            let rs = m["use_rslora"].as_bool().unwrap();
            assert_eq!(l.scaling, if rs { Scaling::RsLora } else { Scaling::Lora });
            assert!(
                l.a.is_mapped() && l.b.is_mapped(),
                "adapter tensors are used in place"
            );
        }
    }
}

#[test]
fn every_adapter_every_module_every_base_dtype() {
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let bases = [
        ("base.safetensors", "y", 1e-4f32, 1e-4f32),
        ("base-f16.safetensors", "y", 2e-3, 2e-3),
        ("base-bf16.safetensors", "y_bf16base", 1e-4, 1e-4),
    ];
    for (isa, rt) in runtimes() {
        for (file, key, atol, rtol) in bases {
            let base = Weights::open(fixture(file)).unwrap();
            for name in ADAPTERS {
                let ad = load(name);
                for l in ad.modules() {
                    let x = io.get(&format!("x.{}", l.name)).unwrap();
                    let got = run(
                        &rt,
                        &base,
                        &l.name,
                        x,
                        &[Some(slot(l, 0, 1.0).unwrap())],
                        None,
                        DType::F32,
                    );
                    let want = io
                        .get(&format!("{key}.{name}.{}", l.name))
                        .unwrap()
                        .to_f32_vec();
                    assert_close(
                        &format!("{isa:?} {file} {name} {}", l.name),
                        &got,
                        &want,
                        atol,
                        rtol,
                    );
                }
                // Base only, through the same call with no slots.
                if file != "base-f16.safetensors" {
                    let l = ad.modules().next().unwrap();
                    let x = io.get(&format!("x.{}", l.name)).unwrap();
                    let got = run(&rt, &base, &l.name, x, &[], None, DType::F32);
                    let bkey = if file == "base.safetensors" {
                        "y_base"
                    } else {
                        "y_base_bf16base"
                    };
                    let want = io.get(&format!("{bkey}.{}", l.name)).unwrap().to_f32_vec();
                    assert_close(
                        &format!("{isa:?} {file} base-only {}", l.name),
                        &got,
                        &want,
                        atol,
                        rtol,
                    );
                }
            }
        }
    }
}

#[test]
fn everything_in_bf16_matches_peft_within_bf16_tolerance() {
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let base = Weights::open(fixture("base-bf16.safetensors")).unwrap();
    for (isa, rt) in runtimes() {
        for name in ADAPTERS {
            let ad = load(name);
            for l in ad.modules() {
                let x = convert(io.get(&format!("x.{}", l.name)).unwrap(), DType::BF16);
                let s = slot(l, 0, 1.0).unwrap();
                let (a, b) = (convert(s.a, DType::BF16), convert(s.b, DType::BF16));
                let s = rankfuse::Slot {
                    a: a.view(),
                    b: b.view(),
                    ..s
                };
                let got = run(&rt, &base, &l.name, x.view(), &[Some(s)], None, DType::BF16);
                let want = io
                    .get(&format!("y.{name}.{}", l.name))
                    .unwrap()
                    .to_f32_vec();
                assert_close(
                    &format!("{isa:?} all-bf16 {name} {}", l.name),
                    &got,
                    &want,
                    5e-2,
                    2e-2,
                );
            }
        }
    }
}

#[test]
fn truncation_to_rank_b() {
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let base = Weights::open(fixture("base.safetensors")).unwrap();
    let ad = load("lora-r64");
    for (isa, rt) in runtimes() {
        for b in [1usize, 8, 32] {
            for l in ad.modules() {
                let x = io.get(&format!("x.{}", l.name)).unwrap();
                let got = run(
                    &rt,
                    &base,
                    &l.name,
                    x,
                    &[Some(slot(l, b, 1.0).unwrap())],
                    None,
                    DType::F32,
                );
                let want = io
                    .get(&format!("y.lora-r64.trunc{b}.{}", l.name))
                    .unwrap()
                    .to_f32_vec();
                assert_close(
                    &format!("{isa:?} trunc{b} {}", l.name),
                    &got,
                    &want,
                    1e-4,
                    1e-4,
                );
            }
        }
    }
    // set_rank changes the default rank of later calls the same way.
    let l = ad.module("layers.1.mlp.down_proj").unwrap();
    l.set_rank(8).unwrap();
    let rt = Runtime::cpu().unwrap();
    let x = io.get(&format!("x.{}", l.name)).unwrap();
    let got = run(
        &rt,
        &base,
        &l.name,
        x,
        &[Some(slot(l, 0, 1.0).unwrap())],
        None,
        DType::F32,
    );
    let want = io
        .get(&format!("y.lora-r64.trunc8.{}", l.name))
        .unwrap()
        .to_f32_vec();
    assert_close("set_rank(8)", &got, &want, 1e-4, 1e-4);
    assert!(l.set_rank(65).is_err() && l.set_rank(0).is_err());
}

#[test]
fn mixed_batch_rows_use_their_own_adapter() {
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let base = Weights::open(fixture("base.safetensors")).unwrap();
    let ads: Vec<Adapter> = ADAPTERS.iter().map(|n| load(n)).collect();
    for (isa, rt) in runtimes() {
        for module in [
            "layers.0.mlp.up_proj",
            "layers.1.self_attn.q_proj",
            "layers.0.mlp.down_proj",
        ] {
            let x = io.get(&format!("x.{module}")).unwrap();
            let xs = x.to_f32_vec();
            let m = x.rows;
            // Interleave rows from the four groups so grouping inside the kernel is exercised.
            let order: Vec<i32> = (0..4 * m).map(|i| [2, -1, 0, 1][i % 4]).collect();
            let mut batch = Vec::new();
            let mut src_row = Vec::new();
            let mut seen = [0usize; 4];
            for &s in &order {
                let g = (s + 1) as usize;
                let r = seen[g] % m;
                seen[g] += 1;
                batch.extend_from_slice(&xs[r * x.cols..(r + 1) * x.cols]);
                src_row.push(r);
            }
            let xb = Matrix::from_f32(DType::F32, order.len(), x.cols, &batch).unwrap();
            // A NULL slot too: slot 3 is empty (rows never point at it here).
            let mut slots: Vec<_> = ads
                .iter()
                .map(|a| Some(slot(a.module(module).unwrap(), 0, 1.0).unwrap()))
                .collect();
            slots.push(None);
            let got = run(
                &rt,
                &base,
                module,
                xb.view(),
                &slots,
                Some(&order),
                DType::F32,
            );
            let n = got.len() / order.len();
            for (i, &s) in order.iter().enumerate() {
                let key = if s < 0 {
                    format!("y_base.{module}")
                } else {
                    format!("y.{}.{module}", ADAPTERS[s as usize])
                };
                let want = io.get(&key).unwrap().to_f32_vec();
                let r = src_row[i];
                assert_close(
                    &format!("{isa:?} mixed {module} row {i} (slot {s})"),
                    &got[i * n..(i + 1) * n],
                    &want[r * n..(r + 1) * n],
                    1e-4,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn stacked_slots_add_up_and_scale_mult_scales() {
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let base = Weights::open(fixture("base.safetensors")).unwrap();
    let (a8, a64) = (load("lora-r8"), load("lora-r64"));
    let module = "layers.0.self_attn.o_proj";
    let x = io.get(&format!("x.{module}")).unwrap();
    let yb = io.get(&format!("y_base.{module}")).unwrap().to_f32_vec();
    let y8 = io.get(&format!("y.lora-r8.{module}")).unwrap().to_f32_vec();
    let y64 = io
        .get(&format!("y.lora-r64.{module}"))
        .unwrap()
        .to_f32_vec();
    let want: Vec<f32> = (0..yb.len())
        .map(|i| yb[i] + 0.5 * (y8[i] - yb[i]) + (y64[i] - yb[i]))
        .collect();
    for (isa, rt) in runtimes() {
        let slots = [
            Some(slot(a8.module(module).unwrap(), 0, 0.5).unwrap()),
            None,
            Some(slot(a64.module(module).unwrap(), 0, 1.0).unwrap()),
        ];
        let got = run(&rt, &base, module, x, &slots, None, DType::F32);
        assert_close(&format!("{isa:?} stacked"), &got, &want, 2e-4, 2e-4);
    }
}

#[test]
fn save_peft_roundtrip_reproduces_outputs() {
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let base = Weights::open(fixture("base.safetensors")).unwrap();
    let rt = Runtime::cpu().unwrap();
    for name in ADAPTERS {
        let ad = load(name);
        let dir = tempfile::tempdir().unwrap();
        peft::save(&ad, dir.path()).unwrap();
        let back = peft::load(dir.path()).unwrap();
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("adapter_config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["peft_type"], "LORA");
        assert_eq!(back.len(), ad.len());
        for l in ad.modules() {
            let lb = back.module(&l.name).unwrap();
            assert_eq!(
                (lb.rank(), lb.alpha, lb.scaling),
                (l.rank(), l.alpha, l.scaling),
                "{name}/{}",
                l.name
            );
            let x = io.get(&format!("x.{}", l.name)).unwrap();
            let y0 = run(
                &rt,
                &base,
                &l.name,
                x,
                &[Some(slot(l, 0, 1.0).unwrap())],
                None,
                DType::F32,
            );
            let y1 = run(
                &rt,
                &base,
                &l.name,
                x,
                &[Some(slot(lb, 0, 1.0).unwrap())],
                None,
                DType::F32,
            );
            assert_eq!(
                y0, y1,
                "{name}/{}: saved adapter must reproduce outputs exactly",
                l.name
            );
        }
        // PEFT's key names and shapes.
        let w = Weights::open(dir.path().join("adapter_model.safetensors")).unwrap();
        let orig = Weights::open(fixture(&format!(
            "adapters/{name}/adapter_model.safetensors"
        )))
        .unwrap();
        let mut a: Vec<_> = w
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        let mut b: Vec<_> = orig
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.shape.clone()))
            .collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: same tensor names and shapes as PEFT wrote");
    }
    // A truncated adapter saves its rank in use as r (rank_pattern), scale preserved.
    let ad = load("lora-r64");
    ad.module("layers.0.mlp.up_proj")
        .unwrap()
        .set_rank(8)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    peft::save(&ad, dir.path()).unwrap();
    let back = peft::load(dir.path()).unwrap();
    let l = back.module("layers.0.mlp.up_proj").unwrap();
    assert_eq!((l.capacity, l.scale_at(8)), (8, 8.0));
    assert_eq!(back.module("layers.0.mlp.gate_proj").unwrap().capacity, 64);
}
