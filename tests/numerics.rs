//! Non-finite numbers through the fused linear, on every kernel variant this CPU runs (and once
//! through the C ABI): NaN and Inf propagate as IEEE 754 arithmetic says, only into the outputs
//! that depend on them; Inf * 0 is NaN; f32 accumulation overflows to Inf; storing into an f16
//! output rounds to nearest-even, so |v| >= 65520 becomes Inf and 65504 <= |v| < 65520 becomes
//! 65504 (bf16 outputs have f32's range). See docs/reliability.md.

mod common;
use common::runtimes;
use rankfuse::adapter::{Lora, Scaling, TensorData};
use rankfuse::backend::{LinearProblem, Slot};
use rankfuse::{DType, Matrix};

/// Rows x cols values from a function of (row, col).
fn filled(dt: DType, rows: usize, cols: usize, f: impl Fn(usize, usize) -> f32) -> Matrix {
    let v: Vec<f32> = (0..rows * cols).map(|i| f(i / cols, i % cols)).collect();
    Matrix::from_f32(dt, rows, cols, &v).unwrap()
}

fn lora(a: Matrix, b: Matrix) -> Lora {
    let r = a.rows as f32;
    Lora::new(
        "m",
        TensorData::Owned(a),
        TensorData::Owned(b),
        r,
        Scaling::Lora,
        0.0,
    )
    .unwrap()
}

/// y (as f32) for every kernel variant; asserts all variants agree on which outputs are NaN /
/// +Inf / -Inf, and returns the first variant's values.
fn run_all(
    x: &Matrix,
    w: &Matrix,
    bias: Option<&Matrix>,
    l: Option<&Lora>,
    ydt: DType,
) -> Vec<f32> {
    let slots: Vec<Option<Slot<'_>>> = l
        .map(|l| rankfuse::runtime::slot(l, 0, 1.0).unwrap())
        .into_iter()
        .map(Some)
        .collect();
    let p = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: bias.map(|b| b.view()),
        slots: &slots,
        row_slot: None,
    };
    let mut first: Option<(String, Vec<f32>)> = None;
    for (isa, rt) in runtimes() {
        let mut y = Matrix::zeros(ydt, x.rows, w.rows).unwrap();
        rt.linear(&p, &mut y.view_mut()).unwrap();
        let v = y.to_f32_vec();
        match &first {
            None => first = Some((isa.name().into(), v)),
            Some((name, f)) => {
                for (i, (a, b)) in f.iter().zip(&v).enumerate() {
                    let class = |z: f32| (z.is_nan(), z == f32::INFINITY, z == f32::NEG_INFINITY);
                    assert_eq!(
                        class(*a),
                        class(*b),
                        "element {i}: {name} gives {a}, {} gives {b}",
                        isa.name()
                    );
                }
            }
        }
    }
    first.unwrap().1
}

const M: usize = 7;
const N: usize = 21;
const K: usize = 37;

#[test]
fn nan_in_x_poisons_only_its_row() {
    for dt in DType::ALL {
        let mut x = filled(dt, M, K, |i, j| ((i * 3 + j) % 5) as f32 * 0.25 - 0.5);
        let w = filled(dt, N, K, |i, j| ((i + 2 * j) % 7) as f32 * 0.125 - 0.25);
        let a = filled(dt, 4, K, |i, j| ((i + j) % 3) as f32 * 0.1);
        let b = filled(dt, N, 4, |i, j| ((i * j) % 4) as f32 * 0.1);
        let l = lora(a, b);
        let clean = run_all(&x, &w, None, Some(&l), DType::F32);
        assert!(clean.iter().all(|v| v.is_finite()));
        // NaN at (2, 11) and (5, 36): the last column, a tail for every blocking.
        let mut xv = x.to_f32_vec();
        xv[2 * K + 11] = f32::NAN;
        xv[5 * K + 36] = f32::NAN;
        x = Matrix::from_f32(dt, M, K, &xv).unwrap();
        let y = run_all(&x, &w, None, Some(&l), DType::F32);
        for i in 0..M {
            for j in 0..N {
                let v = y[i * N + j];
                if i == 2 || i == 5 {
                    assert!(v.is_nan(), "{dt:?}: y[{i},{j}] = {v}, NaN expected");
                } else {
                    assert_eq!(
                        v.to_bits(),
                        clean[i * N + j].to_bits(),
                        "{dt:?}: y[{i},{j}] changed"
                    );
                }
            }
        }
    }
}

