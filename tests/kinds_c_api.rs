//! The module-kind calls of the C ABI on bad input and misuse: each returns its status and a
//! message naming the culprit (NULLs, shapes, gains on a KRAdapter, mixed kinds in one folder,
//! ranks past the basis, a wrong slot shape in rf_linear, a corrupted basis folder).

mod common;
use common::capi::{cs, expect, ok};
use rankfuse::ffi::adapter::*;
use rankfuse::ffi::algebra::*;
use rankfuse::ffi::handles::*;
use rankfuse::ffi::kinds::*;
use rankfuse::ffi::linear::rf_linear;
use rankfuse::ffi::runtime::*;
use rankfuse::ffi::train::*;
use rankfuse::ffi::types::rf_status::*;
use rankfuse::ffi::types::*;
use std::ffi::c_void;
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

/// A LoRA source adapter with non-zero B (one module "m", 12 -> 10, capacity 4).
unsafe fn source(seed: u64) -> *mut rf_adapter {
    let mut a = null_mut();
    ok(rf_adapter_new(cs("src").as_ptr(), &mut a));
    let mut l = null_mut();
    ok(rf_adapter_add_lora(
        a,
        cs("m").as_ptr(),
        12,
        10,
        4,
        4.0,
        0,
        0,
        seed,
        &mut l,
    ));
    let mut g = rankfuse::rng::SplitMix64::new(seed);
    let mut av = g.fill_uniform(4 * 12, -1.0, 1.0);
    let mut bv = g.fill_uniform(10 * 4, -1.0, 1.0);
    ok(rf_lora_set_weights(
        l,
        &mat(&mut av, 4, 12),
        &mat(&mut bv, 10, 4),
    ));
    a
}

