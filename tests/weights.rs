//! Safetensors opening: single files, sharded index.json, views are zero-copy.

mod common;
use rankfuse::weights::{write_safetensors, TensorOut};
use rankfuse::{DType, Status, Weights};
use std::borrow::Cow;
use std::path::Path;

fn f32_tensor(name: &str, rows: usize, cols: usize, start: f32) -> TensorOut<'static> {
    let v: Vec<u8> = (0..rows * cols)
        .flat_map(|i| (start + i as f32).to_le_bytes())
        .collect();
    TensorOut {
        name: name.into(),
        dtype: DType::F32,
        shape: vec![rows, cols],
        data: Cow::Owned(v),
    }
}

fn write_sharded(dir: &Path, map: &str) -> std::path::PathBuf {
    write_safetensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            f32_tensor("a.weight", 2, 3, 0.0),
            f32_tensor("b.weight", 1, 4, 10.0),
        ],
        None,
    )
    .unwrap();
    write_safetensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[f32_tensor("c.weight", 3, 3, 100.0)],
        None,
    )
    .unwrap();
    let idx = dir.join("model.safetensors.index.json");
    std::fs::write(&idx, map).unwrap();
    idx
}

const GOOD_INDEX: &str = r#"{"metadata": {"total_size": 100}, "weight_map": {
  "a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors",
  "c.weight": "model-00002-of-00002.safetensors"}}"#;

#[test]
fn sharded_index_opens_every_shard() {
    let d = tempfile::tempdir().unwrap();
    let idx = write_sharded(d.path(), GOOD_INDEX);
    let w = Weights::open(&idx).unwrap();
    assert_eq!(w.len(), 3);
    let c = w.get("c.weight").unwrap();
    assert_eq!((c.rows, c.cols, c.get(2, 2)), (3, 3, 108.0));
    let b = w.get("b.weight").unwrap();
    assert_eq!((b.rows, b.cols, b.get(0, 3)), (1, 4, 13.0));
}

#[test]
fn sharded_index_errors_name_the_culprit() {
    let d = tempfile::tempdir().unwrap();
    let missing = GOOD_INDEX.replace("\"c.weight\"", "\"z.weight\"");
    let e = Weights::open(write_sharded(d.path(), &missing))
        .err()
        .unwrap();
    assert_eq!(e.status, Status::NotFound);
    assert!(
        e.message.contains("z.weight") && e.message.contains("model-00002-of-00002"),
        "{}",
        e.message
    );
    let traversal = GOOD_INDEX.replace(
        "\"model-00002-of-00002.safetensors\"",
        "\"../../etc/passwd\"",
    );
    let e = Weights::open(write_sharded(d.path(), &traversal))
        .err()
        .unwrap();
    assert_eq!(e.status, Status::Format);
    assert!(e.message.contains("../../etc/passwd"), "{}", e.message);
    let absent = GOOD_INDEX.replace(
        "model-00002-of-00002.safetensors",
        "model-00003-of-00003.safetensors",
    );
    let e = Weights::open(write_sharded(d.path(), &absent))
        .err()
        .unwrap();
    assert_eq!(e.status, Status::NotFound);
    assert!(e.message.contains("model-00003-of-00003"), "{}", e.message);
    let e = Weights::open(write_sharded(d.path(), "{\"weight_map\": 3}"))
        .err()
        .unwrap();
    assert_eq!(e.status, Status::Format);
    let e = Weights::open(write_sharded(d.path(), "[")).err().unwrap();
    assert_eq!(e.status, Status::Format);
    assert!(e.message.contains("invalid JSON"));
}

#[test]
fn views_point_into_the_mapping() {
    let w = Weights::open(common::fixture("base.safetensors")).unwrap();
    let bytes = w.bytes("layers.0.self_attn.q_proj.weight").unwrap();
    let v = w.get("layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(
        v.as_ptr(),
        bytes.as_ptr(),
        "zero-copy: the view is the mapped bytes"
    );
    assert_eq!((v.rows, v.cols, v.dtype), (64, 256, DType::F32));
    let b = w.get("layers.0.self_attn.q_proj.bias").unwrap();
    assert_eq!((b.rows, b.cols), (1, 64));
    let f16 = Weights::open(common::fixture("base-f16.safetensors")).unwrap();
    let h = f16.get("layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(h.dtype, DType::F16);
    assert!((h.get(3, 7) - v.get(3, 7)).abs() <= 1e-3 * v.get(3, 7).abs() + 1e-7);
}
