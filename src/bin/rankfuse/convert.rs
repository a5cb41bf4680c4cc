//! `rankfuse convert IN OUT`: a PEFT folder to a GGUF LoRA adapter (llama.cpp), or a GGUF
//! adapter to a PEFT folder, then a parity report: the output is read back, brought to PEFT names
//! and layout, and every module's ΔW = scale·B·A is compared with the input's (max |diff|).

use rankfuse::adapter::gguf::{self, AlphaPolicy, SaveOptions};
use rankfuse::adapter::{peft, Adapter, Lora};
use rankfuse::{Error, Result};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// A PEFT adapter folder (converted to GGUF) or a GGUF adapter file (converted to PEFT).
    input: PathBuf,
    /// The GGUF file or PEFT folder to write.
    output: PathBuf,
    /// general.architecture of the base (llama, mistral, qwen2, bert); PEFT -> GGUF only.
    /// Default: `model_type` of --base-config.
    #[arg(long)]
    arch: Option<String>,
    /// The base model's config.json: architecture and head counts.
    #[arg(long)]
    base_config: Option<PathBuf>,
    /// Attention heads (llama/mistral q/k rows are permuted per head, as llama.cpp's converter does).
    #[arg(long, default_value_t = 0)]
    n_head: usize,
    /// Key/value heads (0 = n_head).
    #[arg(long, default_value_t = 0)]
    n_head_kv: usize,
    /// `auto`: the alpha reproducing most modules' scales, the rest folded into lora_b;
    /// `fold`: alpha 0 (scale 1), every scale folded into lora_b.
    #[arg(long, default_value = "auto")]
    alpha: String,
}

fn config(a: &Args) -> Result<(Option<String>, usize, usize)> {
    let (mut arch, mut nh, mut nkv) = (a.arch.clone(), a.n_head, a.n_head_kv);
    if let Some(p) = &a.base_config {
        let text = std::fs::read(p).map_err(|e| Error::from_io(p, &e))?;
        let v: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::format(format!("config '{}': {e}", p.display())))?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0) as usize;
        if arch.is_none() {
            arch = v
                .get("model_type")
                .and_then(|x| x.as_str())
                .map(String::from);
        }
        if nh == 0 {
            nh = num("num_attention_heads");
        }
        if nkv == 0 {
            nkv = num("num_key_value_heads");
        }
    }
    Ok((arch, nh, nkv))
}

/// ΔW = scale·B·A (out x in, f32) of a module at its rank in use.
fn delta(l: &Lora) -> Vec<f32> {
    let r = l.rank();
    let s = l.scale_at(r);
    let (a, b) = (l.a_view(r).to_f32_vec(), l.b_view(r).to_f32_vec());
    let (n, k) = (l.out_features, l.in_features);
    let mut d = vec![0f32; n * k];
    for i in 0..n {
        let row = &mut d[i * k..(i + 1) * k];
        for c in 0..r {
            let bic = b[i * r + c] * s;
            for (x, av) in row.iter_mut().zip(&a[c * k..(c + 1) * k]) {
                *x += bic * av;
            }
        }
    }
    d
}

fn parity(input: &Adapter, output: &Adapter) -> Result<f32> {
    println!(
        "{:<48} {:>5} {:>12} {:>12}",
        "module", "r", "scale", "max|dΔW|"
    );
    let mut worst = 0f32;
    for l in input.modules() {
        let o = output.module(&l.name)?;
        if (o.out_features, o.in_features) != (l.out_features, l.in_features) {
            return Err(Error::shape(format!("module '{}': shapes differ", l.name)));
        }
        let m = delta(l)
            .iter()
            .zip(delta(o))
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        worst = worst.max(m);
        println!(
            "{:<48} {:>5} {:>12.6} {:>12.3e}",
            l.name,
            l.rank(),
            l.scale_at(l.rank()),
            m
        );
    }
    println!("max |ΔW diff| over {} modules: {worst:.3e}", input.len());
    Ok(worst)
}

pub fn run(a: &Args) -> Result<()> {
    let (arch, nh, nkv) = config(a)?;
    let alpha = match a.alpha.as_str() {
        "auto" => AlphaPolicy::Auto,
        "fold" => AlphaPolicy::Fold,
        x => return Err(Error::invalid(format!("--alpha {x}: use auto or fold"))),
    };
    if a.input.is_dir() {
        let ad = peft::load(&a.input)?;
        let opts = SaveOptions {
            architecture: arch,
            alpha,
            n_head: nh,
            n_head_kv: nkv,
        };
        let rep = gguf::save(&ad, &a.output, &opts)?;
        let folded = rep.modules.iter().filter(|m| m.3).count();
        println!(
            "wrote '{}': architecture {}, adapter.lora.alpha = {}, {} modules ({} with the scale \
             folded into lora_b)",
            a.output.display(),
            rep.architecture,
            rep.alpha,
            rep.modules.len(),
            folded
        );
        let mut back = gguf::load(&a.output)?;
        gguf::to_peft(&mut back, nh, nkv)?;
        parity(&ad, &back)?;
    } else {
        let mut ad = gguf::load(&a.input)?;
        println!(
            "read '{}': architecture {}, {} modules",
            a.input.display(),
            ad.architecture().unwrap_or("(none)"),
            ad.len()
        );
        gguf::to_peft(&mut ad, nh, nkv)?;
        peft::save(&ad, &a.output)?;
        println!("wrote PEFT folder '{}'", a.output.display());
        let back = peft::load(&a.output)?;
        parity(&ad, &back)?;
    }
    Ok(())
}
