//! KRAdapter: a high-effective-rank update at LoRA's parameter count, built from Khatri–Rao
//! (row-wise Kronecker) products.
//!
//! For W of out x in, m = min(out, in), M = max(out, in), r = floor(√m) and d the smallest
//! integer with r·(r + d) >= M. U is m x r (zero at init), V is m x (r + d) (kaiming-uniform,
//! a = 5). Slice i along the smaller dimension (row i when out <= in, column i otherwise) is
//! kron(V_i, U_i) truncated to its first M entries: element j = a·r + b holds V[i,a]·U[i,b].
//! ΔW is multiplied by a fixed scale (default 2).
//!
//! The forward never needs ΔW: reshape the long side of x (or of the output) into an
//! (r + d) x r matrix (zero-padded past M); then
//! - out <= in (rows are slices): Δy_i = s · V_iᵀ · X · U_i,
//! - out > in (columns are slices): Y = s · Vᵀ · diag(x) · U, Δy = vec(Y)[..M].
//!
//! The backward mirrors it, for U, V and x.

use crate::error::{Error, Result};
use crate::matrix::MatMut;
use crate::rng::SplitMix64;

/// Default fixed scale of a KRAdapter.
pub const DEFAULT_SCALE: f32 = 2.0;

/// A KRAdapter module (f32 parameters).
#[derive(Clone, Debug)]
pub struct Kron {
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
    /// min(out, in).
    pub m: usize,
    /// max(out, in).
    pub big_m: usize,
    pub r: usize,
    pub d: usize,
    /// m x r, row-major.
    pub u: Vec<f32>,
    /// m x (r + d), row-major.
    pub v: Vec<f32>,
    pub scale: f32,
}

/// Gradients of a backward pass.
pub struct KronGrads {
    pub du: Vec<f32>,
    pub dv: Vec<f32>,
    /// dL/dx (batch x in) from the adapter path only.
    pub dx: Vec<f32>,
}

/// (r, d) for a weight of `out` x `inp`.
pub fn dims(out: usize, inp: usize) -> (usize, usize) {
    let m = out.min(inp);
    let big = out.max(inp);
    let mut r = (m as f64).sqrt().floor() as usize;
    while (r + 1) * (r + 1) <= m {
        r += 1;
    }
    while r * r > m {
        r -= 1;
    }
    let r = r.max(1);
    let d = big.div_ceil(r).saturating_sub(r);
    (r, d)
}

impl Kron {
    /// A module with U = 0 and V kaiming-uniform (a = 5: bound = √(6 / ((1 + a²)·fan_in)),
    /// fan_in = r + d), from a seed.
    pub fn new(name: &str, out: usize, inp: usize, scale: f32, seed: u64) -> Result<Kron> {
        if out == 0 || inp == 0 {
            return Err(Error::shape(format!(
                "kron module '{name}': weight {out} x {inp} is empty"
            )));
        }
        if !scale.is_finite() {
            return Err(Error::invalid(format!(
                "kron module '{name}': scale {scale} is not finite"
            )));
        }
        let (r, d) = dims(out, inp);
        let m = out.min(inp);
        let fan_in = (r + d) as f64;
        let bound = (6.0 / (26.0 * fan_in)).sqrt() as f32;
        let mut g = SplitMix64::new(seed);
        Ok(Kron {
            name: name.to_string(),
            out_features: out,
            in_features: inp,
            m,
            big_m: out.max(inp),
            r,
            d,
            u: vec![0f32; m * r],
            v: g.fill_uniform(m * (r + d), -bound, bound),
            scale,
        })
    }

    /// A module from given U (m x r) and V (m x (r + d)), checked against the shape rule.
    pub fn from_parts(
        name: &str,
        out: usize,
        inp: usize,
        u: Vec<f32>,
        v: Vec<f32>,
        scale: f32,
    ) -> Result<Kron> {
        let mut k = Kron::new(name, out, inp, scale, 0)?;
        if u.len() != k.m * k.r || v.len() != k.m * (k.r + k.d) {
            return Err(Error::shape(format!(
                "kron module '{name}': U has {} values, V has {}; {out} x {inp} needs U {} x {} and V {} x {}",
                u.len(),
                v.len(),
                k.m,
                k.r,
                k.m,
                k.r + k.d
            )));
        }
        k.u = u;
        k.v = v;
        Ok(k)
    }

