//! Training through the C ABI and the Rust API: DyLoRA's worked example, frozen mode, AdamW
//! against a hand-computed step, NaN guards, ElaLoRA's EMA numbers, rank growth leaving outputs
//! unchanged, save -> reload reproducing outputs.

use rankfuse::ffi::error::rf_error;
use rankfuse::ffi::handles::{rf_adapter, rf_lora, rf_runtime};
use rankfuse::ffi::train::*;
use rankfuse::ffi::types::*;
use rankfuse::ffi::{adapter::*, error::*, linear::rf_linear, runtime::*};
use rankfuse::matrix::{MatMut, Matrix};
use rankfuse::rank::elalora::{grow_component, ElaLora, ElaLoraOptions};
use rankfuse::rank::importance::ema_update;
use rankfuse::rng::SplitMix64;
use rankfuse::train::{self, AdamW, Mode};
use rankfuse::{Adapter, DType, LinearProblem, Lora, Runtime, Scaling};
use std::ffi::CString;
use std::ptr::{null, null_mut};

unsafe fn ok(e: *mut rf_error) {
    if !e.is_null() {
        let msg = std::ffi::CStr::from_ptr(rf_error_message(e))
            .to_string_lossy()
            .into_owned();
        rf_error_free(e);
        panic!("unexpected error: {msg}");
    }
}

fn mat(v: &mut [f32], rows: usize, cols: usize) -> rf_matrix {
    rf_matrix {
        data: v.as_mut_ptr() as *mut _,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: rows as i64,
        cols: cols as i64,
        ld: cols as i64,
    }
}

struct Ctx {
    rt: *mut rf_runtime,
    ad: *mut rf_adapter,
    l: *mut rf_lora,
}

/// The issue's DyLoRA example: r_max = 4, alpha = 8, A 4 x 3, B 2 x 4.
unsafe fn dylora_ctx() -> Ctx {
    let mut rt = null_mut();
    ok(rf_runtime_create(null(), &mut rt));
    let mut ad = null_mut();
    let name = CString::new("dy").unwrap();
    ok(rf_adapter_new(name.as_ptr(), &mut ad));
    let module = CString::new("layer.q").unwrap();
    let mut l = null_mut();
    ok(rf_adapter_add_lora(
        ad,
        module.as_ptr(),
        3,
        2,
        4,
        8.0,
        0,
        0,
        1,
        &mut l,
    ));
    let mut a = [1., 0., 2., 0., 1., 1., 1., 1., 1., 2., 0., 0.];
    let mut b = [1., 0., 1., 1., 0., 2., 1., 0.];
    ok(rf_lora_set_weights(
        l,
        &mat(&mut a, 4, 3),
        &mat(&mut b, 2, 4),
    ));
    Ctx { rt, ad, l }
}

unsafe fn delta(c: &Ctx, b: u32) -> [f32; 2] {
    let mut x = [1f32, 2., 3.];
    let mut w = [0f32; 6];
    let mut y = [0f32; 2];
    let slot = rf_lora_slot {
        lora: c.l,
        rank: b,
        scale_mult: 1.0,
    };
    ok(rf_linear(
        c.rt,
        &mat(&mut x, 1, 3),
        &mat(&mut w, 2, 3),
        null(),
        &slot,
        1,
        null(),
        &mut mat(&mut y, 1, 2),
    ));
    y
}

