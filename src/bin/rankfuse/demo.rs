//! `rankfuse demo`: runs on PEFT fixtures embedded in the binary (works from any directory).

use rankfuse::adapter::peft::{self, PeftConfig};
use rankfuse::backend::LinearProblem;
use rankfuse::bench::{run_case, BenchOptions};
use rankfuse::matrix::Matrix;
use rankfuse::runtime::slot;
use rankfuse::{Adapter, DType, Error, Result, Runtime, Weights};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

macro_rules! fixture {
    ($p:literal) => {
        include_bytes!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/peft-tiny/",
            $p
        ))
    };
}

const ADAPTERS: [(&str, &[u8], &[u8]); 3] = [
    (
        "lora-r8",
        fixture!("adapters/lora-r8/adapter_config.json"),
        fixture!("adapters/lora-r8/adapter_model.safetensors"),
    ),
    (
        "rslora-pattern",
        fixture!("adapters/rslora-pattern/adapter_config.json"),
        fixture!("adapters/rslora-pattern/adapter_model.safetensors"),
    ),
    (
        "lora-r64",
        fixture!("adapters/lora-r64/adapter_config.json"),
        fixture!("adapters/lora-r64/adapter_model.safetensors"),
    ),
];

fn adapter(name: &str, cfg: &[u8], weights: &[u8]) -> Result<Adapter> {
    let cfg = PeftConfig::parse(Path::new(&format!("{name}/adapter_config.json")), cfg)?;
    let w = Arc::new(Weights::from_bytes(
        &format!("{name}/adapter_model.safetensors"),
        weights.to_vec(),
    )?);
    peft::from_parts(name, cfg, w)
}

