//! GGUF through the C ABI, called exactly as C does: rf_weights_open on the fixture, the
//! metadata getters (every type, wrong-type and missing-key errors), rf_weights_get of a
//! quantized tensor and rf_linear on it, and the refusals of quantized dtypes elsewhere.

mod common;
use common::capi::{cs, expect, ok};
use rankfuse::ffi::handles::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::meta::*;
use rankfuse::ffi::packed::{
    rf_linear_packed, rf_packed_free, rf_packed_info, rf_packed_info_get, rf_weights_pack,
};
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::types::rf_status::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::weights::*;
use std::ffi::{c_char, c_void, CStr};
use std::ptr::{null, null_mut};

fn open() -> (*mut rf_runtime, *mut rf_weights) {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf/tiny.gguf");
    let mut rt = null_mut();
    ok(unsafe { rf_runtime_create(null(), &mut rt) });
    let mut w = null_mut();
    ok(unsafe { rf_weights_open(rt, cs(path).as_ptr(), &mut w) });
    (rt, w)
}

#[test]
fn metadata_getters() {
    let (rt, w) = open();
    unsafe {
        let n = rf_weights_meta_count(w);
        assert_eq!(n, 16); // general.architecture + 15 test keys
        let mut k: *const c_char = null();
        ok(rf_weights_meta_key(w, 0, &mut k));
        assert_eq!(CStr::from_ptr(k).to_str().unwrap(), "general.architecture");
        expect(
            rf_weights_meta_key(w, n, &mut k),
            RF_STATUS_INVALID_ARGUMENT,
            &["16"],
        );

        let mut t = rf_meta_type::RF_META_ARRAY;
        ok(rf_weights_meta_type(w, cs("test.i16").as_ptr(), &mut t));
        assert_eq!(t, rf_meta_type::RF_META_I16);

        let mut u = 0u64;
        ok(rf_weights_meta_get_u64(w, cs("test.u8").as_ptr(), &mut u));
        assert_eq!(u, 200);
        ok(rf_weights_meta_get_u64(w, cs("test.u64").as_ptr(), &mut u));
        assert_eq!(u, (1 << 63) + 5);
        let mut i = 0i64;
        ok(rf_weights_meta_get_i64(w, cs("test.i32").as_ptr(), &mut i));
        assert_eq!(i, -2_000_000_000);
        // Out-params are untouched on error.
        u = 7;
        expect(
            rf_weights_meta_get_u64(w, cs("test.i64").as_ptr(), &mut u),
            RF_STATUS_DTYPE,
            &["test.i64", "i64"],
        );
        assert_eq!(u, 7);
        expect(
            rf_weights_meta_get_i64(w, cs("test.u64").as_ptr(), &mut i),
            RF_STATUS_DTYPE,
            &["test.u64"],
        );
        let mut f = 0f64;
        ok(rf_weights_meta_get_f64(w, cs("test.f32").as_ptr(), &mut f));
        assert_eq!(f, 0.15625);
        ok(rf_weights_meta_get_f64(w, cs("test.f64").as_ptr(), &mut f));
        assert_eq!(f, -2.5e-300);
        expect(
            rf_weights_meta_get_f64(w, cs("test.string").as_ptr(), &mut f),
            RF_STATUS_DTYPE,
            &["test.string", "string"],
        );
        let mut b = false;
        ok(rf_weights_meta_get_bool(
            w,
            cs("test.bool").as_ptr(),
            &mut b,
        ));
        assert!(b);
        let (mut s, mut len): (*const c_char, usize) = (null(), 0);
        ok(rf_weights_meta_get_str(
            w,
            cs("test.string").as_ptr(),
            &mut s,
            &mut len,
        ));
        assert_eq!(CStr::from_ptr(s).to_str().unwrap(), "grüße, gguf");
        assert_eq!(len, "grüße, gguf".len());
        expect(
            rf_weights_meta_get_str(w, cs("nope").as_ptr(), &mut s, null_mut()),
            RF_STATUS_NOT_FOUND,
            &["nope", "tiny.gguf"],
        );

        let mut et = rf_meta_type::RF_META_U8;
        ok(rf_weights_meta_array_len(
            w,
            cs("test.array_i32").as_ptr(),
            &mut et,
            &mut len,
        ));
        assert_eq!((et, len), (rf_meta_type::RF_META_I32, 3));
        ok(rf_weights_meta_array_get_i64(
            w,
            cs("test.array_i32").as_ptr(),
            1,
            &mut i,
        ));
        assert_eq!(i, -2);
        expect(
            rf_weights_meta_array_get_u64(w, cs("test.array_i32").as_ptr(), 1, &mut u),
            RF_STATUS_DTYPE,
            &["element 1"],
        );
        expect(
            rf_weights_meta_array_get_i64(w, cs("test.array_i32").as_ptr(), 3, &mut i),
            RF_STATUS_INVALID_ARGUMENT,
            &["index 3", "3 elements"],
        );
        ok(rf_weights_meta_array_get_str(
            w,
            cs("test.array_str").as_ptr(),
            1,
            &mut s,
            &mut len,
        ));
        assert_eq!((CStr::from_ptr(s).to_str().unwrap(), len), ("bc", 2));
        ok(rf_weights_meta_array_len(
            w,
            cs("test.nested").as_ptr(),
            &mut et,
            &mut len,
        ));
        assert_eq!((et, len), (rf_meta_type::RF_META_ARRAY, 2));
        expect(
            rf_weights_meta_array_len(w, cs("test.u8").as_ptr(), null_mut(), &mut len),
            RF_STATUS_DTYPE,
            &["test.u8", "array"],
        );
        assert_eq!(rf_weights_meta_count(null()), 0);
        rf_weights_free(w);
        rf_runtime_free(rt);
    }
}

