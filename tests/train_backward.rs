//! Backward kernels: optimized vs the f64 reference, the reference vs finite differences,
//! exact zeros for masked / out-of-rank components, both modes, every dtype.

use rankfuse::matrix::{MatMut, Matrix};
use rankfuse::rng::SplitMix64;
use rankfuse::train::backward::{self, BackwardProblem, GradsMut};
use rankfuse::train::{self, Mode};
use rankfuse::{DType, Lora, Runtime, Scaling};

fn rtol(dt: DType) -> f64 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => unreachable!("a quantized output"),
    }
}

fn rand_mat(rng: &mut SplitMix64, dt: DType, rows: usize, cols: usize) -> Matrix {
    let v: Vec<f32> = (0..rows * cols).map(|_| rng.uniform(-1.0, 1.0)).collect();
    Matrix::from_f32(dt, rows, cols, &v).unwrap()
}

/// A padded copy (ld = cols + pad) to exercise ld > cols.
fn padded(m: &Matrix, pad: usize) -> (Vec<f32>, usize) {
    let ld = m.cols + pad;
    let mut v = vec![f32::NAN; m.rows * ld];
    let d = m.to_f32_vec();
    for i in 0..m.rows {
        v[i * ld..i * ld + m.cols].copy_from_slice(&d[i * m.cols..(i + 1) * m.cols]);
    }
    (v, ld)
}

struct Case {
    m: usize,
    n: usize,
    k: usize,
    r: usize,
}

fn check_close(what: &str, got: f64, want: f64, atol: f64, rtol: f64) {
    assert!(
        (got - want).abs() <= atol + rtol * want.abs(),
        "{what}: got {got}, want {want}"
    );
}