#[test]
fn nan_in_w_or_bias_poisons_only_its_column() {
    let x = filled(DType::F32, M, K, |i, j| (i + j) as f32 * 0.01);
    let mut wv = filled(DType::F32, N, K, |i, j| (i * j % 5) as f32 * 0.1).to_f32_vec();
    wv[3 * K + 20] = f32::NAN; // column 3 of y
    let w = Matrix::from_f32(DType::F32, N, K, &wv).unwrap();
    let bias = filled(
        DType::F32,
        1,
        N,
        |_, j| if j == 17 { f32::NAN } else { 1.0 },
    );
    let y = run_all(&x, &w, Some(&bias), None, DType::F32);
    for i in 0..M {
        for j in 0..N {
            let v = y[i * N + j];
            assert_eq!(v.is_nan(), j == 3 || j == 17, "y[{i},{j}] = {v}");
        }
    }
}

#[test]
fn inf_times_zero_is_nan_and_inf_otherwise() {
    // x[i, 0] = +Inf for row 1; w[j, 0] = 0 for even j, 0.5 for odd j; everything else > 0.
    for dt in DType::ALL {
        let x = filled(dt, M, K, |i, j| {
            if i == 1 && j == 0 {
                f32::INFINITY
            } else {
                0.25
            }
        });
        let w = filled(dt, N, K, |r, c| {
            if c == 0 {
                if r % 2 == 0 {
                    0.0
                } else {
                    0.5
                }
            } else {
                0.125
            }
        });
        let y = run_all(&x, &w, None, None, DType::F32);
        for i in 0..M {
            for j in 0..N {
                let v = y[i * N + j];
                match (i, j % 2) {
                    (1, 0) => assert!(v.is_nan(), "{dt:?}: Inf * 0 at y[{i},{j}] gave {v}"),
                    (1, _) => assert_eq!(v, f32::INFINITY, "{dt:?}: y[{i},{j}]"),
                    _ => assert!(v.is_finite(), "{dt:?}: y[{i},{j}] = {v}"),
                }
            }
        }
        // -Inf in x with positive weights: -Inf; +Inf and -Inf in one row: NaN (Inf - Inf).
        let x = filled(dt, M, K, |i, j| match (i, j) {
            (3, 5) => f32::NEG_INFINITY,
            (4, 5) => f32::NEG_INFINITY,
            (4, 6) => f32::INFINITY,
            _ => 0.25,
        });
        let w = filled(dt, N, K, |_, _| 0.5);
        let y = run_all(&x, &w, None, None, DType::F32);
        for j in 0..N {
            assert_eq!(y[3 * N + j], f32::NEG_INFINITY, "{dt:?}: -Inf row");
            assert!(
                y[4 * N + j].is_nan(),
                "{dt:?}: Inf - Inf row gave {}",
                y[4 * N + j]
            );
        }
    }
}

#[test]
fn nan_in_an_adapter_reaches_every_row_it_applies_to() {
    let x = filled(DType::F32, M, K, |_, _| 0.5);
    let w = filled(DType::F32, N, K, |_, _| 0.25);
    let a = filled(DType::F32, 3, K, |r, c| {
        if r == 1 && c == 9 {
            f32::NAN
        } else {
            0.1
        }
    });
    let b = filled(DType::F32, N, 3, |_, _| 0.1);
    let l = lora(a, b);
    let y = run_all(&x, &w, None, Some(&l), DType::F32);
    assert!(
        y.iter().all(|v| v.is_nan()),
        "a NaN in lora_A feeds T[:, 1] and so every output"
    );
    // B with NaN in row 4 only poisons column 4.
    let a = filled(DType::F32, 3, K, |_, _| 0.1);
    let b = filled(DType::F32, N, 3, |j, r| {
        if j == 4 && r == 2 {
            f32::NAN
        } else {
            0.1
        }
    });
    let l = lora(a, b);
    let y = run_all(&x, &w, None, Some(&l), DType::F32);
    for i in 0..M {
        for j in 0..N {
            assert_eq!(y[i * N + j].is_nan(), j == 4, "y[{i},{j}]");
        }
    }
}

#[test]
fn f32_accumulation_overflows_to_inf() {
    let x = filled(DType::F32, 2, 3, |i, _| if i == 0 { 3e38 } else { -3e38 });
    let w = filled(DType::F32, 2, 3, |_, _| 1.0);
    let y = run_all(&x, &w, None, None, DType::F32);
    assert_eq!(
        y,
        vec![
            f32::INFINITY,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NEG_INFINITY
        ]
    );
}

