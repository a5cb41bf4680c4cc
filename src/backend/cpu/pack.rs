//! Prepacked base weights. The base is frozen, so the transpose into the micro-kernel's panel
//! order (and, for bf16, the VNNI pair interleave that `vdpbf16ps` / AMX consume) is done once
//! here instead of on every call. Packing keeps W's own element type: a packed bf16 W costs the
//! same bytes as the original (plus at most one panel of padding), so a host can pack and then
//! drop or unmap the original.
//!
//! Layout: W (n x k) is cut into panels of `nr` rows (the kernel table's micro-tile width; the
//! last panel is padded with zero rows). Panel `jp` holds rows `jp*nr ..` for every k, K-major:
//! - `F32` / `F16`: element (p, j) of the panel at `p * nr + j`;
//! - `Bf16Pairs`: element (p, j) at `(p / 2) * 2 nr + 2 j + p % 2` (k padded to even with zeros),
//!   so one k pair of a 16-column group is exactly one 512-bit `vdpbf16ps` operand, and even /
//!   odd k are one shift / one mask away from f32 lanes on any ISA.
//!
//! For every panel layout the panel data for k offset `p0` (even) starts `p0 * nr` elements into
//! the panel, so the driver's KC blocks address packed W exactly like its own per-call packing.
//!
//! Block-quantized W (Q4_0, Q8_0) is not cut into panels: it keeps its blocks, regrouped as 8-row
//! interleaved records (`Interleaved8`, `quant_pack`), which the decode kernels read directly and
//! the GEMM path dequantizes per KC block like an unpacked quantized W.

use super::{quant_pack, Isa};
use crate::dtype::{self, DType};
use crate::error::{Error, Result};
use crate::matrix::MatRef;
use crate::quant::{dequant_block, QK, QK_K};
use rayon::prelude::*;
use std::alloc::{alloc_zeroed, dealloc, Layout};

/// How a panel stores its elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PanelLayout {
    F32,
    F16,
    Bf16Pairs,
    /// Q4_0 / Q8_0 blocks of 8 rows interleaved (`quant_pack`); not a panel layout.
    Interleaved8,
}

impl PanelLayout {
    pub fn for_dtype(dt: DType) -> PanelLayout {
        match dt {
            DType::F32 => PanelLayout::F32,
            DType::F16 => PanelLayout::F16,
            DType::BF16 => PanelLayout::Bf16Pairs,
            DType::Q8_0 | DType::Q4_0 => PanelLayout::Interleaved8,
            // Runtime::pack refuses the K-quants (no interleaved layout yet; f32 panels would
            // hold 7x their bytes).
            DType::Q4_K | DType::Q6_K => PanelLayout::F32,
        }
    }
    /// Bytes per element (panel layouts; `Interleaved8` records are `quant_pack::record_bytes`).
    pub fn size(self) -> usize {
        match self {
            PanelLayout::F32 => 4,
            PanelLayout::F16 | PanelLayout::Bf16Pairs => 2,
            PanelLayout::Interleaved8 => 1,
        }
    }
    /// Whether this is a layout of panels (`panel`, `panel_bytes`, the panel readers).
    pub fn is_panels(self) -> bool {
        self != PanelLayout::Interleaved8
    }
    pub fn name(self) -> &'static str {
        match self {
            PanelLayout::F32 => "f32 panels",
            PanelLayout::F16 => "f16 panels",
            PanelLayout::Bf16Pairs => "bf16 pair (VNNI) panels",
            PanelLayout::Interleaved8 => "8-row interleaved quant blocks",
        }
    }
}

/// Which kernels a pack was made for: the kernel table's ISA and panel width.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackSpec {
    pub isa: Isa,
    pub nr: usize,
    /// k of a `Bf16Pairs` pack is padded to a multiple of this (2; 32 for the AMX / vdpbf16ps
    /// blocks, which consume k in 32-deep tiles).
    pub kgran: usize,
}

/// 64-byte aligned, zero-initialised bytes (aligned so full-width vector loads of a panel never
/// split a cache line).
struct AlignedBytes {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain owned bytes; written only while packing (before the value is shared).
unsafe impl Send for AlignedBytes {}
// SAFETY: as above; shared access is read-only.
unsafe impl Sync for AlignedBytes {}

impl AlignedBytes {
    fn zeroed(len: usize) -> Result<AlignedBytes> {
        if len == 0 {
            return Ok(AlignedBytes {
                ptr: std::ptr::NonNull::<u128>::dangling().as_ptr() as *mut u8,
                len: 0,
            });
        }
        let layout = Layout::from_size_align(len, 64)
            .map_err(|_| Error::oom(format!("a packed matrix of {len} bytes")))?;
        // SAFETY: layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            return Err(Error::oom(format!(
                "could not allocate {len} bytes for a packed matrix"
            )));
        }
        Ok(AlignedBytes { ptr, len })
    }
}

