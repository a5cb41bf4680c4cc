//! Launch planning for the block-quantized W kernels (`kernels/quant_linear.cu`): Q8_0, Q4_0,
//! Q4_K and Q6_K weights are dequantized inside the fused kernels (registers for m <= 8, shared-memory
//! tiles above), never into a buffer. Pure functions, unit-tested without a GPU; each mirrors the
//! geometry comment at the top of quant_linear.cu.
//!
//! The shrink (`lora_shrink_*`, T = x Aᵀ) is the dense path's; with more than one K split the
//! decode epilogue is also the dense path's (`decode_epilogue_*`, which never reads W).

use super::launch::{
    self, DecodeSplit, Geometry, LinearParams, Path, BLOCK, DECODE_COLS, GRID_YZ_MAX,
};
use super::CudaBackend;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// f32 elements of x one decode block stages in shared memory (32 KiB), whole 256-element units
/// per row (`QD_STAGE_FLOATS` in quant_linear.cu).
pub(crate) const STAGE_FLOATS: usize = 8192;
/// Split and stage granularity: a Q4_K super-block, 8 Q8_0 / Q4_0 blocks, one warp step.
pub(crate) const K_ALIGN: usize = 256;
/// GEMM output tile (`QL_BM`, `QL_BN`).
pub(crate) const TILE_BM: usize = 64;
pub(crate) const TILE_BN: usize = 64;

/// The kernel suffix of a block-quantized dtype.
fn suffix(d: DType) -> Option<&'static str> {
    match d {
        DType::Q8_0 => Some("q8_0"),
        DType::Q4_0 => Some("q4_0"),
        DType::Q4_K => Some("q4_k"),
        DType::Q6_K => Some("q6_k"),
        DType::F32 | DType::F16 | DType::BF16 => None,
    }
}

/// The kernel for a path and a quantized W: `quant_decode_*` (m <= 8) or `quant_linear_*`.
pub fn kernel(path: Path, w: DType) -> Result<&'static str> {
    Ok(match (path, w) {
        (Path::Decode, DType::Q8_0) => "quant_decode_q8_0",
        (Path::Decode, DType::Q4_0) => "quant_decode_q4_0",
        (Path::Decode, DType::Q4_K) => "quant_decode_q4_k",
        (Path::Decode, DType::Q6_K) => "quant_decode_q6_k",
        (Path::Tile, DType::Q8_0) => "quant_linear_q8_0",
        (Path::Tile, DType::Q4_0) => "quant_linear_q4_0",
        (Path::Tile, DType::Q4_K) => "quant_linear_q4_k",
        (Path::Tile, DType::Q6_K) => "quant_linear_q6_k",
        _ => {
            return Err(Error::internal(format!(
                "no quantized kernel for {path:?} with w {}",
                w.name()
            )))
        }
    })
}

/// Quantized W never takes the tensor-core path (its tiles are dequantized to f32).
pub fn path(m: usize) -> Path {
    launch::choose_path(m, false)
}

/// Every quantized kernel name (all SMs: compute_70 and up).
pub fn kernels_for_sm(_sm: u32) -> Vec<String> {
    let mut v = Vec::new();
    for d in DType::QUANT {
        let s = suffix(d).expect("quantized");
        v.push(format!("quant_decode_{s}"));
        v.push(format!("quant_linear_{s}"));
    }
    v
}

/// The kernels read Q8_0 / Q4_0 / Q6_K blocks with 16-bit loads and Q4_K with 32-bit loads: W
/// must be 2- or 4-byte aligned (rows then are too: 34, 18, 210 and 144 bytes per block). GGUF tensors and
/// device allocations are far more aligned than that.
pub fn w_aligned(addr: u64, w: DType) -> bool {
    match w {
        DType::Q4_K => addr.is_multiple_of(4),
        _ => addr.is_multiple_of(2),
    }
}

/// Checks W for the quantized kernels: alignment and the block multiple of cols / ld.
pub fn check_w(addr: u64, cols: usize, ld: usize, w: DType) -> Result<()> {
    crate::matrix::check_blocks("w", cols, ld, w)?;
    if !w_aligned(addr, w) {
        return Err(Error::unsupported(format!(
            "w is {} at {addr:#x}: the CUDA kernels need its data {}-byte aligned",
            w.name(),
            if w == DType::Q4_K { 4 } else { 2 }
        )));
    }
    Ok(())
}