#[test]
fn dylora_worked_example_and_frozen_mode() {
    unsafe {
        let c = dylora_ctx();
        assert_eq!(delta(&c, 2), [28.0, 40.0]);
        assert_eq!(delta(&c, 4), [30.0, 32.0]);
        // Frozen mode at b = 2: only A row 1 and B column 1 move.
        let mut a0 = std::mem::zeroed::<rf_matrix>();
        let mut b0 = std::mem::zeroed::<rf_matrix>();
        ok(rf_lora_weights(c.l, &mut a0, &mut b0));
        let read = |m: &rf_matrix| {
            std::slice::from_raw_parts(m.data as *const f32, (m.rows * m.cols) as usize).to_vec()
        };
        let (a_before, b_before) = (read(&a0), read(&b0));
        let mut x = [1f32, 2., 3.];
        let mut w = [0f32; 6];
        let mut dy = [1f32, -1.];
        ok(rf_lora_zero_grad(c.l));
        ok(rf_lora_backward(
            c.rt,
            c.l,
            &mat(&mut x, 1, 3),
            &mat(&mut w, 2, 3),
            &mat(&mut dy, 1, 2),
            2,
            RF_BACKWARD_FROZEN_RAW,
            null(),
        ));
        let opts = rf_adamw_options {
            struct_size: std::mem::size_of::<rf_adamw_options>() as u32,
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        ok(rf_lora_adamw_step(c.l, &opts));
        ok(rf_lora_weights(c.l, &mut a0, &mut b0));
        let (a_after, b_after) = (read(&a0), read(&b0));
        for i in 0..4 {
            for j in 0..3 {
                let moved = a_after[i * 3 + j] != a_before[i * 3 + j];
                assert_eq!(moved, i == 1, "A[{i},{j}]");
            }
        }
        for j in 0..2 {
            for cc in 0..4 {
                let moved = b_after[j * 4 + cc] != b_before[j * 4 + cc];
                assert_eq!(moved, cc == 1, "B[{j},{cc}]");
            }
        }
        // Bad enum values from C are errors, not UB.
        let e = rf_lora_backward(
            c.rt,
            c.l,
            &mat(&mut x, 1, 3),
            &mat(&mut w, 2, 3),
            &mat(&mut dy, 1, 2),
            2,
            7,
            null(),
        );
        assert_eq!(rf_error_code(e), rf_status::RF_STATUS_INVALID_ARGUMENT);
        rf_error_free(e);
        let m = CString::new("other").unwrap();
        let e = rf_adapter_add_lora(c.ad, m.as_ptr(), 3, 2, 4, 8.0, 9, 0, 1, null_mut());
        assert_eq!(rf_error_code(e), rf_status::RF_STATUS_INVALID_ARGUMENT);
        rf_error_free(e);
        let e = rf_adapter_add_lora(c.ad, m.as_ptr(), 3, 2, 4, 8.0, 0, 5, 1, null_mut());
        assert_eq!(rf_error_code(e), rf_status::RF_STATUS_DTYPE);
        rf_error_free(e);
        // The module list sees added modules.
        ok(rf_adapter_add_lora(
            c.ad,
            m.as_ptr(),
            3,
            2,
            4,
            8.0,
            1,
            2,
            1,
            null_mut(),
        ));
        assert_eq!(rf_adapter_module_count(c.ad), 2);
        let mut nm = null();
        ok(rf_adapter_module_name(c.ad, 1, &mut nm));
        assert_eq!(std::ffi::CStr::from_ptr(nm).to_str().unwrap(), "other");
        rf_adapter_free(c.ad);
        rf_runtime_free(c.rt);
    }
}

const RF_BACKWARD_FROZEN_RAW: u32 = rf_backward_mode::RF_BACKWARD_FROZEN as u32;

#[test]
fn nan_gradient_is_a_no_op_naming_the_module() {
    unsafe {
        let c = dylora_ctx();
        let mut a0 = std::mem::zeroed::<rf_matrix>();
        let mut b0 = std::mem::zeroed::<rf_matrix>();
        ok(rf_lora_weights(c.l, &mut a0, &mut b0));
        let read = |m: &rf_matrix| {
            std::slice::from_raw_parts(m.data as *const f32, (m.rows * m.cols) as usize).to_vec()
        };
        let before = (read(&a0), read(&b0));
        let mut x = [1f32, f32::NAN, 3.];
        let mut w = [0f32; 6];
        let mut dy = [1f32, 1.];
        ok(rf_lora_backward(
            c.rt,
            c.l,
            &mat(&mut x, 1, 3),
            &mat(&mut w, 2, 3),
            &mat(&mut dy, 1, 2),
            0,
            0,
            null(),
        ));
        let e = rf_lora_adamw_step(c.l, null());
        assert_eq!(rf_error_code(e), rf_status::RF_STATUS_NUMERIC);
        let msg = std::ffi::CStr::from_ptr(rf_error_message(e))
            .to_str()
            .unwrap()
            .to_string();
        assert!(msg.contains("layer.q"), "{msg}");
        rf_error_free(e);
        let e = rf_adapter_adamw_step(c.ad, null());
        assert_eq!(rf_error_code(e), rf_status::RF_STATUS_NUMERIC);
        rf_error_free(e);
        ok(rf_lora_weights(c.l, &mut a0, &mut b0));
        assert_eq!((read(&a0), read(&b0)), before);
        // After zero_grad the step works again (nothing touched: nothing moves).
        ok(rf_adapter_zero_grad(c.ad));
        ok(rf_lora_adamw_step(c.l, null()));
        rf_adapter_free(c.ad);
        rf_runtime_free(c.rt);
    }
}

#[test]
fn adamw_matches_a_hand_computed_step() {
    let rt = Runtime::cpu().unwrap();
    let mut l = Lora::new_trainable("m", 2, 1, 1, 1.0, Scaling::Lora, DType::F32, 3).unwrap();
    l.set_weights(&[0.5, -1.0], &[2.0]).unwrap();
    // y = (x . A) * B, x = [1, 1], dy = 1: dA = B * x = [2, 2], dB = x . A = -0.5.
    let x = Matrix::from_f32(DType::F32, 1, 2, &[1.0, 1.0]).unwrap();
    let w = Matrix::zeros(DType::F32, 1, 2).unwrap();
    let dy = Matrix::from_f32(DType::F32, 1, 1, &[1.0]).unwrap();
    let o = AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    let mut hand = (vec![0.5f64, -1.0], 2.0f64, vec![0f64; 3], vec![0f64; 3]);
    for step in 1..=3 {
        train::zero_grad(&mut l).unwrap();
        rankfuse::training::backward(
            &rt,
            &mut l,
            x.view(),
            w.view(),
            dy.view(),
            0,
            Mode::Nested,
            None,
        )
        .unwrap();
        let t = l.train.as_ref().unwrap();
        // Gradients at the current (pre-step) weights.
        let ga = [hand.1, hand.1];
        let gb = hand.0[0] + hand.0[1];
        assert!((t.ga[0] as f64 - ga[0]).abs() < 1e-5 && (t.gb[0] as f64 - gb).abs() < 1e-5);
        train::adamw_step(&mut l, &o).unwrap();
        let (b1, b2) = (0.9f64, 0.999f64);
        let grads = [ga[0], ga[1], gb];
        let mut params = [hand.0[0], hand.0[1], hand.1];
        for i in 0..3 {
            params[i] *= 1.0 - 0.1 * 0.1;
            hand.2[i] = b1 * hand.2[i] + (1.0 - b1) * grads[i];
            hand.3[i] = b2 * hand.3[i] + (1.0 - b2) * grads[i] * grads[i];
            let mhat = hand.2[i] / (1.0 - b1.powi(step));
            let vhat = hand.3[i] / (1.0 - b2.powi(step));
            params[i] -= 0.1 * mhat / (vhat.sqrt() + 1e-8);
        }
        hand.0 = vec![params[0], params[1]];
        hand.1 = params[2];
        let t = l.train.as_ref().unwrap();
        for (got, want) in [
            (t.a[0], params[0]),
            (t.a[1], params[1]),
            (t.b[0], params[2]),
        ] {
            assert!(
                (got as f64 - want).abs() < 1e-5,
                "step {step}: {got} vs {want}"
            );
        }
    }
}

#[test]
fn elalora_ema_matches_the_issue() {
    let (mut ib, mut ub) = (0f32, 0f32);
    let want = [0.019125f32, 0.0309825, 0.1696021];
    for (i, s) in [1.0f32, 0.5, 2.0].into_iter().zip(want) {
        let got = ema_update(&mut ib, &mut ub, i, 0.85, 0.85);
        assert!((got - s).abs() <= 1e-6 * s.abs().max(1.0), "{got} vs {s}");
    }
}

fn forward(rt: &Runtime, l: &Lora, x: &Matrix, w: &Matrix) -> Vec<f32> {
    let slots = [Some(rankfuse::runtime::slot(l, 0, 1.0).unwrap())];
    let p = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &slots,
        row_slot: None,
    };
    let mut y = vec![0f32; x.rows * w.rows];
    let mut yv = MatMut::from_slice(&mut y, x.rows, w.rows, w.rows).unwrap();
    rt.linear(&p, &mut yv).unwrap();
    y
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-300)).sqrt()
}

