//! `rankfuse bench --methods`: the other adapter kinds against LoRA, timed interleaved in one
//! run: one mixed call of 16 EigenLoRAx adapters on one basis vs the same 16 as dense LoRA
//! adapters (their exact reconstructions, same rank), and a KRAdapter vs a LoRA of the same
//! parameter count, each next to the base alone.

use super::{median, random};
use crate::adapter::{BasisModule, Lora, Scaling, TensorData};
use crate::backend::{LinearProblem, Slot};
use crate::dtype::DType;
use crate::error::Result;
use crate::matrix::Matrix;
use crate::methods::{resolve, Slots};
use crate::rng::SplitMix64;
use crate::runtime::{slot, Runtime};
use faer::Mat;
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One comparison: base, LoRA and the method on the same x and W.
#[derive(Clone, Debug, Serialize)]
pub struct MethodResult {
    pub case: String,
    pub dtype: &'static str,
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub adapters: usize,
    /// LoRA rank (EigenLoRAx: loadings rank; KRAdapter comparison: rank of equal parameters).
    pub lora_rank: usize,
    /// EigenLoRAx basis components K (0 for KRAdapter).
    pub components: usize,
    pub iters: usize,
    pub base_ms: f64,
    pub lora_ms: f64,
    pub method_ms: f64,
    pub lora_over_base: f64,
    pub method_over_base: f64,
    pub method_over_lora: f64,
    /// Bytes the call must read beyond W and x: the adapters' parameters (f32 for the methods,
    /// the dtype for LoRA).
    pub lora_adapter_bytes: usize,
    pub method_adapter_bytes: usize,
    pub w_bytes: usize,
    /// max |y_method - y_lora| / max |y_lora - y_base| (EigenLoRAx: its dense reconstruction must
    /// agree; KRAdapter: not comparable, NaN).
    pub rel_diff: f64,
    pub params_lora: usize,
    pub params_method: usize,
}

fn orthonormal(rng: &mut SplitMix64, rows: usize, k: usize) -> Mat<f32> {
    let g = Mat::<f32>::from_fn(rows, k, |_, _| rng.normal());
    g.qr().compute_thin_Q()
}

