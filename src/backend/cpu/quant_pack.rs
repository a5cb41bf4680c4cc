//! Block-quantized W (Q4_0, Q8_0) repacked once into 8-row interleaved blocks, the layout the
//! 8-row decode kernels read without shuffles: what `rf_weights_pack` makes of a quantized W.
//! The base is frozen, so the transpose the in-place kernels do per call (8 unpacks and 8
//! scale inserts per 8 rows x 32 weights, `avx2_q8::rows8_q4_0`) is done here once. Same bytes
//! as GGUF (plus zero rows up to a multiple of 8); llama.cpp's CPU "repack" buffers
//! (`block_q4_0x8`) do the same for the same reason.
//!
//! Layout: rows in groups of 8 (the last padded with zero blocks, which decode to 0); group g,
//! block b (32 elements) is one record of `record_bytes(dt)` at `(g * nb + b) * record`:
//! - bytes 0..16: the 8 rows' f16 scales `d`, row r at 2r;
//! - then chunks of 32 bytes, 4 bytes per row: chunk c, bytes 4r..4r+4 are row r's quant
//!   bytes 4c..4c+4 (GGUF order). Q4_0: 4 chunks (16 quant bytes; the low nibbles of chunk c are
//!   elements 4c..4c+4, the high nibbles 16+4c..); Q8_0: 8 chunks (element 4c+t is byte t).
//!
//! So a chunk loaded into a 256-bit register has row r in lane r: integer dot products come out
//! with one row per lane, and the 8 scales are one 16-byte load.

use super::driver::DECODE_MAX_M;
use crate::dtype::DType;
use crate::matrix::MatRef;
use crate::quant::{Q8Rows, Q4_0_BYTES, Q8_0_BYTES, QK};

/// Rows per interleaved group.
pub(crate) const GROUP: usize = 8;

/// Whether `dt` has an interleaved layout (others are refused by `Runtime::pack`).
pub fn supports(dt: DType) -> bool {
    matches!(dt, DType::Q4_0 | DType::Q8_0)
}

/// Bytes of one (group, block) record: 8 scales + 8 rows' quant bytes.
pub fn record_bytes(dt: DType) -> usize {
    match dt {
        DType::Q4_0 => 16 + GROUP * (Q4_0_BYTES - 2),
        DType::Q8_0 => 16 + GROUP * (Q8_0_BYTES - 2),
        _ => unreachable!("no interleaved layout for {}", dt.name()),
    }
}

/// Bytes of the repacked n x k matrix (None on overflow).
pub fn packed_bytes(dt: DType, n: usize, k: usize) -> Option<usize> {
    n.div_ceil(GROUP)
        .checked_mul(k / QK)?
        .checked_mul(record_bytes(dt))
}

/// Writes `w` (Q4_0 / Q8_0, whole blocks) into `dst` (`packed_bytes` long, zeroed) for the
/// groups `g0..g1`.
///
/// # Safety
/// `dst` is the start of the whole pack; groups g0..g1 are written by this call only.
pub unsafe fn pack_groups(w: &MatRef<'_>, g0: usize, g1: usize, dst: *mut u8) {
    let (dt, nb) = (w.dtype, w.cols / QK);
    let (rec, qb) = (record_bytes(dt), dt.size() - 2);
    for g in g0..g1 {
        for r in 0..GROUP.min(w.rows.saturating_sub(g * GROUP)) {
            let row = w.row_ptr(g * GROUP + r);
            for b in 0..nb {
                let src = row.add(b * dt.size());
                let d = dst.add((g * nb + b) * rec);
                std::ptr::copy_nonoverlapping(src, d.add(2 * r), 2);
                for c in 0..qb / 4 {
                    std::ptr::copy_nonoverlapping(
                        src.add(2 + 4 * c),
                        d.add(16 + 32 * c + 4 * r),
                        4,
                    );
                }
            }
        }
    }
}

/// Row r's block in GGUF form (`dt.size()` bytes) from record `rec` (the inverse of
/// `pack_groups`), into `out`.
///
/// # Safety
/// `rec` points at a whole record of `dt`; r < 8.
#[inline]
pub unsafe fn unpack_block(rec: *const u8, dt: DType, r: usize, out: &mut [u8; Q8_0_BYTES]) {
    std::ptr::copy_nonoverlapping(rec.add(2 * r), out.as_mut_ptr(), 2);
    for c in 0..(dt.size() - 2) / 4 {
        std::ptr::copy_nonoverlapping(
            rec.add(16 + 32 * c + 4 * r),
            out.as_mut_ptr().add(2 + 4 * c),
            4,
        );
    }
}

