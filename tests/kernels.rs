//! Every CPU kernel variant this machine can run, against the f64 `reference`, on random problems:
//! odd shapes (1..300), both sides of the decode threshold, several KC/MC/NC blocks, every dtype
//! mix for x / W / A-B / y, W as given and prepacked (`Runtime::pack`), ld > cols everywhere, bias or not, stacked and mixed slots (with -1
//! rows and NULL slots), per-component gains. Variants the CPU lacks skip with one printed line.
//!
//! Tolerance per element: `8e-6 * sum|terms| + rtol(y dtype) * |ref|`, where sum|terms| is the
//! reference run on absolute values (a bound on f32 accumulation error) and rtol is 1e-5 (f32),
//! 2e-3 (f16), 1.6e-2 (bf16) for the final rounding of y.

use proptest::prelude::*;
use rankfuse::backend::cpu::{self, reference, Isa};
use rankfuse::rng::SplitMix64;
use rankfuse::{DType, LinearProblem, MatMut, MatRef, Runtime, RuntimeOptions, Slot, Status};

/// A strided matrix owned by the test (ld >= cols).
struct Buf {
    /// The matrix starts at data[off]: off = 1 makes every element unaligned.
    off: usize,
    data: Vec<u8>,
    dtype: DType,
    rows: usize,
    cols: usize,
    ld: usize,
}

impl Buf {
    fn random(rng: &mut SplitMix64, dtype: DType, rows: usize, cols: usize, ld: usize) -> Buf {
        Self::random_at(rng, dtype, rows, cols, ld, 0)
    }
    fn random_at(
        rng: &mut SplitMix64,
        dtype: DType,
        rows: usize,
        cols: usize,
        ld: usize,
        off: usize,
    ) -> Buf {
        let len = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
        let vals: Vec<f32> = (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut data = vec![0u8; off + len * dtype.size()];
        // SAFETY: data holds len elements of dtype after off (any alignment).
        unsafe { rankfuse::dtype::convert_from_f32(&vals, data.as_mut_ptr().add(off), dtype) };
        Buf {
            off,
            data,
            dtype,
            rows,
            cols,
            ld,
        }
    }
    fn view(&self) -> MatRef<'_> {
        MatRef::from_bytes(
            &self.data[self.off..],
            self.dtype,
            self.rows,
            self.cols,
            self.ld,
        )
        .unwrap()
    }
    fn view_mut(&mut self) -> MatMut<'_> {
        // SAFETY: data covers the span (built by `random`), borrowed exclusively.
        unsafe {
            MatMut::from_raw(
                self.data.as_mut_ptr().add(self.off),
                self.dtype,
                self.rows,
                self.cols,
                self.ld,
            )
        }
    }
    /// The same matrix with every element replaced by its absolute value.
    fn abs(&self) -> Buf {
        let v = self.view();
        let len = (self.data.len() - self.off) / self.dtype.size();
        let mut vals = vec![0f32; len];
        // SAFETY: data holds len elements after off.
        unsafe {
            rankfuse::dtype::convert_to_f32(self.data.as_ptr().add(self.off), self.dtype, &mut vals)
        };
        let vals: Vec<f32> = vals.iter().map(|x| x.abs()).collect();
        let mut data = vec![0u8; self.data.len()];
        // SAFETY: as above.
        unsafe {
            rankfuse::dtype::convert_from_f32(&vals, data.as_mut_ptr().add(self.off), self.dtype)
        };
        Buf {
            off: self.off,
            data,
            dtype: v.dtype,
            rows: self.rows,
            cols: self.cols,
            ld: self.ld,
        }
    }
}

#[derive(Clone, Debug)]
struct SlotSpec {
    r: usize,
    scale: f32,
    gains: bool,
}

#[derive(Clone, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    /// x, W, A-B, y, bias
    dtypes: [DType; 5],
    bias: bool,
    slots: Vec<Option<SlotSpec>>,
    mixed: bool,
    /// extra ld for x, W, A, B, y
    ld_extra: [usize; 5],
    /// Byte offset (0 or 1) of x, W, A, B and y: unaligned views as safetensors may give.
    misalign: usize,
    seed: u64,
}

fn dtype_strategy() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