#[test]
fn module_kind_calls_refuse_bad_input() {
    unsafe {
        let rt = runtime();
        let srcs = [source(1), source(2)];
        let mut basis = null_mut();
        expect(
            rf_eigen_basis_build(null(), 2, 3, 0, 0, &mut basis),
            RF_STATUS_INVALID_ARGUMENT,
            &["adapters"],
        );
        expect(
            rf_eigen_basis_build(
                srcs.as_ptr() as *const *const rf_adapter,
                2,
                9,
                0,
                0,
                &mut basis,
            ),
            RF_STATUS_INVALID_ARGUMENT,
            &["'m'", "8 rank vectors"],
        );
        ok(rf_eigen_basis_build(
            srcs.as_ptr() as *const *const rf_adapter,
            2,
            3,
            1,
            0,
            &mut basis,
        ));
        let mut ad = null_mut();
        ok(rf_adapter_new(cs("mixed").as_ptr(), &mut ad));
        let (mut kr, mut eg) = (null_mut(), null_mut());
        expect(
            rf_adapter_add_kradapter(ad, cs("k").as_ptr(), 0, 5, 2.0, 0, &mut kr),
            RF_STATUS_SHAPE,
            &["'k'"],
        );
        expect(
            rf_adapter_add_kradapter(ad, null(), 5, 5, 2.0, 0, &mut kr),
            RF_STATUS_INVALID_ARGUMENT,
            &["module"],
        );
        ok(rf_adapter_add_kradapter(
            ad,
            cs("k").as_ptr(),
            12,
            10,
            2.0,
            0,
            &mut kr,
        ));
        expect(
            rf_adapter_add_eigenlorax(ad, basis, cs("nope").as_ptr(), 2, 1.0, 0, &mut eg),
            RF_STATUS_NOT_FOUND,
            &["'nope'"],
        );
        expect(
            rf_adapter_add_eigenlorax(ad, basis, cs("m").as_ptr(), 0, 1.0, 0, &mut eg),
            RF_STATUS_SHAPE,
            &["rank 0"],
        );
        ok(rf_adapter_add_eigenlorax(
            ad,
            basis,
            cs("m").as_ptr(),
            2,
            1.0,
            0,
            &mut eg,
        ));
        // Rank: EigenLoRAx up to K = 4 (3 + 1 augmented); KRAdapter has none to truncate.
        expect(
            rf_lora_set_rank(eg, 5),
            RF_STATUS_INVALID_ARGUMENT,
            &["1..=4"],
        );
        ok(rf_lora_set_rank(eg, 3));
        expect(
            rf_lora_set_rank(kr, 2),
            RF_STATUS_INVALID_ARGUMENT,
            &["1..=1"],
        );
        expect(
            rf_lora_enable_gains(kr, 1.0),
            RF_STATUS_UNSUPPORTED,
            &["KRAdapter", "gains"],
        );
        ok(rf_lora_enable_gains(eg, 1.0));
        let mut kind = rf_module_kind::RF_MODULE_KIND_LORA;
        ok(rf_lora_kind(kr, &mut kind));
        assert_eq!(kind, rf_module_kind::RF_MODULE_KIND_KRADAPTER);
        expect(
            rf_lora_kind(null(), &mut kind),
            RF_STATUS_INVALID_ARGUMENT,
            &["'l'"],
        );
        // One folder holds one kind.
        let dir = tempfile::tempdir().unwrap();
        let p = cs(dir.path().join("x").to_str().unwrap());
        expect(
            rf_adapter_save_peft(ad, p.as_ptr()),
            RF_STATUS_UNSUPPORTED,
            &["KRAdapter", "EigenLoRAx"],
        );
        // A slot for another weight shape, and a rank past the basis per call.
        let (m, k, n) = (3usize, 12usize, 10usize);
        let mut x = vec![0.5f32; m * k];
        let mut w = vec![0.1f32; 9 * k];
        let mut y = vec![0f32; m * 9];
        let slots = [rf_lora_slot {
            lora: kr,
            rank: 0,
            scale_mult: 1.0,
        }];
        expect(
            rf_linear(
                rt,
                &mat(&mut x, m as i64, k as i64),
                &mat(&mut w, 9, k as i64),
                null(),
                slots.as_ptr(),
                1,
                null(),
                &mut mat(&mut y, m as i64, 9),
            ),
            RF_STATUS_SHAPE,
            &["slot 0", "'k'", "10 x 12"],
        );
        let mut w = vec![0.1f32; n * k];
        let mut y = vec![0f32; m * n];
        let slots = [rf_lora_slot {
            lora: eg,
            rank: 7,
            scale_mult: 1.0,
        }];
        expect(
            rf_linear(
                rt,
                &mat(&mut x, m as i64, k as i64),
                &mat(&mut w, n as i64, k as i64),
                null(),
                slots.as_ptr(),
                1,
                null(),
                &mut mat(&mut y, m as i64, n as i64),
            ),
            RF_STATUS_INVALID_ARGUMENT,
            &["slot 0", "rank 7"],
        );
        // The backward of the other kinds is NESTED only.
        let mut dy = vec![0.1f32; m * n];
        expect(
            rf_lora_backward(
                rt,
                kr,
                &mat(&mut x, m as i64, k as i64),
                &mat(&mut w, n as i64, k as i64),
                &mat(&mut dy, m as i64, n as i64),
                0,
                1,
                null(),
            ),
            RF_STATUS_INVALID_ARGUMENT,
            &["NESTED"],
        );
        // A basis folder whose data changed is refused by its fingerprints.
        let bdir = dir.path().join("basis");
        let bp = cs(bdir.to_str().unwrap());
        ok(rf_eigen_basis_save(basis, bp.as_ptr()));
        let mut other = null_mut();
        ok(rf_eigen_basis_build(
            srcs.as_ptr() as *const *const rf_adapter,
            1,
            3,
            1,
            5,
            &mut other,
        ));
        ok(rf_eigen_basis_save(
            other,
            cs(dir.path().join("other").to_str().unwrap()).as_ptr(),
        ));
        std::fs::copy(
            dir.path().join("other/basis.safetensors"),
            bdir.join("basis.safetensors"),
        )
        .unwrap();
        let mut b2 = null_mut();
        expect(
            rf_eigen_basis_load(rt, bp.as_ptr(), &mut b2),
            RF_STATUS_FORMAT,
            &["fingerprint"],
        );
        rf_eigen_basis_free(other);
        rf_eigen_basis_free(basis);
        rf_adapter_free(ad);
        for s in srcs {
            rf_adapter_free(s);
        }
        rf_runtime_free(rt);
    }
}
