"""rankfuse: low-rank adapters (LoRA) on frozen base weights — a thin ctypes binding of the C ABI.

    import numpy as np, rankfuse
    with rankfuse.Runtime() as rt:
        base = rt.open_weights("base.safetensors")          # memory-mapped
        lora = rt.load_peft("adapters/lora-r8")["layers.0.mlp.up_proj"]
        y = rt.linear(x, base["layers.0.mlp.up_proj.weight"], slots=[lora])

Arrays: numpy float32 is F32, float16 is F16, and uint16 holds bfloat16 bits (BF16; an
ml_dtypes.bfloat16 array is accepted too). Inputs are passed without copies: 2-D arrays with
unit column stride (a row stride >= cols is fine), 1-D arrays as 1 x n. Weights[name] returns a
read-only zero-copy view of the mapped file that keeps the Weights alive.

Errors raise rankfuse.Error with .status (a Status) and .message (the library's message).
Objects keep what they need alive: a Lora its Adapter, an Adapter or Weights their Runtime.
close() (or a with block) frees early and is idempotent; a closed Runtime frees its C object
once the objects made with it are closed or collected.
"""

from __future__ import annotations

import ctypes
import enum
import json
import threading
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np

from . import _ffi
from ._ffi import rf_lora_slot, rf_matrix

__all__ = [
    "ABI_VERSION",
    "Adapter",
    "BackwardMode",
    "DType",
    "Device",
    "ActQuant",
    "EigenBasis",
    "Error",
    "Lora",
    "LoraInfo",
    "ModuleKind",
    "Packed",
    "PackedInfo",
    "Runtime",
    "Scaling",
    "Slot",
    "Status",
    "Store",
    "StoreStats",
    "Weights",
    "abi_version",
    "adamw_options",
    "bf16_to_f32",
    "f32_to_bf16",
    "version",
]

_lib = _ffi.load_library()

ABI_VERSION = _ffi.ABI_VERSION


def _enum(name: str, cname: str, prefix: str):
    return enum.IntEnum(name, {k[len(prefix) :]: v for k, v in _ffi.ENUMS[cname].items()})


Status = _enum("Status", "rf_status", "RF_STATUS_")
DType = _enum("DType", "rf_dtype", "RF_DTYPE_")
Device = _enum("Device", "rf_device", "RF_DEVICE_")
ActQuant = _enum("ActQuant", "rf_act_quant", "RF_ACT_QUANT_")
Scaling = _enum("Scaling", "rf_scaling", "RF_SCALING_")
BackwardMode = _enum("BackwardMode", "rf_backward_mode", "RF_BACKWARD_")
GgufAlpha = _enum("GgufAlpha", "rf_gguf_alpha", "RF_GGUF_ALPHA_")
ModuleKind = _enum("ModuleKind", "rf_module_kind", "RF_MODULE_KIND_")


def version() -> str:
    """The library's version, "MAJOR.MINOR.PATCH"."""
    return _lib.rf_version().decode()


def abi_version() -> int:
    """The ABI version the loaded library implements."""
    return int(_lib.rf_abi_version())


class Error(Exception):
    """A failing rankfuse call: .status (Status) and .message (names the argument/tensor/file)."""

    def __init__(self, status: int, message: str):
        try:
            status = Status(status)
        except ValueError:
            pass  # a status number newer than this package: keep the int
        super().__init__(f"{getattr(status, 'name', status)}: {message}")
        self.status = status
        self.message = message


def _check(err) -> None:
    """Takes ownership of an rf_error*: returns on NULL, else frees it and raises Error."""
    if not err:
        return
    status = _lib.rf_error_code(err)
    message = (_lib.rf_error_message(err) or b"").decode("utf-8", "replace")
    _lib.rf_error_free(err)
    raise Error(status, message)


def _closed(what: str) -> Error:
    return Error(Status.INVALID_ARGUMENT, f"{what} is closed")


# ---------------------------------------------------------------- dtypes and matrices

_NP_DTYPES = {DType.F32: np.dtype(np.float32), DType.F16: np.dtype(np.float16)}


def _dtype_of(a: np.ndarray, name: str) -> DType:
    dt = a.dtype
    if dt == np.float32:
        return DType.F32
    if dt == np.float16:
        return DType.F16
    if dt == np.uint16 or (dt.name == "bfloat16" and dt.itemsize == 2):
        return DType.BF16
    raise Error(
        Status.DTYPE,
        f"{name}: numpy dtype {dt} is not supported (float32, float16, or uint16 holding bf16 bits)",
    )


