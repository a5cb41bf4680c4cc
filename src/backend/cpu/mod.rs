//! The CPU backend: a kernel table chosen once when a runtime starts (BLIS style: the reference
//! is always there, optimized variants replace it where the CPU allows), and the thread pool.

#[cfg(target_arch = "x86_64")]
pub mod amx;
#[cfg(target_arch = "x86_64")]
pub mod avx2;
#[cfg(target_arch = "x86_64")]
pub mod avx512;
pub mod detect;
pub mod driver;
pub mod portable;
pub mod reference;

use crate::backend::LinearProblem;
use crate::error::{Error, Result};
use crate::matrix::MatMut;

/// Instruction-set variants, from slowest to fastest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Scalar, f64 accumulation: the ground truth (selectable for debugging, never chosen).
    Reference,
    Portable,
    Avx2,
    Avx512,
    /// AVX-512 plus AMX-BF16 tiles for bf16 x bf16 GEMMs.
    Amx,
}

impl Isa {
    pub fn name(self) -> &'static str {
        match self {
            Isa::Reference => "reference",
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Amx => "amx",
        }
    }
    pub fn parse(s: &str) -> Option<Isa> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reference" => Some(Isa::Reference),
            "portable" => Some(Isa::Portable),
            "avx2" => Some(Isa::Avx2),
            "avx512" => Some(Isa::Avx512),
            "amx" => Some(Isa::Amx),
            _ => None,
        }
    }
    pub const ALL: [Isa; 5] = [
        Isa::Reference,
        Isa::Portable,
        Isa::Avx2,
        Isa::Avx512,
        Isa::Amx,
    ];
}

pub type LinearFn = fn(&LinearProblem<'_>, &mut MatMut<'_>);

/// The kernels a runtime calls. Filled once; entries never change afterwards.
#[derive(Clone, Copy)]
pub struct KernelTable {
    pub isa: Isa,
    /// Names of the kernels in use, for `rf_runtime_info`.
    pub linear_name: &'static str,
    pub linear: LinearFn,
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
        Isa::Avx2 => f.avx2 && f.fma && f.f16c,
        Isa::Avx512 => f.avx512f && f.avx2 && f.fma && f.f16c,
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
        Isa::Avx2 => "x86_64 with AVX2, FMA and F16C",
        Isa::Avx512 => "x86_64 with AVX-512F, AVX2, FMA and F16C",
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
    };
    if isa >= Isa::Portable {
        t = KernelTable {
            isa: Isa::Portable,
            linear_name: "fused_linear_portable",
            linear: driver::linear::<portable::Portable>,
        };
    }
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx2 {
            t = KernelTable {
                isa: Isa::Avx2,
                linear_name: "fused_linear_avx2_6x16",
                linear: driver::linear::<avx2::Avx2>,
            };
        }
        if isa >= Isa::Avx512 {
            t = KernelTable {
                isa: Isa::Avx512,
                linear_name: "fused_linear_avx512_12x32",
                linear: driver::linear::<avx512::Avx512>,
            };
        }
        if isa >= Isa::Amx {
            t = KernelTable {
                isa: Isa::Amx,
                linear_name: "fused_linear_amx_bf16_32x32+avx512_12x32",
                linear: amx::linear,
            };
        }
    }
    Ok(t)
}

/// The best table for this CPU, or the one `RANKFUSE_ISA` forces.
pub fn select() -> Result<KernelTable> {
    if let Ok(v) = std::env::var("RANKFUSE_ISA") {
        if !v.is_empty() {
            let isa = Isa::parse(&v).ok_or_else(|| {
                Error::invalid(format!(
                    "RANKFUSE_ISA='{v}': expected reference, portable, avx2, avx512 or amx"
                ))
            })?;
            return table(isa);
        }
    }
    let best = Isa::ALL
        .iter()
        .rev()
        .copied()
        .find(|&i| supported(i))
        .unwrap_or(Isa::Portable);
    table(best)
}
