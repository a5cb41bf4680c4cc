//! LoRA backward: given dy for `y = x W^T + s * ((x A_r^T) ⊙ e) B_r^T`, the gradients
//!
//! ```text
//!   U  = x A_r^T            (m x r)      G = dy B_r       (m x r)
//!   T  = U ⊙ e                           P = s * (G ⊙ e)  (= dL/dU)
//!   dB = s * dy^T T         (n x r)      dA = P^T x       (r x k)
//!   dE = s * colsum(G ⊙ U)  (r)          dx = dy W + P A_r (m x k)
//! ```
//!
//! Only components with `grad[c]` get dA/dB/dE (nested mode: every active component below the
//! rank; frozen mode: component rank-1 only); dx always uses every component (it is the true input
//! gradient). `reference` is scalar f64 (ground truth); `backward` is the blocked, threaded f32
//! version: small GEMMs as vectorizable dot/axpy loops, and dx as one fused NN GEMM over
//! `[dy | P] · [W ; A_r]` with packed W panels and a 6 x 16 register tile (AVX2+FMA when the CPU
//! has it, the same code compiled without FMA otherwise).

use crate::matrix::{MatMut, MatRef};
use rayon::prelude::*;

/// Which components receive gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every active component below the rank in use (plain LoRA; DyLoRA "nested").
    Nested = 0,
    /// Only component rank-1 (DyLoRA's released code: lower components are frozen).
    Frozen = 1,
}

impl Mode {
    pub fn from_raw(v: i64) -> Option<Mode> {
        match v {
            0 => Some(Mode::Nested),
            1 => Some(Mode::Frozen),
            _ => None,
        }
    }
}

/// One backward problem, already checked (`check`).
#[derive(Clone, Copy, Debug)]
pub struct BackwardProblem<'a> {
    pub x: MatRef<'a>,
    pub w: MatRef<'a>,
    pub dy: MatRef<'a>,
    /// A_r (r x k)
    pub a: MatRef<'a>,
    /// B_r (n x r)
    pub b: MatRef<'a>,
    /// Effective per-component gains (E ⊙ mask), r entries; None = all 1.
    pub gains: Option<&'a [f32]>,
    pub scale: f32,
    /// r entries: which components get dA/dB/dE.
    pub grad: &'a [bool],
    /// Compute dE (gains are trainable).
    pub want_de: bool,
}

impl BackwardProblem<'_> {
    pub fn m(&self) -> usize {
        self.x.rows
    }
    pub fn n(&self) -> usize {
        self.w.rows
    }
    pub fn k(&self) -> usize {
        self.x.cols
    }
    pub fn r(&self) -> usize {
        self.a.rows
    }
    fn gain(&self, c: usize) -> f32 {
        self.gains.map_or(1.0, |g| g[c])
    }

    /// Checks every shape once; kernels trust them afterwards.
    pub fn check(&self, dx: Option<&MatMut<'_>>) -> crate::Result<()> {
        use crate::error::Error;
        let (m, n, k, r) = (self.m(), self.n(), self.k(), self.r());
        if self.w.cols != k {
            return Err(Error::shape(format!(
                "w has {} columns, x has {k} (w is n x k, nn.Linear layout)",
                self.w.cols
            )));
        }
        if self.dy.rows != m || self.dy.cols != n {
            return Err(Error::shape(format!(
                "dy is {} x {}, expected {m} x {n} (x rows x w rows)",
                self.dy.rows, self.dy.cols
            )));
        }
        if self.a.cols != k || self.b.rows != n || self.b.cols != r {
            return Err(Error::shape(format!(
                "lora is {} x {} / {} x {}, layer is {n} x {k}",
                self.a.rows, self.a.cols, self.b.rows, self.b.cols
            )));
        }
        if self.grad.len() != r || self.gains.is_some_and(|g| g.len() != r) {
            return Err(Error::internal(
                "backward: component vectors have the wrong length",
            ));
        }
        if let Some(dx) = dx {
            if dx.rows != m || dx.cols != k {
                return Err(Error::shape(format!(
                    "dx is {} x {}, expected {m} x {k} (x's shape)",
                    dx.rows, dx.cols
                )));
            }
            let s = span(&dx.as_ref());
            for (name, v) in [("x", self.x), ("w", self.w), ("dy", self.dy)] {
                let o = span(&v);
                if s.1 > s.0 && o.0 < s.1 && s.0 < o.1 {
                    return Err(Error::invalid(format!(
                        "dx overlaps {name}; the output needs its own buffer"
                    )));
                }
            }
        }
        if !self.scale.is_finite() {
            return Err(Error::invalid(format!(
                "scale {} is not finite",
                self.scale
            )));
        }
        Ok(())
    }
}

