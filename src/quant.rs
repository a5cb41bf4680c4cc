//! llama.cpp's block-quantized weight formats (ggml-common.h layouts), decoded exactly as
//! ggml-quants.c's `dequantize_row_*` does: the same f32 operations in the same order (no FMA),
//! so a dequantized value is bit-identical to llama.cpp's and to the `gguf` Python package's.
//!
//! Blocks are read byte-wise (little-endian f16 scales at any address): GGUF aligns tensors,
//! but a block inside a row is 18 or 34 bytes long, so nothing is naturally aligned.

use crate::dtype::DType;
use half::f16;

/// Weights per Q8_0 / Q4_0 block.
pub(crate) const QK: usize = 32;
/// Weights per K-quant super-block.
pub(crate) const QK_K: usize = 256;
/// f16 d, then 32 x i8.
pub(crate) const Q8_0_BYTES: usize = 2 + QK;
/// f16 d, then 16 bytes: byte j holds element j (low nibble) and j + 16 (high nibble).
pub(crate) const Q4_0_BYTES: usize = 2 + QK / 2;
/// f16 d, f16 dmin, 12 bytes of packed 6-bit scales and mins, 128 bytes of nibbles.
pub(crate) const Q4_K_BYTES: usize = 2 + 2 + 12 + QK_K / 2;
/// 128 bytes of low nibbles (ql), 64 bytes of 2-bit high parts (qh), 16 x i8 scales, f16 d.
pub(crate) const Q6_K_BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
/// Byte offsets inside a Q6_K block.
pub(crate) const Q6_K_QH: usize = QK_K / 2;
pub(crate) const Q6_K_SCALES: usize = Q6_K_QH + QK_K / 4;
pub(crate) const Q6_K_D: usize = Q6_K_SCALES + QK_K / 16;

