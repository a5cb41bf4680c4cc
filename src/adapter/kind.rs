//! The kinds of module an adapter may hold, and how each stores its parameters in a `Lora`'s
//! A and B so that one training state, one optimizer and one handle type serve them all.
//!
//! | kind       | A (capacity x a_cols)  | B (b_rows x capacity) | rank in a call          |
//! |------------|------------------------|-----------------------|-------------------------|
//! | LoRA       | A (r x in)             | B (out x r)           | first r components      |
//! | KRAdapter  | U (m x r_kr)           | Vᵀ ((r_kr + d) x m)   | fixed (the method has none) |
//! | EigenLoRAx | α_Aᵀ (r x K)           | α_B (K x r)           | first k basis components |
//!
//! KRAdapter (kron.rs has the math): component i is slice i (U_i and V_i). EigenLoRAx: the
//! module is a LoRA in the basis' K-dimensional coordinates, ΔW = C_B α_B α_Aᵀ C_Aᵀ; the basis
//! C_A (in x K), C_B (out x K) is shared (`Arc`) by every adapter on it and never trained
//! (loadings-only fine-tuning, the paper's main mode).

use super::lora::{Lora, Scaling, TensorData};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::Matrix;
use crate::rng::SplitMix64;
use faer::Mat;
use std::sync::Arc;

/// One module's EigenLoRAx basis: C_A (in x K), C_B (out x K), orthonormal columns, f32.
#[derive(Debug)]
pub struct BasisModule {
    pub name: String,
    pub in_features: usize,
    pub out_features: usize,
    pub c_a: Mat<f32>,
    pub c_b: Mat<f32>,
    /// Share of the centred variance the first K components keep, per side (NaN when unknown).
    pub explained_a: f64,
    pub explained_b: f64,
    /// FNV-1a over the shapes and f32 bits of C_A and C_B: an eigen adapter records it and is
    /// refused on any other basis.
    pub fingerprint: u64,
    /// C_Aᵀ (K x in) and C_B (out x K), row-major f32: the layouts the runtime's GEMM reads
    /// (nn.Linear's n x k), made once when the basis is made.
    pub ca_t: Matrix,
    pub cb_rows: Matrix,
}

impl Clone for BasisModule {
    fn clone(&self) -> Self {
        BasisModule::new(
            &self.name,
            self.c_a.clone(),
            self.c_b.clone(),
            self.explained_a,
            self.explained_b,
        )
        .expect("a valid basis stays valid")
    }
}

impl BasisModule {
    pub fn new(
        name: &str,
        c_a: Mat<f32>,
        c_b: Mat<f32>,
        explained_a: f64,
        explained_b: f64,
    ) -> Result<BasisModule> {
        if c_a.ncols() != c_b.ncols() || c_a.ncols() == 0 {
            return Err(Error::shape(format!(
                "eigen basis module '{name}': C_A has {} components, C_B {}",
                c_a.ncols(),
                c_b.ncols()
            )));
        }
        let fingerprint = fingerprint(&c_a, &c_b);
        let (k, inp, out) = (c_a.ncols(), c_a.nrows(), c_b.nrows());
        let cat: Vec<f32> = (0..k * inp).map(|e| c_a[(e % inp, e / inp)]).collect();
        let cbr: Vec<f32> = (0..out * k).map(|e| c_b[(e / k, e % k)]).collect();
        let ca_t = Matrix::from_f32(DType::F32, k, inp, &cat)?;
        let cb_rows = Matrix::from_f32(DType::F32, out, k, &cbr)?;
        Ok(BasisModule {
            ca_t,
            cb_rows,
            name: name.to_string(),
            in_features: c_a.nrows(),
            out_features: c_b.nrows(),
            c_a,
            c_b,
            explained_a,
            explained_b,
            fingerprint,
        })
    }
    /// Components (K + G).
    pub fn k(&self) -> usize {
        self.c_a.ncols()
    }
}

fn fingerprint(c_a: &Mat<f32>, c_b: &Mat<f32>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |v: u64| {
        for b in v.to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for m in [c_a, c_b] {
        eat(m.nrows() as u64);
        eat(m.ncols() as u64);
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                eat(m[(i, j)].to_bits() as u64);
            }
        }
    }
    h
}

/// KRAdapter dimensions for a weight of out x in (kron.rs: m = min, M = max, r = floor(√m),
/// r·(r + d) >= M).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KronShape {
    pub out: usize,
    pub inp: usize,
    pub m: usize,
    pub big_m: usize,
    pub r: usize,
    pub d: usize,
}

impl KronShape {
    pub fn new(out: usize, inp: usize) -> KronShape {
        let (r, d) = super::kron::dims(out, inp);
        KronShape {
            out,
            inp,
            m: out.min(inp),
            big_m: out.max(inp),
            r,
            d,
        }
    }
    /// r + d: the rows of the long side reshaped.
    pub fn w(&self) -> usize {
        self.r + self.d
    }
    /// Slices are rows of ΔW (out <= in) rather than columns.
    pub fn rows_are_slices(&self) -> bool {
        self.out <= self.inp
    }
}

