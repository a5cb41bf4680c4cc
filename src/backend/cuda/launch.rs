//! Launch planning for the CUDA kernels: which kernel runs, grid/block/shared-memory sizes, the
//! kernel parameter block, and how a mixed batch is grouped by slot. Pure functions (no driver
//! calls), so all of it is unit-tested on machines without a GPU.
//!
//! Each geometry function mirrors the comment at the top of its kernel in `kernels/*.cu`; the
//! kernels trust what is checked here.

use crate::dtype::DType;
use crate::error::{Error, Result};
use std::ffi::c_void;

/// Most adapter slots one call may use (`RF_MAX_SLOTS` in kernels/common.cuh).
pub(crate) const MAX_SLOTS: usize = 32;
/// Largest m served by the decode (GEMV) kernels.
pub(crate) const DECODE_MAX_M: usize = 8;
/// Threads per block of every kernel.
pub(crate) const BLOCK: u32 = 256;
/// FMA tile kernel: output tile.
pub(crate) const TILE_BM: usize = 64;
pub(crate) const TILE_BN: usize = 64;
/// Tensor-core kernel: output tile.
pub(crate) const MMA_BM: usize = 128;
pub(crate) const MMA_BN: usize = 128;
/// Shrink: tile of 64 rows x 32 components, K in steps of 32.
pub(crate) const SHRINK_ROWS: usize = 64;
pub(crate) const SHRINK_COMPS: usize = 32;
pub(crate) const SHRINK_K_STEP: usize = 32;
/// Shrink: a K split is never shorter than this (keeps the atomics few).
pub(crate) const SHRINK_MIN_K: usize = 64;
/// Decode: output columns per block (8 warps x 2).
pub(crate) const DECODE_COLS: usize = 16;
/// Decode: the x chunk in shared memory is at most this many bytes (m * k_chunk * 4).
pub(crate) const DECODE_SMEM_MAX: usize = 32 * 1024;
/// Decode: k_chunk granularity (keeps every split's W start 16-byte aligned).
pub(crate) const DECODE_K_ALIGN: usize = 256;
/// Largest grid.y / grid.z the driver accepts.
pub(crate) const GRID_YZ_MAX: usize = 65535;

/// dtype numbers of the kernels (`RF_F32`... in common.cuh; same as `rf_dtype`).
pub fn dtype_code(d: DType) -> i32 {
    d as i32
}

fn dtype_suffix(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        // Only W may be block-quantized (LinearProblem::check); its kernels are named in
        // quant.rs. Never asked for: kernels_for_sm walks the dense dtypes here.
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => "quantized",
    }
}

/// Mirrors `struct SlotParams` in kernels/common.cuh (72 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SlotParams {
    pub a: *const c_void,
    pub b: *const c_void,
    pub gains: *const c_void,
    pub lda: i64,
    pub ldb: i64,
    pub rank: i32,
    pub off: i32,
    pub a_dtype: i32,
    pub b_dtype: i32,
    pub gains_dtype: i32,
    pub seg_start: i32,
    pub seg_len: i32,
    pub scale: f32,
}

impl Default for SlotParams {
    fn default() -> Self {
        SlotParams {
            a: std::ptr::null(),
            b: std::ptr::null(),
            gains: std::ptr::null(),
            lda: 0,
            ldb: 0,
            rank: 0,
            off: 0,
            a_dtype: 0,
            b_dtype: 0,
            gains_dtype: -1,
            seg_start: 0,
            seg_len: 0,
            scale: 0.0,
        }
    }
}

/// Mirrors `struct LinearParams` in kernels/common.cuh (152 + 72 * MAX_SLOTS bytes); passed by
/// value to every kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct LinearParams {
    pub x: *const c_void,
    pub w: *const c_void,
    pub bias: *const c_void,
    pub y: *mut c_void,
    pub t: *mut f32,
    pub row_slot: *const i32,
    pub perm: *const i32,
    pub partial: *mut f32,
    pub ldx: i64,
    pub ldw: i64,
    pub ldy: i64,
    pub ldt: i64,
    pub m: i32,
    pub n: i32,
    pub k: i32,
    pub x_dtype: i32,
    pub w_dtype: i32,
    pub bias_dtype: i32,
    pub y_dtype: i32,
    pub n_slots: i32,
    pub total_rank: i32,
    pub k_chunk: i32,
    pub splits: i32,
    pub vec_ok: i32,
    pub shrink_k_chunk: i32,
    pub shrink_c_chunks: i32,
    pub slots: [SlotParams; MAX_SLOTS],
}