    pub fn params(&self) -> usize {
        self.m * (2 * self.r + self.d)
    }

    fn rows_are_slices(&self) -> bool {
        self.out_features <= self.in_features
    }

    /// Slice i: kron(V_i, U_i)[..M] (unscaled) into `out` (len M).
    fn slice(&self, i: usize, out: &mut [f32]) {
        let (r, w) = (self.r, self.r + self.d);
        let ui = &self.u[i * r..(i + 1) * r];
        let vi = &self.v[i * w..(i + 1) * w];
        for (j, o) in out.iter_mut().enumerate().take(self.big_m) {
            *o = vi[j / r] * ui[j % r];
        }
    }

    /// ΔW = s · (slices), out x in, row-major.
    pub fn delta(&self) -> Vec<f32> {
        let (o, n) = (self.out_features, self.in_features);
        let mut dw = vec![0f32; o * n];
        let mut s = vec![0f32; self.big_m];
        for i in 0..self.m {
            self.slice(i, &mut s);
            for (j, v) in s.iter().enumerate() {
                let val = self.scale * v;
                if self.rows_are_slices() {
                    dw[i * n + j] = val;
                } else {
                    dw[j * n + i] = val;
                }
            }
        }
        dw
    }

    fn check_x(&self, x: &[f32], batch: usize, cols: usize, what: &str) -> Result<()> {
        if x.len() != batch * cols {
            return Err(Error::shape(format!(
                "kron module '{}': {what} has {} values, expected {batch} x {cols}",
                self.name,
                x.len()
            )));
        }
        Ok(())
    }

    /// Δy (batch x out) for x (batch x in), without forming ΔW.
    pub fn forward(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let (o, n) = (self.out_features, self.in_features);
        self.check_x(x, batch, n, "x")?;
        let (r, w) = (self.r, self.r + self.d);
        let mut y = vec![0f32; batch * o];
        let mut pad = vec![0f32; w * r];
        let mut t = vec![0f32; w];
        for bi in 0..batch {
            let xb = &x[bi * n..(bi + 1) * n];
            let yb = &mut y[bi * o..(bi + 1) * o];
            if self.rows_are_slices() {
                // X = x reshaped (r+d) x r, zero past M; Δy_i = s V_iᵀ (X U_i).
                pad[..n].copy_from_slice(xb);
                pad[n..].iter_mut().for_each(|p| *p = 0.0);
                for (i, yi) in yb.iter_mut().enumerate() {
                    let ui = &self.u[i * r..(i + 1) * r];
                    let vi = &self.v[i * w..(i + 1) * w];
                    for (a, ta) in t.iter_mut().enumerate() {
                        let row = &pad[a * r..(a + 1) * r];
                        *ta = row.iter().zip(ui).map(|(p, q)| p * q).sum();
                    }
                    *yi = self.scale * t.iter().zip(vi).map(|(p, q)| p * q).sum::<f32>();
                }
            } else {
                // Y = s Vᵀ diag(x) U ((r+d) x r); Δy = vec(Y)[..M].
                pad.iter_mut().for_each(|p| *p = 0.0);
                for (i, &xi) in xb.iter().enumerate() {
                    if xi == 0.0 {
                        continue;
                    }
                    let ui = &self.u[i * r..(i + 1) * r];
                    let vi = &self.v[i * w..(i + 1) * w];
                    for a in 0..w {
                        let c = xi * vi[a];
                        for (p, q) in pad[a * r..(a + 1) * r].iter_mut().zip(ui) {
                            *p += c * q;
                        }
                    }
                }
                for (yj, p) in yb.iter_mut().zip(&pad) {
                    *yj = self.scale * p;
                }
            }
        }
        Ok(y)
    }