fn span(m: &MatRef<'_>) -> (usize, usize) {
    let start = m.as_ptr() as usize;
    let len = crate::matrix::span_bytes(m.rows, m.cols, m.ld, m.dtype).unwrap_or(0);
    (start, start + len)
}

/// Gradients in f64 (the reference's result): dA r x k, dB n x r, dE r, dx m x k.
#[derive(Clone, Debug)]
pub struct Grads64 {
    pub da: Vec<f64>,
    pub db: Vec<f64>,
    pub de: Vec<f64>,
    pub dx: Vec<f64>,
}

/// Scalar f64 ground truth. Slow on purpose.
pub fn reference(p: &BackwardProblem<'_>) -> Grads64 {
    let (m, n, k, r) = (p.m(), p.n(), p.k(), p.r());
    let s = p.scale as f64;
    let mut u = vec![0f64; m * r];
    let mut g = vec![0f64; m * r];
    for i in 0..m {
        for c in 0..r {
            let mut acc = 0f64;
            for kk in 0..k {
                acc += p.x.get(i, kk) as f64 * p.a.get(c, kk) as f64;
            }
            u[i * r + c] = acc;
            let mut acc = 0f64;
            for j in 0..n {
                acc += p.dy.get(i, j) as f64 * p.b.get(j, c) as f64;
            }
            g[i * r + c] = acc;
        }
    }
    let mut out = Grads64 {
        da: vec![0.0; r * k],
        db: vec![0.0; n * r],
        de: vec![0.0; r],
        dx: vec![0.0; m * k],
    };
    for c in 0..r {
        let e = p.gain(c) as f64;
        if p.grad[c] {
            for j in 0..n {
                let mut acc = 0f64;
                for i in 0..m {
                    acc += p.dy.get(i, j) as f64 * u[i * r + c] * e;
                }
                out.db[j * r + c] = s * acc;
            }
            for kk in 0..k {
                let mut acc = 0f64;
                for i in 0..m {
                    acc += s * g[i * r + c] * e * p.x.get(i, kk) as f64;
                }
                out.da[c * k + kk] = acc;
            }
            if p.want_de {
                out.de[c] = s * (0..m).map(|i| g[i * r + c] * u[i * r + c]).sum::<f64>();
            }
        }
    }
    for i in 0..m {
        for kk in 0..k {
            let mut acc = 0f64;
            for j in 0..n {
                acc += p.dy.get(i, j) as f64 * p.w.get(j, kk) as f64;
            }
            for c in 0..r {
                acc += s * g[i * r + c] * p.gain(c) as f64 * p.a.get(c, kk) as f64;
            }
            out.dx[i * k + kk] = acc;
        }
    }
    out
}

/// Where the optimized backward accumulates: dA rows (ld `k`), dB (n rows, ld `ldb`), dE.
pub struct GradsMut<'a> {
    pub da: &'a mut [f32],
    pub db: &'a mut [f32],
    pub ldb: usize,
    pub de: &'a mut [f32],
}

/// Dense f32 copy of a view (ld = `ld`, which may exceed cols to leave room).
fn to_f32(v: &MatRef<'_>, ld: usize) -> Vec<f32> {
    let mut out = vec![0f32; v.rows * ld];
    out.par_chunks_mut(ld.max(1))
        .enumerate()
        .for_each(|(i, row)| v.row_f32(i, 0, &mut row[..v.cols]));
    out
}

/// Lane-split dot product (vectorizes without fast-math).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ca.remainder().iter().zip(cb.remainder()) {
        s += x * y;
    }
    s
}

#[inline(always)]
fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (yv, xv) in y.iter_mut().zip(x) {
        *yv += alpha * xv;
    }
}