fn slot_strategy(max_r: usize) -> impl Strategy<Value = Option<SlotSpec>> {
    prop_oneof![
        1 => Just(None),
        5 => (1..=max_r, -2.0f32..2.0, any::<bool>())
            .prop_map(|(r, scale, gains)| Some(SlotSpec { r, scale, gains })),
    ]
}

/// Problems with m in `ms`, n and k up to 300, m*n*k capped so the reference stays fast.
fn case_strategy(ms: std::ops::RangeInclusive<usize>, cap: usize) -> impl Strategy<Value = Case> {
    (
        ms,
        1usize..=300,
        // k = 0 (an empty reduction: y = bias) now and then.
        prop_oneof![1 => Just(0usize), 30 => 1usize..=300],
        [
            dtype_strategy(),
            dtype_strategy(),
            dtype_strategy(),
            dtype_strategy(),
            dtype_strategy(),
        ],
        any::<bool>(),
        prop::collection::vec(slot_strategy(70), 0..=4),
        any::<bool>(),
        [0usize..4, 0usize..4, 0usize..4, 0usize..4, 0usize..4],
        (any::<u64>(), 0usize..2),
    )
        .prop_map(
            move |(m, mut n, k, dtypes, bias, slots, mixed, ld_extra, (seed, misalign))| {
                if m * n * k.max(1) > cap {
                    n = (cap / (m * k.max(1))).max(1);
                }
                Case {
                    m,
                    n,
                    k,
                    dtypes,
                    bias,
                    slots,
                    mixed,
                    ld_extra,
                    misalign,
                    seed,
                }
            },
        )
}

fn rtol(dt: DType) -> f32 {
    match dt {
        DType::F32 => 1e-5,
        DType::F16 => 2e-3,
        DType::BF16 => 1.6e-2,
        // Outputs are dense; quantized W is tested in tests/gguf_linear.rs.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => unreachable!("a quantized output"),
    }
}

/// A, B, gains and scale of one slot.
type SlotBufs = (Buf, Buf, Option<Buf>, f32);

struct Data {
    x: Buf,
    w: Buf,
    bias: Option<Buf>,
    ab: Vec<Option<SlotBufs>>,
    row_slot: Option<Vec<i32>>,
}

fn make_data(c: &Case) -> Data {
    let mut rng = SplitMix64::new(c.seed);
    let [xd, wd, ad, _, bd] = c.dtypes;
    let e = c.ld_extra;
    let o = c.misalign;
    let x = Buf::random_at(&mut rng, xd, c.m, c.k, c.k + e[0], o);
    let w = Buf::random_at(&mut rng, wd, c.n, c.k, c.k + e[1], o);
    let bias = c.bias.then(|| Buf::random(&mut rng, bd, 1, c.n, c.n));
    let ab = c
        .slots
        .iter()
        .map(|s| {
            s.as_ref().map(|s| {
                let a = Buf::random_at(&mut rng, ad, s.r, c.k, c.k + e[2], o);
                let b = Buf::random_at(&mut rng, ad, c.n, s.r, s.r + e[3], o);
                let g = s.gains.then(|| {
                    let mut g = Buf::random(&mut rng, DType::F32, 1, s.r, s.r);
                    // Some components masked off, as AdaLoRA does.
                    for c in 0..s.r {
                        if rng.next_u64().is_multiple_of(4) {
                            g.data[c * 4..c * 4 + 4].copy_from_slice(&0f32.to_le_bytes());
                        }
                    }
                    g
                });
                (a, b, g, s.scale)
            })
        })
        .collect();
    let row_slot = c.mixed.then(|| {
        (0..c.m)
            .map(|_| (rng.next_u64() % (c.slots.len() as u64 + 1)) as i32 - 1)
            .collect()
    });
    Data {
        x,
        w,
        bias,
        ab,
        row_slot,
    }
}

fn slots_of<'a>(ab: &'a [Option<SlotBufs>]) -> Vec<Option<Slot<'a>>> {
    ab.iter()
        .map(|s| {
            s.as_ref().map(|(a, b, g, scale)| Slot {
                a: a.view(),
                b: b.view(),
                scale: *scale,
                gains: g.as_ref().map(|g| g.view()),
                module: "test",
            })
        })
        .collect()
}

