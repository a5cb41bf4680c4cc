//! KRAdapter and EigenLoRAx slots in the fused linear: mixed batches with LoRA and base-only
//! rows, stacked slots, truncation, dtype mixes and ld > cols, against an f64 reference built
//! from each module's dense ΔW.

mod common;

use rankfuse::methods::{resolve, Slots};
use rankfuse::rng::SplitMix64;
use rankfuse::{DType, LinearProblem, Lora, Matrix, Runtime};

use common::kinds::modules;

#[allow(clippy::too_many_arguments)]
fn reference(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    mods: &[(&Lora, f32)],
    row_slot: Option<&[i32]>,
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let deltas: Vec<Vec<f32>> = mods
        .iter()
        .map(|(l, _)| l.dense_delta(0).unwrap())
        .collect();
    let mut y = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = bias[j] as f64;
            for c in 0..k {
                acc += x[i * k + c] as f64 * w[j * k + c] as f64;
            }
            for (s, (_, mult)) in mods.iter().enumerate() {
                if row_slot.is_some_and(|rs| rs[i] != s as i32) {
                    continue;
                }
                for c in 0..k {
                    acc += *mult as f64 * x[i * k + c] as f64 * deltas[s][j * k + c] as f64;
                }
            }
            y[i * n + j] = acc as f32;
        }
    }
    y
}

#[test]
fn method_slots_match_the_dense_reference() {
    let rt = Runtime::cpu().unwrap();
    for (n, k) in [(12, 20), (20, 12), (16, 16), (7, 50), (33, 9)] {
        let mods = modules(n, k, (n * 100 + k) as u64);
        let mults = [1.0f32, 0.75, 1.0, 2.0, 1.0];
        let m = 11;
        let mut g = SplitMix64::new(5);
        let ld = k + 3;
        let xs = g.fill_uniform(m * ld, -1.0, 1.0);
        let w = g.fill_uniform(n * k, -1.0, 1.0);
        let bias = g.fill_uniform(n, -1.0, 1.0);
        let slots = Slots::from_any(
            mods.iter()
                .zip(mults)
                .map(|(l, s)| Some(resolve(l, 0, s).unwrap())),
        );
        let mixed: Vec<i32> = (0..m as i32).map(|i| i % 6 - 1).collect();
        for (xdt, wdt, ydt) in [
            (DType::F32, DType::F32, DType::F32),
            (DType::BF16, DType::F16, DType::F32),
            (DType::F16, DType::BF16, DType::BF16),
            (DType::F32, DType::F32, DType::F16),
        ] {
            let xm = Matrix::from_f32(xdt, m, ld, &xs).unwrap();
            let xv = xm.view().top_left(m, k);
            let wm = Matrix::from_f32(wdt, n, k, &w).unwrap();
            let bm = Matrix::from_f32(DType::F32, 1, n, &bias).unwrap();
            // The reference sees the inputs as the kernels do (rounded to their dtypes).
            let xr: Vec<f32> = {
                let v = xm.to_f32_vec();
                (0..m)
                    .flat_map(|i| v[i * ld..i * ld + k].to_vec())
                    .collect()
            };
            let wr = wm.to_f32_vec();
            for rs in [Some(&mixed[..]), None] {
                let p = LinearProblem {
                    x: xv,
                    w: wm.view(),
                    bias: Some(bm.view()),
                    slots: &slots.low,
                    row_slot: rs,
                };
                let mut y = Matrix::zeros(ydt, m, n).unwrap();
                rt.linear_with(&p, &slots.methods, &mut y.view_mut())
                    .unwrap();
                let pairs: Vec<(&Lora, f32)> = mods.iter().zip(mults).collect();
                let want = reference(&xr, &wr, &bias, &pairs, rs, m, n, k);
                let tol = if ydt == DType::F32 { 2e-4 } else { 1e-2 };
                common::assert_close(
                    &format!("{n}x{k} {xdt:?}/{wdt:?}/{ydt:?} mixed={}", rs.is_some()),
                    &y.to_f32_vec(),
                    &want,
                    tol,
                    tol,
                );
            }
        }
    }
}

/// Σ dy ⊙ (x ΔWᵀ) in f64 from the module's dense ΔW (linear in every single parameter).
fn loss(l: &Lora, x: &[f32], dy: &[f32], m: usize, n: usize, k: usize) -> f64 {
    let dw = l.dense_delta(0).unwrap();
    let mut s = 0f64;
    for i in 0..m {
        for j in 0..n {
            let v: f64 = (0..k)
                .map(|c| x[i * k + c] as f64 * dw[j * k + c] as f64)
                .sum();
            s += dy[i * n + j] as f64 * v;
        }
    }
    s
}

