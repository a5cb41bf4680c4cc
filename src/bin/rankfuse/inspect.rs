//! `rankfuse inspect PATH`: a safetensors file's tensors, or a PEFT folder's modules.

use rankfuse::adapter::peft;
use rankfuse::{Result, Weights};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, a .safetensors.index.json, or a PEFT adapter folder.
    path: PathBuf,
}

pub fn run(a: &Args) -> Result<()> {
    if a.path.is_dir() {
        let ad = peft::load(&a.path)?;
        println!("adapter '{}': {} modules", ad.name, ad.len());
        println!(
            "{:<48} {:>7} {:>7} {:>5} {:>8} {:>10} {:>8} {:>5}",
            "module", "in", "out", "r", "alpha", "scale", "scaling", "dtype"
        );
        for l in ad.modules() {
            println!(
                "{:<48} {:>7} {:>7} {:>5} {:>8} {:>10.6} {:>8} {:>5}",
                l.name,
                l.in_features,
                l.out_features,
                l.rank(),
                l.alpha,
                l.scale_at(l.rank()),
                format!("{:?}", l.scaling),
                l.dtype().name()
            );
        }
        return Ok(());
    }
    let w = Weights::open(&a.path)?;
    println!("'{}': {} tensors", a.path.display(), w.len());
    for t in w.entries() {
        println!("{:<64} {:>5} {:?}", t.name, t.dtype_name, t.shape);
    }
    let md = w.metadata();
    if !md.is_empty() {
        let mut keys: Vec<_> = md.keys().collect();
        keys.sort();
        for k in keys {
            let v = &md[k];
            let shown: String = v.chars().take(120).collect();
            println!("metadata {k} = {shown}");
        }
    }
    Ok(())
}