/// What a module is.
#[derive(Clone, Debug, Default)]
pub enum Kind {
    #[default]
    Lora,
    Kron(KronShape),
    Eigen(Arc<BasisModule>),
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Lora => "LoRA",
            Kind::Kron(_) => "KRAdapter",
            Kind::Eigen(_) => "EigenLoRAx",
        }
    }
}

fn owned(dtype: DType, rows: usize, cols: usize, v: &[f32]) -> Result<TensorData> {
    Ok(TensorData::Owned(Matrix::from_f32(dtype, rows, cols, v)?))
}

impl Lora {
    /// The module's weight shape (out, in), whatever its kind.
    pub fn module_dims(&self) -> (usize, usize) {
        match &self.kind {
            Kind::Lora => (self.out_features, self.in_features),
            Kind::Kron(s) => (s.out, s.inp),
            Kind::Eigen(b) => (b.out_features, b.in_features),
        }
    }

    /// The largest per-call rank: LoRA its capacity, EigenLoRAx its basis' K, KRAdapter 1 (no
    /// truncation is defined: rank 0 or 1 both mean the whole module).
    pub fn rank_limit(&self) -> usize {
        match &self.kind {
            Kind::Lora => self.capacity,
            Kind::Kron(_) => 1,
            Kind::Eigen(b) => b.k(),
        }
    }

    /// Refuses a module that is not a plain LoRA, for operations defined on LoRA's A and B only.
    pub fn require_lora(&self, what: &str) -> Result<()> {
        match self.kind {
            Kind::Lora => Ok(()),
            _ => Err(Error::unsupported(format!(
                "module '{}' is a {} module: {what} is defined for LoRA modules only",
                self.name,
                self.kind.name()
            ))),
        }
    }

    /// A KRAdapter module over U (m x r) and V (m x (r + d)), row-major f32, fixed `scale`.
    pub fn kron_from_parts(
        name: &str,
        out: usize,
        inp: usize,
        u: &[f32],
        v: &[f32],
        scale: f32,
    ) -> Result<Lora> {
        if out == 0 || inp == 0 || out > (1 << 24) || inp > (1 << 24) {
            return Err(Error::shape(format!(
                "kron module '{name}': weight {out} x {inp} is out of range"
            )));
        }
        if !scale.is_finite() {
            return Err(Error::invalid(format!(
                "kron module '{name}': scale {scale} is not finite"
            )));
        }
        let s = KronShape::new(out, inp);
        let w = s.w();
        if u.len() != s.m * s.r || v.len() != s.m * w {
            return Err(Error::shape(format!(
                "kron module '{name}': U has {} values, V has {}; {out} x {inp} needs U {} x {} and V {} x {w}",
                u.len(),
                v.len(),
                s.m,
                s.r,
                s.m
            )));
        }
        let mut vt = vec![0f32; w * s.m];
        for i in 0..s.m {
            for a in 0..w {
                vt[a * s.m + i] = v[i * w + a];
            }
        }
        let mut l = Lora::new(
            name,
            owned(DType::F32, s.m, s.r, u)?,
            owned(DType::F32, w, s.m, &vt)?,
            scale,
            Scaling::Fixed,
            scale,
        )?;
        l.kind = Kind::Kron(s);
        l.set_rank_unchecked(1);
        Ok(l)
    }

    /// A new, trainable KRAdapter module: U = 0, V kaiming-uniform (a = 5) from `seed`, as the
    /// paper's init (ΔW = 0 at step 0).
    pub fn new_kron(name: &str, out: usize, inp: usize, scale: f32, seed: u64) -> Result<Lora> {
        let k = super::kron::Kron::new(name, out, inp, scale, seed)?;
        let mut l = Lora::kron_from_parts(name, out, inp, &k.u, &k.v, scale)?;
        l.enable_training()?;
        Ok(l)
    }

    /// U (m x r) and V (m x (r + d)) of a KRAdapter module, row-major f32.
    pub fn kron_parts(&self) -> Result<(KronShape, Vec<f32>, Vec<f32>)> {
        let Kind::Kron(s) = self.kind else {
            return Err(Error::invalid(format!(
                "module '{}' is not a KRAdapter module",
                self.name
            )));
        };
        let u = self.a.view().to_f32_vec();
        let vt = self.b.view().to_f32_vec();
        let w = s.w();
        let mut v = vec![0f32; s.m * w];
        for a in 0..w {
            for i in 0..s.m {
                v[i * w + a] = vt[a * s.m + i];
            }
        }
        Ok((s, u, v))
    }

    /// An EigenLoRAx module on `basis` from loadings α_A, α_B (K x r, row-major f32) and a fixed
    /// scale.
    pub fn eigen_from_loadings(
        basis: Arc<BasisModule>,
        rank: usize,
        alpha_a: &[f32],
        alpha_b: &[f32],
        scale: f32,
    ) -> Result<Lora> {
        let k = basis.k();
        let name = basis.name.clone();
        if rank == 0 || alpha_a.len() != k * rank || alpha_b.len() != k * rank {
            return Err(Error::shape(format!(
                "eigen module '{name}': loadings have {} and {} values; rank {rank} on {k} basis components needs {k} x {rank} each",
                alpha_a.len(),
                alpha_b.len()
            )));
        }
        let mut at = vec![0f32; rank * k];
        for c in 0..k {
            for j in 0..rank {
                at[j * k + c] = alpha_a[c * rank + j];
            }
        }
        let mut l = Lora::new(
            &name,
            owned(DType::F32, rank, k, &at)?,
            owned(DType::F32, k, rank, alpha_b)?,
            scale,
            Scaling::Fixed,
            scale,
        )?;
        l.set_rank_unchecked(k);
        l.kind = Kind::Eigen(basis);
        Ok(l)
    }

