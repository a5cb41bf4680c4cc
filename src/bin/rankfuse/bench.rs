//! `rankfuse bench`: fused vs base-only vs naive unfused, timed in the same run; the machine's
//! streaming bandwidth; a mixed-adapter batch; memory and allocation figures.

use rankfuse::bench::{run as run_bench, BenchOptions, CountingAlloc};
use rankfuse::{DType, Error, Result, Runtime};
use std::time::Duration;

// Counts heap bytes and allocation calls so the bench can report the kernels' extra memory and
// hot-path allocations (forwarding to the system allocator; negligible cost).
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

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
    /// Streaming-read bandwidth buffer in MiB (0 = skip).
    #[arg(long, default_value_t = 1024)]
    bw_mib: usize,
    /// Skip the mixed-batch case (64 rows over 16 adapters, ranks 8..64).
    #[arg(long)]
    no_mixed: bool,
    /// Only time decode on block-quantized W (Q8_0, Q4_0, Q4_K, Q6_K) next to BF16 W: f32 x and y,
    /// the --m values <= 8, every shape and rank; base and fused.
    #[arg(long)]
    quant: bool,
    /// Only compare the other adapter kinds with LoRA on the first --shapes and --dtypes entry:
    /// 64 rows over 16 EigenLoRAx adapters (rank 8, K = 32) on one basis vs the same 16 as dense
    /// LoRA; a KRAdapter vs a LoRA of its parameter count at m = 1 and 128; base alongside.
    #[arg(long)]
    methods: bool,
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
        bandwidth_mib: a.bw_mib,
        mixed: !a.no_mixed,
        ..Default::default()
    };
    eprintln!(
        "isa {} ({}), {} threads",
        rt.kernels().isa.name(),
        rt.kernels().linear_name,
        rt.threads()
    );
    if a.quant {
        return run_quant(rt, &opts, &a.json);
    }
    if a.methods {
        return run_methods(rt, &opts, &a.json);
    }
    let mut header = false;
    let report = run_bench(
        rt,
        &opts,
        |b, peak| {
            eprintln!(
                "streaming read bandwidth ({} MiB, {} threads): {:.1} GB/s; FMA peak: {:.1} GFLOP per CPU-s",
                b.mib, b.threads, b.read_gbs, peak
            )
        },
        |r| {
            if !header {
                header = true;
                eprintln!(
                    "{:>5} {:>5} {:>6} {:>6} {:>4} {:>9} {:>9} {:>9} {:>7} {:>7} {:>7} {:>8} {:>8} {:>6} {:>6} {:>7} {:>8} | {:>9} {:>9} {:>7} {:>7} {:>8} {:>6} {:>7} {:>7}",
                    "dtype", "m", "k", "n", "r", "base ms", "fused ms", "naive ms", "f/base",
                    "n/base", "f/b cpu", "GFLOP/s", "GF/cpu-s", "GB/s", "%bw", "allocs", "ws MiB",
                    "pk base", "pk fused", "pk f/b", "speedup", "pk GF/s", "%peak", "cpu f", "cpu pk"
                );
            }
            eprintln!(
                "{:>5} {:>5} {:>6} {:>6} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>7.3} {:>7.3} {:>7.3} {:>8.1} {:>8.1} {:>6.1} {:>6} {:>7} {:>8.1} | {:>9.3} {:>9.3} {:>7.3} {:>7.2} {:>8.1} {:>6} {:>7.2} {:>7.2}",
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
                r.fused_over_base_cpu,
                r.fused_gflops,
                r.fused_gflop_per_cpu_s,
                r.fused_read_gbs,
                r.fused_pct_of_bandwidth
                    .map_or("-".to_string(), |p| format!("{p:.0}%")),
                r.fused_allocs_per_call
                    .map_or("-".to_string(), |c| format!("{c:.1}")),
                r.workspace_bytes as f64 / (1 << 20) as f64,
                r.packed_base_ms,
                r.packed_fused_ms,
                r.packed_fused_over_base,
                r.packed_speedup,
                r.packed_fused_gflops,
                r.packed_pct_of_fma_peak
                    .map_or("-".to_string(), |p| format!("{p:.0}%")),
                r.fused_cpu_ms,
                r.packed_fused_cpu_ms,
            );
            if let (Some(c), Some(b), Some(f), Some(gbs)) = (
                r.cold_copies,
                r.cold_base_ms,
                r.cold_fused_ms,
                r.cold_fused_read_gbs,
            ) {
                eprintln!(
                    "      cold (W and adapter from DRAM, {c} layers rotated): base {b:.3} ms, fused {f:.3} ms, f/base {:.3}, {gbs:.1} GB/s = {} of the streaming bandwidth",
                    f / b,
                    r.cold_pct_of_bandwidth
                        .map_or("-".to_string(), |p| format!("{p:.0}%")),
                );
            }
            if let (Some(f), Some(pct)) = (r.cold_packed_fused_ms, r.cold_packed_pct_of_bandwidth) {
                eprintln!(
                    "      cold, packed W: fused {f:.3} ms = {pct:.0}% of the streaming bandwidth"
                );
            }
        },
        |x| {
            eprintln!(
                "mixed {:>5} m {} k {} n {}: {} adapters (ranks {:?}) {:.3} ms vs one r={} adapter {:.3} ms: x{:.3} (CPU time x{:.3}; base {:.3} ms, x{:.3}); packed W: {:.3} vs {:.3} ms, x{:.3}",
                x.dtype,
                x.m,
                x.k,
                x.n,
                x.adapters,
                x.ranks,
                x.mixed_ms,
                x.single_r,
                x.single_ms,
                x.mixed_over_single,
                x.mixed_over_single_cpu,
                x.base_ms,
                x.mixed_over_base,
                x.packed_mixed_ms,
                x.packed_single_ms,
                x.packed_mixed_over_single
            )
        },
    )?;
    let info: serde_json::Value = serde_json::from_str(&rt.info_json()).unwrap_or_default();
    let json = serde_json::json!({
        "runtime": info,
        "bandwidth": report.bandwidth,
        "fma_peak_gflops": report.fma_peak_gflops,
        "results": report.results,
        "mixed": report.mixed,
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| Error::internal(e.to_string()))?;
    match &a.json {
        Some(p) => std::fs::write(p, text).map_err(|e| Error::from_io(p, &e))?,
        None => println!("{text}"),
    }
    Ok(())
}

