//! Backends: what a fused linear call is (`LinearProblem`), the one place its arguments are
//! checked, and the CPU implementation behind a kernel table (CUDA joins behind feature `cuda`).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod placement;

use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};

/// One adapter slot, resolved: A[:r] (r x k), B[:, :r] (n x r) and the scale at that rank.
#[derive(Clone, Copy, Debug)]
pub struct Slot<'a> {
    pub a: MatRef<'a>,
    pub b: MatRef<'a>,
    pub scale: f32,
    /// Optional per-component gains E (1 x r, AdaLoRA/ElaLoRA's `B diag(E) A` form; a 0 masks a
    /// component off): T[:, c] is multiplied by E[c] right after the shrink, at no extra pass.
    pub gains: Option<MatRef<'a>>,
    /// For messages: the module the slot came from.
    pub module: &'a str,
}

impl Slot<'_> {
    pub fn rank(&self) -> usize {
        self.a.rows
    }
}

/// `y = x W^T + bias + sum over slots of scale * (x A^T) B^T`.
/// `row_slot == None`: every slot applies to every row (stacked adapters).
/// `row_slot == Some(rs)`: row i uses `slots[rs[i]]` only; -1 (or an empty slot) = base only.
/// How the base product reads x when W is block-quantized (Q8_0 / Q4_0 / Q4_K).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ActQuant {
    /// x as given, in f32: the result is the exactly dequantized W times x (the default).
    #[default]
    Exact,
    /// Decode calls (m <= 8) quantize each 32-value block of x to int8 with an f32 scale
    /// (llama.cpp's Q8_0 activations) and take integer dot products with W's blocks. Each x
    /// value moves by at most max|x_block| / 254; the adapter's shrink stays exact. Larger
    /// batches and dense W run as `Exact`.
    Q8,
}

#[derive(Clone, Copy, Debug)]
pub struct LinearProblem<'a> {
    pub x: MatRef<'a>,
    pub w: MatRef<'a>,
    pub bias: Option<MatRef<'a>>,
    pub slots: &'a [Option<Slot<'a>>],
    pub row_slot: Option<&'a [i32]>,
}

fn span(m: &MatRef<'_>) -> (usize, usize) {
    let start = m.as_ptr() as usize;
    let len = crate::matrix::span_bytes(m.rows, m.cols, m.ld, m.dtype).unwrap_or(0);
    (start, start + len)
}

