//! PHLoRA: LoRA adapters extracted from a full fine-tune, with no data and no gradients.
//!
//! For every 2-D `<module>.weight` present in both the base and the tuned weights with the same
//! shape (and matching the module globs), ΔW = W_tuned - W_base is formed in f32 one layer at a
//! time from the memory maps (never the whole model), factored by a truncated SVD
//! ([`super::svd::randomized_svd`]), and split symmetrically: B = U_r·√Σ_r, A = √Σ_r·V_rᵀ with
//! `lora_alpha = r` (scale 1), or `lora_alpha = √r` under rsLoRA (scale 1 again).
//!
//! Rank: fixed, or the smallest r with E(r) = Σ_{i<=r} σ_i² / ||ΔW||_F² >= threshold, capped by
//! `max_rank`. The denominator is the exact total energy of ΔW (summed from ΔW itself), so an
//! energy is never overstated by a truncated spectrum. Because B·A is the orthogonal projection
//! of ΔW onto span(U_r), its relative Frobenius error is sqrt(1 - E(r)); the report measures it
//! directly from the written factors (after rounding to their dtype).

use super::svd::{self, Factors, RsvdOptions};
use crate::adapter::{peft, Adapter, Lora, Scaling, TensorData};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatRef, Matrix};
use crate::weights::Weights;
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;
use std::sync::Mutex;
use std::time::Instant;

/// How the rank of each layer is chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RankRule {
    /// Smallest r with E(r) >= the threshold (0 < threshold <= 1), capped by `max_rank`.
    Energy(f64),
    /// This rank (capped by min(out, in)); must not exceed `max_rank`.
    Fixed(usize),
}

/// Extraction options (`rankfuse extract`, `rf_extract_peft`).
#[derive(Clone, Debug)]
pub struct ExtractOptions {
    pub rule: RankRule,
    pub max_rank: usize,
    /// Module globs (`*` matches across dots), matched against the module name (the tensor name
    /// without `.weight`) or the tensor name; empty = every 2-D `.weight`.
    pub modules: Vec<String>,
    /// Write an rsLoRA adapter (alpha = √r) instead of LoRA (alpha = r); the scale is 1 either way.
    pub rslora: bool,
    /// dtype of the written A and B.
    pub dtype: DType,
    pub oversample: usize,
    pub power_iters: usize,
    pub seed: u64,
    /// Layers processed at once (0 = all threads of the pool). Each one holds its ΔW in f32.
    pub threads: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        let r = RsvdOptions::default();
        ExtractOptions {
            rule: RankRule::Energy(0.9),
            max_rank: 128,
            modules: Vec::new(),
            rslora: false,
            dtype: DType::F32,
            oversample: r.oversample,
            power_iters: r.power_iters,
            seed: r.seed,
            threads: 0,
        }
    }
}

impl ExtractOptions {
    pub fn check(&self) -> Result<()> {
        if self.max_rank == 0 {
            return Err(Error::invalid("max_rank must be at least 1"));
        }
        match self.rule {
            RankRule::Energy(e) if !(e > 0.0 && e <= 1.0) => Err(Error::invalid(format!(
                "energy threshold {e} is outside (0, 1]"
            ))),
            RankRule::Fixed(0) => Err(Error::invalid("rank must be at least 1")),
            RankRule::Fixed(r) if r > self.max_rank => Err(Error::invalid(format!(
                "rank {r} exceeds max_rank {}; raise max_rank",
                self.max_rank
            ))),
            _ => Ok(()),
        }
    }
}