    /// A new, trainable EigenLoRAx module of loadings rank `rank` on `basis`: α_A uniform
    /// (±1/√K, PEFT's LoRA init in the basis coordinates), α_B = 0 (ΔW = 0 at step 0).
    pub fn new_eigen(basis: Arc<BasisModule>, rank: usize, scale: f32, seed: u64) -> Result<Lora> {
        let k = basis.k();
        if rank == 0 || rank > (1 << 16) {
            return Err(Error::shape(format!(
                "eigen module '{}': rank {rank} is out of range",
                basis.name
            )));
        }
        let bound = 1.0 / (k as f32).sqrt();
        let a = SplitMix64::new(seed).fill_uniform(k * rank, -bound, bound);
        let mut l = Lora::eigen_from_loadings(basis, rank, &a, &vec![0.0; k * rank], scale)?;
        l.enable_training()?;
        Ok(l)
    }

    /// α_A and α_B (K x r, row-major f32) of an EigenLoRAx module, and its basis.
    pub fn eigen_loadings(&self) -> Result<(Arc<BasisModule>, Vec<f32>, Vec<f32>)> {
        let Kind::Eigen(b) = &self.kind else {
            return Err(Error::invalid(format!(
                "module '{}' is not an EigenLoRAx module",
                self.name
            )));
        };
        let (k, r) = (b.k(), self.capacity);
        let at = self.a.view().to_f32_vec();
        let mut a = vec![0f32; k * r];
        for j in 0..r {
            for c in 0..k {
                a[c * r + j] = at[j * k + c];
            }
        }
        Ok((b.clone(), a, self.b.view().to_f32_vec()))
    }

    /// ΔW (out x in, row-major f32, scale applied) at per-call rank `rank` (0 = current), for
    /// any kind: the dense reference the fused paths are tested against, and what merging adds.
    pub fn dense_delta(&self, rank: usize) -> Result<Vec<f32>> {
        let r = self.resolve_rank(rank)?;
        let (out, inp) = self.module_dims();
        let scale = self.scale_at(r);
        let mut dw = vec![0f32; out * inp];
        match &self.kind {
            Kind::Lora => {
                let (a, b) = (self.a_view(r).to_f32_vec(), self.b_view(r).to_f32_vec());
                let g: Vec<f32> = (0..r)
                    .map(|c| self.train.as_deref().map_or(1.0, |t| t.gain(c)))
                    .collect();
                for i in 0..out {
                    for c in 0..r {
                        let bc = b[i * r + c] * g[c] * scale;
                        for (d, &av) in dw[i * inp..(i + 1) * inp]
                            .iter_mut()
                            .zip(&a[c * inp..(c + 1) * inp])
                        {
                            *d += bc * av;
                        }
                    }
                }
            }
            Kind::Kron(s) => {
                let (_, u, v) = self.kron_parts()?;
                let k = super::kron::Kron::from_parts(&self.name, s.out, s.inp, u, v, scale)?;
                dw = k.delta();
            }
            Kind::Eigen(b) => {
                // C_B[:, :k] α_B[:k] diag(g) α_A[:k]ᵀ C_A[:, :k]ᵀ · scale.
                let (kk, cap) = (r, self.capacity);
                let (_, aa, ab) = self.eigen_loadings()?;
                let g: Vec<f32> = (0..cap)
                    .map(|c| self.train.as_deref().map_or(1.0, |t| t.gain(c)))
                    .collect();
                // core = α_A[:k] diag(g) α_B[:k]ᵀ (k x k)
                let mut core = vec![0f64; kk * kk];
                for p in 0..kk {
                    for q in 0..kk {
                        core[p * kk + q] = (0..cap)
                            .map(|j| aa[p * cap + j] as f64 * g[j] as f64 * ab[q * cap + j] as f64)
                            .sum();
                    }
                }
                for i in 0..out {
                    // row i of C_B[:, :k] core^T ... ΔW[i, j] = Σ_p Σ_q C_A[j,p] core[p,q] C_B[i,q]
                    let mut t = vec![0f64; kk];
                    for (p, tp) in t.iter_mut().enumerate() {
                        *tp = (0..kk)
                            .map(|q| core[p * kk + q] * b.c_b[(i, q)] as f64)
                            .sum();
                    }
                    for j in 0..inp {
                        let v: f64 = (0..kk).map(|p| b.c_a[(j, p)] as f64 * t[p]).sum();
                        dw[i * inp + j] = (v * scale as f64) as f32;
                    }
                }
            }
        }
        Ok(dw)
    }
}
