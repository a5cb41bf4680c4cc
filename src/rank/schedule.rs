//! RankAdaptor: per-layer ranks for structurally pruned models. A light performance model —
//! ridge regression over per-layer features (rank, layer index, width, pruning ratio), additive
//! over layers — is fitted on short probe runs (rank map -> measured quality), then a greedy
//! search (best predicted gain per parameter) refined by a seeded evolutionary search picks the
//! rank map with the best predicted quality under a trainable-parameter budget. Ranks are applied
//! through masks / per-call rank, never by reallocation; the map is saved as PEFT `rank_pattern`.

use crate::error::{Error, Result};
use crate::rng::SplitMix64;

/// What the model knows about one adapted layer.
#[derive(Clone, Debug)]
pub struct LayerInfo {
    pub name: String,
    /// Position in the network (block index).
    pub index: usize,
    pub n_layers: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// Fraction of the layer's channels removed by pruning (0..1).
    pub prune_ratio: f64,
}

impl LayerInfo {
    /// Trainable parameters of rank r on this layer.
    pub fn params(&self, r: usize) -> usize {
        r * (self.in_features + self.out_features)
    }
}

/// One probe run: a rank map and the quality measured after a short training run (higher is
/// better, e.g. -log(relative error)).
#[derive(Clone, Debug)]
pub struct Probe {
    pub ranks: Vec<usize>,
    pub quality: f64,
}

/// Features of (layer, rank). The model is additive over layers: quality(map) = sum_l phi(l, r_l) . theta.
pub fn features(l: &LayerInfo, r: usize) -> Vec<f64> {
    let lr = (1.0 + r as f64).ln();
    let pos = l.index as f64 / (l.n_layers.max(2) - 1) as f64;
    let mid = 1.0 - (2.0 * pos - 1.0).powi(2);
    let width = (l.in_features.min(l.out_features) as f64).ln();
    vec![
        lr,
        lr * l.prune_ratio,
        lr * mid,
        lr * width / 8.0,
        (r as f64).sqrt() * l.prune_ratio,
        r as f64 / 16.0,
    ]
}

/// A fitted performance model.
#[derive(Clone, Debug)]
pub struct PerfModel {
    pub theta: Vec<f64>,
    pub intercept: f64,
    pub lambda: f64,
}

fn design(layers: &[LayerInfo], ranks: &[usize]) -> Vec<f64> {
    let mut x = vec![0.0; features(&layers[0], 1).len()];
    for (l, &r) in layers.iter().zip(ranks) {
        for (a, b) in x.iter_mut().zip(features(l, r)) {
            *a += b;
        }
    }
    x
}

/// Solves (X^T X + lambda I) theta = X^T y with centred data (Gaussian elimination, f64).
pub fn fit(layers: &[LayerInfo], probes: &[Probe], lambda: f64) -> Result<PerfModel> {
    if layers.is_empty() || probes.len() < 2 {
        return Err(Error::invalid(
            "RankAdaptor: need at least one layer and two probe runs to fit the model",
        ));
    }
    for p in probes {
        if p.ranks.len() != layers.len() || !p.quality.is_finite() {
            return Err(Error::invalid(format!(
                "RankAdaptor: probe {:?} does not match {} layers or has a non-finite quality",
                p.ranks,
                layers.len()
            )));
        }
    }
    let xs: Vec<Vec<f64>> = probes.iter().map(|p| design(layers, &p.ranks)).collect();
    let d = xs[0].len();
    let np = probes.len() as f64;
    let xm: Vec<f64> = (0..d)
        .map(|j| xs.iter().map(|x| x[j]).sum::<f64>() / np)
        .collect();
    let ym = probes.iter().map(|p| p.quality).sum::<f64>() / np;
    let mut m = vec![vec![0.0; d + 1]; d];
    for (x, p) in xs.iter().zip(probes) {
        for i in 0..d {
            for j in 0..d {
                m[i][j] += (x[i] - xm[i]) * (x[j] - xm[j]);
            }
            m[i][d] += (x[i] - xm[i]) * (p.quality - ym);
        }
    }
    for (i, row) in m.iter_mut().enumerate() {
        row[i] += lambda;
    }
    for c in 0..d {
        let piv = (c..d)
            .max_by(|&a, &b| m[a][c].abs().total_cmp(&m[b][c].abs()))
            .expect("non-empty");
        m.swap(c, piv);
        let p = m[c][c];
        if p.abs() < 1e-300 {
            return Err(Error::numeric(
                "RankAdaptor: singular system in ridge regression",
            ));
        }
        for r in 0..d {
            if r != c {
                let f = m[r][c] / p;
                let pivot_row = m[c].clone();
                for (x, y) in m[r][c..=d].iter_mut().zip(&pivot_row[c..=d]) {
                    *x -= f * y;
                }
            }
        }
    }
    let theta: Vec<f64> = (0..d).map(|i| m[i][d] / m[i][i]).collect();
    let intercept = ym - theta.iter().zip(&xm).map(|(t, x)| t * x).sum::<f64>();
    Ok(PerfModel {
        theta,
        intercept,
        lambda,
    })
}

