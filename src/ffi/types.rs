//! Plain C types of the ABI: status and dtype numbers, matrix views, options and info structs.

use std::ffi::c_void;

/// ABI version; bumped on any change to an existing signature or struct layout.
pub const RF_ABI_VERSION: u32 = 1;
// The core owns the number (it reports it in rf_runtime_info); the header repeats it literally.
const _: () = assert!(RF_ABI_VERSION == crate::ABI_VERSION);
pub const RF_VERSION_MAJOR: u32 = 0;
pub const RF_VERSION_MINOR: u32 = 1;
pub const RF_VERSION_PATCH: u32 = 0;
/// Also `#define RF_VERSION_STRING` in the header (cbindgen.toml, checked by tests/header.rs).
pub const RF_VERSION_STRING: &str = "0.1.0";

/// Stable status numbers; append-only, retired numbers are never reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_status {
    RF_STATUS_OK = 0,
    RF_STATUS_INVALID_ARGUMENT = 1,
    RF_STATUS_SHAPE = 2,
    RF_STATUS_DTYPE = 3,
    RF_STATUS_NOT_FOUND = 4,
    RF_STATUS_IO = 5,
    RF_STATUS_FORMAT = 6,
    RF_STATUS_UNSUPPORTED = 7,
    RF_STATUS_DEVICE = 8,
    RF_STATUS_OUT_OF_MEMORY = 9,
    RF_STATUS_NUMERIC = 10,
    RF_STATUS_INTERNAL = 11,
}

/// Element types.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_dtype {
    RF_DTYPE_F32 = 0,
    RF_DTYPE_F16 = 1,
    RF_DTYPE_BF16 = 2,
    /// llama.cpp Q8_0: blocks of 32 weights in 34 bytes (f16 scale, 32 x int8). Block-quantized
    /// dtypes are valid only as `w` of `rf_linear`; `cols` and `ld` count elements and must be
    /// multiples of the block (32 here), else RF_STATUS_SHAPE.
    RF_DTYPE_Q8_0 = 3,
    /// llama.cpp Q4_0: blocks of 32 weights in 18 bytes (f16 scale, 16 bytes of 4-bit values).
    RF_DTYPE_Q4_0 = 4,
    /// llama.cpp Q4_K: super-blocks of 256 weights in 144 bytes; `cols`/`ld` multiples of 256.
    RF_DTYPE_Q4_K = 5,
    /// llama.cpp Q6_K: super-blocks of 256 weights in 210 bytes; `cols`/`ld` multiples of 256.
    RF_DTYPE_Q6_K = 6,
}

/// Types of metadata values (`rf_weights_meta_type`); the numbers are GGUF's value types.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_meta_type {
    RF_META_U8 = 0,
    RF_META_I8 = 1,
    RF_META_U16 = 2,
    RF_META_I16 = 3,
    RF_META_U32 = 4,
    RF_META_I32 = 5,
    RF_META_F32 = 6,
    RF_META_BOOL = 7,
    /// Length-prefixed bytes (safetensors `__metadata__` values are all strings).
    RF_META_STRING = 8,
    /// Elements of one type (arrays of arrays are possible); see `rf_weights_meta_array_len`.
    RF_META_ARRAY = 9,
    RF_META_U64 = 10,
    RF_META_I64 = 11,
    RF_META_F64 = 12,
}

/// Devices a runtime can drive.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_device {
    RF_DEVICE_CPU = 0,
    RF_DEVICE_CUDA = 1,
}

/// How decode on a block-quantized W (Q8_0 / Q4_0 / Q4_K / Q6_K) reads x (`rf_runtime_options`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_act_quant {
    /// x as given: the result is the exactly dequantized W times x (the default).
    RF_ACT_QUANT_EXACT = 0,
    /// Calls with m <= 8 rows quantize each 32-value block of x to int8 with an f32 scale
    /// (llama.cpp's Q8_0 activations) and take integer dot products with W's blocks: faster,
    /// and each x value moves by at most max|x_block| / 254. The adapter part stays exact;
    /// larger batches, dense W and CUDA runtimes are computed exactly.
    RF_ACT_QUANT_Q8 = 1,
}

/// How a LoRA's scale follows the rank in use.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_scaling {
    /// alpha / r (r = rank in use)
    RF_SCALING_LORA = 0,
    /// alpha / sqrt(r)
    RF_SCALING_RSLORA = 1,
    /// a constant scale, whatever the rank (AdaLoRA/ElaLoRA, KRAdapter, EigenLoRAx)
    RF_SCALING_FIXED = 2,
}

/// What a module (`rf_lora` handle) is. Every kind serves in `rf_linear` slots (mixed with the
/// others), trains with `rf_lora_backward` / `rf_lora_adamw_step` and saves with
/// `rf_adapter_save_peft`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum rf_module_kind {
    /// LoRA: A (capacity x in), B (out x capacity); rank = components in use.
    RF_MODULE_KIND_LORA = 0,
    /// KRAdapter (Khatri-Rao update): A = U (m x r), B = V^T ((r + d) x m), m = min(in, out);
    /// no rank truncation (rank is 1).
    RF_MODULE_KIND_KRADAPTER = 1,
    /// EigenLoRAx loadings on a shared basis: A = alpha_A^T (r x K), B = alpha_B (K x r);
    /// rank = basis components in use (1..K).
    RF_MODULE_KIND_EIGENLORAX = 2,
}

