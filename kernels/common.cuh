// rankfuse CUDA kernels: shared helpers (compiled by NVRTC, no CUDA headers needed).
//
// Storage types: f32 = float, f16 and bf16 = 16-bit patterns in `unsigned short`. Conversions are
// written out (PTX `cvt` for f16, integer rounding for bf16) so the kernels build without
// cuda_fp16.h / cuda_bf16.h and behave the same on every SM.
//
// Every kernel takes one `LinearParams` by value. Its layout is mirrored by
// `src/backend/cuda/launch.rs` (`LinearParams`), and a unit test there checks size and offsets
// against the numbers asserted here.
#pragma once

#define RF_F32 0
#define RF_F16 1
#define RF_BF16 2
#define RF_NONE (-1)

// Most adapter slots one launch handles (the host splits nothing: more is an UNSUPPORTED error).
#define RF_MAX_SLOTS 32

typedef long long i64;
typedef unsigned short u16;
typedef unsigned int u32;

struct SlotParams {
  const void *a;      // A[:r], r x k (lda)
  const void *b;      // B[:, :r], n x r (ldb)
  const void *gains;  // NULL or 1 x r per-component gains
  i64 lda;
  i64 ldb;
  int rank;         // r in use
  int off;          // first column of this slot in T
  int a_dtype;
  int b_dtype;
  int gains_dtype;
  int seg_start;    // rows of this slot: perm[seg_start .. seg_start + seg_len] (perm NULL: 0..m)
  int seg_len;
  float scale;      // scale(r) * scale_mult
};

struct LinearParams {
  const void *x;        // m x k (ldx)
  const void *w;        // n x k (ldw)
  const void *bias;     // NULL or 1 x n
  void *y;              // m x n (ldy)
  float *t;             // m x total_rank (ldt), f32: T = scale * (x A^T) * gains, zero off-slot
  const int *row_slot;  // NULL (stacked) or m entries: slot index or -1
  const int *perm;      // NULL (identity) or rows grouped by slot (see SlotParams.seg_*)
  float *partial;       // decode: splits x m x n f32 partial sums
  i64 ldx;
  i64 ldw;
  i64 ldy;
  i64 ldt;
  int m;
  int n;
  int k;
  int x_dtype;
  int w_dtype;
  int bias_dtype;   // RF_NONE when bias is NULL
  int y_dtype;
  int n_slots;
  int total_rank;
  int k_chunk;      // decode: K elements per split
  int splits;       // decode: number of K splits
  int vec_ok;       // decode: W rows are 16-byte aligned (128-bit loads allowed)
  int shrink_k_chunk;   // shrink: K elements per split (a multiple of 32)
  int shrink_c_chunks;  // shrink: 32-component chunks of the largest active rank
  SlotParams slots[RF_MAX_SLOTS];
};

static_assert(sizeof(SlotParams) == 72, "SlotParams layout is mirrored in launch.rs");
static_assert(sizeof(LinearParams) == 152 + 72 * RF_MAX_SLOTS, "LinearParams layout is mirrored in launch.rs");

// ---------------------------------------------------------------------------------------------
// Conversions

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef RF_CPU_EMULATION  // kernels/emu: the host compiler's _Float16 (same IEEE conversion)
  _Float16 v;
  __builtin_memcpy(&v, &h, 2);
  return (float)v;
#else
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#endif
}