/// Runs the case on `rts` (one runtime per variant) and compares each with the reference.
fn check_case(c: &Case, rts: &[(Isa, Runtime)]) -> Result<(), TestCaseError> {
    let d = make_data(c);
    let slots = slots_of(&d.ab);
    let p = LinearProblem {
        x: d.x.view(),
        w: d.w.view(),
        bias: d.bias.as_ref().map(|b| b.view()),
        slots: &slots,
        row_slot: d.row_slot.as_deref(),
    };
    // The reference in f32 output, and the same on absolute values (error bound).
    let mut yref = vec![0f32; c.m * c.n];
    reference::linear(
        &p,
        &mut MatMut::from_slice(&mut yref, c.m, c.n, c.n).unwrap(),
    );
    let abs_ab: Vec<_> =
        d.ab.iter()
            .map(|s| {
                s.as_ref()
                    .map(|(a, b, g, sc)| (a.abs(), b.abs(), g.as_ref().map(|g| g.abs()), sc.abs()))
            })
            .collect();
    let abs_slots = slots_of(&abs_ab);
    let (xa, wa, ba) = (d.x.abs(), d.w.abs(), d.bias.as_ref().map(|b| b.abs()));
    let pa = LinearProblem {
        x: xa.view(),
        w: wa.view(),
        bias: ba.as_ref().map(|b| b.view()),
        slots: &abs_slots,
        row_slot: d.row_slot.as_deref(),
    };
    let mut ybound = vec![0f32; c.m * c.n];
    reference::linear(
        &pa,
        &mut MatMut::from_slice(&mut ybound, c.m, c.n, c.n).unwrap(),
    );

    let ydt = c.dtypes[3];
    let yld = c.n + c.ld_extra[4];
    // Every variant with W as given and W prepacked for it (rf_weights_pack's layout).
    let runs = rts
        .iter()
        .flat_map(|(isa, rt)| [(isa, rt, false), (isa, rt, true)]);
    for (isa, rt, packed) in runs {
        let mut rng = SplitMix64::new(7);
        // Random contents, so a kernel that skips an element is caught; padding is checked.
        let mut y = Buf::random_at(&mut rng, ydt, c.m, c.n, yld, c.misalign);
        let before = y.data.clone();
        let isa = format!("{isa:?}{}", if packed { " (packed W)" } else { "" });
        let res = if packed {
            let pw = rt
                .pack(&p.w)
                .map_err(|e| TestCaseError::fail(format!("{isa}: {}", e.message)))?;
            rt.linear_packed(&p, &pw, &mut y.view_mut())
        } else {
            rt.linear(&p, &mut y.view_mut())
        };
        res.map_err(|e| TestCaseError::fail(format!("{isa}: {}", e.message)))?;
        let yv = y.view();
        let sz = ydt.size();
        for i in 0..c.m {
            for j in 0..c.n {
                let (got, want) = (yv.get(i, j), yref[i * c.n + j]);
                // The reference also rounds to y's dtype only here: compare to the f32 value.
                let tol = 8e-6 * ybound[i * c.n + j] + rtol(ydt) * want.abs() + 1e-6;
                prop_assert!(
                    (got - want).abs() <= tol,
                    "{isa} y[{i},{j}] = {got}, reference {want} (tol {tol}), case {c:?}"
                );
            }
            if i + 1 < c.m {
                let o = c.misalign;
                let pad = o + (i * yld + c.n) * sz..o + ((i + 1) * yld) * sz;
                prop_assert_eq!(
                    &y.data[pad.clone()],
                    &before[pad],
                    "{} wrote into y's padding (row {})",
                    isa,
                    i
                );
            }
        }
    }
    Ok(())
}

/// A runtime for `isa`, or None after printing the one line that says why it is skipped.
fn runtime_for(isa: Isa) -> Option<Runtime> {
    if !cpu::supported(isa) {
        println!(
            "skipping the '{}' kernels: this CPU lacks the instructions ({})",
            isa.name(),
            cpu::requirement(isa)
        );
        return None;
    }
    let table = cpu::table(isa).expect("supported ISA has a table");
    Some(
        Runtime::with_kernels(
            RuntimeOptions {
                num_threads: 2,
                ..Default::default()
            },
            table,
        )
        .unwrap(),
    )
}

