//! Property tests: every optimized kernel variant this CPU runs against the f64 reference, on
//! random shapes (odd sizes, tails), ranks, dtypes of x / W / adapter / y, bias, ld > cols, and
//! stacked or mixed slots.

mod common;
use common::runtimes;
use proptest::prelude::*;
use rankfuse::backend::cpu::{self, Isa};
use rankfuse::backend::{LinearProblem, Slot};
use rankfuse::rng::SplitMix64;
use rankfuse::{DType, MatMut, MatRef, Matrix, Runtime, RuntimeOptions};

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

/// A matrix with `ld = cols + pad`, values in [-1, 1) rounded to `dt`.
fn padded(rng: &mut SplitMix64, dt: DType, rows: usize, cols: usize, pad: usize) -> Matrix {
    let ld = cols + pad;
    Matrix::from_f32(
        dt,
        rows.max(1),
        ld,
        &rng.fill_uniform(rows.max(1) * ld, -1.0, 1.0),
    )
    .unwrap()
}

fn view(m: &Matrix, rows: usize, cols: usize) -> MatRef<'_> {
    // SAFETY: m holds rows x ld elements with ld >= cols.
    unsafe { MatRef::from_raw(m.view().as_ptr(), m.dtype, rows, cols, m.cols) }
}

/// Relative rounding of storing y in `dt` (half an ulp, plus slack).
fn y_rtol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-6,
        DType::F16 => 1e-3,
        DType::BF16 => 8e-3,
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => unreachable!("a quantized output"),
    }
}

fn abs_copy(m: &Matrix) -> Matrix {
    Matrix::from_f32(
        m.dtype,
        m.rows,
        m.cols,
        &m.to_f32_vec().iter().map(|v| v.abs()).collect::<Vec<_>>(),
    )
    .unwrap()
}

#[derive(Debug, Clone)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    ranks: Vec<usize>,
    dts: [DType; 4],
    pad: usize,
    bias: bool,
    mixed: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop_oneof![1usize..=9, 10usize..=140],
        1usize..=300,
        prop_oneof![1usize..=40, 41usize..=300],
        proptest::collection::vec(prop_oneof![Just(0usize), 1usize..=70], 0..=4),
        [dtype(), dtype(), dtype(), dtype()],
        prop_oneof![Just(0usize), 1usize..=5],
        any::<bool>(),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(m, n, k, ranks, dts, pad, bias, mixed, seed)| Case {
            m,
            n,
            k,
            ranks,
            dts,
            pad,
            bias,
            mixed,
            seed,
        })
}

type Data = (
    Matrix,
    Matrix,
    Matrix,
    Vec<Option<(Matrix, Matrix, Matrix)>>,
    Vec<i32>,
);

fn data(c: &Case) -> Data {
    let mut rng = SplitMix64::new(c.seed);
    let [xd, wd, ad, _] = c.dts;
    let x = padded(&mut rng, xd, c.m, c.k, c.pad);
    let w = padded(&mut rng, wd, c.n, c.k, c.pad);
    let b = padded(&mut rng, wd, 1, c.n, 0);
    // Rank 0 in the list = an empty (NULL) slot.
    let mats: Vec<Option<(Matrix, Matrix, Matrix)>> = c
        .ranks
        .iter()
        .map(|&r| {
            (r > 0).then(|| {
                (
                    padded(&mut rng, ad, r, c.k, c.pad),
                    padded(&mut rng, ad, c.n, r, c.pad),
                    padded(&mut rng, DType::F32, 1, r, 0),
                )
            })
        })
        .collect();
    let row_slot: Vec<i32> = (0..c.m)
        .map(|_| rng.range(0, c.ranks.len()) as i32 - 1)
        .collect();
    (x, w, b, mats, row_slot)
}