/// x elements per row one decode block stages at a time (`quant_stage` in quant_linear.cu).
pub fn stage(m: usize) -> usize {
    STAGE_FLOATS / m.max(1) / K_ALIGN * K_ALIGN
}

/// A decode launch: the split of K across grid.y and the launch geometry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub split: DecodeSplit,
    pub geometry: Geometry,
}

impl DecodePlan {
    /// With one split the decode kernel adds bias and expand and stores y itself; with more,
    /// decode_epilogue does after it (and partial sums need scratch).
    pub fn needs_epilogue(&self) -> bool {
        self.split.splits > 1
    }
    /// f32 partial sums the scratch must hold.
    pub fn partial_elems(&self, m: usize, n: usize) -> usize {
        if self.needs_epilogue() {
            self.split.splits * m * n
        } else {
            0
        }
    }
}

/// K is split only for parallelism: until the column blocks and splits give about two blocks per
/// SM, never below 256 elements per split. Shared memory does not bound the split (x is staged
/// in chunks inside it), so wide layers run as one split and finish in the decode CTA.
pub fn decode_plan(m: usize, n: usize, k: usize, sm_count: usize) -> Result<DecodePlan> {
    if m == 0 || m > launch::DECODE_MAX_M {
        return Err(Error::internal(format!("quantized decode with m = {m}")));
    }
    let col_blocks = n.max(1).div_ceil(DECODE_COLS);
    let want_splits = (2 * sm_count.max(1)).div_ceil(col_blocks).max(1);
    let k_aligned = k.div_ceil(K_ALIGN).max(1) * K_ALIGN;
    let k_chunk = k_aligned.div_ceil(want_splits).div_ceil(K_ALIGN) * K_ALIGN;
    let splits = if k == 0 { 1 } else { k.div_ceil(k_chunk) };
    if splits > GRID_YZ_MAX || k_chunk > i32::MAX as usize {
        return Err(Error::unsupported(format!(
            "quantized decode: k = {k} needs {splits} splits (at most {GRID_YZ_MAX})"
        )));
    }
    let shared = m * k_chunk.min(stage(m)) * 4;
    let grid_x = u32::try_from(n.div_ceil(DECODE_COLS))
        .ok()
        .filter(|&g| g > 0)
        .ok_or_else(|| {
            Error::unsupported(format!("quantized decode: n = {n} is outside the grid"))
        })?;
    Ok(DecodePlan {
        split: DecodeSplit { k_chunk, splits },
        geometry: Geometry {
            grid: (grid_x, splits as u32, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: shared as u32,
        },
    })
}

/// quant_linear: grid (ceil(n / 64), ceil(m / 64)), block 256, static shared memory only.
pub fn tile_geometry(m: usize, n: usize) -> Result<Geometry> {
    let x = u32::try_from(n.div_ceil(TILE_BN)).ok().filter(|&g| g > 0);
    let y = Some(m.div_ceil(TILE_BM))
        .filter(|&g| g > 0 && g <= GRID_YZ_MAX)
        .map(|g| g as u32);
    match (x, y) {
        (Some(x), Some(y)) => Ok(Geometry {
            grid: (x, y, 1),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        }),
        _ => Err(Error::unsupported(format!(
            "quant_linear: {m} x {n} is outside the grid"
        ))),
    }
}

impl CudaBackend {
    /// Launches the base kernel of a quantized W (the shrink has run): decode, plus the dense
    /// epilogue when K is split, or the GEMM tile. `partial` is scratch for the split sums (used
    /// only when the plan has several splits; the caller sized it with the same plan).
    pub(super) fn run_quant(
        &self,
        params: &mut LinearParams,
        path: Path,
        partial: *mut f32,
        (w, y): (DType, DType),
        (m, n, k): (usize, usize, usize),
    ) -> Result<()> {
        match path {
            Path::Decode => {
                let plan = decode_plan(m, n, k, self.info.sm_count)?;
                params.k_chunk = plan.split.k_chunk as i32;
                params.splits = plan.split.splits as i32;
                if plan.needs_epilogue() {
                    params.partial = partial;
                }
                self.launch(kernel(Path::Decode, w)?, plan.geometry, params)?;
                if plan.needs_epilogue() {
                    let g = launch::epilogue_geometry(m, n)?;
                    self.launch(launch::epilogue_kernel(y), g, params)?;
                }
                Ok(())
            }
            Path::Tile | Path::Mma => {
                self.launch(kernel(Path::Tile, w)?, tile_geometry(m, n)?, params)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::SplitMix64;
    use half::f16;

    #[test]
    fn kernel_names_and_paths() {
        for d in DType::QUANT {
            let dec = kernel(Path::Decode, d).unwrap();
            let gemm = kernel(Path::Tile, d).unwrap();
            assert!(dec.starts_with("quant_decode_") && gemm.starts_with("quant_linear_"));
            assert!(kernel(Path::Mma, d).is_err());
            for sm in [70, 75, 80, 87, 90] {
                let names = kernels_for_sm(sm);
                assert!(names.iter().any(|n| n == dec) && names.iter().any(|n| n == gemm));
                assert!(launch::kernels_for_sm(sm).iter().any(|n| n == dec));
            }
            assert_eq!(launch::base_kernel(Path::Decode, d).unwrap(), dec);
            assert_eq!(launch::base_kernel(Path::Tile, d).unwrap(), gemm);
        }
        assert!(kernel(Path::Decode, DType::F16).is_err());
        for m in 1..=8 {
            assert_eq!(path(m), Path::Decode);
        }
        assert_eq!(path(9), Path::Tile);
        assert_eq!(path(4096), Path::Tile);
    }

    #[test]
    fn alignment_and_blocks() {
        assert!(w_aligned(0x1002, DType::Q8_0) && w_aligned(0x1002, DType::Q4_0));
        assert!(!w_aligned(0x1001, DType::Q4_0));
        assert!(!w_aligned(0x1002, DType::Q4_K) && w_aligned(0x1004, DType::Q4_K));
        assert!(check_w(0x1000, 64, 96, DType::Q8_0).is_ok());
        assert_eq!(
            check_w(0x1000, 48, 96, DType::Q8_0).unwrap_err().status,
            crate::Status::Shape
        );
        assert_eq!(
            check_w(0x1002, 256, 256, DType::Q4_K).unwrap_err().status,
            crate::Status::Unsupported
        );
        // Row strides keep the alignment of W.
        assert_eq!(DType::Q8_0.size() % 2, 0);
        assert_eq!(DType::Q4_0.size() % 2, 0);
        assert_eq!(DType::Q4_K.size() % 4, 0);
    }

    #[test]
    fn stage_matches_the_kernel() {
        let src = include_str!("../../../kernels/quant_linear.cu");
        assert!(src.contains(&format!("#define QD_STAGE_FLOATS {STAGE_FLOATS}")));
        assert!(src.contains("return QD_STAGE_FLOATS / m / 256 * 256;"));
        assert_eq!(
            (1..=8).map(stage).collect::<Vec<_>>(),
            vec![8192, 4096, 2560, 2048, 1536, 1280, 1024, 1024]
        );
    }

    /// Splits cover K in whole 256-element units (whole Q4_K super-blocks, whole groups of 32),
    /// shared memory stays within 32 KiB, every output column is covered.
    #[test]
    fn decode_plans_cover_k_and_n() {
        for m in 1..=8usize {
            for k in [0usize, 32, 96, 256, 288, 4096, 11008, 14336, 65536] {
                for n in [1usize, 15, 16, 17, 4096, 11008, 128256] {
                    for sms in [8usize, 16, 108, 132] {
                        let p = decode_plan(m, n, k, sms).unwrap();
                        let s = p.split;
                        assert_eq!(s.k_chunk % K_ALIGN, 0);
                        assert!(s.k_chunk >= K_ALIGN);
                        assert!(s.splits * s.k_chunk >= k, "{m} {n} {k} {s:?}");
                        assert!(
                            k == 0 || (s.splits - 1) * s.k_chunk < k,
                            "{m} {n} {k} {s:?}"
                        );
                        let g = p.geometry;
                        assert!(g.shared_bytes as usize <= 32 * 1024);
                        assert_eq!(g.shared_bytes as usize, m * s.k_chunk.min(stage(m)) * 4);
                        assert_eq!(g.grid.1 as usize, s.splits);
                        assert!(g.grid.0 as usize * DECODE_COLS >= n);
                        assert!((g.grid.0 as usize - 1) * DECODE_COLS < n);
                        assert_eq!(g.block, (256, 1, 1));
                        assert_eq!(p.partial_elems(m, n) > 0, s.splits > 1);
                    }
                }
            }
        }
        // The decode shape: one split, so bias and expand finish in the decode CTA.
        for m in 1..=8 {
            let p = decode_plan(m, 11008, 4096, 132).unwrap();
            assert_eq!(p.split.splits, 1);
            assert!(!p.needs_epilogue());
        }
        // Few columns: K is split for parallelism.
        assert!(decode_plan(1, 16, 8192, 132).unwrap().split.splits > 1);
        assert!(decode_plan(9, 16, 256, 1).is_err());
        assert!(decode_plan(0, 16, 256, 1).is_err());
    }

    #[test]
    fn gemm_tiles_cover_outputs() {
        for m in [9usize, 63, 64, 65, 512, 4097] {
            for n in [1usize, 65, 11008] {
                let g = tile_geometry(m, n).unwrap();
                assert!(g.grid.0 as usize * TILE_BN >= n && (g.grid.0 as usize - 1) * TILE_BN < n);
                assert!(g.grid.1 as usize * TILE_BM >= m && (g.grid.1 as usize - 1) * TILE_BM < m);
                assert_eq!(g.block, (256, 1, 1));
            }
        }
        assert!(tile_geometry(64 * 65536, 5).is_err());
        assert!(tile_geometry(0, 5).is_err());
    }

    /// kernels/emu/quant_vectors.txt: blocks and their dequantized f32 bits from src/quant.rs.
    /// The emulator test (kernels/emu/quant_test.cpp) requires its own reference and the
    /// kernels' block decoder to reproduce them bit for bit, which ties the CUDA layouts to the
    /// CPU's. Regenerate with `RANKFUSE_BLESS=1 cargo test --features cuda --lib emulator_vectors`.
    fn vectors() -> String {
        let mut rng = SplitMix64::new(0x5eed_0014);
        let mut out = String::from(
            "# <type> <block bytes, hex> <f32 bits of each dequantized weight, hex>: written by \
             src/backend/cuda/quant.rs (emulator_vectors_are_src_quant) from src/quant.rs\n",
        );
        for d in DType::QUANT {
            for blk in 0..4 {
                let mut b: Vec<u8> = (0..d.size()).map(|_| rng.next_u64() as u8).collect();
                // Finite scales of both signs (block 3 keeps a random d: large magnitudes too,
                // unless it decodes to a NaN / inf).
                let scale = [0.0125f32, -0.75, 3.0e-5, f32::NAN][blk];
                let at = if d == DType::Q6_K { 208 } else { 0 };
                if !scale.is_nan() || !f16::from_le_bytes([b[at], b[at + 1]]).is_finite() {
                    let s = if scale.is_nan() { 0.5 } else { scale };
                    b[at..at + 2].copy_from_slice(&f16::from_f32(s).to_le_bytes());
                }
                if d == DType::Q4_K && !f16::from_le_bytes([b[2], b[3]]).is_finite() {
                    b[2..4].copy_from_slice(&f16::from_f32(0.01).to_le_bytes());
                }
                let mut y = vec![0f32; d.block_elems()];
                // SAFETY: b holds exactly one block of d.
                unsafe { crate::quant::dequant(b.as_ptr(), d, &mut y) };
                out.push_str(d.name());
                out.push(' ');
                for v in &b {
                    out.push_str(&format!("{v:02x}"));
                }
                for v in &y {
                    out.push_str(&format!(" {:08x}", v.to_bits()));
                }
                out.push('\n');
            }
        }
        out
    }

    #[test]
    fn emulator_vectors_are_src_quant() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/emu/quant_vectors.txt");
        let want = vectors();
        if std::env::var_os("RANKFUSE_BLESS").is_some() {
            std::fs::write(path, &want).unwrap();
        }
        let have = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            have == want,
            "{path} is stale: RANKFUSE_BLESS=1 cargo test --features cuda --lib emulator_vectors"
        );
        // Q4_K vectors exercise the high scale bits of sub-blocks 4..8 (get_scale_min_k4).
        assert!(want.lines().filter(|l| l.starts_with("Q4_K")).count() >= 4);
    }
}
