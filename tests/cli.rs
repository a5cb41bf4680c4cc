//! The `rankfuse` binary end to end: info, inspect, apply (incl. --rank and fan_in_fan_out), demo.

mod common;
use common::{assert_close, fixture};
use rankfuse::weights::{write_safetensors, TensorOut};
use rankfuse::{DType, Weights};
use std::borrow::Cow;
use std::path::Path;
use std::process::Command;

fn rankfuse(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankfuse"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn info_is_json() {
    let (ok, out) = rankfuse(&["info"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    assert!(v["cpu_features"].is_object() && v["isa"].is_string());
}

#[test]
fn inspect_file_and_adapter() {
    let (ok, out) = rankfuse(&[
        "inspect",
        fixture("adapters/rslora-pattern").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("14 modules")
            && out.contains("layers.0.self_attn.q_proj")
            && out.contains("8.000000"),
        "{out}"
    );
    let (ok, out) = rankfuse(&[
        "inspect",
        fixture("base-bf16.safetensors").to_str().unwrap(),
    ]);
    assert!(
        ok && out.contains("BF16") && out.contains("layers.1.mlp.down_proj.weight"),
        "{out}"
    );
    let (ok, out) = rankfuse(&["inspect", "/no/such/file.safetensors"]);
    assert!(!ok && out.contains("/no/such/file.safetensors"), "{out}");
    let gguf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/gguf/tiny.gguf");
    let (ok, out) = rankfuse(&["inspect", gguf.to_str().unwrap()]);
    assert!(ok, "{out}");
    for want in [
        "GGUF, 8 tensors",
        "w.q4_k",
        "Q4_K [3, 512] 864 bytes",
        "Q6_K [3, 512] 1260 bytes",
        "metadata test.f64 = -2.5e-300",
        "metadata test.u64 = 9223372036854775813",
        "metadata test.array_str = [string; 3] [\"a\", \"bc\", \"\"]",
        "metadata test.nested = [array; 2]",
    ] {
        assert!(out.contains(want), "'{want}' not in:\n{out}");
    }
}

#[test]
fn apply_writes_peft_outputs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("y.safetensors");
    let io = Weights::open(fixture("io.safetensors")).unwrap();
    for (adapter, rank, key) in [
        ("lora-r8", None, "y.lora-r8"),
        ("lora-r64", Some("8"), "y.lora-r64.trunc8"),
    ] {
        let mut args = vec![
            "apply",
            "--base",
            fixture("base.safetensors")
                .to_str()
                .unwrap()
                .to_string()
                .leak(),
            "--adapter",
        ];
        args.push(
            fixture(&format!("adapters/{adapter}"))
                .to_str()
                .unwrap()
                .to_string()
                .leak(),
        );
        args.extend([
            "--input",
            fixture("io.safetensors")
                .to_str()
                .unwrap()
                .to_string()
                .leak(),
            "--output",
            out.to_str().unwrap(),
        ]);
        if let Some(r) = rank {
            // The truncated run also takes the unpacked-W path (apply packs by default).
            args.extend(["--rank", r, "--no-pack"]);
        }
        let (ok, text) = rankfuse(&args);
        assert!(ok, "{text}");
        let y = Weights::open(&out).unwrap();
        assert_eq!(y.len(), 14);
        for e in y.entries() {
            let module = e.name.strip_prefix("y.").unwrap();
            let want = io.get(&format!("{key}.{module}")).unwrap().to_f32_vec();
            assert_close(
                &format!("apply {adapter} {module}"),
                &y.get(&e.name).unwrap().to_f32_vec(),
                &want,
                1e-4,
                1e-4,
            );
        }
    }
    // bf16 compute is close to f32 PEFT within bf16 tolerance.
    let (ok, text) = rankfuse(&[
        "apply",
        "--base",
        fixture("base.safetensors").to_str().unwrap(),
        "--adapter",
        fixture("adapters/lora-r8").to_str().unwrap(),
        "--input",
        fixture("io.safetensors").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--compute",
        "bf16",
    ]);
    assert!(ok, "{text}");
    let y = Weights::open(&out).unwrap();
    let want = io
        .get("y.lora-r8.layers.0.mlp.up_proj")
        .unwrap()
        .to_f32_vec();
    assert_close(
        "apply bf16",
        &y.get("y.layers.0.mlp.up_proj").unwrap().to_f32_vec(),
        &want,
        5e-2,
        2e-2,
    );
}

#[test]
fn apply_with_fan_in_fan_out_base() {
    // A Conv1D-style base stores W as [in, out]; the adapter says fan_in_fan_out.
    let d = tempfile::tempdir().unwrap();
    let base = Weights::open(fixture("base.safetensors")).unwrap();
    let module = "layers.0.self_attn.o_proj";
    let w = base.get(&format!("{module}.weight")).unwrap();
    let v = w.to_f32_vec();
    let mut t = vec![0f32; v.len()];
    for i in 0..w.rows {
        for j in 0..w.cols {
            t[j * w.rows + i] = v[i * w.cols + j];
        }
    }
    let bytes: Vec<u8> = t.iter().flat_map(|x| x.to_le_bytes()).collect();
    let tb = d.path().join("conv1d.safetensors");
    write_safetensors(
        &tb,
        &[TensorOut {
            name: format!("{module}.weight"),
            dtype: DType::F32,
            shape: vec![w.cols, w.rows],
            data: Cow::Owned(bytes),
        }],
        None,
    )
    .unwrap();
    let ad = d.path().join("ad");
    std::fs::create_dir(&ad).unwrap();
    std::fs::copy(
        fixture("adapters/lora-r8/adapter_model.safetensors"),
        ad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let cfg = std::fs::read_to_string(fixture("adapters/lora-r8/adapter_config.json"))
        .unwrap()
        .replace("\"fan_in_fan_out\": false", "\"fan_in_fan_out\": true");
    std::fs::write(ad.join("adapter_config.json"), cfg).unwrap();
    let x = Weights::open(fixture("io.safetensors")).unwrap();
    let xin = d.path().join("x.safetensors");
    let xv = x.get(&format!("x.{module}")).unwrap();
    write_safetensors(
        &xin,
        &[TensorOut {
            name: format!("x.{module}"),
            dtype: DType::F32,
            shape: vec![xv.rows, xv.cols],
            data: Cow::Borrowed(x.bytes(&format!("x.{module}")).unwrap()),
        }],
        None,
    )
    .unwrap();
    let out = d.path().join("y.safetensors");
    let (ok, text) = rankfuse(&[
        "apply",
        "--base",
        tb.to_str().unwrap(),
        "--adapter",
        ad.to_str().unwrap(),
        "--input",
        xin.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{text}");
    let y = Weights::open(&out).unwrap();
    let want = x.get(&format!("y.lora-r8.{module}")).unwrap().to_f32_vec();
    assert_close(
        "fan_in_fan_out",
        &y.get(&format!("y.{module}")).unwrap().to_f32_vec(),
        &want,
        1e-4,
        1e-4,
    );
}

#[test]
fn demo_runs_from_any_directory() {
    let d = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rankfuse"))
        .arg("demo")
        .current_dir(d.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("All outputs agree with PEFT"), "{text}");
    assert!(
        text.contains("rank 32") && text.contains("base-only"),
        "{text}"
    );
}

#[test]
fn bench_quant_times_in_place_and_packed_w_against_a_read_of_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("q.json");
    let (ok, out) = rankfuse(&[
        "bench",
        "--quant",
        "--shapes",
        "256:40",
        "--m",
        "1",
        "--ranks",
        "4",
        "--min-ms",
        "1",
        "--bw-mib",
        "0",
        "--threads",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = v["quant"].as_array().unwrap();
    // BF16, then Q8_0 / Q4_0 in place and packed, exact and Q8, then Q4_K / Q6_K both modes.
    assert_eq!(rows.len(), 1 + 2 * 4 + 2 * 2, "{rows:?}");
    for dt in ["Q8_0", "Q4_0"] {
        for packed in [false, true] {
            for act in ["exact", "q8"] {
                assert!(
                    rows.iter()
                        .any(|r| r["dtype"] == dt && r["packed"] == packed && r["act"] == act),
                    "{dt} packed={packed} {act} missing"
                );
            }
        }
    }
    for r in rows {
        assert!(r["stream_ms"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["of_stream"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["w_copies"].as_u64().unwrap() >= 2, "{r}");
    }
    assert!(out.contains("Q4_0+pk+q8x"), "{out}");
}
