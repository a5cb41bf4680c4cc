//! The CPU backend: a kernel table chosen once when a runtime starts (BLIS style: the reference
//! is always there, optimized variants replace it where the CPU allows), and the thread pool.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx2_panel;
#[cfg(target_arch = "x86_64")]
pub mod avx2_q8;
#[cfg(target_arch = "x86_64")]
pub mod avx2_qpack;
#[cfg(target_arch = "x86_64")]
pub mod avx2_quant;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
#[cfg(target_arch = "x86_64")]
pub mod avx512bf16;
pub mod detect;
pub mod driver;
#[cfg(target_arch = "aarch64")]
pub mod neon;
pub mod pack;
pub mod portable;
pub mod quant_gemv;
pub mod quant_pack;
pub mod reference;
pub mod selfcheck;

use crate::backend::LinearProblem;
use crate::error::{Error, Result};
use crate::matrix::MatMut;
#[allow(unused_imports)]
use driver::MicroKernel;
use pack::{PackSpec, PackedW};
use std::sync::OnceLock;

/// Instruction-set variants, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Scalar, f64 accumulation: the ground truth (selectable for debugging, never chosen).
    Reference,
    Portable,
    /// AArch64 AdvSIMD (every ARMv8-A core).
    Neon,
    Avx2,
    Avx512,
    /// AVX-512 plus `vdpbf16ps` (AVX512-BF16) for bf16 x bf16 GEMMs.
    Avx512Bf16,
    /// AVX-512 plus AMX-BF16 tiles for bf16 x bf16 GEMMs.
    Amx,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Reference => "reference",
            Isa::Portable => "portable",
            Isa::Neon => "neon",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }
    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reference" => Some(Isa::Reference),
            "portable" => Some(Isa::Portable),
            "neon" => Some(Isa::Neon),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "avx512bf16" => Some(Isa::Avx512Bf16),
            "amx" => Some(Isa::Amx),
            _ => None,
        }
    }
    pub const ALL: [Isa; 7] = [
        Isa::Reference,
        Isa::Portable,
        Isa::Neon,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Avx512Bf16,
        Isa::Amx,
    ];
}

pub type LinearFn = fn(&LinearProblem<'_>, &mut MatMut<'_>);
/// `LinearFn` with W read from a pack made with the table's `pack` spec (`p.w` is its shape).
pub type PackedLinearFn = fn(&LinearProblem<'_>, &PackedW, &mut MatMut<'_>);

/// The kernels a runtime calls. Filled once; entries never change afterwards.
#[derive(Clone, Copy)]
pub struct KernelTable {
    pub isa: Isa,
    /// Names of the kernels in use, for `rf_runtime_info`.
    pub linear_name: &'static str,
    pub linear: LinearFn,
    /// The layout `PackedW::pack` produces for these kernels, and the linear that reads it.
    pub pack: PackSpec,
    pub linear_packed: PackedLinearFn,
    /// `linear` in the `ActQuant::Q8` mode (x quantized to Q8 blocks for quantized-W decode).
    pub linear_act_q8: LinearFn,
    /// `linear_packed` in the `ActQuant::Q8` mode (for a repacked Q4_0 / Q8_0 W).
    pub linear_packed_act_q8: PackedLinearFn,
    /// Variants that were better for this CPU but failed the start-up self-check (empty when
    /// the table was not chosen by `select` or nothing was rejected).
    pub rejected: &'static [Rejected],
}

/// A variant `select` did not use because it disagreed with the reference.
#[derive(Clone, Debug)]
pub struct Rejected {
    pub isa: Isa,
    /// The first mismatch (case, element, values, tolerance).
    pub reason: String,
}

impl std::fmt::Debug for KernelTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KernelTable({})", self.linear_name)
    }
}

/// Whether this CPU can run `isa`.
pub fn supported(isa: Isa) -> bool {
    let f = detect::features();
    match isa {
        Isa::Reference | Isa::Portable => true,
        Isa::Neon => cfg!(target_arch = "aarch64") && f.neon,
        Isa::Avx2 => f.avx2 && f.fma && f.f16c,
        Isa::Avx512 => f.avx512f && f.avx2 && f.fma && f.f16c,
        Isa::Avx512Bf16 => supported(Isa::Avx512) && f.avx512_bf16,
        Isa::Amx => supported(Isa::Avx512) && f.amx_tile && f.amx_bf16 && amx_permitted(),
    }
}

#[cfg(target_arch = "x86_64")]
fn amx_permitted() -> bool {
    amx::permitted()
}
#[cfg(not(target_arch = "x86_64"))]
fn amx_permitted() -> bool {
    false
}

