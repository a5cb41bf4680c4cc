//! EigenLoRAx: many LoRA adapters of one base model share a principal subspace per module.
//!
//! Build (per module, N adapters of ranks r_i, R = Σ r_i):
//! - A side: X_A = [A_1ᵀ | … | A_Nᵀ] (in x R); B side: X_B = [B_1 | … | B_N] (out x R).
//! - Centre each side by the mean of its R columns (sklearn-style PCA over the stacked rank
//!   vectors), then keep the top-K left singular vectors (= eigenvectors of X_c X_cᵀ): C_A (in x K),
//!   C_B (out x K). K > R is an error naming the module (there are only R directions).
//! - `augment` G adds G seeded Gaussian vectors, Gram–Schmidt-orthogonalised against the basis
//!   and each other (the low-resource case: room for what the N adapters never used).
//!
//! Project: an adapter becomes K x r loadings per side, α_A = C_Aᵀ A_iᵀ and α_B = C_Bᵀ (s_i B_i),
//! with the adapter's own scale s_i folded into α_B so that the eigen adapter's scale is 1 (fixed,
//! as in the paper): ΔW ≈ C_B α_B α_Aᵀ C_Aᵀ.
//!
//! Serve: Δy = ((x C_A) α_A α_Bᵀ) C_Bᵀ. z = x·C_A (m x K) is computed once per call and shared by
//! every row and every eigen adapter on the basis; an adapter then costs one K x K core
//! (α_A α_Bᵀ, precomputed) per row, and all adapters share the final product with C_Bᵀ.

use crate::adapter::{Adapter, Lora, Scaling, TensorData};
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef, Matrix};
use crate::rng::SplitMix64;
use crate::runtime::Runtime;
use crate::weights::{write_safetensors, TensorOut, Weights};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

pub use crate::adapter::kind::BasisModule;

/// A basis for every module of a set of adapters.
#[derive(Clone, Debug)]
pub struct Basis {
    pub modules: BTreeMap<String, std::sync::Arc<BasisModule>>,
    pub components: usize,
    pub augment: usize,
    pub adapters: Vec<String>,
}

fn to_mat(m: MatRef<'_>) -> Mat<f32> {
    let v = m.to_f32_vec();
    Mat::from_fn(m.rows, m.cols, |i, j| v[i * m.cols + j])
}

fn mat_f32_rows(m: &Mat<f32>) -> Vec<f32> {
    let mut v = Vec::with_capacity(m.nrows() * m.ncols());
    for i in 0..m.nrows() {
        for j in 0..m.ncols() {
            v.push(m[(i, j)]);
        }
    }
    v
}

/// Top-k left singular vectors of the column-centred `x`, plus the share of variance kept.
fn principal(x: &Mat<f32>, k: usize) -> Result<(Mat<f32>, f64)> {
    let (rows, cols) = (x.nrows(), x.ncols());
    let mut c = x.clone();
    for i in 0..rows {
        let mean: f64 = (0..cols).map(|j| x[(i, j)] as f64).sum::<f64>() / cols as f64;
        for j in 0..cols {
            c[(i, j)] -= mean as f32;
        }
    }
    let svd = c
        .thin_svd()
        .map_err(|e| Error::numeric(format!("basis SVD did not converge ({e:?})")))?;
    let s: Vec<f64> = svd
        .S()
        .column_vector()
        .iter()
        .map(|&v| (v as f64) * (v as f64))
        .collect();
    let total: f64 = s.iter().sum();
    let kept: f64 = s.iter().take(k).sum();
    let u = svd.U().subcols(0, k).to_owned();
    Ok((u, if total > 0.0 { kept / total } else { 1.0 }))
}

