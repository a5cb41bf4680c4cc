//! GGUF LoRA adapter exports (llama.cpp's adapter files; docs/formats.md): load, save, the
//! architecture, and a check against a base model.

use super::boundary::{arg_out, arg_ref, arg_str};
use super::error::rf_error;
use super::handles::{rf_adapter, rf_runtime, rf_weights};
use crate::adapter::gguf::{self, AlphaPolicy, SaveOptions};
use crate::error::{Error, Result};
use std::ffi::c_char;
use std::path::Path;
use std::ptr::addr_of;

/// How `rf_adapter_save_gguf` chooses the file's single `adapter.lora.alpha` (llama.cpp applies
/// scale = alpha / rank to every module; alpha 0 = scale 1).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_gguf_alpha {
    /// The alpha that reproduces the most modules' scales exactly; every other module's scale
    /// ratio is folded into its lora_b (its values change, its product does not).
    RF_GGUF_ALPHA_AUTO = 0,
    /// alpha = 0 (scale 1) and every module's scale folded into lora_b.
    RF_GGUF_ALPHA_FOLD = 1,
}

/// Options of `rf_adapter_save_gguf`. Fill with `rf_gguf_save_options_default`, then change
/// fields. NULL options = the defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_gguf_save_options {
    /// sizeof(rf_gguf_save_options).
    pub struct_size: u32,
    /// Default RF_GGUF_ALPHA_AUTO.
    pub alpha: rf_gguf_alpha,
    /// `general.architecture` of the base model ("llama", "qwen2", "bert", ...); it also picks
    /// the Hugging Face -> GGUF module-name table. NULL or "" = the adapter's own (set when it
    /// was loaded from a GGUF file); neither is an error.
    pub architecture: *const c_char,
    /// The base model's attention heads and key/value heads (config.json's
    /// num_attention_heads, num_key_value_heads; kv 0 = same as heads). Required (else
    /// RF_STATUS_INVALID_ARGUMENT) when Hugging Face q_proj/k_proj modules of a llama or mistral
    /// adapter are written: llama.cpp's converter permutes those rows per head (rotary layout),
    /// so lora_b's rows are permuted the same way. Default 0.
    pub n_head: u32,
    pub n_head_kv: u32,
}

/// Fills `*out` with the defaults (struct_size set, RF_GGUF_ALPHA_AUTO, architecture NULL, no
/// head counts).
#[no_mangle]
pub unsafe extern "C" fn rf_gguf_save_options_default(
    out: *mut rf_gguf_save_options,
) -> *mut rf_error {
    boundary!({
        let out = arg_out(out, "out")?;
        *out = rf_gguf_save_options {
            struct_size: std::mem::size_of::<rf_gguf_save_options>() as u32,
            alpha: rf_gguf_alpha::RF_GGUF_ALPHA_AUTO,
            architecture: std::ptr::null(),
            n_head: 0,
            n_head_kv: 0,
        };
        Ok(())
    })
}

/// Reads options field by field (raw reads: a bad enum number from C must not become UB).
unsafe fn read_options(p: *const rf_gguf_save_options) -> Result<SaveOptions> {
    let mut o = SaveOptions::default();
    if p.is_null() {
        return Ok(o);
    }
    let size = addr_of!((*p).struct_size).read_unaligned() as usize;
    if size < std::mem::size_of::<rf_gguf_save_options>() || size > 1 << 16 {
        return Err(Error::invalid(format!(
            "opts->struct_size = {size}; set it to sizeof(rf_gguf_save_options) = {} \
             (rf_gguf_save_options_default does)",
            std::mem::size_of::<rf_gguf_save_options>()
        )));
    }
    let raw = (addr_of!((*p).alpha) as *const i32).read_unaligned();
    o.alpha = AlphaPolicy::from_raw(raw as i64).ok_or_else(|| {
        Error::invalid(format!(
            "opts->alpha = {raw} is not an rf_gguf_alpha (0 = AUTO, 1 = FOLD)"
        ))
    })?;
    let arch = addr_of!((*p).architecture).read_unaligned();
    if !arch.is_null() {
        o.architecture = Some(arg_str(arch, "opts->architecture")?.to_string());
    }
    o.n_head = addr_of!((*p).n_head).read_unaligned() as usize;
    o.n_head_kv = addr_of!((*p).n_head_kv).read_unaligned() as usize;
    Ok(o)
}