const _: () = assert!(std::mem::size_of::<SlotParams>() == 72);
const _: () = assert!(std::mem::size_of::<LinearParams>() == 152 + 72 * MAX_SLOTS);
// The driver copies kernel parameters into a 4 KiB constant bank on CUDA 12.0 drivers.
const _: () = assert!(std::mem::size_of::<LinearParams>() <= 4096);

impl Default for LinearParams {
    fn default() -> Self {
        LinearParams {
            x: std::ptr::null(),
            w: std::ptr::null(),
            bias: std::ptr::null(),
            y: std::ptr::null_mut(),
            t: std::ptr::null_mut(),
            row_slot: std::ptr::null(),
            perm: std::ptr::null(),
            partial: std::ptr::null_mut(),
            ldx: 0,
            ldw: 0,
            ldy: 0,
            ldt: 0,
            m: 0,
            n: 0,
            k: 0,
            x_dtype: 0,
            w_dtype: 0,
            bias_dtype: -1,
            y_dtype: 0,
            n_slots: 0,
            total_rank: 0,
            k_chunk: 0,
            splits: 0,
            vec_ok: 0,
            shrink_k_chunk: 0,
            shrink_c_chunks: 0,
            slots: [SlotParams::default(); MAX_SLOTS],
        }
    }
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_bytes: u32,
}

impl Geometry {
    pub fn blocks(&self) -> u64 {
        self.grid.0 as u64 * self.grid.1 as u64 * self.grid.2 as u64
    }
}

fn div_up(a: usize, b: usize) -> usize {
    a.div_ceil(b)
}

fn grid_dim(v: usize, max: usize, what: &str) -> Result<u32> {
    if v == 0 || v > max {
        return Err(Error::unsupported(format!(
            "{what}: grid dimension {v} is outside 1..={max}"
        )));
    }
    Ok(v as u32)
}

/// Sizes must fit the kernels' 32-bit indices (row, column and k counters are `int`).
pub fn check_dims(m: usize, n: usize, k: usize) -> Result<()> {
    for (name, v) in [("m", m), ("n", n), ("k", k)] {
        if v > i32::MAX as usize {
            return Err(Error::unsupported(format!(
                "{name} = {v} exceeds the CUDA kernels' limit of {}",
                i32::MAX
            )));
        }
    }
    Ok(())
}

/// Which kernel computes the base product (and expand).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// m <= 8: split-K GEMV + epilogue.
    Decode,
    /// sm_80+, x and W both f16 or both bf16, 16-byte aligned rows: tensor cores.
    Mma,
    /// Everything else: FMA tiles (f32, mixed x/W dtypes, sm_70..75, unaligned data).
    Tile,
}

/// Can the tensor-core kernel take this problem? (its preconditions, see fused_linear_mma.cu)
pub fn mma_eligible(
    sm: u32,
    x_dtype: DType,
    w_dtype: DType,
    x_addr: u64,
    ldx: usize,
    w_addr: u64,
    ldw: usize,
) -> bool {
    sm >= 80
        && x_dtype == w_dtype
        && matches!(w_dtype, DType::F16 | DType::BF16)
        && x_addr.is_multiple_of(16)
        && w_addr.is_multiple_of(16)
        && ldx.is_multiple_of(8)
        && ldw.is_multiple_of(8)
}

/// Chooses the path for a problem of m rows.
pub fn choose_path(m: usize, mma_ok: bool) -> Path {
    if m <= DECODE_MAX_M {
        Path::Decode
    } else if mma_ok {
        Path::Mma
    } else {
        Path::Tile
    }
}

