//! GGUF reading: the fixture written by llama.cpp's `gguf` package (scripts/make_gguf_fixtures.py)
//! read back bit-exactly against the package's own dequantization, the fused linear on its
//! quantized tensors against float64 outputs computed by the script, and a corpus of broken
//! files built here, each of which must be an error naming what is wrong (never a crash).

mod common;

use common::{assert_close, runtimes};
use rankfuse::backend::cpu::reference;
use rankfuse::weights::MetaValue;
use rankfuse::{DType, LinearProblem, Matrix, Slot, Status, Weights};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

fn open_tiny() -> (Weights, Weights) {
    let w = Weights::open(fixture("tiny.gguf")).unwrap();
    let r = Weights::open(fixture("tiny.ref.safetensors")).unwrap();
    (w, r)
}

#[test]
fn tensors_read_back_bit_exactly() {
    let (w, r) = open_tiny();
    assert!(w.is_gguf() && !r.is_gguf());
    let want = [
        ("w.q8_0", "Q8_0", vec![5, 96]),
        ("w.q4_0", "Q4_0", vec![7, 64]),
        ("w.q4_k", "Q4_K", vec![3, 512]),
        ("w.f16", "F16", vec![4, 40]),
        ("w.bf16", "BF16", vec![2, 16]),
        ("w.f32", "F32", vec![3, 8]),
        ("w.q6_k", "Q6_K", vec![3, 512]),
        ("v.f32", "F32", vec![10]),
    ];
    assert_eq!(w.len(), want.len());
    for (name, dt, shape) in want {
        let e = w.entry(name).unwrap();
        assert_eq!((e.dtype_name.as_str(), &e.shape), (dt, &shape), "{name}");
        let v = w.get(name).unwrap();
        assert_eq!(v.dtype.name(), dt);
        let got = v.to_f32_vec();
        let refv = r.get(name).unwrap().to_f32_vec();
        assert_eq!(got.len(), refv.len(), "{name}");
        for (i, (g, e)) in got.iter().zip(&refv).enumerate() {
            assert_eq!(g.to_bits(), e.to_bits(), "{name}[{i}]: {g} vs {e}");
        }
    }
    // Zero-copy: a mapped file's views point into the map.
    assert!(w.is_mapped());
}

#[test]
fn metadata_of_every_type() {
    let (w, _) = open_tiny();
    let get = |k: &str| w.meta_get(k).unwrap_or_else(|| panic!("no key {k}"));
    assert_eq!(get("test.u8"), &MetaValue::U8(200));
    assert_eq!(get("test.i8"), &MetaValue::I8(-100));
    assert_eq!(get("test.u16"), &MetaValue::U16(60000));
    assert_eq!(get("test.i16"), &MetaValue::I16(-30000));
    assert_eq!(get("test.u32").as_u64(), Some(4_000_000_000));
    assert_eq!(get("test.i32").as_i64(), Some(-2_000_000_000));
    assert_eq!(get("test.f32").as_f64(), Some(0.15625));
    assert_eq!(get("test.bool"), &MetaValue::Bool(true));
    assert_eq!(
        get("test.string").as_bytes(),
        Some("grüße, gguf".as_bytes())
    );
    assert_eq!(get("test.u64").as_u64(), Some((1 << 63) + 5));
    assert_eq!(get("test.u64").as_i64(), None);
    assert_eq!(get("test.i64").as_i64(), Some(-(1 << 40)));
    assert_eq!(get("test.i64").as_u64(), None);
    assert_eq!(get("test.f64").as_f64(), Some(-2.5e-300));
    let MetaValue::Array { elem: 5, items } = get("test.array_i32") else {
        panic!("array_i32: {:?}", get("test.array_i32"))
    };
    assert_eq!(
        items,
        &[MetaValue::I32(1), MetaValue::I32(-2), MetaValue::I32(3)]
    );
    let MetaValue::Array { elem: 8, items } = get("test.array_str") else {
        panic!("array_str")
    };
    assert_eq!(items[1].as_bytes(), Some(&b"bc"[..]));
    assert_eq!(items[2].as_bytes(), Some(&b""[..]));
    let MetaValue::Array { elem: 9, items } = get("test.nested") else {
        panic!("nested")
    };
    assert_eq!(items.len(), 2);
    assert!(matches!(&items[1], MetaValue::Array { items, .. } if items.len() == 1));
    assert_eq!(
        get("general.architecture").as_bytes(),
        Some(&b"rankfuse-test"[..])
    );
    // The string map (safetensors-style) carries the string-valued keys.
    assert_eq!(w.metadata()["general.architecture"], "rankfuse-test");
    // File order: general.architecture is written first by the package.
    assert_eq!(w.meta()[0].0, "general.architecture");
}