/// Appends `g` seeded Gaussian columns orthogonalised (twice, for stability) against `basis` and
/// each other.
fn augment(basis: &Mat<f32>, g: usize, seed: u64) -> Mat<f32> {
    let (n, k) = (basis.nrows(), basis.ncols());
    let mut cols: Vec<Vec<f64>> = (0..k)
        .map(|j| (0..n).map(|i| basis[(i, j)] as f64).collect())
        .collect();
    let mut rng = SplitMix64::new(seed);
    let mut added = 0;
    while added < g {
        let mut v: Vec<f64> = (0..n).map(|_| rng.normal() as f64).collect();
        for _ in 0..2 {
            for c in &cols {
                let d: f64 = c.iter().zip(&v).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(c).for_each(|(x, c)| *x -= d * c);
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm < 1e-6 {
            continue;
        }
        v.iter_mut().for_each(|x| *x /= norm);
        cols.push(v);
        added += 1;
    }
    Mat::from_fn(n, k + g, |i, j| cols[j][i] as f32)
}

/// Builds the basis of every module present in all `adapters`.
pub fn build(adapters: &[Adapter], components: usize, aug: usize, seed: u64) -> Result<Basis> {
    let refs: Vec<&Adapter> = adapters.iter().collect();
    build_refs(&refs, components, aug, seed)
}

/// `build` over borrowed adapters (the C ABI holds them in handles). LoRA modules only.
pub fn build_refs(
    adapters: &[&Adapter],
    components: usize,
    aug: usize,
    seed: u64,
) -> Result<Basis> {
    for a in adapters {
        for l in a.modules() {
            l.require_lora("building an EigenLoRAx basis")?;
        }
    }
    if adapters.is_empty() {
        return Err(Error::invalid("eigen build: no adapters given"));
    }
    if components == 0 {
        return Err(Error::invalid("eigen build: components must be at least 1"));
    }
    let first = &adapters[0];
    let mut modules = BTreeMap::new();
    for l0 in first.modules() {
        let mut a_cols: Vec<Mat<f32>> = Vec::new();
        let mut b_cols: Vec<Mat<f32>> = Vec::new();
        for ad in adapters {
            let l = ad.get(&l0.name).ok_or_else(|| {
                Error::not_found(format!(
                    "eigen build: adapter '{}' has no module '{}' (adapter '{}' has it)",
                    ad.name, l0.name, first.name
                ))
            })?;
            if (l.out_features, l.in_features) != (l0.out_features, l0.in_features) {
                return Err(Error::shape(format!(
                    "eigen build: module '{}' is {} x {} in adapter '{}' but {} x {} in '{}'",
                    l0.name,
                    l.out_features,
                    l.in_features,
                    ad.name,
                    l0.out_features,
                    l0.in_features,
                    first.name
                )));
            }
            let r = l.rank();
            a_cols.push(to_mat(l.a_view(r)).transpose().to_owned());
            b_cols.push(to_mat(l.b_view(r)));
        }
        let total_r: usize = a_cols.iter().map(|m| m.ncols()).sum();
        if components > total_r {
            return Err(Error::invalid(format!(
                "eigen build: module '{}': {components} components requested but the {} adapters have only N·r = {total_r} rank vectors",
                l0.name,
                adapters.len()
            )));
        }
        let (inf, outf) = (l0.in_features, l0.out_features);
        if components + aug > inf.min(outf) {
            return Err(Error::invalid(format!(
                "eigen build: module '{}': {components} components + {aug} augmented exceed min(in, out) = {}",
                l0.name,
                inf.min(outf)
            )));
        }
        let stack = |parts: &[Mat<f32>], rows: usize| {
            let mut x = Mat::<f32>::zeros(rows, total_r);
            let mut c0 = 0;
            for p in parts {
                for j in 0..p.ncols() {
                    for i in 0..rows {
                        x[(i, c0 + j)] = p[(i, j)];
                    }
                }
                c0 += p.ncols();
            }
            x
        };
        let xa = stack(&a_cols, inf);
        let xb = stack(&b_cols, outf);
        let (mut ca, ea) = principal(&xa, components)?;
        let (mut cb, eb) = principal(&xb, components)?;
        if aug > 0 {
            ca = augment(&ca, aug, seed ^ 0xA);
            cb = augment(&cb, aug, seed ^ 0xB);
        }
        modules.insert(
            l0.name.clone(),
            std::sync::Arc::new(BasisModule::new(&l0.name, ca, cb, ea, eb)?),
        );
    }
    Ok(Basis {
        modules,
        components,
        augment: aug,
        adapters: adapters.iter().map(|a| a.name.clone()).collect(),
    })
}

const META_KEY: &str = "rankfuse_eigen";

#[derive(Serialize, serde::Deserialize)]
struct BasisMeta {
    components: usize,
    augment: usize,
    adapters: Vec<String>,
}

fn mat_out(name: String, m: &Mat<f32>) -> TensorOut<'static> {
    let v = mat_f32_rows(m);
    TensorOut {
        name,
        dtype: DType::F32,
        shape: vec![m.nrows(), m.ncols()],
        data: Cow::Owned(v.iter().flat_map(|x| x.to_le_bytes()).collect()),
    }
}

impl Basis {
    /// Writes `<module>.eigen_A` [in, K+G] and `<module>.eigen_B` [out, K+G] (f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = Vec::new();
        for m in self.modules.values() {
            t.push(mat_out(format!("{}.eigen_A", m.name), &m.c_a));
            t.push(mat_out(format!("{}.eigen_B", m.name), &m.c_b));
        }
        let mut md = HashMap::new();
        let meta = BasisMeta {
            components: self.components,
            augment: self.augment,
            adapters: self.adapters.clone(),
        };
        md.insert(
            META_KEY.to_string(),
            serde_json::to_string(&meta).map_err(|e| Error::internal(e.to_string()))?,
        );
        write_safetensors(path, &t, Some(md))
    }

    pub fn load(path: &Path) -> Result<Basis> {
        let w = Weights::open(path)?;
        let meta: BasisMeta = w
            .metadata()
            .get(META_KEY)
            .and_then(|s| serde_json::from_str(s).ok())
            .ok_or_else(|| {
                Error::format(format!(
                    "file '{}': not an eigen basis (no '{META_KEY}' metadata)",
                    path.display()
                ))
            })?;
        let mut modules = BTreeMap::new();
        for e in w.entries() {
            let Some(name) = e.name.strip_suffix(".eigen_A") else {
                continue;
            };
            let bname = format!("{name}.eigen_B");
            let ca = to_mat(w.get(&e.name)?);
            let cb = to_mat(w.get(&bname).map_err(|e| e.context(path.display()))?);
            if ca.ncols() != cb.ncols() {
                return Err(Error::format(format!(
                    "file '{}': module '{name}': eigen_A has {} components, eigen_B {}",
                    path.display(),
                    ca.ncols(),
                    cb.ncols()
                )));
            }
            modules.insert(
                name.to_string(),
                std::sync::Arc::new(BasisModule::new(name, ca, cb, f64::NAN, f64::NAN)?),
            );
        }
        Ok(Basis {
            modules,
            components: meta.components,
            augment: meta.augment,
            adapters: meta.adapters,
        })
    }

    pub fn module(&self, name: &str) -> Result<&BasisModule> {
        self.module_arc(name).map(|m| &**m)
    }

    /// The module's basis, shared (EigenLoRAx modules of adapters keep it alive).
    pub fn module_arc(&self, name: &str) -> Result<&std::sync::Arc<BasisModule>> {
        self.modules
            .get(name)
            .ok_or_else(|| Error::not_found(format!("eigen basis: no module '{name}'")))
    }
}