/// The base kernel's name for a path and W dtype (`<op>_<dtype>`).
pub fn base_kernel(path: Path, w_dtype: DType) -> Result<&'static str> {
    Ok(match (path, w_dtype) {
        (Path::Decode, DType::F32) => "decode_linear_f32",
        (Path::Decode, DType::F16) => "decode_linear_f16",
        (Path::Decode, DType::BF16) => "decode_linear_bf16",
        (Path::Tile, DType::F32) => "fused_linear_f32",
        (Path::Tile, DType::F16) => "fused_linear_f16",
        (Path::Tile, DType::BF16) => "fused_linear_bf16",
        (Path::Mma, DType::F16) => "fused_linear_mma_f16",
        (Path::Mma, DType::BF16) => "fused_linear_mma_bf16",
        (Path::Mma, DType::F32) => {
            return Err(Error::internal(
                "no tensor-core kernel for f32 (mma_eligible must reject it)",
            ))
        }
        (_, DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K) => {
            return super::quant::kernel(path, w_dtype)
        }
    })
}

/// The decode epilogue for y's dtype.
pub fn epilogue_kernel(y_dtype: DType) -> &'static str {
    match y_dtype {
        DType::F32 => "decode_epilogue_f32",
        DType::F16 => "decode_epilogue_f16",
        DType::BF16 => "decode_epilogue_bf16",
        // y is never quantized (LinearProblem::check).
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => unreachable!("a quantized y"),
    }
}

/// The shrink kernel for x's dtype.
pub fn shrink_kernel(x_dtype: DType) -> &'static str {
    match x_dtype {
        DType::F32 => "lora_shrink_f32",
        DType::F16 => "lora_shrink_f16",
        DType::BF16 => "lora_shrink_bf16",
        // x is never quantized (LinearProblem::check).
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => unreachable!("a quantized x"),
    }
}

/// Every kernel name the host can ask for on a device of compute capability `sm`.
pub fn kernels_for_sm(sm: u32) -> Vec<String> {
    let mut v = Vec::new();
    for d in DType::ALL {
        let s = dtype_suffix(d);
        v.push(format!("lora_shrink_{s}"));
        v.push(format!("fused_linear_{s}"));
        v.push(format!("decode_linear_{s}"));
        v.push(format!("decode_epilogue_{s}"));
        if sm >= 80 && d != DType::F32 {
            v.push(format!("fused_linear_mma_{s}"));
        }
    }
    v.extend(super::quant::kernels_for_sm(sm));
    v
}

/// FMA tile kernel: grid (ceil(n/64), ceil(m/64)), block 256, static shared memory only.
pub fn tile_geometry(m: usize, n: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (
            grid_dim(div_up(n, TILE_BN), u32::MAX as usize, "fused_linear (n)")?,
            grid_dim(div_up(m, TILE_BM), GRID_YZ_MAX, "fused_linear (m)")?,
            1,
        ),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// Tensor-core kernel: grid (ceil(n/128), ceil(m/128)), block 256, 40 KiB static shared memory.
pub fn mma_geometry(m: usize, n: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (
            grid_dim(div_up(n, MMA_BN), u32::MAX as usize, "fused_linear_mma (n)")?,
            grid_dim(div_up(m, MMA_BM), GRID_YZ_MAX, "fused_linear_mma (m)")?,
            1,
        ),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// How the shrink is split: K elements per block and 32-component chunks of the largest rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShrinkSplit {
    pub k_chunk: usize,
    pub k_splits: usize,
    pub c_chunks: usize,
}

/// Shrink: grid (ceil(longest segment / 64), active slots, c_chunks * k_splits), block 256. K is
/// split (results added with atomics into the zeroed T) until there are about two blocks per SM,
/// never below 64 elements per split.
pub fn shrink_geometry(
    max_seg_len: usize,
    n_slots: usize,
    max_rank: usize,
    k: usize,
    sm_count: usize,
) -> Result<(Geometry, ShrinkSplit)> {
    if n_slots == 0 || n_slots > MAX_SLOTS || max_rank == 0 {
        return Err(Error::internal(format!(
            "shrink launched with {n_slots} slots (1..={MAX_SLOTS}), max rank {max_rank}"
        )));
    }
    let row_tiles = div_up(max_seg_len, SHRINK_ROWS);
    let c_chunks = div_up(max_rank, SHRINK_COMPS);
    let base_blocks = row_tiles * n_slots * c_chunks;
    let want = div_up(2 * sm_count.max(1), base_blocks.max(1));
    let k_splits_max = div_up(k.max(1), SHRINK_MIN_K);
    let splits = want.clamp(1, k_splits_max);
    let k_chunk = div_up(div_up(k.max(1), splits), SHRINK_K_STEP) * SHRINK_K_STEP;
    let k_splits = div_up(k.max(1), k_chunk);
    let z = c_chunks
        .checked_mul(k_splits)
        .filter(|&z| z <= GRID_YZ_MAX)
        .ok_or_else(|| Error::unsupported("shrink: rank x K splits exceed the grid"))?;
    Ok((
        Geometry {
            grid: (
                grid_dim(row_tiles, u32::MAX as usize, "lora_shrink (rows)")?,
                n_slots as u32,
                z as u32,
            ),
            block: (BLOCK, 1, 1),
            shared_bytes: 0,
        },
        ShrinkSplit {
            k_chunk,
            k_splits,
            c_chunks,
        },
    ))
}

/// How decode splits K: `k_chunk` elements per split (a multiple of 256, with m * k_chunk f32 in
/// at most 32 KiB of shared memory) and the number of splits. Aims for about two blocks per SM
/// (`sm_count`) without splitting K below 256 elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeSplit {
    pub k_chunk: usize,
    pub splits: usize,
}

