"""ctypes declarations of the rankfuse C ABI and the library loader.

The tables below are a static copy of include/rankfuse.h: tests/test_header.py parses the header
and fails when a function, struct field, enum constant or macro here differs from it (or is
missing). When the header grows, print the missing declarations with

    python bindings/python/rankfuse/_cheader.py include/rankfuse.h

and paste them where each block says (opaque classes + OPAQUE, ENUMS, struct classes +
STRUCTS, FUNCTIONS), then add the Python method that uses them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import (
    POINTER,
    c_bool,
    c_char,
    c_char_p,
    c_double,
    c_float,
    c_int,
    c_int32,
    c_int64,
    c_size_t,
    c_uint8,
    c_uint32,
    c_uint64,
    c_void_p,
)
from pathlib import Path

ABI_VERSION = 1  # RF_ABI_VERSION of the header these declarations copy

# C enums are passed as int (cbindgen emits plain C enums).
c_enum = c_int
P = POINTER

# Enum constants, by C type name: {C constant: value}.
ENUMS = {
    "rf_scaling": {"RF_SCALING_LORA": 0, "RF_SCALING_RSLORA": 1, "RF_SCALING_FIXED": 2},
    "rf_gguf_alpha": {"RF_GGUF_ALPHA_AUTO": 0, "RF_GGUF_ALPHA_FOLD": 1},
    "rf_dtype": {
        "RF_DTYPE_F32": 0,
        "RF_DTYPE_F16": 1,
        "RF_DTYPE_BF16": 2,
        "RF_DTYPE_Q8_0": 3,
        "RF_DTYPE_Q4_0": 4,
        "RF_DTYPE_Q4_K": 5,
        "RF_DTYPE_Q6_K": 6,
    },
    "rf_meta_type": {
        "RF_META_U8": 0,
        "RF_META_I8": 1,
        "RF_META_U16": 2,
        "RF_META_I16": 3,
        "RF_META_U32": 4,
        "RF_META_I32": 5,
        "RF_META_F32": 6,
        "RF_META_BOOL": 7,
        "RF_META_STRING": 8,
        "RF_META_ARRAY": 9,
        "RF_META_U64": 10,
        "RF_META_I64": 11,
        "RF_META_F64": 12,
    },
    "rf_status": {
        "RF_STATUS_OK": 0,
        "RF_STATUS_INVALID_ARGUMENT": 1,
        "RF_STATUS_SHAPE": 2,
        "RF_STATUS_DTYPE": 3,
        "RF_STATUS_NOT_FOUND": 4,
        "RF_STATUS_IO": 5,
        "RF_STATUS_FORMAT": 6,
        "RF_STATUS_UNSUPPORTED": 7,
        "RF_STATUS_DEVICE": 8,
        "RF_STATUS_OUT_OF_MEMORY": 9,
        "RF_STATUS_NUMERIC": 10,
        "RF_STATUS_INTERNAL": 11,
    },
    "rf_device": {"RF_DEVICE_CPU": 0, "RF_DEVICE_CUDA": 1},
    "rf_act_quant": {"RF_ACT_QUANT_EXACT": 0, "RF_ACT_QUANT_Q8": 1},
    "rf_backward_mode": {"RF_BACKWARD_NESTED": 0, "RF_BACKWARD_FROZEN": 1},
    "rf_module_kind": {"RF_MODULE_KIND_LORA": 0, "RF_MODULE_KIND_KRADAPTER": 1, "RF_MODULE_KIND_EIGENLORAX": 2},
}


# ---------------------------------------------------------------- opaque handles
class rf_adapter(ctypes.Structure):
    pass


class rf_dylora_sampler(ctypes.Structure):
    pass


class rf_eigen_adapter(ctypes.Structure):
    pass


class rf_eigen_basis(ctypes.Structure):
    pass


class rf_elalora(ctypes.Structure):
    pass


class rf_error(ctypes.Structure):
    pass


class rf_lora(ctypes.Structure):
    pass


class rf_packed(ctypes.Structure):
    pass


class rf_runtime(ctypes.Structure):
    pass


class rf_store(ctypes.Structure):
    pass


class rf_weights(ctypes.Structure):
    pass


OPAQUE = {c.__name__: c for c in (
    rf_adapter,
    rf_dylora_sampler,
    rf_eigen_adapter,
    rf_eigen_basis,
    rf_elalora,
    rf_error,
    rf_lora,
    rf_packed,
    rf_runtime,
    rf_store,
    rf_weights,
)}
ERR = P(rf_error)


# ---------------------------------------------------------------- structs
class rf_lora_info(ctypes.Structure):
    _fields_ = [
        ("in_features", c_int64),
        ("out_features", c_int64),
        ("capacity", c_uint32),
        ("rank", c_uint32),
        ("alpha", c_float),
        ("scale", c_float),
        ("scaling", c_enum),
        ("dtype", c_enum),
    ]


class rf_packed_info(ctypes.Structure):
    _fields_ = [
        ("rows", c_int64),
        ("cols", c_int64),
        ("dtype", c_enum),
        ("bytes", c_size_t),
        ("panel_cols", c_uint32),
        ("kernels", c_char_p),
    ]


class rf_store_stats(ctypes.Structure):
    _fields_ = [
        ("registered", c_uint64),
        ("resident", c_uint64),
        ("bytes_resident", c_uint64),
        ("in_use", c_uint64),
        ("pinned", c_uint64),
        ("hits", c_uint64),
        ("loads", c_uint64),
        ("load_failures", c_uint64),
        ("evictions", c_uint64),
        ("publishes", c_uint64),
        ("budget_bytes", c_uint64),
    ]


class rf_gguf_save_options(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("alpha", c_enum),
        ("architecture", c_char_p),
        ("n_head", c_uint32),
        ("n_head_kv", c_uint32),
    ]


class rf_extract_options(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("rank", c_uint32),
        ("energy", c_double),
        ("max_rank", c_uint32),
        ("rslora", c_uint32),
        ("modules", c_char_p),
        ("dtype", c_enum),
        ("oversample", c_uint32),
        ("power_iters", c_uint32),
        ("seed", c_uint64),
        ("threads", c_uint32),
        ("write_svg", c_uint32),
    ]


class rf_matrix(ctypes.Structure):
    _fields_ = [
        ("data", c_void_p),
        ("dtype", c_enum),
        ("rows", c_int64),
        ("cols", c_int64),
        ("ld", c_int64),
    ]


class rf_lora_slot(ctypes.Structure):
    _fields_ = [
        ("lora", P(rf_lora)),
        ("rank", c_uint32),
        ("scale_mult", c_float),
    ]


class rf_runtime_options(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("device", c_enum),
        ("device_index", c_int32),
        ("num_threads", c_uint32),
        ("cuda_stream", c_void_p),
        ("act_quant", c_enum),
    ]


class rf_adamw_options(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("lr", c_float),
        ("beta1", c_float),
        ("beta2", c_float),
        ("eps", c_float),
        ("weight_decay", c_float),
    ]


class rf_elalora_options(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("target_total_rank", c_uint32),
        ("warmup_steps", c_uint32),
        ("final_steps", c_uint32),
        ("total_steps", c_uint32),
        ("interval", c_uint32),
        ("max_change", c_uint32),
        ("beta1", c_float),
        ("beta2", c_float),
        ("seed", c_uint64),
    ]


class rf_weights_open_options(ctypes.Structure):
    _fields_ = [
        ("struct_size", c_uint32),
        ("flags", c_uint32),
    ]


STRUCTS = {c.__name__: c for c in (
    rf_lora_info,
    rf_packed_info,
    rf_store_stats,
    rf_gguf_save_options,
    rf_extract_options,
    rf_matrix,
    rf_lora_slot,
    rf_runtime_options,
    rf_adamw_options,
    rf_elalora_options,
    rf_weights_open_options,
)}

# ---------------------------------------------------------------- function-pointer types
# C callbacks: wrap a Python callable as rf_progress_fn(fn); keep the wrapper alive for the call.
rf_progress_fn = ctypes.CFUNCTYPE(None, c_void_p, c_size_t, c_size_t, c_char_p)

FUNCPTRS = {
    "rf_progress_fn": rf_progress_fn,
}

# ---------------------------------------------------------------- functions
# name: (restype, [argtypes]) — the order of include/rankfuse.h.
FUNCTIONS = {
    "rf_adapter_load_peft": (ERR, [P(rf_runtime), c_char_p, P(P(rf_adapter))]),
    "rf_adapter_save_peft": (ERR, [P(rf_adapter), c_char_p]),
    "rf_adapter_free": (None, [P(rf_adapter)]),
    "rf_adapter_module_count": (c_size_t, [P(rf_adapter)]),
    "rf_adapter_module_name": (ERR, [P(rf_adapter), c_size_t, P(c_char_p)]),
    "rf_adapter_module": (ERR, [P(rf_adapter), c_char_p, P(P(rf_lora))]),
    "rf_lora_info_get": (ERR, [P(rf_lora), P(rf_lora_info)]),
    "rf_lora_set_rank": (ERR, [P(rf_lora), c_uint32]),
    "rf_gguf_save_options_default": (ERR, [P(rf_gguf_save_options)]),
    "rf_adapter_load_gguf": (ERR, [P(rf_runtime), c_char_p, P(P(rf_adapter))]),
    "rf_adapter_save_gguf": (ERR, [P(rf_adapter), c_char_p, P(rf_gguf_save_options)]),
    "rf_adapter_architecture": (ERR, [P(rf_adapter), P(c_char_p)]),
    "rf_adapter_check_base": (ERR, [P(rf_adapter), P(rf_weights)]),
    "rf_extract_options_default": (ERR, [P(rf_extract_options)]),
    "rf_extract_peft": (ERR, [P(rf_runtime), c_char_p, c_char_p, P(rf_extract_options), rf_progress_fn, c_void_p, c_char_p]),
    "rf_lora_merge": (ERR, [P(rf_runtime), P(rf_lora), c_uint32, c_float, P(rf_matrix)]),
    "rf_lora_unmerge": (ERR, [P(rf_runtime), P(rf_lora), c_uint32, c_float, P(rf_matrix)]),
    "rf_eigen_basis_load": (ERR, [P(rf_runtime), c_char_p, P(P(rf_eigen_basis))]),
    "rf_eigen_basis_free": (None, [P(rf_eigen_basis)]),
    "rf_eigen_adapter_load": (ERR, [P(rf_eigen_basis), c_char_p, P(P(rf_eigen_adapter))]),
    "rf_eigen_adapter_free": (None, [P(rf_eigen_adapter)]),
    "rf_eigen_adapter_to_adapter": (ERR, [P(rf_eigen_basis), P(rf_eigen_adapter), P(P(rf_adapter))]),
    "rf_eigen_linear": (ERR, [P(rf_runtime), P(rf_eigen_basis), c_char_p, P(rf_matrix), P(rf_matrix), P(rf_matrix), P(P(rf_eigen_adapter)), c_size_t, P(c_int32), P(rf_matrix)]),
    "rf_device_alloc": (ERR, [P(rf_runtime), c_size_t, P(c_void_p)]),
    "rf_device_free": (ERR, [P(rf_runtime), c_void_p]),
    "rf_copy_to_device": (ERR, [P(rf_runtime), c_void_p, c_void_p, c_size_t]),
    "rf_copy_to_host": (ERR, [P(rf_runtime), c_void_p, c_void_p, c_size_t]),
    "rf_runtime_synchronize": (ERR, [P(rf_runtime)]),
    "rf_error_code": (c_enum, [P(rf_error)]),
    "rf_error_message": (c_char_p, [P(rf_error)]),
    "rf_error_free": (None, [P(rf_error)]),
    "rf_lora_kind": (ERR, [P(rf_lora), P(c_enum)]),
    "rf_adapter_add_kradapter": (ERR, [P(rf_adapter), c_char_p, c_int64, c_int64, c_float, c_uint64, P(P(rf_lora))]),
    "rf_adapter_add_eigenlorax": (ERR, [P(rf_adapter), P(rf_eigen_basis), c_char_p, c_uint32, c_float, c_uint64, P(P(rf_lora))]),
    "rf_adapter_load_eigenlorax": (ERR, [P(rf_runtime), P(rf_eigen_basis), c_char_p, P(P(rf_adapter))]),
    "rf_eigen_basis_save": (ERR, [P(rf_eigen_basis), c_char_p]),
    "rf_eigen_basis_build": (ERR, [P(P(rf_adapter)), c_size_t, c_uint32, c_uint32, c_uint64, P(P(rf_eigen_basis))]),
    "rf_linear": (ERR, [P(rf_runtime), P(rf_matrix), P(rf_matrix), P(rf_matrix), P(rf_lora_slot), c_size_t, P(c_int32), P(rf_matrix)]),
    "rf_weights_pack": (ERR, [P(rf_runtime), P(rf_matrix), P(P(rf_packed))]),
    "rf_packed_free": (None, [P(rf_packed)]),
    "rf_packed_info_get": (ERR, [P(rf_packed), P(rf_packed_info)]),
    "rf_linear_packed": (ERR, [P(rf_runtime), P(rf_matrix), P(rf_packed), P(rf_matrix), P(rf_lora_slot), c_size_t, P(c_int32), P(rf_matrix)]),
    "rf_store_create": (ERR, [P(rf_runtime), c_uint64, P(P(rf_store))]),
    "rf_store_free": (None, [P(rf_store)]),
    "rf_store_register": (ERR, [P(rf_store), c_char_p, c_char_p]),
    "rf_store_acquire": (ERR, [P(rf_store), c_char_p, P(P(rf_adapter))]),
    "rf_store_release": (None, [P(rf_adapter)]),
    "rf_store_pin": (ERR, [P(rf_store), c_char_p, c_bool]),
    "rf_store_trim": (ERR, [P(rf_store), P(c_size_t)]),
    "rf_store_stats_get": (ERR, [P(rf_store), P(rf_store_stats)]),
    "rf_store_publish_peft": (ERR, [P(rf_store), c_char_p, c_char_p, P(c_uint64)]),
    "rf_store_publish": (ERR, [P(rf_store), c_char_p, P(rf_adapter), P(c_uint64)]),
    "rf_adapter_version": (ERR, [P(rf_adapter), P(c_uint64), P(c_uint64)]),
    "rf_abi_version": (c_uint32, []),
    "rf_version": (c_char_p, []),
    "rf_runtime_create": (ERR, [P(rf_runtime_options), P(P(rf_runtime))]),
    "rf_runtime_free": (None, [P(rf_runtime)]),
    "rf_runtime_info": (ERR, [P(rf_runtime), P(c_char), c_size_t, P(c_size_t)]),
    "rf_adapter_new": (ERR, [c_char_p, P(P(rf_adapter))]),
    "rf_adapter_add_lora": (ERR, [P(rf_adapter), c_char_p, c_int64, c_int64, c_uint32, c_float, c_uint32, c_uint32, c_uint64, P(P(rf_lora))]),
    "rf_adapter_train_enable": (ERR, [P(rf_adapter)]),
    "rf_lora_enable_gains": (ERR, [P(rf_lora), c_float]),
    "rf_lora_set_mask": (ERR, [P(rf_lora), P(c_uint8), c_size_t]),
    "rf_lora_get_mask": (ERR, [P(rf_lora), P(c_uint8), c_size_t]),
    "rf_lora_weights": (ERR, [P(rf_lora), P(rf_matrix), P(rf_matrix)]),
    "rf_lora_set_weights": (ERR, [P(rf_lora), P(rf_matrix), P(rf_matrix)]),
    "rf_lora_backward": (ERR, [P(rf_runtime), P(rf_lora), P(rf_matrix), P(rf_matrix), P(rf_matrix), c_uint32, c_uint32, P(rf_matrix)]),
    "rf_lora_zero_grad": (ERR, [P(rf_lora)]),
    "rf_adapter_zero_grad": (ERR, [P(rf_adapter)]),
    "rf_adapter_clip_grad_norm": (ERR, [P(rf_adapter), c_float, P(c_double)]),
    "rf_lora_adamw_step": (ERR, [P(rf_lora), P(rf_adamw_options)]),
    "rf_adapter_adamw_step": (ERR, [P(rf_adapter), P(rf_adamw_options)]),
    "rf_dylora_sampler_create": (ERR, [c_uint64, c_uint32, c_uint32, P(P(rf_dylora_sampler))]),
    "rf_dylora_sampler_next": (ERR, [P(rf_dylora_sampler), P(c_uint32)]),
    "rf_dylora_sampler_free": (None, [P(rf_dylora_sampler)]),
    "rf_elalora_create": (ERR, [P(rf_adapter), P(rf_elalora_options), P(P(rf_elalora))]),
    "rf_elalora_update": (ERR, [P(rf_elalora), P(rf_adapter), c_uint32, P(c_uint32)]),
    "rf_elalora_free": (None, [P(rf_elalora)]),
    "rf_weights_open": (ERR, [P(rf_runtime), c_char_p, P(P(rf_weights))]),
    "rf_weights_free": (None, [P(rf_weights)]),
    "rf_weights_open_ex": (ERR, [P(rf_runtime), c_char_p, P(rf_weights_open_options), P(P(rf_weights))]),
    "rf_weights_count": (c_size_t, [P(rf_weights)]),
    "rf_weights_name": (ERR, [P(rf_weights), c_size_t, P(c_char_p)]),
    "rf_weights_get": (ERR, [P(rf_weights), c_char_p, P(rf_matrix)]),
    "rf_weights_meta_count": (c_size_t, [P(rf_weights)]),
    "rf_weights_meta_key": (ERR, [P(rf_weights), c_size_t, P(c_char_p)]),
    "rf_weights_meta_type": (ERR, [P(rf_weights), c_char_p, P(c_enum)]),
    "rf_weights_meta_array_len": (ERR, [P(rf_weights), c_char_p, P(c_enum), P(c_size_t)]),
    "rf_weights_meta_get_u64": (ERR, [P(rf_weights), c_char_p, P(c_uint64)]),
    "rf_weights_meta_get_i64": (ERR, [P(rf_weights), c_char_p, P(c_int64)]),
    "rf_weights_meta_get_f64": (ERR, [P(rf_weights), c_char_p, P(c_double)]),
    "rf_weights_meta_get_bool": (ERR, [P(rf_weights), c_char_p, P(c_bool)]),
    "rf_weights_meta_get_str": (ERR, [P(rf_weights), c_char_p, P(c_char_p), P(c_size_t)]),
    "rf_weights_meta_array_get_u64": (ERR, [P(rf_weights), c_char_p, c_size_t, P(c_uint64)]),
    "rf_weights_meta_array_get_i64": (ERR, [P(rf_weights), c_char_p, c_size_t, P(c_int64)]),
    "rf_weights_meta_array_get_f64": (ERR, [P(rf_weights), c_char_p, c_size_t, P(c_double)]),
    "rf_weights_meta_array_get_str": (ERR, [P(rf_weights), c_char_p, c_size_t, P(c_char_p), P(c_size_t)]),
}

# ---------------------------------------------------------------- loading

_LIB_NAMES = ("librankfuse.so", "librankfuse.so.0", "librankfuse.dylib", "rankfuse.dll")


def _candidates():
    env = os.environ.get("RANKFUSE_LIB")
    if env:
        yield Path(env)
        return
    here = Path(__file__).resolve().parent
    for name in _LIB_NAMES:  # a wheel ships the library next to the package
        yield here / name
    for parent in here.parents:  # a source checkout: <repo>/target/release
        if (parent / "Cargo.toml").is_file():
            for name in _LIB_NAMES:
                yield parent / "target" / "release" / name
            break
    found = ctypes.util.find_library("rankfuse")  # an installed library
    if found:
        yield Path(found)


def load_library() -> ctypes.CDLL:
    """Loads librankfuse (RANKFUSE_LIB, next to the package, the checkout's target/release, then
    the system's library path), declares every function and checks the ABI version."""
    tried = []
    for path in _candidates():
        if path.is_absolute() and not path.exists():
            tried.append(f"{path} (missing)")
            continue
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            tried.append(f"{path} ({e})")
            continue
        declare(lib)
        abi = lib.rf_abi_version()
        if abi != ABI_VERSION:
            raise ImportError(
                f"{path} implements rankfuse ABI {abi}; this package declares ABI {ABI_VERSION}"
            )
        return lib
    raise ImportError(
        "librankfuse not found; build it with `cargo build --release` or set RANKFUSE_LIB. "
        "Tried: " + "; ".join(tried or ["nothing"])
    )


def declare(lib: ctypes.CDLL) -> None:
    for name, (restype, argtypes) in FUNCTIONS.items():
        try:
            f = getattr(lib, name)
        except AttributeError:
            raise ImportError(
                f"{lib._name} has no {name}: the library is older than this package"
            ) from None
        f.restype = restype
        f.argtypes = argtypes