/// One adapter's loadings on one module: α_A, α_B (K x r, scale folded into α_B), and the K x K
/// core α_A α_Bᵀ that serving uses.
#[derive(Clone, Debug)]
pub struct EigenModule {
    pub name: String,
    pub alpha_a: Mat<f32>,
    pub alpha_b: Mat<f32>,
    pub core: Mat<f32>,
}

impl EigenModule {
    pub fn new(name: &str, alpha_a: Mat<f32>, alpha_b: Mat<f32>) -> Result<EigenModule> {
        if alpha_a.nrows() != alpha_b.nrows() || alpha_a.ncols() != alpha_b.ncols() {
            return Err(Error::shape(format!(
                "eigen module '{name}': α_A is {} x {}, α_B is {} x {}",
                alpha_a.nrows(),
                alpha_a.ncols(),
                alpha_b.nrows(),
                alpha_b.ncols()
            )));
        }
        let core = &alpha_a * alpha_b.transpose();
        Ok(EigenModule {
            name: name.to_string(),
            alpha_a,
            alpha_b,
            core,
        })
    }
    pub fn rank(&self) -> usize {
        self.alpha_a.ncols()
    }
}

/// An adapter expressed on a basis.
pub struct EigenAdapter {
    pub name: String,
    pub modules: BTreeMap<String, EigenModule>,
}