pub fn decode_split(m: usize, n: usize, k: usize, sm_count: usize) -> Result<DecodeSplit> {
    if m == 0 || m > DECODE_MAX_M {
        return Err(Error::internal(format!("decode with m = {m}")));
    }
    if k == 0 {
        return Ok(DecodeSplit {
            k_chunk: DECODE_K_ALIGN,
            splits: 1,
        });
    }
    // Largest chunk the shared memory allows, rounded down to the alignment.
    let max_chunk = (DECODE_SMEM_MAX / (4 * m)) / DECODE_K_ALIGN * DECODE_K_ALIGN;
    let col_blocks = div_up(n.max(1), DECODE_COLS);
    let want_blocks = 2 * sm_count.max(1);
    let want_splits = div_up(want_blocks, col_blocks).max(1);
    let k_aligned = div_up(k, DECODE_K_ALIGN) * DECODE_K_ALIGN;
    // Chunk for the wanted split count, never below one alignment unit nor above the maximum.
    let chunk = (div_up(div_up(k_aligned, want_splits), DECODE_K_ALIGN) * DECODE_K_ALIGN)
        .clamp(DECODE_K_ALIGN, max_chunk);
    let splits = div_up(k, chunk);
    if splits > GRID_YZ_MAX {
        return Err(Error::unsupported(format!(
            "decode: k = {k} needs {splits} splits (more than {GRID_YZ_MAX})"
        )));
    }
    Ok(DecodeSplit {
        k_chunk: chunk,
        splits,
    })
}

/// decode_linear: grid (ceil(n/16), splits), block 256, dynamic shared memory m * k_chunk * 4.
pub fn decode_geometry(m: usize, n: usize, split: DecodeSplit) -> Result<Geometry> {
    let smem = m * split.k_chunk * 4;
    if smem > DECODE_SMEM_MAX || !split.k_chunk.is_multiple_of(DECODE_K_ALIGN) {
        return Err(Error::internal(format!(
            "decode split {split:?} breaks the kernel's limits for m = {m}"
        )));
    }
    Ok(Geometry {
        grid: (
            grid_dim(
                div_up(n, DECODE_COLS),
                u32::MAX as usize,
                "decode_linear (n)",
            )?,
            grid_dim(split.splits, GRID_YZ_MAX, "decode_linear (splits)")?,
            1,
        ),
        block: (BLOCK, 1, 1),
        shared_bytes: smem as u32,
    })
}

/// decode_epilogue: grid (ceil(n/256), m), block 256.
pub fn epilogue_geometry(m: usize, n: usize) -> Result<Geometry> {
    Ok(Geometry {
        grid: (
            grid_dim(
                div_up(n, BLOCK as usize),
                u32::MAX as usize,
                "decode_epilogue (n)",
            )?,
            grid_dim(m, GRID_YZ_MAX, "decode_epilogue (m)")?,
            1,
        ),
        block: (BLOCK, 1, 1),
        shared_bytes: 0,
    })
}

/// Decode may use 128-bit loads of W when every row (and so every split, k_chunk being a
/// multiple of 256) starts 16-byte aligned.
pub fn decode_vec_ok(w_addr: u64, ldw: usize, w_dtype: DType) -> bool {
    w_addr.is_multiple_of(16) && (ldw * w_dtype.size()).is_multiple_of(16)
}