__device__ __forceinline__ u16 f32_to_f16(float f) {
#ifdef RF_CPU_EMULATION
  _Float16 v = (_Float16)f;
  u16 h;
  __builtin_memcpy(&h, &v, 2);
  return h;
#else
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#endif
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
  return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ u16 f32_to_bf16(float f) {
  u32 u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (u16)(u >> 16);
}

// Element `i` of a buffer of runtime dtype `dt`, as f32.
__device__ __forceinline__ float load_as_f32(const void *p, i64 i, int dt) {
  if (dt == RF_F32) return ((const float *)p)[i];
  u16 h = ((const u16 *)p)[i];
  return dt == RF_F16 ? f16_to_f32(h) : bf16_to_f32(h);
}

__device__ __forceinline__ void store_from_f32(void *p, i64 i, int dt, float v) {
  if (dt == RF_F32) {
    ((float *)p)[i] = v;
  } else if (dt == RF_F16) {
    ((u16 *)p)[i] = f32_to_f16(v);
  } else {
    ((u16 *)p)[i] = f32_to_bf16(v);
  }
}

// Compile-time dtype tags for the operand a kernel is specialized on (W for the linear kernels,
// x for the shrink).
struct TagF32 {
  typedef float storage;
  enum { code = RF_F32 };
  static __device__ __forceinline__ float to_f32(float v) { return v; }
};
struct TagF16 {
  typedef u16 storage;
  enum { code = RF_F16 };
  static __device__ __forceinline__ float to_f32(u16 v) { return f16_to_f32(v); }
};
struct TagBF16 {
  typedef u16 storage;
  enum { code = RF_BF16 };
  static __device__ __forceinline__ float to_f32(u16 v) { return bf16_to_f32(v); }
};

// f32 -> the 16-bit type of a tensor-core kernel.
template <int DT>
__device__ __forceinline__ u16 f32_to_16(float v) {
  return DT == RF_F16 ? f32_to_f16(v) : f32_to_bf16(v);
}

// Any dtype -> the 16-bit type DT (bit copy when it already is DT).
template <int DT>
__device__ __forceinline__ u16 load_as_16(const void *p, i64 i, int dt) {
  if (dt == DT) return ((const u16 *)p)[i];
  return f32_to_16<DT>(load_as_f32(p, i, dt));
}

// The launch's dynamic shared memory as `type *name` (kernels/emu: a buffer of the emulator).
#ifdef RF_CPU_EMULATION
#define RF_DYNAMIC_SHARED(type, name) type *name = (type *)emu_dynamic_shared()
#else
#define RF_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Bitmask of the slots whose expand step applies to rows [r0, r0 + rows) of a tile. Stacked mode
// (row_slot NULL): every slot. Called by all threads of the block; uses one shared word.
__device__ __forceinline__ u32 tile_slot_mask(const LinearParams &p, int r0, int rows, u32 *shared_word) {
  if (p.n_slots == 0) return 0u;
  if (p.row_slot == 0) return p.n_slots >= 32 ? 0xffffffffu : ((1u << p.n_slots) - 1u);
  if (threadIdx.x == 0) *shared_word = 0u;
  __syncthreads();
  for (int i = threadIdx.x; i < rows; i += blockDim.x) {
    int r = r0 + i;
    if (r < p.m) {
      int s = p.row_slot[r];
      if (s >= 0) atomicOr(shared_word, 1u << s);
    }
  }
  __syncthreads();
  u32 mask = *shared_word;
  __syncthreads();
  return mask;
}

// ---------------------------------------------------------------------------------------------
// Helpers of the training / algebra kernels (lora_backward.cu, adamw.cu, kron.cu, eigen.cu).

// Element `i` of a buffer as f32: compile-time dtype DT, or the runtime `dt` when DT is RF_NONE.
template <int DT>
__device__ __forceinline__ float load_elem(const void *p, i64 i, int dt) {
  if (DT == RF_F32) return ((const float *)p)[i];
  if (DT == RF_F16) return f16_to_f32(((const u16 *)p)[i]);
  if (DT == RF_BF16) return bf16_to_f32(((const u16 *)p)[i]);
  return load_as_f32(p, i, dt);
}

// Sum of one double per thread over the block (blockDim.x a power of two <= 256); the result is
// valid in thread 0. Called by all threads of the block.
__device__ __forceinline__ double block_sum_f64(double v, double *shared256) {
  shared256[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x >> 1; s > 0; s >>= 1) {
    if ((int)threadIdx.x < s) shared256[threadIdx.x] += shared256[threadIdx.x + s];
    __syncthreads();
  }
  return shared256[0];
}
