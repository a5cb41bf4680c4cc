//! Bad input through the C ABI, one test per case: each returns a specific status and a message
//! naming the culprit, never a crash. Calls the exported functions exactly as C does.

mod common;
use common::capi::{cs, expect, ok, take};
use common::fixture;
use rankfuse::ffi::adapter::*;
use rankfuse::ffi::error::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::types::rf_status::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::weights::*;
use std::ffi::{c_void, CStr, CString};
use std::path::Path;
use std::ptr::{null, null_mut};

fn runtime() -> *mut rf_runtime {
    let mut rt = null_mut();
    ok(unsafe { rf_runtime_create(null(), &mut rt) });
    rt
}

fn mat(v: &mut [f32], rows: i64, cols: i64) -> rf_matrix {
    rf_matrix {
        data: v.as_mut_ptr() as *mut c_void,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows,
        cols,
        ld: cols,
    }
}

struct Fx {
    rt: *mut rf_runtime,
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    y: Vec<f32>,
}

impl Fx {
    fn new() -> Fx {
        Fx {
            rt: runtime(),
            x: vec![0.5; 3 * 4],
            w: vec![0.25; 5 * 4],
            b: vec![1.0; 5],
            y: vec![0.0; 3 * 5],
        }
    }
    fn call(
        &mut self,
        f: impl FnOnce(&mut rf_matrix, &mut rf_matrix, &mut rf_matrix, &mut rf_matrix),
    ) -> *mut rf_error {
        let (mut x, mut w, mut b, mut y) = (
            mat(&mut self.x, 3, 4),
            mat(&mut self.w, 5, 4),
            mat(&mut self.b, 1, 5),
            mat(&mut self.y, 3, 5),
        );
        f(&mut x, &mut w, &mut b, &mut y);
        unsafe { rf_linear(self.rt, &x, &w, &b, null(), 0, null(), &mut y) }
    }
}

impl Drop for Fx {
    fn drop(&mut self) {
        unsafe { rf_runtime_free(self.rt) };
    }
}

#[test]
fn linear_ok_baseline() {
    let mut f = Fx::new();
    ok(f.call(|_, _, _, _| {}));
    assert!(f.y.iter().all(|&v| (v - 1.5).abs() < 1e-6));
}