/// A trained adapter with gains and a mask: two modules, a few steps of training.
fn trained(rt: &Runtime, dt: DType) -> (Adapter, Matrix, Matrix) {
    let mut rng = SplitMix64::new(9);
    let (k, n, cap) = (24, 20, 6);
    let mut ad = Adapter::new("t");
    for (i, name) in ["blk.0.fc1", "blk.0.fc2"].iter().enumerate() {
        let mut l =
            Lora::new_trainable(name, k, n, cap, 12.0, Scaling::Fixed, dt, i as u64).unwrap();
        l.enable_gains(1.0).unwrap();
        ad.add(l).unwrap();
    }
    let x = Matrix::from_f32(dt, 8, k, &rng.fill_uniform(8 * k, -1.0, 1.0)).unwrap();
    let w = Matrix::from_f32(dt, n, k, &rng.fill_uniform(n * k, -0.3, 0.3)).unwrap();
    let dy = Matrix::from_f32(dt, 8, n, &rng.fill_uniform(8 * n, -1.0, 1.0)).unwrap();
    let o = AdamW {
        lr: 0.05,
        ..Default::default()
    };
    for _ in 0..5 {
        for l in ad.modules_mut() {
            train::zero_grad(l).unwrap();
            rankfuse::training::backward(
                rt,
                l,
                x.view(),
                w.view(),
                dy.view(),
                0,
                Mode::Nested,
                None,
            )
            .unwrap();
        }
        train::clip_grad_norm(&mut ad, 10.0).unwrap();
        train::adapter_adamw_step(&mut ad, &o).unwrap();
    }
    (ad, x, w)
}