/// A 2-D row-major matrix view. `data` is a host pointer on a CPU runtime and a CUDA device
/// pointer on a CUDA runtime. `ld` = elements between the starts of two rows (>= cols). A bias or
/// other vector is a 1 x n matrix. The runtime never frees `data`. `data` need not be aligned.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_matrix {
    pub data: *mut c_void,
    pub dtype: rf_dtype,
    pub rows: i64,
    pub cols: i64,
    pub ld: i64,
}

/// Options of `rf_runtime_create`. Set `struct_size = sizeof(rf_runtime_options)`; a
/// `struct_size` of the 0.1 layout (without `act_quant`, 24 bytes on LP64) is accepted and the
/// missing fields take their defaults.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_runtime_options {
    pub struct_size: u32,
    pub device: rf_device,
    pub device_index: i32,
    /// CPU threads; 0 = all cores.
    pub num_threads: u32,
    /// CUstream to run on; NULL = the runtime's own.
    pub cuda_stream: *mut c_void,
    /// How decode on a block-quantized W reads x; 0 = RF_ACT_QUANT_EXACT.
    pub act_quant: rf_act_quant,
}

/// What `rf_lora_info_get` reports. `scale` is the scale at the current `rank`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_lora_info {
    pub in_features: i64,
    pub out_features: i64,
    pub capacity: u32,
    pub rank: u32,
    pub alpha: f32,
    pub scale: f32,
    pub scaling: rf_scaling,
    pub dtype: rf_dtype,
}

/// One adapter slot of a fused call.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct rf_lora_slot {
    /// NULL = no adapter in this slot.
    pub lora: *const crate::ffi::handles::rf_lora,
    /// 0 = the lora's current rank; else use its first `rank` components.
    pub rank: u32,
    /// Multiplies the lora's scale; 1.0 = as configured.
    pub scale_mult: f32,
}

impl From<crate::error::Status> for rf_status {
    fn from(s: crate::error::Status) -> rf_status {
        use crate::error::Status as S;
        match s {
            S::InvalidArgument => rf_status::RF_STATUS_INVALID_ARGUMENT,
            S::Shape => rf_status::RF_STATUS_SHAPE,
            S::DType => rf_status::RF_STATUS_DTYPE,
            S::NotFound => rf_status::RF_STATUS_NOT_FOUND,
            S::Io => rf_status::RF_STATUS_IO,
            S::Format => rf_status::RF_STATUS_FORMAT,
            S::Unsupported => rf_status::RF_STATUS_UNSUPPORTED,
            S::Device => rf_status::RF_STATUS_DEVICE,
            S::OutOfMemory => rf_status::RF_STATUS_OUT_OF_MEMORY,
            S::Numeric => rf_status::RF_STATUS_NUMERIC,
            S::Internal => rf_status::RF_STATUS_INTERNAL,
        }
    }
}

impl From<crate::DType> for rf_dtype {
    fn from(d: crate::DType) -> rf_dtype {
        match d {
            crate::DType::F32 => rf_dtype::RF_DTYPE_F32,
            crate::DType::F16 => rf_dtype::RF_DTYPE_F16,
            crate::DType::BF16 => rf_dtype::RF_DTYPE_BF16,
            crate::DType::Q8_0 => rf_dtype::RF_DTYPE_Q8_0,
            crate::DType::Q4_0 => rf_dtype::RF_DTYPE_Q4_0,
            crate::DType::Q4_K => rf_dtype::RF_DTYPE_Q4_K,
            crate::DType::Q6_K => rf_dtype::RF_DTYPE_Q6_K,
        }
    }
}

impl From<crate::Scaling> for rf_scaling {
    fn from(s: crate::Scaling) -> rf_scaling {
        match s {
            crate::Scaling::Lora => rf_scaling::RF_SCALING_LORA,
            crate::Scaling::RsLora => rf_scaling::RF_SCALING_RSLORA,
            crate::Scaling::Fixed => rf_scaling::RF_SCALING_FIXED,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn version_macros_match_cargo() {
        assert_eq!(super::RF_VERSION_STRING, env!("CARGO_PKG_VERSION"));
        assert_eq!(
            super::RF_VERSION_MAJOR.to_string(),
            env!("CARGO_PKG_VERSION_MAJOR")
        );
        assert_eq!(
            super::RF_VERSION_MINOR.to_string(),
            env!("CARGO_PKG_VERSION_MINOR")
        );
        assert_eq!(
            super::RF_VERSION_PATCH.to_string(),
            env!("CARGO_PKG_VERSION_PATCH")
        );
    }
}