/// Byte offset of a block's f16 scale `d` (Q6_K keeps it last, the others first).
pub fn d_offset(dtype: DType) -> usize {
    if dtype == DType::Q6_K {
        Q6_K_D
    } else {
        0
    }
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// One Q8_0 block: `y[j] = d * q[j]`.
#[inline]
pub fn dequant_q8_0(b: &[u8; Q8_0_BYTES], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for (j, v) in y.iter_mut().enumerate() {
        *v = (b[2 + j] as i8) as f32 * d;
    }
}

/// One Q4_0 block: `y[j] = d * (lo(q[j]) - 8)`, `y[j + 16] = d * (hi(q[j]) - 8)`.
#[inline]
pub fn dequant_q4_0(b: &[u8; Q4_0_BYTES], y: &mut [f32; QK]) {
    let d = f16_at(b, 0);
    for j in 0..QK / 2 {
        let q = b[2 + j];
        y[j] = ((q & 0x0F) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

/// Scale and min of sub-block `j` (0..8) of a Q4_K super-block (`get_scale_min_k4`): the first
/// four are the low 6 bits of bytes 0..4 (scales) and 4..8 (mins); the last four take their low
/// nibbles from bytes 8..12 and their top two bits from the spare bits of bytes 0..8.
#[inline(always)]
pub fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One Q4_K super-block: eight 32-weight sub-blocks, `y = (d * sc) * q - (dmin * m)`; each
/// 32-byte run of nibbles holds sub-block 2i in its low nibbles and 2i + 1 in its high ones.
#[inline]
pub fn dequant_q4_k(b: &[u8; Q4_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    for c in 0..4 {
        let q = &b[16 + 32 * c..16 + 32 * (c + 1)];
        let (sc1, m1) = scale_min_k4(2 * c, scales);
        let (sc2, m2) = scale_min_k4(2 * c + 1, scales);
        let (d1, mn1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, mn2) = (d * sc2 as f32, dmin * m2 as f32);
        let out = &mut y[64 * c..64 * (c + 1)];
        for l in 0..32 {
            out[l] = d1 * (q[l] & 0x0F) as f32 - mn1;
            out[l + 32] = d2 * (q[l] >> 4) as f32 - mn2;
        }
    }
}

/// Where 32-weight group `g` (0..8) of a Q6_K block lives: (offset of its 32 ql bytes, nibble
/// shift (0 or 4), its 32 qh bytes' offset, qh shift (0, 2, 4, 6), index of the scale of its
/// first 16 weights; the next 16 use the next scale). Group g = 4 h + j covers elements
/// 128 h + 32 j .. + 32 (`dequantize_row_q6_K`: q1..q4 of each 128-element half).
#[inline(always)]
pub fn q6_k_group(g: usize) -> (usize, u32, usize, u32, usize) {
    let (h, j) = (g / 4, g % 4);
    (
        64 * h + 32 * (j & 1),
        4 * (j as u32 >> 1),
        Q6_K_QH + 32 * h,
        2 * j as u32,
        8 * h + 2 * j,
    )
}

/// The 6-bit value (0..63) of element `l` (0..32) of Q6_K group `g` (see `q6_k_group`).
#[inline(always)]
pub fn q6_k_q(b: &[u8], g: usize, l: usize) -> u8 {
    let (ql, ls, qh, hs, _) = q6_k_group(g);
    ((b[ql + l] >> ls) & 0x0F) | (((b[qh + l] >> hs) & 3) << 4)
}

/// One Q6_K super-block: `y = (d * sc) * (q - 32)`, sixteen 16-weight scales.
#[inline]
pub fn dequant_q6_k(b: &[u8; Q6_K_BYTES], y: &mut [f32; QK_K]) {
    let d = f16_at(b, Q6_K_D);
    for g in 0..8 {
        let (.., is) = q6_k_group(g);
        for l in 0..32 {
            let sc = b[Q6_K_SCALES + is + l / 16] as i8;
            y[32 * g + l] = d * sc as f32 * (q6_k_q(b, g, l) as i32 - 32) as f32;
        }
    }
}

/// Decodes block `blk` of a row at `p` into `y[..dtype.block_elems()]`.
///
/// # Safety
/// `p` points to at least `blk + 1` blocks of `dtype` (quantized).
#[inline]
pub unsafe fn dequant_block(p: *const u8, dtype: DType, blk: usize, y: &mut [f32; QK_K]) {
    let bytes = dtype.size();
    let b = std::slice::from_raw_parts(p.add(blk * bytes), bytes);
    match dtype {
        DType::Q8_0 => dequant_q8_0(
            b.try_into().expect("Q8_0 block"),
            (&mut y[..QK]).try_into().expect("32"),
        ),
        DType::Q4_0 => dequant_q4_0(
            b.try_into().expect("Q4_0 block"),
            (&mut y[..QK]).try_into().expect("32"),
        ),
        DType::Q4_K => dequant_q4_k(b.try_into().expect("Q4_K block"), y),
        DType::Q6_K => dequant_q6_k(b.try_into().expect("Q6_K block"), y),
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("dense dtype in dequant_block"),
    }
}

/// Element `i` of quantized data starting (block-aligned) at `p`.
///
/// # Safety
/// `p` points to the blocks up to and including the one holding element `i`.
#[inline]
pub unsafe fn load_elem(p: *const u8, dtype: DType, i: usize) -> f32 {
    let be = dtype.block_elems();
    let mut y = [0f32; QK_K];
    dequant_block(p, dtype, i / be, &mut y);
    y[i % be]
}

/// Decodes `dst.len()` elements starting at a block boundary `src` (the last block may be used
/// in part).
///
/// # Safety
/// `src` points to `ceil(dst.len() / block)` blocks of `dtype` (quantized).
pub unsafe fn dequant(src: *const u8, dtype: DType, dst: &mut [f32]) {
    let be = dtype.block_elems();
    let mut y = [0f32; QK_K];
    for (blk, out) in dst.chunks_mut(be).enumerate() {
        dequant_block(src, dtype, blk, &mut y);
        out.copy_from_slice(&y[..out.len()]);
    }
}

/// Decodes elements `c0..c0 + dst.len()` of a row at `row` (any range; partial blocks at both
/// ends are decoded whole and cut).
///
/// # Safety
/// `row` points to a row holding at least `c0 + dst.len()` elements (whole blocks).
pub unsafe fn dequant_range(row: *const u8, dtype: DType, c0: usize, dst: &mut [f32]) {
    let be = dtype.block_elems();
    let mut y = [0f32; QK_K];
    let mut done = 0;
    while done < dst.len() {
        let e = c0 + done;
        let (blk, off) = (e / be, e % be);
        let take = (be - off).min(dst.len() - done);
        dequant_block(row, dtype, blk, &mut y);
        dst[done..done + take].copy_from_slice(&y[off..off + take]);
        done += take;
    }
}

/// x rows quantized for integer dot products with block-quantized W (the opt-in
/// `ActQuant::Q8` mode): per 32 values, `d = max|x| / 127` and `q = round(x / d)`, as
/// llama.cpp's `quantize_row_q8_0`, except that `d` stays f32 (llama.cpp rounds it to f16) and
/// each block also keeps `d * sum(q)` for the min term of Q4_K. Each value is off by at most
/// `d / 2 = max|x| / 254` of its block, so `|w.x - w.x_q| <= sum_b max|x_b| / 254 * sum_b |w|`.
#[derive(Default)]
pub struct Q8Rows {
    /// m rows of k values, row-major (ld = k).
    pub q: Vec<i8>,
    /// m rows of k / 32 scales.
    pub d: Vec<f32>,
    /// m rows of k / 32 values `d * sum(q)`.
    pub ds: Vec<f32>,
    pub k: usize,
}

impl Q8Rows {
    /// Quantizes m rows of k (a multiple of 32) values at stride `ldx`, reusing the buffers.
    pub fn quantize(&mut self, x: &[f32], m: usize, k: usize, ldx: usize) {
        assert!(
            k.is_multiple_of(QK),
            "Q8 activations need k to be a multiple of {QK}"
        );
        let nb = k / QK;
        self.k = k;
        self.q.resize(m * k, 0);
        self.d.resize(m * nb, 0.0);
        self.ds.resize(m * nb, 0.0);
        for i in 0..m {
            let xr = &x[i * ldx..i * ldx + k];
            for b in 0..nb {
                let xb = &xr[b * QK..(b + 1) * QK];
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let qb = &mut self.q[i * k + b * QK..i * k + (b + 1) * QK];
                let mut sum = 0i32;
                for (q, &v) in qb.iter_mut().zip(xb) {
                    // round() is half away from zero, as roundf in ggml; |v * id| <= 127 up to
                    // one rounding of id, and the clamp keeps -128 out (the sign trick of the
                    // AVX2 kernels needs |q| <= 127).
                    *q = (v * id).round().clamp(-127.0, 127.0) as i8;
                    sum += *q as i32;
                }
                self.d[i * nb + b] = d;
                self.ds[i * nb + b] = d * sum as f32;
            }
        }
    }

    /// Row i's quantized values.
    #[inline]
    pub fn row(&self, i: usize) -> &[i8] {
        &self.q[i * self.k..(i + 1) * self.k]
    }
}

/// The exact integer dot of block `b` of a quantized W row with a Q8 x row, as
/// `(sum_of_scaled_int_dots, min_term)` in f64: `w.x_q = first - second`. The reference for the
/// Q8 kernels (the integer parts are exact; only the final scaling rounds).
///
/// # Safety
/// `row` holds block `b` (of `dtype`'s block size) and x covers it.
pub unsafe fn q8_block_dot_f64(
    row: *const u8,
    dtype: DType,
    b: usize,
    x: &Q8Rows,
    i: usize,
) -> f64 {
    let nb = x.k / QK;
    let xq = x.row(i);
    let bytes = dtype.size();
    let blk = std::slice::from_raw_parts(row.add(b * bytes), bytes);
    match dtype {
        DType::Q8_0 => {
            let dw = f16_at(blk, 0) as f64;
            let dot: i32 = (0..QK)
                .map(|j| (blk[2 + j] as i8) as i32 * xq[b * QK + j] as i32)
                .sum();
            dw * x.d[i * nb + b] as f64 * dot as f64
        }
        DType::Q4_0 => {
            let dw = f16_at(blk, 0) as f64;
            let mut dot = 0i32;
            for j in 0..QK / 2 {
                let q = blk[2 + j];
                dot += ((q & 0x0F) as i32 - 8) * xq[b * QK + j] as i32;
                dot += ((q >> 4) as i32 - 8) * xq[b * QK + j + QK / 2] as i32;
            }
            dw * x.d[i * nb + b] as f64 * dot as f64
        }
        DType::Q4_K => {
            let (d, dmin) = (f16_at(blk, 0) as f64, f16_at(blk, 2) as f64);
            let scales = &blk[4..16];
            let mut total = 0f64;
            for c in 0..4 {
                let q = &blk[16 + 32 * c..16 + 32 * (c + 1)];
                for h in 0..2 {
                    let sub = b * (QK_K / QK) + 2 * c + h;
                    let (sc, mn) = scale_min_k4(2 * c + h, scales);
                    let dot: i32 = (0..QK)
                        .map(|l| ((q[l] >> (4 * h)) & 0x0F) as i32 * xq[sub * QK + l] as i32)
                        .sum();
                    total += d * sc as f64 * x.d[i * nb + sub] as f64 * dot as f64
                        - dmin * mn as f64 * x.ds[i * nb + sub] as f64;
                }
            }
            total
        }
        DType::Q6_K => {
            let d = f16_at(blk, Q6_K_D) as f64;
            let mut total = 0f64;
            for g in 0..8 {
                let sub = b * (QK_K / QK) + g;
                let (.., is) = q6_k_group(g);
                for half in 0..2 {
                    let sc = blk[Q6_K_SCALES + is + half] as i8 as f64;
                    let dot: i32 = (16 * half..16 * half + 16)
                        .map(|l| (q6_k_q(blk, g, l) as i32 - 32) * xq[sub * QK + l] as i32)
                        .sum();
                    total += d * sc * x.d[i * nb + sub] as f64 * dot as f64;
                }
            }
            total
        }
        DType::F32 | DType::F16 | DType::BF16 => unreachable!("dense dtype in q8_block_dot_f64"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_0_nibble_order_and_offset() {
        let mut b = [0u8; Q4_0_BYTES];
        b[..2].copy_from_slice(&f16::from_f32(0.5).to_bits().to_le_bytes());
        b[2] = 0xF0; // element 0 = 0 - 8, element 16 = 15 - 8
        let mut y = [0f32; QK];
        dequant_q4_0(&b, &mut y);
        assert_eq!((y[0], y[16], y[1]), (-4.0, 3.5, -4.0));
    }

    #[test]
    fn q6_k_layout() {
        // Element 64 + 5 (group 2: ql[5] high nibble, qh[5] bits 4-5, scale 4) and element
        // 128 + 32 + 20 (group 5: ql[64 + 32 + 20] low nibble, qh[32 + 20] bits 2-3, scale 11).
        let mut b = [0u8; Q6_K_BYTES];
        b[Q6_K_D..].copy_from_slice(&f16::from_f32(0.25).to_bits().to_le_bytes());
        b[5] = 0xA0;
        b[Q6_K_QH + 5] = 0b0010_0000;
        b[Q6_K_SCALES + 4] = (-3i8) as u8;
        b[116] = 0x07;
        b[Q6_K_QH + 52] = 0b0000_1100;
        b[Q6_K_SCALES + 11] = 5;
        let mut y = [0f32; QK_K];
        dequant_q6_k(&b, &mut y);
        // q = 0xA | (2 << 4) = 42: 0.25 * -3 * 10; q = 7 | (3 << 4) = 55: 0.25 * 5 * 23.
        assert_eq!((y[69], y[180]), (-7.5, 28.75));
        // Untouched elements are (d * 0) * -32 (scales 0) = -0.
        assert_eq!(y[0], 0.0);
    }

    #[test]
    fn q4_k_scale_packing() {
        // Sub-block 5: low nibble from byte 9, top bits from byte 1 (scale) and 5 (min).
        let mut q = [0u8; 12];
        q[9] = 0x3A;
        q[1] = 0b1100_0000 | 7;
        q[5] = 0b0100_0000 | 9;
        assert_eq!(scale_min_k4(5, &q), (0x0A | (3 << 4), 0x03 | (1 << 4)));
        assert_eq!(scale_min_k4(1, &q), (7, 9));
    }
}