#[test]
fn null_runtime_and_matrices() {
    let mut f = Fx::new();
    let (mut x, w, mut y) = (
        mat(&mut f.x, 3, 4),
        mat(&mut f.w, 5, 4),
        mat(&mut f.y, 3, 5),
    );
    expect(
        unsafe { rf_linear(null_mut(), &x, &w, null(), null(), 0, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'rt'"],
    );
    expect(
        unsafe { rf_linear(f.rt, null(), &w, null(), null(), 0, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'x'"],
    );
    expect(
        unsafe { rf_linear(f.rt, &x, null(), null(), null(), 0, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'w'"],
    );
    expect(
        unsafe { rf_linear(f.rt, &x, &w, null(), null(), 0, null(), null_mut()) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'y'"],
    );
    expect(
        unsafe { rf_linear(f.rt, &x, &w, null(), null(), 2, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'slots'"],
    );
    x.data = null_mut();
    expect(
        unsafe { rf_linear(f.rt, &x, &w, null(), null(), 0, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["x: data is NULL"],
    );
    let mut out = null_mut();
    expect(
        unsafe { rf_runtime_create(null(), null_mut()) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'out'"],
    );
    expect(
        unsafe { rf_weights_open(null_mut(), cs("x").as_ptr(), &mut out) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'rt'"],
    );
    expect(
        unsafe { rf_weights_open(f.rt, null(), &mut out) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'path'"],
    );
    assert!(out.is_null(), "out-params are written only on success");
    unsafe {
        rf_runtime_free(null_mut());
        rf_weights_free(null_mut());
        rf_adapter_free(null_mut());
        rf_error_free(null_mut());
        assert_eq!(rf_error_code(null()), RF_STATUS_OK);
        assert_eq!(rf_weights_count(null()), 0);
        assert_eq!(rf_adapter_module_count(null()), 0);
    }
}

#[test]
fn shape_mismatches_name_the_matrix() {
    let mut f = Fx::new();
    expect(
        f.call(|x, _, _, _| x.cols = 3),
        RF_STATUS_SHAPE,
        &["w has 4 columns, x has 3"],
    );
    expect(
        f.call(|_, _, _, y| y.rows = 2),
        RF_STATUS_SHAPE,
        &["y is 2 x 5"],
    );
    expect(
        f.call(|_, _, b, _| b.cols = 4),
        RF_STATUS_SHAPE,
        &["bias is 1 x 4"],
    );
    expect(
        f.call(|_, _, b, _| b.rows = 2),
        RF_STATUS_SHAPE,
        &["bias is 2 x 5"],
    );
    expect(
        f.call(|x, _, _, _| x.rows = -1),
        RF_STATUS_SHAPE,
        &["x: negative shape"],
    );
}

#[test]
fn ld_less_than_cols() {
    let mut f = Fx::new();
    expect(
        f.call(|x, _, _, _| x.ld = 3),
        RF_STATUS_SHAPE,
        &["x: ld 3 < cols 4"],
    );
    expect(
        f.call(|_, w, _, _| w.ld = 1),
        RF_STATUS_SHAPE,
        &["w: ld 1 < cols 4"],
    );
}

#[test]
fn invalid_dtype_number() {
    let mut f = Fx::new();
    let e = f.call(|x, _, _, _| unsafe {
        // Write an out-of-range number the way a C caller can.
        (std::ptr::addr_of_mut!(x.dtype) as *mut i32).write(7);
    });
    expect(e, RF_STATUS_DTYPE, &["x: dtype 7"]);
}

#[test]
fn y_overlapping_an_input_is_refused() {
    let mut f = Fx::new();
    let mut buf = vec![0.5f32; 64];
    let x = mat(&mut buf, 3, 4);
    let w = mat(&mut f.w, 5, 4);
    let mut y = rf_matrix {
        data: x.data,
        ..mat(&mut f.y, 3, 5)
    };
    expect(
        unsafe { rf_linear(f.rt, &x, &w, null(), null(), 0, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["y overlaps x"],
    );
}

fn adapter(rt: *mut rf_runtime, name: &str) -> *mut rf_adapter {
    let mut a = null_mut();
    let dir = cs(fixture(&format!("adapters/{name}")).to_str().unwrap());
    ok(unsafe { rf_adapter_load_peft(rt, dir.as_ptr(), &mut a) });
    a
}

fn module(a: *mut rf_adapter, m: &str) -> *mut rf_lora {
    let mut l = null_mut();
    ok(unsafe { rf_adapter_module(a, cs(m).as_ptr(), &mut l) });
    l
}

#[test]
fn rank_above_capacity_and_row_slot_out_of_range() {
    let rt = runtime();
    let a = adapter(rt, "lora-r8");
    let l = module(a, "layers.0.self_attn.q_proj"); // 256 -> 64
    let (mut x, mut w, mut y) = (
        vec![0.1f32; 2 * 256],
        vec![0.1f32; 64 * 256],
        vec![0f32; 2 * 64],
    );
    let (xm, wm, mut ym) = (
        mat(&mut x, 2, 256),
        mat(&mut w, 64, 256),
        mat(&mut y, 2, 64),
    );
    let slots = [rf_lora_slot {
        lora: l,
        rank: 9,
        scale_mult: 1.0,
    }];
    expect(
        unsafe { rf_linear(rt, &xm, &wm, null(), slots.as_ptr(), 1, null(), &mut ym) },
        RF_STATUS_INVALID_ARGUMENT,
        &[
            "slot 0",
            "rank 9 exceeds capacity 8",
            "layers.0.self_attn.q_proj",
        ],
    );
    let slots = [rf_lora_slot {
        lora: l,
        rank: 0,
        scale_mult: 1.0,
    }];
    let rows = [0i32, 1];
    expect(
        unsafe {
            rf_linear(
                rt,
                &xm,
                &wm,
                null(),
                slots.as_ptr(),
                1,
                rows.as_ptr(),
                &mut ym,
            )
        },
        RF_STATUS_INVALID_ARGUMENT,
        &["row_slot[1] = 1"],
    );
    let rows = [0i32, -2];
    expect(
        unsafe {
            rf_linear(
                rt,
                &xm,
                &wm,
                null(),
                slots.as_ptr(),
                1,
                rows.as_ptr(),
                &mut ym,
            )
        },
        RF_STATUS_INVALID_ARGUMENT,
        &["row_slot[1] = -2"],
    );
    let rows = [0i32, -1];
    ok(unsafe {
        rf_linear(
            rt,
            &xm,
            &wm,
            null(),
            slots.as_ptr(),
            1,
            rows.as_ptr(),
            &mut ym,
        )
    });
    let slots = [rf_lora_slot {
        lora: l,
        rank: 0,
        scale_mult: f32::NAN,
    }];
    expect(
        unsafe { rf_linear(rt, &xm, &wm, null(), slots.as_ptr(), 1, null(), &mut ym) },
        RF_STATUS_INVALID_ARGUMENT,
        &["scale_mult"],
    );
    expect(
        unsafe { rf_lora_set_rank(l, 0) },
        RF_STATUS_INVALID_ARGUMENT,
        &["rank 0", "1..=8"],
    );
    expect(
        unsafe { rf_lora_set_rank(l, 9) },
        RF_STATUS_INVALID_ARGUMENT,
        &["rank 9"],
    );
    unsafe {
        rf_adapter_free(a);
        rf_runtime_free(rt);
    }
}

#[test]
fn adapter_module_disagreeing_with_base_weight() {
    let rt = runtime();
    let a = adapter(rt, "lora-r8");
    let l = module(a, "layers.0.mlp.up_proj"); // 256 -> 172
    let mut wts = null_mut();
    ok(unsafe {
        rf_weights_open(
            rt,
            cs(fixture("base.safetensors").to_str().unwrap()).as_ptr(),
            &mut wts,
        )
    });
    let mut w = rf_matrix {
        data: null_mut(),
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: 0,
        cols: 0,
        ld: 0,
    };
    // down_proj is 172 -> 256: the adapter's A has 256 columns, x has 172.
    ok(unsafe { rf_weights_get(wts, cs("layers.0.mlp.down_proj.weight").as_ptr(), &mut w) });
    let (mut x, mut y) = (vec![0.1f32; 172], vec![0f32; 256]);
    let (xm, mut ym) = (mat(&mut x, 1, 172), mat(&mut y, 1, 256));
    let slots = [rf_lora_slot {
        lora: l,
        rank: 0,
        scale_mult: 1.0,
    }];
    expect(
        unsafe { rf_linear(rt, &xm, &w, null(), slots.as_ptr(), 1, null(), &mut ym) },
        RF_STATUS_SHAPE,
        &["slot 0", "layers.0.mlp.up_proj", "lora_A has 256 columns"],
    );
    // gate_proj has the right in_features but other out_features? up/gate are both 256->172; use q_proj (256 -> 64).
    ok(unsafe { rf_weights_get(wts, cs("layers.0.self_attn.q_proj.weight").as_ptr(), &mut w) });
    let (mut x, mut y) = (vec![0.1f32; 256], vec![0f32; 64]);
    let (xm, mut ym) = (mat(&mut x, 1, 256), mat(&mut y, 1, 64));
    expect(
        unsafe { rf_linear(rt, &xm, &w, null(), slots.as_ptr(), 1, null(), &mut ym) },
        RF_STATUS_SHAPE,
        &["lora_B has 172 rows", "w has 64"],
    );
    unsafe {
        rf_weights_free(wts);
        rf_adapter_free(a);
        rf_runtime_free(rt);
    }
}

/// Writes a safetensors file from a raw header and data.
fn st_file(
    dir: &Path,
    name: &str,
    header: &str,
    data_len: usize,
    declared_len: Option<u64>,
) -> CString {
    let mut bytes = Vec::new();
    bytes.extend_from_slice(&declared_len.unwrap_or(header.len() as u64).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    cs(p.to_str().unwrap())
}

fn open_err(rt: *mut rf_runtime, path: &CString) -> *mut rf_error {
    let mut w = null_mut();
    let e = unsafe { rf_weights_open(rt, path.as_ptr(), &mut w) };
    assert!(w.is_null() || e.is_null());
    unsafe { rf_weights_free(w) };
    e
}

#[test]
fn corrupt_safetensors_files() {
    let rt = runtime();
    let d = tempfile::tempdir().unwrap();
    let good = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}"#;
    ok(open_err(
        rt,
        &st_file(d.path(), "good.safetensors", good, 16, None),
    ));
    expect(
        open_err(
            rt,
            &st_file(d.path(), "hdr.safetensors", good, 16, Some(1 << 40)),
        ),
        RF_STATUS_FORMAT,
        &["hdr.safetensors"],
    );
    expect(
        open_err(rt, &st_file(d.path(), "short.safetensors", good, 8, None)),
        RF_STATUS_FORMAT,
        &["short.safetensors"],
    );
    let oob = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,64]}}"#;
    expect(
        open_err(rt, &st_file(d.path(), "oob.safetensors", oob, 16, None)),
        RF_STATUS_FORMAT,
        &["oob.safetensors", "'a'"],
    );
    let overlap = r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#;
    expect(
        open_err(
            rt,
            &st_file(d.path(), "overlap.safetensors", overlap, 24, None),
        ),
        RF_STATUS_FORMAT,
        &["overlap", "'a'", "'b'"],
    );
    let badlen = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,16]}}"#;
    expect(
        open_err(
            rt,
            &st_file(d.path(), "badlen.safetensors", badlen, 16, None),
        ),
        RF_STATUS_FORMAT,
        &["'a'", "16 bytes", "24 expected"],
    );
    let overflow =
        r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#;
    expect(
        open_err(
            rt,
            &st_file(d.path(), "overflow.safetensors", overflow, 16, None),
        ),
        RF_STATUS_FORMAT,
        &["overflow.safetensors"],
    );
    expect(
        open_err(
            rt,
            &st_file(d.path(), "json.safetensors", "{not json", 0, None),
        ),
        RF_STATUS_FORMAT,
        &["json.safetensors"],
    );
    std::fs::write(d.path().join("tiny.safetensors"), [1u8, 2, 3]).unwrap();
    expect(
        open_err(rt, &cs(d.path().join("tiny.safetensors").to_str().unwrap())),
        RF_STATUS_FORMAT,
        &["tiny.safetensors"],
    );
    expect(
        open_err(
            rt,
            &cs(d.path().join("absent.safetensors").to_str().unwrap()),
        ),
        RF_STATUS_NOT_FOUND,
        &["absent.safetensors"],
    );
    unsafe { rf_runtime_free(rt) };
}

#[test]
fn tensor_lookup_errors() {
    let rt = runtime();
    let d = tempfile::tempdir().unwrap();
    let h = r#"{"i":{"dtype":"I64","shape":[2],"data_offsets":[0,16]},"t":{"dtype":"F32","shape":[1,2,2],"data_offsets":[16,32]},"v":{"dtype":"BF16","shape":[4],"data_offsets":[32,40]}}"#;
    let p = st_file(d.path(), "mixed.safetensors", h, 40, None);
    let mut w = null_mut();
    ok(unsafe { rf_weights_open(rt, p.as_ptr(), &mut w) });
    let mut m = rf_matrix {
        data: null_mut(),
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: 0,
        cols: 0,
        ld: 0,
    };
    expect(
        unsafe { rf_weights_get(w, cs("i").as_ptr(), &mut m) },
        RF_STATUS_UNSUPPORTED,
        &["'i'", "I64"],
    );
    expect(
        unsafe { rf_weights_get(w, cs("t").as_ptr(), &mut m) },
        RF_STATUS_FORMAT,
        &["'t'", "[1, 2, 2]"],
    );
    expect(
        unsafe { rf_weights_get(w, cs("nope").as_ptr(), &mut m) },
        RF_STATUS_NOT_FOUND,
        &["'nope'", "mixed.safetensors"],
    );
    ok(unsafe { rf_weights_get(w, cs("v").as_ptr(), &mut m) });
    assert_eq!((m.rows, m.cols, m.dtype), (1, 4, rf_dtype::RF_DTYPE_BF16));
    assert_eq!(unsafe { rf_weights_count(w) }, 3);
    let mut name = null();
    expect(
        unsafe { rf_weights_name(w, 3, &mut name) },
        RF_STATUS_INVALID_ARGUMENT,
        &["index 3"],
    );
    ok(unsafe { rf_weights_name(w, 0, &mut name) });
    assert_eq!(unsafe { CStr::from_ptr(name) }.to_str().unwrap(), "i");
    unsafe {
        rf_weights_free(w);
        rf_runtime_free(rt);
    }
}

/// Copies a fixture adapter into a temp dir with its config rewritten by `edit`.
fn adapter_variant(
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let src = fixture("adapters/rslora-pattern");
    std::fs::copy(
        src.join("adapter_model.safetensors"),
        d.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&std::fs::read(src.join("adapter_config.json")).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(
        d.path().join("adapter_config.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    d
}

fn load_err(dir: &Path) -> *mut rf_error {
    let rt = runtime();
    let mut a = null_mut();
    let e = unsafe { rf_adapter_load_peft(rt, cs(dir.to_str().unwrap()).as_ptr(), &mut a) };
    unsafe {
        rf_adapter_free(a);
        rf_runtime_free(rt);
    }
    e
}

#[test]
fn adapter_config_errors() {
    let d = tempfile::tempdir().unwrap();
    expect(
        load_err(d.path()),
        RF_STATUS_NOT_FOUND,
        &["adapter_config.json"],
    );
    std::fs::write(d.path().join("adapter_config.json"), "{\"r\": 8,").unwrap();
    expect(
        load_err(d.path()),
        RF_STATUS_FORMAT,
        &["adapter_config.json", "invalid JSON"],
    );
    std::fs::write(d.path().join("adapter_config.json"), "{\"r\": 8}").unwrap();
    expect(
        load_err(d.path()),
        RF_STATUS_NOT_FOUND,
        &["adapter_model.safetensors"],
    );
    std::fs::write(d.path().join("adapter_model.bin"), "pickle").unwrap();
    expect(
        load_err(d.path()),
        RF_STATUS_UNSUPPORTED,
        &["adapter_model.bin"],
    );

    let v = adapter_variant(|c| {
        c.insert("rank_pattern".into(), serde_json::json!({"layers.(0": 4}));
    });
    expect(
        load_err(v.path()),
        RF_STATUS_FORMAT,
        &["rank_pattern", "layers.(0"],
    );
    let v = adapter_variant(|c| {
        c.insert("r".into(), serde_json::json!("eight"));
    });
    expect(load_err(v.path()), RF_STATUS_FORMAT, &["'r'"]);
    let v = adapter_variant(|c| {
        c.insert("lora_alpha".into(), serde_json::json!(null));
    });
    expect(load_err(v.path()), RF_STATUS_FORMAT, &["'lora_alpha'"]);
    let v = adapter_variant(|c| {
        c.insert("use_dora".into(), serde_json::json!(true));
    });
    expect(load_err(v.path()), RF_STATUS_UNSUPPORTED, &["'use_dora'"]);
    let v = adapter_variant(|c| {
        c.insert("peft_type".into(), serde_json::json!("ADALORA"));
    });
    expect(load_err(v.path()), RF_STATUS_UNSUPPORTED, &["'peft_type'"]);
    let v = adapter_variant(|c| {
        c.insert("init_lora_weights".into(), serde_json::json!("pissa"));
    });
    expect(
        load_err(v.path()),
        RF_STATUS_UNSUPPORTED,
        &["'init_lora_weights'"],
    );
    // The config's r disagrees with the tensors.
    let v = adapter_variant(|c| {
        c.insert("rank_pattern".into(), serde_json::json!({}));
    });
    expect(
        load_err(v.path()),
        RF_STATUS_SHAPE,
        &["layers.0.mlp.down_proj", "r = 8"],
    );
}

#[test]
fn options_struct_size_and_devices() {
    let mut rt = null_mut();
    let mut o = rf_runtime_options {
        struct_size: 4,
        device: rf_device::RF_DEVICE_CPU,
        device_index: 0,
        num_threads: 1,
        cuda_stream: null_mut(),
        act_quant: rf_act_quant::RF_ACT_QUANT_EXACT,
    };
    expect(
        unsafe { rf_runtime_create(&o, &mut rt) },
        RF_STATUS_INVALID_ARGUMENT,
        &["struct_size = 4"],
    );
    // A host built against the 0.1 layout (ending at cuda_stream) still creates runtimes; the
    // field past its struct_size is not read (garbage there must not matter).
    o.struct_size = std::mem::offset_of!(rf_runtime_options, act_quant) as u32;
    unsafe { (std::ptr::addr_of_mut!(o.act_quant) as *mut i32).write(77) };
    ok(unsafe { rf_runtime_create(&o, &mut rt) });
    unsafe { rf_runtime_free(rt) };
    rt = null_mut();
    o.struct_size = std::mem::size_of::<rf_runtime_options>() as u32;
    expect(
        unsafe { rf_runtime_create(&o, &mut rt) },
        RF_STATUS_INVALID_ARGUMENT,
        &["act_quant = 77"],
    );
    assert!(rt.is_null());
    o.act_quant = rf_act_quant::RF_ACT_QUANT_Q8;
    unsafe { (std::ptr::addr_of_mut!(o.device) as *mut i32).write(9) };
    expect(
        unsafe { rf_runtime_create(&o, &mut rt) },
        RF_STATUS_INVALID_ARGUMENT,
        &["device = 9"],
    );
    o.device = rf_device::RF_DEVICE_CUDA;
    let e = unsafe { rf_runtime_create(&o, &mut rt) };
    let (st, msg) = take(e);
    assert!(
        matches!(st, RF_STATUS_UNSUPPORTED | RF_STATUS_DEVICE),
        "{st:?}: {msg}"
    );
    assert!(rt.is_null());
    o.device = rf_device::RF_DEVICE_CPU;
    ok(unsafe { rf_runtime_create(&o, &mut rt) });
    let mut len = 0usize;
    ok(unsafe { rf_runtime_info(rt, null_mut(), 0, &mut len) });
    let mut buf = vec![0 as std::ffi::c_char; len + 1];
    expect(
        unsafe { rf_runtime_info(rt, buf.as_mut_ptr(), len, &mut len) },
        RF_STATUS_INVALID_ARGUMENT,
        &["cap"],
    );
    ok(unsafe { rf_runtime_info(rt, buf.as_mut_ptr(), len + 1, &mut len) });
    let json: serde_json::Value =
        serde_json::from_str(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap()).unwrap();
    assert_eq!(json["threads"], 1);
    assert!(json["kernels"]["linear"]
        .as_str()
        .unwrap()
        .starts_with("fused_linear_"));
    unsafe { rf_runtime_free(rt) };
    assert_eq!(rf_abi_version(), RF_ABI_VERSION);
    assert_eq!(
        unsafe { CStr::from_ptr(rf_version()) }.to_str().unwrap(),
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn adapter_listing_and_missing_module() {
    let rt = runtime();
    let a = adapter(rt, "rslora-pattern");
    assert_eq!(unsafe { rf_adapter_module_count(a) }, 14);
    let mut name = null();
    ok(unsafe { rf_adapter_module_name(a, 0, &mut name) });
    assert_eq!(
        unsafe { CStr::from_ptr(name) }.to_str().unwrap(),
        "layers.0.mlp.down_proj"
    );
    expect(
        unsafe { rf_adapter_module_name(a, 14, &mut name) },
        RF_STATUS_INVALID_ARGUMENT,
        &["index 14"],
    );
    let mut l = null_mut();
    expect(
        unsafe { rf_adapter_module(a, cs("layers.9.mlp.up_proj").as_ptr(), &mut l) },
        RF_STATUS_NOT_FOUND,
        &["layers.9.mlp.up_proj", "rslora-pattern"],
    );
    let l = module(a, "layers.0.self_attn.q_proj");
    let mut info = std::mem::MaybeUninit::<rf_lora_info>::uninit();
    ok(unsafe { rf_lora_info_get(l, info.as_mut_ptr()) });
    let info = unsafe { info.assume_init() };
    assert_eq!(
        (
            info.in_features,
            info.out_features,
            info.capacity,
            info.rank
        ),
        (256, 64, 4, 4)
    );
    assert_eq!(
        (info.alpha, info.scale, info.scaling),
        (16.0, 8.0, rf_scaling::RF_SCALING_RSLORA)
    );
    expect(
        unsafe { rf_lora_info_get(null(), std::ptr::null_mut()) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'l'"],
    );
    unsafe {
        rf_adapter_free(a);
        rf_runtime_free(rt);
    }
}

/// `rf_weights_pack` + `rf_linear_packed`: the pack owns a copy (the source may change or go),
/// reports its shape and layout, and gives rf_linear's result; bad arguments name themselves.
#[test]
fn packed_weights_through_the_c_abi() {
    use rankfuse::ffi::packed::*;
    let mut f = Fx::new();
    for (i, v) in f.w.iter_mut().enumerate() {
        *v = (i as f32 * 0.37).sin();
    }
    ok(f.call(|_, _, _, _| {}));
    let want = f.y.clone();
    let w = mat(&mut f.w, 5, 4);
    let mut p: *mut rf_packed = null_mut();
    ok(unsafe { rf_weights_pack(f.rt, &w, &mut p) });
    f.w.fill(f32::NAN); // the pack is a copy
    let mut info = std::mem::MaybeUninit::<rf_packed_info>::uninit();
    ok(unsafe { rf_packed_info_get(p, info.as_mut_ptr()) });
    let info = unsafe { info.assume_init() };
    assert_eq!(
        (info.rows, info.cols, info.dtype),
        (5, 4, rf_dtype::RF_DTYPE_F32)
    );
    let pc = info.panel_cols as usize;
    assert!(
        pc >= 4 && info.bytes == 5usize.div_ceil(pc) * pc * 4 * 4,
        "{info:?}"
    );
    let kernels = unsafe { CStr::from_ptr(info.kernels) }.to_str().unwrap();
    let mut json = vec![0 as std::ffi::c_char; 4096];
    let mut len = 0;
    ok(unsafe { rf_runtime_info(f.rt, json.as_mut_ptr(), json.len(), &mut len) });
    let json = unsafe { CStr::from_ptr(json.as_ptr()) }.to_str().unwrap();
    assert!(
        json.contains(&format!("\"isa\":\"{kernels}\"")),
        "{kernels} vs {json}"
    );

    let (x, b) = (mat(&mut f.x, 3, 4), mat(&mut f.b, 1, 5));
    f.y.fill(0.0);
    let mut y = mat(&mut f.y, 3, 5);
    ok(unsafe { rf_linear_packed(f.rt, &x, p, &b, null(), 0, null(), &mut y) });
    for (g, w) in f.y.iter().zip(&want) {
        assert!((g - w).abs() <= 1e-6, "{g} vs {w}");
    }
    // Shapes are checked against the pack's.
    let mut x5 = vec![0f32; 15];
    let x5m = mat(&mut x5, 3, 5);
    expect(
        unsafe { rf_linear_packed(f.rt, &x5m, p, &b, null(), 0, null(), &mut y) },
        RF_STATUS_SHAPE,
        &["w has 4 columns", "x has 5"],
    );
    expect(
        unsafe { rf_linear_packed(f.rt, &x, null(), &b, null(), 0, null(), &mut y) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'w'"],
    );
    expect(
        unsafe { rf_weights_pack(f.rt, &w, null_mut()) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'out'"],
    );
    expect(
        unsafe { rf_packed_info_get(null(), info_ptr()) },
        RF_STATUS_INVALID_ARGUMENT,
        &["'packed'"],
    );
    unsafe { rf_packed_free(p) };
    unsafe { rf_packed_free(null_mut()) };
}

fn info_ptr() -> *mut rankfuse::ffi::packed::rf_packed_info {
    std::ptr::NonNull::dangling().as_ptr()
}