#[test]
fn growing_a_rank_leaves_the_output_unchanged() {
    let rt = Runtime::cpu().unwrap();
    let (mut ad, x, w) = trained(&rt, DType::F32);
    let l = ad.get_mut("blk.0.fc1").unwrap();
    l.set_mask(&[true, true, false, true, false, false])
        .unwrap();
    let before = forward(&rt, l, &x, &w);
    let mut rng = SplitMix64::new(1);
    let c = grow_component(l, &mut rng).unwrap();
    assert_eq!(c, 2);
    let after = forward(&rt, l, &x, &w);
    let d = rel_diff(&after, &before);
    assert!(d <= 1e-6, "growth changed the output by {d}");
    // The new A row is orthogonal to the active ones.
    let t = l.train.as_ref().unwrap();
    for other in [0usize, 1, 3] {
        let dot: f64 = (0..24)
            .map(|j| t.a[2 * 24 + j] as f64 * t.a[other * 24 + j] as f64)
            .sum();
        assert!(dot.abs() < 1e-4, "A row 2 . A row {other} = {dot}");
    }
}

#[test]
fn elalora_rounds_follow_the_budget() {
    let rt = Runtime::cpu().unwrap();
    let (mut ad, x, w) = trained(&rt, DType::F32);
    let opts = ElaLoraOptions {
        target_total_rank: 8,
        warmup_steps: 2,
        final_steps: 2,
        total_steps: 20,
        interval: 2,
        max_change: 1,
        ..Default::default()
    };
    let mut ela = ElaLora::new(&mut ad, opts).unwrap();
    assert_eq!(ela.budget(0), 12);
    assert_eq!(ela.budget(18), 8);
    let mut rng = SplitMix64::new(4);
    for step in 0..20 {
        let dy = Matrix::from_f32(DType::F32, 8, 20, &rng.fill_uniform(160, -1.0, 1.0)).unwrap();
        for l in ad.modules_mut() {
            train::zero_grad(l).unwrap();
            rankfuse::training::backward(
                &rt,
                l,
                x.view(),
                w.view(),
                dy.view(),
                0,
                Mode::Nested,
                None,
            )
            .unwrap();
        }
        ela.update(&mut ad, step).unwrap();
        train::adapter_adamw_step(&mut ad, &AdamW::default()).unwrap();
    }
    let total: usize = ad
        .modules()
        .map(|l| {
            l.train
                .as_ref()
                .unwrap()
                .mask
                .iter()
                .filter(|&&m| m)
                .count()
        })
        .sum();
    assert_eq!(total, 8);
}

