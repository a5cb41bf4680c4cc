//! CPU feature detection, done once per process.

use std::sync::OnceLock;

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct CpuFeatures {
    pub avx2: bool,
    pub fma: bool,
    pub f16c: bool,
    pub avx512f: bool,
    pub avx512bw: bool,
    pub avx512vl: bool,
    pub avx512_bf16: bool,
    pub avx512_fp16: bool,
    pub amx_tile: bool,
    pub amx_bf16: bool,
    pub neon: bool,
}

#[cfg(target_arch = "x86_64")]
fn detect() -> CpuFeatures {
    use std::arch::is_x86_feature_detected as has;
    CpuFeatures {
        avx2: has!("avx2"),
        fma: has!("fma"),
        f16c: has!("f16c"),
        avx512f: has!("avx512f"),
        avx512bw: has!("avx512bw"),
        avx512vl: has!("avx512vl"),
        avx512_bf16: has!("avx512bf16"),
        avx512_fp16: has!("avx512fp16"),
        amx_tile: amx().0,
        amx_bf16: amx().1,
        neon: false,
    }
}

/// (AMX-TILE, AMX-BF16) as CPUID leaf 7 reports them AND the OS enables tile state in XCR0
/// (bits 17 XTILECFG and 18 XTILEDATA). Using tiles still needs per-process permission from
/// Linux (arch_prctl ARCH_REQ_XCOMP_PERM), requested by the AMX kernels themselves.
#[cfg(target_arch = "x86_64")]
fn amx() -> (bool, bool) {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    let max_leaf = __cpuid(0).eax;
    if max_leaf < 7 {
        return (false, false);
    }
    let l7 = __cpuid_count(7, 0);
    let osxsave = (__cpuid(1).ecx >> 27) & 1 == 1;
    if !osxsave {
        return (false, false);
    }
    let xcr0: u64;
    // SAFETY: XGETBV with ECX = 0 is valid whenever OSXSAVE is set (checked above).
    unsafe {
        let (lo, hi): (u32, u32);
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
        xcr0 = ((hi as u64) << 32) | lo as u64;
    }
    let os_tiles = (xcr0 >> 17) & 3 == 3;
    let tile = (l7.edx >> 24) & 1 == 1 && os_tiles;
    let bf16 = (l7.edx >> 22) & 1 == 1 && tile;
    (tile, bf16)
}

#[cfg(target_arch = "aarch64")]
fn detect() -> CpuFeatures {
    CpuFeatures {
        neon: std::arch::is_aarch64_feature_detected!("neon"),
        ..Default::default()
    }
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn detect() -> CpuFeatures {
    CpuFeatures::default()
}

pub fn features() -> CpuFeatures {
    static F: OnceLock<CpuFeatures> = OnceLock::new();
    *F.get_or_init(detect)
}