#[test]
fn f16_output_rounds_to_nearest_even_and_overflows_to_inf() {
    // y = x * 1 with k = 1: the exact f32 value is stored into f16 and bf16 outputs.
    let vals = [
        65504.0f32, 65519.0, 65520.0, 1e6, -65519.0, -65520.0, -1e6, 3.0e38, 6.0e-8, 1.0e-8,
    ];
    let x = filled(DType::F32, vals.len(), 1, |i, _| vals[i]);
    let w = filled(DType::F32, 1, 1, |_, _| 1.0);
    let y16 = run_all(&x, &w, None, None, DType::F16);
    let inf = f32::INFINITY;
    // 6e-8 is the f16 subnormal 2^-24 (5.96e-8); 1e-8 is below half of it and rounds to 0.
    let want16 = [
        65504.0,
        65504.0,
        inf,
        inf,
        -65504.0,
        -inf,
        -inf,
        inf,
        5.9604645e-8,
        0.0,
    ];
    assert_eq!(y16, want16, "f16 output");
    let ybf = run_all(&x, &w, None, None, DType::BF16);
    assert!(
        ybf.iter().all(|v| v.is_finite()),
        "bf16 keeps f32's range: {ybf:?}"
    );
    assert_eq!(
        ybf[3], 999424.0,
        "1e6 to bf16 (8 significant bits, nearest even)"
    );
    // NaN and Inf survive conversion into f16 / bf16 outputs (NaN stays NaN, not Inf or 0).
    let x = filled(DType::F32, 3, 1, |i, _| {
        [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][i]
    });
    for dt in [DType::F16, DType::BF16] {
        let y = run_all(&x, &w, None, None, dt);
        assert!(
            y[0].is_nan() && y[1] == inf && y[2] == -inf,
            "{dt:?}: {y:?}"
        );
    }
}

#[test]
fn non_finite_f16_and_bf16_inputs_propagate() {
    for dt in [DType::F16, DType::BF16] {
        let x = filled(dt, 3, 5, |i, j| match (i, j) {
            (0, 2) => f32::NAN,
            (1, 4) => f32::INFINITY,
            _ => 1.0,
        });
        let w = filled(dt, 4, 5, |_, _| 0.5);
        let y = run_all(&x, &w, None, None, DType::F32);
        for j in 0..4 {
            assert!(y[j].is_nan(), "{dt:?} NaN row");
            assert_eq!(y[4 + j], f32::INFINITY, "{dt:?} Inf row");
            assert_eq!(y[8 + j], 2.5, "{dt:?} clean row");
        }
    }
}

/// The C ABI refuses non-finite scale multipliers instead of computing with them (documented).
#[test]
fn non_finite_scale_mult_is_refused_through_the_c_abi() {
    use rankfuse::ffi::{error::*, handles::*, linear::rf_linear, runtime::*, types::*};
    use std::ffi::c_void;
    use std::ptr::{null, null_mut};
    let l = lora(
        filled(DType::F32, 2, 3, |_, _| 0.1),
        filled(DType::F32, 4, 2, |_, _| 0.1),
    );
    let mut xb = vec![1f32; 2 * 3];
    let mut wb = vec![1f32; 4 * 3];
    let mut yb = vec![0f32; 2 * 4];
    let m = |p: &mut Vec<f32>, r: i64, c: i64| rf_matrix {
        data: p.as_mut_ptr() as *mut c_void,
        dtype: rf_dtype::RF_DTYPE_F32,
        rows: r,
        cols: c,
        ld: c,
    };
    let (x, w, mut y) = (m(&mut xb, 2, 3), m(&mut wb, 4, 3), m(&mut yb, 2, 4));
    let mut rt = null_mut();
    unsafe {
        assert!(rf_runtime_create(null(), &mut rt).is_null());
        for s in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let slot = rf_lora_slot {
                lora: lora_ptr(&l),
                rank: 0,
                scale_mult: s,
            };
            let e = rf_linear(rt, &x, &w, null(), &slot, 1, null(), &mut y);
            assert_eq!(
                rf_error_code(e),
                rf_status::RF_STATUS_INVALID_ARGUMENT,
                "scale_mult {s}"
            );
            rf_error_free(e);
        }
        let slot = rf_lora_slot {
            lora: lora_ptr(&l),
            rank: 0,
            scale_mult: 1.0,
        };
        assert!(rf_linear(rt, &x, &w, null(), &slot, 1, null(), &mut y).is_null());
        rf_runtime_free(rt);
    }
    // 3 * 1 (base) + scale 1 * (3 * 0.1 * 2 terms) * 0.1 ... = 3 + (0.3 * 0.1 * 2) = 3.06
    for v in yb {
        assert!((v - 3.06).abs() < 1e-5, "{v}");
    }
}
