//! The start-up self-check of an optimized kernel table.
//!
//! Before a runtime uses an optimized variant it chose by itself, the variant computes a fixed
//! set of small fused linears that walk every code path of the driver and the ISA kernels
//! (decode for m = 1, 3, 7; the GEMM path across MR/NR tails, a KC block boundary and the AMX
//! native bf16 x bf16 path; stacked and mixed slots with -1 rows, NULL slots, gains, ranks above
//! NR; every dtype of x / W / A-B / y / bias; `ld > cols` everywhere) and compares them with the
//! f64 `reference`. A variant that disagrees is not used: selection falls back to the next
//! variant and `rf_runtime_info` names the rejected one with the first mismatch.
//!
//! Why: the AVX-512 and AMX kernels can only be executed on CPUs that have them, and the machines
//! this project is developed and tested on lack them. The check turns "wrong numbers on a CPU we
//! never ran on" into "a slower, correct variant plus a report". It runs once per process and
//! variant, on problems of at most 48 x 70 x 300 (the f64 reference dominates).

use super::pack::{PackSpec, PackedW};
use super::{reference, KernelTable, PackedLinearFn};
use crate::backend::{LinearProblem, Slot};
use crate::dtype::{self, DType};
use crate::matrix::{MatMut, MatRef, Matrix};
use crate::rng::SplitMix64;

/// One problem of the check.
pub(crate) struct Case<'a> {
    m: usize,
    n: usize,
    k: usize,
    /// x, W, A-B, y, bias
    dtypes: [DType; 5],
    bias: bool,
    /// Ranks of the slots (0 = a NULL slot); odd slots get per-component gains.
    ranks: &'a [usize],
    /// Mixed batch: row i uses `pattern[i % len]` (-1 = base only). Empty = stacked.
    pattern: &'a [i32],
}

use DType::{BF16, F16, F32, Q4_0, Q4_K, Q6_K, Q8_0};

const CASES: &[Case<'static>] = &[
    // The AMX native path (bf16 x, bf16 W, m > 8) with tails in every dimension, mixed slots.
    Case {
        m: 37,
        n: 45,
        k: 70,
        dtypes: [BF16, BF16, F32, F32, BF16],
        bias: true,
        ranks: &[5, 0, 17],
        pattern: &[0, 2, -1, 1],
    },
    // A KC block boundary (k > 256), ranks above NR (33 > 32), y rounded to bf16.
    Case {
        m: 20,
        n: 70,
        k: 300,
        dtypes: [F32, F16, BF16, BF16, F32],
        bias: false,
        ranks: &[33, 1],
        pattern: &[],
    },
    // Base only, f16 x against f32 W, f16 y; m a multiple of several MRs.
    Case {
        m: 48,
        n: 33,
        k: 17,
        dtypes: [F16, F32, F16, F16, F32],
        bias: true,
        ranks: &[],
        pattern: &[],
    },
    // Just above the decode threshold; n and k one past a tile.
    Case {
        m: 9,
        n: 33,
        k: 33,
        dtypes: [BF16, BF16, BF16, F32, F16],
        bias: true,
        ranks: &[2, 7],
        pattern: &[1, 0, 0, -1],
    },
    // Decode: one row, bf16 W, stacked adapters with gains.
    Case {
        m: 1,
        n: 67,
        k: 129,
        dtypes: [F32, BF16, F32, F32, BF16],
        bias: true,
        ranks: &[8, 3],
        pattern: &[],
    },
    // Decode: three rows over f16 W, mixed with a base-only row.
    Case {
        m: 3,
        n: 31,
        k: 40,
        dtypes: [BF16, F16, F16, F32, F32],
        bias: false,
        ranks: &[4],
        pattern: &[0, -1, 0],
    },
    // Decode: seven rows (split into 4 + 3 by the wide kernels), f32 W, bf16 y.
    Case {
        m: 7,
        n: 19,
        k: 257,
        dtypes: [F16, F32, BF16, BF16, F32],
        bias: true,
        ranks: &[3],
        pattern: &[],
    },
];