#[test]
fn optimized_matches_reference_all_dtypes_modes_shapes() {
    let cases = [
        Case {
            m: 1,
            n: 1,
            k: 1,
            r: 1,
        },
        Case {
            m: 7,
            n: 13,
            k: 19,
            r: 3,
        },
        Case {
            m: 13,
            n: 300,
            k: 270,
            r: 5,
        },
        Case {
            m: 6,
            n: 17,
            k: 33,
            r: 8,
        },
    ];
    let mut rng = SplitMix64::new(7);
    for dt in DType::ALL {
        for c in &cases {
            for mode in [Mode::Nested, Mode::Frozen] {
                for with_gains in [false, true] {
                    let x = rand_mat(&mut rng, dt, c.m, c.k);
                    let w = rand_mat(&mut rng, dt, c.n, c.k);
                    let dy = rand_mat(&mut rng, dt, c.m, c.n);
                    let a = rand_mat(&mut rng, dt, c.r, c.k);
                    let b = rand_mat(&mut rng, dt, c.n, c.r);
                    // ld > cols for x (f32 only: padded copy is f32).
                    let (xp, ldx) = padded(&x, 3);
                    let xv = if dt == DType::F32 {
                        rankfuse::MatRef::from_slice(&xp, c.m, c.k, ldx).unwrap()
                    } else {
                        x.view()
                    };
                    let (wp, ldw) = padded(&w, 5);
                    let (dp, ldd) = padded(&dy, 1);
                    let (wv, dyv) = if dt == DType::F32 {
                        (
                            rankfuse::MatRef::from_slice(&wp, c.n, c.k, ldw).unwrap(),
                            rankfuse::MatRef::from_slice(&dp, c.m, c.n, ldd).unwrap(),
                        )
                    } else {
                        (w.view(), dy.view())
                    };
                    let gains: Vec<f32> = (0..c.r)
                        .map(|i| if i == 1 { 0.0 } else { rng.uniform(0.5, 1.5) })
                        .collect();
                    let grad: Vec<bool> = (0..c.r)
                        .map(|i| mode == Mode::Nested || i + 1 == c.r)
                        .collect();
                    let p = BackwardProblem {
                        x: xv,
                        w: wv,
                        dy: dyv,
                        a: a.view(),
                        b: b.view(),
                        gains: with_gains.then_some(&gains[..]),
                        scale: 1.75,
                        grad: &grad,
                        want_de: with_gains,
                    };
                    let reference = backward::reference(&p);
                    let cap = c.r + 2; // ldb > r
                    let mut da = vec![0f32; cap * c.k];
                    let mut db = vec![0f32; c.n * cap];
                    let mut de = vec![0f32; cap];
                    let mut dxm = Matrix::zeros(dt, c.m, c.k).unwrap();
                    {
                        let mut dxv = dxm.view_mut();
                        p.check(Some(&dxv)).unwrap();
                        backward::backward(
                            &p,
                            GradsMut {
                                da: &mut da,
                                db: &mut db,
                                ldb: cap,
                                de: &mut de,
                            },
                            Some(&mut dxv),
                        );
                    }
                    let tol = rtol(dt);
                    // Inputs are exact in dt; the optimized kernel accumulates in f32.
                    let atol = 2e-5 * (c.k.max(c.n).max(c.m) as f64);
                    let ctx = format!(
                        "{dt:?} m{} n{} k{} r{} {mode:?} gains={with_gains}",
                        c.m, c.n, c.k, c.r
                    );
                    for i in 0..c.r {
                        for kk in 0..c.k {
                            check_close(
                                &format!("{ctx} dA[{i},{kk}]"),
                                da[i * c.k + kk] as f64,
                                reference.da[i * c.k + kk],
                                atol,
                                1e-5,
                            );
                        }
                        for j in 0..c.n {
                            check_close(
                                &format!("{ctx} dB[{j},{i}]"),
                                db[j * cap + i] as f64,
                                reference.db[j * c.r + i],
                                atol,
                                1e-5,
                            );
                        }
                        check_close(
                            &format!("{ctx} dE[{i}]"),
                            de[i] as f64,
                            reference.de[i],
                            atol,
                            1e-5,
                        );
                    }
                    let dxo = dxm.to_f32_vec();
                    for (i, (&g, &w)) in dxo.iter().zip(&reference.dx).enumerate() {
                        check_close(&format!("{ctx} dx[{i}]"), g as f64, w, atol, tol);
                    }
                }
            }
        }
    }
}

/// f64 forward loss L = sum(dy ⊙ y) over the adapter part, for finite differences.
#[allow(clippy::too_many_arguments)]
fn loss(
    x: &[f64],
    a: &[f64],
    b: &[f64],
    e: &[f64],
    dy: &[f64],
    w: &[f64],
    m: usize,
    n: usize,
    k: usize,
    r: usize,
    s: f64,
) -> f64 {
    let mut l = 0.0;
    for i in 0..m {
        let t: Vec<f64> = (0..r)
            .map(|c| e[c] * (0..k).map(|kk| x[i * k + kk] * a[c * k + kk]).sum::<f64>())
            .collect();
        for j in 0..n {
            let base: f64 = (0..k).map(|kk| x[i * k + kk] * w[j * k + kk]).sum();
            let d: f64 = (0..r).map(|c| t[c] * b[j * r + c]).sum();
            l += dy[i * n + j] * (base + s * d);
        }
    }
    l
}