/// Rows of a call grouped by slot (SGMV): `perm` lists rows slot by slot, `segments[s]` =
/// (start, len) into `perm` for active slot s, `row_slot` maps each row to its active-slot index
/// (or -1). `active[s]` = the caller's slot index behind active slot s.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grouping {
    pub active: Vec<usize>,
    /// None in stacked mode (every slot applies to rows 0..m; perm is the identity).
    pub perm: Option<Vec<i32>>,
    pub row_slot: Option<Vec<i32>>,
    pub segments: Vec<(usize, usize)>,
}

/// Groups rows by slot. `present[s]` = slot s has an adapter. Slots without rows (mixed mode) or
/// without an adapter are dropped, so they cost nothing. Fails when more than MAX_SLOTS remain.
pub fn group_rows(m: usize, present: &[bool], row_slot: Option<&[i32]>) -> Result<Grouping> {
    let active: Vec<usize> = match row_slot {
        None => (0..present.len()).filter(|&s| present[s]).collect(),
        Some(rs) => {
            let mut used = vec![false; present.len()];
            for &s in rs {
                if s >= 0 && (s as usize) < present.len() && present[s as usize] {
                    used[s as usize] = true;
                }
            }
            (0..present.len()).filter(|&s| used[s]).collect()
        }
    };
    if active.len() > MAX_SLOTS {
        return Err(Error::unsupported(format!(
            "CUDA backend: {} adapter slots in one call; at most {MAX_SLOTS} are supported",
            active.len()
        )));
    }
    let Some(rs) = row_slot else {
        return Ok(Grouping {
            segments: vec![(0, m); active.len()],
            active,
            perm: None,
            row_slot: None,
        });
    };
    let mut compact = vec![-1i32; present.len()];
    for (i, &s) in active.iter().enumerate() {
        compact[s] = i as i32;
    }
    let mapped: Vec<i32> = rs
        .iter()
        .map(|&s| {
            if s >= 0 && (s as usize) < compact.len() {
                compact[s as usize]
            } else {
                -1
            }
        })
        .collect();
    let mut counts = vec![0usize; active.len()];
    for &s in &mapped {
        if s >= 0 {
            counts[s as usize] += 1;
        }
    }
    let mut segments = Vec::with_capacity(active.len());
    let mut start = 0;
    for &c in &counts {
        segments.push((start, c));
        start += c;
    }
    let mut fill: Vec<usize> = segments.iter().map(|s| s.0).collect();
    let mut perm = vec![0i32; start];
    for (i, &s) in mapped.iter().enumerate() {
        if s >= 0 {
            perm[fill[s as usize]] = i as i32;
            fill[s as usize] += 1;
        }
    }
    Ok(Grouping {
        active,
        perm: Some(perm),
        row_slot: Some(mapped),
        segments,
    })
}

/// Column offsets of each active slot in T (ranks concatenated, no padding) and the total.
pub fn rank_offsets(ranks: &[usize]) -> Result<(Vec<usize>, usize)> {
    let mut offs = Vec::with_capacity(ranks.len());
    let mut total = 0usize;
    for &r in ranks {
        offs.push(total);
        total = total
            .checked_add(r)
            .filter(|&t| t <= i32::MAX as usize)
            .ok_or_else(|| Error::unsupported("sum of adapter ranks is too large"))?;
    }
    Ok((offs, total))
}

/// Byte layout of one call's scratch allocation (each piece 256-byte aligned).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scratch {
    pub total: usize,
    pub t: usize,
    pub row_slot: usize,
    pub perm: usize,
    pub partial: usize,
    /// (offset, bytes) of each uploaded host tensor, in request order.
    pub uploads: Vec<(usize, usize)>,
}

