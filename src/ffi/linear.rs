//! `rf_linear`: the fused base + adapter linear.

use super::boundary::{arg_ref, arg_slice};
use super::error::rf_error;
use super::handles::{lora_ref, rf_runtime};
use super::types::*;
use crate::backend::LinearProblem;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::matrix::{MatMut, MatRef};
use crate::methods::Slots;
use std::ptr::addr_of;

/// A matrix descriptor read field by field (an invalid dtype number must be an error, not UB).
pub struct Desc {
    pub data: *mut u8,
    pub dtype: DType,
    pub rows: usize,
    pub cols: usize,
    pub ld: usize,
}

/// Reads and checks an `rf_matrix` argument of a dense dtype (F32, F16, BF16): every role but
/// `rf_linear`'s w, which `read_matrix_w` reads.
///
/// # Safety
/// A non-NULL `p` must point to an `rf_matrix`.
pub unsafe fn read_matrix(p: *const rf_matrix, name: &str) -> Result<Desc> {
    let d = read_matrix_w(p, name)?;
    if d.dtype.is_quantized() {
        return Err(Error::dtype(format!(
            "{name}: {} is block-quantized; only the w of rf_linear may be (this argument must \
             be F32, F16 or BF16)",
            d.dtype.name()
        )));
    }
    Ok(d)
}

/// Reads and checks an `rf_matrix` argument that may also be block-quantized (Q8_0, Q4_0,
/// Q4_K, Q6_K: cols and ld must then be whole blocks, else RF_STATUS_SHAPE).
///
/// # Safety
/// A non-NULL `p` must point to an `rf_matrix`.
pub unsafe fn read_matrix_w(p: *const rf_matrix, name: &str) -> Result<Desc> {
    if p.is_null() {
        return Err(Error::invalid(format!("argument '{name}' is NULL")));
    }
    let raw_dtype = (addr_of!((*p).dtype) as *const i32).read_unaligned();
    let dtype = DType::from_raw_any(raw_dtype as i64).ok_or_else(|| {
        Error::dtype(format!(
            "{name}: dtype {raw_dtype} is not an rf_dtype (0 = F32, 1 = F16, 2 = BF16, 3 = Q8_0, \
             4 = Q4_0, 5 = Q4_K, 6 = Q6_K)"
        ))
    })?;
    let data = addr_of!((*p).data).read_unaligned() as *mut u8;
    let rows = addr_of!((*p).rows).read_unaligned();
    let cols = addr_of!((*p).cols).read_unaligned();
    let ld = addr_of!((*p).ld).read_unaligned();
    if rows < 0 || cols < 0 {
        return Err(Error::shape(format!(
            "{name}: negative shape {rows} x {cols}"
        )));
    }
    if ld < cols {
        return Err(Error::shape(format!("{name}: ld {ld} < cols {cols}")));
    }
    let (rows, cols, ld) = (rows as usize, cols as usize, ld as usize);
    // (MatRef/MatMut::from_raw canonicalise ld for empty and single-row matrices.)
    let ld_c = if rows <= 1 || cols == 0 { cols } else { ld };
    crate::matrix::check_blocks(name, cols, ld_c, dtype)?;
    let bytes = crate::matrix::span_bytes(rows, cols, ld_c, dtype)
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(|| {
            Error::shape(format!(
                "{name}: {rows} x {cols} (ld {ld}) overflows the address space"
            ))
        })?;
    if data.is_null() && bytes > 0 {
        return Err(Error::invalid(format!(
            "{name}: data is NULL for a {rows} x {cols} matrix"
        )));
    }
    // NULL is fine for an empty matrix, but Rust slices and copies refuse NULL even at length 0:
    // hand kernels a dangling, well-aligned pointer instead (never dereferenced: 0 bytes).
    let data = if data.is_null() {
        std::ptr::NonNull::<u128>::dangling().as_ptr() as *mut u8
    } else {
        data
    };
    Ok(Desc {
        data,
        dtype,
        rows,
        cols,
        ld,
    })
}

/// An optional `rf_matrix` argument (NULL = absent).
///
/// # Safety
/// As `read_matrix`.
pub unsafe fn read_opt_matrix(p: *const rf_matrix, name: &str) -> Result<Option<Desc>> {
    if p.is_null() {
        Ok(None)
    } else {
        read_matrix(p, name).map(Some)
    }
}