    /// Δy through a materialized ΔW (the reference for `forward`).
    pub fn forward_dense(&self, x: &[f32], batch: usize) -> Result<Vec<f32>> {
        let (o, n) = (self.out_features, self.in_features);
        self.check_x(x, batch, n, "x")?;
        let dw = self.delta();
        let mut y = vec![0f32; batch * o];
        for bi in 0..batch {
            for j in 0..o {
                y[bi * o + j] = (0..n).map(|k| x[bi * n + k] * dw[j * n + k]).sum();
            }
        }
        Ok(y)
    }

    /// Gradients for U, V and x from gy = dL/dΔy (batch x out), without forming ΔW.
    pub fn backward(&self, x: &[f32], gy: &[f32], batch: usize) -> Result<KronGrads> {
        let (o, n) = (self.out_features, self.in_features);
        self.check_x(x, batch, n, "x")?;
        self.check_x(gy, batch, o, "gy")?;
        let (r, w, s) = (self.r, self.r + self.d, self.scale);
        let mut du = vec![0f32; self.m * r];
        let mut dv = vec![0f32; self.m * w];
        let mut dx = vec![0f32; batch * n];
        // P = the long-side vector reshaped (r+d) x r: x when rows are slices, gy otherwise.
        let mut p = vec![0f32; w * r];
        for bi in 0..batch {
            let xb = &x[bi * n..(bi + 1) * n];
            let gb = &gy[bi * o..(bi + 1) * o];
            let dxb = &mut dx[bi * n..(bi + 1) * n];
            let (long, short): (&[f32], &[f32]) = if self.rows_are_slices() {
                (xb, gb)
            } else {
                (gb, xb)
            };
            p[..long.len()].copy_from_slice(long);
            p[long.len()..].iter_mut().for_each(|q| *q = 0.0);
            // Both cases: the slice-i term is c_i · V_iᵀ P U_i with c = the short-side vector
            // (gy_i when rows are slices, x_i otherwise).
            let mut dlong = vec![0f32; w * r];
            for (i, &c) in short.iter().enumerate() {
                let ui = &self.u[i * r..(i + 1) * r];
                let vi = &self.v[i * w..(i + 1) * w];
                let dui = &mut du[i * r..(i + 1) * r];
                let mut pu_dot_v = 0f32;
                for a in 0..w {
                    let row = &p[a * r..(a + 1) * r];
                    // dU_i += s c Pᵀ V_i ; dV_i += s c P U_i
                    let pu: f32 = row.iter().zip(ui).map(|(x, y)| x * y).sum();
                    dv[i * w + a] += s * c * pu;
                    pu_dot_v += vi[a] * pu;
                    for (d, x) in dui.iter_mut().zip(row) {
                        *d += s * c * vi[a] * x;
                    }
                    // d(long) += s c V_i[a] U_i
                    let cv = s * c * vi[a];
                    for (d, q) in dlong[a * r..(a + 1) * r].iter_mut().zip(ui) {
                        *d += cv * q;
                    }
                }
                if !self.rows_are_slices() {
                    // short side is x: dx_i = s V_iᵀ P U_i (P = gy reshaped).
                    dxb[i] += s * pu_dot_v;
                }
            }
            if self.rows_are_slices() {
                for (d, l) in dxb.iter_mut().zip(&dlong) {
                    *d += l;
                }
            }
        }
        Ok(KronGrads { du, dv, dx })
    }

    /// Gradients for U and V from a dense gradient G = dL/dΔW (out x in, row-major), e.g. a
    /// matrix-approximation loss.
    pub fn backward_dense(&self, g: &[f32]) -> Result<(Vec<f32>, Vec<f32>)> {
        let (o, n) = (self.out_features, self.in_features);
        if g.len() != o * n {
            return Err(Error::shape(format!(
                "kron module '{}': dense gradient has {} values, expected {o} x {n}",
                self.name,
                g.len()
            )));
        }
        let (r, w, s) = (self.r, self.r + self.d, self.scale);
        let mut du = vec![0f32; self.m * r];
        let mut dv = vec![0f32; self.m * w];
        for i in 0..self.m {
            let ui = &self.u[i * r..(i + 1) * r];
            let vi = &self.v[i * w..(i + 1) * w];
            for j in 0..self.big_m {
                let gij = if self.rows_are_slices() {
                    g[i * n + j]
                } else {
                    g[j * n + i]
                };
                if gij == 0.0 {
                    continue;
                }
                let (a, b) = (j / r, j % r);
                du[i * r + b] += s * gij * vi[a];
                dv[i * w + a] += s * gij * ui[b];
            }
        }
        Ok((du, dv))
    }