#[test]
fn saved_and_reloaded_adapter_reproduces_outputs() {
    let rt = Runtime::cpu().unwrap();
    for dt in [DType::F32, DType::BF16] {
        let (mut ad, x, w) = trained(&rt, dt);
        ad.get_mut("blk.0.fc2")
            .unwrap()
            .set_mask(&[true, false, true, true, true, false])
            .unwrap();
        ad.get_mut("blk.0.fc1").unwrap().set_rank(4).unwrap();
        let outs: Vec<Vec<f32>> = ad.modules().map(|l| forward(&rt, l, &x, &w)).collect();
        let dir = tempfile::tempdir().unwrap();
        rankfuse::adapter::peft::save(&ad, dir.path()).unwrap();
        // Plain load (as PEFT would): gains folded into B.
        let mut back = rankfuse::adapter::peft::load(dir.path()).unwrap();
        let tol = if dt == DType::F32 { 1e-6 } else { 1.6e-2 };
        for (l, want) in back.modules().zip(&outs) {
            let d = rel_diff(&forward(&rt, l, &x, &w), want);
            assert!(d <= tol, "{dt:?} {}: plain reload differs by {d}", l.name);
        }
        // Resume: capacity, mask and gains come back; outputs still match.
        train::resume::enable_all(&mut back).unwrap();
        for (l, want) in back.modules().zip(&outs) {
            let t = l.train.as_ref().unwrap();
            assert_eq!(l.capacity, 6, "{}", l.name);
            assert!(t.e.is_some());
            let d = rel_diff(&forward(&rt, l, &x, &w), want);
            assert!(d <= tol, "{dt:?} {}: resumed reload differs by {d}", l.name);
        }
        let fc2 = back.get("blk.0.fc2").unwrap();
        assert_eq!(
            fc2.train.as_ref().unwrap().mask,
            vec![true, false, true, true, true, false]
        );
        assert_eq!(back.get("blk.0.fc1").unwrap().rank(), 4);
    }
}

