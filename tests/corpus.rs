//! The corpus of hostile files (tests/corpus/, written by tests/corpus/make_corpus.py): every
//! case of expected.tsv goes through the C ABI (rf_weights_open / rf_weights_open_ex /
//! rf_weights_get / rf_adapter_load_peft / rf_linear) and must give exactly its status, with a
//! non-empty message naming the file, tensor, module or field at fault. Also: resource limits
//! checked on sparse files made here, and the read-instead-of-map option.

use rankfuse::ffi::adapter::*;
use rankfuse::ffi::error::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::weights::*;
use std::ffi::{c_void, CStr, CString};
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

/// (status name without RF_STATUS_, message); frees the error once.
fn take(e: *mut rf_error) -> (String, String) {
    if e.is_null() {
        return ("OK".into(), String::new());
    }
    // SAFETY: e is an error object returned to us; freed exactly once here.
    unsafe {
        let st = rf_error_code(e);
        let msg = CStr::from_ptr(rf_error_message(e))
            .to_string_lossy()
            .into_owned();
        rf_error_free(e);
        let name = format!("{st:?}");
        (name.trim_start_matches("RF_STATUS_").to_string(), msg)
    }
}

fn cs(p: &Path) -> CString {
    CString::new(p.to_str().unwrap()).unwrap()
}

struct Rt(*mut rf_runtime);
impl Rt {
    fn new() -> Rt {
        let mut rt = null_mut();
        let (st, msg) = take(unsafe { rf_runtime_create(null(), &mut rt) });
        assert_eq!(st, "OK", "{msg}");
        Rt(rt)
    }
}
impl Drop for Rt {
    fn drop(&mut self) {
        unsafe { rf_runtime_free(self.0) };
    }
}

fn open_opts(flags: u32) -> rf_weights_open_options {
    rf_weights_open_options {
        struct_size: std::mem::size_of::<rf_weights_open_options>() as u32,
        flags,
    }
}

/// Opens weights mapped (`flags` 0) or read; returns (status, message, handle or NULL).
fn open(rt: &Rt, path: &Path, flags: u32) -> (String, String, *mut rf_weights) {
    let mut w = null_mut();
    let o = open_opts(flags);
    let (st, msg) = take(unsafe { rf_weights_open_ex(rt.0, cs(path).as_ptr(), &o, &mut w) });
    if st != "OK" {
        assert!(w.is_null(), "out-param written on failure");
    }
    (st, msg, w)
}

fn load_adapter(rt: &Rt, dir: &Path) -> (String, String, *mut rf_adapter) {
    let mut a = null_mut();
    let (st, msg) = take(unsafe { rf_adapter_load_peft(rt.0, cs(dir).as_ptr(), &mut a) });
    if st != "OK" {
        assert!(a.is_null(), "out-param written on failure");
    }
    (st, msg, a)
}

