//! One LoRA training step (fused forward + backward with dx + AdamW) on one layer, and the cost
//! of a DyLoRA step at truncation rank b against the full rank. Reports, asserts nothing.
//!
//!   cargo run --release --example train_step_bench -- [--k 4096] [--n 4096] [--m 512] [--r 16]
//!       [--dtype bf16] [--iters 5]
//!
//! Each figure is the median of `iters` timed runs after one warm-up run.

use rankfuse::matrix::{MatMut, Matrix};
use rankfuse::rng::SplitMix64;
use rankfuse::runtime::slot;
use rankfuse::train::{self, AdamW, Mode};
use rankfuse::{DType, LinearProblem, Lora, Result, Runtime, Scaling};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let get = |f: &str, d: &str| -> String {
        a.iter()
            .position(|x| x == f)
            .and_then(|i| a.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_string())
    };
    let (k, n, m, r) = (
        get("--k", "4096").parse::<usize>().unwrap(),
        get("--n", "4096").parse::<usize>().unwrap(),
        get("--m", "512").parse::<usize>().unwrap(),
        get("--r", "16").parse::<usize>().unwrap(),
    );
    let dt = DType::parse(&get("--dtype", "bf16")).expect("--dtype f32|f16|bf16");
    let iters: usize = get("--iters", "5").parse().unwrap();
    let rt = Runtime::cpu()?;
    let mut rng = SplitMix64::new(1);
    let x = Matrix::from_f32(dt, m, k, &rng.fill_uniform(m * k, -1.0, 1.0))?;
    let w = Matrix::from_f32(dt, n, k, &rng.fill_uniform(n * k, -0.02, 0.02))?;
    let dy = Matrix::from_f32(dt, m, n, &rng.fill_uniform(m * n, -1.0, 1.0))?;
    let mut y = Matrix::zeros(dt, m, n)?;
    let mut dx = Matrix::zeros(dt, m, k)?;
    let mut l = Lora::new_trainable("layer", k, n, r, 2.0 * r as f32, Scaling::Lora, dt, 3)?;
    let opt = AdamW::default();
    println!(
        "one training step, {n} x {k} layer, m = {m}, r = {r}, {}, {} threads (median of {iters})",
        dt.name(),
        rt.threads()
    );
    let time = |what: &str, f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        let mut ts = Vec::new();
        for _ in 0..iters {
            let t = Instant::now();
            f()?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let t = median(ts);
        println!("  {what:<44} {t:9.2} ms");
        Ok(t)
    };
    let fwd = |l: &Lora, b: usize, y: &mut Matrix| -> Result<()> {
        let slots = [if b == 0 { None } else { Some(slot(l, b, 1.0)?) }];
        let p = LinearProblem {
            x: x.view(),
            w: w.view(),
            bias: None,
            slots: &slots,
            row_slot: None,
        };
        let mut yv: MatMut<'_> = y.view_mut();
        rt.linear(&p, &mut yv)
    };
    let t_fwd_base = time("forward, base only", &mut || fwd(&l, 0, &mut y))?;
    let t_dx_base = time("backward dx = dy W (no adapter)", &mut || {
        let mut dxv = dx.view_mut();
        rt.install(|| train::backward::input_grad(dy.view(), w.view(), &mut dxv));
        Ok(())
    })?;
    let step =
        |l: &mut Lora, b: usize, mode: Mode, y: &mut Matrix, dx: &mut Matrix| -> Result<()> {
            fwd(l, b, y)?;
            train::zero_grad(l)?;
            let mut dxv = dx.view_mut();
            rankfuse::training::backward(
                &rt,
                l,
                x.view(),
                w.view(),
                dy.view(),
                b,
                mode,
                Some(&mut dxv),
            )?;
            train::adamw_step(l, &opt)
        };
    let t_fwd = time("forward, fused with adapter", &mut || fwd(&l, r, &mut y))?;
    let t_bwd = time("backward (dA, dB, dx)", &mut || {
        train::zero_grad(&mut l)?;
        let mut dxv = dx.view_mut();
        rankfuse::training::backward(
            &rt,
            &mut l,
            x.view(),
            w.view(),
            dy.view(),
            r,
            Mode::Nested,
            Some(&mut dxv),
        )
    })?;
    let t_adam = time("AdamW step", &mut || train::adamw_step(&mut l, &opt))?;
    let t_step = time("full step (fwd + bwd + AdamW)", &mut || {
        step(&mut l, r, Mode::Nested, &mut y, &mut dx)
    })?;
    let base = t_fwd_base + t_dx_base;
    println!("  base part (fwd base + dx base)                 {base:9.2} ms; adapter part at r = {r}: {:.2} ms", t_step - base);
    println!(
        "  fused fwd / base fwd = {:.3}; bwd / dx-only = {:.3}; AdamW = {:.2} ms",
        t_fwd / t_fwd_base,
        t_bwd / t_dx_base,
        t_adam
    );
    println!("DyLoRA step at truncation rank b (frozen mode) vs the full rank:");
    for b in [1usize, r / 4, r / 2, r] {
        if b == 0 {
            continue;
        }
        let t = time(&format!("step at b = {b}"), &mut || {
            step(&mut l, b, Mode::Frozen, &mut y, &mut dx)
        })?;
        println!(
            "      adapter part {:.2} ms = {:.2} of full-rank adapter part (b/r = {:.2})",
            t - base,
            (t - base) / (t_step - base),
            b as f64 / r as f64
        );
    }
    Ok(())
}
