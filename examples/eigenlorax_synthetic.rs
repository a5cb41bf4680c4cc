//! EigenLoRAx loadings-only training vs full LoRA training on a synthetic task (docs/algebra.md).
//!
//! A frozen layer W0 (256 x 256). Tasks are low-rank updates ΔW = B A whose factors live in a
//! shared 16-dimensional subspace per side (the setting the paper's basis exploits). Eight
//! source tasks give eight rank-8 LoRA adapters (their exact factors plus 5% noise, standing in
//! for trained adapters); `eigen::build` keeps K = 16 principal directions per side (+ 4
//! augmented random ones). A new task from the same subspace is then learnt two ways, with the
//! same data, steps and AdamW: a rank-8 LoRA (PEFT init), and EigenLoRAx loadings (rank 8 on the
//! basis, basis frozen). A second new task outside the subspace shows where the basis cannot
//! help. Everything runs through the public training API (`Runtime::linear_with`,
//! `training::backward`, `train::adamw_step`).
//!
//! Run: `cargo run --release --example eigenlorax_synthetic`

use rankfuse::adapter::{Adapter, Lora, TensorData};
use rankfuse::algebra::eigen;
use rankfuse::methods::{resolve, Slots};
use rankfuse::rng::SplitMix64;
use rankfuse::train::{self, AdamW, Mode};
use rankfuse::{DType, LinearProblem, Matrix, Result, Runtime, Scaling};

const D: usize = 256;
const SUB: usize = 16;
const R: usize = 8;

fn gauss(g: &mut SplitMix64, n: usize, s: f32) -> Vec<f32> {
    (0..n).map(|_| s * g.normal()).collect()
}

/// Orthonormal columns (D x SUB) by Gram-Schmidt.
fn subspace(g: &mut SplitMix64) -> Vec<Vec<f32>> {
    let mut cols: Vec<Vec<f32>> = Vec::new();
    while cols.len() < SUB {
        let mut v = gauss(g, D, 1.0);
        for c in &cols {
            let d: f32 = c.iter().zip(&v).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(c).for_each(|(x, c)| *x -= d * c);
        }
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= n);
        cols.push(v);
    }
    cols
}

/// A task's factors A (R x D), B (D x R) inside the subspaces (pa, pb), or anywhere if None.
/// A pair of subspaces (A side, B side), each SUB orthonormal columns of length D.
type Subspaces<'a> = (&'a [Vec<f32>], &'a [Vec<f32>]);

fn task(g: &mut SplitMix64, sub: Option<Subspaces<'_>>) -> (Vec<f32>, Vec<f32>) {
    let mut a = vec![0f32; R * D];
    let mut b = vec![0f32; D * R];
    match sub {
        Some((pa, pb)) => {
            for j in 0..R {
                let ca = gauss(g, SUB, 1.0 / (SUB as f32).sqrt());
                let cb = gauss(g, SUB, 1.0 / (SUB as f32).sqrt());
                for (s, (pa_s, pb_s)) in pa.iter().zip(pb).enumerate() {
                    for i in 0..D {
                        a[j * D + i] += ca[s] * pa_s[i];
                        b[i * R + j] += cb[s] * pb_s[i];
                    }
                }
            }
        }
        None => {
            a = gauss(g, R * D, 1.0 / (D as f32).sqrt());
            b = gauss(g, D * R, 1.0 / (D as f32).sqrt());
        }
    }
    (a, b)
}

fn delta(a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut dw = vec![0f32; D * D];
    for i in 0..D {
        for j in 0..R {
            let bij = b[i * R + j];
            for c in 0..D {
                dw[i * D + c] += bij * a[j * D + c];
            }
        }
    }
    dw
}

fn forward(rt: &Runtime, l: &Lora, x: &Matrix, w: &Matrix) -> Result<Vec<f32>> {
    let s = Slots::from_any([Some(resolve(l, 0, 1.0)?)]);
    let p = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &s.low,
        row_slot: None,
    };
    let mut y = Matrix::zeros(DType::F32, x.view().rows, D)?;
    rt.linear_with(&p, &s.methods, &mut y.view_mut())?;
    Ok(y.to_f32_vec())
}

/// Relative test error ||y - t|| / ||t - y0|| (1 = no better than the frozen layer).
fn test_error(rt: &Runtime, l: &Lora, w: &Matrix, dw: &[f32], g: &mut SplitMix64) -> Result<f64> {
    let n = 256;
    let xv = gauss(g, n * D, 1.0);
    let x = Matrix::from_f32(DType::F32, n, D, &xv)?;
    let y = forward(rt, l, &x, w)?;
    let w0 = w.to_f32_vec();
    let (mut num, mut den) = (0f64, 0f64);
    for i in 0..n {
        for o in 0..D {
            let base: f64 = (0..D)
                .map(|c| xv[i * D + c] as f64 * w0[o * D + c] as f64)
                .sum();
            let d: f64 = (0..D)
                .map(|c| xv[i * D + c] as f64 * dw[o * D + c] as f64)
                .sum();
            num += (y[i * D + o] as f64 - base - d).powi(2);
            den += d * d;
        }
    }
    Ok((num / den).sqrt())
}