/// What happened to one layer.
#[derive(Clone, Debug, Serialize)]
pub struct LayerReport {
    pub module: String,
    pub tensor: String,
    pub out_features: usize,
    pub in_features: usize,
    pub rank: usize,
    /// E(r) against the exact total energy.
    pub energy: f64,
    /// ||ΔW - B·A||_F / ||ΔW||_F of the factors as written (= sqrt(1 - E(r)) up to rounding).
    pub rel_error: f64,
    /// ||ΔW||_F.
    pub delta_norm: f64,
    pub sigma_max: f32,
    /// The energy threshold was not reached within max_rank.
    pub capped: bool,
    /// "randomized" or "exact".
    pub method: &'static str,
    pub sketch: usize,
    /// E(1), E(2), ... over the sketch (for the energy-vs-rank plot).
    pub energy_curve: Vec<f64>,
    pub seconds: f64,
}

/// A tensor that was looked at and left out, and why.
#[derive(Clone, Debug, Serialize)]
pub struct Skipped {
    pub tensor: String,
    pub reason: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct ExtractReport {
    pub base: String,
    pub tuned: String,
    pub rule: String,
    pub max_rank: usize,
    pub rslora: bool,
    pub layers: Vec<LayerReport>,
    pub skipped: Vec<Skipped>,
    /// Parameters of the adapter (Σ r·(in + out)) and of the dense deltas it stands for.
    pub adapter_params: usize,
    pub dense_params: usize,
    pub seconds: f64,
}

pub struct Extraction {
    pub adapter: Adapter,
    pub report: ExtractReport,
}

/// Module globs; `*` crosses dots. Several globs may be comma-separated.
pub struct ModuleFilter {
    set: Option<globset::GlobSet>,
}

impl ModuleFilter {
    pub fn new(globs: &[String]) -> Result<ModuleFilter> {
        let pats: Vec<&str> = globs
            .iter()
            .flat_map(|g| g.split(','))
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .collect();
        if pats.is_empty() {
            return Ok(ModuleFilter { set: None });
        }
        let mut b = globset::GlobSetBuilder::new();
        for p in pats {
            let g = globset::Glob::new(p)
                .map_err(|e| Error::invalid(format!("module glob '{p}': {e}")))?;
            b.add(g);
        }
        let set = b
            .build()
            .map_err(|e| Error::invalid(format!("module globs: {e}")))?;
        Ok(ModuleFilter { set: Some(set) })
    }
    pub fn matches(&self, module: &str, tensor: &str) -> bool {
        match &self.set {
            None => true,
            Some(s) => s.is_match(module) || s.is_match(tensor),
        }
    }
}

/// One layer to extract.
#[derive(Clone, Debug)]
pub struct Job {
    pub module: String,
    pub tensor: String,
    pub rows: usize,
    pub cols: usize,
}

/// Chooses the layers from the two tables' headers (no tensor data is read). Errors name the
/// tensor: missing in `tuned`, shapes or dtypes that differ, more than 2 dims.
pub fn plan(
    base: &Weights,
    tuned: &Weights,
    filter: &ModuleFilter,
) -> Result<(Vec<Job>, Vec<Skipped>)> {
    let (bp, tp) = (base.path().display(), tuned.path().display());
    let mut jobs = Vec::new();
    let mut skipped = Vec::new();
    for e in base.entries() {
        let Some(module) = e.name.strip_suffix(".weight") else {
            continue;
        };
        if !filter.matches(module, &e.name) {
            continue;
        }
        let Some(t) = tuned.entry(&e.name) else {
            return Err(Error::not_found(format!(
                "tensor '{}' is in base '{bp}' but missing from tuned '{tp}'",
                e.name
            )));
        };
        if e.shape != t.shape {
            return Err(Error::shape(format!(
                "tensor '{}': base '{bp}' has shape {:?}, tuned '{tp}' has {:?}",
                e.name, e.shape, t.shape
            )));
        }
        match e.shape.len() {
            2 => {}
            0 | 1 => {
                skipped.push(Skipped {
                    tensor: e.name.clone(),
                    reason: format!("shape {:?} is not a matrix", e.shape),
                });
                continue;
            }
            _ => {
                return Err(Error::unsupported(format!(
                    "tensor '{}' has shape {:?}: only 2-D weights can be extracted (exclude it with --modules)",
                    e.name, e.shape
                )))
            }
        }
        for (which, entry, path) in [("base", e, &bp), ("tuned", t, &tp)] {
            if entry.dtype.is_none() {
                return Err(Error::unsupported(format!(
                    "tensor '{}' in {which} '{path}' has dtype {}; extraction reads F32, F16 and BF16",
                    entry.name, entry.dtype_name
                )));
            }
        }
        if e.shape[0] == 0 || e.shape[1] == 0 {
            skipped.push(Skipped {
                tensor: e.name.clone(),
                reason: "empty".into(),
            });
            continue;
        }
        jobs.push(Job {
            module: module.to_string(),
            tensor: e.name.clone(),
            rows: e.shape[0],
            cols: e.shape[1],
        });
    }
    if jobs.is_empty() {
        return Err(Error::not_found(format!(
            "no 2-D '.weight' tensor of base '{bp}' matches the module selection"
        )));
    }
    Ok((jobs, skipped))
}

/// ΔW = tuned - base as a dense row-major f32 matrix.
pub fn delta(base: MatRef<'_>, tuned: MatRef<'_>, tensor: &str) -> Result<Vec<f32>> {
    if (base.rows, base.cols) != (tuned.rows, tuned.cols) {
        return Err(Error::shape(format!(
            "tensor '{tensor}': base is {} x {}, tuned is {} x {}",
            base.rows, base.cols, tuned.rows, tuned.cols
        )));
    }
    let (m, n) = (base.rows, base.cols);
    let mut d = Vec::new();
    d.try_reserve_exact(m * n).map_err(|_| {
        Error::oom(format!(
            "tensor '{tensor}': cannot allocate ΔW ({m} x {n} f32)"
        ))
    })?;
    d.resize(m * n, 0f32);
    let mut row = vec![0f32; n];
    for i in 0..m {
        let out = &mut d[i * n..(i + 1) * n];
        tuned.row_f32(i, 0, out);
        base.row_f32(i, 0, &mut row);
        for (o, b) in out.iter_mut().zip(&row) {
            *o -= b;
        }
    }
    if d.iter().any(|x| !x.is_finite()) {
        return Err(Error::numeric(format!(
            "tensor '{tensor}': ΔW has a non-finite value (inf or NaN in base or tuned)"
        )));
    }
    Ok(d)
}

/// The result for one layer: the LoRA module (None when ΔW = 0) and its report line.
pub struct LayerResult {
    pub lora: Option<Lora>,
    pub report: Option<LayerReport>,
    pub skipped: Option<Skipped>,
}

/// Extracts one layer from a dense ΔW (m x n, row-major).
pub fn extract_delta(
    module: &str,
    tensor: &str,
    d: &[f32],
    m: usize,
    n: usize,
    opts: &ExtractOptions,
    par: faer::Par,
) -> Result<LayerResult> {
    let start = Instant::now();
    let total = svd::frobenius_sq_slice(d);
    if total == 0.0 {
        return Ok(LayerResult {
            lora: None,
            report: None,
            skipped: Some(Skipped {
                tensor: tensor.to_string(),
                reason: "unchanged (ΔW = 0)".into(),
            }),
        });
    }
    let a = faer::MatRef::from_row_major_slice(d, m, n);
    let full = m.min(n);
    let want = match opts.rule {
        RankRule::Energy(_) => opts.max_rank.min(full),
        RankRule::Fixed(r) => r.min(full),
    };
    let ro = RsvdOptions {
        oversample: opts.oversample,
        power_iters: opts.power_iters,
        seed: opts.seed,
        par,
    };
    let f: Factors = svd::randomized_svd(a, want, &ro).map_err(|e| e.context(tensor))?;
    let (r, capped) = match opts.rule {
        RankRule::Fixed(_) => (want, false),
        RankRule::Energy(t) => match svd::rank_for_energy(&f.s[..want.min(f.s.len())], total, t) {
            Some(r) => (r.max(1), false),
            None => (want.min(f.s.len()), true),
        },
    };
    let r = r.min(f.s.len()).max(1);
    let kept = f.kept_energy(r);
    let energy = (kept / total).min(1.0);
    let mut curve = Vec::with_capacity(f.s.len());
    let mut acc = 0f64;
    for &s in &f.s {
        acc += (s as f64) * (s as f64);
        curve.push((acc / total).min(1.0));
    }
    // B = U_r √Σ_r (m x r), A = √Σ_r V_rᵀ (r x n).
    let root: Vec<f32> = f.s[..r].iter().map(|&s| s.max(0.0).sqrt()).collect();
    let mut bv = vec![0f32; m * r];
    for i in 0..m {
        for c in 0..r {
            bv[i * r + c] = f.u[(i, c)] * root[c];
        }
    }
    let mut av = vec![0f32; r * n];
    for c in 0..r {
        for j in 0..n {
            av[c * n + j] = root[c] * f.v[(j, c)];
        }
    }
    let bm = Matrix::from_f32(opts.dtype, m, r, &bv)?;
    let am = Matrix::from_f32(opts.dtype, r, n, &av)?;
    // The error of the factors as written (after rounding to their dtype), measured directly:
    // sqrt(1 - E(r)) is the same in exact arithmetic but loses digits when E(r) is close to 1.
    let rel_error =
        (residual_sq(d, &bm.to_f32_vec(), &am.to_f32_vec(), m, n, r, par) / total).sqrt();
    let (alpha, scaling) = if opts.rslora {
        ((r as f64).sqrt() as f32, Scaling::RsLora)
    } else {
        (r as f32, Scaling::Lora)
    };
    let lora = Lora::new(
        module,
        TensorData::Owned(am),
        TensorData::Owned(bm),
        alpha,
        scaling,
        0.0,
    )?;
    Ok(LayerResult {
        lora: Some(lora),
        report: Some(LayerReport {
            module: module.to_string(),
            tensor: tensor.to_string(),
            out_features: m,
            in_features: n,
            rank: r,
            energy,
            rel_error,
            delta_norm: total.sqrt(),
            sigma_max: f.s[0],
            capped,
            method: if f.exact { "exact" } else { "randomized" },
            sketch: f.s.len(),
            energy_curve: curve,
            seconds: start.elapsed().as_secs_f64(),
        }),
        skipped: None,
    })
}

/// ||D - B·A||_F² (D m x n, B m x r, A r x n, row-major), in row blocks (no m x n scratch).
fn residual_sq(
    d: &[f32],
    b: &[f32],
    a: &[f32],
    m: usize,
    n: usize,
    r: usize,
    par: faer::Par,
) -> f64 {
    const ROWS: usize = 256;
    let am = faer::MatRef::from_row_major_slice(a, r, n);
    let mut acc = 0f64;
    let mut tmp = vec![0f32; ROWS.min(m) * n];
    let mut r0 = 0;
    while r0 < m {
        let rows = ROWS.min(m - r0);
        let t = &mut tmp[..rows * n];
        t.copy_from_slice(&d[r0 * n..(r0 + rows) * n]);
        let bm = faer::MatRef::from_row_major_slice(&b[r0 * r..(r0 + rows) * r], rows, r);
        let dst = faer::MatMut::from_row_major_slice_mut(t, rows, n);
        faer::linalg::matmul::matmul(dst, faer::Accum::Add, bm, am, -1.0, par);
        acc += svd::frobenius_sq_slice(t);
        r0 += rows;
    }
    acc
}

/// Progress: (layers done, layers total, tensor just finished). Called from worker threads, one
/// call at a time.
pub type Progress<'a> = &'a (dyn Fn(usize, usize, &str) + Sync);

/// Extracts an adapter from `base` and `tuned` (each a safetensors file or sharded index).
/// Layers run in parallel on a pool of `opts.threads` threads (0 = all cores); each holds only
/// its own ΔW.
pub fn extract(
    base: &Weights,
    tuned: &Weights,
    opts: &ExtractOptions,
    progress: Progress<'_>,
) -> Result<Extraction> {
    opts.check()?;
    let start = Instant::now();
    let filter = ModuleFilter::new(&opts.modules)?;
    let (jobs, mut skipped) = plan(base, tuned, &filter)?;
    let threads = if opts.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        opts.threads
    };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("rankfuse-extract-{i}"))
        .build()
        .map_err(|e| Error::internal(format!("cannot start {threads} threads: {e}")))?;
    let total = jobs.len();
    let done = Mutex::new(0usize);
    // One layer per thread at a time; when there are fewer layers than threads, each layer's
    // GEMMs share the spare threads (nested rayon on the same pool).
    let par = match threads / total.min(threads).max(1) {
        0 | 1 => faer::Par::Seq,
        n => faer::Par::rayon(n),
    };
    let results: Vec<Result<LayerResult>> = pool.install(|| {
        jobs.par_iter()
            .with_max_len(1)
            .map(|j| {
                let r = (|| {
                    let bw = base.get(&j.tensor)?;
                    let tw = tuned.get(&j.tensor)?;
                    let d = delta(bw, tw, &j.tensor)?;
                    extract_delta(&j.module, &j.tensor, &d, j.rows, j.cols, opts, par)
                })();
                let mut n = done.lock().unwrap_or_else(|e| e.into_inner());
                *n += 1;
                progress(*n, total, &j.tensor);
                r
            })
            .collect()
    });
    let mut adapter = Adapter::new("extracted");
    let mut layers = Vec::new();
    for r in results {
        let r = r?;
        if let Some(l) = r.lora {
            adapter.add(l)?;
        }
        layers.extend(r.report);
        skipped.extend(r.skipped);
    }
    if adapter.is_empty() {
        return Err(Error::invalid(format!(
            "base '{}' and tuned '{}' are identical on every selected tensor: nothing to extract",
            base.path().display(),
            tuned.path().display()
        )));
    }
    let adapter_params = layers
        .iter()
        .map(|l| l.rank * (l.in_features + l.out_features))
        .sum();
    let dense_params = layers.iter().map(|l| l.in_features * l.out_features).sum();
    let rule = match opts.rule {
        RankRule::Energy(e) => format!("energy >= {e}"),
        RankRule::Fixed(r) => format!("rank = {r}"),
    };
    Ok(Extraction {
        adapter,
        report: ExtractReport {
            base: base.path().display().to_string(),
            tuned: tuned.path().display().to_string(),
            rule,
            max_rank: opts.max_rank,
            rslora: opts.rslora,
            layers,
            skipped,
            adapter_params,
            dense_params,
            seconds: start.elapsed().as_secs_f64(),
        },
    })
}