/// Per-module projection quality.
#[derive(Clone, Debug, Serialize)]
pub struct ProjectModuleReport {
    pub module: String,
    pub rank: usize,
    /// ||ΔW - ΔW_rec||_F / ||ΔW||_F with ΔW = s·B·A.
    pub rel_error: f64,
    pub rel_error_a: f64,
    pub rel_error_b: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct ProjectReport {
    pub adapter: String,
    pub modules: Vec<ProjectModuleReport>,
    /// Bytes (f32) of the adapter as dense low-rank factors vs its loadings.
    pub adapter_bytes: usize,
    pub loadings_bytes: usize,
}

/// Frobenius norm² of B·A from Gram matrices: tr(BᵀB · A Aᵀ).
fn frob_sq_product(b: &Mat<f32>, a: &Mat<f32>) -> f64 {
    let btb = b.transpose() * b;
    let aat = a * a.transpose();
    let mut t = 0f64;
    for i in 0..btb.nrows() {
        for j in 0..btb.ncols() {
            t += btb[(i, j)] as f64 * aat[(j, i)] as f64;
        }
    }
    t
}

/// <B1 A1, B2 A2>_F = tr(B1ᵀ B2 · A2 A1ᵀ).
fn frob_dot(b1: &Mat<f32>, a1: &Mat<f32>, b2: &Mat<f32>, a2: &Mat<f32>) -> f64 {
    let bb = b1.transpose() * b2;
    let aa = a2 * a1.transpose();
    let mut t = 0f64;
    for i in 0..bb.nrows() {
        for j in 0..bb.ncols() {
            t += bb[(i, j)] as f64 * aa[(j, i)] as f64;
        }
    }
    t
}

fn rel(num: f64, den: f64) -> f64 {
    if den > 0.0 {
        (num.max(0.0) / den).sqrt()
    } else {
        0.0
    }
}

/// Projects `adapter` onto `basis`: every module of the adapter must be in the basis.
pub fn project(basis: &Basis, adapter: &Adapter) -> Result<(EigenAdapter, ProjectReport)> {
    let mut modules = BTreeMap::new();
    let mut reports = Vec::new();
    let (mut dense, mut load) = (0usize, 0usize);
    for l in adapter.modules() {
        let bm = basis
            .module(&l.name)
            .map_err(|e| e.context(format!("adapter '{}'", adapter.name)))?;
        if (bm.out_features, bm.in_features) != (l.out_features, l.in_features) {
            return Err(Error::shape(format!(
                "adapter '{}': module '{}' is {} x {}, the basis is {} x {}",
                adapter.name,
                l.name,
                l.out_features,
                l.in_features,
                bm.out_features,
                bm.in_features
            )));
        }
        let r = l.rank();
        let s = l.scale_at(r);
        let a = to_mat(l.a_view(r)); // r x in
        let mut b = to_mat(l.b_view(r)); // out x r
        let alpha_a = bm.c_a.transpose() * a.transpose(); // K x r
        let b_unscaled_alpha = bm.c_b.transpose() * &b; // K x r
        let a_rec = (&bm.c_a * &alpha_a).transpose().to_owned(); // r x in
        let b_rec_unscaled = &bm.c_b * &b_unscaled_alpha; // out x r
        let err_side = |x: &Mat<f32>, y: &Mat<f32>| {
            let (mut num, mut den) = (0f64, 0f64);
            for j in 0..x.ncols() {
                for i in 0..x.nrows() {
                    let d = (x[(i, j)] - y[(i, j)]) as f64;
                    num += d * d;
                    den += (x[(i, j)] as f64).powi(2);
                }
            }
            rel(num, den)
        };
        let rel_a = err_side(&a, &a_rec);
        let rel_b = err_side(&b, &b_rec_unscaled);
        // ||BA - B'A'||² = ||BA||² - 2<BA, B'A'> + ||B'A'||² (scale cancels in the ratio).
        let n1 = frob_sq_product(&b, &a);
        let n2 = frob_sq_product(&b_rec_unscaled, &a_rec);
        let cross = frob_dot(&b, &a, &b_rec_unscaled, &a_rec);
        let rel_w = rel(n1 - 2.0 * cross + n2, n1);
        for j in 0..b.ncols() {
            for i in 0..b.nrows() {
                b[(i, j)] *= s;
            }
        }
        let alpha_b = bm.c_b.transpose() * &b;
        dense += r * (l.in_features + l.out_features) * 4;
        load += 2 * bm.k() * r * 4;
        reports.push(ProjectModuleReport {
            module: l.name.clone(),
            rank: r,
            rel_error: rel_w,
            rel_error_a: rel_a,
            rel_error_b: rel_b,
        });
        modules.insert(l.name.clone(), EigenModule::new(&l.name, alpha_a, alpha_b)?);
    }
    Ok((
        EigenAdapter {
            name: adapter.name.clone(),
            modules,
        },
        ProjectReport {
            adapter: adapter.name.clone(),
            modules: reports,
            adapter_bytes: dense,
            loadings_bytes: load,
        },
    ))
}

impl EigenAdapter {
    /// Writes `<module>.alpha_A` and `<module>.alpha_B` (K x r, f32).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = Vec::new();
        for m in self.modules.values() {
            t.push(mat_out(format!("{}.alpha_A", m.name), &m.alpha_a));
            t.push(mat_out(format!("{}.alpha_B", m.name), &m.alpha_b));
        }
        let mut md = HashMap::new();
        md.insert("rankfuse_eigen_adapter".into(), self.name.clone());
        write_safetensors(path, &t, Some(md))
    }