fn train_one(
    rt: &Runtime,
    l: &mut Lora,
    w: &Matrix,
    dw: &[f32],
    seed: u64,
    lr: f32,
) -> Result<f64> {
    let mut g = SplitMix64::new(seed);
    let opt = AdamW {
        lr,
        weight_decay: 0.0,
        ..AdamW::default()
    };
    let wt: Vec<f32> = w.to_f32_vec().iter().zip(dw).map(|(a, b)| a + b).collect();
    let wt = Matrix::from_f32(DType::F32, D, D, &wt)?;
    let m = 64;
    for _step in 0..300 {
        let xv = gauss(&mut g, m * D, 1.0);
        let x = Matrix::from_f32(DType::F32, m, D, &xv)?;
        let y = forward(rt, l, &x, w)?;
        let mut t = Matrix::zeros(DType::F32, m, D)?;
        let tp = LinearProblem {
            x: x.view(),
            w: wt.view(),
            bias: None,
            slots: &[],
            row_slot: None,
        };
        rt.linear(&tp, &mut t.view_mut())?;
        let t = t.to_f32_vec();
        let dy: Vec<f32> = y
            .iter()
            .zip(&t)
            .map(|(y, t)| 2.0 * (y - t) / (m * D) as f32)
            .collect();
        let dym = Matrix::from_f32(DType::F32, m, D, &dy)?;
        train::zero_grad(l)?;
        rankfuse::training::backward(rt, l, x.view(), w.view(), dym.view(), 0, Mode::Nested, None)?;
        train::adamw_step(l, &opt)?;
    }
    test_error(rt, l, w, dw, &mut SplitMix64::new(seed ^ 0x7E57))
}

fn main() -> Result<()> {
    let rt = Runtime::cpu()?;
    println!("| source noise | new task | method | trainable parameters | relative test error |");
    println!("| ---: | --- | --- | ---: | ---: |");
    for noise in [0.05f32, 0.01] {
        run(&rt, noise)?;
    }
    Ok(())
}

fn run(rt: &Runtime, noise: f32) -> Result<()> {
    let mut g = SplitMix64::new(2024);
    let (pa, pb) = (subspace(&mut g), subspace(&mut g));
    let w = Matrix::from_f32(
        DType::F32,
        D,
        D,
        &gauss(&mut g, D * D, 1.0 / (D as f32).sqrt()),
    )?;
    // Eight source adapters in the subspace, with noise.
    let mut sources = Vec::new();
    for t in 0..8 {
        let (mut a, mut b) = task(&mut g, Some((&pa, &pb)));
        for v in a.iter_mut().chain(b.iter_mut()) {
            *v += noise * g.normal() / (D as f32).sqrt();
        }
        let mut ad = Adapter::new(&format!("source{t}"));
        ad.add(Lora::new(
            "layer",
            TensorData::Owned(Matrix::from_f32(DType::F32, R, D, &a)?),
            TensorData::Owned(Matrix::from_f32(DType::F32, D, R, &b)?),
            R as f32,
            Scaling::Lora,
            0.0,
        )?)?;
        sources.push(ad);
    }
    let basis = eigen::build(&sources, SUB, 4, 7)?;
    let bm = basis.module_arc("layer")?.clone();
    eprintln!(
        "noise {noise}: basis K = {} (+{} augmented), variance kept A {:.4} B {:.4}",
        SUB, 4, bm.explained_a, bm.explained_b
    );
    for (label, sub) in [
        ("in the sources' subspace", Some((&pa[..], &pb[..]))),
        ("outside it (random)", None),
    ] {
        let (a, b) = task(&mut g, sub);
        let dw = delta(&a, &b);
        let mut lora =
            Lora::new_trainable("layer", D, D, R, R as f32, Scaling::Lora, DType::F32, 11)?;
        let e_lora = train_one(rt, &mut lora, &w, &dw, 5, 1e-2)?;
        let mut eig = Lora::new_eigen(bm.clone(), R, 1.0, 12)?;
        let e_eig = train_one(rt, &mut eig, &w, &dw, 5, 1e-2)?;
        println!(
            "| {noise} | {label} | LoRA r = {R} | {} | {e_lora:.4} |",
            R * 2 * D
        );
        println!(
            "| {noise} | {label} | EigenLoRAx r = {R}, K = {} | {} | {e_eig:.4} |",
            bm.k(),
            2 * bm.k() * R
        );
    }
    Ok(())
}
