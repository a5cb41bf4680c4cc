//! Prepacked base weights: `rf_weights_pack` lays a frozen W out once in the order this
//! runtime's CPU kernels read it; `rf_linear_packed` is `rf_linear` on it.

use super::boundary::{arg_out, arg_ref};
use super::error::rf_error;
use super::handles::{rf_packed, rf_runtime};
use super::linear::{read_matrix, read_matrix_w, read_opt_matrix, read_row_slot, resolve_slots};
use super::types::*;
use crate::backend::LinearProblem;
use std::ffi::c_char;
use std::sync::Arc;

/// What `rf_packed_info_get` reports about a packed matrix.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_packed_info {
    /// W's shape (n x k, nn.Linear layout) and element type, as packed.
    pub rows: i64,
    pub cols: i64,
    pub dtype: rf_dtype,
    /// Bytes the packed matrix owns: W's bytes rounded up to whole panels (and, for bf16 on
    /// AMX / AVX512-BF16 kernels, k rounded up to 32; for Q4_0 / Q8_0, the blocks with rows
    /// rounded up to a multiple of 8).
    pub bytes: usize,
    /// Columns per panel of the layout (the kernels' register-tile width); 8 for Q4_0 / Q8_0
    /// (W rows per interleaved record).
    pub panel_cols: u32,
    /// The kernels the layout is for (`"avx2"`, `"avx512bf16"`, ...; the runtime's `isa` in
    /// `rf_runtime_info`); a NUL-terminated static string.
    pub kernels: *const c_char,
}

/// Packs the base matrix `w` (n x k, F32/F16/BF16, any `ld`, host memory) once into the layout
/// this CPU runtime's kernels consume (panels of the register-tile width in W's own element
/// type; bf16 as VNNI k-pairs, the operand order of `vdpbf16ps` / AMX), so `rf_linear_packed`
/// never re-packs it. A Q4_0 or Q8_0 `w` (a GGUF view) keeps its blocks bit for bit, regrouped
/// as 8-row interleaved records that the decode kernels read without shuffles (docs/c-api.md);
/// Q4_K / Q6_K: RF_STATUS_DTYPE (pass them to `rf_linear` as they are). Memory: about W's own
/// bytes (see `rf_packed_info.bytes`); `w`'s memory is copied and may be freed or unmapped
/// afterwards. Packing reads all of W once on the
/// runtime's threads. On a CUDA runtime: RF_STATUS_UNSUPPORTED (the kernels there read W in place
/// from device memory).
/// The caller owns `*out` (free with `rf_packed_free`). A packed matrix is immutable: any number
/// of threads may use it at once, with any runtime whose kernels match (see `rf_linear_packed`).
#[no_mangle]
pub unsafe extern "C" fn rf_weights_pack(
    rt: *mut rf_runtime,
    w: *const rf_matrix,
    out: *mut *mut rf_packed,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let wd = read_matrix_w(w, "w")?;
        let out = arg_out(out, "out")?;
        let packed = rt.inner.pack(&wd.as_ref())?;
        *out = Box::into_raw(Box::new(rf_packed {
            inner: Arc::new(packed),
        }));
        Ok(())
    })
}

/// Frees a packed matrix; NULL is accepted. No call may be using it.
#[no_mangle]
pub unsafe extern "C" fn rf_packed_free(p: *mut rf_packed) {
    boundary_value!((), {
        if !p.is_null() {
            drop(Box::from_raw(p));
        }
    })
}

/// Shape, dtype, bytes and layout of a packed matrix. Thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_packed_info_get(
    p: *const rf_packed,
    out: *mut rf_packed_info,
) -> *mut rf_error {
    boundary!({
        let p = arg_ref(p, "packed")?;
        let out = arg_out(out, "out")?;
        let pw = &p.inner;
        *out = rf_packed_info {
            rows: pw.rows() as i64,
            cols: pw.cols() as i64,
            dtype: pw.dtype().into(),
            bytes: pw.bytes(),
            panel_cols: if pw.layout().is_panels() {
                pw.nr() as u32
            } else {
                crate::backend::cpu::quant_pack::GROUP as u32
            },
            kernels: isa_cstr(pw.spec().isa),
        };
        Ok(())
    })
}

fn isa_cstr(isa: crate::backend::cpu::Isa) -> *const c_char {
    use crate::backend::cpu::Isa;
    let s: &'static [u8] = match isa {
        Isa::Reference => b"reference\0",
        Isa::Portable => b"portable\0",
        Isa::Neon => b"neon\0",
        Isa::Avx2 => b"avx2\0",
        Isa::Avx512 => b"avx512\0",
        Isa::Avx512Bf16 => b"avx512bf16\0",
        Isa::Amx => b"amx\0",
    };
    s.as_ptr() as *const c_char
}

/// `rf_linear` with W given as a packed matrix from `rf_weights_pack`: the same op, forms and
/// dtypes (stacked or mixed slots, ranks, bias, any f32/f16/bf16 x / y), the same results as
/// `rf_linear` on the unpacked W within the kernels' tolerance (the packed values are W's own).
/// `w` must have been packed for kernels of the same kind as `rt`'s (`rf_packed_info.kernels`
/// equals the runtime's `isa`): otherwise RF_STATUS_INVALID_ARGUMENT naming both, never a
/// result read in the wrong layout (runtimes of one process normally share one kind; they
/// differ when `RANKFUSE_ISA` changed in between). CPU runtimes only (RF_STATUS_UNSUPPORTED on
/// CUDA). Thread-safe like `rf_linear`: many threads may share rt, w and the adapters.
#[no_mangle]
pub unsafe extern "C" fn rf_linear_packed(
    rt: *mut rf_runtime,
    x: *const rf_matrix,
    w: *const rf_packed,
    bias: *const rf_matrix,
    slots: *const rf_lora_slot,
    n_slots: usize,
    row_slot: *const i32,
    y: *mut rf_matrix,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let xd = read_matrix(x, "x")?;
        let pw = &arg_ref(w, "w")?.inner;
        let bd = read_opt_matrix(bias, "bias")?;
        let yd = read_matrix(y, "y")?;
        let resolved = resolve_slots(rt, slots, n_slots)?;
        let rs = read_row_slot(row_slot, xd.rows);
        let problem = LinearProblem {
            x: xd.as_ref(),
            w: pw.shape_view(),
            bias: bd.as_ref().map(|b| b.as_ref()),
            slots: &resolved.low,
            row_slot: rs,
        };
        let mut yv = yd.as_mut();
        rt.inner
            .linear_packed_with(&problem, pw, &resolved.methods, &mut yv)
    })
}