impl Drop for AlignedBytes {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with this size and alignment.
            unsafe { dealloc(self.ptr, Layout::from_size_align_unchecked(self.len, 64)) }
        }
    }
}

/// A base matrix W (n x k, nn.Linear layout) packed once for one kernel table. Immutable after
/// packing; shared by any number of concurrent calls.
pub struct PackedW {
    spec: PackSpec,
    layout: PanelLayout,
    dtype: DType,
    n: usize,
    k: usize,
    /// k rounded up to the layout's k granule (2 for pairs).
    kp: usize,
    data: AlignedBytes,
}

impl std::fmt::Debug for PackedW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedW({} x {} {}, {} of {} for {})",
            self.n,
            self.k,
            self.dtype.name(),
            self.layout.name(),
            self.spec.nr,
            self.spec.isa.name()
        )
    }
}

impl PackedW {
    /// Packs `w` for `spec`. Runs on the current rayon pool (panels in parallel).
    pub fn pack(w: &MatRef<'_>, spec: PackSpec) -> Result<PackedW> {
        let (n, k, nr) = (w.rows, w.cols, spec.nr);
        if nr == 0 || nr > 64 || spec.kgran == 0 || !spec.kgran.is_multiple_of(2) {
            return Err(Error::internal(format!(
                "pack spec {spec:?} is not a kernel table's"
            )));
        }
        let layout = PanelLayout::for_dtype(w.dtype);
        if layout == PanelLayout::Interleaved8 {
            return Self::pack_interleaved(w, spec);
        }
        let kp = if layout == PanelLayout::Bf16Pairs {
            k.next_multiple_of(spec.kgran)
        } else {
            k
        };
        let npan = n.div_ceil(nr);
        let panel_bytes = kp
            .checked_mul(nr)
            .and_then(|v| v.checked_mul(layout.size()))
            .ok_or_else(|| Error::oom(format!("packing a {n} x {k} matrix overflows")))?;
        let bytes = panel_bytes
            .checked_mul(npan)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| Error::oom(format!("packing a {n} x {k} matrix overflows")))?;
        let data = AlignedBytes::zeroed(bytes)?;
        let base = SendPtr(data.ptr);
        let es = layout.size();
        (0..npan).into_par_iter().for_each(|jp| {
            let dst = base.get();
            for j in 0..nr.min(n - jp * nr) {
                let row = w.row_ptr(jp * nr + j);
                for p in 0..k {
                    let off = jp * panel_bytes
                        + es * match layout {
                            PanelLayout::Bf16Pairs => (p / 2) * 2 * nr + 2 * j + p % 2,
                            _ => p * nr + j,
                        };
                    // SAFETY: (jp*nr + j, p) is inside w; off + es <= bytes (panel jp of
                    // npan, element index < kp*nr); panels are written by one task each.
                    unsafe { std::ptr::copy_nonoverlapping(row.add(p * es), dst.add(off), es) };
                }
            }
        });
        Ok(PackedW {
            spec,
            layout,
            dtype: w.dtype,
            n,
            k,
            kp,
            data,
        })
    }

    /// Q4_0 / Q8_0: 8-row interleaved records (`quant_pack`), groups packed in parallel.
    fn pack_interleaved(w: &MatRef<'_>, spec: PackSpec) -> Result<PackedW> {
        let (n, k, dt) = (w.rows, w.cols, w.dtype);
        let bytes = quant_pack::packed_bytes(dt, n, k)
            .filter(|&b| b <= isize::MAX as usize)
            .ok_or_else(|| Error::oom(format!("packing a {n} x {k} matrix overflows")))?;
        let data = AlignedBytes::zeroed(bytes)?;
        let base = SendPtr(data.ptr);
        let groups = n.div_ceil(quant_pack::GROUP);
        (0..groups.div_ceil(16)).into_par_iter().for_each(|t| {
            // SAFETY: w has whole blocks; each task writes its own groups of the pack.
            unsafe { quant_pack::pack_groups(w, 16 * t, (16 * t + 16).min(groups), base.get()) }
        });
        Ok(PackedW {
            spec,
            layout: PanelLayout::Interleaved8,
            dtype: dt,
            n,
            k,
            kp: k,
            data,
        })
    }

    /// Start of the pack's bytes (for the `Interleaved8` readers).
    pub fn data_ptr(&self) -> *const u8 {
        self.data.ptr
    }

    pub fn spec(&self) -> PackSpec {
        self.spec
    }
    pub fn layout(&self) -> PanelLayout {
        self.layout
    }
    /// The dtype of the matrix that was packed.
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.n
    }
    pub fn cols(&self) -> usize {
        self.k
    }
    /// Bytes the pack owns.
    pub fn bytes(&self) -> usize {
        self.data.len
    }
    pub fn nr(&self) -> usize {
        self.spec.nr
    }

    /// Bytes from one panel to the next.
    pub fn panel_bytes(&self) -> usize {
        self.kp * self.spec.nr * self.layout.size()
    }

    /// Panel `jp` from k offset `p0` (p0 even for `Bf16Pairs`): `(kc) * nr` elements follow.
    ///
    /// # Safety
    /// jp < rows().div_ceil(nr), p0 <= cols() (and even for pairs).
    #[inline]
    pub unsafe fn panel(&self, jp: usize, p0: usize) -> *const u8 {
        debug_assert!(self.layout.is_panels());
        debug_assert!(self.layout != PanelLayout::Bf16Pairs || p0.is_multiple_of(2));
        let es = self.layout.size();
        self.data.ptr.add((jp * self.kp + p0) * self.spec.nr * es)
    }

    /// A view with W's shape and dtype for argument checks and shape arithmetic. Its data is the
    /// pack's bytes (at least n*k elements of the dtype, so a stray read stays inside the pack),
    /// NOT W's row-major values: kernels must read W through the pack.
    pub fn shape_view(&self) -> MatRef<'_> {
        // SAFETY: the pack holds >= n*k elements of `dtype` (panels are >= n rows x k), so the
        // view's span is inside the allocation; an empty pack has n*k = 0.
        unsafe { MatRef::from_raw(self.data.ptr, self.dtype, self.n, self.k, self.k.max(1)) }
    }

    /// Row j of W, columns c0.., as f32 (for the reference and tests; not a fast path).
    pub fn row_f32(&self, j: usize, c0: usize, out: &mut [f32]) {
        let (nr, jp, jj) = (self.spec.nr, j / self.spec.nr, j % self.spec.nr);
        assert!(j < self.n && c0 + out.len() <= self.k);
        if self.layout == PanelLayout::Interleaved8 {
            return self.quant_row_f32(j, c0, out);
        }
        for (q, o) in out.iter_mut().enumerate() {
            let p = c0 + q;
            let idx = match self.layout {
                PanelLayout::Bf16Pairs => (p / 2) * 2 * nr + 2 * jj + p % 2,
                _ => p * nr + jj,
            };
            // SAFETY: idx < kp * nr inside panel jp.
            let base = unsafe { self.panel(jp, 0) };
            *o = unsafe { dtype::load_f32(base, self.dtype, idx) };
        }
    }

    /// `row_f32` of an `Interleaved8` pack: each block rebuilt in GGUF form and dequantized
    /// exactly (`quant::dequant_block`), so a pack reads back bit-identical to W.
    fn quant_row_f32(&self, j: usize, c0: usize, out: &mut [f32]) {
        let (dt, nb) = (self.dtype, self.k / QK);
        let (g, r) = (j / quant_pack::GROUP, j % quant_pack::GROUP);
        let rec = quant_pack::record_bytes(dt);
        let (mut blk, mut vals) = ([0u8; 2 + QK], [0f32; QK_K]);
        let mut p = c0;
        while p < c0 + out.len() {
            let b = p / QK;
            // SAFETY: group g, block b < nb is a whole record inside the pack; blk holds one
            // block of dt (<= 34 bytes).
            unsafe {
                quant_pack::unpack_block(self.data.ptr.add((g * nb + b) * rec), dt, r, &mut blk);
                dequant_block(blk.as_ptr(), dt, 0, &mut vals);
            }
            let e = ((b + 1) * QK).min(c0 + out.len());
            out[p - c0..e - c0].copy_from_slice(&vals[p - b * QK..e - b * QK]);
            p = e;
        }
    }

    /// W unpacked into a dense row-major f32 matrix (n x k), for the reference path.
    pub fn unpack_f32(&self) -> Vec<f32> {
        let mut v = vec![0f32; self.n * self.k];
        for (j, row) in v.chunks_mut(self.k.max(1)).enumerate().take(self.n) {
            self.row_f32(j, 0, row);
        }
        v
    }

    /// Converts `kc` k-steps of panel `jp` from offset `p0` into f32 `dst[p * nr + j]` (for
    /// kernels without a native reader of this layout).
    ///
    /// # Safety
    /// As `panel`, p0 + kc <= kp; dst holds kc * nr floats.
    pub unsafe fn panel_to_f32(&self, jp: usize, p0: usize, kc: usize, dst: *mut f32) {
        let nr = self.spec.nr;
        if self.layout == PanelLayout::Interleaved8 {
            // Row by row through the exact block decode, 256 columns at a time (no heap).
            let mut row = [0f32; 256];
            for jj in 0..nr {
                let j = jp * nr + jj;
                let mut q0 = 0;
                while q0 < kc {
                    let len = (kc - q0).min(row.len());
                    if j < self.n {
                        self.row_f32(j, p0 + q0, &mut row[..len]);
                    } else {
                        row[..len].fill(0.0);
                    }
                    for (q, v) in row[..len].iter().enumerate() {
                        *dst.add((q0 + q) * nr + jj) = *v;
                    }
                    q0 += len;
                }
            }
            return;
        }
        let src = self.panel(jp, p0);
        match self.layout {
            PanelLayout::F32 => std::ptr::copy_nonoverlapping(src as *const f32, dst, kc * nr),
            PanelLayout::F16 => {
                let d = std::slice::from_raw_parts_mut(dst, kc * nr);
                dtype::convert_to_f32(src, DType::F16, d);
            }
            PanelLayout::Bf16Pairs => {
                // A pair row is nr u32 words (low half: k even, high half: k odd), so both k
                // rows come out of one contiguous read with a shift and a mask: a loop LLVM
                // vectorizes for any ISA (the panel is 64-byte aligned and p0 is even).
                let words = src as *const u32;
                for q in 0..kc.div_ceil(2) {
                    let w = std::slice::from_raw_parts(words.add(q * nr), nr);
                    let even = std::slice::from_raw_parts_mut(dst.add(2 * q * nr), nr);
                    for (e, &v) in even.iter_mut().zip(w) {
                        *e = f32::from_bits(v << 16);
                    }
                    if 2 * q + 1 < kc {
                        let odd = std::slice::from_raw_parts_mut(dst.add((2 * q + 1) * nr), nr);
                        for (o, &v) in odd.iter_mut().zip(w) {
                            *o = f32::from_bits(v & 0xffff_0000);
                        }
                    }
                }
            }
            PanelLayout::Interleaved8 => unreachable!("handled above"),
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut u8);
// SAFETY: used only while packing; each task writes its own panel.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut u8 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::Matrix;
    use crate::rng::SplitMix64;

    #[test]
    fn every_layout_round_trips_and_pads_with_zeros() {
        let mut rng = SplitMix64::new(3);
        for dt in [DType::F32, DType::F16, DType::BF16] {
            for (n, k, nr) in [
                (1, 1, 16),
                (17, 5, 16),
                (33, 64, 32),
                (12, 7, 4),
                (40, 3, 8),
            ] {
                let vals = rng.fill_uniform(n * k, -1.0, 1.0);
                let w = Matrix::from_f32(dt, n, k, &vals).unwrap();
                let p = PackedW::pack(
                    &w.view(),
                    PackSpec {
                        isa: Isa::Portable,
                        nr,
                        kgran: 2,
                    },
                )
                .unwrap();
                let kp = if dt == DType::BF16 {
                    k.next_multiple_of(2)
                } else {
                    k
                };
                assert_eq!(p.bytes(), n.div_ceil(nr) * nr * kp * dt.size());
                let u = p.unpack_f32();
                for j in 0..n {
                    for c in 0..k {
                        assert_eq!(u[j * k + c].to_bits(), w.view().get(j, c).to_bits());
                    }
                }
                // panel_to_f32 agrees with the element rule, padding rows are zero.
                let npan = n.div_ceil(nr);
                let mut buf = vec![1f32; kp * nr];
                for jp in 0..npan {
                    unsafe { p.panel_to_f32(jp, 0, kp, buf.as_mut_ptr()) };
                    for q in 0..kp {
                        for j in 0..nr {
                            let want = if jp * nr + j < n && q < k {
                                w.view().get(jp * nr + j, q)
                            } else {
                                0.0
                            };
                            assert_eq!(buf[q * nr + j].to_bits(), want.to_bits(), "{dt:?} {n}x{k}");
                        }
                    }
                    // A KC block that starts inside the panel and ends on an odd k step.
                    if kp >= 5 {
                        let p0 = 2;
                        let kc = if (kp - p0) % 2 == 1 {
                            kp - p0
                        } else {
                            kp - p0 - 1
                        };
                        let mut part = vec![f32::NAN; kc * nr];
                        unsafe { p.panel_to_f32(jp, p0, kc, part.as_mut_ptr()) };
                        for (i, v) in part.iter().enumerate() {
                            let want = buf[p0 * nr + i];
                            assert_eq!(v.to_bits(), want.to_bits(), "{dt:?} {n}x{k} p0 2 kc {kc}");
                        }
                    }
                }
            }
        }
    }
}