/// Extra elements per row (ld - cols) of x, W, A, B, y: different per matrix so a kernel that
/// mixes up two strides is caught.
const LD_EXTRA: [usize; 5] = [3, 5, 1, 2, 7];

/// Bit pattern written in y's row padding; the kernel must leave it alone.
const PAD_BYTE: u8 = 0xA5;

fn strided(rng: &mut SplitMix64, dt: DType, rows: usize, cols: usize, extra: usize) -> Matrix {
    let ld = cols + extra;
    let vals: Vec<f32> = (0..rows * ld).map(|_| rng.uniform(-1.0, 1.0)).collect();
    Matrix::from_f32(dt, rows, ld, &vals).expect("self-check matrices are small")
}

/// The same matrix with every element replaced by its absolute value (exact in every dtype).
fn abs(m: &Matrix) -> Matrix {
    let vals: Vec<f32> = m.to_f32_vec().iter().map(|v| v.abs()).collect();
    Matrix::from_f32(m.dtype, m.rows, m.cols, &vals).expect("same shape")
}

fn view(m: &Matrix, cols: usize) -> MatRef<'_> {
    m.view().top_left(m.rows, cols)
}

/// A kernel under test: a table's `linear`, or its `linear_packed` behind a closure that packs W.
pub(crate) type Runner<'r> = &'r (dyn Fn(&LinearProblem<'_>, &mut MatMut<'_>) + Sync);

/// `f` on W packed with `spec` (packed inside the call: the check wants the layout, not speed).
pub(crate) fn packed(
    f: PackedLinearFn,
    spec: PackSpec,
) -> impl Fn(&LinearProblem<'_>, &mut MatMut<'_>) + Sync {
    move |p, y| {
        let pw = PackedW::pack(&p.w, spec).expect("self-check matrices are small");
        let q = LinearProblem {
            w: pw.shape_view(),
            ..*p
        };
        f(&q, &pw, y)
    }
}

