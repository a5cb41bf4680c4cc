//! `rankfuse bench`: fused vs base-only vs naive unfused, timed in the same run.

use rankfuse::bench::{run as run_bench, BenchOptions};
use rankfuse::{DType, Error, Result, Runtime};
use std::time::Duration;

#[derive(clap::Args)]
pub struct Args {
    /// Rows (batch) to time, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1usize, 16, 128, 512])]
    m: Vec<usize>,
    /// k:n shapes, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["4096:4096".to_string(), "4096:11008".to_string()])]
    shapes: Vec<String>,
    /// Adapter ranks.
    #[arg(long, value_delimiter = ',', default_values_t = vec![8usize, 16, 64])]
    ranks: Vec<usize>,
    /// dtypes (f32, f16, bf16).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["f32".to_string(), "bf16".to_string()])]
    dtypes: Vec<String>,
    /// Minimum milliseconds per variant per case.
    #[arg(long, default_value_t = 300)]
    min_ms: u64,
    /// Write the JSON here (default: stdout after the table).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

pub fn run(rt: &Runtime, a: &Args) -> Result<()> {
    let shapes = a
        .shapes
        .iter()
        .map(|s| {
            let (k, n) = s
                .split_once(':')
                .ok_or_else(|| Error::invalid(format!("--shapes '{s}': expected K:N")))?;
            Ok((
                k.parse()
                    .map_err(|_| Error::invalid(format!("--shapes '{s}'")))?,
                n.parse()
                    .map_err(|_| Error::invalid(format!("--shapes '{s}'")))?,
            ))
        })
        .collect::<Result<Vec<(usize, usize)>>>()?;
    let dtypes = a
        .dtypes
        .iter()
        .map(|d| DType::parse(d).ok_or_else(|| Error::invalid(format!("--dtypes '{d}'"))))
        .collect::<Result<Vec<_>>>()?;
    let opts = BenchOptions {
        ms: a.m.clone(),
        shapes,
        ranks: a.ranks.clone(),
        dtypes,
        min_time: Duration::from_millis(a.min_ms),
        ..Default::default()
    };
    eprintln!(
        "{:>5} {:>5} {:>6} {:>6} {:>4} {:>10} {:>10} {:>10} {:>11} {:>11} {:>9}",
        "dtype",
        "m",
        "k",
        "n",
        "r",
        "base ms",
        "fused ms",
        "naive ms",
        "fused/base",
        "naive/base",
        "GFLOP/s"
    );
    let results = run_bench(rt, &opts, |r| {
        eprintln!(
            "{:>5} {:>5} {:>6} {:>6} {:>4} {:>10.3} {:>10.3} {:>10.3} {:>11.3} {:>11.3} {:>9.1}",
            r.dtype,
            r.m,
            r.k,
            r.n,
            r.r,
            r.base_ms,
            r.fused_ms,
            r.naive_ms,
            r.fused_over_base,
            r.naive_over_base,
            r.fused_gflops
        )
    })?;
    let info: serde_json::Value = serde_json::from_str(&rt.info_json()).unwrap_or_default();
    let json = serde_json::json!({ "runtime": info, "results": results });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::internal(e.to_string()))?;
    match &a.json {
        Some(p) => std::fs::write(p, text).map_err(|e| Error::from_io(p, &e))?,
        None => println!("{text}"),
    }
    Ok(())
}