/// Writes the PEFT folder (`adapter_config.json` with rank/alpha patterns,
/// `adapter_model.safetensors`), `extract_report.json`, `extract_report.md` and, when `svg`,
/// `energy.svg` (energy vs rank per layer).
pub fn write(ex: &Extraction, dir: &Path, svg: bool) -> Result<()> {
    peft::save(&ex.adapter, dir)?;
    let json = serde_json::to_string_pretty(&ex.report)
        .map_err(|e| Error::internal(format!("report JSON: {e}")))?;
    let p = dir.join("extract_report.json");
    std::fs::write(&p, json).map_err(|e| Error::from_io(&p, &e))?;
    let p = dir.join("extract_report.md");
    std::fs::write(&p, markdown(&ex.report)).map_err(|e| Error::from_io(&p, &e))?;
    if svg {
        let p = dir.join("energy.svg");
        std::fs::write(&p, energy_svg(&ex.report)).map_err(|e| Error::from_io(&p, &e))?;
    }
    Ok(())
}

/// The report as a markdown table.
pub fn markdown(r: &ExtractReport) -> String {
    let mut s = String::new();
    s.push_str("# PHLoRA extraction\n\n");
    s.push_str(&format!(
        "- base: `{}`\n- tuned: `{}`\n- rule: {} (max rank {}){}\n- adapter parameters: {} ({:.2}% of the {} dense delta parameters)\n- time: {:.2} s\n\n",
        r.base,
        r.tuned,
        r.rule,
        r.max_rank,
        if r.rslora { ", rsLoRA" } else { "" },
        r.adapter_params,
        100.0 * r.adapter_params as f64 / r.dense_params.max(1) as f64,
        r.dense_params,
        r.seconds
    ));
    s.push_str("| module | shape | rank | energy kept | rel. Frobenius error | σ₁ | method |\n");
    s.push_str("| --- | --- | ---: | ---: | ---: | ---: | --- |\n");
    for l in &r.layers {
        s.push_str(&format!(
            "| `{}` | {} x {} | {}{} | {:.6} | {:.6} | {:.4e} | {} |\n",
            l.module,
            l.out_features,
            l.in_features,
            l.rank,
            if l.capped { " (cap)" } else { "" },
            l.energy,
            l.rel_error,
            l.sigma_max,
            l.method
        ));
    }
    if !r.skipped.is_empty() {
        s.push_str("\nSkipped:\n\n");
        for k in &r.skipped {
            s.push_str(&format!("- `{}`: {}\n", k.tensor, k.reason));
        }
    }
    s
}

