//! GGUF LoRA adapters (llama.cpp's format): files written by llama.cpp's own `gguf` package
//! (tests/fixtures/gguf-adapter, scripts/make_gguf_adapter_fixtures.py) read bit-exactly; PEFT ->
//! GGUF -> PEFT round trips of the PEFT fixtures; rf_linear on the converted adapters against
//! PEFT's own outputs; every broken file and misuse through the C ABI gives its error.

mod common;
use common::capi::{cs, expect, ok};
use common::{assert_close, fixture};
use rankfuse::adapter::gguf::{self, AlphaPolicy, SaveOptions};
use rankfuse::adapter::{peft, Lora, TensorData};
use rankfuse::backend::LinearProblem;
use rankfuse::ffi::adapter::*;
use rankfuse::ffi::adapter_gguf::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::types::rf_status::*;
use rankfuse::ffi::weights::*;
use rankfuse::runtime::slot;
use rankfuse::{Adapter, DType, Matrix, Runtime, RuntimeOptions, Scaling, Weights};
use std::ffi::CStr;
use std::path::PathBuf;
use std::ptr::{null, null_mut};

const ADAPTERS: [&str; 3] = ["lora-r8", "rslora-pattern", "lora-r64"];

fn gfix(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf-adapter")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("rankfuse-gguf-adapter-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn bytes_of(l: &Lora) -> (Vec<u8>, Vec<u8>) {
    let r = l.rank();
    (
        peft::dense_bytes(l.a_view(r)),
        peft::dense_bytes(l.b_view(r)),
    )
}

#[test]
fn reads_files_written_by_the_gguf_package() {
    let ad = gguf::load(&gfix("mixed.gguf")).unwrap();
    let refs = Weights::open(gfix("ref.safetensors")).unwrap();
    assert_eq!(ad.architecture(), Some("llama"));
    // The norm vector is skipped, as llama.cpp skips it.
    let names: Vec<&str> = ad.modules().map(|l| l.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "blk.0.attn_q",
            "blk.0.attn_v",
            "blk.0.ffn_down",
            "blk.0.ffn_up"
        ]
    );
    for l in ad.modules() {
        let a = refs.get(&format!("a.{}", l.name)).unwrap().to_f32_vec();
        let b = refs.get(&format!("b.{}", l.name)).unwrap().to_f32_vec();
        let s = refs.get(&format!("scale.{}", l.name)).unwrap().to_f32_vec()[0];
        let r = l.rank();
        assert_eq!(l.a_view(r).to_f32_vec(), a, "{}: lora_a", l.name);
        assert_eq!(l.b_view(r).to_f32_vec(), b, "{}: lora_b", l.name);
        assert_eq!(l.scale_at(r).to_bits(), s.to_bits(), "{}: scale", l.name);
        assert_eq!(l.scaling, Scaling::Lora);
    }
    // F32/F16/BF16 stay in the mapping; Q8_0 (with an F32 lora_b) is decoded to F32.
    let dt = |m: &str| ad.module(m).unwrap().dtype();
    assert_eq!(dt("blk.0.attn_v"), DType::F16);
    assert_eq!(dt("blk.0.ffn_up"), DType::BF16);
    assert_eq!(dt("blk.0.ffn_down"), DType::F32);
    assert!(ad.module("blk.0.attn_v").unwrap().a.is_mapped());

    let na = gguf::load(&gfix("no-alpha.gguf")).unwrap();
    let l = na.module("blk.1.attn_output").unwrap();
    assert_eq!(
        (l.scaling, l.scale_at(2), l.scale_at(1)),
        (Scaling::Fixed, 1.0, 1.0)
    );
}