#[test]
fn fused_linear_on_the_quantized_tensors() {
    let (w, r) = open_tiny();
    for name in ["w.q8_0", "w.q4_0", "w.q4_k", "w.q6_k"] {
        let wv = w.get(name).unwrap();
        let x = r.get(&format!("x.{name}")).unwrap();
        let a = r.get(&format!("a.{name}")).unwrap();
        let b = r.get(&format!("b.{name}")).unwrap();
        let bias = r.get(&format!("bias.{name}")).unwrap();
        let want = r.get(&format!("y.{name}")).unwrap().to_f32_vec();
        let slots = [Some(Slot {
            a,
            b,
            scale: 0.5,
            gains: None,
            module: name,
        })];
        let p = LinearProblem {
            x,
            w: wv,
            bias: Some(bias),
            slots: &slots,
            row_slot: None,
        };
        for (isa, rt) in runtimes() {
            let mut y = Matrix::zeros(DType::F32, x.rows, wv.rows).unwrap();
            rt.linear(&p, &mut y.view_mut()).unwrap();
            let what = format!("{} on {name}", isa.name());
            assert_close(&what, &y.to_f32_vec(), &want, 1e-4, 1e-4);
        }
        // Mixed rows (slot, base only, slot) against the reference on the same W.
        let rs = [0, -1, 0];
        let q = LinearProblem {
            row_slot: Some(&rs),
            ..p
        };
        let mut want = Matrix::zeros(DType::F32, x.rows, wv.rows).unwrap();
        reference::linear(&q, &mut want.view_mut());
        for (isa, rt) in runtimes() {
            let mut y = Matrix::zeros(DType::BF16, x.rows, wv.rows).unwrap();
            rt.linear(&q, &mut y.view_mut()).unwrap();
            let what = format!("{} mixed on {name}", isa.name());
            assert_close(&what, &y.to_f32_vec(), &want.to_f32_vec(), 1e-4, 1.6e-2);
        }
    }
}

/// A GGUF file assembled field by field, for the broken-file corpus.
#[derive(Clone)]
struct G {
    version: u32,
    nkv: u64,
    kv: Vec<u8>,
    nt: u64,
    ti: Vec<u8>,
    align: usize,
    data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s);
}

impl G {
    /// Two tensors: "a" F32 2 x 4 at 0 (32 bytes), "b" Q8_0 1 x 32 at 32 (34 bytes).
    fn valid() -> G {
        let mut g = G {
            version: 3,
            nkv: 0,
            kv: Vec::new(),
            nt: 0,
            ti: Vec::new(),
            align: 32,
            data: vec![0u8; 66],
        };
        g.kv_raw(b"general.name", 8, &{
            let mut v = Vec::new();
            put_str(&mut v, b"broken");
            v
        });
        g.tensor(b"a", &[4, 2], 0, 0);
        g.tensor(b"b", &[32, 1], 8, 32);
        g
    }
    fn kv_raw(&mut self, key: &[u8], ty: u32, val: &[u8]) {
        put_str(&mut self.kv, key);
        self.kv.extend(ty.to_le_bytes());
        self.kv.extend(val);
        self.nkv += 1;
    }
    fn tensor(&mut self, name: &[u8], dims: &[u64], ty: u32, off: u64) {
        put_str(&mut self.ti, name);
        self.ti.extend((dims.len() as u32).to_le_bytes());
        for d in dims {
            self.ti.extend(d.to_le_bytes());
        }
        self.ti.extend(ty.to_le_bytes());
        self.ti.extend(off.to_le_bytes());
        self.nt += 1;
    }
    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend(self.nt.to_le_bytes());
        b.extend(self.nkv.to_le_bytes());
        b.extend(&self.kv);
        b.extend(&self.ti);
        b.resize(b.len().next_multiple_of(self.align), 0);
        b.extend(&self.data);
        b
    }
}

