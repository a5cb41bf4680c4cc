//! `rankfuse inspect PATH`: a safetensors or GGUF file's tensors and metadata, or a PEFT
//! folder's modules.

use rankfuse::adapter::peft;
use rankfuse::weights::MetaValue;
use rankfuse::{Result, Weights};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A .safetensors file, a .safetensors.index.json, a GGUF file, or a PEFT adapter folder.
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
    if w.is_gguf() {
        println!("'{}': GGUF, {} tensors", a.path.display(), w.len());
        for t in w.entries() {
            let mark = if t.dtype.is_some() {
                ""
            } else {
                "  (no kernel)"
            };
            println!(
                "{:<64} {:>7} {:?} {} bytes{mark}",
                t.name,
                t.dtype_name,
                t.shape,
                t.byte_len()
            );
        }
        for (k, v) in w.meta() {
            println!("metadata {k} = {}", show(v));
        }
        return Ok(());
    }
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

/// A metadata value in one line: scalars as they are, strings cut at 120 characters, arrays as
/// their element type and length with the first few elements (tokenizer arrays hold 100k+).
fn show(v: &MetaValue) -> String {
    match v {
        MetaValue::Str(b) => {
            let s = String::from_utf8_lossy(b);
            let shown: String = s.chars().take(120).collect();
            format!("{shown:?}")
        }
        MetaValue::Array { items, .. } => {
            let first: Vec<String> = items.iter().take(4).map(show).collect();
            let more = if items.len() > 4 { ", ..." } else { "" };
            let elem = items.first().map_or("empty", |i| i.type_name());
            format!("[{elem}; {}] [{}{more}]", items.len(), first.join(", "))
        }
        MetaValue::U8(x) => x.to_string(),
        MetaValue::I8(x) => x.to_string(),
        MetaValue::U16(x) => x.to_string(),
        MetaValue::I16(x) => x.to_string(),
        MetaValue::U32(x) => x.to_string(),
        MetaValue::I32(x) => x.to_string(),
        MetaValue::U64(x) => x.to_string(),
        MetaValue::I64(x) => x.to_string(),
        // Debug: shortest round-trip form, exponent for tiny or huge values.
        MetaValue::F32(x) => format!("{x:?}"),
        MetaValue::F64(x) => format!("{x:?}"),
        MetaValue::Bool(x) => x.to_string(),
    }
}