impl LinearProblem<'_> {
    pub fn m(&self) -> usize {
        self.x.rows
    }
    pub fn n(&self) -> usize {
        self.w.rows
    }
    pub fn k(&self) -> usize {
        self.x.cols
    }

    /// Checks every shape and index once, so kernels can trust them.
    pub fn check(&self, y: &MatMut<'_>) -> Result<()> {
        let (m, n, k) = (self.m(), self.n(), self.k());
        // Only W may be block-quantized: every other operand is read or written per element.
        let dense = [
            ("x", Some(self.x.dtype)),
            ("y", Some(y.dtype)),
            ("bias", self.bias.map(|b| b.dtype)),
        ];
        for (name, dt) in dense {
            if let Some(dt) = dt.filter(|d| d.is_quantized()) {
                return Err(Error::dtype(format!(
                    "{name} is {}: only w may be block-quantized",
                    dt.name()
                )));
            }
        }
        if self.w.dtype.is_quantized() {
            // Views are built checked, but a Rust caller may build one with from_raw.
            crate::matrix::check_blocks("w", self.w.cols, self.w.ld, self.w.dtype)?;
        }
        if self.w.cols != k {
            return Err(Error::shape(format!(
                "w has {} columns, x has {k} (w is n x k, nn.Linear layout)",
                self.w.cols
            )));
        }
        if y.rows != m || y.cols != n {
            return Err(Error::shape(format!(
                "y is {} x {}, expected {m} x {n} (x rows x w rows)",
                y.rows, y.cols
            )));
        }
        if let Some(b) = &self.bias {
            if b.rows != 1 || b.cols != n {
                return Err(Error::shape(format!(
                    "bias is {} x {}, expected 1 x {n}",
                    b.rows, b.cols
                )));
            }
        }
        for (i, s) in self.slots.iter().enumerate() {
            let Some(s) = s else { continue };
            if s.a.cols != k {
                return Err(Error::shape(format!(
                    "slot {i} (module '{}'): lora_A has {} columns (in_features), x has {k}",
                    s.module, s.a.cols
                )));
            }
            if s.b.rows != n {
                return Err(Error::shape(format!(
                    "slot {i} (module '{}'): lora_B has {} rows (out_features), w has {n}",
                    s.module, s.b.rows
                )));
            }
            if s.a.rows != s.b.cols || s.a.rows == 0 {
                return Err(Error::shape(format!(
                    "slot {i} (module '{}'): rank mismatch between A and B",
                    s.module
                )));
            }
            let adapter = [
                ("lora_A", Some(s.a)),
                ("lora_B", Some(s.b)),
                ("gains", s.gains),
            ];
            for (what, mat) in adapter {
                if let Some(dt) = mat.map(|v| v.dtype).filter(|d| d.is_quantized()) {
                    return Err(Error::dtype(format!(
                        "slot {i} (module '{}'): {what} is {}: only w may be block-quantized",
                        s.module,
                        dt.name()
                    )));
                }
            }
            if let Some(g) = &s.gains {
                if g.rows != 1 || g.cols != s.a.rows {
                    return Err(Error::shape(format!(
                        "slot {i} (module '{}'): gains are {} x {}, expected 1 x {}",
                        s.module, g.rows, g.cols, s.a.rows
                    )));
                }
            }
            if !s.scale.is_finite() {
                return Err(Error::invalid(format!(
                    "slot {i} (module '{}'): scale {} is not finite",
                    s.module, s.scale
                )));
            }
        }
        // Kernel workspaces hold T (m x sum of ranks, f32): refuse sizes no machine can hold
        // before anything is allocated (allocation sizes derive from checked shapes only).
        let r_total: usize = self.slots.iter().flatten().map(|s| s.rank()).sum();
        if m.checked_mul(r_total)
            .and_then(|v| v.checked_mul(4))
            .is_none_or(|b| b > (1usize << 40))
        {
            return Err(Error::oom(format!(
                "{m} rows x {r_total} adapter components need too much workspace"
            )));
        }
        if let Some(rs) = self.row_slot {
            if rs.len() != m {
                return Err(Error::shape(format!(
                    "row_slot has {} entries, x has {m} rows",
                    rs.len()
                )));
            }
            for (i, &s) in rs.iter().enumerate() {
                if s < -1 || s >= self.slots.len() as i64 as i32 {
                    return Err(Error::invalid(format!(
                        "row_slot[{i}] = {s} is outside -1..{} (n_slots = {})",
                        self.slots.len(),
                        self.slots.len()
                    )));
                }
            }
        }
        // y must not overlap an input: kernels read inputs after writing parts of y.
        let ys = span(&y.as_ref());
        if ys.1 > ys.0 {
            // An array, not a Vec: the hot path allocates nothing.
            let inputs = [
                ("x", Some(self.x)),
                ("w", Some(self.w)),
                ("bias", self.bias),
            ];
            for (name, mat) in inputs {
                let Some(mat) = mat else { continue };
                let s = span(&mat);
                if s.0 < ys.1 && ys.0 < s.1 {
                    return Err(Error::invalid(format!(
                        "y overlaps {name}; the output needs its own buffer"
                    )));
                }
            }
        }
        Ok(())
    }

    /// Does slot `s` apply to row `i`?
    #[inline]
    pub fn applies(&self, s: usize, i: usize) -> bool {
        match self.row_slot {
            None => true,
            Some(rs) => rs[i] == s as i32,
        }
    }
}