fn open(bytes: Vec<u8>) -> rankfuse::Result<Weights> {
    Weights::from_bytes("broken.gguf", bytes)
}

/// The file must be refused as FORMAT with every `words` in the message.
fn refused(what: &str, bytes: Vec<u8>, words: &[&str]) {
    let e = open(bytes)
        .err()
        .unwrap_or_else(|| panic!("{what}: opened"));
    assert_eq!(e.status, Status::Format, "{what}: {e}");
    assert!(e.message.contains("broken.gguf"), "{what}: {e}");
    for w in words {
        assert!(e.message.contains(w), "{what}: '{w}' not in: {e}");
    }
}

#[test]
fn the_corpus_builder_makes_a_valid_file() {
    let w = open(G::valid().bytes()).unwrap();
    assert_eq!(w.get("b").unwrap().dtype, DType::Q8_0);
    assert_eq!((w.get("a").unwrap().rows, w.get("a").unwrap().cols), (2, 4));
}

#[test]
fn broken_files_are_errors() {
    let mut g = G::valid();
    g.version = 1;
    refused("version 1", g.bytes(), &["version"]);
    g.version = 3u32.swap_bytes();
    refused("big-endian", g.bytes(), &["big-endian"]);
    let mut b = G::valid().bytes();
    b[0] = b'X';
    // Without the magic it is not GGUF at all: the safetensors reader refuses it.
    assert!(open(b).is_err());

    let mut g = G::valid();
    g.nt = u64::MAX;
    refused("lying tensor count", g.bytes(), &["tensor count"]);
    let mut g = G::valid();
    g.nkv = 1 << 40;
    refused("lying metadata count", g.bytes(), &["metadata count"]);

    let mut g = G::valid();
    g.kv.clear();
    g.nkv = 0;
    g.kv_raw(b"k", 8, &(u64::MAX - 3).to_le_bytes());
    refused("huge string length", g.bytes(), &["'k'", "string length"]);
    let mut g = G::valid();
    g.kv_raw(b"k", 13, &[0; 8]);
    refused(
        "unknown value type",
        g.bytes(),
        &["'k'", "unknown value type 13"],
    );
    let mut g = G::valid();
    g.kv_raw(b"k", 7, &[2]);
    refused("bool 2", g.bytes(), &["'k'", "bool"]);
    let mut g = G::valid();
    g.kv_raw(b"general.name", 4, &[1, 0, 0, 0]);
    refused("duplicate key", g.bytes(), &["general.name", "twice"]);
    // An array count larger than the bytes left.
    let mut v = 4u32.to_le_bytes().to_vec();
    v.extend((1u64 << 50).to_le_bytes());
    let mut g = G::valid();
    g.kv_raw(b"arr", 9, &v);
    refused("lying array count", g.bytes(), &["'arr'", "count"]);
    // Arrays of arrays: 3 deep is fine, past MAX_DEPTH is refused.
    let nested = |depth: usize| {
        let mut v = Vec::new();
        for _ in 0..depth {
            v.extend(9u32.to_le_bytes());
            v.extend(1u64.to_le_bytes());
        }
        v.extend(0u32.to_le_bytes()); // innermost: an array of u8 ...
        v.extend(1u64.to_le_bytes());
        v.push(7); // ... holding 7
        v
    };
    let mut g = G::valid();
    g.kv_raw(b"deep", 9, &nested(2));
    let w = open(g.bytes()).unwrap();
    assert!(matches!(
        w.meta_get("deep"),
        Some(MetaValue::Array { elem: 9, .. })
    ));
    let mut g = G::valid();
    g.kv_raw(b"deep", 9, &nested(40));
    refused("deep nesting", g.bytes(), &["'deep'", "nested"]);

    // general.alignment must be a positive multiple of 8.
    let mut g = G::valid();
    g.kv_raw(b"general.alignment", 4, &12u32.to_le_bytes());
    refused("alignment 12", g.bytes(), &["general.alignment"]);
    let mut g = G::valid();
    g.kv_raw(b"general.alignment", 8, &{
        let mut v = Vec::new();
        put_str(&mut v, b"32");
        v
    });
    refused("alignment string", g.bytes(), &["general.alignment"]);
    let mut g = G::valid();
    g.kv_raw(b"general.alignment", 4, &64u32.to_le_bytes());
    g.align = 64;
    g.ti.clear();
    g.nt = 0;
    g.tensor(b"a", &[4, 2], 0, 0);
    g.tensor(b"b", &[32, 1], 8, 64);
    g.data = vec![0; 98];
    open(g.bytes()).expect("alignment 64");

    // Tensor table.
    let tensors = |f: &dyn Fn(&mut G)| {
        let mut g = G::valid();
        g.ti.clear();
        g.nt = 0;
        f(&mut g);
        g.bytes()
    };
    let b = tensors(&|g| {
        g.tensor(b"a", &[4, 2], 0, 0);
        g.tensor(b"b", &[32, 1], 8, 36);
    });
    refused("misaligned offset", b, &["'b'", "alignment"]);
    let b = tensors(&|g| {
        g.tensor(b"a", &[4, 2], 0, 0);
        g.tensor(b"b", &[32, 1], 8, 0);
    });
    refused("overlapping tensors", b, &["overlaps"]);
    let b = tensors(&|g| {
        g.tensor(b"a", &[4, 2], 0, 0);
        g.tensor(b"b", &[32, 1], 8, 64);
    });
    refused("data past the end", b, &["'b'", "outside"]);
    let b = tensors(&|g| g.tensor(b"a", &[4, 2], 99, 0));
    refused("unknown ggml type", b, &["'a'", "unknown ggml type id 99"]);
    let b = tensors(&|g| g.tensor(b"a", &[1, 1, 1, 1, 8], 0, 0));
    refused("5 dims", b, &["'a'", "n_dims 5"]);
    let b = tensors(&|g| g.tensor(&[b'n'; 65], &[8], 0, 0));
    refused("long name", b, &["65 bytes"]);
    let b = tensors(&|g| g.tensor(b"a", &[16, 1], 8, 0));
    refused(
        "partial block",
        b,
        &["'a'", "multiple of the 32-element Q8_0 block"],
    );
    let b = tensors(&|g| g.tensor(b"a", &[1 << 32, 1 << 32], 0, 0));
    refused("dims overflow", b, &["'a'", "overflow"]);
    let b = tensors(&|g| g.tensor(b"a", &[1 << 40, 1 << 10], 0, 0));
    refused("huge tensor", b, &["'a'", "outside"]);
    let b = tensors(&|g| {
        g.tensor(b"a", &[4, 2], 0, 0);
        g.tensor(b"a", &[4, 1], 0, 32);
    });
    assert_eq!(
        open(b).err().unwrap().status,
        Status::Format,
        "duplicate name"
    );

    // 3-D tensors are listed but are not matrices; types without a kernel are UNSUPPORTED.
    let b = tensors(&|g| {
        g.tensor(b"t3", &[2, 2, 2], 0, 0);
        g.tensor(b"q5", &[256], 13, 32);
    });
    let mut b = b;
    b.resize(b.len() + 176 - 34, 0);
    let w = open(b).unwrap();
    assert_eq!(w.entry("t3").unwrap().shape, vec![2, 2, 2]);
    assert_eq!(w.get("t3").unwrap_err().status, Status::Format);
    assert_eq!(w.get("q5").unwrap_err().status, Status::Unsupported);
}

#[test]
fn every_truncation_and_byte_flip_is_an_error_or_a_valid_file() {
    let tiny = std::fs::read(fixture("tiny.gguf")).unwrap();
    // The last tensor (v.f32, 40 bytes) ends at byte 4360; the writer pads the file to 4384.
    let end = 4360;
    for n in 0..tiny.len() {
        let r = open(tiny[..n].to_vec());
        assert_eq!(r.is_ok(), n >= end, "prefix of {n} bytes: {:?}", r.err());
    }
    // Flip bytes of the header and tables (the data section only holds values): either an
    // error or a file that still reads; decoding every tensor must not crash either.
    let data_at = 896;
    for i in 4..data_at {
        for v in [0x00u8, 0xFF, 0x80, 0x01] {
            let mut b = tiny.clone();
            if b[i] == v {
                continue;
            }
            b[i] = v;
            if let Ok(w) = open(b) {
                for e in w.entries() {
                    if let Ok(m) = w.get(&e.name) {
                        let _ = m.to_f32_vec();
                    }
                }
            }
        }
    }
}