/// The optimized backward: accumulates into `g`, writes dx when given. Runs on the current rayon
/// pool (call it inside `Runtime::install`).
pub fn backward(p: &BackwardProblem<'_>, g: GradsMut<'_>, dx: Option<&mut MatMut<'_>>) {
    let (m, n, k, r) = (p.m(), p.n(), p.k(), p.r());
    let s = p.scale;
    let any_grad = p.grad.iter().any(|&b| b);
    // dy with r spare columns per row: P goes there so dx is one GEMM over [dy | P] · [W ; A_r].
    let ldd = n + r;
    let mut dyf = to_f32(&p.dy, ldd);
    let xf = to_f32(&p.x, k);
    let af = to_f32(&p.a, k);
    // B_r transposed (r x n) so G's dot products run over contiguous memory.
    let mut bt = vec![0f32; r * n];
    for j in 0..n {
        for c in 0..r {
            bt[c * n + j] = p.b.get(j, c);
        }
    }
    // U and G, row by row: u/gm are m x r.
    let mut u = vec![0f32; m * r];
    let mut gm = vec![0f32; m * r];
    if r > 0 {
        u.par_chunks_mut(r)
            .zip(gm.par_chunks_mut(r))
            .enumerate()
            .for_each(|(i, (ur, gr))| {
                let xr = &xf[i * k..(i + 1) * k];
                let dr = &dyf[i * ldd..i * ldd + n];
                for c in 0..r {
                    ur[c] = dot(xr, &af[c * k..(c + 1) * k]);
                    gr[c] = dot(dr, &bt[c * n..(c + 1) * n]);
                }
            });
    }
    let gain: Vec<f32> = (0..r).map(|c| p.gain(c)).collect();
    // T (for dB) and P (dL/dU) as column-major r x m so the axpys read contiguous coefficients.
    let mut tcol = vec![0f32; r * m];
    let mut pcol = vec![0f32; r * m];
    for i in 0..m {
        for c in 0..r {
            tcol[c * m + i] = u[i * r + c] * gain[c];
            pcol[c * m + i] = s * gm[i * r + c] * gain[c];
        }
    }
    if any_grad {
        let comps: Vec<usize> = (0..r).filter(|&c| p.grad[c]).collect();
        // dB^T[c, j] = s * sum_i T[i, c] dy[i, j]: per column block of dy, axpys over rows.
        const JB: usize = 512;
        let nb = n.div_ceil(JB);
        let dbt_blocks: Vec<(usize, Vec<f32>)> = (0..nb)
            .into_par_iter()
            .map(|bj| {
                let j0 = bj * JB;
                let w = JB.min(n - j0);
                let mut acc = vec![0f32; comps.len() * w];
                for i in 0..m {
                    let drow = &dyf[i * ldd + j0..i * ldd + j0 + w];
                    for (ci, &c) in comps.iter().enumerate() {
                        let t = tcol[c * m + i];
                        if t != 0.0 {
                            axpy(t, drow, &mut acc[ci * w..(ci + 1) * w]);
                        }
                    }
                }
                (j0, acc)
            })
            .collect();
        for (j0, acc) in dbt_blocks {
            let w = acc.len() / comps.len();
            for (ci, &c) in comps.iter().enumerate() {
                for jj in 0..w {
                    g.db[(j0 + jj) * g.ldb + c] += s * acc[ci * w + jj];
                }
            }
        }
        // dA[c, :] += sum_i P[i, c] x[i, :], per column block of x.
        const KB: usize = 512;
        let da = &mut g.da[..r * k];
        let mut blocks: Vec<Vec<f32>> = (0..k.div_ceil(KB))
            .into_par_iter()
            .map(|bk| {
                let k0 = bk * KB;
                let w = KB.min(k - k0);
                let mut acc = vec![0f32; comps.len() * w];
                for i in 0..m {
                    let xrow = &xf[i * k + k0..i * k + k0 + w];
                    for (ci, &c) in comps.iter().enumerate() {
                        let pv = pcol[c * m + i];
                        if pv != 0.0 {
                            axpy(pv, xrow, &mut acc[ci * w..(ci + 1) * w]);
                        }
                    }
                }
                acc
            })
            .collect();
        for (bk, acc) in blocks.iter_mut().enumerate() {
            let k0 = bk * KB;
            let w = KB.min(k - k0);
            for (ci, &c) in comps.iter().enumerate() {
                for (d, a) in da[c * k + k0..c * k + k0 + w]
                    .iter_mut()
                    .zip(&acc[ci * w..(ci + 1) * w])
                {
                    *d += a;
                }
            }
        }
        if p.want_de {
            for &c in &comps {
                let mut acc = 0f64;
                for i in 0..m {
                    acc += gm[i * r + c] as f64 * u[i * r + c] as f64;
                }
                g.de[c] += (s as f64 * acc) as f32;
            }
        }
    }
    let Some(dx) = dx else { return };
    for i in 0..m {
        for c in 0..r {
            dyf[i * ldd + n + c] = pcol[c * m + i];
        }
    }
    nn_gemm(&dyf, ldd, m, &p.w, &af, dx);
}