def _matrix(a, name: str, writable: bool = False) -> rf_matrix:
    """Describes a numpy array as rf_matrix without copying."""
    if not isinstance(a, np.ndarray):
        raise Error(Status.INVALID_ARGUMENT, f"{name}: expected a numpy array, got {type(a).__name__}")
    if a.ndim == 1:
        a = a.reshape(1, -1) if a.size else a.reshape(1, 0)
    if a.ndim != 2:
        raise Error(Status.SHAPE, f"{name}: {a.ndim}-D array; expected 2-D (or 1-D as 1 x n)")
    dtype = _dtype_of(a, name)
    if writable and not a.flags.writeable:
        raise Error(Status.INVALID_ARGUMENT, f"{name}: the array is read-only")
    rows, cols = a.shape
    isz = a.itemsize
    ld = cols
    if rows > 0 and cols > 0:
        if cols > 1 and a.strides[1] != isz:
            raise Error(
                Status.INVALID_ARGUMENT,
                f"{name}: columns are not contiguous (strides {a.strides}); use np.ascontiguousarray",
            )
        if rows > 1:
            s0 = a.strides[0]
            if s0 < 0 or s0 % isz or s0 // isz < cols:
                raise Error(
                    Status.INVALID_ARGUMENT,
                    f"{name}: row stride {s0} bytes is not a row-major layout; use np.ascontiguousarray",
                )
            ld = s0 // isz
    return rf_matrix(a.ctypes.data if a.size else None, int(dtype), rows, cols, ld)


def _array_from(m: rf_matrix, owner) -> np.ndarray:
    """A read-only numpy view of an rf_matrix whose memory `owner` keeps alive."""
    dtype = DType(m.dtype)
    npdt = _NP_DTYPES.get(dtype, np.dtype(np.uint16))
    rows, cols, ld = m.rows, m.cols, m.ld
    n = (rows - 1) * ld + cols if rows and cols else 0
    if n == 0:
        return np.empty((rows, cols), dtype=npdt)
    buf = (ctypes.c_uint8 * (n * npdt.itemsize)).from_address(m.data)
    buf._rankfuse_owner = owner  # the array's base keeps the mapping alive
    flat = np.frombuffer(buf, dtype=npdt)
    arr = np.lib.stride_tricks.as_strided(
        flat, shape=(rows, cols), strides=(ld * npdt.itemsize, npdt.itemsize), writeable=False
    )
    return arr


def f32_to_bf16(a) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even (NaN stays NaN)."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(a, dtype=np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded)


