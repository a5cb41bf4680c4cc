//! `rankfuse eigen build|project`: EigenLoRAx bases from many PEFT adapters, and adapters as
//! loadings on a basis.

use rankfuse::adapter::peft;
use rankfuse::algebra::eigen::{self, Basis};
use rankfuse::{DType, Error, Result, Runtime};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Subcommand)]
enum Cmd {
    /// Principal basis per module from N PEFT adapters of one base model.
    Build(BuildArgs),
    /// An adapter as K x r loadings per side on a basis, with its reconstruction error.
    Project(ProjectArgs),
}

#[derive(clap::Args)]
struct BuildArgs {
    /// PEFT adapter folders (N >= 1).
    #[arg(required = true)]
    adapters: Vec<PathBuf>,
    /// Principal components K per side (at most N·r of every module).
    #[arg(long)]
    components: usize,
    /// G extra random directions, orthogonalised to the basis (low-resource case).
    #[arg(long, default_value_t = 0)]
    augment: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output basis (.safetensors: `<module>.eigen_A` [in, K+G], `<module>.eigen_B` [out, K+G]).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ProjectArgs {
    /// Basis written by `eigen build`.
    #[arg(long)]
    basis: PathBuf,
    /// PEFT adapter folder to project.
    #[arg(long)]
    adapter: PathBuf,
    /// Loadings file (`<module>.alpha_A`, `<module>.alpha_B`, K x r, scale folded in).
    #[arg(long)]
    out: PathBuf,
    /// Also write the reconstruction as a PEFT folder (fixed scale 1).
    #[arg(long)]
    export_peft: Option<PathBuf>,
    /// Report JSON.
    #[arg(long)]
    report: Option<PathBuf>,
}

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub fn run(_rt: &Runtime, a: &Args) -> Result<()> {
    match &a.cmd {
        Cmd::Build(b) => {
            let ads = b
                .adapters
                .iter()
                .map(|p| peft::load(p))
                .collect::<Result<Vec<_>>>()?;
            let basis = eigen::build(&ads, b.components, b.augment, b.seed)?;
            basis.save(&b.out)?;
            let mem = eigen::memory(&basis, &ads);
            let mut loadings = 0;
            println!("| module | K+G | explained (A) | explained (B) |");
            println!("| --- | ---: | ---: | ---: |");
            for m in basis.modules.values() {
                println!(
                    "| `{}` | {} | {:.4} | {:.4} |",
                    m.name,
                    m.k(),
                    m.explained_a,
                    m.explained_b
                );
            }
            let mut worst = 0f64;
            for ad in &ads {
                let (_, rep) = eigen::project(&basis, ad)?;
                loadings += rep.loadings_bytes;
                for m in &rep.modules {
                    worst = worst.max(m.rel_error);
                }
            }
            println!(
                "\n{} adapters: LoRA factors {:.3} MiB (dense ΔW {:.3} MiB) vs basis {:.3} MiB + loadings {:.3} MiB; worst relative reconstruction error of the inputs {:.3e}",
                mem.adapters,
                mib(mem.lora_factors_bytes),
                mib(mem.dense_delta_bytes),
                mib(mem.basis_bytes),
                mib(loadings),
                worst
            );
            eprintln!("wrote {}", b.out.display());
            Ok(())
        }
        Cmd::Project(p) => {
            let basis = Basis::load(&p.basis)?;
            let ad = peft::load(&p.adapter)?;
            let (ea, rep) = eigen::project(&basis, &ad)?;
            ea.save(&p.out)?;
            println!("| module | r | rel. error ΔW | rel. error A | rel. error B |");
            println!("| --- | ---: | ---: | ---: | ---: |");
            for m in &rep.modules {
                println!(
                    "| `{}` | {} | {:.3e} | {:.3e} | {:.3e} |",
                    m.module, m.rank, m.rel_error, m.rel_error_a, m.rel_error_b
                );
            }
            println!(
                "\nadapter {:.3} MiB as LoRA factors vs {:.3} MiB of loadings (plus the shared basis)",
                mib(rep.adapter_bytes),
                mib(rep.loadings_bytes)
            );
            if let Some(dir) = &p.export_peft {
                let dense = ea.to_adapter(&basis, DType::F32)?;
                peft::save(&dense, dir)?;
            }
            if let Some(r) = &p.report {
                let j = serde_json::to_string_pretty(&rep)
                    .map_err(|e| Error::internal(e.to_string()))?;
                std::fs::write(r, j).map_err(|e| Error::from_io(r, &e))?;
            }
            Ok(())
        }
    }
}
