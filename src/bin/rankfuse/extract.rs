//! `rankfuse extract` (PHLoRA: a LoRA adapter from base + fully fine-tuned weights) and
//! `rankfuse extract-bench` (randomized rank-k SVD vs faer's full SVD, timed in the same run).

use indicatif::{ProgressBar, ProgressStyle};
use rankfuse::algebra::extract::{self, ExtractOptions, RankRule};
use rankfuse::algebra::svd::{self, RsvdOptions};
use rankfuse::{DType, Error, Result, Runtime, Weights};
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args)]
pub struct Args {
    /// Base weights (.safetensors or .safetensors.index.json).
    #[arg(long)]
    base: PathBuf,
    /// Fully fine-tuned weights, same names and shapes.
    #[arg(long)]
    tuned: PathBuf,
    /// Keep the smallest rank whose energy Σσ_i²/||ΔW||_F² reaches this (default 0.90).
    #[arg(long, conflicts_with = "rank")]
    energy: Option<f64>,
    /// A fixed rank for every layer instead of an energy threshold.
    #[arg(long)]
    rank: Option<usize>,
    /// Rank cap per layer.
    #[arg(long, default_value_t = 128)]
    max_rank: usize,
    /// Module globs (`*` crosses dots), comma-separated, e.g. '*.q_proj,*.v_proj'.
    #[arg(long)]
    modules: Option<String>,
    /// Write rsLoRA (lora_alpha = √r) instead of LoRA (lora_alpha = r); the scale is 1 either way.
    #[arg(long)]
    rslora: bool,
    /// dtype of the written A and B (f32, f16, bf16).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Randomized SVD: oversampling columns.
    #[arg(long, default_value_t = 20)]
    oversample: usize,
    /// Randomized SVD: power iterations.
    #[arg(long, default_value_t = 7)]
    power_iters: usize,
    /// Also write energy.svg (energy kept vs rank, per layer).
    #[arg(long)]
    svg: bool,
    /// Output PEFT folder (plus extract_report.json / .md).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(rt: &Runtime, a: &Args) -> Result<()> {
    let rule = match (a.energy, a.rank) {
        (_, Some(r)) => RankRule::Fixed(r),
        (Some(e), None) => RankRule::Energy(e),
        (None, None) => RankRule::Energy(0.90),
    };
    let dtype = DType::parse(&a.dtype).ok_or_else(|| {
        Error::invalid(format!("--dtype '{}': expected f32, f16 or bf16", a.dtype))
    })?;
    let opts = ExtractOptions {
        rule,
        max_rank: a.max_rank,
        modules: a.modules.iter().cloned().collect(),
        rslora: a.rslora,
        dtype,
        oversample: a.oversample,
        power_iters: a.power_iters,
        threads: rt.threads(),
        ..Default::default()
    };
    let base = Weights::open(&a.base)?;
    let tuned = Weights::open(&a.tuned)?;
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} layers, ETA {eta} {wide_msg}",
        )
        .map_err(|e| Error::internal(e.to_string()))?,
    );
    let progress = |done: usize, total: usize, name: &str| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
        bar.set_message(name.to_string());
    };
    let ex = extract::extract(&base, &tuned, &opts, &progress)?;
    bar.finish_and_clear();
    extract::write(&ex, &a.out, a.svg)?;
    let r = &ex.report;
    let mean_e = r.layers.iter().map(|l| l.energy).sum::<f64>() / r.layers.len() as f64;
    let worst = r.layers.iter().map(|l| l.rel_error).fold(0f64, f64::max);
    eprintln!(
        "extracted {} modules ({} skipped) in {:.2} s: {} adapter parameters ({:.2}% of dense), mean energy {:.4}, worst rel. error {:.4}; wrote {}",
        r.layers.len(),
        r.skipped.len(),
        r.seconds,
        r.adapter_params,
        100.0 * r.adapter_params as f64 / r.dense_params.max(1) as f64,
        mean_e,
        worst,
        a.out.display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Matrix sizes (square), comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![2048usize, 4096])]
    sizes: Vec<usize>,
    /// Rank of the truncated SVD.
    #[arg(long, default_value_t = 64)]
    rank: usize,
    /// Spectrum of the test matrix: σ_i = decay^i (1.0 = flat).
    #[arg(long, default_value_t = 0.98)]
    decay: f64,
    /// Skip the full SVD above this size (it is O(n³)).
    #[arg(long, default_value_t = 4096)]
    full_max: usize,
}

/// A test ΔW = Q1 diag(σ) Q2ᵀ-like matrix built cheaply: G1 diag(σ) G2 with Gaussian factors
/// of width n (its spectrum is not exactly σ, but it decays like it), n x n f32.
fn test_matrix(n: usize, decay: f64) -> faer::Mat<f32> {
    let g1 = svd::gaussian(n, n.min(512), 11);
    let g2 = svd::gaussian(n.min(512), n, 12);
    let k = n.min(512);
    let mut g1s = g1.clone();
    for j in 0..k {
        let s = decay.powi(j as i32) as f32;
        for i in 0..n {
            g1s[(i, j)] *= s;
        }
    }
    let noise = svd::gaussian(n, n, 13);
    let mut a = &g1s * &g2;
    for j in 0..n {
        for i in 0..n {
            a[(i, j)] += 1e-3 * noise[(i, j)];
        }
    }
    a
}

pub fn bench(_rt: &Runtime, a: &BenchArgs) -> Result<()> {
    println!("| size | rank | randomized (s) | full SVD (s) | speed-up | rel. error rand. | rel. error exact |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for &n in &a.sizes {
        let m = test_matrix(n, a.decay);
        let total = svd::frobenius_sq(m.as_ref());
        let o = RsvdOptions::default();
        let t0 = Instant::now();
        let f = svd::randomized_svd(m.as_ref(), a.rank, &o)?;
        let t_rand = t0.elapsed().as_secs_f64();
        let err_rand = (1.0 - f.kept_energy(a.rank) / total).max(0.0).sqrt();
        let (t_full, err_full) = if n <= a.full_max {
            let t0 = Instant::now();
            let e = svd::exact_thin_svd(m.as_ref())?;
            let t = t0.elapsed().as_secs_f64();
            (
                Some(t),
                Some((1.0 - e.kept_energy(a.rank) / total).max(0.0).sqrt()),
            )
        } else {
            (None, None)
        };
        let fmt = |x: Option<f64>, p: usize| x.map_or("-".to_string(), |v| format!("{v:.p$}"));
        println!(
            "| {n} | {} | {t_rand:.3} | {} | {} | {err_rand:.6} | {} |",
            a.rank,
            fmt(t_full, 3),
            t_full.map_or("-".into(), |t| format!("{:.1}x", t / t_rand)),
            fmt(err_full, 6)
        );
    }
    Ok(())
}