#[test]
fn reference_matches_finite_differences() {
    let (m, n, k, r) = (3, 4, 5, 3);
    let s = 0.6;
    let mut rng = SplitMix64::new(11);
    for dt in DType::ALL {
        let mats: Vec<Matrix> = [(m, k), (n, k), (m, n), (r, k), (n, r)]
            .iter()
            .map(|&(a, b)| rand_mat(&mut rng, dt, a, b))
            .collect();
        let f64v = |mm: &Matrix| {
            mm.to_f32_vec()
                .iter()
                .map(|&v| v as f64)
                .collect::<Vec<f64>>()
        };
        let (x, w, dy, a, b) = (
            f64v(&mats[0]),
            f64v(&mats[1]),
            f64v(&mats[2]),
            f64v(&mats[3]),
            f64v(&mats[4]),
        );
        let gains = [1.3f32, 0.7, -0.4];
        let e: Vec<f64> = gains.iter().map(|&g| g as f64).collect();
        for mode in [Mode::Nested, Mode::Frozen] {
            let grad: Vec<bool> = (0..r).map(|i| mode == Mode::Nested || i + 1 == r).collect();
            let p = BackwardProblem {
                x: mats[0].view(),
                w: mats[1].view(),
                dy: mats[2].view(),
                a: mats[3].view(),
                b: mats[4].view(),
                gains: Some(&gains),
                scale: s as f32,
                grad: &grad,
                want_de: true,
            };
            let g = backward::reference(&p);
            let h = 1e-6;
            let s = s as f32 as f64;
            let fd = |f: &dyn Fn(f64) -> f64| (f(h) - f(-h)) / (2.0 * h);
            for c in 0..r {
                for kk in 0..k {
                    let want = fd(&|d| {
                        let mut a2 = a.clone();
                        a2[c * k + kk] += d;
                        loss(&x, &a2, &b, &e, &dy, &w, m, n, k, r, s)
                    });
                    let got = g.da[c * k + kk];
                    let want = if grad[c] { want } else { 0.0 };
                    assert!((got - want).abs() < 1e-6, "{dt:?} {mode:?} dA {got} {want}");
                }
                for j in 0..n {
                    let want = fd(&|d| {
                        let mut b2 = b.clone();
                        b2[j * r + c] += d;
                        loss(&x, &a, &b2, &e, &dy, &w, m, n, k, r, s)
                    });
                    let want = if grad[c] { want } else { 0.0 };
                    assert!((g.db[j * r + c] - want).abs() < 1e-6, "{dt:?} {mode:?} dB");
                }
                let want = fd(&|d| {
                    let mut e2 = e.clone();
                    e2[c] += d;
                    loss(&x, &a, &b, &e2, &dy, &w, m, n, k, r, s)
                });
                let want = if grad[c] { want } else { 0.0 };
                assert!((g.de[c] - want).abs() < 1e-6, "{dt:?} {mode:?} dE");
            }
            for i in 0..m {
                for kk in 0..k {
                    let want = fd(&|d| {
                        let mut x2 = x.clone();
                        x2[i * k + kk] += d;
                        loss(&x2, &a, &b, &e, &dy, &w, m, n, k, r, s)
                    });
                    assert!((g.dx[i * k + kk] - want).abs() < 1e-6, "{dt:?} dx");
                }
            }
        }
    }
}

#[test]
fn masks_and_ranks_give_exact_zero_gradients() {
    let rt = Runtime::cpu().unwrap();
    let (m, n, k, cap) = (5, 9, 7, 6);
    let mut rng = SplitMix64::new(3);
    for dt in DType::ALL {
        let mut l = Lora::new_trainable("m", k, n, cap, 8.0, Scaling::Lora, dt, 1).unwrap();
        l.enable_gains(1.0).unwrap();
        // Non-zero B so every gradient is non-zero where allowed.
        {
            let t = l.train.as_mut().unwrap();
            for v in t.b.iter_mut() {
                *v = rng.uniform(-1.0, 1.0);
            }
        }
        l.sync_from_master().unwrap();
        l.set_mask(&[true, false, true, true, true, true]).unwrap();
        let x = rand_mat(&mut rng, dt, m, k);
        let w = rand_mat(&mut rng, dt, n, k);
        let dy = rand_mat(&mut rng, dt, m, n);
        for (rank, mode) in [(4, Mode::Nested), (4, Mode::Frozen)] {
            train::zero_grad(&mut l).unwrap();
            rankfuse::training::backward(
                &rt,
                &mut l,
                x.view(),
                w.view(),
                dy.view(),
                rank,
                mode,
                None,
            )
            .unwrap();
            let t = l.train.as_ref().unwrap();
            for c in 0..cap {
                let allowed = c < rank && c != 1 && (mode == Mode::Nested || c + 1 == rank);
                let a_zero = t.ga[c * k..(c + 1) * k].iter().all(|&v| v == 0.0);
                let b_zero = (0..n).all(|j| t.gb[j * cap + c] == 0.0);
                let e_zero = t.ge[c] == 0.0;
                assert_eq!(a_zero, !allowed, "{dt:?} {mode:?} comp {c} dA");
                assert_eq!(b_zero, !allowed, "{dt:?} {mode:?} comp {c} dB");
                assert_eq!(e_zero, !allowed, "{dt:?} {mode:?} comp {c} dE");
            }
        }
    }
}