#[test]
fn quantized_tensor_as_w_of_rf_linear_only() {
    let (rt, w) = open();
    unsafe {
        let mut wm: rf_matrix = std::mem::zeroed();
        ok(rf_weights_get(w, cs("w.q4_0").as_ptr(), &mut wm));
        assert_eq!(wm.dtype, rf_dtype::RF_DTYPE_Q4_0);
        assert_eq!((wm.rows, wm.cols, wm.ld), (7, 64, 64));
        let mut x = vec![0.25f32; 2 * 64];
        let mut y = vec![0f32; 2 * 7];
        let xm = rf_matrix {
            data: x.as_mut_ptr() as *mut c_void,
            dtype: rf_dtype::RF_DTYPE_F32,
            rows: 2,
            cols: 64,
            ld: 64,
        };
        let mut ym = rf_matrix {
            data: y.as_mut_ptr() as *mut c_void,
            dtype: rf_dtype::RF_DTYPE_F32,
            rows: 2,
            cols: 7,
            ld: 7,
        };
        ok(rf_linear(rt, &xm, &wm, null(), null(), 0, null(), &mut ym));
        assert!(y.iter().any(|&v| v != 0.0));
        // y = 0.25 * row sums of the dequantized W.
        let r = rankfuse::Weights::open(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gguf/tiny.ref.safetensors"
        ))
        .unwrap();
        let wr = r.get("w.q4_0").unwrap();
        for j in 0..7 {
            let want: f32 = (0..64).map(|c| 0.25 * wr.get(j, c)).sum();
            assert!((y[j] - want).abs() < 1e-4, "{j}: {} vs {want}", y[j]);
            assert_eq!(y[7 + j], y[j]);
        }
        // Quantized as x: DTYPE. Columns not whole blocks: SHAPE.
        expect(
            rf_linear(rt, &wm, &wm, null(), null(), 0, null(), &mut ym),
            RF_STATUS_DTYPE,
            &["x", "Q4_0"],
        );
        // Packed (8-row interleaved blocks, the same bytes plus a padding row to 8): the
        // same y; the K-quants are not packed.
        let mut pk = null_mut();
        ok(rf_weights_pack(rt, &wm, &mut pk));
        let mut info: rf_packed_info = std::mem::zeroed();
        ok(rf_packed_info_get(pk, &mut info));
        assert_eq!(info.dtype, rf_dtype::RF_DTYPE_Q4_0);
        assert_eq!(
            (info.rows, info.cols, info.bytes),
            (7, 64, 2 * (16 + 8 * 16))
        );
        let mut yp = vec![0f32; 2 * 7];
        let mut ypm = rf_matrix {
            data: yp.as_mut_ptr() as *mut c_void,
            ..ym
        };
        ok(rf_linear_packed(
            rt,
            &xm,
            pk,
            null(),
            null(),
            0,
            null(),
            &mut ypm,
        ));
        for (a, b) in yp.iter().zip(&y) {
            assert!(
                (a - b).abs() <= 1e-5 * b.abs().max(1.0),
                "packed {a} vs {b}"
            );
        }
        rf_packed_free(pk);
        let mut wk: rf_matrix = std::mem::zeroed();
        ok(rf_weights_get(w, cs("w.q4_k").as_ptr(), &mut wk));
        let mut pk = null_mut();
        expect(
            rf_weights_pack(rt, &wk, &mut pk),
            RF_STATUS_DTYPE,
            &["Q4_K"],
        );
        assert!(pk.is_null());
        let bad = rf_matrix {
            cols: 48,
            ld: 48,
            ..wm
        };
        expect(
            rf_linear(rt, &xm, &bad, null(), null(), 0, null(), &mut ym),
            RF_STATUS_SHAPE,
            &["w", "block"],
        );
        // RF_ACT_QUANT_Q8: x = 0.25 everywhere quantizes exactly (d = 0.25 / 127, q = 127),
        // so the Q8 runtime's integer dots give the exact result too, up to rounding.
        let opts = rf_runtime_options {
            struct_size: std::mem::size_of::<rf_runtime_options>() as u32,
            device: rf_device::RF_DEVICE_CPU,
            device_index: 0,
            num_threads: 2,
            cuda_stream: std::ptr::null_mut(),
            act_quant: rf_act_quant::RF_ACT_QUANT_Q8,
        };
        let mut rq = std::ptr::null_mut();
        ok(rf_runtime_create(&opts, &mut rq));
        let exact = y.clone();
        ok(rf_linear(rq, &xm, &wm, null(), null(), 0, null(), &mut ym));
        for (g, e) in y.iter().zip(&exact) {
            assert!((g - e).abs() <= 1e-5 * e.abs().max(1.0), "{g} vs {e}");
        }
        rf_runtime_free(rq);
        rf_weights_free(w);
        rf_runtime_free(rt);
    }
}
