//! The fused linear on block-quantized W (Q8_0, Q4_0, Q4_K, Q6_K), random blocks: every kernel
//! variant this CPU runs against the f64 reference on the exactly dequantized W, decode (m <= 8)
//! and GEMM (m > 8) paths, stacked and mixed slots, every x / y dtype; and the refusals.

mod common;

use common::{assert_close, runtimes};
use half::f16;
use rankfuse::backend::cpu::reference;
use rankfuse::rng::SplitMix64;
use rankfuse::{DType, LinearProblem, MatMut, MatRef, Matrix, Slot, Status};

/// `rows` rows of `k` elements of random blocks with small, finite scales (random scale bytes
/// could be NaN/inf f16s, which would test nothing but NaN propagation).
fn random_quant(dt: DType, rows: usize, k: usize, rng: &mut SplitMix64) -> Vec<u8> {
    let nb = k / dt.block_elems();
    let mut out = vec![0u8; rows * nb * dt.size()];
    for b in out.chunks_mut(dt.size()) {
        for v in b.iter_mut() {
            *v = rng.next_u64() as u8;
        }
        // Q6_K: (q - 32) up to 32 times an i8 scale up to 128: d 32x smaller keeps |w| <= 4,
        // as Q8_0's.
        let dscale = if dt == DType::Q6_K { 1.0 / 32.0 } else { 1.0 };
        let d = f16::from_f32(rng.uniform(0.002, 0.03) * dscale)
            .to_bits()
            .to_le_bytes();
        let at = rankfuse::quant::d_offset(dt);
        b[at..at + 2].copy_from_slice(&d);
        if dt == DType::Q4_K {
            let dmin = f16::from_f32(rng.uniform(0.0, 0.02))
                .to_bits()
                .to_le_bytes();
            b[2..4].copy_from_slice(&dmin);
        }
    }
    out
}

fn mat(dt: DType, rows: usize, cols: usize, rng: &mut SplitMix64) -> Matrix {
    Matrix::from_f32(dt, rows, cols, &rng.fill_uniform(rows * cols, -1.0, 1.0)).unwrap()
}

fn ytol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 2e-5,
        DType::F16 => 2e-3,
        _ => 1.6e-2,
    }
}

#[test]
fn quantized_w_matches_the_reference_on_every_variant() {
    let rts = runtimes();
    let mut rng = SplitMix64::new(14);
    for wdt in DType::QUANT {
        // k: whole blocks, more than one super-block; n odd (thread chunks and panels have
        // tails).
        // ld one block wider than k: rows are addressed by whole blocks of ld, not of cols.
        let (n, k) = (37, 512);
        let ld = k + wdt.block_elems();
        let wb = random_quant(wdt, n, ld, &mut rng);
        let w = MatRef::from_bytes(&wb, wdt, n, k, ld).unwrap();
        let a: Vec<Matrix> = [3, 8]
            .iter()
            .map(|&r| mat(DType::F32, r, k, &mut rng))
            .collect();
        let b: Vec<Matrix> = [3, 8]
            .iter()
            .map(|&r| mat(DType::BF16, n, r, &mut rng))
            .collect();
        let gains = mat(DType::F32, 1, 8, &mut rng);
        let bias = mat(DType::F16, 1, n, &mut rng);
        let slots = [
            Some(Slot {
                a: a[0].view(),
                b: b[0].view(),
                scale: 0.7,
                gains: None,
                module: "s0",
            }),
            None,
            Some(Slot {
                a: a[1].view(),
                b: b[1].view(),
                scale: -1.3,
                gains: Some(gains.view()),
                module: "s1",
            }),
        ];
        // Every m of the decode kernels (each has its own register blocking), then GEMM.
        for (m, xdt, ydt) in [
            (1, DType::F32, DType::F32),
            (2, DType::F32, DType::F32),
            (3, DType::BF16, DType::F32),
            (4, DType::F32, DType::F32),
            (5, DType::F16, DType::F16),
            (6, DType::F32, DType::F32),
            (7, DType::F32, DType::F32),
            (8, DType::F32, DType::BF16),
            (9, DType::F32, DType::F32),
            (40, DType::BF16, DType::F32),
        ] {
            let x = mat(xdt, m, k, &mut rng);
            let rs: Vec<i32> = (0..m).map(|i| (i % 4) as i32 - 1).collect();
            for row_slot in [None, Some(rs.as_slice())] {
                let p = LinearProblem {
                    x: x.view(),
                    w,
                    bias: Some(bias.view()),
                    slots: &slots,
                    row_slot,
                };
                let mut want = Matrix::zeros(DType::F32, m, n).unwrap();
                reference::linear(&p, &mut want.view_mut());
                let want = want.to_f32_vec();
                for (isa, rt) in &rts {
                    let mut y = Matrix::zeros(ydt, m, n).unwrap();
                    rt.linear(&p, &mut y.view_mut()).unwrap();
                    let what = format!(
                        "{} w, {} m={m} x {} y {}, mixed={}",
                        isa.name(),
                        wdt.name(),
                        xdt.name(),
                        ydt.name(),
                        row_slot.is_some()
                    );
                    assert_close(&what, &y.to_f32_vec(), &want, 1e-4, ytol(ydt));
                }
            }
        }
    }
}