impl Desc {
    /// # Safety
    /// The caller promises the memory behind the descriptor is valid for 'a.
    pub unsafe fn as_ref<'a>(&self) -> MatRef<'a> {
        MatRef::from_raw(self.data, self.dtype, self.rows, self.cols, self.ld)
    }
    /// # Safety
    /// As above, plus exclusive access.
    pub unsafe fn as_mut<'a>(&self) -> MatMut<'a> {
        MatMut::from_raw(self.data, self.dtype, self.rows, self.cols, self.ld)
    }
}

/// The fused op: `y = x W^T + bias + sum over slots of scale(slot) * (x A[:r]^T) B[:, :r]^T`.
///
/// x: m x k, w: n x k (nn.Linear layout), bias: NULL or 1 x n, y: m x n (its own memory).
/// `row_slot == NULL`: every slot applies to every row (adapters stacked). Otherwise `row_slot`
/// has m entries and row i uses `slots[row_slot[i]]` only; -1 = base only (mixed batch).
/// scale(slot) = scale_mult * (alpha / r | alpha / sqrt(r) | fixed), r = the rank used.
/// dtypes of x, w, A/B and y may differ (f32, f16, bf16); accumulation is f32. w may also be
/// block-quantized (RF_DTYPE_Q8_0 / Q4_0 / Q4_K / Q6_K, e.g. a GGUF tensor from `rf_weights_get`):
/// its blocks are dequantized in registers (m <= 8) or into f32 panels / shared-memory tiles
/// (larger m), on CPU and CUDA runtimes (CUDA: w's data 2-byte aligned, 4-byte for Q4_K).
/// Thread-safe: many threads may call it at once on shared weights and adapters.
/// On a CUDA runtime x, w, bias and y are device pointers; a module of an adapter loaded on a
/// CUDA runtime of the same device is read from its device copy, any other module is copied
/// into the call's scratch (correct, slower). KRAdapter and EigenLoRAx modules go in any slot on
/// both runtimes; on a CUDA runtime their parameters (and the EigenLoRAx basis) are copied into
/// the call's scratch (docs/cuda.md).
#[no_mangle]
pub unsafe extern "C" fn rf_linear(
    rt: *mut rf_runtime,
    x: *const rf_matrix,
    w: *const rf_matrix,
    bias: *const rf_matrix,
    slots: *const rf_lora_slot,
    n_slots: usize,
    row_slot: *const i32,
    y: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let xd = read_matrix(x, "x")?;
        let wd = read_matrix_w(w, "w")?;
        let bd = read_opt_matrix(bias, "bias")?;
        let yd = read_matrix(y, "y")?;
        let resolved = resolve_slots(rt, slots, n_slots)?;
        let rs = read_row_slot(row_slot, xd.rows);
        let problem = LinearProblem {
            x: xd.as_ref(),
            w: wd.as_ref(),
            bias: bd.as_ref().map(|b| b.as_ref()),
            slots: &resolved.low,
            row_slot: rs,
        };
        let mut yv = yd.as_mut();
        rt.inner.linear_with(&problem, &resolved.methods, &mut yv)
    })
}

/// The slots of a call, resolved for `rt` (rank, scale, device copies) and split for
/// `linear_with`; NULL loras are base-only.
///
/// # Safety
/// `slots` as in `rf_linear`.
pub(crate) unsafe fn resolve_slots<'a>(
    rt: &'a rf_runtime,
    slots: *const rf_lora_slot,
    n_slots: usize,
) -> Result<Slots<'a>> {
    let raw_slots = arg_slice(slots, n_slots, "slots", "n_slots")?;
    let mut any = Vec::with_capacity(n_slots);
    for (i, s) in raw_slots.iter().enumerate() {
        if s.lora.is_null() {
            any.push(None);
            continue;
        }
        let l = lora_ref(s.lora, "slots[].lora")?;
        let slot = rt
            .inner
            .slot_any(l, s.rank as usize, s.scale_mult)
            .map_err(|e| e.context(format!("slot {i}")))?;
        any.push(Some(slot));
    }
    Ok(Slots::from_any(any))
}

/// `row_slot` as a slice of m entries (None for NULL: stacked).
///
/// # Safety
/// A non-NULL `row_slot` points to `m` ints.
pub(crate) unsafe fn read_row_slot<'a>(row_slot: *const i32, m: usize) -> Option<&'a [i32]> {
    if row_slot.is_null() {
        None
    } else {
        Some(std::slice::from_raw_parts(row_slot, m))
    }
}
