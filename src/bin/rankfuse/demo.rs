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
    if rt.device() == rankfuse::Device::Cpu {
        worst = worst.max(kinds_batch(rt, &base, &io, &adapters)?);
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

/// One mixed batch with LoRA, KRAdapter and EigenLoRAx rows (and base-only rows) against an f64
/// reference built from each module's dense ΔW. The EigenLoRAx adapter is lora-r8 projected on a
/// basis of the three fixture adapters; the KRAdapter has seeded random U, V.
fn kinds_batch(rt: &Runtime, base: &Weights, io: &Weights, adapters: &[Adapter]) -> Result<f32> {
    use rankfuse::methods::Slots;
    println!("\n4b. One mixed batch of LoRA, KRAdapter and EigenLoRAx rows (+ base-only rows):");
    let module = "layers.0.mlp.up_proj";
    let x = io.get(&format!("x.{module}"))?;
    let w = base.get(&format!("{module}.weight"))?;
    let (n, k) = (w.rows, w.cols);
    let basis = rankfuse::algebra::eigen::build(adapters, 8, 0, 1)?;
    let (proj, _) = rankfuse::algebra::eigen::project(&basis, &adapters[0])?;
    let em = &proj.modules[module];
    let rk = em.rank();
    let kk = em.alpha_a.nrows();
    let flat =
        |m: &faer::Mat<f32>| -> Vec<f32> { (0..kk * rk).map(|e| m[(e / rk, e % rk)]).collect() };
    let eig = rankfuse::Lora::eigen_from_loadings(
        basis.module_arc(module)?.clone(),
        rk,
        &flat(&em.alpha_a),
        &flat(&em.alpha_b),
        1.0,
    )?;
    let s = rankfuse::adapter::KronShape::new(n, k);
    let mut g = rankfuse::rng::SplitMix64::new(3);
    let u = g.fill_uniform(s.m * s.r, -0.05, 0.05);
    let v = g.fill_uniform(s.m * s.w(), -0.05, 0.05);
    let kr = rankfuse::Lora::kron_from_parts(module, n, k, &u, &v, 2.0)?;
    let lora = adapters[0].module(module)?;
    let mods = [lora, &kr, &eig];
    let slots = Slots::from_any(
        mods.iter()
            .map(|l| rt.slot_any(l, 0, 1.0).map(Some))
            .collect::<Result<Vec<_>>>()?,
    );
    let m = x.rows;
    let row_slot: Vec<i32> = (0..m as i32).map(|i| i % 4 - 1).collect();
    let p = LinearProblem {
        x,
        w,
        bias: None,
        slots: &slots.low,
        row_slot: Some(&row_slot),
    };
    let mut y = Matrix::zeros(DType::F32, m, n)?;
    rt.linear_with(&p, &slots.methods, &mut y.view_mut())?;
    let (xv, wv, yv) = (x.to_f32_vec(), w.to_f32_vec(), y.to_f32_vec());
    let deltas = mods
        .iter()
        .map(|l| l.dense_delta(0))
        .collect::<Result<Vec<_>>>()?;
    let mut worst = [0f32; 4];
    for i in 0..m {
        let s = row_slot[i];
        for j in 0..n {
            let mut acc = 0f64;
            for c in 0..k {
                let d = if s >= 0 {
                    deltas[s as usize][j * k + c]
                } else {
                    0.0
                };
                acc += xv[i * k + c] as f64 * (wv[j * k + c] + d) as f64;
            }
            let e = &mut worst[(s + 1) as usize];
            *e = e.max((yv[i * n + j] as f64 - acc).abs() as f32);
        }
    }
    for (name, e) in ["base only", "LoRA (lora-r8)", "KRAdapter", "EigenLoRAx"]
        .iter()
        .zip(worst)
    {
        println!("   rows -> {name:<15} max |diff| vs f64 reference = {e:.2e}");
    }
    Ok(worst.iter().copied().fold(0.0, f32::max))
}