/// `--quant`: one row per (shape, m, r, W dtype), BF16 first as the baseline.
fn run_quant(rt: &Runtime, opts: &BenchOptions, json: &Option<std::path::PathBuf>) -> Result<()> {
    use rankfuse::bench::quant::run_quant_case;
    // The same kernels and threads with x quantized to Q8 blocks (RF_ACT_QUANT_Q8).
    let rt_q8 = Runtime::with_kernels(
        rankfuse::RuntimeOptions {
            num_threads: rt.threads(),
            act_quant: rankfuse::ActQuant::Q8,
            ..Default::default()
        },
        rt.kernels(),
    )?;
    let bw = if opts.bandwidth_mib > 0 {
        let b = rankfuse::bench::measure_bandwidth(opts.bandwidth_mib, rt.threads())?;
        eprintln!(
            "streaming read bandwidth ({} MiB, {} threads): {:.1} GB/s",
            b.mib, b.threads, b.read_gbs
        );
        Some(b.read_gbs)
    } else {
        None
    };
    eprintln!(
        "{:>12} {:>3} {:>6} {:>6} {:>4} {:>9} {:>9} {:>9} {:>7} {:>8} {:>8} {:>6} {:>6} {:>9} {:>9} {:>9}",
        "W",
        "m",
        "k",
        "n",
        "r",
        "W MiB",
        "base ms",
        "fused ms",
        "f/base",
        "W GB/s",
        "rd GB/s",
        "%read",
        "%bw",
        "vs bf16",
        "cpu ms",
        "cpu vs"
    );
    let mut rows = Vec::new();
    for &(k, n) in &opts.shapes {
        for &m in opts.ms.iter().filter(|&&m| m <= 8) {
            for &r in &opts.ranks {
                let mut bf16_ms = None;
                let mut bf16_cpu = None;
                for dt in [
                    DType::BF16,
                    DType::Q8_0,
                    DType::Q4_0,
                    DType::Q4_K,
                    DType::Q6_K,
                ] {
                    if !k.is_multiple_of(dt.block_elems()) {
                        continue;
                    }
                    let runtimes: &[&Runtime] = if dt.is_quantized() {
                        &[rt, &rt_q8]
                    } else {
                        &[rt]
                    };
                    // Q4_0 / Q8_0 also from a pack (rf_weights_pack: 8-row interleaved blocks).
                    let packs: &[bool] = if rankfuse::backend::cpu::quant_pack::supports(dt) {
                        &[false, true]
                    } else {
                        &[false]
                    };
                    for (run_rt, &packed) in runtimes
                        .iter()
                        .flat_map(|r| packs.iter().map(move |p| (r, p)))
                    {
                        let q = run_quant_case(
                            run_rt,
                            dt,
                            m,
                            k,
                            n,
                            r,
                            opts.min_time,
                            opts.max_iters,
                            packed,
                        )?;
                        let base = *bf16_ms.get_or_insert(q.fused_ms);
                        let base_cpu = *bf16_cpu.get_or_insert(q.fused_cpu_ms);
                        let label = format!(
                            "{}{}{}",
                            q.dtype,
                            if q.packed { "+pk" } else { "" },
                            if q.act == "q8" { "+q8x" } else { "" }
                        );
                        let pct = bw.map_or("-".to_string(), |b| {
                            format!("{:.0}%", 100.0 * q.fused_w_gbs / b)
                        });
                        eprintln!(
                            "{:>12} {:>3} {:>6} {:>6} {:>4} {:>9.1} {:>9.3} {:>9.3} {:>7.3} {:>8.1} {:>8.1} {:>5.0}% {:>6} {:>8.2}x {:>9.3} {:>8.2}x",
                            label,
                            m,
                            k,
                            n,
                            r,
                            q.w_bytes as f64 / (1 << 20) as f64,
                            q.base_ms,
                            q.fused_ms,
                            q.fused_ms / q.base_ms,
                            q.fused_w_gbs,
                            q.stream_gbs,
                            100.0 * q.of_stream,
                            pct,
                            base / q.fused_ms,
                            q.fused_cpu_ms,
                            base_cpu / q.fused_cpu_ms
                        );
                        rows.push(q);
                    }
                }
            }
        }
    }
    let info: serde_json::Value = serde_json::from_str(&rt.info_json()).unwrap_or_default();
    let text = serde_json::to_string_pretty(
        &serde_json::json!({"runtime": info, "read_bandwidth_gbs": bw, "quant": rows}),
    )
    .map_err(|e| Error::internal(e.to_string()))?;
    match json {
        Some(p) => std::fs::write(p, text).map_err(|e| Error::from_io(p, &e))?,
        None => println!("{text}"),
    }
    Ok(())
}