    pub fn load(path: &Path, name: &str) -> Result<EigenAdapter> {
        let w = Weights::open(path)?;
        let mut modules = BTreeMap::new();
        for e in w.entries() {
            let Some(m) = e.name.strip_suffix(".alpha_A") else {
                continue;
            };
            let a = to_mat(w.get(&e.name)?);
            let b = to_mat(w.get(&format!("{m}.alpha_B"))?);
            modules.insert(m.to_string(), EigenModule::new(m, a, b)?);
        }
        Ok(EigenAdapter {
            name: name.to_string(),
            modules,
        })
    }

    /// The dense reconstruction as a plain adapter (A = α_Aᵀ C_Aᵀ, B = C_B α_B, fixed scale 1):
    /// usable in any `rf_linear` slot, and the reference eigen serving is tested against.
    pub fn to_adapter(&self, basis: &Basis, dtype: DType) -> Result<Adapter> {
        let mut ad = Adapter::new(&self.name);
        for m in self.modules.values() {
            let bm = basis.module(&m.name)?;
            let a = m.alpha_a.transpose() * bm.c_a.transpose(); // r x in
            let b = &bm.c_b * &m.alpha_b; // out x r
            let am = Matrix::from_f32(dtype, a.nrows(), a.ncols(), &mat_f32_rows(&a))?;
            let bmx = Matrix::from_f32(dtype, b.nrows(), b.ncols(), &mat_f32_rows(&b))?;
            ad.add(Lora::new(
                &m.name,
                TensorData::Owned(am),
                TensorData::Owned(bmx),
                1.0,
                Scaling::Fixed,
                1.0,
            )?)?;
        }
        Ok(ad)
    }
}

/// Memory of N adapters stored densely (as their low-rank factors, and as full ΔW) vs one basis
/// plus N sets of loadings, in f32 bytes.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryReport {
    pub adapters: usize,
    pub lora_factors_bytes: usize,
    pub dense_delta_bytes: usize,
    pub basis_bytes: usize,
    pub loadings_bytes: usize,
}

pub fn memory(basis: &Basis, adapters: &[Adapter]) -> MemoryReport {
    let mut lf = 0;
    let mut dd = 0;
    let mut ld = 0;
    for a in adapters {
        for l in a.modules() {
            lf += l.rank() * (l.in_features + l.out_features) * 4;
            dd += l.in_features * l.out_features * 4;
            if let Some(bm) = basis.modules.get(&l.name) {
                ld += 2 * bm.k() * l.rank() * 4;
            }
        }
    }
    let bb = basis
        .modules
        .values()
        .map(|m| (m.in_features + m.out_features) * m.k() * 4)
        .sum();
    MemoryReport {
        adapters: adapters.len(),
        lora_factors_bytes: lf,
        dense_delta_bytes: dd,
        basis_bytes: bb,
        loadings_bytes: ld,
    }
}