fn max_diff(y: &Matrix, want: rankfuse::MatRef<'_>) -> f32 {
    y.to_f32_vec()
        .iter()
        .zip(want.to_f32_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn fused(
    rt: &Runtime,
    base: &Weights,
    x: rankfuse::MatRef<'_>,
    module: &str,
    slots: &[Option<rankfuse::Slot<'_>>],
    row_slot: Option<&[i32]>,
) -> Result<Matrix> {
    let w = base.get(&format!("{module}.weight"))?;
    let bias = base
        .entry(&format!("{module}.bias"))
        .map(|_| base.get(&format!("{module}.bias")))
        .transpose()?;
    let mut y = Matrix::zeros(DType::F32, x.rows, w.rows)?;
    let p = LinearProblem {
        x,
        w,
        bias,
        slots,
        row_slot,
    };
    rt.linear(&p, &mut y.view_mut())?;
    Ok(y)
}

pub fn run(rt: &Runtime) -> Result<()> {
    let base = Weights::from_bytes("base.safetensors", fixture!("base.safetensors").to_vec())?;
    let io = Weights::from_bytes("io.safetensors", fixture!("io.safetensors").to_vec())?;
    let adapters = ADAPTERS
        .iter()
        .map(|(n, c, w)| adapter(n, c, w))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "rankfuse {} — kernels: {}, {} threads",
        rankfuse::VERSION,
        rt.kernels().linear_name,
        rt.threads()
    );
    println!(
        "\n1. Fused base + adapter vs Hugging Face PEFT's own outputs (14 modules each, f32):"
    );
    let mut worst = 0f32;
    for ad in &adapters {
        let mut m = 0f32;
        for l in ad.modules() {
            let x = io.get(&format!("x.{}", l.name))?;
            let y = fused(rt, &base, x, &l.name, &[Some(slot(l, 0, 1.0)?)], None)?;
            m = m.max(max_diff(&y, io.get(&format!("y.{}.{}", ad.name, l.name))?));
        }
        worst = worst.max(m);
        println!("   {:<15} max |rankfuse - PEFT| = {m:.2e}", ad.name);
    }
    println!("\n2. Truncating lora-r64 to rank b (scale alpha / b), no retraining:");
    let r64 = &adapters[2];
    for b in [1usize, 8, 32] {
        let mut m = 0f32;
        for l in r64.modules() {
            let x = io.get(&format!("x.{}", l.name))?;
            let y = fused(rt, &base, x, &l.name, &[Some(slot(l, b, 1.0)?)], None)?;
            m = m.max(max_diff(
                &y,
                io.get(&format!("y.lora-r64.trunc{b}.{}", l.name))?,
            ));
        }
        worst = worst.max(m);
        println!("   rank {b:>2}: max |diff| vs torch reference = {m:.2e}");
    }
    println!("\n3. One mixed batch: rows on lora-r8, rslora-pattern, lora-r64 and base only:");
    let module = "layers.0.mlp.up_proj";
    let x = io.get(&format!("x.{module}"))?;
    let xs = x.to_f32_vec();
    let mut batch = Vec::new();
    let mut row_slot = Vec::new();
    for (s, _) in [0i32, 1, 2, -1].iter().enumerate() {
        batch.extend_from_slice(&xs);
        row_slot.extend(std::iter::repeat_n(
            if s == 3 { -1 } else { s as i32 },
            x.rows,
        ));
    }
    let xb = Matrix::from_f32(DType::F32, 4 * x.rows, x.cols, &batch)?;
    let slots = adapters
        .iter()
        .map(|a| Ok(Some(slot(a.module(module)?, 0, 1.0)?)))
        .collect::<Result<Vec<_>>>()?;
    let y = fused(rt, &base, xb.view(), module, &slots, Some(&row_slot))?;
    let yv = y.to_f32_vec();
    let n = y.cols;
    for (s, name) in ["lora-r8", "rslora-pattern", "lora-r64", "base"]
        .iter()
        .enumerate()
    {
        let key = if s == 3 {
            format!("y_base.{module}")
        } else {
            format!("y.{name}.{module}")
        };
        let want = io.get(&key)?.to_f32_vec();
        let got = &yv[s * x.rows * n..(s + 1) * x.rows * n];
        let m = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        worst = worst.max(m);
        println!(
            "   rows {:>2}..{:>2} -> {name:<15} max |diff| = {m:.2e}",
            s * x.rows,
            (s + 1) * x.rows
        );
    }
    if rt.device() == rankfuse::Device::Cpu {
        println!(
            "\n4. The base packed once for these kernels (rf_weights_pack), the same modules:"
        );
        for ad in &adapters {
            let mut m = 0f32;
            for l in ad.modules() {
                let x = io.get(&format!("x.{}", l.name))?;
                let w = base.get(&format!("{}.weight", l.name))?;
                let pw = rt.pack(&w)?;
                let bias = base
                    .entry(&format!("{}.bias", l.name))
                    .map(|_| base.get(&format!("{}.bias", l.name)))
                    .transpose()?;
                let slots = [Some(slot(l, 0, 1.0)?)];
                let p = LinearProblem {
                    x,
                    w,
                    bias,
                    slots: &slots,
                    row_slot: None,
                };
                let mut y = Matrix::zeros(DType::F32, x.rows, w.rows)?;
                rt.linear_packed(&p, &pw, &mut y.view_mut())?;
                m = m.max(max_diff(&y, io.get(&format!("y.{}.{}", ad.name, l.name))?));
            }
            worst = worst.max(m);
            println!("   {:<15} max |rankfuse packed - PEFT| = {m:.2e}", ad.name);
        }
    }
    println!("\n5. Timing (m = 64, k = n = 2048, r = 16, f32; medians):");
    let opts = BenchOptions {
        min_time: Duration::from_millis(150),
        max_iters: 20,
        ..Default::default()
    };
    let r = run_case(rt, DType::F32, 64, 2048, 2048, 16, &opts)?;
    println!(
        "   base-only {:.3} ms, fused {:.3} ms (x{:.3}), naive unfused {:.3} ms (x{:.3}); {:.1} GFLOP/s fused",
        r.base_ms, r.fused_ms, r.fused_over_base, r.naive_ms, r.naive_over_base, r.fused_gflops
    );
    if r.packed_fused_ms > 0.0 {
        println!(
            "   packed W: base-only {:.3} ms, fused {:.3} ms (x{:.3}); {:.2}x the unpacked fused call",
            r.packed_base_ms, r.packed_fused_ms, r.packed_fused_over_base, r.packed_speedup
        );
    }
    if worst > 1e-3 {
        return Err(Error::numeric(format!(
            "demo: a result differs from PEFT by {worst:.3e}"
        )));
    }
    println!("\nAll outputs agree with PEFT (worst |diff| {worst:.2e}).");
    Ok(())
}