/// Rows `g * 8 .. g * 8 + rows` of the pack back in GGUF row layout (`nb` blocks each) into
/// `buf`; returns the view. The portable decode path and the GEMM path's panel conversion read
/// a pack through this (they dequantize whole blocks anyway; the fast readers are the ISA
/// kernels).
///
/// # Safety
/// `base` is a pack of `dt` with `nb` blocks per row and group g inside it; rows <= 8.
pub unsafe fn group_rows<'b>(
    base: *const u8,
    dt: DType,
    nb: usize,
    g: usize,
    rows: usize,
    buf: &'b mut Vec<u8>,
) -> MatRef<'b> {
    let (rec, bs) = (record_bytes(dt), dt.size());
    buf.clear();
    buf.resize(rows * nb * bs, 0);
    let mut blk = [0u8; Q8_0_BYTES];
    for r in 0..rows {
        for b in 0..nb {
            unpack_block(base.add((g * nb + b) * rec), dt, r, &mut blk);
            buf[(r * nb + b) * bs..(r * nb + b + 1) * bs].copy_from_slice(&blk[..bs]);
        }
    }
    MatRef::from_bytes(buf, dt, rows, nb * QK, nb * QK).expect("whole blocks")
}

thread_local! {
    static GROUP_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One decode call on a pack: rows `j0 .. j0 + rows` (j0 a multiple of 8) of the pack at `base`
/// (`dt` Q4_0 / Q8_0, `nb` blocks per row) against m x rows, exact (`xq` None: x is m rows of
/// nb * 32 floats at stride `x.1`) or as Q8 blocks; `out[i * ldo + j - j0]` = row j . x row i
/// (overwritten).
#[derive(Clone, Copy)]
pub struct QPackGemv<'a> {
    pub base: *const u8,
    pub dt: DType,
    pub nb: usize,
    pub j0: usize,
    pub rows: usize,
    pub x: (*const f32, usize),
    pub xq: Option<&'a Q8Rows>,
    pub m: usize,
    pub out: *mut f32,
    pub ldo: usize,
}

impl QPackGemv<'_> {
    /// The groups the call covers: (group index, its first row's offset from j0, its rows).
    pub fn groups(&self) -> impl Iterator<Item = (usize, usize, usize)> {
        let (j0, rows) = (self.j0, self.rows);
        (0..rows)
            .step_by(GROUP)
            .map(move |j| ((j0 + j) / GROUP, j, GROUP.min(rows - j)))
    }
}

/// Portable decode on a pack (`QPackGemv`): each group is unpacked to GGUF rows and run through
/// the in-place portable kernels, so the pack gives the same results as W itself.
///
/// # Safety
/// As `quant_gemv::gemv_portable` / `gemv_q8_portable` for a W of `c.rows` rows of k = nb * 32
/// elements; `c.base` is a pack of `c.dt` holding those rows; out has m rows of `rows` floats.
pub unsafe fn gemv_portable(c: &QPackGemv<'_>) {
    debug_assert!(c.j0.is_multiple_of(GROUP) && c.m <= DECODE_MAX_M);
    GROUP_BUF.with(|b| {
        let buf = &mut *b.borrow_mut();
        for (g, j, gr) in c.groups() {
            let w = group_rows(c.base, c.dt, c.nb, g, gr, buf);
            let o = c.out.add(j);
            match c.xq {
                Some(xq) => super::quant_gemv::gemv_q8_portable(xq, c.m, &w, o, c.ldo, false),
                None => super::quant_gemv::gemv_portable(c.x.0, c.x.1, c.m, &w, o, c.ldo, false),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{dequant_block, QK_K};
    use crate::rng::SplitMix64;

    #[test]
    fn pack_and_unpack_are_inverse_and_pad_with_zero_blocks() {
        let mut rng = SplitMix64::new(5);
        for dt in [DType::Q4_0, DType::Q8_0] {
            for (n, nb, ldb) in [(1, 1, 1), (8, 3, 4), (13, 2, 2), (17, 5, 6)] {
                let mut wb = vec![0u8; n * ldb * dt.size()];
                for v in wb.iter_mut() {
                    *v = rng.next_u64() as u8;
                }
                let w = MatRef::from_bytes(&wb, dt, n, nb * QK, ldb * QK).unwrap();
                let bytes = packed_bytes(dt, n, nb * QK).unwrap();
                assert_eq!(bytes, n.div_ceil(8) * nb * (16 + 8 * (dt.size() - 2)));
                let mut pk = vec![0u8; bytes];
                unsafe { pack_groups(&w, 0, n.div_ceil(8), pk.as_mut_ptr()) };
                let mut buf = Vec::new();
                for g in 0..n.div_ceil(8) {
                    let v = unsafe { group_rows(pk.as_ptr(), dt, nb, g, 8, &mut buf) };
                    for r in 0..8 {
                        for b in 0..nb {
                            let (mut got, mut want) = ([0f32; QK_K], [0f32; QK_K]);
                            unsafe { dequant_block(v.row_ptr(r), dt, b, &mut got) };
                            if g * 8 + r < n {
                                unsafe { dequant_block(w.row_ptr(g * 8 + r), dt, b, &mut want) };
                                for (a, e) in got.iter().zip(&want) {
                                    assert_eq!(
                                        a.to_bits(),
                                        e.to_bits(),
                                        "{dt:?} n {n} row {} b {b}",
                                        g * 8 + r
                                    );
                                }
                            } else {
                                assert!(got.iter().all(|&a| a == 0.0), "padding row decodes to 0");
                            }
                        }
                    }
                }
            }
        }
    }
}