/// Runs one case; returns (status, message).
fn run_case(rt: &Rt, kind: &str, path: &Path, arg: &str) -> (String, String) {
    match kind {
        "weights" => {
            let (st, msg, w) = open(rt, path, 0);
            // Reading instead of mapping must give the same answer.
            let (st2, msg2, w2) = open(rt, path, RF_WEIGHTS_READ);
            assert_eq!(
                (&st, &msg),
                (&st2, &msg2),
                "{}: mapped vs read",
                path.display()
            );
            if !w.is_null() {
                assert_eq!(unsafe { rf_weights_count(w) }, unsafe {
                    rf_weights_count(w2)
                });
            }
            unsafe {
                rf_weights_free(w);
                rf_weights_free(w2);
            }
            (st, msg)
        }
        "get" => {
            let (st, msg, w) = open(rt, path, 0);
            assert_eq!(st, "OK", "{msg}");
            let mut m = rf_matrix {
                data: null_mut(),
                dtype: rf_dtype::RF_DTYPE_F32,
                rows: -7,
                cols: -7,
                ld: -7,
            };
            let name = CString::new(arg).unwrap();
            let r = take(unsafe { rf_weights_get(w, name.as_ptr(), &mut m) });
            if r.0 != "OK" {
                assert_eq!(m.rows, -7, "out-param written on failure");
            }
            unsafe { rf_weights_free(w) };
            r
        }
        "adapter" => {
            let (st, msg, a) = load_adapter(rt, path);
            unsafe { rf_adapter_free(a) };
            (st, msg)
        }
        "linear" => {
            let (tensor, module) = arg.split_once('|').expect("arg is tensor|module");
            let (st, msg, a) = load_adapter(rt, path);
            assert_eq!(st, "OK", "{msg}");
            let (st, msg, w) = open(rt, &corpus().join("base.safetensors"), 0);
            assert_eq!(st, "OK", "{msg}");
            let mut wm = rf_matrix {
                data: null_mut(),
                dtype: rf_dtype::RF_DTYPE_F32,
                rows: 0,
                cols: 0,
                ld: 0,
            };
            let t = CString::new(tensor).unwrap();
            assert_eq!(
                take(unsafe { rf_weights_get(w, t.as_ptr(), &mut wm) }).0,
                "OK"
            );
            let mut l = null_mut();
            let mname = CString::new(module).unwrap();
            assert_eq!(
                take(unsafe { rf_adapter_module(a, mname.as_ptr(), &mut l) }).0,
                "OK"
            );
            let (m, k, n) = (3i64, wm.cols, wm.rows);
            let mut x = vec![0.5f32; (m * k) as usize];
            let mut y = vec![-1f32; (m * n) as usize];
            let xm = rf_matrix {
                data: x.as_mut_ptr() as *mut c_void,
                dtype: rf_dtype::RF_DTYPE_F32,
                rows: m,
                cols: k,
                ld: k,
            };
            let mut ym = rf_matrix {
                data: y.as_mut_ptr() as *mut c_void,
                dtype: rf_dtype::RF_DTYPE_F32,
                rows: m,
                cols: n,
                ld: n,
            };
            let slot = rf_lora_slot {
                lora: l,
                rank: 0,
                scale_mult: 1.0,
            };
            let r = take(unsafe { rf_linear(rt.0, &xm, &wm, null(), &slot, 1, null(), &mut ym) });
            if r.0 != "OK" {
                assert!(y.iter().all(|&v| v == -1.0), "y written by a failing call");
            }
            unsafe {
                rf_weights_free(w);
                rf_adapter_free(a);
            }
            r
        }
        other => panic!("unknown kind '{other}' in expected.tsv"),
    }
}

struct Case {
    kind: String,
    path: String,
    status: String,
    needle: String,
    arg: String,
    note: String,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(corpus().join("expected.tsv")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            assert_eq!(f.len(), 6, "expected.tsv line: {l}");
            Case {
                kind: f[0].into(),
                path: f[1].into(),
                status: f[2].into(),
                needle: f[3].into(),
                arg: f[4].into(),
                note: f[5].into(),
            }
        })
        .collect()
}