def bf16_to_f32(a) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (np.asarray(a, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---------------------------------------------------------------- handles


class _Handle:
    """A C handle with a reference count: 1 while open + 1 per dependant (an object made with it,
    a numpy view into it). close() drops the first; the C object is freed at zero, so nothing
    that still points into it can dangle."""

    _what = "object"

    def _init_handle(self, ptr) -> None:
        self._ptr = ptr
        self._closed = False
        self._refs = 1
        self._lock = threading.Lock()

    def _live(self):
        if getattr(self, "_closed", True):
            raise _closed(self._what)
        return self._ptr

    def _acquire(self) -> None:
        with self._lock:
            self._refs += 1

    def _release(self) -> None:
        with self._lock:
            self._refs -= 1
            ptr, free = self._ptr, self._refs == 0
            if free:
                self._ptr = None
        if free and ptr:
            self._free(ptr)

    def _free(self, ptr) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Releases this object (idempotent); use raises Error afterwards."""
        if getattr(self, "_closed", True):
            return
        self._closed = True
        self._release()

    def __del__(self):
        self.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------- runtime


class Runtime(_Handle):
    """A runtime (CPU by default). Thread-safe for compute calls (linear). Its C object is freed
    once it is closed and every Weights/Adapter made with it is closed."""

    _what = "runtime"

    def __init__(
        self,
        threads: int = 0,
        device: Device = Device.CPU,
        device_index: int = 0,
        act_quant: ActQuant = ActQuant.EXACT,
    ):
        """act_quant=ActQuant.Q8: decode on block-quantized W quantizes x to int8 per 32 values
        (faster; each x value moves by at most max|block| / 254). The default is exact."""
        opts = _ffi.rf_runtime_options(
            ctypes.sizeof(_ffi.rf_runtime_options),
            int(device),
            device_index,
            threads,
            None,
            int(act_quant),
        )
        ptr = ctypes.POINTER(_ffi.rf_runtime)()
        _check(_lib.rf_runtime_create(ctypes.byref(opts), ctypes.byref(ptr)))
        self._init_handle(ptr)

    def _free(self, ptr) -> None:
        _lib.rf_runtime_free(ptr)

    def info(self) -> dict:
        """Runtime facts (version, backend, CPU features, kernel variant, threads, GPU)."""
        p = self._live()
        n = ctypes.c_size_t()
        _check(_lib.rf_runtime_info(p, None, 0, ctypes.byref(n)))
        buf = ctypes.create_string_buffer(n.value + 1)
        _check(_lib.rf_runtime_info(p, buf, len(buf), ctypes.byref(n)))
        return json.loads(buf.value.decode())

    def open_weights(self, path) -> "Weights":
        """Memory-maps a *.safetensors file or a sharded *.safetensors.index.json."""
        p = self._live()
        out = ctypes.POINTER(_ffi.rf_weights)()
        _check(_lib.rf_weights_open(p, str(path).encode(), ctypes.byref(out)))
        return Weights(out, self)

    def load_peft(self, path) -> "Adapter":
        """Loads a PEFT LoRA folder (adapter_config.json + adapter_model.safetensors) or a
        KRAdapter folder (rankfuse's format). An EigenLoRAx folder needs its basis:
        load_eigenlorax."""
        p = self._live()
        out = ctypes.POINTER(_ffi.rf_adapter)()
        _check(_lib.rf_adapter_load_peft(p, str(path).encode(), ctypes.byref(out)))
        return Adapter(out, self)

    def load_eigenlorax(self, basis: "EigenBasis", path) -> "Adapter":
        """Loads an EigenLoRAx adapter folder (Adapter.save_peft of EigenLoRAx modules) on
        basis, which must be the one it was trained on (a different basis raises
        INVALID_ARGUMENT naming the module). The basis is shared, not copied; the adapter stays
        valid after basis.close()."""
        p = self._live()
        out = ctypes.POINTER(_ffi.rf_adapter)()
        _check(_lib.rf_adapter_load_eigenlorax(p, basis._live(), str(path).encode(), ctypes.byref(out)))
        return Adapter(out, self)

    def load_eigen_basis(self, path) -> "EigenBasis":
        """Loads an EigenLoRAx basis: a folder written by EigenBasis.save, or a
        `rankfuse eigen build` file."""
        p = self._live()
        out = ctypes.POINTER(_ffi.rf_eigen_basis)()
        _check(_lib.rf_eigen_basis_load(p, str(path).encode(), ctypes.byref(out)))
        return EigenBasis(out)

    def load_gguf(self, path) -> "Adapter":
        """Loads a GGUF LoRA adapter (llama.cpp's format). Modules are named by their base
        tensor without '.weight' ("blk.0.attn_q"); Adapter.architecture() gives the model's."""
        p = self._live()
        out = ctypes.POINTER(_ffi.rf_adapter)()
        _check(_lib.rf_adapter_load_gguf(p, str(path).encode(), ctypes.byref(out)))
        return Adapter(out, self)

    def new_adapter(self, name: str = "adapter") -> "Adapter":
        """An empty adapter to add trainable modules to (Adapter.add_lora)."""
        self._live()
        out = ctypes.POINTER(_ffi.rf_adapter)()
        _check(_lib.rf_adapter_new(name.encode(), ctypes.byref(out)))
        return Adapter(out, self)

    def merge(self, lora: "Lora", w: np.ndarray, rank: int = 0, scale_mult: float = 1.0) -> np.ndarray:
        """W += scale * B[:, :r] A[:r] in place (rank 0 = the lora's current rank); returns w.
        w: the writable out x in weight (float32, float16 or uint16 bf16 bits)."""
        wm = _matrix(w, "w", writable=True)
        _check(_lib.rf_lora_merge(self._live(), lora._live(), rank, scale_mult, ctypes.byref(wm)))
        return w

    def unmerge(self, lora: "Lora", w: np.ndarray, rank: int = 0, scale_mult: float = 1.0) -> np.ndarray:
        """The inverse of merge: W -= scale * B[:, :r] A[:r] in place; returns w."""
        wm = _matrix(w, "w", writable=True)
        _check(_lib.rf_lora_unmerge(self._live(), lora._live(), rank, scale_mult, ctypes.byref(wm)))
        return w

    def backward(
        self,
        lora: "Lora",
        x: np.ndarray,
        w: np.ndarray,
        dy: np.ndarray,
        rank: int = 0,
        mode: BackwardMode = BackwardMode.NESTED,
        dx: Union[bool, np.ndarray] = False,
    ) -> Optional[np.ndarray]:
        """Accumulates the lora's gradients for the layer output gradient dy (m x n) of
        y = x W^T + scale * (x A_r^T) B_r^T (rank 0 = current). dx True returns a new float32
        dx = dy W + scale * (dy B_r) A_r (m x k); an array receives it; False skips it."""
        xm, wm, gm = _matrix(x, "x"), _matrix(w, "w"), _matrix(dy, "dy")
        out = None
        if dx is True:
            out = np.empty((xm.rows, xm.cols), dtype=np.float32)
        elif isinstance(dx, np.ndarray):
            out = dx
        dm = None if out is None else _matrix(out, "dx", writable=True)
        _check(
            _lib.rf_lora_backward(
                self._live(),
                lora._live(),
                ctypes.byref(xm),
                ctypes.byref(wm),
                ctypes.byref(gm),
                rank,
                int(mode),
                ctypes.byref(dm) if dm is not None else None,
            )
        )
        return out

    def pack(self, w: np.ndarray) -> "Packed":
        """Packs a frozen base matrix w (n x k; float32, float16 or uint16 bf16 bits) once into
        the layout this runtime's CPU kernels read, for linear(x, packed, ...). The pack is a copy:
        w may change or go afterwards. CPU runtimes only. (Through the C ABI a Q4_0 / Q8_0 GGUF
        view packs too, into 8-row interleaved blocks.)"""
        p = self._live()
        wm = _matrix(w, "w")
        out = ctypes.POINTER(_ffi.rf_packed)()
        _check(_lib.rf_weights_pack(p, ctypes.byref(wm), ctypes.byref(out)))
        return Packed(out)

    def store(self, budget_bytes: int = 0) -> "Store":
        """An adapter store on this runtime's device: adapters registered by name, loaded on
        first use, evicted least-recently-used (when nobody holds them) to stay under
        budget_bytes (0 = no limit)."""
        p = self._live()
        out = ctypes.POINTER(_ffi.rf_store)()
        _check(_lib.rf_store_create(p, budget_bytes, ctypes.byref(out)))
        return Store(out, self)

    def linear(
        self,
        x: np.ndarray,
        w: Union[np.ndarray, "Packed"],
        bias: Optional[np.ndarray] = None,
        slots: Iterable[Union["Lora", "Slot", None]] = (),
        row_slot: Optional[Sequence[int]] = None,
        out: Optional[np.ndarray] = None,
        dtype=np.float32,
    ) -> np.ndarray:
        """y = x W^T + bias + sum over slots of scale(slot) * (x A[:r]^T) B[:, :r]^T.

        x: m x k, w: n x k (nn.Linear layout) or a Packed from pack(w), bias: None or n values. slots: Lora, Slot or None
        (empty slot) entries. row_slot None: every slot applies to every row; else m slot
        indices (-1 = base only). Writes into `out` (m x n, its own memory) or a new array of
        `dtype` (np.float32, np.float16, or np.uint16 for bf16), and returns it.
        """
        p = self._live()
        xm = _matrix(x, "x")
        packed = w if isinstance(w, Packed) else None
        wm = None if packed is not None else _matrix(w, "w")
        n_out = packed.info().rows if packed is not None else wm.rows
        bm = None if bias is None else _matrix(bias, "bias")
        if out is None:
            out = np.empty((xm.rows, n_out), dtype=dtype)
        ym = _matrix(out, "out", writable=True)
        slot_list = [Slot.of(s) for s in slots]
        cslots = (rf_lora_slot * max(len(slot_list), 1))()
        for i, s in enumerate(slot_list):
            lp = s.lora._live() if s.lora is not None else None
            cslots[i] = rf_lora_slot(lp, s.rank, s.scale_mult)
        rs = None
        if row_slot is not None:
            rs = np.ascontiguousarray(row_slot, dtype=np.int32)
            if rs.ndim != 1 or rs.shape[0] != xm.rows:
                raise Error(Status.SHAPE, f"row_slot has {rs.size} entries, x has {xm.rows} rows")
        if packed is not None:
            fn, wref = _lib.rf_linear_packed, packed._live()
        else:
            fn, wref = _lib.rf_linear, ctypes.byref(wm)
        _check(
            fn(
                p,
                ctypes.byref(xm),
                wref,
                ctypes.byref(bm) if bm is not None else None,
                cslots,
                len(slot_list),
                rs.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if rs is not None else None,
                ctypes.byref(ym),
            )
        )
        return out


# ---------------------------------------------------------------- packed base weights


@dataclass(frozen=True)
class PackedInfo:
    rows: int
    cols: int
    dtype: DType
    bytes: int
    panel_cols: int
    kernels: str


class Packed(_Handle):
    """A frozen base matrix packed once for a runtime's CPU kernels (Runtime.pack). Immutable
    and independent of the runtime and of the array it was packed from; safe to share across
    threads. Runtime.linear refuses it (Error INVALID_ARGUMENT) on a runtime whose kernels
    differ from info().kernels."""

    _what = "packed matrix"

    def __init__(self, ptr):
        self._init_handle(ptr)

    def _free(self, ptr) -> None:
        _lib.rf_packed_free(ptr)

    def info(self) -> PackedInfo:
        i = _ffi.rf_packed_info()
        _check(_lib.rf_packed_info_get(self._live(), ctypes.byref(i)))
        return PackedInfo(
            i.rows, i.cols, DType(i.dtype), i.bytes, i.panel_cols, i.kernels.decode()
        )

    @property
    def shape(self) -> tuple:
        i = self.info()
        return (i.rows, i.cols)

    def __repr__(self):
        if self._closed:
            return "Packed(closed)"
        i = self.info()
        return f"Packed({i.rows}x{i.cols} {i.dtype.name} for {i.kernels}, {i.bytes} bytes)"


# ---------------------------------------------------------------- weights


class Weights(_Handle):
    """Opened (memory-mapped) safetensors. Immutable; safe to share across threads. Arrays
    returned by weights[name] keep the mapping alive after close()."""

    _what = "weights"

    def __init__(self, ptr, rt: Runtime):
        self._rt = rt
        rt._acquire()
        self._init_handle(ptr)

    def _free(self, ptr) -> None:
        _lib.rf_weights_free(ptr)
        self._rt._release()

    def __len__(self) -> int:
        return 0 if self._closed else int(_lib.rf_weights_count(self._ptr))

    def names(self) -> list:
        """Tensor names in file order."""
        p = self._live()
        out = []
        for i in range(int(_lib.rf_weights_count(p))):
            n = ctypes.c_char_p()
            _check(_lib.rf_weights_name(p, i, ctypes.byref(n)))
            out.append(n.value.decode())
        return out

    def __iter__(self):
        return iter(self.names())

    def __contains__(self, name) -> bool:
        return name in self.names()

    def matrix(self, name: str) -> rf_matrix:
        """The raw rf_matrix view of a tensor (1-D as 1 x n), valid while the weights are open."""
        m = rf_matrix()
        _check(_lib.rf_weights_get(self._live(), name.encode(), ctypes.byref(m)))
        return m

    def __getitem__(self, name: str) -> np.ndarray:
        """A read-only zero-copy 2-D view (1-D tensors as 1 x n); bf16 tensors come as uint16."""
        return _array_from(self.matrix(name), _ViewOwner(self))


class _ViewOwner:
    """Referenced by the buffer under a numpy view of Weights: holds one reference on them."""

    def __init__(self, w: Weights):
        w._acquire()
        self.w = w

    def __del__(self):
        self.w._release()


# ---------------------------------------------------------------- adapters


class Adapter(_Handle):
    """A loaded adapter: a named set of modules (one kind: LoRA, KRAdapter or EigenLoRAx), indexed
    by the base model's module path. Its Lora objects raise Error once it is closed."""

    _what = "adapter"

    def __init__(self, ptr, rt: Runtime):
        self._rt = rt
        rt._acquire()
        self._init_handle(ptr)

    def _free(self, ptr) -> None:
        _lib.rf_adapter_free(ptr)
        self._rt._release()

    def __len__(self) -> int:
        return 0 if self._closed else int(_lib.rf_adapter_module_count(self._ptr))

    def modules(self) -> list:
        """Module names, sorted."""
        p = self._live()
        out = []
        for i in range(int(_lib.rf_adapter_module_count(p))):
            n = ctypes.c_char_p()
            _check(_lib.rf_adapter_module_name(p, i, ctypes.byref(n)))
            out.append(n.value.decode())
        return out

    def __iter__(self):
        return iter(self.modules())

    def __contains__(self, name) -> bool:
        return name in self.modules()

    def module(self, name: str) -> "Lora":
        out = ctypes.POINTER(_ffi.rf_lora)()
        _check(_lib.rf_adapter_module(self._live(), name.encode(), ctypes.byref(out)))
        return Lora(out, self, name)

    __getitem__ = module

    def version(self) -> tuple:
        """(id, generation) of an adapter from a Store ((0, 0) otherwise): key caches on it."""
        i, g = ctypes.c_uint64(), ctypes.c_uint64()
        _check(_lib.rf_adapter_version(self._live(), ctypes.byref(i), ctypes.byref(g)))
        return i.value, g.value

    def save_peft(self, path) -> None:
        """Writes a PEFT folder (created if missing) that PEFT and rankfuse load back. An
        adapter of KRAdapter or EigenLoRAx modules is written in that method's folder format
        (EigenLoRAx: the loadings only; save the basis once with EigenBasis.save and reload with
        Runtime.load_eigenlorax)."""
        _check(_lib.rf_adapter_save_peft(self._live(), str(path).encode()))

    def save_gguf(
        self,
        path,
        architecture: str = None,
        alpha: GgufAlpha = GgufAlpha.AUTO,
        n_head: int = 0,
        n_head_kv: int = 0,
    ) -> None:
        """Writes a GGUF LoRA adapter llama.cpp loads. architecture: the base's
        general.architecture (default: the adapter's own, from the GGUF it came from); it also
        maps Hugging Face module names. n_head / n_head_kv: needed for llama/mistral q/k modules
        (llama.cpp permutes those rows per head)."""
        o = _ffi.rf_gguf_save_options()
        _check(_lib.rf_gguf_save_options_default(ctypes.byref(o)))
        o.alpha = int(alpha)
        o.architecture = architecture.encode() if architecture else None
        o.n_head, o.n_head_kv = n_head, n_head_kv
        _check(_lib.rf_adapter_save_gguf(self._live(), str(path).encode(), ctypes.byref(o)))

    def architecture(self):
        """general.architecture of the GGUF file the adapter came from, or None."""
        out = ctypes.c_char_p()
        _check(_lib.rf_adapter_architecture(self._live(), ctypes.byref(out)))
        return None if out.value is None else out.value.decode()

    def check_base(self, base: "Weights") -> None:
        """Raises Error unless every module has a base tensor '<module>.weight' of shape
        [out, in] and a GGUF base's architecture matches."""
        _check(_lib.rf_adapter_check_base(self._live(), base._live()))

    # Training (each needs exclusive access to the adapter).
    def add_lora(
        self,
        module: str,
        in_features: int,
        out_features: int,
        capacity: int,
        alpha: float,
        scaling: Scaling = Scaling.LORA,
        dtype: DType = DType.F32,
        seed: int = 0,
    ) -> "Lora":
        """Appends a trainable module (PEFT init: A kaiming-uniform from seed, B = 0; rank =
        capacity). dtype is the compute dtype; masters and optimizer state are f32."""
        out = ctypes.POINTER(_ffi.rf_lora)()
        _check(
            _lib.rf_adapter_add_lora(
                self._live(), module.encode(), in_features, out_features, capacity, alpha,
                int(scaling), int(dtype), seed, ctypes.byref(out),
            )
        )
        return Lora(out, self, module)

    def add_kradapter(
        self, module: str, in_features: int, out_features: int, scale: float = 2.0, seed: int = 0
    ) -> "Lora":
        """Appends a trainable KRAdapter (Khatri-Rao) module for a layer in -> out: U = 0 and V
        kaiming-uniform from seed, so the update is 0 until trained; fixed scale (the paper's
        default is 2). f32 parameters."""
        out = ctypes.POINTER(_ffi.rf_lora)()
        _check(
            _lib.rf_adapter_add_kradapter(
                self._live(), module.encode(), in_features, out_features, scale, seed, ctypes.byref(out)
            )
        )
        return Lora(out, self, module)

    def add_eigenlorax(
        self, basis: "EigenBasis", module: str, rank: int, scale: float = 1.0, seed: int = 0
    ) -> "Lora":
        """Appends a trainable EigenLoRAx module on basis' module `module` (in/out are the
        basis'): loadings K x rank (K = the basis' components), alpha_B = 0 so the update is 0
        until trained; fixed scale. Training updates the loadings only; the module keeps the
        basis alive (basis may be closed afterwards). Its rank (Slot.rank, set_rank) is the
        number of basis components in use."""
        out = ctypes.POINTER(_ffi.rf_lora)()
        _check(
            _lib.rf_adapter_add_eigenlorax(
                self._live(), basis._live(), module.encode(), rank, scale, seed, ctypes.byref(out)
            )
        )
        return Lora(out, self, module)

    def train_enable(self) -> None:
        """Turns training on for every module (e.g. of a loaded adapter)."""
        _check(_lib.rf_adapter_train_enable(self._live()))

    def zero_grad(self) -> None:
        _check(_lib.rf_adapter_zero_grad(self._live()))

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clips the global gradient L2 norm to max_norm; returns the norm before clipping."""
        n = ctypes.c_double()
        _check(_lib.rf_adapter_clip_grad_norm(self._live(), max_norm, ctypes.byref(n)))
        return n.value

    def adamw_step(self, **opts) -> None:
        """One AdamW step on every module, all-or-nothing (see adamw_options for opts)."""
        _check(_lib.rf_adapter_adamw_step(self._live(), ctypes.byref(adamw_options(**opts))))


def adamw_options(
    lr: float = 1e-3, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.01
) -> "_ffi.rf_adamw_options":
    """rf_adamw_options; the defaults are torch.optim.AdamW's."""
    return _ffi.rf_adamw_options(ctypes.sizeof(_ffi.rf_adamw_options), lr, beta1, beta2, eps, weight_decay)


@dataclass(frozen=True)
class LoraInfo:
    in_features: int
    out_features: int
    capacity: int
    rank: int
    alpha: float
    scale: float
    scaling: Scaling
    dtype: DType


class Lora:
    """One module, borrowed from its Adapter (keeps it alive; raises once it is closed). Its kind
    (.kind) is LoRA, KRAdapter or EigenLoRAx; every kind serves in Runtime.linear slots (mixed
    in one call on CPU runtimes), trains with Runtime.backward / adamw_step and saves with
    Adapter.save_peft. For EigenLoRAx, rank means the basis components in use."""

    def __init__(self, ptr, adapter: Adapter, name: str):
        self._ptr = ptr
        self._adapter = adapter
        self.name = name

    def _live(self):
        if self._adapter._closed:
            raise _closed(f"the adapter of module '{self.name}'")
        return self._ptr

    def info(self) -> LoraInfo:
        i = _ffi.rf_lora_info()
        _check(_lib.rf_lora_info_get(self._live(), ctypes.byref(i)))
        return LoraInfo(
            i.in_features,
            i.out_features,
            i.capacity,
            i.rank,
            i.alpha,
            i.scale,
            Scaling(i.scaling),
            DType(i.dtype),
        )

    @property
    def kind(self) -> ModuleKind:
        """What the module is: ModuleKind.LORA, KRADAPTER or EIGENLORAX."""
        k = _ffi.c_enum()
        _check(_lib.rf_lora_kind(self._live(), ctypes.byref(k)))
        try:
            return ModuleKind(k.value)
        except ValueError:
            return k.value  # a kind newer than this package: keep the int

    def set_rank(self, rank: int) -> None:
        """Default rank of later calls (1..capacity; EigenLoRAx: 1..K basis components). Needs
        exclusive access to this lora."""
        if not 0 <= rank <= 0xFFFFFFFF:
            raise Error(Status.INVALID_ARGUMENT, f"rank {rank} is out of range")
        _check(_lib.rf_lora_set_rank(self._live(), rank))

    # Training (each change needs exclusive access to this lora).
    def zero_grad(self) -> None:
        _check(_lib.rf_lora_zero_grad(self._live()))

    def adamw_step(self, **opts) -> None:
        """One AdamW step on this module (see adamw_options); NaN/Inf gradients raise NUMERIC."""
        _check(_lib.rf_lora_adamw_step(self._live(), ctypes.byref(adamw_options(**opts))))

    def enable_gains(self, init: float = 1.0) -> None:
        """Per-component gains E (B diag(E) A, AdaLoRA/ElaLoRA), all set to init."""
        _check(_lib.rf_lora_enable_gains(self._live(), init))

    @property
    def mask(self) -> np.ndarray:
        """The component mask (bool, one per component of the capacity)."""
        p = self._live()
        out = np.zeros(self.info().capacity, dtype=np.uint8)
        _check(_lib.rf_lora_get_mask(p, out.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), out.size))
        return out.astype(bool)

    @mask.setter
    def mask(self, mask) -> None:
        m = np.ascontiguousarray(mask, dtype=np.uint8)
        _check(_lib.rf_lora_set_mask(self._live(), m.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)), m.size))

    def weights(self) -> tuple:
        """Copies of A (capacity x in) and B (out x capacity) in the compute dtype."""
        a, b = rf_matrix(), rf_matrix()
        _check(_lib.rf_lora_weights(self._live(), ctypes.byref(a), ctypes.byref(b)))
        return _array_from(a, None).copy(), _array_from(b, None).copy()

    def set_weights(self, a: np.ndarray, b: np.ndarray) -> None:
        """Replaces A and B with copies of a and b; resets the optimizer state."""
        am, bm = _matrix(a, "a"), _matrix(b, "b")
        _check(_lib.rf_lora_set_weights(self._live(), ctypes.byref(am), ctypes.byref(bm)))

    @property
    def rank(self) -> int:
        return self.info().rank

    @rank.setter
    def rank(self, r: int) -> None:
        self.set_rank(r)

    def __repr__(self):
        return f"Lora({self.name!r})"


@dataclass(frozen=True)
class Slot:
    """One slot of a fused call: rank 0 = the lora's current rank; scale_mult multiplies its
    scale. lora None = no adapter in this slot."""

    lora: Optional[Lora]
    rank: int = 0
    scale_mult: float = 1.0

    @staticmethod
    def of(s) -> "Slot":
        if isinstance(s, Slot):
            return s
        if s is None or isinstance(s, Lora):
            return Slot(s)
        raise Error(Status.INVALID_ARGUMENT, f"slot: expected Lora, Slot or None, got {type(s).__name__}")


# ---------------------------------------------------------------- EigenLoRAx basis


class EigenBasis(_Handle):
    """An EigenLoRAx basis: per module, frozen principal directions shared by many adapters
    (Runtime.load_eigen_basis, EigenBasis.build). Immutable; safe to share across threads.
    Modules made on it (Adapter.add_eigenlorax, Runtime.load_eigenlorax) keep what they need
    alive, so closing the basis early is fine."""

    _what = "eigen basis"

    def __init__(self, ptr):
        self._init_handle(ptr)

    def _free(self, ptr) -> None:
        _lib.rf_eigen_basis_free(ptr)

    @staticmethod
    def build(adapters: Sequence[Adapter], components: int, augment: int = 0, seed: int = 0) -> "EigenBasis":
        """Builds a basis from LoRA adapters (the modules present in all of them, same shapes):
        per module and side the top `components` principal directions of their rank vectors,
        plus `augment` seeded random orthonormal directions."""
        adapters = list(adapters)
        ptrs = (ctypes.POINTER(_ffi.rf_adapter) * max(len(adapters), 1))()
        for i, a in enumerate(adapters):
            if not isinstance(a, Adapter):
                raise Error(Status.INVALID_ARGUMENT, f"adapters[{i}]: expected Adapter, got {type(a).__name__}")
            ptrs[i] = a._live()
        out = ctypes.POINTER(_ffi.rf_eigen_basis)()
        _check(_lib.rf_eigen_basis_build(ptrs, len(adapters), components, augment, seed, ctypes.byref(out)))
        return EigenBasis(out)

    def save(self, path) -> None:
        """Writes a basis folder (created if missing) that Runtime.load_eigen_basis reads back;
        adapters on it store their loadings only."""
        _check(_lib.rf_eigen_basis_save(self._live(), str(path).encode()))

    def __repr__(self):
        return "EigenBasis(closed)" if self._closed else "EigenBasis()"


# ---------------------------------------------------------------- adapter store


@dataclass(frozen=True)
class StoreStats:
    registered: int
    resident: int
    bytes_resident: int
    in_use: int
    pinned: int
    hits: int
    loads: int
    load_failures: int
    evictions: int
    publishes: int
    budget_bytes: int


class _StoreAdapter(Adapter):
    """An adapter acquired from a Store: shared and read-only; close() releases it."""

    def _free(self, ptr) -> None:
        _lib.rf_store_release(ptr)
        self._rt._release()


class Store(_Handle):
    """Adapters by name (Runtime.store). Thread-safe. acquire() returns a shared, read-only
    Adapter that is never evicted until it is closed (use it in a with block)."""

    _what = "store"

    def __init__(self, ptr, rt: Runtime):
        self._rt = rt
        rt._acquire()
        self._init_handle(ptr)

    def _free(self, ptr) -> None:
        _lib.rf_store_free(ptr)
        self._rt._release()

    def register(self, name: str, path) -> None:
        """Registers a PEFT folder under name (loaded on first acquire)."""
        _check(_lib.rf_store_register(self._live(), name.encode(), str(path).encode()))

    def acquire(self, name: str) -> Adapter:
        out = ctypes.POINTER(_ffi.rf_adapter)()
        _check(_lib.rf_store_acquire(self._live(), name.encode(), ctypes.byref(out)))
        return _StoreAdapter(out, self._rt)

    def publish_peft(self, name: str, path) -> int:
        """Publishes a PEFT folder as the new version of name; returns its generation. Adapters
        acquired before keep the version they got."""
        g = ctypes.c_uint64()
        _check(_lib.rf_store_publish_peft(self._live(), name.encode(), str(path).encode(), ctypes.byref(g)))
        return g.value

    def publish(self, name: str, adapter: Adapter) -> int:
        """Publishes an adapter built in memory (e.g. trained) as the new version of name; the
        store takes it over (adapter is closed here). Returns the generation."""
        if isinstance(adapter, _StoreAdapter):
            raise Error(Status.INVALID_ARGUMENT, "an adapter acquired from a store cannot be published")
        g = ctypes.c_uint64()
        with adapter._lock:
            if adapter._refs != 1 or adapter._closed:
                raise Error(Status.INVALID_ARGUMENT, "publish needs an open adapter nothing else holds")
            _check(_lib.rf_store_publish(self._live(), name.encode(), adapter._ptr, ctypes.byref(g)))
            adapter._ptr, adapter._closed, adapter._refs = None, True, 0
        adapter._rt._release()
        return g.value

    def pin(self, name: str, pinned: bool = True) -> None:
        _check(_lib.rf_store_pin(self._live(), name.encode(), pinned))

    def trim(self) -> int:
        n = ctypes.c_size_t()
        _check(_lib.rf_store_trim(self._live(), ctypes.byref(n)))
        return n.value

    def stats(self) -> StoreStats:
        st = _ffi.rf_store_stats()
        _check(_lib.rf_store_stats_get(self._live(), ctypes.byref(st)))
        return StoreStats(*(getattr(st, f) for f, _ in _ffi.rf_store_stats._fields_))