    /// W ← W ± ΔW in place (f32 accumulation, one rounding to W's dtype).
    pub fn merge_into(&self, w: &mut MatMut<'_>, unmerge: bool) -> Result<()> {
        if w.rows != self.out_features || w.cols != self.in_features {
            return Err(Error::shape(format!(
                "kron module '{}': the adapter is {} x {}, the weight is {} x {}",
                self.name, self.out_features, self.in_features, w.rows, w.cols
            )));
        }
        let dw = self.delta();
        let sign = if unmerge { -1.0 } else { 1.0 };
        let n = w.cols;
        let mut row = vec![0f32; n];
        for i in 0..w.rows {
            w.as_ref().row_f32(i, 0, &mut row);
            for (x, d) in row.iter_mut().zip(&dw[i * n..(i + 1) * n]) {
                *x += sign * d;
            }
            w.set_row_f32(i, 0, &row);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issue_example() -> Kron {
        let u = vec![1., 2., 0., 1., 1., 0., 2., 1.];
        let v = vec![1., 0., 1., 0., 1., 0., 1., 1., 0., 0., 0., 1.];
        Kron::from_parts("t", 4, 6, u, v, 2.0).unwrap()
    }

    #[test]
    fn issue_numbers() {
        assert_eq!(dims(4, 6), (2, 1));
        let k = issue_example();
        let dw: Vec<f32> = k.delta().iter().map(|x| x / 2.0).collect();
        #[rustfmt::skip]
        let want = [1., 2., 0., 0., 1., 2.,
                    0., 0., 0., 1., 0., 0.,
                    1., 0., 1., 0., 0., 0.,
                    0., 0., 0., 0., 2., 1.];
        assert_eq!(dw, want);
        let x = [1., 2., 3., 4., 5., 6.];
        assert_eq!(k.forward(&x, 1).unwrap(), vec![44., 8., 8., 32.]);
        assert_eq!(k.forward_dense(&x, 1).unwrap(), vec![44., 8., 8., 32.]);
    }

    fn random(out: usize, inp: usize, seed: u64) -> Kron {
        let mut k = Kron::new("r", out, inp, 1.5, seed).unwrap();
        let mut g = SplitMix64::new(seed + 1);
        k.u = g.fill_uniform(k.u.len(), -1.0, 1.0);
        k
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= 1e-4 + 1e-4 * y.abs(),
                "{what}[{i}]: {x} vs {y}"
            );
        }
    }

