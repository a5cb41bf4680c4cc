//! The `rankfuse` command line. One module per subcommand.

mod apply;
mod bench;
mod convert;
mod demo;
mod eigen;
mod extract;
mod inspect;
mod merge;
mod soak;

use clap::{Parser, Subcommand};
use rankfuse::{Runtime, RuntimeOptions};

#[derive(Parser)]
#[command(
    name = "rankfuse",
    version,
    about = "Low-rank adapters on frozen base weights: fused, fast, from C"
)]
struct Cli {
    /// CPU threads (0 = all cores).
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Runtime facts as JSON (CPU features, kernels chosen, threads).
    Info,
    /// Tensors of a safetensors file, or the modules of a PEFT adapter folder.
    Inspect(inspect::Args),
    /// Runs base + adapter on every `x.<module>` of an input file, writing `y.<module>`.
    Apply(apply::Args),
    /// Runs on bundled data: PEFT parity, rank truncation, a mixed batch, a timing.
    Demo,
    /// Times fused vs base-only vs naive unfused (JSON + a table).
    Bench(bench::Args),
    /// PHLoRA: a LoRA adapter (PEFT folder) from base + fully fine-tuned weights.
    Extract(extract::Args),
    /// Times the randomized truncated SVD against faer's full SVD (same run).
    ExtractBench(extract::BenchArgs),
    /// PEFT folder <-> GGUF LoRA adapter (llama.cpp), with a ΔW parity report.
    Convert(convert::Args),
    /// Merges (or unmerges) a PEFT adapter into base weights, writing a new safetensors file.
    Merge(merge::Args),
    /// EigenLoRAx: a shared principal basis for many adapters, and adapters as loadings on it.
    Eigen(eigen::Args),
    /// Adapters swapped under load: callers on an adapter store while versions are published.
    Soak(soak::Args),
}

fn main() {
    let cli = Cli::parse();
    let rt = match Runtime::new(RuntimeOptions {
        num_threads: cli.threads,
        ..Default::default()
    }) {
        Ok(rt) => rt,
        Err(e) => fail(e),
    };
    let r = match cli.cmd {
        Cmd::Info => {
            println!("{}", rt.info_json());
            Ok(())
        }
        Cmd::Inspect(a) => inspect::run(&a),
        Cmd::Apply(a) => apply::run(&rt, &a),
        Cmd::Demo => demo::run(&rt),
        Cmd::Bench(a) => bench::run(&rt, &a),
        Cmd::Extract(a) => extract::run(&rt, &a),
        Cmd::ExtractBench(a) => extract::bench(&rt, &a),
        Cmd::Convert(a) => convert::run(&a),
        Cmd::Merge(a) => merge::run(&rt, &a),
        Cmd::Eigen(a) => eigen::run(&rt, &a),
        Cmd::Soak(a) => soak::run(cli.threads, &a),
    };
    if let Err(e) = r {
        fail(e)
    }
}

fn fail(e: rankfuse::Error) -> ! {
    eprintln!("rankfuse: error ({:?}): {}", e.status, e.message);
    std::process::exit(1)
}
