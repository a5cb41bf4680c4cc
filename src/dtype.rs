//! Element types and conversions between them (crate `half` does the rounding).

use half::{bf16, f16};

/// The element types rankfuse computes with. Numbers match `rf_dtype`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(non_camel_case_types)] // llama.cpp's names (Q4_K), as in files and messages
pub enum DType {
    F32 = 0,
    F16 = 1,
    BF16 = 2,
    /// llama.cpp block quantization: 32 weights in 34 bytes (f16 scale, 32 x i8).
    Q8_0 = 3,
    /// 32 weights in 18 bytes (f16 scale, 16 bytes of nibbles, value = d * (q - 8)).
    Q4_0 = 4,
    /// 256-weight super-blocks in 144 bytes (f16 d, f16 dmin, 6-bit scales/mins, nibbles).
    Q4_K = 5,
    /// 256-weight super-blocks in 210 bytes (4 + 2-bit quants, 16 i8 scales, f16 d; value =
    /// (d * scale) * (q - 32)): the type Q4_K_M / Q5_K_M files use for attn_v and ffn_down.
    Q6_K = 6,
}

impl DType {
    /// The dense element types (every matrix role accepts them).
    pub const ALL: [DType; 3] = [DType::F32, DType::F16, DType::BF16];
    /// The block-quantized types (only a base weight `w` of the fused linear).
    pub const QUANT: [DType; 4] = [DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q6_K];

    /// A dense dtype from its `rf_dtype` number (quantized numbers give `None`: most matrix
    /// roles cannot hold them; see [`DType::from_raw_any`]).
    pub fn from_raw(v: i64) -> Option<DType> {
        Self::from_raw_any(v).filter(|d| !d.is_quantized())
    }
    /// Any dtype from its `rf_dtype` number, block-quantized ones included.
    pub fn from_raw_any(v: i64) -> Option<DType> {
        match v {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            2 => Some(DType::BF16),
            3 => Some(DType::Q8_0),
            4 => Some(DType::Q4_0),
            5 => Some(DType::Q4_K),
            6 => Some(DType::Q6_K),
            _ => None,
        }
    }
    /// Whether elements come in blocks sharing a scale (no per-element address).
    pub fn is_quantized(self) -> bool {
        self.block_elems() > 1
    }
    /// Elements per block (1 for dense types).
    pub fn block_elems(self) -> usize {
        match self {
            DType::F32 | DType::F16 | DType::BF16 => 1,
            DType::Q8_0 | DType::Q4_0 => crate::quant::QK,
            DType::Q4_K | DType::Q6_K => crate::quant::QK_K,
        }
    }
    /// Bytes of one element (dense) or of one block (quantized): `bytes(block_elems())`.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::Q8_0 => crate::quant::Q8_0_BYTES,
            DType::Q4_0 => crate::quant::Q4_0_BYTES,
            DType::Q4_K => crate::quant::Q4_K_BYTES,
            DType::Q6_K => crate::quant::Q6_K_BYTES,
        }
    }
    /// Bytes of `elems` consecutive elements, checked; for quantized types `elems` must be a
    /// whole number of blocks (views guarantee it: cols and ld are multiples of the block).
    pub fn bytes(self, elems: usize) -> Option<usize> {
        let b = self.block_elems();
        if !elems.is_multiple_of(b) {
            return None;
        }
        (elems / b).checked_mul(self.size())
    }
    /// The name used by safetensors and in messages.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::Q8_0 => "Q8_0",
            DType::Q4_0 => "Q4_0",
            DType::Q4_K => "Q4_K",
            DType::Q6_K => "Q6_K",
        }
    }
    pub fn parse(s: &str) -> Option<DType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Some(DType::F32),
            "f16" | "float16" | "half" => Some(DType::F16),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "q8_0" => Some(DType::Q8_0),
            "q4_0" => Some(DType::Q4_0),
            "q4_k" => Some(DType::Q4_K),
            "q6_k" => Some(DType::Q6_K),
            _ => None,
        }
    }
}

/// A scalar type a matrix can hold.
pub trait Element: Copy + Send + Sync + 'static {
    const DTYPE: DType;
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}
impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}
impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Reads element `i` of a buffer of `dtype` as f32 (a quantized element is dequantized from
/// its block: exact, slow; kernels decode whole blocks instead).
///
/// # Safety
/// `p` must point to at least `i + 1` elements of `dtype` (any alignment); for a quantized
/// dtype, to the start of a block and through the end of the block holding element `i`.
#[inline(always)]
pub unsafe fn load_f32(p: *const u8, dtype: DType, i: usize) -> f32 {
    match dtype {
        DType::F32 => (p as *const f32).add(i).read_unaligned(),
        DType::F16 => f16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
        DType::BF16 => bf16::from_bits((p as *const u16).add(i).read_unaligned()).to_f32(),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            crate::quant::load_elem(p, dtype, i)
        }
    }
}