    #[test]
    fn forward_and_backward_match_dense() {
        for (out, inp) in [
            (4, 6),
            (6, 4),
            (5, 7),
            (9, 3),
            (6, 6),
            (33, 100),
            (100, 33),
            (1, 5),
        ] {
            let k = random(out, inp, (out * 1000 + inp) as u64);
            let batch = 3;
            let mut g = SplitMix64::new(9);
            let x = g.fill_uniform(batch * inp, -1.0, 1.0);
            let gy = g.fill_uniform(batch * out, -1.0, 1.0);
            let what = format!("{out}x{inp}");
            close(
                &k.forward(&x, batch).unwrap(),
                &k.forward_dense(&x, batch).unwrap(),
                &what,
            );
            let gr = k.backward(&x, &gy, batch).unwrap();
            // Dense: dL/dΔW = gyᵀ x; dx = gy ΔW.
            let mut gw = vec![0f32; out * inp];
            for b in 0..batch {
                for i in 0..out {
                    for j in 0..inp {
                        gw[i * inp + j] += gy[b * out + i] * x[b * inp + j];
                    }
                }
            }
            let (du, dv) = k.backward_dense(&gw).unwrap();
            close(&gr.du, &du, &format!("{what} dU"));
            close(&gr.dv, &dv, &format!("{what} dV"));
            let dw = k.delta();
            let mut dx = vec![0f32; batch * inp];
            for b in 0..batch {
                for j in 0..inp {
                    dx[b * inp + j] = (0..out).map(|i| gy[b * out + i] * dw[i * inp + j]).sum();
                }
            }
            close(&gr.dx, &dx, &format!("{what} dx"));
            // A finite difference on one U and one V entry (loss = Σ gy·Δy, linear in each).
            let loss = |k: &Kron| -> f64 {
                let y = k.forward(&x, batch).unwrap();
                y.iter()
                    .zip(&gy)
                    .map(|(a, b)| (*a as f64) * (*b as f64))
                    .sum()
            };
            for (which, idx) in [(0, 0), (1, k.v.len() - 1)] {
                let mut kp = k.clone();
                let h = 1e-2f32;
                if which == 0 {
                    kp.u[idx] += h;
                } else {
                    kp.v[idx] += h;
                }
                let fd = ((loss(&kp) - loss(&k)) / h as f64) as f32;
                let an = if which == 0 { gr.du[idx] } else { gr.dv[idx] };
                assert!(
                    (fd - an).abs() <= 1e-2 * (1.0 + an.abs()),
                    "{what}: fd {fd} vs {an}"
                );
            }
        }
    }

    #[test]
    fn merge_unmerge_and_init() {
        let k = random(12, 20, 3);
        let w0: Vec<f32> = (0..240).map(|i| i as f32 * 0.01).collect();
        let mut w = crate::matrix::Matrix::from_f32(crate::DType::F32, 12, 20, &w0).unwrap();
        k.merge_into(&mut w.view_mut(), false).unwrap();
        let dw = k.delta();
        let merged = w.to_f32_vec();
        close(
            &merged
                .iter()
                .zip(&w0)
                .map(|(a, b)| a - b)
                .collect::<Vec<_>>(),
            &dw,
            "merge",
        );
        k.merge_into(&mut w.view_mut(), true).unwrap();
        close(&w.to_f32_vec(), &w0, "unmerge");
        let mut bad = crate::matrix::Matrix::zeros(crate::DType::F32, 20, 12).unwrap();
        assert!(k
            .merge_into(&mut bad.view_mut(), false)
            .unwrap_err()
            .message
            .contains("'r'"));
        // Fresh module: U = 0 so ΔW = 0; V within the kaiming bound for a = 5.
        let f = Kron::new("f", 1024, 768, DEFAULT_SCALE, 1).unwrap();
        assert!(f.delta().iter().all(|&x| x == 0.0));
        let bound = (6.0f64 / (26.0 * 38.0)).sqrt() as f32;
        assert!(f.v.iter().all(|v| v.abs() <= bound));
        assert!(f.v.iter().any(|v| v.abs() > 0.9 * bound));
        assert_eq!(f.params(), 768 * (27 + 38));
    }

    #[test]
    fn dims_rule() {
        // 1024 x 768: r = 27, d = 11 (27 * 38 = 1026 >= 1024, 27 * 37 = 999 < 1024).
        assert_eq!(dims(1024, 768), (27, 11));
        assert_eq!(dims(768, 1024), (27, 11));
        assert_eq!(dims(16, 16), (4, 0));
        assert_eq!(dims(1, 1), (1, 0));
        for (o, i) in [(5, 7), (9, 3), (100, 33), (64, 4096)] {
            let (r, d) = dims(o, i);
            let (m, big) = (o.min(i), o.max(i));
            assert!(r * r <= m && (r + 1) * (r + 1) > m, "{o}x{i}");
            assert!(
                r * (r + d) >= big && (d == 0 || r * (r + d - 1) < big),
                "{o}x{i}"
            );
        }
    }
}