fn run_methods(rt: &Runtime, o: &BenchOptions, json: &Option<std::path::PathBuf>) -> Result<()> {
    let (k, n) = o.shapes[0];
    let dtype = o.dtypes[0];
    let rows = rankfuse::bench::methods::run_methods(rt, dtype, k, n, o.min_time)?;
    eprintln!(
        "{:>26} {:>5} {:>4} {:>6} {:>6} {:>3} {:>4} {:>9} {:>9} {:>9} {:>7} {:>7} {:>10} {:>10} {:>9}",
        "case", "dtype", "m", "k", "n", "ad", "r", "base ms", "lora ms", "meth ms", "l/base",
        "m/base", "lora MiB", "meth MiB", "rel diff"
    );
    for r in &rows {
        eprintln!(
            "{:>26} {:>5} {:>4} {:>6} {:>6} {:>3} {:>4} {:>9.3} {:>9.3} {:>9.3} {:>7.3} {:>7.3} {:>10.3} {:>10.3} {:>9.2e}",
            r.case, r.dtype, r.m, r.k, r.n, r.adapters, r.lora_rank, r.base_ms, r.lora_ms,
            r.method_ms, r.lora_over_base, r.method_over_base,
            r.lora_adapter_bytes as f64 / 1048576.0, r.method_adapter_bytes as f64 / 1048576.0,
            r.rel_diff
        );
    }
    let text = serde_json::json!({
        "isa": rt.kernels().isa.name(),
        "threads": rt.threads(),
        "methods": rows,
    })
    .to_string();
    match json {
        Some(p) => std::fs::write(p, text).map_err(|e| Error::from_io(p, &e)),
        None => {
            println!("{text}");
            Ok(())
        }
    }
}