/// KRAdapter and EigenLoRAx gradients (U, V; loadings with gains and a truncated basis) and dx
/// against central finite differences of the dense forward, through `training::backward`.
#[test]
fn method_gradients_match_finite_differences() {
    let rt = Runtime::cpu().unwrap();
    for (n, k) in [(12, 20), (20, 12), (9, 9)] {
        let mut mods = modules(n, k, 7 + n as u64);
        mods[2].enable_gains(1.0).unwrap();
        let mut g = SplitMix64::new(3);
        let gains: Vec<bool> = vec![true, false, true];
        mods[2].set_mask(&gains).unwrap();
        let m = 5;
        let x = g.fill_uniform(m * k, -1.0, 1.0);
        let dy = g.fill_uniform(m * n, -1.0, 1.0);
        let w = g.fill_uniform(n * k, -1.0, 1.0);
        let xm = Matrix::from_f32(DType::F32, m, k, &x).unwrap();
        let dym = Matrix::from_f32(DType::F32, m, n, &dy).unwrap();
        let wm = Matrix::from_f32(DType::F32, n, k, &w).unwrap();
        for idx in [1usize, 2, 3] {
            let l = &mut mods[idx];
            l.train_state_mut().unwrap().zero_grad();
            let mut dx = Matrix::zeros(DType::F32, m, k).unwrap();
            rankfuse::training::backward(
                &rt,
                l,
                xm.view(),
                wm.view(),
                dym.view(),
                0,
                rankfuse::train::Mode::Nested,
                Some(&mut dx.view_mut()),
            )
            .unwrap();
            let what = format!("{} {n}x{k}", l.kind.name());
            // dx = dy W + dy ΔW.
            let dw = l.dense_delta(0).unwrap();
            let want: Vec<f32> = (0..m * k)
                .map(|e| {
                    let (i, c) = (e / k, e % k);
                    (0..n)
                        .map(|j| dy[i * n + j] as f64 * (w[j * k + c] + dw[j * k + c]) as f64)
                        .sum::<f64>() as f32
                })
                .collect();
            common::assert_close(&format!("{what} dx"), &dx.to_f32_vec(), &want, 1e-4, 1e-4);
            let t = l.train_state().unwrap().clone();
            let (na, nb) = (t.a.len(), t.b.len());
            let mut checked = 0;
            for p in (0..na + nb).step_by(((na + nb) / 12).max(1)) {
                let (an, is_a) = if p < na {
                    (t.ga[p], true)
                } else {
                    (t.gb[p - na], false)
                };
                let h = 1e-2f32;
                let mut at = t.a.clone();
                let mut bt = t.b.clone();
                let bump = |at: &mut Vec<f32>, bt: &mut Vec<f32>, d: f32| {
                    if is_a {
                        at[p] += d
                    } else {
                        bt[p - na] += d
                    }
                };
                bump(&mut at, &mut bt, h);
                let mut lp =
                    Lora::new_trainable("t", 1, 1, 1, 1.0, rankfuse::Scaling::Lora, DType::F32, 0)
                        .unwrap();
                std::mem::swap(&mut lp, l);
                // l is now a throwaway; lp the module: set, measure, restore.
                lp.set_weights(&at, &bt).unwrap();
                let up = loss(&lp, &x, &dy, m, n, k);
                bump(&mut at, &mut bt, -2.0 * h);
                lp.set_weights(&at, &bt).unwrap();
                let down = loss(&lp, &x, &dy, m, n, k);
                lp.set_weights(&t.a, &t.b).unwrap();
                std::mem::swap(&mut lp, l);
                let fd = ((up - down) / (2.0 * h as f64)) as f32;
                assert!(
                    (fd - an).abs() <= 2e-3 * (1.0 + fd.abs()),
                    "{what}: parameter {p} ({}): finite difference {fd}, backward {an}",
                    if is_a { "A" } else { "B" }
                );
                checked += 1;
            }
            assert!(checked > 3, "{what}");
            // EigenLoRAx: the masked component gets no gradient.
            if idx >= 2 && l.capacity == 3 {
                let kb = t.a.len() / 3;
                assert!(
                    t.ga[kb..2 * kb].iter().all(|&v| v == 0.0),
                    "{what}: masked component"
                );
            }
        }
        // Gains: dE of the eigen module with gains against a finite difference.
        let l = &mut mods[2];
        let ge = l.train_state().unwrap().ge.clone();
        let e0 = l.train_state().unwrap().e.clone().unwrap();
        for c in [0usize, 2] {
            let h = 1e-2f32;
            set_gain(l, c, e0[c] + h);
            let up = loss(l, &x, &dy, m, n, k);
            set_gain(l, c, e0[c] - h);
            let down = loss(l, &x, &dy, m, n, k);
            set_gain(l, c, e0[c]);
            let fd = ((up - down) / (2.0 * h as f64)) as f32;
            assert!(
                (fd - ge[c]).abs() <= 2e-3 * (1.0 + fd.abs()),
                "dE[{c}]: {fd} vs {}",
                ge[c]
            );
        }
    }
}

fn set_gain(l: &mut Lora, c: usize, v: f32) {
    let t = l.train_state_mut().unwrap();
    t.e.as_mut().unwrap()[c] = v;
    t.refresh_gains();
}