#[test]
fn reference_dequantizes_exactly() {
    // y = x W^T with x = e_j picks column j of W: the reference's W values are the decoded ones.
    let mut rng = SplitMix64::new(3);
    for wdt in DType::QUANT {
        let (n, k) = (2, 256);
        let wb = random_quant(wdt, n, k, &mut rng);
        let w = MatRef::from_bytes(&wb, wdt, n, k, k).unwrap();
        let wf = w.to_f32_vec();
        for j in [0, 17, 31, 200, 255] {
            let mut xv = vec![0f32; k];
            xv[j] = 1.0;
            let x = MatRef::from_slice(&xv, 1, k, k).unwrap();
            let mut y = vec![0f32; n];
            let p = LinearProblem {
                x,
                w,
                bias: None,
                slots: &[],
                row_slot: None,
            };
            reference::linear(&p, &mut MatMut::from_slice(&mut y, 1, n, n).unwrap());
            assert_eq!(y, vec![wf[j], wf[k + j]], "{} column {j}", wdt.name());
            assert_eq!(w.get(1, j), wf[k + j]);
        }
    }
}

#[test]
fn quantized_dtypes_are_refused_outside_w() {
    let rt = &runtimes()[0].1;
    let mut rng = SplitMix64::new(5);
    let k = 64;
    let wb = random_quant(DType::Q8_0, 4, k, &mut rng);
    let w = MatRef::from_bytes(&wb, DType::Q8_0, 4, k, k).unwrap();
    let x = mat(DType::F32, 2, k, &mut rng);
    // As x (a quantized "x" of the right shape: 2 x 64 from the same bytes).
    let xq = MatRef::from_bytes(&wb, DType::Q8_0, 2, k, k).unwrap();
    let mut y = Matrix::zeros(DType::F32, 2, 4).unwrap();
    let p = LinearProblem {
        x: xq,
        w,
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let e = rt.linear(&p, &mut y.view_mut()).unwrap_err();
    assert_eq!(e.status, Status::DType, "{e}");
    // Columns not a whole number of blocks: SHAPE at the view.
    let e = MatRef::from_bytes(&wb, DType::Q8_0, 1, 48, 48).unwrap_err();
    assert_eq!(e.status, Status::Shape, "{e}");
    let e = MatRef::from_bytes(&wb, DType::Q4_K, 1, 64, 64).unwrap_err();
    assert_eq!(e.status, Status::Shape, "{e}");
    // No owned quantized matrices, no packs, no merges.
    assert_eq!(
        Matrix::zeros(DType::Q4_0, 1, 32).unwrap_err().status,
        Status::DType
    );
    // Q4_0 / Q8_0 pack (8-row interleaved blocks); the K-quants are refused.
    let wk = random_quant(DType::Q4_K, 4, 256, &mut rng);
    let wk = MatRef::from_bytes(&wk, DType::Q4_K, 4, 256, 256).unwrap();
    let e = rt.pack(&wk).err().unwrap();
    assert_eq!(e.status, Status::DType, "{e}");
    assert!(e.message.contains("Q4_K"), "{e}");
    let a = mat(DType::F32, 2, k, &mut rng);
    let b = mat(DType::F32, 4, 2, &mut rng);
    let slot = Slot {
        a: a.view(),
        b: b.view(),
        scale: 1.0,
        gains: None,
        module: "m",
    };
    let e = rankfuse::algebra::merge::merged_tensor(&slot, w, 1.0, DType::F32).unwrap_err();
    assert_eq!(e.status, Status::DType);
    assert!(e.message.contains("Q8_0"), "{e}");
    // Good call for contrast: the same W as w works.
    let p = LinearProblem { x: x.view(), ..p };
    rt.linear(&p, &mut y.view_mut()).unwrap();
}

fn q8_runtimes() -> Vec<(rankfuse::backend::cpu::Isa, rankfuse::Runtime)> {
    common::runtimes_with(rankfuse::RuntimeOptions {
        num_threads: 2,
        act_quant: rankfuse::ActQuant::Q8,
        ..Default::default()
    })
}

/// x whose 32-value blocks stress the quantizer: all zeros (scale 0), one outlier among tiny
/// values, exact ties at +-0.5 steps, and plain random blocks.
fn hostile_x(xdt: DType, m: usize, k: usize, rng: &mut SplitMix64) -> Matrix {
    let mut v = rng.fill_uniform(m * k, -1.0, 1.0);
    for (b, blk) in v.chunks_mut(32).enumerate() {
        match b % 5 {
            0 => blk.fill(0.0),
            1 => {
                blk.iter_mut().for_each(|e| *e *= 1e-3);
                blk[7] = -40.0;
            }
            2 => {
                // amax 127 -> d = 1: values k + 0.5 round away from zero.
                for (j, e) in blk.iter_mut().enumerate() {
                    *e = (j as f32 - 16.0) + 0.5;
                }
                blk[0] = 127.0;
            }
            _ => {}
        }
    }
    Matrix::from_f32(xdt, m, k, &v).unwrap()
}

#[test]
fn q8_activations_match_their_reference_on_every_variant() {
    let rts = q8_runtimes();
    let mut rng = SplitMix64::new(88);
    for wdt in DType::QUANT {
        let (n, k) = (29, 768);
        let ld = k + wdt.block_elems();
        let wb = random_quant(wdt, n, ld, &mut rng);
        let w = MatRef::from_bytes(&wb, wdt, n, k, ld).unwrap();
        let a = mat(DType::F32, 5, k, &mut rng);
        let b = mat(DType::F16, n, 5, &mut rng);
        let bias = mat(DType::F32, 1, n, &mut rng);
        let slots = [Some(Slot {
            a: a.view(),
            b: b.view(),
            scale: 0.9,
            gains: None,
            module: "s0",
        })];
        // Every decode m (each has its own register blocking), and m = 9: exact GEMM.
        for m in 1..=9 {
            let xdt = [DType::F32, DType::BF16, DType::F16][m % 3];
            let x = hostile_x(xdt, m, k, &mut rng);
            let rs: Vec<i32> = (0..m).map(|i| (i % 2) as i32 - 1).collect();
            for row_slot in [None, Some(rs.as_slice())] {
                let p = LinearProblem {
                    x: x.view(),
                    w,
                    bias: Some(bias.view()),
                    slots: &slots,
                    row_slot,
                };
                let mut want = Matrix::zeros(DType::F32, m, n).unwrap();
                reference::linear_act_q8(&p, &mut want.view_mut());
                let want = want.to_f32_vec();
                for (isa, rt) in &rts {
                    let mut y = Matrix::zeros(DType::F32, m, n).unwrap();
                    rt.linear(&p, &mut y.view_mut()).unwrap();
                    let what = format!("Q8 activations, {} {} m={m}", isa.name(), wdt.name());
                    assert_close(&what, &y.to_f32_vec(), &want, 1e-3, 1e-4);
                }
            }
        }
    }
}

/// The documented error of the Q8 mode: each x value moves by at most max|x_block| / 254, so
/// `|y_q8 - y_exact| <= sum_blocks max|x_b| / 254 * sum_{j in b} |w_j|`; and the bound is not
/// vacuous (the error is nonzero and within a small factor of it somewhere).
#[test]
fn q8_activation_error_stays_within_its_bound() {
    let mut rng = SplitMix64::new(254);
    for wdt in DType::QUANT {
        let (m, n, k) = (3, 17, 512);
        let wb = random_quant(wdt, n, k, &mut rng);
        let w = MatRef::from_bytes(&wb, wdt, n, k, k).unwrap();
        let wf = w.to_f32_vec();
        let x = mat(DType::F32, m, k, &mut rng);
        let xf = x.to_f32_vec();
        let p = LinearProblem {
            x: x.view(),
            w,
            bias: None,
            slots: &[],
            row_slot: None,
        };
        let (mut exact, mut q8) = (
            Matrix::zeros(DType::F32, m, n).unwrap(),
            Matrix::zeros(DType::F32, m, n).unwrap(),
        );
        reference::linear(&p, &mut exact.view_mut());
        reference::linear_act_q8(&p, &mut q8.view_mut());
        let (exact, q8) = (exact.to_f32_vec(), q8.to_f32_vec());
        let mut max_ratio = 0f64;
        for i in 0..m {
            for j in 0..n {
                let mut bound = 0f64;
                for blk in 0..k / 32 {
                    let xs = &xf[i * k + blk * 32..i * k + (blk + 1) * 32];
                    let amax = xs.iter().fold(0f32, |a, v| a.max(v.abs())) as f64;
                    let wsum: f64 = wf[j * k + blk * 32..j * k + (blk + 1) * 32]
                        .iter()
                        .map(|v| v.abs() as f64)
                        .sum();
                    bound += amax / 254.0 * wsum;
                }
                let err = (q8[i * n + j] as f64 - exact[i * n + j] as f64).abs();
                assert!(
                    err <= bound * 1.0001 + 1e-6,
                    "{} ({i},{j}): error {err:e} over the bound {bound:e}",
                    wdt.name()
                );
                max_ratio = max_ratio.max(err / bound);
            }
        }
        assert!(
            max_ratio > 1e-3,
            "{}: Q8 equals exact everywhere: x was not quantized",
            wdt.name()
        );
    }
}

/// `rf_weights_pack` of a Q4_0 / Q8_0 W (8-row interleaved blocks) on every variant: exact and
/// Q8-activation decode for every m, the GEMM path (m > 8), n not a multiple of 8 (thread
/// chunks end inside a group), ld > k, stacked and mixed slots; against the reference on the
/// unpacked W.
#[test]
fn packed_q4_0_and_q8_0_match_the_reference_on_every_variant() {
    let exact = runtimes();
    let q8 = q8_runtimes();
    let mut rng = SplitMix64::new(140);
    for wdt in [DType::Q4_0, DType::Q8_0] {
        for (n, k) in [(37, 512), (8, 64), (3, 32)] {
            let ld = k + 32;
            let wb = random_quant(wdt, n, ld, &mut rng);
            let w = MatRef::from_bytes(&wb, wdt, n, k, ld).unwrap();
            let a = mat(DType::F32, 4, k, &mut rng);
            let b = mat(DType::BF16, n, 4, &mut rng);
            let bias = mat(DType::F32, 1, n, &mut rng);
            let slots = [
                Some(Slot {
                    a: a.view(),
                    b: b.view(),
                    scale: 0.8,
                    gains: None,
                    module: "s0",
                }),
                None,
            ];
            for m in [1, 2, 3, 4, 5, 6, 7, 8, 9, 20] {
                let xdt = [DType::F32, DType::BF16, DType::F16][m % 3];
                let x = hostile_x(xdt, m, k, &mut rng);
                let rs: Vec<i32> = (0..m).map(|i| (i % 3) as i32 - 1).collect();
                for row_slot in [None, Some(rs.as_slice())] {
                    let p = LinearProblem {
                        x: x.view(),
                        w,
                        bias: Some(bias.view()),
                        slots: &slots,
                        row_slot,
                    };
                    let (mut want, mut want_q8) = (
                        Matrix::zeros(DType::F32, m, n).unwrap(),
                        Matrix::zeros(DType::F32, m, n).unwrap(),
                    );
                    reference::linear(&p, &mut want.view_mut());
                    reference::linear_act_q8(&p, &mut want_q8.view_mut());
                    for (rts, want, mode) in [(&exact, &want, "exact"), (&q8, &want_q8, "q8")] {
                        for (isa, rt) in rts {
                            let pk = rt.pack(&w).unwrap();
                            let rec = 16 + 8 * (wdt.size() - 2);
                            assert_eq!(pk.bytes(), n.div_ceil(8) * (k / 32) * rec);
                            let mut y = Matrix::zeros(DType::F32, m, n).unwrap();
                            rt.linear_packed(&p, &pk, &mut y.view_mut()).unwrap();
                            let what = format!(
                                "packed {} {} {mode} n={n} k={k} m={m} mixed={}",
                                isa.name(),
                                wdt.name(),
                                row_slot.is_some()
                            );
                            assert_close(&what, &y.to_f32_vec(), &want.to_f32_vec(), 1e-3, 1e-4);
                        }
                    }
                }
            }
        }
    }
}