/// Runs `f` on the problem the case's data describes (slot i: scale 0.5 + i, gains on odd slots).
fn with_problem<R>(c: &Case, d: &Data, f: impl FnOnce(&LinearProblem<'_>) -> R) -> R {
    let (x, w, b, mats, row_slot) = d;
    let slots: Vec<Option<Slot<'_>>> = mats
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.as_ref().map(|(a, bm, g)| Slot {
                a: view(a, a.rows, c.k),
                b: view(bm, c.n, a.rows),
                scale: 0.5 + i as f32,
                gains: (i % 2 == 1).then(|| g.view()),
                module: "prop",
            })
        })
        .collect();
    let p = LinearProblem {
        x: view(x, c.m, c.k),
        w: view(w, c.n, c.k),
        bias: c.bias.then(|| b.view()),
        slots: &slots,
        row_slot: c.mixed.then_some(row_slot.as_slice()),
    };
    f(&p)
}

/// The reference result (dense m x n f32) for the data.
fn reference_y(c: &Case, d: &Data, reference: &Runtime) -> Vec<f32> {
    let ld = c.n + c.pad;
    let mut want = Matrix::zeros(DType::F32, c.m, ld).unwrap();
    // SAFETY: want holds m x ld floats.
    let mut wv =
        unsafe { MatMut::from_raw(want.view_mut().as_mut_ptr(), DType::F32, c.m, c.n, ld) };
    with_problem(c, d, |p| reference.linear(p, &mut wv)).unwrap();
    want.to_f32_vec()
        .chunks(ld)
        .flat_map(|r| r[..c.n].to_vec())
        .collect()
}

fn check(c: &Case, rts: &[(Isa, Runtime)], reference: &Runtime) {
    let d = data(c);
    let want = reference_y(c, &d, reference);
    // Every kernel reads the same rounded inputs as the reference, so the only differences are
    // f32 accumulation (bounded by eps * k * sum of |terms|: the reference on |inputs|) and the
    // rounding of y to its dtype.
    let ad = (
        abs_copy(&d.0),
        abs_copy(&d.1),
        abs_copy(&d.2),
        d.3.iter()
            .map(|m| {
                m.as_ref()
                    .map(|(a, b, g)| (abs_copy(a), abs_copy(b), abs_copy(g)))
            })
            .collect(),
        d.4.clone(),
    );
    let bound = reference_y(c, &ad, reference);
    let yd = c.dts[3];
    let ld = c.n + c.pad;
    let eps_k = 4.0 * f32::EPSILON * (c.k as f32 + 70.0).sqrt();
    for (isa, rt) in rts {
        let mut y = Matrix::from_f32(yd, c.m, ld, &vec![7.0; c.m * ld]).unwrap();
        // SAFETY: y holds m x ld elements of yd.
        let mut yv = unsafe { MatMut::from_raw(y.view_mut().as_mut_ptr(), yd, c.m, c.n, ld) };
        with_problem(c, &d, |p| rt.linear(p, &mut yv)).unwrap();
        let all = y.to_f32_vec();
        let got: Vec<f32> = all.chunks(ld).flat_map(|r| r[..c.n].to_vec()).collect();
        let tol: Vec<f32> = bound
            .iter()
            .zip(&want)
            .map(|(bd, w)| 1e-30 + eps_k * bd + y_rtol(yd) * w.abs())
            .collect();
        for (i, ((g, w), t)) in got.iter().zip(&want).zip(&tol).enumerate() {
            assert!(
                (g - w).abs() <= *t,
                "{isa:?} {c:?}: element {i}: got {g}, want {w}, tol {t}"
            );
        }
        // Padding between rows (ld > cols) is never written.
        for r in all.chunks(ld) {
            assert!(
                r[c.n..].iter().all(|&v| v == 7.0),
                "{isa:?}: wrote past cols"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn optimized_matches_reference(c in case()) {
        let rts: Vec<(Isa, Runtime)> = runtimes().into_iter().filter(|(i, _)| *i != Isa::Reference).collect();
        let reference = Runtime::with_kernels(RuntimeOptions::default(), cpu::table(Isa::Reference).unwrap()).unwrap();
        check(&c, &rts, &reference);
    }
}