/// Writes `v` rounded (nearest-even) to `dtype` as element `i`.
///
/// # Safety
/// `p` must point to at least `i + 1` writable elements of `dtype` (any alignment).
#[inline(always)]
pub unsafe fn store_f32(p: *mut u8, dtype: DType, i: usize, v: f32) {
    match dtype {
        DType::F32 => (p as *mut f32).add(i).write_unaligned(v),
        DType::F16 => (p as *mut u16)
            .add(i)
            .write_unaligned(f16::from_f32(v).to_bits()),
        DType::BF16 => (p as *mut u16)
            .add(i)
            .write_unaligned(bf16::from_f32(v).to_bits()),
        // No view of a quantized dtype is writable (LinearProblem::check and the matrix
        // constructors refuse them as outputs), so this arm is never reached; writing nothing is
        // the only safe answer (one element cannot be re-quantized alone).
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            debug_assert!(false, "store into a quantized matrix");
        }
    }
}

/// Converts `dst.len()` elements of `dtype` at `src` into f32.
///
/// # Safety
/// `src` must point to `dst.len()` readable elements of `dtype` (any alignment).
#[inline]
pub unsafe fn convert_to_f32(src: *const u8, dtype: DType, dst: &mut [f32]) {
    // Nothing to read: `src` may be NULL (an empty matrix), which slice and copy functions
    // refuse even for length 0.
    if dst.is_empty() {
        return;
    }
    match dtype {
        // Byte copy: `src` may be unaligned (safetensors offsets, C buffers), and a typed f32
        // copy from an unaligned pointer is undefined behaviour.
        DType::F32 => {
            std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr() as *mut u8, dst.len() * 4)
        }
        DType::F16 => {
            if (src as usize).is_multiple_of(2) {
                // half converts slices with F16C/NEON when the CPU has them (runtime check).
                use half::slice::HalfFloatSliceExt;
                let s = std::slice::from_raw_parts(src as *const f16, dst.len());
                s.convert_to_f32_slice(dst);
            } else {
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = f16::from_bits((src as *const u16).add(i).read_unaligned()).to_f32();
                }
            }
        }
        DType::BF16 => {
            // bf16 -> f32 is a shift; this loop vectorizes.
            for (i, d) in dst.iter_mut().enumerate() {
                let b = (src as *const u16).add(i).read_unaligned();
                *d = f32::from_bits((b as u32) << 16);
            }
        }
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            crate::quant::dequant(src, dtype, dst)
        }
    }
}

/// Rounds `src` into `dst.len()` elements of `dtype` (nearest-even, as torch does).
///
/// # Safety
/// `dst` must point to `src.len()` writable elements of `dtype` (any alignment).
#[inline]
pub unsafe fn convert_from_f32(src: &[f32], dst: *mut u8, dtype: DType) {
    if src.is_empty() {
        return; // `dst` may be NULL (an empty matrix)
    }
    match dtype {
        // Byte copy: `dst` may be unaligned.
        DType::F32 => std::ptr::copy_nonoverlapping(src.as_ptr() as *const u8, dst, src.len() * 4),
        DType::Q8_0 | DType::Q4_0 | DType::Q4_K | DType::Q6_K => {
            debug_assert!(false, "store into a quantized matrix");
        }
        _ => {
            for (i, &v) in src.iter().enumerate() {
                store_f32(dst, dtype, i, v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_rounding() {
        let v = [1.0f32, -2.5, 3.140625, 65504.0, 1e-3];
        for dt in DType::ALL {
            let mut buf = vec![0u8; v.len() * dt.size()];
            unsafe { convert_from_f32(&v, buf.as_mut_ptr(), dt) };
            let mut back = [0f32; 5];
            unsafe { convert_to_f32(buf.as_ptr(), dt, &mut back) };
            for (a, b) in v.iter().zip(back) {
                let tol = match dt {
                    DType::F32 => 0.0,
                    DType::F16 => 1e-3 * a.abs(),
                    DType::BF16 => 8e-3 * a.abs(),
                    _ => unreachable!("ALL is dense"),
                };
                assert!((a - b).abs() <= tol, "{dt:?} {a} {b}");
            }
        }
        // nearest-even: 1 + 2^-8 is halfway between bf16 1.0 and 1.0078125 -> 1.0
        assert_eq!(bf16::from_f32(1.0 + 1.0 / 256.0).to_f32(), 1.0);
        // Quantized numbers are only read where a quantized matrix is allowed.
        assert_eq!(DType::from_raw(3), None);
        assert_eq!(DType::from_raw_any(3), Some(DType::Q8_0));
        assert_eq!(DType::from_raw_any(6), Some(DType::Q6_K));
        assert_eq!(DType::from_raw_any(7), None);
        assert_eq!(DType::Q6_K.bytes(512), Some(420));
        assert_eq!(DType::Q4_K.bytes(512), Some(288));
        assert_eq!(DType::Q8_0.bytes(33), None);
    }
}