#[test]
fn broken_files_name_the_tensor_or_key() {
    let cases: [(&str, &[&str]); 6] = [
        ("lone-a.gguf", &["blk.0.attn_k.weight.lora_a", "lora_b"]),
        (
            "rank-mismatch.gguf",
            &["blk.0.attn_q.weight.lora_a", "rank 4", "rank 2"],
        ),
        ("bad-suffix.gguf", &["blk.0.attn_q.weight.lora_c"]),
        ("not-lora.gguf", &["adapter.type", "control_vector"]),
        ("model.gguf", &["general.type", "\"model\""]),
        ("ref.safetensors", &["not a GGUF file"]),
    ];
    for (f, needles) in cases {
        let e = gguf::load(&gfix(f))
            .err()
            .unwrap_or_else(|| panic!("{f} loaded"));
        for n in needles {
            assert!(
                e.message.contains(n),
                "{f}: '{}' should name {n}",
                e.message
            );
        }
    }
}

#[test]
fn checked_against_a_base() {
    let base = Weights::open(gfix("base.gguf")).unwrap();
    let mut ad = gguf::load(&gfix("mixed.gguf")).unwrap();
    let e = gguf::check_base(&ad, &base).unwrap_err();
    assert_eq!(e.status, rankfuse::Status::Shape, "{}", e.message);
    assert!(e.message.contains("blk.0.attn_v.weight") && e.message.contains("[16, 64]"));
    ad.set_architecture(Some("qwen2")).unwrap();
    let e = gguf::check_base(&ad, &base).unwrap_err();
    assert!(e.message.contains("'qwen2'") && e.message.contains("'llama'"));
    // A module whose base tensor is missing.
    let na = gguf::load(&gfix("no-alpha.gguf")).unwrap();
    let e = gguf::check_base(&na, &base).unwrap_err();
    assert_eq!(e.status, rankfuse::Status::NotFound);
    assert!(e.message.contains("blk.1.attn_output.weight"));
}

#[test]
fn written_layout_is_what_llama_cpp_requires() {
    let ad = gguf::load(&gfix("mixed.gguf")).unwrap();
    let p = tmp("layout.gguf");
    gguf::save(&ad, &p, &SaveOptions::default()).unwrap();
    let w = Weights::open(&p).unwrap();
    assert_eq!(
        w.meta_get("general.alignment").and_then(|v| v.as_u64()),
        Some(32)
    );
    let starts: Vec<usize> = w
        .entries()
        .iter()
        .map(|t| {
            let b = w.bytes(&t.name).unwrap();
            b.as_ptr() as usize - w.bytes(&w.entries()[0].name).unwrap().as_ptr() as usize
        })
        .collect();
    // Declaration order = data order, each at the next 32-byte boundary after the previous.
    let mut expect_at = 0usize;
    for (t, s) in w.entries().iter().zip(&starts) {
        assert_eq!(*s, expect_at, "tensor '{}'", t.name);
        expect_at = (s + t.byte_len()).next_multiple_of(32);
    }
    // Read back: same tensors and scales, alpha kept (every scale is alpha / r here).
    let back = gguf::load(&p).unwrap();
    for l in ad.modules() {
        let m = back.module(&l.name).unwrap();
        assert_eq!(bytes_of(l), bytes_of(m), "{}", l.name);
        assert_eq!(l.scale_at(l.rank()), m.scale_at(m.rank()));
        assert_eq!(m.alpha, 12.0);
    }
}

/// PEFT -> GGUF -> PEFT, through files, for `arch`.
fn round_trip(name: &str, arch: &str, n_head: usize) -> (Adapter, Adapter, gguf::SaveReport) {
    let orig = peft::load(&fixture(&format!("adapters/{name}"))).unwrap();
    let g = tmp(&format!("{name}-{arch}.gguf"));
    let opts = SaveOptions {
        architecture: Some(arch.into()),
        n_head,
        ..Default::default()
    };
    let rep = gguf::save(&orig, &g, &opts).unwrap();
    let mut mid = gguf::load(&g).unwrap();
    assert!(mid.modules().all(|l| l.name.starts_with("blk.")));
    gguf::to_peft(&mut mid, n_head, 0).unwrap();
    let dir = tmp(&format!("{name}-{arch}-peft"));
    peft::save(&mid, &dir).unwrap();
    (orig, peft::load(&dir).unwrap(), rep)
}