/// Loads a GGUF LoRA adapter (llama.cpp's format: `general.type = "adapter"`, `adapter.type =
/// "lora"`, `adapter.lora.alpha`, tensors `<base>.weight.lora_a` [r, in] and `.lora_b` [out, r]
/// in F32/F16/BF16/Q8_0). Modules are named by their base tensor without `.weight`
/// (`blk.0.attn_q`); alpha 0 gives RF_SCALING_FIXED scale 1, else RF_SCALING_LORA with that
/// alpha (a file written by rankfuse restores each unfolded module's own rule). F32/F16/BF16
/// tensors are used in place from the file's mapping; Q8_0 is decoded to F32. A non-adapter
/// file, a lone lora_a or lora_b, a rank mismatch, another suffix or dtype is an error naming
/// the tensor; `*out` is written only on success. On a CUDA runtime the modules are uploaded as
/// in `rf_adapter_load_peft`. The caller owns `*out` (free with `rf_adapter_free`).
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_load_gguf(
    rt: *mut rf_runtime,
    path: *const c_char,
    out: *mut *mut rf_adapter,
) -> *mut rf_error {
    boundary!({
        let rt = arg_ref(rt, "rt")?;
        let path = arg_str(path, "path")?;
        let out = arg_out(out, "out")?;
        let a = gguf::load(Path::new(path))?;
        *out = Box::into_raw(Box::new(rf_adapter::on_runtime(a, &rt.inner)?));
        Ok(())
    })
}

/// Writes the adapter as a GGUF LoRA file that llama.cpp's `llama_adapter_lora_init` loads
/// (GGUF v3, alignment 32, tensor data contiguous in declaration order). Each module's rank in
/// use is written, with training gains folded in; Hugging Face module paths are mapped to GGUF
/// names by the architecture's table (names already in GGUF form are kept; unmapped names are
/// one RF_STATUS_UNSUPPORTED error listing them). See `rf_gguf_alpha` for how the single alpha
/// is chosen. `opts` may be NULL (defaults). Reads the adapter only; the file is written
/// through a temporary beside it and renamed.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_save_gguf(
    a: *const rf_adapter,
    path: *const c_char,
    opts: *const rf_gguf_save_options,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        let path = arg_str(path, "path")?;
        let o = read_options(opts)?;
        gguf::save(&a.inner, Path::new(path), &o).map(|_| ())
    })
}

/// The adapter's architecture (`general.architecture` of the GGUF file it was loaded from), or
/// NULL when it has none (PEFT adapters). Valid until `rf_adapter_free`; read-only, thread-safe.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_architecture(
    a: *const rf_adapter,
    out: *mut *const c_char,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        let out = arg_out(out, "out")?;
        *out = a
            .inner
            .architecture_c()
            .map_or(std::ptr::null(), |c| c.as_ptr());
        Ok(())
    })
}

/// Checks the adapter against base weights: every module `m` needs a base tensor `m.weight` of
/// shape [out, in] (RF_STATUS_NOT_FOUND / RF_STATUS_SHAPE naming the module and tensor), and a
/// GGUF base's `general.architecture` must equal the adapter's when both are known
/// (RF_STATUS_INVALID_ARGUMENT). Read-only on both.
#[no_mangle]
pub unsafe extern "C" fn rf_adapter_check_base(
    a: *const rf_adapter,
    base: *const rf_weights,
) -> *mut rf_error {
    boundary!({
        let a = arg_ref(a, "a")?;
        let w = arg_ref(base, "base")?;
        gguf::check_base(&a.inner, &w.inner)
    })
}