/// The eigen serving path for one module: y = x Wᵀ + bias + Δy where
/// Δy = ((x C_A) · core_s) C_Bᵀ for the eigen adapter(s) s of each row. `slots[s]` are eigen
/// adapters on `basis`; `row_slot` as in `rf_linear` (None = every slot on every row, stacked;
/// -1 = base only). z = x C_A is computed once for all rows and adapters; C_Bᵀ is applied once
/// for all of them. The base product runs through the runtime's fused kernel (no slots); the
/// delta is added in f32 before y is rounded to its dtype.
#[allow(clippy::too_many_arguments)] // the rf_linear argument list, plus the basis
pub fn eigen_linear(
    rt: &Runtime,
    x: MatRef<'_>,
    w: MatRef<'_>,
    bias: Option<MatRef<'_>>,
    basis: &BasisModule,
    slots: &[Option<&EigenModule>],
    row_slot: Option<&[i32]>,
    y: &mut MatMut<'_>,
) -> Result<()> {
    let (m, n) = (x.rows, w.rows);
    if basis.in_features != x.cols || basis.out_features != n {
        return Err(Error::shape(format!(
            "eigen module '{}': basis is {} x {} (out x in), the call is {n} x {}",
            basis.name, basis.out_features, basis.in_features, x.cols
        )));
    }
    let k = basis.k();
    for (i, s) in slots.iter().enumerate() {
        if let Some(s) = s {
            if s.core.nrows() != k {
                return Err(Error::shape(format!(
                    "slot {i} (eigen module '{}'): {} components, the basis has {k}",
                    s.name,
                    s.core.nrows()
                )));
            }
        }
    }
    #[cfg(feature = "cuda")]
    if let Some(cuda) = rt.cuda() {
        // Device pointers on a CUDA runtime: the basis and cores are copied for the call and
        // kernels/eigen.cu serves it (same math); waits for the GPU before the copies are freed.
        let db = cuda.upload_eigen_basis(basis)?;
        let cores = cuda.upload_eigen_cores(&db, slots, row_slot.is_none())?;
        let r = cuda.eigen_linear(x, w, bias, &db, &cores, row_slot, y);
        let synced = cuda.synchronize();
        return r.and(synced);
    }
    // Base (+ bias) in f32 through the runtime; the problem check covers x / w / bias / y shapes.
    let mut base = Matrix::zeros(DType::F32, m, n)?;
    let p = LinearProblem {
        x,
        w,
        bias,
        slots: &[],
        row_slot: None,
    };
    if y.rows != m || y.cols != n {
        return Err(Error::shape(format!(
            "y is {} x {}, expected {m} x {n}",
            y.rows, y.cols
        )));
    }
    rt.linear(&p, &mut base.view_mut())?;
    if let Some(rs) = row_slot {
        if rs.len() != m {
            return Err(Error::shape(format!(
                "row_slot has {} entries, x has {m} rows",
                rs.len()
            )));
        }
        if let Some((i, s)) = rs
            .iter()
            .enumerate()
            .find(|(_, &s)| s < -1 || s >= slots.len() as i32)
        {
            return Err(Error::invalid(format!(
                "row_slot[{i}] = {s} is outside -1..{}",
                slots.len()
            )));
        }
    }
    // z = x C_A, once.
    let xm = to_mat(x);
    let par = Par::rayon(0);
    let mut z = Mat::<f32>::zeros(m, k);
    matmul(
        z.as_mut(),
        Accum::Replace,
        xm.as_ref(),
        basis.c_a.as_ref(),
        1.0,
        par,
    );
    // u = z · core(row's adapter) (or Σ cores when stacked).
    let mut u = Mat::<f32>::zeros(m, k);
    match row_slot {
        None => {
            let mut sum = Mat::<f32>::zeros(k, k);
            for s in slots.iter().flatten() {
                sum += &s.core;
            }
            matmul(
                u.as_mut(),
                Accum::Replace,
                z.as_ref(),
                sum.as_ref(),
                1.0,
                par,
            );
        }
        Some(rs) => {
            for (s, slot) in slots.iter().enumerate() {
                let Some(slot) = slot else { continue };
                let rows: Vec<usize> = (0..m).filter(|&i| rs[i] == s as i32).collect();
                if rows.is_empty() {
                    continue;
                }
                let zs = Mat::from_fn(rows.len(), k, |i, j| z[(rows[i], j)]);
                let us = &zs * &slot.core;
                for (ii, &i) in rows.iter().enumerate() {
                    for j in 0..k {
                        u[(i, j)] = us[(ii, j)];
                    }
                }
            }
        }
    }
    // Δy = u C_Bᵀ, once for all rows; add to the base and round into y.
    let mut dy = Mat::<f32>::zeros(m, n);
    matmul(
        dy.as_mut(),
        Accum::Replace,
        u.as_ref(),
        basis.c_b.transpose(),
        1.0,
        par,
    );
    let bv = base.to_f32_vec();
    let mut row = vec![0f32; n];
    for i in 0..m {
        for j in 0..n {
            row[j] = bv[i * n + j] + dy[(i, j)];
        }
        y.set_row_f32(i, 0, &row);
    }
    Ok(())
}