#[test]
fn dx_matches_reference_through_the_rust_api() {
    let rt = Runtime::cpu().unwrap();
    let (m, n, k, cap) = (9, 40, 37, 4);
    let mut rng = SplitMix64::new(5);
    let mut l = Lora::new_trainable("m", k, n, cap, 4.0, Scaling::RsLora, DType::F32, 2).unwrap();
    {
        let t = l.train.as_mut().unwrap();
        for v in t.b.iter_mut() {
            *v = rng.uniform(-1.0, 1.0);
        }
    }
    l.sync_from_master().unwrap();
    let x = rand_mat(&mut rng, DType::F32, m, k);
    let w = rand_mat(&mut rng, DType::F32, n, k);
    let dy = rand_mat(&mut rng, DType::F32, m, n);
    let mut dxv = vec![0f32; m * (k + 2)];
    let mut dx = MatMut::from_slice(&mut dxv, m, k, k + 2).unwrap();
    rankfuse::training::backward(
        &rt,
        &mut l,
        x.view(),
        w.view(),
        dy.view(),
        3,
        Mode::Nested,
        Some(&mut dx),
    )
    .unwrap();
    let grad = vec![true; 3];
    let p = BackwardProblem {
        x: x.view(),
        w: w.view(),
        dy: dy.view(),
        a: l.a_view(3),
        b: l.b_view(3),
        gains: None,
        scale: l.scale_at(3),
        grad: &grad,
        want_de: false,
    };
    let r = backward::reference(&p);
    for i in 0..m {
        for kk in 0..k {
            check_close(
                "dx",
                dxv[i * (k + 2) + kk] as f64,
                r.dx[i * k + kk],
                1e-4,
                1e-5,
            );
        }
    }
    // Wrong shapes are errors naming the module.
    let bad = rand_mat(&mut rng, DType::F32, m, n + 1);
    let e = rankfuse::training::backward(
        &rt,
        &mut l,
        x.view(),
        w.view(),
        bad.view(),
        0,
        Mode::Nested,
        None,
    )
    .unwrap_err();
    assert!(e.message.contains("module 'm'"), "{}", e.message);
}

#[test]
fn input_grad_matches_reference() {
    let mut rng = SplitMix64::new(21);
    let rt = Runtime::cpu().unwrap();
    for dt in DType::ALL {
        let (m, n, k) = (11, 37, 290);
        let w = rand_mat(&mut rng, dt, n, k);
        let dy = rand_mat(&mut rng, dt, m, n);
        let mut dx = Matrix::zeros(DType::F32, m, k).unwrap();
        {
            let mut v = dx.view_mut();
            rt.install(|| backward::input_grad(dy.view(), w.view(), &mut v));
        }
        let got = dx.to_f32_vec();
        for i in 0..m {
            for kk in 0..k {
                let want: f64 = (0..n)
                    .map(|j| dy.view().get(i, j) as f64 * w.view().get(j, kk) as f64)
                    .sum();
                check_close("input_grad", got[i * k + kk] as f64, want, 1e-4, 1e-5);
            }
        }
    }
}