#[test]
fn peft_gguf_peft_round_trip_is_bit_identical() {
    // qwen2: names mapped, no row permutation; llama: q/k rows permuted and back (1 head fits
    // the pruned fixture's uneven widths).
    for (arch, heads) in [("qwen2", 0), ("llama", 1)] {
        for name in ADAPTERS {
            let (orig, back, rep) = round_trip(name, arch, heads);
            assert_eq!(orig.len(), back.len());
            for l in orig.modules() {
                let m = back.module(&l.name).unwrap();
                let folded = rep.modules.iter().any(|x| x.0 == l.name && x.3);
                let (r, rm) = (l.rank(), m.rank());
                assert_eq!(r, rm, "{name}/{}", l.name);
                if folded {
                    // llama.cpp's single alpha cannot say this module's scale: it is folded into
                    // lora_b, so the product is kept to rounding, not the bytes.
                    assert_eq!(bytes_of(l).0, bytes_of(m).0);
                    let (bl, bm) = (l.b_view(r).to_f32_vec(), m.b_view(r).to_f32_vec());
                    let (sl, sm) = (l.scale_at(r), m.scale_at(r));
                    let want: Vec<f32> = bl.iter().map(|v| v * sl).collect();
                    let got: Vec<f32> = bm.iter().map(|v| v * sm).collect();
                    assert_close(&format!("{name}/{}", l.name), &got, &want, 1e-6, 1e-6);
                } else {
                    assert_eq!(bytes_of(l), bytes_of(m), "{arch} {name}/{}", l.name);
                    assert_eq!(
                        (l.scaling, l.alpha.to_bits(), l.scale_at(r).to_bits()),
                        (m.scaling, m.alpha.to_bits(), m.scale_at(r).to_bits()),
                        "{arch} {name}/{}",
                        l.name
                    );
                }
            }
            let n_folded = rep.modules.iter().filter(|m| m.3).count();
            match name {
                "rslora-pattern" => {
                    // Most modules share r = 8 and alpha 16: alpha = 16 * sqrt(8); the r = 4, r =
                    // 16 and alpha_pattern modules are folded.
                    assert_eq!(rep.alpha, (16f64 / 8f64.sqrt() * 8.0) as f32);
                    assert_eq!(n_folded, 4);
                }
                _ => assert_eq!(n_folded, 0, "{name}"),
            }
        }
    }
}