/// What `isa` needs from the CPU (and OS), for messages.
pub fn requirement(isa: Isa) -> &'static str {
    match isa {
        Isa::Reference | Isa::Portable => "nothing",
        Isa::Neon => "aarch64 with AdvSIMD (NEON)",
        Isa::Avx2 => "x86_64 with AVX2, FMA and F16C",
        Isa::Avx512 => "x86_64 with AVX-512F, AVX2, FMA and F16C",
        Isa::Avx512Bf16 => "x86_64 with AVX-512F, AVX512-BF16, AVX2, FMA and F16C",
        Isa::Amx => {
            "x86_64 with AVX-512F, AMX-TILE and AMX-BF16 enabled in XCR0, and Linux granting \
             tile data (arch_prctl ARCH_REQ_XCOMP_PERM)"
        }
    }
}

/// The table for `isa`, or UNSUPPORTED when this CPU cannot run it.
pub fn table(isa: Isa) -> Result<KernelTable> {
    if !supported(isa) {
        return Err(Error::unsupported(format!(
            "this CPU cannot run the '{}' kernels (they need {})",
            isa.name(),
            requirement(isa)
        )));
    }
    let mut t = KernelTable {
        isa: Isa::Reference,
        linear_name: "fused_linear_reference",
        linear: reference::linear,
        pack: PackSpec {
            isa: Isa::Reference,
            nr: 16,
            kgran: 2,
        },
        linear_packed: reference::linear_packed,
        linear_act_q8: reference::linear_act_q8,
        linear_packed_act_q8: reference::linear_packed_act_q8,
        rejected: &[],
    };
    if isa >= Isa::Portable {
        t = KernelTable {
            isa: Isa::Portable,
            linear_name: "fused_linear_portable",
            linear: driver::linear::<portable::Portable>,
            pack: PackSpec {
                isa: Isa::Portable,
                nr: portable::Portable::NR,
                kgran: 2,
            },
            linear_packed: driver::linear_packed::<portable::Portable>,
            linear_act_q8: driver::linear_act_q8::<portable::Portable>,
            linear_packed_act_q8: driver::linear_packed_act_q8::<portable::Portable>,
            rejected: &[],
        };
    }
    #[cfg(target_arch = "aarch64")]
    if isa == Isa::Neon {
        t = KernelTable {
            isa: Isa::Neon,
            linear_name: "fused_linear_neon_8x12",
            linear: driver::linear::<neon::Neon>,
            pack: PackSpec {
                isa: Isa::Neon,
                nr: neon::Neon::NR,
                kgran: 2,
            },
            linear_packed: driver::linear_packed::<neon::Neon>,
            linear_act_q8: driver::linear_act_q8::<neon::Neon>,
            linear_packed_act_q8: driver::linear_packed_act_q8::<neon::Neon>,
            rejected: &[],
        };
    }
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx2 {
            t = KernelTable {
                isa: Isa::Avx2,
                linear_name: "fused_linear_avx2_6x16",
                linear: driver::linear::<avx2::Avx2>,
                pack: PackSpec {
                    isa: Isa::Avx2,
                    nr: avx2::Avx2::NR,
                    kgran: 2,
                },
                linear_packed: driver::linear_packed::<avx2::Avx2>,
                linear_act_q8: driver::linear_act_q8::<avx2::Avx2>,
                linear_packed_act_q8: driver::linear_packed_act_q8::<avx2::Avx2>,
                rejected: &[],
            };
        }
        if isa >= Isa::Avx512 {
            t = KernelTable {
                isa: Isa::Avx512,
                linear_name: "fused_linear_avx512_12x32",
                linear: driver::linear::<avx512::Avx512>,
                pack: PackSpec {
                    isa: Isa::Avx512,
                    nr: avx512::Avx512::NR,
                    kgran: 2,
                },
                linear_packed: driver::linear_packed::<avx512::Avx512>,
                linear_act_q8: driver::linear_act_q8::<avx512::Avx512>,
                linear_packed_act_q8: driver::linear_packed_act_q8::<avx512::Avx512>,
                rejected: &[],
            };
        }
        if isa == Isa::Avx512Bf16 {
            t = KernelTable {
                isa: Isa::Avx512Bf16,
                linear_name: "fused_linear_avx512bf16_dpbf16ps_32x32+avx512_12x32",
                linear: avx512bf16::linear,
                pack: PackSpec {
                    isa: Isa::Avx512Bf16,
                    nr: avx512::Avx512::NR,
                    kgran: 32,
                },
                linear_packed: avx512bf16::linear_packed,
                linear_act_q8: driver::linear_act_q8::<avx512::Avx512>,
                linear_packed_act_q8: driver::linear_packed_act_q8::<avx512::Avx512>,
                rejected: &[],
            };
        }
        if isa >= Isa::Amx {
            t = KernelTable {
                isa: Isa::Amx,
                linear_name: "fused_linear_amx_bf16_32x32+avx512_12x32",
                linear: amx::linear,
                pack: PackSpec {
                    isa: Isa::Amx,
                    nr: avx512::Avx512::NR,
                    kgran: 32,
                },
                linear_packed: amx::linear_packed,
                linear_act_q8: driver::linear_act_q8::<avx512::Avx512>,
                linear_packed_act_q8: driver::linear_packed_act_q8::<avx512::Avx512>,
                rejected: &[],
            };
        }
    }
    Ok(t)
}