fn time3(
    min_time: Duration,
    max_iters: usize,
    mut f: [&mut dyn FnMut() -> Result<()>; 3],
) -> Result<(usize, [f64; 3])> {
    for g in f.iter_mut() {
        g()?;
    }
    let mut t: [Vec<f64>; 3] = Default::default();
    let start = Instant::now();
    while t[0].len() < max_iters && (t[0].len() < 3 || start.elapsed() < min_time * 3) {
        for (i, g) in f.iter_mut().enumerate() {
            let t0 = Instant::now();
            g()?;
            t[i].push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let n = t[0].len();
    Ok((n, [median(&mut t[0]), median(&mut t[1]), median(&mut t[2])]))
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
}

/// 16 EigenLoRAx adapters (loadings rank `r`, K components) on one basis, `m` rows round-robin,
/// vs their dense LoRA reconstructions in the same mixed call, vs the base.
#[allow(clippy::too_many_arguments)]
pub fn eigen_vs_lora(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    adapters: usize,
    r: usize,
    kk: usize,
    min_time: Duration,
) -> Result<MethodResult> {
    let mut rng = SplitMix64::new(0xE16E);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let basis = Arc::new(BasisModule::new(
        "bench",
        orthonormal(&mut rng, k, kk),
        orthonormal(&mut rng, n, kk),
        f64::NAN,
        f64::NAN,
    )?);
    let mut eig = Vec::new();
    let mut dense = Vec::new();
    for _ in 0..adapters {
        let aa = rng.fill_uniform(kk * r, -0.5, 0.5);
        let ab = rng.fill_uniform(kk * r, -0.5, 0.5);
        let e = Lora::eigen_from_loadings(basis.clone(), r, &aa, &ab, 1.0)?;
        // Dense: A = α_Aᵀ C_Aᵀ (r x k), B = C_B α_B (n x r), fixed scale 1.
        let am = Mat::<f32>::from_fn(kk, r, |c, j| aa[c * r + j]);
        let bm = Mat::<f32>::from_fn(kk, r, |c, j| ab[c * r + j]);
        let a = am.transpose() * basis.c_a.transpose();
        let b = &basis.c_b * &bm;
        let av: Vec<f32> = (0..r * k).map(|i| a[(i / k, i % k)]).collect();
        let bv: Vec<f32> = (0..n * r).map(|i| b[(i / r, i % r)]).collect();
        dense.push(Lora::new(
            "bench",
            TensorData::Owned(Matrix::from_f32(dtype, r, k, &av)?),
            TensorData::Owned(Matrix::from_f32(dtype, n, r, &bv)?),
            1.0,
            Scaling::Fixed,
            1.0,
        )?);
        eig.push(e);
    }
    let row_slot: Vec<i32> = (0..m).map(|i| (i % adapters) as i32).collect();
    let lslots: Vec<Option<Slot>> = dense
        .iter()
        .map(|l| slot(l, 0, 1.0).map(Some))
        .collect::<Result<_>>()?;
    let es = Slots::from_any(
        eig.iter()
            .map(|l| resolve(l, 0, 1.0).map(Some))
            .collect::<Result<Vec<_>>>()?,
    );
    let base = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let lp = LinearProblem {
        slots: &lslots,
        row_slot: Some(&row_slot),
        ..base
    };
    let ep = LinearProblem {
        slots: &es.low,
        row_slot: Some(&row_slot),
        ..base
    };
    let (mut yb, mut yl, mut ye) = (
        Matrix::zeros(dtype, m, n)?,
        Matrix::zeros(dtype, m, n)?,
        Matrix::zeros(dtype, m, n)?,
    );
    let (iters, [tb, tl, te]) = time3(
        min_time,
        50,
        [
            &mut || rt.linear(&base, &mut yb.view_mut()),
            &mut || rt.linear(&lp, &mut yl.view_mut()),
            &mut || rt.linear_with(&ep, &es.methods, &mut ye.view_mut()),
        ],
    )?;
    let (b, l, e) = (yb.to_f32_vec(), yl.to_f32_vec(), ye.to_f32_vec());
    let rel = max_abs_diff(&e, &l) / max_abs_diff(&l, &b).max(1e-30);
    let es = dtype.size();
    Ok(MethodResult {
        case: "eigenlorax_vs_lora_mixed".into(),
        dtype: dtype.name(),
        m,
        k,
        n,
        adapters,
        lora_rank: r,
        components: kk,
        iters,
        base_ms: tb,
        lora_ms: tl,
        method_ms: te,
        lora_over_base: tl / tb,
        method_over_base: te / tb,
        method_over_lora: te / tl,
        lora_adapter_bytes: adapters * r * (k + n) * es,
        method_adapter_bytes: (k + n) * kk * 4 + adapters * 2 * kk * r * 4,
        w_bytes: n * k * es,
        rel_diff: rel,
        params_lora: adapters * r * (k + n),
        params_method: adapters * 2 * kk * r,
    })
}

/// A KRAdapter on an n x k weight vs a LoRA with (about) its parameter count, `m` rows.
pub fn kron_vs_lora(
    rt: &Runtime,
    dtype: DType,
    m: usize,
    k: usize,
    n: usize,
    min_time: Duration,
) -> Result<MethodResult> {
    let mut rng = SplitMix64::new(0xC0DE + m as u64);
    let x = random(&mut rng, dtype, m, k, 1.0)?;
    let w = random(&mut rng, dtype, n, k, 0.02)?;
    let s = crate::adapter::KronShape::new(n, k);
    let u = rng.fill_uniform(s.m * s.r, -0.1, 0.1);
    let v = rng.fill_uniform(s.m * s.w(), -0.1, 0.1);
    let kr = Lora::kron_from_parts("bench", n, k, &u, &v, 2.0)?;
    let params = s.m * (2 * s.r + s.d);
    let r = (params / (k + n)).max(1);
    let a = random(&mut rng, dtype, r, k, 0.02)?;
    let b = random(&mut rng, dtype, n, r, 0.02)?;
    let lora = Lora::new(
        "bench",
        TensorData::Owned(a),
        TensorData::Owned(b),
        2.0 * r as f32,
        Scaling::Lora,
        0.0,
    )?;
    let ls = [Some(slot(&lora, 0, 1.0)?)];
    let ks = Slots::from_any([Some(resolve(&kr, 0, 1.0)?)]);
    let base = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    let lp = LinearProblem { slots: &ls, ..base };
    let kp = LinearProblem {
        slots: &ks.low,
        ..base
    };
    let mut y = [
        Matrix::zeros(dtype, m, n)?,
        Matrix::zeros(dtype, m, n)?,
        Matrix::zeros(dtype, m, n)?,
    ];
    let [y0, y1, y2] = &mut y;
    let (iters, [tb, tl, tk]) = time3(
        min_time,
        50,
        [
            &mut || rt.linear(&base, &mut y0.view_mut()),
            &mut || rt.linear(&lp, &mut y1.view_mut()),
            &mut || rt.linear_with(&kp, &ks.methods, &mut y2.view_mut()),
        ],
    )?;
    let es = dtype.size();
    Ok(MethodResult {
        case: "kradapter_vs_lora".into(),
        dtype: dtype.name(),
        m,
        k,
        n,
        adapters: 1,
        lora_rank: r,
        components: 0,
        iters,
        base_ms: tb,
        lora_ms: tl,
        method_ms: tk,
        lora_over_base: tl / tb,
        method_over_base: tk / tb,
        method_over_lora: tk / tl,
        lora_adapter_bytes: r * (k + n) * es,
        method_adapter_bytes: params * 4,
        w_bytes: n * k * es,
        rel_diff: f64::NAN,
        params_lora: r * (k + n),
        params_method: params,
    })
}

/// The default comparisons of `rankfuse bench --methods` for one dtype and k x n shape.
pub fn run_methods(
    rt: &Runtime,
    dtype: DType,
    k: usize,
    n: usize,
    min_time: Duration,
) -> Result<Vec<MethodResult>> {
    let mut out = vec![eigen_vs_lora(rt, dtype, 64, k, n, 16, 8, 32, min_time)?];
    for m in [1, 128] {
        out.push(kron_vs_lora(rt, dtype, m, k, n, min_time)?);
    }
    Ok(out)
}
