//! `rankfuse apply`: base + adapter over every `x.<module>` of an input file.

use rankfuse::adapter::peft;
use rankfuse::backend::LinearProblem;
use rankfuse::matrix::Matrix;
use rankfuse::runtime::slot;
use rankfuse::weights::{write_safetensors, TensorOut};
use rankfuse::{DType, Error, Result, Runtime, Weights};
use std::borrow::Cow;
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct Args {
    /// Base weights (.safetensors or .safetensors.index.json) with `<module>.weight` [out, in].
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter folder.
    #[arg(long)]
    adapter: PathBuf,
    /// Input file with `x.<module>` tensors [m, in].
    #[arg(long)]
    input: PathBuf,
    /// Output file: `y.<module>` [m, out] in f32.
    #[arg(long)]
    output: PathBuf,
    /// Use the first B components of every module (DyLoRA-style truncation; scale follows r = B).
    #[arg(long)]
    rank: Option<u32>,
    /// Compute dtype for x, W and adapter: f32 (as stored) or bf16 (everything rounded to bf16).
    #[arg(long, default_value = "f32")]
    compute: String,
    /// Read W as given instead of packing it once for the CPU kernels first (packing is the
    /// default on CPU runtimes: the layout a serving host keeps for its frozen base).
    #[arg(long)]
    no_pack: bool,
}

fn find<'w>(base: &'w Weights, module: &str, suffix: &str) -> Option<&'w str> {
    // The module path as in PEFT, or with a leading "model." stripped/added.
    let cands = [
        format!("{module}.{suffix}"),
        format!("model.{module}.{suffix}"),
    ];
    for c in cands {
        if let Some(e) = base.entry(&c) {
            return Some(e.name.as_str());
        }
    }
    module.strip_prefix("model.").and_then(|m| {
        base.entry(&format!("{m}.{suffix}"))
            .map(|e| e.name.as_str())
    })
}

pub fn run(rt: &Runtime, a: &Args) -> Result<()> {
    let compute = DType::parse(&a.compute)
        .filter(|d| *d != DType::F16)
        .ok_or_else(|| {
            Error::invalid(format!("--compute '{}': expected f32 or bf16", a.compute))
        })?;
    let base = Weights::open(&a.base)?;
    let ad = peft::load(&a.adapter)?;
    let fan_in_fan_out = peft::fan_in_fan_out(&ad);
    let input = Weights::open(&a.input)?;
    let mut outs: Vec<TensorOut<'static>> = Vec::new();
    for e in input.entries() {
        let Some(module) = e.name.strip_prefix("x.") else {
            continue;
        };
        let lora = ad.module(module)?;
        let wname = find(&base, module, "weight").ok_or_else(|| {
            Error::not_found(format!(
                "base '{}': no weight for module '{module}'",
                a.base.display()
            ))
        })?;
        let mut w = base.get(wname)?;
        let transposed;
        if fan_in_fan_out {
            // Conv1D stores W as [in, out]; the kernels take nn.Linear's [out, in].
            let v = w.to_f32_vec();
            let (r, c) = (w.rows, w.cols);
            let mut t = vec![0f32; r * c];
            for i in 0..r {
                for j in 0..c {
                    t[j * r + i] = v[i * c + j];
                }
            }
            transposed = Matrix::from_f32(w.dtype, c, r, &t)?;
            w = transposed.view();
        }
        let bias = find(&base, module, "bias")
            .map(|b| base.get(b))
            .transpose()?;
        let x = input.get(&e.name)?;
        let conv =
            |m: rankfuse::MatRef<'_>| Matrix::from_f32(compute, m.rows, m.cols, &m.to_f32_vec());
        let (xc, wc, bc) = (conv(x)?, conv(w)?, bias.map(conv).transpose()?);
        let s = slot(lora, a.rank.unwrap_or(0) as usize, 1.0)
            .map_err(|e| e.context(format!("module '{module}'")))?;
        let (a_c, b_c) = (conv(s.a)?, conv(s.b)?);
        let s = rankfuse::Slot {
            a: a_c.view(),
            b: b_c.view(),
            ..s
        };
        let slots = [Some(s)];
        let p = LinearProblem {
            x: xc.view(),
            w: wc.view(),
            bias: bc.as_ref().map(|b| b.view()),
            slots: &slots,
            row_slot: None,
        };
        let mut y = Matrix::zeros(compute, x.rows, w.rows)?;
        let pack = !a.no_pack && rt.device() == rankfuse::Device::Cpu;
        if pack {
            let pw = rt.pack(&p.w)?;
            rt.linear_packed(&p, &pw, &mut y.view_mut())
        } else {
            rt.linear(&p, &mut y.view_mut())
        }
        .map_err(|e| e.context(format!("module '{module}'")))?;
        let y32 = Matrix::from_f32(DType::F32, y.rows, y.cols, &y.to_f32_vec())?;
        outs.push(TensorOut {
            name: format!("y.{module}"),
            dtype: DType::F32,
            shape: vec![y32.rows, y32.cols],
            data: Cow::Owned(y32.bytes().to_vec()),
        });
    }
    if outs.is_empty() {
        return Err(Error::not_found(format!(
            "input '{}': no x.<module> tensors",
            a.input.display()
        )));
    }
    write_safetensors(&a.output, &outs, None)?;
    eprintln!("wrote {} tensors to {}", outs.len(), a.output.display());
    Ok(())
}