/// The self-check result of `isa` on this CPU, computed once per process.
fn verified(t: &KernelTable) -> std::result::Result<(), String> {
    if t.isa == Isa::Reference {
        return Ok(());
    }
    self_check_cell(t.isa)
        .get_or_init(|| {
            // A small pool of its own, dropped after the check: two threads exercise the
            // parallel paths, and the process's global pool is never started on our account.
            match rayon::ThreadPoolBuilder::new().num_threads(2).build() {
                Ok(pool) => pool.install(|| selfcheck::verify(t)),
                Err(_) => selfcheck::verify(t),
            }
        })
        .clone()
}

/// The self-check result of `isa` if it has run in this process (None: not run).
pub fn self_check_result(isa: Isa) -> Option<std::result::Result<(), String>> {
    if isa == Isa::Reference {
        return Some(Ok(()));
    }
    self_check_cell(isa).get().cloned()
}

fn self_check_cell(isa: Isa) -> &'static OnceLock<std::result::Result<(), String>> {
    static DONE: [OnceLock<std::result::Result<(), String>>; Isa::ALL.len()] =
        [const { OnceLock::new() }; Isa::ALL.len()];
    &DONE[isa as usize]
}

/// The first candidate (best first) that passes `check`, with the ones that failed; the
/// reference when none passes.
fn choose(
    candidates: &[KernelTable],
    check: impl Fn(&KernelTable) -> std::result::Result<(), String>,
) -> (KernelTable, Vec<Rejected>) {
    let mut rejected = Vec::new();
    for t in candidates {
        match check(t) {
            Ok(()) => return (*t, rejected),
            Err(reason) => rejected.push(Rejected { isa: t.isa, reason }),
        }
    }
    let reference = table(Isa::Reference).expect("the reference runs everywhere");
    (reference, rejected)
}

/// The best table for this CPU that passes the start-up self-check (`selfcheck`), or the one
/// `RANKFUSE_ISA` forces (which must pass it too: a forced variant that fails is an INTERNAL
/// error rather than a silent fallback).
pub fn select() -> Result<KernelTable> {
    if let Ok(v) = std::env::var("RANKFUSE_ISA") {
        if !v.is_empty() {
            let isa = Isa::parse(&v).ok_or_else(|| {
                Error::invalid(format!(
                    "RANKFUSE_ISA='{v}': expected reference, portable, neon, avx2, avx512, avx512bf16 or amx"
                ))
            })?;
            let t = table(isa)?;
            verified(&t).map_err(|e| {
                Error::internal(format!(
                    "RANKFUSE_ISA={}: the kernels failed the start-up self-check against the \
                     reference ({e}); unset RANKFUSE_ISA to let rankfuse pick a variant that passes",
                    isa.name()
                ))
            })?;
            return Ok(t);
        }
    }
    static AUTO: OnceLock<KernelTable> = OnceLock::new();
    Ok(*AUTO.get_or_init(|| {
        let candidates: Vec<KernelTable> = Isa::ALL
            .iter()
            .rev()
            .filter(|&&i| i != Isa::Reference)
            .filter_map(|&i| table(i).ok())
            .collect();
        let (mut t, rejected) = choose(&candidates, verified);
        t.rejected = Box::leak(rejected.into_boxed_slice());
        t
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrong(p: &LinearProblem<'_>, y: &mut MatMut<'_>) {
        reference::linear(p, y);
        if y.rows > 0 && y.cols > 0 {
            y.set(0, 0, 1e3);
        }
    }

    #[test]
    fn a_variant_that_fails_the_self_check_is_skipped_and_reported() {
        let broken = KernelTable {
            isa: Isa::Amx,
            linear_name: "broken",
            linear: wrong,
            ..table(Isa::Portable).unwrap()
        };
        let portable = table(Isa::Portable).unwrap();
        let (t, rejected) = choose(&[broken, portable], selfcheck::verify);
        assert_eq!(t.isa, Isa::Portable);
        assert_eq!(rejected.len(), 1);
        assert_eq!(rejected[0].isa, Isa::Amx);
        assert!(
            rejected[0].reason.contains("reference"),
            "{}",
            rejected[0].reason
        );
        // Nothing passes: the reference.
        let (t, rejected) = choose(&[broken], selfcheck::verify);
        assert_eq!((t.isa, rejected.len()), (Isa::Reference, 1));
    }

    #[test]
    fn select_picks_a_variant_that_passes() {
        if std::env::var_os("RANKFUSE_ISA").is_some() {
            println!("skipped: RANKFUSE_ISA is set");
            return;
        }
        let t = select().unwrap();
        assert!(t.isa >= Isa::Portable);
        assert!(selfcheck::verify(&t).is_ok());
    }
}