fn cfg(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn run_isa(isa: Isa) {
    let Some(rt) = runtime_for(isa) else { return };
    let rts = [(isa, rt)];
    // Small m: the decode path and the GEMM path just above its threshold.
    proptest!(cfg(128), |(c in case_strategy(1..=24, 1_500_000))| {
        check_case(&c, &rts)?;
    });
    // Large m: several MC row groups, mixed slots over many panels.
    proptest!(cfg(24), |(c in case_strategy(100..=300, 3_000_000))| {
        check_case(&c, &rts)?;
    });
}

#[test]
fn portable_matches_reference() {
    run_isa(Isa::Portable);
}

#[test]
fn neon_matches_reference() {
    run_isa(Isa::Neon);
}

#[test]
fn avx2_matches_reference() {
    run_isa(Isa::Avx2);
}

#[test]
fn avx512_matches_reference() {
    run_isa(Isa::Avx512);
}

#[test]
fn avx512bf16_matches_reference() {
    run_isa(Isa::Avx512Bf16);
}

#[test]
fn amx_matches_reference() {
    run_isa(Isa::Amx);
}

/// More rows than one GEMM chunk (the packed x is bounded per chunk), with mixed slots.
#[test]
fn chunked_rows_match_reference() {
    let rts: Vec<_> = [
        Isa::Amx,
        Isa::Avx512Bf16,
        Isa::Avx512,
        Isa::Avx2,
        Isa::Portable,
    ]
    .into_iter()
    .filter_map(|i| runtime_for(i).map(|rt| (i, rt)))
    .take(1)
    .collect();
    for (seed, mixed) in [(1u64, true), (2, false)] {
        let c = Case {
            m: 1700,
            n: 37,
            k: 19,
            dtypes: [DType::BF16, DType::F16, DType::F32, DType::F32, DType::F32],
            bias: true,
            slots: vec![
                Some(SlotSpec {
                    r: 5,
                    scale: 0.5,
                    gains: false,
                }),
                None,
                Some(SlotSpec {
                    r: 33,
                    scale: -1.25,
                    gains: true,
                }),
            ],
            mixed,
            ld_extra: [1, 2, 3, 1, 2],
            misalign: seed as usize % 2,
            seed,
        };
        check_case(&c, &rts).unwrap();
    }
}

/// Forcing a variant this CPU cannot run is a clear UNSUPPORTED error, never a crash.
#[test]
fn unsupported_variants_are_refused() {
    let mut refused = 0;
    for isa in Isa::ALL {
        match cpu::table(isa) {
            Ok(t) => assert!(cpu::supported(isa) && t.isa == isa),
            Err(e) => {
                assert!(!cpu::supported(isa));
                assert_eq!(e.status, Status::Unsupported);
                assert!(e.message.contains(isa.name()), "{}", e.message);
                refused += 1;
            }
        }
    }
    println!("{refused} variant(s) unsupported on this CPU");
    // Through the environment variable, in a child process (the CLI prints the error).
    #[cfg(feature = "cli")]
    for isa in Isa::ALL.into_iter().filter(|&i| !cpu::supported(i)) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_rankfuse"))
            .arg("info")
            .env("RANKFUSE_ISA", isa.name())
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Unsupported") && err.contains(isa.name()),
            "{err}"
        );
    }
}

/// A pack is read only by the kernels it was made for: another table is refused by name, never
/// read in the wrong layout.
#[test]
fn a_pack_for_other_kernels_is_refused() {
    let rts: Vec<(Isa, Runtime)> = [Isa::Reference, Isa::Portable, Isa::Avx2, Isa::Neon]
        .into_iter()
        .filter_map(|i| runtime_for(i).map(|rt| (i, rt)))
        .collect();
    let mut rng = SplitMix64::new(3);
    let (x, w) = (
        Buf::random(&mut rng, DType::F32, 2, 9, 9),
        Buf::random(&mut rng, DType::BF16, 7, 9, 9),
    );
    let p = LinearProblem {
        x: x.view(),
        w: w.view(),
        bias: None,
        slots: &[],
        row_slot: None,
    };
    for (i, (a, rta)) in rts.iter().enumerate() {
        let pw = rta.pack(&w.view()).unwrap();
        for (b, rtb) in rts.iter().skip(i + 1) {
            let mut y = vec![0f32; 14];
            let e = rtb
                .linear_packed(&p, &pw, &mut MatMut::from_slice(&mut y, 2, 7, 7).unwrap())
                .unwrap_err();
            assert_eq!(e.status, Status::InvalidArgument, "{}", e.message);
            assert!(
                e.message.contains(a.name()) && e.message.contains(b.name()),
                "{}",
                e.message
            );
        }
    }
}