/// Energy kept vs rank, one polyline per layer (hand-written SVG, no plotting crate).
pub fn energy_svg(r: &ExtractReport) -> String {
    let (w, h, ml, mb, mt, mr) = (720.0, 420.0, 60.0, 45.0, 20.0, 20.0);
    let pw = w - ml - mr;
    let ph = h - mt - mb;
    let maxr = r
        .layers
        .iter()
        .map(|l| l.energy_curve.len())
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let x = |k: f64| ml + pw * k / maxr;
    let y = |e: f64| mt + ph * (1.0 - e);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    s.push_str(&format!(
        "<line x1=\"{ml}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n<line x1=\"{ml}\" y1=\"{mt}\" x2=\"{ml}\" y2=\"{}\" stroke=\"black\"/>\n",
        mt + ph, ml + pw, mt + ph, mt + ph
    ));
    for t in 0..=4 {
        let e = t as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{e:.2}</text>\n",
            ml - 6.0,
            y(e) + 4.0
        ));
    }
    s.push_str(&format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">rank (max {})</text>\n<text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">energy kept E(r)</text>\n",
        ml + pw / 2.0, h - 10.0, maxr, mt + ph / 2.0, mt + ph / 2.0
    ));
    if let Some(t) = r
        .rule
        .strip_prefix("energy >= ")
        .and_then(|t| t.parse::<f64>().ok())
    {
        s.push_str(&format!(
            "<line x1=\"{ml}\" y1=\"{0:.1}\" x2=\"{1}\" y2=\"{0:.1}\" stroke=\"red\" stroke-dasharray=\"4 3\"/>\n",
            y(t),
            ml + pw
        ));
    }
    let n = r.layers.len().max(1);
    for (i, l) in r.layers.iter().enumerate() {
        let hue = 360.0 * i as f64 / n as f64;
        let mut pts = format!("{:.1},{:.1}", x(0.0), y(0.0));
        for (k, e) in l.energy_curve.iter().enumerate() {
            pts.push_str(&format!(" {:.1},{:.1}", x((k + 1) as f64), y(*e)));
        }
        s.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"hsl({hue:.0},70%,40%)\" stroke-width=\"1.2\" points=\"{pts}\"><title>{}</title></polyline>\n",
            l.module
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        ));
    }
    s.push_str("</svg>\n");
    s
}