/// dx = dy · W for a layer without an adapter (or to time the base part): the same blocked
/// GEMM the backward uses. Runs on the current rayon pool.
pub fn input_grad(dy: MatRef<'_>, w: MatRef<'_>, dx: &mut MatMut<'_>) {
    assert!(
        dy.cols == w.rows && dx.rows == dy.rows && dx.cols == w.cols,
        "input_grad shapes"
    );
    let n = w.rows;
    let d = to_f32(&dy, n);
    nn_gemm(&d, n, dy.rows, &w, &[], dx);
}

// ---- dx = [dy | P] · [W ; A_r]: an NN GEMM with packed row panels ----

const MR: usize = 6;
const NR: usize = 16;
/// Columns of dx per task (a multiple of NR).
const KC: usize = 256;
/// Reduction rows per packed panel.
const JB: usize = 256;

// The hardware path exists on x86_64 only (elsewhere the portable one runs).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
trait Fma {
    /// True on the path that checked AVX2+FMA at runtime.
    const HW: bool;
    fn fma(a: f32, b: f32, c: f32) -> f32;
}
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct HwFma;
struct NoFma;
impl Fma for HwFma {
    const HW: bool = true;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}
impl Fma for NoFma {
    const HW: bool = false;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// acc[R x NR] += d[R rows, jb] · panel[jb x NR].
#[inline(always)]
fn micro<F: Fma, const R: usize>(
    d: &[f32],
    ldd: usize,
    i0: usize,
    j0: usize,
    jb: usize,
    panel: &[f32],
    acc: &mut [[f32; NR]; MR],
) {
    let mut a = [[0f32; NR]; R];
    for j in 0..jb {
        let w: &[f32; NR] = panel[j * NR..j * NR + NR].try_into().expect("NR");
        for (rr, arow) in a.iter_mut().enumerate() {
            let dv = d[(i0 + rr) * ldd + j0 + j];
            for l in 0..NR {
                arow[l] = F::fma(dv, w[l], arow[l]);
            }
        }
    }
    for rr in 0..R {
        for l in 0..NR {
            acc[rr][l] += a[rr][l];
        }
    }
}

/// The AVX2+FMA 6 x 16 tile: 12 accumulators in registers, two panel loads and six broadcasts
/// per reduction step.
///
/// # Safety
/// The CPU must have AVX2 and FMA; `d` must hold 6 rows (stride `ldd`) of `jb` readable floats
/// and `panel` `jb * 16` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_6x16_avx2(
    d: *const f32,
    ldd: usize,
    panel: *const f32,
    jb: usize,
    acc: &mut [[f32; NR]; MR],
) {
    use std::arch::x86_64::*;
    let mut c = [[_mm256_setzero_ps(); 2]; MR];
    let rows = [
        d,
        d.add(ldd),
        d.add(2 * ldd),
        d.add(3 * ldd),
        d.add(4 * ldd),
        d.add(5 * ldd),
    ];
    for j in 0..jb {
        let b0 = _mm256_loadu_ps(panel.add(j * NR));
        let b1 = _mm256_loadu_ps(panel.add(j * NR + 8));
        for (r, cr) in c.iter_mut().enumerate() {
            let a = _mm256_broadcast_ss(&*rows[r].add(j));
            cr[0] = _mm256_fmadd_ps(a, b0, cr[0]);
            cr[1] = _mm256_fmadd_ps(a, b1, cr[1]);
        }
    }
    for (r, cr) in c.iter().enumerate() {
        let mut t = [0f32; NR];
        _mm256_storeu_ps(t.as_mut_ptr(), cr[0]);
        _mm256_storeu_ps(t.as_mut_ptr().add(8), cr[1]);
        for l in 0..NR {
            acc[r][l] += t[l];
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn micro_any<F: Fma>(
    rows: usize,
    d: &[f32],
    ldd: usize,
    i0: usize,
    j0: usize,
    jb: usize,
    panel: &[f32],
    acc: &mut [[f32; NR]; MR],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if F::HW && rows == MR {
            assert!((i0 + MR - 1) * ldd + j0 + jb <= d.len() && panel.len() >= jb * NR);
            // SAFETY: F::HW is only used on the path that checked AVX2+FMA; bounds asserted above.
            unsafe { micro_6x16_avx2(d.as_ptr().add(i0 * ldd + j0), ldd, panel.as_ptr(), jb, acc) };
            return;
        }
    }
    match rows {
        6 => micro::<F, 6>(d, ldd, i0, j0, jb, panel, acc),
        5 => micro::<F, 5>(d, ldd, i0, j0, jb, panel, acc),
        4 => micro::<F, 4>(d, ldd, i0, j0, jb, panel, acc),
        3 => micro::<F, 3>(d, ldd, i0, j0, jb, panel, acc),
        2 => micro::<F, 2>(d, ldd, i0, j0, jb, panel, acc),
        _ => micro::<F, 1>(d, ldd, i0, j0, jb, panel, acc),
    }
}

/// One task: dx columns c0..c0+kc for all m rows, into `out` (m x kc).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_task<F: Fma>(
    d: &[f32],
    ldd: usize,
    m: usize,
    w: &MatRef<'_>,
    af: &[f32],
    c0: usize,
    kc: usize,
    out: &mut [f32],
) {
    let n = w.rows;
    let k = w.cols;
    let r = af.len() / k.max(1);
    let total = n + r;
    let npanels = kc.div_ceil(NR);
    let mut panel = vec![0f32; npanels * JB * NR];
    let mut row = vec![0f32; kc];
    let mut j0 = 0;
    while j0 < total {
        let jb = JB.min(total - j0);
        // Pack rows j0..j0+jb of [W ; A_r], columns c0..c0+kc, as panels [p][j][NR].
        for j in 0..jb {
            let src = j0 + j;
            if src < n {
                w.row_f32(src, c0, &mut row);
            } else {
                let a0 = (src - n) * k + c0;
                row.copy_from_slice(&af[a0..a0 + kc]);
            }
            for pi in 0..npanels {
                let dst = &mut panel[(pi * JB + j) * NR..(pi * JB + j) * NR + NR];
                let l0 = pi * NR;
                let wl = NR.min(kc - l0);
                dst[..wl].copy_from_slice(&row[l0..l0 + wl]);
                dst[wl..].fill(0.0);
            }
        }
        let mut i0 = 0;
        while i0 < m {
            let rows = MR.min(m - i0);
            for pi in 0..npanels {
                let l0 = pi * NR;
                let wl = NR.min(kc - l0);
                let mut acc = [[0f32; NR]; MR];
                micro_any::<F>(
                    rows,
                    d,
                    ldd,
                    i0,
                    j0,
                    jb,
                    &panel[pi * JB * NR..(pi * JB + jb) * NR],
                    &mut acc,
                );
                for (rr, arow) in acc.iter().enumerate().take(rows) {
                    let o = &mut out[(i0 + rr) * kc + l0..(i0 + rr) * kc + l0 + wl];
                    for (ov, av) in o.iter_mut().zip(arow) {
                        *ov += av;
                    }
                }
            }
            i0 += rows;
        }
        j0 += jb;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_task_avx2(
    d: &[f32],
    ldd: usize,
    m: usize,
    w: &MatRef<'_>,
    af: &[f32],
    c0: usize,
    kc: usize,
    out: &mut [f32],
) {
    gemm_task::<HwFma>(d, ldd, m, w, af, c0, kc, out)
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn nn_gemm(d: &[f32], ldd: usize, m: usize, w: &MatRef<'_>, af: &[f32], dx: &mut MatMut<'_>) {
    let k = w.cols;
    let use_avx2 = has_avx2_fma();
    let tasks = k.div_ceil(KC);
    // SAFETY (alias): each task writes only its own column range c0..c0+kc of dx.
    let dxa = unsafe { dx.alias() };
    (0..tasks).into_par_iter().for_each(|t| {
        let c0 = t * KC;
        let kc = KC.min(k - c0);
        let mut out = vec![0f32; m * kc];
        #[cfg(target_arch = "x86_64")]
        {
            if use_avx2 {
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { gemm_task_avx2(d, ldd, m, w, af, c0, kc, &mut out) };
            } else {
                gemm_task::<NoFma>(d, ldd, m, w, af, c0, kc, &mut out);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = use_avx2;
            gemm_task::<NoFma>(d, ldd, m, w, af, c0, kc, &mut out);
        }
        // SAFETY: disjoint column ranges per task (see above); the view is exclusively ours.
        let mut dxt = unsafe { dxa.alias() };
        for i in 0..m {
            dxt.set_row_f32(i, c0, &out[i * kc..(i + 1) * kc]);
        }
    });
}