/// Runs `linear` on `case`; Err(mismatch description) when it disagrees with the reference.
fn run_case(linear: Runner<'_>, case: &Case<'_>, seed: u64) -> Result<(), String> {
    let [dx, dw, dab, dy, db] = case.dtypes;
    let (m, n, k) = (case.m, case.n, case.k);
    let mut rng = SplitMix64::new(seed);
    let x = strided(&mut rng, dx, m, k, LD_EXTRA[0]);
    let w = strided(&mut rng, dw, n, k, LD_EXTRA[1]);
    let bias = strided(&mut rng, db, 1, n, 0);
    let mut adapters: Vec<Adapter> = Vec::new();
    for (s, &r) in case.ranks.iter().enumerate() {
        if r == 0 {
            adapters.push(None);
            continue;
        }
        let a = strided(&mut rng, dab, r, k, LD_EXTRA[2]);
        let b = strided(&mut rng, dab, n, r, LD_EXTRA[3]);
        // Gains with a zero, as ElaLoRA's pruned components have.
        let g = (s % 2 == 1).then(|| {
            let mut v = rng.fill_uniform(r, 0.25, 2.0);
            v[r / 2] = 0.0;
            Matrix::from_f32(F32, 1, r, &v).expect("small")
        });
        let scale = [0.5f32, 2.0, 1.25][s % 3];
        adapters.push(Some((a, b, g, scale)));
    }
    let row_slot: Option<Vec<i32>> = (!case.pattern.is_empty()).then(|| {
        (0..m)
            .map(|i| case.pattern[i % case.pattern.len()])
            .collect()
    });

    // The problem over the given matrices, and over their absolute values (for the error bound).
    let absd: Vec<Adapter> = adapters
        .iter()
        .map(|s| {
            s.as_ref()
                .map(|(a, b, g, sc)| (abs(a), abs(b), g.clone(), sc.abs()))
        })
        .collect();
    let (xa, wa, ba) = (abs(&x), abs(&w), abs(&bias));
    let (slots, slots_abs) = (make_slots(&adapters, k), make_slots(&absd, k));
    let rs = row_slot.as_deref();
    let p = problem(case, &x, &w, &bias, &slots, rs);
    let pa = problem(case, &xa, &wa, &ba, &slots_abs, rs);

    let mut want = vec![0f32; m * n];
    let mut bound = vec![0f32; m * n];
    reference::linear(
        &p,
        &mut MatMut::from_slice(&mut want, m, n, n).expect("shape"),
    );
    reference::linear(
        &pa,
        &mut MatMut::from_slice(&mut bound, m, n, n).expect("shape"),
    );

    let ldy = n + LD_EXTRA[4];
    let mut ybuf = vec![PAD_BYTE; m * ldy * dy.size()];
    {
        // SAFETY: ybuf holds m rows of ldy elements of dy, exclusively borrowed here.
        let mut y = unsafe { MatMut::from_raw(ybuf.as_mut_ptr(), dy, m, n, ldy) };
        p.check(&y)
            .map_err(|e| format!("self-check problem rejected: {e}"))?;
        linear(&p, &mut y);
    }
    let rtol = match dy {
        F32 => 1e-5,
        F16 => 2e-3,
        BF16 => 1.6e-2,
        Q8_0 | Q4_0 | Q4_K | Q6_K => unreachable!("the self-check writes dense outputs only"),
    };
    for i in 0..m {
        for j in 0..ldy {
            let at = (i * ldy + j) * dy.size();
            if j >= n {
                if ybuf[at..at + dy.size()].iter().any(|&b| b != PAD_BYTE) {
                    return Err(format!(
                        "wrote y's row padding at ({i}, {j}) (m={m} n={n} k={k})"
                    ));
                }
                continue;
            }
            // SAFETY: (i, j) is inside the buffer (at + size <= len).
            let got = unsafe { dtype::load_f32(ybuf.as_ptr(), dy, i * ldy + j) };
            let (r, b) = (want[i * n + j], bound[i * n + j]);
            let tol = 2e-5 * b + rtol * r.abs() + 1e-30;
            if (got - r).abs() > tol || got.is_nan() {
                return Err(format!(
                    "y[{i},{j}] = {got}, reference {r} (tolerance {tol:.3e}); m={m} n={n} k={k}, \
                     dtypes x/W/AB/y/bias = {}/{}/{}/{}/{}",
                    dx.name(),
                    dw.name(),
                    dab.name(),
                    dy.name(),
                    db.name()
                ));
            }
        }
    }
    Ok(())
}

/// A: r x k, B: n x r (both stored with ld > cols), gains, scale.
type Adapter = Option<(Matrix, Matrix, Option<Matrix>, f32)>;

fn make_slots(ads: &[Adapter], k: usize) -> Vec<Option<Slot<'_>>> {
    ads.iter()
        .map(|s| {
            s.as_ref().map(|(a, b, g, scale)| Slot {
                a: view(a, k),
                b: view(b, a.rows),
                scale: *scale,
                gains: g.as_ref().map(|g| g.view()),
                module: "self-check",
            })
        })
        .collect()
}

fn problem<'a>(
    case: &Case<'_>,
    x: &'a Matrix,
    w: &'a Matrix,
    bias: &'a Matrix,
    slots: &'a [Option<Slot<'a>>],
    row_slot: Option<&'a [i32]>,
) -> LinearProblem<'a> {
    LinearProblem {
        x: view(x, case.k),
        w: view(w, case.k),
        bias: case.bias.then(|| view(bias, case.n)),
        slots,
        row_slot,
    }
}