#[test]
fn c_abi_sampler_elalora_masks_clipping_and_resume() {
    unsafe {
        let mut rt = null_mut();
        ok(rf_runtime_create(null(), &mut rt));
        let mut ad = null_mut();
        let name = CString::new("ela").unwrap();
        ok(rf_adapter_new(name.as_ptr(), &mut ad));
        let mut ls = Vec::new();
        for i in 0..2 {
            let m = CString::new(format!("blk.{i}.fc")).unwrap();
            let mut l = null_mut();
            ok(rf_adapter_add_lora(
                ad,
                m.as_ptr(),
                6,
                5,
                4,
                8.0,
                2,
                0,
                i,
                &mut l,
            ));
            ok(rf_lora_enable_gains(l, 1.0));
            let mask = [1u8, 1, 1, 0];
            ok(rf_lora_set_mask(l, mask.as_ptr(), 4));
            let mut back = [9u8; 4];
            ok(rf_lora_get_mask(l, back.as_mut_ptr(), 4));
            assert_eq!(back, mask);
            let e = rf_lora_set_mask(l, mask.as_ptr(), 3);
            assert_eq!(rf_error_code(e), rf_status::RF_STATUS_SHAPE);
            rf_error_free(e);
            ls.push(l);
        }
        let mut s = null_mut();
        ok(rf_dylora_sampler_create(5, 1, 3, &mut s));
        let mut b = 0u32;
        for _ in 0..20 {
            ok(rf_dylora_sampler_next(s, &mut b));
            assert!((1..=3).contains(&b));
        }
        rf_dylora_sampler_free(s);
        let opts = rf_elalora_options {
            struct_size: std::mem::size_of::<rf_elalora_options>() as u32,
            target_total_rank: 4,
            warmup_steps: 1,
            final_steps: 1,
            total_steps: 10,
            interval: 2,
            max_change: 1,
            beta1: 0.85,
            beta2: 0.85,
            seed: 1,
        };
        let mut bad = opts;
        bad.struct_size = 4;
        let mut ela = null_mut();
        let e = rf_elalora_create(ad, &bad, &mut ela);
        assert_eq!(rf_error_code(e), rf_status::RF_STATUS_INVALID_ARGUMENT);
        rf_error_free(e);
        ok(rf_elalora_create(ad, &opts, &mut ela));
        let mut rng = SplitMix64::new(2);
        let mut x: Vec<f32> = rng.fill_uniform(3 * 6, -1.0, 1.0);
        let mut w: Vec<f32> = rng.fill_uniform(5 * 6, -1.0, 1.0);
        let mut changed_total = 0;
        for step in 0..10u32 {
            let mut dy: Vec<f32> = rng.fill_uniform(3 * 5, -1.0, 1.0);
            ok(rf_adapter_zero_grad(ad));
            for &l in &ls {
                ok(rf_lora_backward(
                    rt,
                    l,
                    &mat(&mut x, 3, 6),
                    &mat(&mut w, 5, 6),
                    &mat(&mut dy, 3, 5),
                    0,
                    0,
                    null(),
                ));
            }
            let mut norm = 0f64;
            ok(rf_adapter_clip_grad_norm(ad, 0.5, &mut norm));
            assert!(norm > 0.0);
            let mut changed = 0;
            ok(rf_elalora_update(ela, ad, step, &mut changed));
            changed_total += changed;
            ok(rf_adapter_adamw_step(ad, null()));
        }
        assert!(changed_total > 0);
        let mut active = 0;
        for &l in &ls {
            let mut m = [0u8; 4];
            ok(rf_lora_get_mask(l, m.as_mut_ptr(), 4));
            active += m.iter().filter(|&&v| v == 1).count();
        }
        assert_eq!(active, 4);
        rf_elalora_free(ela);
        // Save, load, resume through the C ABI: outputs and masks come back.
        let dir = tempfile::tempdir().unwrap();
        let d = CString::new(dir.path().to_str().unwrap()).unwrap();
        ok(rf_adapter_save_peft(ad, d.as_ptr()));
        let mut back = null_mut();
        ok(rankfuse::ffi::adapter::rf_adapter_load_peft(
            rt,
            d.as_ptr(),
            &mut back,
        ));
        ok(rf_adapter_train_enable(back));
        for (i, &l) in ls.iter().enumerate() {
            let m = CString::new(format!("blk.{i}.fc")).unwrap();
            let mut l2 = null_mut();
            ok(rf_adapter_module(back, m.as_ptr(), &mut l2));
            let (mut m1, mut m2) = ([0u8; 4], [0u8; 4]);
            ok(rf_lora_get_mask(l, m1.as_mut_ptr(), 4));
            ok(rf_lora_get_mask(l2, m2.as_mut_ptr(), 4));
            assert_eq!(m1, m2);
            let run = |lora: *mut rf_lora, x: &mut [f32], w: &mut [f32]| {
                let mut y = [0f32; 15];
                let slot = rf_lora_slot {
                    lora,
                    rank: 0,
                    scale_mult: 1.0,
                };
                ok(rf_linear(
                    rt,
                    &mat(x, 3, 6),
                    &mat(w, 5, 6),
                    null(),
                    &slot,
                    1,
                    null(),
                    &mut mat(&mut y, 3, 5),
                ));
                y
            };
            let (y1, y2) = (run(l, &mut x, &mut w), run(l2, &mut x, &mut w));
            assert!(rel_diff(&y2, &y1) <= 1e-6, "{y1:?} {y2:?}");
        }
        rf_adapter_free(back);
        rf_adapter_free(ad);
        rf_runtime_free(rt);
    }
}