#[test]
fn converted_adapters_match_peft_outputs() {
    let rt = Runtime::new(RuntimeOptions {
        num_threads: 2,
        ..Default::default()
    })
    .unwrap();
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    let base = Weights::open(fixture("base.safetensors")).unwrap();
    for name in ADAPTERS {
        for policy in [AlphaPolicy::Auto, AlphaPolicy::Fold] {
            let orig = peft::load(&fixture(&format!("adapters/{name}"))).unwrap();
            let g = tmp(&format!("{name}-{policy:?}.gguf"));
            let opts = SaveOptions {
                architecture: Some("llama".into()),
                alpha: policy,
                n_head: 2,
                n_head_kv: 1,
            };
            gguf::save(&orig, &g, &opts).unwrap();
            let mut ad = gguf::load(&g).unwrap();
            gguf::to_peft(&mut ad, 2, 1).unwrap();
            for l in ad.modules() {
                let x = io.get(&format!("x.{}", l.name)).unwrap();
                let w = base.get(&format!("{}.weight", l.name)).unwrap();
                let bias = base
                    .contains(&format!("{}.bias", l.name))
                    .then(|| base.get(&format!("{}.bias", l.name)).unwrap());
                let slots = [Some(slot(l, 0, 1.0).unwrap())];
                let mut y = Matrix::zeros(DType::F32, x.rows, w.rows).unwrap();
                let p = LinearProblem {
                    x,
                    w,
                    bias,
                    slots: &slots,
                    row_slot: None,
                };
                rt.linear(&p, &mut y.view_mut()).unwrap();
                let want = io
                    .get(&format!("y.{name}.{}", l.name))
                    .unwrap()
                    .to_f32_vec();
                assert_close(
                    &format!("{name} {policy:?} {}", l.name),
                    &y.to_f32_vec(),
                    &want,
                    1e-4,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn unmapped_names_and_missing_options_are_errors() {
    let mut ad = Adapter::new("odd");
    for n in ["model.layers.0.mlp.fc1", "lm_head", "vision.proj"] {
        let a = Matrix::from_f32(DType::F32, 2, 4, &[0.5; 8]).unwrap();
        let b = Matrix::from_f32(DType::F32, 6, 2, &[0.25; 12]).unwrap();
        let l = Lora::new(
            n,
            TensorData::Owned(a),
            TensorData::Owned(b),
            4.0,
            Scaling::Lora,
            0.0,
        )
        .unwrap();
        ad.add(l).unwrap();
    }
    let p = tmp("odd.gguf");
    let e = gguf::save(&ad, &p, &SaveOptions::default()).unwrap_err();
    assert!(e.message.contains("architecture"), "{}", e.message);
    let opts = SaveOptions {
        architecture: Some("llama".into()),
        ..Default::default()
    };
    let e = gguf::save(&ad, &p, &opts).unwrap_err();
    assert_eq!(e.status, rankfuse::Status::Unsupported);
    assert!(
        e.message.contains("'model.layers.0.mlp.fc1'")
            && e.message.contains("'vision.proj'")
            && !e.message.contains("'lm_head'"),
        "{}",
        e.message
    );
    // llama q/k without head counts.
    let orig = peft::load(&fixture("adapters/lora-r8")).unwrap();
    let e = gguf::save(&orig, &p, &opts).unwrap_err();
    assert!(e.message.contains("n_head"), "{}", e.message);
    assert!(!p.exists());
}

#[test]
fn c_abi_load_save_architecture_and_errors() {
    unsafe {
        let mut rt = null_mut();
        ok(rf_runtime_create(null(), &mut rt));
        let mut ad: *mut rf_adapter = null_mut();
        let path = cs(gfix("mixed.gguf").to_str().unwrap());
        ok(rf_adapter_load_gguf(rt, path.as_ptr(), &mut ad));
        assert_eq!(rf_adapter_module_count(ad), 4);
        let mut arch = null();
        ok(rf_adapter_architecture(ad, &mut arch));
        assert_eq!(CStr::from_ptr(arch).to_str().unwrap(), "llama");

        // Each broken file: its status, the tensor or key named, *out untouched.
        let cases = [
            (
                "lone-a.gguf",
                RF_STATUS_FORMAT,
                "blk.0.attn_k.weight.lora_a",
            ),
            (
                "rank-mismatch.gguf",
                RF_STATUS_SHAPE,
                "blk.0.attn_q.weight.lora_b",
            ),
            ("model.gguf", RF_STATUS_FORMAT, "general.type"),
            ("not-lora.gguf", RF_STATUS_UNSUPPORTED, "adapter.type"),
            ("missing.gguf", RF_STATUS_NOT_FOUND, "missing.gguf"),
        ];
        for (f, st, needle) in cases {
            let sentinel = std::ptr::dangling_mut::<rf_adapter>();
            let mut out = sentinel;
            let p = cs(gfix(f).to_str().unwrap());
            expect(
                rf_adapter_load_gguf(rt, p.as_ptr(), &mut out),
                st,
                &[needle],
            );
            assert_eq!(out, sentinel, "{f}: *out written on failure");
        }
        expect(
            rf_adapter_load_gguf(rt, null(), &mut null_mut()),
            RF_STATUS_INVALID_ARGUMENT,
            &["path"],
        );

        // Save: defaults (the adapter's own architecture), then options misuse.
        let out = tmp("c-abi.gguf");
        let outc = cs(out.to_str().unwrap());
        ok(rf_adapter_save_gguf(ad, outc.as_ptr(), null()));
        let mut o = std::mem::zeroed::<rf_gguf_save_options>();
        ok(rf_gguf_save_options_default(&mut o));
        let qwen = cs("qwen2");
        o.architecture = qwen.as_ptr();
        o.alpha = rf_gguf_alpha::RF_GGUF_ALPHA_FOLD;
        ok(rf_adapter_save_gguf(ad, outc.as_ptr(), &o));
        let mut back: *mut rf_adapter = null_mut();
        ok(rf_adapter_load_gguf(rt, outc.as_ptr(), &mut back));
        let mut arch2 = null();
        ok(rf_adapter_architecture(back, &mut arch2));
        assert_eq!(CStr::from_ptr(arch2).to_str().unwrap(), "qwen2");
        rf_adapter_free(back);
        let mut bad = o;
        bad.struct_size = 4;
        expect(
            rf_adapter_save_gguf(ad, outc.as_ptr(), &bad),
            RF_STATUS_INVALID_ARGUMENT,
            &["struct_size"],
        );
        let mut bad = o;
        (&mut bad.alpha as *mut rf_gguf_alpha as *mut i32).write(7);
        expect(
            rf_adapter_save_gguf(ad, outc.as_ptr(), &bad),
            RF_STATUS_INVALID_ARGUMENT,
            &["opts->alpha = 7"],
        );

        // A PEFT adapter has no architecture: NULL, and saving needs one.
        let mut pa: *mut rf_adapter = null_mut();
        let dir = cs(fixture("adapters/lora-r8").to_str().unwrap());
        ok(rf_adapter_load_peft(rt, dir.as_ptr(), &mut pa));
        let mut none = std::ptr::dangling::<std::ffi::c_char>();
        ok(rf_adapter_architecture(pa, &mut none));
        assert!(none.is_null());
        expect(
            rf_adapter_save_gguf(pa, outc.as_ptr(), null()),
            RF_STATUS_INVALID_ARGUMENT,
            &["architecture"],
        );
        let gpt = cs("gpt2");
        o.architecture = gpt.as_ptr();
        expect(
            rf_adapter_save_gguf(pa, outc.as_ptr(), &o),
            RF_STATUS_UNSUPPORTED,
            &["gpt2"],
        );

        // Checked against a base.
        let mut w = null_mut();
        let bp = cs(gfix("base.gguf").to_str().unwrap());
        ok(rf_weights_open(rt, bp.as_ptr(), &mut w));
        expect(
            rf_adapter_check_base(ad, w),
            RF_STATUS_SHAPE,
            &["blk.0.attn_v.weight"],
        );
        expect(
            rf_adapter_check_base(null(), w),
            RF_STATUS_INVALID_ARGUMENT,
            &["a"],
        );
        rf_weights_free(w);
        rf_adapter_free(pa);
        rf_adapter_free(ad);
        rf_runtime_free(rt);
    }
}

/// A file written by llama.cpp's own `convert_lora_to_gguf.py` (llama-cpp-python 0.3.16's
/// vendored copy, scripts/make_llamacpp_lora_fixture.py) from the PEFT folder beside it: read,
/// names mapped back and q/k rows un-permuted, it is the PEFT input bit for bit, same scales.
#[test]
fn reads_what_llama_cpp_convert_lora_to_gguf_wrote() {
    let dir = gfix("llamacpp");
    let mut theirs = gguf::load(&dir.join("convert_lora_to_gguf.gguf")).unwrap();
    assert_eq!(theirs.architecture(), Some("llama"));
    let peft_in = peft::load(&dir.join("peft")).unwrap();
    assert_eq!(theirs.len(), peft_in.len());
    // tests/llama/interop.py's model: 4 heads, 2 KV heads.
    gguf::to_peft(&mut theirs, 4, 2).unwrap();
    for l in peft_in.modules() {
        let m = theirs
            .module(&l.name)
            .unwrap_or_else(|e| panic!("{}: {e}", l.name));
        let r = l.rank();
        assert_eq!(m.rank(), r, "{}", l.name);
        assert_eq!(bytes_of(l), bytes_of(m), "{}", l.name);
        assert_eq!(
            l.scale_at(r).to_bits(),
            m.scale_at(r).to_bits(),
            "{}",
            l.name
        );
    }
}