pub fn scratch_layout(
    m: usize,
    total_rank: usize,
    mixed: bool,
    partial_elems: usize,
    uploads: &[usize],
) -> Result<Scratch> {
    let mut off = 0usize;
    let mut take = |bytes: usize| -> Result<usize> {
        let at = off;
        off = off
            .checked_add(bytes.div_ceil(256) * 256)
            .ok_or_else(|| Error::oom("scratch size overflows"))?;
        Ok(at)
    };
    let t = take(m * total_rank * 4)?;
    let row_slot = take(if mixed { m * 4 } else { 0 })?;
    let perm = take(if mixed { m * 4 } else { 0 })?;
    let partial = take(partial_elems * 4)?;
    let mut ups = Vec::with_capacity(uploads.len());
    for &b in uploads {
        ups.push((take(b)?, b));
    }
    Ok(Scratch {
        total: off,
        t,
        row_slot,
        perm,
        partial,
        uploads: ups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;

    #[test]
    fn params_layout_matches_common_cuh() {
        // Offsets as laid out by the C++ struct (natural alignment, 8-byte pointers).
        assert_eq!(offset_of!(LinearParams, ldx), 64);
        assert_eq!(offset_of!(LinearParams, m), 96);
        assert_eq!(offset_of!(LinearParams, vec_ok), 140);
        assert_eq!(offset_of!(LinearParams, shrink_c_chunks), 148);
        assert_eq!(offset_of!(LinearParams, slots), 152);
        assert_eq!(offset_of!(SlotParams, lda), 24);
        assert_eq!(offset_of!(SlotParams, rank), 40);
        assert_eq!(offset_of!(SlotParams, scale), 68);
        let h = include_str!("../../../kernels/common.cuh");
        assert!(h.contains("#define RF_MAX_SLOTS 32"));
        assert!(h.contains("sizeof(SlotParams) == 72"));
        assert!(h.contains("sizeof(LinearParams) == 152 + 72 * RF_MAX_SLOTS"));
    }

    #[test]
    fn paths() {
        let (a, b) = (0x1000u64, 0x2000u64);
        assert!(mma_eligible(80, DType::F16, DType::F16, a, 64, b, 64));
        assert!(mma_eligible(90, DType::BF16, DType::BF16, a, 8, b, 4096));
        assert!(!mma_eligible(75, DType::F16, DType::F16, a, 64, b, 64));
        assert!(!mma_eligible(87, DType::F32, DType::F32, a, 64, b, 64));
        assert!(!mma_eligible(87, DType::F16, DType::BF16, a, 64, b, 64));
        assert!(!mma_eligible(87, DType::F16, DType::F16, a + 2, 64, b, 64));
        assert!(!mma_eligible(87, DType::F16, DType::F16, a, 63, b, 64));
        assert!(!mma_eligible(87, DType::F16, DType::F16, a, 64, b, 60));
        for m in 1..=8 {
            assert_eq!(choose_path(m, true), Path::Decode);
        }
        assert_eq!(choose_path(9, true), Path::Mma);
        assert_eq!(choose_path(9, false), Path::Tile);
        assert!(base_kernel(Path::Mma, DType::F32).is_err());
        assert_eq!(
            base_kernel(Path::Mma, DType::BF16).unwrap(),
            "fused_linear_mma_bf16"
        );
        // Every name a path can produce is in the per-SM kernel list.
        for sm in [70, 72, 75, 80, 86, 87, 89, 90] {
            let names = kernels_for_sm(sm);
            for d in DType::ALL {
                for p in [Path::Decode, Path::Tile, Path::Mma] {
                    if p == Path::Mma && (sm < 80 || d == DType::F32) {
                        continue;
                    }
                    let k = base_kernel(p, d).unwrap();
                    assert!(names.iter().any(|n| n == k), "{k} on sm_{sm}");
                }
                assert!(names.iter().any(|n| n == epilogue_kernel(d)));
                assert!(names.iter().any(|n| n == shrink_kernel(d)));
            }
        }
    }

    /// Every output element is covered exactly once by the tile grids, for many shapes.
    #[test]
    fn tile_grids_cover_outputs() {
        for m in [1usize, 2, 7, 9, 63, 64, 65, 127, 128, 129, 1000, 4097] {
            for n in [1usize, 3, 17, 64, 65, 128, 129, 4095, 11008] {
                let g = tile_geometry(m, n).unwrap();
                assert!(g.grid.0 as usize * TILE_BN >= n && (g.grid.0 as usize - 1) * TILE_BN < n);
                assert!(g.grid.1 as usize * TILE_BM >= m && (g.grid.1 as usize - 1) * TILE_BM < m);
                assert_eq!(g.block, (256, 1, 1));
                let g = mma_geometry(m, n).unwrap();
                assert!(g.grid.0 as usize * MMA_BN >= n && (g.grid.0 as usize - 1) * MMA_BN < n);
                assert!(g.grid.1 as usize * MMA_BM >= m && (g.grid.1 as usize - 1) * MMA_BM < m);
                // Block threads map to 64 x 64 outputs (4 x 4 each) and 8 warps x 64 x 32.
                assert_eq!(256 * 16, TILE_BM * TILE_BN);
                assert_eq!(8 * 64 * 32, MMA_BM * MMA_BN);
            }
        }
        assert!(tile_geometry(0, 5).is_err());
        assert!(mma_geometry(128 * 65536, 5).is_err()); // grid.y limit
    }

    #[test]
    fn decode_splits_cover_k_within_shared_memory() {
        for m in 1..=8usize {
            for k in [
                1usize, 7, 255, 256, 257, 1000, 4096, 4097, 11008, 14336, 65536,
            ] {
                for n in [1usize, 15, 16, 17, 4096, 11008, 128256] {
                    for sms in [8usize, 16, 108, 132] {
                        let s = decode_split(m, n, k, sms).unwrap();
                        assert_eq!(s.k_chunk % DECODE_K_ALIGN, 0);
                        assert!(m * s.k_chunk * 4 <= DECODE_SMEM_MAX, "{m} {k} {s:?}");
                        assert!(s.splits * s.k_chunk >= k, "{m} {n} {k} {s:?}");
                        assert!((s.splits - 1) * s.k_chunk < k, "{m} {n} {k} {s:?}");
                        let g = decode_geometry(m, n, s).unwrap();
                        assert_eq!(g.grid.1 as usize, s.splits);
                        assert!(g.grid.0 as usize * DECODE_COLS >= n);
                        assert_eq!(g.shared_bytes as usize, m * s.k_chunk * 4);
                        let e = epilogue_geometry(m, n).unwrap();
                        assert_eq!(e.grid.1 as usize, m);
                        assert!(e.grid.0 as usize * 256 >= n);
                    }
                }
            }
        }
        // Small n: more splits so the GPU has work; large n: one split is enough.
        let few_cols = decode_split(1, 16, 8192, 132).unwrap();
        assert!(few_cols.splits > 1);
        let many_cols = decode_split(1, 128256, 4096, 132).unwrap();
        assert_eq!(many_cols.splits, 1);
        assert!(decode_split(9, 16, 16, 1).is_err());
        assert!(decode_split(0, 16, 16, 1).is_err());
        assert!(decode_vec_ok(0x100, 4096, DType::BF16));
        assert!(!decode_vec_ok(0x100, 4097, DType::BF16));
        assert!(decode_vec_ok(0x100, 4, DType::F32));
        assert!(!decode_vec_ok(0x104, 4, DType::F32));
    }

    #[test]
    fn shrink_geometry_covers_rows_ranks_and_k() {
        for seg in [1usize, 5, 63, 64, 65, 300, 4096] {
            for slots in [1usize, 3, 16, 32] {
                for rank in [1usize, 8, 16, 31, 32, 33, 64, 128] {
                    for k in [1usize, 31, 64, 100, 4096, 11008] {
                        for sms in [8usize, 132] {
                            let (g, s) = shrink_geometry(seg, slots, rank, k, sms).unwrap();
                            assert_eq!(g.block, (256, 1, 1));
                            assert_eq!(g.grid.1 as usize, slots);
                            assert!(g.grid.0 as usize * SHRINK_ROWS >= seg);
                            assert!((g.grid.0 as usize - 1) * SHRINK_ROWS < seg);
                            assert!(s.c_chunks * SHRINK_COMPS >= rank);
                            assert!((s.c_chunks - 1) * SHRINK_COMPS < rank);
                            assert_eq!(g.grid.2 as usize, s.c_chunks * s.k_splits);
                            assert_eq!(s.k_chunk % SHRINK_K_STEP, 0);
                            // The splits cover K exactly, none of them empty.
                            assert!(s.k_chunk * s.k_splits >= k);
                            assert!(s.k_chunk * (s.k_splits - 1) < k);
                            assert!(s.k_splits == 1 || s.k_chunk >= SHRINK_MIN_K / 2);
                        }
                    }
                }
            }
        }
        // Decode (one row, one slot) splits K for parallelism; a big prefill does not.
        assert!(shrink_geometry(1, 1, 64, 4096, 132).unwrap().1.k_splits > 1);
        assert_eq!(
            shrink_geometry(65536, 1, 16, 4096, 132).unwrap().1.k_splits,
            1
        );
        assert!(shrink_geometry(5, 0, 4, 8, 1).is_err());
        assert!(shrink_geometry(5, MAX_SLOTS + 1, 4, 8, 1).is_err());
        assert!(shrink_geometry(5, 1, 0, 8, 1).is_err());
    }

    #[test]
    fn grouping_stacked_and_mixed() {
        let g = group_rows(5, &[true, false, true], None).unwrap();
        assert_eq!(g.active, vec![0, 2]);
        assert_eq!(g.segments, vec![(0, 5), (0, 5)]);
        assert!(g.perm.is_none() && g.row_slot.is_none());

        // Slot 1 has no adapter, slot 3 no rows: both dropped; rows of a slot stay in order.
        let rs = [2, -1, 0, 2, 1, 0, 2];
        let g = group_rows(7, &[true, false, true, true], Some(&rs)).unwrap();
        assert_eq!(g.active, vec![0, 2]);
        assert_eq!(g.row_slot.as_deref(), Some(&[1, -1, 0, 1, -1, 0, 1][..]));
        assert_eq!(g.perm.as_deref(), Some(&[2, 5, 0, 3, 6][..]));
        assert_eq!(g.segments, vec![(0, 2), (2, 3)]);
    }

    #[test]
    fn grouping_is_a_partition_for_random_batches() {
        let mut rng = crate::rng::SplitMix64::new(7);
        for _ in 0..200 {
            let n_slots = 1 + (rng.next_u64() % 40) as usize;
            let m = 1 + (rng.next_u64() % 300) as usize;
            let present: Vec<bool> = (0..n_slots)
                .map(|_| !rng.next_u64().is_multiple_of(5))
                .collect();
            let rs: Vec<i32> = (0..m)
                .map(|_| (rng.next_u64() % (n_slots as u64 + 1)) as i32 - 1)
                .collect();
            let Ok(g) = group_rows(m, &present, Some(&rs)) else {
                // Only too many active slots may fail.
                let used: std::collections::HashSet<_> = rs
                    .iter()
                    .filter(|&&s| s >= 0 && present[s as usize])
                    .collect();
                assert!(used.len() > MAX_SLOTS);
                continue;
            };
            let perm = g.perm.unwrap();
            let mapped = g.row_slot.unwrap();
            let mut seen = vec![false; m];
            for (a, &(start, len)) in g.segments.iter().enumerate() {
                for &row in &perm[start..start + len] {
                    let row = row as usize;
                    assert!(!seen[row]);
                    seen[row] = true;
                    assert_eq!(mapped[row], a as i32);
                    assert_eq!(rs[row], g.active[a] as i32);
                }
            }
            for i in 0..m {
                let applies = rs[i] >= 0 && present[rs[i] as usize];
                assert_eq!(seen[i], applies);
            }
        }
    }

    #[test]
    fn too_many_slots_is_unsupported() {
        let present = vec![true; MAX_SLOTS + 1];
        let e = group_rows(4, &present, None).unwrap_err();
        assert_eq!(e.status, crate::Status::Unsupported);
        // In a mixed batch only slots with rows count.
        let rs = [0, 5, 7, 0];
        assert_eq!(group_rows(4, &present, Some(&rs)).unwrap().active.len(), 3);
    }

    #[test]
    fn ranks_and_scratch() {
        let (offs, total) = rank_offsets(&[8, 3, 64]).unwrap();
        assert_eq!(offs, vec![0, 8, 11]);
        assert_eq!(total, 75);
        let s = scratch_layout(10, 75, true, 0, &[100, 3]).unwrap();
        assert_eq!(s.t, 0);
        assert_eq!(s.row_slot, 3072);
        assert_eq!(s.perm, 3328);
        assert_eq!(s.uploads, vec![(3584, 100), (3840, 3)]);
        assert_eq!(s.total, 4096);
        for (o, _) in &s.uploads {
            assert_eq!(o % 256, 0);
        }
        assert!(check_dims(1 << 31, 1, 1).is_err());
        assert!(check_dims(4096, 4096, 4096).is_ok());
    }
}