impl PerfModel {
    pub fn predict(&self, layers: &[LayerInfo], ranks: &[usize]) -> f64 {
        self.intercept
            + design(layers, ranks)
                .iter()
                .zip(&self.theta)
                .map(|(a, b)| a * b)
                .sum::<f64>()
    }
}

fn cost(layers: &[LayerInfo], ranks: &[usize]) -> usize {
    layers.iter().zip(ranks).map(|(l, &r)| l.params(r)).sum()
}

/// The rank map with the best predicted quality whose trainable parameters fit `budget`:
/// greedy (from `r_min` everywhere, add the rank with the best predicted gain per parameter),
/// then `generations` rounds of seeded mutation (move a rank between layers) keeping
/// improvements.
pub fn search(
    model: &PerfModel,
    layers: &[LayerInfo],
    budget: usize,
    r_min: usize,
    r_max: usize,
    generations: usize,
    seed: u64,
) -> Result<Vec<usize>> {
    let mut ranks = vec![r_min; layers.len()];
    if r_min == 0 || r_min > r_max || cost(layers, &ranks) > budget {
        return Err(Error::invalid(format!(
            "RankAdaptor: rank {r_min} everywhere does not fit the budget of {budget} parameters (or r_min/r_max out of range)"
        )));
    }
    loop {
        let base = model.predict(layers, &ranks);
        let c0 = cost(layers, &ranks);
        let mut best: Option<(f64, usize)> = None;
        for i in 0..layers.len() {
            if ranks[i] >= r_max || c0 + layers[i].params(1) > budget {
                continue;
            }
            ranks[i] += 1;
            let gain = (model.predict(layers, &ranks) - base) / layers[i].params(1) as f64;
            ranks[i] -= 1;
            if best.is_none_or(|(g, _)| gain > g) {
                best = Some((gain, i));
            }
        }
        match best {
            Some((_, i)) => ranks[i] += 1,
            None => break,
        }
    }
    let mut rng = SplitMix64::new(seed);
    let mut best_q = model.predict(layers, &ranks);
    for _ in 0..generations {
        let mut cand = ranks.clone();
        let moves = rng.range(1, 3);
        for _ in 0..moves {
            let from = rng.range(0, layers.len() - 1);
            let to = rng.range(0, layers.len() - 1);
            if cand[from] > r_min && cand[to] < r_max {
                cand[from] -= 1;
                cand[to] += 1;
            }
        }
        // Fill any room the move freed.
        for i in 0..layers.len() {
            while cand[i] < r_max && cost(layers, &cand) + layers[i].params(1) <= budget {
                cand[i] += 1;
                if model.predict(layers, &cand) < model.predict(layers, &ranks) {
                    cand[i] -= 1;
                    break;
                }
            }
        }
        if cost(layers, &cand) <= budget {
            let q = model.predict(layers, &cand);
            if q > best_q {
                best_q = q;
                ranks = cand;
            }
        }
    }
    Ok(ranks)
}

/// Random rank maps for probe runs (seeded), each within `budget`.
pub fn probe_maps(
    layers: &[LayerInfo],
    n: usize,
    budget: usize,
    r_min: usize,
    r_max: usize,
    seed: u64,
) -> Vec<Vec<usize>> {
    let mut rng = SplitMix64::new(seed);
    let mut out = Vec::new();
    let mut tries = 0;
    while out.len() < n && tries < 1000 * n.max(1) {
        tries += 1;
        let m: Vec<usize> = layers.iter().map(|_| rng.range(r_min, r_max)).collect();
        if cost(layers, &m) <= budget * 3 / 2 {
            out.push(m);
        }
    }
    out
}