#[test]
fn every_corpus_case_gives_its_status_and_names_the_culprit() {
    let rt = Rt::new();
    let cases = cases();
    let bad = cases.iter().filter(|c| c.status != "OK").count();
    assert!(
        bad >= 30,
        "the corpus should hold at least 30 bad cases, has {bad}"
    );
    let mut failures = Vec::new();
    for c in &cases {
        let path = corpus().join(&c.path);
        let (st, msg) = run_case(&rt, &c.kind, &path, &c.arg);
        println!("{:<7} {:<60} {st:<16} {msg}", c.kind, c.path);
        let named = c.status == "OK" || (msg.contains(&c.needle) && !msg.trim().is_empty());
        if st != c.status || !named {
            failures.push(format!(
                "{} {} ({}): expected {} naming '{}', got {st}: {msg}",
                c.kind, c.path, c.note, c.status, c.needle
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

/// Every file under tests/corpus/{weights,index,adapters} belongs to a case (the table and the
/// files stay in step).
#[test]
fn every_corpus_file_is_in_the_table() {
    let cases = cases();
    let listed: Vec<PathBuf> = cases.iter().map(|c| corpus().join(&c.path)).collect();
    fn walk(d: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut files = Vec::new();
    for d in ["weights", "index", "adapters"] {
        walk(&corpus().join(d), &mut files);
    }
    for f in files {
        let covered = listed.iter().any(|l| {
            let index_dir =
                l.to_str().unwrap().ends_with(".index.json") && f.parent() == l.parent();
            f == *l || f.parent() == Some(l.as_path()) || index_dir
        });
        assert!(
            covered,
            "{} is not used by any case of expected.tsv",
            f.display()
        );
    }
}

/// A config larger than the limit is refused from its size alone (a sparse file: no 17 MiB
/// written), as is a sharded index over its limit.
#[test]
fn oversized_config_and_index_are_refused_before_reading() {
    let rt = Rt::new();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("big-config");
    std::fs::create_dir(&dir).unwrap();
    let f = std::fs::File::create(dir.join("adapter_config.json")).unwrap();
    f.set_len(17 << 20).unwrap();
    std::fs::copy(
        corpus().join("adapters/ok/adapter_model.safetensors"),
        dir.join("adapter_model.safetensors"),
    )
    .unwrap();
    let (st, msg, _) = load_adapter(&rt, &dir);
    assert_eq!(st, "FORMAT", "{msg}");
    assert!(
        msg.contains("adapter_config.json") && msg.contains("limit"),
        "{msg}"
    );

    let idx = tmp.path().join("model.safetensors.index.json");
    std::fs::File::create(&idx)
        .unwrap()
        .set_len(65 << 20)
        .unwrap();
    let (st, msg, _) = open(&rt, &idx, 0);
    assert_eq!(st, "FORMAT", "{msg}");
    assert!(
        msg.contains("model.safetensors.index.json") && msg.contains("limit"),
        "{msg}"
    );
}

/// With RF_WEIGHTS_READ the bytes are owned: truncating the file afterwards cannot fault the
/// process (a mapped file would SIGBUS on the next read of the lost pages).
#[test]
fn read_mode_survives_the_file_shrinking() {
    let rt = Rt::new();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("w.safetensors");
    std::fs::copy(corpus().join("base.safetensors"), &p).unwrap();
    let (st, msg, w) = open(&rt, &p, RF_WEIGHTS_READ);
    assert_eq!(st, "OK", "{msg}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(8)
        .unwrap();
    let mut m = rf_matrix {
        data: null_mut(),
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: 0,
        cols: 0,
        ld: 0,
    };
    let t = CString::new("tall.weight").unwrap();
    assert_eq!(
        take(unsafe { rf_weights_get(w, t.as_ptr(), &mut m) }).0,
        "OK"
    );
    // Tensor data in safetensors need not be aligned: read element by element.
    let n = (m.rows * m.cols) as usize;
    let vals: Vec<f32> = (0..n)
        .map(|i| unsafe { (m.data as *const f32).add(i).read_unaligned() })
        .collect();
    assert!(n == 28 && vals.iter().all(|&v| v == 0.25), "{vals:?}");
    unsafe { rf_weights_free(w) };
}

#[test]
fn open_options_are_checked() {
    let rt = Rt::new();
    let p = cs(&corpus().join("weights/ok.safetensors"));
    let mut w = null_mut();
    let mut o = open_opts(0);
    o.struct_size = 4;
    let (st, msg) = take(unsafe { rf_weights_open_ex(rt.0, p.as_ptr(), &o, &mut w) });
    assert_eq!(st, "INVALID_ARGUMENT");
    assert!(msg.contains("struct_size"), "{msg}");
    let o = open_opts(0x80);
    let (st, msg) = take(unsafe { rf_weights_open_ex(rt.0, p.as_ptr(), &o, &mut w) });
    assert_eq!(st, "INVALID_ARGUMENT");
    assert!(msg.contains("flags"), "{msg}");
    assert!(w.is_null());
    // NULL options = rf_weights_open.
    let (st, msg) = take(unsafe { rf_weights_open_ex(rt.0, p.as_ptr(), null(), &mut w) });
    assert_eq!(st, "OK", "{msg}");
    assert_eq!(unsafe { rf_weights_count(w) }, 1);
    unsafe { rf_weights_free(w) };
}

/// RANKFUSE_NO_MMAP=1 makes plain opens read instead of map (the only test here touching the
/// environment; rankfuse reads it through std, which serialises environment access).
#[test]
fn no_mmap_environment_variable() {
    let p = corpus().join("weights/ok.safetensors");
    assert!(rankfuse::Weights::open(&p).unwrap().is_mapped());
    std::env::set_var("RANKFUSE_NO_MMAP", "1");
    let read = rankfuse::Weights::open(&p).unwrap();
    std::env::set_var("RANKFUSE_NO_MMAP", "0");
    let mapped = rankfuse::Weights::open(&p).unwrap();
    std::env::remove_var("RANKFUSE_NO_MMAP");
    assert!(!read.is_mapped());
    assert!(mapped.is_mapped());
}

/// Regression (found by the fuzz targets): f32 data at an address that is not a multiple of 4 —
/// safetensors does not align tensor offsets, and C callers may pass any pointer — was copied
/// with a typed f32 copy, which is undefined behaviour (debug builds abort on it). Now a byte
/// copy; results must equal those from aligned copies of the same values, bit for bit.
#[test]
fn unaligned_f32_data_from_files_and_callers() {
    let rt = Rt::new();
    let (st, msg, w) = open(&rt, &corpus().join("base.safetensors"), 0);
    assert_eq!(st, "OK", "{msg}");
    let mut wm = rf_matrix {
        data: null_mut(),
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: 0,
        cols: 0,
        ld: 0,
    };
    let t = CString::new("q.weight").unwrap();
    assert_eq!(
        take(unsafe { rf_weights_get(w, t.as_ptr(), &mut wm) }).0,
        "OK"
    );
    assert_ne!(
        wm.data as usize % 4,
        0,
        "the corpus base file is meant to have unaligned tensors"
    );
    let (m, n, k) = (3usize, wm.rows as usize, wm.cols as usize);
    // x and y at odd addresses inside byte buffers.
    let xs: Vec<f32> = (0..m * k).map(|i| i as f32 * 0.5 - 1.0).collect();
    let mut xbytes = vec![0u8; m * k * 4 + 1];
    for (i, v) in xs.iter().enumerate() {
        xbytes[1 + 4 * i..5 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    let mut ybytes = vec![0u8; m * n * 4 + 3];
    let xm = rf_matrix {
        data: xbytes[1..].as_mut_ptr() as *mut c_void,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: m as i64,
        cols: k as i64,
        ld: k as i64,
    };
    let mut ym = rf_matrix {
        data: ybytes[3..].as_mut_ptr() as *mut c_void,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: m as i64,
        cols: n as i64,
        ld: n as i64,
    };
    assert_eq!(
        take(unsafe { rf_linear(rt.0, &xm, &wm, null(), null(), 0, null(), &mut ym) }).0,
        "OK"
    );
    // The same with aligned copies.
    let mut xa = xs.clone();
    let mut wa: Vec<f32> = (0..n * k)
        .map(|i| unsafe { (wm.data as *const f32).add(i).read_unaligned() })
        .collect();
    let mut ya = vec![0f32; m * n];
    let xam = rf_matrix {
        data: xa.as_mut_ptr() as *mut c_void,
        ..xm
    };
    let wam = rf_matrix {
        data: wa.as_mut_ptr() as *mut c_void,
        ..wm
    };
    let mut yam = rf_matrix {
        data: ya.as_mut_ptr() as *mut c_void,
        ..ym
    };
    assert_eq!(
        take(unsafe { rf_linear(rt.0, &xam, &wam, null(), null(), 0, null(), &mut yam) }).0,
        "OK"
    );
    for (i, want) in ya.iter().enumerate() {
        let got = f32::from_le_bytes(ybytes[3 + 4 * i..7 + 4 * i].try_into().unwrap());
        assert_eq!(got.to_bits(), want.to_bits(), "y[{i}]");
    }
    unsafe { rf_weights_free(w) };
}

/// Regression (found by fuzz/linear_args): an empty matrix (0 columns) with more than one row and
/// a huge `ld` spans no memory, so it is valid, but kernels formed row pointers `i * ld * size`
/// that overflowed (a panic caught as RF_STATUS_INTERNAL in debug builds, wrapping pointer
/// arithmetic in release). k = 0 must give y = bias; an empty y with any ld must work too.
/// Also (found next): NULL data of an empty f16 matrix reached `slice::from_raw_parts`, which
/// refuses NULL even for length 0.
#[test]
fn empty_matrices_with_any_ld() {
    let rt = Rt::new();
    let (m, n) = (5i64, 3i64);
    let mut yb = vec![-1f32; (m * n) as usize];
    let mut bb = vec![0.5f32, 1.5, 2.5];
    let dt = rf_dtype::RF_DTYPE_F32;
    // NULL data is allowed for empty matrices (an f16 x with NULL data also crashed the f16
    // slice conversion, which refuses NULL even at length 0).
    let cases = [
        (0, rf_dtype::RF_DTYPE_F32),
        (7, rf_dtype::RF_DTYPE_F16),
        (i64::MAX / 8, rf_dtype::RF_DTYPE_BF16),
        (i64::MAX, rf_dtype::RF_DTYPE_F16),
    ];
    for (ld, wdt) in cases {
        let x = rf_matrix {
            data: null_mut(),
            dtype: wdt,
            rows: m,
            cols: 0,
            ld,
        };
        let w = rf_matrix {
            data: null_mut(),
            dtype: wdt,
            rows: n,
            cols: 0,
            ld,
        };
        let b = rf_matrix {
            data: bb.as_mut_ptr() as *mut c_void,
            dtype: dt,
            rows: 1,
            cols: n,
            ld: n,
        };
        let mut y = rf_matrix {
            data: yb.as_mut_ptr() as *mut c_void,
            dtype: dt,
            rows: m,
            cols: n,
            ld: n,
        };
        let (st, msg) = take(unsafe { rf_linear(rt.0, &x, &w, &b, null(), 0, null(), &mut y) });
        assert_eq!(st, "OK", "ld {ld}: {msg}");
        for (i, v) in yb.iter().enumerate() {
            assert_eq!(*v, bb[i % 3], "ld {ld}: y[{i}] must be the bias when k = 0");
        }
        // An empty output (3 x 0) with a huge ld.
        let mut three = [1f32; 3];
        let w0 = rf_matrix {
            data: null_mut(),
            dtype: dt,
            rows: 0,
            cols: 1,
            ld: 1,
        };
        let x3 = rf_matrix {
            data: three.as_mut_ptr() as *mut c_void,
            dtype: dt,
            rows: 3,
            cols: 1,
            ld: 1,
        };
        let mut y0 = rf_matrix {
            data: null_mut(),
            dtype: dt,
            rows: 3,
            cols: 0,
            ld,
        };
        let (st, msg) =
            take(unsafe { rf_linear(rt.0, &x3, &w0, null(), null(), 0, null(), &mut y0) });
        assert_eq!(st, "OK", "empty y, ld {ld}: {msg}");
    }
}