/// Checks `table` on every case, with W as given and W packed for the table. Err names the
/// first case that disagreed with the reference.
pub fn verify(table: &KernelTable) -> Result<(), String> {
    let plain = |p: &LinearProblem<'_>, y: &mut MatMut<'_>| (table.linear)(p, y);
    let pack = packed(table.linear_packed, table.pack);
    let runners: [(Runner<'_>, &str); 2] = [(&plain, ""), (&pack, " (packed W)")];
    for (run, what) in runners {
        for (i, case) in CASES.iter().enumerate() {
            run_case(run, case, 0x5e1f_c4ec_0000 + i as u64)
                .map_err(|e| format!("self-check case {i}{what}: {e}"))?;
        }
    }
    Ok(())
}

/// `cases` random problems with x and W of `dtypes.0` / `dtypes.1` (others random), m in
/// `m_range`, n and k in 1..=max_nk, 0-3 slots (some NULL) of ranks 1..=40, stacked or mixed.
/// For tests of kernels that cannot be reached through a table on this CPU.
#[cfg(test)]
pub(crate) fn verify_random(
    linear: Runner<'_>,
    seed: u64,
    cases: usize,
    dtypes: (Option<DType>, Option<DType>),
    m_range: (usize, usize),
    max_nk: usize,
) -> Result<(), String> {
    let mut rng = SplitMix64::new(seed);
    let all = [F32, F16, BF16];
    for c in 0..cases {
        let mut dt = || all[rng.range(0, 2)];
        let d = [
            dtypes.0.unwrap_or_else(&mut dt),
            dtypes.1.unwrap_or_else(&mut dt),
            dt(),
            dt(),
            dt(),
        ];
        let m = rng.range(m_range.0, m_range.1);
        let n = rng.range(1, max_nk);
        let k = rng.range(1, max_nk);
        let ns = rng.range(0, 3);
        let ranks: Vec<usize> = (0..ns)
            .map(|_| {
                if rng.range(0, 5) == 0 {
                    0
                } else {
                    rng.range(1, 41)
                }
            })
            .collect();
        let pattern: Vec<i32> = if ns > 0 && rng.range(0, 1) == 0 {
            (0..rng.range(1, 6))
                .map(|_| rng.range(0, ns) as i32 - 1)
                .collect()
        } else {
            Vec::new()
        };
        let case = Case {
            m,
            n,
            k,
            dtypes: d,
            bias: rng.range(0, 1) == 0,
            ranks: &ranks,
            pattern: &pattern,
        };
        run_case(linear, &case, seed ^ (c as u64 * 0x9e37))
            .map_err(|e| format!("random case {c} (ranks {ranks:?}, pattern {pattern:?}): {e}"))?;
    }
    Ok(())
}

/// For tests of a bf16 x bf16 base-GEMM variant run through stand-ins: the fixed cases plus 40
/// random problems with bf16 x and W on the GEMM path (m 9..100, n and k up to 130), with W as
/// given and packed with `spec` (32-column pair panels, as the AMX / vdpbf16ps tables pack).
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn verify_bf16_gemm(
    linear: super::LinearFn,
    linear_packed: PackedLinearFn,
    seed: u64,
) -> Result<(), String> {
    let spec = PackSpec {
        isa: super::Isa::Portable,
        nr: 32,
        kgran: 32,
    };
    let t = KernelTable {
        isa: super::Isa::Portable,
        linear_name: "stand-in",
        linear,
        pack: spec,
        linear_packed,
        linear_act_q8: reference::linear_act_q8,
        linear_packed_act_q8: reference::linear_packed_act_q8,
        rejected: &[],
    };
    verify(&t)?;
    verify_random(&linear, seed, 40, (Some(BF16), Some(BF16)), (9, 100), 130)?;
    let pk = packed(linear_packed, spec);
    verify_random(&pk, seed + 1, 40, (Some(BF16), Some(BF16)), (1, 100), 130)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::portable::PortableTile;
    use crate::backend::cpu::{self, driver, Isa};

    /// The driver with the register-tile shapes of the SIMD variants (AVX-512: 12 x 32, AVX2:
    /// 6 x 16) in portable code: blocking, packing, tails and the expand-in-tile logic for tile
    /// shapes this CPU may not be able to run natively.
    #[test]
    fn the_driver_is_right_for_every_tile_shape() {
        type Pair = (&'static str, super::super::LinearFn, PackedLinearFn, usize);
        let shapes: [Pair; 5] = [
            (
                "12x32",
                driver::linear::<PortableTile<12, 32>>,
                driver::linear_packed::<PortableTile<12, 32>>,
                32,
            ),
            (
                "6x16",
                driver::linear::<PortableTile<6, 16>>,
                driver::linear_packed::<PortableTile<6, 16>>,
                16,
            ),
            (
                "8x12",
                driver::linear::<PortableTile<8, 12>>,
                driver::linear_packed::<PortableTile<8, 12>>,
                12,
            ),
            (
                "8x8",
                driver::linear::<PortableTile<8, 8>>,
                driver::linear_packed::<PortableTile<8, 8>>,
                8,
            ),
            (
                "1x4",
                driver::linear::<PortableTile<1, 4>>,
                driver::linear_packed::<PortableTile<1, 4>>,
                4,
            ),
        ];
        for (name, f, fp, nr) in shapes {
            let spec = PackSpec {
                isa: Isa::Portable,
                nr,
                kgran: 2,
            };
            let t = KernelTable {
                isa: Isa::Portable,
                linear_name: name,
                linear: f,
                pack: spec,
                linear_packed: fp,
                linear_act_q8: reference::linear_act_q8,
                linear_packed_act_q8: reference::linear_packed_act_q8,
                rejected: &[],
            };
            verify(&t).unwrap_or_else(|e| panic!("{name}: {e}"));
            verify_random(&f, 7, 12, (None, None), (1, 80), 90)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            verify_random(&packed(fp, spec), 8, 12, (None, None), (1, 80), 90)
                .unwrap_or_else(|e| panic!("{name} packed: {e}"));
        }
    }

    #[test]
    fn every_variant_this_cpu_runs_passes() {
        for isa in Isa::ALL {
            match cpu::table(isa) {
                Ok(t) => verify(&t).unwrap_or_else(|e| panic!("{}: {e}", isa.name())),
                Err(e) => println!("skipping the '{}' kernels: {e}", isa.name()),
            }
        }
    }

    fn drops_last_slot(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
        let mut slots: Vec<_> = p.slots.to_vec();
        if let Some(s) = slots.iter_mut().rev().find(|s| s.is_some()) {
            *s = None;
        }
        let q = LinearProblem {
            slots: &slots,
            ..*p
        };
        reference::linear(&q, y)
    }

    fn off_by_one_ulp_scale(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
        reference::linear(p, y);
        if y.rows > 0 && y.cols > 0 {
            let v = y.as_ref().get(0, 0);
            y.set(0, 0, v + 0.05 * v.abs().max(1.0));
        }
    }

    fn writes_padding(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
        reference::linear(p, y);
        if y.rows > 0 && y.ld > y.cols {
            // SAFETY: ld > cols, so the element after the last column of row 0 is in the buffer.
            unsafe { dtype::store_f32(y.as_mut_ptr(), y.dtype, y.cols, 0.0) }
        }
    }

    #[test]
    fn broken_kernels_are_caught() {
        for (name, f) in [
            ("drops a slot", drops_last_slot as super::super::LinearFn),
            ("perturbs one element", off_by_one_ulp_scale),
            ("writes padding", writes_padding),
        ] {
            let t = KernelTable {
                linear_name: "broken",
                linear: f,
                ..cpu::table(Isa::Portable).unwrap()
            };
            let e = verify(&t).expect_err(name);
            assert!(e.starts_with("self-check case"), "{name}: {e}");
        }
    }
}
